//! Hostile and unusual frames on the server veth: the classifier must never take one for a SYN
//! that an ESTABLISHED socket owns, and the agent must carry on as if nothing happened.
//!
//! Two live connections (IPv4 tuple T4 and IPv6 tuple T6, each sending every 100 ms) are the
//! targets: most malformed frames carry their exact tuples, so a parser that read a header
//! wrong would report them, and the agent (replay mode, `--min-idle 0s`) would destroy them.
//! The frames are built by hand and sent from the client namespace through one `AF_PACKET`
//! socket ([`watchdog_tests::spoof`]). A frame that carries a TCP sequence number has its kind
//! in the top byte, so a report names the kind of frame that caused it.
//!
//! `only_syns_the_kernel_accepts_are_reported` compares the classifier with the kernel itself,
//! frame by frame: a frame the kernel drops before TCP sees it (a VLAN it has no device for, a
//! data offset beyond the segment, a bad checksum, another host's MAC address) must not be
//! reported either, since it never reaches the socket. Single-tagged VLAN frames and data
//! offsets beyond the segment are there rather than in the big mix: the stack strips one VLAN
//! tag before TC ingress (`skb_vlan_untag`), so the classifier sees a plain frame, and it reads
//! only the fixed 20 bytes of the TCP header, so both parse as SYNs today.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use watchdog_tests::spoof::{
    ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN, FrameInjector, IPPROTO_TCP, IPV4_MF,
    IPV6_FRAGMENT, IPV6_HOP_BY_HOP, Ipv4, Macs, Rng, SendReport, Tcp, ethernet, flags, fold, ipv6,
    link_info, ones_sum, set_l4_checksum, syn_frame, vlan,
};
use watchdog_tests::{
    Agent, AgentExit, AgentLine, Bind, CloseHow, DumbClient, ECONNABORTED, Family, HealthyTraffic,
    LegacyServer, SynCapture, TestNet, establish_and_crash, parse_syn, require_root, scenario,
    str_field, tcp_ext_counters,
};

const WATCHED: u16 = scenario::SERVER_PORT;
/// A port the agent does not watch (nothing listens there either).
const UNWATCHED: u16 = 5001;
const FIXED: u16 = scenario::FIXED_PORT;
const SHORT: Duration = Duration::from_secs(2);
const LIVE_EVERY: Duration = Duration::from_millis(100);
/// Frames per `sendmmsg` round.
const ROUND: usize = 4096;
/// 802.1ad (the outer tag of QinQ).
const ETHERTYPE_QINQ: u16 = 0x88a8;
/// IPv6 destination options header.
const IPV6_DEST_OPTS: u8 = 60;

/// The two live connections the frames aim at, and the Ethernet addresses of the link.
struct Targets {
    macs: Macs,
    t4: (SocketAddr, SocketAddr),
    t6: (SocketAddr, SocketAddr),
    client4: Ipv4Addr,
    server4: Ipv4Addr,
    client6: Ipv6Addr,
    server6: Ipv6Addr,
}

impl Targets {
    fn new(net: &TestNet, t4_client: SocketAddr, t6_client: SocketAddr) -> Result<Targets> {
        Ok(Targets {
            macs: Macs::client_to_server(net)?,
            t4: (t4_client, net.server_addr(Family::V4, WATCHED)),
            t6: (t6_client, net.server_addr(Family::V6, WATCHED)),
            client4: net.client_v4(),
            server4: net.server_v4(),
            client6: net.client_v6(),
            server6: net.server_v6(),
        })
    }

    /// T4 or T6, at random.
    fn either(&self, rng: &mut Rng) -> (SocketAddr, SocketAddr) {
        if rng.below(2) == 0 { self.t4 } else { self.t6 }
    }
}

/// A TCP segment for `tuple` with `tcp`'s fields, checksum over the tuple's pseudo header.
fn segment(tuple: (SocketAddr, SocketAddr), tcp: &Tcp) -> Vec<u8> {
    tcp.segment(tuple.0.ip(), tuple.1.ip())
}

/// A plain SYN header for `tuple`.
fn syn(tuple: (SocketAddr, SocketAddr), seq: u32) -> Tcp {
    Tcp::syn(tuple.0.port(), tuple.1.port(), seq)
}

/// The IP packet (no Ethernet header) carrying `seg` for `tuple`.
fn ip_packet(tuple: (SocketAddr, SocketAddr), seg: &[u8]) -> (u16, Vec<u8>) {
    match (tuple.0.ip(), tuple.1.ip()) {
        (IpAddr::V4(c), IpAddr::V4(s)) => {
            (ETHERTYPE_IPV4, Ipv4::new(c, s, IPPROTO_TCP).packet(seg))
        }
        (IpAddr::V6(c), IpAddr::V6(s)) => (ETHERTYPE_IPV6, ipv6(c, s, IPPROTO_TCP, seg)),
        _ => unreachable!("tuples are of one family"),
    }
}

/// The full frame of a SYN-like segment for `tuple`.
fn frame(t: &Targets, tuple: (SocketAddr, SocketAddr), tcp: &Tcp) -> Vec<u8> {
    let (ethertype, packet) = ip_packet(tuple, &segment(tuple, tcp));
    ethernet(t.macs, ethertype, &packet)
}

fn v4(addr: SocketAddr) -> Ipv4Addr {
    match addr.ip() {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!("an IPv4 tuple"),
    }
}

fn v6(addr: SocketAddr) -> Ipv6Addr {
    match addr.ip() {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => unreachable!("an IPv6 tuple"),
    }
}

