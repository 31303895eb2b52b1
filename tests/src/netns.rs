//! Two network namespaces joined by a veth pair: the server's world and the client's world.
//!
//! The watchdog acts on real kernel sockets and a real TC hook, so the tests need a real link
//! between two stacks. Namespaces give every test its own addresses, ports, firewall and sockets,
//! so tests run in parallel and never touch the host's network.

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;

use anyhow::{Context, Result, anyhow, bail};

/// Where `ip netns add` bind-mounts the namespace files.
const NETNS_DIR: &str = "/var/run/netns";

/// Prefix of every namespace this bed creates; [`cleanup_stale_namespaces`] relies on it.
const NS_PREFIX: &str = "wd-";

/// Counts the `TestNet`s of this process, so each gets its own subnet and interface names.
static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// Which IP family a server address, client socket or test uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// A server namespace and a client namespace, linked by a veth pair, deleted on drop.
///
/// Server side: `10.248.N.1/24` and `fd00:248:N::1/64`; client side: `.2` and `::2`.
#[derive(Debug)]
pub struct TestNet {
    n: u8,
    server_ns: String,
    client_ns: String,
    server_iface: String,
    client_iface: String,
}

impl TestNet {
    /// Creates both namespaces, the veth pair and the addresses, with every link up.
    ///
    /// `tag` only makes the namespace names readable in `ip netns list`.
    pub fn new(tag: &str) -> Result<TestNet> {
        cleanup_stale_namespaces();
        let pid = std::process::id();
        let seq = NEXT_NET.fetch_add(1, Ordering::Relaxed);
        // 1..=250: unique within the process for 250 nets; mixing in the pid keeps the interface
        // names of concurrent test processes apart in listings (the namespaces isolate them anyway).
        let n = u8::try_from((pid.wrapping_mul(7).wrapping_add(seq)) % 250 + 1)
            .context("subnet index out of range")?;
        let tag: String = tag
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(24)
            .collect();
        let base = format!("{NS_PREFIX}{tag}-{pid}-{seq}");
        let net = TestNet {
            n,
            server_ns: format!("{base}-srv"),
            client_ns: format!("{base}-cli"),
            server_iface: format!("wds{n}"),
            client_iface: format!("wdc{n}"),
        };
        // From here on, Drop removes whatever part was created.
        net.setup()
            .with_context(|| format!("setting up test network {base}"))?;
        Ok(net)
    }

    fn setup(&self) -> Result<()> {
        run("ip", &["netns", "add", &self.server_ns])?;
        run("ip", &["netns", "add", &self.client_ns])?;
        // Created directly inside the namespaces, so names never clash in the host namespace.
        run(
            "ip",
            &[
                "-n",
                &self.server_ns,
                "link",
                "add",
                &self.server_iface,
                "type",
                "veth",
                "peer",
                "name",
                &self.client_iface,
                "netns",
                &self.client_ns,
            ],
        )?;
        let n = self.n;
        for (ns, iface, host) in [
            (&self.server_ns, &self.server_iface, 1),
            (&self.client_ns, &self.client_iface, 2),
        ] {
            let v4 = format!("10.248.{n}.{host}/24");
            let v6 = format!("{}/64", self.v6(host));
            run("ip", &["-n", ns, "addr", "add", &v4, "dev", iface])?;
            // nodad: the address is usable at once instead of after duplicate detection.
            run(
                "ip",
                &["-n", ns, "-6", "addr", "add", &v6, "dev", iface, "nodad"],
            )?;
            run("ip", &["-n", ns, "link", "set", iface, "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// The subnet index N (1..=250) of this net.
    pub fn index(&self) -> u8 {
        self.n
    }

    /// Name of the server's network namespace (where the server and the agent run).
    pub fn server_ns(&self) -> &str {
        &self.server_ns
    }

    /// Name of the client's network namespace.
    pub fn client_ns(&self) -> &str {
        &self.client_ns
    }

    /// The server's veth interface: the one the agent watches.
    pub fn server_iface(&self) -> &str {
        &self.server_iface
    }

    /// The client's veth interface.
    pub fn client_iface(&self) -> &str {
        &self.client_iface
    }

    /// The server veth's interface index inside the server namespace (what the agent reports).
    pub fn server_ifindex(&self) -> Result<u32> {
        let iface = self.server_iface.clone();
        run_in_ns(&self.server_ns, move || current_ifindex(&iface))
    }

    /// `10.248.N.1`
    pub fn server_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 248, self.n, 1)
    }

    /// `10.248.N.2`
    pub fn client_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 248, self.n, 2)
    }

    /// `fd00:248:N::host`, with N's decimal digits written as the hex group (N = 211 gives
    /// `fd00:248:211::1`), so the IPv6 and IPv4 addresses of a net read alike.
    fn v6(&self, host: u16) -> Ipv6Addr {
        let group = u16::from_str_radix(&self.n.to_string(), 16).unwrap_or(u16::from(self.n));
        Ipv6Addr::new(0xfd00, 0x248, group, 0, 0, 0, 0, host)
    }

    /// `fd00:248:N::1`
    pub fn server_v6(&self) -> Ipv6Addr {
        self.v6(1)
    }

    /// `fd00:248:N::2`
    pub fn client_v6(&self) -> Ipv6Addr {
        self.v6(2)
    }

