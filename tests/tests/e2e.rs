//! End-to-end tests: real kernel, real namespaces, real agent.
//!
//! Each test builds its own `TestNet`, so they run in parallel. The agent binary must have been
//! built first (`cargo xtask test` does it); set `WATCHDOG_BIN` to use another one.

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use watchdog_tests::{
    Agent, AgentExit, AgentLine, Bind, CloseHow, DumbClient, ECONNABORTED, Family, GREETING,
    HealthyTraffic, LegacyServer, SynCapture, TestNet, connect_healthy, establish_and_crash,
    ns_exec, num_field, parse_syn, require_root, scenario, send_frame, str_field,
};

/// The port the agent watches.
const WATCHED: u16 = scenario::SERVER_PORT;
/// A port with the same legacy service, which the agent must leave alone.
const UNWATCHED: u16 = 5001;
/// The DOS box's fixed source port.
const FIXED: u16 = scenario::FIXED_PORT;
const SHORT: Duration = Duration::from_secs(2);

/// `--iface <server veth> --port <port> --mode destroy --min-idle 0s`: these tests are about
/// detecting and destroying the stale socket, so the client reconnects on its own SYN
/// retransmission. Holding and replaying the SYN (the default mode) is tested in `replay.rs`.
/// The idle guard is off: the client crashes right after it sent, and the guard has tests of
/// its own.
fn watch_args(net: &TestNet, port: &str) -> Vec<String> {
    let mut args = scope_args(net, port);
    args.extend(["--mode", "destroy", "--min-idle", "0s"].map(String::from));
    args
}

/// `--iface <server veth> --port <port>`
fn scope_args(net: &TestNet, port: &str) -> Vec<String> {
    vec![
        "--iface".into(),
        net.server_iface().into(),
        "--port".into(),
        port.into(),
    ]
}

fn start_agent(net: &TestNet, args: &[String]) -> Result<Agent> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start(net, &args)
}

/// Stops the agent, prints its log (seen with `--nocapture` or on failure) and checks the exit.
fn stop_agent(agent: Agent) -> Result<AgentExit> {
    let exit = agent.stop()?;
    eprintln!("agent log ({}):\n{}", exit.status, exit.output());
    ensure!(exit.status.success(), "agent exited with {}", exit.status);
    check_log_contract(&exit)?;
    Ok(exit)
}

/// Checks an event's `client` and `server` fields (Rust `SocketAddr` Display).
fn assert_tuple(event: &Value, client: SocketAddr, server: SocketAddr) -> Result<()> {
    ensure!(
        str_field(event, "client")? == client.to_string(),
        "expected client {client} in {event}"
    );
    ensure!(
        str_field(event, "server")? == server.to_string(),
        "expected server {server} in {event}"
    );
    Ok(())
}

/// Whether `event[field]` names `needle`: a JSON array holding it (as string or number), or a
/// string listing it as one of its words (the agent prints lists comma-separated, `"5000,5001"`).
fn mentions(event: &Value, field: &str, needle: &str) -> bool {
    let is = |v: &Value| match v {
        Value::String(s) => s
            .split(|c: char| !(c.is_alphanumeric() || c == '.' || c == ':' || c == '/'))
            .any(|word| word == needle),
        Value::Number(n) => n.as_u64().is_some_and(|n| needle.parse() == Ok(n)),
        _ => false,
    };
    match event.get(field) {
        Some(Value::Array(items)) => items.iter().any(is),
        Some(other) => is(other),
        None => false,
    }
}

/// Every line of the contract has `event` and `message`; `counters` has all five numbers.
fn check_log_contract(exit: &AgentExit) -> Result<()> {
    for line in &exit.lines {
        if let AgentLine::Json(v) = line {
            str_field(v, "event")?;
            str_field(v, "message")?;
        }
    }
    let counters = exit.counters()?;
    for name in [
        "packets_seen",
        "syns_checked",
        "stale_syns",
        "ringbuf_full",
        "old_duplicate_syns",
    ] {
        num_field(&counters, name)?;
    }
    ensure!(exit.counter("ringbuf_full")? == 0, "ring buffer overflowed");
    ensure!(!exit.events("detached").is_empty(), "no detached event");
    Ok(())
}

