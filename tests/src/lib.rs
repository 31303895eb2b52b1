//! End-to-end test bed for watchdog.
//!
//! Recreates the seed's failure for real, on this kernel: a server namespace and a client
//! namespace joined by veth ([`netns`]), a server that only reads ([`legacy_server`]), a client
//! that always uses port 1025 and dies without a FIN or RST ([`dumb_client`]), frame capture and
//! replay for old duplicate SYNs ([`raw`]), the real agent binary ([`agent`]) and what it
//! attaches ([`hooks`]), healthy peers that must never notice the watchdog ([`traffic`]), and the
//! seed's steps ([`scenario`]). Everything needs root ([`privilege`]). Used by `tests/e2e.rs`,
//! `tests/replay.rs`, `tests/cli_errors.rs`, `cargo xtask demo` (`src/bin/demo.rs`) and
//! `cargo xtask bench` (`src/bin/bench.rs`, [`bench`]).

pub mod agent;
pub mod bench;
pub mod dumb_client;
pub mod foreign;
pub mod hooks;
pub mod legacy_server;
pub mod netns;
pub mod privilege;
pub mod raw;
pub mod scenario;
pub mod traffic;
pub mod wait;

pub use agent::{Agent, AgentExit, AgentLine, num_field, str_field};
pub use dumb_client::{Connection, DumbClient, ReconnectOutcome, connect_healthy};
pub use foreign::ForeignProgram;
pub use hooks::{
    assert_nothing_attached, assert_only_program_attached, clsact_ingress_programs, clsact_present,
    ingress_programs, kernel_has_tcx, tcx_ingress_programs,
};
pub use legacy_server::{Accepted, Bind, CloseHow, Closed, LegacyServer, ServerEvent};
pub use netns::{Family, TestNet, ns_exec, run_in_ns, tcp_ext_counters};
pub use privilege::{is_root, require_root};
pub use raw::{CapturedFrame, SynCapture, SynInfo, parse_syn, send_frame};
pub use scenario::{Crash, GREETING, establish_and_crash, establish_and_crash_after};
pub use traffic::HealthyTraffic;

/// The errno a reader sees when its socket was destroyed with `SOCK_DESTROY` (`tcp_abort`).
pub const ECONNABORTED: i32 = libc::ECONNABORTED;

pub mod embedded_client;
pub use embedded_client::{Direction, EmbeddedClient, EmbeddedReconnect, Segment};

pub mod spoof;

pub mod refusal;
