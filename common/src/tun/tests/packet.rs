//! Test-only IPv4 packet crafting and checking: UDP, TCP and ICMP echo with correct checksums,
//! and a parser that verifies them. Allocation is fine here.

use std::net::{Ipv4Addr, SocketAddrV4};

/// The Internet checksum of `data`, starting from `sum` (unfolded), folded and complemented.
pub fn checksum(sum: u32, data: &[u8]) -> u16 {
    let mut sum = u64::from(sum);
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    u32::from(u16::from_be_bytes([s[0], s[1]]))
        + u32::from(u16::from_be_bytes([s[2], s[3]]))
        + u32::from(u16::from_be_bytes([d[0], d[1]]))
        + u32::from(u16::from_be_bytes([d[2], d[3]]))
        + u32::from(proto)
        + len as u32
}

/// An IPv4 packet (no options, DF set) around `l4`, whose checksum field at `csum_at` is
/// filled in with the pseudo-header checksum (unless `csum_at` is `None`, as for ICMP, whose
/// checksum the caller computed).
fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    mut l4: Vec<u8>,
    csum_at: Option<usize>,
) -> Vec<u8> {
    if let Some(at) = csum_at {
        l4[at] = 0;
        l4[at + 1] = 0;
        let mut c = checksum(pseudo_header_sum(src, dst, proto, l4.len()), &l4);
        if proto == 17 && c == 0 {
            c = 0xffff;
        }
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let total = 20 + l4.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(0, &p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&l4);
    p
}

/// An IPv4/UDP datagram.
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, id: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(8 + payload.len());
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(payload);
    ipv4(*src.ip(), *dst.ip(), 17, id, l4, Some(6))
}

/// TCP flags.
pub const FIN: u8 = 0x01;
/// TCP flags.
pub const SYN: u8 = 0x02;
/// TCP flags.
pub const RST: u8 = 0x04;
/// TCP flags.
pub const PSH: u8 = 0x08;
/// TCP flags.
pub const ACK: u8 = 0x10;

/// What goes into a crafted TCP segment.
pub struct Tcp<'a> {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Options, padded by the caller to a multiple of 4 bytes.
    pub options: &'a [u8],
    pub payload: &'a [u8],
    pub ip_id: u16,
}

/// An IPv4/TCP segment.
pub fn tcp(t: &Tcp<'_>) -> Vec<u8> {
    assert_eq!(t.options.len() % 4, 0, "pad TCP options to 4 bytes");
    let header_len = 20 + t.options.len();
    let mut l4 = Vec::with_capacity(header_len + t.payload.len());
    l4.extend_from_slice(&t.src.port().to_be_bytes());
    l4.extend_from_slice(&t.dst.port().to_be_bytes());
    l4.extend_from_slice(&t.seq.to_be_bytes());
    l4.extend_from_slice(&t.ack.to_be_bytes());
    l4.push(((header_len / 4) as u8) << 4);
    l4.push(t.flags);
    l4.extend_from_slice(&t.window.to_be_bytes());
    l4.extend_from_slice(&[0, 0, 0, 0]);
    l4.extend_from_slice(t.options);
    l4.extend_from_slice(t.payload);
    ipv4(*t.src.ip(), *t.dst.ip(), 6, t.ip_id, l4, Some(16))
}

/// An ICMP echo request.
pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![8, 0, 0, 0];
    l4.extend_from_slice(&ident.to_be_bytes());
    l4.extend_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(payload);
    let c = checksum(0, &l4);
    l4[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 1, seq, l4, None)
}

/// A parsed IPv4 packet whose header and transport checksums were verified.
#[derive(Debug)]
pub struct Parsed<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// The transport header and payload.
    pub l4: &'a [u8],
}

impl<'a> Parsed<'a> {
    /// Source and destination ports (UDP and TCP).
    pub fn ports(&self) -> (u16, u16) {
        (
            u16::from_be_bytes([self.l4[0], self.l4[1]]),
            u16::from_be_bytes([self.l4[2], self.l4[3]]),
        )
    }

