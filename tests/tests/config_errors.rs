//! `watchdog run --config FILE.toml`: a config file with a bad value or an unknown key is
//! refused before anything touches the kernel. The agent exits non-zero, its message names the
//! key and what is wrong with it, and nothing hangs on the server veth afterwards (the kernel's
//! own list of TCX ingress programs, and no `clsact` qdisc; see `hooks.rs`).
//!
//! Every file is otherwise valid and names the test net's real server veth and port 5000, so
//! each case has exactly one thing wrong with it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use watchdog_tests::refusal::run_refused;
use watchdog_tests::{TestNet, assert_nothing_attached, require_root};

static NEXT_FILE: AtomicU32 = AtomicU32::new(0);

/// A config file in the temp directory, removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(text: &str) -> Result<ConfigFile> {
        let path = std::env::temp_dir().join(format!(
            "watchdog-config-errors-{}-{}.toml",
            std::process::id(),
            NEXT_FILE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(ConfigFile(path))
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the agent with `file` as its config (alone, then beside valid flags, then with the
/// JSON log) and checks each run: refused with an exit code, message containing every one of
/// `needles`, the same in the JSON `fatal` event, nothing attached.
fn assert_config_refused(net: &TestNet, file: &str, needles: &[&str]) -> Result<()> {
    let config = ConfigFile::new(file)?;
    let iface = net.server_iface();
    let runs: [Vec<&str>; 3] = [
        vec!["--config", config.path()],
        // Flags win over the file's keys, but a bad key is still an error, not ignored.
        vec![
            "--config",
            config.path(),
            "--iface",
            iface,
            "--port",
            "5000",
        ],
        vec!["--config", config.path(), "--log-format", "json"],
    ];
    for (i, args) in runs.iter().enumerate() {
        let refusal = run_refused(net, &[], args)?;
        ensure!(
            refusal.status.code().is_some_and(|c| c != 0),
            "`watchdog run {}` was not refused with an exit code ({}):\n{}",
            args.join(" "),
            refusal.status,
            refusal.stderr
        );
        let message = if i == 2 {
            let fatal = refusal
                .stderr
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v.get("event").and_then(Value::as_str) == Some("fatal"))
                .with_context(|| format!("no `fatal` JSON event:\n{}", refusal.stderr))?;
            fatal.to_string()
        } else {
            refusal.stderr.clone()
        };
        for needle in needles {
            ensure!(
                message.contains(needle),
                "`watchdog run {}`: the error does not mention {needle:?}:\n{message}",
                args.join(" ")
            );
        }
        assert_nothing_attached(net)?;
    }
    Ok(())
}

/// A valid file for `net` with `extra` appended.
fn base(net: &TestNet, extra: &str) -> String {
    format!(
        "ifaces = [\"{}\"]\nports = [5000]\n{extra}",
        net.server_iface()
    )
}

#[test]
fn config_file_with_a_bad_client_prefix_is_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("cfg_cidr")?;
    assert_config_refused(
        &net,
        &base(&net, "clients = [\"10.0.0.0/33\"]\n"),
        &["clients", "/33"],
    )?;
    assert_config_refused(
        &net,
        &base(&net, "clients = [\"192.0.2.0/24\", \"banana\"]\n"),
        &["clients", "banana"],
    )
}

#[test]
fn config_file_with_port_zero_is_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("cfg_port")?;
    // Without --port on the command line: the second run's flags replace `ports`.
    let config = ConfigFile::new(&format!(
        "ifaces = [\"{}\"]\nports = [5000, 0]\n",
        net.server_iface()
    ))?;
    for args in [
        vec!["--config", config.path()],
        vec!["--config", config.path(), "--log-format", "json"],
    ] {
        let refusal = run_refused(&net, &[], &args)?;
        ensure!(
            refusal.status.code().is_some_and(|c| c != 0),
            "not refused ({}):\n{}",
            refusal.status,
            refusal.stderr
        );
        for needle in ["ports", "port 0"] {
            ensure!(
                refusal.stderr.contains(needle),
                "the error does not mention {needle:?}:\n{}",
                refusal.stderr
            );
        }
        assert_nothing_attached(&net)?;
    }
    Ok(())
}

#[test]
fn config_file_with_an_unknown_interface_is_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("cfg_iface")?;
    // Beside the real server veth, so a half-attached agent would show.
    let config = ConfigFile::new(&format!(
        "ifaces = [\"{}\", \"nope0\"]\nports = [5000]\n",
        net.server_iface()
    ))?;
    for args in [
        vec!["--config", config.path()],
        vec!["--config", config.path(), "--log-format", "json"],
    ] {
        let refusal = run_refused(&net, &[], &args)?;
        ensure!(
            refusal.status.code().is_some_and(|c| c != 0),
            "not refused ({}):\n{}",
            refusal.status,
            refusal.stderr
        );
        for needle in ["nope0", "ifaces"] {
            ensure!(
                refusal.stderr.contains(needle),
                "the error does not mention {needle:?}:\n{}",
                refusal.stderr
            );
        }
        assert_nothing_attached(&net)?;
    }
    Ok(())
}

#[test]
fn config_file_with_an_unknown_key_is_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("cfg_key")?;
    // A misspelt guard must not fall back to its default, at the top level nor in [guards].
    assert_config_refused(
        &net,
        &base(&net, "[guards]\nmin_idel = \"1s\"\n"),
        &["min_idel", "unknown field"],
    )?;
    assert_config_refused(
        &net,
        &base(&net, "mdoe = \"observe\"\n"),
        &["mdoe", "unknown field"],
    )
}
