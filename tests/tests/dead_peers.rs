//! Dead peers against the real kernel: `--keepalive` and `--user-timeout` give the watched
//! port's connections keepalive and `TCP_USER_TIMEOUT` through the agent's sock_ops program (no
//! server change, no sysctl), so a server whose client vanished for good gets an error instead
//! of holding the connection forever, and the agent says why (`peer_dead`).
//!
//! A client "vanishes" in one of two ways:
//! - its link goes down (`ip -n <client ns> link set <client veth> down`): nothing more leaves
//!   or reaches it. On a veth pair this also takes the server's carrier down, which flushes the
//!   server's neighbour entry for the client;
//! - a black hole: an nftables table in the client namespace drops everything in and out, so
//!   the server's own link stays up, as when a host behind a switch is gone.
//!
//! Timings are measured from the server's side (the reader's or writer's syscall returning) and
//! bounded by the configured timers plus a margin; every test also asserts what the agent logged
//! and counted. The sockets the timers land on are read back with `getsockopt` on accepted
//! sockets the test owns, and with `ss` in the server namespace.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;
use socket2::Socket;
use watchdog_tests::dumb_client::tcp_info;
use watchdog_tests::netns::ns_exec_stdin;
use watchdog_tests::{
    Accepted, Agent, AgentExit, AgentLine, Bind, CloseHow, Connection, Family, GREETING,
    LegacyServer, TestNet, connect_healthy, ns_exec, num_field, require_root, run_in_ns, scenario,
    str_field,
};

/// The watched port.
const PORT: u16 = scenario::SERVER_PORT;
/// A port the agent does not watch.
const OTHER_PORT: u16 = 5001;
/// How long connecting, accepting and reading may take.
const STEP: Duration = Duration::from_secs(2);
/// `TCP_INFO.tcpi_state` of an ESTABLISHED socket.
const TCP_ESTABLISHED: u8 = 1;

// ---- The agent ----

/// `watchdog run --iface <server veth> --port 5000 --min-idle 0s <extra...>`, attached.
fn start_agent(net: &TestNet, extra: &[&str]) -> Result<Agent> {
    let port = PORT.to_string();
    let mut args = vec![
        "--iface",
        net.server_iface(),
        "--port",
        &port,
        "--min-idle",
        "0s",
    ];
    args.extend_from_slice(extra);
    Agent::start(net, &args)
}

/// The `attached` event announces exactly these timers (`5000:keepalive=2s/1s/2+...`).
fn assert_timers_announced(agent: &Agent, want: &str) -> Result<()> {
    let attached = agent.wait_for_event("attached", STEP)?;
    ensure!(
        str_field(&attached, "timers")? == want,
        "expected timers {want:?} in the attached event: {attached}"
    );
    Ok(())
}

/// SIGTERM; prints the log; checks a clean exit, the log's contract and that every timer was
/// applied without a failure.
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
    for bad in ["fatal", "sample_failed", "bad_record", "map_write_failed"] {
        ensure!(exit.events(bad).is_empty(), "{bad}:\n{}", exit.output());
    }
    ensure!(exit.counter("timers_failed")? == 0, "{}", exit.output());
    ensure!(exit.events("detached").len() == 1, "{}", exit.output());
    Ok(exit)
}

/// Every `peer_dead` and `connection_reset` line: the agent's verdicts on timed connections.
fn verdicts(exit: &AgentExit) -> Vec<Value> {
    let mut all = exit.events("peer_dead");
    all.extend(exit.events("connection_reset"));
    all
}

