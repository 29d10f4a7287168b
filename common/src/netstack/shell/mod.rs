//! The thin tokio layer around [`Netstack`]: one event loop per shell that moves IP packets
//! between the tunnel channels and the stack, and bytes between the stack's flows and real
//! sockets.
//!
//! - [`GatewayShell`] dials each resource a client flow names (through a pluggable [`Dialer`],
//!   so tests never reach a non-loopback address) and relays; a refused or timed-out dial
//!   resets the client's flow.
//! - [`ClientShell`] listens on loopback only: TCP and UDP port forwards to one resource each,
//!   and a SOCKS5 proxy (RFC 1928, no authentication, CONNECT to IPv4/IPv6 literals) whose
//!   destinations pass a caller-supplied allow predicate.
//!
//! The loop owns the stack and every socket; nothing is shared behind a lock. Per iteration it
//! (1) answers new flows, (2) handles stack events and pushes stack output into the tunnel,
//! (3) waits for the first of: a tunnel packet, room in the tunnel channel, a socket becoming
//! ready, a dial or SOCKS handshake finishing, the stack's timer, or shutdown. Only dials and
//! SOCKS handshakes run as tasks, bounded in number and time, held in a `JoinSet` that is
//! dropped (aborting them) when the loop ends.
//!
//! Backpressure runs end to end: a full tunnel channel leaves packets in the stack, whose full
//! transmit queue stops TCP sending, whose full send buffer makes [`Netstack::send`] return
//! `WouldBlock`, which stops the relay reading from the local socket.

mod client;
mod gateway;
mod socks5;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use tokio::io::AsyncWrite;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::{CloseReason, FlowError, FlowEvent, FlowId, Netstack};

pub use client::{AllowFn, ClientShell};
pub use gateway::{Dialer, DirectDialer, GatewayShell, GatewayShellConfig};

/// Bytes buffered per direction per relayed TCP connection, on top of the stack's buffers.
const RELAY_BUF: usize = 64 * 1024;
/// Tunnel packets taken per wake-up before the stack runs; bounds one iteration's work.
const TUNNEL_BATCH: usize = 256;
/// Rounds of (events, output) per iteration before waiting again.
const DRIVE_ROUNDS: usize = 64;
/// Read/write rounds per connection per wake-up, so one busy connection cannot starve others.
const PUMP_ROUNDS: usize = 16;
/// Datagrams moved per UDP flow per wake-up.
const UDP_ROUNDS: usize = 64;

/// The tunnel side of a shell: decrypted IP packets in, IP packets to encrypt out. The data
/// plane engine (or a test) holds the other ends.
#[derive(Debug)]
pub struct TunnelIo {
    /// Packets that came out of the tunnel. When it closes, the shell stops.
    pub from_tunnel: mpsc::Receiver<Vec<u8>>,
    /// Packets for the tunnel. A full channel pauses the stack (no packet is dropped here).
    pub to_tunnel: mpsc::Sender<Vec<u8>>,
}

/// Why a shell could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// Listeners are loopback-only: a port forward or proxy open to the network would let
    /// other machines use the user's grants.
    #[error("{0} is not a loopback address; local listeners must be on 127.0.0.1 or ::1")]
    NotLoopback(SocketAddr),
    /// The listen address could not be bound (in use, or not permitted).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

/// Half-closes a TCP stream (FIN) without awaiting: tokio's TCP shutdown completes at once.
fn shutdown_write(stream: &mut TcpStream) {
    let mut cx = Context::from_waker(Waker::noop());
    let _ = Pin::new(stream).poll_shutdown(&mut cx);
}

/// A fixed buffer with a filled window `lo..hi`.
struct Buf {
    data: Box<[u8]>,
    lo: usize,
    hi: usize,
}

impl Buf {
    fn new() -> Self {
        Self {
            data: vec![0u8; RELAY_BUF].into_boxed_slice(),
            lo: 0,
            hi: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.lo == self.hi
    }

    fn pending(&self) -> &[u8] {
        &self.data[self.lo..self.hi]
    }

    fn consume(&mut self, n: usize) {
        self.lo += n;
        if self.lo == self.hi {
            self.lo = 0;
            self.hi = 0;
        }
    }

    /// The whole buffer to fill; only call when empty.
    fn space(&mut self) -> &mut [u8] {
        &mut self.data[..]
    }

    fn filled(&mut self, n: usize) {
        self.lo = 0;
        self.hi = n;
    }

    fn set(&mut self, bytes: &[u8]) {
        self.data[..bytes.len()].copy_from_slice(bytes);
        self.filled(bytes.len());
    }
}

/// What happens to a relayed connection after a pump.
enum Fate {
    Keep,
    /// Finished in order: drop after a FIN.
    Done,
    /// Drop with a reset towards the local socket.
    Reset,
}

/// The SOCKS5 reply still owed for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SocksReply {
    None,
    /// Sent when the flow connects or fails.
    Owed,
    /// A failure reply is queued: close in order once it is written.
    Failed,
}

