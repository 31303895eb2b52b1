//! `cargo xtask demo`: the seed's scenario, played for real in two network namespaces.
//!
//! Phase 1 shows the user's problem without the watchdog: a DOS box that always connects from
//! port 1025 crashes and can never get back in. Phase 2 shows the same crash with the agent
//! running: the stale socket is destroyed and the client gets back in (with its first SYN when
//! the agent holds and replays it, else with its next SYN retransmission).
//!
//! A human timeline goes to stderr; exactly one JSON line with the measurements goes to stdout.
//! The exit status is non-zero when the demo could not run (not root, agent missing) or the
//! scenario did not behave (the bug did not reproduce, or the watchdog did not fix it).

use std::fmt::Display;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;
use watchdog_tests::scenario::{FIXED_PORT, GREETING, SERVER_PORT};
use watchdog_tests::{
    Agent, Bind, CloseHow, Closed, Crash, DumbClient, ECONNABORTED, Family, LegacyServer,
    ReconnectOutcome, TestNet, establish_and_crash_after, is_root, tcp_ext_counters,
};

/// How long the client waits for its reconnect in each phase.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// How long the DOS box runs before it crashes (the stale socket's idle time at the reboot).
/// Longer than the agent's default idle guard (`--min-idle 1s`): a rebooting device has been
/// silent for a while, and the demo runs the agent with its defaults.
const UPTIME: Duration = Duration::from_millis(1500);
/// How long to wait for the agent's log lines and the server's close.
const SHORT: Duration = Duration::from_secs(2);

const WITHOUT_HEADER: &str = "\
Phase 1: without watchdog
  A DOS box (the client) always connects from port 1025 to a legacy server on port 5000 that
  only reads and never writes. When the DOS box crashes, no FIN and no RST reach the server, so
  the server's socket stays ESTABLISHED. After its reboot the client sends a SYN with the very
  same 4-tuple. Since RFC 5961 the kernel does not take that SYN as the end of the old
  connection: it drops it and answers with a \"challenge ACK\", expecting a RST back. The legacy
  client ignores the ACK, retransmits its SYN on its own timer, meets the same stale socket, and
  never gets back in. The server never notices, because it never writes.";

const WITH_HEADER: &str = "\
Phase 2: with watchdog
  The same crash, with `watchdog run --iface <server veth> --port 5000` running in the server's
  namespace. Its TC classifier sees the rebooted client's SYN hit an ESTABLISHED socket and
  reports it through a ring buffer; the agent looks the socket up by its exact tuple and destroys
  it with sock_diag SOCK_DESTROY (what `ss -K` does). The server's blocked read() fails with
  ECONNABORTED, and the tuple is free for the client's SYN.";

/// What happens to the client's SYN, by the agent's mode (its `attached` event).
fn mode_note(mode: &str) -> &'static str {
    match mode {
        "replay" => {
            "mode replay: the classifier holds the SYN and the agent re-injects it once the socket \
             is destroyed, so the client's first SYN connects"
        }
        "destroy" => {
            "mode destroy: the SYN meets the challenge ACK once more; the client's next SYN \
             retransmission (its own 1 s timer) connects"
        }
        _ => "unexpected mode",
    }
}

/// The stdout line. Field order is the order written here.
#[derive(Serialize)]
struct Summary {
    without_watchdog: Phase<Without>,
    with_watchdog: Phase<With>,
    /// True when both phases behaved as the demo promises.
    ok: bool,
    problems: Vec<String>,
}

/// A phase's measurements, or why it could not run.
#[derive(Serialize)]
#[serde(untagged)]
enum Phase<T> {
    Ran(T),
    Failed { error: String },
}

#[derive(Serialize)]
struct Without {
    reconnected: bool,
    waited_ms: u64,
    /// The first SYN and its retransmissions.
    syns_sent: u32,
    /// `TcpExtTCPChallengeACK` in the server's namespace during the reconnect.
    challenge_acks: u64,
    stale_socket_still_open: bool,
}

