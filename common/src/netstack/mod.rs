//! The userspace TCP/IP stack behind both no-root data-plane modes (DESIGN.md §3).
//!
//! A WireGuard tunnel carries IP packets. With a TUN device the kernel turns them into sockets;
//! without root there is no TUN device, so this module does the kernel's part in userspace with
//! [smoltcp]. It is used on both ends:
//!
//! - **Gateway** ([`Side::Gateway`]): decrypted packets from a client (already filtered by the
//!   enforcement core) come in; every new client flow — a TCP SYN or the first UDP datagram to a
//!   resource `ip:port` — is announced as a [`NewFlow`]. The shell dials the real resource with an
//!   ordinary socket and then calls [`Netstack::accept_flow`] (the stack *terminates* the flow,
//!   answering as the resource) or [`Netstack::reject_flow`] (the client gets a TCP reset, as it
//!   would from the resource itself). Until then the client's SYN is held unanswered, so a
//!   client never sees a handshake complete for a resource that refuses it. The stack runs with
//!   smoltcp's `any_ip`, answering for every destination the enforcement core let through;
//!   UDP flows to one resource endpoint share one smoltcp socket and are told apart by the
//!   client's address.
//! - **Client** ([`Side::Client`]): local port forwards and a SOCKS5 proxy accept ordinary
//!   loopback connections; for each one the stack opens a flow from the client's tunnel address
//!   with [`Netstack::connect_tcp`] (or [`Netstack::connect_udp`]) and the shell relays bytes.
//!
//! # Shape
//!
//! [`Netstack`] is sans-IO: it never reads a clock, never touches a socket and never spawns. Time
//! is the `now` argument, randomness is the seed given to [`Netstack::new`], packets are byte
//! slices in and `Vec<u8>` out. [`shell`] is the thin tokio layer that moves bytes between the
//! core, the tunnel and real sockets, one event loop per shell.
//!
//! # Call order
//!
//! ```text
//! new(config, seed, now)
//! loop {
//!     handle_ip_packet(pkt, now)      for every packet out of the tunnel (any number)
//!     handle_timeout(now)             when poll_timeout() has passed
//!     poll_new_flow()                 gateway: until None; then accept_flow / reject_flow
//!     poll_flow_event()               until None; Readable → recv until WouldBlock,
//!                                     Writable → send again, Closed → forget the id
//!     send / recv / close / abort     whenever the other side of the relay has news
//!     poll_ip_packet()                until None; each packet goes into the tunnel
//!     wait until poll_timeout() or new input
//! }
//! ```
//!
//! Calls in between the inputs are cheap: the stack runs smoltcp lazily, once per batch, when an
//! output is asked for.
//!
//! # Invariants
//!
//! - **Bounded.** At most [`Config::max_flows`] flows (including TCP connections lingering in
//!   TIME-WAIT, which are evicted first when the table is full); per-flow buffers of fixed size;
//!   bounded packet queues in both directions. A full receive queue drops packets, a full
//!   transmit queue stops smoltcp from sending more (backpressure), never unbounded growth.
//! - **No cross-wiring of flows.** On the gateway a flow's socket is created in the LISTEN state
//!   only inside [`Netstack::accept_flow`], after every queued packet has been processed, and is
//!   fed exactly that flow's SYN; a reset during the handshake (which would put smoltcp's socket
//!   back into LISTEN) is handled here and removes the socket. So no listening socket ever exists
//!   while another flow's packet could reach it.
//! - **Edge-triggered events.** `Readable` is raised once, then again only after a
//!   [`Netstack::recv`] returned [`FlowError::WouldBlock`] or emptied the receive buffer;
//!   `Writable` only after a [`Netstack::send`] could not take everything (`Connected`, and for
//!   UDP creation, already mean "writable"). `Closed` is raised exactly once per flow unless the
//!   caller ended it with `close` (UDP), `abort` or `reject_flow`; after `Closed` the id is
//!   unknown. A relay that stops reading before `WouldBlock` must come back by itself.
//! - **Memory.** Each TCP flow owns `tcp_rx_buffer + tcp_tx_buffer` bytes (1 MiB by default,
//!   allocated zeroed so untouched pages cost nothing); with `max_flows` that bounds the stack.
//! - **Parsed once, at the edge.** Every packet is checked (lengths, checksums for new flows,
//!   unicast addresses, no fragments) before smoltcp sees it; a bad packet is dropped with a
//!   [`PacketError`], never a panic.

mod device;
mod packet;
pub mod shell;
mod stack;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::Duration;

use ipnet::IpNet;

pub use stack::Netstack;

/// Which end of the tunnel a [`Netstack`] serves; it decides whether new flows are accepted
/// from the tunnel (gateway) or opened towards it (client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Terminates client flows for any destination (smoltcp `any_ip`) and announces them with
    /// [`Netstack::poll_new_flow`].
    Gateway,
    /// Opens flows from the client's tunnel address; never accepts flows from the tunnel.
    Client,
}

