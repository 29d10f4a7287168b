//! The OS TUN interface that both `tun` data-plane modes use: on the gateway a TUN device plus
//! kernel forwarding and masquerade towards the resource network; on the client a TUN device
//! with routes only for granted destinations (DESIGN.md §3).
//!
//! The data plane is `UDP socket <-> WireGuard engine <-> packet filter <-> TUN`; this module is
//! the last hop. It speaks plain IPv4/IPv6 packets to its caller and hides how the kernel
//! batches them.
//!
//! # Why batches
//!
//! On Linux the device is opened with a virtio-net header (tun-rs `offload(true)`): the kernel
//! hands over TCP (and, from Linux 6.2, UDP) segments coalesced into one super-packet of up to
//! 64 KiB (GSO), and accepts coalesced super-packets back (GRO). One system call then moves
//! dozens of packets. On this kind of machine system calls, not crypto, limit a userspace
//! tunnel (DESIGN.md §8), so this batching is where throughput comes from.
//! [`TunDevice::recv_batch`] splits each super-packet into MTU-sized IP packets with correct
//! headers and checksums; [`TunDevice::send_batch`] coalesces a batch of plain IP packets into
//! as few writes as possible. Without offload (it failed, was disabled, or the platform has
//! none) the same calls work one packet per system call.
//!
//! # Call order
//!
//! 1. [`TunConfig::new`] (name, then [`TunConfig::ipv4`], [`TunConfig::ipv6`], [`TunConfig::mtu`])
//!    and [`TunDevice::create`] inside a tokio runtime: the interface exists and is up.
//! 2. [`TunDevice::add_route`] for each destination that must go through the tunnel (client:
//!    each granted resource; gateway: none, the interface's own prefix is routed already), and
//!    on the gateway [`enable_forwarding_and_masquerade`].
//! 3. A receive loop over [`TunDevice::recv_batch`] with one reusable [`PacketBatch`]: each
//!    packet goes to the filter and the engine.
//! 4. Decrypted packets that pass the filter are pushed into another [`PacketBatch`]
//!    ([`PacketBatch::push`] or [`PacketBatch::push_with`], which lets the engine decrypt
//!    straight into the slot) and written with one [`TunDevice::send_batch`] per round.
//! 5. On shutdown: [`TunDevice::remove_route`] as grants end, [`remove_masquerade`] on the
//!    gateway; dropping the device deletes the interface and with it every route through it.
//!
//! [`TunDevice::recv`] and [`TunDevice::send`] move one packet per call, for simple callers and
//! tests; they do the same header handling.
//!
//! # Invariants
//!
//! - What [`TunDevice::recv_batch`] and [`TunDevice::recv`] return is an IPv4 or IPv6 packet:
//!   frames whose version nibble is neither, or shorter than the fixed header, are dropped and
//!   counted ([`TunStats::non_ip_dropped`]). Nothing else is checked here: the first packets
//!   after link-up are usually IPv6 MLD reports and router solicitations from the kernel
//!   itself, and they *are* IPv6, so they reach the caller; the packet filter drops them
//!   because no grant matches them. Callers should expect and silently drop such traffic.
//! - A malformed offload frame (a header the splitter rejects) is dropped and counted
//!   ([`TunStats::frames_dropped`]); it never ends the receive loop. OS errors are returned.
//! - No allocation per packet on our side: a [`PacketBatch`] owns its slots and reuses them;
//!   slots have a fixed capacity and never shrink. (tun-rs's GRO coalescing copies each
//!   candidate packet internally; that is its business.)
//! - No locks on the packet path: the batch methods take `&self` and keep no state in the
//!   device, so one task can receive while another sends (share the device in an `Arc`).
//! - Interface names are checked ([`check_ifname`]) before they reach the kernel, `ip` or `nft`,
//!   so a name can never inject a command or rule.
//! - Only Linux is implemented. Elsewhere [`TunDevice::create`] and the route helpers return
//!   [`TunError::Unsupported`]; [`PacketBatch`] works everywhere.

