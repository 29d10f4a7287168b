//! ID-token verification against a real OpenID provider (oidc-provider, `tools/test-idp`):
//! the code + PKCE flow and the device grant complete without a browser, the tokens verify
//! with the right groups and MFA, and every forgery or misuse is refused with its own error.
//! Needs `scripts/idp.sh` to have run (scripts/test does); fails, never skips, without it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use wardgate::idp::{Idp, OAuthError};
use wardgate_controller::identity::{
    CacheOptions, IdentityError, ProviderConfig, Providers, Verifier, http_client,
};

const SCOPE: &str = "openid profile email groups";

fn idp() -> Idp {
    match Idp::start() {
        Ok(i) => i,
        Err(e) => panic!("{e:#}"),
    }
}

fn staff(idp: &Idp) -> ProviderConfig {
    ProviderConfig::new("staff", idp.issuer(), idp.client_id())
}

fn verifier(providers: Vec<ProviderConfig>, refresh_min_interval: Duration) -> Verifier {
    let http = http_client(rustls::RootCertStore::empty(), Duration::from_secs(5)).expect("http");
    Verifier::new(
        Providers::new(providers).expect("providers"),
        http,
        CacheOptions {
            refresh_min_interval,
            ..CacheOptions::default()
        },
    )
}

/// The claims of a token, unverified (for test assertions only).
fn claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("b64")).expect("json")
}

fn oauth(e: &anyhow::Error) -> &OAuthError {
    e.downcast_ref::<OAuthError>()
        .unwrap_or_else(|| panic!("not an OAuth error: {e:#}"))
}

#[tokio::test]
async fn code_flow_with_pkce_completes_and_verifies_groups_and_mfa() {
    let idp = idp();
    let v = verifier(vec![staff(&idp)], Duration::from_secs(30));

    // The discovery document is the provider's own, with the device endpoint.
    let d = idp.discovery().await.expect("discovery");
    assert_eq!(d.issuer, idp.issuer());
    assert!(d.device_authorization_endpoint.ends_with("/device/auth"));

    let (req, tokens) = idp.login("amara", SCOPE).await.expect("amara logs in");
    let id_token = tokens.id_token.expect("an ID token");
    let id = v
        .verify(&id_token, Some(&req.nonce))
        .await
        .expect("verifies");
    assert_eq!(id.subject, "amara");
    assert_eq!(id.username, "amara");
    assert_eq!(id.email.as_deref(), Some("amara@hospital.test"));
    assert_eq!(id.groups, vec!["clinicians".to_string()]);
    assert!(id.mfa, "amara's amr has mfa: {:?}", id.amr);
    assert!(id.auth_time_ms.is_some());
    assert_eq!(id.provider, "staff");

    // A vendor account with a password only: verified, but not multi-factor.
    let (req, tokens) = idp.login("acme-eng", SCOPE).await.expect("acme-eng");
    let id = v
        .verify(&tokens.id_token.expect("id token"), Some(&req.nonce))
        .await
        .expect("verifies");
    assert_eq!(id.groups, vec!["vendor-acme".to_string()]);
    assert!(
        !id.mfa,
        "acme-eng logs in with a password only: {:?}",
        id.amr
    );

    // Two groups, and MFA read from acr when the rule says so.
    let (req, tokens) = idp.login("ben", SCOPE).await.expect("ben");
    let id = v
        .verify(&tokens.id_token.expect("id token"), Some(&req.nonce))
        .await
        .expect("verifies");
    assert_eq!(
        id.groups,
        vec!["clinicians".to_string(), "emergency".to_string()]
    );
    assert_eq!(id.acr.as_deref(), Some("urn:wardgate:acr:mfa"));

    // offline_access (with prompt=consent) yields a refresh token.
    let (_, tokens) = idp
        .login("kim", "openid groups offline_access")
        .await
        .expect("kim");
    assert!(
        tokens.refresh_token.is_some(),
        "offline_access → refresh token"
    );
}

