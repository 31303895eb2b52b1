//! What the `overhead` and `scale` benchmarks share: namespace sysctls, file limits, threads
//! inside a namespace, the agent's RSS and CPU from `/proc`, the classifier's own run time
//! (`BPF_ENABLE_STATS`), median and spread of repeated ratios, and where the benchmarks write
//! their files. (Spoofed frames come from [`crate::spoof`].)

use std::fs;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

use crate::netns::run_in_ns;

/// Sets `key` (dotted, e.g. `net.core.somaxconn`) to `value` inside network namespace `ns`.
///
/// `/proc/sys/net` follows the network namespace of the thread that opens it, so the write
/// happens on a thread that joined `ns`.
pub fn ns_sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_owned();
    let shown = format!("{key}={value} in {ns}");
    run_in_ns(ns, move || {
        fs::write(&path, value.as_bytes()).with_context(|| format!("writing {path}"))
    })
    .with_context(|| format!("sysctl {shown}"))
}

/// Raises this process's open-file limit (soft and hard) to at least `want`, within the
/// kernel's `fs.nr_open` (raised too when it is lower); without `CAP_SYS_RESOURCE`, to the hard
/// limit. Returns the new soft limit.
pub fn raise_nofile(want: u64) -> Result<u64> {
    let nr_open: u64 = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    if nr_open < want {
        fs::write("/proc/sys/fs/nr_open", want.to_string())
            .context("raising fs.nr_open for the benchmark's sockets")?;
    }
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if current.rlim_cur >= want {
        return Ok(current.rlim_cur);
    }
    let limit = libc::rlimit {
        rlim_cur: want,
        rlim_max: want.max(current.rlim_max),
    };
    // SAFETY: valid in pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        return Ok(want);
    }
    // Without CAP_SYS_RESOURCE the hard limit stays: take all of it.
    let limit = libc::rlimit {
        rlim_cur: current.rlim_max,
        rlim_max: current.rlim_max,
    };
    // SAFETY: valid in pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(current.rlim_max)
}

/// Spawns a named thread that first joins network namespace `ns`, then runs `f`: sockets it
/// creates belong to `ns`.
pub fn spawn_in_ns<T, F>(ns: &str, name: &str, f: F) -> Result<JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let ns = ns.to_owned();
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || run_in_ns(&ns, f))
        .with_context(|| format!("spawning thread {name}"))
}

/// Joins a thread spawned by [`spawn_in_ns`], turning a panic into an error.
pub fn join<T>(handle: JoinHandle<Result<T>>) -> Result<T> {
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))?
}

/// The directory the benchmarks write their files to: `target/bench` of the workspace (or of
/// `CARGO_TARGET_DIR`). Created if missing.
pub fn output_dir() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.canonicalize().unwrap_or(dir))
}

/// Raises this process to nice −20 (threads and children started afterwards inherit it), so
/// that builds and tests sharing the machine disturb a benchmark less. Returns the new nice
/// value, or the error (a benchmark then runs at normal priority).
pub fn boost_priority() -> Result<i32> {
    // SAFETY: plain syscall on the calling thread (Linux nice is per thread; later threads and
    // children inherit it).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -20) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setpriority(-20)");
    }
    Ok(-20)
}

/// The machine's CPU time at one moment, split into what the benchmark itself (its threads,
/// reaped children and the extra processes named) used and what everything else did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSnapshot {
    /// user + nice + system of all CPUs (irq and softirq excluded: the network path of the
    /// benchmark's own traffic lands there), ticks.
    pub busy: u64,
    /// Time the hypervisor ran something else (`steal`), ticks.
    pub steal: u64,
    /// Everything but idle, iowait and steal (irq and softirq included), ticks.
    pub all_busy: u64,
    /// idle + iowait, ticks.
    pub idle: u64,
    /// The benchmark's own: this process, its reaped children and the extra processes, ticks.
    pub own: u64,
    pub at: Option<Instant>,
}

impl CpuSnapshot {
    pub fn now(extra_pids: &[u32]) -> CpuSnapshot {
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        let cpu: Vec<u64> = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let field = |i: usize| cpu.get(i).copied().unwrap_or(0);
        let own = proc_ticks("self", true)
            + extra_pids
                .iter()
                .map(|p| proc_ticks(&p.to_string(), false))
                .sum::<u64>();
        CpuSnapshot {
            busy: field(0) + field(1) + field(2),
            steal: field(7),
            all_busy: field(0) + field(1) + field(2) + field(5) + field(6),
            idle: field(3) + field(4),
            own,
            at: Some(Instant::now()),
        }
    }

