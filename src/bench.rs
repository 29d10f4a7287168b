//! `wardgate-bench dataplane`: end-to-end data-plane throughput and memory, every figure
//! measured in the same run so they read as ratios on a noisy shared machine.
//!
//! - `direct_gbps`: TCP over the same veth path (client ns → gateway ns → resource ns, kernel
//!   routing) without a tunnel: the ceiling of the network itself.
//! - `tun_tun_gbps`, `userspace_gbps`: through Wardgate, tun/tun and userspace/userspace.
//! - `ceiling_gbps`: in-process WireGuard encapsulate + decapsulate on one thread, no IO.
//! - `peers_10k_gbps`, `gateway_rss_mb_10k`: tun/tun with 10,000 other grants installed, and the
//!   gateway's resident memory then (`gateway_rss_mb_0` is the same before installing them).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use serde::Serialize;
use wardgate_common::dataplane::engine::{Engine, EngineConfig, PeerConfig, PeerId, Received};
use wardgate_common::dataplane::tunn::{MAX_DATAGRAM_LEN, PresharedKey};
use wardgate_common::grant::GatewayGrant;
use wardgate_common::keys;
use wardgate_common::proto::Secret;

use crate::dpnet::{DpNet, Mode, SINK};
use crate::netns::Topology;

/// Options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes per transfer.
    pub bytes: u64,
    /// Transfers per figure (the median is reported).
    pub runs: usize,
    /// Extra grants for the scale figure.
    pub extra_peers: u32,
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// TCP over the veth path without a tunnel.
    pub direct_gbps: f64,
    /// Through Wardgate, tun client and tun gateway.
    pub tun_tun_gbps: f64,
    /// Through Wardgate, userspace client and userspace gateway.
    pub userspace_gbps: f64,
    /// In-process encapsulate + decapsulate, one thread.
    pub ceiling_gbps: f64,
    /// tun/tun with `extra_peers` other grants installed.
    pub peers_10k_gbps: f64,
    /// Gateway RSS with the extra grants, MB.
    pub gateway_rss_mb_10k: f64,
    /// Gateway RSS with one grant, MB.
    pub gateway_rss_mb_0: f64,
    /// tun/tun ÷ direct.
    pub tun_vs_direct: f64,
    /// userspace ÷ tun/tun.
    pub userspace_vs_tun: f64,
    /// peers_10k ÷ tun/tun.
    pub peers_10k_vs_tun: f64,
    /// Bytes per transfer.
    pub bytes_per_transfer: u64,
    /// Transfers per figure (median reported).
    pub runs: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn transfer(run: impl Fn() -> anyhow::Result<String>, runs: usize) -> anyhow::Result<f64> {
    let mut g = Vec::new();
    for _ in 0..runs {
        let out = run()?;
        let t: serde_json::Value = serde_json::from_str(out.trim()).context("transfer output")?;
        if t["hash_ok"] != true {
            bail!("a transfer arrived corrupted: {out}");
        }
        g.push(t["gbps"].as_f64().unwrap_or(0.0));
    }
    Ok(median(g))
}

fn send_args(to: SocketAddr, bytes: u64) -> Vec<String> {
    vec![
        "send".into(),
        "--to".into(),
        to.to_string(),
        "--bytes".into(),
        bytes.to_string(),
        "--timeout".into(),
        "600s".into(),
    ]
}

fn direct(opts: &Options) -> anyhow::Result<f64> {
    let t = Topology::new(1)?;
    t.gateway
        .exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    t.client.exec(&[
        "ip",
        "route",
        "add",
        "10.10.1.0/24",
        "via",
        &t.gateway_outer.to_string(),
    ])?;
    let node = crate::harness::bin("wardgate-bench")?;
    let dir = tempfile::tempdir()?;
    let mut c = t.resource.command(&node);
    c.args(["node", "sink", "--listen", &SINK.to_string()]);
    let _sink = crate::harness::Proc::spawn(c, dir.path(), "sink")?;
    let n = node.to_str().context("path")?.to_owned();
    crate::harness::wait_for(Duration::from_secs(10), "the sink", || {
        t.client
            .exec(&[&n, "node", "probe", "--to", &SINK.to_string()])
            .ok()
    })?;
    transfer(
        || {
            let mut a = vec![n.clone(), "node".into()];
            a.extend(send_args(SINK, opts.bytes));
            t.client
                .exec(&a.iter().map(String::as_str).collect::<Vec<_>>())
        },
        opts.runs,
    )
}

fn through(net: &DpNet, opts: &Options) -> anyhow::Result<f64> {
    let to = net.via(SINK);
    crate::harness::wait_for(Duration::from_secs(20), "the tunnel", || {
        net.client_node(&["probe", "--to", &to.to_string()]).ok()
    })?;
    transfer(
        || {
            let a = send_args(to, opts.bytes);
            net.client_node(&a.iter().map(String::as_str).collect::<Vec<_>>())
        },
        opts.runs,
    )
}