/// Valid IPv4 options: no-ops, record route, router alert, timestamps, the 40-byte maximum.
fn ipv4_options(rng: &mut Rng) -> Vec<u8> {
    match rng.below(5) {
        0 => vec![1, 1, 1, 0],
        1 => vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        2 => vec![148, 4, 0, 0],
        3 => vec![68, 12, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        _ => {
            let mut o = vec![1u8; 39];
            o.push(0);
            o
        }
    }
}

/// The kinds of frame in the mix. Its number goes into the top byte of any TCP sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Shorter than an Ethernet header (the kernel refuses to send these).
    EthernetCut = 1,
    /// An Ethernet header alone, with an IP or VLAN ethertype.
    EthernetOnly,
    /// IPv4 header cut short (1-19 bytes), from T4's SYN.
    Ipv4HeaderCut,
    /// Full IPv4 header, TCP header cut short (0-19 bytes), T4.
    Ipv4TcpCut,
    /// IPv6 header cut short (1-39 bytes), from T6's SYN.
    Ipv6HeaderCut,
    /// Full IPv6 header, TCP header cut short, T6.
    Ipv6TcpCut,
    /// IHL 0-4, otherwise T4's SYN.
    Ipv4IhlBelow5,
    /// TCP data offset 0-4, T4 or T6.
    TcpDataOffsetBelow5,
    /// Valid IPv4 options, SYN to the unwatched port.
    Ipv4OptionsUnwatched,
    /// T6's SYN behind hop-by-hop, destination-options and fragment headers.
    Ipv6ExtensionHeaders,
    /// IPv4 fragments (MF set and/or offset ≠ 0) whose payload is T4's SYN.
    Ipv4Fragments,
    /// Two VLAN tags (802.1ad + 802.1Q, or 802.1Q twice) around T4's or T6's SYN.
    VlanDoubleTagged,
    /// T4's or T6's SYN packet behind a non-IP ethertype.
    NonIpEthertype,
    /// IPv6 behind the IPv4 ethertype and back, and IPv4 headers with versions ≠ 4.
    WrongIpVersion,
    /// T4 or T6 segments that are not a plain SYN: SYN+ACK, SYN+RST, ACK, RST+ACK, none.
    NotAPlainSyn,
    /// T's SYN segment as the payload of UDP, SCTP, GRE, ESP or "no next header".
    NotTcp,
    /// Random bytes of random length behind random (non-ARP) ethertypes.
    Garbage,
    /// Well-formed SYNs to the unwatched port (IPv4 and IPv6).
    SynUnwatched,
    /// Well-formed SYNs to the watched port from IPv4 tuples nobody owns: checked, not stale.
    SynNoSocketV4,
    /// The same over IPv6.
    SynNoSocketV6,
    /// The same over IPv4 with options.
    SynNoSocketV4Options,
}

impl Kind {
    /// Each kind and how many frames of it the mix holds.
    const MIX: [(Kind, usize); 21] = [
        (Kind::EthernetCut, 300),
        (Kind::EthernetOnly, 2_000),
        (Kind::Ipv4HeaderCut, 5_000),
        (Kind::Ipv4TcpCut, 6_000),
        (Kind::Ipv6HeaderCut, 5_000),
        (Kind::Ipv6TcpCut, 6_000),
        (Kind::Ipv4IhlBelow5, 6_000),
        (Kind::TcpDataOffsetBelow5, 6_000),
        (Kind::Ipv4OptionsUnwatched, 5_000),
        (Kind::Ipv6ExtensionHeaders, 8_000),
        (Kind::Ipv4Fragments, 8_000),
        (Kind::VlanDoubleTagged, 5_000),
        (Kind::NonIpEthertype, 6_000),
        (Kind::WrongIpVersion, 5_000),
        (Kind::NotAPlainSyn, 8_000),
        (Kind::NotTcp, 5_000),
        (Kind::Garbage, 8_000),
        (Kind::SynUnwatched, 3_000),
        (Kind::SynNoSocketV4, 1_500),
        (Kind::SynNoSocketV6, 1_500),
        (Kind::SynNoSocketV4Options, 1_000),
    ];

    /// Well-formed plain SYNs to the watched port: what `syns_checked` must count.
    fn is_checked(self) -> bool {
        matches!(
            self,
            Kind::SynNoSocketV4 | Kind::SynNoSocketV6 | Kind::SynNoSocketV4Options
        )
    }

    fn from_seq(seq: u64) -> Option<Kind> {
        let tag = (seq >> 24) as usize;
        Kind::MIX
            .iter()
            .map(|(k, _)| *k)
            .find(|k| *k as usize == tag)
    }

    /// A sequence number that names this kind.
    fn seq(self, rng: &mut Rng) -> u32 {
        ((self as u32) << 24) | (rng.next_u32() & 0x00ff_ffff)
    }
}

/// Client ports for the no-socket SYNs: 20000-29999 (below the ephemeral range, so no live
/// socket of the client namespace can own them), each used once.
struct FreshPorts(Vec<u16>);

impl FreshPorts {
    fn new(rng: &mut Rng) -> FreshPorts {
        let mut ports: Vec<u16> = (20_000..30_000).collect();
        rng.shuffle(&mut ports);
        FreshPorts(ports)
    }

    fn next(&mut self) -> u16 {
        self.0.pop().expect("enough fresh ports")
    }
}

