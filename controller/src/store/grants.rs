//! Grants: one device's short-lived access to one resource, through the gateways serving it.
//!
//! A grant is `active` from issuance until it is ended — by expiry, revocation, a policy
//! change, renewal — after which it is `ended` for good and kept for the record. "Live" below
//! means active *and* not yet past `expires_ms` at the caller's `now_ms`: an active grant past
//! its expiry is already dead on the gateways (they enforce expiry on their own clock) and
//! waits for [`Store::expire_grants`] to record that.
//!
//! Ending is a conditional `UPDATE … WHERE status = 'active' … RETURNING`, so when several
//! replicas end or expire the same grants at once, each grant is reported ended by exactly
//! one of them, and only that one needs to tell gateways and clients.

use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;
use wardgate_common::proto::Secret;

use super::{
    ParseStatusError, Store, StoreError, check_json, get_string_list, is_foreign_key_violation,
    is_unique_violation, string_list_json,
};

/// How many random ids are tried before giving up; with 62-bit ids even one collision is
/// practically impossible, so running out means something else is wrong.
const ID_ATTEMPTS: usize = 8;

/// Largest grant id, exclusive: ids are random in `1..2^62`, positive as `i64` and as `u64`.
const ID_LIMIT: i64 = 1 << 62;

/// Where a grant is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantStatus {
    /// Issued and not ended (it may still be past its expiry; see the module docs).
    Active,
    /// Ended for good; `ended_ms` and `end_reason` say when and why.
    Ended,
}

impl GrantStatus {
    /// The stored spelling: `active` or `ended`.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantStatus::Active => "active",
            GrantStatus::Ended => "ended",
        }
    }
}

impl std::fmt::Display for GrantStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for GrantStatus {
    type Err = ParseStatusError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(GrantStatus::Active),
            "ended" => Ok(GrantStatus::Ended),
            _ => Err(ParseStatusError::new("grant", s, "active, ended")),
        }
    }
}

/// A grant to issue; the store picks its id and starts it `active`.
///
/// `Debug` shows the preshared key as `<redacted>` (it is a [`Secret`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGrant {
    /// The device it is for; must exist.
    pub device_id: String,
    /// The user signed in on that device; must exist.
    pub user_id: String,
    /// Name of the resource it reaches.
    pub resource: String,
    /// Name of the policy that allowed it.
    pub policy: String,
    /// The client's WireGuard public key for this grant alone (base64); unique across all
    /// grants ever issued, so a key is never reused.
    pub client_public_key: String,
    /// The per-grant WireGuard preshared key (base64).
    pub preshared_key: Secret,
    /// The device's tunnel address (see [`Store::assign_tunnel_addr`]).
    pub tunnel_addr: String,
    /// The rules the gateways enforce, as JSON (the caller's rule type, serialized); the store
    /// only checks that it is JSON.
    pub rules_json: String,
    /// Ids of the gateways serving it, each of which must exist; at least one. Duplicates are
    /// dropped, the order is kept.
    pub gateway_ids: Vec<String>,
    /// Issuance time, ms since the Unix epoch.
    pub issued_ms: i64,
    /// From this instant on (ms since the Unix epoch) the grant is dead; after `issued_ms`.
    pub expires_ms: i64,
    /// The grant this one renews, if any.
    pub renewed_from: Option<i64>,
}

