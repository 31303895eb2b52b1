//! Log output: every decision is one line with a stable `event` field, on stderr for people and
//! log collectors, and — through the [`RecordLayer`] — in the journal, to live followers and in
//! the metrics, whatever `RUST_LOG` says.
//!
//! What comes in bursts is written in a [`Batch`]: its stderr lines and journal records go out
//! in one write each when the batch ends, not one write per line. Bursts are connection
//! lifecycle reports (a busy watched port opens thousands of connections a second) and the
//! records of the stale SYNs the agent acted on in one go (`agent.rs`); a crash can lose the
//! records of that last burst, never those written before it.
use std::{
    cell::RefCell,
    io::{self, Write},
    sync::Arc,
};

use tracing_subscriber::{EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt};

use crate::{
    cli::LogFormat,
    recorder::{RecordLayer, Recorder},
};

/// A batch writes out what it has gathered once it holds this much, to bound its memory.
pub const BATCH_FLUSH_BYTES: usize = 64 * 1024;

thread_local! {
    /// The stderr lines of the [`Batch`] open on this thread, if one is.
    static BATCH: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` level of stderr.
pub fn init(format: LogFormat, recorder: Option<Arc<Recorder>>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr = match format {
        LogFormat::Text => fmt::layer()
            .with_writer(|| Stderr)
            .with_target(false)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .with_writer(|| Stderr)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(stderr.with_filter(filter))
        .with(recorder.map(RecordLayer))
        .init();
}

/// Lines logged on this thread while it is open are written when it is dropped (stderr) and
/// when the recorder is flushed (journal): one write each for a whole burst.
pub struct Batch<'a> {
    recorder: &'a Recorder,
}

impl<'a> Batch<'a> {
    pub fn open(recorder: &'a Recorder) -> Self {
        BATCH.with_borrow_mut(|batch| {
            debug_assert!(batch.is_none(), "batches do not nest");
            *batch = Some(Vec::new());
        });
        Batch { recorder }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if let Some(lines) = BATCH.take() {
            let _ = io::stderr().write_all(&lines);
        }
        self.recorder.flush();
    }
}

/// Whether a [`Batch`] is open on this thread.
pub fn batch_open() -> bool {
    BATCH.with_borrow(Option::is_some)
}

/// Stderr, through the open batch if there is one. `fmt` writes each event with one call.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        BATCH.with_borrow_mut(|batch| match batch {
            Some(lines) => {
                lines.extend_from_slice(buf);
                if lines.len() >= BATCH_FLUSH_BYTES {
                    io::stderr().write_all(lines)?;
                    lines.clear();
                }
                Ok(buf.len())
            }
            None => io::stderr().write(buf),
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}
