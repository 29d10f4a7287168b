//! The sans-IO WireGuard engine: every peer's tunnel, the routing of datagrams to peers, one
//! timer queue and one transmit queue. No sockets, no clock reads, no tasks.
//!
//! See the [module overview](super) for the call order. Design points:
//!
//! - **Routing.** Handshake initiations carry no receiver index, so the engine checks `mac1`
//!   against each local identity (cheap) and then decrypts the initiator's static key (one
//!   Diffie-Hellman) to find the peer by `(local key, remote key)`. Every other message carries a
//!   receiver index: `index >> 8` names the peer's tunnel through one hash lookup.
//! - **Identities.** A gateway has one static key (pinned through [`EngineConfig::identity`]);
//!   a client makes a fresh key pair per grant, so each [`PeerConfig`] names its own local secret
//!   and the engine keeps one [`LocalIdentity`] per distinct key, shared by the peers using it.
//! - **Buffers.** Decrypted packets go to the caller's `out` buffer. Datagrams to send are
//!   written straight into one reusable transmit buffer; [`Engine::poll_transmit`] hands them
//!   out as slices, grouping consecutive same-size datagrams to one destination for UDP GSO. The
//!   buffer is rewound whenever the queue drains, so a steady state allocates nothing.
//! - **Timers.** boringtun wants `update_timers` every few hundred milliseconds per tunnel. The
//!   engine keeps one min-heap of `(deadline, peer)` with deadlines on a shared grid
//!   ([`EngineConfig::timer_interval`]), so 10,000 peers cost one wake-up per tick, not 10,000
//!   timers. Removed peers leave stale heap entries that are skipped when popped.
//! - **Filtering is not here.** The engine authenticates and routes; which tunnel addresses,
//!   destinations and ports a peer may use is the gateway's packet filter's job.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use x25519_dalek::{PublicKey, StaticSecret};

use super::tunn::{
    self, Decapsulated, Initiation, LocalIdentity, MAX_DATAGRAM_LEN, Message, PeerIndex,
    PresharedKey, TransmitSink, Tunnel, TunnelError,
};

/// How often the engine resets the handshake rate limiters (boringtun counts per second).
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// Largest GSO batch in bytes: the kernel sends a GSO batch as one UDP datagram of at most
/// 65,535 bytes including headers, so stay clearly below that.
const MAX_GSO_BYTES: usize = 64_000;
/// Dead bytes in front of the transmit queue worth a compaction.
const COMPACT_MIN_BYTES: usize = 64 * 1024;
/// Multiplier that scatters consecutive index allocations over the 24-bit space (any odd number
/// is a bijection modulo 2^24), so an index does not reveal how many peers came before.
const INDEX_SCRAMBLE: u32 = 0x009E_3779;

/// The caller's name for a peer: one grant on the gateway, one grant's tunnel on the client.
/// Chosen by the caller (for example the grant's numeric id) so no mapping table is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer#{}", self.0)
    }
}

/// Engine-wide settings.
pub struct EngineConfig {
    /// A local static key that stays for the engine's lifetime even with no peers (the
    /// gateway's key), so initiations from unknown keys are recognised and counted as
    /// [`DropReason::UnknownKey`] rather than [`DropReason::BadMac`].
    pub identity: Option<StaticSecret>,
    /// Spacing of the timer grid on which every tunnel's `update_timers` runs. boringtun's own
    /// device uses 250 ms; a coarser grid delays handshake retransmits and keepalives by up to
    /// one interval.
    pub timer_interval: Duration,
    /// Handshake messages per second per local key before initiators must answer a cookie
    /// (WireGuard's DoS defence; an initiator that gets a cookie retries after 5 s).
    pub handshakes_per_second: u64,
    /// Seed for local index allocation. Pass randomness in production; tests pass a constant.
    pub index_seed: u32,
    /// Upper bound on bytes waiting in the transmit queue; beyond it new datagrams are dropped
    /// and counted as [`DropReason::QueueFull`] (the driver is not draining `poll_transmit`).
    pub max_queued_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            identity: None,
            timer_interval: Duration::from_millis(250),
            handshakes_per_second: 1_000,
            index_seed: 0,
            max_queued_bytes: 4 << 20,
        }
    }
}

impl fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineConfig")
            .field("identity", &self.identity.as_ref().map(|_| "<secret>"))
            .field("timer_interval", &self.timer_interval)
            .field("handshakes_per_second", &self.handshakes_per_second)
            .field("index_seed", &self.index_seed)
            .field("max_queued_bytes", &self.max_queued_bytes)
            .finish()
    }
}

/// One peer (one grant): the keys of both ends, the grant's preshared key, and where to send.
pub struct PeerConfig {
    /// Our static secret for this peer: the gateway's key on the gateway, the grant's fresh
    /// key on the client.
    pub local_secret: StaticSecret,
    /// The other end's static public key.
    pub remote_public: PublicKey,
    /// The grant's preshared key.
    pub preshared_key: Option<PresharedKey>,
    /// Persistent keepalive in seconds (clients behind NAT), `None` for off.
    pub persistent_keepalive: Option<u16>,
    /// Where to send before the peer has spoken: the gateway's endpoint on the client, `None` on
    /// the gateway (it learns the client's address from its first authenticated datagram).
    pub endpoint: Option<SocketAddr>,
}

impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field("local_secret", &"<secret>")
            .field(
                "remote_public",
                &crate::keys::encode_key(self.remote_public.as_bytes()),
            )
            .field("preshared_key", &self.preshared_key)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// Why `add_peer` refused a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The id is taken; remove the old peer first (renewals use a new id or remove + add).
    #[error("{0} already exists; remove it before adding it again")]
    DuplicatePeer(PeerId),
    /// Another peer already has this (local key, remote key) pair, so initiations could not be
    /// told apart. Grants must use distinct client keys.
    #[error(
        "{existing} already uses this pair of local and remote keys; every grant needs its own key pair"
    )]
    DuplicateKeys {
        /// The peer that has the keys.
        existing: PeerId,
    },
    /// All 2^24 local indices are in use.
    #[error("no free tunnel index: the engine already has 16,777,216 peers")]
    IndexSpaceExhausted,
}

/// Why a datagram (inbound) or an IP packet (outbound) was dropped. Every drop is counted in
/// [`EngineStats::dropped`] under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub enum DropReason {
    /// Inbound datagram longer than any UDP payload.
    #[error("datagram longer than the largest UDP payload")]
    Oversize,
    /// Inbound datagram that is not a WireGuard message, or whose payload is not an IP packet.
    #[error("not a WireGuard message, or its payload is not an IPv4/IPv6 packet")]
    Malformed,
    /// Inbound message whose receiver index names no peer (removed peer, stale session, noise).
    #[error("receiver index names no peer (peer removed, or stray traffic)")]
    UnknownIndex,
    /// Authentication failed: `mac1` matched none of our keys, or a MAC/AEAD tag was wrong
    /// (wrong keys or preshared key, or forgery).
    #[error("authentication failed; check both ends' keys and the grant's preshared key")]
    BadMac,
    /// A valid handshake initiation from a static key that is no peer of ours (a revoked or
    /// unknown client).
    #[error("handshake from a key that is not a configured peer")]
    UnknownKey,
    /// Replayed data counter or handshake timestamp.
    #[error("replayed message")]
    Replay,
    /// Data for a session that does not exist (yet, or any more).
    #[error("no session for this message; a new handshake will follow")]
    NoSession,
    /// Handshake message that does not fit the handshake state (late duplicate, stray reply).
    #[error("handshake message that does not fit the handshake state")]
    UnexpectedMessage,
    /// Handshake refused under load without a source address for a cookie.
    #[error("handshake refused under load")]
    RateLimited,
    /// The tunnel's handshake expired.
    #[error("the tunnel's handshake expired")]
    Expired,
    /// Outbound packet dropped because 256 packets already wait for the peer's handshake.
    #[error("too many packets wait for the handshake; is the peer reachable?")]
    HandshakeBacklog,
    /// The caller's output buffer was too short; pass `MAX_DATAGRAM_LEN` bytes.
    #[error("output buffer too short; pass MAX_DATAGRAM_LEN bytes")]
    BufferTooSmall,
    /// Outbound packet for a peer id the engine does not have (removed: revoked or expired).
    #[error("no such peer (removed, revoked or expired)")]
    UnknownPeer,
    /// Outbound datagram for a peer whose address is not known yet (the client has not spoken).
    #[error("peer has no endpoint yet; it must send first")]
    NoEndpoint,
    /// Outbound IP packet too long to fit one UDP datagram once encrypted.
    #[error("IP packet too long for one UDP datagram; lower the tunnel MTU")]
    PacketTooLarge,
    /// The transmit queue is full: the driver is not draining `poll_transmit`.
    #[error("transmit queue full; the driver must drain poll_transmit")]
    QueueFull,
    /// boringtun behaved unexpectedly (a bug; see the log).
    #[error("internal error in the WireGuard library seam")]
    Internal,
}

