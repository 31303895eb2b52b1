//! The TOML config file. Every key is optional; a flag on the command line wins over the file.
//! Unknown keys are errors: a misspelt guard must not silently fall back to its default.
//!
//! ```toml
//! ifaces = ["eth0"]
//! ports = [5000]
//! clients = ["192.0.2.0/24"]      # optional
//! mode = "replay"                 # observe | destroy | replay
//!
//! [guards]
//! min_idle = "1s"
//! per_client_limit = "5/10s"
//! global_limit = "1000/10s"
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
    #[serde(default)]
    pub guards: FileGuards,
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
