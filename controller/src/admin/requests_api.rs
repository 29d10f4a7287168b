//! Admin API for vendor organisations and access requests (issue 7): vendors with their
//! sponsor and contract, members, and approving, denying and revoking requests.
//!
//! Approvals come from a person. An administrator signed in with an OpenID provider approves
//! as themself (their token's groups decide whether they may); an admin token, which is no
//! person, must name the approving user (`approver`), who must be in the policy's approvers
//! group — and the audit row names both the token and the user.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::api::{Admin, Failure};
use crate::requests::{Approver, DecideError, RequestAction, RequestRefusal};
use crate::service::Controller;
use crate::store::{RequestState, Vendor};

/// A vendor as administrators see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VendorView {
    /// Name.
    pub name: String,
    /// The sponsoring staff user (user name).
    pub sponsor: String,
    /// Contract or BAA reference.
    pub contract_ref: String,
    /// The contract's last day.
    pub contract_end: String,
    /// The zone that day is counted in.
    pub contract_zone: String,
    /// When it ends (ms).
    pub contract_end_ms: i64,
    /// Member user names.
    pub members: Vec<String>,
}

/// Create a vendor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateVendor {
    /// Name.
    pub name: String,
    /// The sponsoring staff user (user name).
    pub sponsor: String,
    /// Contract or BAA reference.
    pub contract_ref: String,
    /// The contract's last day, `YYYY-MM-DD`.
    pub contract_end: String,
    /// The zone that day is counted in (default UTC).
    #[serde(default)]
    pub contract_zone: Option<String>,
}

/// Add a member.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddVendorMember {
    /// The user.
    pub username: String,
}

/// Which requests to list.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RequestFilter {
    /// Only those in this state.
    #[serde(default)]
    pub state: Option<String>,
}

/// An administrator's decision on a request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RequestDecisionBody {
    /// The approving (or denying) user; required with an admin token, and must match the
    /// signed-in person otherwise.
    #[serde(default)]
    pub approver: Option<String>,
    /// Comment (approve) or reason (deny, revoke: required).
    #[serde(default)]
    pub reason: Option<String>,
}

/// A request as administrators see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestView {
    /// The requester (user name).
    pub user: String,
    /// The request.
    #[serde(flatten)]
    pub request: wardgate_common::proto::AccessRequestInfo,
}

/// The router.
pub fn router() -> Router<Arc<Controller>> {
    Router::new()
        .route("/api/v1/vendors", get(list_vendors).post(create_vendor))
        .route("/api/v1/vendors/{name}/members", post(add_member))
        .route("/api/v1/requests", get(list_requests))
        .route("/api/v1/requests/{id}/{action}", post(decide))
}

fn bad(msg: impl Into<String>) -> Failure {
    Failure(StatusCode::BAD_REQUEST, "bad_request", msg.into())
}

async fn username(ctl: &Controller, id: &str) -> Result<String, Failure> {
    Ok(ctl
        .store
        .user_by_id(id)
        .await?
        .map_or_else(|| id.to_owned(), |u| u.username))
}

async fn list_vendors(
    _: Admin,
    State(ctl): State<Arc<Controller>>,
) -> Result<Json<Vec<VendorView>>, Failure> {
    let mut out = Vec::new();
    for v in ctl.store.list_vendors().await? {
        let mut members = Vec::new();
        for id in ctl.store.vendor_members(&v.name).await? {
            members.push(username(&ctl, &id).await?);
        }
        members.sort();
        out.push(VendorView {
            sponsor: username(&ctl, &v.sponsor_user_id).await?,
            name: v.name,
            contract_ref: v.contract_ref,
            contract_end: v.contract_end,
            contract_zone: v.contract_zone,
            contract_end_ms: v.contract_end_ms,
            members,
        });
    }
    Ok(Json(out))
}

async fn create_vendor(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Json(req): Json<CreateVendor>,
) -> Result<StatusCode, Failure> {
    let name = req.name.trim();
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(bad(
            "vendor name must be 1-64 characters of letters, digits, '-', '_' or '.'",
        ));
    }
    let contract_ref = req.contract_ref.trim();
    if contract_ref.is_empty() || contract_ref.len() > 100 {
        return Err(bad(
            "give the contract or BAA reference (at most 100 characters)",
        ));
    }
    let zone = req.contract_zone.clone().unwrap_or_else(|| "UTC".into());
    let end = crate::requests::contract_end_instant(req.contract_end.trim(), &zone).map_err(bad)?;
    let sponsor = ctl
        .store
        .user_by_username(&req.sponsor)
        .await?
        .ok_or_else(|| {
            bad(format!(
                "no user named {} to sponsor the vendor",
                req.sponsor
            ))
        })?;
    if ctl.store.vendor_of_user(&sponsor.id).await?.is_some() {
        return Err(bad(format!(
            "{} is a vendor member; a sponsor must be staff",
            req.sponsor
        )));
    }
    ctl.store
        .insert_vendor(&Vendor {
            name: name.to_owned(),
            sponsor_user_id: sponsor.id,
            contract_ref: contract_ref.to_owned(),
            contract_end: req.contract_end.trim().to_owned(),
            contract_zone: zone.clone(),
            contract_end_ms: end.as_millisecond(),
            created_ms: wardgate_common::clock::now_ms(),
        })
        .await?;
    ctl.audit(
        &admin.actor,
        "admin.vendor.create",
        name,
        "ok",
        json!({"sponsor": req.sponsor, "contract_ref": contract_ref, "contract_end": req.contract_end,
               "contract_zone": zone}),
    )
    .await?;
    Ok(StatusCode::CREATED)
}

