//! Vendor organisations and access requests (issue 7).
//!
//! A request's state only moves forward (`pending` → `approved`/`denied`, `approved` →
//! `revoked`/`expired`, `pending` → `revoked`/`expired`), each move a conditional `UPDATE …
//! WHERE state IN (…) RETURNING`, so two approvers (or an approver and the sweeper) racing on
//! one request get exactly one outcome, also across replicas. Which moves are allowed is
//! decided by [`RequestState::can_become`]; the store enforces it in the `WHERE`.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{ParseStatusError, Store, StoreError, is_foreign_key_violation, is_unique_violation};

/// A vendor organisation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vendor {
    /// Unique name (`acme`).
    pub name: String,
    /// The staff user who sponsors it.
    pub sponsor_user_id: String,
    /// Contract or BAA reference (`ACME-BAA-7`).
    pub contract_ref: String,
    /// The contract's last day, `YYYY-MM-DD`.
    pub contract_end: String,
    /// The IANA zone that day is counted in.
    pub contract_zone: String,
    /// When that day ends in that zone (ms since the epoch).
    pub contract_end_ms: i64,
    /// Creation time.
    pub created_ms: i64,
}

/// Where an access request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestState {
    /// Waiting for an approver.
    Pending,
    /// Approved: a grant window.
    Approved,
    /// Refused by an approver.
    Denied,
    /// Withdrawn by an administrator (before or during its window).
    Revoked,
    /// Its window ended (approved) or passed undecided (pending).
    Expired,
}

impl RequestState {
    /// Stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Approved => "approved",
            RequestState::Denied => "denied",
            RequestState::Revoked => "revoked",
            RequestState::Expired => "expired",
        }
    }

    /// Whether a request in this state may move to `next`. The whole state machine: decided,
    /// revoked and expired requests never change again, so an approval cannot be reused and a
    /// denial cannot be turned into an approval (that is a new request).
    pub fn can_become(self, next: RequestState) -> bool {
        use RequestState::*;
        matches!(
            (self, next),
            (Pending, Approved | Denied | Revoked | Expired) | (Approved, Revoked | Expired)
        )
    }

    /// Every state that may move to `next`.
    pub fn sources(next: RequestState) -> Vec<RequestState> {
        use RequestState::*;
        [Pending, Approved, Denied, Revoked, Expired]
            .into_iter()
            .filter(|s| s.can_become(next))
            .collect()
    }
}

impl std::fmt::Display for RequestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RequestState {
    type Err = ParseStatusError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(RequestState::Pending),
            "approved" => Ok(RequestState::Approved),
            "denied" => Ok(RequestState::Denied),
            "revoked" => Ok(RequestState::Revoked),
            "expired" => Ok(RequestState::Expired),
            _ => Err(ParseStatusError::new(
                "access request",
                s,
                "pending, approved, denied, revoked, expired",
            )),
        }
    }
}

/// A request to make; the store numbers it and starts it `pending`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAccessRequest {
    /// Who asks.
    pub user_id: String,
    /// The device the access is for.
    pub device_id: String,
    /// The resource.
    pub resource: String,
    /// Window start (ms).
    pub from_ms: i64,
    /// Window end (ms), after `from_ms`.
    pub until_ms: i64,
    /// Why, in the requester's words.
    pub reason: String,
    /// A ticket reference, if any.
    pub ticket: Option<String>,
    /// When it was made.
    pub created_ms: i64,
}

/// A stored access request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequestRow {
    /// Its number.
    pub id: i64,
    /// Who asked.
    pub user_id: String,
    /// For which device.
    pub device_id: String,
    /// For which resource.
    pub resource: String,
    /// Window start (ms).
    pub from_ms: i64,
    /// Window end (ms).
    pub until_ms: i64,
    /// Why.
    pub reason: String,
    /// Ticket reference.
    pub ticket: Option<String>,
    /// State.
    pub state: RequestState,
    /// When it was made.
    pub created_ms: i64,
    /// When it last changed state.
    pub decided_ms: Option<i64>,
    /// Who changed it (the audit actor: admin token, OIDC admin, `system`).
    pub decided_by: Option<String>,
    /// The approving (or denying) user.
    pub approver_user_id: Option<String>,
    /// The decision's reason or comment.
    pub decision_reason: Option<String>,
    /// When the "ends soon" notice went out.
    pub notice_sent_ms: Option<i64>,
}