/// One frame of `kind`.
fn make(kind: Kind, t: &Targets, rng: &mut Rng, ports: &mut FreshPorts) -> Vec<u8> {
    let seq = kind.seq(rng);
    let macs = t.macs;
    match kind {
        Kind::EthernetCut => {
            let full = syn_frame(macs, t.t4.0, t.t4.1, seq);
            full[..rng.below(14)].to_vec()
        }
        Kind::EthernetOnly => {
            let ethertypes = [
                ETHERTYPE_IPV4,
                ETHERTYPE_IPV6,
                ETHERTYPE_VLAN,
                ETHERTYPE_QINQ,
            ];
            ethernet(macs, ethertypes[rng.below(ethertypes.len())], &[])
        }
        Kind::Ipv4HeaderCut => {
            let full = syn_frame(macs, t.t4.0, t.t4.1, seq);
            full[..14 + 1 + rng.below(19)].to_vec()
        }
        Kind::Ipv4TcpCut => {
            let seg = segment(t.t4, &syn(t.t4, seq));
            let cut = &seg[..rng.below(20)];
            let ip = Ipv4::new(v4(t.t4.0), v4(t.t4.1), IPPROTO_TCP);
            ethernet(macs, ETHERTYPE_IPV4, &ip.packet(cut))
        }
        Kind::Ipv6HeaderCut => {
            let full = syn_frame(macs, t.t6.0, t.t6.1, seq);
            full[..14 + 1 + rng.below(39)].to_vec()
        }
        Kind::Ipv6TcpCut => {
            let seg = segment(t.t6, &syn(t.t6, seq));
            let cut = &seg[..rng.below(20)];
            ethernet(
                macs,
                ETHERTYPE_IPV6,
                &ipv6(v6(t.t6.0), v6(t.t6.1), IPPROTO_TCP, cut),
            )
        }
        Kind::Ipv4IhlBelow5 => {
            let seg = segment(t.t4, &syn(t.t4, seq));
            let mut ip = Ipv4::new(v4(t.t4.0), v4(t.t4.1), IPPROTO_TCP);
            ip.ihl = Some(rng.below(5) as u8);
            ethernet(macs, ETHERTYPE_IPV4, &ip.packet(&seg))
        }
        Kind::TcpDataOffsetBelow5 => {
            let tuple = t.either(rng);
            let mut tcp = syn(tuple, seq);
            tcp.data_offset = rng.below(5) as u8;
            frame(t, tuple, &tcp)
        }
        Kind::Ipv4OptionsUnwatched => {
            let client = SocketAddr::new(t.client4.into(), 1024 + rng.next_u16() % 60_000);
            let server = SocketAddr::new(t.server4.into(), UNWATCHED);
            let seg = segment((client, server), &syn((client, server), seq));
            let mut ip = Ipv4::new(t.client4, t.server4, IPPROTO_TCP);
            ip.options = ipv4_options(rng);
            ethernet(macs, ETHERTYPE_IPV4, &ip.packet(&seg))
        }
        Kind::Ipv6ExtensionHeaders => {
            let seg = segment(t.t6, &syn(t.t6, seq));
            // PadN over 4 bytes: a valid 8-byte hop-by-hop or destination options header.
            let opts = |next: u8| vec![next, 0, 1, 4, 0, 0, 0, 0];
            let frag = |next: u8, offset: u16, more: bool, id: u32| {
                let mut h = vec![next, 0];
                h.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                h.extend_from_slice(&id.to_be_bytes());
                h
            };
            let id = rng.next_u32();
            let (first, mut payload) = match rng.below(6) {
                0 => (IPV6_HOP_BY_HOP, opts(IPPROTO_TCP)),
                1 => (IPV6_DEST_OPTS, opts(IPPROTO_TCP)),
                // An atomic fragment (offset 0, no more fragments).
                2 => (IPV6_FRAGMENT, frag(IPPROTO_TCP, 0, false, id)),
                3 => (IPV6_FRAGMENT, frag(IPPROTO_TCP, 0, true, id)),
                4 => (
                    IPV6_FRAGMENT,
                    frag(IPPROTO_TCP, 1 + rng.next_u16() % 8000, false, id),
                ),
                _ => {
                    let mut h = opts(IPV6_FRAGMENT);
                    h.extend(frag(IPPROTO_TCP, 0, rng.below(2) == 0, id));
                    (IPV6_HOP_BY_HOP, h)
                }
            };
            payload.extend_from_slice(&seg);
            ethernet(
                macs,
                ETHERTYPE_IPV6,
                &ipv6(v6(t.t6.0), v6(t.t6.1), first, &payload),
            )
        }
        Kind::Ipv4Fragments => {
            let seg = segment(t.t4, &syn(t.t4, seq));
            let mut ip = Ipv4::new(v4(t.t4.0), v4(t.t4.1), IPPROTO_TCP);
            ip.ident = rng.next_u16();
            let offset = 1 + rng.next_u16() % 8000;
            // Don't-fragment (0x4000) on some: alone it is a normal packet, never used here.
            let df = if rng.below(4) == 0 { 0x4000 } else { 0 };
            ip.flags_fragment = df
                | match rng.below(3) {
                    0 => IPV4_MF,
                    1 => offset,
                    _ => IPV4_MF | offset,
                };
            ethernet(macs, ETHERTYPE_IPV4, &ip.packet(&seg))
        }
        Kind::VlanDoubleTagged => {
            let tuple = t.either(rng);
            let (ethertype, packet) = ip_packet(tuple, &segment(tuple, &syn(tuple, seq)));
            let outer = [ETHERTYPE_QINQ, ETHERTYPE_VLAN][rng.below(2)];
            let mut tags = Vec::with_capacity(8 + packet.len());
            tags.extend_from_slice(&(1 + rng.next_u16() % 4094).to_be_bytes());
            tags.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
            tags.extend_from_slice(&(1 + rng.next_u16() % 4094).to_be_bytes());
            tags.extend_from_slice(&ethertype.to_be_bytes());
            tags.extend_from_slice(&packet);
            ethernet(macs, outer, &tags)
        }
        Kind::NonIpEthertype => {
            let ethertypes = [
                0x88cc, 0x88b5, 0x8863, 0x8864, 0x0842, 0x22f0, 0x9000, 0x8847, 0x0600, 0x05dc,
                0x88e5, 0x8906, 0x88f7, 0x0000, 0xffff,
            ];
            let tuple = t.either(rng);
            let (_, packet) = ip_packet(tuple, &segment(tuple, &syn(tuple, seq)));
            ethernet(macs, ethertypes[rng.below(ethertypes.len())], &packet)
        }
        Kind::WrongIpVersion => match rng.below(3) {
            0 => {
                let (_, packet) = ip_packet(t.t6, &segment(t.t6, &syn(t.t6, seq)));
                ethernet(macs, ETHERTYPE_IPV4, &packet)
            }
            1 => {
                let (_, mut packet) = ip_packet(t.t4, &segment(t.t4, &syn(t.t4, seq)));
                // Long enough for an IPv6 header to be read.
                packet.extend_from_slice(&[0u8; 40]);
                ethernet(macs, ETHERTYPE_IPV6, &packet)
            }
            _ => {
                let mut ip = Ipv4::new(v4(t.t4.0), v4(t.t4.1), IPPROTO_TCP);
                ip.version = [0u8, 1, 2, 3, 5, 6, 7, 15][rng.below(8)];
                let seg = segment(t.t4, &syn(t.t4, seq));
                ethernet(macs, ETHERTYPE_IPV4, &ip.packet(&seg))
            }
        },
        Kind::NotAPlainSyn => {
            let tuple = t.either(rng);
            let mut tcp = syn(tuple, seq);
            let choices = [
                flags::SYN | flags::ACK,
                flags::SYN | flags::RST,
                flags::SYN | flags::ACK | flags::RST,
                flags::ACK,
                flags::RST | flags::ACK,
                flags::PSH | flags::ACK,
                0x20 | flags::ACK, // URG
                0,
            ];
            tcp.flags = choices[rng.below(choices.len())];
            tcp.ack = rng.next_u32();
            frame(t, tuple, &tcp)
        }
        Kind::NotTcp => {
            let tuple = t.either(rng);
            let seg = segment(tuple, &syn(tuple, seq));
            match (tuple.0.ip(), tuple.1.ip()) {
                (IpAddr::V4(c), IpAddr::V4(s)) => {
                    let protos = [17u8, 0, 255, 132, 47, 50];
                    let ip = Ipv4::new(c, s, protos[rng.below(protos.len())]);
                    ethernet(macs, ETHERTYPE_IPV4, &ip.packet(&seg))
                }
                (IpAddr::V6(c), IpAddr::V6(s)) => {
                    let nexts = [17u8, 59, 132, 50];
                    let mut seg = seg;
                    let next = nexts[rng.below(nexts.len())];
                    if next == 17 {
                        // A UDP checksum that is right, so the kernel reads the datagram.
                        set_l4_checksum(&mut seg, 6, c.into(), s.into(), 17);
                    }
                    ethernet(macs, ETHERTYPE_IPV6, &ipv6(c, s, next, &seg))
                }
                _ => unreachable!(),
            }
        }
        Kind::Garbage => {
            let len = 14 + rng.below(1501);
            let mut f = rng.bytes(len);
            if rng.below(2) == 0 {
                f[..6].copy_from_slice(&macs.dst);
            }
            let ethertype = u16::from_be_bytes([f[12], f[13]]);
            if matches!(ethertype, 0x0806 | 0x8035) {
                // No ARP: a random ARP packet could rewrite the server's neighbour cache.
                f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
            }
            f
        }
        Kind::SynUnwatched => {
            let (client, server) = if rng.below(2) == 0 {
                (t.client4.into(), t.server4.into())
            } else {
                (IpAddr::from(t.client6), IpAddr::from(t.server6))
            };
            let client = SocketAddr::new(client, 1024 + rng.next_u16() % 60_000);
            syn_frame(macs, client, SocketAddr::new(server, UNWATCHED), seq)
        }
        Kind::SynNoSocketV4 => {
            let client = SocketAddr::new(t.client4.into(), ports.next());
            syn_frame(macs, client, t.t4.1, seq)
        }
        Kind::SynNoSocketV6 => {
            let client = SocketAddr::new(t.client6.into(), ports.next());
            syn_frame(macs, client, t.t6.1, seq)
        }
        Kind::SynNoSocketV4Options => {
            let client = SocketAddr::new(t.client4.into(), ports.next());
            let seg = segment((client, t.t4.1), &syn((client, t.t4.1), seq));
            let mut ip = Ipv4::new(t.client4, t.server4, IPPROTO_TCP);
            ip.options = ipv4_options(rng);
            if rng.below(2) == 0 {
                ip.flags_fragment = 0x4000; // DF, as most real SYNs
            }
            ethernet(macs, ETHERTYPE_IPV4, &ip.packet(&seg))
        }
    }
}

