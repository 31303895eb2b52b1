//! Guards: the agent's decision whether a reported stale socket may be destroyed.
//!
//! The classifier already limits reports to watched ports and clients and never reports an old
//! duplicate of a connection's own SYN; the guards here are the agent's last word, made on what
//! the kernel reports about the socket right before the destroy. Every refusal carries its
//! reason into the log.
use std::time::Duration;

use crate::{
    config::{Mode, RunConfig},
    events::StaleSyn,
    sock_diag::SocketInfo,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Destroy,
    /// Leave the socket alone, for this reason.
    Refuse(String),
}

pub fn decide(config: &RunConfig, syn: &StaleSyn, socket: &SocketInfo) -> Decision {
    if config.mode == Mode::Observe {
        return Decision::Refuse("observe mode".into());
    }
    if !config.ports.contains(&syn.server.port()) {
        return Decision::Refuse("server port is not watched".into());
    }
    if !config.clients.is_empty()
        && !config
            .clients
            .iter()
            .any(|net| net.contains(&syn.client.ip()))
    {
        return Decision::Refuse("client is outside the watched prefixes".into());
    }
    if let Some(reason) = too_recently_active(config.min_idle, socket.idle) {
        return Decision::Refuse(reason);
    }
    Decision::Destroy
}

/// The idle guard: a connection that received data within `min_idle` is alive, and a SYN for
/// its tuple is more likely spoofed than its client rebooted.
fn too_recently_active(min_idle: Duration, idle: Option<Duration>) -> Option<String> {
    if min_idle.is_zero() {
        return None;
    }
    match idle {
        Some(idle) if idle >= min_idle => None,
        Some(idle) => Some(format!(
            "received data {} ms ago, less than --min-idle {} ms",
            idle.as_millis(),
            min_idle.as_millis()
        )),
        None => Some("the kernel reported no idle time (tcp_info)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_guard_is_off_at_zero_and_strict_otherwise() {
        let second = Duration::from_secs(1);
        assert_eq!(too_recently_active(Duration::ZERO, None), None);
        assert_eq!(too_recently_active(second, Some(second)), None);
        assert!(too_recently_active(second, Some(Duration::from_millis(999))).is_some());
        assert!(too_recently_active(second, None).is_some());
    }
}