/// One relayed TCP connection: a real socket on one side, a stack flow on the other.
struct TcpConn {
    stream: TcpStream,
    /// From the flow, waiting for the socket.
    to_local: Buf,
    /// From the socket, waiting for the flow.
    to_net: Buf,
    local_eof: bool,
    fin_sent: bool,
    net_eof: bool,
    shut: bool,
    connected: bool,
    closed: Option<CloseReason>,
    socks: SocksReply,
}

impl TcpConn {
    fn new(stream: TcpStream, socks: bool) -> Self {
        // Interactive protocols (SSH, RDP, HL7) must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        Self {
            stream,
            to_local: Buf::new(),
            to_net: Buf::new(),
            local_eof: false,
            fin_sent: false,
            net_eof: false,
            shut: false,
            connected: false,
            closed: None,
            socks: if socks {
                SocksReply::Owed
            } else {
                SocksReply::None
            },
        }
    }

    fn wants_read(&self) -> bool {
        !self.local_eof
            && self.to_net.is_empty()
            && self.closed.is_none()
            && self.socks == SocksReply::None
    }

    fn wants_write(&self) -> bool {
        !self.to_local.is_empty()
    }

    /// Moves what can move; `true` alongside the fate when it stopped at the round cap with
    /// work left (no event will announce it again, so the relay must come back).
    fn pump(&mut self, stack: &mut Netstack, id: FlowId) -> (Fate, bool) {
        if self.socks == SocksReply::Owed {
            if let Some(reason) = self.closed {
                let code = match reason {
                    CloseReason::TimedOut => socks5::REP_HOST_UNREACHABLE,
                    _ => socks5::REP_CONNECTION_REFUSED,
                };
                self.to_local.set(&socks5::reply(code, None));
                self.socks = SocksReply::Failed;
            } else if self.connected {
                let bound = stack.flow_endpoints(id).map(|(local, _)| local);
                self.to_local
                    .set(&socks5::reply(socks5::REP_SUCCEEDED, bound));
                self.socks = SocksReply::None;
            } else {
                return (Fate::Keep, false);
            }
        }
        if self.socks == SocksReply::Failed {
            return (self.flush_then_finish(), false);
        }
        let mut capped = true;
        for _ in 0..PUMP_ROUNDS {
            let mut progress = false;
            // Flow -> local socket.
            if self.to_local.is_empty() && !self.net_eof && self.closed.is_none() {
                match stack.recv(id, self.to_local.space()) {
                    Ok(0) => {
                        self.net_eof = true;
                        progress = true;
                    }
                    Ok(n) => {
                        self.to_local.filled(n);
                        progress = true;
                    }
                    Err(FlowError::WouldBlock) => {}
                    // Gone: the Closed event says how.
                    Err(_) => self.net_eof = true,
                }
            }
            if !self.to_local.is_empty() {
                match self.stream.try_write(self.to_local.pending()) {
                    Ok(n) => {
                        self.to_local.consume(n);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        let _ = stack.abort(id);
                        return (Fate::Reset, false);
                    }
                }
            }
            let net_done = self.net_eof || self.closed == Some(CloseReason::Finished);
            if self.to_local.is_empty() && net_done && !self.shut {
                shutdown_write(&mut self.stream);
                self.shut = true;
                progress = true;
            }
            // Local socket -> flow.
            if self.wants_read() {
                match self.stream.try_read(self.to_net.space()) {
                    Ok(0) => {
                        self.local_eof = true;
                        progress = true;
                    }
                    Ok(n) => {
                        self.to_net.filled(n);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        let _ = stack.abort(id);
                        return (Fate::Reset, false);
                    }
                }
            }
            if !self.to_net.is_empty() && self.closed.is_none() {
                match stack.send(id, self.to_net.pending()) {
                    Ok(n) => {
                        self.to_net.consume(n);
                        progress = true;
                    }
                    Err(FlowError::WouldBlock) => {}
                    Err(_) => {
                        // The flow is gone; what the local side still sends has nowhere to go.
                        self.to_net.consume(self.to_net.pending().len());
                        self.local_eof = true;
                    }
                }
            }
            if self.to_net.is_empty() && self.local_eof && !self.fin_sent && self.closed.is_none() {
                let _ = stack.close(id);
                self.fin_sent = true;
                progress = true;
            }
            if !progress {
                capped = false;
                break;
            }
        }
        let fate = match self.closed {
            None => Fate::Keep,
            Some(CloseReason::Finished) => self.flush_then_finish(),
            Some(_) => Fate::Reset,
        };
        (fate, capped)
    }

    fn flush_then_finish(&mut self) -> Fate {
        while !self.to_local.is_empty() {
            match self.stream.try_write(self.to_local.pending()) {
                Ok(n) => self.to_local.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Fate::Keep,
                Err(_) => return Fate::Reset,
            }
        }
        shutdown_write(&mut self.stream);
        Fate::Done
    }
}

