//! Watched connections' lives, as the sock_ops program reports them, put into words: so that
//! one client's story reads as a sequence — connected, stale SYN, destroyed, reconnected after
//! 0.6 ms — and a dead peer's end says what killed it.
//!
//! An ESTABLISHED → CLOSE transition alone does not say why: the keepalive timer gave up, data
//! stayed unacknowledged past the user timeout, the peer sent a reset, or someone (the watchdog
//! itself, `ss -K`) aborted it — and by then the kernel has emptied the socket. So the agent
//! samples the timed connections twice a second: one that still had data waiting for the peer
//! (unacknowledged, or queued behind a closed window) died of the user timeout; one with
//! keepalive probes outstanding and nothing to send died of keepalive.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use watchdog_common::{ConnectionEvent, connection_event};

use crate::{
    config::PortTimerConfig,
    sock_diag::{ConnectionSample, SockDiag},
};

/// How long the agent remembers the sockets it destroyed itself, and stale SYNs whose client is
/// expected to connect again.
const MEMORY: Duration = Duration::from_secs(10);
/// How often a destroy also forgets what is older than [`MEMORY`]: not at every one, which
/// would cost a mass crash a pass over a thousand entries per destroy.
const FORGET_INTERVAL: Duration = Duration::from_secs(1);
/// How long the last sample of a vanished connection is kept for its close report.
const VANISHED_MEMORY: Duration = Duration::from_secs(5);

/// What the agent makes of one [`ConnectionEvent`].
#[derive(Debug, Clone)]
pub enum Story {
    /// A watched connection was established; `after_stale_syn` when it is the client coming
    /// back after the watchdog cleared its stale socket (from that SYN to now).
    Connected {
        client: SocketAddr,
        server: SocketAddr,
        after_stale_syn: Option<Duration>,
    },
    /// The peer closed its side.
    PeerClosed {
        client: SocketAddr,
        server: SocketAddr,
        bytes_received: u64,
    },
    /// The connection ended abruptly, not by the watchdog's hand.
    Ended(DeadPeer),
}

/// Why a timed connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// Keepalive probes went unanswered.
    Keepalive { probes: u32 },
    /// Data for the peer stayed unacknowledged (user timeout or retransmissions exhausted).
    Unacknowledged { queued_bytes: u32 },
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
            Cause::Unacknowledged { queued_bytes } => match timers.and_then(|t| t.user_timeout) {
                Some(t) => format!(
                    "peer dead: data unacknowledged for the user timeout of {} ms \
                     ({queued_bytes} bytes waiting)",
                    t.as_millis()
                ),
                None => format!(
                    "peer dead: data unacknowledged, retransmissions exhausted \
                     ({queued_bytes} bytes waiting)"
                ),
            },
            Cause::ResetOrAborted => "reset by the peer or aborted on this host".into(),
        }
    }
}

pub struct Connections {
    timers: BTreeMap<u16, PortTimerConfig>,
    /// The latest `tcp_info` sample of each timed connection, by (local, remote), and when it
    /// was taken.
    samples: HashMap<(SocketAddr, SocketAddr), (ConnectionSample, Instant)>,
    own_destroys: HashMap<(SocketAddr, SocketAddr), Instant>,
    /// Stale SYNs whose socket the agent cleared: (server, client) → the SYN's
    /// `CLOCK_MONOTONIC` ns, to tell how long the client took to get back in.
    cleared: HashMap<(SocketAddr, SocketAddr), (u64, Instant)>,
    /// When [`Connections::forget_old`] last ran.
    forgotten_at: Instant,
}

impl Connections {
    pub fn new(timers: BTreeMap<u16, PortTimerConfig>) -> Self {
        Connections {
            timers,
            samples: HashMap::new(),
            own_destroys: HashMap::new(),
            cleared: HashMap::new(),
            forgotten_at: Instant::now(),
        }
    }

    /// Whether any port has timers (and so needs sampling).
    pub fn timed(&self) -> bool {
        !self.timers.is_empty()
    }

    /// Takes a fresh sample of the timed connections.
    pub fn sample(&mut self, diag: &mut SockDiag) -> Result<()> {
        let ports: Vec<u16> = self.timers.keys().copied().collect();
        let now = diag.established_on(&ports)?;
        // A connection that vanished keeps its last sample for a while: its close report may
        // still be on its way. Samples of connections gone longer than that are forgotten.
        let at = Instant::now();
        let mut fresh: HashMap<_, _> = now
            .into_iter()
            .map(|s| ((s.local, s.remote), (s, at)))
            .collect();
        for (key, (old, seen)) in self.samples.drain() {
            if at.duration_since(seen) < VANISHED_MEMORY {
                fresh.entry(key).or_insert((old, seen));
            }
        }
        self.samples = fresh;
        self.forget_old(at);
        Ok(())
    }

    fn forget_old(&mut self, now: Instant) {
        self.forgotten_at = now;
        self.own_destroys
            .retain(|_, at| now.duration_since(*at) < MEMORY);
        self.cleared
            .retain(|_, (_, at)| now.duration_since(*at) < MEMORY);
    }

