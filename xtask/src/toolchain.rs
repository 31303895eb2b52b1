//! What building eBPF with Rust needs, installed once and found again on later runs:
//! the nightly toolchain with `rust-src`, and a `bpf-linker` built against nightly's own LLVM.
//!
//! `bpf-linker` must use an LLVM at least as new as the one in nightly rustc. Rustup ships that
//! LLVM as a shared library, so we link `bpf-linker` against it: a prefix whose `lib/` holds
//! symlinks to `libLLVM.so.*` (under its plain and exact names) stands in for an LLVM install.
//! Each nightly LLVM gets its own prefix and its own `bpf-linker` under
//! `~/.local/share/watchdog/bpf-linker/<libLLVM soname>/`; the binary's rpath points into that
//! prefix, so the directory is kept, never a temporary one.
use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::run;

pub const NIGHTLY: &str = "nightly";

/// Tools found (or just installed) for one nightly.
pub struct EbpfToolchain {
    /// Directory holding the `bpf-linker` that matches nightly's LLVM; put it first on PATH.
    pub linker_bin_dir: PathBuf,
}

pub fn ensure() -> Result<EbpfToolchain> {
    ensure_nightly()?;
    ensure_rust_src()?;
    let sysroot = nightly_sysroot()?;
    let llvm = nightly_llvm(&sysroot)?;
    let root = data_dir()?.join("bpf-linker").join(&llvm.soname);
    let linker_bin_dir = root.join("bin");
    if !linker_bin_dir.join("bpf-linker").is_file() {
        install_bpf_linker(&llvm, &root)?;
    }
    Ok(EbpfToolchain { linker_bin_dir })
}

fn ensure_nightly() -> Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF program (https://rustup.rs)")?;
    if installed.lines().any(|l| l.starts_with("nightly-")) {
        return Ok(());
    }
    say("installing the nightly Rust toolchain (eBPF needs -Z build-std)");
    run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))
        .context("could not install nightly: run `rustup toolchain install nightly` by hand")
}

fn ensure_rust_src() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    say("adding rust-src to nightly (to build `core` for bpfel-unknown-none)");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
        .context("could not add rust-src: run `rustup component add rust-src --toolchain nightly`")
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = output(nightly_command("rustc").args(["--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

/// Nightly's LLVM: its major version and the shared library rustup ships.
struct NightlyLlvm {
    major: u32,
    library: PathBuf,
    soname: String,
}

fn nightly_llvm(sysroot: &Path) -> Result<NightlyLlvm> {
    let verbose = output(nightly_command("rustc").arg("-vV"))?;
    let version = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` reports no LLVM version")?;
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("unreadable LLVM version {version:?}"))?;
    let lib_dir = sysroot.join("lib");
    let library = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let soname = library
        .file_name()
        .and_then(|n| n.to_str())
        .context("LLVM library name")?
        .to_owned();
    Ok(NightlyLlvm {
        major,
        library,
        soname,
    })
}

fn install_bpf_linker(llvm: &NightlyLlvm, root: &Path) -> Result<()> {
    const SUPPORTED: [u32; 3] = [21, 22, 23];
    if !SUPPORTED.contains(&llvm.major) {
        bail!(
            "nightly rustc uses LLVM {}, but bpf-linker 0.13 supports LLVM {SUPPORTED:?}: install a \
             matching nightly (`rustup toolchain install nightly-YYYY-MM-DD`) and make it `nightly`",
            llvm.major
        );
    }
    let prefix = root.join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for name in ["libLLVM.so", llvm.soname.as_str()] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(&llvm.library, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    say(&format!(
        "installing bpf-linker 0.13 against nightly's LLVM {} into {} (about a minute, once)",
        llvm.major,
        root.display()
    ));
    run(Command::new("cargo")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .env("LLVM_PREFIX", &prefix)
        .args(["install", "bpf-linker", "--version", "^0.13", "--locked", "--no-default-features"])
        .args(["--features", &format!("llvm-{}", llvm.major)])
        .arg("--root")
        .arg(root))
    .with_context(|| {
        format!(
            "could not build bpf-linker; the command above shows why. By hand: \
             LLVM_PREFIX={} cargo install bpf-linker --no-default-features --features llvm-{} --root {}",
            prefix.display(),
            llvm.major,
            root.display()
        )
    })
}

/// `~/.local/share/watchdog` (or `$XDG_DATA_HOME/watchdog`): kept across builds.
fn data_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("watchdog"));
    }
    let home = env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".local/share/watchdog"))
}

/// A nightly tool with the environment of the outer (stable) cargo removed.
pub fn nightly_command(tool: &str) -> Command {
    let mut command = Command::new("rustup");
    command.args(["run", NIGHTLY, tool]);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        command.env_remove(var);
    }
    command
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn say(message: &str) {
    eprintln!("xtask: {message}");
}
