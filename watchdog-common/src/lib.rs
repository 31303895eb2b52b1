//! Types shared by the kernel side (`watchdog-ebpf`) and the agent (`watchdog`).
//!
//! Everything here is `#[repr(C)]` plain data: the classifier writes it into a ring buffer or
//! reads it from a map, the agent reads or writes the very same bytes. Keep the layouts explicit
//! (no implicit padding) so both compilers agree on them.
#![no_std]

/// Map and global names, as the loader looks them up in the object.
pub mod names {
    /// `RingBuf`: one [`super::StaleSynEvent`] per stale SYN.
    pub const EVENTS: &str = "EVENTS";
    /// `PerCpuArray<u64>`, indexed by [`super::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// `HashMap<u16, u8>`: watched local (server) ports, host byte order.
    pub const WATCHED_PORTS: &str = "WATCHED_PORTS";
    /// `LpmTrie<[u8; 16], u8>`: watched client prefixes, IPv4 as IPv4-mapped IPv6.
    pub const CLIENT_PREFIXES: &str = "CLIENT_PREFIXES";
    /// Read-only global `u8`: 1 when `CLIENT_PREFIXES` must match, 0 to accept any client.
    pub const CLIENT_FILTER_ENABLED: &str = "CLIENT_FILTER_ENABLED";
    /// `Array<u64>` of one: the agent's last heartbeat, `CLOCK_MONOTONIC` ns.
    pub const HEARTBEAT: &str = "HEARTBEAT";
    /// `LruHashMap<ReplayKey, u8>`: SYNs the agent is about to re-inject; never held again.
    pub const REPLAYED: &str = "REPLAYED";
    /// `LruHashMap<TupleKey, u64>`: tuples whose destroy a guard refused, with the
    /// `CLOCK_MONOTONIC` ns until which their SYNs are reported but not held (a SYN flood
    /// against a live connection then costs the agent a look-up each, not a re-injection).
    pub const REFUSED: &str = "REFUSED";
    /// Read-only global `u8`: 1 when stale SYNs are held for replay (`--mode replay`).
    pub const HOLD_ENABLED: &str = "HOLD_ENABLED";
    /// `HashMap<u16, PortTimers>`: keepalive and user-timeout settings per watched port.
    pub const PORT_TIMERS: &str = "PORT_TIMERS";
    /// `RingBuf`: one [`super::ConnectionEvent`] per watched connection's establishment, close
    /// by the peer, or abrupt end.
    pub const CONNECTIONS: &str = "CONNECTIONS";
    /// Read-only global `u64`: the network namespace (`SO_NETNS_COOKIE`) whose sockets the
    /// sock_ops program serves; it runs for a whole cgroup, across namespaces.
    pub const TIMERS_NETNS_COOKIE: &str = "TIMERS_NETNS_COOKIE";
    /// The TC classifier program.
    pub const CLASSIFIER: &str = "stale_syn_classifier";
    /// The sock_ops program that follows watched connections and sets their per-port timers.
    pub const CONNECTIONS_PROGRAM: &str = "watched_connections";
    /// The XDP program the agent runs with `BPF_F_TEST_XDP_LIVE_FRAMES` to re-inject a held SYN
    /// as if it had just arrived on its original interface. Never attached.
    pub const REPLAY_PASS: &str = "replay_pass";
}

/// The classifier holds SYNs only while the agent's heartbeat is younger than this: if the agent
/// dies, within this time the watchdog behaves as if it were not installed.
pub const HEARTBEAT_TIMEOUT_NS: u64 = 500_000_000;
/// How often the agent refreshes its heartbeat.
pub const HEARTBEAT_INTERVAL_NS: u64 = 100_000_000;
/// Largest SYN (Ethernet frame) the classifier holds; larger ones pass untouched.
pub const MAX_HELD_PACKET: usize = 256;

