//! What a gateway keeps on disk after joining: its registration, the pinned CA, its
//! control-plane certificate and key, and its WireGuard private key. Keys are made here and
//! written 0600; only public halves ever leave.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use wardgate_common::files::{self, FileError};

/// Why the state directory is unusable.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// The gateway has not joined yet.
    #[error("{0} holds no gateway registration; run `wardgate-gateway join` first")]
    NotJoined(PathBuf),
    /// The gateway already joined.
    #[error(
        "{0} already holds a gateway registration; use another --state-dir or remove it to join again"
    )]
    AlreadyJoined(PathBuf),
    /// The registration file is damaged.
    #[error("{path} is damaged: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// No directory given and no platform default.
    #[error("no state directory: pass --state-dir or set WARDGATE_GATEWAY_DIR")]
    NoDir,
}

/// The registration written at join.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Registration {
    /// The id the controller gave this gateway.
    pub gateway_id: String,
    /// The gateway's name.
    pub name: String,
    /// The controller's control-plane address.
    pub controller: String,
    /// Where clients reach this gateway's WireGuard port.
    pub endpoint: String,
    /// Networks served.
    pub networks: Vec<String>,
}

/// Paths of the state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The explicit directory or the platform's standard one.
    pub fn resolve(explicit: Option<PathBuf>) -> Result<Self, StateError> {
        let root = match explicit {
            Some(p) => p,
            None => directories::ProjectDirs::from("org", "Wardgate", "wardgate-gateway")
                .map(|d| d.data_dir().to_path_buf())
                .ok_or(StateError::NoDir)?,
        };
        Ok(Self { root })
    }
    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Registration file.
    pub fn registration(&self) -> PathBuf {
        self.root.join("gateway.json")
    }
    /// Pinned CA.
    pub fn ca(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    /// Control-plane certificate.
    pub fn cert(&self) -> PathBuf {
        self.root.join("gateway.pem")
    }
    /// Control-plane key (0600).
    pub fn key(&self) -> PathBuf {
        self.root.join("gateway.key")
    }
    /// WireGuard private key (0600).
    pub fn wg_key(&self) -> PathBuf {
        self.root.join("wg.key")
    }

    /// Loads the registration.
    pub fn load(&self) -> Result<Registration, StateError> {
        let p = self.registration();
        if !p.exists() {
            return Err(StateError::NotJoined(self.root.clone()));
        }
        let bytes = files::read_public(&p)?;
        serde_json::from_slice(&bytes).map_err(|e| StateError::Invalid {
            path: p,
            detail: e.to_string(),
        })
    }

    /// Saves the registration.
    pub fn save(&self, r: &Registration) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(r).map_err(|e| StateError::Invalid {
            path: self.registration(),
            detail: e.to_string(),
        })?;
        files::write_public(&self.registration(), &bytes)?;
        Ok(())
    }
}
