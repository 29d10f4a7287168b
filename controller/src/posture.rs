//! Device posture in the policy administrator: accepting reports, refusing replays, and
//! re-deciding live grants when a report changes what is allowed or grows too old.
//!
//! - **Accept** ([`Controller::report_posture`]): the report rides the device's mutual-TLS
//!   session (so its certificate says whose it is); its counter must exceed the last accepted
//!   one, which the store settles atomically. A replay is refused with
//!   [`ErrorCode::ReportReplayed`] and audited (`posture.replay`). An accepted report is
//!   audited (`posture.report`) with the facts and each posture policy's verdict, and every
//!   live grant of the device is re-decided at once.
//! - **Staleness** ([`Controller::sweep_posture`]): on a timer, devices whose latest report is
//!   older than the shortest maximum report age (or that never reported) have their grants
//!   re-decided; the engine fails a stale report as a whole.
//! - **Ending**: a grant the engine no longer allows ends through [`Controller::end_grants`]
//!   (gateways drop the peer, acked; the device is told the reason in words).
//!
//! The pieces that decide are pure ([`policy_report`], [`end_reason`], [`grants_to_end`]),
//! so the unit tests need no store and no clock.

use std::time::Duration;

use jiff::Timestamp;
use serde_json::json;
use tracing::{info, warn};
use wardgate_common::posture as wire;
use wardgate_common::proto::{ErrorCode, Response, WireError};

use crate::policy::{self, AccessRequest, CompiledPolicies, Decision, DenyReason, Facts, Version};
use crate::service::Controller;
use crate::store::{Device, Grant, PostureAccept, StoreError};

/// The store setting holding the reporting interval devices are told (ms).
pub const SETTING_POSTURE_INTERVAL_MS: &str = "posture.report_interval_ms";
/// The reporting interval when none is set: frequent enough that a firewall switched off is
/// noticed within half a minute, rare enough that ten thousand laptops are no burden.
pub const DEFAULT_POSTURE_INTERVAL: Duration = Duration::from_secs(30);
/// The shortest interval an administrator may set (tests use 1 s).
pub const MIN_POSTURE_INTERVAL: Duration = Duration::from_millis(500);
/// The longest interval an administrator may set.
pub const MAX_POSTURE_INTERVAL: Duration = Duration::from_secs(3600);
/// Most process names a report may list (a profile requires a handful).
pub const MAX_REPORT_PROCESSES: usize = 256;

fn now_ms() -> i64 {
    wardgate_common::clock::now_ms()
}

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn internal(e: impl std::fmt::Display) -> WireError {
    warn!(error = %e, "internal error while handling posture");
    WireError::new(
        ErrorCode::Internal,
        "the controller hit an internal error; it has been logged there, try again later",
    )
}

fn tri(t: wire::Tri) -> policy::Tri {
    match t {
        wire::Tri::Yes => policy::Tri::Yes,
        wire::Tri::No => policy::Tri::No,
        wire::Tri::Unknown => policy::Tri::Unknown,
    }
}

/// The engine's view of a wire report received at `received`: versions parsed (a text that
/// is not a version counts as not reported, which fails any minimum), the time of receipt as
/// the report's time, and the people-only fields (kernel, evidence) left out.
pub fn policy_report(r: &wire::PostureReport, received: Timestamp) -> policy::PostureReport {
    let version = |v: &Option<String>| v.as_deref().and_then(|s| s.parse::<Version>().ok());
    policy::PostureReport {
        os: r.os.clone(),
        os_version: version(&r.os_version),
        disk_encrypted: tri(r.disk_encrypted),
        firewall: tri(r.firewall),
        screen_lock: tri(r.screen_lock),
        processes: r.processes.clone(),
        client_version: version(&r.client_version),
        at: received,
    }
}

/// The reason a grant ends with, in words the client shows as they are: every failed
/// condition's own sentence ("Turn on the firewall"), joined.
pub fn end_reason(reasons: &[DenyReason]) -> String {
    let words: Vec<String> = reasons.iter().map(ToString::to_string).collect();
    format!("no longer allowed: {}", words.join("; "))
}

