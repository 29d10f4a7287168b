//! Single-use, expiring tokens with which a new gateway joins.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{
    ConsumeTokenError, Store, StoreError, get_string_list, is_unique_violation, string_list_json,
};

/// A gateway join token's record. Like admin tokens, only the SHA-256 hex is stored.
///
/// The token pre-authorizes one gateway name and the networks it may serve, so whoever holds
/// it can join exactly that gateway, once, before `expires_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// Stable id, for audit and listing.
    pub id: String,
    /// Name the joining gateway will get.
    pub gateway_name: String,
    /// Networks (CIDR strings) the gateway may serve.
    pub networks: Vec<String>,
    /// Lowercase hex SHA-256 of the token.
    pub token_hash: String,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: i64,
    /// From this instant on (ms since the Unix epoch) the token is refused.
    pub expires_ms: i64,
    /// When the token was used; `Some` means it can never be used again.
    pub used_ms: Option<i64>,
}

const COLUMNS: &str = "id, gateway_name, networks, token_hash, created_ms, expires_ms, used_ms";

fn from_row(row: &AnyRow) -> Result<JoinToken, StoreError> {
    let id: String = row.try_get("id")?;
    let networks = get_string_list(row, "networks", &format!("join token {id}"))?;
    Ok(JoinToken {
        gateway_name: row.try_get("gateway_name")?,
        networks,
        token_hash: row.try_get("token_hash")?,
        created_ms: row.try_get("created_ms")?,
        expires_ms: row.try_get("expires_ms")?,
        used_ms: row.try_get("used_ms")?,
        id,
    })
}

impl From<sqlx::Error> for ConsumeTokenError {
    fn from(e: sqlx::Error) -> Self {
        ConsumeTokenError::Store(StoreError::Database(e))
    }
}

impl Store {
    /// Records a newly issued join token (its hash). `Conflict` if the id or hash exists.
    pub async fn insert_join_token(&self, t: &JoinToken) -> Result<(), StoreError> {
        let networks = string_list_json(&t.networks, &format!("join token {}", t.id))?;
        let result = sqlx::query(
            "INSERT INTO join_tokens \
             (id, gateway_name, networks, token_hash, created_ms, expires_ms, used_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(t.id.as_str())
        .bind(t.gateway_name.as_str())
        .bind(networks)
        .bind(t.token_hash.as_str())
        .bind(t.created_ms)
        .bind(t.expires_ms)
        .bind(t.used_ms)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(self
                .conflict(
                    "join token",
                    "join_tokens",
                    &[("id", &t.id), ("token_hash", &t.token_hash)],
                )
                .await),
            Err(e) => Err(e.into()),
        }
    }

    /// Spends the token whose hash is `token_hash` at `now_ms` and returns it (with `used_ms`
    /// set), or says why it cannot be spent.
    ///
    /// Race-free across tasks and replicas: the check and the mark are one conditional
    /// `UPDATE … WHERE used_ms IS NULL AND expires_ms > now`, so of several concurrent
    /// consumers exactly one gets `Ok`. Only after a refusal is the row read to name the reason.
    pub async fn consume_join_token(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<JoinToken, ConsumeTokenError> {
        // `fetch_all`, not `fetch_optional`: the statement is stepped to completion, so SQLite
        // ends its implicit transaction before the connection goes back to the pool.
        let rows = sqlx::query(&format!(
            "UPDATE join_tokens SET used_ms = $1 \
             WHERE token_hash = $2 AND used_ms IS NULL AND expires_ms > $1 \
             RETURNING {COLUMNS}"
        ))
        .bind(now_ms)
        .bind(token_hash)
        .fetch_all(&self.pool)
        .await?;
        if let Some(row) = rows.first() {
            return Ok(from_row(row)?);
        }

        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM join_tokens WHERE token_hash = $1"
        ))
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(token) = row.as_ref().map(from_row).transpose()? else {
            return Err(ConsumeTokenError::Unknown);
        };
        if let Some(used_at_ms) = token.used_ms {
            return Err(ConsumeTokenError::AlreadyUsed { used_at_ms });
        }
        if token.expires_ms <= now_ms {
            return Err(ConsumeTokenError::Expired {
                expired_at_ms: token.expires_ms,
            });
        }
        // Unused and unexpired, yet the UPDATE matched nothing: the row changed in between in
        // a way this code does not know. Refuse rather than guess.
        Err(ConsumeTokenError::Store(StoreError::Conflict {
            what: format!(
                "join token {} changed while it was being used; try joining again",
                token.id
            ),
        }))
    }
}
