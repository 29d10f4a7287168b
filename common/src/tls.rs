//! TLS for the QUIC control plane: TLS 1.3 only, ring as the one crypto provider, the private
//! CA pinned on both sides.
//!
//! The server asks every peer for a certificate but lets those without one in
//! (`allow_unauthenticated`): joining and enrolling happen before a peer *has* a certificate.
//! Every other request checks the certificate's fingerprint against the store, so the lack of
//! one is answered with a specific error on the first stream rather than a bare handshake alert.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::proto::ALPN;

/// Why a TLS configuration could not be built (bad certificates or keys on disk).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the material.
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA certificate cannot be used as a trust anchor.
    #[error("the CA certificate cannot be used as a trust anchor: {0}")]
    BadCa(String),
    /// The client verifier could not be built.
    #[error("cannot build the client-certificate verifier: {0}")]
    Verifier(String),
    /// quinn refused the rustls configuration (e.g. no TLS 1.3 suite).
    #[error("QUIC cannot use this TLS configuration: {0}")]
    Quic(String),
}

/// The single crypto provider used everywhere (ring: no C toolchain beyond what ring needs).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How often idle control connections send keep-alives, so NATs keep their mapping and a dead
/// peer is noticed within [`IDLE_TIMEOUT`].
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A control connection with no packet for this long is considered dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // 20 s always fits in the QUIC varint.
    if let Ok(idle) = quinn::IdleTimeout::try_from(IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    // The control plane needs one bidirectional stream per connection.
    t.max_concurrent_bidi_streams(4u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    Arc::new(t)
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| TlsError::BadCa(e.to_string()))?;
    Ok(Arc::new(roots))
}

/// The controller's QUIC server configuration.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: &CertificateDer<'static>,
) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// A gateway's or client's QUIC configuration: trusts only `ca`, and presents `identity`
/// (certificate chain and key) once it has one.
pub fn client_config(
    ca: &CertificateDer<'static>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<quinn::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?);
    let mut tls = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport());
    Ok(cfg)
}
