//! Operating the watchdog: what an operator relies on besides the data path, end to end against
//! the real agent binary.
//!
//! * The journal keeps every record across a restart; `watchdog events` reads it back as JSON
//!   lines and as a table, and its filters select what they say.
//! * `watchdog events --follow` streams a live record from the control socket.
//! * The control socket admits root (and its `--control-group`), and the kernel refuses
//!   everyone else.
//! * `/metrics` parses as Prometheus text and counts what the journal records.
//! * The systemd unit's capability set is enough, and each of its capabilities is needed (or,
//!   for CAP_NET_RAW, needed only for the fallback this kernel does not use).
//!
//! Every agent gets its journal and control socket in a scratch directory of the test's own, so
//! nothing is left behind in the temp directory.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chrono::{DateTime, FixedOffset};
use prometheus_parse::{Sample, Scrape, Value as Metric};
use serde_json::Value;
use watchdog_tests::{
    Accepted, Agent, AgentExit, Bind, CloseHow, Connection, DumbClient, ECONNABORTED, Family,
    ForeignProgram, GREETING, LegacyServer, TestNet, assert_nothing_attached, connect_healthy,
    establish_and_crash, ingress_programs, num_field, require_root, run_in_ns, scenario, str_field,
};

const WATCHED: u16 = scenario::SERVER_PORT;
const FIXED: u16 = scenario::FIXED_PORT;
const SHORT: Duration = Duration::from_secs(2);

// ---- Scratch directories, agents, the command line ----

