//! A minimal IPv4/IPv6 parser: just the fields the enforcement point decides on.
//!
//! Every packet that reaches the PEP came from the network (a client's decrypted tunnel, or
//! the resource segment), so it is parsed once, here, into a [`Packet`] whose fields can be
//! trusted by the filter. The parser never panics and never allocates: every read goes
//! through `slice::get`, and every length field is checked against the buffer before use.
//!
//! What is deliberately rejected, and why:
//! - anything that is not exactly one IPv4 or IPv6 packet: the IPv4 total length (IPv6 payload
//!   length + 40) must equal the buffer length, so trailing bytes cannot ride along unchecked
//!   ([`ParseError::Malformed`]);
//! - buffers over [`MAX_PACKET_LEN`] and IPv6 jumbograms ([`ParseError::Malformed`]);
//! - fragments, IPv4 and IPv6 alike ([`ParseError::Fragment`]): a non-first fragment carries no
//!   ports, so it cannot be checked against a grant or a flow without reassembly, and
//!   reassembly is memory an attacker could fill. Clients send with the tunnel MTU and TCP
//!   uses MSS/PMTUD, so fragments are rare in practice;
//! - IPv4 options and IPv6 routing headers ([`ParseError::IpOptions`]): source routing and
//!   record-route can steer or probe the resource network, and no clinical application needs
//!   them;
//! - chains of more than eight IPv6 extension headers ([`ParseError::Malformed`]), to bound
//!   the work per packet.
//!
//! Checksums are not verified: the filter decides on header fields, and the IP stack behind
//! the gateway drops corrupt packets anyway.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The largest packet the PEP accepts, in bytes.
///
/// IPv4's total-length field cannot describe more; IPv6 packets are held to the same limit so
/// the bound on work and memory per packet is one number.
pub const MAX_PACKET_LEN: usize = 65_535;

/// How many IPv6 extension headers are walked before the packet is refused.
const MAX_EXTENSION_HEADERS: usize = 8;

/// IANA protocol numbers the parser and the filter need.
pub mod protocol {
    /// IPv6 Hop-by-Hop options header.
    pub const HOPOPT: u8 = 0;
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// IPv6 routing header.
    pub const ROUTING: u8 = 43;
    /// IPv6 fragment header.
    pub const FRAGMENT: u8 = 44;
    /// ICMP for IPv6.
    pub const ICMPV6: u8 = 58;
    /// IPv6 destination options header.
    pub const DSTOPTS: u8 = 60;
}

/// Why a buffer is not a packet the PEP will look at.
///
/// Each variant maps to a `DropReason` of the gateway's filter with the same name, so drops can
/// be counted and explained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Truncated, oversize, inconsistent lengths, or not IPv4/IPv6.
    #[error("malformed, truncated or oversize IP packet")]
    Malformed,
    /// An IPv4 or IPv6 fragment.
    #[error("IP fragments are not forwarded")]
    Fragment,
    /// IPv4 options or an IPv6 routing header.
    #[error("IPv4 options and IPv6 routing headers are not forwarded")]
    IpOptions,
}

/// TCP header flags, for the flow table's connection tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    /// FIN: the sender has finished sending.
    pub const FIN: u8 = 0x01;
    /// SYN: synchronise sequence numbers (opens a connection).
    pub const SYN: u8 = 0x02;
    /// RST: reset the connection.
    pub const RST: u8 = 0x04;
    /// ACK: the acknowledgement field is valid.
    pub const ACK: u8 = 0x10;

    /// FIN is set: the connection is closing.
    pub fn fin(self) -> bool {
        self.0 & Self::FIN != 0
    }

    /// RST is set: the connection is reset.
    pub fn rst(self) -> bool {
        self.0 & Self::RST != 0
    }

    /// SYN without ACK: the first packet of a connection. A resource may never send one to a
    /// client, so the inbound direction drops it whatever the flow table holds.
    pub fn is_connection_request(self) -> bool {
        self.0 & (Self::SYN | Self::ACK) == Self::SYN
    }
}

/// One parsed IP packet: addresses, protocol, and the transport fields the filter uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Upper-layer protocol number (after any IPv6 extension headers).
    pub protocol: u8,
    /// Ports, ICMP echo identifier, or nothing, by protocol.
    pub transport: Transport,
}

/// The transport-layer fields of a [`Packet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A TCP segment.
    Tcp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// Header flags.
        flags: TcpFlags,
    },
    /// A UDP datagram.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// ICMP (IPv4) or ICMPv6 (IPv6).
    Icmp(Icmp),
    /// Any other protocol: no ports, so flows are keyed by addresses and protocol only.
    Other,
}

