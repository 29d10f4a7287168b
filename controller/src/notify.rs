//! Notifications: events (break-glass, grant terminations, and whatever else calls
//! [`Controller::notify`]) POSTed as signed JSON to the configured webhook sinks.
//!
//! **Never on the decision path.** [`Controller::notify`] is synchronous and only puts the
//! event on a bounded in-memory queue (`try_send`); a decision never waits for a sink, a
//! slow network or even the database write of the outbox. A full queue (a burst while the
//! store is slow) spills the event to a task that writes it to the outbox directly, so the
//! caller still does not wait and the event is not lost.
//!
//! **Durable.** The worker ([`run`]) turns each event into one outbox row per sink
//! (`webhook_outbox`, migration 0006) before trying to deliver it, so an event survives a
//! controller restart between enqueue and delivery (it is lost only if the process dies in
//! the few milliseconds between `notify` and that write).
//!
//! **Signed.** Each attempt sends `X-Wardgate-Timestamp: <unix seconds>` and
//! `X-Wardgate-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`: the
//! timestamp is inside the MAC, so a receiver that refuses old timestamps cannot be fed a
//! recorded delivery later. `X-Wardgate-Event` carries the event id for de-duplication
//! (delivery is at least once: a sink that answered too slowly gets the event again).
//!
//! **Retried** with exponential backoff and equal jitter ([`backoff_ms`]), capped, up to
//! `webhook.max_attempts` (setting, default 10); then the row is marked failed and the
//! give-up is audited (`webhook.give_up`). Secrets are never logged: errors name the sink by
//! id and URL only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use wardgate_common::unix_ms;

use crate::service::Controller;
use crate::shutdown::CancelToken;
use crate::store::{OutboxOutcome, OutboxRow, Store, StoreError, Webhook};

/// Events waiting in memory for the worker; beyond this they spill straight to the outbox.
pub const QUEUE_CAPACITY: usize = 1024;
/// First retry delay (before jitter), ms.
pub const BACKOFF_BASE_MS: u64 = 500;
/// Longest retry delay, ms.
pub const BACKOFF_CAP_MS: u64 = 30_000;
/// How long one delivery attempt may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a claimed row is leased to the worker that claimed it.
const LEASE_MS: i64 = 30_000;
/// How often the worker looks at the outbox even when nothing woke it (rows written by
/// another replica, leases run out).
const IDLE_POLL: Duration = Duration::from_secs(5);
/// Rows delivered per round.
const BATCH: i64 = 32;
/// Setting: attempts per event and sink before giving up.
pub const SETTING_MAX_ATTEMPTS: &str = "webhook.max_attempts";
/// Default of [`SETTING_MAX_ATTEMPTS`].
pub const DEFAULT_MAX_ATTEMPTS: i64 = 10;
/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "X-Wardgate-Signature";
/// Header carrying the signed timestamp (unix seconds).
pub const TIMESTAMP_HEADER: &str = "X-Wardgate-Timestamp";
/// Header carrying the event id.
pub const EVENT_HEADER: &str = "X-Wardgate-Event";
/// Header carrying which attempt this is (1 = first), for the receiver's diagnostics.
pub const ATTEMPT_HEADER: &str = "X-Wardgate-Attempt";

/// Event types other features use.
pub mod kind {
    /// Someone broke glass.
    pub const BREAK_GLASS: &str = "break_glass";
    /// A break-glass event was reviewed.
    pub const BREAK_GLASS_REVIEWED: &str = "break_glass.reviewed";
    /// A grant ended early (revoked, posture, policy change, session end) or expired.
    pub const GRANT_TERMINATED: &str = "grant.terminated";
    /// A grant was handed out as a WireGuard configuration.
    pub const WIREGUARD_EXPORT: &str = "grant.wireguard_export";
    /// A user asked for an access window.
    pub const REQUEST_CREATED: &str = "request.created";
    /// An approver approved an access request.
    pub const REQUEST_APPROVED: &str = "request.approved";
    /// An approver denied an access request.
    pub const REQUEST_DENIED: &str = "request.denied";
    /// An approved access request was revoked (its live grants end).
    pub const REQUEST_REVOKED: &str = "request.revoked";
}

/// One event as sinks receive it (the JSON body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique id (`ev_…`); the same for every sink and every retry.
    pub id: String,
    /// What happened (see [`kind`]).
    #[serde(rename = "type")]
    pub kind: String,
    /// When, RFC 3339 UTC.
    pub at: String,
    /// Who caused it (`user:ben`, `admin:…`, `system`).
    pub actor: String,
    /// What it is about (a resource, a grant id).
    pub subject: String,
    /// The rest.
    pub detail: serde_json::Value,
}

