//! The gateway filter's lookups at scale: a [`Pep`] with 10,000 peers and 100,000 established
//! flows, against a baseline of 1 peer and 1 flow measured in the same run, so the results
//! read as ratios.
//!
//! Each of the 10,000 peers has its own tunnel address in 100.64.0.0/10, its own client key,
//! four rules (TCP 443 and 8000-8099 to its resource, UDP 53 to a resolver subnet, ICMP to the
//! resource subnet) and ten established TCP flows to its resource. Packets are header-only
//! (40 bytes of IPv4/TCP): the filter reads headers only, and small packets keep the working
//! set about the tables rather than payloads. Throughput is in packets.
//!
//! Benches, each as `…/1p_1f` (baseline) and `…/10kp_100kf`; the `_spread` variants cycle
//! through 4,096 flows picked at random over the whole table, so hash lookups miss the cache
//! as they would under real traffic rather than hitting one hot entry:
//! - `outbound_existing`: `handle_outbound` on an established flow (the fast path);
//! - `inbound_reply`: `handle_inbound` for the resource's reply on such a flow;
//! - `new_flow_syn`: an allowed SYN that opens a new flow (rule scan + two inserts). Every
//!   SYN uses a fresh 5-tuple, spread over all peers; after each chunk of
//!   [`SYN_CHUNK`] SYNs the clock is moved on (untimed) so `handle_timeout` reaps them, which
//!   keeps the table at its size and far below the flow caps. The fixtures use a 1 s TCP
//!   transitory timeout for this and the longest established timeout (7 days), so the
//!   background flows stay through the run;
//! - `denied_port`: a SYN to a port no rule allows (a flow-table miss, then all four rules).
//!
//! No timings are asserted; the verdicts are checked so each bench measures what it names.
//! Run with `cargo bench --bench filter_scale`.

mod support;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use wardgate_gateway::pep::{
    DropReason, GrantId, InboundVerdict, IpPrefix, Peer, Pep, PepConfig, PortRange, Proto, Rule,
    Timeouts, Verdict,
};

use support::{HEADERS_LEN, TcpFlags, tcp_v4};

/// SYNs opened between two reaps in `new_flow_syn`.
const SYN_CHUNK: u64 = 4_096;
/// Flows the `_spread` benches cycle through.
const SPREAD: usize = 4_096;
/// Ports of the established background flows: `FLOW_PORT_BASE + j` for flow `j` of a peer.
const FLOW_PORT_BASE: u16 = 40_000;
/// New SYNs use client ports from here up (below the background flows' ports).
const SYN_PORT_BASE: u16 = 1_024;
const SYN_PORTS: u64 = (FLOW_PORT_BASE - SYN_PORT_BASE) as u64;
/// A prime that does not divide the peer count, to scatter consecutive SYNs over the peers.
const SCATTER: u64 = 7_919;

/// Peer `i`'s tunnel address: `100.64.0.1` onwards.
fn tunnel(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 1)) + i)
}

/// Peer `i`'s resource: one of 4,096 hosts in 10.20.0.0/16.
fn resource(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 20, 0, 1)) + i % 4_096)
}

fn rules(i: u32) -> Vec<Rule> {
    let host = IpPrefix::host(resource(i).into());
    vec![
        Rule {
            dst: host,
            proto: Proto::Tcp,
            ports: Some(PortRange::single(443)),
        },
        Rule {
            dst: host,
            proto: Proto::Tcp,
            ports: PortRange::new(8_000, 8_099),
        },
        Rule {
            dst: IpPrefix::new(IpAddr::from([10, 30, 0, 0]), 24).expect("resolver prefix"),
            proto: Proto::Udp,
            ports: Some(PortRange::single(53)),
        },
        Rule {
            dst: IpPrefix::new(IpAddr::from([10, 20, 0, 0]), 16).expect("resource prefix"),
            proto: Proto::Icmp,
            ports: None,
        },
    ]
}

/// A Pep with `peers` peers of `flows_per_peer` established flows each, and its own clock.
struct Fixture {
    pep: Pep,
    peers: u32,
    flows_per_peer: u16,
    now: Instant,
    /// SYNs opened so far by `new_flow_syn` (makes every 5-tuple fresh).
    syns: u64,
}

