//! WireGuard keys (X25519). Made on the machine that uses them; only public keys travel.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

pub use x25519_dalek::{PublicKey, StaticSecret};

/// Why a key could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not base64, or not 32 bytes.
    #[error("not a WireGuard key: expected 32 bytes in base64 (44 characters), got {0}")]
    Invalid(String),
}

/// Makes a fresh private key from the OS random source.
pub fn generate_private() -> StaticSecret {
    StaticSecret::random_from_rng(rand::rngs::OsRng)
}

/// The base64 form `wg(8)` uses, so admins can compare keys with familiar tools.
pub fn encode_key(bytes: &[u8; 32]) -> String {
    B64.encode(bytes)
}

/// Parses a base64 32-byte key.
pub fn decode_key(s: &str) -> Result<[u8; 32], KeyError> {
    let v = B64
        .decode(s.trim())
        .map_err(|_| KeyError::Invalid(format!("{} characters of non-base64", s.len())))?;
    <[u8; 32]>::try_from(v.as_slice()).map_err(|_| KeyError::Invalid(format!("{} bytes", v.len())))
}

/// Parses a public key.
pub fn decode_public(s: &str) -> Result<PublicKey, KeyError> {
    decode_key(s).map(PublicKey::from)
}

/// Parses a private key.
pub fn decode_private(s: &str) -> Result<StaticSecret, KeyError> {
    decode_key(s).map(StaticSecret::from)
}

/// The public half, base64.
pub fn public_of(secret: &StaticSecret) -> String {
    encode_key(PublicKey::from(secret).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let k = generate_private();
        let s = encode_key(&k.to_bytes());
        assert_eq!(s.len(), 44);
        assert_eq!(decode_private(&s).expect("decode").to_bytes(), k.to_bytes());
        assert_eq!(public_of(&k), public_of(&decode_private(&s).expect("d")));
        assert!(decode_key("abc").is_err());
        assert!(decode_key(&B64.encode([0u8; 31])).is_err());
    }
}
