//! Logins and login sessions: who the user is (local password + TOTP, or an OpenID
//! provider's ID token), the failed-login throttle, and the session a login opens for a
//! device. Connects ride on the device's live session; grants never outlive it.
//!
//! Every attempt is audited (`login.local` / `login.oidc`, allow or deny with the reason;
//! `login.lockout` when a name gets locked). What reaches the user is deliberately vaguer
//! than the audit row: a wrong password and a wrong one-time code read the same, so an
//! attacker cannot learn that the password was right.

use std::time::Duration;

use serde_json::json;
use tracing::{info, warn};
use wardgate_common::proto::{ErrorCode, Login, Response, SessionInfo, WireError};

use crate::identity::IdentityError;
use crate::secrets;
use crate::service::Controller;
use crate::store::{Device, LoginMethod, Session, StoreError, User};
use crate::totp;

/// Settings (in the store, shared by replicas) and their defaults.
pub mod setting {
    /// Longest a login session lasts (humantime); policies may cut it shorter.
    pub const SESSION_LIFETIME: &str = "session.lifetime";
    /// A session unused (no new grant) this long ends.
    pub const SESSION_IDLE_TIMEOUT: &str = "session.idle_timeout";
    /// Failed local logins within the window that lock the name.
    pub const LOCKOUT_THRESHOLD: &str = "login.lockout_threshold";
    /// The window failures are counted in.
    pub const LOCKOUT_WINDOW: &str = "login.lockout_window";
    /// How long a locked name stays locked.
    pub const LOCKOUT_PERIOD: &str = "login.lockout_period";
    /// How often the controller refreshes each OIDC session at its provider, which is how
    /// soon a user disabled there loses their session (and how often each live session
    /// costs the provider one token request).
    pub const REFRESH_INTERVAL: &str = "session.refresh_interval";

    /// Defaults: a working day, an hour idle, 5 failures in 15 minutes lock for 15 minutes,
    /// sessions checked at the provider every 5 minutes.
    pub const DEFAULTS: &[(&str, &str)] = &[
        (SESSION_LIFETIME, "12h"),
        (SESSION_IDLE_TIMEOUT, "1h"),
        (LOCKOUT_THRESHOLD, "5"),
        (LOCKOUT_WINDOW, "15m"),
        (LOCKOUT_PERIOD, "15m"),
        (REFRESH_INTERVAL, "5m"),
    ];
}

/// The identity settings in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentitySettings {
    /// See [`setting::SESSION_LIFETIME`].
    pub session_lifetime: Duration,
    /// See [`setting::SESSION_IDLE_TIMEOUT`].
    pub session_idle_timeout: Duration,
    /// See [`setting::LOCKOUT_THRESHOLD`].
    pub lockout_threshold: u32,
    /// See [`setting::LOCKOUT_WINDOW`].
    pub lockout_window: Duration,
    /// See [`setting::LOCKOUT_PERIOD`].
    pub lockout_period: Duration,
    /// See [`setting::REFRESH_INTERVAL`].
    pub refresh_interval: Duration,
}

/// Why a setting value is refused.
#[derive(Debug, thiserror::Error)]
#[error("setting {name} = {value:?} is invalid: {detail}")]
pub struct SettingError {
    /// The setting.
    pub name: String,
    /// The value.
    pub value: String,
    /// What is wrong.
    pub detail: String,
}

