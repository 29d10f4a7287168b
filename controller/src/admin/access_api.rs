//! Admin API for the access model: groups and members, resources, policies, dry runs, grants,
//! and disabling users. Every change is validated as a whole policy set before it is stored,
//! audited, and followed by a re-evaluation of live grants (those no longer allowed end at the
//! gateways at once, and their devices are told why).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post, put};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::api::{Admin, Failure};
use crate::access::load_policy_set;
use crate::policy::{AccessRequest, CompiledPolicies, Policy, PolicySet, PostureProfile, Resource};
use crate::service::Controller;
use crate::store::DocKind;

fn now_ms() -> i64 {
    wardgate_common::clock::now_ms()
}

fn bad(msg: impl Into<String>) -> Failure {
    Failure(StatusCode::BAD_REQUEST, "bad_request", msg.into())
}

fn not_found(msg: impl Into<String>) -> Failure {
    Failure(StatusCode::NOT_FOUND, "not_found", msg.into())
}

/// A group and its members.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupView {
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Member user names.
    pub members: Vec<String>,
}

/// Create a group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateGroup {
    /// Name.
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: String,
}

/// Add a member.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddMember {
    /// The user's login name.
    pub username: String,
}

/// A dry-run question.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DryRun {
    /// The user's login name.
    pub user: String,
    /// The resource.
    pub resource: String,
    /// A device of the user's (default: their most recently enrolled approved device, or a
    /// hypothetical approved one).
    pub device: Option<String>,
}

/// A grant as admins see it (never its preshared key).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantView {
    /// Id.
    pub id: i64,
    /// User id.
    pub user_id: String,
    /// Device id.
    pub device_id: String,
    /// Resource.
    pub resource: String,
    /// Policy that allowed it.
    pub policy: String,
    /// Tunnel address.
    pub tunnel_addr: String,
    /// Issued at (ms).
    pub issued_ms: i64,
    /// Expires at (ms).
    pub expires_ms: i64,
}

/// The router.
pub fn router() -> Router<Arc<Controller>> {
    Router::new()
        .route("/api/v1/groups", get(list_groups).post(create_group))
        .route("/api/v1/groups/{name}/members", post(add_member))
        .route(
            "/api/v1/groups/{name}/members/{username}",
            delete(remove_member),
        )
        .route("/api/v1/resources", get(list_resources))
        .route(
            "/api/v1/resources/{name}",
            put(put_resource).delete(delete_resource),
        )
        .route("/api/v1/policies", get(list_policies))
        .route(
            "/api/v1/policies/{name}",
            put(put_policy).delete(delete_policy),
        )
        .route("/api/v1/posture-profiles", get(list_posture_profiles))
        .route(
            "/api/v1/posture-profiles/{name}",
            put(put_posture_profile).delete(delete_posture_profile),
        )
        .route("/api/v1/access/dry-run", post(dry_run))
        .route("/api/v1/grants", get(list_grants))
        .route("/api/v1/grants/{id}/revoke", post(revoke_grant))
        .route("/api/v1/users/{username}/disable", post(disable_user))
}

fn after_change(ctl: &Arc<Controller>, actor: &str) {
    let (ctl, actor) = (ctl.clone(), actor.to_owned());
    tokio::spawn(async move {
        let ended = ctl.reevaluate(&actor).await;
        if ended > 0 {
            tracing::info!(ended, "grants ended after a policy change");
        }
    });
}

fn validate(set: &PolicySet) -> Result<(), Failure> {
    CompiledPolicies::new(set).map(|_| ()).map_err(|errs| {
        Failure(
            StatusCode::BAD_REQUEST,
            "invalid_policy",
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })
}

async fn list_groups(
    _: Admin,
    State(ctl): State<Arc<Controller>>,
) -> Result<Json<Vec<GroupView>>, Failure> {
    let mut out = Vec::new();
    for g in ctl.store.list_groups().await? {
        let mut members = Vec::new();
        for uid in ctl.store.members_of_group(&g.name).await? {
            if let Some(u) = ctl.store.user_by_id(&uid).await? {
                members.push(u.username);
            }
        }
        out.push(GroupView {
            name: g.name,
            description: g.description,
            members,
        });
    }
    Ok(Json(out))
}

async fn create_group(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Json(req): Json<CreateGroup>,
) -> Result<StatusCode, Failure> {
    let name = req.name.trim();
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(bad(
            "group name must be 1-64 characters of letters, digits, '-', '_' or '.'",
        ));
    }
    ctl.store
        .create_group(name, &req.description, now_ms())
        .await?;
    ctl.audit(&admin.actor, "admin.group.create", name, "ok", json!({}))
        .await?;
    Ok(StatusCode::CREATED)
}

async fn add_member(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(req): Json<AddMember>,
) -> Result<StatusCode, Failure> {
    let user = ctl
        .store
        .user_by_username(&req.username)
        .await?
        .ok_or_else(|| not_found(format!("no user named {}", req.username)))?;
    ctl.store.add_group_member(&name, &user.id).await?;
    ctl.audit(
        &admin.actor,
        "admin.group.add_member",
        &name,
        "ok",
        json!({"user": req.username}),
    )
    .await?;
    after_change(&ctl, &admin.actor);
    Ok(StatusCode::OK)
}

