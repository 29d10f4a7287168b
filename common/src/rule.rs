//! What a grant allows: destination prefixes, protocols and port ranges. The gateway's
//! enforcement point checks new flows against these; the client uses the same rules to pick
//! the grant a packet belongs to; the controller sends them in grants (as strings, so they
//! read like the admin typed them: `"10.10.1.10/32"`, `"tcp"`, `"443"` or `"104-11112"`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::packet::protocol;

/// An IPv4 or IPv6 prefix (address and length), host bits cleared.
///
/// Written here rather than taken from a crate so the core needs nothing beyond std.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

/// Why an [`IpPrefix`] could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// The length is longer than the address.
    #[error("prefix length {len} is longer than the {max}-bit address; use at most /{max}")]
    TooLong {
        /// The length given.
        len: u8,
        /// The address's width in bits.
        max: u8,
    },
    /// The text is not `ADDRESS` or `ADDRESS/LENGTH`.
    #[error("{0:?} is not an address or ADDRESS/LENGTH prefix, e.g. 10.20.0.0/24 or fd00::/64")]
    Syntax(String),
}

impl IpPrefix {
    /// Makes a prefix, clearing host bits so equal networks compare equal.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, PrefixError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(PrefixError::TooLong { len, max });
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask_v4(len)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask_v6(len)).into()),
        };
        Ok(IpPrefix { addr, len })
    }

    /// A prefix holding exactly one address: the usual form of a granted resource.
    pub fn host(addr: IpAddr) -> Self {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        IpPrefix { addr, len }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether this is a zero-length prefix (the whole address family).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `ip` lies in this prefix; addresses of the other family never do.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask_v4(self.len) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask_v6(self.len) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask_v4(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

fn mask_v6(len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0)
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for IpPrefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || PrefixError::Syntax(s.to_owned());
        match s.split_once('/') {
            None => Ok(IpPrefix::host(s.parse().map_err(|_| syntax())?)),
            Some((addr, len)) => IpPrefix::new(
                addr.parse().map_err(|_| syntax())?,
                len.parse().map_err(|_| syntax())?,
            ),
        }
    }
}

/// The protocol a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP, optionally limited to a port range.
    Tcp,
    /// UDP, optionally limited to a port range.
    Udp,
    /// ICMP on IPv4 or ICMPv6 on IPv6 (echo requests open flows; errors are also let through).
    Icmp,
    /// Every protocol, with no port limit.
    Any,
}

impl Proto {
    /// Whether a packet with this protocol number, sent to an address of this family, is
    /// covered. ICMPv6 inside IPv4 (or ICMP inside IPv6) is not ICMP.
    pub fn matches(self, proto: u8, dst: IpAddr) -> bool {
        match self {
            Proto::Tcp => proto == protocol::TCP,
            Proto::Udp => proto == protocol::UDP,
            Proto::Icmp if dst.is_ipv6() => proto == protocol::ICMPV6,
            Proto::Icmp => proto == protocol::ICMP,
            Proto::Any => true,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Any => "any",
        })
    }
}

/// An inclusive, non-empty range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// `first..=last`; `None` when `first > last`, so an empty range cannot exist.
    pub fn new(first: u16, last: u16) -> Option<Self> {
        (first <= last).then_some(PortRange { first, last })
    }

    /// A single port.
    pub fn single(port: u16) -> Self {
        PortRange {
            first: port,
            last: port,
        }
    }

    /// The lowest port in the range.
    pub fn first(&self) -> u16 {
        self.first
    }

    /// The highest port in the range.
    pub fn last(&self) -> u16 {
        self.last
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// One thing a grant allows the client to open: a destination, a protocol, maybe ports.
///
/// `ports` is only meaningful for [`Proto::Tcp`] and [`Proto::Udp`]; the gateway refuses it
/// on the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    /// Destination addresses.
    pub dst: IpPrefix,
    /// Protocol.
    pub proto: Proto,
    /// Destination ports; `None` means all.
    pub ports: Option<PortRange>,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.proto, self.dst)?;
        if let Some(ports) = self.ports {
            write!(f, " port {ports}")?;
        }
        Ok(())
    }
}

impl Rule {
    /// Whether a flow's first packet (destination, IP protocol number, destination port) is
    /// covered by this rule.
    pub fn matches(&self, dst: IpAddr, proto: u8, dst_port: Option<u16>) -> bool {
        self.dst.contains(dst)
            && self.proto.matches(proto, dst)
            && match (self.ports, dst_port) {
                (None, _) => true,
                (Some(range), Some(port)) => range.contains(port),
                (Some(_), None) => false,
            }
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a port or FIRST-LAST range, e.g. 443 or 104-11112");
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        PortRange::new(first, last).ok_or_else(bad)
    }
}

macro_rules! serde_as_string {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_string!(IpPrefix);
serde_as_string!(PortRange);

#[cfg(test)]
mod serde_tests {
    use super::*;

    #[test]
    fn rules_read_like_an_admin_wrote_them() {
        let r: Rule =
            serde_json::from_str(r#"{"dst":"10.10.2.20/32","proto":"tcp","ports":"104-11112"}"#)
                .expect("parse");
        assert_eq!(r.to_string(), "tcp 10.10.2.20/32 port 104-11112");
        let back = serde_json::to_string(&r).expect("json");
        assert_eq!(
            back,
            r#"{"dst":"10.10.2.20/32","proto":"tcp","ports":"104-11112"}"#
        );
        let ip = "10.10.2.20".parse().expect("ip");
        assert!(r.matches(ip, protocol::TCP, Some(104)));
        assert!(!r.matches(ip, protocol::TCP, Some(80)));
        assert!(!r.matches(ip, protocol::UDP, Some(104)));
        assert!(
            serde_json::from_str::<Rule>(r#"{"dst":"10.0.0.0/40","proto":"tcp","ports":null}"#)
                .is_err()
        );
        assert!(
            serde_json::from_str::<Rule>(r#"{"dst":"10.0.0.0/8","proto":"tcp","ports":"9-1"}"#)
                .is_err()
        );
    }
}
