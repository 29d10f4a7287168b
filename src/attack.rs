//! A misbehaving WireGuard client for end-to-end tests: it holds a real grant (key, PSK,
//! gateway) but writes packets the grant does not allow — other ports, other hosts, a spoofed
//! source address — straight into the tunnel, bypassing the client's own filter, and counts
//! what comes back. The gateway must drop and count every one of them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use wardgate_common::dataplane::engine::{Engine, EngineConfig, PeerConfig, PeerId, Received};
use wardgate_common::dataplane::tunn::{MAX_DATAGRAM_LEN, PresharedKey};
use wardgate_common::grant::ClientGrant;
use wardgate_common::keys::{self, StaticSecret};
use wardgate_common::packet::{Packet, Transport};

/// What the attack saw.
#[derive(Debug, Clone, Serialize)]
pub struct AttackReport {
    /// Packets written into the tunnel.
    pub sent: u32,
    /// Decrypted packets that came back from the gateway (SYN-ACKs, resets, anything).
    pub replies: u32,
    /// Whether the WireGuard handshake completed (the attack reached the gateway at all).
    pub handshake: bool,
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for c in chunks {
        let mut it = c.chunks_exact(2);
        for w in &mut it {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [b] = it.remainder() {
            sum += u32::from(*b) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 TCP SYN with valid checksums.
pub fn tcp_syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let c = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

/// Sends `count` TCP SYNs from `src` to each of `dsts` (a port scan when there are many)
/// through the grant's tunnel, then listens for `listen` and reports. `src` may differ from
/// the grant's tunnel address (spoofing).
pub async fn syn_attack(
    grant: &ClientGrant,
    key: StaticSecret,
    src: Ipv4Addr,
    dsts: &[SocketAddr],
    count: u32,
    listen: Duration,
) -> anyhow::Result<AttackReport> {
    if dsts.iter().any(|d| !d.is_ipv4()) {
        bail!("IPv4 targets only")
    }
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    let mut engine = Engine::new(EngineConfig::default(), Instant::now());
    let psk = keys::decode_key(grant.preshared_key.expose())?;
    engine
        .add_peer(
            PeerId(1),
            PeerConfig {
                local_secret: key,
                remote_public: keys::decode_public(&grant.gateway_public_key)?,
                preshared_key: Some(PresharedKey::from_bytes(psk)),
                persistent_keepalive: None,
                endpoint: Some(grant.gateway_endpoint),
            },
            Instant::now(),
        )
        .context("add peer")?;
    // A random source-port base, so answers to an earlier run (SYN-ACK retransmissions) are
    // not mistaken for answers to this one.
    let base: u16 = 20000 + rand::random::<u16>() % 20000;
    let mut packets = Vec::new();
    for dst in dsts {
        if let IpAddr::V4(dst_ip) = dst.ip() {
            for i in 0..count {
                packets.push(tcp_syn(src, base + (i % 1000) as u16, dst_ip, dst.port()));
            }
        }
    }
    let mut pump = Pump {
        engine,
        socket,
        report: AttackReport {
            sent: 0,
            replies: 0,
            handshake: false,
        },
        dsts,
        src,
        base,
    };
    // The first packet starts the handshake; the rest go once it is done, so a long scan is
    // not cut short by the queue a peer keeps while it has no session.
    let mut rest = packets.into_iter();
    if let Some(p) = rest.next() {
        let _ = pump.engine.handle_ip_packet(PeerId(1), &p, Instant::now());
        pump.report.sent += 1;
        pump.run(tokio::time::Instant::now() + Duration::from_secs(5), true)
            .await?;
    }
    for p in rest {
        let _ = pump.engine.handle_ip_packet(PeerId(1), &p, Instant::now());
        pump.report.sent += 1;
        pump.flush().await;
    }
    pump.run(tokio::time::Instant::now() + listen, false)
        .await?;
    Ok(pump.report)
}

/// The attacker's tunnel end: moves datagrams and counts answers.
struct Pump<'a> {
    engine: Engine,
    socket: tokio::net::UdpSocket,
    report: AttackReport,
    dsts: &'a [SocketAddr],
    src: Ipv4Addr,
    base: u16,
}

impl Pump<'_> {
    async fn flush(&mut self) {
        while let Some(t) = self.engine.poll_transmit(1) {
            let _ = self.socket.send_to(t.contents, t.dst).await;
        }
    }

    /// Moves datagrams until `deadline` (or the handshake, when `until_handshake`).
    async fn run(
        &mut self,
        deadline: tokio::time::Instant,
        until_handshake: bool,
    ) -> anyhow::Result<()> {
        let mut buf = vec![0u8; 65536];
        let mut out = vec![0u8; MAX_DATAGRAM_LEN];
        loop {
            self.flush().await;
            if until_handshake && self.report.handshake {
                return Ok(());
            }
            let wait = self
                .engine
                .poll_timeout()
                .map(|d| tokio::time::Instant::from_std(d).min(deadline))
                .unwrap_or(deadline);
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => {
                    let (n, from) = r?;
                    match self.engine.handle_datagram(from, &buf[..n], &mut out, Instant::now()) {
                        Ok(Received::Packet { packet, .. }) => {
                            self.report.handshake = true;
                            // Count only answers to this run's SYNs: from a target, to our ports.
                            if let Ok(Packet { src: from_ip, dst: to_ip, transport: Transport::Tcp { src_port, dst_port, .. }, .. }) = Packet::parse(packet)
                                && self.dsts.iter().any(|d| d.ip() == from_ip && d.port() == src_port)
                                && to_ip == IpAddr::V4(self.src)
                                && (self.base..self.base.saturating_add(1000)).contains(&dst_port)
                            {
                                self.report.replies += 1;
                            }
                        }
                        Ok(Received::Control { .. }) => self.report.handshake = true,
                        Err(_) => {}
                    }
                }
                _ = tokio::time::sleep_until(wait) => {
                    self.engine.handle_timeout(Instant::now());
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Sends `count` datagrams of random bytes and of truncated/oversize shapes to a WireGuard
/// port: the gateway must drop them all without falling over.
pub async fn junk(to: SocketAddr, count: u32) -> anyhow::Result<u32> {
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut sent = 0;
    for i in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = match i % 5 {
            0 => 0,
            1 => 4,
            2 => 148,
            3 => 32,
            _ => (x % 65000) as usize,
        };
        let mut d: Vec<u8> = (0..len).map(|k| (x >> (k % 56)) as u8 ^ k as u8).collect();
        // Some look like WireGuard message types so they reach deeper parsing.
        if let Some(first) = d.first_mut() {
            *first = (i % 5) as u8;
        }
        if socket.send_to(&d, to).await.is_ok() {
            sent += 1;
        }
    }
    Ok(sent)
}

/// Gets a real grant for `resource` with the enrolled device in `config` (its certificate, a
/// key made here), writes the grant and the private key, prints `ready` and holds the control
/// session until the process is killed, so the grant stays live while the test attacks with it.
pub async fn rogue_grant(
    config: &std::path::Path,
    resource: &str,
    grant_out: &std::path::Path,
    key_out: &std::path::Path,
) -> anyhow::Result<()> {
    use wardgate_common::proto::{Request, Response};
    let dir = wardgate_client::state::ConfigDir::resolve(Some(config.to_path_buf()))?;
    let rec = dir.load()?.context("the device is not enrolled")?;
    let cfg = wardgate_client::enrol::client_config(&dir)?;
    let mut session =
        wardgate_common::transport::ControlClient::connect(&rec.controller, cfg, "rogue")
            .await?
            .into_session();
    let key = keys::generate_private();
    let answer = session
        .request(Request::Connect {
            resource: resource.to_owned(),
            wg_public_key: keys::public_of(&key),
            renews: None,
        })
        .await?;
    let Response::Granted(grant) = answer else {
        bail!("not granted: {answer:?}");
    };
    std::fs::write(grant_out, serde_json::to_vec(&grant)?)?;
    wardgate_common::files::write_secret(key_out, keys::encode_key(&key.to_bytes()).as_bytes())?;
    println!("ready {}", grant.grant_id);
    loop {
        if session.next_push().await.is_none() {
            bail!("the controller closed the session");
        }
    }
}

/// What the controller answered to a posture report sent by [`send_posture`].
#[derive(Debug, Clone, Serialize)]
pub struct PostureAnswer {
    /// Whether it was accepted.
    pub accepted: bool,
    /// The error code when refused (`report_replayed`, …).
    pub code: Option<String>,
    /// The controller's words.
    pub message: String,
}

/// Sends this machine's posture report with the enrolled device in `config` (its certificate)
/// and the given `counter` — a replay when the counter is one the controller already saw —
/// and returns the answer. The device's own counter file is not touched.
pub async fn send_posture(config: &std::path::Path, counter: u64) -> anyhow::Result<PostureAnswer> {
    use wardgate_client::posture;
    use wardgate_common::proto::{Request, Response};
    let dir = wardgate_client::state::ConfigDir::resolve(Some(config.to_path_buf()))?;
    let rec = dir.load()?.context("the device is not enrolled")?;
    let cfg = wardgate_client::enrol::client_config(&dir)?;
    let opts = posture::Options {
        required_processes: Vec::new(),
        device_cert: Some(dir.cert()),
        counter,
    };
    let report = tokio::task::spawn_blocking(move || (posture::system_collect())(&opts)).await?;
    let mut client =
        wardgate_common::transport::ControlClient::connect(&rec.controller, cfg, "replay").await?;
    let answer = client.request(Request::ReportPosture { report }).await;
    client.close().await;
    Ok(match answer {
        Ok(Response::PostureAccepted { failing, .. }) => PostureAnswer {
            accepted: true,
            code: None,
            message: failing.join("; "),
        },
        Ok(other) => bail!("unexpected answer: {other:?}"),
        Err(e) => match e.wire() {
            Some(w) => PostureAnswer {
                accepted: false,
                code: Some(w.code.to_string()),
                message: w.message.clone(),
            },
            None => return Err(e.into()),
        },
    })
}
