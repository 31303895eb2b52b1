//! `cargo xtask kernel-test`: the end-to-end tests on the kernels users run, not only on the one
//! this machine boots.
//!
//! * `--kernel debian-6.1`: Debian 12's own kernel (`linux-image-amd64`, no TCX, an older
//!   verifier) boots in QEMU under software emulation (TCG). The VM sees this machine's root
//!   read-only over 9p, under a tmpfs overlay, so it runs the host's userspace (`ip`, `nft`,
//!   `tc`), the agent and the test binaries built here, at the same paths; results come back
//!   through a second, writable 9p share (the run directory). [`debian`] fetches the kernel,
//!   [`initramfs`] builds the small initramfs, [`qemu`] runs the VM, [`guest`] is its PID 1.
//! * `--kernel host`: the same test binaries directly on the running kernel, no VM.
//!
//! Both run [`VM_TESTS`] against the release agent (what `cargo xtask install` deploys; under
//! emulation a debug agent needs seconds to start) after a probe of the kernel by the agent
//! ([`probe`]), and report one table per kernel and a matrix ([`report`]). A VM that does not
//! boot, times out or crashes is a failure, as is any failing test inside it.
pub mod debian;
pub mod guest;
mod initramfs;
pub mod plan;
pub mod probe;
mod qemu;
pub mod report;
mod system;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::Value;

use self::plan::{BinaryResult, Done, Features, Plan, TestBinary};
use crate::workspace_root;

/// A test binary of the kernel matrix.
pub struct MatrixTest {
    /// The test target (`tests/NAME.rs`).
    pub name: &'static str,
    /// Its hard timeout inside the VM.
    pub timeout_s: u64,
    /// Tests left out, each with the reason.
    pub skip: Skips,
}

/// (test name, why it is left out of the matrix).
pub type Skips = &'static [(&'static str, &'static str)];

/// The test binaries run on every kernel of the matrix: every end-to-end test but one. The limits
/// are about four times what each takes under emulation on two cores.
pub const VM_TESTS: &[MatrixTest] = &[
    test("cli_errors", 120, &[]),
    test("config_errors", 120, &[]),
    test("e2e", 240, &[]),
    test("replay", 180, &[]),
    test(
        "guards",
        120,
        &[(
            "spoofed_syns_against_live_connections_destroy_nothing",
            "a load test: 10,000 SYNs must be judged within 6 s of the last, a bound on the \
             agent's speed that under emulation measures the emulator (every SYN is still \
             judged, nothing lost, a few seconds later)",
        )],
    ),
    test("malformed", 150, &[]),
    test("operations", 150, &[]),
    test("dead_peers", 150, &[]),
    test("embedded_client", 90, &[]),
];

const fn test(name: &'static str, timeout_s: u64, skip: Skips) -> MatrixTest {
    MatrixTest {
        name,
        timeout_s,
        skip,
    }
}

/// Boot, the initramfs, the runner's mounts and the probe, before the first test starts.
const VM_BOOT_BUDGET: Duration = Duration::from_secs(180);
/// Beyond a test binary's own limit, for the guest to kill it and report.
const STEP_MARGIN: Duration = Duration::from_secs(30);
const VM_CPUS: u32 = 2;
const VM_MEMORY_MIB: u32 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum KernelTestError {
    #[error("{programs} not found; install with: {install}")]
    MissingTools { programs: String, install: String },
    #[error("`{command}` failed: {stderr}")]
    Apt { command: String, stderr: String },
    #[error(
        "apt knows no package {package}: kernel-test needs Debian 12 (bookworm) `main` in the apt \
         sources, then `apt-get update`"
    )]
    PackageUnknown { package: String },
    #[error(
        "the VM did not boot: QEMU exited after {secs:.0} s before the test runner started. \
         Console ({console}), last lines:\n{tail}"
    )]
    NoBoot {
        secs: f64,
        console: String,
        tail: String,
    },
    #[error(
        "the VM timed out: killed after {secs:.0} s ({finished} of {planned} test binaries \
         finished). Console ({console}), last lines:\n{tail}"
    )]
    Timeout {
        secs: f64,
        finished: usize,
        planned: usize,
        console: String,
        tail: String,
    },
    #[error(
        "the VM stopped before its runner finished ({finished} of {planned} test binaries): \
         {why}. Console ({console}), last lines:\n{tail}"
    )]
    Crashed {
        finished: usize,
        planned: usize,
        why: String,
        console: String,
        tail: String,
    },
    #[error("unknown test binary {0:?}; the workspace's test targets are: {1}")]
    UnknownTest(String, String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    /// Debian 12's own kernel (linux-image-amd64, 6.1) in a QEMU VM.
    #[value(name = "debian-6.1")]
    Debian61,
    /// The running kernel, no VM.
    Host,
}

impl KernelChoice {
    pub fn label(self) -> &'static str {
        match self {
            KernelChoice::Debian61 => "debian-6.1",
            KernelChoice::Host => "host",
        }
    }
}

