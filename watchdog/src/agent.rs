//! The agent's run loop: stale SYN events in, decisions and actions out, one log line each.
//!
//! ```text
//! EVENTS ring buffer ──► StaleSyn ──► guard::decide ──► action::destroy_stale ──► log
//!                                                   └─► inject (held SYNs, replay mode)
//! ```
//! It runs on one thread: the sock_diag round trips and the re-injection take well under a
//! millisecond, and one event at a time keeps the log in the order things happened.
//!
//! Fail-open: the agent refreshes a heartbeat map every 100 ms and the classifier holds SYNs
//! only while it is fresh. On SIGINT/SIGTERM the heartbeat is cleared first, the ring buffer
//! drained (every held SYN is re-injected) and only then the classifier detached.
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};
use watchdog_common::{Counter, HEARTBEAT_INTERVAL_NS};

use crate::{
    action::{self, DestroyOutcome, NotFound},
    classifier::Classifier,
    config::{Mode, RunConfig},
    events::{StaleSyn, monotonic_ns},
    guard::{self, Decision},
    inject::Injector,
    preflight,
    sock_diag::SockDiag,
};

/// Lets a classifier run that read the heartbeat just before it was cleared finish its
/// ring-buffer submit before the final drain.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(20);

pub async fn run(config: RunConfig) -> Result<()> {
    preflight::check_capabilities()?;
    if config.mode != Mode::Observe {
        preflight::check_sock_destroy()?;
    }
    let diag = SockDiag::open()?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;

    let mut classifier = Classifier::attach(&config)?;
    let ring = classifier.take_events()?;
    // SAFETY: the ring buffer owns its map fd and keeps it open until it is dropped with
    // `events`; `as_raw_fd` always returns that fd.
    let mut events = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("polling the ring buffer")?;
    let injector = match config.mode {
        Mode::Replay => Some(Injector::probe(
            classifier.replay_program()?,
            config.ifaces[0].index,
        )?),
        Mode::Observe | Mode::Destroy => None,
    };
    let mut agent = Agent {
        config,
        diag,
        classifier,
        injector,
    };
    agent.beat()?;
    agent.log_attached();

    let mut heartbeat = tokio::time::interval(Duration::from_nanos(HEARTBEAT_INTERVAL_NS));
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = heartbeat.tick() => agent.beat()?,
            ready = events.readable_mut() => {
                let mut ready = ready.context("waiting on the ring buffer")?;
                agent.drain(ready.get_inner_mut());
                ready.clear_ready();
            }
        }
    }

    // Stop holding, let in-flight classifier runs finish, replay what they held, then detach.
    agent.classifier.beat(0)?;
    tokio::time::sleep(SHUTDOWN_GRACE).await;
    agent.drain(events.get_mut());
    agent.log_counters();
    drop(events);
    drop(agent);
    info!(
        event = "detached",
        "watchdog detached; traffic flows as without it"
    );
    Ok(())
}

struct Agent {
    config: RunConfig,
    diag: SockDiag,
    classifier: Classifier,
    injector: Option<Injector>,
}

impl Agent {
    fn beat(&mut self) -> Result<()> {
        self.classifier.beat(monotonic_ns())
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(record) = ring.next() {
            let read_ns = monotonic_ns();
            match StaleSyn::decode(&record, read_ns) {
                Ok(syn) => {
                    drop(record);
                    self.handle(&syn);
                }
                Err(e) => warn!(event = "bad_record", error = %e, "skipped a ring buffer record"),
            }
        }
    }

    fn handle(&mut self, syn: &StaleSyn) {
        let raw = &syn.raw;
        info!(
            event = "stale_syn",
            client = %syn.client,
            server = %syn.server,
            ifindex = raw.ifindex,
            held = syn.held_frame().is_some(),
            syn_seq = raw.syn_seq,
            stale_peer_isn = raw.stale_peer_isn,
            stale_bytes_received = raw.stale_bytes_received,
            stale_segs_in = raw.stale_segs_in,
            event_latency_us = micros(syn.event_latency()),
            "SYN for a tuple that an ESTABLISHED socket owns"
        );
        let destroyed = self.judge_and_destroy(syn);
        if let Some(frame) = syn.held_frame() {
            self.replay(syn, frame, destroyed);
        }
    }

