//! Device posture: what this machine can show about itself (OS, disk encryption, host firewall,
//! screen lock, required processes), each fact with the evidence it rests on.
//!
//! Every collector reads the machine through a [`Host`]: a root directory (`/` for real, a
//! fixture tree in tests), the environment, and a [`Runner`] for the few facts only a command
//! can tell (`nft`, `gsettings`). Swapping those three is how the tests drive every branch
//! without root, a desktop or a firewall, and how the namespace test runs the real `nft`
//! inside a throwaway network namespace.
//!
//! A fact that cannot be established is [`Tri::Unknown`], never a hopeful yes: the controller
//! decides what unknown means (its policy treats it like no).
//!
//! Call order: build a [`Host`], get the platform's collector from [`platform`], then
//! [`report`] with the [`Options`]; the counter comes from [`next_counter`] and is stored with
//! [`record_sent`] once the report has been sent.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wardgate_common::files::{self, FileError};
use wardgate_common::pki;
use wardgate_common::posture::{Fact, PostureReport, Tri};

use crate::state::ConfigDir;

#[cfg(target_os = "linux")]
pub mod linux;
#[cfg(target_os = "macos")]
pub mod macos;
#[cfg(target_os = "windows")]
pub mod windows;

/// Most bytes kept from a command's stdout or stderr: a ruleset is a few hundred kilobytes
/// at worst, and a runaway command must not exhaust memory.
const MAX_OUTPUT: u64 = 8 * 1024 * 1024;

/// Most bytes read from one file under the root (os-release, mountinfo, /proc entries).
pub(crate) const MAX_FILE: u64 = 4 * 1024 * 1024;

/// One fact's value and how it was established, so the report can say why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding<T> {
    /// The value.
    pub value: T,
    /// The evidence, in words.
    pub detail: String,
}

impl<T> Finding<T> {
    /// A finding with its evidence.
    pub fn new(value: T, detail: impl Into<String>) -> Self {
        Self {
            value,
            detail: detail.into(),
        }
    }
}

impl Finding<Tri> {
    /// An unknown fact, with the reason it could not be established.
    pub fn unknown(detail: impl Into<String>) -> Self {
        Self::new(Tri::Unknown, detail)
    }
}

/// What the OS says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsInfo {
    /// OS id as profiles key it (`debian`, `macos`, `windows`).
    pub id: String,
    /// OS version as written by the OS.
    pub version: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// Where id, version and name came from.
    pub detail: String,
    /// Kernel release.
    pub kernel: Finding<Option<String>>,
}

/// The checks one platform implements. Defaults report unknown, so a platform only overrides
/// what it can really establish.
pub trait Collector {
    /// The OS identity and kernel.
    fn os(&self) -> OsInfo;

    /// Whether the disk holding the root filesystem is encrypted.
    fn disk_encrypted(&self) -> Finding<Tri> {
        Finding::unknown("disk encryption check not implemented on this platform")
    }

    /// Whether a host firewall drops unsolicited inbound traffic.
    fn firewall(&self) -> Finding<Tri> {
        Finding::unknown("firewall check not implemented on this platform")
    }

    /// Whether the screen locks by itself.
    fn screen_lock(&self) -> Finding<Tri> {
        Finding::unknown("screen lock check not implemented on this platform")
    }

    /// Which of `wanted` are running.
    fn processes(&self, wanted: &[String]) -> Finding<Vec<String>> {
        let _ = wanted;
        Finding::new(Vec::new(), "process check not implemented on this platform")
    }
}

/// What a command printed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Output {
    /// Whether it exited with status 0.
    pub success: bool,
    /// Its exit code, `None` if killed by a signal.
    pub code: Option<i32>,
    /// Standard output (lossy UTF-8, capped).
    pub stdout: String,
    /// Standard error (lossy UTF-8, capped).
    pub stderr: String,
}

/// Why a command gave no output at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The program is not installed (or not on the path).
    #[error("{program} is not installed")]
    NotFound {
        /// The program.
        program: String,
    },
    /// It could not be started or waited for.
    #[error("cannot run {program}: {source}")]
    Io {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It ran too long and was killed.
    #[error("{program} did not finish within {after:?}")]
    Timeout {
        /// The program.
        program: String,
        /// The limit.
        after: Duration,
    },
}

/// Runs commands for collectors, so tests can answer with fixture output instead.
pub trait Runner {
    /// Runs `program` with `args` and returns what it printed, whatever its exit status.
    fn run(&self, program: &str, args: &[&str]) -> Result<Output, RunError>;
}

