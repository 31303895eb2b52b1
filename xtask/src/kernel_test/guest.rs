//! `xtask kernel-test-guest RUN_DIR`: the test runner inside the VM, as PID 1.
//!
//! The initramfs has switched to the host's root (read-only 9p under a tmpfs overlay). This
//! mounts what a booted Debian system has (proc, sysfs, devtmpfs, devpts, /run, cgroup v2, bpffs),
//! creates the modules' static device nodes as systemd does from `modules.devname` (so opening
//! `/dev/net/tun` loads `tun`), probes the kernel with the agent, runs the plan's test binaries
//! and powers the VM off. It never exits otherwise: PID 1 exiting would panic the kernel, which
//! the host would see as a crash.
use std::{
    ffi::CString,
    fs,
    io::Write,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use super::{
    plan::{self, Done, MARKER, Plan, RUNNER_UP},
    probe,
};

pub fn main(run_dir: &Path) -> ! {
    let started = Instant::now();
    let mut console = std::io::stdout();
    let result = run(run_dir, started, &mut console);
    if let Err(error) = result {
        let _ = writeln!(console, "{MARKER} runner failed: {error:#}");
        let _ = fs::write(run_dir.join("runner-error.txt"), format!("{error:#}\n"));
    }
    let _ = console.flush();
    // SAFETY: no preconditions; flushes filesystems and powers off.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    }
    // reboot() only returns on failure (it needs CAP_SYS_BOOT, which PID 1 has).
    loop {
        std::thread::park();
    }
}

fn run(run_dir: &Path, started: Instant, console: &mut dyn Write) -> Result<()> {
    mount_all()?;
    let uptime: Option<f64> = fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse().ok());
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    writeln!(
        console,
        "{RUNNER_UP} on Linux {release}, {:.1} s after boot",
        uptime.unwrap_or(0.0)
    )?;
    static_device_nodes(&release)?;
    // SAFETY: single-threaded here; the children inherit these.
    unsafe {
        std::env::set_var(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
        std::env::set_var("HOME", "/root");
    }
    run_command("ip", &["link", "set", "lo", "up"])?;

    let plan: Plan = plan::read_json(&run_dir.join(plan::PLAN_FILE))?;
    writeln!(console, "{MARKER} probing the kernel with the agent")?;
    let features = probe::probe(&plan.agent, Path::new("/tmp/watchdog-kernel-probe"));
    plan::write_json(&run_dir.join(plan::FEATURES_FILE), &features)?;
    writeln!(
        console,
        "{MARKER} features: attach={} sock_destroy={} ring_buffer={} btf={} replay={}{}",
        features.attach,
        features.sock_destroy,
        features.ring_buffer,
        features.btf,
        features.replay,
        features
            .error
            .as_deref()
            .map(|e| format!(" (probe failed: {e})"))
            .unwrap_or_default()
    )?;
    plan::execute(&plan, run_dir, console)?;
    plan::write_json(
        &run_dir.join(plan::DONE_FILE),
        &Done {
            secs: started.elapsed().as_secs_f64(),
            boot_uptime_s: uptime,
        },
    )?;
    writeln!(console, "{MARKER} done, powering off")?;
    Ok(())
}

/// (source, target, type, flags, data, required)
const MOUNTS: &[(&str, &str, &str, libc::c_ulong, &str, bool)] = &[
    ("proc", "/proc", "proc", 0, "", true),
    ("sysfs", "/sys", "sysfs", 0, "", true),
    ("devtmpfs", "/dev", "devtmpfs", 0, "mode=0755", true),
    ("devpts", "/dev/pts", "devpts", 0, "ptmxmode=0666", true),
    ("tmpfs", "/dev/shm", "tmpfs", 0, "mode=1777", true),
    ("tmpfs", "/run", "tmpfs", 0, "mode=0755", true),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, "", true),
    ("bpf", "/sys/fs/bpf", "bpf", 0, "", true),
    ("debugfs", "/sys/kernel/debug", "debugfs", 0, "", false),
];

fn mount_all() -> Result<()> {
    for &(source, target, fstype, flags, data, required) in MOUNTS {
        let _ = fs::create_dir_all(target);
        let c = |s: &str| CString::new(s).expect("no NUL");
        let (source_c, target_c, fstype_c, data_c) = (c(source), c(target), c(fstype), c(data));
        // SAFETY: valid NUL-terminated strings for the duration of the call.
        let rc = unsafe {
            libc::mount(
                source_c.as_ptr(),
                target_c.as_ptr(),
                fstype_c.as_ptr(),
                flags,
                data_c.as_ptr().cast(),
            )
        };
        if rc != 0 && required {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mounting {fstype} on {target}"));
        }
    }
    // Debian has /var/run -> /run; nothing else to do for `ip netns`.
    Ok(())
}

/// `modules.devname` lines are `module devname type major:minor`, e.g. `tun net/tun c10:200`.
fn static_device_nodes(release: &str) -> Result<()> {
    let path = PathBuf::from(format!("/lib/modules/{release}/modules.devname"));
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_module, name, spec] = fields[..] else {
            continue;
        };
        let (kind, numbers) = spec.split_at(1);
        let Some((major, minor)) = numbers.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse::<u32>(), minor.parse::<u32>()) else {
            continue;
        };
        let mode = match kind {
            "c" => libc::S_IFCHR,
            "b" => libc::S_IFBLK,
            _ => continue,
        } | 0o600;
        let node = Path::new("/dev").join(name);
        if node.exists() {
            continue;
        }
        if let Some(parent) = node.parent() {
            fs::create_dir_all(parent)?;
        }
        let c_node = CString::new(node.as_os_str().as_encoded_bytes())?;
        // SAFETY: valid path; makedev has no preconditions.
        let rc = unsafe { libc::mknod(c_node.as_ptr(), mode, libc::makedev(major, minor)) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mknod {}", node.display()));
        }
    }
    Ok(())
}

fn run_command(program: &str, args: &[&str]) -> Result<()> {
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("starting {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed: {status}", args.join(" "));
    }
    Ok(())
}
