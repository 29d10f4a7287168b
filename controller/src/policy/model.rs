//! What administrators configure: resources, policies with their conditions, posture
//! profiles, and the set of them that is validated and compiled as one.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use wardgate_common::rule::{IpPrefix, Rule};

use super::posture::PostureProfile;
use super::window::WindowSpec;

/// Something clinicians reach through Wardgate (`ehr-web`, `pacs`): its addresses, exactly
/// which protocols and ports a grant for it opens, and the gateways that serve it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// Unique name users ask for (`wardgate connect ehr-web`).
    pub name: String,
    /// The resource's addresses; clients route these. Every rule lies inside one of them.
    pub addresses: Vec<IpPrefix>,
    /// What a grant allows: destination prefix, protocol, ports. Sent to gateway and client.
    pub rules: Vec<Rule>,
    /// Names of the gateways that serve it; a grant is pushed to each.
    pub gateways: Vec<String>,
    /// Free-form labels for reporting and policy review, e.g. `phi`.
    #[serde(default)]
    pub labels: BTreeSet<String>,
    /// Whether break-glass (emergency) access may be used for it. Carried for the
    /// break-glass flow; [`decide`](super::decide) does not change its rules because of it.
    #[serde(default)]
    pub emergency: bool,
}

/// Who may use which resources, under which conditions. Access is the union of policies:
/// a request is allowed when any one policy for the resource allows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Unique name, shown in decisions and the audit log.
    pub name: String,
    /// Groups whose members the policy covers (any one suffices).
    pub groups: Vec<String>,
    /// Resources it covers, by name.
    pub resources: Vec<String>,
    /// What must hold, and how long a grant may last.
    pub conditions: Conditions,
}

/// The conditions of a [`Policy`]. All must hold for it to allow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conditions {
    /// The sign-in must have used multi-factor authentication. Defaults to `true` when the
    /// field is left out: waiving MFA has to be written down.
    #[serde(default = "yes")]
    pub mfa_required: bool,
    /// Name of the [`PostureProfile`] the device must satisfy; `None` = no posture check.
    #[serde(default)]
    pub posture_profile: Option<String>,
    /// Weekly windows in which access is possible (any of them); empty = at any time.
    #[serde(default)]
    pub windows: Vec<WindowSpec>,
    /// Longest a single grant may last; renewal makes a new decision. Must not be zero.
    #[serde(with = "duration_text")]
    pub max_grant: Duration,
    /// Longest a login session may be used for this policy, counted from sign-in; older
    /// sign-ins must sign in again. Must not be zero.
    #[serde(with = "duration_text")]
    pub session_lifetime: Duration,
    /// Access only inside a window someone else approved (vendors): the user asks with
    /// `wardgate request`, a member of `approvers` approves, and grants end at the window's
    /// end. `None` = no request needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// Break-glass: members of the policy's groups may take emergency access to its
    /// resources without windows or approvals, for at most `cap`, with a reason and MFA. Only
    /// valid when every resource of the policy is marked `emergency`, so that emergency access
    /// is a property an administrator chose for the resource, not a side effect of a policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub break_glass: Option<BreakGlass>,
    /// Whether an administrator may hand out a grant under this policy as a standard
    /// WireGuard configuration (`grant export`), for a vendor device that cannot run the
    /// client. Off unless written down: such a device reports no posture.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wireguard_export: bool,
}

/// The approval condition of a [`Policy`]: who approves, and the longest window they may
/// approve at once (a longer need is several requests, each looked at by a person).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The group whose members approve requests (never the requester themself).
    pub approvers: String,
    /// Longest window one request may ask for. Must not be zero.
    #[serde(with = "duration_text")]
    pub max_window: Duration,
}

/// The break-glass part of a policy's [`Conditions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakGlass {
    /// Longest an emergency grant lasts (e.g. `30m`); it is not renewed beyond this.
    #[serde(with = "duration_text")]
    pub cap: Duration,
}

fn yes() -> bool {
    true
}

/// Everything the engine decides from that an administrator configures, validated and
/// compiled as one so that no reference in it dangles.
///
/// `groups` and `gateways` are the names known to the controller (from the store and the
/// identity provider); policies and resources may only name those.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySet {
    /// Known group names.
    #[serde(default)]
    pub groups: BTreeSet<String>,
    /// Known gateway names.
    #[serde(default)]
    pub gateways: BTreeSet<String>,
    /// Resources.
    #[serde(default)]
    pub resources: Vec<Resource>,
    /// Posture profiles.
    #[serde(default)]
    pub posture_profiles: Vec<PostureProfile>,
    /// Policies. Their order breaks ties (see [`decide`](super::decide)).
    #[serde(default)]
    pub policies: Vec<Policy>,
}

/// Serde for durations as people write them: `"8h"`, `"30m"`, `"1h 30m"` (humantime).
pub(crate) mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes e.g. `"8h"`.
    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    /// Reads e.g. `"30m"` or `"1h 30m"`.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration ({e}): write e.g. 30m, 8h or 1h 30m"
            ))
        })
    }
}

/// Serde for shared names (`Arc<str>`) without serde's `rc` feature: as plain strings.
pub(crate) mod arc_str {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
        Ok(String::deserialize(d)?.into())
    }
}
