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

    /// Only watch clients in this prefix, IPv4 or IPv6, e.g. `192.0.2.0/24` or a single
    /// address (repeatable; default: any client).
    #[arg(long = "client", value_name = "CIDR", value_parser = parse_client_prefix)]
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

/// A client prefix; a bare address means that one host. Says which part is wrong.
fn parse_client_prefix(value: &str) -> Result<IpNet, String> {
    let (addr, len) = match value.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (value, None),
    };
    let addr: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("`{addr}` is not an IPv4 or IPv6 address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(len) => len
            .parse::<u8>()
            .ok()
            .filter(|len| *len <= max)
            .ok_or_else(|| format!("prefix length `/{len}` must be 0-{max} for {addr}"))?,
    };
    IpNet::new(addr, len).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_prefixes_parse_with_clear_errors() {
        assert_eq!(
            parse_client_prefix("10.1.2.0/24").unwrap(),
            "10.1.2.0/24".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_client_prefix("fd00::7").unwrap(),
            "fd00::7/128".parse::<IpNet>().unwrap()
        );
        assert!(
            parse_client_prefix("10.0.0.0/33")
                .unwrap_err()
                .contains("0-32")
        );
        assert!(
            parse_client_prefix("fd00::/129")
                .unwrap_err()
                .contains("0-128")
        );
        assert!(
            parse_client_prefix("banana")
                .unwrap_err()
                .contains("banana")
        );
    }

    #[test]
    fn port_zero_is_refused() {
        assert!(parse_port("0").unwrap_err().contains("port 0"));
        assert_eq!(parse_port("5000"), Ok(5000));
        assert!(parse_port("70000").is_err());
    }
}
