//! `wardgate login --oidc ISSUER`: signing in with an OpenID provider on this machine. Two
//! flows:
//!
//! - **Authorization code + PKCE with a loopback redirect** (RFC 8252): a one-shot HTTP
//!   listener on `127.0.0.1:0`, the authorization URL printed (and opened in a browser when
//!   there is a desktop). `state` binds the callback to this login. The client does **not**
//!   redeem the code: it hands the code, the PKCE verifier, the redirect URI and the nonce to
//!   the controller over the device's TLS channel, and the controller redeems them. So the
//!   refresh token (`offline_access` is asked for) is only ever held by the controller, which
//!   uses it to notice a user disabled at the provider.
//! - **Device authorization grant** (RFC 8628) for machines without a browser: the user
//!   enters a short code on another device while this one polls. Here the client redeems,
//!   and keeps only the ID token: no `offline_access`, and the rest of the answer is dropped,
//!   so no long-lived credential leaves this function (such sessions are not checked at the
//!   provider while they last).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wardgate_common::proto::{Login, OidcCodeLogin, Secret};

/// The scopes asked for: identity, e-mail, groups. The code flow adds `offline_access` (the
/// refresh token goes to the controller); the device flow never asks for it.
pub const DEFAULT_SCOPE: &str = "openid profile email groups";
/// The scope that makes the provider issue a refresh token.
pub const OFFLINE_ACCESS: &str = "offline_access";
/// The client id Wardgate is registered under at the IdP, unless told otherwise.
pub const DEFAULT_CLIENT_ID: &str = "wardgate-cli";
/// The loopback redirect path.
pub const CALLBACK_PATH: &str = "/callback";

/// Why an OIDC login failed.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The IdP could not be reached or answered nonsense.
    #[error("cannot talk to the identity provider at {url}: {detail}")]
    Http {
        /// What was fetched.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The discovery document is unusable.
    #[error("the identity provider's discovery document is unusable: {0}")]
    Discovery(String),
    /// The IdP refused (RFC 6749 error).
    #[error("the identity provider refused the login: {error}{}", if .description.is_empty() { String::new() } else { format!(" ({})", .description) })]
    Refused {
        /// The `error` code.
        error: String,
        /// The `error_description`.
        description: String,
    },
    /// The callback did not belong to this login.
    #[error(
        "the browser came back with another login's state: ignored (a stale tab, or someone trying to slip you their login); run `wardgate login` again"
    )]
    StateMismatch,
    /// The user did not finish in time.
    #[error("the login was not completed within {0:?}; run `wardgate login` again")]
    Timeout(Duration),
    /// The loopback listener failed.
    #[error("cannot listen for the login callback on loopback: {0}")]
    Listen(#[source] std::io::Error),
    /// The token answer has no ID token.
    #[error(
        "the identity provider returned no ID token: is `openid` among the scopes the client may ask for?"
    )]
    NoIdToken,
    /// The IdP has no device endpoint.
    #[error(
        "this identity provider does not offer the device flow (no device_authorization_endpoint); log in with a browser instead"
    )]
    NoDeviceFlow,
}

/// How to log in.
#[derive(Debug, Clone)]
pub struct OidcOptions {
    /// The issuer URL.
    pub issuer: String,
    /// Wardgate's client id at the IdP.
    pub client_id: String,
    /// Scopes.
    pub scope: String,
    /// Device flow instead of the browser.
    pub device: bool,
    /// Try to open a browser for the URL (only when a desktop is there).
    pub open_browser: bool,
    /// Give up after this long.
    pub timeout: Duration,
}

#[derive(Debug, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    #[serde(default)]
    device_authorization_endpoint: Option<String>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    id_token: Option<String>,
}

#[derive(Deserialize)]
struct DeviceAnswer {
    device_code: String,
    user_code: String,
    verification_uri: String,
    #[serde(default)]
    verification_uri_complete: Option<String>,
    #[serde(default)]
    interval: Option<u64>,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize, Default)]
