//! `cargo xtask bench reconnect [-- --cycles N] [--modes a,b]`: how long a fixed-port client
//! needs to get back in after a crash, per way of recovering.
//!
//! Modes, each in its own fresh [`TestNet`] with a [`LegacyServer`] on port 5000:
//! - `linux_client_rfc5961`: no watchdog, a cooperating Linux client ([`DumbClient::cooperative`]):
//!   it answers the server's challenge ACK with a RST and re-sends its SYN, the kernel's own
//!   RFC 5961 recovery. The seed's client cannot do this; it is the bar to compare with.
//! - `destroy_only`: `watchdog run --mode destroy` and the dumb client: the stale socket is
//!   destroyed on the first SYN, the client's SYN retransmission (1 s) gets in.
//! - `replay`: the agent's default mode and the dumb client: the first SYN is held, the stale
//!   socket destroyed and the SYN re-injected.
//!
//! A cycle: connected → send → crash (silent) → reconnect from the same port; the sample is the
//! time from `connect()` to connected. A reconnect that takes longer than [`CYCLE_DEADLINE`] is a
//! failure; the stale socket is then killed with `ss -K` and the next cycle starts afresh.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::agent::{Agent, AgentExit};
use crate::bench::{Percentiles, count_in, dedup, round3};
use crate::dumb_client::{Connection, DumbClient};
use crate::legacy_server::{Bind, LegacyServer};
use crate::netns::{Family, TestNet, ns_exec};
use crate::privilege::is_root;
use crate::scenario::{FIXED_PORT, GREETING, SERVER_PORT};

/// Cycles per mode unless `--cycles` says otherwise.
pub const DEFAULT_CYCLES: usize = 200;
/// A reconnect slower than this is a failed cycle.
pub const CYCLE_DEADLINE: Duration = Duration::from_secs(10);
/// Connect, accept and read steps of a cycle.
const STEP: Duration = Duration::from_secs(2);
/// A progress line at least this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// How the client gets back in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// No watchdog; a Linux client that answers the challenge ACK.
    #[value(name = "linux_client_rfc5961")]
    LinuxClientRfc5961,
    /// `--mode destroy`; the dumb client.
    #[value(name = "destroy_only")]
    DestroyOnly,
    /// The default `--mode replay`; the dumb client.
    #[value(name = "replay")]
    Replay,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::LinuxClientRfc5961, Mode::DestroyOnly, Mode::Replay];

    pub fn name(self) -> &'static str {
        match self {
            Mode::LinuxClientRfc5961 => "linux_client_rfc5961",
            Mode::DestroyOnly => "destroy_only",
            Mode::Replay => "replay",
        }
    }

    /// The mode's own `watchdog run` arguments (after `--iface/--port` and [`guard_args`]), or
    /// `None` for no agent.
    fn agent_args(self) -> Option<&'static [&'static str]> {
        match self {
            Mode::LinuxClientRfc5961 => None,
            Mode::DestroyOnly => Some(&["--mode", "destroy"]),
            Mode::Replay => Some(&[]),
        }
    }
}

/// Crash → reconnect time of a fixed-port client: kernel RFC 5961 recovery, destroy only,
/// replay. Prints a table on stderr and one JSON line on stdout; exits 1 if a cycle failed.
/// `WATCHDOG_BENCH_AGENT_LOG=1` also prints each agent's log.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct Options {
    /// Crash/reconnect cycles per mode.
    #[arg(long, default_value_t = DEFAULT_CYCLES, value_parser = count_in(1, 100_000))]
    pub cycles: usize,
    /// The modes to run, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Mode::ALL)]
    pub modes: Vec<Mode>,
}

/// One mode's measurements.
#[derive(Debug)]
pub struct ModeResult {
    pub mode: Mode,
    pub cycles: usize,
    /// connect() → connected, of the cycles that got in.
    pub samples: Vec<Duration>,
    /// What went wrong in each failed cycle.
    pub failures: Vec<String>,
    /// A one-line summary of the agent's own log, if one ran.
    pub agent_note: Option<String>,
}

impl ModeResult {
    pub fn percentiles(&self) -> Option<Percentiles> {
        Percentiles::of(&self.samples)
    }

