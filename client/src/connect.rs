//! `wardgate connect <resource>`: ask the controller for a grant with a key made here for it,
//! bring the tunnel up, renew before expiry (a new decision and a new key each time), and come
//! down — telling the user why — when the grant is revoked, a renewal is denied, or the user
//! disconnects. The state other commands read (`status`, `disconnect`) is kept in the config
//! directory: `connection.json` while connected, `last-denial.json` after a denial.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use wardgate_common::grant::ClientGrant;
use wardgate_common::proto::{ErrorCode, Push, Request, Response, close};
use wardgate_common::transport::{ClientError, ControlClient, ControlSession};
use wardgate_common::{files, keys, unix_ms};

use crate::datapath::{self, KeyedGrant, Mode};
use crate::enrol;
use crate::state::ConfigDir;

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
}

fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
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
) -> Result<KeyedGrant, ConnectError> {
    // A fresh key per grant: it never leaves this machine and dies with the grant.
    let key = keys::generate_private();
    let answer = session
        .request(Request::Connect {
            resource: resource.to_owned(),
            wg_public_key: keys::public_of(&key),
            renews,
        })
        .await;
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
                let d = LastDenial {
                    resource: resource.to_owned(),
                    at_ms: now_ms(),
                    reasons: w.details.clone(),
                };
                if let Ok(bytes) = serde_json::to_vec_pretty(&d) {
                    let _ = files::write_public(&denial_file(dir), &bytes);
                }
                Err(ConnectError::Denied {
                    resource: resource.to_owned(),
                    reasons: w.details.clone(),
                })
            }
            _ => Err(e.into()),
        },
    }
}

/// When to renew: when four fifths of the grant's life are over, at least 2 s before expiry.
fn renew_at(g: &ClientGrant) -> tokio::time::Instant {
    let left = u64::try_from(g.expires_at_ms - now_ms()).unwrap_or(0);
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
    let first = ask(&session, dir, &opts.resource, None).await?;
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
    let mut renew = renew_at(&current);
    let outcome = loop {
        let event = tokio::select! {
            _ = &mut stop => Event::Stop,
            push = session.next_push() => Event::Push(push),
            _ = tokio::time::sleep_until(renew) => Event::Renew,
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
                break Err(ConnectError::Ended {
                    resource: opts.resource.clone(),
                    reason,
                });
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
                        renew = tokio::time::Instant::now();
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
            Event::Renew => {
                match ask(&session, dir, &opts.resource, Some(current.grant_id)).await {
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