/// What the runs need from the build.
pub struct Artifacts {
    /// The agent the tests start.
    pub agent: PathBuf,
    /// Test target name → (executable, package directory).
    pub tests: BTreeMap<String, (PathBuf, PathBuf)>,
}

/// One kernel's run, for the report.
pub struct KernelRun {
    pub label: String,
    /// `uname -r` (or the Debian package) of the kernel that ran.
    pub release: String,
    /// Where: "this machine" or "QEMU (TCG)".
    pub place: String,
    pub features: Option<Features>,
    pub results: Vec<BinaryResult>,
    pub planned: usize,
    /// Why the run as a whole failed (the VM did not boot, timed out, ...).
    pub error: Option<String>,
    /// From QEMU's start until the runner inside the VM was up.
    pub boot: Option<Duration>,
    /// The runner's own time, probe and tests.
    pub tests_secs: Option<f64>,
    pub wall: Duration,
}

impl KernelRun {
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && self.results.len() == self.planned
            && self
                .results
                .iter()
                .all(|r| r.outcome == plan::Outcome::Passed)
    }
}

/// Builds the release agent (with a fresh eBPF object) and the workspace's test binaries, and
/// lists the latter.
pub fn build() -> Result<Artifacts> {
    let agent = crate::build_agent(true)?;
    let mut command = crate::cargo();
    command
        .args([
            "test",
            "--workspace",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stdout(Stdio::piped());
    let mut child = command.spawn().context("starting cargo test --no-run")?;
    let stdout = child.stdout.take().context("cargo stdout")?;
    let mut tests = BTreeMap::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
            continue;
        }
        let kinds = message["target"]["kind"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !kinds.iter().any(|k| k == "test") {
            continue;
        }
        let (Some(name), Some(exe), Some(manifest)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
            message["manifest_path"].as_str(),
        ) else {
            continue;
        };
        let dir = Path::new(manifest)
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        tests.insert(name.to_owned(), (PathBuf::from(exe), dir));
    }
    let status = child.wait()?;
    if !status.success() {
        anyhow::bail!("building the test binaries failed: {status}");
    }
    Ok(Artifacts { agent, tests })
}

/// The plan for `names` (default [`VM_TESTS`]).
fn make_plan(label: &str, artifacts: &Artifacts, names: &[String]) -> Result<Plan> {
    let chosen: Vec<(&str, u64, Skips)> = if names.is_empty() {
        VM_TESTS
            .iter()
            .map(|t| (t.name, t.timeout_s, t.skip))
            .collect()
    } else {
        names
            .iter()
            .map(|n| match VM_TESTS.iter().find(|t| t.name == n) {
                Some(t) => (n.as_str(), t.timeout_s, t.skip),
                None => (n.as_str(), 300, &[] as Skips),
            })
            .collect()
    };
    let mut tests = Vec::new();
    for (name, timeout_s, skip) in chosen {
        let Some((exe, cwd)) = artifacts.tests.get(name) else {
            return Err(KernelTestError::UnknownTest(
                name.to_owned(),
                artifacts
                    .tests
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            )
            .into());
        };
        let mut args = Vec::new();
        for (test, _why) in skip {
            args.extend(["--skip".to_owned(), (*test).to_owned()]);
        }
        if !args.is_empty() {
            // Skip exactly the named tests (only test names are filtered here).
            args.push("--exact".to_owned());
        }
        tests.push(TestBinary {
            name: name.to_owned(),
            exe: exe.clone(),
            args,
            cwd: cwd.clone(),
            timeout_s,
        });
    }
    let mut env = BTreeMap::new();
    env.insert(
        "WATCHDOG_BIN".to_owned(),
        artifacts.agent.display().to_string(),
    );
    // Root is there, so nothing skips; a test that would skip fails instead.
    env.insert("CI".to_owned(), "true".to_owned());
    env.insert("RUST_BACKTRACE".to_owned(), "1".to_owned());
    Ok(Plan {
        kernel: label.to_owned(),
        agent: artifacts.agent.clone(),
        env,
        tests,
    })
}

/// A fresh run directory for `label` under `target/kernel-test/`.
fn run_dir(label: &str) -> Result<PathBuf> {
    let dir = workspace_root().join("target/kernel-test").join(label);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Runs `names` (default [`VM_TESTS`]) on one kernel. Problems of the run itself (a VM that
/// does not boot, say) end up in [`KernelRun::error`]; only set-up errors are returned.
pub fn run(choice: KernelChoice, artifacts: &Artifacts, names: &[String]) -> Result<KernelRun> {
    let label = choice.label();
    let dir = run_dir(label)?;
    let plan = make_plan(label, artifacts, names)?;
    plan::write_json(&dir.join(plan::PLAN_FILE), &plan)?;
    system::say(&format!(
        "{label}: {} test binaries, results in {}",
        plan.tests.len(),
        dir.display()
    ));
    match choice {
        KernelChoice::Host => Ok(run_here(&plan, &dir)),
        KernelChoice::Debian61 => run_vm(&plan, &dir),
    }
}

fn run_here(plan: &Plan, dir: &Path) -> KernelRun {
    let started = Instant::now();
    let features = probe::probe(&plan.agent, &dir.join("probe"));
    let mut console = std::io::stderr();
    let (results, error) = match plan::execute(plan, dir, &mut console) {
        Ok(results) => (results, None),
        Err(e) => (
            plan::read_results(dir).unwrap_or_default(),
            Some(format!("{e:#}")),
        ),
    };
    KernelRun {
        label: plan.kernel.clone(),
        release: running_release(),
        place: "this machine".into(),
        features: Some(features),
        results,
        planned: plan.tests.len(),
        error,
        boot: None,
        tests_secs: Some(started.elapsed().as_secs_f64()),
        wall: started.elapsed(),
    }
}

fn run_vm(plan: &Plan, dir: &Path) -> Result<KernelRun> {
    let started = Instant::now();
    system::ensure_tools(&[
        &system::APT_GET,
        &system::DPKG_DEB,
        &system::KMOD,
        &system::QEMU,
    ])?;
    let kernel = debian::kernel("6.1")?;
    let busybox = debian::busybox()?;
    let initramfs = kernel
        .modules
        .parent()
        .and_then(Path::parent)
        .context("kernel cache layout")?
        .join("initramfs.cpio");
    initramfs::build(&kernel, &busybox, &initramfs)?;
    let runner = std::env::current_exe().context("locating the xtask binary")?;
    std::fs::write(
        dir.join("boot.env"),
        format!(
            "MODULES='{}'\nRUNNER='{}'\n",
            kernel.modules.display(),
            runner.display()
        ),
    )?;
    let qemu = system::find_program(system::QEMU.program).context("qemu-system-x86_64")?;
    let deadline =
        VM_BOOT_BUDGET + Duration::from_secs(plan.tests.iter().map(|t| t.timeout_s).sum::<u64>());
    system::say(&format!(
        "booting {} ({} {}) in QEMU, software emulation, {VM_CPUS} vCPUs; hard limit {} s",
        kernel.release,
        kernel.package,
        kernel.version,
        deadline.as_secs()
    ));
    // After "running NAME ..." the guest reports within that binary's own limit (it kills the
    // binary then); any other step (boot, probe) within the boot budget.
    let step_limit = |marker: &str| {
        plan.tests
            .iter()
            .find(|t| marker.contains(&format!("running {} ", t.name)))
            .map_or(VM_BOOT_BUDGET, |t| {
                Duration::from_secs(t.timeout_s) + STEP_MARGIN
            })
    };
    let exit = qemu::run(
        &qemu::Vm {
            vmlinuz: &kernel.vmlinuz,
            initramfs: &initramfs,
            run_dir: dir,
            cpus: VM_CPUS,
            memory_mib: VM_MEMORY_MIB,
            deadline,
            step_limit: &step_limit,
        },
        &qemu,
    )?;
    let results = plan::read_results(dir)?;
    let features: Option<Features> = plan::read_json(&dir.join(plan::FEATURES_FILE)).ok();
    let done: Option<Done> = plan::read_json(&dir.join(plan::DONE_FILE)).ok();
    let console = exit.console.display().to_string();
    let tail = || qemu::console_tail(&exit.console, 25);
    let error = if done.is_some() {
        None
    } else if !exit.exited {
        Some(KernelTestError::Timeout {
            secs: exit.wall.as_secs_f64(),
            finished: results.len(),
            planned: plan.tests.len(),
            console,
            tail: tail(),
        })
    } else if exit.runner_up_after.is_none() {
        Some(KernelTestError::NoBoot {
            secs: exit.wall.as_secs_f64(),
            console,
            tail: tail(),
        })
    } else {
        let why = std::fs::read_to_string(dir.join("runner-error.txt"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| match exit.status {
                Some(status) => format!("QEMU exited ({status}): the guest kernel panicked?"),
                None => "QEMU's status is unknown".to_owned(),
            });
        Some(KernelTestError::Crashed {
            finished: results.len(),
            planned: plan.tests.len(),
            why,
            console,
            tail: tail(),
        })
    };
    Ok(KernelRun {
        label: plan.kernel.clone(),
        release: format!("{} ({} {})", kernel.release, kernel.package, kernel.version),
        place: format!("QEMU (TCG, {VM_CPUS} vCPUs)"),
        features,
        results,
        planned: plan.tests.len(),
        error: error.map(|e| e.to_string()),
        boot: exit.runner_up_after,
        tests_secs: done.map(|d| d.secs),
        wall: started.elapsed(),
    })
}

/// `uname -r` of the running kernel.
pub fn running_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// `xtask kernel-test-guest`: see [`guest`].
pub fn guest_main(run_dir: &Path) -> ! {
    guest::main(run_dir)
}