/// The ICMP message kinds the filter distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Icmp {
    /// Echo request ("ping"); the identifier plays the role of a port in the flow key.
    EchoRequest {
        /// Echo identifier.
        id: u16,
    },
    /// Echo reply; matched against the request's flow by identifier.
    EchoReply {
        /// Echo identifier.
        id: u16,
    },
    /// An error (destination unreachable, packet too big, time exceeded, parameter problem)
    /// quoting the packet that caused it; `None` when the quote cannot be parsed.
    Error(Option<Quoted>),
    /// Any other ICMP type.
    Other,
}

/// The flow-identifying fields of the packet an ICMP error quotes.
///
/// Quotes are often cut short (RFC 792 guarantees only 8 bytes past the IP header), so only
/// addresses, protocol and the first 8 transport bytes are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quoted {
    /// Source address of the quoted packet.
    pub src: IpAddr,
    /// Destination address of the quoted packet.
    pub dst: IpAddr,
    /// Protocol of the quoted packet.
    pub protocol: u8,
    /// Ports or echo identifier of the quoted packet.
    pub transport: QuotedTransport,
}

/// Transport fields of a quoted packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotedTransport {
    /// TCP or UDP ports.
    Ports {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// A quoted echo request.
    EchoRequest {
        /// Echo identifier.
        id: u16,
    },
    /// A quoted echo reply.
    EchoReply {
        /// Echo identifier.
        id: u16,
    },
    /// A quoted ICMP message of another type: never matched to a flow (no nested errors).
    IcmpOther,
    /// A protocol without ports.
    Other,
}

impl Packet {
    /// Parses one whole IPv4 or IPv6 packet, refusing anything the module docs list.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        if buf.len() > MAX_PACKET_LEN {
            return Err(ParseError::Malformed);
        }
        let ip = match buf.first().map(|b| b >> 4) {
            Some(4) => parse_ipv4(buf, Mode::Whole)?,
            Some(6) => parse_ipv6(buf, Mode::Whole)?,
            _ => return Err(ParseError::Malformed),
        };
        let transport = parse_transport(&ip)?;
        Ok(Packet {
            src: ip.src,
            dst: ip.dst,
            protocol: ip.protocol,
            transport,
        })
    }
}

/// Whether lengths must describe the buffer exactly (a packet) or may exceed it (a quote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Whole,
    Quoted,
}

struct IpHeader<'a> {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    payload: &'a [u8],
}

fn byte(buf: &[u8], at: usize) -> Result<u8, ParseError> {
    buf.get(at).copied().ok_or(ParseError::Malformed)
}

fn be16(buf: &[u8], at: usize) -> Result<u16, ParseError> {
    let end = at.checked_add(2).ok_or(ParseError::Malformed)?;
    let bytes: [u8; 2] = buf
        .get(at..end)
        .and_then(|b| b.try_into().ok())
        .ok_or(ParseError::Malformed)?;
    Ok(u16::from_be_bytes(bytes))
}

fn array<const N: usize>(buf: &[u8], at: usize) -> Result<[u8; N], ParseError> {
    let end = at.checked_add(N).ok_or(ParseError::Malformed)?;
    buf.get(at..end)
        .and_then(|b| b.try_into().ok())
        .ok_or(ParseError::Malformed)
}

fn parse_ipv4(buf: &[u8], mode: Mode) -> Result<IpHeader<'_>, ParseError> {
    let first = byte(buf, 0)?;
    if first >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    let header_len = usize::from(first & 0x0f) * 4;
    if header_len < 20 || buf.len() < header_len {
        return Err(ParseError::Malformed);
    }
    let total_len = usize::from(be16(buf, 2)?);
    if total_len < header_len {
        return Err(ParseError::Malformed);
    }
    let end = match mode {
        Mode::Whole if total_len != buf.len() => return Err(ParseError::Malformed),
        Mode::Whole => total_len,
        Mode::Quoted => total_len.min(buf.len()),
    };
    let fragment = be16(buf, 6)?;
    let more_fragments = fragment & 0x2000 != 0;
    let offset = fragment & 0x1fff;
    match mode {
        Mode::Whole if more_fragments || offset != 0 => return Err(ParseError::Fragment),
        // A quoted first fragment still shows its ports; a later one does not.
        Mode::Quoted if offset != 0 => return Err(ParseError::Fragment),
        _ => {}
    }
    if mode == Mode::Whole && header_len > 20 {
        return Err(ParseError::IpOptions);
    }
    Ok(IpHeader {
        src: IpAddr::V4(Ipv4Addr::from(array::<4>(buf, 12)?)),
        dst: IpAddr::V4(Ipv4Addr::from(array::<4>(buf, 16)?)),
        protocol: byte(buf, 9)?,
        payload: buf.get(header_len..end).ok_or(ParseError::Malformed)?,
    })
}