    /// Foreign busy time and steal between `before` and `self`, in percent of the whole
    /// machine (all CPUs).
    pub fn foreign_since(&self, before: &CpuSnapshot) -> (f64, f64) {
        let wall = match (before.at, self.at) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
            _ => return (0.0, 0.0),
        };
        // SAFETY: plain sysconf.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let capacity = wall * hz * thread::available_parallelism().map_or(1, usize::from) as f64;
        if capacity <= 0.0 {
            return (0.0, 0.0);
        }
        let busy = self.busy.saturating_sub(before.busy) as f64;
        let own = self.own.saturating_sub(before.own) as f64;
        let steal = self.steal.saturating_sub(before.steal) as f64;
        (
            ((busy - own).max(0.0) / capacity * 100.0),
            steal / capacity * 100.0,
        )
    }
}

impl CpuSnapshot {
    /// CPU time of the whole machine (all processes, irq, softirq) between `before` and
    /// `self`, ns; and the idle share of the CPUs' time, %.
    pub fn busy_since(&self, before: &CpuSnapshot) -> (f64, f64) {
        // SAFETY: plain sysconf.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let busy = self.all_busy.saturating_sub(before.all_busy) as f64;
        let idle = self.idle.saturating_sub(before.idle) as f64;
        let total = busy + idle;
        (
            busy / hz * 1e9,
            if total > 0.0 {
                idle / total * 100.0
            } else {
                0.0
            },
        )
    }
}

/// utime + stime (+ cutime + cstime with `children`) of `/proc/<pid>/stat`, ticks.
fn proc_ticks(pid: &str, children: bool) -> u64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // After the state (field 3): utime 14 → index 11, stime 12, cutime 13, cstime 14.
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    get(11) + get(12) + if children { get(13) + get(14) } else { 0 }
}

/// One look at a process: resident memory and CPU time used so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcSample {
    pub at: Instant,
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// `VmHWM` (peak RSS), KiB.
    pub hwm_kib: u64,
    /// User + system CPU time of all its threads, ns.
    pub cpu_ns: u64,
}

/// Samples process `pid` now. CPU time comes from every thread's `schedstat` (ns resolution),
/// or from `stat`'s `utime + stime` (clock ticks) where schedstat is missing.
pub fn proc_sample(pid: u32) -> Result<ProcSample> {
    let at = Instant::now();
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        at,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        cpu_ns: cpu_ns(pid)?,
    })
}

fn cpu_ns(pid: u32) -> Result<u64> {
    let mut total = 0u64;
    let mut found = false;
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let Ok(text) = fs::read_to_string(task.path().join("schedstat")) else {
                continue;
            };
            if let Some(ns) = text
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
            {
                total += ns;
                found = true;
            }
        }
    }
    if found {
        return Ok(total);
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // `pid (comm) state ...`: fields after the last ')' start at field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    // utime is field 14, stime 15: indexes 11 and 12 after the state (field 3).
    let (Some(utime), Some(stime)) = (ticks(11), ticks(12)) else {
        bail!("unexpected /proc/{pid}/stat: {stat}");
    };
    // SAFETY: plain sysconf.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    Ok((utime + stime) * 1_000_000_000 / hz)
}

/// Samples a process in the background every `every` until dropped or stopped.
pub struct ProcSampler {
    samples: Arc<Mutex<Vec<ProcSample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A process's cost over a window of time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Usage {
    /// CPU time over wall time, percent of one core.
    pub cpu_pct: f64,
    /// Highest `VmRSS` seen in the window, MiB.
    pub rss_max_mib: f64,
    /// Wall time of the window, s.
    pub secs: f64,
}

