//! Identity end to end with the real binaries: local users with TOTP and lockout, login
//! sessions that bound grants and end them at the gateway, MFA-requiring policies, and OIDC
//! logins (code + PKCE through the client's loopback callback, and the device grant) against
//! the real test OpenID provider (`tools/test-idp`; `scripts/idp.sh` installs it), including
//! the controller's refusals and OIDC sign-in to the admin API.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wardgate::demo::Site;
use wardgate::harness::{Proc, Ran, World, bin, free_port, run, wait_for};
use wardgate::idp::Idp;
use wardgate_controller::totp;

const PASSWORD: &str = "correct horse battery staple";

fn unix_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The code an authenticator app would show `offset_s` from now.
fn code(secret: &str, offset_s: i64) -> String {
    let key = totp::decode_secret(secret).expect("base32 secret");
    totp::code_at(&key, unix_s() + offset_s)
}

fn totp_enrol(w: &World, user: &str) -> String {
    let v = w
        .admin_json(&["user", "totp-enrol", user], None)
        .expect("totp-enrol");
    let uri = v["uri"].as_str().expect("uri");
    assert!(
        uri.starts_with(&format!("otpauth://totp/Wardgate:{user}?secret=")),
        "{uri}"
    );
    assert!(uri.contains("algorithm=SHA1&digits=6&period=30"), "{uri}");
    v["secret"].as_str().expect("secret").to_owned()
}

/// `wardgate enrol` (local user) with the password and an optional code on stdin.
fn enrol_local(w: &World, cfg: &Path, user: &str, password: &str, code: Option<&str>) -> Ran {
    let mut cmd = w.client_cmd(cfg).expect("cmd");
    cmd.args(["enrol", "--controller", &w.quic.to_string(), "--ca"])
        .arg(w.ca())
        .args(["--user", user, "--password-stdin", "--wait", "0s"]);
    let stdin = match code {
        Some(c) => format!("{password}\n{c}\n"),
        None => format!("{password}\n"),
    };
    run(cmd, Some(&stdin), &w.logs.join("client.err")).expect("enrol")
}

/// `wardgate login --json` (local user) with the password and an optional code on stdin.
fn login_local(w: &World, cfg: &Path, password: &str, code: Option<&str>) -> Ran {
    let mut cmd = w.client_cmd(cfg).expect("cmd");
    cmd.args(["--json", "login", "--password-stdin"]);
    let stdin = match code {
        Some(c) => format!("{password}\n{c}\n"),
        None => format!("{password}\n"),
    };
    run(cmd, Some(&stdin), &w.logs.join("client.err")).expect("login")
}

