//! The pure ID-token check: bytes, keys, rules and a time in; an identity or the one reason
//! out. No clock, no network, so every rejection is testable with a fixed `now`.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use super::config::{ProviderConfig, SigningAlg};
use super::error::IdentityError;
use super::jwks::{Jwks, JwksKey};

/// The largest token accepted, in bytes. Real ID tokens are 1–4 KiB; the cap keeps a hostile
/// client from making the controller base64-decode and parse megabytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Who logged in, as the controller may rely on it after verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedIdentity {
    /// The provider's name (from the configuration), for audit rows.
    pub provider: String,
    /// The token's issuer.
    pub issuer: String,
    /// The IdP's stable user id (`sub`); unique only together with `issuer`.
    pub subject: String,
    /// A human-readable name: `preferred_username`, else `email`, else `sub`.
    pub username: String,
    /// The e-mail address, if the IdP sent one.
    pub email: Option<String>,
    /// Wardgate groups, after the provider's mapping; sorted, no duplicates.
    pub groups: Vec<String>,
    /// Whether the login was multi-factor under the provider's rule.
    pub mfa: bool,
    /// The authentication methods the IdP reported (`amr`).
    pub amr: Vec<String>,
    /// The assurance level the IdP reported (`acr`).
    pub acr: Option<String>,
    /// When the user authenticated (`auth_time`), in Unix milliseconds.
    pub auth_time_ms: Option<i64>,
    /// When the token expires (`exp`), in Unix milliseconds: a session built on it should not
    /// outlive it without a refresh.
    pub expires_at_ms: i64,
    /// The token's nonce, so the caller can mark it used.
    pub nonce: Option<String>,
}

/// Unix seconds of `t` (negative before 1970).
pub fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// A token split into its parts, with the header read.
struct Parts<'a> {
    signing_input: &'a str,
    signature: &'a str,
    payload: Map<String, Value>,
    alg: String,
    kid: Option<String>,
}

fn malformed(detail: impl Into<String>) -> IdentityError {
    IdentityError::Malformed {
        detail: detail.into(),
    }
}

fn decode_json(part: &str, what: &str) -> Result<Map<String, Value>, IdentityError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|e| malformed(format!("its {what} is not base64url ({e})")))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(malformed(format!("its {what} is not a JSON object"))),
        Err(e) => Err(malformed(format!("its {what} is not JSON ({e})"))),
    }
}

fn split(token: &str) -> Result<Parts<'_>, IdentityError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(IdentityError::TooLarge {
            len: token.len(),
            max: MAX_TOKEN_BYTES,
        });
    }
    let dots = token.bytes().filter(|&b| b == b'.').count();
    if dots == 4 {
        return Err(IdentityError::Encrypted);
    }
    if dots != 2 {
        return Err(malformed(format!(
            "a signed JWT has 3 dot-separated parts, this has {}",
            dots + 1
        )));
    }
    let (signing_input, signature) = token
        .rsplit_once('.')
        .ok_or_else(|| malformed("no signature part"))?;
    let (header_b64, payload_b64) = signing_input
        .split_once('.')
        .ok_or_else(|| malformed("no payload part"))?;
    let header = decode_json(header_b64, "header")?;
    let alg = match header.get("alg") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err(malformed("its header has no `alg`")),
    };
    if let Some(crit) = header.get("crit") {
        return Err(IdentityError::CriticalHeader {
            crit: crit.to_string(),
        });
    }
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(malformed("its header's `kid` is not a string")),
    };
    let payload = decode_json(payload_b64, "payload")?;
    Ok(Parts {
        signing_input,
        signature,
        payload,
        alg,
        kid,
    })
}

/// The token's `iss`, read *without* verifying anything: only to choose which provider's keys
/// and rules verify it. Never trust anything else read this way.
pub fn peek_issuer(token: &str) -> Result<String, IdentityError> {
    let parts = split(token)?;
    match parts.payload.get("iss") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(IdentityError::InvalidClaim {
            claim: "iss".into(),
            detail: "not a string".into(),
        }),
        None => Err(IdentityError::MissingClaim {
            claim: "iss".into(),
        }),
    }
}

/// The token's `kid` header, read without verifying (to decide whether the key set needs a
/// refresh).
pub fn peek_kid(token: &str) -> Result<Option<String>, IdentityError> {
    Ok(split(token)?.kid)
}

fn claim_str<'a>(m: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, IdentityError> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(IdentityError::InvalidClaim {
            claim: name.into(),
            detail: "not a string".into(),
        }),
    }
}

