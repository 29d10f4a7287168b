//! `wardgate connect <resource>`: ask the controller for a grant with a key made here for it,
//! bring the tunnel up, renew before expiry (a new decision and a new key each time), and come
//! down — telling the user why — when the grant is revoked, a renewal is denied, or the user
//! disconnects. The state other commands read (`status`, `disconnect`) is kept in the config
//! directory: `connection.json` while connected, `last-denial.json` after a denial.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use wardgate_common::grant::ClientGrant;
use wardgate_common::proto::{ErrorCode, Push, Request, Response, close};
use wardgate_common::transport::{ClientError, ControlClient, ControlSession};
use wardgate_common::{files, keys};

use crate::datapath::{self, KeyedGrant, Mode};
use crate::enrol;
use crate::posture::{self, CollectFn};
use crate::state::ConfigDir;
use wardgate_common::posture::PostureReport;

/// How often the client looks at its own facts between reports, so a change (a firewall
/// switched off) is reported within this time even when the controller's interval is long.
/// Capped by the interval itself.
pub const CHANGE_POLL: Duration = Duration::from_secs(5);
/// The interval used until the controller says otherwise.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(30);

/// Why connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Not enrolled, or the identity is unusable.
    #[error(transparent)]
    Enrol(#[from] enrol::EnrolError),
    /// The controller could not be reached or refused.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The policy engine said no.
    #[error("access to {resource} denied:{}", reasons.iter().map(|r| format!("\n  - {r}")).collect::<String>())]
    Denied {
        /// The resource.
        resource: String,
        /// Every reason, in words.
        reasons: Vec<String>,
    },
    /// The tunnel could not start.
    #[error(transparent)]
    Tunnel(#[from] datapath::TunnelError),
    /// Local files.
    #[error(transparent)]
    File(#[from] files::FileError),
    /// The grant ended early.
    #[error("access to {resource} ended: {reason}")]
    Ended {
        /// The resource.
        resource: String,
        /// Why.
        reason: String,
    },
    /// Unexpected answer.
    #[error("unexpected answer from the controller: {0}")]
    Unexpected(String),
}

/// What `connection.json` holds while `connect` runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConnectionState {
    /// The `connect` process (for `disconnect`).
    pub pid: u32,
    /// The resource.
    pub resource: String,
    /// The current grant.
    pub grant_id: u64,
    /// When it expires (ms since the epoch).
    pub expires_at_ms: i64,
    /// `tun` or `userspace`.
    pub mode: String,
    /// Local listeners (userspace mode).
    pub listening: Vec<SocketAddr>,
    /// Renewal state in words: `scheduled`, `renewed`, `failed: …`.
    pub renewal: String,
    /// When the last posture report was accepted (ms since the epoch).
    #[serde(default)]
    pub posture_reported_at_ms: Option<i64>,
    /// What the controller says fails in this device's posture now, in words (empty: all
    /// posture checks pass).
    #[serde(default)]
    pub posture_failing: Vec<String>,
    /// The controller's notice that the access window ends soon, in words.
    #[serde(default)]
    pub ending: Option<String>,
}

/// A denial remembered for `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LastDenial {
    /// The resource.
    pub resource: String,
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// Every reason.
    pub reasons: Vec<String>,
}

/// Options of `connect`.
pub struct ConnectOptions {
    /// The resource's name.
    pub resource: String,
    /// `tun` or `userspace`.
    pub tun: bool,
    /// TUN interface name.
    pub tun_name: String,
    /// Userspace forwards: local port and optional target (default: the resource's first port).
    pub forwards: Vec<(SocketAddr, Option<SocketAddr>)>,
    /// Userspace SOCKS5 address.
    pub socks: Option<SocketAddr>,
    /// How posture facts are collected ([`posture::system_collect`] for this machine).
    pub posture: CollectFn,
    /// Break-glass with this reason instead of an ordinary connect: the grant lasts at most
    /// the policy's cap and is not renewed (a new emergency is a new, reviewed request).
    pub break_glass: Option<String>,
}

