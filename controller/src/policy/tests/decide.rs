//! Decisions: S1, S2, each condition failing alone and all at once, boundaries, several
//! policies, explanations, serde.

use jiff::{SignedDuration, Timestamp};

use super::*;

fn deny_codes(d: &Decision) -> Vec<&'static str> {
    d.reasons().iter().map(DenyReason::code).collect()
}

fn set_window(set: &mut PolicySet, policy: &str, window: WindowSpec) {
    let p = set
        .policies
        .iter_mut()
        .find(|p| p.name == policy)
        .expect("policy");
    p.conditions.windows = vec![window];
}

#[test]
fn s1_compliant_clinician_gets_ehr_web_until_the_earliest_bound() {
    type Setup = fn(&mut PolicySet, &mut Facts, Timestamp);
    // (case, setup, expected expiry, expected limiting bound)
    let cases: [(&str, Setup, &str, Bound); 5] = [
        (
            "policy cap (8 h) is earliest",
            |_, _, _| {},
            "2025-03-25T21:30:00Z",
            Bound::PolicyCap,
        ),
        (
            "signed in 10 h ago, session lifetime 12 h",
            |_, f, now| f.session.started_at = now - SignedDuration::from_hours(10),
            "2025-03-25T15:30:00Z",
            Bound::SessionEnd,
        ),
        (
            "identity provider ends the session in 30 min",
            |_, f, now| f.session.expires_at = Some(now + SignedDuration::from_mins(30)),
            "2025-03-25T14:00:00Z",
            Bound::SessionEnd,
        ),
        (
            "day-shift window closes at 19:00 Berlin (18:00 UTC)",
            |s, _, _| {
                set_window(
                    s,
                    "clinicians-ehr",
                    WindowSpec::new(&["mon-fri"], "07:00", "19:00", "Europe/Berlin"),
                )
            },
            "2025-03-25T18:00:00Z",
            Bound::WindowEnd,
        ),
        (
            "window, but the sign-in ends first",
            |s, f, now| {
                set_window(
                    s,
                    "clinicians-ehr",
                    WindowSpec::new(&["mon-fri"], "07:00", "19:00", "Europe/Berlin"),
                );
                f.session.started_at = now - SignedDuration::from_hours(8);
            },
            "2025-03-25T17:30:00Z",
            Bound::SessionEnd,
        ),
    ];
    for (case, setup, expires, limited_by) in cases {
        let now = ts(NOW);
        let mut set = hospital();
        let mut facts = amara(now);
        setup(&mut set, &mut facts, now);
        let d = decide(&request("amara", "ehr-web"), &facts, &compile(&set), now);
        match d {
            Decision::Allow {
                policy,
                expires_at,
                bounds,
            } => {
                assert_eq!(&*policy, "clinicians-ehr", "{case}");
                assert_eq!(expires_at, ts(expires), "{case}");
                assert_eq!(bounds.limited_by, limited_by, "{case}");
                assert_eq!(bounds.expires_at(), expires_at, "{case}");
                assert_eq!(bounds.policy_cap, ts("2025-03-25T21:30:00Z"), "{case}");
                assert!(expires_at > now, "{case}");
            }
            Decision::Deny { reasons, .. } => panic!("{case}: denied: {reasons:?}"),
        }
    }
}

#[test]
fn s2_clinician_is_denied_ehr_db_with_the_group_in_words() {
    let now = ts(NOW);
    let d = decide(
        &request("amara", "ehr-db"),
        &amara(now),
        &compile(&hospital()),
        now,
    );
    assert_eq!(
        d,
        Decision::Deny {
            reasons: vec![DenyReason::NotInGroup {
                resource: "ehr-db".to_owned(),
                needs: vec!["dba".to_owned()],
            }],
            closest_policy: Some("dba-ehr-db".to_owned()),
        }
    );
    assert_eq!(
        d.reasons()[0].to_string(),
        "You are not in a group that may use ehr-db (needs: dba)"
    );
    // What the caller writes to the audit log: the decision with machine-readable codes.
    let audit = serde_json::to_value(&d).expect("json");
    assert_eq!(audit["decision"], "deny");
    assert_eq!(audit["reasons"][0]["reason"], "not_in_group");
    assert_eq!(audit["reasons"][0]["needs"][0], "dba");
    assert_eq!(audit["closest_policy"], "dba-ehr-db");
}

