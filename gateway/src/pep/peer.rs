//! A grant as the gateway holds it: one WireGuard peer and what it may reach.

use std::fmt;
use std::net::IpAddr;
use std::time::Instant;

use super::Rule;

/// Identifies a grant (and so its WireGuard peer) inside the gateway.
///
/// A `u64` so it is cheap to copy into every flow entry and verdict; the gateway shell keeps
/// the mapping to the controller's own grant id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantId(pub u64);

impl fmt::Display for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "grant {}", self.0)
    }
}

/// One grant pushed by the controller: a client key, its tunnel address, what it may reach,
/// and until when.
#[derive(Clone, PartialEq, Eq)]
pub struct Peer {
    /// The grant this peer carries.
    pub grant_id: GrantId,
    /// The client's WireGuard public key (fresh per device, resource and session).
    pub client_public_key: [u8; 32],
    /// The per-grant WireGuard preshared key. Secret: never printed, not even by `Debug`.
    pub preshared_key: [u8; 32],
    /// The only source address this peer's packets may carry. It is the device's address,
    /// so several grants of one device may share it; replies find their grant through the
    /// flow they belong to, not through this address.
    pub tunnel_addr: IpAddr,
    /// What the client may open; at least one, at most
    /// [`MAX_RULES_PER_PEER`](super::MAX_RULES_PER_PEER).
    pub rules: Vec<Rule>,
    /// When the grant ends, on the same clock as the `now` given to the [`Pep`](super::Pep).
    /// From this instant on, no packet passes.
    pub expires_at: Instant,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("grant_id", &self.grant_id)
            .field("client_public_key", &Hex(&self.client_public_key))
            .field("preshared_key", &"<redacted>")
            .field("tunnel_addr", &self.tunnel_addr)
            .field("rules", &self.rules)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

struct Hex<'a>(&'a [u8]);

impl fmt::Debug for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Why [`Pep::add_peer`](super::Pep::add_peer) refused a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// A peer with this grant id is already installed (live or expired but not yet removed).
    #[error("{0} is already installed; remove it before adding it again")]
    DuplicateGrant(GrantId),
    /// `expires_at` is not after `now`.
    #[error("{0} has already expired; the controller must renew it before pushing it")]
    AlreadyExpired(GrantId),
    /// The grant allows nothing, which is never what the controller meant.
    #[error("{0} has no rules; a grant must name at least one destination")]
    NoRules(GrantId),
    /// More rules than the per-peer limit.
    #[error(
        "{grant} has {count} rules, more than the limit of {max}; merge them into prefixes or ranges"
    )]
    TooManyRules {
        /// The grant.
        grant: GrantId,
        /// How many rules it had.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A rule gives ports for a protocol that has none.
    #[error(
        "{grant}: rule {index} gives ports for protocol {proto}; ports apply only to tcp and udp"
    )]
    PortsWithoutPorts {
        /// The grant.
        grant: GrantId,
        /// Index of the rule in `rules`.
        index: usize,
        /// The rule's protocol.
        proto: super::Proto,
    },
    /// The tunnel address cannot be a client's (unspecified, loopback, multicast, broadcast).
    #[error("{grant}: {addr} cannot be a client tunnel address")]
    InvalidTunnelAddress {
        /// The grant.
        grant: GrantId,
        /// The address given.
        addr: IpAddr,
    },
    /// Another live grant already uses this client public key; WireGuard could not tell
    /// their sessions apart.
    #[error("{grant}: the client public key is already used by live {held_by}; keys are per grant")]
    ClientKeyInUse {
        /// The grant being added.
        grant: GrantId,
        /// The live grant holding the key.
        held_by: GrantId,
    },
}
