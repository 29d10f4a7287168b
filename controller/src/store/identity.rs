//! Identity state: local users' TOTP secrets, users provisioned from OpenID providers, the
//! failed-login throttle, and login sessions.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, User, get_flag, is_unique_violation};

/// How a session's user logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoginMethod {
    /// Local password (and TOTP, when enrolled).
    Local,
    /// An OpenID provider's ID token.
    Oidc,
}

impl LoginMethod {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LoginMethod::Local => "local",
            LoginMethod::Oidc => "oidc",
        }
    }
}

/// A login session of a user on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// `ses_…`.
    pub id: String,
    /// The user.
    pub user_id: String,
    /// The device the login was made from.
    pub device_id: String,
    /// How.
    pub method: LoginMethod,
    /// The identity provider's name (OIDC).
    pub provider: Option<String>,
    /// Whether the login was multi-factor.
    pub mfa: bool,
    /// Groups from the provider's claims at login (OIDC); `None` = read the store's.
    pub groups: Option<Vec<String>>,
    /// Login time.
    pub created_ms: i64,
    /// Last time the session was used for a grant.
    pub last_used_ms: i64,
    /// Hard end.
    pub expires_ms: i64,
    /// Ends after this long unused.
    pub idle_timeout_ms: i64,
    /// When it was ended early (logout, new login, disabled user, sweep), if it was.
    pub ended_ms: Option<i64>,
    /// Why.
    pub end_reason: Option<String>,
}

impl Session {
    /// When the session ends if nothing else happens: the earlier of its hard end and its
    /// idle end.
    pub fn ends_ms(&self) -> i64 {
        self.expires_ms
            .min(self.last_used_ms.saturating_add(self.idle_timeout_ms))
    }

    /// Whether it can be used at `now_ms`.
    pub fn live_at(&self, now_ms: i64) -> bool {
        self.ended_ms.is_none() && now_ms < self.ends_ms()
    }

    /// Why it is not live at `now_ms`, in words for the user.
    pub fn why_not_live(&self, now_ms: i64) -> Option<String> {
        if let Some(r) = &self.end_reason {
            return Some(format!("your login session ended ({r})"));
        }
        if now_ms >= self.expires_ms {
            return Some("your login session expired".into());
        }
        if now_ms >= self.ends_ms() {
            return Some("your login session ended after a period of inactivity".into());
        }
        None
    }
}

pub(super) const SESSION_COLUMNS: &str = "id, user_id, device_id, method, provider, mfa, groups, created_ms, \
     last_used_ms, expires_ms, idle_timeout_ms, ended_ms, end_reason";

pub(super) fn session_from_row(row: &AnyRow) -> Result<Session, StoreError> {
    let id: String = row.try_get("id")?;
    let method: String = row.try_get("method")?;
    let method = match method.as_str() {
        "local" => LoginMethod::Local,
        "oidc" => LoginMethod::Oidc,
        other => {
            return Err(StoreError::Corrupt {
                what: format!("session {id} has method {other:?}"),
            });
        }
    };
    let groups: Option<String> = row.try_get("groups")?;
    let groups = groups
        .map(|g| serde_json::from_str::<Vec<String>>(&g))
        .transpose()
        .map_err(|e| StoreError::Corrupt {
            what: format!("groups of session {id}: {e}"),
        })?;
    Ok(Session {
        user_id: row.try_get("user_id")?,
        device_id: row.try_get("device_id")?,
        method,
        provider: row.try_get("provider")?,
        mfa: get_flag(row, "mfa", &format!("session {id}"))?,
        groups,
        created_ms: row.try_get("created_ms")?,
        last_used_ms: row.try_get("last_used_ms")?,
        expires_ms: row.try_get("expires_ms")?,
        idle_timeout_ms: row.try_get("idle_timeout_ms")?,
        ended_ms: row.try_get("ended_ms")?,
        end_reason: row.try_get("end_reason")?,
        id,
    })
}

/// The state of one user name's failed logins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    /// Failures in the current window.
    pub failures: i64,
    /// When the name is locked until, if it is.
    pub locked_until_ms: Option<i64>,
}

impl Store {
    /// The base32 TOTP secret of a user, if they enrolled one.
    pub async fn user_totp_secret(&self, user_id: &str) -> Result<Option<String>, StoreError> {
        let v: Option<Option<String>> =
            sqlx::query_scalar("SELECT totp_secret FROM users WHERE id = $1")
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(v.flatten())
    }

