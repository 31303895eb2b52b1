//! The seed's DOS client: always connects from the same fixed port, crashes without a word, and
//! ignores everything but a SYN-ACK while it connects.
//!
//! It is a real Linux socket in the client namespace, made dumb by nftables rules installed once
//! per namespace (table `inet dumbclient`):
//! - outgoing segments from a fixed port with FIN or RST are dropped, so a crash (abortive close)
//!   sends nothing and the server keeps its ESTABLISHED socket, and the RST a Linux SYN-SENT
//!   socket would send in answer to the server's challenge ACK never leaves;
//! - incoming RSTs to a fixed port are dropped, like a stack that ignores them;
//! - while a [`DumbClient::reconnect`] runs, incoming segments to its port that are not a SYN-ACK
//!   (the challenge ACK) are dropped too, for every connection from that port in the namespace.
//!   Without this, Linux re-sends the SYN about 10 ms after it sees an unacceptable ACK in
//!   SYN-SENT (`tcp_rcv_synsent_state_process` arms `TCP_TIMEOUT_MIN`), which is smarter than the
//!   seed's stack and would hide the bug's real cost: the seed's client waits for its SYN timer.
//!
//! With these rules the kernel's SYN retransmissions meet the stale socket again and again
//! (6.x kernels: 1 s apart for the first `tcp_syn_linear_timeouts` = 4, then doubling): without
//! the watchdog the client never gets back in.
//!
//! [`DumbClient::cooperative`] makes the baseline a modern stack achieves on its own: the crash
//! is just as silent, but while it reconnects the client hears the challenge ACK and its RST
//! leaves (its port is in the `cooperating` set, which lets outgoing RSTs pass), so the kernel's
//! RFC 5961 recovery runs: RST, then the SYN again after `TCP_TIMEOUT_MIN`.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns::{Family, TestNet, ns_exec, ns_exec_stdin, run_in_ns};

/// The nftables table that makes the client dumb, created once per client namespace.
const RULESET: &str = "
table inet dumbclient {
    set fixed_ports { type inet_service; }
    set connecting { type inet_service; }
    set cooperating { type inet_service; }
    chain output {
        type filter hook output priority 0; policy accept;
        tcp sport @cooperating tcp flags & rst != 0 accept
        tcp sport @fixed_ports tcp flags & (fin | rst) != 0 drop
    }
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport @fixed_ports tcp flags & rst != 0 drop
        tcp dport @connecting tcp flags & (syn | ack) == ack drop
    }
}
";

/// What the process has already put into each namespace's `dumbclient` table.
#[derive(Default)]
struct NftState {
    tables: HashSet<String>,
    fixed_ports: HashSet<(String, u16)>,
    /// Reconnects in progress per (namespace, set, port): the port leaves the set at zero.
    reconnecting: HashMap<(String, &'static str, u16), usize>,
}

static NFT: Mutex<Option<NftState>> = Mutex::new(None);

fn nft_state() -> MutexGuard<'static, Option<NftState>> {
    NFT.lock().unwrap_or_else(|e| e.into_inner())
}

/// Installs the table in `ns` (once) and adds `port` to its fixed ports (once).
fn install_rules(ns: &str, port: u16) -> Result<()> {
    let mut guard = nft_state();
    let state = guard.get_or_insert_with(NftState::default);
    if !state.tables.contains(ns) {
        ns_exec_stdin(ns, "nft", &["-f", "-"], RULESET).with_context(|| {
            format!("installing the dumbclient nftables table in {ns} (is nftables installed?)")
        })?;
        state.tables.insert(ns.to_owned());
    }
    if state.fixed_ports.insert((ns.to_owned(), port)) {
        let element = format!("{{ {port} }}");
        ns_exec(
            ns,
            "nft",
            &[
                "add",
                "element",
                "inet",
                "dumbclient",
                "fixed_ports",
                &element,
            ],
        )
        .with_context(|| format!("adding port {port} to the dumbclient rules in {ns}"))?;
    }
    Ok(())
}

