//! The control protocol: what controller, gateways and clients say to each other over QUIC.
//!
//! One bidirectional stream per connection carries [`ClientMsg`] frames up and [`ServerMsg`]
//! frames down. The first frame up is always [`ClientMsg::Hello`]; the controller answers
//! [`ServerMsg::Welcome`] or [`ServerMsg::Fatal`] (then closes) before anything else is read,
//! so incompatible peers learn why at once. Requests carry an id that their response echoes;
//! pushes (later: peer add/remove, revocations) have none.
//!
//! Every enum is internally tagged with snake_case names: adding a variant is backwards
//! compatible for the sender that does not use it, and changing the meaning of one means
//! bumping [`PROTOCOL_VERSION`].

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to the messages below.
pub const PROTOCOL_VERSION: u16 = 1;

/// The TLS application protocol name of the control plane.
pub const ALPN: &[u8] = b"wardgate-control";

/// Frames sent by gateways and clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// First frame on every connection.
    Hello {
        /// The protocol version the sender speaks.
        protocol_version: u16,
        /// Software name and version, for the operator's eyes only.
        software: String,
    },
    /// A request; answered by a [`ServerMsg::Response`] with the same id.
    Request {
        /// Chosen by the sender, echoed in the response.
        id: u64,
        /// What is asked.
        body: Request,
    },
    /// The outcome of a [`ServerMsg::Push`] (gateways ack peer changes so the controller
    /// knows a grant is enforced before it answers the client).
    Ack {
        /// The push's id.
        push_id: u64,
        /// `Err` carries why the change could not be applied.
        result: Result<(), String>,
    },
}

/// What gateways and clients can ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// A new gateway presents its single-use join token (no client certificate yet).
    JoinGateway(JoinGateway),
    /// A device asks for a certificate after its user has logged in (no client certificate yet).
    EnrolDevice(EnrolDevice),
    /// A device whose enrolment awaits approval asks again, proving it made the first request.
    EnrolPoll {
        /// The device id returned by the pending answer.
        device_id: String,
        /// The poll secret returned by the pending answer.
        poll_token: Secret,
    },
    /// Liveness; requires a certificate. Gateways send it on a timer.
    Heartbeat {
        /// Increments per heartbeat, echoed back.
        seq: u64,
    },
    /// Who does the controller think I am, and in which state? Requires a certificate.
    WhoAmI,
    /// A device asks for a grant to a resource, with a WireGuard public key made for it.
    Connect {
        /// The resource's name.
        resource: String,
        /// A fresh WireGuard public key for this grant (base64); its private key never leaves
        /// the device.
        wg_public_key: String,
        /// The grant this one renews, if any (it ends once the new one is in place).
        renews: Option<u64>,
    },
    /// Break-glass: emergency access to a resource marked for emergencies, at once, for at
    /// most the break-glass policy's cap, with a reason (recorded, alerted, reviewed). Needs a
    /// multi-factor login session. Not renewable: a new emergency is a new request.
    BreakGlass {
        /// The resource's name.
        resource: String,
        /// Why, in the user's words (required; at most 500 characters).
        reason: String,
        /// A fresh WireGuard public key for this grant (base64).
        wg_public_key: String,
    },
    /// A device gives a grant back.
    Disconnect {
        /// The grant.
        grant_id: u64,
    },
    /// A gateway asks for every live grant it must enforce (after (re)connecting, before it
    /// passes traffic).
    SyncGrants,
    /// An enrolled device's user logs in again: a new login session for this device (the
    /// previous one ends). Connects need a live session.
    Login {
        /// How the user proves who they are; must be the device's owner.
        login: Login,
    },
    /// A gateway reports what its filter dropped since its last report, so every refused
    /// packet ends up in the audit log (summed per grant and reason, not one row per packet).
    ReportDrops {
        /// At most [`MAX_DROP_ROWS`] rows.
        drops: Vec<DropCount>,
    },
    /// A device reports its posture: on connect (before asking for a grant, so the first
    /// decision rests on fresh facts), when its facts change, and at the interval the
    /// controller gave in [`Response::PostureAccepted`]. Rides the device's mutual-TLS session,
    /// so the certificate says whose report it is; the counter stops an old one being replayed.
    ReportPosture {
        /// The report; its `counter` must exceed the last one the controller accepted from
        /// this device.
        report: crate::posture::PostureReport,
    },
    /// A device's user asks for access to a resource that needs approval, for a window
    /// (vendors, issue 7). The access is for this device only.
    MakeAccessRequest(MakeAccessRequest),
    /// A device's user asks for the state of their access requests.
    ListAccessRequests,
}