struct ErrorAnswer {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut b);
    URL_SAFE_NO_PAD.encode(b)
}

/// HTTPS to the IdP with the public web PKI roots, through the workspace's ring provider;
/// plain HTTP is refused except to loopback (test and development IdPs).
fn http() -> Result<reqwest::Client, OidcError> {
    let err = |d: String| OidcError::Http {
        url: "(setup)".into(),
        detail: d,
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(wardgate_common::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(std::sync::Arc::new(roots))
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| err(e.to_string()))
}

fn check_url(url: &str) -> Result<(), OidcError> {
    let ok = url.starts_with("https://")
        || reqwest::Url::parse(url).is_ok_and(|u| {
            u.scheme() == "http"
                && u.host_str().is_some_and(|h| {
                    h == "localhost"
                        || h.trim_start_matches('[')
                            .trim_end_matches(']')
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback())
                })
        });
    if ok {
        Ok(())
    } else {
        Err(OidcError::Discovery(format!(
            "{url} must be https:// (plain http only to loopback)"
        )))
    }
}

async fn refused(resp: reqwest::Response) -> OidcError {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let e: ErrorAnswer = serde_json::from_str(&body).unwrap_or_default();
    OidcError::Refused {
        error: if e.error.is_empty() {
            format!("HTTP {status}")
        } else {
            e.error
        },
        description: e.error_description,
    }
}

async fn discover(http: &reqwest::Client, issuer: &str) -> Result<Discovery, OidcError> {
    check_url(issuer)?;
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let resp = http.get(&url).send().await.map_err(|e| OidcError::Http {
        url: url.clone(),
        detail: e.to_string(),
    })?;
    if !resp.status().is_success() {
        return Err(OidcError::Http {
            url,
            detail: format!("HTTP {}", resp.status()),
        });
    }
    let d: Discovery = resp.json().await.map_err(|e| OidcError::Http {
        url: url.clone(),
        detail: format!("not a discovery document: {e}"),
    })?;
    if d.issuer != issuer {
        return Err(OidcError::Discovery(format!(
            "it names issuer {}, not {issuer}; give the issuer exactly as the IdP writes it",
            d.issuer
        )));
    }
    check_url(&d.authorization_endpoint)?;
    check_url(&d.token_endpoint)?;
    Ok(d)
}

async fn token_request(
    http: &reqwest::Client,
    url: &str,
    form: &[(&str, &str)],
) -> Result<Result<TokenAnswer, OidcError>, OidcError> {
    let resp = http
        .post(url)
        .form(form)
        .send()
        .await
        .map_err(|e| OidcError::Http {
            url: url.into(),
            detail: e.to_string(),
        })?;
    if !resp.status().is_success() {
        return Ok(Err(refused(resp).await));
    }
    // Only the ID token is read; an access or refresh token in the answer is dropped with it.
    resp.json::<TokenAnswer>()
        .await
        .map(Ok)
        .map_err(|e| OidcError::Http {
            url: url.into(),
            detail: e.to_string(),
        })
}

/// Runs the chosen flow and returns the login to send to the controller.
pub async fn login(opts: &OidcOptions) -> Result<Login, OidcError> {
    let http = http()?;
    let d = discover(&http, &opts.issuer).await?;
    let run = async {
        if opts.device {
            device_flow(&http, &d, opts).await
        } else {
            code_flow(&d, opts).await
        }
    };
    tokio::time::timeout(opts.timeout, run)
        .await
        .map_err(|_| OidcError::Timeout(opts.timeout))?
}

fn open_browser(url: &str) {
    let has_desktop = cfg!(target_os = "macos")
        || cfg!(windows)
        || std::env::var_os("DISPLAY").is_some()
        || std::env::var_os("WAYLAND_DISPLAY").is_some();
    if !has_desktop {
        return;
    }
    let program = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(windows) {
        "explorer"
    } else {
        "xdg-open"
    };
    let _ = std::process::Command::new(program)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}

