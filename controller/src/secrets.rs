//! Tokens and passwords. Tokens are 256 random bits, shown once, stored only as SHA-256 hashes
//! (they are high-entropy, so a fast hash suffices); passwords are stored as argon2id hashes.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// What a token is for, visible in its prefix so a leaked token can be recognised by secret
/// scanners and a token pasted into the wrong place fails with a clear error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Admin API bearer token.
    Admin,
    /// Single-use gateway join token.
    Join,
    /// Enrolment poll secret.
    Poll,
}

impl TokenKind {
    fn prefix(self) -> &'static str {
        match self {
            TokenKind::Admin => "wga_",
            TokenKind::Join => "wgj_",
            TokenKind::Poll => "wgp_",
        }
    }
}

/// A fresh random token of `kind`.
pub fn new_token(kind: TokenKind) -> String {
    let mut b = [0u8; 32];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut b);
    format!("{}{}", kind.prefix(), URL_SAFE_NO_PAD.encode(b))
}

/// The stored form of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// A short random id with a readable prefix (`dev_`, `gw_`, …).
pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 8];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut b);
    format!("{prefix}_{}", hex::encode(b))
}

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
#[error("cannot hash the password: {0}")]
pub struct HashError(String);

/// The minimum password length for local users (NIST SP 800-63B asks for at least 8).
pub const MIN_PASSWORD_LEN: usize = 12;

/// Hashes a password with argon2id and a random salt (PHC string).
pub fn hash_password(password: &str) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError(e.to_string()))
}

/// Checks a password. With `stored = None` (no such user) it still spends the time of a real
/// check, so response times do not reveal which user names exist.
pub fn verify_password(password: &str, stored: Option<&str>) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash_password("wardgate-dummy-password").unwrap_or_default());
    let (phc, real) = match stored {
        Some(s) => (s, true),
        None => (dummy.as_str(), false),
    };
    let ok = PasswordHash::new(phc)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false);
    ok && real
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_passwords() {
        let t = new_token(TokenKind::Join);
        assert!(t.starts_with("wgj_"));
        assert_ne!(t, new_token(TokenKind::Join));
        assert_eq!(hash_token(&t), hash_token(&format!("{t}\n")));
        let h = hash_password("correct horse battery").expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", Some(&h)));
        assert!(!verify_password("wrong", Some(&h)));
        assert!(!verify_password("wardgate-dummy-password", None));
    }
}
