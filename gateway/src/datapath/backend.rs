//! The resource side of the gateway's data plane. `userspace`: a userspace TCP/IP stack
//! (`wardgate_common::netstack`) terminates each client flow and opens an ordinary socket to
//! the resource, so the gateway needs no root. `tun`: a TUN device, kernel forwarding and
//! masquerade to the resource network (root), fastest.

use std::net::SocketAddr;
use std::sync::Arc;

use ipnet::IpNet;
use tokio::sync::mpsc;
use wardgate_common::netstack::shell::{
    Dialer, DirectDialer, GatewayShell, GatewayShellConfig, TunnelIo,
};
use wardgate_common::netstack::{Config as NetstackConfig, Netstack};
use wardgate_common::tun::{
    PacketBatch, PushError, TunConfig, TunDevice, enable_forwarding_and_masquerade,
    remove_masquerade,
};

/// How the backend is set up.
pub enum BackendConfig {
    /// Userspace TCP/IP; `dialer` decides how resources are reached (tests redirect to
    /// loopback).
    Userspace {
        /// The tunnel prefix the gateway answers for (clients' tunnel addresses live in it).
        tunnel_net: IpNet,
        /// How resources are dialled.
        dialer: Option<Arc<dyn DynDialer>>,
    },
    /// A TUN device whose address is the first host of `tunnel_net`; the kernel forwards to
    /// the resources and masquerades (root).
    Tun {
        /// Interface name (at most 15 characters).
        name: String,
        /// The tunnel prefix (clients' tunnel addresses live in it).
        tunnel_net: IpNet,
    },
}

