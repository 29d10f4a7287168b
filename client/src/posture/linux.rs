//! Linux posture collectors: os-release, the block-device stack under `/`, nftables (or
//! iptables), GNOME's screen lock settings, and `/proc`.
//!
//! Each check reads only what the kernel or the tool itself says, and says where it looked. The
//! shapes it cannot interpret (an overlay root, a loop device, another desktop) are unknown:
//! the controller gets "could not tell" rather than a guess.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use wardgate_common::posture::Tri;

use super::{Collector, Finding, Host, OsInfo, read_capped, run_ok};

/// Filesystems that are not stored on a local block device we can inspect: a container's
/// overlay, memory, network and image filesystems.
const NOT_ON_A_DISK: &[&str] = &[
    "overlay", "tmpfs", "ramfs", "rootfs", "aufs", "nfs", "nfs4", "cifs", "smb3", "9p", "virtiofs",
    "squashfs",
];

/// How deep a device-mapper stack may be before we stop following it (and say unknown):
/// real stacks are two or three layers, and a cycle must not loop forever.
const MAX_STACK_DEPTH: usize = 16;

/// The Linux collector over a [`Host`].
pub struct Linux<'a> {
    host: Host<'a>,
}

impl<'a> Linux<'a> {
    /// A collector reading `host`.
    pub fn new(host: Host<'a>) -> Self {
        Self { host }
    }
}

impl Collector for Linux<'_> {
    fn os(&self) -> OsInfo {
        os_info(&self.host)
    }

    fn disk_encrypted(&self) -> Finding<Tri> {
        root_encryption(&self.host)
    }

    fn firewall(&self) -> Finding<Tri> {
        firewall(&self.host)
    }

    fn screen_lock(&self) -> Finding<Tri> {
        screen_lock(&self.host)
    }

    fn processes(&self, wanted: &[String]) -> Finding<Vec<String>> {
        processes(&self.host, wanted)
    }
}

// --- OS ---------------------------------------------------------------------------------------

/// Parses os-release (`KEY=value`, values optionally quoted with shell-style escapes).
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        out.insert(k.trim().to_owned(), unquote(v.trim()));
    }
    out
}

fn unquote(v: &str) -> String {
    if let Some(inner) = v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        return inner.to_owned();
    }
    let inner = v
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn os_info(host: &Host<'_>) -> OsInfo {
    let kernel = match host.read("/proc/sys/kernel/osrelease") {
        Ok(k) if !k.trim().is_empty() => {
            Finding::new(Some(k.trim().to_owned()), "/proc/sys/kernel/osrelease")
        }
        Ok(_) => Finding::new(None, "/proc/sys/kernel/osrelease is empty"),
        Err(e) => Finding::new(None, format!("cannot read /proc/sys/kernel/osrelease: {e}")),
    };
    for path in ["/etc/os-release", "/usr/lib/os-release"] {
        let Ok(text) = host.read(path) else {
            continue;
        };
        let mut kv = parse_os_release(&text);
        let id = kv.remove("ID").filter(|s| !s.is_empty());
        let version = kv.remove("VERSION_ID").filter(|s| !s.is_empty());
        let detail = format!(
            "{path}: ID={} VERSION_ID={}",
            id.as_deref().unwrap_or("(unset, so \"linux\")"),
            version.as_deref().unwrap_or("(unset)")
        );
        return OsInfo {
            // os-release(5): ID defaults to "linux".
            id: id.unwrap_or_else(|| "linux".to_owned()),
            version,
            name: kv.remove("PRETTY_NAME").filter(|s| !s.is_empty()),
            detail,
            kernel,
        };
    }
    OsInfo {
        id: "linux".into(),
        version: None,
        name: None,
        detail: "no readable /etc/os-release or /usr/lib/os-release".into(),
        kernel,
    }
}

// --- Disk encryption ---------------------------------------------------------------------------

/// The filesystem mounted at `/`, as the mount table shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootMount {
    /// `major:minor` of its device (major 0 for virtual and some multi-device filesystems).
    pub dev: Option<(u32, u32)>,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source (`/dev/vda1`, `overlay`, …).
    pub source: String,
}

