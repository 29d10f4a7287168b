//! macOS posture: the OS version from `sw_vers`; FileVault, the application firewall and the
//! screen saver lock are not implemented yet and report unknown (the trait's defaults).

use super::{Collector, Finding, Host, OsInfo, run_ok};

/// The macOS collector over a [`Host`].
pub struct MacOs<'a> {
    host: Host<'a>,
}

impl<'a> MacOs<'a> {
    /// A collector reading `host`.
    pub fn new(host: Host<'a>) -> Self {
        Self { host }
    }
}

impl Collector for MacOs<'_> {
    fn os(&self) -> OsInfo {
        let kernel = match run_ok(self.host.runner, "uname", &["-r"]) {
            Ok(k) => Finding::new(Some(k.trim().to_owned()), "uname -r"),
            Err(e) => Finding::new(None, e),
        };
        match run_ok(self.host.runner, "sw_vers", &["-productVersion"]) {
            Ok(v) if !v.trim().is_empty() => OsInfo {
                id: "macos".into(),
                version: Some(v.trim().to_owned()),
                name: Some(format!("macOS {}", v.trim())),
                detail: "sw_vers -productVersion".into(),
                kernel,
            },
            Ok(_) => OsInfo {
                id: "macos".into(),
                version: None,
                name: None,
                detail: "sw_vers printed no version".into(),
                kernel,
            },
            Err(e) => OsInfo {
                id: "macos".into(),
                version: None,
                name: None,
                detail: e,
                kernel,
            },
        }
    }
}