impl Fixture {
    fn new(peers: u32, flows_per_peer: u16) -> Self {
        let started = Instant::now();
        let now = started;
        let mut pep = Pep::new(PepConfig {
            timeouts: Timeouts {
                tcp_transitory: Duration::from_secs(1),
                tcp_established: Duration::from_secs(7 * 24 * 3600),
                ..Timeouts::default()
            },
            ..PepConfig::default()
        });
        for i in 0..peers {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            pep.add_peer(
                Peer {
                    grant_id: GrantId(u64::from(i)),
                    client_public_key: key,
                    preshared_key: [0x5a; 32],
                    tunnel_addr: tunnel(i).into(),
                    rules: rules(i),
                    expires_at: now + Duration::from_secs(365 * 24 * 3600),
                },
                now,
            )
            .expect("peer installs");
            for j in 0..flows_per_peer {
                let port = FLOW_PORT_BASE + j;
                let syn = tcp_v4(
                    tunnel(i),
                    port,
                    resource(i),
                    443,
                    TcpFlags::SYN,
                    HEADERS_LEN,
                );
                let syn_ack = tcp_v4(
                    resource(i),
                    443,
                    tunnel(i),
                    port,
                    TcpFlags::SYN | TcpFlags::ACK,
                    HEADERS_LEN,
                );
                assert_eq!(
                    pep.handle_outbound(GrantId(u64::from(i)), &syn, now),
                    Verdict::Forward
                );
                assert_eq!(
                    pep.handle_inbound(&syn_ack, now),
                    InboundVerdict::ForwardTo(GrantId(u64::from(i)))
                );
            }
        }
        assert_eq!(pep.peer_count(), peers as usize);
        assert_eq!(
            pep.flow_count(),
            peers as usize * usize::from(flows_per_peer)
        );
        eprintln!(
            "fixture: {} peers, {} flows, built in {:.2?}",
            pep.peer_count(),
            pep.flow_count(),
            started.elapsed()
        );
        Fixture {
            pep,
            peers,
            flows_per_peer,
            now,
            syns: 0,
        }
    }

    fn label(&self) -> String {
        let flows = self.peers * u32::from(self.flows_per_peer);
        let short = |n: u32| {
            if n >= 1_000 {
                format!("{}k", n / 1_000)
            } else {
                n.to_string()
            }
        };
        format!("{}p_{}f", short(self.peers), short(flows))
    }

    /// Flow `j` of peer `i`, one packet each way: (grant, client to resource, reply).
    fn flow_packets(&self, i: u32, j: u16) -> (GrantId, Vec<u8>, Vec<u8>) {
        let port = FLOW_PORT_BASE + j;
        let out = tcp_v4(
            tunnel(i),
            port,
            resource(i),
            443,
            TcpFlags::ACK,
            HEADERS_LEN,
        );
        let back = tcp_v4(
            resource(i),
            443,
            tunnel(i),
            port,
            TcpFlags::ACK,
            HEADERS_LEN,
        );
        (GrantId(u64::from(i)), out, back)
    }

    /// A flow in the middle of the table.
    fn middle_flow(&self) -> (GrantId, Vec<u8>, Vec<u8>) {
        self.flow_packets(self.peers / 2, self.flows_per_peer / 2)
    }

    /// [`SPREAD`] flows picked by a fixed pseudo-random sequence over the whole table.
    fn spread_flows(&self) -> Vec<(GrantId, Vec<u8>, Vec<u8>)> {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        (0..SPREAD)
            .map(|_| {
                // xorshift64
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % u64::from(self.peers)) as u32;
                let j = ((x >> 32) % u64::from(self.flows_per_peer)) as u16;
                self.flow_packets(i, j)
            })
            .collect()
    }

    /// The next `n` allowed SYNs, each on a fresh 5-tuple, consecutive ones on different peers.
    fn next_syns(&mut self, n: u64, into: &mut Vec<(GrantId, Vec<u8>)>) {
        into.clear();
        let peers = u64::from(self.peers);
        for k in self.syns..self.syns + n {
            let i = ((k * SCATTER) % peers) as u32;
            let port = SYN_PORT_BASE + ((k / peers) % SYN_PORTS) as u16;
            let syn = tcp_v4(
                tunnel(i),
                port,
                resource(i),
                443,
                TcpFlags::SYN,
                HEADERS_LEN,
            );
            into.push((GrantId(u64::from(i)), syn));
        }
        self.syns += n;
    }

    /// Moves the clock past the SYN flows' timeout and reaps them; the background flows stay.
    fn reap(&mut self) {
        self.now += Duration::from_secs(2);
        self.pep.handle_timeout(self.now);
        while self.pep.poll_event().is_some() {}
    }
}