    /// Looks the stale socket up, lets the guards judge it and destroys it if they allow.
    /// Returns whether the stale socket is gone for sure.
    fn judge_and_destroy(&mut self, syn: &StaleSyn) -> bool {
        let socket = match action::find_stale(&mut self.diag, syn) {
            Ok(socket) => socket,
            Err(NotFound::Gone(reason)) => {
                info!(
                    event = "already_gone",
                    client = %syn.client,
                    server = %syn.server,
                    reason,
                    "nothing to destroy"
                );
                return false;
            }
            Err(NotFound::Failed(error)) => {
                warn!(
                    event = "destroy_failed",
                    client = %syn.client,
                    server = %syn.server,
                    error = %error,
                    "could not look the stale socket up"
                );
                return false;
            }
        };
        let idle_ms = socket.idle.map(|d| d.as_millis() as u64);
        if let Decision::Refuse(reason) = guard::decide(&self.config, syn, &socket) {
            info!(
                event = "would_destroy",
                client = %syn.client,
                server = %syn.server,
                idle_ms,
                reason,
                "stale socket left in place"
            );
            return false;
        }
        match action::destroy(&mut self.diag, syn, &socket) {
            DestroyOutcome::Destroyed { took } => {
                info!(
                    event = "destroyed",
                    client = %syn.client,
                    server = %syn.server,
                    idle_ms,
                    destroy_us = micros(took),
                    total_us = micros(since_seen(syn)),
                    "destroyed the stale socket"
                );
                true
            }
            DestroyOutcome::AlreadyGone(reason) => {
                info!(
                    event = "already_gone",
                    client = %syn.client,
                    server = %syn.server,
                    reason,
                    "nothing to destroy"
                );
                false
            }
            DestroyOutcome::Failed(error) => {
                warn!(
                    event = "destroy_failed",
                    client = %syn.client,
                    server = %syn.server,
                    error = %error,
                    "could not destroy the stale socket"
                );
                false
            }
        }
    }

    /// Re-injects a held SYN, whatever happened to its stale socket: nothing is lost. When the
    /// socket may still be there, the classifier is told first to let this one SYN through.
    fn replay(&mut self, syn: &StaleSyn, frame: &[u8], destroyed: bool) {
        let started = Instant::now();
        let result = (|| {
            if !destroyed {
                self.classifier.announce_replay(&syn.raw.replay_key())?;
            }
            let injector = self
                .injector
                .as_ref()
                .context("a SYN was held but replay is not set up")?;
            injector.inject(self.classifier.replay_program()?, frame, syn.raw.ifindex)?;
            anyhow::Ok(injector.method())
        })();
        match result {
            Ok(method) => info!(
                event = "replayed",
                client = %syn.client,
                server = %syn.server,
                method,
                inject_us = micros(started.elapsed()),
                total_us = micros(since_seen(syn)),
                "re-injected the held SYN"
            ),
            Err(error) => error!(
                event = "replay_failed",
                client = %syn.client,
                server = %syn.server,
                error = %format!("{error:#}"),
                "could not re-inject the held SYN; the client's retransmission will bring it back"
            ),
        }
    }

    fn log_attached(&self) {
        let config = &self.config;
        info!(
            event = "attached",
            ifaces = %comma_list(config.ifaces.iter().map(|i| &i.name)),
            ports = %comma_list(&config.ports),
            clients = %comma_list(&config.clients),
            mode = %config.mode,
            min_idle_ms = config.min_idle.as_millis() as u64,
            replay = self.injector.as_ref().map(Injector::method),
            program_id = self.classifier.program_id,
            attach = self.classifier.attach_kind,
            "watchdog attached"
        );
    }

    fn log_counters(&self) {
        match self.classifier.counters() {
            Ok(counters) => {
                let get = |wanted: Counter| {
                    counters
                        .iter()
                        .find(|(c, _)| *c == wanted)
                        .map_or(0, |(_, v)| *v)
                };
                info!(
                    event = "counters",
                    packets_seen = get(Counter::PacketsSeen),
                    syns_checked = get(Counter::SynsChecked),
                    stale_syns = get(Counter::StaleSyns),
                    ringbuf_full = get(Counter::RingbufFull),
                    old_duplicate_syns = get(Counter::OldDuplicateSyns),
                    held = get(Counter::Held),
                    replays_passed = get(Counter::ReplaysPassed),
                    heartbeat_stale = get(Counter::HeartbeatStale),
                    "classifier counters"
                );
            }
            Err(e) => warn!(event = "counters_unavailable", error = %e, "could not read counters"),
        }
    }
}

fn since_seen(syn: &StaleSyn) -> Duration {
    Duration::from_nanos(monotonic_ns().saturating_sub(syn.raw.seen_ns))
}

/// `a,b,c`: list fields stay plain strings in both log formats.
fn comma_list<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|item| item.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}