/// The tuple of a frame the kernel would take for a plain SYN, by a strict reference parser:
/// IPv4 or IPv6 right behind the Ethernet header, lengths consistent, header checksum right,
/// no fragment, TCP right behind the IP header with its data offset inside the segment and a
/// right checksum, SYN without ACK or RST. `None` for anything else.
fn well_formed_syn(f: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let ip = f.get(14..)?;
    let (src, dst, seg): (IpAddr, IpAddr, &[u8]) = match ethertype {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(*ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x3fff;
            if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() || frag != 0 {
                return None;
            }
            if ip[9] != IPPROTO_TCP || fold(ones_sum(&ip[..ihl])) != 0xffff {
                return None;
            }
            let s: [u8; 4] = ip[12..16].try_into().ok()?;
            let d: [u8; 4] = ip[16..20].try_into().ok()?;
            (s.into(), d.into(), &ip[ihl..total])
        }
        ETHERTYPE_IPV6 => {
            let payload = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            if ip[0] >> 4 != 6 || ip.len() < 40 + payload || ip[6] != IPPROTO_TCP {
                return None;
            }
            let s: [u8; 16] = ip[8..24].try_into().ok()?;
            let d: [u8; 16] = ip[24..40].try_into().ok()?;
            (s.into(), d.into(), &ip[40..40 + payload])
        }
        _ => return None,
    };
    let doff = usize::from(*seg.get(12)? >> 4) * 4;
    let flags = *seg.get(13)?;
    if doff < 20 || doff > seg.len() || flags & (flags::SYN | flags::ACK | flags::RST) != flags::SYN
    {
        return None;
    }
    let mut check = seg.to_vec();
    let sum = u16::from_be_bytes([seg[16], seg[17]]);
    set_l4_checksum(&mut check, 16, src, dst, IPPROTO_TCP);
    if u16::from_be_bytes([check[16], check[17]]) != sum {
        return None;
    }
    let port = |at: usize| u16::from_be_bytes([seg[at], seg[at + 1]]);
    Some((SocketAddr::new(src, port(0)), SocketAddr::new(dst, port(2))))
}

