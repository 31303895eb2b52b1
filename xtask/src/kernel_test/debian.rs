//! Debian 12's own kernel (`linux-image-amd64`, today 6.1) and `busybox-static`, downloaded with
//! apt into the cache and unpacked, never installed: the host's /boot and /lib/modules stay
//! untouched. The package the meta package stands for is resolved on every run (a point release
//! moves it); an unpacked one is reused.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::system::{self, say};

/// One unpacked kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// e.g. `linux-image-6.1.0-57-amd64`.
    pub package: String,
    /// e.g. `6.1.192-3`.
    pub version: String,
    /// `uname -r` of that kernel, e.g. `6.1.0-57-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules` of the unpacked package, with `modules.dep` from `depmod`.
    pub modules: PathBuf,
}

impl Kernel {
    /// The release's own modules directory (`lib/modules/<release>`).
    pub fn release_modules(&self) -> PathBuf {
        self.modules.join(&self.release)
    }
}

const COMPLETE: &str = ".complete";

/// Resolves `linux-image-amd64`, and downloads and unpacks that package unless the cache has it.
/// `series` is the `major.minor` the caller expects (`6.1`).
pub fn kernel(series: &str) -> Result<Kernel> {
    let (package, version) = system::resolve_meta("linux-image-amd64", "linux-image-")?;
    let root = system::cache_dir()?
        .join("kernels")
        .join(format!("{package}_{version}"));
    if !root.join(COMPLETE).is_file() {
        say(&format!(
            "downloading {package} {version} (about 70 MB) into {}",
            root.display()
        ));
        system::fetch_and_unpack(&package, &version, &root)?;
        let release = release_of(&root)?;
        say(&format!("depmod for {release}"));
        let status = Command::new(system::find_program("depmod").context("depmod")?)
            .arg("-b")
            .arg(&root)
            .arg(&release)
            .status()
            .context("running depmod")?;
        if !status.success() {
            bail!("depmod -b {} {release} failed: {status}", root.display());
        }
        fs::write(root.join(COMPLETE), "")?;
    }
    let release = release_of(&root)?;
    if !release.starts_with(&format!("{series}.")) {
        bail!(
            "linux-image-amd64 stands for {package} ({release}) here, not a {series} kernel: \
             this host's apt sources are not Debian 12's (bookworm)"
        );
    }
    Ok(Kernel {
        vmlinuz: root.join("boot").join(format!("vmlinuz-{release}")),
        modules: root.join("lib/modules"),
        package,
        version,
        release,
    })
}

/// The release named by the unpacked package's `boot/vmlinuz-<release>`.
fn release_of(root: &Path) -> Result<String> {
    let boot = root.join("boot");
    fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_owned)
        })
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))
}

/// A static busybox for the initramfs, from `busybox-static`.
pub fn busybox() -> Result<PathBuf> {
    let version = system::resolve("busybox-static")?;
    let root = system::cache_dir()?.join(format!("busybox-static_{version}"));
    let binary = root.join("bin/busybox");
    if !root.join(COMPLETE).is_file() {
        say(&format!("downloading busybox-static {version}"));
        system::fetch_and_unpack("busybox-static", &version, &root)?;
        if !binary.is_file() {
            bail!("busybox-static {version} has no bin/busybox");
        }
        fs::write(root.join(COMPLETE), "")?;
    }
    Ok(binary)
}

/// The modules `names` need, with their dependencies, in load order (from `modules.dep`).
pub fn module_closure(kernel: &Kernel, names: &[&str]) -> Result<Vec<PathBuf>> {
    let dir = kernel.release_modules();
    let dep = fs::read_to_string(dir.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", dir.display()))?;
    let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let mut order = Vec::new();
    for name in names {
        if is_builtin(&builtin, name) {
            continue;
        }
        let (path, deps) = dep_line(&dep, name)
            .with_context(|| format!("module {name} is neither in modules.dep nor built in"))?;
        // modules.dep lists a module's dependencies so that the last one loads first.
        for d in deps.iter().rev().chain(std::iter::once(&path)) {
            let full = dir.join(d);
            if !order.contains(&full) {
                order.push(full);
            }
        }
    }
    Ok(order)
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn is_builtin(builtin: &str, name: &str) -> bool {
    builtin.lines().any(|l| module_name(l) == name)
}

fn dep_line(dep: &str, name: &str) -> Option<(String, Vec<String>)> {
    dep.lines().find_map(|line| {
        let (path, deps) = line.split_once(':')?;
        (module_name(path) == name).then(|| {
            (
                path.to_owned(),
                deps.split_whitespace().map(str::to_owned).collect(),
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_and_dependency_lines() {
        assert_eq!(module_name("kernel/net/9p/9pnet_virtio.ko"), "9pnet_virtio");
        assert_eq!(module_name("kernel/fs/fuse/virtio-fs.ko.xz"), "virtio_fs");
        let dep = "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko\n\
                   kernel/net/9p/9pnet.ko:\n";
        let (path, deps) = dep_line(dep, "9p").unwrap();
        assert_eq!(path, "kernel/fs/9p/9p.ko");
        assert_eq!(deps.len(), 3);
        assert!(dep_line(dep, "9pnet_virtio").is_none());
    }
}
