//! End-to-end tests of the foundation: controller init and serve, gateway join and run, device
//! enrolment, and everything that must be refused — over real QUIC on loopback, with the real
//! binaries, real SQLite files and a real PostgreSQL.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use wardgate::harness::{World, fresh_pg_database, wait_for};
use wardgate_common::frame;
use wardgate_common::proto::{ClientMsg, ErrorCode, Request, ServerMsg, WireError};

const PASSWORD: &str = "correct horse battery staple";

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

/// Join a gateway, run it, enrol a device, and check what admins and the user see.
fn join_run_enrol(
    w: &World,
) -> (
    wardgate::harness::Proc,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    w.create_user("amara", PASSWORD).expect("create user");
    let token = w
        .join_token("gw-ehr", "10.10.0.0/16", "10m")
        .expect("token");
    let gw_dir = w.dir.path().join("gateway");
    let r = w.gateway_join(&gw_dir, &token, &[]).expect("join");
    assert!(r.ok, "join failed: {}", r.stderr);
    assert!(
        r.stdout.contains("joined as gateway gw-ehr"),
        "{}",
        r.stdout
    );
    let gw = w.gateway_run(&gw_dir, "gateway").expect("run");
    wait_for(Duration::from_secs(20), "the gateway to be online", || {
        let v = w.admin_json(&["gateway", "list"], None).ok()?;
        (v[0]["online"] == true).then_some(())
    })
    .expect("gateway online");
    let gws = w.admin_json(&["gateway", "list"], None).expect("list");
    assert_eq!(gws[0]["name"], "gw-ehr");
    assert_eq!(gws[0]["status"], "active");
    assert_eq!(gws[0]["networks"][0], "10.10.0.0/16");

    let cl_dir = w.dir.path().join("client");
    let r = w.enrol(&cl_dir, "amara", PASSWORD, "0s").expect("enrol");
    assert!(r.ok, "enrol failed: {}", r.stderr);
    let st = w.status(&cl_dir).expect("status");
    assert_eq!(st["enrolment"], "enrolled", "{st}");
    assert_eq!(st["connection"], "connected", "{st}");
    assert_eq!(st["username"], "amara");
    let devs = w.admin_json(&["device", "list"], None).expect("devices");
    assert_eq!(devs[0]["status"], "approved");
    assert_eq!(devs[0]["owner"], "amara");
    (gw, gw_dir, cl_dir)
}

fn restart_keeps_state(w: &mut World, gw: &mut wardgate::harness::Proc, cl_dir: &Path) {
    w.stop_controller();
    // While the controller is down the gateway keeps running and retrying.
    std::thread::sleep(Duration::from_millis(700));
    assert!(gw.running(), "the gateway must survive a controller outage");
    w.start_controller().expect("restart");
    wait_for(
        Duration::from_secs(20),
        "the gateway to reconnect by itself",
        || {
            let v = w.admin_json(&["gateway", "list"], None).ok()?;
            (v[0]["online"] == true).then_some(())
        },
    )
    .expect("gateway reconnects");
    let users = w.admin_json(&["user", "list"], None).expect("users");
    assert_eq!(users.as_array().map(Vec::len), Some(1));
    assert_eq!(users[0]["username"], "amara");
    let st = w.status(cl_dir).expect("status");
    assert_eq!(st["connection"], "connected", "{st}");
    let stderr = gw.stderr_text();
    assert!(
        stderr.matches("connected to the controller").count() >= 2,
        "the gateway should have connected twice:\n{stderr}"
    );
}

#[test]
fn join_enrol_and_restart_on_sqlite() {
    let mut w = World::start(None, "info").expect("world");
    let (mut gw, gw_dir, cl_dir) = join_run_enrol(&w);
    // Key, token and database files are private to their owner.
    for p in [
        w.data_dir.join("ca.key"),
        w.data_dir.join("controller.key"),
        w.data_dir.join("controller.json"),
        w.data_dir.join("wardgate.db"),
        gw_dir.join("gateway.key"),
        gw_dir.join("wg.key"),
        cl_dir.join("device.key"),
    ] {
        assert_eq!(mode(&p), 0o600, "{} must be 0600", p.display());
    }
    assert_eq!(mode(&w.data_dir) & 0o077, 0, "data dir must be private");
    restart_keeps_state(&mut w, &mut gw, &cl_dir);
}