async fn remove_member(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path((name, username)): Path<(String, String)>,
) -> Result<StatusCode, Failure> {
    let user = ctl
        .store
        .user_by_username(&username)
        .await?
        .ok_or_else(|| not_found(format!("no user named {username}")))?;
    ctl.store.remove_group_member(&name, &user.id).await?;
    ctl.audit(
        &admin.actor,
        "admin.group.remove_member",
        &name,
        "ok",
        json!({"user": username}),
    )
    .await?;
    after_change(&ctl, &admin.actor);
    Ok(StatusCode::OK)
}

async fn list_resources(
    _: Admin,
    State(ctl): State<Arc<Controller>>,
) -> Result<Json<Vec<Resource>>, Failure> {
    Ok(Json(load_policy_set(&ctl).await?.resources))
}

async fn list_policies(
    _: Admin,
    State(ctl): State<Arc<Controller>>,
) -> Result<Json<Vec<Policy>>, Failure> {
    Ok(Json(load_policy_set(&ctl).await?.policies))
}

async fn put_resource(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(r): Json<Resource>,
) -> Result<Json<Resource>, Failure> {
    if r.name != name {
        return Err(bad(format!(
            "the body names resource {:?} but the path {name:?}",
            r.name
        )));
    }
    let mut set = load_policy_set(&ctl).await?;
    set.resources.retain(|x| x.name != name);
    set.resources.push(r.clone());
    validate(&set)?;
    let spec = serde_json::to_string(&r).map_err(|e| bad(e.to_string()))?;
    ctl.store
        .put_document(DocKind::Resource, &name, &spec, now_ms())
        .await?;
    ctl.audit(&admin.actor, "admin.resource.put", &name, "ok", json!(r))
        .await?;
    after_change(&ctl, &admin.actor);
    Ok(Json(r))
}

async fn delete_resource(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    let mut set = load_policy_set(&ctl).await?;
    set.resources.retain(|x| x.name != name);
    validate(&set)?;
    ctl.store.delete_document(DocKind::Resource, &name).await?;
    ctl.audit(
        &admin.actor,
        "admin.resource.delete",
        &name,
        "ok",
        json!({}),
    )
    .await?;
    after_change(&ctl, &admin.actor);
    Ok(StatusCode::OK)
}

async fn put_policy(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(p): Json<Policy>,
) -> Result<Json<Policy>, Failure> {
    if p.name != name {
        return Err(bad(format!(
            "the body names policy {:?} but the path {name:?}",
            p.name
        )));
    }
    let mut set = load_policy_set(&ctl).await?;
    set.policies.retain(|x| x.name != name);
    set.policies.push(p.clone());
    validate(&set)?;
    let spec = serde_json::to_string(&p).map_err(|e| bad(e.to_string()))?;
    ctl.store
        .put_document(DocKind::Policy, &name, &spec, now_ms())
        .await?;
    ctl.audit(&admin.actor, "admin.policy.put", &name, "ok", json!(p))
        .await?;
    after_change(&ctl, &admin.actor);
    Ok(Json(p))
}

async fn delete_policy(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    ctl.store.delete_document(DocKind::Policy, &name).await?;
    ctl.audit(&admin.actor, "admin.policy.delete", &name, "ok", json!({}))
        .await?;
    after_change(&ctl, &admin.actor);
    Ok(StatusCode::OK)
}

async fn list_posture_profiles(
    _: Admin,
    State(ctl): State<Arc<Controller>>,
) -> Result<Json<Vec<PostureProfile>>, Failure> {
    Ok(Json(load_policy_set(&ctl).await?.posture_profiles))
}

/// A profile is validated with the whole set (its policies, its own limits) before it is
/// stored; a stricter profile then re-decides live grants like any policy change, so devices
/// that no longer comply lose their grants at once, with the reason.
async fn put_posture_profile(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(p): Json<PostureProfile>,
) -> Result<Json<PostureProfile>, Failure> {
    if p.name != name {
        return Err(bad(format!(
            "the body names posture profile {:?} but the path {name:?}",
            p.name
        )));
    }
    let mut set = load_policy_set(&ctl).await?;
    set.posture_profiles.retain(|x| x.name != name);
    set.posture_profiles.push(p.clone());
    validate(&set)?;
    let spec = serde_json::to_string(&p).map_err(|e| bad(e.to_string()))?;
    ctl.store
        .put_document(DocKind::PostureProfile, &name, &spec, now_ms())
        .await?;
    ctl.audit(
        &admin.actor,
        "admin.posture_profile.put",
        &name,
        "ok",
        json!(p),
    )
    .await?;
    after_change(&ctl, &admin.actor);
    Ok(Json(p))
}

