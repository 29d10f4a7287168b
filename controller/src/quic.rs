//! The QUIC control-plane server: accepts connections, identifies the peer by its client
//! certificate, checks the hello, then answers requests on the control stream. Every refusal is
//! a [`ServerMsg::Fatal`] with a specific code, followed by closing that one connection; the
//! endpoint keeps serving everyone else.

use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::CancelToken;
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info, info_span, warn};
use wardgate_common::frame::{self, FrameError};
use wardgate_common::pki;
use wardgate_common::proto::{
    ClientMsg, ErrorCode, PROTOCOL_VERSION, Request, Response, ServerMsg, WireError,
};

use crate::service::{
    CLOSE_NORMAL, CLOSE_PROTOCOL, CLOSE_REFUSED, Controller, Peer, cert_required,
};

/// At most this many connections are handled at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 8192;
/// A peer must open its control stream and say hello within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// An anonymous connection may make only a few requests (join, enrol, poll).
const MAX_ANONYMOUS_REQUESTS: u32 = 8;

/// Runs the accept loop until `cancel` fires, then closes the endpoint.
pub async fn serve(ctl: Arc<Controller>, endpoint: quinn::Endpoint, mut cancel: CancelToken) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = cancel.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let ctl = ctl.clone();
        let remote = incoming.remote_address();
        tokio::spawn(
            async move {
                handle_incoming(ctl, incoming).await;
                drop(permit);
            }
            .instrument(info_span!("conn", %remote)),
        );
    }
    endpoint.close(
        crate::service::CLOSE_SHUTDOWN.into(),
        b"controller shutting down",
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// Sends a fatal error on the control stream, waits briefly for it to be delivered, then
/// closes the connection.
async fn refuse(conn: &quinn::Connection, send: &mut quinn::SendStream, err: WireError, code: u32) {
    debug!(code = %err.code, "refusing connection");
    let _ = frame::write_frame(send, &ServerMsg::Fatal(err.clone())).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(code.into(), err.code.to_string().as_bytes());
}

fn frame_error_to_wire(e: &FrameError) -> WireError {
    match e {
        FrameError::TooLarge { len, max } => WireError::new(
            ErrorCode::FrameTooLarge,
            format!("frame of {len} bytes exceeds the {max}-byte limit"),
        ),
        FrameError::Malformed(detail) => {
            WireError::new(ErrorCode::Malformed, format!("malformed message: {detail}"))
        }
        FrameError::Truncated { .. } | FrameError::Io(_) => {
            WireError::new(ErrorCode::Malformed, e.to_string())
        }
    }
}

async fn handle_incoming(ctl: Arc<Controller>, incoming: quinn::Incoming) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // TLS refusals (certificate from another CA, wrong ALPN) end here.
            info!(error = %e, "handshake failed");
            return;
        }
    };
    let fingerprint = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|certs| certs.first().map(pki::fingerprint));
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(error = %e, "connection ended before opening a stream");
            return;
        }
        Err(_) => {
            conn.close(CLOSE_PROTOCOL.into(), b"no control stream opened in time");
            return;
        }
    };
    // The hello comes first, before we say anything about identity: an old client learns it is
    // too old even if its certificate is fine.
    let hello =
        tokio::time::timeout(HELLO_TIMEOUT, frame::read_frame::<_, ClientMsg>(&mut recv)).await;
    match hello {
        Ok(Ok(Some(ClientMsg::Hello {
            protocol_version,
            software,
        }))) => {
            if protocol_version != PROTOCOL_VERSION {
                let err = WireError::new(
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "this controller speaks protocol version {PROTOCOL_VERSION}, the peer ({software}) speaks {protocol_version}; upgrade the older side"
                    ),
                );
                refuse(&conn, &mut send, err, CLOSE_PROTOCOL).await;
                return;
            }
        }
        Ok(Ok(Some(_))) => {
            let err = WireError::new(
                ErrorCode::ProtocolViolation,
                "the first message must be a hello",
            );
            refuse(&conn, &mut send, err, CLOSE_PROTOCOL).await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            refuse(&conn, &mut send, frame_error_to_wire(&e), CLOSE_PROTOCOL).await;
            return;
        }
        Err(_) => {
            let err = WireError::new(ErrorCode::ProtocolViolation, "no hello within 10 s");
            refuse(&conn, &mut send, err, CLOSE_PROTOCOL).await;
            return;
        }
    }
    let peer = match ctl.identify(fingerprint).await {
        Ok(p) => p,
        Err(err) => {
            refuse(&conn, &mut send, err, CLOSE_REFUSED).await;
            return;
        }
    };
    let welcome = ServerMsg::Welcome {
        protocol_version: PROTOCOL_VERSION,
        software: format!("wardgate-controller {}", wardgate_common::SOFTWARE_VERSION),
    };
    if frame::write_frame(&mut send, &welcome).await.is_err() {
        return;
    }
    let subject = match &peer {
        Peer::Anonymous => None,
        Peer::Gateway(g) => Some(format!("gateway:{}", g.id)),
        Peer::Device(d) => Some(format!("device:{}", d.id)),
    };
    // Frames to write (responses and pushes) go through one queue, so pushes can be sent while
    // requests are handled; a reader task turns the stream into messages (frame reads are not
    // cancel-safe, so they must not race in a select).
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<ServerMsg>(256);
    let link = std::sync::Arc::new(crate::access::PeerLink::new(out_tx.clone()));
    if let Some(s) = &subject {
        ctl.registry.insert(s.clone(), conn.clone(), link.clone());
        info!(peer = %s, "peer connected");
    }
    let span = info_span!("peer", actor = %peer.actor());
    serve_requests(&ctl, &conn, &mut send, recv, &peer, &link, out_tx, out_rx)
        .instrument(span)
        .await;
    if let Some(s) = &subject {
        ctl.registry.remove(s, &conn);
        info!(peer = %s, "peer disconnected");
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_requests(
    ctl: &Arc<Controller>,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: &Peer,
    link: &crate::access::PeerLink,
    out_tx: tokio::sync::mpsc::Sender<ServerMsg>,
    mut out_rx: tokio::sync::mpsc::Receiver<ServerMsg>,
) {
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Result<ClientMsg, FrameError>>(32);
    let reader = tokio::spawn(async move {
        loop {
            match frame::read_frame::<_, ClientMsg>(&mut recv).await {
                Ok(Some(m)) => {
                    if in_tx.send(Ok(m)).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = in_tx.send(Err(e)).await;
                    break;
                }
            }
        }
    });
    let mut anonymous_requests = 0u32;
    let mut requests: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            out = out_rx.recv() => {
                let Some(msg) = out else {
                    debug!("push queue closed");
                    break;
                };
                if let Err(e) = frame::write_frame(send, &msg).await {
                    warn!(error = %e, "cannot send a push; closing the connection");
                    break;
                }
            }
            msg = in_rx.recv() => {
                let msg = match msg {
                    None => {
                        debug!("peer finished the control stream");
                        conn.close(CLOSE_NORMAL.into(), b"bye");
                        break;
                    }
                    Some(Err(FrameError::Io(e))) => {
                        debug!(error = %e, "control stream ended");
                        break;
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "bad frame from peer");
                        refuse(conn, send, frame_error_to_wire(&e), CLOSE_PROTOCOL).await;
                        break;
                    }
                    Some(Ok(m)) => m,
                };
                let (id, body) = match msg {
                    ClientMsg::Request { id, body } => (id, body),
                    ClientMsg::Ack { push_id, result } => {
                        link.complete(push_id, result);
                        continue;
                    }
                    ClientMsg::Hello { .. } => {
                        let err = WireError::new(ErrorCode::ProtocolViolation, "hello sent twice");
                        refuse(conn, send, err, CLOSE_PROTOCOL).await;
                        break;
                    }
                };
                if matches!(peer, Peer::Anonymous) {
                    anonymous_requests += 1;
                    if anonymous_requests > MAX_ANONYMOUS_REQUESTS {
                        let err = WireError::new(ErrorCode::Forbidden, "too many requests without a certificate");
                        refuse(conn, send, err, CLOSE_REFUSED).await;
                        break;
                    }
                }
                // A connect waits for gateway acks, which arrive on *their* connections; it runs
                // as its own task so this connection keeps reading meanwhile.
                if let (Request::Connect { resource, wg_public_key, renews }, Peer::Device(d)) = (&body, peer) {
                    let (ctl2, tx) = (ctl.clone(), out_tx.clone());
                    let (device, resource, key, renews) = (d.id.clone(), resource.clone(), wg_public_key.clone(), *renews);
                    requests.spawn(async move {
                        let result = ctl2.connect(&device, &resource, &key, renews).await.map(Response::Granted);
                        let _ = tx.send(ServerMsg::Response { id, result }).await;
                    });
                    continue;
                }
                if let (Request::BreakGlass { resource, reason, wg_public_key }, Peer::Device(d)) = (&body, peer) {
                    let (ctl2, tx) = (ctl.clone(), out_tx.clone());
                    let (device, resource, reason, key) = (d.id.clone(), resource.clone(), reason.clone(), wg_public_key.clone());
                    requests.spawn(async move {
                        let result = ctl2.break_glass(&device, &resource, &reason, &key).await.map(Response::Granted);
                        let _ = tx.send(ServerMsg::Response { id, result }).await;
                    });
                    continue;
                }
                let result = dispatch(ctl, peer, body).await;
                if let Err(e) = frame::write_frame(send, &ServerMsg::Response { id, result }).await {
                    warn!(error = %e, "cannot send a response; closing the connection");
                    break;
                }
            }
        }
    }
    reader.abort();
    requests.abort_all();
}