/// The in-memory half of the notifier: the queue [`Controller::notify`] puts events on.
pub struct Notifier {
    tx: mpsc::Sender<Event>,
    rx: Mutex<Option<mpsc::Receiver<Event>>>,
    wake: tokio::sync::Notify,
}

impl Default for Notifier {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
            wake: tokio::sync::Notify::new(),
        }
    }
}

fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

fn random_id(prefix: &str) -> String {
    let bytes: [u8; 12] = rand::thread_rng().r#gen();
    format!("{prefix}{}", hex::encode(bytes))
}

fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_string()
}

/// `sha256=<hex>` of HMAC-SHA256 over `"<timestamp>.<body>"`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex::encode(ctx.sign().as_ref()))
}

/// Checks a signature in constant time (for receivers written in Rust, and the tests).
pub fn verify(secret: &[u8], timestamp: i64, body: &[u8], header: &str) -> bool {
    let Some(hex_mac) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(mac) = hex::decode(hex_mac) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut msg = timestamp.to_string().into_bytes();
    msg.push(b'.');
    msg.extend_from_slice(body);
    ring::hmac::verify(&key, &msg, &mac).is_ok()
}

/// The delay before attempt `attempt + 1` after `attempt` failures (1-based): exponential
/// from `base_ms`, capped at `cap_ms`, with equal jitter (half fixed, half random, `unit` in
/// `[0, 1)`), so sinks coming back are not hit by every controller at once but the delay
/// never collapses to zero.
pub fn backoff_ms(attempt: u32, base_ms: u64, cap_ms: u64, unit: f64) -> u64 {
    let exp = base_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(30))
        .min(cap_ms);
    let half = exp / 2;
    // `unit` is in [0, 1): the product is below `half`, so the cast cannot overflow.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let jitter = (half as f64 * unit.clamp(0.0, 1.0)) as u64;
    half + jitter
}

/// Whether a sink URL is acceptable: http or https, with a host, without credentials in it.
pub fn check_url(url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!(
            "the webhook URL must be http or https, not {}",
            u.scheme()
        ));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err("the webhook URL has no host".into());
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("put no credentials in the webhook URL; the signature authenticates".into());
    }
    Ok(())
}

impl Controller {
    /// Tells every webhook sink that `kind` happened to `subject`, as `system`. Returns at once
    /// (see the module docs): call it from any decision path.
    pub fn notify(&self, kind: &str, subject: &str, detail: serde_json::Value) {
        self.notify_by("system", kind, subject, detail);
    }

    /// [`Controller::notify`] with the actor named.
    pub fn notify_by(&self, actor: &str, kind: &str, subject: &str, detail: serde_json::Value) {
        let event = Event {
            id: random_id("ev_"),
            kind: kind.to_owned(),
            at: rfc3339(now_ms()),
            actor: actor.to_owned(),
            subject: subject.to_owned(),
            detail,
        };
        match self.notifier.tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                // Spill: written by a task of its own, so the caller still does not wait.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let store = self.store.clone();
                    rt.spawn(async move {
                        if let Err(e) = persist(&store, std::slice::from_ref(&event)).await {
                            warn!(event = %event.id, error = %e, "cannot write a webhook event to the outbox; it is lost");
                        }
                    });
                    self.notifier.wake.notify_one();
                } else {
                    warn!(event = %event.id, "webhook queue full outside a runtime; event dropped");
                }
            }
            Err(mpsc::error::TrySendError::Closed(event)) => {
                warn!(event = %event.id, "webhook queue closed; event dropped");
            }
        }
    }
}

/// Writes one outbox row per event and sink.
async fn persist(store: &Store, events: &[Event]) -> Result<(), StoreError> {
    let sinks = store.list_webhooks().await?;
    if sinks.is_empty() {
        debug!(events = events.len(), "no webhook sinks; events not kept");
        return Ok(());
    }
    let now = now_ms();
    let mut rows = Vec::with_capacity(events.len() * sinks.len());
    for e in events {
        let body = serde_json::to_string(e).map_err(|err| StoreError::Invalid {
            what: format!("event {} cannot be encoded: {err}", e.id),
        })?;
        for s in &sinks {
            rows.push(OutboxRow {
                id: random_id("ob_"),
                event_id: e.id.clone(),
                webhook_id: s.id.clone(),
                body: body.clone(),
                attempts: 0,
                next_ms: now,
                created_ms: now,
                delivered_ms: None,
                failed_ms: None,
                last_error: None,
            });
        }
    }
    store.insert_outbox(&rows).await
}

