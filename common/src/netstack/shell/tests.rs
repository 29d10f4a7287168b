//! Both shells on loopback, their tunnels wired by channels: local client → forward or SOCKS5
//! → client stack → (IP packets in memory) → gateway stack → dialer → a real TCP/UDP server on
//! 127.0.0.1. Tunnel addresses (100.64.x, 10.10.x) exist only inside the packets; the dialer
//! maps them to loopback and refuses everything else, so no traffic leaves the host.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::*;
use crate::netstack::Config;

const RESOURCE: &str = "10.10.1.10:443";
const UNREACHABLE: &str = "10.10.1.10:444";
const DNS: &str = "10.10.1.53:53";
/// Every test finishes well within this, or fails.
const TEST_TIMEOUT: Duration = Duration::from_secs(180);

/// Maps tunnel destinations to loopback services; anything else is refused on the spot.
struct MapDialer {
    tcp: BTreeMap<SocketAddr, SocketAddr>,
    udp: BTreeMap<SocketAddr, SocketAddr>,
}

impl Dialer for MapDialer {
    fn dial_tcp(&self, dst: SocketAddr) -> impl Future<Output = io::Result<TcpStream>> + Send {
        let target = self.tcp.get(&dst).copied();
        async move {
            match target {
                Some(t) if t.ip().is_loopback() => TcpStream::connect(t).await,
                _ => Err(io::ErrorKind::ConnectionRefused.into()),
            }
        }
    }

    fn dial_udp(&self, dst: SocketAddr) -> impl Future<Output = io::Result<UdpSocket>> + Send {
        let target = self.udp.get(&dst).copied();
        async move {
            match target {
                Some(t) if t.ip().is_loopback() => {
                    let s = UdpSocket::bind("127.0.0.1:0").await?;
                    s.connect(t).await?;
                    Ok(s)
                }
                _ => Err(io::ErrorKind::ConnectionRefused.into()),
            }
        }
    }
}

/// Deterministic stream of bytes: chunk `i` of a transfer seeded `seed`.
fn chunk(seed: u64, i: u64, out: &mut [u8]) {
    let mut x = (seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    for word in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
}

const CHUNK: usize = 64 * 1024;

fn expected_digest(seed: u64, len: usize) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0;
    let mut i = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        chunk(seed, i, &mut buf[..n]);
        h.update(&buf[..n]);
        done += n;
        i += 1;
    }
    h.finalize().into()
}

/// The "resource": `GET` gets a small HTTP response, `DOWNLOAD n` gets n pattern bytes,
/// `UPLOAD n` then n bytes gets the hex SHA-256 of those bytes.
async fn serve_resource(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut stream = BufReader::new(stream);
            let mut line = String::new();
            if stream.read_line(&mut line).await.is_err() {
                return;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["GET", ..] => {
                    // Skip headers.
                    loop {
                        let mut h = String::new();
                        if stream.read_line(&mut h).await.unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    let body = "hello from the EHR";
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(resp.as_bytes()).await;
                }
                ["DOWNLOAD", n] => {
                    let len: usize = n.parse().unwrap();
                    let mut buf = vec![0u8; CHUNK];
                    let (mut done, mut i) = (0, 0);
                    while done < len {
                        let k = CHUNK.min(len - done);
                        chunk(42, i, &mut buf[..k]);
                        if stream.write_all(&buf[..k]).await.is_err() {
                            return;
                        }
                        done += k;
                        i += 1;
                    }
                }
                ["UPLOAD", n] => {
                    let len: usize = n.parse().unwrap();
                    let mut h = Sha256::new();
                    let mut buf = vec![0u8; CHUNK];
                    let mut done = 0;
                    while done < len {
                        let k = stream.read(&mut buf).await.unwrap_or(0);
                        if k == 0 {
                            break;
                        }
                        h.update(&buf[..k]);
                        done += k;
                    }
                    let hex = hex::encode(h.finalize());
                    let _ = stream.write_all(format!("{hex} {done}\n").as_bytes()).await;
                }
                _ => {}
            }
            let _ = stream.shutdown().await;
        });
    }
}

async fn serve_udp_echo(socket: UdpSocket) {
    let mut buf = vec![0u8; 2048];
    while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
        let mut reply = b"echo:".to_vec();
        reply.extend_from_slice(&buf[..n]);
        let _ = socket.send_to(&reply, peer).await;
    }
}

