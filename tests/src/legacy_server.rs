//! The seed's server: accepts, then only ever reads, so it never learns that a peer is gone.
//!
//! Because it never writes, a crashed client leaves its socket ESTABLISHED forever; the only
//! way its blocked read ends is the watchdog's `SOCK_DESTROY` (read fails with `ECONNABORTED`).
//! Every accept and every end of a connection is recorded with a timestamp for the tests.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns::{Family, TestNet, run_in_ns};

/// How often blocked threads look at the stop flag.
const POLL_MS: i32 = 50;

/// Which address the server listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bind {
    /// The server's IPv4 address, `10.248.N.1`.
    V4,
    /// The server's IPv6 address, `fd00:248:N::1`.
    V6,
    /// `[::]` with `IPV6_V6ONLY` off: IPv4 clients appear as IPv4-mapped IPv6 peers.
    DualStack,
}

/// How a reader's connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseHow {
    /// `read` returned 0: the peer's FIN.
    Eof,
    /// `read` failed with this errno; `SOCK_DESTROY` gives `ECONNABORTED` (103).
    Error(i32),
}

/// Something that happened on the server. Peers are canonical: IPv4-mapped IPv6 addresses of a
/// dual-stack server are given as plain IPv4.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    Accepted {
        /// Per-server connection number, in accept order.
        id: u64,
        peer: SocketAddr,
        at: Instant,
    },
    Closed {
        id: u64,
        peer: SocketAddr,
        how: CloseHow,
        /// Bytes read over the connection's life.
        bytes: u64,
        at: Instant,
    },
}

/// An accepted connection, as returned by [`LegacyServer::wait_accepted`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub id: u64,
    pub peer: SocketAddr,
    pub at: Instant,
}

/// The end of a connection, as returned by [`LegacyServer::wait_closed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Closed {
    pub id: u64,
    pub peer: SocketAddr,
    pub how: CloseHow,
    pub bytes: u64,
    pub at: Instant,
}

#[derive(Default)]
struct State {
    events: Vec<ServerEvent>,
    /// Live byte counters of open connections, by id.
    open: HashMap<u64, Arc<AtomicU64>>,
    next_id: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking reader thread must not hide the log from the test.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `pick` finds something in the state, or `timeout` passes.
    fn wait_for<T>(&self, timeout: Duration, pick: impl FnMut(&State) -> Option<T>) -> Option<T> {
        crate::wait::wait_for(&self.state, &self.changed, timeout, pick)
    }
}