/// Exactly one verdict was logged, a `peer_dead` for `client` → `server` with `cause`, having
/// read `bytes` from the client; returns it.
fn assert_one_peer_dead(
    exit: &AgentExit,
    client: SocketAddr,
    server: SocketAddr,
    cause: &str,
    bytes: u64,
) -> Result<Value> {
    let all = verdicts(exit);
    ensure!(
        all.len() == 1,
        "expected exactly one verdict on the dead connection, the agent logged {}:\n{}",
        all.len(),
        exit.output()
    );
    let dead = &all[0];
    ensure!(
        str_field(dead, "event")? == "peer_dead" && str_field(dead, "cause")? == cause,
        "expected `peer_dead` with cause {cause:?}, the agent logged: {dead}"
    );
    ensure!(
        str_field(dead, "client")? == client.to_string()
            && str_field(dead, "server")? == server.to_string(),
        "expected client {client} and server {server} in {dead}"
    );
    ensure!(
        num_field(dead, "bytes_received")? == bytes,
        "expected bytes_received {bytes} in {dead}"
    );
    ensure!(
        str_field(dead, "reason")?.starts_with("peer dead: "),
        "the reason does not say the peer is dead: {dead}"
    );
    Ok(dead.clone())
}

// ---- Vanishing clients ----

/// The client host is gone: its veth goes down, so nothing more leaves or reaches it.
fn link_down(net: &TestNet) -> Result<()> {
    ns_exec(
        net.client_ns(),
        "ip",
        &["link", "set", net.client_iface(), "down"],
    )
    .map(drop)
    .context("taking the client's link down")
}

/// The client host is gone behind a switch: every packet in or out of its namespace is dropped,
/// the server's link stays up.
fn black_hole(net: &TestNet) -> Result<()> {
    const RULESET: &str = "
table inet vanished {
    chain input { type filter hook input priority -400; policy drop; }
    chain output { type filter hook output priority -400; policy drop; }
}
";
    ns_exec_stdin(net.client_ns(), "nft", &["-f", "-"], RULESET)
        .map(drop)
        .context("dropping all traffic in the client namespace")
}

/// A client that connected to the legacy server, sent [`GREETING`] and vanished (link down).
struct Vanished {
    accepted: Accepted,
    /// Just before the client sent: the server received nothing after this.
    sent_at: Instant,
    /// Kept, not dropped: the client host died, its socket never closed.
    _conn: Connection,
}

fn connect_send_and_vanish(net: &TestNet, server: &LegacyServer) -> Result<Vanished> {
    let mut conn = connect_healthy(net, net.server_addr(Family::V4, PORT), STEP)?;
    let peer = conn.local_addr();
    let sent_at = Instant::now();
    conn.send(GREETING)?;
    let accepted = server.wait_accepted(|a| a.peer == peer, STEP)?;
    server.wait_bytes(accepted.id, GREETING.len() as u64, STEP)?;
    link_down(net)?;
    Ok(Vanished {
        accepted,
        sent_at,
        _conn: conn,
    })
}

// ---- Sockets the test owns ----

/// A listener on `port` in the server namespace.
fn listen(net: &TestNet, port: u16) -> Result<TcpListener> {
    let addr = net.server_addr(Family::V4, port);
    run_in_ns(net.server_ns(), move || {
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true).context("O_NONBLOCK")?;
        Ok(listener)
    })
}

