//! SCENARIOS.md stories S1, S2, S4, S5, S7, S9 and S12 end to end in network namespaces, with the
//! real binaries: the controller and the gateway (TUN mode) in one namespace, the laptops (TUN
//! mode) in another, and the clinical systems at their 10.x addresses in a third
//! ([`wardgate::netsite`]). Run one story with `cargo nextest run --test scenarios_netns s5_`.

use std::time::{Duration, Instant};

use wardgate::harness::{Proc, bin, wait_for};
use wardgate::netsite::{EHR_DB, EHR_WEB, MRI_OTHER, MRI_SSH, MRI_VNC, NetSite};

fn site(max_grant: &str) -> NetSite {
    NetSite::start(max_grant, "tun").expect("site")
}

fn events<'a>(log: &'a [serde_json::Value], action: &str) -> Vec<&'a serde_json::Value> {
    log.iter().filter(|e| e["action"] == action).collect()
}

#[test]
fn s1_s2_s9_clinician_reaches_ehr_only_renews_is_denied_ehr_db_and_the_log_verifies() {
    let s = site("8s");
    let amara = s.laptop("amara").expect("enrol");

    // S1: she reaches 10.10.1.10:443, and nothing else in 10.10.0.0/16 answers her.
    let t0 = Instant::now();
    let (mut conn, granted_after) = s.connect(&amara, "ehr-web").expect("connect");
    let body = wait_for(
        Duration::from_secs(20),
        "ehr-web through the tunnel",
        || s.get(EHR_WEB),
    )
    .expect("S1: amara reaches ehr-web");
    eprintln!(
        "S1: granted after {granted_after:?}, first byte from ehr-web {:?} after `wardgate connect`",
        t0.elapsed()
    );
    assert!(body.contains("wardgate-test-ok"), "{body}");
    for other in [
        EHR_DB,
        "10.10.1.11:443",
        "10.10.1.10:22",
        MRI_VNC,
        MRI_OTHER,
    ] {
        assert!(!s.answers(other), "S1: {other} must not answer amara");
    }
    let grants = s.gateway_grants();
    assert_eq!(grants.len(), 1, "one peer at the gateway: {grants:?}");
    let first = grants[0]["grant_id"].as_u64().expect("id");

    // The 8 s grant renews by itself (new decision, new key) and the EHR keeps answering;
    // the old peer leaves the gateway.
    let renewed = wait_for(Duration::from_secs(30), "the renewal", || {
        let st = s.w.status(&amara).ok()?;
        let id = st["grant"]["grant_id"].as_u64()?;
        (id != first && st["grant"]["renewal"] == "renewed").then_some(id)
    })
    .expect("S1: the grant renews");
    wait_for(Duration::from_secs(10), "ehr-web after renewal", || {
        s.get(EHR_WEB)
    })
    .expect("still reachable after renewal");
    wait_for(Duration::from_secs(10), "the old peer to go", || {
        let ids: Vec<u64> = s
            .gateway_grants()
            .iter()
            .filter_map(|g| g["grant_id"].as_u64())
            .collect();
        (ids == vec![renewed]).then_some(())
    })
    .expect("only the renewed grant is at the gateway");
    assert!(conn.running(), "connect keeps running across renewals");

    // S2: ehr-db is denied, in words, and audited.
    let err = s.connect_refused(&amara, "ehr-db").expect("refused");
    assert!(err.contains("access to ehr-db denied"), "{err}");
    assert!(err.contains("dba"), "the reason names the group: {err}");
    assert!(!s.answers(EHR_DB));

    // S9: the auditor exports and verifies; every line says who, what, when, why.
    let log = s.audit_export().expect("export");
    for l in &log {
        for k in ["seq", "at", "actor", "action", "target", "outcome", "hash"] {
            assert!(!l[k].is_null(), "missing {k} in {l}");
        }
    }
    let decides = events(&log, "access.decide");
    assert!(
        decides
            .iter()
            .any(|e| e["outcome"] == "deny" && e["detail"]["reasons"].to_string().contains("dba")),
        "the denial with its reason"
    );
    assert!(
        decides.iter().filter(|e| e["outcome"] == "allow").count() >= 2,
        "the first decision and the renewal's"
    );
    let issued = events(&log, "grant.issue");
    for id in [first, renewed] {
        assert!(
            issued
                .iter()
                .any(|e| e["target"].as_str() == Some(id.to_string().as_str())),
            "grant {id} has its issue event"
        );
    }
    assert!(
        issued
            .iter()
            .any(|e| e["detail"]["renews"].as_u64() == Some(first)),
        "the renewal names the grant it renews"
    );
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
fn s5_vendor_probes_scans_and_spoofs_every_packet_dropped_counted_audited() {
    let s = site("1h");
    let acme = s.laptop("acme-eng").expect("enrol");
    let (mut conn, _) = s.connect(&acme, "mri-console").expect("connect");

    // The granted flow: a 64 MiB upload to the console's VNC port, running during the attack.
    let node = bin("wardgate-bench").expect("bin");
    let mut c = s.topo.client.command(&node);
    c.args(["node", "send", "--to", MRI_VNC, "--bytes", "67108864"]);
    let mut upload = Proc::spawn(c, &s.w.logs, "upload").expect("upload");
    assert!(s.answers(MRI_SSH), "tcp/22 on the console is granted too");

    // Through the real client, nothing but the console's two ports is even routed.
    for other in [EHR_DB, MRI_OTHER, "10.20.5.5:80"] {
        assert!(!s.answers(other), "{other} must not answer acme-eng");
    }

    // A tampered client on the same laptop holds a real grant of its own and writes what it
    // likes into the tunnel: ehr-db, a scan of 10.20.5.0/24, and another tunnel's address.
    let grant_file = s.w.dir.path().join("rogue-grant.json");
    let key_file = s.w.dir.path().join("rogue.key");
    let mut c = s.topo.client.command(&node);
    c.args([
        "node",
        "rogue-grant",
        "--resource",
        "mri-console",
        "--config",
    ])
    .arg(&acme)
    .arg("--grant-out")
    .arg(&grant_file)
    .arg("--key-out")
    .arg(&key_file);
    let mut rogue = Proc::spawn(c, &s.w.logs, "rogue").expect("rogue");
    wait_for(Duration::from_secs(20), "the rogue grant", || {
        std::fs::read_to_string(&rogue.stdout)
            .ok()
            .filter(|o| o.contains("ready"))
    })
    .expect("rogue grant");
    let grant: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&grant_file).expect("grant")).expect("json");
    let rogue_id = grant["grant_id"].as_u64().expect("id");
    let own = grant["tunnel_addr"].as_str().expect("addr").to_owned();
    let attack = |src: &str, targets: &[String]| -> serde_json::Value {
        let mut args = vec![
            "syn-attack".to_owned(),
            "--grant".into(),
            grant_file.display().to_string(),
            "--key".into(),
            key_file.display().to_string(),
            "--src".into(),
            src.to_owned(),
            "--count".into(),
            "1".into(),
            "--listen".into(),
            "2s".into(),
        ];
        for t in targets {
            args.push("--to".into());
            args.push(t.clone());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = s.client_node(&refs).expect("syn-attack ran");
        serde_json::from_str(out.trim()).expect("report")
    };
    let r = attack(&own, &[EHR_DB.to_owned()]);
    assert_eq!(r["replies"], 0, "ehr-db: {r}");
    assert_eq!(r["handshake"], true, "the attack reached the gateway: {r}");
    let scan: Vec<String> = (1..=254)
        .filter(|h| *h != 5)
        .map(|h| format!("10.20.5.{h}:5900"))
        .collect();
    let r = attack(&own, &scan);
    assert_eq!(r["replies"], 0, "the scan found nothing: {r}");
    assert_eq!(r["sent"], 253);
    let r = attack("100.64.0.99", &[MRI_VNC.to_owned()]);
    assert_eq!(r["replies"], 0, "spoofed source: {r}");

    // Every packet dropped at the gateway and counted against the rogue grant.
    let counted = |reason: &str| -> u64 {
        s.gateway_grants()
            .iter()
            .filter(|g| g["grant_id"] == rogue_id)
            .flat_map(|g| g["dropped"].as_array().cloned().unwrap_or_default())
            .filter(|e| e[0] == reason)
            .filter_map(|e| e[1].as_u64())
            .sum()
    };
    assert!(counted("destination_not_allowed") >= 254, "ehr-db + scan");
    assert!(counted("spoofed_source") >= 1);

    // The granted upload is unaffected.
    let exit = upload
        .wait_exit(Duration::from_secs(120))
        .expect("upload ends");
    assert!(exit.success(), "upload: {}", upload.stderr_text());
    let out = std::fs::read_to_string(&upload.stdout).unwrap_or_default();
    assert!(
        out.contains("\"hash_ok\":true"),
        "the upload arrived intact: {out}"
    );

    // And audited: the gateway reports its drops, the controller names who was behind them.
    let rows = wait_for(
        Duration::from_secs(20),
        "the drops in the audit log",
        || {
            let log = s.audit_export().ok()?;
            let rows: Vec<serde_json::Value> = events(&log, "dataplane.drop")
                .into_iter()
                .filter(|e| e["target"].as_str() == Some(rogue_id.to_string().as_str()))
                .cloned()
                .collect();
            let total = |reason: &str| -> u64 {
                rows.iter()
                    .filter(|e| e["detail"]["reason"] == reason)
                    .filter_map(|e| e["detail"]["packets"].as_u64())
                    .sum()
            };
            (total("destination_not_allowed") >= 254 && total("spoofed_source") >= 1)
                .then_some(rows)
        },
    )
    .expect("S5: drops audited");
    for r in &rows {
        assert_eq!(r["detail"]["user"], "acme-eng", "{r}");
        assert_eq!(r["detail"]["resource"], "mri-console", "{r}");
        assert_eq!(r["outcome"], "deny");
        assert_eq!(r["actor"], "gateway:gw-main");
    }
    rogue.kill();
    conn.stop();
}