#[tokio::test]
async fn the_provider_refuses_code_replay_wrong_verifier_and_unknown_accounts() {
    let idp = idp();

    // Replay: the second exchange of one code fails at the provider.
    let req = idp
        .authorization_request("amara", SCOPE, wardgate::harness::free_port())
        .expect("request");
    let cb = idp.follow(&req.url, &req.redirect_uri).await.expect("code");
    assert_eq!(cb.iss.as_deref(), Some(idp.issuer()), "RFC 9207 iss");
    idp.exchange_code(&req, &cb.code).await.expect("first");
    let e = idp
        .exchange_code(&req, &cb.code)
        .await
        .expect_err("replayed code");
    assert_eq!(oauth(&e).error, "invalid_grant", "{e:#}");

    // PKCE: the code is useless without its verifier.
    let req = idp
        .authorization_request("amara", SCOPE, wardgate::harness::free_port())
        .expect("request");
    let cb = idp.follow(&req.url, &req.redirect_uri).await.expect("code");
    let e = idp
        .exchange_code_with_verifier(&req, &cb.code, &"x".repeat(43))
        .await
        .expect_err("wrong verifier");
    assert_eq!(oauth(&e).error, "invalid_grant", "{e:#}");

    // PKCE is required of the public client: no challenge, no code.
    let url = req
        .url
        .replace("code_challenge_method=S256", "")
        .replace("code_challenge=", "x=");
    let e = idp
        .follow(&url, &req.redirect_uri)
        .await
        .expect_err("no PKCE");
    assert_eq!(oauth(&e).error, "invalid_request", "{e:#}");

    // An account the IdP does not have ends the flow with an error at the client.
    let req = idp
        .authorization_request("mallory", SCOPE, wardgate::harness::free_port())
        .expect("request");
    let e = idp
        .follow(&req.url, &req.redirect_uri)
        .await
        .expect_err("unknown account");
    assert_eq!(oauth(&e).error, "login_required", "{e:#}");
}

#[tokio::test]
async fn device_flow_completes_and_verifies() {
    let idp = idp();
    let v = verifier(vec![staff(&idp)], Duration::from_secs(30));
    let dev = idp.device_authorize(SCOPE).await.expect("device auth");
    assert!(dev.verification_uri.starts_with(idp.issuer()));
    assert!(
        idp.device_poll(&dev.device_code)
            .await
            .expect("poll")
            .is_none(),
        "pending until the user approves"
    );
    idp.device_approve(&dev.user_code, "ben")
        .await
        .expect("approve");
    let tokens = idp
        .device_poll(&dev.device_code)
        .await
        .expect("poll")
        .expect("tokens after approval");
    assert!(
        tokens.refresh_token.is_some(),
        "the device flow issues a refresh token"
    );
    let id_token = tokens.id_token.expect("an ID token");
    // The device grant carries no nonce.
    let id = v.verify(&id_token, None).await.expect("verifies");
    assert_eq!(id.subject, "ben");
    assert_eq!(
        id.groups,
        vec!["clinicians".to_string(), "emergency".to_string()]
    );
    assert!(id.mfa);

    // The device code is single-use too.
    let e = idp
        .device_poll(&dev.device_code)
        .await
        .expect_err("second redemption");
    assert_eq!(oauth(&e).error, "invalid_grant", "{e:#}");

    // nomfa approves a second device: verified, not multi-factor.
    let dev = idp.device_authorize(SCOPE).await.expect("device auth");
    idp.device_approve(&dev.user_code, "nomfa")
        .await
        .expect("approve");
    let tokens = idp
        .device_poll(&dev.device_code)
        .await
        .expect("poll")
        .expect("tokens");
    let id = v
        .verify(&tokens.id_token.expect("id token"), None)
        .await
        .expect("verifies");
    assert!(!id.mfa);
}

#[tokio::test]
async fn misuse_is_refused_with_the_specific_error() {
    let idp = idp();
    let (req, tokens) = idp.login("amara", SCOPE).await.expect("login");
    let token = tokens.id_token.expect("id token");

    // Wrong audience: a verifier for another client of the same IdP.
    let mut other_client = staff(&idp);
    other_client.client_ids = vec!["payroll-app".into()];
    let e = verifier(vec![other_client], Duration::from_secs(30))
        .verify(&token, Some(&req.nonce))
        .await
        .expect_err("wrong audience");
    assert!(matches!(e, IdentityError::WrongAudience { .. }), "{e}");
    assert!(e.to_string().contains("wardgate-cli"), "{e}");

    // Wrong issuer: a verifier that trusts only a vendor IdP.
    let vendor = ProviderConfig::new("vendor-acme", "https://login.acme.example", "wardgate");
    let e = verifier(vec![vendor.clone()], Duration::from_secs(30))
        .verify(&token, Some(&req.nonce))
        .await
        .expect_err("unknown issuer");
    assert!(matches!(e, IdentityError::UnknownIssuer { .. }), "{e}");
    // …and with both configured, the token selects the staff provider and verifies.
    let both = verifier(vec![vendor, staff(&idp)], Duration::from_secs(30));

    // Expired: the provider's own token, verified after its exp (plus the 60 s skew).
    let exp = claims(&token)["exp"].as_u64().expect("exp");
    let later = UNIX_EPOCH + Duration::from_secs(exp + 61);
    let e = both
        .verify_at(&token, Some(&req.nonce), later)
        .await
        .expect_err("expired");
    assert!(matches!(e, IdentityError::Expired { .. }), "{e}");

    // Bad signature: one character in the middle of the signature flipped.
    let dot = token.rfind('.').expect("signature");
    let mid = dot + (token.len() - dot) / 2;
    let mut bytes = token.clone().into_bytes();
    bytes[mid] = if bytes[mid] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(bytes).expect("utf8");
    let e = both
        .verify(&tampered, Some(&req.nonce))
        .await
        .expect_err("bad signature");
    assert!(matches!(e, IdentityError::BadSignature { .. }), "{e}");

    // Another login's nonce: refused.
    let e = both
        .verify(&token, Some("the-nonce-of-another-login"))
        .await
        .expect_err("nonce mismatch");
    assert_eq!(e, IdentityError::NonceMismatch);

    // The right nonce: accepted once, then refused as a replay.
    let id = both.verify(&token, Some(&req.nonce)).await.expect("first");
    assert_eq!(id.provider, "staff");
    let e = both
        .verify(&token, Some(&req.nonce))
        .await
        .expect_err("replay");
    assert_eq!(e, IdentityError::NonceReplayed);
}

