//! The admin REST API. Every route but `/healthz` needs `Authorization: Bearer <admin token>`;
//! every change is audited with the token's id as the actor.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ipnet::IpNet;
use serde_json::json;
use tracing::{info, warn};

use super::types::*;
use crate::ca::LeafRole;
use crate::secrets::{self, TokenKind};
use crate::service::{CLOSE_REFUSED, Controller, SETTING_REQUIRE_APPROVAL};
use crate::store::{DeviceStatus, GatewayStatus, JoinToken, StoreError, User};

/// Longest allowed join token lifetime.
const MAX_JOIN_TTL_SECS: u64 = 7 * 24 * 3600;
const DEFAULT_JOIN_TTL_SECS: u64 = 3600;

/// An API failure: status, stable code, message.
pub struct Failure(pub StatusCode, pub &'static str, pub String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(ApiError {
                error: self.1.to_owned(),
                message: self.2,
            }),
        )
            .into_response()
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { what } => Failure(StatusCode::CONFLICT, "conflict", what),
            StoreError::NotFound { what } => Failure(StatusCode::NOT_FOUND, "not_found", what),
            other => {
                warn!(error = %other, "store error in admin API");
                Failure(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the controller's database is unavailable; nothing was changed, try again"
                        .into(),
                )
            }
        }
    }
}

fn bad_request(msg: impl Into<String>) -> Failure {
    Failure(StatusCode::BAD_REQUEST, "bad_request", msg.into())
}

fn now_ms() -> i64 {
    wardgate_common::clock::now_ms()
}

/// An authenticated administrator (the admin token's id).
pub struct Admin {
    /// The audit actor (`admin:<token id>`).
    pub actor: String,
    /// The person, when they signed in with an OpenID provider (user name and the groups
    /// their token carries); `None` for admin tokens, which are no person.
    pub person: Option<(String, Vec<String>)>,
}

impl FromRequestParts<Arc<Controller>> for Admin {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, ctl: &Arc<Controller>) -> Result<Self, Failure> {
        let unauthorized =
            |msg: &str| Failure(StatusCode::UNAUTHORIZED, "unauthorized", msg.to_owned());
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unauthorized("missing `Authorization: Bearer <admin token>` header"))?;
        let token = header.strip_prefix("Bearer ").ok_or_else(|| {
            unauthorized("the Authorization header must be `Bearer <admin token>`")
        })?;
        if looks_like_jwt(token) {
            return oidc_admin(ctl, token).await;
        }
        let found = ctl
            .store
            .admin_token_by_hash(&secrets::hash_token(token))
            .await?;
        let now = now_ms();
        match found {
            Some(t) if t.revoked_ms.is_none() && t.expires_ms.is_none_or(|e| e > now) => {
                Ok(Admin {
                    actor: format!("admin:{}", t.id),
                    person: None,
                })
            }
            Some(_) => Err(unauthorized("this admin token has expired or was revoked")),
            None => {
                if let Err(e) = ctl
                    .audit(
                        "anonymous",
                        "admin.auth",
                        "admin-api",
                        "deny",
                        json!({"reason": "unknown admin token"}),
                    )
                    .await
                {
                    warn!(error = %e, "cannot audit a refused admin token");
                }
                Err(unauthorized(
                    "the admin token was not recognised; use the token printed by `wardgate-controller init`",
                ))
            }
        }
    }
}

/// Whether a bearer credential is a JWT (three base64url parts) rather than an admin token
/// (`wga_…`): ID tokens of administrators sign in to the admin API too.
fn looks_like_jwt(token: &str) -> bool {
    !token.starts_with("wga_") && token.split('.').count() == 3
}

