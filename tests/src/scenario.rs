//! The seed's scenario as steps, shared by the end-to-end tests and `cargo xtask demo`: the DOS
//! box connects from its fixed port, sends a little, runs a while and crashes.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::dumb_client::DumbClient;
use crate::legacy_server::{Accepted, LegacyServer};

/// The legacy server's port, the one the agent watches.
pub const SERVER_PORT: u16 = 5000;
/// The DOS box's fixed source port.
pub const FIXED_PORT: u16 = 1025;
/// What the client sends before it crashes.
pub const GREETING: &[u8] = b"telescope status: tracking\n";

/// How long a step of the set-up may take (connect, accept, read).
const STEP: Duration = Duration::from_secs(2);

/// What [`establish_and_crash_after`] left behind.
#[derive(Clone, Copy, Debug)]
pub struct Crash {
    /// The server's connection, now stale: ESTABLISHED with a peer that is gone.
    pub stale: Accepted,
    /// When the client's `connect` returned.
    pub connected_at: Instant,
    /// When the client died.
    pub crashed_at: Instant,
}

/// Connects the dumb client, sends [`GREETING`], waits until the server has read it, then
/// crashes the client at once. Returns the server's now stale connection.
pub fn establish_and_crash(server: &LegacyServer, client: &DumbClient) -> Result<Accepted> {
    Ok(establish_and_crash_after(server, client, Duration::ZERO)?.stale)
}

/// Like [`establish_and_crash`], but the client crashes `uptime` after it connected. It sends
/// only right after connecting, so the stale socket is idle from then on.
pub fn establish_and_crash_after(
    server: &LegacyServer,
    client: &DumbClient,
    uptime: Duration,
) -> Result<Crash> {
    let mut conn = client.connect(STEP)?;
    let connected_at = Instant::now();
    conn.send(GREETING)?;
    let peer = client.local_addr();
    let stale = server.wait_accepted(|a| a.peer == peer, STEP)?;
    server.wait_bytes(stale.id, GREETING.len() as u64, STEP)?;
    thread::sleep(uptime.saturating_sub(connected_at.elapsed()));
    conn.crash()?;
    Ok(Crash {
        stale,
        connected_at,
        crashed_at: Instant::now(),
    })
}
