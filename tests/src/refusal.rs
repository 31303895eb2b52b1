//! Starts of the agent that must be refused: run `watchdog run ...` in the server namespace and
//! wait for it to exit by itself, with what it printed. A start that keeps running is killed
//! and reported as an error, so a missing refusal cannot hang a test.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::{agent::Agent, netns::TestNet};

/// How long a refused start may take before it counts as a hang.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a refused start ended.
#[derive(Debug)]
pub struct Refusal {
    pub status: ExitStatus,
    pub stderr: String,
}

/// Runs `ip netns exec <server ns> [wrapper...] <agent> run <args...>` and waits for it to end.
pub fn run_refused(net: &TestNet, wrapper: &[&str], args: &[&str]) -> Result<Refusal> {
    let bin = Agent::binary();
    ensure!(
        bin.is_file(),
        "agent binary not found at {}: run `cargo xtask test`",
        bin.display()
    );
    let bin = bin.to_string_lossy().into_owned();
    let mut full: Vec<&str> = vec!["netns", "exec", net.server_ns()];
    full.extend_from_slice(wrapper);
    full.extend_from_slice(&[&bin, "run"]);
    full.extend_from_slice(args);
    let shown = format!("ip {}", full.join(" "));
    let mut child = Command::new("ip")
        .args(&full)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{shown}`"))?;
    let mut pipe = child.stderr.take().context("agent stderr")?;
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + REFUSE_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the agent")? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = reader.join().unwrap_or_default();
            bail!("`{shown}` was not refused: still running after {REFUSE_TIMEOUT:?}:\n{stderr}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stderr = reader
        .join()
        .map_err(|_| anyhow::anyhow!("stderr reader panicked"))?;
    eprintln!("`{shown}` -> {status}:\n{stderr}");
    Ok(Refusal { status, stderr })
}

/// Checks that the start was refused (a non-zero exit code) with a message containing every
/// one of `needles`.
pub fn assert_refused(refusal: &Refusal, needles: &[&str]) -> Result<()> {
    ensure!(
        !refusal.status.success(),
        "the agent exited successfully; stderr:\n{}",
        refusal.stderr
    );
    ensure!(
        refusal.status.code().is_some(),
        "the agent did not exit by itself ({}); stderr:\n{}",
        refusal.status,
        refusal.stderr
    );
    for needle in needles {
        ensure!(
            refusal.stderr.contains(needle),
            "the error does not mention {needle:?}:\n{}",
            refusal.stderr
        );
    }
    Ok(())
}