type Mutate = fn(&mut PolicySet, &mut Facts, Timestamp);

/// Each condition failing alone: (case, change, reason code, words the clinician sees).
fn single_failures() -> Vec<(&'static str, Mutate, &'static str, &'static str)> {
    vec![
        (
            "account disabled",
            |_, f, _| f.user_disabled = true,
            "user_disabled",
            "Your account is disabled",
        ),
        (
            "device pending approval",
            |_, f, _| f.device = DeviceStatus::Pending,
            "device_not_approved",
            "This device is not approved",
        ),
        (
            "device revoked",
            |_, f, _| f.device = DeviceStatus::Revoked,
            "device_not_approved",
            "This device is not approved",
        ),
        (
            "device enrolment denied",
            |_, f, _| f.device = DeviceStatus::Denied,
            "device_not_approved",
            "This device is not approved",
        ),
        (
            "not in the policy's group",
            |_, f, _| f.groups = vec!["radiology".to_owned()],
            "not_in_group",
            "You are not in a group that may use ehr-web (needs: clinicians)",
        ),
        (
            "signed in longer ago than the session lifetime",
            |_, f, now| f.session.started_at = now - SignedDuration::from_hours(13),
            "session_expired",
            "Your sign-in has expired: run wardgate login",
        ),
        (
            "session ended at the identity provider",
            |_, f, now| f.session.expires_at = Some(now - SignedDuration::from_secs(1)),
            "session_expired",
            "Your sign-in has expired: run wardgate login",
        ),
        (
            "signed in without MFA",
            |_, f, _| f.mfa = false,
            "mfa_required",
            "This resource needs multi-factor sign-in: sign in again with MFA",
        ),
        (
            "no posture report",
            |_, f, _| f.posture = None,
            "no_posture_report",
            "has not sent its security check yet",
        ),
        (
            "posture report older than 5 min",
            |_, f, now| report(f).at = now - SignedDuration::from_mins(6),
            "posture_stale",
            "last security check is out of date",
        ),
        (
            "OS not in the profile",
            |_, f, _| report(f).os = "fedora".to_owned(),
            "os_not_allowed",
            "This operating system (fedora) may not be used here (allowed: macos, ubuntu)",
        ),
        (
            "OS version unknown",
            |_, f, _| report(f).os_version = None,
            "os_version_unknown",
            "could not read the version of the operating system (ubuntu)",
        ),
        (
            "OS too old",
            |_, f, _| report(f).os_version = Some("22.04".parse().expect("v")),
            "os_too_old",
            "Update the operating system to 24.04 or later (this device has 22.04)",
        ),
        (
            "disk not encrypted",
            |_, f, _| report(f).disk_encrypted = Tri::No,
            "disk_not_encrypted",
            "Turn on disk encryption",
        ),
        (
            "disk encryption unknown",
            |_, f, _| report(f).disk_encrypted = Tri::Unknown,
            "disk_not_encrypted",
            "could not confirm that disk encryption is on",
        ),
        (
            "firewall off",
            |_, f, _| report(f).firewall = Tri::No,
            "firewall_off",
            "Turn on the firewall",
        ),
        (
            "firewall unknown",
            |_, f, _| report(f).firewall = Tri::Unknown,
            "firewall_off",
            "could not confirm that the firewall is on",
        ),
        (
            "screen lock off",
            |_, f, _| report(f).screen_lock = Tri::No,
            "screen_lock_off",
            "Turn on the screen lock",
        ),
        (
            "screen lock unknown",
            |_, f, _| report(f).screen_lock = Tri::Unknown,
            "screen_lock_off",
            "could not confirm that the screen lock is on",
        ),
        (
            "EDR agent not running",
            |_, f, _| report(f).processes = vec!["sshd".to_owned()],
            "process_not_running",
            "Start edr-agent: it must be running on this device",
        ),
        (
            "client too old",
            |_, f, _| report(f).client_version = Some("0.0.9".parse().expect("v")),
            "client_too_old",
            "Update Wardgate to 0.1.0 or later (this device has 0.0.9)",
        ),
        (
            "client version not reported",
            |_, f, _| report(f).client_version = None,
            "client_too_old",
            "Update Wardgate to 0.1.0 or later",
        ),
        (
            "outside the window (Mondays only; next Monday is after the DST change)",
            |s, _, _| {
                set_window(
                    s,
                    "clinicians-ehr",
                    WindowSpec::new(&["monday"], "07:00", "19:00", "Europe/Berlin"),
                )
            },
            "outside_window",
            "Outside the access window (Mondays 07:00–19:00 Europe/Berlin); next opening: Mon 31 \
             Mar 2025 07:00 CEST",
        ),
    ]
}