/// A directory of the test's own, mode 0755 (other users may reach a socket in it), removed on
/// drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Result<Scratch> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("watchdog-ops-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod 0755 {}", dir.display()))?;
        Ok(Scratch(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// `run --iface <server veth> --port 5000 --min-idle 0s` (unless `extra` sets the idle guard),
/// with the journal `scratch/<name>-journal` and the socket `scratch/<name>.sock` unless `extra`
/// names them. The idle guard is off by default: these tests crash the client right after it
/// sent, and are about what the operator sees, not about that guard.
fn agent_args(net: &TestNet, scratch: &Scratch, name: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--iface", net.server_iface(), "--port", "5000"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    if !extra.contains(&"--min-idle") {
        args.extend(["--min-idle".to_owned(), "0s".to_owned()]);
    }
    if !extra.contains(&"--journal") {
        args.extend([
            "--journal".to_owned(),
            text(&scratch.path(&format!("{name}-journal"))),
        ]);
    }
    if !extra.contains(&"--control-socket") {
        args.extend([
            "--control-socket".to_owned(),
            text(&scratch.path(&format!("{name}.sock"))),
        ]);
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

fn start_agent(net: &TestNet, scratch: &Scratch, name: &str, extra: &[&str]) -> Result<Agent> {
    let args = agent_args(net, scratch, name, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start(net, &args)
}

fn start_agent_with_capabilities(
    net: &TestNet,
    scratch: &Scratch,
    name: &str,
    caps: &[&str],
) -> Result<Agent> {
    let args = agent_args(net, scratch, name, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start_with_capabilities(net, caps, &args)
}

/// SIGTERM; the agent must exit cleanly, having logged no `fatal`.
fn stop_agent(agent: Agent) -> Result<AgentExit> {
    let exit = agent.stop()?;
    ensure!(
        exit.status.success() && exit.events("fatal").is_empty(),
        "the agent exited with {}:\n{}",
        exit.status,
        exit.output()
    );
    Ok(exit)
}

/// Runs `[wrapper...] watchdog <args...>` (on the host: `events` and `status` need no network
/// namespace) with extra environment variables.
fn cli_as(wrapper: &[&str], bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let shown = format!("{} {} {}", wrapper.join(" "), bin.display(), args.join(" "));
    let mut command = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    command.args(args).stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command
        .output()
        .with_context(|| format!("running `{shown}`"))?;
    eprintln!(
        "`{shown}` -> {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// `watchdog <args...>` as root; must succeed. Returns its stdout.
fn cli(args: &[&str]) -> Result<String> {
    cli_env(args, &[])
}

fn cli_env(args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let out = cli_as(&[], &Agent::binary(), args, env)?;
    ensure!(
        out.status.success(),
        "`watchdog {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).context("output is not UTF-8")
}

/// `watchdog events --json <args...>`: every line must be a JSON object.
fn events_json(args: &[&str]) -> Result<Vec<Value>> {
    let mut full = vec!["events", "--json"];
    full.extend_from_slice(args);
    cli(&full)?
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).with_context(|| {
                format!("`watchdog events --json` printed a non-JSON line: {line}")
            })?;
            ensure!(value.is_object(), "not a JSON object: {line}");
            Ok(value)
        })
        .collect()
}

// ---- The journal, read without the agent's help ----

/// The records of `dir/events.jsonl`, in order. `strict`: every line must be a JSON object
/// (the agent has stopped); otherwise a line being written may be skipped.
fn journal_records(dir: &Path, strict: bool) -> Result<Vec<Value>> {
    let path = dir.join("events.jsonl");
    let content = match fs::read_to_string(&path) {
        Ok(content) => content,
        Err(e) if !strict && e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut records = Vec::new();
    for line in content.lines() {
        match serde_json::from_str::<Value>(line) {
            Ok(value) if value.is_object() => records.push(value),
            _ if !strict => {}
            _ => bail!(
                "{} has a line that is not a JSON object: {line}",
                path.display()
            ),
        }
    }
    Ok(records)
}

/// Waits until the journal satisfies `done`; returns its records.
fn wait_journal(
    dir: &Path,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Result<Vec<Value>> {
    let deadline = Instant::now() + timeout;
    loop {
        let records = journal_records(dir, false)?;
        if done(&records) {
            return Ok(records);
        }
        if Instant::now() >= deadline {
            bail!(
                "the journal {} did not show {what} within {timeout:?}; it has:\n{}",
                dir.display(),
                render(&records)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn render(records: &[Value]) -> String {
    records
        .iter()
        .map(|r| format!("  {r}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn event(record: &Value) -> &str {
    record.get("event").and_then(Value::as_str).unwrap_or("")
}

fn named<'a>(records: &'a [Value], name: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| event(r) == name).collect()
}

/// `connected` records of a client that came back after the watchdog cleared its stale socket.
fn reconnections(records: &[Value]) -> usize {
    records
        .iter()
        .filter(|r| event(r) == "connected" && r.get("after_stale_syn_us").is_some())
        .count()
}

/// A record's `ts`, which must be RFC 3339 in UTC.
fn timestamp(record: &Value) -> Result<DateTime<FixedOffset>> {
    let ts = str_field(record, "ts")?;
    let parsed = DateTime::parse_from_rfc3339(ts)
        .with_context(|| format!("`ts` is not RFC 3339: {record}"))?;
    ensure!(
        parsed.offset().local_minus_utc() == 0,
        "`ts` is not in UTC: {record}"
    );
    Ok(parsed)
}

// ---- The seed's failure and its cure ----

/// The dumb client's live connection, and the server's side of it.
struct Live {
    conn: Connection,
    accepted: Accepted,
}

/// One crash and reconnect with an agent running: the client's connection (a fresh one when
/// `live` is None) dies silently after sending [`GREETING`], the client comes back from the same
/// port, the agent destroys the stale socket and replays the SYN. Returns the new connection.
fn crash_and_reconnect(
    server: &LegacyServer,
    client: &DumbClient,
    live: Option<Live>,
    agent: &Agent,
) -> Result<Live> {
    let stale = match live {
        None => establish_and_crash(server, client)?,
        Some(Live { mut conn, accepted }) => {
            conn.send(GREETING)?;
            server.wait_bytes(accepted.id, GREETING.len() as u64, SHORT)?;
            conn.crash()?;
            accepted
        }
    };
    let out = client.reconnect(SHORT)?;
    ensure!(
        out.connected,
        "the client did not get back in within {SHORT:?} ({:?}); agent:\n{}",
        out.error,
        agent.output()
    );
    let closed = server.wait_closed_id(stale.id, SHORT)?;
    ensure!(
        closed.how == CloseHow::Error(ECONNABORTED),
        "the stale socket ended with {:?}, not the agent's destroy",
        closed.how
    );
    let peer = client.local_addr();
    let accepted = server.wait_accepted(|a| a.peer == peer && a.id > stale.id, SHORT)?;
    let conn = out.connection.context("connected without a connection")?;
    Ok(Live { conn, accepted })
}

/// A legacy server on port 5000 and the dumb client, over IPv4.
fn seed(net: &TestNet) -> Result<(LegacyServer, DumbClient, SocketAddr)> {
    let server = LegacyServer::start(net, Bind::V4, WATCHED)?;
    let server_addr = net.server_addr(Family::V4, WATCHED);
    let client = DumbClient::new(net, server_addr, FIXED)?;
    Ok((server, client, server_addr))
}

// ---- 1. The journal across a restart, and `watchdog events` ----

#[test]
fn events_survive_an_agent_restart() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("opsjournal")?;
    let scratch = Scratch::new("journal")?;
    let journal = scratch.path("journal");
    let journal_arg = text(&journal);
    let (server, client, server_addr) = seed(&net)?;
    let client_addr = client.local_addr();

    let a = start_agent(&net, &scratch, "a", &["--journal", &journal_arg])?;
    let live = crash_and_reconnect(&server, &client, None, &a)?;
    wait_journal(&journal, "the first reconnection", SHORT, |r| {
        reconnections(r) == 1
    })?;
    stop_agent(a)?;

    let b = start_agent(&net, &scratch, "b", &["--journal", &journal_arg])?;
    let live = crash_and_reconnect(&server, &client, Some(live), &b)?;
    wait_journal(&journal, "the second reconnection", SHORT, |r| {
        reconnections(r) == 2
    })?;
    stop_agent(b)?;
    live.conn.crash()?;

    // The journal as written, both agents' records in one file, in order.
    let records = journal_records(&journal, true)?;
    let position = |name: &str, nth: usize| {
        records
            .iter()
            .enumerate()
            .filter(|(_, r)| event(r) == name)
            .nth(nth)
            .map(|(i, _)| i)
            .with_context(|| format!("no `{name}` #{nth} in the journal:\n{}", render(&records)))
    };
    let order = [
        position("attached", 0)?,
        position("destroyed", 0)?,
        position("detached", 0)?,
        position("attached", 1)?,
        position("destroyed", 1)?,
        position("detached", 1)?,
    ];
    ensure!(
        order.windows(2).all(|w| w[0] < w[1]) && named(&records, "attached").len() == 2,
        "expected attached, destroyed, detached of agent A, then of agent B:\n{}",
        render(&records)
    );
    let attached = named(&records, "attached");
    ensure!(
        num_field(attached[0], "program_id")? != num_field(attached[1], "program_id")?,
        "both agents report the same program: {} / {}",
        attached[0],
        attached[1]
    );
    for pair in records.windows(2) {
        ensure!(
            timestamp(&pair[0])? <= timestamp(&pair[1])?,
            "the journal is not in time order: {} then {}",
            pair[0],
            pair[1]
        );
    }

    // `watchdog events --json` prints exactly the journal's records.
    let dir = journal_arg.as_str();
    let printed = events_json(&["--journal", dir])?;
    ensure!(
        printed == records,
        "`watchdog events --json` differs from the journal:\n{}\nvs\n{}",
        render(&printed),
        render(&records)
    );
    let destroyed = named(&printed, "destroyed");
    ensure!(destroyed.len() == 2, "{}", render(&printed));
    for d in &destroyed {
        timestamp(d)?;
        str_field(d, "message")?;
        ensure!(str_field(d, "client")? == client_addr.to_string(), "{d}");
        ensure!(str_field(d, "server")? == server_addr.to_string(), "{d}");
        num_field(d, "idle_ms")?;
        ensure!(num_field(d, "total_us")? > 0, "{d}");
        ensure!(
            num_field(d, "bytes_received")? == GREETING.len() as u64,
            "the stale socket had received the greeting: {d}"
        );
    }

    // The client's whole story, twice: connected, stale SYN, destroyed, replayed, connected.
    let mine: Vec<&Value> = records
        .iter()
        .filter(|r| r.get("client").and_then(Value::as_str) == Some(&client_addr.to_string()))
        .collect();
    let story: Vec<&str> = mine.iter().map(|r| event(r)).collect();
    let cycle = ["stale_syn", "destroyed", "replayed", "connected"];
    let expected: Vec<&str> = std::iter::once("connected")
        .chain(cycle)
        .chain(cycle)
        .collect();
    ensure!(
        story == expected,
        "the client's story is {story:?}, expected {expected:?}:\n{}",
        render(&records)
    );
    let connected: Vec<&&Value> = mine.iter().filter(|r| event(r) == "connected").collect();
    ensure!(
        connected[0].get("after_stale_syn_us").is_none(),
        "the first connection was not after a stale SYN: {}",
        connected[0]
    );
    for c in &connected[1..] {
        ensure!(num_field(c, "after_stale_syn_us")? > 0, "{c}");
        ensure!(str_field(c, "server")? == server_addr.to_string(), "{c}");
    }

    // The table: a header, one row per record, times in the local time zone. `TZ` makes the
    // zone UTC+5:30 whatever the machine's is.
    let table = cli_env(&["events", "--journal", dir], &[("TZ", "WDT-5:30")])?;
    let lines: Vec<&str> = table.lines().collect();
    let header: Vec<&str> = lines
        .first()
        .context("`watchdog events` printed nothing")?
        .split_whitespace()
        .collect();
    ensure!(
        header
            == [
                "TIME", "CLIENT", "SERVER", "ACTION", "IDLE", "LATENCY", "REASON"
            ],
        "unexpected table header {header:?}"
    );
    ensure!(
        lines.len() == records.len() + 1,
        "{} table rows for {} records:\n{table}",
        lines.len() - 1,
        records.len()
    );
    let local = timestamp(destroyed[0])?
        .with_timezone(&FixedOffset::east_opt(5 * 3600 + 30 * 60).context("offset")?)
        .format("%Y-%m-%d %H:%M:%S%.3f")
        .to_string();
    let row = lines
        .iter()
        .find(|l| l.split_whitespace().nth(4) == Some("destroyed"))
        .with_context(|| format!("no `destroyed` row:\n{table}"))?;
    ensure!(
        row.starts_with(&local) && row.contains(&client_addr.to_string()),
        "the first `destroyed` row should start with its time in UTC+5:30 ({local}) and name the \
         client {client_addr}: {row}"
    );

    // Filters.
    let only_destroyed = events_json(&["--journal", dir, "--action", "destroyed"])?;
    ensure!(
        only_destroyed.len() == 2 && only_destroyed.iter().all(|r| event(r) == "destroyed"),
        "--action destroyed:\n{}",
        render(&only_destroyed)
    );
    let client_ip = client_addr.ip().to_string();
    let by_client = events_json(&["--journal", dir, "--client", &client_ip])?;
    ensure!(
        by_client.len() == mine.len()
            && named(&by_client, "attached").is_empty()
            && named(&by_client, "destroyed").len() == 2,
        "--client {client_ip} should give the client's {} records and no `attached`:\n{}",
        mine.len(),
        render(&by_client)
    );
    let recent = events_json(&["--journal", dir, "--since", "1h"])?;
    ensure!(
        recent == records,
        "--since 1h dropped records:\n{}",
        render(&recent)
    );
    let future = events_json(&["--journal", dir, "--since", "2099-01-01 00:00:00"])?;
    ensure!(future.is_empty(), "--since 2099: {}", render(&future));
    let by_port = events_json(&["--journal", dir, "--port", "5000"])?;
    ensure!(
        by_port == by_client,
        "--port 5000 should give the connection's records, as --client does:\n{}",
        render(&by_port)
    );
    let other_port = events_json(&["--journal", dir, "--port", "5001"])?;
    ensure!(
        other_port.is_empty(),
        "--port 5001: {}",
        render(&other_port)
    );
    Ok(())
}

// ---- 2. Following live ----

/// A `watchdog events --follow` process whose stdout lines arrive on a channel; killed on drop.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Follower {
    fn start(args: &[&str]) -> Result<Follower> {
        let mut child = Command::new(Agent::binary())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting `watchdog events --follow`")?;
        let stdout = child.stdout.take().context("follower stdout")?;
        let (send, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Follower { child, lines })
    }

    /// The next JSON record the follower printed, within `timeout`.
    fn next(&self, timeout: Duration) -> Result<Option<Value>> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Ok(Some(serde_json::from_str(&line).with_context(|| {
                format!("the follower printed a non-JSON line: {line}")
            })?)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the follower's stdout closed (it exited)")
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn follow_shows_a_live_event() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("opsfollow")?;
    let scratch = Scratch::new("follow")?;
    let (server, client, server_addr) = seed(&net)?;
    let agent = start_agent(&net, &scratch, "agent", &[])?;
    let socket = text(agent.control_socket());
    let follower = Follower::start(&["events", "--follow", "--json", "--control-socket", &socket])?;

    // The follower has subscribed once it prints something: healthy connections (from
    // ephemeral ports) make `connected` records until it does.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let conn = connect_healthy(&net, server_addr, SHORT)?;
        if let Some(first) = follower.next(Duration::from_millis(100))? {
            eprintln!("the follower is live: {first}");
            drop(conn);
            break;
        }
        drop(conn);
        ensure!(
            Instant::now() < deadline,
            "the follower printed nothing for 3 s of healthy connections; agent:\n{}",
            agent.output()
        );
    }

    let live = crash_and_reconnect(&server, &client, None, &agent)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let destroyed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "no `destroyed` record reached the follower within 5 s; agent:\n{}",
            agent.output()
        );
        if let Some(record) = follower.next(left)?
            && event(&record) == "destroyed"
        {
            break record;
        }
    };
    eprintln!("followed: {destroyed}");
    timestamp(&destroyed)?;
    ensure!(
        str_field(&destroyed, "client")? == client.local_addr().to_string()
            && str_field(&destroyed, "server")? == server_addr.to_string(),
        "{destroyed}"
    );
    // The very record the journal got.
    let journal = agent.journal().to_owned();
    let records = wait_journal(&journal, "the destroy", SHORT, |r| {
        !named(r, "destroyed").is_empty()
    })?;
    ensure!(
        *named(&records, "destroyed")[0] == destroyed,
        "the followed record differs from the journal's: {destroyed} vs {}",
        named(&records, "destroyed")[0]
    );
    drop(follower);
    stop_agent(agent)?;
    live.conn.crash()?;
    Ok(())
}

// ---- 3. Who may use the control socket ----

/// The agent binary, runnable by `nobody`: the one the tests use if every directory above it is
/// searchable by others, else a copy in `scratch`.
fn binary_for_others(scratch: &Scratch) -> Result<PathBuf> {
    let bin = Agent::binary().canonicalize().context("the agent binary")?;
    if reachable_by_others(&bin)? {
        return Ok(bin);
    }
    let copy = scratch.path("watchdog");
    fs::copy(&bin, &copy).context("copying the agent binary for nobody")?;
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))?;
    Ok(copy)
}

/// Whether every directory above `path` lets others through (`o+x`).
fn reachable_by_others(path: &Path) -> Result<bool> {
    for dir in path.ancestors().skip(1) {
        if dir.as_os_str().is_empty() {
            continue;
        }
        let mode = fs::metadata(dir)
            .with_context(|| format!("stat {}", dir.display()))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Runs `watchdog status --control-socket <socket>` as uid 65534 with the given group options
/// of `setpriv`.
fn status_as_nobody(bin: &Path, groups: &[&str], socket: &str) -> Result<Output> {
    let mut wrapper = vec!["setpriv", "--reuid=65534"];
    wrapper.extend_from_slice(groups);
    cli_as(&wrapper, bin, &["status", "--control-socket", socket], &[])
}

/// The `program_id` row of `watchdog status`'s text output.
fn status_program_id(status: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("program_id"))
            .then(|| words.next()?.parse().ok())
            .flatten()
    })
}

fn assert_socket(path: &Path, gid: u32) -> Result<()> {
    let meta = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    ensure!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        path.display()
    );
    ensure!(
        meta.permissions().mode() & 0o7777 == 0o660 && meta.uid() == 0 && meta.gid() == gid,
        "the control socket is {:o} {}:{}, expected 0660 0:{gid}",
        meta.permissions().mode() & 0o7777,
        meta.uid(),
        meta.gid()
    );
    ensure!(
        reachable_by_others(path)?,
        "{} is not reachable by others: a refusal would be the directory's",
        path.display()
    );
    Ok(())
}

#[test]
fn control_socket_refuses_an_unprivileged_user() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("opscontrol")?;
    let scratch = Scratch::new("control")?;
    let bin = binary_for_others(&scratch)?;
    let agent = start_agent(&net, &scratch, "agent", &[])?;
    let socket = text(agent.control_socket());
    assert_socket(agent.control_socket(), 0)?;
    let program_id = u64::from(agent.program_id()?);

    let status = cli(&["status", "--control-socket", &socket])?;
    ensure!(
        status_program_id(&status) == Some(program_id),
        "`watchdog status` does not show program_id {program_id} from `attached`:\n{status}"
    );
    let json: Value =
        serde_json::from_str(&cli(&["status", "--json", "--control-socket", &socket])?)
            .context("`watchdog status --json` is not JSON")?;
    ensure!(
        json["agent"]["program_id"].as_u64() == Some(program_id)
            && json["agent"]["mode"] == "replay"
            && json["agent"]["interfaces"]
                .as_str()
                .is_some_and(|i| i.contains(net.server_iface()))
            && json["outputs"]["control_socket"] == socket.as_str(),
        "unexpected status: {json}"
    );

    // The same binary as nobody, the socket's directory open to it: refused by the socket.
    let out = status_as_nobody(&bin, &["--regid=65534", "--clear-groups"], &socket)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && out.stdout.is_empty(),
        "nobody read the agent's status: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        stderr.contains("watchdog: error") && stderr.contains(&socket),
        "the refusal does not come from watchdog or does not name the socket: {stderr}"
    );
    ensure!(
        stderr.contains("Permission denied"),
        "the refusal is not EACCES on the socket: {stderr}"
    );
    stop_agent(agent)?;
    Ok(())
}

/// `--control-group`: the socket belongs to that group, and a member that is not root may use
/// it. `nogroup` (gid 65534) stands in for an operators' group.
#[test]
fn control_group_members_may_use_the_socket() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("opsgroup")?;
    let scratch = Scratch::new("group")?;
    let bin = binary_for_others(&scratch)?;
    let agent = start_agent(&net, &scratch, "agent", &["--control-group", "nogroup"])?;
    let socket = text(agent.control_socket());
    assert_socket(agent.control_socket(), 65534)?;
    let program_id = u64::from(agent.program_id()?);

    // A member through a supplementary group, as an operator in group `watchdog` would be.
    let member = status_as_nobody(&bin, &["--regid=1", "--groups=65534"], &socket)?;
    let status = String::from_utf8_lossy(&member.stdout);
    ensure!(
        member.status.success() && status_program_id(&status) == Some(program_id),
        "a member of the control group could not read the status: {}\n{status}{}",
        member.status,
        String::from_utf8_lossy(&member.stderr)
    );
    // The same user without the group is refused.
    let outsider = status_as_nobody(&bin, &["--regid=1", "--clear-groups"], &socket)?;
    ensure!(
        !outsider.status.success()
            && String::from_utf8_lossy(&outsider.stderr).contains("Permission denied"),
        "a user outside the control group was not refused: {}",
        outsider.status
    );
    stop_agent(agent)?;
    Ok(())
}

