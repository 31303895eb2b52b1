//! Header parsing: from an Ethernet frame to the SYN's 4-tuple, or `None`.
//!
//! Anything the kernel would not deliver to a local TCP socket, or that the watchdog does not
//! fully understand, yields `None` and the packet goes on untouched: frames for another host
//! (`pkt_type`), a VLAN tag the kernel would not strip into a local device, truncated headers,
//! IP lengths that disagree with the frame, IP fragments, IPv6 extension headers, a TCP data
//! offset outside the segment. Direct packet access keeps the common (non-SYN) path to a few
//! loads.
use core::mem;

use aya_ebpf::programs::TcContext;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};
use watchdog_common::{ReplayKey, TupleKey, ipv4_mapped};

/// A SYN without ACK, as seen on the server's ingress.
pub struct Syn {
    /// Source address, IPv4 as IPv4-mapped IPv6.
    pub client_addr: [u8; 16],
    /// Destination address, IPv4 as IPv4-mapped IPv6.
    pub server_addr: [u8; 16],
    /// Host byte order.
    pub client_port: u16,
    /// Host byte order.
    pub server_port: u16,
    /// Raw network-order ports, as `bpf_sock_tuple` wants them.
    pub ports_be: [u16; 2],
    pub seq: u32,
    pub ip_version: u8,
    /// Where the IP header starts and how long it is (IPv4 with options).
    pub ip_offset: usize,
    pub ip_header_len: usize,
    /// Where the TCP segment starts and how long the IP header says it is.
    pub segment_offset: usize,
    pub segment_len: usize,
}

impl Syn {
    /// This SYN's 4-tuple, the key of the `REFUSED` map.
    #[inline(always)]
    pub fn tuple(&self) -> TupleKey {
        TupleKey {
            client_addr: self.client_addr,
            server_addr: self.server_addr,
            client_port: self.client_port,
            server_port: self.server_port,
        }
    }

    /// This SYN's identity in the `REPLAYED` map.
    #[inline(always)]
    pub fn replay_key(&self) -> ReplayKey {
        ReplayKey {
            tuple: self.tuple(),
            syn_seq: self.seq,
        }
    }
}

/// IPv4 "more fragments" flag and fragment offset.
const IPV4_MF_AND_OFFSET: u16 = 0x3fff;

#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// `PACKET_HOST`: a frame addressed to this host.
const PACKET_HOST: u32 = 0;

#[inline(always)]
pub fn parse_syn(ctx: &TcContext) -> Option<Syn> {
    // SAFETY: reading fields of the live `__sk_buff` context.
    let (pkt_type, vlan_present, vlan_tci) = unsafe {
        let skb = ctx.skb.skb;
        ((*skb).pkt_type, (*skb).vlan_present, (*skb).vlan_tci)
    };
    // Another host's, broadcast or multicast frames never reach a local TCP socket; nor does a
    // VLAN-tagged one (VLAN id ≠ 0) on the parent of the VLAN device: attach to that device.
    if pkt_type != PACKET_HOST || (vlan_present != 0 && vlan_tci & 0x0fff != 0) {
        return None;
    }
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by `ptr_at`.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == EtherType::Ipv4 as u16 {
        parse_ipv4(ctx)
    } else if ether_type == EtherType::Ipv6 as u16 {
        parse_ipv6(ctx)
    } else {
        None
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext) -> Option<Syn> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds checked by `ptr_at`.
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 || ip.proto != IpProto::Tcp as u8 {
        return None;
    }
    if u16::from_be_bytes(ip.frags) & IPV4_MF_AND_OFFSET != 0 {
        return None;
    }
    let header_len = usize::from(ip.vihl & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes(ip.tot_len));
    if header_len < Ipv4Hdr::LEN || total_len > frame_len(ctx) - EthHdr::LEN {
        return None;
    }
    let tcp = syn_header(
        ctx,
        EthHdr::LEN + header_len,
        total_len.checked_sub(header_len)?,
    )?;
    Some(Syn {
        client_addr: ipv4_mapped(ip.src_addr),
        server_addr: ipv4_mapped(ip.dst_addr),
        client_port: u16::from_be_bytes(tcp.source),
        server_port: u16::from_be_bytes(tcp.dest),
        ports_be: [u16::from_ne_bytes(tcp.source), u16::from_ne_bytes(tcp.dest)],
        seq: u32::from_be_bytes(tcp.seq),
        ip_version: 4,
        ip_offset: EthHdr::LEN,
        ip_header_len: header_len,
        segment_offset: EthHdr::LEN + header_len,
        segment_len: total_len - header_len,
    })
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext) -> Option<Syn> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds checked by `ptr_at`.
    let ip = unsafe { &*ip };
    // Extension headers (including fragments) are left to the kernel.
    if ip.vcf[0] >> 4 != 6 || ip.next_hdr != IpProto::Tcp as u8 {
        return None;
    }
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    if payload_len > frame_len(ctx) - EthHdr::LEN - Ipv6Hdr::LEN {
        return None;
    }
    let tcp = syn_header(ctx, EthHdr::LEN + Ipv6Hdr::LEN, payload_len)?;
    Some(Syn {
        client_addr: ip.src_addr,
        server_addr: ip.dst_addr,
        client_port: u16::from_be_bytes(tcp.source),
        server_port: u16::from_be_bytes(tcp.dest),
        ports_be: [u16::from_ne_bytes(tcp.source), u16::from_ne_bytes(tcp.dest)],
        seq: u32::from_be_bytes(tcp.seq),
        ip_version: 6,
        ip_offset: EthHdr::LEN,
        ip_header_len: Ipv6Hdr::LEN,
        segment_offset: EthHdr::LEN + Ipv6Hdr::LEN,
        segment_len: payload_len,
    })
}

/// The TCP header at `offset` if it is a plain SYN (no ACK, no RST) whose header fits in the
/// `segment_len` bytes the IP header gives the segment.
#[inline(always)]
fn syn_header(ctx: &TcContext, offset: usize, segment_len: usize) -> Option<&TcpHdr> {
    let tcp: *const TcpHdr = ptr_at(ctx, offset)?;
    // SAFETY: bounds checked by `ptr_at`; the packet outlives this program run.
    let tcp = unsafe { &*tcp };
    let header_len = usize::from(tcp.doff()) * 4;
    if tcp.syn() == 0 || tcp.ack() != 0 || tcp.rst() != 0 {
        return None;
    }
    if header_len < TcpHdr::LEN || header_len > segment_len {
        return None;
    }
    Some(tcp)
}

/// The frame's length (from the Ethernet header on).
#[inline(always)]
fn frame_len(ctx: &TcContext) -> usize {
    ctx.len() as usize
}
