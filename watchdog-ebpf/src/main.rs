//! The watchdog's kernel side: one TC ingress classifier.
//!
//! For every packet it asks one cheap question — is this a SYN (without ACK) to a watched port?
//! Only then does it parse further and look the 4-tuple up in the kernel's socket tables. If an
//! ESTABLISHED socket already owns that tuple, the client has come back after a crash and the
//! kernel is about to answer with a challenge ACK (RFC 5961) that a legacy client never
//! understands; the classifier reports the SYN through the `EVENTS` ring buffer and the agent
//! destroys the stale socket.
//!
//! In replay mode it also *holds* the stale SYN: it copies the frame into the event and drops
//! it, the agent destroys the stale socket and re-injects the identical SYN, and the listener
//! answers at once instead of after the client's SYN retransmission timer. It holds only while
//! the agent's heartbeat is fresh, and never holds the agent's own re-injections.
//!
//! Every other packet is left alone: the classifier returns `TC_ACT_UNSPEC` (TCX "next"), so
//! other TC programs on the interface run as before and, with no agent alive, traffic flows
//! exactly as if the watchdog were not installed.
#![no_std]
#![no_main]

mod checksum;
mod connections;
mod packet;
mod socket;

use aya_ebpf::{
    Global,
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use watchdog_common::{
    Counter, HEARTBEAT_TIMEOUT_NS, MAX_HELD_PACKET, ReplayKey, StaleSynEvent, TupleKey,
    classifier_action,
};

use crate::{packet::Syn, socket::StaleSocket};

/// Set by the loader: 1 when only clients in `CLIENT_PREFIXES` are watched.
#[unsafe(no_mangle)]
static CLIENT_FILTER_ENABLED: Global<u8> = Global::new(0);

/// Set by the loader: 1 in replay mode, where stale SYNs are held and re-injected by the agent.
#[unsafe(no_mangle)]
static HOLD_ENABLED: Global<u8> = Global::new(0);

/// Stale SYN reports for the agent. 4 MiB holds about 12,000 events with their packets: a
/// burst of spoofed SYNs is queued and judged, not dropped unreported.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Watched local ports (host byte order) → 1.
#[map(name = "WATCHED_PORTS")]
pub(crate) static WATCHED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// Watched client prefixes over IPv4-mapped IPv6 addresses → 1.
#[map(name = "CLIENT_PREFIXES")]
static CLIENT_PREFIXES: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(1024, BPF_F_NO_PREALLOC);

/// The agent's last heartbeat (`CLOCK_MONOTONIC` ns); SYNs are held only while it is fresh.
#[map(name = "HEARTBEAT")]
static HEARTBEAT: Array<u64> = Array::with_max_entries(1, 0);

/// SYNs the agent re-injects after it could not (or would not) destroy their stale socket.
#[map(name = "REPLAYED")]
static REPLAYED: LruHashMap<ReplayKey, u8> = LruHashMap::with_max_entries(4096, 0);

/// Tuples whose destroy a guard refused → `CLOCK_MONOTONIC` ns until which their SYNs are
/// reported but not held.
#[map(name = "REFUSED")]
static REFUSED: LruHashMap<TupleKey, u64> = LruHashMap::with_max_entries(4096, 0);

#[classifier]
pub fn stale_syn_classifier(ctx: TcContext) -> i32 {
    count(Counter::PacketsSeen);
    if let Some(syn) = packet::parse_syn(&ctx)
        && is_watched(&syn)
    {
        return check_syn(&ctx, &syn);
    }
    TC_ACT_UNSPEC
}

/// Passes every frame it is run on. The agent runs it through `BPF_PROG_RUN` with live frames
/// to hand a held SYN back to the stack on the interface it first arrived on.
#[xdp]
pub fn replay_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

fn is_watched(syn: &Syn) -> bool {
    if WATCHED_PORTS.get_ptr(syn.server_port).is_none() {
        return false;
    }
    CLIENT_FILTER_ENABLED.load() == 0
        || CLIENT_PREFIXES
            .get(Key::new(128, syn.client_addr))
            .is_some()
}

/// Returns the TC verdict: `TC_ACT_SHOT` only for a SYN held for the agent.
fn check_syn(ctx: &TcContext, syn: &Syn) -> i32 {
    count(Counter::SynsChecked);
    let Some(stale) = socket::lookup_established(ctx, syn) else {
        return TC_ACT_UNSPEC;
    };
    // Only the rare SYN that meets an ESTABLISHED socket pays for its checksums.
    if !checksum::valid(ctx, syn) {
        return TC_ACT_UNSPEC;
    }
    if syn.seq == stale.peer_isn {
        // An old duplicate of the connection's own SYN: the kernel's challenge ACK is right.
        count(Counter::OldDuplicateSyns);
        return TC_ACT_UNSPEC;
    }
    count(Counter::StaleSyns);
    let key = syn.replay_key();
    if REPLAYED.get_ptr(key).is_some() {
        // The agent's own re-injection: the kernel decides, as if no watchdog were here.
        let _ = REPLAYED.remove(key);
        count(Counter::ReplaysPassed);
        return TC_ACT_UNSPEC;
    }
    let Some(mut entry) = EVENTS.reserve::<StaleSynEvent>(0) else {
        count(Counter::RingbufFull);
        return TC_ACT_UNSPEC;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned ring buffer record.
    let held = unsafe {
        fill_event(ctx, syn, &stale, event);
        if recently_refused(syn) {
            (*event).classifier_action = classifier_action::BACKED_OFF;
            false
        } else {
            hold_packet(ctx, event)
        }
    };
    entry.submit(0);
    if held {
        count(Counter::Held);
        TC_ACT_SHOT
    } else {
        TC_ACT_UNSPEC
    }
}

/// Writes every field but the packet. The record is written in place: a stack copy of the
/// whole event would not fit the 512-byte BPF stack.
///
/// # Safety
/// `event` must point at a reserved ring buffer record.
#[inline(always)]
unsafe fn fill_event(ctx: &TcContext, syn: &Syn, stale: &StaleSocket, event: *mut StaleSynEvent) {
    // SAFETY: the caller guarantees `event` is valid for writes; `ctx.skb.skb` is the live
    // `__sk_buff`.
    unsafe {
        (*event).seen_ns = bpf_ktime_get_ns();
        (*event).stale_bytes_received = stale.bytes_received;
        (*event).client_addr = syn.client_addr;
        (*event).server_addr = syn.server_addr;
        (*event).ifindex = (*ctx.skb.skb).ifindex;
        (*event).syn_seq = syn.seq;
        (*event).stale_peer_isn = stale.peer_isn;
        (*event).stale_rcv_nxt = stale.rcv_nxt;
        (*event).stale_segs_in = stale.segs_in;
        (*event).client_port = syn.client_port;
        (*event).server_port = syn.server_port;
        (*event).ip_version = syn.ip_version;
        (*event).stale_family = stale.family;
        (*event).classifier_action = classifier_action::PASSED;
        (*event)._pad = 0;
        (*event).packet_len = 0;
        (*event)._pad2 = [0; 2];
    }
}

/// Copies the frame into the event and marks it held, when holding is on, the agent is alive
/// and the frame fits. Returns whether the SYN is held (and must be dropped here).
///
/// # Safety
/// `event` must point at a reserved ring buffer record.
#[inline(always)]
unsafe fn hold_packet(ctx: &TcContext, event: *mut StaleSynEvent) -> bool {
    if HOLD_ENABLED.load() == 0 {
        return false;
    }
    if !agent_alive() {
        count(Counter::HeartbeatStale);
        return false;
    }
    let len = ctx.len() as usize;
    if len == 0 || len > MAX_HELD_PACKET {
        return false;
    }
    // The verifier needs a provably non-zero, bounded length; this form survives LLVM.
    let len = ((len - 1) & (MAX_HELD_PACKET - 1)) + 1;
    // SAFETY: `event` is valid for writes; `packet` has room for `MAX_HELD_PACKET` bytes.
    let copied = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            0,
            (*event).packet.as_mut_ptr() as *mut _,
            len as u32,
        )
    };
    if copied != 0 {
        return false;
    }
    // SAFETY: as above.
    unsafe {
        (*event).packet_len = len as u16;
        (*event).classifier_action = classifier_action::HELD;
    }
    true
}

/// Whether the agent refused to destroy this tuple's socket a moment ago: its SYNs are still
/// reported, but go on to the kernel instead of being held and re-injected one by one.
#[inline(always)]
fn recently_refused(syn: &Syn) -> bool {
    let Some(until) = REFUSED.get_ptr(syn.tuple()) else {
        return false;
    };
    // SAFETY: helper without preconditions; `until` points at a live map value.
    unsafe { bpf_ktime_get_ns() < *until }
}

/// Whether the agent refreshed its heartbeat within [`HEARTBEAT_TIMEOUT_NS`].
#[inline(always)]
fn agent_alive() -> bool {
    let Some(beat) = HEARTBEAT.get(0) else {
        return false;
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    *beat != 0 && now.wrapping_sub(*beat) < HEARTBEAT_TIMEOUT_NS
}

#[inline(always)]
pub(crate) fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot; this program is the only writer on this CPU.
        unsafe { *value += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