/// A token signed with an ES256 key made here, which the IdP never had, naming key `kid`.
fn foreign_token(issuer: &str, aud: &str, kid: &str) -> String {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let key = jsonwebtoken::EncodingKey::from_ec_der(&kp.serialize_der());
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some(kid.into());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({
        "iss": issuer, "aud": aud, "sub": "pat", "iat": now, "exp": now + 300,
        "groups": ["wardgate-admins"], "amr": ["mfa"],
    });
    jsonwebtoken::encode(&h, &claims, &key).expect("sign")
}

#[tokio::test]
async fn key_rotation_is_followed_and_foreign_keys_are_refused() {
    let idp = idp();
    let interval = Duration::from_millis(400);
    let v = verifier(vec![staff(&idp)], interval);

    let (req, tokens) = idp.login("pat", SCOPE).await.expect("login");
    let old_token = tokens.id_token.expect("id token");
    let old_kid = claims_kid(&old_token);
    v.verify(&old_token, Some(&req.nonce))
        .await
        .expect("verifies");
    assert_eq!(v.fetch_count("staff").await, 1);

    // Graceful rotation (old key kept): a token with the new key makes the verifier fetch the
    // key set again and accept it.
    let new_kid = idp.rotate_keys(true).await.expect("rotate");
    assert_ne!(new_kid, old_kid);
    tokio::time::sleep(interval).await;
    let (req, tokens) = idp.login("pat", SCOPE).await.expect("login after rotation");
    let new_token = tokens.id_token.expect("id token");
    assert_eq!(claims_kid(&new_token), new_kid);
    let id = v
        .verify(&new_token, Some(&req.nonce))
        .await
        .expect("the new key is fetched and trusted");
    assert_eq!(id.subject, "pat");
    assert_eq!(v.fetch_count("staff").await, 2);

    // A token signed by a key the IdP never had: after one fetch to check, unknown key.
    tokio::time::sleep(interval).await;
    let forged = foreign_token(idp.issuer(), idp.client_id(), "never-published");
    let e = v.verify(&forged, None).await.expect_err("foreign key");
    assert!(
        matches!(e, IdentityError::UnknownKey { ref kid, refreshed: true, .. } if kid == "never-published"),
        "{e}"
    );
    assert_eq!(v.fetch_count("staff").await, 3);

    // A burst of forgeries with fresh kids costs the IdP no further fetches (rate limit).
    for i in 0..20 {
        let forged = foreign_token(idp.issuer(), idp.client_id(), &format!("random-{i}"));
        let e = v.verify(&forged, None).await.expect_err("foreign key");
        assert!(
            matches!(
                e,
                IdentityError::UnknownKey {
                    refreshed: false,
                    ..
                }
            ),
            "{e}"
        );
    }
    assert_eq!(v.fetch_count("staff").await, 3, "no fetch storm");

    // Hard rotation (old key dropped): once the verifier re-fetches, the old key's tokens
    // are refused as signed by an unknown key.
    idp.rotate_keys(false).await.expect("rotate");
    tokio::time::sleep(interval).await;
    let (_, tokens) = idp.login("pat", SCOPE).await.expect("login");
    let newest = tokens.id_token.expect("id token");
    v.verify(&newest, None).await.expect("newest key fetched");
    let e = v
        .verify(&old_token, None)
        .await
        .expect_err("old key dropped");
    assert!(
        matches!(e, IdentityError::UnknownKey { ref kid, .. } if *kid == old_kid),
        "{e}"
    );
}

fn claims_kid(token: &str) -> String {
    let header = token.split('.').next().expect("header");
    let h: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).expect("b64")).expect("json");
    h["kid"].as_str().expect("kid").to_owned()
}
