//! Validation of a whole [`PolicySet`]: pure, and reporting every problem at once so an
//! administrator can fix a change in one go.
//!
//! # Overlapping resources
//!
//! Two resources served by the same gateway **overlap** when one destination — address,
//! protocol and port — belongs to both: their prefixes overlap (one contains the other), their
//! protocols are the same or one is `any`, and their port ranges intersect (no ports = all).
//! That is an error, because whoever may use the less protected of the two would then reach
//! that part of the other without its policy (a `phi` database behind a looser web resource).
//! Sharing only an address is fine (`ehr-web` tcp/443 and `ehr-db` tcp/5432 on one host are
//! different services), and so is overlap across different gateways (sites often reuse the
//! same private ranges).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use wardgate_common::rule::{IpPrefix, PortRange, Proto, Rule};

use super::model::{PolicySet, Resource};
use super::window::{Window, WindowError};

/// One problem in a policy set; the message says what is wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A resource, policy or posture profile without a name.
    #[error("a {kind} has an empty name: give it one")]
    EmptyName {
        /// `resource`, `policy` or `posture profile`.
        kind: &'static str,
    },
    /// Two of a kind share a name.
    #[error("{kind} {name} is defined more than once: names must be unique")]
    DuplicateName {
        /// `resource`, `policy` or `posture profile`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A policy names a group the controller does not know.
    #[error("policy {policy} names group {group}, which does not exist: create it or fix the name")]
    UnknownGroup {
        /// The policy.
        policy: String,
        /// The group.
        group: String,
    },
    /// A policy names a resource that does not exist.
    #[error(
        "policy {policy} names resource {resource}, which does not exist: create it or fix the name"
    )]
    UnknownResource {
        /// The policy.
        policy: String,
        /// The resource.
        resource: String,
    },
    /// A policy names a posture profile that does not exist.
    #[error(
        "policy {policy} names posture profile {profile}, which does not exist: create it or fix the name"
    )]
    UnknownPostureProfile {
        /// The policy.
        policy: String,
        /// The profile.
        profile: String,
    },
    /// A resource names a gateway that has not joined.
    #[error(
        "resource {resource} names gateway {gateway}, which does not exist: join it first or fix the name"
    )]
    UnknownGateway {
        /// The resource.
        resource: String,
        /// The gateway.
        gateway: String,
    },
    /// A policy covers no group, so it allows nobody.
    #[error("policy {policy} names no groups: add the groups it is for")]
    NoGroups {
        /// The policy.
        policy: String,
    },
    /// A policy covers no resource, so it allows nothing.
    #[error("policy {policy} names no resources: add the resources it is for")]
    NoResources {
        /// The policy.
        policy: String,
    },
    /// A resource with no rules: a grant for it would open nothing.
    #[error(
        "resource {resource} has no rules: add what a grant opens, e.g. tcp 10.10.1.10/32 port 443"
    )]
    NoRules {
        /// The resource.
        resource: String,
    },
    /// A resource no gateway serves: a grant could not be enforced anywhere.
    #[error("resource {resource} names no gateways: add the gateway that serves it")]
    NoGateways {
        /// The resource.
        resource: String,
    },
    /// A rule reaches outside the resource's addresses.
    #[error(
        "resource {resource}: rule \"{rule}\" lies outside its addresses: add the address or narrow the rule"
    )]
    RuleOutsideAddresses {
        /// The resource.
        resource: String,
        /// The rule.
        rule: Rule,
    },
    /// Ports on a protocol without ports (icmp, any).
    #[error(
        "resource {resource}: rule \"{rule}\" gives ports for {proto}, which has none: remove the ports or use tcp/udp"
    )]
    PortsWithoutPortProtocol {
        /// The resource.
        resource: String,
        /// The rule.
        rule: Rule,
        /// Its protocol.
        proto: Proto,
    },
    /// Two resources on one gateway share a destination (see the module docs).
    #[error(
        "resources {first} and {second} overlap on gateway {gateway} (\"{first_rule}\" and \
         \"{second_rule}\"): a grant for one would reach the other; make their addresses, \
         protocols or ports disjoint, or serve them from different gateways"
    )]
    OverlappingResources {
        /// The gateway serving both.
        gateway: String,
        /// The first resource (in set order).
        first: String,
        /// The second resource.
        second: String,
        /// The first's overlapping rule.
        first_rule: Rule,
        /// The second's overlapping rule.
        second_rule: Rule,
    },
    /// A window that cannot be read.
    #[error("policy {policy}, window {window}: {problem}")]
    BadWindow {
        /// The policy.
        policy: String,
        /// The window's position, counting from 1.
        window: usize,
        /// What is wrong.
        problem: WindowError,
    },
    /// `max_grant` is zero: every grant would end as it starts.
    #[error("policy {policy} has a maximum grant of zero: set it, e.g. 8h")]
    ZeroMaxGrant {
        /// The policy.
        policy: String,
    },
    /// `session_lifetime` is zero: no sign-in would ever be valid.
    #[error("policy {policy} has a session lifetime of zero: set it, e.g. 12h")]
    ZeroSessionLifetime {
        /// The policy.
        policy: String,
    },
    /// An approval condition names a group that does not exist.
    #[error(
        "policy {policy} has approvers {group}, which does not exist: create the group or fix the name"
    )]
    UnknownApproverGroup {
        /// The policy.
        policy: String,
        /// The group.
        group: String,
    },
    /// An approval condition's longest window is zero: nothing could ever be approved.
    #[error("policy {policy} allows approved windows of zero length: set max_window, e.g. 8h")]
    ZeroMaxWindow {
        /// The policy.
        policy: String,
    },
    /// A policy allows break-glass for a resource not marked as emergency-capable.
    #[error(
        "policy {policy} allows break-glass for resource {resource}, which is not marked for \
         emergencies: set \"emergency\": true on the resource, or remove break_glass from the \
         policy (or the resource from it)"
    )]
    BreakGlassNotEmergency {
        /// The policy.
        policy: String,
        /// The resource.
        resource: String,
    },
    /// A break-glass cap of zero: emergency grants would end as they start.
    #[error("policy {policy} has a break-glass cap of zero: set it, e.g. 30m")]
    ZeroBreakGlassCap {
        /// The policy.
        policy: String,
    },
    /// `max_report_age` is zero: every report would be stale on arrival.
    #[error("posture profile {profile} has a maximum report age of zero: set it, e.g. 2m")]
    ZeroMaxReportAge {
        /// The profile.
        profile: String,
    },
}

