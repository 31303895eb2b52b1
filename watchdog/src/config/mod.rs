//! The validated run configuration: what `watchdog run` was asked to do, from its flags, its
//! config file and the defaults, checked before anything touches the kernel, so a bad flag or
//! key never leaves a half-attached watchdog behind.
mod file;
pub mod values;

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fmt,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use ipnet::IpNet;
use serde::Deserialize;

use self::{
    file::{FileConfig, FileTimers},
    values::{Keepalive, RateLimit},
};
use crate::cli::RunArgs;

/// What the agent does with a stale socket once its guards allow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Report only (`--dry-run`).
    Observe,
    /// Destroy the stale socket; the client's next SYN retransmission connects.
    Destroy,
    /// Hold the stale SYN, destroy the socket, re-inject the SYN: the client connects at once.
    Replay,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Observe => "observe",
            Mode::Destroy => "destroy",
            Mode::Replay => "replay",
        })
    }
}

/// A network interface, resolved in the agent's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub ifaces: Vec<Interface>,
    pub ports: BTreeSet<u16>,
    pub clients: Vec<IpNet>,
    pub mode: Mode,
    pub guards: GuardConfig,
    pub timers: TimerConfig,
    pub outputs: Outputs,
}

/// Where the agent reports besides stderr.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub journal: PathBuf,
    pub control_socket: PathBuf,
    pub control_group: Option<String>,
    /// Prometheus endpoint; `None`: off.
    pub metrics: Option<std::net::SocketAddr>,
}

