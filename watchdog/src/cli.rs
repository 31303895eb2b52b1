//! Command line. The flag names of `watchdog run` are a stable interface: scripts, the tests and
//! the README use them.
use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::config::Mode;

#[derive(Debug, Parser)]
#[command(
    name = "watchdog",
    version,
    about = "Destroys stale TCP sockets when a legacy client reconnects from the same 4-tuple"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to the server's interfaces and watch for SYNs aimed at stale sockets.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Interface on which clients' packets arrive (repeatable).
    #[arg(long = "iface", value_name = "IF", required = true)]
    pub ifaces: Vec<String>,

    /// Local (server) TCP port to watch (repeatable).
    #[arg(long = "port", value_name = "PORT", required = true, value_parser = parse_port)]
    pub ports: Vec<u16>,

    /// Only watch clients in this prefix, IPv4 or IPv6 (repeatable; default: any client).
    #[arg(long = "client", value_name = "CIDR")]
    pub clients: Vec<IpNet>,

    /// What to do with a stale socket [default: replay].
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,

    /// Observe only: report stale sockets, destroy nothing (same as `--mode observe`).
    #[arg(long, conflicts_with = "mode")]
    pub dry_run: bool,

    /// Idle guard: destroy a stale socket only if it received no data for at least this long
    /// (e.g. `2s`, `500ms`; default: off).
    #[arg(long, value_name = "DURATION")]
    pub min_idle: Option<humantime::Duration>,

    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, fields at top level (`event`, `message`, …).
    Json,
}

fn parse_port(value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(0) => Err("port 0 is not a port a server listens on; use 1-65535".into()),
        Ok(port) => Ok(port),
        Err(_) => Err(format!("`{value}` is not a TCP port (1-65535)")),
    }
}
