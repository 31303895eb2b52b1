//! Replay mode (the agent's default) against the real kernel: the held SYN comes back right after
//! the destroy, so the dumb client connects on its first SYN; and the watchdog fails open when
//! its agent is killed, frozen, or refuses to destroy.
//!
//! The proof that the client got in on its first SYN is a capture on the client's veth (exactly
//! one SYN left the fixed port during the reconnect) and the client's own `TCP_INFO` (no SYN
//! retransmission), not a wall-clock bound. "As without a watchdog" is measured on the server's
//! `TcpExtTCPChallengeACK` counter: a SYN that reached the kernel for a tuple an ESTABLISHED
//! socket owns is answered with a challenge ACK, a held one is not.

use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use serde_json::Value;
use watchdog_tests::{
    Accepted, Agent, AgentExit, AgentLine, Bind, CloseHow, DumbClient, ECONNABORTED, Family,
    GREETING, HealthyTraffic, LegacyServer, ReconnectOutcome, SynCapture, TestNet,
    assert_nothing_attached, assert_only_program_attached, establish_and_crash, kernel_has_tcx,
    num_field, parse_syn, require_root, scenario, str_field, tcp_ext_counters,
};

const WATCHED: u16 = scenario::SERVER_PORT;
const FIXED: u16 = scenario::FIXED_PORT;
const SHORT: Duration = Duration::from_secs(2);
/// Healthy peers and how often each sends.
const HEALTHY_PEERS: usize = 4;
const HEALTHY_EVERY: Duration = Duration::from_millis(20);
/// How old the agent's heartbeat may be before the classifier stops holding SYNs
/// (`watchdog_common::HEARTBEAT_TIMEOUT_NS`).
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(500);

/// `--iface <server veth> --port 5000`, and whatever else; the mode is the default (replay).
///
/// The idle guard is off (`--min-idle 0s`) unless `extra` sets it: these tests crash the client
/// right after it sent, and they are about the hold-and-replay path, not about that guard.
fn start_agent(net: &TestNet, extra: &[&str]) -> Result<Agent> {
    let mut args = vec!["--iface", net.server_iface(), "--port", "5000"];
    if !extra.contains(&"--min-idle") {
        args.extend_from_slice(&["--min-idle", "0s"]);
    }
    args.extend_from_slice(extra);
    let agent = Agent::start(net, &args)?;
    let attached = agent.wait_for_event("attached", SHORT)?;
    ensure!(
        str_field(&attached, "mode")? == "replay",
        "replay is not the default mode: {attached}"
    );
    Ok(agent)
}

/// Stops the agent (SIGTERM), prints its log and checks the exit and the log's contract.
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
    for name in [
        "packets_seen",
        "syns_checked",
        "stale_syns",
        "ringbuf_full",
        "old_duplicate_syns",
        "held",
        "replays_passed",
        "heartbeat_stale",
    ] {
        exit.counter(name)?;
    }
    ensure!(exit.counter("ringbuf_full")? == 0, "ring buffer overflowed");
    ensure!(!exit.events("detached").is_empty(), "no detached event");
    for bad in ["replay_failed", "destroy_failed", "fatal"] {
        ensure!(exit.events(bad).is_empty(), "{bad}:\n{}", exit.output());
    }
    Ok(exit)
}

/// Kills the agent with SIGKILL and checks what is left on the interface: nothing with TCX;
/// before TCX, its `clsact` filter, which fails open once the heartbeat is stale and which the
/// next agent removes.
fn kill_agent(net: &TestNet, agent: Agent) -> Result<AgentExit> {
    let program_id = agent.program_id()?;
    let exit = agent.kill()?;
    eprintln!("killed agent log ({}):\n{}", exit.status, exit.output());
    ensure!(
        std::os::unix::process::ExitStatusExt::signal(&exit.status) == Some(libc::SIGKILL),
        "the agent did not die of SIGKILL: {}",
        exit.status
    );
    ensure!(
        exit.events("detached").is_empty() && exit.events("counters").is_empty(),
        "a SIGKILLed agent cleaned up, so it was not SIGKILLed:\n{}",
        exit.output()
    );
    if kernel_has_tcx() {
        // Its TCX link died with its file descriptors: the classifier is gone at once.
        assert_nothing_attached(net).context("after SIGKILL")?;
    } else {
        // A netlink filter belongs to the interface, not to the process.
        assert_only_program_attached(net, program_id).context("after SIGKILL (clsact)")?;
    }
    Ok(exit)
}

