//! TUN tests against the real kernel, each in its own network namespace.
//!
//! A process cannot switch namespaces without unsafe code, so each outer test (`ns_*`) makes a
//! namespace (deleted on drop, also on failure) and runs this test binary again inside it
//! (`ip netns exec NS <exe> --exact tun::tests::inner_* --nocapture`) with
//! `WARDGATE_TUN_INNER=1`. The inner test is a no-op without that variable, does the real
//! work with it, and prints a marker the outer test checks. Nothing leaves the namespaces:
//! the addresses (10.77.x.x, 192.168.77.x) exist only inside them. Every wait is bounded.
//!
//! Needs root, /dev/net/tun and `ip`/`nft` (as the gateway's and client's `tun` modes do).

mod packet;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use super::{
    PacketBatch, TunConfig, TunDevice, enable_forwarding_and_masquerade, remove_masquerade,
};
use packet::{ACK, FIN, PSH, RST, SYN, Tcp};

const INNER_ENV: &str = "WARDGATE_TUN_INNER";
const OUT_IFACE_ENV: &str = "WARDGATE_TUN_OUT_IFACE";
const MARKER: &str = "WARDGATE_TUN_INNER_OK";
/// The whole inner process, from the outside.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(120);
/// One inner test body.
const BODY_TIMEOUT: Duration = Duration::from_secs(90);
/// One expected packet or event.
const WAIT: Duration = Duration::from_secs(5);

const TUN: &str = "wgt0";
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const ROUTED: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);

// ---------------------------------------------------------------------------------------------
// The outer side: namespaces and re-execution.

fn short_id() -> String {
    let b: [u8; 3] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (install iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A network namespace, deleted on drop (with the interfaces in it).
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        let name = format!("wgtun-{}", short_id());
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes inside were waited for or killed by run_inner.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `tun::tests::<inner>` of this binary inside `ns` and asserts it passed.
fn run_inner(ns: &Netns, inner: &str, env: &[(&str, &str)]) {
    let exe = std::env::current_exe().expect("test binary path");
    let out_file = tempfile::NamedTempFile::new().expect("temp file");
    let err_file = tempfile::NamedTempFile::new().expect("temp file");
    let test_name = format!("tun::tests::{inner}");
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &ns.name])
        .arg(&exe)
        .args(["--exact", &test_name, "--nocapture", "--test-threads=1"])
        .env(INNER_ENV, "1")
        .stdin(Stdio::null())
        .stdout(out_file.reopen().expect("reopen"))
        .stderr(err_file.reopen().expect("reopen"));
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("spawn ip netns exec");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for inner test") {
            break Some(status);
        }
        if started.elapsed() > PROCESS_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(out_file.path()).unwrap_or_default();
    let stderr = std::fs::read_to_string(err_file.path()).unwrap_or_default();
    println!("--- {inner} stdout ---\n{stdout}--- {inner} stderr ---\n{stderr}");
    let status = status.unwrap_or_else(|| panic!("{inner} did not finish in {PROCESS_TIMEOUT:?}"));
    assert!(status.success(), "{inner} failed: {status}");
    assert!(
        stdout.contains(&format!("{MARKER} {inner}")),
        "{inner} did not run (no marker): is the test name right?"
    );
}

/// Runs `body` when this process is the inner one; a no-op otherwise.
fn inner<F, Fut>(name: &str, body: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if std::env::var_os(INNER_ENV).is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        timeout(BODY_TIMEOUT, body())
            .await
            .expect("inner test timed out");
    });
    println!("{MARKER} {name}");
}

// ---------------------------------------------------------------------------------------------
// Inner helpers.

async fn make_tun() -> TunDevice {
    make_tun_with(true).await
}

