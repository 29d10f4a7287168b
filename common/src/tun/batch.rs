//! [`PacketBatch`]: reusable slots of plain IP packets, the unit [`super::TunDevice`] reads and
//! writes.
//!
//! Each slot is one fixed buffer with room in front of the packet for the virtio-net header
//! ([`HEADROOM`]), so the device can hand slots to tun-rs as they are: received packets are
//! split straight into them, and packets to send are coalesced in place (the first packet of a
//! TCP flow grows to hold the others, up to the slot's capacity). Slots are allocated once, with
//! the batch, and never shrink; filling, filtering and sending only move lengths and swap slots.

use std::fmt;

/// Bytes kept in front of every packet in a slot: room for the virtio-net header that the
/// Linux device writes before a packet (10 bytes, `tun_rs::VIRTIO_NET_HDR_LEN`).
#[cfg(target_os = "linux")]
pub(crate) const HEADROOM: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// Bytes kept in front of every packet in a slot (the Linux layout, unused elsewhere).
#[cfg(not(target_os = "linux"))]
pub(crate) const HEADROOM: usize = 10;

/// The number of slots [`PacketBatch::new`] makes: tun-rs's (and wireguard-go's) ideal batch,
/// and the most segments one offload frame may carry (the device caps the kernel's segment
/// count at this, so one frame always fits an empty default batch).
pub const DEFAULT_BATCH_SLOTS: usize = 128;

/// The largest IP packet a slot can hold: 64 KiB, the IPv4 total-length limit. GRO coalescing
/// grows a flow's first packet up to this size.
pub const MAX_PACKET_LEN: usize = 65_535;

/// Why a packet was not added to a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// Every slot is taken: send the batch, then push again.
    #[error("the packet batch is full: send it first")]
    Full,
    /// The packet is empty, or shorter than an IPv4 (20 bytes) or IPv6 (40 bytes) header.
    #[error("the packet is shorter than an IP header")]
    TooShort,
    /// The first nibble is neither 4 nor 6: a TUN device only carries IP.
    #[error("the packet is neither IPv4 nor IPv6")]
    NotIp,
    /// The packet is longer than a slot holds.
    #[error("the packet of {len} bytes is longer than a slot's {max} bytes")]
    TooLong {
        /// The packet's length.
        len: usize,
        /// The slot capacity.
        max: usize,
    },
}

/// One reusable buffer: the packet lives at `data[HEADROOM..len]`.
///
/// `data` is fully initialised once, so growing and shrinking `len` never zero-fills; `AsRef`
/// and `AsMut` expose `data[..len]`, which is what tun-rs reads and writes.
pub(crate) struct Slot {
    data: Vec<u8>,
    len: usize,
}

impl Slot {
    fn new(capacity: usize) -> Self {
        Self {
            // calloc-backed: pages stay untouched (and out of RSS) until used.
            data: vec![0; capacity],
            len: HEADROOM,
        }
    }

    fn packet(&self) -> &[u8] {
        self.data.get(HEADROOM..self.len).unwrap_or_default()
    }

    fn packet_mut(&mut self) -> &mut [u8] {
        self.data.get_mut(HEADROOM..self.len).unwrap_or_default()
    }

    /// Room for a packet: the buffer minus headroom at the front and, so tun-rs's coalescing
    /// capacity check (`2 * offset + length`) passes for a full-size packet, at the back.
    fn packet_capacity(&self) -> usize {
        self.data.len().saturating_sub(2 * HEADROOM)
    }

    fn ensure_packet_capacity(&mut self, packet_len: usize) {
        let needed = packet_len + 2 * HEADROOM;
        if self.data.len() < needed {
            // Once per slot at most, when a batch made for small packets meets a larger MTU.
            self.data.resize(needed, 0);
        }
    }
}

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        self.data.get(..self.len).unwrap_or_default()
    }
}

impl AsMut<[u8]> for Slot {
    fn as_mut(&mut self) -> &mut [u8] {
        self.data.get_mut(..self.len).unwrap_or_default()
    }
}

#[cfg(target_os = "linux")]
impl tun_rs::ExpandBuffer for Slot {
    fn buf_capacity(&self) -> usize {
        self.data.len()
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        if new_len > self.data.len() {
            self.data.resize(new_len, value);
        }
        if let Some(grown) = self.data.get_mut(self.len..new_len) {
            grown.fill(value);
        }
        self.len = new_len;
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        let end = self.len + src.len();
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        if let Some(dst) = self.data.get_mut(self.len..end) {
            dst.copy_from_slice(src);
        }
        self.len = end;
    }
}

