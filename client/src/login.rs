//! How a user proves who they are when enrolling (and later, logging in). Local users of the
//! controller are the embedded default; OpenID Connect sign-in joins here as another method,
//! producing a [`Login`] the controller verifies.

use wardgate_common::proto::{Login, Secret};

/// Where the password comes from, in order of preference for unattended use.
#[derive(Debug, Clone)]
pub enum PasswordSource {
    /// Given by the caller (read from `WARDGATE_PASSWORD` or stdin by the binary).
    Given(Secret),
    /// Ask on the terminal without echo.
    Prompt,
}

/// Why a login could not be prepared.
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
}

/// Prepares a local-user login.
pub fn local(username: &str, source: PasswordSource) -> Result<Login, LoginError> {
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
    })
}
