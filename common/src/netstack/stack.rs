//! [`Netstack`]: smoltcp's interface and sockets, a queue device, and the flow table that maps
//! tunnel flows to sockets and raises flow events.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::PacketMeta;
use smoltcp::socket::{tcp, udp};
use smoltcp::time::{Duration as SmolDuration, Instant as SmolInstant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};

use super::device::QueueDevice;
use super::packet::{self, TcpFlags};
use super::{
    CloseReason, Config, ConfigError, FlowError, FlowEvent, FlowId, NewFlow, PacketError, Protocol,
    Side, Stats,
};

/// Datagrams queued per UDP binding socket inside smoltcp; they are moved into the flows'
/// own queues after every poll, so this only has to hold one batch.
const UDP_SOCKET_PACKETS: usize = 256;
const UDP_SOCKET_BYTES: usize = 256 * 1024;

/// A flow as the stack sees it: local is our side (the resource address on a gateway, the
/// tunnel address on a client), remote the other end of the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct FlowKey {
    protocol: Protocol,
    local: SocketAddr,
    remote: SocketAddr,
}

#[derive(Debug)]
enum FlowKind {
    /// Gateway TCP flow announced but not yet accepted: only its SYN is kept (the latest
    /// retransmission); no socket exists yet.
    PendingTcp {
        syn: Vec<u8>,
    },
    Tcp {
        handle: SocketHandle,
    },
    Udp {
        /// Gateway: announced, not yet accepted; datagrams queue but are not readable.
        pending: bool,
        queue: VecDeque<Vec<u8>>,
        queued_bytes: usize,
        last_active: Instant,
    },
}

#[derive(Debug)]
pub(super) struct Flow {
    key: FlowKey,
    kind: FlowKind,
    created: Instant,
    /// False once `Closed` was raised or the caller aborted: the id is unknown to the caller,
    /// but the socket may linger (TIME-WAIT, a RST still to send) until it can be reaped.
    visible: bool,
    pub(super) connected: bool,
    pub(super) read_armed: bool,
    write_armed: bool,
    pub(super) peer_fin: bool,
    local_fin: bool,
    saw_rst: bool,
    /// A client flow that allocated `key.local`'s port.
    owns_port: bool,
}

impl Flow {
    fn new(key: FlowKey, kind: FlowKind, now: Instant, owns_port: bool) -> Self {
        Self {
            key,
            kind,
            created: now,
            visible: true,
            connected: false,
            read_armed: true,
            // Connected (TCP) or creation (UDP) already means writable.
            write_armed: false,
            peer_fin: false,
            local_fin: false,
            saw_rst: false,
            owns_port,
        }
    }
}

#[derive(Debug)]
struct UdpBinding {
    handle: SocketHandle,
    users: usize,
}

/// The sans-IO userspace TCP/IP stack; see the [module docs](super) for the call order.
///
/// One value serves one tunnel side: every flow of every peer on a gateway, or every forward
/// and SOCKS connection of a client. It is `Send` but not shared: one event loop owns it.
pub struct Netstack {
    config: Config,
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    base: Instant,
    now: Instant,
    next_id: u64,
    pub(super) flows: BTreeMap<FlowId, Flow>,
    keys: BTreeMap<FlowKey, FlowId>,
    bindings: BTreeMap<SocketAddr, UdpBinding>,
    ports_in_use: BTreeSet<(Protocol, u16)>,
    port_cursor: u16,
    new_flows: VecDeque<NewFlow>,
    events: VecDeque<FlowEvent>,
    /// Flows touched since the last poll, checked for events after it.
    dirty: BTreeSet<FlowId>,
    /// UDP flows waiting for send space in their binding socket.
    udp_blocked: BTreeSet<FlowId>,
    needs_poll: bool,
    stats: Stats,
}

impl fmt::Debug for Netstack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netstack")
            .field("side", &self.config.side)
            .field("flows", &self.flows.len())
            .field("rx_queued", &self.device.rx.len())
            .field("tx_queued", &self.device.tx.len())
            .field("stats", &self.stats)
            .finish()
    }
}

