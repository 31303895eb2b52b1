//! The persistent journal: every event the agent logs, one JSON object per line, on disk.
//!
//! Files live in one directory: `events.jsonl` is written, `events.1.jsonl` … `events.N.jsonl`
//! are older (higher is older). When the current file passes its size limit it is rotated and
//! the oldest file is removed, so disk use stays below `(keep + 1) × max_file_bytes` and the
//! newest events are never the ones dropped. Each record is appended with one `write` on an
//! `O_APPEND` file (a batch of queued records with one `write` for all): a crash mid-write can
//! leave only the last line torn, and readers skip a line that does not parse.
use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde_json::Value;

/// Where the journal lives unless configured otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/watchdog/journal";
const CURRENT: &str = "events.jsonl";

/// Size limits of the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_file_bytes: u64,
    /// Rotated files kept besides the current one.
    pub keep: usize,
}

impl Default for Limits {
    /// 8 MiB × 5 files: about 100,000 events.
    fn default() -> Self {
        Limits {
            max_file_bytes: 8 * 1024 * 1024,
            keep: 4,
        }
    }
}

pub struct Journal {
    dir: PathBuf,
    limits: Limits,
    file: File,
    /// Bytes in the current file.
    size: u64,
    /// Queued records, not yet written.
    pending: Vec<u8>,
}

impl Journal {
    pub fn open(dir: &Path, limits: Limits) -> Result<Self> {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating the journal directory {}", dir.display()))?;
        let (file, size) = open_current(dir)?;
        Ok(Journal {
            dir: dir.to_owned(),
            limits,
            file,
            size,
            pending: Vec::new(),
        })
    }

    /// Appends one record (a JSON object without newline) and writes it, with whatever was
    /// queued before it.
    pub fn append(&mut self, record: &str) -> Result<()> {
        self.queue(record)?;
        self.flush()
    }

    /// Queues one record for the next [`Journal::flush`]; writes the queue first when it is
    /// large or the record belongs in the next file.
    pub fn queue(&mut self, record: &str) -> Result<()> {
        let len = record.len() as u64 + 1;
        let before = self.size + self.pending.len() as u64;
        if before > 0 && before + len > self.limits.max_file_bytes {
            self.flush()?;
            self.rotate()?;
        } else if self.pending.len() >= crate::logging::BATCH_FLUSH_BYTES {
            self.flush()?;
        }
        self.pending.extend_from_slice(record.as_bytes());
        self.pending.push(b'\n');
        Ok(())
    }

    /// Writes the queued records, with one `write`.
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let written = self
            .file
            .write_all(&self.pending)
            .context("appending to the journal");
        // What could not be written is dropped either way: retrying would write it twice
        // after a partial write.
        self.size += self.pending.len() as u64;
        self.pending.clear();
        written
    }

    fn rotate(&mut self) -> Result<()> {
        self.file.sync_data().context("syncing the journal")?;
        let _ = fs::remove_file(rotated(&self.dir, self.limits.keep));
        for n in (1..self.limits.keep).rev() {
            let _ = fs::rename(rotated(&self.dir, n), rotated(&self.dir, n + 1));
        }
        if self.limits.keep > 0 {
            fs::rename(self.dir.join(CURRENT), rotated(&self.dir, 1))
                .context("rotating the journal")?;
        } else {
            fs::remove_file(self.dir.join(CURRENT)).context("truncating the journal")?;
        }
        let (file, size) = open_current(&self.dir)?;
        self.file = file;
        self.size = size;
        Ok(())
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Opens the current file for appending. A torn last line (a crash mid-write) is closed with
/// a newline first, so the next record starts on a line of its own.
fn open_current(dir: &Path) -> Result<(File, u64)> {
    let path = dir.join(CURRENT);
    let torn = last_byte(&path).is_some_and(|b| b != b'\n');
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening the journal {}", path.display()))?;
    if torn {
        file.write_all(b"\n")
            .context("closing a torn journal line")?;
    }
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((file, size))
}

fn last_byte(path: &Path) -> Option<u8> {
    let mut file = File::open(path).ok()?;
    file.seek(SeekFrom::End(-1)).ok()?;
    let mut byte = [0u8];
    file.read_exact(&mut byte).ok()?;
    Some(byte[0])
}

fn rotated(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("events.{n}.jsonl"))
}

/// Every readable record in `dir`, oldest first. Torn or foreign lines are skipped.
pub fn read_all(dir: &Path) -> Result<Vec<Value>> {
    if !dir.is_dir() {
        anyhow::bail!(
            "no journal at {} (is the agent running with --journal there?)",
            dir.display()
        );
    }
    let mut files: Vec<(usize, PathBuf)> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?;
            let rank = if name == CURRENT {
                0
            } else {
                name.strip_prefix("events.")?
                    .strip_suffix(".jsonl")?
                    .parse()
                    .ok()?
            };
            Some((rank, path))
        })
        .collect();
    files.sort_by_key(|(rank, _)| std::cmp::Reverse(*rank));
    let mut records = Vec::new();
    for (_, path) in files {
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        for line in BufReader::new(file).lines() {
            let Ok(line) = line else { break };
            if let Ok(value @ Value::Object(_)) = serde_json::from_str::<Value>(&line) {
                records.push(value);
            }
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("watchdog-journal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn rotation_bounds_disk_use_and_keeps_the_newest() {
        let dir = temp_dir("rotate");
        let limits = Limits {
            max_file_bytes: 200,
            keep: 2,
        };
        let mut journal = Journal::open(&dir, limits).unwrap();
        for i in 0..100 {
            journal
                .append(&format!("{{\"event\":\"e\",\"n\":{i}}}"))
                .unwrap();
        }
        let files = fs::read_dir(&dir).unwrap().count();
        assert_eq!(files, 3);
        let total: u64 = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 3 * 200, "{total} bytes");
        let records = read_all(&dir).unwrap();
        let numbers: Vec<u64> = records.iter().map(|r| r["n"].as_u64().unwrap()).collect();
        assert_eq!(*numbers.last().unwrap(), 99, "the newest record survives");
        assert!(
            numbers.windows(2).all(|w| w[0] + 1 == w[1]),
            "oldest first, no gaps"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_last_line_costs_only_itself_and_survives_a_reopen() {
        let dir = temp_dir("torn");
        let mut journal = Journal::open(&dir, Limits::default()).unwrap();
        journal.append("{\"event\":\"a\"}").unwrap();
        journal.append("{\"event\":\"b\"}").unwrap();
        drop(journal);
        // A crash in the middle of a write.
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.join(CURRENT))
            .unwrap();
        file.write_all(b"{\"event\":\"c\",\"tr").unwrap();
        drop(file);
        let events: Vec<String> = read_all(&dir)
            .unwrap()
            .iter()
            .map(|r| r["event"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(events, ["a", "b"]);
        let mut journal = Journal::open(&dir, Limits::default()).unwrap();
        journal.append("{\"event\":\"d\"}").unwrap();
        let events: Vec<String> = read_all(&dir)
            .unwrap()
            .iter()
            .map(|r| r["event"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(events, ["a", "b", "d"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
