//! Loading and attaching the eBPF object embedded in this binary, and reading its maps: the TC
//! classifier, the XDP replay program and, when per-port timers are configured, the sock_ops
//! program that sets them.
//!
//! Dropping [`Classifier`] detaches everything: TCX and cgroup links (kernel ≥ 6.6 / 5.7) are
//! owned by file descriptors, netlink (clsact) filters are removed by aya on drop, and a clsact
//! qdisc the agent added goes after them ([`clsact`]).
use std::{fs::File, os::fd::AsRawFd, path::PathBuf};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        CgroupAttachMode, LinkOrder, SchedClassifier, SockOps, TcAttachType, Xdp,
        tc::{NlOptions, TcAttachOptions},
    },
    util::KernelVersion,
};
use ipnet::IpNet;
use watchdog_common::{Counter, PortTimers, ReplayKey, TupleKey, names};

use crate::{
    clsact,
    config::{Interface, Mode, RunConfig, TimerConfig},
    interface_lock::{self, InterfaceLock},
};

/// The classifier's name as the kernel keeps it (`BPF_OBJ_NAME_LEN` is 16 with the NUL).
const KERNEL_PROGRAM_NAME: &str = "stale_syn_class";

/// The object `cargo xtask build-ebpf` built, embedded at compile time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("WATCHDOG_EBPF_OBJECT"));

pub struct Classifier {
    ebpf: Ebpf,
    heartbeat: Array<MapData, u64>,
    replayed: HashMap<MapData, ReplayKey, u8>,
    refused: HashMap<MapData, TupleKey, u64>,
    /// Program id in the kernel, for `bpftool prog show id N`.
    pub program_id: u32,
    /// "tcx" or "clsact".
    pub attach_kind: &'static str,
    /// Why connection lifecycle events are off, when they are.
    pub lifecycle_unavailable: Option<String>,
    /// Declared after `ebpf`, so it drops after the filters are gone.
    _added_clsact: AddedClsact,
    /// This agent's claim on each interface, released last.
    _locks: Vec<InterfaceLock>,
}

/// The interfaces whose clsact qdisc this agent added; removed again on drop when nothing else
/// hangs on them.
#[derive(Default)]
struct AddedClsact(Vec<Interface>);

impl Drop for AddedClsact {
    fn drop(&mut self) {
        for iface in &self.0 {
            if let Err(error) = clsact::remove_if_unused(iface.index) {
                tracing::warn!(
                    event = "clsact_left",
                    iface = %iface.name,
                    error = %format!("{error:#}"),
                    "could not remove the clsact qdisc this agent added"
                );
            }
        }
    }
}

impl Classifier {
    /// Loads the program, fills its filter maps from `config` and attaches it to every
    /// configured interface. On any error, everything attached so far is detached again.
    pub fn attach(config: &RunConfig) -> Result<Self> {
        let client_filter: u8 = u8::from(!config.clients.is_empty());
        let hold: u8 = u8::from(config.mode == Mode::Replay);
        let netns_cookie = own_netns_cookie()?;
        let mut ebpf = EbpfLoader::new()
            .override_global(names::CLIENT_FILTER_ENABLED, &client_filter, true)
            .override_global(names::HOLD_ENABLED, &hold, true)
            .override_global(names::TIMERS_NETNS_COOKIE, &netns_cookie, true)
            .load(OBJECT)
            .context(
                "loading the eBPF classifier failed: the kernel needs BPF \
                 (CONFIG_BPF_SYSCALL) with BTF, ring buffers (≥ 5.8) and TC BPF",
            )?;

        let mut ports: HashMap<_, u16, u8> =
            HashMap::try_from(map(&mut ebpf, names::WATCHED_PORTS)?)?;
        for port in &config.ports {
            ports.insert(port, 1, 0).context("filling WATCHED_PORTS")?;
        }
        let mut prefixes: LpmTrie<_, [u8; 16], u8> =
            LpmTrie::try_from(map(&mut ebpf, names::CLIENT_PREFIXES)?)?;
        for net in &config.clients {
            let (prefix_len, addr) = mapped_prefix(net);
            prefixes
                .insert(&Key::new(prefix_len, addr), 1, 0)
                .context("filling CLIENT_PREFIXES")?;
        }

        let lifecycle_unavailable = attach_connections(&mut ebpf, &config.timers)?;

        let replay: &mut Xdp = ebpf
            .program_mut(names::REPLAY_PASS)
            .context("the eBPF object has no replay program")?
            .try_into()?;
        replay.load().context("loading the XDP replay program")?;

        let program: &mut SchedClassifier = ebpf
            .program_mut(names::CLASSIFIER)
            .context("the eBPF object has no classifier program")?
            .try_into()?;
        program
            .load()
            .context("the kernel's verifier rejected the classifier")?;
        let program_id = program.info()?.id();
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        let mut added_clsact = AddedClsact::default();
        let mut locks = Vec::new();
        for iface in &config.ifaces {
            locks.push(interface_lock::claim(iface)?);
            // First on the hook: a program or filter ahead that ends classification (as
            // Cilium's do) would keep stale SYNs from the classifier, which itself passes
            // everything on but the SYNs it holds.
            let order = if tcx {
                refuse_second_agent(iface)?;
                TcAttachOptions::TcxOrder(LinkOrder::first())
            } else {
                let prepared = clsact::prepare(iface)?;
                if prepared.added_qdisc {
                    added_clsact.0.push(iface.clone());
                }
                TcAttachOptions::Netlink(NlOptions {
                    priority: prepared.priority,
                    ..NlOptions::default()
                })
            };
            program
                .attach_with_options(&iface.name, TcAttachType::Ingress, order)
                .with_context(|| format!("attaching the classifier to {} ingress", iface.name))?;
        }
        let heartbeat = Array::try_from(
            ebpf.take_map(names::HEARTBEAT)
                .context("the eBPF object has no HEARTBEAT map")?,
        )?;
        let replayed = HashMap::try_from(
            ebpf.take_map(names::REPLAYED)
                .context("the eBPF object has no REPLAYED map")?,
        )?;
        let refused = HashMap::try_from(
            ebpf.take_map(names::REFUSED)
                .context("the eBPF object has no REFUSED map")?,
        )?;
        Ok(Classifier {
            ebpf,
            heartbeat,
            replayed,
            refused,
            program_id,
            attach_kind: if tcx { "tcx" } else { "clsact" },
            lifecycle_unavailable,
            _added_clsact: added_clsact,
            _locks: locks,
        })
    }

