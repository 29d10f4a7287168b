//! The client side of a control connection, shared by gateways and the `wardgate` client:
//! dial, say hello, then ask and wait for answers on the one control stream.

use std::net::SocketAddr;
use std::time::Duration;

use crate::frame::{self, FrameError};
use crate::proto::{ClientMsg, PROTOCOL_VERSION, Request, Response, ServerMsg, WireError};

/// How long dialling plus the hello exchange may take before we report the controller as
/// unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why talking to the controller failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The controller address did not resolve.
    #[error("cannot resolve controller address {addr}: {detail}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// Why.
        detail: String,
    },
    /// A local socket could not be opened.
    #[error("cannot open a local UDP socket: {0}")]
    Bind(#[source] std::io::Error),
    /// The connection could not be started.
    #[error("cannot start a connection to the controller: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed (TLS refusal, timeout, controller shut down).
    #[error("control connection failed: {err}{hint}", hint = connection_hint(.0), err = .0)]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to the stream failed.
    #[error("control stream failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// A frame was bad.
    #[error("control stream: {0}")]
    Frame(#[from] FrameError),
    /// The controller refused, with its reason.
    #[error("the controller refused: {0}")]
    Rejected(WireError),
    /// The controller sent something the protocol does not allow here.
    #[error("unexpected message from the controller: {0}")]
    Unexpected(String),
    /// The controller did not answer in time.
    #[error(
        "the controller did not answer within {0:?}; check the address and that `wardgate-controller serve` is running"
    )]
    Timeout(Duration),
}

fn connection_hint(e: &quinn::ConnectionError) -> &'static str {
    let s = e.to_string();
    if s.contains("UnknownIssuer") || s.contains("unknown issuer") {
        " (certificate not issued by the pinned Wardgate CA: check the --ca file, or re-enrol)"
    } else if s.contains("BadCertificate") || s.contains("bad certificate") {
        " (a certificate was refused: re-enrol or re-join)"
    } else if s.contains("timed out") {
        " (is the controller running and reachable over UDP?)"
    } else {
        ""
    }
}

impl ClientError {
    /// The controller's reason, when it gave one.
    pub fn wire(&self) -> Option<&WireError> {
        match self {
            ClientError::Rejected(w) => Some(w),
            _ => None,
        }
    }
}

/// An open control connection after a successful hello.
pub struct ControlClient {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    next_id: u64,
    server_software: String,
}

/// Resolves `host:port` to the first address.
pub async fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    let mut it = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| ClientError::Resolve {
            addr: addr.to_owned(),
            detail: e.to_string(),
        })?;
    it.next().ok_or_else(|| ClientError::Resolve {
        addr: addr.to_owned(),
        detail: "no addresses".into(),
    })
}