/// Checks one identity setting's value (durations non-zero, threshold 1..=1000).
pub fn check_setting(name: &str, value: &str) -> Result<(), SettingError> {
    let err = |detail: String| SettingError {
        name: name.into(),
        value: value.into(),
        detail,
    };
    if name == setting::LOCKOUT_THRESHOLD {
        return match value.parse::<u32>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(()),
            _ => Err(err("give a whole number from 1 to 1000".into())),
        };
    }
    match humantime::parse_duration(value) {
        Ok(d) if !d.is_zero() && d <= Duration::from_secs(366 * 24 * 3600) => Ok(()),
        Ok(_) => Err(err("give a duration above zero and at most a year".into())),
        Err(e) => Err(err(format!("{e}; write e.g. 30s, 15m or 12h"))),
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn now_ms() -> i64 {
    wardgate_common::clock::now_ms()
}

fn internal(e: impl std::fmt::Display) -> WireError {
    warn!(error = %e, "internal error during login");
    WireError::new(
        ErrorCode::Internal,
        "the controller hit an internal error; it has been logged there, try again later",
    )
}

fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// Who logged in, before a session exists.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The Wardgate user.
    pub user: User,
    /// How.
    pub method: LoginMethod,
    /// The provider's name (OIDC).
    pub provider: Option<String>,
    /// Multi-factor?
    pub mfa: bool,
    /// Groups from the provider's claims (OIDC).
    pub groups: Option<Vec<String>>,
    /// The provider's refresh token (OIDC code logins with `offline_access`), kept by the
    /// session so the provider can be asked whether the user is still allowed.
    pub refresh: Option<RefreshGrant>,
}

/// A refresh token and the client it was issued to.
#[derive(Debug, Clone)]
pub struct RefreshGrant {
    /// The client id.
    pub client_id: String,
    /// The token (redacted in `Debug`).
    pub token: wardgate_common::proto::Secret,
}

impl Controller {
    /// The identity settings now (defaults for unset or unreadable values).
    pub async fn identity_settings(&self) -> Result<IdentitySettings, StoreError> {
        let mut vals = std::collections::HashMap::new();
        for (name, default) in setting::DEFAULTS {
            let v = self.store.get_setting(name).await?;
            let v = v
                .filter(|v| check_setting(name, v).is_ok())
                .unwrap_or_else(|| (*default).to_owned());
            vals.insert(*name, v);
        }
        let dur = |n: &str| {
            vals.get(n)
                .and_then(|v| humantime::parse_duration(v).ok())
                .unwrap_or(Duration::from_secs(900))
        };
        Ok(IdentitySettings {
            session_lifetime: dur(setting::SESSION_LIFETIME),
            session_idle_timeout: dur(setting::SESSION_IDLE_TIMEOUT),
            lockout_threshold: vals
                .get(setting::LOCKOUT_THRESHOLD)
                .and_then(|v| v.parse().ok())
                .unwrap_or(5),
            lockout_window: dur(setting::LOCKOUT_WINDOW),
            lockout_period: dur(setting::LOCKOUT_PERIOD),
            refresh_interval: dur(setting::REFRESH_INTERVAL),
        })
    }

    /// Establishes who `login` is (audited either way). `purpose` (`enrol`, `login`) goes
    /// into the audit row.
    pub async fn authenticate(
        &self,
        login: &Login,
        purpose: &str,
    ) -> Result<Authenticated, WireError> {
        match login {
            Login::Local {
                username,
                password,
                totp,
            } => {
                self.authenticate_local(
                    username,
                    password.expose(),
                    totp.as_ref().map(|t| t.expose()),
                    purpose,
                )
                .await
            }
            Login::Oidc { id_token, nonce } => {
                self.authenticate_oidc(id_token.expose(), nonce.as_deref(), purpose)
                    .await
            }
            Login::OidcCode(c) => {
                let login = crate::identity::CodeLogin {
                    issuer: &c.issuer,
                    client_id: &c.client_id,
                    code: &c.code,
                    code_verifier: &c.code_verifier,
                    redirect_uri: &c.redirect_uri,
                    nonce: &c.nonce,
                };
                self.authenticate_oidc_code(login, purpose).await
            }
        }
    }

    async fn local_deny(
        &self,
        username: &str,
        reason: &str,
        purpose: &str,
        err: WireError,
    ) -> WireError {
        match self
            .audit(
                &format!("user:{username}"),
                "login.local",
                username,
                "deny",
                json!({"reason": reason, "code": err.code, "purpose": purpose}),
            )
            .await
        {
            Ok(()) => err,
            Err(e) => internal(e),
        }
    }