    /// Remembers a socket the agent destroyed, so its close is not taken for a dead peer, and
    /// the stale SYN (seen at `syn_seen_ns`) whose client should now connect.
    pub fn note_own_destroy(&mut self, server: SocketAddr, client: SocketAddr, syn_seen_ns: u64) {
        let now = Instant::now();
        if now.duration_since(self.forgotten_at) >= FORGET_INTERVAL {
            self.forget_old(now);
        }
        self.own_destroys.insert((server, client), now);
        self.cleared.insert((server, client), (syn_seen_ns, now));
    }

    /// What one report means; `None` for the close of a socket the agent destroyed itself.
    pub fn story(&mut self, event: &ConnectionEvent) -> Option<Story> {
        let local = socket_addr(event.local_addr, event.local_port);
        let remote = socket_addr(event.remote_addr, event.remote_port);
        let (client, server) = if event.active == 0 {
            (remote, local)
        } else {
            (local, remote)
        };
        match event.kind {
            connection_event::ESTABLISHED => Some(Story::Connected {
                client,
                server,
                after_stale_syn: self.reconnected_after(server, client, event.seen_ns),
            }),
            connection_event::PEER_CLOSED => {
                self.samples.remove(&(local, remote));
                Some(Story::PeerClosed {
                    client,
                    server,
                    // The kernel counts the FIN in `bytes_received`.
                    bytes_received: event.bytes_received.saturating_sub(1),
                })
            }
            _ => self.explain(event, local, remote).map(Story::Ended),
        }
    }

    /// How long after its cleared stale SYN a connection established at `established_ns`
    /// came back; `None` when it is not such a return (a connection established before the
    /// SYN is the one the SYN found stale).
    fn reconnected_after(
        &mut self,
        server: SocketAddr,
        client: SocketAddr,
        established_ns: u64,
    ) -> Option<Duration> {
        let &(syn_ns, _) = self.cleared.get(&(server, client))?;
        if established_ns < syn_ns {
            return None;
        }
        self.cleared.remove(&(server, client));
        Some(Duration::from_nanos(established_ns - syn_ns))
    }

    /// Explains an abrupt close; `None` for the agent's own destroys.
    fn explain(
        &mut self,
        closed: &ConnectionEvent,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Option<DeadPeer> {
        if self.own_destroys.remove(&(local, remote)).is_some() {
            self.samples.remove(&(local, remote));
            return None;
        }
        let sample = self.samples.remove(&(local, remote)).map(|(s, _)| s);
        let waiting = sample
            .as_ref()
            .filter(|s| s.unacked > 0 || s.send_queue > 0)
            .map(|s| s.send_queue);
        let cause = if let Some(queued_bytes) = waiting {
            Cause::Unacknowledged { queued_bytes }
        } else if closed.packets_out > 0 {
            Cause::Unacknowledged { queued_bytes: 0 }
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

/// Decodes one `CONNECTIONS` record.
pub fn decode(bytes: &[u8]) -> Result<ConnectionEvent> {
    if bytes.len() != size_of::<ConnectionEvent>() {
        bail!(
            "close record of {} bytes, expected {}: agent and eBPF object disagree",
            bytes.len(),
            size_of::<ConnectionEvent>()
        );
    }
    // SAFETY: the length matches and `ConnectionEvent` is plain data valid for any bytes.
    Ok(unsafe { bytes.as_ptr().cast::<ConnectionEvent>().read_unaligned() })
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

#[cfg(test)]
mod tests {
    use watchdog_common::ipv4_mapped;

    use super::*;

    fn established(seen_ns: u64) -> ConnectionEvent {
        ConnectionEvent {
            seen_ns,
            bytes_received: 0,
            remote_addr: ipv4_mapped([10, 0, 0, 2]),
            local_addr: ipv4_mapped([10, 0, 0, 1]),
            remote_port: 1025,
            local_port: 5000,
            family: 2,
            active: 0,
            kind: connection_event::ESTABLISHED,
            _pad: 0,
            packets_out: 0,
            total_retrans: 0,
            data_segs_in: 0,
            _pad2: 0,
        }
    }

    fn after_stale_syn(story: Option<Story>) -> Option<Duration> {
        match story {
            Some(Story::Connected {
                after_stale_syn, ..
            }) => after_stale_syn,
            other => panic!("expected a connection, got {other:?}"),
        }
    }

    #[test]
    fn only_a_connection_established_after_the_cleared_syn_is_its_return() {
        let mut connections = Connections::new(BTreeMap::new());
        let server: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let client: SocketAddr = "10.0.0.2:1025".parse().unwrap();
        connections.note_own_destroy(server, client, 5_000);
        // The stale connection's own establishment, read only after the SYN was handled.
        assert_eq!(
            after_stale_syn(connections.story(&established(1_000))),
            None
        );
        assert_eq!(
            after_stale_syn(connections.story(&established(5_600))),
            Some(Duration::from_nanos(600))
        );
        // Matched once: the next connection is an ordinary one.
        assert_eq!(
            after_stale_syn(connections.story(&established(9_000))),
            None
        );
    }
}
