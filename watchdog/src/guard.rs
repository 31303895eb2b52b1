//! Guards: the agent's decision whether a reported stale socket may be destroyed.
//!
//! A fixed client port makes the whole 4-tuple predictable, so a spoofed SYN could otherwise
//! make the watchdog kill a live connection — the very thing RFC 5961 stops. The classifier
//! already limits reports to watched interfaces, ports and clients and never reports an old
//! duplicate of a connection's own SYN. The guards here are the agent's last word, made on what
//! the kernel reports about the socket right before the destroy:
//!
//! * scope: the server port and the client address are watched;
//! * idle: the socket has received nothing for at least `min_idle` (a rebooting device is
//!   silent; a live connection under a spoofed SYN usually is not);
//! * rate: at most `per_client_limit` destroys per client address and `global_limit` in all,
//!   so that a flood cannot turn into a kill storm.
//!
//! Every refusal carries its reason into the log.
use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{
    config::{Mode, RunConfig, values::RateLimit},
    events::StaleSyn,
    sock_diag::SocketInfo,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Destroy,
    /// Leave the socket alone: which guard (a stable word for metrics) and why (for people).
    Refuse {
        kind: &'static str,
        reason: String,
    },
}

fn refuse(kind: &'static str, reason: impl Into<String>) -> Decision {
    Decision::Refuse {
        kind,
        reason: reason.into(),
    }
}

/// The guards' memory: the rate limits' token buckets.
pub struct Guards {
    per_client: HashMap<IpAddr, TokenBucket>,
    global: TokenBucket,
}

/// Above this many tracked clients, buckets that are full again are forgotten.
const MAX_TRACKED_CLIENTS: usize = 10_000;

impl Guards {
    pub fn new(config: &RunConfig, now: Instant) -> Self {
        Guards {
            per_client: HashMap::new(),
            global: TokenBucket::full(config.guards.global_limit, now),
        }
    }

    pub fn decide(
        &mut self,
        config: &RunConfig,
        syn: &StaleSyn,
        socket: &SocketInfo,
        now: Instant,
    ) -> Decision {
        if config.mode == Mode::Observe {
            return refuse("observe", "observe mode");
        }
        if !config.ports.contains(&syn.server.port()) {
            return refuse("scope", "server port is not watched");
        }
        if !config.clients.is_empty()
            && !config
                .clients
                .iter()
                .any(|net| net.contains(&syn.client.ip()))
        {
            return refuse("scope", "client is outside the watched prefixes");
        }
        if let Some(reason) = too_recently_active(config.guards.min_idle, socket.idle) {
            return refuse("min_idle", reason);
        }
        self.take_tokens(config, syn.client.ip(), now)
    }

    /// Spends one token of the client's bucket and one of the global bucket, or neither.
    fn take_tokens(&mut self, config: &RunConfig, client: IpAddr, now: Instant) -> Decision {
        let limits = &config.guards;
        if self.per_client.len() >= MAX_TRACKED_CLIENTS {
            self.per_client.retain(|_, bucket| !bucket.is_full(now));
        }
        let bucket = self
            .per_client
            .entry(client)
            .or_insert_with(|| TokenBucket::full(limits.per_client_limit, now));
        if !bucket.has_token(now) {
            return refuse(
                "per_client_limit",
                format!(
                    "rate limit: more than {} destroys for client {client}",
                    limits.per_client_limit
                ),
            );
        }
        if !self.global.has_token(now) {
            return refuse(
                "global_limit",
                format!(
                    "rate limit: more than {} destroys in all",
                    limits.global_limit
                ),
            );
        }
        bucket.take();
        self.global.take();
        Decision::Destroy
    }
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
            "min-idle: received data {} ms ago, less than {} ms",
            idle.as_millis(),
            min_idle.as_millis()
        )),
        None => Some("min-idle: the kernel reported no idle time (tcp_info)".into()),
    }
}

/// A token bucket holding up to `limit.count` tokens, refilled at `count` per `period`.
struct TokenBucket {
    limit: RateLimit,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    fn full(limit: RateLimit, now: Instant) -> Self {
        TokenBucket {
            limit,
            tokens: f64::from(limit.count),
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        let rate = f64::from(self.limit.count) / self.limit.period.as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(self.limit.count));
        self.updated = now;
    }

    fn has_token(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    fn take(&mut self) {
        self.tokens -= 1.0;
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= f64::from(self.limit.count)
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

    #[test]
    fn token_bucket_allows_a_burst_then_refills_at_the_rate() {
        let start = Instant::now();
        let limit = RateLimit {
            count: 2,
            period: Duration::from_secs(10),
        };
        let mut bucket = TokenBucket::full(limit, start);
        for _ in 0..2 {
            assert!(bucket.has_token(start));
            bucket.take();
        }
        assert!(!bucket.has_token(start));
        assert!(!bucket.has_token(start + Duration::from_secs(4)));
        assert!(bucket.has_token(start + Duration::from_secs(5)));
        assert!(bucket.is_full(start + Duration::from_secs(20)));
    }
}