    /// Counts a failure (locking the name at the threshold, audited as `login.lockout`) and
    /// returns the error the user sees: the lockout when this failure caused one.
    async fn local_failure(
        &self,
        username: &str,
        reason: &str,
        purpose: &str,
        err: WireError,
    ) -> WireError {
        let s = match self.identity_settings().await {
            Ok(s) => s,
            Err(e) => return internal(e),
        };
        let now = now_ms();
        let err = self.local_deny(username, reason, purpose, err).await;
        match self
            .store
            .record_login_failure(
                username,
                now,
                ms(s.lockout_window),
                i64::from(s.lockout_threshold),
                ms(s.lockout_period),
            )
            .await
        {
            Ok((failures, Some(until))) => {
                warn!(user = %username, failures, "login locked out after repeated failures");
                if let Err(e) = self
                    .audit(
                        "system",
                        "login.lockout",
                        username,
                        "lock",
                        json!({"failures": failures, "window_s": s.lockout_window.as_secs(),
                               "locked_until_ms": until, "locked_until": rfc3339(until)}),
                    )
                    .await
                {
                    return internal(e);
                }
                locked_out(username, until, now)
            }
            Ok(_) => err,
            Err(e) => internal(e),
        }
    }

    async fn authenticate_local(
        &self,
        username: &str,
        password: &str,
        code: Option<&str>,
        purpose: &str,
    ) -> Result<Authenticated, WireError> {
        let now = now_ms();
        let s = self.identity_settings().await.map_err(internal)?;
        let throttle = self
            .store
            .login_throttle(username, now - ms(s.lockout_window))
            .await
            .map_err(internal)?;
        if let Some(until) = throttle.locked_until_ms.filter(|u| *u > now) {
            // Refused before the password is even checked: a locked name is no oracle.
            return Err(self
                .local_deny(
                    username,
                    "locked out",
                    purpose,
                    locked_out(username, until, now),
                )
                .await);
        }
        let user = self
            .store
            .user_by_username(username)
            .await
            .map_err(internal)?;
        let stored = user.as_ref().and_then(|u| u.password_hash.clone());
        let pw = password.to_owned();
        let ok =
            tokio::task::spawn_blocking(move || secrets::verify_password(&pw, stored.as_deref()))
                .await
                .map_err(internal)?;
        let wrong = || {
            WireError::new(
                ErrorCode::BadCredentials,
                "user name, password or one-time code is wrong",
            )
        };
        let user = match user {
            Some(u) if ok => u,
            Some(_) => {
                return Err(self
                    .local_failure(username, "wrong password", purpose, wrong())
                    .await);
            }
            None => {
                return Err(self
                    .local_failure(username, "unknown user", purpose, wrong())
                    .await);
            }
        };
        if user.disabled {
            let err = WireError::new(
                ErrorCode::UserDisabled,
                "this account is disabled; contact your IT helpdesk",
            );
            return Err(self
                .local_deny(username, "account disabled", purpose, err)
                .await);
        }
        let secret = self
            .store
            .user_totp_secret(&user.id)
            .await
            .map_err(internal)?;
        let mfa = match (&secret, code) {
            (None, _) => false,
            (Some(_), None) => {
                let err = WireError::new(
                    ErrorCode::TotpRequired,
                    "this account needs a one-time code from your authenticator app: pass --totp CODE",
                );
                return Err(self
                    .local_deny(username, "one-time code missing", purpose, err)
                    .await);
            }
            (Some(secret), Some(code)) => {
                let key = totp::decode_secret(secret).ok_or_else(|| {
                    internal(format!(
                        "user {}: stored TOTP secret is not base32",
                        user.id
                    ))
                })?;
                let unix_s = now.div_euclid(1000);
                let Some(step) = totp::matching_step(&key, code, unix_s) else {
                    return Err(self
                        .local_failure(username, "wrong one-time code", purpose, wrong())
                        .await);
                };
                if !self
                    .store
                    .accept_totp_step(&user.id, step)
                    .await
                    .map_err(internal)?
                {
                    return Err(self
                        .local_failure(
                            username,
                            "one-time code already used",
                            purpose,
                            WireError::new(
                                ErrorCode::BadCredentials,
                                "this one-time code was already used; wait for the next one",
                            ),
                        )
                        .await);
                }
                true
            }
        };
        self.store
            .clear_login_failures(username)
            .await
            .map_err(internal)?;
        self.audit(
            &format!("user:{username}"),
            "login.local",
            &user.id,
            "allow",
            json!({"mfa": mfa, "purpose": purpose}),
        )
        .await
        .map_err(internal)?;
        Ok(Authenticated {
            user,
            method: LoginMethod::Local,
            provider: None,
            mfa,
            groups: None,
            refresh: None,
        })
    }

