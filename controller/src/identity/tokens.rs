//! The controller at the provider's token endpoint: it redeems the authorization code the
//! client obtained (with the client's PKCE verifier, so a code copied on its way is worth
//! nothing), and later refreshes the session's refresh token to learn whether the user may
//! still be signed in. The client never sees a token; the refresh token never leaves here
//! except sealed into the store.

use std::time::Duration;

use serde::Deserialize;
use wardgate_common::proto::Secret;

use super::cache::{Verifier, read_limited};
use super::error::IdentityError;
use super::verify::VerifiedIdentity;

/// The largest token-endpoint answer read: tokens are a few KiB.
const MAX_TOKEN_ANSWER: usize = 64 * 1024;

/// Why a token-endpoint exchange failed. The split matters: only [`TokenError::Refused`]
/// with `invalid_grant` means the provider no longer honours the grant (account disabled,
/// token revoked or expired); everything else may pass and must not end a session.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The provider answered with an OAuth error (RFC 6749 §5.2).
    #[error("identity provider {provider} refused: {error}{}", if .description.is_empty() { String::new() } else { format!(" ({})", .description) })]
    Refused {
        /// The provider's name.
        provider: String,
        /// The `error` code (`invalid_grant`, `invalid_client`, …).
        error: String,
        /// The `error_description`, if any.
        description: String,
    },
    /// The provider could not be reached, failed (5xx) or answered something that is not a
    /// token answer: worth retrying later.
    #[error("identity provider {provider} is unavailable: {detail}")]
    Unavailable {
        /// The provider's name.
        provider: String,
        /// What failed.
        detail: String,
    },
    /// The token answer had no ID token (the `openid` scope is missing).
    #[error("identity provider {provider} returned no ID token: is `openid` among the scopes?")]
    NoIdToken {
        /// The provider's name.
        provider: String,
    },
    /// The client id is not one the controller accepts for this provider.
    #[error("client id `{client_id}` is not configured for identity provider {provider}")]
    UnknownClient {
        /// The provider's name.
        provider: String,
        /// The client id given.
        client_id: String,
    },
    /// The ID token (or the provider's configuration) was refused.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

impl TokenError {
    /// Whether the provider said the grant is gone (RFC 6749 `invalid_grant`): for a refresh,
    /// the user may no longer be signed in.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, TokenError::Refused { error, .. } if error == "invalid_grant")
    }

    /// Whether trying again later may work (network, 5xx, discovery).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TokenError::Unavailable { .. }
                | TokenError::Identity(
                    IdentityError::Discovery { .. } | IdentityError::Jwks { .. }
                )
        )
    }
}

/// A redeemed authorization code: who, and the refresh token when the provider gave one.
#[derive(Debug)]
pub struct Redeemed {
    /// The verified ID token's identity.
    pub identity: VerifiedIdentity,
    /// The client id it was issued to.
    pub client_id: String,
    /// The refresh token (`offline_access` granted).
    pub refresh_token: Option<Secret>,
}

/// What a code login carries from the client.
#[derive(Debug, Clone, Copy)]
pub struct CodeLogin<'a> {
    /// The issuer the client logged in at.
    pub issuer: &'a str,
    /// The client id it used.
    pub client_id: &'a str,
    /// The authorization code.
    pub code: &'a Secret,
    /// The PKCE verifier.
    pub code_verifier: &'a Secret,
    /// The redirect URI of the authorization request.
    pub redirect_uri: &'a str,
    /// The nonce of the authorization request.
    pub nonce: &'a str,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
}

