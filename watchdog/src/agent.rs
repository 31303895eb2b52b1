//! The agent's run loop: stale SYN events in, decisions and actions out, one log line each.
//!
//! ```text
//! EVENTS ring buffer ──► StaleSyn ──► guard::decide ──► action::destroy_stale ──► log
//!                                                   └─► inject (held SYNs, replay mode)
//! ```
//! It runs on one thread: the sock_diag round trips and the re-injection take well under a
//! millisecond, and one event at a time keeps the log in the order things happened. A burst
//! of queued SYNs (up to 50 ms of work) is acted on first and logged afterwards, in one batch.
//!
//! Fail-open: the agent refreshes a heartbeat map every 100 ms and the classifier holds SYNs
//! only while it is fresh. On SIGINT/SIGTERM the heartbeat is cleared first, the ring buffer
//! drained (every held SYN is re-injected) and only then the classifier detached.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracing::info;
use watchdog_common::{Counter, HEARTBEAT_INTERVAL_NS, classifier_action};

use serde_json::{Value, json};

use crate::{
    action::{self, DestroyOutcome, NotFound},
    classifier::Classifier,
    config::{Mode, RunConfig},
    connections::{self, Connections},
    control,
    events::{StaleSyn, monotonic_ns, since_monotonic},
    guard::{Decision, Guards},
    inject::Injector,
    journal::{self, Journal},
    logging::Batch,
    metrics,
    preflight::{self, KernelFeatures},
    recorder::Recorder,
    replayer::{self, Job, Replay, Replayer},
    report,
    sock_diag::SockDiag,
};

/// Lets a classifier run that read the heartbeat just before it was cleared finish its
/// ring-buffer submit before the final drain.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(20);
/// How long the agent acts on queued stale SYNs before it writes their records and turns to its
/// other duties (timers, control socket, metrics): a site's clients rebooting at once are all
/// back in before any of their log lines is written, and a flood still gets its records out,
/// and the control socket answered, this often.
const ACT_WINDOW: Duration = Duration::from_millis(50);
/// The most stale SYNs whose records one window holds back (about 1.5 MiB).
const MAX_BURST: usize = 4096;
/// Kernel counters of reports a full ring buffer could not take, and what went unreported.
const LOSS_COUNTERS: [(Counter, &str); 2] = [
    (
        Counter::RingbufFull,
        "stale SYNs went to the kernel unreported and unheld",
    ),
    (
        Counter::LifecycleLost,
        "connection lifecycle reports were lost",
    ),
];
/// How often the ring buffers' loss counters are read; an increase is reported.
const OVERFLOW_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How often the lifecycle reports are read when they are few: they wake the agent only when
/// many are waiting (`watchdog-ebpf/src/connections.rs`).
const LIFECYCLE_DRAIN_INTERVAL: Duration = Duration::from_millis(100);
/// How often timed connections' `tcp_info` is sampled, to explain their deaths.
const TIMED_SAMPLE_INTERVAL: Duration = Duration::from_millis(500);
/// How long a refused tuple's SYNs go to the kernel instead of being held.
const REFUSAL_BACKOFF: Duration = Duration::from_secs(1);

