//! What the engine answers: allow with the grant's bounds, or deny with every reason.

use std::fmt;
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use super::model::arc_str;
use super::posture::{Tri, Version};
use crate::store::DeviceStatus;

/// The engine's answer to one access request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Access is allowed until `expires_at`.
    Allow {
        /// The policy that allows it (the one giving the latest expiry).
        #[serde(with = "arc_str")]
        policy: Arc<str>,
        /// When the grant ends: the earliest of the bounds in `bounds`.
        expires_at: Timestamp,
        /// Each bound on the expiry and which one decided it, so a client can say why its
        /// grant ends when it does ("your sign-in ends at 17:00").
        bounds: GrantBounds,
    },
    /// Access is denied.
    Deny {
        /// Every failed condition: the account and device checks, then those of the policy
        /// closest to allowing. Never empty.
        reasons: Vec<DenyReason>,
        /// The policy the reasons come from, if any policy covers the resource.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        closest_policy: Option<String>,
    },
}

impl Decision {
    /// Whether access is allowed.
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The grant's end, if allowed.
    pub fn expires_at(&self) -> Option<Timestamp> {
        match self {
            Decision::Allow { expires_at, .. } => Some(*expires_at),
            Decision::Deny { .. } => None,
        }
    }

    /// The reasons for a denial (empty when allowed).
    pub fn reasons(&self) -> &[DenyReason] {
        match self {
            Decision::Allow { .. } => &[],
            Decision::Deny { reasons, .. } => reasons,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow {
                policy,
                expires_at,
                bounds,
            } => write!(
                f,
                "allowed by policy {policy} until {expires_at} ({})",
                bounds.limited_by
            ),
            Decision::Deny { reasons, .. } => {
                f.write_str("denied:")?;
                for r in reasons {
                    write!(f, "\n- {r}")?;
                }
                Ok(())
            }
        }
    }
}

/// The bounds on a grant's expiry. The grant ends at the earliest of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantBounds {
    /// `now` + the policy's maximum grant duration.
    pub policy_cap: Timestamp,
    /// When the login session ends for this policy: the earlier of the session's own expiry
    /// and sign-in time + the policy's session lifetime.
    pub session_end: Timestamp,
    /// When the current access window closes; `None` if the policy has no windows.
    pub window_end: Option<Timestamp>,
    /// When the approved access request's window closes; `None` if the policy needs none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_end: Option<Timestamp>,
    /// When the user's vendor contract ends; `None` for staff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract_end: Option<Timestamp>,
    /// Which bound is the earliest (ties: policy cap, session, window, approval, contract).
    pub limited_by: Bound,
}

impl GrantBounds {
    pub(crate) fn with_ends(
        policy_cap: Timestamp,
        session_end: Timestamp,
        window_end: Option<Timestamp>,
        approval_end: Option<Timestamp>,
        contract_end: Option<Timestamp>,
    ) -> Self {
        let mut limited_by = Bound::PolicyCap;
        let mut earliest = policy_cap;
        for (bound, at) in [
            (Bound::SessionEnd, Some(session_end)),
            (Bound::WindowEnd, window_end),
            (Bound::ApprovalEnd, approval_end),
            (Bound::ContractEnd, contract_end),
        ] {
            if let Some(at) = at
                && at < earliest
            {
                limited_by = bound;
                earliest = at;
            }
        }
        GrantBounds {
            policy_cap,
            session_end,
            window_end,
            approval_end,
            contract_end,
            limited_by,
        }
    }

    /// The earliest bound: the grant's expiry.
    pub fn expires_at(&self) -> Timestamp {
        [self.window_end, self.approval_end, self.contract_end]
            .into_iter()
            .flatten()
            .fold(self.policy_cap.min(self.session_end), Timestamp::min)
    }

    /// Whether asking again before the end can give a later end: not when the end is fixed
    /// by a window, an approved request or a contract (only a new approval or window would),
    /// so clients then let the grant run out instead of renewing.
    pub fn renewable(&self) -> bool {
        matches!(self.limited_by, Bound::PolicyCap | Bound::SessionEnd)
    }
}

/// Which limit ends a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// The policy's maximum grant duration.
    PolicyCap,
    /// The end of the login session.
    SessionEnd,
    /// The end of the current access window.
    WindowEnd,
    /// The end of the approved access request's window.
    ApprovalEnd,
    /// The end of the vendor's contract.
    ContractEnd,
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Bound::PolicyCap => "the policy's longest grant",
            Bound::SessionEnd => "the end of your sign-in",
            Bound::WindowEnd => "the end of the access window",
            Bound::ApprovalEnd => "the end of your approved access window",
            Bound::ContractEnd => "the end of your organisation's contract",
        })
    }
}

