//! A second legacy client: a real embedded TCP/IP stack (smoltcp) on a TAP device in the client
//! namespace, reconnecting from a fixed port after a power cut.
//!
//! # Why a second client
//!
//! [`crate::dumb_client`] is a Linux socket made dumb with nftables rules. A watchdog tuned
//! against one simulated client may only work for that simulation, so this one is an independent
//! stack with its own TCP state machine, timers, ISN generator and ARP: [smoltcp], the embedded
//! stack many small devices actually run. Nothing is filtered; what it does on the wire is what
//! smoltcp does.
//!
//! # Topology
//!
//! ```text
//!  server ns                          client ns
//!  10.248.N.1 wdsN ══ veth ══ wdcN ─┐
//!  (LegacyServer, agent)            ├─ wdbN (Linux bridge, no IP) ── wdtN (TAP) ── smoltcp
//!                                   ┘                                 10.248.N.3, own MAC
//! ```
//!
//! The client veth loses its addresses and becomes a bridge port, so the client namespace's Linux
//! stack owns no address in the bed's subnet and never answers for smoltcp (IPv6 is switched off
//! there as well, so no router solicitations or MLD reports reach the TAP). smoltcp answers ARP
//! for its own address and resolves the server's MAC itself. The server side is unchanged.
//!
//! The TAP is created by `TUNSETIFF` from a thread that first joined the client namespace (a TAP
//! is born in the namespace of whoever creates it) and only ever used on that thread: smoltcp's
//! `TunTapInterface` is not `Send`. The thread runs smoltcp's poll loop and takes commands over a
//! channel. Closing the TAP's fd when the thread ends removes the device.
//!
//! # The power cut
//!
//! [`EmbeddedClient::crash`] throws away the smoltcp `Interface` and `SocketSet` without polling
//! them again: no FIN, no RST, nothing. The TAP stays (it is the device's network port, not its
//! RAM). [`EmbeddedClient::reconnect`] then boots a brand-new `Interface` with a fresh random
//! seed (smoltcp's documentation: the seed should differ on each boot "to avoid problems with TCP
//! port/sequence collisions"), so the new SYN carries a new random ISN, like a rebooted device;
//! the MAC stays the same.
//!
//! # What smoltcp does with the server's challenge ACK (smoltcp 0.14.0, `src/socket/tcp.rs`)
//!
//! In `Socket::process`, the arm `(State::SynSent, TcpControl::None, Some(ack_number))`: an ACK
//! that does not acknowledge its SYN (`ack_number != local_seq_no + 1`) is answered with
//! `rst_reply`, "expecting a SYN|ACK, received an ACK with the wrong ack_number, sending RST".
//! `rst_reply` puts the offending segment's acknowledgment number into the RST's sequence number
//! (no ACK flag). The server's RFC 5961 challenge ACK carries the stale socket's `rcv_nxt` as its
//! acknowledgment number, so smoltcp's RST has *exactly* `rcv_nxt` as its sequence number, the one
//! RST Linux accepts without a further challenge (`tcp_validate_incoming`): the stale socket is
//! reset (its reader sees `ECONNRESET`). The socket stays in SYN-SENT and re-sends its SYN only
//! when its retransmission timer fires (initial RTO 1 s, `RTTE_INITIAL_RTO`), unlike Linux, which
//! re-sends after `TCP_TIMEOUT_MIN`. So smoltcp is a *cooperating* client that recovers on its
//! own in about one second; the watchdog (replay mode) gets it in on its first SYN.
//! An RST|ACK in SYN-SENT that does not acknowledge its SYN (what the watchdog's `SOCK_DESTROY`
//! sends to the old tuple) is ignored ("unacceptable RST|ACK in response to initial SYN").
//!
//! Every TCP segment of the fixed port crossing the TAP is recorded ([`Segment`]), so each
//! reconnect comes with its wire trace and counts of SYNs and RSTs sent.
//!
//! [smoltcp]: https://github.com/smoltcp-rs/smoltcp

use std::cell::RefCell;
use std::fmt;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium, TunTapInterface};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use crate::netns::{TestNet, ns_exec};