    /// The server's address of the given family.
    pub fn server_ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.server_v4().into(),
            Family::V6 => self.server_v6().into(),
        }
    }

    /// The client's address of the given family.
    pub fn client_ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.client_v4().into(),
            Family::V6 => self.client_v6().into(),
        }
    }

    /// `server_ip(family):port`
    pub fn server_addr(&self, family: Family, port: u16) -> SocketAddr {
        SocketAddr::new(self.server_ip(family), port)
    }

    /// `client_ip(family):port`
    pub fn client_addr(&self, family: Family, port: u16) -> SocketAddr {
        SocketAddr::new(self.client_ip(family), port)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Deleting a namespace destroys its veth end, which takes the peer with it.
        for ns in [&self.server_ns, &self.client_ns] {
            if Path::new(NETNS_DIR).join(ns).exists()
                && let Err(e) = run("ip", &["netns", "del", ns])
            {
                eprintln!("warning: could not delete namespace {ns}: {e:#}");
            }
        }
    }
}

/// Runs `f` on a fresh thread that first joins the namespace `ns`, and returns its result.
///
/// `setns` changes only the calling thread, so the caller's thread stays where it was. Sockets
/// created inside `f` belong to `ns` for life and can then be used from any thread.
pub fn run_in_ns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let path = Path::new(NETNS_DIR).join(ns);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let name = ns.to_owned();
    thread::Builder::new()
        .name(format!("ns-{ns}"))
        .spawn(move || {
            // SAFETY: plain syscall on an fd we own for the duration of the call.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("setns into network namespace {name}"));
            }
            drop(file);
            f()
        })
        .context("spawning namespace thread")?
        .join()
        .map_err(|_| anyhow!("thread running in namespace {ns} panicked"))?
}

/// The index of interface `name` in the calling thread's namespace.
pub fn current_ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).context("interface name contains NUL")?;
    // SAFETY: valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("no interface {name} in this namespace"));
    }
    Ok(index)
}

/// The `TcpExt` counters of namespace `ns` (`/proc/net/netstat`, what `nstat` shows as
/// `TcpExt<Name>`), e.g. `TCPChallengeACK`.
pub fn tcp_ext_counters(ns: &str) -> Result<HashMap<String, u64>> {
    // /proc/thread-self/net follows this thread's namespace; /proc/self/net the main thread's.
    let text = run_in_ns(ns, || {
        std::fs::read_to_string("/proc/thread-self/net/netstat")
            .context("reading /proc/thread-self/net/netstat")
    })?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no TcpExt lines in /proc/net/netstat of {ns}");
    };
    Ok(names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter_map(|(name, value)| Some((name.to_owned(), value.parse().ok()?)))
        .collect())
}

/// Runs `cmd args...` inside `ns` with `ip netns exec` and returns its stdout.
///
/// Fails when the command cannot start or exits non-zero, with its stderr in the message.
pub fn ns_exec(ns: &str, cmd: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["netns", "exec", ns, cmd];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Like [`ns_exec`] but feeds `stdin` to the command (for `nft -f -`).
pub fn ns_exec_stdin(ns: &str, cmd: &str, args: &[&str], stdin: &str) -> Result<String> {
    use std::io::Write;
    use std::process::Stdio;
    let mut full = vec!["netns", "exec", ns, cmd];
    full.extend_from_slice(args);
    let mut child = Command::new("ip")
        .args(&full)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `ip {}`", full.join(" ")))?;
    child
        .stdin
        .take()
        .context("child stdin")?
        .write_all(stdin.as_bytes())
        .with_context(|| format!("writing stdin of `ip {}`", full.join(" ")))?;
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `ip {}`", full.join(" ")))?;
    check_output("ip", &full, out)
}

/// Runs a host command and returns its stdout, or an error carrying its stderr.
fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("starting `{cmd} {}`", args.join(" ")))?;
    check_output(cmd, args, out)
}

fn check_output(cmd: &str, args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes `wd-<tag>-<pid>-<seq>-{srv,cli}` namespaces whose process no longer exists.
///
/// A test process that was killed (or panicked across a `Drop`-less path) leaves its namespaces
/// behind; the next run sweeps them so they do not pile up.
pub fn cleanup_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", &name]);
        }
    }
}

/// The pid encoded in a namespace name made by [`TestNet::new`], if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NS_PREFIX)?;
    let rest = rest
        .strip_suffix("-srv")
        .or_else(|| rest.strip_suffix("-cli"))?;
    // <tag>-<pid>-<seq>; the tag itself never contains '-'.
    let mut parts = rest.rsplitn(3, '-');
    let _seq: u32 = parts.next()?.parse().ok()?;
    let pid: u32 = parts.next()?.parse().ok()?;
    parts.next()?;
    Some(pid)
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn owner_pid_parses_only_our_names() {
        assert_eq!(owner_pid("wd-ipv4-1234-0-srv"), Some(1234));
        assert_eq!(owner_pid("wd-a_b-77-12-cli"), Some(77));
        assert_eq!(owner_pid("wd-x-12-srv"), None);
        assert_eq!(owner_pid("other-1-2-srv"), None);
        assert_eq!(owner_pid("wd-x-1-2-foo"), None);
    }
}