/// Per-port keepalive and user timeout (`--keepalive`, `--user-timeout`, `[timers]`).
#[derive(Debug, Clone, Default)]
pub struct TimerConfig {
    /// Watched port → its timers; ports without timers are absent.
    pub ports: BTreeMap<u16, PortTimerConfig>,
    /// The cgroup whose processes' connections are timed; `None`: the cgroup v2 root.
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortTimerConfig {
    pub keepalive: Option<Keepalive>,
    pub user_timeout: Option<Duration>,
    pub include_active: bool,
}

/// The guards' settings; see `guard.rs` for what each one protects against.
#[derive(Debug, Clone)]
pub struct GuardConfig {
    /// Idle guard: destroy only sockets that received nothing for at least this long.
    pub min_idle: Duration,
    /// Destroys allowed per client address.
    pub per_client_limit: RateLimit,
    /// Destroys allowed in all.
    pub global_limit: RateLimit,
}

impl Default for GuardConfig {
    /// A rebooting device is silent for far longer than a second, while a live connection
    /// that a spoofed SYN aims at has usually received something within one. A client
    /// rebooting more than 5 times in 10 s, or more than 1,000 destroys in 10 s across all
    /// clients, looks like an attack rather than a power cut.
    fn default() -> Self {
        GuardConfig {
            min_idle: Duration::from_secs(1),
            per_client_limit: RateLimit {
                count: 5,
                period: Duration::from_secs(10),
            },
            global_limit: RateLimit {
                count: 1000,
                period: Duration::from_secs(10),
            },
        }
    }
}

impl RunConfig {
    /// The command line over the config file (`--config`) over the defaults, validated.
    pub fn load(args: &RunArgs) -> Result<Self> {
        let file = match &args.config {
            Some(path) => FileConfig::read(path)?,
            None => FileConfig::default(),
        };
        let in_file = |key: &str| match &args.config {
            Some(path) => format!("key `{key}` in {}", path.display()),
            None => format!("key `{key}`"),
        };

        let iface_names = first_non_empty(args.ifaces.clone(), file.ifaces.clone());
        let mut ports: BTreeSet<u16> = args.ports.iter().copied().collect();
        if ports.is_empty() {
            for port in file.ports.iter().flatten() {
                let port = values::port(&port.to_string())
                    .map_err(|e| anyhow!("{}: {e}", in_file("ports")))?;
                ports.insert(port);
            }
        }
        let mut missing = Vec::new();
        if iface_names.is_empty() {
            missing.push("an interface (--iface IF or `ifaces` in the config file)");
        }
        if ports.is_empty() {
            missing.push("a port (--port PORT or `ports` in the config file)");
        }
        if !missing.is_empty() {
            bail!("nothing to watch: give {}", missing.join(" and "));
        }

        let mut ifaces: Vec<Interface> = Vec::new();
        for name in &iface_names {
            let iface = resolve_interface(name).map_err(|e| {
                if args.ifaces.is_empty() {
                    anyhow!("{}: {e:#}", in_file("ifaces"))
                } else {
                    e
                }
            })?;
            if !ifaces.contains(&iface) {
                ifaces.push(iface);
            }
        }

        let clients = if args.clients.is_empty() {
            file.clients
                .iter()
                .flatten()
                .map(|c| {
                    values::client_prefix(c).map_err(|e| anyhow!("{}: {e}", in_file("clients")))
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            args.clients.clone()
        };

        let mode = match (args.dry_run, args.mode, file.mode) {
            (true, _, _) => Mode::Observe,
            (false, Some(mode), _) | (false, None, Some(mode)) => mode,
            (false, None, None) => Mode::Replay,
        };

        let defaults = GuardConfig::default();
        let min_idle = match (args.min_idle, &file.guards.min_idle) {
            (Some(d), _) => d,
            (None, Some(text)) => values::duration(text)
                .map_err(|e| anyhow!("{}: {e}", in_file("guards.min_idle")))?,
            (None, None) => defaults.min_idle,
        };
        let limit =
            |cli: Option<RateLimit>, text: &Option<String>, key: &str, default| match (cli, text) {
                (Some(limit), _) => Ok(limit),
                (None, Some(text)) => text
                    .parse::<RateLimit>()
                    .map_err(|e| anyhow!("{}: {e}", in_file(key))),
                (None, None) => Ok(default),
            };
        let guards = GuardConfig {
            min_idle,
            per_client_limit: limit(
                args.per_client_limit,
                &file.guards.per_client_limit,
                "guards.per_client_limit",
                defaults.per_client_limit,
            )?,
            global_limit: limit(
                args.global_limit,
                &file.guards.global_limit,
                "guards.global_limit",
                defaults.global_limit,
            )?,
        };

        let timers = timer_config(args, &file.timers, &ports, &in_file)?;
        let metrics = match args.metrics.as_ref().or(file.metrics.as_ref()) {
            None => None,
            Some(text) => Some(values::listen_addr(text).map_err(|e| {
                if args.metrics.is_some() {
                    anyhow!("--metrics: {e}")
                } else {
                    anyhow!("{}: {e}", in_file("metrics"))
                }
            })?),
        };
        let outputs = Outputs {
            journal: args
                .journal
                .clone()
                .or(file.journal.clone())
                .unwrap_or_else(|| PathBuf::from(crate::journal::DEFAULT_DIR)),
            control_socket: args
                .control_socket
                .clone()
                .or(file.control_socket.clone())
                .unwrap_or_else(|| PathBuf::from(crate::control::DEFAULT_SOCKET)),
            control_group: args.control_group.clone().or(file.control_group.clone()),
            metrics,
        };

        Ok(RunConfig {
            ifaces,
            ports,
            clients,
            mode,
            guards,
            timers,
            outputs,
        })
    }
}

/// Timers for every watched port from the flags or `[timers]`, then `[timers.ports.N]`
/// overrides (which must name watched ports).
fn timer_config(
    args: &RunArgs,
    file: &FileTimers,
    watched: &BTreeSet<u16>,
    in_file: &dyn Fn(&str) -> String,
) -> Result<TimerConfig> {
    let keepalive = match (args.keepalive, &file.keepalive) {
        (Some(k), _) => Some(k),
        (None, Some(text)) => Some(
            text.parse::<Keepalive>()
                .map_err(|e| anyhow!("{}: {e}", in_file("timers.keepalive")))?,
        ),
        (None, None) => None,
    };
    let user_timeout = match (args.user_timeout, &file.user_timeout) {
        (Some(d), _) => Some(d),
        (None, Some(text)) => Some(
            values::user_timeout(text)
                .map_err(|e| anyhow!("{}: {e}", in_file("timers.user_timeout")))?,
        ),
        (None, None) => None,
    };
    let base = PortTimerConfig {
        keepalive,
        user_timeout,
        include_active: args.timers_on_active || file.include_active.unwrap_or(false),
    };
    let mut ports = BTreeMap::new();
    if base.keepalive.is_some() || base.user_timeout.is_some() {
        for &port in watched {
            ports.insert(port, base);
        }
    }
    for (port_text, over) in &file.ports {
        let key = format!("timers.ports.{port_text}");
        let port = values::port(port_text).map_err(|e| anyhow!("{}: {e}", in_file(&key)))?;
        if !watched.contains(&port) {
            bail!("{}: port {port} is not a watched port", in_file(&key));
        }
        let mut timers = ports.get(&port).copied().unwrap_or(base);
        if let Some(text) = &over.keepalive {
            timers.keepalive = Some(
                text.parse()
                    .map_err(|e| anyhow!("{}: {e}", in_file(&format!("{key}.keepalive"))))?,
            );
        }
        if let Some(text) = &over.user_timeout {
            timers.user_timeout = Some(
                values::user_timeout(text)
                    .map_err(|e| anyhow!("{}: {e}", in_file(&format!("{key}.user_timeout"))))?,
            );
        }
        if let Some(active) = over.include_active {
            timers.include_active = active;
        }
        ports.insert(port, timers);
    }
    let cgroup = args.cgroup.clone().or_else(|| file.cgroup.clone());
    Ok(TimerConfig { ports, cgroup })
}

fn first_non_empty(cli: Vec<String>, file: Option<Vec<String>>) -> Vec<String> {
    if cli.is_empty() {
        file.unwrap_or_default()
    } else {
        cli
    }
}

fn resolve_interface(name: &str) -> Result<Interface> {
    let c_name = CString::new(name).with_context(|| format!("interface name {name:?}"))?;
    // SAFETY: `c_name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        bail!(
            "unknown interface {name:?} in this network namespace (see `ip link`): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(Interface {
        name: name.to_owned(),
        index,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    /// Loads a config for `watchdog run <flags>` with `toml` as its config file.
    fn load(toml: &str, flags: &[&str]) -> Result<RunConfig> {
        let dir = std::env::temp_dir().join(format!("watchdog-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{:x}.toml", unique_name(toml, flags)));
        std::fs::write(&path, toml)?;
        let mut argv = vec!["watchdog", "run", "--config", path.to_str().unwrap()];
        argv.extend_from_slice(flags);
        let Command::Run(args) = Cli::try_parse_from(argv)?.command else {
            panic!("`watchdog run` parses as Run");
        };
        let result = RunConfig::load(&args);
        std::fs::remove_file(&path)?;
        // Shared by the tests running in parallel: the last one out removes it.
        let _ = std::fs::remove_dir(&dir);
        result
    }

    fn unique_name(toml: &str, flags: &[&str]) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (toml, flags).hash(&mut hasher);
        hasher.finish()
    }

    fn error(toml: &str) -> String {
        format!(
            "{:#}",
            load(toml, &[]).expect_err("the config must be refused")
        )
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let example =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/watchdog.toml");
        let file = FileConfig::read(&example).unwrap();
        assert_eq!(file.ports, Some(vec![5000]));
        assert_eq!(file.mode, Some(Mode::Replay));
        assert_eq!(file.guards.min_idle.as_deref(), Some("1s"));
    }

    #[test]
    fn a_complete_file_loads() {
        let config = load(
            r#"
            ifaces = ["lo"]
            ports = [5000, 5001]
            clients = ["192.0.2.0/24", "fd00::/8"]
            mode = "destroy"
            [guards]
            min_idle = "2s"
            per_client_limit = "3/1m"
            global_limit = "100/10s"
            "#,
            &[],
        )
        .unwrap();
        assert_eq!(config.ifaces[0].name, "lo");
        assert_eq!(config.ports, BTreeSet::from([5000, 5001]));
        assert_eq!(config.clients.len(), 2);
        assert_eq!(config.mode, Mode::Destroy);
        assert_eq!(config.guards.min_idle, Duration::from_secs(2));
        assert_eq!(config.guards.per_client_limit.to_string(), "3/1m");
        assert_eq!(config.guards.global_limit.count, 100);
    }

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let config = load(
            "ifaces = [\"lo\"]\nports = [5000]\nmode = \"destroy\"\n",
            &["--port", "6000", "--dry-run", "--min-idle", "0s"],
        )
        .unwrap();
        assert_eq!(config.ports, BTreeSet::from([6000]));
        assert_eq!(config.mode, Mode::Observe);
        assert_eq!(config.guards.min_idle, Duration::ZERO);
        assert_eq!(
            config.guards.per_client_limit,
            GuardConfig::default().per_client_limit
        );
    }