    /// Tells the classifier the agent is alive as of `now_ns` (`CLOCK_MONOTONIC`); 0 stops
    /// holding at once.
    pub fn beat(&mut self, now_ns: u64) -> Result<()> {
        self.heartbeat
            .set(0, now_ns, 0)
            .context("writing the heartbeat")
    }

    /// Announces that the agent re-injects this SYN: the classifier lets it through once.
    pub fn announce_replay(&mut self, key: &ReplayKey) -> Result<()> {
        self.replayed.insert(key, 1, 0).context("writing REPLAYED")
    }

    /// Until `until_ns` (`CLOCK_MONOTONIC`), report this tuple's SYNs without holding them.
    pub fn back_off(&mut self, tuple: &TupleKey, until_ns: u64) -> Result<()> {
        self.refused
            .insert(tuple, until_ns, 0)
            .context("writing REFUSED")
    }

    /// The XDP program that passes re-injected frames.
    pub fn replay_program(&self) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(names::REPLAY_PASS)
            .context("the eBPF object has no replay program")?
            .try_into()?)
    }

    /// Takes the ring buffer of watched connections' lifecycle events (once).
    pub fn take_connections(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(names::CONNECTIONS)
            .context("the eBPF object has no CONNECTIONS ring buffer")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Takes the ring buffer of stale SYN events (once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(names::EVENTS)
            .context("the eBPF object has no EVENTS ring buffer")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// One counter, summed over CPUs.
    pub fn counter(&self, counter: Counter) -> Result<u64> {
        let map = self
            .ebpf
            .map(names::COUNTERS)
            .context("the eBPF object has no COUNTERS map")?;
        let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        Ok(counters.get(&(counter as u32), 0)?.iter().sum())
    }

    /// The classifier's counters, summed over CPUs, in [`Counter::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        Counter::ALL
            .iter()
            .map(|&counter| Ok((counter, self.counter(counter)?)))
            .collect()
    }
}

/// Fills `PORT_TIMERS` and attaches the sock_ops program that follows watched connections and
/// sets their timers. Without per-port timers, a failure only costs the connection lifecycle
/// events, so it is returned as a warning (`Ok(Some(..))`); with timers it is an error.
fn attach_connections(ebpf: &mut Ebpf, timers: &TimerConfig) -> Result<Option<String>> {
    let mut map: HashMap<_, u16, PortTimers> = HashMap::try_from(map(ebpf, names::PORT_TIMERS)?)?;
    for (port, config) in &timers.ports {
        let keepalive = config.keepalive;
        let value = PortTimers {
            keepalive_idle_s: keepalive.map_or(0, |k| k.idle.as_secs() as u32),
            keepalive_interval_s: keepalive.map_or(0, |k| k.interval.as_secs() as u32),
            keepalive_count: keepalive.map_or(0, |k| k.count),
            user_timeout_ms: config.user_timeout.map_or(0, |d| d.as_millis() as u32),
            include_active: u32::from(config.include_active),
        };
        map.insert(port, value, 0).context("filling PORT_TIMERS")?;
    }
    match load_and_attach_sock_ops(ebpf, timers) {
        Ok(()) => Ok(None),
        Err(error) if timers.ports.is_empty() => Ok(Some(format!("{error:#}"))),
        Err(error) => Err(error.context("--keepalive/--user-timeout need the sock_ops program")),
    }
}

