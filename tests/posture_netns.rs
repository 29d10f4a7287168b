//! SCENARIOS.md S3 and device posture end to end in network namespaces, with the real
//! binaries ([`wardgate::netsite`]): the laptop's host firewall is a real nftables ruleset in
//! the client namespace, which the real `wardgate connect` inspects with `nft` (it runs in
//! that namespace, so it sees exactly that ruleset). Run with
//! `cargo nextest run --test posture_netns`.

use std::time::{Duration, Instant};

use wardgate::harness::wait_for;
use wardgate::netsite::{EHR_WEB, NetSite};

/// The reporting interval the controller gives the clients in these tests.
const INTERVAL: Duration = Duration::from_secs(1);

/// A host firewall that drops unsolicited inbound traffic and lets replies (the tunnel's
/// UDP, the EHR's TCP answers) and loopback through.
const FIREWALL_ON: &str = "table inet laptop {
    chain input {
        type filter hook input priority 0; policy drop;
        ct state established,related accept
        iif \"lo\" accept
    }
}
";
const FIREWALL_OFF: &str =
    "add chain inet laptop input { type filter hook input priority 0; policy accept; }\n";
const FIREWALL_BACK_ON: &str =
    "add chain inet laptop input { type filter hook input priority 0; policy drop; }\n";

fn site_with_profile(profile: serde_json::Value) -> NetSite {
    let s = NetSite::start("1h", "tun").expect("site");
    s.set_posture_interval("1s").expect("interval");
    s.put_posture_profile(profile).expect("profile");
    s.put_policy(
        "clinicians-ehr",
        "clinicians",
        "ehr-web",
        "1h",
        Some("clinical-laptop"),
    )
    .expect("policy with posture");
    s
}

fn events<'a>(log: &'a [serde_json::Value], action: &str) -> Vec<&'a serde_json::Value> {
    log.iter().filter(|e| e["action"] == action).collect()
}

#[test]
fn s3_firewall_off_revokes_within_one_interval_and_on_again_connects() {
    // Disk encryption is "no" on the test machine: the profile asks only for the firewall.
    let s = site_with_profile(serde_json::json!({"name": "clinical-laptop",
        "firewall_required": true, "max_report_age": "30s"}));
    s.client_nft(FIREWALL_ON).expect("firewall on");
    let amara = s.laptop("amara").expect("enrol");
    let dev = s.device_of("amara").expect("device");
    let (mut conn, _) = s
        .connect(&amara, "ehr-web")
        .expect("connect with the firewall on");
    let body = wait_for(Duration::from_secs(20), "ehr-web", || s.get(EHR_WEB))
        .expect("amara reaches ehr-web with the firewall on");
    assert!(body.contains("wardgate-test-ok"), "{body}");
    assert_eq!(s.gateway_grants().len(), 1);

    // A replayed report (an old counter, sent with the device's own certificate) is refused
    // with its own code and audited; the grant is untouched.
    let out = s
        .client_node(&[
            "posture-report",
            "--config",
            &amara.display().to_string(),
            "--counter",
            "1",
        ])
        .expect("posture-report ran");
    let answer: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(answer["accepted"], false, "{answer}");
    assert_eq!(answer["code"], "report_replayed", "{answer}");
    let log = s.audit_export().expect("export");
    let replay = events(&log, "posture.replay");
    assert_eq!(replay.len(), 1, "{replay:?}");
    assert_eq!(replay[0]["outcome"], "deny");
    assert_eq!(replay[0]["target"], dev.as_str());
    assert_eq!(replay[0]["detail"]["counter"], 1);
    assert!(replay[0]["detail"]["last_accepted"].as_i64() >= Some(1));
    assert_eq!(
        s.gateway_grants().len(),
        1,
        "a refused report changes nothing"
    );

    // The firewall goes off: within one reporting interval the grant is gone at the gateway
    // and the flow is cut.
    s.client_nft(FIREWALL_OFF).expect("firewall off");
    let t0 = Instant::now();
    wait_for(
        Duration::from_secs(15),
        "the grant to end at the gateway",
        || s.gateway_grants().is_empty().then_some(()),
    )
    .expect("S3: firewall off revokes the grant");
    let took = t0.elapsed();
    eprintln!("S3: firewall off → peer removed at the gateway in {took:?} (interval {INTERVAL:?})");
    // One interval, plus the time to run `nft`, decide, and take the peer off the gateway.
    assert!(
        took < INTERVAL + Duration::from_millis(1500),
        "revoked within one interval: {took:?}"
    );
    assert!(s.get(EHR_WEB).is_none(), "the gateway drops the flow");
    let exit = conn
        .wait_exit(Duration::from_secs(20))
        .expect("connect exits");
    assert!(!exit.success());
    let err = conn.stderr_text();
    assert!(
        err.contains("access to ehr-web ended") && err.contains("Turn on the firewall"),
        "the client says why and what to fix: {err}"
    );
    let st = s.w.status(&amara).expect("status");
    assert!(
        st["last_denial"]["reasons"]
            .to_string()
            .contains("Turn on the firewall"),
        "status shows it: {st}"
    );

    // Every posture decision is audited with the facts used.
    let log = s.audit_export().expect("export");
    let reports = events(&log, "posture.report");
    assert!(
        reports.iter().any(|e| e["outcome"] == "pass"
            && e["detail"]["facts"]["firewall"] == "yes"
            && e["detail"]["policies"][0]["pass"] == true),
        "a passing report with its facts"
    );
    let failed = reports
        .iter()
        .find(|e| e["outcome"] == "fail")
        .expect("the failing report");
    assert_eq!(failed["detail"]["facts"]["firewall"], "no", "{failed}");
    assert_eq!(failed["detail"]["policies"][0]["policy"], "clinicians-ehr");
    assert_eq!(failed["detail"]["policies"][0]["codes"][0], "firewall_off");
    assert!(
        failed["detail"]["evidence"]["firewall"]
            .as_str()
            .is_some_and(|e| e.contains("policy accept")),
        "the client's evidence: {failed}"
    );
    let decide = events(&log, "posture.decide");
    assert!(
        decide.iter().any(|e| e["outcome"] == "deny"
            && e["detail"]["codes"][0] == "firewall_off"
            && e["detail"]["facts"]["posture"]["firewall"] == "no"),
        "{decide:?}"
    );
    assert!(
        events(&log, "grant.end")
            .iter()
            .any(|e| e["detail"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("Turn on the firewall"))),
        "the grant's end names the fix"
    );

    // While it is off, connecting is refused with the same words.
    let refused = s.connect_refused(&amara, "ehr-web").expect("refused");
    assert!(refused.contains("Turn on the firewall"), "{refused}");

    // Firewall back on: the next connect works.
    s.client_nft(FIREWALL_BACK_ON).expect("firewall back on");
    let (mut conn, _) = s.connect(&amara, "ehr-web").expect("connect again");
    wait_for(Duration::from_secs(20), "ehr-web again", || s.get(EHR_WEB))
        .expect("S3: reachable again once the firewall is back on");
    let v = s.w.audit(&["verify"]).expect("verify");
    assert!(
        v.ok && v.stdout.contains("intact"),
        "{} {}",
        v.stdout,
        v.stderr
    );
    conn.stop();
}

