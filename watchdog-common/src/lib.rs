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
    /// The TC classifier program.
    pub const CLASSIFIER: &str = "stale_syn_classifier";
}

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
}

impl Counter {
    /// Number of counters, the size of the `COUNTERS` map.
    pub const COUNT: u32 = 5;
    /// All counters in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::PacketsSeen,
        Counter::SynsChecked,
        Counter::StaleSyns,
        Counter::RingbufFull,
        Counter::OldDuplicateSyns,
    ];

    /// Stable snake_case name, used in logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::PacketsSeen => "packets_seen",
            Counter::SynsChecked => "syns_checked",
            Counter::StaleSyns => "stale_syns",
            Counter::RingbufFull => "ringbuf_full",
            Counter::OldDuplicateSyns => "old_duplicate_syns",
        }
    }
}

/// What the classifier did with the SYN it reported.
pub mod classifier_action {
    /// The SYN went on to the kernel unchanged (the kernel answers it with a challenge ACK).
    pub const PASSED: u8 = 0;
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
    pub _pad: [u8; 5],
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
        _pad: [0; 5],
    };
}

/// The classifier's view of an IPv4 address in the 16-byte layout: `::ffff:a.b.c.d`.
pub const fn ipv4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

// Layout checks: a change here must be a deliberate change on both sides.
const _: () = assert!(core::mem::size_of::<StaleSynEvent>() == 80);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data without padding holes or invalid bit patterns.
    unsafe impl aya::Pod for super::StaleSynEvent {}
}