/// Runs real commands, with a time limit (a hung D-Bus must not hang the client) and capped
/// output. Bare program names are looked up on `PATH`, then in `/usr/sbin` and `/sbin`, where
/// `nft` and `iptables-save` live but an ordinary user's `PATH` may not reach.
#[derive(Debug, Clone)]
pub struct SystemRunner {
    /// How long one command may run.
    pub timeout: Duration,
}

impl Default for SystemRunner {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
        }
    }
}

impl SystemRunner {
    fn spawn(program: &str, args: &[&str]) -> Result<std::process::Child, RunError> {
        let mut candidates = vec![PathBuf::from(program)];
        if !program.contains('/') {
            candidates.push(Path::new("/usr/sbin").join(program));
            candidates.push(Path::new("/sbin").join(program));
        }
        for c in candidates {
            let spawned = Command::new(&c)
                .args(args)
                .env("LC_ALL", "C")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn();
            match spawned {
                Ok(child) => return Ok(child),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(RunError::Io {
                        program: program.into(),
                        source,
                    });
                }
            }
        }
        Err(RunError::NotFound {
            program: program.into(),
        })
    }
}

fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(r) = r {
            // A read error leaves what was read so far; the exit status tells the rest.
            let _ = r.take(MAX_OUTPUT).read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

impl Runner for SystemRunner {
    fn run(&self, program: &str, args: &[&str]) -> Result<Output, RunError> {
        let mut child = Self::spawn(program, args)?;
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        let start = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if start.elapsed() >= self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(RunError::Timeout {
                        program: program.into(),
                        after: self.timeout,
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(source) => {
                    return Err(RunError::Io {
                        program: program.into(),
                        source,
                    });
                }
            }
        };
        Ok(Output {
            success: status.success(),
            code: status.code(),
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })
    }
}

/// Runs `program` and returns its stdout when it succeeded, else why not in words (used as
/// evidence: the caller only needs to say why a fact is unknown).
pub(crate) fn run_ok(runner: &dyn Runner, program: &str, args: &[&str]) -> Result<String, String> {
    match runner.run(program, args) {
        Ok(o) if o.success => Ok(o.stdout),
        Ok(o) => {
            let why = o.stderr.trim();
            let why = if why.is_empty() { o.stdout.trim() } else { why };
            Err(format!(
                "{program} failed ({}): {}",
                o.code
                    .map_or_else(|| "killed".to_owned(), |c| format!("exit {c}")),
                first_line(why)
            ))
        }
        Err(e) => Err(e.to_string()),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// The machine as collectors see it.
pub struct Host<'a> {
    /// Where the filesystem starts: `/`, or a fixture tree.
    pub root: PathBuf,
    /// Environment variables (a desktop session shows itself here).
    pub env: BTreeMap<String, String>,
    /// How commands are run.
    pub runner: &'a dyn Runner,
}

impl<'a> Host<'a> {
    /// This machine: root `/`, this process's environment.
    pub fn system(runner: &'a dyn Runner) -> Self {
        Self {
            root: PathBuf::from("/"),
            env: std::env::vars().collect(),
            runner,
        }
    }

    /// `path` (absolute, as on the real machine) under the root.
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// A small text file under the root, capped at [`MAX_FILE`] bytes.
    pub fn read(&self, path: &str) -> std::io::Result<String> {
        read_capped(&self.path(path))
    }

    /// A non-empty environment variable.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// Reads a text file of at most [`MAX_FILE`] bytes (procfs files report size 0, so the cap is
/// applied while reading).
pub(crate) fn read_capped(path: &Path) -> std::io::Result<String> {
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE)
        .read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// This platform's collector.
pub fn platform<'a>(host: Host<'a>) -> Box<dyn Collector + 'a> {
    #[cfg(target_os = "linux")]
    return Box::new(linux::Linux::new(host));
    #[cfg(target_os = "macos")]
    return Box::new(macos::MacOs::new(host));
    #[cfg(target_os = "windows")]
    return Box::new(windows::Windows::new(host));
    #[cfg(not(any(target_os = "linux", target_os = "macos", target_os = "windows")))]
    {
        let _ = host;
        Box::new(Unsupported)
    }
}

/// A platform without collectors: everything unknown.
#[cfg(not(any(target_os = "linux", target_os = "macos", target_os = "windows")))]
struct Unsupported;

#[cfg(not(any(target_os = "linux", target_os = "macos", target_os = "windows")))]
impl Collector for Unsupported {
    fn os(&self) -> OsInfo {
        OsInfo {
            id: std::env::consts::OS.into(),
            version: None,
            name: None,
            detail: "no OS collector for this platform".into(),
            kernel: Finding::new(None, "no kernel collector for this platform"),
        }
    }
}

/// What a report covers beyond what the machine shows.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Process names a posture profile requires (e.g. an EDR agent).
    pub required_processes: Vec<String>,
    /// The enrolled device certificate, if any (see [`ConfigDir::cert`]).
    pub device_cert: Option<PathBuf>,
    /// The anti-replay counter this report carries.
    pub counter: u64,
}