async fn make_tun_with(offload: bool) -> TunDevice {
    let config = TunConfig::new(TUN)
        .expect("name")
        .ipv4(LOCAL, 24)
        .expect("address")
        .offload(offload);
    let dev = TunDevice::create(&config).await.expect("create TUN");
    println!(
        "device {} mtu {} offload {} udp_offload {}",
        dev.name(),
        dev.mtu(),
        dev.offload(),
        dev.udp_offload()
    );
    assert_eq!(
        dev.offload(),
        offload,
        "offload was asked for and Linux has it"
    );
    if offload {
        let link = Command::new("ip")
            .args(["-d", "link", "show", TUN])
            .output()
            .expect("ip link show");
        let link = String::from_utf8_lossy(&link.stdout);
        assert!(link.contains("gso_max_segs 128"), "{link}");
    }
    dev
}

/// Receives batches until `want` returns true for a packet; other packets (the kernel's IPv6
/// MLD/RS after link-up, retransmits) are passed to `want` too and skipped when it says no.
async fn recv_until<F>(dev: &TunDevice, batch: &mut PacketBatch, what: &str, mut want: F)
where
    F: FnMut(&[u8]) -> bool,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let n = tokio::time::timeout_at(deadline, dev.recv_batch(batch))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("recv_batch");
        assert_eq!(n, batch.len());
        if batch.iter().any(&mut want) {
            return;
        }
    }
}

fn sysfs_counter(counter: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{TUN}/statistics/{counter}"))
        .expect("read interface counter")
        .trim()
        .parse()
        .expect("counter")
}

/// Deterministic test data.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Kernel -> TUN: UDP, routes.

#[test]
fn ns_udp_from_the_kernel_and_routes() {
    let ns = Netns::new();
    run_inner(&ns, "inner_udp_from_the_kernel_and_routes", &[]);
}

#[test]
fn inner_udp_from_the_kernel_and_routes() {
    inner("inner_udp_from_the_kernel_and_routes", || async {
        let mut dev = make_tun().await;
        let routed: IpNet = "10.77.1.0/24".parse().expect("prefix");
        dev.add_route(routed).await.expect("add route");
        // Idempotent.
        dev.add_route(routed).await.expect("add route again");
        let sock = tokio::net::UdpSocket::bind((LOCAL, 0)).await.expect("bind");
        let from = match sock.local_addr().expect("addr") {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        };

        // Batch receive: datagrams to the connected prefix and to the added route.
        let mut batch = PacketBatch::new();
        let count = 20;
        for i in 0..count {
            let dst = [PEER, ROUTED][i % 2];
            let payload = format!("datagram {i}");
            sock.send_to(payload.as_bytes(), (dst, 9999))
                .await
                .expect("send");
        }
        let mut seen = vec![false; count];
        let mut other = 0;
        let deadline = tokio::time::Instant::now() + WAIT;
        while seen.iter().any(|s| !s) {
            tokio::time::timeout_at(deadline, dev.recv_batch(&mut batch))
                .await
                .expect("timed out waiting for the datagrams")
                .expect("recv_batch");
            for p in batch.iter() {
                let Some(parsed) = packet::parse(p).expect("valid checksums") else {
                    other += 1; // IPv6 MLD/RS from link-up
                    continue;
                };
                assert_eq!(parsed.proto, 17);
                assert_eq!(parsed.src, LOCAL);
                assert_eq!(parsed.ports(), (from.port(), 9999));
                let text = std::str::from_utf8(parsed.udp_payload()).expect("utf-8");
                let i: usize = text
                    .strip_prefix("datagram ")
                    .and_then(|n| n.parse().ok())
                    .expect("our payload");
                assert_eq!(parsed.dst, [PEER, ROUTED][i % 2]);
                seen[i] = true;
            }
        }
        println!("udp: {count} datagrams read, {other} other packets (IPv6 link-up traffic)");

        // Single-packet receive.
        sock.send_to(b"single", (PEER, 9999)).await.expect("send");
        let mut buf = vec![0u8; usize::from(dev.mtu())];
        loop {
            let n = timeout(WAIT, dev.recv(&mut buf))
                .await
                .expect("timed out waiting for the single datagram")
                .expect("recv");
            if let Some(p) = packet::parse(&buf[..n]).expect("valid") {
                assert_eq!(p.udp_payload(), b"single");
                break;
            }
        }

        // Removing the route: once, then it is gone, and the destination is unreachable.
        assert!(dev.remove_route(routed).await.expect("remove route"));
        assert!(!dev.remove_route(routed).await.expect("remove route again"));
        let err = sock
            .send_to(b"x", (ROUTED, 9999))
            .await
            .expect_err("no route any more");
        println!("after route removal: {err}");

        let stats = dev.stats();
        println!("stats: {stats:?}");
        assert!(stats.packets_received > count as u64);
        assert_eq!(stats.frames_dropped, 0);
    });
}