/// Per-CPU counters kept by the classifier; the agent sums them over CPUs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Every packet the classifier ran on.
    PacketsSeen = 0,
    /// SYNs (without ACK) to a watched port from a watched client: one socket lookup each.
    SynsChecked = 1,
    /// SYNs whose tuple matched an ESTABLISHED socket: one event each (or one `RingbufFull`).
    StaleSyns = 2,
    /// Stale SYNs whose event could not be queued because the ring buffer was full.
    RingbufFull = 3,
    /// SYNs carrying the established connection's own initial sequence number: an old
    /// duplicate of the original SYN, left to the kernel and never reported as stale.
    OldDuplicateSyns = 4,
    /// Stale SYNs dropped by the classifier and handed to the agent for replay.
    Held = 5,
    /// Re-injected SYNs that met the stale socket again (its destroy was refused or failed)
    /// and went on to the kernel instead of being held a second time.
    ReplaysPassed = 6,
    /// Stale SYNs passed instead of held because the agent's heartbeat was stale.
    HeartbeatStale = 7,
    /// Connections on timed ports whose keepalive / user timeout were set.
    TimersApplied = 8,
    /// Connections on timed ports where the kernel refused a `bpf_setsockopt`.
    TimersFailed = 9,
    /// Timed connections that went from ESTABLISHED straight to CLOSE (timeout, reset, abort).
    AbruptCloses = 10,
    /// Lifecycle reports (connected, peer closed, ended) the full `CONNECTIONS` ring buffer
    /// could not take: the agent fell behind a burst of connections.
    LifecycleLost = 11,
}

impl Counter {
    /// Number of counters, the size of the `COUNTERS` map.
    pub const COUNT: u32 = 12;
    /// All counters in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::PacketsSeen,
        Counter::SynsChecked,
        Counter::StaleSyns,
        Counter::RingbufFull,
        Counter::OldDuplicateSyns,
        Counter::Held,
        Counter::ReplaysPassed,
        Counter::HeartbeatStale,
        Counter::TimersApplied,
        Counter::TimersFailed,
        Counter::AbruptCloses,
        Counter::LifecycleLost,
    ];

    /// Stable snake_case name, used in logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::PacketsSeen => "packets_seen",
            Counter::SynsChecked => "syns_checked",
            Counter::StaleSyns => "stale_syns",
            Counter::RingbufFull => "ringbuf_full",
            Counter::OldDuplicateSyns => "old_duplicate_syns",
            Counter::Held => "held",
            Counter::ReplaysPassed => "replays_passed",
            Counter::HeartbeatStale => "heartbeat_stale",
            Counter::TimersApplied => "timers_applied",
            Counter::TimersFailed => "timers_failed",
            Counter::AbruptCloses => "abrupt_closes",
            Counter::LifecycleLost => "lifecycle_lost",
        }
    }
}

/// What the classifier did with the SYN it reported.
pub mod classifier_action {
    /// The SYN went on to the kernel unchanged (the kernel answers it with a challenge ACK).
    pub const PASSED: u8 = 0;
    /// The SYN was dropped; its bytes are in the event and the agent must re-inject them.
    pub const HELD: u8 = 1;
    /// The SYN went on to the kernel because the agent refused this tuple a moment ago (the
    /// `REFUSED` map): reported so that every refusal is on record, but not judged again.
    pub const BACKED_OFF: u8 = 2;
}

/// Address families as the kernel numbers them (`AF_INET`, `AF_INET6`).
pub mod family {
    pub const INET: u8 = 2;
    pub const INET6: u8 = 10;
}

/// One SYN whose 4-tuple matched an ESTABLISHED socket: the shared event of the whole data path.
///
/// Addresses are 16 bytes; IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`) so that one
/// layout serves both families. Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaleSynEvent {
    /// `CLOCK_MONOTONIC` time (ns) at which the classifier saw the SYN.
    pub seen_ns: u64,
    /// Payload bytes the stale socket had received (`tcp_sock.bytes_received`).
    pub stale_bytes_received: u64,
    /// Source of the SYN: the client.
    pub client_addr: [u8; 16],
    /// Destination of the SYN: the server, local to this host.
    pub server_addr: [u8; 16],
    /// Interface the SYN arrived on.
    pub ifindex: u32,
    /// Sequence number carried by the new SYN.
    pub syn_seq: u32,
    /// The stale connection's initial receive sequence number (the client's original ISN).
    pub stale_peer_isn: u32,
    /// Next sequence number the stale socket expects from the client.
    pub stale_rcv_nxt: u32,
    /// Segments the stale socket has received.
    pub stale_segs_in: u32,
    /// Client port (the legacy client's fixed source port).
    pub client_port: u16,
    /// Server port (a watched local port).
    pub server_port: u16,
    /// IP version of the SYN: 4 or 6.
    pub ip_version: u8,
    /// Address family of the stale socket: [`family::INET6`] for an IPv4 client of a
    /// dual-stack (`[::]`) listener.
    pub stale_family: u8,
    /// One of [`classifier_action`].
    pub classifier_action: u8,
    pub _pad: u8,
    /// Bytes of `packet` in use (the whole Ethernet frame) when the SYN was held, else 0.
    pub packet_len: u16,
    pub _pad2: [u8; 2],
    /// The held SYN, from its Ethernet header on.
    pub packet: [u8; MAX_HELD_PACKET],
}

