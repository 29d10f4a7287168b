//! Deterministic tests of the PEP: a fake clock (one base `Instant` plus durations) and
//! hand-built packets.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::packet::{TcpFlags, protocol};
use super::*;

const SYN: u8 = TcpFlags::SYN;
const SYN_ACK: u8 = TcpFlags::SYN | TcpFlags::ACK;
const ACK: u8 = TcpFlags::ACK;
const RST: u8 = TcpFlags::RST;

const A: GrantId = GrantId(1);
const B: GrantId = GrantId(2);

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
}

fn client_a() -> IpAddr {
    v4(100, 64, 0, 1)
}

fn client_b() -> IpAddr {
    v4(100, 64, 0, 2)
}

/// The EHR server: the granted resource.
fn ehr() -> IpAddr {
    v4(10, 20, 0, 5)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

// ---- packet builders ----

fn ip(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = u16::try_from(20 + payload.len()).unwrap();
            let mut p = vec![0x45, 0];
            p.extend_from_slice(&total.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(payload);
            p
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => ip6_ext(s, d, proto, &[], payload),
        _ => panic!("mixed families"),
    }
}

/// IPv6 with extension headers: each `(next_header_of_this, body)` pair is written with the
/// right lengths, the last one's next header being `proto`.
fn ip6_ext(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    ext: &[(u8, usize)],
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, (_, len8)) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(proto, |(kind, _)| *kind);
        let mut h = vec![next, u8::try_from(*len8).unwrap()];
        h.resize((len8 + 1) * 8, 0);
        body.extend_from_slice(&h);
    }
    body.extend_from_slice(payload);
    let first = ext.first().map_or(proto, |(kind, _)| *kind);
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
    p.extend_from_slice(&[first, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&body);
    p
}

fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    ip(src, dst, protocol::TCP, &t)
}

fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&u16::try_from(8 + data.len()).unwrap().to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    ip(src, dst, protocol::UDP, &u)
}

fn icmp_proto(addr: IpAddr) -> u8 {
    if addr.is_ipv6() {
        protocol::ICMPV6
    } else {
        protocol::ICMP
    }
}

fn echo(src: IpAddr, dst: IpAddr, request: bool, id: u16) -> Vec<u8> {
    let kind = match (src.is_ipv6(), request) {
        (false, true) => 8,
        (false, false) => 0,
        (true, true) => 128,
        (true, false) => 129,
    };
    let mut m = vec![kind, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 1, 0xab, 0xcd]);
    ip(src, dst, icmp_proto(src), &m)
}

/// Destination unreachable (v4) / packet too big (v6) quoting the first 28/48 bytes of
/// `quoted`.
fn icmp_error(src: IpAddr, dst: IpAddr, quoted: &[u8]) -> Vec<u8> {
    let kind = if src.is_ipv6() { 2 } else { 3 };
    let mut m = vec![kind, 4, 0, 0, 0, 0, 0x05, 0x00];
    let keep = if src.is_ipv6() { 48 } else { 28 };
    m.extend_from_slice(&quoted[..keep.min(quoted.len())]);
    ip(src, dst, icmp_proto(src), &m)
}

// ---- peers ----

fn tcp_rule(dst: IpAddr, port: u16) -> Rule {
    Rule {
        dst: IpPrefix::host(dst),
        proto: Proto::Tcp,
        ports: Some(PortRange::single(port)),
    }
}

fn peer(grant: GrantId, key: u8, tunnel: IpAddr, rules: Vec<Rule>, expires_at: Instant) -> Peer {
    Peer {
        grant_id: grant,
        client_public_key: [key; 32],
        preshared_key: [0x5a; 32],
        tunnel_addr: tunnel,
        rules,
        expires_at,
    }
}

/// A gateway with grant A (client 100.64.0.1 -> EHR tcp/443, udp/53, icmp) and grant B
/// (client 100.64.0.2 -> EHR tcp/443), both for one hour.
fn setup() -> (Pep, Instant) {
    let t0 = Instant::now();
    let mut pep = Pep::default();
    let rules_a = vec![
        tcp_rule(ehr(), 443),
        Rule {
            dst: IpPrefix::host(ehr()),
            proto: Proto::Udp,
            ports: Some(PortRange::single(53)),
        },
        Rule {
            dst: IpPrefix::host(ehr()),
            proto: Proto::Icmp,
            ports: None,
        },
    ];
    pep.add_peer(peer(A, 1, client_a(), rules_a, t0 + secs(3600)), t0)
        .unwrap();
    pep.add_peer(
        peer(
            B,
            2,
            client_b(),
            vec![tcp_rule(ehr(), 443)],
            t0 + secs(3600),
        ),
        t0,
    )
    .unwrap();
    (pep, t0)
}

fn drain(pep: &mut Pep) -> Vec<Event> {
    std::iter::from_fn(|| pep.poll_event()).collect()
}

// ---- behaviour ----

#[test]
fn allowed_tcp_flow_passes_and_reply_comes_back() {
    let (mut pep, t0) = setup();
    let syn = tcp(client_a(), 50000, ehr(), 443, SYN);
    assert_eq!(pep.handle_outbound(A, &syn, t0), Verdict::Forward);
    let syn_ack = tcp(ehr(), 443, client_a(), 50000, SYN_ACK);
    assert_eq!(
        pep.handle_inbound(&syn_ack, t0),
        InboundVerdict::ForwardTo(A)
    );
    let ack = tcp(client_a(), 50000, ehr(), 443, ACK);
    assert_eq!(pep.handle_outbound(A, &ack, t0), Verdict::Forward);
    let data = tcp(ehr(), 443, client_a(), 50000, ACK);
    assert_eq!(pep.handle_inbound(&data, t0), InboundVerdict::ForwardTo(A));

    let c = pep.counters(A).unwrap();
    assert_eq!((c.out_packets, c.in_packets), (2, 2));
    assert_eq!(c.out_bytes, (syn.len() + ack.len()) as u64);
    assert_eq!(c.in_bytes, (syn_ack.len() + data.len()) as u64);
    assert_eq!(c.dropped.total(), 0);
    assert_eq!(pep.flow_count(), 1);
}

#[test]
fn another_port_on_the_granted_host_is_dropped_and_counted() {
    let (mut pep, t0) = setup();
    let ssh = tcp(client_a(), 50000, ehr(), 22, SYN);
    assert_eq!(
        pep.handle_outbound(A, &ssh, t0),
        Verdict::Drop(DropReason::PortNotAllowed)
    );
    // UDP/443 is not granted either: the rule matched the host, not the protocol.
    let quic = udp(client_a(), 50000, ehr(), 443, b"x");
    assert_eq!(
        pep.handle_outbound(A, &quic, t0),
        Verdict::Drop(DropReason::PortNotAllowed)
    );
    // B has only TCP to the EHR: UDP is the wrong protocol.
    let dns_b = udp(client_b(), 50000, ehr(), 53, b"x");
    assert_eq!(
        pep.handle_outbound(B, &dns_b, t0),
        Verdict::Drop(DropReason::ProtocolNotAllowed)
    );
    let c = pep.counters(A).unwrap();
    assert_eq!(c.dropped.get(DropReason::PortNotAllowed), 2);
    assert_eq!(c.out_packets, 0);
    assert_eq!(pep.flow_count(), 0);
    assert_eq!(
        pep.counters(B)
            .unwrap()
            .dropped
            .get(DropReason::ProtocolNotAllowed),
        1
    );
}

#[test]
fn another_host_in_the_same_subnet_is_dropped() {
    let (mut pep, t0) = setup();
    let neighbour = tcp(client_a(), 50000, v4(10, 20, 0, 6), 443, SYN);
    assert_eq!(
        pep.handle_outbound(A, &neighbour, t0),
        Verdict::Drop(DropReason::DestinationNotAllowed)
    );
    assert_eq!(
        pep.counters(A)
            .unwrap()
            .dropped
            .get(DropReason::DestinationNotAllowed),
        1
    );
}

