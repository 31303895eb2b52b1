//! `watchdog events` and `watchdog status`: answering "what happened, and why?" from the
//! journal and the running agent.
use std::{
    io::BufRead,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{cli::EventsArgs, control, journal};

/// Which records to show.
struct Filter {
    since: Option<SystemTime>,
    client: Option<IpAddr>,
    port: Option<u16>,
    action: Option<String>,
}

impl Filter {
    fn from_args(args: &EventsArgs) -> Result<Self> {
        let since = match &args.since {
            None => None,
            Some(text) => Some(match humantime::parse_duration(text) {
                Ok(ago) => SystemTime::now() - ago,
                Err(_) => humantime::parse_rfc3339_weak(text).with_context(|| {
                    format!("--since {text:?}: give a duration (`10m`) or a time (`2026-12-03 03:12:00`)")
                })?,
            }),
        };
        Ok(Filter {
            since,
            client: args.client,
            port: args.port,
            action: args.action.clone(),
        })
    }

    fn accepts(&self, record: &Value) -> bool {
        let text = |key: &str| record.get(key).and_then(Value::as_str);
        if let Some(since) = self.since {
            match text("ts").and_then(|ts| humantime::parse_rfc3339(ts).ok()) {
                Some(ts) if ts >= since => {}
                _ => return false,
            }
        }
        if let Some(action) = &self.action
            && text("event") != Some(action.as_str())
        {
            return false;
        }
        let addr = |key: &str| text(key).and_then(|a| a.parse::<SocketAddr>().ok());
        if let Some(client) = self.client
            && addr("client").map(|a| a.ip()) != Some(client)
        {
            return false;
        }
        if let Some(port) = self.port {
            let ports = [addr("server"), addr("client")].map(|a| a.map(|a| a.port()));
            if !ports.contains(&Some(port)) {
                return false;
            }
        }
        true
    }
}

pub fn events(args: &EventsArgs) -> Result<()> {
    let filter = Filter::from_args(args)?;
    let mut printer = Printer::new(args.json);
    if args.follow {
        let reader = control::request(&args.control_socket, "follow")?;
        for line in reader.lines() {
            let line = line.context("reading from the agent")?;
            if let Ok(record) = serde_json::from_str::<Value>(&line)
                && filter.accepts(&record)
            {
                printer.print(&record);
            }
        }
        bail!("the agent closed the connection");
    }
    for record in journal::read_all(&args.journal)? {
        if filter.accepts(&record) {
            printer.print(&record);
        }
    }
    Ok(())
}

/// Prints records as JSON lines or as a table with a header.
struct Printer {
    json: bool,
    header_done: bool,
}

impl Printer {
    fn new(json: bool) -> Self {
        Printer {
            json,
            header_done: false,
        }
    }

    fn print(&mut self, record: &Value) {
        if self.json {
            println!("{record}");
            return;
        }
        if !self.header_done {
            println!(
                "{:<23}  {:<22} {:<22} {:<16} {:>9} {:>10}  REASON",
                "TIME", "CLIENT", "SERVER", "ACTION", "IDLE", "LATENCY"
            );
            self.header_done = true;
        }
        let text = |key: &str| record.get(key).and_then(Value::as_str).unwrap_or("-");
        let number = |key: &str| record.get(key).and_then(Value::as_u64);
        let idle =
            number("idle_ms").map_or("-".into(), |ms| format!("{:.1} s", ms as f64 / 1000.0));
        let latency = number("total_us")
            .or(number("event_latency_us"))
            .or(number("after_stale_syn_us"))
            .map_or("-".into(), |us| format!("{:.2} ms", us as f64 / 1000.0));
        let reason = record
            .get("reason")
            .and_then(Value::as_str)
            .or(record.get("error").and_then(Value::as_str))
            .unwrap_or_else(|| text("message"));
        println!(
            "{:<23}  {:<22} {:<22} {:<16} {:>9} {:>10}  {}",
            local_time(text("ts")),
            text("client"),
            text("server"),
            text("event"),
            idle,
            latency,
            reason
        );
    }
}

/// An RFC 3339 UTC timestamp in the machine's local time zone, to the millisecond.
fn local_time(ts: &str) -> String {
    let Ok(time) = humantime::parse_rfc3339(ts) else {
        return ts.to_owned();
    };
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let t = secs.as_secs() as libc::time_t;
    // SAFETY: `localtime_r` fills the zeroed `tm` from a valid time.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return ts.to_owned();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        secs.subsec_millis()
    )
}

pub fn status(control_socket: &Path, json: bool) -> Result<()> {
    let status = control::status(control_socket)?;
    if json {
        println!("{status}");
        return Ok(());
    }
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    if let Value::Object(map) = &status {
        for (key, value) in map {
            match value {
                Value::Object(inner) => {
                    println!("{key}:");
                    for (k, v) in inner {
                        println!("  {k:<22} {}", text(v));
                    }
                }
                other => println!("{key:<24} {}", text(other)),
            }
        }
    }
    Ok(())
}