fn assert_tuple(event: &Value, client: SocketAddr, server: SocketAddr) -> Result<()> {
    ensure!(
        str_field(event, "client")? == client.to_string()
            && str_field(event, "server")? == server.to_string(),
        "expected client {client} and server {server} in {event}"
    );
    Ok(())
}

/// The server namespace's `TcpExtTCPChallengeACK`.
fn challenge_acks(net: &TestNet) -> Result<u64> {
    tcp_ext_counters(net.server_ns())?
        .get("TCPChallengeACK")
        .copied()
        .context("no TCPChallengeACK counter")
}

/// The client's reconnect, running on its own thread; returns once its first SYN is on its way,
/// with that instant: the client's SYN timer (SYNs at 0, 1, 3, 7 s) runs from there, whatever
/// the set-up before it cost (under emulation, a second).
fn spawn_reconnect(
    client: &DumbClient,
    deadline: Duration,
) -> (Instant, JoinHandle<Result<ReconnectOutcome>>) {
    spawn_reconnect_after(client, deadline, || Ok(())).expect("nothing to fail before the SYN")
}

/// [`spawn_reconnect`] that runs `before` on this thread once the client is ready, right before
/// its first SYN leaves.
fn spawn_reconnect_after(
    client: &DumbClient,
    deadline: Duration,
    before: impl FnOnce() -> Result<()>,
) -> Result<(Instant, JoinHandle<Result<ReconnectOutcome>>)> {
    let client = client.clone();
    let (ready, is_ready) = std::sync::mpsc::channel();
    let (go, wait_go) = std::sync::mpsc::channel::<()>();
    let handle = thread::spawn(move || {
        client.reconnect_gated(deadline, move || {
            let _ = ready.send(());
            let _ = wait_go.recv();
        })
    });
    // If the thread fails before its SYN, joining it reports why.
    let _ = is_ready.recv_timeout(Duration::from_secs(30));
    let result = before();
    let started = Instant::now();
    let _ = go.send(());
    result?;
    Ok((started, handle))
}

/// The captured SYNs that left the client's fixed port.
fn client_syns(capture: &SynCapture, client: SocketAddr) -> Vec<Instant> {
    capture
        .syns()
        .iter()
        .filter(|f| parse_syn(&f.bytes).is_some_and(|s| s.src == client))
        .map(|f| f.at)
        .collect()
}

fn join_reconnect(handle: JoinHandle<Result<ReconnectOutcome>>) -> Result<ReconnectOutcome> {
    handle
        .join()
        .map_err(|_| anyhow!("the reconnect thread panicked"))?
}

/// A connection from the client's fixed port other than the stale one.
fn new_connection(server: &LegacyServer, client: &DumbClient, stale: &Accepted) -> Option<u64> {
    let peer = client.local_addr();
    server
        .wait_accepted(|a| a.peer == peer && a.id != stale.id, Duration::ZERO)
        .ok()
        .map(|a| a.id)
}

/// Sleeps until `at`.
fn sleep_until(at: Instant) {
    thread::sleep(at.saturating_duration_since(Instant::now()));
}

/// The stale reader ended with ECONNABORTED (the agent's SOCK_DESTROY), having read everything.
fn assert_destroyed(server: &LegacyServer, stale: &Accepted) -> Result<()> {
    let closed = server.wait_closed_id(stale.id, SHORT)?;
    ensure!(
        closed.how == CloseHow::Error(ECONNABORTED),
        "the stale socket ended with {:?}, expected ECONNABORTED (errno {ECONNABORTED})",
        closed.how
    );
    ensure!(closed.bytes == GREETING.len() as u64, "{closed:?}");
    Ok(())
}

// ---- 1. The first SYN connects ----

