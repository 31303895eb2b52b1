//! Start-up checks: fail early, with a message that says what to do, before anything is attached.
use anyhow::{Result, bail};
use caps::{CapSet, Capability};

use crate::sock_diag::{DestroyProbe, SockDiag};

/// The agent loads BPF programs (CAP_BPF, or CAP_SYS_ADMIN on older kernels), attaches them to
/// interfaces and destroys sockets (CAP_NET_ADMIN).
pub fn check_capabilities() -> Result<()> {
    let has = |cap| caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false);
    let mut missing = Vec::new();
    if !has(Capability::CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(Capability::CAP_BPF) && !has(Capability::CAP_SYS_ADMIN) {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN)");
    }
    if !missing.is_empty() {
        // SAFETY: no preconditions.
        let hint = if unsafe { libc::geteuid() } == 0 {
            "this root process lacks them (a restricted container or bounding set?)"
        } else {
            "run it as root or grant them (e.g. systemd AmbientCapabilities=)"
        };
        bail!(
            "watchdog needs {} to load its eBPF classifier and destroy sockets: {hint}",
            missing.join(" and ")
        );
    }
    Ok(())
}

/// Probes SOCK_DESTROY the way Cilium does: ask to destroy a socket that cannot exist and read
/// the kernel's answer. Needed only when the agent will destroy sockets.
pub fn check_sock_destroy() -> Result<()> {
    match SockDiag::open()?.probe_destroy()? {
        DestroyProbe::Supported => Ok(()),
        DestroyProbe::NotCompiledIn => bail!(
            "this kernel cannot destroy sockets: it lacks CONFIG_INET_DIAG_DESTROY \
             (sock_diag SOCK_DESTROY answered EOPNOTSUPP); run with --dry-run to observe only"
        ),
        DestroyProbe::NotPermitted => bail!(
            "the kernel refused SOCK_DESTROY (EPERM): the agent needs CAP_NET_ADMIN in the \
             server's network namespace"
        ),
    }
}