#[test]
fn join_enrol_and_restart_on_postgres() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let url = rt.block_on(fresh_pg_database()).expect("postgres");
    let mut w = World::start(Some(&url), "info").expect("world");
    assert!(
        !w.data_dir.join("wardgate.db").exists(),
        "PostgreSQL was asked for, SQLite used"
    );
    let (mut gw, _gw_dir, cl_dir) = join_run_enrol(&w);
    restart_keeps_state(&mut w, &mut gw, &cl_dir);
    // The rows really are in PostgreSQL.
    let n: i64 = rt
        .block_on(async {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&url).await?;
            sqlx::query_scalar("SELECT COUNT(*) FROM devices")
                .fetch_one(&mut c)
                .await
        })
        .expect("count devices");
    assert_eq!(n, 1);
}

#[test]
fn enrolment_waits_for_approval_and_denial_is_clear() {
    let w = World::start(None, "info").expect("world");
    w.admin_json(&["settings", "set", "--enrolment-requires-approval"], None)
        .expect("settings");
    w.create_user("acme-eng", PASSWORD).expect("user");

    // Enrol in the background; it must wait, not finish, until an admin approves.
    let cl = w.dir.path().join("vendor-laptop");
    let mut cmd = w.client_cmd(&cl).expect("cmd");
    cmd.env("WARDGATE_PASSWORD", PASSWORD)
        .args(["enrol", "--controller", &w.quic.to_string(), "--ca"])
        .arg(w.ca())
        .args(["--user", "acme-eng", "--wait", "60s"]);
    let mut waiting = wardgate::harness::Proc::spawn(cmd, &w.logs, "enrol-wait").expect("spawn");
    let dev_id = wait_for(Duration::from_secs(20), "a pending device", || {
        let v = w.admin_json(&["device", "list"], None).ok()?;
        (v[0]["status"] == "pending").then(|| v[0]["id"].as_str().map(str::to_owned))?
    })
    .expect("pending");
    std::thread::sleep(Duration::from_millis(800));
    assert!(waiting.running(), "enrolment must wait for approval");
    let st = w.status(&cl).expect("status");
    assert_eq!(st["enrolment"], "pending");
    assert!(
        !cl.join("device.pem").exists(),
        "no certificate before approval"
    );
    w.admin_json(&["device", "approve", &dev_id], None)
        .expect("approve");
    let exit = waiting.wait_exit(Duration::from_secs(20)).expect("exit");
    assert!(exit.success(), "{}", waiting.stderr_text());
    let st = w.status(&cl).expect("status");
    assert_eq!(st["enrolment"], "enrolled");
    assert_eq!(st["connection"], "connected");
    // Approving twice is a conflict, not a second certificate.
    let again = w
        .admin(&["device", "approve", &dev_id], None)
        .expect("again");
    assert!(!again.ok);

    // A second device is denied: the waiting client says so and exits non-zero.
    let cl2 = w.dir.path().join("unknown-laptop");
    let mut cmd = w.client_cmd(&cl2).expect("cmd");
    cmd.env("WARDGATE_PASSWORD", PASSWORD)
        .args(["enrol", "--controller", &w.quic.to_string(), "--ca"])
        .arg(w.ca())
        .args(["--user", "acme-eng", "--wait", "60s"]);
    let mut waiting = wardgate::harness::Proc::spawn(cmd, &w.logs, "enrol-denied").expect("spawn");
    let dev2 = wait_for(Duration::from_secs(20), "a second pending device", || {
        let v = w.admin_json(&["device", "list"], None).ok()?;
        v.as_array()?
            .iter()
            .find(|d| d["status"] == "pending")
            .and_then(|d| d["id"].as_str().map(str::to_owned))
    })
    .expect("pending 2");
    w.admin_json(&["device", "deny", &dev2], None)
        .expect("deny");
    let exit = waiting.wait_exit(Duration::from_secs(20)).expect("exit");
    assert!(!exit.success());
    let err = waiting.stderr_text();
    assert!(err.contains("denied by an administrator"), "{err}");
    assert_eq!(w.status(&cl2).expect("status")["enrolment"], "denied");

    // Wrong password: refused, nothing enrolled.
    let r = w
        .enrol(
            &w.dir.path().join("thief"),
            "acme-eng",
            "not the password",
            "0s",
        )
        .expect("enrol");
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("user name, password or one-time code is wrong"),
        "{}",
        r.stderr
    );
}

