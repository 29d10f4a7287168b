//! The admin API's request and response bodies, shared by the server and the CLI.

use serde::{Deserialize, Serialize};

/// An error body: a stable code and a sentence saying what to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable code.
    pub error: String,
    /// What happened and what to do.
    pub message: String,
}

/// Create a gateway join token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateJoinToken {
    /// The gateway's name.
    pub name: String,
    /// Networks the gateway may serve (CIDR).
    pub networks: Vec<String>,
    /// Lifetime in seconds (default one hour, at most seven days).
    pub ttl_seconds: Option<u64>,
}

/// A fresh join token, shown once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinTokenCreated {
    /// The token itself; single-use.
    pub token: String,
    /// Its id (for the audit log).
    pub id: String,
    /// The gateway name it registers.
    pub gateway_name: String,
    /// Networks allowed.
    pub networks: Vec<String>,
    /// Expiry, ms since the epoch.
    pub expires_ms: i64,
}

/// A gateway as admins see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayView {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// WireGuard public key.
    pub wg_public_key: String,
    /// Client-facing endpoint.
    pub endpoint: String,
    /// Networks served.
    pub networks: Vec<String>,
    /// `active` or `revoked`.
    pub status: String,
    /// Connected to this controller now.
    pub online: bool,
    /// Last heartbeat, ms since the epoch.
    pub last_seen_ms: Option<i64>,
}

/// A device as admins see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceView {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// The user who enrolled it.
    pub owner: String,
    /// `pending`, `approved`, `denied` or `revoked`.
    pub status: String,
    /// Operating system reported at enrolment.
    pub os: String,
    /// Host name reported at enrolment.
    pub hostname: String,
    /// Connected now.
    pub online: bool,
    /// Enrolled at, ms since the epoch.
    pub created_ms: i64,
}

/// Create a local user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateUser {
    /// Login name.
    pub username: String,
    /// Display name.
    pub display_name: Option<String>,
    /// Initial password.
    pub password: wardgate_common::proto::Secret,
}

/// A user as admins see it (never the password hash).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserView {
    /// Id.
    pub id: String,
    /// Login name.
    pub username: String,
    /// Display name.
    pub display_name: String,
    /// Whether the account is disabled.
    pub disabled: bool,
    /// Whether it has a local password.
    pub local_password: bool,
}

/// Runtime settings (as shown: every value, defaults filled in).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// New devices wait for an administrator's approval.
    pub enrolment_requires_approval: bool,
    /// How often devices report their posture when nothing changes (ms).
    #[serde(default = "default_posture_interval_ms")]
    pub posture_report_interval_ms: u64,
    /// Longest a login session lasts (e.g. `12h`); policies may cut it shorter.
    #[serde(default)]
    pub session_lifetime: Option<String>,
    /// A session without a new grant this long ends (e.g. `1h`).
    #[serde(default)]
    pub session_idle_timeout: Option<String>,
    /// Failed local logins (within the window) that lock the user name.
    #[serde(default)]
    pub lockout_threshold: Option<u32>,
    /// The window failures are counted in (e.g. `15m`).
    #[serde(default)]
    pub lockout_window: Option<String>,
    /// How long a locked name stays locked (e.g. `15m`).
    #[serde(default)]
    pub lockout_period: Option<String>,
    /// A break-glass event unreviewed this long is overdue (e.g. `24h`).
    #[serde(default)]
    pub break_glass_overdue: Option<String>,
    /// How often OIDC sessions are refreshed at their provider (e.g. `5m`): how soon a user
    /// disabled there loses access.
    #[serde(default)]
    pub session_refresh_interval: Option<String>,
    /// How long before an approved access window ends the device is told (ms).
    #[serde(default)]
    pub request_notice_lead_ms: Option<u64>,
}

fn default_posture_interval_ms() -> u64 {
    u64::try_from(crate::posture::DEFAULT_POSTURE_INTERVAL.as_millis()).unwrap_or(30_000)
}

/// A change of settings: only the fields given change, so setting one never resets another.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SettingsUpdate {
    /// New devices wait for an administrator's approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolment_requires_approval: Option<bool>,
    /// How often devices report their posture when nothing changes (ms, 500 to 3 600 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub posture_report_interval_ms: Option<u64>,
    /// See [`Settings`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_lifetime: Option<String>,
    /// See [`Settings`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_idle_timeout: Option<String>,
    /// See [`Settings`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lockout_threshold: Option<u32>,
    /// See [`Settings`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lockout_window: Option<String>,
    /// See [`Settings`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lockout_period: Option<String>,
    /// See [`Settings`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub break_glass_overdue: Option<String>,
    /// See [`Settings`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_refresh_interval: Option<String>,
    /// See [`Settings`] (at most a day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_notice_lead_ms: Option<u64>,
}

/// A TOTP enrolment, shown once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TotpEnrolled {
    /// The user.
    pub username: String,
    /// The base32 secret (for typing into an app by hand).
    pub secret: wardgate_common::proto::Secret,
    /// The `otpauth://` URI (for a QR code).
    pub uri: String,
}
