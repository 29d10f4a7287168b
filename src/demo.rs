//! The all-in-one demo (`cargo run --release -- demo`): a controller on SQLite in a temp dir, a
//! gateway and a client in userspace mode (no root), and a sample clinical web resource on
//! loopback, playing three stories from SCENARIOS.md with the real binaries:
//!
//! - S1: amara (clinician) connects to `ehr-web` and reaches it through her grant;
//! - S2: amara asks for `ehr-db` and is denied, with the reason in words;
//! - S7: amara's laptop is stolen; the security admin revokes it and the flow is cut at once.
//!
//! Then the audit chain is verified and one exported line is shown.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::harness::{Proc, World, bin, free_port, run, wait_for};

const PASSWORD: &str = "correct horse battery staple";

fn say(s: &str) {
    println!("{s}");
}

fn step(s: &str) {
    println!("\n== {s}");
}

fn write_json(dir: &Path, name: &str, v: serde_json::Value) -> anyhow::Result<String> {
    let p = dir.join(name);
    std::fs::write(&p, v.to_string())?;
    Ok(p.display().to_string())
}

fn get(local: u16) -> Option<String> {
    let out = Command::new(bin("wardgate-bench").ok()?)
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
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A running site: controller, gateway (userspace, resource published as 10.10.1.10:443 and
/// dialled on loopback), the sample EHR, resources `ehr-web`/`ehr-db`, policies for
/// `clinicians`/`dba`, and amara's enrolled laptop.
pub struct Site {
    /// Controller and CLIs.
    pub w: World,
    /// The gateway process.
    pub gateway: Proc,
    /// The sample EHR web server.
    pub resource: Proc,
    /// amara's laptop's config directory.
    pub client: std::path::PathBuf,
    /// The gateway's local control socket (counters: `wardgate-gateway stats --socket`).
    pub socket: std::path::PathBuf,
}

/// Sets up a [`Site`] whose grants last at most `max_grant` (e.g. `"20s"`).
pub fn site(max_grant: &str) -> anyhow::Result<Site> {
    let w = World::start(None, "warn")?;
    for u in ["amara", "pat"] {
        w.create_user(u, PASSWORD)?;
    }
    for g in ["clinicians", "dba"] {
        w.admin_json(&["group", "create", g], None)?;
    }
    w.admin_json(&["group", "add-member", "clinicians", "amara"], None)?;
    let http_port = free_port();
    let mut c = Command::new(bin("wardgate-bench")?);
    c.args([
        "node",
        "http",
        "--listen",
        &format!("127.0.0.1:{http_port}"),
    ]);
    let resource = Proc::spawn(c, &w.logs, "resource")?;
    let gw_port = free_port();
    let token = w.join_token("gw-ehr", "10.10.0.0/16", "10m")?;
    let gw_dir = w.dir.path().join("gateway");
    let mut cmd = Command::new(bin("wardgate-gateway")?);
    cmd.env("WARDGATE_JOIN_TOKEN", &token)
        .arg("--state-dir")
        .arg(&gw_dir)
        .args(["join", "--controller", &w.quic.to_string(), "--ca"])
        .arg(w.ca())
        .args(["--endpoint", &format!("127.0.0.1:{gw_port}")]);
    let r = run(cmd, None, &w.logs.join("gw-join.err"))?;
    if !r.ok {
        bail!("gateway join failed: {}", r.stderr);
    }
    let socket = gw_dir.join("gateway.sock");
    let mut cmd = Command::new(bin("wardgate-gateway")?);
    cmd.env("RUST_LOG", "info")
        .arg("--state-dir")
        .arg(&gw_dir)
        .args([
            "run",
            "--heartbeat",
            "2s",
            "--max-backoff",
            "1s",
            "--mode",
            "userspace",
        ])
        .args(["--listen", &format!("127.0.0.1:{gw_port}")])
        .arg("--socket")
        .arg(&socket)
        .args(["--map", &format!("10.10.1.10:443=127.0.0.1:{http_port}")])
        // PACS (break-glass tests, S6): published as 10.10.2.20:443, the same sample server.
        .args(["--map", &format!("10.10.2.20:443=127.0.0.1:{http_port}")]);
    let gateway = Proc::spawn(cmd, &w.logs, "gateway")?;
    wait_for(Duration::from_secs(20), "the gateway to connect", || {
        std::fs::read_to_string(&gateway.stderr)
            .ok()
            .filter(|s| s.contains("grants resynced"))
            .map(|_| ())
    })?;
    let d = w.dir.path().to_path_buf();
    let f = write_json(
        &d,
        "ehr-web.json",
        serde_json::json!({
        "name": "ehr-web", "addresses": ["10.10.1.10/32"],
        "rules": [{"dst": "10.10.1.10/32", "proto": "tcp", "ports": "443"}],
        "gateways": ["gw-ehr"], "labels": ["phi"]}),
    )?;
    w.admin_json(&["resource", "put", "--file", &f], None)?;
    let f = write_json(
        &d,
        "ehr-db.json",
        serde_json::json!({
        "name": "ehr-db", "addresses": ["10.10.1.11/32"],
        "rules": [{"dst": "10.10.1.11/32", "proto": "tcp", "ports": "5432"}],
        "gateways": ["gw-ehr"], "labels": ["phi"]}),
    )?;
    w.admin_json(&["resource", "put", "--file", &f], None)?;
    for (name, group, res) in [
        ("clinicians-ehr", "clinicians", "ehr-web"),
        ("dba-db", "dba", "ehr-db"),
    ] {
        let f = write_json(
            &d,
            &format!("{name}.json"),
            serde_json::json!({
            "name": name, "groups": [group], "resources": [res],
            "conditions": {"mfa_required": false, "max_grant": max_grant, "session_lifetime": "8h"}}),
        )?;
        w.admin_json(&["policy", "put", "--file", &f], None)?;
    }
    let client = w.dir.path().join("amara-laptop");
    let r = w.enrol(&client, "amara", PASSWORD, "0s")?;
    if !r.ok {
        bail!("enrolment failed: {}", r.stderr);
    }
    Ok(Site {
        w,
        gateway,
        resource,
        client,
        socket,
    })
}

/// Plays the demo; returns an error (and a non-zero exit) if any story does not hold.
pub fn run_demo() -> anyhow::Result<()> {
    let started = Instant::now();
    step(
        "Setting up: controller (SQLite), users and groups, a sample EHR, gateway gw-ehr, policies, amara's laptop",
    );
    let site = site("20s")?;
    let w = &site.w;
    let cfg = site.client.clone();
    say(&format!(
        "controller: QUIC {} · admin API https://{}",
        w.quic, w.admin
    ));
    say("users amara (clinicians) and pat; groups clinicians, dba");
    say("a sample EHR web server on loopback, published to clients as 10.10.1.10:443");
    say(
        "gateway gw-ehr joined with a single-use token; runs in userspace mode (no root) and resynced its grants",
    );
    say("ehr-web (10.10.1.10 tcp/443, phi) for clinicians; ehr-db (10.10.1.11 tcp/5432) for dba;");
    say("grants last at most 20 s (compressed) and renew themselves with a fresh key");
    say("amara enrolled her laptop (device key made on the laptop, CSR signed by the controller)");

    step("S1: amara runs `wardgate connect ehr-web --mode userspace --forward PORT`");
    let local = free_port();
    let mut cmd = w.client_cmd(&cfg)?;
    cmd.args([
        "connect",
        "ehr-web",
        "--mode",
        "userspace",
        "--forward",
        &local.to_string(),
    ]);
    let t0 = Instant::now();
    let mut conn = Proc::spawn(cmd, &w.logs, "connect")?;
    let body = wait_for(
        Duration::from_secs(20),
        "ehr-web through the tunnel",
        || get(local),
    )?;
    say(&format!(
        "decision: ALLOW (policy clinicians-ehr) — first byte from the EHR after {:?}",
        t0.elapsed()
    ));
    say(&format!("the EHR answered through the tunnel: {body:?}"));
    let st = w.status(&cfg)?;
    say(&format!(
        "status: grant {} for {}, renewal {}",
        st["grant"]["grant_id"], st["grant"]["resource"], st["grant"]["renewal"]
    ));

    say("waiting for the 20 s grant to renew itself (a new decision and a fresh key) …");
    let first = st["grant"]["grant_id"].clone();
    let renewed = wait_for(Duration::from_secs(30), "the grant to renew", || {
        let st = w.status(&cfg).ok()?;
        (st["grant"]["grant_id"] != first && st["grant"]["renewal"] == "renewed").then_some(st)
    })?;
    let body = wait_for(Duration::from_secs(10), "ehr-web after renewal", || {
        get(local)
    })?;
    say(&format!(
        "renewed: grant {} → {}; the EHR still answers: {body:?}",
        first, renewed["grant"]["grant_id"]
    ));

    step("S2: amara asks for ehr-db");
    let mut cmd = w.client_cmd(&cfg)?;
    cmd.args([
        "connect",
        "ehr-db",
        "--mode",
        "userspace",
        "--forward",
        &free_port().to_string(),
    ]);
    let r = run(cmd, None, &w.logs.join("s2.err"))?;
    if r.ok {
        bail!("S2: ehr-db must be denied");
    }
    say(&format!(
        "decision: DENY — what amara sees:\n{}",
        r.stderr.trim()
    ));

    step("S7: amara's laptop is stolen; pat revokes the device");
    let dev = w.admin_json(&["device", "list"], None)?[0]["id"]
        .as_str()
        .context("device id")?
        .to_owned();
    let t0 = Instant::now();
    w.admin_json(&["device", "revoke", &dev], None)?;
    say(&format!(
        "revoked {dev}; the gateway confirmed the peer removal within {:?}",
        t0.elapsed()
    ));
    if get(local).is_some() {
        bail!("S7: the flow must be cut after the revoke");
    }
    say("the EHR no longer answers through the laptop's forward");
    let exit = conn.wait_exit(Duration::from_secs(20))?;
    let told = conn.stderr_text();
    say(&format!(
        "the client stopped (exit {exit}) and said: {}",
        told.lines().last().unwrap_or("").trim()
    ));

    step("The auditor verifies the hash-chained audit log");
    let mut cmd = Command::new(bin("wardgate-controller")?);
    cmd.arg("--data-dir")
        .arg(&w.data_dir)
        .args(["audit", "verify"]);
    let r = run(cmd, None, &w.logs.join("audit.err"))?;
    if !r.ok {
        bail!("audit verify failed: {}", r.stderr);
    }
    say(r.stdout.trim());
    let mut cmd = Command::new(bin("wardgate-controller")?);
    cmd.arg("--data-dir")
        .arg(&w.data_dir)
        .args(["audit", "export"]);
    let r = run(cmd, None, &w.logs.join("audit.err"))?;
    if let Some(line) = r
        .stdout
        .lines()
        .find(|l| l.contains("\"deny\"") && l.contains("access.decide"))
    {
        let v: serde_json::Value = serde_json::from_str(line)?;
        say(&format!(
            "e.g. {} {} {} {} → {}: {}",
            v["at"], v["actor"], v["action"], v["target"], v["outcome"], v["detail"]["reasons"]
        ));
    }
    println!(
        "\nDemo complete in {:?}: S1, S2 and S7 held.",
        started.elapsed()
    );
    Ok(())
}
