//! The guards against a hostile network: spoofed SYNs that carry a live connection's exact
//! 4-tuple, an idle connection that a spoofer can kill (the idle guard's documented limit), and
//! a kill storm the rate limits must stop.
//!
//! With a fixed client port the whole 4-tuple is predictable: anyone who can put a frame on the
//! server's link can send a SYN that an ESTABLISHED socket owns. The frames here are built by
//! hand and sent from the client namespace through `AF_PACKET` ([`watchdog_tests::spoof`]), so
//! they reach the server veth exactly as a spoofer's would.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use watchdog_tests::spoof::{FrameInjector, Macs, Rng, link_info, syn_frame};
use watchdog_tests::{
    Accepted, Agent, AgentExit, AgentLine, Bind, CloseHow, Connection, ECONNABORTED, Family,
    HealthyTraffic, LegacyServer, TestNet, connect_healthy, ns_exec, num_field, require_root,
    scenario, str_field,
};

const WATCHED: u16 = scenario::SERVER_PORT;
const SHORT: Duration = Duration::from_secs(2);
/// How long the idle connections stay silent before the spoofed SYNs: above `--min-idle 1s`.
const IDLE: Duration = Duration::from_millis(1500);

/// `watchdog run --iface <server veth> --port 5000 <extra...>` (replay mode, the default).
fn start_agent(net: &TestNet, extra: &[&str]) -> Result<Agent> {
    let mut args = vec!["--iface", net.server_iface(), "--port", "5000"];
    args.extend_from_slice(extra);
    let agent = Agent::start(net, &args)?;
    let attached = agent.wait_for_event("attached", SHORT)?;
    ensure!(
        str_field(&attached, "mode")? == "replay",
        "replay is not the default mode: {attached}"
    );
    Ok(agent)
}

/// SIGTERM; checks a clean exit, the log contract and the `counters` line. Prints the log, or
/// only its first and last lines when it is long (the flood logs 20,000 lines).
fn stop_agent(agent: Agent) -> Result<AgentExit> {
    let exit = agent.stop()?;
    let lines: Vec<String> = exit.lines.iter().map(ToString::to_string).collect();
    if lines.len() <= 60 {
        eprintln!("agent log ({}):\n  {}", exit.status, lines.join("\n  "));
    } else {
        eprintln!(
            "agent log ({}), {} lines; first and last 20:\n  {}\n  ...\n  {}",
            exit.status,
            lines.len(),
            lines[..20].join("\n  "),
            lines[lines.len() - 20..].join("\n  ")
        );
    }
    ensure!(exit.status.success(), "agent exited with {}", exit.status);
    for line in &exit.lines {
        if let AgentLine::Json(v) = line {
            str_field(v, "event")?;
            str_field(v, "message")?;
        }
    }
    exit.counters()?;
    ensure!(!exit.events("detached").is_empty(), "no detached event");
    Ok(exit)
}

/// How often each value of `event[field]` occurs in `events`, values cut at their first ':'
/// (e.g. the reasons of `would_destroy`: "min-idle", "backed off", "rate limit").
fn tally(events: &[Value], field: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in events {
        let value = e.get(field).and_then(Value::as_str).unwrap_or("(none)");
        let head = value.split(':').next().unwrap_or(value).to_owned();
        *out.entry(head).or_default() += 1;
    }
    out
}

/// Sends one spoofed SYN (random sequence number) for `client` → `server`.
fn spoof_one(net: &TestNet, rng: &mut Rng, client: SocketAddr, server: SocketAddr) -> Result<()> {
    let macs = Macs::client_to_server(net)?;
    FrameInjector::open(net.client_ns(), net.client_iface())?.send(&syn_frame(
        macs,
        client,
        server,
        rng.next_u32(),
    ))
}

