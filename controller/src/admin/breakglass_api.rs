//! Admin API for issue 7: the break-glass review queue, webhook sinks, and the WireGuard
//! export. Reviews and sink changes are audited; webhook secrets go in and never come out.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use wardgate_common::proto::{ErrorCode, WireError};

use super::api::{Admin, Failure};
use crate::export::{ExportAnswer, ExportRequest};
use crate::service::Controller;
use crate::store::{BreakGlassEvent, NewAuditEvent, Webhook};

/// Setting: how long a break-glass event may stay unreviewed before it is overdue.
pub const SETTING_OVERDUE: &str = "break_glass.overdue_after";
/// Default of [`SETTING_OVERDUE`].
pub const DEFAULT_OVERDUE: Duration = Duration::from_secs(24 * 3600);
/// Longest review comment.
const MAX_COMMENT_LEN: usize = 2000;

fn now_ms() -> i64 {
    wardgate_common::clock::now_ms()
}

fn bad(msg: impl Into<String>) -> Failure {
    Failure(StatusCode::BAD_REQUEST, "bad_request", msg.into())
}

fn wire(e: WireError) -> Failure {
    let (status, code) = match e.code {
        ErrorCode::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        ErrorCode::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
        ErrorCode::AccessDenied => (StatusCode::FORBIDDEN, "access_denied"),
        ErrorCode::GatewayUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "gateway_unavailable"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    let mut msg = e.message;
    for d in e.details {
        msg.push_str("\n  - ");
        msg.push_str(&d);
    }
    Failure(status, code, msg)
}

/// The overdue setting.
pub async fn overdue_after(ctl: &Controller) -> Duration {
    match ctl.store.get_setting(SETTING_OVERDUE).await {
        Ok(Some(v)) => humantime::parse_duration(&v).unwrap_or(DEFAULT_OVERDUE),
        _ => DEFAULT_OVERDUE,
    }
}

/// Which events to list.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BreakGlassQuery {
    /// Only those not yet reviewed.
    #[serde(default)]
    pub unreviewed: bool,
    /// Only those unreviewed for longer than the overdue setting.
    #[serde(default)]
    pub overdue: bool,
}

/// A break-glass event as admins see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BreakGlassView {
    /// The event.
    #[serde(flatten)]
    pub event: BreakGlassEvent,
    /// The user's name.
    pub user: String,
    /// Unreviewed for longer than the overdue setting.
    pub overdue: bool,
}

/// A review.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Review {
    /// Why the access was (or was not) justified, what was done. Required.
    pub comment: String,
}

/// A new webhook sink.
#[derive(Clone, Serialize, Deserialize)]
pub struct NewWebhook {
    /// Where events are POSTed (http or https).
    pub url: String,
    /// The HMAC key (at least 16 bytes).
    pub secret: String,
}

/// A webhook as admins see it: never the secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebhookView {
    /// Id.
    pub id: String,
    /// URL.
    pub url: String,
    /// Added at (ms).
    pub created_ms: i64,
}

/// The router.
pub fn router() -> Router<Arc<Controller>> {
    Router::new()
        .route("/api/v1/break-glass", get(list_break_glass))
        .route("/api/v1/break-glass/{id}/review", post(review))
        .route("/api/v1/webhooks", get(list_webhooks).post(add_webhook))
        .route("/api/v1/webhooks/{id}", delete(remove_webhook))
        .route("/api/v1/grants/export", post(export))
}

async fn list_break_glass(
    _: Admin,
    State(ctl): State<Arc<Controller>>,
    Query(q): Query<BreakGlassQuery>,
) -> Result<Json<Vec<BreakGlassView>>, Failure> {
    let now = now_ms();
    let after = i64::try_from(overdue_after(&ctl).await.as_millis()).unwrap_or(i64::MAX);
    let cutoff = now.saturating_sub(after);
    let events = ctl
        .store
        .list_break_glass(q.unreviewed || q.overdue, q.overdue.then_some(cutoff))
        .await?;
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let user = ctl
            .store
            .user_by_id(&e.user_id)
            .await?
            .map_or_else(|| e.user_id.clone(), |u| u.username);
        out.push(BreakGlassView {
            overdue: e.reviewed_ms.is_none() && e.at_ms <= cutoff,
            event: e,
            user,
        });
    }
    Ok(Json(out))
}

async fn review(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path(id): Path<String>,
    Json(r): Json<Review>,
) -> Result<Json<BreakGlassEvent>, Failure> {
    let comment = r.comment.trim();
    if comment.is_empty() {
        return Err(bad(
            "a review needs a comment: say whether the access was justified and what was checked",
        ));
    }
    if comment.chars().count() > MAX_COMMENT_LEN {
        return Err(bad(format!(
            "keep the comment under {MAX_COMMENT_LEN} characters"
        )));
    }
    let now = now_ms();
    let event = NewAuditEvent {
        at_ms: now,
        actor: admin.actor.clone(),
        action: "break_glass.review".into(),
        target: id.clone(),
        outcome: "ok".into(),
        detail: json!({"comment": comment}),
    };
    let reviewed = ctl
        .store
        .review_break_glass(&id, &admin.actor, comment, now, &event)
        .await?;
    ctl.notify_by(
        &admin.actor,
        crate::notify::kind::BREAK_GLASS_REVIEWED,
        &id,
        json!({"review": id, "grant": reviewed.grant_id, "resource": reviewed.resource, "comment": comment}),
    );
    Ok(Json(reviewed))
}

async fn list_webhooks(
    _: Admin,
    State(ctl): State<Arc<Controller>>,
) -> Result<Json<Vec<WebhookView>>, Failure> {
    Ok(Json(
        ctl.store
            .list_webhooks()
            .await?
            .into_iter()
            .map(|w| WebhookView {
                id: w.id,
                url: w.url,
                created_ms: w.created_ms,
            })
            .collect(),
    ))
}

async fn add_webhook(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Json(w): Json<NewWebhook>,
) -> Result<Json<WebhookView>, Failure> {
    crate::notify::check_url(&w.url).map_err(bad)?;
    let secret = w.secret.trim();
    if secret.len() < 16 {
        return Err(bad("the webhook secret must be at least 16 bytes"));
    }
    let hook = Webhook {
        id: format!("wh_{}", hex::encode(rand::random::<[u8; 6]>())),
        url: w.url.clone(),
        secret: secret.to_owned(),
        created_ms: now_ms(),
    };
    ctl.store.insert_webhook(&hook).await?;
    // The secret is not audited: the audit log is exported and read widely.
    ctl.audit(
        &admin.actor,
        "admin.webhook.add",
        &hook.id,
        "ok",
        json!({"url": hook.url}),
    )
    .await?;
    Ok(Json(WebhookView {
        id: hook.id,
        url: hook.url,
        created_ms: hook.created_ms,
    }))
}

async fn remove_webhook(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, Failure> {
    ctl.store.delete_webhook(&id).await?;
    ctl.audit(&admin.actor, "admin.webhook.remove", &id, "ok", json!({}))
        .await?;
    Ok(Json(json!({"removed": id})))
}

async fn export(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Json(req): Json<ExportRequest>,
) -> Result<Json<ExportAnswer>, Failure> {
    ctl.export_wireguard(&admin.actor, &req)
        .await
        .map(Json)
        .map_err(wire)
}
