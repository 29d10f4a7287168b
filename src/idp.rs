//! A real OpenID provider for tests: starts `tools/test-idp` (oidc-provider on Node) on a free
//! loopback port and drives its flows the way a browser and the `wardgate` client would, with
//! nothing interactive: the code + PKCE flow (redirects followed with a cookie jar until the
//! loopback callback), the device grant (approved through the IdP's test endpoint), and key
//! rotation.
//!
//! Needs Node and `tools/test-idp/node_modules`: `scripts/idp.sh` installs both, and
//! `scripts/test` runs it. Without them [`Idp::start`] fails naming that command; it never
//! skips.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::Url;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::harness::{Proc, free_port, wait_for};

/// The loopback redirect path registered for the `wardgate-cli` client (any port matches).
pub const CALLBACK_PATH: &str = "/callback";

/// Token lifetimes for the IdP, in seconds (short ones make expiry testable).
#[derive(Debug, Clone)]
pub struct IdpOptions {
    /// ID-token lifetime.
    pub id_token_ttl: u64,
    /// Access-token lifetime.
    pub access_token_ttl: u64,
    /// Authorization-code lifetime.
    pub code_ttl: u64,
    /// Device-code lifetime.
    pub device_code_ttl: u64,
    /// Redirect URIs registered for the confidential admin-console client (exact match, port
    /// included: it is a web client); empty keeps the IdP's placeholder.
    pub admin_redirect_uris: Vec<String>,
}

impl Default for IdpOptions {
    fn default() -> Self {
        Self {
            id_token_ttl: 300,
            access_token_ttl: 300,
            code_ttl: 60,
            device_code_ttl: 300,
            admin_redirect_uris: Vec::new(),
        }
    }
}

/// An error the IdP answered with (RFC 6749 §5.2 / §4.1.2.1), kept typed so tests can assert
/// on `error` (e.g. `invalid_grant` for a replayed code).
#[derive(Debug, Clone)]
pub struct OAuthError {
    /// HTTP status (0 when the error came back on a redirect).
    pub status: u16,
    /// The `error` code.
    pub error: String,
    /// The `error_description`.
    pub description: String,
}

impl std::fmt::Display for OAuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the IdP refused: {} ({}, HTTP {})",
            self.error, self.description, self.status
        )
    }
}

impl std::error::Error for OAuthError {}

/// The endpoints from the IdP's discovery document.
#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    /// `issuer`.
    pub issuer: String,
    /// `authorization_endpoint`.
    pub authorization_endpoint: String,
    /// `token_endpoint`.
    pub token_endpoint: String,
    /// `device_authorization_endpoint`.
    pub device_authorization_endpoint: String,
    /// `jwks_uri`.
    pub jwks_uri: String,
}

/// One authorization request as the client made it: what it must remember to finish.
#[derive(Debug, Clone)]
pub struct AuthRequest {
    /// The URL to open in the browser.
    pub url: String,
    /// The `state` sent (checked against the callback).
    pub state: String,
    /// The `nonce` sent (the ID token must carry it).
    pub nonce: String,
    /// The PKCE verifier (sent with the code).
    pub code_verifier: String,
    /// The loopback redirect URI, with this login's port.
    pub redirect_uri: String,
}

/// What came back on the loopback callback.
#[derive(Debug, Clone)]
pub struct Callback {
    /// The authorization code.
    pub code: String,
    /// The state, as returned.
    pub state: String,
    /// The `iss` parameter (RFC 9207), when sent.
    pub iss: Option<String>,
}

/// A token-endpoint answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Tokens {
    /// The ID token (what the controller verifies).
    pub id_token: Option<String>,
    /// The access token.
    pub access_token: String,
    /// The refresh token, when issued.
    pub refresh_token: Option<String>,
    /// Access-token lifetime in seconds.
    pub expires_in: Option<u64>,
}

/// A device authorization (RFC 8628 §3.2).
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceAuthorization {
    /// What the device polls with.
    pub device_code: String,
    /// What the user types.
    pub user_code: String,
    /// Where the user types it.
    pub verification_uri: String,
    /// Lifetime in seconds.
    pub expires_in: u64,
}

/// A running test IdP; stopped on drop.
pub struct Idp {
    proc: Proc,
    issuer: String,
    client_id: String,
    admin_client_id: String,
    admin_client_secret: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

#[derive(Deserialize)]
struct Ready {
    issuer: String,
    clients: ReadyClients,
}

#[derive(Deserialize)]
struct ReadyClients {
    cli: String,
    admin: ReadyAdmin,
}

#[derive(Deserialize)]
struct ReadyAdmin {
    client_id: String,
    client_secret: String,
}

/// `tools/test-idp` in this checkout.
pub fn idp_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/test-idp")
}

fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// Remembers cookies by name across redirects on one host, as a browser would for the IdP's
/// login session (loopback, one origin: paths and expiry do not matter here).
#[derive(Default)]
struct CookieJar(HashMap<String, String>);

impl CookieJar {
    fn store(&mut self, resp: &reqwest::Response) {
        for v in resp.headers().get_all(reqwest::header::SET_COOKIE) {
            let Ok(s) = v.to_str() else { continue };
            let first = s.split(';').next().unwrap_or_default();
            if let Some((name, value)) = first.split_once('=') {
                if value.is_empty() {
                    self.0.remove(name.trim());
                } else {
                    self.0.insert(name.trim().to_owned(), value.to_owned());
                }
            }
        }
    }

    fn header(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

async fn oauth_error(resp: reqwest::Response) -> anyhow::Error {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    OAuthError {
        status,
        error: v["error"].as_str().unwrap_or("(no error code)").to_owned(),
        description: v["error_description"].as_str().unwrap_or(&body).to_owned(),
    }
    .into()
}

impl Idp {
    /// Starts the IdP with default lifetimes.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&IdpOptions::default())
    }

    /// Starts the IdP on a free loopback port and waits until it says it is ready.
    pub fn start_with(opts: &IdpOptions) -> anyhow::Result<Self> {
        let dir = idp_dir();
        if !dir.join("node_modules/oidc-provider").is_dir() {
            bail!(
                "the test OpenID provider is not installed ({} has no node_modules/oidc-provider): run `scripts/idp.sh` (scripts/test does) and try again",
                dir.display()
            );
        }
        let node = which_node().context(
            "node is not on PATH: run `scripts/idp.sh` (it installs Node and the test IdP's packages)",
        )?;
        let logs = tempfile::Builder::new().prefix("wardgate-idp").tempdir()?;
        let mut last_err = None;
        for attempt in 0..3 {
            let port = free_port();
            let mut cmd = Command::new(&node);
            cmd.current_dir(&dir)
                .arg("server.js")
                .args(["--port", &port.to_string()])
                .args(["--id-token-ttl", &opts.id_token_ttl.to_string()])
                .args(["--access-token-ttl", &opts.access_token_ttl.to_string()])
                .args(["--code-ttl", &opts.code_ttl.to_string()])
                .args(["--device-code-ttl", &opts.device_code_ttl.to_string()]);
            for uri in &opts.admin_redirect_uris {
                cmd.args(["--admin-redirect-uri", uri]);
            }
            let mut proc = Proc::spawn(cmd, logs.path(), &format!("idp-{attempt}"))?;
            let stdout = proc.stdout.clone();
            let ready = wait_for(Duration::from_secs(20), "the test IdP's READY line", || {
                let text = std::fs::read_to_string(&stdout).unwrap_or_default();
                if let Some(line) = text.lines().find_map(|l| l.strip_prefix("READY ")) {
                    return Some(Ok(line.to_owned()));
                }
                if !proc.running() {
                    return Some(Err(proc.stderr_text()));
                }
                None
            });
            match ready {
                Ok(Ok(line)) => {
                    let r: Ready =
                        serde_json::from_str(&line).context("the test IdP's READY line")?;
                    // Plain HTTP on loopback, but reqwest is built without a default TLS
                    // provider: give it one (the controller's IdP client: no redirects).
                    let http = wardgate_controller::identity::http_client(
                        rustls::RootCertStore::empty(),
                        Duration::from_secs(10),
                    )?;
                    return Ok(Self {
                        proc,
                        issuer: r.issuer,
                        client_id: r.clients.cli,
                        admin_client_id: r.clients.admin.client_id,
                        admin_client_secret: r.clients.admin.client_secret,
                        http,
                        _dir: logs,
                    });
                }
                Ok(Err(stderr)) => {
                    // Lost the port to someone else between probing and binding: try another.
                    if stderr.contains("EADDRINUSE") {
                        last_err = Some(anyhow::anyhow!("port {port} was taken"));
                        continue;
                    }
                    bail!("the test IdP exited at start:\n{stderr}");
                }
                Err(e) => return Err(e.context(proc.stderr_text())),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("the test IdP did not start")))
    }

    /// The issuer URL (`http://127.0.0.1:PORT`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The public `wardgate-cli` client's id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The confidential admin-console client: id and secret.
    pub fn admin_client(&self) -> (&str, &str) {
        (&self.admin_client_id, &self.admin_client_secret)
    }

    /// The IdP's stderr so far (for failing tests).
    pub fn logs(&self) -> String {
        self.proc.stderr_text()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.issuer)
    }

