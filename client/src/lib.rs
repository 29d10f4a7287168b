//! The Wardgate client (`wardgate`), on clinicians' and vendors' machines: enrols the device,
//! logs the user in, and (later) brings up the tunnels the controller grants.
//!
//! This crate must never depend on `wardgate-controller`: a laptop gets a small binary with a
//! small attack surface.
//!
//! * [`state`]: the device identity on disk.
//! * [`login`]: how a user proves who they are (local users now; OIDC joins here).
//! * [`enrol`]: device enrolment, including waiting for an administrator's approval.
//! * [`status`]: what `wardgate status` reports.
//! * [`posture`]: what the device shows about itself (`wardgate posture`).

pub mod connect;
pub mod datapath;
pub mod enrol;
pub mod login;
pub mod oidc;
pub mod posture;
pub mod request;
pub mod state;
pub mod status;
