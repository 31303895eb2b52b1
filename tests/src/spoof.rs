//! Hand-made frames for hostile-input tests: spoofed SYNs that carry a live connection's exact
//! 4-tuple, and malformed or unusual frames, sent in bulk from the client namespace.
//!
//! [`FrameInjector`] is one `AF_PACKET` socket on the client veth that sends whole batches with
//! `sendmmsg`, so 100,000 frames cost well under a second. The builders ([`Tcp`], [`Ipv4`],
//! [`ipv6`], [`ethernet`], [`vlan`]) write exactly the bytes they are given, wrong lengths and
//! all; checksums are computed over what is really there, so a frame is malformed only where a
//! test means it to be. [`link_info`] reads an interface's MAC address and packet counters, to
//! tell how many frames reached the server veth.

use std::collections::BTreeMap;
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::netns::{TestNet, current_ifindex, ns_exec, run_in_ns};

pub const ETH_HLEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// 802.1Q.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// IPv6 next-header values of the extension headers the tests use.
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_FRAGMENT: u8 = 44;
/// IPv4 "more fragments" flag, in the flags/fragment-offset field.
pub const IPV4_MF: u16 = 0x2000;

/// TCP flag bits (byte 13 of the header).
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// A frame's Ethernet source and destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Macs {
    pub src: [u8; 6],
    pub dst: [u8; 6],
}

impl Macs {
    /// From the client veth to the server veth: what the client's own frames carry.
    pub fn client_to_server(net: &TestNet) -> Result<Macs> {
        Ok(Macs {
            src: link_info(net.client_ns(), net.client_iface())?.mac,
            dst: link_info(net.server_ns(), net.server_iface())?.mac,
        })
    }
}

/// An interface's address and packet counters (`ip -s -j link show`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub mac: [u8; 6],
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

/// The MAC address and packet counters of `iface` in namespace `ns`.
pub fn link_info(ns: &str, iface: &str) -> Result<LinkInfo> {
    let text = ns_exec(ns, "ip", &["-s", "-j", "link", "show", "dev", iface])?;
    let json: Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing `ip -s -j link show dev {iface}`: {text}"))?;
    let link = json.get(0).context("no link in the output")?;
    let address = link
        .get("address")
        .and_then(Value::as_str)
        .with_context(|| format!("no address in {link}"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = address.split(':').collect();
    if parts.len() != 6 {
        bail!("`{address}` is not a MAC address");
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("MAC {address}"))?;
    }
    let stat = |dir: &str, name: &str| -> Result<u64> {
        link.pointer(&format!("/stats64/{dir}/{name}"))
            .and_then(Value::as_u64)
            .with_context(|| format!("no stats64.{dir}.{name} in {link}"))
    };
    Ok(LinkInfo {
        mac,
        rx_packets: stat("rx", "packets")?,
        rx_dropped: stat("rx", "dropped")?,
        tx_packets: stat("tx", "packets")?,
        tx_dropped: stat("tx", "dropped")?,
    })
}

/// A TCP header as it goes on the wire, with whatever follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// The data offset written into the header, in 32-bit words (5: no options). Not checked
    /// against what follows: a test may lie.
    pub data_offset: u8,
    pub window: u16,
    /// Bytes after the fixed 20-byte header: options and payload.
    pub rest: Vec<u8>,
}

impl Tcp {
    /// A plain SYN without options.
    pub fn syn(src_port: u16, dst_port: u16, seq: u32) -> Tcp {
        Tcp {
            src_port,
            dst_port,
            seq,
            ack: 0,
            flags: flags::SYN,
            data_offset: 5,
            window: 64240,
            rest: Vec::new(),
        }
    }

    /// The segment with its checksum over the pseudo header of `src` → `dst` (both of one
    /// family). A segment cut below 18 bytes has no checksum field; the bytes are as written.
    pub fn segment(&self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let mut seg = Vec::with_capacity(20 + self.rest.len());
        seg.extend_from_slice(&self.src_port.to_be_bytes());
        seg.extend_from_slice(&self.dst_port.to_be_bytes());
        seg.extend_from_slice(&self.seq.to_be_bytes());
        seg.extend_from_slice(&self.ack.to_be_bytes());
        seg.push(self.data_offset << 4);
        seg.push(self.flags);
        seg.extend_from_slice(&self.window.to_be_bytes());
        seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        seg.extend_from_slice(&self.rest);
        set_l4_checksum(&mut seg, 16, src, dst, IPPROTO_TCP);
        seg
    }
}

