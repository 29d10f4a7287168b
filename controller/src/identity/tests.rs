//! The pure verifier against tokens made here with our own ES256 keys: every rejection, at a
//! fixed `now`. (RS256 from a real IdP is exercised end to end in the root package's
//! `tests/identity.rs`.)

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

use super::*;

const ISS: &str = "https://idp.hospital.example";
const NOW: u64 = 1_800_000_000;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

struct Key {
    kid: String,
    enc: EncodingKey,
    jwk: Value,
}

fn key(kid: &str) -> Key {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let raw = kp.public_key_raw();
    assert_eq!(raw.len(), 65);
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
    });
    Key {
        kid: kid.into(),
        enc: EncodingKey::from_ec_der(&kp.serialize_der()),
        jwk,
    }
}

fn jwks(keys: &[&Key]) -> Jwks {
    let doc = json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() });
    Jwks::from_json(doc.to_string().as_bytes()).expect("jwks")
}

fn claims() -> Value {
    json!({
        "iss": ISS, "sub": "u-123", "aud": "wardgate-cli",
        "iat": NOW - 10, "exp": NOW + 300, "auth_time": NOW - 10,
        "nonce": "n-1", "preferred_username": "amara", "email": "amara@hospital.example",
        "groups": ["clinicians"], "amr": ["pwd", "mfa"], "acr": "urn:x:mfa",
    })
}

fn sign(k: &Key, claims: &Value) -> String {
    let mut h = Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some(k.kid.clone());
    jsonwebtoken::encode(&h, claims, &k.enc).expect("sign")
}

fn provider() -> ProviderConfig {
    ProviderConfig::new("staff", ISS, "wardgate-cli")
}

fn with(mut c: Value, f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    if let Some(m) = c.as_object_mut() {
        f(m);
    }
    c
}

/// A token with a hand-made header over the given claims (signature from `k` when given).
fn raw_token(header: Value, claims: &Value, sig: &str) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        sig
    )
}

#[test]
fn a_good_token_gives_the_identity() {
    let k = key("k1");
    let id = verify(
        &sign(&k, &claims()),
        &jwks(&[&k]),
        &provider(),
        now(),
        Some("n-1"),
    )
    .expect("verifies");
    assert_eq!(id.subject, "u-123");
    assert_eq!(id.username, "amara");
    assert_eq!(id.groups, vec!["clinicians".to_string()]);
    assert!(id.mfa);
    assert_eq!(id.expires_at_ms, (NOW as i64 + 300) * 1000);
    assert_eq!(id.auth_time_ms, Some((NOW as i64 - 10) * 1000));
    assert_eq!(id.nonce.as_deref(), Some("n-1"));
    assert_eq!(id.provider, "staff");
}

#[test]
fn mfa_needs_the_rule_and_username_falls_back() {
    let k = key("k1");
    let c = with(claims(), |m| {
        m.insert("amr".into(), json!(["pwd"]));
        m.remove("preferred_username");
    });
    let id = verify(&sign(&k, &c), &jwks(&[&k]), &provider(), now(), None).expect("ok");
    assert!(!id.mfa);
    assert_eq!(id.username, "amara@hospital.example");
    let mut p = provider();
    p.mfa.acr_any = vec!["urn:x:mfa".into()];
    let id = verify(&sign(&k, &c), &jwks(&[&k]), &p, now(), None).expect("ok");
    assert!(id.mfa, "acr alone satisfies a rule that lists it");
}

#[test]
fn none_and_hmac_algorithms_are_refused() {
    let k = key("k1");
    let none = raw_token(json!({"alg": "none"}), &claims(), "");
    let e = verify(&none, &jwks(&[&k]), &provider(), now(), None).expect_err("rejected");
    assert!(matches!(e, IdentityError::UnsupportedAlgorithm { ref alg, .. } if alg == "none"));
    let hs = jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(b"secret"),
    )
    .expect("hs");
    let e = verify(&hs, &jwks(&[&k]), &provider(), now(), None).expect_err("rejected");
    assert!(matches!(e, IdentityError::UnsupportedAlgorithm { ref alg, .. } if alg == "HS256"));
    let mut only_rs = provider();
    only_rs.algorithms = vec![SigningAlg::RS256];
    let e =
        verify(&sign(&k, &claims()), &jwks(&[&k]), &only_rs, now(), None).expect_err("rejected");
    assert!(
        matches!(e, IdentityError::UnsupportedAlgorithm { .. }),
        "{e}"
    );
}

#[test]
fn an_rs256_header_cannot_use_an_ec_key() {
    let k = key("k1");
    let t = raw_token(json!({"alg": "RS256", "kid": "k1"}), &claims(), "AAAA");
    let e = verify(&t, &jwks(&[&k]), &provider(), now(), None).expect_err("rejected");
    assert!(matches!(e, IdentityError::KeyMismatch { .. }), "{e}");
}

