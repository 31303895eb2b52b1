//! End-to-end test bed for watchdog.
//!
//! Recreates the seed's failure for real, on this kernel: a server namespace and a client
//! namespace joined by veth ([`netns`]), a server that only reads ([`legacy_server`]), a client
//! that always uses port 1025 and dies without a FIN or RST ([`dumb_client`]), frame capture and
//! replay for old duplicate SYNs ([`raw`]), and the real agent binary ([`agent`]). Everything
//! needs root ([`privilege`]). Used by `tests/e2e.rs` and by `cargo xtask demo`.

pub mod agent;
pub mod dumb_client;
pub mod legacy_server;
pub mod netns;
pub mod privilege;
pub mod raw;

pub use agent::{Agent, AgentExit, AgentLine};
pub use dumb_client::{Connection, DumbClient, ReconnectOutcome, connect_healthy};
pub use legacy_server::{Accepted, Bind, CloseHow, Closed, LegacyServer, ServerEvent};
pub use netns::{Family, TestNet, ns_exec, run_in_ns};
pub use privilege::require_root;
pub use raw::{CapturedFrame, SynCapture, SynInfo, parse_syn, send_frame};

/// The errno a reader sees when its socket was destroyed with `SOCK_DESTROY` (`tcp_abort`).
pub const ECONNABORTED: i32 = libc::ECONNABORTED;