/// A stored grant.
///
/// `Debug` shows the preshared key as `<redacted>` (it is a [`Secret`]). Deliberately not
/// `Serialize`: views for the admin API or logs are built field by field, leaving the key out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Positive id chosen by the store; the protocol's `grant_id` is the same number as `u64`
    /// (see [`Grant::wire_id`]).
    pub id: i64,
    /// The device it is for.
    pub device_id: String,
    /// The user signed in on that device.
    pub user_id: String,
    /// Name of the resource it reaches.
    pub resource: String,
    /// Name of the policy that allowed it.
    pub policy: String,
    /// The client's WireGuard public key for this grant (base64).
    pub client_public_key: String,
    /// The per-grant WireGuard preshared key (base64).
    pub preshared_key: Secret,
    /// The device's tunnel address.
    pub tunnel_addr: String,
    /// The rules, as JSON.
    pub rules_json: String,
    /// Ids of the gateways serving it, in the order given at issuance.
    pub gateway_ids: Vec<String>,
    /// Issuance time, ms since the Unix epoch.
    pub issued_ms: i64,
    /// Expiry, ms since the Unix epoch (exclusive: dead from this instant on).
    pub expires_ms: i64,
    /// Whether it has been ended.
    pub status: GrantStatus,
    /// When it ended, ms since the Unix epoch.
    pub ended_ms: Option<i64>,
    /// Why it ended: `expired`, or the caller's reason (e.g. `revoked`, `device revoked`).
    pub end_reason: Option<String>,
    /// The grant this one renews, if any.
    pub renewed_from: Option<i64>,
}

impl Grant {
    /// The id as the protocol carries it. Ids are positive (checked when read), so this is
    /// the same number.
    pub fn wire_id(&self) -> u64 {
        self.id.unsigned_abs()
    }

    /// The store id for a `grant_id` received on the wire; `None` for a number no grant can
    /// have (zero, or too large for an `i64`).
    pub fn id_from_wire(wire_id: u64) -> Option<i64> {
        i64::try_from(wire_id).ok().filter(|id| *id > 0)
    }

    /// Whether the grant is live at `now_ms`: active and not yet expired.
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.status == GrantStatus::Active && self.expires_ms > now_ms
    }
}

const COLUMNS: &str = "id, device_id, user_id, resource, policy, client_public_key, \
                       preshared_key, tunnel_addr, rules, gateway_ids, issued_ms, expires_ms, \
                       status, ended_ms, end_reason, renewed_from";

fn from_row(row: &AnyRow) -> Result<Grant, StoreError> {
    let id: i64 = row.try_get("id")?;
    let whose = format!("grant {id}");
    if id <= 0 {
        return Err(StoreError::Corrupt {
            what: format!("id of {whose} (must be positive)"),
        });
    }
    let status: String = row.try_get("status")?;
    let status = status.parse().map_err(|e| StoreError::Corrupt {
        what: format!("status of {whose} ({e})"),
    })?;
    let psk: String = row.try_get("preshared_key")?;
    Ok(Grant {
        device_id: row.try_get("device_id")?,
        user_id: row.try_get("user_id")?,
        resource: row.try_get("resource")?,
        policy: row.try_get("policy")?,
        client_public_key: row.try_get("client_public_key")?,
        preshared_key: Secret::new(psk),
        tunnel_addr: row.try_get("tunnel_addr")?,
        rules_json: row.try_get("rules")?,
        gateway_ids: get_string_list(row, "gateway_ids", &whose)?,
        issued_ms: row.try_get("issued_ms")?,
        expires_ms: row.try_get("expires_ms")?,
        status,
        ended_ms: row.try_get("ended_ms")?,
        end_reason: row.try_get("end_reason")?,
        renewed_from: row.try_get("renewed_from")?,
        id,
    })
}

/// What went wrong with one insertion attempt.
enum InsertFailure {
    /// The random id was taken: draw another.
    IdTaken,
    /// Anything else: give up with this.
    Failed(StoreError),
}

impl From<sqlx::Error> for InsertFailure {
    fn from(e: sqlx::Error) -> Self {
        InsertFailure::Failed(e.into())
    }
}

impl From<StoreError> for InsertFailure {
    fn from(e: StoreError) -> Self {
        InsertFailure::Failed(e)
    }
}

