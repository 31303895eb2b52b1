//! `cargo xtask`: the project's developer commands.
//!
//! - `build-ebpf` builds the classifier object, installing the toolchain parts it needs once;
//! - `run` builds everything and runs the agent (`cargo xtask run -- run --iface eth0 --port 5000`);
//! - `test` builds everything and runs every test, the end-to-end ones included (needs root);
//! - `demo` plays the seed scenario in network namespaces, without and with the watchdog;
//! - `bench NAME` runs a benchmark program against release builds and prints its ratios;
//! - `install` puts the agent, its config and its systemd unit in place.
mod build_ebpf;
mod install;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
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
    /// Build everything and run all tests (end-to-end tests need root).
    Test {
        /// Extra arguments for `cargo test`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
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

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::BuildEbpf => build_ebpf::build().map(drop),
        Cmd::Run { release, args } => {
            let agent = build_agent(release)?;
            run(Command::new(agent).args(args))
        }
        Cmd::Test { args } => {
            let agent = build_agent(false)?;
            let mut test = cargo();
            test.args(["test", "--workspace"])
                .args(args)
                .env("WATCHDOG_BIN", &agent);
            run(&mut test)
        }
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
    }
}

/// Builds the eBPF object, then the agent that embeds it; returns the agent's path.
fn build_agent(release: bool) -> Result<PathBuf> {
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
fn cargo() -> Command {
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
