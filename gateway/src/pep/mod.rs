//! The gateway's policy enforcement point (PEP): peer table, packet filter and flow table,
//! with no IO.
//!
//! [`Pep`] decides, packet by packet, what crosses the gateway. It owns no socket, reads no
//! clock, spawns nothing and takes no lock: the gateway shell hands it bytes and the current
//! [`Instant`], and carries out the verdicts. That keeps every rule below testable with a
//! fake clock, and the same core serves the TUN and the userspace data-plane modes.
//!
//! # Invariants
//!
//! - **Deny by default.** A packet from a client is forwarded only if its grant is installed
//!   and live, its source is the grant's tunnel address, and it belongs to a flow the grant's
//!   rules allowed when it opened. Anything else is dropped with a [`DropReason`].
//! - **Source is bound to the tunnel.** The shell says which WireGuard session decrypted a
//!   packet; a packet whose source is not that grant's tunnel address is
//!   [`DropReason::SpoofedSource`], and no flow is touched.
//! - **One tunnel address per device, one grant per flow.** The controller gives each device
//!   one tunnel address, and a device may hold several grants at this gateway at once (one
//!   per resource, each with its own key, rules and expiry; the client picks the grant per
//!   packet by 5-tuple), so several live grants may share a tunnel address. Grant ids and
//!   client keys stay unique. Every flow belongs to the grant that opened it:
//!   - a new flow is judged by the sending grant's rules alone;
//!   - a packet (or an ICMP error quoting one) of a live flow another grant opened is
//!     [`DropReason::FlowOwnedByOtherGrant`], and that flow is not refreshed, closed, taken
//!     over or forwarded into: the first grant to open a 5-tuple holds it until the flow
//!     goes idle or the grant goes;
//!   - a packet toward a client goes to the owner of the flow its reverse 5-tuple names (for
//!     an ICMP error, the flow of the packet it quotes), never to a grant chosen by address.
//!
//!   So grants sharing an address stay as isolated as grants that do not, even if two
//!   devices were ever given one address.
//! - **Resources never open connections to clients.** A packet toward a client passes only
//!   as a reply to a flow that client opened (or an ICMP error about one); a TCP SYN from a
//!   resource never does. Nothing from the resource side creates a flow. A packet toward a
//!   client that matches no live flow is [`DropReason::NoFlow`] and is charged to the
//!   gateway's [`global_counters`](Pep::global_counters), not to a grant: a tunnel address
//!   is a device's, possibly shared by several grants, so no one grant can be blamed for
//!   unsolicited or late traffic to it. A packet that does match a flow is charged to the
//!   flow's grant, passed or dropped.
//! - **Expiry by the gateway's own clock.** From `now >= expires_at` on, no packet of that
//!   grant passes in either direction, whether or not [`Pep::handle_timeout`] has run and
//!   whether or not the controller is reachable: a reply to its flow is
//!   [`DropReason::Expired`]. The grant's flows go at once (so later replies are `NoFlow`);
//!   other grants sharing its tunnel address keep theirs.
//! - **Removal is immediate.** [`Pep::remove_peer`] drops the peer and all its flows before
//!   it returns, and nothing of the other grants sharing its tunnel address.
//! - **Bounded work and memory.** Lookups are hash lookups (flows by 5-tuple, peers by grant
//!   id and key) plus a scan of at most [`MAX_RULES_PER_PEER`] rules for new flows; packets
//!   over 65,535 bytes, fragments and long IPv6 header chains are refused; flows per grant
//!   and in total are capped ([`PepConfig`]). The maps use std's randomly keyed hasher,
//!   because clients choose ports and could otherwise aim for collisions.
//! - **Never panics on packets.** The parser reads through `slice::get` only; a fuzz-style
//!   test feeds random and truncated packets to both directions.
//! - **No secret leaves.** `Peer`'s `Debug` redacts the preshared key.
//!
//! Fragments, IPv4 options and IPv6 routing headers are dropped, and TCP/UDP/ICMP idle
//! timeouts follow RFC 5382 and Linux conntrack; [`packet`] and [`Timeouts`] say why.
//!
//! # Driving it
//!
//! 1. The controller pushes a grant: [`Pep::add_peer`], then create the WireGuard session.
//! 2. A packet decrypted by grant `g`'s session: [`Pep::handle_outbound`]`(g, packet, now)`;
//!    on [`Verdict::Forward`] write it toward the resource (TUN or userspace stack).
//! 3. A packet from the resource side: [`Pep::handle_inbound`]`(packet, now)`; on
//!    [`InboundVerdict::ForwardTo`]`(g)` encrypt it with `g`'s session.
//! 4. When the instant from [`Pep::poll_timeout`] has come, call [`Pep::handle_timeout`],
//!    then drain [`Pep::poll_event`]. On [`Event::PeerExpired`] tear down the session and call
//!    [`Pep::remove_peer`] (an expired peer stays as a tombstone, counting what its session
//!    still delivers as [`DropReason::Expired`], until removed). Packet handling can queue
//!    events too (a packet may be the first to find its grant expired or its flow idle), so drain
//!    `poll_event` after each batch of packets as well, and ask `poll_timeout` again after
//!    `add_peer` and `handle_*` calls, as they can bring the next deadline forward.
//! 5. The controller revokes a grant: [`Pep::remove_peer`], then tear down the session.