fn replay_connects_on_first_syn(tag: &str, bind: Bind, family: Family) -> Result<()> {
    let net = TestNet::new(tag)?;
    let server = LegacyServer::start(&net, bind, WATCHED)?;
    let server_addr = net.server_addr(family, WATCHED);
    let client = DumbClient::new(&net, server_addr, FIXED)?;
    let agent = start_agent(&net, &[])?;
    let attached = agent.events("attached").remove(0);
    ensure!(
        str_field(&attached, "replay")? == "xdp_live_frames",
        "this kernel (≥ 5.18) should re-inject through XDP live frames: {attached}"
    );
    assert_only_program_attached(&net, agent.program_id()?)?;

    let stale = establish_and_crash(&server, &client)?;
    let capture = SynCapture::start(net.client_ns(), net.client_iface())?;
    let out = client.reconnect(SHORT)?;
    eprintln!(
        "{tag}: replay reconnect: connected={} in {:.3} ms, {} SYN retransmissions",
        out.connected,
        out.elapsed.as_secs_f64() * 1e3,
        out.syn_retransmits
    );
    ensure!(
        out.connected,
        "the client did not reconnect within {SHORT:?} ({:?}); server {:?}; agent:\n{}",
        out.error,
        server.events(),
        agent.output()
    );
    ensure!(
        out.syn_retransmits == 0,
        "the client needed {} SYN retransmissions: the held SYN was not replayed in time:\n{}",
        out.syn_retransmits,
        agent.output()
    );
    // The real assertion: exactly one SYN left the fixed port, and it was the one that got in.
    let client_addr = client.local_addr();
    let first = capture.wait_syn(|s| s.src == client_addr && s.dst == server_addr, SHORT)?;
    let syns: Vec<_> = capture
        .syns()
        .iter()
        .filter_map(|f| parse_syn(&f.bytes))
        .filter(|s| s.src == client_addr)
        .collect();
    ensure!(
        syns.len() == 1,
        "expected exactly one SYN from {client_addr} during the reconnect, captured {syns:?}"
    );

    assert_destroyed(&server, &stale)?;
    let fresh = server.wait_accepted(|a| a.peer == client_addr && a.id != stale.id, SHORT)?;
    let mut conn = out.connection.context("connected without a connection")?;
    conn.send(GREETING)?;
    server.wait_bytes(fresh.id, GREETING.len() as u64, SHORT)?;

    agent.wait_for_event("replayed", SHORT)?;
    let exit = stop_agent(agent)?;
    let stale_syns = exit.events("stale_syn");
    ensure!(stale_syns.len() == 1, "{}", exit.output());
    assert_tuple(&stale_syns[0], client_addr, server_addr)?;
    ensure!(
        stale_syns[0].get("held") == Some(&Value::Bool(true)),
        "the stale SYN was not held: {}",
        stale_syns[0]
    );
    let wire_seq = parse_syn(&first).context("not a SYN")?.seq;
    ensure!(num_field(&stale_syns[0], "syn_seq")? == u64::from(wire_seq));
    let destroyed = exit.events("destroyed");
    ensure!(destroyed.len() == 1, "{}", exit.output());
    assert_tuple(&destroyed[0], client_addr, server_addr)?;
    let replayed = exit.events("replayed");
    ensure!(replayed.len() == 1, "{}", exit.output());
    assert_tuple(&replayed[0], client_addr, server_addr)?;
    ensure!(
        str_field(&replayed[0], "method")? == "xdp_live_frames",
        "{}",
        replayed[0]
    );
    eprintln!(
        "{tag}: agent: destroy {} µs, SYN seen → re-injected {} µs",
        num_field(&destroyed[0], "destroy_us")?,
        num_field(&replayed[0], "total_us")?
    );
    ensure!(exit.counter("held")? == 1, "{}", exit.output());
    ensure!(exit.counter("stale_syns")? == 1, "{}", exit.output());
    ensure!(exit.counter("replays_passed")? == 0, "{}", exit.output());
    ensure!(exit.counter("heartbeat_stale")? == 0, "{}", exit.output());
    // The first connect's SYN, the stale SYN and its re-injection.
    ensure!(exit.counter("syns_checked")? == 3, "{}", exit.output());
    ensure!(server.closed().len() == 1, "{:?}", server.events());
    Ok(())
}

