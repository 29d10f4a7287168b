//! The controller's data directory: where the CA, the server identity, the configuration and
//! (by default) the SQLite database live. One place, one owner (mode 0700).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use wardgate_common::files::{self, FileError};

/// Why the data directory or its configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// The configuration file is not valid.
    #[error("{path} is not a valid controller configuration: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// No data directory was given and the platform has no standard place.
    #[error("no data directory: pass --data-dir or set WARDGATE_DATA_DIR")]
    NoDataDir,
    /// `init` found an existing installation.
    #[error(
        "{0} already holds a Wardgate controller; refusing to overwrite its CA (use another --data-dir)"
    )]
    AlreadyInitialised(PathBuf),
    /// `serve` found no installation.
    #[error(
        "{0} holds no controller configuration; run `wardgate-controller init --data-dir {0}` first"
    )]
    NotInitialised(PathBuf),
}

/// Paths inside the data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The explicit directory, or the platform's standard data directory.
    pub fn resolve(explicit: Option<PathBuf>) -> Result<Self, ConfigError> {
        let root = match explicit {
            Some(p) => p,
            None => directories::ProjectDirs::from("org", "Wardgate", "wardgate-controller")
                .map(|d| d.data_dir().to_path_buf())
                .ok_or(ConfigError::NoDataDir)?,
        };
        Ok(Self { root })
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The CA certificate (public; give it to gateways and devices).
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    /// The CA key (0600).
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    /// The controller's server certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("controller.pem")
    }
    /// The controller's server key (0600).
    pub fn server_key(&self) -> PathBuf {
        self.root.join("controller.key")
    }
    /// The configuration file.
    pub fn config(&self) -> PathBuf {
        self.root.join("controller.json")
    }
    /// The key sealing the identity providers' refresh tokens in the store (0600, made at
    /// the first start that trusts a provider). Losing it ends the sessions it sealed.
    pub fn refresh_key(&self) -> PathBuf {
        self.root.join("refresh.key")
    }
    /// The trusted OpenID providers (`identity::IdentityFile`), read at start; optional.
    pub fn identity(&self) -> PathBuf {
        self.root.join("identity.json")
    }
    /// Where `serve` writes the addresses it actually bound (useful with port 0).
    pub fn endpoints(&self) -> PathBuf {
        self.root.join("run").join("endpoints.json")
    }
    /// The default SQLite database file.
    pub fn database_file(&self) -> PathBuf {
        self.root.join("wardgate.db")
    }
    /// The default SQLite database.
    pub fn default_database_url(&self) -> String {
        format!("sqlite://{}?mode=rwc", self.database_file().display())
    }
}

/// Settings fixed at `init` and read by `serve`. Settings that admins change at run time live
/// in the store instead.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ControllerConfig {
    /// The organisation, shown in the CA's name.
    pub organisation: String,
    /// `sqlite://…` or `postgres://…`.
    pub database_url: String,
    /// QUIC control-plane listen address.
    pub quic_listen: SocketAddr,
    /// HTTPS admin API listen address.
    pub admin_listen: SocketAddr,
    /// Extra DNS names or IPs for the controller certificate (besides the fixed internal name).
    pub server_names: Vec<String>,
}

impl ControllerConfig {
    /// Loads the configuration of an initialised data directory.
    pub fn load(dir: &DataDir) -> Result<Self, ConfigError> {
        let path = dir.config();
        if !path.exists() {
            return Err(ConfigError::NotInitialised(dir.root().to_path_buf()));
        }
        let bytes = files::read_public(&path)?;
        serde_json::from_slice(&bytes).map_err(|e| ConfigError::Invalid {
            path,
            detail: e.to_string(),
        })
    }

    /// Writes the configuration. It may hold a database password, so it is 0600.
    pub fn save(&self, dir: &DataDir) -> Result<(), ConfigError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| ConfigError::Invalid {
            path: dir.config(),
            detail: e.to_string(),
        })?;
        files::write_secret(&dir.config(), &bytes)?;
        Ok(())
    }
}

/// The addresses a running controller bound, written at start-up for tools and tests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Endpoints {
    /// QUIC control plane.
    pub quic: SocketAddr,
    /// HTTPS admin API.
    pub admin: SocketAddr,
    /// The serving process.
    pub pid: u32,
}
