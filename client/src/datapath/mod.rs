//! The client's data plane: brings up the tunnels of one or more grants and exposes only what
//! they grant — as a TUN interface with routes for the granted destinations only (`tun`, needs
//! admin rights), or without admin rights as local port forwards and a SOCKS5 proxy through a
//! userspace TCP/IP stack (`userspace`).
//!
//! One task owns the WireGuard engine (one peer per grant, each with its own fresh key), the
//! grants, and the TUN device or the channels to the userspace stack.
//!
//! Packet path out: a packet (from the TUN or the userspace stack) goes to the first grant whose
//! rules match its destination, protocol and port — two grants may share a host on different
//! ports — and anything unmatched is dropped here, before it is encrypted. Packet path in: a
//! decrypted packet is delivered only if its source and source port are inside the rules of the
//! grant whose session decrypted it and its destination is our tunnel address, so a gateway
//! cannot inject traffic from elsewhere.
//!
//! Grants end at their `expires_at` by this machine's monotonic clock: the peer is removed and
//! the TUN routes go with it (the gateway enforces the same expiry independently).

mod io;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use wardgate_common::dataplane::engine::{Engine, EngineConfig, PeerConfig, PeerId, Received};
use wardgate_common::dataplane::tunn::{MAX_DATAGRAM_LEN, PresharedKey};
use wardgate_common::dataplane::udp::{BatchUdpSocket, RecvBatch};
use wardgate_common::grant::{self, ClientGrant};
use wardgate_common::keys::{self, StaticSecret};
use wardgate_common::packet::{Packet, Transport};

use io::PacketIo;
pub use io::{Mode, ModeError};

/// Why the tunnel could not start or a grant was refused.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// UDP socket.
    #[error("cannot open the tunnel's UDP socket: {0}")]
    Bind(#[source] std::io::Error),
    /// TUN or userspace set-up.
    #[error(transparent)]
    Mode(#[from] ModeError),
    /// A grant is unusable.
    #[error("grant {grant_id} cannot be used: {reason}")]
    BadGrant {
        /// The grant.
        grant_id: u64,
        /// Why.
        reason: String,
    },
    /// The tunnel task has stopped.
    #[error("the tunnel is not running")]
    Stopped,
}

/// A grant with this device's private key for it.
pub struct KeyedGrant {
    /// What the controller sent.
    pub grant: ClientGrant,
    /// The key made on this machine for this grant.
    pub private_key: StaticSecret,
}

/// One grant's state, for `status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GrantState {
    /// The grant.
    pub grant_id: u64,
    /// The resource.
    pub resource: String,
    /// Milliseconds left (0 = expired).
    pub expires_in_ms: u64,
    /// Packets sent through this grant.
    pub tx_packets: u64,
    /// Packets received through it.
    pub rx_packets: u64,
}

/// Counters of the client's data plane.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TunnelStats {
    /// Live grants.
    pub grants: Vec<GrantState>,
    /// Packets dropped locally because no grant covers them.
    pub unmatched_dropped: u64,
    /// Packets from a gateway that its grant does not cover (dropped).
    pub foreign_dropped: u64,
}

enum Command {
    Add(Box<KeyedGrant>, oneshot::Sender<Result<(), TunnelError>>),
    Remove(u64, oneshot::Sender<bool>),
    Stats(oneshot::Sender<TunnelStats>),
}

/// Talks to the running tunnel.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
}

impl Handle {
    /// Adds a grant.
    pub async fn add_grant(&self, g: KeyedGrant) -> Result<(), TunnelError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Add(Box::new(g), tx))
            .await
            .map_err(|_| TunnelError::Stopped)?;
        rx.await.map_err(|_| TunnelError::Stopped)?
    }

    /// Removes a grant at once.
    pub async fn remove_grant(&self, id: u64) -> Result<bool, TunnelError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Remove(id, tx))
            .await
            .map_err(|_| TunnelError::Stopped)?;
        rx.await.map_err(|_| TunnelError::Stopped)
    }

    /// Counters.
    pub async fn stats(&self) -> Result<TunnelStats, TunnelError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Stats(tx))
            .await
            .map_err(|_| TunnelError::Stopped)?;
        rx.await.map_err(|_| TunnelError::Stopped)
    }
}

