//! The gateway's control connection: joining once, then one long-lived, mutually
//! authenticated QUIC connection to the controller with heartbeats, re-dialled with
//! exponential backoff and jitter when it drops.

use std::time::Duration;

use tracing::{info, warn};
use wardgate_common::proto::{
    DropCount, ErrorCode, JoinGateway, MAX_DROP_ROWS, Request, Response, Secret,
};
use wardgate_common::transport::{ClientError, ControlClient};
use wardgate_common::{files, keys, pki, tls};

use crate::state::{Registration, StateDir, StateError};

/// Why joining or running failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// State directory problem.
    #[error(transparent)]
    State(#[from] StateError),
    /// File problem.
    #[error(transparent)]
    File(#[from] files::FileError),
    /// Certificate or key problem.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// TLS set-up problem.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The controller could not be reached or refused.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The controller answered something unexpected.
    #[error("unexpected answer from the controller: {0}")]
    Unexpected(String),
    /// The controller says this gateway may not connect any more; retrying won't help.
    #[error("the controller refused this gateway for good: {0}")]
    Refused(String),
}

/// Options of `wardgate-gateway join`.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Controller `host:port`.
    pub controller: String,
    /// The controller's CA certificate (PEM bytes).
    pub ca_pem: Vec<u8>,
    /// The single-use join token.
    pub token: Secret,
    /// Where clients reach this gateway's WireGuard port.
    pub endpoint: String,
    /// Networks to serve (empty: those the token names).
    pub networks: Vec<String>,
}

fn software() -> String {
    format!("wardgate-gateway {}", wardgate_common::SOFTWARE_VERSION)
}

/// Joins the controller: makes the keys here, sends only public halves and the token, stores
/// the certificate. Returns the registration.
pub async fn join(dir: &StateDir, opts: JoinOptions) -> Result<Registration, ControlError> {
    if dir.registration().exists() {
        return Err(StateError::AlreadyJoined(dir.root().to_path_buf()).into());
    }
    files::create_private_dir(dir.root())?;
    let ca = pki::certs_from_pem("CA certificate", &opts.ca_pem)?
        .into_iter()
        .next()
        .ok_or_else(|| ControlError::Unexpected("empty CA file".into()))?;
    // Keys first, on disk, 0600: if the join fails they are simply reused next time.
    let wg = if dir.wg_key().exists() {
        keys::decode_private(&String::from_utf8_lossy(&files::read_secret(
            &dir.wg_key(),
        )?))
        .map_err(|e| ControlError::Unexpected(e.to_string()))?
    } else {
        let k = keys::generate_private();
        files::write_secret(&dir.wg_key(), keys::encode_key(&k.to_bytes()).as_bytes())?;
        k
    };
    let kc = pki::generate_key_and_csr("wardgate gateway")?;
    files::write_secret(&dir.key(), kc.key_pem.as_bytes())?;
    let cfg = tls::client_config(&ca, None)?;
    let mut client = ControlClient::connect(&opts.controller, cfg, &software()).await?;
    let answer = client
        .request(Request::JoinGateway(JoinGateway {
            token: opts.token,
            csr_pem: kc.csr_pem,
            wg_public_key: keys::public_of(&wg),
            endpoint: opts.endpoint.clone(),
            networks: opts.networks,
        }))
        .await;
    client.close().await;
    match answer? {
        Response::Joined {
            gateway_id,
            name,
            networks,
            cert_pem,
            ca_pem,
        } => {
            files::write_public(&dir.ca(), ca_pem.as_bytes())?;
            files::write_public(&dir.cert(), cert_pem.as_bytes())?;
            let reg = Registration {
                gateway_id,
                name,
                controller: opts.controller,
                endpoint: opts.endpoint,
                networks,
            };
            dir.save(&reg)?;
            Ok(reg)
        }
        other => Err(ControlError::Unexpected(format!("{other:?}"))),
    }
}

/// The mTLS client configuration from the state directory.
pub fn client_config(dir: &StateDir) -> Result<quinn::ClientConfig, ControlError> {
    let ca = pki::certs_from_pem("CA certificate", &files::read_public(&dir.ca())?)?
        .into_iter()
        .next()
        .ok_or_else(|| ControlError::Unexpected("empty CA file".into()))?;
    let chain = pki::certs_from_pem("gateway certificate", &files::read_public(&dir.cert())?)?;
    let key = pki::key_from_pem("gateway key", &files::read_secret(&dir.key())?)?;
    Ok(tls::client_config(&ca, Some((chain, key)))?)
}