// ---- 4. Metrics ----

/// A free TCP port on 127.0.0.1 in `ns`.
fn free_port(ns: &str) -> Result<u16> {
    run_in_ns(ns, || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding port 0")?;
        Ok(listener.local_addr()?.port())
    })
}

/// `GET <path>` from 127.0.0.1:`port` inside `ns`: the status line, the headers and the body.
fn http_get(ns: &str, port: u16, path: &str) -> Result<(String, String)> {
    let path = path.to_owned();
    run_in_ns(ns, move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("connecting to the metrics endpoint 127.0.0.1:{port}"))?;
        stream.set_read_timeout(Some(SHORT))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\n\r\n"
        )?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .context("reading the HTTP response")?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .with_context(|| format!("no end of headers in {response:?}"))?;
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .with_context(|| format!("no Content-Length in {head:?}"))?;
        ensure!(
            length == body.len(),
            "Content-Length {length}, body of {}",
            body.len()
        );
        Ok((head.to_owned(), body.to_owned()))
    })
}

/// `/metrics` of the agent, parsed by `prometheus-parse`.
fn scrape(ns: &str, port: u16) -> Result<(String, Scrape)> {
    let (head, body) = http_get(ns, port, "/metrics")?;
    ensure!(
        head.starts_with("HTTP/1.1 200 OK\r\n"),
        "GET /metrics: {head}"
    );
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .context("prometheus-parse could not parse /metrics")?;
    Ok((body, scrape))
}

