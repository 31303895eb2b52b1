//! `watchdog`: the agent and its command line.
//!
//! The data path, one module each:
//! packet → classifier (`watchdog-ebpf`, loaded by [`classifier`]) → ring buffer ([`events`])
//! → decision ([`guard`]) → action ([`action`] through [`sock_diag`]; [`inject`] for held
//! SYNs) → log ([`report`]), driven by the loop in [`agent`]. Beside it, per-port keepalive
//! and user timeout: a sock_ops program sets them, [`dead_peers`] explains the deaths.
mod action;
mod agent;
mod classifier;
mod cli;
mod config;
mod dead_peers;
mod events;
mod guard;
mod inject;
mod logging;
mod preflight;
mod report;
mod sock_diag;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            logging::init(args.log_format);
            let result = config::RunConfig::load(&args).and_then(|config| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(agent::run(config))
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
    }
}
