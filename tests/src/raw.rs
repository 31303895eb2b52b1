//! Capture a connection's original SYN frame and replay it byte for byte.
//!
//! An old duplicate of a healthy connection's first SYN (same 4-tuple, same initial sequence
//! number) also hits an ESTABLISHED socket; the watchdog must tell it from a rebooted client's
//! SYN and leave the connection alone. Replaying the exact captured frame is the honest way to
//! produce such a duplicate.

use std::mem::{MaybeUninit, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::{current_ifindex, run_in_ns};
use crate::wait::wait_for;

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The parts of a TCP SYN frame the tests look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynInfo {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The initial sequence number.
    pub seq: u32,
}

/// A captured frame and when it was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedFrame {
    pub at: Instant,
    /// The full Ethernet frame, checksums completed (see [`fix_checksums`]).
    pub bytes: Vec<u8>,
}

struct Shared {
    frames: Mutex<Vec<CapturedFrame>>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn frames(&self) -> MutexGuard<'_, Vec<CapturedFrame>> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Records the outgoing TCP SYN (without ACK) frames of one interface, until dropped.
pub struct SynCapture {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl SynCapture {
    /// Opens an `AF_PACKET` socket on `iface` in namespace `ns`. Frames sent after this returns
    /// are captured.
    pub fn start(ns: &str, iface: &str) -> Result<SynCapture> {
        let name = iface.to_owned();
        let (fd, ifindex) = run_in_ns(ns, move || {
            let ifindex = ifindex(&name)?;
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2); the fd is owned right away.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            if raw < 0 {
                return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
            }
            // SAFETY: `raw` is a fresh, valid fd nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let addr = sockaddr_ll(ifindex, proto, None);
            // SAFETY: `addr` is a valid sockaddr_ll of the given size.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("binding AF_PACKET socket to {name}"));
            }
            Ok((fd, ifindex))
        })?;
        let shared = Arc::new(Shared {
            frames: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name(format!("syn-capture-{iface}"))
            .spawn(move || capture_loop(&fd, ifindex, &thread_shared))
            .context("spawning capture thread")?;
        Ok(SynCapture {
            shared,
            thread: Some(thread),
        })
    }

    /// All captured SYN frames so far, in order.
    pub fn syns(&self) -> Vec<CapturedFrame> {
        self.shared.frames().clone()
    }

    /// The first captured SYN to destination `port`, as a full Ethernet frame.
    pub fn first_syn_to(&self, port: u16) -> Option<Vec<u8>> {
        self.shared
            .frames()
            .iter()
            .find(|f| parse_syn(&f.bytes).is_some_and(|s| s.dst.port() == port))
            .map(|f| f.bytes.clone())
    }

    /// Like [`Self::first_syn_to`] but waits up to `timeout` for it.
    pub fn wait_syn_to(&self, port: u16, timeout: Duration) -> Result<Vec<u8>> {
        self.wait_syn(|s| s.dst.port() == port, timeout)
            .with_context(|| format!("waiting for a SYN to port {port}"))
    }

    /// Waits up to `timeout` for the first captured SYN for which `want` holds.
    pub fn wait_syn(&self, want: impl Fn(&SynInfo) -> bool, timeout: Duration) -> Result<Vec<u8>> {
        let shared = &self.shared;
        wait_for(&shared.frames, &shared.changed, timeout, |frames| {
            frames
                .iter()
                .find(|f| parse_syn(&f.bytes).is_some_and(|s| want(&s)))
                .map(|f| f.bytes.clone())
        })
        .with_context(|| {
            let seen: Vec<_> = shared
                .frames()
                .iter()
                .filter_map(|f| parse_syn(&f.bytes))
                .collect();
            format!("no matching outgoing SYN captured within {timeout:?}; captured: {seen:?}")
        })
    }
}

impl Drop for SynCapture {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn capture_loop(fd: &OwnedFd, ifindex: i32, shared: &Shared) {
    let mut buf = vec![0u8; 65536];
    while !shared.stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
            continue;
        }
        let mut from = MaybeUninit::<libc::sockaddr_ll>::zeroed();
        let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buffer and address are valid for the given lengths.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                from.as_mut_ptr().cast(),
                &mut from_len,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            continue;
        };
        // SAFETY: zero-initialised and (partly) filled in by the kernel.
        let from = unsafe { from.assume_init() };
        if from.sll_ifindex != ifindex || from.sll_pkttype != libc::PACKET_OUTGOING {
            continue;
        }
        let at = Instant::now();
        let mut frame = buf[..n].to_vec();
        if parse_syn(&frame).is_none() {
            continue;
        }
        fix_checksums(&mut frame);
        shared.frames().push(CapturedFrame { at, bytes: frame });
        shared.changed.notify_all();
    }
}