#[test]
fn every_condition_failing_alone_gives_exactly_its_reason() {
    let now = ts(NOW);
    // The unchanged world allows: each case below fails by its own change alone.
    let baseline = decide(
        &request("amara", "ehr-web"),
        &amara(now),
        &compile(&hospital()),
        now,
    );
    assert!(baseline.is_allow(), "{baseline}");

    for (case, mutate, code, words) in single_failures() {
        let mut set = hospital();
        let mut facts = amara(now);
        mutate(&mut set, &mut facts, now);
        let d = decide(&request("amara", "ehr-web"), &facts, &compile(&set), now);
        assert_eq!(deny_codes(&d), [code], "{case}: {d}");
        let message = d.reasons()[0].to_string();
        assert!(message.contains(words), "{case}: {message:?}");
    }
}

#[test]
fn all_conditions_failing_at_once_are_all_listed_in_fixing_order() {
    let now = ts(NOW);
    let mut set = hospital();
    set_window(
        &mut set,
        "clinicians-ehr",
        WindowSpec::new(&["mon"], "07:00", "19:00", "Europe/Berlin"),
    );
    let mut facts = amara(now);
    facts.user_disabled = true;
    facts.device = DeviceStatus::Pending;
    facts.groups.clear();
    facts.session.started_at = now - SignedDuration::from_hours(13);
    facts.mfa = false;
    let r = report(&mut facts);
    r.os_version = Some("22.04".parse().expect("v"));
    r.disk_encrypted = Tri::No;
    r.firewall = Tri::No;
    r.screen_lock = Tri::Unknown;
    r.processes.clear();
    r.client_version = Some("0.0.1".parse().expect("v"));

    let d = decide(&request("amara", "ehr-web"), &facts, &compile(&set), now);
    assert_eq!(
        deny_codes(&d),
        [
            "user_disabled",
            "device_not_approved",
            "not_in_group",
            "session_expired",
            "mfa_required",
            "os_too_old",
            "disk_not_encrypted",
            "firewall_off",
            "screen_lock_off",
            "process_not_running",
            "client_too_old",
            "outside_window",
        ]
    );
    let text = d.to_string();
    for words in [
        "Your account is disabled",
        "This device is not approved",
        "needs: clinicians",
        "Your sign-in has expired",
        "multi-factor",
        "Update the operating system to 24.04 or later",
        "Turn on disk encryption",
        "Turn on the firewall",
        "screen lock",
        "Start edr-agent",
        "Update Wardgate",
        "Outside the access window",
    ] {
        assert!(text.contains(words), "{words:?} missing from {text}");
    }
}

#[test]
fn unknown_posture_never_passes() {
    let now = ts(NOW);
    type SetField = fn(&mut PostureReport, Tri);
    let fields: [(&str, SetField); 3] = [
        ("disk_not_encrypted", |r, t| r.disk_encrypted = t),
        ("firewall_off", |r, t| r.firewall = t),
        ("screen_lock_off", |r, t| r.screen_lock = t),
    ];
    let policies = compile(&hospital());
    for (code, set) in fields {
        for (state, allowed) in [(Tri::Yes, true), (Tri::No, false), (Tri::Unknown, false)] {
            let mut facts = amara(now);
            set(report(&mut facts), state);
            let d = decide(&request("amara", "ehr-web"), &facts, &policies, now);
            assert_eq!(d.is_allow(), allowed, "{code} = {state}: {d}");
            if !allowed {
                assert_eq!(deny_codes(&d), [code], "{code} = {state}");
            }
        }
    }
}

