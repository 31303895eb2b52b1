//! Start-up checks: fail early, with a message that says what to do, before anything is
//! attached; and probe the kernel for what it offers, choosing documented fallbacks.
use std::fmt;

use anyhow::{Result, bail};
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
    util::KernelVersion,
};
use caps::{CapSet, Capability};

use crate::{
    config::Mode,
    sock_diag::{DestroyProbe, SockDiag},
};

/// The agent loads BPF programs (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN on older kernels),
/// attaches them to interfaces and cgroups and destroys sockets (CAP_NET_ADMIN).
pub fn check_capabilities() -> Result<()> {
    let has = |cap| caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false);
    let mut missing = Vec::new();
    if !has(Capability::CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(Capability::CAP_BPF) && !has(Capability::CAP_SYS_ADMIN) {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN)");
    }
    // Without it the verifier refuses the classifier's pointer arithmetic ("!root").
    if !has(Capability::CAP_PERFMON) && !has(Capability::CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON (or CAP_SYS_ADMIN)");
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

/// What the running kernel offers the watchdog.
#[derive(Debug, Clone)]
pub struct KernelFeatures {
    pub release: String,
    /// TC BPF programs (`CONFIG_NET_CLS_BPF`).
    pub tc_bpf: bool,
    /// BPF ring buffers (Linux ≥ 5.8).
    pub ring_buffer: bool,
    /// Kernel BTF at /sys/kernel/btf/vmlinux (`CONFIG_DEBUG_INFO_BTF`); the classifier does
    /// not need it, but verifier messages and `bpftool` are better with it.
    pub btf: bool,
    /// TCX links (Linux ≥ 6.6); otherwise a clsact qdisc filter.
    pub tcx: bool,
    /// sock_diag SOCK_DESTROY (`CONFIG_INET_DIAG_DESTROY`).
    pub sock_destroy: DestroyProbe,
}

impl KernelFeatures {
    pub fn probe() -> Result<Self> {
        let release = KernelVersion::current()
            .map(|v| v.to_string())
            .unwrap_or_else(|_| "unknown".into());
        Ok(KernelFeatures {
            release,
            tc_bpf: is_program_supported(ProgramType::SchedClassifier).unwrap_or(false),
            ring_buffer: is_map_supported(MapType::RingBuf).unwrap_or(false),
            btf: std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
            tcx: KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)),
            sock_destroy: SockDiag::open()?.probe_destroy()?,
        })
    }

    /// Stops with the kernel option to enable when something `mode` needs is missing.
    pub fn require(&self, mode: Mode) -> Result<()> {
        if !self.tc_bpf {
            bail!(
                "this kernel cannot run TC BPF programs: enable CONFIG_BPF_SYSCALL, \
                 CONFIG_NET_CLS_BPF and CONFIG_NET_SCH_INGRESS"
            );
        }
        if !self.ring_buffer {
            bail!(
                "this kernel has no BPF ring buffers (BPF_MAP_TYPE_RINGBUF, Linux ≥ 5.8): \
                 the watchdog needs Linux 5.8 or newer"
            );
        }
        if mode == Mode::Observe {
            return Ok(());
        }
        match self.sock_destroy {
            DestroyProbe::Supported => Ok(()),
            DestroyProbe::NotCompiledIn => bail!(
                "this kernel cannot destroy sockets: it lacks CONFIG_INET_DIAG_DESTROY \
                 (sock_diag SOCK_DESTROY answered EOPNOTSUPP); run with --mode observe to \
                 report only"
            ),
            DestroyProbe::NotPermitted => bail!(
                "the kernel refused SOCK_DESTROY (EPERM): the agent needs CAP_NET_ADMIN in \
                 the server's network namespace"
            ),
        }
    }
}

impl fmt::Display for DestroyProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DestroyProbe::Supported => "yes",
            DestroyProbe::NotCompiledIn => "no (CONFIG_INET_DIAG_DESTROY missing)",
            DestroyProbe::NotPermitted => "not permitted",
        })
    }
}
