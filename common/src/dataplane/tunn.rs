//! The seam over boringtun's `noise::Tunn`: the only file in Wardgate that names a boringtun type.
//!
//! Why a seam: boringtun 0.7 is the WireGuard implementation today, but a fork (for example
//! `gotatun`) may replace it. Everything above this file speaks in our types ([`Tunnel`],
//! [`LocalIdentity`], [`PeerIndex`], [`PresharedKey`], [`TunnelError`]) so a swap touches one file.
//!
//! What the seam hides or guards:
//! - **Panics.** `Tunn::encapsulate` panics when `dst` is shorter than `max(148, len + 32)`, and
//!   decrypting a data message panics when `dst` is shorter than the ciphertext. Every call here
//!   checks the sizes first and returns [`TunnelError::BufferTooSmall`] or
//!   [`TunnelError::PacketTooLarge`] instead.
//! - **The clock.** boringtun reads a monotonic clock inside `Tunn` (handshake retransmits,
//!   session expiry, rate-limiter resets). Nothing here takes or returns an `Instant`, so callers
//!   keep their own `now` and cannot mix the two clocks up.
//! - **The flush loop.** After a handshake message produces a reply, boringtun may hold packets
//!   that were queued while no session existed; they come out only by calling `decapsulate` with
//!   an empty datagram until it returns `Done`. [`Tunnel::decapsulate`] runs that loop (bounded)
//!   after every authenticated datagram and writes the results into a [`TransmitSink`].
//! - **Routing keys.** [`LocalIdentity::identify_initiator`] checks `mac1` (cheap) and only then
//!   opens a handshake initiation (one Diffie-Hellman) to learn the initiator's static key, so an
//!   engine with many peers can find the right one; [`classify`] reads the receiver index that
//!   every other message carries.
//!
//! Buffers are always the caller's: decrypted packets land in an `out` slice, datagrams to send
//! land in regions the [`TransmitSink`] hands out, so nothing here allocates per packet (boringtun
//! itself copies a packet only while it waits for a handshake).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use x25519_dalek::{PublicKey, StaticSecret};

/// Size of a handshake initiation, and the smallest `dst` boringtun accepts for any call that may
/// start a handshake.
pub const HANDSHAKE_INIT_LEN: usize = 148;
/// Size of a handshake response.
pub const HANDSHAKE_RESPONSE_LEN: usize = 92;
/// Size of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 64;
/// Bytes a data message adds to the IP packet it carries (type, receiver index, counter, tag).
pub const DATA_OVERHEAD: usize = 32;
/// The largest UDP payload (65,535 minus the 8-byte UDP header). Longer datagrams cannot come
/// from a socket, so anything longer is refused as oversize before it reaches boringtun.
pub const MAX_DATAGRAM_LEN: usize = 65_527;
/// The largest IP packet the tunnel carries: one that still fits a single UDP datagram once
/// encrypted. Real tunnels use an MTU near 1,420; this is the hard limit, not the target.
pub const MAX_IP_PACKET_LEN: usize = MAX_DATAGRAM_LEN - DATA_OVERHEAD;

/// The `dst` length boringtun needs to encapsulate a packet of `packet_len` bytes without
/// panicking: room for the data message, or for a handshake initiation if no session exists yet.
pub const fn encapsulated_len(packet_len: usize) -> usize {
    let data = packet_len + DATA_OVERHEAD;
    if data > HANDSHAKE_INIT_LEN {
        data
    } else {
        HANDSHAKE_INIT_LEN
    }
}

/// How many packets boringtun keeps while a handshake is pending (its `MAX_QUEUE_DEPTH`); it
/// drops further ones without saying so, so the seam counts them itself.
pub const HANDSHAKE_BACKLOG: usize = 256;

/// The flush loop never needs more rounds than there are queued packets; this bound only guards
/// against a library bug.
const MAX_FLUSH_ROUNDS: usize = HANDSHAKE_BACKLOG + 4;

const MSG_HANDSHAKE_INIT: u8 = 1;
const MSG_COOKIE_REPLY: u8 = 3;
const MSG_DATA: u8 = 4;

/// A 24-bit local index identifying one [`Tunnel`] inside an engine.
///
/// boringtun shifts it left by 8 bits and uses the low byte to count sessions, so every
/// response, cookie reply and data message addressed to this tunnel carries
/// `index << 8 | session` as its receiver index: [`PeerIndex::from_receiver`] undoes that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerIndex(u32);

