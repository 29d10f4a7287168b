//! The client's userspace mode: loopback port forwards and a SOCKS5 proxy whose connections
//! become flows from the client's tunnel address.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinError, JoinSet};

use super::socks5::{self, SocksError};
use super::{Relay, ShellError, TcpConn, TunnelIo, UDP_ROUNDS, UdpConn, wait};
use crate::netstack::{FlowError, FlowId, Netstack};

/// Decides which destinations the SOCKS5 proxy may connect to (the resources of the user's
/// grants). Refused requests get reply 0x02, "connection not allowed by ruleset".
pub type AllowFn = Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>;

/// SOCKS handshakes in flight at once; more connections are dropped.
const MAX_HANDSHAKES: usize = 64;
/// A SOCKS client that has not sent its request by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Handshake = Option<(TcpStream, SocketAddr)>;

/// The client's userspace data plane: local listeners relayed through a [`Netstack`] built
/// with [`Config::client`](crate::netstack::Config::client). Add listeners, then [`run`].
///
/// [`run`]: ClientShell::run
pub struct ClientShell {
    stack: Netstack,
    tcp_forwards: Vec<(TcpListener, SocketAddr)>,
    udp_forwards: Vec<(Arc<UdpSocket>, SocketAddr)>,
    socks: Option<(TcpListener, AllowFn)>,
}

fn loopback(listen: SocketAddr) -> Result<(), ShellError> {
    if listen.ip().is_loopback() {
        Ok(())
    } else {
        Err(ShellError::NotLoopback(listen))
    }
}

fn bind_error(addr: SocketAddr) -> impl FnOnce(io::Error) -> ShellError {
    move |source| ShellError::Bind { addr, source }
}

impl ClientShell {
    /// A shell over `stack` (client side) with no listeners yet.
    pub fn new(stack: Netstack) -> Self {
        Self {
            stack,
            tcp_forwards: Vec::new(),
            udp_forwards: Vec::new(),
            socks: None,
        }
    }

    /// Listens on `listen` (loopback; port 0 picks one) and relays every connection to
    /// `target` through the tunnel. Returns the address actually bound.
    pub async fn add_tcp_forward(
        &mut self,
        listen: SocketAddr,
        target: SocketAddr,
    ) -> Result<SocketAddr, ShellError> {
        loopback(listen)?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(bind_error(listen))?;
        let bound = listener.local_addr().map_err(bind_error(listen))?;
        self.tcp_forwards.push((listener, target));
        Ok(bound)
    }

    /// Listens for datagrams on `listen` (loopback) and relays them to `target`; each local
    /// peer address gets its own flow, and answers go back to it.
    pub async fn add_udp_forward(
        &mut self,
        listen: SocketAddr,
        target: SocketAddr,
    ) -> Result<SocketAddr, ShellError> {
        loopback(listen)?;
        let socket = UdpSocket::bind(listen).await.map_err(bind_error(listen))?;
        let bound = socket.local_addr().map_err(bind_error(listen))?;
        self.udp_forwards.push((Arc::new(socket), target));
        Ok(bound)
    }

    /// Serves SOCKS5 on `listen` (loopback); CONNECT requests for destinations `allow`
    /// refuses are answered 0x02. One proxy per shell; a second call replaces the first.
    pub async fn add_socks5(
        &mut self,
        listen: SocketAddr,
        allow: AllowFn,
    ) -> Result<SocketAddr, ShellError> {
        loopback(listen)?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(bind_error(listen))?;
        let bound = listener.local_addr().map_err(bind_error(listen))?;
        self.socks = Some((listener, allow));
        Ok(bound)
    }

    /// Runs until `shutdown` resolves or the tunnel's inbound channel closes; then every
    /// listener and relayed connection is closed.
    pub async fn run(self, tunnel: TunnelIo, shutdown: impl Future<Output = ()>) {
        let ClientShell {
            stack,
            tcp_forwards,
            udp_forwards,
            socks,
        } = self;
        let mut relay = Relay::new(stack, tunnel);
        let mut handshakes: JoinSet<Handshake> = JoinSet::new();
        let mut udp_peers: BTreeMap<(usize, SocketAddr), FlowId> = BTreeMap::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            relay.drive();
            if relay.tunnel_closed {
                break;
            }
            let extra = next_wake(
                &tcp_forwards,
                socks.as_ref(),
                &mut handshakes,
                &udp_forwards,
            );
            match wait(&mut relay, &mut shutdown, extra).await {
                Ok(wake) => {
                    if !relay.on_wake(wake) {
                        break;
                    }
                }
                Err(ClientWake::Forward(i, Ok((stream, _peer)))) => {
                    if let Some((_, target)) = tcp_forwards.get(i) {
                        open_tcp(&mut relay, stream, *target, false);
                    }
                }
                Err(ClientWake::Socks(Ok((stream, _peer)))) => {
                    if let Some((_, allow)) = &socks {
                        if handshakes.len() >= MAX_HANDSHAKES {
                            tracing::debug!("too many SOCKS handshakes in flight; dropping one");
                            continue;
                        }
                        let allow = Arc::clone(allow);
                        handshakes.spawn(socks_handshake(stream, allow));
                    }
                }
                Err(ClientWake::Forward(_, Err(e)) | ClientWake::Socks(Err(e))) => {
                    // Accept errors (e.g. out of file descriptors) are transient; back off a
                    // little so they do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(ClientWake::Handshake(Ok(Some((stream, dst))))) => {
                    open_tcp(&mut relay, stream, dst, true);
                }
                Err(ClientWake::Handshake(_)) => {}
                Err(ClientWake::Datagrams(ready)) => {
                    for i in ready {
                        if let Some((socket, target)) = udp_forwards.get(i) {
                            relay_datagrams(&mut relay, &mut udp_peers, i, socket, *target);
                        }
                    }
                }
            }
        }
        tracing::debug!("client userspace shell stopped");
    }
}

