//! What is asked ([`AccessRequest`]) and what is known about who asks ([`Facts`]).
//!
//! The caller (the policy administrator) gathers the facts from the store, the identity
//! provider's claims and the device's last posture report, and passes them in; the engine
//! looks nothing up. The same `Facts` value is what the audit row records as "the facts used".

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::posture::PostureReport;
use crate::store::DeviceStatus;

/// A request for access to one resource, as the client made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    /// Who asks (user name); for explanations and audit, not for the decision itself.
    pub user: String,
    /// From which device (its id in the store); for explanations and audit.
    pub device_id: String,
    /// The resource asked for, by name.
    pub resource: String,
}

/// The facts about the user, their sign-in and their device at the time of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    /// The user's groups (from the store or the identity provider's claims).
    pub groups: Vec<String>,
    /// Whether the sign-in behind this session used multi-factor authentication.
    pub mfa: bool,
    /// The login session the request rides on.
    pub session: Session,
    /// The device's enrolment state.
    pub device: DeviceStatus,
    /// Whether the user's account is disabled (in the controller or the identity provider).
    pub user_disabled: bool,
    /// The device's latest posture report, if it sent one.
    pub posture: Option<PostureReport>,
    /// The approved access-request windows of this user on this device that have not ended
    /// (current or upcoming), for policies with an approval condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<ApprovedWindow>,
    /// The vendor organisation the user belongs to, if any: its contract's end bounds every
    /// grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<VendorContract>,
}

/// An approved access request: this user, on this device, may use `resource` from `from`
/// until `until` (if a policy with an approval condition allows the rest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovedWindow {
    /// The request's id, so denials and audit rows can name it.
    pub request_id: i64,
    /// The resource it is for.
    pub resource: String,
    /// When the window opens.
    pub from: Timestamp,
    /// When it closes; grants under it end here.
    pub until: Timestamp,
}

/// A vendor organisation's contract (or BAA), as far as decisions need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VendorContract {
    /// The vendor's name.
    pub vendor: String,
    /// The contract or BAA reference, e.g. `ACME-BAA-7`.
    pub contract_ref: String,
    /// The contract's last day as written (`2026-10-31`), for the words of a denial.
    pub end_date: String,
    /// The instant it ends (the end of its last day in its zone): no grant at or after it,
    /// and none lasting beyond it.
    pub ends_at: Timestamp,
}

/// A login session: when the user signed in, and when the session ends regardless of policy
/// (the identity provider's token expiry, or the controller's own session cap).
///
/// A policy's `session_lifetime` further limits how long after `started_at` the session may
/// be used for it; the earlier of the two is the session's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// When the user signed in.
    pub started_at: Timestamp,
    /// When the session ends whatever the policy says; `None` = only the policy limits it.
    pub expires_at: Option<Timestamp>,
}

impl Facts {
    /// Whether the user is in `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}
