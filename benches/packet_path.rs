//! The data plane's per-packet path, in memory, on one thread: a client [`Engine`]
//! encapsulates, the gateway [`Engine`] decapsulates, and the gateway's [`Pep`] filters.
//!
//! Set-up: one client engine and one gateway engine with one peer each, a WireGuard handshake
//! completed by shuttling datagrams between them in memory, the grant installed in the PEP,
//! and one TCP flow opened (SYN through the tunnel, SYN-ACK from the resource) so it is
//! established. Every packet is 1,420 bytes of IPv4/TCP on that flow (the usual tunnel MTU).
//!
//! Benches (throughput in decimal bytes: multiply GB/s by 8 for Gbit/s):
//! - `encapsulate`: client `handle_ip_packet` + `poll_transmit`;
//! - `decapsulate`: gateway `handle_datagram` on datagrams encrypted beforehand, untimed
//!   (each datagram decrypts once: WireGuard's replay protection);
//! - `filter_outbound` / `filter_inbound`: `Pep::handle_outbound` on the established flow,
//!   and `Pep::handle_inbound` for the resource's reply;
//! - `encap_decap`: engine to engine, no filter (compare with boringtun's own figure);
//! - `full_outbound`: encapsulate + decapsulate + `handle_outbound`, client to resource;
//! - `full_reply`: `handle_inbound` + encapsulate + decapsulate, resource to client.
//!
//! No timings are asserted; the functional checks (`expect`) only make sure each bench
//! measures the path it names. Run with `cargo bench --bench packet_path`.

mod support;

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput};
use wardgate_common::dataplane::{
    Engine, EngineConfig, MAX_DATAGRAM_LEN, PeerConfig, PeerId, PresharedKey, Received,
};
use wardgate_common::keys::{PublicKey, StaticSecret};
use wardgate_gateway::pep::{
    GrantId, InboundVerdict, IpPrefix, Peer, Pep, PepConfig, PortRange, Proto, Rule, Verdict,
};

use support::{TcpFlags, tcp_v4};

/// The packet size: a full-size packet at the usual WireGuard tunnel MTU.
const PACKET_LEN: usize = 1_420;
/// The gateway engine's peer id for the grant; the PEP's grant id has the same number.
const GW_PEER: PeerId = PeerId(1);
const GRANT: GrantId = GrantId(1);
/// The client engine's peer id for its tunnel to the gateway.
const CL_PEER: PeerId = PeerId(7);
const CLIENT_PORT: u16 = 40_000;
const RESOURCE_PORT: u16 = 443;
/// Datagrams encrypted ahead of each timed batch of the `decapsulate` bench.
const DECAP_BATCH: u64 = 256;

fn client_tunnel() -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 0, 2)
}

fn resource() -> Ipv4Addr {
    Ipv4Addr::new(10, 20, 0, 5)
}

fn gateway_endpoint() -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], 51_820))
}

fn client_endpoint() -> SocketAddr {
    SocketAddr::from(([198, 51, 100, 7], 40_001))
}

/// A deterministic X25519 secret (any 32 bytes are one).
fn secret(n: u8) -> StaticSecret {
    let mut b = [0x5a; 32];
    b[8] = n;
    StaticSecret::from(b)
}

/// Client to resource on the benched flow.
fn outbound(flags: u8, len: usize) -> Vec<u8> {
    tcp_v4(
        client_tunnel(),
        CLIENT_PORT,
        resource(),
        RESOURCE_PORT,
        flags,
        len,
    )
}

/// Resource to client on the benched flow.
fn inbound(flags: u8, len: usize) -> Vec<u8> {
    tcp_v4(
        resource(),
        RESOURCE_PORT,
        client_tunnel(),
        CLIENT_PORT,
        flags,
        len,
    )
}

/// Two engines with a completed handshake, and a PEP with the grant and one established flow.
struct Path {
    client: Engine,
    gateway: Engine,
    pep: Pep,
    now: Instant,
    /// The gateway's output buffer for decrypted packets.
    out: Vec<u8>,
}