/// Asking for a window of access that someone else must approve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MakeAccessRequest {
    /// The resource.
    pub resource: String,
    /// When the window opens (ms since the epoch); `None` = now, by the controller's clock.
    pub from_ms: Option<i64>,
    /// When it closes; give this or `duration_ms`.
    pub until_ms: Option<i64>,
    /// How long it lasts from its start; give this or `until_ms`.
    pub duration_ms: Option<u64>,
    /// Why, for the approver and the audit log.
    pub reason: String,
    /// A ticket reference (`INC-4411`).
    pub ticket: Option<String>,
}

/// An access request as its requester sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequestInfo {
    /// Its number (what approvers type).
    pub id: i64,
    /// The resource.
    pub resource: String,
    /// The device it is for.
    pub device_id: String,
    /// Window start (ms).
    pub from_ms: i64,
    /// Window end (ms).
    pub until_ms: i64,
    /// The requester's reason.
    pub reason: String,
    /// Ticket reference.
    pub ticket: Option<String>,
    /// `pending`, `approved`, `denied`, `revoked` or `expired`.
    pub state: String,
    /// Who approved or denied it (user name).
    pub approver: Option<String>,
    /// The decision's reason or comment.
    pub decision_reason: Option<String>,
    /// When it was made (ms).
    pub created_ms: i64,
}

/// Most rows one [`Request::ReportDrops`] may carry; a gateway sends the rest next time.
pub const MAX_DROP_ROWS: usize = 1_000;

/// Packets a gateway dropped for one reason since its last report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCount {
    /// The grant whose peer sent them; `None` when no grant could be blamed (unknown peer,
    /// a packet from a resource to nobody).
    pub grant_id: Option<u64>,
    /// Why (`port_not_granted`, `spoofed_source`, …).
    pub reason: String,
    /// How many.
    pub count: u64,
}

/// A gateway's registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinGateway {
    /// The token an administrator created for this gateway.
    pub token: Secret,
    /// PKCS#10 request for the gateway's control-plane certificate; the key stays on the gateway.
    pub csr_pem: String,
    /// The gateway's WireGuard public key (base64); the private key stays on the gateway.
    pub wg_public_key: String,
    /// Where clients reach the gateway's WireGuard endpoint (`host:port`).
    pub endpoint: String,
    /// The resource networks the gateway serves (CIDR). Empty means "the ones the token names";
    /// otherwise they must lie inside the token's networks.
    pub networks: Vec<String>,
}

/// A device's enrolment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrolDevice {
    /// How the user proved who they are.
    pub login: Login,
    /// A name for the device the user and admins will recognise.
    pub device_name: String,
    /// PKCS#10 request for the device certificate; the key stays on the device.
    pub csr_pem: String,
    /// Operating system, for the admin's approval decision.
    pub os: String,
    /// Host name, for the admin's approval decision.
    pub hostname: String,
}

/// How a user proves who they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Login {
    /// A local user of the controller (embedded default and small sites).
    Local {
        /// The user name.
        username: String,
        /// The password; only ever sent over the server-authenticated QUIC channel.
        password: Secret,
        /// The current one-time code (RFC 6238) for users with TOTP enrolled.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        totp: Option<Secret>,
    },
    /// A user of an OpenID provider who ran the authorization-code + PKCE flow: the client
    /// hands over the code and its PKCE verifier, and the controller redeems them itself, so
    /// the refresh token it asks for (`offline_access`) never reaches the client. With it the
    /// controller notices a user disabled at the provider while their session is live.
    /// (Boxed: it is the largest login and would make every control frame as large.)
    OidcCode(Box<OidcCodeLogin>),
    /// A user of an OpenID provider who ran the device grant (no browser here): the client
    /// hands over the ID token only, and gets no refresh token either, so such a session is
    /// bounded by its lifetime and not checked at the provider while it lasts.
    Oidc {
        /// The ID token as the IdP's token endpoint returned it.
        id_token: Secret,
        /// The nonce the client put in the authorization request (`None` for the device
        /// grant, which has none); the token must carry exactly it, and only once.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<String>,
    },
}

