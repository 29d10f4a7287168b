//! The standard WireGuard export (issue 7, opt-in per policy): an administrator hands a vendor
//! whose device cannot run the Wardgate client a grant as an ordinary `wg-quick`
//! configuration. The grant goes through the same policy administrator path as any other
//! (audit rows with the grant, pushed to the gateways and acked), and the gateway removes the
//! peer at its end by its own clock.
//!
//! What is given up, and therefore written down: no login session and no posture report stand
//! behind such a grant (audited as `"posture": "none"`). The grant belongs to a stand-in device
//! of the user (`os = wireguard-export`, no certificate, so it can never open a control
//! connection); re-evaluation re-checks it with [`CompiledPolicies::decide_export`] instead of
//! the ordinary rules.
//!
//! Keys: the vendor should make the key pair and give only the public key (`--public-key`),
//! so the private key never leaves their machine. If the controller makes it, the private key
//! is in the answer once and is never stored or logged.

use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};
use wardgate_common::keys;
use wardgate_common::proto::{ErrorCode, Secret, WireError};

use crate::access::{EXPORT_DEVICE_OS, Issue};
use crate::policy::{CompiledPolicies, ExportDecision};
use crate::service::Controller;
use crate::store::{Device, DeviceStatus};

fn internal(e: impl std::fmt::Display) -> WireError {
    warn!(error = %e, "internal error in the WireGuard export");
    WireError::new(
        ErrorCode::Internal,
        "the controller hit an internal error; it has been logged there, try again later",
    )
}

/// What the administrator asked for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportRequest {
    /// The user (the vendor's account) the grant is for.
    pub user: String,
    /// The resource.
    pub resource: String,
    /// When access ends at the latest (ms since the epoch); the policy may end it sooner.
    pub until_ms: i64,
    /// The vendor's WireGuard public key (base64). Without it the controller makes a key
    /// pair and returns the private key once.
    #[serde(default)]
    pub public_key: Option<String>,
}

/// The answer: the configuration, shown once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportAnswer {
    /// The grant.
    pub grant_id: i64,
    /// The stand-in device it belongs to.
    pub device_id: String,
    /// When the gateway drops the peer (ms).
    pub expires_ms: i64,
    /// A standard WireGuard configuration. With `public_key` given, `PrivateKey` is a
    /// placeholder for the vendor to fill in.
    pub config: Secret,
    /// Whether the controller made the key (and the config holds the private key).
    pub controller_made_key: bool,
}

fn now_ms() -> i64 {
    wardgate_common::clock::now_ms()
}

/// Renders the `wg-quick` configuration.
pub fn render_config(
    private_key: Option<&str>,
    address: &str,
    gateway_public_key: &str,
    preshared_key: &str,
    endpoint: &str,
    allowed_ips: &[String],
) -> String {
    format!(
        "[Interface]\nPrivateKey = {}\nAddress = {address}/32\n\n[Peer]\nPublicKey = {gateway_public_key}\nPresharedKey = {preshared_key}\nEndpoint = {endpoint}\nAllowedIPs = {}\nPersistentKeepalive = 25\n",
        private_key.unwrap_or("<the private key of the public key you gave>"),
        allowed_ips.join(", ")
    )
}

impl Controller {
    /// The stand-in device of `user_id` for exported grants, made on first use.
    async fn export_device(&self, user_id: &str, now: i64) -> Result<Device, WireError> {
        if let Some(d) = self
            .store
            .list_devices()
            .await
            .map_err(internal)?
            .into_iter()
            .find(|d| {
                d.owner_user_id == user_id
                    && d.os == EXPORT_DEVICE_OS
                    && d.status == DeviceStatus::Approved
            })
        {
            return Ok(d);
        }
        let id = format!("dev_wg{}", hex::encode(rand::random::<[u8; 8]>()));
        let d = Device {
            id: id.clone(),
            name: "WireGuard export (no Wardgate client)".into(),
            owner_user_id: user_id.to_owned(),
            status: DeviceStatus::Approved,
            csr_pem: String::new(),
            cert_pem: None,
            cert_fingerprint: None,
            // Nothing polls with it; random so the unique index holds.
            poll_token_hash: hex::encode(rand::random::<[u8; 32]>()),
            os: EXPORT_DEVICE_OS.into(),
            hostname: "-".into(),
            created_ms: now,
            decided_ms: Some(now),
            tunnel_addr: None,
        };
        self.store.insert_device(&d).await.map_err(internal)?;
        Ok(d)
    }