/// Whether `packet` can be an IPv4 or IPv6 packet: the version nibble and the fixed header's
/// length. Everything else about it is the packet filter's job.
pub(crate) fn is_ip_packet(packet: &[u8]) -> Result<(), PushError> {
    match packet.first().map(|b| b >> 4) {
        None => Err(PushError::TooShort),
        Some(4) if packet.len() >= 20 => Ok(()),
        Some(6) if packet.len() >= 40 => Ok(()),
        Some(4 | 6) => Err(PushError::TooShort),
        Some(_) => Err(PushError::NotIp),
    }
}

/// A batch of plain IP packets in reusable slots: what [`super::TunDevice::recv_batch`] fills
/// and [`super::TunDevice::send_batch`] drains.
///
/// Make one per direction and keep it: the slots are allocated here and reused for every
/// batch, so the packet path does not allocate. A receive batch may be forwarded as it is (or
/// after [`PacketBatch::retain`]); a send batch is filled with [`PacketBatch::push`] or, to
/// decrypt straight into a slot, [`PacketBatch::push_with`].
pub struct PacketBatch {
    slots: Vec<Slot>,
    /// tun-rs's per-slot output lengths for a receive; as long as `slots`.
    sizes: Vec<usize>,
    /// Packets in use: `slots[..len]`.
    len: usize,
    /// The raw offload frame (virtio-net header + super-packet), sized at the first offload
    /// receive.
    frame: Vec<u8>,
    /// tun-rs's coalescing state, reused across sends.
    #[cfg(target_os = "linux")]
    gro: tun_rs::GROTable,
}

