//! A provider's public signing keys (its JWKS), parsed once into keys ready to verify with.

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};

use super::config::SigningAlg;

/// The largest key set accepted, in bytes: real ones are a few KiB.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// One usable public key.
#[derive(Clone)]
pub struct JwksKey {
    /// The key id, if the IdP gave one.
    pub kid: Option<String>,
    /// The algorithm this key verifies: fixed by its type (RSA → RS256, EC P-256 → ES256) and,
    /// when the JWK names an `alg`, by that.
    pub alg: SigningAlg,
    /// The key, ready for jsonwebtoken.
    pub(crate) key: DecodingKey,
}

impl std::fmt::Debug for JwksKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// A key set: only keys that can verify a supported signature. Encryption keys, symmetric
/// keys and unsupported types are dropped at parse time, so nothing later can be tricked into
/// using them (e.g. a public RSA key as an HMAC secret).
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    keys: Vec<JwksKey>,
    /// Keys that were present but skipped, with why (for diagnostics).
    pub skipped: Vec<String>,
}

impl Jwks {
    /// Parses a JWKS document (`{"keys": [...]}`). Keys that cannot be used are skipped and
    /// listed in `skipped`; a document that is not a key set at all is an error.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > MAX_JWKS_BYTES {
            return Err(format!(
                "the key set is {} bytes, over the {MAX_JWKS_BYTES}-byte limit",
                bytes.len()
            ));
        }
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        let doc: Doc =
            serde_json::from_slice(bytes).map_err(|e| format!("not a JSON Web Key Set ({e})"))?;
        let mut out = Self::default();
        for (i, raw) in doc.keys.into_iter().enumerate() {
            match serde_json::from_value::<Jwk>(raw) {
                Ok(jwk) => match Self::usable(&jwk) {
                    Ok(k) => out.keys.push(k),
                    Err(why) => out.skipped.push(format!("key {i}: {why}")),
                },
                Err(e) => out.skipped.push(format!("key {i}: {e}")),
            }
        }
        Ok(out)
    }

    /// A key set from keys already parsed (tests, static configuration).
    pub fn from_jwks(jwks: &[Jwk]) -> Self {
        let mut out = Self::default();
        for (i, jwk) in jwks.iter().enumerate() {
            match Self::usable(jwk) {
                Ok(k) => out.keys.push(k),
                Err(why) => out.skipped.push(format!("key {i}: {why}")),
            }
        }
        out
    }

    fn usable(jwk: &Jwk) -> Result<JwksKey, String> {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            return Err("an encryption key (use=enc)".into());
        }
        let by_type = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => SigningAlg::RS256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                SigningAlg::ES256
            }
            AlgorithmParameters::EllipticCurve(p) => {
                return Err(format!("unsupported curve {:?}", p.curve));
            }
            AlgorithmParameters::OctetKey(_) => return Err("a symmetric key".into()),
            AlgorithmParameters::OctetKeyPair(_) => return Err("an OKP key (EdDSA)".into()),
        };
        if let Some(named) = jwk.common.key_algorithm {
            let named = named.to_string();
            if named != by_type.as_str() {
                return Err(format!(
                    "its alg {named} is not supported for a {} key",
                    by_type.as_str()
                ));
            }
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable: {e}"))?;
        Ok(JwksKey {
            kid: jwk.common.key_id.clone(),
            alg: by_type,
            key,
        })
    }

    /// The usable keys.
    pub fn keys(&self) -> &[JwksKey] {
        &self.keys
    }

    /// The key with id `kid`.
    pub fn find(&self, kid: &str) -> Option<&JwksKey> {
        self.keys.iter().find(|k| k.kid.as_deref() == Some(kid))
    }

    /// Whether a key with id `kid` is present.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.find(kid).is_some()
    }
}
