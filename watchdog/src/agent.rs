//! The agent's run loop: stale SYN events in, decisions and actions out, one log line each.
//!
//! ```text
//! EVENTS ring buffer ──► StaleSyn ──► guard::decide ──► action::destroy_stale ──► log
//! ```
//! It runs on one thread: the sock_diag round trips take well under a millisecond, and one
//! event at a time keeps the log in the order things happened.
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracing::{info, warn};
use watchdog_common::Counter;

use crate::{
    action::{self, DestroyOutcome},
    classifier::Classifier,
    config::{Mode, RunConfig},
    events::{StaleSyn, monotonic_ns},
    guard::{self, Decision},
    preflight,
    sock_diag::SockDiag,
};

pub async fn run(config: RunConfig) -> Result<()> {
    preflight::check_capabilities()?;
    if config.mode == Mode::Destroy {
        preflight::check_sock_destroy()?;
    }
    let mut diag = SockDiag::open()?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;

    let mut classifier = Classifier::attach(&config)?;
    // SAFETY: the ring buffer owns its map fd and keeps it open until it is dropped with
    // `events`; `as_raw_fd` always returns that fd.
    let mut events =
        unsafe { AsyncFd::register_with_interest(classifier.take_events()?, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("polling the ring buffer")?;
    info!(
        event = "attached",
        ifaces = %comma_list(config.ifaces.iter().map(|i| &i.name)),
        ports = %comma_list(&config.ports),
        clients = %comma_list(&config.clients),
        mode = %config.mode,
        program_id = classifier.program_id,
        attach = classifier.attach_kind,
        "watchdog attached"
    );

    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            ready = events.readable_mut() => {
                let mut ready = ready.context("waiting on the ring buffer")?;
                while let Some(record) = ready.get_inner_mut().next() {
                    let read_ns = monotonic_ns();
                    match StaleSyn::decode(&record, read_ns) {
                        Ok(syn) => handle(&config, &mut diag, &syn),
                        Err(e) => warn!(event = "bad_record", error = %e, "skipped a ring buffer record"),
                    }
                }
                ready.clear_ready();
            }
        }
    }

    log_counters(&classifier);
    drop(events);
    drop(classifier);
    info!(
        event = "detached",
        "watchdog detached; traffic flows as without it"
    );
    Ok(())
}

fn handle(config: &RunConfig, diag: &mut SockDiag, syn: &StaleSyn) {
    let raw = &syn.raw;
    info!(
        event = "stale_syn",
        client = %syn.client,
        server = %syn.server,
        ifindex = raw.ifindex,
        syn_seq = raw.syn_seq,
        stale_peer_isn = raw.stale_peer_isn,
        stale_bytes_received = raw.stale_bytes_received,
        stale_segs_in = raw.stale_segs_in,
        event_latency_us = micros(syn.event_latency()),
        "SYN for a tuple that an ESTABLISHED socket owns"
    );
    match guard::decide(config, syn) {
        Decision::Refuse(reason) => info!(
            event = "would_destroy",
            client = %syn.client,
            server = %syn.server,
            reason,
            "stale socket left in place"
        ),
        Decision::Destroy => match action::destroy_stale(diag, syn) {
            DestroyOutcome::Destroyed { idle, took } => info!(
                event = "destroyed",
                client = %syn.client,
                server = %syn.server,
                idle_ms = idle.map(|d| d.as_millis() as u64),
                destroy_us = micros(took),
                total_us = micros(Duration::from_nanos(monotonic_ns().saturating_sub(raw.seen_ns))),
                "destroyed the stale socket; the client's next SYN reaches the listener"
            ),
            DestroyOutcome::AlreadyGone(reason) => info!(
                event = "already_gone",
                client = %syn.client,
                server = %syn.server,
                reason,
                "nothing to destroy"
            ),
            DestroyOutcome::Failed(error) => warn!(
                event = "destroy_failed",
                client = %syn.client,
                server = %syn.server,
                error = %error,
                "could not destroy the stale socket"
            ),
        },
    }
}

fn log_counters(classifier: &Classifier) {
    match classifier.counters() {
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
                "classifier counters"
            );
        }
        Err(e) => warn!(event = "counters_unavailable", error = %e, "could not read counters"),
    }
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