impl ControlClient {
    /// Dials the controller at `addr` and performs the hello exchange.
    pub async fn connect(
        addr: &str,
        cfg: quinn::ClientConfig,
        software: &str,
    ) -> Result<Self, ClientError> {
        let target = resolve(addr).await?;
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(target, cfg, software))
            .await
            .map_err(|_| ClientError::Timeout(CONNECT_TIMEOUT))?
    }

    async fn connect_inner(
        target: SocketAddr,
        cfg: quinn::ClientConfig,
        software: &str,
    ) -> Result<Self, ClientError> {
        let bind: SocketAddr = if target.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(ClientError::Bind)?;
        endpoint.set_default_client_config(cfg);
        let conn = endpoint
            .connect(target, crate::pki::CONTROLLER_NAME)?
            .await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        frame::write_frame(
            &mut send,
            &ClientMsg::Hello {
                protocol_version: PROTOCOL_VERSION,
                software: software.to_owned(),
            },
        )
        .await?;
        match frame::read_frame::<_, ServerMsg>(&mut recv).await? {
            Some(ServerMsg::Welcome { software, .. }) => Ok(Self {
                endpoint,
                conn,
                send,
                recv,
                next_id: 1,
                server_software: software,
            }),
            Some(ServerMsg::Fatal(e)) => Err(ClientError::Rejected(e)),
            Some(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
            None => Err(Self::closed_reason(&conn)),
        }
    }

    fn closed_reason(conn: &quinn::Connection) -> ClientError {
        match conn.close_reason() {
            Some(e) => ClientError::Connection(e),
            None => ClientError::Unexpected("the controller closed the stream".into()),
        }
    }

    /// The controller's software version from its welcome.
    pub fn server_software(&self) -> &str {
        &self.server_software
    }

    /// Sends one request and waits for its answer.
    pub async fn request(&mut self, body: Request) -> Result<Response, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        frame::write_frame(&mut self.send, &ClientMsg::Request { id, body }).await?;
        match frame::read_frame::<_, ServerMsg>(&mut self.recv).await? {
            Some(ServerMsg::Response { id: rid, result }) if rid == id => {
                result.map_err(ClientError::Rejected)
            }
            Some(ServerMsg::Fatal(e)) => Err(ClientError::Rejected(e)),
            Some(ServerMsg::Response { id: rid, .. }) => Err(ClientError::Unexpected(format!(
                "answer to request {rid} while waiting for {id}"
            ))),
            Some(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
            None => Err(Self::closed_reason(&self.conn)),
        }
    }

    /// Resolves when the controller closes the connection (revocation, shutdown, idle timeout).
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.conn.closed().await
    }

    /// Closes politely and waits briefly for the close to be sent.
    pub async fn close(mut self) {
        let _ = self.send.finish();
        self.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// A long-lived control connection (gateway `run`, client `connect`): requests may be in
/// flight while the controller pushes changes, so a reader task routes responses to their
/// callers by id and pushes to [`ControlSession::next_push`], and a writer task serialises
/// what the caller sends. Control plane only: the small shared map is not on a packet path.
pub struct ControlSession {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    out: tokio::sync::mpsc::Sender<ClientMsg>,
    pending: std::sync::Arc<std::sync::Mutex<Pending>>,
    pushes: tokio::sync::mpsc::Receiver<(u64, crate::proto::Push)>,
    next_id: std::sync::atomic::AtomicU64,
    fatal: std::sync::Arc<std::sync::Mutex<Option<WireError>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

type Pending =
    std::collections::HashMap<u64, tokio::sync::oneshot::Sender<Result<Response, WireError>>>;

/// How long a request on a session may wait for its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl ControlClient {
    /// Turns a connected client into a session that also receives pushes.
    pub fn into_session(self) -> ControlSession {
        use std::sync::{Arc, Mutex};
        let ControlClient {
            endpoint,
            conn,
            mut send,
            mut recv,
            next_id,
            ..
        } = self;
        let pending: Arc<Mutex<Pending>> = Arc::default();
        let fatal: Arc<Mutex<Option<WireError>>> = Arc::default();
        let (out, mut out_rx) = tokio::sync::mpsc::channel::<ClientMsg>(64);
        let (push_tx, pushes) = tokio::sync::mpsc::channel(256);
        let writer = tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if frame::write_frame(&mut send, &m).await.is_err() {
                    break;
                }
            }
            let _ = send.finish();
        });
        let (p, f) = (pending.clone(), fatal.clone());
        let reader = tokio::spawn(async move {
            loop {
                match frame::read_frame::<_, ServerMsg>(&mut recv).await {
                    Ok(Some(ServerMsg::Response { id, result })) => {
                        let waiter = p.lock().ok().and_then(|mut m| m.remove(&id));
                        if let Some(w) = waiter {
                            let _ = w.send(result);
                        }
                    }
                    Ok(Some(ServerMsg::Push { push_id, push })) => {
                        if push_tx.send((push_id, push)).await.is_err() {
                            break;
                        }
                    }
                    Ok(Some(ServerMsg::Fatal(e))) => {
                        if let Ok(mut slot) = f.lock() {
                            *slot = Some(e);
                        }
                        break;
                    }
                    Ok(Some(ServerMsg::Welcome { .. })) | Ok(None) | Err(_) => break,
                }
            }
            // Wake every waiter: their senders drop here.
            if let Ok(mut m) = p.lock() {
                m.clear();
            }
        });
        ControlSession {
            endpoint,
            conn,
            out,
            pending,
            pushes,
            next_id: std::sync::atomic::AtomicU64::new(next_id),
            fatal,
            tasks: vec![writer, reader],
        }
    }
}

impl ControlSession {
    fn ended(&self) -> ClientError {
        if let Some(e) = self.fatal.lock().ok().and_then(|f| f.clone()) {
            return ClientError::Rejected(e);
        }
        match self.conn.close_reason() {
            Some(e) => ClientError::Connection(e),
            None => ClientError::Unexpected("the control connection ended".into()),
        }
    }

    /// Sends a request and waits for its answer (several may be in flight).
    pub async fn request(&self, body: Request) -> Result<Response, ClientError> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Ok(mut m) = self.pending.lock() {
            m.insert(id, tx);
        }
        if self
            .out
            .send(ClientMsg::Request { id, body })
            .await
            .is_err()
        {
            return Err(self.ended());
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(result)) => result.map_err(ClientError::Rejected),
            Ok(Err(_)) => Err(self.ended()),
            Err(_) => {
                if let Ok(mut m) = self.pending.lock() {
                    m.remove(&id);
                }
                Err(ClientError::Timeout(REQUEST_TIMEOUT))
            }
        }
    }

    /// The next push, or `None` once the connection has ended (see [`ControlSession::error`]).
    pub async fn next_push(&mut self) -> Option<(u64, crate::proto::Push)> {
        self.pushes.recv().await
    }

    /// Answers a push.
    pub async fn ack(&self, push_id: u64, result: Result<(), String>) {
        let _ = self.out.send(ClientMsg::Ack { push_id, result }).await;
    }

    /// Why the session ended.
    pub fn error(&self) -> ClientError {
        self.ended()
    }

    /// Closes politely.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        for t in self.tasks {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}