    async fn oidc_deny(
        &self,
        reason: String,
        code: ErrorCode,
        msg: String,
        purpose: &str,
    ) -> WireError {
        match self
            .audit(
                "anonymous",
                "login.oidc",
                "oidc",
                "deny",
                json!({"reason": reason, "code": code, "purpose": purpose}),
            )
            .await
        {
            Ok(()) => WireError::new(code, msg),
            Err(e) => internal(e),
        }
    }

    /// A code login: the controller redeems the code at the provider (with the client's
    /// PKCE verifier), verifies the ID token, and keeps the refresh token for the session.
    async fn authenticate_oidc_code(
        &self,
        login: crate::identity::CodeLogin<'_>,
        purpose: &str,
    ) -> Result<Authenticated, WireError> {
        let Some(verifier) = self.verifier.as_ref() else {
            let m = "this controller trusts no identity provider; log in with a local user or ask an administrator to configure one".to_owned();
            return Err(self
                .oidc_deny(m.clone(), ErrorCode::IdentityRejected, m, purpose)
                .await);
        };
        if login.redirect_uri.len() > 2048 || login.nonce.len() > 512 {
            let m = "the login's redirect URI or nonce is too long".to_owned();
            return Err(self
                .oidc_deny(m.clone(), ErrorCode::BadRequest, m, purpose)
                .await);
        }
        let redeemed = match verifier.redeem_code(login).await {
            Ok(r) => r,
            Err(e) => {
                let kind = match &e {
                    crate::identity::TokenError::Identity(ie) => identity_error_kind(ie),
                    crate::identity::TokenError::Refused { .. } => "code_refused",
                    crate::identity::TokenError::Unavailable { .. } => "provider_unavailable",
                    crate::identity::TokenError::NoIdToken { .. } => "no_id_token",
                    crate::identity::TokenError::UnknownClient { .. } => "unknown_client",
                };
                if e.is_transient() {
                    warn!(error = %e, "OIDC login: the identity provider is unavailable");
                }
                return Err(self
                    .oidc_deny(
                        format!("{kind}: {e}"),
                        ErrorCode::IdentityRejected,
                        format!("the identity provider's login was refused: {e}"),
                        purpose,
                    )
                    .await);
            }
        };
        let refresh = redeemed.refresh_token.map(|token| RefreshGrant {
            client_id: redeemed.client_id.clone(),
            token,
        });
        self.finish_oidc(redeemed.identity, refresh, purpose).await
    }

    async fn authenticate_oidc(
        &self,
        id_token: &str,
        nonce: Option<&str>,
        purpose: &str,
    ) -> Result<Authenticated, WireError> {
        let Some(verifier) = self.verifier.as_ref() else {
            let m = "this controller trusts no identity provider; log in with a local user or ask an administrator to configure one".to_owned();
            return Err(self
                .oidc_deny(m.clone(), ErrorCode::IdentityRejected, m, purpose)
                .await);
        };
        let id = match verifier.verify_login(id_token, nonce).await {
            Ok(id) => id,
            Err(e) => {
                let kind = identity_error_kind(&e);
                return Err(self
                    .oidc_deny(
                        format!("{kind}: {e}"),
                        ErrorCode::IdentityRejected,
                        format!("the identity provider's token was refused: {e}"),
                        purpose,
                    )
                    .await);
            }
        };
        self.finish_oidc(id, None, purpose).await
    }

