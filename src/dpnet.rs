//! A whole data-plane test network: the three namespaces of [`crate::netns::Topology`], test
//! servers in the resource namespace, a `wardgate-gateway dataplane` in the gateway namespace
//! with grants installed through its local socket, and a `wardgate tunnel` client in the client
//! namespace, in any mix of `tun` and `userspace` modes. Shared by the end-to-end tests and the
//! data-plane bench.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use wardgate_common::grant::{ClientGrant, GatewayGrant};
use wardgate_common::proto::Secret;
use wardgate_common::rule::Rule;

use crate::harness::{Proc, bin, run, wait_for};
use crate::netns::Topology;

/// The granted web resource.
pub const WEB: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 10, 1, 10)), 443);
/// Another port on the granted host (not granted).
pub const WEB_OTHER_PORT: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 10, 1, 10)), 8080);
/// Another host in the same subnet (not granted).
pub const OTHER_HOST: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 10, 1, 11)), 443);
/// The granted bulk-transfer sink.
pub const SINK: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 10, 1, 10)), 5001);
/// The granted UDP echo (DNS port).
pub const ECHO: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 10, 1, 10)), 53);
/// A server on the client, which resources must never be able to reach.
pub const CLIENT_SERVICE_PORT: u16 = 2222;
/// The first client's tunnel address.
pub const TUNNEL_A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
/// The second client's tunnel address.
pub const TUNNEL_B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);
/// A third client (grant 3), the misbehaving one.
pub const TUNNEL_C: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 5);

/// `tun` or `userspace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Kernel TUN device.
    Tun,
    /// Userspace TCP/IP stack.
    Userspace,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Tun => "tun",
            Mode::Userspace => "userspace",
        }
    }
}

/// One grant as written to disk for the client and the attacker.
pub struct GrantFiles {
    /// The client's view.
    pub grant: ClientGrant,
    /// Its JSON file.
    pub grant_file: PathBuf,
    /// Its private key file.
    pub key_file: PathBuf,
}

/// The running network.
pub struct DpNet {
    /// Namespaces (dropped last: kills every process inside).
    pub topo: Topology,
    /// Files.
    pub dir: tempfile::TempDir,
    /// The gateway's local control socket.
    pub socket: PathBuf,
    /// The gateway's WireGuard endpoint.
    pub endpoint: SocketAddr,
    /// The gateway's public key.
    pub gateway_public: String,
    /// Client mode.
    pub client_mode: Mode,
    /// Grant A (the client's) and grant B (a second client's key, for spoofing tests).
    pub grants: Vec<GrantFiles>,
    procs: Vec<Proc>,
    gateway_index: usize,
}

fn ms_now() -> i64 {
    wardgate_common::unix_ms(SystemTime::now())
}

/// The test grants' default rules: tcp/443, tcp/5001 and udp/53 on 10.10.1.10.
pub fn rules() -> Vec<Rule> {
    rules_for(&["tcp 443", "tcp 5001", "udp 53"])
}

/// Rules on 10.10.1.10 from `"PROTO PORT"` strings.
pub fn rules_for(list: &[&str]) -> Vec<Rule> {
    list.iter()
        .filter_map(|s| {
            let (proto, port) = s.split_once(' ')?;
            serde_json::from_value(
                serde_json::json!({"dst": "10.10.1.10/32", "proto": proto, "ports": port}),
            )
            .ok()
        })
        .collect()
}