/// An administrator signing in with an OpenID provider's ID token: verified like a login
/// (signature, issuer, audience, expiry), and the user must be in one of the provider's
/// admin groups. Refusals are audited; a valid token of a non-admin is a 403.
async fn oidc_admin(ctl: &Arc<Controller>, token: &str) -> Result<Admin, Failure> {
    let deny = |status: StatusCode, code: &'static str, actor: String, reason: String| async move {
        if let Err(e) = ctl
            .audit(
                &actor,
                "admin.auth",
                "admin-api",
                "deny",
                json!({"method": "oidc", "reason": reason}),
            )
            .await
        {
            warn!(error = %e, "cannot audit a refused admin sign-in");
        }
        Failure(status, code, reason)
    };
    let Some(verifier) = ctl.verifier.as_ref() else {
        return Err(deny(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "anonymous".into(),
            "this controller trusts no identity provider; use an admin token".into(),
        )
        .await);
    };
    let id = match verifier.verify_bearer(token).await {
        Ok(id) => id,
        Err(e) => {
            return Err(deny(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "anonymous".into(),
                format!("the ID token was refused: {e}"),
            )
            .await);
        }
    };
    let actor = format!("oidc:{}:{}", id.provider, id.username);
    let admin_groups = verifier
        .provider(&id.provider)
        .map(|p| p.admin_groups.clone())
        .unwrap_or_default();
    if !id.groups.iter().any(|g| admin_groups.contains(g)) {
        return Err(deny(
            StatusCode::FORBIDDEN,
            "forbidden",
            actor,
            format!(
                "{} is not in an admin group of {} ({}); the admin API is for administrators",
                id.username,
                id.provider,
                if admin_groups.is_empty() {
                    "it has none".to_owned()
                } else {
                    admin_groups.join(", ")
                }
            ),
        )
        .await);
    }
    Ok(Admin {
        actor,
        person: Some((id.username.clone(), id.groups.clone())),
    })
}

/// The router, with the controller as state.
pub fn router(ctl: Arc<Controller>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/api/v1/settings", get(get_settings).put(put_settings))
        .route("/api/v1/gateway-tokens", post(create_join_token))
        .route("/api/v1/gateways", get(list_gateways))
        .route("/api/v1/gateways/{id}/revoke", post(revoke_gateway))
        .route("/api/v1/devices", get(list_devices))
        .route("/api/v1/devices/{id}/{action}", post(decide_device))
        .route("/api/v1/users", get(list_users).post(create_user))
        .route("/api/v1/users/{username}/totp", post(enrol_totp))
        .merge(super::access_api::router())
        .merge(super::breakglass_api::router())
        .merge(super::requests_api::router())
        .with_state(ctl)
}

async fn settings_view(ctl: &Controller) -> Result<Settings, Failure> {
    let v = ctl.store.get_setting(SETTING_REQUIRE_APPROVAL).await?;
    let id = ctl.identity_settings().await?;
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    Ok(Settings {
        enrolment_requires_approval: v.is_some_and(|v| v == "true"),
        posture_report_interval_ms: u64::try_from(ctl.posture_interval().await.as_millis())
            .unwrap_or(u64::MAX),
        session_lifetime: Some(d(id.session_lifetime)),
        session_idle_timeout: Some(d(id.session_idle_timeout)),
        lockout_threshold: Some(id.lockout_threshold),
        lockout_window: Some(d(id.lockout_window)),
        lockout_period: Some(d(id.lockout_period)),
        break_glass_overdue: Some(d(super::breakglass_api::overdue_after(ctl).await)),
        session_refresh_interval: Some(d(id.refresh_interval)),
        request_notice_lead_ms: Some(
            u64::try_from(ctl.notice_lead().await.as_millis()).unwrap_or(u64::MAX),
        ),
    })
}

async fn get_settings(
    _: Admin,
    State(ctl): State<Arc<Controller>>,
) -> Result<Json<Settings>, Failure> {
    Ok(Json(settings_view(&ctl).await?))
}

