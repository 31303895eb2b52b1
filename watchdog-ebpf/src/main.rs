//! The watchdog's kernel side: one TC ingress classifier.
//!
//! For every packet it asks one cheap question — is this a SYN (without ACK) to a watched port?
//! Only then does it parse further and look the 4-tuple up in the kernel's socket tables. If an
//! ESTABLISHED socket already owns that tuple, the client has come back after a crash and the
//! kernel is about to answer with a challenge ACK (RFC 5961) that a legacy client never
//! understands; the classifier reports the SYN through the `EVENTS` ring buffer and the agent
//! destroys the stale socket.
//!
//! The classifier never changes or drops a packet: it always returns `TC_ACT_UNSPEC` (TCX
//! "next"), so other TC programs on the interface run as before and, with no agent reading the
//! ring buffer, traffic flows exactly as if the watchdog were not installed.
#![no_std]
#![no_main]

mod packet;
mod socket;

use aya_ebpf::{
    Global,
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{HashMap, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::TcContext,
};
use watchdog_common::{Counter, StaleSynEvent, classifier_action};

use crate::packet::Syn;

/// Set by the loader: 1 when only clients in `CLIENT_PREFIXES` are watched.
#[unsafe(no_mangle)]
static CLIENT_FILTER_ENABLED: Global<u8> = Global::new(0);

/// Stale SYN reports for the agent. 256 KiB holds over 3,000 events.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Watched local ports (host byte order) → 1.
#[map(name = "WATCHED_PORTS")]
static WATCHED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// Watched client prefixes over IPv4-mapped IPv6 addresses → 1.
#[map(name = "CLIENT_PREFIXES")]
static CLIENT_PREFIXES: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(1024, BPF_F_NO_PREALLOC);

#[classifier]
pub fn stale_syn_classifier(ctx: TcContext) -> i32 {
    count(Counter::PacketsSeen);
    if let Some(syn) = packet::parse_syn(&ctx)
        && is_watched(&syn)
    {
        check_syn(&ctx, &syn);
    }
    TC_ACT_UNSPEC
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

fn check_syn(ctx: &TcContext, syn: &Syn) {
    count(Counter::SynsChecked);
    let Some(stale) = socket::lookup_established(ctx, syn) else {
        return;
    };
    if syn.seq == stale.peer_isn {
        // An old duplicate of the connection's own SYN: the kernel's challenge ACK is right.
        count(Counter::OldDuplicateSyns);
        return;
    }
    count(Counter::StaleSyns);
    let Some(mut entry) = EVENTS.reserve::<StaleSynEvent>(0) else {
        count(Counter::RingbufFull);
        return;
    };
    let mut event = StaleSynEvent::ZERO;
    // SAFETY: helper without preconditions.
    event.seen_ns = unsafe { bpf_ktime_get_ns() };
    event.stale_bytes_received = stale.bytes_received;
    event.client_addr = syn.client_addr;
    event.server_addr = syn.server_addr;
    // SAFETY: reading a field of the live `__sk_buff` context.
    event.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    event.syn_seq = syn.seq;
    event.stale_peer_isn = stale.peer_isn;
    event.stale_rcv_nxt = stale.rcv_nxt;
    event.stale_segs_in = stale.segs_in;
    event.client_port = syn.client_port;
    event.server_port = syn.server_port;
    event.ip_version = syn.ip_version;
    event.stale_family = stale.family;
    event.classifier_action = classifier_action::PASSED;
    entry.write(event);
    entry.submit(0);
}

#[inline(always)]
fn count(counter: Counter) {
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
