//! Windows posture: the OS version from `cmd /c ver`; BitLocker, Windows Defender Firewall and
//! the screen saver lock are not implemented yet and report unknown (the trait's defaults).

use super::{Collector, Finding, Host, OsInfo, run_ok};

/// The Windows collector over a [`Host`].
pub struct Windows<'a> {
    host: Host<'a>,
}

impl<'a> Windows<'a> {
    /// A collector reading `host`.
    pub fn new(host: Host<'a>) -> Self {
        Self { host }
    }
}

/// The version in `ver`'s banner: `Microsoft Windows [Version 10.0.22631.4169]`.
fn parse_ver(text: &str) -> Option<String> {
    let start = text.find("Version ")? + "Version ".len();
    let rest = text.get(start..)?;
    let end = rest.find(']').unwrap_or(rest.len());
    let v = rest.get(..end)?.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

impl Collector for Windows<'_> {
    fn os(&self) -> OsInfo {
        let (version, detail) = match run_ok(self.host.runner, "cmd", &["/c", "ver"]) {
            Ok(out) => match parse_ver(&out) {
                Some(v) => (Some(v), "cmd /c ver".to_owned()),
                None => (
                    None,
                    format!("cmd /c ver printed no version: {}", out.trim()),
                ),
            },
            Err(e) => (None, e),
        };
        OsInfo {
            id: "windows".into(),
            name: version.as_ref().map(|v| format!("Windows {v}")),
            version: version.clone(),
            detail,
            // The NT kernel's version is the OS build.
            kernel: Finding::new(version, "same as the OS build"),
        }
    }
}
