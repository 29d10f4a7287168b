//! The Linux collectors on this real machine, checked against what other tools say, and the
//! firewall check against the real `nft` inside a throwaway network namespace (needs root, as
//! the whole suite does; missing root is a failure, not a skip).
#![cfg(target_os = "linux")]

use std::process::Command;

use wardgate_client::posture::linux::Linux;
use wardgate_client::posture::{Collector, Host, Output, RunError, Runner, SystemRunner};
use wardgate_common::posture::Tri;

/// Runs `sh -c SCRIPT` and returns its trimmed stdout.
fn sh(script: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("run sh");
    assert!(out.status.success(), "{script}: {:?}", out);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn real_machine_facts_match_what_other_tools_say() {
    let runner = SystemRunner::default();
    let c = Linux::new(Host::system(&runner));

    let os = c.os();
    let rel = ". /etc/os-release 2>/dev/null || . /usr/lib/os-release";
    assert_eq!(os.id, sh(&format!("{rel}; printf %s \"${{ID:-linux}}\"")));
    let version = sh(&format!("{rel}; printf %s \"$VERSION_ID\""));
    assert_eq!(os.version, (!version.is_empty()).then_some(version));
    assert_eq!(os.kernel.value, Some(sh("uname -r")));

    // The root filesystem's device as stat(1) sees it is the one the check followed, and it
    // says yes only if some device-mapper device really is dm-crypt.
    let disk = c.disk_encrypted();
    let devno = sh("stat -c '%Hd:%Ld' /");
    assert!(
        disk.detail.contains(&format!("({devno})")),
        "{devno}: {}",
        disk.detail
    );
    let any_crypt = sh("cat /sys/block/dm-*/dm/uuid 2>/dev/null | grep -c '^CRYPT-' || true");
    if any_crypt == "0" {
        assert_ne!(disk.value, Tri::Yes, "{}", disk.detail);
    }

    // This test's own process is found by its comm; a made-up name is not.
    let me = std::fs::read_to_string("/proc/self/comm").expect("own comm");
    let me = me.trim().to_owned();
    let ghost = "wardgate-no-such-proc".to_owned();
    let procs = c.processes(&[me.clone(), ghost]);
    assert_eq!(procs.value, vec![me.clone()], "{}", procs.detail);
    assert!(
        procs
            .detail
            .contains(&format!("running (pid {})", std::process::id()))
            || procs.detail.contains(&format!("{me}: running")),
        "{}",
        procs.detail
    );
    assert!(procs.detail.contains("wardgate-no-such-proc: not running"));

    // Whatever the host's firewall and desktop, the checks answer with evidence.
    for f in [c.firewall(), c.screen_lock()] {
        assert!(!f.detail.is_empty());
    }
}

/// Runs the firewall tools inside a network namespace, so the test sees a ruleset it made.
struct InNetns<'a> {
    ns: &'a str,
    inner: SystemRunner,
}

impl Runner for InNetns<'_> {
    fn run(&self, program: &str, args: &[&str]) -> Result<Output, RunError> {
        let mut all = vec!["netns", "exec", self.ns, program];
        all.extend_from_slice(args);
        self.inner.run("ip", &all)
    }
}

/// A network namespace deleted on drop, also when an assertion fails.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!("wgp-{:08x}", rand::random::<u32>());
        sh(&format!("ip netns add {name}"));
        Self(name)
    }
    fn nft(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(args)
            .output()
            .expect("run nft");
        assert!(out.status.success(), "nft {args:?}: {out:?}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn real_nft_in_a_namespace_drop_then_accept() {
    assert_eq!(
        sh("id -u"),
        "0",
        "this test needs root (network namespaces), like the rest of the suite"
    );
    assert!(
        !sh("command -v nft || ls /usr/sbin/nft 2>/dev/null").is_empty(),
        "nft is missing: apt-get install nftables"
    );
    let ns = Netns::new();
    let runner = InNetns {
        ns: &ns.0,
        inner: SystemRunner::default(),
    };
    let host = || Host {
        root: "/".into(),
        env: Default::default(),
        runner: &runner,
    };
    let firewall = || Linux::new(host()).firewall();

    let f = firewall();
    assert_eq!(f.value, Tri::No, "fresh namespace: {}", f.detail);
    assert!(
        f.detail.starts_with("nftables ruleset is empty"),
        "{}",
        f.detail
    );

    ns.nft(&["add", "table", "inet", "filter"]);
    ns.nft(&[
        "add",
        "chain",
        "inet",
        "filter",
        "input",
        "{ type filter hook input priority 0; policy drop; }",
    ]);
    ns.nft(&[
        "add", "rule", "inet", "filter", "input", "iif", "lo", "accept",
    ]);
    let f = firewall();
    assert_eq!(f.value, Tri::Yes, "{}", f.detail);
    assert_eq!(
        f.detail,
        "nftables table inet filter chain input hook input policy drop"
    );

    ns.nft(&["chain", "inet", "filter", "input", "{ policy accept; }"]);
    let f = firewall();
    assert_eq!(f.value, Tri::No, "{}", f.detail);
    assert!(
        f.detail
            .contains("nftables table inet filter chain input hook input policy accept"),
        "{}",
        f.detail
    );

    // Accept policy, but a catch-all rule drops what the earlier rules did not accept.
    ns.nft(&["add", "rule", "inet", "filter", "input", "counter", "drop"]);
    let f = firewall();
    assert_eq!(f.value, Tri::Yes, "{}", f.detail);
    assert!(
        f.detail.ends_with("has an unconditional drop rule"),
        "{}",
        f.detail
    );
}
