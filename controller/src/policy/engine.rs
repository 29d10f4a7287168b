//! The decision itself: [`CompiledPolicies`] (built once per policy-set version) and the
//! pure [`decide`] and [`explain`] over it.
//!
//! One evaluation routine serves both: it reports each condition to a [`Sink`]. `decide`
//! first runs it with a sink that only counts failures (no allocation on the allow path),
//! then, if nothing allows, once more with a sink that collects the reasons of the closest
//! policy; `explain` runs it with a sink that records every check. So the dry run cannot
//! disagree with the real decision.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use super::decision::{Decision, DenyReason, GrantBounds};
use super::model::{PolicySet, Resource, arc_str};
use super::posture::{OsRule, PostureProfile, Tri};
use super::request::{AccessRequest, Facts};
use super::validate::{ValidationError, validate};
use super::window::{Window, Windows};
use crate::store::DeviceStatus;

/// A validated policy set, indexed for fast decisions: resources by name, each with the
/// indices of the policies that cover it (in policy-set order); windows parsed and their zones
/// resolved; posture profiles attached to their policies; durations converted.
///
/// Build it once per change of the policy set ([`CompiledPolicies::new`]) and share it
/// (read-only) between all decisions; a set that does not validate cannot be compiled.
#[derive(Debug, Clone)]
pub struct CompiledPolicies {
    pub(super) resources: HashMap<String, CompiledResource>,
    pub(super) policies: Vec<CompiledPolicy>,
}

#[derive(Debug, Clone)]
pub(super) struct CompiledResource {
    pub(super) resource: Resource,
    /// Indices into `CompiledPolicies::policies`, in policy-set order.
    pub(super) policies: Vec<usize>,
}

#[derive(Debug, Clone)]
pub(super) struct CompiledPolicy {
    pub(super) name: Arc<str>,
    pub(super) groups: Vec<String>,
    mfa_required: bool,
    posture: Option<Arc<PostureProfile>>,
    max_report_age: SignedDuration,
    pub(super) windows: Windows,
    pub(super) max_grant: SignedDuration,
    pub(super) session_lifetime: SignedDuration,
    approval: Option<ApprovalRule>,
    /// Where instants are shown in this policy's denials: its first window's zone, or UTC.
    zone: jiff::tz::TimeZone,
    /// The break-glass cap, if the policy allows break-glass.
    pub(super) break_glass: Option<SignedDuration>,
    /// Whether grants may be exported as WireGuard configurations.
    pub(super) wireguard_export: bool,
}

/// A policy's approval condition, as the policy administrator needs it when a request is
/// made or approved ([`CompiledPolicies::approvals_for`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApprovalRule {
    /// The policy.
    pub policy: String,
    /// Whose members approve.
    pub approvers: String,
    /// Longest window one request may ask for.
    pub max_window: SignedDuration,
}