impl DpNet {
    /// Builds the network and starts the gateway (in `gateway_mode`) and the test servers.
    /// Grants are installed with [`DpNet::install_grant`]; the client starts with
    /// [`DpNet::start_client`].
    pub fn start(gateway_mode: Mode, client_mode: Mode) -> anyhow::Result<Self> {
        let topo = Topology::new(1)?;
        let dir = tempfile::Builder::new().prefix("wardgate-dp").tempdir()?;
        let logs = dir.path().to_path_buf();
        let mut procs = Vec::new();
        let node = bin("wardgate-bench")?;
        for (what, addr) in [
            ("http", WEB),
            ("http", WEB_OTHER_PORT),
            ("http", OTHER_HOST),
            ("sink", SINK),
            ("udp-echo", ECHO),
        ] {
            let mut c = topo.resource.command(&node);
            c.args(["node", what, "--listen", &addr.to_string()]);
            procs.push(Proc::spawn(
                c,
                &logs,
                &format!("resource-{what}-{}", addr.port()),
            )?);
        }
        let mut c = topo.client.command(&node);
        c.args([
            "node",
            "http",
            "--listen",
            &format!("0.0.0.0:{CLIENT_SERVICE_PORT}"),
        ]);
        procs.push(Proc::spawn(c, &logs, "client-service")?);

        let key = dir.path().join("gateway-wg.key");
        let out = Command::new(bin("wardgate-gateway")?)
            .args(["genkey", "--out"])
            .arg(&key)
            .output()?;
        if !out.status.success() {
            bail!("genkey: {}", String::from_utf8_lossy(&out.stderr));
        }
        let gateway_public = String::from_utf8(out.stdout)?.trim().to_owned();
        let endpoint = SocketAddr::new(IpAddr::V4(topo.gateway_outer), 51820);
        let socket = dir.path().join("gateway.sock");
        let mut c = topo.gateway.command(&bin("wardgate-gateway")?);
        c.env("RUST_LOG", "info")
            .args([
                "dataplane",
                "--listen",
                &endpoint.to_string(),
                "--mode",
                gateway_mode.as_str(),
                "--key-file",
            ])
            .arg(&key)
            .arg("--socket")
            .arg(&socket);
        let gw = Proc::spawn(c, &logs, "gateway")?;
        let out_path = gw.stdout.clone();
        let gateway_index = procs.len();
        procs.push(gw);
        wait_for(
            Duration::from_secs(20),
            "the gateway data plane to listen",
            || {
                std::fs::read_to_string(&out_path)
                    .ok()
                    .filter(|s| s.contains("listening="))
                    .map(|_| ())
            },
        )?;
        let mut net = Self {
            topo,
            dir,
            socket,
            endpoint,
            gateway_public,
            client_mode,
            grants: Vec::new(),
            procs,
            gateway_index,
        };
        for (id, addr) in [(1u64, TUNNEL_A), (2, TUNNEL_B), (3, TUNNEL_C)] {
            net.make_grant(id, addr, Duration::from_secs(3600))?;
        }
        // The servers are up once they answer from inside their namespace.
        wait_for(Duration::from_secs(10), "the test servers", || {
            net.topo
                .resource
                .exec(&[
                    bin("wardgate-bench").ok()?.to_str()?,
                    "node",
                    "probe",
                    "--to",
                    &WEB.to_string(),
                ])
                .ok()
        })?;
        Ok(net)
    }

    /// Writes a grant (client key made here, as the client would) and returns its index.
    pub fn make_grant(
        &mut self,
        id: u64,
        tunnel: Ipv4Addr,
        valid: Duration,
    ) -> anyhow::Result<usize> {
        self.make_grant_with(id, tunnel, valid, rules())
    }

    /// Like [`DpNet::make_grant`] with explicit rules.
    pub fn make_grant_with(
        &mut self,
        id: u64,
        tunnel: Ipv4Addr,
        valid: Duration,
        rules: Vec<Rule>,
    ) -> anyhow::Result<usize> {
        let key_file = self.dir.path().join(format!("grant-{id}.key"));
        let out = Command::new(bin("wardgate")?)
            .args(["genkey", "--out"])
            .arg(&key_file)
            .output()?;
        let client_public = String::from_utf8(out.stdout)?.trim().to_owned();
        let psk = wardgate_common::keys::encode_key(
            &wardgate_common::keys::generate_private().to_bytes(),
        );
        let expires_at_ms = ms_now() + i64::try_from(valid.as_millis())?;
        let grant = ClientGrant {
            grant_id: id,
            resource: "ehr-web".into(),
            gateway_public_key: self.gateway_public.clone(),
            gateway_endpoint: self.endpoint,
            preshared_key: Secret::new(psk.clone()),
            tunnel_addr: IpAddr::V4(tunnel),
            rules: rules.clone(),
            expires_at_ms,
            renewable: true,
        };
        let grant_file = self.dir.path().join(format!("grant-{id}.json"));
        std::fs::write(&grant_file, serde_json::to_vec(&grant)?)?;
        let gw = GatewayGrant {
            grant_id: id,
            client_public_key: client_public,
            preshared_key: Secret::new(psk),
            tunnel_addr: IpAddr::V4(tunnel),
            rules,
            expires_at_ms,
            label: format!("test-client-{id} → ehr-web"),
        };
        std::fs::write(
            self.dir.path().join(format!("gateway-grant-{id}.json")),
            serde_json::to_vec(&gw)?,
        )?;
        self.grants.retain(|g| g.grant.grant_id != id);
        self.grants.push(GrantFiles {
            grant,
            grant_file,
            key_file,
        });
        Ok(self.grants.len() - 1)
    }

    /// The gateway process id (the real binary, not the `ip netns exec` wrapper, which execs).
    pub fn gateway_pid(&self) -> Option<u32> {
        self.procs.get(self.gateway_index).and_then(Proc::id)
    }

    /// The grant with this id.
    pub fn grant(&self, id: u64) -> Option<&GrantFiles> {
        self.grants.iter().find(|g| g.grant.grant_id == id)
    }

    fn gateway_cmd(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut c = Command::new(bin("wardgate-gateway")?);
        c.args(args).arg("--socket").arg(&self.socket);
        let r = run(c, None, &self.dir.path().join("gateway-cli.err"))?;
        if !r.ok {
            bail!("wardgate-gateway {args:?}: {}", r.stderr);
        }
        Ok(r.stdout)
    }

