//! Validation of policy sets: each problem alone, all at once, and the overlap rule.

use super::*;
use crate::policy::WindowError;

fn errors(set: &PolicySet) -> Vec<ValidationError> {
    match validate(set) {
        Ok(()) => Vec::new(),
        Err(e) => e,
    }
}

#[test]
fn the_hospital_set_is_valid() {
    assert_eq!(errors(&hospital()), []);
}

#[test]
fn break_glass_only_on_emergency_resources_and_with_a_cap() {
    assert_eq!(errors(&hospital_with_break_glass()), []);
    let mut set = hospital_with_break_glass();
    let ed = set.policies.last_mut().expect("ed policy");
    ed.resources.push("ehr-web".to_owned());
    ed.conditions.break_glass = Some(BreakGlass {
        cap: Duration::ZERO,
    });
    let errs = errors(&set);
    assert_eq!(
        errs,
        [
            ValidationError::ZeroBreakGlassCap {
                policy: "ed-break-glass".to_owned()
            },
            ValidationError::BreakGlassNotEmergency {
                policy: "ed-break-glass".to_owned(),
                resource: "ehr-web".to_owned()
            },
        ]
    );
    let text = errs[1].to_string();
    assert!(
        text.contains("not marked for emergencies") && text.contains("\"emergency\": true"),
        "{text}"
    );
}

#[test]
fn each_problem_alone_is_reported_in_words() {
    type Mutate = fn(&mut PolicySet);
    let cases: Vec<(&str, Mutate, ValidationError, &str)> = vec![
        (
            "unknown group",
            |s| s.policies[0].groups.push("clinicans".to_owned()),
            ValidationError::UnknownGroup {
                policy: "clinicians-ehr".to_owned(),
                group: "clinicans".to_owned(),
            },
            "policy clinicians-ehr names group clinicans, which does not exist",
        ),
        (
            "unknown resource",
            |s| s.policies[0].resources.push("ehr-wbe".to_owned()),
            ValidationError::UnknownResource {
                policy: "clinicians-ehr".to_owned(),
                resource: "ehr-wbe".to_owned(),
            },
            "names resource ehr-wbe, which does not exist",
        ),
        (
            "unknown posture profile",
            |s| s.policies[0].conditions.posture_profile = Some("laptop".to_owned()),
            ValidationError::UnknownPostureProfile {
                policy: "clinicians-ehr".to_owned(),
                profile: "laptop".to_owned(),
            },
            "names posture profile laptop, which does not exist",
        ),
        (
            "unknown gateway",
            |s| s.resources[0].gateways = vec!["gw-x".to_owned()],
            ValidationError::UnknownGateway {
                resource: "ehr-web".to_owned(),
                gateway: "gw-x".to_owned(),
            },
            "resource ehr-web names gateway gw-x, which does not exist",
        ),
        (
            "same address, protocol and port on one gateway",
            |s| {
                s.resources[1]
                    .addresses
                    .push("10.10.1.10".parse().expect("p"));
                s.resources[1].rules.push(rule("tcp 10.10.1.10/32 443"));
            },
            ValidationError::OverlappingResources {
                gateway: "gw-dc".to_owned(),
                first: "ehr-web".to_owned(),
                second: "ehr-db".to_owned(),
                first_rule: rule("tcp 10.10.1.10/32 443"),
                second_rule: rule("tcp 10.10.1.10/32 443"),
            },
            "resources ehr-web and ehr-db overlap on gateway gw-dc",
        ),
        (
            "protocol any covers another resource's port",
            |s| {
                s.resources[4].addresses = vec!["10.10.1.10".parse().expect("p")];
                s.resources[4].rules = vec![rule("any 10.10.1.10/32")];
            },
            ValidationError::OverlappingResources {
                gateway: "gw-dc".to_owned(),
                first: "ehr-web".to_owned(),
                second: "lab-hl7".to_owned(),
                first_rule: rule("tcp 10.10.1.10/32 443"),
                second_rule: rule("any 10.10.1.10/32"),
            },
            "overlap on gateway gw-dc",
        ),
        (
            "bad window",
            |s| {
                s.policies[3].conditions.windows =
                    vec![WindowSpec::new(&["tue"], "16:00", "14:00", "Europe/Berlin")]
            },
            ValidationError::BadWindow {
                policy: "vendor-acme-mri".to_owned(),
                window: 1,
                problem: WindowError::EndNotAfterStart {
                    start: "16:00".to_owned(),
                    end: "14:00".to_owned(),
                },
            },
            "policy vendor-acme-mri, window 1: the window ends (14:00) at or before it starts (16:00)",
        ),
        (
            "window in an unknown zone",
            |s| s.policies[3].conditions.windows[0].time_zone = "Europe/Berln".to_owned(),
            ValidationError::BadWindow {
                policy: "vendor-acme-mri".to_owned(),
                window: 1,
                problem: WindowError::UnknownTimeZone("Europe/Berln".to_owned()),
            },
            "\"Europe/Berln\" is not a known IANA time zone",
        ),
        (
            "window on an unknown weekday",
            |s| s.policies[3].conditions.windows[0].days = vec!["tues".to_owned()],
            ValidationError::BadWindow {
                policy: "vendor-acme-mri".to_owned(),
                window: 1,
                problem: WindowError::UnknownWeekday("tues".to_owned()),
            },
            "\"tues\" is not a weekday",
        ),
        (
            "zero max grant",
            |s| s.policies[0].conditions.max_grant = Duration::ZERO,
            ValidationError::ZeroMaxGrant {
                policy: "clinicians-ehr".to_owned(),
            },
            "policy clinicians-ehr has a maximum grant of zero",
        ),
        (
            "zero session lifetime",
            |s| s.policies[0].conditions.session_lifetime = Duration::ZERO,
            ValidationError::ZeroSessionLifetime {
                policy: "clinicians-ehr".to_owned(),
            },
            "session lifetime of zero",
        ),
        (
            "zero report age",
            |s| s.posture_profiles[0].max_report_age = Duration::ZERO,
            ValidationError::ZeroMaxReportAge {
                profile: "clinical-laptop".to_owned(),
            },
            "maximum report age of zero",
        ),
        (
            "duplicate policy name",
            |s| {
                let copy = s.policies[0].clone();
                s.policies.push(copy);
            },
            ValidationError::DuplicateName {
                kind: "policy",
                name: "clinicians-ehr".to_owned(),
            },
            "policy clinicians-ehr is defined more than once: names must be unique",
        ),
        (
            "empty resource name",
            |s| s.resources[4].name = String::new(),
            ValidationError::EmptyName { kind: "resource" },
            "a resource has an empty name",
        ),
        (
            "rule outside the resource's addresses",
            |s| s.resources[0].rules.push(rule("tcp 10.10.9.9/32 443")),
            ValidationError::RuleOutsideAddresses {
                resource: "ehr-web".to_owned(),
                rule: rule("tcp 10.10.9.9/32 443"),
            },
            "rule \"tcp 10.10.9.9/32 port 443\" lies outside its addresses",
        ),
        (
            "ports on icmp",
            |s| s.resources[0].rules.push(rule("icmp 10.10.1.10/32 8")),
            ValidationError::PortsWithoutPortProtocol {
                resource: "ehr-web".to_owned(),
                rule: rule("icmp 10.10.1.10/32 8"),
                proto: wardgate_common::rule::Proto::Icmp,
            },
            "gives ports for icmp",
        ),
        (
            "policy without groups",
            |s| s.policies[0].groups.clear(),
            ValidationError::NoGroups {
                policy: "clinicians-ehr".to_owned(),
            },
            "names no groups",
        ),
        (
            "policy without resources",
            |s| s.policies[0].resources.clear(),
            ValidationError::NoResources {
                policy: "clinicians-ehr".to_owned(),
            },
            "names no resources",
        ),
        (
            "resource without rules",
            |s| s.resources[4].rules.clear(),
            ValidationError::NoRules {
                resource: "lab-hl7".to_owned(),
            },
            "has no rules",
        ),
        (
            "resource without gateways",
            |s| s.resources[4].gateways.clear(),
            ValidationError::NoGateways {
                resource: "lab-hl7".to_owned(),
            },
            "names no gateways",
        ),
    ];
    for (case, mutate, want, words) in cases {
        let mut set = hospital();
        mutate(&mut set);
        let got = errors(&set);
        assert_eq!(got, std::slice::from_ref(&want), "{case}");
        assert!(want.to_string().contains(words), "{case}: {want}");
        assert_eq!(
            CompiledPolicies::new(&set).expect_err("refused"),
            got,
            "{case}: an invalid set does not compile"
        );
    }
}

