//! What the controller trusts about each OpenID provider: who may issue, for which client,
//! where groups live, which groups count, and what counts as multi-factor.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::IdentityError;

/// The signature algorithms an ID token may use. Only asymmetric ones: a symmetric `HS*` token
/// would be verified with the client secret, which every console instance holds, and accepting
/// it next to public keys is the classic algorithm-confusion hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SigningAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-256: what almost every IdP signs with by default.
    RS256,
    /// ECDSA P-256 with SHA-256: smaller tokens, offered by most IdPs.
    ES256,
}

impl SigningAlg {
    /// The JOSE name, as it appears in a token's `alg` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::ES256 => "ES256",
        }
    }

    /// Parses a JOSE `alg` name; `None` for anything not supported here (including `none`).
    pub fn from_jose(alg: &str) -> Option<Self> {
        match alg {
            "RS256" => Some(Self::RS256),
            "ES256" => Some(Self::ES256),
            _ => None,
        }
    }
}

/// When a login counts as multi-factor. IdPs say it differently: some list methods in `amr`
/// (RFC 8176: `mfa`, `otp`, `hwk`…), some name an assurance level in `acr`. Either match
/// suffices, so one rule fits both kinds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MfaRule {
    /// Any of these `amr` values makes the login multi-factor.
    pub amr_any: Vec<String>,
    /// An `acr` equal to any of these makes the login multi-factor.
    pub acr_any: Vec<String>,
}

impl Default for MfaRule {
    fn default() -> Self {
        Self {
            amr_any: vec!["mfa".into()],
            acr_any: Vec::new(),
        }
    }
}

impl MfaRule {
    /// Whether the token's `amr`/`acr` satisfy the rule.
    pub fn satisfied(&self, amr: &[String], acr: Option<&str>) -> bool {
        amr.iter().any(|m| self.amr_any.contains(m))
            || acr.is_some_and(|a| self.acr_any.iter().any(|x| x == a))
    }
}

/// How an IdP's group names become Wardgate group names. Per provider, so a vendor's IdP can
/// never hand its users a staff group just by naming it: with `keep_unmapped = false` only
/// the groups listed in `map` exist for that provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupMapping {
    /// IdP group name → Wardgate group name.
    pub map: BTreeMap<String, String>,
    /// Whether groups not in `map` pass through under their IdP name.
    pub keep_unmapped: bool,
}

impl Default for GroupMapping {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
            keep_unmapped: true,
        }
    }
}

