//! The control socket: a Unix socket through which `watchdog status` and
//! `watchdog events --follow` talk to the running agent.
//!
//! One line in (`status` or `follow`), JSON lines out. Access is the socket file's: mode 0660,
//! owned by root and, when configured, by the operators' group — the kernel refuses `connect`
//! to everyone else.
use std::{
    ffi::CString,
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream as StdUnixStream},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader},
    net::{UnixListener, UnixStream},
    sync::broadcast::error::RecvError,
};

use crate::recorder::Recorder;

/// Where the control socket lives unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/watchdog/control.sock";

/// Binds the socket (replacing a stale one) with mode 0660 and the given group.
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if StdUnixStream::connect(path).is_ok() {
            bail!(
                "another agent is listening on the control socket {} (use --control-socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .context("setting the control socket's mode")?;
    if let Some(group) = group {
        let gid = group_id(group)?;
        std::os::unix::fs::chown(path, Some(0), Some(gid))
            .with_context(|| format!("giving the control socket to group {group}"))?;
    }
    Ok(listener)
}

fn group_id(name: &str) -> Result<u32> {
    let c_name = CString::new(name).context("group name")?;
    // SAFETY: valid C string; the returned pointer is read at once (no other getgr* call).
    let group = unsafe { libc::getgrnam(c_name.as_ptr()) };
    if group.is_null() {
        bail!("unknown group {name:?} for --control-group");
    }
    // SAFETY: non-null `struct group`.
    Ok(unsafe { (*group).gr_gid })
}

/// Serves requests until the task is dropped.
pub async fn serve(listener: UnixListener, recorder: Arc<Recorder>, status: Arc<Mutex<Value>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(handle(stream, recorder.clone(), status.clone()));
    }
}

async fn handle(stream: UnixStream, recorder: Arc<Recorder>, status: Arc<Mutex<Value>>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = AsyncBufReader::new(read);
    let request = tokio::time::timeout(Duration::from_secs(2), reader.read_line(&mut line)).await;
    if !matches!(request, Ok(Ok(_))) {
        return;
    }
    match line.trim() {
        "status" => {
            let snapshot = status.lock().unwrap_or_else(|e| e.into_inner()).to_string();
            let _ = write.write_all(format!("{snapshot}\n").as_bytes()).await;
        }
        "follow" => {
            let mut records = recorder.follow();
            loop {
                let line = match records.recv().await {
                    Ok(line) => line.to_string(),
                    Err(RecvError::Lagged(missed)) => {
                        format!("{{\"event\":\"follow_lagged\",\"missed\":{missed}}}")
                    }
                    Err(RecvError::Closed) => return,
                };
                if write
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        other => {
            let _ = write
                .write_all(format!("{{\"error\":\"unknown request {other:?}\"}}\n").as_bytes())
                .await;
        }
    }
}

/// Sends `request` to the agent and returns a reader over its answer.
pub fn request(path: &Path, request: &str) -> Result<BufReader<StdUnixStream>> {
    let mut stream = StdUnixStream::connect(path).with_context(|| {
        format!(
            "connecting to the agent's control socket {} (is the agent running? are you root \
             or in its --control-group?)",
            path.display()
        )
    })?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    Ok(BufReader::new(stream))
}

/// The agent's status as JSON.
pub fn status(path: &Path) -> Result<Value> {
    let mut line = String::new();
    request(path, "status")?
        .read_line(&mut line)
        .context("reading the agent's status")?;
    serde_json::from_str(&line).context("the agent's status is not JSON")
}