/// Accepts the connection from `peer` (which has already connected).
fn accept_from(listener: &TcpListener, peer: SocketAddr) -> Result<Socket> {
    let deadline = Instant::now() + STEP;
    loop {
        match listener.accept() {
            Ok((stream, from)) if from == peer => {
                stream
                    .set_nonblocking(false)
                    .context("clearing O_NONBLOCK")?;
                return Ok(Socket::from(stream));
            }
            Ok((_, from)) => bail!("accepted {from}, expected {peer}"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("accept"),
        }
        ensure!(
            Instant::now() < deadline,
            "no connection from {peer} to accept within {STEP:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// A client connection to `port` of `net`'s server and the server's side of it.
fn connect_and_accept(
    net: &TestNet,
    listener: &TcpListener,
    port: u16,
) -> Result<(Connection, Socket)> {
    let conn = connect_healthy(net, net.server_addr(Family::V4, port), STEP)?;
    let accepted = accept_from(listener, conn.local_addr())?;
    Ok((conn, accepted))
}

/// What a socket's keepalive and user timeout are, as `getsockopt` reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SocketTimers {
    keepalive: bool,
    /// `TCP_KEEPIDLE` (the namespace's `tcp_keepalive_time` when never set).
    idle: Duration,
    /// `TCP_KEEPINTVL`
    interval: Duration,
    /// `TCP_KEEPCNT`
    count: u32,
    /// `TCP_USER_TIMEOUT`, zero when unset.
    user_timeout: Duration,
}

fn socket_timers(socket: &Socket) -> Result<SocketTimers> {
    Ok(SocketTimers {
        keepalive: socket.keepalive().context("SO_KEEPALIVE")?,
        idle: socket.tcp_keepalive_time().context("TCP_KEEPIDLE")?,
        interval: socket.tcp_keepalive_interval().context("TCP_KEEPINTVL")?,
        count: socket.tcp_keepalive_retries().context("TCP_KEEPCNT")?,
        user_timeout: socket
            .tcp_user_timeout()
            .context("TCP_USER_TIMEOUT")?
            .unwrap_or(Duration::ZERO),
    })
}

/// What a socket of namespace `ns` has when nobody set anything: keepalive off, the namespace's
/// `net.ipv4.tcp_keepalive_*` sysctls, no user timeout.
fn host_defaults(ns: &str) -> Result<SocketTimers> {
    let read = |name: &'static str| -> Result<u64> {
        // /proc/sys/net follows the opening thread's network namespace.
        let path = format!("/proc/sys/net/ipv4/{name}");
        let text = run_in_ns(ns, move || {
            std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))
        })?;
        text.trim()
            .parse()
            .with_context(|| format!("{name} is {text:?}"))
    };
    Ok(SocketTimers {
        keepalive: false,
        idle: Duration::from_secs(read("tcp_keepalive_time")?),
        interval: Duration::from_secs(read("tcp_keepalive_intvl")?),
        count: u32::try_from(read("tcp_keepalive_probes")?)?,
        user_timeout: Duration::ZERO,
    })
}

// ---- A server that writes ----

#[derive(Clone, Copy, Debug)]
struct WriterEnd {
    errno: i32,
    at: Instant,
}

#[derive(Debug, Default)]
struct WriterState {
    written: u64,
    first_write: Option<Instant>,
    last_progress: Option<Instant>,
    end: Option<WriterEnd>,
    /// `TCP_INFO` before the last write attempt: probes, unacked, retransmits, backoff.
    last_info: (u8, u32, u8, u8),
}

