//! The TOML config file. Every key is optional; a flag on the command line wins over the file.
//! Unknown keys are errors: a misspelt guard must not silently fall back to its default.
//!
//! ```toml
//! ifaces = ["eth0"]
//! ports = [5000]
//! clients = ["192.0.2.0/24"]      # optional
//! mode = "replay"                 # observe | destroy | replay
//! journal = "/var/lib/watchdog/journal"
//! control_socket = "/run/watchdog/control.sock"
//! control_group = "watchdog"      # optional
//! metrics = "127.0.0.1:9464"      # optional
//!
//! [guards]
//! min_idle = "1s"
//! per_client_limit = "5/10s"
//! global_limit = "1000/10s"
//!
//! [timers]                        # off unless set
//! keepalive = "5s,1s,3"           # idle,interval,count
//! user_timeout = "10s"
//! include_active = false
//! cgroup = "/sys/fs/cgroup/system.slice/legacy.service"   # default: cgroup v2 root
//! [timers.ports.5001]             # per-port override
//! keepalive = "30s,5s,3"
//! ```
use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

use super::Mode;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub ifaces: Option<Vec<String>>,
    pub ports: Option<Vec<i64>>,
    pub clients: Option<Vec<String>>,
    pub mode: Option<Mode>,
    pub journal: Option<std::path::PathBuf>,
    pub control_socket: Option<std::path::PathBuf>,
    pub control_group: Option<String>,
    pub metrics: Option<String>,
    #[serde(default)]
    pub guards: FileGuards,
    #[serde(default)]
    pub timers: FileTimers,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTimers {
    pub keepalive: Option<String>,
    pub user_timeout: Option<String>,
    pub include_active: Option<bool>,
    pub cgroup: Option<std::path::PathBuf>,
    /// Port number → settings that replace the ones above for that port.
    #[serde(default)]
    pub ports: std::collections::BTreeMap<String, FilePortTimers>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePortTimers {
    pub keepalive: Option<String>,
    pub user_timeout: Option<String>,
    pub include_active: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileGuards {
    pub min_idle: Option<String>,
    pub per_client_limit: Option<String>,
    pub global_limit: Option<String>,
}

impl FileConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("in the config file {}", path.display()))
    }
}