/// The value of the sample `name{labels}`. prometheus-parse types a sample by the `# TYPE` line
/// of its own name: the OpenMetrics encoder's `# TYPE watchdog_destroyed counter` does not name
/// the sample `watchdog_destroyed_total`, so counters come back `Untyped`; either is accepted.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .find_map(|s: &Sample| match s.value {
            Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => Some(v),
            Metric::Histogram(_) | Metric::Summary(_) => None,
        })
}

fn counter(scrape: &Scrape, body: &str, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    value(scrape, name, labels).with_context(|| format!("no sample {name}{labels:?} in:\n{body}"))
}

#[test]
fn metrics_parse_and_match_the_journal() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("opsmetrics")?;
    let scratch = Scratch::new("metrics")?;
    let (server, client, _) = seed(&net)?;
    let ns = net.server_ns().to_owned();
    let port = free_port(&ns)?;
    let listen = format!("127.0.0.1:{port}");
    let agent = start_agent(&net, &scratch, "agent", &["--metrics", &listen])?;

    // Before anything happened: every counter is there, at zero; anything but /metrics is a 404.
    let (body, before) = scrape(&ns, port)?;
    for name in [
        "watchdog_stale_syns_total",
        "watchdog_destroyed_total",
        "watchdog_replayed_total",
        "watchdog_recovery_seconds_count",
    ] {
        ensure!(
            counter(&before, &body, name, &[])? == 0.0,
            "{name} is not 0:\n{body}"
        );
    }
    let (head, _) = http_get(&ns, port, "/")?;
    ensure!(head.starts_with("HTTP/1.1 404"), "GET /: {head}");

    let live = crash_and_reconnect(&server, &client, None, &agent)?;
    // `connected` is the story's last record; the metrics count a record before it is written.
    let journal = agent.journal().to_owned();
    let records = wait_journal(&journal, "the reconnection", SHORT, |r| {
        reconnections(r) == 1
    })?;
    let (body, after) = scrape(&ns, port)?;
    eprintln!("/metrics:\n{body}");
    ensure!(
        body.trim_end().ends_with("# EOF"),
        "the exposition does not end with `# EOF`"
    );
    let count = |name: &str| named(&records, name).len() as f64;
    for (metric, record) in [
        ("watchdog_destroyed_total", "destroyed"),
        ("watchdog_replayed_total", "replayed"),
        ("watchdog_stale_syns_total", "stale_syn"),
    ] {
        let value = counter(&after, &body, metric, &[])?;
        ensure!(
            value == count(record) && value == 1.0,
            "{metric} is {value}, the journal has {} `{record}` record(s)",
            count(record)
        );
    }
    ensure!(
        counter(
            &after,
            &body,
            "watchdog_refused_total",
            &[("kind", "min_idle")]
        )
        .is_err(),
        "a refusal was counted:\n{body}"
    );

    // Recovery: one observation, the replay's SYN → re-injected time.
    let replayed = named(&records, "replayed")[0];
    let total_s = num_field(replayed, "total_us")? as f64 / 1e6;
    let observations = counter(&after, &body, "watchdog_recovery_seconds_count", &[])?;
    let sum = counter(&after, &body, "watchdog_recovery_seconds_sum", &[])?;
    ensure!(observations == 1.0, "recovery_seconds_count {observations}");
    ensure!(
        sum > 0.0 && (sum - total_s).abs() < 1e-6,
        "recovery_seconds_sum {sum}, the replay took {total_s} s"
    );
    let buckets = after
        .samples
        .iter()
        .find_map(|s| match (&s.value, s.metric.as_str()) {
            (Metric::Histogram(b), "watchdog_recovery_seconds") => Some(b.clone()),
            _ => None,
        })
        .with_context(|| format!("no recovery_seconds histogram:\n{body}"))?;
    let inf = buckets
        .iter()
        .find(|b| b.less_than.is_infinite())
        .context("no +Inf bucket")?;
    ensure!(inf.count == 1.0, "+Inf bucket {}", inf.count);
    for b in &buckets {
        let expected = if total_s <= b.less_than { 1.0 } else { 0.0 };
        ensure!(
            b.count == expected,
            "bucket le={} has {}, the replay took {total_s} s",
            b.less_than,
            b.count
        );
    }

    // The classifier's counters are mirrored once a second.
    let deadline = Instant::now() + Duration::from_millis(2500);
    loop {
        let (body, now) = scrape(&ns, port)?;
        let held = value(&now, "watchdog_kernel_events_total", &[("kind", "held")]);
        let stale = value(
            &now,
            "watchdog_kernel_events_total",
            &[("kind", "stale_syns")],
        );
        if held == Some(1.0) && stale == Some(1.0) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "kernel_events_total{{kind=held|stale_syns}} are {held:?}/{stale:?}, expected 1:\n{body}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    stop_agent(agent)?;
    live.conn.crash()?;
    Ok(())
}