    /// After the provider vouched for `id`: the Wardgate user (provisioned if new), refused
    /// when disabled here, audited either way.
    async fn finish_oidc(
        &self,
        id: crate::identity::VerifiedIdentity,
        refresh: Option<RefreshGrant>,
        purpose: &str,
    ) -> Result<Authenticated, WireError> {
        let user = self.provision(&id).await?;
        let actor = format!("user:{}", user.username);
        if user.disabled {
            let err = WireError::new(
                ErrorCode::UserDisabled,
                "this account is disabled in Wardgate; contact your IT helpdesk",
            );
            self.audit(
                &actor,
                "login.oidc",
                &user.id,
                "deny",
                json!({"reason": "account disabled", "provider": id.provider, "purpose": purpose}),
            )
            .await
            .map_err(internal)?;
            return Err(err);
        }
        self.audit(
            &actor,
            "login.oidc",
            &user.id,
            "allow",
            json!({"provider": id.provider, "subject": id.subject, "groups": id.groups, "mfa": id.mfa,
                   "amr": id.amr, "acr": id.acr, "purpose": purpose,
                   "refreshable": refresh.is_some()}),
        )
        .await
        .map_err(internal)?;
        Ok(Authenticated {
            user,
            method: LoginMethod::Oidc,
            provider: Some(id.provider),
            mfa: id.mfa,
            groups: Some(id.groups),
            refresh,
        })
    }

    /// The Wardgate user for a verified identity: found by (issuer, subject), or created
    /// with the provider's user name (prefixed with the provider's name when a different
    /// user already has it, so an IdP can never take over a local account by naming it).
    async fn provision(&self, id: &crate::identity::VerifiedIdentity) -> Result<User, WireError> {
        if let Some(u) = self
            .store
            .user_by_oidc(&id.issuer, &id.subject)
            .await
            .map_err(internal)?
        {
            return Ok(u);
        }
        let clean = |s: &str| -> String {
            s.chars()
                .filter(|c| c.is_ascii_alphanumeric() || "-_.@:".contains(*c))
                .take(64)
                .collect()
        };
        let base = clean(&id.username);
        let base = if base.is_empty() {
            clean(&id.subject)
        } else {
            base
        };
        for candidate in [base.clone(), format!("{}:{base}", clean(&id.provider))] {
            let user = User {
                id: secrets::new_id("usr"),
                username: candidate.clone(),
                display_name: id.username.clone(),
                password_hash: None,
                disabled: false,
                created_ms: now_ms(),
            };
            match self
                .store
                .insert_oidc_user(&user, &id.issuer, &id.subject)
                .await
            {
                Ok(()) => {
                    self.audit(
                        "system",
                        "user.provision",
                        &user.id,
                        "ok",
                        json!({"username": user.username, "provider": id.provider, "subject": id.subject}),
                    )
                    .await
                    .map_err(internal)?;
                    info!(user = %user.username, provider = %id.provider, "user provisioned from identity provider");
                    return Ok(user);
                }
                Err(StoreError::Conflict { .. }) => {
                    // Raced with another login of the same subject, or the name is taken.
                    if let Some(u) = self
                        .store
                        .user_by_oidc(&id.issuer, &id.subject)
                        .await
                        .map_err(internal)?
                    {
                        return Ok(u);
                    }
                }
                Err(e) => return Err(internal(e)),
            }
        }
        Err(internal(format!(
            "cannot find a free user name for {} at {}",
            id.subject, id.provider
        )))
    }

