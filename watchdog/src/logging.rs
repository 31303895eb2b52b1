//! Log output: every decision is one line with a stable `event` field, on stderr for people and
//! log collectors, and — through the [`RecordLayer`] — in the journal, to live followers and in
//! the metrics, whatever `RUST_LOG` says.
use std::sync::Arc;

use tracing_subscriber::{EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt};

use crate::{
    cli::LogFormat,
    recorder::{RecordLayer, Recorder},
};

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` level of stderr.
pub fn init(format: LogFormat, recorder: Option<Arc<Recorder>>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr = match format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .with_writer(std::io::stderr)
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
