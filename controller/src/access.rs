//! The policy administrator (NIST SP 800-207 "PA"): turns the policy engine's decisions into
//! grants and keeps the gateways in step.
//!
//! - **Issue** ([`Access::connect`]): gather the facts, ask the engine, and on allow: audit,
//!   store the grant, push the peer to every gateway serving the resource and wait for their
//!   acks. Any gateway offline or silent → the peers already pushed are removed, the grant is
//!   deleted, the client gets a clear error: no half-made grant is left behind. The audit row is
//!   written before the grant row, so no grant ever exists without its audit row; the grant row
//!   is written before any push, so no gateway ever holds a peer the store does not know (a
//!   crash in between is healed by the gateway's resync).
//! - **Resync** ([`Access::gateway_grants`]): a (re)connecting gateway gets the full list.
//! - **End** ([`Access::end_grants`]): revocation, device or user changes, policy changes and
//!   expiry end grants in the store, remove the peers from the gateways, and tell the device why.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};
use wardgate_common::grant::{ClientGrant, GatewayGrant};
use wardgate_common::keys;
use wardgate_common::proto::{ErrorCode, Push, Secret, ServerMsg, WireError};
use wardgate_common::rule::Rule;

use crate::policy::{
    AccessRequest, BreakGlassDecision, CompiledPolicies, Decision, Facts, PolicySet, Session,
};
use crate::service::Controller;
use crate::store::{
    DocKind, Grant, GrantStatus, NewAuditEvent, NewBreakGlass, NewGrant, StoreError,
};

/// The pool device tunnel addresses come from; the first host is the gateways' own.
pub const TUNNEL_POOL: &str = "100.64.0.0/10";
/// The `os` of the stand-in device a WireGuard export's grant belongs to: it marks grants
/// that have no client behind them (no session, no posture).
pub const EXPORT_DEVICE_OS: &str = "wireguard-export";
/// The shortest grant worth issuing: less would expire on its way to the gateways.
const MIN_GRANT_MS: i64 = 2_000;
/// How long a gateway may take to confirm a pushed change.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// A decided grant, for [`Controller::issue`].
pub(crate) struct Issue<'a> {
    pub(crate) device_id: &'a str,
    pub(crate) user: &'a crate::store::User,
    pub(crate) resource: &'a str,
    pub(crate) policy: String,
    pub(crate) wg_public_key: &'a str,
    pub(crate) expires_ms: i64,
    pub(crate) renews: Option<u64>,
    pub(crate) actor: String,
    /// The decision's audit action (`access.decide`, `access.break_glass`, `access.export`).
    pub(crate) decide_action: &'static str,
    pub(crate) decide_detail: serde_json::Value,
    pub(crate) break_glass: Option<crate::store::NewBreakGlass>,
    /// Whether asking again can extend the grant (see [`ClientGrant::renewable`]).
    pub(crate) renewable: bool,
}

/// The controller's side of one live control connection: a queue of frames to write and the
/// pushes waiting for their acks.
pub struct PeerLink {
    tx: mpsc::Sender<ServerMsg>,
    acks: Mutex<HashMap<u64, oneshot::Sender<Result<(), String>>>>,
    next: AtomicU64,
}

