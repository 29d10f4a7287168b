//! Code that every Wardgate part shares: the control protocol spoken between controller,
//! gateways and clients, the framing that carries it, the TLS set-up of the QUIC control
//! plane, key material and the helpers that keep secret files private.
//!
//! Nothing here knows about the store or the policy engine, so the client binary can link this
//! crate without linking controller code.

pub mod clock;
pub mod dataplane;
pub mod files;
pub mod frame;
pub mod grant;
pub mod keys;
pub mod netstack;
pub mod packet;
pub mod pki;
pub mod posture;
pub mod proto;
pub mod rule;
pub mod signal;
pub mod tls;
pub mod transport;
pub mod tun;

/// The version of this software, reported in hellos and `status` output.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Milliseconds since the Unix epoch, the one wall-clock representation used on the wire and in
/// the store (time zones are a presentation concern).
pub fn unix_ms(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}