impl Store {
    /// Stores a new grant as `active` with a fresh random id, and returns it.
    ///
    /// The grant row and its gateway rows are written in one transaction. `Invalid` for rules
    /// that are not JSON, no gateways, or an expiry not after issuance; `NotFound` naming the
    /// device, user or gateway that does not exist; `Conflict` if the client public key was
    /// already used by a grant.
    pub async fn insert_grant(&self, g: &NewGrant) -> Result<Grant, StoreError> {
        self.insert_grant_audited(g, |_| Vec::new()).await
    }

    /// Like [`Store::insert_grant`], and appends the audit events `events(grant_id)` in the
    /// same transaction: a grant never exists without its audit rows, whatever crashes when,
    /// and issuing costs one commit instead of three.
    pub async fn insert_grant_audited(
        &self,
        g: &NewGrant,
        events: impl Fn(i64) -> Vec<super::NewAuditEvent>,
    ) -> Result<Grant, StoreError> {
        self.insert_grant_with(g, events, None).await
    }

    /// Like [`Store::insert_grant_audited`], and, for a break-glass grant, writes its
    /// review-queue row in the same transaction: emergency access never exists without the
    /// entry an administrator must close.
    pub async fn insert_grant_with(
        &self,
        g: &NewGrant,
        events: impl Fn(i64) -> Vec<super::NewAuditEvent>,
        break_glass: Option<&super::NewBreakGlass>,
    ) -> Result<Grant, StoreError> {
        check_json(&g.rules_json, "the rules of a new grant")?;
        let mut gateway_ids: Vec<String> = Vec::with_capacity(g.gateway_ids.len());
        for id in &g.gateway_ids {
            if !gateway_ids.contains(id) {
                gateway_ids.push(id.clone());
            }
        }
        if gateway_ids.is_empty() {
            return Err(StoreError::Invalid {
                what: format!(
                    "a grant of {} to device {} names no gateway",
                    g.resource, g.device_id
                ),
            });
        }
        if g.expires_ms <= g.issued_ms {
            return Err(StoreError::Invalid {
                what: format!(
                    "a grant expiring at {} ms is dead when issued at {} ms",
                    g.expires_ms, g.issued_ms
                ),
            });
        }
        let gateways_json = string_list_json(&gateway_ids, "a new grant")?;

        for _ in 0..ID_ATTEMPTS {
            let id = rand::thread_rng().gen_range(1..ID_LIMIT);
            match self
                .try_insert_grant(
                    id,
                    g,
                    &gateway_ids,
                    &gateways_json,
                    &events(id),
                    break_glass,
                )
                .await
            {
                Ok(()) => {
                    return Ok(Grant {
                        id,
                        device_id: g.device_id.clone(),
                        user_id: g.user_id.clone(),
                        resource: g.resource.clone(),
                        policy: g.policy.clone(),
                        client_public_key: g.client_public_key.clone(),
                        preshared_key: g.preshared_key.clone(),
                        tunnel_addr: g.tunnel_addr.clone(),
                        rules_json: g.rules_json.clone(),
                        gateway_ids,
                        issued_ms: g.issued_ms,
                        expires_ms: g.expires_ms,
                        status: GrantStatus::Active,
                        ended_ms: None,
                        end_reason: None,
                        renewed_from: g.renewed_from,
                    });
                }
                Err(InsertFailure::IdTaken) => continue,
                Err(InsertFailure::Failed(e)) => return Err(e),
            }
        }
        Err(StoreError::Conflict {
            what: format!("no free grant id after {ID_ATTEMPTS} random draws"),
        })
    }