/// Why the backend failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The userspace stack rejected its configuration.
    #[error("userspace network stack: {0}")]
    Netstack(String),
    /// The backend's task ended.
    #[error("the resource-side backend stopped")]
    Stopped,
    /// The TUN device or its forwarding could not be set up.
    #[error(transparent)]
    Tun(#[from] wardgate_common::tun::TunError),
    /// The TUN device failed.
    #[error("TUN device: {0}")]
    TunIo(#[from] std::io::Error),
}

/// Object-safe dialer, so the data plane can hold any.
pub trait DynDialer: Send + Sync + 'static {
    /// Dials TCP.
    fn dial_tcp(
        &self,
        dst: SocketAddr,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<tokio::net::TcpStream>> + Send + '_>,
    >;
    /// Dials UDP.
    fn dial_udp(
        &self,
        dst: SocketAddr,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<tokio::net::UdpSocket>> + Send + '_>,
    >;
}

struct ArcDialer(Arc<dyn DynDialer>);

impl Dialer for ArcDialer {
    async fn dial_tcp(&self, dst: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        self.0.dial_tcp(dst).await
    }
    async fn dial_udp(&self, dst: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
        self.0.dial_udp(dst).await
    }
}

/// Packets queued toward the userspace stack per wake-up before they are dropped (a network
/// drops when a queue is full; TCP recovers).
const TO_STACK_QUEUE: usize = 4096;

// One instance per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Backend {
    Userspace {
        to_stack: mpsc::Sender<Vec<u8>>,
        from_stack: mpsc::Receiver<Vec<u8>>,
        inbound: Vec<Vec<u8>>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
        dropped: u64,
    },
    Tun {
        dev: TunDevice,
        out: PacketBatch,
        inbound: PacketBatch,
    },
}

impl Backend {
    pub(crate) async fn start(cfg: BackendConfig) -> Result<Self, BackendError> {
        match cfg {
            BackendConfig::Userspace { tunnel_net, dialer } => {
                let seed: u64 = rand::random();
                let stack = Netstack::new(
                    NetstackConfig::gateway(vec![tunnel_net]),
                    seed,
                    tokio::time::Instant::now().into_std(),
                )
                .map_err(|e| BackendError::Netstack(e.to_string()))?;
                let (to_stack, from_tunnel) = mpsc::channel(TO_STACK_QUEUE);
                let (to_tunnel, from_stack) = mpsc::channel(TO_STACK_QUEUE);
                let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
                let io = TunnelIo {
                    from_tunnel,
                    to_tunnel,
                };
                let shutdown = async move {
                    let _ = stop_rx.await;
                };
                let task = match dialer {
                    Some(d) => {
                        let shell =
                            GatewayShell::new(stack, ArcDialer(d), GatewayShellConfig::default());
                        tokio::spawn(shell.run(io, shutdown))
                    }
                    None => {
                        let shell =
                            GatewayShell::new(stack, DirectDialer, GatewayShellConfig::default());
                        tokio::spawn(shell.run(io, shutdown))
                    }
                };
                Ok(Backend::Userspace {
                    to_stack,
                    from_stack,
                    inbound: Vec::with_capacity(256),
                    stop: Some(stop_tx),
                    task,
                    dropped: 0,
                })
            }
            BackendConfig::Tun { name, tunnel_net } => {
                let IpNet::V4(net) = tunnel_net else {
                    return Err(BackendError::Netstack(
                        "tun mode needs an IPv4 tunnel prefix for now".into(),
                    ));
                };
                let gw_addr = net.hosts().next().ok_or_else(|| {
                    BackendError::Netstack(format!("tunnel prefix {net} has no host addresses"))
                })?;
                let cfg = TunConfig::new(&name)?.ipv4(gw_addr, net.prefix_len())?;
                let dev = TunDevice::create(&cfg).await?;
                enable_forwarding_and_masquerade(dev.name(), None).await?;
                tracing::info!(tun = dev.name(), address = %gw_addr, offload = dev.offload(), "TUN backend up");
                Ok(Backend::Tun {
                    dev,
                    out: PacketBatch::new(),
                    inbound: PacketBatch::new(),
                })
            }
        }
    }

    /// Queues a filtered packet toward the resources.
    pub(crate) async fn send(&mut self, packet: &[u8]) {
        match self {
            Backend::Userspace {
                to_stack, dropped, ..
            } => {
                if to_stack.try_send(packet.to_vec()).is_err() {
                    *dropped += 1;
                }
            }
            Backend::Tun { dev, out, .. } => {
                if let Err(PushError::Full) = out.push(packet) {
                    if let Err(e) = dev.send_batch(out).await {
                        tracing::debug!(error = %e, "TUN write failed");
                    }
                    let _ = out.push(packet);
                }
            }
        }
    }

    /// Pushes queued packets out.
    pub(crate) async fn flush(&mut self) {
        if let Backend::Tun { dev, out, .. } = self
            && !out.is_empty()
            && let Err(e) = dev.send_batch(out).await
        {
            tracing::debug!(error = %e, "TUN write failed");
        }
    }

    /// Waits for packets from the resource side (cancel-safe); read them with
    /// [`Backend::drain_inbound`].
    pub(crate) async fn recv(&mut self) -> Result<(), BackendError> {
        match self {
            Backend::Userspace {
                from_stack,
                inbound,
                ..
            } => {
                let first = from_stack.recv().await.ok_or(BackendError::Stopped)?;
                inbound.push(first);
                while inbound.len() < 256 {
                    match from_stack.try_recv() {
                        Ok(p) => inbound.push(p),
                        Err(_) => break,
                    }
                }
                Ok(())
            }
            Backend::Tun { dev, inbound, .. } => {
                dev.recv_batch(inbound).await?;
                Ok(())
            }
        }
    }

    /// Hands every received packet to `f`, then forgets them.
    pub(crate) fn drain_inbound(&mut self, mut f: impl FnMut(&[u8])) {
        match self {
            Backend::Userspace { inbound, .. } => {
                for p in inbound.drain(..) {
                    f(&p);
                }
            }
            Backend::Tun { inbound, .. } => {
                for p in inbound.iter() {
                    f(p);
                }
                inbound.clear();
            }
        }
    }

    /// Stops the backend.
    pub(crate) async fn stop(&mut self) {
        match self {
            Backend::Userspace { stop, task, .. } => {
                if let Some(s) = stop.take() {
                    let _ = s.send(());
                }
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
            }
            Backend::Tun { .. } => {
                if let Err(e) = remove_masquerade().await {
                    tracing::warn!(error = %e, "cannot remove the masquerade rule");
                }
            }
        }
    }
}

/// Userspace mode's resource address translation: flows to a listed `ip:port` are dialled at
/// another address (e.g. a resource published on this host's loopback), everything else
/// directly. Clients keep using the resource's published address; only the gateway knows.
pub struct MapDialer {
    map: std::collections::HashMap<SocketAddr, SocketAddr>,
}

impl MapDialer {
    /// A dialer with these `published → real` pairs.
    pub fn new(pairs: Vec<(SocketAddr, SocketAddr)>) -> Self {
        Self {
            map: pairs.into_iter().collect(),
        }
    }

    fn target(&self, dst: SocketAddr) -> SocketAddr {
        self.map.get(&dst).copied().unwrap_or(dst)
    }
}

impl DynDialer for MapDialer {
    fn dial_tcp(
        &self,
        dst: SocketAddr,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<tokio::net::TcpStream>> + Send + '_>,
    > {
        let to = self.target(dst);
        Box::pin(tokio::net::TcpStream::connect(to))
    }

    fn dial_udp(
        &self,
        dst: SocketAddr,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<tokio::net::UdpSocket>> + Send + '_>,
    > {
        let to = self.target(dst);
        Box::pin(async move { DirectDialer.dial_udp(to).await })
    }
}
