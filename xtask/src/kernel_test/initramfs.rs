//! The VM's initramfs: a static busybox, the modules that reach the host's files (virtio PCI,
//! 9p, overlayfs; Debian builds them as modules) and an `/init` that
//!
//! 1. loads them and mounts the host's root read-only over 9p, under a tmpfs overlay so the
//!    guest can write anywhere (its writes stay in its memory);
//! 2. mounts the run directory (a second, writable 9p share) at [`RUN_DIR`], where the host left
//!    `boot.env`: the host path of the kernel's `lib/modules`, which it binds over the guest's
//!    `/lib/modules` so the host's own `modprobe` loads the guest kernel's modules on demand,
//!    and the runner to start;
//! 3. switches to that root and executes the runner as PID 1 (`xtask kernel-test-guest`).
//!
//! Any step that fails prints a marker line and powers the VM off; the host then finds no
//! results and reports a boot failure with the console's tail.
//!
//! The archive is the kernel's "newc" cpio format, written here: a handful of files, no tool.
use std::{fs, path::Path};

use anyhow::{Context, Result};

use super::{debian::Kernel, plan::MARKER};

/// Where the guest sees the run directory.
pub const RUN_DIR: &str = "/mnt/kernel-test";
/// The 9p mount tags of the two shares.
pub const HOST_TAG: &str = "hostroot";
pub const RUN_TAG: &str = "kernelrun";
/// Modules needed before the host's root is reachable.
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
# watchdog kernel-test: reach the host's root, then run the test runner as PID 1.
B=/bin/busybox
fail() {{ echo "{MARKER} boot failed: $*"; $B sync; $B poweroff -f; }}
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
for m in /modules/*.ko; do $B insmod "$m" || fail "insmod $m"; done
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose {HOST_TAG} /lower \
    || fail "mounting the host's root over 9p"
$B mount -t tmpfs -o mode=0755 tmpfs /upper || fail "tmpfs"
$B mkdir -p /upper/data /upper/work
$B mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \
    || fail "overlayfs over the host's root"
$B mkdir -p /newroot{RUN_DIR} /newroot/usr/lib/modules
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 {RUN_TAG} /newroot{RUN_DIR} \
    || fail "mounting the run directory"
. /newroot{RUN_DIR}/boot.env || fail "no boot.env in the run directory"
$B mount --bind "/lower$MODULES" /newroot/usr/lib/modules || fail "binding $MODULES"
echo "{MARKER} initramfs done, starting $RUNNER"
$B umount /proc /sys /dev
exec $B switch_root /newroot "$RUNNER" kernel-test-guest {RUN_DIR}
"#
    )
}

/// Writes the initramfs for `kernel` to `path`, unless an identical one is already there.
pub fn build(kernel: &Kernel, busybox: &Path, path: &Path) -> Result<()> {
    let mut cpio = Cpio::default();
    for dir in [
        "bin", "dev", "proc", "sys", "lower", "upper", "newroot", "modules",
    ] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 5, 1);
    cpio.file(
        "bin/busybox",
        0o755,
        fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?,
    );
    cpio.file("init", 0o755, init_script().into_bytes());
    for (i, module) in super::debian::module_closure(kernel, BOOT_MODULES)?
        .iter()
        .enumerate()
    {
        let name = module
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("m.ko");
        cpio.file(
            &format!("modules/{i:02}-{name}"),
            0o644,
            fs::read(module).with_context(|| format!("reading {}", module.display()))?,
        );
    }
    let bytes = cpio.finish();
    if fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// A "newc" cpio archive (`cpio -H newc`), the format the kernel unpacks.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 0, 0, &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: Vec<u8>) {
        self.entry(name, 0o100_000 | mode, 0, 0, &data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, major, minor, &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, rdev_major: u32, rdev_minor: u32, data: &[u8]) {
        self.ino += 1;
        let name_len = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime: fixed, so identical inputs give identical archives
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev_major,
            rdev_minor,
            name_len as u32,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, 0, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::Cpio;

    #[test]
    fn newc_entries_are_aligned_and_end_with_the_trailer() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"#!/bin/sh\n".to_vec());
        let out = cpio.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        let header_and_name = 110 + "init\0".len();
        let body = header_and_name.next_multiple_of(4);
        assert_eq!(&out[body..body + 10], b"#!/bin/sh\n");
        assert!(
            out.windows(10).any(|w| w == b"TRAILER!!!"),
            "no trailer in {out:?}"
        );
    }
}