#[test]
fn without_watchdog_reconnect_still_fails_after_10s() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("nowd")?;
    let server = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let client = DumbClient::new(&net, net.server_addr(Family::V4, WATCHED), FIXED)?;
    let stale = establish_and_crash(&server, &client)?;

    let out = client.reconnect(Duration::from_secs(10))?;
    eprintln!(
        "without watchdog: connected={} after {:?}, {} SYN retransmissions",
        out.connected, out.elapsed, out.syn_retransmits
    );
    ensure!(
        !out.connected,
        "the dumb client reconnected without the watchdog: the test bed is not reproducing the bug"
    );
    ensure!(
        out.error.is_none(),
        "connect failed outright: {:?}",
        out.error
    );
    // It really kept trying (SYNs at 1 s intervals on 6.x kernels, then backing off).
    ensure!(
        out.syn_retransmits >= 3,
        "expected the client to retransmit its SYN, got {}",
        out.syn_retransmits
    );
    ensure!(
        server.is_open(stale.id),
        "the stale server socket went away: {:?}",
        server.events()
    );
    ensure!(
        server.closed().is_empty(),
        "unexpected close: {:?}",
        server.closed()
    );
    ensure!(server.open_connections() == 1);
    Ok(())
}

/// The main scenario: crash, reconnect from the same port, the agent destroys the stale socket.
fn watchdog_recovers(tag: &str, bind: Bind, family: Family) -> Result<()> {
    let net = TestNet::new(tag)?;
    let server = LegacyServer::start(&net, bind, WATCHED)?;
    let server_addr = net.server_addr(family, WATCHED);
    let client = DumbClient::new(&net, server_addr, FIXED)?;
    let agent = start_agent(&net, &watch_args(&net, "5000"))?;
    let attached = agent.events("attached").remove(0);
    ensure!(
        mentions(&attached, "ifaces", net.server_iface()),
        "attached does not name {}: {attached}",
        net.server_iface()
    );
    ensure!(
        mentions(&attached, "ports", "5000"),
        "attached does not name port 5000: {attached}"
    );
    ensure!(
        attached.get("mode").is_some(),
        "attached has no mode: {attached}"
    );

    let stale = establish_and_crash(&server, &client)?;
    let capture = SynCapture::start(net.client_ns(), net.client_iface())?;
    let out = client.reconnect(Duration::from_secs(5))?;
    eprintln!(
        "{tag}: connected={} after {:?}, {} SYN retransmissions",
        out.connected, out.elapsed, out.syn_retransmits
    );
    ensure!(
        out.connected,
        "the client did not reconnect within 5 s ({:?}); server events {:?}; agent output:\n{}",
        out.error,
        server.events(),
        agent.output()
    );

    // The agent acted on the first stale SYN: the client's next SYN (its first retransmission,
    // 1 s later, since it ignores the challenge ACK) already got in.
    ensure!(
        out.syn_retransmits <= 1,
        "the client needed {} SYN retransmissions:\n{}",
        out.syn_retransmits,
        agent.output()
    );

    // The stale reader was aborted by SOCK_DESTROY, after reading everything the client sent.
    let closed = server.wait_closed_id(stale.id, SHORT)?;
    ensure!(
        closed.how == CloseHow::Error(ECONNABORTED),
        "stale socket ended with {:?}, expected ECONNABORTED",
        closed.how
    );
    ensure!(closed.bytes == GREETING.len() as u64);
    let fresh =
        server.wait_accepted(|a| a.peer == client.local_addr() && a.id != stale.id, SHORT)?;
    ensure!(
        closed.at <= fresh.at,
        "new connection accepted before the stale one was destroyed"
    );

    // The new connection carries data.
    let mut conn = out.connection.context("connected without a connection")?;
    conn.send(GREETING)?;
    server.wait_bytes(fresh.id, GREETING.len() as u64, SHORT)?;

    let client_addr = client.local_addr();
    let destroyed = agent.wait_for_event("destroyed", SHORT)?;
    assert_tuple(&destroyed, client_addr, server_addr)?;
    let destroy_us = num_field(&destroyed, "destroy_us")?;
    let total_us = num_field(&destroyed, "total_us")?;
    ensure!(
        destroy_us <= total_us,
        "destroy_us > total_us in {destroyed}"
    );
    let stale_syns = agent.events("stale_syn");
    ensure!(
        !stale_syns.is_empty(),
        "no stale_syn event:\n{}",
        agent.output()
    );
    let stale_syn = &stale_syns[0];
    assert_tuple(stale_syn, client_addr, server_addr)?;
    num_field(stale_syn, "event_latency_us")?;
    ensure!(num_field(stale_syn, "ifindex")? == u64::from(net.server_ifindex()?));
    // The reported sequence number is the rebooted client's SYN's, as seen on the wire.
    let syn = capture.wait_syn(|s| s.src == client_addr && s.dst == server_addr, SHORT)?;
    let wire_seq = parse_syn(&syn).context("not a SYN")?.seq;
    ensure!(
        num_field(stale_syn, "syn_seq")? == u64::from(wire_seq),
        "syn_seq differs from the SYN on the wire ({wire_seq}): {stale_syn}"
    );

    let exit = stop_agent(agent)?;
    let destroyed = exit.events("destroyed");
    ensure!(
        destroyed.len() == 1,
        "expected exactly one destroyed event:\n{}",
        exit.output()
    );
    ensure!(
        exit.events("destroy_failed").is_empty(),
        "{}",
        exit.output()
    );
    ensure!(exit.counter("stale_syns")? >= 1, "{}", exit.output());
    // Only the crashed connection was touched.
    ensure!(server.closed().len() == 1, "{:?}", server.events());
    Ok(())
}

