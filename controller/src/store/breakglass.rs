//! The break-glass review queue, webhook sinks and the webhook outbox (migration 0006).
//!
//! A break-glass row is written inside the grant's own transaction
//! ([`Store::insert_grant_with`]); closing it is a conditional `UPDATE … WHERE reviewed_ms IS
//! NULL` in one transaction with its audit row, so two administrators racing get one success.
//!
//! The outbox holds one row per event and sink. Workers claim a due row by moving its
//! `next_ms` forward with a conditional `UPDATE … WHERE next_ms = <what I read>` (a lease):
//! whoever's update matched owns the attempt, so replicas sharing PostgreSQL never deliver one
//! row twice at once.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{NewAuditEvent, NewGrant, Store, StoreError, WriteTx};

/// What the policy administrator records about a break-glass grant besides the grant itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBreakGlass {
    /// The queue entry's id (`bg_…`), chosen by the caller.
    pub id: String,
    /// The reason the user gave (trimmed, bounded by the caller).
    pub reason: String,
}

/// A break-glass event in the review queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakGlassEvent {
    /// Id (`bg_…`), what `break-glass review ID` takes.
    pub id: String,
    /// The grant it opened.
    pub grant_id: i64,
    /// The user.
    pub user_id: String,
    /// The device.
    pub device_id: String,
    /// The resource.
    pub resource: String,
    /// The reason given.
    pub reason: String,
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// When the grant ends at the latest (ms).
    pub expires_ms: i64,
    /// The administrator who closed it.
    pub reviewed_by: Option<String>,
    /// When it was closed (ms).
    pub reviewed_ms: Option<i64>,
    /// The reviewer's comment.
    pub comment: Option<String>,
}

/// A webhook sink. `Debug` leaves the secret out.
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    /// Id (`wh_…`).
    pub id: String,
    /// Where events are POSTed.
    pub url: String,
    /// The HMAC key; never returned by the admin API, never logged.
    pub secret: String,
    /// When added (ms).
    pub created_ms: i64,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("created_ms", &self.created_ms)
            .finish()
    }
}

/// One event waiting for (or done with) delivery to one sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRow {
    /// Row id (`ob_…`).
    pub id: String,
    /// The event's id (the same for every sink).
    pub event_id: String,
    /// The sink.
    pub webhook_id: String,
    /// The exact JSON body that is signed and sent.
    pub body: String,
    /// Attempts made so far.
    pub attempts: i64,
    /// When the next attempt is due (ms).
    pub next_ms: i64,
    /// When the event was enqueued (ms).
    pub created_ms: i64,
    /// When a sink accepted it (ms).
    pub delivered_ms: Option<i64>,
    /// When delivery was given up (ms).
    pub failed_ms: Option<i64>,
    /// The last failure, in words.
    pub last_error: Option<String>,
}

const BG_COLUMNS: &str = "id, grant_id, user_id, device_id, resource, reason, at_ms, expires_ms, \
                          reviewed_by, reviewed_ms, comment";
const OB_COLUMNS: &str = "id, event_id, webhook_id, body, attempts, next_ms, created_ms, \
                          delivered_ms, failed_ms, last_error";

fn bg_from_row(r: &AnyRow) -> Result<BreakGlassEvent, StoreError> {
    Ok(BreakGlassEvent {
        id: r.try_get("id")?,
        grant_id: r.try_get("grant_id")?,
        user_id: r.try_get("user_id")?,
        device_id: r.try_get("device_id")?,
        resource: r.try_get("resource")?,
        reason: r.try_get("reason")?,
        at_ms: r.try_get("at_ms")?,
        expires_ms: r.try_get("expires_ms")?,
        reviewed_by: r.try_get("reviewed_by")?,
        reviewed_ms: r.try_get("reviewed_ms")?,
        comment: r.try_get("comment")?,
    })
}

fn ob_from_row(r: &AnyRow) -> Result<OutboxRow, StoreError> {
    Ok(OutboxRow {
        id: r.try_get("id")?,
        event_id: r.try_get("event_id")?,
        webhook_id: r.try_get("webhook_id")?,
        body: r.try_get("body")?,
        attempts: r.try_get("attempts")?,
        next_ms: r.try_get("next_ms")?,
        created_ms: r.try_get("created_ms")?,
        delivered_ms: r.try_get("delivered_ms")?,
        failed_ms: r.try_get("failed_ms")?,
        last_error: r.try_get("last_error")?,
    })
}