/// Runs the notifier until `cancel` fires: moves queued events into the outbox and delivers
/// due outbox rows. Started once per controller process (a second call returns at once).
pub async fn run(ctl: std::sync::Arc<Controller>, mut cancel: CancelToken) {
    let Some(mut rx) = ctl.notifier.rx.lock().ok().and_then(|mut r| r.take()) else {
        return;
    };
    let http = match http_client() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "webhook delivery disabled: no HTTP client");
            return;
        }
    };
    let mut pending: Vec<Event> = Vec::new();
    let mut next_wake = tokio::time::Instant::now();
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => pending.push(ev),
                None => return,
            },
            _ = ctl.notifier.wake.notified() => {}
            _ = tokio::time::sleep_until(next_wake) => {}
            _ = cancel.cancelled() => return,
        }
        while let Ok(ev) = rx.try_recv() {
            pending.push(ev);
        }
        if !pending.is_empty() {
            match persist(&ctl.store, &pending).await {
                Ok(()) => pending.clear(),
                // Kept in memory and tried again next round.
                Err(e) => {
                    warn!(error = %e, events = pending.len(), "cannot write webhook events to the outbox; will retry")
                }
            }
        }
        deliver_due(&ctl, &http).await;
        let now = now_ms();
        let due = match ctl.store.next_outbox_due().await {
            Ok(Some(ms)) => Duration::from_millis(u64::try_from(ms - now).unwrap_or(0)),
            _ => IDLE_POLL,
        };
        let wait = if pending.is_empty() {
            due.min(IDLE_POLL)
        } else {
            Duration::from_millis(BACKOFF_BASE_MS)
        };
        next_wake = tokio::time::Instant::now() + wait;
    }
}

fn http_client() -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    crate::identity::http_client(roots, ATTEMPT_TIMEOUT).map_err(|e| e.to_string())
}

/// Delivers every due row once (concurrently), recording the outcome of each.
async fn deliver_due(ctl: &std::sync::Arc<Controller>, http: &reqwest::Client) {
    let now = now_ms();
    let rows = match ctl.store.due_outbox(now, BATCH).await {
        Ok(r) if r.is_empty() => return,
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot read the webhook outbox");
            return;
        }
    };
    let sinks: HashMap<String, Webhook> = match ctl.store.list_webhooks().await {
        Ok(s) => s.into_iter().map(|w| (w.id.clone(), w)).collect(),
        Err(e) => {
            warn!(error = %e, "cannot read the webhook sinks");
            return;
        }
    };
    let max_attempts = match ctl.store.get_setting(SETTING_MAX_ATTEMPTS).await {
        Ok(Some(v)) => v.parse().unwrap_or(DEFAULT_MAX_ATTEMPTS),
        _ => DEFAULT_MAX_ATTEMPTS,
    };
    let mut set = tokio::task::JoinSet::new();
    for row in rows {
        match ctl
            .store
            .claim_outbox(&row.id, row.next_ms, now + LEASE_MS)
            .await
        {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                warn!(error = %e, "cannot claim a webhook outbox row");
                continue;
            }
        }
        let sink = sinks.get(&row.webhook_id).cloned();
        let (ctl, http) = (ctl.clone(), http.clone());
        set.spawn(async move {
            let result = match &sink {
                Some(s) => attempt(&http, s, &row).await,
                None => Err("the webhook was removed".to_owned()),
            };
            record(&ctl, &row, sink.as_ref(), result, max_attempts).await;
        });
    }
    while set.join_next().await.is_some() {}
}

/// One POST.
async fn attempt(http: &reqwest::Client, sink: &Webhook, row: &OutboxRow) -> Result<(), String> {
    let ts = now_ms() / 1000;
    let sig = signature(sink.secret.as_bytes(), ts, row.body.as_bytes());
    let resp = http
        .post(&sink.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(TIMESTAMP_HEADER, ts.to_string())
        .header(SIGNATURE_HEADER, sig)
        .header(EVENT_HEADER, row.event_id.as_str())
        .header(ATTEMPT_HEADER, (row.attempts + 1).to_string())
        .body(row.body.clone())
        .send()
        .await
        .map_err(|e| format!("cannot reach the sink: {}", e.without_url()))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("the sink answered HTTP {}", resp.status().as_u16()))
    }
}