/// One failed condition, with a message (its `Display`) that tells a clinician what to do.
///
/// The serde form is for machines (audit rows, the admin API): a `reason` code plus the
/// data; [`DenyReason::code`] gives the same code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum DenyReason {
    /// No resource has that name.
    UnknownResource {
        /// The name asked for.
        resource: String,
    },
    /// No policy covers the resource: deny by default.
    NoPolicy {
        /// The resource.
        resource: String,
    },
    /// The user's account is disabled.
    UserDisabled,
    /// The device is not (or no longer) approved.
    DeviceNotApproved {
        /// Its enrolment state.
        status: DeviceStatus,
    },
    /// The user is in none of the policy's groups.
    NotInGroup {
        /// The resource.
        resource: String,
        /// The policy's groups, any of which would do.
        needs: Vec<String>,
    },
    /// The login session has ended (for this policy).
    SessionExpired {
        /// When it ended.
        at: Timestamp,
    },
    /// The policy needs MFA and the sign-in did not use it.
    MfaRequired,
    /// The policy needs posture and the device never reported.
    NoPostureReport,
    /// The last posture report is older than the profile allows.
    PostureStale {
        /// When it was received.
        reported_at: Timestamp,
        /// The profile's maximum age.
        max_age: SignedDuration,
    },
    /// The profile lists allowed operating systems and this is not one of them.
    OsNotAllowed {
        /// The OS reported.
        os: String,
        /// The OSes allowed.
        allowed: Vec<String>,
    },
    /// The profile needs a minimum OS version and the device could not say its version.
    OsVersionUnknown {
        /// The OS reported.
        os: String,
    },
    /// The OS is older than the profile's minimum.
    OsTooOld {
        /// The OS reported.
        os: String,
        /// The minimum.
        min: Version,
        /// The version reported.
        have: Version,
    },
    /// Disk encryption is needed and is off or unknown.
    DiskNotEncrypted {
        /// `no` or `unknown`.
        state: Tri,
    },
    /// A firewall is needed and is off or unknown.
    FirewallOff {
        /// `no` or `unknown`.
        state: Tri,
    },
    /// A screen lock is needed and is off or unknown.
    ScreenLockOff {
        /// `no` or `unknown`.
        state: Tri,
    },
    /// A required process is not running.
    ProcessNotRunning {
        /// Its name.
        process: String,
    },
    /// The Wardgate client is older than the profile's minimum (or did not say).
    ClientTooOld {
        /// The minimum.
        min: Version,
        /// The version reported, if any.
        have: Option<Version>,
    },
    /// Break-glass asked for a resource not marked for emergencies.
    NotEmergency {
        /// The resource.
        resource: String,
    },
    /// Break-glass asked for an emergency resource no policy allows break-glass for.
    NoBreakGlassPolicy {
        /// The resource.
        resource: String,
    },
    /// Break-glass without a reason.
    ReasonRequired,
    /// Break-glass with a reason longer than the limit.
    ReasonTooLong {
        /// The limit, in characters.
        max: usize,
    },
    /// Break-glass from a sign-in without MFA (always required, whatever the policy says).
    BreakGlassMfaRequired,
    /// A WireGuard export asked under no policy that allows it for the resource.
    ExportNotAllowed {
        /// The resource.
        resource: String,
    },
    /// A WireGuard export whose end is not in the future.
    ExportEndsInPast,
    /// None of the policy's windows is open now.
    OutsideWindow {
        /// The windows in words ("Tuesdays 14:00–16:00 Europe/Berlin; …").
        windows: String,
        /// How many windows the policy has (for "window" vs "windows").
        count: usize,
        /// When the next one opens, if within two weeks.
        next_opening: Option<Timestamp>,
        /// The same on the opening window's wall clock ("Tue 1 Apr 2025 14:00 CEST").
        next_opening_local: Option<String>,
    },
    /// The policy needs an approved access request and there is none for now or later.
    ApprovalRequired {
        /// The resource.
        resource: String,
        /// The group whose members approve.
        approvers: String,
    },
    /// An approved window exists but has not started.
    ApprovalNotYet {
        /// The request.
        request_id: i64,
        /// When it opens.
        starts_at: Timestamp,
        /// The same on the policy's wall clock ("Tue 25 Mar 2025 14:00 CET").
        starts_local: String,
    },
    /// The user's vendor contract has ended.
    ContractEnded {
        /// The vendor.
        vendor: String,
        /// The contract reference.
        contract_ref: String,
        /// Its last day.
        end_date: String,
    },
}

