//! Vendor access (issue 7): access requests, their approval by someone else, and the end of
//! the window they grant.
//!
//! - **Asking** ([`Controller::make_access_request`]): on the device's mutual-TLS session, so
//!   the request is scoped to that device. Only resources whose policy (for this user) has an
//!   approval condition take requests; the window must be within the policy's `max_window`
//!   and, for vendor members, end by the contract's end. Every refusal is audited.
//! - **Deciding** ([`Controller::decide_request`]): approve, deny or revoke through the admin
//!   API. The approver is a *user*: the signed-in OIDC administrator, or, with an admin token,
//!   the user named by `--approver` (audited with both). Refused, with the reason in words and
//!   an audit row: approving one's own request, an approver outside the policy's approvers
//!   group, and approving beyond a vendor's contract. Revoking ends the live grants at once.
//! - **Using**: an approved window becomes facts for the policy engine ([`approved_facts`]),
//!   which allows only inside it and caps the grant at its end, so the gateway drops traffic
//!   at the end by its own clock even with the controller down.
//! - **Ending** ([`Controller::sweep_requests`], from the 1 s sweeper): windows that ended
//!   are marked expired; shortly before an end (`requests.notice_lead_ms`) the device gets one
//!   `GrantEnding` push.
//!
//! The checks are pure functions ([`plan_window`], [`check_contract`], [`check_approver`])
//! tested on their own; the store settles races (one decision wins).

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde_json::json;
use tracing::{info, warn};
use wardgate_common::proto::{AccessRequestInfo, ErrorCode, MakeAccessRequest, Push, WireError};

use crate::policy::{ApprovalRule, ApprovedWindow, VendorContract};
use crate::service::Controller;
use crate::store::{
    AccessRequestRow, Device, NewAccessRequest, RequestDecision, RequestState, Vendor,
};

/// The store setting: how long before an approved window ends the device is told (ms).
pub const SETTING_NOTICE_LEAD_MS: &str = "requests.notice_lead_ms";
/// Default notice lead.
pub const DEFAULT_NOTICE_LEAD: Duration = Duration::from_secs(10 * 60);
/// How far ahead a window may start.
const MAX_AHEAD: SignedDuration = SignedDuration::from_hours(30 * 24);
/// A start this far in the past still counts as "now" (clocks and typing differ a little).
const PAST_SLACK: SignedDuration = SignedDuration::from_secs(60);
/// Longest reason and ticket, in characters.
const MAX_REASON: usize = 500;
const MAX_TICKET: usize = 100;

/// Why an access request cannot be made or decided, in words for the person who tried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestRefusal {
    /// No such resource.
    #[error("there is no resource called {0}: check the name")]
    UnknownResource(String),
    /// No policy for this user needs approval for the resource.
    #[error(
        "{0} takes no access requests for you: if a policy gives you access, connect with \
         `wardgate connect {0}`"
    )]
    NotNeeded(String),
    /// The window is not well-formed.
    #[error("{0}")]
    BadWindow(String),
    /// The window is longer than the policy allows.
    #[error("{resource} windows may last at most {max} (asked for {asked}): ask for less")]
    TooLong {
        /// The resource.
        resource: String,
        /// The longest allowed.
        max: String,
        /// What was asked.
        asked: String,
    },
    /// The vendor's contract has ended.
    #[error(
        "vendor contract {contract_ref} ({vendor}) ended on {end_date}: no access is granted \
         after it; ask your sponsor to renew it"
    )]
    ContractEnded {
        /// The vendor.
        vendor: String,
        /// Its contract.
        contract_ref: String,
        /// Its last day.
        end_date: String,
    },
    /// The window would outlast the contract.
    #[error(
        "the window ends after vendor contract {contract_ref} ({vendor}) ends on {end_date}: \
         end it by then"
    )]
    BeyondContract {
        /// The vendor.
        vendor: String,
        /// Its contract.
        contract_ref: String,
        /// Its last day.
        end_date: String,
    },
    /// Missing or over-long reason or ticket.
    #[error("{0}")]
    BadText(&'static str),
    /// No request with that number.
    #[error("there is no access request {0}")]
    NoSuchRequest(i64),
    /// The request is not in a state the action applies to.
    #[error("request {id} is {state}: it cannot be {action} now")]
    WrongState {
        /// The request.
        id: i64,
        /// Its state.
        state: RequestState,
        /// `approved`, `denied`, `revoked`.
        action: &'static str,
    },
    /// The approver asked for it.
    #[error(
        "{user} cannot approve their own request {id}: someone else in {approvers} must approve it"
    )]
    SelfApproval {
        /// The user.
        user: String,
        /// The request.
        id: i64,
        /// The approvers group(s).
        approvers: String,
    },
    /// The approver is not in the approvers group.
    #[error("{user} is not in {approvers}, the group that approves {resource} requests")]
    NotApprover {
        /// The would-be approver.
        user: String,
        /// The group(s) that approve.
        approvers: String,
        /// The resource.
        resource: String,
    },
    /// An admin token approved without naming a user.
    #[error(
        "an admin token is no person: name the approving user with --approver USER (a member of \
         the approvers group)"
    )]
    ApproverRequired,
    /// The named approver does not exist or is disabled.
    #[error("there is no enabled user called {0} to approve")]
    UnknownApprover(String),
    /// The window is over.
    #[error("request {0}'s window has already ended: ask for a new one")]
    WindowOver(i64),
}

