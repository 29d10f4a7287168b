//! `wardgate status`: enrolment and connection state, checked live against the controller.

use serde::Serialize;
use wardgate_common::proto::{Identity, Request, Response};
use wardgate_common::transport::ControlClient;

use crate::enrol;
use crate::state::{ConfigDir, Enrolment, StateError};

/// What `status` reports.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    /// `not_enrolled`, `pending`, `enrolled` or `denied`.
    pub enrolment: String,
    /// Device id, when enrolled or pending.
    pub device_id: Option<String>,
    /// Device name.
    pub device_name: Option<String>,
    /// Who enrolled it.
    pub username: Option<String>,
    /// Controller address.
    pub controller: Option<String>,
    /// `connected` when the controller accepted the device just now, else `disconnected`.
    pub connection: String,
    /// Why the connection failed, in words.
    pub connection_error: Option<String>,
    /// The controller's error code, when it refused.
    pub connection_error_code: Option<String>,
    /// This user's access requests, newest first (when the controller answered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<Vec<wardgate_common::proto::AccessRequestInfo>>,
}

/// Reads the state and, when enrolled, checks the connection.
pub async fn status(dir: &ConfigDir) -> Result<Status, StateError> {
    let Some(rec) = dir.load()? else {
        return Ok(Status {
            enrolment: "not_enrolled".into(),
            device_id: None,
            device_name: None,
            username: None,
            controller: None,
            connection: "disconnected".into(),
            connection_error: Some("this device is not enrolled; run `wardgate enrol`".into()),
            connection_error_code: None,
            requests: None,
        });
    };
    let mut st = Status {
        enrolment: match rec.enrolment {
            Enrolment::Pending => "pending",
            Enrolment::Enrolled => "enrolled",
            Enrolment::Denied => "denied",
        }
        .into(),
        device_id: Some(rec.device_id.clone()),
        device_name: Some(rec.device_name.clone()),
        username: Some(rec.username.clone()),
        controller: Some(rec.controller.clone()),
        connection: "disconnected".into(),
        connection_error: None,
        connection_error_code: None,
        requests: None,
    };
    if rec.enrolment != Enrolment::Enrolled {
        return Ok(st);
    }
    let result = async {
        let cfg = enrol::client_config(dir)?;
        let software = format!("wardgate {}", wardgate_common::SOFTWARE_VERSION);
        let mut c = ControlClient::connect(&rec.controller, cfg, &software).await?;
        let r = c.request(Request::WhoAmI).await;
        let requests = match c.request(Request::ListAccessRequests).await {
            Ok(Response::AccessRequests { requests }) => Some(requests),
            _ => None,
        };
        c.close().await;
        Ok::<_, enrol::EnrolError>((r?, requests))
    }
    .await;
    match result {
        Ok((Response::Identity(Identity::Device { .. }), requests)) => {
            st.connection = "connected".into();
            st.requests = requests;
        }
        Ok((other, _)) => st.connection_error = Some(format!("unexpected answer: {other:?}")),
        Err(e) => {
            if let enrol::EnrolError::Client(c) = &e {
                st.connection_error_code = c.wire().map(|w| w.code.to_string());
            }
            st.connection_error = Some(e.to_string());
        }
    }
    Ok(st)
}
