//! The thin IO shell's UDP socket: datagrams in and out with as few system calls as the OS
//! allows, through `quinn-udp`.
//!
//! On Linux a receive is one `recvmmsg` into up to [`quinn_udp::BATCH_SIZE`] slots, and with
//! UDP GRO each slot may hold many datagrams from one sender coalesced by the kernel (split them
//! with [`RecvBatch::datagrams`]). A send of a [`Transmit`] with `segment_size` is one `sendmsg`
//! with UDP GSO: the kernel cuts it into datagrams. On this kind of machine system calls, not
//! crypto, limit a userspace tunnel, so this is where throughput comes from (DESIGN.md §8).
//!
//! The socket knows nothing about WireGuard: it moves bytes. Elsewhere it works the same with
//! one datagram per call.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use quinn_udp::{BATCH_SIZE, RecvMeta, UdpSockRef, UdpSocketState};
use tokio::io::Interest;

use super::engine::Transmit;

/// Bytes per receive slot: a GRO aggregate never exceeds 64 KiB, and neither does a datagram.
pub const RECV_SLOT_LEN: usize = 1 << 16;

/// Counters of system calls and datagrams, to see how well batching works.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketStats {
    /// `sendmsg` calls (one per transmit, or per segment without GSO).
    pub send_calls: u64,
    /// Datagrams those calls carried.
    pub datagrams_sent: u64,
    /// Receive calls that returned data.
    pub recv_calls: u64,
    /// Datagrams those calls returned.
    pub datagrams_received: u64,
}

/// A UDP socket with batched receives (`recvmmsg`, GRO) and segmented sends (GSO).
///
/// Methods take `&self`, so one socket can be shared by a receive loop and a send loop.
#[derive(Debug)]
pub struct BatchUdpSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    send_calls: AtomicU64,
    datagrams_sent: AtomicU64,
    recv_calls: AtomicU64,
    datagrams_received: AtomicU64,
}