impl CompiledPolicies {
    /// Validates `set` and compiles it. Any validation error refuses the whole set: a policy
    /// change that does not validate is never half-applied.
    pub fn new(set: &PolicySet) -> Result<Self, Vec<ValidationError>> {
        validate(set)?;
        let mut errors = Vec::new();
        let profiles: HashMap<&str, Arc<PostureProfile>> = set
            .posture_profiles
            .iter()
            .map(|p| (p.name.as_str(), Arc::new(p.clone())))
            .collect();
        let mut resources: HashMap<String, CompiledResource> = set
            .resources
            .iter()
            .map(|r| {
                let compiled = CompiledResource {
                    resource: r.clone(),
                    policies: Vec::new(),
                };
                (r.name.clone(), compiled)
            })
            .collect();
        let mut policies = Vec::with_capacity(set.policies.len());
        for (index, p) in set.policies.iter().enumerate() {
            let c = &p.conditions;
            let mut windows = Vec::with_capacity(c.windows.len());
            for (w, spec) in c.windows.iter().enumerate() {
                match Window::parse(spec) {
                    Ok(window) => windows.push(window),
                    Err(problems) => {
                        errors.extend(problems.into_iter().map(|problem| {
                            ValidationError::BadWindow {
                                policy: p.name.clone(),
                                window: w + 1,
                                problem,
                            }
                        }));
                    }
                }
            }
            let posture = match &c.posture_profile {
                None => None,
                Some(name) => match profiles.get(name.as_str()) {
                    Some(profile) => Some(Arc::clone(profile)),
                    None => {
                        errors.push(ValidationError::UnknownPostureProfile {
                            policy: p.name.clone(),
                            profile: name.clone(),
                        });
                        None
                    }
                },
            };
            let max_report_age = posture
                .as_ref()
                .map_or(SignedDuration::ZERO, |p| duration(p.max_report_age));
            for r in &p.resources {
                if let Some(res) = resources.get_mut(r.as_str()) {
                    // A policy naming a resource twice still counts once.
                    if res.policies.last() != Some(&index) {
                        res.policies.push(index);
                    }
                }
            }
            let zone = windows
                .first()
                .map_or(jiff::tz::TimeZone::UTC, |w| w.time_zone().clone());
            policies.push(CompiledPolicy {
                approval: c.approval.as_ref().map(|a| ApprovalRule {
                    policy: p.name.clone(),
                    approvers: a.approvers.clone(),
                    max_window: duration(a.max_window),
                }),
                zone,
                name: p.name.as_str().into(),
                groups: p.groups.clone(),
                mfa_required: c.mfa_required,
                posture,
                max_report_age,
                windows: Windows::new(windows),
                max_grant: duration(c.max_grant),
                session_lifetime: duration(c.session_lifetime),
                break_glass: c.break_glass.map(|b| duration(b.cap)),
                wireguard_export: c.wireguard_export,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(CompiledPolicies {
            resources,
            policies,
        })
    }

    /// The resource called `name`, for building a grant after an allow (its rules and
    /// gateways) or for showing its labels.
    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.get(name).map(|r| &r.resource)
    }

    /// Decides `request`; see [`decide`].
    pub fn decide(&self, request: &AccessRequest, facts: &Facts, now: Timestamp) -> Decision {
        decide(request, facts, self, now)
    }

    /// Explains `request`; see [`explain`].
    pub fn explain(&self, request: &AccessRequest, facts: &Facts, now: Timestamp) -> Explanation {
        explain(request, facts, self, now)
    }

    /// How each policy with a posture profile that could apply to the user (one of its groups
    /// is theirs) judges `facts.posture` at `now`, in policy-set order, so a posture report
    /// can be audited with pass/fail per policy and the client told what to fix before
    /// anything is even asked for — without telling a clinician to start a vendor's agent.
    /// Only the posture checks are made: windows and the rest are for [`decide`].
    pub fn posture_verdicts(&self, facts: &Facts, now: Timestamp) -> Vec<PostureVerdict> {
        self.policies
            .iter()
            .filter(|p| p.groups.iter().any(|g| facts.in_group(g)))
            .filter_map(|p| {
                let profile = p.posture.as_ref()?;
                let mut sink = Collect::default();
                check_posture(profile, p.max_report_age, facts, now, &mut sink);
                Some(PostureVerdict {
                    policy: p.name.to_string(),
                    profile: profile.name.clone(),
                    pass: sink.reasons.is_empty(),
                    reasons: sink.reasons,
                })
            })
            .collect()
    }

    /// The shortest maximum report age of any policy with a posture profile (`None`: no
    /// policy checks posture). A report younger than this is fresh for every policy, so a
    /// staleness sweep needs to look only at devices whose report is older.
    pub fn shortest_report_age(&self) -> Option<SignedDuration> {
        self.policies
            .iter()
            .filter(|p| p.posture.is_some())
            .map(|p| p.max_report_age)
            .min()
    }

    /// The approval conditions of the policies covering `resource` that could apply to a
    /// member of `groups`, in policy-set order. Empty: no policy for this user needs an
    /// approved request for it.
    pub fn approvals_for(&self, resource: &str, groups: &[String]) -> Vec<ApprovalRule> {
        let Some(r) = self.resources.get(resource) else {
            return Vec::new();
        };
        r.policies
            .iter()
            .filter_map(|&i| self.policies.get(i))
            .filter(|p| p.groups.iter().any(|g| groups.contains(g)))
            .filter_map(|p| p.approval.clone())
            .collect()
    }

    /// Every process name some posture profile requires, sorted and without repeats, so the
    /// client knows what to look for.
    pub fn required_processes(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .policies
            .iter()
            .filter_map(|p| p.posture.as_ref())
            .flat_map(|p| p.required_processes.iter().cloned())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// One policy's verdict on a device's posture ([`CompiledPolicies::posture_verdicts`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostureVerdict {
    /// The policy.
    pub policy: String,
    /// Its posture profile.
    pub profile: String,
    /// Whether the posture satisfies the profile.
    pub pass: bool,
    /// Every failed posture check (empty when it passes).
    pub reasons: Vec<DenyReason>,
}

/// Durations beyond `SignedDuration`'s range (about 292 billion years) are clamped.
pub(super) fn duration(d: std::time::Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

/// Decides whether `request` is allowed at `now`, from `facts` and the compiled policies.
///
/// Pure: no IO, no clock (time is `now`), no randomness; the same inputs always give the same
/// decision. The rules:
///
/// - **Deny by default.** An unknown resource, or one no policy covers, is denied, with that
///   as the only reason (nothing else the user could fix would change the answer).
/// - **Union of policies.** The request is allowed if any policy covering the resource
///   allows it: the user is in one of its groups, the account is enabled, the device
///   approved, the sign-in within the session's end, MFA used if required, the posture
///   profile (if any) satisfied by a fresh report, and one of its windows (if any) open.
/// - **Expiry** is the earliest of `now` + the policy's maximum grant, the session's end
///   (its own expiry or sign-in + the policy's session lifetime, whichever is earlier), and
///   the current window's end. If several policies allow, the one giving the **latest**
///   expiry is chosen (ties: the first in the policy set): each allowing policy would justify
///   the grant alone, so the user gets the longest of them, and renewal decides afresh.
/// - **Every reason.** A denial lists every failed condition, not the first: the account and
///   device checks, then all failures of the **closest** policy — preferring policies whose
///   groups include the user, then the fewest failures, then policy-set order. One policy's
///   reasons, not a mix of several, so the list is one complete recipe for getting in.
pub fn decide(
    request: &AccessRequest,
    facts: &Facts,
    policies: &CompiledPolicies,
    now: Timestamp,
) -> Decision {
    let resource = match lookup(request, policies) {
        Ok(r) => r,
        Err(reason) => {
            return Decision::Deny {
                reasons: vec![reason],
                closest_policy: None,
            };
        }
    };
    let mut subject = Count::default();
    check_subject(facts, now, &mut subject);

    let mut best_allow: Option<(&CompiledPolicy, GrantBounds)> = None;
    let mut closest: Option<(&CompiledPolicy, (bool, u32))> = None;
    for &i in &resource.policies {
        let Some(policy) = policies.policies.get(i) else {
            continue;
        };
        let mut count = Count::default();
        let eval = check_policy(policy, &resource.resource.name, facts, now, &mut count);
        if subject.failures == 0 && count.failures == 0 {
            let better = best_allow
                .as_ref()
                .is_none_or(|(_, b)| eval.bounds.expires_at() > b.expires_at());
            if better {
                best_allow = Some((policy, eval.bounds));
            }
        }
        let rank = (!eval.in_group, count.failures);
        if closest.as_ref().is_none_or(|(_, r)| rank < *r) {
            closest = Some((policy, rank));
        }
    }

    if let Some((policy, bounds)) = best_allow {
        return Decision::Allow {
            policy: Arc::clone(&policy.name),
            expires_at: bounds.expires_at(),
            bounds,
        };
    }
    let mut reasons = Collect::default();
    check_subject(facts, now, &mut reasons);
    if let Some((policy, _)) = closest {
        check_policy(policy, &resource.resource.name, facts, now, &mut reasons);
    }
    Decision::Deny {
        reasons: reasons.reasons,
        closest_policy: closest.map(|(p, _)| p.name.to_string()),
    }
}

/// The resource and its policies, or why there is nothing to evaluate.
fn lookup<'a>(
    request: &AccessRequest,
    policies: &'a CompiledPolicies,
) -> Result<&'a CompiledResource, DenyReason> {
    let Some(resource) = policies.resources.get(request.resource.as_str()) else {
        return Err(DenyReason::UnknownResource {
            resource: request.resource.clone(),
        });
    };
    if resource.policies.is_empty() {
        return Err(DenyReason::NoPolicy {
            resource: request.resource.clone(),
        });
    }
    Ok(resource)
}

/// A condition the engine checks, named for explanations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "condition", content = "name", rename_all = "snake_case")]
pub enum Condition {
    /// The account is enabled.
    Account,
    /// The device is approved.
    Device,
    /// The user is in one of the policy's groups.
    Group,
    /// The login session has not ended.
    Session,
    /// MFA was used.
    Mfa,
    /// A fresh posture report exists (when the policy names a profile).
    PostureReport,
    /// The OS is allowed and recent enough.
    OsVersion,
    /// Disk encryption is on.
    DiskEncryption,
    /// The firewall is on.
    Firewall,
    /// The screen lock is on.
    ScreenLock,
    /// A required process runs.
    Process(String),
    /// The Wardgate client is recent enough.
    ClientVersion,
    /// An access window is open.
    Window,
    /// An approved access request's window is open.
    Approval,
    /// The vendor's contract has not ended.
    VendorContract,
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::Account => f.write_str("account enabled"),
            Condition::Device => f.write_str("device approved"),
            Condition::Group => f.write_str("group membership"),
            Condition::Session => f.write_str("sign-in still valid"),
            Condition::Mfa => f.write_str("multi-factor sign-in"),
            Condition::PostureReport => f.write_str("fresh security check from the device"),
            Condition::OsVersion => f.write_str("operating system allowed and up to date"),
            Condition::DiskEncryption => f.write_str("disk encryption on"),
            Condition::Firewall => f.write_str("firewall on"),
            Condition::ScreenLock => f.write_str("screen lock on"),
            Condition::Process(p) => write!(f, "{p} running"),
            Condition::ClientVersion => f.write_str("Wardgate up to date"),
            Condition::Window => f.write_str("inside an access window"),
            Condition::Approval => f.write_str("inside an approved access request's window"),
            Condition::VendorContract => f.write_str("vendor contract in force"),
        }
    }
}

