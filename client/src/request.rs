//! `wardgate request`: ask for a window of access that someone else approves (vendors).
//!
//! The request rides this device's mutual-TLS session, so the access it asks for is for this
//! device only. Times are read as people write them: `now`, an instant with its offset
//! (`2026-03-24T14:00:00+01:00`, `…Z`), or a wall-clock time in a named zone
//! (`2026-03-24T14:00[Europe/Berlin]`), which is what a vendor told "Tuesday 14:00–16:00 Berlin
//! time" types.

use std::time::Duration;

use wardgate_common::proto::{AccessRequestInfo, MakeAccessRequest, Request, Response};
use wardgate_common::transport::ControlClient;

use crate::enrol;
use crate::state::ConfigDir;

/// Why a time could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a time: write now, 2026-03-24T14:00:00+01:00, 2026-03-24T13:00:00Z or \
     2026-03-24T14:00[Europe/Berlin]"
)]
pub struct BadTime(pub String);

/// Reads a time: `None` for `now` (the controller's clock decides), else ms since the epoch.
pub fn parse_time(s: &str) -> Result<Option<i64>, BadTime> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("now") {
        return Ok(None);
    }
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(Some(t.as_millisecond()));
    }
    if let Ok(z) = s.parse::<jiff::ZonedDateTime>() {
        return Ok(Some(z.timestamp().as_millisecond()));
    }
    Err(BadTime(s.to_owned()))
}

/// What went wrong asking.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// A time did not parse.
    #[error(transparent)]
    Time(#[from] BadTime),
    /// Enrolment state or the connection.
    #[error(transparent)]
    Enrol(#[from] enrol::EnrolError),
    /// The controller refused, or the connection failed.
    #[error(transparent)]
    Client(#[from] wardgate_common::transport::ClientError),
    /// Not enrolled.
    #[error("this device is not enrolled; run `wardgate enrol`")]
    NotEnrolled,
    /// An answer that does not fit.
    #[error("unexpected answer from the controller: {0}")]
    Unexpected(String),
}

/// What the user asked for on the command line.
pub struct Ask {
    /// The resource.
    pub resource: String,
    /// Start (`now` when absent).
    pub from: Option<String>,
    /// End.
    pub until: Option<String>,
    /// Length.
    pub duration: Option<Duration>,
    /// Why.
    pub reason: String,
    /// Ticket.
    pub ticket: Option<String>,
}

/// Sends the request and returns it as recorded (pending).
pub async fn request(dir: &ConfigDir, ask: Ask) -> Result<AccessRequestInfo, RequestError> {
    let from_ms = match &ask.from {
        Some(f) => parse_time(f)?,
        None => None,
    };
    let until_ms = match &ask.until {
        Some(u) => Some(parse_time(u)?.ok_or_else(|| BadTime(u.clone()))?),
        None => None,
    };
    let body = MakeAccessRequest {
        resource: ask.resource,
        from_ms,
        until_ms,
        duration_ms: ask
            .duration
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        reason: ask.reason,
        ticket: ask.ticket,
    };
    match ask_controller(dir, Request::MakeAccessRequest(body)).await? {
        Response::AccessRequestMade(r) => Ok(r),
        other => Err(RequestError::Unexpected(format!("{other:?}"))),
    }
}

/// The user's requests, newest first.
pub async fn list(dir: &ConfigDir) -> Result<Vec<AccessRequestInfo>, RequestError> {
    match ask_controller(dir, Request::ListAccessRequests).await? {
        Response::AccessRequests { requests } => Ok(requests),
        other => Err(RequestError::Unexpected(format!("{other:?}"))),
    }
}

async fn ask_controller(dir: &ConfigDir, req: Request) -> Result<Response, RequestError> {
    let rec = dir
        .load()
        .map_err(enrol::EnrolError::from)?
        .ok_or(RequestError::NotEnrolled)?;
    let cfg = enrol::client_config(dir)?;
    let software = format!("wardgate {}", wardgate_common::SOFTWARE_VERSION);
    let mut c = ControlClient::connect(&rec.controller, cfg, &software).await?;
    let r = c.request(req).await;
    c.close().await;
    Ok(r?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_read_as_people_write_them() {
        assert_eq!(parse_time("now"), Ok(None));
        // Tuesday 24 March 2026, 14:00 in Berlin is 13:00 UTC (CET).
        let want = Some(1_774_357_200_000);
        assert_eq!(parse_time("2026-03-24T13:00:00Z"), Ok(want));
        assert_eq!(parse_time("2026-03-24T14:00:00+01:00"), Ok(want));
        assert_eq!(parse_time("2026-03-24T14:00[Europe/Berlin]"), Ok(want));
        assert!(parse_time("Tuesday").is_err());
    }
}
