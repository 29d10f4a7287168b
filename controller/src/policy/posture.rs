//! Device posture: what a profile demands ([`PostureProfile`]) and what a device reported
//! ([`PostureReport`]).
//!
//! A fact the client could not determine is [`Tri::Unknown`], and **unknown never passes** a
//! check that needs the fact: a laptop that cannot show its disk is encrypted is treated like
//! one whose disk is not.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::model::duration_text;

/// A yes/no fact that may not be known. Collectors report [`Tri::Unknown`] rather than guess.
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
    /// Whether this passes a check that needs the fact to hold: only [`Tri::Yes`] does.
    pub fn passes(self) -> bool {
        self == Tri::Yes
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

/// A dotted numeric version (`24.04`, `14.5.1`, `10.0.22631.4169`), compared numerically
/// part by part with missing parts as zero (`24.04` = `24.4.0`), shown as written.
///
/// Up to four numeric parts; anything after them that starts with `-`, `+` or a space
/// (`"24.04.1 LTS"`, `"1.2.0-beta"`) is kept for display and ignored for comparison. Stored
/// inline so that comparing needs no allocation.
#[derive(Debug, Clone)]
pub struct Version {
    parts: [u32; 4],
    text: Box<str>,
}

/// Why a version string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a version: write up to four numbers separated by dots, e.g. 24.04 or 10.0.22631"
)]
pub struct VersionError(String);

impl Version {
    /// The numeric parts, zero-padded to four.
    pub fn parts(&self) -> [u32; 4] {
        self.parts
    }
}

impl FromStr for Version {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || VersionError(s.to_owned());
        let text = s.trim();
        let body = text.strip_prefix(['v', 'V']).unwrap_or(text);
        let numeric_end = body
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(body.len());
        let (numeric, rest) = body.split_at(numeric_end);
        if !(rest.is_empty() || rest.starts_with(['-', '+', ' '])) || numeric.is_empty() {
            return Err(bad());
        }
        let mut parts = [0u32; 4];
        for (i, piece) in numeric.split('.').enumerate() {
            let slot = parts.get_mut(i).ok_or_else(bad)?;
            *slot = piece.parse().map_err(|_| bad())?;
        }
        Ok(Version {
            parts,
            text: text.into(),
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.parts == other.parts
    }
}

impl Eq for Version {}

impl Hash for Version {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.parts.hash(state);
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.parts.cmp(&other.parts)
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a device must show to use a resource whose policy names this profile.
///
/// Every `*_required` flag that is set needs the fact to be [`Tri::Yes`]. A report older than
/// `max_report_age` fails as a whole: stale facts prove nothing about the device now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostureProfile {
    /// Name policies refer to, e.g. `clinical-laptop`.
    pub name: String,
    /// Minimum OS version per platform, keyed by the OS id the client reports (os-release
    /// `ID` such as `ubuntu`, or `macos`, `windows`; compared ignoring ASCII case). When the
    /// map is not empty it is also the list of allowed platforms: an OS missing from it fails.
    #[serde(default)]
    pub min_os_version: BTreeMap<String, Version>,
    /// The system disk must be encrypted.
    #[serde(default)]
    pub disk_encryption_required: bool,
    /// A host firewall must be active.
    #[serde(default)]
    pub firewall_required: bool,
    /// The screen must lock by itself.
    #[serde(default)]
    pub screen_lock_required: bool,
    /// Processes that must be running (e.g. an EDR agent), by process name.
    #[serde(default)]
    pub required_processes: Vec<String>,
    /// Oldest Wardgate client version accepted.
    #[serde(default)]
    pub min_client_version: Option<Version>,
    /// How old (by the controller's clock at receipt) a report may be and still count.
    #[serde(with = "duration_text")]
    pub max_report_age: Duration,
}

/// What a device last reported about itself: the posture facts the engine is given.
///
/// `at` is when the controller received the report (its own clock), so a report's age never
/// depends on the device's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostureReport {
    /// OS id (os-release `ID`, or `macos`, `windows`).
    pub os: String,
    /// OS version, `None` when the client could not read it.
    pub os_version: Option<Version>,
    /// Whether the system disk is encrypted.
    pub disk_encrypted: Tri,
    /// Whether a host firewall is active.
    pub firewall: Tri,
    /// Whether the screen locks by itself.
    pub screen_lock: Tri,
    /// Names of running processes the client was asked to look for.
    #[serde(default)]
    pub processes: Vec<String>,
    /// The Wardgate client's version, `None` if not reported.
    pub client_version: Option<Version>,
    /// When the controller received the report.
    pub at: Timestamp,
}

impl PostureProfile {
    /// The minimum version for `os`, and whether `os` is allowed at all.
    pub(crate) fn os_rule(&self, os: &str) -> OsRule<'_> {
        if self.min_os_version.is_empty() {
            return OsRule::Any;
        }
        match self
            .min_os_version
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(os))
        {
            Some((_, min)) => OsRule::AtLeast(min),
            None => OsRule::NotAllowed,
        }
    }
}

/// What a profile says about one OS.
pub(crate) enum OsRule<'a> {
    /// The profile sets no OS rules.
    Any,
    /// Allowed from this version on.
    AtLeast(&'a Version),
    /// The profile lists OSes and this is not one of them.
    NotAllowed,
}