fn smol_duration(d: Duration) -> SmolDuration {
    SmolDuration::from_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn validate(config: &Config) -> Result<(), ConfigError> {
    if !(1280..=65535).contains(&config.mtu) {
        return Err(ConfigError::Mtu(config.mtu));
    }
    for size in [config.tcp_rx_buffer, config.tcp_tx_buffer] {
        if size < 2 * config.mtu || size > (1 << 30) {
            return Err(ConfigError::TcpBuffer(size));
        }
    }
    for (value, name) in [
        (config.max_flows, "max_flows"),
        (config.rx_queue_packets, "rx_queue_packets"),
        (config.tx_queue_packets, "tx_queue_packets"),
        (config.udp_queue_bytes, "udp_queue_bytes"),
    ] {
        if value == 0 {
            return Err(ConfigError::Zero(name));
        }
    }
    let (mut v4, mut v6) = (0, 0);
    for net in &config.addresses {
        let addr = net.addr();
        let unicast = match addr {
            IpAddr::V4(a) => !(a.is_unspecified() || a.is_broadcast() || a.is_multicast()),
            IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
        };
        if !unicast {
            return Err(ConfigError::NotUnicast(addr));
        }
        if addr.is_ipv4() {
            v4 += 1;
        } else {
            v6 += 1;
        }
    }
    if v4 > 1 || v6 > 1 {
        return Err(ConfigError::TooManyAddresses);
    }
    if config.side == Side::Client && config.addresses.is_empty() {
        return Err(ConfigError::NoAddress);
    }
    if *config.ephemeral_ports.start() == 0 || config.ephemeral_ports.is_empty() {
        return Err(ConfigError::Ports);
    }
    if let Some(k) = config.tcp_keep_alive
        && k >= config.tcp_timeout
    {
        return Err(ConfigError::KeepAlive);
    }
    Ok(())
}

/// The caller-visible flow `id`, borrowing only the flow table so sockets stay usable.
fn visible_in(flows: &mut BTreeMap<FlowId, Flow>, id: FlowId) -> Result<&mut Flow, FlowError> {
    flows
        .get_mut(&id)
        .filter(|f| f.visible)
        .ok_or(FlowError::UnknownFlow(id))
}

/// splitmix64: spreads a caller's seed (which may be small) over the port range.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Netstack {
    /// Builds a stack. `seed` feeds smoltcp's generator (initial sequence numbers) and the
    /// ephemeral port cursor; pass fresh randomness in production and a constant in tests.
    /// `now` is the stack's time origin; later `now` arguments must not go backwards (earlier
    /// values are treated as this one).
    pub fn new(config: Config, seed: u64, now: Instant) -> Result<Self, ConfigError> {
        validate(&config)?;
        let mut device =
            QueueDevice::new(config.mtu, config.tx_queue_packets, config.rx_queue_packets);
        let mut iface_config = IfaceConfig::new(HardwareAddress::Ip);
        iface_config.random_seed = seed;
        let mut iface = Interface::new(iface_config, &mut device, SmolInstant::from_micros(0));
        iface.update_ip_addrs(|addrs| {
            for net in &config.addresses {
                // Capacity is two and validate() allowed one per family.
                let _ = addrs.push(IpCidr::new(IpAddress::from(net.addr()), net.prefix_len()));
            }
        });
        // Everything is reachable through the tunnel: route each family via our own address.
        for net in &config.addresses {
            let _ = match net.addr() {
                IpAddr::V4(a) => iface.routes_mut().add_default_ipv4_route(a),
                IpAddr::V6(a) => iface.routes_mut().add_default_ipv6_route(a),
            };
        }
        iface.set_any_ip(config.side == Side::Gateway);
        let (lo, hi) = (
            *config.ephemeral_ports.start(),
            *config.ephemeral_ports.end(),
        );
        let span = u64::from(hi - lo) + 1;
        // The offset is below span <= 65535, so it fits.
        let port_cursor = lo + u16::try_from(mix(seed) % span).unwrap_or(0);
        Ok(Self {
            config,
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            base: now,
            now,
            next_id: 1,
            flows: BTreeMap::new(),
            keys: BTreeMap::new(),
            bindings: BTreeMap::new(),
            ports_in_use: BTreeSet::new(),
            port_cursor,
            new_flows: VecDeque::new(),
            events: VecDeque::new(),
            dirty: BTreeSet::new(),
            udp_blocked: BTreeSet::new(),
            needs_poll: false,
            stats: Stats::default(),
        })
    }

    /// Which side this stack serves.
    pub fn side(&self) -> Side {
        self.config.side
    }

    /// The configuration in force, e.g. for the shell to size its buffers.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters since creation.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Live flows, TIME-WAIT included; bounded by [`Config::max_flows`].
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// `(local, remote)` of a live flow: on a client the tunnel endpoint and the destination,
    /// on a gateway the resource endpoint and the client's. Used for SOCKS replies and logs.
    pub fn flow_endpoints(&self, id: FlowId) -> Option<(SocketAddr, SocketAddr)> {
        self.flows
            .get(&id)
            .filter(|f| f.visible)
            .map(|f| (f.key.local, f.key.remote))
    }

    // ----- time ---------------------------------------------------------------------------

    fn set_now(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
    }

    fn smol_now(&self) -> SmolInstant {
        let micros = self.now.saturating_duration_since(self.base).as_micros();
        SmolInstant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    fn std_time(&self, t: SmolInstant) -> Instant {
        let micros = u64::try_from(t.total_micros()).unwrap_or(0);
        self.base + Duration::from_micros(micros)
    }

    // ----- packets in and out ---------------------------------------------------------------

    /// Takes one IP packet that came out of the tunnel. Malformed packets and packets that
    /// cannot be queued are dropped with the reason; they never disturb other flows. On a
    /// gateway a SYN or first datagram of an unknown flow creates a flow announced by
    /// [`Self::poll_new_flow`].
    pub fn handle_ip_packet(&mut self, packet: &[u8], now: Instant) -> Result<(), PacketError> {
        self.set_now(now);
        if packet.len() > usize::from(u16::MAX) {
            self.stats.dropped_malformed += 1;
            return Err(PacketError::TooLarge(packet.len()));
        }
        let parsed = match packet::parse(packet, false) {
            Ok(p) => p,
            Err(e) => {
                self.stats.dropped_malformed += 1;
                return Err(e);
            }
        };
        let Some(t) = parsed.transport else {
            // ICMP and friends: smoltcp answers what it can.
            return self.enqueue(packet);
        };
        let key = FlowKey {
            protocol: t.protocol,
            local: t.dst,
            remote: t.src,
        };
        match t.tcp {
            Some(flags) => self.ingress_tcp(packet, key, flags),
            None => self.ingress_udp(packet, key),
        }
    }

    fn ingress_tcp(
        &mut self,
        packet: &[u8],
        key: FlowKey,
        flags: TcpFlags,
    ) -> Result<(), PacketError> {
        let gateway = self.config.side == Side::Gateway;
        if let Some(&id) = self.keys.get(&key)
            && let Some(flow) = self.flows.get_mut(&id)
        {
            if !flow.visible {
                if gateway && flags.is_initial_syn() {
                    // A new connection on the tuple of one in TIME-WAIT: forget the old one.
                    self.remove_flow(id);
                    return self.new_gateway_flow(packet, key);
                }
                return self.enqueue(packet);
            }
            match &mut flow.kind {
                FlowKind::PendingTcp { syn } => {
                    // Until accepted only the SYN matters; keep the latest retransmission. A
                    // reset means the client gave up: let the shell stop dialing.
                    if flags.is_initial_syn() {
                        *syn = packet.to_vec();
                    } else if flags.rst {
                        self.end_flow(id, Some(CloseReason::Reset));
                    }
                    return Ok(());
                }
                FlowKind::Tcp { handle } => {
                    if flags.rst {
                        flow.saw_rst = true;
                        let state = self.sockets.get::<tcp::Socket>(*handle).state();
                        if gateway && state == tcp::State::SynReceived {
                            // smoltcp would put this socket back into LISTEN, where it could
                            // take another flow's SYN. End it here instead.
                            self.events
                                .push_back(FlowEvent::Closed(id, CloseReason::Reset));
                            self.remove_flow(id);
                            return Ok(());
                        }
                    }
                    self.dirty.insert(id);
                }
                FlowKind::Udp { .. } => {}
            }
            return self.enqueue(packet);
        }
        if gateway && flags.is_initial_syn() {
            return self.new_gateway_flow(packet, key);
        }
        // No flow: smoltcp answers with a RST, as a host would.
        self.enqueue(packet)
    }

    fn ingress_udp(&mut self, packet: &[u8], key: FlowKey) -> Result<(), PacketError> {
        let known = self
            .keys
            .get(&key)
            .and_then(|id| self.flows.get(id))
            .is_some_and(|f| f.visible);
        if !known && self.config.side == Side::Gateway {
            return self.new_gateway_flow(packet, key);
        }
        // Datagrams are moved from the binding socket to the flow after the next poll.
        self.enqueue(packet)
    }

    fn new_gateway_flow(&mut self, packet: &[u8], key: FlowKey) -> Result<(), PacketError> {
        // The checksum of later packets is checked by smoltcp; a new flow's first packet is
        // checked here so that a corrupt SYN cannot create a flow.
        let checked = packet::parse(packet, true)?;
        if !checked.transport.is_some_and(|t| t.checksum_ok) {
            self.stats.dropped_malformed += 1;
            return Err(PacketError::Malformed);
        }
        if self.reserve_slot().is_err() {
            self.stats.flows_refused += 1;
            if key.protocol == Protocol::Tcp
                && let Some(rst) = packet::rst_for_syn(packet)
            {
                self.device.tx.push_back(rst);
            }
            return Err(PacketError::FlowTableFull);
        }
        let kind = match key.protocol {
            Protocol::Tcp => FlowKind::PendingTcp {
                syn: packet.to_vec(),
            },
            Protocol::Udp => {
                if self.acquire_binding(key.local).is_none() {
                    self.stats.dropped_malformed += 1;
                    return Err(PacketError::Malformed);
                }
                FlowKind::Udp {
                    pending: true,
                    queue: VecDeque::new(),
                    queued_bytes: 0,
                    last_active: self.now,
                }
            }
        };
        let id = self.insert_flow(key, kind, false);
        tracing::trace!(%id, protocol = %key.protocol, "new flow from the tunnel");
        self.new_flows.push_back(NewFlow {
            id,
            protocol: key.protocol,
            src: key.remote,
            dst: key.local,
        });
        match key.protocol {
            Protocol::Udp => self.enqueue(packet),
            Protocol::Tcp => Ok(()),
        }
    }

    fn enqueue(&mut self, packet: &[u8]) -> Result<(), PacketError> {
        if self.device.rx.len() >= self.config.rx_queue_packets {
            self.stats.dropped_queue_full += 1;
            return Err(PacketError::QueueFull);
        }
        self.device.rx.push_back(packet.to_vec());
        self.stats.packets_in += 1;
        self.needs_poll = true;
        Ok(())
    }

    /// The next IP packet to send into the tunnel, if any. Call until `None` after every
    /// input; the stack produces more as the caller takes them (bounded by
    /// [`Config::tx_queue_packets`], which is how tunnel backpressure reaches TCP).
    pub fn poll_ip_packet(&mut self) -> Option<Vec<u8>> {
        // Run smoltcp once the queue is empty (so one run serves a whole batch of inputs), or
        // at half-empty when it stopped for lack of room (so the pipe never runs dry).
        let empty = self.device.tx.is_empty();
        if (empty && self.needs_poll)
            || (self.device.tx_exhausted
                && self.device.tx.len() <= self.config.tx_queue_packets / 2)
        {
            self.pump();
        }
        let packet = self.device.tx.pop_front()?;
        self.stats.packets_out += 1;
        Some(packet)
    }

    /// When [`Self::handle_timeout`] must be called next; `None` if nothing is timed.
    /// A deadline at or before the last `now` means "as soon as possible".
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        if self.needs_poll || !self.device.rx.is_empty() {
            return Some(self.now);
        }
        let ts = self.smol_now();
        let mut next = self
            .iface
            .poll_at(ts, &self.sockets)
            .map(|t| self.std_time(t));
        if self.device.tx_exhausted && next.is_some_and(|t| t <= self.now) {
            // smoltcp wants to send but the caller has not taken the queued packets yet;
            // poll_ip_packet resumes it. Waking now would only spin.
            next = None;
        }
        for flow in self.flows.values().filter(|f| f.visible) {
            let deadline = match &flow.kind {
                FlowKind::PendingTcp { .. } | FlowKind::Udp { pending: true, .. } => {
                    Some(flow.created + self.config.accept_timeout)
                }
                FlowKind::Udp { last_active, .. } => {
                    Some(*last_active + self.config.udp_idle_timeout)
                }
                FlowKind::Tcp { .. } => None,
            };
            next = match (next, deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        next
    }

    /// Runs timers: TCP retransmissions, keep-alives and time-outs, TIME-WAIT expiry, the
    /// gateway's accept deadline and UDP idle time-outs.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.set_now(now);
        self.pump();
        let now = self.now;
        let mut expired = Vec::new();
        for (id, flow) in self.flows.iter().filter(|(_, f)| f.visible) {
            let gone = match &flow.kind {
                FlowKind::PendingTcp { .. } | FlowKind::Udp { pending: true, .. } => {
                    flow.created + self.config.accept_timeout <= now
                }
                FlowKind::Udp { last_active, .. } => {
                    *last_active + self.config.udp_idle_timeout <= now
                }
                FlowKind::Tcp { .. } => false,
            };
            if gone {
                expired.push(*id);
            }
        }
        for id in expired {
            if let Some(FlowKind::PendingTcp { syn }) = self.flows.get(&id).map(|f| &f.kind)
                && let Some(rst) = packet::rst_for_syn(syn)
            {
                self.device.tx.push_back(rst);
            }
            self.end_flow(id, Some(CloseReason::TimedOut));
        }
        let all: Vec<FlowId> = self.flows.keys().copied().collect();
        for id in all {
            self.update_flow(id);
        }
    }

    // ----- flows ------------------------------------------------------------------------------

    /// Gateway: the next flow a client opened. Answer each with [`Self::accept_flow`] once the
    /// resource is reachable, or [`Self::reject_flow`]; unanswered flows are reset after
    /// [`Config::accept_timeout`].
    pub fn poll_new_flow(&mut self) -> Option<NewFlow> {
        self.new_flows.pop_front()
    }

    /// The next flow event; see [`FlowEvent`]. Events may name flows the caller has since
    /// ended itself: ignore those.
    pub fn poll_flow_event(&mut self) -> Option<FlowEvent> {
        if let Some(event) = self.events.pop_front() {
            return Some(event);
        }
        if self.needs_poll {
            self.pump();
        }
        self.events.pop_front()
    }

    /// Gateway: the resource answered, so complete the client's handshake (TCP) or start
    /// delivering its datagrams (UDP).
    pub fn accept_flow(&mut self, id: FlowId, now: Instant) -> Result<(), FlowError> {
        self.require_side(Side::Gateway)?;
        self.set_now(now);
        let flow = self.visible_flow_mut(id)?;
        let key = flow.key;
        match &mut flow.kind {
            FlowKind::Udp { pending, .. } if *pending => {
                *pending = false;
                flow.read_armed = true;
                self.dirty.insert(id);
                self.needs_poll = true;
                Ok(())
            }
            FlowKind::PendingTcp { syn } => {
                let syn = std::mem::take(syn);
                // Process everything already queued first, so that the listening socket made
                // below sees no packet but this flow's SYN (see the module invariants).
                self.pump();
                let mut socket = self.new_tcp_socket();
                let endpoint = IpListenEndpoint {
                    addr: Some(IpAddress::from(key.local.ip())),
                    port: key.local.port(),
                };
                if socket.listen(endpoint).is_err() {
                    self.remove_flow(id);
                    return Err(FlowError::HandshakeFailed(id));
                }
                let handle = self.sockets.add(socket);
                if let Some(flow) = self.flows.get_mut(&id) {
                    flow.kind = FlowKind::Tcp { handle };
                }
                self.device.rx.push_back(syn);
                self.stats.packets_in += 1;
                // Not marked dirty: the outcome is checked right here, not by update_flow.
                self.pump();
                if self.sockets.get::<tcp::Socket>(handle).state() == tcp::State::Listen {
                    self.remove_flow(id);
                    return Err(FlowError::HandshakeFailed(id));
                }
                self.dirty.insert(id);
                Ok(())
            }
            _ => Err(FlowError::NotPending(id)),
        }
    }

    /// Gateway: the resource refused or could not be reached; a TCP client gets a reset, as
    /// from the resource itself. No `Closed` event follows.
    pub fn reject_flow(&mut self, id: FlowId) -> Result<(), FlowError> {
        self.require_side(Side::Gateway)?;
        let flow = self.visible_flow_mut(id)?;
        match &flow.kind {
            FlowKind::PendingTcp { syn } => {
                if let Some(rst) = packet::rst_for_syn(syn) {
                    self.device.tx.push_back(rst);
                }
            }
            FlowKind::Udp { pending: true, .. } => {}
            _ => return Err(FlowError::NotPending(id)),
        }
        self.remove_flow(id);
        Ok(())
    }

    /// Client: opens a TCP connection from the tunnel address to `dst`. `Connected` follows
    /// when the handshake completes, `Closed(Reset | TimedOut)` if it fails.
    pub fn connect_tcp(&mut self, dst: SocketAddr) -> Result<FlowId, FlowError> {
        self.require_side(Side::Client)?;
        let local_ip = self.source_for(dst)?;
        self.reserve_slot()?;
        let port = self.alloc_port(Protocol::Tcp)?;
        let mut socket = self.new_tcp_socket();
        let local = IpListenEndpoint {
            addr: Some(IpAddress::from(local_ip)),
            port,
        };
        if socket
            .connect(self.iface.context(), IpEndpoint::from(dst), local)
            .is_err()
        {
            self.ports_in_use.remove(&(Protocol::Tcp, port));
            return Err(FlowError::Unaddressable(dst));
        }
        let handle = self.sockets.add(socket);
        let key = FlowKey {
            protocol: Protocol::Tcp,
            local: SocketAddr::new(local_ip, port),
            remote: dst,
        };
        let id = self.insert_flow(key, FlowKind::Tcp { handle }, true);
        self.needs_poll = true;
        Ok(id)
    }

    /// Client: opens a UDP flow from the tunnel address to `dst`; datagrams can be sent at
    /// once. It closes after [`Config::udp_idle_timeout`] without traffic.
    pub fn connect_udp(&mut self, dst: SocketAddr) -> Result<FlowId, FlowError> {
        self.require_side(Side::Client)?;
        let local_ip = self.source_for(dst)?;
        self.reserve_slot()?;
        let port = self.alloc_port(Protocol::Udp)?;
        let local = SocketAddr::new(local_ip, port);
        if self.acquire_binding(local).is_none() {
            self.ports_in_use.remove(&(Protocol::Udp, port));
            return Err(FlowError::Unaddressable(dst));
        }
        let key = FlowKey {
            protocol: Protocol::Udp,
            local,
            remote: dst,
        };
        let kind = FlowKind::Udp {
            pending: false,
            queue: VecDeque::new(),
            queued_bytes: 0,
            last_active: self.now,
        };
        Ok(self.insert_flow(key, kind, true))
    }

    /// Queues bytes (TCP) or one datagram (UDP) for the peer. TCP takes what fits in the send
    /// buffer and returns how much; `WouldBlock` (and later `Writable`) when nothing fits,
    /// which is the backpressure the relay must respect. UDP takes all or nothing.
    pub fn send(&mut self, id: FlowId, data: &[u8]) -> Result<usize, FlowError> {
        let now = self.now;
        let flow = visible_in(&mut self.flows, id)?;
        let max_datagram = self.config.max_datagram(flow.key.local.ip());
        match &mut flow.kind {
            FlowKind::PendingTcp { .. } | FlowKind::Udp { pending: true, .. } => {
                flow.write_armed = true;
                Err(FlowError::WouldBlock)
            }
            FlowKind::Tcp { handle } => {
                if flow.local_fin {
                    return Err(FlowError::SendAfterClose);
                }
                if data.is_empty() {
                    return Ok(0);
                }
                let socket = self.sockets.get_mut::<tcp::Socket>(*handle);
                match socket.send_slice(data) {
                    Ok(0) => {
                        flow.write_armed = true;
                        Err(FlowError::WouldBlock)
                    }
                    Ok(n) => {
                        if n < data.len() {
                            flow.write_armed = true;
                        }
                        self.needs_poll = true;
                        Ok(n)
                    }
                    Err(_) if !flow.connected && socket.state() != tcp::State::Closed => {
                        flow.write_armed = true;
                        Err(FlowError::WouldBlock)
                    }
                    Err(_) => Err(FlowError::ConnectionLost),
                }
            }
            FlowKind::Udp { last_active, .. } => {
                if data.len() > max_datagram {
                    return Err(FlowError::DatagramTooLarge {
                        len: data.len(),
                        max: max_datagram,
                    });
                }
                let Some(binding) = self.bindings.get(&flow.key.local) else {
                    return Err(FlowError::ConnectionLost);
                };
                let socket = self.sockets.get_mut::<udp::Socket>(binding.handle);
                let meta = udp::UdpMetadata {
                    endpoint: IpEndpoint::from(flow.key.remote),
                    local_address: Some(IpAddress::from(flow.key.local.ip())),
                    meta: PacketMeta::default(),
                };
                match socket.send_slice(data, meta) {
                    Ok(()) => {
                        *last_active = now;
                        self.needs_poll = true;
                        Ok(data.len())
                    }
                    Err(udp::SendError::BufferFull) => {
                        flow.write_armed = true;
                        self.udp_blocked.insert(id);
                        Err(FlowError::WouldBlock)
                    }
                    Err(_) => Err(FlowError::ConnectionLost),
                }
            }
        }
    }

    /// Reads received bytes (TCP) or one datagram (UDP, truncated to `buf` like `recv(2)`).
    /// TCP: `Ok(0)` is the end of the stream (the peer closed its side); `WouldBlock` means
    /// nothing yet — a `Readable` event follows when there is. UDP: `Ok(0)` is an empty
    /// datagram; UDP has no end of stream.
    pub fn recv(&mut self, id: FlowId, buf: &mut [u8]) -> Result<usize, FlowError> {
        let now = self.now;
        let flow = visible_in(&mut self.flows, id)?;
        match &mut flow.kind {
            FlowKind::PendingTcp { .. } | FlowKind::Udp { pending: true, .. } => {
                flow.read_armed = true;
                Err(FlowError::WouldBlock)
            }
            FlowKind::Tcp { handle } => {
                let socket = self.sockets.get_mut::<tcp::Socket>(*handle);
                match socket.recv_slice(buf) {
                    Ok(0) => {
                        flow.read_armed = true;
                        Err(FlowError::WouldBlock)
                    }
                    Ok(n) => {
                        if !socket.can_recv() {
                            flow.read_armed = true;
                        }
                        // The window opened: smoltcp may owe the peer a window update.
                        self.needs_poll = true;
                        self.dirty.insert(id);
                        Ok(n)
                    }
                    Err(tcp::RecvError::Finished) => {
                        self.dirty.insert(id);
                        Ok(0)
                    }
                    Err(_) if !flow.connected && socket.state() != tcp::State::Closed => {
                        flow.read_armed = true;
                        Err(FlowError::WouldBlock)
                    }
                    Err(_) => Err(FlowError::ConnectionLost),
                }
            }
            FlowKind::Udp {
                queue,
                queued_bytes,
                last_active,
                ..
            } => {
                let Some(datagram) = queue.pop_front() else {
                    flow.read_armed = true;
                    return Err(FlowError::WouldBlock);
                };
                *queued_bytes -= datagram.len();
                *last_active = now;
                if queue.is_empty() {
                    flow.read_armed = true;
                }
                let n = datagram.len().min(buf.len());
                buf[..n].copy_from_slice(&datagram[..n]);
                Ok(n)
            }
        }
    }

    /// Ends the caller's side in order. TCP: a FIN follows the queued data, receiving goes on
    /// until the peer closes too, then `Closed(Finished)`. UDP (and an unaccepted gateway
    /// flow): the flow ends at once, without an event.
    pub fn close(&mut self, id: FlowId) -> Result<(), FlowError> {
        let flow = visible_in(&mut self.flows, id)?;
        match &flow.kind {
            FlowKind::Tcp { handle } => {
                self.sockets.get_mut::<tcp::Socket>(*handle).close();
                flow.local_fin = true;
                self.needs_poll = true;
                self.dirty.insert(id);
                Ok(())
            }
            FlowKind::PendingTcp { .. } => self.reject_flow(id),
            FlowKind::Udp { .. } => {
                self.remove_flow(id);
                Ok(())
            }
        }
    }

    /// Ends the flow at once: TCP sends a reset and drops unsent and unread data. No event
    /// follows and the id is unknown from now on.
    pub fn abort(&mut self, id: FlowId) -> Result<(), FlowError> {
        let flow = visible_in(&mut self.flows, id)?;
        match &flow.kind {
            FlowKind::Tcp { handle } => {
                self.sockets.get_mut::<tcp::Socket>(*handle).abort();
                flow.visible = false;
                // Reaped after the next poll has sent the RST.
                self.needs_poll = true;
                self.dirty.insert(id);
                Ok(())
            }
            FlowKind::PendingTcp { .. } => self.reject_flow(id),
            FlowKind::Udp { .. } => {
                self.remove_flow(id);
                Ok(())
            }
        }
    }

    // ----- internals --------------------------------------------------------------------------

    fn require_side(&self, side: Side) -> Result<(), FlowError> {
        if self.config.side == side {
            Ok(())
        } else {
            Err(FlowError::WrongSide(side))
        }
    }

    fn visible_flow_mut(&mut self, id: FlowId) -> Result<&mut Flow, FlowError> {
        visible_in(&mut self.flows, id)
    }

    fn source_for(&self, dst: SocketAddr) -> Result<IpAddr, FlowError> {
        let ip = dst.ip();
        let unicast = match ip {
            IpAddr::V4(a) => !(a.is_unspecified() || a.is_broadcast() || a.is_multicast()),
            IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
        };
        if !unicast || dst.port() == 0 {
            return Err(FlowError::Unaddressable(dst));
        }
        self.config
            .addresses
            .iter()
            .map(|n| n.addr())
            .find(|a| a.is_ipv4() == ip.is_ipv4())
            .ok_or(FlowError::NoSourceAddress(ip))
    }

    fn alloc_port(&mut self, protocol: Protocol) -> Result<u16, FlowError> {
        let (lo, hi) = (
            *self.config.ephemeral_ports.start(),
            *self.config.ephemeral_ports.end(),
        );
        for _ in 0..=u32::from(hi - lo) {
            let port = self.port_cursor;
            self.port_cursor = if port >= hi { lo } else { port + 1 };
            if self.ports_in_use.insert((protocol, port)) {
                return Ok(port);
            }
        }
        Err(FlowError::PortsExhausted)
    }

    /// Makes room for one more flow, evicting the oldest lingering (TIME-WAIT) connection if
    /// the table is full.
    fn reserve_slot(&mut self) -> Result<(), FlowError> {
        if self.flows.len() < self.config.max_flows {
            return Ok(());
        }
        let victim = self
            .flows
            .iter()
            .find(|(_, f)| !f.visible)
            .map(|(id, _)| *id);
        match victim {
            Some(id) => {
                self.remove_flow(id);
                Ok(())
            }
            None => Err(FlowError::TooManyFlows(self.config.max_flows)),
        }
    }

    fn insert_flow(&mut self, key: FlowKey, kind: FlowKind, owns_port: bool) -> FlowId {
        let id = FlowId(self.next_id);
        self.next_id += 1;
        self.flows
            .insert(id, Flow::new(key, kind, self.now, owns_port));
        self.keys.insert(key, id);
        self.stats.flows_opened += 1;
        id
    }

    fn new_tcp_socket(&self) -> tcp::Socket<'static> {
        let rx = tcp::SocketBuffer::new(vec![0u8; self.config.tcp_rx_buffer]);
        let tx = tcp::SocketBuffer::new(vec![0u8; self.config.tcp_tx_buffer]);
        let mut socket = tcp::Socket::new(rx, tx);
        // The relay writes large chunks; small writes are interactive (SSH, RDP) and must
        // not wait for ACKs.
        socket.set_nagle_enabled(false);
        socket.set_keep_alive(self.config.tcp_keep_alive.map(smol_duration));
        socket.set_timeout(Some(smol_duration(self.config.connect_timeout)));
        socket
    }

    fn acquire_binding(&mut self, local: SocketAddr) -> Option<SocketHandle> {
        if let Some(b) = self.bindings.get_mut(&local) {
            b.users += 1;
            return Some(b.handle);
        }
        let rx = udp::PacketBuffer::new(
            vec![udp::PacketMetadata::EMPTY; UDP_SOCKET_PACKETS],
            vec![0u8; UDP_SOCKET_BYTES],
        );
        let tx = udp::PacketBuffer::new(
            vec![udp::PacketMetadata::EMPTY; UDP_SOCKET_PACKETS],
            vec![0u8; UDP_SOCKET_BYTES],
        );
        let mut socket = udp::Socket::new(rx, tx);
        socket
            .bind(IpListenEndpoint {
                addr: Some(IpAddress::from(local.ip())),
                port: local.port(),
            })
            .ok()?;
        let handle = self.sockets.add(socket);
        self.bindings.insert(local, UdpBinding { handle, users: 1 });
        Some(handle)
    }

    /// Hides the flow from the caller (raising `Closed(reason)` if given) and reaps it if its
    /// socket has nothing left to do.
    fn end_flow(&mut self, id: FlowId, reason: Option<CloseReason>) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        if flow.visible {
            flow.visible = false;
            if let Some(reason) = reason {
                self.events.push_back(FlowEvent::Closed(id, reason));
            }
        }
        match flow.kind {
            FlowKind::Tcp { handle } => {
                let socket = self.sockets.get::<tcp::Socket>(handle);
                // A RST received in SYN-RECEIVED leaves smoltcp's socket listening: never
                // keep that one around.
                if socket.state() == tcp::State::Listen
                    || (socket.state() == tcp::State::Closed && socket.remote_endpoint().is_none())
                {
                    self.remove_flow(id);
                }
            }
            _ => self.remove_flow(id),
        }
    }

    /// Drops every trace of a flow: socket, key, port, binding reference.
    fn remove_flow(&mut self, id: FlowId) {
        let Some(flow) = self.flows.remove(&id) else {
            return;
        };
        if self.keys.get(&flow.key) == Some(&id) {
            self.keys.remove(&flow.key);
        }
        self.dirty.remove(&id);
        self.udp_blocked.remove(&id);
        match flow.kind {
            FlowKind::Tcp { handle } => {
                self.sockets.remove(handle);
            }
            FlowKind::Udp { .. } => {
                if let Some(b) = self.bindings.get_mut(&flow.key.local) {
                    b.users -= 1;
                    if b.users == 0 {
                        let handle = b.handle;
                        self.bindings.remove(&flow.key.local);
                        self.sockets.remove(handle);
                    }
                }
            }
            FlowKind::PendingTcp { .. } => {}
        }
        if flow.owns_port {
            self.ports_in_use
                .remove(&(flow.key.protocol, flow.key.local.port()));
        }
    }

    /// Runs smoltcp over everything queued, then turns socket changes into flow events.
    fn pump(&mut self) {
        let ts = self.smol_now();
        self.device.tx_exhausted = false;
        self.iface.poll(ts, &mut self.device, &mut self.sockets);
        self.needs_poll = false;
        self.drain_udp();
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.extend(std::mem::take(&mut self.udp_blocked));
        for id in dirty {
            self.update_flow(id);
        }
    }

    /// Moves received datagrams from the binding sockets into their flows' queues.
    fn drain_udp(&mut self) {
        for (local, binding) in &self.bindings {
            let socket = self.sockets.get_mut::<udp::Socket>(binding.handle);
            while let Ok((payload, meta)) = socket.recv() {
                let key = FlowKey {
                    protocol: Protocol::Udp,
                    local: *local,
                    remote: SocketAddr::from(meta.endpoint),
                };
                let flow = self
                    .keys
                    .get(&key)
                    .and_then(|id| self.flows.get_mut(id).map(|f| (*id, f)))
                    .filter(|(_, f)| f.visible);
                let Some((id, flow)) = flow else {
                    self.stats.dropped_datagrams += 1;
                    continue;
                };
                if let FlowKind::Udp {
                    queue,
                    queued_bytes,
                    last_active,
                    ..
                } = &mut flow.kind
                {
                    if *queued_bytes + payload.len() > self.config.udp_queue_bytes {
                        self.stats.dropped_datagrams += 1;
                        continue;
                    }
                    *queued_bytes += payload.len();
                    queue.push_back(payload.to_vec());
                    *last_active = self.now;
                    self.dirty.insert(id);
                }
            }
        }
    }

    /// Checks one flow for events (and lingering flows for reaping).
    fn update_flow(&mut self, id: FlowId) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        if !flow.visible {
            self.end_flow(id, None);
            return;
        }
        match &flow.kind {
            FlowKind::PendingTcp { .. } => {}
            FlowKind::Tcp { handle } => {
                let handle = *handle;
                self.update_tcp(id, handle);
            }
            FlowKind::Udp { pending, queue, .. } => {
                if *pending {
                    return;
                }
                if flow.read_armed && !queue.is_empty() {
                    flow.read_armed = false;
                    self.events.push_back(FlowEvent::Readable(id));
                }
                if flow.write_armed
                    && let Some(b) = self.bindings.get(&flow.key.local)
                {
                    if self.sockets.get::<udp::Socket>(b.handle).can_send() {
                        flow.write_armed = false;
                        self.events.push_back(FlowEvent::Writable(id));
                    } else {
                        self.udp_blocked.insert(id);
                    }
                }
            }
        }
    }

    fn update_tcp(&mut self, id: FlowId, handle: SocketHandle) {
        use tcp::State;
        let tcp_timeout = smol_duration(self.config.tcp_timeout);
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        let state = socket.state();
        if matches!(
            state,
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        ) {
            flow.peer_fin = true;
        }
        if !flow.connected
            && !matches!(
                state,
                State::Closed | State::Listen | State::SynSent | State::SynReceived
            )
        {
            flow.connected = true;
            socket.set_timeout(Some(tcp_timeout));
            self.events.push_back(FlowEvent::Connected(id));
        }
        let can_recv = socket.can_recv();
        let reason = match state {
            // Reset during the handshake on a gateway socket (see end_flow).
            State::Listen => Some(CloseReason::Reset),
            State::Closed if !can_recv => Some(if flow.saw_rst {
                CloseReason::Reset
            } else if flow.peer_fin && flow.local_fin {
                CloseReason::Finished
            } else {
                CloseReason::TimedOut
            }),
            State::TimeWait if !can_recv => Some(CloseReason::Finished),
            _ => None,
        };
        if let Some(reason) = reason {
            self.end_flow(id, Some(reason));
            return;
        }
        if flow.read_armed && flow.connected && (can_recv || flow.peer_fin) {
            flow.read_armed = false;
            self.events.push_back(FlowEvent::Readable(id));
        }
        let free = socket.send_capacity() - socket.send_queue();
        if flow.write_armed && socket.may_send() && free >= socket.send_capacity() / 4 {
            flow.write_armed = false;
            self.events.push_back(FlowEvent::Writable(id));
        }
    }
}
