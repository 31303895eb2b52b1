//! Healthy traffic: peers on ephemeral ports that keep talking to the watched server while a
//! test does something rough to the agent. Whatever happens to the agent, these connections must
//! never notice: they stay open and every byte they send arrives.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::dumb_client::{Connection, connect_healthy};
use crate::legacy_server::{CloseHow, LegacyServer};
use crate::netns::TestNet;

/// What each healthy peer sends per round.
const PING: &[u8] = b"ping\n";
/// How long connecting, accepting and draining may take.
const STEP: Duration = Duration::from_secs(2);

/// `count` connections from ephemeral ports, each sending [`PING`] every `every`, from one
/// sender thread, until [`HealthyTraffic::finish`].
pub struct HealthyTraffic {
    /// The server's connection id of each peer.
    ids: Vec<u64>,
    peers: Vec<SocketAddr>,
    /// Bytes sent so far, per connection.
    sent: Arc<Vec<AtomicU64>>,
    /// The first send error, if any (the sender stops there).
    error: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    /// Returns the connections: dropping them earlier would close them.
    sender: Option<JoinHandle<Vec<Connection>>>,
}

impl HealthyTraffic {
    /// Connects `count` peers to `addr` (served by `server`), waits until the server accepted
    /// each, and starts sending.
    pub fn start(
        net: &TestNet,
        server: &LegacyServer,
        addr: SocketAddr,
        count: usize,
        every: Duration,
    ) -> Result<HealthyTraffic> {
        let mut conns = Vec::with_capacity(count);
        let mut ids = Vec::with_capacity(count);
        let mut peers = Vec::with_capacity(count);
        for _ in 0..count {
            let conn = connect_healthy(net, addr, STEP)?;
            let peer = conn.local_addr();
            ids.push(server.wait_accepted(|a| a.peer == peer, STEP)?.id);
            peers.push(peer);
            conns.push(conn);
        }
        let sent: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
        let error = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (t_sent, t_error, t_stop) = (Arc::clone(&sent), Arc::clone(&error), Arc::clone(&stop));
        let sender = thread::Builder::new()
            .name("healthy-traffic".into())
            .spawn(move || {
                'rounds: while !t_stop.load(Ordering::Relaxed) {
                    for (i, conn) in conns.iter_mut().enumerate() {
                        if let Err(e) = conn.send(PING) {
                            *t_error.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(format!("{e:#}"));
                            break 'rounds;
                        }
                        t_sent[i].fetch_add(PING.len() as u64, Ordering::Relaxed);
                    }
                    thread::sleep(every);
                }
                conns
            })
            .context("spawning the healthy traffic sender")?;
        Ok(HealthyTraffic {
            ids,
            peers,
            sent,
            error,
            stop,
            sender: Some(sender),
        })
    }

    /// The server's connection ids of the healthy peers.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// The healthy peers' addresses.
    pub fn peers(&self) -> &[SocketAddr] {
        &self.peers
    }

    /// Bytes sent so far, per connection.
    pub fn sent(&self) -> Vec<u64> {
        self.sent
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// Bytes the server has read so far, per connection (0 for an unknown id).
    pub fn received(&self, server: &LegacyServer) -> Vec<u64> {
        self.ids
            .iter()
            .map(|&id| server.bytes_received(id).unwrap_or(0))
            .collect()
    }

    fn check_no_error(&self) -> Result<()> {
        if let Some(e) = self
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            bail!("a healthy connection failed to send: {e}");
        }
        Ok(())
    }

    fn check_open(&self, server: &LegacyServer) -> Result<()> {
        for (&id, peer) in self.ids.iter().zip(&self.peers) {
            ensure!(
                server.is_open(id),
                "healthy connection #{id} from {peer} was closed: {:?}",
                server.events()
            );
        }
        Ok(())
    }

    /// Every connection is open, sends without error, and the server's byte count of each
    /// grows within `within` of now.
    pub fn assert_flowing(&self, server: &LegacyServer, within: Duration) -> Result<()> {
        self.check_no_error()?;
        self.check_open(server)?;
        let before = self.received(server);
        let deadline = Instant::now() + within;
        loop {
            let now = self.received(server);
            if now.iter().zip(&before).all(|(n, b)| n > b) {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "healthy traffic stalled: server byte counts {before:?} -> {now:?} within {within:?}"
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.check_no_error()?;
        self.check_open(server)
    }

    /// Stops sending, then checks that no send failed, every connection is still open on the
    /// server and the server read every byte that was sent. Then closes the connections
    /// normally and checks that the server saw each end with a clean EOF after exactly the
    /// bytes sent. Check what else ended on the server before calling this.
    pub fn finish(mut self, server: &LegacyServer) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let conns = self
            .sender
            .take()
            .context("finished twice")?
            .join()
            .map_err(|_| anyhow!("the healthy traffic sender panicked"))?;
        self.check_no_error()?;
        self.check_open(server)?;
        let sent = self.sent();
        for ((&id, &sent), conn) in self.ids.iter().zip(&sent).zip(&conns) {
            ensure!(sent > 0, "the healthy traffic sender never ran");
            server.wait_bytes(id, sent, STEP)?;
            ensure!(
                conn.pending_error()?.is_none(),
                "healthy connection #{id} saw an error on the client side"
            );
        }
        self.check_open(server)?;
        drop(conns);
        for (&id, &sent) in self.ids.iter().zip(&sent) {
            let closed = server.wait_closed_id(id, STEP)?;
            ensure!(
                closed.how == CloseHow::Eof && closed.bytes == sent,
                "healthy connection #{id} ended with {:?} after {} of {sent} bytes",
                closed.how,
                closed.bytes
            );
        }
        Ok(())
    }
}

impl Drop for HealthyTraffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
    }
}
