//! Client devices and their enrolment state machine.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{ParseStatusError, Store, StoreError, is_foreign_key_violation, is_unique_violation};

/// Where a device is in its enrolment life.
///
/// `pending` → `approved` (certificate issued) or `denied`; `approved` → `revoked`. The store
/// does not hard-code these edges: each caller says which current states it accepts
/// (see [`Store::transition_device`]), and the database checks it atomically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    /// Enrolment requested, waiting for an administrator.
    Pending,
    /// Certificate issued; the device may connect.
    Approved,
    /// Enrolment refused.
    Denied,
    /// Was approved; its certificate is no longer honoured.
    Revoked,
}

impl DeviceStatus {
    /// The stored (and wire) spelling: `pending`, `approved`, `denied`, `revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Pending => "pending",
            DeviceStatus::Approved => "approved",
            DeviceStatus::Denied => "denied",
            DeviceStatus::Revoked => "revoked",
        }
    }
}

impl std::fmt::Display for DeviceStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeviceStatus {
    type Err = ParseStatusError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(DeviceStatus::Pending),
            "approved" => Ok(DeviceStatus::Approved),
            "denied" => Ok(DeviceStatus::Denied),
            "revoked" => Ok(DeviceStatus::Revoked),
            _ => Err(ParseStatusError::new(
                "device",
                s,
                "pending, approved, denied, revoked",
            )),
        }
    }
}

/// An enrolled or enrolling device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Stable id, e.g. `dev_…`.
    pub id: String,
    /// Name the user gave it.
    pub name: String,
    /// The [`User`](super::User) who enrolled it; must exist.
    pub owner_user_id: String,
    /// Enrolment state.
    pub status: DeviceStatus,
    /// The certificate signing request it sent; its private key stays on the device.
    pub csr_pem: String,
    /// Certificate issued on approval; kept after revocation for the record.
    pub cert_pem: Option<String>,
    /// SHA-256 hex of `cert_pem`: how a connecting device is recognised.
    pub cert_fingerprint: Option<String>,
    /// SHA-256 hex of the token the device polls its enrolment with.
    pub poll_token_hash: String,
    /// Operating system it reported.
    pub os: String,
    /// Host name it reported.
    pub hostname: String,
    /// Enrolment request time, ms since the Unix epoch.
    pub created_ms: i64,
    /// Time of the last status decision, ms since the Unix epoch.
    pub decided_ms: Option<i64>,
}

const COLUMNS: &str = "id, name, owner_user_id, status, csr_pem, cert_pem, cert_fingerprint, \
                       poll_token_hash, os, hostname, created_ms, decided_ms";

fn from_row(row: &AnyRow) -> Result<Device, StoreError> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let status = status.parse().map_err(|e| StoreError::Corrupt {
        what: format!("status of device {id} ({e})"),
    })?;
    Ok(Device {
        name: row.try_get("name")?,
        owner_user_id: row.try_get("owner_user_id")?,
        status,
        csr_pem: row.try_get("csr_pem")?,
        cert_pem: row.try_get("cert_pem")?,
        cert_fingerprint: row.try_get("cert_fingerprint")?,
        poll_token_hash: row.try_get("poll_token_hash")?,
        os: row.try_get("os")?,
        hostname: row.try_get("hostname")?,
        created_ms: row.try_get("created_ms")?,
        decided_ms: row.try_get("decided_ms")?,
        id,
    })
}

