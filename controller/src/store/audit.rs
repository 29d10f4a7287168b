//! The append-only, hash-chained audit log.
//!
//! Each event's `hash` covers the previous event's hash and the event itself, so changing,
//! removing or reordering any stored event breaks every hash after it. A verifier recomputes
//! the chain with [`audit_hash`] (or [`AuditEvent::computed_hash`]) starting from
//! [`AUDIT_GENESIS_HASH`].
//!
//! The bytes hashed, in order (`||` is concatenation):
//!
//! ```text
//! SHA-256( prev_hash as ASCII hex
//!       || seq as 8-byte big-endian i64 || at_ms as 8-byte big-endian i64
//!       || for each of actor, action, target, outcome, detail-as-compact-JSON:
//!              its UTF-8 length as 8-byte big-endian u64 || its UTF-8 bytes )
//! ```
//!
//! and the stored hash is its lowercase hex. Lengths make the encoding unambiguous (no two
//! different events share bytes). The JSON is serde_json's compact form, which is also exactly
//! what the `detail` column stores, so re-parsing and re-serializing reproduces it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Backend, Store, StoreError, WriteTx, is_unique_violation};

/// `prev_hash` of the first event: 64 zeros.
pub const AUDIT_GENESIS_HASH: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

/// Rows read per query while verifying, so a log of millions of events is walked in bounded
/// memory.
const VERIFY_PAGE: i64 = 1_000;

/// Key of the PostgreSQL advisory lock that serializes appends across replicas
/// (ASCII "WGaudit1").
const AUDIT_LOCK_KEY: i64 = 0x5747_6175_6469_7431;

/// An event to record: who did what to what, and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewAuditEvent {
    /// When it happened, ms since the Unix epoch.
    pub at_ms: i64,
    /// Who acted: `admin:tok_ab12`, `user:amara`, `device:dev_…`, `gateway:gw_…` or `system`.
    pub actor: String,
    /// What was done, dotted: `device.enrol`, `gateway.join`, `admin.user.create`, ….
    pub action: String,
    /// What it was done to (an id or name).
    pub target: String,
    /// How it ended: `allow`, `deny`, `ok` or `error`.
    pub outcome: String,
    /// Anything else worth keeping (reasons, parameters); never secrets.
    pub detail: serde_json::Value,
}

/// A recorded event, with its place in the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Position in the log: 1, 2, 3, … without gaps.
    pub seq: i64,
    /// When it happened, ms since the Unix epoch.
    pub at_ms: i64,
    /// Who acted (see [`NewAuditEvent::actor`]).
    pub actor: String,
    /// What was done (see [`NewAuditEvent::action`]).
    pub action: String,
    /// What it was done to.
    pub target: String,
    /// How it ended.
    pub outcome: String,
    /// Anything else worth keeping.
    pub detail: serde_json::Value,
    /// `hash` of the event before, or [`AUDIT_GENESIS_HASH`] for the first.
    pub prev_hash: String,
    /// [`audit_hash`] of this event; lowercase hex SHA-256.
    pub hash: String,
}

impl AuditEvent {
    /// Recomputes what `hash` must be from `prev_hash` and the event's fields; a verifier
    /// compares it with `hash` and checks `prev_hash` against the previous event's `hash`.
    pub fn computed_hash(&self) -> String {
        Fields {
            seq: self.seq,
            at_ms: self.at_ms,
            actor: &self.actor,
            action: &self.action,
            target: &self.target,
            outcome: &self.outcome,
            detail: &self.detail,
        }
        .hash(&self.prev_hash)
    }
}

/// The hash of event `e` stored at position `seq` after an event whose hash is `prev_hash`
/// (see the module docs for the exact bytes). Public so audit exports can be verified
/// independently of the store.
pub fn audit_hash(prev_hash: &str, seq: i64, e: &NewAuditEvent) -> String {
    Fields {
        seq,
        at_ms: e.at_ms,
        actor: &e.actor,
        action: &e.action,
        target: &e.target,
        outcome: &e.outcome,
        detail: &e.detail,
    }
    .hash(prev_hash)
}

