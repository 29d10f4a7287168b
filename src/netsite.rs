//! The whole product in network namespaces, for the scenario tests: the controller and the
//! gateway in the gateway namespace, clinicians' and vendors' laptops in the client namespace,
//! and the clinical systems of SCENARIOS.md in the resource namespace. Everything runs as the
//! real binaries; the 10.x addresses exist only inside these namespaces.
//!
//! ```text
//!  client ns                gateway ns                               resource ns
//!  laptops (wardgate) ─veth─ controller (QUIC on 10.99.1.1)  ─veth─  10.10.1.10 ehr-web :443
//!  10.99.1.2                 gateway (WireGuard 10.99.1.1:51820)      10.10.1.11 ehr-db :5432
//!                            10.10.1.1, 10.20.5.1                     10.20.5.5 mri-console :5900 :22
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::harness::{Placement, Proc, Ran, World, bin, ns_command, run, wait_for};
use crate::netns::Topology;

/// Every test account's password.
pub const PASSWORD: &str = "correct horse battery staple";

/// ehr-web, as clients reach it.
pub const EHR_WEB: &str = "10.10.1.10:443";
/// ehr-db.
pub const EHR_DB: &str = "10.10.1.11:5432";
/// The MRI console's VNC port.
pub const MRI_VNC: &str = "10.20.5.5:5900";
/// The MRI console's SSH port.
pub const MRI_SSH: &str = "10.20.5.5:22";
/// Another device on the MRI subnet (not granted to anyone).
pub const MRI_OTHER: &str = "10.20.5.6:5900";

/// A running site; dropping it stops every process and deletes the namespaces.
pub struct NetSite {
    /// The controller and the CLIs (placed in the namespaces).
    pub w: World,
    /// The gateway process (`None` while stopped).
    pub gateway: Option<Proc>,
    /// The gateway's state directory.
    pub gw_dir: PathBuf,
    /// The gateway's local control socket.
    pub socket: PathBuf,
    /// `tun` or `userspace`.
    pub gateway_mode: &'static str,
    servers: Vec<Proc>,
    /// The namespaces (dropped last: kills whatever is still inside).
    pub topo: Topology,
}

fn write_json(dir: &Path, name: &str, v: serde_json::Value) -> anyhow::Result<String> {
    let p = dir.join(name);
    std::fs::write(&p, v.to_string())?;
    Ok(p.display().to_string())
}

impl NetSite {
    /// Builds the site. Grants last at most `max_grant`; the gateway runs in `gateway_mode`.
    pub fn start(max_grant: &str, gateway_mode: &'static str) -> anyhow::Result<Self> {
        Self::start_at(max_grant, gateway_mode, None)
    }

    /// Like [`NetSite::start`], with every process (controller, gateway, laptops) on a test
    /// clock that starts at `clock_ms` when given (see [`World::set_clock`]).
    pub fn start_at(
        max_grant: &str,
        gateway_mode: &'static str,
        clock_ms: Option<i64>,
    ) -> anyhow::Result<Self> {
        let topo = Topology::new(1)?;
        topo.add_resource_network("10.20.5.1/24", &["10.20.5.5/24", "10.20.5.6/24"])?;
        let w = World::start_placed(
            None,
            "info",
            Placement {
                controller: Some((topo.gateway.name.clone(), IpAddr::V4(topo.gateway_outer))),
                client_ns: Some(topo.client.name.clone()),
                test_clock_ms: clock_ms,
            },
        )?;
        let node = bin("wardgate-bench")?;
        let mut servers = Vec::new();
        for (what, addr) in [
            ("http", EHR_WEB),
            ("http", EHR_DB),
            ("http", "10.10.1.11:443"),
            ("sink", MRI_VNC),
            ("http", MRI_SSH),
            ("http", MRI_OTHER),
        ] {
            let mut c = topo.resource.command(&node);
            c.args(["node", what, "--listen", addr]);
            servers.push(Proc::spawn(c, &w.logs, &format!("server-{addr}"))?);
        }
        let mut site = Self {
            w,
            gateway: None,
            gw_dir: PathBuf::new(),
            socket: PathBuf::new(),
            gateway_mode,
            servers,
            topo,
        };
        site.populate(max_grant)?;
        Ok(site)
    }