/// Reconnection delays: doubling from `min` to `max`, with ±20 % jitter so a fleet of gateways
/// does not reconnect in lockstep after a controller restart.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff between `min` and `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }
    /// The next delay, given a jitter sample in `[0, 1)`.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
    }
    /// Back to the shortest delay after a good connection.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Options of `wardgate-gateway run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Shortest reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(10),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Codes after which retrying is pointless: an administrator must act.
fn is_permanent(e: &ClientError) -> bool {
    e.wire().is_some_and(|w| {
        matches!(
            w.code,
            ErrorCode::CertificateRevoked
                | ErrorCode::CertificateUnknown
                | ErrorCode::UnsupportedVersion
        )
    })
}

/// Keeps the control connection up until `stop` resolves or the controller refuses this
/// gateway for good. With a data plane, every (re)connection first resyncs the full set of
/// live grants, then applies the controller's pushes and acks each; while cut off, the data
/// plane keeps enforcing what it has (expiry by its own clock) and accepts nothing new.
pub async fn run<F>(
    dir: &StateDir,
    opts: RunOptions,
    datapath: Option<crate::datapath::Handle>,
    stop: F,
) -> Result<(), ControlError>
where
    F: std::future::Future<Output = ()>,
{
    let reg = dir.load()?;
    let cfg = client_config(dir)?;
    let mut backoff = Backoff::new(opts.backoff_min, opts.backoff_max);
    tokio::pin!(stop);
    loop {
        let session = session(&reg, cfg.clone(), &opts, &mut backoff, datapath.as_ref());
        let outcome = tokio::select! {
            r = session => r,
            _ = &mut stop => return Ok(()),
        };
        match outcome {
            Err(e) if is_permanent(&e) => return Err(ControlError::Refused(e.to_string())),
            Err(e) => {
                let delay = backoff.next_delay(rand::random::<f64>());
                warn!(error = %e, retry_in = ?delay, "control connection lost");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut stop => return Ok(()),
                }
            }
            Ok(()) => {}
        }
    }
}

async fn session(
    reg: &Registration,
    cfg: quinn::ClientConfig,
    opts: &RunOptions,
    backoff: &mut Backoff,
    datapath: Option<&crate::datapath::Handle>,
) -> Result<(), ClientError> {
    let client = ControlClient::connect(&reg.controller, cfg, &software()).await?;
    let mut session = client.into_session();
    match session.request(Request::WhoAmI).await? {
        Response::Identity(id) => {
            info!(gateway = %reg.gateway_id, identity = ?id, "connected to the controller")
        }
        other => return Err(ClientError::Unexpected(format!("{other:?}"))),
    }
    if let Some(dp) = datapath {
        // Resync before anything else: the controller's list is the truth.
        match session.request(Request::SyncGrants).await? {
            Response::GatewayGrants { grants } => {
                let n = grants.len();
                let report = dp
                    .sync(grants)
                    .await
                    .map_err(|e| ClientError::Unexpected(e.to_string()))?;
                info!(
                    grants = n,
                    added = report.added,
                    removed = report.removed,
                    kept = report.kept,
                    refused = report.refused.len(),
                    "grants resynced"
                );
                for (id, why) in &report.refused {
                    warn!(grant = id, reason = %why, "grant from resync refused");
                }
            }
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
    backoff.reset();
    let mut seq = 0u64;
    let mut ledger = DropLedger::default();
    let mut tick = tokio::time::interval(opts.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                match session.request(Request::Heartbeat { seq }).await? {
                    Response::HeartbeatAck { seq: s, .. } if s == seq => {}
                    other => return Err(ClientError::Unexpected(format!("{other:?}"))),
                }
                if let Some(dp) = datapath
                    && let Ok(stats) = dp.stats().await
                {
                    let drops = ledger.delta(&stats);
                    if !drops.is_empty() {
                        match session.request(Request::ReportDrops { drops }).await? {
                            Response::Done => {}
                            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
                        }
                    }
                }
            }
            push = session.next_push() => {
                let Some((push_id, push)) = push else {
                    return Err(session.error());
                };
                let result = apply_push(datapath, push).await;
                session.ack(push_id, result).await;
            }
        }
    }
}

/// Turns the data plane's cumulative drop counters into the increments since the last report
/// (sans-IO: fed a [`crate::datapath::Stats`] snapshot, returns rows to send).
#[derive(Debug, Default)]
pub struct DropLedger {
    reported: std::collections::HashMap<(Option<u64>, String), u64>,
}