// ---------------------------------------------------------------------------------------------
// TUN -> kernel: UDP, single and batched.

#[test]
fn ns_udp_into_the_kernel() {
    let ns = Netns::new();
    run_inner(&ns, "inner_udp_into_the_kernel", &[]);
}

#[test]
fn inner_udp_into_the_kernel() {
    inner("inner_udp_into_the_kernel", || async {
        let dev = make_tun().await;
        let sock = tokio::net::UdpSocket::bind((LOCAL, 7777))
            .await
            .expect("bind");
        let from = SocketAddrV4::new(PEER, 5555);
        let to = SocketAddrV4::new(LOCAL, 7777);

        // One packet with send().
        let p = packet::udp(from, to, 1, b"single packet");
        assert_eq!(dev.send(&p).await.expect("send"), p.len());
        let mut buf = [0u8; 2048];
        let (n, src) = timeout(WAIT, sock.recv_from(&mut buf))
            .await
            .expect("timed out waiting for the single datagram")
            .expect("recv_from");
        assert_eq!(&buf[..n], b"single packet");
        assert_eq!(src, std::net::SocketAddr::V4(from));

        // A batch of same-sized datagrams of one flow (a UDP GRO candidate on Linux 6.2+).
        let mut batch = PacketBatch::new();
        let count = 64;
        let payloads: Vec<Vec<u8>> = (0..count)
            .map(|i| {
                let mut v = pattern(1000, i as u32);
                v[..4].copy_from_slice(&(i as u32).to_be_bytes());
                v
            })
            .collect();
        for (i, payload) in payloads.iter().enumerate() {
            batch
                .push(&packet::udp(from, to, 100 + i as u16, payload))
                .expect("push");
        }
        let rx_before = sysfs_counter("rx_packets");
        assert_eq!(dev.send_batch(&mut batch).await.expect("send_batch"), count);
        assert!(batch.is_empty());
        let writes = sysfs_counter("rx_packets") - rx_before;
        for (i, payload) in payloads.iter().enumerate() {
            let (n, _) = timeout(WAIT, sock.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for datagram {i}"))
                .expect("recv_from");
            assert_eq!(&buf[..n], &payload[..], "datagram {i}");
        }
        println!(
            "udp send_batch: {count} datagrams in {writes} device writes (udp_offload {})",
            dev.udp_offload()
        );
        assert!(writes <= count as u64);

        // What a TUN cannot carry is refused before the kernel sees it.
        assert!(dev.send(&[0u8; 40]).await.is_err());
        assert!(batch.push(&[0x20; 40]).is_err());
    });
}

// ---------------------------------------------------------------------------------------------
// TCP: the SYN from a local connect; a bulk transfer each way through crafted segments.

#[test]
fn ns_tcp_syn_from_the_kernel() {
    let ns = Netns::new();
    run_inner(&ns, "inner_tcp_syn_from_the_kernel", &[]);
}

#[test]
fn inner_tcp_syn_from_the_kernel() {
    inner("inner_tcp_syn_from_the_kernel", || async {
        let dev = make_tun().await;
        let connect = tokio::spawn(tokio::net::TcpStream::connect((PEER, 80)));
        let mut batch = PacketBatch::new();
        recv_until(&dev, &mut batch, "the SYN", |p| {
            let Some(parsed) = packet::parse(p).expect("valid checksums") else {
                return false;
            };
            if parsed.proto != 6 || parsed.ports().1 != 80 {
                return false;
            }
            let t = parsed.tcp();
            assert_eq!(parsed.src, LOCAL);
            assert_eq!(parsed.dst, PEER);
            assert_eq!(t.flags & (SYN | ACK), SYN);
            let mss = t.option(2).expect("MSS option");
            let mss = u16::from_be_bytes([mss[0], mss[1]]);
            assert_eq!(usize::from(mss), usize::from(dev.mtu()) - 40);
            println!("SYN seen: mss {mss}, window {}", t.window);
            true
        })
        .await;
        connect.abort();
    });
}

#[test]
fn ns_tcp_bulk_from_the_kernel_is_split() {
    let ns = Netns::new();
    run_inner(&ns, "inner_tcp_bulk_from_the_kernel_is_split", &[]);
}

/// With offload: the kernel's TSO super-packets come out of `recv_batch` split.
#[test]
fn inner_tcp_bulk_from_the_kernel_is_split() {
    inner("inner_tcp_bulk_from_the_kernel_is_split", || async {
        let mut dev = make_tun_with(true).await;
        let stats = bulk_from_the_kernel(&mut dev, 32 << 20, Read::Batch).await;
        assert!(
            stats.packets_received > 2 * stats.frames_received,
            "few frames held more than one packet: GSO splitting did not happen"
        );
    });
}

#[test]
fn ns_tcp_bulk_from_the_kernel_single_recv() {
    let ns = Netns::new();
    run_inner(&ns, "inner_tcp_bulk_from_the_kernel_single_recv", &[]);
}

/// With offload, through the single-packet `recv`: split frames are handed out one by one.
#[test]
fn inner_tcp_bulk_from_the_kernel_single_recv() {
    inner("inner_tcp_bulk_from_the_kernel_single_recv", || async {
        let mut dev = make_tun_with(true).await;
        let stats = bulk_from_the_kernel(&mut dev, 4 << 20, Read::Single).await;
        assert!(stats.packets_received > 2 * stats.frames_received);
    });
}

#[test]
fn ns_tcp_bulk_from_the_kernel_without_offload() {
    let ns = Netns::new();
    run_inner(&ns, "inner_tcp_bulk_from_the_kernel_without_offload", &[]);
}

/// Without offload the same calls work, one packet per frame.
#[test]
fn inner_tcp_bulk_from_the_kernel_without_offload() {
    inner("inner_tcp_bulk_from_the_kernel_without_offload", || async {
        let mut dev = make_tun_with(false).await;
        let stats = bulk_from_the_kernel(&mut dev, 8 << 20, Read::Batch).await;
        assert_eq!(stats.packets_received, stats.frames_received);
    });
}

/// How the bulk receiver reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    Batch,
    Single,
}

