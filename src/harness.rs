//! Runs the real `wardgate-controller`, `wardgate-gateway` and `wardgate` binaries for
//! end-to-end tests: temp directories, free loopback ports, logs captured to files (so tests
//! can check that no secret ever reaches a log), and processes killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The directory holding the workspace's binaries (next to the test executable's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of a workspace binary; fails with the command to build it when it is missing.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} is missing: run `cargo build --workspace --bins` before the end-to-end tests (the test command in README.md does)",
            p.display()
        );
    }
    Ok(p)
}

/// A free loopback port for UDP and TCP alike (both are probed).
pub fn free_port() -> u16 {
    for _ in 0..50 {
        let Ok(udp) = std::net::UdpSocket::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(addr) = udp.local_addr() else { continue };
        if std::net::TcpListener::bind(("127.0.0.1", addr.port())).is_ok() {
            return addr.port();
        }
    }
    0
}

/// Polls `f` every 50 ms until it returns `Some`, or fails after `timeout` with `what`.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process whose stdout and stderr go to files; killed on drop.
pub struct Proc {
    child: Option<Child>,
    /// Where its stderr goes.
    pub stderr: PathBuf,
    /// Where its stdout goes.
    pub stdout: PathBuf,
}

impl Proc {
    /// Starts `cmd` with output captured under `log_dir/name.{out,err}` (appending).
    pub fn spawn(mut cmd: Command, log_dir: &Path, name: &str) -> anyhow::Result<Self> {
        let stdout = log_dir.join(format!("{name}.out"));
        let stderr = log_dir.join(format!("{name}.err"));
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
        };
        cmd.stdout(open(&stdout)?)
            .stderr(open(&stderr)?)
            .stdin(Stdio::null());
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self {
            child: Some(child),
            stderr,
            stdout,
        })
    }

    /// The process id.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM and waits up to 10 s, then kills.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Kills at once (SIGKILL), like a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for exit up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("process already reaped")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!("process did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Its stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Output of a finished command as text.
pub struct Ran {
    /// Exit success.
    pub ok: bool,
    /// Stdout.
    pub stdout: String,
    /// Stderr.
    pub stderr: String,
}