/// Where the evaluation reports each condition. Closures keep the allow path free of
/// allocation: only sinks that keep the details call them.
pub(super) trait Sink {
    fn pass(&mut self, condition: impl FnOnce() -> Condition);
    fn fail(&mut self, condition: impl FnOnce() -> Condition, reason: impl FnOnce() -> DenyReason);
    fn not_required(&mut self, condition: impl FnOnce() -> Condition);

    fn check(
        &mut self,
        ok: bool,
        condition: impl FnOnce() -> Condition,
        reason: impl FnOnce() -> DenyReason,
    ) {
        if ok {
            self.pass(condition);
        } else {
            self.fail(condition, reason);
        }
    }
}

/// Counts failures; allocates nothing.
#[derive(Default)]
struct Count {
    failures: u32,
}

impl Sink for Count {
    fn pass(&mut self, _: impl FnOnce() -> Condition) {}
    fn fail(&mut self, _: impl FnOnce() -> Condition, _: impl FnOnce() -> DenyReason) {
        self.failures += 1;
    }
    fn not_required(&mut self, _: impl FnOnce() -> Condition) {}
}

/// Collects the reasons of failures.
#[derive(Default)]
pub(super) struct Collect {
    pub(super) reasons: Vec<DenyReason>,
}

impl Sink for Collect {
    fn pass(&mut self, _: impl FnOnce() -> Condition) {}
    fn fail(&mut self, _: impl FnOnce() -> Condition, reason: impl FnOnce() -> DenyReason) {
        self.reasons.push(reason());
    }
    fn not_required(&mut self, _: impl FnOnce() -> Condition) {}
}