impl Store {
    /// Records an enrolment request. `NotFound` if the owner does not exist, `Conflict` if the
    /// id, poll token or certificate fingerprint is taken.
    pub async fn insert_device(&self, d: &Device) -> Result<(), StoreError> {
        let result = sqlx::query(
            "INSERT INTO devices (id, name, owner_user_id, status, csr_pem, cert_pem, \
             cert_fingerprint, poll_token_hash, os, hostname, created_ms, decided_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(d.id.as_str())
        .bind(d.name.as_str())
        .bind(d.owner_user_id.as_str())
        .bind(d.status.as_str())
        .bind(d.csr_pem.as_str())
        .bind(d.cert_pem.as_deref())
        .bind(d.cert_fingerprint.as_deref())
        .bind(d.poll_token_hash.as_str())
        .bind(d.os.as_str())
        .bind(d.hostname.as_str())
        .bind(d.created_ms)
        .bind(d.decided_ms)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_foreign_key_violation(&e) => Err(StoreError::NotFound {
                what: format!("user {} (owner of device {})", d.owner_user_id, d.id),
            }),
            Err(e) if is_unique_violation(&e) => {
                let mut candidates = vec![("id", d.id.as_str())];
                candidates.push(("poll_token_hash", d.poll_token_hash.as_str()));
                if let Some(fp) = &d.cert_fingerprint {
                    candidates.push(("cert_fingerprint", fp.as_str()));
                }
                Err(self.conflict("device", "devices", &candidates).await)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Looks a device up by id.
    pub async fn device_by_id(&self, id: &str) -> Result<Option<Device>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM devices WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Recognises a connecting device by its certificate's SHA-256 hex. The caller must still
    /// check `status`: revoked devices are returned too.
    pub async fn device_by_cert_fingerprint(&self, fp: &str) -> Result<Option<Device>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM devices WHERE cert_fingerprint = $1"
        ))
        .bind(fp)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// All devices, oldest enrolment first.
    pub async fn list_devices(&self) -> Result<Vec<Device>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM devices ORDER BY created_ms, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Moves a device to `to` if, and only if, its current status is one of `from`, and
    /// returns the updated device. Sets `decided_ms = now_ms`.
    ///
    /// Approving must supply `cert = Some((cert_pem, fingerprint))`, and only approving may;
    /// other transitions keep the certificate on record. The check and the write are one
    /// conditional `UPDATE`, so two administrators deciding at once cannot both win.
    /// `NotFound` if there is no such device; `Conflict` naming the current status if it is
    /// not in `from`, or if the fingerprint belongs to another device; `Invalid` for a
    /// missing or unexpected certificate or an empty `from`.
    pub async fn transition_device(
        &self,
        id: &str,
        from: &[DeviceStatus],
        to: DeviceStatus,
        cert: Option<(&str, &str)>,
        now_ms: i64,
    ) -> Result<Device, StoreError> {
        match (to, cert) {
            (DeviceStatus::Approved, None) => {
                return Err(StoreError::Invalid {
                    what: format!("approving device {id} needs its certificate and fingerprint"),
                });
            }
            (to, Some(_)) if to != DeviceStatus::Approved => {
                return Err(StoreError::Invalid {
                    what: format!("a certificate can only be set when approving, not when {to}"),
                });
            }
            _ => {}
        }
        if from.is_empty() {
            return Err(StoreError::Invalid {
                what: format!("transition of device {id} to {to} allows no current status"),
            });
        }

        // $1..$5 are fixed; the accepted current statuses follow as $6, $7, ….
        let allowed: Vec<String> = (0..from.len()).map(|i| format!("${}", i + 6)).collect();
        let sql = format!(
            "UPDATE devices SET status = $1, cert_pem = COALESCE($2, cert_pem), \
             cert_fingerprint = COALESCE($3, cert_fingerprint), decided_ms = $4 \
             WHERE id = $5 AND status IN ({}) RETURNING {COLUMNS}",
            allowed.join(", ")
        );
        let (cert_pem, fingerprint) = cert.unzip();
        let mut query = sqlx::query(&sql)
            .bind(to.as_str())
            .bind(cert_pem)
            .bind(fingerprint)
            .bind(now_ms)
            .bind(id);
        for status in from {
            query = query.bind(status.as_str());
        }
        // `fetch_all` steps the statement to completion (see `consume_join_token`).
        let rows = match query.fetch_all(&self.pool).await {
            Ok(rows) => rows,
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict {
                    what: format!(
                        "the certificate fingerprint {:?} already belongs to another device",
                        fingerprint.unwrap_or_default()
                    ),
                });
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(row) = rows.first() {
            return from_row(row);
        }

        match self.device_by_id(id).await? {
            None => Err(StoreError::NotFound {
                what: format!("device {id}"),
            }),
            Some(current) => {
                let expected: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
                Err(StoreError::Conflict {
                    what: format!(
                        "device {id} is {}, so it cannot become {to} (that needs: {})",
                        current.status,
                        expected.join(" or ")
                    ),
                })
            }
        }
    }
}