/// Reads the next packets into `batch`, with `recv_batch` or one `recv`.
async fn read_packets(dev: &mut TunDevice, batch: &mut PacketBatch, how: Read, buf: &mut [u8]) {
    match how {
        Read::Batch => {
            dev.recv_batch(batch).await.expect("recv_batch");
        }
        Read::Single => {
            let n = dev.recv(buf).await.expect("recv");
            batch.clear();
            batch.push(&buf[..n]).expect("an IP packet");
        }
    }
}

/// A local TCP client sends `total` bytes to a "peer" that this function plays through the
/// TUN (SYN-ACK, cumulative ACKs, in-order data only). Every packet must be within the MTU
/// with valid checksums, and the stream must arrive intact. Returns the device's counters.
async fn bulk_from_the_kernel(dev: &mut TunDevice, total: usize, how: Read) -> super::TunStats {
    let mtu = usize::from(dev.mtu());
    let data = pattern(total, 7);
    let to_send = data.clone();
    let client = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect((PEER, 80)).await?;
        s.write_all(&to_send).await?;
        s.shutdown().await?;
        // Wait for the peer's FIN, so ours was acknowledged before the socket goes.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        std::io::Result::Ok(())
    });

    let me = SocketAddrV4::new(PEER, 80);
    let mut batch = PacketBatch::new();
    let mut acks = PacketBatch::new();
    let mut buf = vec![0u8; mtu];
    let my_isn = 1_000_000u32;
    let mut client_addr = None;
    let mut expected = 0u32;
    let mut received = Vec::with_capacity(total);
    let mut fin = false;
    let mut segments = 0u64;
    let mut biggest = 0usize;
    let mut ip_id = 0u16;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !fin {
        tokio::time::timeout_at(deadline, read_packets(dev, &mut batch, how, &mut buf))
            .await
            .expect("timed out in the bulk transfer");
        let mut reply = None;
        for p in batch.iter() {
            let Some(parsed) = packet::parse(p).expect("valid checksums") else {
                continue;
            };
            if parsed.proto != 6 || parsed.ports().1 != 80 {
                continue;
            }
            biggest = biggest.max(p.len());
            let t = parsed.tcp();
            let from = SocketAddrV4::new(parsed.src, parsed.ports().0);
            if t.flags & SYN != 0 {
                client_addr = Some(from);
                expected = t.seq.wrapping_add(1);
                // SYN-ACK: MSS for our MTU, window scale 7 (a window of 8 MiB).
                let mss = ((mtu - 40) as u16).to_be_bytes();
                let options = [2, 4, mss[0], mss[1], 1, 3, 3, 7];
                ip_id = ip_id.wrapping_add(1);
                dev.send(&packet::tcp(&Tcp {
                    src: me,
                    dst: from,
                    seq: my_isn,
                    ack: expected,
                    flags: SYN | ACK,
                    window: u16::MAX,
                    options: &options,
                    payload: &[],
                    ip_id,
                }))
                .await
                .expect("send SYN-ACK");
                continue;
            }
            if Some(from) != client_addr {
                continue;
            }
            if !t.payload.is_empty() {
                segments += 1;
                if t.seq == expected {
                    received.extend_from_slice(t.payload);
                    expected = expected.wrapping_add(t.payload.len() as u32);
                }
            }
            if t.flags & FIN != 0 && t.seq.wrapping_add(t.payload.len() as u32) == expected {
                expected = expected.wrapping_add(1);
                fin = true;
            }
            reply = Some(from);
        }
        // One cumulative ACK per read (and our FIN once theirs is in).
        if let Some(to) = reply {
            ip_id = ip_id.wrapping_add(1);
            acks.push(&packet::tcp(&Tcp {
                src: me,
                dst: to,
                seq: my_isn.wrapping_add(1),
                ack: expected,
                flags: ACK | if fin { FIN } else { 0 },
                window: u16::MAX,
                options: &[],
                payload: &[],
                ip_id,
            }))
            .expect("push ACK");
            send_all(dev, &mut acks).await;
        }
    }
    let elapsed = started.elapsed();
    timeout(WAIT, client)
        .await
        .expect("client did not finish")
        .expect("client task")
        .expect("client I/O");
    assert_eq!(received.len(), total, "stream length");
    assert!(received == data, "stream contents differ");
    assert!(
        biggest <= mtu,
        "a packet of {biggest} bytes exceeds the MTU"
    );
    let stats = dev.stats();
    println!(
        "kernel->tun ({how:?}, offload {}): {} MiB in {:.3} s = {:.2} Gbit/s, {segments} data \
         segments = {:.0} packets/s; {} frames -> {} packets ({:.1} packets per read)",
        dev.offload(),
        total >> 20,
        elapsed.as_secs_f64(),
        total as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
        segments as f64 / elapsed.as_secs_f64(),
        stats.frames_received,
        stats.packets_received,
        stats.packets_received as f64 / stats.frames_received.max(1) as f64,
    );
    assert_eq!(stats.frames_dropped, 0);
    stats
}

