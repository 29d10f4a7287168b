//! The controller's request handling: what happens when a gateway joins, a device enrols or
//! polls, an authenticated peer heartbeats, and what administrators may change. Transport
//! (QUIC, HTTPS) lives in `quic` and `admin`; this module is where decisions are made and
//! audited.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use serde_json::json;
use tracing::{info, warn};
use wardgate_common::proto::{
    EnrolDevice, ErrorCode, Identity, JoinGateway, Response, Secret, WireError,
};
use wardgate_common::{keys, pki};

use crate::ca::{Ca, LeafRole};
use crate::secrets::{self, TokenKind};
use crate::store::{
    ConsumeTokenError, Device, DeviceStatus, Gateway, GatewayStatus, NewAuditEvent, Store,
    StoreError,
};

/// The store setting that makes device enrolment wait for an administrator.
pub const SETTING_REQUIRE_APPROVAL: &str = "enrolment.require_approval";

/// Who is on the other end of a control connection, established from its client certificate.
#[derive(Debug, Clone)]
pub enum Peer {
    /// No certificate: may only join or enrol.
    Anonymous,
    /// A registered, active gateway.
    Gateway(Gateway),
    /// An approved device.
    Device(Device),
}

impl Peer {
    /// The audit actor string.
    pub fn actor(&self) -> String {
        match self {
            Peer::Anonymous => "anonymous".into(),
            Peer::Gateway(g) => format!("gateway:{}", g.id),
            Peer::Device(d) => format!("device:{}", d.id),
        }
    }
}

/// Live control connections, so an administrator's revocation can cut them at once, pushes
/// reach their peer, and the admin API can say which gateways are online. A gateway has one
/// connection (a newer one replaces the older); a device may have several at once (a running
/// `connect` and a `status` check). Not on any packet path: a plain mutex is fine.
#[derive(Default)]
pub struct Registry {
    conns: Mutex<HashMap<String, Vec<LiveConn>>>,
}

/// One live connection and its push link.
type LiveConn = (quinn::Connection, Arc<crate::access::PeerLink>);

impl Registry {
    /// Records a connection of `subject` (`gateway:ID` / `device:ID`). For gateways it replaces
    /// and closes an older one (a reconnect after a network change).
    pub fn insert(
        &self,
        subject: String,
        conn: quinn::Connection,
        link: Arc<crate::access::PeerLink>,
    ) {
        let replace = subject.starts_with("gateway:");
        let old = self
            .conns
            .lock()
            .map(|mut m| {
                let list = m.entry(subject).or_default();
                let old = if replace {
                    std::mem::take(list)
                } else {
                    Vec::new()
                };
                list.push((conn, link));
                old
            })
            .unwrap_or_default();
        for (c, _) in old {
            c.close(CLOSE_REPLACED.into(), b"replaced by a newer connection");
        }
    }

    /// Forgets this connection of `subject`.
    pub fn remove(&self, subject: &str, conn: &quinn::Connection) {
        if let Ok(mut m) = self.conns.lock()
            && let Some(list) = m.get_mut(subject)
        {
            list.retain(|(c, _)| c.stable_id() != conn.stable_id());
            if list.is_empty() {
                m.remove(subject);
            }
        }
    }

    /// Whether `subject` is connected now.
    pub fn is_online(&self, subject: &str) -> bool {
        self.conns
            .lock()
            .map(|m| m.contains_key(subject))
            .unwrap_or(false)
    }

    /// The push link of `subject`'s newest live connection.
    pub fn link(&self, subject: &str) -> Option<Arc<crate::access::PeerLink>> {
        self.conns.lock().ok().and_then(|m| {
            m.get(subject)
                .and_then(|l| l.last().map(|(_, link)| link.clone()))
        })
    }