fn required_str<'a>(m: &'a Map<String, Value>, name: &str) -> Result<&'a str, IdentityError> {
    claim_str(m, name)?.ok_or_else(|| IdentityError::MissingClaim { claim: name.into() })
}

/// A NumericDate (RFC 7519): seconds, possibly fractional; truncated to whole seconds.
fn claim_time(m: &Map<String, Value>, name: &str) -> Result<Option<i64>, IdentityError> {
    let bad = |detail: &str| IdentityError::InvalidClaim {
        claim: name.into(),
        detail: detail.into(),
    };
    match m.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f.abs() < 1e15 => Ok(Some(f.trunc() as i64)),
                    _ => Err(bad("not a usable time in seconds")),
                }
            }
        }
        Some(_) => Err(bad("not a number of seconds")),
    }
}

/// A claim that is a list of strings, or one string (some IdPs send a single group bare).
fn claim_strings(m: &Map<String, Value>, name: &str) -> Result<Vec<String>, IdentityError> {
    let bad = || IdentityError::InvalidClaim {
        claim: name.into(),
        detail: "not a string or a list of strings".into(),
    };
    match m.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
    }
}

fn list(items: &[String]) -> String {
    items
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn select_key<'a>(
    jwks: &'a Jwks,
    provider: &ProviderConfig,
    kid: Option<&str>,
    alg: SigningAlg,
) -> Result<&'a JwksKey, IdentityError> {
    let key = match kid {
        Some(kid) => jwks.find(kid).ok_or_else(|| IdentityError::UnknownKey {
            provider: provider.name.clone(),
            kid: kid.into(),
            refreshed: false,
        })?,
        None => {
            let mut fitting = jwks.keys().iter().filter(|k| k.alg == alg);
            match (fitting.next(), fitting.next()) {
                (Some(k), None) => k,
                (None, _) => {
                    return Err(IdentityError::UnknownKey {
                        provider: provider.name.clone(),
                        kid: "(none)".into(),
                        refreshed: false,
                    });
                }
                (Some(_), Some(_)) => {
                    return Err(IdentityError::MissingKid {
                        provider: provider.name.clone(),
                    });
                }
            }
        }
    };
    if key.alg != alg {
        return Err(IdentityError::KeyMismatch {
            provider: provider.name.clone(),
            kid: key.kid.clone().unwrap_or_default(),
            alg: alg.as_str().into(),
            detail: format!("it is a {} key", key.alg.as_str()),
        });
    }
    Ok(key)
}

fn jwt_alg(alg: SigningAlg) -> jsonwebtoken::Algorithm {
    match alg {
        SigningAlg::RS256 => jsonwebtoken::Algorithm::RS256,
        SigningAlg::ES256 => jsonwebtoken::Algorithm::ES256,
    }
}