#[test]
fn posture_report_age_boundary_and_stale_reports_hide_their_stale_facts() {
    let now = ts(NOW);
    let policies = compile(&hospital());
    let age = |at: Timestamp, firewall: Tri| {
        let mut facts = amara(now);
        report(&mut facts).at = at;
        report(&mut facts).firewall = firewall;
        decide(&request("amara", "ehr-web"), &facts, &policies, now)
    };
    let max = SignedDuration::from_mins(5);
    assert!(
        age(now - max, Tri::Yes).is_allow(),
        "exactly max_report_age old"
    );
    assert_eq!(
        deny_codes(&age(now - max - SignedDuration::from_secs(1), Tri::Yes)),
        ["posture_stale"]
    );
    // A stale report says nothing about the device now, so its facts are not judged.
    assert_eq!(
        deny_codes(&age(now - SignedDuration::from_hours(1), Tri::No)),
        ["posture_stale"]
    );
    // A report stamped slightly after `now` (replica clocks) is fresh.
    assert!(age(now + SignedDuration::from_secs(10), Tri::Yes).is_allow());
}

#[test]
fn session_end_boundary() {
    let now = ts(NOW);
    let policies = compile(&hospital());
    let at = |started: Timestamp| {
        let mut facts = amara(now);
        facts.session.started_at = started;
        decide(&request("amara", "ehr-web"), &facts, &policies, now)
    };
    let lifetime = SignedDuration::from_hours(12);
    assert_eq!(deny_codes(&at(now - lifetime)), ["session_expired"]);
    let d = at(now - lifetime + SignedDuration::from_secs(1));
    assert_eq!(d.expires_at(), Some(now + SignedDuration::from_secs(1)));
}

#[test]
fn os_rules_without_a_list_allow_any_os_and_names_ignore_case() {
    let now = ts(NOW);
    let mut set = hospital();
    let mut facts = amara(now);
    report(&mut facts).os = "Ubuntu".to_owned();
    let policies = compile(&set);
    assert!(decide(&request("amara", "ehr-web"), &facts, &policies, now).is_allow());

    set.posture_profiles[0].min_os_version.clear();
    report(&mut facts).os = "fedora".to_owned();
    report(&mut facts).os_version = None;
    let d = decide(&request("amara", "ehr-web"), &facts, &compile(&set), now);
    assert!(d.is_allow(), "{d}");
}

#[test]
fn deny_by_default_without_a_policy_or_a_resource() {
    let now = ts(NOW);
    let policies = compile(&hospital());
    let d = decide(&request("amara", "lab-hl7"), &amara(now), &policies, now);
    assert_eq!(
        d,
        Decision::Deny {
            reasons: vec![DenyReason::NoPolicy {
                resource: "lab-hl7".to_owned()
            }],
            closest_policy: None,
        }
    );
    assert_eq!(
        d.reasons()[0].to_string(),
        "No policy gives you access to lab-hl7"
    );
    let d = decide(&request("amara", "ehr-wbe"), &amara(now), &policies, now);
    assert_eq!(deny_codes(&d), ["unknown_resource"]);
    assert_eq!(
        d.reasons()[0].to_string(),
        "There is no resource called ehr-wbe: check the name"
    );
    // An empty policy set allows nothing.
    let mut empty = hospital();
    empty.policies.clear();
    let d = decide(
        &request("amara", "ehr-web"),
        &amara(now),
        &compile(&empty),
        now,
    );
    assert_eq!(deny_codes(&d), ["no_policy"]);
}