impl ProcSampler {
    pub fn start(pid: u32, every: Duration) -> ProcSampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (Arc::clone(&samples), Arc::clone(&stop));
        let thread = thread::Builder::new()
            .name(format!("sample-{pid}"))
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    match proc_sample(pid) {
                        Ok(sample) => s.lock().unwrap_or_else(|e| e.into_inner()).push(sample),
                        Err(_) => break,
                    }
                    thread::sleep(every);
                }
            })
            .ok();
        ProcSampler {
            samples,
            stop,
            thread,
        }
    }

    /// The process's cost between `from` and `to`: CPU from the samples that bracket the window
    /// most tightly, the highest RSS of the samples inside it.
    pub fn usage(&self, from: Instant, to: Instant) -> Option<Usage> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let first = samples
            .iter()
            .rev()
            .find(|s| s.at <= from)
            .or(samples.first())?;
        let last = samples.iter().find(|s| s.at >= to).or(samples.last())?;
        let wall = last.at.checked_duration_since(first.at)?.as_secs_f64();
        if wall <= 0.0 {
            return None;
        }
        let rss = samples
            .iter()
            .filter(|s| s.at >= first.at && s.at <= last.at)
            .map(|s| s.rss_kib)
            .max()
            .unwrap_or(0);
        Some(Usage {
            cpu_pct: last.cpu_ns.saturating_sub(first.cpu_ns) as f64 / 1e9 / wall * 100.0,
            rss_max_mib: rss as f64 / 1024.0,
            secs: wall,
        })
    }

    /// The last sample's peak RSS (`VmHWM`), MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.last().map(|s| s.hwm_kib as f64 / 1024.0)
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ProcSampler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Keeps the kernel's BPF run-time statistics on while alive (`BPF_ENABLE_STATS`).
pub struct BpfStats {
    _fd: OwnedFd,
}

impl BpfStats {
    pub fn enable() -> Result<BpfStats> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("BPF_ENABLE_STATS(RUN_TIME)")?;
        Ok(BpfStats { _fd: fd })
    }
}

/// A program's run count and total run time, as the kernel counts them while stats are on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgStats {
    pub run_count: u64,
    pub run_time_ns: u64,
}

impl ProgStats {
    /// The statistics of the loaded program with id `id`.
    pub fn of(id: u32) -> Result<ProgStats> {
        for info in aya::programs::loaded_programs() {
            let info = info.context("listing loaded BPF programs")?;
            if info.id() == id {
                return Ok(ProgStats {
                    run_count: info.run_count(),
                    run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                });
            }
        }
        bail!("no loaded BPF program with id {id}")
    }

    pub fn since(self, before: ProgStats) -> ProgStats {
        ProgStats {
            run_count: self.run_count.saturating_sub(before.run_count),
            run_time_ns: self.run_time_ns.saturating_sub(before.run_time_ns),
        }
    }

    pub fn ns_per_run(self) -> Option<f64> {
        (self.run_count > 0).then(|| self.run_time_ns as f64 / self.run_count as f64)
    }
}

/// Median and range of repeated measurements (e.g. one with/without ratio per round).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    /// `None` for no value. The median of an even count is the mean of the middle two.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// Rounds to 4 decimals (ratios).
pub fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// `perf record` of the whole machine (frame-pointer call chains) or of one process (DWARF
/// call chains: a release build has no frame pointers) while alive, into `out`.
pub struct PerfRecord {
    child: std::process::Child,
    out: PathBuf,
    /// Report inclusive time (`--children`): where a process's time goes, top-down.
    children: bool,
}

impl PerfRecord {
    /// Starts `perf record -a -g -F 1999`; fails when `perf` is missing.
    pub fn start(out: &std::path::Path) -> Result<PerfRecord> {
        PerfRecord::spawn(out, &["-a", "-g"], false)
    }

    /// Starts `perf record --call-graph dwarf -F 1999` of process `pid` (all its threads).
    pub fn start_pid(out: &std::path::Path, pid: u32) -> Result<PerfRecord> {
        PerfRecord::spawn(
            out,
            &["-p", &pid.to_string(), "--call-graph", "dwarf,16384"],
            true,
        )
    }

    fn spawn(out: &std::path::Path, target: &[&str], children: bool) -> Result<PerfRecord> {
        let child = std::process::Command::new("perf")
            .arg("record")
            .args(target)
            .args(["-F", "1999", "-q", "-o"])
            .arg(out)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting `perf record` (apt-get install linux-perf)")?;
        // perf needs a moment to set up its ring buffers before the interesting part starts.
        thread::sleep(Duration::from_millis(500));
        Ok(PerfRecord {
            child,
            out: out.to_path_buf(),
            children,
        })
    }

    /// Stops recording and returns `perf report`'s top `lines` symbols: self time for the whole
    /// machine, inclusive time for a process.
    pub fn stop(mut self, lines: usize) -> Result<String> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid")?;
        // SAFETY: signalling our own, not yet reaped child.
        unsafe { libc::kill(pid, libc::SIGINT) };
        self.child.wait().context("waiting for perf record")?;
        let view = if self.children {
            ["--children", "symbol"]
        } else {
            ["--no-children", "comm,symbol"]
        };
        let report = std::process::Command::new("perf")
            .args([
                "report", "--stdio", view[0], "--sort", view[1], "-g", "none", "-i",
            ])
            .arg(&self.out)
            .output()
            .context("running perf report")?;
        let text = String::from_utf8_lossy(&report.stdout);
        let mut seen = std::collections::HashSet::new();
        Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            // Inclusive time: the runtime's frames are 100 %; show the agent's own functions and
            // the system calls they make.
            .filter(|l| !self.children || interesting_frame(l))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|l| seen.insert(l.split_once("] ").map_or(l.clone(), |(_, s)| s.to_owned())))
            .map(|l| l.chars().take(150).collect::<String>())
            .take(lines)
            .collect::<Vec<_>>()
            .join("\n"))
    }
}