impl StaleSynEvent {
    /// An all-zero event, for building one field by field.
    pub const ZERO: StaleSynEvent = StaleSynEvent {
        seen_ns: 0,
        stale_bytes_received: 0,
        client_addr: [0; 16],
        server_addr: [0; 16],
        ifindex: 0,
        syn_seq: 0,
        stale_peer_isn: 0,
        stale_rcv_nxt: 0,
        stale_segs_in: 0,
        client_port: 0,
        server_port: 0,
        ip_version: 0,
        stale_family: 0,
        classifier_action: 0,
        _pad: 0,
        packet_len: 0,
        _pad2: [0; 2],
        packet: [0; MAX_HELD_PACKET],
    };

    /// The SYN's 4-tuple.
    pub const fn tuple(&self) -> TupleKey {
        TupleKey {
            client_addr: self.client_addr,
            server_addr: self.server_addr,
            client_port: self.client_port,
            server_port: self.server_port,
        }
    }

    /// The key under which the agent announces the replay of this SYN.
    pub const fn replay_key(&self) -> ReplayKey {
        ReplayKey {
            tuple: self.tuple(),
            syn_seq: self.syn_seq,
        }
    }
}

/// Keepalive and user-timeout settings for one port, applied by the sock_ops program to each
/// connection of that port as it is established. A zero field leaves the host default.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortTimers {
    /// `TCP_KEEPIDLE` (s); non-zero switches `SO_KEEPALIVE` on.
    pub keepalive_idle_s: u32,
    /// `TCP_KEEPINTVL` (s).
    pub keepalive_interval_s: u32,
    /// `TCP_KEEPCNT`.
    pub keepalive_count: u32,
    /// `TCP_USER_TIMEOUT` (ms).
    pub user_timeout_ms: u32,
    /// Also time connections this host opens *to* the port (active side).
    pub include_active: u32,
}

/// What happened to a watched connection, as [`ConnectionEvent::kind`] says.
pub mod connection_event {
    /// The connection was established (the listener accepted it).
    pub const ESTABLISHED: u8 = 0;
    /// The peer closed its side (FIN): ESTABLISHED → CLOSE_WAIT.
    pub const PEER_CLOSED: u8 = 1;
    /// ESTABLISHED straight to CLOSE: a timeout (the peer is dead), a reset from the peer, or
    /// an abort (`ss -K`, the watchdog's own destroy).
    pub const ABRUPT_CLOSE: u8 = 2;
}

/// A step in a watched connection's life, reported by the sock_ops program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionEvent {
    /// `CLOCK_MONOTONIC` ns of the state change.
    pub seen_ns: u64,
    pub bytes_received: u64,
    /// The peer; IPv4 as IPv4-mapped IPv6.
    pub remote_addr: [u8; 16],
    /// This host's end.
    pub local_addr: [u8; 16],
    pub remote_port: u16,
    pub local_port: u16,
    /// `AF_INET` or `AF_INET6` of the socket.
    pub family: u8,
    /// 1 when this host opened the connection.
    pub active: u8,
    /// One of [`connection_event`].
    pub kind: u8,
    pub _pad: u8,
    /// Segments sent and not yet acknowledged: non-zero means the peer stopped acknowledging.
    pub packets_out: u32,
    pub total_retrans: u32,
    pub data_segs_in: u32,
    pub _pad2: u32,
}

/// A connection's 4-tuple, addresses and ports as in [`StaleSynEvent`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
}

/// Identifies one SYN: its 4-tuple and sequence number.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReplayKey {
    pub tuple: TupleKey,
    pub syn_seq: u32,
}

/// The classifier's view of an IPv4 address in the 16-byte layout: `::ffff:a.b.c.d`.
pub const fn ipv4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

// Layout checks: a change here must be a deliberate change on both sides.
const _: () = assert!(core::mem::size_of::<StaleSynEvent>() == 80 + MAX_HELD_PACKET);
const _: () = assert!(core::mem::size_of::<TupleKey>() == 36);
const _: () = assert!(core::mem::size_of::<PortTimers>() == 20);
const _: () = assert!(core::mem::size_of::<ConnectionEvent>() == 72);
const _: () = assert!(core::mem::size_of::<ReplayKey>() == 40);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data without padding holes or invalid bit patterns.
    unsafe impl aya::Pod for super::StaleSynEvent {}
    unsafe impl aya::Pod for super::ReplayKey {}
    unsafe impl aya::Pod for super::TupleKey {}
    unsafe impl aya::Pod for super::PortTimers {}
    unsafe impl aya::Pod for super::ConnectionEvent {}
}