#[test]
fn metrics_count_refusals_like_the_journal() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("opsrefused")?;
    let scratch = Scratch::new("refused")?;
    let (server, client, _) = seed(&net)?;
    let ns = net.server_ns().to_owned();
    let port = free_port(&ns)?;
    let listen = format!("127.0.0.1:{port}");
    let agent = start_agent(
        &net,
        &scratch,
        "agent",
        &["--metrics", &listen, "--min-idle", "30s"],
    )?;
    let stale = establish_and_crash(&server, &client)?;
    // One SYN (the next would come after 1 s): refused, replayed, answered by the kernel.
    let out = client.reconnect(Duration::from_millis(600))?;
    ensure!(!out.connected, "the client got in:\n{}", agent.output());
    ensure!(server.is_open(stale.id), "{:?}", server.events());
    let journal = agent.journal().to_owned();
    let records = wait_journal(&journal, "the refusal and its replay", SHORT, |r| {
        !named(r, "would_destroy").is_empty() && !named(r, "replayed").is_empty()
    })?;
    let (body, scrape) = scrape(&ns, port)?;
    eprintln!("/metrics:\n{body}");
    let would = named(&records, "would_destroy");
    let min_idle = would
        .iter()
        .filter(|r| r.get("refusal").and_then(Value::as_str) == Some("min_idle"))
        .count() as f64;
    let refused = counter(
        &scrape,
        &body,
        "watchdog_refused_total",
        &[("kind", "min_idle")],
    )?;
    ensure!(
        refused >= 1.0 && refused == min_idle && min_idle == would.len() as f64,
        "refused_total{{kind=min_idle}} is {refused}; the journal has {min_idle} min_idle \
         refusal(s) of {} `would_destroy`:\n{}",
        would.len(),
        render(&records)
    );
    ensure!(
        counter(&scrape, &body, "watchdog_destroyed_total", &[])? == 0.0,
        "a destroy was counted:\n{body}"
    );
    ensure!(
        counter(&scrape, &body, "watchdog_stale_syns_total", &[])?
            == named(&records, "stale_syn").len() as f64,
        "stale_syns_total differs from the journal:\n{body}"
    );
    stop_agent(agent)?;
    Ok(())
}