/// Refused while a policy names the profile (the set would not validate).
async fn delete_posture_profile(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    let mut set = load_policy_set(&ctl).await?;
    set.posture_profiles.retain(|x| x.name != name);
    validate(&set)?;
    ctl.store
        .delete_document(DocKind::PostureProfile, &name)
        .await?;
    ctl.audit(
        &admin.actor,
        "admin.posture_profile.delete",
        &name,
        "ok",
        json!({}),
    )
    .await?;
    after_change(&ctl, &admin.actor);
    Ok(StatusCode::OK)
}

async fn dry_run(
    _: Admin,
    State(ctl): State<Arc<Controller>>,
    Json(q): Json<DryRun>,
) -> Result<Json<serde_json::Value>, Failure> {
    let user = ctl
        .store
        .user_by_username(&q.user)
        .await?
        .ok_or_else(|| not_found(format!("no user named {}", q.user)))?;
    let device = match q.device {
        Some(d) => Some(d),
        None => ctl
            .store
            .list_devices()
            .await?
            .into_iter()
            .filter(|d| {
                d.owner_user_id == user.id && d.status == crate::store::DeviceStatus::Approved
            })
            .max_by_key(|d| d.created_ms)
            .map(|d| d.id),
    };
    let now = now_ms();
    let from_device = match &device {
        Some(d) => match crate::access::facts_for(&ctl, d, now).await {
            Ok((_, f)) => Some(f),
            // No live session: decide as if the user logged in now (without MFA).
            Err(e) if e.code == wardgate_common::proto::ErrorCode::LoginRequired => None,
            Err(e) => return Err(bad(e.message)),
        },
        None => None,
    };
    let facts = match from_device {
        Some(f) => f,
        None => crate::policy::Facts {
            groups: ctl.store.groups_of_user(&user.id).await?,
            mfa: false,
            session: crate::policy::Session {
                started_at: jiff::Timestamp::from_millisecond(now)
                    .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
                expires_at: None,
            },
            device: crate::store::DeviceStatus::Approved,
            user_disabled: user.disabled,
            posture: None,
            approvals: Vec::new(),
            vendor: None,
        },
    };
    let policies = ctl.policies.get(&ctl).await.map_err(|e| bad(e.message))?;
    let request = AccessRequest {
        user: q.user.clone(),
        device_id: device.clone().unwrap_or_default(),
        resource: q.resource.clone(),
    };
    let explanation = policies.explain(
        &request,
        &facts,
        jiff::Timestamp::from_millisecond(now).unwrap_or(jiff::Timestamp::UNIX_EPOCH),
    );
    let reasons: Vec<String> = explanation
        .decision
        .reasons()
        .iter()
        .map(ToString::to_string)
        .collect();
    Ok(Json(
        json!({"allowed": explanation.decision.is_allow(), "reasons": reasons, "explanation": explanation}),
    ))
}

async fn list_grants(
    _: Admin,
    State(ctl): State<Arc<Controller>>,
) -> Result<Json<Vec<GrantView>>, Failure> {
    Ok(Json(
        ctl.store
            .active_grants(now_ms())
            .await?
            .into_iter()
            .map(|g| GrantView {
                id: g.id,
                user_id: g.user_id,
                device_id: g.device_id,
                resource: g.resource,
                policy: g.policy,
                tunnel_addr: g.tunnel_addr,
                issued_ms: g.issued_ms,
                expires_ms: g.expires_ms,
            })
            .collect(),
    ))
}

async fn revoke_grant(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path(id): Path<i64>,
) -> Result<Json<serde_json::Value>, Failure> {
    let g = ctl
        .store
        .grant_by_id(id)
        .await?
        .ok_or_else(|| not_found(format!("no grant {id}")))?;
    let n = ctl
        .end_grants(vec![g], "revoked by an administrator", &admin.actor, true)
        .await;
    Ok(Json(json!({"id": id, "ended": n == 1})))
}

async fn disable_user(
    admin: Admin,
    State(ctl): State<Arc<Controller>>,
    Path(username): Path<String>,
) -> Result<Json<serde_json::Value>, Failure> {
    let user = ctl
        .store
        .user_by_username(&username)
        .await?
        .ok_or_else(|| not_found(format!("no user named {username}")))?;
    ctl.store.set_user_disabled(&user.id, true).await?;
    ctl.audit(
        &admin.actor,
        "admin.user.disable",
        &user.id,
        "ok",
        json!({"username": username}),
    )
    .await?;
    let sessions = ctl
        .end_user_sessions(&user.id, "account disabled", &admin.actor)
        .await?;
    let grants = ctl.store.active_grants_for_user(&user.id, now_ms()).await?;
    let ended = ctl
        .end_grants(grants, "account disabled", &admin.actor, true)
        .await;
    for d in ctl
        .store
        .list_devices()
        .await?
        .into_iter()
        .filter(|d| d.owner_user_id == user.id)
    {
        ctl.registry.disconnect(
            &format!("device:{}", d.id),
            crate::service::CLOSE_REFUSED,
            "account disabled",
        );
    }
    Ok(Json(
        json!({"username": username, "disabled": true, "grants_ended": ended, "sessions_ended": sessions}),
    ))
}