/// Sends `frame` as is out of `iface` in namespace `ns`, like a NIC would.
pub fn send_frame(ns: &str, iface: &str, frame: &[u8]) -> Result<()> {
    if frame.len() < ETH_HLEN {
        bail!(
            "frame of {} bytes is shorter than an Ethernet header",
            frame.len()
        );
    }
    let name = iface.to_owned();
    let frame = frame.to_vec();
    run_in_ns(ns, move || {
        let ifindex = ifindex(&name)?;
        // Protocol 0: a send-only socket that receives nothing.
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
        }
        // SAFETY: `raw` is a fresh, valid fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]).to_be();
        let addr = sockaddr_ll(ifindex, ethertype, Some(dst));
        // SAFETY: valid buffer and sockaddr_ll for the given lengths.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sending a {}-byte frame on {name}", frame.len()));
        }
        Ok(())
    })
}

fn ifindex(name: &str) -> Result<i32> {
    i32::try_from(current_ifindex(name)?).context("ifindex out of range")
}

/// `protocol` is in network byte order already.
fn sockaddr_ll(ifindex: i32, protocol: u16, dst: Option<[u8; 6]>) -> libc::sockaddr_ll {
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = ifindex;
    if let Some(mac) = dst {
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&mac);
    }
    addr
}

/// Offsets of the IP and TCP headers and the TCP segment length in an Ethernet frame.
struct Layout {
    ip: usize,
    tcp: usize,
    tcp_len: usize,
    v6: bool,
}

fn layout(frame: &[u8]) -> Option<Layout> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = ETH_HLEN;
    let (tcp, end, v6) = match ethertype {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(frame.get(ip)? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([
                *frame.get(ip + 2)?,
                *frame.get(ip + 3)?,
            ]));
            if *frame.get(ip + 9)? != IPPROTO_TCP || ihl < 20 {
                return None;
            }
            (ip + ihl, ip + total, false)
        }
        ETHERTYPE_IPV6 => {
            let payload = usize::from(u16::from_be_bytes([
                *frame.get(ip + 4)?,
                *frame.get(ip + 5)?,
            ]));
            // No extension headers in our own traffic.
            if *frame.get(ip + 6)? != IPPROTO_TCP {
                return None;
            }
            (ip + 40, ip + 40 + payload, true)
        }
        _ => return None,
    };
    if end > frame.len() || end < tcp + 20 {
        return None;
    }
    Some(Layout {
        ip,
        tcp,
        tcp_len: end - tcp,
        v6,
    })
}

/// Parses a TCP SYN without ACK; `None` for anything else.
pub fn parse_syn(frame: &[u8]) -> Option<SynInfo> {
    let l = layout(frame)?;
    let flags = frame[l.tcp + 13];
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return None;
    }
    let (src_ip, dst_ip): (IpAddr, IpAddr) = if l.v6 {
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s.copy_from_slice(&frame[l.ip + 8..l.ip + 24]);
        d.copy_from_slice(&frame[l.ip + 24..l.ip + 40]);
        (Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into())
    } else {
        let s: [u8; 4] = frame[l.ip + 12..l.ip + 16].try_into().ok()?;
        let d: [u8; 4] = frame[l.ip + 16..l.ip + 20].try_into().ok()?;
        (Ipv4Addr::from(s).into(), Ipv4Addr::from(d).into())
    };
    let t = l.tcp;
    Some(SynInfo {
        src: SocketAddr::new(src_ip, u16::from_be_bytes([frame[t], frame[t + 1]])),
        dst: SocketAddr::new(dst_ip, u16::from_be_bytes([frame[t + 2], frame[t + 3]])),
        seq: u32::from_be_bytes([frame[t + 4], frame[t + 5], frame[t + 6], frame[t + 7]]),
    })
}