    fn populate(&mut self, max_grant: &str) -> anyhow::Result<()> {
        let w = &self.w;
        for u in ["amara", "pat", "acme-eng"] {
            w.create_user(u, PASSWORD)?;
        }
        for g in ["clinicians", "dba", "vendor-acme"] {
            w.admin_json(&["group", "create", g], None)?;
        }
        w.admin_json(&["group", "add-member", "clinicians", "amara"], None)?;
        w.admin_json(&["group", "add-member", "vendor-acme", "acme-eng"], None)?;
        let token = w.join_token("gw-main", "10.0.0.0/8", "10m")?;
        self.gw_dir = w.dir.path().join("gateway");
        self.socket = self.gw_dir.join("gateway.sock");
        let mut cmd = ns_command(Some(&self.topo.gateway.name), &bin("wardgate-gateway")?);
        cmd.env("WARDGATE_JOIN_TOKEN", &token)
            .arg("--state-dir")
            .arg(&self.gw_dir)
            .args(["join", "--controller", &w.quic.to_string(), "--ca"])
            .arg(w.ca())
            .args(["--endpoint", &format!("{}:51820", self.topo.gateway_outer)]);
        let r = run(cmd, None, &w.logs.join("gw-join.err"))?;
        if !r.ok {
            bail!("gateway join failed: {}", r.stderr);
        }
        self.start_gateway()?;
        let d = self.w.dir.path().to_path_buf();
        for (name, addr, rules) in [
            ("ehr-web", "10.10.1.10/32", vec![("tcp", "443")]),
            ("ehr-db", "10.10.1.11/32", vec![("tcp", "5432")]),
            (
                "mri-console",
                "10.20.5.5/32",
                vec![("tcp", "5900"), ("tcp", "22")],
            ),
        ] {
            let rules: Vec<_> = rules
                .iter()
                .map(|(p, port)| serde_json::json!({"dst": addr, "proto": p, "ports": port}))
                .collect();
            let f = write_json(
                &d,
                &format!("{name}.json"),
                serde_json::json!({"name": name, "addresses": [addr], "rules": rules,
                    "gateways": ["gw-main"], "labels": ["phi"]}),
            )?;
            self.w
                .admin_json(&["resource", "put", "--file", &f], None)?;
        }
        for (name, group, res) in [
            ("clinicians-ehr", "clinicians", "ehr-web"),
            ("dba-db", "dba", "ehr-db"),
            ("acme-mri", "vendor-acme", "mri-console"),
        ] {
            let f = write_json(
                &d,
                &format!("{name}.json"),
                serde_json::json!({"name": name, "groups": [group], "resources": [res],
                    "conditions": {"mfa_required": false, "max_grant": max_grant, "session_lifetime": "8h"}}),
            )?;
            self.w.admin_json(&["policy", "put", "--file", &f], None)?;
        }
        Ok(())
    }

    /// Starts (or restarts) `wardgate-gateway run` and waits until it has resynced its grants
    /// with the controller, unless `wait_resync` is false (controller down).
    pub fn start_gateway(&mut self) -> anyhow::Result<()> {
        self.start_gateway_with(true)
    }

    /// [`NetSite::start_gateway`], optionally without waiting for the resync.
    pub fn start_gateway_with(&mut self, wait_resync: bool) -> anyhow::Result<()> {
        let mut cmd = ns_command(Some(&self.topo.gateway.name), &bin("wardgate-gateway")?);
        cmd.env("RUST_LOG", "info")
            .arg("--state-dir")
            .arg(&self.gw_dir);
        if let Some(f) = &self.w.test_clock {
            cmd.arg("--test-clock").arg(f);
        }
        cmd.args([
            "run",
            "--heartbeat",
            "1s",
            "--max-backoff",
            "1s",
            "--mode",
            self.gateway_mode,
            "--listen",
            &format!("{}:51820", self.topo.gateway_outer),
        ])
        .arg("--socket")
        .arg(&self.socket);
        let log = self.w.logs.join("gateway.err");
        let before =
            std::fs::read_to_string(&log).map_or(0, |s| s.matches("grants resynced").count());
        let p = Proc::spawn(cmd, &self.w.logs, "gateway")?;
        self.gateway = Some(p);
        if wait_resync {
            wait_for(Duration::from_secs(30), "the gateway to resync", || {
                let n = std::fs::read_to_string(&log)
                    .map_or(0, |s| s.matches("grants resynced").count());
                (n > before).then_some(())
            })?;
        } else {
            wait_for(Duration::from_secs(30), "the gateway's data plane", || {
                self.gateway_stats().ok().map(|_| ())
            })?;
        }
        Ok(())
    }

