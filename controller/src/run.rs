//! `init` and `serve`: turning a data directory into a running controller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::json;
use tracing::info;
use wardgate_common::{files, pki, unix_ms};

use crate::ca::Ca;
use crate::config::{ConfigError, ControllerConfig, DataDir, Endpoints};
use crate::secrets::{self, TokenKind};
use crate::service::{Controller, SETTING_REQUIRE_APPROVAL};
use crate::shutdown::CancelToken;
use crate::store::{AdminToken, Store};

/// Options of `wardgate-controller init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Organisation name for the CA.
    pub organisation: String,
    /// Database URL; default SQLite in the data directory.
    pub database_url: Option<String>,
    /// QUIC listen address.
    pub quic_listen: SocketAddr,
    /// Admin API listen address.
    pub admin_listen: SocketAddr,
    /// Extra certificate names.
    pub server_names: Vec<String>,
    /// Devices wait for approval.
    pub require_device_approval: bool,
}

/// What `init` made that the operator must see once.
pub struct InitOutcome {
    /// The admin token; shown once, stored only hashed.
    pub admin_token: String,
    /// Where the CA certificate is (to hand to gateways and devices).
    pub ca_cert_path: std::path::PathBuf,
}

/// Creates the data directory, CA, server identity, database and first admin token.
pub async fn init(dir: &DataDir, opts: &InitOptions) -> anyhow::Result<InitOutcome> {
    if dir.config().exists() || dir.ca_key().exists() {
        return Err(ConfigError::AlreadyInitialised(dir.root().to_path_buf()).into());
    }
    files::create_private_dir(dir.root())?;
    let ca = Ca::generate(&opts.organisation)?;
    files::write_secret(&dir.ca_key(), ca.key_pem.as_bytes())?;
    files::write_public(&dir.ca_cert(), ca.cert_pem.as_bytes())?;
    let server_key = rcgen::KeyPair::generate()?;
    files::write_secret(&dir.server_key(), server_key.serialize_pem().as_bytes())?;
    let config = ControllerConfig {
        organisation: opts.organisation.clone(),
        database_url: opts
            .database_url
            .clone()
            .unwrap_or_else(|| dir.default_database_url()),
        quic_listen: opts.quic_listen,
        admin_listen: opts.admin_listen,
        server_names: opts.server_names.clone(),
    };
    config.save(dir)?;
    if opts.database_url.is_none() {
        // Pre-create the SQLite file 0600: it holds password and token hashes, and SQLite gives
        // its -wal and -shm files the database file's permissions.
        files::write_secret(&dir.database_file(), b"")?;
    }
    let store = Store::open(&config.database_url).await?;
    let token = secrets::new_token(TokenKind::Admin);
    let now = unix_ms(SystemTime::now());
    let rec = AdminToken {
        id: secrets::new_id("tok"),
        name: "initial admin token".into(),
        token_hash: secrets::hash_token(&token),
        created_ms: now,
        expires_ms: None,
        revoked_ms: None,
    };
    store.insert_admin_token(&rec).await?;
    store
        .set_setting(
            SETTING_REQUIRE_APPROVAL,
            if opts.require_device_approval {
                "true"
            } else {
                "false"
            },
        )
        .await?;
    let ctl_store = store.clone();
    ctl_store
        .append_audit(&crate::store::NewAuditEvent {
            at_ms: now,
            actor: "system".into(),
            action: "controller.init".into(),
            target: rec.id.clone(),
            outcome: "ok".into(),
            detail: json!({"organisation": opts.organisation, "require_device_approval": opts.require_device_approval}),
        })
        .await?;
    store.close().await;
    info!(data_dir = %dir.root().display(), "controller initialised");
    Ok(InitOutcome {
        admin_token: token,
        ca_cert_path: dir.ca_cert(),
    })
}

/// Reads `identity.json` (if present) and builds the ID-token verifier for its providers.
/// A bad file stops the start with the fix named, rather than failing at the first login.
fn load_identity(dir: &DataDir) -> anyhow::Result<Option<Arc<crate::identity::Verifier>>> {
    use crate::identity::{CacheOptions, IdentityFile, Providers, Verifier, http_client};
    let path = dir.identity();
    if !path.exists() {
        return Ok(None);
    }
    let bytes = files::read_public(&path)?;
    let file: IdentityFile = serde_json::from_slice(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid identity configuration: {e}",
            path.display()
        )
    })?;
    if file.providers.is_empty() {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &file.ca_file {
        let pem = std::fs::read(ca)
            .map_err(|e| anyhow::anyhow!("cannot read the IdP CA file {}: {e}", ca.display()))?;
        for c in pki::certs_from_pem("IdP CA", &pem)? {
            roots
                .add(c)
                .map_err(|e| anyhow::anyhow!("IdP CA file {}: {e}", ca.display()))?;
        }
    }
    let providers = Providers::new(file.providers)?;
    let names: Vec<String> = providers.all().iter().map(|p| p.name.clone()).collect();
    let http = http_client(roots, CacheOptions::default().http_timeout)?;
    info!(providers = ?names, "trusting identity providers");
    Ok(Some(Arc::new(Verifier::new(
        providers,
        http,
        CacheOptions::default(),
    ))))
}

/// A controller that is listening.
pub struct Running {
    /// Bound QUIC address.
    pub quic: SocketAddr,
    /// Bound admin address.
    pub admin: SocketAddr,
    /// The shared state (tests reach into it).
    pub controller: Arc<Controller>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Waits until both servers have stopped (after the cancel token fired).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
        self.controller.store.close().await;
    }
}