#[derive(Serialize)]
struct With {
    reconnected: bool,
    reconnect_ms: u64,
    reconnect_us: u64,
    destroyed: usize,
    /// SYN seen in TC → event read by the agent.
    syn_to_event_us: Option<u64>,
    /// sock_diag look-up + destroy.
    destroy_us: Option<u64>,
    /// SYN seen in TC → socket destroyed.
    syn_to_destroyed_us: Option<u64>,
    /// How the server's blocked read ended ("ECONNABORTED", "EOF", "errno N", "still blocked").
    server_read_returned: String,
    /// From the client's first SYN to the server's read returning.
    server_read_returned_us: Option<u64>,
    syn_retransmits: u32,
    /// How long the stale socket had received nothing when it was destroyed.
    idle_ms: Option<u64>,
    /// The agent's mode, from its `attached` event ("replay", "destroy").
    mode: Option<String>,
    /// SYN seen in TC → held SYN re-injected (mode replay only).
    syn_to_replayed_us: Option<u64>,
    /// How the classifier was attached ("tcx" or "clsact").
    attach: Option<String>,
    /// `watchdog run` started → `attached` logged.
    agent_start_ms: u64,
}

impl Without {
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.reconnected {
            problems.push(
                "without the watchdog the client reconnected: the bug did not reproduce".into(),
            );
        }
        if !self.stale_socket_still_open {
            problems.push("without the watchdog the stale server socket went away".into());
        }
        problems
    }
}

impl With {
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.reconnected {
            problems.push(format!(
                "with the watchdog the client did not reconnect within {} ms",
                self.reconnect_ms
            ));
        }
        if self.destroyed != 1 {
            problems.push(format!(
                "the agent destroyed {} sockets, expected 1",
                self.destroyed
            ));
        }
        if self.server_read_returned != "ECONNABORTED" {
            problems.push(format!(
                "the server's read ended with {}, expected ECONNABORTED",
                self.server_read_returned
            ));
        }
        problems
    }
}

/// Prints timeline lines, stamped with the time since the phase's origin.
struct Timeline {
    origin: Instant,
}

impl Timeline {
    fn new(origin: Instant) -> Timeline {
        Timeline { origin }
    }

    fn at(&self, when: Instant, what: impl Display) {
        let since = when.saturating_duration_since(self.origin);
        eprintln!("  {:>8}  {what}", stamp(since));
    }

    /// Sub-millisecond steps, indented under the line of the SYN they follow, in time order.
    fn steps(&self, mut after_syn: Vec<(Duration, String)>) {
        after_syn.sort_by_key(|(at, _)| *at);
        for (at, what) in after_syn {
            eprintln!("  {:>8}  {:>8}  {what}", "", stamp(at));
        }
    }
}

/// `+0.000 s`, `+10.20 s`, `+0.31 ms`.
fn stamp(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if d >= Duration::from_secs(10) {
        format!("+{secs:.2} s")
    } else if d.is_zero() || d >= Duration::from_millis(10) {
        format!("+{secs:.3} s")
    } else {
        format!("+{:.2} ms", secs * 1e3)
    }
}