    /// One attempt at [`Store::insert_grant`] with the id `id`. On SQLite, attempts that
    /// carry audit events go through the group-commit batcher (see [`GrantBatch`]).
    async fn try_insert_grant(
        &self,
        id: i64,
        g: &NewGrant,
        gateway_ids: &[String],
        gateways_json: &str,
        events: &[super::NewAuditEvent],
        break_glass: Option<&super::NewBreakGlass>,
    ) -> Result<(), InsertFailure> {
        let raw = if self.backend == super::Backend::Sqlite && !events.is_empty() {
            self.batched_insert(GrantJob {
                id,
                grant: g.clone(),
                gateway_ids: gateway_ids.to_vec(),
                gateways_json: gateways_json.to_owned(),
                events: events.to_vec(),
                break_glass: break_glass.cloned(),
            })
            .await
        } else {
            let mut tx = if events.is_empty() {
                self.begin_write().await?
            } else {
                self.begin_audit_tx().await?
            };
            match insert_in(
                &mut tx,
                id,
                g,
                gateway_ids,
                gateways_json,
                events,
                break_glass,
            )
            .await
            {
                Ok(()) => {
                    tx.commit().await?;
                    Ok(())
                }
                Err(e) => {
                    drop(tx);
                    Err(e)
                }
            }
        };
        match raw {
            Ok(()) => Ok(()),
            Err(RawFailure::Unique) => {
                Err(self.grant_insert_conflict(id, &g.client_public_key).await)
            }
            Err(RawFailure::ForeignKey) => Err(InsertFailure::Failed(
                self.missing_for_grant(g, gateway_ids).await,
            )),
            Err(RawFailure::Other(e)) => Err(InsertFailure::Failed(e)),
        }
    }

    /// Sends one insertion to the batcher (started on first use) and waits for its commit.
    async fn batched_insert(&self, job: GrantJob) -> Result<(), RawFailure> {
        let sender = self
            .grant_batcher
            .get_or_init(|| async {
                let (tx, rx) = tokio::sync::mpsc::channel(GRANT_BATCH_MAX * 4);
                tokio::spawn(run_grant_batcher(self.clone(), rx));
                tx
            })
            .await;
        let (reply, answer) = tokio::sync::oneshot::channel();
        sender
            .send((job, reply))
            .await
            .map_err(|_| RawFailure::Other(StoreError::Database(sqlx::Error::PoolClosed)))?;
        answer
            .await
            .map_err(|_| RawFailure::Other(StoreError::Database(sqlx::Error::PoolClosed)))?
    }

    /// After a unique violation inserting grant `id`: was it the id (retry) or the key?
    async fn grant_insert_conflict(&self, id: i64, client_public_key: &str) -> InsertFailure {
        let key_taken = sqlx::query("SELECT id FROM grants WHERE client_public_key = $1")
            .bind(client_public_key)
            .fetch_optional(&self.pool)
            .await;
        match key_taken {
            Ok(Some(_)) => InsertFailure::Failed(StoreError::Conflict {
                what: format!(
                    "the client public key {client_public_key:?} was already used by a grant; \
                     every grant needs a fresh key"
                ),
            }),
            Ok(None) => match self.grant_by_id(id).await {
                Ok(Some(_)) => InsertFailure::IdTaken,
                Ok(None) => InsertFailure::Failed(StoreError::Conflict {
                    what: "a conflicting grant was written at the same time".into(),
                }),
                Err(e) => InsertFailure::Failed(e),
            },
            Err(e) => InsertFailure::Failed(e.into()),
        }
    }

    /// After a foreign-key refusal, names which record a new grant points to is missing.
    async fn missing_for_grant(&self, g: &NewGrant, gateway_ids: &[String]) -> StoreError {
        let lookups = async {
            if self.device_by_id(&g.device_id).await?.is_none() {
                return Ok(format!("device {}", g.device_id));
            }
            if self.user_by_id(&g.user_id).await?.is_none() {
                return Ok(format!("user {}", g.user_id));
            }
            for id in gateway_ids {
                if self.gateway_by_id(id).await?.is_none() {
                    return Ok(format!("gateway {id}"));
                }
            }
            Ok::<_, StoreError>(format!(
                "a record grant of {} to device {} refers to",
                g.resource, g.device_id
            ))
        };
        match lookups.await {
            Ok(what) => StoreError::NotFound { what },
            Err(e) => e,
        }
    }

