//! The smoltcp `Device` of the stack: two bounded queues of whole IP packets instead of a NIC.

use std::collections::VecDeque;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Packets from the tunnel wait in `rx` until smoltcp polls; packets smoltcp emits wait in `tx`
/// until the caller takes them.
#[derive(Debug)]
pub(crate) struct QueueDevice {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: VecDeque<Vec<u8>>,
    mtu: usize,
    tx_limit: usize,
    /// Replies to received packets bypass `tx_limit`; this hard cap stops them piling up when
    /// the caller stops taking packets but keeps feeding them. Past it replies are dropped,
    /// which TCP recovers from.
    tx_hard_limit: usize,
    /// Set when smoltcp wanted to send but `tx` was full, so the stack knows to poll again once
    /// the caller has drained packets.
    pub tx_exhausted: bool,
}

impl QueueDevice {
    pub fn new(mtu: usize, tx_limit: usize, rx_limit: usize) -> Self {
        Self {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu,
            tx_limit,
            tx_hard_limit: tx_limit.saturating_mul(2).saturating_add(rx_limit),
            tx_exhausted: false,
        }
    }
}

pub(crate) struct RxToken(Vec<u8>);

pub(crate) struct TxToken<'a> {
    queue: &'a mut VecDeque<Vec<u8>>,
    /// Drop instead of queueing (the hard limit was reached).
    discard: bool,
}

impl phy::RxToken for RxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        if !self.discard {
            self.queue.push_back(buf);
        }
        r
    }
}

impl phy::Device for QueueDevice {
    type RxToken<'a>
        = RxToken
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        // A reply to an incoming packet (an ACK, a RST) is queued even past `tx_limit`: there
        // is at most one per received packet, and the hard limit bounds them all.
        let packet = self.rx.pop_front()?;
        let discard = self.tx.len() >= self.tx_hard_limit;
        Some((
            RxToken(packet),
            TxToken {
                queue: &mut self.tx,
                discard,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        if self.tx.len() >= self.tx_limit {
            self.tx_exhausted = true;
            return None;
        }
        Some(TxToken {
            queue: &mut self.tx,
            discard: false,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}
