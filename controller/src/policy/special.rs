//! Requests outside the ordinary decision: break-glass (emergency access with a reason) and
//! the WireGuard export (a grant handed out as a standard configuration). Pure, like
//! [`decide`](super::decide), and over the same compiled policies.
//!
//! **Break-glass** skips what an emergency cannot wait for — access windows and posture — and
//! keeps what makes the access attributable: the user is in one of the break-glass policy's
//! groups, the account is enabled, the device approved, the sign-in still valid and
//! multi-factor (whatever the policy's own `mfa_required` says), and a reason is given. The
//! grant ends at the earlier of `now + cap` and the end of the sign-in.
//!
//! **Export** is decided for an administrator acting for a vendor whose device cannot run the
//! client: no sign-in, no posture. It needs a policy with `wireguard_export` whose groups
//! include the user, an open window if the policy has windows, and ends at the earliest of
//! the asked end, `now + max_grant` and the window's end.

use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use super::decision::{Bound, DenyReason};
use super::engine::{Collect, CompiledPolicies, CompiledPolicy, check_subject};
use super::model::arc_str;
use super::request::{AccessRequest, Facts};

/// Longest break-glass reason accepted, in characters: enough for a sentence, not a file.
pub const MAX_REASON_LEN: usize = 500;

/// The answer to a break-glass request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum BreakGlassDecision {
    /// Emergency access until `expires_at`.
    Allow {
        /// The break-glass policy.
        #[serde(with = "arc_str")]
        policy: Arc<str>,
        /// When the grant ends.
        expires_at: Timestamp,
        /// The policy's cap.
        cap: SignedDuration,
        /// Whether the cap or the sign-in's end decided the expiry.
        limited_by: Bound,
        /// The reason, trimmed.
        reason: String,
    },
    /// Refused, with every reason.
    Deny {
        /// Never empty.
        reasons: Vec<DenyReason>,
    },
}

/// The answer to a WireGuard export request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum ExportDecision {
    /// Exportable until `expires_at`.
    Allow {
        /// The policy allowing the export.
        #[serde(with = "arc_str")]
        policy: Arc<str>,
        /// When the grant ends.
        expires_at: Timestamp,
    },
    /// Refused, with every reason.
    Deny {
        /// Never empty.
        reasons: Vec<DenyReason>,
    },
}

/// The end of the sign-in for `policy`: its own expiry or sign-in + the policy's lifetime.
fn session_end(policy: &CompiledPolicy, facts: &Facts) -> Timestamp {
    let lifetime_end = facts
        .session
        .started_at
        .checked_add(policy.session_lifetime)
        .unwrap_or(Timestamp::MAX);
    facts
        .session
        .expires_at
        .map_or(lifetime_end, |e| e.min(lifetime_end))
}

/// Trims a break-glass reason and checks it; `Err` names what is wrong.
pub(super) fn check_reason(reason: &str) -> Result<String, DenyReason> {
    let r = reason.trim();
    if r.is_empty() {
        return Err(DenyReason::ReasonRequired);
    }
    if r.chars().count() > MAX_REASON_LEN {
        return Err(DenyReason::ReasonTooLong {
            max: MAX_REASON_LEN,
        });
    }
    Ok(r.to_owned())
}

