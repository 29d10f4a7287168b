//! Every Linux check against fixture roots and canned command output: pass, fail and unknown
//! for each.

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::Path;

use wardgate_common::posture::{Fact, Tri};

use super::*;
use crate::posture::{Options, Output, RunError, Runner, report};

/// Answers commands from a table; anything not in it is "not installed".
#[derive(Default)]
struct Fake {
    answers: BTreeMap<String, Output>,
}

impl Fake {
    fn ok(mut self, cmd: &str, stdout: &str) -> Self {
        self.answers.insert(
            cmd.into(),
            Output {
                success: true,
                code: Some(0),
                stdout: stdout.into(),
                stderr: String::new(),
            },
        );
        self
    }
    fn fail(mut self, cmd: &str, stderr: &str) -> Self {
        self.answers.insert(
            cmd.into(),
            Output {
                success: false,
                code: Some(1),
                stdout: String::new(),
                stderr: stderr.into(),
            },
        );
        self
    }
}

impl Runner for Fake {
    fn run(&self, program: &str, args: &[&str]) -> Result<Output, RunError> {
        let key = std::iter::once(program)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        self.answers
            .get(&key)
            .cloned()
            .ok_or_else(|| RunError::NotFound {
                program: program.into(),
            })
    }
}

fn write(root: &Path, path: &str, text: &str) {
    let p = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, text).expect("write");
}

fn host<'a>(root: &Path, env: &[(&str, &str)], runner: &'a dyn Runner) -> Host<'a> {
    Host {
        root: root.to_path_buf(),
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        runner,
    }
}

// --- OS ---------------------------------------------------------------------------------------

#[test]
fn os_release_is_read_with_quotes_and_kernel_from_proc() {
    let t = tempfile::tempdir().expect("tempdir");
    write(
        t.path(),
        "/etc/os-release",
        "# comment\nNAME=\"Ubuntu\"\nID=ubuntu\nVERSION_ID=\"24.04\"\nPRETTY_NAME=\"Ubuntu 24.04.1 LTS \\\"Noble\\\"\"\n",
    );
    write(t.path(), "/proc/sys/kernel/osrelease", "6.8.0-45-generic\n");
    let fake = Fake::default();
    let os = Linux::new(host(t.path(), &[], &fake)).os();
    assert_eq!(os.id, "ubuntu");
    assert_eq!(os.version.as_deref(), Some("24.04"));
    assert_eq!(os.name.as_deref(), Some("Ubuntu 24.04.1 LTS \"Noble\""));
    assert_eq!(os.kernel.value.as_deref(), Some("6.8.0-45-generic"));
    assert!(os.detail.starts_with("/etc/os-release"), "{}", os.detail);
}

#[test]
fn os_release_falls_back_to_usr_lib_and_id_defaults_to_linux() {
    let t = tempfile::tempdir().expect("tempdir");
    write(
        t.path(),
        "/usr/lib/os-release",
        "ID='arch'\nPRETTY_NAME='Arch Linux'\n",
    );
    let fake = Fake::default();
    let os = Linux::new(host(t.path(), &[], &fake)).os();
    assert_eq!(os.id, "arch");
    assert_eq!(os.version, None, "Arch has no VERSION_ID");
    assert!(
        os.detail.starts_with("/usr/lib/os-release"),
        "{}",
        os.detail
    );
    assert_eq!(os.kernel.value, None);
    assert!(
        os.kernel.detail.contains("cannot read"),
        "{}",
        os.kernel.detail
    );

    write(t.path(), "/etc/os-release", "VERSION_ID=1\n");
    let os = Linux::new(host(t.path(), &[], &fake)).os();
    assert_eq!(os.id, "linux", "os-release(5): ID defaults to linux");
}

#[test]
fn no_os_release_is_linux_with_unknown_version() {
    let t = tempfile::tempdir().expect("tempdir");
    let fake = Fake::default();
    let os = Linux::new(host(t.path(), &[], &fake)).os();
    assert_eq!((os.id.as_str(), os.version, os.name), ("linux", None, None));
    assert!(os.detail.contains("no readable"), "{}", os.detail);
}

// --- Disk encryption ---------------------------------------------------------------------------