#[test]
fn join_tokens_are_single_use_and_expire() {
    let w = World::start(None, "info").expect("world");
    let token = w
        .join_token("gw-pacs", "10.10.2.0/24", "10m")
        .expect("token");
    let r = w
        .gateway_join(&w.dir.path().join("gw1"), &token, &[])
        .expect("join");
    assert!(r.ok, "{}", r.stderr);
    // Replay from another machine.
    let r = w
        .gateway_join(&w.dir.path().join("gw2"), &token, &[])
        .expect("join");
    assert!(!r.ok);
    assert!(
        r.stderr.contains("already used") && r.stderr.contains("token_used"),
        "{}",
        r.stderr
    );
    // Expired.
    let short = w.join_token("gw-lab", "10.10.3.0/24", "1s").expect("token");
    std::thread::sleep(Duration::from_millis(1300));
    let r = w
        .gateway_join(&w.dir.path().join("gw3"), &short, &[])
        .expect("join");
    assert!(!r.ok);
    assert!(r.stderr.contains("token_expired"), "{}", r.stderr);
    // Unknown.
    let r = w
        .gateway_join(&w.dir.path().join("gw4"), "wgj_made-up", &[])
        .expect("join");
    assert!(r.stderr.contains("token_unknown"), "{}", r.stderr);
    // A network outside the token's is refused.
    let t = w
        .join_token("gw-mri", "10.20.5.0/24", "10m")
        .expect("token");
    let r = w
        .gateway_join(
            &w.dir.path().join("gw5"),
            &t,
            &["--network", "10.10.0.0/16"],
        )
        .expect("join");
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("not among the networks this token allows"),
        "{}",
        r.stderr
    );
    // Every refusal is audited.
    let gws = w.admin_json(&["gateway", "list"], None).expect("list");
    assert_eq!(
        gws.as_array().map(Vec::len),
        Some(1),
        "only the first join registered a gateway"
    );
}

// ---------------------------------------------------------------------------------------
// Raw QUIC: what an attacker or a broken peer can send.

fn ca_der(w: &World) -> CertificateDer<'static> {
    let pem = std::fs::read(w.ca()).expect("ca");
    wardgate_common::pki::certs_from_pem("ca", &pem)
        .expect("pem")
        .remove(0)
}

async fn dial(
    quic: SocketAddr,
    ca: &CertificateDer<'static>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    let cfg = wardgate_common::tls::client_config(ca, identity).map_err(|e| e.to_string())?;
    let mut ep =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).map_err(|e| e.to_string())?;
    ep.set_default_client_config(cfg);
    let conn = ep
        .connect(quic, wardgate_common::pki::CONTROLLER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok((ep, conn))
}

/// Opens the control stream, writes `bytes`, and returns the controller's fatal error.
async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) -> Result<ServerMsg, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| e.to_string())?;
    let msg = tokio::time::timeout(
        Duration::from_secs(10),
        frame::read_frame::<_, ServerMsg>(&mut recv),
    )
    .await
    .map_err(|_| "no answer".to_string())?
    .map_err(|e| format!("{e} / close reason: {:?}", conn.close_reason()))?;
    msg.ok_or_else(|| format!("stream closed; close reason: {:?}", conn.close_reason()))
}

fn hello(version: u16) -> Vec<u8> {
    frame::encode(&ClientMsg::Hello {
        protocol_version: version,
        software: "attacker 0.0".into(),
    })
    .expect("encode")
}

fn fatal_code(m: Result<ServerMsg, String>) -> ErrorCode {
    match m {
        Ok(ServerMsg::Fatal(WireError { code, .. })) => code,
        other => panic!("expected a fatal error, got {other:?}"),
    }
}