    /// Kills the gateway at once (a crash).
    pub fn kill_gateway(&mut self) {
        if let Some(mut g) = self.gateway.take() {
            g.kill();
        }
    }

    /// `wardgate-gateway ARGS --socket S` (the operator's tool on the gateway host).
    pub fn gateway_cli(&self, args: &[&str]) -> anyhow::Result<Ran> {
        let mut c = Command::new(bin("wardgate-gateway")?);
        c.args(args).arg("--socket").arg(&self.socket);
        run(c, None, &self.w.logs.join("gateway-cli.err"))
    }

    /// The gateway's counters (`wardgate-gateway stats`).
    pub fn gateway_stats(&self) -> anyhow::Result<serde_json::Value> {
        let r = self.gateway_cli(&["stats"])?;
        if !r.ok {
            bail!("stats: {}", r.stderr);
        }
        Ok(serde_json::from_str(&r.stdout)?)
    }

    /// The grants installed at the gateway.
    pub fn gateway_grants(&self) -> Vec<serde_json::Value> {
        self.gateway_stats()
            .ok()
            .and_then(|v| v["grants"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Drops counted at the gateway for `reason`, over all grants.
    pub fn drops(&self, reason: &str) -> u64 {
        self.gateway_grants()
            .iter()
            .flat_map(|g| g["dropped"].as_array().cloned().unwrap_or_default())
            .filter(|e| e[0] == reason)
            .filter_map(|e| e[1].as_u64())
            .sum()
    }

    /// Enrols a laptop for `user` (config directory returned).
    pub fn laptop(&self, user: &str) -> anyhow::Result<PathBuf> {
        let cfg = self.w.dir.path().join(format!("{user}-laptop"));
        let r = self.w.enrol(&cfg, user, PASSWORD, "0s")?;
        if !r.ok {
            bail!("enrolment of {user}'s laptop failed: {}", r.stderr);
        }
        Ok(cfg)
    }

    /// Starts `wardgate connect RESOURCE --mode tun` on a laptop and waits for the grant.
    pub fn connect(&self, cfg: &Path, resource: &str) -> anyhow::Result<(Proc, Duration)> {
        let mut cmd = self.w.client_cmd(cfg)?;
        cmd.args(["connect", resource, "--mode", "tun"]);
        let t0 = Instant::now();
        let name = format!(
            "connect-{}-{resource}",
            cfg.file_name().and_then(|n| n.to_str()).unwrap_or("laptop")
        );
        let mut p = Proc::spawn(cmd, &self.w.logs, &name)?;
        wait_for(Duration::from_secs(30), "the grant", || {
            if !p.running() {
                return Some(Err(anyhow::anyhow!("connect exited: {}", p.stderr_text())));
            }
            let st = self.w.status(cfg).ok()?;
            st["grant"]["grant_id"].as_u64().map(|_| Ok(()))
        })??;
        Ok((p, t0.elapsed()))
    }

    /// `wardgate connect` expected to be refused; returns its stderr.
    pub fn connect_refused(&self, cfg: &Path, resource: &str) -> anyhow::Result<String> {
        let mut cmd = self.w.client_cmd(cfg)?;
        cmd.args(["connect", resource, "--mode", "tun"]);
        let r = run(cmd, None, &self.w.logs.join("refused.err"))?;
        if r.ok {
            bail!("connect {resource} was not refused");
        }
        Ok(r.stderr)
    }

    /// `wardgate-bench node ARGS` in the client namespace; stdout on success.
    pub fn client_node(&self, args: &[&str]) -> Option<String> {
        let mut c = self.topo.client.command(&bin("wardgate-bench").ok()?);
        c.arg("node").args(args);
        let out = c.output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An HTTP GET from the client namespace (through whatever tunnel routes it).
    pub fn get(&self, to: &str) -> Option<String> {
        self.client_node(&["get", "--to", to, "--timeout", "2s"])
    }

    /// Whether anything answers a TCP connect from the client namespace.
    pub fn answers(&self, to: &str) -> bool {
        self.client_node(&["probe", "--to", to, "--timeout", "1s"])
            .is_some()
    }

    /// The audit log as JSON lines (`audit export`).
    pub fn audit_export(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let r = self.w.audit(&["export"])?;
        if !r.ok {
            bail!("audit export: {}", r.stderr);
        }
        r.stdout
            .lines()
            .map(|l| serde_json::from_str(l).context("an export line is not JSON"))
            .collect()
    }

    /// Sets how often devices report their posture (`settings set --posture-interval`).
    pub fn set_posture_interval(&self, interval: &str) -> anyhow::Result<()> {
        self.w
            .admin_json(&["settings", "set", "--posture-interval", interval], None)?;
        Ok(())
    }

    /// Creates or replaces a posture profile (`posture-profile put`).
    pub fn put_posture_profile(&self, profile: serde_json::Value) -> anyhow::Result<()> {
        let name = profile["name"]
            .as_str()
            .context("the profile has no name")?;
        let f = write_json(
            self.w.dir.path(),
            &format!("posture-{name}.json"),
            profile.clone(),
        )?;
        self.w
            .admin_json(&["posture-profile", "put", "--file", &f], None)?;
        Ok(())
    }

    /// Replaces policy `name` (one group, one resource, no MFA, 8 h sessions), optionally
    /// naming a posture profile.
    pub fn put_policy(
        &self,
        name: &str,
        group: &str,
        resource: &str,
        max_grant: &str,
        posture_profile: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut conditions = serde_json::json!({"mfa_required": false, "max_grant": max_grant,
            "session_lifetime": "8h"});
        if let Some(p) = posture_profile {
            conditions["posture_profile"] = p.into();
        }
        let f = write_json(
            self.w.dir.path(),
            &format!("{name}.json"),
            serde_json::json!({"name": name, "groups": [group], "resources": [resource],
                "conditions": conditions}),
        )?;
        self.w.admin_json(&["policy", "put", "--file", &f], None)?;
        Ok(())
    }

    /// Creates or replaces a policy from its JSON document (`policy put`).
    pub fn put_policy_json(&self, policy: serde_json::Value) -> anyhow::Result<()> {
        let name = policy["name"].as_str().context("the policy has no name")?;
        let f = write_json(self.w.dir.path(), &format!("{name}.json"), policy.clone())?;
        self.w.admin_json(&["policy", "put", "--file", &f], None)?;
        Ok(())
    }

    /// `wardgate ARGS` on a laptop (in the client namespace).
    pub fn laptop_cmd(&self, cfg: &Path, args: &[&str]) -> anyhow::Result<Ran> {
        let mut cmd = self.w.client_cmd(cfg)?;
        cmd.args(args);
        run(cmd, None, &self.w.logs.join("laptop-cli.err"))
    }

    /// Applies an nftables script in the client namespace (the laptops' host firewall).
    pub fn client_nft(&self, script: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let mut c = self.topo.client.command(Path::new("nft"));
        c.args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c
            .spawn()
            .context("cannot run nft in the client namespace")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// A device's id by its owner's name.
    pub fn device_of(&self, user: &str) -> anyhow::Result<String> {
        let list = self.w.admin_json(&["device", "list"], None)?;
        list.as_array()
            .and_then(|l| l.iter().find(|d| d["owner"] == user))
            .and_then(|d| d["id"].as_str())
            .map(str::to_owned)
            .with_context(|| format!("no device of {user} in {list}"))
    }
}

impl Drop for NetSite {
    fn drop(&mut self) {
        self.kill_gateway();
        for s in &mut self.servers {
            s.kill();
        }
        self.w.stop_controller();
    }
}