/// How often the sweeper ends lapsed login sessions, records expired grants and looks for
/// stale posture reports. A
/// stale report is noticed at most this long after it went stale.
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The sweeper: ends lapsed login sessions with their grants, records grants that ran out
/// (gateways drop them by their own clocks already) and ends grants whose device's posture
/// report has grown too old, until `cancel` fires.
async fn sweep(ctl: Arc<Controller>, mut cancel: CancelToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        // Lapsed login sessions (and their grants), then expired grants.
        ctl.sweep().await;
        ctl.sweep_requests().await;
        let ended = ctl.sweep_posture().await;
        if ended > 0 {
            info!(ended, "grants ended: posture reports too old or missing");
        }
    }
}

/// The session refresher: asks each OIDC session's provider, at the refresh interval,
/// whether the user may still be signed in (see `Controller::refresh_sessions`). Its own task,
/// so a slow provider never holds up the sweeper's session and posture work.
async fn refresh(ctl: Arc<Controller>, mut cancel: CancelToken) {
    if ctl.verifier.is_none() {
        return;
    }
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        tokio::select! {
            _ = ctl.refresh_sessions() => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// Loads the data directory, binds both listeners and starts serving until `cancel` fires.
pub async fn start(dir: &DataDir, cancel: CancelToken) -> anyhow::Result<Running> {
    let config = ControllerConfig::load(dir)?;
    let ca_cert = String::from_utf8(files::read_public(&dir.ca_cert())?)?;
    let ca_key = String::from_utf8(files::read_secret(&dir.ca_key())?)?;
    let ca = Ca::load(&ca_cert, &ca_key)?;
    // The server certificate is re-issued at every start from the kept key, so it never
    // expires on a controller that restarts now and then, and name changes take effect.
    let key_pem = String::from_utf8(files::read_secret(&dir.server_key())?)?;
    let server_key = rcgen::KeyPair::from_pem(&key_pem)?;
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    names.extend(config.server_names.iter().cloned());
    let server_cert = ca.issue_controller_cert(&server_key, &names)?;
    files::write_public(&dir.server_cert(), server_cert.as_bytes())?;
    let chain = pki::certs_from_pem("controller certificate", server_cert.as_bytes())?;
    let ca_der = pki::certs_from_pem("CA certificate", ca_cert.as_bytes())?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("empty CA certificate"))?;
    let key_der = pki::key_from_pem("controller key", key_pem.as_bytes())?;

    let store = Store::open(&config.database_url).await?;
    let verifier = load_identity(dir)?;
    let sealer = match &verifier {
        Some(_) => Some(Arc::new(crate::identity::Sealer::load_or_create(
            &dir.refresh_key(),
        )?)),
        None => None,
    };
    let controller = Controller::with_identity(store, ca, verifier, sealer);

    let quic_cfg =
        wardgate_common::tls::server_config(chain.clone(), key_der.clone_key(), &ca_der)?;
    let socket = std::net::UdpSocket::bind(config.quic_listen)
        .map_err(|e| anyhow::anyhow!("cannot listen for QUIC on {}: {e}", config.quic_listen))?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| anyhow::anyhow!("no async runtime for QUIC"))?;
    let (reset_key, cid_key) = restart_stable_keys(&key_pem);
    let mut endpoint_cfg = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let endpoint = quinn::Endpoint::new(endpoint_cfg, Some(quic_cfg), socket, runtime)
        .map_err(|e| anyhow::anyhow!("cannot listen for QUIC on {}: {e}", config.quic_listen))?;
    let quic_addr = endpoint.local_addr()?;

    let listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for the admin API on {}: {e}",
                config.admin_listen
            )
        })?;
    let admin_addr = listener.local_addr()?;
    let acceptor = crate::admin::https::tls_acceptor(chain, key_der)?;
    let router = crate::admin::api::router(controller.clone());

    let ep = Endpoints {
        quic: quic_addr,
        admin: admin_addr,
        pid: std::process::id(),
    };
    if let Some(run_dir) = dir.endpoints().parent() {
        files::create_private_dir(run_dir)?;
    }
    files::write_public(&dir.endpoints(), &serde_json::to_vec_pretty(&ep)?)?;
    info!(quic = %quic_addr, admin = %admin_addr, backend = ?controller.store.backend(), "controller serving");

    let tasks = vec![
        tokio::spawn(sweep(controller.clone(), cancel.clone())),
        tokio::spawn(crate::notify::run(controller.clone(), cancel.clone())),
        tokio::spawn(refresh(controller.clone(), cancel.clone())),
        tokio::spawn(crate::quic::serve(
            controller.clone(),
            endpoint,
            cancel.clone(),
        )),
        tokio::spawn(crate::admin::https::serve(
            listener, acceptor, router, cancel,
        )),
    ];
    Ok(Running {
        quic: quic_addr,
        admin: admin_addr,
        controller,
        tasks,
    })
}

/// The keys behind QUIC stateless-reset tokens and connection-id validation, derived from the
/// controller's private key so they stay the same across restarts: a restarted controller then
/// recognises connection ids it issued before and answers their packets with a reset the peer
/// accepts, so gateways and clients reconnect (and gateways resync) at their next packet
/// instead of after the 20 s idle timeout. With per-process random keys (quinn's default) the
/// new process drops those packets as invalid and revocations wait for the timeout.
fn restart_stable_keys(key_pem: &str) -> (ring::hmac::Key, u64) {
    use sha2::Digest;
    let derive = |label: &[u8]| {
        let mut h = sha2::Sha256::new();
        h.update(label);
        h.update(key_pem.as_bytes());
        h.finalize()
    };
    let reset = derive(b"wardgate quic stateless reset v1\0");
    let cid = derive(b"wardgate quic connection ids v1\0");
    let mut first = [0u8; 8];
    first.copy_from_slice(&cid[..8]);
    (
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset),
        u64::from_le_bytes(first),
    )
}