pub use wardgate_common::packet;

mod counters;
mod flow;
mod peer;
mod rule;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::Instant;

pub use counters::{Counters, DropCounts, DropReason};
pub use flow::{FlowKey, Timeouts};
pub use peer::{GrantId, Peer, PeerError};
pub use rule::{IpPrefix, PortRange, PrefixError, Proto, Rule};

use flow::{FlowState, FlowTable};
use packet::{Icmp, Packet, ParseError, Quoted, QuotedTransport, Transport};

/// Most rules one peer may carry, so checking a new flow stays a short scan. A grant names
/// one resource; even a resource with many addresses and port ranges fits.
pub const MAX_RULES_PER_PEER: usize = 256;

impl From<ParseError> for DropReason {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::Malformed => DropReason::Malformed,
            ParseError::Fragment => DropReason::Fragment,
            ParseError::IpOptions => DropReason::IpOptions,
        }
    }
}

/// Tunables of a [`Pep`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PepConfig {
    /// Idle timeouts of flows.
    pub timeouts: Timeouts,
    /// Most flows one grant may have open; more are [`DropReason::FlowLimit`]. Stops one
    /// client (or its malware) from filling the table. Default 8192.
    pub max_flows_per_grant: usize,
    /// Most flows in the whole table; bounds memory. Default 1,000,000.
    pub max_flows: usize,
}

impl Default for PepConfig {
    fn default() -> Self {
        PepConfig {
            timeouts: Timeouts::default(),
            max_flows_per_grant: 8192,
            max_flows: 1_000_000,
        }
    }
}

/// What to do with a packet a client sent through its tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Send it on toward the resource.
    Forward,
    /// Discard it; already counted.
    Drop(DropReason),
}

/// What to do with a packet from the resource side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum InboundVerdict {
    /// Encrypt it with this grant's WireGuard session and send it to the client.
    ForwardTo(GrantId),
    /// Discard it; already counted.
    Drop(DropReason),
}

/// Something the shell must act on, from [`Pep::poll_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The grant reached `expires_at`: it carries no more packets and its flows are gone.
    /// Tear down its WireGuard session and call [`Pep::remove_peer`].
    PeerExpired {
        /// The expired grant.
        grant_id: GrantId,
    },
    /// A flow was idle past its timeout and is forgotten; a userspace shell can close the
    /// sockets it opened for it. (Flows that go with their peer are not reported one by one.)
    FlowExpired {
        /// The grant the flow belonged to.
        grant_id: GrantId,
        /// The flow.
        flow: FlowKey,
    },
}

/// A peer as the table holds it.
#[derive(Debug)]
struct PeerEntry {
    peer: Peer,
    /// False once expired: a tombstone that still attributes drops until removed.
    live: bool,
    counters: Counters,
    /// Keys of this peer's flows, so removal and expiry cost O(its flows), not O(all flows).
    flows: HashSet<FlowKey>,
}

/// The policy enforcement point: peer table, packet filter and flow table. See the module
/// docs for the invariants and the call order.
#[derive(Debug)]
pub struct Pep {
    config: PepConfig,
    peers: HashMap<GrantId, PeerEntry>,
    /// Client public key -> grant holding it (live, or the latest tombstone).
    by_key: HashMap<[u8; 32], GrantId>,
    /// Live grants by expiry, ordered so the next one is first.
    expiries: BTreeSet<(Instant, GrantId)>,
    flows: FlowTable,
    /// Drops no installed grant can own (unknown tunnel, malformed, traffic matching no flow).
    global: Counters,
    events: VecDeque<Event>,
}

impl Default for Pep {
    fn default() -> Self {
        Pep::new(PepConfig::default())
    }
}