#[test]
fn a_silenced_client_goes_stale_and_its_grant_is_revoked() {
    let s = site_with_profile(serde_json::json!({"name": "clinical-laptop",
        "max_report_age": "3s"}));
    let amara = s.laptop("amara").expect("enrol");
    let (mut conn, _) = s.connect(&amara, "ehr-web").expect("connect");
    wait_for(Duration::from_secs(20), "ehr-web", || s.get(EHR_WEB)).expect("reachable");
    // Reporting every second keeps a 3 s report age satisfied.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(s.gateway_grants().len(), 1, "fresh reports keep the grant");

    let pid = s.w.status(&amara).expect("status")["grant"]["pid"]
        .as_u64()
        .expect("pid")
        .to_string();
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("kill");
    assert!(stop.success());
    let t0 = Instant::now();
    let ended = wait_for(Duration::from_secs(15), "the stale grant to end", || {
        s.gateway_grants().is_empty().then_some(())
    });
    let took = t0.elapsed();
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    ended.expect("a stale report revokes");
    eprintln!("stale: client silenced → peer removed at the gateway after {took:?} (max age 3 s)");
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert!(s.get(EHR_WEB).is_none(), "the gateway drops the flow");
    let log = s.audit_export().expect("export");
    let decide = events(&log, "posture.decide");
    assert!(
        decide.iter().any(|e| e["actor"] == "system"
            && e["detail"]["codes"][0] == "posture_stale"
            && e["detail"]["trigger"]
                .as_str()
                .is_some_and(|t| t.contains("too old"))),
        "{decide:?}"
    );
    assert!(
        events(&log, "grant.end")
            .iter()
            .any(|e| e["detail"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("out of date"))),
        "the end names the stale report"
    );
    let exit = conn
        .wait_exit(Duration::from_secs(20))
        .expect("exits once resumed");
    assert!(!exit.success());
    assert!(
        conn.stderr_text().contains("out of date"),
        "{}",
        conn.stderr_text()
    );
}