/// Records every check.
#[derive(Default)]
struct Record {
    checks: Vec<Check>,
}

impl Sink for Record {
    fn pass(&mut self, condition: impl FnOnce() -> Condition) {
        self.checks.push(Check {
            condition: condition(),
            outcome: Outcome::Passed,
        });
    }
    fn fail(&mut self, condition: impl FnOnce() -> Condition, reason: impl FnOnce() -> DenyReason) {
        let reason = reason();
        self.checks.push(Check {
            condition: condition(),
            outcome: Outcome::Failed {
                message: reason.to_string(),
                reason,
            },
        });
    }
    fn not_required(&mut self, condition: impl FnOnce() -> Condition) {
        self.checks.push(Check {
            condition: condition(),
            outcome: Outcome::NotRequired,
        });
    }
}

/// Checks that do not depend on the policy: the account and the device.
pub(super) fn check_subject(facts: &Facts, now: Timestamp, sink: &mut impl Sink) {
    sink.check(
        !facts.user_disabled,
        || Condition::Account,
        || DenyReason::UserDisabled,
    );
    sink.check(
        facts.device == DeviceStatus::Approved,
        || Condition::Device,
        || DenyReason::DeviceNotApproved {
            status: facts.device,
        },
    );
    if let Some(v) = &facts.vendor {
        sink.check(
            now < v.ends_at,
            || Condition::VendorContract,
            || DenyReason::ContractEnded {
                vendor: v.vendor.clone(),
                contract_ref: v.contract_ref.clone(),
                end_date: v.end_date.clone(),
            },
        );
    }
}