    fn json(&self) -> Value {
        let p = self.percentiles();
        let ms = |f: fn(&Percentiles) -> f64| p.as_ref().map(|p| round3(f(p)));
        json!({
            "p50_ms": ms(|p| p.p50_ms),
            "p90_ms": ms(|p| p.p90_ms),
            "p99_ms": ms(|p| p.p99_ms),
            "max_ms": ms(|p| p.max_ms),
            "cycles": self.cycles,
            "failures": self.failures.len(),
        })
    }
}

/// The ratios the benchmark exists for; `None` when a mode did not run (or had no sample).
#[derive(Debug, Default, Serialize)]
pub struct Ratios {
    pub destroy_only_p50_over_replay_p50: Option<f64>,
    pub destroy_only_p99_over_replay_p99: Option<f64>,
    pub linux_client_rfc5961_p50_over_replay_p50: Option<f64>,
}

impl Ratios {
    pub fn of(results: &[ModeResult]) -> Ratios {
        let p = |mode: Mode| {
            results
                .iter()
                .find(|r| r.mode == mode)
                .and_then(ModeResult::percentiles)
        };
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some((a / b * 10.0).round() / 10.0),
            _ => None,
        };
        let (linux, destroy, replay) = (
            p(Mode::LinuxClientRfc5961),
            p(Mode::DestroyOnly),
            p(Mode::Replay),
        );
        Ratios {
            destroy_only_p50_over_replay_p50: ratio(
                destroy.map(|p| p.p50_ms),
                replay.map(|p| p.p50_ms),
            ),
            destroy_only_p99_over_replay_p99: ratio(
                destroy.map(|p| p.p99_ms),
                replay.map(|p| p.p99_ms),
            ),
            linux_client_rfc5961_p50_over_replay_p50: ratio(
                linux.map(|p| p.p50_ms),
                replay.map(|p| p.p50_ms),
            ),
        }
    }
}

/// Guards off: the benchmark measures the recovery path, not the guards. The client crashes
/// right after it sent (`--min-idle 0s`), and one client reconnects hundreds of times a minute
/// (rate limits far above that, for agents that have them).
pub fn guard_args() -> Result<Vec<&'static str>> {
    let mut args = vec!["--min-idle", "0s"];
    for flag in ["--per-client-limit", "--global-limit"] {
        if Agent::supports_flag(flag)? {
            args.extend_from_slice(&[flag, "1000000/1s"]);
        }
    }
    Ok(args)
}