/// Collects every fact into the report the client sends.
pub fn report(c: &dyn Collector, opts: &Options) -> PostureReport {
    let mut detail = BTreeMap::new();
    let os = c.os();
    detail.insert(Fact::Os, os.detail);
    detail.insert(Fact::Kernel, os.kernel.detail);
    let disk = c.disk_encrypted();
    detail.insert(Fact::DiskEncrypted, disk.detail);
    let fw = c.firewall();
    detail.insert(Fact::Firewall, fw.detail);
    let lock = c.screen_lock();
    detail.insert(Fact::ScreenLock, lock.detail);
    let procs = c.processes(&opts.required_processes);
    detail.insert(Fact::Processes, procs.detail);
    detail.insert(
        Fact::ClientVersion,
        "version of this wardgate binary".to_owned(),
    );
    let fp = match &opts.device_cert {
        Some(p) => device_fingerprint(p),
        None => Finding::new(None, "no device certificate given"),
    };
    detail.insert(Fact::DeviceFingerprint, fp.detail);
    PostureReport {
        os: os.id,
        os_version: os.version,
        os_name: os.name,
        kernel: os.kernel.value,
        disk_encrypted: disk.value,
        firewall: fw.value,
        screen_lock: lock.value,
        processes: procs.value,
        client_version: Some(wardgate_common::SOFTWARE_VERSION.to_owned()),
        device_fingerprint: fp.value,
        counter: opts.counter,
        detail,
    }
}

/// Collects a report for the given [`Options`]: the seam through which `wardgate connect`
/// gets its facts, so tests and embedders can substitute their own collection (the default,
/// [`system_collect`], reads this machine). Called from a blocking thread: it may run
/// commands.
pub type CollectFn = std::sync::Arc<dyn Fn(&Options) -> PostureReport + Send + Sync>;

/// Collects from this machine with the platform's collector and real commands.
pub fn system_collect() -> CollectFn {
    std::sync::Arc::new(|opts: &Options| {
        let runner = SystemRunner::default();
        let collector = platform(Host::system(&runner));
        report(collector.as_ref(), opts)
    })
}

/// Whether two reports say the same about the device: every fact compared, the counter and
/// the evidence texts (which may word the same fact differently) ignored. A change is what
/// makes the client report at once instead of waiting for the interval.
pub fn same_facts(a: &PostureReport, b: &PostureReport) -> bool {
    a.os == b.os
        && a.os_version == b.os_version
        && a.os_name == b.os_name
        && a.kernel == b.kernel
        && a.disk_encrypted == b.disk_encrypted
        && a.firewall == b.firewall
        && a.screen_lock == b.screen_lock
        && a.processes == b.processes
        && a.client_version == b.client_version
        && a.device_fingerprint == b.device_fingerprint
}

/// The SHA-256 fingerprint of the device certificate at `path`, the same one the controller
/// identifies the device by; `None` (with the reason) before enrolment or if it is unreadable.
pub fn device_fingerprint(path: &Path) -> Finding<Option<String>> {
    if !path.exists() {
        return Finding::new(
            None,
            format!("no device certificate at {} (not enrolled)", path.display()),
        );
    }
    let pem = match files::read_public(path) {
        Ok(p) => p,
        Err(e) => return Finding::new(None, format!("{e:#}")),
    };
    match pki::certs_from_pem("device certificate", &pem) {
        Ok(certs) => match certs.first() {
            Some(c) => Finding::new(
                Some(pki::fingerprint(c)),
                format!("SHA-256 of the certificate in {}", path.display()),
            ),
            None => Finding::new(None, format!("{} holds no certificate", path.display())),
        },
        Err(e) => Finding::new(None, format!("{}: {e}", path.display())),
    }
}

/// Why the report counter could not be read or stored.
#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    /// The file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// The file does not hold a number.
    #[error("{path} is damaged (expected a number); delete it only if the controller is told")]
    Invalid {
        /// The file.
        path: PathBuf,
    },
}