struct Active {
    grant: ClientGrant,
    expires_at: Instant,
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Starts the tunnel in `mode` with the given grants; runs until `shutdown`.
pub async fn start(
    mode: Mode,
    grants: Vec<KeyedGrant>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(Handle, tokio::task::JoinHandle<()>), TunnelError> {
    let tunnel_addrs: Vec<IpAddr> = grants.iter().map(|g| g.grant.tunnel_addr).collect();
    let socket =
        BatchUdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).map_err(TunnelError::Bind)?;
    let _ = socket.set_buffer_sizes(8 << 20, 8 << 20);
    let io = PacketIo::start(mode, &tunnel_addrs).await?;
    let engine = Engine::new(
        EngineConfig {
            index_seed: rand::random(),
            ..EngineConfig::default()
        },
        now(),
    );
    let mut t = Tunnel {
        engine,
        grants: Default::default(),
        socket,
        io,
        unmatched_dropped: 0,
        foreign_dropped: 0,
    };
    for g in grants {
        t.add_grant(g).await?;
    }
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(t.run(rx, shutdown));
    Ok((Handle { tx }, task))
}

struct Tunnel {
    engine: Engine,
    grants: std::collections::BTreeMap<u64, Active>,
    socket: BatchUdpSocket,
    io: PacketIo,
    unmatched_dropped: u64,
    foreign_dropped: u64,
}

impl Tunnel {
    async fn add_grant(&mut self, g: KeyedGrant) -> Result<(), TunnelError> {
        let KeyedGrant { grant, private_key } = g;
        let bad = |reason: String| TunnelError::BadGrant {
            grant_id: grant.grant_id,
            reason,
        };
        let gw = keys::decode_public(&grant.gateway_public_key).map_err(|e| bad(e.to_string()))?;
        let psk = keys::decode_key(grant.preshared_key.expose()).map_err(|e| bad(e.to_string()))?;
        let now = now();
        let expires_at =
            grant::deadline(grant.expires_at_ms, wardgate_common::clock::now_ms(), now);
        if expires_at <= now {
            return Err(bad("it has already expired".into()));
        }
        self.engine
            .add_peer(
                PeerId(grant.grant_id),
                PeerConfig {
                    local_secret: private_key,
                    remote_public: gw,
                    preshared_key: Some(PresharedKey::from_bytes(psk)),
                    persistent_keepalive: Some(25),
                    endpoint: Some(grant.gateway_endpoint),
                },
                now,
            )
            .map_err(|e| bad(e.to_string()))?;
        for r in &grant.rules {
            self.io.add_route(r.dst).await?;
        }
        info!(grant = grant.grant_id, resource = %grant.resource, "tunnel for grant up");
        self.grants
            .insert(grant.grant_id, Active { grant, expires_at });
        Ok(())
    }

