//! Checksums, checked only for SYNs whose tuple an ESTABLISHED socket owns, right after the
//! socket lookup: a SYN the kernel will drop for a bad checksum must not be reported as a
//! client coming back. Every other SYN goes to the kernel anyway, so it is not summed.
//!
//! A frame from a sender that offloads its checksum (a local stack through a veth, say) carries
//! only the pseudo-header sum in the TCP checksum field; the kernel trusts such a frame, so the
//! classifier accepts that form too.
use aya_ebpf::programs::TcContext;

use crate::packet::{Syn, ptr_at};

/// Longest TCP segment verified: SYN header and options; SYNs with data are not watched.
const MAX_SEGMENT: usize = 128;
const MAX_IPV4_HEADER: usize = 60;

/// Whether the IPv4 header checksum (for IPv4) and the TCP checksum are right.
#[inline(always)]
pub fn valid(ctx: &TcContext, syn: &Syn) -> bool {
    if syn.ip_version == 4
        && fold(sum_words(
            ctx,
            syn.ip_offset,
            syn.ip_header_len,
            MAX_IPV4_HEADER,
        )) != 0xffff
    {
        return false;
    }
    if syn.segment_len > MAX_SEGMENT {
        return false;
    }
    let pseudo = pseudo_header(syn);
    let segment = sum_words(ctx, syn.segment_offset, syn.segment_len, MAX_SEGMENT);
    if fold(pseudo + segment) == 0xffff {
        return true;
    }
    // Checksum offload: the field holds the folded pseudo-header sum.
    let Some(field) = ptr_at::<[u8; 2]>(ctx, syn.segment_offset + 16) else {
        return false;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let field = u16::from_be_bytes(unsafe { *field });
    field == fold(pseudo) as u16
}

/// The one's-complement sum of the TCP pseudo-header.
#[inline(always)]
fn pseudo_header(syn: &Syn) -> u64 {
    let mut sum: u64 = 6 + syn.segment_len as u64;
    if syn.ip_version == 4 {
        sum += words(&syn.client_addr[12..]) + words(&syn.server_addr[12..]);
    } else {
        sum += words(&syn.client_addr) + words(&syn.server_addr);
    }
    sum
}

#[inline(always)]
fn words(bytes: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u64::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// Sums `len` bytes of the packet from `offset` as big-endian 16-bit words (an odd last byte
/// padded with zero), reading at most `max` bytes.
#[inline(always)]
fn sum_words(ctx: &TcContext, offset: usize, len: usize, max: usize) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < max {
        if i + 1 < len {
            match ptr_at::<[u8; 2]>(ctx, offset + i) {
                // SAFETY: bounds checked by `ptr_at`.
                Some(word) => sum += u64::from(u16::from_be_bytes(unsafe { *word })),
                None => return 0,
            }
        } else if i < len {
            // An odd last byte; a helper read, as the verifier cannot track a 1-byte direct
            // read at a variable offset here.
            match ctx.load::<u8>(offset + i) {
                Ok(byte) => sum += u64::from(byte) << 8,
                Err(_) => return 0,
            }
        } else {
            break;
        }
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u64) -> u64 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum
}