    /// Issues an exported grant (see the module docs). `actor` is the administrator.
    pub async fn export_wireguard(
        &self,
        actor: &str,
        req: &ExportRequest,
    ) -> Result<ExportAnswer, WireError> {
        let now = now_ms();
        let user = self
            .store
            .user_by_username(&req.user)
            .await
            .map_err(internal)?
            .ok_or_else(|| {
                WireError::new(ErrorCode::NotFound, format!("no user named {}", req.user))
            })?;
        let (private, public) = match &req.public_key {
            Some(k) => {
                if keys::decode_public(k).is_err() {
                    return Err(WireError::new(
                        ErrorCode::BadRequest,
                        "--public-key is not a WireGuard public key (base64 of 32 bytes)",
                    ));
                }
                (None, k.clone())
            }
            None => {
                let k = keys::generate_private();
                let public = keys::public_of(&k);
                (Some(keys::encode_key(&k.to_bytes())), public)
            }
        };
        let groups = self
            .store
            .groups_of_user(&user.id)
            .await
            .map_err(internal)?;
        let policies: std::sync::Arc<CompiledPolicies> = self.policies.get(self).await?;
        let at =
            |ms: i64| jiff::Timestamp::from_millisecond(ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        // A vendor's contract bounds an exported grant as it bounds every other one.
        let contract = self
            .store
            .vendor_of_user(&user.id)
            .await
            .map_err(internal)?
            .as_ref()
            .map(crate::requests::contract_facts);
        let decision = match &contract {
            Some(v) if at(now) >= v.ends_at => ExportDecision::Deny {
                reasons: vec![crate::policy::DenyReason::ContractEnded {
                    vendor: v.vendor.clone(),
                    contract_ref: v.contract_ref.clone(),
                    end_date: v.end_date.clone(),
                }],
            },
            _ => policies.decide_export(
                &req.resource,
                &groups,
                user.disabled,
                contract
                    .as_ref()
                    .map_or(at(req.until_ms), |v| at(req.until_ms).min(v.ends_at)),
                at(now),
            ),
        };
        let (policy, expires_at) = match decision {
            ExportDecision::Deny { reasons } => {
                let words: Vec<String> = reasons.iter().map(ToString::to_string).collect();
                self.audit(actor, "access.export", &req.resource, "deny",
                    json!({"user": req.user, "until_ms": req.until_ms, "reasons": words,
                           "codes": reasons.iter().map(|r| r.code()).collect::<Vec<_>>(), "posture": "none"}))
                    .await
                    .map_err(internal)?;
                return Err(WireError::with_details(
                    ErrorCode::AccessDenied,
                    format!(
                        "a WireGuard export of {} for {} is refused",
                        req.resource, req.user
                    ),
                    words,
                ));
            }
            ExportDecision::Allow { policy, expires_at } => (policy, expires_at),
        };
        let device = self.export_device(&user.id, now).await?;
        let (grant, cg) = self
            .issue(
                &policies,
                Issue {
                    device_id: &device.id,
                    user: &user,
                    resource: &req.resource,
                    policy: policy.to_string(),
                    wg_public_key: &public,
                    expires_ms: expires_at.as_millisecond(),
                    renews: None,
                    actor: actor.to_owned(),
                    decide_action: "access.export",
                    decide_detail: json!({"user": req.user, "device": device.id, "policy": policy.to_string(),
                        "until_ms": req.until_ms, "expires_ms": expires_at.as_millisecond(),
                        "posture": "none", "session": "none", "key_made_by": if private.is_some() { "controller" } else { "vendor" }}),
                    break_glass: None,
                    renewable: false,
                },
                now,
            )
            .await?;
        let allowed: Vec<String> = policies
            .resource(&req.resource)
            .map(|r| r.addresses.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        let config = render_config(
            private.as_deref(),
            &cg.tunnel_addr.to_string(),
            &cg.gateway_public_key,
            cg.preshared_key.expose(),
            &cg.gateway_endpoint.to_string(),
            &allowed,
        );
        self.notify_by(
            actor,
            crate::notify::kind::WIREGUARD_EXPORT,
            &req.resource,
            json!({"grant": grant.id, "user": req.user, "resource": req.resource, "expires_ms": grant.expires_ms, "posture": "none"}),
        );
        info!(grant = grant.id, user = %req.user, resource = %req.resource, "grant exported as a WireGuard configuration");
        Ok(ExportAnswer {
            grant_id: grant.id,
            device_id: device.id,
            expires_ms: grant.expires_ms,
            config: Secret::new(config),
            controller_made_key: private.is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_is_standard_wg_quick() {
        let c = render_config(
            None,
            "100.64.0.9",
            "GW=",
            "PSK=",
            "203.0.113.5:51820",
            &["10.20.5.5/32".into()],
        );
        assert!(c.starts_with("[Interface]\nPrivateKey = <"), "{c}");
        assert!(c.contains("Address = 100.64.0.9/32\n"));
        assert!(c.contains("[Peer]\nPublicKey = GW=\nPresharedKey = PSK=\nEndpoint = 203.0.113.5:51820\nAllowedIPs = 10.20.5.5/32\n"));
    }
}