fn audit_rows(w: &World) -> Vec<serde_json::Value> {
    let r = w.audit(&["export"]).expect("export");
    assert!(r.ok, "{}", r.stderr);
    r.stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn has_audit(rows: &[serde_json::Value], action: &str, outcome: &str, reason: &str) -> bool {
    rows.iter().any(|e| {
        e["action"] == action
            && e["outcome"] == outcome
            && (reason.is_empty()
                || e["detail"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(reason)))
    })
}

#[test]
fn local_user_totp_refusals_lockout_and_its_end_are_audited() {
    let w = World::start(None, "info").expect("world");
    w.create_user("amara", PASSWORD).expect("user");
    let secret = totp_enrol(&w, "amara");
    w.admin_json(
        &[
            "settings",
            "set",
            "--lockout-threshold",
            "3",
            "--lockout-window",
            "1m",
            "--lockout-period",
            "4s",
        ],
        None,
    )
    .expect("settings");
    let cfg = w.dir.path().join("amara-laptop");

    // No code: told to give one (not counted as a guess).
    let r = enrol_local(&w, &cfg, "amara", PASSWORD, None);
    assert!(!r.ok && r.stderr.contains("--totp"), "{}", r.stderr);
    // Wrong password (with a right code): refused, without saying which part was wrong.
    let r = enrol_local(
        &w,
        &cfg,
        "amara",
        "not the password",
        Some(&code(&secret, 0)),
    );
    assert!(
        !r.ok && r.stderr.contains("password or one-time code is wrong"),
        "{}",
        r.stderr
    );
    // Right password, wrong code: refused the same way.
    let wrong = format!(
        "{:06}",
        (code(&secret, 0).parse::<u32>().expect("digits") + 1) % 1_000_000
    );
    let r = enrol_local(&w, &cfg, "amara", PASSWORD, Some(&wrong));
    assert!(
        !r.ok && r.stderr.contains("password or one-time code is wrong"),
        "{}",
        r.stderr
    );
    // Both right: enrolled, and the session is multi-factor.
    let now_code = code(&secret, 0);
    let r = enrol_local(&w, &cfg, "amara", PASSWORD, Some(&now_code));
    assert!(r.ok, "{}", r.stderr);
    // The same code again: refused (a used code never works twice). Failure 1 of 3.
    let r = login_local(&w, &cfg, PASSWORD, Some(&now_code));
    assert!(!r.ok && r.stderr.contains("already used"), "{}", r.stderr);
    // Two wrong passwords: the third failure locks, and the answer says until when.
    let r = login_local(&w, &cfg, "wrong-1", Some(&code(&secret, 30)));
    assert!(!r.ok && !r.stderr.contains("locked"), "{}", r.stderr);
    let r = login_local(&w, &cfg, "wrong-2", Some(&code(&secret, 30)));
    assert!(
        !r.ok && r.stderr.contains("locked until") && r.stderr.contains("locked_out"),
        "{}",
        r.stderr
    );
    // Locked: even the right password and code are refused, naming when to retry.
    let r = login_local(&w, &cfg, PASSWORD, Some(&code(&secret, 30)));
    assert!(!r.ok && r.stderr.contains("try again then"), "{}", r.stderr);
    // After the lockout period the right login works again (next step's code: the current
    // one was used).
    std::thread::sleep(Duration::from_secs(5));
    let r = login_local(&w, &cfg, PASSWORD, Some(&code(&secret, 30)));
    assert!(r.ok, "{}", r.stderr);
    let s: serde_json::Value = serde_json::from_str(&r.stdout).expect("session json");
    assert_eq!(s["username"], "amara");
    assert_eq!(s["method"], "local");
    assert_eq!(s["mfa"], true, "{s}");

    let rows = audit_rows(&w);
    for reason in [
        "one-time code missing",
        "wrong password",
        "wrong one-time code",
        "one-time code already used",
        "locked out",
    ] {
        assert!(
            has_audit(&rows, "login.local", "deny", reason),
            "no login.local deny for {reason:?}"
        );
    }
    assert!(has_audit(&rows, "login.lockout", "lock", ""));
    assert!(rows.iter().any(|e| e["action"] == "login.local"
        && e["outcome"] == "allow"
        && e["detail"]["mfa"] == true));
    assert!(rows.iter().any(|e| e["action"] == "session.open"));
    // Neither the password, nor the secret, nor a code reached any log.
    let logs = w.all_logs();
    assert!(!logs.contains(PASSWORD));
    assert!(!logs.contains(&secret));
    assert!(!logs.contains(&now_code));
}

fn site() -> Site {
    wardgate::demo::site("1h").expect("site")
}

fn connect(s: &Site, cfg: &Path) -> Proc {
    let mut cmd = s.w.client_cmd(cfg).expect("cmd");
    cmd.args([
        "--json",
        "connect",
        "ehr-web",
        "--mode",
        "userspace",
        "--forward",
        &free_port().to_string(),
    ]);
    Proc::spawn(cmd, &s.w.logs, &format!("connect-{}", free_port())).expect("connect")
}

fn connect_once(s: &Site, cfg: &Path) -> Ran {
    let mut cmd = s.w.client_cmd(cfg).expect("cmd");
    cmd.args([
        "connect",
        "ehr-web",
        "--mode",
        "userspace",
        "--forward",
        &free_port().to_string(),
    ]);
    // A successful connect would run until stopped; these are expected to fail at once.
    run(cmd, None, &s.w.logs.join("connect-once.err")).expect("run")
}

fn gateway_grants(s: &Site) -> Vec<serde_json::Value> {
    let out = Command::new(bin("wardgate-gateway").expect("bin"))
        .args(["stats", "--socket"])
        .arg(&s.socket)
        .output()
        .expect("stats");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["grants"].as_array().cloned().unwrap_or_default()
}

fn require_mfa(s: &Site) {
    let f = s.w.dir.path().join("mfa-policy.json");
    std::fs::write(
        &f,
        serde_json::json!({"name": "clinicians-ehr", "groups": ["clinicians"], "resources": ["ehr-web"],
            "conditions": {"mfa_required": true, "max_grant": "1h", "session_lifetime": "8h"}})
        .to_string(),
    )
    .expect("write");
    s.w.admin_json(&["policy", "put", "--file", &f.display().to_string()], None)
        .expect("policy");
}

#[test]
fn mfa_policy_denies_a_password_only_session_in_words_and_allows_after_totp_login() {
    let s = site();
    require_mfa(&s);
    // amara enrolled with a password only: her session has no second factor.
    let r = connect_once(&s, &s.client);
    assert!(!r.ok);
    assert!(
        r.stderr.contains("access to ehr-web denied")
            && r.stderr.contains("needs multi-factor sign-in"),
        "{}",
        r.stderr
    );
    let rows = audit_rows(&s.w);
    assert!(rows.iter().any(|e| {
        e["action"] == "access.decide"
            && e["outcome"] == "deny"
            && e["detail"]["codes"]
                .as_array()
                .is_some_and(|c| c.iter().any(|x| x == "mfa_required"))
    }));
    // She enrols TOTP and logs in again with a code: the new session is multi-factor.
    let secret = totp_enrol(&s.w, "amara");
    let r = login_local(&s.w, &s.client, PASSWORD, Some(&code(&secret, 0)));
    assert!(r.ok, "{}", r.stderr);
    let mut conn = connect(&s, &s.client);
    wait_for(
        Duration::from_secs(20),
        "the MFA grant at the gateway",
        || (gateway_grants(&s).len() == 1).then_some(()),
    )
    .expect("granted with MFA");
    conn.stop();
}

#[test]
fn session_expiry_and_disabling_end_grants_at_the_gateway() {
    let s = site();
    s.w.admin_json(&["settings", "set", "--session-lifetime", "6s"], None)
        .expect("settings");
    // A new login opens a 6 s session (the enrolment's is the old 12 h one, now superseded).
    let r = login_local(&s.w, &s.client, PASSWORD, None);
    assert!(r.ok, "{}", r.stderr);
    let session: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    let mut conn = connect(&s, &s.client);
    let grants = wait_for(Duration::from_secs(20), "the grant at the gateway", || {
        let g = gateway_grants(&s);
        (g.len() == 1).then_some(g)
    })
    .expect("granted");
    eprintln!("grant at the gateway: {grants:?}");
    let listed = s.w.admin_json(&["grant", "list"], None).expect("grants");
    let expires = listed[0]["expires_ms"].as_i64().expect("expires");
    assert!(
        expires <= session["expires_at_ms"].as_i64().expect("session end"),
        "the grant ends no later than the session: {listed} {session}"
    );
    // The session ends: the grant is gone from the gateway and the client says why.
    wait_for(
        Duration::from_secs(20),
        "the gateway to drop the grant",
        || gateway_grants(&s).is_empty().then_some(()),
    )
    .expect("dropped at session end");
    let exit = conn
        .wait_exit(Duration::from_secs(20))
        .expect("connect exits");
    assert!(!exit.success());
    let err = conn.stderr_text();
    assert!(
        err.contains("wardgate login") || err.contains("sign-in has expired"),
        "the client says to log in again: {err}"
    );
    let r = connect_once(&s, &s.client);
    assert!(
        !r.ok && r.stderr.contains("log in again: run `wardgate login`"),
        "{}",
        r.stderr
    );
    let rows = audit_rows(&s.w);
    assert!(rows.iter().any(|e| e["action"] == "session.end"));

    // Logged in again: access is back. Then the account is disabled (S8): the session ends,
    // the grant ends at the gateway, and the device can no longer log in.
    s.w.admin_json(&["settings", "set", "--session-lifetime", "1h"], None)
        .expect("settings");
    let r = login_local(&s.w, &s.client, PASSWORD, None);
    assert!(r.ok, "{}", r.stderr);
    let mut conn = connect(&s, &s.client);
    wait_for(Duration::from_secs(20), "the new grant", || {
        (gateway_grants(&s).len() == 1).then_some(())
    })
    .expect("granted again");
    let v =
        s.w.admin_json(&["user", "disable", "amara"], None)
            .expect("disable");
    assert_eq!(v["sessions_ended"], 1, "{v}");
    assert!(gateway_grants(&s).is_empty());
    conn.wait_exit(Duration::from_secs(20)).expect("exits");
    let rows = audit_rows(&s.w);
    assert!(has_audit(&rows, "session.end", "ok", "account disabled"));
}

// ---------------------------------------------------------------------------------------
// OpenID Connect

fn idp() -> Idp {
    match Idp::start() {
        Ok(i) => i,
        Err(e) => panic!("{e:#}"),
    }
}

/// Trusts the IdP (staff provider, `wardgate-admins` may administer) and restarts the
/// controller so it reads the file.
fn trust(w: &mut World, idp: &Idp) {
    let file = serde_json::json!({"providers": [{
        "name": "staff", "issuer": idp.issuer(), "client_ids": [idp.client_id()],
        "admin_groups": ["wardgate-admins"]}]});
    std::fs::write(w.data_dir.join("identity.json"), file.to_string()).expect("identity.json");
    w.stop_controller();
    w.start_controller().expect("restart");
}

/// Runs `wardgate ARGS` (an OIDC login) in the background and plays the user: the browser
/// for the code flow (`account` logs in at the IdP and the redirect reaches the client's
/// loopback listener), or the IdP's approval for the device flow.
fn oidc_cli(w: &World, idp: &Idp, cfg: &Path, args: &[&str], account: &str, device: bool) -> Ran {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let mut cmd = w.client_cmd(cfg).expect("cmd");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or_else(|_| panic!("the client printed no login prompt: {seen}"));
        seen.push_str(&line);
        seen.push('\n');
        if device {
            if let Some(code) = line.split("enter the code: ").nth(1) {
                rt.block_on(idp.device_approve(code.trim(), account))
                    .expect("approve");
                break;
            }
        } else if let Some(url) = line.trim().strip_prefix("http") {
            let status = rt
                .block_on(idp.browse_as(&format!("http{url}"), account))
                .expect("browse");
            assert_eq!(status, 200, "the client's callback page");
            break;
        }
    }
    let out = child.wait_with_output().expect("wait");
    // The reader may still be behind the exited child: read stderr to its end before
    // judging what the client said.
    let _ = reader.join();
    let rest: String = rx.iter().collect::<Vec<_>>().join("\n");
    let ran = Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: format!("{seen}{rest}"),
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(w.logs.join("client.err"))
        .expect("log");
    let _ = writeln!(f, "{}", ran.stderr);
    ran
}

