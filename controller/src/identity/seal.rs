//! Refresh tokens at rest: AES-256-GCM (ring) under a key kept in a file of the data
//! directory (`refresh.key`, 0600), not in the database. A database backup or a copied
//! SQLite file then holds nothing an identity provider would accept, and the session id is
//! bound in as associated data, so a sealed token moved to another session's row does not
//! open.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use wardgate_common::files;
use wardgate_common::proto::Secret;

/// The prefix of a sealed value: names the scheme so a future one can be told apart.
const PREFIX: &str = "v1.";
const KEY_LEN: usize = 32;

/// Why sealing or opening failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file could not be read or made.
    #[error("refresh-token key file {path}: {detail}")]
    KeyFile {
        /// The file.
        path: String,
        /// What failed.
        detail: String,
    },
    /// The system's random source failed.
    #[error("no randomness for a refresh-token nonce")]
    Random,
    /// A stored value does not open (another key, another session, or damaged).
    #[error("a stored refresh token does not open: {0}")]
    Open(&'static str),
}

/// The key refresh tokens are sealed with.
pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<key>)")
    }
}

impl Sealer {
    /// A sealer with the given key bytes.
    pub fn from_key(bytes: &[u8; KEY_LEN]) -> Result<Self, SealError> {
        let unbound =
            UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| SealError::Open("unusable key"))?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        })
    }

    /// Reads the key file at `path`, making it (0600, random) when missing. A controller
    /// whose data directory predates refresh tokens gets its key at its next start.
    pub fn load_or_create(path: &Path) -> Result<Self, SealError> {
        let err = |detail: String| SealError::KeyFile {
            path: path.display().to_string(),
            detail,
        };
        if !path.exists() {
            let mut key = [0u8; KEY_LEN];
            SystemRandom::new()
                .fill(&mut key)
                .map_err(|_| SealError::Random)?;
            files::write_secret(path, hex::encode(key).as_bytes())
                .map_err(|e| err(e.to_string()))?;
        }
        let text = files::read_secret(path).map_err(|e| err(e.to_string()))?;
        let bytes = hex::decode(String::from_utf8_lossy(&text).trim())
            .map_err(|_| err("not hex; restore it from backup or delete it (live sessions then need a new login)".into()))?;
        let key: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| err(format!("not {KEY_LEN} bytes")))?;
        Self::from_key(&key)
    }

    /// Seals `token` for `session_id`: `v1.` + base64url(nonce ‖ ciphertext ‖ tag).
    pub fn seal(&self, session_id: &str, token: &Secret) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut buf = token.expose().as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(session_id.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SealError::Open("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(out)))
    }

    /// Opens a value [`Sealer::seal`] made for `session_id`.
    pub fn open(&self, session_id: &str, sealed: &str) -> Result<Secret, SealError> {
        let body = sealed
            .strip_prefix(PREFIX)
            .ok_or(SealError::Open("unknown format"))?;
        let mut raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| SealError::Open("not base64"))?;
        if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SealError::Open("too short"));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&raw[..NONCE_LEN]);
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(session_id.as_bytes()),
                &mut raw[NONCE_LEN..],
            )
            .map_err(|_| SealError::Open("wrong key, wrong session, or damaged"))?;
        let text = std::str::from_utf8(plain).map_err(|_| SealError::Open("not text"))?;
        Ok(Secret::new(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_tokens_open_only_for_their_session_and_key() {
        let s = Sealer::from_key(&[7u8; KEY_LEN]).expect("key");
        let token = Secret::new("rt-very-secret".to_owned());
        let a = s.seal("ses_a", &token).expect("seal");
        let b = s.seal("ses_a", &token).expect("seal");
        assert_ne!(a, b, "a fresh nonce each time");
        assert!(!a.contains("rt-very-secret"));
        assert_eq!(
            s.open("ses_a", &a).expect("open").expose(),
            "rt-very-secret"
        );
        assert!(s.open("ses_b", &a).is_err(), "bound to its session");
        let other = Sealer::from_key(&[8u8; KEY_LEN]).expect("key");
        assert!(other.open("ses_a", &a).is_err(), "bound to its key");
        assert!(s.open("ses_a", "v1.AAAA").is_err());
        assert!(s.open("ses_a", "rt-very-secret").is_err());
    }

    #[test]
    fn the_key_file_is_made_once_and_private() {
        let dir = std::env::temp_dir().join(format!("wg-seal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("refresh.key");
        let s1 = Sealer::load_or_create(&path).expect("create");
        let sealed = s1.seal("ses", &Secret::new("t".to_owned())).expect("seal");
        let s2 = Sealer::load_or_create(&path).expect("load");
        assert_eq!(s2.open("ses", &sealed).expect("open").expose(), "t");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
