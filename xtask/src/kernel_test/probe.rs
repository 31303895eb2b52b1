//! What the kernel offers, in the agent's own words: the real agent starts on a veth in a
//! scratch network namespace, and its `features` and `attached` start-up events are kept (how it
//! attached, SOCK_DESTROY, ring buffer, BTF, how it replays, whether the sock_ops program for
//! connection lifecycle events loaded). Then it is stopped with SIGTERM and the namespace removed.
use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::plan::Features;

/// Under emulation a start-up takes a second or two; this is the bound for a broken one.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);

/// A network namespace deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (apt-get install iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Starts `agent` once and reports what it found. A failure is returned inside [`Features`]
/// (`error`), so the table still has a row.
pub fn probe(agent: &Path, scratch: &Path) -> Features {
    match try_probe(agent, scratch) {
        Ok(features) => features,
        Err(error) => Features {
            error: Some(format!("{error:#}")),
            ..Features::default()
        },
    }
}

fn try_probe(agent: &Path, scratch: &Path) -> Result<Features> {
    let ns = Netns(format!("wdk-probe-{}", std::process::id()));
    ip(&["netns", "add", &ns.0])?;
    ip(&[
        "-n", &ns.0, "link", "add", "wdkp0", "type", "veth", "peer", "name", "wdkp1",
    ])?;
    for link in ["lo", "wdkp0", "wdkp1"] {
        ip(&["-n", &ns.0, "link", "set", link, "up"])?;
    }
    std::fs::create_dir_all(scratch)?;
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.0))
        .arg(agent)
        .args([
            "run",
            "--iface",
            "wdkp0",
            "--port",
            "9",
            "--log-format",
            "json",
        ])
        .arg("--journal")
        .arg(scratch.join("journal"))
        .arg("--control-socket")
        .arg(scratch.join("control.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} in {}", agent.display(), ns.0))?;
    let stderr = child.stderr.take().context("agent stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    let mut features = Features::default();
    let mut seen_features = false;
    let mut outcome: Result<()> = Err(anyhow::anyhow!(
        "the agent did not attach within {ATTACH_TIMEOUT:?}"
    ));
    let mut lines = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = rx.recv_timeout(left) else {
            if child.try_wait()?.is_some() {
                outcome = Err(anyhow::anyhow!(
                    "the agent exited before attaching:\n{}",
                    lines.join("\n")
                ));
            }
            break;
        };
        lines.push(line.clone());
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let text = |key: &str| {
            event
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let flag = |key: &str| event.get(key).and_then(Value::as_bool).unwrap_or(false);
        match event.get("event").and_then(Value::as_str) {
            Some("features") => {
                seen_features = true;
                features.kernel = text("kernel");
                features.attach = text("attach");
                features.sock_destroy = text("sock_destroy");
                features.ring_buffer = flag("ring_buffer");
                features.btf = flag("btf");
                features.tc_bpf = flag("tc_bpf");
                features.lifecycle = true;
            }
            Some("lifecycle_unavailable") => features.lifecycle = false,
            Some("attached") => {
                features.attach = text("attach");
                features.replay = text("replay");
                // `lifecycle_unavailable`, if any, follows `attached` at once.
                if let Ok(next) = rx.recv_timeout(Duration::from_millis(500))
                    && next.contains("\"lifecycle_unavailable\"")
                {
                    features.lifecycle = false;
                }
                outcome = Ok(());
                break;
            }
            Some("fatal") => {
                outcome = Err(anyhow::anyhow!("the agent stopped: {}", text("error")));
                break;
            }
            _ => {}
        }
    }
    // SAFETY: plain syscall on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stop_deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait()?.is_none() {
        if Instant::now() >= stop_deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.wait();
    if !seen_features {
        outcome = outcome.context("no `features` line");
    }
    outcome?;
    Ok(features)
}