impl RequestRefusal {
    /// A stable code for audit rows and API clients.
    pub fn code(&self) -> &'static str {
        match self {
            RequestRefusal::UnknownResource(_) => "unknown_resource",
            RequestRefusal::NotNeeded(_) => "approval_not_needed",
            RequestRefusal::BadWindow(_) => "bad_window",
            RequestRefusal::TooLong { .. } => "window_too_long",
            RequestRefusal::ContractEnded { .. } => "contract_ended",
            RequestRefusal::BeyondContract { .. } => "beyond_contract",
            RequestRefusal::BadText(_) => "bad_text",
            RequestRefusal::NoSuchRequest(_) => "no_such_request",
            RequestRefusal::WrongState { .. } => "wrong_state",
            RequestRefusal::SelfApproval { .. } => "self_approval",
            RequestRefusal::NotApprover { .. } => "not_approver",
            RequestRefusal::ApproverRequired => "approver_required",
            RequestRefusal::UnknownApprover(_) => "unknown_approver",
            RequestRefusal::WindowOver(_) => "window_over",
        }
    }

    fn wire(&self) -> WireError {
        let code = match self {
            RequestRefusal::UnknownResource(_) | RequestRefusal::NoSuchRequest(_) => {
                ErrorCode::NotFound
            }
            RequestRefusal::ContractEnded { .. } | RequestRefusal::BeyondContract { .. } => {
                ErrorCode::AccessDenied
            }
            _ => ErrorCode::BadRequest,
        };
        WireError::new(code, self.to_string())
    }
}

/// What went wrong deciding a request: a refusal in words, or the store.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// Refused (audited).
    #[error(transparent)]
    Refused(#[from] RequestRefusal),
    /// The store failed; nothing was decided.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What an administrator does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestAction {
    /// Approve: the window becomes a grant window.
    Approve,
    /// Deny (with a reason).
    Deny,
    /// Revoke (with a reason): live grants end now.
    Revoke,
}

impl RequestAction {
    fn target(self) -> RequestState {
        match self {
            RequestAction::Approve => RequestState::Approved,
            RequestAction::Deny => RequestState::Denied,
            RequestAction::Revoke => RequestState::Revoked,
        }
    }

    fn audit_action(self) -> &'static str {
        match self {
            RequestAction::Approve => "request.approve",
            RequestAction::Deny => "request.deny",
            RequestAction::Revoke => "request.revoke",
        }
    }

    fn notify_kind(self) -> &'static str {
        match self {
            RequestAction::Approve => crate::notify::kind::REQUEST_APPROVED,
            RequestAction::Deny => crate::notify::kind::REQUEST_DENIED,
            RequestAction::Revoke => crate::notify::kind::REQUEST_REVOKED,
        }
    }

    fn past(self) -> &'static str {
        match self {
            RequestAction::Approve => "approved",
            RequestAction::Deny => "denied",
            RequestAction::Revoke => "revoked",
        }
    }
}