/// One relayed UDP flow: a connected socket to the resource (gateway) or a forward's listener
/// and the local peer it answers (client).
struct UdpConn {
    socket: Arc<UdpSocket>,
    /// `None`: `socket` is connected to the resource and read by the relay itself.
    peer: Option<SocketAddr>,
}

/// State shared by both shells: the stack, the tunnel channels and the relayed sockets.
struct Relay {
    stack: Netstack,
    tunnel_rx: mpsc::Receiver<Vec<u8>>,
    tunnel_tx: mpsc::Sender<Vec<u8>>,
    /// A packet the tunnel channel had no room for; nothing more is taken from the stack until
    /// it is sent.
    out_pending: Option<Vec<u8>>,
    tunnel_closed: bool,
    tcp: BTreeMap<FlowId, TcpConn>,
    udp: BTreeMap<FlowId, UdpConn>,
    scratch: Box<[u8]>,
    /// Connections that stopped at a round cap with work left; pumped again before waiting
    /// on anything else.
    again: BTreeSet<FlowId>,
    /// `drive` stopped at its round cap with events or packets left.
    more_output: bool,
}

impl Relay {
    fn new(stack: Netstack, tunnel: TunnelIo) -> Self {
        Self {
            stack,
            tunnel_rx: tunnel.from_tunnel,
            tunnel_tx: tunnel.to_tunnel,
            out_pending: None,
            tunnel_closed: false,
            tcp: BTreeMap::new(),
            udp: BTreeMap::new(),
            scratch: vec![0u8; RELAY_BUF].into_boxed_slice(),
            again: BTreeSet::new(),
            more_output: false,
        }
    }

    /// Feeds one tunnel packet and whatever else is already waiting, up to a batch.
    fn on_tunnel_packet(&mut self, first: Vec<u8>) {
        let now = now();
        if let Err(e) = self.stack.handle_ip_packet(&first, now) {
            tracing::trace!(error = %e, "tunnel packet dropped");
        }
        for _ in 0..TUNNEL_BATCH {
            let Ok(packet) = self.tunnel_rx.try_recv() else {
                break;
            };
            if let Err(e) = self.stack.handle_ip_packet(&packet, now) {
                tracing::trace!(error = %e, "tunnel packet dropped");
            }
        }
    }

    fn on_timeout(&mut self) {
        self.stack.handle_timeout(now());
    }

    /// Handles stack events and moves stack output into the tunnel until both are quiet.
    fn drive(&mut self) {
        self.more_output = true;
        for _ in 0..DRIVE_ROUNDS {
            let mut progress = false;
            while let Some(event) = self.stack.poll_flow_event() {
                self.on_event(event);
                progress = true;
            }
            while self.out_pending.is_none() {
                let Some(packet) = self.stack.poll_ip_packet() else {
                    break;
                };
                progress = true;
                match self.tunnel_tx.try_send(packet) {
                    Ok(()) => {}
                    Err(TrySendError::Full(packet)) => self.out_pending = Some(packet),
                    Err(TrySendError::Closed(_)) => self.tunnel_closed = true,
                }
            }
            if !progress {
                self.more_output = false;
                break;
            }
        }
    }

    fn on_event(&mut self, event: FlowEvent) {
        match event {
            FlowEvent::Connected(id) => {
                if let Some(conn) = self.tcp.get_mut(&id) {
                    conn.connected = true;
                }
                self.pump(id);
            }
            FlowEvent::Readable(id) | FlowEvent::Writable(id) => self.pump(id),
            FlowEvent::Closed(id, reason) => {
                tracing::debug!(flow = %id, ?reason, "flow closed");
                if let Some(conn) = self.tcp.get_mut(&id) {
                    conn.closed = Some(reason);
                    self.pump(id);
                } else {
                    self.udp.remove(&id);
                }
            }
        }
    }

    /// Moves whatever can move on one connection.
    fn pump(&mut self, id: FlowId) {
        if let Some(conn) = self.tcp.get_mut(&id) {
            let (fate, more) = conn.pump(&mut self.stack, id);
            if more {
                self.again.insert(id);
            }
            match fate {
                Fate::Keep => {}
                Fate::Done => {
                    self.tcp.remove(&id);
                }
                Fate::Reset => {
                    if let Some(conn) = self.tcp.remove(&id) {
                        let _ = conn.stream.set_zero_linger();
                    }
                }
            }
        } else if self.udp.contains_key(&id) {
            self.pump_udp(id);
        }
    }