/// Writes the TCP/UDP checksum at `at` of `seg`, over the pseudo header and all of `seg`.
pub fn set_l4_checksum(seg: &mut [u8], at: usize, src: IpAddr, dst: IpAddr, proto: u8) {
    if seg.len() < at + 2 {
        return;
    }
    seg[at] = 0;
    seg[at + 1] = 0;
    let sum = pseudo_header_sum(src, dst, proto, seg.len()) + ones_sum(seg);
    let sum = !fold(sum);
    seg[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

fn pseudo_header_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut sum = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ones_sum(&s.octets()) + ones_sum(&d.octets()),
        (s, d) => ones_sum(&v6_octets(s)) + ones_sum(&v6_octets(d)),
    };
    sum += u32::from(proto);
    sum += (len as u32) & 0xffff;
    sum += (len as u32) >> 16;
    sum
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// An IPv4 header; [`Ipv4::packet`] writes it before a payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub ident: u16,
    /// Flags and fragment offset (e.g. [`IPV4_MF`], or an offset in 8-byte units).
    pub flags_fragment: u16,
    pub ttl: u8,
    /// Options, padded with zeros (end of options) to a multiple of 4 bytes.
    pub options: Vec<u8>,
    /// The IHL written into the header (words); `None`: 5 + the options.
    pub ihl: Option<u8>,
    /// The total length written into the header; `None`: the real length.
    pub total_len: Option<u16>,
    /// The version nibble (4 unless a test lies).
    pub version: u8,
}

impl Ipv4 {
    /// A plain header (no options, don't-fragment clear, TTL 64).
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Ipv4 {
        Ipv4 {
            src,
            dst,
            proto,
            ident: 0,
            flags_fragment: 0,
            ttl: 64,
            options: Vec::new(),
            ihl: None,
            total_len: None,
            version: 4,
        }
    }

    /// The header (with a correct header checksum over what is written) and `payload`.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let mut options = self.options.clone();
        while !options.len().is_multiple_of(4) {
            options.push(0);
        }
        let header_len = 20 + options.len();
        let ihl = self.ihl.unwrap_or((header_len / 4) as u8);
        let total = self
            .total_len
            .unwrap_or((header_len + payload.len()) as u16);
        let mut p = Vec::with_capacity(header_len + payload.len());
        p.push((self.version << 4) | (ihl & 0x0f));
        p.push(0);
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&self.ident.to_be_bytes());
        p.extend_from_slice(&self.flags_fragment.to_be_bytes());
        p.push(self.ttl);
        p.push(self.proto);
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend_from_slice(&options);
        let sum = !fold(ones_sum(&p));
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }
}

/// An IPv6 packet: fixed header (payload length = `payload.len()`, hop limit 64) and payload.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(40 + payload.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.push(next_header);
    p.push(64);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// An Ethernet frame.