fn parse_ipv6(buf: &[u8], mode: Mode) -> Result<IpHeader<'_>, ParseError> {
    const FIXED: usize = 40;
    if byte(buf, 0)? >> 4 != 6 || buf.len() < FIXED {
        return Err(ParseError::Malformed);
    }
    let payload_len = usize::from(be16(buf, 4)?);
    let end = match mode {
        // This also refuses jumbograms (payload length 0 and a Hop-by-Hop jumbo option).
        Mode::Whole if FIXED + payload_len != buf.len() => return Err(ParseError::Malformed),
        Mode::Whole => buf.len(),
        Mode::Quoted => (FIXED + payload_len).min(buf.len()),
    };
    let mut next = byte(buf, 6)?;
    let mut offset = FIXED;
    for _ in 0..MAX_EXTENSION_HEADERS {
        match next {
            protocol::HOPOPT if offset != FIXED => return Err(ParseError::Malformed),
            protocol::HOPOPT | protocol::DSTOPTS => {
                let header_len = (usize::from(byte(buf, offset + 1)?) + 1) * 8;
                next = byte(buf, offset)?;
                offset += header_len;
                if offset > end {
                    return Err(ParseError::Malformed);
                }
            }
            protocol::ROUTING => return Err(ParseError::IpOptions),
            protocol::FRAGMENT => return Err(ParseError::Fragment),
            _ => {
                return Ok(IpHeader {
                    src: IpAddr::V6(Ipv6Addr::from(array::<16>(buf, 8)?)),
                    dst: IpAddr::V6(Ipv6Addr::from(array::<16>(buf, 24)?)),
                    protocol: next,
                    payload: buf.get(offset..end).ok_or(ParseError::Malformed)?,
                });
            }
        }
    }
    Err(ParseError::Malformed)
}

fn is_icmp(protocol: u8, v6: bool) -> bool {
    if v6 {
        protocol == protocol::ICMPV6
    } else {
        protocol == protocol::ICMP
    }
}

fn parse_transport(ip: &IpHeader<'_>) -> Result<Transport, ParseError> {
    let p = ip.payload;
    let v6 = ip.src.is_ipv6();
    match ip.protocol {
        protocol::TCP => {
            let data_offset = usize::from(byte(p, 12)? >> 4) * 4;
            if data_offset < 20 || data_offset > p.len() {
                return Err(ParseError::Malformed);
            }
            Ok(Transport::Tcp {
                src_port: be16(p, 0)?,
                dst_port: be16(p, 2)?,
                flags: TcpFlags(byte(p, 13)?),
            })
        }
        protocol::UDP => {
            if usize::from(be16(p, 4)?) != p.len() || p.len() < 8 {
                return Err(ParseError::Malformed);
            }
            Ok(Transport::Udp {
                src_port: be16(p, 0)?,
                dst_port: be16(p, 2)?,
            })
        }
        proto if is_icmp(proto, v6) => {
            if p.len() < 8 {
                return Err(ParseError::Malformed);
            }
            let icmp_type = byte(p, 0)?;
            let id = be16(p, 4)?;
            let icmp = match (v6, icmp_type) {
                (false, 8) | (true, 128) => Icmp::EchoRequest { id },
                (false, 0) | (true, 129) => Icmp::EchoReply { id },
                // v4: destination unreachable, time exceeded, parameter problem.
                // v6: destination unreachable, packet too big, time exceeded, parameter problem.
                (false, 3 | 11 | 12) | (true, 1..=4) => {
                    Icmp::Error(p.get(8..).and_then(|quote| parse_quoted(quote, v6)))
                }
                _ => Icmp::Other,
            };
            Ok(Transport::Icmp(icmp))
        }
        _ => Ok(Transport::Other),
    }
}

/// Parses the packet quoted in an ICMP error; `None` if it cannot identify a flow.
fn parse_quoted(buf: &[u8], v6: bool) -> Option<Quoted> {
    let ip = if v6 {
        parse_ipv6(buf, Mode::Quoted).ok()?
    } else {
        parse_ipv4(buf, Mode::Quoted).ok()?
    };
    let p = ip.payload;
    let transport = match ip.protocol {
        protocol::TCP | protocol::UDP => QuotedTransport::Ports {
            src_port: be16(p, 0).ok()?,
            dst_port: be16(p, 2).ok()?,
        },
        proto if is_icmp(proto, v6) => {
            let id = be16(p, 4).ok()?;
            match (v6, byte(p, 0).ok()?) {
                (false, 8) | (true, 128) => QuotedTransport::EchoRequest { id },
                (false, 0) | (true, 129) => QuotedTransport::EchoReply { id },
                _ => QuotedTransport::IcmpOther,
            }
        }
        _ => QuotedTransport::Other,
    };
    Some(Quoted {
        src: ip.src,
        dst: ip.dst,
        protocol: ip.protocol,
        transport,
    })
}