async fn code_flow(d: &Discovery, opts: &OidcOptions) -> Result<Login, OidcError> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(OidcError::Listen)?;
    let port = listener.local_addr().map_err(OidcError::Listen)?.port();
    let redirect_uri = format!("http://127.0.0.1:{port}{CALLBACK_PATH}");
    let verifier = random_token();
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let state = random_token();
    let nonce = random_token();
    let scope = code_flow_scope(&opts.scope);
    let url = reqwest::Url::parse_with_params(
        &d.authorization_endpoint,
        &[
            ("client_id", opts.client_id.as_str()),
            ("response_type", "code"),
            ("scope", scope.as_str()),
            // OIDC Core §11: a refresh token (`offline_access`) is granted only with the
            // user's explicit consent, so providers that follow it (oidc-provider, Keycloak)
            // drop `offline_access` without this.
            ("prompt", "consent"),
            ("redirect_uri", redirect_uri.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
            ("state", state.as_str()),
            ("nonce", nonce.as_str()),
        ],
    )
    .map_err(|e| OidcError::Discovery(format!("bad authorization_endpoint: {e}")))?;
    eprintln!("To log in, open this URL in your browser:\n  {url}");
    if opts.open_browser {
        open_browser(url.as_str());
    }
    let code = loop {
        let (mut sock, _) = listener.accept().await.map_err(OidcError::Listen)?;
        match callback(&mut sock, &state).await {
            Callback::NotOurs => continue,
            Callback::Code(c) => break c,
            Callback::Failed(e) => return Err(e),
        }
    };
    // The controller redeems the code: the tokens, above all the refresh token, go to it
    // and not to this machine.
    Ok(Login::OidcCode(Box::new(OidcCodeLogin {
        issuer: d.issuer.clone(),
        client_id: opts.client_id.clone(),
        code,
        code_verifier: Secret::new(verifier),
        redirect_uri,
        nonce,
    })))
}

/// The code flow's scopes: the configured ones plus `offline_access`, so the provider gives
/// the controller a refresh token to check the user with.
fn code_flow_scope(scope: &str) -> String {
    if scope.split_whitespace().any(|s| s == OFFLINE_ACCESS) {
        scope.to_owned()
    } else {
        format!("{} {OFFLINE_ACCESS}", scope.trim())
    }
}

/// The device flow's scopes: never `offline_access` (the client would receive the refresh
/// token, and refresh tokens must not leave the controller).
fn device_flow_scope(scope: &str) -> String {
    scope
        .split_whitespace()
        .filter(|s| *s != OFFLINE_ACCESS)
        .collect::<Vec<_>>()
        .join(" ")
}

enum Callback {
    NotOurs,
    Code(Secret),
    Failed(OidcError),
}