    /// Looks a grant up by id, whatever its status.
    pub async fn grant_by_id(&self, id: i64) -> Result<Option<Grant>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM grants WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Every grant live at `now_ms` (active, `expires_ms > now_ms`), by id.
    pub async fn active_grants(&self, now_ms: i64) -> Result<Vec<Grant>, StoreError> {
        self.live_grants_where("TRUE", None, now_ms).await
    }

    /// The grants live at `now_ms` that gateway `gateway_id` serves, by id: what a
    /// (re)connecting gateway must hold before it passes traffic.
    pub async fn active_grants_for_gateway(
        &self,
        gateway_id: &str,
        now_ms: i64,
    ) -> Result<Vec<Grant>, StoreError> {
        self.live_grants_where(
            "id IN (SELECT grant_id FROM grant_gateways WHERE gateway_id = $2)",
            Some(gateway_id),
            now_ms,
        )
        .await
    }

    /// The grants of device `device_id` live at `now_ms`, by id.
    pub async fn active_grants_for_device(
        &self,
        device_id: &str,
        now_ms: i64,
    ) -> Result<Vec<Grant>, StoreError> {
        self.live_grants_where("device_id = $2", Some(device_id), now_ms)
            .await
    }

    /// The grants of user `user_id` (on any device) live at `now_ms`, by id.
    pub async fn active_grants_for_user(
        &self,
        user_id: &str,
        now_ms: i64,
    ) -> Result<Vec<Grant>, StoreError> {
        self.live_grants_where("user_id = $2", Some(user_id), now_ms)
            .await
    }

    /// Live grants matching `condition`, a constant of this module that may use `$2` for
    /// `arg` (never input).
    async fn live_grants_where(
        &self,
        condition: &'static str,
        arg: Option<&str>,
        now_ms: i64,
    ) -> Result<Vec<Grant>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM grants \
             WHERE status = 'active' AND expires_ms > $1 AND {condition} ORDER BY id"
        );
        let mut query = sqlx::query(&sql).bind(now_ms);
        if let Some(arg) = arg {
            query = query.bind(arg);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(from_row).collect()
    }

    /// Ends grant `id` with `reason` at `now_ms` if it is still active (whether or not past
    /// its expiry), and returns it as ended. `Ok(None)` if it had already ended — by then
    /// someone else (perhaps another replica) ended it and told the gateways. `NotFound` if
    /// there is no such grant.
    pub async fn end_grant(
        &self,
        id: i64,
        reason: &str,
        now_ms: i64,
    ) -> Result<Option<Grant>, StoreError> {
        let mut ended = self
            .end_grants_where("id = $3", EndArg::Id(id), reason, now_ms)
            .await?;
        if let Some(grant) = ended.pop() {
            return Ok(Some(grant));
        }
        match self.grant_by_id(id).await? {
            Some(_) => Ok(None),
            None => Err(StoreError::NotFound {
                what: format!("grant {id}"),
            }),
        }
    }

    /// Ends every active grant of device `device_id` (e.g. when the device is revoked) and
    /// returns those this call ended, by id: the peers to remove from their gateways.
    pub async fn end_grants_for_device(
        &self,
        device_id: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Vec<Grant>, StoreError> {
        self.end_grants_where("device_id = $3", EndArg::Text(device_id), reason, now_ms)
            .await
    }

    /// Ends every active grant of user `user_id` on any device (e.g. when the user is
    /// disabled) and returns those this call ended, by id.
    pub async fn end_grants_for_user(
        &self,
        user_id: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Vec<Grant>, StoreError> {
        self.end_grants_where("user_id = $3", EndArg::Text(user_id), reason, now_ms)
            .await
    }

    /// Marks every active grant whose expiry is at or before `now_ms` as ended with reason
    /// `expired`, `ended_ms` being its `expires_ms` (when it really ended), and returns those
    /// this call ended, by id. Replicas may all run it: each grant is returned by one call.
    pub async fn expire_grants(&self, now_ms: i64) -> Result<Vec<Grant>, StoreError> {
        // `fetch_all` steps the statement to completion (see `consume_join_token`).
        let rows = sqlx::query(&format!(
            "UPDATE grants SET status = 'ended', ended_ms = expires_ms, end_reason = 'expired' \
             WHERE status = 'active' AND expires_ms <= $1 RETURNING {COLUMNS}"
        ))
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut grants = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        grants.sort_by_key(|g| g.id);
        Ok(grants)
    }

    /// Ends the active grants matching `condition`, a constant of this module that may use
    /// `$3` for `arg` (never input), and returns them by id.
    async fn end_grants_where(
        &self,
        condition: &'static str,
        arg: EndArg<'_>,
        reason: &str,
        now_ms: i64,
    ) -> Result<Vec<Grant>, StoreError> {
        let sql = format!(
            "UPDATE grants SET status = 'ended', ended_ms = $1, end_reason = $2 \
             WHERE status = 'active' AND {condition} RETURNING {COLUMNS}"
        );
        let query = sqlx::query(&sql).bind(now_ms).bind(reason);
        let query = match arg {
            EndArg::Id(id) => query.bind(id),
            EndArg::Text(text) => query.bind(text),
        };
        // `fetch_all` steps the statement to completion (see `consume_join_token`).
        let rows = query.fetch_all(&self.pool).await?;
        let mut grants = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        grants.sort_by_key(|g| g.id);
        Ok(grants)
    }

    /// Deletes grant `id` and its gateway rows, whatever its status: only for rolling back a
    /// grant whose issuance failed (e.g. a gateway did not acknowledge it), so no half-made
    /// grant stays behind. Issued grants are ended, never deleted. `NotFound` if there is no
    /// such grant.
    pub async fn delete_grant(&self, id: i64) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM grant_gateways WHERE grant_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let result = sqlx::query("DELETE FROM grants WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if result.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                what: format!("grant {id}"),
            });
        }
        tx.commit().await?;
        Ok(())
    }
}