async fn put_settings(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Json(s): Json<SettingsUpdate>,
) -> Result<Json<Settings>, Failure> {
    if let Some(ms) = s.posture_report_interval_ms {
        let (min, max) = (
            crate::posture::MIN_POSTURE_INTERVAL,
            crate::posture::MAX_POSTURE_INTERVAL,
        );
        if !(min..=max).contains(&std::time::Duration::from_millis(ms)) {
            return Err(bad_request(format!(
                "posture_report_interval_ms must be between {} and {}",
                min.as_millis(),
                max.as_millis()
            )));
        }
    }
    if s.request_notice_lead_ms
        .is_some_and(|ms| ms > 24 * 3600 * 1000)
    {
        return Err(bad_request("request_notice_lead_ms must be at most a day"));
    }
    use crate::login::{check_setting, setting};
    let threshold = s.lockout_threshold.map(|n| n.to_string());
    let changes: Vec<(&str, Option<&str>)> = vec![
        (setting::SESSION_LIFETIME, s.session_lifetime.as_deref()),
        (
            setting::SESSION_IDLE_TIMEOUT,
            s.session_idle_timeout.as_deref(),
        ),
        (setting::LOCKOUT_THRESHOLD, threshold.as_deref()),
        (setting::LOCKOUT_WINDOW, s.lockout_window.as_deref()),
        (setting::LOCKOUT_PERIOD, s.lockout_period.as_deref()),
        (
            super::breakglass_api::SETTING_OVERDUE,
            s.break_glass_overdue.as_deref(),
        ),
        (
            setting::REFRESH_INTERVAL,
            s.session_refresh_interval.as_deref(),
        ),
    ];
    // All or nothing: check every value before writing any.
    for (name, v) in &changes {
        if let Some(v) = v {
            check_setting(name, v).map_err(|e| bad_request(e.to_string()))?;
        }
    }
    if let Some(a) = s.enrolment_requires_approval {
        ctl.store
            .set_setting(SETTING_REQUIRE_APPROVAL, if a { "true" } else { "false" })
            .await?;
    }
    if let Some(ms) = s.posture_report_interval_ms {
        ctl.store
            .set_setting(crate::posture::SETTING_POSTURE_INTERVAL_MS, &ms.to_string())
            .await?;
    }
    for (name, v) in changes {
        if let Some(v) = v {
            ctl.store.set_setting(name, v.trim()).await?;
        }
    }
    if let Some(ms) = s.request_notice_lead_ms {
        ctl.store
            .set_setting(crate::requests::SETTING_NOTICE_LEAD_MS, &ms.to_string())
            .await?;
    }
    ctl.audit(
        &admin.actor,
        "admin.settings.update",
        "settings",
        "ok",
        json!(s),
    )
    .await?;
    Ok(Json(settings_view(&ctl).await?))
}

async fn create_join_token(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Json(req): Json<CreateJoinToken>,
) -> Result<Json<JoinTokenCreated>, Failure> {
    let name = req.name.trim();
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(bad_request(
            "gateway name must be 1-64 characters of letters, digits, '-', '_' or '.'",
        ));
    }
    let mut networks = Vec::new();
    for n in &req.networks {
        let net: IpNet = n.parse().map_err(|_| {
            bad_request(format!(
                "network {n:?} is not a CIDR prefix such as 10.10.0.0/16"
            ))
        })?;
        networks.push(net.trunc().to_string());
    }
    if networks.is_empty() {
        return Err(bad_request(
            "name at least one network the gateway serves (--network 10.10.0.0/16)",
        ));
    }
    let ttl = req.ttl_seconds.unwrap_or(DEFAULT_JOIN_TTL_SECS);
    if ttl == 0 || ttl > MAX_JOIN_TTL_SECS {
        return Err(bad_request("ttl must be between 1 second and 7 days"));
    }
    let token = secrets::new_token(TokenKind::Join);
    let now = now_ms();
    let rec = JoinToken {
        id: secrets::new_id("jt"),
        gateway_name: name.to_owned(),
        networks: networks.clone(),
        token_hash: secrets::hash_token(&token),
        created_ms: now,
        expires_ms: now + i64::try_from(ttl).unwrap_or(0) * 1000,
        used_ms: None,
    };
    ctl.store.insert_join_token(&rec).await?;
    ctl.audit(
        &admin.actor,
        "admin.gateway_token.create",
        &rec.id,
        "ok",
        json!({"gateway_name": name, "networks": networks, "expires_ms": rec.expires_ms}),
    )
    .await?;
    info!(token_id = %rec.id, gateway = %name, "join token created");
    Ok(Json(JoinTokenCreated {
        token,
        id: rec.id,
        gateway_name: name.to_owned(),
        networks,
        expires_ms: rec.expires_ms,
    }))
}