#[test]
fn malformed_and_unauthenticated_traffic_is_refused_while_others_are_served() {
    let w = World::start(None, "info").expect("world");
    w.create_user("amara", PASSWORD).expect("user");
    let cl = w.dir.path().join("client");
    assert!(w.enrol(&cl, "amara", PASSWORD, "0s").expect("enrol").ok);
    let ca = ca_der(&w);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let still_served = || {
        let st = w.status(&cl).expect("status");
        assert_eq!(
            st["connection"], "connected",
            "the controller must keep serving: {st}"
        );
    };

    rt.block_on(async {
        // Wrong protocol version.
        let (_ep, c) = dial(w.quic, &ca, None).await.expect("dial");
        let code = fatal_code(send_raw(&c, &hello(99)).await);
        assert_eq!(code, ErrorCode::UnsupportedVersion);

        // Oversize frame: a length over the limit, before any hello.
        let (_ep, c) = dial(w.quic, &ca, None).await.expect("dial");
        let mut big = ((frame::MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
        big.extend_from_slice(&[b'{'; 1024]);
        assert_eq!(
            fatal_code(send_raw(&c, &big).await),
            ErrorCode::FrameTooLarge
        );

        // Oversize frame after a good hello.
        let (_ep, c) = dial(w.quic, &ca, None).await.expect("dial");
        let (mut send, mut recv) = c.open_bi().await.expect("bi");
        send.write_all(&hello(wardgate_common::proto::PROTOCOL_VERSION))
            .await
            .expect("hello");
        let welcome = frame::read_frame::<_, ServerMsg>(&mut recv)
            .await
            .expect("welcome");
        assert!(
            matches!(welcome, Some(ServerMsg::Welcome { .. })),
            "{welcome:?}"
        );
        send.write_all(&u32::MAX.to_be_bytes())
            .await
            .expect("write");
        let m = frame::read_frame::<_, ServerMsg>(&mut recv)
            .await
            .expect("fatal");
        assert!(
            matches!(
                m,
                Some(ServerMsg::Fatal(WireError {
                    code: ErrorCode::FrameTooLarge,
                    ..
                }))
            ),
            "{m:?}"
        );

        // Random bytes.
        let (_ep, c) = dial(w.quic, &ca, None).await.expect("dial");
        let noise: Vec<u8> = (0..512u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let code = fatal_code(send_raw(&c, &noise).await);
        assert!(
            matches!(code, ErrorCode::FrameTooLarge | ErrorCode::Malformed),
            "{code:?}"
        );

        // A well-sized frame of garbage.
        let (_ep, c) = dial(w.quic, &ca, None).await.expect("dial");
        let mut g = 16u32.to_be_bytes().to_vec();
        g.extend_from_slice(b"\x00\x01not json!!!!!!!");
        assert_eq!(fatal_code(send_raw(&c, &g).await), ErrorCode::Malformed);

        // Something other than a hello first.
        let (_ep, c) = dial(w.quic, &ca, None).await.expect("dial");
        let req = frame::encode(&ClientMsg::Request {
            id: 1,
            body: Request::WhoAmI,
        })
        .expect("enc");
        assert_eq!(
            fatal_code(send_raw(&c, &req).await),
            ErrorCode::ProtocolViolation
        );

        // No client certificate: hello is fine, but authenticated requests are refused.
        let cfg = wardgate_common::tls::client_config(&ca, None).expect("cfg");
        let mut anon =
            wardgate_common::transport::ControlClient::connect(&w.quic.to_string(), cfg, "test")
                .await
                .expect("anonymous hello is allowed");
        let err = anon
            .request(Request::WhoAmI)
            .await
            .expect_err("must need a certificate");
        assert_eq!(
            err.wire().map(|e| e.code),
            Some(ErrorCode::CertificateRequired)
        );
        let err = anon
            .request(Request::Heartbeat { seq: 1 })
            .await
            .expect_err("must need a certificate");
        assert_eq!(
            err.wire().map(|e| e.code),
            Some(ErrorCode::CertificateRequired)
        );

        // A certificate from another CA: the TLS handshake itself fails.
        let other = wardgate_controller::ca::Ca::generate("Evil Corp").expect("ca");
        let other =
            wardgate_controller::ca::Ca::load(&other.cert_pem, &other.key_pem).expect("load");
        let kc = wardgate_common::pki::generate_key_and_csr("evil").expect("csr");
        let cert = other
            .sign_csr(
                wardgate_controller::ca::LeafRole::Device,
                "device evil",
                &kc.csr_pem,
            )
            .expect("sign");
        let chain = wardgate_common::pki::certs_from_pem("c", cert.as_bytes()).expect("c");
        let key = wardgate_common::pki::key_from_pem("k", kc.key_pem.as_bytes()).expect("k");
        let outcome = match dial(w.quic, &ca, Some((chain, key))).await {
            Err(e) => e,
            Ok((_ep, c)) => {
                match send_raw(&c, &hello(wardgate_common::proto::PROTOCOL_VERSION)).await {
                    Err(e) => e,
                    Ok(m) => panic!("a foreign certificate was accepted: {m:?}"),
                }
            }
        };
        assert!(
            outcome.to_lowercase().contains("certificate") || outcome.contains("UnknownCA"),
            "expected a certificate refusal, got: {outcome}"
        );
    });
    still_served();
}

#[test]
fn revoked_device_and_gateway_are_cut_off() {
    let w = World::start(None, "info").expect("world");
    let (mut gw, _gw_dir, cl_dir) = join_run_enrol(&w);
    let dev = w.admin_json(&["device", "list"], None).expect("devices")[0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    w.admin_json(&["device", "revoke", &dev], None)
        .expect("revoke");
    let st = w.status(&cl_dir).expect("status");
    assert_eq!(st["connection"], "disconnected");
    assert_eq!(st["connection_error_code"], "certificate_revoked", "{st}");
    assert!(
        st["connection_error"]
            .as_str()
            .unwrap_or_default()
            .contains("revoked by an administrator"),
        "{st}"
    );
    // Re-enrolling from the same directory is refused locally; a stolen laptop's key stays dead.
    let gid = w.admin_json(&["gateway", "list"], None).expect("gws")[0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    w.admin_json(&["gateway", "revoke", &gid], None)
        .expect("revoke gw");
    // The running gateway is disconnected at once and, refused for good, stops with a clear error.
    let exit = gw
        .wait_exit(Duration::from_secs(20))
        .expect("gateway exits");
    assert!(!exit.success());
    let err = gw.stderr_text();
    assert!(err.contains("revoked"), "{err}");
    let gws = w.admin_json(&["gateway", "list"], None).expect("gws");
    assert_eq!(gws[0]["status"], "revoked");
    assert_eq!(gws[0]["online"], false);
}

#[test]
fn wrong_admin_token_is_refused() {
    let w = World::start(None, "info").expect("world");
    let mut cmd =
        std::process::Command::new(wardgate::harness::bin("wardgate-controller").expect("bin"));
    cmd.env("WARDGATE_ADMIN_TOKEN", "wga_not-a-real-token")
        .arg("--data-dir")
        .arg(&w.data_dir)
        .args(["admin", "user", "list"]);
    let r = wardgate::harness::run(cmd, None, &w.logs.join("admin-cli.err")).expect("run");
    assert!(!r.ok);
    assert!(
        r.stderr.contains("not recognised") && r.stderr.contains("HTTP 401"),
        "{}",
        r.stderr
    );

    // Without any Authorization header, and with the right one, over raw HTTPS.
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let ca = std::fs::read(w.ca()).expect("ca");
        let bad = wardgate_controller::admin::cli::AdminClient::new(w.admin, &ca, String::new())
            .expect("client");
        let e = bad
            .get::<serde_json::Value>("/api/v1/users")
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("401"), "{e}");
        let good =
            wardgate_controller::admin::cli::AdminClient::new(w.admin, &ca, w.admin_token.clone())
                .expect("c");
        let users: serde_json::Value = good.get("/api/v1/users").await.expect("users");
        assert!(users.is_array());
    });
}

#[test]
fn no_secret_reaches_any_log_even_at_trace() {
    let w = World::start(None, "trace").expect("world");
    let (_gw, gw_dir, cl_dir) = join_run_enrol(&w);
    let token = w
        .join_token("gw-two", "10.30.0.0/16", "10m")
        .expect("token");
    let r = w
        .gateway_join(&w.dir.path().join("gw-two"), &token, &[])
        .expect("join");
    assert!(r.ok);
    let logs = w.all_logs();
    assert!(
        logs.len() > 10_000,
        "trace logging should be voluminous; got {} bytes",
        logs.len()
    );
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).expect("read");
    let key_body = |pem: String| -> Vec<String> {
        pem.lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 16)
            .map(str::to_owned)
            .collect()
    };
    let mut secrets = vec![w.admin_token.clone(), token.clone(), PASSWORD.to_owned()];
    secrets.extend(key_body(read(w.data_dir.join("ca.key"))));
    secrets.extend(key_body(read(w.data_dir.join("controller.key"))));
    secrets.extend(key_body(read(gw_dir.join("gateway.key"))));
    secrets.push(read(gw_dir.join("wg.key")).trim().to_owned());
    secrets.extend(key_body(read(cl_dir.join("device.key"))));
    for s in &secrets {
        assert!(s.len() >= 16, "secret too short to search for");
        // Search for a distinctive part, so a truncated or re-wrapped copy is found too.
        let needle = &s[s.len() / 4..s.len() / 4 + 12];
        assert!(
            !logs.contains(needle),
            "a secret fragment {needle:?} appears in the logs"
        );
    }
}
