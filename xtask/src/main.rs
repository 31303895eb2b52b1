//! `cargo xtask`: the project's developer commands.
//!
//! - `build-ebpf` builds the classifier object, installing the toolchain parts it needs once;
//! - `run` builds everything and runs the agent (`cargo xtask run -- run --iface eth0 --port 5000`);
//! - `test` builds everything and runs every test, the end-to-end ones included (needs root), then
//!   the end-to-end tests again on Debian 12's kernel in a VM (`kernel-test`), and prints the matrix;
//! - `kernel-test` runs the end-to-end tests on one kernel: `debian-6.1` in a VM, or `host`;
//! - `demo` plays the seed scenario in network namespaces, without and with the watchdog;
//! - `bench NAME` runs a benchmark program against release builds and prints its ratios;
//! - `install` puts the agent, its config and its systemd unit in place.
mod build_ebpf;
mod install;
mod kernel_test;
mod toolchain;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF object (nightly, bpfel-unknown-none), installing what is missing.
    BuildEbpf,
    /// Build the agent with the fresh object and run it with the given arguments.
    Run {
        /// Build in release mode.
        #[arg(long)]
        release: bool,
        /// Arguments for `watchdog`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build everything and run all tests (end-to-end tests need root), then the end-to-end
    /// tests on Debian 12's kernel in a VM; prints one row per kernel.
    Test {
        /// Only this machine's kernel: skip the VM (a quick local loop).
        #[arg(long)]
        host_only: bool,
        /// Extra arguments for the host's `cargo test`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the end-to-end tests on other kernels: Debian 12's own in a QEMU VM, or this
    /// machine's. Installs what it needs (qemu-system-x86, kmod) and caches the kernel.
    KernelTest {
        /// Which kernels (repeatable; default: debian-6.1).
        #[arg(long = "kernel", value_enum)]
        kernels: Vec<kernel_test::KernelChoice>,
        /// Only these test binaries (repeatable; default: the matrix's set, see README).
        #[arg(long = "test", value_name = "NAME")]
        tests: Vec<String>,
    },
    /// Inside the kernel-test VM: the test runner, as PID 1.
    #[command(hide = true)]
    KernelTestGuest { run_dir: PathBuf },
    /// Show the seed scenario in network namespaces: the failure without the watchdog, the
    /// recovery with it; ends with one JSON line on stdout.
    Demo,
    /// Install the release agent, its config and its systemd unit (as root).
    Install {
        /// Install under this directory instead of `/` (for packaging or a look first).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Run a benchmark (release builds): `reconnect`, `overhead` or `scale` (`help` lists them).
    Bench {
        /// Which benchmark.
        name: String,
        /// Extra arguments for the benchmark, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<ExitCode> {
    match Cli::parse().command {
        Cmd::BuildEbpf => build_ebpf::build().map(drop),
        Cmd::Run { release, args } => {
            let agent = build_agent(release)?;
            run(Command::new(agent).args(args))
        }
        Cmd::Test { host_only, args } => return test(host_only, &args),
        Cmd::KernelTest { kernels, tests } => {
            let kernels = if kernels.is_empty() {
                vec![kernel_test::KernelChoice::Debian61]
            } else {
                kernels
            };
            let artifacts = kernel_test::build()?;
            let mut runs = Vec::new();
            for kernel in kernels {
                let run = kernel_test::run(kernel, &artifacts, &tests)?;
                kernel_test::report::kernel_table(&run);
                runs.push(run);
            }
            return Ok(report_matrix(&runs));
        }
        Cmd::KernelTestGuest { run_dir } => kernel_test::guest_main(&run_dir),
        Cmd::Demo => {
            let agent = build_agent(false)?;
            let mut demo = cargo();
            demo.args(["run", "--quiet", "-p", "watchdog-tests", "--bin", "demo"])
                .env("WATCHDOG_BIN", &agent);
            run(&mut demo)
        }
        Cmd::Install { root } => install::install(&build_agent(true)?, &root),
        Cmd::Bench { name, args } => {
            let agent = build_agent(true)?;
            let mut bench = cargo();
            bench
                .args([
                    "run",
                    "--quiet",
                    "--release",
                    "-p",
                    "watchdog-tests",
                    "--bin",
                    "bench",
                ])
                .arg("--")
                .arg(name)
                .args(args)
                .env("WATCHDOG_BIN", &agent);
            run(&mut bench)
        }
    }?;
    Ok(ExitCode::SUCCESS)
}

/// `cargo xtask test`: every test on this machine's kernel, then (unless `host_only`) the
/// kernel matrix's VM runs; one table per kernel and the matrix at the end.
fn test(host_only: bool, args: &[String]) -> Result<ExitCode> {
    let agent = build_agent(false)?;
    let host = host_suite(&agent, args)?;
    kernel_test::report::kernel_table(&host);
    let mut runs = vec![host];
    if !host_only {
        let artifacts = kernel_test::build()?;
        let run = kernel_test::run(kernel_test::KernelChoice::Debian61, &artifacts, &[])?;
        kernel_test::report::kernel_table(&run);
        runs.push(run);
    }
    Ok(report_matrix(&runs))
}

fn report_matrix(runs: &[kernel_test::KernelRun]) -> ExitCode {
    kernel_test::report::matrix(runs);
    let failed: Vec<&str> = runs
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.label.as_str())
        .collect();
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("xtask: tests failed on: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}

/// `cargo test --workspace` on this machine, its output passed through and read for the table:
/// each `Running ...` line opens a test binary, its `test result:` line closes it.
fn host_suite(agent: &Path, args: &[String]) -> Result<kernel_test::KernelRun> {
    use kernel_test::plan::{BinaryResult, Outcome, Summary};
    let started = Instant::now();
    let mut test = cargo();
    test.args(["test", "--workspace", "--no-fail-fast"])
        .args(args)
        .env("WATCHDOG_BIN", agent)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = test.spawn().with_context(|| format!("starting {test:?}"))?;
    // cargo names each binary on stderr (`Running ...`), the harness reports on stdout: both
    // are read, passed through to where they were going, and parsed in arrival order.
    let (tx, rx) = std::sync::mpsc::channel::<(bool, String)>();
    let streams: [(bool, Box<dyn std::io::Read + Send>); 2] = [
        (
            false,
            Box::new(child.stdout.take().context("cargo test stdout")?),
        ),
        (
            true,
            Box::new(child.stderr.take().context("cargo test stderr")?),
        ),
    ];
    for (is_stderr, stream) in streams {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send((is_stderr, line)).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut results: Vec<BinaryResult> = Vec::new();
    let mut current: Option<String> = None;
    let mut failures = Vec::new();
    for (is_stderr, line) in rx {
        if is_stderr {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("Running ") {
            current = Some(binary_name(rest));
        } else if let Some(rest) = trimmed.strip_prefix("Doc-tests ") {
            current = Some(format!("doc-tests {rest}"));
        } else if let Some(name) = trimmed
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            failures.push(name.to_owned());
        } else if trimmed.starts_with("test result: ") {
            let mut summary = Summary::default();
            summary.add_line(trimmed);
            let secs = trimmed
                .rsplit("finished in ")
                .next()
                .and_then(|s| s.trim_end_matches('s').parse::<f64>().ok())
                .unwrap_or(0.0);
            results.push(BinaryResult {
                name: current.take().unwrap_or_else(|| "?".into()),
                outcome: if summary.failed == 0 {
                    Outcome::Passed
                } else {
                    Outcome::Failed
                },
                exit: None,
                secs,
                summary,
                failures: std::mem::take(&mut failures),
                log: "(above)".into(),
                error: None,
            });
        }
    }
    let status = child.wait()?;
    let wall = started.elapsed();
    // Binaries without tests (doc-tests of a crate without examples, plain bins) say nothing.
    results.retain(|r| r.summary.passed + r.summary.failed + r.summary.ignored > 0);
    let features = kernel_test::probe::probe(
        agent,
        &workspace_root().join("target/kernel-test/host-probe"),
    );
    let error = (!status.success()).then(|| format!("cargo test exited with {status}"));
    let planned = results.len();
    Ok(kernel_test::KernelRun {
        label: "host".into(),
        release: kernel_test::running_release(),
        place: "this machine (cargo test --workspace, debug agent)".into(),
        features: Some(features),
        results,
        planned,
        error,
        boot: None,
        tests_secs: Some(wall.as_secs_f64()),
        wall,
    })
}

/// `tests/e2e.rs (target/debug/deps/e2e-0123abcd)` → `e2e`; `unittests src/lib.rs (…/watchdog_tests-…)`
/// → `watchdog_tests (unit)`.
fn binary_name(running: &str) -> String {
    let path = running
        .rsplit_once('(')
        .map(|(_, p)| p.trim_end_matches(')'))
        .unwrap_or(running);
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.rsplit_once('-').map_or(file, |(s, _)| s);
    if running.starts_with("unittests") {
        format!("{stem} (unit)")
    } else {
        stem.to_owned()
    }
}

/// Builds the eBPF object, then the agent that embeds it; returns the agent's path.
pub fn build_agent(release: bool) -> Result<PathBuf> {
    build_ebpf::build()?;
    let mut build = cargo();
    build.args(["build", "--package", "watchdog"]);
    if release {
        build.arg("--release");
    }
    run(&mut build)?;
    let profile = if release { "release" } else { "debug" };
    Ok(workspace_root()
        .join("target")
        .join(profile)
        .join("watchdog"))
}

/// The workspace's top directory (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// `cargo` of the toolchain that runs xtask, in the workspace root.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

/// Runs `command`, failing with its name when it fails.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}