fn last_sent(dir: &ConfigDir) -> Result<u64, CounterError> {
    let path = dir.posture_counter();
    if !path.exists() {
        return Ok(0);
    }
    let text = String::from_utf8_lossy(&files::read_public(&path)?).into_owned();
    text.trim()
        .parse()
        .map_err(|_| CounterError::Invalid { path })
}

/// The counter the next report carries: one more than the last one sent (1 at first). Reading
/// does not consume it, so `wardgate posture` shows exactly what would be sent.
pub fn next_counter(dir: &ConfigDir) -> Result<u64, CounterError> {
    Ok(last_sent(dir)?.saturating_add(1))
}

/// Remembers that the report carrying `counter` was sent, so the next one is higher even
/// across restarts. Never moves the counter backwards.
pub fn record_sent(dir: &ConfigDir, counter: u64) -> Result<(), CounterError> {
    let last = last_sent(dir)?;
    files::write_public(
        &dir.posture_counter(),
        last.max(counter).to_string().as_bytes(),
    )?;
    Ok(())
}

/// The report as a table for people: each fact, its value, and the evidence.
pub fn render_table(r: &PostureReport) -> String {
    let none = || "-".to_owned();
    let os = match (&r.os_name, &r.os_version) {
        (Some(n), Some(v)) => format!("{} {v} ({n})", r.os),
        (Some(n), None) => format!("{} ({n})", r.os),
        (None, Some(v)) => format!("{} {v}", r.os),
        (None, None) => r.os.clone(),
    };
    let rows: Vec<(Fact, String)> = Fact::ALL
        .iter()
        .map(|&f| {
            let value = match f {
                Fact::Os => os.clone(),
                Fact::Kernel => r.kernel.clone().unwrap_or_else(none),
                Fact::DiskEncrypted => r.disk_encrypted.to_string(),
                Fact::Firewall => r.firewall.to_string(),
                Fact::ScreenLock => r.screen_lock.to_string(),
                Fact::Processes if r.processes.is_empty() => none(),
                Fact::Processes => r.processes.join(", "),
                Fact::ClientVersion => r.client_version.clone().unwrap_or_else(none),
                Fact::DeviceFingerprint => r.device_fingerprint.clone().unwrap_or_else(none),
            };
            (f, value)
        })
        .collect();
    let fact_w = rows
        .iter()
        .map(|(f, _)| f.to_string().len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (f, value) in rows {
        out.push_str(&format!("{:<fact_w$}  {value}\n", f.to_string()));
        if let Some(d) = r.detail.get(&f) {
            out.push_str(&format!("{:<fact_w$}    {d}\n", ""));
        }
    }
    out.push_str(&format!("{:<fact_w$}  {}\n", "counter", r.counter));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_runner_reports_missing_programs_and_failures() {
        let r = SystemRunner::default();
        assert!(matches!(
            r.run("wardgate-no-such-program", &[]),
            Err(RunError::NotFound { .. })
        ));
        let out = r.run("sh", &["-c", "echo out; echo err >&2; exit 3"]);
        let out = out.expect("sh runs");
        assert!(!out.success);
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        let slow = SystemRunner {
            timeout: Duration::from_millis(100),
        };
        assert!(matches!(
            slow.run("sleep", &["5"]),
            Err(RunError::Timeout { .. })
        ));
    }

    #[test]
    fn fingerprint_is_sha256_of_the_certificate_der() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("device.pem");
        assert_eq!(device_fingerprint(&p).value, None);
        // The DER is the five bytes "hello": the fingerprint is their well-known SHA-256.
        std::fs::write(
            &p,
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        assert_eq!(
            device_fingerprint(&p).value.as_deref(),
            Some("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
        );
        std::fs::write(&p, "not a certificate").expect("write");
        let f = device_fingerprint(&p);
        assert_eq!(f.value, None);
        assert!(f.detail.contains("PEM"), "{}", f.detail);
    }

    #[test]
    fn counter_starts_at_one_and_only_moves_forward() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = ConfigDir::resolve(Some(tmp.path().to_path_buf())).expect("dir");
        assert_eq!(next_counter(&dir).expect("read"), 1);
        assert_eq!(
            next_counter(&dir).expect("read"),
            1,
            "peeking must not consume"
        );
        record_sent(&dir, 1).expect("store");
        assert_eq!(next_counter(&dir).expect("read"), 2);
        record_sent(&dir, 9).expect("store");
        record_sent(&dir, 3).expect("store");
        assert_eq!(next_counter(&dir).expect("read"), 10);
        std::fs::write(dir.posture_counter(), "garbage").expect("write");
        assert!(matches!(
            next_counter(&dir),
            Err(CounterError::Invalid { .. })
        ));
    }
}