/// Where `ip netns add` bind-mounts the namespace files (see `netns.rs`).
const NETNS_DIR: &str = "/var/run/netns";
/// smoltcp's host number in the bed's subnet: `10.248.N.3` (the server is .1, Linux's client .2).
pub const EMBEDDED_HOST: u8 = 3;
/// Longest the poll thread sleeps before it looks at its command channel again.
const IDLE_TICK: Duration = Duration::from_millis(5);
/// Socket buffer sizes: a small device.
const BUFFER: usize = 8 * 1024;
/// How much longer than a command's own deadline the caller waits for the thread's answer.
const REPLY_GRACE: Duration = Duration::from_secs(5);

/// Which way a segment crossed the TAP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Sent by smoltcp.
    Out,
    /// Received by smoltcp (the server's segments).
    In,
}

/// One TCP segment of the fixed port, as it crossed the TAP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub at: Instant,
    pub dir: Direction,
    /// The TCP flag bits (`Segment::SYN` etc.).
    pub flags: u8,
    pub seq: u32,
    /// The acknowledgment number field (meaningful only with `ACK`).
    pub ack: u32,
    /// TCP payload bytes.
    pub payload: usize,
}

impl Segment {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// A connection request: SYN without ACK.
    pub fn is_syn(&self) -> bool {
        self.has(Self::SYN) && !self.has(Self::ACK)
    }

    /// SYN with ACK: the listener's answer.
    pub fn is_syn_ack(&self) -> bool {
        self.has(Self::SYN) && self.has(Self::ACK)
    }

    /// Any segment with RST (with or without ACK).
    pub fn is_rst(&self) -> bool {
        self.has(Self::RST)
    }

    /// An ACK without SYN, RST, FIN or payload: what a challenge ACK looks like.
    pub fn is_pure_ack(&self) -> bool {
        self.has(Self::ACK)
            && !self.has(Self::SYN)
            && !self.has(Self::RST)
            && !self.has(Self::FIN)
            && self.payload == 0
    }

    fn flag_names(&self) -> String {
        let names: Vec<&str> = [
            (Self::SYN, "SYN"),
            (Self::RST, "RST"),
            (Self::FIN, "FIN"),
            (Self::PSH, "PSH"),
            (Self::ACK, "ACK"),
        ]
        .into_iter()
        .filter(|(bit, _)| self.has(*bit))
        .map(|(_, name)| name)
        .collect();
        names.join("|")
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = match self.dir {
            Direction::Out => "smoltcp -> server",
            Direction::In => "server -> smoltcp",
        };
        write!(f, "{dir} {:<11} seq={}", self.flag_names(), self.seq)?;
        if self.has(Self::ACK) {
            write!(f, " ack={}", self.ack)?;
        }
        write!(f, " len={}", self.payload)
    }
}

/// What one [`EmbeddedClient::reconnect`] did before its deadline.
#[derive(Clone, Debug)]
pub struct EmbeddedReconnect {
    /// When the fresh stack was asked to connect (its ARP and SYN follow).
    pub started: Instant,
    /// The handshake completed (smoltcp's socket reached ESTABLISHED) before the deadline.
    pub connected: bool,
    /// From `started` to ESTABLISHED, or to the deadline.
    pub elapsed: Duration,
    /// SYNs (without ACK) that left the TAP: 1 means the first SYN got in.
    pub syns_sent: usize,
    /// RSTs that left the TAP (smoltcp's answers to unacceptable segments).
    pub rsts_sent: usize,
    /// Pure ACKs received before the SYN-ACK: the server's challenge ACKs as the client saw them.
    pub acks_received: usize,
    /// RSTs received (e.g. the one `SOCK_DESTROY` sends to the old tuple).
    pub rsts_received: usize,
    /// The new instance's initial sequence number (from its first SYN).
    pub isn: Option<u32>,
    /// smoltcp's TCP state at the end (`ESTABLISHED`, `SYN-SENT`, ...).
    pub state: String,
    /// Every segment of the fixed port during the reconnect, in order.
    pub segments: Vec<Segment>,
}