/// What evaluating one policy found besides its failures.
struct PolicyEval {
    in_group: bool,
    /// The grant's bounds, meaningful when nothing failed.
    bounds: GrantBounds,
}

/// Checks every condition of one policy, in the order a clinician would fix them.
fn check_policy(
    policy: &CompiledPolicy,
    resource: &str,
    facts: &Facts,
    now: Timestamp,
    sink: &mut impl Sink,
) -> PolicyEval {
    let in_group = policy.groups.iter().any(|g| facts.in_group(g));
    sink.check(
        in_group,
        || Condition::Group,
        || DenyReason::NotInGroup {
            resource: resource.to_owned(),
            needs: policy.groups.clone(),
        },
    );

    let lifetime_end = facts
        .session
        .started_at
        .checked_add(policy.session_lifetime)
        .unwrap_or(Timestamp::MAX);
    let session_end = facts
        .session
        .expires_at
        .map_or(lifetime_end, |e| e.min(lifetime_end));
    sink.check(
        now < session_end,
        || Condition::Session,
        || DenyReason::SessionExpired { at: session_end },
    );

    if policy.mfa_required {
        sink.check(facts.mfa, || Condition::Mfa, || DenyReason::MfaRequired);
    } else {
        sink.not_required(|| Condition::Mfa);
    }

    match &policy.posture {
        None => sink.not_required(|| Condition::PostureReport),
        Some(profile) => check_posture(profile, policy.max_report_age, facts, now, sink),
    }

    let mut window_end = None;
    if policy.windows.is_empty() {
        sink.not_required(|| Condition::Window);
    } else if policy.windows.contains(now) {
        window_end = policy.windows.current_end(now);
        sink.pass(|| Condition::Window);
    } else {
        sink.fail(
            || Condition::Window,
            || {
                let next = policy.windows.next_opening(now);
                DenyReason::OutsideWindow {
                    windows: policy.windows.text().to_owned(),
                    count: policy.windows.len(),
                    next_opening: next.as_ref().map(|o| o.at),
                    next_opening_local: next.map(|o| o.local),
                }
            },
        );
    }

    let approval_end = match &policy.approval {
        None => {
            sink.not_required(|| Condition::Approval);
            None
        }
        Some(rule) => check_approval(policy, rule, resource, facts, now, sink),
    };

    let policy_cap = now.checked_add(policy.max_grant).unwrap_or(Timestamp::MAX);
    PolicyEval {
        in_group,
        bounds: GrantBounds::with_ends(
            policy_cap,
            session_end,
            window_end,
            approval_end,
            facts.vendor.as_ref().map(|v| v.ends_at),
        ),
    }
}