#[test]
fn ns_tcp_bulk_into_the_kernel_is_coalesced() {
    let ns = Netns::new();
    run_inner(&ns, "inner_tcp_bulk_into_the_kernel_is_coalesced", &[]);
}

/// With offload: `send_batch` coalesces a flow's segments into fewer device writes.
#[test]
fn inner_tcp_bulk_into_the_kernel_is_coalesced() {
    inner("inner_tcp_bulk_into_the_kernel_is_coalesced", || async {
        let dev = make_tun_with(true).await;
        let (segments, writes) = bulk_into_the_kernel(&dev, 16 << 20).await;
        assert!(
            2 * writes < segments,
            "{segments} segments took {writes} writes: send_batch did not coalesce"
        );
    });
}

#[test]
fn ns_tcp_bulk_into_the_kernel_without_offload() {
    let ns = Netns::new();
    run_inner(&ns, "inner_tcp_bulk_into_the_kernel_without_offload", &[]);
}

/// Without offload `send_batch` writes each packet.
#[test]
fn inner_tcp_bulk_into_the_kernel_without_offload() {
    inner("inner_tcp_bulk_into_the_kernel_without_offload", || async {
        let dev = make_tun_with(false).await;
        let (segments, writes) = bulk_into_the_kernel(&dev, 8 << 20).await;
        assert!(writes >= segments);
    });
}