impl EmbeddedReconnect {
    /// The wire trace, one segment a line, with times relative to `started`.
    pub fn trace(&self) -> String {
        self.segments
            .iter()
            .map(|s| {
                let at = s.at.saturating_duration_since(self.started);
                format!("  +{:>9.3} ms  {s}", at.as_secs_f64() * 1e3)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A smoltcp device on a TAP in the client namespace that connects from a fixed port to one
/// server. Stops its thread (and so removes the TAP) on drop.
pub struct EmbeddedClient {
    local: SocketAddr,
    server: SocketAddr,
    mac: [u8; 6],
    commands: Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for EmbeddedClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedClient")
            .field("local", &self.local)
            .field("server", &self.server)
            .field("mac", &EthernetAddress(self.mac))
            .finish_non_exhaustive()
    }
}

/// What the poll thread is asked to do. Each carries the channel its answer goes back on.
enum Command {
    Connect {
        timeout: Duration,
        reply: Sender<Result<Duration>>,
    },
    Send {
        bytes: Vec<u8>,
        timeout: Duration,
        reply: Sender<Result<()>>,
    },
    Crash {
        reply: Sender<Result<()>>,
    },
    Reconnect {
        deadline: Duration,
        reply: Sender<Result<EmbeddedReconnect>>,
    },
    Quit,
}

impl EmbeddedClient {
    /// smoltcp's address in `net`: `10.248.N.3`.
    pub fn address(net: &TestNet) -> Ipv4Addr {
        Ipv4Addr::new(10, 248, net.index(), EMBEDDED_HOST)
    }

    /// Creates the TAP `wdtN` in `net`'s client namespace, bridges it with the client veth
    /// (bridge `wdbN`, which takes the veth's addresses away), and starts the poll thread. The
    /// device is powered off until [`EmbeddedClient::connect`] or
    /// [`EmbeddedClient::reconnect`]. IPv4 only.
    pub fn start(net: &TestNet, server: SocketAddr, local_port: u16) -> Result<EmbeddedClient> {
        let SocketAddr::V4(server_v4) = server else {
            bail!("the embedded client speaks IPv4 only, not {server}");
        };
        ensure!(local_port != 0, "the embedded client needs a fixed port");
        let n = net.index();
        let ip = EmbeddedClient::address(net);
        // Locally administered, unicast, and readable: 02:77:64:00:N:03.
        let mac = [0x02, 0x77, 0x64, 0x00, n, EMBEDDED_HOST];
        let tap = format!("wdt{n}");
        let bridge = format!("wdb{n}");
        let ns = net.client_ns().to_owned();

        let ns_path = Path::new(NETNS_DIR).join(&ns);
        let ns_file =
            File::open(&ns_path).with_context(|| format!("opening {}", ns_path.display()))?;
        let (commands, inbox) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let settings = Settings {
            mac,
            ip,
            server: *server_v4.ip(),
            server_port: server_v4.port(),
            local_port,
        };
        let tap_name = tap.clone();
        let thread = thread::Builder::new()
            .name(format!("smoltcp-{tap}"))
            .spawn(move || device_thread(ns_file, &tap_name, settings, &ready_tx, &inbox))
            .context("spawning the smoltcp thread")?;
        // From here on, Drop stops the thread whatever fails.
        let client = EmbeddedClient {
            local: SocketAddr::new(ip.into(), local_port),
            server,
            mac,
            commands,
            thread: Some(thread),
        };
        ready_rx
            .recv_timeout(REPLY_GRACE)
            .map_err(|_| anyhow!("the smoltcp thread did not report its TAP"))?
            .with_context(|| format!("creating TAP {tap} in {ns}"))?;
        link_up(&ns, net.client_iface(), &tap, &bridge)
            .with_context(|| format!("bridging {tap} with {} in {ns}", net.client_iface()))?;
        Ok(client)
    }

    /// The client's `ip:port` (`10.248.N.3:<fixed port>`), as the server and the agent see it.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The server it connects to.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Powers the device on if it is off and connects from the fixed port, waiting up to
    /// `timeout` for ESTABLISHED. Returns how long the handshake (with ARP) took.
    pub fn connect(&self, timeout: Duration) -> Result<Duration> {
        self.request(timeout, |reply| Command::Connect { timeout, reply })
    }

    /// Sends `bytes` and waits until the server has acknowledged all of them.
    pub fn send(&self, bytes: &[u8]) -> Result<()> {
        let timeout = Duration::from_secs(2);
        let bytes = bytes.to_vec();
        self.request(timeout, |reply| Command::Send {
            bytes,
            timeout,
            reply,
        })
    }

    /// The power cut: the stack's interface and sockets are thrown away without another poll, so
    /// nothing (no FIN, no RST) reaches the server. Frames arriving meanwhile are read off the
    /// TAP and ignored. A device already off stays off.
    pub fn crash(&self) -> Result<()> {
        self.request(Duration::ZERO, |reply| Command::Crash { reply })
    }

    /// The rebooted device: a brand-new stack (new random seed, so a new ISN; same MAC) connects
    /// from the fixed port and retries on smoltcp's own timers until ESTABLISHED or `deadline`.
    /// A device still on is crashed first. Not connecting is an outcome, not an error.
    pub fn reconnect(&self, deadline: Duration) -> Result<EmbeddedReconnect> {
        self.request(deadline, |reply| Command::Reconnect { deadline, reply })
    }

    /// Sends a command and waits for the answer (the command's own time plus a grace period).
    fn request<T>(
        &self,
        takes: Duration,
        make: impl FnOnce(Sender<Result<T>>) -> Command,
    ) -> Result<T> {
        let (reply, answer) = mpsc::channel();
        self.commands
            .send(make(reply))
            .map_err(|_| anyhow!("the smoltcp thread is gone"))?;
        match answer.recv_timeout(takes + REPLY_GRACE) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => bail!("the smoltcp thread did not answer"),
            Err(RecvTimeoutError::Disconnected) => {
                bail!("the smoltcp thread died (it panics on TAP I/O errors)")
            }
        }
    }
}

impl Drop for EmbeddedClient {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Quit);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("warning: the smoltcp thread panicked");
        }
    }
}