/// A connection from the client's own address (an ephemeral port) to `to` that sends `hello`
/// once and then stays silent; returns it with the server's side of it.
fn idle_connection(
    net: &TestNet,
    server: &LegacyServer,
    to: SocketAddr,
    hello: &[u8],
) -> Result<(Connection, Accepted)> {
    let mut conn = connect_healthy(net, to, SHORT)?;
    conn.send(hello)?;
    let peer = conn.local_addr();
    let accepted = server.wait_accepted(|a| a.peer == peer, SHORT)?;
    server.wait_bytes(accepted.id, hello.len() as u64, SHORT)?;
    Ok((conn, accepted))
}

/// A client socket bound to an extra client address: the global limit needs several clients.
struct BoundConnection {
    socket: Socket,
    local: SocketAddr,
}

impl BoundConnection {
    fn connect(net: &TestNet, client_ip: IpAddr, to: SocketAddr) -> Result<BoundConnection> {
        let socket = watchdog_tests::run_in_ns(net.client_ns(), move || {
            let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))
                .context("creating client socket")?;
            socket
                .bind(&SockAddr::from(SocketAddr::new(client_ip, 0)))
                .with_context(|| format!("binding {client_ip}"))?;
            Ok(socket)
        })?;
        socket
            .connect_timeout(&SockAddr::from(to), SHORT)
            .with_context(|| format!("connecting {client_ip} -> {to}"))?;
        socket.set_write_timeout(Some(SHORT))?;
        let local = socket
            .local_addr()?
            .as_socket()
            .context("local address is not an IP address")?;
        Ok(BoundConnection { socket, local })
    }

    fn send(&self, bytes: &[u8]) -> Result<()> {
        let mut written = 0;
        while written < bytes.len() {
            written += self.socket.send(&bytes[written..])?;
        }
        Ok(())
    }
}