fn gateway_rss_mb(net: &DpNet) -> anyhow::Result<f64> {
    let pid = net.gateway_pid().context("gateway pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    Ok(kb / 1024.0)
}

/// Installs `n` extra grants over one local-socket connection.
fn install_many(net: &DpNet, n: u32) -> anyhow::Result<()> {
    let stream = UnixStream::connect(&net.socket)?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let now = wardgate_common::unix_ms(SystemTime::now());
    let rules = net.grant(1).context("grant 1")?.grant.rules.clone();
    let mut line = String::new();
    for i in 0..n {
        let key = keys::generate_private();
        let psk = keys::encode_key(&keys::generate_private().to_bytes());
        // 100.65.0.0 upwards: clear of the test clients' addresses.
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 65, 0, 0)) + i);
        let g = GatewayGrant {
            grant_id: 1_000_000 + u64::from(i),
            client_public_key: keys::public_of(&key),
            preshared_key: Secret::new(psk),
            tunnel_addr: IpAddr::V4(addr),
            rules: rules.clone(),
            expires_at_ms: now + 3_600_000,
            label: format!("bench-peer-{i}"),
        };
        let mut req = serde_json::to_vec(&serde_json::json!({"op": "add", "grant": g}))?;
        req.push(b'\n');
        w.write_all(&req)?;
        line.clear();
        r.read_line(&mut line)?;
        if !line.contains("\"ok\"") {
            bail!("installing bench peer {i}: {line}");
        }
    }
    Ok(())
}

/// One thread, in process: encapsulate on a client engine, decapsulate on a gateway engine.
pub fn ceiling(duration: Duration) -> anyhow::Result<f64> {
    let now = Instant::now();
    let gw_key = keys::generate_private();
    let cl_key = keys::generate_private();
    let psk = PresharedKey::from_bytes(keys::generate_private().to_bytes());
    let gw_addr: SocketAddr = "192.0.2.1:51820".parse()?;
    let cl_addr: SocketAddr = "192.0.2.2:40000".parse()?;
    let mut gw = Engine::new(
        EngineConfig {
            identity: Some(gw_key.clone()),
            ..Default::default()
        },
        now,
    );
    let mut cl = Engine::new(EngineConfig::default(), now);
    gw.add_peer(
        PeerId(1),
        PeerConfig {
            local_secret: gw_key.clone(),
            remote_public: keys::PublicKey::from(&cl_key),
            preshared_key: Some(psk.clone()),
            persistent_keepalive: None,
            endpoint: None,
        },
        now,
    )?;
    cl.add_peer(
        PeerId(1),
        PeerConfig {
            local_secret: cl_key,
            remote_public: keys::PublicKey::from(&gw_key),
            preshared_key: Some(psk),
            persistent_keepalive: None,
            endpoint: Some(gw_addr),
        },
        now,
    )?;
    let mut packet = vec![0u8; 1420];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&1420u16.to_be_bytes());
    packet[8] = 64;
    packet[9] = 17;
    let mut out = vec![0u8; MAX_DATAGRAM_LEN];
    // Handshake: shuttle datagrams until the first packet arrives.
    let _ = cl.handle_ip_packet(PeerId(1), &packet, now);
    let mut delivered = false;
    for _ in 0..10 {
        let to_gw: Vec<Vec<u8>> =
            std::iter::from_fn(|| cl.poll_transmit(1).map(|t| t.contents.to_vec())).collect();
        for d in to_gw {
            if let Ok(Received::Packet { .. }) = gw.handle_datagram(cl_addr, &d, &mut out, now) {
                delivered = true;
            }
        }
        let to_cl: Vec<Vec<u8>> =
            std::iter::from_fn(|| gw.poll_transmit(1).map(|t| t.contents.to_vec())).collect();
        for d in to_cl {
            let _ = cl.handle_datagram(gw_addr, &d, &mut out, now);
        }
        if delivered {
            break;
        }
    }
    if !delivered {
        bail!("in-process handshake did not complete");
    }
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut batch: Vec<Vec<u8>> = Vec::new();
    while start.elapsed() < duration {
        for _ in 0..64 {
            let _ = cl.handle_ip_packet(PeerId(1), &packet, now);
        }
        batch.clear();
        while let Some(t) = cl.poll_transmit(1) {
            batch.push(t.contents.to_vec());
        }
        for d in &batch {
            if let Ok(Received::Packet { packet, .. }) =
                gw.handle_datagram(cl_addr, d, &mut out, now)
            {
                bytes += packet.len() as u64;
            }
        }
    }
    Ok(bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
}

/// Runs every measurement.
pub fn dataplane(opts: &Options) -> anyhow::Result<Report> {
    eprintln!("direct veth path…");
    let direct_gbps = direct(opts)?;
    eprintln!("in-process ceiling…");
    let ceiling_gbps = ceiling(Duration::from_secs(3))?;
    eprintln!("tun/tun…");
    let (tun_tun_gbps, peers_10k_gbps, rss0, rss10k) = {
        let mut net = DpNet::start(Mode::Tun, Mode::Tun)?;
        net.install_grant(1)?;
        net.start_client()?;
        let tun = through(&net, opts)?;
        let rss0 = gateway_rss_mb(&net)?;
        eprintln!("installing {} more grants…", opts.extra_peers);
        install_many(&net, opts.extra_peers)?;
        let rss10k = gateway_rss_mb(&net)?;
        eprintln!("tun/tun with {} peers…", opts.extra_peers + 1);
        let scaled = through(&net, opts)?;
        (tun, scaled, rss0, rss10k)
    };
    eprintln!("userspace/userspace…");
    let userspace_gbps = {
        let mut net = DpNet::start(Mode::Userspace, Mode::Userspace)?;
        net.install_grant(1)?;
        net.start_client()?;
        through(&net, opts)?
    };
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    Ok(Report {
        direct_gbps,
        tun_tun_gbps,
        userspace_gbps,
        ceiling_gbps,
        peers_10k_gbps,
        gateway_rss_mb_10k: rss10k,
        gateway_rss_mb_0: rss0,
        tun_vs_direct: ratio(tun_tun_gbps, direct_gbps),
        userspace_vs_tun: ratio(userspace_gbps, tun_tun_gbps),
        peers_10k_vs_tun: ratio(peers_10k_gbps, tun_tun_gbps),
        bytes_per_transfer: opts.bytes,
        runs: opts.runs,
    })
}