    async fn remove_grant(&mut self, id: u64, why: &str) -> bool {
        let Some(a) = self.grants.remove(&id) else {
            return false;
        };
        self.engine.remove_peer(PeerId(id));
        // A route stays while another live grant still needs the same prefix.
        for r in &a.grant.rules {
            let still = self
                .grants
                .values()
                .any(|o| o.grant.rules.iter().any(|x| x.dst == r.dst));
            if !still {
                self.io.remove_route(r.dst).await;
            }
        }
        info!(grant = id, resource = %a.grant.resource, reason = why, "tunnel for grant down");
        true
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut batch = RecvBatch::new(32);
        let mut out = vec![0u8; MAX_DATAGRAM_LEN];
        loop {
            let deadline = [
                self.engine.poll_timeout(),
                self.grants.values().map(|a| a.expires_at).min(),
            ]
            .into_iter()
            .flatten()
            .min();
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                c = commands.recv() => match c {
                    Some(Command::Add(g, reply)) => { let r = self.add_grant(*g).await; let _ = reply.send(r); }
                    Some(Command::Remove(id, reply)) => { let r = self.remove_grant(id, "removed").await; let _ = reply.send(r); }
                    Some(Command::Stats(reply)) => { let _ = reply.send(self.stats()); }
                    None => break,
                },
                r = self.socket.recv(&mut batch) => match r {
                    Ok(_) => self.on_datagrams(&batch, &mut out).await,
                    Err(e) => {
                        warn!(error = %e, "UDP receive failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                r = self.io.recv() => match r {
                    Ok(()) => self.on_local_packets(),
                    Err(e) => {
                        warn!(error = %e, "local packet source failed; closing the tunnel");
                        break;
                    }
                },
                _ = sleep_until(deadline) => self.on_timeout().await,
            }
            self.flush_transmits().await;
        }
        let ids: Vec<u64> = self.grants.keys().copied().collect();
        for id in ids {
            self.remove_grant(id, "shutdown").await;
        }
        self.io.stop().await;
    }

    /// Which grant an outgoing packet belongs to.
    fn grant_for_outbound(
        grants: &std::collections::BTreeMap<u64, Active>,
        p: &Packet,
    ) -> Option<u64> {
        let (proto, port) = transport_of(p, true);
        grants
            .iter()
            .find(|(_, a)| {
                a.grant.tunnel_addr == p.src
                    && a.grant.rules.iter().any(|r| r.matches(p.dst, proto, port))
            })
            .map(|(id, _)| *id)
    }

    fn on_local_packets(&mut self) {
        let now = now();
        let (grants, engine) = (&self.grants, &mut self.engine);
        let mut unmatched = 0u64;
        self.io.drain_inbound(|pkt| {
            let grant = Packet::parse(pkt)
                .ok()
                .and_then(|p| Self::grant_for_outbound(grants, &p));
            match grant {
                Some(id) => {
                    let _ = engine.handle_ip_packet(PeerId(id), pkt, now);
                }
                None => unmatched += 1,
            }
        });
        self.unmatched_dropped += unmatched;
    }

    async fn on_datagrams(&mut self, batch: &RecvBatch, out: &mut [u8]) {
        let now = now();
        for (from, datagram) in batch.datagrams() {
            if let Ok(Received::Packet { peer, packet }) =
                self.engine.handle_datagram(from, datagram, out, now)
            {
                let ok = self.grants.get(&peer.0).is_some_and(|a| {
                    now < a.expires_at
                        && Packet::parse(packet).is_ok_and(|p| {
                            let (proto, port) = transport_of(&p, false);
                            p.dst == a.grant.tunnel_addr
                                && a.grant.rules.iter().any(|r| r.matches(p.src, proto, port))
                        })
                });
                if ok {
                    self.io.send(packet).await;
                } else {
                    self.foreign_dropped += 1;
                    debug!(grant = peer.0, "dropped a packet its grant does not cover");
                }
            }
        }
        self.io.flush().await;
    }

    async fn on_timeout(&mut self) {
        let now = now();
        self.engine.handle_timeout(now);
        let expired: Vec<u64> = self
            .grants
            .iter()
            .filter(|(_, a)| a.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.remove_grant(id, "expired").await;
        }
    }

    async fn flush_transmits(&mut self) {
        loop {
            let segments = self.socket.max_gso_segments();
            let Some(t) = self.engine.poll_transmit(segments) else {
                break;
            };
            if let Err(e) = self.socket.send(&t).await {
                debug!(error = %e, dst = %t.dst, "UDP send failed");
            }
        }
    }

    fn stats(&self) -> TunnelStats {
        let now = now();
        TunnelStats {
            grants: self
                .grants
                .values()
                .map(|a| {
                    let s = self.engine.peer_stats(PeerId(a.grant.grant_id));
                    GrantState {
                        grant_id: a.grant.grant_id,
                        resource: a.grant.resource.clone(),
                        expires_in_ms: a.expires_at.saturating_duration_since(now).as_millis()
                            as u64,
                        tx_packets: s.as_ref().map(|s| s.tx_packets).unwrap_or(0),
                        rx_packets: s.as_ref().map(|s| s.rx_packets).unwrap_or(0),
                    }
                })
                .collect(),
            unmatched_dropped: self.unmatched_dropped,
            foreign_dropped: self.foreign_dropped,
        }
    }
}

/// Protocol number and the port that a rule names: the destination port going out, the source
/// port coming back (`outbound = false`). ICMP has no port.
fn transport_of(p: &Packet, outbound: bool) -> (u8, Option<u16>) {
    let port = match p.transport {
        Transport::Tcp {
            src_port, dst_port, ..
        }
        | Transport::Udp { src_port, dst_port } => Some(if outbound { dst_port } else { src_port }),
        Transport::Icmp(_) | Transport::Other => None,
    };
    (p.protocol, port)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}
