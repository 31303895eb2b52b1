//! The second legacy client: smoltcp, a real embedded TCP/IP stack on a TAP device, loses power
//! and reconnects from its fixed port (see `src/embedded_client.rs` for the topology).
//!
//! smoltcp is not the seed's deaf client: in SYN-SENT it answers the server's RFC 5961 challenge
//! ACK with a RST whose sequence number is the challenge ACK's acknowledgment number, i.e. the
//! stale socket's `rcv_nxt`, which resets that socket; it then waits for its own SYN
//! retransmission timer (initial RTO 1 s). Without the watchdog it therefore recovers by itself in
//! about a second (a *cooperating* client); with the watchdog (replay mode) its first SYN gets in.
//! Both tests print the wire trace seen on the TAP and the numbers.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use watchdog_tests::{
    Accepted, Agent, AgentLine, Bind, CloseHow, ECONNABORTED, EmbeddedClient, EmbeddedReconnect,
    Family, GREETING, LegacyServer, TestNet, require_root, scenario, str_field, tcp_ext_counters,
};

const WATCHED: u16 = scenario::SERVER_PORT;
const FIXED: u16 = scenario::FIXED_PORT;
const SHORT: Duration = Duration::from_secs(2);
/// How long the rebooted device may try.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(3);
/// smoltcp's initial retransmission timeout (`RTTE_INITIAL_RTO`, 1 s): its SYN is re-sent no
/// earlier than this (minus scheduling slack).
const SMOLTCP_FIRST_RTO: Duration = Duration::from_millis(950);

/// The server's RFC 5961 challenge ACKs so far (`TcpExtTCPChallengeACK`).
fn challenge_acks(net: &TestNet) -> Result<u64> {
    Ok(tcp_ext_counters(net.server_ns())?
        .get("TCPChallengeACK")
        .copied()
        .unwrap_or(0))
}

/// The device powers on, connects from the fixed port, sends [`GREETING`] (acknowledged), and
/// loses power. Returns the client, the server's now stale connection, and when the server last
/// received data on it.
fn establish_and_cut_power(
    net: &TestNet,
    server: &LegacyServer,
) -> Result<(EmbeddedClient, Accepted, Instant)> {
    let client = EmbeddedClient::start(net, net.server_addr(Family::V4, WATCHED), FIXED)?;
    let took = client.connect(SHORT)?;
    client.send(GREETING)?;
    let last_data = Instant::now();
    let peer = client.local_addr();
    let stale = server.wait_accepted(|a| a.peer == peer, SHORT)?;
    server.wait_bytes(stale.id, GREETING.len() as u64, SHORT)?;
    client.crash()?;
    eprintln!(
        "smoltcp {peer} (MAC {:02x?}) connected in {took:?}, sent {} bytes, power cut",
        client.mac(),
        GREETING.len()
    );
    Ok((client, stale, last_data))
}

fn report(tag: &str, out: &EmbeddedReconnect, challenges: u64) {
    eprintln!(
        "{tag}: connected={} after {:.3} ms; SYNs sent {}, RSTs sent {}, challenge ACKs \
         received {}, RSTs received {}; server TCPChallengeACK +{challenges}; new ISN {:?}; \
         state {}\nwire (TAP, port {FIXED}):\n{}",
        out.connected,
        out.elapsed.as_secs_f64() * 1e3,
        out.syns_sent,
        out.rsts_sent,
        out.acks_received,
        out.rsts_received,
        out.isn,
        out.state,
        out.trace()
    );
}

/// The rebooted device's new connection carries data to a new server connection.
fn new_connection_works(
    server: &LegacyServer,
    client: &EmbeddedClient,
    stale: &Accepted,
) -> Result<()> {
    let fresh =
        server.wait_accepted(|a| a.peer == client.local_addr() && a.id != stale.id, SHORT)?;
    client.send(GREETING)?;
    server.wait_bytes(fresh.id, GREETING.len() as u64, SHORT)?;
    Ok(())
}

