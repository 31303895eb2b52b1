//! Actions on a stale socket. Today one: destroy it through sock_diag.
use std::{io, time::Duration, time::Instant};

use crate::{
    events::StaleSyn,
    sock_diag::{SockDiag, TCP_ESTABLISHED, unmap},
};

#[derive(Debug)]
pub enum DestroyOutcome {
    /// The stale socket is gone; the server's blocked `recv()` returns ECONNABORTED.
    Destroyed {
        /// How long the stale socket had received no data, as the kernel reported it.
        idle: Option<Duration>,
        /// Both sock_diag round trips (look-up and destroy).
        took: Duration,
    },
    /// Nothing to destroy any more: the socket closed or changed state after the SYN was seen.
    AlreadyGone(String),
    /// The kernel refused or failed.
    Failed(io::Error),
}

/// Destroys the ESTABLISHED socket that owns the stale SYN's tuple, and nothing else: the
/// socket is looked up first and destroyed by its cookie only if it is still that connection.
pub fn destroy_stale(diag: &mut SockDiag, syn: &StaleSyn) -> DestroyOutcome {
    let started = Instant::now();
    let tuple = syn.stale_tuple();
    let info = match diag.find(&tuple) {
        Ok(Some(info)) => info,
        Ok(None) => return DestroyOutcome::AlreadyGone("no socket owns the tuple".into()),
        Err(e) => return DestroyOutcome::Failed(e),
    };
    if info.state != TCP_ESTABLISHED {
        return DestroyOutcome::AlreadyGone(format!(
            "the tuple's socket is in TCP state {}, not ESTABLISHED",
            info.state
        ));
    }
    if unmap(info.remote) != syn.client || unmap(info.local) != syn.server {
        return DestroyOutcome::AlreadyGone(format!(
            "the kernel returned another socket ({} ↔ {})",
            info.local, info.remote
        ));
    }
    match diag.destroy(&tuple, info.cookie) {
        Ok(()) => DestroyOutcome::Destroyed {
            idle: info.idle,
            took: started.elapsed(),
        },
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESTALE)) => {
            DestroyOutcome::AlreadyGone(format!("the socket vanished before the destroy: {e}"))
        }
        Err(e) => DestroyOutcome::Failed(e),
    }
}
