//! The Wardgate gateway: the policy enforcement point in front of clinical resources.
//!
//! * [`state`]: the gateway's identity on disk (certificate, keys, registration).
//! * [`control`]: joining the controller and keeping one control connection alive.
//! * [`pep`]: the pure enforcement core: peer table, flow table, filter, expiry.

pub mod control;
pub mod datapath;
pub mod local;
pub mod pep;
pub mod state;
