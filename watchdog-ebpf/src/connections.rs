//! Watched connections' lives, and per-port keepalive and user timeout, without touching the
//! server or a sysctl.
//!
//! A `sock_ops` program on a cgroup sees every TCP connection of that cgroup's processes. For a
//! connection of a watched port in the agent's network namespace it
//! * reports its establishment,
//! * switches keepalive on with the port's timers and sets `TCP_USER_TIMEOUT`, when the port has
//!   them — what the legacy server would have done with `setsockopt` had it known how,
//! * asks for state callbacks until it leaves ESTABLISHED, and reports the peer's close
//!   (→ CLOSE_WAIT) and an abrupt end (→ CLOSE: a dead peer, a reset or an abort),
//!
//! all through the `CONNECTIONS` ring buffer. These reports are observations, not decisions:
//! they wake the agent only once [`WAKEUP_BYTES`] are waiting (it drains them on a timer
//! otherwise), so a busy watched port costs no wake-up, no inter-processor interrupt, per
//! connection. A report the full ring cannot take is counted (`lifecycle_lost`), never silent.
use core::{
    ffi::c_void,
    ptr::{addr_of, read_volatile},
};

use aya_ebpf::{
    Global,
    bindings::{
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT,
        BPF_TCP_ESTABLISHED, bpf_sock_ops,
    },
    helpers::{bpf_get_netns_cookie, bpf_ktime_get_ns, bpf_setsockopt},
    macros::{map, sock_ops},
    maps::{HashMap, RingBuf},
    programs::SockOpsContext,
};
use watchdog_common::{ConnectionEvent, Counter, PortTimers, connection_event, ipv4_mapped};

use crate::{WATCHED_PORTS, count};

/// Set by the loader: the agent's network namespace cookie.
#[unsafe(no_mangle)]
static TIMERS_NETNS_COOKIE: Global<u64> = Global::new(0);

/// Watched port (host byte order) → its timers; ports without timers are absent.
#[map(name = "PORT_TIMERS")]
static PORT_TIMERS: HashMap<u16, PortTimers> = HashMap::with_max_entries(1024, 0);

/// About 11,000 reports: what a mass reconnect of a site's clients produces at once.
#[map(name = "CONNECTIONS")]
static CONNECTIONS: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

/// Reports waiting before one wakes the agent (a quarter of the ring).
const WAKEUP_BYTES: u64 = 256 * 1024;

const SOL_SOCKET: i32 = 1;
const SO_KEEPALIVE: i32 = 9;
const SOL_TCP: i32 = 6;
const TCP_KEEPIDLE: i32 = 4;
const TCP_KEEPINTVL: i32 = 5;
const TCP_KEEPCNT: i32 = 6;
const TCP_USER_TIMEOUT: i32 = 18;
const AF_INET: u32 = 2;

#[sock_ops]
pub fn watched_connections(ctx: SockOpsContext) -> u32 {
    // SAFETY: helper valid for sock_ops contexts.
    if unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) } != TIMERS_NETNS_COOKIE.load() {
        return 1;
    }
    let snapshot = Snapshot::read(ctx.ops);
    match snapshot.op {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            if WATCHED_PORTS.get_ptr(snapshot.local_port).is_some() {
                apply_timers(&ctx, snapshot.local_port);
                follow(&ctx, &snapshot, connection_event::ESTABLISHED, false);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let timed_active = PORT_TIMERS
                .get_ptr(snapshot.remote_port)
                // SAFETY: a live map value.
                .is_some_and(|t| unsafe { (*t).include_active } != 0);
            if timed_active {
                apply_timers(&ctx, snapshot.remote_port);
                follow(&ctx, &snapshot, connection_event::ESTABLISHED, true);
            }
        }
        // Only followed connections get state callbacks, and only until they leave
        // ESTABLISHED: the rest of a close (FIN_WAIT2, TIME_WAIT, LAST_ACK …) tells nothing
        // more, and each callback costs every connection of a busy port.
        BPF_SOCK_OPS_STATE_CB if snapshot.args[0] == BPF_TCP_ESTABLISHED => {
            stop_following(&ctx);
            match snapshot.args[1] {
                BPF_TCP_CLOSE_WAIT => {
                    report(&snapshot, connection_event::PEER_CLOSED, is_active(&snapshot));
                }
                BPF_TCP_CLOSE => {
                    count(Counter::AbruptCloses);
                    report(&snapshot, connection_event::ABRUPT_CLOSE, is_active(&snapshot));
                }
                _ => {}
            }
        }
        _ => {}
    }
    1
}

/// Whether a followed connection is one this host opened (its local port is not watched).
#[inline(always)]
fn is_active(snapshot: &Snapshot) -> bool {
    WATCHED_PORTS.get_ptr(snapshot.local_port).is_none()
}

/// The context fields this program uses, read once with volatile loads: the verifier accepts
/// only `ctx + constant` loads, and LLVM would otherwise keep a computed field address in a
/// register and load through it later.
struct Snapshot {
    op: u32,
    args: [u32; 2],
    family: u32,
    local4: u32,
    remote4: u32,
    local6: [u32; 4],
    remote6: [u32; 4],
    local_port: u16,
    remote_port: u16,
    bytes_received: u64,
    packets_out: u32,
    total_retrans: u32,
    data_segs_in: u32,
}

