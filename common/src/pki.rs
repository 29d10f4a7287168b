//! Certificates of the control plane: key pairs and CSRs made locally (the private key never
//! leaves the machine), PEM parsing, and the fingerprints the controller keys identities on.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// Names inside certificates. The controller's server certificate always carries
/// [`CONTROLLER_NAME`], and clients verify that name whatever address they dial, so a
/// controller can move without reissuing certificates (the CA is private and pinned).
pub const CONTROLLER_NAME: &str = "controller.wardgate.internal";

/// Why a certificate or key could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Key or CSR generation failed.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was being made.
        what: &'static str,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// PEM input was not what was expected.
    #[error("{what} is not valid PEM: {detail}")]
    BadPem {
        /// What was being read.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// A locally generated key pair and the CSR that asks the controller to certify it.
pub struct KeyAndCsr {
    /// PKCS#8 PEM of the private key: write it with `files::write_secret`.
    pub key_pem: String,
    /// The CSR PEM to send.
    pub csr_pem: String,
}

/// Makes an ECDSA P-256 key pair and a CSR with `common_name`.
pub fn generate_key_and_csr(common_name: &str) -> Result<KeyAndCsr, PkiError> {
    let key = rcgen::KeyPair::generate().map_err(|source| PkiError::Generate {
        what: "key pair",
        source,
    })?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|source| PkiError::Generate {
            what: "certificate signing request",
            source,
        })?;
    Ok(KeyAndCsr {
        key_pem: key.serialize_pem(),
        csr_pem: csr,
    })
}

/// Parses every certificate in a PEM bundle (at least one).
pub fn certs_from_pem(
    what: &'static str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| PkiError::BadPem {
            what,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::BadPem {
            what,
            detail: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Parses a private key PEM.
pub fn key_from_pem(what: &'static str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| PkiError::BadPem {
        what,
        detail: e.to_string(),
    })
}

/// SHA-256 of a certificate's DER, hex: the key under which the controller finds the gateway or
/// device a connection belongs to.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_is_parseable_pem() {
        let k = generate_key_and_csr("device").expect("gen");
        assert!(k.csr_pem.contains("BEGIN CERTIFICATE REQUEST"));
        assert!(key_from_pem("key", k.key_pem.as_bytes()).is_ok());
        assert!(certs_from_pem("cert", b"nothing").is_err());
    }
}
