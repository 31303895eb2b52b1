//! Actions on a stale socket: look it up, then destroy it through sock_diag.
//!
//! The look-up and the destroy are separate so that the guards can judge the socket the kernel
//! reports (its idle time, for one) between the two.
use std::{io, time::Duration, time::Instant};

use crate::{
    events::StaleSyn,
    sock_diag::{SockDiag, SocketInfo, TCP_ESTABLISHED, unmap},
};

/// Why there is nothing to act on.
#[derive(Debug)]
pub enum NotFound {
    /// The socket closed or changed state after the SYN was seen.
    Gone(String),
    /// The kernel could not answer.
    Failed(io::Error),
}

/// The ESTABLISHED socket that owns the stale SYN's tuple, as the kernel reports it now.
pub fn find_stale(diag: &mut SockDiag, syn: &StaleSyn) -> Result<SocketInfo, NotFound> {
    let info = match diag.find(&syn.stale_tuple()) {
        Ok(Some(info)) => info,
        Ok(None) => return Err(NotFound::Gone("no socket owns the tuple".into())),
        Err(e) => return Err(NotFound::Failed(e)),
    };
    if info.state != TCP_ESTABLISHED {
        return Err(NotFound::Gone(format!(
            "the tuple's socket is in TCP state {}, not ESTABLISHED",
            info.state
        )));
    }
    if unmap(info.remote) != syn.client || unmap(info.local) != syn.server {
        return Err(NotFound::Gone(format!(
            "the kernel returned another socket ({} ↔ {})",
            info.local, info.remote
        )));
    }
    Ok(info)
}

#[derive(Debug)]
pub enum DestroyOutcome {
    /// The stale socket is gone; the server's blocked `recv()` returns ECONNABORTED.
    Destroyed { took: Duration },
    /// It vanished between the look-up and the destroy.
    AlreadyGone(String),
    /// The kernel refused or failed.
    Failed(io::Error),
}

/// Destroys exactly the socket `info` describes, by its cookie: a socket that closed meanwhile
/// is not confused with the listener the kernel's tuple lookup would fall back to.
pub fn destroy(diag: &mut SockDiag, syn: &StaleSyn, info: &SocketInfo) -> DestroyOutcome {
    let started = Instant::now();
    match diag.destroy(&syn.stale_tuple(), info.cookie) {
        Ok(()) => DestroyOutcome::Destroyed {
            took: started.elapsed(),
        },
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESTALE)) => {
            DestroyOutcome::AlreadyGone(format!("the socket vanished before the destroy: {e}"))
        }
        Err(e) => DestroyOutcome::Failed(e),
    }
}