/// Waits until the agent has logged `want` `would_destroy` + `destroyed` verdicts in all, or
/// `timeout`; returns both lists.
fn wait_verdicts(agent: &Agent, want: usize, timeout: Duration) -> (Vec<Value>, Vec<Value>) {
    let deadline = Instant::now() + timeout;
    loop {
        let refused = agent.events("would_destroy");
        let destroyed = agent.events("destroyed");
        if refused.len() + destroyed.len() >= want || Instant::now() >= deadline {
            return (refused, destroyed);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn client_of(event: &Value) -> Result<SocketAddr> {
    str_field(event, "client")?
        .parse()
        .with_context(|| format!("client field of {event}"))
}

/// Seconds since midnight UTC of an RFC 3339 timestamp as the agent logs it
/// (`2026-12-03T19:38:48.194021Z`).
fn utc_seconds_of_day(timestamp: &str) -> Result<f64> {
    let time = timestamp
        .split_once('T')
        .map(|(_, t)| t.trim_end_matches('Z'))
        .with_context(|| format!("timestamp {timestamp:?}"))?;
    let mut parts = time.split(':');
    let mut next = || -> Result<f64> {
        parts
            .next()
            .and_then(|p| p.parse::<f64>().ok())
            .with_context(|| format!("timestamp {timestamp:?}"))
    };
    Ok(next()? * 3600.0 + next()? * 60.0 + next()?)
}

/// Seconds since midnight UTC now.
fn utc_seconds_of_day_now() -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_secs_f64().rem_euclid(86_400.0)
}

/// A directory removed (with its contents) on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- 1. A flood of spoofed SYNs against live connections ----

/// Live connections and how often each sends.
const LIVE: usize = 5;
const LIVE_EVERY: Duration = Duration::from_millis(100);
/// Spoofed SYNs in all, in rounds of `ROUND` frames `ROUND_GAP` apart (about 1 s in all).
const SPOOFED: usize = 10_000;
const ROUND: usize = 200;
const ROUND_GAP: Duration = Duration::from_millis(20);
/// How long the agent may take to judge the flood after its last SYN (alone on the machine it
/// needs well under 1 s; beside a busy test suite a few seconds).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(6);

/// 10,000 spoofed SYNs with the exact tuples of 5 connections that each send every 100 ms:
/// `--min-idle 3s` refuses every one of them, every refusal is logged, nothing is lost from the
/// ring buffer, and the connections never notice.
#[test]
fn spoofed_syns_against_live_connections_destroy_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("grd_flood")?;
    let server = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let server_addr = net.server_addr(Family::V4, WATCHED);
    let traffic = HealthyTraffic::start(&net, &server, server_addr, LIVE, LIVE_EVERY)?;
    // The flood's 20,000 log events land in the agent's journal too (about 6 MB): in a
    // directory of this test's own, removed at the end.
    let journal = TempDir(std::env::temp_dir().join(format!("wd-journal-{}", net.server_ns())));
    let journal_arg = journal.0.to_string_lossy().into_owned();
    // The connections send every 100 ms; the idle guard is set well above that because on a
    // busy 2-core CI machine (the flood, the agent, parallel tests) a sender thread can stall
    // for over a second, and a connection silent that long is, to the guard, rightly idle.
    // One CI run destroyed a live connection that way with `--min-idle 1s`.
    let agent = start_agent(&net, &["--min-idle", "3s", "--journal", &journal_arg])?;
    traffic.assert_flowing(&server, SHORT)?;

    let mut rng = Rng::from_clock();
    let seed = rng.seed();
    let macs = Macs::client_to_server(&net)?;
    let peers = traffic.peers().to_vec();
    let frames: Vec<Vec<u8>> = (0..SPOOFED)
        .map(|i| syn_frame(macs, peers[i % LIVE], server_addr, rng.next_u32()))
        .collect();
    let injector = FrameInjector::open(net.client_ns(), net.client_iface())?;
    let tx_before = link_info(net.client_ns(), net.client_iface())?;
    let started = Instant::now();
    let mut sent = 0u64;
    for round in frames.chunks(ROUND) {
        let report = injector.send_all(round)?;
        ensure!(
            report.refused.is_empty(),
            "the kernel refused spoofed frames: {report:?}"
        );
        sent += report.sent;
        thread::sleep(ROUND_GAP);
    }
    let send_time = started.elapsed();
    let sent_at = Instant::now();
    let sent_wall = utc_seconds_of_day_now();
    let tx_after = link_info(net.client_ns(), net.client_iface())?;
    let veth_dropped = tx_after.tx_dropped - tx_before.tx_dropped;
    let delivered = sent - veth_dropped;

    // Drained: one refusal per delivered SYN (or the deadline; the counts below then fail).
    // Polled slowly: each look copies every event so far, and the agent needs the CPU.
    let drain_deadline = sent_at + DRAIN_TIMEOUT;
    let mut judged = 0;
    while (judged as u64) < delivered && Instant::now() < drain_deadline {
        thread::sleep(Duration::from_millis(200));
        judged = agent.events("would_destroy").len();
    }
    // From the last spoofed SYN to the agent's last verdict, by the agent's own clock.
    let last_verdict = agent
        .events("would_destroy")
        .last()
        .map(|e| utc_seconds_of_day(str_field(e, "timestamp")?))
        .transpose()?
        .unwrap_or(sent_wall);
    let drain_time = Duration::from_secs_f64((last_verdict - sent_wall).rem_euclid(86_400.0));

    // The live connections never noticed.
    traffic.assert_flowing(&server, SHORT)?;
    ensure!(
        server.closed().is_empty(),
        "a live connection was closed: {:?}",
        server.events()
    );
    let exit = stop_agent(agent)?;
    traffic.finish(&server)?;

    let stale = exit.events("stale_syn");
    let refused = exit.events("would_destroy");
    let replayed = exit.events("replayed");
    let held_events = stale
        .iter()
        .filter(|e| e.get("held").and_then(Value::as_bool) == Some(true))
        .count();
    let reasons = tally(&refused, "reason");
    let counter = |name: &str| exit.counter(name);
    let (stale_syns, held, passed, full) = (
        counter("stale_syns")?,
        counter("held")?,
        counter("replays_passed")?,
        counter("ringbuf_full")?,
    );
    eprintln!(
        "flood (seed {seed:#x}): {sent} spoofed SYNs sent in {send_time:?} over {LIVE} live tuples, \
         {veth_dropped} dropped by the veth; agent drained {drain_time:?} after the last one\n\
         events: stale_syn {} (held {held_events}), would_destroy {} {reasons:?}, replayed {}, \
         destroyed {}\ncounters: {}",
        stale.len(),
        refused.len(),
        replayed.len(),
        exit.events("destroyed").len(),
        exit.counters()?
    );

    ensure!(
        exit.events("destroyed").is_empty(),
        "a live connection was destroyed"
    );
    for name in [
        "already_gone",
        "destroy_failed",
        "replay_failed",
        "bad_record",
    ] {
        ensure!(exit.events(name).is_empty(), "`{name}` events were logged");
    }
    ensure!(
        full == 0 && exit.events("ringbuf_full").is_empty(),
        "the ring buffer overflowed: ringbuf_full = {full} of {delivered} stale SYNs"
    );
    ensure!(
        counter("old_duplicate_syns")? == 0,
        "a random sequence number matched a connection's ISN"
    );
    // Every spoofed SYN that reached the server veth was reported once, and every report was
    // judged and refused, with a logged reason.
    ensure!(
        stale.len() as u64 == delivered,
        "{} stale_syn events for {delivered} delivered spoofed SYNs",
        stale.len()
    );
    ensure!(
        refused.len() == stale.len(),
        "{} would_destroy events for {} stale_syn events: not every refusal was logged",
        refused.len(),
        stale.len()
    );
    for r in &refused {
        let reason = str_field(r, "reason")?;
        ensure!(
            reason.starts_with("min-idle") || reason.starts_with("backed off"),
            "unexpected refusal: {r}"
        );
        ensure!(peers.contains(&client_of(r)?), "unknown client in {r}");
    }
    // The first SYN of a tuple (and any that came before the agent's back-off reached the
    // classifier) is held, judged by the idle guard and re-injected; the rest are reported
    // with `held: false` and refused as backed off. A SYN that arrives while the agent's
    // heartbeat is stale (it is busy draining the flood) is neither held nor backed off: it
    // goes to the kernel and is judged by the idle guard too.
    let min_idle = reasons.get("min-idle").copied().unwrap_or(0);
    let heartbeat_stale = counter("heartbeat_stale")?;
    ensure!(
        min_idle + reasons.get("backed off").copied().unwrap_or(0) == refused.len(),
        "refusals for other reasons: {reasons:?}"
    );
    ensure!(
        min_idle as u64 == held_events as u64 + heartbeat_stale,
        "{min_idle} idle-guard refusals != {held_events} held SYNs + {heartbeat_stale} passed \
         while the heartbeat was stale"
    );
    ensure!(
        held as usize == held_events && replayed.len() == held_events && passed == held,
        "held {held}, held events {held_events}, replayed {}, replays_passed {passed} differ",
        replayed.len()
    );
    // The classifier counts a re-injected SYN again as stale (it meets the same socket), and
    // lets it through as the agent's own replay.
    ensure!(
        stale_syns == stale.len() as u64 + passed,
        "stale_syns {stale_syns} != {} stale_syn events + {passed} replays_passed",
        stale.len()
    );
    ensure!(
        judged as u64 >= delivered,
        "the agent had judged {judged} of {delivered} spoofed SYNs {DRAIN_TIMEOUT:?} after the \
         last one"
    );
    Ok(())
}

// ---- 2. The idle guard ----

/// One connection sends once and stays silent for 1.5 s. A spoofed SYN with its tuple is
/// refused by `--min-idle 5s` and the connection lives on; `--min-idle 1s` destroys it. That is
/// the documented limit of the idle guard: a silent live connection cannot be told apart from a
/// crashed client.
#[test]
fn idle_connection_behaves_as_configured() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("grd_idle")?;
    let server = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let server_addr = net.server_addr(Family::V4, WATCHED);
    let mut rng = Rng::from_clock();
    let (conn, accepted) = idle_connection(&net, &server, server_addr, b"hello\n")?;
    let quiet_since = Instant::now();
    let client = conn.local_addr();

    // --min-idle 5s: refused, alive.
    let agent = start_agent(&net, &["--min-idle", "5s"])?;
    thread::sleep(IDLE.saturating_sub(quiet_since.elapsed()));
    spoof_one(&net, &mut rng, client, server_addr)?;
    let refusal = agent.wait_for_event("would_destroy", SHORT)?;
    thread::sleep(Duration::from_millis(200));
    let exit = stop_agent(agent)?;
    ensure!(
        client_of(&refusal)? == client,
        "refusal for another tuple: {refusal}"
    );
    let reason = str_field(&refusal, "reason")?;
    let idle_ms = num_field(&refusal, "idle_ms")?;
    eprintln!("--min-idle 5s: refused after {idle_ms} ms idle: {reason}");
    ensure!(
        reason.contains("min-idle"),
        "the refusal does not name the idle guard: {refusal}"
    );
    ensure!(
        (1400..5000).contains(&idle_ms),
        "idle_ms {idle_ms} is not the connection's silence (~1.5 s): {refusal}"
    );
    ensure!(exit.events("destroyed").is_empty(), "{}", exit.output());
    ensure!(
        exit.events("replayed").len() == 1,
        "the held SYN was not re-injected once:\n{}",
        exit.output()
    );
    ensure!(
        server.is_open(accepted.id) && server.closed().is_empty(),
        "the idle connection was touched: {:?}",
        server.events()
    );

    // --min-idle 1s: the same silent connection is destroyed.
    let agent = start_agent(&net, &["--min-idle", "1s"])?;
    spoof_one(&net, &mut rng, client, server_addr)?;
    let destroyed = agent.wait_for_event("destroyed", SHORT)?;
    let closed = server.wait_closed_id(accepted.id, SHORT)?;
    let exit = stop_agent(agent)?;
    let idle_ms = num_field(&destroyed, "idle_ms")?;
    eprintln!("--min-idle 1s: destroyed after {idle_ms} ms idle");
    ensure!(
        client_of(&destroyed)? == client,
        "destroyed another tuple: {destroyed}"
    );
    ensure!(
        idle_ms >= 1000,
        "destroyed before 1 s of silence: {destroyed}"
    );
    ensure!(
        closed.how == CloseHow::Error(ECONNABORTED),
        "the idle connection ended with {:?}, expected ECONNABORTED",
        closed.how
    );
    ensure!(exit.events("would_destroy").is_empty(), "{}", exit.output());
    drop(conn);
    Ok(())
}