pub async fn run(config: RunConfig, recorder: Arc<Recorder>) -> Result<()> {
    preflight::check_capabilities()?;
    let outputs = &config.outputs;
    recorder.set_journal(Journal::open(&outputs.journal, journal::Limits::default())?);
    let control = control::bind(&outputs.control_socket, outputs.control_group.as_deref())?;
    let control_socket_path = outputs.control_socket.clone();
    let metrics = match outputs.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics endpoint {addr}"))?,
        ),
        None => None,
    };
    let features = KernelFeatures::probe()?;
    report::features(&features);
    features.require(config.mode)?;
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
    let connections = classifier.take_connections()?;
    // SAFETY: as for `events`.
    let mut connections =
        unsafe { AsyncFd::register_with_interest(connections, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("polling the connections ring buffer")?;
    let injector = match config.mode {
        Mode::Replay => Some(Injector::probe(
            classifier.replay_program()?,
            config.ifaces[0].index,
        )?),
        Mode::Observe | Mode::Destroy => None,
    };
    let replayer = match &injector {
        Some(injector) => Some(Replayer::start(injector)?),
        None => None,
    };
    let mut agent = Agent {
        recorder: recorder.clone(),
        connections: Connections::new(config.timers.ports.clone()),
        last_beat: Instant::now(),
        last_beat_wall: std::time::SystemTime::now(),
        guards: Guards::new(&config, Instant::now()),
        losses_seen: [0; LOSS_COUNTERS.len()],
        config,
        diag,
        classifier,
        injector,
        replayer,
    };
    agent.beat()?;
    let status = Arc::new(Mutex::new(agent.status(&features, None)));
    tokio::spawn(control::serve(control, recorder.clone(), status.clone()));
    if let Some(listener) = metrics {
        tokio::spawn(metrics::serve_http(listener, recorder.clone()));
    }
    report::attached(
        &agent.config,
        &agent.classifier,
        agent.injector.as_ref().map(Injector::method),
    );
    if let Some(why) = &agent.classifier.lifecycle_unavailable {
        report::lifecycle_unavailable(why);
    }

    let mut heartbeat = tokio::time::interval(Duration::from_nanos(HEARTBEAT_INTERVAL_NS));
    let mut overflow_check = tokio::time::interval(OVERFLOW_CHECK_INTERVAL);
    let mut timed_sample = tokio::time::interval(TIMED_SAMPLE_INTERVAL);
    let mut lifecycle_drain = tokio::time::interval(LIFECYCLE_DRAIN_INTERVAL);
    let timed = agent.connections.timed();
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = heartbeat.tick() => agent.beat()?,
            _ = overflow_check.tick() => {
                let counters = agent.classifier.counters().ok();
                if let Some(counters) = &counters {
                    agent.check_overflow(counters);
                    recorder.metrics.set_kernel_counters(counters);
                }
                *status.lock().unwrap_or_else(|e| e.into_inner()) =
                    agent.status(&features, counters.as_deref());
            }
            _ = timed_sample.tick(), if timed => agent.sample_timed(),
            _ = lifecycle_drain.tick() => agent.drain_connections(connections.get_mut()),
            // A ring buffer wakes its reader only for a record committed while the reader is
            // caught up. A record committed between the last read and `clear_ready` has had
            // its wakeup already; so each drain is followed by one more read after the clear.
            ready = connections.readable_mut() => {
                let mut ready = ready.context("waiting on the connections ring buffer")?;
                agent.drain_connections(ready.get_inner_mut());
                ready.clear_ready();
                agent.drain_connections(ready.get_inner_mut());
            }
            ready = events.readable_mut() => {
                // Lifecycle reports queued before these SYNs come first, so that the journal
                // tells a client's story in the order the kernel saw it.
                agent.drain_connections(connections.get_mut());
                let mut ready = ready.context("waiting on the ring buffer")?;
                // In windows, so that timers, the control socket and the metrics are served
                // during a flood; readiness is cleared only once the ring buffer is empty.
                if agent.drain(ready.get_inner_mut(), ACT_WINDOW) {
                    ready.clear_ready();
                    agent.drain(ready.get_inner_mut(), ACT_WINDOW);
                }
            }
        }
    }

    // Stop holding, let in-flight classifier runs finish, replay what they held, then detach.
    agent.classifier.beat(0)?;
    tokio::time::sleep(SHUTDOWN_GRACE).await;
    while !agent.drain(events.get_mut(), Duration::MAX) {}
    agent.drain_connections(connections.get_mut());
    report::counters(agent.classifier.counters());
    drop(events);
    drop(agent);
    let _ = std::fs::remove_file(&control_socket_path);
    info!(
        event = "detached",
        "watchdog detached; traffic flows as without it"
    );
    Ok(())
}

struct Agent {
    config: RunConfig,
    recorder: Arc<Recorder>,
    guards: Guards,
    connections: Connections,
    last_beat: Instant,
    /// The same moment on the wall clock, for `watchdog status`.
    last_beat_wall: std::time::SystemTime,
    /// [`LOSS_COUNTERS`] as last reported.
    losses_seen: [u64; LOSS_COUNTERS.len()],
    diag: SockDiag,
    classifier: Classifier,
    injector: Option<Injector>,
    /// Re-injects held SYNs while more are waiting (replay mode).
    replayer: Option<Replayer>,
}

impl Agent {
    fn beat(&mut self) -> Result<()> {
        self.classifier.beat(monotonic_ns())?;
        self.last_beat = Instant::now();
        self.last_beat_wall = std::time::SystemTime::now();
        Ok(())
    }

    /// Reports what the kernel could not queue since the last check: stale SYNs that went to
    /// the kernel unreported (and unheld), which is safe but must never be silent, and
    /// lifecycle reports lost to a burst of connections.
    fn check_overflow(&mut self, counters: &[(Counter, u64)]) {
        for (seen, (counter, lost)) in self.losses_seen.iter_mut().zip(LOSS_COUNTERS) {
            let Some(&(_, total)) = counters.iter().find(|(c, _)| *c == counter) else {
                continue;
            };
            if total > *seen {
                report::reports_lost(counter, lost, total - *seen, total);
                *seen = total;
            }
        }
    }