    #[test]
    fn timers_apply_to_every_watched_port_with_per_port_overrides() {
        let config = load(
            r#"
            ifaces = ["lo"]
            ports = [5000, 5001]
            [timers]
            keepalive = "5s,1s,3"
            [timers.ports.5001]
            user_timeout = "10s"
            "#,
            &[],
        )
        .unwrap();
        let t5000 = config.timers.ports[&5000];
        let t5001 = config.timers.ports[&5001];
        assert_eq!(t5000.keepalive.unwrap().count, 3);
        assert_eq!(t5000.user_timeout, None);
        assert_eq!(t5001.keepalive, t5000.keepalive);
        assert_eq!(t5001.user_timeout, Some(Duration::from_secs(10)));
        assert!(
            load("ifaces = [\"lo\"]\nports = [5000]\n", &[])
                .unwrap()
                .timers
                .ports
                .is_empty(),
            "timers are off unless configured"
        );
        let unwatched = error(
            "ifaces = [\"lo\"]\nports = [5000]\n[timers.ports.6000]\nuser_timeout = \"1s\"\n",
        );
        assert!(unwatched.contains("timers.ports.6000"), "{unwatched}");
        let bad = error("ifaces = [\"lo\"]\nports = [5000]\n[timers]\nkeepalive = \"5s\"\n");
        assert!(bad.contains("timers.keepalive"), "{bad}");
    }