/// A block device in the fixture's sysfs, with `dm/uuid` when it is device-mapper and
/// `slaves/` links to the devices below it, reachable as the kernel makes it reachable.
fn block(root: &Path, name: &str, devno: &str, dm_uuid: Option<&str>, slaves: &[&str]) {
    let dir = root.join("sys/devices/virtual/block").join(name);
    std::fs::create_dir_all(dir.join("slaves")).expect("mkdir");
    if let Some(u) = dm_uuid {
        write(&dir, "dm/uuid", &format!("{u}\n"));
    }
    for s in slaves {
        symlink(format!("../../{s}"), dir.join("slaves").join(s)).expect("slave link");
    }
    for (d, target) in [
        (
            "sys/dev/block",
            format!("../../devices/virtual/block/{name}"),
        ),
        (
            "sys/class/block",
            format!("../../devices/virtual/block/{name}"),
        ),
    ] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
        let link = root
            .join(d)
            .join(if d == "sys/dev/block" { devno } else { name });
        symlink(target, link).expect("dev link");
    }
}

fn mountinfo(root: &Path, devno: &str, fstype: &str, source: &str) {
    write(
        root,
        "/proc/self/mountinfo",
        &format!(
            "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
             27 1 {devno} / / rw,relatime shared:1 - {fstype} {source} rw,discard\n\
             30 27 0:25 / /run rw,nosuid - tmpfs tmpfs rw\n"
        ),
    );
}

fn disk(root: &Path) -> Finding<Tri> {
    let fake = Fake::default();
    Linux::new(host(root, &[], &fake)).disk_encrypted()
}

#[test]
fn disk_plain_root_is_not_encrypted() {
    let t = tempfile::tempdir().expect("tempdir");
    mountinfo(t.path(), "254:1", "ext4", "/dev/vda1");
    block(t.path(), "vda1", "254:1", None, &[]);
    let f = disk(t.path());
    assert_eq!(f.value, Tri::No, "{}", f.detail);
    assert!(
        f.detail
            .contains("/ is ext4 on /dev/vda1 (254:1): vda1 is a plain block device"),
        "{}",
        f.detail
    );
}

#[test]
fn disk_lvm_on_luks_is_encrypted() {
    let t = tempfile::tempdir().expect("tempdir");
    mountinfo(t.path(), "253:1", "ext4", "/dev/mapper/vg-root");
    block(t.path(), "dm-1", "253:1", Some("LVM-abcdef"), &["dm-0"]);
    block(
        t.path(),
        "dm-0",
        "253:0",
        Some("CRYPT-LUKS2-0123abcd-luks"),
        &["nvme0n1p3"],
    );
    block(t.path(), "nvme0n1p3", "259:3", None, &[]);
    let f = disk(t.path());
    assert_eq!(f.value, Tri::Yes, "{}", f.detail);
    assert!(
        f.detail
            .contains("dm-1 (LVM) sits on dm-0; dm-0 is dm-crypt (CRYPT-LUKS2)"),
        "{}",
        f.detail
    );
}

#[test]
fn disk_lvm_over_one_clear_and_one_encrypted_volume_is_not_encrypted() {
    let t = tempfile::tempdir().expect("tempdir");
    mountinfo(t.path(), "253:2", "xfs", "/dev/mapper/vg-root");
    block(t.path(), "dm-2", "253:2", Some("LVM-x"), &["dm-0", "sdb1"]);
    block(
        t.path(),
        "dm-0",
        "253:0",
        Some("CRYPT-LUKS1-aa-c"),
        &["sda2"],
    );
    block(t.path(), "sda2", "8:2", None, &[]);
    block(t.path(), "sdb1", "8:17", None, &[]);
    let f = disk(t.path());
    assert_eq!(f.value, Tri::No, "{}", f.detail);
    assert!(
        f.detail.contains("sdb1 is a plain block device"),
        "{}",
        f.detail
    );
}

#[test]
fn disk_dm_verity_authenticates_but_does_not_encrypt() {
    let t = tempfile::tempdir().expect("tempdir");
    mountinfo(t.path(), "253:0", "erofs", "/dev/mapper/root");
    block(
        t.path(),
        "dm-0",
        "253:0",
        Some("CRYPT-VERITY-99-root"),
        &["sda3"],
    );
    block(t.path(), "sda3", "8:3", None, &[]);
    let f = disk(t.path());
    assert_eq!(f.value, Tri::No, "{}", f.detail);
    assert!(f.detail.contains("dm-0 (CRYPT-VERITY)"), "{}", f.detail);
}