impl From<Output> for Ran {
    fn from(o: Output) -> Self {
        Self {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs a command to completion with `stdin`, logging its stderr to `log` (appending).
pub fn run(mut cmd: Command, stdin: Option<&str>, log: &Path) -> anyhow::Result<Ran> {
    use std::io::Write;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("cannot start command")?;
    if let (Some(mut si), Some(s)) = (child.stdin.take(), stdin) {
        si.write_all(s.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let ran = Ran::from(out);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    writeln!(f, "{}", ran.stderr)?;
    Ok(ran)
}

/// One test world: a temp directory with a controller, and helpers to drive the CLIs.
pub struct World {
    /// Root temp directory (kept on failure when WARDGATE_KEEP_TEST_DIRS is set).
    pub dir: tempfile::TempDir,
    /// The controller's data directory.
    pub data_dir: PathBuf,
    /// Logs of every process.
    pub logs: PathBuf,
    /// The admin token printed by init.
    pub admin_token: String,
    /// QUIC address.
    pub quic: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// The running controller.
    pub controller: Option<Proc>,
    /// `RUST_LOG` for every process.
    pub rust_log: String,
    /// The network namespace the controller (and admin and audit CLIs) run in; `None` = host.
    pub controller_ns: Option<String>,
    /// The network namespace client commands run in; `None` = host.
    pub client_ns: Option<String>,
    /// The test clock file every process of this world reads (`--test-clock`), if any.
    pub test_clock: Option<PathBuf>,
}

/// `program` as a command, run inside network namespace `ns` when given (`ip netns exec`
/// execs the program, so the child's pid is the program's).
pub fn ns_command(ns: Option<&str>, program: &Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Where a [`World`]'s controller runs: on the host's loopback (the default), or inside
/// network namespaces that the caller created.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// The controller's namespace and the address (in it) clients and gateways reach it on.
    pub controller: Option<(String, std::net::IpAddr)>,
    /// The namespace client commands run in.
    pub client_ns: Option<String>,
    /// Run every process on a test clock starting at this instant (ms since the epoch).
    pub test_clock_ms: Option<i64>,
}

impl World {
    /// Initialises a controller (SQLite unless `database_url` is given) on fixed free ports,
    /// so a restart keeps its addresses, and starts it.
    pub fn start(database_url: Option<&str>, rust_log: &str) -> anyhow::Result<Self> {
        Self::start_placed(database_url, rust_log, Placement::default())
    }

    /// Like [`World::start`], with the controller and clients placed in namespaces.
    pub fn start_placed(
        database_url: Option<&str>,
        rust_log: &str,
        placement: Placement,
    ) -> anyhow::Result<Self> {
        let controller_ns = placement.controller.as_ref().map(|(ns, _)| ns.clone());
        let quic_ip = placement
            .controller
            .as_ref()
            .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |(_, ip)| *ip);
        let dir = tempfile::Builder::new().prefix("wardgate-e2e").tempdir()?;
        let data_dir = dir.path().join("controller");
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs)?;
        let quic = SocketAddr::new(quic_ip, free_port());
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut cmd = ns_command(controller_ns.as_deref(), &bin("wardgate-controller")?);
        cmd.env("RUST_LOG", rust_log)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("init")
            .arg("--organisation")
            .arg("St. Example Hospital")
            .arg("--quic-listen")
            .arg(quic.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string());
        if let Some(url) = database_url {
            cmd.arg("--database-url").arg(url);
        }
        let ran = run(cmd, None, &logs.join("init.err"))?;
        if !ran.ok {
            bail!("init failed: {}", ran.stderr);
        }
        let admin_token = ran
            .stdout
            .lines()
            .find(|l| l.starts_with("wga_"))
            .context("init printed no admin token")?
            .to_owned();
        let test_clock = match placement.test_clock_ms {
            Some(at) => {
                let f = dir.path().join("test-clock");
                wardgate_common::clock::set_test_clock(&f, at)?;
                Some(f)
            }
            None => None,
        };
        let mut w = Self {
            test_clock,
            dir,
            data_dir,
            logs,
            admin_token,
            quic,
            admin,
            controller: None,
            rust_log: rust_log.to_owned(),
            controller_ns,
            client_ns: placement.client_ns,
        };
        w.start_controller()?;
        Ok(w)
    }

    /// Starts (or restarts) `serve` and waits until the admin API answers.
    pub fn start_controller(&mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(self.data_dir.join("run").join("endpoints.json"));
        let mut cmd = self.controller_cmd()?;
        cmd.env("RUST_LOG", &self.rust_log)
            .arg("--data-dir")
            .arg(&self.data_dir);
        if let Some(f) = &self.test_clock {
            cmd.arg("--test-clock").arg(f);
        }
        cmd.arg("serve");
        let proc = Proc::spawn(cmd, &self.logs, "controller")?;
        self.controller = Some(proc);
        let ep = self.data_dir.join("run").join("endpoints.json");
        wait_for(
            Duration::from_secs(20),
            "the controller to write endpoints.json",
            || ep.exists().then_some(()),
        )?;
        wait_for(Duration::from_secs(20), "the admin API to answer", || {
            self.admin(&["settings", "show"], None)
                .ok()
                .filter(|r| r.ok)
                .map(|_| ())
        })?;
        Ok(())
    }

    /// Stops the controller gracefully.
    pub fn stop_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            c.stop();
        }
    }

    /// `wardgate-controller admin ARGS` with the admin token in the environment.
    pub fn admin(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Ran> {
        let mut cmd = self.controller_cmd()?;
        cmd.env("RUST_LOG", &self.rust_log)
            .env("WARDGATE_ADMIN_TOKEN", &self.admin_token)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("admin")
            .args(args);
        run(cmd, stdin, &self.logs.join("admin-cli.err"))
    }

    /// Like [`World::admin`] but requires success and parses `--json` output.
    pub fn admin_json(
        &self,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let r = self.admin(&a, stdin)?;
        if !r.ok {
            bail!("admin {args:?} failed: {}", r.stderr);
        }
        Ok(serde_json::from_str(&r.stdout)?)
    }

    /// Creates a local user.
    pub fn create_user(&self, name: &str, password: &str) -> anyhow::Result<()> {
        self.admin_json(&["user", "create", name], Some(&format!("{password}\n")))?;
        Ok(())
    }

    /// Makes a join token.
    pub fn join_token(&self, name: &str, network: &str, ttl: &str) -> anyhow::Result<String> {
        let v = self.admin_json(
            &[
                "gateway",
                "token",
                "--name",
                name,
                "--network",
                network,
                "--ttl",
                ttl,
            ],
            None,
        )?;
        v["token"]
            .as_str()
            .map(str::to_owned)
            .context("no token in answer")
    }

    /// `wardgate-controller` in the controller's namespace (no arguments yet).
    pub fn controller_cmd(&self) -> anyhow::Result<Command> {
        Ok(ns_command(
            self.controller_ns.as_deref(),
            &bin("wardgate-controller")?,
        ))
    }

    /// `wardgate-controller --data-dir … audit ARGS` (the auditor's tool, reading the store).
    pub fn audit(&self, args: &[&str]) -> anyhow::Result<Ran> {
        let mut cmd = self.controller_cmd()?;
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .arg("audit")
            .args(args);
        run(cmd, None, &self.logs.join("audit.err"))
    }

    /// The CA certificate path.
    pub fn ca(&self) -> PathBuf {
        self.data_dir.join("ca.pem")
    }

    /// `wardgate-gateway --state-dir DIR join …`.
    pub fn gateway_join(&self, state: &Path, token: &str, extra: &[&str]) -> anyhow::Result<Ran> {
        let mut cmd = Command::new(bin("wardgate-gateway")?);
        cmd.env("RUST_LOG", &self.rust_log)
            .env("WARDGATE_JOIN_TOKEN", token)
            .arg("--state-dir")
            .arg(state)
            .arg("join")
            .arg("--controller")
            .arg(self.quic.to_string())
            .arg("--ca")
            .arg(self.ca())
            .arg("--endpoint")
            .arg("127.0.0.1:51820")
            .args(extra);
        run(cmd, None, &self.logs.join("gateway-join.err"))
    }

    /// Starts `wardgate-gateway run` with fast heartbeats and reconnects.
    pub fn gateway_run(&self, state: &Path, name: &str) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(bin("wardgate-gateway")?);
        cmd.env("RUST_LOG", &self.rust_log)
            .arg("--state-dir")
            .arg(state)
            .arg("run")
            .arg("--heartbeat")
            .arg("500ms")
            .arg("--max-backoff")
            .arg("1s")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--socket")
            .arg(state.join("gateway.sock"));
        Proc::spawn(cmd, &self.logs, name)
    }

    /// The `wardgate` client command for `config` with the test's log level.
    pub fn client_cmd(&self, config: &Path) -> anyhow::Result<Command> {
        let mut cmd = ns_command(self.client_ns.as_deref(), &bin("wardgate")?);
        cmd.env("RUST_LOG", &self.rust_log)
            .arg("--config-dir")
            .arg(config);
        if let Some(f) = &self.test_clock {
            cmd.arg("--test-clock").arg(f);
        }
        Ok(cmd)
    }

    /// Moves every process of this world on the test clock to `at_ms` (ms since the epoch).
    pub fn set_clock(&self, at_ms: i64) -> anyhow::Result<()> {
        let f = self
            .test_clock
            .as_ref()
            .context("this world runs on the real clock")?;
        wardgate_common::clock::set_test_clock(f, at_ms)?;
        Ok(())
    }

    /// Kills the controller at once (a crash, or a power cut), without a graceful stop.
    pub fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            c.kill();
        }
    }

    /// `wardgate enrol` with the password on stdin.
    pub fn enrol(
        &self,
        config: &Path,
        user: &str,
        password: &str,
        wait: &str,
    ) -> anyhow::Result<Ran> {
        let mut cmd = self.client_cmd(config)?;
        cmd.arg("enrol")
            .arg("--controller")
            .arg(self.quic.to_string())
            .arg("--ca")
            .arg(self.ca())
            .arg("--user")
            .arg(user)
            .arg("--password-stdin")
            .arg("--wait")
            .arg(wait);
        run(
            cmd,
            Some(&format!("{password}\n")),
            &self.logs.join("client.err"),
        )
    }

    /// `wardgate status --json`.
    pub fn status(&self, config: &Path) -> anyhow::Result<serde_json::Value> {
        let mut cmd = self.client_cmd(config)?;
        cmd.arg("status").arg("--json");
        let r = run(cmd, None, &self.logs.join("client.err"))?;
        if !r.ok {
            bail!("status failed: {}", r.stderr);
        }
        Ok(serde_json::from_str(&r.stdout)?)
    }

    /// Every log line written so far by every process, for secret scanning.
    pub fn all_logs(&self) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(&self.logs) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "err") {
                    s.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
                }
            }
        }
        s
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_controller();
        if std::env::var_os("WARDGATE_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping {}", self.dir.path().display());
            self.dir.disable_cleanup(true);
        }
    }
}

/// PostgreSQL for tests: a fresh database on the server named by `WARDGATE_TEST_PG_URL`
/// (started by `.ci/pg.sh`, which the test command runs). Missing is an error, never a skip.
pub async fn fresh_pg_database() -> anyhow::Result<String> {
    use sqlx::Connection;
    let base = std::env::var("WARDGATE_TEST_PG_URL").context(
        "WARDGATE_TEST_PG_URL is not set: start PostgreSQL with `export WARDGATE_TEST_PG_URL=$(.ci/pg.sh | tail -n1)` (the README's test command does this)",
    )?;
    let name = format!("e2e_{}", hex_random());
    let mut conn = sqlx::PgConnection::connect(&base).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    let (prefix, _) = base.rsplit_once('/').context("bad WARDGATE_TEST_PG_URL")?;
    Ok(format!("{prefix}/{name}"))
}

fn hex_random() -> String {
    let mut b = [0u8; 6];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}
