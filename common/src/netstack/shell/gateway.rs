//! The gateway's userspace mode: every client flow the stack terminates is dialled as an
//! ordinary socket to the resource and relayed.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpStream, UdpSocket};
use tokio::task::{JoinError, JoinSet};

use super::{Relay, TcpConn, TunnelIo, UdpConn, now, wait};
use crate::netstack::{FlowId, Netstack, NewFlow, Protocol};

/// How the gateway reaches a resource. The seam exists so tests (and later, per-network
/// source addresses or a proxy) can decide where a flow really goes; production uses
/// [`DirectDialer`].
pub trait Dialer: Send + Sync + 'static {
    /// Opens a TCP connection to the resource `dst` the client asked for.
    fn dial_tcp(&self, dst: SocketAddr) -> impl Future<Output = io::Result<TcpStream>> + Send;
    /// Opens a UDP socket connected to the resource `dst`.
    fn dial_udp(&self, dst: SocketAddr) -> impl Future<Output = io::Result<UdpSocket>> + Send;
}

/// Dials the destination itself with the operating system's routing.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectDialer;

impl Dialer for DirectDialer {
    fn dial_tcp(&self, dst: SocketAddr) -> impl Future<Output = io::Result<TcpStream>> + Send {
        TcpStream::connect(dst)
    }

    async fn dial_udp(&self, dst: SocketAddr) -> io::Result<UdpSocket> {
        let any: SocketAddr = if dst.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(any).await?;
        socket.connect(dst).await?;
        Ok(socket)
    }
}

/// Settings of the gateway shell.
#[derive(Debug, Clone)]
pub struct GatewayShellConfig {
    /// How long a dial may take before the client's flow is reset. Keep it below the stack's
    /// [`Config::accept_timeout`](crate::netstack::Config::accept_timeout).
    pub connect_timeout: Duration,
}

impl Default for GatewayShellConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
        }
    }
}

enum Dialed {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

/// The gateway's userspace data plane: terminates client flows in a [`Netstack`] built with
/// [`Config::gateway`](crate::netstack::Config::gateway) and relays each to the resource.
pub struct GatewayShell<D: Dialer> {
    stack: Netstack,
    dialer: Arc<D>,
    config: GatewayShellConfig,
}

impl<D: Dialer> GatewayShell<D> {
    /// A shell over `stack` (gateway side) that reaches resources through `dialer`.
    pub fn new(stack: Netstack, dialer: D, config: GatewayShellConfig) -> Self {
        Self {
            stack,
            dialer: Arc::new(dialer),
            config,
        }
    }

    /// Runs until `shutdown` resolves or the tunnel's inbound channel closes. Dials still in
    /// flight are aborted and relayed sockets closed when it returns.
    pub async fn run(self, tunnel: TunnelIo, shutdown: impl Future<Output = ()>) {
        let GatewayShell {
            stack,
            dialer,
            config,
        } = self;
        let mut relay = Relay::new(stack, tunnel);
        // One dial per pending flow at most, so the stack's max_flows bounds this set.
        let mut dials: JoinSet<(FlowId, io::Result<Dialed>)> = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            while let Some(flow) = relay.stack.poll_new_flow() {
                spawn_dial(&mut dials, &dialer, &config, flow);
            }
            relay.drive();
            if relay.tunnel_closed {
                break;
            }
            let dial_done = async {
                if dials.is_empty() {
                    std::future::pending().await
                } else {
                    dials.join_next().await
                }
            };
            match wait(&mut relay, &mut shutdown, dial_done).await {
                Ok(wake) => {
                    if !relay.on_wake(wake) {
                        break;
                    }
                }
                Err(Some(result)) => on_dialed(&mut relay, result),
                Err(None) => {}
            }
        }
        tracing::debug!("gateway userspace shell stopped");
    }
}

fn spawn_dial<D: Dialer>(
    dials: &mut JoinSet<(FlowId, io::Result<Dialed>)>,
    dialer: &Arc<D>,
    config: &GatewayShellConfig,
    flow: NewFlow,
) {
    tracing::debug!(flow = %flow.id, protocol = %flow.protocol, dst = %flow.dst, "dialing resource");
    let dialer = Arc::clone(dialer);
    let timeout = config.connect_timeout;
    dials.spawn(async move {
        let dialed = match flow.protocol {
            Protocol::Tcp => tokio::time::timeout(timeout, dialer.dial_tcp(flow.dst))
                .await
                .map(|r| r.map(Dialed::Tcp)),
            Protocol::Udp => tokio::time::timeout(timeout, dialer.dial_udp(flow.dst))
                .await
                .map(|r| r.map(Dialed::Udp)),
        };
        let result = dialed.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "resource did not answer in time",
            ))
        });
        (flow.id, result)
    });
}

fn on_dialed(relay: &mut Relay, result: Result<(FlowId, io::Result<Dialed>), JoinError>) {
    // A dial task that panicked leaves its flow pending; the stack resets it at accept_timeout.
    let Ok((id, dialed)) = result else {
        return;
    };
    match dialed {
        Ok(dialed) => {
            if let Err(e) = relay.stack.accept_flow(id, now()) {
                // The client gave up meanwhile; the socket is dropped.
                tracing::debug!(flow = %id, error = %e, "flow gone before the resource answered");
                return;
            }
            match dialed {
                Dialed::Tcp(stream) => {
                    relay.tcp.insert(id, TcpConn::new(stream, false));
                }
                Dialed::Udp(socket) => {
                    relay.udp.insert(
                        id,
                        UdpConn {
                            socket: Arc::new(socket),
                            peer: None,
                        },
                    );
                }
            }
            relay.pump(id);
        }
        Err(e) => {
            tracing::debug!(flow = %id, error = %e, "resource unreachable; resetting the client");
            let _ = relay.stack.reject_flow(id);
        }
    }
}