/// Keeps sockets alive without keeping their file descriptors: each is sent with `SCM_RIGHTS`
/// over a Unix socket pair whose other end never receives, so the kernel holds the socket "in
/// flight" and the process's descriptor can be closed. How a benchmark holds 200,000 TCP sockets
/// where `RLIMIT_NOFILE` cannot be raised (no `CAP_SYS_RESOURCE`): in-flight descriptors are not
/// limited for `CAP_SYS_ADMIN`. Dropping the stash closes them all.
pub struct FdStash {
    tx: OwnedFd,
    _rx: OwnedFd,
    pending: Vec<OwnedFd>,
    held: usize,
}

/// Descriptors per message (the kernel's `SCM_MAX_FD` is 253).
const STASH_BATCH: usize = 250;

impl FdStash {
    pub fn new() -> Result<FdStash> {
        let mut fds = [0i32; 2];
        // SAFETY: valid out array of two ints.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error()).context("socketpair(AF_UNIX)");
        }
        // SAFETY: two fresh fds nobody else owns.
        let (tx, rx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Room for thousands of messages (SO_SNDBUFFORCE needs CAP_NET_ADMIN).
        let size: i32 = 1 << 30;
        // SAFETY: a valid int for the duration of the call.
        unsafe {
            libc::setsockopt(
                tx.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                (&raw const size).cast(),
                size_of::<i32>() as libc::socklen_t,
            )
        };
        Ok(FdStash {
            tx,
            _rx: rx,
            pending: Vec::new(),
            held: 0,
        })
    }

    /// Takes `fd`; it stays open (in flight) until the stash is dropped.
    pub fn push(&mut self, fd: OwnedFd) -> Result<()> {
        self.pending.push(fd);
        if self.pending.len() >= STASH_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends what is pending and closes this process's copies.
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let fds: Vec<i32> = self.pending.iter().map(AsRawFd::as_raw_fd).collect();
        let bytes = size_of_val(fds.as_slice());
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
        let mut control = vec![0u8; space];
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: all-zero is a valid msghdr; the pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer has room for one header and `bytes` of data.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<i32>(),
                fds.len(),
            );
        }
        // SAFETY: a fully initialised msghdr.
        if unsafe { libc::sendmsg(self.tx.as_raw_fd(), &msg, 0) } != 1 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("stashing {} sockets (SCM_RIGHTS)", fds.len()));
        }
        self.held += self.pending.len();
        self.pending.clear();
        Ok(())
    }

    /// Sockets held so far (pending ones included).
    pub fn held(&self) -> usize {
        self.held + self.pending.len()
    }
}

/// A `perf report --children` line worth showing for the agent: its own functions (not the
/// run loop around them), its system calls, and log formatting.
fn interesting_frame(line: &str) -> bool {
    let own = line.contains("watchdog::")
        && ![
            "watchdog::main",
            "watchdog::run ",
            "watchdog::run::",
            "agent::run",
        ]
        .iter()
        .any(|outer| line.contains(outer));
    own || line.contains("[k] __x64_sys_")
        || line.contains("[k] tcp_abort")
        || line.contains("[k] xdp_test_run_batch")
        || (line.contains(
            "fmt_layer::Layer<S,N,E,W> as tracing_subscriber::layer::Layer<S>>::on_event",
        ) && !line.contains("{{closure}}"))
}

/// The real agent, like [`crate::agent::Agent`], but with its JSON log written to a file (as a
/// service's log goes to a journal) instead of a pipe the harness parses as it comes: while a
/// benchmark measures, nothing of the harness runs per log line, and a log burst never blocks
/// the agent on a full pipe. The file is read (incrementally) when asked.
pub struct LogAgent {
    child: std::process::Child,
    path: PathBuf,
    offset: u64,
    partial: String,
    lines: Vec<Value>,
}