/// What a code + PKCE login hands the controller (see [`Login::OidcCode`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OidcCodeLogin {
    /// The issuer the client logged in at (selects the provider).
    pub issuer: String,
    /// The client id the authorization request used.
    pub client_id: String,
    /// The authorization code from the redirect.
    pub code: Secret,
    /// The PKCE verifier whose challenge the authorization request carried.
    pub code_verifier: Secret,
    /// The redirect URI of the authorization request (the provider checks they match).
    pub redirect_uri: String,
    /// The nonce of the authorization request; the ID token must carry exactly it.
    pub nonce: String,
}

impl Login {
    /// The user name as the client knows it before the controller has said (local users), or
    /// `None` for OIDC (the controller names the user from the token).
    pub fn local_username(&self) -> Option<&str> {
        match self {
            Login::Local { username, .. } => Some(username),
            Login::Oidc { .. } | Login::OidcCode(_) => None,
        }
    }
}

/// A login session as the controller made it: who, how, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The Wardgate user name.
    pub username: String,
    /// `local` or `oidc`.
    pub method: String,
    /// The identity provider's name (OIDC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Whether the login was multi-factor.
    pub mfa: bool,
    /// The user's groups at login.
    pub groups: Vec<String>,
    /// When the session ends at the latest (ms since the epoch); policies may end it earlier.
    pub expires_at_ms: i64,
    /// The session also ends after this long without a new grant (ms).
    pub idle_timeout_ms: i64,
}

/// A secret string (password, token): serialised as a plain string, but its `Debug` never shows
/// it, so deriving `Debug` on a message can not leak it into a log line.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself, for the one place that must compare or hash it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Frames sent by the controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// The hello was accepted.
    Welcome {
        /// The protocol version the controller speaks.
        protocol_version: u16,
        /// The controller's software version.
        software: String,
    },
    /// The answer to a request.
    Response {
        /// The request's id.
        id: u64,
        /// The outcome.
        result: Result<Response, WireError>,
    },
    /// The connection is refused; the controller closes it after this frame.
    Fatal(WireError),
    /// Something the controller tells a connected peer unasked; gateways answer with
    /// [`ClientMsg::Ack`].
    Push {
        /// Echoed in the ack.
        push_id: u64,
        /// What happened.
        push: Push,
    },
}

/// Changes the controller pushes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "push", rename_all = "snake_case")]
pub enum Push {
    /// To a gateway: enforce this grant.
    AddGrant(crate::grant::GatewayGrant),
    /// To a gateway: stop this grant now.
    RemoveGrant {
        /// The grant.
        grant_id: u64,
        /// Why, for the gateway's log.
        reason: String,
    },
    /// To a device: a grant ended before its time (revoked, policy change, posture).
    GrantEnded {
        /// The grant.
        grant_id: u64,
        /// Why, in words for the user.
        reason: String,
    },
    /// To a device: a grant's access window ends soon and will not be renewed (an approved
    /// request's end), so the user can save their work. Sent once per window.
    GrantEnding {
        /// The grant.
        grant_id: u64,
        /// When it ends (ms since the epoch).
        ends_at_ms: i64,
        /// In words for the user.
        reason: String,
    },
}