#[test]
fn replay_connects_on_first_syn_ipv4() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    replay_connects_on_first_syn("rp4", Bind::V4, Family::V4)
}

#[test]
fn replay_connects_on_first_syn_ipv6() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    replay_connects_on_first_syn("rp6", Bind::V6, Family::V6)
}

#[test]
fn replay_connects_on_first_syn_dual_stack_with_ipv4_client() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    replay_connects_on_first_syn("rpdual", Bind::DualStack, Family::V4)
}

/// A burst: clients on fixed ports 1025… crash together and reconnect at the same instant.
/// While one held SYN's handshake runs on the agent's replayer thread, the agent judges and
/// destroys the next stale socket; every client must still get in on its first SYN, every stale
/// socket be destroyed, every held SYN be re-injected exactly once.
#[test]
fn a_burst_of_rebooted_clients_all_connect_on_their_first_syn() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const CLIENTS: usize = 16;
    let net = TestNet::new("rpburst")?;
    let server = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let server_addr = net.server_addr(Family::V4, WATCHED);
    let clients = (FIXED..)
        .take(CLIENTS)
        .map(|port| DumbClient::new(&net, server_addr, port))
        .collect::<Result<Vec<_>>>()?;
    // The clients share one address here (a site's devices have one each): the per-client
    // rate limit must let all of them through.
    let agent = start_agent(&net, &["--per-client-limit", "100/10s"])?;
    let stale = clients
        .iter()
        .map(|client| establish_and_crash(&server, client))
        .collect::<Result<Vec<_>>>()?;

    // Every client set up, then all first SYNs at once.
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let reconnects: Vec<_> = clients
        .iter()
        .map(|client| {
            let (client, barrier) = (client.clone(), barrier.clone());
            thread::spawn(move || {
                client.reconnect_gated(SHORT, move || {
                    barrier.wait();
                })
            })
        })
        .collect();
    let outcomes = reconnects
        .into_iter()
        .map(join_reconnect)
        .collect::<Result<Vec<_>>>()?;
    for (client, out) in clients.iter().zip(&outcomes) {
        ensure!(
            out.connected && out.syn_retransmits == 0,
            "{}: connected={} after {} SYN retransmissions ({:?}); agent:\n{}",
            client.local_addr(),
            out.connected,
            out.syn_retransmits,
            out.error,
            agent.output()
        );
    }
    for stale in &stale {
        assert_destroyed(&server, stale)?;
    }

    agent.wait_for_events("replayed", CLIENTS, SHORT)?;
    let exit = stop_agent(agent)?;
    for event in ["stale_syn", "destroyed", "replayed"] {
        let mut seen: Vec<String> = exit
            .events(event)
            .iter()
            .map(|e| str_field(e, "client").map(str::to_owned))
            .collect::<Result<_>>()?;
        seen.sort();
        let mut expected: Vec<String> =
            clients.iter().map(|c| c.local_addr().to_string()).collect();
        expected.sort();
        ensure!(
            seen == expected,
            "`{event}` once per client expected, got {seen:?}:\n{}",
            exit.output()
        );
    }
    ensure!(exit.counter("held")? == CLIENTS as u64, "{}", exit.output());
    ensure!(exit.counter("replays_passed")? == 0, "{}", exit.output());
    Ok(())
}

// ---- 2. SIGKILL while healthy traffic flows ----