/// Checks a policy set and returns every problem found, in a stable order (names, then
/// resources, then profiles, then policies, then overlaps). A set that passes can be compiled
/// by [`CompiledPolicies::new`](super::CompiledPolicies::new), which calls this first.
pub fn validate(set: &PolicySet) -> Result<(), Vec<ValidationError>> {
    let mut errors = Vec::new();
    let resources = names(
        "resource",
        set.resources.iter().map(|r| r.name.as_str()),
        &mut errors,
    );
    let profiles = names(
        "posture profile",
        set.posture_profiles.iter().map(|p| p.name.as_str()),
        &mut errors,
    );
    names(
        "policy",
        set.policies.iter().map(|p| p.name.as_str()),
        &mut errors,
    );

    for r in &set.resources {
        check_resource(r, &set.gateways, &mut errors);
    }
    for p in &set.posture_profiles {
        if p.max_report_age == Duration::ZERO {
            errors.push(ValidationError::ZeroMaxReportAge {
                profile: p.name.clone(),
            });
        }
    }
    for p in &set.policies {
        let policy = || p.name.clone();
        if p.groups.is_empty() {
            errors.push(ValidationError::NoGroups { policy: policy() });
        }
        for g in &p.groups {
            if !set.groups.contains(g) {
                errors.push(ValidationError::UnknownGroup {
                    policy: policy(),
                    group: g.clone(),
                });
            }
        }
        if p.resources.is_empty() {
            errors.push(ValidationError::NoResources { policy: policy() });
        }
        for r in &p.resources {
            if !resources.contains(r.as_str()) {
                errors.push(ValidationError::UnknownResource {
                    policy: policy(),
                    resource: r.clone(),
                });
            }
        }
        let c = &p.conditions;
        let unknown = |name: &&String| !profiles.contains(name.as_str());
        if let Some(profile) = c.posture_profile.as_ref().filter(unknown) {
            errors.push(ValidationError::UnknownPostureProfile {
                policy: policy(),
                profile: profile.clone(),
            });
        }
        for (i, spec) in c.windows.iter().enumerate() {
            if let Err(problems) = Window::parse(spec) {
                errors.extend(
                    problems
                        .into_iter()
                        .map(|problem| ValidationError::BadWindow {
                            policy: policy(),
                            window: i + 1,
                            problem,
                        }),
                );
            }
        }
        if c.max_grant == Duration::ZERO {
            errors.push(ValidationError::ZeroMaxGrant { policy: policy() });
        }
        if c.session_lifetime == Duration::ZERO {
            errors.push(ValidationError::ZeroSessionLifetime { policy: policy() });
        }
        if let Some(a) = &c.approval {
            if !set.groups.contains(&a.approvers) {
                errors.push(ValidationError::UnknownApproverGroup {
                    policy: policy(),
                    group: a.approvers.clone(),
                });
            }
            if a.max_window == Duration::ZERO {
                errors.push(ValidationError::ZeroMaxWindow { policy: policy() });
            }
        }
        if let Some(bg) = &c.break_glass {
            if bg.cap == Duration::ZERO {
                errors.push(ValidationError::ZeroBreakGlassCap { policy: policy() });
            }
            for r in &p.resources {
                let emergency = set
                    .resources
                    .iter()
                    .find(|res| &res.name == r)
                    .is_none_or(|res| res.emergency);
                if !emergency {
                    errors.push(ValidationError::BreakGlassNotEmergency {
                        policy: policy(),
                        resource: r.clone(),
                    });
                }
            }
        }
    }
    check_overlaps(&set.resources, &mut errors);

    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Collects names, reporting empty and duplicate ones.
fn names<'a>(
    kind: &'static str,
    all: impl Iterator<Item = &'a str>,
    errors: &mut Vec<ValidationError>,
) -> BTreeSet<&'a str> {
    let mut seen = BTreeSet::new();
    let mut reported = BTreeSet::new();
    for name in all {
        if name.trim().is_empty() {
            errors.push(ValidationError::EmptyName { kind });
        } else if !seen.insert(name) && reported.insert(name) {
            errors.push(ValidationError::DuplicateName {
                kind,
                name: name.to_owned(),
            });
        }
    }
    seen
}