/// Writes the review-queue row of break-glass grant `grant_id` inside the grant's transaction.
pub(super) async fn insert_in(
    tx: &mut WriteTx,
    grant_id: i64,
    g: &NewGrant,
    bg: &NewBreakGlass,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO break_glass_events (id, grant_id, user_id, device_id, resource, reason, \
         at_ms, expires_ms, reviewed_by, reviewed_ms, comment) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, NULL, NULL)",
    )
    .bind(bg.id.as_str())
    .bind(grant_id)
    .bind(g.user_id.as_str())
    .bind(g.device_id.as_str())
    .bind(g.resource.as_str())
    .bind(bg.reason.as_str())
    .bind(g.issued_ms)
    .bind(g.expires_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// Break-glass events, oldest first: all, or only those not yet reviewed; with
    /// `at_or_before_ms`, only those that happened at or before it (the overdue ones, when
    /// given `now - overdue_after`).
    pub async fn list_break_glass(
        &self,
        unreviewed_only: bool,
        at_or_before_ms: Option<i64>,
    ) -> Result<Vec<BreakGlassEvent>, StoreError> {
        let mut sql = format!("SELECT {BG_COLUMNS} FROM break_glass_events WHERE at_ms <= $1");
        if unreviewed_only {
            sql.push_str(" AND reviewed_ms IS NULL");
        }
        sql.push_str(" ORDER BY at_ms, id");
        let rows = sqlx::query(&sql)
            .bind(at_or_before_ms.unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(bg_from_row).collect()
    }

    /// One break-glass event.
    pub async fn break_glass_by_id(&self, id: &str) -> Result<Option<BreakGlassEvent>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {BG_COLUMNS} FROM break_glass_events WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(bg_from_row).transpose()
    }

    /// The break-glass event of grant `grant_id`, if it was a break-glass grant.
    pub async fn break_glass_for_grant(
        &self,
        grant_id: i64,
    ) -> Result<Option<BreakGlassEvent>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {BG_COLUMNS} FROM break_glass_events WHERE grant_id = $1"
        ))
        .bind(grant_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(bg_from_row).transpose()
    }

    /// Closes a break-glass event with `comment`, and appends `event` to the audit log in the
    /// same transaction. `NotFound` for an unknown id, `Conflict` if it was already reviewed
    /// (naming by whom), `Invalid` for an empty comment.
    pub async fn review_break_glass(
        &self,
        id: &str,
        reviewer: &str,
        comment: &str,
        now_ms: i64,
        event: &NewAuditEvent,
    ) -> Result<BreakGlassEvent, StoreError> {
        if comment.trim().is_empty() {
            return Err(StoreError::Invalid {
                what: "a break-glass review needs a comment".into(),
            });
        }
        let mut tx = self.begin_audit_tx().await?;
        let row = sqlx::query(&format!(
            "UPDATE break_glass_events SET reviewed_by = $1, reviewed_ms = $2, comment = $3 \
             WHERE id = $4 AND reviewed_ms IS NULL RETURNING {BG_COLUMNS}"
        ))
        .bind(reviewer)
        .bind(now_ms)
        .bind(comment)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            drop(tx);
            return Err(match self.break_glass_by_id(id).await? {
                None => StoreError::NotFound {
                    what: format!("break-glass event {id}"),
                },
                Some(e) => StoreError::Conflict {
                    what: format!(
                        "break-glass event {id} was already reviewed by {}",
                        e.reviewed_by.unwrap_or_default()
                    ),
                },
            });
        };
        let reviewed = bg_from_row(&row)?;
        super::audit::append_in(&mut tx, event).await?;
        tx.commit().await?;
        Ok(reviewed)
    }

    /// Adds a webhook sink. `Conflict` if the id is taken.
    pub async fn insert_webhook(&self, w: &Webhook) -> Result<(), StoreError> {
        let r = sqlx::query(
            "INSERT INTO webhooks (id, url, secret, created_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(w.id.as_str())
        .bind(w.url.as_str())
        .bind(w.secret.as_str())
        .bind(w.created_ms)
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if super::is_unique_violation(&e) => Err(StoreError::Conflict {
                what: format!("a webhook with id {:?} already exists", w.id),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Every webhook sink, oldest first.
    pub async fn list_webhooks(&self) -> Result<Vec<Webhook>, StoreError> {
        let rows =
            sqlx::query("SELECT id, url, secret, created_ms FROM webhooks ORDER BY created_ms, id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(Webhook {
                    id: r.try_get("id")?,
                    url: r.try_get("url")?,
                    secret: r.try_get("secret")?,
                    created_ms: r.try_get("created_ms")?,
                })
            })
            .collect()
    }

    /// Removes a sink and drops its undelivered events (nobody would receive them).
    /// `NotFound` for an unknown id.
    pub async fn delete_webhook(&self, id: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let r = sqlx::query("DELETE FROM webhooks WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                what: format!("webhook {id}"),
            });
        }
        sqlx::query(
            "DELETE FROM webhook_outbox WHERE webhook_id = $1 AND delivered_ms IS NULL \
             AND failed_ms IS NULL",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Enqueues outbox rows, all or none.
    pub async fn insert_outbox(&self, rows: &[OutboxRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for r in rows {
            super::check_json(&r.body, "a webhook event")?;
            sqlx::query(&format!(
                "INSERT INTO webhook_outbox ({OB_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            ))
            .bind(r.id.as_str())
            .bind(r.event_id.as_str())
            .bind(r.webhook_id.as_str())
            .bind(r.body.as_str())
            .bind(r.attempts)
            .bind(r.next_ms)
            .bind(r.created_ms)
            .bind(r.delivered_ms)
            .bind(r.failed_ms)
            .bind(r.last_error.as_deref())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Undelivered rows due at `now_ms`, earliest first, at most `limit`.
    pub async fn due_outbox(&self, now_ms: i64, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {OB_COLUMNS} FROM webhook_outbox WHERE delivered_ms IS NULL \
             AND failed_ms IS NULL AND next_ms <= $1 ORDER BY next_ms, id LIMIT $2"
        ))
        .bind(now_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(ob_from_row).collect()
    }

    /// When the earliest undelivered row is due, if any.
    pub async fn next_outbox_due(&self) -> Result<Option<i64>, StoreError> {
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(next_ms) FROM webhook_outbox WHERE delivered_ms IS NULL \
             AND failed_ms IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(v)
    }

    /// Claims row `id` for one attempt if its `next_ms` is still `seen_next_ms`, moving it to
    /// `lease_until_ms` (so a worker that dies mid-attempt only delays it). True if this
    /// caller won it.
    pub async fn claim_outbox(
        &self,
        id: &str,
        seen_next_ms: i64,
        lease_until_ms: i64,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE webhook_outbox SET next_ms = $1 WHERE id = $2 AND next_ms = $3 \
             AND delivered_ms IS NULL AND failed_ms IS NULL",
        )
        .bind(lease_until_ms)
        .bind(id)
        .bind(seen_next_ms)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records an attempt: delivered (`Ok`), to retry at `next_ms`, or given up (`failed`).
    pub async fn record_outbox_attempt(
        &self,
        id: &str,
        attempts: i64,
        outcome: OutboxOutcome<'_>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let q = match outcome {
            OutboxOutcome::Delivered => sqlx::query(
                "UPDATE webhook_outbox SET attempts = $1, delivered_ms = $2, last_error = NULL \
                 WHERE id = $3",
            )
            .bind(attempts)
            .bind(now_ms)
            .bind(id),
            OutboxOutcome::Retry { next_ms, error } => sqlx::query(
                "UPDATE webhook_outbox SET attempts = $1, next_ms = $2, last_error = $3 \
                 WHERE id = $4",
            )
            .bind(attempts)
            .bind(next_ms)
            .bind(error)
            .bind(id),
            OutboxOutcome::GaveUp { error } => sqlx::query(
                "UPDATE webhook_outbox SET attempts = $1, failed_ms = $2, last_error = $3 \
                 WHERE id = $4",
            )
            .bind(attempts)
            .bind(now_ms)
            .bind(error)
            .bind(id),
        };
        q.execute(&self.pool).await?;
        Ok(())
    }

    /// Every outbox row, oldest first (for operators and tests).
    pub async fn list_outbox(&self) -> Result<Vec<OutboxRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {OB_COLUMNS} FROM webhook_outbox ORDER BY created_ms, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(ob_from_row).collect()
    }
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, Copy)]
pub enum OutboxOutcome<'a> {
    /// The sink answered 2xx.
    Delivered,
    /// Failed; try again at `next_ms`.
    Retry {
        /// When.
        next_ms: i64,
        /// Why it failed.
        error: &'a str,
    },
    /// Failed for the last time.
    GaveUp {
        /// Why it failed.
        error: &'a str,
    },
}
