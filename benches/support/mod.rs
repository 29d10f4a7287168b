//! Packet builders shared by the benches: IPv4/TCP packets with correct lengths (checksums
//! are not filled in; nothing on the benched path verifies them).

use std::net::Ipv4Addr;

pub use wardgate_common::packet::TcpFlags;

/// IPv4 header (20 bytes, no options) plus TCP header (20 bytes, no options).
pub const HEADERS_LEN: usize = 40;

/// An IPv4/TCP packet of exactly `len` bytes (at least [`HEADERS_LEN`]) from `src:sport` to
/// `dst:dport` with these TCP flags, Don't Fragment set, and a patterned payload.
pub fn tcp_v4(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    flags: u8,
    len: usize,
) -> Vec<u8> {
    let len = len.max(HEADERS_LEN);
    let total = u16::try_from(len).expect("an IPv4 packet is at most 65,535 bytes");
    let mut p = Vec::with_capacity(len);
    // IPv4: version/IHL, DSCP, total length, id, flags (DF) + fragment offset, TTL, protocol,
    // checksum, addresses.
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    // TCP: ports, sequence, acknowledgement, data offset 5, flags, window, checksum, urgent.
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p.extend((0..len - HEADERS_LEN).map(|i| i as u8));
    p
}