impl PeerLink {
    /// A link whose frames go to `tx` (drained by the connection's task).
    pub fn new(tx: mpsc::Sender<ServerMsg>) -> Self {
        Self {
            tx,
            acks: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    /// Sends a push and waits for the peer's ack.
    pub async fn push(&self, push: Push, timeout: Duration) -> Result<(), String> {
        let push_id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut m) = self.acks.lock() {
            m.insert(push_id, tx);
        }
        if self
            .tx
            .send(ServerMsg::Push { push_id, push })
            .await
            .is_err()
        {
            return Err("the peer disconnected".into());
        }
        let out = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the peer disconnected".into()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        };
        if let Ok(mut m) = self.acks.lock() {
            m.remove(&push_id);
        }
        out
    }

    /// Sends a push without waiting (the device may be gone; the gateway is what enforces).
    pub fn notify(&self, push: Push) {
        let push_id = self.next.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.try_send(ServerMsg::Push { push_id, push });
    }

    /// An ack arrived.
    pub fn complete(&self, push_id: u64, result: Result<(), String>) {
        if let Some(w) = self.acks.lock().ok().and_then(|mut m| m.remove(&push_id)) {
            let _ = w.send(result);
        }
    }
}

fn now_ms() -> i64 {
    wardgate_common::clock::now_ms()
}

fn ts(ms: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_millisecond(ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

fn internal(e: impl std::fmt::Display) -> WireError {
    warn!(error = %e, "internal error in the policy administrator");
    WireError::new(
        ErrorCode::Internal,
        "the controller hit an internal error; it has been logged there, try again later",
    )
}

/// Compiled policies, rebuilt when the store's policy version changes (also by another
/// replica).
#[derive(Default)]
pub struct PolicyCache {
    cached: Mutex<Option<(i64, Arc<CompiledPolicies>)>>,
}

/// Loads every policy document and builds the set the engine compiles.
pub async fn load_policy_set(ctl: &Controller) -> Result<PolicySet, StoreError> {
    let mut set = PolicySet::default();
    for g in ctl.store.list_groups().await? {
        set.groups.insert(g.name);
    }
    for g in ctl.store.list_gateways().await? {
        set.gateways.insert(g.name);
    }
    let parse = |kind: &str, name: &str, e: serde_json::Error| StoreError::Corrupt {
        what: format!("{kind} {name}: {e}"),
    };
    for (name, spec) in ctl.store.list_documents(DocKind::Resource).await? {
        set.resources
            .push(serde_json::from_str(&spec).map_err(|e| parse("resource", &name, e))?);
    }
    for (name, spec) in ctl.store.list_documents(DocKind::PostureProfile).await? {
        set.posture_profiles
            .push(serde_json::from_str(&spec).map_err(|e| parse("posture profile", &name, e))?);
    }
    for (name, spec) in ctl.store.list_documents(DocKind::Policy).await? {
        set.policies
            .push(serde_json::from_str(&spec).map_err(|e| parse("policy", &name, e))?);
    }
    Ok(set)
}

impl PolicyCache {
    /// The current compiled policies.
    pub async fn get(&self, ctl: &Controller) -> Result<Arc<CompiledPolicies>, WireError> {
        let version = ctl.store.policy_version().await.map_err(internal)?;
        if let Some((v, c)) = self.cached.lock().ok().and_then(|g| g.clone())
            && v == version
        {
            return Ok(c);
        }
        let set = load_policy_set(ctl).await.map_err(internal)?;
        let compiled = CompiledPolicies::new(&set).map_err(|errs| {
            internal(format!(
                "stored policies do not validate: {}",
                errs.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        })?;
        let compiled = Arc::new(compiled);
        if let Ok(mut g) = self.cached.lock() {
            *g = Some((version, compiled.clone()));
        }
        Ok(compiled)
    }
}

/// Gathers the facts the engine decides on for `device_id` now, from the device, its owner
/// and the device's live login session (groups and MFA as that login established them; the
/// session's end bounds every grant), the user's approved access windows on this device and
/// their vendor's contract. No live session → `LoginRequired`.
pub async fn facts_for(
    ctl: &Controller,
    device_id: &str,
    now: i64,
) -> Result<(crate::store::User, Facts), WireError> {
    let device = ctl
        .store
        .device_by_id(device_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| WireError::new(ErrorCode::DeviceRevoked, "this device is not known"))?;
    let user = ctl
        .store
        .user_by_id(&device.owner_user_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            WireError::new(
                ErrorCode::UserDisabled,
                "the account of this device is gone",
            )
        })?;
    let session = ctl.live_session(device_id, now).await?;
    let groups = match &session.groups {
        Some(g) => g.clone(),
        None => ctl.store.groups_of_user(&user.id).await.map_err(internal)?,
    };
    // The request itself is use, so the idle end counts from now.
    let ends = session
        .expires_ms
        .min(now.saturating_add(session.idle_timeout_ms));
    let posture = crate::posture::latest_report(ctl, device_id)
        .await
        .map_err(internal)?;
    let facts = Facts {
        groups,
        mfa: session.mfa,
        session: Session {
            started_at: ts(session.created_ms),
            expires_at: Some(ts(ends)),
        },
        device: device.status,
        user_disabled: user.disabled,
        posture,
        approvals: crate::requests::approved_facts(
            &ctl.store
                .approved_windows(&user.id, device_id, now)
                .await
                .map_err(internal)?,
        ),
        vendor: ctl
            .store
            .vendor_of_user(&user.id)
            .await
            .map_err(internal)?
            .as_ref()
            .map(crate::requests::contract_facts),
    };
    Ok((user, facts))
}

fn to_gateway_grant(g: &Grant, label: String) -> Result<GatewayGrant, WireError> {
    let rules: Vec<Rule> = serde_json::from_str(&g.rules_json).map_err(internal)?;
    Ok(GatewayGrant {
        grant_id: g.wire_id(),
        client_public_key: g.client_public_key.clone(),
        preshared_key: g.preshared_key.clone(),
        tunnel_addr: g.tunnel_addr.parse().map_err(internal)?,
        rules,
        expires_at_ms: g.expires_ms,
        label,
    })
}

/// How stale a session's last-use time may get before a grant moves it (see `connect`).
const SESSION_TOUCH_GRANULARITY_MS: i64 = 1_000;

impl Controller {
    /// A device asks for `resource` with a fresh key: decide, then issue (see module docs).
    pub async fn connect(
        &self,
        device_id: &str,
        resource: &str,
        wg_public_key: &str,
        renews: Option<u64>,
    ) -> Result<ClientGrant, WireError> {
        let now = now_ms();
        if keys::decode_public(wg_public_key).is_err() {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "wg_public_key is not a WireGuard public key",
            ));
        }
        let (user, facts) = facts_for(self, device_id, now).await?;
        let policies = self.policies.get(self).await?;
        let request = AccessRequest {
            user: user.username.clone(),
            device_id: device_id.to_owned(),
            resource: resource.to_owned(),
        };
        let decision = policies.decide(&request, &facts, ts(now));
        let actor = format!("user:{}", user.username);
        let expires_at = match &decision {
            Decision::Deny {
                reasons,
                closest_policy,
            } => {
                let words: Vec<String> = reasons.iter().map(ToString::to_string).collect();
                self.audit(
                    &actor,
                    "access.decide",
                    resource,
                    "deny",
                    json!({"device": device_id, "reasons": words, "codes": reasons.iter().map(|r| r.code()).collect::<Vec<_>>(),
                           "closest_policy": closest_policy, "facts": facts}),
                )
                .await
                .map_err(internal)?;
                info!(user = %user.username, device = %device_id, resource, "access denied");
                return Err(WireError::with_details(
                    ErrorCode::AccessDenied,
                    format!("access to {resource} denied"),
                    words,
                ));
            }
            Decision::Allow { expires_at, .. } => *expires_at,
        };
        let Decision::Allow { policy, bounds, .. } = &decision else {
            return Err(internal("unreachable decision"));
        };
        // A grant that would end before it reaches the gateways is no grant: when the login
        // session is what ends it, say so instead of failing at the gateway.
        if expires_at.as_millisecond() - now < MIN_GRANT_MS
            && bounds.session_end.as_millisecond() <= expires_at.as_millisecond()
        {
            return Err(crate::login::login_required(
                "your login session is about to end",
            ));
        }
        let (grant, client_grant) = self
            .issue(
                &policies,
                Issue {
                    device_id,
                    user: &user,
                    resource,
                    policy: policy.to_string(),
                    wg_public_key,
                    expires_ms: expires_at.as_millisecond(),
                    renews,
                    actor: actor.clone(),
                    decide_action: "access.decide",
                    decide_detail: json!({"device": device_id, "policy": policy.to_string(), "expires_ms": expires_at.as_millisecond(), "facts": facts}),
                    break_glass: None,
                    renewable: bounds.renewable(),
                },
                now,
            )
            .await?;
        if let Some(old) = renews.and_then(Grant::id_from_wire)
            && let Ok(Some(prev)) = self.store.grant_by_id(old).await
            && prev.device_id == device_id
        {
            self.end_grants(vec![prev], "renewed", &actor, false).await;
        }
        if let Ok(Some(sess)) = self.store.latest_session_for_device(device_id).await
            && now - sess.last_used_ms >= SESSION_TOUCH_GRANULARITY_MS
        {
            // A grant is use: the idle clock starts again. Idle timeouts are minutes long, so
            // the clock is moved at most once a second: a burst of grants costs one write,
            // not one each (every SQLite write waits for the single writer).
            let _ = self.store.touch_session(&sess.id, now).await;
        }
        info!(grant = grant.id, user = %user.username, device = %device_id, resource, "grant issued");
        Ok(client_grant)
    }

    /// Issues a grant the caller has decided on: grant row, audit rows (the decision under
    /// `i.decide_action`, then `grant.issue`) and, for break-glass, the review-queue row in
    /// one transaction; then the peer pushed to every serving gateway and their acks awaited
    /// (rolled back on any failure). Shared by connect, break-glass and the WireGuard export,
    /// so all three leave the same trail and the same guarantees.
    pub(crate) async fn issue(
        &self,
        policies: &CompiledPolicies,
        i: Issue<'_>,
        now: i64,
    ) -> Result<(Grant, ClientGrant), WireError> {
        let Issue {
            device_id,
            user,
            resource,
            policy,
            wg_public_key,
            expires_ms,
            renews,
            actor,
            decide_action,
            decide_detail,
            break_glass,
            renewable,
        } = i;
        let res = policies
            .resource(resource)
            .ok_or_else(|| {
                WireError::new(ErrorCode::NotFound, format!("no resource named {resource}"))
            })?
            .clone();
        let all_gateways = self.store.list_gateways().await.map_err(internal)?;
        let gateways: Vec<_> = all_gateways
            .iter()
            .filter(|g| {
                res.gateways.contains(&g.name) && g.status == crate::store::GatewayStatus::Active
            })
            .collect();
        let Some(first_gw) = gateways.first() else {
            return Err(WireError::new(
                ErrorCode::GatewayUnavailable,
                format!("no active gateway serves {resource}; ask an administrator"),
            ));
        };
        let pool: ipnet::Ipv4Net = TUNNEL_POOL.parse().map_err(internal)?;
        let tunnel = self
            .store
            .assign_tunnel_addr(device_id, pool, &[])
            .await
            .map_err(internal)?;
        let psk = keys::encode_key(&keys::generate_private().to_bytes());
        let new = NewGrant {
            device_id: device_id.to_owned(),
            user_id: user.id.clone(),
            resource: resource.to_owned(),
            policy,
            client_public_key: wg_public_key.to_owned(),
            preshared_key: Secret::new(psk.clone()),
            tunnel_addr: tunnel.to_string(),
            rules_json: serde_json::to_string(&res.rules).map_err(internal)?,
            gateway_ids: gateways.iter().map(|g| g.id.clone()).collect(),
            issued_ms: now,
            expires_ms,
            renewed_from: renews.and_then(Grant::id_from_wire),
        };
        // The decision, the grant and its issue event commit together: no grant row ever
        // exists without its audit rows, and a crash before the commit leaves neither (and,
        // since nothing is pushed before the commit, no peer at any gateway either).
        let at_ms = now_ms();
        let decide_event = NewAuditEvent {
            at_ms,
            actor: actor.clone(),
            action: decide_action.into(),
            target: resource.to_owned(),
            outcome: "allow".into(),
            detail: decide_detail,
        };
        let issue_detail = json!({"device": device_id, "resource": resource, "policy": new.policy, "tunnel_addr": new.tunnel_addr,
                   "expires_ms": new.expires_ms, "gateways": new.gateway_ids, "renews": renews, "via": decide_action});
        let grant = self
            .store
            .insert_grant_with(
                &new,
                |id| {
                    vec![
                        decide_event.clone(),
                        NewAuditEvent {
                            at_ms,
                            actor: actor.clone(),
                            action: "grant.issue".into(),
                            target: id.to_string(),
                            outcome: "ok".into(),
                            detail: issue_detail.clone(),
                        },
                    ]
                },
                break_glass.as_ref(),
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict { .. } => WireError::new(
                    ErrorCode::BadRequest,
                    "this WireGuard key was used before; make a fresh one",
                ),
                other => internal(other),
            })?;
        let label = format!("{}@{} → {}", user.username, device_id, resource);
        let gw_grant = to_gateway_grant(&grant, label)?;
        // Push to every gateway at once; all must confirm.
        let mut pushed = Vec::new();
        let mut failure = None;
        let mut set = tokio::task::JoinSet::new();
        for g in &gateways {
            let link = self.registry.link(&format!("gateway:{}", g.id));
            let push = Push::AddGrant(gw_grant.clone());
            let (id, name) = (g.id.clone(), g.name.clone());
            set.spawn(async move {
                let r = match link {
                    Some(l) => l.push(push, ACK_TIMEOUT).await,
                    None => Err("the gateway is not connected".to_owned()),
                };
                (id, name, r)
            });
        }
        while let Some(done) = set.join_next().await {
            match done {
                Ok((id, _, Ok(()))) => pushed.push(id),
                Ok((_, name, Err(e))) => failure = Some(format!("gateway {name}: {e}")),
                Err(e) => failure = Some(format!("push task failed: {e}")),
            }
        }
        if let Some(why) = failure {
            // Take the peer back from every gateway, also the one that failed: its ack may
            // have been lost after it installed the peer. The grant is ended, not deleted, so
            // a gateway that misses this removal drops the peer at its next resync.
            let mut set = tokio::task::JoinSet::new();
            for g in &gateways {
                let link = self.registry.link(&format!("gateway:{}", g.id));
                let push = Push::RemoveGrant {
                    grant_id: grant.wire_id(),
                    reason: "issuance rolled back".into(),
                };
                set.spawn(async move {
                    if let Some(l) = link {
                        let _ = l.push(push, ACK_TIMEOUT).await;
                    }
                });
            }
            while set.join_next().await.is_some() {}
            self.store
                .end_grant(grant.id, "issuance rolled back", now_ms())
                .await
                .map_err(internal)?;
            self.audit(
                &actor,
                "grant.rollback",
                &grant.id.to_string(),
                "error",
                json!({"reason": why, "pushed_to": pushed}),
            )
            .await
            .map_err(internal)?;
            return Err(WireError::new(
                ErrorCode::GatewayUnavailable,
                format!("{why}; nothing was granted, try again shortly"),
            ));
        }
        let client_grant = ClientGrant {
            grant_id: grant.wire_id(),
            resource: resource.to_owned(),
            gateway_public_key: first_gw.wg_public_key.clone(),
            gateway_endpoint: resolve_endpoint(&first_gw.endpoint).await?,
            preshared_key: Secret::new(psk),
            tunnel_addr: std::net::IpAddr::V4(tunnel),
            rules: serde_json::from_str(&grant.rules_json).map_err(internal)?,
            expires_at_ms: grant.expires_ms,
            renewable,
        };
        Ok((grant, client_grant))
    }

    /// Break-glass (issue 7): emergency access to `resource` at once, for at most the
    /// break-glass policy's cap, skipping windows and posture but not identity: the device's
    /// live session must be multi-factor and a reason must be given. Every attempt is audited
    /// as `access.break_glass` (allow or deny, with the reasons and facts); an allowed one
    /// commits its review-queue row with the grant and alerts the webhook sinks.
    pub async fn break_glass(
        &self,
        device_id: &str,
        resource: &str,
        reason: &str,
        wg_public_key: &str,
    ) -> Result<ClientGrant, WireError> {
        let now = now_ms();
        if keys::decode_public(wg_public_key).is_err() {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "wg_public_key is not a WireGuard public key",
            ));
        }
        // The reason goes into the audit row either way: bound what is stored of it.
        let reason_kept: String = reason
            .chars()
            .take(crate::policy::MAX_REASON_LEN + 1)
            .collect();
        let (user, facts) = match facts_for(self, device_id, now).await {
            Ok(f) => f,
            Err(e) => {
                let actor = format!("device:{device_id}");
                self.audit(&actor, "access.break_glass", resource, "deny",
                    json!({"device": device_id, "reason": reason_kept, "reasons": [e.message.clone()], "codes": [e.code]}))
                    .await
                    .map_err(internal)?;
                return Err(e);
            }
        };
        let policies = self.policies.get(self).await?;
        let request = AccessRequest {
            user: user.username.clone(),
            device_id: device_id.to_owned(),
            resource: resource.to_owned(),
        };
        let actor = format!("user:{}", user.username);
        let decision = policies.decide_break_glass(&request, &facts, reason, ts(now));
        let (policy, expires_at, cap, limited_by, reason) = match decision {
            BreakGlassDecision::Deny { reasons } => {
                let words: Vec<String> = reasons.iter().map(ToString::to_string).collect();
                self.audit(&actor, "access.break_glass", resource, "deny",
                    json!({"device": device_id, "reason": reason_kept, "reasons": words,
                           "codes": reasons.iter().map(|r| r.code()).collect::<Vec<_>>(), "facts": facts}))
                    .await
                    .map_err(internal)?;
                info!(user = %user.username, device = %device_id, resource, "break-glass refused");
                return Err(WireError::with_details(
                    ErrorCode::AccessDenied,
                    format!("break-glass for {resource} refused"),
                    words,
                ));
            }
            BreakGlassDecision::Allow {
                policy,
                expires_at,
                cap,
                limited_by,
                reason,
            } => (policy, expires_at, cap, limited_by, reason),
        };
        if expires_at.as_millisecond() - now < MIN_GRANT_MS {
            return Err(crate::login::login_required(
                "your login session is about to end",
            ));
        }
        let bg_id = format!("bg_{}", hex::encode(rand::random::<[u8; 6]>()));
        let cap_text = humantime::format_duration(cap.unsigned_abs()).to_string();
        let (grant, client_grant) = self
            .issue(
                &policies,
                Issue {
                    device_id,
                    user: &user,
                    resource,
                    policy: policy.to_string(),
                    wg_public_key,
                    expires_ms: expires_at.as_millisecond(),
                    renews: None,
                    actor: actor.clone(),
                    decide_action: "access.break_glass",
                    decide_detail: json!({"device": device_id, "policy": policy.to_string(), "reason": reason,
                        "cap": cap_text, "limited_by": limited_by, "expires_ms": expires_at.as_millisecond(),
                        "review": bg_id, "review_required": true, "facts": facts}),
                    break_glass: Some(NewBreakGlass { id: bg_id.clone(), reason: reason.clone() }),
                    // Never renewed beyond the cap: the client breaks glass again if need be.
                    renewable: false,
                },
                now,
            )
            .await?;
        if let Ok(Some(sess)) = self.store.latest_session_for_device(device_id).await
            && now - sess.last_used_ms >= SESSION_TOUCH_GRANULARITY_MS
        {
            let _ = self.store.touch_session(&sess.id, now).await;
        }
        self.notify_by(
            &actor,
            crate::notify::kind::BREAK_GLASS,
            resource,
            json!({"review": bg_id, "grant": grant.id, "user": user.username, "device": device_id,
                   "resource": resource, "reason": reason, "policy": policy.to_string(),
                   "cap": cap_text, "expires_ms": grant.expires_ms}),
        );
        warn!(grant = grant.id, user = %user.username, device = %device_id, resource, review = %bg_id, "BREAK-GLASS access granted");
        Ok(client_grant)
    }

    /// Records what a gateway's filter dropped: one audit row per grant and reason, naming
    /// the user, device and resource behind the grant, so an auditor sees who tried what.
    pub async fn report_drops(
        &self,
        gateway: &crate::store::Gateway,
        drops: Vec<wardgate_common::proto::DropCount>,
    ) -> Result<(), WireError> {
        if drops.len() > wardgate_common::proto::MAX_DROP_ROWS {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "a drop report carries at most {} rows; send the rest next time",
                    wardgate_common::proto::MAX_DROP_ROWS
                ),
            ));
        }
        let actor = format!("gateway:{}", gateway.name);
        for d in drops {
            let grant = match d.grant_id.and_then(Grant::id_from_wire) {
                Some(id) => self.store.grant_by_id(id).await.map_err(internal)?,
                None => None,
            };
            let (target, detail) = match &grant {
                Some(g) => {
                    let user = self
                        .store
                        .user_by_id(&g.user_id)
                        .await
                        .map_err(internal)?
                        .map(|u| u.username)
                        .unwrap_or_else(|| g.user_id.clone());
                    (
                        g.id.to_string(),
                        json!({"grant": g.id, "user": user, "device": g.device_id, "resource": g.resource,
                               "reason": d.reason, "packets": d.count, "gateway": gateway.name}),
                    )
                }
                None => (
                    format!("gateway:{}", gateway.name),
                    json!({"grant": d.grant_id, "reason": d.reason, "packets": d.count, "gateway": gateway.name}),
                ),
            };
            warn!(gateway = %gateway.name, grant = ?d.grant_id, reason = %d.reason, packets = d.count, "gateway dropped packets");
            self.audit(&actor, "dataplane.drop", &target, "deny", detail)
                .await
                .map_err(internal)?;
        }
        Ok(())
    }

    /// Every live grant a gateway must enforce (its resync).
    pub async fn gateway_grants(&self, gateway_id: &str) -> Result<Vec<GatewayGrant>, WireError> {
        let grants = self
            .store
            .active_grants_for_gateway(gateway_id, now_ms())
            .await
            .map_err(internal)?;
        grants
            .iter()
            .map(|g| to_gateway_grant(g, format!("{} → {}", g.device_id, g.resource)))
            .collect()
    }

    /// A device gives a grant back.
    pub async fn disconnect(&self, device_id: &str, grant_id: u64) -> Result<(), WireError> {
        let id = Grant::id_from_wire(grant_id)
            .ok_or_else(|| WireError::new(ErrorCode::NotFound, "no such grant"))?;
        let g = self.store.grant_by_id(id).await.map_err(internal)?;
        match g {
            Some(g) if g.device_id == device_id => {
                self.end_grants(
                    vec![g],
                    "disconnected by the user",
                    &format!("device:{device_id}"),
                    false,
                )
                .await;
                Ok(())
            }
            _ => Err(WireError::new(
                ErrorCode::NotFound,
                "no such grant on this device",
            )),
        }
    }

    /// Ends grants: store, gateways (removal pushed and awaited), and the device is told why.
    /// Returns how many were ended.
    pub async fn end_grants(
        &self,
        grants: Vec<Grant>,
        reason: &str,
        actor: &str,
        tell_device: bool,
    ) -> usize {
        let now = now_ms();
        let mut n = 0;
        for g in grants {
            if g.status != GrantStatus::Active {
                continue;
            }
            match self.store.end_grant(g.id, reason, now).await {
                Ok(Some(_)) => {}
                Ok(None) => continue,
                Err(e) => {
                    warn!(grant = g.id, error = %e, "cannot end grant in the store");
                    continue;
                }
            }
            n += 1;
            if let Err(e) = self
                .audit(
                    actor,
                    "grant.end",
                    &g.id.to_string(),
                    "ok",
                    json!({"reason": reason, "device": g.device_id, "resource": g.resource}),
                )
                .await
            {
                warn!(grant = g.id, error = %e, "cannot audit the end of a grant");
            }
            for gw in &g.gateway_ids {
                if let Some(l) = self.registry.link(&format!("gateway:{gw}")) {
                    let push = Push::RemoveGrant {
                        grant_id: g.wire_id(),
                        reason: reason.to_owned(),
                    };
                    if let Err(e) = l.push(push, ACK_TIMEOUT).await {
                        // The gateway drops it at resync, or at expiry by its own clock.
                        warn!(grant = g.id, gateway = %gw, error = %e, "gateway did not confirm a removal");
                    }
                }
            }
            // Renewals and a user's own disconnect are not terminations anyone needs telling.
            if reason != "renewed" && !actor.starts_with("device:") {
                self.notify_by(
                    actor,
                    crate::notify::kind::GRANT_TERMINATED,
                    &g.id.to_string(),
                    json!({"grant": g.id, "reason": reason, "user_id": g.user_id, "device": g.device_id, "resource": g.resource}),
                );
            }
            if tell_device {
                for l in self.registry.links(&format!("device:{}", g.device_id)) {
                    l.notify(Push::GrantEnded {
                        grant_id: g.wire_id(),
                        reason: reason.to_owned(),
                    });
                }
            }
            info!(grant = g.id, reason, "grant ended");
        }
        n
    }

    /// Re-decides every live grant (after a policy, group or user change) and ends those the
    /// policies no longer allow, telling each device why.
    pub async fn reevaluate(&self, actor: &str) -> usize {
        let now = now_ms();
        let Ok(policies) = self.policies.get(self).await else {
            return 0;
        };
        let Ok(grants) = self.store.active_grants(now).await else {
            return 0;
        };
        let mut ended = 0;
        for g in grants {
            if let Some(n) = self.reevaluate_special(&policies, &g, actor, now).await {
                ended += n;
                continue;
            }
            let (user, facts) = match facts_for(self, &g.device_id, now).await {
                Ok(f) => f,
                Err(e) if e.code == ErrorCode::LoginRequired => {
                    ended += self.end_grants(vec![g], &e.message, actor, true).await;
                    continue;
                }
                Err(_) => continue,
            };
            let request = AccessRequest {
                user: user.username,
                device_id: g.device_id.clone(),
                resource: g.resource.clone(),
            };
            if let Decision::Deny { reasons, .. } = policies.decide(&request, &facts, ts(now)) {
                let words: Vec<String> = reasons.iter().map(ToString::to_string).collect();
                ended += self
                    .end_grants(
                        vec![g],
                        &format!("no longer allowed: {}", words.join("; ")),
                        actor,
                        true,
                    )
                    .await;
            }
        }
        ended
    }

    /// Whether `device_id` is a WireGuard-export device (no client, no session, no posture).
    pub async fn is_export_device(&self, device_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .store
            .device_by_id(device_id)
            .await?
            .is_some_and(|d| d.os == EXPORT_DEVICE_OS))
    }

    /// Re-decides a break-glass or exported grant by its own rules (`None`: an ordinary
    /// grant, for the caller to decide). Returns how many grants ended (0 or 1).
    async fn reevaluate_special(
        &self,
        policies: &CompiledPolicies,
        g: &Grant,
        actor: &str,
        now: i64,
    ) -> Option<usize> {
        let end = |words: Vec<String>| {
            let g = g.clone();
            async move {
                self.end_grants(
                    vec![g],
                    &format!("no longer allowed: {}", words.join("; ")),
                    actor,
                    true,
                )
                .await
            }
        };
        if self.is_export_device(&g.device_id).await.ok()? {
            let user = self.store.user_by_id(&g.user_id).await.ok().flatten()?;
            let groups = self.store.groups_of_user(&user.id).await.ok()?;
            let d = policies.decide_export(
                &g.resource,
                &groups,
                user.disabled,
                ts(g.expires_ms),
                ts(now),
            );
            return Some(match d {
                crate::policy::ExportDecision::Allow { .. } => 0,
                crate::policy::ExportDecision::Deny { reasons } => {
                    end(reasons.iter().map(ToString::to_string).collect()).await
                }
            });
        }
        let bg = self
            .store
            .break_glass_for_grant(g.id)
            .await
            .ok()
            .flatten()?;
        let (user, facts) = match facts_for(self, &g.device_id, now).await {
            Ok(f) => f,
            Err(e) if e.code == ErrorCode::LoginRequired => {
                return Some(
                    self.end_grants(vec![g.clone()], &e.message, actor, true)
                        .await,
                );
            }
            Err(_) => return Some(0),
        };
        let request = AccessRequest {
            user: user.username,
            device_id: g.device_id.clone(),
            resource: g.resource.clone(),
        };
        Some(
            match policies.decide_break_glass(&request, &facts, &bg.reason, ts(now)) {
                BreakGlassDecision::Allow { .. } => 0,
                BreakGlassDecision::Deny { reasons } => {
                    end(reasons.iter().map(ToString::to_string).collect()).await
                }
            },
        )
    }

    /// Marks expired grants as ended and takes their peers off the gateways. The gateways
    /// stopped passing their traffic at expiry by their own clocks already; the removal frees
    /// the entry there.
    pub async fn sweep_expired(&self) {
        if let Ok(expired) = self.store.expire_grants(now_ms()).await {
            for g in expired {
                let _ = self
                    .audit(
                        "system",
                        "grant.expire",
                        &g.id.to_string(),
                        "ok",
                        json!({"device": g.device_id, "resource": g.resource}),
                    )
                    .await;
                self.notify(
                    crate::notify::kind::GRANT_TERMINATED,
                    &g.id.to_string(),
                    json!({"grant": g.id, "reason": "expired", "user_id": g.user_id, "device": g.device_id, "resource": g.resource}),
                );
                for gw in &g.gateway_ids {
                    if let Some(l) = self.registry.link(&format!("gateway:{gw}")) {
                        let push = Push::RemoveGrant {
                            grant_id: g.wire_id(),
                            reason: "expired".into(),
                        };
                        if let Err(e) = l.push(push, ACK_TIMEOUT).await {
                            warn!(grant = g.id, gateway = %gw, error = %e, "gateway did not confirm the removal of an expired grant");
                        }
                    }
                }
            }
        }
    }
}

async fn resolve_endpoint(s: &str) -> Result<std::net::SocketAddr, WireError> {
    tokio::net::lookup_host(s)
        .await
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| {
            WireError::new(
                ErrorCode::GatewayUnavailable,
                format!("the gateway endpoint {s} does not resolve"),
            )
        })
}
