//! Device enrolment: make the device key here, send a CSR with the user's login, and store the
//! certificate — at once, or after an administrator approves (polling with a secret that proves
//! we are the device that asked).

use std::time::Duration;

use tracing::info;
use wardgate_common::proto::{EnrolDevice, ErrorCode, Login, Request, Response, Secret};
use wardgate_common::transport::{ClientError, ControlClient};
use wardgate_common::{files, pki, tls};

use crate::state::{ConfigDir, DeviceRecord, Enrolment, StateError};

/// Why enrolment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    /// Local state problem.
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
    /// An administrator denied the device.
    #[error(
        "enrolment of device {device_id} was denied by an administrator; contact your IT helpdesk"
    )]
    Denied {
        /// The device id.
        device_id: String,
    },
    /// Still pending when we stopped waiting.
    #[error(
        "device {device_id} is still waiting for an administrator's approval; run `wardgate enrol` again to keep waiting"
    )]
    StillPending {
        /// The device id.
        device_id: String,
    },
    /// The device is already enrolled.
    #[error(
        "this device is already enrolled as {device_id}; use another --config-dir to enrol again"
    )]
    AlreadyEnrolled {
        /// The device id.
        device_id: String,
    },
    /// The controller answered something unexpected.
    #[error("unexpected answer from the controller: {0}")]
    Unexpected(String),
}

/// Options of `wardgate enrol`.
pub struct EnrolOptions {
    /// Controller `host:port`.
    pub controller: String,
    /// The controller's CA (PEM).
    pub ca_pem: Vec<u8>,
    /// The user's login.
    pub login: Login,
    /// The device's name.
    pub device_name: String,
    /// How long to wait for approval (zero: don't wait).
    pub wait: Duration,
    /// Poll interval while waiting.
    pub poll_every: Duration,
}

/// What enrolment achieved.
#[derive(Debug, Clone, PartialEq)]
pub enum EnrolOutcome {
    /// Enrolled; the certificate is stored.
    Enrolled(DeviceRecord),
}

fn software() -> String {
    format!("wardgate {}", wardgate_common::SOFTWARE_VERSION)
}

fn os_description() -> String {
    let pretty = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_owned())
            })
        });
    pretty.unwrap_or_else(|| std::env::consts::OS.to_owned())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .or_else(|_| std::env::var("COMPUTERNAME"))
        .unwrap_or_default()
}

/// The default device name: the host name.
pub fn default_device_name() -> String {
    let h = hostname();
    if h.is_empty() { "device".into() } else { h }
}

fn ca_der(ca_pem: &[u8]) -> Result<rustls::pki_types::CertificateDer<'static>, EnrolError> {
    pki::certs_from_pem("CA certificate", ca_pem)?
        .into_iter()
        .next()
        .ok_or_else(|| EnrolError::Unexpected("empty CA file".into()))
}

fn store_cert(
    dir: &ConfigDir,
    rec: &mut DeviceRecord,
    cert_pem: &str,
    ca_pem: &str,
) -> Result<(), EnrolError> {
    files::write_public(&dir.cert(), cert_pem.as_bytes())?;
    files::write_public(&dir.ca(), ca_pem.as_bytes())?;
    rec.enrolment = Enrolment::Enrolled;
    dir.save(rec)?;
    let _ = std::fs::remove_file(dir.poll_token());
    Ok(())
}