/// Rounded to the nearest millisecond.
fn millis(d: Duration) -> u64 {
    u64::try_from((d + Duration::from_micros(500)).as_millis()).unwrap_or(u64::MAX)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn num(event: &Value, field: &str) -> Option<u64> {
    event.get(field).and_then(Value::as_u64)
}

fn text(event: &Value, field: &str) -> Option<String> {
    event.get(field).and_then(Value::as_str).map(str::to_owned)
}

fn read_result(closed: Option<&Closed>) -> String {
    match closed.map(|c| c.how) {
        None => "still blocked".into(),
        Some(CloseHow::Error(ECONNABORTED)) => "ECONNABORTED".into(),
        Some(CloseHow::Error(errno)) => format!("errno {errno}"),
        Some(CloseHow::Eof) => "EOF".into(),
    }
}

/// The server, the client and its crash: the part both phases share.
struct Stage {
    net: TestNet,
    server: LegacyServer,
    client: DumbClient,
}

impl Stage {
    fn new(tag: &str) -> Result<Stage> {
        let net = TestNet::new(tag)?;
        let server = LegacyServer::start(&net, Bind::V4, SERVER_PORT)?;
        let client = DumbClient::new(&net, net.server_addr(Family::V4, SERVER_PORT), FIXED_PORT)?;
        Ok(Stage {
            net,
            server,
            client,
        })
    }

    /// Connects, sends, crashes after [`UPTIME`].
    fn connect_and_crash(&self) -> Result<Crash> {
        establish_and_crash_after(&self.server, &self.client, UPTIME)
    }

    fn tell_crash(&self, timeline: &Timeline, crash: &Crash) {
        timeline.at(
            crash.connected_at,
            format!(
                "client connected from {} to {}, sends {} bytes (the server reads them)",
                self.client.local_addr(),
                self.client.server(),
                GREETING.len()
            ),
        );
        timeline.at(
            crash.crashed_at,
            "client crashes (no FIN, no RST reach the server: its socket stays ESTABLISHED)",
        );
    }

    /// `TcpExtTCPChallengeACK` of the server's namespace.
    fn challenge_acks(&self) -> Result<u64> {
        let counters = tcp_ext_counters(self.net.server_ns())?;
        Ok(counters.get("TCPChallengeACK").copied().unwrap_or(0))
    }
}

fn without_watchdog() -> Result<Without> {
    let stage = Stage::new("demo_without")?;
    let crash = stage.connect_and_crash()?;
    let timeline = Timeline::new(crash.connected_at);
    stage.tell_crash(&timeline, &crash);
    let acks_before = stage.challenge_acks()?;
    timeline.at(
        Instant::now(),
        format!(
            "client reboots and connects again from port {FIXED_PORT} (same 4-tuple); it waits up to {:.0} s",
            RECONNECT_DEADLINE.as_secs_f64()
        ),
    );
    let out = stage.client.reconnect(RECONNECT_DEADLINE)?;
    let challenge_acks = stage.challenge_acks()?.saturating_sub(acks_before);
    let syns_sent = out.syn_retransmits + 1;
    let end = out.started + out.elapsed;
    if out.connected {
        timeline.at(end, "client connected: the bug did not reproduce");
    } else {
        timeline.at(
            end,
            format!(
                "still not connected after {:.1} s: {syns_sent} SYNs, each answered by a challenge ACK the client ignores (the server sent {challenge_acks})",
                out.elapsed.as_secs_f64()
            ),
        );
    }
    let still_open = stage.server.is_open(crash.stale.id);
    if still_open {
        timeline.at(
            Instant::now(),
            "the server still holds the stale connection, blocked in read(); nothing will end it",
        );
    }
    Ok(Without {
        reconnected: out.connected,
        waited_ms: millis(out.elapsed),
        syns_sent,
        challenge_acks,
        stale_socket_still_open: still_open,
    })
}

/// What the agent logged about the stale SYN.
struct AgentView {
    stale_syn: Option<Value>,
    destroyed: Option<Value>,
    replayed: Option<Value>,
}

impl AgentView {
    fn collect(agent: &Agent, mode: Option<&str>) -> AgentView {
        AgentView {
            stale_syn: agent.wait_for_event("stale_syn", SHORT).ok(),
            destroyed: agent.wait_for_event("destroyed", SHORT).ok(),
            replayed: if mode == Some("replay") {
                agent.wait_for_event("replayed", SHORT).ok()
            } else {
                None
            },
        }
    }

    fn syn_to_event_us(&self) -> Option<u64> {
        num(self.stale_syn.as_ref()?, "event_latency_us")
    }

    fn destroyed(&self, field: &str) -> Option<u64> {
        num(self.destroyed.as_ref()?, field)
    }

    fn syn_to_replayed_us(&self) -> Option<u64> {
        num(self.replayed.as_ref()?, "total_us")
    }

    /// The timeline steps, as time after the SYN was seen in TC.
    fn steps(&self, stage: &Stage) -> Vec<(Duration, String)> {
        let mut steps = Vec::new();
        if let Some(us) = self.syn_to_event_us() {
            steps.push((
                Duration::from_micros(us),
                "agent: gets the classifier's report: an ESTABLISHED socket owns the SYN's tuple"
                    .to_owned(),
            ));
        }
        if let (Some(total), Some(took)) =
            (self.destroyed("total_us"), self.destroyed("destroy_us"))
        {
            let idle = self
                .destroyed("idle_ms")
                .map_or("?".into(), |ms| ms.to_string());
            let lookup = self
                .destroyed("lookup_us")
                .map_or("?".into(), |us| us.to_string());
            steps.push((
                Duration::from_micros(total),
                format!(
                    "agent: stale socket {} ↔ {} destroyed (idle {idle} ms ≥ the 1 s idle guard; sock_diag look-up {lookup} µs, destroy {took} µs)",
                    stage.client.server(),
                    stage.client.local_addr(),
                ),
            ));
        }
        if let Some(us) = self.syn_to_replayed_us() {
            let how = self
                .replayed
                .as_ref()
                .and_then(|e| text(e, "method"))
                .unwrap_or_default();
            steps.push((
                Duration::from_micros(us),
                format!("agent: held SYN re-injected ({how})"),
            ));
        }
        steps
    }
}

/// Starts the agent and prints its `attached` line; returns the agent and its mode.
fn start_agent(stage: &Stage, timeline: &Timeline) -> Result<(Agent, Value)> {
    let iface = stage.net.server_iface();
    let port = SERVER_PORT.to_string();
    let agent = Agent::start(&stage.net, &["--iface", iface, "--port", &port])?;
    let attached = agent.wait_for_event("attached", SHORT)?;
    let mode = text(&attached, "mode").unwrap_or_default();
    timeline.at(
        Instant::now(),
        format!(
            "agent attached to {iface} ingress ({}, program {}), watching port {port}",
            text(&attached, "attach").unwrap_or("?".into()),
            num(&attached, "program_id").map_or("?".into(), |id| id.to_string())
        ),
    );
    eprintln!("  {:>8}  ({})", "", mode_note(&mode));
    Ok((agent, attached))
}

fn with_watchdog() -> Result<With> {
    let stage = Stage::new("demo_with")?;
    let timeline = Timeline::new(Instant::now());
    let (agent, attached) = start_agent(&stage, &timeline)?;
    let agent_start = timeline.origin.elapsed();
    let mode = text(&attached, "mode");

    let crash = stage.connect_and_crash()?;
    stage.tell_crash(&timeline, &crash);
    let out = stage.client.reconnect(RECONNECT_DEADLINE)?;
    timeline.at(
        out.started,
        format!(
            "client reboots and connects again from port {FIXED_PORT} (same 4-tuple); after its first SYN:"
        ),
    );
    let view = AgentView::collect(&agent, mode.as_deref());
    let mut steps = view.steps(&stage);
    let closed = stage.server.wait_closed_id(crash.stale.id, SHORT).ok();
    let read_returned = read_result(closed.as_ref());
    let server_read_returned_us = closed
        .as_ref()
        .map(|c| micros(c.at.saturating_duration_since(out.started)));
    if let Some(us) = server_read_returned_us {
        steps.push((
            Duration::from_micros(us),
            format!("server: its blocked read() returns {read_returned}; it closes the socket"),
        ));
    }
    timeline.steps(steps);
    report_reconnect(&timeline, &out, stage.client.local_addr(), mode.as_deref());

    let journal = agent.journal().to_path_buf();
    let exit = agent.stop()?;
    show_journal(&journal, stage.client.local_addr());
    Ok(With {
        reconnected: out.connected,
        reconnect_ms: millis(out.elapsed),
        reconnect_us: micros(out.elapsed),
        destroyed: exit.events("destroyed").len(),
        syn_to_event_us: view.syn_to_event_us(),
        destroy_us: view.destroyed("destroy_us"),
        syn_to_destroyed_us: view.destroyed("total_us"),
        server_read_returned: read_returned,
        server_read_returned_us,
        syn_retransmits: out.syn_retransmits,
        idle_ms: view.destroyed("idle_ms"),
        syn_to_replayed_us: view.syn_to_replayed_us(),
        mode,
        attach: text(&attached, "attach"),
        agent_start_ms: millis(agent_start),
    })
}

/// What an operator would read afterwards: `watchdog events` for the client, from the
/// agent's journal.
fn show_journal(journal: &std::path::Path, client: SocketAddr) {
    let output = std::process::Command::new(Agent::binary())
        .arg("events")
        .arg("--journal")
        .arg(journal)
        .args(["--client", &client.ip().to_string()])
        .output();
    eprintln!(
        "\n  What the journal says afterwards (`watchdog events --client {}`):",
        client.ip()
    );
    match output {
        Ok(out) if out.status.success() => {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                eprintln!("    {line}");
            }
        }
        Ok(out) => eprintln!(
            "    watchdog events failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("    could not run watchdog events: {e}"),
    }
}

fn report_reconnect(
    timeline: &Timeline,
    out: &ReconnectOutcome,
    from: SocketAddr,
    mode: Option<&str>,
) {
    let end = out.started + out.elapsed;
    if !out.connected {
        timeline.at(
            end,
            format!(
                "still not connected after {:.1} s: the watchdog did not fix it",
                out.elapsed.as_secs_f64()
            ),
        );
        return;
    }
    let which = match (out.syn_retransmits, mode) {
        (0, Some("replay")) => "its first SYN, held and re-injected".to_owned(),
        (0, _) => "its first SYN".to_owned(),
        (1, _) => "its first SYN retransmission".to_owned(),
        (n, _) => format!("SYN retransmission #{n}"),
    };
    timeline.at(
        end,
        format!(
            "client connected from {from} ({which}; {} after the first SYN)",
            stamp(out.elapsed).trim_start_matches('+')
        ),
    );
}

impl<T> Phase<T> {
    fn not_run() -> Phase<T> {
        Phase::Failed {
            error: "not run".into(),
        }
    }
}

fn run_phase<T>(header: &str, phase: impl FnOnce() -> Result<T>) -> Phase<T> {
    eprintln!("\n{header}\n");
    match phase() {
        Ok(report) => Phase::Ran(report),
        Err(e) => {
            let error = format!("{e:#}");
            eprintln!("  error: {error}");
            Phase::Failed { error }
        }
    }
}

fn problems_of<T>(phase: &Phase<T>, name: &str, check: impl Fn(&T) -> Vec<String>) -> Vec<String> {
    match phase {
        Phase::Ran(report) => check(report),
        Phase::Failed { error } => vec![format!("{name} could not run: {error}")],
    }
}

fn tell_result(without: &Without, with: &With) {
    let how = if with.syn_retransmits == 0 {
        "with its first SYN"
    } else {
        "on its own SYN timer"
    };
    eprintln!(
        "\nResult: without the watchdog the client was still locked out after {:.1} s. With it, \
         the stale socket was gone {:.2} ms after the client's SYN, and the client was back in \
         after {} ({how}).",
        without.waited_ms as f64 / 1e3,
        with.syn_to_destroyed_us.unwrap_or(0) as f64 / 1e3,
        stamp(Duration::from_micros(with.reconnect_us)).trim_start_matches('+'),
    );
}

/// The summary when the demo cannot run at all.
fn not_run(why: &str) -> Summary {
    Summary {
        without_watchdog: Phase::not_run(),
        with_watchdog: Phase::not_run(),
        ok: false,
        problems: vec![why.into()],
    }
}

fn main() -> ExitCode {
    let agent = Agent::binary();
    let summary = if !is_root() {
        not_run(
            "the demo needs root (network namespaces, nftables, eBPF): run `sudo -E cargo xtask demo`",
        )
    } else if !agent.is_file() {
        not_run(&format!(
            "no agent binary at {}: run `cargo xtask demo`, which builds it",
            agent.display()
        ))
    } else {
        let without_watchdog = run_phase(WITHOUT_HEADER, without_watchdog);
        let with_watchdog = run_phase(WITH_HEADER, with_watchdog);
        let mut problems = problems_of(&without_watchdog, "phase 1", Without::problems);
        problems.extend(problems_of(&with_watchdog, "phase 2", With::problems));
        Summary {
            without_watchdog,
            with_watchdog,
            ok: problems.is_empty(),
            problems,
        }
    };
    if let (Phase::Ran(without), Phase::Ran(with), true) = (
        &summary.without_watchdog,
        &summary.with_watchdog,
        summary.ok,
    ) {
        tell_result(without, with);
    }
    for problem in &summary.problems {
        eprintln!("\ndemo: FAILED: {problem}");
    }
    match serde_json::to_string(&summary) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("demo: cannot serialize the summary: {e}");
            return ExitCode::FAILURE;
        }
    }
    if summary.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