/// Which of `grants` (resource names, in order) the engine no longer allows for `user` on
/// `device_id` with `facts` at `now`, each with every reason: the re-evaluation's decision,
/// without IO.
pub fn grants_to_end<'a>(
    policies: &CompiledPolicies,
    user: &str,
    device_id: &str,
    facts: &Facts,
    resources: impl IntoIterator<Item = &'a str>,
    now: Timestamp,
) -> Vec<(usize, Vec<DenyReason>)> {
    resources
        .into_iter()
        .enumerate()
        .filter_map(|(i, resource)| {
            let request = AccessRequest {
                user: user.to_owned(),
                device_id: device_id.to_owned(),
                resource: resource.to_owned(),
            };
            match policies.decide(&request, facts, now) {
                Decision::Allow { .. } => None,
                Decision::Deny { reasons, .. } => Some((i, reasons)),
            }
        })
        .collect()
}

/// Checks what the store cannot: the counter fits the store's signed column, the list of
/// processes is bounded, and a fingerprint in the report is that of the certificate the
/// session was authenticated with (a report copied from another device is refused).
pub fn check_report(device: &Device, r: &wire::PostureReport) -> Result<i64, WireError> {
    let counter = i64::try_from(r.counter)
        .ok()
        .filter(|c| *c >= 1)
        .ok_or_else(|| {
            WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "posture report counter {} is out of range (1 to {})",
                    r.counter,
                    i64::MAX
                ),
            )
        })?;
    if r.processes.len() > MAX_REPORT_PROCESSES {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!("a posture report lists at most {MAX_REPORT_PROCESSES} processes"),
        ));
    }
    if let (Some(said), Some(known)) = (&r.device_fingerprint, &device.cert_fingerprint)
        && !said.eq_ignore_ascii_case(known)
    {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            "the posture report names another device's certificate",
        ));
    }
    Ok(counter)
}

/// The engine's view of `device_id`'s latest report, if it ever sent one the controller can
/// read (an unreadable stored report counts as none: the safe direction).
pub async fn latest_report(
    ctl: &Controller,
    device_id: &str,
) -> Result<Option<policy::PostureReport>, StoreError> {
    let Some(stored) = ctl.store.latest_posture(device_id).await? else {
        return Ok(None);
    };
    match serde_json::from_str::<wire::PostureReport>(&stored.report_json) {
        Ok(r) => Ok(Some(policy_report(&r, ts(stored.received_ms)))),
        Err(e) => {
            warn!(device = %device_id, error = %e, "stored posture report is unreadable; treating it as missing");
            Ok(None)
        }
    }
}

