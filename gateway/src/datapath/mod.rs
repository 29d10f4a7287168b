//! The gateway's data plane: the event loop that joins the WireGuard engine
//! (`wardgate_common::dataplane`), the enforcement core ([`crate::pep`]) and a resource-side
//! backend — a TUN device with kernel forwarding (`tun` mode, root) or a userspace TCP/IP stack
//! that opens ordinary sockets to resources (`userspace` mode, no root).
//!
//! One task owns everything (engine, filter, backend, socket); the rest of the gateway talks to
//! it through [`Handle`] commands. Per wake-up the loop handles one of: a command, a batch of
//! UDP datagrams, a batch of packets from the backend, or the next timer; then it drains the
//! engine's transmit queue and the filter's events.
//!
//! Packet path, client → resource: UDP → `Engine::handle_datagram` (authenticates, names the
//! grant) → `Pep::handle_outbound` (source, destination, port, expiry) → backend.
//! Resource → client: backend → `Pep::handle_inbound` (only replies to flows the client
//! opened) → `Engine::handle_ip_packet` → UDP.
//!
//! Invariants: a grant is in the engine if and only if it is in the filter (added and removed
//! together, in that order on add and the reverse on remove); an expired grant is torn down on
//! the filter's `PeerExpired` event, and the filter refuses its packets even before that event
//! is handled, by the gateway's own monotonic clock.

mod backend;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use wardgate_common::dataplane::engine::{Engine, EngineConfig, PeerConfig, PeerId, Received};
use wardgate_common::dataplane::tunn::{MAX_DATAGRAM_LEN, PresharedKey};
use wardgate_common::dataplane::udp::{BatchUdpSocket, RecvBatch};
use wardgate_common::grant::{self, GatewayGrant};
use wardgate_common::keys::{self, StaticSecret};

use backend::Backend;
pub use backend::{BackendConfig, BackendError, DynDialer, MapDialer};

use crate::pep::{Event, GrantId, InboundVerdict, Peer, Pep, PepConfig, Verdict};

/// Why the data plane could not start or a command failed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The UDP port could not be bound.
    #[error("cannot listen for WireGuard on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The backend could not start.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A grant was refused.
    #[error("grant {grant_id} refused: {reason}")]
    GrantRefused {
        /// The grant.
        grant_id: u64,
        /// Why.
        reason: String,
    },
    /// The data plane has stopped.
    #[error("the data plane is not running")]
    Stopped,
}

/// Settings of the data plane.
pub struct DatapathConfig {
    /// The WireGuard UDP listen address.
    pub listen: SocketAddr,
    /// The gateway's WireGuard private key.
    pub private_key: StaticSecret,
    /// Where packets for resources go.
    pub backend: BackendConfig,
    /// Filter settings (timeouts, flow limits).
    pub pep: PepConfig,
}

/// What a [`Handle::sync`] changed.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SyncReport {
    /// Grants installed.
    pub added: usize,
    /// Grants removed.
    pub removed: usize,
    /// Grants left as they were.
    pub kept: usize,
    /// Grants refused (invalid or already expired), with why.
    pub refused: Vec<(u64, String)>,
}

/// What [`Handle::stats`] returns: one row per grant plus totals, all counters since start.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    /// Per grant.
    pub grants: Vec<GrantStats>,
    /// Drops not attributable to a grant (unknown peer, malformed before routing…), by reason.
    pub unattributed_drops: Vec<(String, u64)>,
    /// WireGuard-level drops (bad MAC, unknown key, replay…), by reason.
    pub wireguard_drops: Vec<(String, u64)>,
    /// Live flows.
    pub flows: usize,
}