struct Harness {
    forward: SocketAddr,
    unreachable_forward: SocketAddr,
    udp_forward: SocketAddr,
    socks: SocketAddr,
    stop: Vec<oneshot::Sender<()>>,
    shells: Vec<tokio::task::JoinHandle<()>>,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// `tune` adjusts both stacks' configurations.
    async fn start_with(tune: impl Fn(&mut Config)) -> Self {
        let resource = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let resource_addr = resource.local_addr().unwrap();
        tokio::spawn(serve_resource(resource));
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(serve_udp_echo(echo));

        let now = now();
        let mut client_config = Config::client(vec!["100.64.0.2/32".parse().unwrap()]);
        let mut gateway_config = Config::gateway(vec!["100.64.0.1/32".parse().unwrap()]);
        tune(&mut client_config);
        tune(&mut gateway_config);
        let client_stack = Netstack::new(client_config, 7, now).unwrap();
        let gateway_stack = Netstack::new(gateway_config, 8, now).unwrap();
        let (c2g_tx, c2g_rx) = mpsc::channel(1024);
        let (g2c_tx, g2c_rx) = mpsc::channel(1024);

        let mut client = ClientShell::new(client_stack);
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let forward = client
            .add_tcp_forward(loopback, RESOURCE.parse().unwrap())
            .await
            .unwrap();
        let unreachable_forward = client
            .add_tcp_forward(loopback, UNREACHABLE.parse().unwrap())
            .await
            .unwrap();
        let udp_forward = client
            .add_udp_forward(loopback, DNS.parse().unwrap())
            .await
            .unwrap();
        let allowed: [SocketAddr; 2] = [RESOURCE.parse().unwrap(), UNREACHABLE.parse().unwrap()];
        let socks = client
            .add_socks5(loopback, Arc::new(move |dst| allowed.contains(&dst)))
            .await
            .unwrap();
        let dialer = MapDialer {
            tcp: [(RESOURCE.parse().unwrap(), resource_addr)].into(),
            udp: [(DNS.parse().unwrap(), echo_addr)].into(),
        };
        let gateway = GatewayShell::new(gateway_stack, dialer, GatewayShellConfig::default());

        let (stop_c, stop_c_rx) = oneshot::channel::<()>();
        let (stop_g, stop_g_rx) = oneshot::channel::<()>();
        let client_task = tokio::spawn(client.run(
            TunnelIo {
                from_tunnel: g2c_rx,
                to_tunnel: c2g_tx,
            },
            async move {
                let _ = stop_c_rx.await;
            },
        ));
        let gateway_task = tokio::spawn(gateway.run(
            TunnelIo {
                from_tunnel: c2g_rx,
                to_tunnel: g2c_tx,
            },
            async move {
                let _ = stop_g_rx.await;
            },
        ));
        Self {
            forward,
            unreachable_forward,
            udp_forward,
            socks,
            stop: vec![stop_c, stop_g],
            shells: vec![client_task, gateway_task],
        }
    }

    async fn stop(self) {
        for s in self.stop {
            let _ = s.send(());
        }
        for t in self.shells {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("shell stops on shutdown")
                .unwrap();
        }
    }
}

/// Downloads `len` pattern bytes through `forward`; returns the time taken.
async fn download(forward: SocketAddr, len: usize) -> Duration {
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect(forward).await.unwrap();
    s.write_all(format!("DOWNLOAD {len}\n").as_bytes())
        .await
        .unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        got += n;
    }
    let elapsed = started.elapsed();
    assert_eq!(got, len);
    assert_eq!(
        <[u8; 32]>::from(hasher.finalize()),
        expected_digest(42, len)
    );
    elapsed
}

async fn http_get(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: ehr\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).await.unwrap();
    resp
}

async fn socks_connect(proxy: SocketAddr, request: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut method = [0u8; 2];
    s.read_exact(&mut method).await.unwrap();
    assert_eq!(method, [5, 0]);
    s.write_all(request).await.unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.unwrap();
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        other => panic!("reply address type {other}"),
    };
    let mut tail = vec![0u8; rest];
    s.read_exact(&mut tail).await.unwrap();
    let mut reply = head.to_vec();
    reply.extend_from_slice(&tail);
    (s, reply)
}

fn connect_request(dst: SocketAddr) -> Vec<u8> {
    let mut r = vec![5, 1, 0];
    match dst.ip() {
        IpAddr::V4(a) => {
            r.push(1);
            r.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            r.push(4);
            r.extend_from_slice(&a.octets());
        }
    }
    r.extend_from_slice(&dst.port().to_be_bytes());
    r
}