#[test]
fn spoofed_source_is_dropped() {
    let (mut pep, t0) = setup();
    let spoofed = tcp(v4(10, 20, 0, 99), 50000, ehr(), 443, SYN);
    assert_eq!(
        pep.handle_outbound(A, &spoofed, t0),
        Verdict::Drop(DropReason::SpoofedSource)
    );
    assert_eq!(
        pep.counters(A)
            .unwrap()
            .dropped
            .get(DropReason::SpoofedSource),
        1
    );
    assert_eq!(pep.flow_count(), 0);
}

#[test]
fn second_client_claiming_first_clients_address_is_dropped() {
    let (mut pep, t0) = setup();
    let syn = tcp(client_a(), 50000, ehr(), 443, SYN);
    assert_eq!(pep.handle_outbound(A, &syn, t0), Verdict::Forward);

    // B's session decrypts packets carrying A's address: a new flow, and one on A's 5-tuple.
    let new = tcp(client_a(), 50001, ehr(), 443, SYN);
    let hijack = tcp(client_a(), 50000, ehr(), 443, RST);
    for p in [&new, &hijack] {
        assert_eq!(
            pep.handle_outbound(B, p, t0 + secs(1)),
            Verdict::Drop(DropReason::SpoofedSource)
        );
    }
    assert_eq!(
        pep.counters(B)
            .unwrap()
            .dropped
            .get(DropReason::SpoofedSource),
        2
    );
    assert_eq!(pep.flow_count(), 1);

    // A's flow is untouched: the reply goes to A, and A keeps talking.
    let syn_ack = tcp(ehr(), 443, client_a(), 50000, SYN_ACK);
    assert_eq!(
        pep.handle_inbound(&syn_ack, t0 + secs(2)),
        InboundVerdict::ForwardTo(A)
    );
    let ack = tcp(client_a(), 50000, ehr(), 443, ACK);
    assert_eq!(pep.handle_outbound(A, &ack, t0 + secs(2)), Verdict::Forward);
    assert_eq!(pep.counters(A).unwrap().dropped.total(), 0);
}

// ---- grants sharing one tunnel address (one device, one grant per resource) ----

/// The PACS server: DICOM on tcp/104, its web viewer on tcp/443.
fn pacs() -> IpAddr {
    v4(10, 20, 0, 7)
}

/// The one tunnel address of the device holding every grant below.
fn device() -> IpAddr {
    v4(100, 64, 0, 9)
}

/// One device with two grants on the PACS through one tunnel address: A for DICOM
/// (tcp/104, 10 minutes) and B for the viewer (tcp/443, 1 hour).
fn shared_setup() -> (Pep, Instant) {
    let t0 = Instant::now();
    let mut pep = Pep::default();
    let dicom = peer(A, 1, device(), vec![tcp_rule(pacs(), 104)], t0 + secs(600));
    pep.add_peer(dicom, t0).unwrap();
    let viewer = peer(B, 2, device(), vec![tcp_rule(pacs(), 443)], t0 + secs(3600));
    pep.add_peer(viewer, t0).unwrap();
    (pep, t0)
}