/// The approval condition: an approved window for this resource open at `now` passes and
/// bounds the grant by its end; otherwise the denial names the next approved window, if one
/// is coming, or says that a request is needed.
fn check_approval(
    policy: &CompiledPolicy,
    rule: &ApprovalRule,
    resource: &str,
    facts: &Facts,
    now: Timestamp,
    sink: &mut impl Sink,
) -> Option<Timestamp> {
    let mine = || facts.approvals.iter().filter(|w| w.resource == resource);
    let open = mine()
        .filter(|w| w.from <= now && now < w.until)
        .map(|w| w.until)
        .max();
    if open.is_some() {
        sink.pass(|| Condition::Approval);
        return open;
    }
    sink.fail(
        || Condition::Approval,
        || match mine().filter(|w| w.from > now).min_by_key(|w| w.from) {
            Some(w) => DenyReason::ApprovalNotYet {
                request_id: w.request_id,
                starts_at: w.from,
                starts_local: super::window::local_text(w.from, &policy.zone),
            },
            None => DenyReason::ApprovalRequired {
                resource: resource.to_owned(),
                approvers: rule.approvers.clone(),
            },
        },
    );
    None
}

/// Posture checks. A missing or stale report fails as one reason and the individual checks
/// are not made: facts older than the profile allows say nothing reliable about the device
/// now, and telling someone to fix what may already be fixed helps nobody.
fn check_posture(
    profile: &PostureProfile,
    max_age: SignedDuration,
    facts: &Facts,
    now: Timestamp,
    sink: &mut impl Sink,
) {
    let Some(report) = &facts.posture else {
        sink.fail(|| Condition::PostureReport, || DenyReason::NoPostureReport);
        return;
    };
    // A report stamped after `now` (clock steps between replicas) counts as fresh.
    let fresh = now.duration_since(report.at) <= max_age;
    sink.check(
        fresh,
        || Condition::PostureReport,
        || DenyReason::PostureStale {
            reported_at: report.at,
            max_age,
        },
    );
    if !fresh {
        return;
    }

    match profile.os_rule(&report.os) {
        OsRule::Any => sink.not_required(|| Condition::OsVersion),
        OsRule::NotAllowed => sink.fail(
            || Condition::OsVersion,
            || DenyReason::OsNotAllowed {
                os: report.os.clone(),
                allowed: profile.min_os_version.keys().cloned().collect(),
            },
        ),
        OsRule::AtLeast(min) => match &report.os_version {
            None => sink.fail(
                || Condition::OsVersion,
                || DenyReason::OsVersionUnknown {
                    os: report.os.clone(),
                },
            ),
            Some(have) => sink.check(
                have >= min,
                || Condition::OsVersion,
                || DenyReason::OsTooOld {
                    os: report.os.clone(),
                    min: min.clone(),
                    have: have.clone(),
                },
            ),
        },
    }

    flag(
        sink,
        profile.disk_encryption_required,
        report.disk_encrypted,
        || Condition::DiskEncryption,
        |state| DenyReason::DiskNotEncrypted { state },
    );
    flag(
        sink,
        profile.firewall_required,
        report.firewall,
        || Condition::Firewall,
        |state| DenyReason::FirewallOff { state },
    );
    flag(
        sink,
        profile.screen_lock_required,
        report.screen_lock,
        || Condition::ScreenLock,
        |state| DenyReason::ScreenLockOff { state },
    );

    for process in &profile.required_processes {
        sink.check(
            report.processes.iter().any(|p| p == process),
            || Condition::Process(process.clone()),
            || DenyReason::ProcessNotRunning {
                process: process.clone(),
            },
        );
    }

    match &profile.min_client_version {
        None => sink.not_required(|| Condition::ClientVersion),
        Some(min) => sink.check(
            report.client_version.as_ref().is_some_and(|v| v >= min),
            || Condition::ClientVersion,
            || DenyReason::ClientTooOld {
                min: min.clone(),
                have: report.client_version.clone(),
            },
        ),
    }
}

