//! In-memory tests: a client-side and a gateway-side [`Netstack`] wired packet to packet
//! (no WireGuard, no sockets), driven by a virtual clock that jumps to the next timeout.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;

const RESOURCE: &str = "10.10.1.10:443";

fn client_config() -> Config {
    Config::client(vec!["100.64.0.2/32".parse().unwrap()])
}

fn gateway_config() -> Config {
    Config::gateway(vec!["100.64.0.1/32".parse().unwrap()])
}

/// Deterministic bytes (xorshift64*), so failures reproduce.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

struct Pair {
    client: Netstack,
    gateway: Netstack,
    now: Instant,
}

impl Pair {
    fn new() -> Self {
        Self::with(client_config(), gateway_config())
    }

    fn with(client: Config, gateway: Config) -> Self {
        let now = Instant::now();
        Self {
            client: Netstack::new(client, 1, now).unwrap(),
            gateway: Netstack::new(gateway, 2, now).unwrap(),
            now,
        }
    }

    /// Moves packets both ways until both sides are quiet; returns how many moved.
    fn exchange(&mut self) -> usize {
        let mut total = 0;
        for _ in 0..10_000 {
            let mut moved = 0;
            while let Some(p) = self.client.poll_ip_packet() {
                let _ = self.gateway.handle_ip_packet(&p, self.now);
                moved += 1;
            }
            while let Some(p) = self.gateway.poll_ip_packet() {
                let _ = self.client.handle_ip_packet(&p, self.now);
                moved += 1;
            }
            if moved == 0 {
                return total;
            }
            total += moved;
        }
        panic!("packets kept flowing for 10,000 rounds");
    }