#[test]
fn watchdog_destroys_stale_socket_and_client_reconnects() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    watchdog_recovers("v4", Bind::V4, Family::V4)
}

#[test]
fn watchdog_destroys_stale_socket_and_client_reconnects_ipv6() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    watchdog_recovers("v6", Bind::V6, Family::V6)
}

#[test]
fn watchdog_destroys_stale_socket_on_dual_stack_server_with_ipv4_client() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    watchdog_recovers("dual", Bind::DualStack, Family::V4)
}

#[test]
fn healthy_connections_and_unwatched_ports_are_untouched() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("healthy")?;
    let watched = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let unwatched = LegacyServer::start(&net, Bind::V4, UNWATCHED)?;
    let agent = start_agent(&net, &watch_args(&net, "5000"))?;

    // Healthy peers from ephemeral ports keep talking to the watched port throughout.
    let healthy = HealthyTraffic::start(
        &net,
        &watched,
        net.server_addr(Family::V4, WATCHED),
        4,
        Duration::from_millis(20),
    )?;

    // The same crash on both ports, then both clients reboot at once.
    let client_w = DumbClient::new(&net, net.server_addr(Family::V4, WATCHED), FIXED)?;
    let client_u = DumbClient::new(&net, net.server_addr(Family::V4, UNWATCHED), FIXED)?;
    let stale_w = establish_and_crash(&watched, &client_w)?;
    let stale_u = establish_and_crash(&unwatched, &client_u)?;
    let unwatched_reconnect =
        thread::spawn(move || client_u.reconnect(Duration::from_millis(2500)));
    let out_w = client_w.reconnect(Duration::from_secs(5))?;
    let out_u = unwatched_reconnect
        .join()
        .map_err(|_| anyhow::anyhow!("reconnect thread panicked"))??;

    ensure!(
        out_w.connected,
        "watched client did not reconnect:\n{}",
        agent.output()
    );
    ensure!(
        !out_u.connected,
        "the client of the unwatched port reconnected: its stale socket was destroyed"
    );
    let closed_w = watched.wait_closed_id(stale_w.id, SHORT)?;
    ensure!(closed_w.how == CloseHow::Error(ECONNABORTED));

    ensure!(
        watched.closed().len() == 1,
        "only the stale connection may end: {:?}",
        watched.closed()
    );
    // Every healthy connection is open and has read everything that was sent.
    healthy.finish(&watched)?;
    ensure!(
        unwatched.closed().is_empty() && unwatched.is_open(stale_u.id),
        "the unwatched port's stale socket was touched: {:?}",
        unwatched.events()
    );

    let exit = stop_agent(agent)?;
    let destroyed = exit.events("destroyed");
    ensure!(
        destroyed.len() == 1,
        "expected one destroyed event:\n{}",
        exit.output()
    );
    assert_tuple(&destroyed[0], client_w.local_addr(), client_w.server())?;
    for e in exit.events("stale_syn") {
        ensure!(
            str_field(&e, "server")? == client_w.server().to_string(),
            "stale_syn for an unwatched port: {e}"
        );
    }
    Ok(())
}

