//! Access end to end with the real binaries on loopback, in the no-root userspace modes: the
//! controller decides, pushes the per-grant peer to the gateway and waits for its ack; the
//! client reaches the resource through the tunnel; denials carry every reason; revocation
//! ends the grant at the gateway and tells the client why. The resource is published as
//! 10.10.1.10:443 and the gateway dials it on loopback (`--map`), so nothing leaves the host.

use std::path::Path;
use std::time::Duration;

use wardgate::demo::Site;
use wardgate::harness::{Proc, bin, free_port, wait_for};

/// The shared site (the demo's): controller, gateway, sample EHR, policies, amara enrolled.
fn site() -> Site {
    wardgate::demo::site("1h").expect("site")
}

fn connect(s: &Site, cfg: &Path, resource: &str, local: u16) -> Proc {
    let mut cmd = s.w.client_cmd(cfg).expect("cmd");
    cmd.args([
        "--json",
        "connect",
        resource,
        "--mode",
        "userspace",
        "--forward",
        &local.to_string(),
    ]);
    Proc::spawn(cmd, &s.w.logs, &format!("connect-{resource}-{local}")).expect("connect")
}

fn gateway_grants(s: &Site) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(bin("wardgate-gateway").expect("bin"))
        .args(["stats", "--socket"])
        .arg(&s.socket)
        .output()
        .expect("stats");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["grants"].as_array().cloned().unwrap_or_default()
}

