//! `cargo run --bin …` builds only this package; the demo and the bench also run the
//! controller, gateway and client binaries, so build them with the same profile first (a
//! no-op when they are fresh).

/// Builds the sibling binaries when run under cargo (`CARGO` is set).
pub fn build_siblings() -> anyhow::Result<()> {
    let Ok(cargo) = std::env::var("CARGO") else {
        return Ok(());
    };
    let release = std::env::current_exe()?
        .parent()
        .is_some_and(|d| d.ends_with("release"));
    let mut c = std::process::Command::new(cargo);
    c.args(["build", "--bins", "--workspace"]);
    if release {
        c.arg("--release");
    }
    let st = c.status()?;
    if !st.success() {
        anyhow::bail!("building the controller, gateway and client binaries failed");
    }
    Ok(())
}