/// Verifies an ID token against one provider's keys and rules at time `now`.
///
/// Order matters for the error a caller sees: structure, algorithm, key, signature first
/// (nothing in an unverified token is believed), then issuer, audience, times and nonce.
/// `expected_nonce` is the nonce this login sent (code flow); `None` skips the check for
/// flows that carry none (device grant, refresh). Marking the nonce used is the caller's job
/// ([`NonceStore`]), since that is state.
pub fn verify(
    token: &str,
    jwks: &Jwks,
    provider: &ProviderConfig,
    now: SystemTime,
    expected_nonce: Option<&str>,
) -> Result<VerifiedIdentity, IdentityError> {
    let parts = split(token)?;

    // Algorithm: only the provider's allowed asymmetric ones. `none` and `HS*` end here.
    let alg = SigningAlg::from_jose(&parts.alg)
        .filter(|a| provider.algorithms.contains(a))
        .ok_or_else(|| IdentityError::UnsupportedAlgorithm {
            provider: provider.name.clone(),
            alg: parts.alg.clone(),
            allowed: provider
                .algorithms
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;

    // Key and signature. The key's type is checked against `alg` first: jsonwebtoken must
    // never be asked to verify an algorithm with a key of another family.
    let key = select_key(jwks, provider, parts.kid.as_deref(), alg)?;
    let kid = key.kid.clone().unwrap_or_else(|| "(none)".into());
    let ok = jsonwebtoken::crypto::verify(
        parts.signature,
        parts.signing_input.as_bytes(),
        &key.key,
        jwt_alg(alg),
    )
    .unwrap_or(false);
    if !ok {
        return Err(IdentityError::BadSignature {
            provider: provider.name.clone(),
            kid,
        });
    }
    let c = &parts.payload;

    // Issuer.
    let iss = required_str(c, "iss")?;
    if iss != provider.issuer {
        return Err(IdentityError::WrongIssuer {
            expected: provider.issuer.clone(),
            got: iss.into(),
        });
    }

    // Audience, and the authorized party when there are several audiences (OIDC Core 3.1.3.7).
    let aud = claim_strings(c, "aud")?;
    if aud.is_empty() {
        return Err(IdentityError::MissingClaim {
            claim: "aud".into(),
        });
    }
    let Some(ours) = aud.iter().find(|a| provider.client_ids.contains(a)) else {
        return Err(IdentityError::WrongAudience {
            expected: list(&provider.client_ids),
            got: list(&aud),
        });
    };
    let azp = claim_str(c, "azp")?;
    let azp_ok = match azp {
        Some(azp) => azp == ours,
        None => aud.len() == 1,
    };
    if !azp_ok {
        return Err(IdentityError::WrongAuthorizedParty {
            expected: format!("`{ours}`"),
            got: azp.map_or_else(|| "missing".into(), |a| format!("`{a}`")),
        });
    }

    // Times.
    let now_s = unix_seconds(now);
    let leeway = i64::try_from(provider.leeway_s).unwrap_or(0);
    let exp = claim_time(c, "exp")?.ok_or_else(|| IdentityError::MissingClaim {
        claim: "exp".into(),
    })?;
    if now_s > exp.saturating_add(leeway) {
        return Err(IdentityError::Expired {
            exp,
            now: now_s,
            leeway_s: provider.leeway_s,
        });
    }
    let nbf = claim_time(c, "nbf")?;
    if let Some(nbf) = nbf.filter(|&n| now_s.saturating_add(leeway) < n) {
        return Err(IdentityError::NotYetValid { nbf, now: now_s });
    }
    let iat = claim_time(c, "iat")?.ok_or_else(|| IdentityError::MissingClaim {
        claim: "iat".into(),
    })?;
    if iat > now_s.saturating_add(leeway) {
        return Err(IdentityError::IssuedInFuture { iat, now: now_s });
    }

    // Nonce.
    let nonce = claim_str(c, "nonce")?;
    if let Some(expected) = expected_nonce {
        let Some(got) = nonce else {
            return Err(IdentityError::NonceMissing);
        };
        if !bool::from(got.as_bytes().ct_eq(expected.as_bytes())) {
            return Err(IdentityError::NonceMismatch);
        }
    }

    // Who.
    let sub = required_str(c, "sub")?;
    if sub.is_empty() {
        return Err(IdentityError::InvalidClaim {
            claim: "sub".into(),
            detail: "empty".into(),
        });
    }
    let email = claim_str(c, "email")?.map(str::to_owned);
    let username = claim_str(c, "preferred_username")?
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .or_else(|| email.clone())
        .unwrap_or_else(|| sub.to_owned());
    let groups = provider
        .groups
        .apply(&claim_strings(c, &provider.groups_claim)?);
    let amr = claim_strings(c, "amr")?;
    let acr = claim_str(c, "acr")?.map(str::to_owned);
    let mfa = provider.mfa.satisfied(&amr, acr.as_deref());
    let auth_time = claim_time(c, "auth_time")?;

    Ok(VerifiedIdentity {
        provider: provider.name.clone(),
        issuer: iss.into(),
        subject: sub.into(),
        username,
        email,
        groups,
        mfa,
        amr,
        acr,
        auth_time_ms: auth_time.map(|t| t.saturating_mul(1000)),
        expires_at_ms: exp.saturating_mul(1000),
        nonce: nonce.map(str::to_owned),
    })
}

/// Nonces of accepted tokens, kept until their tokens expire, so one token (or another token
/// bound to the same login) is accepted once. In memory: one controller process. Replicas
/// sharing a database will need this settled there, like other single-use tokens.
#[derive(Debug, Default)]
pub struct NonceStore {
    used: HashMap<String, i64>,
}

impl NonceStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks `nonce` used until `expires_at_ms` (plus `leeway_s`), or refuses it when an
    /// earlier token already used it. Entries whose tokens can no longer verify are dropped.
    pub fn consume(
        &mut self,
        nonce: &str,
        expires_at_ms: i64,
        leeway_s: u64,
        now_ms: i64,
    ) -> Result<(), IdentityError> {
        self.used.retain(|_, until| *until >= now_ms);
        if self.used.contains_key(nonce) {
            return Err(IdentityError::NonceReplayed);
        }
        let leeway_ms = i64::try_from(leeway_s).unwrap_or(0).saturating_mul(1000);
        self.used
            .insert(nonce.to_owned(), expires_at_ms.saturating_add(leeway_ms));
        Ok(())
    }

    /// How many nonces are held.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}