// ---- 3. Rate limits ----

/// Idle connections per case.
const STORM: usize = 5;

/// A kill storm: one spoofed SYN for each of 5 idle connections. `--per-client-limit 2/1m`
/// (all from one client address) lets exactly 2 be destroyed; `--global-limit 3/1m` (5 client
/// addresses) exactly 3. The rest are refused with a rate-limit reason and live on.
#[test]
fn rate_limits_stop_a_kill_storm() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("grd_rate")?;
    let server = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let server_addr = net.server_addr(Family::V4, WATCHED);
    let mut rng = Rng::from_clock();

    // Case 1: five connections from the client's own address.
    let mut one_client = Vec::new();
    for _ in 0..STORM {
        one_client.push(idle_connection(&net, &server, server_addr, b"hello\n")?);
    }
    // Case 2: five more client addresses on the client veth, one connection each.
    let mut many_clients = Vec::new();
    for host in 0..STORM {
        let ip = Ipv4Addr::new(10, 248, net.index(), 10 + host as u8);
        ns_exec(
            net.client_ns(),
            "ip",
            &[
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                net.client_iface(),
            ],
        )?;
        let conn = BoundConnection::connect(&net, ip.into(), server_addr)?;
        conn.send(b"hello\n")?;
        let accepted = server.wait_accepted(|a| a.peer == conn.local, SHORT)?;
        server.wait_bytes(accepted.id, 6, SHORT)?;
        many_clients.push((conn, accepted));
    }
    thread::sleep(IDLE);

    // --per-client-limit 2/1m: two destroys for 10.248.N.2, then refusals.
    let agent = start_agent(&net, &["--min-idle", "1s", "--per-client-limit", "2/1m"])?;
    for (conn, _) in &one_client {
        spoof_one(&net, &mut rng, conn.local_addr(), server_addr)?;
    }
    let (refused, destroyed) = wait_verdicts(&agent, STORM, SHORT);
    thread::sleep(Duration::from_millis(200));
    let exit = stop_agent(agent)?;
    eprintln!(
        "per-client 2/1m: {} destroyed, refusals {:?}",
        destroyed.len(),
        tally(&refused, "reason")
    );
    check_storm(
        &server,
        &exit,
        one_client
            .iter()
            .map(|(c, a)| (c.local_addr(), *a))
            .collect(),
        2,
        &["2/1m", &net.client_v4().to_string()],
    )?;
    let survivors: Vec<u64> = one_client
        .iter()
        .map(|(_, a)| a.id)
        .filter(|&id| server.is_open(id))
        .collect();

    // --global-limit 3/1m over five clients, each well within its own limit.
    let agent = start_agent(
        &net,
        &[
            "--min-idle",
            "1s",
            "--per-client-limit",
            "10/1m",
            "--global-limit",
            "3/1m",
        ],
    )?;
    for (conn, _) in &many_clients {
        spoof_one(&net, &mut rng, conn.local, server_addr)?;
    }
    let (refused, destroyed) = wait_verdicts(&agent, STORM, SHORT);
    thread::sleep(Duration::from_millis(200));
    let exit = stop_agent(agent)?;
    eprintln!(
        "global 3/1m: {} destroyed, refusals {:?}",
        destroyed.len(),
        tally(&refused, "reason")
    );
    check_storm(
        &server,
        &exit,
        many_clients.iter().map(|(c, a)| (c.local, *a)).collect(),
        3,
        &["3/1m"],
    )?;
    // The first case's survivors were not touched by the second agent.
    for id in survivors {
        ensure!(
            server.is_open(id),
            "connection #{id} was closed: {:?}",
            server.events()
        );
    }
    Ok(())
}