impl Pep {
    /// An empty table: every packet is dropped until a peer is added.
    pub fn new(config: PepConfig) -> Self {
        Pep {
            flows: FlowTable::new(config.timeouts),
            config,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            expiries: BTreeSet::new(),
            global: Counters::default(),
            events: VecDeque::new(),
        }
    }

    /// Installs a grant's peer, after checking it can be enforced unambiguously: rules
    /// present and well-formed, not expired, a usable tunnel address, and its key not held
    /// by another live grant (an expired one's is taken over). The tunnel address may be
    /// shared with other grants (of the same device): flows, not addresses, tell their
    /// traffic apart.
    pub fn add_peer(&mut self, peer: Peer, now: Instant) -> Result<(), PeerError> {
        let grant = peer.grant_id;
        if self.peers.contains_key(&grant) {
            return Err(PeerError::DuplicateGrant(grant));
        }
        if now >= peer.expires_at {
            return Err(PeerError::AlreadyExpired(grant));
        }
        if peer.rules.is_empty() {
            return Err(PeerError::NoRules(grant));
        }
        if peer.rules.len() > MAX_RULES_PER_PEER {
            return Err(PeerError::TooManyRules {
                grant,
                count: peer.rules.len(),
                max: MAX_RULES_PER_PEER,
            });
        }
        if let Some((index, rule)) = peer
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.ports.is_some() && !matches!(r.proto, Proto::Tcp | Proto::Udp))
        {
            return Err(PeerError::PortsWithoutPorts {
                grant,
                index,
                proto: rule.proto,
            });
        }
        let addr = peer.tunnel_addr;
        let unusable = match addr {
            IpAddr::V4(a) => {
                a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast()
            }
            IpAddr::V6(a) => a.is_unspecified() || a.is_loopback() || a.is_multicast(),
        };
        if unusable {
            return Err(PeerError::InvalidTunnelAddress { grant, addr });
        }
        if let Some(&held_by) = self.by_key.get(&peer.client_public_key)
            && self.is_live_entry(held_by)
        {
            return Err(PeerError::ClientKeyInUse { grant, held_by });
        }
        self.by_key.insert(peer.client_public_key, grant);
        self.expiries.insert((peer.expires_at, grant));
        self.peers.insert(
            grant,
            PeerEntry {
                peer,
                live: true,
                counters: Counters::default(),
                flows: HashSet::new(),
            },
        );
        Ok(())
    }

    /// Removes a grant's peer (live or expired) and all its flows at once: from this call
    /// on, nothing passes for it in either direction. Returns the peer, or `None` if it was
    /// not installed. Other grants sharing its tunnel address are not touched. Read its
    /// [`counters`](Self::counters) first if they are wanted.
    pub fn remove_peer(&mut self, grant_id: GrantId) -> Option<Peer> {
        let entry = self.peers.remove(&grant_id)?;
        for key in &entry.flows {
            self.flows.remove(key);
        }
        self.expiries.remove(&(entry.peer.expires_at, grant_id));
        if self.by_key.get(&entry.peer.client_public_key) == Some(&grant_id) {
            self.by_key.remove(&entry.peer.client_public_key);
        }
        Some(entry.peer)
    }

    /// Decides on a packet that grant `grant_id`'s WireGuard session decrypted (client to
    /// resource), and opens or refreshes its flow. The grant id must come from the session,
    /// never from the packet: that binding is what makes source checks mean something.
    pub fn handle_outbound(&mut self, grant_id: GrantId, packet: &[u8], now: Instant) -> Verdict {
        let result = self.outbound(grant_id, packet, now);
        let counters = match self.peers.get_mut(&grant_id) {
            Some(entry) => &mut entry.counters,
            None => &mut self.global,
        };
        match result {
            Ok(()) => {
                counters.pass_out(packet.len());
                Verdict::Forward
            }
            Err(reason) => {
                counters.drop(reason);
                Verdict::Drop(reason)
            }
        }
    }

    /// Decides on a packet from the resource side (resource to client): it passes only as
    /// a reply to a live flow a client opened, or as an ICMP error about one, and goes to the
    /// grant that owns that flow (found from the flow table, never from the destination
    /// address, which grants of one device share). It is counted on that grant; a packet
    /// matching no flow is counted on the [`global_counters`](Self::global_counters).
    pub fn handle_inbound(&mut self, packet: &[u8], now: Instant) -> InboundVerdict {
        let (result, owner) = self.inbound(packet, now);
        let counters = match owner.and_then(|g| self.peers.get_mut(&g)) {
            Some(entry) => &mut entry.counters,
            None => &mut self.global,
        };
        match result {
            Ok(grant) => {
                counters.pass_in(packet.len());
                InboundVerdict::ForwardTo(grant)
            }
            Err(reason) => {
                counters.drop(reason);
                InboundVerdict::Drop(reason)
            }
        }
    }

    /// Expires every grant whose `expires_at <= now` and forgets idle flows, queueing an
    /// [`Event`] for each. Calling it late is safe (packet handling checks deadlines itself);
    /// calling it is what frees the memory and tells the shell.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, grant)) = self.expiries.first() {
            if at > now {
                break;
            }
            self.expiries.pop_first();
            self.expire_peer(grant);
        }
        while let Some((key, flow)) = self.flows.pop_idle(now) {
            if let Some(entry) = self.peers.get_mut(&flow.grant) {
                entry.flows.remove(&key);
            }
            self.events.push_back(Event::FlowExpired {
                grant_id: flow.grant,
                flow: key,
            });
        }
    }

    /// The next instant [`handle_timeout`](Self::handle_timeout) has work: a grant's expiry
    /// or a flow's possible idle deadline (possibly early: a busy flow just gets rescheduled).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let expiry = self.expiries.first().map(|(at, _)| *at);
        match (expiry, self.flows.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next event for the shell, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The installed peer of a grant (live or expired-but-not-removed).
    pub fn peer(&self, grant_id: GrantId) -> Option<&Peer> {
        self.peers.get(&grant_id).map(|e| &e.peer)
    }

    /// Whether the grant is installed and may carry packets at `now`.
    pub fn is_live(&self, grant_id: GrantId, now: Instant) -> bool {
        self.peers
            .get(&grant_id)
            .is_some_and(|e| e.live && now < e.peer.expires_at)
    }

    /// The live grant using this client public key, so the shell can route a WireGuard
    /// handshake to its session; `None` for unknown or expired keys.
    pub fn grant_for_key(&self, client_public_key: &[u8; 32], now: Instant) -> Option<GrantId> {
        let grant = *self.by_key.get(client_public_key)?;
        self.is_live(grant, now).then_some(grant)
    }

    /// The grant's counters (kept while the peer is installed, expired or not).
    pub fn counters(&self, grant_id: GrantId) -> Option<&Counters> {
        self.peers.get(&grant_id).map(|e| &e.counters)
    }

    /// Drops no installed grant could own: packets on unknown tunnels, malformed packets and
    /// traffic from the resource side that matches no live flow (unsolicited or late; a
    /// tunnel address may be shared by several grants, so it names no one grant).
    pub fn global_counters(&self) -> &Counters {
        &self.global
    }

    /// Every installed grant's counters, ordered by grant id, for a metrics scrape.
    pub fn counters_snapshot(&self) -> Vec<(GrantId, Counters)> {
        let mut all: Vec<_> = self.peers.iter().map(|(g, e)| (*g, e.counters)).collect();
        all.sort_unstable_by_key(|(g, _)| *g);
        all
    }

    /// Installed peers, live and expired.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Tracked flows (including idle ones not yet reaped).
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    fn is_live_entry(&self, grant: GrantId) -> bool {
        self.peers.get(&grant).is_some_and(|e| e.live)
    }

    /// Turns a live peer into a tombstone: flows gone, expiry queued as an event.
    fn expire_peer(&mut self, grant: GrantId) {
        let Some(entry) = self.peers.get_mut(&grant) else {
            return;
        };
        self.expiries.remove(&(entry.peer.expires_at, grant));
        if !entry.live {
            return;
        }
        entry.live = false;
        for key in entry.flows.drain() {
            self.flows.remove(&key);
        }
        self.events
            .push_back(Event::PeerExpired { grant_id: grant });
    }

    /// Checks the grant is live at `now`, expiring it if its time has come.
    fn check_live(&mut self, grant: GrantId, now: Instant) -> Result<(), DropReason> {
        let entry = self.peers.get(&grant).ok_or(DropReason::UnknownPeer)?;
        if !entry.live {
            return Err(DropReason::Expired);
        }
        if now >= entry.peer.expires_at {
            self.expire_peer(grant);
            return Err(DropReason::Expired);
        }
        Ok(())
    }

    /// The owner and state of the live flow under `key`. An idle flow found here is reaped
    /// (whoever owned it): a flow past its deadline is gone for every lookup.
    fn live_flow(&mut self, key: &FlowKey, now: Instant) -> Option<(GrantId, FlowState)> {
        let (flow, idle) = self.flows.get(key, now)?;
        let (owner, state) = (flow.grant, flow.state);
        if idle {
            self.flows.remove(key);
            if let Some(entry) = self.peers.get_mut(&owner) {
                entry.flows.remove(key);
            }
            self.events.push_back(Event::FlowExpired {
                grant_id: owner,
                flow: *key,
            });
            return None;
        }
        Some((owner, state))
    }

    /// Opens a flow for `grant`, within the limits.
    fn open_flow(
        &mut self,
        grant: GrantId,
        key: FlowKey,
        state: FlowState,
        now: Instant,
    ) -> Result<(), DropReason> {
        let entry = self.peers.get_mut(&grant).ok_or(DropReason::UnknownPeer)?;
        if entry.flows.len() >= self.config.max_flows_per_grant
            || self.flows.len() >= self.config.max_flows
        {
            return Err(DropReason::FlowLimit);
        }
        entry.flows.insert(key);
        self.flows.insert(key, grant, state, now);
        Ok(())
    }

    fn outbound(&mut self, grant: GrantId, buf: &[u8], now: Instant) -> Result<(), DropReason> {
        self.check_live(grant, now)?;
        let packet = Packet::parse(buf)?;
        let entry = self.peers.get(&grant).ok_or(DropReason::UnknownPeer)?;
        if packet.src != entry.peer.tunnel_addr {
            return Err(DropReason::SpoofedSource);
        }
        let (src, dst) = (packet.src, packet.dst);
        let key = |client_port, resource_port| FlowKey {
            protocol: packet.protocol,
            client: src,
            client_port,
            resource: dst,
            resource_port,
        };
        // What the packet is, for the flow table: its flow (if it belongs to one), the state
        // a new flow starts in (`None`: it opens none), its TCP flags, and the destination
        // port the rules see.
        let (key, start, tcp_flags, dst_port) = match packet.transport {
            Transport::Tcp {
                src_port,
                dst_port,
                flags,
            } => {
                // A reset is forwarded if allowed but opens nothing.
                let start = (!flags.rst()).then_some(FlowState::TcpOpening);
                (
                    Some(key(src_port, dst_port)),
                    start,
                    Some(flags),
                    Some(dst_port),
                )
            }
            Transport::Udp { src_port, dst_port } => (
                Some(key(src_port, dst_port)),
                Some(FlowState::Unreplied),
                None,
                Some(dst_port),
            ),
            Transport::Icmp(Icmp::EchoRequest { id }) => {
                (Some(key(id, 0)), Some(FlowState::Unreplied), None, None)
            }
            Transport::Icmp(Icmp::Error(Some(quoted))) => {
                match self.related_outbound(&packet, &quoted, now) {
                    // An error about one of the grant's own flows goes back to its resource.
                    Some(owner) if owner == grant => return Ok(()),
                    // One about another grant's flow could break that connection.
                    Some(_) => return Err(DropReason::FlowOwnedByOtherGrant),
                    // About nothing tracked: like other ICMP below.
                    None => (None, None, None, None),
                }
            }
            // Other ICMP (errors about nothing tracked, echo replies, ...) passes if a rule
            // allows ICMP to the destination, and opens no flow.
            Transport::Icmp(_) => (None, None, None, None),
            Transport::Other => (Some(key(0, 0)), Some(FlowState::Unreplied), None, None),
        };
        if let Some(key) = &key {
            match self.live_flow(key, now) {
                // Fast path: a packet of a live flow was allowed when the flow opened, and a
                // peer's rules never change.
                Some((owner, state)) if owner == grant => {
                    let next = tcp_flags.map_or(state, |flags| state.tcp_outbound(flags));
                    self.flows.touch(key, next, now);
                    return Ok(());
                }
                // Another grant of the same tunnel address opened this 5-tuple: it is that
                // grant's alone. Forwarding would let this grant inject into (or reset) the
                // connection, and the flow is neither refreshed, moved nor closed.
                Some(_) => return Err(DropReason::FlowOwnedByOtherGrant),
                None => {}
            }
        }
        let entry = self.peers.get(&grant).ok_or(DropReason::UnknownPeer)?;
        rule::evaluate(&entry.peer.rules, dst, packet.protocol, dst_port)?;
        match (key, start) {
            (Some(key), Some(start)) => self.open_flow(grant, key, start, now),
            _ => Ok(()),
        }
    }

    /// The owner of the live flow an ICMP error from a client is about (quoted packet:
    /// resource to client), if the error goes back to that flow's resource.
    fn related_outbound(&mut self, outer: &Packet, q: &Quoted, now: Instant) -> Option<GrantId> {
        if q.dst != outer.src || q.src != outer.dst {
            return None;
        }
        let (client_port, resource_port) = match q.transport {
            QuotedTransport::Ports { src_port, dst_port } => (dst_port, src_port),
            QuotedTransport::EchoReply { id } => (id, 0),
            QuotedTransport::Other => (0, 0),
            QuotedTransport::EchoRequest { .. } | QuotedTransport::IcmpOther => return None,
        };
        let key = FlowKey {
            protocol: q.protocol,
            client: q.dst,
            client_port,
            resource: q.src,
            resource_port,
        };
        self.live_flow(&key, now).map(|(owner, _)| owner)
    }

    /// The verdict on an inbound packet, and the grant its counters belong to: the owner of
    /// the flow it matches, or `None` (the gateway's counters) if it matches none.
    fn inbound(
        &mut self,
        buf: &[u8],
        now: Instant,
    ) -> (Result<GrantId, DropReason>, Option<GrantId>) {
        let packet = match Packet::parse(buf) {
            Ok(p) => p,
            Err(e) => return (Err(e.into()), None),
        };
        // Reversed: the packet goes resource -> client, the key is written client-side.
        let key = |client_port, resource_port| FlowKey {
            protocol: packet.protocol,
            client: packet.dst,
            client_port,
            resource: packet.src,
            resource_port,
        };
        // The flow the packet would belong to, and what it does to it.
        let (key, action) = match packet.transport {
            Transport::Tcp {
                src_port,
                dst_port,
                flags,
            } => {
                let action = if flags.is_connection_request() {
                    Reply::Refuse
                } else {
                    Reply::Tcp(flags)
                };
                (Some(key(dst_port, src_port)), action)
            }
            Transport::Udp { src_port, dst_port } => (Some(key(dst_port, src_port)), Reply::Other),
            Transport::Icmp(Icmp::EchoReply { id }) => (Some(key(id, 0)), Reply::Other),
            Transport::Icmp(Icmp::Error(Some(quoted))) => {
                (related_inbound_key(&packet, &quoted), Reply::Related)
            }
            Transport::Icmp(_) => (None, Reply::Refuse),
            Transport::Other => (Some(key(0, 0)), Reply::Other),
        };
        let Some((key, owner, state)) =
            key.and_then(|k| self.live_flow(&k, now).map(|(g, st)| (k, g, st)))
        else {
            return (Err(DropReason::NoFlow), None);
        };
        let result = self.check_live(owner, now).and_then(|()| {
            let next = match action {
                // A resource opening a connection, even on a flow's 5-tuple.
                Reply::Refuse => return Err(DropReason::NoFlow),
                // An error about the flow (maybe from a router on the way) does not refresh it.
                Reply::Related => return Ok(owner),
                Reply::Tcp(flags) => state.tcp_inbound(flags),
                Reply::Other => FlowState::Replied,
            };
            self.flows.touch(&key, next, now);
            Ok(owner)
        });
        (result, Some(owner))
    }
}

