//! Gateways: the policy enforcement points in front of hospital networks.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{
    ParseStatusError, Store, StoreError, get_string_list, is_unique_violation, string_list_json,
};

/// Whether a gateway may connect and receive policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayStatus {
    /// Joined and trusted.
    Active,
    /// Its certificate is no longer honoured; it must join again with a new token.
    Revoked,
}

impl GatewayStatus {
    /// The stored (and wire) spelling: `active` or `revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            GatewayStatus::Active => "active",
            GatewayStatus::Revoked => "revoked",
        }
    }
}

impl std::fmt::Display for GatewayStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for GatewayStatus {
    type Err = ParseStatusError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(GatewayStatus::Active),
            "revoked" => Ok(GatewayStatus::Revoked),
            _ => Err(ParseStatusError::new("gateway", s, "active, revoked")),
        }
    }
}

/// A joined gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gateway {
    /// Stable id, e.g. `gw_…`.
    pub id: String,
    /// Unique human name, fixed by the join token.
    pub name: String,
    /// The gateway's WireGuard public key (base64); the private key never leaves it.
    pub wg_public_key: String,
    /// Where clients reach it, `host:port`.
    pub endpoint: String,
    /// Networks (CIDR strings) it serves.
    pub networks: Vec<String>,
    /// SHA-256 hex of its client certificate: how a connecting gateway is recognised.
    pub cert_fingerprint: String,
    /// Whether it is still trusted.
    pub status: GatewayStatus,
    /// Join time, ms since the Unix epoch.
    pub created_ms: i64,
    /// Last time it was heard from, ms since the Unix epoch.
    pub last_seen_ms: Option<i64>,
}

const COLUMNS: &str = "id, name, wg_public_key, endpoint, networks, cert_fingerprint, status, \
                       created_ms, last_seen_ms";

fn from_row(row: &AnyRow) -> Result<Gateway, StoreError> {
    let id: String = row.try_get("id")?;
    let whose = format!("gateway {id}");
    let status: String = row.try_get("status")?;
    let status = status.parse().map_err(|e| StoreError::Corrupt {
        what: format!("status of {whose} ({e})"),
    })?;
    Ok(Gateway {
        name: row.try_get("name")?,
        wg_public_key: row.try_get("wg_public_key")?,
        endpoint: row.try_get("endpoint")?,
        networks: get_string_list(row, "networks", &whose)?,
        cert_fingerprint: row.try_get("cert_fingerprint")?,
        status,
        created_ms: row.try_get("created_ms")?,
        last_seen_ms: row.try_get("last_seen_ms")?,
        id,
    })
}

impl Store {
    /// Records a gateway that has joined. `Conflict` if its name, id or certificate
    /// fingerprint is taken.
    pub async fn insert_gateway(&self, g: &Gateway) -> Result<(), StoreError> {
        let networks = string_list_json(&g.networks, &format!("gateway {}", g.id))?;
        let result = sqlx::query(
            "INSERT INTO gateways (id, name, wg_public_key, endpoint, networks, \
             cert_fingerprint, status, created_ms, last_seen_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(g.id.as_str())
        .bind(g.name.as_str())
        .bind(g.wg_public_key.as_str())
        .bind(g.endpoint.as_str())
        .bind(networks)
        .bind(g.cert_fingerprint.as_str())
        .bind(g.status.as_str())
        .bind(g.created_ms)
        .bind(g.last_seen_ms)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(self
                .conflict(
                    "gateway",
                    "gateways",
                    &[
                        ("name", &g.name),
                        ("id", &g.id),
                        ("cert_fingerprint", &g.cert_fingerprint),
                    ],
                )
                .await),
            Err(e) => Err(e.into()),
        }
    }

    /// Looks a gateway up by id.
    pub async fn gateway_by_id(&self, id: &str) -> Result<Option<Gateway>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM gateways WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Recognises a connecting gateway by its certificate's SHA-256 hex. The caller must still
    /// check `status`: revoked gateways are returned too.
    pub async fn gateway_by_cert_fingerprint(
        &self,
        fp: &str,
    ) -> Result<Option<Gateway>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM gateways WHERE cert_fingerprint = $1"
        ))
        .bind(fp)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// All gateways, ordered by name.
    pub async fn list_gateways(&self) -> Result<Vec<Gateway>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM gateways ORDER BY name"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// Sets a gateway's status (e.g. revokes it), remembering when. `NotFound` if unknown.
    pub async fn set_gateway_status(
        &self,
        id: &str,
        status: GatewayStatus,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let result =
            sqlx::query("UPDATE gateways SET status = $1, status_changed_ms = $2 WHERE id = $3")
                .bind(status.as_str())
                .bind(now_ms)
                .bind(id)
                .execute(&self.pool)
                .await?;
        if result.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                what: format!("gateway {id}"),
            });
        }
        Ok(())
    }

    /// Notes that the gateway was heard from at `now_ms`. Never moves `last_seen_ms` back, so
    /// replicas reporting out of order do not matter. `NotFound` if unknown.
    pub async fn touch_gateway(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        let result = sqlx::query(
            "UPDATE gateways SET last_seen_ms = CASE \
             WHEN last_seen_ms IS NULL OR last_seen_ms < $1 THEN $1 ELSE last_seen_ms END \
             WHERE id = $2",
        )
        .bind(now_ms)
        .bind(id)
        .execute(&self.pool)
        .await?;
        if result.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                what: format!("gateway {id}"),
            });
        }
        Ok(())
    }
}