/// The one value an ending condition compares with.
#[derive(Clone, Copy)]
enum EndArg<'a> {
    /// A grant id.
    Id(i64),
    /// A device or user id.
    Text(&'a str),
}

/// Most grant insertions committed together by the SQLite batcher.
const GRANT_BATCH_MAX: usize = 64;

/// One grant insertion queued for the batcher.
pub(super) struct GrantJob {
    id: i64,
    grant: NewGrant,
    gateway_ids: Vec<String>,
    gateways_json: String,
    events: Vec<super::NewAuditEvent>,
    /// A break-glass grant's review-queue row, committed with it.
    break_glass: Option<super::NewBreakGlass>,
}

/// The batcher's queue: a job and where its outcome goes.
pub(super) type GrantBatch = tokio::sync::mpsc::Sender<(
    GrantJob,
    tokio::sync::oneshot::Sender<Result<(), RawFailure>>,
)>;

/// Why one insertion failed, before it is explained with follow-up reads.
pub(super) enum RawFailure {
    /// A unique constraint: the id or the client key was taken.
    Unique,
    /// A foreign key: the device, user or a gateway does not exist.
    ForeignKey,
    /// Anything else.
    Other(StoreError),
}

impl From<sqlx::Error> for RawFailure {
    fn from(e: sqlx::Error) -> Self {
        if is_unique_violation(&e) {
            RawFailure::Unique
        } else if is_foreign_key_violation(&e) {
            RawFailure::ForeignKey
        } else {
            RawFailure::Other(e.into())
        }
    }
}

impl From<StoreError> for RawFailure {
    fn from(e: StoreError) -> Self {
        RawFailure::Other(e)
    }
}

