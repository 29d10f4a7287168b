//! Why packets are dropped, and how many passed and dropped, per grant.
//!
//! Counters are plain `u64`s owned by the [`Pep`](super::Pep) and updated through `&mut`;
//! the shell reads them (for Prometheus, or an admin's "why can't I reach it?") with
//! [`Pep::counters`](super::Pep::counters) or
//! [`Pep::counters_snapshot`](super::Pep::counters_snapshot). They wrap on overflow, as
//! Prometheus counters may.

use std::fmt;

/// Why a packet was not forwarded.
///
/// Every drop has exactly one reason, and each reason reads as something an admin or a
/// clinician can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Truncated, oversize, inconsistent, or not IPv4/IPv6.
    Malformed,
    /// An IP fragment (see the packet module for why fragments are dropped).
    Fragment,
    /// IPv4 options or an IPv6 routing header.
    IpOptions,
    /// The packet came from a tunnel whose grant the gateway does not hold.
    UnknownPeer,
    /// The grant reached its `expires_at`.
    Expired,
    /// The source address is not the tunnel address of the grant it arrived on.
    SpoofedSource,
    /// No rule of the grant covers the destination address.
    DestinationNotAllowed,
    /// A rule covers the destination but not this protocol (or ICMP type).
    ProtocolNotAllowed,
    /// A rule covers destination and protocol but not this destination port.
    PortNotAllowed,
    /// Toward a client, but not a reply to a flow that client opened.
    NoFlow,
    /// The grant (or the gateway) already tracks as many flows as it may.
    FlowLimit,
    /// The packet belongs to a connection another grant opened: grants of one device share
    /// its tunnel address, and a connection is carried only by the grant that opened it.
    FlowOwnedByOtherGrant,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 12] = [
        DropReason::Malformed,
        DropReason::Fragment,
        DropReason::IpOptions,
        DropReason::UnknownPeer,
        DropReason::Expired,
        DropReason::SpoofedSource,
        DropReason::DestinationNotAllowed,
        DropReason::ProtocolNotAllowed,
        DropReason::PortNotAllowed,
        DropReason::NoFlow,
        DropReason::FlowLimit,
        DropReason::FlowOwnedByOtherGrant,
    ];

    /// A stable, machine-friendly name, e.g. for a Prometheus `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Fragment => "fragment",
            DropReason::IpOptions => "ip_options",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::Expired => "expired",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::DestinationNotAllowed => "destination_not_allowed",
            DropReason::ProtocolNotAllowed => "protocol_not_allowed",
            DropReason::PortNotAllowed => "port_not_allowed",
            DropReason::NoFlow => "no_flow",
            DropReason::FlowLimit => "flow_limit",
            DropReason::FlowOwnedByOtherGrant => "flow_owned_by_other_grant",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropReason::Malformed => "malformed, truncated or oversize IP packet",
            DropReason::Fragment => "IP fragments are not forwarded",
            DropReason::IpOptions => "IPv4 options and IPv6 routing headers are not forwarded",
            DropReason::UnknownPeer => "no grant is installed for this tunnel",
            DropReason::Expired => "the grant has expired; request access again",
            DropReason::SpoofedSource => {
                "source address is not the tunnel address of this grant (spoofed)"
            }
            DropReason::DestinationNotAllowed => "destination address not in the grant",
            DropReason::ProtocolNotAllowed => "protocol or ICMP type not in the grant",
            DropReason::PortNotAllowed => "destination port not in the grant",
            DropReason::NoFlow => {
                "not a reply to a connection the client opened (resources cannot open connections to clients)"
            }
            DropReason::FlowLimit => "too many open connections for this grant or gateway",
            DropReason::FlowOwnedByOtherGrant => {
                "the connection was opened through another grant of this device; it must stay on that grant"
            }
        })
    }
}

/// Dropped packets, one counter per [`DropReason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DropCounts([u64; DropReason::ALL.len()]);

impl DropCounts {
    /// Packets dropped for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0.get(reason.index()).copied().unwrap_or(0)
    }

    /// Packets dropped for any reason.
    pub fn total(&self) -> u64 {
        self.0.iter().fold(0u64, |sum, n| sum.wrapping_add(*n))
    }

    /// Every reason with its count, in [`DropReason::ALL`] order (zeros included, so metric
    /// series do not appear and vanish).
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.get(*r)))
    }

    fn add(&mut self, reason: DropReason) {
        if let Some(n) = self.0.get_mut(reason.index()) {
            *n = n.wrapping_add(1);
        }
    }
}

/// Traffic counters of one grant (or, for drops no grant can own, of the gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Packets forwarded from the client toward resources.
    pub out_packets: u64,
    /// Bytes (IP packet lengths) forwarded from the client toward resources.
    pub out_bytes: u64,
    /// Packets forwarded from resources to the client.
    pub in_packets: u64,
    /// Bytes (IP packet lengths) forwarded from resources to the client.
    pub in_bytes: u64,
    /// Packets dropped, by reason, in both directions.
    pub dropped: DropCounts,
}

impl Counters {
    pub(crate) fn pass_out(&mut self, bytes: usize) {
        self.out_packets = self.out_packets.wrapping_add(1);
        self.out_bytes = self.out_bytes.wrapping_add(bytes as u64);
    }

    pub(crate) fn pass_in(&mut self, bytes: usize) {
        self.in_packets = self.in_packets.wrapping_add(1);
        self.in_bytes = self.in_bytes.wrapping_add(bytes as u64);
    }

    pub(crate) fn drop(&mut self, reason: DropReason) {
        self.dropped.add(reason);
    }
}