/// The last (topmost) mount at `/` in a mountinfo table.
pub fn parse_mountinfo_root(text: &str) -> Option<RootMount> {
    let mut found = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(4) != Some(&"/") {
            continue;
        }
        let Some(sep) = f.iter().skip(6).position(|x| *x == "-").map(|p| p + 6) else {
            continue;
        };
        let (Some(fstype), Some(source)) = (f.get(sep + 1), f.get(sep + 2)) else {
            continue;
        };
        let dev = f.get(2).and_then(|d| {
            let (a, b) = d.split_once(':')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        });
        found = Some(RootMount {
            dev,
            fstype: (*fstype).to_owned(),
            source: (*source).to_owned(),
        });
    }
    found
}

/// The last mount at `/` in a `/proc/mounts` table (no device numbers there).
pub fn parse_mounts_root(text: &str) -> Option<RootMount> {
    text.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            [source, "/", fstype, ..] => Some(RootMount {
                dev: None,
                fstype: (*fstype).to_owned(),
                source: (*source).to_owned(),
            }),
            _ => None,
        }
    })
}

fn root_encryption(host: &Host<'_>) -> Finding<Tri> {
    let mount = match host.read("/proc/self/mountinfo") {
        Ok(t) => parse_mountinfo_root(&t),
        Err(_) => host
            .read("/proc/mounts")
            .ok()
            .and_then(|t| parse_mounts_root(&t)),
    };
    let Some(m) = mount else {
        return Finding::unknown("no mount at / in /proc/self/mountinfo or /proc/mounts");
    };
    let what = format!(
        "/ is {} on {}{}",
        m.fstype,
        m.source,
        m.dev
            .map(|(a, b)| format!(" ({a}:{b})"))
            .unwrap_or_default()
    );
    if NOT_ON_A_DISK.contains(&m.fstype.as_str()) || m.fstype.starts_with("fuse") {
        return Finding::unknown(format!(
            "{what}: not a local block device (container, memory or network root)"
        ));
    }
    let dir = match m.dev {
        Some((major, minor)) if major != 0 => host.path(&format!("/sys/dev/block/{major}:{minor}")),
        // Major 0 (btrfs, or /proc/mounts without numbers): follow the source's device node.
        _ => match m.source.strip_prefix("/dev/") {
            Some(_) => match device_name(&host.path(&m.source)) {
                Some(name) => host.path(&format!("/sys/class/block/{name}")),
                None => {
                    return Finding::unknown(format!("{what}: cannot resolve {}", m.source));
                }
            },
            None => {
                return Finding::unknown(format!("{what}: not backed by a block device"));
            }
        },
    };
    if !dir.exists() {
        return Finding::unknown(format!("{what}: no sysfs entry at {}", dir.display()));
    }
    let mut steps = Vec::new();
    let value = layer(&dir, 0, &mut steps);
    Finding::new(value, format!("{what}: {}", steps.join("; ")))
}