impl CompiledPolicies {
    /// Decides a break-glass request (see the module docs): every failed condition is listed,
    /// the reason's problems first, then the account and device, then the failures of the
    /// break-glass policy closest to allowing.
    pub fn decide_break_glass(
        &self,
        request: &AccessRequest,
        facts: &Facts,
        reason: &str,
        now: Timestamp,
    ) -> BreakGlassDecision {
        let deny = |r: DenyReason| BreakGlassDecision::Deny { reasons: vec![r] };
        let Some(resource) = self.resources.get(request.resource.as_str()) else {
            return deny(DenyReason::UnknownResource {
                resource: request.resource.clone(),
            });
        };
        if !resource.resource.emergency {
            return deny(DenyReason::NotEmergency {
                resource: request.resource.clone(),
            });
        }
        let candidates: Vec<&CompiledPolicy> = resource
            .policies
            .iter()
            .filter_map(|&i| self.policies.get(i))
            .filter(|p| p.break_glass.is_some())
            .collect();
        if candidates.is_empty() {
            return deny(DenyReason::NoBreakGlassPolicy {
                resource: request.resource.clone(),
            });
        }
        let mut reasons = Collect::default();
        let reason = match check_reason(reason) {
            Ok(r) => Some(r),
            Err(why) => {
                reasons.reasons.push(why);
                None
            }
        };
        check_subject(facts, now, &mut reasons);
        let mut best: Option<(&CompiledPolicy, Timestamp, SignedDuration, Bound)> = None;
        let mut closest: Option<(usize, Vec<DenyReason>)> = None;
        for p in candidates {
            let cap = p.break_glass.unwrap_or(SignedDuration::ZERO);
            let mut failed = Vec::new();
            if !p.groups.iter().any(|g| facts.in_group(g)) {
                failed.push(DenyReason::NotInGroup {
                    resource: request.resource.clone(),
                    needs: p.groups.clone(),
                });
            }
            let end = session_end(p, facts);
            if now >= end {
                failed.push(DenyReason::SessionExpired { at: end });
            }
            if !facts.mfa {
                failed.push(DenyReason::BreakGlassMfaRequired);
            }
            if failed.is_empty() {
                let cap_end = now.checked_add(cap).unwrap_or(Timestamp::MAX);
                let (mut expires, mut by) = if end < cap_end {
                    (end, Bound::SessionEnd)
                } else {
                    (cap_end, Bound::PolicyCap)
                };
                // An emergency does not outlive the vendor's contract either.
                if let Some(v) = facts.vendor.as_ref().filter(|v| v.ends_at < expires) {
                    expires = v.ends_at;
                    by = Bound::ContractEnd;
                }
                if best.as_ref().is_none_or(|(_, e, _, _)| expires > *e) {
                    best = Some((p, expires, cap, by));
                }
            } else if closest.as_ref().is_none_or(|(n, _)| failed.len() < *n) {
                closest = Some((failed.len(), failed));
            }
        }
        match (best, reason) {
            (Some((p, expires_at, cap, limited_by)), Some(reason))
                if reasons.reasons.is_empty() =>
            {
                BreakGlassDecision::Allow {
                    policy: Arc::clone(&p.name),
                    expires_at,
                    cap,
                    limited_by,
                    reason,
                }
            }
            _ => {
                if let Some((_, failed)) = closest.filter(|_| best.is_none()) {
                    reasons.reasons.extend(failed);
                }
                BreakGlassDecision::Deny {
                    reasons: reasons.reasons,
                }
            }
        }
    }