#[test]
fn disk_btrfs_with_anonymous_devno_follows_the_source_node() {
    let t = tempfile::tempdir().expect("tempdir");
    mountinfo(t.path(), "0:31", "btrfs", "/dev/mapper/luks-4d2a");
    write(t.path(), "/dev/dm-0", "");
    std::fs::create_dir_all(t.path().join("dev/mapper")).expect("mkdir");
    symlink("../dm-0", t.path().join("dev/mapper/luks-4d2a")).expect("node link");
    block(
        t.path(),
        "dm-0",
        "253:0",
        Some("CRYPT-LUKS2-4d2a-luks-4d2a"),
        &["nvme0n1p2"],
    );
    block(t.path(), "nvme0n1p2", "259:2", None, &[]);
    let f = disk(t.path());
    assert_eq!(f.value, Tri::Yes, "{}", f.detail);
}

#[test]
fn disk_from_proc_mounts_when_mountinfo_is_missing() {
    let t = tempfile::tempdir().expect("tempdir");
    write(
        t.path(),
        "/proc/mounts",
        "proc /proc proc rw 0 0\n/dev/sda1 / ext4 rw 0 0\n",
    );
    write(t.path(), "/dev/sda1", "");
    block(t.path(), "sda1", "8:1", None, &[]);
    let f = disk(t.path());
    assert_eq!(f.value, Tri::No, "{}", f.detail);
}

#[test]
fn disk_unknown_for_container_loop_unreadable_and_missing() {
    // A container's overlay root says nothing about the host's disk.
    let t = tempfile::tempdir().expect("tempdir");
    mountinfo(t.path(), "0:52", "overlay", "overlay");
    let f = disk(t.path());
    assert_eq!(f.value, Tri::Unknown, "{}", f.detail);
    assert!(
        f.detail.contains("not a local block device"),
        "{}",
        f.detail
    );

    // A loop device: the backing file's disk is not followed.
    let t = tempfile::tempdir().expect("tempdir");
    mountinfo(t.path(), "7:0", "ext4", "/dev/loop0");
    block(t.path(), "loop0", "7:0", None, &[]);
    assert_eq!(disk(t.path()).value, Tri::Unknown);

    // A device-mapper layer whose uuid cannot be read is not assumed clear or encrypted.
    let t = tempfile::tempdir().expect("tempdir");
    mountinfo(t.path(), "253:0", "ext4", "/dev/dm-0");
    block(t.path(), "dm-0", "253:0", None, &["sda2"]);
    std::fs::create_dir_all(t.path().join("sys/devices/virtual/block/dm-0/dm")).expect("mkdir");
    block(t.path(), "sda2", "8:2", None, &[]);
    let f = disk(t.path());
    assert_eq!(f.value, Tri::Unknown, "{}", f.detail);
    assert!(f.detail.contains("cannot read dm/uuid"), "{}", f.detail);

    // The device is not in sysfs.
    let t = tempfile::tempdir().expect("tempdir");
    mountinfo(t.path(), "8:1", "ext4", "/dev/sda1");
    let f = disk(t.path());
    assert_eq!(f.value, Tri::Unknown, "{}", f.detail);
    assert!(f.detail.contains("no sysfs entry"), "{}", f.detail);

    // No mount table at all.
    let t = tempfile::tempdir().expect("tempdir");
    assert_eq!(disk(t.path()).value, Tri::Unknown);
}

#[test]
fn disk_stack_cycle_stops_as_unknown() {
    let t = tempfile::tempdir().expect("tempdir");
    mountinfo(t.path(), "253:0", "ext4", "/dev/dm-0");
    block(t.path(), "dm-0", "253:0", Some("LVM-a"), &["dm-1"]);
    block(t.path(), "dm-1", "253:1", Some("LVM-b"), &["dm-0"]);
    let f = disk(t.path());
    assert_eq!(f.value, Tri::Unknown, "{}", f.detail);
}

// --- Firewall ----------------------------------------------------------------------------------

const META: &str = r#"{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}"#;