/// The kernel's name for a device node or sysfs entry (`dm-0` for `/dev/mapper/root`).
fn device_name(path: &Path) -> Option<String> {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    real.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Whether the block device at sysfs `dir` stores data encrypted: a dm-crypt layer on it, or
/// every device below it encrypted. Each step is recorded in `steps`.
fn layer(dir: &Path, depth: usize, steps: &mut Vec<String>) -> Tri {
    let name = device_name(dir).unwrap_or_else(|| dir.display().to_string());
    if depth > MAX_STACK_DEPTH {
        steps.push(format!(
            "{name}: stack deeper than {MAX_STACK_DEPTH} layers"
        ));
        return Tri::Unknown;
    }
    let is_dm = dir.join("dm").is_dir();
    let mut kind = "device-mapper".to_owned();
    if is_dm {
        match read_capped(&dir.join("dm/uuid")) {
            Ok(uuid) => {
                let uuid = uuid.trim();
                // CRYPT-<TYPE>-…; VERITY and INTEGRITY are cryptsetup targets that
                // authenticate but do not encrypt, so they are layers to look through.
                let crypt_type = uuid
                    .strip_prefix("CRYPT-")
                    .map(|rest| rest.split('-').next().unwrap_or(""));
                match crypt_type {
                    Some(t) if t != "VERITY" && t != "INTEGRITY" => {
                        steps.push(format!("{name} is dm-crypt (CRYPT-{t})"));
                        return Tri::Yes;
                    }
                    _ => {
                        kind = uuid
                            .split('-')
                            .take(if crypt_type.is_some() { 2 } else { 1 })
                            .collect::<Vec<_>>()
                            .join("-");
                        if kind.is_empty() {
                            kind = "device-mapper".into();
                        }
                    }
                }
            }
            Err(e) => {
                steps.push(format!("{name}: cannot read dm/uuid: {e}"));
                return Tri::Unknown;
            }
        }
    } else if name.starts_with("loop") {
        steps.push(format!(
            "{name} is a loop device: its backing file's storage is not checked"
        ));
        return Tri::Unknown;
    }
    let slaves = match std::fs::read_dir(dir.join("slaves")) {
        Ok(rd) => {
            let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            v.sort();
            v
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            steps.push(format!("{name}: cannot list slaves: {e}"));
            return Tri::Unknown;
        }
    };
    if slaves.is_empty() {
        steps.push(if is_dm {
            format!("{name} ({kind}) has no lower device and no dm-crypt layer")
        } else {
            format!("{name} is a plain block device with no dm-crypt layer above it")
        });
        return Tri::No;
    }
    let names: Vec<String> = slaves.iter().filter_map(|s| device_name(s)).collect();
    steps.push(format!(
        "{name}{} sits on {}",
        if is_dm {
            format!(" ({kind})")
        } else {
            String::new()
        },
        names.join(", ")
    ));
    // Encrypted only if every lower device is: one clear physical volume leaks data.
    slaves
        .iter()
        .fold(Tri::Yes, |acc, s| acc.and(layer(s, depth + 1, steps)))
}

// --- Firewall ----------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct NftChain {
    family: String,
    table: String,
    name: String,
    #[serde(default)]
    hook: Option<String>,
    #[serde(default)]
    policy: Option<String>,
}

#[derive(Debug, Deserialize)]
struct NftRule {
    family: String,
    table: String,
    chain: String,
    #[serde(default)]
    expr: Vec<Value>,
}

/// The verdict of a rule that drops or rejects everything reaching it (only counters or
/// logging before the verdict, no matches), if it is one.
fn unconditional_verdict(expr: &[Value]) -> Option<&'static str> {
    let (last, before) = expr.split_last()?;
    let only_key = |v: &Value| -> Option<String> {
        let o = v.as_object()?;
        if o.len() == 1 {
            o.keys().next().cloned()
        } else {
            None
        }
    };
    let verdict = match only_key(last)?.as_str() {
        "drop" => "drop",
        "reject" => "reject",
        _ => return None,
    };
    before
        .iter()
        .all(|e| matches!(only_key(e).as_deref(), Some("counter" | "log")))
        .then_some(verdict)
}

/// What `nft -j list ruleset` says about inbound filtering: yes when an `input` hook chain
/// drops by policy or holds an unconditional drop/reject rule, else no.
pub fn nft_verdict(json: &str) -> Result<Finding<Tri>, String> {
    #[derive(Deserialize)]
    struct Ruleset {
        nftables: Vec<BTreeMap<String, Value>>,
    }
    let rs: Ruleset =
        serde_json::from_str(json).map_err(|e| format!("nft printed invalid JSON: {e}"))?;
    let mut chains = Vec::new();
    // Chains holding a rule that drops or rejects everything reaching it: whatever the
    // policy, nothing gets past that rule unless an earlier rule accepted it.
    let mut drops: BTreeMap<(String, String, String), &'static str> = BTreeMap::new();
    let mut objects = 0usize;
    for item in rs.nftables {
        for (kind, body) in item {
            match kind.as_str() {
                "metainfo" => {}
                "chain" => {
                    objects += 1;
                    let c: NftChain = serde_json::from_value(body)
                        .map_err(|e| format!("nft chain not understood: {e}"))?;
                    chains.push(c);
                }
                "rule" => {
                    objects += 1;
                    let r: NftRule = serde_json::from_value(body)
                        .map_err(|e| format!("nft rule not understood: {e}"))?;
                    if let Some(v) = unconditional_verdict(&r.expr) {
                        drops.entry((r.family, r.table, r.chain)).or_insert(v);
                    }
                }
                _ => objects += 1,
            }
        }
    }
    if objects == 0 {
        return Ok(Finding::new(Tri::No, "nftables ruleset is empty"));
    }
    let mut active = Vec::new();
    let mut open = Vec::new();
    for c in chains
        .iter()
        .filter(|c| c.hook.as_deref() == Some("input"))
        .filter(|c| matches!(c.family.as_str(), "inet" | "ip" | "ip6"))
    {
        let policy = c.policy.as_deref().unwrap_or("accept");
        let at = format!(
            "nftables table {} {} chain {} hook input",
            c.family, c.table, c.name
        );
        if policy == "drop" {
            active.push(format!("{at} policy drop"));
        } else if let Some(v) = drops.get(&(c.family.clone(), c.table.clone(), c.name.clone())) {
            active.push(format!("{at} has an unconditional {v} rule"));
        } else {
            open.push(format!("{at} policy {policy}"));
        }
    }
    Ok(if !active.is_empty() {
        Finding::new(Tri::Yes, active.join("; "))
    } else if open.is_empty() {
        Finding::new(Tri::No, "nftables ruleset has no input hook chain")
    } else {
        Finding::new(
            Tri::No,
            format!("no input chain drops by default: {}", open.join("; ")),
        )
    })
}