/// Fills in the IPv4 header and TCP checksums.
///
/// veth offloads checksums: a captured outgoing frame may carry only the pseudo-header sum
/// (`CHECKSUM_PARTIAL`). What went over a real wire had the full checksum, so that is what an
/// old duplicate must carry; for an already valid frame this changes nothing.
pub fn fix_checksums(frame: &mut [u8]) {
    let Some(l) = layout(frame) else {
        return;
    };
    let mut sum: u32 = 0;
    if l.v6 {
        sum += ones_sum(&frame[l.ip + 8..l.ip + 40]);
    } else {
        let ihl = l.tcp - l.ip;
        frame[l.ip + 10] = 0;
        frame[l.ip + 11] = 0;
        let ip_sum = fold(ones_sum(&frame[l.ip..l.ip + ihl]));
        frame[l.ip + 10..l.ip + 12].copy_from_slice(&(!ip_sum).to_be_bytes());
        sum += ones_sum(&frame[l.ip + 12..l.ip + 20]);
    }
    // Pseudo header: addresses (above), protocol and TCP length.
    sum += u32::from(IPPROTO_TCP);
    sum += (l.tcp_len as u32) & 0xffff;
    sum += (l.tcp_len as u32) >> 16;
    frame[l.tcp + 16] = 0;
    frame[l.tcp + 17] = 0;
    sum += ones_sum(&frame[l.tcp..l.tcp + l.tcp_len]);
    let tcp_sum = !fold(sum);
    frame[l.tcp + 16..l.tcp + 18].copy_from_slice(&tcp_sum.to_be_bytes());
}

fn ones_sum(bytes: &[u8]) -> u32 {
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

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real IPv4 SYN (10.0.0.2:1025 -> 10.0.0.1:5000) with correct checksums.
    fn sample_v4_syn() -> Vec<u8> {
        let mut f = vec![0u8; ETH_HLEN + 20 + 20];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip = ETH_HLEN;
        f[ip] = 0x45;
        f[ip + 2..ip + 4].copy_from_slice(&40u16.to_be_bytes());
        f[ip + 8] = 64;
        f[ip + 9] = IPPROTO_TCP;
        f[ip + 12..ip + 16].copy_from_slice(&[10, 0, 0, 2]);
        f[ip + 16..ip + 20].copy_from_slice(&[10, 0, 0, 1]);
        let t = ip + 20;
        f[t..t + 2].copy_from_slice(&1025u16.to_be_bytes());
        f[t + 2..t + 4].copy_from_slice(&5000u16.to_be_bytes());
        f[t + 4..t + 8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        f[t + 12] = 5 << 4;
        f[t + 13] = TCP_SYN;
        f[t + 14..t + 16].copy_from_slice(&64240u16.to_be_bytes());
        fix_checksums(&mut f);
        f
    }

    #[test]
    fn parses_syn_and_rejects_syn_ack() {
        let mut f = sample_v4_syn();
        let s = parse_syn(&f).expect("a SYN");
        assert_eq!(s.src, "10.0.0.2:1025".parse().expect("addr"));
        assert_eq!(s.dst, "10.0.0.1:5000".parse().expect("addr"));
        assert_eq!(s.seq, 0x1234_5678);
        f[ETH_HLEN + 20 + 13] = TCP_SYN | TCP_ACK;
        assert!(parse_syn(&f).is_none());
    }

    #[test]
    fn checksums_verify_to_zero_and_are_idempotent() {
        let f = sample_v4_syn();
        // A correct header and segment sum (with the pseudo header) to 0xffff.
        assert_eq!(fold(ones_sum(&f[ETH_HLEN..ETH_HLEN + 20])), 0xffff);
        let mut pseudo = ones_sum(&f[ETH_HLEN + 12..ETH_HLEN + 20]);
        pseudo += u32::from(IPPROTO_TCP) + 20;
        assert_eq!(fold(pseudo + ones_sum(&f[ETH_HLEN + 20..])), 0xffff);
        let mut again = f.clone();
        fix_checksums(&mut again);
        assert_eq!(again, f);
    }
}