    /// The push links of all of `subject`'s live connections.
    pub fn links(&self, subject: &str) -> Vec<Arc<crate::access::PeerLink>> {
        self.conns
            .lock()
            .map(|m| {
                m.get(subject)
                    .map(|l| l.iter().map(|(_, link)| link.clone()).collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    /// Closes all of `subject`'s connections with `reason`.
    pub fn disconnect(&self, subject: &str, code: u32, reason: &str) -> bool {
        let conns = self
            .conns
            .lock()
            .ok()
            .and_then(|mut m| m.remove(subject))
            .unwrap_or_default();
        for (c, _) in &conns {
            c.close(code.into(), reason.as_bytes());
        }
        !conns.is_empty()
    }
}

pub use wardgate_common::proto::close::{
    NORMAL as CLOSE_NORMAL, PROTOCOL as CLOSE_PROTOCOL, REFUSED as CLOSE_REFUSED,
    REPLACED as CLOSE_REPLACED, SHUTDOWN as CLOSE_SHUTDOWN,
};

/// Everything a request handler needs.
pub struct Controller {
    /// Durable state.
    pub store: Store,
    /// Signs gateway and device certificates.
    pub ca: Ca,
    /// Live connections.
    pub registry: Registry,
    /// Compiled policies, rebuilt when they change.
    pub policies: crate::access::PolicyCache,
    /// Verifies ID tokens of the configured OpenID providers; `None` when none is trusted.
    pub verifier: Option<Arc<crate::identity::Verifier>>,
    /// The webhook queue ([`Controller::notify`]); `crate::notify::run` delivers it.
    pub notifier: crate::notify::Notifier,
    /// Seals the providers' refresh tokens before they reach the store; `None` when no
    /// provider is trusted.
    pub sealer: Option<Arc<crate::identity::Sealer>>,
}

fn internal(e: impl std::fmt::Display) -> WireError {
    // The detail goes to the controller's log; the peer learns only that it was our fault.
    warn!(error = %e, "internal error while handling a request");
    WireError::new(
        ErrorCode::Internal,
        "the controller hit an internal error; it has been logged there, try again later",
    )
}

fn bad(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::BadRequest, msg)
}

fn now_ms() -> i64 {
    wardgate_common::clock::now_ms()
}

/// Checks a `host:port` endpoint without resolving it (the gateway may name an address only
/// clients can resolve).
fn valid_endpoint(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

impl Controller {
    /// Wraps the parts.
    pub fn new(store: Store, ca: Ca) -> Arc<Self> {
        Self::with_verifier(store, ca, None)
    }

    /// Wraps the parts, trusting the providers of `verifier` for logins and admin sign-in.
    pub fn with_verifier(
        store: Store,
        ca: Ca,
        verifier: Option<Arc<crate::identity::Verifier>>,
    ) -> Arc<Self> {
        Self::with_identity(store, ca, verifier, None)
    }

    /// A controller trusting `verifier`'s providers and keeping their refresh tokens sealed
    /// with `sealer`.
    pub fn with_identity(
        store: Store,
        ca: Ca,
        verifier: Option<Arc<crate::identity::Verifier>>,
        sealer: Option<Arc<crate::identity::Sealer>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            ca,
            registry: Registry::default(),
            policies: Default::default(),
            verifier,
            notifier: Default::default(),
            sealer,
        })
    }

    /// Writes an audit row. An audit failure fails the operation that caused it: an action
    /// that can't be recorded must not happen.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        outcome: &str,
        detail: serde_json::Value,
    ) -> Result<(), StoreError> {
        self.store
            .append_audit(&NewAuditEvent {
                at_ms: now_ms(),
                actor: actor.to_owned(),
                action: action.to_owned(),
                target: target.to_owned(),
                outcome: outcome.to_owned(),
                detail,
            })
            .await
            .map(|_| ())
    }

    /// Audits a refusal and returns it, so handlers can `return Err(self.deny(..).await)`.
    async fn deny(&self, actor: &str, action: &str, target: &str, err: WireError) -> WireError {
        if let Err(e) = self
            .audit(
                actor,
                action,
                target,
                "deny",
                json!({"code": err.code, "reason": err.message}),
            )
            .await
        {
            return internal(e);
        }
        err
    }

    /// Establishes who a connection belongs to from its certificate fingerprint. Errors are
    /// what the peer is told before the connection is closed.
    pub async fn identify(&self, fingerprint: Option<String>) -> Result<Peer, WireError> {
        let Some(fp) = fingerprint else {
            return Ok(Peer::Anonymous);
        };
        if let Some(g) = self
            .store
            .gateway_by_cert_fingerprint(&fp)
            .await
            .map_err(internal)?
        {
            return match g.status {
                GatewayStatus::Active => Ok(Peer::Gateway(g)),
                GatewayStatus::Revoked => Err(self
                    .deny(
                        &format!("gateway:{}", g.id),
                        "connection",
                        &g.id,
                        WireError::new(
                            ErrorCode::CertificateRevoked,
                            format!("gateway {} was revoked by an administrator; it must be joined again with a new token", g.name),
                        ),
                    )
                    .await),
            };
        }
        if let Some(d) = self
            .store
            .device_by_cert_fingerprint(&fp)
            .await
            .map_err(internal)?
        {
            let actor = format!("device:{}", d.id);
            return match d.status {
                DeviceStatus::Approved => {
                    let owner = self.store.user_by_id(&d.owner_user_id).await.map_err(internal)?;
                    match owner {
                        Some(u) if !u.disabled => Ok(Peer::Device(d)),
                        _ => Err(self
                            .deny(&actor, "connection", &d.id, WireError::new(
                                ErrorCode::UserDisabled,
                                "the account that enrolled this device is disabled; contact your IT helpdesk",
                            ))
                            .await),
                    }
                }
                DeviceStatus::Revoked => Err(self
                    .deny(&actor, "connection", &d.id, WireError::new(
                        ErrorCode::CertificateRevoked,
                        "this device was revoked by an administrator and can no longer connect; contact your IT helpdesk",
                    ))
                    .await),
                DeviceStatus::Pending | DeviceStatus::Denied => Err(self
                    .deny(&actor, "connection", &d.id, WireError::new(
                        ErrorCode::CertificateUnknown,
                        "this device certificate is not active; enrol again",
                    ))
                    .await),
            };
        }
        Err(self
            .deny(
                "anonymous",
                "connection",
                &fp,
                WireError::new(
                    ErrorCode::CertificateUnknown,
                    "this certificate was signed by the Wardgate CA but is not registered (was the controller's database reset?); join or enrol again",
                ),
            )
            .await)
    }

    /// A gateway presents its join token.
    pub async fn join_gateway(&self, req: JoinGateway) -> Result<Response, WireError> {
        let actor = "anonymous";
        if keys::decode_public(&req.wg_public_key).is_err() {
            return Err(bad(
                "wg_public_key is not a WireGuard public key (32 bytes, base64)",
            ));
        }
        if !valid_endpoint(&req.endpoint) {
            return Err(bad(format!(
                "endpoint {:?} is not host:port; give the address clients use to reach the gateway's WireGuard port",
                req.endpoint
            )));
        }
        let mut declared = Vec::new();
        for n in &req.networks {
            let net: IpNet = n.parse().map_err(|_| {
                bad(format!(
                    "network {n:?} is not a CIDR prefix such as 10.10.0.0/16"
                ))
            })?;
            declared.push(net.trunc());
        }
        let hash = secrets::hash_token(req.token.expose());
        let token = match self.store.consume_join_token(&hash, now_ms()).await {
            Ok(t) => t,
            Err(e) => {
                let err = match e {
                    ConsumeTokenError::Unknown => WireError::new(
                        ErrorCode::TokenUnknown,
                        "this join token is not known; ask an administrator for a new one (`wardgate-controller admin gateway token create`)",
                    ),
                    ConsumeTokenError::Expired { .. } => WireError::new(
                        ErrorCode::TokenExpired,
                        "this join token has expired; ask an administrator for a new one",
                    ),
                    ConsumeTokenError::AlreadyUsed { .. } => WireError::new(
                        ErrorCode::TokenUsed,
                        "this join token was already used; join tokens are single-use, ask an administrator for a new one",
                    ),
                    ConsumeTokenError::Store(e) => return Err(internal(e)),
                };
                return Err(self.deny(actor, "gateway.join", &hash[..12], err).await);
            }
        };
        let allowed: Vec<IpNet> = token
            .networks
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect();
        let networks: Vec<IpNet> = if declared.is_empty() {
            allowed.clone()
        } else {
            for d in &declared {
                if !allowed.iter().any(|a| a.contains(d)) {
                    let err = bad(format!(
                        "network {d} is not among the networks this token allows ({}); the token is now used, ask for a new one with the right networks",
                        token.networks.join(", ")
                    ));
                    return Err(self
                        .deny(actor, "gateway.join", &token.gateway_name, err)
                        .await);
                }
            }
            declared
        };
        if networks.is_empty() {
            let err = bad(
                "a gateway must serve at least one network; name them on the token or with --network",
            );
            return Err(self
                .deny(actor, "gateway.join", &token.gateway_name, err)
                .await);
        }
        let id = secrets::new_id("gw");
        let cert_pem = match self.ca.sign_csr(
            LeafRole::Gateway,
            &format!("gateway {}", token.gateway_name),
            &req.csr_pem,
        ) {
            Ok(c) => c,
            Err(e) => {
                let err = bad(e.to_string());
                return Err(self
                    .deny(actor, "gateway.join", &token.gateway_name, err)
                    .await);
            }
        };
        let fp = fingerprint_of(&cert_pem)?;
        let networks: Vec<String> = networks.iter().map(|n| n.to_string()).collect();
        let gw = Gateway {
            id: id.clone(),
            name: token.gateway_name.clone(),
            wg_public_key: req.wg_public_key.clone(),
            endpoint: req.endpoint.clone(),
            networks: networks.clone(),
            cert_fingerprint: fp,
            status: GatewayStatus::Active,
            created_ms: now_ms(),
            last_seen_ms: None,
        };
        match self.store.insert_gateway(&gw).await {
            Ok(()) => {}
            Err(StoreError::Conflict { .. }) => {
                let err = bad(format!(
                    "a gateway named {} is already registered; revoke it first or make a token with another name",
                    gw.name
                ));
                return Err(self.deny(actor, "gateway.join", &gw.name, err).await);
            }
            Err(e) => return Err(internal(e)),
        }
        self.audit(
            &format!("gateway:{id}"),
            "gateway.join",
            &id,
            "ok",
            json!({"name": gw.name, "endpoint": gw.endpoint, "networks": networks, "wg_public_key": gw.wg_public_key}),
        )
        .await
        .map_err(internal)?;
        info!(gateway = %id, name = %gw.name, "gateway joined");
        Ok(Response::Joined {
            gateway_id: id,
            name: gw.name,
            networks,
            cert_pem,
            ca_pem: self.ca.cert_pem().to_owned(),
        })
    }

    /// A device enrols after its user logs in.
    pub async fn enrol_device(&self, req: EnrolDevice) -> Result<Response, WireError> {
        let who = self.authenticate(&req.login, "enrol").await?;
        let user = who.user.clone();
        let actor = format!("user:{}", user.username);
        let name = req.device_name.trim();
        if name.is_empty() || name.len() > 64 || req.os.len() > 128 || req.hostname.len() > 253 {
            return Err(bad(
                "device name must be 1-64 characters; os and hostname at most 128/253",
            ));
        }
        if rcgen::CertificateSigningRequestParams::from_pem(&req.csr_pem).is_err() {
            let err =
                bad("the certificate signing request is invalid or its signature does not verify");
            return Err(self.deny(&actor, "device.enrol", name, err).await);
        }
        let require_approval = self
            .store
            .get_setting(SETTING_REQUIRE_APPROVAL)
            .await
            .map_err(internal)?
            .is_some_and(|v| v == "true");
        let id = secrets::new_id("dev");
        let poll_token = secrets::new_token(TokenKind::Poll);
        let now = now_ms();
        let (status, cert_pem, fp) = if require_approval {
            (DeviceStatus::Pending, None, None)
        } else {
            let cert = self
                .ca
                .sign_csr(LeafRole::Device, &format!("device {id}"), &req.csr_pem)
                .map_err(|e| bad(e.to_string()))?;
            let fp = fingerprint_of(&cert)?;
            (DeviceStatus::Approved, Some(cert), Some(fp))
        };
        let dev = Device {
            id: id.clone(),
            name: name.to_owned(),
            owner_user_id: user.id.clone(),
            status,
            csr_pem: req.csr_pem.clone(),
            cert_pem: cert_pem.clone(),
            cert_fingerprint: fp,
            poll_token_hash: secrets::hash_token(&poll_token),
            os: req.os.clone(),
            hostname: req.hostname.clone(),
            created_ms: now,
            decided_ms: (!require_approval).then_some(now),
            tunnel_addr: None,
        };
        self.store.insert_device(&dev).await.map_err(internal)?;
        self.audit(
            &actor,
            "device.enrol",
            &id,
            if require_approval { "pending" } else { "allow" },
            json!({"name": dev.name, "os": dev.os, "hostname": dev.hostname, "approval_required": require_approval}),
        )
        .await
        .map_err(internal)?;
        info!(device = %id, user = %user.username, pending = require_approval, "device enrolment");
        // The enrolment's login opens the device's first session (also while it waits for
        // approval: if that takes longer than the session, `wardgate login` opens a new one).
        let session = self.open_session(&who, &id).await?;
        Ok(match cert_pem {
            Some(cert_pem) => Response::Enrolled {
                device_id: id,
                cert_pem,
                ca_pem: self.ca.cert_pem().to_owned(),
                session: Some(session),
            },
            None => Response::EnrolPending {
                device_id: id,
                poll_token: Secret::new(poll_token),
            },
        })
    }

    /// A pending device asks whether it has been decided.
    pub async fn enrol_poll(
        &self,
        device_id: &str,
        poll_token: &Secret,
    ) -> Result<Response, WireError> {
        let unknown = || {
            WireError::new(
                ErrorCode::Forbidden,
                "unknown device or wrong poll token; enrol again",
            )
        };
        let Some(d) = self.store.device_by_id(device_id).await.map_err(internal)? else {
            return Err(unknown());
        };
        let presented = secrets::hash_token(poll_token.expose());
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            presented.as_bytes(),
            d.poll_token_hash.as_bytes(),
        )) {
            return Err(self
                .deny("anonymous", "device.enrol_poll", device_id, unknown())
                .await);
        }
        match (d.status, d.cert_pem) {
            (DeviceStatus::Approved, Some(cert_pem)) => Ok(Response::Enrolled {
                device_id: d.id,
                cert_pem,
                ca_pem: self.ca.cert_pem().to_owned(),
                session: None,
            }),
            (DeviceStatus::Pending, _) | (DeviceStatus::Approved, None) => Err(WireError::new(
                ErrorCode::DevicePending,
                format!("device {} is waiting for an administrator's approval", d.id),
            )),
            (DeviceStatus::Denied, _) => Err(WireError::new(
                ErrorCode::DeviceDenied,
                "an administrator denied this device's enrolment; contact your IT helpdesk",
            )),
            (DeviceStatus::Revoked, _) => Err(WireError::new(
                ErrorCode::DeviceRevoked,
                "this device was revoked by an administrator; contact your IT helpdesk",
            )),
        }
    }

    /// An authenticated peer's liveness ping.
    pub async fn heartbeat(&self, peer: &Peer, seq: u64) -> Result<Response, WireError> {
        if let Peer::Gateway(g) = peer {
            self.store
                .touch_gateway(&g.id, now_ms())
                .await
                .map_err(internal)?;
        }
        Ok(Response::HeartbeatAck {
            seq,
            server_time_ms: now_ms(),
        })
    }

    /// Tells an authenticated peer who it is (freshly read from the store).
    pub async fn who_am_i(&self, peer: &Peer) -> Result<Response, WireError> {
        match peer {
            Peer::Anonymous => Err(cert_required()),
            Peer::Gateway(g) => Ok(Response::Identity(Identity::Gateway {
                id: g.id.clone(),
                name: g.name.clone(),
                networks: g.networks.clone(),
            })),
            Peer::Device(d) => {
                let owner = self
                    .store
                    .user_by_id(&d.owner_user_id)
                    .await
                    .map_err(internal)?
                    .map(|u| u.username)
                    .unwrap_or_default();
                Ok(Response::Identity(Identity::Device {
                    id: d.id.clone(),
                    name: d.name.clone(),
                    owner,
                    status: d.status.as_str().to_owned(),
                }))
            }
        }
    }
}

/// The error for a request that needs a certificate.
pub fn cert_required() -> WireError {
    WireError::new(
        ErrorCode::CertificateRequired,
        "this request needs a client certificate; enrol the device (`wardgate enrol`) or join the gateway first",
    )
}

fn fingerprint_of(cert_pem: &str) -> Result<String, WireError> {
    let certs = pki::certs_from_pem("issued certificate", cert_pem.as_bytes()).map_err(internal)?;
    certs
        .first()
        .map(pki::fingerprint)
        .ok_or_else(|| internal("empty certificate"))
}
