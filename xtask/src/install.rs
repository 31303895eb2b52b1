//! `cargo xtask install`: the documented way onto a server. Copies the release agent to
//! `/usr/local/bin`, the example config to `/etc/watchdog/watchdog.toml` (never over an existing
//! one) and the unit to `/etc/systemd/system/watchdog.service`.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::workspace_root;

pub fn install(agent: &Path, root: &Path) -> Result<()> {
    let deploy = workspace_root().join("deploy");
    let under = |path: &str| -> PathBuf { root.join(path.trim_start_matches('/')) };

    let bin = under("/usr/local/bin/watchdog");
    copy(agent, &bin, 0o755)?;
    copy(
        &deploy.join("watchdog.service"),
        &under("/etc/systemd/system/watchdog.service"),
        0o644,
    )?;
    copy(
        &workspace_root().join("README.md"),
        &under("/usr/local/share/doc/watchdog/README.md"),
        0o644,
    )?;
    let config = under("/etc/watchdog/watchdog.toml");
    if config.exists() {
        eprintln!("xtask: kept the existing {}", config.display());
    } else {
        copy(&deploy.join("watchdog.toml"), &config, 0o640)?;
    }
    eprintln!(
        "xtask: installed. Edit {} (ifaces, ports), then:\n  \
         {} run --config {} --dry-run    # try it in the foreground first\n  \
         systemctl daemon-reload && systemctl enable --now watchdog\n  \
         watchdog status; watchdog events --since 1h",
        config.display(),
        bin.display(),
        config.display()
    );
    Ok(())
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", to.display()))?;
    eprintln!("xtask: {}", to.display());
    Ok(())
}