#[test]
fn old_duplicate_of_original_syn_does_not_kill_connection() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("olddup")?;
    let server = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let agent = start_agent(&net, &watch_args(&net, "5000"))?;

    let capture = SynCapture::start(net.client_ns(), net.client_iface())?;
    let mut conn = connect_healthy(&net, net.server_addr(Family::V4, WATCHED), SHORT)?;
    let local = conn.local_addr();
    let syn = capture.wait_syn(|s| s.src == local, SHORT)?;
    let info = parse_syn(&syn).context("captured frame is not a SYN")?;
    let accepted = server.wait_accepted(|a| a.peer == local, SHORT)?;
    conn.send(GREETING)?;
    server.wait_bytes(accepted.id, GREETING.len() as u64, SHORT)?;

    // The network delivers the original SYN again, three times, long after the handshake.
    for _ in 0..3 {
        send_frame(net.client_ns(), net.client_iface(), &syn)?;
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(500));

    ensure!(
        server.is_open(accepted.id) && server.closed().is_empty(),
        "the old duplicate SYN (seq {}) killed the connection: {:?}\nagent:\n{}",
        info.seq,
        server.events(),
        agent.output()
    );
    conn.send(GREETING)?;
    server.wait_bytes(accepted.id, 2 * GREETING.len() as u64, SHORT)?;
    ensure!(
        conn.pending_error()?.is_none(),
        "the client socket saw an error"
    );

    let exit = stop_agent(agent)?;
    ensure!(exit.events("destroyed").is_empty(), "{}", exit.output());
    ensure!(exit.events("would_destroy").is_empty(), "{}", exit.output());
    ensure!(exit.events("stale_syn").is_empty(), "{}", exit.output());
    ensure!(
        exit.counter("old_duplicate_syns")? >= 1,
        "the replayed SYN was not counted as an old duplicate:\n{}",
        exit.output()
    );
    ensure!(exit.counter("stale_syns")? == 0, "{}", exit.output());
    Ok(())
}

#[test]
fn dry_run_reports_and_destroys_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("dry")?;
    let server = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let server_addr = net.server_addr(Family::V4, WATCHED);
    let client = DumbClient::new(&net, server_addr, FIXED)?;
    let mut args = scope_args(&net, "5000");
    args.push("--dry-run".into());
    let agent = start_agent(&net, &args)?;

    let stale = establish_and_crash(&server, &client)?;
    let out = client.reconnect(Duration::from_millis(2500))?;
    let would = agent.wait_for_event("would_destroy", SHORT)?;
    assert_tuple(&would, client.local_addr(), server_addr)?;

    ensure!(
        !out.connected,
        "the client reconnected under --dry-run:\n{}",
        agent.output()
    );
    ensure!(
        server.is_open(stale.id) && server.closed().is_empty(),
        "--dry-run closed a socket: {:?}",
        server.events()
    );
    let exit = stop_agent(agent)?;
    ensure!(exit.events("destroyed").is_empty(), "{}", exit.output());
    Ok(())
}

/// `--client` decides whom the agent protects: with a prefix that excludes the client, its stale
/// socket is left alone (the classifier does not even look the SYN up); with the client's /32,
/// the same stale socket is destroyed as usual.
#[test]
fn client_prefix_filter_limits_the_watchdog_to_listed_clients() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("prefix")?;
    let server = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let server_addr = net.server_addr(Family::V4, WATCHED);
    let client = DumbClient::new(&net, server_addr, FIXED)?;
    let stale = establish_and_crash(&server, &client)?;
    let with_client = |prefix: &str| {
        let mut args = watch_args(&net, "5000");
        args.extend(["--client".into(), prefix.into()]);
        args
    };

    // A prefix that excludes the client (TEST-NET-1): the watchdog is not there for it.
    let agent = start_agent(&net, &with_client("192.0.2.0/24"))?;
    let out = client.reconnect(Duration::from_millis(2500))?;
    ensure!(
        !out.connected,
        "the client outside --client 192.0.2.0/24 got in:\n{}",
        agent.output()
    );
    ensure!(
        server.is_open(stale.id) && server.closed().is_empty(),
        "the stale socket of a client outside the prefix was touched: {:?}",
        server.events()
    );
    let exit = stop_agent(agent)?;
    for event in ["stale_syn", "would_destroy", "destroyed"] {
        ensure!(exit.events(event).is_empty(), "{event}:\n{}", exit.output());
    }
    ensure!(
        exit.counter("packets_seen")? > 0,
        "the classifier saw no packets at all:\n{}",
        exit.output()
    );
    ensure!(
        exit.counter("syns_checked")? == 0,
        "the classifier looked up SYNs of a client outside the prefix:\n{}",
        exit.output()
    );

    // The client's own /32: the same stale socket goes, the client gets in.
    let own = format!("{}/32", net.client_v4());
    let agent = start_agent(&net, &with_client(&own))?;
    let attached = agent.events("attached").remove(0);
    ensure!(
        mentions(&attached, "clients", &own),
        "attached does not name {own}: {attached}"
    );
    let out = client.reconnect(Duration::from_secs(5))?;
    ensure!(
        out.connected,
        "the client inside --client {own} did not reconnect within 5 s:\n{}",
        agent.output()
    );
    let closed = server.wait_closed_id(stale.id, SHORT)?;
    ensure!(
        closed.how == CloseHow::Error(ECONNABORTED),
        "{:?}",
        closed.how
    );
    let exit = stop_agent(agent)?;
    let destroyed = exit.events("destroyed");
    ensure!(destroyed.len() == 1, "{}", exit.output());
    assert_tuple(&destroyed[0], client.local_addr(), server_addr)?;
    ensure!(exit.counter("syns_checked")? >= 1, "{}", exit.output());
    Ok(())
}

