//! One netlink request/answer channel to the kernel, for the agent's two netlink users:
//! sock_diag ([`crate::sock_diag`]: look-up, destroy) and rtnetlink ([`crate::clsact`]: the
//! pre-TCX filters). Messages are the rust-netlink crates' types; this module only numbers,
//! sends and receives them, with a bound on every wait so that a kernel hiccup cannot stall
//! the agent.
use std::{io, os::fd::AsRawFd, time::Duration};

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};

/// Upper bound on one request/answer exchange.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Channel {
    socket: Socket,
    seq: u32,
}

impl Channel {
    /// A socket of netlink `protocol` (e.g. `NETLINK_SOCK_DIAG`), connected to the kernel.
    pub fn open(protocol: isize) -> io::Result<Self> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        set_receive_timeout(&socket, REPLY_TIMEOUT)?;
        Ok(Channel { socket, seq: 0 })
    }

    /// Sends `message` with `flags`; returns its sequence number.
    pub fn send<M: NetlinkSerializable>(&mut self, message: M, flags: u16) -> io::Result<u32>
    where
        NetlinkPayload<M>: From<M>,
    {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        Ok(self.seq)
    }

    /// Every message of the next datagram that answers `seq` (a dump spans many datagrams).
    pub fn receive_all<M>(&mut self, seq: u32) -> io::Result<Vec<NetlinkPayload<M>>>
    where
        M: NetlinkDeserializable,
    {
        loop {
            let mut buf = vec![0u8; 65536];
            let len = self.socket.recv(&mut &mut buf[..], 0)?;
            let mut offset = 0;
            let mut out = Vec::new();
            while offset < len {
                let message = NetlinkMessage::<M>::deserialize(&buf[offset..len])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let advance = message.header.length as usize;
                if message.header.sequence_number == seq {
                    out.push(message.payload);
                }
                if advance == 0 {
                    break;
                }
                offset += advance;
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    /// The first message that answers `seq`.
    pub fn receive<M>(&mut self, seq: u32) -> io::Result<NetlinkPayload<M>>
    where
        M: NetlinkDeserializable,
    {
        let mut messages = self.receive_all(seq)?;
        Ok(messages.swap_remove(0))
    }

    /// Waits for the acknowledgement of `seq` (a request sent with `NLM_F_ACK`).
    pub fn acknowledged<M>(&mut self, seq: u32) -> io::Result<()>
    where
        M: NetlinkDeserializable,
    {
        loop {
            if let NetlinkPayload::Error(error) = self.receive::<M>(seq)? {
                return match error.code {
                    None => Ok(()),
                    Some(_) => Err(error.to_io()),
                };
            }
        }
    }
}

fn set_receive_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: valid fd and a correctly sized `timeval`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