/// `watchdog run --iface <server veth> --port 5000 <extra...>`.
fn start_agent(net: &TestNet, extra: &[&str]) -> Result<Agent> {
    let mut args = vec!["--iface", net.server_iface(), "--port", "5000"];
    args.extend_from_slice(extra);
    Agent::start(net, &args)
}

/// SIGTERM; the agent must exit 0 with a clean log, `counters` and `detached`.
fn stop_agent(agent: Agent) -> Result<AgentExit> {
    let exit = agent.stop()?;
    eprintln!("agent log ({}):\n{}", exit.status, exit.output());
    ensure!(exit.status.success(), "agent exited with {}", exit.status);
    for line in &exit.lines {
        if let AgentLine::Json(v) = line {
            str_field(v, "event")?;
            str_field(v, "message")?;
        }
    }
    exit.counters()?;
    ensure!(!exit.events("detached").is_empty(), "no detached event");
    Ok(exit)
}

/// Stale-SYN reports by the kind of frame their sequence number names.
fn reports_by_kind(events: &[Value]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in events {
        let name = e
            .get("syn_seq")
            .and_then(Value::as_u64)
            .and_then(Kind::from_seq)
            .map_or_else(|| format!("untagged {e}"), |k| format!("{k:?}"));
        *out.entry(name).or_default() += 1;
    }
    out
}