#[test]
fn s1_s2_s7_connect_deny_and_stolen_laptop() {
    let s = site();
    let cfg = s.client.clone();

    // S1: amara reaches ehr-web through her grant.
    let local = free_port();
    let mut conn = connect(&s, &cfg, "ehr-web", local);
    let body = wait_for(
        Duration::from_secs(20),
        "ehr-web through the tunnel",
        || {
            let out = std::process::Command::new(bin("wardgate-bench").ok()?)
                .args([
                    "node",
                    "get",
                    "--to",
                    &format!("127.0.0.1:{local}"),
                    "--timeout",
                    "3s",
                ])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        },
    )
    .expect("S1: amara reaches ehr-web");
    assert!(body.contains("wardgate-test-ok"), "{body}");
    let grants = gateway_grants(&s);
    assert_eq!(
        grants.len(),
        1,
        "exactly one peer at the gateway: {grants:?}"
    );
    assert!(
        grants[0]["label"].as_str().unwrap_or("").contains("amara"),
        "{grants:?}"
    );
    let st = s.w.status(&cfg).expect("status");
    assert_eq!(st["grant"]["resource"], "ehr-web", "{st}");

    // S2: amara asks for ehr-db: denied, with the reason in words, and audited.
    let mut cmd = s.w.client_cmd(&cfg).expect("cmd");
    cmd.args([
        "connect",
        "ehr-db",
        "--mode",
        "userspace",
        "--forward",
        &free_port().to_string(),
    ]);
    let r = wardgate::harness::run(cmd, None, &s.w.logs.join("deny.err")).expect("run");
    assert!(!r.ok);
    assert!(r.stderr.contains("access to ehr-db denied"), "{}", r.stderr);
    assert!(
        r.stderr.contains("dba"),
        "the reason names the group: {}",
        r.stderr
    );
    let st = s.w.status(&cfg).expect("status");
    assert_eq!(st["last_denial"]["resource"], "ehr-db", "{st}");
    let dry =
        s.w.admin_json(
            &["dry-run", "--user", "amara", "--resource", "ehr-db"],
            None,
        )
        .expect("dry");
    assert_eq!(dry["allowed"], false, "{dry}");
    assert_eq!(gateway_grants(&s).len(), 1, "a denial installs nothing");

    // S7: the laptop is stolen; pat revokes the device. The grant ends at the gateway, the
    // client is told why, and the device can no longer connect.
    let dev = s.w.admin_json(&["device", "list"], None).expect("devices")[0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let t0 = std::time::Instant::now();
    s.w.admin_json(&["device", "revoke", &dev], None)
        .expect("revoke");
    assert!(
        gateway_grants(&s).is_empty(),
        "the gateway dropped the peer when the revoke returned"
    );
    eprintln!(
        "S7: revoke to peer removed at the gateway in {:?}",
        t0.elapsed()
    );
    let exit = conn
        .wait_exit(Duration::from_secs(20))
        .expect("connect exits");
    assert!(!exit.success());
    let err = conn.stderr_text();
    assert!(err.contains("device revoked"), "the client says why: {err}");
    let mut cmd = s.w.client_cmd(&cfg).expect("cmd");
    cmd.args([
        "connect",
        "ehr-web",
        "--mode",
        "userspace",
        "--forward",
        &free_port().to_string(),
    ]);
    let r = wardgate::harness::run(cmd, None, &s.w.logs.join("again.err")).expect("run");
    assert!(!r.ok && r.stderr.contains("revoked"), "{}", r.stderr);
}

#[test]
fn policy_change_and_user_disable_end_grants_and_say_why() {
    let s = site();
    let cfg = s.client.clone();
    let local = free_port();
    let mut conn = connect(&s, &cfg, "ehr-web", local);
    wait_for(Duration::from_secs(20), "the grant at the gateway", || {
        (gateway_grants(&s).len() == 1).then_some(())
    })
    .expect("granted");
    // amara leaves the clinicians group: the policy no longer allows her grant.
    s.w.admin_json(&["group", "remove-member", "clinicians", "amara"], None)
        .expect("remove member");
    let exit = conn
        .wait_exit(Duration::from_secs(20))
        .expect("connect exits");
    assert!(!exit.success());
    assert!(
        conn.stderr_text().contains("no longer allowed"),
        "{}",
        conn.stderr_text()
    );
    assert!(gateway_grants(&s).is_empty());

    // Back in the group, connected again; then the account is disabled (S8).
    s.w.admin_json(&["group", "add-member", "clinicians", "amara"], None)
        .expect("add back");
    let mut conn = connect(&s, &cfg, "ehr-web", free_port());
    wait_for(Duration::from_secs(20), "the new grant", || {
        (gateway_grants(&s).len() == 1).then_some(())
    })
    .expect("granted again");
    s.w.admin_json(&["user", "disable", "amara"], None)
        .expect("disable");
    assert!(
        gateway_grants(&s).is_empty(),
        "disabling ends the grant at the gateway"
    );
    let exit = conn.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(!exit.success());
    let mut cmd = s.w.client_cmd(&cfg).expect("cmd");
    cmd.args([
        "connect",
        "ehr-web",
        "--mode",
        "userspace",
        "--forward",
        &free_port().to_string(),
    ]);
    let r = wardgate::harness::run(cmd, None, &s.w.logs.join("disabled.err")).expect("run");
    assert!(!r.ok && r.stderr.contains("disabled"), "{}", r.stderr);
}

fn audit_cmd(s: &Site, args: &[&str]) -> wardgate::harness::Ran {
    let mut cmd = std::process::Command::new(bin("wardgate-controller").expect("bin"));
    cmd.arg("--data-dir")
        .arg(&s.w.data_dir)
        .arg("audit")
        .args(args);
    wardgate::harness::run(cmd, None, &s.w.logs.join("audit.err")).expect("audit")
}

#[test]
fn s9_auditor_exports_and_verifies_and_an_edited_row_is_named() {
    let s = site();
    let cfg = s.client.clone();
    let mut cmd = s.w.client_cmd(&cfg).expect("cmd");
    cmd.args([
        "connect",
        "ehr-db",
        "--mode",
        "userspace",
        "--forward",
        &free_port().to_string(),
    ]);
    let r = wardgate::harness::run(cmd, None, &s.w.logs.join("deny.err")).expect("run");
    assert!(!r.ok);

    let v = audit_cmd(&s, &["verify"]);
    assert!(
        v.ok && v.stdout.contains("intact"),
        "{} {}",
        v.stdout,
        v.stderr
    );
    let yesterday = humantime_yesterday();
    let out = audit_cmd(&s, &["export", "--since", &yesterday]);
    assert!(out.ok, "{}", out.stderr);
    let lines: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    assert!(lines.len() > 10, "{} events", lines.len());
    for l in &lines {
        for k in ["seq", "at", "actor", "action", "outcome", "hash"] {
            assert!(!l[k].is_null(), "missing {k} in {l}");
        }
    }
    let deny = lines
        .iter()
        .find(|l| l["action"] == "access.decide" && l["outcome"] == "deny")
        .expect("the denial is in the log");
    assert_eq!(deny["actor"], "user:amara");
    assert!(
        deny["detail"]["reasons"].to_string().contains("dba"),
        "{deny}"
    );
    assert!(
        !deny["detail"]["facts"].is_null(),
        "the facts used are recorded: {deny}"
    );

    // Someone edits one row in the database.
    let db = s.w.data_dir.join("wardgate.db");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .expect("db");
        sqlx::query("UPDATE audit_log SET detail = '{\"innocent\":true}' WHERE seq = 7")
            .execute(&mut c)
            .await
            .expect("tamper");
    });
    let v = audit_cmd(&s, &["verify"]);
    assert!(!v.ok, "verify must fail after tampering");
    assert!(
        v.stderr.contains("row 7"),
        "names the first broken row: {}",
        v.stderr
    );
}