    /// Opens a session for `who` on `device_id` (ending the device's earlier one), audited
    /// as `session.open`.
    pub async fn open_session(
        &self,
        who: &Authenticated,
        device_id: &str,
    ) -> Result<SessionInfo, WireError> {
        let s = self.identity_settings().await.map_err(internal)?;
        let now = now_ms();
        let session = Session {
            id: secrets::new_id("ses"),
            user_id: who.user.id.clone(),
            device_id: device_id.to_owned(),
            method: who.method,
            provider: who.provider.clone(),
            mfa: who.mfa,
            groups: who.groups.clone(),
            created_ms: now,
            last_used_ms: now,
            expires_ms: now.saturating_add(ms(s.session_lifetime)),
            idle_timeout_ms: ms(s.session_idle_timeout),
            ended_ms: None,
            end_reason: None,
        };
        let refresh = match (&who.refresh, &self.sealer, &who.provider) {
            (Some(r), Some(sealer), Some(provider)) => Some(crate::store::SessionRefresh {
                session_id: session.id.clone(),
                provider: provider.clone(),
                client_id: r.client_id.clone(),
                token_sealed: sealer.seal(&session.id, &r.token).map_err(internal)?,
                next_refresh_ms: now.saturating_add(ms(s.refresh_interval)),
                failures: 0,
                last_error: None,
            }),
            (Some(_), _, _) => {
                warn!(session = %session.id, "no refresh-token key: this session will not be checked at the identity provider");
                None
            }
            _ => None,
        };
        self.store
            .insert_session_with_refresh(&session, refresh.as_ref())
            .await
            .map_err(internal)?;
        let groups = match &who.groups {
            Some(g) => g.clone(),
            None => self
                .store
                .groups_of_user(&who.user.id)
                .await
                .map_err(internal)?,
        };
        self.audit(
            &format!("user:{}", who.user.username),
            "session.open",
            &session.id,
            "ok",
            json!({"device": device_id, "method": who.method.as_str(), "provider": who.provider,
                   "mfa": who.mfa, "groups": groups, "expires_ms": session.expires_ms,
                   "idle_timeout_ms": session.idle_timeout_ms,
                   "checked_at_provider": refresh.is_some()}),
        )
        .await
        .map_err(internal)?;
        Ok(SessionInfo {
            username: who.user.username.clone(),
            method: who.method.as_str().to_owned(),
            provider: who.provider.clone(),
            mfa: who.mfa,
            groups,
            expires_at_ms: session.expires_ms,
            idle_timeout_ms: session.idle_timeout_ms,
        })
    }

    /// An enrolled device's user logs in again (`wardgate login`): same user as the device's
    /// owner, new session.
    pub async fn login_device(&self, device: &Device, login: Login) -> Result<Response, WireError> {
        let who = self.authenticate(&login, "login").await?;
        if who.user.id != device.owner_user_id {
            let err = WireError::new(
                ErrorCode::Forbidden,
                format!(
                    "this device was enrolled by another user, not {}; log in as its owner or enrol it again",
                    who.user.username
                ),
            );
            self.audit(
                &format!("user:{}", who.user.username),
                "session.open",
                &device.id,
                "deny",
                json!({"reason": "not the device's owner"}),
            )
            .await
            .map_err(internal)?;
            return Err(err);
        }
        Ok(Response::LoggedIn(
            self.open_session(&who, &device.id).await?,
        ))
    }

    /// The device's live session, or the error telling the user to log in again.
    pub async fn live_session(&self, device_id: &str, now: i64) -> Result<Session, WireError> {
        let s = self
            .store
            .latest_session_for_device(device_id)
            .await
            .map_err(internal)?;
        match s {
            Some(s) if s.live_at(now) => Ok(s),
            Some(s) => Err(login_required(
                &s.why_not_live(now)
                    .unwrap_or_else(|| "your login session ended".into()),
            )),
            None => Err(login_required("this device has no login session")),
        }
    }