#[test]
fn of_several_allowing_policies_the_latest_expiry_wins_ties_go_to_the_first() {
    let now = ts(NOW);
    let mut set = hospital();
    let mut long = policy("clinicians-ehr-long", &["clinicians"], &["ehr-web"]);
    long.conditions.max_grant = hours(10);
    let mut short = policy("clinicians-ehr-short", &["clinicians"], &["ehr-web"]);
    short.conditions.max_grant = hours(1);
    set.policies.push(short);
    set.policies.push(long);
    let d = decide(
        &request("amara", "ehr-web"),
        &amara(now),
        &compile(&set),
        now,
    );
    match d {
        Decision::Allow {
            policy, expires_at, ..
        } => {
            assert_eq!(&*policy, "clinicians-ehr-long");
            assert_eq!(expires_at, ts("2025-03-25T23:30:00Z"));
        }
        other => panic!("{other}"),
    }

    let mut set = hospital();
    set.policies
        .push(policy("clinicians-ehr-twin", &["clinicians"], &["ehr-web"]));
    let d = decide(
        &request("amara", "ehr-web"),
        &amara(now),
        &compile(&set),
        now,
    );
    assert!(matches!(d, Decision::Allow { ref policy, .. } if &**policy == "clinicians-ehr"));
}

#[test]
fn a_denial_gives_the_reasons_of_the_closest_policy_only() {
    let now = ts(NOW);
    let mut facts = amara(now);
    facts.mfa = false;
    // ehr-web is covered by: (1) dba only, nothing else missing (not amara's group);
    // (2) clinicians, MFA, closed window (two failures); (3) clinicians, MFA (one failure).
    let mut set = hospital();
    set.policies[0].groups = vec!["dba".to_owned()];
    set.policies[0].conditions.mfa_required = false;
    let mut windowed = policy("clinicians-ehr-mondays", &["clinicians"], &["ehr-web"]);
    windowed.conditions.windows = vec![WindowSpec::new(&["mon"], "07:00", "19:00", "UTC")];
    set.policies.push(windowed);
    set.policies
        .push(policy("clinicians-ehr-mfa", &["clinicians"], &["ehr-web"]));
    let d = decide(&request("amara", "ehr-web"), &facts, &compile(&set), now);
    assert_eq!(
        d,
        Decision::Deny {
            reasons: vec![DenyReason::MfaRequired],
            closest_policy: Some("clinicians-ehr-mfa".to_owned()),
        }
    );

    // Being in the group counts for more than fewer failures.
    let mut set = hospital();
    set.policies[0].groups = vec!["dba".to_owned()];
    set.policies[0].conditions.mfa_required = false;
    let mut windowed = policy("clinicians-ehr-mondays", &["clinicians"], &["ehr-web"]);
    windowed.conditions.windows = vec![WindowSpec::new(&["mon"], "07:00", "19:00", "UTC")];
    set.policies.push(windowed);
    let d = decide(&request("amara", "ehr-web"), &facts, &compile(&set), now);
    assert_eq!(deny_codes(&d), ["mfa_required", "outside_window"]);

    // Ties go to the first policy in the set.
    let mut set = hospital();
    let mut other = policy("clinicians-ehr-b", &["clinicians"], &["ehr-web"]);
    other.conditions.mfa_required = true;
    set.policies.push(other);
    let d = decide(&request("amara", "ehr-web"), &facts, &compile(&set), now);
    assert!(
        matches!(d, Decision::Deny { closest_policy: Some(ref p), .. } if p == "clinicians-ehr")
    );
}