fn enrol_args(w: &World, idp: &Idp) -> Vec<String> {
    vec![
        "enrol".into(),
        "--controller".into(),
        w.quic.to_string(),
        "--ca".into(),
        w.ca().display().to_string(),
        "--oidc".into(),
        idp.issuer().into(),
        "--no-browser".into(),
        "--wait".into(),
        "0s".into(),
    ]
}

#[test]
fn oidc_code_and_device_flows_yield_sessions_with_groups_and_mfa() {
    let idp = idp();
    let mut w = World::start(None, "info").expect("world");
    trust(&mut w, &idp);
    let cfg = w.dir.path().join("amara-laptop");

    // Enrolment by code + PKCE through the loopback redirect.
    let args = enrol_args(&w, &idp);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = oidc_cli(&w, &idp, &cfg, &args, "amara", false);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("for amara"), "{}", r.stdout);

    // Logging in again with the device flow: a session with the IdP's groups and MFA.
    let issuer = idp.issuer().to_owned();
    let r = oidc_cli(
        &w,
        &idp,
        &cfg,
        &["--json", "login", "--oidc", &issuer, "--device"],
        "amara",
        true,
    );
    assert!(r.ok, "{}", r.stderr);
    let s: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(s["username"], "amara");
    assert_eq!(s["method"], "oidc");
    assert_eq!(s["provider"], "staff");
    assert_eq!(s["mfa"], true, "{s}");
    assert_eq!(s["groups"], serde_json::json!(["clinicians"]));

    // And with the code flow again.
    let r = oidc_cli(
        &w,
        &idp,
        &cfg,
        &["--json", "login", "--oidc", &issuer, "--no-browser"],
        "amara",
        false,
    );
    assert!(r.ok, "{}", r.stderr);

    // A password-only account: its session says no MFA.
    let cfg2 = w.dir.path().join("nomfa-laptop");
    let r = oidc_cli(&w, &idp, &cfg2, &args, "nomfa", false);
    assert!(r.ok, "{}", r.stderr);
    let r = oidc_cli(
        &w,
        &idp,
        &cfg2,
        &["--json", "login", "--oidc", &issuer, "--device"],
        "nomfa",
        true,
    );
    assert!(r.ok, "{}", r.stderr);
    let s: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(s["mfa"], false, "{s}");

    // Another user cannot log in on amara's device.
    let r = oidc_cli(
        &w,
        &idp,
        &cfg,
        &["login", "--oidc", &issuer, "--device"],
        "nomfa",
        true,
    );
    assert!(
        !r.ok && r.stderr.contains("enrolled by another user"),
        "{}",
        r.stderr
    );

    let rows = audit_rows(&w);
    assert!(rows.iter().any(|e| e["action"] == "login.oidc"
        && e["outcome"] == "allow"
        && e["detail"]["provider"] == "staff"));
    assert!(rows.iter().any(|e| e["action"] == "user.provision"));
    // No ID token reached a log (they start with the base64 of `{"alg"`).
    assert!(!w.all_logs().contains("eyJhbGciOi"), "a token was logged");
}