/// This function plays a TCP client through the TUN towards a local listener, sending
/// `total` bytes in batches within the advertised window; the listener must get them intact.
/// Returns the data segments sent and the device writes they took (the interface's
/// `rx_packets` counts one per write).
async fn bulk_into_the_kernel(dev: &TunDevice, total: usize) -> (u64, u64) {
    let mss = usize::from(dev.mtu()) - 40;
    let listener = tokio::net::TcpListener::bind((LOCAL, 8080))
        .await
        .expect("listen");
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut all = Vec::new();
        s.read_to_end(&mut all).await?;
        std::io::Result::Ok(all)
    });
    let me = SocketAddrV4::new(PEER, 40000);
    let server_addr = SocketAddrV4::new(LOCAL, 8080);
    let data = pattern(total, 11);
    let isn = 5_000u32;
    let mut ip_id = 0u16;
    let mut next_id = || {
        ip_id = ip_id.wrapping_add(1);
        ip_id
    };

    // Handshake.
    let mss_bytes = (mss as u16).to_be_bytes();
    dev.send(&packet::tcp(&Tcp {
        src: me,
        dst: server_addr,
        seq: isn,
        ack: 0,
        flags: SYN,
        window: u16::MAX,
        options: &[2, 4, mss_bytes[0], mss_bytes[1], 1, 3, 3, 7],
        payload: &[],
        ip_id: next_id(),
    }))
    .await
    .expect("send SYN");
    let mut batch = PacketBatch::new();
    let mut server_isn = 0;
    let mut window_scale = 0u32;
    let mut window = 0u64;
    recv_until(dev, &mut batch, "the SYN-ACK", |p| {
        let Some(parsed) = packet::parse(p).expect("valid checksums") else {
            return false;
        };
        if parsed.proto != 6 || parsed.ports() != (8080, 40000) {
            return false;
        }
        let t = parsed.tcp();
        assert_eq!(t.flags & (SYN | ACK), SYN | ACK, "SYN-ACK expected");
        assert_eq!(t.ack, isn.wrapping_add(1));
        server_isn = t.seq;
        window_scale = t.option(3).map_or(0, |v| u32::from(v[0]));
        window = u64::from(t.window);
        true
    })
    .await;
    let ack_no = server_isn.wrapping_add(1);
    let segment = |seq: u32, flags: u8, payload: &[u8], ip_id: u16| {
        packet::tcp(&Tcp {
            src: me,
            dst: server_addr,
            seq,
            ack: ack_no,
            flags,
            window: u16::MAX,
            options: &[],
            payload,
            ip_id,
        })
    };
    dev.send(&segment(isn.wrapping_add(1), ACK, &[], next_id()))
        .await
        .expect("send ACK");

    // Data, in rounds of up to one batch within the advertised window (go-back-N on a
    // stall, which a lossless local path should not see).
    let base = isn.wrapping_add(1);
    let mut flow = Flow {
        base,
        acked: 0,
        sent: 0,
        window,
        window_scale,
    };
    let mut segments = 0u64;
    let mut retransmits = 0u64;
    let rx_before = sysfs_counter("rx_packets");
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while flow.acked < total {
        assert!(
            Instant::now() < deadline,
            "bulk transfer timed out at {} bytes",
            flow.acked
        );
        let round_start = flow.sent;
        let limit = (flow.acked + flow.window as usize).min(total);
        while flow.sent < limit && batch.len() < batch.capacity() {
            let end = (flow.sent + mss).min(limit);
            if end - flow.sent < mss && end < total {
                break; // no runt segments in the middle of the stream
            }
            let seq = base.wrapping_add(flow.sent as u32);
            let flags = if end == total { ACK | PSH } else { ACK };
            batch
                .push(&segment(seq, flags, &data[flow.sent..end], next_id()))
                .expect("push segment");
            flow.sent = end;
            segments += 1;
        }
        if flow.sent == round_start {
            // The window is closed: wait for an update.
            if let Ok(received) =
                timeout(Duration::from_millis(200), dev.recv_batch(&mut batch)).await
            {
                received.expect("recv_batch");
                flow.absorb(&batch);
            }
            batch.clear();
            continue;
        }
        send_all(dev, &mut batch).await;
        // Wait for the acknowledgement of everything sent.
        let mut progress = false;
        let wait_until = tokio::time::Instant::now() + Duration::from_millis(500);
        while flow.acked < flow.sent {
            let Ok(received) =
                tokio::time::timeout_at(wait_until, dev.recv_batch(&mut batch)).await
            else {
                break;
            };
            received.expect("recv_batch");
            progress |= flow.absorb(&batch);
            batch.clear();
        }
        if flow.acked < flow.sent && !progress {
            retransmits += 1;
            flow.sent = flow.acked;
        }
    }
    let elapsed = started.elapsed();
    let writes = sysfs_counter("rx_packets") - rx_before;
    dev.send(&segment(
        base.wrapping_add(total as u32),
        FIN | ACK,
        &[],
        next_id(),
    ))
    .await
    .expect("send FIN");
    let got = timeout(WAIT, server)
        .await
        .expect("server did not finish")
        .expect("server task")
        .expect("server I/O");
    assert_eq!(got.len(), total, "stream length");
    assert!(got == data, "stream contents differ");
    println!(
        "tun->kernel (offload {}): {} MiB in {:.3} s = {:.2} Gbit/s, {segments} data segments = {:.0} packets/s \
         in {writes} device writes ({:.1} segments per write), {retransmits} go-back-N rounds",
        dev.offload(),
        total >> 20,
        elapsed.as_secs_f64(),
        total as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
        segments as f64 / elapsed.as_secs_f64(),
        segments as f64 / writes.max(1) as f64,
    );
    (segments, writes)
}