    /// Sets (or replaces) a user's TOTP secret; codes accepted before no longer count.
    pub async fn set_user_totp(&self, user_id: &str, secret: &str) -> Result<(), StoreError> {
        let r =
            sqlx::query("UPDATE users SET totp_secret = $1, totp_last_step = NULL WHERE id = $2")
                .bind(secret)
                .bind(user_id)
                .execute(&self.pool)
                .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                what: format!("user {user_id}"),
            });
        }
        Ok(())
    }

    /// Records that the code of time step `step` was used. `false` when that step (or a later
    /// one) was already used: settled by the database, so two logins racing with one code get
    /// one success.
    pub async fn accept_totp_step(&self, user_id: &str, step: i64) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE users SET totp_last_step = $1 \
             WHERE id = $2 AND (totp_last_step IS NULL OR totp_last_step < $1)",
        )
        .bind(step)
        .bind(user_id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The user provisioned for `subject` at `issuer`.
    pub async fn user_by_oidc(
        &self,
        issuer: &str,
        subject: &str,
    ) -> Result<Option<User>, StoreError> {
        let id: Option<String> =
            sqlx::query_scalar("SELECT id FROM users WHERE oidc_issuer = $1 AND oidc_subject = $2")
                .bind(issuer)
                .bind(subject)
                .fetch_optional(&self.pool)
                .await?;
        match id {
            Some(id) => self.user_by_id(&id).await,
            None => Ok(None),
        }
    }

    /// Creates a user for an OpenID provider's subject (no password). `Conflict` when the
    /// user name or the identity is taken.
    pub async fn insert_oidc_user(
        &self,
        u: &User,
        issuer: &str,
        subject: &str,
    ) -> Result<(), StoreError> {
        let r = sqlx::query(
            "INSERT INTO users (id, username, display_name, password_hash, disabled, created_ms, \
             oidc_issuer, oidc_subject) VALUES ($1, $2, $3, NULL, $4, $5, $6, $7)",
        )
        .bind(u.id.as_str())
        .bind(u.username.as_str())
        .bind(u.display_name.as_str())
        .bind(i64::from(u.disabled))
        .bind(u.created_ms)
        .bind(issuer)
        .bind(subject)
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict {
                what: format!("user {} or this identity exists", u.username),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The throttle state of a user name now (an old window counts as none).
    pub async fn login_throttle(
        &self,
        username: &str,
        window_start_after_ms: i64,
    ) -> Result<Throttle, StoreError> {
        let row = sqlx::query(
            "SELECT failures, window_start_ms, locked_until_ms FROM login_throttle WHERE username = $1",
        )
        .bind(username)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => Throttle {
                failures: 0,
                locked_until_ms: None,
            },
            Some(r) => {
                let start: i64 = r.try_get("window_start_ms")?;
                let failures: i64 = r.try_get("failures")?;
                Throttle {
                    failures: if start > window_start_after_ms {
                        failures
                    } else {
                        0
                    },
                    locked_until_ms: r.try_get("locked_until_ms")?,
                }
            }
        })
    }

    /// Counts a failed login of `username` at `now_ms`. A window older than `window_ms`
    /// starts over. When the count reaches `threshold` the name is locked until
    /// `now_ms + lock_ms` and the count starts over. Returns the new count and the lock end
    /// if this failure locked it. One statement per step, so concurrent failures all count.
    pub async fn record_login_failure(
        &self,
        username: &str,
        now_ms: i64,
        window_ms: i64,
        threshold: i64,
        lock_ms: i64,
    ) -> Result<(i64, Option<i64>), StoreError> {
        let failures: i64 = sqlx::query_scalar(
            "INSERT INTO login_throttle (username, failures, window_start_ms, locked_until_ms) \
             VALUES ($1, 1, $2, NULL) \
             ON CONFLICT (username) DO UPDATE SET \
               failures = CASE WHEN login_throttle.window_start_ms <= $3 THEN 1 \
                               ELSE login_throttle.failures + 1 END, \
               window_start_ms = CASE WHEN login_throttle.window_start_ms <= $3 THEN $2 \
                                      ELSE login_throttle.window_start_ms END \
             RETURNING failures",
        )
        .bind(username)
        .bind(now_ms)
        .bind(now_ms - window_ms)
        .fetch_one(&self.pool)
        .await?;
        if failures >= threshold {
            let until = now_ms.saturating_add(lock_ms);
            sqlx::query(
                "UPDATE login_throttle SET locked_until_ms = $1, failures = 0, window_start_ms = $2 \
                 WHERE username = $3",
            )
            .bind(until)
            .bind(now_ms)
            .bind(username)
            .execute(&self.pool)
            .await?;
            return Ok((failures, Some(until)));
        }
        Ok((failures, None))
    }

    /// Forgets a user name's failures (after a successful login).
    pub async fn clear_login_failures(&self, username: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM login_throttle WHERE username = $1")
            .bind(username)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Opens a session, ending the device's earlier open sessions (`superseded`).
    pub async fn insert_session(&self, s: &Session) -> Result<(), StoreError> {
        self.insert_session_with_refresh(s, None).await
    }

    /// [`Store::insert_session`] that also keeps the session's sealed refresh token (OIDC
    /// code logins), in the same transaction: a session is never left refreshable without its
    /// row, nor a row without its session. The superseded sessions' tokens are dropped.
    pub async fn insert_session_with_refresh(
        &self,
        s: &Session,
        refresh: Option<&super::SessionRefresh>,
    ) -> Result<(), StoreError> {
        let groups = s
            .groups
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Invalid {
                what: format!("session groups: {e}"),
            })?;
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE sessions SET ended_ms = $1, end_reason = 'superseded by a new login' \
             WHERE device_id = $2 AND ended_ms IS NULL",
        )
        .bind(s.created_ms)
        .bind(s.device_id.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "INSERT INTO sessions ({SESSION_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NULL, NULL)"
        ))
        .bind(s.id.as_str())
        .bind(s.user_id.as_str())
        .bind(s.device_id.as_str())
        .bind(s.method.as_str())
        .bind(s.provider.as_deref())
        .bind(i64::from(s.mfa))
        .bind(groups.as_deref())
        .bind(s.created_ms)
        .bind(s.last_used_ms)
        .bind(s.expires_ms)
        .bind(s.idle_timeout_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM session_refresh WHERE session_id IN \
             (SELECT id FROM sessions WHERE device_id = $1 AND ended_ms IS NOT NULL)",
        )
        .bind(s.device_id.as_str())
        .execute(&mut *tx)
        .await?;
        if let Some(r) = refresh {
            sqlx::query(
                "INSERT INTO session_refresh (session_id, provider, client_id, token_sealed, next_refresh_ms, failures, last_error) \
                 VALUES ($1, $2, $3, $4, $5, 0, NULL)",
            )
            .bind(s.id.as_str())
            .bind(r.provider.as_str())
            .bind(r.client_id.as_str())
            .bind(r.token_sealed.as_str())
            .bind(r.next_refresh_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The device's newest session (live or not), to say why it cannot be used.
    pub async fn latest_session_for_device(
        &self,
        device_id: &str,
    ) -> Result<Option<Session>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE device_id = $1 \
             ORDER BY created_ms DESC, id DESC LIMIT 1"
        ))
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(session_from_row).transpose()
    }

    /// Marks a session used at `now_ms` (the idle clock starts again).
    pub async fn touch_session(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sessions SET last_used_ms = $1 WHERE id = $2 AND ended_ms IS NULL AND last_used_ms < $1",
        )
        .bind(now_ms)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends every open session of a user; returns them.
    pub async fn end_sessions_for_user(
        &self,
        user_id: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Vec<Session>, StoreError> {
        let rows = sqlx::query(&format!(
            "UPDATE sessions SET ended_ms = $1, end_reason = $2 \
             WHERE user_id = $3 AND ended_ms IS NULL RETURNING {SESSION_COLUMNS}"
        ))
        .bind(now_ms)
        .bind(reason)
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(session_from_row).collect()
    }

    /// Ends every open session whose hard or idle end has passed; returns them (each once,
    /// also across replicas: the update is conditional).
    pub async fn end_lapsed_sessions(&self, now_ms: i64) -> Result<Vec<Session>, StoreError> {
        let rows = sqlx::query(&format!(
            "UPDATE sessions SET ended_ms = $1, \
               end_reason = CASE WHEN expires_ms <= $1 THEN 'expired' ELSE 'idle timeout' END \
             WHERE ended_ms IS NULL AND (expires_ms <= $1 OR last_used_ms + idle_timeout_ms <= $1) \
             RETURNING {SESSION_COLUMNS}"
        ))
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(session_from_row).collect()
    }
}