/// What an inbound packet does to the flow it matches.
#[derive(Debug, Clone, Copy)]
enum Reply {
    /// A TCP segment with these flags: refreshes the flow and moves its state.
    Tcp(packet::TcpFlags),
    /// A reply of another protocol: refreshes the flow, now replied.
    Other,
    /// An ICMP error about the flow: passes, refreshes nothing.
    Related,
    /// Never passes (a TCP connection request, an ICMP message that is no reply).
    Refuse,
}

/// The flow (client side) an ICMP error toward a client is about (quoted packet: client to
/// resource). The error may come from a router on the way, so its own source is not
/// checked; the quoted packet must be from the client the error goes to.
fn related_inbound_key(outer: &Packet, q: &Quoted) -> Option<FlowKey> {
    if q.src != outer.dst {
        return None;
    }
    let (client_port, resource_port) = match q.transport {
        QuotedTransport::Ports { src_port, dst_port } => (src_port, dst_port),
        QuotedTransport::EchoRequest { id } => (id, 0),
        QuotedTransport::Other => (0, 0),
        QuotedTransport::EchoReply { .. } | QuotedTransport::IcmpOther => return None,
    };
    Some(FlowKey {
        protocol: q.protocol,
        client: q.src,
        client_port,
        resource: q.dst,
        resource_port,
    })
}