/// Whether the agent process is still alive (not exited, not a zombie).
fn agent_alive(agent: &Agent) -> bool {
    std::fs::read_to_string(format!("/proc/{}/stat", agent.pid())).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// 100,000 malformed and unusual frames, most of them carrying a live connection's exact tuple,
/// none of them a well-formed SYN for it: nothing is reported, nothing destroyed, the counters
/// add up, and afterwards the agent still rescues a crashed dumb client at once.
#[test]
fn malformed_and_unusual_frames_never_misclassify() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("malformed")?;
    let server4 = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let server6 = LegacyServer::start(&net, Bind::V6, WATCHED)?;
    let addr4 = net.server_addr(Family::V4, WATCHED);
    let addr6 = net.server_addr(Family::V6, WATCHED);
    // Connected before the agent starts: their own SYNs are not in its counters.
    let live4 = HealthyTraffic::start(&net, &server4, addr4, 1, LIVE_EVERY)?;
    let live6 = HealthyTraffic::start(&net, &server6, addr6, 1, LIVE_EVERY)?;
    let targets = Targets::new(&net, live4.peers()[0], live6.peers()[0])?;

    let mut rng = Rng::from_clock();
    let seed = rng.seed();
    let mut ports = FreshPorts::new(&mut rng);
    let mut frames: Vec<(Kind, Vec<u8>)> = Vec::new();
    for (kind, count) in Kind::MIX {
        for _ in 0..count {
            frames.push((kind, make(kind, &targets, &mut rng, &mut ports)));
        }
    }
    rng.shuffle(&mut frames);
    // None of them is a well-formed SYN for T4 or T6, and the kinds that must be counted are
    // exactly the well-formed SYNs to the watched port (by a strict reference parser).
    let mut well_formed_to_watched = 0usize;
    for (kind, f) in &frames {
        if let Some(tuple) = well_formed_syn(f) {
            ensure!(
                tuple != targets.t4 && tuple != targets.t6,
                "the mix holds a well-formed SYN for a live tuple ({kind:?}): {tuple:?}"
            );
            if tuple.1.port() == WATCHED {
                ensure!(
                    kind.is_checked(),
                    "{kind:?} holds a well-formed SYN: {tuple:?}"
                );
                well_formed_to_watched += 1;
            }
        } else {
            ensure!(!kind.is_checked(), "{kind:?} holds a frame that is no SYN");
        }
    }
    let checked_sent_expected = well_formed_to_watched;

    let agent = start_agent(&net, &["--min-idle", "0s"])?;
    let attached = agent.wait_for_event("attached", SHORT)?;
    ensure!(
        str_field(&attached, "mode")? == "replay",
        "not in replay mode: {attached}"
    );
    let rx_before = link_info(net.server_ns(), net.server_iface())?;
    let tx_before = link_info(net.client_ns(), net.client_iface())?;

    let injector = FrameInjector::open(net.client_ns(), net.client_iface())?;
    let started = Instant::now();
    let mut sent = SendReport::default();
    let mut sent_by_kind: BTreeMap<Kind, u64> = BTreeMap::new();
    for round in frames.chunks(ROUND) {
        let bytes: Vec<Vec<u8>> = round.iter().map(|(_, f)| f.clone()).collect();
        sent.add(&injector.send_all(&bytes)?);
        for (kind, f) in round {
            if f.len() >= 14 {
                *sent_by_kind.entry(*kind).or_default() += 1;
            }
        }
    }
    let send_time = started.elapsed();
    thread::sleep(Duration::from_millis(300));
    let tx_after = link_info(net.client_ns(), net.client_iface())?;
    let rx_after_flood = link_info(net.server_ns(), net.server_iface())?;
    let veth_dropped = tx_after.tx_dropped - tx_before.tx_dropped;
    let reached = sent.sent - veth_dropped;
    // The stack drops a VLAN-tagged frame too short for its tag before TC ingress
    // (`skb_vlan_untag` in `__netif_receive_skb_core`): the veth counts it, no classifier
    // can see it.
    let untag_dropped = frames
        .iter()
        .filter(|(_, f)| {
            f.len() >= 14
                && f.len() < 18
                && matches!(
                    u16::from_be_bytes([f[12], f[13]]),
                    ETHERTYPE_VLAN | ETHERTYPE_QINQ
                )
        })
        .count() as u64;
    let reached_tc = reached - untag_dropped;
    let checked_sent: u64 = sent_by_kind
        .iter()
        .filter(|(k, _)| k.is_checked())
        .map(|(_, n)| n)
        .sum();
    eprintln!(
        "malformed mix (seed {seed:#x}): {} frames built, {} sent in {send_time:?}, refused by \
         the kernel's AF_PACKET {:?} (errno), {veth_dropped} dropped by the veth, {reached} \
         reached the server veth (its rx_packets grew by {} meanwhile, live traffic included), \
         {untag_dropped} of them VLAN frames too short for their tag, so {reached_tc} reached \
         TC ingress\nsent by kind: {sent_by_kind:?}",
        frames.len(),
        sent.sent,
        sent.refused,
        rx_after_flood.rx_packets - rx_before.rx_packets,
    );
    let too_short = frames.iter().filter(|(_, f)| f.len() < 14).count() as u64;
    ensure!(
        sent.refused_total() == too_short && sent.sent + too_short == frames.len() as u64,
        "the kernel refused other frames than the {too_short} shorter than an Ethernet header: \
         {:?}",
        sent.refused
    );
    ensure!(
        checked_sent == checked_sent_expected as u64,
        "not every well-formed SYN was sent: {checked_sent} of {checked_sent_expected}"
    );
    ensure!(
        reached >= 100_000,
        "only {reached} frames reached the server veth"
    );

    // Nothing was reported or destroyed; the live connections never noticed; the agent runs.
    let stale = agent.events("stale_syn");
    let destroyed = agent.events("destroyed");
    ensure!(
        stale.is_empty() && destroyed.is_empty(),
        "malformed frames were taken for stale SYNs: {} stale_syn, {} destroyed; reports by \
         kind of frame: {:?}\n{}",
        stale.len(),
        destroyed.len(),
        reports_by_kind(&stale),
        agent.output()
    );
    live4.assert_flowing(&server4, SHORT)?;
    live6.assert_flowing(&server6, SHORT)?;
    ensure!(agent_alive(&agent), "the agent died:\n{}", agent.output());

    // The agent did not degrade: a crashed dumb client is rescued on its first SYN.
    let client = DumbClient::new(&net, addr4, FIXED)?;
    let capture = SynCapture::start(net.client_ns(), net.client_iface())?;
    let stale_conn = establish_and_crash(&server4, &client)?;
    let out = client.reconnect(SHORT)?;
    eprintln!(
        "after the flood: dumb client connected={} after {:?}, {} SYN retransmissions",
        out.connected, out.elapsed, out.syn_retransmits
    );
    ensure!(
        out.connected && out.syn_retransmits == 0,
        "the dumb client was not rescued on its first SYN ({out:?}):\n{}",
        agent.output()
    );
    let closed = server4.wait_closed_id(stale_conn.id, SHORT)?;
    ensure!(
        closed.how == CloseHow::Error(ECONNABORTED),
        "the stale socket ended with {:?}",
        closed.how
    );
    agent.wait_for_event("replayed", SHORT)?;
    thread::sleep(Duration::from_millis(100));
    let fixed_syns = capture
        .syns()
        .iter()
        .filter_map(|f| parse_syn(&f.bytes))
        .filter(|s| s.src == client.local_addr() && s.dst == addr4)
        .count() as u64;
    drop(capture);
    live4.assert_flowing(&server4, SHORT)?;
    live6.assert_flowing(&server6, SHORT)?;

    let exit = stop_agent(agent)?;
    let rx_end = link_info(net.server_ns(), net.server_iface())?;
    live4.finish(&server4)?;
    live6.finish(&server6)?;

    let counters = exit.counters()?;
    let counter = |name: &str| exit.counter(name);
    let stale = exit.events("stale_syn");
    let replayed = exit.events("replayed").len() as u64;
    eprintln!(
        "counters: {counters}\nexpected syns_checked = {checked_sent} well-formed SYNs to port \
         {WATCHED} + {fixed_syns} SYNs of the dumb client + {replayed} re-injected; \
         packets_seen {} vs {reached_tc} malformed frames at TC ingress (the server veth's \
         rx_packets over the agent's life: {})",
        counter("packets_seen")?,
        rx_end.rx_packets - rx_before.rx_packets
    );
    ensure!(
        exit.events("destroyed").len() == 1,
        "expected exactly the dumb client's stale socket destroyed:\n{}",
        exit.output()
    );
    for e in stale.iter().chain(&exit.events("destroyed")) {
        ensure!(
            str_field(e, "client")? == client.local_addr().to_string(),
            "a report that is not the dumb client's: {e}"
        );
    }
    ensure!(
        counter("packets_seen")? >= reached_tc,
        "packets_seen {} < {reached_tc} malformed frames that reached TC ingress",
        counter("packets_seen")?
    );
    // Everything else the veth received while the agent ran went past the classifier too (up
    // to the few live packets between attach, or detach, and reading the veth's counters).
    let rx_while_attached = rx_end.rx_packets - rx_before.rx_packets;
    ensure!(
        (counter("packets_seen")? + untag_dropped).abs_diff(rx_while_attached) <= 100,
        "packets_seen {} + {untag_dropped} dropped before TC != {rx_while_attached} received by \
         the server veth while the agent ran",
        counter("packets_seen")?
    );
    ensure!(
        counter("syns_checked")? == checked_sent + fixed_syns + replayed,
        "syns_checked {} != {checked_sent} + {fixed_syns} + {replayed}",
        counter("syns_checked")?
    );
    ensure!(
        counter("stale_syns")? == stale.len() as u64 + counter("replays_passed")?,
        "stale_syns {} != {} stale_syn events (all the dumb client's) + replays_passed",
        counter("stale_syns")?,
        stale.len()
    );
    ensure!(counter("ringbuf_full")? == 0, "ring buffer overflow");
    ensure!(counter("old_duplicate_syns")? == 0, "{}", exit.output());
    for name in [
        "would_destroy",
        "destroy_failed",
        "replay_failed",
        "bad_record",
    ] {
        ensure!(exit.events(name).is_empty(), "`{name}`:\n{}", exit.output());
    }
    Ok(())
}