fn load_and_attach_sock_ops(ebpf: &mut Ebpf, timers: &TimerConfig) -> Result<()> {
    let path = match &timers.cgroup {
        Some(path) => path.clone(),
        None => cgroup2_root()?,
    };
    let cgroup =
        File::open(&path).with_context(|| format!("opening the cgroup {}", path.display()))?;
    let program: &mut SockOps = ebpf
        .program_mut(names::CONNECTIONS_PROGRAM)
        .context("the eBPF object has no sock_ops program")?
        .try_into()?;
    program
        .load()
        .context("loading the sock_ops program (needs CONFIG_CGROUP_BPF)")?;
    // A cgroup bpf_link (≥ 5.7) always coexists with other programs and takes no flags; the
    // older attach needs BPF_F_ALLOW_MULTI for that.
    let mode = if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 7, 0)) {
        CgroupAttachMode::Single
    } else {
        CgroupAttachMode::AllowMultiple
    };
    program
        .attach(&cgroup, mode)
        .with_context(|| format!("attaching sock_ops to {}", path.display()))?;
    Ok(())
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on most systems, `/sys/fs/cgroup/unified` on
/// hybrid ones.
fn cgroup2_root() -> Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .context(
            "cgroup v2 is not mounted here; mount it, or pass --cgroup (`ip netns exec` gives \
             the agent a private /sys without it: enter the namespace with \
             `nsenter --net=/run/netns/NAME` instead)",
        )
}

/// This network namespace's cookie (`SO_NETNS_COOKIE`, Linux ≥ 5.14): the sock_ops program
/// runs for a whole cgroup and must leave other namespaces' sockets alone.
fn own_netns_cookie() -> Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .context("opening a socket to read the network namespace cookie")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out pointer and length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading SO_NETNS_COOKIE (Linux ≥ 5.14)");
    }
    Ok(cookie)
}

/// `SO_NETNS_COOKIE` from `asm-generic/socket.h`.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Two agents on one interface would both hold and replay every stale SYN. Besides the
/// interface lock, a watchdog classifier among the interface's TCX programs tells (an agent in
/// another mount namespace, say). Naming those programs opens them by id, which needs
/// `CAP_SYS_ADMIN`: without it the lock alone decides, and another tool's TCX programs (Cilium,
/// say) never stop the start.
fn refuse_second_agent(iface: &Interface) -> Result<()> {
    let attached = match SchedClassifier::query_tcx(&iface.name, TcAttachType::Ingress) {
        Ok((_, attached)) => attached,
        Err(error) if permission_denied(&error) => return Ok(()),
        Err(error) => {
            return Err(error).with_context(|| format!("listing TCX programs on {}", iface.name));
        }
    };
    if let Some(other) = attached
        .iter()
        .find(|p| p.name_as_str() == Some(KERNEL_PROGRAM_NAME))
    {
        bail!(
            "another watchdog agent is attached to {} (program id {}): stop it first",
            iface.name,
            other.id()
        );
    }
    Ok(())
}

/// Whether `error` comes down to `EPERM` (a missing capability).
fn permission_denied(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM))
    })
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("the eBPF object has no {name} map"))
}

/// A client prefix in the classifier's 128-bit, IPv4-mapped key space.
fn mapped_prefix(net: &IpNet) -> (u32, [u8; 16]) {
    match net {
        IpNet::V4(v4) => (
            96 + u32::from(v4.prefix_len()),
            v4.network().to_ipv6_mapped().octets(),
        ),
        IpNet::V6(v6) => (u32::from(v6.prefix_len()), v6.network().octets()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_prefixes_map_into_the_ipv6_key_space() {
        let (len, addr) = mapped_prefix(&"10.1.2.0/24".parse().unwrap());
        assert_eq!(len, 120);
        assert_eq!(&addr[10..], &[0xff, 0xff, 10, 1, 2, 0]);
        let (len, _) = mapped_prefix(&"fd00::/8".parse().unwrap());
        assert_eq!(len, 8);
    }
}
