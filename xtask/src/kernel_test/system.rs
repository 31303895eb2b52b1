//! The host tools a VM run needs, installed with apt when missing (as root), and Debian
//! packages fetched without installing them.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use super::KernelTestError;

/// A program and the Debian package that ships it.
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

pub const QEMU: Tool = Tool {
    program: "qemu-system-x86_64",
    package: "qemu-system-x86",
};
/// `depmod` writes the extracted kernel's `modules.dep`; inside the VM, `modprobe` (the host's,
/// through the shared root) loads modules on demand, as on any Debian system.
pub const KMOD: Tool = Tool {
    program: "depmod",
    package: "kmod",
};
pub const APT_GET: Tool = Tool {
    program: "apt-get",
    package: "apt",
};
pub const DPKG_DEB: Tool = Tool {
    program: "dpkg-deb",
    package: "dpkg",
};

pub fn say(message: &str) {
    eprintln!("xtask kernel-test: {message}");
}

/// Where `program` is on PATH (or in the sbin directories a non-login root shell may lack).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Finds every tool, installing the missing ones' packages with apt when running as root.
pub fn ensure_tools(tools: &[&Tool]) -> Result<()> {
    let missing: Vec<&&Tool> = tools
        .iter()
        .filter(|t| find_program(t.program).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
    if !is_root() || find_program("apt-get").is_none() {
        return Err(KernelTestError::MissingTools {
            programs: missing
                .iter()
                .map(|t| t.program)
                .collect::<Vec<_>>()
                .join(", "),
            install: format!(
                "sudo apt-get install --no-install-recommends {}",
                packages.join(" ")
            ),
        }
        .into());
    }
    say(&format!(
        "installing {} (apt-get install --no-install-recommends)",
        packages.join(" ")
    ));
    if apt_install(&packages).is_err() {
        say("refreshing the package lists (apt-get update) and trying again");
        apt_update()?;
        apt_install(&packages)?;
    }
    for tool in missing {
        if find_program(tool.program).is_none() {
            return Err(KernelTestError::MissingTools {
                programs: tool.program.to_owned(),
                install: format!("apt-get install {}", tool.package),
            }
            .into());
        }
    }
    Ok(())
}

fn apt_install(packages: &[&str]) -> Result<()> {
    let out = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .context("running apt-get")?;
    if !out.status.success() {
        return Err(KernelTestError::Apt {
            command: format!("apt-get install {}", packages.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }
        .into());
    }
    Ok(())
}

pub fn apt_update() -> Result<()> {
    let out = Command::new("apt-get")
        .args(["update", "-qq"])
        .output()
        .context("running apt-get update")?;
    if !out.status.success() {
        return Err(KernelTestError::Apt {
            command: "apt-get update".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }
        .into());
    }
    Ok(())
}

/// `apt-cache depends PACKAGE`'s `Depends:` targets; empty when apt knows no such package.
fn depends(package: &str) -> Result<Vec<String>> {
    let out = Command::new("apt-cache")
        .args(["depends", package])
        .output()
        .context("running apt-cache (apt-get install apt)")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|d| d.trim().to_owned())
        .collect())
}

/// The candidate version apt would install of `package`.
fn candidate_version(package: &str) -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["policy", package])
        .output()
        .context("running apt-cache policy")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .map(str::to_owned)
        .filter(|v| v != "(none)"))
}

/// The package a meta package (`linux-image-amd64`) currently stands for, whose name starts
/// with `prefix`, and its version; refreshes apt's lists once if apt does not know it.
pub fn resolve_meta(meta: &str, prefix: &str) -> Result<(String, String)> {
    for attempt in 0..2 {
        let target = depends(meta)?.into_iter().find(|d| d.starts_with(prefix));
        if let Some(target) = target
            && let Some(version) = candidate_version(&target)?
        {
            return Ok((target, version));
        }
        if attempt == 0 {
            if !is_root() {
                break;
            }
            say(&format!(
                "apt does not know {meta}: refreshing the package lists (apt-get update)"
            ));
            apt_update()?;
        }
    }
    Err(KernelTestError::PackageUnknown {
        package: meta.to_owned(),
    }
    .into())
}

/// The candidate version of `package`, refreshing apt's lists once if needed.
pub fn resolve(package: &str) -> Result<String> {
    if let Some(version) = candidate_version(package)? {
        return Ok(version);
    }
    if is_root() {
        apt_update()?;
        if let Some(version) = candidate_version(package)? {
            return Ok(version);
        }
    }
    Err(KernelTestError::PackageUnknown {
        package: package.to_owned(),
    }
    .into())
}

/// Downloads `package` (`apt-get download`, nothing is installed) and unpacks it into `into`.
pub fn fetch_and_unpack(package: &str, version: &str, into: &Path) -> Result<()> {
    let download = into.with_extension("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)
        .with_context(|| format!("creating {}", download.display()))?;
    let out = Command::new("apt-get")
        // As root, apt would otherwise warn that its sandbox user cannot write here.
        .args(["-o", "APT::Sandbox::User=root", "-qq", "download"])
        .arg(format!("{package}={version}"))
        .current_dir(&download)
        .output()
        .context("running apt-get download")?;
    if !out.status.success() {
        return Err(KernelTestError::Apt {
            command: format!("apt-get download {package}={version}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }
        .into());
    }
    let deb = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", download.display()))?;
    let _ = std::fs::remove_dir_all(into);
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(into)
        .status()
        .context("running dpkg-deb")?;
    if !status.success() {
        anyhow::bail!(
            "dpkg-deb -x {} {} failed: {status}",
            deb.display(),
            into.display()
        );
    }
    std::fs::remove_dir_all(&download)?;
    Ok(())
}

/// `~/.cache/watchdog/kernel-test` (or under `$XDG_CACHE_HOME`): downloads kept across runs
/// and clones.
pub fn cache_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(base.join("watchdog/kernel-test"))
}