impl DenyReason {
    /// The machine-readable code (the serde tag), e.g. `not_in_group`, for APIs whose clients
    /// show [`Display`](fmt::Display) text but switch on codes.
    pub fn code(&self) -> &'static str {
        match self {
            DenyReason::UnknownResource { .. } => "unknown_resource",
            DenyReason::NoPolicy { .. } => "no_policy",
            DenyReason::UserDisabled => "user_disabled",
            DenyReason::DeviceNotApproved { .. } => "device_not_approved",
            DenyReason::NotInGroup { .. } => "not_in_group",
            DenyReason::SessionExpired { .. } => "session_expired",
            DenyReason::MfaRequired => "mfa_required",
            DenyReason::NoPostureReport => "no_posture_report",
            DenyReason::PostureStale { .. } => "posture_stale",
            DenyReason::OsNotAllowed { .. } => "os_not_allowed",
            DenyReason::OsVersionUnknown { .. } => "os_version_unknown",
            DenyReason::OsTooOld { .. } => "os_too_old",
            DenyReason::DiskNotEncrypted { .. } => "disk_not_encrypted",
            DenyReason::FirewallOff { .. } => "firewall_off",
            DenyReason::ScreenLockOff { .. } => "screen_lock_off",
            DenyReason::ProcessNotRunning { .. } => "process_not_running",
            DenyReason::ClientTooOld { .. } => "client_too_old",
            DenyReason::OutsideWindow { .. } => "outside_window",
            DenyReason::NotEmergency { .. } => "not_emergency",
            DenyReason::NoBreakGlassPolicy { .. } => "no_break_glass_policy",
            DenyReason::ReasonRequired => "reason_required",
            DenyReason::ReasonTooLong { .. } => "reason_too_long",
            DenyReason::BreakGlassMfaRequired => "break_glass_mfa_required",
            DenyReason::ExportNotAllowed { .. } => "export_not_allowed",
            DenyReason::ExportEndsInPast => "export_ends_in_past",
            DenyReason::ApprovalRequired { .. } => "approval_required",
            DenyReason::ApprovalNotYet { .. } => "approval_not_yet",
            DenyReason::ContractEnded { .. } => "contract_ended",
        }
    }

    /// Whether the reason is about the device's posture, the part that changes with each
    /// report and that re-evaluation on a new report cares about.
    pub fn is_posture(&self) -> bool {
        matches!(
            self,
            DenyReason::NoPostureReport
                | DenyReason::PostureStale { .. }
                | DenyReason::OsNotAllowed { .. }
                | DenyReason::OsVersionUnknown { .. }
                | DenyReason::OsTooOld { .. }
                | DenyReason::DiskNotEncrypted { .. }
                | DenyReason::FirewallOff { .. }
                | DenyReason::ScreenLockOff { .. }
                | DenyReason::ProcessNotRunning { .. }
                | DenyReason::ClientTooOld { .. }
        )
    }
}