impl PeerIndex {
    /// The largest index value (24 bits), so engines know how many tunnels they can address.
    pub const MAX: u32 = (1 << 24) - 1;

    /// Wraps an index; `None` when it does not fit 24 bits (boringtun would silently drop the
    /// high bits and two tunnels could collide).
    pub const fn new(index: u32) -> Option<Self> {
        if index <= Self::MAX {
            Some(Self(index))
        } else {
            None
        }
    }

    /// The tunnel a receiver index on the wire belongs to.
    pub const fn from_receiver(receiver_index: u32) -> Self {
        Self(receiver_index >> 8)
    }

    /// The raw 24-bit value, for maps keyed by index.
    pub const fn get(self) -> u32 {
        self.0
    }
}

/// A WireGuard preshared key (one per grant), mixed into the handshake so that a grant's
/// tunnel needs the controller-issued secret as well as the key pair.
///
/// `Debug` never prints the bytes, and the bytes are overwritten on drop (best effort: boringtun
/// keeps its own copy for the tunnel's lifetime).
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey([u8; 32]);

impl PresharedKey {
    /// Wraps raw key bytes (as decoded by `keys::decode_key`).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl From<[u8; 32]> for PresharedKey {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

impl Drop for PresharedKey {
    fn drop(&mut self) {
        self.0 = [0; 32];
        std::hint::black_box(&self.0);
    }
}

/// Why the seam refused or failed a call. Each variant says what to check next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    /// A datagram longer than any UDP payload: not from a real socket.
    #[error("datagram of {len} bytes is longer than the largest UDP payload ({max} bytes)")]
    Oversize {
        /// Length of the refused datagram.
        len: usize,
        /// [`MAX_DATAGRAM_LEN`].
        max: usize,
    },
    /// An IP packet too long to fit one UDP datagram once encrypted.
    #[error(
        "IP packet of {len} bytes is longer than the tunnel carries ({max} bytes); lower the tunnel MTU"
    )]
    PacketTooLarge {
        /// Length of the refused packet.
        len: usize,
        /// [`MAX_IP_PACKET_LEN`].
        max: usize,
    },
    /// The caller's output buffer is too short for this datagram.
    #[error(
        "output buffer of {got} bytes is shorter than the {needed} bytes this datagram needs; pass a buffer of MAX_DATAGRAM_LEN bytes"
    )]
    BufferTooSmall {
        /// Bytes the call needed.
        needed: usize,
        /// Bytes the buffer had.
        got: usize,
    },
    /// Not a WireGuard message: unknown type, wrong length or non-zero reserved bytes, or a
    /// decrypted payload that is not an IPv4/IPv6 packet.
    #[error(
        "not a WireGuard message (unknown type, wrong length or reserved bytes), or its payload is not an IP packet"
    )]
    Malformed,
    /// A MAC, AEAD tag or static key did not match: wrong keys, wrong preshared key, or forgery.
    #[error(
        "authentication failed (MAC, AEAD tag or static key mismatch); check the peer's public key and preshared key"
    )]
    Authentication,
    /// A data counter or handshake timestamp seen before or outside the replay window.
    #[error("replayed message (counter or handshake timestamp already seen)")]
    Replay,
    /// A data message for a session that does not exist (not yet established, or expired).
    #[error("no session for this message: the handshake has not completed or the session expired")]
    NoSession,
    /// A receiver index this tunnel did not issue (a stale session or a stray packet).
    #[error("message names a receiver index this tunnel did not issue")]
    WrongIndex,
    /// A handshake message that does not fit the handshake state (late duplicate, stray reply).
    #[error("handshake message does not fit the current handshake state (duplicate or stale)")]
    UnexpectedMessage,
    /// No session yet and [`HANDSHAKE_BACKLOG`] packets already wait for the handshake: this
    /// one was dropped.
    #[error(
        "{HANDSHAKE_BACKLOG} packets already wait for the handshake; this one was dropped (is the peer reachable?)"
    )]
    HandshakeBacklog,
    /// The tunnel gave up (no handshake for too long); the next packet sent starts a new one.
    #[error("the tunnel's handshake expired; sending a packet starts a new handshake")]
    Expired,
    /// Too many handshakes and no source address to answer with a cookie.
    #[error(
        "handshake refused under load: too many handshakes and no source address for a cookie reply"
    )]
    UnderLoad,
    /// boringtun answered in a way this seam does not expect.
    #[error(
        "boringtun returned a result the dataplane seam does not expect; this is a bug, please report it"
    )]
    Unexpected,
}

