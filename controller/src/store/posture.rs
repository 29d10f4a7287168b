//! Device posture reports: the latest accepted one per device, with its anti-replay counter
//! and when the controller received it.
//!
//! Acceptance is one conditional upsert (`… ON CONFLICT DO UPDATE … WHERE counter < new`), so
//! two reports racing (two connections of one device, two replicas) can never let a lower
//! counter overwrite a higher one: the database settles it, exactly as for single-use tokens.
//! The report itself is JSON whose type belongs to the wire protocol; the store only checks
//! that it is JSON.

use sqlx::Row;

use super::{Store, StoreError, check_json};

/// The latest accepted posture report of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPosture {
    /// The device.
    pub device_id: String,
    /// The counter it carried.
    pub counter: i64,
    /// The report as JSON (the wire `PostureReport`).
    pub report_json: String,
    /// When the controller received it (ms since the epoch, the controller's clock).
    pub received_ms: i64,
}

/// What became of an offered report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostureAccept {
    /// Stored as the device's latest.
    Accepted,
    /// Refused: its counter is not above the stored one (`last`).
    Replayed {
        /// The counter of the report kept.
        last: i64,
    },
}

impl Store {
    /// Stores `report_json` as `device_id`'s latest report if `counter` is above the counter
    /// of the report stored now (or none is stored); otherwise leaves everything as it was and
    /// says which counter it has. `Invalid` for a counter below 1 or a report that is not JSON.
    pub async fn accept_posture_report(
        &self,
        device_id: &str,
        counter: i64,
        report_json: &str,
        received_ms: i64,
    ) -> Result<PostureAccept, StoreError> {
        if counter < 1 {
            return Err(StoreError::Invalid {
                what: format!("posture report counter {counter} (must be 1 or more)"),
            });
        }
        check_json(report_json, "posture report")?;
        let stored: Option<i64> = sqlx::query_scalar(
            "INSERT INTO posture_reports (device_id, counter, report, received_ms) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (device_id) DO UPDATE SET counter = excluded.counter, \
                 report = excluded.report, received_ms = excluded.received_ms \
             WHERE posture_reports.counter < excluded.counter \
             RETURNING counter",
        )
        .bind(device_id)
        .bind(counter)
        .bind(report_json)
        .bind(received_ms)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| {
            if super::is_foreign_key_violation(&e) {
                StoreError::NotFound {
                    what: format!("device {device_id}"),
                }
            } else {
                e.into()
            }
        })?;
        if stored.is_some() {
            return Ok(PostureAccept::Accepted);
        }
        let last = self
            .latest_posture(device_id)
            .await?
            .map_or(counter, |p| p.counter);
        Ok(PostureAccept::Replayed { last })
    }

    /// The latest accepted report of `device_id`, if it ever reported.
    pub async fn latest_posture(
        &self,
        device_id: &str,
    ) -> Result<Option<StoredPosture>, StoreError> {
        let row = sqlx::query(
            "SELECT device_id, counter, report, received_ms FROM posture_reports \
             WHERE device_id = $1",
        )
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(StoredPosture {
                device_id: r.try_get("device_id")?,
                counter: r.try_get("counter")?,
                report_json: r.try_get("report")?,
                received_ms: r.try_get("received_ms")?,
            })
        })
        .transpose()
    }

    /// Devices holding a live grant whose latest report was received before `cutoff_ms`, or
    /// that never reported: the ones a staleness sweep must re-decide. One query, so the
    /// sweep's cost does not grow with the devices whose reports are fresh.
    pub async fn devices_with_stale_posture(
        &self,
        cutoff_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT g.device_id FROM grants g \
             LEFT JOIN posture_reports p ON p.device_id = g.device_id \
             WHERE g.status = 'active' AND g.expires_ms > $1 \
               AND (p.received_ms IS NULL OR p.received_ms < $2) \
             ORDER BY g.device_id",
        )
        .bind(now_ms)
        .bind(cutoff_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids)
    }
}