    /// Ends sessions whose time is up and the grants riding on them, telling each device why.
    /// Also marks expired grants ended. Run periodically by `serve`.
    pub async fn sweep(&self) {
        let now = now_ms();
        match self.store.end_lapsed_sessions(now).await {
            Ok(ended) => {
                for s in ended {
                    let reason = s.end_reason.clone().unwrap_or_else(|| "ended".into());
                    let _ = self
                        .audit(
                            "system",
                            "session.end",
                            &s.id,
                            "ok",
                            json!({"reason": reason, "device": s.device_id, "user": s.user_id}),
                        )
                        .await;
                    self.end_session_grants(&s.device_id, &format!("login session {reason}"))
                        .await;
                }
            }
            Err(e) => warn!(error = %e, "cannot sweep sessions"),
        }
        self.sweep_expired().await;
    }

    /// Ends a device's live grants because its session ended.
    pub async fn end_session_grants(&self, device_id: &str, why: &str) -> usize {
        match self
            .store
            .active_grants_for_device(device_id, now_ms())
            .await
        {
            Ok(grants) => {
                self.end_grants(
                    grants,
                    &format!("{why}; log in again: run `wardgate login`"),
                    "system",
                    true,
                )
                .await
            }
            Err(e) => {
                warn!(error = %e, device = %device_id, "cannot list grants of an ended session");
                0
            }
        }
    }

    /// Ends every session of a user (disabled) and their grants.
    pub async fn end_user_sessions(
        &self,
        user_id: &str,
        reason: &str,
        actor: &str,
    ) -> Result<usize, StoreError> {
        let ended = self
            .store
            .end_sessions_for_user(user_id, reason, now_ms())
            .await?;
        for s in &ended {
            self.audit(
                actor,
                "session.end",
                &s.id,
                "ok",
                json!({"reason": reason, "device": s.device_id, "user": user_id}),
            )
            .await?;
        }
        Ok(ended.len())
    }
}

/// The error for a device without a live session.
pub fn login_required(why: &str) -> WireError {
    WireError::new(
        ErrorCode::LoginRequired,
        format!("{why}; log in again: run `wardgate login`"),
    )
}

fn locked_out(username: &str, until_ms: i64, now_ms: i64) -> WireError {
    let secs = (until_ms - now_ms).max(0).div_euclid(1000) + 1;
    WireError::new(
        ErrorCode::LockedOut,
        format!(
            "too many failed logins for {username}: locked until {} (in {secs} s); try again then, or ask your IT helpdesk",
            rfc3339(until_ms)
        ),
    )
}

/// A short stable name for an identity error, for audit rows and tests.
pub fn identity_error_kind(e: &IdentityError) -> &'static str {
    match e {
        IdentityError::Config { .. } => "config",
        IdentityError::Malformed { .. } => "malformed",
        IdentityError::TooLarge { .. } => "too_large",
        IdentityError::Encrypted => "encrypted",
        IdentityError::UnsupportedAlgorithm { .. } => "unsupported_algorithm",
        IdentityError::CriticalHeader { .. } => "critical_header",
        IdentityError::UnknownIssuer { .. } => "unknown_issuer",
        IdentityError::WrongIssuer { .. } => "wrong_issuer",
        IdentityError::UnknownKey { .. } => "unknown_key",
        IdentityError::MissingKid { .. } => "missing_kid",
        IdentityError::KeyMismatch { .. } => "key_mismatch",
        IdentityError::BadSignature { .. } => "bad_signature",
        IdentityError::WrongAudience { .. } => "wrong_audience",
        IdentityError::WrongAuthorizedParty { .. } => "wrong_authorized_party",
        IdentityError::Expired { .. } => "expired",
        IdentityError::NotYetValid { .. } => "not_yet_valid",
        IdentityError::IssuedInFuture { .. } => "issued_in_future",
        IdentityError::MissingClaim { .. } => "missing_claim",
        IdentityError::InvalidClaim { .. } => "invalid_claim",
        IdentityError::NonceMissing => "nonce_missing",
        IdentityError::NonceMismatch => "nonce_mismatch",
        IdentityError::NonceReplayed => "nonce_replayed",
        IdentityError::Discovery { .. } => "discovery",
        IdentityError::Jwks { .. } => "jwks",
    }
}