impl From<WireGuardError> for TunnelError {
    fn from(e: WireGuardError) -> Self {
        match e {
            WireGuardError::IncorrectPacketLength
            | WireGuardError::WrongPacketType
            | WireGuardError::InvalidPacket
            | WireGuardError::InvalidTai64nTimestamp => Self::Malformed,
            WireGuardError::WrongKey
            | WireGuardError::InvalidMac
            | WireGuardError::InvalidAeadTag => Self::Authentication,
            WireGuardError::WrongTai64nTimestamp
            | WireGuardError::InvalidCounter
            | WireGuardError::DuplicateCounter => Self::Replay,
            WireGuardError::NoCurrentSession => Self::NoSession,
            WireGuardError::WrongIndex => Self::WrongIndex,
            WireGuardError::UnexpectedPacket => Self::UnexpectedMessage,
            WireGuardError::ConnectionExpired => Self::Expired,
            WireGuardError::UnderLoad => Self::UnderLoad,
            WireGuardError::DestinationBufferTooSmall | WireGuardError::LockFailed => {
                Self::Unexpected
            }
        }
    }
}

/// Where the seam writes datagrams to send (handshake replies, keepalives, flushed packets).
///
/// The engine implements it over one reusable buffer, so producing a datagram costs no
/// allocation and no copy: boringtun writes straight into the reserved region.
pub trait TransmitSink {
    /// A writable region of at least `len` bytes for the next datagram. Calling it again without
    /// [`commit`](Self::commit) discards the previous reservation.
    fn reserve(&mut self, len: usize) -> &mut [u8];
    /// The first `len` bytes of the last reserved region are a datagram to send.
    fn commit(&mut self, len: usize);
}

/// A parsed WireGuard message header: which kind, and for all but initiations, which local
/// tunnel it is addressed to. Routing needs nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// A handshake initiation; the sender is known only after [`LocalIdentity::identify_initiator`].
    Initiation,
    /// A handshake response to one of our initiations.
    Response {
        /// The local tunnel it answers.
        receiver: PeerIndex,
    },
    /// A cookie reply (the other side is under load).
    CookieReply {
        /// The local tunnel it is for.
        receiver: PeerIndex,
    },
    /// A data message (an IP packet, or an empty keepalive).
    Data {
        /// The local tunnel whose session encrypted it.
        receiver: PeerIndex,
    },
}

/// Reads the header of a datagram: type, exact length for handshake messages, reserved bytes.
/// Refuses oversize and malformed datagrams without touching any key.
pub fn classify(datagram: &[u8]) -> Result<Message, TunnelError> {
    if datagram.len() > MAX_DATAGRAM_LEN {
        return Err(TunnelError::Oversize {
            len: datagram.len(),
            max: MAX_DATAGRAM_LEN,
        });
    }
    Ok(match Tunn::parse_incoming_packet(datagram)? {
        Packet::HandshakeInit(_) => Message::Initiation,
        Packet::HandshakeResponse(p) => Message::Response {
            receiver: PeerIndex::from_receiver(p.receiver_idx),
        },
        Packet::PacketCookieReply(p) => Message::CookieReply {
            receiver: PeerIndex::from_receiver(p.receiver_idx),
        },
        Packet::PacketData(p) => Message::Data {
            receiver: PeerIndex::from_receiver(p.receiver_idx),
        },
    })
}

/// What [`LocalIdentity::identify_initiator`] learned from a handshake initiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiation {
    /// `mac1` was not made for this identity's public key: try the next identity.
    NotForUs,
    /// The initiation is for us and was sent by this static public key.
    Initiator(PublicKey),
    /// Under load and `mac2` missing or stale: a cookie reply was written to the sink and the
    /// initiation must not be processed further.
    CookieSent,
}

/// One local static key pair, with the handshake rate limiter shared by every tunnel that uses
/// it. The gateway has one; a client has one per grant (each grant gets a fresh key pair).
pub struct LocalIdentity {
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
}

impl fmt::Debug for LocalIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalIdentity")
            .field("public", &crate::keys::encode_key(self.public.as_bytes()))
            .finish_non_exhaustive()
    }
}