/// A SIGKILLed agent takes its classifier with it: healthy traffic never notices, the next
/// crash behaves exactly as without a watchdog, and a restarted agent takes over.
#[test]
fn sigkill_leaves_traffic_alone_and_a_restart_takes_over() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("rpkill")?;
    let server = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let server_addr = net.server_addr(Family::V4, WATCHED);
    let client = DumbClient::new(&net, server_addr, FIXED)?;
    let agent = start_agent(&net, &[])?;
    assert_only_program_attached(&net, agent.program_id()?)?;
    let healthy = HealthyTraffic::start(&net, &server, server_addr, HEALTHY_PEERS, HEALTHY_EVERY)?;
    healthy.assert_flowing(&server, SHORT)?;

    kill_agent(&net, agent)?;
    if !kernel_has_tcx() {
        // The killed agent's clsact filter stays until the next agent; it holds nothing once
        // the heartbeat is stale.
        thread::sleep(HEARTBEAT_TIMEOUT + Duration::from_millis(100));
    }
    healthy.assert_flowing(&server, SHORT)?;

    // Without an agent: the client's SYNs reach the kernel and get challenge ACKs.
    let stale = establish_and_crash(&server, &client)?;
    let acks_before = challenge_acks(&net)?;
    let capture = SynCapture::start(net.client_ns(), net.client_iface())?;
    let client_addr = client.local_addr();
    // SYNs at 0, 1, 3 and 7 s: the restart comes after the second, and its SYN gets in at 3 s
    // (or, where an agent takes more than 0.8 s to start, as under emulation, at 7 s).
    let (started, reconnect) = spawn_reconnect(&client, Duration::from_secs(9));
    sleep_until(started + Duration::from_millis(2200));
    let acks = challenge_acks(&net)? - acks_before;
    eprintln!("no agent: {acks} challenge ACK(s) in 2.2 s");
    ensure!(
        new_connection(&server, &client, &stale).is_none(),
        "the client got in with no agent running: {:?}",
        server.events()
    );
    ensure!(server.is_open(stale.id), "{:?}", server.events());
    ensure!(
        acks >= 2,
        "the server answered {acks} of the client's SYNs with a challenge ACK: with no agent, \
         every SYN must reach the kernel"
    );
    healthy.assert_flowing(&server, SHORT)?;

    // A new agent takes over cleanly: exactly its own program, and the next SYN gets in.
    let agent = start_agent(&net, &[])?;
    assert_only_program_attached(&net, agent.program_id()?)?;
    let restarted_at = started.elapsed();
    let out = join_reconnect(reconnect)?;
    eprintln!(
        "restart at {restarted_at:?}: connected={} after {:?}, {} SYN retransmissions",
        out.connected, out.elapsed, out.syn_retransmits
    );
    ensure!(
        out.connected,
        "the client did not get in after the restart: {out:?}\n{}",
        agent.output()
    );
    ensure!(
        out.syn_retransmits >= 2,
        "connected on SYN #{} although no agent ran for the first 2.2 s",
        out.syn_retransmits + 1
    );
    // Fail-open, exactly: every SYN before the one that got in met the kernel.
    let syns = client_syns(&capture, client_addr).len() as u64;
    let acks = challenge_acks(&net)? - acks_before;
    ensure!(
        acks == syns - 1,
        "{syns} SYNs, {acks} challenge ACKs: a SYN before the restart was swallowed"
    );
    assert_destroyed(&server, &stale)?;
    healthy.assert_flowing(&server, SHORT)?;

    let exit = stop_agent(agent)?;
    ensure!(exit.events("destroyed").len() == 1, "{}", exit.output());
    ensure!(exit.events("replayed").len() == 1, "{}", exit.output());
    ensure!(
        server.closed().len() == 1,
        "only the stale connection may end: {:?}",
        server.closed()
    );
    healthy.finish(&server)?;
    Ok(())
}

// ---- 3. SIGKILL while a SYN is held ----