/// Successful answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    /// The gateway is registered.
    Joined {
        /// The gateway's id.
        gateway_id: String,
        /// The gateway's name, from the token.
        name: String,
        /// The networks registered.
        networks: Vec<String>,
        /// The signed control-plane certificate.
        cert_pem: String,
        /// The controller's CA, to pin.
        ca_pem: String,
    },
    /// The device has its certificate.
    Enrolled {
        /// The device's id.
        device_id: String,
        /// The signed device certificate.
        cert_pem: String,
        /// The controller's CA, to pin.
        ca_pem: String,
        /// The login session the enrolment's login opened.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<SessionInfo>,
    },
    /// A login session was opened.
    LoggedIn(SessionInfo),
    /// An administrator must approve the device first.
    EnrolPending {
        /// The device's id, to tell the administrator.
        device_id: String,
        /// Secret to present with [`Request::EnrolPoll`]; keep it 0600.
        poll_token: Secret,
    },
    /// Heartbeat answer.
    HeartbeatAck {
        /// The heartbeat's sequence number.
        seq: u64,
        /// The controller's clock, so skew can be reported.
        server_time_ms: i64,
    },
    /// Who the caller is.
    Identity(Identity),
    /// Access granted: how to reach the resource.
    Granted(crate::grant::ClientGrant),
    /// Every live grant a gateway must enforce. (A struct variant: an internally tagged
    /// enum cannot carry a bare sequence.)
    GatewayGrants {
        /// The grants.
        grants: Vec<crate::grant::GatewayGrant>,
    },
    /// A posture report was accepted (and every live grant of the device re-decided on it).
    PostureAccepted {
        /// How often to report even when nothing changed (ms); set by the controller so an
        /// operator can trade freshness for load in one place.
        interval_ms: u64,
        /// Process names posture profiles require, so the client knows what to look for.
        #[serde(default)]
        processes: Vec<String>,
        /// What fails now, in words for the user, over every policy with a posture profile
        /// (empty when the device meets them all).
        #[serde(default)]
        failing: Vec<String>,
    },
    /// An access request was recorded (pending approval).
    AccessRequestMade(AccessRequestInfo),
    /// The requester's access requests, newest first.
    AccessRequests {
        /// The requests.
        requests: Vec<AccessRequestInfo>,
    },
    /// Done.
    Done,
}

/// The authenticated peer as the controller sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Identity {
    /// A registered gateway.
    Gateway {
        /// Its id.
        id: String,
        /// Its name.
        name: String,
        /// Networks served.
        networks: Vec<String>,
    },
    /// An enrolled device.
    Device {
        /// Its id.
        id: String,
        /// Its name.
        name: String,
        /// The user who enrolled it.
        owner: String,
        /// `approved` (revoked devices cannot connect).
        status: String,
    },
}

/// An error as it travels on the wire: a stable code for programs, a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code}){}", details_text(.details))]
pub struct WireError {
    /// Stable, machine-readable reason.
    pub code: ErrorCode,
    /// What happened and what to do, in words.
    pub message: String,
    /// Every reason, when there are several (a denial lists each failed condition).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

fn details_text(d: &[String]) -> String {
    d.iter().map(|r| format!("\n  - {r}")).collect()
}

impl WireError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    /// Builds an error with every reason listed.
    pub fn with_details(code: ErrorCode, message: impl Into<String>, details: Vec<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details,
        }
    }
}