#[test]
fn grants_sharing_a_tunnel_address_each_get_their_own_replies() {
    let (mut pep, t0) = shared_setup();
    assert_eq!(pep.peer_count(), 2);
    assert_eq!(pep.grant_for_key(&[1; 32], t0), Some(A));
    assert_eq!(pep.grant_for_key(&[2; 32], t0), Some(B));

    let dicom = tcp(device(), 50000, pacs(), 104, SYN);
    let viewer = tcp(device(), 50001, pacs(), 443, SYN);
    assert_eq!(pep.handle_outbound(A, &dicom, t0), Verdict::Forward);
    assert_eq!(pep.handle_outbound(B, &viewer, t0), Verdict::Forward);
    assert_eq!(pep.flow_count(), 2);

    // Each reply goes to the grant whose flow it answers, though both have one address.
    let dicom_reply = tcp(pacs(), 104, device(), 50000, SYN_ACK);
    let viewer_reply = tcp(pacs(), 443, device(), 50001, SYN_ACK);
    assert_eq!(
        pep.handle_inbound(&viewer_reply, t0),
        InboundVerdict::ForwardTo(B)
    );
    assert_eq!(
        pep.handle_inbound(&dicom_reply, t0),
        InboundVerdict::ForwardTo(A)
    );
    let ack_a = tcp(device(), 50000, pacs(), 104, ACK);
    let ack_b = tcp(device(), 50001, pacs(), 443, ACK);
    assert_eq!(pep.handle_outbound(A, &ack_a, t0), Verdict::Forward);
    assert_eq!(pep.handle_outbound(B, &ack_b, t0), Verdict::Forward);

    // ICMP errors (here from a router) go to the grant of the flow they quote.
    let router = v4(10, 20, 0, 1);
    let about_b = icmp_error(router, device(), &viewer);
    let about_a = icmp_error(router, device(), &dicom);
    assert_eq!(
        pep.handle_inbound(&about_b, t0),
        InboundVerdict::ForwardTo(B)
    );
    assert_eq!(
        pep.handle_inbound(&about_a, t0),
        InboundVerdict::ForwardTo(A)
    );

    for (g, out, inb) in [
        (
            A,
            dicom.len() + ack_a.len(),
            dicom_reply.len() + about_a.len(),
        ),
        (
            B,
            viewer.len() + ack_b.len(),
            viewer_reply.len() + about_b.len(),
        ),
    ] {
        let c = pep.counters(g).unwrap();
        assert_eq!((c.out_packets, c.in_packets), (2, 2), "{g}");
        assert_eq!((c.out_bytes, c.in_bytes), (out as u64, inb as u64), "{g}");
        assert_eq!(c.dropped.total(), 0, "{g}");
    }

    // Unsolicited traffic to the shared address is no one grant's: counted on the gateway.
    let unsolicited = tcp(pacs(), 443, device(), 50002, ACK);
    assert_eq!(
        pep.handle_inbound(&unsolicited, t0),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    let probe = tcp(pacs(), 40000, device(), 22, SYN);
    assert_eq!(
        pep.handle_inbound(&probe, t0),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    assert_eq!(pep.global_counters().dropped.get(DropReason::NoFlow), 2);
    assert_eq!(pep.counters(A).unwrap().dropped.total(), 0);
    assert_eq!(pep.counters(B).unwrap().dropped.total(), 0);
    assert_eq!(pep.flow_count(), 2);
}

#[test]
fn a_grant_cannot_use_or_disturb_another_grants_flow_on_a_shared_address() {
    let (mut pep, t0) = shared_setup();
    // C, a third grant on the same address, may reach both ports and ping the PACS: its
    // packets below are refused for the flow's owner, not for its rules.
    let c = GrantId(3);
    let rules_c = vec![
        tcp_rule(pacs(), 104),
        tcp_rule(pacs(), 443),
        Rule {
            dst: IpPrefix::host(pacs()),
            proto: Proto::Icmp,
            ports: None,
        },
    ];
    pep.add_peer(peer(c, 3, device(), rules_c, t0 + secs(3600)), t0)
        .unwrap();

    let syn = tcp(device(), 50000, pacs(), 104, SYN);
    assert_eq!(pep.handle_outbound(A, &syn, t0), Verdict::Forward);

    // B (not granted tcp/104) and C (granted it) send on A's exact 5-tuple: a new SYN, data,
    // a reset, a FIN; C also sends an ICMP error about A's connection to the PACS.
    let on_a_flow = [
        tcp(device(), 50000, pacs(), 104, SYN),
        tcp(device(), 50000, pacs(), 104, ACK),
        tcp(device(), 50000, pacs(), 104, RST),
        tcp(device(), 50000, pacs(), 104, TcpFlags::FIN | ACK),
    ];
    let now = t0 + secs(1);
    for g in [B, c] {
        for p in &on_a_flow {
            assert_eq!(
                pep.handle_outbound(g, p, now),
                Verdict::Drop(DropReason::FlowOwnedByOtherGrant),
                "{g}"
            );
        }
    }
    let quoted = tcp(pacs(), 104, device(), 50000, SYN_ACK);
    let error_c = icmp_error(device(), pacs(), &quoted);
    assert_eq!(
        pep.handle_outbound(c, &error_c, now),
        Verdict::Drop(DropReason::FlowOwnedByOtherGrant)
    );
    let owned = |pep: &Pep, g| {
        pep.counters(g)
            .unwrap()
            .dropped
            .get(DropReason::FlowOwnedByOtherGrant)
    };
    assert_eq!((owned(&pep, B), owned(&pep, c)), (4, 5));
    assert_eq!(pep.counters(c).unwrap().out_packets, 0);
    assert_eq!(pep.flow_count(), 1);

    // A's flow is untouched: neither reset (a closed flow would be gone 10 s later) nor
    // taken over; the reply goes to A, and A keeps talking.
    pep.handle_timeout(t0 + secs(12));
    assert_eq!(pep.flow_count(), 1);
    assert!(drain(&mut pep).is_empty());
    assert_eq!(
        pep.handle_inbound(&quoted, t0 + secs(12)),
        InboundVerdict::ForwardTo(A)
    );
    let ack = tcp(device(), 50000, pacs(), 104, ACK);
    assert_eq!(
        pep.handle_outbound(A, &ack, t0 + secs(12)),
        Verdict::Forward
    );
    let a = pep.counters(A).unwrap();
    assert_eq!((a.out_packets, a.in_packets, a.dropped.total()), (2, 1, 0));

    // Once A closes it and the flow has gone idle, the 5-tuple is free: C may open it under
    // its own rules, and the replies are C's.
    let rst = tcp(device(), 50000, pacs(), 104, RST);
    assert_eq!(
        pep.handle_outbound(A, &rst, t0 + secs(13)),
        Verdict::Forward
    );
    let later = t0 + secs(23);
    assert_eq!(pep.handle_outbound(c, &syn, later), Verdict::Forward);
    assert_eq!(
        pep.handle_inbound(&quoted, later),
        InboundVerdict::ForwardTo(c)
    );
    assert_eq!(
        pep.handle_outbound(A, &ack, later),
        Verdict::Drop(DropReason::FlowOwnedByOtherGrant)
    );
    assert_eq!(pep.flow_count(), 1);
}

#[test]
fn new_flow_on_a_shared_address_is_judged_by_the_sending_grants_rules() {
    let (mut pep, t0) = shared_setup();
    // B carries the device's (shared) source address, but DICOM is only A's.
    let dicom_by_b = tcp(device(), 50002, pacs(), 104, SYN);
    assert_eq!(
        pep.handle_outbound(B, &dicom_by_b, t0),
        Verdict::Drop(DropReason::PortNotAllowed)
    );
    let dns_by_b = udp(device(), 50003, pacs(), 53, b"q");
    assert_eq!(
        pep.handle_outbound(B, &dns_by_b, t0),
        Verdict::Drop(DropReason::ProtocolNotAllowed)
    );
    // And the viewer is only B's.
    let viewer_by_a = tcp(device(), 50004, pacs(), 443, SYN);
    assert_eq!(
        pep.handle_outbound(A, &viewer_by_a, t0),
        Verdict::Drop(DropReason::PortNotAllowed)
    );
    // The source must still be the grant's own address.
    let spoofed = tcp(v4(100, 64, 0, 10), 50005, pacs(), 443, SYN);
    assert_eq!(
        pep.handle_outbound(B, &spoofed, t0),
        Verdict::Drop(DropReason::SpoofedSource)
    );
    assert_eq!(pep.flow_count(), 0);
    let b = pep.counters(B).unwrap();
    assert_eq!(b.dropped.get(DropReason::PortNotAllowed), 1);
    assert_eq!(b.dropped.get(DropReason::ProtocolNotAllowed), 1);
    assert_eq!(b.dropped.get(DropReason::SpoofedSource), 1);
    let a = pep.counters(A).unwrap();
    assert_eq!(a.dropped.get(DropReason::PortNotAllowed), 1);
    assert_eq!(a.dropped.total(), 1);
    // No flow was opened, so the PACS cannot answer through either grant.
    let reply = tcp(pacs(), 104, device(), 50002, SYN_ACK);
    assert_eq!(
        pep.handle_inbound(&reply, t0),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
}

#[test]
fn removing_one_grant_of_a_shared_address_leaves_the_others() {
    let (mut pep, t0) = shared_setup();
    let dicom = tcp(device(), 50000, pacs(), 104, SYN);
    let viewer = tcp(device(), 50001, pacs(), 443, SYN);
    assert_eq!(pep.handle_outbound(A, &dicom, t0), Verdict::Forward);
    assert_eq!(pep.handle_outbound(B, &viewer, t0), Verdict::Forward);

    assert_eq!(pep.remove_peer(A).unwrap().grant_id, A);
    assert_eq!(pep.flow_count(), 1);
    // A's replies and packets are dropped...
    let dicom_reply = tcp(pacs(), 104, device(), 50000, SYN_ACK);
    assert_eq!(
        pep.handle_inbound(&dicom_reply, t0),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    assert_eq!(
        pep.handle_outbound(A, &tcp(device(), 50000, pacs(), 104, ACK), t0),
        Verdict::Drop(DropReason::UnknownPeer)
    );
    // ... and B's flow, its mappings and its new flows work on the same address.
    let viewer_reply = tcp(pacs(), 443, device(), 50001, SYN_ACK);
    assert_eq!(
        pep.handle_inbound(&viewer_reply, t0),
        InboundVerdict::ForwardTo(B)
    );
    let second = tcp(device(), 50002, pacs(), 443, SYN);
    assert_eq!(pep.handle_outbound(B, &second, t0), Verdict::Forward);
    assert_eq!(
        pep.handle_inbound(&tcp(pacs(), 443, device(), 50002, SYN_ACK), t0),
        InboundVerdict::ForwardTo(B)
    );
    assert_eq!(pep.grant_for_key(&[2; 32], t0), Some(B));
    assert_eq!(pep.grant_for_key(&[1; 32], t0), None);
    assert_eq!(pep.counters(B).unwrap().dropped.total(), 0);

    // The device gets DICOM back through a new grant on the same address.
    let renewed = GrantId(4);
    pep.add_peer(
        peer(
            renewed,
            1,
            device(),
            vec![tcp_rule(pacs(), 104)],
            t0 + secs(600),
        ),
        t0,
    )
    .unwrap();
    assert_eq!(pep.handle_outbound(renewed, &dicom, t0), Verdict::Forward);
    assert_eq!(
        pep.handle_inbound(&dicom_reply, t0),
        InboundVerdict::ForwardTo(renewed)
    );
    assert_eq!(pep.flow_count(), 3);
}

#[test]
fn expiry_of_one_grant_of_a_shared_address_leaves_the_others() {
    let (mut pep, t0) = shared_setup();
    let end_a = t0 + secs(600);
    let dicom = tcp(device(), 50000, pacs(), 104, SYN);
    let viewer = tcp(device(), 50001, pacs(), 443, SYN);
    let dicom_reply = tcp(pacs(), 104, device(), 50000, ACK);
    let viewer_reply = tcp(pacs(), 443, device(), 50001, ACK);
    assert_eq!(pep.handle_outbound(A, &dicom, t0), Verdict::Forward);
    assert_eq!(pep.handle_outbound(B, &viewer, t0), Verdict::Forward);
    for (reply, g) in [(&dicom_reply, A), (&viewer_reply, B)] {
        assert_eq!(
            pep.handle_inbound(reply, t0 + secs(1)),
            InboundVerdict::ForwardTo(g)
        );
    }
    // Both flows are established, so nothing happens until A's expiry.
    pep.handle_timeout(end_a - Duration::from_nanos(1));
    assert!(drain(&mut pep).is_empty());
    assert_eq!(pep.flow_count(), 2);

    // At A's expiry, before handle_timeout: A's reply finds A's flow and is dropped as
    // Expired, charged to A; B's traffic on the same address goes on.
    assert_eq!(
        pep.handle_inbound(&dicom_reply, end_a),
        InboundVerdict::Drop(DropReason::Expired)
    );
    assert_eq!(
        pep.handle_inbound(&viewer_reply, end_a),
        InboundVerdict::ForwardTo(B)
    );
    assert_eq!(
        pep.handle_outbound(A, &tcp(device(), 50000, pacs(), 104, ACK), end_a),
        Verdict::Drop(DropReason::Expired)
    );
    assert_eq!(
        pep.handle_outbound(B, &tcp(device(), 50001, pacs(), 443, ACK), end_a),
        Verdict::Forward
    );
    assert_eq!(drain(&mut pep), vec![Event::PeerExpired { grant_id: A }]);
    assert_eq!(pep.counters(A).unwrap().dropped.get(DropReason::Expired), 2);
    // Only A's flow went.
    assert_eq!(pep.flow_count(), 1);
    assert_eq!(
        pep.handle_inbound(&dicom_reply, end_a + secs(1)),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    assert_eq!(pep.counters(B).unwrap().dropped.total(), 0);

    // A third grant on the address expiring through handle_timeout alone: B is untouched.
    let c = GrantId(3);
    let end_c = end_a + secs(60);
    pep.add_peer(
        peer(c, 3, device(), vec![tcp_rule(pacs(), 104)], end_c),
        end_a,
    )
    .unwrap();
    assert_eq!(pep.handle_outbound(c, &dicom, end_a), Verdict::Forward);
    assert_eq!(pep.flow_count(), 2);
    pep.handle_timeout(end_c);
    assert_eq!(drain(&mut pep), vec![Event::PeerExpired { grant_id: c }]);
    assert_eq!(pep.flow_count(), 1);
    assert_eq!(
        pep.handle_inbound(&viewer_reply, end_c),
        InboundVerdict::ForwardTo(B)
    );
    // Removing the tombstones leaves B alone, too.
    pep.remove_peer(A).unwrap();
    pep.remove_peer(c).unwrap();
    assert_eq!(
        pep.handle_inbound(&viewer_reply, end_c),
        InboundVerdict::ForwardTo(B)
    );
    assert!(pep.is_live(B, end_c));
    assert_eq!(pep.flow_count(), 1);
}

#[test]
fn resource_cannot_open_connections_to_clients() {
    let (mut pep, t0) = setup();
    let syn = tcp(ehr(), 40000, client_a(), 22, SYN);
    assert_eq!(
        pep.handle_inbound(&syn, t0),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    // Not even on the 5-tuple of a flow the client opened.
    let out = tcp(client_a(), 50000, ehr(), 443, SYN);
    assert_eq!(pep.handle_outbound(A, &out, t0), Verdict::Forward);
    let syn_on_flow = tcp(ehr(), 443, client_a(), 50000, SYN);
    assert_eq!(
        pep.handle_inbound(&syn_on_flow, t0),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    // Nor UDP, nor a ping.
    let u = udp(ehr(), 53, client_a(), 9999, b"x");
    assert_eq!(
        pep.handle_inbound(&u, t0),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    let ping = echo(ehr(), client_a(), true, 7);
    assert_eq!(
        pep.handle_inbound(&ping, t0),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    // The SYN on A's flow is charged to A; the others match no flow, so no grant is to blame
    // (a tunnel address is a device's, and may be shared by several grants).
    assert_eq!(pep.counters(A).unwrap().dropped.get(DropReason::NoFlow), 1);
    assert_eq!(pep.counters(A).unwrap().in_packets, 0);
    assert_eq!(pep.global_counters().dropped.get(DropReason::NoFlow), 3);
    // To an address of no client: counted globally too.
    let stray = tcp(ehr(), 443, v4(100, 64, 9, 9), 50000, ACK);
    assert_eq!(
        pep.handle_inbound(&stray, t0),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    assert_eq!(pep.global_counters().dropped.get(DropReason::NoFlow), 4);
}

#[test]
fn at_expires_at_no_packet_passes_and_the_event_fires() {
    let (mut pep, t0) = setup();
    let end = t0 + secs(3600);
    assert_eq!(pep.poll_timeout(), Some(t0 + secs(3600)));
    let syn = tcp(client_a(), 50000, ehr(), 443, SYN);
    let syn_ack = tcp(ehr(), 443, client_a(), 50000, SYN_ACK);
    assert_eq!(
        pep.handle_outbound(A, &syn, end - secs(10)),
        Verdict::Forward
    );
    let just_before = end - Duration::from_nanos(1);
    assert_eq!(
        pep.handle_inbound(&syn_ack, just_before),
        InboundVerdict::ForwardTo(A)
    );
    assert!(pep.is_live(A, just_before));

    // At exactly expires_at, before any handle_timeout: both directions are dropped. The
    // reply still finds the flow, which names its (expired) grant.
    let data = tcp(ehr(), 443, client_a(), 50000, ACK);
    assert_eq!(
        pep.handle_inbound(&data, end),
        InboundVerdict::Drop(DropReason::Expired)
    );
    let ack = tcp(client_a(), 50000, ehr(), 443, ACK);
    assert_eq!(
        pep.handle_outbound(A, &ack, end),
        Verdict::Drop(DropReason::Expired)
    );
    assert!(!pep.is_live(A, end));
    assert_eq!(pep.grant_for_key(&[1; 32], end), None);
    assert!(drain(&mut pep).contains(&Event::PeerExpired { grant_id: A }));
    // Its flows are gone, and nothing comes back later either.
    assert_eq!(
        pep.handle_outbound(A, &syn, end + secs(1)),
        Verdict::Drop(DropReason::Expired)
    );
    assert_eq!(pep.counters(A).unwrap().dropped.get(DropReason::Expired), 3);
    assert_eq!(
        pep.handle_inbound(&data, end + secs(1)),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    assert_eq!(pep.global_counters().dropped.get(DropReason::NoFlow), 1);

    // B expires through handle_timeout alone, with its event.
    pep.handle_timeout(end);
    assert_eq!(drain(&mut pep), vec![Event::PeerExpired { grant_id: B }]);
    let syn_b = tcp(client_b(), 50000, ehr(), 443, SYN);
    assert_eq!(
        pep.handle_outbound(B, &syn_b, end),
        Verdict::Drop(DropReason::Expired)
    );
    assert_eq!(pep.flow_count(), 0);
    assert_eq!(pep.poll_timeout(), None);

    // The shell removes the tombstones.
    assert!(pep.remove_peer(A).is_some());
    assert!(pep.remove_peer(B).is_some());
    assert_eq!(pep.peer_count(), 0);
}

#[test]
fn expired_tunnel_address_and_key_can_be_reused() {
    let (mut pep, t0) = setup();
    let end = t0 + secs(3600);
    pep.handle_timeout(end);
    let renewed = peer(
        GrantId(3),
        1,
        client_a(),
        vec![tcp_rule(ehr(), 443)],
        end + secs(3600),
    );
    pep.add_peer(renewed, end).unwrap();
    let syn = tcp(client_a(), 50000, ehr(), 443, SYN);
    assert_eq!(pep.handle_outbound(GrantId(3), &syn, end), Verdict::Forward);
    let syn_ack = tcp(ehr(), 443, client_a(), 50000, SYN_ACK);
    assert_eq!(
        pep.handle_inbound(&syn_ack, end),
        InboundVerdict::ForwardTo(GrantId(3))
    );
    // Removing the old tombstone leaves the new grant's mappings alone.
    pep.remove_peer(A).unwrap();
    assert_eq!(pep.grant_for_key(&[1; 32], end), Some(GrantId(3)));
    assert_eq!(
        pep.handle_inbound(&syn_ack, end),
        InboundVerdict::ForwardTo(GrantId(3))
    );
}

#[test]
fn remove_peer_stops_its_traffic_at_once() {
    let (mut pep, t0) = setup();
    let syn = tcp(client_a(), 50000, ehr(), 443, SYN);
    assert_eq!(pep.handle_outbound(A, &syn, t0), Verdict::Forward);
    let syn_b = tcp(client_b(), 50000, ehr(), 443, SYN);
    assert_eq!(pep.handle_outbound(B, &syn_b, t0), Verdict::Forward);

    let removed = pep.remove_peer(A).unwrap();
    assert_eq!(removed.grant_id, A);
    assert_eq!(pep.flow_count(), 1);
    let syn_ack = tcp(ehr(), 443, client_a(), 50000, SYN_ACK);
    assert_eq!(
        pep.handle_inbound(&syn_ack, t0),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    let ack = tcp(client_a(), 50000, ehr(), 443, ACK);
    assert_eq!(
        pep.handle_outbound(A, &ack, t0),
        Verdict::Drop(DropReason::UnknownPeer)
    );
    assert_eq!(
        pep.global_counters().dropped.get(DropReason::UnknownPeer),
        1
    );
    assert!(pep.counters(A).is_none());
    assert!(pep.remove_peer(A).is_none());
    // B is unaffected.
    let syn_ack_b = tcp(ehr(), 443, client_b(), 50000, SYN_ACK);
    assert_eq!(
        pep.handle_inbound(&syn_ack_b, t0),
        InboundVerdict::ForwardTo(B)
    );
}

#[test]
fn idle_flow_ages_out_then_the_reply_is_dropped() {
    let (mut pep, t0) = setup();
    // A half-open TCP flow lives for the transitory timeout (240 s).
    let syn = tcp(client_a(), 50000, ehr(), 443, SYN);
    assert_eq!(pep.handle_outbound(A, &syn, t0), Verdict::Forward);
    assert_eq!(pep.poll_timeout(), Some(t0 + secs(240)));
    pep.handle_timeout(t0 + secs(239));
    assert_eq!(pep.flow_count(), 1);
    pep.handle_timeout(t0 + secs(240));
    assert_eq!(pep.flow_count(), 0);
    let events = drain(&mut pep);
    assert!(matches!(
        events.as_slice(),
        [Event::FlowExpired { grant_id: A, flow }] if flow.client_port == 50000
    ));
    let syn_ack = tcp(ehr(), 443, client_a(), 50000, SYN_ACK);
    assert_eq!(
        pep.handle_inbound(&syn_ack, t0 + secs(241)),
        InboundVerdict::Drop(DropReason::NoFlow)
    );

    // Idle flows are dead even if handle_timeout has not run: UDP unreplied is 30 s.
    let q = udp(client_a(), 40000, ehr(), 53, b"q");
    assert_eq!(pep.handle_outbound(A, &q, t0), Verdict::Forward);
    let r = udp(ehr(), 53, client_a(), 40000, b"r");
    assert_eq!(
        pep.handle_inbound(&r, t0 + secs(30)),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    assert_eq!(pep.flow_count(), 0);
}

#[test]
fn busy_flow_outlives_its_first_deadline() {
    let (mut pep, t0) = setup();
    let q = udp(client_a(), 40000, ehr(), 53, b"q");
    let r = udp(ehr(), 53, client_a(), 40000, b"r");
    assert_eq!(pep.handle_outbound(A, &q, t0), Verdict::Forward);
    assert_eq!(
        pep.handle_inbound(&r, t0 + secs(1)),
        InboundVerdict::ForwardTo(A)
    );
    // Replied: the stream timeout (180 s) applies from the last packet.
    for i in 1..=10 {
        let now = t0 + secs(100 * i);
        assert_eq!(pep.handle_inbound(&r, now), InboundVerdict::ForwardTo(A));
        pep.handle_timeout(now);
        assert_eq!(pep.flow_count(), 1, "round {i}");
    }
    assert!(drain(&mut pep).is_empty());
    let last = t0 + secs(1000);
    assert!(pep.poll_timeout().unwrap() <= last + secs(180));
    pep.handle_timeout(last + secs(180));
    assert_eq!(pep.flow_count(), 0);
}

#[test]
fn tcp_reset_and_fin_shorten_the_timeout() {
    let (mut pep, t0) = setup();
    let syn = tcp(client_a(), 50000, ehr(), 443, SYN);
    let syn_ack = tcp(ehr(), 443, client_a(), 50000, SYN_ACK);
    assert_eq!(pep.handle_outbound(A, &syn, t0), Verdict::Forward);
    assert_eq!(
        pep.handle_inbound(&syn_ack, t0),
        InboundVerdict::ForwardTo(A)
    );
    // Established: survives an hour of silence.
    pep.handle_timeout(t0 + secs(3000));
    assert_eq!(pep.flow_count(), 1);
    let now = t0 + secs(3000);
    let rst = tcp(ehr(), 443, client_a(), 50000, RST);
    assert_eq!(pep.handle_inbound(&rst, now), InboundVerdict::ForwardTo(A));
    assert!(pep.poll_timeout().unwrap() <= now + secs(10));
    pep.handle_timeout(now + secs(10));
    assert_eq!(pep.flow_count(), 0);

    // A FIN moves an established flow to the 4-minute transitory timeout.
    let syn = tcp(client_a(), 50002, ehr(), 443, SYN);
    let syn_ack = tcp(ehr(), 443, client_a(), 50002, SYN_ACK);
    let fin = tcp(client_a(), 50002, ehr(), 443, TcpFlags::FIN | ACK);
    assert_eq!(pep.handle_outbound(A, &syn, now), Verdict::Forward);
    assert_eq!(
        pep.handle_inbound(&syn_ack, now),
        InboundVerdict::ForwardTo(A)
    );
    assert_eq!(pep.handle_outbound(A, &fin, now), Verdict::Forward);
    pep.handle_timeout(now + secs(239));
    assert_eq!(pep.flow_count(), 1);
    pep.handle_timeout(now + secs(240));
    assert_eq!(pep.flow_count(), 0);

    // A reset from the client opens nothing but is forwarded if the grant allows the port.
    let rst_out = tcp(client_a(), 50001, ehr(), 443, RST);
    assert_eq!(pep.handle_outbound(A, &rst_out, now), Verdict::Forward);
    assert_eq!(pep.flow_count(), 0);
}

#[test]
fn udp_flow_works() {
    let (mut pep, t0) = setup();
    let q = udp(client_a(), 40000, ehr(), 53, b"query");
    assert_eq!(pep.handle_outbound(A, &q, t0), Verdict::Forward);
    let r = udp(ehr(), 53, client_a(), 40000, b"answer");
    assert_eq!(
        pep.handle_inbound(&r, t0 + secs(1)),
        InboundVerdict::ForwardTo(A)
    );
    // From another source port of the resource: not the flow.
    let other = udp(ehr(), 5353, client_a(), 40000, b"answer");
    assert_eq!(
        pep.handle_inbound(&other, t0 + secs(1)),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    // To another client port: not the flow.
    let other = udp(ehr(), 53, client_a(), 40001, b"answer");
    assert_eq!(
        pep.handle_inbound(&other, t0 + secs(1)),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
}

#[test]
fn ipv6_flow_works() {
    let t0 = Instant::now();
    let mut pep = Pep::default();
    let client = v6("fd00:77::1");
    let server = v6("fd10::5");
    let rules = vec![tcp_rule(server, 443)];
    pep.add_peer(peer(A, 1, client, rules, t0 + secs(60)), t0)
        .unwrap();
    let syn = tcp(client, 50000, server, 443, SYN);
    assert_eq!(pep.handle_outbound(A, &syn, t0), Verdict::Forward);
    let syn_ack = tcp(server, 443, client, 50000, SYN_ACK);
    assert_eq!(
        pep.handle_inbound(&syn_ack, t0),
        InboundVerdict::ForwardTo(A)
    );
    let neighbour = tcp(client, 50000, v6("fd10::6"), 443, SYN);
    assert_eq!(
        pep.handle_outbound(A, &neighbour, t0),
        Verdict::Drop(DropReason::DestinationNotAllowed)
    );
    // An IPv4 packet to the same port does not match an IPv6 rule.
    let v4_syn = tcp(v4(100, 64, 0, 1), 50000, ehr(), 443, SYN);
    assert_eq!(
        pep.handle_outbound(A, &v4_syn, t0),
        Verdict::Drop(DropReason::SpoofedSource)
    );
    // Hop-by-hop and destination options are walked to reach TCP.
    let (IpAddr::V6(c), IpAddr::V6(s)) = (client, server) else {
        unreachable!()
    };
    let tcp_only = &tcp(client, 50001, server, 443, SYN)[40..];
    let with_ext = ip6_ext(
        c,
        s,
        protocol::TCP,
        &[(protocol::HOPOPT, 0), (protocol::DSTOPTS, 1)],
        tcp_only,
    );
    assert_eq!(pep.handle_outbound(A, &with_ext, t0), Verdict::Forward);
    // Packet-too-big about the flow reaches the client, from any router.
    let ptb = icmp_error(v6("fd10::1"), client, &syn);
    assert_eq!(pep.handle_inbound(&ptb, t0), InboundVerdict::ForwardTo(A));
}

#[test]
fn icmp_echo_and_related_errors() {
    let (mut pep, t0) = setup();
    let ping = echo(client_a(), ehr(), true, 77);
    assert_eq!(pep.handle_outbound(A, &ping, t0), Verdict::Forward);
    let pong = echo(ehr(), client_a(), false, 77);
    assert_eq!(pep.handle_inbound(&pong, t0), InboundVerdict::ForwardTo(A));
    let wrong_id = echo(ehr(), client_a(), false, 78);
    assert_eq!(
        pep.handle_inbound(&wrong_id, t0),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    // B may not ping.
    let ping_b = echo(client_b(), ehr(), true, 1);
    assert_eq!(
        pep.handle_outbound(B, &ping_b, t0),
        Verdict::Drop(DropReason::ProtocolNotAllowed)
    );

    // Destination unreachable about A's UDP flow passes; about a packet of no flow it does not.
    let q = udp(client_a(), 40000, ehr(), 53, b"q");
    assert_eq!(pep.handle_outbound(A, &q, t0), Verdict::Forward);
    let unreachable = icmp_error(ehr(), client_a(), &q);
    assert_eq!(
        pep.handle_inbound(&unreachable, t0),
        InboundVerdict::ForwardTo(A)
    );
    let unrelated = icmp_error(ehr(), client_a(), &udp(client_a(), 40001, ehr(), 53, b"q"));
    assert_eq!(
        pep.handle_inbound(&unrelated, t0),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    // An error claiming to be about a packet from another client.
    let forged = icmp_error(ehr(), client_a(), &udp(client_b(), 40000, ehr(), 53, b"q"));
    assert_eq!(
        pep.handle_inbound(&forged, t0),
        InboundVerdict::Drop(DropReason::NoFlow)
    );

    // B (no ICMP rule) may still report an error about its own flow, to that resource only.
    let syn_b = tcp(client_b(), 50000, ehr(), 443, SYN);
    assert_eq!(pep.handle_outbound(B, &syn_b, t0), Verdict::Forward);
    let from_ehr = tcp(ehr(), 443, client_b(), 50000, SYN_ACK);
    let err_b = icmp_error(client_b(), ehr(), &from_ehr);
    assert_eq!(pep.handle_outbound(B, &err_b, t0), Verdict::Forward);
    let err_elsewhere = icmp_error(client_b(), v4(10, 20, 0, 6), &from_ehr);
    assert_eq!(
        pep.handle_outbound(B, &err_elsewhere, t0),
        Verdict::Drop(DropReason::DestinationNotAllowed)
    );
}

#[test]
fn fragments_options_and_malformed_packets_are_dropped() {
    let (mut pep, t0) = setup();
    let syn = tcp(client_a(), 50000, ehr(), 443, SYN);

    let mut fragment = syn.clone();
    fragment[6] = 0x20; // more fragments
    let mut later_fragment = syn.clone();
    later_fragment[6] = 0x00;
    later_fragment[7] = 0x10; // offset 16
    let mut options = syn[..20].to_vec();
    options[0] = 0x46;
    options.extend_from_slice(&[1, 1, 1, 0]); // NOPs, end of options
    options.extend_from_slice(&syn[20..]);
    options[3] += 4;
    let (IpAddr::V6(c), IpAddr::V6(s)) = (v6("fd00::1"), v6("fd10::5")) else {
        unreachable!()
    };
    let v6_fragment = ip6_ext(c, s, protocol::TCP, &[(protocol::FRAGMENT, 0)], &[0; 20]);
    let v6_routing = ip6_ext(c, s, protocol::TCP, &[(protocol::ROUTING, 0)], &[0; 20]);
    let deep = ip6_ext(
        c,
        s,
        protocol::TCP,
        &[(protocol::HOPOPT, 0); 1]
            .iter()
            .chain(&[(protocol::DSTOPTS, 0); 9])
            .copied()
            .collect::<Vec<_>>(),
        &[0; 20],
    );
    let hop_by_hop_late = ip6_ext(
        c,
        s,
        protocol::TCP,
        &[(protocol::DSTOPTS, 0), (protocol::HOPOPT, 0)],
        &[0; 20],
    );

    let mut long = syn.clone();
    long.push(0); // one byte more than the total length says
    let mut short_tcp = syn[..30].to_vec();
    short_tcp[3] = 30;
    let mut bad_offset = syn.clone();
    bad_offset[32] = 0x40; // data offset 4 words
    let mut bad_udp_len = udp(client_a(), 1, ehr(), 53, b"abc");
    bad_udp_len[25] = 99;
    let mut huge = vec![0x45u8; 70_000];
    huge[2] = 0xff;
    huge[3] = 0xff;
    let mut version5 = syn.clone();
    version5[0] = 0x55;

    let cases: Vec<(&str, Vec<u8>, DropReason)> = vec![
        ("first fragment", fragment, DropReason::Fragment),
        ("later fragment", later_fragment, DropReason::Fragment),
        ("ipv4 options", options, DropReason::IpOptions),
        ("ipv6 fragment", v6_fragment, DropReason::Fragment),
        ("ipv6 routing header", v6_routing, DropReason::IpOptions),
        ("ten extension headers", deep, DropReason::Malformed),
        ("late hop-by-hop", hop_by_hop_late, DropReason::Malformed),
        ("trailing byte", long, DropReason::Malformed),
        ("truncated tcp", short_tcp, DropReason::Malformed),
        ("tcp data offset", bad_offset, DropReason::Malformed),
        ("udp length", bad_udp_len, DropReason::Malformed),
        ("oversize", huge, DropReason::Malformed),
        ("ip version 5", version5, DropReason::Malformed),
        ("empty", Vec::new(), DropReason::Malformed),
    ];
    for (name, packet, reason) in cases {
        assert_eq!(
            super::packet::Packet::parse(&packet).map_err(DropReason::from),
            Err(reason),
            "{name}"
        );
        assert_eq!(
            pep.handle_inbound(&packet, t0),
            InboundVerdict::Drop(reason),
            "{name}"
        );
    }
    // Outbound drops are charged to the grant they arrived on.
    assert_eq!(
        pep.handle_outbound(A, &[0x45, 0, 0], t0),
        Verdict::Drop(DropReason::Malformed)
    );
    assert_eq!(
        pep.counters(A).unwrap().dropped.get(DropReason::Malformed),
        1
    );
    assert_eq!(pep.global_counters().dropped.total(), 14);
}

#[test]
fn add_peer_refuses_what_it_cannot_enforce() {
    let (mut pep, t0) = setup();
    let later = t0 + secs(60);
    let rules = || vec![tcp_rule(ehr(), 443)];
    let fresh = |grant, key, addr| peer(grant, key, addr, rules(), later);
    let c = v4(100, 64, 0, 3);

    assert_eq!(
        pep.add_peer(fresh(A, 9, c), t0),
        Err(PeerError::DuplicateGrant(A))
    );
    assert_eq!(
        pep.add_peer(peer(GrantId(3), 9, c, rules(), t0), t0),
        Err(PeerError::AlreadyExpired(GrantId(3)))
    );
    assert_eq!(
        pep.add_peer(peer(GrantId(3), 9, c, vec![], later), t0),
        Err(PeerError::NoRules(GrantId(3)))
    );
    let icmp_ports = Rule {
        dst: IpPrefix::host(ehr()),
        proto: Proto::Icmp,
        ports: Some(PortRange::single(1)),
    };
    assert!(matches!(
        pep.add_peer(
            peer(
                GrantId(3),
                9,
                c,
                vec![tcp_rule(ehr(), 1), icmp_ports],
                later
            ),
            t0
        ),
        Err(PeerError::PortsWithoutPorts { index: 1, .. })
    ));
    let many = vec![tcp_rule(ehr(), 1); MAX_RULES_PER_PEER + 1];
    assert!(matches!(
        pep.add_peer(peer(GrantId(3), 9, c, many, later), t0),
        Err(PeerError::TooManyRules { .. })
    ));
    for bad in [
        v4(0, 0, 0, 0),
        v4(127, 0, 0, 1),
        v4(224, 0, 0, 1),
        v4(255, 255, 255, 255),
        v6("::"),
        v6("ff02::1"),
    ] {
        assert!(matches!(
            pep.add_peer(fresh(GrantId(3), 9, bad), t0),
            Err(PeerError::InvalidTunnelAddress { .. })
        ));
    }
    // A key is per grant, whether or not the tunnel address is shared with its holder.
    for addr in [c, client_a()] {
        assert_eq!(
            pep.add_peer(fresh(GrantId(3), 1, addr), t0),
            Err(PeerError::ClientKeyInUse {
                grant: GrantId(3),
                held_by: A
            })
        );
    }
    assert_eq!(pep.peer_count(), 2);
    pep.add_peer(fresh(GrantId(3), 9, c), t0).unwrap();
    assert_eq!(pep.grant_for_key(&[9; 32], t0), Some(GrantId(3)));
    assert_eq!(pep.poll_timeout(), Some(later));
    // Error messages say what to do.
    let msg = PeerError::NoRules(GrantId(3)).to_string();
    assert!(msg.contains("at least one destination"), "{msg}");
}

#[test]
fn flow_limit_caps_a_grant_without_hurting_its_open_flows() {
    let t0 = Instant::now();
    let mut pep = Pep::new(PepConfig {
        max_flows_per_grant: 2,
        ..PepConfig::default()
    });
    pep.add_peer(
        peer(A, 1, client_a(), vec![tcp_rule(ehr(), 443)], t0 + secs(60)),
        t0,
    )
    .unwrap();
    for port in [1000, 1001] {
        let syn = tcp(client_a(), port, ehr(), 443, SYN);
        assert_eq!(pep.handle_outbound(A, &syn, t0), Verdict::Forward);
    }
    let third = tcp(client_a(), 1002, ehr(), 443, SYN);
    assert_eq!(
        pep.handle_outbound(A, &third, t0),
        Verdict::Drop(DropReason::FlowLimit)
    );
    let again = tcp(client_a(), 1000, ehr(), 443, ACK);
    assert_eq!(pep.handle_outbound(A, &again, t0), Verdict::Forward);
    assert_eq!(pep.flow_count(), 2);
}

#[test]
fn debug_never_prints_the_preshared_key() {
    let t0 = Instant::now();
    let mut p = peer(A, 1, client_a(), vec![tcp_rule(ehr(), 443)], t0);
    p.preshared_key = [0xee; 32];
    let text = format!("{p:?}");
    assert!(!text.contains("eeee"), "{text}");
    assert!(!text.contains("238, 238"), "{text}");
    assert!(text.contains("<redacted>"));
    let (pep, _) = setup();
    let text = format!("{pep:?}");
    assert!(
        !text.contains("5a5a") && !text.contains("90, 90"),
        "PSK leaked"
    );
}

#[test]
fn drop_reasons_read_as_advice_and_counters_list_all() {
    assert_eq!(
        DropReason::PortNotAllowed.to_string(),
        "destination port not in the grant"
    );
    for (i, r) in DropReason::ALL.into_iter().enumerate() {
        assert_eq!(r as usize, i, "ALL is in counter order");
        assert!(!r.to_string().is_empty());
        assert!(!r.as_str().contains(' '));
    }
    assert_eq!(
        DropReason::FlowOwnedByOtherGrant.as_str(),
        "flow_owned_by_other_grant"
    );
    let (mut pep, t0) = setup();
    let _ = pep.handle_outbound(B, &[], t0);
    let snapshot = pep.counters_snapshot();
    assert_eq!(
        snapshot.iter().map(|(g, _)| *g).collect::<Vec<_>>(),
        vec![A, B]
    );
    assert_eq!(snapshot[1].1.dropped.iter().count(), DropReason::ALL.len());
    assert_eq!(snapshot[1].1.dropped.get(DropReason::Malformed), 1);
}

#[test]
fn prefixes() {
    let p: IpPrefix = "10.20.0.77/24".parse().unwrap();
    assert_eq!(p.to_string(), "10.20.0.0/24");
    assert!(p.contains(v4(10, 20, 0, 255)));
    assert!(!p.contains(v4(10, 20, 1, 0)));
    assert!(!p.contains(v6("::a14:0")));
    let all: IpPrefix = "0.0.0.0/0".parse().unwrap();
    assert!(all.contains(v4(1, 2, 3, 4)) && all.is_empty());
    let p6: IpPrefix = "fd10::/16".parse().unwrap();
    assert!(p6.contains(v6("fd10:ffff::1")) && !p6.contains(v6("fd11::1")));
    assert!(IpPrefix::host(ehr()).contains(ehr()));
    assert_eq!(
        IpPrefix::new(ehr(), 33),
        Err(PrefixError::TooLong { len: 33, max: 32 })
    );
    assert!(matches!(
        "10.0.0.0/x".parse::<IpPrefix>(),
        Err(PrefixError::Syntax(_))
    ));
    assert!(PortRange::new(10, 9).is_none());
    assert!(PortRange::new(8000, 8100).unwrap().contains(8100));
}

// ---- robustness and scale ----

/// xorshift64*: deterministic, dependency-free randomness for the fuzz loop.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_and_mangled_packets_never_panic() {
    let (mut pep, t0) = setup();
    let c6 = v6("fd00::1");
    let s6 = v6("fd10::5");
    pep.add_peer(
        peer(GrantId(6), 6, c6, vec![tcp_rule(s6, 443)], t0 + secs(3600)),
        t0,
    )
    .unwrap();
    let (IpAddr::V6(c6a), IpAddr::V6(s6a)) = (c6, s6) else {
        unreachable!()
    };
    let q = udp(client_a(), 40000, ehr(), 53, b"q");
    let corpus = vec![
        tcp(client_a(), 50000, ehr(), 443, SYN),
        tcp(ehr(), 443, client_a(), 50000, SYN_ACK),
        q.clone(),
        udp(ehr(), 53, client_a(), 40000, b"answer"),
        echo(client_a(), ehr(), true, 5),
        echo(ehr(), client_a(), false, 5),
        icmp_error(ehr(), client_a(), &q),
        icmp_error(client_a(), ehr(), &udp(ehr(), 53, client_a(), 40000, b"r")),
        tcp(c6, 1, s6, 443, SYN),
        icmp_error(s6, c6, &tcp(c6, 1, s6, 443, SYN)),
        ip6_ext(
            c6a,
            s6a,
            protocol::UDP,
            &[(protocol::HOPOPT, 0), (protocol::DSTOPTS, 2)],
            &[0, 1, 0, 2, 0, 8, 0, 0],
        ),
        ip(client_a(), ehr(), 47, b"gre"),
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let grants = [A, B, GrantId(6), GrantId(99)];
    for round in 0..30_000u32 {
        let base = &corpus[rng.below(corpus.len())];
        let packet: Vec<u8> = match round % 4 {
            // Pure noise, sometimes with a plausible first byte.
            0 => {
                let mut p: Vec<u8> = (0..rng.below(120)).map(|_| rng.next() as u8).collect();
                if let Some(first) = p.first_mut() {
                    *first = [0x45, 0x60, *first][rng.below(3)];
                }
                p
            }
            // A valid packet cut short.
            1 => base[..rng.below(base.len() + 1)].to_vec(),
            // A valid packet with a few bytes changed (lengths, IHL, next headers, quotes...).
            2 => {
                let mut p = base.clone();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(p.len());
                    p[i] = rng.next() as u8;
                }
                p
            }
            // A valid packet with bytes appended or its length fields made to agree.
            _ => {
                let mut p = base.clone();
                p.extend((0..rng.below(64)).map(|_| rng.next() as u8));
                if p.first() == Some(&0x45) {
                    let len = u16::try_from(p.len()).unwrap().to_be_bytes();
                    p[2..4].copy_from_slice(&len);
                }
                p
            }
        };
        let now = t0 + Duration::from_millis(u64::from(round));
        let _ = pep.handle_outbound(grants[rng.below(grants.len())], &packet, now);
        let _ = pep.handle_inbound(&packet, now);
        if round % 1000 == 0 {
            pep.handle_timeout(now);
        }
    }
    // The table still works afterwards.
    let now = t0 + secs(31);
    let syn = tcp(client_a(), 61000, ehr(), 443, SYN);
    assert_eq!(pep.handle_outbound(A, &syn, now), Verdict::Forward);
    let syn_ack = tcp(ehr(), 443, client_a(), 61000, SYN_ACK);
    assert_eq!(
        pep.handle_inbound(&syn_ack, now),
        InboundVerdict::ForwardTo(A)
    );
}

#[test]
fn ten_thousand_peers_and_a_hundred_thousand_flows_give_right_answers() {
    const PEERS: u32 = 10_000;
    const FLOWS_PER_PEER: u16 = 10;
    let t0 = Instant::now();
    let mut pep = Pep::default();
    let client = |i: u32| v4(100, 64, (i >> 8) as u8, (i & 0xff) as u8);
    let resource = |i: u32| v4(10, 20, (i % 200) as u8, 1 + (i % 250) as u8);
    for i in 0..PEERS {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&i.to_be_bytes());
        let rules = vec![
            Rule {
                dst: IpPrefix::new(v4(10, 20, 0, 0), 16).unwrap(),
                proto: Proto::Tcp,
                ports: Some(PortRange::single(443)),
            },
            tcp_rule(resource(i), 5432),
        ];
        let p = peer(GrantId(u64::from(i)), 0, client(i), rules, t0 + secs(3600));
        pep.add_peer(
            Peer {
                client_public_key: key,
                ..p
            },
            t0,
        )
        .unwrap();
    }
    for i in 0..PEERS {
        for j in 0..FLOWS_PER_PEER {
            let port = if j % 2 == 0 { 443 } else { 5432 };
            let syn = tcp(client(i), 40000 + j, resource(i), port, SYN);
            assert_eq!(
                pep.handle_outbound(GrantId(u64::from(i)), &syn, t0),
                Verdict::Forward
            );
        }
    }
    assert_eq!(
        pep.flow_count(),
        (PEERS * u32::from(FLOWS_PER_PEER)) as usize
    );
    let now = t0 + secs(1);
    for i in (0..PEERS).step_by(97) {
        let g = GrantId(u64::from(i));
        for j in [0u16, 1, 9] {
            let port = if j % 2 == 0 { 443 } else { 5432 };
            let reply = tcp(resource(i), port, client(i), 40000 + j, SYN_ACK);
            assert_eq!(
                pep.handle_inbound(&reply, now),
                InboundVerdict::ForwardTo(g)
            );
        }
        let unknown_port = tcp(resource(i), 443, client(i), 40000 + FLOWS_PER_PEER, SYN_ACK);
        assert_eq!(
            pep.handle_inbound(&unknown_port, now),
            InboundVerdict::Drop(DropReason::NoFlow)
        );
        // Another peer's reply is not this peer's.
        let neighbour = (i + 1) % PEERS;
        let crossed = tcp(resource(neighbour), 443, client(i), 40000, SYN_ACK);
        if resource(neighbour) != resource(i) {
            assert_eq!(
                pep.handle_inbound(&crossed, now),
                InboundVerdict::Drop(DropReason::NoFlow)
            );
        }
        let spoof = tcp(client(neighbour), 40000, resource(i), 443, ACK);
        assert_eq!(
            pep.handle_outbound(g, &spoof, now),
            Verdict::Drop(DropReason::SpoofedSource)
        );
        // 5432 is granted only on the peer's own resource.
        let db_elsewhere = tcp(client(i), 39999, resource(neighbour), 5432, SYN);
        if resource(neighbour) != resource(i) {
            assert_eq!(
                pep.handle_outbound(g, &db_elsewhere, now),
                Verdict::Drop(DropReason::PortNotAllowed)
            );
        }
        assert_eq!(
            pep.grant_for_key(
                &{
                    let mut k = [0u8; 32];
                    k[..4].copy_from_slice(&i.to_be_bytes());
                    k
                },
                now
            ),
            Some(g)
        );
    }
    // Revoking one grant among 10,000 removes exactly its flows.
    pep.remove_peer(GrantId(4242)).unwrap();
    assert_eq!(
        pep.flow_count(),
        (PEERS * u32::from(FLOWS_PER_PEER)) as usize - usize::from(FLOWS_PER_PEER)
    );
    let reply = tcp(resource(4242), 443, client(4242), 40000, SYN_ACK);
    assert_eq!(
        pep.handle_inbound(&reply, now),
        InboundVerdict::Drop(DropReason::NoFlow)
    );
    // All expire together at the end of the shift.
    pep.handle_timeout(t0 + secs(3600));
    assert_eq!(pep.flow_count(), 0);
    let expired = drain(&mut pep)
        .into_iter()
        .filter(|e| matches!(e, Event::PeerExpired { .. }))
        .count();
    assert_eq!(expired, PEERS as usize - 1);
}