/// Counters of one grant.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GrantStats {
    /// The grant.
    pub grant_id: u64,
    /// Its label.
    pub label: String,
    /// The client's tunnel address.
    pub tunnel_addr: IpAddr,
    /// Milliseconds until expiry (0 when expired).
    pub expires_in_ms: u64,
    /// Packets passed client → resource.
    pub out_packets: u64,
    /// Packets passed resource → client.
    pub in_packets: u64,
    /// Drops by reason.
    pub dropped: Vec<(String, u64)>,
}

enum Command {
    Sync(Vec<GatewayGrant>, oneshot::Sender<SyncReport>),
    Add(
        Box<GatewayGrant>,
        oneshot::Sender<Result<(), DatapathError>>,
    ),
    Remove(u64, oneshot::Sender<bool>),
    Stats(oneshot::Sender<Stats>),
}

/// Talks to the running data plane.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    local_addr: SocketAddr,
}

impl Handle {
    /// The bound WireGuard address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Installs a grant: peer and filter. Refused if invalid or already expired.
    pub async fn add_grant(&self, g: GatewayGrant) -> Result<(), DatapathError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Add(Box::new(g), tx))
            .await
            .map_err(|_| DatapathError::Stopped)?;
        rx.await.map_err(|_| DatapathError::Stopped)?
    }

    /// Makes the installed grants exactly `grants` (after a (re)connect to the controller):
    /// grants not listed are removed, listed ones not installed are added; ones already
    /// installed stay untouched, so their sessions and flows survive a controller restart.
    pub async fn sync(&self, grants: Vec<GatewayGrant>) -> Result<SyncReport, DatapathError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Sync(grants, tx))
            .await
            .map_err(|_| DatapathError::Stopped)?;
        rx.await.map_err(|_| DatapathError::Stopped)
    }

    /// Removes a grant at once; `false` if it was not installed.
    pub async fn remove_grant(&self, grant_id: u64) -> Result<bool, DatapathError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Remove(grant_id, tx))
            .await
            .map_err(|_| DatapathError::Stopped)?;
        rx.await.map_err(|_| DatapathError::Stopped)
    }

    /// Counters.
    pub async fn stats(&self) -> Result<Stats, DatapathError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Stats(tx))
            .await
            .map_err(|_| DatapathError::Stopped)?;
        rx.await.map_err(|_| DatapathError::Stopped)
    }
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn wall_ms() -> i64 {
    wardgate_common::clock::now_ms()
}

