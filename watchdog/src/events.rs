//! The agent's end of the `EVENTS` ring buffer: decodes each [`StaleSynEvent`] the classifier
//! submitted into a [`StaleSyn`] with real socket addresses and the time it was read.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, bail};
use watchdog_common::{StaleSynEvent, classifier_action};

use crate::sock_diag::TcpTuple;

/// A stale SYN as the agent works with it.
#[derive(Debug, Clone)]
pub struct StaleSyn {
    pub raw: StaleSynEvent,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// `CLOCK_MONOTONIC` (ns) when the agent read the event.
    pub read_ns: u64,
}

impl StaleSyn {
    /// Decodes one ring-buffer record. A record of the wrong size means the agent and the
    /// object disagree on the layout; it is rejected, never guessed at.
    pub fn decode(bytes: &[u8], read_ns: u64) -> Result<Self> {
        if bytes.len() != size_of::<StaleSynEvent>() {
            bail!(
                "ring buffer record of {} bytes, expected {}: agent and eBPF object disagree",
                bytes.len(),
                size_of::<StaleSynEvent>()
            );
        }
        // SAFETY: the length matches and `StaleSynEvent` is plain data valid for any bytes.
        let raw = unsafe { bytes.as_ptr().cast::<StaleSynEvent>().read_unaligned() };
        let ip = |addr: [u8; 16]| -> IpAddr {
            let v6 = Ipv6Addr::from(addr);
            match (raw.ip_version, v6.to_ipv4_mapped()) {
                (4, Some(v4)) => IpAddr::V4(v4),
                (4, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                _ => IpAddr::V6(v6),
            }
        };
        Ok(StaleSyn {
            client: SocketAddr::new(ip(raw.client_addr), raw.client_port),
            server: SocketAddr::new(ip(raw.server_addr), raw.server_port),
            raw,
            read_ns,
        })
    }

    /// The stale socket, named from the server's side.
    pub fn stale_tuple(&self) -> TcpTuple {
        TcpTuple {
            local: self.server,
            remote: self.client,
            family: self.raw.stale_family,
        }
    }

    /// The SYN's Ethernet frame when the classifier held it for replay.
    pub fn held_frame(&self) -> Option<&[u8]> {
        (self.raw.classifier_action == classifier_action::HELD)
            .then(|| self.raw.packet.get(..usize::from(self.raw.packet_len)))
            .flatten()
    }

    /// From the SYN reaching the classifier to the agent reading its event.
    pub fn event_latency(&self) -> Duration {
        Duration::from_nanos(self.read_ns.saturating_sub(self.raw.seen_ns))
    }
}

/// `CLOCK_MONOTONIC` in ns: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Time since `CLOCK_MONOTONIC` `ns` (a kernel timestamp such as `seen_ns`).
pub fn since_monotonic(ns: u64) -> Duration {
    Duration::from_nanos(monotonic_ns().saturating_sub(ns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use watchdog_common::{family, ipv4_mapped};

    fn bytes_of(event: &StaleSynEvent) -> Vec<u8> {
        // SAFETY: plain data.
        unsafe {
            std::slice::from_raw_parts(
                (event as *const StaleSynEvent).cast::<u8>(),
                size_of::<StaleSynEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_ipv4_event_of_dual_stack_socket() {
        let mut event = StaleSynEvent::ZERO;
        event.client_addr = ipv4_mapped([10, 0, 0, 2]);
        event.server_addr = ipv4_mapped([10, 0, 0, 1]);
        event.client_port = 1025;
        event.server_port = 5000;
        event.ip_version = 4;
        event.stale_family = family::INET6;
        event.seen_ns = 1_000;
        let syn = StaleSyn::decode(&bytes_of(&event), 3_500).unwrap();
        assert_eq!(syn.client, "10.0.0.2:1025".parse().unwrap());
        assert_eq!(syn.server, "10.0.0.1:5000".parse().unwrap());
        assert_eq!(syn.stale_tuple().family, family::INET6);
        assert_eq!(syn.event_latency(), Duration::from_nanos(2_500));
    }

    #[test]
    fn rejects_records_of_the_wrong_size() {
        let event = StaleSynEvent::ZERO;
        let bytes = bytes_of(&event);
        assert!(StaleSyn::decode(&bytes[..40], 0).is_err());
    }
}