impl DropLedger {
    /// Rows that grew since the last call, at most [`MAX_DROP_ROWS`]; rows left over are
    /// sent next time (their baseline is not advanced).
    pub fn delta(&mut self, stats: &crate::datapath::Stats) -> Vec<DropCount> {
        let rows = stats
            .grants
            .iter()
            .flat_map(|g| {
                g.dropped
                    .iter()
                    .map(move |(r, n)| (Some(g.grant_id), r, *n))
            })
            .chain(stats.unattributed_drops.iter().map(|(r, n)| (None, r, *n)));
        let mut out = Vec::new();
        for (grant, reason, total) in rows {
            if out.len() == MAX_DROP_ROWS {
                break;
            }
            let seen = self.reported.entry((grant, reason.clone())).or_insert(0);
            // A counter that went down was reset (grant re-added): count from zero.
            let base = if total < *seen { 0 } else { *seen };
            if total > base {
                out.push(DropCount {
                    grant_id: grant,
                    reason: reason.clone(),
                    count: total - base,
                });
            }
            *seen = total;
        }
        out
    }
}

async fn apply_push(
    datapath: Option<&crate::datapath::Handle>,
    push: wardgate_common::proto::Push,
) -> Result<(), String> {
    use wardgate_common::proto::Push;
    let Some(dp) = datapath else {
        return Err("this gateway runs without a data plane".into());
    };
    match push {
        Push::AddGrant(g) => dp.add_grant(g).await.map_err(|e| e.to_string()),
        Push::RemoveGrant { grant_id, reason } => {
            info!(grant = grant_id, reason = %reason, "controller removed a grant");
            dp.remove_grant(grant_id)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Push::GrantEnded { .. } | Push::GrantEnding { .. } => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(
        grant_drops: &[(u64, &str, u64)],
        unattributed: &[(&str, u64)],
    ) -> crate::datapath::Stats {
        crate::datapath::Stats {
            grants: grant_drops
                .iter()
                .map(|(g, r, n)| crate::datapath::GrantStats {
                    grant_id: *g,
                    label: String::new(),
                    tunnel_addr: std::net::IpAddr::from([100, 64, 0, 2]),
                    expires_in_ms: 0,
                    out_packets: 0,
                    in_packets: 0,
                    dropped: vec![((*r).to_owned(), *n)],
                })
                .collect(),
            unattributed_drops: unattributed
                .iter()
                .map(|(r, n)| ((*r).to_owned(), *n))
                .collect(),
            wireguard_drops: Vec::new(),
            flows: 0,
        }
    }

    #[test]
    fn drop_ledger_reports_increments_once() {
        let mut l = DropLedger::default();
        let d = l.delta(&stats(
            &[(7, "port_not_granted", 5)],
            &[("unknown_peer", 2)],
        ));
        assert_eq!(
            d,
            vec![
                DropCount {
                    grant_id: Some(7),
                    reason: "port_not_granted".into(),
                    count: 5
                },
                DropCount {
                    grant_id: None,
                    reason: "unknown_peer".into(),
                    count: 2
                },
            ]
        );
        assert!(
            l.delta(&stats(
                &[(7, "port_not_granted", 5)],
                &[("unknown_peer", 2)]
            ))
            .is_empty()
        );
        let d = l.delta(&stats(
            &[(7, "port_not_granted", 9), (8, "spoofed_source", 1)],
            &[],
        ));
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].count, 4);
        assert_eq!(
            d[1],
            DropCount {
                grant_id: Some(8),
                reason: "spoofed_source".into(),
                count: 1
            }
        );
        // A counter that starts again from zero (grant re-added) is counted from zero.
        let d = l.delta(&stats(&[(7, "port_not_granted", 3)], &[]));
        assert_eq!(d[0].count, 3);
    }

    #[test]
    fn drop_ledger_caps_a_report_and_keeps_the_rest_for_later() {
        let mut l = DropLedger::default();
        let many: Vec<(u64, &str, u64)> =
            (0..1_500u64).map(|g| (g, "port_not_granted", 1)).collect();
        assert_eq!(l.delta(&stats(&many, &[])).len(), MAX_DROP_ROWS);
        assert_eq!(l.delta(&stats(&many, &[])).len(), 500);
        assert!(l.delta(&stats(&many, &[])).is_empty());
    }

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let d: Vec<_> = (0..6).map(|_| b.next_delay(0.5)).collect();
        assert_eq!(
            d.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
            vec![100, 200, 400, 800, 1000, 1000]
        );
        assert_eq!(b.next_delay(0.0).as_millis(), 800);
        b.reset();
        assert_eq!(b.next_delay(1.0).as_millis(), 120);
    }
}