/// What `iptables-save` says: yes when the filter table's INPUT policy is DROP or an INPUT
/// rule drops/rejects everything, else no.
pub fn iptables_verdict(text: &str) -> Finding<Tri> {
    let mut in_filter = false;
    let mut policy = None;
    let mut catch_all = None;
    for line in text.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix('*') {
            in_filter = t == "filter";
        } else if !in_filter {
            continue;
        } else if let Some(rest) = line.strip_prefix(":INPUT ") {
            policy = rest.split_whitespace().next().map(str::to_owned);
        } else if catch_all.is_none() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["-A", "INPUT", "-j", target @ ("DROP" | "REJECT"), ..] = words.as_slice() {
                catch_all = Some((*target).to_owned());
            }
        }
    }
    if policy.as_deref() == Some("DROP") {
        return Finding::new(Tri::Yes, "iptables filter INPUT policy DROP");
    }
    if let Some(target) = catch_all {
        return Finding::new(
            Tri::Yes,
            format!("iptables filter INPUT has an unconditional {target} rule"),
        );
    }
    Finding::new(
        Tri::No,
        format!(
            "iptables filter INPUT policy {}",
            policy.as_deref().unwrap_or("ACCEPT (no filter table)")
        ),
    )
}

fn firewall(host: &Host<'_>) -> Finding<Tri> {
    let nft = run_ok(host.runner, "nft", &["-j", "list", "ruleset"]).and_then(|o| nft_verdict(&o));
    if let Ok(f) = &nft
        && f.value == Tri::Yes
    {
        return f.clone();
    }
    // Rules made with legacy iptables are invisible to nft: ask it too before saying no.
    let ipt = run_ok(host.runner, "iptables-save", &[]).map(|o| iptables_verdict(&o));
    match (nft, ipt) {
        (_, Ok(f)) if f.value == Tri::Yes => f,
        (Ok(n), Ok(i)) => Finding::new(Tri::No, format!("{}; {}", n.detail, i.detail)),
        (Ok(n), Err(i)) => Finding::new(n.value, format!("{}; {i}", n.detail)),
        (Err(n), Ok(i)) => Finding::new(Tri::No, format!("{}; {n}", i.detail)),
        (Err(n), Err(i)) => Finding::unknown(format!("{n}; {i}")),
    }
}

// --- Screen lock -------------------------------------------------------------------------------

/// A graphical session logind knows about (from `/run/systemd/sessions/*`).
fn logind_graphical_session(host: &Host<'_>) -> Option<String> {
    let rd = std::fs::read_dir(host.path("/run/systemd/sessions")).ok()?;
    let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    names.sort();
    names.into_iter().find_map(|p| {
        let kv = parse_os_release(&read_capped(&p).ok()?);
        let graphical = matches!(kv.get("TYPE").map(String::as_str), Some("x11" | "wayland"));
        let active = kv.get("ACTIVE").map(String::as_str) == Some("1");
        (graphical && active).then(|| {
            format!(
                "logind session {} (uid {}, {})",
                p.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default(),
                kv.get("UID").map(String::as_str).unwrap_or("?"),
                kv.get("TYPE").map(String::as_str).unwrap_or("?")
            )
        })
    })
}

