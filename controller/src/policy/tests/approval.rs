//! The approval condition (vendor access, issue 7): only inside an approved request's
//! window, bounded by its end and by the vendor's contract; every refusal in words.

use jiff::SignedDuration;

use super::*;

fn vendor_set() -> PolicySet {
    let mut set = hospital();
    let p = set
        .policies
        .iter_mut()
        .find(|p| p.name == "vendor-acme-mri")
        .expect("vendor policy");
    p.conditions.approval = Some(Approval {
        approvers: "approvers".to_owned(),
        max_window: hours(4),
    });
    set
}

fn window(id: i64, resource: &str, from: &str, until: &str) -> ApprovedWindow {
    ApprovedWindow {
        request_id: id,
        resource: resource.to_owned(),
        from: ts(from),
        until: ts(until),
    }
}

fn acme(ends_at: &str) -> VendorContract {
    VendorContract {
        vendor: "acme".to_owned(),
        contract_ref: "ACME-BAA-7".to_owned(),
        end_date: "2026-10-31".to_owned(),
        ends_at: ts(ends_at),
    }
}

#[test]
fn approval_condition_table() {
    let policies = compile(&vendor_set());
    // NOW is Tuesday 25 March 2025 14:30 CET, inside the policy's 14:00–16:00 window.
    struct Case {
        name: &'static str,
        approvals: Vec<ApprovedWindow>,
        vendor: Option<VendorContract>,
        /// Ok((expiry, bound)) or Err((code, words the message contains)).
        expect: Result<(&'static str, Bound), (&'static str, &'static str)>,
    }
    let cases = [
        Case {
            name: "no request at all",
            approvals: vec![],
            vendor: None,
            expect: Err((
                "approval_required",
                "mri-console needs an approved access request",
            )),
        },
        Case {
            name: "approved, but for another resource",
            approvals: vec![window(
                1,
                "ehr-web",
                "2025-03-25T13:00:00Z",
                "2025-03-25T14:00:00Z",
            )],
            vendor: None,
            expect: Err(("approval_required", "a member of approvers approves it")),
        },
        Case {
            name: "approved window not started yet",
            approvals: vec![window(
                2,
                "mri-console",
                "2025-03-25T13:45:00Z",
                "2025-03-25T14:45:00Z",
            )],
            vendor: None,
            expect: Err((
                "approval_not_yet",
                "Your approved window starts at Tue 25 Mar 2025 14:45 CET (request 2)",
            )),
        },
        Case {
            name: "approved window over (ends exactly now)",
            approvals: vec![window(3, "mri-console", "2025-03-25T12:30:00Z", NOW)],
            vendor: None,
            expect: Err(("approval_required", "needs an approved access request")),
        },
        Case {
            name: "inside the approved window: the grant ends with it",
            approvals: vec![window(
                4,
                "mri-console",
                "2025-03-25T13:00:00Z",
                "2025-03-25T14:10:00Z",
            )],
            vendor: None,
            expect: Ok(("2025-03-25T14:10:00Z", Bound::ApprovalEnd)),
        },
        Case {
            name: "approved beyond the policy's window: the schedule still ends it",
            approvals: vec![window(
                5,
                "mri-console",
                "2025-03-25T13:00:00Z",
                "2025-03-25T17:00:00Z",
            )],
            vendor: None,
            expect: Ok(("2025-03-25T15:00:00Z", Bound::WindowEnd)),
        },
        Case {
            name: "two windows: the open one counts, not the next",
            approvals: vec![
                window(
                    6,
                    "mri-console",
                    "2025-03-25T14:20:00Z",
                    "2025-03-25T14:50:00Z",
                ),
                window(
                    7,
                    "mri-console",
                    "2025-03-25T13:20:00Z",
                    "2025-03-25T13:50:00Z",
                ),
            ],
            vendor: None,
            expect: Ok(("2025-03-25T13:50:00Z", Bound::ApprovalEnd)),
        },
        Case {
            name: "contract ended: refused whatever was approved",
            approvals: vec![window(
                8,
                "mri-console",
                "2025-03-25T13:00:00Z",
                "2025-03-25T14:00:00Z",
            )],
            vendor: Some(acme("2025-03-25T13:00:00Z")),
            expect: Err((
                "contract_ended",
                "Vendor contract ACME-BAA-7 (acme) ended on 2026-10-31",
            )),
        },
        Case {
            name: "contract ends inside the window: the grant ends with the contract",
            approvals: vec![window(
                9,
                "mri-console",
                "2025-03-25T13:00:00Z",
                "2025-03-25T14:00:00Z",
            )],
            vendor: Some(acme("2025-03-25T13:40:00Z")),
            expect: Ok(("2025-03-25T13:40:00Z", Bound::ContractEnd)),
        },
    ];
    for c in cases {
        let mut facts = amara(ts(NOW));
        facts.groups = vec!["vendor-acme".to_owned()];
        facts.posture = None;
        facts.approvals = c.approvals;
        facts.vendor = c.vendor;
        let d = decide(
            &request("acme-eng", "mri-console"),
            &facts,
            &policies,
            ts(NOW),
        );
        match (c.expect, &d) {
            (Ok((expiry, bound)), Decision::Allow { bounds, .. }) => {
                assert_eq!(d.expires_at(), Some(ts(expiry)), "{}", c.name);
                assert_eq!(bounds.limited_by, bound, "{}", c.name);
                assert!(!bounds.renewable(), "{}: renewal cannot extend it", c.name);
            }
            (Err((code, words)), Decision::Deny { reasons, .. }) => {
                let codes: Vec<_> = reasons.iter().map(DenyReason::code).collect();
                assert_eq!(codes, [code], "{}", c.name);
                assert!(
                    reasons[0].to_string().contains(words),
                    "{}: {}",
                    c.name,
                    reasons[0]
                );
            }
            (want, got) => panic!("{}: wanted {want:?}, got {got}", c.name),
        }
    }
}

#[test]
fn a_contract_end_binds_vendor_members_under_every_policy() {
    // Even a policy without an approval condition issues nothing after the contract's end.
    let policies = compile(&hospital());
    let mut facts = amara(ts(NOW));
    facts.groups = vec!["vendor-acme".to_owned()];
    facts.posture = None;
    facts.vendor = Some(acme("2025-03-24T23:00:00Z"));
    let d = decide(
        &request("acme-eng", "mri-console"),
        &facts,
        &policies,
        ts(NOW),
    );
    assert_eq!(
        d.reasons().iter().map(DenyReason::code).collect::<Vec<_>>(),
        ["contract_ended"]
    );
}

#[test]
fn approvals_for_lists_only_policies_that_could_apply() {
    let policies = compile(&vendor_set());
    let rules = policies.approvals_for("mri-console", &["vendor-acme".to_owned()]);
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].approvers, "approvers");
    assert_eq!(rules[0].max_window, SignedDuration::from_hours(4));
    assert!(
        policies
            .approvals_for("mri-console", &["clinicians".to_owned()])
            .is_empty()
    );
    assert!(
        policies
            .approvals_for("ehr-web", &["clinicians".to_owned()])
            .is_empty()
    );
}

#[test]
fn approval_conditions_are_validated() {
    let mut set = vendor_set();
    let p = set
        .policies
        .iter_mut()
        .find(|p| p.name == "vendor-acme-mri")
        .expect("vendor policy");
    p.conditions.approval = Some(Approval {
        approvers: "nobody-approves".to_owned(),
        max_window: Duration::ZERO,
    });
    let errors = validate(&set).expect_err("invalid");
    let words: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(
        words.contains(
            &"policy vendor-acme-mri has approvers nobody-approves, which does not exist: create \
              the group or fix the name"
                .to_owned()
        ),
        "{words:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| matches!(e, ValidationError::ZeroMaxWindow { .. })),
        "{words:?}"
    );
    // The condition round-trips as administrators write it.
    let json = serde_json::json!({"mfa_required": false, "max_grant": "2h", "session_lifetime": "8h",
        "approval": {"approvers": "approvers", "max_window": "4h"}});
    let c: Conditions = serde_json::from_value(json).expect("conditions");
    assert_eq!(
        c.approval,
        Some(Approval {
            approvers: "approvers".into(),
            max_window: hours(4)
        })
    );
}
