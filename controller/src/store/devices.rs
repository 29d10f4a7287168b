//! Client devices and their enrolment state machine.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
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
    /// Its IPv4 address inside the tunnel (dotted quad), shared by all its grants; set once by
    /// [`Store::assign_tunnel_addr`] and kept for the life of the device.
    pub tunnel_addr: Option<String>,
}

const COLUMNS: &str = "id, name, owner_user_id, status, csr_pem, cert_pem, cert_fingerprint, \
                       poll_token_hash, os, hostname, created_ms, decided_ms, tunnel_addr";

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
        tunnel_addr: row.try_get("tunnel_addr")?,
        id,
    })
}

impl Store {
    /// Records an enrolment request. `NotFound` if the owner does not exist, `Conflict` if the
    /// id, poll token, certificate fingerprint or tunnel address is taken.
    pub async fn insert_device(&self, d: &Device) -> Result<(), StoreError> {
        let result = sqlx::query(
            "INSERT INTO devices (id, name, owner_user_id, status, csr_pem, cert_pem, \
             cert_fingerprint, poll_token_hash, os, hostname, created_ms, decided_ms, \
             tunnel_addr) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
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
        .bind(d.tunnel_addr.as_deref())
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
                if let Some(addr) = &d.tunnel_addr {
                    candidates.push(("tunnel_addr", addr.as_str()));
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

impl Store {
    /// The device's tunnel address: the one it already has, or else the lowest free host
    /// address of `pool`, which is then the device's for good (all its grants share it).
    ///
    /// Never handed out: the pool's network address, its first host (the gateways' own
    /// address inside the tunnel), its broadcast address, and `reserved`. Addresses a device
    /// already has are kept even if `pool` changes later. Race-free across tasks and replicas:
    /// the address is claimed with `UPDATE … WHERE tunnel_addr IS NULL` under the column's
    /// UNIQUE index, so a device gets one address however many requests race, and two devices
    /// racing for one address get different ones (the loser moves on to the next).
    ///
    /// `NotFound` if there is no such device; `Invalid` if the pool has no room for devices
    /// (prefix longer than /30); `Conflict` if every address of the pool is taken.
    pub async fn assign_tunnel_addr(
        &self,
        device_id: &str,
        pool: Ipv4Net,
        reserved: &[Ipv4Addr],
    ) -> Result<Ipv4Addr, StoreError> {
        if let Some(addr) = self.current_tunnel_addr(device_id).await? {
            return Ok(addr);
        }
        if pool.prefix_len() > 30 {
            return Err(StoreError::Invalid {
                what: format!(
                    "tunnel address pool {pool} has no room for devices (use a prefix of /30 or \
                     shorter)"
                ),
            });
        }

        let pool = pool.trunc();
        let mut taken: HashSet<Ipv4Addr> = reserved.iter().copied().collect();
        let in_use: Vec<String> =
            sqlx::query_scalar("SELECT tunnel_addr FROM devices WHERE tunnel_addr IS NOT NULL")
                .fetch_all(&self.pool)
                .await?;
        // Only this pool's IPv4 addresses matter; anything else cannot collide with a candidate.
        taken.extend(
            in_use
                .iter()
                .filter_map(|a| a.parse::<Ipv4Addr>().ok())
                .filter(|a| pool.contains(a)),
        );

        // Skips the network address and the first host (the gateways'); stops before the
        // broadcast address. The /30 limit above keeps both bounds inside the pool.
        let first = u32::from(pool.network()).saturating_add(2);
        let last = u32::from(pool.broadcast()).saturating_sub(1);
        for candidate in (first..=last).map(Ipv4Addr::from) {
            if taken.contains(&candidate) {
                continue;
            }
            let text = candidate.to_string();
            let result = sqlx::query(
                "UPDATE devices SET tunnel_addr = $1 WHERE id = $2 AND tunnel_addr IS NULL",
            )
            .bind(text.as_str())
            .bind(device_id)
            .execute(&self.pool)
            .await;
            match result {
                Ok(r) if r.rows_affected() > 0 => return Ok(candidate),
                Ok(_) => {
                    // Nothing updated: the device got an address meanwhile (a concurrent call
                    // for it won), or it is gone.
                    return match self.current_tunnel_addr(device_id).await? {
                        Some(addr) => Ok(addr),
                        None => Err(StoreError::Conflict {
                            what: format!(
                                "device {device_id} changed while its tunnel address was being \
                                 assigned; try again"
                            ),
                        }),
                    };
                }
                // Another device claimed this address first: try the next one.
                Err(e) if is_unique_violation(&e) => {
                    taken.insert(candidate);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict {
            what: format!(
                "every device address of the tunnel pool {pool} is taken; configure a larger pool"
            ),
        })
    }

    /// The device's tunnel address if it has one; `NotFound` if there is no such device.
    async fn current_tunnel_addr(&self, device_id: &str) -> Result<Option<Ipv4Addr>, StoreError> {
        let row = sqlx::query("SELECT tunnel_addr FROM devices WHERE id = $1")
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound {
                what: format!("device {device_id}"),
            });
        };
        let addr: Option<String> = row.try_get("tunnel_addr")?;
        addr.map(|a| {
            a.parse::<Ipv4Addr>().map_err(|e| StoreError::Corrupt {
                what: format!("tunnel_addr {a:?} of device {device_id} ({e})"),
            })
        })
        .transpose()
    }
}