impl BatchUdpSocket {
    /// Binds a socket on `addr`. Must be called inside a tokio runtime.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        Self::from_std(std::net::UdpSocket::bind(addr)?)
    }

    /// Wraps an already bound socket (made non-blocking here). Must be called inside a tokio
    /// runtime.
    pub fn from_std(socket: std::net::UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        let io = tokio::net::UdpSocket::from_std(socket)?;
        Ok(Self {
            io,
            state,
            send_calls: AtomicU64::new(0),
            datagrams_sent: AtomicU64::new(0),
            recv_calls: AtomicU64::new(0),
            datagrams_received: AtomicU64::new(0),
        })
    }

    /// The bound address (to tell peers, or to learn an ephemeral port).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// How many segments one send may carry: pass it to `Engine::poll_transmit`. It can drop
    /// to 1 at run time if the network device turns out not to support GSO.
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// How many datagrams the kernel may coalesce into one receive slot (1 without GRO).
    pub fn gro_segments(&self) -> usize {
        self.state.gro_segments()
    }

    /// Asks for larger kernel buffers, so bursts are not dropped between two receive calls. The
    /// kernel caps the values (`net.core.rmem_max`, `wmem_max`).
    pub fn set_buffer_sizes(&self, send: usize, recv: usize) -> io::Result<()> {
        self.state
            .set_send_buffer_size(UdpSockRef::from(&self.io), send)?;
        self.state
            .set_recv_buffer_size(UdpSockRef::from(&self.io), recv)
    }

    /// Counters so far.
    pub fn stats(&self) -> SocketStats {
        SocketStats {
            send_calls: self.send_calls.load(Ordering::Relaxed),
            datagrams_sent: self.datagrams_sent.load(Ordering::Relaxed),
            recv_calls: self.recv_calls.load(Ordering::Relaxed),
            datagrams_received: self.datagrams_received.load(Ordering::Relaxed),
        }
    }

    /// Sends a transmit, waiting while the socket buffer is full.
    ///
    /// Errors are per transmit and not fatal (UDP is lossy anyway): the driver should log and go
    /// on. A transmit with more segments than the socket can send at once is sent one datagram
    /// at a time.
    pub async fn send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if transmit.segment_count() > self.max_gso_segments() {
            for segment in transmit.segments() {
                self.send_one(transmit.dst, segment, None).await?;
            }
            return Ok(());
        }
        self.send_one(transmit.dst, transmit.contents, transmit.segment_size)
            .await
    }

    async fn send_one(
        &self,
        dst: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let transmit = quinn_udp::Transmit {
            destination: dst,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        loop {
            self.io.writable().await?;
            match self.io.try_io(Interest::WRITABLE, || {
                self.state.try_send(UdpSockRef::from(&self.io), &transmit)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
                Ok(()) => {
                    let datagrams = match segment_size {
                        Some(n) if n > 0 => contents.len().div_ceil(n),
                        _ => 1,
                    };
                    self.send_calls.fetch_add(1, Ordering::Relaxed);
                    self.datagrams_sent
                        .fetch_add(datagrams as u64, Ordering::Relaxed);
                    return Ok(());
                }
            }
        }
    }

    /// Waits for datagrams and fills `batch` with as many as one system call returns. Returns
    /// the number of datagrams (after splitting GRO aggregates).
    pub async fn recv(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        loop {
            self.io.readable().await?;
            match self.io.try_io(Interest::READABLE, || self.recv_into(batch)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
                Ok(n) => return Ok(n),
            }
        }
    }

    /// Like [`recv`](Self::recv) but returns `WouldBlock` instead of waiting.
    pub fn try_recv(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        self.io.try_io(Interest::READABLE, || self.recv_into(batch))
    }

    fn recv_into(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.filled = 0;
        let slots = batch.meta.len();
        let mut chunks = batch.buf.chunks_mut(RECV_SLOT_LEN);
        let mut slices: [IoSliceMut<'_>; BATCH_SIZE] =
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or(&mut [])));
        let n = self.state.recv(
            UdpSockRef::from(&self.io),
            &mut slices[..slots],
            &mut batch.meta,
        )?;
        batch.filled = n;
        let datagrams = batch.len();
        self.recv_calls.fetch_add(1, Ordering::Relaxed);
        self.datagrams_received
            .fetch_add(datagrams as u64, Ordering::Relaxed);
        Ok(datagrams)
    }
}

/// Reusable receive buffers for [`BatchUdpSocket::recv`]: `slots` regions of 64 KiB (2 MiB for
/// the full batch of 32), allocated once.
#[derive(Debug)]
pub struct RecvBatch {
    buf: Vec<u8>,
    meta: Vec<RecvMeta>,
    filled: usize,
}

impl RecvBatch {
    /// Buffers for up to `slots` receive slots (clamped to `1..=quinn_udp::BATCH_SIZE`).
    pub fn new(slots: usize) -> Self {
        let slots = slots.clamp(1, BATCH_SIZE);
        Self {
            buf: vec![0; slots * RECV_SLOT_LEN],
            meta: vec![RecvMeta::default(); slots],
            filled: 0,
        }
    }

    /// The datagrams of the last receive, in arrival order, with their senders.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.meta[..self.filled]
            .iter()
            .zip(self.buf.chunks(RECV_SLOT_LEN))
            .flat_map(|(meta, slot)| {
                let len = meta.len.min(slot.len());
                let stride = if meta.stride == 0 { len } else { meta.stride };
                slot[..len]
                    .chunks(stride.max(1))
                    .map(move |d| (meta.addr, d))
            })
    }

    /// Number of datagrams from the last receive.
    pub fn len(&self) -> usize {
        self.meta[..self.filled]
            .iter()
            .map(|m| {
                if m.len == 0 {
                    0
                } else {
                    m.len.div_ceil(m.stride.max(1))
                }
            })
            .sum()
    }

    /// Whether the last receive returned nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new(BATCH_SIZE)
    }
}

#[cfg(test)]
mod tests {
    //! The `run_pair` example: two engines joined by two real UDP sockets on 127.0.0.1, driven
    //! the way the gateway's and client's event loops will drive them.

    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::time::{Duration, Instant};