#[test]
fn s4_vendor_window_opens_and_closes_on_the_berlin_clock() {
    let policies = compile(&hospital());
    let mut facts = amara(ts(NOW));
    facts.groups = vec!["vendor-acme".to_owned()];
    facts.posture = None; // the vendor policy has no posture profile
    let mut ask = |now: &str| {
        let now = ts(now);
        facts.session.started_at = now - SignedDuration::from_mins(5);
        decide(&request("acme-eng", "mri-console"), &facts, &policies, now)
    };
    // Tuesday 25 March 2025, CET (UTC+1): 14:00–16:00 is 13:00–15:00 UTC.
    let before = ask("2025-03-25T12:59:59Z");
    assert_eq!(deny_codes(&before), ["outside_window"]);
    assert!(
        before.reasons()[0].to_string().ends_with(
            "(Tuesdays 14:00–16:00 Europe/Berlin); next opening: Tue 25 Mar 2025 14:00 CET"
        ),
        "{before}"
    );
    let at_open = ask("2025-03-25T13:00:00Z");
    assert_eq!(at_open.expires_at(), Some(ts("2025-03-25T15:00:00Z")));
    let late = ask("2025-03-25T14:59:00Z");
    match late {
        Decision::Allow {
            expires_at, bounds, ..
        } => {
            assert_eq!(expires_at, ts("2025-03-25T15:00:00Z"));
            assert_eq!(bounds.limited_by, Bound::WindowEnd);
        }
        other => panic!("{other}"),
    }
    let after = ask("2025-03-25T15:00:00Z");
    match &after.reasons()[0] {
        DenyReason::OutsideWindow { next_opening, .. } => {
            // The next Tuesday is in summer time (CEST, UTC+2).
            assert_eq!(*next_opening, Some(ts("2025-04-01T12:00:00Z")));
        }
        other => panic!("{other}"),
    }
}

#[test]
fn break_glass_flag_is_carried_on_the_resource_and_changes_no_normal_decision() {
    let now = ts(NOW);
    let policies = compile(&hospital());
    assert!(policies.resource("pacs").expect("pacs").emergency);
    assert!(!policies.resource("ehr-web").expect("ehr-web").emergency);
    assert!(
        policies
            .resource("ehr-web")
            .expect("ehr-web")
            .labels
            .contains("phi")
    );
    // ben (ED physician, not radiology) asking normally for pacs is denied like anyone else.
    let mut ben = amara(now);
    ben.groups = vec!["ed-physicians".to_owned()];
    let d = decide(&request("ben", "pacs"), &ben, &policies, now);
    assert_eq!(
        d.reasons()[0].to_string(),
        "You are not in a group that may use pacs (needs: radiology)"
    );
}

#[test]
fn explain_shows_every_check_of_every_policy_and_agrees_with_decide() {
    let now = ts(NOW);
    let mut set = hospital();
    let mut night = policy("clinicians-ehr-night", &["clinicians"], &["ehr-web"]);
    night.conditions.windows = vec![WindowSpec::new(
        &["mon-sun"],
        "20:00",
        "24:00",
        "Europe/Berlin",
    )];
    night.conditions.posture_profile = None;
    set.policies.push(night);
    let policies = compile(&set);

    for (user, resource, facts) in [
        ("amara", "ehr-web", amara(now)),
        ("amara", "ehr-db", amara(now)),
        ("amara", "lab-hl7", amara(now)),
        ("amara", "nope", amara(now)),
        ("amara", "ehr-web", {
            let mut f = amara(now);
            f.mfa = false;
            report(&mut f).firewall = Tri::No;
            f
        }),
    ] {
        let req = request(user, resource);
        let e = explain(&req, &facts, &policies, now);
        assert_eq!(
            e.decision,
            decide(&req, &facts, &policies, now),
            "{resource}"
        );
        // Exactly the policies with `allows_until` allow, and the decision's expiry is the
        // latest of theirs.
        let latest = e.policies.iter().filter_map(|p| p.allows_until).max();
        assert_eq!(latest, e.decision.expires_at(), "{resource}");
    }

    // amara → ehr-web: the day policy allows, the night policy's window is closed.
    let e = explain(&request("amara", "ehr-web"), &amara(now), &policies, now);
    assert_eq!(e.policies.len(), 2);
    assert_eq!(e.policies[0].allows_until, Some(ts("2025-03-25T21:30:00Z")));
    assert_eq!(e.policies[1].allows_until, None);
    let window = e.policies[1]
        .checks
        .iter()
        .find(|c| c.condition == Condition::Window)
        .expect("window check");
    assert!(
        matches!(&window.outcome, Outcome::Failed { message, .. }
            if message.contains("next opening: Tue 25 Mar 2025 20:00 CET")),
        "{window:?}"
    );
    assert!(
        e.policies[1]
            .checks
            .iter()
            .any(|c| c.condition == Condition::PostureReport && c.outcome == Outcome::NotRequired)
    );
    assert!(e.policies[0].checks.iter().any(|c| c.condition
        == Condition::Process("edr-agent".to_owned())
        && c.outcome == Outcome::Passed));

    // amara → ehr-db: one policy, only the group fails; the text a CLI prints says so.
    let e = explain(&request("amara", "ehr-db"), &amara(now), &policies, now);
    assert_eq!(e.policies.len(), 1);
    let failed: Vec<_> = e.policies[0]
        .checks
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Failed { .. }))
        .map(|c| c.condition.clone())
        .collect();
    assert_eq!(failed, [Condition::Group]);
    assert!(e.subject.iter().all(|c| c.outcome == Outcome::Passed));
    let text = e.to_string();
    assert!(
        text.contains(
            "group membership: FAILED: You are not in a group that may use ehr-db (needs: dba)"
        ),
        "{text}"
    );
    assert!(text.contains("policy dba-ehr-db: does not allow"), "{text}");
    let json = serde_json::to_value(&e).expect("json");
    assert_eq!(json["policies"][0]["policy"], "dba-ehr-db");
}

