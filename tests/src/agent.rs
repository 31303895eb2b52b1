//! Runs the real `watchdog run` agent inside the server namespace and reads its JSON log.
//!
//! The agent's structured log on stderr is its contract with the tests: one JSON object per line
//! with at least `event` and `message` (`attached`, `stale_syn`, `destroyed`, `would_destroy`,
//! `destroy_failed`, `replayed`, `counters`, `detached`). The tests assert on those events, never
//! on text. The tests also treat the agent roughly: [`Agent::kill`] (SIGKILL),
//! [`Agent::sigstop`] and [`Agent::sigcont`] (a frozen agent).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::netns::TestNet;

/// How long [`Agent::start`] waits for `attached`.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Agent::stop`] waits after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// One line of the agent's output.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentLine {
    /// A JSON object from stderr: a log event.
    Json(Value),
    /// A stderr line that is not a JSON object (kept for diagnostics).
    Text(String),
    /// A stdout line (the agent should not print there; kept for diagnostics).
    Stdout(String),
}

impl AgentLine {
    /// The `event` field of a JSON line.
    pub fn event(&self) -> Option<&str> {
        match self {
            AgentLine::Json(v) => v.get("event").and_then(Value::as_str),
            AgentLine::Text(_) | AgentLine::Stdout(_) => None,
        }
    }
}

impl std::fmt::Display for AgentLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentLine::Json(v) => write!(f, "{v}"),
            AgentLine::Text(t) => write!(f, "{t}"),
            AgentLine::Stdout(t) => write!(f, "stdout: {t}"),
        }
    }
}

struct Shared {
    lines: Mutex<Vec<AgentLine>>,
    changed: Condvar,
    /// Output streams (stdout, stderr) that reached EOF: the process is gone at 2.
    closed_streams: AtomicUsize,
}

impl Shared {
    fn lines(&self) -> MutexGuard<'_, Vec<AgentLine>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn exited(&self) -> bool {
        self.closed_streams.load(Ordering::Acquire) >= 2
    }
}

/// A running agent; killed on drop if [`Agent::stop`] was not called.
pub struct Agent {
    child: Child,
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
    command: String,
    journal: PathBuf,
    control_socket: PathBuf,
    /// Where the journal and control socket live unless the test chose.
    state: StateDir,
}

/// A fresh directory for one agent's journal and control socket, unless the test passes its
/// own `--journal` / `--control-socket`: agents of parallel tests must not share them.
fn agent_state_dir(net: &TestNet) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("watchdog-agent-{}-{n}", net.server_ns()))
}

/// An agent's state directory, removed with the last of the [`Agent`] or the [`AgentExit`]
/// that holds it (the journal is still read after the agent stopped).
#[derive(Debug, Default)]
struct StateDir(Option<PathBuf>);

impl Drop for StateDir {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The value following `flag` in `args`.
fn flag_value(args: &[&str], flag: &str) -> Option<PathBuf> {
    args.windows(2)
        .find(|w| w[0] == flag)
        .map(|w| PathBuf::from(w[1]))
}

/// How the agent ended, with everything it printed.
#[derive(Debug)]
pub struct AgentExit {
    pub status: ExitStatus,
    pub lines: Vec<AgentLine>,
    _state: StateDir,
}

impl AgentExit {
    /// The JSON lines whose `event` is `name`.
    pub fn events(&self, name: &str) -> Vec<Value> {
        events_named(&self.lines, name)
    }

    /// The `counters` line logged at exit.
    pub fn counters(&self) -> Result<Value> {
        self.events("counters").pop().with_context(|| {
            format!(
                "the agent logged no `counters` line:\n{}",
                render(&self.lines)
            )
        })
    }

    /// A numeric counter from the `counters` line.
    pub fn counter(&self, name: &str) -> Result<u64> {
        let counters = self.counters()?;
        counters
            .get(name)
            .and_then(Value::as_u64)
            .with_context(|| format!("counter `{name}` missing or not a number in {counters}"))
    }