impl LocalIdentity {
    /// Wraps a static secret. Above `handshakes_per_second` handshake messages for this key,
    /// initiators must prove their address with a cookie round trip (WireGuard's DoS defence).
    pub fn new(secret: StaticSecret, handshakes_per_second: u64) -> Self {
        let public = PublicKey::from(&secret);
        // Every initiation passes the shared limiter twice: once in `identify_initiator`, once
        // inside `Tunn::decapsulate`. Doubling the limit keeps the configured figure honest.
        let limiter = Arc::new(RateLimiter::new(
            &public,
            handshakes_per_second.saturating_mul(2),
        ));
        Self {
            secret,
            public,
            limiter,
        }
    }

    /// This identity's public key: what peers must be configured with.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Starts a new rate-limit period. Call about once a second (the engine's housekeeping
    /// timer does); boringtun only resets when at least a second has passed by its clock.
    pub fn reset_rate_limit(&self) {
        self.limiter.reset_count();
    }

    /// Checks an initiation's `mac1` against this identity and, if it matches, decrypts the
    /// initiator's static public key so the caller can find the peer it belongs to.
    ///
    /// `from` is the datagram's source address, needed for cookie replies under load.
    pub fn identify_initiator(
        &self,
        from: IpAddr,
        datagram: &[u8],
        sink: &mut impl TransmitSink,
    ) -> Result<Initiation, TunnelError> {
        let mut cookie = [0u8; COOKIE_REPLY_LEN];
        match self
            .limiter
            .verify_packet(Some(from), datagram, &mut cookie)
        {
            Ok(Packet::HandshakeInit(init)) => {
                let half = parse_handshake_anon(&self.secret, &self.public, &init)?;
                Ok(Initiation::Initiator(PublicKey::from(
                    half.peer_static_public,
                )))
            }
            Ok(_) => Err(TunnelError::Malformed),
            Err(TunnResult::Err(WireGuardError::InvalidMac)) => Ok(Initiation::NotForUs),
            Err(TunnResult::Err(e)) => Err(e.into()),
            Err(TunnResult::WriteToNetwork(reply)) => {
                let len = reply.len();
                let dst = sink.reserve(len);
                dst[..len].copy_from_slice(reply);
                sink.commit(len);
                Ok(Initiation::CookieSent)
            }
            Err(_) => Err(TunnelError::Unexpected),
        }
    }
}

/// What an encapsulation produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encapsulated {
    /// A data message was written to the sink.
    Data,
    /// No session yet: the packet waits inside the tunnel and a handshake initiation was written
    /// to the sink. The packet goes out when the handshake completes.
    HandshakeStarted,
    /// No session yet and a handshake is already in flight: the packet waits (up to
    /// [`HANDSHAKE_BACKLOG`] packets; beyond that [`TunnelError::HandshakeBacklog`]).
    Queued,
}

/// What a decapsulation produced. Replies and flushed packets are already in the sink.
#[derive(Debug, PartialEq, Eq)]
pub enum Decapsulated<'a> {
    /// An authenticated IPv4 or IPv6 packet, trimmed to its header's length, in the caller's
    /// `out` buffer.
    Packet(&'a mut [u8]),
    /// An authenticated empty data message (keepalive).
    Keepalive,
    /// An authenticated handshake initiation or response; the reply (response or first
    /// keepalive) is in the sink.
    Handshake,
    /// A cookie reply was accepted; the next initiation carries `mac2`.
    CookieReceived,
    /// We are under load: a cookie reply went to the sender and the message was not processed.
    CookieSent,
}

impl Decapsulated<'_> {
    /// True when the datagram proved it came from the peer (so its source address may become
    /// the peer's endpoint). Cookie messages prove nothing about the peer's address.
    pub fn is_authenticated(&self) -> bool {
        matches!(self, Self::Packet(_) | Self::Keepalive | Self::Handshake)
    }
}

/// One WireGuard tunnel (boringtun `Tunn`): the handshake state and sessions with one peer.
pub struct Tunnel {
    inner: Tunn,
    /// Packets boringtun holds for a pending handshake, as far as the seam can tell: counted up
    /// when a packet is queued, down when the flush loop releases a data message, zeroed when
    /// the tunnel expires (boringtun clears its queue). Only used to report boringtun's silent
    /// drops, never to refuse a packet, so a miscount cannot block traffic.
    pending: usize,
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnel").finish_non_exhaustive()
    }
}