/// Exactly `allowed` of `conns` were destroyed (ECONNABORTED on the server), the others were
/// refused once each with a rate-limit reason that names each of `names` (the limit, and the
/// client for a per-client limit) and are still open.
fn check_storm(
    server: &LegacyServer,
    exit: &AgentExit,
    conns: Vec<(SocketAddr, Accepted)>,
    allowed: usize,
    names: &[&str],
) -> Result<()> {
    let destroyed = exit.events("destroyed");
    let refused = exit.events("would_destroy");
    ensure!(
        destroyed.len() == allowed,
        "{} destroyed, expected exactly {allowed}:\n{}",
        destroyed.len(),
        exit.output()
    );
    ensure!(
        refused.len() == conns.len() - allowed,
        "{} refused, expected {}:\n{}",
        refused.len(),
        conns.len() - allowed,
        exit.output()
    );
    for r in &refused {
        let reason = str_field(r, "reason")?;
        ensure!(
            reason.starts_with("rate limit") && names.iter().all(|n| reason.contains(n)),
            "expected a rate-limit reason naming {names:?}: {r}"
        );
    }
    let destroyed_clients: Vec<SocketAddr> =
        destroyed.iter().map(client_of).collect::<Result<_>>()?;
    let refused_clients: Vec<SocketAddr> = refused.iter().map(client_of).collect::<Result<_>>()?;
    for (client, accepted) in conns {
        if destroyed_clients.contains(&client) {
            let closed = server.wait_closed_id(accepted.id, SHORT)?;
            ensure!(
                closed.how == CloseHow::Error(ECONNABORTED),
                "{client} ended with {:?}, expected ECONNABORTED",
                closed.how
            );
        } else {
            ensure!(
                refused_clients.contains(&client),
                "{client} was neither destroyed nor refused:\n{}",
                exit.output()
            );
            ensure!(
                server.is_open(accepted.id),
                "the refused connection from {client} was closed: {:?}",
                server.events()
            );
        }
    }
    Ok(())
}