/// A listening legacy server in the server namespace; stops its threads on drop.
pub struct LegacyServer {
    local: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl LegacyServer {
    /// Binds `bind` on `port` in `net`'s server namespace, listens, and starts accepting.
    pub fn start(net: &TestNet, bind: Bind, port: u16) -> Result<LegacyServer> {
        let (bind_addr, family_note) = match bind {
            Bind::V4 => (net.server_addr(Family::V4, port), "IPv4"),
            Bind::V6 => (net.server_addr(Family::V6, port), "IPv6"),
            Bind::DualStack => (
                SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
                "dual-stack",
            ),
        };
        let listener = run_in_ns(net.server_ns(), move || {
            let socket = Socket::new(
                Domain::for_address(bind_addr),
                Type::STREAM,
                Some(Protocol::TCP),
            )
            .context("creating listening socket")?;
            socket.set_reuse_address(true).context("SO_REUSEADDR")?;
            if bind == Bind::DualStack {
                socket.set_only_v6(false).context("IPV6_V6ONLY=0")?;
            }
            socket
                .bind(&SockAddr::from(bind_addr))
                .with_context(|| format!("binding {bind_addr}"))?;
            socket.listen(128).context("listen")?;
            socket
                .set_nonblocking(true)
                .context("O_NONBLOCK on listener")?;
            Ok(TcpListener::from(socket))
        })
        .with_context(|| format!("starting {family_note} legacy server on {bind_addr}"))?;
        let local = listener.local_addr().context("listener local_addr")?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name(format!("legacy-accept-{port}"))
            .spawn(move || accept_loop(&listener, &accept_shared))
            .context("spawning accept thread")?;
        Ok(LegacyServer {
            local,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address the listener is bound to (`[::]:port` for dual stack).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// A snapshot of everything that happened so far, in order.
    pub fn events(&self) -> Vec<ServerEvent> {
        self.shared.lock().events.clone()
    }

    /// Waits for the first accepted connection for which `filter` holds.
    pub fn wait_accepted(
        &self,
        filter: impl Fn(&Accepted) -> bool,
        timeout: Duration,
    ) -> Result<Accepted> {
        let found = self.shared.wait_for(timeout, |state| {
            state.events.iter().find_map(|e| match *e {
                ServerEvent::Accepted { id, peer, at } => {
                    let a = Accepted { id, peer, at };
                    filter(&a).then_some(a)
                }
                ServerEvent::Closed { .. } => None,
            })
        });
        match found {
            Some(a) => Ok(a),
            None => bail!(
                "no matching connection accepted by the server on {} within {timeout:?}; events: {:?}",
                self.local,
                self.events()
            ),
        }
    }

    /// Waits for the first connection from `peer` to end.
    pub fn wait_closed(&self, peer: SocketAddr, timeout: Duration) -> Result<Closed> {
        match self
            .shared
            .wait_for(timeout, |state| find_closed(state, |c| c.peer == peer))
        {
            Some(c) => Ok(c),
            None => bail!(
                "no connection from {peer} ended on the server {} within {timeout:?}; events: {:?}",
                self.local,
                self.events()
            ),
        }
    }

    /// Waits for connection `id` to end.
    pub fn wait_closed_id(&self, id: u64, timeout: Duration) -> Result<Closed> {
        match self
            .shared
            .wait_for(timeout, |state| find_closed(state, |c| c.id == id))
        {
            Some(c) => Ok(c),
            None => bail!(
                "connection #{id} did not end on the server {} within {timeout:?}; events: {:?}",
                self.local,
                self.events()
            ),
        }
    }

    /// All connections that ended so far.
    pub fn closed(&self) -> Vec<Closed> {
        let state = self.shared.lock();
        state
            .events
            .iter()
            .filter_map(|e| match *e {
                ServerEvent::Closed {
                    id,
                    peer,
                    how,
                    bytes,
                    at,
                } => Some(Closed {
                    id,
                    peer,
                    how,
                    bytes,
                    at,
                }),
                ServerEvent::Accepted { .. } => None,
            })
            .collect()
    }

    /// Number of accepted connections whose reader is still blocked in `read`.
    pub fn open_connections(&self) -> usize {
        self.shared.lock().open.len()
    }

    /// Whether connection `id` is still open on the server.
    pub fn is_open(&self, id: u64) -> bool {
        self.shared.lock().open.contains_key(&id)
    }

    /// Bytes read so far on connection `id` (live while open, final once closed).
    pub fn bytes_received(&self, id: u64) -> Option<u64> {
        let state = self.shared.lock();
        if let Some(counter) = state.open.get(&id) {
            return Some(counter.load(Ordering::Relaxed));
        }
        find_closed(&state, |c| c.id == id).map(|c| c.bytes)
    }

    /// Waits until connection `id` has read at least `at_least` bytes in total.
    pub fn wait_bytes(&self, id: u64, at_least: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.bytes_received(id).unwrap_or(0);
            if now >= at_least {
                return Ok(now);
            }
            if Instant::now() >= deadline {
                bail!(
                    "connection #{id} read {now} bytes, expected at least {at_least} within {timeout:?}"
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for LegacyServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

fn find_closed(state: &State, want: impl Fn(&Closed) -> bool) -> Option<Closed> {
    state.events.iter().find_map(|e| match *e {
        ServerEvent::Closed {
            id,
            peer,
            how,
            bytes,
            at,
        } => {
            let c = Closed {
                id,
                peer,
                how,
                bytes,
                at,
            };
            want(&c).then_some(c)
        }
        ServerEvent::Accepted { .. } => None,
    })
}

/// Waits up to [`POLL_MS`] for `fd` to become readable; true if it did (or has an error/hangup).
fn poll_readable(fd: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
    rc > 0
}

/// Accepts until stopped; each connection gets its own reader thread. Joins them all on stop.
fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut readers = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        if !poll_readable(listener.as_raw_fd()) {
            continue;
        }
        let (stream, peer) = match listener.accept() {
            Ok(pair) => pair,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                eprintln!("legacy server: accept failed: {e}");
                thread::sleep(Duration::from_millis(POLL_MS as u64));
                continue;
            }
        };
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let bytes = Arc::new(AtomicU64::new(0));
        let id = {
            let mut state = shared.lock();
            let id = state.next_id;
            state.next_id += 1;
            state.open.insert(id, Arc::clone(&bytes));
            state.events.push(ServerEvent::Accepted {
                id,
                peer,
                at: Instant::now(),
            });
            id
        };
        shared.changed.notify_all();
        let reader_shared = Arc::clone(shared);
        match thread::Builder::new()
            .name(format!("legacy-reader-{id}"))
            .spawn(move || read_loop(stream, id, peer, &bytes, &reader_shared))
        {
            Ok(handle) => readers.push(handle),
            Err(e) => eprintln!("legacy server: cannot spawn reader for {peer}: {e}"),
        }
    }
    for r in readers {
        let _ = r.join();
    }
}

/// Reads and discards until EOF or error, then records how the connection ended.
/// On stop it returns without recording: the test is over.
fn read_loop(mut stream: TcpStream, id: u64, peer: SocketAddr, bytes: &AtomicU64, shared: &Shared) {
    // Blocking reads, but only after poll says there is something: the stop flag stays visible.
    let _ = stream.set_nonblocking(false);
    let mut buf = [0u8; 4096];
    let how = loop {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        if !poll_readable(stream.as_raw_fd()) {
            continue;
        }
        match stream.read(&mut buf) {
            Ok(0) => break CloseHow::Eof,
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break CloseHow::Error(e.raw_os_error().unwrap_or(-1)),
        }
    };
    let at = Instant::now();
    drop(stream);
    {
        let mut state = shared.lock();
        state.open.remove(&id);
        state.events.push(ServerEvent::Closed {
            id,
            peer,
            how,
            bytes: bytes.load(Ordering::Relaxed),
            at,
        });
    }
    shared.changed.notify_all();
}