/// The hashed fields of an event, borrowed from either record type.
struct Fields<'a> {
    seq: i64,
    at_ms: i64,
    actor: &'a str,
    action: &'a str,
    target: &'a str,
    outcome: &'a str,
    detail: &'a serde_json::Value,
}

impl Fields<'_> {
    fn hash(&self, prev_hash: &str) -> String {
        let detail = self.detail.to_string();
        let mut h = Sha256::new();
        h.update(prev_hash.as_bytes());
        h.update(self.seq.to_be_bytes());
        h.update(self.at_ms.to_be_bytes());
        for field in [self.actor, self.action, self.target, self.outcome, &detail] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field.as_bytes());
        }
        hex::encode(h.finalize())
    }
}

/// The result of walking the whole audit chain (see [`Store::audit_verify`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AuditVerification {
    /// Every stored event is in place and chained to the one before.
    Intact {
        /// How many events were checked (`seq` 1 to `count`).
        count: i64,
        /// The last event's hash ([`AUDIT_GENESIS_HASH`] for an empty log). Kept outside the
        /// database (printed, exported), it also exposes events later cut off the end, which
        /// the chain alone cannot show.
        last_hash: String,
    },
    /// The chain breaks; nothing after the first break is judged.
    Broken(AuditBreak),
}

/// Where and how the audit chain first breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditBreak {
    /// The first position at which the log is not what it must be: the changed event, or for
    /// a gap the first missing `seq`.
    pub seq: i64,
    /// How many events before it were verified intact.
    pub verified: i64,
    /// What is wrong there.
    pub problem: AuditProblem,
}

impl std::fmt::Display for AuditBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the audit chain breaks at event {} ({} events before it verified): {}",
            self.seq, self.verified, self.problem
        )
    }
}

/// What is wrong with the event where the audit chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditProblem {
    /// The event's contents do not give its stored hash: the event was changed.
    HashMismatch {
        /// The stored `hash`.
        stored: String,
        /// What [`audit_hash`] gives for the stored contents.
        computed: String,
    },
    /// The event's `prev_hash` is not the previous event's `hash`: an event before it was
    /// replaced (contents and hash) or removed, or the events were reordered.
    PrevHashMismatch {
        /// The stored `prev_hash`.
        stored: String,
        /// The previous event's hash (or [`AUDIT_GENESIS_HASH`] for the first).
        expected: String,
    },
    /// The `seq` that must come next is missing: events were deleted.
    SeqGap {
        /// The `seq` that must come next.
        expected: i64,
        /// The `seq` stored in its place.
        found: i64,
    },
    /// The stored detail is not JSON, so it cannot be what was hashed.
    DetailNotJson {
        /// The parser's complaint.
        error: String,
    },
    /// The stored detail is JSON but not in the compact form the store writes: its text was
    /// edited, even if its meaning and so its hash are unchanged.
    DetailNotCanonical,
}

impl std::fmt::Display for AuditProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditProblem::HashMismatch { stored, computed } => write!(
                f,
                "its contents hash to {computed}, not to its stored hash {stored}: the event \
                 was changed"
            ),
            AuditProblem::PrevHashMismatch { stored, expected } => write!(
                f,
                "its prev_hash {stored} is not the previous event's hash {expected}: an event \
                 before it was replaced or removed"
            ),
            AuditProblem::SeqGap { expected, found } => write!(
                f,
                "event {expected} is missing (the next stored event is {found}): events were \
                 deleted"
            ),
            AuditProblem::DetailNotJson { error } => {
                write!(f, "its detail is not JSON ({error}): the event was changed")
            }
            AuditProblem::DetailNotCanonical => f.write_str(
                "its detail is not in the form the store writes: the event's text was edited",
            ),
        }
    }
}

const COLUMNS: &str = "seq, at_ms, actor, action, target, outcome, detail, prev_hash, hash";

