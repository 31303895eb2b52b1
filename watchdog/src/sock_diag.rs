//! A small sock_diag (NETLINK_SOCK_DIAG) client: look one TCP socket up by its exact tuple and
//! destroy it with SOCK_DESTROY, as `ss -K` does.
//!
//! Destroying is two requests. The first asks for the socket with the exact tuple and returns its
//! state and its cookie (the kernel's unique id for that socket); the second destroys *that
//! cookie*. The split matters: the kernel's exact lookup falls back to the listening socket when
//! no connection owns the tuple any more, and destroying a listener would take the legacy server
//! down. With the cookie, a socket that vanished in between yields an error instead.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result};
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
    message::SockDiagDestroy,
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use crate::netlink::Channel;

/// `INET_DIAG_NOCOOKIE`: match by tuple alone.
const NO_COOKIE: [u8; 8] = [0xff; 8];
/// The kernel's `TCP_ESTABLISHED`.
pub const TCP_ESTABLISHED: u8 = 1;
/// Offsets in `struct tcp_info`, stable kernel ABI: `tcpi_probes` (u8), `tcpi_unacked` (u32),
/// `tcpi_last_data_recv` (u32, ms).
const TCPI_PROBES_OFFSET: usize = 3;
const TCPI_UNACKED_OFFSET: usize = 24;
const TCPI_LAST_DATA_RECV_OFFSET: usize = 52;

/// One TCP socket named by its tuple from the server's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpTuple {
    /// The local (server) end.
    pub local: SocketAddr,
    /// The remote (client) end.
    pub remote: SocketAddr,
    /// `AF_INET` or `AF_INET6` of the socket itself; an IPv4 peer of a `[::]` listener lives
    /// in an `AF_INET6` socket with IPv4-mapped addresses.
    pub family: u8,
}

/// What the kernel reports about one socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketInfo {
    pub cookie: [u8; 8],
    pub state: u8,
    /// Time since the socket last received data, if the kernel reported `tcp_info`.
    pub idle: Option<Duration>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// One established connection as a dead-peer detector sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSample {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Keepalive (or zero-window) probes sent without answer (`tcpi_probes`).
    pub probes: u8,
    /// Segments sent and not yet acknowledged (`tcpi_unacked`).
    pub unacked: u32,
    /// Bytes written by the application and not yet acknowledged, sent or not (a closed
    /// receive window keeps them queued).
    pub send_queue: u32,
    pub idle: Option<Duration>,
}

/// The answer to the start-up SOCK_DESTROY probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestroyProbe {
    Supported,
    NotCompiledIn,
    NotPermitted,
}

pub struct SockDiag {
    channel: Channel,
}

