//! The flow table: connections clients opened, keyed by 5-tuple, with idle timeouts.
//!
//! Invariants:
//! - A flow exists only because its client sent a packet the grant allowed; nothing coming
//!   from the resource side ever creates one.
//! - Every flow has exactly one entry in the timer queue, at or before its real deadline
//!   (`last_seen` + the timeout of its state). Refreshing a flow on every packet therefore
//!   costs one hash lookup and no queue work; the queue entry is moved forward lazily when it
//!   comes due, and moved earlier at once when a state change shortens the timeout.
//! - A flow past its deadline is treated as gone by every lookup, even before
//!   [`Pep::handle_timeout`](super::Pep::handle_timeout) reaps it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::GrantId;
use super::packet::protocol;

/// A flow's 5-tuple, always written from the client's side.
///
/// For ICMP echo the identifier stands in for `client_port` and `resource_port` is 0; for
/// protocols without ports both are 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// IP protocol number.
    pub protocol: u8,
    /// The client's tunnel address.
    pub client: IpAddr,
    /// The client's port (or ICMP echo identifier).
    pub client_port: u16,
    /// The resource's address.
    pub resource: IpAddr,
    /// The resource's port.
    pub resource_port: u16,
}

/// Idle timeouts of the flow table, by protocol and connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A TCP connection both sides have spoken on. Default 2 h 4 min, the minimum RFC 5382
    /// asks of NATs: EHR database sessions, HL7 MLLP links and DICOM associations sit idle for
    /// long stretches and must not be cut silently.
    pub tcp_established: Duration,
    /// A TCP connection being opened (no reply yet) or closed (FIN seen). Default 4 min
    /// (RFC 5382's transitory timeout), so scans and half-open connections go away soon.
    pub tcp_transitory: Duration,
    /// A TCP connection after a reset. Default 10 s: long enough for stragglers.
    pub tcp_closed: Duration,
    /// UDP (and protocols without ports) before any reply. Default 30 s.
    pub udp: Duration,
    /// UDP (and protocols without ports) once the resource replied. Default 180 s.
    pub udp_stream: Duration,
    /// ICMP echo. Default 10 s.
    pub icmp: Duration,
}

/// Longest timeout accepted; longer ones are cut to this so deadline arithmetic cannot
/// overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_established: Duration::from_secs(2 * 3600 + 4 * 60),
            tcp_transitory: Duration::from_secs(240),
            tcp_closed: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(180),
            icmp: Duration::from_secs(10),
        }
    }
}

impl Timeouts {
    fn clamped(self) -> Self {
        Timeouts {
            tcp_established: self.tcp_established.min(MAX_TIMEOUT),
            tcp_transitory: self.tcp_transitory.min(MAX_TIMEOUT),
            tcp_closed: self.tcp_closed.min(MAX_TIMEOUT),
            udp: self.udp.min(MAX_TIMEOUT),
            udp_stream: self.udp_stream.min(MAX_TIMEOUT),
            icmp: self.icmp.min(MAX_TIMEOUT),
        }
    }

    fn for_flow(&self, key: &FlowKey, state: FlowState) -> Duration {
        match state {
            FlowState::TcpOpening | FlowState::TcpClosing => self.tcp_transitory,
            FlowState::TcpEstablished => self.tcp_established,
            FlowState::TcpClosed => self.tcp_closed,
            FlowState::Unreplied | FlowState::Replied
                if key.protocol == protocol::ICMP || key.protocol == protocol::ICMPV6 =>
            {
                self.icmp
            }
            FlowState::Unreplied => self.udp,
            FlowState::Replied => self.udp_stream,
        }
    }
}

/// Connection state, just enough to pick a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlowState {
    /// TCP: the client has sent; the resource has not answered yet.
    TcpOpening,
    /// TCP: both sides have spoken.
    TcpEstablished,
    /// TCP: a FIN was seen.
    TcpClosing,
    /// TCP: a RST was seen.
    TcpClosed,
    /// Not TCP: only the client has sent.
    Unreplied,
    /// Not TCP: the resource replied.
    Replied,
}

impl FlowState {
    /// The state after a packet from the client with these TCP flags.
    pub(crate) fn tcp_outbound(self, flags: super::packet::TcpFlags) -> Self {
        if flags.rst() {
            FlowState::TcpClosed
        } else if flags.is_connection_request()
            && matches!(self, FlowState::TcpClosing | FlowState::TcpClosed)
        {
            // The client reuses the port for a new connection.
            FlowState::TcpOpening
        } else if flags.fin() && self != FlowState::TcpClosed {
            FlowState::TcpClosing
        } else {
            self
        }
    }