/// A state change to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestDecision {
    /// The new state.
    pub to: RequestState,
    /// Who made it (audit actor).
    pub by: String,
    /// The user who approved or denied, if a person decided.
    pub approver_user_id: Option<String>,
    /// Reason or comment.
    pub reason: Option<String>,
    /// When.
    pub at_ms: i64,
}

const VENDOR_COLUMNS: &str =
    "name, sponsor_user_id, contract_ref, contract_end, contract_zone, contract_end_ms, created_ms";

const REQUEST_COLUMNS: &str = "id, user_id, device_id, resource, from_ms, until_ms, reason, \
     ticket, state, created_ms, decided_ms, decided_by, approver_user_id, decision_reason, \
     notice_sent_ms";

/// How often numbering a request is retried when another writer took the number.
const ID_ATTEMPTS: usize = 8;

fn vendor_from_row(r: &AnyRow) -> Result<Vendor, StoreError> {
    Ok(Vendor {
        name: r.try_get("name")?,
        sponsor_user_id: r.try_get("sponsor_user_id")?,
        contract_ref: r.try_get("contract_ref")?,
        contract_end: r.try_get("contract_end")?,
        contract_zone: r.try_get("contract_zone")?,
        contract_end_ms: r.try_get("contract_end_ms")?,
        created_ms: r.try_get("created_ms")?,
    })
}

fn request_from_row(r: &AnyRow) -> Result<AccessRequestRow, StoreError> {
    let state: String = r.try_get("state")?;
    Ok(AccessRequestRow {
        id: r.try_get("id")?,
        user_id: r.try_get("user_id")?,
        device_id: r.try_get("device_id")?,
        resource: r.try_get("resource")?,
        from_ms: r.try_get("from_ms")?,
        until_ms: r.try_get("until_ms")?,
        reason: r.try_get("reason")?,
        ticket: r.try_get("ticket")?,
        state: state
            .parse()
            .map_err(|e: ParseStatusError| StoreError::Corrupt {
                what: e.to_string(),
            })?,
        created_ms: r.try_get("created_ms")?,
        decided_ms: r.try_get("decided_ms")?,
        decided_by: r.try_get("decided_by")?,
        approver_user_id: r.try_get("approver_user_id")?,
        decision_reason: r.try_get("decision_reason")?,
        notice_sent_ms: r.try_get("notice_sent_ms")?,
    })
}