// ---- 5. The systemd unit's capabilities ----

/// Capability names by number, as `setpriv` spells them (`linux/capability.h`).
const CAPABILITIES: [&str; 41] = [
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

/// The unit's `CapabilityBoundingSet=`, as `setpriv` names (`CAP_NET_ADMIN` → `net_admin`).
fn unit_capabilities() -> Result<Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/watchdog.service");
    let unit = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let line = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("CapabilityBoundingSet="))
        .with_context(|| format!("no CapabilityBoundingSet= in {}", path.display()))?;
    let caps: Vec<String> = line
        .split_whitespace()
        .map(|c| {
            let name = c
                .strip_prefix("CAP_")
                .with_context(|| format!("{c} in CapabilityBoundingSet="))?
                .to_ascii_lowercase();
            ensure!(
                CAPABILITIES.contains(&name.as_str()),
                "unknown capability {c}"
            );
            Ok(name)
        })
        .collect::<Result<_>>()?;
    ensure!(!caps.is_empty(), "empty CapabilityBoundingSet=");
    Ok(caps)
}

fn capability_mask(caps: &[&str]) -> u64 {
    caps.iter()
        .filter_map(|c| CAPABILITIES.iter().position(|k| k == c))
        .fold(0, |mask, bit| mask | 1 << bit)
}