/// Runs the benchmark as `bench reconnect ARGS...` does.
pub fn main(mut opts: Options) -> Result<ExitCode> {
    opts.modes = dedup(&opts.modes);
    ensure!(
        is_root(),
        "the reconnect benchmark needs root (network namespaces, nftables, eBPF): run it with \
         sudo, e.g. `sudo -E cargo xtask bench reconnect`"
    );
    let agent_bin = Agent::binary();
    ensure!(
        agent_bin.is_file() || opts.modes.iter().all(|m| m.agent_args().is_none()),
        "agent binary not found at {}: run `cargo xtask bench reconnect`, which builds it",
        agent_bin.display()
    );
    let guards = if agent_bin.is_file() {
        guard_args()?
    } else {
        Vec::new()
    };
    eprintln!(
        "reconnect benchmark: {} cycle(s) per mode, modes {}; agent {} (guards: {})",
        opts.cycles,
        opts.modes
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(","),
        agent_bin.display(),
        guards.join(" ")
    );
    let mut results = Vec::new();
    for &mode in &opts.modes {
        let result = run_mode(mode, opts.cycles, &guards)
            .with_context(|| format!("mode {}", mode.name()))?;
        results.push(result);
    }
    eprint!("{}", table(&results));
    println!("{}", summary_json(&results));
    let failed = results.iter().any(|r| !r.failures.is_empty());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// One mode's cycles, in a fresh net; `guards` go to the agent (see [`guard_args`]).
pub fn run_mode(mode: Mode, cycles: usize, guards: &[&str]) -> Result<ModeResult> {
    let net = TestNet::new(&format!("bench_{}", mode.name()))?;
    let server = LegacyServer::start(&net, Bind::V4, SERVER_PORT)?;
    let server_addr = net.server_addr(Family::V4, SERVER_PORT);
    let client = match mode {
        Mode::LinuxClientRfc5961 => DumbClient::cooperative(&net, server_addr, FIXED_PORT)?,
        Mode::DestroyOnly | Mode::Replay => DumbClient::new(&net, server_addr, FIXED_PORT)?,
    };
    let agent = match mode.agent_args() {
        None => None,
        Some(extra) => {
            let mut args = vec!["--iface", net.server_iface(), "--port", "5000"];
            args.extend_from_slice(guards);
            args.extend_from_slice(extra);
            Some(Agent::start(&net, &args)?)
        }
    };
    eprintln!("[{}] started", mode.name());

    let mut result = ModeResult {
        mode,
        cycles,
        samples: Vec::with_capacity(cycles),
        failures: Vec::new(),
        agent_note: None,
    };
    let mut last_id = None;
    let (mut conn, mut id) = connect_fresh(&server, &client, &mut last_id)?;
    let started = Instant::now();
    let mut last_progress = Instant::now();
    for cycle in 1..=cycles {
        conn.send(GREETING)?;
        server.wait_bytes(id, GREETING.len() as u64, STEP)?;
        conn.crash()?;
        let out = client.reconnect(CYCLE_DEADLINE)?;
        match out.connection {
            Some(new_conn) if out.connected => {
                result.samples.push(out.elapsed);
                if std::env::var_os("WATCHDOG_BENCH_AGENT_LOG").is_some() {
                    eprintln!(
                        "[{}] cycle {cycle}: {:?}, {} SYN retransmissions",
                        mode.name(),
                        out.elapsed,
                        out.syn_retransmits
                    );
                }
                let peer = client.local_addr();
                let accepted =
                    server.wait_accepted(|a| a.peer == peer && Some(a.id) > last_id, STEP)?;
                last_id = Some(accepted.id);
                (conn, id) = (new_conn, accepted.id);
            }
            _ => {
                let why = format!(
                    "cycle {cycle}: not connected after {:?} ({} SYN retransmissions, error {:?})",
                    out.elapsed, out.syn_retransmits, out.error
                );
                eprintln!("[{}] FAILED {why}", mode.name());
                result.failures.push(why);
                kill_stale(&net)?;
                (conn, id) = connect_fresh(&server, &client, &mut last_id)?;
            }
        }
        if cycle == cycles || last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            let so_far = Percentiles::of(&result.samples)
                .map(|p| format!("p50 {:.3} ms, max {:.3} ms", p.p50_ms, p.max_ms))
                .unwrap_or_else(|| "no sample".into());
            eprintln!(
                "[{}] {cycle}/{cycles} cycles in {:.1} s, {} failure(s); {so_far}",
                mode.name(),
                started.elapsed().as_secs_f64(),
                result.failures.len()
            );
        }
    }
    drop(conn);
    if let Some(agent) = agent {
        let exit = agent.stop()?;
        result.agent_note = Some(agent_note(&exit));
        if std::env::var_os("WATCHDOG_BENCH_AGENT_LOG").is_some() {
            eprintln!("[{}] agent log:\n{}", mode.name(), exit.output());
        }
        if !exit.status.success() {
            eprintln!(
                "[{}] the agent exited with {}:\n{}",
                mode.name(),
                exit.status,
                exit.output()
            );
        }
    }
    Ok(result)
}

/// A first (or recovery) connection from the fixed port; `last_id` is the newest server id seen.
fn connect_fresh(
    server: &LegacyServer,
    client: &DumbClient,
    last_id: &mut Option<u64>,
) -> Result<(Connection, u64)> {
    let conn = client.connect(STEP)?;
    let peer = client.local_addr();
    let accepted = server.wait_accepted(|a| a.peer == peer && Some(a.id) > *last_id, STEP)?;
    *last_id = Some(accepted.id);
    Ok((conn, accepted.id))
}

/// After a failed cycle: kill whatever the server still holds from the fixed port.
fn kill_stale(net: &TestNet) -> Result<()> {
    let filter = format!("( dport = :{FIXED_PORT} )");
    ns_exec(
        net.server_ns(),
        "ss",
        &["-K", "-tnH", "state", "established", &filter],
    )
    .map(drop)
    .context("ss -K of the stale socket after a failed cycle")
}

fn agent_note(exit: &AgentExit) -> String {
    let count = |name| exit.events(name).len();
    let counter = |name| {
        exit.counter(name)
            .map_or_else(|_| "?".to_owned(), |n| n.to_string())
    };
    format!(
        "agent: {} destroyed, {} replayed, {} replay_failed, {} destroy_failed; held {}, \
         heartbeat_stale {}, ringbuf_full {}",
        count("destroyed"),
        count("replayed"),
        count("replay_failed"),
        count("destroy_failed"),
        counter("held"),
        counter("heartbeat_stale"),
        counter("ringbuf_full"),
    )
}