/// `'a', 'b'` for a `state IN (…)`; the spellings come from [`RequestState::as_str`], never
/// from input.
fn state_list(states: &[RequestState]) -> String {
    states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// Creates a vendor. `Conflict` if the name is taken; `NotFound` if the sponsor is not a
    /// user.
    pub async fn insert_vendor(&self, v: &Vendor) -> Result<(), StoreError> {
        super::check_name(&v.name, "vendor")?;
        let r = sqlx::query(&format!(
            "INSERT INTO vendors ({VENDOR_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(v.name.as_str())
        .bind(v.sponsor_user_id.as_str())
        .bind(v.contract_ref.as_str())
        .bind(v.contract_end.as_str())
        .bind(v.contract_zone.as_str())
        .bind(v.contract_end_ms)
        .bind(v.created_ms)
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict {
                what: format!("a vendor named {} already exists", v.name),
            }),
            Err(e) if is_foreign_key_violation(&e) => Err(StoreError::NotFound {
                what: format!("sponsor user {}", v.sponsor_user_id),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Every vendor, by name.
    pub async fn list_vendors(&self) -> Result<Vec<Vendor>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {VENDOR_COLUMNS} FROM vendors"))
            .fetch_all(&self.pool)
            .await?;
        let mut out = rows
            .iter()
            .map(vendor_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        super::sort_by_bytes(&mut out, |v| &v.name);
        Ok(out)
    }

    /// Adds a user to a vendor. `Conflict` if they belong to a vendor already.
    pub async fn add_vendor_member(&self, vendor: &str, user_id: &str) -> Result<(), StoreError> {
        let r = sqlx::query("INSERT INTO vendor_members (vendor, user_id) VALUES ($1, $2)")
            .bind(vendor)
            .bind(user_id)
            .execute(&self.pool)
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict {
                what: format!("user {user_id} already belongs to a vendor"),
            }),
            Err(e) if is_foreign_key_violation(&e) => Err(StoreError::NotFound {
                what: format!("vendor {vendor} or user {user_id}"),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The user ids of a vendor's members.
    pub async fn vendor_members(&self, vendor: &str) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> =
            sqlx::query_scalar("SELECT user_id FROM vendor_members WHERE vendor = $1")
                .bind(vendor)
                .fetch_all(&self.pool)
                .await?;
        ids.sort();
        Ok(ids)
    }

    /// The vendor a user belongs to, if any.
    pub async fn vendor_of_user(&self, user_id: &str) -> Result<Option<Vendor>, StoreError> {
        let cols = VENDOR_COLUMNS
            .split(", ")
            .map(|c| format!("v.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let row = sqlx::query(&format!(
            "SELECT {cols} FROM vendors v JOIN vendor_members m ON m.vendor = v.name \
             WHERE m.user_id = $1"
        ))
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(vendor_from_row).transpose()
    }

    /// Records a new, pending request and returns it with its number.
    pub async fn insert_access_request(
        &self,
        r: &NewAccessRequest,
    ) -> Result<AccessRequestRow, StoreError> {
        if r.until_ms <= r.from_ms {
            return Err(StoreError::Invalid {
                what: "an access request's window must end after it starts".into(),
            });
        }
        for _ in 0..ID_ATTEMPTS {
            let id: i64 =
                sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) + 1 FROM access_requests")
                    .fetch_one(&self.pool)
                    .await?;
            let result = sqlx::query(&format!(
                "INSERT INTO access_requests ({REQUEST_COLUMNS}) VALUES \
                 ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, NULL, NULL, NULL, NULL, NULL) \
                 RETURNING {REQUEST_COLUMNS}"
            ))
            .bind(id)
            .bind(r.user_id.as_str())
            .bind(r.device_id.as_str())
            .bind(r.resource.as_str())
            .bind(r.from_ms)
            .bind(r.until_ms)
            .bind(r.reason.as_str())
            .bind(r.ticket.as_deref())
            .bind(r.created_ms)
            .fetch_one(&self.pool)
            .await;
            match result {
                Ok(row) => return request_from_row(&row),
                Err(e) if is_unique_violation(&e) => continue,
                Err(e) if is_foreign_key_violation(&e) => {
                    return Err(StoreError::NotFound {
                        what: format!("user {} or device {}", r.user_id, r.device_id),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict {
            what: "could not number the access request (too many at once); try again".into(),
        })
    }

    /// One request.
    pub async fn access_request(&self, id: i64) -> Result<Option<AccessRequestRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {REQUEST_COLUMNS} FROM access_requests WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(request_from_row).transpose()
    }

    /// Requests, newest first: all, or only those in `state`.
    pub async fn list_access_requests(
        &self,
        state: Option<RequestState>,
    ) -> Result<Vec<AccessRequestRow>, StoreError> {
        let rows = match state {
            Some(s) => {
                sqlx::query(&format!(
                    "SELECT {REQUEST_COLUMNS} FROM access_requests WHERE state = $1 \
                     ORDER BY id DESC"
                ))
                .bind(s.as_str())
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {REQUEST_COLUMNS} FROM access_requests ORDER BY id DESC"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(request_from_row).collect()
    }

    /// A user's requests, newest first (for `wardgate status`).
    pub async fn access_requests_of_user(
        &self,
        user_id: &str,
    ) -> Result<Vec<AccessRequestRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {REQUEST_COLUMNS} FROM access_requests WHERE user_id = $1 ORDER BY id DESC"
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(request_from_row).collect()
    }

    /// Moves request `id` to `d.to` if its state allows ([`RequestState::can_become`]) and
    /// returns it as changed; `None` if it does not exist or its state does not allow the
    /// move (someone else decided first).
    pub async fn decide_access_request(
        &self,
        id: i64,
        d: &RequestDecision,
    ) -> Result<Option<AccessRequestRow>, StoreError> {
        let from = RequestState::sources(d.to);
        if from.is_empty() {
            return Ok(None);
        }
        let row = sqlx::query(&format!(
            "UPDATE access_requests SET state = $1, decided_ms = $2, decided_by = $3, \
             approver_user_id = COALESCE($4, approver_user_id), \
             decision_reason = COALESCE($5, decision_reason) \
             WHERE id = $6 AND state IN ({}) RETURNING {REQUEST_COLUMNS}",
            state_list(&from)
        ))
        .bind(d.to.as_str())
        .bind(d.at_ms)
        .bind(d.by.as_str())
        .bind(d.approver_user_id.as_deref())
        .bind(d.reason.as_deref())
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(request_from_row).transpose()
    }

    /// The approved requests of `user_id` on `device_id` whose window has not ended at
    /// `now_ms` (open or upcoming): the facts for an approval condition.
    pub async fn approved_windows(
        &self,
        user_id: &str,
        device_id: &str,
        now_ms: i64,
    ) -> Result<Vec<AccessRequestRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {REQUEST_COLUMNS} FROM access_requests WHERE user_id = $1 \
             AND device_id = $2 AND state = 'approved' AND until_ms > $3 ORDER BY from_ms"
        ))
        .bind(user_id)
        .bind(device_id)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(request_from_row).collect()
    }

    /// Marks every pending or approved request whose window ended by `now_ms` as expired and
    /// returns them (each exactly once, across replicas).
    pub async fn expire_access_requests(
        &self,
        now_ms: i64,
    ) -> Result<Vec<AccessRequestRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "UPDATE access_requests SET state = 'expired', decided_ms = $1, \
             decided_by = 'system' WHERE state IN ('pending', 'approved') AND until_ms <= $1 \
             RETURNING {REQUEST_COLUMNS}"
        ))
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(request_from_row).collect()
    }

    /// Approved requests whose window is open and ends within `lead_ms` of `now_ms` and
    /// whose notice has not gone out; each is marked as noticed and returned exactly once.
    pub async fn take_ending_requests(
        &self,
        now_ms: i64,
        lead_ms: i64,
    ) -> Result<Vec<AccessRequestRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "UPDATE access_requests SET notice_sent_ms = $1 WHERE state = 'approved' \
             AND notice_sent_ms IS NULL AND from_ms <= $1 AND until_ms > $1 \
             AND until_ms <= $2 RETURNING {REQUEST_COLUMNS}"
        ))
        .bind(now_ms)
        .bind(now_ms.saturating_add(lead_ms))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(request_from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::RequestState::{self, *};

    #[test]
    fn the_request_state_machine_only_moves_forward() {
        // (from, to, allowed)
        let table = [
            (Pending, Approved, true),
            (Pending, Denied, true),
            (Pending, Revoked, true),
            (Pending, Expired, true),
            (Pending, Pending, false),
            (Approved, Revoked, true),
            (Approved, Expired, true),
            (Approved, Denied, false),
            (Approved, Approved, false),
            (Approved, Pending, false),
            (Denied, Approved, false),
            (Denied, Revoked, false),
            (Revoked, Approved, false),
            (Revoked, Expired, false),
            (Expired, Approved, false),
            (Expired, Revoked, false),
        ];
        for (from, to, ok) in table {
            assert_eq!(from.can_become(to), ok, "{from} → {to}");
        }
        assert_eq!(RequestState::sources(Approved), [Pending]);
        assert_eq!(RequestState::sources(Revoked), [Pending, Approved]);
        for s in [Pending, Approved, Denied, Revoked, Expired] {
            assert_eq!(s.as_str().parse::<RequestState>().ok(), Some(s));
        }
    }
}
