//! One agent per interface, told by a lock the kernel releases however the agent dies.
//!
//! Two agents on one interface would both hold and replay every stale SYN. Each agent takes an
//! exclusive `flock` on `/run/watchdog/iface-<netns>-<ifindex>.lock` for every interface it
//! watches and keeps it while attached; a lock held elsewhere is a running (perhaps frozen)
//! agent, and the start is refused. Unlike reading another agent's programs or maps, which
//! needs `CAP_SYS_ADMIN`, this works with the systemd unit's capabilities, on TCX and clsact
//! alike. An agent in another mount namespace (another `/run`) is what it cannot see; the
//! attach paths check what they can besides (a TCX program's name, a clsact filter's heartbeat).
use std::{
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
};

use anyhow::{Result, bail};

use crate::config::Interface;

/// Where the locks live.
const LOCK_DIR: &str = "/run/watchdog";

/// This agent's claim on an interface, released when it exits or dies. Empty when the lock
/// could not be made (a read-only `/run`, say): then only the attach paths' own checks tell.
pub struct InterfaceLock {
    _file: Option<File>,
}

/// Takes `iface`'s lock, or refuses the start when another process holds it.
pub fn claim(iface: &Interface) -> Result<InterfaceLock> {
    let unlocked = InterfaceLock { _file: None };
    let netns = match std::fs::metadata("/proc/thread-self/ns/net") {
        Ok(meta) => meta.ino(),
        Err(_) => return Ok(unlocked),
    };
    let path = PathBuf::from(LOCK_DIR).join(format!("iface-{netns}-{}.lock", iface.index));
    let file = std::fs::create_dir_all(LOCK_DIR).and_then(|()| {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
    });
    let Ok(file) = file else {
        return Ok(unlocked);
    };
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!(
                "another watchdog agent is attached to {} (it holds {}): stop it first",
                iface.name,
                path.display()
            );
        }
        return Ok(unlocked);
    }
    Ok(InterfaceLock { _file: Some(file) })
}
