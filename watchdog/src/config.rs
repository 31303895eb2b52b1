//! The validated run configuration: what `watchdog run` was asked to do, checked before anything
//! touches the kernel, so a bad flag never leaves a half-attached watchdog behind.
use std::{collections::BTreeSet, ffi::CString, fmt, time::Duration};

use anyhow::{Context, Result, bail};
use ipnet::IpNet;

use crate::cli::RunArgs;

/// What the agent does with a stale socket once its guards allow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Report only (`--dry-run`).
    Observe,
    /// Destroy the stale socket; the client's next SYN retransmission connects.
    Destroy,
    /// Hold the stale SYN, destroy the socket, re-inject the SYN: the client connects at once.
    Replay,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Observe => "observe",
            Mode::Destroy => "destroy",
            Mode::Replay => "replay",
        })
    }
}

/// A network interface, resolved in the agent's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub ifaces: Vec<Interface>,
    pub ports: BTreeSet<u16>,
    pub clients: Vec<IpNet>,
    pub mode: Mode,
    /// Idle guard: destroy only sockets that received nothing for at least this long.
    pub min_idle: Duration,
}

impl RunConfig {
    pub fn from_args(args: &RunArgs) -> Result<Self> {
        let mut ifaces: Vec<Interface> = Vec::new();
        for name in &args.ifaces {
            let iface = resolve_interface(name)?;
            if !ifaces.contains(&iface) {
                ifaces.push(iface);
            }
        }
        let ports: BTreeSet<u16> = args.ports.iter().copied().collect();
        if ports.contains(&0) {
            bail!("--port 0 is not a port a server listens on; use 1-65535");
        }
        Ok(RunConfig {
            ifaces,
            ports,
            clients: args.clients.iter().map(IpNet::trunc).collect(),
            mode: match (args.dry_run, args.mode) {
                (true, _) => Mode::Observe,
                (false, Some(mode)) => mode,
                (false, None) => Mode::Replay,
            },
            min_idle: args.min_idle.map_or(Duration::ZERO, Into::into),
        })
    }
}

fn resolve_interface(name: &str) -> Result<Interface> {
    let c_name = CString::new(name).with_context(|| format!("interface name {name:?}"))?;
    // SAFETY: `c_name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        bail!(
            "unknown interface {name:?} in this network namespace (see `ip link`): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(Interface {
        name: name.to_owned(),
        index,
    })
}