/// The human table.
pub fn table(results: &[ModeResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<22} {:>6} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "mode", "cycles", "failures", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for r in results {
        let cell = |f: fn(&Percentiles) -> f64| {
            r.percentiles()
                .map_or_else(|| "-".to_owned(), |p| format!("{:.3}", f(&p)))
        };
        let _ = writeln!(
            out,
            "{:<22} {:>6} {:>8} {:>10} {:>10} {:>10} {:>10}",
            r.mode.name(),
            r.cycles,
            r.failures.len(),
            cell(|p| p.p50_ms),
            cell(|p| p.p90_ms),
            cell(|p| p.p99_ms),
            cell(|p| p.max_ms),
        );
    }
    let ratios = Ratios::of(results);
    let show = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}x"));
    let _ = writeln!(
        out,
        "\ndestroy_only p50 / replay p50:          {}",
        show(ratios.destroy_only_p50_over_replay_p50)
    );
    let _ = writeln!(
        out,
        "destroy_only p99 / replay p99:          {}",
        show(ratios.destroy_only_p99_over_replay_p99)
    );
    let _ = writeln!(
        out,
        "linux_client_rfc5961 p50 / replay p50:  {}",
        show(ratios.linux_client_rfc5961_p50_over_replay_p50)
    );
    for r in results {
        if let Some(note) = &r.agent_note {
            let _ = writeln!(out, "{}: {note}", r.mode.name());
        }
        for f in &r.failures {
            let _ = writeln!(out, "{}: {f}", r.mode.name());
        }
    }
    out
}

/// The stdout line: every mode (null when not run) and the ratios.
pub fn summary_json(results: &[ModeResult]) -> Value {
    let mut top = Map::new();
    for mode in Mode::ALL {
        let value = results
            .iter()
            .find(|r| r.mode == mode)
            .map_or(Value::Null, ModeResult::json);
        top.insert(mode.name().to_owned(), value);
    }
    top.insert(
        "ratios".into(),
        serde_json::to_value(Ratios::of(results)).unwrap_or(Value::Null),
    );
    Value::Object(top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::parse_options;

    #[test]
    fn options_default_and_parse() {
        let parse = parse_options::<Options>;
        let o = parse(&[]).expect("defaults");
        assert_eq!(o.cycles, DEFAULT_CYCLES);
        assert_eq!(o.modes, Mode::ALL.to_vec());
        let o = parse(&["--cycles", "5", "--modes", "replay,linux_client_rfc5961"]).expect("valid");
        assert_eq!(o.cycles, 5);
        assert_eq!(o.modes, vec![Mode::Replay, Mode::LinuxClientRfc5961]);
        let o = parse(&["--cycles=7", "--modes=destroy_only"]).expect("valid");
        assert_eq!((o.cycles, o.modes), (7, vec![Mode::DestroyOnly]));
        for bad in [
            &["--cycles", "0"][..],
            &["--cycles"],
            &["--modes", "fast"],
            &["--modes", ","],
            &["--what"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ratios_and_json_need_both_modes() {
        let ms = |v: &[u64]| v.iter().map(|&m| Duration::from_millis(m)).collect();
        let result = |mode, samples| ModeResult {
            mode,
            cycles: 3,
            samples,
            failures: Vec::new(),
            agent_note: None,
        };
        let results = vec![
            result(Mode::Replay, ms(&[1, 1, 2])),
            result(Mode::DestroyOnly, ms(&[1000, 1010, 1020])),
        ];
        let r = Ratios::of(&results);
        assert_eq!(r.destroy_only_p50_over_replay_p50, Some(1010.0));
        assert_eq!(r.destroy_only_p99_over_replay_p99, Some(510.0));
        assert_eq!(r.linux_client_rfc5961_p50_over_replay_p50, None);
        let j = summary_json(&results);
        assert_eq!(j["replay"]["p50_ms"], json!(1.0));
        assert_eq!(j["replay"]["failures"], json!(0));
        assert_eq!(j["linux_client_rfc5961"], Value::Null);
        assert_eq!(
            j["ratios"]["destroy_only_p50_over_replay_p50"],
            json!(1010.0)
        );
    }
}