/// One frame the classifier and the kernel must agree on; `seq` is its TCP sequence number,
/// unique among the cases, so a report names its case.
struct Case {
    name: String,
    seq: u32,
    frame: Vec<u8>,
}

/// The cases of [`only_syns_the_kernel_accepts_are_reported`], for the live tuples of `t`.
fn agreement_cases(t: &Targets, rng: &mut Rng) -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    // A fresh SYN for `tuple`: its sequence number, the IP packet and its ethertype.
    let mut fresh = |tuple: (SocketAddr, SocketAddr)| {
        let seq = rng.next_u32();
        let (ethertype, packet) = ip_packet(tuple, &segment(tuple, &syn(tuple, seq)));
        (seq, ethertype, packet)
    };
    for (fam, tuple) in [("IPv4", t.t4), ("IPv6", t.t6)] {
        let mut add = |name: &str, seq: u32, frame: Vec<u8>| {
            cases.push(Case {
                name: format!("{name}, {fam}"),
                seq,
                frame,
            });
        };
        let (seq, ethertype, packet) = fresh(tuple);
        add(
            "control: plain SYN",
            seq,
            ethernet(t.macs, ethertype, &packet),
        );
        let (seq, ethertype, packet) = fresh(tuple);
        let mut trailer = ethernet(t.macs, ethertype, &packet);
        trailer.extend_from_slice(&[0u8; 30]);
        add("control: Ethernet trailer", seq, trailer);
        let (seq, _, _) = fresh(tuple);
        let mut fin = syn(tuple, seq);
        fin.flags |= flags::FIN;
        add("control: SYN+FIN", seq, frame(t, tuple, &fin));
        let (seq, ethertype, packet) = fresh(tuple);
        add(
            "control: VLAN 0 (priority tag only)",
            seq,
            vlan(t.macs, 0, ethertype, &packet),
        );
        for vid in [5, 4094] {
            let (seq, ethertype, packet) = fresh(tuple);
            add(
                &format!("802.1Q VLAN {vid} (no such VLAN device)"),
                seq,
                vlan(t.macs, vid, ethertype, &packet),
            );
        }
        let (seq, ethertype, packet) = fresh(tuple);
        let mut ad = vlan(t.macs, 7, ethertype, &packet);
        ad[12..14].copy_from_slice(&ETHERTYPE_QINQ.to_be_bytes());
        add("802.1ad tag 7 (no such VLAN device)", seq, ad);
        for doff in [6u8, 15] {
            let (seq, _, _) = fresh(tuple);
            let mut tcp = syn(tuple, seq);
            tcp.data_offset = doff;
            add(
                &format!("data offset {doff} > the 20-byte segment"),
                seq,
                frame(t, tuple, &tcp),
            );
        }
        let (seq, _, _) = fresh(tuple);
        let mut bad_tcp = frame(t, tuple, &syn(tuple, seq));
        let at = bad_tcp.len() - 4; // the checksum's first byte
        bad_tcp[at] ^= 0x5a;
        add("bad TCP checksum", seq, bad_tcp);
        let multicast = if ethertype == ETHERTYPE_IPV4 {
            [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01]
        } else {
            [0x33, 0x33, 0x00, 0x00, 0x00, 0x01]
        };
        for (what, dst) in [
            ("another host's MAC", [0x02, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a]),
            ("broadcast MAC", [0xff; 6]),
            ("multicast MAC", multicast),
        ] {
            let (seq, ethertype, packet) = fresh(tuple);
            let macs = Macs { dst, ..t.macs };
            add(what, seq, ethernet(macs, ethertype, &packet));
        }
    }
    // IPv4 only: options, header checksum, total length.
    let ipv4_case = |name: String, seq: u32, edit: &dyn Fn(&mut Ipv4), cut: Option<usize>| {
        let mut ip = Ipv4::new(t.client4, t.server4, IPPROTO_TCP);
        edit(&mut ip);
        let mut packet = ip.packet(&segment(t.t4, &syn(t.t4, seq)));
        if let Some(at) = cut {
            packet[at] ^= 0x5a;
        }
        Case {
            name,
            seq,
            frame: ethernet(t.macs, ETHERTYPE_IPV4, &packet),
        }
    };
    cases.push(ipv4_case(
        "control: IPv4 options (record route)".into(),
        rng.next_u32(),
        &|ip| ip.options = vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        None,
    ));
    cases.push(ipv4_case(
        "bad IPv4 header checksum".into(),
        rng.next_u32(),
        &|_| {},
        Some(10),
    ));
    for (what, total) in [
        ("20: the TCP header is padding", 20u16),
        ("39: the TCP header is cut", 39),
        ("200 > the frame", 200),
    ] {
        cases.push(ipv4_case(
            format!("IPv4 total length {what}"),
            rng.next_u32(),
            &|ip| ip.total_len = Some(total),
            None,
        ));
    }
    // IPv6 only: payload length.
    for (what, len) in [
        ("0: the TCP header is padding", 0u16),
        ("19: the TCP header is cut", 19),
        ("200 > the frame", 200),
    ] {
        let seq = rng.next_u32();
        let mut p = ipv6(
            t.client6,
            t.server6,
            IPPROTO_TCP,
            &segment(t.t6, &syn(t.t6, seq)),
        );
        p[4..6].copy_from_slice(&len.to_be_bytes());
        cases.push(Case {
            name: format!("IPv6 payload length {what}"),
            seq,
            frame: ethernet(t.macs, ETHERTYPE_IPV6, &p),
        });
    }
    cases
}

