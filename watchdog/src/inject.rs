//! Re-injecting a held SYN, the second half of replay mode.
//!
//! Preferred: `BPF_PROG_RUN` of a pass-everything XDP program with
//! `BPF_F_TEST_XDP_LIVE_FRAMES` (Linux ≥ 5.18). The kernel builds a fresh skb from the frame and
//! hands it to the stack *as if it had arrived on the original interface*: firewall rules,
//! `SO_BINDTODEVICE` listeners and routing see what they would have seen.
//!
//! Fallback: a raw IP socket (`IPPROTO_RAW`, header included) sends the IP packet to the local
//! address; it arrives through the loopback interface instead of the original one.
//!
//! Either way the TCP checksum is recomputed first. On a real NIC it is already right and stays
//! byte-identical; a frame from a veth (or any sender that offloads checksums to the device)
//! carries only the pseudo-header sum, which the stack would reject in a fresh skb.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use anyhow::{Context, Result, bail};
use aya::programs::Xdp;
use aya_obj::generated::{BPF_F_TEST_XDP_LIVE_FRAMES, bpf_attr, bpf_cmd};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// How held SYNs go back into the stack.
pub enum Injector {
    /// `BPF_PROG_RUN` + live frames on the original ingress interface, with a descriptor of
    /// the replay program of its own.
    XdpLiveFrames { program: OwnedFd },
    /// Raw IP sockets; the SYN arrives on `lo`.
    RawSocket { v4: Socket, v6: Socket },
}

impl Injector {
    /// Picks live frames when the kernel supports them: a frame of the IEEE "local
    /// experimental" ethertype 0x88B5, which no protocol handler takes, is injected on `ifindex`.
    pub fn probe(program: &Xdp, ifindex: u32) -> Result<Self> {
        let program = program
            .fd()?
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the replay program's descriptor")?;
        let mut probe = [0u8; 60];
        probe[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        match inject_live(program.as_fd(), &probe, ifindex) {
            Ok(()) => Ok(Injector::XdpLiveFrames { program }),
            Err(error) => {
                tracing::warn!(
                    event = "replay_fallback",
                    error = %format!("{error:#}"),
                    "XDP live frames unavailable (Linux ≥ 5.18): replayed SYNs will arrive on lo"
                );
                Self::raw_sockets()
            }
        }
    }

    fn raw_sockets() -> Result<Self> {
        let raw = |domain| {
            Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
                .context("opening a raw IP socket for SYN replay (needs CAP_NET_RAW)")
        };
        Ok(Injector::RawSocket {
            v4: raw(Domain::IPV4)?,
            v6: raw(Domain::IPV6)?,
        })
    }

    /// An injector of the same kind, for another thread.
    pub fn duplicate(&self) -> Result<Self> {
        Ok(match self {
            Injector::XdpLiveFrames { program } => Injector::XdpLiveFrames {
                program: program
                    .try_clone()
                    .context("duplicating the replay program's descriptor")?,
            },
            Injector::RawSocket { v4, v6 } => Injector::RawSocket {
                v4: v4.try_clone().context("duplicating the raw IPv4 socket")?,
                v6: v6.try_clone().context("duplicating the raw IPv6 socket")?,
            },
        })
    }

    pub fn method(&self) -> &'static str {
        match self {
            Injector::XdpLiveFrames { .. } => "xdp_live_frames",
            Injector::RawSocket { .. } => "raw_socket",
        }
    }

    /// Re-injects one Ethernet frame holding a TCP SYN that arrived on `ifindex`.
    pub fn inject(&self, frame: &[u8], ifindex: u32) -> Result<()> {
        let mut frame = frame.to_vec();
        let ip_offset = fix_tcp_checksum(&mut frame)?;
        match self {
            Injector::XdpLiveFrames { program } => inject_live(program.as_fd(), &frame, ifindex),
            Injector::RawSocket { v4, v6 } => {
                let packet = &frame[ip_offset..];
                let (socket, destination) = match destination(packet)? {
                    ip @ IpAddr::V4(_) => (v4, ip),
                    ip @ IpAddr::V6(_) => (v6, ip),
                };
                let sent = socket
                    .send_to(packet, &SockAddr::from(SocketAddr::new(destination, 0)))
                    .context("sending the SYN on a raw socket")?;
                if sent != packet.len() {
                    bail!("raw socket sent {sent} of {} bytes", packet.len());
                }
                Ok(())
            }
        }
    }
}

