//! Refresh tokens of OIDC login sessions (migration `0007_refresh.sql`): kept sealed, claimed
//! when due by one replica at a time, and dropped when their session ends.
//!
//! The store never sees a token in the clear: callers seal before storing and open after
//! reading (`identity::seal`), so a database dump holds nothing a provider would accept.

use sqlx::Row;

use super::identity::{SESSION_COLUMNS, session_from_row};
use super::{Session, Store, StoreError};

/// A session's refresh state.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionRefresh {
    /// The session.
    pub session_id: String,
    /// The provider's configured name.
    pub provider: String,
    /// The client id the token was issued to.
    pub client_id: String,
    /// The refresh token, sealed (never the token itself).
    pub token_sealed: String,
    /// When it is next due.
    pub next_refresh_ms: i64,
    /// Transient failures in a row.
    pub failures: i64,
    /// The last failure.
    pub last_error: Option<String>,
}

impl std::fmt::Debug for SessionRefresh {
    // Sealed, but still nothing a log needs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRefresh")
            .field("session_id", &self.session_id)
            .field("provider", &self.provider)
            .field("client_id", &self.client_id)
            .field("next_refresh_ms", &self.next_refresh_ms)
            .field("failures", &self.failures)
            .field("last_error", &self.last_error)
            .finish_non_exhaustive()
    }
}

const COLUMNS: &str =
    "session_id, provider, client_id, token_sealed, next_refresh_ms, failures, last_error";

fn from_row(row: &sqlx::any::AnyRow) -> Result<SessionRefresh, StoreError> {
    Ok(SessionRefresh {
        session_id: row.try_get("session_id")?,
        provider: row.try_get("provider")?,
        client_id: row.try_get("client_id")?,
        token_sealed: row.try_get("token_sealed")?,
        next_refresh_ms: row.try_get("next_refresh_ms")?,
        failures: row.try_get("failures")?,
        last_error: row.try_get("last_error")?,
    })
}

impl Store {
    /// Claims up to `limit` refreshes due at `now_ms` whose sessions are still open, pushing
    /// each one's due time to `now_ms + lease_ms` in the same statement: two replicas never
    /// refresh one session at once (with rotating refresh tokens the loser's attempt would
    /// look like a revoked token and end a good session). Rows of ended sessions are dropped
    /// first, so tokens outlive their sessions by at most one sweep.
    pub async fn claim_due_refreshes(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: i64,
    ) -> Result<Vec<SessionRefresh>, StoreError> {
        sqlx::query(
            "DELETE FROM session_refresh WHERE session_id IN \
             (SELECT id FROM sessions WHERE ended_ms IS NOT NULL OR expires_ms <= $1)",
        )
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        let rows = sqlx::query(&format!(
            "UPDATE session_refresh SET next_refresh_ms = $2 \
             WHERE next_refresh_ms <= $1 AND session_id IN \
               (SELECT r.session_id FROM session_refresh r JOIN sessions s ON s.id = r.session_id \
                WHERE r.next_refresh_ms <= $1 AND s.ended_ms IS NULL \
                ORDER BY r.next_refresh_ms LIMIT $3) \
             RETURNING {COLUMNS}"
        ))
        .bind(now_ms)
        .bind(now_ms.saturating_add(lease_ms))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Records a refresh that worked: the (possibly rotated) sealed token, the next due time,
    /// failures back to zero.
    pub async fn refresh_succeeded(
        &self,
        session_id: &str,
        token_sealed: &str,
        next_refresh_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE session_refresh SET token_sealed = $1, next_refresh_ms = $2, failures = 0, \
             last_error = NULL WHERE session_id = $3",
        )
        .bind(token_sealed)
        .bind(next_refresh_ms)
        .bind(session_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a transient failure (provider unreachable, 5xx): the session stays, the next
    /// attempt is at `next_refresh_ms`.
    pub async fn refresh_failed(
        &self,
        session_id: &str,
        failures: i64,
        error: &str,
        next_refresh_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE session_refresh SET failures = $1, last_error = $2, next_refresh_ms = $3 \
             WHERE session_id = $4",
        )
        .bind(failures)
        .bind(error)
        .bind(next_refresh_ms)
        .bind(session_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Puts a claimed refresh back, due at `next_refresh_ms`, without counting a failure
    /// (skipped this round: the provider's budget was spent or it just failed for another).
    pub async fn refresh_postponed(
        &self,
        session_id: &str,
        next_refresh_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE session_refresh SET next_refresh_ms = $1 WHERE session_id = $2")
            .bind(next_refresh_ms)
            .bind(session_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The refresh state of a session, if it has one.
    pub async fn session_refresh(
        &self,
        session_id: &str,
    ) -> Result<Option<SessionRefresh>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM session_refresh WHERE session_id = $1"
        ))
        .bind(session_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Ends one open session with `reason` and drops its refresh token, in one transaction;
    /// returns it, or `None` when it had already ended (another replica, the sweeper, a new
    /// login got there first), so the end is audited and acted on once.
    pub async fn end_session(
        &self,
        session_id: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Option<Session>, StoreError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "UPDATE sessions SET ended_ms = $1, end_reason = $2 \
             WHERE id = $3 AND ended_ms IS NULL RETURNING {SESSION_COLUMNS}"
        ))
        .bind(now_ms)
        .bind(reason)
        .bind(session_id)
        .fetch_optional(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM session_refresh WHERE session_id = $1")
            .bind(session_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        row.as_ref().map(session_from_row).transpose()
    }
}
