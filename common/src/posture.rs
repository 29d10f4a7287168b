//! The device posture report as it travels from client to controller.
//!
//! The field names and meanings are those of the controller's policy `PostureReport`, so the
//! controller converts one into the other field by field: it parses `os_version` and
//! `client_version` into its own version type (a text it cannot read becomes "not reported")
//! and stamps the time of receipt itself, so a report's age never depends on the device's clock.
//! What the controller does not decide on (kernel, pretty name, evidence) is here for people:
//! audit rows and `wardgate posture` show *why* the client said what it said.
//!
//! A fact the client could not determine is [`Tri::Unknown`]. Collectors never guess
//! [`Tri::Yes`]: unknown fails a check that needs the fact, which is the safe direction.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A yes/no fact that may not be known, so that "could not tell" is never confused with "no"
/// in an audit trail nor with "yes" in a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tri {
    /// The fact holds.
    Yes,
    /// The fact does not hold.
    No,
    /// The client could not tell.
    Unknown,
}

impl Tri {
    /// Both must hold: any `No` wins, then any `Unknown`, so that one unreadable part of a
    /// stack makes the whole unknown rather than yes.
    pub fn and(self, other: Tri) -> Tri {
        match (self, other) {
            (Tri::No, _) | (_, Tri::No) => Tri::No,
            (Tri::Unknown, _) | (_, Tri::Unknown) => Tri::Unknown,
            (Tri::Yes, Tri::Yes) => Tri::Yes,
        }
    }
}

impl From<bool> for Tri {
    fn from(b: bool) -> Self {
        if b { Tri::Yes } else { Tri::No }
    }
}

impl fmt::Display for Tri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tri::Yes => "yes",
            Tri::No => "no",
            Tri::Unknown => "unknown",
        })
    }
}

/// The facts a report carries, naming the entries of [`PostureReport::detail`] so evidence is
/// keyed by a closed set rather than free text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fact {
    /// [`PostureReport::os`], [`PostureReport::os_version`] and [`PostureReport::os_name`].
    Os,
    /// [`PostureReport::kernel`].
    Kernel,
    /// [`PostureReport::disk_encrypted`].
    DiskEncrypted,
    /// [`PostureReport::firewall`].
    Firewall,
    /// [`PostureReport::screen_lock`].
    ScreenLock,
    /// [`PostureReport::processes`].
    Processes,
    /// [`PostureReport::client_version`].
    ClientVersion,
    /// [`PostureReport::device_fingerprint`].
    DeviceFingerprint,
}

impl Fact {
    /// Every fact, in the order reports show them.
    pub const ALL: [Fact; 8] = [
        Fact::Os,
        Fact::Kernel,
        Fact::DiskEncrypted,
        Fact::Firewall,
        Fact::ScreenLock,
        Fact::Processes,
        Fact::ClientVersion,
        Fact::DeviceFingerprint,
    ];
}

impl fmt::Display for Fact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fact::Os => "os",
            Fact::Kernel => "kernel",
            Fact::DiskEncrypted => "disk_encrypted",
            Fact::Firewall => "firewall",
            Fact::ScreenLock => "screen_lock",
            Fact::Processes => "processes",
            Fact::ClientVersion => "client_version",
            Fact::DeviceFingerprint => "device_fingerprint",
        })
    }
}

/// What a device says about itself, as sent to the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostureReport {
    /// OS id that profiles key minimum versions on: os-release `ID` (`ubuntu`, `debian`), or
    /// `macos`, `windows`.
    pub os: String,
    /// OS version as the OS writes it (os-release `VERSION_ID`), `None` when not readable.
    pub os_version: Option<String>,
    /// The OS's own display name (os-release `PRETTY_NAME`), for people reading audits.
    #[serde(default)]
    pub os_name: Option<String>,
    /// Kernel release (`uname -r`), for people investigating an incident.
    #[serde(default)]
    pub kernel: Option<String>,
    /// Whether the system disk is encrypted.
    pub disk_encrypted: Tri,
    /// Whether a host firewall is active (drops inbound traffic not explicitly allowed).
    pub firewall: Tri,
    /// Whether the screen locks by itself.
    pub screen_lock: Tri,
    /// Names of running processes among those the client was asked to look for.
    #[serde(default)]
    pub processes: Vec<String>,
    /// The Wardgate client's version, `None` if not reported.
    pub client_version: Option<String>,
    /// SHA-256 fingerprint (hex) of the enrolled device certificate, tying the report to the
    /// identity the controller already knows; `None` before enrolment.
    #[serde(default)]
    pub device_fingerprint: Option<String>,
    /// Strictly increasing per device, set by the sender, so the controller can refuse a
    /// replayed or reordered report.
    #[serde(default)]
    pub counter: u64,
    /// How each fact was determined, in words (e.g. `nftables table inet filter chain input
    /// policy drop`), so an auditor can check the client's reasoning.
    #[serde(default)]
    pub detail: BTreeMap<Fact, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tri_is_lowercase_on_the_wire_and_and_is_pessimistic() {
        assert_eq!(
            serde_json::to_string(&[Tri::Yes, Tri::No, Tri::Unknown]).ok(),
            Some(r#"["yes","no","unknown"]"#.to_owned())
        );
        assert_eq!(Tri::Yes.and(Tri::Unknown), Tri::Unknown);
        assert_eq!(Tri::Unknown.and(Tri::No), Tri::No);
        assert_eq!(Tri::Yes.and(Tri::Yes), Tri::Yes);
    }

    #[test]
    fn report_round_trips_with_fact_keys() {
        let mut detail = BTreeMap::new();
        detail.insert(
            Fact::Firewall,
            "nftables: inet filter input policy drop".to_owned(),
        );
        let r = PostureReport {
            os: "debian".into(),
            os_version: Some("12".into()),
            os_name: Some("Debian GNU/Linux 12 (bookworm)".into()),
            kernel: Some("6.1.0".into()),
            disk_encrypted: Tri::Unknown,
            firewall: Tri::Yes,
            screen_lock: Tri::No,
            processes: vec!["edr".into()],
            client_version: Some("0.1.0".into()),
            device_fingerprint: None,
            counter: 7,
            detail,
        };
        let text = serde_json::to_string(&r).expect("serialise");
        assert!(text.contains(r#""firewall":"yes""#), "{text}");
        assert!(text.contains(r#""detail":{"firewall":"#), "{text}");
        let back: PostureReport = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, r);
    }
}
