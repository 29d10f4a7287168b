//! Checking live OIDC sessions at their provider (S8): every `session.refresh_interval` the
//! controller redeems each session's refresh token. The provider refusing the grant
//! (`invalid_grant`: account disabled, token revoked) ends the session and its grants at the
//! gateways, and the device is told why. A provider that is down or failing ends nothing:
//! a hospital's IdP outage must not cut clinicians off; the failure is logged and audited
//! once per streak, and the session is retried with backoff.
//!
//! Per provider, at most [`PER_PROVIDER_PER_ROUND`] refreshes are made per round (one round
//! a second), and after a transient failure the provider's other due sessions wait for the
//! same backoff instead of each finding out on their own: a slow or struggling IdP sees a
//! trickle, not a stampede.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tracing::{info, warn};
use wardgate_common::unix_ms;

use crate::identity::{TokenError, retry_delay};
use crate::service::Controller;
use crate::store::SessionRefresh;

/// The reason a session ends when its provider refuses the refresh; the device is told it.
pub const DISABLED_AT_PROVIDER: &str = "your account was disabled at the identity provider";

/// Refreshes per provider per round.
pub const PER_PROVIDER_PER_ROUND: usize = 20;
/// Sessions claimed per round (all providers).
const CLAIM_LIMIT: i64 = 200;
/// How long a claimed session is left alone by other replicas while one refreshes it.
const LEASE: Duration = Duration::from_secs(60);

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// What a round did (for logs and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RefreshRound {
    /// Refreshed fine.
    pub refreshed: usize,
    /// Ended because the provider refused.
    pub ended: usize,
    /// Failed transiently (kept).
    pub failed: usize,
    /// Put off to a later round.
    pub postponed: usize,
}