/// Without the watchdog, smoltcp recovers by itself: its first SYN meets the stale socket and
/// draws a challenge ACK, smoltcp answers with a RST carrying exactly the stale socket's
/// `rcv_nxt`, the kernel resets the stale socket (its reader sees ECONNRESET), and smoltcp's SYN
/// retransmission one RTO (1 s) later connects.
#[test]
fn without_watchdog_smoltcp_resets_the_stale_socket_itself_and_waits_one_rto() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("smol_nowd")?;
    let server = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let (client, stale, _) = establish_and_cut_power(&net, &server)?;

    let before = challenge_acks(&net)?;
    let out = client.reconnect(RECONNECT_DEADLINE)?;
    let challenges = challenge_acks(&net)? - before;
    report("without watchdog", &out, challenges);
    let closed = server.wait_closed_id(stale.id, SHORT)?;
    eprintln!(
        "stale server socket ended with {:?} {:.3} ms after the reconnect started",
        closed.how,
        closed
            .at
            .saturating_duration_since(out.started)
            .as_secs_f64()
            * 1e3
    );

    // The wire: SYN → challenge ACK → RST (seq = the challenge ACK's ack) → SYN → SYN-ACK.
    ensure!(
        out.connected,
        "smoltcp did not reconnect by itself:\n{}",
        out.trace()
    );
    ensure!(
        challenges == 1 && out.acks_received == 1,
        "expected one challenge ACK (server counted {challenges}, client saw {}):\n{}",
        out.acks_received,
        out.trace()
    );
    let challenge = out
        .segments
        .iter()
        .find(|s| s.is_pure_ack())
        .context("no challenge ACK on the wire")?;
    let rst = out
        .segments
        .iter()
        .find(|s| s.is_rst())
        .context("smoltcp sent no RST")?;
    ensure!(
        out.rsts_sent == 1 && rst.at >= challenge.at && rst.seq == challenge.ack,
        "expected exactly one RST answering the challenge ACK with seq = its ack ({}):\n{}",
        challenge.ack,
        out.trace()
    );
    ensure!(
        out.syns_sent == 2,
        "expected the first SYN (challenged) and one retransmission, got {} SYNs:\n{}",
        out.syns_sent,
        out.trace()
    );
    // The RST reset the stale socket (RST, not SOCK_DESTROY: ECONNRESET, not ECONNABORTED).
    ensure!(
        closed.how == CloseHow::Error(libc::ECONNRESET),
        "stale socket ended with {:?}, expected ECONNRESET from smoltcp's RST",
        closed.how
    );
    ensure!(closed.bytes == GREETING.len() as u64);
    // ...yet smoltcp waits for its retransmission timer before it tries again.
    ensure!(
        out.elapsed >= SMOLTCP_FIRST_RTO && out.elapsed < SHORT,
        "expected recovery after smoltcp's 1 s RTO, took {:?}",
        out.elapsed
    );
    new_connection_works(&server, &client, &stale)?;
    ensure!(server.closed().len() == 1, "{:?}", server.events());
    Ok(())
}

/// With the agent (default mode replay, default guards), the first SYN is held, the stale socket
/// destroyed, the SYN replayed: smoltcp connects on its first SYN, sends no RST and never sees a
/// challenge ACK.
#[test]
fn watchdog_lets_rebooted_smoltcp_in_on_its_first_syn() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("smol_wd")?;
    let server = LegacyServer::start(&net, Bind::V4, WATCHED)?;
    let agent = Agent::start(&net, &["--iface", net.server_iface(), "--port", "5000"])?;
    let attached = agent.wait_for_event("attached", SHORT)?;
    ensure!(
        str_field(&attached, "mode")? == "replay",
        "replay is not the default mode: {attached}"
    );
    // The default idle guard destroys only a socket that received nothing for `min_idle`: the
    // powered-off device stays silent that long (plus a margin) before it boots again. The agent
    // reports the guard in `attached`; without that field, assume the documented default, 1 s.
    let min_idle = Duration::from_millis(
        attached
            .get("min_idle_ms")
            .and_then(Value::as_u64)
            .unwrap_or(1000),
    );
    let (client, stale, last_data) = establish_and_cut_power(&net, &server)?;
    let silent = min_idle + Duration::from_millis(250);
    thread::sleep(silent.saturating_sub(last_data.elapsed()));
    eprintln!(
        "agent idle guard min_idle={min_idle:?}: device silent for {:?} before rebooting",
        last_data.elapsed()
    );

    let before = challenge_acks(&net)?;
    let out = client.reconnect(RECONNECT_DEADLINE)?;
    let challenges = challenge_acks(&net)? - before;
    report("with watchdog (replay)", &out, challenges);
    ensure!(
        out.connected,
        "smoltcp did not reconnect within {RECONNECT_DEADLINE:?}:\n{}\nagent:\n{}",
        out.trace(),
        agent.output()
    );
    ensure!(
        out.syns_sent == 1 && out.rsts_sent == 0 && out.acks_received == 0 && challenges == 0,
        "expected the first SYN to connect with no challenge ACK and no RST:\n{}\nagent:\n{}",
        out.trace(),
        agent.output()
    );
    ensure!(
        out.elapsed < SMOLTCP_FIRST_RTO,
        "connected only after {:?}: not on the first SYN",
        out.elapsed
    );

    let closed = server.wait_closed_id(stale.id, SHORT)?;
    ensure!(
        closed.how == CloseHow::Error(ECONNABORTED),
        "stale socket ended with {:?}, expected ECONNABORTED (SOCK_DESTROY)",
        closed.how
    );
    ensure!(closed.bytes == GREETING.len() as u64);
    new_connection_works(&server, &client, &stale)?;

    let client_addr = client.local_addr().to_string();
    for event in ["destroyed", "replayed"] {
        let e = agent.wait_for_event(event, SHORT)?;
        ensure!(
            str_field(&e, "client")? == client_addr,
            "{event} names another client: {e}"
        );
        eprintln!("agent {event}: {e}");
    }
    let exit = agent.stop()?;
    eprintln!("agent log ({}):\n{}", exit.status, exit.output());
    ensure!(exit.status.success(), "agent exited with {}", exit.status);
    ensure!(
        exit.events("destroyed").len() == 1,
        "expected one destroyed event:\n{}",
        exit.output()
    );
    for bad in ["would_destroy", "destroy_failed", "replay_failed", "fatal"] {
        ensure!(exit.events(bad).is_empty(), "{bad}:\n{}", exit.output());
    }
    ensure!(
        exit.lines
            .iter()
            .all(|l| !matches!(l, AgentLine::Stdout(_))),
        "the agent printed on stdout:\n{}",
        exit.output()
    );
    ensure!(server.closed().len() == 1, "{:?}", server.events());
    Ok(())
}