#[test]
fn s7_stolen_laptop_grants_end_at_the_gateway_and_it_cannot_connect_again() {
    let s = site("1h");
    let amara = s.laptop("amara").expect("enrol");
    let (mut conn, _) = s.connect(&amara, "ehr-web").expect("connect");
    wait_for(Duration::from_secs(20), "ehr-web", || s.get(EHR_WEB)).expect("reachable");
    let dev = s.device_of("amara").expect("device");
    let t0 = Instant::now();
    s.w.admin_json(&["device", "revoke", &dev], None)
        .expect("revoke");
    let took = t0.elapsed();
    assert!(
        s.gateway_grants().is_empty(),
        "the peer is gone at the gateway when the revoke returns"
    );
    eprintln!("S7: revoke → peer removed at the gateway in {took:?}");
    assert!(s.get(EHR_WEB).is_none(), "the flow is cut");
    let exit = conn.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(!exit.success());
    assert!(
        conn.stderr_text().contains("device revoked"),
        "the client says why: {}",
        conn.stderr_text()
    );
    let err = s.connect_refused(&amara, "ehr-web").expect("refused");
    assert!(err.contains("revoked"), "{err}");
    let log = s.audit_export().expect("export");
    assert!(
        log.iter()
            .any(|e| e["action"] == "admin.device.revoke" && e["target"] == dev.as_str()),
        "the revoke is audited"
    );
}