// ---- Sanity checks of the bed itself (no agent needed) ----

/// The bed's destroy path works without the agent: `ss -K` (the same `SOCK_DESTROY`) on the
/// stale socket ends its reader with ECONNABORTED and lets the dumb client in, for each family.
#[test]
fn bed_control_ss_kill_lets_dumb_client_reconnect() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cases = [
        ("ssk4", Bind::V4, Family::V4),
        ("ssk6", Bind::V6, Family::V6),
        ("sskd", Bind::DualStack, Family::V4),
    ];
    let handles: Vec<_> = cases
        .into_iter()
        .map(|(tag, bind, family)| {
            thread::spawn(move || ss_kill_case(tag, bind, family).with_context(|| tag.to_owned()))
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("case panicked"))??;
    }
    Ok(())
}

fn ss_kill_case(tag: &str, bind: Bind, family: Family) -> Result<()> {
    let net = TestNet::new(tag)?;
    let server = LegacyServer::start(&net, bind, WATCHED)?;
    let client = DumbClient::new(&net, net.server_addr(family, WATCHED), FIXED)?;
    let stale = establish_and_crash(&server, &client)?;
    // The crash left the server socket ESTABLISHED.
    let listing = ns_exec(net.server_ns(), "ss", &["-tnH", "state", "established"])?;
    ensure!(
        listing.contains(":1025"),
        "no established socket from port 1025:\n{listing}"
    );

    ns_exec(
        net.server_ns(),
        "ss",
        &["-K", "-tnH", "state", "established", "( dport = :1025 )"],
    )
    .context("ss -K (needs CONFIG_INET_DIAG_DESTROY)")?;
    let closed = server.wait_closed_id(stale.id, SHORT)?;
    ensure!(
        closed.how == CloseHow::Error(ECONNABORTED),
        "{:?}",
        closed.how
    );

    let out = client.reconnect(SHORT)?;
    ensure!(out.connected, "no reconnect after ss -K: {out:?}");
    ensure!(
        out.syn_retransmits == 0,
        "the first SYN should connect once the stale socket is gone: {out:?}"
    );
    // Connected before the client's 1 s SYN timer, counted from its SYN (not from the firewall
    // set-up before it, which takes a second under emulation).
    ensure!(
        out.elapsed < Duration::from_millis(900),
        "connected only after {:?}",
        out.elapsed
    );
    server.wait_accepted(|a| a.peer == client.local_addr() && a.id != stale.id, SHORT)?;
    Ok(())
}

/// A client that closes normally is seen as EOF, and a missing agent binary gives the hint.
#[test]
fn bed_sees_normal_close_and_explains_missing_agent() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("bed")?;
    let server = LegacyServer::start(&net, Bind::V6, WATCHED)?;
    let mut conn = connect_healthy(&net, net.server_addr(Family::V6, WATCHED), SHORT)?;
    conn.send(GREETING)?;
    let peer = conn.local_addr();
    drop(conn);
    let closed = server.wait_closed(peer, SHORT)?;
    ensure!(
        closed.how == CloseHow::Eof && closed.bytes == GREETING.len() as u64,
        "{closed:?}"
    );
    ensure!(server.open_connections() == 0);

    match Agent::start_binary(std::path::Path::new("/nonexistent/watchdog"), &net, &[]) {
        Ok(_) => bail!("an agent started from a missing binary"),
        Err(e) => {
            let msg = format!("{e:#}");
            ensure!(msg.contains("cargo xtask test"), "unhelpful error: {msg}");
        }
    }
    Ok(())
}