/// Stable error codes. Programs match on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The peer speaks another protocol version.
    UnsupportedVersion,
    /// The first frame was not a hello, or a frame arrived out of order.
    ProtocolViolation,
    /// A frame was larger than the limit.
    FrameTooLarge,
    /// A frame could not be parsed.
    Malformed,
    /// The request needs a client certificate and none was presented.
    CertificateRequired,
    /// The presented certificate is not (or no longer) known to the controller.
    CertificateUnknown,
    /// The presented certificate was revoked by an administrator.
    CertificateRevoked,
    /// The join token is not known.
    TokenUnknown,
    /// The join token has expired.
    TokenExpired,
    /// The join token was already used.
    TokenUsed,
    /// User name or password wrong (deliberately not saying which).
    BadCredentials,
    /// The user account is disabled.
    UserDisabled,
    /// The device's enrolment is waiting for an administrator.
    DevicePending,
    /// An administrator denied the device's enrolment.
    DeviceDenied,
    /// The device was revoked.
    DeviceRevoked,
    /// The request is well-formed but not acceptable (bad CSR, name taken, bad network…).
    BadRequest,
    /// This kind of peer may not make this request.
    Forbidden,
    /// Something failed inside the controller; it was logged there.
    Internal,
    /// The policy engine said no; `details` lists every reason.
    AccessDenied,
    /// No such resource (or grant).
    NotFound,
    /// A gateway serving the resource did not confirm in time; nothing was granted.
    GatewayUnavailable,
    /// A posture report's counter is not above the last accepted one: an old report replayed
    /// (or reordered); it was refused and audited.
    ReportReplayed,
    /// Too many failed logins: the account is locked for a while (the message says until
    /// when).
    LockedOut,
    /// The account has a second factor and the login carried no one-time code.
    TotpRequired,
    /// The device has no live login session (never logged in, expired, idle, or ended):
    /// run `wardgate login`.
    LoginRequired,
    /// The identity provider's token was refused (the message says why).
    IdentityRejected,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The serde name is the stable spelling.
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("{self:?}"));
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable_and_tagged() {
        let m = ServerMsg::Response {
            id: 7,
            result: Err(WireError::new(ErrorCode::TokenUsed, "used")),
        };
        let s = serde_json::to_string(&m).expect("json");
        assert_eq!(
            s,
            r#"{"type":"response","id":7,"result":{"Err":{"code":"token_used","message":"used"}}}"#
        );
        assert_eq!(
            ErrorCode::CertificateRevoked.to_string(),
            "certificate_revoked"
        );
        let r: ClientMsg =
            serde_json::from_str(r#"{"type":"request","id":1,"body":{"op":"who_am_i"}}"#)
                .expect("parse");
        assert_eq!(
            r,
            ClientMsg::Request {
                id: 1,
                body: Request::WhoAmI
            }
        );
    }

    #[test]
    fn every_response_shape_serialises() {
        // Internally tagged enums cannot hold bare sequences; this catches such a variant.
        let g = crate::grant::GatewayGrant {
            grant_id: 1,
            client_public_key: "k".into(),
            preshared_key: Secret::new("p"),
            tunnel_addr: "100.64.0.2".parse().expect("ip"),
            rules: vec![],
            expires_at_ms: 1,
            label: "l".into(),
        };
        for r in [
            Response::GatewayGrants {
                grants: vec![g.clone()],
            },
            Response::Done,
            Response::HeartbeatAck {
                seq: 1,
                server_time_ms: 2,
            },
        ] {
            let m = ServerMsg::Response {
                id: 1,
                result: Ok(r),
            };
            let bytes = crate::frame::encode(&m).expect("encodes");
            let back: ServerMsg = serde_json::from_slice(&bytes[4..]).expect("decodes");
            assert_eq!(back, m);
        }
        let p = ServerMsg::Push {
            push_id: 3,
            push: Push::AddGrant(g),
        };
        let bytes = crate::frame::encode(&p).expect("push encodes");
        assert_eq!(
            serde_json::from_slice::<ServerMsg>(&bytes[4..]).expect("decodes"),
            p
        );
    }

    #[test]
    fn passwords_never_show_in_debug() {
        let l = Login::Local {
            username: "amara".into(),
            password: Secret::new("hunter2-secret"),
            totp: Some(Secret::new("123456")),
        };
        let d = format!("{l:?}");
        assert!(d.contains("amara"));
        assert!(!d.contains("hunter2"));
        assert!(!d.contains("123456"));
        let o = Login::Oidc {
            id_token: Secret::new("eyJ.secret.token"),
            nonce: Some("n".into()),
        };
        assert!(!format!("{o:?}").contains("eyJ"));
        let c = Login::OidcCode(Box::new(OidcCodeLogin {
            issuer: "https://idp".into(),
            client_id: "wardgate-cli".into(),
            code: Secret::new("code-secret"),
            code_verifier: Secret::new("verifier-secret"),
            redirect_uri: "http://127.0.0.1:1/callback".into(),
            nonce: "n".into(),
        }));
        let d = format!("{c:?}");
        assert!(!d.contains("code-secret") && !d.contains("verifier-secret"));
        // On the wire it is one flat object like the other logins.
        let json = serde_json::to_value(&c).expect("json");
        assert_eq!(json["method"], "oidc_code");
        assert_eq!(json["client_id"], "wardgate-cli");
        assert_eq!(serde_json::from_value::<Login>(json).expect("parses"), c);
        // An older client's local login (no totp field) still parses.
        let old: Login =
            serde_json::from_str(r#"{"method":"local","username":"a","password":"p"}"#)
                .expect("parses");
        assert!(matches!(old, Login::Local { totp: None, .. }));
    }
}

/// QUIC application close codes of the control connection. Clients tell a deliberate end
/// (refused: revoked, disabled — stop and say why) from a controller going away (shutdown,
/// restart — keep the tunnel until its grant expires and reconnect).
pub mod close {
    /// Normal close.
    pub const NORMAL: u32 = 0;
    /// The peer's connection was replaced by a newer one.
    pub const REPLACED: u32 = 1;
    /// The connection was refused or cut by policy (see the reason / Fatal frame).
    pub const REFUSED: u32 = 2;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 3;
    /// The controller is shutting down (it will be back; reconnect).
    pub const SHUTDOWN: u32 = 4;
}
