//! The gateway's local control socket: a Unix socket (mode 0600) speaking JSON lines, so an
//! operator on the gateway host (and the end-to-end tests) can list counters, and install or
//! remove grants directly when running the data plane without a controller.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};
use wardgate_common::grant::GatewayGrant;

use crate::datapath::{Handle, Stats};

/// Longest accepted request line.
const MAX_LINE: usize = 1024 * 1024;

/// A request on the local socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum LocalRequest {
    /// Install a grant.
    Add {
        /// The grant.
        grant: GatewayGrant,
    },
    /// Remove a grant.
    Remove {
        /// Its id.
        grant_id: u64,
    },
    /// Counters.
    Stats,
}

/// The answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum LocalResponse {
    /// Done.
    Ok,
    /// Whether the removed grant existed.
    Removed {
        /// It existed.
        existed: bool,
    },
    /// Counters.
    Stats {
        /// The counters.
        stats: serde_json::Value,
    },
    /// Refused.
    Error {
        /// Why.
        message: String,
    },
}

/// Why the local socket failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// IO on the socket.
    #[error("local control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bad answer.
    #[error("bad answer on the local control socket: {0}")]
    Protocol(String),
}

/// Whether the socket may install grants. A gateway run by a controller takes grants only
/// from it (the store is the truth, and every grant needs its decision and audit row), so
/// there the socket can list and remove but never add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adds {
    /// Standalone data plane (`wardgate-gateway dataplane`): the operator installs grants.
    Allowed,
    /// Controller-managed (`wardgate-gateway run`): adds are refused.
    ControllerOnly,
}

/// Serves the socket until the task is dropped.
pub async fn serve(
    path: &Path,
    handle: Handle,
    adds: Adds,
) -> Result<tokio::task::JoinHandle<()>, LocalError> {
    let io = |source| LocalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let h = handle.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_conn(stream, h, adds).await {
                    debug!(error = %e, "local control connection ended");
                }
            });
        }
    }))
}

async fn serve_conn(stream: UnixStream, handle: Handle, adds: Adds) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    // A connection may send at most 64 requests' worth of bytes: the socket is local and
    // private, but a runaway client must not make the gateway buffer without bound.
    let mut lines = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_LINE as u64 * 64)).lines();
    while let Some(line) = lines.next_line().await? {
        let resp = if line.len() > MAX_LINE {
            LocalResponse::Error {
                message: "request too long".into(),
            }
        } else {
            match serde_json::from_str::<LocalRequest>(&line) {
                Err(e) => LocalResponse::Error {
                    message: format!("malformed request: {e}"),
                },
                Ok(LocalRequest::Add { grant }) if adds == Adds::ControllerOnly => {
                    warn!(
                        grant = grant.grant_id,
                        "refused a grant installed through the local socket"
                    );
                    LocalResponse::Error {
                        message: "this gateway takes grants only from its controller; use the \
                                  admin API (local installs are for `wardgate-gateway dataplane`)"
                            .into(),
                    }
                }
                Ok(LocalRequest::Add { grant }) => match handle.add_grant(grant).await {
                    Ok(()) => LocalResponse::Ok,
                    Err(e) => LocalResponse::Error {
                        message: e.to_string(),
                    },
                },
                Ok(LocalRequest::Remove { grant_id }) => {
                    match handle.remove_grant(grant_id).await {
                        Ok(existed) => LocalResponse::Removed { existed },
                        Err(e) => LocalResponse::Error {
                            message: e.to_string(),
                        },
                    }
                }
                Ok(LocalRequest::Stats) => match handle.stats().await {
                    Ok(s) => LocalResponse::Stats {
                        stats: serde_json::to_value::<Stats>(s).unwrap_or_default(),
                    },
                    Err(e) => LocalResponse::Error {
                        message: e.to_string(),
                    },
                },
            }
        };
        let mut bytes = serde_json::to_vec(&resp).unwrap_or_default();
        bytes.push(b'\n');
        if let Err(e) = w.write_all(&bytes).await {
            warn!(error = %e, "cannot answer on the local control socket");
            break;
        }
    }
    Ok(())
}

/// Sends one request and returns the answer.
pub async fn request(path: &Path, req: &LocalRequest) -> Result<LocalResponse, LocalError> {
    let io = |source| LocalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(path).await.map_err(io)?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| LocalError::Protocol(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line).await.map_err(io)?;
    let mut lines = BufReader::new(r).lines();
    let answer = lines
        .next_line()
        .await
        .map_err(io)?
        .ok_or_else(|| LocalError::Protocol("no answer".into()))?;
    serde_json::from_str(&answer).map_err(|e| LocalError::Protocol(e.to_string()))
}