fn from_row(row: &AnyRow) -> Result<AuditEvent, StoreError> {
    let seq: i64 = row.try_get("seq")?;
    let detail: String = row.try_get("detail")?;
    let detail = serde_json::from_str(&detail).map_err(|e| StoreError::Corrupt {
        what: format!("detail of audit event {seq} (not JSON: {e})"),
    })?;
    Ok(AuditEvent {
        seq,
        at_ms: row.try_get("at_ms")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        outcome: row.try_get("outcome")?,
        detail,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

impl Store {
    /// Appends `e` as the next event of the chain and returns it as stored.
    ///
    /// Appends are serialized so the chain never forks, also across replicas: the
    /// transaction first takes a lock held until commit — `pg_advisory_xact_lock` on
    /// PostgreSQL, the database write lock (`BEGIN IMMEDIATE`) on SQLite — then reads the last
    /// event and inserts `seq = last + 1`. `seq` is the primary key, so should the lock ever
    /// fail to hold, the loser gets `Conflict` rather than a second branch.
    pub async fn append_audit(&self, e: &NewAuditEvent) -> Result<AuditEvent, StoreError> {
        let mut tx = self.begin_audit_tx().await?;
        let stored = append_in(&mut tx, e).await?;
        tx.commit().await?;
        Ok(stored)
    }

    /// A write transaction that holds the audit lock until commit (see
    /// [`Store::append_audit`]), so other writes can be made atomic with their audit events.
    pub(super) async fn begin_audit_tx(&self) -> Result<WriteTx, StoreError> {
        let mut tx = self.begin_write().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT 1 AS locked FROM pg_advisory_xact_lock($1)")
                .bind(AUDIT_LOCK_KEY)
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }

    /// Events in chain order (`seq` ascending): those at or after `since_ms` if given, at
    /// most `limit` if given. `Invalid` for a negative limit.
    pub async fn list_audit(
        &self,
        since_ms: Option<i64>,
        limit: Option<i64>,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        if let Some(limit) = limit.filter(|l| *l < 0) {
            return Err(StoreError::Invalid {
                what: format!("audit listing limit {limit} is negative"),
            });
        }
        let sql = match (since_ms, limit) {
            (Some(_), Some(_)) => {
                format!("SELECT {COLUMNS} FROM audit_log WHERE at_ms >= $1 ORDER BY seq LIMIT $2")
            }
            (Some(_), None) => {
                format!("SELECT {COLUMNS} FROM audit_log WHERE at_ms >= $1 ORDER BY seq")
            }
            (None, Some(_)) => format!("SELECT {COLUMNS} FROM audit_log ORDER BY seq LIMIT $1"),
            (None, None) => format!("SELECT {COLUMNS} FROM audit_log ORDER BY seq"),
        };
        let mut query = sqlx::query(&sql);
        if let Some(since_ms) = since_ms {
            query = query.bind(since_ms);
        }
        if let Some(limit) = limit {
            query = query.bind(limit);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(from_row).collect()
    }
}

impl Store {
    /// Walks the whole audit chain in `seq` order, a page at a time, and returns the first
    /// break — a changed event (hash mismatch), a replaced or removed predecessor (prev_hash
    /// mismatch), a missing `seq` (gap) — or the count and last hash of an intact log.
    ///
    /// Events appended while it runs are checked too if they land before the walk reaches
    /// the end. Events cut off the end leave no break; compare the count and last hash with a
    /// copy kept elsewhere to notice that. `Err` only when the database cannot be read.
    pub async fn audit_verify(&self) -> Result<AuditVerification, StoreError> {
        let mut expected_seq: i64 = 1;
        let mut prev_hash = AUDIT_GENESIS_HASH.to_owned();
        let mut after = i64::MIN;
        let sql = format!("SELECT {COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2");
        loop {
            let rows = sqlx::query(&sql)
                .bind(after)
                .bind(VERIFY_PAGE)
                .fetch_all(&self.pool)
                .await?;
            let Some(last) = rows.last() else { break };
            after = last.try_get("seq")?;
            for row in &rows {
                let checked = expected_seq - 1;
                let broken = |seq: i64, problem: AuditProblem| {
                    Ok(AuditVerification::Broken(AuditBreak {
                        seq,
                        verified: checked,
                        problem,
                    }))
                };
                let seq: i64 = row.try_get("seq")?;
                if seq != expected_seq {
                    return broken(
                        expected_seq,
                        AuditProblem::SeqGap {
                            expected: expected_seq,
                            found: seq,
                        },
                    );
                }
                let stored_prev: String = row.try_get("prev_hash")?;
                if stored_prev != prev_hash {
                    return broken(
                        seq,
                        AuditProblem::PrevHashMismatch {
                            stored: stored_prev,
                            expected: prev_hash,
                        },
                    );
                }
                let detail_text: String = row.try_get("detail")?;
                let detail: serde_json::Value = match serde_json::from_str(&detail_text) {
                    Ok(detail) => detail,
                    Err(e) => {
                        return broken(
                            seq,
                            AuditProblem::DetailNotJson {
                                error: e.to_string(),
                            },
                        );
                    }
                };
                let event = NewAuditEvent {
                    at_ms: row.try_get("at_ms")?,
                    actor: row.try_get("actor")?,
                    action: row.try_get("action")?,
                    target: row.try_get("target")?,
                    outcome: row.try_get("outcome")?,
                    detail,
                };
                let stored_hash: String = row.try_get("hash")?;
                let computed = audit_hash(&prev_hash, seq, &event);
                if computed != stored_hash {
                    return broken(
                        seq,
                        AuditProblem::HashMismatch {
                            stored: stored_hash,
                            computed,
                        },
                    );
                }
                // Compared as text: the hash covers the re-serialized value, so an edit that
                // keeps the meaning (spacing, key order) passes the hash check but not this.
                let canonical = event.detail.to_string();
                if canonical != detail_text {
                    return broken(seq, AuditProblem::DetailNotCanonical);
                }
                prev_hash = stored_hash;
                expected_seq = seq.checked_add(1).ok_or_else(|| StoreError::Corrupt {
                    what: format!("audit seq {seq} (no successor)"),
                })?;
            }
            if i64::try_from(rows.len()).unwrap_or(i64::MAX) < VERIFY_PAGE {
                break;
            }
        }
        Ok(AuditVerification::Intact {
            count: expected_seq - 1,
            last_hash: prev_hash,
        })
    }
}

/// Appends `e` as the next event inside `tx`, which must hold the audit lock
/// ([`Store::begin_audit_tx`]).
pub(super) async fn append_in(
    tx: &mut WriteTx,
    e: &NewAuditEvent,
) -> Result<AuditEvent, StoreError> {
    let detail = e.detail.to_string();
    let last = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut **tx)
        .await?;
    let (last_seq, prev_hash) = match last {
        Some(row) => (
            row.try_get::<i64, _>("seq")?,
            row.try_get::<String, _>("hash")?,
        ),
        None => (0, AUDIT_GENESIS_HASH.to_owned()),
    };
    let seq = last_seq.checked_add(1).ok_or_else(|| StoreError::Corrupt {
        what: format!("last audit seq {last_seq} (no successor)"),
    })?;
    let hash = audit_hash(&prev_hash, seq, e);
    let inserted = sqlx::query(
        "INSERT INTO audit_log \
         (seq, at_ms, actor, action, target, outcome, detail, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(seq)
    .bind(e.at_ms)
    .bind(e.actor.as_str())
    .bind(e.action.as_str())
    .bind(e.target.as_str())
    .bind(e.outcome.as_str())
    .bind(detail.as_str())
    .bind(prev_hash.as_str())
    .bind(hash.as_str())
    .execute(&mut **tx)
    .await;
    match inserted {
        Ok(_) => {}
        Err(err) if is_unique_violation(&err) => {
            return Err(StoreError::Conflict {
                what: format!("audit event {seq} was written concurrently; append again"),
            });
        }
        Err(err) => return Err(err.into()),
    }
    Ok(AuditEvent {
        seq,
        at_ms: e.at_ms,
        actor: e.actor.clone(),
        action: e.action.clone(),
        target: e.target.clone(),
        outcome: e.outcome.clone(),
        detail: e.detail.clone(),
        prev_hash,
        hash,
    })
}