fn now_ms() -> i64 {
    wardgate_common::clock::now_ms()
}

fn connection_file(dir: &ConfigDir) -> PathBuf {
    dir.root().join("connection.json")
}

fn denial_file(dir: &ConfigDir) -> PathBuf {
    dir.root().join("last-denial.json")
}

/// What woke the connect loop.
enum Event {
    Stop,
    Push(Option<(u64, Push)>),
    Renew,
    Posture,
}

/// Whether a freshly collected report must be sent now: nothing sent yet, the facts changed
/// since the last one sent, or the controller's interval has passed since then.
pub fn report_due(
    last: Option<&PostureReport>,
    fresh: &PostureReport,
    since_last: Duration,
    interval: Duration,
) -> bool {
    match last {
        None => true,
        Some(last) => !posture::same_facts(last, fresh) || since_last >= interval,
    }
}

/// Reports this device's posture on the control session: on connect (before asking for a
/// grant), when the facts change, and at the controller's interval. Each report carries the
/// next counter, recorded as used *before* sending, so a crash can never make the client
/// reuse one (the controller would refuse it as a replay).
struct Reporter {
    dir: ConfigDir,
    collect: CollectFn,
    processes: Vec<String>,
    interval: Duration,
    last: Option<(PostureReport, tokio::time::Instant)>,
    poll_at: tokio::time::Instant,
    failing: Vec<String>,
    accepted_at_ms: Option<i64>,
}

impl Reporter {
    fn new(dir: ConfigDir, collect: CollectFn) -> Self {
        Self {
            dir,
            collect,
            processes: Vec::new(),
            interval: DEFAULT_REPORT_INTERVAL,
            last: None,
            poll_at: tokio::time::Instant::now() + CHANGE_POLL,
            failing: Vec::new(),
            accepted_at_ms: None,
        }
    }

    /// When to look at the facts next.
    fn next_poll(&self) -> tokio::time::Instant {
        self.poll_at
    }

    /// Collects on a blocking thread (collectors run commands such as `nft`).
    async fn collect(&self) -> Result<PostureReport, ConnectError> {
        let opts = posture::Options {
            required_processes: self.processes.clone(),
            device_cert: Some(self.dir.cert()),
            counter: 0,
        };
        let collect = self.collect.clone();
        tokio::task::spawn_blocking(move || collect(&opts))
            .await
            .map_err(|e| ConnectError::Unexpected(format!("posture collection failed: {e}")))
    }

    /// Collects and sends whatever the facts are.
    async fn send_now(&mut self, session: &ControlSession) -> Result<(), ConnectError> {
        let fresh = self.collect().await?;
        self.send(session, fresh).await
    }

    /// Collects, and sends if [`report_due`]; otherwise schedules the next look.
    async fn poll(&mut self, session: &ControlSession) -> Result<(), ConnectError> {
        let fresh = self.collect().await?;
        let due = match &self.last {
            None => true,
            Some((last, at)) => report_due(Some(last), &fresh, at.elapsed(), self.interval),
        };
        if due {
            return self.send(session, fresh).await;
        }
        let now = tokio::time::Instant::now();
        let by_interval = self
            .last
            .as_ref()
            .map_or(now, |(_, at)| *at + self.interval);
        self.poll_at = (now + CHANGE_POLL).min(by_interval);
        Ok(())
    }