/// Reads one HTTP request on the loopback listener and answers it. Only `GET /callback`
/// with this login's state counts; anything else (a favicon, a port scan) is answered 404
/// and ignored.
async fn callback(sock: &mut tokio::net::TcpStream, state: &str) -> Callback {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while len < buf.len() {
            match sock.read(&mut buf[len..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    let head = String::from_utf8_lossy(&buf[..len]).into_owned();
    let target = head
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("GET "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_default()
        .to_owned();
    let reply = |status: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let parsed = reqwest::Url::parse(&format!("http://127.0.0.1{target}")).ok();
    let Some(u) = parsed.filter(|u| read.is_ok() && u.path() == CALLBACK_PATH) else {
        let _ = sock.write_all(reply("404 Not Found", "").as_bytes()).await;
        return Callback::NotOurs;
    };
    let q: std::collections::HashMap<String, String> = u.query_pairs().into_owned().collect();
    let got_state = q.get("state").map(String::as_str).unwrap_or_default();
    if !subtle_eq(got_state.as_bytes(), state.as_bytes()) {
        let _ = sock
            .write_all(
                reply(
                    "400 Bad Request",
                    "<p>This is not the login Wardgate started. Close this window.</p>",
                )
                .as_bytes(),
            )
            .await;
        return Callback::Failed(OidcError::StateMismatch);
    }
    if let Some(error) = q.get("error") {
        let _ = sock
            .write_all(
                reply(
                    "200 OK",
                    "<p>The login was refused. You can close this window.</p>",
                )
                .as_bytes(),
            )
            .await;
        return Callback::Failed(OidcError::Refused {
            error: error.clone(),
            description: q.get("error_description").cloned().unwrap_or_default(),
        });
    }
    let Some(code) = q.get("code") else {
        let _ = sock
            .write_all(reply("400 Bad Request", "").as_bytes())
            .await;
        return Callback::Failed(OidcError::Refused {
            error: "no code".into(),
            description: "the callback carried no authorization code".into(),
        });
    };
    let _ = sock
        .write_all(
            reply(
                "200 OK",
                "<p>Logged in to Wardgate. You can close this window.</p>",
            )
            .as_bytes(),
        )
        .await;
    let _ = sock.shutdown().await;
    Callback::Code(Secret::new(code.clone()))
}

/// Constant-time equality (no timing hint about how much of a guessed state matched).
fn subtle_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn device_flow(
    http: &reqwest::Client,
    d: &Discovery,
    opts: &OidcOptions,
) -> Result<Login, OidcError> {
    let endpoint = d
        .device_authorization_endpoint
        .as_deref()
        .ok_or(OidcError::NoDeviceFlow)?;
    check_url(endpoint)?;
    let scope = device_flow_scope(&opts.scope);
    let resp = http
        .post(endpoint)
        .form(&[
            ("client_id", opts.client_id.as_str()),
            ("scope", scope.as_str()),
        ])
        .send()
        .await
        .map_err(|e| OidcError::Http {
            url: endpoint.into(),
            detail: e.to_string(),
        })?;
    if !resp.status().is_success() {
        return Err(refused(resp).await);
    }
    let a: DeviceAnswer = resp.json().await.map_err(|e| OidcError::Http {
        url: endpoint.into(),
        detail: e.to_string(),
    })?;
    eprintln!(
        "To log in, visit {} on any device and enter the code: {}",
        a.verification_uri, a.user_code
    );
    if let Some(c) = &a.verification_uri_complete {
        eprintln!("  (or open {c})");
    }
    let mut interval = Duration::from_secs(a.interval.unwrap_or(5).clamp(1, 60));
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(a.expires_in.unwrap_or(600).min(3600));
    loop {
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() > deadline {
            return Err(OidcError::Refused {
                error: "expired_token".into(),
                description: "the code expired before it was entered".into(),
            });
        }
        match token_request(
            http,
            &d.token_endpoint,
            &[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", a.device_code.as_str()),
                ("client_id", opts.client_id.as_str()),
            ],
        )
        .await?
        {
            Ok(t) => {
                let id_token = t.id_token.ok_or(OidcError::NoIdToken)?;
                return Ok(Login::Oidc {
                    id_token: Secret::new(id_token),
                    nonce: None,
                });
            }
            Err(OidcError::Refused { error, .. }) if error == "authorization_pending" => {}
            Err(OidcError::Refused { error, .. }) if error == "slow_down" => {
                interval += Duration::from_secs(5);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_code_flow_asks_for_a_refresh_token() {
        assert_eq!(
            code_flow_scope(DEFAULT_SCOPE),
            "openid profile email groups offline_access"
        );
        assert_eq!(
            code_flow_scope("openid offline_access"),
            "openid offline_access"
        );
        assert_eq!(
            device_flow_scope("openid offline_access groups"),
            "openid groups"
        );
    }
}
