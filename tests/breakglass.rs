//! Issue 7 end to end with the real binaries on loopback (the demo site, userspace modes):
//! break-glass (S6) with its refusals, alert and review queue; webhook delivery that survives
//! a receiver being down without delaying decisions; and the WireGuard export whose peer the
//! gateway drops at its end.
//!
//! The webhook receiver is a small HTTP server in the test process; it checks signatures with
//! its own HMAC-SHA256 (built from `sha2`), not with the controller's code.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use wardgate::demo::Site;
use wardgate::harness::{Proc, Ran, World, bin, free_port, run, wait_for};
use wardgate_controller::totp;

const PASSWORD: &str = "correct horse battery staple";
const SECRET: &str = "s3cret-webhook-key-for-tests";

fn unix_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// HMAC-SHA256 (RFC 2104), independent of the controller's implementation.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&ipad)
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize()
        .to_vec()
}

/// One POST the receiver got.
#[derive(Debug, Clone)]
struct Delivery {
    headers: Vec<(String, String)>,
    body: String,
}

impl Delivery {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the signature is valid for `SECRET` and the timestamp is fresh.
    fn signed(&self) -> bool {
        let (Some(ts), Some(sig)) = (
            self.header("x-wardgate-timestamp"),
            self.header("x-wardgate-signature"),
        ) else {
            return false;
        };
        let Ok(t) = ts.parse::<i64>() else {
            return false;
        };
        let mac = hmac_sha256(SECRET.as_bytes(), format!("{ts}.{}", self.body).as_bytes());
        (unix_s() - t).abs() < 300 && sig == format!("sha256={}", hex::encode(mac))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }
}