/// The transport protocol of a flow; the only two the userspace mode carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// A byte stream with connection set-up, backpressure and orderly close.
    Tcp,
    /// Datagrams; a flow is one (local, remote) pair and ends when idle.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Names one flow for its whole life. Ids are never reused by one [`Netstack`], so a late
/// call with an old id fails with [`FlowError::UnknownFlow`] instead of touching a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowId(u64);

impl FlowId {
    /// The number behind the id, for logs and metrics.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "flow#{}", self.0)
    }
}

/// A flow a client opened through the tunnel, announced on the gateway so the shell can dial
/// the resource before the stack answers for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewFlow {
    /// The id to pass to [`Netstack::accept_flow`] or [`Netstack::reject_flow`].
    pub id: FlowId,
    /// TCP (a SYN arrived) or UDP (a first datagram arrived).
    pub protocol: Protocol,
    /// The client's tunnel address and port.
    pub src: SocketAddr,
    /// The resource address and port the client asked for.
    pub dst: SocketAddr,
}

/// Why a flow ended; lets the shell tell a local application the truth (reset vs. EOF).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides closed in order and all data was delivered.
    Finished,
    /// The peer reset the connection (or refused it).
    Reset,
    /// No answer in time: handshake, retransmissions, keep-alives, accept or UDP idle timeout.
    TimedOut,
}

/// Something the relay has to act on; see the module docs for the edge-triggered rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEvent {
    /// The TCP handshake completed; data can flow.
    Connected(FlowId),
    /// Data (or end of stream) is waiting; call [`Netstack::recv`] until `WouldBlock`.
    Readable(FlowId),
    /// Buffer space came free after a short [`Netstack::send`].
    Writable(FlowId),
    /// The flow ended; the id is now unknown. Raised once, and not for flows the caller
    /// ended itself with `abort`, `reject_flow` or (UDP) `close`.
    Closed(FlowId, CloseReason),
}

/// Settings of one [`Netstack`]; [`Config::client`] and [`Config::gateway`] give defaults tuned
/// for throughput over WireGuard.
#[derive(Debug, Clone)]
pub struct Config {
    /// Gateway or client behaviour.
    pub side: Side,
    /// Interface addresses: the client's tunnel address(es), at most one per IP family. On a
    /// gateway they are optional (it answers for any address) and only give smoltcp a default
    /// route per family.
    pub addresses: Vec<IpNet>,
    /// IP MTU of the tunnel; 1420 is WireGuard's default over IPv4. TCP's MSS follows from it.
    pub mtu: usize,
    /// Receive buffer of each TCP flow; also the largest window advertised (window scaling is
    /// used above 64 KiB).
    pub tcp_rx_buffer: usize,
    /// Send buffer of each TCP flow; [`Netstack::send`] takes at most this much unacknowledged
    /// data.
    pub tcp_tx_buffer: usize,
    /// Most bytes of datagrams queued per UDP flow before new ones are dropped.
    pub udp_queue_bytes: usize,
    /// Most flows alive at once (TCP connections in TIME-WAIT included, evicted first).
    pub max_flows: usize,
    /// Most packets queued from the tunnel before the stack processes them; more are dropped.
    pub rx_queue_packets: usize,
    /// Most packets queued for the tunnel; when reached smoltcp stops sending until the caller
    /// takes packets with [`Netstack::poll_ip_packet`].
    pub tx_queue_packets: usize,
    /// Client: how long a TCP handshake may take.
    pub connect_timeout: Duration,
    /// Gateway: how long a new flow may wait for `accept_flow`/`reject_flow` before the client
    /// is reset. Keep it above the shell's dial timeout.
    pub accept_timeout: Duration,
    /// Abort an established TCP flow when nothing was heard from the peer for this long,
    /// keep-alives and retransmissions included.
    pub tcp_timeout: Duration,
    /// Interval of TCP keep-alives; keeps the gateway's flow entry fresh and detects dead
    /// peers. Must be below `tcp_timeout`.
    pub tcp_keep_alive: Option<Duration>,
    /// A UDP flow with no datagram either way for this long is closed.
    pub udp_idle_timeout: Duration,
    /// Client: local ports for new flows (smoltcp does no port allocation).
    pub ephemeral_ports: RangeInclusive<u16>,
}

impl Config {
    /// Defaults for a client whose tunnel address(es) are `addresses`.
    pub fn client(addresses: Vec<IpNet>) -> Self {
        Self::with_side(Side::Client, addresses)
    }

    /// Defaults for a gateway; `addresses` may be empty.
    pub fn gateway(addresses: Vec<IpNet>) -> Self {
        Self::with_side(Side::Gateway, addresses)
    }

    fn with_side(side: Side, addresses: Vec<IpNet>) -> Self {
        Self {
            side,
            addresses,
            mtu: 1420,
            tcp_rx_buffer: 512 * 1024,
            tcp_tx_buffer: 512 * 1024,
            udp_queue_bytes: 256 * 1024,
            max_flows: 1024,
            rx_queue_packets: 1024,
            tx_queue_packets: 512,
            connect_timeout: Duration::from_secs(20),
            accept_timeout: Duration::from_secs(15),
            tcp_timeout: Duration::from_secs(120),
            tcp_keep_alive: Some(Duration::from_secs(30)),
            udp_idle_timeout: Duration::from_secs(60),
            ephemeral_ports: 49152..=65535,
        }
    }