/// A yes/no posture fact that the profile may require; unknown fails like no.
fn flag(
    sink: &mut impl Sink,
    required: bool,
    state: Tri,
    condition: impl FnOnce() -> Condition,
    reason: impl FnOnce(Tri) -> DenyReason,
) {
    if required {
        sink.check(state.passes(), condition, || reason(state));
    } else {
        sink.not_required(condition);
    }
}

/// A dry run's answer: the decision, and for the account, the device and each policy that
/// covers the resource, every condition with its outcome ("would amara get ehr-web now? why
/// not?").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// Who asked (from the request).
    pub user: String,
    /// The resource asked for.
    pub resource: String,
    /// When the question is asked.
    pub at: Timestamp,
    /// What [`decide`] answers for the same inputs.
    pub decision: Decision,
    /// The checks that do not depend on the policy (account, device).
    pub subject: Vec<Check>,
    /// Each policy covering the resource, in policy-set order.
    pub policies: Vec<PolicyExplanation>,
}

/// One policy's part of an [`Explanation`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyExplanation {
    /// The policy.
    #[serde(with = "arc_str")]
    pub policy: Arc<str>,
    /// Each condition and its outcome.
    pub checks: Vec<Check>,
    /// If this policy alone would allow (account and device included): until when.
    pub allows_until: Option<Timestamp>,
}

/// One condition and how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// What was checked.
    pub condition: Condition,
    /// How it went.
    pub outcome: Outcome,
}

/// How a check went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The condition holds.
    Passed,
    /// The condition fails, with the reason and its message.
    Failed {
        /// The reason.
        reason: DenyReason,
        /// Its message in words.
        message: String,
    },
    /// The policy does not ask for it.
    NotRequired,
}

/// Explains what [`decide`] would answer for the same inputs, condition by condition, for
/// every policy that covers the resource (the dry run behind "would amara get ehr-web now?").
/// Pure, like `decide`, and built on the same evaluation.
pub fn explain(
    request: &AccessRequest,
    facts: &Facts,
    policies: &CompiledPolicies,
    now: Timestamp,
) -> Explanation {
    let decision = decide(request, facts, policies, now);
    let mut subject = Record::default();
    check_subject(facts, now, &mut subject);
    let subject_ok = subject
        .checks
        .iter()
        .all(|c| !matches!(c.outcome, Outcome::Failed { .. }));
    let mut explained = Vec::new();
    if let Ok(resource) = lookup(request, policies) {
        for policy in resource
            .policies
            .iter()
            .filter_map(|&i| policies.policies.get(i))
        {
            let mut record = Record::default();
            let eval = check_policy(policy, &resource.resource.name, facts, now, &mut record);
            let ok = subject_ok
                && record
                    .checks
                    .iter()
                    .all(|c| !matches!(c.outcome, Outcome::Failed { .. }));
            explained.push(PolicyExplanation {
                policy: Arc::clone(&policy.name),
                checks: record.checks,
                allows_until: ok.then(|| eval.bounds.expires_at()),
            });
        }
    }
    Explanation {
        user: request.user.clone(),
        resource: request.resource.clone(),
        at: now,
        decision,
        subject: subject.checks,
        policies: explained,
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Passed => f.write_str("passed"),
            Outcome::Failed { message, .. } => write!(f, "FAILED: {message}"),
            Outcome::NotRequired => f.write_str("not required"),
        }
    }
}

impl fmt::Display for Explanation {
    /// Plain text for the admin CLI's dry run.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} → {} at {}: {}",
            self.user, self.resource, self.at, self.decision
        )?;
        for c in &self.subject {
            writeln!(f, "  {}: {}", c.condition, c.outcome)?;
        }
        for p in &self.policies {
            match p.allows_until {
                Some(until) => writeln!(f, "  policy {}: allows until {until}", p.policy)?,
                None => writeln!(f, "  policy {}: does not allow", p.policy)?,
            }
            for c in &p.checks {
                writeln!(f, "    {}: {}", c.condition, c.outcome)?;
            }
        }
        Ok(())
    }
}