    /// All output, one line each, for assertion messages.
    pub fn output(&self) -> String {
        render(&self.lines)
    }
}

impl Agent {
    /// The agent binary: `$WATCHDOG_BIN`, else `<workspace>/target/debug/watchdog`.
    pub fn binary() -> PathBuf {
        match std::env::var_os("WATCHDOG_BIN") {
            Some(path) => PathBuf::from(path),
            None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/watchdog"),
        }
    }

    /// Whether the agent binary knows the `watchdog run` flag `flag` (e.g. `--per-client-limit`),
    /// from its `--help`: lets a long-lived tool such as the benchmark pass a flag only to the
    /// agents that have it.
    pub fn supports_flag(flag: &str) -> Result<bool> {
        let bin = Agent::binary();
        let out = Command::new(&bin)
            .args(["run", "--help"])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running `{} run --help`", bin.display()))?;
        let help = String::from_utf8_lossy(&out.stdout);
        Ok(help
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .any(|word| word == flag))
    }

    /// Starts `watchdog run <args...> --log-format json` in `net`'s server namespace and waits
    /// until it logs `attached`.
    pub fn start(net: &TestNet, args: &[&str]) -> Result<Agent> {
        Agent::start_binary(&Agent::binary(), net, args)
    }

    /// [`Agent::start`] with only the given capabilities (e.g. `["bpf", "net_admin"]`, as
    /// `setpriv` spells them): the process stays uid 0 but its bounding set holds nothing else,
    /// which is what a systemd unit's `CapabilityBoundingSet=` does.
    pub fn start_with_capabilities(net: &TestNet, caps: &[&str], args: &[&str]) -> Result<Agent> {
        let bounding = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|c| format!("+{c}")))
            .collect::<Vec<_>>()
            .join(",");
        Agent::launch(
            &Agent::binary(),
            net,
            &[
                "setpriv",
                &format!("--bounding-set={bounding}"),
                "--inh-caps=-all",
            ],
            args,
        )
    }

    /// [`Agent::start`] with an explicit binary.
    pub fn start_binary(bin: &Path, net: &TestNet, args: &[&str]) -> Result<Agent> {
        Agent::launch(bin, net, &[], args)
    }

    /// Starts `bin run args` in the server namespace, behind `wrapper` (a command prefix).
    fn launch(bin: &Path, net: &TestNet, wrapper: &[&str], args: &[&str]) -> Result<Agent> {
        if !bin.is_file() {
            let shown = bin.canonicalize().unwrap_or_else(|_| bin.to_path_buf());
            bail!(
                "agent binary not found at {}: run `cargo xtask test` (it builds the agent and the eBPF object first)",
                shown.display()
            );
        }
        let bin = bin.to_string_lossy().into_owned();
        // `nsenter --net` switches only the network namespace, as a systemd unit with
        // NetworkNamespacePath= does; `ip netns exec` would also remount /sys and hide the
        // cgroup v2 mount that the per-port timers attach to.
        let netns = format!("--net=/run/netns/{}", net.server_ns());
        let state = agent_state_dir(net);
        let journal = flag_value(args, "--journal").unwrap_or_else(|| state.join("journal"));
        let control_socket =
            flag_value(args, "--control-socket").unwrap_or_else(|| state.join("control.sock"));
        let journal_arg = journal.to_string_lossy().into_owned();
        let control_arg = control_socket.to_string_lossy().into_owned();
        let mut full: Vec<&str> = vec![&netns];
        full.extend_from_slice(wrapper);
        full.extend_from_slice(&[&bin, "run"]);
        full.extend_from_slice(args);
        if flag_value(args, "--journal").is_none() {
            full.extend_from_slice(&["--journal", &journal_arg]);
        }
        if flag_value(args, "--control-socket").is_none() {
            full.extend_from_slice(&["--control-socket", &control_arg]);
        }
        full.extend_from_slice(&["--log-format", "json"]);
        let command = format!("nsenter {}", full.join(" "));
        let mut child = Command::new("nsenter")
            .args(&full)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{command}`"))?;
        let shared = Arc::new(Shared {
            lines: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            closed_streams: AtomicUsize::new(0),
        });
        let stderr = child.stderr.take().context("agent stderr")?;
        let stdout = child.stdout.take().context("agent stdout")?;
        let mut readers = Vec::new();
        for (stream, is_stderr) in [
            (Box::new(stderr) as Box<dyn Read + Send>, true),
            (Box::new(stdout) as Box<dyn Read + Send>, false),
        ] {
            let s = Arc::clone(&shared);
            readers.push(
                thread::Builder::new()
                    .name(
                        if is_stderr {
                            "agent-stderr"
                        } else {
                            "agent-stdout"
                        }
                        .into(),
                    )
                    .spawn(move || read_lines(stream, is_stderr, &s))
                    .context("spawning agent output reader")?,
            );
        }
        let agent = Agent {
            child,
            shared,
            readers,
            command,
            journal,
            control_socket,
            state: StateDir(Some(state)),
        };
        match agent.wait_for_event("attached", ATTACH_TIMEOUT) {
            Ok(_) => Ok(agent),
            Err(e) => Err(e.context(format!("agent did not attach: `{}`", agent.command))),
        }
    }

    /// The agent's journal directory.
    pub fn journal(&self) -> &Path {
        &self.journal
    }

    /// The agent's control socket.
    pub fn control_socket(&self) -> &Path {
        &self.control_socket
    }

    /// The agent's pid (`nsenter` execs the agent in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the first line whose `event` is `name`.
    pub fn wait_for_event(&self, name: &str, timeout: Duration) -> Result<Value> {
        self.wait_for_events(name, 1, timeout)?
            .into_iter()
            .next()
            .context("no event")
    }

    /// Waits until at least `count` lines with `event` == `name` were logged; returns them all.
    pub fn wait_for_events(
        &self,
        name: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.shared.lines();
        loop {
            let found = events_named(&lines, name);
            if found.len() >= count {
                return Ok(found);
            }
            if self.shared.exited() {
                bail!(
                    "the agent exited before logging {count} `{name}` event(s); its output:\n{}",
                    render(&lines)
                );
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "the agent logged {} of {count} `{name}` event(s) within {timeout:?}; its output:\n{}",
                    found.len(),
                    render(&lines)
                );
            }
            // Short waits: the process may exit without a new line.
            let wait = (deadline - now).min(Duration::from_millis(100));
            lines = self
                .shared
                .changed
                .wait_timeout(lines, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The JSON lines logged so far whose `event` is `name`.
    pub fn events(&self, name: &str) -> Vec<Value> {
        events_named(&self.shared.lines(), name)
    }

    /// Everything printed so far.
    pub fn lines(&self) -> Vec<AgentLine> {
        self.shared.lines().clone()
    }

    /// Everything printed so far, one line each, for assertion messages.
    pub fn output(&self) -> String {
        render(&self.shared.lines())
    }

    /// The kernel's id of the agent's classifier, from its `attached` event.
    pub fn program_id(&self) -> Result<u32> {
        let attached = self
            .events("attached")
            .into_iter()
            .next()
            .context("the agent logged no `attached` event")?;
        attached
            .get("program_id")
            .and_then(Value::as_u64)
            .and_then(|id| u32::try_from(id).ok())
            .with_context(|| format!("no program_id in {attached}"))
    }

    /// Sends `signal` to the agent (still our unreaped child, so the pid is its own).
    fn signal(&self, signal: libc::c_int) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: signalling our own child, which has not been reaped yet (`self` owns it).
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sending signal {signal} to the agent (pid {pid})"));
        }
        Ok(())
    }

    /// SIGSTOP: the agent freezes where it is. It refreshes no heartbeat and reads no event
    /// until [`Agent::sigcont`]; its classifier stays attached.
    pub fn sigstop(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)?;
        // SIGSTOP takes effect asynchronously: wait until every thread is reported stopped.
        let tasks = format!("/proc/{}/task", self.child.id());
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let mut states = Vec::new();
            for task in std::fs::read_dir(&tasks).with_context(|| format!("listing {tasks}"))? {
                let stat = task.context("reading a task entry")?.path().join("stat");
                // A thread may exit between the listing and the read.
                let Ok(text) = std::fs::read_to_string(&stat) else {
                    continue;
                };
                // `tid (comm) S ...`: the state follows the last ')'.
                let state = text
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .unwrap_or("?")
                    .to_owned();
                states.push(state);
            }
            if !states.is_empty() && states.iter().all(|s| s == "T") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the agent is not stopped 1 s after SIGSTOP (thread states {states:?})");
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGCONT: a frozen agent carries on.
    pub fn sigcont(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// SIGKILL, like the OOM killer or `kill -9`: no clean-up runs. Reaps the process and
    /// returns everything it printed (no `counters`, no `detached`).
    pub fn kill(mut self) -> Result<AgentExit> {
        self.signal(libc::SIGKILL)?;
        let status = self.child.wait().context("reaping the killed agent")?;
        self.join_readers();
        Ok(AgentExit {
            status,
            lines: self.lines(),
            _state: std::mem::take(&mut self.state),
        })
    }

    /// SIGTERM, then waits up to 5 s for a clean exit. Needing SIGKILL is an error (with the
    /// output), since a clean detach is part of the agent's contract. A frozen agent
    /// ([`Agent::sigstop`]) is continued after the SIGTERM, so it handles it at once.
    pub fn stop(mut self) -> Result<AgentExit> {
        self.signal(libc::SIGTERM)?;
        self.signal(libc::SIGCONT)?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().context("waiting for the agent")? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            thread::sleep(Duration::from_millis(10));
        };
        let Some(status) = status else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.join_readers();
            bail!(
                "the agent did not exit within {STOP_TIMEOUT:?} of SIGTERM and was killed; its output:\n{}",
                self.output()
            );
        };
        self.join_readers();
        Ok(AgentExit {
            status,
            lines: self.lines(),
            _state: std::mem::take(&mut self.state),
        })
    }

    /// Waits (briefly) for the output readers to drain the pipes.
    fn join_readers(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while !self.shared.exited() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if self.shared.exited() {
            for r in self.readers.drain(..) {
                let _ = r.join();
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_lines(stream: Box<dyn Read + Send>, is_stderr: bool, shared: &Shared) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else {
            break;
        };
        let parsed = if is_stderr {
            match serde_json::from_str::<Value>(&line) {
                Ok(v) if v.is_object() => AgentLine::Json(v),
                _ => AgentLine::Text(line),
            }
        } else {
            AgentLine::Stdout(line)
        };
        shared.lines().push(parsed);
        shared.changed.notify_all();
    }
    shared.closed_streams.fetch_add(1, Ordering::AcqRel);
    shared.changed.notify_all();
}

/// `event[field]` as a string, or an error naming the event.
pub fn str_field<'a>(event: &'a Value, field: &str) -> Result<&'a str> {
    event
        .get(field)
        .and_then(Value::as_str)
        .with_context(|| format!("field `{field}` missing or not a string in {event}"))
}

/// `event[field]` as a number, or an error naming the event.
pub fn num_field(event: &Value, field: &str) -> Result<u64> {
    event
        .get(field)
        .and_then(Value::as_u64)
        .with_context(|| format!("field `{field}` missing or not a number in {event}"))
}

fn events_named(lines: &[AgentLine], name: &str) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| l.event() == Some(name))
        .filter_map(|l| match l {
            AgentLine::Json(v) => Some(v.clone()),
            AgentLine::Text(_) | AgentLine::Stdout(_) => None,
        })
        .collect()
}

fn render(lines: &[AgentLine]) -> String {
    if lines.is_empty() {
        return "  (no output)".into();
    }
    lines
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