    /// Installs grant `id` on the gateway.
    pub fn install_grant(&self, id: u64) -> anyhow::Result<()> {
        let f = self.dir.path().join(format!("gateway-grant-{id}.json"));
        let f = f.to_str().context("path")?;
        self.gateway_cmd(&["grant", "add", "--file", f]).map(|_| ())
    }

    /// Removes grant `id` from the gateway.
    pub fn remove_grant(&self, id: u64) -> anyhow::Result<()> {
        let mut c = Command::new(bin("wardgate-gateway")?);
        c.args(["grant", "remove", "--socket"])
            .arg(&self.socket)
            .arg(id.to_string());
        let r = run(c, None, &self.dir.path().join("gateway-cli.err"))?;
        if !r.ok {
            bail!("grant remove: {}", r.stderr);
        }
        Ok(())
    }

    /// The gateway's counters.
    pub fn stats(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.gateway_cmd(&["stats"])?)?)
    }

    /// Drops of `reason` counted for `grant` (or unattributed with `None`).
    pub fn drops(&self, grant: Option<u64>, reason: &str) -> anyhow::Result<u64> {
        let s = self.stats()?;
        let list = match grant {
            Some(id) => s["grants"]
                .as_array()
                .and_then(|gs| gs.iter().find(|g| g["grant_id"] == id))
                .map(|g| g["dropped"].clone())
                .unwrap_or_default(),
            None => s["unattributed_drops"].clone(),
        };
        Ok(list
            .as_array()
            .map(|l| {
                l.iter()
                    .filter(|e| e[0] == reason)
                    .filter_map(|e| e[1].as_u64())
                    .sum()
            })
            .unwrap_or(0))
    }

    /// Starts `wardgate tunnel` for grant A in the client namespace and waits until ready.
    pub fn start_client(&mut self) -> anyhow::Result<()> {
        self.start_client_with(&[1])
    }

    /// Starts `wardgate tunnel` with the given grants.
    pub fn start_client_with(&mut self, ids: &[u64]) -> anyhow::Result<()> {
        let mut c = self.topo.client.command(&bin("wardgate")?);
        c.env("RUST_LOG", "info")
            .args(["tunnel", "--mode", self.client_mode.as_str()]);
        for id in ids {
            let g = self.grant(*id).with_context(|| format!("no grant {id}"))?;
            c.arg("--grant")
                .arg(&g.grant_file)
                .arg("--key")
                .arg(&g.key_file);
        }
        if self.client_mode == Mode::Userspace {
            for (port, target) in [(10443, WEB), (15001, SINK), (18080, WEB_OTHER_PORT)] {
                c.args(["--forward", &format!("{port}={target}")]);
            }
            c.args(["--forward-udp", &format!("10053={ECHO}")]);
            c.args(["--socks", "127.0.0.1:1080"]);
        }
        let p = Proc::spawn(c, self.dir.path(), "client")?;
        let out = p.stdout.clone();
        self.procs.push(p);
        wait_for(
            Duration::from_secs(20),
            "the client tunnel to be ready",
            || {
                std::fs::read_to_string(&out)
                    .ok()
                    .filter(|s| s.contains("ready"))
                    .map(|_| ())
            },
        )
    }

    /// Where a program in the client namespace connects to reach `resource`: the resource
    /// itself in `tun` mode, the local forward in `userspace` mode.
    pub fn via(&self, resource: SocketAddr) -> SocketAddr {
        if self.client_mode == Mode::Tun {
            return resource;
        }
        let port = match resource {
            WEB => 10443,
            SINK => 15001,
            WEB_OTHER_PORT => 18080,
            ECHO => 10053,
            _ => resource.port(),
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Runs `wardgate-bench node ARGS` in the client namespace.
    pub fn client_node(&self, args: &[&str]) -> anyhow::Result<String> {
        let node = bin("wardgate-bench")?;
        let mut full = vec![node.to_str().context("path")?, "node"];
        full.extend_from_slice(args);
        self.topo.client.exec(&full)
    }

    /// Runs `wardgate-bench node ARGS` in the resource namespace.
    pub fn resource_node(&self, args: &[&str]) -> anyhow::Result<String> {
        let node = bin("wardgate-bench")?;
        let mut full = vec![node.to_str().context("path")?, "node"];
        full.extend_from_slice(args);
        self.topo.resource.exec(&full)
    }

    /// Stderr of a process by log name (`gateway`, `client`).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.err"))).unwrap_or_default()
    }
}

impl Drop for DpNet {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.kill();
        }
        if std::env::var_os("WARDGATE_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping {}", self.dir.path().display());
            self.dir.disable_cleanup(true);
        }
    }
}