/// While alive, `port` is in the nftables set `set` of `ns` (reference counted, so concurrent
/// reconnects from the same port share it): `connecting` drops incoming non-SYN-ACK segments,
/// `cooperating` lets outgoing RSTs pass.
struct InSet {
    ns: String,
    set: &'static str,
    port: u16,
}

impl InSet {
    fn new(ns: &str, set: &'static str, port: u16) -> Result<InSet> {
        let mut guard = nft_state();
        let state = guard.get_or_insert_with(NftState::default);
        let count = state
            .reconnecting
            .entry((ns.to_owned(), set, port))
            .or_insert(0);
        if *count == 0 {
            let element = format!("{{ {port} }}");
            ns_exec(
                ns,
                "nft",
                &["add", "element", "inet", "dumbclient", set, &element],
            )
            .with_context(|| format!("adding port {port} to the {set} set in {ns}"))?;
        }
        *count += 1;
        Ok(InSet {
            ns: ns.to_owned(),
            set,
            port,
        })
    }
}

impl Drop for InSet {
    fn drop(&mut self) {
        let mut guard = nft_state();
        let Some(state) = guard.as_mut() else {
            return;
        };
        let key = (self.ns.clone(), self.set, self.port);
        let Some(count) = state.reconnecting.get_mut(&key) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            state.reconnecting.remove(&key);
            let element = format!("{{ {} }}", self.port);
            if let Err(e) = ns_exec(
                &self.ns,
                "nft",
                &[
                    "delete",
                    "element",
                    "inet",
                    "dumbclient",
                    self.set,
                    &element,
                ],
            ) {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

/// A client that always connects from `local_port` to one server.
#[derive(Clone, Debug)]
pub struct DumbClient {
    ns: String,
    server: SocketAddr,
    local: SocketAddr,
    /// Answers the challenge ACK while it reconnects (see [`DumbClient::cooperative`]).
    cooperative: bool,
}

/// What one reconnect attempt achieved before its deadline.
#[derive(Debug)]
pub struct ReconnectOutcome {
    /// When `connect()` sent the first SYN.
    pub started: Instant,
    /// The handshake completed before the deadline.
    pub connected: bool,
    /// From `connect()` to connected, or to the deadline (or to a hard error).
    pub elapsed: Duration,
    /// SYN retransmissions of the connecting socket (`TCP_INFO`, best effort).
    pub syn_retransmits: u32,
    /// The error `connect` reported, if it failed before the deadline.
    pub error: Option<String>,
    /// The new connection, when `connected`.
    pub connection: Option<Connection>,
}

impl DumbClient {
    /// A client in `net`'s client namespace that connects from `local_port` to `server`.
    /// Installs the dumbclient nftables rules for that port.
    pub fn new(net: &TestNet, server: SocketAddr, local_port: u16) -> Result<DumbClient> {
        install_rules(net.client_ns(), local_port)?;
        let family = family_of(server);
        Ok(DumbClient {
            ns: net.client_ns().to_owned(),
            server,
            local: net.client_addr(family, local_port),
            cooperative: false,
        })
    }

    /// The same fixed-port client with a modern Linux stack's manners while it reconnects: its
    /// crash is still silent, but during [`DumbClient::reconnect`] it sees the server's
    /// challenge ACK, answers it with a RST (which resets the stale socket) and re-sends its SYN
    /// about 10 ms later: the kernel's own RFC 5961 recovery, the baseline a watchdog competes
    /// with. Do not mix it with a dumb client on the same port in one namespace.
    pub fn cooperative(net: &TestNet, server: SocketAddr, local_port: u16) -> Result<DumbClient> {
        Ok(DumbClient {
            cooperative: true,
            ..DumbClient::new(net, server, local_port)?
        })
    }

    /// Whether this client answers challenge ACKs while it reconnects.
    pub fn is_cooperative(&self) -> bool {
        self.cooperative
    }

    /// The client's `ip:port`, as the server and the agent see it.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The server it connects to.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// A socket in the client namespace bound to the fixed port.
    fn fixed_port_socket(&self) -> Result<Socket> {
        let bind = SocketAddr::new(unspecified(family_of(self.server)), self.local.port());
        run_in_ns(&self.ns, move || {
            let socket = Socket::new(Domain::for_address(bind), Type::STREAM, Some(Protocol::TCP))
                .context("creating client socket")?;
            // The previous incarnation's socket may still exist (e.g. in FIN-WAIT); the DOS box
            // does not care, and neither does SO_REUSEADDR for a connecting socket.
            socket.set_reuse_address(true).context("SO_REUSEADDR")?;
            socket
                .bind(&SockAddr::from(bind))
                .with_context(|| format!("binding the fixed port {bind}"))?;
            Ok(socket)
        })
    }

    /// Connects from the fixed port (blocking, up to `timeout`).
    pub fn connect(&self, timeout: Duration) -> Result<Connection> {
        let socket = self.fixed_port_socket()?;
        socket
            .connect_timeout(&SockAddr::from(self.server), timeout)
            .with_context(|| format!("connecting {} -> {}", self.local, self.server))?;
        Connection::new(socket, &self.ns, self.local, self.server)
    }

    /// Connects again from the fixed port, as the rebooted client does, waiting at most
    /// `deadline`. Not connecting is an outcome, not an error.
    pub fn reconnect(&self, deadline: Duration) -> Result<ReconnectOutcome> {
        self.reconnect_gated(deadline, || {})
    }

    /// [`DumbClient::reconnect`] that calls `gate` right before its first SYN leaves (after the
    /// firewall rules are in place, right before `connect`): a test that times things against
    /// the client's SYN timer, or must act just before the SYN, synchronises there rather than
    /// before the set-up (which takes a second under emulation).
    pub fn reconnect_gated(
        &self,
        deadline: Duration,
        gate: impl FnOnce(),
    ) -> Result<ReconnectOutcome> {
        // Dumb: deaf to the challenge ACK. Cooperative: its RST in answer may leave.
        let set = if self.cooperative {
            "cooperating"
        } else {
            "connecting"
        };
        let _rules = InSet::new(&self.ns, set, self.local.port())?;
        let socket = self.fixed_port_socket()?;
        socket.set_nonblocking(true).context("O_NONBLOCK")?;
        gate();
        let start = Instant::now();
        match socket.connect(&SockAddr::from(self.server)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("connect {} -> {}", self.local, self.server));
            }
        }
        let end = start + deadline;
        let mut writable = false;
        while !writable {
            let now = Instant::now();
            if now >= end {
                break;
            }
            let wait_ms = i32::try_from((end - now).as_millis().max(1)).unwrap_or(i32::MAX);
            let mut pfd = libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e).context("poll on connecting socket");
                }
            }
            writable = rc > 0;
        }
        let elapsed = start.elapsed();
        let syn_retransmits = tcp_info(&socket)
            .map(|i| i.tcpi_total_retrans.max(u32::from(i.tcpi_retransmits)))
            .unwrap_or(0);
        if !writable {
            return Ok(ReconnectOutcome {
                started: start,
                connected: false,
                elapsed,
                syn_retransmits,
                error: None,
                connection: None,
            });
        }
        match socket.take_error().context("SO_ERROR")? {
            Some(e) => Ok(ReconnectOutcome {
                started: start,
                connected: false,
                elapsed,
                syn_retransmits,
                error: Some(e.to_string()),
                connection: None,
            }),
            None => {
                socket
                    .set_nonblocking(false)
                    .context("clearing O_NONBLOCK")?;
                Ok(ReconnectOutcome {
                    started: start,
                    connected: true,
                    elapsed,
                    syn_retransmits,
                    error: None,
                    connection: Some(Connection::new(socket, &self.ns, self.local, self.server)?),
                })
            }
        }
    }
}