impl DropReason {
    /// Every reason, in counter order, for exporting metrics.
    pub const ALL: [DropReason; 17] = [
        Self::Oversize,
        Self::Malformed,
        Self::UnknownIndex,
        Self::BadMac,
        Self::UnknownKey,
        Self::Replay,
        Self::NoSession,
        Self::UnexpectedMessage,
        Self::RateLimited,
        Self::Expired,
        Self::HandshakeBacklog,
        Self::BufferTooSmall,
        Self::UnknownPeer,
        Self::NoEndpoint,
        Self::PacketTooLarge,
        Self::QueueFull,
        Self::Internal,
    ];

    /// A stable snake_case label for metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Oversize => "oversize",
            Self::Malformed => "malformed",
            Self::UnknownIndex => "unknown_index",
            Self::BadMac => "bad_mac",
            Self::UnknownKey => "unknown_key",
            Self::Replay => "replay",
            Self::NoSession => "no_session",
            Self::UnexpectedMessage => "unexpected_message",
            Self::RateLimited => "rate_limited",
            Self::Expired => "expired",
            Self::HandshakeBacklog => "handshake_backlog",
            Self::BufferTooSmall => "buffer_too_small",
            Self::UnknownPeer => "unknown_peer",
            Self::NoEndpoint => "no_endpoint",
            Self::PacketTooLarge => "packet_too_large",
            Self::QueueFull => "queue_full",
            Self::Internal => "internal",
        }
    }
}

impl From<TunnelError> for DropReason {
    fn from(e: TunnelError) -> Self {
        match e {
            TunnelError::Oversize { .. } => Self::Oversize,
            TunnelError::PacketTooLarge { .. } => Self::PacketTooLarge,
            TunnelError::BufferTooSmall { .. } => Self::BufferTooSmall,
            TunnelError::Malformed => Self::Malformed,
            TunnelError::Authentication => Self::BadMac,
            TunnelError::Replay => Self::Replay,
            TunnelError::NoSession => Self::NoSession,
            TunnelError::WrongIndex => Self::UnknownIndex,
            TunnelError::UnexpectedMessage => Self::UnexpectedMessage,
            TunnelError::Expired => Self::Expired,
            TunnelError::HandshakeBacklog => Self::HandshakeBacklog,
            TunnelError::UnderLoad => Self::RateLimited,
            TunnelError::Unexpected => Self::Internal,
        }
    }
}

/// Drop counters by [`DropReason`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounts([u64; DropReason::ALL.len()]);

impl DropCounts {
    /// Drops counted under `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize]
    }

    /// All drops.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// `(reason, count)` for every reason, in [`DropReason::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.get(*r)))
    }

    fn add(&mut self, reason: DropReason, n: u64) {
        self.0[reason as usize] += n;
    }
}

/// Engine-wide counters, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Datagrams given to [`Engine::handle_datagram`].
    pub datagrams_received: u64,
    /// IP packets decrypted and returned to the caller.
    pub packets_decrypted: u64,
    /// IP packets accepted by [`Engine::handle_ip_packet`] (sent or waiting for a handshake).
    pub packets_encrypted: u64,
    /// Datagrams placed in the transmit queue (data, handshakes, keepalives, cookies).
    pub datagrams_queued: u64,
    /// Handshake messages authenticated (initiations answered, responses accepted).
    pub handshakes: u64,
    /// Drops by reason.
    pub dropped: DropCounts,
}

/// Per-peer counters and state, for the gateway's per-grant metrics and for status output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// IP packets decrypted from this peer.
    pub rx_packets: u64,
    /// Bytes of those packets.
    pub rx_bytes: u64,
    /// IP packets accepted for this peer.
    pub tx_packets: u64,
    /// Bytes of those packets.
    pub tx_bytes: u64,
    /// When (by the caller's clock) a handshake message from this peer last authenticated.
    pub last_handshake: Option<Instant>,
    /// When (by the caller's clock) any authenticated datagram from this peer last arrived.
    pub last_received: Option<Instant>,
    /// When (by the caller's clock) an IP packet for this peer was last accepted.
    pub last_sent: Option<Instant>,
    /// Where the peer's datagrams go: configured, or learned from its last authenticated datagram.
    pub endpoint: Option<SocketAddr>,
}

/// What [`Engine::handle_datagram`] made of a datagram that was not dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'a> {
    /// An authenticated IP packet from `peer`, in the caller's `out` buffer. The caller must
    /// still check its addresses against the peer's grant (the gateway's filter).
    Packet {
        /// The peer (grant) whose session authenticated the packet.
        peer: PeerId,
        /// The IPv4 or IPv6 packet, trimmed to its header's length; mutable so the caller can
        /// rewrite it in place.
        packet: &'a mut [u8],
    },
    /// A protocol message (handshake, keepalive, cookie) was handled; replies may be waiting
    /// in [`Engine::poll_transmit`]. `peer` is `None` for a cookie reply sent before the
    /// initiator was identified.
    Control {
        /// The peer the message belonged to, when known.
        peer: Option<PeerId>,
    },
}

/// Datagrams to send to one destination, taken from [`Engine::poll_transmit`].
///
/// With `segment_size: Some(n)` the contents are several datagrams of `n` bytes back to back
/// (the last may be shorter): hand it to a GSO-capable socket as one send, or split it with
/// [`Transmit::segments`]. The fields mirror `quinn_udp::Transmit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit<'a> {
    /// Where to send.
    pub dst: SocketAddr,
    /// One datagram, or several of `segment_size` bytes each.
    pub contents: &'a [u8],
    /// Segment length when `contents` holds more than one datagram.
    pub segment_size: Option<usize>,
}

impl<'a> Transmit<'a> {
    /// The individual datagrams, for sockets without GSO.
    pub fn segments(&self) -> impl Iterator<Item = &'a [u8]> + use<'a> {
        let contents = self.contents;
        let size = self.segment_size.unwrap_or(contents.len()).max(1);
        contents.chunks(size)
    }

    /// How many datagrams this transmit holds.
    pub fn segment_count(&self) -> usize {
        match self.segment_size {
            Some(n) if n > 0 => self.contents.len().div_ceil(n),
            _ => 1,
        }
    }
}

/// A queued datagram: a region of the transmit buffer and where it goes.
#[derive(Debug, Clone, Copy)]
struct TxEntry {
    dst: SocketAddr,
    peer: Option<PeerId>,
    start: usize,
    len: usize,
}

/// The transmit queue: one growable buffer whose prefix `[0, used)` holds queued datagrams
/// back to back, in order. Rewound to empty when fully drained, compacted when a driver that
/// never drains it fully leaves more dead bytes in front than live ones.
#[derive(Default)]
struct TxQueue {
    buf: Vec<u8>,
    used: usize,
    entries: VecDeque<TxEntry>,
    max_bytes: usize,
}