    /// The UDP payload.
    pub fn udp_payload(&self) -> &'a [u8] {
        &self.l4[8..]
    }

    /// TCP fields.
    pub fn tcp(&self) -> TcpView<'a> {
        let l4 = self.l4;
        let header_len = usize::from(l4[12] >> 4) * 4;
        TcpView {
            seq: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
            ack: u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]),
            flags: l4[13],
            window: u16::from_be_bytes([l4[14], l4[15]]),
            options: &l4[20..header_len],
            payload: &l4[header_len..],
        }
    }
}

/// TCP fields of a parsed segment.
#[derive(Debug)]
pub struct TcpView<'a> {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub options: &'a [u8],
    pub payload: &'a [u8],
}

impl TcpView<'_> {
    /// The value of option `kind` (MSS = 2, window scale = 3), if present.
    pub fn option(&self, kind: u8) -> Option<&[u8]> {
        let mut o = self.options;
        while let Some(&k) = o.first() {
            match k {
                0 => return None,
                1 => o = &o[1..],
                _ => {
                    let len = usize::from(*o.get(1)?);
                    if len < 2 || len > o.len() {
                        return None;
                    }
                    if k == kind {
                        return Some(&o[2..len]);
                    }
                    o = &o[len..];
                }
            }
        }
        None
    }
}

/// Parses an IPv4 packet and verifies its header checksum and, for UDP, TCP and ICMP, the
/// transport checksum. `Err` says what is wrong; a packet that is not IPv4 is `Ok(None)`.
pub fn parse(p: &[u8]) -> Result<Option<Parsed<'_>>, String> {
    if p.first().map(|b| b >> 4) != Some(4) {
        return Ok(None);
    }
    if p.len() < 20 {
        return Err(format!("IPv4 packet of {} bytes", p.len()));
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if total != p.len() || ihl < 20 || ihl > total {
        return Err(format!(
            "IPv4 lengths: ihl {ihl}, total {total}, read {}",
            p.len()
        ));
    }
    if checksum(0, &p[..ihl]) != 0 {
        return Err("bad IPv4 header checksum".into());
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let proto = p[9];
    let l4 = &p[ihl..];
    let ok = match proto {
        6 | 17 => checksum(pseudo_header_sum(src, dst, proto, l4.len()), l4) == 0,
        1 => checksum(0, l4) == 0,
        _ => true,
    };
    if !ok {
        return Err(format!(
            "bad checksum for protocol {proto}, {} bytes",
            l4.len()
        ));
    }
    Ok(Some(Parsed {
        src,
        dst,
        proto,
        l4,
    }))
}

#[test]
fn crafted_packets_verify() {
    let a = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 2), 5555);
    let b = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 7777);
    let u = udp(a, b, 1, b"hello");
    let parsed = parse(&u).expect("valid").expect("ipv4");
    assert_eq!(parsed.ports(), (5555, 7777));
    assert_eq!(parsed.udp_payload(), b"hello");
    let t = tcp(&Tcp {
        src: a,
        dst: b,
        seq: 7,
        ack: 0,
        flags: SYN,
        window: 1000,
        options: &[2, 4, 5, 100, 1, 3, 3, 7],
        payload: b"odd",
        ip_id: 3,
    });
    let parsed = parse(&t).expect("valid").expect("ipv4");
    let view = parsed.tcp();
    assert_eq!((view.seq, view.flags, view.window), (7, SYN, 1000));
    assert_eq!(view.option(2), Some(&[5u8, 100][..]));
    assert_eq!(view.option(3), Some(&[7u8][..]));
    assert_eq!(view.payload, b"odd");
    let mut bad = t.clone();
    *bad.last_mut().expect("payload") ^= 1;
    assert!(parse(&bad).is_err());
    let e = icmp_echo(*a.ip(), *b.ip(), 9, 1, b"ping");
    assert_eq!(parse(&e).expect("valid").expect("ipv4").proto, 1);
}