/// Who decides: the user behind the admin API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver {
    /// Their user name.
    pub username: String,
    /// Their groups as the identity provider said at sign-in (OIDC administrators); `None` =
    /// read them from the store.
    pub groups: Option<Vec<String>>,
}

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn human(d: SignedDuration) -> String {
    let secs = u64::try_from(d.as_secs()).unwrap_or(0);
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// The instant a contract's last day (`YYYY-MM-DD`) ends in `zone`: midnight after it there.
pub fn contract_end_instant(date: &str, zone: &str) -> Result<Timestamp, String> {
    let day: jiff::civil::Date = date
        .parse()
        .map_err(|e| format!("{date:?} is not a date (YYYY-MM-DD): {e}"))?;
    let tz = crate::policy::time_zone(zone).map_err(|e| e.to_string())?;
    let next = day
        .tomorrow()
        .map_err(|e| format!("{date:?} has no day after it: {e}"))?;
    next.at(0, 0, 0, 0)
        .to_zoned_datetime(tz)
        .map(|z| z.timestamp())
        .map_err(|e| format!("cannot place {date} in {zone}: {e}"))
}

/// A vendor's contract as the engine sees it.
pub fn contract_facts(v: &Vendor) -> VendorContract {
    VendorContract {
        vendor: v.name.clone(),
        contract_ref: v.contract_ref.clone(),
        end_date: v.contract_end.clone(),
        ends_at: ts(v.contract_end_ms),
    }
}

/// The window asked for, checked: `from` (default `now`) not in the past nor more than 30
/// days ahead, exactly one of `until` and `duration`, an end after the start, and at most the
/// longest `max_window` among the policies that apply.
pub fn plan_window(
    resource: &str,
    now: Timestamp,
    from: Option<Timestamp>,
    until: Option<Timestamp>,
    duration: Option<SignedDuration>,
    rules: &[ApprovalRule],
) -> Result<(Timestamp, Timestamp), RequestRefusal> {
    let bad = |s: &str| Err(RequestRefusal::BadWindow(s.to_owned()));
    let from = from.unwrap_or(now);
    if from < now - PAST_SLACK {
        return bad("the window starts in the past: give a start from now on");
    }
    if from > now + MAX_AHEAD {
        return bad("the window starts more than 30 days ahead: ask nearer the time");
    }
    let until = match (until, duration) {
        (Some(u), None) => u,
        (None, Some(d)) if d > SignedDuration::ZERO => from + d,
        (None, Some(_)) => return bad("the window's length must be more than zero"),
        _ => return bad("give the window's end (--until) or its length (--for), one of them"),
    };
    if until <= from {
        return bad("the window must end after it starts");
    }
    let max = rules
        .iter()
        .map(|r| r.max_window)
        .max()
        .unwrap_or(SignedDuration::ZERO);
    let asked = until.duration_since(from);
    if asked > max {
        return Err(RequestRefusal::TooLong {
            resource: resource.to_owned(),
            max: human(max),
            asked: human(asked),
        });
    }
    Ok((from, until))
}

/// A vendor member's window must lie within the contract: refused once it ended, and when
/// the window would end after it.
pub fn check_contract(
    vendor: Option<&Vendor>,
    now: Timestamp,
    until: Timestamp,
) -> Result<(), RequestRefusal> {
    let Some(v) = vendor else { return Ok(()) };
    let end = ts(v.contract_end_ms);
    if now >= end {
        return Err(RequestRefusal::ContractEnded {
            vendor: v.name.clone(),
            contract_ref: v.contract_ref.clone(),
            end_date: v.contract_end.clone(),
        });
    }
    if until > end {
        return Err(RequestRefusal::BeyondContract {
            vendor: v.name.clone(),
            contract_ref: v.contract_ref.clone(),
            end_date: v.contract_end.clone(),
        });
    }
    Ok(())
}

/// The approver must not be the requester and must be in an approvers group of a policy that
/// needs the approval.
pub fn check_approver(
    request: &AccessRequestRow,
    requester: &str,
    approver: &str,
    approver_groups: &[String],
    rules: &[ApprovalRule],
) -> Result<(), RequestRefusal> {
    let approvers = {
        let mut g: Vec<&str> = rules.iter().map(|r| r.approvers.as_str()).collect();
        g.sort_unstable();
        g.dedup();
        g.join(" or ")
    };
    if approver == requester {
        return Err(RequestRefusal::SelfApproval {
            user: approver.to_owned(),
            id: request.id,
            approvers,
        });
    }
    if !rules.iter().any(|r| approver_groups.contains(&r.approvers)) {
        return Err(RequestRefusal::NotApprover {
            user: approver.to_owned(),
            approvers: if approvers.is_empty() {
                "no group (no policy needs approval for it any more)".into()
            } else {
                approvers
            },
            resource: request.resource.clone(),
        });
    }
    Ok(())
}

/// The approved windows of a device's user as engine facts.
pub fn approved_facts(rows: &[AccessRequestRow]) -> Vec<ApprovedWindow> {
    rows.iter()
        .map(|r| ApprovedWindow {
            request_id: r.id,
            resource: r.resource.clone(),
            from: ts(r.from_ms),
            until: ts(r.until_ms),
        })
        .collect()
}

fn internal(e: impl std::fmt::Display) -> WireError {
    warn!(error = %e, "internal error handling an access request");
    WireError::new(
        ErrorCode::Internal,
        "the controller hit an internal error; it has been logged there, try again later",
    )
}

impl Controller {
    /// The groups a user has for a request: the device's live session's (as its login
    /// established them) or, without one, the store's.
    async fn requester_groups(&self, user_id: &str, device_id: &str, now: i64) -> Vec<String> {
        if let Ok(s) = self.live_session(device_id, now).await
            && let Some(g) = s.groups
        {
            return g;
        }
        self.store.groups_of_user(user_id).await.unwrap_or_default()
    }

    /// Shows a request to people: user names instead of ids.
    pub async fn request_info(&self, r: &AccessRequestRow) -> AccessRequestInfo {
        let approver = match &r.approver_user_id {
            Some(id) => self
                .store
                .user_by_id(id)
                .await
                .ok()
                .flatten()
                .map(|u| u.username),
            None => None,
        };
        AccessRequestInfo {
            id: r.id,
            resource: r.resource.clone(),
            device_id: r.device_id.clone(),
            from_ms: r.from_ms,
            until_ms: r.until_ms,
            reason: r.reason.clone(),
            ticket: r.ticket.clone(),
            state: r.state.to_string(),
            approver,
            decision_reason: r.decision_reason.clone(),
            created_ms: r.created_ms,
        }
    }

    /// A device's user asks for a window (see the module docs). Refusals are audited.
    pub async fn make_access_request(
        &self,
        device: &Device,
        req: MakeAccessRequest,
    ) -> Result<AccessRequestInfo, WireError> {
        let now_ms = wardgate_common::clock::now_ms();
        let now = ts(now_ms);
        let user = self
            .store
            .user_by_id(&device.owner_user_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| WireError::new(ErrorCode::UserDisabled, "the account is gone"))?;
        let actor = format!("user:{}", user.username);
        let detail = json!({"device": device.id, "resource": req.resource, "from_ms": req.from_ms,
            "until_ms": req.until_ms, "duration_ms": req.duration_ms, "reason": req.reason, "ticket": req.ticket});
        let checked = self
            .check_new_request(&user, device, &req, now, now_ms)
            .await;
        let (from, until) = match checked {
            Ok(w) => w,
            Err(Ok(refusal)) => {
                let mut d = detail.clone();
                d["code"] = refusal.code().into();
                d["refusal"] = refusal.to_string().into();
                self.audit(&actor, "request.create", &req.resource, "deny", d)
                    .await
                    .map_err(internal)?;
                info!(user = %user.username, resource = %req.resource, refusal = %refusal, "access request refused");
                return Err(refusal.wire());
            }
            Err(Err(e)) => return Err(e),
        };
        let row = self
            .store
            .insert_access_request(&NewAccessRequest {
                user_id: user.id.clone(),
                device_id: device.id.clone(),
                resource: req.resource.clone(),
                from_ms: from.as_millisecond(),
                until_ms: until.as_millisecond(),
                reason: req.reason.trim().to_owned(),
                ticket: req
                    .ticket
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty()),
                created_ms: now_ms,
            })
            .await
            .map_err(internal)?;
        self.audit(
            &actor,
            "request.create",
            &row.id.to_string(),
            "ok",
            json!({"device": device.id, "resource": row.resource, "from_ms": row.from_ms,
                   "until_ms": row.until_ms, "reason": row.reason, "ticket": row.ticket}),
        )
        .await
        .map_err(internal)?;
        // Approvers learn of it without polling the request list.
        self.notify_by(
            &actor,
            crate::notify::kind::REQUEST_CREATED,
            &row.id.to_string(),
            json!({"request": row.id, "user": user.username, "device": device.id,
                   "resource": row.resource, "from_ms": row.from_ms, "until_ms": row.until_ms,
                   "reason": row.reason, "ticket": row.ticket}),
        );
        info!(id = row.id, user = %user.username, resource = %row.resource, "access request made");
        Ok(self.request_info(&row).await)
    }

    /// The checks on a new request: `Err(Ok(_))` is a refusal to audit, `Err(Err(_))` our
    /// fault.
    async fn check_new_request(
        &self,
        user: &crate::store::User,
        device: &Device,
        req: &MakeAccessRequest,
        now: Timestamp,
        now_ms: i64,
    ) -> Result<(Timestamp, Timestamp), Result<RequestRefusal, WireError>> {
        let reason = req.reason.trim();
        if reason.is_empty() || reason.chars().count() > MAX_REASON {
            return Err(Ok(RequestRefusal::BadText(
                "give a reason (--reason), at most 500 characters",
            )));
        }
        if req
            .ticket
            .as_ref()
            .is_some_and(|t| t.chars().count() > MAX_TICKET)
        {
            return Err(Ok(RequestRefusal::BadText(
                "a ticket reference is at most 100 characters",
            )));
        }
        let policies = self.policies.get(self).await.map_err(Err)?;
        if policies.resource(&req.resource).is_none() {
            return Err(Ok(RequestRefusal::UnknownResource(req.resource.clone())));
        }
        let groups = self.requester_groups(&user.id, &device.id, now_ms).await;
        let rules = policies.approvals_for(&req.resource, &groups);
        if rules.is_empty() {
            return Err(Ok(RequestRefusal::NotNeeded(req.resource.clone())));
        }
        let at = |ms: Option<i64>| ms.map(ts);
        let duration = req
            .duration_ms
            .map(|d| SignedDuration::from_millis(i64::try_from(d).unwrap_or(i64::MAX)));
        let (from, until) = plan_window(
            &req.resource,
            now,
            at(req.from_ms),
            at(req.until_ms),
            duration,
            &rules,
        )
        .map_err(Ok)?;
        let vendor = self
            .store
            .vendor_of_user(&user.id)
            .await
            .map_err(|e| Err(internal(e)))?;
        check_contract(vendor.as_ref(), now, until).map_err(Ok)?;
        Ok((from, until))
    }

    /// The requests of a device's user, newest first.
    pub async fn device_access_requests(
        &self,
        device: &Device,
    ) -> Result<Vec<AccessRequestInfo>, WireError> {
        let rows = self
            .store
            .access_requests_of_user(&device.owner_user_id)
            .await
            .map_err(internal)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows.iter().take(50) {
            out.push(self.request_info(r).await);
        }
        Ok(out)
    }

    /// Approves, denies or revokes request `id` for `actor` (the admin API caller), with
    /// `approver` the user behind it. Every outcome is audited; refusals say why in words.
    pub async fn decide_request(
        &self,
        id: i64,
        action: RequestAction,
        actor: &str,
        approver: Option<Approver>,
        reason: Option<String>,
    ) -> Result<AccessRequestRow, DecideError> {
        let now_ms = wardgate_common::clock::now_ms();
        let approver_name = approver.as_ref().map(|a| a.username.clone());
        let outcome = self
            .try_decide(id, action, actor, approver, reason.clone(), now_ms)
            .await;
        match &outcome {
            Ok(row) => {
                self.audit(
                    actor,
                    action.audit_action(),
                    &id.to_string(),
                    "ok",
                    json!({"approver": approver_name, "reason": reason, "resource": row.resource,
                           "device": row.device_id, "from_ms": row.from_ms, "until_ms": row.until_ms}),
                )
                .await?;
                self.notify_by(
                    actor,
                    action.notify_kind(),
                    &id.to_string(),
                    json!({"request": id, "approver": approver_name, "reason": reason,
                           "resource": row.resource, "device": row.device_id,
                           "from_ms": row.from_ms, "until_ms": row.until_ms}),
                );
                info!(id, action = action.past(), actor, "access request decided");
            }
            Err(DecideError::Refused(r)) => {
                self.audit(
                    actor,
                    action.audit_action(),
                    &id.to_string(),
                    "deny",
                    json!({"approver": approver_name, "code": r.code(), "refusal": r.to_string()}),
                )
                .await?;
                info!(id, actor, refusal = %r, "access request decision refused");
            }
            Err(DecideError::Store(_)) => {}
        }
        outcome
    }

    async fn try_decide(
        &self,
        id: i64,
        action: RequestAction,
        actor: &str,
        approver: Option<Approver>,
        reason: Option<String>,
        now_ms: i64,
    ) -> Result<AccessRequestRow, DecideError> {
        let req = self
            .store
            .access_request(id)
            .await?
            .ok_or(RequestRefusal::NoSuchRequest(id))?;
        if !req.state.can_become(action.target()) {
            return Err(RequestRefusal::WrongState {
                id,
                state: req.state,
                action: action.past(),
            }
            .into());
        }
        let mut approver_id = None;
        if action == RequestAction::Approve {
            let approver = approver.ok_or(RequestRefusal::ApproverRequired)?;
            let user = self
                .store
                .user_by_username(&approver.username)
                .await?
                .filter(|u| !u.disabled)
                .ok_or_else(|| RequestRefusal::UnknownApprover(approver.username.clone()))?;
            let requester = self
                .store
                .user_by_id(&req.user_id)
                .await?
                .map_or_else(|| req.user_id.clone(), |u| u.username);
            let groups = match approver.groups {
                Some(g) => g,
                None => self.store.groups_of_user(&user.id).await?,
            };
            let requester_groups = self
                .requester_groups(&req.user_id, &req.device_id, now_ms)
                .await;
            let rules = match self.policies.get(self).await {
                Ok(p) => p.approvals_for(&req.resource, &requester_groups),
                Err(_) => Vec::new(),
            };
            check_approver(&req, &requester, &user.username, &groups, &rules)?;
            if req.until_ms <= now_ms {
                return Err(RequestRefusal::WindowOver(id).into());
            }
            let vendor = self.store.vendor_of_user(&req.user_id).await?;
            check_contract(vendor.as_ref(), ts(now_ms), ts(req.until_ms))?;
            approver_id = Some(user.id);
        } else if let Some(a) = approver
            && let Some(u) = self.store.user_by_username(&a.username).await?
        {
            approver_id = Some(u.id);
        }
        let decided = self
            .store
            .decide_access_request(
                id,
                &RequestDecision {
                    to: action.target(),
                    by: actor.to_owned(),
                    approver_user_id: approver_id,
                    reason: reason.clone(),
                    at_ms: now_ms,
                },
            )
            .await?;
        let Some(row) = decided else {
            // Someone decided first.
            let state = self
                .store
                .access_request(id)
                .await?
                .map_or(req.state, |r| r.state);
            return Err(RequestRefusal::WrongState {
                id,
                state,
                action: action.past(),
            }
            .into());
        };
        if action == RequestAction::Revoke {
            let grants = self
                .store
                .active_grants_for_device(&row.device_id, now_ms)
                .await?
                .into_iter()
                .filter(|g| g.resource == row.resource)
                .collect();
            let why = format!(
                "access request {id} was revoked: {}",
                reason.as_deref().unwrap_or("no reason given")
            );
            self.end_grants(grants, &why, actor, true).await;
        }
        Ok(row)
    }

    /// How long before a window's end the device is told.
    pub async fn notice_lead(&self) -> Duration {
        self.store
            .get_setting(SETTING_NOTICE_LEAD_MS)
            .await
            .ok()
            .flatten()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(DEFAULT_NOTICE_LEAD, Duration::from_millis)
    }

    /// Marks ended windows expired and sends "ends soon" notices (once each). The grants
    /// themselves end at the window's end by the gateways' clocks; nothing here is needed for
    /// that.
    pub async fn sweep_requests(&self) {
        let now = wardgate_common::clock::now_ms();
        match self.store.expire_access_requests(now).await {
            Ok(rows) => {
                for r in rows {
                    let _ = self
                        .audit(
                            "system",
                            "request.expire",
                            &r.id.to_string(),
                            "ok",
                            json!({"resource": r.resource, "device": r.device_id, "until_ms": r.until_ms}),
                        )
                        .await;
                }
            }
            Err(e) => warn!(error = %e, "cannot expire access requests"),
        }
        let lead = i64::try_from(self.notice_lead().await.as_millis()).unwrap_or(i64::MAX);
        let ending = match self.store.take_ending_requests(now, lead).await {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %e, "cannot look for access windows ending soon");
                return;
            }
        };
        for r in ending {
            let grants = self
                .store
                .active_grants_for_device(&r.device_id, now)
                .await
                .unwrap_or_default();
            let local = crate::policy::local_text(ts(r.until_ms), &jiff::tz::TimeZone::UTC);
            let words = format!(
                "your approved access window for {} (request {}) ends at {local}; ask for a new \
                 request if you need longer",
                r.resource, r.id
            );
            let mut told = Vec::new();
            for g in grants.iter().filter(|g| g.resource == r.resource) {
                for l in self.registry.links(&format!("device:{}", g.device_id)) {
                    l.notify(Push::GrantEnding {
                        grant_id: g.wire_id(),
                        ends_at_ms: r.until_ms,
                        reason: words.clone(),
                    });
                }
                told.push(g.id);
            }
            let _ = self
                .audit(
                    "system",
                    "request.notice",
                    &r.id.to_string(),
                    "ok",
                    json!({"device": r.device_id, "resource": r.resource, "until_ms": r.until_ms, "grants": told}),
                )
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn rules(max_h: i64) -> Vec<ApprovalRule> {
        vec![ApprovalRule {
            policy: "acme-mri".into(),
            approvers: "mri-approvers".into(),
            max_window: SignedDuration::from_hours(max_h),
        }]
    }

    fn acme() -> Vendor {
        Vendor {
            name: "acme".into(),
            sponsor_user_id: "usr_kim".into(),
            contract_ref: "ACME-BAA-7".into(),
            contract_end: "2026-10-31".into(),
            contract_zone: "Europe/Berlin".into(),
            contract_end_ms: contract_end_instant("2026-10-31", "Europe/Berlin")
                .unwrap()
                .as_millisecond(),
            created_ms: 0,
        }
    }

    fn row(id: i64) -> AccessRequestRow {
        AccessRequestRow {
            id,
            user_id: "usr_eng".into(),
            device_id: "dev_eng".into(),
            resource: "mri-console".into(),
            from_ms: 0,
            until_ms: 1,
            reason: "firmware".into(),
            ticket: None,
            state: RequestState::Pending,
            created_ms: 0,
            decided_ms: None,
            decided_by: None,
            approver_user_id: None,
            decision_reason: None,
            notice_sent_ms: None,
        }
    }

    #[test]
    fn a_contract_ends_at_midnight_after_its_last_day_in_its_zone() {
        // 31 October 2026 is after the change to CET (25 October): midnight is 23:00 UTC.
        assert_eq!(
            contract_end_instant("2026-10-31", "Europe/Berlin").unwrap(),
            t("2026-10-31T23:00:00Z")
        );
        assert_eq!(
            contract_end_instant("2026-07-31", "Europe/Berlin").unwrap(),
            t("2026-07-31T22:00:00Z")
        );
        assert!(contract_end_instant("2026-13-01", "UTC").is_err());
        assert!(contract_end_instant("2026-10-31", "Mars/Olympus").is_err());
    }

    #[test]
    fn windows_are_planned_within_the_policy() {
        let now = t("2026-03-24T12:00:00Z");
        let h = SignedDuration::from_hours;
        type Case = (
            &'static str,
            Option<&'static str>,
            Option<&'static str>,
            Option<SignedDuration>,
            Result<(&'static str, &'static str), &'static str>,
        );
        let cases: [Case; 8] = [
            (
                "now for 2 h",
                None,
                None,
                Some(h(2)),
                Ok(("2026-03-24T12:00:00Z", "2026-03-24T14:00:00Z")),
            ),
            (
                "Tuesday 14:00–16:00",
                Some("2026-03-24T13:00:00Z"),
                Some("2026-03-24T15:00:00Z"),
                None,
                Ok(("2026-03-24T13:00:00Z", "2026-03-24T15:00:00Z")),
            ),
            ("too long", None, None, Some(h(5)), Err("window_too_long")),
            (
                "both end and length",
                None,
                Some("2026-03-24T13:00:00Z"),
                Some(h(1)),
                Err("bad_window"),
            ),
            ("neither", None, None, None, Err("bad_window")),
            (
                "ends before it starts",
                Some("2026-03-24T15:00:00Z"),
                Some("2026-03-24T14:00:00Z"),
                None,
                Err("bad_window"),
            ),
            (
                "in the past",
                Some("2026-03-24T10:00:00Z"),
                None,
                Some(h(1)),
                Err("bad_window"),
            ),
            (
                "too far ahead",
                Some("2026-05-24T10:00:00Z"),
                None,
                Some(h(1)),
                Err("bad_window"),
            ),
        ];
        for (name, from, until, dur, want) in cases {
            let got = plan_window(
                "mri-console",
                now,
                from.map(t),
                until.map(t),
                dur,
                &rules(4),
            );
            match (want, got) {
                (Ok((a, b)), Ok((f, u))) => assert_eq!((f, u), (t(a), t(b)), "{name}"),
                (Err(code), Err(r)) => assert_eq!(r.code(), code, "{name}: {r}"),
                (w, g) => panic!("{name}: wanted {w:?}, got {g:?}"),
            }
        }
        let r = plan_window("mri-console", now, None, None, Some(h(5)), &rules(4)).unwrap_err();
        assert_eq!(
            r.to_string(),
            "mri-console windows may last at most 4h (asked for 5h): ask for less"
        );
    }

    #[test]
    fn vendor_windows_stay_inside_the_contract() {
        let v = acme();
        let before = t("2026-10-30T10:00:00Z");
        assert_eq!(
            check_contract(Some(&v), before, t("2026-10-30T12:00:00Z")),
            Ok(())
        );
        assert_eq!(
            check_contract(None, t("2027-01-01T00:00:00Z"), t("2027-01-02T00:00:00Z")),
            Ok(())
        );
        let beyond = check_contract(Some(&v), before, t("2026-11-01T12:00:00Z")).unwrap_err();
        assert_eq!(beyond.code(), "beyond_contract");
        let ended = check_contract(
            Some(&v),
            t("2026-11-02T10:00:00Z"),
            t("2026-11-02T12:00:00Z"),
        )
        .unwrap_err();
        assert_eq!(
            ended.to_string(),
            "vendor contract ACME-BAA-7 (acme) ended on 2026-10-31: no access is granted after \
             it; ask your sponsor to renew it"
        );
    }

    #[test]
    fn only_someone_else_in_the_approvers_group_approves() {
        let r = row(3);
        let approvers = vec!["mri-approvers".to_owned()];
        assert_eq!(
            check_approver(&r, "acme-eng", "kim", &approvers, &rules(4)),
            Ok(())
        );
        let own = check_approver(&r, "acme-eng", "acme-eng", &approvers, &rules(4)).unwrap_err();
        assert_eq!(
            own.to_string(),
            "acme-eng cannot approve their own request 3: someone else in mri-approvers must \
             approve it"
        );
        let outsider = check_approver(&r, "acme-eng", "pat", &["clinicians".to_owned()], &rules(4))
            .unwrap_err();
        assert_eq!(
            outsider.to_string(),
            "pat is not in mri-approvers, the group that approves mri-console requests"
        );
        // A policy that no longer needs approval: nobody may approve under it.
        assert_eq!(
            check_approver(&r, "acme-eng", "kim", &approvers, &[])
                .unwrap_err()
                .code(),
            "not_approver"
        );
    }
}
