//! Every logged event that has an `event` field becomes a record: appended to the journal,
//! sent to live followers (`watchdog events --follow`), counted in the metrics. It is a
//! `tracing` layer, so `report.rs` stays the one place that describes what happened.
use std::{
    sync::{Arc, Mutex},
    time::SystemTime,
};

use serde_json::{Map, Value};
use tokio::sync::broadcast;
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{Layer, layer::Context};

use crate::{journal::Journal, logging, metrics::Metrics};

/// How many records a slow follower may fall behind before it misses some.
const FOLLOW_BACKLOG: usize = 4096;

pub struct Recorder {
    journal: Mutex<Option<Journal>>,
    followers: broadcast::Sender<Arc<str>>,
    pub metrics: Metrics,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Recorder {
            journal: Mutex::new(None),
            followers: broadcast::channel(FOLLOW_BACKLOG).0,
            metrics: Metrics::new(),
        })
    }

    /// From now on, records are also appended to `journal`.
    pub fn set_journal(&self, journal: Journal) {
        *self.journal.lock().unwrap_or_else(|e| e.into_inner()) = Some(journal);
    }

    pub fn follow(&self) -> broadcast::Receiver<Arc<str>> {
        self.followers.subscribe()
    }

    fn record(&self, record: Map<String, Value>) {
        self.metrics.observe(&record);
        let line: Arc<str> = Value::Object(record).to_string().into();
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(journal) = journal.as_mut() {
            let written = if logging::batch_open() {
                journal.queue(&line)
            } else {
                journal.append(&line)
            };
            if let Err(error) = written {
                journal_failed(&error);
            }
        }
        drop(journal);
        let _ = self.followers.send(line);
    }

    /// Writes the journal records queued by a [`logging::Batch`].
    pub fn flush(&self) {
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Err(error)) = journal.as_mut().map(Journal::flush) {
            journal_failed(&error);
        }
    }
}

fn journal_failed(error: &anyhow::Error) {
    // Not through tracing: that would come back here.
    eprintln!("watchdog: journal write failed: {error:#}");
}

/// The `tracing` layer feeding a [`Recorder`].
pub struct RecordLayer(pub Arc<Recorder>);

impl<S: Subscriber> Layer<S> for RecordLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        if !fields.0.contains_key("event") {
            return;
        }
        let mut record = Map::new();
        record.insert(
            "ts".into(),
            Value::String(humantime::format_rfc3339_micros(SystemTime::now()).to_string()),
        );
        record.extend(fields.0);
        self.0.record(record);
    }
}

/// Collects an event's fields as JSON values.
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::Bool(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
}