    use x25519_dalek::{PublicKey, StaticSecret};

    use super::*;
    use crate::dataplane::{
        Engine, EngineConfig, MAX_DATAGRAM_LEN, PeerConfig, PeerId, PresharedKey, Received,
    };

    /// One side: an engine, its socket and its reusable buffers.
    struct Node {
        engine: Engine,
        socket: BatchUdpSocket,
        batch: RecvBatch,
        out: Vec<u8>,
    }

    impl Node {
        /// Sends everything the engine queued, GSO-batched where possible.
        async fn flush(&mut self) -> io::Result<()> {
            let max = self.socket.max_gso_segments();
            while let Some(t) = self.engine.poll_transmit(max) {
                self.socket.send(&t).await?;
            }
            Ok(())
        }

        /// Handles whatever datagrams are already waiting, without blocking, then sends.
        fn handle_ready(&mut self, on_packet: &mut impl FnMut(PeerId, &[u8])) -> io::Result<()> {
            loop {
                match self.socket.try_recv(&mut self.batch) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(e),
                }
                let now = Instant::now();
                for (from, datagram) in self.batch.datagrams() {
                    if let Ok(Received::Packet { peer, packet }) =
                        self.engine
                            .handle_datagram(from, datagram, &mut self.out, now)
                    {
                        on_packet(peer, packet);
                    }
                }
            }
        }