#[test]
fn admin_json_loads_compiles_and_decisions_round_trip() {
    let json = r#"{
        "groups": ["clinicians"],
        "gateways": ["gw-dc"],
        "resources": [{
            "name": "ehr-web",
            "addresses": ["10.10.1.10/32"],
            "rules": [{"dst": "10.10.1.10/32", "proto": "tcp", "ports": "443"}],
            "gateways": ["gw-dc"],
            "labels": ["phi"]
        }],
        "posture_profiles": [{
            "name": "clinical-laptop",
            "min_os_version": {"ubuntu": "24.04"},
            "firewall_required": true,
            "max_report_age": "5m"
        }],
        "policies": [{
            "name": "clinicians-ehr",
            "groups": ["clinicians"],
            "resources": ["ehr-web"],
            "conditions": {
                "posture_profile": "clinical-laptop",
                "windows": [{"days": ["mon-fri"], "start": "07:00", "end": "19:00",
                             "time_zone": "Europe/Berlin"}],
                "max_grant": "8h",
                "session_lifetime": "12h"
            }
        }]
    }"#;
    let set: PolicySet = serde_json::from_str(json).expect("policy set");
    assert!(
        set.policies[0].conditions.mfa_required,
        "MFA is required unless waived"
    );
    assert_eq!(set.policies[0].conditions.max_grant, hours(8));
    let back: PolicySet =
        serde_json::from_value(serde_json::to_value(&set).expect("json")).expect("back");
    assert_eq!(back, set);
    let policies = compile(&set);

    let now = ts(NOW);
    let allow = decide(&request("amara", "ehr-web"), &amara(now), &policies, now);
    let value = serde_json::to_value(&allow).expect("json");
    assert_eq!(value["decision"], "allow");
    assert_eq!(value["policy"], "clinicians-ehr");
    assert_eq!(value["expires_at"], "2025-03-25T18:00:00Z");
    assert_eq!(value["bounds"]["limited_by"], "window_end");
    assert_eq!(
        serde_json::from_value::<Decision>(value).expect("decision"),
        allow
    );

    let mut facts = amara(now);
    report(&mut facts).firewall = Tri::Unknown;
    let deny = decide(&request("amara", "ehr-web"), &facts, &policies, now);
    let value = serde_json::to_value(&deny).expect("json");
    assert_eq!(value["reasons"][0]["reason"], "firewall_off");
    assert_eq!(value["reasons"][0]["state"], "unknown");
    assert_eq!(
        serde_json::from_value::<Decision>(value).expect("decision"),
        deny
    );

    let facts_json = serde_json::to_value(amara(now)).expect("facts");
    assert_eq!(facts_json["posture"]["firewall"], "yes");
    assert_eq!(facts_json["device"], "approved");
}