impl Tunnel {
    /// Makes a tunnel between `identity` and the peer's `remote` public key.
    ///
    /// `index` must be unique among the live tunnels of one engine: it is how replies and data
    /// messages find this tunnel. `persistent_keepalive` is in seconds (`None` or `Some(0)` off).
    pub fn new(
        identity: &LocalIdentity,
        remote: PublicKey,
        preshared_key: Option<&PresharedKey>,
        persistent_keepalive: Option<u16>,
        index: PeerIndex,
    ) -> Self {
        let inner = Tunn::new(
            identity.secret.clone(),
            remote,
            preshared_key.map(|k| k.0),
            persistent_keepalive.filter(|s| *s > 0),
            index.get(),
            Some(Arc::clone(&identity.limiter)),
        );
        Self { inner, pending: 0 }
    }

    /// Encrypts one IP packet towards the peer, or starts the handshake it needs.
    pub fn encapsulate(
        &mut self,
        packet: &[u8],
        sink: &mut impl TransmitSink,
    ) -> Result<Encapsulated, TunnelError> {
        if packet.len() > MAX_IP_PACKET_LEN {
            return Err(TunnelError::PacketTooLarge {
                len: packet.len(),
                max: MAX_IP_PACKET_LEN,
            });
        }
        let needed = encapsulated_len(packet.len());
        let dst = sink.reserve(needed);
        if dst.len() < needed {
            return Err(TunnelError::BufferTooSmall {
                needed,
                got: dst.len(),
            });
        }
        let written = match self.inner.encapsulate(packet, dst) {
            TunnResult::WriteToNetwork(d) => Some((d.len(), d.first().copied())),
            TunnResult::Done => None,
            TunnResult::Err(e) => return Err(e.into()),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                return Err(TunnelError::Unexpected);
            }
        };
        let outcome = match written {
            Some((len, kind)) => {
                sink.commit(len);
                if kind == Some(MSG_HANDSHAKE_INIT) {
                    Encapsulated::HandshakeStarted
                } else {
                    Encapsulated::Data
                }
            }
            None => Encapsulated::Queued,
        };
        if outcome != Encapsulated::Data {
            if self.pending >= HANDSHAKE_BACKLOG {
                return Err(TunnelError::HandshakeBacklog);
            }
            self.pending += 1;
        }
        Ok(outcome)
    }

    /// Handles one datagram addressed to this tunnel (route it with [`classify`] and
    /// [`LocalIdentity::identify_initiator`] first).
    ///
    /// A decrypted packet lands in `out`, which must be at least as long as `datagram`. Replies
    /// (handshake response, keepalive, cookie) and any packets that waited for the handshake go
    /// to `sink`, addressed by the caller to the datagram's sender. `from` feeds cookie replies.
    pub fn decapsulate<'a>(
        &mut self,
        from: IpAddr,
        datagram: &[u8],
        out: &'a mut [u8],
        sink: &mut impl TransmitSink,
    ) -> Result<Decapsulated<'a>, TunnelError> {
        match classify(datagram)? {
            Message::Data { .. } => {
                if out.len() < datagram.len() {
                    return Err(TunnelError::BufferTooSmall {
                        needed: datagram.len(),
                        got: out.len(),
                    });
                }
                match self.inner.decapsulate(Some(from), datagram, out) {
                    TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                        self.flush(sink);
                        Ok(Decapsulated::Packet(p))
                    }
                    TunnResult::Done => {
                        self.flush(sink);
                        Ok(Decapsulated::Keepalive)
                    }
                    TunnResult::Err(e) => Err(e.into()),
                    TunnResult::WriteToNetwork(_) => Err(TunnelError::Unexpected),
                }
            }
            kind @ (Message::Initiation
            | Message::Response { .. }
            | Message::CookieReply { .. }) => {
                let dst = sink.reserve(HANDSHAKE_INIT_LEN);
                let written = match self.inner.decapsulate(Some(from), datagram, dst) {
                    TunnResult::WriteToNetwork(d) => Some((d.len(), d.first().copied())),
                    TunnResult::Done => None,
                    TunnResult::Err(e) => return Err(e.into()),
                    TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                        return Err(TunnelError::Unexpected);
                    }
                };
                match (written, kind) {
                    (Some((len, Some(MSG_COOKIE_REPLY))), _) => {
                        sink.commit(len);
                        Ok(Decapsulated::CookieSent)
                    }
                    (Some((len, _)), _) => {
                        sink.commit(len);
                        self.flush(sink);
                        Ok(Decapsulated::Handshake)
                    }
                    (None, Message::CookieReply { .. }) => Ok(Decapsulated::CookieReceived),
                    (None, _) => Err(TunnelError::Unexpected),
                }
            }
        }
    }

    /// Runs the tunnel's timers (handshake retransmit, rekey, keepalives, session expiry),
    /// writing at most one datagram to the sink. boringtun expects this every few hundred
    /// milliseconds; it reads its own clock, so there is no `now` to pass.
    pub fn update_timers(&mut self, sink: &mut impl TransmitSink) -> Result<(), TunnelError> {
        let dst = sink.reserve(HANDSHAKE_INIT_LEN);
        let written = match self.inner.update_timers(dst) {
            TunnResult::WriteToNetwork(d) => d.len(),
            TunnResult::Done => return Ok(()),
            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                self.pending = 0;
                return Err(TunnelError::Expired);
            }
            TunnResult::Err(e) => return Err(e.into()),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                return Err(TunnelError::Unexpected);
            }
        };
        sink.commit(written);
        Ok(())
    }

    /// Sends what waited for a session: boringtun's "call decapsulate with an empty datagram
    /// until Done" loop. Each round reserves room for the largest packet the tunnel accepts, so
    /// boringtun's size assertion cannot fire.
    fn flush(&mut self, sink: &mut impl TransmitSink) {
        for _ in 0..MAX_FLUSH_ROUNDS {
            let dst = sink.reserve(MAX_DATAGRAM_LEN);
            let (len, kind) = match self.inner.decapsulate(None, &[], dst) {
                TunnResult::WriteToNetwork(d) => (d.len(), d.first().copied()),
                _ => return,
            };
            if kind == Some(MSG_DATA) {
                self.pending = self.pending.saturating_sub(1);
            }
            sink.commit(len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that keeps every datagram as its own `Vec` (tests only).
    #[derive(Default)]
    struct VecSink {
        scratch: Vec<u8>,
        sent: Vec<Vec<u8>>,
    }

    impl TransmitSink for VecSink {
        fn reserve(&mut self, len: usize) -> &mut [u8] {
            self.scratch.clear();
            self.scratch.resize(len, 0);
            &mut self.scratch
        }
        fn commit(&mut self, len: usize) {
            self.sent.push(self.scratch[..len].to_vec());
        }
    }

    /// A sink that always hands out a region that is too short.
    struct TinySink([u8; 16]);

    impl TransmitSink for TinySink {
        fn reserve(&mut self, _len: usize) -> &mut [u8] {
            &mut self.0
        }
        fn commit(&mut self, _len: usize) {}
    }

    fn ip(n: u8, len: usize) -> Vec<u8> {
        let mut p = vec![n; len];
        p[0] = 0x45;
        p[1] = 0;
        p[2..4].copy_from_slice(&u16::try_from(len).expect("len").to_be_bytes());
        p
    }

    const FROM: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn pair(psk_a: [u8; 32], psk_b: [u8; 32]) -> (Tunnel, Tunnel, LocalIdentity) {
        let a = LocalIdentity::new(StaticSecret::from([1u8; 32]), 100);
        let b = LocalIdentity::new(StaticSecret::from([2u8; 32]), 100);
        let ta = Tunnel::new(
            &a,
            *b.public_key(),
            Some(&PresharedKey::from(psk_a)),
            None,
            PeerIndex::new(1).expect("index"),
        );
        let tb = Tunnel::new(
            &b,
            *a.public_key(),
            Some(&PresharedKey::from(psk_b)),
            None,
            PeerIndex::new(2).expect("index"),
        );
        (ta, tb, b)
    }

    #[test]
    fn handshake_flushes_queued_packet_and_round_trips() {
        let (mut a, mut b, b_id) = pair([9; 32], [9; 32]);
        let mut sink = VecSink::default();
        let packet = ip(7, 100);
        assert_eq!(
            a.encapsulate(&packet, &mut sink),
            Ok(Encapsulated::HandshakeStarted)
        );
        let init = sink.sent.pop().expect("initiation");
        assert_eq!(classify(&init), Ok(Message::Initiation));

        // The responder finds who initiated before handing the message to its tunnel.
        let mut bs = VecSink::default();
        assert_eq!(
            b_id.identify_initiator(FROM, &init, &mut bs),
            Ok(Initiation::Initiator(PublicKey::from(&StaticSecret::from(
                [1u8; 32]
            ))))
        );
        let mut out = vec![0u8; MAX_DATAGRAM_LEN];
        assert_eq!(
            b.decapsulate(FROM, &init, &mut out, &mut bs),
            Ok(Decapsulated::Handshake)
        );
        let response = bs.sent.pop().expect("response");
        assert_eq!(response.len(), HANDSHAKE_RESPONSE_LEN);
        assert!(matches!(
            classify(&response),
            Ok(Message::Response { receiver }) if receiver.get() == 1
        ));

        // The initiator answers with a keepalive, then the queued packet (the flush loop).
        assert_eq!(
            a.decapsulate(FROM, &response, &mut out, &mut sink),
            Ok(Decapsulated::Handshake)
        );
        assert_eq!(sink.sent.len(), 2, "keepalive + flushed packet");
        let flushed = sink.sent.pop().expect("data");
        let keepalive = sink.sent.pop().expect("keepalive");
        assert_eq!(keepalive.len(), DATA_OVERHEAD);
        assert_eq!(
            b.decapsulate(FROM, &keepalive, &mut out, &mut bs),
            Ok(Decapsulated::Keepalive)
        );
        match b.decapsulate(FROM, &flushed, &mut out, &mut bs) {
            Ok(Decapsulated::Packet(p)) => assert_eq!(&p[..], &packet[..]),
            other => panic!("expected the packet, got {other:?}"),
        }
        // Replaying it is refused.
        assert_eq!(
            b.decapsulate(FROM, &flushed, &mut out, &mut bs),
            Err(TunnelError::Replay)
        );
    }

    #[test]
    fn wrong_psk_fails_authentication() {
        let (mut a, mut b, _) = pair([1; 32], [2; 32]);
        let mut sink = VecSink::default();
        a.encapsulate(&ip(1, 60), &mut sink).expect("init");
        let init = sink.sent.pop().expect("init");
        let mut out = vec![0u8; 2048];
        let mut bs = VecSink::default();
        // The PSK is mixed in after the initiation, so the responder still answers ...
        assert_eq!(
            b.decapsulate(FROM, &init, &mut out, &mut bs),
            Ok(Decapsulated::Handshake)
        );
        let response = bs.sent.pop().expect("response");
        // ... and the initiator refuses the response.
        assert_eq!(
            a.decapsulate(FROM, &response, &mut out, &mut sink),
            Err(TunnelError::Authentication)
        );
    }

    #[test]
    fn size_guards_never_reach_boringtun() {
        let (mut a, _, _) = pair([0; 32], [0; 32]);
        // A sink region shorter than 148 bytes would make boringtun panic.
        assert_eq!(
            a.encapsulate(&ip(1, 60), &mut TinySink([0; 16])),
            Err(TunnelError::BufferTooSmall {
                needed: HANDSHAKE_INIT_LEN,
                got: 16
            })
        );
        let big = vec![0u8; MAX_IP_PACKET_LEN + 1];
        assert!(matches!(
            a.encapsulate(&big, &mut VecSink::default()),
            Err(TunnelError::PacketTooLarge { .. })
        ));
        // A data message longer than `out`.
        let mut data = vec![0u8; 200];
        data[0] = 4;
        let mut out = [0u8; 100];
        assert!(matches!(
            a.decapsulate(FROM, &data, &mut out, &mut VecSink::default()),
            Err(TunnelError::BufferTooSmall {
                needed: 200,
                got: 100
            })
        ));
        assert_eq!(classify(&[]), Err(TunnelError::Malformed));
        assert!(matches!(
            classify(&vec![4u8; MAX_DATAGRAM_LEN + 1]),
            Err(TunnelError::Oversize { .. })
        ));
    }

    #[test]
    fn indices_are_24_bits() {
        assert!(PeerIndex::new(PeerIndex::MAX).is_some());
        assert!(PeerIndex::new(PeerIndex::MAX + 1).is_none());
        assert_eq!(PeerIndex::from_receiver(0x00AB_CD07).get(), 0xABCD);
        assert_eq!(
            format!("{:?}", PresharedKey::from([7; 32])),
            "PresharedKey(<redacted>)"
        );
    }
}