async fn list_gateways(
    _: Admin,
    State(ctl): State<Arc<Controller>>,
) -> Result<Json<Vec<GatewayView>>, Failure> {
    let gws = ctl.store.list_gateways().await?;
    Ok(Json(
        gws.into_iter()
            .map(|g| GatewayView {
                online: ctl.registry.is_online(&format!("gateway:{}", g.id)),
                id: g.id,
                name: g.name,
                wg_public_key: g.wg_public_key,
                endpoint: g.endpoint,
                networks: g.networks,
                status: g.status.as_str().to_owned(),
                last_seen_ms: g.last_seen_ms,
            })
            .collect(),
    ))
}

async fn revoke_gateway(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, Failure> {
    if ctl.store.gateway_by_id(&id).await?.is_none() {
        return Err(Failure(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no gateway with id {id}"),
        ));
    }
    ctl.store
        .set_gateway_status(&id, GatewayStatus::Revoked, now_ms())
        .await?;
    ctl.audit(&admin.actor, "admin.gateway.revoke", &id, "ok", json!({}))
        .await?;
    let was_online = ctl.registry.disconnect(
        &format!("gateway:{id}"),
        CLOSE_REFUSED,
        "gateway revoked by an administrator",
    );
    info!(gateway = %id, was_online, "gateway revoked");
    Ok(Json(
        json!({"id": id, "status": "revoked", "disconnected": was_online}),
    ))
}

async fn device_view(ctl: &Controller, d: crate::store::Device) -> Result<DeviceView, Failure> {
    let owner = ctl
        .store
        .user_by_id(&d.owner_user_id)
        .await?
        .map(|u| u.username)
        .unwrap_or_else(|| d.owner_user_id.clone());
    Ok(DeviceView {
        online: ctl.registry.is_online(&format!("device:{}", d.id)),
        id: d.id,
        name: d.name,
        owner,
        status: d.status.as_str().to_owned(),
        os: d.os,
        hostname: d.hostname,
        created_ms: d.created_ms,
    })
}

async fn list_devices(
    _: Admin,
    State(ctl): State<Arc<Controller>>,
) -> Result<Json<Vec<DeviceView>>, Failure> {
    let mut out = Vec::new();
    for d in ctl.store.list_devices().await? {
        out.push(device_view(&ctl, d).await?);
    }
    Ok(Json(out))
}

async fn decide_device(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<DeviceView>, Failure> {
    let Some(dev) = ctl.store.device_by_id(&id).await? else {
        return Err(Failure(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no device with id {id}"),
        ));
    };
    let now = now_ms();
    let updated = match action.as_str() {
        "approve" => {
            let cert = ctl
                .ca
                .sign_csr(LeafRole::Device, &format!("device {id}"), &dev.csr_pem)
                .map_err(|e| bad_request(e.to_string()))?;
            let certs = wardgate_common::pki::certs_from_pem("certificate", cert.as_bytes())
                .map_err(|e| bad_request(e.to_string()))?;
            let fp = certs
                .first()
                .map(wardgate_common::pki::fingerprint)
                .unwrap_or_default();
            ctl.store
                .transition_device(
                    &id,
                    &[DeviceStatus::Pending],
                    DeviceStatus::Approved,
                    Some((&cert, &fp)),
                    now,
                )
                .await?
        }
        "deny" => {
            ctl.store
                .transition_device(
                    &id,
                    &[DeviceStatus::Pending],
                    DeviceStatus::Denied,
                    None,
                    now,
                )
                .await?
        }
        "revoke" => {
            let d = ctl
                .store
                .transition_device(
                    &id,
                    &[DeviceStatus::Pending, DeviceStatus::Approved],
                    DeviceStatus::Revoked,
                    None,
                    now,
                )
                .await?;
            // Its grants end at the gateways (awaited) before the answer, and the device is
            // told why before it is cut off.
            let grants = ctl.store.active_grants_for_device(&id, now).await?;
            ctl.end_grants(grants, "device revoked", &admin.actor, true)
                .await;
            ctl.registry.disconnect(
                &format!("device:{id}"),
                CLOSE_REFUSED,
                "device revoked by an administrator",
            );
            d
        }
        other => {
            return Err(Failure(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("unknown device action {other:?}; use approve, deny or revoke"),
            ));
        }
    };
    ctl.audit(
        &admin.actor,
        &format!("admin.device.{action}"),
        &id,
        "ok",
        json!({"name": updated.name}),
    )
    .await?;
    info!(device = %id, action = %action, "device decision");
    Ok(Json(device_view(&ctl, updated).await?))
}

fn user_view(u: User) -> UserView {
    UserView {
        local_password: u.password_hash.is_some(),
        id: u.id,
        username: u.username,
        display_name: u.display_name,
        disabled: u.disabled,
    }
}

async fn list_users(
    _: Admin,
    State(ctl): State<Arc<Controller>>,
) -> Result<Json<Vec<UserView>>, Failure> {
    Ok(Json(
        ctl.store
            .list_users()
            .await?
            .into_iter()
            .map(user_view)
            .collect(),
    ))
}

async fn create_user(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Json(req): Json<CreateUser>,
) -> Result<(StatusCode, Json<UserView>), Failure> {
    let username = req.username.trim().to_owned();
    if username.is_empty()
        || username.len() > 64
        || !username
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(bad_request(
            "user name must be 1-64 characters of letters, digits, '-', '_', '.' or '@'",
        ));
    }
    let pw = req.password.expose().to_owned();
    if pw.chars().count() < secrets::MIN_PASSWORD_LEN {
        return Err(bad_request(format!(
            "the password must have at least {} characters",
            secrets::MIN_PASSWORD_LEN
        )));
    }
    let hash = tokio::task::spawn_blocking(move || secrets::hash_password(&pw))
        .await
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let user = User {
        id: secrets::new_id("usr"),
        display_name: req.display_name.clone().unwrap_or_else(|| username.clone()),
        username: username.clone(),
        password_hash: Some(hash),
        disabled: false,
        created_ms: now_ms(),
    };
    ctl.store.insert_user(&user).await.map_err(|e| match e {
        StoreError::Conflict { .. } => Failure(
            StatusCode::CONFLICT,
            "conflict",
            format!("a user named {username} already exists"),
        ),
        other => other.into(),
    })?;
    ctl.audit(
        &admin.actor,
        "admin.user.create",
        &user.id,
        "ok",
        json!({"username": username}),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(user_view(user))))
}

/// Enrols (or replaces) a local user's TOTP second factor and returns the secret and the
/// `otpauth://` URI once, for the user's authenticator app. The secret is not logged or
/// audited; the audit row records only that it happened.
async fn enrol_totp(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path(username): Path<String>,
) -> Result<Json<TotpEnrolled>, Failure> {
    let user = ctl
        .store
        .user_by_username(&username)
        .await?
        .ok_or_else(|| {
            Failure(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no user named {username}"),
            )
        })?;
    if user.password_hash.is_none() {
        return Err(bad_request(format!(
            "{username} signs in with an identity provider; its second factor is the provider's"
        )));
    }
    let secret = crate::totp::new_secret();
    ctl.store.set_user_totp(&user.id, &secret).await?;
    ctl.audit(
        &admin.actor,
        "admin.user.totp_enrol",
        &user.id,
        "ok",
        json!({"username": username}),
    )
    .await?;
    let issuer = "Wardgate";
    Ok(Json(TotpEnrolled {
        uri: crate::totp::otpauth_uri(issuer, &username, &secret),
        secret: wardgate_common::proto::Secret::new(secret),
        username,
    }))
}