impl Controller {
    /// The interval devices report at, from the store setting (default 30 s).
    pub async fn posture_interval(&self) -> Duration {
        match self.store.get_setting(SETTING_POSTURE_INTERVAL_MS).await {
            Ok(Some(v)) => v
                .parse::<u64>()
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_POSTURE_INTERVAL),
            _ => DEFAULT_POSTURE_INTERVAL,
        }
    }

    /// A device reports its posture (see the module docs).
    pub async fn report_posture(
        &self,
        device: &Device,
        report: wire::PostureReport,
    ) -> Result<Response, WireError> {
        let actor = format!("device:{}", device.id);
        let counter = check_report(device, &report)?;
        let text = serde_json::to_string(&report).map_err(internal)?;
        let received = now_ms();
        match self
            .store
            .accept_posture_report(&device.id, counter, &text, received)
            .await
            .map_err(internal)?
        {
            PostureAccept::Accepted => {}
            PostureAccept::Replayed { last } => {
                self.audit(
                    &actor,
                    "posture.replay",
                    &device.id,
                    "deny",
                    json!({"counter": report.counter, "last_accepted": last,
                           "reason": "counter not above the last accepted report's"}),
                )
                .await
                .map_err(internal)?;
                warn!(device = %device.id, counter = report.counter, last, "posture report replayed; refused");
                return Err(WireError::new(
                    ErrorCode::ReportReplayed,
                    format!(
                        "posture report {} refused: the controller already accepted report {last} from this device (an old report replayed?)",
                        report.counter
                    ),
                ));
            }
        }
        let policies = self.policies.get(self).await?;
        let now = now_ms();
        let (user, facts) = crate::access::facts_for(self, &device.id, now).await?;
        let verdicts = policies.posture_verdicts(&facts, ts(now));
        let failing: Vec<String> = {
            let mut words: Vec<String> = verdicts
                .iter()
                .flat_map(|v| v.reasons.iter().map(ToString::to_string))
                .collect();
            words.sort();
            words.dedup();
            words
        };
        let outcome = if verdicts.iter().all(|v| v.pass) {
            "pass"
        } else {
            "fail"
        };
        // The decision on the new facts is recorded before anything acts on it.
        self.audit(
            &actor,
            "posture.report",
            &device.id,
            outcome,
            json!({"counter": report.counter, "user": user.username, "facts": facts.posture,
                   "evidence": report.detail, "kernel": report.kernel, "os_name": report.os_name,
                   "policies": verdicts.iter().map(|v| json!({"policy": v.policy, "profile": v.profile,
                        "pass": v.pass, "reasons": v.reasons.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "codes": v.reasons.iter().map(DenyReason::code).collect::<Vec<_>>()})).collect::<Vec<_>>()}),
        )
        .await
        .map_err(internal)?;
        let ended = self
            .redecide_device(&device.id, &policies, &actor, "posture report")
            .await?;
        if ended > 0 {
            info!(device = %device.id, ended, "grants ended on a posture report");
        }
        let interval = self.posture_interval().await;
        Ok(Response::PostureAccepted {
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            processes: policies.required_processes(),
            failing,
        })
    }

    /// Re-decides every live grant of `device_id` on the facts known now and ends those no
    /// longer allowed, telling the device why. Each ended grant's decision is audited
    /// (`posture.decide`, with the facts) before it is ended. Returns how many ended.
    async fn redecide_device(
        &self,
        device_id: &str,
        policies: &CompiledPolicies,
        actor: &str,
        trigger: &str,
    ) -> Result<usize, WireError> {
        let now = now_ms();
        if self.is_export_device(device_id).await.map_err(internal)? {
            // A device handed a WireGuard configuration reports no posture by design.
            return Ok(0);
        }
        let mut grants = self
            .store
            .active_grants_for_device(device_id, now)
            .await
            .map_err(internal)?;
        // Break-glass grants skip posture: an emergency does not wait for a security check.
        let mut ordinary = Vec::with_capacity(grants.len());
        for g in grants.drain(..) {
            if self
                .store
                .break_glass_for_grant(g.id)
                .await
                .map_err(internal)?
                .is_none()
            {
                ordinary.push(g);
            }
        }
        let grants = ordinary;
        if grants.is_empty() {
            return Ok(0);
        }
        let (user, facts) = crate::access::facts_for(self, device_id, now).await?;
        let verdicts = grants_to_end(
            policies,
            &user.username,
            device_id,
            &facts,
            grants.iter().map(|g| g.resource.as_str()),
            ts(now),
        );
        let mut ended = 0;
        let mut grants: Vec<Option<Grant>> = grants.into_iter().map(Some).collect();
        for (i, reasons) in verdicts {
            let Some(g) = grants.get_mut(i).and_then(Option::take) else {
                continue;
            };
            let reason = end_reason(&reasons);
            self.audit(
                actor,
                "posture.decide",
                &g.id.to_string(),
                "deny",
                json!({"trigger": trigger, "device": device_id, "user": user.username,
                       "resource": g.resource, "reasons": reasons.iter().map(ToString::to_string).collect::<Vec<_>>(),
                       "codes": reasons.iter().map(DenyReason::code).collect::<Vec<_>>(),
                       "posture_related": reasons.iter().any(DenyReason::is_posture),
                       "facts": facts}),
            )
            .await
            .map_err(internal)?;
            ended += self.end_grants(vec![g], &reason, actor, true).await;
        }
        Ok(ended)
    }

    /// Ends the grants of devices whose posture report has grown older than their policies
    /// allow (or that never reported): the sweeper calls this on a timer. Returns how many
    /// grants ended.
    pub async fn sweep_posture(&self) -> usize {
        let Ok(policies) = self.policies.get(self).await else {
            return 0;
        };
        let Some(floor) = policies.shortest_report_age() else {
            return 0;
        };
        let now = now_ms();
        let floor_ms = i64::try_from(floor.as_millis()).unwrap_or(i64::MAX);
        let devices = match self
            .store
            .devices_with_stale_posture(now.saturating_sub(floor_ms), now)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot look for stale posture reports");
                return 0;
            }
        };
        let mut ended = 0;
        for d in devices {
            match self
                .redecide_device(&d, &policies, "system", "posture report too old or missing")
                .await
            {
                Ok(n) => ended += n,
                Err(e) => warn!(device = %d, error = %e, "cannot re-decide a device's grants"),
            }
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::policy::{PolicySet, Session};
    use crate::store::DeviceStatus;

    fn set(max_report_age: &str) -> CompiledPolicies {
        let set: PolicySet = serde_json::from_value(json!({
            "groups": ["clinicians"],
            "gateways": ["gw"],
            "resources": [{"name": "ehr-web", "addresses": ["10.10.1.10/32"],
                "rules": [{"dst": "10.10.1.10/32", "proto": "tcp", "ports": "443"}], "gateways": ["gw"]},
                {"name": "wiki", "addresses": ["10.10.1.20/32"],
                "rules": [{"dst": "10.10.1.20/32", "proto": "tcp", "ports": "443"}], "gateways": ["gw"]}],
            "posture_profiles": [{"name": "laptop", "firewall_required": true,
                "min_os_version": {"ubuntu": "24.04"}, "required_processes": ["edr-agent"],
                "max_report_age": max_report_age}],
            "policies": [
                {"name": "ehr", "groups": ["clinicians"], "resources": ["ehr-web"],
                 "conditions": {"mfa_required": false, "posture_profile": "laptop", "max_grant": "1h", "session_lifetime": "8h"}},
                {"name": "wiki", "groups": ["clinicians"], "resources": ["wiki"],
                 "conditions": {"mfa_required": false, "max_grant": "1h", "session_lifetime": "8h"}}]
        }))
        .expect("policy set");
        CompiledPolicies::new(&set).expect("compiles")
    }

    fn wire_report(firewall: wire::Tri) -> wire::PostureReport {
        wire::PostureReport {
            os: "ubuntu".into(),
            os_version: Some("24.04".into()),
            os_name: None,
            kernel: None,
            disk_encrypted: wire::Tri::No,
            firewall,
            screen_lock: wire::Tri::Unknown,
            processes: vec!["edr-agent".into()],
            client_version: Some("0.1.0".into()),
            device_fingerprint: None,
            counter: 3,
            detail: Default::default(),
        }
    }

    fn facts(report: Option<policy::PostureReport>, now: Timestamp) -> Facts {
        Facts {
            groups: vec!["clinicians".into()],
            mfa: false,
            session: Session {
                started_at: now,
                expires_at: None,
            },
            device: DeviceStatus::Approved,
            user_disabled: false,
            posture: report,
            approvals: Vec::new(),
            vendor: None,
        }
    }

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn wire_report_becomes_engine_facts_stamped_with_the_time_of_receipt() {
        let mut r = wire_report(wire::Tri::Yes);
        r.client_version = Some("not a version".into());
        let got = policy_report(&r, at("2025-04-01T10:00:00Z"));
        assert_eq!(got.firewall, policy::Tri::Yes);
        assert_eq!(got.disk_encrypted, policy::Tri::No);
        assert_eq!(got.os_version, Some("24.04".parse().expect("v")));
        assert_eq!(
            got.client_version, None,
            "unreadable version = not reported"
        );
        assert_eq!(got.at, at("2025-04-01T10:00:00Z"));
    }

    #[test]
    fn firewall_off_ends_only_the_posture_policy_grant_and_says_what_to_fix() {
        let p = set("2m");
        let now = at("2025-04-01T10:00:30Z");
        let received = at("2025-04-01T10:00:29Z");
        let ok = facts(
            Some(policy_report(&wire_report(wire::Tri::Yes), received)),
            now,
        );
        assert!(grants_to_end(&p, "amara", "dev", &ok, ["ehr-web", "wiki"], now).is_empty());

        let off = facts(
            Some(policy_report(&wire_report(wire::Tri::No), received)),
            now,
        );
        let end = grants_to_end(&p, "amara", "dev", &off, ["ehr-web", "wiki"], now);
        assert_eq!(
            end.len(),
            1,
            "only the grant whose policy checks posture: {end:?}"
        );
        assert_eq!(end[0].0, 0);
        assert_eq!(
            end[0].1.iter().map(DenyReason::code).collect::<Vec<_>>(),
            ["firewall_off"]
        );
        let words = end_reason(&end[0].1);
        assert!(words.contains("Turn on the firewall"), "{words}");

        let unknown = facts(
            Some(policy_report(&wire_report(wire::Tri::Unknown), received)),
            now,
        );
        let end = grants_to_end(&p, "amara", "dev", &unknown, ["ehr-web"], now);
        assert_eq!(end.len(), 1, "unknown never passes");
    }

    #[test]
    fn stale_or_missing_reports_end_the_grant_and_every_check_has_its_sentence() {
        let p = set("5s");
        let now = at("2025-04-01T10:00:30Z");
        let old = facts(
            Some(policy_report(
                &wire_report(wire::Tri::Yes),
                at("2025-04-01T10:00:20Z"),
            )),
            now,
        );
        let end = grants_to_end(&p, "amara", "dev", &old, ["ehr-web"], now);
        assert_eq!(
            end[0].1.iter().map(DenyReason::code).collect::<Vec<_>>(),
            ["posture_stale"]
        );
        let fresh_edge = facts(
            Some(policy_report(
                &wire_report(wire::Tri::Yes),
                at("2025-04-01T10:00:25Z"),
            )),
            now,
        );
        assert!(grants_to_end(&p, "amara", "dev", &fresh_edge, ["ehr-web"], now).is_empty());
        let none = facts(None, now);
        let end = grants_to_end(&p, "amara", "dev", &none, ["ehr-web"], now);
        assert_eq!(
            end[0].1.iter().map(DenyReason::code).collect::<Vec<_>>(),
            ["no_posture_report"]
        );

        let mut bad = wire_report(wire::Tri::No);
        bad.os_version = Some("22.04".into());
        bad.processes.clear();
        let f = facts(Some(policy_report(&bad, now)), now);
        let end = grants_to_end(&p, "amara", "dev", &f, ["ehr-web"], now);
        let words = end_reason(&end[0].1);
        for want in [
            "Update the operating system to 24.04 or later",
            "Turn on the firewall",
            "Start edr-agent",
        ] {
            assert!(words.contains(want), "{want:?} in {words}");
        }
        let verdicts = p.posture_verdicts(&f, now);
        assert_eq!(verdicts.len(), 1);
        let outsider = Facts {
            groups: vec!["vendor".into()],
            ..f.clone()
        };
        assert!(
            p.posture_verdicts(&outsider, now).is_empty(),
            "only policies that could apply to the user"
        );
        assert!(!verdicts[0].pass);
        assert_eq!(verdicts[0].policy, "ehr");
        assert_eq!(
            p.shortest_report_age(),
            Some(jiff::SignedDuration::from_secs(5))
        );
        assert_eq!(p.required_processes(), ["edr-agent"]);
    }

    #[test]
    fn reports_with_bad_counters_or_another_devices_fingerprint_are_refused() {
        let device = Device {
            id: "dev_1".into(),
            name: "laptop".into(),
            owner_user_id: "usr_1".into(),
            status: DeviceStatus::Approved,
            csr_pem: String::new(),
            cert_pem: None,
            cert_fingerprint: Some("ab12".into()),
            poll_token_hash: String::new(),
            os: "linux".into(),
            hostname: "h".into(),
            created_ms: 0,
            decided_ms: None,
            tunnel_addr: None,
        };
        let mut r = wire_report(wire::Tri::Yes);
        assert_eq!(check_report(&device, &r).expect("ok"), 3);
        r.counter = 0;
        assert_eq!(
            check_report(&device, &r).map_err(|e| e.code),
            Err(ErrorCode::BadRequest)
        );
        r.counter = u64::MAX;
        assert_eq!(
            check_report(&device, &r).map_err(|e| e.code),
            Err(ErrorCode::BadRequest)
        );
        r.counter = 4;
        r.device_fingerprint = Some("AB12".into());
        assert!(
            check_report(&device, &r).is_ok(),
            "hex case does not matter"
        );
        r.device_fingerprint = Some("cd34".into());
        assert_eq!(
            check_report(&device, &r).map_err(|e| e.code),
            Err(ErrorCode::BadRequest)
        );
    }
}
