//! Per-port keepalive and user timeout, without touching the server or a sysctl.
//!
//! A `sock_ops` program on a cgroup sees every TCP connection of that cgroup's processes as it
//! is established. For connections of a watched port (in the agent's network namespace) it
//! switches keepalive on with the configured timers and sets `TCP_USER_TIMEOUT`, exactly what
//! the legacy server would have done with `setsockopt` had it known how. It then asks for state
//! callbacks on that socket and reports an ESTABLISHED → CLOSE transition — the kernel giving up
//! on a dead peer (or a reset, or an abort) — through the `CLOSES` ring buffer.
use core::{
    ffi::c_void,
    ptr::{addr_of, read_volatile},
};

use aya_ebpf::{
    Global,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, BPF_TCP_ESTABLISHED,
    },
    helpers::{bpf_get_netns_cookie, bpf_ktime_get_ns, bpf_setsockopt},
    macros::{map, sock_ops},
    maps::{HashMap, RingBuf},
    programs::SockOpsContext,
};
use watchdog_common::{ConnectionClosed, Counter, PortTimers, ipv4_mapped};

use crate::count;

/// Set by the loader: the agent's network namespace cookie.
#[unsafe(no_mangle)]
static TIMERS_NETNS_COOKIE: Global<u64> = Global::new(0);

/// Watched port (host byte order) → its timers.
#[map(name = "PORT_TIMERS")]
static PORT_TIMERS: HashMap<u16, PortTimers> = HashMap::with_max_entries(1024, 0);

#[map(name = "CLOSES")]
static CLOSES: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

const SOL_SOCKET: i32 = 1;
const SO_KEEPALIVE: i32 = 9;
const SOL_TCP: i32 = 6;
const TCP_KEEPIDLE: i32 = 4;
const TCP_KEEPINTVL: i32 = 5;
const TCP_KEEPCNT: i32 = 6;
const TCP_USER_TIMEOUT: i32 = 18;
const AF_INET: u32 = 2;

#[sock_ops]
pub fn port_timers(ctx: SockOpsContext) -> u32 {
    // SAFETY: helper valid for sock_ops contexts.
    if unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) } != TIMERS_NETNS_COOKIE.load() {
        return 1;
    }
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => apply(&ctx, ctx.local_port() as u16, false),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => apply(&ctx, remote_port(&ctx), true),
        BPF_SOCK_OPS_STATE_CB => report_abrupt_close(&ctx),
        _ => {}
    }
    1
}

/// The peer's port: `remote_port` holds it in network byte order in its upper 16 bits.
#[inline(always)]
fn remote_port(ctx: &SockOpsContext) -> u16 {
    u16::from_be((ctx.remote_port() >> 16) as u16)
}

fn apply(ctx: &SockOpsContext, port: u16, active: bool) {
    let Some(timers) = PORT_TIMERS.get_ptr(port) else {
        return;
    };
    // SAFETY: a live map value.
    let timers = unsafe { *timers };
    if active && timers.include_active == 0 {
        return;
    }
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
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
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

fn report_abrupt_close(ctx: &SockOpsContext) {
    if ctx.arg(0) != BPF_TCP_ESTABLISHED || ctx.arg(1) != BPF_TCP_CLOSE {
        return;
    }
    // Every context field is read once, up front, with volatile loads: the verifier accepts
    // only `ctx + constant` loads, and LLVM would otherwise keep a computed field address in a
    // register and load through it later.
    let ops = ctx.ops;
    // SAFETY: `ops` is the live context; each read is of one of its fields.
    let (family, local4, remote4, local6, remote6, local_port, remote_port_be) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_ip4)),
            read_volatile(addr_of!((*ops).remote_ip4)),
            read_volatile(addr_of!((*ops).local_ip6)),
            read_volatile(addr_of!((*ops).remote_ip6)),
            read_volatile(addr_of!((*ops).local_port)) as u16,
            read_volatile(addr_of!((*ops).remote_port)),
        )
    };
    // SAFETY: as above.
    let (bytes_received, packets_out, total_retrans, data_segs_in) = unsafe {
        (
            read_volatile(addr_of!((*ops).bytes_received)),
            read_volatile(addr_of!((*ops).packets_out)),
            read_volatile(addr_of!((*ops).total_retrans)),
            read_volatile(addr_of!((*ops).data_segs_in)),
        )
    };
    let remote_port = u16::from_be((remote_port_be >> 16) as u16);
    count(Counter::AbruptCloses);
    let Some(mut entry) = CLOSES.reserve::<ConnectionClosed>(0) else {
        return;
    };
    let (local, remote) = if family == AF_INET {
        (
            ipv4_mapped(local4.to_ne_bytes()),
            ipv4_mapped(remote4.to_ne_bytes()),
        )
    } else {
        (words_to_bytes(local6), words_to_bytes(remote6))
    };
    entry.write(ConnectionClosed {
        // SAFETY: helper without preconditions.
        seen_ns: unsafe { bpf_ktime_get_ns() },
        bytes_received,
        remote_addr: remote,
        local_addr: local,
        remote_port,
        local_port,
        family: family as u8,
        active: u8::from(PORT_TIMERS.get_ptr(local_port).is_none()),
        _pad: [0; 2],
        packets_out,
        total_retrans,
        data_segs_in,
        _pad2: 0,
    });
    entry.submit(0);
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