#[test]
fn s12_gateway_restart_resyncs_before_traffic_and_cut_off_keeps_enforcing() {
    let mut s = site("1h");
    let amara = s.laptop("amara").expect("enrol");
    let (mut conn, _) = s.connect(&amara, "ehr-web").expect("connect");
    wait_for(Duration::from_secs(20), "ehr-web", || s.get(EHR_WEB)).expect("reachable");
    let grant = s.gateway_grants()[0]["grant_id"].as_u64().expect("id");

    // The gateway crashes and comes back: it resyncs the live grant and traffic passes again.
    s.kill_gateway();
    assert!(s.get(EHR_WEB).is_none(), "nothing passes while it is down");
    s.start_gateway().expect("restart");
    let ids: Vec<u64> = s
        .gateway_grants()
        .iter()
        .filter_map(|g| g["grant_id"].as_u64())
        .collect();
    assert_eq!(ids, vec![grant], "the live grant is back after the resync");
    wait_for(Duration::from_secs(40), "ehr-web after the restart", || {
        s.get(EHR_WEB)
    })
    .expect("S12: traffic passes again after the resync");

    // Restarting while the controller is down: the gateway starts with no peers (fail
    // closed) and passes nothing until it has resynced.
    s.w.stop_controller();
    s.kill_gateway();
    s.start_gateway_with(false)
        .expect("restart without controller");
    assert!(s.gateway_grants().is_empty(), "no peers before the resync");
    assert!(s.get(EHR_WEB).is_none(), "nothing passes before the resync");
    s.w.start_controller().expect("controller back");
    wait_for(Duration::from_secs(30), "the resync", || {
        (s.gateway_grants().len() == 1).then_some(())
    })
    .expect("resynced once the controller is back");
    wait_for(
        Duration::from_secs(40),
        "ehr-web after the late resync",
        || s.get(EHR_WEB),
    )
    .expect("traffic after the late resync");
    wait_for(
        Duration::from_secs(20),
        "the client to renew on reconnect",
        || {
            let st = s.w.status(&amara).ok()?;
            (st["grant"]["renewal"] == "renewed").then_some(())
        },
    )
    .expect("the client reconnects and renews with a fresh decision");
    conn.stop();

    // Cut off from the controller, the gateway keeps enforcing expiry by its own clock and
    // accepts no new peer.
    let short = serde_json::json!({"name": "clinicians-ehr", "groups": ["clinicians"], "resources": ["ehr-web"],
        "conditions": {"mfa_required": false, "max_grant": "6s", "session_lifetime": "8h"}});
    let f = s.w.dir.path().join("short.json");
    std::fs::write(&f, short.to_string()).expect("write");
    s.w.admin_json(&["policy", "put", "--file", &f.display().to_string()], None)
        .expect("short grants");
    let (mut conn, _) = s.connect(&amara, "ehr-web").expect("connect");
    wait_for(Duration::from_secs(20), "ehr-web", || s.get(EHR_WEB)).expect("reachable");
    s.w.stop_controller();
    let t0 = Instant::now();
    // The grant runs out (at most 6 s): the gateway cuts the flow with no controller around.
    wait_for(
        Duration::from_secs(20),
        "the grant to expire at the gateway",
        || s.get(EHR_WEB).is_none().then_some(()),
    )
    .expect("S12: expiry enforced while cut off");
    eprintln!(
        "S12: flow cut {:?} after the controller went away",
        t0.elapsed()
    );
    assert!(s.drops("expired") > 0 || s.gateway_grants().iter().all(|g| g["expires_in_ms"] == 0));
    let gw_grant = serde_json::json!({"grant_id": 4242, "client_public_key": "hXpPqA7Nt6sS3h7e5m1JkT0rXw9mJ8oQy3Zc2b4a5Gc=",
        "preshared_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "tunnel_addr": "100.64.0.77",
        "rules": [{"dst": "10.10.1.11/32", "proto": "tcp", "ports": "5432"}],
        "expires_at_ms": 9_999_999_999_999i64, "label": "smuggled"});
    let gf = s.w.dir.path().join("smuggled.json");
    std::fs::write(&gf, gw_grant.to_string()).expect("write");
    let r = s
        .gateway_cli(&["grant", "add", "--file", &gf.display().to_string()])
        .expect("cli");
    assert!(!r.ok, "a locally added peer must be refused");
    assert!(
        r.stderr.contains("only from its controller"),
        "{}",
        r.stderr
    );
    assert!(
        !s.gateway_grants().iter().any(|g| g["grant_id"] == 4242),
        "no new peer while cut off"
    );
    // The client kept the tunnel while dialling the controller, then stopped at the expiry
    // and says why.
    let exit = conn
        .wait_exit(Duration::from_secs(30))
        .expect("connect ends");
    assert!(!exit.success());
    assert!(
        conn.stderr_text()
            .contains("the controller was unreachable and the grant expired"),
        "the client says why: {}",
        conn.stderr_text()
    );
}