/// A local webhook receiver: answers 200 to every POST and keeps what it got. `stop` closes
/// the port (the controller then sees "connection refused").
struct Receiver {
    got: Arc<Mutex<Vec<Delivery>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start(port: u16, got: Arc<Mutex<Vec<Delivery>>>) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind receiver");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                        if let Some(d) = read_request(&mut conn) {
                            let _ = conn.write_all(
                                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                            );
                            if let Ok(mut v) = g.lock() {
                                v.push(d);
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Receiver {
            got,
            stop,
            thread: Some(thread),
        }
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_request(conn: &mut std::net::TcpStream) -> Option<Delivery> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Delivery {
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn code(secret: &str) -> String {
    let key = totp::decode_secret(secret).expect("base32 secret");
    totp::code_at(&key, unix_s())
}

fn audit_rows(w: &World) -> Vec<serde_json::Value> {
    let r = w.audit(&["export"]).expect("export");
    assert!(r.ok, "{}", r.stderr);
    r.stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn has_code(rows: &[serde_json::Value], action: &str, outcome: &str, code: &str) -> bool {
    rows.iter().any(|e| {
        e["action"] == action
            && e["outcome"] == outcome
            && e["detail"]["codes"]
                .as_array()
                .is_some_and(|c| c.iter().any(|x| x == code))
    })
}

fn write_json(dir: &Path, name: &str, v: serde_json::Value) -> String {
    let p = dir.join(name);
    std::fs::write(&p, v.to_string()).expect("write");
    p.display().to_string()
}

fn add_webhook(w: &World, port: u16) -> String {
    let f = w.dir.path().join("webhook-secret");
    std::fs::write(&f, SECRET).expect("secret");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let v = w
        .admin_json(
            &[
                "webhook",
                "add",
                "--url",
                &format!("http://127.0.0.1:{port}/wardgate"),
                "--secret-file",
                &f.display().to_string(),
            ],
            None,
        )
        .expect("webhook add");
    let list = w.admin(&["--json", "webhook", "list"], None).expect("list");
    assert!(
        list.ok && !list.stdout.contains(SECRET),
        "the secret never comes back: {}",
        list.stdout
    );
    v["id"].as_str().expect("id").to_owned()
}

fn get_through(local: u16) -> Option<String> {
    let out = std::process::Command::new(bin("wardgate-bench").ok()?)
        .args([
            "node",
            "get",
            "--to",
            &format!("127.0.0.1:{local}"),
            "--timeout",
            "2s",
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn break_glass_once(s: &Site, cfg: &Path, reason: &str) -> Ran {
    let mut cmd = s.w.client_cmd(cfg).expect("cmd");
    cmd.args([
        "break-glass",
        "pacs",
        "--reason",
        reason,
        "--mode",
        "userspace",
        "--forward",
        &free_port().to_string(),
    ]);
    run(cmd, None, &s.w.logs.join("bg-refused.err")).expect("run")
}

/// The S6 site: pacs (emergency) and the ED's break-glass policy (30 min cap; the policy's
/// window is never open at test time, which break-glass skips), ben in `emergency`.
fn s6_site() -> Site {
    let s = wardgate::demo::site("1h").expect("site");
    let d = s.w.dir.path().to_path_buf();
    s.w.create_user("ben", PASSWORD).expect("ben");
    s.w.admin_json(&["group", "create", "emergency"], None)
        .expect("group");
    s.w.admin_json(&["group", "add-member", "emergency", "ben"], None)
        .expect("member");
    let f = write_json(
        &d,
        "pacs.json",
        serde_json::json!({"name": "pacs", "addresses": ["10.10.2.20/32"],
            "rules": [{"dst": "10.10.2.20/32", "proto": "tcp", "ports": "443"}],
            "gateways": ["gw-ehr"], "labels": ["phi"], "emergency": true}),
    );
    s.w.admin_json(&["resource", "put", "--file", &f], None)
        .expect("pacs");
    // A break-glass policy on a resource that is not an emergency one is refused in words.
    let f = write_json(
        &d,
        "bad.json",
        serde_json::json!({"name": "bad-bg", "groups": ["emergency"], "resources": ["ehr-web"],
            "conditions": {"max_grant": "1h", "session_lifetime": "12h", "break_glass": {"cap": "30m"}}}),
    );
    let r =
        s.w.admin(&["policy", "put", "--file", &f], None)
            .expect("run");
    assert!(
        !r.ok && r.stderr.contains("not marked for emergencies"),
        "{}",
        r.stderr
    );
    // Sunday 03:00–03:01 UTC only: closed whenever this runs (but for one minute a week).
    let f = write_json(
        &d,
        "ed-bg.json",
        serde_json::json!({"name": "ed-break-glass", "groups": ["emergency"], "resources": ["pacs"],
            "conditions": {"mfa_required": true, "max_grant": "8h", "session_lifetime": "12h",
                "windows": [{"days": ["sun"], "start": "03:00", "end": "03:01", "time_zone": "UTC"}],
                "break_glass": {"cap": "30m"}}}),
    );
    s.w.admin_json(&["policy", "put", "--file", &f], None)
        .expect("policy");
    s
}

#[test]
fn s6_break_glass_for_pacs_alerts_and_queues_for_review() {
    let s = s6_site();
    let w = &s.w;
    let port = free_port();
    let receiver = Receiver::start(port, Arc::new(Mutex::new(Vec::new())));
    add_webhook(w, port);

    // ben's ED workstation, enrolled with a password only: no MFA yet.
    let cfg = w.dir.path().join("ben-ed");
    let r = w.enrol(&cfg, "ben", PASSWORD, "0s").expect("enrol");
    assert!(r.ok, "{}", r.stderr);

    // Without MFA: refused, in words, and audited.
    let r = break_glass_once(&s, &cfg, "stroke code, CT review");
    assert!(!r.ok);
    assert!(
        r.stderr.contains("access to pacs denied") && r.stderr.contains("multi-factor"),
        "{}",
        r.stderr
    );
    // The ordinary connect is refused too (outside the window): break-glass is the way in.
    let mut cmd = w.client_cmd(&cfg).expect("cmd");
    cmd.args(["connect", "pacs", "--forward", &free_port().to_string()]);
    let r = run(cmd, None, &w.logs.join("connect.err")).expect("run");
    assert!(
        !r.ok && r.stderr.contains("Outside the access window"),
        "{}",
        r.stderr
    );

    // ben signs in with his one-time code.
    let secret = w
        .admin_json(&["user", "totp-enrol", "ben"], None)
        .expect("totp")["secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    let mut cmd = w.client_cmd(&cfg).expect("cmd");
    cmd.args(["login", "--password-stdin"]);
    let r = run(
        cmd,
        Some(&format!("{PASSWORD}\n{}\n", code(&secret))),
        &w.logs.join("login.err"),
    )
    .expect("login");
    assert!(r.ok, "{}", r.stderr);

    // Without a reason (missing, or blank): refused, in words, and audited.
    for reason in ["", "   "] {
        let r = break_glass_once(&s, &cfg, reason);
        assert!(!r.ok);
        assert!(r.stderr.contains("needs a reason"), "{}", r.stderr);
    }
    let rows = audit_rows(w);
    assert!(has_code(
        &rows,
        "access.break_glass",
        "deny",
        "break_glass_mfa_required"
    ));
    assert!(has_code(
        &rows,
        "access.break_glass",
        "deny",
        "reason_required"
    ));
    assert!(
        receiver
            .deliveries()
            .iter()
            .all(|d| d.json()["type"] != "break_glass"),
        "refusals alert nobody"
    );

    // With both: access within seconds.
    let local = free_port();
    let mut cmd = w.client_cmd(&cfg).expect("cmd");
    cmd.args([
        "break-glass",
        "pacs",
        "--reason",
        "stroke code, CT review",
        "--mode",
        "userspace",
        "--forward",
        &local.to_string(),
    ]);
    let t0 = Instant::now();
    let mut conn = Proc::spawn(cmd, &w.logs, "break-glass").expect("spawn");
    let body = wait_for(Duration::from_secs(20), "pacs through the tunnel", || {
        get_through(local)
    })
    .expect("ben reaches pacs");
    let took = t0.elapsed();
    eprintln!("S6: break-glass to the first byte from PACS in {took:?}");
    assert!(body.contains("wardgate-test-ok"), "{body}");
    assert!(took < Duration::from_secs(20));

    // At most 30 minutes.
    let grants = w.admin_json(&["grant", "list"], None).expect("grants");
    let g = grants
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["resource"] == "pacs"))
        .expect("pacs grant")
        .clone();
    let life = g["expires_ms"].as_i64().expect("exp") - g["issued_ms"].as_i64().expect("iss");
    assert!(life <= 30 * 60 * 1000 && life > 29 * 60 * 1000, "{life} ms");
    let out = std::fs::read_to_string(&conn.stdout).unwrap_or_default();
    assert!(
        out.contains("BREAK-GLASS access to pacs") && out.contains("at most 30 min"),
        "{out}"
    );

    // Security is alerted: a signed break_glass event reaches the receiver.
    let alert = wait_for(Duration::from_secs(15), "the break-glass alert", || {
        receiver
            .deliveries()
            .into_iter()
            .find(|d| d.json()["type"] == "break_glass")
    })
    .expect("alert delivered");
    assert!(
        alert.signed(),
        "valid HMAC over timestamp and body: {alert:?}"
    );
    let ev = alert.json();
    assert_eq!(ev["subject"], "pacs");
    assert_eq!(ev["actor"], "user:ben");
    assert_eq!(ev["detail"]["reason"], "stroke code, CT review");
    assert_eq!(ev["detail"]["cap"], "30m");
    assert_eq!(alert.header("x-wardgate-event"), ev["id"].as_str());
    eprintln!(
        "S6: alert received after {:?}: {}",
        t0.elapsed(),
        alert.body
    );

    // The audit marks it for review, and the review queue holds it, unreviewed.
    let rows = audit_rows(w);
    let allow = rows
        .iter()
        .find(|e| e["action"] == "access.break_glass" && e["outcome"] == "allow")
        .expect("allow row");
    assert_eq!(allow["detail"]["review_required"], true);
    assert_eq!(allow["detail"]["reason"], "stroke code, CT review");
    let queue = w
        .admin_json(&["break-glass", "list", "--unreviewed"], None)
        .expect("queue");
    let q = queue.as_array().expect("list");
    assert_eq!(q.len(), 1, "{queue}");
    let id = q[0]["id"].as_str().expect("id").to_owned();
    assert_eq!(allow["detail"]["review"], id.as_str());
    assert_eq!(q[0]["user"], "ben");
    assert_eq!(q[0]["reason"], "stroke code, CT review");
    assert_eq!(q[0]["overdue"], false);
    assert_eq!(q[0]["grant_id"], g["id"]);
    let overdue = w
        .admin_json(&["break-glass", "list", "--overdue"], None)
        .expect("overdue");
    assert_eq!(overdue.as_array().map(Vec::len), Some(0), "{overdue}");

    // Unreviewed for longer than the (shortened) overdue setting: listed as overdue.
    w.admin_json(&["settings", "set", "--break-glass-overdue", "1s"], None)
        .expect("setting");
    std::thread::sleep(Duration::from_millis(1500));
    let overdue = w
        .admin_json(&["break-glass", "list", "--overdue"], None)
        .expect("overdue");
    assert_eq!(overdue[0]["id"], id.as_str(), "{overdue}");
    assert_eq!(overdue[0]["overdue"], true);
    let text = w.admin(&["break-glass", "list"], None).expect("text");
    assert!(text.stdout.contains("OVERDUE"), "{}", text.stdout);

    // Closing it needs a comment; then it is closed, audited, and cannot be closed twice.
    let r = w
        .admin(&["break-glass", "review", &id, "--comment", "  "], None)
        .expect("run");
    assert!(
        !r.ok && r.stderr.contains("needs a comment"),
        "{}",
        r.stderr
    );
    w.admin_json(
        &[
            "break-glass",
            "review",
            &id,
            "--comment",
            "stroke protocol confirmed with the ED log",
        ],
        None,
    )
    .expect("review");
    let queue = w
        .admin_json(&["break-glass", "list", "--unreviewed"], None)
        .expect("queue");
    assert_eq!(queue.as_array().map(Vec::len), Some(0), "{queue}");
    let all = w.admin_json(&["break-glass", "list"], None).expect("all");
    assert_eq!(
        all[0]["comment"],
        "stroke protocol confirmed with the ED log"
    );
    assert!(
        all[0]["reviewed_by"]
            .as_str()
            .is_some_and(|a| a.starts_with("admin:"))
    );
    let r = w
        .admin(&["break-glass", "review", &id, "--comment", "again"], None)
        .expect("run");
    assert!(
        !r.ok && r.stderr.contains("already reviewed"),
        "{}",
        r.stderr
    );
    let rows = audit_rows(w);
    assert!(rows.iter().any(|e| e["action"] == "break_glass.review"
        && e["target"] == id.as_str()
        && e["detail"]["comment"] == "stroke protocol confirmed with the ED log"));
    conn.stop();

    // Access requests and their decisions reach the same sinks (issue 7, item 5): ben asks
    // for ehr-db under an approval policy, kim approves, then revokes it.
    w.create_user("kim", PASSWORD).expect("kim");
    w.admin_json(&["group", "create", "db-approvers"], None)
        .expect("group");
    w.admin_json(&["group", "add-member", "db-approvers", "kim"], None)
        .expect("member");
    let f = write_json(
        w.dir.path(),
        "db-req.json",
        serde_json::json!({"name": "ed-db-on-request", "groups": ["emergency"], "resources": ["ehr-db"],
            "conditions": {"max_grant": "1h", "session_lifetime": "12h",
                "approval": {"approvers": "db-approvers", "max_window": "4h"}}}),
    );
    w.admin_json(&["policy", "put", "--file", &f], None)
        .expect("policy");
    let mut cmd = w.client_cmd(&cfg).expect("cmd");
    cmd.args([
        "request",
        "ehr-db",
        "--for",
        "1h",
        "--reason",
        "check the ED queue tables",
        "--json",
    ]);
    let r = run(cmd, None, &w.logs.join("request.err")).expect("request");
    assert!(r.ok, "{}", r.stderr);
    let req: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    let req_id = req["id"].as_i64().expect("id").to_string();
    w.admin_json(&["request", "approve", &req_id, "--approver", "kim"], None)
        .expect("approve");
    w.admin_json(&["request", "revoke", &req_id, "--reason", "done"], None)
        .expect("revoke");
    let kinds = ["request.created", "request.approved", "request.revoked"];
    let got = wait_for(Duration::from_secs(15), "request notifications", || {
        let d = receiver.deliveries();
        let evs: Vec<serde_json::Value> = d
            .iter()
            .map(Delivery::json)
            .filter(|e| e["subject"] == req_id.as_str())
            .collect();
        kinds
            .iter()
            .all(|k| evs.iter().any(|e| e["type"] == *k))
            .then_some(evs)
    })
    .expect("request events delivered");
    let created = got
        .iter()
        .find(|e| e["type"] == "request.created")
        .expect("created");
    assert_eq!(created["actor"], "user:ben");
    assert_eq!(created["detail"]["resource"], "ehr-db");
    let approved = got
        .iter()
        .find(|e| e["type"] == "request.approved")
        .expect("approved");
    assert_eq!(approved["detail"]["approver"], "kim");
}

#[test]
fn webhook_delivery_survives_a_receiver_down_and_never_delays_decisions() {
    let s = wardgate::demo::site("1h").expect("site");
    let w = &s.w;
    let port = free_port();
    // The receiver is down: nothing listens on its port.
    add_webhook(w, port);

    // Three grants, each revoked: three `grant.terminated` events, while the sink refuses.
    let mut ended = Vec::new();
    for i in 0..3 {
        let local = free_port();
        let mut cmd = w.client_cmd(&s.client).expect("cmd");
        cmd.args([
            "--json",
            "connect",
            "ehr-web",
            "--mode",
            "userspace",
            "--forward",
            &local.to_string(),
        ]);
        let t0 = Instant::now();
        let mut conn = Proc::spawn(cmd, &w.logs, &format!("connect-{i}")).expect("spawn");
        let grant = wait_for(Duration::from_secs(20), "the grant", || {
            std::fs::read_to_string(&conn.stdout)
                .ok()?
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["event"] == "connected")
        })
        .expect("connected");
        let decided = t0.elapsed();
        let id = grant["grant_id"].as_u64().expect("id");
        let t1 = Instant::now();
        w.admin_json(&["grant", "revoke", &id.to_string()], None)
            .expect("revoke");
        eprintln!(
            "receiver down: grant {id} decided and tunnel up in {decided:?}, revoked (gateway acked) in {:?}",
            t1.elapsed()
        );
        let _ = conn.wait_exit(Duration::from_secs(20));
        ended.push(id.to_string());
    }

    // The receiver comes back a few seconds later: the events arrive after retries.
    std::thread::sleep(Duration::from_secs(3));
    let up = Instant::now();
    let receiver = Receiver::start(port, Arc::new(Mutex::new(Vec::new())));
    let got = wait_for(Duration::from_secs(40), "three delivered events", || {
        let d = receiver.deliveries();
        (d.len() >= 3).then_some(d)
    })
    .expect("delivered after retries");
    eprintln!("receiver up: 3 events delivered {:?} later", up.elapsed());
    // Exactly the events enqueued: no more arrive.
    std::thread::sleep(Duration::from_secs(3));
    let got_after = receiver.deliveries();
    assert_eq!(got_after.len(), 3, "{got_after:?}");
    let mut subjects: Vec<String> = got
        .iter()
        .map(|d| {
            assert!(d.signed(), "{d:?}");
            let v = d.json();
            assert_eq!(v["type"], "grant.terminated");
            assert_eq!(v["detail"]["reason"], "revoked by an administrator");
            assert!(
                d.header("x-wardgate-attempt")
                    .and_then(|a| a.parse::<u32>().ok())
                    .is_some_and(|a| a > 1),
                "delivered by a retry: {d:?}"
            );
            v["subject"].as_str().expect("subject").to_owned()
        })
        .collect();
    subjects.sort();
    ended.sort();
    assert_eq!(subjects, ended);
    let mut ids: Vec<String> = got
        .iter()
        .map(|d| d.json()["id"].as_str().unwrap_or("").to_owned())
        .collect();
    ids.dedup();
    assert_eq!(ids.len(), 3, "distinct event ids");
}

#[test]
fn wireguard_export_peer_works_and_the_gateway_drops_it_at_the_end() {
    let s = wardgate::demo::site("1h").expect("site");
    let w = &s.w;
    let d = w.dir.path().to_path_buf();
    w.create_user("acme", PASSWORD).expect("user");
    w.admin_json(&["group", "create", "vendor-acme"], None)
        .expect("group");
    w.admin_json(&["group", "add-member", "vendor-acme", "acme"], None)
        .expect("member");
    let policy = |export: bool| {
        write_json(
            &d,
            "vendor.json",
            serde_json::json!({"name": "vendor-ehr", "groups": ["vendor-acme"], "resources": ["ehr-web"],
                "conditions": {"mfa_required": false, "max_grant": "1h", "session_lifetime": "8h",
                    "wireguard_export": export}}),
        )
    };
    w.admin_json(&["policy", "put", "--file", &policy(false)], None)
        .expect("policy");

    // The vendor makes the key pair; only the public key is handed over.
    let key = d.join("vendor.key");
    let out = std::process::Command::new(bin("wardgate").expect("bin"))
        .args(["genkey", "--out"])
        .arg(&key)
        .output()
        .expect("genkey");
    let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let export = |until: &str| {
        w.admin(
            &[
                "--json",
                "grant",
                "export",
                "--user",
                "acme",
                "--resource",
                "ehr-web",
                "--until",
                until,
                "--public-key",
                &public,
            ],
            None,
        )
        .expect("run")
    };
    // Not opted in: refused in words.
    let r = export("10s");
    assert!(
        !r.ok && r.stderr.contains("wireguard_export"),
        "{}",
        r.stderr
    );
    w.admin_json(&["policy", "put", "--file", &policy(true)], None)
        .expect("policy");
    let r = export("12s");
    assert!(r.ok, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    let config = v["config"].as_str().expect("config").to_owned();
    eprintln!("exported configuration:\n{config}");
    assert_eq!(v["controller_made_key"], false);
    let field = |name: &str| {
        config
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} = ")))
            .unwrap_or_else(|| panic!("{name} in {config}"))
            .to_owned()
    };
    assert!(config.starts_with("[Interface]") && config.contains("\n[Peer]\n"));
    assert_eq!(field("AllowedIPs"), "10.10.1.10/32");

    // A standard WireGuard peer built only from the configuration reaches the resource.
    let grant = serde_json::json!({
        "grant_id": v["grant_id"], "resource": "ehr-web",
        "gateway_public_key": field("PublicKey"), "gateway_endpoint": field("Endpoint"),
        "preshared_key": field("PresharedKey"),
        "tunnel_addr": field("Address").trim_end_matches("/32"),
        "rules": [{"dst": field("AllowedIPs"), "proto": "any"}],
        // A plain WireGuard peer knows no end: the gateway must enforce it.
        "expires_at_ms": 4_102_444_800_000i64,
    });
    let gfile = write_json(&d, "vendor-grant.json", grant);
    let local = free_port();
    let mut cmd = std::process::Command::new(bin("wardgate").expect("bin"));
    cmd.arg("--config-dir")
        .arg(d.join("vendor-cfg"))
        .args(["tunnel", "--grant", &gfile, "--key"])
        .arg(&key)
        .args([
            "--mode",
            "userspace",
            "--forward",
            &format!("127.0.0.1:{local}=10.10.1.10:443"),
        ]);
    let mut tunnel = Proc::spawn(cmd, &w.logs, "vendor-tunnel").expect("tunnel");
    let body = wait_for(
        Duration::from_secs(20),
        "ehr-web via the exported peer",
        || get_through(local),
    )
    .expect("the exported peer works");
    assert!(body.contains("wardgate-test-ok"), "{body}");
    let rows = audit_rows(w);
    let row = rows
        .iter()
        .find(|e| e["action"] == "access.export" && e["outcome"] == "allow")
        .expect("audited");
    assert_eq!(row["detail"]["posture"], "none");
    assert_eq!(row["detail"]["key_made_by"], "vendor");

    // At the end the gateway drops the peer: nothing passes any more.
    let end = v["expires_ms"].as_i64().expect("expires");
    let wait = end - wardgate_common::unix_ms(SystemTime::now());
    if wait > 0 {
        std::thread::sleep(Duration::from_millis(wait as u64 + 1500));
    }
    assert!(
        get_through(local).is_none(),
        "the peer must be dropped at the end"
    );
    let stats = std::process::Command::new(bin("wardgate-gateway").expect("bin"))
        .args(["stats", "--socket"])
        .arg(&s.socket)
        .output()
        .expect("stats");
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap_or_default();
    assert!(
        stats["grants"].as_array().is_none_or(|g| g.is_empty()),
        "{stats}"
    );
    tunnel.stop();
}
