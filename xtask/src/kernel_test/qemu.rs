//! One VM run: QEMU with software emulation (TCG; no KVM is assumed), the kernel and initramfs,
//! the host's root shared read-only and the run directory shared writable, over 9p. The serial
//! console goes to `console.log` in the run directory; the runner's marker lines are echoed as
//! they come. The VM gets a hard deadline: past it, QEMU is killed and the run is a failure.
use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{
    initramfs::{HOST_TAG, RUN_TAG},
    plan::{MARKER, RUNNER_UP},
};

pub struct Vm<'a> {
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    pub run_dir: &'a Path,
    pub cpus: u32,
    pub memory_mib: u32,
    /// The hard limit for the whole run.
    pub deadline: Duration,
    /// How long the VM may go on after a marker line (or its start, for "") before the next
    /// one: a hung guest is found within one step's limit, not only at the end.
    pub step_limit: &'a dyn Fn(&str) -> Duration,
}

/// How a VM run ended.
pub struct VmExit {
    /// QEMU exited by itself (the guest powered off or its kernel panicked) rather than being
    /// killed at the deadline.
    pub exited: bool,
    pub status: Option<std::process::ExitStatus>,
    pub wall: Duration,
    /// When the runner's first marker arrived, from QEMU's start: the boot time.
    pub runner_up_after: Option<Duration>,
    pub console: PathBuf,
}

/// Kills QEMU if the caller unwinds or returns early.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

pub fn run(vm: &Vm<'_>, qemu: &Path) -> Result<VmExit> {
    let console_path = vm.run_dir.join("console.log");
    let mut console = File::create(&console_path)
        .with_context(|| format!("creating {}", console_path.display()))?;
    let mut command = Command::new(qemu);
    command
        .args(["-accel", "tcg,thread=multi", "-cpu", "max"])
        .args([
            "-smp",
            &vm.cpus.to_string(),
            "-m",
            &vm.memory_mib.to_string(),
        ])
        .args(["-nographic", "-monitor", "none", "-serial", "stdio"])
        .args(["-nic", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(vm.vmlinuz)
        .arg("-initrd")
        .arg(vm.initramfs)
        // panic=-1: a panic reboots at once, and -no-reboot turns that into QEMU's exit.
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-virtfs")
        .arg(format!(
            "local,path=/,mount_tag={HOST_TAG},security_model=none,readonly=on,multidevs=remap"
        ))
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag={RUN_TAG},security_model=none",
            vm.run_dir.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = Reaper(
        command
            .spawn()
            .with_context(|| format!("starting {}", qemu.display()))?,
    );
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        child
            .0
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .0
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                // The console is bytes (BIOS escapes included), not necessarily UTF-8.
                let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
                line.clear();
            }
        });
    }
    drop(tx);
    let deadline = started + vm.deadline;
    let mut step_deadline = started + (vm.step_limit)("");
    let mut runner_up_after = None;
    let mut exited = false;
    loop {
        let deadline = deadline.min(step_deadline);
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => {
                console.write_all(line.as_bytes())?;
                if let Some(at) = line.find(MARKER) {
                    let marker = &line[at..];
                    if marker.starts_with(RUNNER_UP) {
                        runner_up_after.get_or_insert_with(|| started.elapsed());
                    }
                    step_deadline = Instant::now() + (vm.step_limit)(marker.trim_end());
                    eprintln!("  {}", marker.trim_end());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                exited = true;
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    let status = if exited {
        child.0.wait().ok()
    } else {
        let _ = child.0.kill();
        child.0.wait().ok();
        None
    };
    console.flush()?;
    Ok(VmExit {
        exited,
        status,
        wall: started.elapsed(),
        runner_up_after,
        console: console_path,
    })
}

/// The console's telling part, for error messages: up to a kernel panic (what led to it and
/// the panic line; its stack trace is in the file), else the last `n` lines.
pub fn console_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .iter()
        .position(|l| l.contains("Kernel panic"))
        .map_or(lines.len(), |i| i + 1);
    lines[end.saturating_sub(n)..end].join("\n")
}
