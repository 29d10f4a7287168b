//! How a user proves who they are when enrolling and when logging in again: a local user of
//! the controller (password, plus a one-time code when the account has TOTP), or an OpenID
//! provider's ID token (see [`crate::oidc`]). Either way the result is a [`Login`] the
//! controller verifies; `wardgate login` sends it over the device's mutually authenticated
//! connection and gets a new login session back.

use wardgate_common::proto::{Login, Request, Response, Secret, SessionInfo};
use wardgate_common::transport::{ClientError, ControlClient};

use crate::enrol::{self, EnrolError};
use crate::state::{ConfigDir, Enrolment};

/// Where the password comes from, in order of preference for unattended use.
#[derive(Debug, Clone)]
pub enum PasswordSource {
    /// Given by the caller (read from `WARDGATE_PASSWORD` or stdin by the binary).
    Given(Secret),
    /// Ask on the terminal without echo.
    Prompt,
}

/// Why a login could not be prepared or was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The terminal prompt failed (no TTY).
    #[error(
        "cannot read the password from the terminal ({0}); set WARDGATE_PASSWORD or use --password-stdin"
    )]
    Prompt(#[source] std::io::Error),
    /// Empty password.
    #[error("the password is empty")]
    Empty,
    /// The device is not enrolled.
    #[error("this device is not enrolled yet; run `wardgate enrol` first")]
    NotEnrolled,
    /// Identity files.
    #[error(transparent)]
    Enrol(#[from] EnrolError),
    /// The controller refused or could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Unexpected answer.
    #[error("unexpected answer from the controller: {0}")]
    Unexpected(String),
}

/// Prepares a local-user login; `totp` is the current one-time code, if the account has one.
pub fn local(
    username: &str,
    source: PasswordSource,
    totp: Option<Secret>,
) -> Result<Login, LoginError> {
    let password = match source {
        PasswordSource::Given(s) => s,
        PasswordSource::Prompt => Secret::new(
            rpassword::prompt_password(format!("Password for {username}: "))
                .map_err(LoginError::Prompt)?,
        ),
    };
    if password.expose().is_empty() {
        return Err(LoginError::Empty);
    }
    Ok(Login::Local {
        username: username.to_owned(),
        password,
        totp: totp.filter(|t| !t.expose().trim().is_empty()),
    })
}

/// `wardgate login`: a new login session for this enrolled device.
pub async fn relogin(dir: &ConfigDir, login: Login) -> Result<SessionInfo, LoginError> {
    let rec = dir.load().map_err(EnrolError::from)?;
    let rec = match rec {
        Some(r) if r.enrolment == Enrolment::Enrolled => r,
        _ => return Err(LoginError::NotEnrolled),
    };
    let cfg = enrol::client_config(dir)?;
    let mut client = ControlClient::connect(
        &rec.controller,
        cfg,
        &format!("wardgate {}", wardgate_common::SOFTWARE_VERSION),
    )
    .await?;
    let answer = client.request(Request::Login { login }).await;
    client.close().await;
    match answer? {
        Response::LoggedIn(s) => Ok(s),
        other => Err(LoginError::Unexpected(format!("{other:?}"))),
    }
}