    async fn send(
        &mut self,
        session: &ControlSession,
        mut report: PostureReport,
    ) -> Result<(), ConnectError> {
        let counter = posture::next_counter(&self.dir).map_err(|e| {
            ConnectError::Unexpected(format!("cannot read the posture report counter: {e}"))
        })?;
        posture::record_sent(&self.dir, counter).map_err(|e| {
            ConnectError::Unexpected(format!("cannot store the posture report counter: {e}"))
        })?;
        report.counter = counter;
        let answer = session
            .request(Request::ReportPosture {
                report: report.clone(),
            })
            .await;
        // Whatever the answer, the facts were offered now: the next regular report is an
        // interval away (a refusal is logged; the controller decides on what it has).
        let sent = tokio::time::Instant::now();
        self.last = Some((report, sent));
        self.poll_at = sent + self.interval.min(CHANGE_POLL);
        match answer {
            Ok(Response::PostureAccepted {
                interval_ms,
                processes,
                failing,
            }) => {
                self.interval = Duration::from_millis(interval_ms.max(100));
                self.accepted_at_ms = Some(now_ms());
                if failing != self.failing && !failing.is_empty() {
                    warn!(failing = ?failing, "this device's security check fails; access that needs it ends");
                }
                self.failing = failing;
                self.poll_at = sent + self.interval.min(CHANGE_POLL);
                if processes != self.processes {
                    // Now the client knows what to look for: report again with it.
                    self.processes = processes;
                    self.last = None;
                    self.poll_at = sent;
                }
                debug!(counter, "posture reported");
                Ok(())
            }
            Ok(other) => Err(ConnectError::Unexpected(format!("{other:?}"))),
            Err(e) => {
                warn!(error = %e, counter, "posture report refused");
                match e.wire() {
                    Some(_) => Ok(()),
                    None => Err(e.into()),
                }
            }
        }
    }
}

/// How dialling the controller again ended.
enum Reconnected {
    Session(ControlSession),
    Stopped,
    Expired,
    Refused(ClientError),
}