impl fmt::Debug for PacketBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PacketBatch")
            .field("len", &self.len)
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl Default for PacketBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl PacketBatch {
    /// A batch of [`DEFAULT_BATCH_SLOTS`] slots of [`MAX_PACKET_LEN`] bytes: right for both
    /// directions, with room for coalescing. About 8 MiB of address space, touched only as used.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_BATCH_SLOTS, MAX_PACKET_LEN)
    }

    /// A batch of `slots` slots (at least 1) that each hold a packet of up to `max_packet_len`
    /// bytes (at most [`MAX_PACKET_LEN`]). A smaller batch saves memory; note that a receive
    /// with offload needs [`DEFAULT_BATCH_SLOTS`] slots, that receive slots grow (once) to the
    /// device's MTU, and that coalescing on send is limited by the slot size.
    pub fn with_capacity(slots: usize, max_packet_len: usize) -> Self {
        let slots = slots.clamp(1, usize::from(u16::MAX));
        let capacity = max_packet_len.min(MAX_PACKET_LEN) + 2 * HEADROOM;
        Self {
            slots: (0..slots).map(|_| Slot::new(capacity)).collect(),
            sizes: vec![0; slots],
            len: 0,
            frame: Vec::new(),
            #[cfg(target_os = "linux")]
            gro: tun_rs::GROTable::new(),
        }
    }

    /// How many packets the batch holds now.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch holds no packet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many packets the batch can hold.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Forgets every packet (the slots stay allocated).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The packet at `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<&[u8]> {
        self.slots.get(..self.len)?.get(index).map(Slot::packet)
    }

    /// The packet at `index`, mutable so a filter can rewrite it in place (keep the length;
    /// checksums are the writer's business).
    pub fn get_mut(&mut self, index: usize) -> Option<&mut [u8]> {
        self.slots
            .get_mut(..self.len)?
            .get_mut(index)
            .map(Slot::packet_mut)
    }

    /// The packets, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.slots.iter().take(self.len).map(Slot::packet)
    }

    /// Copies `packet` into the next slot. It must look like an IPv4 or IPv6 packet, because a
    /// TUN device carries nothing else and the kernel would refuse the whole write.
    pub fn push(&mut self, packet: &[u8]) -> Result<(), PushError> {
        is_ip_packet(packet)?;
        let slot = self.slots.get_mut(self.len).ok_or(PushError::Full)?;
        let max = slot.packet_capacity();
        let dst = slot
            .data
            .get_mut(HEADROOM..HEADROOM + packet.len())
            .filter(|_| packet.len() <= max)
            .ok_or(PushError::TooLong {
                len: packet.len(),
                max,
            })?;
        dst.copy_from_slice(packet);
        slot.len = HEADROOM + packet.len();
        self.len += 1;
        Ok(())
    }

    /// Lets `write` fill the next slot in place (for example, the WireGuard engine decrypting
    /// into it), saving a copy. `write` gets the slot's whole capacity and returns the packet's
    /// length, or `None` when it produced no packet (the slot stays free).
    ///
    /// Returns `Ok(true)` when a packet was added. A written packet that is not IPv4/IPv6 is
    /// not added, and the error says why.
    pub fn push_with<F>(&mut self, write: F) -> Result<bool, PushError>
    where
        F: FnOnce(&mut [u8]) -> Option<usize>,
    {
        let slot = self.slots.get_mut(self.len).ok_or(PushError::Full)?;
        let max = slot.packet_capacity();
        let room = slot
            .data
            .get_mut(HEADROOM..HEADROOM + max)
            .unwrap_or_default();
        let Some(len) = write(room) else {
            return Ok(false);
        };
        let packet = slot
            .data
            .get(HEADROOM..HEADROOM + len)
            .filter(|_| len <= max)
            .ok_or(PushError::TooLong { len, max })?;
        is_ip_packet(packet)?;
        slot.len = HEADROOM + len;
        self.len += 1;
        Ok(true)
    }

    /// Keeps only the packets for which `keep` returns true, in order. No packet is copied:
    /// slots are swapped.
    pub fn retain<F>(&mut self, mut keep: F)
    where
        F: FnMut(&mut [u8]) -> bool,
    {
        let mut kept = 0;
        for i in 0..self.len {
            let Some(slot) = self.slots.get_mut(i) else {
                break;
            };
            if keep(slot.packet_mut()) {
                self.slots.swap(i, kept);
                kept += 1;
            }
        }
        self.len = kept;
    }

    /// Free slots after the packets.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(crate) fn free_slots(&self) -> usize {
        self.slots.len() - self.len
    }

    /// Gets every slot ready for a receive of packets up to `max_packet_len` bytes (and the
    /// frame buffer for a virtio-net frame when `offload`). Allocates only the first time, or
    /// when the MTU grew.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(crate) fn prepare_recv(&mut self, max_packet_len: usize, offload: bool) {
        self.len = 0;
        for slot in &mut self.slots {
            slot.ensure_packet_capacity(max_packet_len);
        }
        if offload {
            let frame_len = HEADROOM + MAX_PACKET_LEN;
            if self.frame.len() < frame_len {
                self.frame.resize(frame_len, 0);
            }
        }
    }

    /// The parts a receive writes into: the frame buffer, the free slots (opened to their full
    /// length), and their length outputs.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(crate) fn recv_parts(&mut self) -> (&mut [u8], &mut [Slot], &mut [usize]) {
        let start = self.len;
        let slots = self.slots.get_mut(start..).unwrap_or_default();
        for slot in slots.iter_mut() {
            slot.len = slot.data.len();
        }
        let sizes = self.sizes.get_mut(start..).unwrap_or_default();
        (&mut self.frame, slots, sizes)
    }

    /// Takes in `received` packets written by the last receive into the free slots, drops any
    /// that are not IPv4/IPv6, and returns how many were dropped.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(crate) fn finish_recv(&mut self, received: usize) -> usize {
        let start = self.len;
        let end = (start + received).min(self.slots.len());
        let mut kept = start;
        for i in start..end {
            let size = self.sizes.get(i).copied().unwrap_or(0);
            let Some(slot) = self.slots.get_mut(i) else {
                break;
            };
            slot.len = (HEADROOM + size).min(slot.data.len());
            if is_ip_packet(slot.packet()).is_ok() {
                self.slots.swap(i, kept);
                kept += 1;
            }
        }
        self.len = kept;
        end - kept
    }

    /// The parts a send reads: the coalescing table and the filled slots.
    #[cfg(target_os = "linux")]
    pub(crate) fn send_parts(&mut self) -> (&mut tun_rs::GROTable, &mut [Slot]) {
        let slots = self.slots.get_mut(..self.len).unwrap_or_default();
        (&mut self.gro, slots)
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    fn ipv4(len: usize, tag: u8) -> Vec<u8> {
        let mut p = vec![tag; len];
        p[0] = 0x45;
        p
    }

    #[test]
    fn push_iterate_retain_clear() {
        let mut b = PacketBatch::with_capacity(3, 100);
        assert!(b.is_empty());
        b.push(&ipv4(20, 1)).expect("push");
        b.push(&ipv4(30, 2)).expect("push");
        b.push(&ipv4(40, 3)).expect("push");
        assert_eq!(b.push(&ipv4(20, 4)), Err(PushError::Full));
        assert_eq!(
            b.iter().map(<[u8]>::len).collect::<Vec<_>>(),
            vec![20, 30, 40]
        );
        b.retain(|p| p[1] != 2);
        assert_eq!(b.len(), 2);
        assert_eq!(b.get(0).map(|p| p[1]), Some(1));
        assert_eq!(b.get(1).map(|p| p[1]), Some(3));
        assert_eq!(b.get(2), None);
        b.get_mut(1).expect("packet")[1] = 9;
        assert_eq!(b.get(1).map(|p| p[1]), Some(9));
        b.clear();
        assert_eq!(b.iter().count(), 0);
        assert_eq!(b.free_slots(), 3);
    }

    #[test]
    fn push_rejects_what_a_tun_would() {
        let mut b = PacketBatch::with_capacity(2, 100);
        assert_eq!(b.push(&[]), Err(PushError::TooShort));
        assert_eq!(b.push(&ipv4(19, 0)), Err(PushError::TooShort));
        let mut v6 = vec![0u8; 39];
        v6[0] = 0x60;
        assert_eq!(b.push(&v6), Err(PushError::TooShort));
        v6.push(0);
        assert_eq!(b.push(&v6), Ok(()));
        assert_eq!(b.push(&[0x20; 40]), Err(PushError::NotIp));
        assert_eq!(
            b.push(&ipv4(101, 0)),
            Err(PushError::TooLong { len: 101, max: 100 })
        );
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn push_with_writes_in_place() {
        let mut b = PacketBatch::with_capacity(2, 100);
        assert_eq!(b.push_with(|_| None), Ok(false));
        assert_eq!(
            b.push_with(|room| {
                assert_eq!(room.len(), 100);
                room[..24].copy_from_slice(&ipv4(24, 7));
                Some(24)
            }),
            Ok(true)
        );
        assert_eq!(
            b.push_with(|_| Some(101)),
            Err(PushError::TooLong { len: 101, max: 100 })
        );
        assert_eq!(
            b.push_with(|room| {
                room[0] = 0x10;
                Some(20)
            }),
            Err(PushError::NotIp)
        );
        assert_eq!(b.len(), 1);
        assert_eq!(b.get(0), Some(&ipv4(24, 7)[..]));
    }

    #[test]
    fn receive_bookkeeping_drops_non_ip() {
        let mut b = PacketBatch::with_capacity(4, 64);
        b.prepare_recv(200, false);
        let (_, slots, sizes) = b.recv_parts();
        assert_eq!(slots.len(), 4);
        // The slots grew to the MTU.
        assert!(slots.iter().all(|s| s.as_ref().len() >= HEADROOM + 200));
        for (i, (slot, size)) in slots.iter_mut().zip(sizes.iter_mut()).take(3).enumerate() {
            let p = if i == 1 {
                vec![0x00; 30]
            } else {
                ipv4(30 + i, i as u8)
            };
            slot.as_mut()[HEADROOM..HEADROOM + p.len()].copy_from_slice(&p);
            *size = p.len();
        }
        assert_eq!(b.finish_recv(3), 1);
        assert_eq!(b.len(), 2);
        assert_eq!(b.iter().map(<[u8]>::len).collect::<Vec<_>>(), vec![30, 32]);
        assert_eq!(b.free_slots(), 2);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn slot_growth_keeps_contents() {
        use tun_rs::ExpandBuffer;
        let mut s = Slot::new(HEADROOM + 8);
        s.buf_extend_from_slice(&[1, 2, 3]);
        assert_eq!(&s.as_ref()[HEADROOM..], &[1, 2, 3]);
        s.buf_extend_from_slice(&[4; 10]);
        assert_eq!(s.as_ref().len(), HEADROOM + 13);
        s.buf_resize(HEADROOM + 2, 0);
        assert_eq!(&s.as_ref()[HEADROOM..], &[1, 2]);
        s.buf_resize(HEADROOM + 4, 5);
        assert_eq!(&s.as_ref()[HEADROOM..], &[1, 2, 5, 5]);
        assert!(s.buf_capacity() >= HEADROOM + 13);
    }
}