    /// The largest UDP payload that fits the MTU for a flow of this address family.
    pub fn max_datagram(&self, addr: IpAddr) -> usize {
        let ip_header = if addr.is_ipv4() { 20 } else { 40 };
        self.mtu.saturating_sub(ip_header + 8)
    }
}

/// A configuration the stack cannot run with; the message names the field to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The MTU is outside what IPv6 and smoltcp allow.
    #[error("mtu {0} is outside 1280..=65535")]
    Mtu(usize),
    /// A TCP buffer is too small for two full segments or above smoltcp's 1 GiB limit.
    #[error("tcp buffer size {0} must be between twice the MTU and 1 GiB")]
    TcpBuffer(usize),
    /// Zero flows or zero-length queues.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// An interface address is not a unicast address.
    #[error("interface address {0} is not unicast")]
    NotUnicast(IpAddr),
    /// More than one address per family (smoltcp holds two).
    #[error("at most one IPv4 and one IPv6 interface address")]
    TooManyAddresses,
    /// A client has nothing to send from.
    #[error("a client needs at least one tunnel address")]
    NoAddress,
    /// The ephemeral port range is empty or contains port 0.
    #[error("ephemeral port range must be non-empty and exclude port 0")]
    Ports,
    /// Keep-alives at or above the timeout would let idle, healthy flows time out.
    #[error("tcp_keep_alive must be shorter than tcp_timeout")]
    KeepAlive,
}

/// Why a flow operation did not happen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlowError {
    /// Nothing to read, or no buffer space to write, right now; wait for the matching
    /// [`FlowEvent`]. Not a failure.
    #[error("operation would block")]
    WouldBlock,
    /// The id was never issued, or the flow already ended.
    #[error("{0} is unknown or has ended")]
    UnknownFlow(FlowId),
    /// The flow table holds `max_flows` live flows; raise `max_flows` or wait for flows to end.
    #[error("the flow table is full ({0} flows)")]
    TooManyFlows(usize),
    /// The operation belongs to the other [`Side`].
    #[error("this operation is only available on the {0:?} side")]
    WrongSide(Side),
    /// `accept_flow`/`reject_flow` on a flow that was already accepted.
    #[error("{0} is not waiting to be accepted")]
    NotPending(FlowId),
    /// No interface address of the destination's IP family.
    #[error("no tunnel address of the same IP family as {0}")]
    NoSourceAddress(IpAddr),
    /// Every ephemeral port is in use.
    #[error("no free local port in the ephemeral range")]
    PortsExhausted,
    /// The datagram does not fit the MTU (the stack does not fragment).
    #[error("datagram of {len} bytes exceeds the {max}-byte limit")]
    DatagramTooLarge {
        /// Size offered.
        len: usize,
        /// Largest size that fits.
        max: usize,
    },
    /// `send` after `close` on a TCP flow.
    #[error("the flow was closed for sending")]
    SendAfterClose,
    /// The connection is gone (reset or timed out); a `Closed` event follows.
    #[error("the connection was lost")]
    ConnectionLost,
    /// smoltcp refused the endpoints (e.g. port 0 or unspecified address).
    #[error("the destination {0} cannot be used")]
    Unaddressable(SocketAddr),
    /// The client's SYN was not accepted by the stack when replayed (should not happen; the
    /// SYN is checked when it arrives).
    #[error("the handshake of {0} failed")]
    HandshakeFailed(FlowId),
}

/// Why a packet from the tunnel was dropped. Never fatal: log at TRACE and go on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// Not a well-formed IPv4/IPv6 packet, or a truncated or bad-checksum TCP/UDP header.
    #[error("malformed packet")]
    Malformed,
    /// Source or destination is unspecified, multicast or broadcast.
    #[error("source or destination is not a unicast address")]
    NotUnicast,
    /// Larger than any IP packet can be.
    #[error("packet of {0} bytes is too large")]
    TooLarge(usize),
    /// The receive queue is full: the caller fed more than `rx_queue_packets` without polling.
    #[error("receive queue full")]
    QueueFull,
    /// A new flow could not be created because the flow table is full.
    #[error("flow table full")]
    FlowTableFull,
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets accepted from the tunnel.
    pub packets_in: u64,
    /// Packets handed to the tunnel.
    pub packets_out: u64,
    /// Packets dropped as malformed or not unicast.
    pub dropped_malformed: u64,
    /// Packets dropped because the receive queue was full.
    pub dropped_queue_full: u64,
    /// Datagrams dropped because a UDP flow's queue was full or no flow matched.
    pub dropped_datagrams: u64,
    /// New flows refused because the table was full.
    pub flows_refused: u64,
    /// Flows opened (either side).
    pub flows_opened: u64,
}