impl SockDiag {
    pub fn open() -> Result<Self> {
        let channel = Channel::open(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
        Ok(SockDiag { channel })
    }

    /// Every ESTABLISHED TCP socket of this namespace whose local port is in `ports`, with the
    /// `tcp_info` fields that tell how a dead peer is being detected.
    pub fn established_on(&mut self, ports: &[u16]) -> io::Result<Vec<ConnectionSample>> {
        let mut out = Vec::new();
        for family in [AF_INET, AF_INET6] {
            let request = SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::INFO,
                states: StateFlags::ESTABLISHED,
                socket_id: if family == AF_INET {
                    SocketId::new_v4()
                } else {
                    SocketId::new_v6()
                },
            });
            let seq = self.channel.send(request, NLM_F_REQUEST | NLM_F_DUMP)?;
            'dump: loop {
                for payload in self.channel.receive_all::<SockDiagMessage>(seq)? {
                    match payload {
                        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                            let id = &r.header.socket_id;
                            if !ports.contains(&id.source_port) {
                                continue;
                            }
                            let info = r.nlas.iter().find_map(|nla| match nla {
                                Nla::TcpInfo(bytes) => Some(bytes.as_slice()),
                                _ => None,
                            });
                            out.push(ConnectionSample {
                                local: unmap(SocketAddr::new(id.source_address, id.source_port)),
                                remote: unmap(SocketAddr::new(
                                    id.destination_address,
                                    id.destination_port,
                                )),
                                probes: info
                                    .and_then(|i| i.get(TCPI_PROBES_OFFSET).copied())
                                    .unwrap_or(0),
                                unacked: info
                                    .and_then(|i| u32_at(i, TCPI_UNACKED_OFFSET))
                                    .unwrap_or(0),
                                send_queue: r.header.send_queue,
                                idle: info.and_then(last_data_recv),
                            });
                        }
                        NetlinkPayload::Done(_) => break 'dump,
                        NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                        _ => {}
                    }
                }
            }
        }
        Ok(out)
    }

    /// The socket that owns exactly `tuple`, if any (listeners are returned too: check `state`).
    pub fn find(&mut self, tuple: &TcpTuple) -> io::Result<Option<SocketInfo>> {
        let request = SockDiagMessage::InetRequest(inet_request(tuple, NO_COOKIE));
        let seq = self.channel.send(request, NLM_F_REQUEST)?;
        loop {
            let reply = self.channel.receive::<SockDiagMessage>(seq)?;
            match reply {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let idle = response.nlas.iter().find_map(|nla| match nla {
                        Nla::TcpInfo(bytes) => last_data_recv(bytes),
                        _ => None,
                    });
                    let id = &response.header.socket_id;
                    return Ok(Some(SocketInfo {
                        cookie: id.cookie,
                        state: response.header.state,
                        idle,
                        local: SocketAddr::new(id.source_address, id.source_port),
                        remote: SocketAddr::new(id.destination_address, id.destination_port),
                    }));
                }
                NetlinkPayload::Error(error) if error.raw_code() == -libc::ENOENT => {
                    return Ok(None);
                }
                NetlinkPayload::Error(error) if error.code.is_some() => return Err(error.to_io()),
                _ => continue,
            }
        }
    }

    /// Destroys the socket with `tuple` and `cookie` (from [`SockDiag::find`]).
    pub fn destroy(&mut self, tuple: &TcpTuple, cookie: [u8; 8]) -> io::Result<()> {
        let request =
            SockDiagDestroy::new(SockDiagMessage::InetRequest(inet_request(tuple, cookie)));
        let seq = self.channel.send(request, NLM_F_REQUEST | NLM_F_ACK)?;
        self.channel.acknowledged::<SockDiagMessage>(seq)
    }

    /// Asks to destroy a socket that cannot exist (0.0.0.0:0 ↔ 0.0.0.0:0): ENOENT means the
    /// kernel would have destroyed it.
    pub fn probe_destroy(&mut self) -> Result<DestroyProbe> {
        let nothing = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
        let tuple = TcpTuple {
            local: nothing,
            remote: nothing,
            family: AF_INET,
        };
        match self.destroy(&tuple, NO_COOKIE) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(DestroyProbe::Supported),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(DestroyProbe::NotCompiledIn),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(DestroyProbe::NotPermitted),
            Err(e) => Err(e).context("probing SOCK_DESTROY"),
            Ok(()) => Ok(DestroyProbe::Supported),
        }
    }
}

fn inet_request(tuple: &TcpTuple, cookie: [u8; 8]) -> InetRequest {
    let as_family = |addr: IpAddr| match (tuple.family, addr) {
        (AF_INET6, IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
        _ => addr,
    };
    InetRequest {
        family: tuple.family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::INFO,
        states: StateFlags::all(),
        socket_id: SocketId {
            source_port: tuple.local.port(),
            destination_port: tuple.remote.port(),
            source_address: as_family(tuple.local.ip()),
            destination_address: as_family(tuple.remote.ip()),
            interface_id: 0,
            cookie,
        },
    }
}

/// Reports IPv4-mapped IPv6 addresses as the IPv4 addresses they are.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

fn last_data_recv(tcp_info: &[u8]) -> Option<Duration> {
    let ms = u32_at(tcp_info, TCPI_LAST_DATA_RECV_OFFSET)?;
    Some(Duration::from_millis(u64::from(ms)))
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let bytes = bytes.get(offset..offset + 4)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    #[test]
    fn ipv4_peer_of_dual_stack_socket_is_asked_for_in_mapped_form() {
        let tuple = TcpTuple {
            local: "10.0.0.1:5000".parse().unwrap(),
            remote: "10.0.0.2:1025".parse().unwrap(),
            family: AF_INET6,
        };
        let request = inet_request(&tuple, NO_COOKIE);
        assert_eq!(request.family, AF_INET6);
        assert_eq!(
            request.socket_id.destination_address,
            "::ffff:10.0.0.2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(request.socket_id.source_port, 5000);
        assert_eq!(request.socket_id.destination_port, 1025);
    }

    #[test]
    fn mapped_addresses_unmap_to_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.0.0.2]:1025".parse().unwrap();
        assert_eq!(unmap(mapped), "10.0.0.2:1025".parse().unwrap());
        let v6: SocketAddr = "[fd00::2]:1025".parse().unwrap();
        assert_eq!(unmap(v6), v6);
    }

    #[test]
    fn last_data_recv_reads_the_abi_offset() {
        let mut info = vec![0u8; 104];
        info[52..56].copy_from_slice(&1234u32.to_ne_bytes());
        assert_eq!(last_data_recv(&info), Some(Duration::from_millis(1234)));
        assert_eq!(last_data_recv(&info[..40]), None);
    }
}
