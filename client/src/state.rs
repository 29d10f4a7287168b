//! The device's identity on disk: the enrolment record, the pinned CA, the device certificate
//! and its private key (made here, 0600, never sent).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use wardgate_common::files::{self, FileError};

/// Why the client's state is unusable.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// The record is damaged.
    #[error("{path} is damaged: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// No directory given and no platform default.
    #[error("no configuration directory: pass --config-dir or set WARDGATE_CONFIG_DIR")]
    NoDir,
}

/// Where the enrolment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enrolment {
    /// Waiting for an administrator.
    Pending,
    /// The device has its certificate.
    Enrolled,
    /// An administrator refused the device.
    Denied,
}

/// The enrolment record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceRecord {
    /// Controller `host:port`.
    pub controller: String,
    /// The device id the controller gave.
    pub device_id: String,
    /// The device's name.
    pub device_name: String,
    /// The user who enrolled it.
    pub username: String,
    /// Where the enrolment stands.
    pub enrolment: Enrolment,
}

/// Paths of the client's configuration directory.
#[derive(Debug, Clone)]
pub struct ConfigDir {
    root: PathBuf,
}

impl ConfigDir {
    /// The explicit directory or the platform's standard one.
    pub fn resolve(explicit: Option<PathBuf>) -> Result<Self, StateError> {
        let root = match explicit {
            Some(p) => p,
            None => directories::ProjectDirs::from("org", "Wardgate", "wardgate")
                .map(|d| d.config_dir().to_path_buf())
                .ok_or(StateError::NoDir)?,
        };
        Ok(Self { root })
    }
    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Enrolment record.
    pub fn record(&self) -> PathBuf {
        self.root.join("device.json")
    }
    /// Pinned CA.
    pub fn ca(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    /// Device certificate.
    pub fn cert(&self) -> PathBuf {
        self.root.join("device.pem")
    }
    /// Device private key (0600).
    pub fn key(&self) -> PathBuf {
        self.root.join("device.key")
    }
    /// Poll secret while enrolment is pending (0600).
    pub fn poll_token(&self) -> PathBuf {
        self.root.join("enrol-poll.token")
    }

    /// The last posture report counter sent (see `posture::record_sent`).
    pub fn posture_counter(&self) -> PathBuf {
        self.root.join("posture-counter")
    }

    /// The enrolment record, if any.
    pub fn load(&self) -> Result<Option<DeviceRecord>, StateError> {
        let p = self.record();
        if !p.exists() {
            return Ok(None);
        }
        let bytes = files::read_public(&p)?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::Invalid {
                path: p,
                detail: e.to_string(),
            })
    }

    /// Saves the record.
    pub fn save(&self, r: &DeviceRecord) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(r).map_err(|e| StateError::Invalid {
            path: self.record(),
            detail: e.to_string(),
        })?;
        files::write_public(&self.record(), &bytes)?;
        Ok(())
    }
}