impl Path {
    fn new() -> Self {
        let now = Instant::now();
        let psk = [9u8; 32];
        let engine_config = |identity| EngineConfig {
            identity,
            index_seed: 0x00C0_FFEE,
            ..EngineConfig::default()
        };
        let mut gateway = Engine::new(engine_config(Some(secret(1))), now);
        gateway
            .add_peer(
                GW_PEER,
                PeerConfig {
                    local_secret: secret(1),
                    remote_public: PublicKey::from(&secret(2)),
                    preshared_key: Some(PresharedKey::from(psk)),
                    persistent_keepalive: None,
                    endpoint: None,
                },
                now,
            )
            .expect("gateway engine peer");
        let mut client = Engine::new(engine_config(None), now);
        client
            .add_peer(
                CL_PEER,
                PeerConfig {
                    local_secret: secret(2),
                    remote_public: PublicKey::from(&secret(1)),
                    preshared_key: Some(PresharedKey::from(psk)),
                    persistent_keepalive: None,
                    endpoint: Some(gateway_endpoint()),
                },
                now,
            )
            .expect("client engine peer");
        let mut pep = Pep::new(PepConfig::default());
        pep.add_peer(
            Peer {
                grant_id: GRANT,
                client_public_key: PublicKey::from(&secret(2)).to_bytes(),
                preshared_key: psk,
                tunnel_addr: client_tunnel().into(),
                rules: vec![Rule {
                    dst: IpPrefix::host(resource().into()),
                    proto: Proto::Tcp,
                    ports: Some(PortRange::single(RESOURCE_PORT)),
                }],
                expires_at: now + Duration::from_secs(24 * 3600),
            },
            now,
        )
        .expect("PEP peer");
        let mut path = Path {
            client,
            gateway,
            pep,
            now,
            out: vec![0; MAX_DATAGRAM_LEN],
        };

        // The SYN waits in the client's tunnel while the handshake runs, then opens the flow.
        path.client
            .handle_ip_packet(CL_PEER, &outbound(TcpFlags::SYN, 60), now)
            .expect("SYN queued behind the handshake");
        let mut opened = 0;
        for _ in 0..8 {
            while let Some(t) = path.client.poll_transmit(1) {
                let got = path
                    .gateway
                    .handle_datagram(client_endpoint(), t.contents, &mut path.out, now)
                    .expect("client datagram accepted");
                if let Received::Packet { peer, packet } = got {
                    let verdict = path.pep.handle_outbound(GrantId(peer.0), packet, now);
                    assert_eq!(verdict, Verdict::Forward, "the SYN opens the flow");
                    opened += 1;
                }
            }
            while let Some(t) = path.gateway.poll_transmit(1) {
                path.client
                    .handle_datagram(gateway_endpoint(), t.contents, &mut path.out, now)
                    .expect("gateway datagram accepted");
            }
            if path.client.queued_datagrams() == 0 && path.gateway.queued_datagrams() == 0 {
                break;
            }
        }
        assert_eq!(opened, 1, "handshake completed and the SYN went through");
        let syn_ack = inbound(TcpFlags::SYN | TcpFlags::ACK, 60);
        assert_eq!(
            path.pep.handle_inbound(&syn_ack, now),
            InboundVerdict::ForwardTo(GRANT),
            "the SYN-ACK establishes the flow"
        );
        path
    }

    /// Encrypts one packet on the client and hands back its datagram.
    fn encapsulate(&mut self, packet: &[u8]) -> &[u8] {
        self.client
            .handle_ip_packet(CL_PEER, packet, self.now)
            .expect("encapsulate");
        self.client.poll_transmit(1).expect("one datagram").contents
    }
}

