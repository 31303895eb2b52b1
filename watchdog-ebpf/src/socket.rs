//! Socket lookup: does an ESTABLISHED socket already own the SYN's 4-tuple?
use core::{ffi::c_void, mem};

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, BPF_TCP_ESTABLISHED, bpf_sock, bpf_sock_tuple},
    helpers::{bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_sock},
    programs::TcContext,
};

use crate::packet::Syn;

/// What the classifier can learn about the stale socket while it holds a reference.
pub struct StaleSocket {
    /// `AF_INET` or `AF_INET6` (the latter for IPv4 peers of a dual-stack listener).
    pub family: u8,
    /// The client's initial sequence number on this connection.
    pub peer_isn: u32,
    pub rcv_nxt: u32,
    pub segs_in: u32,
    pub bytes_received: u64,
}

/// Looks the SYN's tuple up in the current network namespace; `Some` only for an ESTABLISHED
/// TCP socket. Listeners, request and TIME-WAIT sockets are the kernel's business.
#[inline(always)]
pub fn lookup_established(ctx: &TcContext, syn: &Syn) -> Option<StaleSocket> {
    // SAFETY: zeroed POD union.
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    let tuple_size = if syn.ip_version == 4 {
        // SAFETY: writing plain fields of the union's IPv4 member.
        let v4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        v4.saddr = u32::from_ne_bytes(tail4(&syn.client_addr));
        v4.daddr = u32::from_ne_bytes(tail4(&syn.server_addr));
        v4.sport = syn.ports_be[0];
        v4.dport = syn.ports_be[1];
        mem::size_of_val(v4)
    } else {
        // SAFETY: writing plain fields of the union's IPv6 member.
        let v6 = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        v6.saddr = words(&syn.client_addr);
        v6.daddr = words(&syn.server_addr);
        v6.sport = syn.ports_be[0];
        v6.dport = syn.ports_be[1];
        mem::size_of_val(v6)
    };
    // SAFETY: `tuple` is a valid tuple of `tuple_size` bytes; the reference is released below.
    let sk: *mut bpf_sock = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut c_void,
            &mut tuple,
            tuple_size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a non-null, referenced `sock_common`.
    let stale = unsafe { read_if_established(sk) };
    // SAFETY: releases the reference taken by the lookup, on every path.
    unsafe { bpf_sk_release(sk as *mut c_void) };
    stale
}

/// # Safety
/// `sk` must be a referenced socket returned by a lookup helper.
#[inline(always)]
unsafe fn read_if_established(sk: *mut bpf_sock) -> Option<StaleSocket> {
    // SAFETY: `state` and `family` are readable on any `sock_common`.
    let (state, family) = unsafe { ((*sk).state, (*sk).family) };
    if state != BPF_TCP_ESTABLISHED {
        return None;
    }
    // SAFETY: `sk` is valid; the helper returns NULL for anything but a full TCP socket.
    let tp = unsafe { bpf_tcp_sock(sk) };
    if tp.is_null() {
        return None;
    }
    // SAFETY: non-null `bpf_tcp_sock` derived from the referenced `sk`.
    let (rcv_nxt, bytes_received, segs_in) =
        unsafe { ((*tp).rcv_nxt, (*tp).bytes_received, (*tp).segs_in) };
    Some(StaleSocket {
        family: family as u8,
        // rcv_nxt = ISN + 1 (the SYN) + every payload byte received; no FIN in ESTABLISHED.
        peer_isn: rcv_nxt.wrapping_sub(1).wrapping_sub(bytes_received as u32),
        rcv_nxt,
        segs_in,
        bytes_received,
    })
}

#[inline(always)]
fn tail4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[12], addr[13], addr[14], addr[15]]
}

#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        out[i] = u32::from_ne_bytes([
            addr[4 * i],
            addr[4 * i + 1],
            addr[4 * i + 2],
            addr[4 * i + 3],
        ]);
        i += 1;
    }
    out
}
