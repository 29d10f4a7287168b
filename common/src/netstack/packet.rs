//! The edge where tunnel bytes become typed packets: just enough parsing to find a packet's
//! flow (and to build the reset for a refused SYN) before smoltcp sees it.

use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpProtocol, IpRepr, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpControl,
    TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket,
};

use super::{PacketError, Protocol};

/// The flags of a TCP segment that decide how the stack routes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub rst: bool,
}

impl TcpFlags {
    /// A connection request: SYN without ACK or RST.
    pub fn is_initial_syn(self) -> bool {
        self.syn && !self.ack && !self.rst
    }
}

/// What the stack needs to know about a packet from the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// TCP or UDP with its endpoints; `None` for other protocols (ICMP, IPv6 extension
    /// headers), which go to smoltcp as they are.
    pub transport: Option<Transport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transport {
    pub protocol: Protocol,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// Only for TCP.
    pub tcp: Option<TcpFlags>,
    /// Whether the transport checksum is valid. Computed only when `verify` was asked for,
    /// since smoltcp checks it again for packets of known flows.
    pub checksum_ok: bool,
}

fn unicast(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => !(a.is_unspecified() || a.is_broadcast() || a.is_multicast()),
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
    }
}

/// Splits an IP packet into its addresses, transport protocol and transport bytes, checking
/// lengths and the IPv4 header checksum and refusing fragments (the stack does not reassemble).
fn split(packet: &[u8]) -> Result<(IpAddr, IpAddr, IpProtocol, &[u8]), PacketError> {
    let caps = ChecksumCapabilities::default();
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let p = Ipv4Packet::new_checked(packet).map_err(|_| PacketError::Malformed)?;
            let repr = Ipv4Repr::parse(&p, &caps).map_err(|_| PacketError::Malformed)?;
            Ok((
                IpAddr::V4(repr.src_addr),
                IpAddr::V4(repr.dst_addr),
                repr.next_header,
                p.payload(),
            ))
        }
        Some(6) => {
            let p = Ipv6Packet::new_checked(packet).map_err(|_| PacketError::Malformed)?;
            let repr = Ipv6Repr::parse(&p).map_err(|_| PacketError::Malformed)?;
            Ok((
                IpAddr::V6(repr.src_addr),
                IpAddr::V6(repr.dst_addr),
                repr.next_header,
                p.payload(),
            ))
        }
        _ => Err(PacketError::Malformed),
    }
}

/// Parses one IP packet. `verify` asks for the transport checksum to be checked.
pub(crate) fn parse(packet: &[u8], verify: bool) -> Result<Parsed, PacketError> {
    let (src, dst, proto, payload) = split(packet)?;
    if !unicast(src) || !unicast(dst) {
        return Err(PacketError::NotUnicast);
    }
    let (s, d) = (IpAddress::from(src), IpAddress::from(dst));
    let transport = match proto {
        IpProtocol::Tcp => {
            let t = TcpPacket::new_checked(payload).map_err(|_| PacketError::Malformed)?;
            Some(Transport {
                protocol: Protocol::Tcp,
                src: SocketAddr::new(src, t.src_port()),
                dst: SocketAddr::new(dst, t.dst_port()),
                tcp: Some(TcpFlags {
                    syn: t.syn(),
                    ack: t.ack(),
                    rst: t.rst(),
                }),
                checksum_ok: !verify || t.verify_checksum(&s, &d),
            })
        }
        IpProtocol::Udp => {
            let u = UdpPacket::new_checked(payload).map_err(|_| PacketError::Malformed)?;
            Some(Transport {
                protocol: Protocol::Udp,
                src: SocketAddr::new(src, u.src_port()),
                dst: SocketAddr::new(dst, u.dst_port()),
                tcp: None,
                checksum_ok: !verify || u.verify_checksum(&s, &d),
            })
        }
        _ => None,
    };
    if let Some(t) = &transport
        && (t.src.port() == 0 || t.dst.port() == 0)
    {
        return Err(PacketError::Malformed);
    }
    Ok(Parsed { transport })
}

/// Builds the RST|ACK that refuses a connection request (RFC 9293 §3.10.7.1: `<SEQ=0>
/// <ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`), as the resource itself would. `None` if `syn` is not a
/// well-formed SYN.
pub(crate) fn rst_for_syn(syn: &[u8]) -> Option<Vec<u8>> {
    let caps = ChecksumCapabilities::default();
    let (src, dst, proto, payload) = split(syn).ok()?;
    if proto != IpProtocol::Tcp {
        return None;
    }
    let t = TcpPacket::new_checked(payload).ok()?;
    if !t.syn() {
        return None;
    }
    // SYN counts as one sequence number; a SYN may carry data (TFO), which counts too.
    let seg_len = 1 + t.payload().len();
    let (src, dst) = (IpAddress::from(src), IpAddress::from(dst));
    let reply = TcpRepr {
        src_port: t.dst_port(),
        dst_port: t.src_port(),
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(0),
        ack_number: Some(t.seq_number() + seg_len),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let reply_ip = IpRepr::new(dst, src, IpProtocol::Tcp, reply.buffer_len(), 64);
    let mut out = vec![0u8; reply_ip.buffer_len()];
    let hl = reply_ip.header_len();
    reply_ip.emit(&mut out[..], &caps);
    let mut tcp = TcpPacket::new_unchecked(&mut out[hl..]);
    reply.emit(&mut tcp, &dst, &src, &caps);
    Some(out)
}
