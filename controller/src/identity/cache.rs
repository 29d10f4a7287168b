//! The IO shell around [`verify`](super::verify::verify): discovery, the cached key set per
//! provider, refresh when a token names a key not yet seen (rate-limited), and the nonce
//! store. One `Verifier` per controller process, shared by every login.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Mutex;

use super::config::{ProviderConfig, Providers, check_url};
use super::error::IdentityError;
use super::jwks::{Jwks, MAX_JWKS_BYTES};
use super::verify::{NonceStore, VerifiedIdentity, peek_issuer, peek_kid, unix_seconds, verify};

/// How the key cache behaves.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// The least time between two fetches of one provider's keys. A token naming an unknown
    /// key triggers a fetch only when the last one is older than this, so a stream of forged
    /// tokens with random `kid`s costs the IdP at most one request per interval.
    pub refresh_min_interval: Duration,
    /// Keys older than this are fetched again before use (keys removed at the IdP stop being
    /// trusted within this time). If that fetch fails the old keys stay in use.
    pub max_age: Duration,
    /// Timeout of each HTTP request to the IdP.
    pub http_timeout: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            refresh_min_interval: Duration::from_secs(30),
            max_age: Duration::from_secs(3600),
            http_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Default)]
struct KeyState {
    jwks_uri: Option<String>,
    token_endpoint: Option<String>,
    jwks: Option<Arc<Jwks>>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    fetches: u64,
}

struct Discovered {
    jwks_uri: String,
    token_endpoint: Option<String>,
}

struct Slot {
    config: ProviderConfig,
    keys: Mutex<KeyState>,
}

/// Verifies ID tokens from several providers, each selected by the token's issuer.
pub struct Verifier {
    slots: Vec<Slot>,
    http: reqwest::Client,
    options: CacheOptions,
    nonces: std::sync::Mutex<NonceStore>,
}