#[derive(Deserialize, Default)]
struct ErrorAnswer {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

impl Verifier {
    async fn token_call(
        &self,
        provider: &str,
        endpoint: &str,
        form: &[(&str, &str)],
    ) -> Result<TokenAnswer, TokenError> {
        let unavailable = |detail: String| TokenError::Unavailable {
            provider: provider.to_owned(),
            detail,
        };
        let resp = self
            .http()
            .post(endpoint)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(form)
            .send()
            .await
            // Without the URL: reqwest's message names it, and a query could carry a code.
            .map_err(|e| unavailable(format!("request failed: {}", e.without_url())))?;
        let status = resp.status();
        let body = read_limited(resp, MAX_TOKEN_ANSWER)
            .await
            .map_err(unavailable)?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| unavailable(format!("not a token answer ({e})")));
        }
        // An OAuth error is a 4xx with a JSON `error`; anything else (5xx, an HTML page from a
        // proxy) says nothing about the grant.
        let oauth = status
            .is_client_error()
            .then(|| serde_json::from_slice::<ErrorAnswer>(&body).ok())
            .flatten()
            .filter(|e| !e.error.is_empty());
        if let Some(e) = oauth {
            return Err(TokenError::Refused {
                provider: provider.to_owned(),
                error: e.error,
                description: e.error_description.chars().take(300).collect(),
            });
        }
        Err(unavailable(format!("HTTP {status}")))
    }

    /// Redeems a code the client obtained and verifies the ID token it yields (nonce
    /// consumed, so the login cannot be repeated).
    pub async fn redeem_code(&self, login: CodeLogin<'_>) -> Result<Redeemed, TokenError> {
        let (config, endpoint) = self.token_endpoint(login.issuer).await?;
        if !config.client_ids.iter().any(|c| c == login.client_id) {
            return Err(TokenError::UnknownClient {
                provider: config.name.clone(),
                client_id: login.client_id.chars().take(100).collect(),
            });
        }
        let answer = self
            .token_call(
                &config.name,
                &endpoint,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", login.code.expose()),
                    ("redirect_uri", login.redirect_uri),
                    ("client_id", login.client_id),
                    ("code_verifier", login.code_verifier.expose()),
                ],
            )
            .await?;
        let id_token = answer.id_token.ok_or_else(|| TokenError::NoIdToken {
            provider: config.name.clone(),
        })?;
        let identity = self.verify_login(&id_token, Some(login.nonce)).await?;
        Ok(Redeemed {
            identity,
            client_id: login.client_id.to_owned(),
            refresh_token: answer.refresh_token.map(Secret::new),
        })
    }

    /// Refreshes at the provider named `provider`; returns the refresh token to keep (the
    /// rotated one when the provider rotates, else the same). A new ID token in the answer is
    /// not needed: the question was only whether the provider still honours the grant.
    pub async fn refresh(
        &self,
        provider: &str,
        client_id: &str,
        refresh_token: &Secret,
    ) -> Result<Secret, TokenError> {
        let issuer = self
            .provider(provider)
            .map(|c| c.issuer.clone())
            .ok_or_else(|| {
                TokenError::Identity(IdentityError::Config {
                    provider: provider.to_owned(),
                    detail: "no longer configured; the session cannot be checked".into(),
                })
            })?;
        let (config, endpoint) = self.token_endpoint(&issuer).await?;
        let answer = self
            .token_call(
                &config.name,
                &endpoint,
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh_token.expose()),
                    ("client_id", client_id),
                ],
            )
            .await?;
        Ok(match answer.refresh_token {
            Some(t) => Secret::new(t),
            None => refresh_token.clone(),
        })
    }
}

/// The delay before retrying a provider that failed `failures` times in a row: doubling
/// from one second, never longer than `interval` (a provider back up is noticed within one
/// refresh interval at worst).
pub fn retry_delay(failures: i64, interval: Duration) -> Duration {
    let exp = u32::try_from(failures.clamp(0, 16)).unwrap_or(16);
    Duration::from_secs(1u64 << exp).min(interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_up_to_the_interval() {
        let i = Duration::from_secs(300);
        assert_eq!(retry_delay(0, i), Duration::from_secs(1));
        assert_eq!(retry_delay(3, i), Duration::from_secs(8));
        assert_eq!(retry_delay(50, i), i);
        assert_eq!(retry_delay(-1, i), Duration::from_secs(1));
    }

    #[test]
    fn only_invalid_grant_means_the_grant_is_gone() {
        let refused = |e: &str| TokenError::Refused {
            provider: "p".into(),
            error: e.into(),
            description: String::new(),
        };
        assert!(refused("invalid_grant").is_invalid_grant());
        assert!(!refused("invalid_client").is_invalid_grant());
        let down = TokenError::Unavailable {
            provider: "p".into(),
            detail: "HTTP 503".into(),
        };
        assert!(!down.is_invalid_grant() && down.is_transient());
    }
}
