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