impl fmt::Debug for TxQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxQueue")
            .field("capacity", &self.buf.len())
            .field("used", &self.used)
            .field("datagrams", &self.entries.len())
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl TxQueue {
    /// Bytes before the first queued datagram: already sent.
    fn dead(&self) -> usize {
        self.entries.front().map_or(self.used, |e| e.start)
    }

    /// Moves the queued datagrams to the front of the buffer once the sent bytes before them
    /// outweigh them (amortised: each byte is copied at most once per time it goes dead).
    fn compact_if_sparse(&mut self) {
        let dead = self.dead();
        let live = self.used - dead;
        if dead == 0 || dead < live.max(COMPACT_MIN_BYTES) {
            return;
        }
        self.buf.copy_within(dead..self.used, 0);
        for e in &mut self.entries {
            e.start -= dead;
        }
        self.used = live;
    }

    fn reserve(&mut self, len: usize) -> &mut [u8] {
        self.compact_if_sparse();
        let end = self.used + len;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        &mut self.buf[self.used..end]
    }

    /// Queues the first `len` bytes of the last reservation; `false` when over the byte limit.
    fn commit(&mut self, len: usize, dst: SocketAddr, peer: Option<PeerId>) -> bool {
        if self.used - self.dead() + len > self.max_bytes {
            return false;
        }
        self.entries.push_back(TxEntry {
            dst,
            peer,
            start: self.used,
            len,
        });
        self.used += len;
        true
    }

    fn rewind_if_empty(&mut self) {
        if self.entries.is_empty() {
            self.used = 0;
        }
    }
}

/// A [`TransmitSink`] that queues datagrams for one destination (or drops them when the peer
/// has no endpoint), remembering how many were refused so the caller can count them.
struct QueueSink<'q> {
    queue: &'q mut TxQueue,
    dst: Option<SocketAddr>,
    peer: Option<PeerId>,
    queued: u64,
    no_endpoint: u64,
    full: u64,
}

impl<'q> QueueSink<'q> {
    fn new(queue: &'q mut TxQueue, dst: Option<SocketAddr>, peer: Option<PeerId>) -> Self {
        Self {
            queue,
            dst,
            peer,
            queued: 0,
            no_endpoint: 0,
            full: 0,
        }
    }

    /// Adds this sink's outcome to the engine counters.
    fn account(&self, stats: &mut EngineStats) {
        stats.datagrams_queued += self.queued;
        stats.dropped.add(DropReason::NoEndpoint, self.no_endpoint);
        stats.dropped.add(DropReason::QueueFull, self.full);
    }
}

impl TransmitSink for QueueSink<'_> {
    fn reserve(&mut self, len: usize) -> &mut [u8] {
        self.queue.reserve(len)
    }

    fn commit(&mut self, len: usize) {
        match self.dst {
            None => self.no_endpoint += 1,
            Some(dst) => {
                if self.queue.commit(len, dst, self.peer) {
                    self.queued += 1;
                } else {
                    self.full += 1;
                }
            }
        }
    }
}

/// A local static key and how many peers use it.
#[derive(Debug)]
struct IdentitySlot {
    identity: LocalIdentity,
    key: [u8; 32],
    users: usize,
    pinned: bool,
}

#[derive(Debug)]
struct Peer {
    tunnel: Tunnel,
    index: PeerIndex,
    keys: ([u8; 32], [u8; 32]),
    endpoint: Option<SocketAddr>,
    next_tick: Instant,
    stats: PeerStats,
}

/// The WireGuard engine: all peers' tunnels, datagram routing, timers and the transmit queue.
///
/// Sans-IO: feed it datagrams, IP packets and `now`, take transmits and the next deadline out.
/// One owner drives it through `&mut`; it is never shared between threads.
#[derive(Debug)]
pub struct Engine {
    identities: Vec<IdentitySlot>,
    peers: HashMap<PeerId, Peer>,
    by_index: HashMap<u32, PeerId>,
    by_keys: HashMap<([u8; 32], [u8; 32]), PeerId>,
    timers: BinaryHeap<Reverse<(Instant, PeerId)>>,
    epoch: Instant,
    timer_interval: Duration,
    next_housekeeping: Instant,
    handshakes_per_second: u64,
    index_seed: u32,
    index_counter: u32,
    tx: TxQueue,
    stats: EngineStats,
}

impl Engine {
    /// Makes an engine. `now` anchors the timer grid; pass the same clock to every call.
    pub fn new(config: EngineConfig, now: Instant) -> Self {
        let mut engine = Self {
            identities: Vec::new(),
            peers: HashMap::new(),
            by_index: HashMap::new(),
            by_keys: HashMap::new(),
            timers: BinaryHeap::new(),
            epoch: now,
            timer_interval: config.timer_interval.max(Duration::from_millis(1)),
            next_housekeeping: now + HOUSEKEEPING_INTERVAL,
            handshakes_per_second: config.handshakes_per_second,
            index_seed: config.index_seed & PeerIndex::MAX,
            index_counter: 0,
            tx: TxQueue {
                max_bytes: config.max_queued_bytes,
                ..TxQueue::default()
            },
            stats: EngineStats::default(),
        };
        if let Some(secret) = config.identity {
            let slot = engine.identity_slot(secret);
            engine.identities[slot].pinned = true;
        }
        engine
    }

    /// Adds a peer (a grant). Its first timer tick is on the next grid point after `now`.
    pub fn add_peer(
        &mut self,
        id: PeerId,
        config: PeerConfig,
        now: Instant,
    ) -> Result<(), EngineError> {
        if self.peers.contains_key(&id) {
            return Err(EngineError::DuplicatePeer(id));
        }
        let local = PublicKey::from(&config.local_secret).to_bytes();
        let keys = (local, config.remote_public.to_bytes());
        if let Some(existing) = self.by_keys.get(&keys) {
            return Err(EngineError::DuplicateKeys {
                existing: *existing,
            });
        }
        let index = self.allocate_index()?;
        let slot = self.identity_slot(config.local_secret);
        let identity = &mut self.identities[slot];
        identity.users += 1;
        let tunnel = Tunnel::new(
            &identity.identity,
            config.remote_public,
            config.preshared_key.as_ref(),
            config.persistent_keepalive,
            index,
        );
        let next_tick = self.grid_after(now);
        self.timers.push(Reverse((next_tick, id)));
        self.by_index.insert(index.get(), id);
        self.by_keys.insert(keys, id);
        self.peers.insert(
            id,
            Peer {
                tunnel,
                index,
                keys,
                endpoint: config.endpoint,
                next_tick,
                stats: PeerStats {
                    endpoint: config.endpoint,
                    ..PeerStats::default()
                },
            },
        );
        tracing::debug!(peer = id.0, index = index.get(), "peer added");
        Ok(())
    }

    /// Removes a peer at once: its tunnel and keys are dropped, its index and key pair stop
    /// routing (later datagrams count as [`DropReason::UnknownIndex`] or
    /// [`DropReason::UnknownKey`]) and datagrams already queued for it are discarded.
    /// Returns whether the peer existed.
    pub fn remove_peer(&mut self, id: PeerId) -> bool {
        let Some(peer) = self.peers.remove(&id) else {
            return false;
        };
        self.by_index.remove(&peer.index.get());
        self.by_keys.remove(&peer.keys);
        if let Some(pos) = self.identities.iter().position(|s| s.key == peer.keys.0) {
            let slot = &mut self.identities[pos];
            slot.users = slot.users.saturating_sub(1);
            if slot.users == 0 && !slot.pinned {
                self.identities.swap_remove(pos);
            }
        }
        self.tx.entries.retain(|e| e.peer != Some(id));
        self.tx.rewind_if_empty();
        tracing::debug!(peer = id.0, "peer removed");
        true
    }

    /// The peer configured with this pair of keys. Both keys are needed because a client has
    /// one local key per grant and several grants may share a gateway.
    pub fn peer_for_key(&self, local: &PublicKey, remote: &PublicKey) -> Option<PeerId> {
        self.by_keys
            .get(&(local.to_bytes(), remote.to_bytes()))
            .copied()
    }

    /// Whether the peer exists.
    pub fn contains_peer(&self, id: PeerId) -> bool {
        self.peers.contains_key(&id)
    }

    /// Number of peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// A peer's counters and endpoint.
    pub fn peer_stats(&self, id: PeerId) -> Option<PeerStats> {
        self.peers.get(&id).map(|p| PeerStats {
            endpoint: p.endpoint,
            ..p.stats
        })
    }