/// The agent is frozen with a fresh heartbeat, so the classifier holds the client's first SYN
/// for it; then it is killed and that SYN is lost with it. The client's retransmission (the
/// same as without any watchdog) reaches the restarted agent and gets in.
#[test]
fn sigkill_with_a_held_syn_loses_only_that_syn() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("rpheld")?;
    let server = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let server_addr = net.server_addr(Family::V4, WATCHED);
    let client = DumbClient::new(&net, server_addr, FIXED)?;
    let agent = start_agent(&net, &[])?;
    let healthy = HealthyTraffic::start(&net, &server, server_addr, HEALTHY_PEERS, HEALTHY_EVERY)?;
    let stale = establish_and_crash(&server, &client)?;
    let capture = SynCapture::start(net.client_ns(), net.client_iface())?;
    let client_addr = client.local_addr();
    let acks_before = challenge_acks(&net)?;

    // Frozen right before the first SYN leaves: its heartbeat is fresh for that SYN. SYNs at
    // 0, 1, 3 and 7 s: the restart normally comes before the second.
    let (started, reconnect) =
        spawn_reconnect_after(&client, Duration::from_secs(8), || agent.sigstop())?;
    capture.wait_syn(|s| s.src == client_addr, Duration::from_millis(300))?;
    sleep_until(started + Duration::from_millis(100));
    // The first SYN left the client and got no challenge ACK: the classifier holds it.
    ensure!(
        challenge_acks(&net)? == acks_before,
        "the first SYN reached the kernel although the frozen agent's heartbeat was fresh"
    );
    kill_agent(&net, agent)?;

    let agent = start_agent(&net, &[])?;
    assert_only_program_attached(&net, agent.program_id()?)?;
    let restarted_at = started.elapsed();
    let out = join_reconnect(reconnect)?;
    let syns = client_syns(&capture, client_addr).len();
    let acks = challenge_acks(&net)? - acks_before;
    eprintln!(
        "restart at {restarted_at:?}: connected={} after {:?}, {} SYN retransmissions, {syns} SYNs, \
         {acks} challenge ACKs",
        out.connected, out.elapsed, out.syn_retransmits
    );
    // No connection attempt is lost for good: the one SYN the killed agent held is lost, and
    // the first retransmission that meets the restarted agent gets in.
    ensure!(
        out.connected,
        "the client did not get in after the restart: {out:?}\n{}",
        agent.output()
    );
    ensure!(
        syns as u32 == out.syn_retransmits + 1,
        "{syns} SYNs captured, {} retransmissions",
        out.syn_retransmits
    );
    // Only the held SYN was lost: any other SYN before the one that got in (sent while the
    // restart was under way) met the kernel, as without a watchdog.
    ensure!(
        acks == syns as u64 - 2,
        "{syns} SYNs, {acks} challenge ACKs: a SYN other than the held one was lost"
    );
    if restarted_at < Duration::from_millis(900) {
        ensure!(
            out.syn_retransmits == 1,
            "the agent was back at {restarted_at:?}, before the first retransmission, yet the \
             client needed {} retransmissions",
            out.syn_retransmits
        );
    }
    assert_destroyed(&server, &stale)?;
    ensure!(
        new_connection(&server, &client, &stale).is_some(),
        "{:?}",
        server.events()
    );

    let exit = stop_agent(agent)?;
    ensure!(exit.events("destroyed").len() == 1, "{}", exit.output());
    ensure!(exit.events("replayed").len() == 1, "{}", exit.output());
    ensure!(exit.counter("held")? == 1, "{}", exit.output());
    ensure!(server.closed().len() == 1, "{:?}", server.closed());
    healthy.finish(&server)?;
    Ok(())
}

// ---- 4. A frozen agent fails open ----