mod batch;
mod device;
mod route;

#[cfg(test)]
mod tests;

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

pub use batch::{DEFAULT_BATCH_SLOTS, MAX_PACKET_LEN, PacketBatch, PushError};
pub use device::{TunDevice, TunStats};
pub use route::{enable_forwarding_and_masquerade, remove_masquerade};

/// The MTU used when the configuration names none: a 1500-byte outer path minus the 80 bytes
/// of IPv6 + UDP + WireGuard overhead, the value WireGuard implementations settle on.
pub const DEFAULT_MTU: u16 = 1420;

/// The smallest MTU accepted: IPv4's minimum datagram every host must accept. IPv6 needs 1280.
pub const MIN_MTU: u16 = 576;

/// The largest MTU accepted: a jumbo frame. Larger inner packets could not cross a real outer
/// path once WireGuard's overhead is added, and it bounds the receive slot size.
pub const MAX_MTU: u16 = 9000;

/// Linux's limit on an interface name, without the terminating NUL (`IFNAMSIZ - 1`).
pub const MAX_IFNAME_LEN: usize = 15;

/// Why a TUN, route or firewall operation failed. Messages say what to do next.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// The interface name cannot be used (Linux allows at most 15 bytes).
    #[error(
        "invalid interface name {name:?}: {reason} (use 1-15 characters from A-Z a-z 0-9 - _ .)"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The MTU is out of range.
    #[error("invalid MTU {mtu}: {reason}")]
    InvalidMtu {
        /// The rejected MTU.
        mtu: u16,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The prefix length does not fit the address family.
    #[error("invalid prefix length /{prefix_len}: the most for this address family is /{max}")]
    InvalidPrefix {
        /// The rejected length.
        prefix_len: u8,
        /// The family's maximum (32 or 128).
        max: u8,
    },
    /// The kernel refused to create the device.
    #[error(
        "cannot create TUN device {name:?}: {source} (this needs root or CAP_NET_ADMIN, \
         /dev/net/tun, and a name no other interface uses)"
    )]
    Create {
        /// The requested name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The device exists but could not be inspected or registered with the runtime.
    #[error("TUN device {name:?}: cannot {what}: {source}")]
    Device {
        /// The interface.
        name: String,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A helper program (`ip`, `nft`) could not be started.
    #[error("cannot run {program}: {source} (install iproute2 and nftables)")]
    Spawn {
        /// The program.
        program: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A helper program ran and failed; its standard error says why.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// The exit status, as the OS reports it.
        status: std::process::ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// A helper program did not finish in time and was killed.
    #[error("`{command}` did not finish within {seconds} s and was killed")]
    Timeout {
        /// The command line.
        command: String,
        /// The limit.
        seconds: u64,
    },
    /// A kernel setting could not be written.
    #[error("cannot write {path}: {source} (this needs root in the network namespace)")]
    Sysctl {
        /// The /proc/sys path.
        path: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// This platform has no implementation yet.
    #[error("{what} is unsupported on this platform yet (only Linux is implemented)")]
    Unsupported {
        /// The operation.
        what: &'static str,
    },
}

/// How to create a TUN interface. Build it with [`TunConfig::new`] and the setters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunConfig {
    name: String,
    mtu: u16,
    ipv4: Option<Ipv4Net>,
    ipv6: Option<Ipv6Net>,
    offload: bool,
}

impl TunConfig {
    /// A configuration for an interface called `name` (checked by [`check_ifname`]), with the
    /// default MTU, no addresses and offload on.
    pub fn new(name: &str) -> Result<Self, TunError> {
        check_ifname(name)?;
        Ok(Self {
            name: name.to_owned(),
            mtu: DEFAULT_MTU,
            ipv4: None,
            ipv6: None,
            offload: true,
        })
    }

    /// Sets the MTU: the largest IP packet the interface passes. It must fit the outer path
    /// after WireGuard's overhead, so it is [`DEFAULT_MTU`] unless the path is known.
    pub fn mtu(mut self, mtu: u16) -> Result<Self, TunError> {
        check_mtu(mtu, self.ipv6.is_some())?;
        self.mtu = mtu;
        Ok(self)
    }

    /// Gives the interface an IPv4 address and prefix length (the tunnel address). The kernel
    /// then routes the prefix to the interface by itself.
    pub fn ipv4(mut self, address: Ipv4Addr, prefix_len: u8) -> Result<Self, TunError> {
        let net = Ipv4Net::new(address, prefix_len).map_err(|_| TunError::InvalidPrefix {
            prefix_len,
            max: 32,
        })?;
        self.ipv4 = Some(net);
        Ok(self)
    }

    /// Gives the interface an IPv6 address and prefix length, for IPv6 resources. IPv6 needs
    /// an MTU of at least 1280.
    pub fn ipv6(mut self, address: Ipv6Addr, prefix_len: u8) -> Result<Self, TunError> {
        check_mtu(self.mtu, true)?;
        let net = Ipv6Net::new(address, prefix_len).map_err(|_| TunError::InvalidPrefix {
            prefix_len,
            max: 128,
        })?;
        self.ipv6 = Some(net);
        Ok(self)
    }

    /// Turns the virtio-net header (GSO/GRO offload) on or off. On by default because it is
    /// what makes the tunnel fast; off is for comparisons and for kernels that misbehave. On
    /// platforms other than Linux it has no effect.
    pub fn offload(mut self, offload: bool) -> Self {
        self.offload = offload;
        self
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The MTU that will be set.
    pub fn get_mtu(&self) -> u16 {
        self.mtu
    }
}

fn check_mtu(mtu: u16, ipv6: bool) -> Result<(), TunError> {
    if mtu < MIN_MTU {
        return Err(TunError::InvalidMtu {
            mtu,
            reason: "below 576, the IPv4 minimum",
        });
    }
    if ipv6 && mtu < 1280 {
        return Err(TunError::InvalidMtu {
            mtu,
            reason: "below 1280, the IPv6 minimum",
        });
    }
    if mtu > MAX_MTU {
        return Err(TunError::InvalidMtu {
            mtu,
            reason: "above 9000 (jumbo frames)",
        });
    }
    Ok(())
}

/// Checks that `name` can be an interface name here and is safe to pass to `ip` and `nft`:
/// 1 to 15 bytes of ASCII letters, digits, `-`, `_` and `.`, not `.` or `..`.
pub fn check_ifname(name: &str) -> Result<(), TunError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_IFNAME_LEN {
        Some("it is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("it is a path component")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("it contains a character other than A-Z a-z 0-9 - _ .")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(TunError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_ifname("wg0").is_ok());
        assert!(check_ifname("wardgate-tun.1").is_ok());
        assert!(check_ifname("abcdefghijklmno").is_ok());
        for bad in [
            "",
            "abcdefghijklmnop",
            ".",
            "..",
            "a b",
            "a\"b",
            "a;b",
            "a/b",
            "tün",
        ] {
            assert!(
                matches!(check_ifname(bad), Err(TunError::InvalidName { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn mtu_and_prefixes_are_checked() {
        let c = TunConfig::new("wg0").expect("name");
        assert_eq!(c.get_mtu(), DEFAULT_MTU);
        assert!(c.clone().mtu(575).is_err());
        assert!(c.clone().mtu(9001).is_err());
        assert!(c.clone().mtu(1280).is_ok());
        assert!(c.clone().ipv4(Ipv4Addr::new(10, 0, 0, 1), 33).is_err());
        let small = c.clone().mtu(1000).expect("mtu");
        assert!(small.clone().ipv6(Ipv6Addr::LOCALHOST, 64).is_err());
        let v6 = c.ipv6(Ipv6Addr::LOCALHOST, 64).expect("v6");
        assert!(v6.mtu(1000).is_err());
    }
}