    /// Jumps the virtual clock to the earliest deadline of either side and fires both.
    fn advance(&mut self) {
        let next = [self.client.poll_timeout(), self.gateway.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        if let Some(t) = next
            && t > self.now
        {
            self.now = t;
        }
        self.client.handle_timeout(self.now);
        self.gateway.handle_timeout(self.now);
    }

    fn advance_by(&mut self, d: Duration) {
        self.now += d;
        self.client.handle_timeout(self.now);
        self.gateway.handle_timeout(self.now);
    }

    fn client_events(&mut self) -> Vec<FlowEvent> {
        std::iter::from_fn(|| self.client.poll_flow_event()).collect()
    }

    fn gateway_events(&mut self) -> Vec<FlowEvent> {
        std::iter::from_fn(|| self.gateway.poll_flow_event()).collect()
    }

    /// Client connects to `dst`; the gateway accepts. Returns (client flow, gateway flow).
    fn connect(&mut self, dst: SocketAddr) -> (FlowId, FlowId) {
        let cid = self.client.connect_tcp(dst).unwrap();
        self.exchange();
        let new = self.gateway.poll_new_flow().expect("gateway saw the SYN");
        assert_eq!(new.protocol, Protocol::Tcp);
        assert_eq!(new.dst, dst);
        assert_eq!(Some(new.src), self.client.flow_endpoints(cid).map(|e| e.0));
        self.gateway.accept_flow(new.id, self.now).unwrap();
        self.exchange();
        assert!(self.client_events().contains(&FlowEvent::Connected(cid)));
        assert!(
            self.gateway_events()
                .contains(&FlowEvent::Connected(new.id))
        );
        (cid, new.id)
    }
}

/// One direction of a bulk transfer driven through send/recv.
struct Stream {
    data: Vec<u8>,
    sent: usize,
    closed: bool,
    received: Vec<u8>,
    eof: bool,
}

impl Stream {
    fn new(data: Vec<u8>) -> Self {
        Self {
            data,
            sent: 0,
            closed: false,
            received: Vec::new(),
            eof: false,
        }
    }
}

/// Writes what fits from `out` into `flow`, closes when done, reads into `inp`. Returns
/// whether anything moved.
fn pump(stack: &mut Netstack, flow: FlowId, out: &mut Stream, inp: &mut Stream) -> bool {
    let mut progress = false;
    while out.sent < out.data.len() {
        let end = (out.sent + 64 * 1024).min(out.data.len());
        match stack.send(flow, &out.data[out.sent..end]) {
            Ok(n) => {
                out.sent += n;
                progress = true;
            }
            Err(FlowError::WouldBlock) => break,
            Err(e) => panic!("send: {e}"),
        }
    }
    if out.sent == out.data.len() && !out.closed {
        stack.close(flow).unwrap();
        out.closed = true;
        progress = true;
    }
    let mut buf = vec![0u8; 64 * 1024];
    while !inp.eof {
        match stack.recv(flow, &mut buf) {
            Ok(0) => {
                inp.eof = true;
                progress = true;
            }
            Ok(n) => {
                inp.received.extend_from_slice(&buf[..n]);
                progress = true;
            }
            Err(FlowError::WouldBlock) => break,
            Err(e) => panic!("recv: {e}"),
        }
    }
    progress
}

#[test]
fn tcp_transfers_8_mib_both_ways_and_closes() {
    const LEN: usize = 8 * 1024 * 1024;
    let mut pair = Pair::new();
    let (cid, gid) = pair.connect(RESOURCE.parse().unwrap());
    // up: client -> gateway; down: gateway -> client.
    let mut up = Stream::new(pattern(LEN, 7));
    let mut down = Stream::new(pattern(LEN, 11));
    let mut up_rx = Stream::new(Vec::new());
    let mut down_rx = Stream::new(Vec::new());
    let (mut client_closed, mut gateway_closed) = (None, None);
    let started = std::time::Instant::now();
    let virtual_start = pair.now;
    for _ in 0..200_000 {
        let mut progress = pump(&mut pair.client, cid, &mut up, &mut down_rx);
        progress |= pump(&mut pair.gateway, gid, &mut down, &mut up_rx);
        progress |= pair.exchange() > 0;
        for e in pair.client_events() {
            if let FlowEvent::Closed(id, reason) = e {
                assert_eq!(id, cid);
                client_closed = Some(reason);
            }
        }
        for e in pair.gateway_events() {
            if let FlowEvent::Closed(id, reason) = e {
                assert_eq!(id, gid);
                gateway_closed = Some(reason);
            }
        }
        if client_closed.is_some() && gateway_closed.is_some() {
            break;
        }
        if !progress {
            pair.advance();
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(up_rx.received.len(), LEN);
    assert!(up_rx.received == up.data, "upstream bytes differ");
    assert_eq!(down_rx.received.len(), LEN);
    assert!(down_rx.received == down.data, "downstream bytes differ");
    assert!(up_rx.eof && down_rx.eof);
    assert_eq!(client_closed, Some(CloseReason::Finished));
    assert_eq!(gateway_closed, Some(CloseReason::Finished));
    // Informational only: 16 MiB moved in total.
    let mbit = (2 * LEN) as f64 * 8.0 / elapsed.as_secs_f64() / 1e6;
    eprintln!(
        "in-memory netstack: 2 x 8 MiB in {elapsed:?} wall ({mbit:.0} Mbit/s aggregate), \
         {:?} virtual; client stats {:?}",
        pair.now - virtual_start,
        pair.client.stats()
    );
    // TIME-WAIT sockets go away once their timer fires.
    for _ in 0..100 {
        if pair.client.flow_count() == 0 && pair.gateway.flow_count() == 0 {
            break;
        }
        pair.advance_by(Duration::from_secs(5));
        pair.exchange();
    }
    assert_eq!(pair.client.flow_count(), 0);
    assert_eq!(pair.gateway.flow_count(), 0);
}

#[test]
fn events_are_edge_triggered() {
    let mut pair = Pair::new();
    let (cid, gid) = pair.connect(RESOURCE.parse().unwrap());
    assert_eq!(pair.client.send(cid, b"hello"), Ok(5));
    pair.exchange();
    assert_eq!(pair.gateway_events(), vec![FlowEvent::Readable(gid)]);
    // Not raised again until the reader has drained the flow.
    assert_eq!(pair.client.send(cid, b" world"), Ok(6));
    pair.exchange();
    assert_eq!(pair.gateway_events(), vec![]);
    let mut buf = [0u8; 64];
    assert_eq!(pair.gateway.recv(gid, &mut buf), Ok(11));
    assert_eq!(&buf[..11], b"hello world");
    assert_eq!(pair.gateway.recv(gid, &mut buf), Err(FlowError::WouldBlock));
    assert_eq!(pair.client.send(cid, b"!"), Ok(1));
    pair.exchange();
    assert_eq!(pair.gateway_events(), vec![FlowEvent::Readable(gid)]);
    assert_eq!(pair.gateway.recv(gid, &mut buf), Ok(1));
    // Half-close: the gateway reads EOF, may still send, then closes.
    pair.client.close(cid).unwrap();
    pair.exchange();
    assert_eq!(pair.gateway_events(), vec![FlowEvent::Readable(gid)]);
    assert_eq!(pair.gateway.recv(gid, &mut buf), Ok(0));
    assert_eq!(pair.gateway.send(gid, b"bye"), Ok(3));
    pair.gateway.close(gid).unwrap();
    pair.exchange();
    let events = pair.client_events();
    assert!(events.contains(&FlowEvent::Readable(cid)), "{events:?}");
    assert_eq!(pair.client.recv(cid, &mut buf), Ok(3));
    assert_eq!(pair.client.recv(cid, &mut buf), Ok(0));
    // The last ACK may be delayed (smoltcp's ack delay): let timers run.
    let (mut c, mut g) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        pair.exchange();
        c.extend(pair.client_events());
        g.extend(pair.gateway_events());
        pair.advance();
    }
    assert!(
        c.contains(&FlowEvent::Closed(cid, CloseReason::Finished)),
        "{c:?}"
    );
    assert!(
        g.contains(&FlowEvent::Closed(gid, CloseReason::Finished)),
        "{g:?}"
    );
    assert_eq!(
        pair.client.recv(cid, &mut buf),
        Err(FlowError::UnknownFlow(cid))
    );
    // Nothing lingers once the timers ran (the client's TIME-WAIT included).
    assert_eq!(pair.gateway.flow_count(), 0);
    assert_eq!(pair.client.flow_count(), 0);
}

#[test]
fn rejected_flow_resets_the_client() {
    let mut pair = Pair::new();
    let cid = pair
        .client
        .connect_tcp("10.10.1.10:444".parse().unwrap())
        .unwrap();
    pair.exchange();
    let new = pair.gateway.poll_new_flow().unwrap();
    // Before an answer the client's SYN is held: nothing goes back.
    assert_eq!(pair.exchange(), 0);
    pair.gateway.reject_flow(new.id).unwrap();
    pair.exchange();
    assert_eq!(
        pair.client_events(),
        vec![FlowEvent::Closed(cid, CloseReason::Reset)]
    );
    assert_eq!(pair.gateway.flow_count(), 0);
    assert_eq!(pair.gateway_events(), vec![]);
}

#[test]
fn unanswered_flow_times_out_with_a_reset() {
    let mut pair = Pair::new();
    let cid = pair.client.connect_tcp(RESOURCE.parse().unwrap()).unwrap();
    pair.exchange();
    let new = pair.gateway.poll_new_flow().unwrap();
    let mut closed = (None, None);
    for _ in 0..100 {
        pair.advance();
        pair.exchange();
        for e in pair.client_events() {
            if let FlowEvent::Closed(_, r) = e {
                closed.0 = Some(r);
            }
        }
        for e in pair.gateway_events() {
            if let FlowEvent::Closed(id, r) = e {
                assert_eq!(id, new.id);
                closed.1 = Some(r);
            }
        }
        if closed.0.is_some() && closed.1.is_some() {
            break;
        }
    }
    assert_eq!(
        closed,
        (Some(CloseReason::Reset), Some(CloseReason::TimedOut))
    );
    assert_eq!(
        pair.gateway.accept_flow(new.id, pair.now),
        Err(FlowError::UnknownFlow(new.id))
    );
    let _ = cid;
}

#[test]
fn reset_during_handshake_leaves_no_listening_socket() {
    let mut pair = Pair::new();
    let dst: SocketAddr = RESOURCE.parse().unwrap();
    let cid = pair.client.connect_tcp(dst).unwrap();
    let syn = pair.client.poll_ip_packet().unwrap();
    pair.gateway.handle_ip_packet(&syn, pair.now).unwrap();
    let new = pair.gateway.poll_new_flow().unwrap();
    pair.gateway.accept_flow(new.id, pair.now).unwrap();
    // The SYN-ACK is lost; the client gives up and resets.
    while pair.gateway.poll_ip_packet().is_some() {}
    pair.client.abort(cid).unwrap();
    pair.exchange();
    assert_eq!(
        pair.gateway_events(),
        vec![FlowEvent::Closed(new.id, CloseReason::Reset)]
    );
    assert_eq!(pair.gateway.flow_count(), 0);
    // A second connection to the same resource is a new flow of its own, not picked up by a
    // socket left listening.
    let cid2 = pair.client.connect_tcp(dst).unwrap();
    pair.exchange();
    let new2 = pair
        .gateway
        .poll_new_flow()
        .expect("announced as a new flow");
    assert_ne!(new2.id, new.id);
    assert_eq!(pair.exchange(), 0, "no answer before accept");
    pair.gateway.accept_flow(new2.id, pair.now).unwrap();
    pair.exchange();
    assert!(pair.client_events().contains(&FlowEvent::Connected(cid2)));
}

#[test]
fn udp_datagrams_both_ways() {
    let mut pair = Pair::new();
    let dst: SocketAddr = "10.10.1.20:53".parse().unwrap();
    let cid = pair.client.connect_udp(dst).unwrap();
    assert_eq!(pair.client.send(cid, b"ping"), Ok(4));
    assert_eq!(pair.client.send(cid, b"ping2"), Ok(5));
    pair.exchange();
    let new = pair.gateway.poll_new_flow().unwrap();
    assert_eq!(new.protocol, Protocol::Udp);
    assert_eq!(new.dst, dst);
    assert_eq!(
        pair.gateway.poll_new_flow(),
        None,
        "one flow, two datagrams"
    );
    let mut buf = [0u8; 1500];
    assert_eq!(
        pair.gateway.recv(new.id, &mut buf),
        Err(FlowError::WouldBlock)
    );
    pair.gateway.accept_flow(new.id, pair.now).unwrap();
    assert_eq!(pair.gateway_events(), vec![FlowEvent::Readable(new.id)]);
    assert_eq!(pair.gateway.recv(new.id, &mut buf), Ok(4));
    assert_eq!(&buf[..4], b"ping");
    assert_eq!(pair.gateway.recv(new.id, &mut buf), Ok(5));
    assert_eq!(
        pair.gateway.recv(new.id, &mut buf),
        Err(FlowError::WouldBlock)
    );
    assert_eq!(pair.gateway.send(new.id, b"pong"), Ok(4));
    let big = vec![0u8; 1500];
    assert!(matches!(
        pair.gateway.send(new.id, &big),
        Err(FlowError::DatagramTooLarge { .. })
    ));
    pair.exchange();
    assert_eq!(pair.client_events(), vec![FlowEvent::Readable(cid)]);
    assert_eq!(pair.client.recv(cid, &mut buf), Ok(4));
    assert_eq!(&buf[..4], b"pong");
    // Idle flows end on both sides.
    pair.advance_by(Duration::from_secs(61));
    assert_eq!(
        pair.client_events(),
        vec![FlowEvent::Closed(cid, CloseReason::TimedOut)]
    );
    assert_eq!(
        pair.gateway_events(),
        vec![FlowEvent::Closed(new.id, CloseReason::TimedOut)]
    );
    assert_eq!(pair.client.flow_count(), 0);
    assert_eq!(pair.gateway.flow_count(), 0);
}

#[test]
fn ipv6_flow_works() {
    let mut pair = Pair::with(
        Config::client(vec!["fd00:64::2/128".parse().unwrap()]),
        Config::gateway(vec!["fd00:64::1/128".parse().unwrap()]),
    );
    let (cid, gid) = pair.connect("[fd00:10::10]:443".parse().unwrap());
    assert_eq!(pair.client.send(cid, b"v6"), Ok(2));
    pair.exchange();
    let mut buf = [0u8; 8];
    assert_eq!(pair.gateway.recv(gid, &mut buf), Ok(2));
    assert_eq!(
        pair.client.connect_tcp(RESOURCE.parse().unwrap()),
        Err(FlowError::NoSourceAddress("10.10.1.10".parse().unwrap()))
    );
}

#[test]
fn flow_table_is_bounded() {
    let mut client = client_config();
    client.max_flows = 2;
    let mut gateway = gateway_config();
    gateway.max_flows = 1;
    let mut pair = Pair::with(client, gateway);
    let dst: SocketAddr = RESOURCE.parse().unwrap();
    let a = pair.client.connect_tcp(dst).unwrap();
    let b = pair.client.connect_tcp(dst).unwrap();
    assert_eq!(
        pair.client.connect_tcp(dst),
        Err(FlowError::TooManyFlows(2))
    );
    pair.exchange();
    // The gateway took the first SYN and reset the second.
    let first = pair.gateway.poll_new_flow().unwrap();
    assert_eq!(pair.gateway.poll_new_flow(), None);
    assert_eq!(pair.gateway.stats().flows_refused, 1);
    let events = pair.client_events();
    assert_eq!(events.len(), 1, "{events:?}");
    let FlowEvent::Closed(refused, CloseReason::Reset) = events[0] else {
        panic!("{events:?}");
    };
    assert!(refused == a || refused == b);
    pair.gateway.accept_flow(first.id, pair.now).unwrap();
    pair.exchange();
    // Room again on the client after one flow ended.
    assert!(pair.client.connect_tcp(dst).is_ok());
}

#[test]
fn wrong_side_and_unknown_ids_are_errors() {
    let mut pair = Pair::new();
    let dst: SocketAddr = RESOURCE.parse().unwrap();
    assert_eq!(
        pair.gateway.connect_tcp(dst),
        Err(FlowError::WrongSide(Side::Client))
    );
    let bogus = FlowId(999);
    assert_eq!(
        pair.client.accept_flow(bogus, pair.now),
        Err(FlowError::WrongSide(Side::Gateway))
    );
    assert_eq!(
        pair.client.send(bogus, b"x"),
        Err(FlowError::UnknownFlow(bogus))
    );
    assert_eq!(pair.client.close(bogus), Err(FlowError::UnknownFlow(bogus)));
    assert_eq!(
        pair.client.connect_tcp("0.0.0.0:443".parse().unwrap()),
        Err(FlowError::Unaddressable("0.0.0.0:443".parse().unwrap()))
    );
    let mut bad = client_config();
    bad.mtu = 100;
    assert!(matches!(
        Netstack::new(bad, 0, pair.now),
        Err(ConfigError::Mtu(100))
    ));
    let bad = Config::client(vec![]);
    assert!(matches!(
        Netstack::new(bad, 0, pair.now),
        Err(ConfigError::NoAddress)
    ));
}

#[test]
fn malformed_and_truncated_packets_never_panic() {
    let mut pair = Pair::new();
    let dst: SocketAddr = RESOURCE.parse().unwrap();
    // Real packets to mutilate: a SYN, a data segment, a UDP datagram.
    let mut samples = Vec::new();
    let probe = pair.client.connect_tcp(dst).unwrap();
    samples.push(pair.client.poll_ip_packet().unwrap());
    pair.client.abort(probe).unwrap();
    while pair.client.poll_ip_packet().is_some() {}
    let u = pair
        .client
        .connect_udp("10.10.1.20:53".parse().unwrap())
        .unwrap();
    pair.client.send(u, b"datagram").unwrap();
    samples.push(pair.client.poll_ip_packet().unwrap());
    pair.client.close(u).unwrap();
    let (cid, gid) = pair.connect(dst);
    pair.client.send(cid, &pattern(3000, 3)).unwrap();
    samples.extend(std::iter::from_fn(|| pair.client.poll_ip_packet()));
    let mut rng = 0x1234_5678_9abc_def0_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut fed = 0;
    for sample in &samples {
        // Every truncation.
        for len in 0..sample.len() {
            let _ = pair.gateway.handle_ip_packet(&sample[..len], pair.now);
            let _ = pair.client.handle_ip_packet(&sample[..len], pair.now);
            fed += 2;
        }
        // Bit flips and byte overwrites, in the headers especially.
        for _ in 0..2000 {
            let mut p = sample.clone();
            for _ in 0..1 + next() % 4 {
                let i =
                    (next() as usize) % p.len().min(if next() % 2 == 0 { 60 } else { usize::MAX });
                p[i] ^= 1 << (next() % 8);
                if next() % 3 == 0 {
                    p[i] = next() as u8;
                }
            }
            let _ = pair.gateway.handle_ip_packet(&p, pair.now);
            let _ = pair.client.handle_ip_packet(&p, pair.now);
            fed += 2;
        }
        // Drain what the stacks answered so queues do not fill.
        while pair.gateway.poll_ip_packet().is_some() {}
        while pair.client.poll_ip_packet().is_some() {}
    }
    // Pure noise, including oversize.
    for i in 0..3000 {
        let len = (next() as usize) % if i % 100 == 0 { 70_000 } else { 1600 };
        let mut p = pattern(len, next());
        if let Some(b) = p.first_mut() {
            *b = if i % 2 == 0 { 0x45 } else { 0x60 };
        }
        let _ = pair.gateway.handle_ip_packet(&p, pair.now);
        let _ = pair.client.handle_ip_packet(&p, pair.now);
        fed += 2;
        if i % 200 == 0 {
            while pair.gateway.poll_ip_packet().is_some() {}
            while pair.client.poll_ip_packet().is_some() {}
        }
    }
    while pair.gateway.poll_ip_packet().is_some() {}
    while pair.client.poll_ip_packet().is_some() {}
    assert!(fed > 10_000);
    assert!(pair.gateway.stats().dropped_malformed > 0);
    // Flows the garbage created on the gateway are pending; reject them all.
    while let Some(n) = pair.gateway.poll_new_flow() {
        let _ = pair.gateway.reject_flow(n.id);
    }
    pair.exchange();
    // The Internet checksum lets some multi-bit mutations through (WireGuard's MAC is what
    // really protects the stream), so the first connection may hold garbage now. The stacks
    // must still work: a new connection carries data intact.
    let _ = (pair.client.abort(cid), pair.gateway.abort(gid));
    pair.exchange();
    let (cid, gid) = pair.connect(dst);
    assert_eq!(pair.client.send(cid, b"still alive"), Ok(11));
    pair.exchange();
    let mut buf = vec![0u8; 64];
    assert_eq!(pair.gateway.recv(gid, &mut buf), Ok(11));
    assert_eq!(&buf[..11], b"still alive");
}

#[test]
fn refused_syn_reply_is_well_formed() {
    let mut pair = Pair::new();
    let _ = pair.client.connect_tcp(RESOURCE.parse().unwrap()).unwrap();
    let syn = pair.client.poll_ip_packet().unwrap();
    let rst = packet::rst_for_syn(&syn).unwrap();
    let parsed = packet::parse(&rst, true).unwrap().transport.unwrap();
    assert!(parsed.checksum_ok);
    assert_eq!(parsed.src, RESOURCE.parse::<SocketAddr>().unwrap());
    let flags = parsed.tcp.unwrap();
    assert!(flags.rst && flags.ack && !flags.syn);
    assert!(packet::rst_for_syn(&rst).is_none(), "a RST is not a SYN");
}

#[test]
fn idle_connection_does_not_ask_to_be_woken_now() {
    // A deadline at or before `now` on an idle stack would make a shell spin.
    let mut pair = Pair::new();
    let (cid, _gid) = pair.connect(RESOURCE.parse().unwrap());
    pair.client.send(cid, b"x").unwrap();
    for _ in 0..3 {
        pair.exchange();
        pair.advance();
    }
    pair.exchange();
    for stack in [&mut pair.client, &mut pair.gateway] {
        let next = stack.poll_timeout().expect("keep-alive timer");
        assert!(
            next > pair.now,
            "deadline {:?} not after now",
            next - pair.now
        );
    }
}

#[test]
fn client_giving_up_cancels_a_pending_flow() {
    let mut pair = Pair::new();
    let cid = pair.client.connect_tcp(RESOURCE.parse().unwrap()).unwrap();
    pair.exchange();
    let new = pair.gateway.poll_new_flow().unwrap();
    pair.client.abort(cid).unwrap();
    pair.exchange();
    assert_eq!(
        pair.gateway_events(),
        vec![FlowEvent::Closed(new.id, CloseReason::Reset)]
    );
    assert_eq!(
        pair.gateway.accept_flow(new.id, pair.now),
        Err(FlowError::UnknownFlow(new.id))
    );
    assert_eq!(pair.gateway.flow_count(), 0);
}
