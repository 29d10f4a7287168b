//! Where the client's plain packets come from and go to: a TUN device with routes only for the
//! granted destinations, or the userspace TCP/IP stack behind local port forwards and SOCKS5.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use tokio::sync::mpsc;
use wardgate_common::netstack::shell::{AllowFn, ClientShell, TunnelIo};
use wardgate_common::netstack::{Config as NetstackConfig, Netstack};
use wardgate_common::rule::IpPrefix;
use wardgate_common::tun::{PacketBatch, PushError, TunConfig, TunDevice};

/// How granted resources are exposed on this machine.
#[derive(Clone)]
pub enum Mode {
    /// A TUN interface with routes for the granted destinations (admin rights needed).
    Tun {
        /// Interface name.
        name: String,
    },
    /// No admin rights: local listeners through a userspace TCP/IP stack.
    Userspace {
        /// TCP port forwards: local loopback address → resource address.
        forwards: Vec<(SocketAddr, SocketAddr)>,
        /// UDP port forwards: local loopback address → resource address.
        udp_forwards: Vec<(SocketAddr, SocketAddr)>,
        /// A SOCKS5 proxy on this loopback address.
        socks: Option<SocketAddr>,
        /// Which destinations SOCKS5 may reach (the grants' rules).
        allow: Option<AllowFn>,
        /// Called with the addresses actually bound (forwards, then SOCKS), e.g. to print them.
        on_bound: Option<Arc<dyn Fn(Vec<SocketAddr>) + Send + Sync>>,
    },
}

/// Why the local side could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    /// TUN device or route.
    #[error(transparent)]
    Tun(#[from] wardgate_common::tun::TunError),
    /// TUN IO.
    #[error("TUN device: {0}")]
    TunIo(#[from] std::io::Error),
    /// Userspace stack.
    #[error("userspace network stack: {0}")]
    Netstack(String),
    /// Local listener.
    #[error(transparent)]
    Shell(#[from] wardgate_common::netstack::shell::ShellError),
    /// The local side stopped.
    #[error("the local packet source stopped")]
    Stopped,
}

const QUEUE: usize = 4096;

// One instance per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum PacketIo {
    Tun {
        dev: TunDevice,
        out: PacketBatch,
        inbound: PacketBatch,
    },
    Userspace {
        to_stack: mpsc::Sender<Vec<u8>>,
        from_stack: mpsc::Receiver<Vec<u8>>,
        inbound: Vec<Vec<u8>>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    },
}

impl PacketIo {
    pub(crate) async fn start(mode: Mode, tunnel_addrs: &[IpAddr]) -> Result<Self, ModeError> {
        match mode {
            Mode::Tun { name } => {
                let mut cfg = TunConfig::new(&name)?;
                for a in tunnel_addrs {
                    cfg = match a {
                        IpAddr::V4(v4) => cfg.ipv4(*v4, 32)?,
                        IpAddr::V6(v6) => cfg.ipv6(*v6, 128)?,
                    };
                }
                let dev = TunDevice::create(&cfg).await?;
                tracing::info!(
                    tun = dev.name(),
                    offload = dev.offload(),
                    "TUN interface up"
                );
                Ok(PacketIo::Tun {
                    dev,
                    out: PacketBatch::new(),
                    inbound: PacketBatch::new(),
                })
            }
            Mode::Userspace {
                forwards,
                udp_forwards,
                socks,
                allow,
                on_bound,
            } => {
                let mut addrs: Vec<IpNet> = Vec::new();
                for a in tunnel_addrs {
                    let n = IpNet::from(*a);
                    if !addrs.contains(&n) {
                        addrs.push(n);
                    }
                }
                let stack = Netstack::new(
                    NetstackConfig::client(addrs),
                    rand::random(),
                    tokio::time::Instant::now().into_std(),
                )
                .map_err(|e| ModeError::Netstack(e.to_string()))?;
                let mut shell = ClientShell::new(stack);
                let mut bound = Vec::new();
                for (listen, target) in forwards {
                    bound.push(shell.add_tcp_forward(listen, target).await?);
                }
                for (listen, target) in udp_forwards {
                    bound.push(shell.add_udp_forward(listen, target).await?);
                }
                if let Some(s) = socks {
                    let allow = allow.unwrap_or_else(|| Arc::new(|_| false));
                    bound.push(shell.add_socks5(s, allow).await?);
                }
                if let Some(cb) = on_bound {
                    cb(bound);
                }
                let (to_stack, from_tunnel) = mpsc::channel(QUEUE);
                let (to_tunnel, from_stack) = mpsc::channel(QUEUE);
                let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
                let task = tokio::spawn(shell.run(
                    TunnelIo {
                        from_tunnel,
                        to_tunnel,
                    },
                    async move {
                        let _ = stop_rx.await;
                    },
                ));
                Ok(PacketIo::Userspace {
                    to_stack,
                    from_stack,
                    inbound: Vec::with_capacity(256),
                    stop: Some(stop_tx),
                    task,
                })
            }
        }
    }

    pub(crate) async fn add_route(&mut self, prefix: IpPrefix) -> Result<(), ModeError> {
        if let PacketIo::Tun { dev, .. } = self {
            let net = IpNet::new(prefix.addr(), prefix.len())
                .map_err(|e| ModeError::Netstack(e.to_string()))?;
            dev.add_route(net).await?;
        }
        Ok(())
    }

    pub(crate) async fn remove_route(&mut self, prefix: IpPrefix) {
        if let PacketIo::Tun { dev, .. } = self
            && let Ok(net) = IpNet::new(prefix.addr(), prefix.len())
            && let Err(e) = dev.remove_route(net).await
        {
            tracing::warn!(error = %e, route = %net, "cannot remove route");
        }
    }

    pub(crate) async fn send(&mut self, packet: &[u8]) {
        match self {
            PacketIo::Tun { dev, out, .. } => {
                if let Err(PushError::Full) = out.push(packet) {
                    let _ = dev.send_batch(out).await;
                    let _ = out.push(packet);
                }
            }
            PacketIo::Userspace { to_stack, .. } => {
                let _ = to_stack.try_send(packet.to_vec());
            }
        }
    }

    pub(crate) async fn flush(&mut self) {
        if let PacketIo::Tun { dev, out, .. } = self
            && !out.is_empty()
        {
            let _ = dev.send_batch(out).await;
        }
    }

    pub(crate) async fn recv(&mut self) -> Result<(), ModeError> {
        match self {
            PacketIo::Tun { dev, inbound, .. } => {
                dev.recv_batch(inbound).await?;
                Ok(())
            }
            PacketIo::Userspace {
                from_stack,
                inbound,
                ..
            } => {
                let first = from_stack.recv().await.ok_or(ModeError::Stopped)?;
                inbound.push(first);
                while inbound.len() < 256 {
                    match from_stack.try_recv() {
                        Ok(p) => inbound.push(p),
                        Err(_) => break,
                    }
                }
                Ok(())
            }
        }
    }

    pub(crate) fn drain_inbound(&mut self, mut f: impl FnMut(&[u8])) {
        match self {
            PacketIo::Tun { inbound, .. } => {
                for p in inbound.iter() {
                    f(p);
                }
                inbound.clear();
            }
            PacketIo::Userspace { inbound, .. } => {
                for p in inbound.drain(..) {
                    f(&p);
                }
            }
        }
    }

    pub(crate) async fn stop(&mut self) {
        if let PacketIo::Userspace { stop, task, .. } = self {
            if let Some(s) = stop.take() {
                let _ = s.send(());
            }
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
        }
    }
}
