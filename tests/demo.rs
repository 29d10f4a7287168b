//! The README's first command must keep working: the all-in-one demo plays S1 (with a
//! renewal), S2 and S7 and verifies the audit chain, with the real binaries and no root.

#[test]
fn demo_plays_s1_s2_s7_and_exits_zero() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wardgate-demo"))
        .arg("demo")
        .env_remove("CARGO")
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expect in [
        "decision: ALLOW",
        "renewed: grant",
        "You are not in a group that may use ehr-db (needs: dba)",
        "the EHR no longer answers",
        "device revoked by an administrator",
        "audit log intact",
        "S1, S2 and S7 held",
    ] {
        assert!(stdout.contains(expect), "missing {expect:?} in:\n{stdout}");
    }
}