/// A normal client connection from an ephemeral port: what healthy peers look like.
pub fn connect_healthy(net: &TestNet, server: SocketAddr, timeout: Duration) -> Result<Connection> {
    let socket = run_in_ns(net.client_ns(), move || {
        Socket::new(
            Domain::for_address(server),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .context("creating client socket")
    })?;
    socket
        .connect_timeout(&SockAddr::from(server), timeout)
        .with_context(|| format!("connecting to {server} from an ephemeral port"))?;
    let local = socket
        .local_addr()
        .context("local address")?
        .as_socket()
        .context("local address is not an IP address")?;
    Connection::new(socket, net.client_ns(), local, server)
}

/// An established client connection.
#[derive(Debug)]
pub struct Connection {
    socket: Socket,
    /// The client's network namespace.
    ns: String,
    local: SocketAddr,
    peer: SocketAddr,
}

impl Connection {
    fn new(socket: Socket, ns: &str, local: SocketAddr, peer: SocketAddr) -> Result<Connection> {
        // A send must never hang a test.
        socket
            .set_write_timeout(Some(Duration::from_secs(2)))
            .context("SO_SNDTIMEO")?;
        Ok(Connection {
            socket,
            ns: ns.to_owned(),
            local: SocketAddr::new(local.ip().to_canonical(), local.port()),
            peer,
        })
    }

    /// The client's `ip:port`.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The server's `ip:port`.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Writes all of `bytes`.
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.socket.write_all(bytes).with_context(|| {
            format!(
                "sending {} bytes {} -> {}",
                bytes.len(),
                self.local,
                self.peer
            )
        })
    }

    /// The TCP state of the client socket (`TCP_INFO.tcpi_state`, e.g. 1 = ESTABLISHED).
    pub fn tcp_state(&self) -> Result<u8> {
        Ok(tcp_info(&self.socket)?.tcpi_state)
    }

    /// Whether the client socket has a pending error (e.g. it saw an RST).
    pub fn pending_error(&self) -> Result<Option<std::io::Error>> {
        self.socket.take_error().context("SO_ERROR")
    }

    /// Dies like the DOS box: an abortive close whose RST the nftables rules drop, so nothing
    /// reaches the server and its socket stays ESTABLISHED.
    pub fn crash(self) -> Result<()> {
        // SO_LINGER {on, 0}: close() sends RST and frees the port at once. A plain close() with
        // the FIN dropped would leave the socket in FIN-WAIT-1 holding the fixed port.
        self.socket
            .set_linger(Some(Duration::ZERO))
            .context("SO_LINGER {1, 0}")?;
        drop(self.socket);
        // A process that another test thread is starting holds a copy of every descriptor
        // until it execs, and the abort happens only when the last copy closes: wait for it,
        // so that the rebooted client's connect does not meet its former self.
        let (local_port, peer_port) = (self.local.port(), self.peer.port());
        let deadline = Instant::now() + Duration::from_secs(2);
        while run_in_ns(&self.ns, move || tcp_socket_exists(local_port, peer_port))? {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the crashed socket {} -> {} is still there after 2 s",
                self.local,
                self.peer
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

/// Whether the calling thread's network namespace has a TCP socket from `local_port` to
/// `peer_port`, TIME-WAIT aside (an aborted socket never gets there). In
/// `/proc/thread-self/net/tcp` and `tcp6` the columns are `sl local rem st …`, endpoints
/// `ADDR:PORT` with the port in hex, `st` 06 for TIME-WAIT.
fn tcp_socket_exists(local_port: u16, peer_port: u16) -> Result<bool> {
    for table in ["tcp", "tcp6"] {
        let path = format!("/proc/thread-self/net/{table}");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let port = |endpoint: &str| {
            endpoint
                .rsplit_once(':')
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok())
        };
        let found = text.lines().skip(1).any(|line| {
            let mut columns = line.split_whitespace().skip(1);
            let (Some(local), Some(remote), Some(state)) =
                (columns.next(), columns.next(), columns.next())
            else {
                return false;
            };
            port(local) == Some(local_port) && port(remote) == Some(peer_port) && state != "06"
        });
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `TCP_INFO` of a socket.
pub fn tcp_info(socket: &Socket) -> Result<libc::tcp_info> {
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the buffer is a zeroed tcp_info of `len` bytes; the kernel writes at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt TCP_INFO");
    }
    // SAFETY: zero is a valid value for every field; the kernel filled in what it knows.
    Ok(unsafe { info.assume_init() })
}

fn family_of(addr: SocketAddr) -> Family {
    if addr.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    }
}

/// `0.0.0.0` or `::`: where the client binds its fixed port.
fn unspecified(family: Family) -> IpAddr {
    match family {
        Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
        Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
    }
}
