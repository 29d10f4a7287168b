//! The policy engine (NIST SP 800-207 "PE"): a pure function from an access request, the
//! facts about who asks, the policy set and the time to a [`Decision`].
//!
//! # The model
//!
//! - A [`Resource`] is something clinicians reach (`ehr-web`): its addresses, the rules a grant
//!   for it opens (prefix + protocol + ports, the same [`Rule`](wardgate_common::rule::Rule)s
//!   gateways enforce), the gateways that serve it, labels such as `phi`, and whether
//!   break-glass may be used for it.
//! - A [`Policy`] gives groups access to resources under [`Conditions`]: MFA, a
//!   [`PostureProfile`], weekly [windows](WindowSpec) in a named time zone, the longest grant
//!   and the longest a sign-in may be used.
//! - A [`PolicySet`] holds all of them plus the known group and gateway names;
//!   [`validate()`] checks it as a whole and [`CompiledPolicies::new`] indexes it for deciding.
//! - The caller passes an [`AccessRequest`] (who, from which device, for which resource) and
//!   the [`Facts`] it gathered (groups, MFA, the login [`Session`], device status, whether the
//!   account is disabled, the last [`PostureReport`]). The engine reads nothing else: no
//!   store, no clock, no network. `now` is a parameter.
//!
//! # The rules
//!
//! - **Deny by default.** No resource or no policy for it: denied ("No policy gives you access
//!   to X"). Every condition must positively hold: an unknown posture fact ([`Tri::Unknown`])
//!   fails, a stale report fails, a device that is not `approved` fails.
//! - **Any policy may allow.** Policies are a union; when several allow, the grant follows the
//!   one giving the latest expiry (ties: policy-set order).
//! - **All reasons listed.** A denial carries every failed condition — the account and device
//!   checks, then every failure of the policy closest to allowing (the user's groups first,
//!   then fewest failures, then policy-set order) — each with a message a clinician can act on.
//!   See [`decide`] for the details and [`explain`] for the per-policy dry run.
//! - **Expiry bound.** An allowed grant ends at the earliest of `now` + the policy's maximum
//!   grant, the end of the login session (for this policy), and the end of the current access
//!   window; [`GrantBounds`] says which one it was.
//!
//! # Performance
//!
//! [`CompiledPolicies`] is built once per policy-set change: resources are a hash map to their
//! policies' indices, windows are parsed with zones resolved, profiles attached. A decision
//! that allows does one map lookup, compares a few strings and timestamps, and allocates
//! nothing (the policy name is a shared `Arc<str>`); only denials and explanations allocate,
//! for their words.
//!
//! # Special requests
//!
//! Break-glass (issue 7) is a kind of request for resources whose `emergency` flag is set,
//! decided by [`CompiledPolicies::decide_break_glass`] with its own rules (reason and MFA
//! required, windows skipped, a short cap); [`CompiledPolicies::decide_export`] decides the
//! opt-in WireGuard export for devices that cannot run the client. Posture
//! re-evaluation (issue 6) re-runs [`decide`] on each report; [`DenyReason::is_posture`] tells
//! the posture failures apart.

mod decision;
mod engine;
mod model;
mod posture;
mod request;
mod special;
mod validate;
mod window;

#[cfg(test)]
mod tests;

pub use decision::{Bound, Decision, DenyReason, GrantBounds};
pub use engine::{
    ApprovalRule, Check, CompiledPolicies, Condition, Explanation, Outcome, PolicyExplanation,
    PostureVerdict, decide, explain,
};
pub use model::{Approval, BreakGlass, Conditions, Policy, PolicySet, Resource};
pub use posture::{PostureProfile, PostureReport, Tri, Version, VersionError};
pub use request::{AccessRequest, ApprovedWindow, Facts, Session, VendorContract};
pub use special::{BreakGlassDecision, ExportDecision, MAX_REASON_LEN};
pub use validate::{ValidationError, validate};
pub use window::{Weekdays, Window, WindowError, WindowSpec, local_text, time_zone};