fn check_resource(r: &Resource, gateways: &BTreeSet<String>, errors: &mut Vec<ValidationError>) {
    let resource = || r.name.clone();
    if r.rules.is_empty() {
        errors.push(ValidationError::NoRules {
            resource: resource(),
        });
    }
    if r.gateways.is_empty() {
        errors.push(ValidationError::NoGateways {
            resource: resource(),
        });
    }
    for g in &r.gateways {
        if !gateways.contains(g) {
            errors.push(ValidationError::UnknownGateway {
                resource: resource(),
                gateway: g.clone(),
            });
        }
    }
    for rule in &r.rules {
        if !r.addresses.iter().any(|a| prefix_within(rule.dst, *a)) {
            errors.push(ValidationError::RuleOutsideAddresses {
                resource: resource(),
                rule: *rule,
            });
        }
        if rule.ports.is_some() && !matches!(rule.proto, Proto::Tcp | Proto::Udp) {
            errors.push(ValidationError::PortsWithoutPortProtocol {
                resource: resource(),
                rule: *rule,
                proto: rule.proto,
            });
        }
    }
}

/// Whether `inner` lies wholly inside `outer`.
fn prefix_within(inner: IpPrefix, outer: IpPrefix) -> bool {
    inner.len() >= outer.len() && outer.contains(inner.addr())
}

/// Whether two prefixes share an address: for prefixes, one then contains the other.
fn prefixes_overlap(a: IpPrefix, b: IpPrefix) -> bool {
    prefix_within(a, b) || prefix_within(b, a)
}

fn ports_overlap(a: Option<PortRange>, b: Option<PortRange>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.first() <= b.last() && b.first() <= a.last(),
        _ => true,
    }
}

/// Whether some packet would match both rules.
fn rules_overlap(a: &Rule, b: &Rule) -> bool {
    let protos = a.proto == b.proto || a.proto == Proto::Any || b.proto == Proto::Any;
    protos && prefixes_overlap(a.dst, b.dst) && ports_overlap(a.ports, b.ports)
}

/// Reports each pair of resources that overlap on a gateway they share, once per gateway,
/// naming the first overlapping pair of rules.
fn check_overlaps(resources: &[Resource], errors: &mut Vec<ValidationError>) {
    let mut by_gateway: BTreeMap<&str, Vec<&Resource>> = BTreeMap::new();
    for r in resources {
        let mut seen = BTreeSet::new();
        for g in &r.gateways {
            if seen.insert(g.as_str()) {
                by_gateway.entry(g.as_str()).or_default().push(r);
            }
        }
    }
    for (gateway, served) in by_gateway {
        for (i, a) in served.iter().enumerate() {
            for b in served.iter().skip(i + 1) {
                if a.name == b.name {
                    continue; // a duplicate name, reported already
                }
                let hit = a
                    .rules
                    .iter()
                    .flat_map(|ra| b.rules.iter().map(move |rb| (ra, rb)))
                    .find(|(ra, rb)| rules_overlap(ra, rb));
                if let Some((ra, rb)) = hit {
                    errors.push(ValidationError::OverlappingResources {
                        gateway: gateway.to_owned(),
                        first: a.name.clone(),
                        second: b.name.clone(),
                        first_rule: *ra,
                        second_rule: *rb,
                    });
                }
            }
        }
    }
}