/// Turns IPv6 off in the client namespace, strips the client veth of its addresses, and joins it
/// and the TAP in a bridge without STP (ports forward as soon as they are up).
fn link_up(ns: &str, veth: &str, tap: &str, bridge: &str) -> Result<()> {
    ns_exec(
        ns,
        "sysctl",
        &[
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ],
    )?;
    let ip = |args: &[&str]| ns_exec(ns, "ip", args);
    ip(&["addr", "flush", "dev", veth])?;
    ip(&["link", "add", bridge, "type", "bridge", "stp_state", "0"])?;
    ip(&["link", "set", veth, "master", bridge])?;
    ip(&["link", "set", tap, "master", bridge])?;
    ip(&["link", "set", tap, "up"])?;
    ip(&["link", "set", bridge, "up"])?;
    Ok(())
}

/// What the device is: its addresses and the one server it talks to.
#[derive(Clone, Copy)]
struct Settings {
    mac: [u8; 6],
    ip: Ipv4Addr,
    server: Ipv4Addr,
    server_port: u16,
    local_port: u16,
}

/// The poll thread: joins the client namespace, creates the TAP, reports, then serves commands.
fn device_thread(
    ns_file: File,
    tap: &str,
    settings: Settings,
    ready: &Sender<Result<()>>,
    inbox: &Receiver<Command>,
) {
    // SAFETY: plain syscall on an fd we own for the duration of the call.
    if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let _ = ready
            .send(Err(std::io::Error::last_os_error()).context("setns into the client namespace"));
        return;
    }
    drop(ns_file);
    let device = match TunTapInterface::new(tap, Medium::Ethernet) {
        Ok(device) => device,
        Err(e) => {
            let _ = ready.send(Err(e).context("TUNSETIFF on /dev/net/tun"));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut node = Node {
        device: Wire::new(device, settings.local_port),
        settings,
        stack: None,
    };
    node.serve(inbox);
}

/// One boot of the device: smoltcp's whole state. Dropping it is the power cut.
struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    tcp: SocketHandle,
}

impl Stack {
    fn tcp(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.tcp)
    }
}