/// Sends a whole batch, which leaves it empty.
async fn send_all(dev: &TunDevice, batch: &mut PacketBatch) {
    let n = batch.len();
    assert_eq!(dev.send_batch(batch).await.expect("send_batch"), n);
    assert!(batch.is_empty());
}

/// The sending side of the crafted TCP connection: what was sent and acknowledged.
struct Flow {
    base: u32,
    acked: usize,
    sent: usize,
    window: u64,
    window_scale: u32,
}

impl Flow {
    /// Takes acknowledgements and window updates from the server; true if new data was acked.
    fn absorb(&mut self, batch: &PacketBatch) -> bool {
        let mut progress = false;
        for p in batch.iter() {
            let Some(parsed) = packet::parse(p).expect("valid checksums") else {
                continue;
            };
            if parsed.proto != 6 || parsed.ports() != (8080, 40000) {
                continue;
            }
            let t = parsed.tcp();
            assert_eq!(t.flags & RST, 0, "the kernel reset the connection");
            let acked = t.ack.wrapping_sub(self.base) as usize;
            if acked > self.acked && acked <= self.sent {
                self.acked = acked;
                progress = true;
            }
            self.window = u64::from(t.window) << self.window_scale;
        }
        progress
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway: forwarding and masquerade towards a resource namespace.

#[test]
fn ns_gateway_forwarding_and_masquerade() {
    let gateway = Netns::new();
    let resource = Netns::new();
    let id = short_id();
    let (gw_if, res_if) = (format!("wgv{id}a"), format!("wgv{id}b"));
    ip(&[
        "link",
        "add",
        &gw_if,
        "netns",
        &gateway.name,
        "type",
        "veth",
        "peer",
        "name",
        &res_if,
        "netns",
        &resource.name,
    ]);
    ip(&[
        "-n",
        &gateway.name,
        "addr",
        "add",
        "192.168.77.1/24",
        "dev",
        &gw_if,
    ]);
    ip(&["-n", &gateway.name, "link", "set", &gw_if, "up"]);
    ip(&[
        "-n",
        &resource.name,
        "addr",
        "add",
        "192.168.77.2/24",
        "dev",
        &res_if,
    ]);
    ip(&["-n", &resource.name, "link", "set", &res_if, "up"]);
    run_inner(
        &gateway,
        "inner_gateway_forwarding_and_masquerade",
        &[(OUT_IFACE_ENV, &gw_if)],
    );
}

/// An ICMP echo from a client tunnel address (written into the TUN) reaches a resource that
/// has no route back to the tunnel; the reply comes back through the TUN only because the
/// source was masqueraded. After removal, a new flow gets no reply.
#[test]
fn inner_gateway_forwarding_and_masquerade() {
    inner("inner_gateway_forwarding_and_masquerade", || async {
        let out_iface = std::env::var(OUT_IFACE_ENV).expect("outer test sets the interface");
        let dev = make_tun().await;
        enable_forwarding_and_masquerade(TUN, Some(&out_iface))
            .await
            .expect("enable");
        // Idempotent: a second call replaces, it does not add.
        enable_forwarding_and_masquerade(TUN, Some(&out_iface))
            .await
            .expect("enable again");
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .expect("read ip_forward")
                .trim(),
            "1"
        );
        let rules = Command::new("nft")
            .args(["list", "table", "inet", "wardgate"])
            .output()
            .expect("nft list");
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert_eq!(rules.matches("masquerade").count(), 1, "{rules}");

        let resource = Ipv4Addr::new(192, 168, 77, 2);
        let mut batch = PacketBatch::new();
        dev.send(&packet::icmp_echo(
            PEER,
            resource,
            0x4242,
            1,
            b"through the gateway",
        ))
        .await
        .expect("send echo");
        recv_until(&dev, &mut batch, "the echo reply", |p| {
            let Some(parsed) = packet::parse(p).expect("valid checksums") else {
                return false;
            };
            if parsed.proto != 1 || parsed.l4[0] != 0 {
                return false;
            }
            assert_eq!(parsed.src, resource);
            assert_eq!(parsed.dst, PEER, "the reply is translated back");
            assert_eq!(&parsed.l4[8..], b"through the gateway");
            true
        })
        .await;
        println!("echo reply came back through the masquerade");

        remove_masquerade().await.expect("remove");
        remove_masquerade().await.expect("remove again");
        let tables = Command::new("nft")
            .args(["list", "tables"])
            .output()
            .expect("nft list");
        assert!(!String::from_utf8_lossy(&tables.stdout).contains("wardgate"));

        // A new flow (another echo id, so no existing conntrack entry) is not masqueraded, and
        // the resource cannot answer a tunnel address.
        dev.send(&packet::icmp_echo(
            PEER,
            resource,
            0x4343,
            1,
            b"no masquerade",
        ))
        .await
        .expect("send echo");
        let quiet_until = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(received) =
            tokio::time::timeout_at(quiet_until, dev.recv_batch(&mut batch)).await
        {
            received.expect("recv_batch");
            for p in batch.iter() {
                if let Some(parsed) = packet::parse(p).expect("valid checksums") {
                    assert!(
                        !(parsed.proto == 1 && parsed.l4[0] == 0),
                        "an echo reply came back without the masquerade"
                    );
                }
            }
        }
        drop(dev);
    });
}

#[test]
fn types_cross_tasks() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    // A device is shared by a receive task and a send task; batches move between tasks.
    send_sync::<TunDevice>();
    send::<PacketBatch>();
}