#[test]
fn controller_refuses_replayed_and_mismatched_id_tokens_and_non_admins() {
    use wardgate_common::proto::{EnrolDevice, ErrorCode, Login, Request, Secret};
    use wardgate_common::transport::ControlClient;
    let idp = idp();
    let mut w = World::start(None, "info").expect("world");
    trust(&mut w, &idp);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let ca_pem = std::fs::read(w.ca()).expect("ca");
    let ca = wardgate_common::pki::certs_from_pem("ca", &ca_pem)
        .expect("pem")
        .remove(0);
    let enrol = |login: Login| {
        rt.block_on(async {
            let kc = wardgate_common::pki::generate_key_and_csr("t").expect("csr");
            let cfg = wardgate_common::tls::client_config(&ca, None).expect("tls");
            let mut c = ControlClient::connect(&w.quic.to_string(), cfg, "test")
                .await
                .expect("connect");
            let r = c
                .request(Request::EnrolDevice(EnrolDevice {
                    login,
                    device_name: "t".into(),
                    csr_pem: kc.csr_pem,
                    os: "test".into(),
                    hostname: "t".into(),
                }))
                .await;
            c.close().await;
            r
        })
    };
    let (req, tokens) = rt
        .block_on(idp.login("amara", "openid profile email groups"))
        .expect("login");
    let id_token = tokens.id_token.expect("id token");
    // The wrong nonce: refused.
    let e = enrol(Login::Oidc {
        id_token: Secret::new(id_token.clone()),
        nonce: Some("not-this-login".into()),
    })
    .expect_err("wrong nonce");
    let wire = e.wire().expect("wire error").clone();
    assert_eq!(wire.code, ErrorCode::IdentityRejected);
    assert!(wire.message.contains("nonce"), "{}", wire.message);
    // The right one: enrolled. Then the same token again: refused as a replay.
    enrol(Login::Oidc {
        id_token: Secret::new(id_token.clone()),
        nonce: Some(req.nonce.clone()),
    })
    .expect("enrolled");
    let e = enrol(Login::Oidc {
        id_token: Secret::new(id_token.clone()),
        nonce: Some(req.nonce.clone()),
    })
    .expect_err("replay");
    assert!(
        e.wire().is_some_and(|w| w.message.contains("already used")),
        "{e}"
    );
    // A tampered token: refused as forged.
    let mut parts: Vec<String> = id_token.split('.').map(str::to_owned).collect();
    parts[2] = format!("{}AA", &parts[2][..parts[2].len() - 2]);
    let e = enrol(Login::Oidc {
        id_token: Secret::new(parts.join(".")),
        nonce: None,
    })
    .expect_err("forged");
    assert!(
        e.wire().is_some_and(|w| w.message.contains("signature")),
        "{e}"
    );
    let rows = audit_rows(&w);
    for kind in ["nonce_mismatch", "nonce_replayed", "bad_signature"] {
        assert!(
            has_audit(&rows, "login.oidc", "deny", kind),
            "no login.oidc deny for {kind}"
        );
    }

    // The admin API: pat (wardgate-admins) signs in with an ID token; amara is refused 403.
    let (_, pat) = rt
        .block_on(idp.login("pat", "openid profile email groups"))
        .expect("pat");
    let pat_token = pat.id_token.expect("id token");
    let r = w
        .admin(&["--token", &pat_token, "user", "list", "--json"], None)
        .expect("admin");
    assert!(r.ok, "{}", r.stderr);
    let (_, amara) = rt
        .block_on(idp.login("amara", "openid profile email groups"))
        .expect("amara");
    let r = w
        .admin(
            &[
                "--token",
                &amara.id_token.expect("t"),
                "user",
                "list",
                "--json",
            ],
            None,
        )
        .expect("admin");
    assert!(!r.ok);
    assert!(
        r.stderr.contains("403") || r.stderr.contains("forbidden"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("not in an admin group"), "{}", r.stderr);
    // An admin token still works for automation.
    assert!(w.admin(&["user", "list"], None).expect("admin").ok);
    let rows = audit_rows(&w);
    assert!(rows.iter().any(|e| e["action"] == "admin.auth"
        && e["outcome"] == "deny"
        && e["actor"] == "oidc:staff:amara"));
}

#[test]
fn mfa_policy_denies_an_oidc_session_without_mfa() {
    let idp = idp();
    let mut s = site();
    trust(&mut s.w, &idp);
    wait_for(Duration::from_secs(20), "the gateway to reconnect", || {
        let v = s.w.admin_json(&["gateway", "list"], None).ok()?;
        (v[0]["online"] == true).then_some(())
    })
    .expect("gateway online");
    require_mfa(&s);
    let args = enrol_args(&s.w, &idp);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // nomfa is a clinician at the IdP, but signed in with a password only.
    let cfg = s.w.dir.path().join("nomfa-laptop");
    let r = oidc_cli(&s.w, &idp, &cfg, &args, "nomfa", false);
    assert!(r.ok, "{}", r.stderr);
    let r = connect_once(&s, &cfg);
    assert!(
        !r.ok && r.stderr.contains("needs multi-factor sign-in"),
        "{}",
        r.stderr
    );
    // ben (clinicians, MFA at the IdP) is allowed: the groups come from his token.
    let cfg = s.w.dir.path().join("ben-laptop");
    let r = oidc_cli(&s.w, &idp, &cfg, &args, "ben", false);
    assert!(r.ok, "{}", r.stderr);
    let mut conn = connect(&s, &cfg);
    wait_for(Duration::from_secs(20), "ben's grant", || {
        (gateway_grants(&s).len() == 1).then_some(())
    })
    .expect("ben is granted");
    conn.stop();
}

/// Every file under `dir` (recursively), as bytes.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.push((p, b));
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The refresh token the controller holds for `session_id` right now: read sealed from the
/// SQLite file and opened with the data directory's key, as only the controller should.
fn current_refresh_token(w: &World, session_id: &str) -> String {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let db = w.data_dir.join("wardgate.db");
    let sealed: String = rt.block_on(async {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .read_only(true);
        let pool = sqlx::SqlitePool::connect_with(opts).await.expect("db");
        let row: (String,) =
            sqlx::query_as("SELECT token_sealed FROM session_refresh WHERE session_id = ?")
                .bind(session_id)
                .fetch_one(&pool)
                .await
                .expect("a refresh row for the session");
        pool.close().await;
        row.0
    });
    let sealer =
        wardgate_controller::identity::Sealer::load_or_create(&w.data_dir.join("refresh.key"))
            .expect("key");
    sealer
        .open(session_id, &sealed)
        .expect("opens")
        .expose()
        .to_owned()
}

#[test]
fn s8_disabled_at_the_provider_ends_session_and_grants() {
    let idp = idp();
    let mut s = site();
    trust(&mut s.w, &idp);
    wait_for(Duration::from_secs(20), "the gateway to reconnect", || {
        let v = s.w.admin_json(&["gateway", "list"], None).ok()?;
        (v[0]["online"] == true).then_some(())
    })
    .expect("gateway online");
    s.w.admin_json(
        &["settings", "set", "--session-refresh-interval", "2s"],
        None,
    )
    .expect("settings");
    let key = s.w.data_dir.join("refresh.key");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key)
            .expect("refresh.key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the sealing key is private");
    }

    // amara enrols a laptop with the code flow: the controller redeems the code and keeps
    // the refresh token (session.open says it is checked at the provider).
    let cfg = s.w.dir.path().join("amara-oidc-laptop");
    let args = enrol_args(&s.w, &idp);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = oidc_cli(&s.w, &idp, &cfg, &args, "amara", false);
    assert!(r.ok, "{}", r.stderr);
    let rows = audit_rows(&s.w);
    let open = rows
        .iter()
        .rev()
        .find(|e| e["action"] == "session.open" && e["detail"]["method"] == "oidc")
        .expect("session.open")
        .clone();
    assert_eq!(open["detail"]["checked_at_provider"], true, "{open}");
    let session_id = open["target"].as_str().expect("session id").to_owned();

    let mut conn = connect(&s, &cfg);
    wait_for(Duration::from_secs(20), "amara's grant", || {
        (gateway_grants(&s).len() == 1).then_some(())
    })
    .expect("granted");
    // Refreshes succeed quietly: after several intervals the grant is still there.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(gateway_grants(&s).len(), 1);
    assert!(conn.running(), "connect still running");

    // The IdP goes down for a few intervals: nothing ends, the failure is audited.
    rt_block(idp.set_down(true)).expect("down");
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(gateway_grants(&s).len(), 1, "an IdP outage ends no grant");
    assert!(conn.running(), "an IdP outage ends no connection");
    let rows = audit_rows(&s.w);
    assert!(
        rows.iter().any(|e| e["action"] == "session.refresh"
            && e["outcome"] == "error"
            && e["target"] == session_id.as_str()),
        "the failed refresh is audited"
    );
    assert!(
        !rows
            .iter()
            .any(|e| e["action"] == "session.end" && e["target"] == session_id.as_str())
    );
    // Back up: refreshing resumes (audited once), the grant is still there.
    rt_block(idp.set_down(false)).expect("up");
    wait_for(Duration::from_secs(20), "the refresh to resume", || {
        audit_rows(&s.w)
            .iter()
            .any(|e| {
                e["action"] == "session.refresh"
                    && e["outcome"] == "ok"
                    && e["target"] == session_id.as_str()
            })
            .then_some(())
    })
    .expect("refresh resumed");
    assert_eq!(gateway_grants(&s).len(), 1);

    // The refresh token exists only in the controller's memory and, sealed, in its store.
    let token = current_refresh_token(&s.w, &session_id);
    assert!(token.len() >= 16, "a real token");
    assert!(!s.w.all_logs().contains(&token), "refresh token in a log");
    for (p, bytes) in files_under(&cfg) {
        assert!(
            !contains(&bytes, token.as_bytes()),
            "refresh token in the client's {}",
            p.display()
        );
    }
    for (p, bytes) in files_under(&s.w.data_dir) {
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("wardgate.db"))
        {
            assert!(
                !contains(&bytes, token.as_bytes()),
                "refresh token in plaintext in {}",
                p.display()
            );
        }
    }
    for args in [
        vec!["user", "list", "--json"],
        vec!["device", "list", "--json"],
        vec!["grant", "list", "--json"],
        vec!["settings", "show", "--json"],
    ] {
        let r = s.w.admin(&args, None).expect("admin");
        assert!(r.ok, "{args:?}: {}", r.stderr);
        assert!(!r.stdout.contains(&token), "refresh token in {args:?}");
    }
    let r = s.w.audit(&["export"]).expect("export");
    assert!(!r.stdout.contains(&token), "refresh token in the audit log");

    // amara is disabled at the IdP: within a couple of intervals the session ends, the grant
    // leaves the gateway, and connect exits saying why.
    rt_block(idp.set_account_disabled("amara", true)).expect("disable");
    wait_for(
        Duration::from_secs(20),
        "the gateway to drop the grant",
        || gateway_grants(&s).is_empty().then_some(()),
    )
    .expect("grant ended");
    let exit = conn
        .wait_exit(Duration::from_secs(20))
        .expect("connect exits");
    assert!(!exit.success());
    let err = conn.stderr_text();
    assert!(
        err.contains("disabled at the identity provider"),
        "connect says why: {err}"
    );
    let rows = audit_rows(&s.w);
    let end = rows
        .iter()
        .find(|e| e["action"] == "session.end" && e["target"] == session_id.as_str())
        .expect("session.end audited");
    assert!(
        end["detail"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("your account was disabled at the identity provider")),
        "{end}"
    );
    assert_eq!(end["detail"]["provider_error"], "invalid_grant", "{end}");
    assert_eq!(end["detail"]["provider"], "staff", "{end}");
    // A new connect needs a login, and the login is refused at the IdP.
    let r = connect_once(&s, &cfg);
    assert!(
        !r.ok && r.stderr.contains("disabled at the identity provider"),
        "{}",
        r.stderr
    );
    let issuer = idp.issuer().to_owned();
    let r = oidc_cli(
        &s.w,
        &idp,
        &cfg,
        &["login", "--oidc", &issuer, "--no-browser"],
        "amara",
        false,
    );
    assert!(
        !r.ok,
        "a disabled account cannot log in again: {}",
        r.stdout
    );
    assert!(r.stderr.contains("refused"), "{}", r.stderr);
    assert!(!s.w.all_logs().contains(&token), "refresh token in a log");
}

fn rt_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Runtime::new().expect("rt").block_on(f)
}
