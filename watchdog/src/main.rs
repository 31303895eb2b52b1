//! `watchdog`: the agent and its command line.
//!
//! The data path, one module each:
//! packet → classifier (`watchdog-ebpf`, loaded by [`classifier`]) → ring buffer ([`events`])
//! → decision ([`guard`]) → action ([`action`] through [`sock_diag`]; [`inject`] for held
//! SYNs, on the [`replayer`] thread in a burst) → log ([`report`]), driven by the loop in
//! [`agent`]; the log feeds the [`journal`], live followers ([`control`]) and the [`metrics`]
//! through the [`recorder`]. Beside it, a sock_ops program follows the watched connections and
//! sets per-port keepalive and user timeout; [`connections`] tells their story.
mod action;
mod agent;
mod classifier;
mod cli;
mod clsact;
mod config;
mod connections;
mod control;
mod events;
mod guard;
mod inject;
mod inspect;
mod interface_lock;
mod journal;
mod logging;
mod metrics;
mod netlink;
mod preflight;
mod recorder;
mod replayer;
mod report;
mod sock_diag;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => return run(args),
        Command::Events(args) => inspect::events(args),
        Command::Status(args) => inspect::status(&args.control_socket, args.json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("watchdog: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &cli::RunArgs) -> ExitCode {
    let recorder = recorder::Recorder::new();
    logging::init(args.log_format, Some(recorder.clone()));
    let result = config::RunConfig::load(args).and_then(|config| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(agent::run(config, recorder))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            match args.log_format {
                LogFormat::Text => eprintln!("watchdog: error: {error:#}"),
                LogFormat::Json => {
                    tracing::error!(event = "fatal", error = %format!("{error:#}"), "watchdog stopped")
                }
            }
            ExitCode::FAILURE
        }
    }
}