async fn add_member(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(req): Json<AddVendorMember>,
) -> Result<StatusCode, Failure> {
    let user = ctl
        .store
        .user_by_username(&req.username)
        .await?
        .ok_or_else(|| {
            Failure(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no user named {}", req.username),
            )
        })?;
    ctl.store.add_vendor_member(&name, &user.id).await?;
    ctl.audit(
        &admin.actor,
        "admin.vendor.add_member",
        &name,
        "ok",
        json!({"user": req.username}),
    )
    .await?;
    // Their grants now end with the contract: decide them again.
    let (ctl2, actor) = (ctl.clone(), admin.actor.clone());
    tokio::spawn(async move {
        ctl2.reevaluate(&actor).await;
    });
    Ok(StatusCode::OK)
}

async fn list_requests(
    _: Admin,
    State(ctl): State<Arc<Controller>>,
    Query(f): Query<RequestFilter>,
) -> Result<Json<Vec<RequestView>>, Failure> {
    let state = match f.state.as_deref() {
        None | Some("") | Some("all") => None,
        Some(s) => Some(s.parse::<RequestState>().map_err(|e| bad(e.to_string()))?),
    };
    let mut out = Vec::new();
    for r in ctl.store.list_access_requests(state).await? {
        out.push(RequestView {
            user: username(&ctl, &r.user_id).await?,
            request: ctl.request_info(&r).await,
        });
    }
    Ok(Json(out))
}

fn refusal_status(r: &RequestRefusal) -> StatusCode {
    match r {
        RequestRefusal::NoSuchRequest(_) => StatusCode::NOT_FOUND,
        RequestRefusal::WrongState { .. } | RequestRefusal::WindowOver(_) => StatusCode::CONFLICT,
        RequestRefusal::SelfApproval { .. }
        | RequestRefusal::NotApprover { .. }
        | RequestRefusal::ApproverRequired
        | RequestRefusal::UnknownApprover(_)
        | RequestRefusal::ContractEnded { .. }
        | RequestRefusal::BeyondContract { .. } => StatusCode::FORBIDDEN,
        _ => StatusCode::BAD_REQUEST,
    }
}

async fn decide(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path((id, action)): Path<(i64, String)>,
    body: Option<Json<RequestDecisionBody>>,
) -> Result<Json<RequestView>, Failure> {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let action = match action.as_str() {
        "approve" => RequestAction::Approve,
        "deny" => RequestAction::Deny,
        "revoke" => RequestAction::Revoke,
        other => {
            return Err(bad(format!(
                "unknown action {other:?}: approve, deny or revoke"
            )));
        }
    };
    let reason = body
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned);
    if action != RequestAction::Approve && reason.is_none() {
        return Err(bad("give a reason (--reason): the requester is told it"));
    }
    if reason.as_ref().is_some_and(|r| r.chars().count() > 500) {
        return Err(bad("a reason is at most 500 characters"));
    }
    let approver = match (&admin.person, body.approver) {
        (Some((me, groups)), named) => {
            if named.as_ref().is_some_and(|n| n != me) {
                return Err(Failure(
                    StatusCode::FORBIDDEN,
                    "not_yourself",
                    format!(
                        "you are signed in as {me}: you decide as yourself, not as someone else"
                    ),
                ));
            }
            Some(Approver {
                username: me.clone(),
                groups: Some(groups.clone()),
            })
        }
        (None, Some(named)) => Some(Approver {
            username: named,
            groups: None,
        }),
        (None, None) => None,
    };
    match ctl
        .decide_request(id, action, &admin.actor, approver, reason)
        .await
    {
        Ok(row) => Ok(Json(RequestView {
            user: username(&ctl, &row.user_id).await?,
            request: ctl.request_info(&row).await,
        })),
        Err(DecideError::Refused(r)) => Err(Failure(refusal_status(&r), r.code(), r.to_string())),
        Err(DecideError::Store(e)) => Err(e.into()),
    }
}