/// Unlike the legacy server, this one writes: as fast as the connection takes, with
/// non-blocking writes after `poll`, until a write fails or it is dropped.
struct Writer {
    state: Arc<Mutex<WriterState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(socket: Socket) -> Result<Writer> {
        socket.set_nonblocking(true).context("O_NONBLOCK")?;
        let state = Arc::new(Mutex::new(WriterState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t_state, t_stop) = (Arc::clone(&state), Arc::clone(&stop));
        let thread = thread::Builder::new()
            .name("writer".into())
            .spawn(move || write_loop(&socket, &t_state, &t_stop))
            .context("spawning the writer")?;
        Ok(Writer {
            state,
            stop,
            thread: Some(thread),
        })
    }

    fn state(&self) -> MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the writer has written something and then made no progress for `quiet`:
    /// its send buffer is full. Returns the time of its last successful write.
    fn wait_blocked(&self, quiet: Duration) -> Result<Instant> {
        let deadline = Instant::now() + STEP;
        loop {
            {
                let state = self.state();
                if let Some(end) = state.end {
                    bail!("the writer failed before it blocked: {end:?} ({state:?})");
                }
                if let Some(last) = state.last_progress
                    && last.elapsed() >= quiet
                {
                    return Ok(last);
                }
            }
            ensure!(
                Instant::now() < deadline,
                "the writer did not block within {STEP:?}: {:?}",
                self.state()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the first write went through; returns when.
    fn wait_first_write(&self) -> Result<Instant> {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(first) = self.state().first_write {
                return Ok(first);
            }
            ensure!(
                Instant::now() < deadline,
                "the writer wrote nothing within {STEP:?}"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits up to `timeout` for a write to fail.
    fn wait_failed(&self, timeout: Duration) -> Result<WriterEnd> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = self.state().end {
                return Ok(end);
            }
            ensure!(
                Instant::now() < deadline,
                "the server's writes still block {timeout:?} later: {:?}",
                self.state()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(socket: &Socket, state: &Mutex<WriterState>, stop: &AtomicBool) {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let chunk = vec![0x5a_u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 50) };
        if let Ok(i) = tcp_info(socket) {
            lock().last_info = (
                i.tcpi_probes,
                i.tcpi_unacked,
                i.tcpi_retransmits,
                i.tcpi_backoff,
            );
        }
        let mut writer = socket;
        match writer.write(&chunk) {
            Ok(n) => {
                let now = Instant::now();
                let mut s = lock();
                s.written += n as u64;
                s.first_write.get_or_insert(now);
                s.last_progress = Some(now);
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                lock().end = Some(WriterEnd {
                    errno: e.raw_os_error().unwrap_or(-1),
                    at: Instant::now(),
                });
                return;
            }
        }
    }
}

// ---- ss ----

/// The `ss -tnoie` entry (all its lines) of the connection `local` ↔ `peer` in namespace `ns`.
fn ss_entry(ns: &str, local: SocketAddr, peer: SocketAddr) -> Result<String> {
    let out = ns_exec(ns, "ss", &["-tnoie"])?;
    let mut entries: Vec<String> = Vec::new();
    for line in out.lines() {
        match entries.last_mut() {
            Some(entry) if line.starts_with(char::is_whitespace) => {
                entry.push('\n');
                entry.push_str(line);
            }
            _ => entries.push(line.to_owned()),
        }
    }
    let (local, peer) = (local.to_string(), peer.to_string());
    entries
        .into_iter()
        .find(|e| {
            let words: Vec<&str> = e.split_whitespace().collect();
            words.contains(&local.as_str()) && words.contains(&peer.as_str())
        })
        .with_context(|| format!("no {local} <-> {peer} connection in `ss -tnoie`:\n{out}"))
}

/// The `timer:(...)` field of an `ss -o` entry, if any.
fn ss_timer(entry: &str) -> Option<&str> {
    entry.split_whitespace().find(|w| w.starts_with("timer:("))
}

/// A numeric `name:value` field of an `ss -i` entry (e.g. `segs_out`); `ss` leaves out the
/// counters that are zero.
fn ss_number(entry: &str, name: &str) -> Result<u64> {
    let prefix = format!("{name}:");
    match entry
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
    {
        Some(value) => value
            .parse()
            .with_context(|| format!("{name}:{value} in `ss` entry:\n{entry}")),
        None => Ok(0),
    }
}

// ---- 1. A vanished client is detected by keepalive ----

/// The seed's failure, from the other side: the client host vanished for good (no FIN, no RST,
/// no reconnect), and the server, which never writes, would wait on its read forever. With
/// `--keepalive 2s,1s,2` its read fails with ETIMEDOUT about 4 s after the last data (2 s
/// idle, then 2 probes 1 s apart), and the agent logs `peer_dead` with cause `keepalive`.
/// Without the agent (run alongside, in its own network), the same vanish leaves the read
/// blocked 7 s later, with no keepalive timer on the socket.
#[test]
fn vanished_client_is_detected_by_keepalive() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    thread::scope(|s| {
        let control = s.spawn(vanished_client_without_agent);
        let with_agent = vanished_client_with_agent().context("with the agent");
        let control = control
            .join()
            .map_err(|_| anyhow!("the control (no agent) panicked"))?
            .context("the control, without the agent");
        match (with_agent, control) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
            (Err(a), Err(b)) => bail!("{a:#}\nand {b:#}"),
        }
    })
}

fn vanished_client_with_agent() -> Result<()> {
    let net = TestNet::new("dpka")?;
    let server = LegacyServer::start(&net, Bind::V4, PORT)?;
    let agent = start_agent(&net, &["--keepalive", "2s,1s,2"])?;
    assert_timers_announced(&agent, "5000:keepalive=2s/1s/2")?;

    let v = connect_send_and_vanish(&net, &server)?;
    let closed = server.wait_closed_id(v.accepted.id, Duration::from_secs(8))?;
    let after = closed.at.duration_since(v.sent_at);
    eprintln!(
        "keepalive 2s,1s,2: the server's read returned {:?} {:.2} s after the last data",
        closed.how,
        after.as_secs_f64()
    );
    ensure!(
        closed.how == CloseHow::Error(libc::ETIMEDOUT),
        "the server's read ended with {:?}, expected ETIMEDOUT ({}):\n{}",
        closed.how,
        libc::ETIMEDOUT,
        agent.output()
    );
    // The kernel gives up 2 s + 2 × 1 s after the last segment it received from the client.
    ensure!(
        after >= Duration::from_millis(3500) && after <= Duration::from_secs(6),
        "the read returned {after:?} after the last data, expected about 4 s (2 s idle + 2 \
         probes 1 s apart) and at most 6 s"
    );
    ensure!(closed.bytes == GREETING.len() as u64, "{closed:?}");

    agent.wait_for_event("peer_dead", STEP)?;
    let exit = stop_agent(agent)?;
    let dead = assert_one_peer_dead(
        &exit,
        v.accepted.peer,
        net.server_addr(Family::V4, PORT),
        "keepalive",
        GREETING.len() as u64,
    )?;
    ensure!(
        str_field(&dead, "reason")?.contains("2 keepalive probes unanswered"),
        "the reason does not name the 2 unanswered probes: {dead}"
    );
    if let Some(idle) = dead.get("idle_ms").and_then(Value::as_u64) {
        ensure!(
            idle >= 2000,
            "idle_ms {idle} is below the 2 s keepalive idle time: {dead}"
        );
    }
    ensure!(exit.counter("timers_applied")? == 1, "{}", exit.output());
    ensure!(exit.counter("abrupt_closes")? == 1, "{}", exit.output());
    Ok(())
}

fn vanished_client_without_agent() -> Result<()> {
    let net = TestNet::new("dpkactl")?;
    let server = LegacyServer::start(&net, Bind::V4, PORT)?;
    let v = connect_send_and_vanish(&net, &server)?;
    let entry = ss_entry(
        net.server_ns(),
        net.server_addr(Family::V4, PORT),
        v.accepted.peer,
    )?;
    ensure!(
        !ss_timer(&entry).is_some_and(|t| t.contains("keepalive")),
        "a keepalive timer runs without the agent:\n{entry}"
    );
    thread::sleep((v.sent_at + Duration::from_secs(7)).saturating_duration_since(Instant::now()));
    eprintln!(
        "no agent: {:.2} s after the last data the server's read is still blocked: {}",
        v.sent_at.elapsed().as_secs_f64(),
        server.is_open(v.accepted.id)
    );
    ensure!(
        server.is_open(v.accepted.id) && server.closed().is_empty(),
        "without the agent the server noticed the vanished client: {:?}",
        server.events()
    );
    Ok(())
}

// ---- 2. A healthy silent connection survives ----

/// Keepalive only asks: a peer that is alive answers the probes, so a connection silent in
/// both directions for 5 s (five times the 1 s idle time) stays open, and no verdict is logged.
#[test]
fn healthy_silent_connection_survives_keepalive() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("dpsilent")?;
    let server = LegacyServer::start(&net, Bind::V4, PORT)?;
    let server_addr = net.server_addr(Family::V4, PORT);
    let agent = start_agent(&net, &["--keepalive", "1s,1s,2"])?;
    assert_timers_announced(&agent, "5000:keepalive=1s/1s/2")?;

    let conn = connect_healthy(&net, server_addr, STEP)?;
    let peer = conn.local_addr();
    let accepted = server.wait_accepted(|a| a.peer == peer, STEP)?;
    let before = ss_entry(net.server_ns(), server_addr, peer)?;
    thread::sleep(Duration::from_secs(5));
    let after = ss_entry(net.server_ns(), server_addr, peer)?;
    eprintln!("ss after 5 s of silence:\n{after}");

    ensure!(
        server.is_open(accepted.id),
        "the healthy connection was closed: {:?}\n{}",
        server.events(),
        agent.output()
    );
    ensure!(conn.pending_error()?.is_none(), "the client saw an error");
    ensure!(
        conn.tcp_state()? == TCP_ESTABLISHED,
        "the client is not ESTABLISHED"
    );
    let timer = ss_timer(&after).with_context(|| format!("no timer on the socket:\n{after}"))?;
    ensure!(
        timer.starts_with("timer:(keepalive,"),
        "expected a keepalive timer, found {timer}"
    );
    // Probes went out about once a second and each was answered.
    let probes = ss_number(&after, "segs_out")? - ss_number(&before, "segs_out")?;
    let answers = ss_number(&after, "segs_in")? - ss_number(&before, "segs_in")?;
    eprintln!("in 5 s of silence: {probes} segments out (probes), {answers} in (answers)");
    ensure!(
        probes >= 3 && answers >= 3,
        "expected at least 3 answered keepalive probes in 5 s; segments out {probes}, in \
         {answers}"
    );
    ensure!(
        agent.events("peer_dead").is_empty() && agent.events("connection_reset").is_empty(),
        "a verdict on a healthy connection:\n{}",
        agent.output()
    );

    // A normal close is no verdict either.
    drop(conn);
    let closed = server.wait_closed_id(accepted.id, STEP)?;
    ensure!(closed.how == CloseHow::Eof, "{closed:?}");
    let exit = stop_agent(agent)?;
    ensure!(verdicts(&exit).is_empty(), "{}", exit.output());
    ensure!(exit.counter("timers_applied")? == 1, "{}", exit.output());
    ensure!(exit.counter("abrupt_closes")? == 0, "{}", exit.output());
    Ok(())
}

// ---- 3. TCP_USER_TIMEOUT frees a server that writes ----

/// The seed's open question: "what happens if the server writes to the socket, and the client
/// never reads?" Its receive window fills and the server's writes block; the kernel sends
/// zero-window probes. Then the client's link goes down. With `--user-timeout 3s` (and no
/// keepalive) the server's blocked write fails with ETIMEDOUT. The kernel counts the 3 s from
/// its first zero-window probe (answered or not; only a reopened window resets it), so the
/// write fails about 3 s after the window closed, whenever the link went down.
#[test]
fn user_timeout_frees_a_server_that_writes_to_a_client_that_never_reads() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("dpzwin")?;
    let listener = listen(&net, PORT)?;
    let agent = start_agent(&net, &["--user-timeout", "3s"])?;
    assert_timers_announced(&agent, "5000:user_timeout=3000ms")?;
    let (conn, socket) = connect_and_accept(&net, &listener, PORT)?;
    let client = conn.local_addr();
    let writer = Writer::start(socket)?;
    let blocked_at = writer.wait_blocked(Duration::from_millis(300))?;
    eprintln!("window closed, writer blocked: {:?}", writer.state());
    link_down(&net)?;
    let down_at = Instant::now();

    let end = writer.wait_failed(Duration::from_secs(8))?;
    let (since_down, since_blocked) = (end.at - down_at, end.at - blocked_at);
    eprintln!(
        "user timeout 3s, zero window then link down: write failed with errno {} {:.2} s after \
         the link went down, {:.2} s after the writes blocked; {:?}",
        end.errno,
        since_down.as_secs_f64(),
        since_blocked.as_secs_f64(),
        writer.state()
    );
    ensure!(
        end.errno == libc::ETIMEDOUT,
        "the write failed with errno {}, expected ETIMEDOUT",
        end.errno
    );
    ensure!(
        since_down <= Duration::from_secs(8),
        "{since_down:?} after the link went down"
    );
    ensure!(
        since_blocked >= Duration::from_millis(2500) && since_blocked <= Duration::from_secs(5),
        "the write failed {since_blocked:?} after the writes blocked, expected about 3 s"
    );

    let exit = stop_agent(agent)?;
    assert_one_peer_dead(
        &exit,
        client,
        net.server_addr(Family::V4, PORT),
        "user_timeout",
        0,
    )?;
    ensure!(exit.counter("timers_applied")? == 1, "{}", exit.output());
    ensure!(exit.counter("abrupt_closes")? == 1, "{}", exit.output());
    Ok(())
}

/// The client vanishes (black hole) before the server answers it: the server's data is never
/// acknowledged and retransmitted with backoff. `--user-timeout 3s` fails the write with
/// ETIMEDOUT about 3 s after the first transmission, instead of after `tcp_retries2` (about 15
/// minutes), and the agent logs `peer_dead` with cause `user_timeout`.
#[test]
fn user_timeout_frees_a_server_whose_client_vanished_with_data_in_flight() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("dpinflight")?;
    let listener = listen(&net, PORT)?;
    let agent = start_agent(&net, &["--user-timeout", "3s"])?;
    let (conn, socket) = connect_and_accept(&net, &listener, PORT)?;
    let client = conn.local_addr();
    black_hole(&net)?;
    let writer = Writer::start(socket)?;
    let first = writer.wait_first_write()?;

    let end = writer.wait_failed(Duration::from_secs(8))?;
    let after = end.at - first;
    eprintln!(
        "user timeout 3s, data in flight into a black hole: write failed with errno {} {:.2} s \
         after the first write; {:?}",
        end.errno,
        after.as_secs_f64(),
        writer.state()
    );
    ensure!(
        end.errno == libc::ETIMEDOUT,
        "the write failed with errno {}, expected ETIMEDOUT",
        end.errno
    );
    ensure!(
        after >= Duration::from_millis(2500) && after <= Duration::from_secs(5),
        "the write failed {after:?} after the first write, expected about 3 s"
    );

    let exit = stop_agent(agent)?;
    let dead = assert_one_peer_dead(
        &exit,
        client,
        net.server_addr(Family::V4, PORT),
        "user_timeout",
        0,
    )?;
    ensure!(
        str_field(&dead, "reason")?.contains("user timeout of 3000 ms"),
        "the reason does not name the user timeout: {dead}"
    );
    ensure!(exit.counter("timers_applied")? == 1, "{}", exit.output());
    Ok(())
}

/// What the kernel does with a client that is alive but never reads: TCP_USER_TIMEOUT also
/// bounds a closed window, even when every zero-window probe is answered (Linux ≥ 5.11, "tcp:
/// fix TCP_USER_TIMEOUT with zero window"). So `--user-timeout 3s` drops a live client that leaves its window closed for 3 s:
/// the server's write fails with ETIMEDOUT while the client still thinks it is connected (no
/// RST is sent). The agent must name the user timeout, not a reset.
#[test]
fn user_timeout_also_drops_a_live_client_that_keeps_its_window_closed() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("dpzwalive")?;
    let listener = listen(&net, PORT)?;
    let agent = start_agent(&net, &["--user-timeout", "3s"])?;
    let (conn, socket) = connect_and_accept(&net, &listener, PORT)?;
    let client = conn.local_addr();
    let writer = Writer::start(socket)?;
    let blocked_at = writer.wait_blocked(Duration::from_millis(300))?;