    #[test]
    fn errors_name_the_key_and_what_is_wrong() {
        let base = "ifaces = [\"lo\"]\nports = [5000]\n";
        assert!(error("ifaces = [\"lo\"]\nports = [0]\n").contains("key `ports`"));
        assert!(error("ifaces = [\"lo\"]\nports = [0]\n").contains("port 0"));
        let bad_cidr = error(&format!("{base}clients = [\"10.0.0.0/33\"]\n"));
        assert!(
            bad_cidr.contains("key `clients`") && bad_cidr.contains("/33"),
            "{bad_cidr}"
        );
        let unknown = error(&format!("{base}[guards]\nmin_idel = \"1s\"\n"));
        assert!(unknown.contains("min_idel"), "{unknown}");
        let bad_rate = error(&format!("{base}[guards]\nglobal_limit = \"lots\"\n"));
        assert!(bad_rate.contains("guards.global_limit"), "{bad_rate}");
        let bad_mode = error(&format!("{base}mode = \"nuke\"\n"));
        assert!(bad_mode.contains("nuke"), "{bad_mode}");
        let unknown_iface = error("ifaces = [\"nope0\"]\nports = [5000]\n");
        assert!(
            unknown_iface.contains("nope0") && unknown_iface.contains("key `ifaces`"),
            "{unknown_iface}"
        );
        assert!(error("").contains("nothing to watch"));
    }
}