/// "Turn on X", or, when the client could not tell, what to do about that.
fn tri_fix(f: &mut fmt::Formatter<'_>, state: Tri, thing: &str) -> fmt::Result {
    match state {
        Tri::Unknown => write!(
            f,
            "Wardgate could not confirm that {thing} is on: turn it on, or ask the IT service \
             desk to check this device"
        ),
        Tri::No | Tri::Yes => write!(f, "Turn on {thing}"),
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::UnknownResource { resource } => {
                write!(f, "There is no resource called {resource}: check the name")
            }
            DenyReason::NoPolicy { resource } => {
                write!(f, "No policy gives you access to {resource}")
            }
            DenyReason::UserDisabled => {
                f.write_str("Your account is disabled: contact the IT service desk")
            }
            DenyReason::DeviceNotApproved { status } => match status {
                DeviceStatus::Pending => f.write_str(
                    "This device is not approved yet: ask the IT service desk to approve it",
                ),
                DeviceStatus::Revoked => f.write_str(
                    "This device is not approved: its access was revoked; contact the IT \
                     service desk",
                ),
                DeviceStatus::Denied | DeviceStatus::Approved => f.write_str(
                    "This device is not approved: its enrolment was refused; contact the IT \
                     service desk",
                ),
            },
            DenyReason::NotInGroup { resource, needs } => write!(
                f,
                "You are not in a group that may use {resource} (needs: {})",
                needs.join(" or ")
            ),
            DenyReason::SessionExpired { .. } => {
                f.write_str("Your sign-in has expired: run wardgate login")
            }
            DenyReason::MfaRequired => f.write_str(
                "This resource needs multi-factor sign-in: sign in again with MFA \
                 (wardgate login)",
            ),
            DenyReason::NoPostureReport => f.write_str(
                "This device has not sent its security check yet: make sure Wardgate is \
                 running, then try again",
            ),
            DenyReason::PostureStale { reported_at, .. } => write!(
                f,
                "This device's last security check is out of date (received {reported_at}): \
                 make sure Wardgate is running and connected, then try again"
            ),
            DenyReason::OsNotAllowed { os, allowed } => write!(
                f,
                "This operating system ({os}) may not be used here (allowed: {}): use another \
                 device",
                allowed.join(", ")
            ),
            DenyReason::OsVersionUnknown { os } => write!(
                f,
                "Wardgate could not read the version of the operating system ({os}): ask the \
                 IT service desk to check this device"
            ),
            DenyReason::OsTooOld { min, have, .. } => write!(
                f,
                "Update the operating system to {min} or later (this device has {have})"
            ),
            DenyReason::DiskNotEncrypted { state } => tri_fix(f, *state, "disk encryption"),
            DenyReason::FirewallOff { state } => tri_fix(f, *state, "the firewall"),
            DenyReason::ScreenLockOff { state } => tri_fix(f, *state, "the screen lock"),
            DenyReason::ProcessNotRunning { process } => write!(
                f,
                "Start {process}: it must be running on this device (ask the IT service desk \
                 if it is missing)"
            ),
            DenyReason::ClientTooOld { min, have } => match have {
                Some(have) => write!(
                    f,
                    "Update Wardgate to {min} or later (this device has {have})"
                ),
                None => write!(f, "Update Wardgate to {min} or later"),
            },
            DenyReason::NotEmergency { resource } => write!(
                f,
                "{resource} is not an emergency resource: break-glass cannot be used for it; \
                 use wardgate connect, or call the IT service desk"
            ),
            DenyReason::NoBreakGlassPolicy { resource } => write!(
                f,
                "No policy allows break-glass for {resource}: call the IT service desk"
            ),
            DenyReason::ReasonRequired => f.write_str(
                "Break-glass needs a reason: say why in --reason (e.g. \"stroke code, CT \
                 review\"); it is recorded and reviewed",
            ),
            DenyReason::ReasonTooLong { max } => write!(
                f,
                "The break-glass reason is too long: keep it under {max} characters"
            ),
            DenyReason::BreakGlassMfaRequired => f.write_str(
                "Break-glass needs multi-factor sign-in: sign in again with your one-time code \
                 (wardgate login), then retry",
            ),
            DenyReason::ExportNotAllowed { resource } => write!(
                f,
                "No policy allows a WireGuard export for {resource}: set wireguard_export on \
                 the policy first"
            ),
            DenyReason::ExportEndsInPast => {
                f.write_str("The export's end time has passed: give an end in the future")
            }
            DenyReason::OutsideWindow {
                windows,
                count,
                next_opening_local,
                ..
            } => {
                let noun = if *count == 1 { "window" } else { "windows" };
                write!(f, "Outside the access {noun} ({windows})")?;
                match next_opening_local {
                    Some(at) => write!(f, "; next opening: {at}"),
                    None => f.write_str("; it does not open in the next two weeks"),
                }
            }
            DenyReason::ApprovalRequired {
                resource,
                approvers,
            } => write!(
                f,
                "{resource} needs an approved access request: ask with `wardgate request \
                 {resource} --for 2h --reason …`; a member of {approvers} approves it"
            ),
            DenyReason::ApprovalNotYet {
                request_id,
                starts_local,
                ..
            } => write!(
                f,
                "Your approved window starts at {starts_local} (request {request_id}): connect \
                 then"
            ),
            DenyReason::ContractEnded {
                vendor,
                contract_ref,
                end_date,
            } => write!(
                f,
                "Vendor contract {contract_ref} ({vendor}) ended on {end_date}: ask your sponsor \
                 to renew it"
            ),
        }
    }
}