impl Controller {
    /// One round: refreshes the sessions that are due. Run every second by `serve`.
    pub async fn refresh_sessions(&self) -> RefreshRound {
        let mut round = RefreshRound::default();
        let (Some(verifier), Some(sealer)) = (self.verifier.as_ref(), self.sealer.as_ref()) else {
            return round;
        };
        let interval = match self.identity_settings().await {
            Ok(s) => s.refresh_interval,
            Err(e) => {
                warn!(error = %e, "cannot read the session refresh interval");
                return round;
            }
        };
        let now = now_ms();
        let due = match self
            .store
            .claim_due_refreshes(now, ms(LEASE), CLAIM_LIMIT)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot list the sessions due for a refresh");
                return round;
            }
        };
        let mut spent: HashMap<String, usize> = HashMap::new();
        let mut resting: HashMap<String, i64> = HashMap::new();
        for r in due {
            let later = match resting.get(&r.provider) {
                Some(until) => Some(*until),
                None if spent.get(&r.provider).copied().unwrap_or(0) >= PER_PROVIDER_PER_ROUND => {
                    Some(now.saturating_add(1000))
                }
                None => None,
            };
            if let Some(at) = later {
                round.postponed += 1;
                if let Err(e) = self.store.refresh_postponed(&r.session_id, at).await {
                    warn!(error = %e, session = %r.session_id, "cannot postpone a refresh");
                }
                continue;
            }
            *spent.entry(r.provider.clone()).or_default() += 1;
            let token = match sealer.open(&r.session_id, &r.token_sealed) {
                Ok(t) => t,
                Err(e) => {
                    // The key file was replaced or the row damaged: the session can no longer
                    // be checked, so it ends (closed, not open, on doubt).
                    warn!(error = %e, session = %r.session_id, "cannot open a stored refresh token");
                    self.end_refused_session(
                        &r,
                        "the controller can no longer check this sign-in at the identity provider",
                        json!({"error": e.to_string()}),
                        "log in again: run `wardgate login`",
                    )
                    .await;
                    round.ended += 1;
                    continue;
                }
            };
            match verifier.refresh(&r.provider, &r.client_id, &token).await {
                Ok(next_token) => {
                    let sealed = match sealer.seal(&r.session_id, &next_token) {
                        Ok(s) => s,
                        Err(e) => {
                            warn!(error = %e, "cannot seal a refresh token");
                            continue;
                        }
                    };
                    let next = now_ms().saturating_add(ms(interval));
                    if let Err(e) = self
                        .store
                        .refresh_succeeded(&r.session_id, &sealed, next)
                        .await
                    {
                        warn!(error = %e, session = %r.session_id, "cannot record a refresh");
                    }
                    if r.failures > 0 {
                        info!(provider = %r.provider, session = %r.session_id, failures = r.failures,
                              "session refresh works again");
                        let _ = self
                            .audit(
                                "system",
                                "session.refresh",
                                &r.session_id,
                                "ok",
                                json!({"provider": r.provider, "resumed_after_failures": r.failures}),
                            )
                            .await;
                    }
                    round.refreshed += 1;
                }
                Err(e) if e.is_invalid_grant() => {
                    let (error, description) = match &e {
                        TokenError::Refused {
                            error, description, ..
                        } => (error.clone(), description.clone()),
                        other => (other.to_string(), String::new()),
                    };
                    self.end_refused_session(
                        &r,
                        DISABLED_AT_PROVIDER,
                        json!({"provider_error": error, "provider_error_description": description}),
                        "contact your IT helpdesk",
                    )
                    .await;
                    round.ended += 1;
                }
                Err(e) => {
                    let failures = r.failures.saturating_add(1);
                    let delay = retry_delay(failures, interval);
                    let at = now_ms().saturating_add(ms(delay));
                    warn!(provider = %r.provider, session = %r.session_id, failures, retry_in = ?delay,
                          error = %e, "cannot refresh the session at its identity provider; it stays, retrying");
                    if r.failures == 0 {
                        // Once per streak: an outage must show in the audit log without
                        // filling it.
                        let _ = self
                            .audit(
                                "system",
                                "session.refresh",
                                &r.session_id,
                                "error",
                                json!({"provider": r.provider, "error": e.to_string(),
                                       "transient": e.is_transient()}),
                            )
                            .await;
                    }
                    let error: String = e.to_string().chars().take(500).collect();
                    if let Err(se) = self
                        .store
                        .refresh_failed(&r.session_id, failures, &error, at)
                        .await
                    {
                        warn!(error = %se, session = %r.session_id, "cannot record a failed refresh");
                    }
                    resting.insert(r.provider.clone(), at);
                    round.failed += 1;
                }
            }
        }
        round
    }

    /// Ends the session of `r` (once, whoever gets there first), audits `session.end` with
    /// the provider's answer, and ends the device's grants at the gateways telling it why.
    async fn end_refused_session(
        &self,
        r: &SessionRefresh,
        reason: &str,
        provider_detail: serde_json::Value,
        hint: &str,
    ) {
        let ended = match self
            .store
            .end_session(&r.session_id, reason, now_ms())
            .await
        {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, session = %r.session_id, "cannot end a session the provider refused");
                return;
            }
        };
        warn!(provider = %r.provider, session = %ended.id, user = %ended.user_id, device = %ended.device_id,
              reason, "session ended: the identity provider refused its refresh");
        let mut detail = json!({"reason": reason, "device": ended.device_id, "user": ended.user_id,
                                "provider": r.provider});
        if let (Some(d), Some(p)) = (detail.as_object_mut(), provider_detail.as_object()) {
            d.extend(p.clone());
        }
        if let Err(e) = self
            .audit("system", "session.end", &ended.id, "ok", detail)
            .await
        {
            warn!(error = %e, session = %ended.id, "cannot audit a session end");
        }
        match self
            .store
            .active_grants_for_device(&ended.device_id, now_ms())
            .await
        {
            Ok(grants) => {
                self.end_grants(grants, &format!("{reason}; {hint}"), "system", true)
                    .await;
            }
            Err(e) => {
                warn!(error = %e, device = %ended.device_id, "cannot list grants of an ended session");
            }
        }
    }
}
