//! Command line. The flag names of `watchdog run` are a stable interface: scripts, the tests and
//! the README use them.
use clap::{Parser, Subcommand, ValueEnum};
use std::{path::PathBuf, time::Duration};

use ipnet::IpNet;

use crate::config::{
    Mode,
    values::{self, Keepalive, RateLimit},
};
use crate::{control, journal};

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
    Run(Box<RunArgs>),
    /// What happened and why: the journal as a table or JSON lines, or live from the agent.
    Events(EventsArgs),
    /// The running agent: interfaces, programs, mode, guards, heartbeat, kernel counters.
    Status(StatusArgs),
}

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// The agent's journal directory.
    #[arg(long, value_name = "DIR", default_value = journal::DEFAULT_DIR)]
    pub journal: PathBuf,
    /// The agent's control socket (for --follow).
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub control_socket: PathBuf,
    /// One JSON object per line (the journal's own records) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Live events from the running agent.
    #[arg(long)]
    pub follow: bool,
    /// Only events since a duration ago (`10m`) or a time (`2026-12-03 03:12:00`, UTC).
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Only events of this client address.
    #[arg(long, value_name = "IP")]
    pub client: Option<std::net::IpAddr>,
    /// Only events of this port (server or client side).
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Only events of this kind (`destroyed`, `would_destroy`, `replayed`, `peer_dead`, …).
    #[arg(long, value_name = "EVENT")]
    pub action: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub control_socket: PathBuf,
    /// Print the status as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// TOML config file; flags given here win over its keys.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Interface on which clients' packets arrive (repeatable).
    #[arg(long = "iface", value_name = "IF")]
    pub ifaces: Vec<String>,

    /// Local (server) TCP port to watch (repeatable).
    #[arg(long = "port", value_name = "PORT", value_parser = values::port)]
    pub ports: Vec<u16>,

    /// Only watch clients in this prefix, IPv4 or IPv6, e.g. `192.0.2.0/24` or a single
    /// address (repeatable; default: any client).
    #[arg(long = "client", value_name = "CIDR", value_parser = values::client_prefix)]
    pub clients: Vec<IpNet>,

    /// What to do with a stale socket [default: replay].
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,

    /// Observe only: report stale sockets, destroy nothing (same as `--mode observe`).
    #[arg(long, conflicts_with = "mode")]
    pub dry_run: bool,

    /// Idle guard: destroy a stale socket only if it received no data for at least this long
    /// (`0s` turns it off) [default: 1s].
    #[arg(long, value_name = "DURATION", value_parser = values::duration)]
    pub min_idle: Option<Duration>,

    /// Destroys allowed per client address, as COUNT/PERIOD [default: 5/10s].
    #[arg(long, value_name = "RATE")]
    pub per_client_limit: Option<RateLimit>,

    /// Destroys allowed across all clients, as COUNT/PERIOD [default: 1000/10s].
    #[arg(long, value_name = "RATE")]
    pub global_limit: Option<RateLimit>,

    /// Keepalive for the watched ports' connections, as IDLE,INTERVAL,COUNT (e.g. `5s,1s,3`);
    /// set per socket at establishment, no sysctl touched [default: host defaults].
    #[arg(long, value_name = "TIMERS")]
    pub keepalive: Option<Keepalive>,

    /// TCP_USER_TIMEOUT for the watched ports' connections: how long sent data may stay
    /// unacknowledged before the connection is dropped (e.g. `10s`) [default: host default].
    #[arg(long, value_name = "DURATION", value_parser = values::user_timeout)]
    pub user_timeout: Option<Duration>,

    /// Also apply --keepalive/--user-timeout to connections this host opens to the ports.
    #[arg(long)]
    pub timers_on_active: bool,

    /// The cgroup (v2) whose processes' connections get the timers [default: the cgroup v2
    /// root, every process; the port and network namespace still select the connections].
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// Journal directory: every event, kept across restarts, rotated (about 40 MiB at most)
    /// [default: /var/lib/watchdog/journal].
    #[arg(long, value_name = "DIR")]
    pub journal: Option<PathBuf>,

    /// Control socket for `watchdog status` and `watchdog events --follow`
    /// [default: /run/watchdog/control.sock].
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Group allowed to use the control socket besides root.
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,

    /// Serve Prometheus metrics on this address (a bare port means 127.0.0.1:PORT)
    /// [default: off].
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

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