/// `struct xdp_md` as `BPF_PROG_RUN` takes it: the frame starts at offset 0, no metadata.
#[repr(C)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// `BPF_PROG_RUN` of the replay program with `BPF_F_TEST_XDP_LIVE_FRAMES`. The syscall itself,
/// because aya runs a program only through its own program object, and a second object for
/// another thread (`from_program_info`) needs `CAP_SYS_ADMIN`; a duplicated descriptor does not.
fn inject_live(program: BorrowedFd<'_>, frame: &[u8], ifindex: u32) -> Result<()> {
    let md = XdpMd {
        data: 0,
        data_end: frame.len() as u32,
        data_meta: 0,
        ingress_ifindex: ifindex,
        rx_queue_index: 0,
        egress_ifindex: 0,
    };
    // SAFETY: all-zero is a valid `bpf_attr`.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing plain fields of the union's `test` member, the one BPF_PROG_RUN reads.
    let test = unsafe { &mut attr.test };
    test.prog_fd = program.as_raw_fd() as u32;
    test.data_in = frame.as_ptr() as u64;
    test.data_size_in = frame.len() as u32;
    test.ctx_in = (&raw const md) as u64;
    test.ctx_size_in = size_of::<XdpMd>() as u32;
    test.repeat = 1;
    test.flags = BPF_F_TEST_XDP_LIVE_FRAMES;
    test.batch_size = 1;
    // SAFETY: `attr` is a valid BPF_PROG_RUN request; the frame and context it points at
    // outlive the call, and the kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_PROG_TEST_RUN as libc::c_int,
            &raw mut attr,
            size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    // In live-frames mode the kernel reports no return value; an error is the only failure.
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_PROG_RUN with live frames");
    }
    Ok(())
}

/// Recomputes the TCP checksum in place; returns the offset of the IP header.
fn fix_tcp_checksum(frame: &mut [u8]) -> Result<usize> {
    let (ip_offset, checksum, tcp_offset) = tcp_checksum(frame)?;
    frame[tcp_offset + 16..tcp_offset + 18].copy_from_slice(&checksum.to_be_bytes());
    Ok(ip_offset)
}

/// The IP header's offset, the correct TCP checksum and the TCP header's offset.
fn tcp_checksum(frame: &[u8]) -> Result<(usize, u16, usize)> {
    let packet = SlicedPacket::from_ethernet(frame).context("parsing the held SYN")?;
    Ok(match (&packet.net, &packet.transport) {
        (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) => {
            let header = ip.header();
            let sum = tcp
                .calc_checksum_ipv4(header.source(), header.destination())
                .context("TCP checksum")?;
            (
                offset_in(frame, header.slice()),
                sum,
                offset_in(frame, tcp.slice()),
            )
        }
        (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Tcp(tcp))) => {
            let header = ip.header();
            let sum = tcp
                .calc_checksum_ipv6(header.source(), header.destination())
                .context("TCP checksum")?;
            (
                offset_in(frame, header.slice()),
                sum,
                offset_in(frame, tcp.slice()),
            )
        }
        _ => bail!("the held frame is not TCP over IPv4 or IPv6"),
    })
}

fn offset_in(outer: &[u8], inner: &[u8]) -> usize {
    inner.as_ptr() as usize - outer.as_ptr() as usize
}

fn destination(packet: &[u8]) -> Result<IpAddr> {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let octets: [u8; 4] = packet[16..20].try_into()?;
            Ok(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        Some(6) if packet.len() >= 40 => {
            let octets: [u8; 16] = packet[24..40].try_into()?;
            Ok(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => bail!("not an IP packet"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn syn_frame(v6: bool) -> Vec<u8> {
        let builder = PacketBuilder::ethernet2([2; 6], [4; 6]);
        let builder = if v6 {
            builder.ipv6([0xfd; 16], [0xfe; 16], 64)
        } else {
            builder.ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
        };
        let builder = builder.tcp(1025, 5000, 0x1234_5678, 64240).syn();
        let mut frame = Vec::new();
        builder.write(&mut frame, &[]).unwrap();
        frame
    }

    #[test]
    fn a_correct_checksum_stays_byte_identical() {
        for v6 in [false, true] {
            let original = syn_frame(v6);
            let mut fixed = original.clone();
            fix_tcp_checksum(&mut fixed).unwrap();
            assert_eq!(fixed, original);
        }
    }

    #[test]
    fn a_partial_checksum_is_completed() {
        for v6 in [false, true] {
            let original = syn_frame(v6);
            let tcp = if v6 { 14 + 40 } else { 14 + 20 };
            let mut partial = original.clone();
            partial[tcp + 16] ^= 0x5a;
            let ip_offset = fix_tcp_checksum(&mut partial).unwrap();
            assert_eq!(partial, original);
            assert_eq!(ip_offset, 14);
        }
    }

    #[test]
    fn destination_reads_both_families() {
        let v4 = syn_frame(false);
        assert_eq!(
            destination(&v4[14..]).unwrap(),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))
        );
        let v6 = syn_frame(true);
        assert_eq!(
            destination(&v6[14..]).unwrap(),
            IpAddr::V6(Ipv6Addr::from([0xfe; 16]))
        );
        assert!(destination(&[0x45]).is_err());
    }
}
