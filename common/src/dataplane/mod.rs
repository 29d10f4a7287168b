//! The WireGuard data plane shared by the gateway and the client: a sans-IO [`Engine`] that owns
//! every peer's tunnel, and a batching UDP socket ([`BatchUdpSocket`]) for the thin tokio shell
//! that drives it.
//!
//! Layers, bottom up:
//! - [`tunn`]: the seam over boringtun's `noise::Tunn`, the only code that names boringtun, so a
//!   fork can replace it. It guards boringtun's panicking buffer sizes and hides its clock.
//! - [`engine`]: peers keyed by [`PeerId`] (one per grant), routing of datagrams to peers,
//!   one timer heap, one transmit queue. Packets and `now` in, transmits and deadlines out.
//! - [`udp`]: one UDP socket with `recvmmsg` + GRO and GSO sends through `quinn-udp`.
//!
//! # Driving the engine
//!
//! One task owns the engine and calls, in a loop (see the `run_pair` test in [`udp`]):
//!
//! 1. [`Engine::add_peer`] / [`Engine::remove_peer`] when the control plane says so (a
//!    removed peer carries no further packet, in or out, from that call on);
//! 2. for each received datagram, [`Engine::handle_datagram`] with a reusable output buffer of
//!    [`MAX_DATAGRAM_LEN`] bytes; a [`Received::Packet`] goes to the packet filter and then the
//!    TUN device or userspace stack;
//! 3. for each IP packet that the filter routes to a peer, [`Engine::handle_ip_packet`];
//! 4. after each batch of inputs, drain [`Engine::poll_transmit`] into the socket, passing the
//!    socket's [`BatchUdpSocket::max_gso_segments`];
//! 5. sleep until [`Engine::poll_timeout`] (or the next input), then call
//!    [`Engine::handle_timeout`] and go to 4.
//!
//! # Invariants
//!
//! - The engine never reads a clock: every `now` comes from the caller (one monotonic clock).
//!   boringtun reads its own monotonic clock inside the seam for WireGuard's protocol timers; the
//!   two only have to agree on the passing of time, not on instants.
//! - The engine authenticates and routes; it does not filter. A decrypted packet is tagged with
//!   the peer whose session authenticated it, and the gateway's filter checks its source address,
//!   destination and ports against that peer's grant.
//! - A peer's endpoint is only learned from datagrams that authenticated (handshake or data),
//!   never from cookie messages or failures.
//! - Input from the network never panics the engine: size guards run before boringtun, and every
//!   dropped datagram is counted under a [`DropReason`].
//! - No per-packet allocation on the steady-state path: output buffers are the caller's or the
//!   engine's reusable transmit buffer (boringtun copies packets only while a handshake is
//!   pending). No locks are taken by our code; state has one owner.

pub mod engine;
pub mod tunn;
pub mod udp;

pub use engine::{
    DropCounts, DropReason, Engine, EngineConfig, EngineError, EngineStats, PeerConfig, PeerId,
    PeerStats, Received, Transmit,
};
pub use tunn::{MAX_DATAGRAM_LEN, MAX_IP_PACKET_LEN, PresharedKey};
pub use udp::{BatchUdpSocket, RecvBatch, SocketStats};