/// `CapEff` of a process.
fn effective_capabilities(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff")?;
    u64::from_str_radix(hex.trim(), 16).with_context(|| format!("CapEff {hex:?}"))
}

fn cap_names(mask: u64) -> Vec<&'static str> {
    (0..CAPABILITIES.len())
        .filter(|bit| mask & (1 << bit) != 0)
        .map(|bit| CAPABILITIES[bit])
        .collect()
}

/// An agent with exactly `caps` cures the seed's failure, writes its journal and answers on
/// its control socket.
fn runs_with(net: &TestNet, scratch: &Scratch, name: &str, caps: &[&str]) -> Result<()> {
    let (server, client, _) = seed(net)?;
    let agent = start_agent_with_capabilities(net, scratch, name, caps)?;
    let effective = effective_capabilities(agent.pid())?;
    ensure!(
        effective == capability_mask(caps),
        "the agent runs with {:?}, expected exactly {caps:?}",
        cap_names(effective)
    );
    let attached = agent.wait_for_event("attached", SHORT)?;
    ensure!(
        str_field(&attached, "replay")? == "xdp_live_frames",
        "this kernel should replay through XDP live frames: {attached}"
    );
    let live = crash_and_reconnect(&server, &client, None, &agent)?;
    let journal = agent.journal().to_owned();
    let records = wait_journal(&journal, "the destroy and the replay", SHORT, |r| {
        !named(r, "destroyed").is_empty() && !named(r, "replayed").is_empty()
    })?;
    ensure!(
        named(&records, "destroy_failed").is_empty() && named(&records, "replay_failed").is_empty(),
        "{}",
        render(&records)
    );
    let socket = text(agent.control_socket());
    let status: Value =
        serde_json::from_str(&cli(&["status", "--json", "--control-socket", &socket])?)?;
    ensure!(
        status["agent"]["program_id"].as_u64() == Some(u64::from(agent.program_id()?)),
        "{status}"
    );
    stop_agent(agent)?;
    live.conn.crash()?;
    Ok(())
}