/// Frame by frame, for a live IPv4 and a live IPv6 connection: the classifier reports a SYN
/// exactly when the kernel itself takes it for a SYN on the ESTABLISHED socket (its
/// `TcpExtTCPSYNChallenge` counter). The agent observes only (`--mode observe`), so every
/// frame reaches the kernel and nothing is destroyed. The controls (a plain SYN, one with IPv4
/// options, one with an Ethernet trailer, one with a priority-only VLAN tag, SYN+FIN) must be
/// reported, which also shows that the kernel's verdict is read right; frames the kernel drops
/// before TCP must not be.
///
/// In replay mode with `--min-idle 0s`, each frame the classifier reports but the kernel drops
/// destroys the live connection (and its held copy is re-injected, so the kernel then receives
/// a SYN it would have dropped): the guards are then the only defence, as against any spoofed
/// SYN.
#[test]
fn only_syns_the_kernel_accepts_are_reported() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("kernel_agrees")?;
    let server4 = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let server6 = LegacyServer::start(&net, Bind::V6, WATCHED)?;
    let addr4 = net.server_addr(Family::V4, WATCHED);
    let addr6 = net.server_addr(Family::V6, WATCHED);
    let live4 = HealthyTraffic::start(&net, &server4, addr4, 1, LIVE_EVERY)?;
    let live6 = HealthyTraffic::start(&net, &server6, addr6, 1, LIVE_EVERY)?;
    let t = Targets::new(&net, live4.peers()[0], live6.peers()[0])?;
    let mut rng = Rng::from_clock();
    let cases = agreement_cases(&t, &mut rng);

    let agent = start_agent(&net, &["--mode", "observe", "--min-idle", "0s"])?;
    let injector = FrameInjector::open(net.client_ns(), net.client_iface())?;
    let challenges = || -> Result<u64> {
        tcp_ext_counters(net.server_ns())?
            .get("TCPSYNChallenge")
            .copied()
            .context("no TCPSYNChallenge counter")
    };
    // The kernel's verdict, case by case: the counter moves while the frame is sent (the veth
    // hands it to the stack in the sender's softirq), or a little later under load.
    let first = challenges()?;
    let mut kernel_syn = Vec::new();
    for case in &cases {
        let before = challenges()?;
        injector.send(&case.frame)?;
        let deadline = Instant::now() + Duration::from_millis(50);
        let mut moved = challenges()? > before;
        while !moved && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
            moved = challenges()? > before;
        }
        kernel_syn.push(moved);
    }
    thread::sleep(Duration::from_millis(300));
    let total = challenges()? - first;
    let counted = kernel_syn.iter().filter(|k| **k).count() as u64;
    ensure!(
        total == counted,
        "the kernel counted {total} SYN challenges in all but {counted} case by case: a late          one was put on the wrong case; rerun"
    );
    live4.assert_flowing(&server4, SHORT)?;
    live6.assert_flowing(&server6, SHORT)?;
    let exit = stop_agent(agent)?;
    live4.finish(&server4)?;
    live6.finish(&server6)?;
    ensure!(
        exit.events("destroyed").is_empty(),
        "observe mode destroyed something"
    );

    let reported_seqs: Vec<u64> = exit
        .events("stale_syn")
        .iter()
        .filter_map(|e| e.get("syn_seq").and_then(Value::as_u64))
        .collect();
    let mut table = Vec::new();
    let mut disagree = Vec::new();
    let mut controls_wrong = Vec::new();
    for (case, &kernel) in cases.iter().zip(&kernel_syn) {
        let reported = reported_seqs.contains(&u64::from(case.seq));
        table.push(format!(
            "  {:<56} kernel: {:<8} classifier: {}",
            case.name,
            if kernel { "SYN" } else { "dropped" },
            if reported { "reported" } else { "-" }
        ));
        if kernel != reported {
            disagree.push(case.name.as_str());
        }
        if case.name.starts_with("control") && !(kernel && reported) {
            controls_wrong.push(case.name.as_str());
        }
    }
    let table = table.join("\n");
    eprintln!("frame by frame:\n{table}");
    ensure!(
        controls_wrong.is_empty(),
        "controls not taken for SYNs by both the kernel and the classifier: the test is \
         wrong: {controls_wrong:?}\n{table}"
    );
    ensure!(
        disagree.is_empty(),
        "the classifier reports {} frame(s) the kernel drops (or misses ones it takes): \
         {disagree:?}\n{table}",
        disagree.len()
    );
    Ok(())
}