/// Dials the controller with backoff (250 ms doubling to 5 s) until it answers, the grant
/// expires, the user stops, or the controller refuses this device for good.
async fn reconnect(
    controller: &str,
    cfg: &quinn::ClientConfig,
    software: &str,
    expires_at_ms: i64,
    stop: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Reconnected {
    let mut delay = Duration::from_millis(250);
    loop {
        let left = u64::try_from(expires_at_ms - now_ms()).unwrap_or(0);
        if left == 0 {
            return Reconnected::Expired;
        }
        let attempt = tokio::select! {
            r = ControlClient::connect(controller, cfg.clone(), software) => r,
            _ = stop.as_mut() => return Reconnected::Stopped,
        };
        match attempt {
            Ok(c) => return Reconnected::Session(c.into_session()),
            Err(e) if e.wire().is_some() => return Reconnected::Refused(e),
            Err(e) => debug!(error = %e, retry_in = ?delay, "controller still unreachable"),
        }
        let wait = delay.min(Duration::from_millis(left));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.as_mut() => return Reconnected::Stopped,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The state of a running `connect`, if any.
pub fn current(dir: &ConfigDir) -> Option<ConnectionState> {
    let bytes = std::fs::read(connection_file(dir)).ok()?;
    let st: ConnectionState = serde_json::from_slice(&bytes).ok()?;
    // A stale file from a crashed process is ignored.
    std::path::Path::new(&format!("/proc/{}", st.pid))
        .exists()
        .then_some(st)
}

/// The last denial, if any.
pub fn last_denial(dir: &ConfigDir) -> Option<LastDenial> {
    serde_json::from_slice(&std::fs::read(denial_file(dir)).ok()?).ok()
}

async fn ask(
    session: &ControlSession,
    dir: &ConfigDir,
    resource: &str,
    renews: Option<u64>,
    break_glass: Option<&str>,
) -> Result<KeyedGrant, ConnectError> {
    // A fresh key per grant: it never leaves this machine and dies with the grant.
    let key = keys::generate_private();
    let request = match break_glass {
        Some(reason) => Request::BreakGlass {
            resource: resource.to_owned(),
            reason: reason.to_owned(),
            wg_public_key: keys::public_of(&key),
        },
        None => Request::Connect {
            resource: resource.to_owned(),
            wg_public_key: keys::public_of(&key),
            renews,
        },
    };
    let answer = session.request(request).await;
    match answer {
        Ok(Response::Granted(grant)) => {
            let _ = std::fs::remove_file(denial_file(dir));
            Ok(KeyedGrant {
                grant,
                private_key: key,
            })
        }
        Ok(other) => Err(ConnectError::Unexpected(format!("{other:?}"))),
        Err(e) => match e.wire() {
            Some(w) if w.code == ErrorCode::AccessDenied => {
                remember_denial(dir, resource, w.details.clone());
                Err(ConnectError::Denied {
                    resource: resource.to_owned(),
                    reasons: w.details.clone(),
                })
            }
            _ => Err(e.into()),
        },
    }
}

/// Keeps a denial or an early end for `status`, which shows it with what to fix.
fn remember_denial(dir: &ConfigDir, resource: &str, reasons: Vec<String>) {
    let d = LastDenial {
        resource: resource.to_owned(),
        at_ms: now_ms(),
        reasons,
    };
    if let Ok(bytes) = serde_json::to_vec_pretty(&d) {
        let _ = files::write_public(&denial_file(dir), &bytes);
    }
}

/// When to renew: when four fifths of the grant's life are over, at least 2 s before expiry.
/// A grant that cannot be renewed is waited out to its end instead.
fn renew_at(g: &ClientGrant) -> tokio::time::Instant {
    let left = u64::try_from(g.expires_at_ms - now_ms()).unwrap_or(0);
    if !g.renewable {
        return tokio::time::Instant::now() + Duration::from_millis(left);
    }
    let before = (left / 5).max(2_000).min(left);
    tokio::time::Instant::now() + Duration::from_millis(left - before)
}

/// Connects and runs until the grant ends, a renewal is refused, or `stop` resolves.
/// `on_ready` gets the first grant and the local listeners.
pub async fn connect(
    dir: &ConfigDir,
    opts: ConnectOptions,
    stop: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(&ClientGrant, &[SocketAddr]),
) -> Result<(), ConnectError> {
    let rec = dir
        .load()
        .map_err(enrol::EnrolError::from)?
        .ok_or_else(|| {
            ConnectError::Unexpected("this device is not enrolled; run `wardgate enrol`".into())
        })?;
    let cfg = enrol::client_config(dir)?;
    let software = format!("wardgate {}", wardgate_common::SOFTWARE_VERSION);
    let mut session = ControlClient::connect(&rec.controller, cfg.clone(), &software)
        .await?
        .into_session();
    // Posture first, so the decision on the grant rests on facts from now.
    let mut reporter = Reporter::new(dir.clone(), opts.posture.clone());
    reporter.send_now(&session).await?;
    if reporter.last.is_none() {
        // The controller asked for processes to be looked at: report with them.
        reporter.send_now(&session).await?;
    }
    let first = ask(
        &session,
        dir,
        &opts.resource,
        None,
        opts.break_glass.as_deref(),
    )
    .await?;
    let grant = first.grant.clone();
    let rules = grant.rules.clone();
    let bound = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mode = if opts.tun {
        Mode::Tun {
            name: opts.tun_name.clone(),
        }
    } else {
        let default_target = rules
            .iter()
            .find_map(|r| r.ports.map(|p| SocketAddr::new(r.dst.addr(), p.first())));
        let mut forwards = Vec::new();
        for (local, target) in &opts.forwards {
            let t = target.or(default_target).ok_or_else(|| {
                ConnectError::Unexpected(
                    "the resource names no port; give --forward LOCAL=HOST:PORT".into(),
                )
            })?;
            forwards.push((*local, t));
        }
        let allow_rules = rules.clone();
        let b = bound.clone();
        Mode::Userspace {
            forwards,
            udp_forwards: Vec::new(),
            socks: opts.socks,
            allow: Some(std::sync::Arc::new(move |dst: SocketAddr| {
                allow_rules.iter().any(|r| {
                    r.matches(
                        dst.ip(),
                        wardgate_common::packet::protocol::TCP,
                        Some(dst.port()),
                    )
                })
            })),
            on_bound: Some(std::sync::Arc::new(move |addrs| {
                if let Ok(mut v) = b.lock() {
                    *v = addrs;
                }
            })),
        }
    };
    let (tunnel, task) = datapath::start(mode, vec![first], std::future::pending()).await?;
    let listening = bound.lock().map(|v| v.clone()).unwrap_or_default();
    let mut state = ConnectionState {
        pid: std::process::id(),
        resource: opts.resource.clone(),
        grant_id: grant.grant_id,
        expires_at_ms: grant.expires_at_ms,
        mode: if opts.tun { "tun" } else { "userspace" }.into(),
        listening: listening.clone(),
        renewal: "scheduled".into(),
        posture_reported_at_ms: reporter.accepted_at_ms,
        posture_failing: reporter.failing.clone(),
        ending: None,
    };
    let save = |st: &ConnectionState| {
        if let Ok(bytes) = serde_json::to_vec_pretty(st) {
            let _ = files::write_public(&connection_file(dir), &bytes);
        }
    };
    save(&state);
    on_ready(&grant, &listening);
    info!(grant = grant.grant_id, resource = %opts.resource, "connected");
    tokio::pin!(stop);
    let mut current = grant;
    // Break-glass is not renewed: "renewal" there is the end of the emergency grant.
    let expiry_of = |g: &ClientGrant| {
        tokio::time::Instant::now()
            + Duration::from_millis(u64::try_from(g.expires_at_ms - now_ms()).unwrap_or(0))
    };
    let mut renew = if opts.break_glass.is_some() {
        expiry_of(&current)
    } else {
        renew_at(&current)
    };
    let outcome = loop {
        let event = tokio::select! {
            _ = &mut stop => Event::Stop,
            push = session.next_push() => Event::Push(push),
            _ = tokio::time::sleep_until(renew) => Event::Renew,
            _ = tokio::time::sleep_until(reporter.next_poll()) => Event::Posture,
        };
        match event {
            Event::Stop => {
                let _ = session
                    .request(Request::Disconnect {
                        grant_id: current.grant_id,
                    })
                    .await;
                break Ok(());
            }
            Event::Push(Some((_, Push::GrantEnded { grant_id, reason })))
                if grant_id == current.grant_id =>
            {
                remember_denial(dir, &opts.resource, vec![reason.clone()]);
                break Err(ConnectError::Ended {
                    resource: opts.resource.clone(),
                    reason,
                });
            }
            Event::Push(Some((
                _,
                Push::GrantEnding {
                    grant_id,
                    ends_at_ms,
                    reason,
                },
            ))) if grant_id == current.grant_id => {
                // Said on stderr for the person at the keyboard, and kept for `status`.
                warn!(grant = grant_id, ends_at_ms, "{reason}");
                eprintln!("wardgate: {reason}");
                state.ending = Some(reason);
                save(&state);
            }
            Event::Push(Some(_)) => {}
            Event::Push(None) => {
                // The controller cut this device off on purpose (revoked, account disabled):
                // say why and stop.
                if let ClientError::Connection(quinn::ConnectionError::ApplicationClosed(c)) =
                    session.error()
                    && c.error_code != quinn::VarInt::from_u32(close::SHUTDOWN)
                    && !c.reason.is_empty()
                {
                    break Err(ConnectError::Ended {
                        resource: opts.resource.clone(),
                        reason: String::from_utf8_lossy(&c.reason).into_owned(),
                    });
                }
                // Lost the controller (restart, network): the tunnel stays up until the grant
                // expires (the gateway enforces that either way) while we dial again; once
                // back, renew at once so access rests on a fresh decision.
                warn!(error = %session.error(), "lost the controller; reconnecting, the tunnel stays up until the grant expires");
                state.renewal = "controller unreachable; reconnecting".into();
                save(&state);
                match reconnect(
                    &rec.controller,
                    &cfg,
                    &software,
                    current.expires_at_ms,
                    &mut stop,
                )
                .await
                {
                    Reconnected::Session(s) => {
                        info!("reconnected to the controller");
                        session = s;
                        // A grant with a fixed end (break-glass, an approved window) has
                        // nothing to renew: it runs out as it would have.
                        if opts.break_glass.is_none() && current.renewable {
                            renew = tokio::time::Instant::now();
                        }
                    }
                    Reconnected::Stopped => break Ok(()),
                    Reconnected::Expired => {
                        break Err(ConnectError::Ended {
                            resource: opts.resource.clone(),
                            reason: "the controller was unreachable and the grant expired".into(),
                        });
                    }
                    Reconnected::Refused(e) => break Err(e.into()),
                }
            }
            Event::Posture => {
                match reporter.poll(&session).await {
                    Ok(()) => {
                        if state.posture_failing != reporter.failing
                            || state.posture_reported_at_ms != reporter.accepted_at_ms
                        {
                            state.posture_failing = reporter.failing.clone();
                            state.posture_reported_at_ms = reporter.accepted_at_ms;
                            save(&state);
                        }
                    }
                    // The session is gone: the push branch notices and reconnects.
                    Err(e) => {
                        debug!(error = %e, "posture report not sent");
                        reporter.poll_at = tokio::time::Instant::now() + CHANGE_POLL;
                    }
                }
            }
            Event::Renew if opts.break_glass.is_some() => {
                remember_denial(
                    dir,
                    &opts.resource,
                    vec!["the break-glass grant reached its cap".into()],
                );
                break Err(ConnectError::Ended {
                    resource: opts.resource.clone(),
                    reason: "the break-glass grant reached its cap; break glass again if the \
                             emergency goes on"
                        .into(),
                });
            }
            Event::Renew if !current.renewable => {
                // The end is fixed (an approved window, a schedule, a contract): asking again
                // would only get the same end. The gateway ends the traffic now by its clock.
                let reason = format!(
                    "the access window for {} ended; ask for a new one if you need more time",
                    opts.resource
                );
                remember_denial(dir, &opts.resource, vec![reason.clone()]);
                break Err(ConnectError::Ended {
                    resource: opts.resource.clone(),
                    reason,
                });
            }
            Event::Renew => {
                // A renewal is a new decision: give it fresh facts.
                if let Err(e) = reporter.send_now(&session).await {
                    debug!(error = %e, "posture report before renewal not sent");
                }
                match ask(&session, dir, &opts.resource, Some(current.grant_id), None).await {
                    Ok(next) => {
                        let g = next.grant.clone();
                        tunnel.add_grant(next).await?;
                        let _ = tunnel.remove_grant(current.grant_id).await;
                        info!(old = current.grant_id, new = g.grant_id, "grant renewed");
                        current = g;
                        renew = renew_at(&current);
                        state.grant_id = current.grant_id;
                        state.expires_at_ms = current.expires_at_ms;
                        state.renewal = "renewed".into();
                        save(&state);
                    }
                    Err(e) => {
                        state.renewal = format!("failed: {e}");
                        save(&state);
                        break Err(e);
                    }
                }
            }
        }
    };
    let _ = std::fs::remove_file(connection_file(dir));
    task.abort();
    session.close().await;
    outcome
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use wardgate_common::posture::Tri;

    fn report(firewall: Tri, counter: u64) -> PostureReport {
        PostureReport {
            os: "debian".into(),
            os_version: Some("12".into()),
            os_name: None,
            kernel: Some("6.1".into()),
            disk_encrypted: Tri::No,
            firewall,
            screen_lock: Tri::Unknown,
            processes: vec![],
            client_version: Some("0.1.0".into()),
            device_fingerprint: Some("ab".into()),
            counter,
            detail: Default::default(),
        }
    }

    #[test]
    fn a_report_is_due_first_on_change_and_by_interval_but_not_for_a_new_counter_alone() {
        let second = Duration::from_secs(1);
        let interval = Duration::from_secs(30);
        let on = report(Tri::Yes, 1);
        assert!(report_due(None, &on, Duration::ZERO, interval), "first");
        let mut same = report(Tri::Yes, 2);
        same.detail.insert(
            wardgate_common::posture::Fact::Firewall,
            "worded differently".into(),
        );
        assert!(
            !report_due(Some(&on), &same, second, interval),
            "counter and evidence alone are no change"
        );
        assert!(
            report_due(Some(&on), &same, interval, interval),
            "the interval has passed"
        );
        let off = report(Tri::No, 3);
        assert!(
            report_due(Some(&on), &off, second, interval),
            "the firewall went off"
        );
    }
}