fn filter_scale(c: &mut Criterion) {
    let mut fixtures = [Fixture::new(1, 1), Fixture::new(10_000, 10)];
    // The first reap reschedules every background flow's timer entry once (untimed here).
    for f in &mut fixtures {
        f.reap();
    }

    let mut group = c.benchmark_group("outbound_existing");
    configure(&mut group);
    for f in &mut fixtures {
        let (grant, packet, _) = f.middle_flow();
        let (label, now) = (f.label(), f.now);
        group.bench_function(BenchmarkId::from_parameter(&label), |b| {
            b.iter(|| {
                let verdict = f.pep.handle_outbound(grant, black_box(&packet), now);
                debug_assert_eq!(verdict, Verdict::Forward);
                black_box(verdict)
            })
        });
        if f.peers > 1 {
            let spread = f.spread_flows();
            let mut at = 0;
            group.bench_function(
                BenchmarkId::from_parameter(format!("{label}_spread")),
                |b| {
                    b.iter(|| {
                        let (grant, packet, _) = &spread[at];
                        at = (at + 1) % SPREAD;
                        let verdict = f.pep.handle_outbound(*grant, black_box(packet), now);
                        debug_assert_eq!(verdict, Verdict::Forward);
                        black_box(verdict)
                    })
                },
            );
        }
    }
    group.finish();

    let mut group = c.benchmark_group("inbound_reply");
    configure(&mut group);
    for f in &mut fixtures {
        let (grant, _, reply) = f.middle_flow();
        let (label, now) = (f.label(), f.now);
        group.bench_function(BenchmarkId::from_parameter(&label), |b| {
            b.iter(|| {
                let verdict = f.pep.handle_inbound(black_box(&reply), now);
                debug_assert_eq!(verdict, InboundVerdict::ForwardTo(grant));
                black_box(verdict)
            })
        });
        if f.peers > 1 {
            let spread = f.spread_flows();
            let mut at = 0;
            group.bench_function(
                BenchmarkId::from_parameter(format!("{label}_spread")),
                |b| {
                    b.iter(|| {
                        let (grant, _, reply) = &spread[at];
                        at = (at + 1) % SPREAD;
                        let verdict = f.pep.handle_inbound(black_box(reply), now);
                        debug_assert_eq!(verdict, InboundVerdict::ForwardTo(*grant));
                        black_box(verdict)
                    })
                },
            );
        }
    }
    group.finish();

    let mut group = c.benchmark_group("new_flow_syn");
    configure(&mut group);
    for f in &mut fixtures {
        let label = f.label();
        let background = f.pep.flow_count();
        let mut syns = Vec::with_capacity(SYN_CHUNK as usize);
        group.bench_function(BenchmarkId::from_parameter(&label), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(SYN_CHUNK);
                    f.next_syns(n, &mut syns);
                    let now = f.now;
                    let mut forwarded = 0u64;
                    let started = Instant::now();
                    for (grant, syn) in &syns {
                        let verdict = f.pep.handle_outbound(*grant, black_box(syn), now);
                        forwarded += u64::from(verdict == Verdict::Forward);
                    }
                    timed += started.elapsed();
                    assert_eq!(forwarded, n, "every SYN opens a flow");
                    f.reap();
                    left -= n;
                }
                timed
            })
        });
        assert_eq!(f.pep.flow_count(), background, "the SYN flows were reaped");
    }
    group.finish();

    let mut group = c.benchmark_group("denied_port");
    configure(&mut group);
    for f in &mut fixtures {
        let i = f.peers / 2;
        let grant = GrantId(u64::from(i));
        let syn = tcp_v4(
            tunnel(i),
            50_000,
            resource(i),
            22,
            TcpFlags::SYN,
            HEADERS_LEN,
        );
        let (label, now) = (f.label(), f.now);
        assert_eq!(
            f.pep.handle_outbound(grant, &syn, now),
            Verdict::Drop(DropReason::PortNotAllowed)
        );
        group.bench_function(BenchmarkId::from_parameter(&label), |b| {
            b.iter(|| {
                let verdict = f.pep.handle_outbound(grant, black_box(&syn), now);
                debug_assert_eq!(verdict, Verdict::Drop(DropReason::PortNotAllowed));
                black_box(verdict)
            })
        });
    }
    group.finish();
}

/// Short, equal settings for every group, and throughput in packets.
fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .throughput(Throughput::Elements(1))
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    filter_scale(&mut c);
    c.final_summary();
}