/// The device: its network port (the TAP, which outlives reboots) and, while on, its stack.
struct Node {
    device: Wire<TunTapInterface>,
    settings: Settings,
    stack: Option<Stack>,
}

impl Node {
    fn serve(&mut self, inbox: &Receiver<Command>) {
        loop {
            match inbox.try_recv() {
                Ok(Command::Quit) | Err(TryRecvError::Disconnected) => return,
                Ok(command) => self.handle(command),
                Err(TryRecvError::Empty) => {}
            }
            self.poll();
            self.wait(IDLE_TICK);
        }
    }

    fn handle(&mut self, command: Command) {
        // A caller that gave up has dropped its receiver; nothing to do about that.
        match command {
            Command::Connect { timeout, reply } => {
                let _ = reply.send(self.connect(timeout));
            }
            Command::Send {
                bytes,
                timeout,
                reply,
            } => {
                let _ = reply.send(self.send(&bytes, timeout));
            }
            Command::Crash { reply } => {
                self.stack = None;
                let _ = reply.send(Ok(()));
            }
            Command::Reconnect { deadline, reply } => {
                self.stack = None;
                let _ = reply.send(Ok(self.boot_and_connect(deadline)));
            }
            Command::Quit => {}
        }
    }

    fn connect(&mut self, timeout: Duration) -> Result<Duration> {
        if let Some(stack) = self.stack.as_mut() {
            let state = stack.tcp().state();
            ensure!(
                state == tcp::State::Closed,
                "the device is already connecting or connected ({state})"
            );
            self.stack = None;
        }
        let out = self.boot_and_connect(timeout);
        ensure!(
            out.connected,
            "smoltcp did not connect within {timeout:?} (state {}); wire:\n{}",
            out.state,
            out.trace()
        );
        Ok(out.elapsed)
    }

    /// Boots a fresh stack, connects, and polls until ESTABLISHED, CLOSED or the deadline.
    fn boot_and_connect(&mut self, deadline: Duration) -> EmbeddedReconnect {
        let mark = self.device.log.borrow().len();
        let stack = self.stack.insert(boot(&mut self.device, self.settings));
        let s = self.settings;
        let started = Instant::now();
        let socket = stack.sockets.get_mut::<tcp::Socket>(stack.tcp);
        let error = socket
            .connect(
                stack.iface.context(),
                (IpAddress::Ipv4(s.server), s.server_port),
                s.local_port,
            )
            .err();
        let end = started + deadline;
        let mut connected = false;
        if error.is_none() {
            loop {
                self.poll();
                let state = self.stack.as_mut().map(|st| st.tcp().state());
                if state == Some(tcp::State::Established) {
                    connected = true;
                    break;
                }
                // CLOSED: an acceptable RST ended the attempt; smoltcp would not retry.
                if state == Some(tcp::State::Closed) || Instant::now() >= end {
                    break;
                }
                self.wait(end.saturating_duration_since(Instant::now()));
            }
        }
        let elapsed = started.elapsed();
        let segments = self.device.log.borrow()[mark..].to_vec();
        let state = match (&error, self.stack.as_mut()) {
            (Some(e), _) => format!("connect failed: {e}"),
            (None, Some(stack)) => stack.tcp().state().to_string(),
            (None, None) => "off".into(),
        };
        let outgoing = || segments.iter().filter(|s| s.dir == Direction::Out);
        let incoming = || segments.iter().filter(|s| s.dir == Direction::In);
        let syn_ack_at = incoming().position(|s| s.is_syn_ack());
        EmbeddedReconnect {
            started,
            connected,
            elapsed,
            syns_sent: outgoing().filter(|s| s.is_syn()).count(),
            rsts_sent: outgoing().filter(|s| s.is_rst()).count(),
            acks_received: incoming()
                .take(syn_ack_at.unwrap_or(usize::MAX))
                .filter(|s| s.is_pure_ack())
                .count(),
            rsts_received: incoming().filter(|s| s.is_rst()).count(),
            isn: outgoing().find(|s| s.is_syn()).map(|s| s.seq),
            state,
            segments,
        }
    }

