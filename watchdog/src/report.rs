//! Reporting: every step of the data path becomes one log line with a stable `event` field, so
//! an operator can answer "what happened, why, and how long did it take" from the log alone.
use std::time::Duration;

use anyhow::Result;
use tracing::{debug, error, info, warn};
use watchdog_common::Counter;

use crate::{
    agent::Verdict,
    classifier::Classifier,
    config::{PortTimerConfig, RunConfig},
    connections::{Cause, DeadPeer, Story},
    events::StaleSyn,
    preflight::KernelFeatures,
    replayer::Replay,
};

pub fn attached(config: &RunConfig, classifier: &Classifier, replay: Option<&str>) {
    info!(
        event = "attached",
        ifaces = %comma_list(config.ifaces.iter().map(|i| &i.name)),
        ports = %comma_list(&config.ports),
        clients = %comma_list(&config.clients),
        mode = %config.mode,
        min_idle_ms = millis(config.guards.min_idle),
        per_client_limit = %config.guards.per_client_limit,
        global_limit = %config.guards.global_limit,
        timers = %comma_list(config.timers.ports.iter().map(|(port, t)| describe_timers(*port, t))),
        replay,
        program_id = classifier.program_id,
        attach = classifier.attach_kind,
        "watchdog attached"
    );
}

pub fn features(features: &KernelFeatures) {
    info!(
        event = "features",
        kernel = %features.release,
        tc_bpf = features.tc_bpf,
        ring_buffer = features.ring_buffer,
        btf = features.btf,
        attach = if features.tcx { "tcx" } else { "clsact" },
        sock_destroy = %features.sock_destroy,
        "kernel features"
    );
}

pub fn stale_syn(syn: &StaleSyn) {
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
}

pub fn verdict(syn: &StaleSyn, verdict: &Verdict) {
    let (client, server) = (&syn.client, &syn.server);
    match verdict {
        Verdict::Destroyed {
            idle,
            lookup,
            destroy,
            since_seen,
        } => info!(
            event = "destroyed",
            %client,
            %server,
            held = syn.held_frame().is_some(),
            idle_ms = idle.map(millis),
            bytes_received = syn.raw.stale_bytes_received,
            lookup_us = micros(*lookup),
            destroy_us = micros(*destroy),
            total_us = micros(*since_seen),
            "destroyed the stale socket (idle {}, {} bytes received)",
            idle.map_or("unknown".into(), |d| format!("{:.1} s", d.as_secs_f64())),
            syn.raw.stale_bytes_received
        ),
        Verdict::Refused { kind, reason, idle } => info!(
            event = "would_destroy",
            %client,
            %server,
            idle_ms = idle.map(millis),
            refusal = kind,
            reason,
            "stale socket left in place"
        ),
        Verdict::AlreadyGone(reason) => info!(
            event = "already_gone",
            %client,
            %server,
            reason,
            "nothing to destroy"
        ),
        Verdict::Failed(error) => warn!(
            event = "destroy_failed",
            %client,
            %server,
            error = %error,
            "could not look up or destroy the stale socket"
        ),
    }
}

pub fn replay(syn: &StaleSyn, replay: &Replay) {
    let (client, server) = (&syn.client, &syn.server);
    match &replay.result {
        Ok(method) => info!(
            event = "replayed",
            %client,
            %server,
            method,
            inject_us = micros(replay.took),
            total_us = micros(replay.since_seen),
            "re-injected the held SYN"
        ),
        Err(error) => error!(
            event = "replay_failed",
            %client,
            %server,
            error = %format!("{error:#}"),
            "could not re-inject the held SYN; the client's retransmission will bring it back"
        ),
    }
}

/// `counter`, a count of reports a full ring buffer could not take, grew by `new`: `lost`
/// says what went unreported. The event is the counter's name (`ringbuf_full`,
/// `lifecycle_lost`).
pub fn reports_lost(counter: Counter, lost: &str, new: u64, total: u64) {
    warn!(
        event = counter.name(),
        new, total, "the agent fell behind: {lost}"
    );
}

pub fn map_write_failed(error: &anyhow::Error) {
    warn!(event = "map_write_failed", error = %format!("{error:#}"), "could not update a classifier map");
}

/// A watched connection's step. Plain connects and closes are many on a busy port: they go to
/// the journal, followers and metrics, and to stderr only at debug level (`RUST_LOG=debug`),
/// so that they cannot flood the system log (journald rate-limits a service as a whole, and
/// would drop decisions with them). A return after a stale SYN and a dead peer stay on stderr.
pub fn connection(story: &Story) {
    match story {
        Story::Connected {
            client,
            server,
            after_stale_syn,
        } => match after_stale_syn {
            Some(after) => info!(
                event = "connected",
                %client,
                %server,
                after_stale_syn_us = micros(*after),
                "reconnected {:.2} ms after its stale SYN",
                after.as_secs_f64() * 1000.0
            ),
            None => debug!(
                event = "connected",
                %client,
                %server,
                "a watched connection was established"
            ),
        },
        Story::PeerClosed {
            client,
            server,
            bytes_received,
        } => debug!(
            event = "peer_closed",
            %client,
            %server,
            bytes_received,
            "the peer closed its side (FIN)"
        ),
        Story::Ended(dead) => dead_peer(dead),
    }
}

fn dead_peer(dead: &DeadPeer) {
    let cause = match dead.cause {
        Cause::Keepalive { .. } => "keepalive",
        Cause::Unacknowledged { .. } => "user_timeout",
        Cause::ResetOrAborted => "reset",
    };
    let event = if dead.cause == Cause::ResetOrAborted {
        "connection_reset"
    } else {
        "peer_dead"
    };
    info!(
        event,
        client = %dead.client,
        server = %dead.server,
        cause,
        idle_ms = dead.idle.map(millis),
        bytes_received = dead.bytes_received,
        reason = %dead.reason(),
        "a watched connection ended"
    );
}

pub fn lifecycle_unavailable(why: &str) {
    warn!(
        event = "lifecycle_unavailable",
        error = why,
        "no connected/peer_closed/peer_dead events: the sock_ops program could not attach"
    );
}

pub fn sample_failed(error: &anyhow::Error) {
    warn!(event = "sample_failed", error = %format!("{error:#}"), "could not sample timed connections");
}

pub fn bad_record(error: &anyhow::Error) {
    warn!(event = "bad_record", error = %error, "skipped a ring buffer record");
}

pub fn counters(counters: Result<Vec<(Counter, u64)>>) {
    let counters = match counters {
        Ok(counters) => counters,
        Err(e) => {
            warn!(event = "counters_unavailable", error = %e, "could not read counters");
            return;
        }
    };
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
        timers_applied = get(Counter::TimersApplied),
        timers_failed = get(Counter::TimersFailed),
        abrupt_closes = get(Counter::AbruptCloses),
        lifecycle_lost = get(Counter::LifecycleLost),
        "classifier counters"
    );
}

/// `5000:keepalive=5s/1s/3+user_timeout=10000ms`: one port's timers in one word.
fn describe_timers(port: u16, timers: &PortTimerConfig) -> String {
    let mut parts = Vec::new();
    if let Some(k) = timers.keepalive {
        parts.push(format!(
            "keepalive={}s/{}s/{}",
            k.idle.as_secs(),
            k.interval.as_secs(),
            k.count
        ));
    }
    if let Some(t) = timers.user_timeout {
        parts.push(format!("user_timeout={}ms", t.as_millis()));
    }
    if timers.include_active {
        parts.push("active".into());
    }
    format!("{port}:{}", parts.join("+"))
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

fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}