fn packet_path(c: &mut Criterion) {
    let mut path = Path::new();
    let out_packet = outbound(TcpFlags::ACK, PACKET_LEN);
    let reply = inbound(TcpFlags::ACK, PACKET_LEN);
    let now = path.now;

    let mut group = c.benchmark_group("packet_path_1420B");
    group
        .throughput(Throughput::BytesDecimal(PACKET_LEN as u64))
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    group.bench_function("encapsulate", |b| {
        b.iter(|| black_box(path.encapsulate(black_box(&out_packet)).len()))
    });

    group.bench_function("decapsulate", |b| {
        let Path {
            client,
            gateway,
            out,
            ..
        } = &mut path;
        // Encrypted in untimed batches, decrypted in order (the replay window allows it).
        b.iter_batched_ref(
            || {
                client
                    .handle_ip_packet(CL_PEER, &out_packet, now)
                    .expect("encapsulate");
                client
                    .poll_transmit(1)
                    .expect("one datagram")
                    .contents
                    .to_vec()
            },
            |datagram| match gateway.handle_datagram(client_endpoint(), datagram, out, now) {
                Ok(Received::Packet { packet, .. }) => black_box(packet.len()),
                other => panic!("expected a packet, got {other:?}"),
            },
            BatchSize::NumIterations(DECAP_BATCH),
        )
    });

    group.bench_function("filter_outbound", |b| {
        b.iter(|| {
            let verdict = path.pep.handle_outbound(GRANT, black_box(&out_packet), now);
            debug_assert_eq!(verdict, Verdict::Forward);
            black_box(verdict)
        })
    });

    group.bench_function("filter_inbound", |b| {
        b.iter(|| {
            let verdict = path.pep.handle_inbound(black_box(&reply), now);
            debug_assert_eq!(verdict, InboundVerdict::ForwardTo(GRANT));
            black_box(verdict)
        })
    });

    group.bench_function("encap_decap", |b| {
        b.iter(|| {
            let Path {
                client,
                gateway,
                out,
                ..
            } = &mut path;
            client
                .handle_ip_packet(CL_PEER, black_box(&out_packet), now)
                .expect("encapsulate");
            let t = client.poll_transmit(1).expect("one datagram");
            match gateway.handle_datagram(client_endpoint(), t.contents, out, now) {
                Ok(Received::Packet { packet, .. }) => black_box(packet.len()),
                other => panic!("expected a packet, got {other:?}"),
            }
        })
    });

    group.bench_function("full_outbound", |b| {
        b.iter(|| {
            let Path {
                client,
                gateway,
                pep,
                out,
                ..
            } = &mut path;
            client
                .handle_ip_packet(CL_PEER, black_box(&out_packet), now)
                .expect("encapsulate");
            let t = client.poll_transmit(1).expect("one datagram");
            let Ok(Received::Packet { peer, packet }) =
                gateway.handle_datagram(client_endpoint(), t.contents, out, now)
            else {
                panic!("the gateway did not decrypt a packet");
            };
            let verdict = pep.handle_outbound(GrantId(peer.0), packet, now);
            debug_assert_eq!(verdict, Verdict::Forward);
            black_box(verdict)
        })
    });

    group.bench_function("full_reply", |b| {
        b.iter(|| {
            let Path {
                client,
                gateway,
                pep,
                out,
                ..
            } = &mut path;
            let InboundVerdict::ForwardTo(grant) = pep.handle_inbound(black_box(&reply), now)
            else {
                panic!("the reply was dropped");
            };
            gateway
                .handle_ip_packet(PeerId(grant.0), &reply, now)
                .expect("encapsulate");
            let t = gateway.poll_transmit(1).expect("one datagram");
            match client.handle_datagram(gateway_endpoint(), t.contents, out, now) {
                Ok(Received::Packet { packet, .. }) => black_box(packet.len()),
                other => panic!("expected a packet, got {other:?}"),
            }
        })
    });

    group.finish();

    let drops = path.gateway.stats().dropped.total() + path.client.stats().dropped.total();
    assert_eq!(drops, 0, "no engine drops while benching");
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    packet_path(&mut c);
    c.final_summary();
}
