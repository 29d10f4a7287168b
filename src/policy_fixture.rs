//! A small hospital policy set and an allowed request, for measuring the pure engine.

use wardgate_controller::policy::{AccessRequest, Facts, PolicySet, Session};

/// clinicians → ehr-web through gw-ehr, no MFA (local users), one hour.
pub fn set() -> anyhow::Result<PolicySet> {
    Ok(serde_json::from_value(serde_json::json!({
        "groups": ["clinicians", "dba"],
        "gateways": ["gw-ehr"],
        "resources": [{"name": "ehr-web", "addresses": ["10.10.1.10/32"],
                       "rules": [{"dst": "10.10.1.10/32", "proto": "tcp", "ports": "443"}],
                       "gateways": ["gw-ehr"]}],
        "policies": [{"name": "clinicians-ehr", "groups": ["clinicians"], "resources": ["ehr-web"],
                      "conditions": {"mfa_required": false, "max_grant": "1h", "session_lifetime": "8h"}}]
    }))?)
}

/// amara asks for ehr-web from an approved device.
pub fn facts() -> (AccessRequest, Facts) {
    (
        AccessRequest {
            user: "amara".into(),
            device_id: "dev_1".into(),
            resource: "ehr-web".into(),
        },
        Facts {
            groups: vec!["clinicians".into()],
            mfa: false,
            session: Session {
                started_at: jiff::Timestamp::now(),
                expires_at: None,
            },
            device: wardgate_controller::store::DeviceStatus::Approved,
            user_disabled: false,
            posture: None,
            approvals: Vec::new(),
            vendor: None,
        },
    )
}