#[test]
fn altered_tokens_and_foreign_keys_are_refused() {
    let k = key("k1");
    let good = sign(&k, &claims());
    // Swap the payload for one with another group: the signature no longer matches.
    let (h, rest) = good.split_once('.').expect("parts");
    let (_, s) = rest.split_once('.').expect("parts");
    let forged_claims = with(claims(), |m| {
        m.insert("groups".into(), json!(["wardgate-admins"]));
    });
    let forged = format!(
        "{h}.{}.{s}",
        URL_SAFE_NO_PAD.encode(forged_claims.to_string())
    );
    let e = verify(&forged, &jwks(&[&k]), &provider(), now(), None).expect_err("rejected");
    assert!(matches!(e, IdentityError::BadSignature { .. }), "{e}");

    // Signed by another key that claims the same kid.
    let evil = key("k1");
    let e = verify(
        &sign(&evil, &claims()),
        &jwks(&[&k]),
        &provider(),
        now(),
        None,
    )
    .expect_err("rejected");
    assert!(matches!(e, IdentityError::BadSignature { .. }), "{e}");

    // Signed by a key the provider does not publish.
    let other = key("k9");
    let e = verify(
        &sign(&other, &claims()),
        &jwks(&[&k]),
        &provider(),
        now(),
        None,
    )
    .expect_err("rejected");
    assert!(
        matches!(e, IdentityError::UnknownKey { ref kid, .. } if kid == "k9"),
        "{e}"
    );
}

#[test]
fn a_missing_kid_is_fine_only_with_one_candidate_key() {
    let k = key("k1");
    let k2 = key("k2");
    let mut h = Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = None;
    let t = jsonwebtoken::encode(&h, &claims(), &k.enc).expect("sign");
    assert!(verify(&t, &jwks(&[&k]), &provider(), now(), None).is_ok());
    let e = verify(&t, &jwks(&[&k, &k2]), &provider(), now(), None).expect_err("rejected");
    assert!(matches!(e, IdentityError::MissingKid { .. }), "{e}");
}

#[test]
fn issuer_and_audience_are_checked() {
    let k = key("k1");
    let j = jwks(&[&k]);
    let c = with(claims(), |m| {
        m.insert("iss".into(), json!("https://evil.example"));
    });
    let e = verify(&sign(&k, &c), &j, &provider(), now(), None).expect_err("rejected");
    assert!(matches!(e, IdentityError::WrongIssuer { .. }), "{e}");

    let c = with(claims(), |m| {
        m.insert("aud".into(), json!("payroll-app"));
    });
    let e = verify(&sign(&k, &c), &j, &provider(), now(), None).expect_err("rejected");
    assert!(matches!(e, IdentityError::WrongAudience { .. }), "{e}");

    // Several audiences: azp must name our client.
    let c = with(claims(), |m| {
        m.insert("aud".into(), json!(["wardgate-cli", "payroll-app"]));
    });
    let e = verify(&sign(&k, &c), &j, &provider(), now(), None).expect_err("rejected");
    assert!(
        matches!(e, IdentityError::WrongAuthorizedParty { .. }),
        "{e}"
    );
    let c2 = with(c.clone(), |m| {
        m.insert("azp".into(), json!("payroll-app"));
    });
    let e = verify(&sign(&k, &c2), &j, &provider(), now(), None).expect_err("rejected");
    assert!(
        matches!(e, IdentityError::WrongAuthorizedParty { .. }),
        "{e}"
    );
    let c3 = with(c, |m| {
        m.insert("azp".into(), json!("wardgate-cli"));
    });
    assert!(verify(&sign(&k, &c3), &j, &provider(), now(), None).is_ok());
}