use std::net::IpAddr;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_carries_http_and_64_mib() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let h = Harness::start().await;

        let mut s = TcpStream::connect(h.forward).await.unwrap();
        let resp = http_get(&mut s).await;
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(resp.ends_with("hello from the EHR"), "{resp}");

        // 64 MiB from the resource, checked by SHA-256.
        const LEN: usize = 64 * 1024 * 1024;
        let elapsed = download(h.forward, LEN).await;
        eprintln!(
            "64 MiB through forward -> client stack -> gateway stack -> resource: {elapsed:?} \
             ({:.0} Mbit/s)",
            LEN as f64 * 8.0 / elapsed.as_secs_f64() / 1e6
        );

        // 16 MiB to the resource, which answers with the hash of what it got.
        const UP: usize = 16 * 1024 * 1024;
        let mut s = TcpStream::connect(h.forward).await.unwrap();
        s.write_all(format!("UPLOAD {UP}\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; CHUNK];
        let (mut done, mut i) = (0, 0);
        while done < UP {
            let k = CHUNK.min(UP - done);
            chunk(99, i, &mut buf[..k]);
            s.write_all(&buf[..k]).await.unwrap();
            done += k;
            i += 1;
        }
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert_eq!(
            answer,
            format!("{} {UP}\n", hex::encode(expected_digest(99, UP)))
        );
        h.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_connects_allowed_and_refuses_the_rest() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let h = Harness::start().await;

        let (mut s, reply) =
            socks_connect(h.socks, &connect_request(RESOURCE.parse().unwrap())).await;
        assert_eq!(reply[1], 0x00, "succeeded: {reply:?}");
        // The bound address is the tunnel endpoint.
        assert_eq!(&reply[3..8], &[1, 100, 64, 0, 2]);
        let resp = http_get(&mut s).await;
        assert!(resp.ends_with("hello from the EHR"), "{resp}");

        // Outside the allow predicate: "connection not allowed by ruleset".
        let (_, reply) =
            socks_connect(h.socks, &connect_request("10.10.1.11:22".parse().unwrap())).await;
        assert_eq!(reply[1], 0x02);
        // Allowed, but the gateway cannot reach it: "connection refused".
        let (_, reply) =
            socks_connect(h.socks, &connect_request(UNREACHABLE.parse().unwrap())).await;
        assert_eq!(reply[1], 0x05);
        // Domain names: "address type not supported".
        let mut req = vec![5, 1, 0, 3, 3];
        req.extend_from_slice(b"ehr");
        req.extend_from_slice(&443u16.to_be_bytes());
        let (_, reply) = socks_connect(h.socks, &req).await;
        assert_eq!(reply[1], 0x08);
        // UDP ASSOCIATE: "command not supported".
        let mut req = connect_request(RESOURCE.parse().unwrap());
        req[1] = 3;
        let (_, reply) = socks_connect(h.socks, &req).await;
        assert_eq!(reply[1], 0x07);
        // No acceptable method.
        let mut s = TcpStream::connect(h.socks).await.unwrap();
        s.write_all(&[5, 1, 2]).await.unwrap();
        let mut m = [0u8; 2];
        s.read_exact(&mut m).await.unwrap();
        assert_eq!(m, [5, 0xff]);
        h.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_resource_resets_the_local_connection() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let h = Harness::start().await;
        let attempt = async {
            let mut s = TcpStream::connect(h.unreachable_forward).await?;
            let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
            let mut buf = [0u8; 16];
            s.read(&mut buf).await
        };
        // Reset (or at least EOF) with no data, promptly; the reset may even beat the
        // completion of connect().
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(0)) => {}
            Ok(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("expected a reset, got {other:?}"),
        }
        // The working forward is unaffected.
        let mut s = TcpStream::connect(h.forward).await.unwrap();
        assert!(http_get(&mut s).await.ends_with("hello from the EHR"));
        h.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_forward_round_trips() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let h = Harness::start().await;
        let local = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 64];
        // The first datagram may race the gateway's dial; retry a few times.
        let mut answer = None;
        for i in 0..20 {
            local
                .send_to(format!("q{i}").as_bytes(), h.udp_forward)
                .await
                .unwrap();
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_millis(500), local.recv_from(&mut buf)).await
            {
                answer = Some(buf[..n].to_vec());
                break;
            }
        }
        let answer = answer.expect("an echo came back");
        assert!(answer.starts_with(b"echo:q"), "{answer:?}");
        h.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn listeners_must_be_loopback() {
    let stack = Netstack::new(
        Config::client(vec!["100.64.0.2/32".parse().unwrap()]),
        0,
        now(),
    )
    .unwrap();
    let mut client = ClientShell::new(stack);
    let open: SocketAddr = "0.0.0.0:0".parse().unwrap();
    assert!(matches!(
        client
            .add_tcp_forward(open, RESOURCE.parse().unwrap())
            .await,
        Err(ShellError::NotLoopback(_))
    ));
    assert!(matches!(
        client.add_socks5(open, Arc::new(|_| true)).await,
        Err(ShellError::NotLoopback(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_stack_buffers_do_not_stall_the_relay() {
    // Buffers far larger than what one relay wake-up moves: the relay must come back for the
    // rest by itself, since no new event announces data that was already announced.
    tokio::time::timeout(TEST_TIMEOUT, async {
        let h = Harness::start_with(|c| {
            c.tcp_rx_buffer = 4 * 1024 * 1024;
            c.tcp_tx_buffer = 4 * 1024 * 1024;
        })
        .await;
        download(h.forward, 32 * 1024 * 1024).await;
        h.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_connections() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let h = Harness::start().await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..100 {
            let (forward, socks) = (h.forward, h.socks);
            tasks.spawn(async move {
                if i % 2 == 0 {
                    let mut s = TcpStream::connect(forward).await.unwrap();
                    http_get(&mut s).await
                } else {
                    let request = connect_request(RESOURCE.parse().unwrap());
                    let (mut s, reply) = socks_connect(socks, &request).await;
                    assert_eq!(reply[1], 0);
                    http_get(&mut s).await
                }
            });
        }
        let mut ok = 0;
        while let Some(resp) = tasks.join_next().await {
            assert!(resp.unwrap().ends_with("hello from the EHR"));
            ok += 1;
        }
        assert_eq!(ok, 100);
        h.stop().await;
    })
    .await
    .expect("test timed out");
}
