//! Root check: namespaces, nftables and the eBPF agent need it.
//!
//! A developer without root gets a skip message instead of a wall of failures; CI must never
//! skip silently, so there a missing root is a failure.

/// True when the tests can run (euid 0). Otherwise panics under `CI=true`/`CI=1`, or prints a
/// skip message and returns false.
pub fn require_root() -> bool {
    if is_root() {
        return true;
    }
    let ci = std::env::var("CI").unwrap_or_default();
    if ci == "true" || ci == "1" {
        panic!("privileged e2e tests must run in CI: run as root");
    }
    eprintln!(
        "skipping: this end-to-end test needs root (network namespaces, nftables, eBPF); \
         run it as root, e.g. `sudo -E cargo test -p watchdog-tests`"
    );
    false
}

/// Whether the process runs as root (euid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