impl LogAgent {
    /// Starts `watchdog run ARGS --log-format json` in `net`'s server namespace (`nsenter
    /// --net`, as the bed does) with its stderr in `log`, and waits for `attached`.
    pub fn start(
        net: &crate::netns::TestNet,
        args: &[&str],
        log: &std::path::Path,
    ) -> Result<LogAgent> {
        let bin = crate::agent::Agent::binary();
        ensure_file(&bin)?;
        let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let netns = format!("--net=/run/netns/{}", net.server_ns());
        let child = std::process::Command::new("nsenter")
            .arg(&netns)
            .arg(&bin)
            .arg("run")
            .args(args)
            .args(["--log-format", "json"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .context("starting the agent")?;
        let mut agent = LogAgent {
            child,
            path: log.to_path_buf(),
            offset: 0,
            partial: String::new(),
            lines: Vec::new(),
        };
        agent
            .wait_for("attached", 1, Duration::from_secs(10))
            .with_context(|| format!("the agent did not attach; its log: {}", log.display()))?;
        Ok(agent)
    }

    /// The agent's pid (`nsenter` execs it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads what the agent wrote since the last call.
    pub fn poll(&mut self) -> Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = fs::File::open(&self.path)?;
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let Some(last) = self.partial.rfind('\n') else {
            return Ok(());
        };
        let rest = self.partial.split_off(last + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        for line in complete.lines() {
            if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
                self.lines.push(v);
            }
        }
        Ok(())
    }

    /// Every JSON line read so far.
    pub fn lines(&self) -> &[Value] {
        &self.lines
    }

    /// The lines read so far whose `event` is `name`.
    pub fn events<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.lines
            .iter()
            .filter(move |v| v.get("event").and_then(Value::as_str) == Some(name))
    }

    /// Waits until at least `count` `name` events were logged; returns how many there are.
    pub fn wait_for(&mut self, name: &str, count: usize, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll()?;
            let n = self.events(name).count();
            if n >= count {
                return Ok(n);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the agent exited ({status}) before logging {count} `{name}` event(s)");
            }
            if Instant::now() >= deadline {
                bail!("the agent logged {n} of {count} `{name}` event(s) within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The classifier's program id, from `attached`.
    pub fn program_id(&self) -> Result<u32> {
        self.events("attached")
            .next()
            .and_then(|v| v.get("program_id"))
            .and_then(Value::as_u64)
            .and_then(|id| u32::try_from(id).ok())
            .context("no program_id in the agent's `attached` line")
    }

    /// SIGTERM, waits up to 5 s (then SIGKILL, an error), reads the rest of the log. Returns
    /// the `counters` line.
    pub fn stop(mut self) -> Result<Value> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid")?;
        // SAFETY: signalling our own, not yet reaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "the agent did not exit within 5 s of SIGTERM ({})",
                    self.path.display()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.poll()?;
        self.events("counters").last().cloned().with_context(|| {
            format!(
                "the agent logged no `counters` line ({})",
                self.path.display()
            )
        })
    }
}

impl Drop for LogAgent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn ensure_file(bin: &std::path::Path) -> Result<()> {
    if !bin.is_file() {
        bail!(
            "agent binary not found at {}: run the benchmark through `cargo xtask bench`, which \
             builds it",
            bin.display()
        );
    }
    Ok(())
}

/// The agent's other BPF programs: every loaded program that shares a map with its classifier
/// (`classifier_id`), with its name, classifier included. Another agent running at the same
/// time has its own maps, so its programs are not mixed in.
pub fn sibling_programs(classifier_id: u32) -> Result<Vec<(u32, String)>> {
    let mut all = Vec::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        let maps = info.map_ids().ok().flatten().unwrap_or_default();
        all.push((
            info.id(),
            info.name_as_str().unwrap_or("?").to_owned(),
            maps,
        ));
    }
    let ours: Vec<u32> = all
        .iter()
        .find(|(id, _, _)| *id == classifier_id)
        .map(|(_, _, maps)| maps.clone())
        .with_context(|| format!("no loaded BPF program with id {classifier_id}"))?;
    Ok(all
        .into_iter()
        .filter(|(_, _, maps)| maps.iter().any(|m| ours.contains(m)))
        .map(|(id, name, _)| (id, name))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_median_and_range() {
        let s = Spread::of(&[1.0, 3.0, 2.0]).expect("values");
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Spread::of(&[1.0, 2.0, 4.0, 3.0]).expect("values");
        assert_eq!(s.median, 2.5);
        assert!(Spread::of(&[]).is_none());
        assert!(Spread::of(&[f64::NAN]).is_none());
    }

    #[test]
    fn own_process_sample() {
        let s = proc_sample(std::process::id()).expect("sample");
        assert!(s.rss_kib > 0 && s.cpu_ns > 0);
    }
}