#[test]
fn agent_runs_with_the_units_capability_set() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let caps = unit_capabilities()?;
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    eprintln!("the unit's capabilities: {caps:?}");
    let net = TestNet::new("opscaps")?;
    let scratch = Scratch::new("caps")?;
    runs_with(&net, &scratch, "unit", &caps)
}

/// Another tool's program on the interface (a TCX program, or a clsact filter before TCX) that
/// ends classification, as Cilium's do, neither stops an agent with only the unit's
/// capabilities, which cannot open other programs to read their names, nor keeps SYNs from it
/// (the classifier goes first), nor is disturbed by it: the client gets back in, and the other
/// program is still attached, alone, once the agent has come and gone.
#[test]
fn another_tools_program_on_the_interface_is_left_alone() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let caps = unit_capabilities()?;
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    let net = TestNet::new("opsforeign")?;
    let scratch = Scratch::new("foreign")?;
    let foreign = ForeignProgram::attach(&net)?;
    runs_with(&net, &scratch, "foreign", &caps)?;
    ensure!(
        foreign.is_attached(&net)?,
        "the other tool's program is gone from {} after the agent",
        net.server_iface()
    );
    let left = ingress_programs(&net)?;
    ensure!(
        left == foreign.program_id().into_iter().collect::<Vec<_>>(),
        "expected only the other tool's program on {} ingress, found {left:?}",
        net.server_iface()
    );
    Ok(())
}

/// Each of CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN is needed: without it the agent stops before
/// attaching, says why, and leaves nothing attached. CAP_NET_RAW is only for the raw-socket
/// replay fallback (kernels < 5.18): on this kernel the agent works without it.
#[test]
fn each_capability_of_the_unit_is_needed() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let caps = unit_capabilities()?;
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    let net = TestNet::new("opscapmin")?;
    let scratch = Scratch::new("capmin")?;
    for (needed, named_as) in [
        ("bpf", "CAP_BPF"),
        ("perfmon", "CAP_PERFMON"),
        ("net_admin", "CAP_NET_ADMIN"),
    ] {
        ensure!(caps.contains(&needed), "the unit lacks {named_as}");
        let without: Vec<&str> = caps.iter().copied().filter(|c| *c != needed).collect();
        let Err(error) = start_agent_with_capabilities(&net, &scratch, needed, &without) else {
            bail!("the agent attached without {named_as}");
        };
        let message = format!("{error:#}");
        eprintln!("without {named_as}: {message}");
        ensure!(
            message.contains("\"event\":\"fatal\""),
            "the agent did not stop with a `fatal` record without {named_as}:\n{message}"
        );
        // The start-up check names CAP_BPF and CAP_NET_ADMIN. It does not check CAP_PERFMON:
        // without it the verifier refuses the classifier's packet-pointer arithmetic ("pointer
        // arithmetic with it prohibited for !root") and the agent says so, without naming the
        // capability; accept that until the check covers CAP_PERFMON too.
        ensure!(
            message.contains(named_as)
                || (needed == "perfmon"
                    && message.contains("the kernel's verifier rejected the classifier")),
            "the agent's refusal without {named_as} does not name the problem:\n{message}"
        );
        assert_nothing_attached(&net)
            .with_context(|| format!("after the start without {named_as}"))?;
    }
    ensure!(caps.contains(&"net_raw"), "the unit lacks CAP_NET_RAW");
    let without_raw: Vec<&str> = caps.iter().copied().filter(|c| *c != "net_raw").collect();
    runs_with(&net, &scratch, "noraw", &without_raw)
}
