//! Table-driven tests of the policy engine: decisions (the stories S1, S2, every condition
//! alone and all together), windows across daylight-saving changes, validation, versions.
//!
//! The world is the hospital of `shared/SCENARIOS.md`: `amara` (clinicians, MFA) on a
//! compliant laptop, `ehr-web`, `ehr-db`, `pacs`, `mri-console`, `lab-hl7`.

mod approval;
mod decide;
mod validate;
mod version;
mod window;

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;

use super::*;
use crate::store::DeviceStatus;

/// An instant from RFC 3339 text.
pub(super) fn ts(s: &str) -> Timestamp {
    s.parse().expect("timestamp")
}

fn hours(h: u64) -> Duration {
    Duration::from_secs(h * 3600)
}

fn minutes(m: u64) -> Duration {
    Duration::from_secs(m * 60)
}

fn rule(s: &str) -> wardgate_common::rule::Rule {
    // "tcp 10.10.1.10/32 443" → Rule
    let mut it = s.split_whitespace();
    let proto = it.next().expect("proto");
    let dst = it.next().expect("dst");
    let ports = it.next();
    serde_json::from_value(serde_json::json!({
        "dst": dst,
        "proto": proto,
        "ports": ports,
    }))
    .expect("rule")
}

fn resource(name: &str, addr: &str, rules: &[&str], gateway: &str) -> Resource {
    Resource {
        name: name.to_owned(),
        addresses: vec![addr.parse().expect("prefix")],
        rules: rules.iter().map(|r| rule(r)).collect(),
        gateways: vec![gateway.to_owned()],
        labels: Default::default(),
        emergency: false,
    }
}

fn policy(name: &str, groups: &[&str], resources: &[&str]) -> Policy {
    Policy {
        name: name.to_owned(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        resources: resources.iter().map(|r| (*r).to_owned()).collect(),
        conditions: Conditions {
            mfa_required: true,
            posture_profile: Some("clinical-laptop".to_owned()),
            windows: Vec::new(),
            max_grant: hours(8),
            session_lifetime: hours(12),
            break_glass: None,
            wireguard_export: false,
            approval: None,
        },
    }
}

/// The hospital's policy set.
pub(super) fn hospital() -> PolicySet {
    let mut ehr_web = resource("ehr-web", "10.10.1.10", &["tcp 10.10.1.10/32 443"], "gw-dc");
    ehr_web.labels.insert("phi".to_owned());
    let mut ehr_db = resource("ehr-db", "10.10.1.11", &["tcp 10.10.1.11/32 5432"], "gw-dc");
    ehr_db.labels.insert("phi".to_owned());
    let mut pacs = resource(
        "pacs",
        "10.10.2.20",
        &[
            "tcp 10.10.2.20/32 104",
            "tcp 10.10.2.20/32 11112",
            "tcp 10.10.2.20/32 443",
        ],
        "gw-imaging",
    );
    pacs.emergency = true;
    pacs.labels.insert("phi".to_owned());
    let mri = resource(
        "mri-console",
        "10.20.5.5",
        &["tcp 10.20.5.5/32 5900", "tcp 10.20.5.5/32 22"],
        "gw-imaging",
    );
    let lab = resource(
        "lab-hl7",
        "10.10.3.30",
        &["tcp 10.10.3.30/32 2575"],
        "gw-dc",
    );

    let mut vendor = policy("vendor-acme-mri", &["vendor-acme"], &["mri-console"]);
    vendor.conditions.posture_profile = None;
    vendor.conditions.max_grant = hours(2);
    vendor.conditions.session_lifetime = hours(8);
    vendor.conditions.windows = vec![WindowSpec::new(&["tue"], "14:00", "16:00", "Europe/Berlin")];
    let mut dba = policy("dba-ehr-db", &["dba"], &["ehr-db"]);
    dba.conditions.max_grant = hours(1);

    PolicySet {
        groups: [
            "clinicians",
            "dba",
            "radiology",
            "ed-physicians",
            "vendor-acme",
            "approvers",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect(),
        gateways: ["gw-dc", "gw-imaging"]
            .into_iter()
            .map(str::to_owned)
            .collect(),
        resources: vec![ehr_web, ehr_db, pacs, mri, lab],
        posture_profiles: vec![clinical_laptop()],
        policies: vec![
            policy("clinicians-ehr", &["clinicians"], &["ehr-web"]),
            dba,
            policy("radiology-pacs", &["radiology"], &["pacs"]),
            vendor,
        ],
    }
}

/// The hospital with break-glass for `pacs`: the ED physicians may break glass for 30 minutes
/// (S6); the policy also asks for posture and has a window, both of which break-glass skips.
pub(super) fn hospital_with_break_glass() -> PolicySet {
    let mut set = hospital();
    let mut ed = policy("ed-break-glass", &["ed-physicians"], &["pacs"]);
    ed.conditions.windows = vec![WindowSpec::new(&["sat"], "10:00", "11:00", "Europe/Berlin")];
    ed.conditions.break_glass = Some(BreakGlass { cap: minutes(30) });
    set.policies.push(ed);
    set
}

fn clinical_laptop() -> PostureProfile {
    PostureProfile {
        name: "clinical-laptop".to_owned(),
        min_os_version: BTreeMap::from([
            ("ubuntu".to_owned(), "24.04".parse().expect("version")),
            ("macos".to_owned(), "14.0".parse().expect("version")),
        ]),
        disk_encryption_required: true,
        firewall_required: true,
        screen_lock_required: true,
        required_processes: vec!["edr-agent".to_owned()],
        min_client_version: Some("0.1.0".parse().expect("version")),
        max_report_age: minutes(5),
    }
}

/// Tuesday 25 March 2025, 14:30 in Berlin (CET, UTC+1): inside the vendor window.
pub(super) const NOW: &str = "2025-03-25T13:30:00Z";

/// amara: clinicians, MFA, signed in an hour ago, approved laptop, compliant report a minute
/// old.
pub(super) fn amara(now: Timestamp) -> Facts {
    Facts {
        groups: vec!["clinicians".to_owned()],
        mfa: true,
        session: Session {
            started_at: now - jiff::SignedDuration::from_hours(1),
            expires_at: None,
        },
        device: DeviceStatus::Approved,
        user_disabled: false,
        posture: Some(PostureReport {
            os: "ubuntu".to_owned(),
            os_version: Some("24.04".parse().expect("version")),
            disk_encrypted: Tri::Yes,
            firewall: Tri::Yes,
            screen_lock: Tri::Yes,
            processes: vec!["edr-agent".to_owned(), "sshd".to_owned()],
            client_version: Some("0.1.0".parse().expect("version")),
            at: now - jiff::SignedDuration::from_mins(1),
        }),
        approvals: Vec::new(),
        vendor: None,
    }
}

pub(super) fn request(user: &str, resource: &str) -> AccessRequest {
    AccessRequest {
        user: user.to_owned(),
        device_id: format!("dev-{user}"),
        resource: resource.to_owned(),
    }
}

pub(super) fn compile(set: &PolicySet) -> CompiledPolicies {
    CompiledPolicies::new(set).expect("the policy set is valid")
}

/// The facts' posture report, for tests that change it.
pub(super) fn report(facts: &mut Facts) -> &mut PostureReport {
    facts.posture.as_mut().expect("report")
}