    let end = writer.wait_failed(Duration::from_secs(6))?;
    let after = end.at - blocked_at;
    eprintln!(
        "user timeout 3s, live client with a closed window: write failed with errno {} {:.2} s \
         after the writes blocked; {:?}",
        end.errno,
        after.as_secs_f64(),
        writer.state()
    );
    ensure!(
        end.errno == libc::ETIMEDOUT,
        "the write failed with errno {}, expected ETIMEDOUT",
        end.errno
    );
    ensure!(
        after >= Duration::from_millis(2500) && after <= Duration::from_secs(5),
        "the write failed {after:?} after the writes blocked, expected about 3 s"
    );
    ensure!(
        conn.tcp_state()? == TCP_ESTABLISHED && conn.pending_error()?.is_none(),
        "the live client noticed the drop"
    );

    let exit = stop_agent(agent)?;
    let all = verdicts(&exit);
    ensure!(all.len() == 1, "{}", exit.output());
    ensure!(
        str_field(&all[0], "cause")? == "user_timeout"
            && str_field(&all[0], "client")? == client.to_string(),
        "expected the user timeout as the cause for {client}, the agent logged: {}",
        all[0]
    );
    Ok(())
}

// ---- 4. Only the watched port, only the agent's namespace ----

/// `--port 5000 --keepalive 2s,1s,2 --user-timeout 3s`: the accepted socket on 5000 reads back
/// SO_KEEPALIVE 1, 2 s / 1 s / 2 and 3000 ms; one on the unwatched 5001, and one on 5000 in
/// another network namespace (no agent there; the sock_ops program is attached to the whole
/// cgroup v2 root, so only its namespace filter keeps it out), keep the host defaults.
#[test]
fn other_ports_keep_host_defaults() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("dpports")?;
    let other_net = TestNet::new("dpportsns")?;
    let watched = listen(&net, PORT)?;
    let unwatched = listen(&net, OTHER_PORT)?;
    let elsewhere = listen(&other_net, PORT)?;
    let agent = start_agent(&net, &["--keepalive", "2s,1s,2", "--user-timeout", "3s"])?;
    assert_timers_announced(&agent, "5000:keepalive=2s/1s/2+user_timeout=3000ms")?;

    let (c_watched, s_watched) = connect_and_accept(&net, &watched, PORT)?;
    let (c_unwatched, s_unwatched) = connect_and_accept(&net, &unwatched, OTHER_PORT)?;
    let (c_elsewhere, s_elsewhere) = connect_and_accept(&other_net, &elsewhere, PORT)?;

    let want = SocketTimers {
        keepalive: true,
        idle: Duration::from_secs(2),
        interval: Duration::from_secs(1),
        count: 2,
        user_timeout: Duration::from_millis(3000),
    };
    let got = socket_timers(&s_watched)?;
    ensure!(got == want, "port {PORT}: {got:?}, expected {want:?}");
    let defaults = host_defaults(net.server_ns())?;
    let got = socket_timers(&s_unwatched)?;
    ensure!(
        got == defaults,
        "unwatched port {OTHER_PORT}: {got:?}, expected the host defaults {defaults:?}"
    );
    let defaults = host_defaults(other_net.server_ns())?;
    let got = socket_timers(&s_elsewhere)?;
    ensure!(
        got == defaults,
        "port {PORT} in another network namespace: {got:?}, expected the host defaults \
         {defaults:?}"
    );

    // The same seen from outside, with ss.
    let entry = ss_entry(
        net.server_ns(),
        net.server_addr(Family::V4, PORT),
        c_watched.local_addr(),
    )?;
    ensure!(
        ss_timer(&entry).is_some_and(|t| t.starts_with("timer:(keepalive,")),
        "no keepalive timer on the watched port's socket:\n{entry}"
    );
    for (ns, server, client) in [
        (
            net.server_ns(),
            net.server_addr(Family::V4, OTHER_PORT),
            c_unwatched.local_addr(),
        ),
        (
            other_net.server_ns(),
            other_net.server_addr(Family::V4, PORT),
            c_elsewhere.local_addr(),
        ),
    ] {
        let entry = ss_entry(ns, server, client)?;
        ensure!(
            !ss_timer(&entry).is_some_and(|t| t.contains("keepalive")),
            "a keepalive timer on {server} in {ns}:\n{entry}"
        );
    }

    let exit = stop_agent(agent)?;
    ensure!(exit.counter("timers_applied")? == 1, "{}", exit.output());
    ensure!(verdicts(&exit).is_empty(), "{}", exit.output());
    Ok(())
}
