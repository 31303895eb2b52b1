//! Dead peers: the kernel's verdict on timed connections, put into words.
//!
//! The sock_ops program reports every timed connection that goes from ESTABLISHED straight to
//! CLOSE. That transition alone does not say why: the keepalive timer gave up, data stayed
//! unacknowledged past the user timeout, the peer sent a reset, or someone (the watchdog
//! itself, `ss -K`) aborted it. Unacknowledged data is in the report itself; for the rest the
//! agent samples the timed connections' `tcp_info` once a second, so that a connection that had
//! keepalive probes outstanding when it closed is known to have died of them.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use watchdog_common::ConnectionClosed;

use crate::{
    config::PortTimerConfig,
    sock_diag::{ConnectionSample, SockDiag},
};

/// How long the agent remembers the sockets it destroyed itself.
const OWN_DESTROY_MEMORY: Duration = Duration::from_secs(5);

/// Why a timed connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// Keepalive probes went unanswered.
    Keepalive { probes: u32 },
    /// Sent data stayed unacknowledged (user timeout or retransmissions exhausted).
    Unacknowledged { segments: u32 },
    /// A reset from the peer or an abort on this host.
    ResetOrAborted,
}

/// An abrupt close, explained.
#[derive(Debug, Clone)]
pub struct DeadPeer {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub cause: Cause,
    pub timers: Option<PortTimerConfig>,
    /// Time without data from the peer at the last sample before the close.
    pub idle: Option<Duration>,
    pub bytes_received: u64,
}

impl DeadPeer {
    pub fn reason(&self) -> String {
        let timers = self.timers.as_ref();
        match &self.cause {
            Cause::Keepalive { probes } => match timers.and_then(|t| t.keepalive) {
                Some(k) => format!(
                    "peer dead: {} keepalive probes unanswered ({}s idle, then one every {}s; \
                     {probes} seen outstanding)",
                    k.count,
                    k.idle.as_secs(),
                    k.interval.as_secs()
                ),
                None => format!("peer dead: keepalive probes unanswered ({probes} seen)"),
            },
            Cause::Unacknowledged { segments } => match timers.and_then(|t| t.user_timeout) {
                Some(t) => format!(
                    "peer dead: {segments} segment(s) unacknowledged for the user timeout of {} ms",
                    t.as_millis()
                ),
                None => format!(
                    "peer dead: {segments} segment(s) unacknowledged, retransmissions exhausted"
                ),
            },
            Cause::ResetOrAborted => "reset by the peer or aborted on this host".into(),
        }
    }
}

pub struct DeadPeers {
    timers: BTreeMap<u16, PortTimerConfig>,
    /// The latest `tcp_info` sample of each timed connection, by (local, remote).
    samples: HashMap<(SocketAddr, SocketAddr), ConnectionSample>,
    own_destroys: HashMap<(SocketAddr, SocketAddr), Instant>,
}

impl DeadPeers {
    pub fn new(timers: BTreeMap<u16, PortTimerConfig>) -> Self {
        DeadPeers {
            timers,
            samples: HashMap::new(),
            own_destroys: HashMap::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.timers.is_empty()
    }

    /// Takes a fresh sample of the timed connections.
    pub fn sample(&mut self, diag: &mut SockDiag) -> Result<()> {
        let ports: Vec<u16> = self.timers.keys().copied().collect();
        let now = diag.established_on(&ports)?;
        // A connection that vanished since the last sample keeps its last sample until its
        // close report arrives (it is usually already in the ring buffer).
        let mut fresh: HashMap<_, _> = now.into_iter().map(|s| ((s.local, s.remote), s)).collect();
        for (key, old) in self.samples.drain() {
            fresh.entry(key).or_insert(old);
        }
        self.samples = fresh;
        let now = Instant::now();
        self.own_destroys
            .retain(|_, at| now.duration_since(*at) < OWN_DESTROY_MEMORY);
        Ok(())
    }

    /// Remembers a socket the agent destroyed, so its close is not taken for a dead peer.
    pub fn note_own_destroy(&mut self, local: SocketAddr, remote: SocketAddr) {
        self.own_destroys.insert((local, remote), Instant::now());
    }

    /// Explains a close report; `None` for the agent's own destroys.
    pub fn explain(&mut self, closed: &ConnectionClosed) -> Option<DeadPeer> {
        let local = socket_addr(closed.local_addr, closed.local_port);
        let remote = socket_addr(closed.remote_addr, closed.remote_port);
        if self.own_destroys.remove(&(local, remote)).is_some() {
            self.samples.remove(&(local, remote));
            return None;
        }
        let sample = self.samples.remove(&(local, remote));
        let cause = if closed.packets_out > 0 {
            Cause::Unacknowledged {
                segments: closed.packets_out,
            }
        } else if let Some(sample) = sample.as_ref().filter(|s| s.probes > 0) {
            Cause::Keepalive {
                probes: u32::from(sample.probes),
            }
        } else {
            Cause::ResetOrAborted
        };
        let (client, server, port) = if closed.active == 0 {
            (remote, local, local.port())
        } else {
            (local, remote, remote.port())
        };
        Some(DeadPeer {
            client,
            server,
            cause,
            timers: self.timers.get(&port).copied(),
            idle: sample.and_then(|s| s.idle),
            bytes_received: closed.bytes_received,
        })
    }
}

/// Decodes one `CLOSES` record.
pub fn decode(bytes: &[u8]) -> Result<ConnectionClosed> {
    if bytes.len() != size_of::<ConnectionClosed>() {
        bail!(
            "close record of {} bytes, expected {}: agent and eBPF object disagree",
            bytes.len(),
            size_of::<ConnectionClosed>()
        );
    }
    // SAFETY: the length matches and `ConnectionClosed` is plain data valid for any bytes.
    Ok(unsafe { bytes.as_ptr().cast::<ConnectionClosed>().read_unaligned() })
}

/// IPv4-mapped addresses (IPv4 sockets, and IPv4 peers of dual-stack ones) as plain IPv4.
fn socket_addr(addr: [u8; 16], port: u16) -> SocketAddr {
    let v6 = Ipv6Addr::from(addr);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, port)
}