#[test]
fn times_are_checked_with_the_skew_allowance() {
    let k = key("k1");
    let j = jwks(&[&k]);
    let t = sign(&k, &claims());
    let exp = NOW + 300;
    // Within the 60 s skew after exp: still accepted. Beyond: expired.
    let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
    assert!(verify(&t, &j, &provider(), at(exp + 60), None).is_ok());
    let e = verify(&t, &j, &provider(), at(exp + 61), None).expect_err("rejected");
    assert!(matches!(e, IdentityError::Expired { .. }), "{e}");
    assert!(e.to_string().contains("log in again"), "{e}");

    let c = with(claims(), |m| {
        m.insert("nbf".into(), json!(NOW + 120));
    });
    let e = verify(&sign(&k, &c), &j, &provider(), now(), None).expect_err("rejected");
    assert!(matches!(e, IdentityError::NotYetValid { .. }), "{e}");

    let c = with(claims(), |m| {
        m.insert("iat".into(), json!(NOW + 120));
    });
    let e = verify(&sign(&k, &c), &j, &provider(), now(), None).expect_err("rejected");
    assert!(matches!(e, IdentityError::IssuedInFuture { .. }), "{e}");

    let c = with(claims(), |m| {
        m.remove("exp");
    });
    let e = verify(&sign(&k, &c), &j, &provider(), now(), None).expect_err("rejected");
    assert!(matches!(e, IdentityError::MissingClaim { ref claim } if claim == "exp"));

    let c = with(claims(), |m| {
        m.insert("exp".into(), json!("tomorrow"));
    });
    let e = verify(&sign(&k, &c), &j, &provider(), now(), None).expect_err("rejected");
    assert!(matches!(e, IdentityError::InvalidClaim { .. }), "{e}");
}

#[test]
fn the_nonce_must_be_this_logins_and_is_single_use() {
    let k = key("k1");
    let j = jwks(&[&k]);
    let t = sign(&k, &claims());
    let e = verify(&t, &j, &provider(), now(), Some("n-2")).expect_err("rejected");
    assert_eq!(e, IdentityError::NonceMismatch);
    let c = with(claims(), |m| {
        m.remove("nonce");
    });
    let e = verify(&sign(&k, &c), &j, &provider(), now(), Some("n-1")).expect_err("rejected");
    assert_eq!(e, IdentityError::NonceMissing);

    let mut store = NonceStore::new();
    let now_ms = NOW as i64 * 1000;
    let exp_ms = now_ms + 300_000;
    store.consume("n-1", exp_ms, 60, now_ms).expect("first use");
    assert_eq!(
        store.consume("n-1", exp_ms, 60, now_ms + 1000),
        Err(IdentityError::NonceReplayed)
    );
    // Once the token could no longer verify, its nonce is forgotten.
    store.consume("n-2", exp_ms, 60, now_ms).expect("other");
    store
        .consume("n-3", exp_ms + 999_999, 60, exp_ms + 60_001)
        .expect("later");
    assert_eq!(store.len(), 1);
}

#[test]
fn malformed_encrypted_and_oversized_tokens_are_refused_early() {
    let k = key("k1");
    let j = jwks(&[&k]);
    for bad in ["", "abc", "a.b", "a.b.c.d", "!!.??.xx"] {
        let e = verify(bad, &j, &provider(), now(), None).expect_err("rejected");
        assert!(matches!(e, IdentityError::Malformed { .. }), "{bad}: {e}");
    }
    let e = verify("a.b.c.d.e", &j, &provider(), now(), None).expect_err("rejected");
    assert_eq!(e, IdentityError::Encrypted);
    let big = "a".repeat(20_000);
    let e = verify(&big, &j, &provider(), now(), None).expect_err("rejected");
    assert!(matches!(e, IdentityError::TooLarge { .. }));
    let crit = raw_token(json!({"alg": "ES256", "crit": ["b64"]}), &claims(), "AA");
    let e = verify(&crit, &j, &provider(), now(), None).expect_err("rejected");
    assert!(matches!(e, IdentityError::CriticalHeader { .. }), "{e}");
}

#[test]
fn a_vendor_provider_cannot_grant_staff_groups() {
    let k = key("v1");
    let mut vendor = ProviderConfig::new("vendor-acme", "https://login.acme.example", "wardgate");
    vendor.groups = GroupMapping {
        map: BTreeMap::from([("engineers".into(), "vendor-acme".into())]),
        keep_unmapped: false,
    };
    let c = with(claims(), |m| {
        m.insert("iss".into(), json!("https://login.acme.example"));
        m.insert("aud".into(), json!("wardgate"));
        m.insert(
            "groups".into(),
            json!(["engineers", "clinicians", "wardgate-admins"]),
        );
    });
    let id = verify(&sign(&k, &c), &jwks(&[&k]), &vendor, now(), None).expect("ok");
    assert_eq!(id.groups, vec!["vendor-acme".to_string()]);
}

#[test]
fn jwks_parsing_keeps_only_signing_keys() {
    let k = key("k1");
    let doc = json!({"keys": [
        k.jwk,
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {"kty": "RSA", "use": "enc", "kid": "enc", "n": "AQAB", "e": "AQAB"},
        {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
        {"kty": "weird"},
    ]});
    let j = Jwks::from_json(doc.to_string().as_bytes()).expect("parses");
    assert_eq!(j.keys().len(), 1);
    assert!(j.has_kid("k1"));
    assert_eq!(j.skipped.len(), 4, "{:?}", j.skipped);
    assert!(Jwks::from_json(b"[]").is_err());
}