/// SIGSTOP: the heartbeat goes stale after 500 ms and the classifier stops holding, so the
/// client's SYNs meet the kernel as without a watchdog. After SIGCONT the agent catches up.
#[test]
fn frozen_agent_fails_open() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("rpfrozen")?;
    let server = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let server_addr = net.server_addr(Family::V4, WATCHED);
    let client = DumbClient::new(&net, server_addr, FIXED)?;
    let agent = start_agent(&net, &[])?;
    let healthy = HealthyTraffic::start(&net, &server, server_addr, HEALTHY_PEERS, HEALTHY_EVERY)?;
    let stale = establish_and_crash(&server, &client)?;

    agent.sigstop()?;
    thread::sleep(Duration::from_millis(700));
    let acks_before = challenge_acks(&net)?;
    let (started, reconnect) = spawn_reconnect(&client, Duration::from_millis(4500));
    sleep_until(started + Duration::from_millis(1500));
    let acks = challenge_acks(&net)? - acks_before;
    eprintln!("frozen agent: {acks} challenge ACK(s) in 1.5 s");
    ensure!(
        acks >= 1,
        "no challenge ACK: the frozen agent's stale heartbeat did not stop the holding"
    );
    ensure!(
        new_connection(&server, &client, &stale).is_none(),
        "{:?}",
        server.events()
    );
    ensure!(server.is_open(stale.id), "{:?}", server.events());
    healthy.assert_flowing(&server, SHORT)?;

    agent.sigcont()?;
    let out = join_reconnect(reconnect)?;
    eprintln!(
        "thawed at 1.5 s: connected={} after {:?}, {} SYN retransmissions",
        out.connected, out.elapsed, out.syn_retransmits
    );
    ensure!(
        out.connected,
        "the client did not get in after SIGCONT: {out:?}\n{}",
        agent.output()
    );
    ensure!(
        out.syn_retransmits >= 2,
        "connected on SYN #{} although the agent was frozen for the first 1.5 s",
        out.syn_retransmits + 1
    );
    assert_destroyed(&server, &stale)?;

    let exit = stop_agent(agent)?;
    ensure!(exit.counter("heartbeat_stale")? >= 1, "{}", exit.output());
    ensure!(exit.events("destroyed").len() == 1, "{}", exit.output());
    ensure!(server.closed().len() == 1, "{:?}", server.closed());
    healthy.finish(&server)?;
    Ok(())
}

// ---- 5. A refused destroy still lets the SYN through ----

/// `--min-idle 30s` refuses to destroy a socket that received data a moment ago; the held SYN
/// is re-injected anyway and meets the kernel as without a watchdog.
#[test]
fn refused_destroy_still_lets_the_syn_through() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("rprefuse")?;
    let server = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let server_addr = net.server_addr(Family::V4, WATCHED);
    let client = DumbClient::new(&net, server_addr, FIXED)?;
    let agent = start_agent(&net, &["--min-idle", "30s"])?;
    let stale = establish_and_crash(&server, &client)?;

    let acks_before = challenge_acks(&net)?;
    let out = client.reconnect(Duration::from_millis(2500))?;
    let acks = challenge_acks(&net)? - acks_before;
    eprintln!(
        "--min-idle 30s: connected={} after {:?}, {} SYN retransmissions, {acks} challenge ACK(s)",
        out.connected, out.elapsed, out.syn_retransmits
    );
    ensure!(!out.connected, "the client got in:\n{}", agent.output());
    ensure!(
        acks >= 1,
        "no challenge ACK: the re-injected SYN did not reach the kernel:\n{}",
        agent.output()
    );
    ensure!(
        server.is_open(stale.id) && server.closed().is_empty(),
        "the refused socket was touched: {:?}",
        server.events()
    );

    let exit = stop_agent(agent)?;
    let would = exit.events("would_destroy");
    ensure!(!would.is_empty(), "no would_destroy:\n{}", exit.output());
    ensure!(
        str_field(&would[0], "reason")?.contains("min-idle"),
        "the first refusal does not name --min-idle: {}",
        would[0]
    );
    // A retransmission may come while the refused tuple is backed off (1 s from the refusal;
    // the client's SYN timer is 1 s from its SYN, so it depends on how fast the agent was).
    for w in &would {
        assert_tuple(w, client.local_addr(), server_addr)?;
        ensure!(
            str_field(w, "reason")?.contains("min-idle")
                || str_field(w, "refusal")? == "backed_off",
            "a refusal by neither the idle guard nor its back-off: {w}"
        );
    }
    ensure!(exit.events("destroyed").is_empty(), "{}", exit.output());
    let replayed = exit.events("replayed");
    ensure!(
        !replayed.is_empty(),
        "the held SYN was not re-injected:\n{}",
        exit.output()
    );
    ensure!(exit.counter("held")? >= 1, "{}", exit.output());
    ensure!(exit.counter("replays_passed")? >= 1, "{}", exit.output());
    // One replay per held SYN, each let through once.
    ensure!(
        replayed.len() as u64 == exit.counter("held")?
            && exit.counter("replays_passed")? == exit.counter("held")?,
        "held, replayed and passed differ:\n{}",
        exit.output()
    );
    Ok(())
}
