//! The controller's private certificate authority. Its key never leaves the controller's data
//! directory; it signs the controller's own server certificate and the client certificates of
//! gateways and devices from the CSRs they send (their keys stay with them).

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// Why the CA could not be made, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen refused (bad key, bad parameters).
    #[error("certificate authority: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A CSR did not parse or its signature did not verify.
    #[error("the certificate signing request is invalid: {0}")]
    BadCsr(rcgen::Error),
}

/// How long issued certificates live. Revocation is checked on every connection, so length
/// matters less than it would with CRL-based PKI; devices renew through re-enrolment.
pub const LEAF_VALIDITY_DAYS: i64 = 365;
const CA_VALIDITY_DAYS: i64 = 3650;

/// What a leaf certificate is for, which decides its names and extended key usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafRole {
    /// The controller's own server certificate.
    Controller,
    /// A gateway's client certificate.
    Gateway,
    /// A device's client certificate.
    Device,
}

/// The loaded CA: its certificate (public) and the issuer that signs.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A freshly generated CA, to be written to disk by the caller.
pub struct NewCa {
    /// The CA certificate, public.
    pub cert_pem: String,
    /// The CA private key; must be written 0600.
    pub key_pem: String,
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut b);
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

impl Ca {
    /// Makes a new CA for an installation named `org`.
    pub fn generate(org: &str) -> Result<NewCa, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Wardgate CA ({org})"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(NewCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Loads a CA from its PEM files' contents.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate PEM, which every peer pins.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn leaf_params(
        role: LeafRole,
        common_name: &str,
        extra_sans: &[String],
    ) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match role {
            LeafRole::Controller => ExtendedKeyUsagePurpose::ServerAuth,
            LeafRole::Gateway | LeafRole::Device => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        if role == LeafRole::Controller {
            let mut sans = vec![SanType::DnsName(
                wardgate_common::pki::CONTROLLER_NAME.try_into()?,
            )];
            for s in extra_sans {
                match s.parse::<std::net::IpAddr>() {
                    Ok(ip) => sans.push(SanType::IpAddress(ip)),
                    Err(_) => sans.push(SanType::DnsName(s.as_str().try_into()?)),
                }
            }
            params.subject_alt_names = sans;
        }
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    /// Signs a certificate for the public key in `csr_pem`. Only the key is taken from the CSR:
    /// names, usages and validity are set here, so a peer cannot ask for a server certificate
    /// or a CA.
    pub fn sign_csr(
        &self,
        role: LeafRole,
        common_name: &str,
        csr_pem: &str,
    ) -> Result<String, CaError> {
        let mut csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadCsr)?;
        csr.params = Self::leaf_params(role, common_name, &[])?;
        Ok(csr.signed_by(&self.issuer)?.pem())
    }

    /// Issues the controller's own server certificate for `key`.
    pub fn issue_controller_cert(
        &self,
        key: &KeyPair,
        extra_sans: &[String],
    ) -> Result<String, CaError> {
        let params = Self::leaf_params(LeafRole::Controller, "Wardgate controller", extra_sans)?;
        Ok(params.signed_by(key, &self.issuer)?.pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_csr_with_our_names_only() {
        let new = Ca::generate("Test Hospital").expect("gen");
        let ca = Ca::load(&new.cert_pem, &new.key_pem).expect("load");
        let k = wardgate_common::pki::generate_key_and_csr("evil").expect("csr");
        let pem = ca
            .sign_csr(LeafRole::Device, "device dev_1", &k.csr_pem)
            .expect("sign");
        let der = wardgate_common::pki::certs_from_pem("cert", pem.as_bytes()).expect("parse");
        let (_, cert) = x509_parser::parse_x509_certificate(der[0].as_ref()).expect("x509");
        assert!(cert.subject().to_string().contains("device dev_1"));
        assert!(!cert.is_ca());
        assert!(ca.sign_csr(LeafRole::Device, "x", "garbage").is_err());
        // a CSR whose signature does not verify is refused
        let mut tampered = k.csr_pem.clone().into_bytes();
        let mid = tampered.len() / 2;
        tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).expect("utf8");
        assert!(ca.sign_csr(LeafRole::Device, "x", &tampered).is_err());
    }
}