pub fn ethernet(macs: Macs, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
    f.extend_from_slice(&macs.dst);
    f.extend_from_slice(&macs.src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An 802.1Q-tagged Ethernet frame (priority 0, VLAN `vid`).
pub fn vlan(macs: Macs, vid: u16, inner_ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut tagged = Vec::with_capacity(4 + payload.len());
    tagged.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    tagged.extend_from_slice(&inner_ethertype.to_be_bytes());
    tagged.extend_from_slice(payload);
    ethernet(macs, ETHERTYPE_VLAN, &tagged)
}

/// A well-formed SYN frame from `client` to `server` (both IPv4 or both IPv6), checksums
/// correct: what a rebooted client, or a spoofer who knows the tuple, sends.
pub fn syn_frame(macs: Macs, client: SocketAddr, server: SocketAddr, seq: u32) -> Vec<u8> {
    let tcp = Tcp::syn(client.port(), server.port(), seq).segment(client.ip(), server.ip());
    match (client.ip(), server.ip()) {
        (IpAddr::V4(c), IpAddr::V4(s)) => ethernet(
            macs,
            ETHERTYPE_IPV4,
            &Ipv4::new(c, s, IPPROTO_TCP).packet(&tcp),
        ),
        (c, s) => ethernet(
            macs,
            ETHERTYPE_IPV6,
            &ipv6(
                Ipv6Addr::from(v6_octets(c)),
                Ipv6Addr::from(v6_octets(s)),
                IPPROTO_TCP,
                &tcp,
            ),
        ),
    }
}

/// The one's complement sum of `bytes` as 16-bit big-endian words, not yet folded.
pub fn ones_sum(bytes: &[u8]) -> u32 {
    let mut sum: u32 = 0;
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Folds a one's complement sum to 16 bits.
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// What [`FrameInjector::send_all`] achieved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Frames the kernel took.
    pub sent: u64,
    /// Frames the kernel refused, by errno (e.g. `EINVAL` for a frame shorter than an
    /// Ethernet header).
    pub refused: BTreeMap<i32, u64>,
}

impl SendReport {
    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    pub fn add(&mut self, other: &SendReport) {
        self.sent += other.sent;
        for (errno, n) in &other.refused {
            *self.refused.entry(*errno).or_default() += n;
        }
    }
}

/// Messages per `sendmmsg` call.
const BATCH: usize = 256;

/// One `AF_PACKET` socket on an interface of a namespace, sending frames as they are, like a
/// NIC would put them on the wire.
pub struct FrameInjector {
    fd: OwnedFd,
    ifindex: i32,
}

impl FrameInjector {
    /// Opens a send-only `AF_PACKET` socket on `iface` in namespace `ns`.
    pub fn open(ns: &str, iface: &str) -> Result<FrameInjector> {
        let name = iface.to_owned();
        run_in_ns(ns, move || {
            let ifindex = i32::try_from(current_ifindex(&name)?).context("ifindex")?;
            // Protocol 0: a send-only socket that receives nothing.
            // SAFETY: plain socket(2); the fd is owned right away.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            if raw < 0 {
                return Err(io::Error::last_os_error()).context("socket(AF_PACKET)");
            }
            // SAFETY: `raw` is a fresh, valid fd nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            Ok(FrameInjector { fd, ifindex })
        })
        .with_context(|| format!("opening an AF_PACKET socket on {iface} in {ns}"))
    }

    /// Sends one frame.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        let report = self.send_all(std::slice::from_ref(&frame.to_vec()))?;
        if let Some((errno, _)) = report.refused.iter().next() {
            return Err(io::Error::from_raw_os_error(*errno))
                .with_context(|| format!("sending a {}-byte frame", frame.len()));
        }
        Ok(())
    }

    /// Sends every frame, `sendmmsg` batch by batch. A frame the kernel refuses is counted
    /// (by errno) and skipped; the others go on. Fails only when the socket itself fails.
    pub fn send_all(&self, frames: &[Vec<u8>]) -> Result<SendReport> {
        let mut report = SendReport::default();
        let mut start = 0;
        while start < frames.len() {
            let batch = &frames[start..frames.len().min(start + BATCH)];
            let mut addrs: Vec<libc::sockaddr_ll> =
                batch.iter().map(|f| self.address_for(f)).collect();
            let mut iovs: Vec<libc::iovec> = batch
                .iter()
                .map(|f| libc::iovec {
                    iov_base: f.as_ptr() as *mut libc::c_void,
                    iov_len: f.len(),
                })
                .collect();
            let mut msgs: Vec<libc::mmsghdr> = (0..batch.len())
                .map(|i| {
                    // SAFETY: all-zero is a valid msghdr.
                    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
                    hdr.msg_name = (&raw mut addrs[i]).cast();
                    hdr.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                    hdr.msg_iov = &raw mut iovs[i];
                    hdr.msg_iovlen = 1;
                    libc::mmsghdr {
                        msg_hdr: hdr,
                        msg_len: 0,
                    }
                })
                .collect();
            // SAFETY: every message points at live buffers and addresses of the given lengths.
            let n = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    msgs.len() as libc::c_uint,
                    0,
                )
            };
            if n > 0 {
                report.sent += n as u64;
                start += n as usize;
                continue;
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ENOBUFS | libc::EAGAIN) => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Some(errno @ (libc::EINVAL | libc::EMSGSIZE | libc::ENETDOWN | libc::ENXIO)) => {
                    // This frame (the first of the batch) is refused; the rest go on.
                    *report.refused.entry(errno).or_default() += 1;
                    start += 1;
                }
                _ => {
                    return Err(error).with_context(|| {
                        format!(
                            "sendmmsg of {} frames on ifindex {}",
                            msgs.len(),
                            self.ifindex
                        )
                    });
                }
            }
        }
        Ok(report)
    }

    fn address_for(&self, frame: &[u8]) -> libc::sockaddr_ll {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        if frame.len() >= ETH_HLEN {
            addr.sll_protocol = u16::from_be_bytes([frame[12], frame[13]]).to_be();
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        }
        addr
    }
}