/// An HTTP client for talking to IdPs: TLS through the workspace's rustls/ring provider with
/// `roots` as the trust anchors, no redirects (an IdP's endpoints are named in its discovery
/// document; a redirect elsewhere is not followed for keys), and `timeout` per request.
pub fn http_client(
    roots: rustls::RootCertStore,
    timeout: Duration,
) -> Result<reqwest::Client, IdentityError> {
    let bad = |detail: String| IdentityError::Config {
        provider: "(all)".into(),
        detail,
    };
    let tls = rustls::ClientConfig::builder_with_provider(wardgate_common::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS setup failed: {e}")))?
        .with_root_certificates(Arc::new(roots))
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .map_err(|e| bad(format!("HTTP client setup failed: {e}")))
}

/// Reads a response body up to `max` bytes.
pub(super) async fn read_limited(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > max {
            return Err(format!("the answer is over {max} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn get(http: &reqwest::Client, url: &str, max: usize) -> Result<Vec<u8>, String> {
    let resp = http
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    read_limited(resp, max).await
}

impl Verifier {
    /// A verifier for `providers`, fetching with `http` (see [`http_client`]). Nothing is
    /// fetched until the first token arrives, so the controller starts while an IdP is down.
    pub fn new(providers: Providers, http: reqwest::Client, options: CacheOptions) -> Self {
        Self {
            slots: providers
                .all()
                .iter()
                .map(|c| Slot {
                    config: c.clone(),
                    keys: Mutex::new(KeyState::default()),
                })
                .collect(),
            http,
            options,
            nonces: std::sync::Mutex::new(NonceStore::new()),
        }
    }

    /// Verifies `token` now and, when it carries a nonce, marks that nonce used.
    pub async fn verify(
        &self,
        token: &str,
        expected_nonce: Option<&str>,
    ) -> Result<VerifiedIdentity, IdentityError> {
        self.verify_at(token, expected_nonce, SystemTime::now())
            .await
    }

    /// [`Verifier::verify`] at a given wall-clock time (tests; the key cache's own timing is
    /// still real time).
    pub async fn verify_at(
        &self,
        token: &str,
        expected_nonce: Option<&str>,
        now: SystemTime,
    ) -> Result<VerifiedIdentity, IdentityError> {
        let issuer = peek_issuer(token)?;
        let slot = self
            .slots
            .iter()
            .find(|s| s.config.issuer == issuer)
            .ok_or_else(|| IdentityError::UnknownIssuer {
                issuer: issuer.clone(),
                known: self
                    .slots
                    .iter()
                    .map(|s| format!("`{}`", s.config.issuer))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let kid = peek_kid(token)?;
        let (jwks, refreshed) = self.keys_for(slot, kid.as_deref()).await?;
        let id = verify(token, &jwks, &slot.config, now, expected_nonce).map_err(|e| match e {
            IdentityError::UnknownKey { provider, kid, .. } => IdentityError::UnknownKey {
                provider,
                kid,
                refreshed,
            },
            other => other,
        })?;
        if let Some(nonce) = &id.nonce {
            let now_ms = unix_seconds(now).saturating_mul(1000);
            let mut store = self
                .nonces
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            store.consume(nonce, id.expires_at_ms, slot.config.leeway_s, now_ms)?;
        }
        Ok(id)
    }

    /// Verifies a token used as a login that carries no nonce (the device grant has none):
    /// the token itself is then single-use, so a copied token cannot log in a second time.
    pub async fn verify_login(
        &self,
        token: &str,
        expected_nonce: Option<&str>,
    ) -> Result<VerifiedIdentity, IdentityError> {
        let id = self.verify(token, expected_nonce).await?;
        if id.nonce.is_none() {
            use sha2::Digest as _;
            let key = format!(
                "token:{}",
                hex::encode(sha2::Sha256::digest(token.as_bytes()))
            );
            let leeway = self
                .slots
                .iter()
                .find(|s| s.config.name == id.provider)
                .map_or(0, |s| s.config.leeway_s);
            let now_ms = unix_seconds(SystemTime::now()).saturating_mul(1000);
            self.nonces
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .consume(&key, id.expires_at_ms, leeway, now_ms)?;
        }
        Ok(id)
    }

    /// Verifies a token presented as a bearer credential on every request (the admin API):
    /// the same checks, but nonces are not consumed, since the token is meant to be reused
    /// until it expires.
    pub async fn verify_bearer(&self, token: &str) -> Result<VerifiedIdentity, IdentityError> {
        let issuer = peek_issuer(token)?;
        let slot = self
            .slots
            .iter()
            .find(|s| s.config.issuer == issuer)
            .ok_or_else(|| IdentityError::UnknownIssuer {
                issuer: issuer.clone(),
                known: self
                    .slots
                    .iter()
                    .map(|s| format!("`{}`", s.config.issuer))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let kid = peek_kid(token)?;
        let (jwks, _) = self.keys_for(slot, kid.as_deref()).await?;
        verify(token, &jwks, &slot.config, SystemTime::now(), None)
    }

    /// The configuration of the provider named `name`.
    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.slots
            .iter()
            .map(|s| &s.config)
            .find(|c| c.name == name)
    }

    /// The provider's keys, fetched when missing or old, and fetched again when `kid` is not
    /// among them and the last fetch is old enough. Returns whether a fetch happened for
    /// `kid`. The lock is held across the fetch: concurrent logins wait for one request
    /// instead of each making their own.
    async fn keys_for(
        &self,
        slot: &Slot,
        kid: Option<&str>,
    ) -> Result<(Arc<Jwks>, bool), IdentityError> {
        let mut st = slot.keys.lock().await;
        let may_fetch = st
            .last_attempt
            .is_none_or(|t| t.elapsed() >= self.options.refresh_min_interval);
        let stale = st
            .fetched_at
            .is_none_or(|t| t.elapsed() >= self.options.max_age);
        let missing_kid = match (&st.jwks, kid) {
            (Some(j), Some(k)) => !j.has_kid(k),
            _ => false,
        };

        let mut refreshed = false;
        if st.jwks.is_none() || (may_fetch && (stale || missing_kid)) {
            if st.jwks.is_none() && !may_fetch {
                // The last attempt failed moments ago: do not hammer a broken IdP.
                return Err(IdentityError::Jwks {
                    provider: slot.config.name.clone(),
                    url: st
                        .jwks_uri
                        .clone()
                        .unwrap_or_else(|| slot.config.issuer.clone()),
                    detail: "the last fetch failed moments ago; retrying is rate-limited".into(),
                });
            }
            st.last_attempt = Some(Instant::now());
            st.fetches += 1;
            match self.fetch(&slot.config, &mut st).await {
                Ok(jwks) => {
                    st.jwks = Some(Arc::new(jwks));
                    st.fetched_at = Some(Instant::now());
                    refreshed = true;
                }
                Err(e) => {
                    if st.jwks.is_none() {
                        return Err(e);
                    }
                    tracing::warn!(provider = %slot.config.name, error = %e, "keeping the cached signing keys");
                }
            }
        }
        let jwks = st.jwks.clone().ok_or_else(|| IdentityError::Jwks {
            provider: slot.config.name.clone(),
            url: st.jwks_uri.clone().unwrap_or_default(),
            detail: "no keys".into(),
        })?;
        Ok((jwks, refreshed))
    }

    async fn fetch(
        &self,
        config: &ProviderConfig,
        st: &mut KeyState,
    ) -> Result<Jwks, IdentityError> {
        let jwks_uri = match &st.jwks_uri {
            Some(u) => u.clone(),
            None => {
                let d = self.discover(config).await?;
                st.jwks_uri = Some(d.jwks_uri.clone());
                st.token_endpoint = d.token_endpoint;
                d.jwks_uri
            }
        };
        let jwks_err = |detail: String| IdentityError::Jwks {
            provider: config.name.clone(),
            url: jwks_uri.clone(),
            detail,
        };
        let body = get(&self.http, &jwks_uri, MAX_JWKS_BYTES)
            .await
            .map_err(jwks_err)?;
        let jwks = Jwks::from_json(&body).map_err(jwks_err)?;
        if jwks.keys().is_empty() {
            return Err(jwks_err(format!(
                "it holds no usable signing key (skipped: {})",
                jwks.skipped.join("; ")
            )));
        }
        tracing::debug!(provider = %config.name, keys = jwks.keys().len(), "fetched signing keys");
        Ok(jwks)
    }

    /// The token endpoint of the provider whose issuer is `issuer`, with its configuration;
    /// discovered once and kept (with the key set's location) for the process's life.
    pub(super) async fn token_endpoint(
        &self,
        issuer: &str,
    ) -> Result<(&ProviderConfig, String), IdentityError> {
        let slot = self.slot_by_issuer(issuer)?;
        let mut st = slot.keys.lock().await;
        if st.token_endpoint.is_none() {
            let d = self.discover(&slot.config).await?;
            st.jwks_uri = Some(d.jwks_uri);
            st.token_endpoint = d.token_endpoint;
        }
        let endpoint = st
            .token_endpoint
            .clone()
            .ok_or_else(|| IdentityError::Discovery {
                provider: slot.config.name.clone(),
                url: slot.config.issuer.clone(),
                detail: "it names no token_endpoint".into(),
            })?;
        Ok((&slot.config, endpoint))
    }

    fn slot_by_issuer(&self, issuer: &str) -> Result<&Slot, IdentityError> {
        self.slots
            .iter()
            .find(|s| s.config.issuer == issuer)
            .ok_or_else(|| IdentityError::UnknownIssuer {
                issuer: issuer.to_owned(),
                known: self
                    .slots
                    .iter()
                    .map(|s| format!("`{}`", s.config.issuer))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The HTTP client for the providers.
    pub(super) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Reads the discovery document and returns where the keys and the token endpoint are,
    /// after checking that the document's `issuer` is exactly the configured one (OIDC
    /// Discovery 4.3: otherwise one IdP could impersonate another).
    async fn discover(&self, config: &ProviderConfig) -> Result<Discovered, IdentityError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            config.issuer.trim_end_matches('/')
        );
        let bad = |detail: String| IdentityError::Discovery {
            provider: config.name.clone(),
            url: url.clone(),
            detail,
        };
        let body = get(&self.http, &url, 256 * 1024).await.map_err(bad)?;
        #[derive(serde::Deserialize)]
        struct Doc {
            issuer: String,
            jwks_uri: String,
            #[serde(default)]
            token_endpoint: Option<String>,
        }
        let doc: Doc = serde_json::from_slice(&body)
            .map_err(|e| bad(format!("not a discovery document ({e})")))?;
        if doc.issuer != config.issuer {
            return Err(bad(format!(
                "it names issuer `{}`, not the configured `{}`; configure the issuer exactly as the IdP writes it",
                doc.issuer, config.issuer
            )));
        }
        check_url("jwks_uri", &doc.jwks_uri).map_err(bad)?;
        if let Some(t) = &doc.token_endpoint {
            check_url("token_endpoint", t).map_err(bad)?;
        }
        Ok(Discovered {
            jwks_uri: doc.jwks_uri,
            token_endpoint: doc.token_endpoint,
        })
    }

    /// How many key-set fetches were made for the provider named `name` (diagnostics, and
    /// tests that the refresh is rate-limited).
    pub async fn fetch_count(&self, name: &str) -> u64 {
        match self.slots.iter().find(|s| s.config.name == name) {
            Some(s) => s.keys.lock().await.fetches,
            None => 0,
        }
    }

    /// The providers this verifier trusts.
    pub fn providers(&self) -> impl Iterator<Item = &ProviderConfig> {
        self.slots.iter().map(|s| &s.config)
    }
}