    /// What `watchdog status` shows.
    fn status(&self, features: &KernelFeatures, counters: Option<&[(Counter, u64)]>) -> Value {
        let config = &self.config;
        let counters: serde_json::Map<String, Value> = counters
            .unwrap_or_default()
            .iter()
            .map(|(c, v)| (c.name().to_owned(), Value::from(*v)))
            .collect();
        json!({
            "agent": {
                "pid": std::process::id(),
                "mode": config.mode.to_string(),
                "interfaces": config.ifaces.iter().map(|i| format!("{} (ifindex {})", i.name, i.index)).collect::<Vec<_>>().join(", "),
                "attach": self.classifier.attach_kind,
                "program_id": self.classifier.program_id,
                "replay": self.injector.as_ref().map(Injector::method),
                "ports": config.ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                "clients": config.clients.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                "last_heartbeat": humantime::format_rfc3339_millis(self.last_beat_wall).to_string(),
                "kernel": features.release.clone(),
            },
            "guards": {
                "min_idle_ms": config.guards.min_idle.as_millis() as u64,
                "per_client_limit": config.guards.per_client_limit.to_string(),
                "global_limit": config.guards.global_limit.to_string(),
            },
            "counters": counters,
            "outputs": {
                "journal": config.outputs.journal.display().to_string(),
                "control_socket": config.outputs.control_socket.display().to_string(),
                "metrics": config.outputs.metrics.map(|a| format!("http://{a}/metrics")),
            },
        })
    }

    fn sample_timed(&mut self) {
        if let Err(error) = self.connections.sample(&mut self.diag) {
            report::sample_failed(&error);
        }
    }

    /// Reports every queued lifecycle event, in one [`Batch`]: they are observations, and a
    /// busy port brings thousands at once.
    fn drain_connections(&mut self, ring: &mut RingBuf<MapData>) {
        let _batch = Batch::open(&self.recorder);
        while let Some(record) = ring.next() {
            match connections::decode(&record) {
                Ok(event) => {
                    drop(record);
                    if let Some(story) = self.connections.story(&event) {
                        report::connection(&story);
                    }
                }
                Err(error) => report::bad_record(&error),
            }
        }
    }

    /// Acts on queued stale SYNs for up to `window` (and [`MAX_BURST`] SYNs), then writes their
    /// records together; returns whether the ring buffer is empty. The clients are waiting for
    /// the destroys and the replays, not for the log lines: in a burst (a site's clients
    /// rebooting at once) the last SYN must not wait for every earlier SYN's records as well,
    /// nor for every earlier SYN's handshake: while another SYN waits, a held one is re-injected
    /// by the [`Replayer`] thread. The heartbeat is refreshed along the way: a long backlog (a
    /// SYN flood) must not make the classifier think the agent is gone.
    fn drain(&mut self, ring: &mut RingBuf<MapData>, window: Duration) -> bool {
        let started = Instant::now();
        let mut handled: Vec<Handled> = Vec::new();
        let mut next = read_stale_syn(ring);
        let mut empty = next.is_none();
        while let Some(syn) = next.take() {
            let verdict = self.judge_and_destroy(&syn);
            if handled.len() + 1 < MAX_BURST && started.elapsed() < window {
                next = read_stale_syn(ring);
                empty = next.is_none();
            }
            let replay = held_job(handled.len(), &syn)
                .and_then(|job| self.replay(&syn, job, verdict.socket_is_gone(), next.is_some()));
            handled.push(Handled {
                syn,
                verdict,
                replay,
            });
            if self.last_beat.elapsed() >= Duration::from_nanos(HEARTBEAT_INTERVAL_NS)
                && let Err(error) = self.beat()
            {
                report::map_write_failed(&error);
            }
        }
        self.collect_replays(&mut handled);
        if !handled.is_empty() {
            let _batch = Batch::open(&self.recorder);
            for handled in &handled {
                handled.report();
            }
        }
        empty
    }

    /// Looks the stale socket up, lets the guards judge it and destroys it if they allow.
    fn judge_and_destroy(&mut self, syn: &StaleSyn) -> Verdict {
        if syn.raw.classifier_action == classifier_action::BACKED_OFF {
            return Verdict::Refused {
                kind: "backed_off",
                reason: "backed off: this tuple was refused less than 1 s ago".into(),
                idle: None,
            };
        }
        let started = Instant::now();
        let socket = match action::find_stale(&mut self.diag, syn) {
            Ok(socket) => socket,
            Err(NotFound::Gone(reason)) => return Verdict::AlreadyGone(reason),
            Err(NotFound::Failed(error)) => return Verdict::Failed(error),
        };
        let lookup = started.elapsed();
        if let Decision::Refuse { kind, reason } =
            self.guards
                .decide(&self.config, syn, &socket, Instant::now())
        {
            self.back_off(syn);
            return Verdict::Refused {
                kind,
                reason,
                idle: socket.idle,
            };
        }
        match action::destroy(&mut self.diag, syn, &socket) {
            DestroyOutcome::Destroyed { took } => {
                self.connections
                    .note_own_destroy(syn.server, syn.client, syn.raw.seen_ns);
                Verdict::Destroyed {
                    idle: socket.idle,
                    lookup,
                    destroy: took,
                    since_seen: since_monotonic(syn.raw.seen_ns),
                }
            }
            DestroyOutcome::AlreadyGone(reason) => Verdict::AlreadyGone(reason),
            DestroyOutcome::Failed(error) => Verdict::Failed(error),
        }
    }

