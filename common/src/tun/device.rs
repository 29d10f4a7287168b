//! [`TunDevice`]: one TUN interface, read and written in batches of plain IP packets.
//!
//! On Linux it wraps tun-rs's `AsyncDevice` opened with `IFF_VNET_HDR` (offload). Reads return
//! one frame: a virtio-net header and either one packet or a GSO super-packet, which tun-rs's
//! `recv_multiple` splits into MTU-sized packets (fixing lengths, ids, sequence numbers and
//! checksums). Writes go through tun-rs's `send_multiple`, which coalesces consecutive
//! packets of one TCP (or UDP) flow with its `GROTable` and writes each group as one frame.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;

use super::batch::{DEFAULT_BATCH_SLOTS, PacketBatch};
use super::{TunConfig, TunError, route};

/// Counters of frames and packets, to see how well batching works and what was dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunStats {
    /// Reads that returned a frame (one packet, or a super-packet with offload).
    pub frames_received: u64,
    /// IP packets those frames held after splitting, as handed to the caller.
    pub packets_received: u64,
    /// Frames the offload splitter rejected (malformed, or more segments than slots).
    pub frames_dropped: u64,
    /// Packets dropped because they were not IPv4/IPv6 or too short for the header.
    pub non_ip_dropped: u64,
    /// Batched or single sends.
    pub send_calls: u64,
    /// IP packets handed to those sends.
    pub packets_sent: u64,
}

#[derive(Debug, Default)]
struct Counters {
    frames_received: AtomicU64,
    packets_received: AtomicU64,
    frames_dropped: AtomicU64,
    non_ip_dropped: AtomicU64,
    send_calls: AtomicU64,
    packets_sent: AtomicU64,
}

impl Counters {
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Packets split from a frame that a single-packet [`TunDevice::recv`] has not returned yet.
#[derive(Debug, Default)]
struct RecvStash {
    batch: Option<PacketBatch>,
    next: usize,
}

/// A TUN interface that is up, with its addresses, until dropped (dropping deletes the
/// interface and every route through it).
///
/// The batch methods take `&self` and keep no per-call state in the device: one task may
/// receive while another sends, sharing the device in an `Arc`. Only the single-packet
/// [`TunDevice::recv`] keeps leftovers of a split frame, so it takes `&mut self`.
#[derive(Debug)]
pub struct TunDevice {
    io: DeviceIo,
    stash: RecvStash,
}

struct DeviceIo {
    #[cfg(target_os = "linux")]
    dev: tun_rs::AsyncDevice,
    #[cfg(not(target_os = "linux"))]
    dev: Never,
    name: String,
    mtu: u16,
    offload: bool,
    udp_offload: bool,
    counters: Counters,
}

impl std::fmt::Debug for DeviceIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIo")
            .field("name", &self.name)
            .field("mtu", &self.mtu)
            .field("offload", &self.offload)
            .field("udp_offload", &self.udp_offload)
            .finish_non_exhaustive()
    }
}

/// Stands in for the device on platforms without an implementation: no value exists, so no
/// method can be reached there.
#[cfg(not(target_os = "linux"))]
#[derive(Debug)]
enum Never {}

/// Whether a receive error concerns one frame (dropped, the loop goes on) rather than the
/// device. tun-rs reports splitting failures as errors of its own making, without an OS code.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn is_frame_error(e: &io::Error) -> bool {
    e.raw_os_error().is_none()
        && matches!(
            e.kind(),
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData | io::ErrorKind::Other
        )
}