/// A small, fast, seedable pseudo-random generator (SplitMix64): reproducible frame mixes
/// without a dependency. Tests print the seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Seeded from the clock; see [`Rng::seed`].
    pub fn from_clock() -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(nanos ^ (u64::from(std::process::id()) << 32))
    }

    /// The current state: `Rng::new(rng.seed())` repeats what follows.
    pub fn seed(&self) -> u64 {
        self.0
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    pub fn next_u16(&mut self) -> u16 {
        (self.next_u64() >> 48) as u16
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn fill(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }

    /// Shuffles `items` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::parse_syn;

    fn macs() -> Macs {
        Macs {
            src: [2, 0, 0, 0, 0, 2],
            dst: [2, 0, 0, 0, 0, 1],
        }
    }

    #[test]
    fn syn_frames_parse_and_checksums_verify() {
        let client: SocketAddr = "10.0.0.2:1025".parse().expect("addr");
        let server: SocketAddr = "10.0.0.1:5000".parse().expect("addr");
        let f = syn_frame(macs(), client, server, 0xdead_beef);
        let s = parse_syn(&f).expect("a SYN");
        assert_eq!((s.src, s.dst, s.seq), (client, server, 0xdead_beef));
        // IPv4 header and TCP segment (with the pseudo header) both sum to 0xffff.
        assert_eq!(fold(ones_sum(&f[ETH_HLEN..ETH_HLEN + 20])), 0xffff);
        let seg = &f[ETH_HLEN + 20..];
        let pseudo = pseudo_header_sum(client.ip(), server.ip(), IPPROTO_TCP, seg.len());
        assert_eq!(fold(pseudo + ones_sum(seg)), 0xffff);
        // The bed's own checksum code agrees.
        let mut again = f.clone();
        crate::raw::fix_checksums(&mut again);
        assert_eq!(again, f);

        let client6: SocketAddr = "[fd00::2]:1025".parse().expect("addr");
        let server6: SocketAddr = "[fd00::1]:5000".parse().expect("addr");
        let f6 = syn_frame(macs(), client6, server6, 7);
        let s6 = parse_syn(&f6).expect("an IPv6 SYN");
        assert_eq!((s6.src, s6.dst, s6.seq), (client6, server6, 7));
        let mut again6 = f6.clone();
        crate::raw::fix_checksums(&mut again6);
        assert_eq!(again6, f6);
    }

    #[test]
    fn ipv4_options_and_lies_are_written_as_given() {
        let mut ip = Ipv4::new(
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 1),
            IPPROTO_TCP,
        );
        ip.options = vec![1, 1, 1];
        let p = ip.packet(&[0u8; 20]);
        assert_eq!(p[0], 0x46);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 44);
        assert_eq!(fold(ones_sum(&p[..24])), 0xffff);
        ip.ihl = Some(3);
        ip.total_len = Some(20);
        let p = ip.packet(&[]);
        assert_eq!(p[0], 0x43);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 20);
    }

    #[test]
    fn rng_is_reproducible_and_shuffles() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(a.seed());
        assert_eq!(a.next_u64(), b.next_u64());
        let mut items: Vec<u32> = (0..100).collect();
        a.shuffle(&mut items);
        let mut sorted = items.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(items, sorted);
    }
}