async fn dispatch(ctl: &Controller, peer: &Peer, body: Request) -> Result<Response, WireError> {
    match (body, peer) {
        (Request::JoinGateway(j), _) => ctl.join_gateway(j).await,
        (Request::EnrolDevice(e), _) => ctl.enrol_device(e).await,
        (
            Request::EnrolPoll {
                device_id,
                poll_token,
            },
            _,
        ) => ctl.enrol_poll(&device_id, &poll_token).await,
        (_, Peer::Anonymous) => Err(cert_required()),
        (Request::Login { login }, Peer::Device(d)) => ctl.login_device(d, login).await,
        (Request::Login { .. }, _) => Err(WireError::new(
            ErrorCode::Forbidden,
            "only enrolled devices log in",
        )),
        (Request::Heartbeat { seq }, p) => ctl.heartbeat(p, seq).await,
        (Request::WhoAmI, p) => ctl.who_am_i(p).await,
        (Request::SyncGrants, Peer::Gateway(g)) => ctl
            .gateway_grants(&g.id)
            .await
            .map(|grants| Response::GatewayGrants { grants }),
        (Request::ReportDrops { drops }, Peer::Gateway(g)) => {
            ctl.report_drops(g, drops).await.map(|()| Response::Done)
        }
        (Request::ReportDrops { .. }, _) => Err(WireError::new(
            ErrorCode::Forbidden,
            "only gateways report drops",
        )),
        (Request::ReportPosture { report }, Peer::Device(d)) => ctl.report_posture(d, report).await,
        (Request::ReportPosture { .. }, _) => Err(WireError::new(
            ErrorCode::Forbidden,
            "only enrolled devices report posture",
        )),
        (Request::Disconnect { grant_id }, Peer::Device(d)) => ctl
            .disconnect(&d.id, grant_id)
            .await
            .map(|()| Response::Done),
        (Request::Connect { .. } | Request::BreakGlass { .. }, Peer::Device(_)) => Err(
            WireError::new(ErrorCode::Internal, "connect is handled as a task"),
        ),
        (Request::MakeAccessRequest(r), Peer::Device(d)) => ctl
            .make_access_request(d, r)
            .await
            .map(Response::AccessRequestMade),
        (Request::ListAccessRequests, Peer::Device(d)) => ctl
            .device_access_requests(d)
            .await
            .map(|requests| Response::AccessRequests { requests }),
        (Request::MakeAccessRequest(_) | Request::ListAccessRequests, _) => Err(WireError::new(
            ErrorCode::Forbidden,
            "only enrolled devices make access requests",
        )),
        (Request::SyncGrants, _) => Err(WireError::new(
            ErrorCode::Forbidden,
            "only gateways sync grants",
        )),
        (Request::Connect { .. } | Request::Disconnect { .. } | Request::BreakGlass { .. }, _) => {
            Err(WireError::new(
                ErrorCode::Forbidden,
                "only enrolled devices ask for access",
            ))
        }
    }
}
