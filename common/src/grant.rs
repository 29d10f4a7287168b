//! A grant as each end of the tunnel needs it. The controller makes one per (device,
//! resource, login session); the gateway gets [`GatewayGrant`] (who may send what, until
//! when), the client gets [`ClientGrant`] (where the gateway is, what it may reach). The
//! client's private key for a grant never appears here: it is made on the client.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::proto::Secret;
use crate::rule::Rule;

/// The gateway's view of a grant: one WireGuard peer plus its filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayGrant {
    /// Numeric id, unique per controller; names the peer in the engine and the filter.
    pub grant_id: u64,
    /// The client's WireGuard public key for this grant (base64).
    pub client_public_key: String,
    /// The per-grant preshared key (base64).
    pub preshared_key: Secret,
    /// The only source address the client may use inside the tunnel.
    pub tunnel_addr: IpAddr,
    /// What the client may open.
    pub rules: Vec<Rule>,
    /// Wall-clock expiry (ms since the Unix epoch); the gateway turns it into a deadline on its
    /// own monotonic clock when the grant arrives, and enforces it without the controller.
    pub expires_at_ms: i64,
    /// Who and what, for logs and counters: e.g. `amara@laptop-7 → ehr-web`.
    pub label: String,
}

/// The client's view of a grant: how to reach the gateway and what goes through it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientGrant {
    /// The grant's id.
    pub grant_id: u64,
    /// The resource's name, for the user.
    pub resource: String,
    /// The gateway's WireGuard public key (base64).
    pub gateway_public_key: String,
    /// The gateway's WireGuard endpoint.
    pub gateway_endpoint: SocketAddr,
    /// The per-grant preshared key (base64).
    pub preshared_key: Secret,
    /// This device's address inside the tunnel.
    pub tunnel_addr: IpAddr,
    /// What this grant reaches; packets matching no grant's rules are dropped on the client.
    pub rules: Vec<Rule>,
    /// Wall-clock expiry (ms since the Unix epoch).
    pub expires_at_ms: i64,
    /// Whether asking again can extend it. `false` when the end is fixed (an approved access
    /// window, a schedule, a vendor contract): the client then lets it run out rather than
    /// renewing into the same end again and again.
    #[serde(default = "renewable_by_default")]
    pub renewable: bool,
}

fn renewable_by_default() -> bool {
    true
}

/// Turns a wall-clock expiry into a deadline on the local monotonic clock, so later wall-clock
/// jumps (NTP, an attacker with the date) do not extend a grant. Already past → `now`.
pub fn deadline(expires_at_ms: i64, now_ms: i64, now: std::time::Instant) -> std::time::Instant {
    let left = u64::try_from(expires_at_ms.saturating_sub(now_ms)).unwrap_or(0);
    now + std::time::Duration::from_millis(left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn deadlines_follow_the_monotonic_clock() {
        let now = Instant::now();
        assert_eq!(
            deadline(10_500, 10_000, now),
            now + Duration::from_millis(500)
        );
        assert_eq!(deadline(9_000, 10_000, now), now);
        let g: GatewayGrant = serde_json::from_str(
            r#"{"grant_id":7,"client_public_key":"k","preshared_key":"p","tunnel_addr":"100.64.0.2",
                "rules":[{"dst":"10.10.1.10/32","proto":"tcp","ports":"443"}],"expires_at_ms":5,"label":"x"}"#,
        )
        .expect("parse");
        assert!(
            !format!("{g:?}").contains("\"p\""),
            "the PSK must not show in Debug"
        );
    }
}