    /// After a refusal, the tuple's next SYNs are reported but not held for a while: a flood of
    /// spoofed SYNs against a live connection then costs a look-up each, not a re-injection.
    fn back_off(&mut self, syn: &StaleSyn) {
        let until = monotonic_ns() + REFUSAL_BACKOFF.as_nanos() as u64;
        if let Err(error) = self.classifier.back_off(&syn.raw.tuple(), until) {
            report::map_write_failed(&error);
        }
    }

    /// Re-injects a held SYN, whatever happened to its stale socket: nothing is lost. When the
    /// socket may still be there, the classifier is told first to let this one SYN through.
    /// With `more_waiting` the SYN goes to the replayer thread and `None` is returned; its
    /// outcome comes with [`Agent::collect_replays`] under the job's id.
    fn replay(
        &mut self,
        syn: &StaleSyn,
        job: Job,
        socket_is_gone: bool,
        more_waiting: bool,
    ) -> Option<Replay> {
        if !socket_is_gone
            && let Err(error) = self.classifier.announce_replay(&syn.raw.replay_key())
        {
            // Re-injected unannounced, the SYN would only be held again.
            return Some(Replay::failed(error, syn.raw.seen_ns));
        }
        let job = match self.replayer.as_mut() {
            Some(replayer) if more_waiting => replayer.submit(job).err()?,
            _ => job,
        };
        Some(self.inject_here(&job))
    }

    /// Re-injects on this thread.
    fn inject_here(&self, job: &Job) -> Replay {
        match &self.injector {
            Some(injector) => replayer::inject(injector, job),
            None => Replay::failed(
                anyhow!("a SYN was held but replay is not set up"),
                job.seen_ns,
            ),
        }
    }

    /// Fills in the outcomes of the SYNs handed to the replayer; re-injects here whatever it
    /// did not answer.
    fn collect_replays(&mut self, handled: &mut [Handled]) {
        let Some(replayer) = self.replayer.as_mut() else {
            return;
        };
        let (done, unanswered) = replayer.collect();
        for (id, replay) in done {
            handled[id].replay = Some(replay);
        }
        for id in unanswered {
            if let Some(job) = held_job(id, &handled[id].syn) {
                handled[id].replay = Some(self.inject_here(&job));
            }
        }
    }
}

/// The re-injection job of a held SYN, under `id`; `None` when the SYN was not held.
fn held_job(id: usize, syn: &StaleSyn) -> Option<Job> {
    Some(Job {
        id,
        frame: syn.held_frame()?.to_vec(),
        ifindex: syn.raw.ifindex,
        seen_ns: syn.raw.seen_ns,
    })
}

/// The next stale SYN in the ring buffer; records that do not decode are reported and skipped.
fn read_stale_syn(ring: &mut RingBuf<MapData>) -> Option<StaleSyn> {
    loop {
        let record = ring.next()?;
        match StaleSyn::decode(&record, monotonic_ns()) {
            Ok(syn) => return Some(syn),
            Err(error) => report::bad_record(&error),
        }
    }
}

/// One stale SYN and what the agent did about it, to be reported.
struct Handled {
    syn: StaleSyn,
    verdict: Verdict,
    replay: Option<Replay>,
}

impl Handled {
    fn report(&self) {
        report::stale_syn(&self.syn);
        report::verdict(&self.syn, &self.verdict);
        if let Some(replay) = &self.replay {
            report::replay(&self.syn, replay);
        }
    }
}

/// What became of one stale socket.
pub enum Verdict {
    Destroyed {
        idle: Option<Duration>,
        /// sock_diag look-up.
        lookup: Duration,
        /// sock_diag destroy.
        destroy: Duration,
        /// From the classifier seeing the SYN to the socket being gone.
        since_seen: Duration,
    },
    /// A guard said no.
    Refused {
        kind: &'static str,
        reason: String,
        idle: Option<Duration>,
    },
    /// Nothing to destroy any more.
    AlreadyGone(String),
    /// The kernel failed the look-up or the destroy.
    Failed(std::io::Error),
}

impl Verdict {
    fn socket_is_gone(&self) -> bool {
        matches!(self, Verdict::Destroyed { .. })
    }
}
