//! Start-up errors: every refusal says what is wrong, exits non-zero and attaches nothing.
//!
//! The agent runs in a test net's server namespace, like in production next to the server. The
//! check "nothing attached" asks the kernel which programs hang on the server veth's ingress hook
//! (TCX links, or the pre-TCX `clsact` filters, and whether a `clsact` qdisc appeared); the test
//! of a successful run shows that the same check sees the agent's program while it runs.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use watchdog_tests::refusal::{assert_refused, run_refused};
use watchdog_tests::{
    Agent, TestNet, assert_nothing_attached, assert_only_program_attached, ingress_programs,
    require_root,
};

/// The control: the check sees the agent's program while it runs, and nothing after SIGTERM.
#[test]
fn a_running_agent_is_seen_attached_and_detaches_on_sigterm() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("cli_ok")?;
    assert_nothing_attached(&net)?;
    let agent = Agent::start(&net, &["--iface", net.server_iface(), "--port", "5000"])?;
    let attached = agent.wait_for_event("attached", Duration::from_secs(1))?;
    let programs = ingress_programs(&net)?;
    ensure!(
        programs == vec![agent.program_id()?],
        "expected exactly the agent's program on {} ingress, found {programs:?}; attached: {attached}",
        net.server_iface()
    );
    let exit = agent.stop()?;
    ensure!(
        exit.status.success(),
        "agent exited with {}:\n{}",
        exit.status,
        exit.output()
    );
    assert_nothing_attached(&net)
}

/// A second agent on an interface that one already watches is refused, and the first keeps it:
/// two agents would both hold and replay every stale SYN. The running agent holds the
/// interface's lock; with `CAP_SYS_ADMIN` its program (TCX) or its filter's fresh heartbeat
/// (clsact) tells as well.
#[test]
fn a_second_agent_on_the_same_interface_is_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("cli_second")?;
    let first = Agent::start(&net, &["--iface", net.server_iface(), "--port", "5000"])?;
    let program = first.program_id()?;
    let state = std::env::temp_dir().join(format!("watchdog-second-{}", net.server_ns()));
    let journal = state.join("journal").to_string_lossy().into_owned();
    let socket = state.join("control.sock").to_string_lossy().into_owned();
    let refusal = run_refused(
        &net,
        &[],
        &[
            "--iface",
            net.server_iface(),
            "--port",
            "5000",
            "--journal",
            &journal,
            "--control-socket",
            &socket,
        ],
    )?;
    assert_refused(&refusal, &["another watchdog agent", net.server_iface()])?;
    assert_only_program_attached(&net, program)?;

    // With only the systemd unit's capabilities, which cannot read another program's maps.
    let minimal = [
        "setpriv",
        "--bounding-set=-all,+bpf,+perfmon,+net_admin,+net_raw",
        "--inh-caps=-all",
    ];
    let refusal = run_refused(
        &net,
        &minimal,
        &[
            "--iface",
            net.server_iface(),
            "--port",
            "5000",
            "--journal",
            &journal,
            "--control-socket",
            &socket,
        ],
    )?;
    let _ = std::fs::remove_dir_all(&state);
    // The running agent holds the interface's lock, with TCX and before it.
    assert_refused(
        &refusal,
        &["another watchdog agent", net.server_iface(), "holds"],
    )?;
    assert_only_program_attached(&net, program)?;
    let exit = first.stop()?;
    ensure!(
        exit.status.success(),
        "the first agent exited with {}:\n{}",
        exit.status,
        exit.output()
    );
    assert_nothing_attached(&net)
}

#[test]
fn unknown_interface_is_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("cli_iface")?;
    let refusal = run_refused(&net, &[], &["--iface", "nope0", "--port", "5000"])?;
    assert_refused(&refusal, &["nope0"])?;

    // Next to an interface that exists, the good one must not be left half-attached.
    let refusal = run_refused(
        &net,
        &[],
        &[
            "--iface",
            net.server_iface(),
            "--iface",
            "nope0",
            "--port",
            "5000",
        ],
    )?;
    assert_refused(&refusal, &["nope0"])?;
    assert_nothing_attached(&net)?;

    // The JSON log carries the same error in a `fatal` event.
    let refusal = run_refused(
        &net,
        &[],
        &["--iface", "nope0", "--port", "5000", "--log-format", "json"],
    )?;
    assert_refused(&refusal, &["nope0"])?;
    let fatal = refusal
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("event").and_then(Value::as_str) == Some("fatal"))
        .with_context(|| format!("no `fatal` JSON event:\n{}", refusal.stderr))?;
    ensure!(
        fatal.to_string().contains("nope0"),
        "the fatal event does not name the interface: {fatal}"
    );
    Ok(())
}

#[test]
fn port_zero_is_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("cli_port")?;
    let refusal = run_refused(&net, &[], &["--iface", net.server_iface(), "--port", "0"])?;
    assert_refused(&refusal, &["port 0"])?;
    assert_nothing_attached(&net)
}

#[test]
fn bad_client_prefixes_are_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("cli_cidr")?;
    for bad in ["10.0.0.0/33", "banana", "fd00::/129"] {
        let refusal = run_refused(
            &net,
            &[],
            &[
                "--iface",
                net.server_iface(),
                "--port",
                "5000",
                "--client",
                bad,
            ],
        )?;
        assert_refused(&refusal, &[bad, "--client"]).with_context(|| format!("--client {bad}"))?;
        assert_nothing_attached(&net)?;
    }
    Ok(())
}

#[test]
fn missing_required_flags_are_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("cli_missing")?;
    let iface = net.server_iface();
    let cases: [(&[&str], &[&str]); 3] = [
        (&["--port", "5000"], &["--iface"]),
        (&["--iface", iface], &["--port"]),
        (&[], &["--iface", "--port"]),
    ];
    for (args, needles) in cases {
        let refusal = run_refused(&net, &[], args)?;
        assert_refused(&refusal, needles).with_context(|| format!("watchdog run {args:?}"))?;
        assert_nothing_attached(&net)?;
    }
    Ok(())
}

#[test]
fn missing_capabilities_are_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = TestNet::new("cli_caps")?;
    let args = ["--iface", net.server_iface(), "--port", "5000"];

    // An ordinary user: no capabilities at all.
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ];
    let refusal = run_refused(&net, &nobody, &args)?;
    assert_refused(&refusal, &["CAP_NET_ADMIN", "CAP_BPF"])?;
    assert_nothing_attached(&net)?;

    // Root without CAP_NET_ADMIN: the message names just that one.
    let no_net_admin = [
        "setpriv",
        "--inh-caps=-net_admin",
        "--bounding-set=-net_admin",
    ];
    let refusal = run_refused(&net, &no_net_admin, &args)?;
    assert_refused(&refusal, &["CAP_NET_ADMIN"])?;
    ensure!(
        !refusal.stderr.contains("CAP_BPF"),
        "CAP_BPF is there, yet the message asks for it:\n{}",
        refusal.stderr
    );
    assert_nothing_attached(&net)
}