/// Writes grant `id`, its gateway rows, its break-glass review row (if any) and its audit
/// events inside `tx` (which holds the audit lock when there are events).
async fn insert_in(
    tx: &mut super::WriteTx,
    id: i64,
    g: &NewGrant,
    gateway_ids: &[String],
    gateways_json: &str,
    events: &[super::NewAuditEvent],
    break_glass: Option<&super::NewBreakGlass>,
) -> Result<(), RawFailure> {
    sqlx::query(
        "INSERT INTO grants (id, device_id, user_id, resource, policy, client_public_key, \
         preshared_key, tunnel_addr, rules, gateway_ids, issued_ms, expires_ms, status, \
         ended_ms, end_reason, renewed_from) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'active', NULL, NULL, $13)",
    )
    .bind(id)
    .bind(g.device_id.as_str())
    .bind(g.user_id.as_str())
    .bind(g.resource.as_str())
    .bind(g.policy.as_str())
    .bind(g.client_public_key.as_str())
    .bind(g.preshared_key.expose())
    .bind(g.tunnel_addr.as_str())
    .bind(g.rules_json.as_str())
    .bind(gateways_json)
    .bind(g.issued_ms)
    .bind(g.expires_ms)
    .bind(g.renewed_from)
    .execute(&mut **tx)
    .await?;
    for gateway_id in gateway_ids {
        sqlx::query("INSERT INTO grant_gateways (grant_id, gateway_id) VALUES ($1, $2)")
            .bind(id)
            .bind(gateway_id.as_str())
            .execute(&mut **tx)
            .await?;
    }
    if let Some(bg) = break_glass {
        super::breakglass::insert_in(tx, id, g, bg).await?;
    }
    for e in events {
        super::audit::append_in(tx, e).await?;
    }
    Ok(())
}

/// Group commit for SQLite: takes every queued insertion (up to [`GRANT_BATCH_MAX`]), writes
/// each inside its own savepoint (so one refused grant does not undo the others) and commits
/// them with one fsync. Each grant still commits atomically with its audit events; under load
/// the commit cost is shared, so issuing scales past one fsync per grant.
async fn run_grant_batcher(
    store: Store,
    mut rx: tokio::sync::mpsc::Receiver<(
        GrantJob,
        tokio::sync::oneshot::Sender<Result<(), RawFailure>>,
    )>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < GRANT_BATCH_MAX {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut tx = match store.begin_audit_tx().await {
            Ok(tx) => tx,
            Err(e) => {
                let msg = e.to_string();
                for (_, reply) in batch {
                    let _ = reply.send(Err(RawFailure::Other(StoreError::Database(
                        sqlx::Error::Protocol(format!("cannot start a write transaction: {msg}")),
                    ))));
                }
                continue;
            }
        };
        let mut outcomes = Vec::with_capacity(batch.len());
        for (i, (job, _)) in batch.iter().enumerate() {
            let sp = format!("g{i}");
            let r = async {
                sqlx::query(&format!("SAVEPOINT {sp}"))
                    .execute(&mut *tx)
                    .await?;
                let r = insert_in(
                    &mut tx,
                    job.id,
                    &job.grant,
                    &job.gateway_ids,
                    &job.gateways_json,
                    &job.events,
                    job.break_glass.as_ref(),
                )
                .await;
                if r.is_err() {
                    sqlx::query(&format!("ROLLBACK TO SAVEPOINT {sp}"))
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query(&format!("RELEASE SAVEPOINT {sp}"))
                    .execute(&mut *tx)
                    .await?;
                r
            }
            .await;
            outcomes.push(r);
        }
        match tx.commit().await {
            Ok(()) => {
                for ((_, reply), r) in batch.into_iter().zip(outcomes) {
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (_, reply) in batch {
                    let _ = reply.send(Err(RawFailure::Other(StoreError::Database(
                        sqlx::Error::Protocol(format!("the grant batch did not commit: {msg}")),
                    ))));
                }
            }
        }
    }
}