    fn send(&mut self, bytes: &[u8], timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        let mut queued = 0;
        loop {
            let stack = self.stack.as_mut().context("the device is off")?;
            let socket = stack.tcp();
            ensure!(socket.may_send(), "cannot send in state {}", socket.state());
            if queued < bytes.len() && socket.can_send() {
                queued += socket
                    .send_slice(&bytes[queued..])
                    .map_err(|e| anyhow!("send_slice: {e}"))?;
            }
            // Sent, and acknowledged: nothing left in smoltcp's transmit buffer.
            if queued == bytes.len() && socket.send_queue() == 0 {
                return Ok(());
            }
            ensure!(
                Instant::now() < end,
                "{} of {} bytes acknowledged within {timeout:?}",
                queued - socket.send_queue(),
                bytes.len()
            );
            self.poll();
            self.wait(end.saturating_duration_since(Instant::now()));
        }
    }

    /// One round of smoltcp (ingress, timers, egress), or, while off, reads and drops whatever
    /// arrived on the TAP.
    fn poll(&mut self) {
        let now = smoltcp::time::Instant::now();
        match self.stack.as_mut() {
            Some(stack) => {
                stack.iface.poll(now, &mut self.device, &mut stack.sockets);
            }
            None => {
                while let Some((rx, _tx)) = self.device.receive(now) {
                    phy::RxToken::consume(rx, |_| ());
                }
            }
        }
    }

    /// Sleeps until a frame arrives on the TAP, smoltcp's next timer, or `max`, whichever is
    /// first (and never longer than [`IDLE_TICK`], so commands are seen).
    fn wait(&mut self, max: Duration) {
        let mut wait = max.min(IDLE_TICK);
        if let Some(stack) = self.stack.as_mut() {
            let now = smoltcp::time::Instant::now();
            if let Some(delay) = stack.iface.poll_delay(now, &stack.sockets) {
                wait = wait.min(Duration::from_micros(delay.total_micros()));
            }
        }
        if wait.is_zero() {
            return;
        }
        let mut pfd = libc::pollfd {
            fd: self.device.inner.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Round up: a timer due in 300 µs must not become a busy loop of 0 ms polls.
        let ms = i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }
}

/// A fresh smoltcp stack: new `Interface` (new random seed, same MAC and address) and one TCP
/// socket.
fn boot(device: &mut Wire<TunTapInterface>, s: Settings) -> Stack {
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(s.mac)));
    config.random_seed = random_seed();
    let mut iface = Interface::new(config, device, smoltcp::time::Instant::now());
    iface.update_ip_addrs(|addrs| {
        // Capacity is at least one address; the list is empty on a fresh interface.
        let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(s.ip), 24));
    });
    let socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; BUFFER]),
        tcp::SocketBuffer::new(vec![0; BUFFER]),
    );
    let mut sockets = SocketSet::new(Vec::new());
    let tcp = sockets.add(socket);
    Stack {
        iface,
        sockets,
        tcp,
    }
}

/// A seed from the kernel's random pool, so every boot picks a different ISN.
fn random_seed() -> u64 {
    let mut seed = [0u8; 8];
    // SAFETY: writes at most 8 bytes into the 8-byte buffer.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if n != 8 {
        // Never expected on Linux ≥ 3.17; the clock still differs from boot to boot.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        return nanos as u64;
    }
    u64::from_ne_bytes(seed)
}

/// The device wrapper that records every TCP segment of the fixed port crossing it (smoltcp's
/// `phy::Tracer` takes a plain `fn`, which cannot count into per-client state).
struct Wire<D: Device> {
    inner: D,
    local_port: u16,
    log: RefCell<Vec<Segment>>,
}

impl<D: Device> Wire<D> {
    fn new(inner: D, local_port: u16) -> Wire<D> {
        Wire {
            inner,
            local_port,
            log: RefCell::new(Vec::new()),
        }
    }
}

/// Records `frame` if it is an IPv4 TCP segment from (`Out`) or to (`In`) `port`.
fn record(log: &RefCell<Vec<Segment>>, port: u16, dir: Direction, frame: &[u8]) {
    if let Some(segment) = parse_segment(frame, port, dir) {
        log.borrow_mut().push(segment);
    }
}

