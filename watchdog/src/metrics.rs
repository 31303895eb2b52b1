//! Prometheus metrics, counted from the same records as the journal so the two always agree,
//! plus the kernel's own counters mirrored once a second.
use std::sync::Mutex;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use serde_json::{Map, Value};
use watchdog_common::Counter as KernelCounter;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Label {
    kind: String,
}

pub struct Metrics {
    registry: Registry,
    stale_syns: Counter,
    destroyed: Counter,
    replayed: Counter,
    refused: Family<Label, Counter>,
    peer_dead: Family<Label, Counter>,
    recovery: Histogram,
    kernel: Family<Label, Counter>,
    /// Kernel counter values already added to `kernel`.
    kernel_seen: Mutex<Vec<u64>>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("watchdog");
        let stale_syns = Counter::default();
        let destroyed = Counter::default();
        let replayed = Counter::default();
        let refused = Family::<Label, Counter>::default();
        let peer_dead = Family::<Label, Counter>::default();
        // 100 µs … ~3.3 s: replay lands in the first buckets, destroy-only near 1 s.
        let recovery = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.0001, 2.0, 16,
        ));
        let kernel = Family::<Label, Counter>::default();
        registry.register(
            "stale_syns",
            "SYNs for a tuple an ESTABLISHED socket owned, as the agent read them",
            stale_syns.clone(),
        );
        registry.register("destroyed", "Stale sockets destroyed", destroyed.clone());
        registry.register("replayed", "Held SYNs re-injected", replayed.clone());
        registry.register(
            "refused",
            "Destroys refused, by guard (kind)",
            refused.clone(),
        );
        registry.register(
            "peer_dead",
            "Timed connections that ended, by cause (kind)",
            peer_dead.clone(),
        );
        registry.register(
            "recovery_seconds",
            "From the classifier seeing a stale SYN to the SYN re-injected (replay) or the socket destroyed (destroy)",
            recovery.clone(),
        );
        registry.register(
            "kernel_events",
            "The classifier's own counters (kind), e.g. ringbuf_full: stale SYNs dropped unreported",
            kernel.clone(),
        );
        Metrics {
            registry,
            stale_syns,
            destroyed,
            replayed,
            refused,
            peer_dead,
            recovery,
            kernel,
            kernel_seen: Mutex::new(vec![0; KernelCounter::ALL.len()]),
        }
    }

    /// Counts one journal record.
    pub fn observe(&self, record: &Map<String, Value>) {
        let text = |key: &str| record.get(key).and_then(Value::as_str).unwrap_or("unknown");
        let seconds = |key: &str| {
            record
                .get(key)
                .and_then(Value::as_u64)
                .map(|us| us as f64 / 1e6)
        };
        match text("event") {
            "stale_syn" => {
                self.stale_syns.inc();
            }
            "destroyed" => {
                self.destroyed.inc();
                // A held SYN's recovery ends with its replay, counted there.
                if record.get("held") == Some(&Value::Bool(false))
                    && let Some(s) = seconds("total_us")
                {
                    self.recovery.observe(s);
                }
            }
            "replayed" => {
                self.replayed.inc();
                if let Some(s) = seconds("total_us") {
                    self.recovery.observe(s);
                }
            }
            "would_destroy" => {
                self.refused
                    .get_or_create(&Label {
                        kind: text("refusal").to_owned(),
                    })
                    .inc();
            }
            "peer_dead" | "connection_reset" => {
                self.peer_dead
                    .get_or_create(&Label {
                        kind: text("cause").to_owned(),
                    })
                    .inc();
            }
            _ => {}
        }
    }

    /// Mirrors the classifier's counters (summed over CPUs).
    pub fn set_kernel_counters(&self, counters: &[(KernelCounter, u64)]) {
        let mut seen = self.kernel_seen.lock().unwrap_or_else(|e| e.into_inner());
        for (counter, value) in counters {
            let slot = &mut seen[*counter as usize];
            if *value > *slot {
                self.kernel
                    .get_or_create(&Label {
                        kind: counter.name().to_owned(),
                    })
                    .inc_by(*value - *slot);
                *slot = *value;
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves `GET /metrics` over plain HTTP/1.1 until the task is dropped. One request per
/// connection; anything else gets a 404.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    recorder: std::sync::Arc<crate::recorder::Recorder>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let recorder = recorder.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                let read =
                    tokio::time::timeout(std::time::Duration::from_secs(2), stream.read(&mut buf))
                        .await;
                match read {
                    Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let first_line = head.split(|b| *b == b'\n').next().unwrap_or_default();
            let (status, body) = if first_line.starts_with(b"GET /metrics ") {
                ("200 OK", recorder.metrics.render())
            } else {
                ("404 Not Found", "see /metrics\n".to_owned())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}