fn gsetting(host: &Host<'_>, schema: &str, key: &str) -> Result<String, String> {
    run_ok(host.runner, "gsettings", &["get", schema, key]).map(|s| s.trim().to_owned())
}

fn screen_lock(host: &Host<'_>) -> Finding<Tri> {
    let in_session = host.var("WAYLAND_DISPLAY").or(host.var("DISPLAY"));
    if in_session.is_none() {
        return match logind_graphical_session(host) {
            Some(s) => Finding::unknown(format!(
                "{s} exists but this process is not running in it, so its settings cannot be read"
            )),
            None => Finding::unknown("no desktop session"),
        };
    }
    let Some(desktop) = host.var("XDG_CURRENT_DESKTOP") else {
        return Finding::unknown("desktop session of unknown kind (XDG_CURRENT_DESKTOP unset)");
    };
    // gsettings answers GNOME's defaults on any desktop, so only GNOME's answers mean anything.
    if !desktop.split(':').any(|d| d.eq_ignore_ascii_case("GNOME")) {
        return Finding::unknown(format!(
            "desktop {desktop}: screen lock check implemented for GNOME only"
        ));
    }
    let settings = (|| {
        Ok::<_, String>((
            gsetting(host, "org.gnome.desktop.screensaver", "lock-enabled")?,
            gsetting(host, "org.gnome.desktop.session", "idle-delay")?,
            gsetting(host, "org.gnome.desktop.lockdown", "disable-lock-screen")?,
        ))
    })();
    let (lock, idle, disabled) = match settings {
        Ok(s) => s,
        Err(e) => return Finding::unknown(format!("desktop {desktop}: {e}")),
    };
    // idle-delay prints as "uint32 300"; 0 means the session never goes idle, so never locks.
    let idle_s: Option<u64> = idle.split_whitespace().last().and_then(|n| n.parse().ok());
    let evidence = format!(
        "GNOME screensaver lock-enabled {lock}, session idle-delay {}, lockdown disable-lock-screen {disabled}",
        idle_s.map_or_else(|| idle.clone(), |s| format!("{s} s"))
    );
    match (lock.as_str(), idle_s, disabled.as_str()) {
        (_, _, "true") | ("false", _, _) | (_, Some(0), _) => Finding::new(Tri::No, evidence),
        ("true", Some(_), "false") => Finding::new(Tri::Yes, evidence),
        _ => Finding::unknown(format!("unexpected settings: {evidence}")),
    }
}

// --- Processes ---------------------------------------------------------------------------------

/// Which of `wanted` run, by `/proc/N/comm` or the base name of `argv[0]`.
fn processes(host: &Host<'_>, wanted: &[String]) -> Finding<Vec<String>> {
    let rd = match std::fs::read_dir(host.path("/proc")) {
        Ok(rd) => rd,
        Err(e) => return Finding::new(Vec::new(), format!("cannot list /proc: {e}")),
    };
    let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
    let mut scanned = 0usize;
    for entry in rd.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let comm = read_capped(&dir.join("comm"))
            .map(|s| s.trim_end_matches('\n').to_owned())
            .unwrap_or_default();
        let argv0 = read_capped(&dir.join("cmdline"))
            .ok()
            .and_then(|c| c.split('\0').next().map(str::to_owned))
            .map(|a| a.rsplit('/').next().unwrap_or("").to_owned())
            .unwrap_or_default();
        if comm.is_empty() && argv0.is_empty() {
            continue;
        }
        scanned += 1;
        for w in wanted {
            if !w.is_empty() && (*w == comm || *w == argv0) {
                let e = seen.entry(w.as_str()).or_insert(pid);
                *e = (*e).min(pid);
            }
        }
    }
    let mut found = Vec::new();
    let mut words = Vec::new();
    let mut asked = std::collections::BTreeSet::new();
    for w in wanted {
        if !asked.insert(w.as_str()) {
            continue;
        }
        match seen.get(w.as_str()) {
            Some(pid) => {
                found.push(w.clone());
                words.push(format!("{w}: running (pid {pid})"));
            }
            None => words.push(format!("{w}: not running")),
        }
    }
    let detail = if wanted.is_empty() {
        format!("none asked for ({scanned} processes in /proc)")
    } else {
        format!("{} ({scanned} processes in /proc)", words.join("; "))
    };
    Finding::new(found, detail)
}

#[cfg(test)]
mod tests;