/// Milliseconds since the epoch of an RFC 3339 instant (test input, always valid).
fn at_ms(s: &str) -> i64 {
    s.parse::<jiff::Timestamp>()
        .expect("instant")
        .as_millisecond()
}

#[test]
fn s4_vendor_window_ends_on_time() {
    // Every process runs on a test clock: it is Tuesday 1 December 2026, 13:50 in Berlin
    // (CET, UTC+1). The schedule is "Tuesdays 14:00–16:00 Europe/Berlin".
    let mut s = NetSite::start_at("1h", "tun", Some(at_ms("2026-12-01T12:50:00Z"))).expect("site");
    let w = &s.w;
    for u in ["kim", "globex-eng"] {
        w.create_user(u, wardgate::netsite::PASSWORD).expect("user");
    }
    w.admin_json(&["group", "create", "mri-approvers"], None)
        .expect("group");
    w.admin_json(&["group", "add-member", "mri-approvers", "kim"], None)
        .expect("kim approves");
    w.admin_json(&["group", "add-member", "vendor-acme", "globex-eng"], None)
        .expect("member");
    for (vendor, contract, end, member) in [
        ("acme", "ACME-BAA-7", "2027-06-30", "acme-eng"),
        ("globex", "GLOBEX-9", "2026-11-30", "globex-eng"),
    ] {
        w.admin_json(
            &[
                "vendor",
                "create",
                vendor,
                "--sponsor",
                "amara",
                "--contract-ref",
                contract,
                "--contract-end",
                end,
                "--contract-zone",
                "Europe/Berlin",
            ],
            None,
        )
        .expect("vendor");
        w.admin_json(&["vendor", "add-member", vendor, member], None)
            .expect("vendor member");
    }
    s.put_policy_json(serde_json::json!({
        "name": "acme-mri", "groups": ["vendor-acme"], "resources": ["mri-console"],
        "conditions": {"mfa_required": false, "max_grant": "4h", "session_lifetime": "8h",
            "windows": [{"days": ["tue"], "start": "14:00", "end": "16:00", "time_zone": "Europe/Berlin"}],
            "approval": {"approvers": "mri-approvers", "max_window": "4h"}}}))
    .expect("policy");
    w.admin_json(
        &[
            "settings",
            "set",
            "--session-idle-timeout",
            "8h",
            "--request-notice",
            "10s",
        ],
        None,
    )
    .expect("settings");
    let acme = s.laptop("acme-eng").expect("enrol");
    let globex = s.laptop("globex-eng").expect("enrol");

    // Without a request: refused, in words.
    let refused = s.connect_refused(&acme, "mri-console").expect("refused");
    assert!(
        refused.contains("mri-console needs an approved access request"),
        "{refused}"
    );

    // acme-eng asks for Tuesday 14:00–16:00 Berlin time, ticket INC-4411.
    let r = s
        .laptop_cmd(
            &acme,
            &[
                "request",
                "mri-console",
                "--from",
                "2026-12-01T14:00[Europe/Berlin]",
                "--until",
                "2026-12-01T16:00[Europe/Berlin]",
                "--reason",
                "replace the gradient coil firmware",
                "--ticket",
                "INC-4411",
                "--json",
            ],
        )
        .expect("request ran");
    assert!(r.ok, "request: {}", r.stderr);
    let req: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    let id = req["id"].as_i64().expect("id").to_string();
    assert_eq!(req["state"], "pending");
    assert_eq!(req["from_ms"], at_ms("2026-12-01T13:00:00Z"));
    assert_eq!(req["until_ms"], at_ms("2026-12-01T15:00:00Z"));

    // A vendor whose contract ended the day before cannot even ask.
    let late = s
        .laptop_cmd(
            &globex,
            &[
                "request",
                "mri-console",
                "--for",
                "1h",
                "--reason",
                "service visit",
            ],
        )
        .expect("ran");
    assert!(!late.ok);
    assert!(
        late.stderr
            .contains("vendor contract GLOBEX-9 (globex) ended on 2026-11-30"),
        "{}",
        late.stderr
    );

    // Approving one's own request, or as someone outside mri-approvers, is refused.
    let own = w
        .admin(&["request", "approve", &id, "--approver", "acme-eng"], None)
        .expect("ran");
    assert!(!own.ok);
    assert!(
        own.stderr
            .contains(&format!("acme-eng cannot approve their own request {id}")),
        "{}",
        own.stderr
    );
    let outsider = w
        .admin(&["request", "approve", &id, "--approver", "pat"], None)
        .expect("ran");
    assert!(!outsider.ok);
    assert!(
        outsider
            .stderr
            .contains("pat is not in mri-approvers, the group that approves mri-console requests"),
        "{}",
        outsider.stderr
    );
    let no_person = w.admin(&["request", "approve", &id], None).expect("ran");
    assert!(!no_person.ok);
    assert!(
        no_person.stderr.contains("--approver"),
        "{}",
        no_person.stderr
    );

    // kim approves.
    let ok = w
        .admin_json(
            &[
                "request",
                "approve",
                &id,
                "--approver",
                "kim",
                "--comment",
                "INC-4411 ok",
            ],
            None,
        )
        .expect("kim approves");
    assert_eq!(ok["state"], "approved");
    assert_eq!(ok["approver"], "kim");
    let st = w.status(&acme).expect("status");
    assert_eq!(st["requests"][0]["state"], "approved", "{st}");
    assert_eq!(st["requests"][0]["approver"], "kim", "{st}");

    // Before 14:00 nothing passes, and acme-eng is told when it will.
    let before = s.connect_refused(&acme, "mri-console").expect("refused");
    assert!(
        before.contains("Your approved window starts at Tue 1 Dec 2026 14:00 CET"),
        "{before}"
    );
    assert!(!s.answers(MRI_VNC), "nothing passes before 14:00");

    // From 14:00: only tcp/5900 and tcp/22 on 10.20.5.5, until 16:00 at most.
    w.set_clock(at_ms("2026-12-01T13:00:05Z")).expect("clock");
    let (mut conn, _) = s.connect(&acme, "mri-console").expect("connect at 14:00");
    let st = w.status(&acme).expect("status");
    assert_eq!(
        st["grant"]["expires_at_ms"],
        at_ms("2026-12-01T15:00:00Z"),
        "{st}"
    );
    assert!(
        wait_for(Duration::from_secs(10), "VNC", || s
            .answers(MRI_VNC)
            .then_some(()))
        .is_ok(),
        "tcp/5900 passes inside the window"
    );
    assert!(s.answers(MRI_SSH), "tcp/22 passes inside the window");
    for other in [MRI_OTHER, "10.20.5.5:80", EHR_DB, EHR_WEB] {
        assert!(!s.answers(other), "{other} must not answer acme-eng");
    }
    conn.stop();

    // 15:59:45: connect again; the grant ends at 16:00, the notice comes 10 s before, the
    // controller dies at 15:59:5x — and at 16:00 the gateway stops the traffic by itself.
    w.set_clock(at_ms("2026-12-01T14:59:45Z")).expect("clock");
    let (mut conn, _) = s
        .connect(&acme, "mri-console")
        .expect("connect at 15:59:45");
    let end = at_ms("2026-12-01T15:00:00Z");
    assert!(s.answers(MRI_VNC), "still inside the window");
    let notice = wait_for(Duration::from_secs(15), "the end notice", || {
        let st = s.w.status(&acme).ok()?;
        st["grant"]["ending"].as_str().map(str::to_owned)
    })
    .expect("S4: a notice before the end");
    assert!(notice.contains("ends at"), "{notice}");
    s.w.kill_controller();
    let left = end - wardgate_common::clock::now_ms_of(s.w.test_clock.as_deref().expect("clock"));
    assert!(
        left > 1_000,
        "the controller died before the end ({left} ms left)"
    );
    assert!(
        s.answers(MRI_VNC),
        "the controller being down ends nothing early"
    );
    std::thread::sleep(Duration::from_millis(
        u64::try_from(left).unwrap_or(0) + 1_000,
    ));
    assert!(
        !s.answers(MRI_VNC),
        "S4: at 16:00 tcp/5900 stops, controller down"
    );
    assert!(
        !s.answers(MRI_SSH),
        "S4: at 16:00 tcp/22 stops, controller down"
    );
    conn.stop();

    // Every refusal is in the audit log with its reason.
    let log = s.audit_export().expect("audit");
    let refusals: Vec<(String, String)> = log
        .iter()
        .filter(|e| e["outcome"] == "deny")
        .filter(|e| e["action"] == "request.approve" || e["action"] == "request.create")
        .map(|e| {
            (
                e["detail"]["code"].as_str().unwrap_or("").to_owned(),
                e["detail"]["refusal"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    for code in [
        "self_approval",
        "not_approver",
        "approver_required",
        "contract_ended",
    ] {
        assert!(
            refusals
                .iter()
                .any(|(c, words)| c == code && !words.is_empty()),
            "{code} audited with words: {refusals:?}"
        );
    }
    let approved = events(&log, "request.approve")
        .into_iter()
        .find(|e| e["outcome"] == "ok")
        .expect("approval audited");
    assert_eq!(approved["detail"]["approver"], "kim");
    assert!(
        approved["actor"]
            .as_str()
            .unwrap_or("")
            .starts_with("admin:")
    );
    assert!(
        !events(&log, "request.notice").is_empty(),
        "the notice is audited"
    );
}