fn ruleset(items: &[&str]) -> String {
    let mut all = vec![META];
    all.extend_from_slice(items);
    format!(r#"{{"nftables": [{}]}}"#, all.join(", "))
}

const TABLE: &str = r#"{"table": {"family": "inet", "name": "filter", "handle": 1}}"#;
const INPUT_DROP: &str = r#"{"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}}"#;
const INPUT_ACCEPT: &str = r#"{"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}"#;
const LO_ACCEPT: &str = r#"{"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 2, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}, {"accept": null}]}}"#;
const SSH_DROP: &str = r#"{"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 3, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 22}}, {"drop": null}]}}"#;
const COUNTER_REJECT: &str = r#"{"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 4, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"reject": {"type": "icmpx", "expr": "port-unreachable"}}]}}"#;
const NFT: &str = "nft -j list ruleset";

fn fw(fake: &Fake) -> Finding<Tri> {
    let t = tempfile::tempdir().expect("tempdir");
    Linux::new(host(t.path(), &[], fake)).firewall()
}

#[test]
fn firewall_drop_policy_is_active() {
    let f = fw(&Fake::default().ok(NFT, &ruleset(&[TABLE, INPUT_DROP, LO_ACCEPT])));
    assert_eq!(f.value, Tri::Yes, "{}", f.detail);
    assert_eq!(
        f.detail,
        "nftables table inet filter chain input hook input policy drop"
    );
}

#[test]
fn firewall_accept_policy_with_catch_all_reject_is_active() {
    let f = fw(&Fake::default().ok(
        NFT,
        &ruleset(&[TABLE, INPUT_ACCEPT, LO_ACCEPT, COUNTER_REJECT]),
    ));
    assert_eq!(f.value, Tri::Yes, "{}", f.detail);
    assert!(
        f.detail.ends_with("has an unconditional reject rule"),
        "{}",
        f.detail
    );
}

#[test]
fn firewall_accept_policy_is_not_active() {
    // A drop that only matches port 22 leaves everything else open.
    let f = fw(&Fake::default().ok(NFT, &ruleset(&[TABLE, INPUT_ACCEPT, LO_ACCEPT, SSH_DROP])));
    assert_eq!(f.value, Tri::No, "{}", f.detail);
    assert!(
        f.detail
            .contains("no input chain drops by default: nftables table inet filter chain input hook input policy accept"),
        "{}",
        f.detail
    );
}

#[test]
fn firewall_empty_ruleset_is_not_active() {
    let f = fw(&Fake::default().ok(NFT, &ruleset(&[])));
    assert_eq!(f.value, Tri::No, "{}", f.detail);
    assert_eq!(
        f.detail,
        "nftables ruleset is empty; iptables-save is not installed"
    );
    // A table with no input chain (say, only NAT) filters nothing either.
    let f = fw(&Fake::default().ok(NFT, &ruleset(&[TABLE])));
    assert_eq!(f.value, Tri::No, "{}", f.detail);
}

#[test]
fn firewall_legacy_iptables_is_asked_when_nft_sees_nothing() {
    let save =
        "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n-A INPUT -i lo -j ACCEPT\nCOMMIT\n";
    let f = fw(&Fake::default()
        .ok(NFT, &ruleset(&[]))
        .ok("iptables-save", save));
    assert_eq!(f.value, Tri::Yes, "{}", f.detail);
    assert_eq!(f.detail, "iptables filter INPUT policy DROP");

    let save = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --dport 22 -j DROP\n-A INPUT -j REJECT --reject-with icmp-port-unreachable\nCOMMIT\n";
    let f = fw(&Fake::default().ok("iptables-save", save));
    assert_eq!(f.value, Tri::Yes, "{}", f.detail);

    let save = "*nat\n:INPUT DROP [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --dport 22 -j DROP\nCOMMIT\n";
    let f = fw(&Fake::default()
        .ok(NFT, &ruleset(&[]))
        .ok("iptables-save", save));
    assert_eq!(f.value, Tri::No, "{}", f.detail);
    assert!(
        f.detail.contains("iptables filter INPUT policy ACCEPT"),
        "{}",
        f.detail
    );
}

#[test]
fn firewall_unknown_when_no_tool_answers() {
    // Neither tool installed.
    let f = fw(&Fake::default());
    assert_eq!(f.value, Tri::Unknown, "{}", f.detail);
    assert_eq!(
        f.detail,
        "nft is not installed; iptables-save is not installed"
    );
    // Not root: both refuse.
    let f = fw(&Fake::default()
        .fail(NFT, "Error: Operation not permitted\n")
        .fail("iptables-save", "iptables-save v1.8.9: Permission denied\n"));
    assert_eq!(f.value, Tri::Unknown, "{}", f.detail);
    assert!(f.detail.contains("Operation not permitted"), "{}", f.detail);
    // Output nft cannot have meant.
    let f = fw(&Fake::default().ok(NFT, "{not json"));
    assert_eq!(f.value, Tri::Unknown, "{}", f.detail);
    assert!(f.detail.contains("invalid JSON"), "{}", f.detail);
}

// --- Screen lock -------------------------------------------------------------------------------

const GNOME: &[(&str, &str)] = &[
    ("WAYLAND_DISPLAY", "wayland-0"),
    ("XDG_CURRENT_DESKTOP", "ubuntu:GNOME"),
];

fn gnome(lock: &str, idle: &str, disabled: &str) -> Fake {
    Fake::default()
        .ok(
            "gsettings get org.gnome.desktop.screensaver lock-enabled",
            &format!("{lock}\n"),
        )
        .ok(
            "gsettings get org.gnome.desktop.session idle-delay",
            &format!("{idle}\n"),
        )
        .ok(
            "gsettings get org.gnome.desktop.lockdown disable-lock-screen",
            &format!("{disabled}\n"),
        )
}

fn lock(env: &[(&str, &str)], fake: &Fake, root: Option<&Path>) -> Finding<Tri> {
    let t = tempfile::tempdir().expect("tempdir");
    Linux::new(host(root.unwrap_or(t.path()), env, fake)).screen_lock()
}

#[test]
fn screen_lock_gnome_enabled_with_idle_delay() {
    let f = lock(GNOME, &gnome("true", "uint32 300", "false"), None);
    assert_eq!(f.value, Tri::Yes, "{}", f.detail);
    assert_eq!(
        f.detail,
        "GNOME screensaver lock-enabled true, session idle-delay 300 s, lockdown disable-lock-screen false"
    );
}

#[test]
fn screen_lock_gnome_disabled_or_never_idle_is_no() {
    for (l, i, d) in [
        ("false", "uint32 300", "false"),
        ("true", "uint32 0", "false"),
        ("true", "uint32 300", "true"),
    ] {
        let f = lock(GNOME, &gnome(l, i, d), None);
        assert_eq!(f.value, Tri::No, "{l} {i} {d}: {}", f.detail);
    }
}

#[test]
fn screen_lock_unknown_without_session_other_desktop_or_gsettings() {
    let f = lock(&[], &gnome("true", "uint32 300", "false"), None);
    assert_eq!(f.value, Tri::Unknown);
    assert_eq!(f.detail, "no desktop session");

    // logind shows someone's graphical session, but this process is not in it.
    let t = tempfile::tempdir().expect("tempdir");
    write(
        t.path(),
        "/run/systemd/sessions/2",
        "UID=1000\nUSER=alice\nACTIVE=1\nTYPE=wayland\nDESKTOP=GNOME\n",
    );
    let f = lock(&[], &Fake::default(), Some(t.path()));
    assert_eq!(f.value, Tri::Unknown);
    assert!(
        f.detail.contains("logind session 2 (uid 1000, wayland)"),
        "{}",
        f.detail
    );

    let kde = &[("DISPLAY", ":0"), ("XDG_CURRENT_DESKTOP", "KDE")];
    let f = lock(kde, &gnome("true", "uint32 300", "false"), None);
    assert_eq!(
        f.value,
        Tri::Unknown,
        "GNOME defaults say nothing about KDE"
    );
    assert!(f.detail.contains("GNOME only"), "{}", f.detail);

    let f = lock(&[("DISPLAY", ":0")], &Fake::default(), None);
    assert_eq!(f.value, Tri::Unknown);

    let f = lock(GNOME, &Fake::default(), None);
    assert_eq!(f.value, Tri::Unknown);
    assert!(
        f.detail.contains("gsettings is not installed"),
        "{}",
        f.detail
    );
}

// --- Processes ---------------------------------------------------------------------------------

fn process(root: &Path, pid: u32, comm: &str, argv: &[&str]) {
    write(root, &format!("/proc/{pid}/comm"), &format!("{comm}\n"));
    let mut cmdline = argv.join("\0");
    cmdline.push('\0');
    write(root, &format!("/proc/{pid}/cmdline"), &cmdline);
}

#[test]
fn processes_found_by_comm_or_argv0_and_missing_ones_named() {
    let t = tempfile::tempdir().expect("tempdir");
    process(t.path(), 1, "systemd", &["/sbin/init"]);
    process(
        t.path(),
        42,
        "edr-agent",
        &["/opt/edr/bin/edr-agent", "--daemon"],
    );
    // comm is cut to 15 bytes; argv[0] carries the full name.
    process(
        t.path(),
        77,
        "falcon-sensor-l",
        &["/opt/cs/falcon-sensor-longname"],
    );
    process(
        t.path(),
        78,
        "falcon-sensor-l",
        &["/opt/cs/falcon-sensor-longname"],
    );
    write(t.path(), "/proc/self/comm", "ignored\n");
    write(t.path(), "/proc/sys/kernel/osrelease", "6.1\n");
    let fake = Fake::default();
    let wanted: Vec<String> = ["edr-agent", "falcon-sensor-longname", "clamd", "edr-agent"]
        .map(String::from)
        .to_vec();
    let f = Linux::new(host(t.path(), &[], &fake)).processes(&wanted);
    assert_eq!(f.value, vec!["edr-agent", "falcon-sensor-longname"]);
    assert_eq!(
        f.detail,
        "edr-agent: running (pid 42); falcon-sensor-longname: running (pid 77); clamd: not running (4 processes in /proc)"
    );
}

#[test]
fn processes_none_running_or_proc_unreadable() {
    let t = tempfile::tempdir().expect("tempdir");
    process(t.path(), 1, "systemd", &["/sbin/init"]);
    let fake = Fake::default();
    let f = Linux::new(host(t.path(), &[], &fake)).processes(&["edr-agent".into()]);
    assert!(f.value.is_empty());
    assert_eq!(f.detail, "edr-agent: not running (1 processes in /proc)");

    let empty = tempfile::tempdir().expect("tempdir");
    let f = Linux::new(host(empty.path(), &[], &fake)).processes(&["edr-agent".into()]);
    assert!(f.value.is_empty());
    assert!(f.detail.starts_with("cannot list /proc"), "{}", f.detail);
}

// --- The whole report --------------------------------------------------------------------------

#[test]
fn report_from_a_fixture_machine_carries_every_fact_and_its_evidence() {
    let t = tempfile::tempdir().expect("tempdir");
    write(
        t.path(),
        "/etc/os-release",
        "ID=debian\nVERSION_ID=\"12\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
    );
    write(t.path(), "/proc/sys/kernel/osrelease", "6.1.0-25-amd64\n");
    mountinfo(t.path(), "253:0", "ext4", "/dev/mapper/root");
    block(
        t.path(),
        "dm-0",
        "253:0",
        Some("CRYPT-LUKS2-aa-root"),
        &["sda2"],
    );
    block(t.path(), "sda2", "8:2", None, &[]);
    process(t.path(), 42, "edr-agent", &["/opt/edr/bin/edr-agent"]);
    let fake = gnome("true", "uint32 300", "false").ok(NFT, &ruleset(&[TABLE, INPUT_DROP]));
    let c = Linux::new(host(t.path(), GNOME, &fake));
    let r = report(
        &c,
        &Options {
            required_processes: vec!["edr-agent".into()],
            device_cert: Some(t.path().join("device.pem")),
            counter: 5,
        },
    );
    assert_eq!(r.os, "debian");
    assert_eq!(r.os_version.as_deref(), Some("12"));
    assert_eq!(r.kernel.as_deref(), Some("6.1.0-25-amd64"));
    assert_eq!(
        (r.disk_encrypted, r.firewall, r.screen_lock),
        (Tri::Yes, Tri::Yes, Tri::Yes)
    );
    assert_eq!(r.processes, vec!["edr-agent"]);
    assert_eq!(r.client_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(r.device_fingerprint, None);
    assert_eq!(r.counter, 5);
    for f in Fact::ALL {
        assert!(
            r.detail.get(&f).is_some_and(|d| !d.is_empty()),
            "no evidence for {f}"
        );
    }
    let table = crate::posture::render_table(&r);
    assert!(table.contains("firewall            yes\n"), "{table}");
    assert!(
        table.contains("nftables table inet filter chain input"),
        "{table}"
    );
}