/// Ethernet → IPv4 → TCP, by hand: only the fields the trace needs.
fn parse_segment(frame: &[u8], port: u16, dir: Direction) -> Option<Segment> {
    let be16 = |b: &[u8], at: usize| Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]));
    let be32 = |b: &[u8], at: usize| {
        Some(u32::from_be_bytes([
            *b.get(at)?,
            *b.get(at + 1)?,
            *b.get(at + 2)?,
            *b.get(at + 3)?,
        ]))
    };
    if be16(frame, 12)? != 0x0800 {
        return None;
    }
    let ip = frame.get(14..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if *ip.get(9)? != 6 {
        return None;
    }
    let total = usize::from(be16(ip, 2)?);
    let tcp = ip.get(ihl..)?;
    let (src, dst) = (be16(tcp, 0)?, be16(tcp, 2)?);
    let ours = match dir {
        Direction::Out => src == port,
        Direction::In => dst == port,
    };
    if !ours {
        return None;
    }
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    Some(Segment {
        at: Instant::now(),
        dir,
        flags: *tcp.get(13)?,
        seq: be32(tcp, 4)?,
        ack: be32(tcp, 8)?,
        payload: total.saturating_sub(ihl + data_offset),
    })
}

impl<D: Device> Device for Wire<D> {
    type RxToken<'a>
        = WireRx<'a, D::RxToken<'a>>
    where
        Self: 'a;
    type TxToken<'a>
        = WireTx<'a, D::TxToken<'a>>
    where
        Self: 'a;

    fn receive(
        &mut self,
        timestamp: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let (log, port) = (&self.log, self.local_port);
        self.inner.receive(timestamp).map(|(rx, tx)| {
            (
                WireRx {
                    token: rx,
                    log,
                    port,
                },
                WireTx {
                    token: tx,
                    log,
                    port,
                },
            )
        })
    }

    fn transmit(&mut self, timestamp: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        let (log, port) = (&self.log, self.local_port);
        self.inner
            .transmit(timestamp)
            .map(|token| WireTx { token, log, port })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.inner.capabilities()
    }
}

struct WireRx<'a, T> {
    token: T,
    log: &'a RefCell<Vec<Segment>>,
    port: u16,
}

impl<T: phy::RxToken> phy::RxToken for WireRx<'_, T> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let (log, port) = (self.log, self.port);
        self.token.consume(|frame| {
            record(log, port, Direction::In, frame);
            f(frame)
        })
    }
}

struct WireTx<'a, T> {
    token: T,
    log: &'a RefCell<Vec<Segment>>,
    port: u16,
}

impl<T: phy::TxToken> phy::TxToken for WireTx<'_, T> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let (log, port) = (self.log, self.port);
        self.token.consume(len, |frame| {
            let result = f(frame);
            record(log, port, Direction::Out, frame);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Direction, Segment, parse_segment};

    /// An Ethernet/IPv4/TCP SYN from port 1025 to 5000, seq 0x01020304, no payload.
    fn syn_frame() -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&40u16.to_be_bytes());
        f[23] = 6;
        let tcp = 34;
        f[tcp..tcp + 2].copy_from_slice(&1025u16.to_be_bytes());
        f[tcp + 2..tcp + 4].copy_from_slice(&5000u16.to_be_bytes());
        f[tcp + 4..tcp + 8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
        f[tcp + 12] = 5 << 4;
        f[tcp + 13] = Segment::SYN;
        f
    }

    #[test]
    fn parses_only_segments_of_the_fixed_port() {
        let frame = syn_frame();
        let s = parse_segment(&frame, 1025, Direction::Out).expect("a SYN from 1025");
        assert!(s.is_syn() && !s.is_rst() && !s.is_pure_ack());
        assert_eq!((s.seq, s.payload), (0x0102_0304, 0));
        assert!(parse_segment(&frame, 1026, Direction::Out).is_none());
        assert!(parse_segment(&frame, 1025, Direction::In).is_none());
        assert!(parse_segment(&frame[..40], 1025, Direction::Out).is_none());
    }
}