impl Snapshot {
    #[inline(always)]
    fn read(ops: *mut bpf_sock_ops) -> Self {
        // SAFETY: `ops` is the live context; each read is of one of its fields.
        unsafe {
            let args = addr_of!((*ops).__bindgen_anon_1.args) as *const u32;
            Snapshot {
                op: read_volatile(addr_of!((*ops).op)),
                args: [read_volatile(args), read_volatile(args.add(1))],
                family: read_volatile(addr_of!((*ops).family)),
                local4: read_volatile(addr_of!((*ops).local_ip4)),
                remote4: read_volatile(addr_of!((*ops).remote_ip4)),
                local6: read_volatile(addr_of!((*ops).local_ip6)),
                remote6: read_volatile(addr_of!((*ops).remote_ip6)),
                local_port: read_volatile(addr_of!((*ops).local_port)) as u16,
                // Network byte order in the upper 16 bits.
                remote_port: u16::from_be(
                    (read_volatile(addr_of!((*ops).remote_port)) >> 16) as u16,
                ),
                bytes_received: read_volatile(addr_of!((*ops).bytes_received)),
                packets_out: read_volatile(addr_of!((*ops).packets_out)),
                total_retrans: read_volatile(addr_of!((*ops).total_retrans)),
                data_segs_in: read_volatile(addr_of!((*ops).data_segs_in)),
            }
        }
    }
}

/// Sets the port's timers, if it has any.
fn apply_timers(ctx: &SockOpsContext, port: u16) {
    let Some(timers) = PORT_TIMERS.get_ptr(port) else {
        return;
    };
    // SAFETY: a live map value.
    let timers = unsafe { *timers };
    let mut ok = true;
    if timers.keepalive_idle_s != 0 {
        ok &= set(ctx, SOL_SOCKET, SO_KEEPALIVE, 1);
        ok &= set(ctx, SOL_TCP, TCP_KEEPIDLE, timers.keepalive_idle_s);
        if timers.keepalive_interval_s != 0 {
            ok &= set(ctx, SOL_TCP, TCP_KEEPINTVL, timers.keepalive_interval_s);
        }
        if timers.keepalive_count != 0 {
            ok &= set(ctx, SOL_TCP, TCP_KEEPCNT, timers.keepalive_count);
        }
    }
    if timers.user_timeout_ms != 0 {
        ok &= set(ctx, SOL_TCP, TCP_USER_TIMEOUT, timers.user_timeout_ms);
    }
    count(if ok {
        Counter::TimersApplied
    } else {
        Counter::TimersFailed
    });
}

/// Reports the connection's establishment and asks for its state changes.
fn follow(ctx: &SockOpsContext, snapshot: &Snapshot, kind: u8, active: bool) {
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    let _ = ctx.set_cb_flags(flags as i32);
    report(snapshot, kind, active);
}

/// No more state callbacks for this connection.
fn stop_following(ctx: &SockOpsContext) {
    let flags = ctx.cb_flags() & !BPF_SOCK_OPS_STATE_CB_FLAG;
    let _ = ctx.set_cb_flags(flags as i32);
}

#[inline(always)]
fn set(ctx: &SockOpsContext, level: i32, name: i32, value: u32) -> bool {
    let mut value = value as i32;
    // SAFETY: `value` is a valid int for the duration of the call.
    let rc = unsafe {
        bpf_setsockopt(
            ctx.ops as *mut c_void,
            level,
            name,
            &mut value as *mut i32 as *mut c_void,
            size_of::<i32>() as i32,
        )
    };
    rc == 0
}

fn report(snapshot: &Snapshot, kind: u8, active: bool) {
    let Some(mut entry) = CONNECTIONS.reserve::<ConnectionEvent>(0) else {
        count(Counter::LifecycleLost);
        return;
    };
    let (local, remote) = if snapshot.family == AF_INET {
        (
            ipv4_mapped(snapshot.local4.to_ne_bytes()),
            ipv4_mapped(snapshot.remote4.to_ne_bytes()),
        )
    } else {
        (
            words_to_bytes(snapshot.local6),
            words_to_bytes(snapshot.remote6),
        )
    };
    entry.write(ConnectionEvent {
        // SAFETY: helper without preconditions.
        seen_ns: unsafe { bpf_ktime_get_ns() },
        bytes_received: snapshot.bytes_received,
        remote_addr: remote,
        local_addr: local,
        remote_port: snapshot.remote_port,
        local_port: snapshot.local_port,
        family: snapshot.family as u8,
        active: u8::from(active),
        kind,
        _pad: 0,
        packets_out: snapshot.packets_out,
        total_retrans: snapshot.total_retrans,
        data_segs_in: snapshot.data_segs_in,
        _pad2: 0,
    });
    let wakeup = if CONNECTIONS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wakeup as u64);
}

#[inline(always)]
fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[4 * i] = b[0];
        out[4 * i + 1] = b[1];
        out[4 * i + 2] = b[2];
        out[4 * i + 3] = b[3];
        i += 1;
    }
    out
}