/// Starts the data plane; it runs until `shutdown` resolves.
pub async fn start(
    config: DatapathConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(Handle, tokio::task::JoinHandle<()>), DatapathError> {
    let socket = BatchUdpSocket::bind(config.listen).map_err(|source| DatapathError::Bind {
        addr: config.listen,
        source,
    })?;
    // Large socket buffers absorb bursts between wake-ups; failure only costs speed.
    let _ = socket.set_buffer_sizes(8 << 20, 8 << 20);
    let local_addr = socket.local_addr().map_err(|source| DatapathError::Bind {
        addr: config.listen,
        source,
    })?;
    let backend = Backend::start(config.backend).await?;
    let seed: u32 = rand::random();
    let engine = Engine::new(
        EngineConfig {
            identity: Some(config.private_key.clone()),
            index_seed: seed,
            ..EngineConfig::default()
        },
        now(),
    );
    let (tx, rx) = mpsc::channel(64);
    let dp = Datapath {
        engine,
        pep: Pep::new(config.pep),
        private_key: config.private_key,
        socket,
        backend,
        labels: Default::default(),
        tombstones: Default::default(),
    };
    info!(listen = %local_addr, "data plane running");
    let task = tokio::spawn(dp.run(rx, shutdown));
    Ok((Handle { tx, local_addr }, task))
}

struct Datapath {
    engine: Engine,
    pep: Pep,
    private_key: StaticSecret,
    socket: BatchUdpSocket,
    backend: Backend,
    labels: std::collections::HashMap<u64, String>,
    tombstones: std::collections::VecDeque<(Instant, u64)>,
}

/// How long an expired grant's counters stay visible after expiry.
const TOMBSTONE_KEEP: Duration = Duration::from_secs(300);

impl Datapath {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut batch = RecvBatch::new(32);
        let mut out = vec![0u8; MAX_DATAGRAM_LEN];
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                cmd = commands.recv() => match cmd {
                    Some(c) => self.handle_command(c),
                    None => break,
                },
                r = self.socket.recv(&mut batch) => match r {
                    Ok(_) => self.on_datagrams(&batch, &mut out).await,
                    Err(e) => {
                        warn!(error = %e, "UDP receive failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                r = self.backend.recv() => match r {
                    Ok(()) => self.on_backend_packets(),
                    Err(e) => {
                        warn!(error = %e, "resource-side backend failed; stopping the data plane");
                        break;
                    }
                },
                _ = sleep_until(deadline) => self.on_timeout(),
            }
            self.drain_events();
            self.flush_transmits().await;
        }
        self.backend.stop().await;
        info!("data plane stopped");
    }

    fn handle_command(&mut self, c: Command) {
        match c {
            Command::Sync(grants, reply) => {
                let _ = reply.send(self.sync(grants));
            }
            Command::Add(g, reply) => {
                let _ = reply.send(self.add_grant(*g));
            }
            Command::Remove(id, reply) => {
                let _ = reply.send(self.remove_grant(id, "removed"));
            }
            Command::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
        }
    }

    fn add_grant(&mut self, g: GatewayGrant) -> Result<(), DatapathError> {
        let refuse = |reason: String| DatapathError::GrantRefused {
            grant_id: g.grant_id,
            reason,
        };
        let client_key =
            keys::decode_key(&g.client_public_key).map_err(|e| refuse(e.to_string()))?;
        let psk = keys::decode_key(g.preshared_key.expose()).map_err(|e| refuse(e.to_string()))?;
        let now = now();
        let expires_at = grant::deadline(g.expires_at_ms, wall_ms(), now);
        let peer = Peer {
            grant_id: GrantId(g.grant_id),
            client_public_key: client_key,
            preshared_key: psk,
            tunnel_addr: g.tunnel_addr,
            rules: g.rules.clone(),
            expires_at,
        };
        self.pep
            .add_peer(peer, now)
            .map_err(|e| refuse(e.to_string()))?;
        let added = self.engine.add_peer(
            PeerId(g.grant_id),
            PeerConfig {
                local_secret: self.private_key.clone(),
                remote_public: keys::PublicKey::from(client_key),
                preshared_key: Some(PresharedKey::from_bytes(psk)),
                persistent_keepalive: None,
                endpoint: None,
            },
            now,
        );
        if let Err(e) = added {
            self.pep.remove_peer(GrantId(g.grant_id));
            return Err(refuse(e.to_string()));
        }
        info!(grant = g.grant_id, label = %g.label, tunnel_addr = %g.tunnel_addr,
              expires_in_ms = expires_at.saturating_duration_since(now).as_millis() as u64, "grant installed");
        self.labels.insert(g.grant_id, g.label);
        Ok(())
    }

    fn sync(&mut self, grants: Vec<GatewayGrant>) -> SyncReport {
        let mut report = SyncReport::default();
        let wanted: std::collections::HashSet<u64> = grants.iter().map(|g| g.grant_id).collect();
        let installed: Vec<u64> = self.labels.keys().copied().collect();
        for id in installed {
            if !wanted.contains(&id) && self.remove_grant(id, "not in the controller's grant list")
            {
                report.removed += 1;
            }
        }
        for g in grants {
            if self.labels.contains_key(&g.grant_id) && self.pep.is_live(GrantId(g.grant_id), now())
            {
                report.kept += 1;
                continue;
            }
            let id = g.grant_id;
            match self.add_grant(g) {
                Ok(()) => report.added += 1,
                Err(e) => report.refused.push((id, e.to_string())),
            }
        }
        report
    }

    fn remove_grant(&mut self, id: u64, why: &str) -> bool {
        let in_pep = self.pep.remove_peer(GrantId(id)).is_some();
        let in_engine = self.engine.remove_peer(PeerId(id));
        let label = self.labels.remove(&id).unwrap_or_default();
        if in_pep || in_engine {
            info!(grant = id, label = %label, reason = why, "grant removed");
        }
        in_pep || in_engine
    }

    async fn on_datagrams(&mut self, batch: &RecvBatch, out: &mut [u8]) {
        let now = now();
        for (from, datagram) in batch.datagrams() {
            match self.engine.handle_datagram(from, datagram, out, now) {
                Ok(Received::Packet { peer, packet }) => {
                    if let Verdict::Forward = self.pep.handle_outbound(GrantId(peer.0), packet, now)
                    {
                        self.backend.send(packet).await;
                    }
                }
                Ok(Received::Control { .. }) | Err(_) => {}
            }
        }
        self.backend.flush().await;
    }

    fn on_backend_packets(&mut self) {
        let now = now();
        let (pep, engine) = (&mut self.pep, &mut self.engine);
        self.backend.drain_inbound(|p| {
            if let InboundVerdict::ForwardTo(g) = pep.handle_inbound(p, now) {
                let _ = engine.handle_ip_packet(PeerId(g.0), p, now);
            }
        });
    }

    fn on_timeout(&mut self) {
        let now = now();
        self.engine.handle_timeout(now);
        self.pep.handle_timeout(now);
        while let Some(&(at, id)) = self.tombstones.front() {
            if at > now {
                break;
            }
            self.tombstones.pop_front();
            if !self.pep.is_live(GrantId(id), now) {
                self.remove_grant(id, "expired grant forgotten");
            }
        }
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        [
            self.engine.poll_timeout(),
            self.pep.poll_timeout(),
            self.tombstones.front().map(|(at, _)| *at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn drain_events(&mut self) {
        while let Some(ev) = self.pep.poll_event() {
            if let Event::PeerExpired { grant_id, .. } = ev {
                // The WireGuard session goes at once; the filter keeps the expired grant for a
                // while as a tombstone, so late packets are counted as `expired` under its name.
                self.engine.remove_peer(PeerId(grant_id.0));
                info!(grant = grant_id.0, label = %self.labels.get(&grant_id.0).map(String::as_str).unwrap_or(""), "grant expired");
                self.tombstones
                    .push_back((now() + TOMBSTONE_KEEP, grant_id.0));
            } else {
                debug!(event = ?ev, "filter event");
            }
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

    fn stats(&self) -> Stats {
        let now = now();
        let grants = self
            .pep
            .counters_snapshot()
            .into_iter()
            .map(|(g, c)| {
                let peer = self.pep.peer(g);
                GrantStats {
                    grant_id: g.0,
                    label: self.labels.get(&g.0).cloned().unwrap_or_default(),
                    tunnel_addr: peer
                        .map(|p| p.tunnel_addr)
                        .unwrap_or(IpAddr::from([0, 0, 0, 0])),
                    expires_in_ms: peer
                        .map(|p| p.expires_at.saturating_duration_since(now).as_millis() as u64)
                        .unwrap_or(0),
                    out_packets: c.out_packets,
                    in_packets: c.in_packets,
                    dropped: c
                        .dropped
                        .iter()
                        .filter(|(_, n)| *n > 0)
                        .map(|(r, n)| (r.as_str().to_owned(), n))
                        .collect(),
                }
            })
            .collect();
        Stats {
            grants,
            unattributed_drops: self
                .pep
                .global_counters()
                .dropped
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| (r.as_str().to_owned(), n))
                .collect(),
            wireguard_drops: self
                .engine
                .stats()
                .dropped
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| (r.as_str().to_owned(), n))
                .collect(),
            flows: self.pep.flow_count(),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}