    /// Decides whether `user` (in `groups`) may be handed `resource` as a WireGuard
    /// configuration until `until` (see the module docs).
    pub fn decide_export(
        &self,
        resource: &str,
        groups: &[String],
        user_disabled: bool,
        until: Timestamp,
        now: Timestamp,
    ) -> ExportDecision {
        let deny = |r: DenyReason| ExportDecision::Deny { reasons: vec![r] };
        let Some(res) = self.resources.get(resource) else {
            return deny(DenyReason::UnknownResource {
                resource: resource.to_owned(),
            });
        };
        if user_disabled {
            return deny(DenyReason::UserDisabled);
        }
        if until <= now {
            return deny(DenyReason::ExportEndsInPast);
        }
        let candidates: Vec<&CompiledPolicy> = res
            .policies
            .iter()
            .filter_map(|&i| self.policies.get(i))
            .filter(|p| p.wireguard_export)
            .collect();
        if candidates.is_empty() {
            return deny(DenyReason::ExportNotAllowed {
                resource: resource.to_owned(),
            });
        }
        let mut best: Option<(&CompiledPolicy, Timestamp)> = None;
        let mut first_failure = None;
        for p in candidates {
            if !p.groups.iter().any(|g| groups.contains(g)) {
                first_failure.get_or_insert(DenyReason::NotInGroup {
                    resource: resource.to_owned(),
                    needs: p.groups.clone(),
                });
                continue;
            }
            let mut end = until.min(now.checked_add(p.max_grant).unwrap_or(Timestamp::MAX));
            if !p.windows.is_empty() {
                if !p.windows.contains(now) {
                    let next = p.windows.next_opening(now);
                    first_failure.get_or_insert(DenyReason::OutsideWindow {
                        windows: p.windows.text().to_owned(),
                        count: p.windows.len(),
                        next_opening: next.as_ref().map(|o| o.at),
                        next_opening_local: next.map(|o| o.local),
                    });
                    continue;
                }
                if let Some(w) = p.windows.current_end(now) {
                    end = end.min(w);
                }
            }
            if best.as_ref().is_none_or(|(_, e)| end > *e) {
                best = Some((p, end));
            }
        }
        match best {
            Some((p, expires_at)) => ExportDecision::Allow {
                policy: Arc::clone(&p.name),
                expires_at,
            },
            None => ExportDecision::Deny {
                reasons: first_failure.into_iter().collect(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::policy::tests::{hospital_with_break_glass, ts};
    use crate::policy::{Facts, Session};
    use crate::store::DeviceStatus;

    fn ben(mfa: bool) -> Facts {
        Facts {
            groups: vec!["ed-physicians".into()],
            mfa,
            session: Session {
                started_at: ts("2025-03-04T02:00:00Z"),
                expires_at: Some(ts("2025-03-04T10:00:00Z")),
            },
            device: DeviceStatus::Approved,
            user_disabled: false,
            posture: None,
            approvals: Vec::new(),
            vendor: None,
        }
    }

    fn req(resource: &str) -> AccessRequest {
        AccessRequest {
            user: "ben".into(),
            device_id: "dev_ben".into(),
            resource: resource.into(),
        }
    }

    fn codes(d: &BreakGlassDecision) -> Vec<&'static str> {
        match d {
            BreakGlassDecision::Deny { reasons } => reasons.iter().map(|r| r.code()).collect(),
            BreakGlassDecision::Allow { .. } => vec![],
        }
    }

    #[test]
    fn s6_ben_breaks_glass_for_pacs_for_at_most_the_cap() {
        let c = CompiledPolicies::new(&hospital_with_break_glass()).expect("valid");
        let now = ts("2025-03-04T03:00:00Z");
        let d = c.decide_break_glass(&req("pacs"), &ben(true), "  stroke code, CT review ", now);
        match d {
            BreakGlassDecision::Allow {
                expires_at,
                cap,
                limited_by,
                reason,
                ..
            } => {
                assert_eq!(cap, SignedDuration::from_mins(30));
                assert_eq!(expires_at, ts("2025-03-04T03:30:00Z"));
                assert_eq!(limited_by, Bound::PolicyCap);
                assert_eq!(reason, "stroke code, CT review");
            }
            other => panic!("{other:?}"),
        }
        // The sign-in ending sooner bounds it.
        let mut f = ben(true);
        f.session.expires_at = Some(ts("2025-03-04T03:10:00Z"));
        let d = c.decide_break_glass(&req("pacs"), &f, "stroke", now);
        assert!(matches!(
            d,
            BreakGlassDecision::Allow {
                limited_by: Bound::SessionEnd,
                ..
            }
        ));
    }

    #[test]
    fn a_vendor_contract_bounds_break_glass_and_an_ended_one_refuses_it() {
        let c = CompiledPolicies::new(&hospital_with_break_glass()).expect("valid");
        let now = ts("2025-03-04T03:00:00Z");
        let mut f = ben(true);
        f.vendor = Some(crate::policy::VendorContract {
            vendor: "acme".into(),
            contract_ref: "ACME-BAA-7".into(),
            end_date: "2025-03-04".into(),
            ends_at: ts("2025-03-04T03:05:00Z"),
        });
        match c.decide_break_glass(&req("pacs"), &f, "stroke", now) {
            BreakGlassDecision::Allow {
                expires_at,
                limited_by,
                ..
            } => {
                assert_eq!(expires_at, ts("2025-03-04T03:05:00Z"));
                assert_eq!(limited_by, Bound::ContractEnd);
            }
            other => panic!("{other:?}"),
        }
        let later = ts("2025-03-04T03:06:00Z");
        let d = c.decide_break_glass(&req("pacs"), &f, "stroke", later);
        assert!(codes(&d).contains(&"contract_ended"), "{d:?}");
    }

    #[test]
    fn break_glass_refusals_name_every_reason() {
        let c = CompiledPolicies::new(&hospital_with_break_glass()).expect("valid");
        let now = ts("2025-03-04T03:00:00Z");
        assert_eq!(
            codes(&c.decide_break_glass(&req("pacs"), &ben(true), "  ", now)),
            ["reason_required"]
        );
        assert_eq!(
            codes(&c.decide_break_glass(&req("pacs"), &ben(false), "stroke", now)),
            ["break_glass_mfa_required"]
        );
        assert_eq!(
            codes(&c.decide_break_glass(&req("pacs"), &ben(false), "", now)),
            ["reason_required", "break_glass_mfa_required"]
        );
        let long = "x".repeat(MAX_REASON_LEN + 1);
        assert_eq!(
            codes(&c.decide_break_glass(&req("pacs"), &ben(true), &long, now)),
            ["reason_too_long"]
        );
        assert_eq!(
            codes(&c.decide_break_glass(&req("ehr-web"), &ben(true), "x", now)),
            ["not_emergency"]
        );
        let mut f = ben(true);
        f.groups = vec!["clinicians".into()];
        f.device = DeviceStatus::Revoked;
        assert_eq!(
            codes(&c.decide_break_glass(&req("pacs"), &f, "x", now)),
            ["device_not_approved", "not_in_group"]
        );
        let msg = DenyReason::BreakGlassMfaRequired.to_string();
        assert!(msg.contains("multi-factor"), "{msg}");
    }

    #[test]
    fn export_needs_the_opt_in_and_respects_window_and_cap() {
        let mut set = hospital_with_break_glass();
        let c = CompiledPolicies::new(&set).expect("valid");
        let groups = vec!["vendor-acme".to_owned()];
        // Tuesday 2025-03-04 15:00 Berlin = 14:00Z, inside the vendor window (14–16 Berlin).
        let now = ts("2025-03-04T14:00:00Z");
        let d = c.decide_export(
            "mri-console",
            &groups,
            false,
            ts("2025-03-04T20:00:00Z"),
            now,
        );
        assert!(
            matches!(&d, ExportDecision::Deny { reasons } if reasons[0].code() == "export_not_allowed"),
            "{d:?}"
        );
        for p in &mut set.policies {
            if p.name == "vendor-acme-mri" {
                p.conditions.wireguard_export = true;
            }
        }
        let c = CompiledPolicies::new(&set).expect("valid");
        let d = c.decide_export(
            "mri-console",
            &groups,
            false,
            ts("2025-03-04T20:00:00Z"),
            now,
        );
        // Bounded by the window's end (16:00 Berlin = 15:00Z), under the 2 h cap.
        assert_eq!(
            d,
            ExportDecision::Allow {
                policy: "vendor-acme-mri".into(),
                expires_at: ts("2025-03-04T15:00:00Z")
            }
        );
        let d = c.decide_export(
            "mri-console",
            &groups,
            false,
            ts("2025-03-04T14:20:00Z"),
            now,
        );
        assert!(
            matches!(d, ExportDecision::Allow { expires_at, .. } if expires_at == ts("2025-03-04T14:20:00Z"))
        );
        let d = c.decide_export(
            "mri-console",
            &groups,
            false,
            ts("2025-03-04T20:00:00Z"),
            ts("2025-03-04T18:00:00Z"),
        );
        assert!(
            matches!(&d, ExportDecision::Deny { reasons } if reasons[0].code() == "outside_window"),
            "{d:?}"
        );
        let d = c.decide_export(
            "mri-console",
            &["clinicians".to_owned()],
            false,
            ts("2025-03-04T20:00:00Z"),
            now,
        );
        assert!(
            matches!(&d, ExportDecision::Deny { reasons } if reasons[0].code() == "not_in_group"),
            "{d:?}"
        );
    }
}
