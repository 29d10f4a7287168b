//! Admin API tokens: bearer credentials for the admin API, stored only as their SHA-256.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, is_unique_violation};

/// An admin API token's record. The token itself is shown once at creation and never stored:
/// a leaked database does not hand out admin access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminToken {
    /// Stable id, e.g. `tok_ab12…`, used in audit actors (`admin:tok_ab12`).
    pub id: String,
    /// Human label saying who or what holds the token.
    pub name: String,
    /// Lowercase hex SHA-256 of the token; the lookup key when a request presents it.
    pub token_hash: String,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: i64,
    /// After this instant (ms since the Unix epoch) the token is refused; `None` never expires.
    pub expires_ms: Option<i64>,
    /// When it was revoked (ms since the Unix epoch); a revoked token is refused.
    pub revoked_ms: Option<i64>,
}

const COLUMNS: &str = "id, name, token_hash, created_ms, expires_ms, revoked_ms";

fn from_row(row: &AnyRow) -> Result<AdminToken, StoreError> {
    Ok(AdminToken {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        token_hash: row.try_get("token_hash")?,
        created_ms: row.try_get("created_ms")?,
        expires_ms: row.try_get("expires_ms")?,
        revoked_ms: row.try_get("revoked_ms")?,
    })
}

impl Store {
    /// Records a newly minted admin token (its hash). `Conflict` if the id or hash exists.
    pub async fn insert_admin_token(&self, t: &AdminToken) -> Result<(), StoreError> {
        let result = sqlx::query(
            "INSERT INTO admin_tokens (id, name, token_hash, created_ms, expires_ms, revoked_ms) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(t.id.as_str())
        .bind(t.name.as_str())
        .bind(t.token_hash.as_str())
        .bind(t.created_ms)
        .bind(t.expires_ms)
        .bind(t.revoked_ms)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(self
                .conflict(
                    "admin token",
                    "admin_tokens",
                    &[("id", &t.id), ("token_hash", &t.token_hash)],
                )
                .await),
            Err(e) => Err(e.into()),
        }
    }

    /// Finds the token whose SHA-256 hex is `token_hash`. Expiry and revocation are returned,
    /// not judged: the caller decides with its own clock.
    pub async fn admin_token_by_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<AdminToken>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM admin_tokens WHERE token_hash = $1"
        ))
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(from_row).transpose()
    }
}
