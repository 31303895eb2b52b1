//! `cargo xtask build-ebpf`: builds `watchdog-ebpf` for `bpfel-unknown-none` into
//! `target/bpfel-unknown-none/release/watchdog`, where the agent's build script finds it.
//! Flags (target, `-Z build-std=core`, BTF) live in `watchdog-ebpf/.cargo/config.toml`.
use std::{env, path::PathBuf};

use anyhow::{Context, Result};

use crate::{run, toolchain, workspace_root};

/// Builds the object and returns its path.
pub fn build() -> Result<PathBuf> {
    let tools = toolchain::ensure()?;
    let root = workspace_root();
    let path = env::join_paths(
        std::iter::once(tools.linker_bin_dir.clone())
            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )?;
    let target_dir = root.join("target");
    run(toolchain::nightly_command("cargo")
        .current_dir(root.join("watchdog-ebpf"))
        .env("PATH", path)
        .env_remove("CARGO_TARGET_DIR")
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir))
    .context("building the eBPF program failed (see the compiler output above)")?;
    Ok(target_dir.join("bpfel-unknown-none/release/watchdog"))
}
