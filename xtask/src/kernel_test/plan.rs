//! What a kernel-test run does and what it found, as files both sides read: the host writes a
//! [`Plan`] into the run directory, the runner (inside the VM, or on the host itself for
//! `--kernel host`) executes it and writes one [`BinaryResult`] per test binary, the probed
//! [`Features`], and finally [`Done`].
//!
//! The runner executes each test binary with a hard timeout, in its own process group (so a
//! timeout kills what the tests started too), its output in `<name>.log`, and reads the
//! libtest summary from that output.
use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub const PLAN_FILE: &str = "plan.json";
pub const RESULTS_FILE: &str = "results.jsonl";
pub const FEATURES_FILE: &str = "features.json";
pub const DONE_FILE: &str = "done.json";
/// Every line the runner prints for the host to follow starts with this.
pub const MARKER: &str = "[kernel-test]";
/// The runner's first line: the VM has booted.
pub const RUNNER_UP: &str = "[kernel-test] runner up";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The kernel's label, for messages.
    pub kernel: String,
    /// The agent binary the tests start (`WATCHDOG_BIN`) and the probe runs.
    pub agent: PathBuf,
    /// Environment for every test binary.
    pub env: BTreeMap<String, String>,
    pub tests: Vec<TestBinary>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestBinary {
    /// The test target's name (`e2e` for `tests/e2e.rs`).
    pub name: String,
    pub exe: PathBuf,
    pub args: Vec<String>,
    /// Where cargo would run it: the package's directory.
    pub cwd: PathBuf,
    pub timeout_s: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Passed,
    Failed,
    TimedOut,
    NotStarted,
}

impl Outcome {
    pub fn word(self) -> &'static str {
        match self {
            Outcome::Passed => "PASS",
            Outcome::Failed => "FAIL",
            Outcome::TimedOut => "TIMEOUT",
            Outcome::NotStarted => "NOT RUN",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BinaryResult {
    pub name: String,
    pub outcome: Outcome,
    pub exit: Option<String>,
    pub secs: f64,
    pub summary: Summary,
    /// Names of the tests that failed.
    pub failures: Vec<String>,
    /// The output's file name in the run directory.
    pub log: String,
    /// Why it did not start, when it did not.
    pub error: Option<String>,
}

/// libtest's closing counts, summed over the `test result:` lines of one output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
    /// Whether any `test result:` line was seen at all.
    pub seen: bool,
}

impl Summary {
    /// Adds one output line, if it is a `test result:` line.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        self.seen = true;
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u32>() else {
                continue;
            };
            match label {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

/// What the agent's start-up said about the kernel (`features`, `attached` events).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Features {
    pub kernel: String,
    /// "tcx" or "clsact".
    pub attach: String,
    pub sock_destroy: String,
    pub ring_buffer: bool,
    pub btf: bool,
    pub tc_bpf: bool,
    /// How held SYNs are re-injected: "xdp_live_frames" or "raw_socket".
    pub replay: String,
    /// Connection lifecycle events and per-port timers (sock_ops on cgroup v2).
    pub lifecycle: bool,
    /// Why the probe failed, when it did.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Done {
    /// From the runner's start to its last test's end.
    pub secs: f64,
    /// The kernel's uptime when the runner started (the VM's boot time), when known.
    pub boot_uptime_s: Option<f64>,
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

pub fn read_results(dir: &Path) -> Result<Vec<BinaryResult>> {
    let path = dir.join(RESULTS_FILE);
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("parsing {}", path.display())))
        .collect()
}

/// Runs every test binary of `plan` in turn, appending results to `dir/results.jsonl`; prints
/// one marker line before and after each to `console`.
pub fn execute(plan: &Plan, dir: &Path, console: &mut dyn Write) -> Result<Vec<BinaryResult>> {
    let mut results = Vec::new();
    for test in &plan.tests {
        let _ = writeln!(console, "{MARKER} running {} ...", test.name);
        let result = run_binary(plan, test, dir);
        let _ = writeln!(
            console,
            "{MARKER} {} {}: {} passed, {} failed ({:.1} s)",
            result.name,
            result.outcome.word(),
            result.summary.passed,
            result.summary.failed,
            result.secs
        );
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(RESULTS_FILE))
            .with_context(|| format!("opening {}", dir.join(RESULTS_FILE).display()))?;
        writeln!(file, "{}", serde_json::to_string(&result)?)?;
        file.sync_all()?;
        results.push(result);
    }
    Ok(results)
}

fn run_binary(plan: &Plan, test: &TestBinary, dir: &Path) -> BinaryResult {
    let log = format!("{}.log", test.name);
    let started = Instant::now();
    let mut result = BinaryResult {
        name: test.name.clone(),
        outcome: Outcome::NotStarted,
        exit: None,
        secs: 0.0,
        summary: Summary::default(),
        failures: Vec::new(),
        log: log.clone(),
        error: None,
    };
    let spawned = File::create(dir.join(&log))
        .and_then(|out| Ok((out.try_clone()?, out)))
        .and_then(|(out, err)| {
            Command::new(&test.exe)
                .args(&test.args)
                .current_dir(&test.cwd)
                .envs(&plan.env)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .process_group(0)
                .spawn()
        });
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            result.error = Some(format!("starting {}: {e}", test.exe.display()));
            return result;
        }
    };
    let deadline = started + Duration::from_secs(test.timeout_s);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                result.error = Some(format!("waiting for {}: {e}", test.name));
                break None;
            }
        }
    };
    // Whatever the tests started (agents, servers) goes with them.
    // SAFETY: plain syscall; the group is the child's own (process_group(0)).
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let status = match status {
        Some(status) => Some(status),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    };
    result.secs = started.elapsed().as_secs_f64();
    if let Ok(file) = File::open(dir.join(&log)) {
        for line in BufReader::new(file).lines().map_while(Result::ok) {
            result.summary.add_line(&line);
            if let Some(name) = line
                .strip_prefix("test ")
                .and_then(|l| l.strip_suffix(" ... FAILED"))
            {
                result.failures.push(name.to_owned());
            }
        }
    }
    result.outcome = match status {
        None => Outcome::TimedOut,
        Some(status) if status.success() && result.summary.seen => Outcome::Passed,
        Some(_) => Outcome::Failed,
    };
    result.exit = Some(match status {
        Some(status) => status.to_string(),
        None => format!("killed after {} s", test.timeout_s),
    });
    result
}

#[cfg(test)]
mod tests {
    use super::Summary;

    #[test]
    fn libtest_summaries_are_summed() {
        let mut s = Summary::default();
        s.add_line("running 3 tests");
        s.add_line(
            "test result: ok. 10 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; \
             finished in 17.47s",
        );
        s.add_line("test result: FAILED. 1 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s");
        assert_eq!(
            s,
            Summary {
                passed: 11,
                failed: 3,
                ignored: 2,
                seen: true
            }
        );
    }
}