    /// The discovery document.
    pub async fn discovery(&self) -> anyhow::Result<Discovery> {
        let resp = self
            .http
            .get(self.url("/.well-known/openid-configuration"))
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(oauth_error(resp).await);
        }
        Ok(resp.json().await?)
    }

    /// An authorization request for the `wardgate-cli` client, as `wardgate login` would make
    /// it: PKCE S256, fresh state and nonce, a loopback redirect on `port`, and `login_hint`
    /// naming the account the IdP logs in. Asking for `offline_access` adds `prompt=consent`,
    /// without which the IdP drops that scope (OIDC Core 11).
    pub fn authorization_request(
        &self,
        account: &str,
        scope: &str,
        port: u16,
    ) -> anyhow::Result<AuthRequest> {
        let code_verifier = random_token();
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(code_verifier.as_bytes()));
        let state = random_token();
        let nonce = random_token();
        let redirect_uri = format!("http://127.0.0.1:{port}{CALLBACK_PATH}");
        let mut params = vec![
            ("client_id", self.client_id.as_str()),
            ("response_type", "code"),
            ("scope", scope),
            ("redirect_uri", &redirect_uri),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
            ("state", &state),
            ("nonce", &nonce),
            ("login_hint", account),
        ];
        if scope.split(' ').any(|s| s == "offline_access") {
            params.push(("prompt", "consent"));
        }
        let url = Url::parse_with_params(&self.url("/auth"), &params)?;
        Ok(AuthRequest {
            url: url.into(),
            state,
            nonce,
            code_verifier,
            redirect_uri,
        })
    }

    /// Plays the browser: follows redirects from `url` (keeping the IdP's cookies) until one
    /// points at `redirect_uri`, and returns what it carries. An `error` there comes back as
    /// an [`OAuthError`].
    pub async fn follow(&self, url: &str, redirect_uri: &str) -> anyhow::Result<Callback> {
        let at = self.follow_to(url, redirect_uri).await?;
        let q: HashMap<String, String> = at.query_pairs().into_owned().collect();
        if let Some(error) = q.get("error") {
            return Err(OAuthError {
                status: 0,
                error: error.clone(),
                description: q.get("error_description").cloned().unwrap_or_default(),
            }
            .into());
        }
        Ok(Callback {
            code: q.get("code").cloned().context("the callback has no code")?,
            state: q.get("state").cloned().unwrap_or_default(),
            iss: q.get("iss").cloned(),
        })
    }

    /// Follows redirects from `url` until one points at `redirect_uri`; returns that URL.
    async fn follow_to(&self, url: &str, redirect_uri: &str) -> anyhow::Result<Url> {
        let mut jar = CookieJar::default();
        let mut at = Url::parse(url)?;
        for _ in 0..20 {
            if at.as_str().starts_with(redirect_uri) {
                return Ok(at);
            }
            let resp = self
                .http
                .get(at.clone())
                .header(reqwest::header::COOKIE, jar.header())
                .send()
                .await
                .with_context(|| format!("GET {at}"))?;
            jar.store(&resp);
            if !resp.status().is_redirection() {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                bail!("{at} answered HTTP {status} instead of redirecting: {body}");
            }
            let loc = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .context("a redirect without Location")?;
            at = at.join(loc)?;
        }
        bail!("more than 20 redirects from {url}")
    }

    /// Plays the user's browser for a login the `wardgate` client started: opens `url` (the one
    /// the client printed) with `login_hint=account` added, follows the IdP's redirects, and
    /// delivers the final redirect (a code, or the IdP's refusal) to the client's loopback
    /// callback, as a browser would. Returns the HTTP status the client's callback answered.
    pub async fn browse_as(&self, url: &str, account: &str) -> anyhow::Result<u16> {
        let mut u = Url::parse(url)?;
        let redirect_uri = u
            .query_pairs()
            .find(|(k, _)| k == "redirect_uri")
            .map(|(_, v)| v.into_owned())
            .context("the login URL has no redirect_uri")?;
        u.query_pairs_mut().append_pair("login_hint", account);
        let deliver = self.follow_to(u.as_str(), &redirect_uri).await?;
        let resp = self
            .http
            .get(deliver)
            .send()
            .await
            .context("delivering the callback to the client's loopback listener")?;
        Ok(resp.status().as_u16())
    }

    /// Exchanges an authorization code (with the request's PKCE verifier) at the token
    /// endpoint. The IdP's refusal comes back as an [`OAuthError`].
    pub async fn exchange_code(&self, req: &AuthRequest, code: &str) -> anyhow::Result<Tokens> {
        self.exchange_code_with_verifier(req, code, &req.code_verifier)
            .await
    }

    /// [`Idp::exchange_code`] with a chosen PKCE verifier (to test that a wrong one fails).
    pub async fn exchange_code_with_verifier(
        &self,
        req: &AuthRequest,
        code: &str,
        verifier: &str,
    ) -> anyhow::Result<Tokens> {
        let resp = self
            .http
            .post(self.url("/token"))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("client_id", &self.client_id),
                ("redirect_uri", &req.redirect_uri),
                ("code_verifier", verifier),
            ])
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(oauth_error(resp).await);
        }
        Ok(resp.json().await?)
    }

    /// The whole code + PKCE flow for `account` with a loopback redirect on a free port:
    /// checks `state` on the way back, returns the request (for its nonce) and the tokens.
    pub async fn login(&self, account: &str, scope: &str) -> anyhow::Result<(AuthRequest, Tokens)> {
        let req = self.authorization_request(account, scope, free_port())?;
        let cb = self.follow(&req.url, &req.redirect_uri).await?;
        if cb.state != req.state {
            bail!("the callback's state is not the request's");
        }
        let tokens = self.exchange_code(&req, &cb.code).await?;
        Ok((req, tokens))
    }

    /// Starts a device authorization for the `wardgate-cli` client.
    pub async fn device_authorize(&self, scope: &str) -> anyhow::Result<DeviceAuthorization> {
        let resp = self
            .http
            .post(self.url("/device/auth"))
            .form(&[("client_id", self.client_id.as_str()), ("scope", scope)])
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(oauth_error(resp).await);
        }
        Ok(resp.json().await?)
    }

    /// Approves a pending device authorization as `account` (test-only IdP endpoint standing
    /// in for the user typing the code into a browser).
    pub async fn device_approve(&self, user_code: &str, account: &str) -> anyhow::Result<()> {
        let resp = self
            .http
            .post(self.url("/test/device/approve"))
            .json(&serde_json::json!({ "user_code": user_code, "account": account }))
            .send()
            .await?;
        if !resp.status().is_success() {
            let body = resp.text().await.unwrap_or_default();
            bail!("the IdP did not approve user code {user_code}: {body}");
        }
        Ok(())
    }

    /// One poll of the token endpoint for a device code: `Ok(None)` while the user has not
    /// approved (`authorization_pending`), the tokens once they have, an [`OAuthError`]
    /// otherwise.
    pub async fn device_poll(&self, device_code: &str) -> anyhow::Result<Option<Tokens>> {
        let resp = self
            .http
            .post(self.url("/token"))
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", device_code),
                ("client_id", &self.client_id),
            ])
            .send()
            .await?;
        if resp.status().is_success() {
            return Ok(Some(resp.json().await?));
        }
        let e = oauth_error(resp).await;
        match e.downcast_ref::<OAuthError>() {
            Some(o) if o.error == "authorization_pending" || o.error == "slow_down" => Ok(None),
            _ => Err(e),
        }
    }

    /// Disables `account` at the IdP (`disabled`), or enables it again: a disabled account's
    /// logins fail and its refresh tokens are refused with `invalid_grant`.
    pub async fn set_account_disabled(&self, account: &str, disabled: bool) -> anyhow::Result<()> {
        let path = if disabled {
            "/test/accounts/disable"
        } else {
            "/test/accounts/enable"
        };
        self.test_post(path, serde_json::json!({ "account": account }))
            .await
    }

    /// Takes the IdP down (every OpenID endpoint answers 503) or brings it back up.
    pub async fn set_down(&self, down: bool) -> anyhow::Result<()> {
        let path = if down { "/test/down" } else { "/test/up" };
        self.test_post(path, serde_json::json!({})).await
    }

    async fn test_post(&self, path: &str, body: serde_json::Value) -> anyhow::Result<()> {
        let resp = self.http.post(self.url(path)).json(&body).send().await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            bail!("the IdP refused {path}: HTTP {status} {text}");
        }
        Ok(())
    }

    /// Makes a new RS256 key the IdP's signing key; `keep_old` keeps the previous keys in its
    /// JWKS (a graceful rotation), otherwise they vanish (a compromised-key rotation).
    /// Returns the new key's id.
    pub async fn rotate_keys(&self, keep_old: bool) -> anyhow::Result<String> {
        let resp = self
            .http
            .post(self.url("/test/rotate-keys"))
            .json(&serde_json::json!({ "keep_old": keep_old }))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("key rotation failed: HTTP {}", resp.status());
        }
        let v: serde_json::Value = resp.json().await?;
        v["active"]
            .as_str()
            .map(str::to_owned)
            .context("the rotation answer names no active key")
    }
}

fn which_node() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("node"))
        .find(|p| p.is_file())
}