    fn pump_udp(&mut self, id: FlowId) {
        let Some(conn) = self.udp.get(&id) else {
            return;
        };
        let mut gone = false;
        let mut capped = true;
        for _ in 0..UDP_ROUNDS {
            match self.stack.recv(id, &mut self.scratch) {
                Ok(n) => {
                    // UDP: a datagram the socket cannot take now is dropped.
                    let _ = match conn.peer {
                        None => conn.socket.try_send(&self.scratch[..n]),
                        Some(peer) => conn.socket.try_send_to(&self.scratch[..n], peer),
                    };
                }
                Err(FlowError::WouldBlock) => {
                    capped = false;
                    break;
                }
                Err(_) => {
                    gone = true;
                    break;
                }
            }
        }
        if conn.peer.is_none() && !gone {
            for _ in 0..UDP_ROUNDS {
                match conn.socket.try_recv(&mut self.scratch) {
                    Ok(n) => {
                        if let Err(FlowError::UnknownFlow(_)) =
                            self.stack.send(id, &self.scratch[..n])
                        {
                            gone = true;
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // An ICMP error reported on the connected socket: read on.
                    Err(_) => {}
                }
            }
        }
        if gone {
            self.udp.remove(&id);
        } else if capped {
            self.again.insert(id);
        }
    }
}

/// Which relayed sockets are ready for what the relay wants from them.
fn poll_ready(
    tcp: &BTreeMap<FlowId, TcpConn>,
    udp: &BTreeMap<FlowId, UdpConn>,
    cx: &mut Context<'_>,
) -> Poll<Vec<FlowId>> {
    let mut ready = Vec::new();
    for (id, conn) in tcp {
        let r = conn.wants_read() && conn.stream.poll_read_ready(cx).is_ready();
        let w = conn.wants_write() && conn.stream.poll_write_ready(cx).is_ready();
        if r || w {
            ready.push(*id);
        }
    }
    for (id, conn) in udp {
        if conn.peer.is_none() && conn.socket.poll_recv_ready(cx).is_ready() {
            ready.push(*id);
        }
    }
    if ready.is_empty() {
        Poll::Pending
    } else {
        Poll::Ready(ready)
    }
}

/// What both shells wait for besides their own sources.
enum Wake {
    Shutdown,
    Packet(Option<Vec<u8>>),
    TunnelRoom(Result<(), ()>),
    Ready(Vec<FlowId>),
    Timer,
    /// Work left over from a round cap.
    Again,
}

/// Waits for the common sources of a relay. `extra` is the shell's own source; its output is
/// returned as `Err` so the caller handles it with full access to its state.
async fn wait<T>(
    relay: &mut Relay,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
    extra: impl Future<Output = T>,
) -> Result<Wake, T> {
    let deadline = relay.stack.poll_timeout();
    let Relay {
        tunnel_rx,
        tunnel_tx,
        out_pending,
        tcp,
        udp,
        again,
        more_output,
        ..
    } = relay;
    let busy = !again.is_empty() || *more_output;
    tokio::select! {
        () = shutdown.as_mut() => Ok(Wake::Shutdown),
        p = tunnel_rx.recv() => Ok(Wake::Packet(p)),
        permit = tunnel_tx.reserve(), if out_pending.is_some() => {
            Ok(Wake::TunnelRoom(match permit {
                Ok(permit) => {
                    if let Some(p) = out_pending.take() {
                        permit.send(p);
                    }
                    Ok(())
                }
                Err(_) => Err(()),
            }))
        }
        ready = std::future::poll_fn(|cx| poll_ready(tcp, udp, cx)) => Ok(Wake::Ready(ready)),
        () = sleep_until(deadline) => Ok(Wake::Timer),
        () = std::future::ready(()), if busy => Ok(Wake::Again),
        x = extra => Err(x),
    }
}

impl Relay {
    /// Applies a common wake-up; false when the shell must stop.
    fn on_wake(&mut self, wake: Wake) -> bool {
        match wake {
            Wake::Shutdown | Wake::Packet(None) | Wake::TunnelRoom(Err(())) => false,
            Wake::Packet(Some(p)) => {
                self.on_tunnel_packet(p);
                true
            }
            Wake::TunnelRoom(Ok(())) => true,
            Wake::Ready(ids) => {
                for id in ids {
                    self.pump(id);
                }
                true
            }
            Wake::Timer => {
                self.on_timeout();
                true
            }
            Wake::Again => {
                for id in std::mem::take(&mut self.again) {
                    self.pump(id);
                }
                true
            }
        }
    }
}