    /// The state after a packet from the resource with these TCP flags.
    pub(crate) fn tcp_inbound(self, flags: super::packet::TcpFlags) -> Self {
        if flags.rst() {
            FlowState::TcpClosed
        } else if flags.fin() && self != FlowState::TcpClosed {
            FlowState::TcpClosing
        } else if self == FlowState::TcpOpening {
            FlowState::TcpEstablished
        } else {
            self
        }
    }
}

/// One tracked flow.
#[derive(Debug, Clone)]
pub(crate) struct Flow {
    pub(crate) grant: GrantId,
    pub(crate) state: FlowState,
    last_seen: Instant,
    /// Where this flow's entry sits in the timer queue.
    scheduled: Instant,
    /// Tells this flow's queue entry from one of an earlier flow with the same key.
    serial: u64,
}

/// The 5-tuple map plus its timer queue.
#[derive(Debug)]
pub(crate) struct FlowTable {
    flows: HashMap<FlowKey, Flow>,
    queue: BTreeMap<(Instant, u64), FlowKey>,
    next_serial: u64,
    timeouts: Timeouts,
}

/// `at + d`, or `at` itself in the (clamped-away) case of overflow: failing closed means the
/// flow is idle at once, never immortal.
fn deadline(at: Instant, d: Duration) -> Instant {
    at.checked_add(d).unwrap_or(at)
}

impl FlowTable {
    pub(crate) fn new(timeouts: Timeouts) -> Self {
        FlowTable {
            flows: HashMap::new(),
            queue: BTreeMap::new(),
            next_serial: 0,
            timeouts: timeouts.clamped(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }

    fn deadline_of(&self, key: &FlowKey, flow: &Flow) -> Instant {
        deadline(flow.last_seen, self.timeouts.for_flow(key, flow.state))
    }

    /// The flow under `key` with whether it is past its deadline at `now`.
    pub(crate) fn get(&self, key: &FlowKey, now: Instant) -> Option<(&Flow, bool)> {
        let flow = self.flows.get(key)?;
        Some((flow, self.deadline_of(key, flow) <= now))
    }

    /// Starts tracking a flow the caller checked is absent and allowed.
    pub(crate) fn insert(&mut self, key: FlowKey, grant: GrantId, state: FlowState, now: Instant) {
        let serial = self.next_serial;
        self.next_serial = self.next_serial.wrapping_add(1);
        let scheduled = deadline(now, self.timeouts.for_flow(&key, state));
        let flow = Flow {
            grant,
            state,
            last_seen: now,
            scheduled,
            serial,
        };
        if let Some(old) = self.flows.insert(key, flow) {
            self.queue.remove(&(old.scheduled, old.serial));
        }
        self.queue.insert((scheduled, serial), key);
    }

    /// Records a packet on an existing flow: refreshes it and moves it to `state`.
    pub(crate) fn touch(&mut self, key: &FlowKey, state: FlowState, now: Instant) {
        let timeout = self.timeouts.for_flow(key, state);
        let Some(flow) = self.flows.get_mut(key) else {
            return;
        };
        flow.last_seen = now;
        if flow.state != state {
            flow.state = state;
            let due = deadline(now, timeout);
            if due < flow.scheduled {
                // The timeout got shorter: keep the queue entry at or before the deadline.
                self.queue.remove(&(flow.scheduled, flow.serial));
                flow.scheduled = due;
                self.queue.insert((due, flow.serial), *key);
            }
        }
    }

    /// Stops tracking a flow.
    pub(crate) fn remove(&mut self, key: &FlowKey) -> Option<Flow> {
        let flow = self.flows.remove(key)?;
        self.queue.remove(&(flow.scheduled, flow.serial));
        Some(flow)
    }

    /// The earliest instant a flow may become idle.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.queue.first_key_value().map(|((at, _), _)| *at)
    }

    /// Removes and returns the next flow idle at `now`, rescheduling refreshed flows on the
    /// way. `None` when no flow is idle.
    pub(crate) fn pop_idle(&mut self, now: Instant) -> Option<(FlowKey, Flow)> {
        loop {
            let (&(at, serial), &key) = self.queue.first_key_value()?;
            if at > now {
                return None;
            }
            self.queue.remove(&(at, serial));
            let due = match self.flows.get(&key) {
                Some(flow) if flow.serial == serial => self.deadline_of(&key, flow),
                // Unreachable while every removal also removes the queue entry; skip it.
                _ => continue,
            };
            if due <= now {
                return self.flows.remove(&key).map(|flow| (key, flow));
            }
            if let Some(flow) = self.flows.get_mut(&key) {
                flow.scheduled = due;
            }
            self.queue.insert((due, serial), key);
        }
    }
}