async fn record(
    ctl: &Controller,
    row: &OutboxRow,
    sink: Option<&Webhook>,
    result: Result<(), String>,
    max_attempts: i64,
) {
    let attempts = row.attempts + 1;
    let now = now_ms();
    let url = sink.map(|s| s.url.as_str()).unwrap_or("");
    let outcome = match &result {
        Ok(()) => {
            info!(event = %row.event_id, webhook = %row.webhook_id, attempts, "webhook delivered");
            OutboxOutcome::Delivered
        }
        Err(e) if attempts >= max_attempts || sink.is_none() => {
            warn!(event = %row.event_id, webhook = %row.webhook_id, url, attempts, error = %e, "webhook delivery given up");
            OutboxOutcome::GaveUp { error: e }
        }
        Err(e) => {
            let unit: f64 = rand::thread_rng().r#gen();
            let wait = backoff_ms(
                u32::try_from(attempts).unwrap_or(u32::MAX),
                BACKOFF_BASE_MS,
                BACKOFF_CAP_MS,
                unit,
            );
            debug!(event = %row.event_id, webhook = %row.webhook_id, url, attempts, error = %e, wait_ms = wait, "webhook delivery failed; will retry");
            OutboxOutcome::Retry {
                next_ms: now + i64::try_from(wait).unwrap_or(i64::MAX / 2),
                error: e,
            }
        }
    };
    if let Err(e) = ctl
        .store
        .record_outbox_attempt(&row.id, attempts, outcome, now)
        .await
    {
        warn!(error = %e, "cannot record a webhook attempt");
    }
    if let (OutboxOutcome::GaveUp { error }, true) = (outcome, result.is_err()) {
        let _ = ctl
            .audit(
                "system",
                "webhook.give_up",
                &row.webhook_id,
                "error",
                json!({"event": row.event_id, "attempts": attempts, "error": error, "url": url}),
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn signature_covers_timestamp_and_body() {
        let s = signature(b"k3y", 1_700_000_000, br#"{"a":1}"#);
        assert!(s.starts_with("sha256=") && s.len() == 7 + 64, "{s}");
        assert!(verify(b"k3y", 1_700_000_000, br#"{"a":1}"#, &s));
        assert!(
            !verify(b"k3y", 1_700_000_001, br#"{"a":1}"#, &s),
            "timestamp is in the MAC"
        );
        assert!(
            !verify(b"k3y", 1_700_000_000, br#"{"a":2}"#, &s),
            "body is in the MAC"
        );
        assert!(
            !verify(b"other", 1_700_000_000, br#"{"a":1}"#, &s),
            "key matters"
        );
        assert!(!verify(b"k3y", 1_700_000_000, br#"{"a":1}"#, "sha1=00"));
        // RFC 4231 test case 2 (key "Jefe"), to pin the algorithm itself.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        let tag = ring::hmac::sign(&key, b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(tag.as_ref()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_grows_exponentially_with_jitter_and_is_capped() {
        assert_eq!(backoff_ms(1, 500, 30_000, 0.0), 250);
        assert_eq!(backoff_ms(1, 500, 30_000, 0.999_999), 499);
        assert_eq!(backoff_ms(2, 500, 30_000, 0.0), 500);
        assert_eq!(backoff_ms(3, 500, 30_000, 0.0), 1_000);
        assert_eq!(
            backoff_ms(10, 500, 30_000, 0.0),
            15_000,
            "capped at 30 s, half fixed"
        );
        assert_eq!(backoff_ms(64, 500, 30_000, 0.5), 22_500, "no overflow");
        for a in 1..20 {
            let lo = backoff_ms(a, 500, 30_000, 0.0);
            let hi = backoff_ms(a, 500, 30_000, 0.999);
            assert!(lo <= hi && hi <= 30_000 && lo >= 250);
        }
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(check_url("https://siem.example/wardgate").is_ok());
        assert!(check_url("ftp://x/").is_err());
        assert!(check_url("https://user:pw@x/").is_err());
        assert!(check_url("not a url").is_err());
    }

    #[tokio::test]
    async fn the_queue_never_blocks_and_spills_to_the_outbox_when_full() {
        let store = Store::open("sqlite::memory:").await.expect("store");
        store
            .insert_webhook(&Webhook {
                id: "wh_1".into(),
                url: "http://127.0.0.1:9/".into(),
                secret: "s".into(),
                created_ms: 1,
            })
            .await
            .expect("webhook");
        let new = crate::ca::Ca::generate("Test").expect("ca");
        let ca = crate::ca::Ca::load(&new.cert_pem, &new.key_pem).expect("load");
        let ctl = Controller::new(store.clone(), ca);
        // No worker runs: the queue fills, then events spill to the outbox, and notify
        // never waits.
        let t0 = std::time::Instant::now();
        for i in 0..(QUEUE_CAPACITY + 10) {
            ctl.notify(kind::GRANT_TERMINATED, &i.to_string(), json!({}));
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        let spilled = async {
            loop {
                let n = store.list_outbox().await.expect("outbox").len();
                if n == 10 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), spilled)
            .await
            .expect("the 10 events beyond the queue reach the outbox");
    }
}