impl TunDevice {
    /// Creates the interface, sets its MTU and addresses, and brings it up. Must be called
    /// inside a tokio runtime, as root (or with `CAP_NET_ADMIN`).
    ///
    /// With offload asked for (the default), the device is opened with a virtio-net header; if
    /// the kernel refuses, it is opened again without, and [`TunDevice::offload`] says which
    /// happened. With offload, the kernel is told to put at most [`DEFAULT_BATCH_SLOTS`]
    /// segments in one frame, so one frame always fits a default [`PacketBatch`].
    pub async fn create(config: &TunConfig) -> Result<Self, TunError> {
        #[cfg(target_os = "linux")]
        {
            linux::create(config).await
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = config;
            Err(TunError::Unsupported {
                what: "creating a TUN device",
            })
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.io.name
    }

    /// The MTU: the largest packet [`TunDevice::recv_batch`] returns and the kernel accepts.
    pub fn mtu(&self) -> u16 {
        self.io.mtu
    }

    /// Whether TCP offload (the virtio-net header) is on: received TCP arrives as
    /// super-packets that are split, sent TCP is coalesced.
    pub fn offload(&self) -> bool {
        self.io.offload
    }

    /// Whether UDP offload is on too (Linux 6.2 or later).
    pub fn udp_offload(&self) -> bool {
        self.io.udp_offload
    }

    /// Counters so far.
    pub fn stats(&self) -> TunStats {
        let c = &self.io.counters;
        TunStats {
            frames_received: c.frames_received.load(Ordering::Relaxed),
            packets_received: c.packets_received.load(Ordering::Relaxed),
            frames_dropped: c.frames_dropped.load(Ordering::Relaxed),
            non_ip_dropped: c.non_ip_dropped.load(Ordering::Relaxed),
            send_calls: c.send_calls.load(Ordering::Relaxed),
            packets_sent: c.packets_sent.load(Ordering::Relaxed),
        }
    }

    /// Replaces `batch`'s contents with the IP packets of the next frame(s): waits for one
    /// frame, splits it, then takes whatever else is already waiting while a whole frame still
    /// fits. Returns the number of packets (at least 1).
    ///
    /// Non-IP frames and malformed offload frames are dropped and counted; an OS error is
    /// returned. With offload the batch needs [`DEFAULT_BATCH_SLOTS`] slots. Cancel-safe: a
    /// cancelled call has read nothing.
    pub async fn recv_batch(&self, batch: &mut PacketBatch) -> io::Result<usize> {
        self.io.recv_batch(batch).await
    }

    /// Writes every packet in `batch` and empties it. With offload, consecutive packets of
    /// one TCP flow (and of one UDP flow on Linux 6.2+) are coalesced into one write; the
    /// kernel splits them again if it must. Returns the number of packets.
    ///
    /// A packet the kernel refuses does not stop the others; the last such error is returned
    /// after all were tried. Not cancel-safe (part of the batch may have been written): do not
    /// race it in `select!`. The slots' contents are undefined afterwards (coalescing rewrites
    /// them in place).
    pub async fn send_batch(&self, batch: &mut PacketBatch) -> io::Result<usize> {
        self.io.send_batch(batch).await
    }

    /// Receives one IP packet into `buf` (which should hold [`TunDevice::mtu`] bytes) and
    /// returns its length. For simple callers and tests: a split super-packet's remaining
    /// packets wait in the device for the next calls, which is why this takes `&mut self`.
    ///
    /// A packet longer than `buf` is an `InvalidInput` error and stays queued. Cancel-safe.
    pub async fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let next = self
                .stash
                .batch
                .as_ref()
                .and_then(|batch| batch.get(self.stash.next));
            if let Some(packet) = next {
                let room = buf.len();
                let dst = buf.get_mut(..packet.len()).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "a buffer of {room} bytes cannot hold the next packet of {} bytes",
                            packet.len()
                        ),
                    )
                })?;
                dst.copy_from_slice(packet);
                self.stash.next += 1;
                return Ok(packet.len());
            }
            let mtu = usize::from(self.io.mtu);
            let batch = self
                .stash
                .batch
                .get_or_insert_with(|| PacketBatch::with_capacity(DEFAULT_BATCH_SLOTS, mtu));
            self.stash.next = 0;
            self.io.recv_batch(batch).await?;
        }
    }

    /// Writes one IP packet. With offload a zero virtio-net header ("no offload, checksums
    /// complete") goes in front, in the same system call. The packet must be IPv4/IPv6 with
    /// correct checksums; otherwise `InvalidInput`.
    pub async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.io.send(packet).await
    }

    /// Routes `prefix` (host bits are ignored) through this interface, replacing any route to
    /// the same prefix: on the client, one call per granted resource network. Linux runs
    /// `ip route replace PREFIX dev NAME`.
    pub async fn add_route(&self, prefix: IpNet) -> Result<(), TunError> {
        route::add_route(&self.io.name, prefix).await
    }

    /// Removes the route to `prefix` through this interface, when the last grant for it ends.
    /// Returns `false` when there was no such route (not an error: removal is idempotent).
    pub async fn remove_route(&self, prefix: IpNet) -> Result<bool, TunError> {
        route::remove_route(&self.io.name, prefix).await
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io::{self, IoSlice};

    use tun_rs::{AsyncDevice, DeviceBuilder, VIRTIO_NET_HDR_LEN};

    use super::super::batch::{HEADROOM, is_ip_packet};
    use super::*;

    fn build(config: &TunConfig, offload: bool) -> io::Result<AsyncDevice> {
        let mut builder = DeviceBuilder::new()
            .name(config.name.as_str())
            .mtu(config.mtu)
            .offload(offload);
        if let Some(net) = config.ipv4 {
            builder = builder.ipv4(net.addr(), net.prefix_len(), None);
        }
        if let Some(net) = config.ipv6 {
            builder = builder.ipv6(net.addr(), net.prefix_len());
        }
        builder.build_async()
    }

    pub(super) async fn create(config: &TunConfig) -> Result<TunDevice, TunError> {
        let create_error = |source| TunError::Create {
            name: config.name.clone(),
            source,
        };
        let dev = if config.offload {
            match build(config, true) {
                Ok(dev) => dev,
                Err(error) => {
                    tracing::warn!(
                        name = %config.name,
                        error = %error,
                        "TUN offload unavailable; falling back to one packet per system call"
                    );
                    build(config, false).map_err(create_error)?
                }
            }
        } else {
            build(config, false).map_err(create_error)?
        };
        let offload = dev.tcp_gso();
        let udp_offload = dev.udp_gso();
        if offload {
            // One frame must fit one default batch: cap the kernel's segments per frame. TCP
            // with a tiny MSS could otherwise make super-packets of hundreds of segments.
            let segs = DEFAULT_BATCH_SLOTS.to_string();
            if let Err(error) =
                route::ip(&["link", "set", "dev", &config.name, "gso_max_segs", &segs]).await
            {
                tracing::warn!(
                    name = %config.name,
                    error = %error,
                    "cannot cap GSO segments; frames with more segments than a batch holds will be dropped"
                );
            }
        }
        tracing::info!(
            name = %config.name,
            mtu = config.mtu,
            offload,
            udp_offload,
            "TUN device up"
        );
        Ok(TunDevice {
            io: DeviceIo {
                dev,
                name: config.name.clone(),
                mtu: config.mtu,
                offload,
                udp_offload,
                counters: Counters::default(),
            },
            stash: RecvStash::default(),
        })
    }

    impl DeviceIo {
        pub(super) async fn recv_batch(&self, batch: &mut PacketBatch) -> io::Result<usize> {
            if self.offload && batch.capacity() < DEFAULT_BATCH_SLOTS {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "a batch of {} slots is too small for an offload frame of up to {} \
                         packets: use PacketBatch::new()",
                        batch.capacity(),
                        DEFAULT_BATCH_SLOTS
                    ),
                ));
            }
            batch.prepare_recv(usize::from(self.mtu), self.offload);
            // Wait for the first frame.
            loop {
                let (frame, slots, sizes) = batch.recv_parts();
                match self.dev.recv_multiple(frame, slots, sizes, HEADROOM).await {
                    Ok(n) => {
                        if self.take_frame(batch, n) > 0 {
                            break;
                        }
                    }
                    Err(e) if is_frame_error(&e) => self.drop_frame(&e),
                    Err(e) => return Err(e),
                }
            }
            // Then take what is already queued, while a whole frame still fits.
            let needed = if self.offload { DEFAULT_BATCH_SLOTS } else { 1 };
            while batch.free_slots() >= needed {
                let (frame, slots, sizes) = batch.recv_parts();
                match self.dev.try_recv_multiple(frame, slots, sizes, HEADROOM) {
                    Ok(n) => {
                        self.take_frame(batch, n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if is_frame_error(&e) => self.drop_frame(&e),
                    // The next call will meet the error again; deliver what we have.
                    Err(_) => break,
                }
            }
            Ok(batch.len())
        }

        /// Accounts for one frame of `n` packets; returns the IP packets kept.
        fn take_frame(&self, batch: &mut PacketBatch, n: usize) -> usize {
            let before = batch.len();
            let dropped = batch.finish_recv(n);
            let kept = batch.len() - before;
            Counters::add(&self.counters.frames_received, 1);
            Counters::add(&self.counters.packets_received, kept);
            if dropped > 0 {
                Counters::add(&self.counters.non_ip_dropped, dropped);
                tracing::trace!(dropped, "non-IP packets dropped from the TUN device");
            }
            kept
        }

        fn drop_frame(&self, error: &io::Error) {
            Counters::add(&self.counters.frames_received, 1);
            Counters::add(&self.counters.frames_dropped, 1);
            tracing::debug!(error = %error, "TUN offload frame dropped");
        }

        pub(super) async fn send_batch(&self, batch: &mut PacketBatch) -> io::Result<usize> {
            let n = batch.len();
            if n == 0 {
                return Ok(0);
            }
            let (gro, slots) = batch.send_parts();
            let result = self.dev.send_multiple(gro, slots, HEADROOM).await;
            batch.clear();
            Counters::add(&self.counters.send_calls, 1);
            Counters::add(&self.counters.packets_sent, n);
            result.map(|_| n)
        }

        pub(super) async fn send(&self, packet: &[u8]) -> io::Result<usize> {
            is_ip_packet(packet).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let written = if self.offload {
                let header = [0u8; VIRTIO_NET_HDR_LEN];
                let parts = [IoSlice::new(&header), IoSlice::new(packet)];
                self.dev
                    .send_vectored(&parts)
                    .await?
                    .saturating_sub(VIRTIO_NET_HDR_LEN)
            } else {
                self.dev.send(packet).await?
            };
            Counters::add(&self.counters.send_calls, 1);
            Counters::add(&self.counters.packets_sent, 1);
            Ok(written)
        }
    }
}

#[cfg(not(target_os = "linux"))]
impl DeviceIo {
    async fn recv_batch(&self, _batch: &mut PacketBatch) -> io::Result<usize> {
        match self.dev {}
    }

    async fn send_batch(&self, _batch: &mut PacketBatch) -> io::Result<usize> {
        match self.dev {}
    }

    async fn send(&self, _packet: &[u8]) -> io::Result<usize> {
        match self.dev {}
    }
}