    /// Sets where a peer's datagrams go (the controller moved the gateway, say). The peer's
    /// next authenticated datagram overrides it again (WireGuard roaming).
    pub fn set_peer_endpoint(&mut self, id: PeerId, endpoint: SocketAddr) -> bool {
        match self.peers.get_mut(&id) {
            Some(p) => {
                p.endpoint = Some(endpoint);
                true
            }
            None => false,
        }
    }

    /// Engine-wide counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Handles one received UDP datagram from `from`.
    ///
    /// `out` receives a decrypted packet and must be at least as long as the datagram
    /// ([`MAX_DATAGRAM_LEN`] always suffices). A datagram that authenticates makes `from` the
    /// peer's endpoint. Replies and released packets wait in [`Engine::poll_transmit`]. Every
    /// error is a drop, already counted.
    pub fn handle_datagram<'a>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &'a mut [u8],
        now: Instant,
    ) -> Result<Received<'a>, DropReason> {
        self.stats.datagrams_received += 1;
        let result = self.route_datagram(from, datagram, out, now);
        if let Err(reason) = &result {
            self.stats.dropped.add(*reason, 1);
            tracing::trace!(
                reason = reason.as_str(),
                len = datagram.len(),
                "datagram dropped"
            );
        }
        result
    }

    fn route_datagram<'a>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &'a mut [u8],
        now: Instant,
    ) -> Result<Received<'a>, DropReason> {
        if datagram.len() > MAX_DATAGRAM_LEN {
            return Err(DropReason::Oversize);
        }
        let id = match tunn::classify(datagram)? {
            Message::Initiation => match self.identify_initiator(from, datagram)? {
                Some(id) => id,
                None => return Ok(Received::Control { peer: None }),
            },
            Message::Response { receiver }
            | Message::CookieReply { receiver }
            | Message::Data { receiver } => *self
                .by_index
                .get(&receiver.get())
                .ok_or(DropReason::UnknownIndex)?,
        };
        let peer = self.peers.get_mut(&id).ok_or(DropReason::Internal)?;
        let mut sink = QueueSink::new(&mut self.tx, Some(from), Some(id));
        let result = peer.tunnel.decapsulate(from.ip(), datagram, out, &mut sink);
        sink.account(&mut self.stats);
        let decapsulated = result?;
        if decapsulated.is_authenticated() {
            if peer.endpoint != Some(from) {
                tracing::debug!(peer = id.0, endpoint = %from, "peer endpoint learned");
                peer.endpoint = Some(from);
            }
            peer.stats.last_received = Some(now);
        }
        Ok(match decapsulated {
            Decapsulated::Packet(packet) => {
                self.stats.packets_decrypted += 1;
                peer.stats.rx_packets += 1;
                peer.stats.rx_bytes += packet.len() as u64;
                Received::Packet { peer: id, packet }
            }
            Decapsulated::Handshake => {
                self.stats.handshakes += 1;
                peer.stats.last_handshake = Some(now);
                tracing::debug!(peer = id.0, "handshake message authenticated");
                Received::Control { peer: Some(id) }
            }
            Decapsulated::Keepalive | Decapsulated::CookieReceived | Decapsulated::CookieSent => {
                Received::Control { peer: Some(id) }
            }
        })
    }

    /// Finds the peer a handshake initiation comes from: `Ok(None)` when a cookie reply was
    /// sent instead (under load).
    fn identify_initiator(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<Option<PeerId>, DropReason> {
        for slot in &self.identities {
            let mut sink = QueueSink::new(&mut self.tx, Some(from), None);
            let result = slot
                .identity
                .identify_initiator(from.ip(), datagram, &mut sink);
            sink.account(&mut self.stats);
            match result? {
                Initiation::NotForUs => continue,
                Initiation::CookieSent => return Ok(None),
                Initiation::Initiator(remote) => {
                    return match self.by_keys.get(&(slot.key, remote.to_bytes())) {
                        Some(id) => Ok(Some(*id)),
                        None => {
                            tracing::debug!(
                                initiator = %crate::keys::encode_key(remote.as_bytes()),
                                "handshake from a key that is no peer"
                            );
                            Err(DropReason::UnknownKey)
                        }
                    };
                }
            }
        }
        Err(DropReason::BadMac)
    }

    /// Encrypts an IP packet towards `peer`. Without a session the packet waits inside the
    /// tunnel and a handshake starts; it leaves when the handshake completes. Every error is a
    /// drop, already counted.
    pub fn handle_ip_packet(
        &mut self,
        peer: PeerId,
        packet: &[u8],
        now: Instant,
    ) -> Result<(), DropReason> {
        let result = self.encrypt(peer, packet, now);
        if let Err(reason) = result {
            self.stats.dropped.add(reason, 1);
            tracing::trace!(peer = peer.0, reason = reason.as_str(), "packet dropped");
        }
        result
    }

    fn encrypt(&mut self, id: PeerId, packet: &[u8], now: Instant) -> Result<(), DropReason> {
        let peer = self.peers.get_mut(&id).ok_or(DropReason::UnknownPeer)?;
        // Only IPv4 and IPv6 packets travel; an empty one would go out as a keepalive.
        if !matches!(packet.first().map(|b| b >> 4), Some(4 | 6)) {
            return Err(DropReason::Malformed);
        }
        let endpoint = peer.endpoint.ok_or(DropReason::NoEndpoint)?;
        let mut sink = QueueSink::new(&mut self.tx, Some(endpoint), Some(id));
        let result = peer.tunnel.encapsulate(packet, &mut sink);
        self.stats.datagrams_queued += sink.queued;
        if sink.full > 0 {
            return Err(DropReason::QueueFull);
        }
        result?;
        self.stats.packets_encrypted += 1;
        peer.stats.tx_packets += 1;
        peer.stats.tx_bytes += packet.len() as u64;
        peer.stats.last_sent = Some(now);
        Ok(())
    }

    /// The next queued datagram(s) to send, or `None` when the queue is empty.
    ///
    /// Consecutive datagrams to the same destination with the same length (the last may be
    /// shorter) come out as one [`Transmit`] of up to `max_segments` segments, ready for UDP GSO;
    /// pass 1 to get one datagram at a time. The slice borrows the engine: send it before the
    /// next `handle_*` call.
    pub fn poll_transmit(&mut self, max_segments: usize) -> Option<Transmit<'_>> {
        let first = self.tx.entries.pop_front()?;
        let mut end = first.start + first.len;
        let mut segments = 1;
        while segments < max_segments && first.len > 0 {
            let Some(next) = self.tx.entries.front() else {
                break;
            };
            let fits = next.dst == first.dst
                && next.start == end
                && next.len <= first.len
                && next.len > 0
                && end + next.len - first.start <= MAX_GSO_BYTES;
            if !fits {
                break;
            }
            let last = next.len < first.len;
            end += next.len;
            segments += 1;
            self.tx.entries.pop_front();
            if last {
                break;
            }
        }
        self.tx.rewind_if_empty();
        Some(Transmit {
            dst: first.dst,
            contents: &self.tx.buf[first.start..end],
            segment_size: (segments > 1).then_some(first.len),
        })
    }

    /// Number of datagrams waiting in the transmit queue.
    pub fn queued_datagrams(&self) -> usize {
        self.tx.entries.len()
    }

    /// When [`Engine::handle_timeout`] must next run, or `None` when nothing is scheduled.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if self.peers.get(&id).is_some_and(|p| p.next_tick == at) {
                break;
            }
            self.timers.pop();
        }
        let peer_deadline = self.timers.peek().map(|Reverse((at, _))| *at);
        let housekeeping = (!self.identities.is_empty()).then_some(self.next_housekeeping);
        match (peer_deadline, housekeeping) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs every timer due at `now`: each due tunnel's `update_timers` (retransmits,
    /// keepalives, rekeys, session expiry) and the once-a-second rate-limiter reset. Calling it
    /// early or late is harmless; it only does what is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_housekeeping {
            for slot in &self.identities {
                slot.identity.reset_rate_limit();
            }
            self.next_housekeeping = now + HOUSEKEEPING_INTERVAL;
        }
        let next = self.grid_after(now);
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(peer) = self.peers.get_mut(&id) else {
                continue;
            };
            if peer.next_tick != at {
                continue;
            }
            let mut sink = QueueSink::new(&mut self.tx, peer.endpoint, Some(id));
            let result = peer.tunnel.update_timers(&mut sink);
            sink.account(&mut self.stats);
            match result {
                Ok(()) => {}
                // boringtun reports an expired handshake on every tick until the next packet
                // to send restarts it: expected for idle peers, not worth more than TRACE.
                Err(TunnelError::Expired) => tracing::trace!(peer = id.0, "tunnel idle (expired)"),
                Err(e) => tracing::debug!(peer = id.0, error = %e, "timer update failed"),
            }
            peer.next_tick = next;
            self.timers.push(Reverse((next, id)));
        }
    }

    /// The first point of the timer grid strictly after `now`.
    fn grid_after(&self, now: Instant) -> Instant {
        let interval = self.timer_interval.as_nanos().max(1);
        let ticks = now.saturating_duration_since(self.epoch).as_nanos() / interval + 1;
        u64::try_from(ticks * interval)
            .ok()
            .and_then(|nanos| self.epoch.checked_add(Duration::from_nanos(nanos)))
            .unwrap_or(now + self.timer_interval)
    }

    /// A free 24-bit index: a scrambled counter, skipping indices in use.
    fn allocate_index(&mut self) -> Result<PeerIndex, EngineError> {
        if self.by_index.len() > PeerIndex::MAX as usize {
            return Err(EngineError::IndexSpaceExhausted);
        }
        for _ in 0..=PeerIndex::MAX {
            let counter = self.index_counter;
            self.index_counter = counter.wrapping_add(1) & PeerIndex::MAX;
            let raw = (counter.wrapping_mul(INDEX_SCRAMBLE) ^ self.index_seed) & PeerIndex::MAX;
            if let (Some(index), false) = (PeerIndex::new(raw), self.by_index.contains_key(&raw)) {
                return Ok(index);
            }
        }
        Err(EngineError::IndexSpaceExhausted)
    }

    /// The slot of the identity for `secret`, created if new.
    fn identity_slot(&mut self, secret: StaticSecret) -> usize {
        let key = PublicKey::from(&secret).to_bytes();
        if let Some(pos) = self.identities.iter().position(|s| s.key == key) {
            return pos;
        }
        self.identities.push(IdentitySlot {
            identity: LocalIdentity::new(secret, self.handshakes_per_second),
            key,
            users: 0,
            pinned: false,
        });
        self.identities.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use rand::rngs::StdRng;
    use rand::{Rng, RngCore, SeedableRng};

    use super::*;
    use crate::dataplane::tunn::{DATA_OVERHEAD, HANDSHAKE_INIT_LEN};

    const GW: PeerId = PeerId(1);
    const CL: PeerId = PeerId(7);

    fn addr(a: u8, b: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, a, b, 1)), port)
    }

    fn gateway_addr() -> SocketAddr {
        addr(255, 255, 51820)
    }

    fn client_addr() -> SocketAddr {
        addr(0, 2, 40000)
    }

    /// A deterministic secret per number. Any 32 bytes are a valid X25519 secret, but clamping
    /// clears the low 3 bits of byte 0 and the top bit of byte 31: keep `n` away from those.
    fn secret(n: u64) -> StaticSecret {
        let mut b = [0x5au8; 32];
        b[8..16].copy_from_slice(&n.to_le_bytes());
        StaticSecret::from(b)
    }

    fn psk(n: u8) -> Option<PresharedKey> {
        Some(PresharedKey::from([n; 32]))
    }

    /// An IPv4 packet (header with the right total length) carrying `seq`.
    fn ipv4(seq: u32, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len.max(24)];
        p[0] = 0x45;
        let total = u16::try_from(p.len()).expect("len");
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[12..16].copy_from_slice(&[100, 64, 0, 2]);
        p[16..20].copy_from_slice(&[10, 1, 0, 5]);
        p[20..24].copy_from_slice(&seq.to_be_bytes());
        for (i, b) in p[24..].iter_mut().enumerate() {
            *b = (seq as usize).wrapping_add(i) as u8;
        }
        p
    }

    fn engine(identity: Option<StaticSecret>, now: Instant) -> Engine {
        Engine::new(
            EngineConfig {
                identity,
                // The tests run thousands of handshakes within a second.
                handshakes_per_second: 1_000_000,
                index_seed: 0x00C0_FFEE,
                ..EngineConfig::default()
            },
            now,
        )
    }

    /// Gateway with key `secret(1)` and one peer `GW` for client key `secret(client)`.
    fn gateway(client: u64, psk_n: u8, now: Instant) -> Engine {
        let mut gw = engine(Some(secret(1)), now);
        gw.add_peer(
            GW,
            PeerConfig {
                local_secret: secret(1),
                remote_public: PublicKey::from(&secret(client)),
                preshared_key: psk(psk_n),
                persistent_keepalive: None,
                endpoint: None,
            },
            now,
        )
        .expect("gateway peer");
        gw
    }

    fn client_config(client: u64, psk_n: u8) -> PeerConfig {
        PeerConfig {
            local_secret: secret(client),
            remote_public: PublicKey::from(&secret(1)),
            preshared_key: psk(psk_n),
            persistent_keepalive: None,
            endpoint: Some(gateway_addr()),
        }
    }

    fn client(client: u64, psk_n: u8, now: Instant) -> Engine {
        let mut cl = engine(None, now);
        cl.add_peer(CL, client_config(client, psk_n), now)
            .expect("client peer");
        cl
    }

    /// Takes every queued datagram out of `e`, one per entry.
    fn drain(e: &mut Engine) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut v = Vec::new();
        while let Some(t) = e.poll_transmit(1) {
            assert_eq!(t.segment_size, None);
            v.push((t.dst, t.contents.to_vec()));
        }
        v
    }

    /// Decrypted packets with the peer that authenticated them.
    type Got = Vec<(PeerId, Vec<u8>)>;

    /// Feeds datagrams to `e` as if sent from `from`; returns the decrypted packets.
    fn feed(
        e: &mut Engine,
        from: SocketAddr,
        datagrams: Vec<(SocketAddr, Vec<u8>)>,
        now: Instant,
    ) -> Vec<(PeerId, Vec<u8>)> {
        let mut out = vec![0u8; MAX_DATAGRAM_LEN];
        let mut got = Vec::new();
        for (_, d) in datagrams {
            if let Ok(Received::Packet { peer, packet }) =
                e.handle_datagram(from, &d, &mut out, now)
            {
                got.push((peer, packet.to_vec()));
            }
        }
        got
    }

    /// Shuttles datagrams between one client and the gateway until both are quiet.
    fn converge(cl: &mut Engine, gw: &mut Engine, now: Instant) -> (Got, Got) {
        let (mut at_client, mut at_gateway) = (Vec::new(), Vec::new());
        for _ in 0..16 {
            let up = drain(cl);
            assert!(up.iter().all(|(dst, _)| *dst == gateway_addr()));
            at_gateway.extend(feed(gw, client_addr(), up, now));
            let down = drain(gw);
            assert!(down.iter().all(|(dst, _)| *dst == client_addr()));
            at_client.extend(feed(cl, gateway_addr(), down, now));
            if cl.queued_datagrams() == 0 && gw.queued_datagrams() == 0 {
                return (at_client, at_gateway);
            }
        }
        panic!("engines did not go quiet");
    }

    /// A client and gateway with a completed handshake.
    fn established(now: Instant) -> (Engine, Engine) {
        let mut gw = gateway(2, 9, now);
        let mut cl = client(2, 9, now);
        cl.handle_ip_packet(CL, &ipv4(0, 100), now)
            .expect("first packet");
        let (_, at_gw) = converge(&mut cl, &mut gw, now);
        assert_eq!(at_gw, vec![(GW, ipv4(0, 100))]);
        (cl, gw)
    }

    #[test]
    fn handshake_completes_and_packets_flow_both_ways() {
        let now = Instant::now();
        let mut gw = gateway(2, 9, now);
        let mut cl = client(2, 9, now);
        // No session yet: the packet waits and a handshake initiation is queued instead.
        cl.handle_ip_packet(CL, &ipv4(0, 100), now).expect("queued");
        let first = drain(&mut cl);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].1.len(), HANDSHAKE_INIT_LEN);
        assert!(feed(&mut gw, client_addr(), first, now).is_empty());
        assert_eq!(gw.stats().handshakes, 1);
        // The gateway learned where the client is from the authenticated initiation.
        assert_eq!(
            gw.peer_stats(GW).and_then(|s| s.endpoint),
            Some(client_addr())
        );
        let (at_cl, at_gw) = converge(&mut cl, &mut gw, now);
        assert!(at_cl.is_empty());
        assert_eq!(at_gw, vec![(GW, ipv4(0, 100))], "queued packet released");

        for seq in 1..=100 {
            cl.handle_ip_packet(CL, &ipv4(seq, 60 + seq as usize * 13), now)
                .expect("up");
            gw.handle_ip_packet(GW, &ipv4(seq + 1000, 1420), now)
                .expect("down");
        }
        let (at_cl, at_gw) = converge(&mut cl, &mut gw, now);
        let up: Vec<_> = (1..=100)
            .map(|s| (GW, ipv4(s, 60 + s as usize * 13)))
            .collect();
        let down: Vec<_> = (1..=100).map(|s| (CL, ipv4(s + 1000, 1420))).collect();
        assert_eq!(at_gw, up);
        assert_eq!(at_cl, down);

        let gs = gw.peer_stats(GW).expect("stats");
        assert_eq!(gs.rx_packets, 101);
        assert_eq!(gs.tx_packets, 100);
        assert_eq!(gs.last_received, Some(now));
        assert!(gs.last_handshake.is_some());
        assert_eq!(gw.stats().dropped.total(), 0, "{:?}", gw.stats().dropped);
        assert_eq!(cl.stats().dropped.total(), 0, "{:?}", cl.stats().dropped);
        assert_eq!(
            gw.peer_for_key(&PublicKey::from(&secret(1)), &PublicKey::from(&secret(2))),
            Some(GW)
        );
    }

    #[test]
    fn packets_beyond_the_handshake_backlog_are_counted_drops() {
        let now = Instant::now();
        let mut gw = gateway(2, 9, now);
        let mut cl = client(2, 9, now);
        let results: Vec<_> = (0..300)
            .map(|seq| cl.handle_ip_packet(CL, &ipv4(seq, 100), now))
            .collect();
        assert!(results[..256].iter().all(Result::is_ok));
        assert!(
            results[256..]
                .iter()
                .all(|r| *r == Err(DropReason::HandshakeBacklog))
        );
        assert_eq!(cl.stats().dropped.get(DropReason::HandshakeBacklog), 44);
        let (_, at_gw) = converge(&mut cl, &mut gw, now);
        let want: Vec<_> = (0..256).map(|seq| (GW, ipv4(seq, 100))).collect();
        assert_eq!(at_gw, want, "the 256 waiting packets leave in order");
        // With the session up, nothing waits any more.
        for seq in 300..700 {
            cl.handle_ip_packet(CL, &ipv4(seq, 100), now).expect("sent");
        }
        assert_eq!(converge(&mut cl, &mut gw, now).1.len(), 400);
    }

    #[test]
    fn wrong_psk_never_carries_a_packet() {
        let now = Instant::now();
        let mut gw = gateway(2, 9, now);
        let mut cl = client(2, 8, now);
        cl.handle_ip_packet(CL, &ipv4(0, 100), now).expect("queued");
        let (at_cl, at_gw) = converge(&mut cl, &mut gw, now);
        assert!(at_cl.is_empty() && at_gw.is_empty());
        // The PSK enters after the initiation: the client refuses the gateway's response.
        assert_eq!(cl.stats().dropped.get(DropReason::BadMac), 1);
        assert_eq!(gw.stats().packets_decrypted, 0);
        // More packets do not get through either.
        cl.handle_ip_packet(CL, &ipv4(1, 100), now).expect("queued");
        let (_, at_gw) = converge(&mut cl, &mut gw, now);
        assert!(at_gw.is_empty());
    }

    #[test]
    fn handshake_from_unknown_key_is_dropped_and_counted() {
        let now = Instant::now();
        let mut gw = gateway(2, 9, now);
        let mut stranger = client(3, 9, now);
        stranger
            .handle_ip_packet(CL, &ipv4(0, 100), now)
            .expect("queued");
        let (at_cl, at_gw) = converge(&mut stranger, &mut gw, now);
        assert!(at_cl.is_empty() && at_gw.is_empty());
        assert_eq!(gw.stats().dropped.get(DropReason::UnknownKey), 1);
        assert_eq!(gw.stats().datagrams_queued, 0, "no answer to strangers");
        assert_eq!(gw.peer_stats(GW).and_then(|s| s.endpoint), None);

        // An initiation for somebody else's gateway key fails mac1 against ours.
        let mut misdirected = engine(None, now);
        misdirected
            .add_peer(
                CL,
                PeerConfig {
                    remote_public: PublicKey::from(&secret(99)),
                    ..client_config(2, 9)
                },
                now,
            )
            .expect("peer");
        misdirected
            .handle_ip_packet(CL, &ipv4(0, 60), now)
            .expect("queued");
        feed(&mut gw, client_addr(), drain(&mut misdirected), now);
        assert_eq!(gw.stats().dropped.get(DropReason::BadMac), 1);
    }

    #[test]
    fn removing_a_peer_stops_its_traffic_at_once() {
        let now = Instant::now();
        let (mut cl, mut gw) = established(now);
        cl.handle_ip_packet(CL, &ipv4(1, 200), now).expect("up");
        cl.handle_ip_packet(CL, &ipv4(2, 200), now).expect("up");
        let mut up = drain(&mut cl).into_iter();
        let mut out = vec![0u8; MAX_DATAGRAM_LEN];
        let (_, d1) = up.next().expect("d1");
        assert!(matches!(
            gw.handle_datagram(client_addr(), &d1, &mut out, now),
            Ok(Received::Packet { peer: GW, .. })
        ));
        // A reply is queued for the peer, then the grant is revoked before the driver sends it.
        gw.handle_ip_packet(GW, &ipv4(3, 200), now).expect("down");
        assert_eq!(gw.queued_datagrams(), 1);

        assert!(gw.remove_peer(GW));
        assert_eq!(
            gw.queued_datagrams(),
            0,
            "queued datagrams for the peer discarded"
        );
        assert!(gw.poll_transmit(64).is_none());
        let (_, d2) = up.next().expect("d2");
        assert_eq!(
            gw.handle_datagram(client_addr(), &d2, &mut out, now),
            Err(DropReason::UnknownIndex)
        );
        assert_eq!(
            gw.handle_ip_packet(GW, &ipv4(4, 200), now),
            Err(DropReason::UnknownPeer)
        );
        assert!(!gw.remove_peer(GW));
        assert!(!gw.contains_peer(GW));
        // A new handshake from the removed client is a stranger's.
        let mut fresh = client(2, 9, now);
        fresh
            .handle_ip_packet(CL, &ipv4(5, 60), now)
            .expect("queued");
        let (_, at_gw) = converge(&mut fresh, &mut gw, now);
        assert!(at_gw.is_empty());
        assert_eq!(gw.stats().dropped.get(DropReason::UnknownKey), 1);
        // The pinned gateway key survives the removal of its last peer.
        assert_eq!(gw.identities.len(), 1);
    }

    #[test]
    fn hostile_datagrams_never_panic_and_are_counted() {
        let now = Instant::now();
        let (mut cl, mut gw) = established(now);
        // Real messages to mutate: an initiation and a data message.
        let mut other = client(5, 9, now);
        other
            .handle_ip_packet(CL, &ipv4(0, 60), now)
            .expect("queued");
        let init = drain(&mut other).remove(0).1;
        cl.handle_ip_packet(CL, &ipv4(1, 300), now).expect("up");
        let data = drain(&mut cl).remove(0).1;

        let mut rng = StdRng::seed_from_u64(0x5eed);
        let mut inputs: Vec<Vec<u8>> = vec![
            Vec::new(),
            vec![0u8; 65_535],
            vec![4u8; 65_535],
            vec![0xffu8; MAX_DATAGRAM_LEN + 1],
        ];
        for len in [
            1, 3, 4, 5, 15, 16, 31, 32, 33, 63, 64, 65, 91, 92, 93, 147, 148, 149,
        ] {
            for kind in 0u8..=5 {
                let mut d = vec![0u8; len];
                rng.fill_bytes(&mut d);
                d[0] = kind;
                if len >= 4 {
                    d[1..4].fill(0);
                }
                inputs.push(d);
            }
        }
        for _ in 0..2_000 {
            let mut d = vec![0u8; rng.gen_range(0..2_000)];
            rng.fill_bytes(&mut d);
            if !d.is_empty() && rng.gen_bool(0.5) {
                d[0] = rng.gen_range(1..=4);
                if d.len() >= 4 {
                    d[1..4].fill(0);
                }
            }
            inputs.push(d);
        }
        // Truncations and bit flips of real messages reach the MAC and AEAD checks.
        for real in [&init, &data] {
            for cut in 0..real.len() {
                inputs.push(real[..cut].to_vec());
            }
            for bit in 0..real.len() * 8 {
                let mut d = real.to_vec();
                d[bit / 8] ^= 1 << (bit % 8);
                inputs.push(d);
            }
        }
        // Data messages with the live receiver index and garbage after it.
        for _ in 0..200 {
            let mut d = data.clone();
            rng.fill_bytes(&mut d[8..]);
            inputs.push(d);
        }
        // The same data message twice: the second is a replay.
        inputs.push(data.clone());
        inputs.push(data.clone());

        let before = *gw.stats();
        let mut out = vec![0u8; MAX_DATAGRAM_LEN];
        let mut decrypted = 0;
        for d in &inputs {
            if let Ok(Received::Packet { .. }) = gw.handle_datagram(client_addr(), d, &mut out, now)
            {
                decrypted += 1;
            }
        }
        // A too-short output buffer is a counted drop too, not a panic.
        let mut tiny = [0u8; 8];
        assert_eq!(
            gw.handle_datagram(client_addr(), &data, &mut tiny, now),
            Err(DropReason::BufferTooSmall)
        );
        let after = *gw.stats();
        assert_eq!(
            decrypted, 1,
            "only the unmodified data message decrypts, once"
        );
        let fed = inputs.len() as u64 + 1;
        assert_eq!(after.datagrams_received - before.datagrams_received, fed);
        // Everything except the one good packet and stray valid-looking control messages is
        // a counted drop.
        let handled = after.packets_decrypted - before.packets_decrypted;
        let dropped = after.dropped.total() - before.dropped.total();
        assert_eq!(handled, 1);
        assert_eq!(dropped, fed - 1, "{:?}", after.dropped);
        for reason in [
            DropReason::Oversize,
            DropReason::Malformed,
            DropReason::UnknownIndex,
            DropReason::BadMac,
            DropReason::Replay,
            DropReason::BufferTooSmall,
        ] {
            assert!(after.dropped.get(reason) > 0, "no {reason:?} drop counted");
        }

        // Hostile IP packets from the inside are refused too.
        assert_eq!(
            gw.handle_ip_packet(GW, &vec![0x45; 65_535], now),
            Err(DropReason::PacketTooLarge)
        );
        assert_eq!(
            gw.handle_ip_packet(GW, &[], now),
            Err(DropReason::Malformed)
        );
        assert_eq!(
            gw.handle_ip_packet(GW, &[0x15; 40], now),
            Err(DropReason::Malformed)
        );

        // The tunnel still works afterwards.
        cl.handle_ip_packet(CL, &ipv4(2, 300), now).expect("up");
        let (_, at_gw) = converge(&mut cl, &mut gw, now);
        assert_eq!(at_gw, vec![(GW, ipv4(2, 300))]);
    }

    #[test]
    fn thousand_peers_each_routed_to_its_own_grant() {
        const N: u64 = 1_000;
        let now = Instant::now();
        let started = Instant::now();
        let mut gw = engine(Some(secret(1)), now);
        let mut clients = Vec::new();
        for i in 0..N {
            let key = 10_000 + i;
            gw.add_peer(
                PeerId(i),
                PeerConfig {
                    local_secret: secret(1),
                    remote_public: PublicKey::from(&secret(key)),
                    preshared_key: psk((i % 251) as u8),
                    persistent_keepalive: None,
                    endpoint: None,
                },
                now,
            )
            .expect("gateway peer");
            clients.push(client(key, (i % 251) as u8, now));
        }
        let client_addr = |i: u64| addr((i / 200) as u8, (i % 200) as u8, 40_000 + i as u16);
        // Every client sends; the gateway handles the initiations in one interleaved stream.
        for (i, c) in clients.iter_mut().enumerate() {
            c.handle_ip_packet(CL, &ipv4(i as u32, 80), now)
                .expect("queued");
        }
        for _round in 0..4 {
            let mut replies = 0;
            for (i, c) in clients.iter_mut().enumerate() {
                let got = feed(&mut gw, client_addr(i as u64), drain(c), now);
                for (peer, p) in got {
                    assert_eq!(
                        peer,
                        PeerId(i as u64),
                        "client {i} routed to the wrong grant"
                    );
                    assert_eq!(p, ipv4(i as u32, 80));
                }
            }
            while let Some(t) = gw.poll_transmit(1) {
                let (dst, d) = (t.dst, t.contents.to_vec());
                let i = clients_index(dst);
                feed(&mut clients[i], gateway_addr(), vec![(dst, d)], now);
                replies += 1;
            }
            if replies == 0 {
                break;
            }
        }
        assert_eq!(gw.stats().packets_decrypted, N);
        assert_eq!(gw.stats().dropped.total(), 0, "{:?}", gw.stats().dropped);
        // Replies go back to each client's own address and decrypt only there.
        for i in 0..N {
            assert_eq!(
                gw.peer_stats(PeerId(i)).and_then(|s| s.endpoint),
                Some(client_addr(i))
            );
            gw.handle_ip_packet(PeerId(i), &ipv4(i as u32 + 5_000, 90), now)
                .expect("down");
        }
        while let Some(t) = gw.poll_transmit(1) {
            let (dst, d) = (t.dst, t.contents.to_vec());
            let i = clients_index(dst);
            let got = feed(&mut clients[i], gateway_addr(), vec![(dst, d)], now);
            assert_eq!(got, vec![(CL, ipv4(i as u32 + 5_000, 90))]);
        }
        let distinct: std::collections::HashSet<_> = gw.peers.values().map(|p| p.index).collect();
        assert_eq!(distinct.len(), N as usize);
        println!(
            "1,000 peers: keys, handshakes and one packet each way in {:?}",
            started.elapsed()
        );

        fn clients_index(dst: SocketAddr) -> usize {
            dst.port() as usize - 40_000
        }
    }

    #[test]
    fn client_routes_gateway_initiated_handshake_to_the_right_grant_key() {
        let now = Instant::now();
        // Two grants on one client, each with its own fresh key pair, to the same gateway.
        let mut cl = engine(None, now);
        cl.add_peer(PeerId(21), client_config(21, 1), now)
            .expect("grant 21");
        cl.add_peer(PeerId(22), client_config(22, 2), now)
            .expect("grant 22");
        let mut gw = engine(Some(secret(1)), now);
        for (id, key, p) in [(PeerId(1), 21, 1), (PeerId(2), 22, 2)] {
            gw.add_peer(
                id,
                PeerConfig {
                    local_secret: secret(1),
                    remote_public: PublicKey::from(&secret(key)),
                    preshared_key: psk(p),
                    persistent_keepalive: None,
                    endpoint: Some(client_addr()),
                },
                now,
            )
            .expect("gateway peer");
        }
        // The gateway initiates this time (say, a rekey); the client must find grant 22's key.
        gw.handle_ip_packet(PeerId(2), &ipv4(7, 64), now)
            .expect("queued");
        let (at_cl, _) = converge(&mut cl, &mut gw, now);
        assert_eq!(at_cl, vec![(PeerId(22), ipv4(7, 64))]);
        assert_eq!(cl.identities.len(), 2);
        assert!(cl.remove_peer(PeerId(21)));
        assert_eq!(cl.identities.len(), 1, "unused grant key forgotten");
    }

    #[test]
    fn duplicate_peers_and_keys_are_refused() {
        let now = Instant::now();
        let mut gw = gateway(2, 9, now);
        let again = |n| PeerConfig {
            local_secret: secret(1),
            remote_public: PublicKey::from(&secret(n)),
            preshared_key: None,
            persistent_keepalive: None,
            endpoint: None,
        };
        assert_eq!(
            gw.add_peer(GW, again(3), now),
            Err(EngineError::DuplicatePeer(GW))
        );
        assert_eq!(
            gw.add_peer(PeerId(2), again(2), now),
            Err(EngineError::DuplicateKeys { existing: GW })
        );
        assert_eq!(gw.peer_count(), 1);
    }

    #[test]
    fn timers_run_on_one_grid_from_one_heap() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut gw = engine(Some(secret(1)), t0);
        // Only the rate-limiter housekeeping is scheduled without peers.
        assert_eq!(gw.poll_timeout(), Some(t0 + ms(1_000)));
        for (i, at) in [(1u64, 10u64), (2, 70), (3, 240)] {
            gw.add_peer(
                PeerId(i),
                PeerConfig {
                    local_secret: secret(1),
                    remote_public: PublicKey::from(&secret(100 + i)),
                    preshared_key: None,
                    persistent_keepalive: None,
                    endpoint: None,
                },
                t0 + ms(at),
            )
            .expect("peer");
        }
        // Peers added at different times share the next grid point: one wake-up.
        assert_eq!(gw.poll_timeout(), Some(t0 + ms(250)));
        gw.handle_timeout(t0 + ms(100));
        assert_eq!(gw.poll_timeout(), Some(t0 + ms(250)), "nothing due early");
        gw.handle_timeout(t0 + ms(250));
        assert_eq!(gw.poll_timeout(), Some(t0 + ms(500)));
        // A late driver is put back on the grid.
        gw.handle_timeout(t0 + ms(620));
        assert_eq!(gw.poll_timeout(), Some(t0 + ms(750)));
        assert_eq!(gw.timers.len(), 3);
        // Removed peers leave stale entries that are skipped, not run.
        gw.remove_peer(PeerId(1));
        gw.remove_peer(PeerId(2));
        gw.remove_peer(PeerId(3));
        assert_eq!(gw.poll_timeout(), Some(t0 + ms(1_000)));
        assert!(gw.timers.is_empty());
        gw.handle_timeout(t0 + ms(1_000));
        assert_eq!(gw.poll_timeout(), Some(t0 + ms(2_000)));
        // An engine with no identity and no peers has nothing to do.
        assert_eq!(engine(None, t0).poll_timeout(), None);
    }

    #[test]
    fn persistent_keepalive_comes_from_handle_timeout() {
        // boringtun reads its own clock, so this one test waits 1.1 s of real time.
        let now = Instant::now();
        let mut gw = gateway(2, 9, now);
        let mut cl = engine(None, now);
        cl.add_peer(
            CL,
            PeerConfig {
                persistent_keepalive: Some(1),
                ..client_config(2, 9)
            },
            now,
        )
        .expect("peer");
        cl.handle_ip_packet(CL, &ipv4(0, 60), now).expect("queued");
        converge(&mut cl, &mut gw, now);
        std::thread::sleep(Duration::from_millis(1_100));
        let later = Instant::now();
        let mut ticks = 0;
        while cl.queued_datagrams() == 0 && ticks < 20 {
            let at = cl.poll_timeout().expect("scheduled");
            cl.handle_timeout(at.max(later));
            ticks += 1;
        }
        let out = drain(&mut cl);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1.len(), DATA_OVERHEAD, "an empty data message");
        let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
        assert_eq!(
            gw.handle_datagram(client_addr(), &out[0].1, &mut buf, later),
            Ok(Received::Control { peer: Some(GW) })
        );
        assert_eq!(gw.peer_stats(GW).and_then(|s| s.last_received), Some(later));
    }

    #[test]
    fn same_size_datagrams_to_one_destination_coalesce_for_gso() {
        let now = Instant::now();
        let (mut cl, mut gw) = established(now);
        let sizes = [
            1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 500, 1000, 1000,
        ];
        for (i, len) in sizes.iter().enumerate() {
            cl.handle_ip_packet(CL, &ipv4(i as u32, *len), now)
                .expect("up");
        }
        let mut shapes = Vec::new();
        let mut datagrams = Vec::new();
        while let Some(t) = cl.poll_transmit(4) {
            shapes.push((t.segment_count(), t.segment_size, t.contents.len()));
            datagrams.extend(t.segments().map(|s| (t.dst, s.to_vec())));
        }
        let seg = 1000 + DATA_OVERHEAD;
        assert_eq!(
            shapes,
            vec![
                (4, Some(seg), 4 * seg),
                (4, Some(seg), 4 * seg),
                // Two full segments and the shorter one close a batch.
                (3, Some(seg), 2 * seg + 500 + DATA_OVERHEAD),
                (2, Some(seg), 2 * seg),
            ]
        );
        let got = feed(&mut gw, client_addr(), datagrams, now);
        let want: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, len)| (GW, ipv4(i as u32, *len)))
            .collect();
        assert_eq!(got, want);
        // The buffer rewinds once drained: the next datagram starts at offset 0 again.
        assert_eq!(cl.tx.used, 0);
    }

    #[test]
    fn a_queue_that_is_never_fully_drained_does_not_fill_up() {
        let now = Instant::now();
        let mut gw = gateway(2, 9, now);
        let mut cl = Engine::new(
            EngineConfig {
                max_queued_bytes: 8 * 1024,
                ..EngineConfig::default()
            },
            now,
        );
        cl.add_peer(CL, client_config(2, 9), now).expect("peer");
        cl.handle_ip_packet(CL, &ipv4(0, 60), now).expect("queued");
        converge(&mut cl, &mut gw, now);
        let mut out = vec![0u8; MAX_DATAGRAM_LEN];
        // One datagram always stays queued: the buffer never rewinds, only compacts.
        cl.handle_ip_packet(CL, &ipv4(1, 1000), now).expect("up");
        for seq in 2..500 {
            cl.handle_ip_packet(CL, &ipv4(seq, 1000), now)
                .expect("never full");
            let t = cl.poll_transmit(1).expect("queued");
            let d = t.contents.to_vec();
            match gw.handle_datagram(client_addr(), &d, &mut out, now) {
                Ok(Received::Packet { packet, .. }) => {
                    assert_eq!(packet, &ipv4(seq - 1, 1000)[..]);
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(cl.queued_datagrams(), 1);
        }
        assert!(cl.tx.buf.len() < 4 * COMPACT_MIN_BYTES + MAX_DATAGRAM_LEN);
        assert_eq!(cl.stats().dropped.total(), 0);
    }

    /// Informational: encapsulate + decapsulate rate through the engines, one thread, in
    /// memory. No assertion on speed (run with `--release` for meaningful figures).
    #[test]
    fn in_memory_throughput_report() {
        const N: u32 = 20_000;
        const LEN: usize = 1_420;
        let now = Instant::now();
        let (mut cl, mut gw) = established(now);
        let packet = ipv4(1, LEN);
        let mut out = vec![0u8; MAX_DATAGRAM_LEN];
        let started = Instant::now();
        let mut received = 0u32;
        for _ in 0..N / 64 {
            for _ in 0..64 {
                cl.handle_ip_packet(CL, &packet, now).expect("up");
            }
            while let Some(t) = cl.poll_transmit(64) {
                for d in t.segments() {
                    if let Ok(Received::Packet { .. }) =
                        gw.handle_datagram(client_addr(), d, &mut out, now)
                    {
                        received += 1;
                    }
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(received, N / 64 * 64);
        println!(
            "engine in-memory: {received} x {LEN} B encapsulate+decapsulate in {secs:.3} s = \
             {:.0} packets/s, {:.2} Gbit/s (one thread, {} build)",
            f64::from(received) / secs,
            f64::from(received) * LEN as f64 * 8.0 / secs / 1e9,
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        );
    }
}
