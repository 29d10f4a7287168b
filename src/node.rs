//! Test-network endpoints: the small servers and clients that end-to-end tests and the
//! data-plane bench run inside network namespaces (`wardgate-bench node …`). Each one bounds
//! itself in time and bytes, and reports integrity with SHA-256, so a transfer is checked
//! end to end rather than by byte count alone.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Deterministic, incompressible test data: block `i` of 64 KiB from a counter-seeded xorshift.
pub fn fill_block(buf: &mut [u8], block: u64) {
    let mut x = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Serves a fixed HTTP/1.1 answer naming the listen address, until killed.
pub async fn http(listen: SocketAddr) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (mut s, _) = l.accept().await?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() < 65536 {
                match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let body = format!("wardgate-test-ok {listen}\n");
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// One HTTP GET; returns the body.
pub async fn http_get(to: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    tokio::time::timeout(timeout, async {
        let mut s = tokio::net::TcpStream::connect(to).await?;
        s.write_all(
            format!("GET / HTTP/1.1\r\nhost: {to}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out).into_owned();
        match text.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
            _ => bail!("unexpected HTTP answer: {text:?}"),
        }
    })
    .await
    .context("HTTP GET timed out")?
}

/// Accepts TCP connections; for each, reads to EOF and answers `LEN HEX-SHA256\n`.
pub async fn tcp_sink(listen: SocketAddr) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (mut s, _) = l.accept().await?;
        tokio::spawn(async move {
            let mut h = Sha256::new();
            let mut n = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(k) => {
                        h.update(&buf[..k]);
                        n += k as u64;
                    }
                    Err(_) => return,
                }
            }
            let line = format!("{n} {}\n", hex::encode(h.finalize()));
            let _ = s.write_all(line.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// The result of one checked transfer.
#[derive(Debug, Clone, Serialize)]
pub struct Transfer {
    /// Bytes sent.
    pub bytes: u64,
    /// Seconds from connect to the sink's answer.
    pub secs: f64,
    /// Gigabits per second.
    pub gbps: f64,
    /// The sink's SHA-256 equals ours.
    pub hash_ok: bool,
}

/// Sends `bytes` of test data to a sink and checks its hash.
pub async fn tcp_send(to: SocketAddr, bytes: u64, timeout: Duration) -> anyhow::Result<Transfer> {
    tokio::time::timeout(timeout, async {
        let start = Instant::now();
        let mut s = tokio::net::TcpStream::connect(to).await?;
        s.set_nodelay(true)?;
        let mut h = Sha256::new();
        let mut block = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        let mut i = 0u64;
        while sent < bytes {
            fill_block(&mut block, i);
            i += 1;
            let k = usize::try_from((bytes - sent).min(block.len() as u64))?;
            s.write_all(&block[..k]).await?;
            h.update(&block[..k]);
            sent += k as u64;
        }
        s.shutdown().await?;
        let mut line = String::new();
        s.read_to_string(&mut line).await?;
        let secs = start.elapsed().as_secs_f64();
        let expect = format!("{bytes} {}", hex::encode(h.finalize()));
        Ok(Transfer {
            bytes,
            secs,
            gbps: bytes as f64 * 8.0 / secs / 1e9,
            hash_ok: line.trim() == expect,
        })
    })
    .await
    .context("transfer timed out")?
}

/// Echoes UDP datagrams until killed.
pub async fn udp_echo(listen: SocketAddr) -> anyhow::Result<()> {
    let s = tokio::net::UdpSocket::bind(listen).await?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = s.recv_from(&mut buf).await?;
        let _ = s.send_to(&buf[..n], from).await;
    }
}

/// Sends `count` numbered datagrams to an echo server; returns how many came back intact.
pub async fn udp_ping(to: SocketAddr, count: u32, timeout: Duration) -> anyhow::Result<u32> {
    let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let s = tokio::net::UdpSocket::bind(bind).await?;
    s.connect(to).await?;
    let mut ok = 0;
    let mut buf = [0u8; 64];
    for i in 0..count {
        let msg = format!("wardgate-ping {i}");
        s.send(msg.as_bytes()).await?;
        if let Ok(Ok(n)) = tokio::time::timeout(timeout, s.recv(&mut buf)).await
            && &buf[..n] == msg.as_bytes()
        {
            ok += 1;
        }
    }
    Ok(ok)
}

/// Tries one TCP connection; `Ok(true)` if it was established within `timeout`.
pub async fn tcp_probe(to: SocketAddr, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect(to)).await,
        Ok(Ok(_))
    )
}

/// One HTTP GET through a SOCKS5 proxy (no authentication, CONNECT to an IP literal).
pub async fn socks_get(
    proxy: SocketAddr,
    to: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<String> {
    tokio::time::timeout(timeout, async {
        let mut s = tokio::net::TcpStream::connect(proxy).await?;
        s.write_all(&[5, 1, 0]).await?;
        let mut m = [0u8; 2];
        s.read_exact(&mut m).await?;
        if m != [5, 0] {
            bail!("proxy refused no-auth: {m:?}");
        }
        let mut req = vec![5, 1, 0];
        match to.ip() {
            std::net::IpAddr::V4(v4) => {
                req.push(1);
                req.extend_from_slice(&v4.octets());
            }
            std::net::IpAddr::V6(v6) => {
                req.push(4);
                req.extend_from_slice(&v6.octets());
            }
        }
        req.extend_from_slice(&to.port().to_be_bytes());
        s.write_all(&req).await?;
        let mut head = [0u8; 4];
        s.read_exact(&mut head).await?;
        if head[1] != 0 {
            bail!("SOCKS5 CONNECT refused with reply code {}", head[1]);
        }
        let rest = match head[3] {
            1 => 4 + 2,
            4 => 16 + 2,
            other => bail!("unexpected address type {other}"),
        };
        let mut skip = vec![0u8; rest];
        s.read_exact(&mut skip).await?;
        s.write_all(
            format!("GET / HTTP/1.1\r\nhost: {to}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out).into_owned();
        match text.split_once("\r\n\r\n") {
            Some((h, body)) if h.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
            _ => bail!("unexpected HTTP answer: {text:?}"),
        }
    })
    .await
    .context("SOCKS5 GET timed out")?
}