enum ClientWake {
    Forward(usize, io::Result<(TcpStream, SocketAddr)>),
    Socks(io::Result<(TcpStream, SocketAddr)>),
    Handshake(Result<Handshake, JoinError>),
    Datagrams(Vec<usize>),
}

async fn next_wake(
    tcp_forwards: &[(TcpListener, SocketAddr)],
    socks: Option<&(TcpListener, AllowFn)>,
    handshakes: &mut JoinSet<Handshake>,
    udp_forwards: &[(Arc<UdpSocket>, SocketAddr)],
) -> ClientWake {
    let forward = std::future::poll_fn(|cx| {
        for (i, (listener, _)) in tcp_forwards.iter().enumerate() {
            if let Poll::Ready(r) = listener.poll_accept(cx) {
                return Poll::Ready((i, r));
            }
        }
        Poll::Pending
    });
    let socks_accept = async {
        match socks {
            Some((listener, _)) => listener.accept().await,
            None => std::future::pending().await,
        }
    };
    let handshake = async {
        match handshakes.join_next().await {
            Some(r) => r,
            None => std::future::pending().await,
        }
    };
    let datagrams = std::future::poll_fn(|cx| {
        let ready: Vec<usize> = udp_forwards
            .iter()
            .enumerate()
            .filter(|(_, (socket, _))| socket.poll_recv_ready(cx).is_ready())
            .map(|(i, _)| i)
            .collect();
        if ready.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(ready)
        }
    });
    tokio::select! {
        (i, r) = forward => ClientWake::Forward(i, r),
        r = socks_accept => ClientWake::Socks(r),
        r = handshake => ClientWake::Handshake(r),
        ready = datagrams => ClientWake::Datagrams(ready),
    }
}

async fn socks_handshake(mut stream: TcpStream, allow: AllowFn) -> Handshake {
    let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, socks5::handshake(&mut stream, &*allow))
        .await
        .unwrap_or(Err(SocksError::Timeout));
    match result {
        Ok(dst) => Some((stream, dst)),
        Err(e) => {
            tracing::debug!(error = %e, "SOCKS5 request refused");
            None
        }
    }
}

/// Opens a tunnel flow for an accepted local connection. On failure the local side learns it
/// at once: a SOCKS failure reply, or a reset for a plain forward.
fn open_tcp(relay: &mut Relay, stream: TcpStream, dst: SocketAddr, socks: bool) {
    match relay.stack.connect_tcp(dst) {
        Ok(id) => {
            tracing::debug!(flow = %id, %dst, socks, "local connection opened a flow");
            relay.tcp.insert(id, TcpConn::new(stream, socks));
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a tunnel flow for a local connection");
            if socks {
                let code = match e {
                    FlowError::NoSourceAddress(_) | FlowError::Unaddressable(_) => {
                        socks5::REP_ADDRESS_NOT_SUPPORTED
                    }
                    _ => socks5::REP_GENERAL_FAILURE,
                };
                // Ten bytes on a fresh socket: the send buffer takes them.
                let _ = stream.try_write(&socks5::reply(code, None));
            } else {
                let _ = stream.set_zero_linger();
            }
        }
    }
}

fn relay_datagrams(
    relay: &mut Relay,
    peers: &mut BTreeMap<(usize, SocketAddr), FlowId>,
    index: usize,
    socket: &Arc<UdpSocket>,
    target: SocketAddr,
) {
    for _ in 0..UDP_ROUNDS {
        let Ok((n, peer)) = socket.try_recv_from(&mut relay.scratch) else {
            return;
        };
        let id = match peers.get(&(index, peer)) {
            Some(id) if relay.udp.contains_key(id) => *id,
            _ => match relay.stack.connect_udp(target) {
                Ok(id) => {
                    relay.udp.insert(
                        id,
                        UdpConn {
                            socket: Arc::clone(socket),
                            peer: Some(peer),
                        },
                    );
                    // Forget peers whose flows idled out, so the map stays bounded.
                    peers.retain(|_, id| relay.udp.contains_key(id));
                    peers.insert((index, peer), id);
                    id
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot open a UDP flow; datagram dropped");
                    continue;
                }
            },
        };
        // UDP: a datagram the stack cannot take now is dropped.
        let _ = relay.stack.send(id, &relay.scratch[..n]);
    }
}