fn humantime_yesterday() -> String {
    let t = std::time::SystemTime::now() - Duration::from_secs(86_400);
    // RFC 3339 seconds, UTC.
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!("{y:04}-{m:02}-{d:02}T00:00:00Z")
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Asks for grants as fast as it can, 8 in flight over one device session, until a request
/// fails (the controller was killed) or `stop` fires; returns how many were granted.
fn grant_storm(
    s: &Site,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::thread::JoinHandle<usize> {
    use wardgate_common::proto::{Request, Response};
    let cfg_dir = s.client.clone();
    let controller = s.w.quic.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("rt");
        rt.block_on(async move {
            let dir = wardgate_client::state::ConfigDir::resolve(Some(cfg_dir)).expect("dir");
            let cfg = wardgate_client::enrol::client_config(&dir).expect("cfg");
            let client =
                match wardgate_common::transport::ControlClient::connect(&controller, cfg, "storm")
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("storm: cannot connect: {e}");
                        return 0;
                    }
                };
            let session = std::sync::Arc::new(client.into_session());
            let mut set = tokio::task::JoinSet::new();
            let mut granted = 0;
            let mut failed = false;
            loop {
                while set.len() < 8 && !failed {
                    let s = session.clone();
                    set.spawn(async move {
                        let key = wardgate_common::keys::generate_private();
                        s.request(Request::Connect {
                            resource: "ehr-web".into(),
                            wg_public_key: wardgate_common::keys::public_of(&key),
                            renews: None,
                        })
                        .await
                    });
                }
                let next = tokio::select! {
                    n = set.join_next() => n,
                    _ = stop.changed() => return granted,
                };
                match next {
                    Some(Ok(Ok(Response::Granted(_)))) => granted += 1,
                    Some(other) => {
                        if !failed {
                            eprintln!("storm: stopped by {other:?}");
                        }
                        failed = true;
                    }
                    None => return granted,
                }
            }
        })
    })
}

/// Grant ids (wire form), the live ones among them, and the targets of `grant.issue` events,
/// read straight from the controller's SQLite file.
fn store_view(s: &Site) -> (Vec<u64>, Vec<u64>, Vec<String>) {
    let db = s.w.data_dir.join("wardgate.db");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        use sqlx::{Connection, Row};
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .expect("db");
        let now = wardgate_common::unix_ms(std::time::SystemTime::now());
        let rows = sqlx::query("SELECT id, status, expires_ms FROM grants")
            .fetch_all(&mut c)
            .await
            .expect("grants");
        let all: Vec<u64> = rows
            .iter()
            .map(|r| r.get::<i64, _>("id").unsigned_abs())
            .collect();
        let live: Vec<u64> = rows
            .iter()
            .filter(|r| {
                r.get::<String, _>("status") == "active" && r.get::<i64, _>("expires_ms") > now
            })
            .map(|r| r.get::<i64, _>("id").unsigned_abs())
            .collect();
        let issued: Vec<String> =
            sqlx::query_scalar("SELECT target FROM audit_log WHERE action = 'grant.issue'")
                .fetch_all(&mut c)
                .await
                .expect("audit");
        (all, live, issued)
    })
}

fn peer_ids(s: &Site) -> Vec<u64> {
    let mut ids: Vec<u64> = gateway_grants(s)
        .iter()
        .filter_map(|g| g["grant_id"].as_u64())
        .collect();
    ids.sort_unstable();
    ids
}

#[test]
fn killing_the_controller_during_issuance_leaves_no_orphan_peer_and_no_unaudited_grant() {
    let mut s = site();
    let mut total = 0;
    for round in 1..=4usize {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let before = peer_ids(&s).len();
        let storm = grant_storm(&s, stopped);
        // Kill once issuance is in full swing: a different number of grants each round, so the
        // kill lands at different points of the issue path (decide, commit, push, ack).
        let t = std::time::Instant::now();
        wait_for(Duration::from_secs(30), "grants to flow", || {
            (peer_ids(&s).len() >= before + 5 * round).then_some(())
        })
        .expect("issuance running");
        eprintln!("round {round}: flowing after {:?}", t.elapsed());
        if let Some(c) = s.w.controller.as_mut() {
            c.kill();
        }
        s.w.controller = None;
        let _ = stop.send(true);
        total += storm.join().expect("storm");

        let peers = peer_ids(&s);
        let (grants, _, issued) = store_view(&s);
        for p in &peers {
            assert!(
                grants.contains(p),
                "round {round}: peer {p} is at the gateway but its grant is not in the store"
            );
        }
        for g in &grants {
            assert!(
                issued.contains(&g.to_string()),
                "round {round}: grant {g} has no grant.issue audit row"
            );
        }
        let v = s.w.audit(&["verify"]).expect("verify");
        assert!(
            v.ok,
            "round {round}: the chain survives the kill: {}",
            v.stderr
        );

        // Back up: the gateway resyncs to exactly the store's live grants.
        let resyncs = || {
            std::fs::read_to_string(&s.gateway.stderr)
                .map_or(0, |l| l.matches("grants resynced").count())
        };
        let before = resyncs();
        let t = std::time::Instant::now();
        s.w.start_controller().expect("restart");
        wait_for(Duration::from_secs(30), "the gateway to reconnect", || {
            (resyncs() > before).then_some(())
        })
        .expect("the gateway reconnects at once (stateless reset), not after the idle timeout");
        wait_for(Duration::from_secs(30), "the gateway to resync", || {
            let (_, mut live, _) = store_view(&s);
            live.sort_unstable();
            (peer_ids(&s) == live).then_some(())
        })
        .expect("after the restart the gateway holds exactly the live grants");
        eprintln!("round {round}: resynced after {:?}", t.elapsed());
    }
    eprintln!("{total} grants issued across 4 kills");
}