#[test]
fn overlap_needs_address_protocol_and_port_on_the_same_gateway() {
    // ehr-web and ehr-db on one host, different ports: fine.
    let mut set = hospital();
    set.resources[1].addresses = vec!["10.10.1.10".parse().expect("p")];
    set.resources[1].rules = vec![rule("tcp 10.10.1.10/32 5432")];
    assert_eq!(errors(&set), []);
    // Same host and port but udp vs tcp: fine.
    set.resources[1].rules = vec![rule("udp 10.10.1.10/32 443")];
    assert_eq!(errors(&set), []);
    // Same host, tcp, ranges that touch: overlap.
    set.resources[1].rules = vec![rule("tcp 10.10.1.10/32 400-443")];
    assert_eq!(errors(&set).len(), 1);
    // The same overlap served by different gateways (sites reusing ranges): fine.
    set.resources[1].gateways = vec!["gw-imaging".to_owned()];
    assert_eq!(errors(&set), []);
    // No ports means all ports.
    set.resources[1].gateways = vec!["gw-dc".to_owned()];
    set.resources[1].rules = vec![rule("tcp 10.10.1.10/32")];
    assert_eq!(errors(&set).len(), 1);
    // A subnet covers every resource inside it on that gateway: one error per pair.
    let mut set = hospital();
    set.resources[4].addresses = vec!["10.10.0.0/16".parse().expect("p")];
    set.resources[4].rules = vec![rule("tcp 10.10.0.0/16")];
    let pairs: Vec<_> = errors(&set)
        .into_iter()
        .map(|e| match e {
            ValidationError::OverlappingResources { first, second, .. } => (first, second),
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("ehr-web".to_owned(), "lab-hl7".to_owned()),
            ("ehr-db".to_owned(), "lab-hl7".to_owned()),
        ]
    );
}

#[test]
fn all_problems_are_reported_at_once() {
    let mut set = hospital();
    set.policies[0].groups.push("nobody".to_owned());
    set.policies[0].conditions.max_grant = Duration::ZERO;
    set.policies[3].conditions.windows =
        vec![WindowSpec::new(&["tues"], "16:00", "14:00", "Mars/Olympus")];
    set.resources[0].gateways.push("gw-x".to_owned());
    let got = errors(&set);
    let shown: Vec<String> = got.iter().map(ToString::to_string).collect();
    assert_eq!(got.len(), 6, "{shown:#?}");
    assert!(matches!(got[0], ValidationError::UnknownGateway { .. }));
    assert!(matches!(got[1], ValidationError::UnknownGroup { .. }));
    assert!(matches!(got[2], ValidationError::ZeroMaxGrant { .. }));
    assert!(
        got[3..]
            .iter()
            .all(|e| matches!(e, ValidationError::BadWindow { .. }))
    );
}