        /// One turn of a driver loop: wait (at most `wait`) for datagrams or the next timer,
        /// handle what came, then send what the engine queued.
        async fn turn(
            &mut self,
            wait: Duration,
            on_packet: &mut impl FnMut(PeerId, &[u8]),
        ) -> io::Result<()> {
            let limit = Instant::now() + wait;
            let deadline = self.engine.poll_timeout().map_or(limit, |t| t.min(limit));
            tokio::select! {
                r = self.socket.recv(&mut self.batch) => {
                    r?;
                    let now = Instant::now();
                    for (from, datagram) in self.batch.datagrams() {
                        if let Ok(Received::Packet { peer, packet }) =
                            self.engine.handle_datagram(from, datagram, &mut self.out, now)
                        {
                            on_packet(peer, packet);
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    self.engine.handle_timeout(Instant::now());
                }
            }
            self.flush().await
        }
    }

    fn node(identity: Option<StaticSecret>) -> Node {
        let socket =
            BatchUdpSocket::bind(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)))
                .expect("bind on loopback");
        // Best effort: a bigger buffer only makes loss less likely; the window below prevents it.
        let _ = socket.set_buffer_sizes(4 << 20, 4 << 20);
        Node {
            engine: Engine::new(
                EngineConfig {
                    identity,
                    ..EngineConfig::default()
                },
                Instant::now(),
            ),
            socket,
            batch: RecvBatch::default(),
            out: vec![0; MAX_DATAGRAM_LEN],
        }
    }

    /// An IPv4 header with the right total length, then the sequence number, then filler that
    /// depends on it.
    fn packet(seq: u32, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&u16::try_from(len).expect("len").to_be_bytes());
        p[12..16].copy_from_slice(&[10, 0, 0, 2]);
        p[16..20].copy_from_slice(&[10, 1, 0, 5]);
        p[20..24].copy_from_slice(&seq.to_be_bytes());
        for (i, b) in p[24..].iter_mut().enumerate() {
            *b = (seq as usize + i) as u8;
        }
        p
    }

    #[tokio::test]
    async fn run_pair_over_loopback_udp_in_order() {
        const PACKETS: u32 = 10_000;
        const LEN: usize = 1_200;
        // Packets in flight at most: keeps the burst far below the loopback socket buffer so
        // nothing is dropped, which lets the test demand every packet, in order.
        const WINDOW: u32 = 256;

        let gateway_secret = StaticSecret::from([11u8; 32]);
        let client_secret = StaticSecret::from([22u8; 32]);
        let psk = [33u8; 32];
        let mut gateway = node(Some(gateway_secret.clone()));
        let mut client = node(None);
        let gateway_addr = gateway.socket.local_addr().expect("addr");
        let (gw_peer, cl_peer) = (PeerId(1), PeerId(2));
        let now = Instant::now();
        gateway
            .engine
            .add_peer(
                gw_peer,
                PeerConfig {
                    local_secret: gateway_secret.clone(),
                    remote_public: PublicKey::from(&client_secret),
                    preshared_key: Some(PresharedKey::from(psk)),
                    persistent_keepalive: None,
                    endpoint: None,
                },
                now,
            )
            .expect("gateway peer");
        client
            .engine
            .add_peer(
                cl_peer,
                PeerConfig {
                    local_secret: client_secret,
                    remote_public: PublicKey::from(&gateway_secret),
                    preshared_key: Some(PresharedKey::from(psk)),
                    persistent_keepalive: None,
                    endpoint: Some(gateway_addr),
                },
                now,
            )
            .expect("client peer");

        let started = Instant::now();
        let mut sent = 0u32;
        let mut received = 0u32;
        let mut mismatches = 0u32;
        let mut turns = 0u32;
        while received < PACKETS {
            turns += 1;
            assert!(
                turns < 200_000 && started.elapsed() < Duration::from_secs(120),
                "stalled: {received} of {PACKETS} packets after {turns} turns"
            );
            while sent < PACKETS && sent - received < WINDOW {
                client
                    .engine
                    .handle_ip_packet(cl_peer, &packet(sent, LEN), Instant::now())
                    .expect("encrypt");
                sent += 1;
            }
            // The client only has handshake replies to read: take what is there, don't wait.
            client.handle_ready(&mut |_, _| {}).expect("client receive");
            client.flush().await.expect("client send");
            gateway
                .turn(Duration::from_millis(50), &mut |peer, p| {
                    if peer != gw_peer || p != packet(received, LEN).as_slice() {
                        mismatches += 1;
                    }
                    received += 1;
                })
                .await
                .expect("gateway turn");
        }
        let elapsed = started.elapsed();
        assert_eq!(mismatches, 0, "packets arrived out of order or altered");
        assert_eq!(received, PACKETS);
        let gw_stats = gateway.engine.stats();
        assert_eq!(gw_stats.packets_decrypted, u64::from(PACKETS));
        assert_eq!(gw_stats.dropped.total(), 0, "{:?}", gw_stats.dropped);
        assert_eq!(
            gateway.engine.peer_stats(gw_peer).and_then(|s| s.endpoint),
            client.socket.local_addr().ok()
        );
        let cs = client.socket.stats();
        let gs = gateway.socket.stats();
        println!(
            "loopback run_pair: {PACKETS} x {LEN} B in {elapsed:?} ({:.0} packets/s); \
             client sends: {} calls for {} datagrams (gso max {}); \
             gateway receives: {} calls for {} datagrams (gro {})",
            f64::from(PACKETS) / elapsed.as_secs_f64(),
            cs.send_calls,
            cs.datagrams_sent,
            client.socket.max_gso_segments(),
            gs.recv_calls,
            gs.datagrams_received,
            gateway.socket.gro_segments(),
        );
        if client.socket.max_gso_segments() > 1 {
            assert!(
                cs.send_calls < cs.datagrams_sent,
                "GSO is available but every datagram took its own send call"
            );
        }
    }

    #[test]
    fn recv_batch_splits_gro_aggregates() {
        let mut batch = RecvBatch::new(2);
        let from: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        batch.meta[0] = RecvMeta {
            addr: from,
            len: 25,
            stride: 10,
            ecn: None,
            dst_ip: None,
        };
        batch.meta[1] = RecvMeta {
            addr: from,
            len: 4,
            stride: 4,
            ecn: None,
            dst_ip: None,
        };
        batch.filled = 2;
        let lens: Vec<usize> = batch.datagrams().map(|(_, d)| d.len()).collect();
        assert_eq!(lens, vec![10, 10, 5, 4]);
        assert_eq!(batch.len(), 4);
        batch.filled = 0;
        assert!(batch.is_empty());
    }
}