/// Enrols this device (or resumes waiting for a pending enrolment).
pub async fn enrol(dir: &ConfigDir, opts: EnrolOptions) -> Result<EnrolOutcome, EnrolError> {
    files::create_private_dir(dir.root())?;
    let ca = ca_der(&opts.ca_pem)?;
    let existing = dir.load()?;
    let mut rec = match existing {
        Some(r) if r.enrolment == Enrolment::Enrolled => {
            return Err(EnrolError::AlreadyEnrolled {
                device_id: r.device_id,
            });
        }
        Some(r) if r.enrolment == Enrolment::Pending && dir.poll_token().exists() => r,
        _ => {
            // A fresh key for a fresh enrolment; it never leaves this machine.
            let kc = pki::generate_key_and_csr("wardgate device")?;
            files::write_secret(&dir.key(), kc.key_pem.as_bytes())?;
            files::write_public(&dir.ca(), &opts.ca_pem)?;
            let cfg = tls::client_config(&ca, None)?;
            let mut client = ControlClient::connect(&opts.controller, cfg, &software()).await?;
            let username = opts.login.local_username().unwrap_or_default().to_owned();
            let answer = client
                .request(Request::EnrolDevice(EnrolDevice {
                    login: opts.login,
                    device_name: opts.device_name.clone(),
                    csr_pem: kc.csr_pem,
                    os: os_description(),
                    hostname: hostname(),
                }))
                .await;
            client.close().await;
            match answer? {
                Response::Enrolled {
                    device_id,
                    cert_pem,
                    ca_pem,
                    session,
                } => {
                    let mut rec = DeviceRecord {
                        controller: opts.controller,
                        device_id,
                        device_name: opts.device_name,
                        // The controller names OIDC users; the login alone does not.
                        username: session.map_or(username, |s| s.username),
                        enrolment: Enrolment::Pending,
                    };
                    store_cert(dir, &mut rec, &cert_pem, &ca_pem)?;
                    info!(device = %rec.device_id, "device enrolled");
                    return Ok(EnrolOutcome::Enrolled(rec));
                }
                Response::EnrolPending {
                    device_id,
                    poll_token,
                } => {
                    files::write_secret(&dir.poll_token(), poll_token.expose().as_bytes())?;
                    let rec = DeviceRecord {
                        controller: opts.controller,
                        device_id,
                        device_name: opts.device_name,
                        username,
                        enrolment: Enrolment::Pending,
                    };
                    dir.save(&rec)?;
                    eprintln!(
                        "Device {} is waiting for an administrator's approval (ask your IT team to approve it).",
                        rec.device_id
                    );
                    rec
                }
                other => return Err(EnrolError::Unexpected(format!("{other:?}"))),
            }
        }
    };
    let poll_token = Secret::new(
        String::from_utf8_lossy(&files::read_secret(&dir.poll_token())?)
            .trim()
            .to_owned(),
    );
    let deadline = tokio::time::Instant::now() + opts.wait;
    loop {
        let cfg = tls::client_config(&ca, None)?;
        let mut client = ControlClient::connect(&rec.controller, cfg, &software()).await?;
        let answer = client
            .request(Request::EnrolPoll {
                device_id: rec.device_id.clone(),
                poll_token: poll_token.clone(),
            })
            .await;
        client.close().await;
        match answer {
            Ok(Response::Enrolled {
                cert_pem, ca_pem, ..
            }) => {
                store_cert(dir, &mut rec, &cert_pem, &ca_pem)?;
                info!(device = %rec.device_id, "device approved and enrolled");
                return Ok(EnrolOutcome::Enrolled(rec));
            }
            Ok(other) => return Err(EnrolError::Unexpected(format!("{other:?}"))),
            Err(e) => match e.wire().map(|w| w.code) {
                Some(ErrorCode::DevicePending) => {}
                Some(ErrorCode::DeviceDenied) => {
                    rec.enrolment = Enrolment::Denied;
                    dir.save(&rec)?;
                    let _ = std::fs::remove_file(dir.poll_token());
                    return Err(EnrolError::Denied {
                        device_id: rec.device_id,
                    });
                }
                _ => return Err(e.into()),
            },
        }
        if tokio::time::Instant::now() + opts.poll_every > deadline {
            return Err(EnrolError::StillPending {
                device_id: rec.device_id,
            });
        }
        tokio::time::sleep(opts.poll_every).await;
    }
}

/// The mTLS configuration of an enrolled device.
pub fn client_config(dir: &ConfigDir) -> Result<quinn::ClientConfig, EnrolError> {
    let ca = ca_der(&files::read_public(&dir.ca())?)?;
    let chain = pki::certs_from_pem("device certificate", &files::read_public(&dir.cert())?)?;
    let key = pki::key_from_pem("device key", &files::read_secret(&dir.key())?)?;
    Ok(tls::client_config(&ca, Some((chain, key)))?)
}