impl GroupMapping {
    /// Maps the IdP's groups; the result is sorted and without duplicates.
    pub fn apply(&self, idp_groups: &[String]) -> Vec<String> {
        let mut out: Vec<String> = idp_groups
            .iter()
            .filter_map(|g| match self.map.get(g) {
                Some(mapped) => Some(mapped.clone()),
                None if self.keep_unmapped => Some(g.clone()),
                None => None,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// One trusted OpenID provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// A short name for logs, audit rows and errors ("staff", "vendor-acme").
    pub name: String,
    /// The issuer URL exactly as the IdP writes it in `iss` and in its discovery document.
    pub issuer: String,
    /// The client ids (audiences) whose ID tokens the controller accepts from this issuer: the
    /// `wardgate` client, and the admin console's client when it has its own.
    pub client_ids: Vec<String>,
    /// The claim holding the user's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// How the IdP's groups become Wardgate groups.
    #[serde(default)]
    pub groups: GroupMapping,
    /// What counts as multi-factor.
    #[serde(default)]
    pub mfa: MfaRule,
    /// Accepted signature algorithms.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<SigningAlg>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
    /// Wardgate groups (after mapping) whose members may use the admin API with this
    /// provider's ID tokens. Empty: nobody from this provider is an administrator.
    #[serde(default)]
    pub admin_groups: Vec<String>,
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_algorithms() -> Vec<SigningAlg> {
    vec![SigningAlg::RS256, SigningAlg::ES256]
}

fn default_leeway() -> u64 {
    60
}

/// The largest clock skew allowed: beyond this a stolen expired token lives too long.
pub const MAX_LEEWAY_S: u64 = 300;

impl ProviderConfig {
    /// A provider with the defaults: `groups` claim, groups kept as named, MFA when `amr`
    /// holds `mfa`, RS256 or ES256, 60 s of skew.
    pub fn new(name: &str, issuer: &str, client_id: &str) -> Self {
        Self {
            name: name.into(),
            issuer: issuer.into(),
            client_ids: vec![client_id.into()],
            groups_claim: default_groups_claim(),
            groups: GroupMapping::default(),
            mfa: MfaRule::default(),
            algorithms: default_algorithms(),
            leeway_s: default_leeway(),
            admin_groups: Vec::new(),
        }
    }

    /// Checks the configuration before any token meets it, so a typo fails at start-up with
    /// the fix named rather than as a confusing rejection at the first login.
    pub fn validate(&self) -> Result<(), IdentityError> {
        let bad = |detail: String| IdentityError::Config {
            provider: self.name.clone(),
            detail,
        };
        if self.name.trim().is_empty() {
            return Err(bad("give the provider a name".into()));
        }
        check_url("issuer", &self.issuer).map_err(bad)?;
        if self.client_ids.is_empty() || self.client_ids.iter().any(|c| c.is_empty()) {
            return Err(bad(
                "list the client id(s) registered at the IdP for Wardgate in client_ids".into(),
            ));
        }
        if self.groups_claim.is_empty() {
            return Err(bad(
                "groups_claim is empty: name the claim holding groups (usually `groups`)".into(),
            ));
        }
        if self.algorithms.is_empty() {
            return Err(bad("algorithms is empty: allow RS256 and/or ES256".into()));
        }
        if self.leeway_s > MAX_LEEWAY_S {
            return Err(bad(format!(
                "leeway_s {} is above {MAX_LEEWAY_S}: fix the clocks (NTP) instead",
                self.leeway_s
            )));
        }
        Ok(())
    }
}

/// Whether `url` may be fetched for keys: HTTPS, or plain HTTP to a loopback address (test
/// IdPs and local development). Anything else could hand an on-path attacker the keys.
pub(crate) fn check_url(what: &str, url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Ok(());
    }
    if let Some(rest) = url.strip_prefix("http://") {
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
        let bare = if host.starts_with('[') {
            host.split(']').next().map(|h| h.trim_start_matches('['))
        } else {
            host.split(':').next()
        };
        let loopback = match bare {
            Some("localhost") => true,
            Some(h) => h
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()),
            None => false,
        };
        if loopback {
            return Ok(());
        }
    }
    Err(format!(
        "{what} `{url}` must be an https:// URL (plain http is allowed only to loopback)"
    ))
}

/// The identity configuration file of a controller (`identity.json` in its data directory),
/// read at start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// The trusted providers.
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
    /// Extra CA certificates (PEM file) to trust for HTTPS to the providers, besides the
    /// public web PKI: for an IdP behind the hospital's private CA.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

/// The set of trusted providers, looked up by issuer.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    list: Vec<ProviderConfig>,
}

impl Providers {
    /// Validates each provider and refuses two with one issuer (a token must select exactly
    /// one set of rules).
    pub fn new(list: Vec<ProviderConfig>) -> Result<Self, IdentityError> {
        for (i, p) in list.iter().enumerate() {
            p.validate()?;
            if list[..i].iter().any(|q| q.issuer == p.issuer) {
                return Err(IdentityError::Config {
                    provider: p.name.clone(),
                    detail: format!(
                        "issuer {} is configured twice; merge the two entries",
                        p.issuer
                    ),
                });
            }
        }
        Ok(Self { list })
    }

    /// The provider whose issuer is exactly `iss`.
    pub fn by_issuer(&self, iss: &str) -> Option<&ProviderConfig> {
        self.list.iter().find(|p| p.issuer == iss)
    }

    /// All providers.
    pub fn all(&self) -> &[ProviderConfig] {
        &self.list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https_or_loopback() {
        assert!(check_url("issuer", "https://login.example.org/realm").is_ok());
        assert!(check_url("issuer", "http://127.0.0.1:4444").is_ok());
        assert!(check_url("issuer", "http://[::1]:4444/x").is_ok());
        assert!(check_url("issuer", "http://localhost/x").is_ok());
        assert!(check_url("issuer", "http://idp.example.org").is_err());
        assert!(check_url("issuer", "http://127.0.0.1.evil.example/").is_err());
        assert!(check_url("issuer", "ftp://127.0.0.1/").is_err());
    }

    #[test]
    fn group_mapping_can_confine_a_vendor_idp() {
        let m = GroupMapping {
            map: BTreeMap::from([("acme-engineers".into(), "vendor-acme".into())]),
            keep_unmapped: false,
        };
        let got = m.apply(&["clinicians".into(), "acme-engineers".into()]);
        assert_eq!(got, vec!["vendor-acme".to_string()]);
        let keep = GroupMapping::default().apply(&["b".into(), "a".into(), "a".into()]);
        assert_eq!(keep, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn mfa_rule_matches_amr_or_acr() {
        let r = MfaRule {
            amr_any: vec!["mfa".into(), "hwk".into()],
            acr_any: vec!["urn:x:mfa".into()],
        };
        assert!(r.satisfied(&["pwd".into(), "hwk".into()], None));
        assert!(r.satisfied(&["pwd".into()], Some("urn:x:mfa")));
        assert!(!r.satisfied(&["pwd".into()], Some("urn:x:pwd")));
        assert!(!r.satisfied(&[], None));
    }

    #[test]
    fn duplicate_issuers_and_bad_settings_are_refused() {
        let a = ProviderConfig::new("a", "https://idp.example", "c");
        let b = ProviderConfig::new("b", "https://idp.example", "c");
        assert!(Providers::new(vec![a.clone(), b]).is_err());
        let mut c = a.clone();
        c.leeway_s = 3600;
        assert!(c.validate().is_err());
        let mut d = a;
        d.client_ids.clear();
        assert!(d.validate().is_err());
    }
}
