//! Re-injection on a thread of its own, for bursts of held SYNs.
//!
//! A re-injected SYN runs its whole handshake in the kernel inside the injecting call (about
//! 40 µs on a small VM, more than the look-up and the destroy together). For one SYN that is
//! fastest done at once, on the agent's thread. In a burst (a site's clients rebooting
//! together) the agent would judge and destroy the next stale socket only after it; so while
//! more SYNs are waiting, the agent hands each held SYN to the replayer and goes on, and
//! collects the outcomes before it writes the burst's records. On two CPUs the two overlap.
//!
//! Nothing is lost if the thread is gone: a job it could not take, or did not answer, comes
//! back to the agent, which injects it itself.
use std::{
    sync::mpsc::{self, Receiver, Sender},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{events::since_monotonic, inject::Injector};

/// What became of one held SYN.
pub struct Replay {
    /// The injection method, or why the SYN could not go back.
    pub result: Result<&'static str>,
    pub took: Duration,
    /// From the classifier seeing the SYN to its re-injection.
    pub since_seen: Duration,
}

impl Replay {
    /// A held SYN (seen by the classifier at `seen_ns`) that could not go back.
    pub fn failed(error: anyhow::Error, seen_ns: u64) -> Replay {
        Replay {
            result: Err(error),
            took: Duration::ZERO,
            since_seen: since_monotonic(seen_ns),
        }
    }
}

/// One held SYN to re-inject.
pub struct Job {
    /// The agent's index for it, given back with the outcome.
    pub id: usize,
    pub frame: Vec<u8>,
    pub ifindex: u32,
    /// `CLOCK_MONOTONIC` ns when the classifier saw the SYN.
    pub seen_ns: u64,
}

pub struct Replayer {
    jobs: Option<Sender<Job>>,
    outcomes: Receiver<(usize, Replay)>,
    thread: Option<JoinHandle<()>>,
    /// Ids handed over and not answered yet.
    pending: Vec<usize>,
}

impl Replayer {
    /// Starts the thread, with an injector like `injector`.
    pub fn start(injector: &Injector) -> Result<Self> {
        let injector = injector.duplicate()?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (answer, outcomes) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("replayer".into())
            .spawn(move || {
                for job in queue {
                    let replay = inject(&injector, &job);
                    if answer.send((job.id, replay)).is_err() {
                        break;
                    }
                }
            })
            .context("starting the replayer thread")?;
        Ok(Replayer {
            jobs: Some(jobs),
            outcomes,
            thread: Some(thread),
            pending: Vec::new(),
        })
    }

    /// Hands `job` over; gives it back when the thread is gone.
    pub fn submit(&mut self, job: Job) -> Result<(), Job> {
        let id = job.id;
        match &self.jobs {
            Some(jobs) => jobs.send(job).map_err(|e| e.0)?,
            None => return Err(job),
        }
        self.pending.push(id);
        Ok(())
    }

    /// Waits for every job handed over; returns the outcomes, and the ids of jobs the thread
    /// did not answer (it died), which the caller must inject itself.
    pub fn collect(&mut self) -> (Vec<(usize, Replay)>, Vec<usize>) {
        let mut done = Vec::with_capacity(self.pending.len());
        while !self.pending.is_empty() {
            let Ok((id, replay)) = self.outcomes.recv() else {
                // The thread is gone: what it did not answer was not injected.
                self.jobs = None;
                return (done, std::mem::take(&mut self.pending));
            };
            self.pending.retain(|&p| p != id);
            done.push((id, replay));
        }
        (done, Vec::new())
    }
}

impl Drop for Replayer {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Re-injects one job's frame and times it.
pub fn inject(injector: &Injector, job: &Job) -> Replay {
    let started = Instant::now();
    let result = injector
        .inject(&job.frame, job.ifindex)
        .map(|()| injector.method());
    Replay {
        result,
        took: started.elapsed(),
        since_seen: since_monotonic(job.seen_ns),
    }
}
