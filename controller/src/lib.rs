//! The Wardgate controller: policy engine and policy administrator (NIST SP 800-207), the
//! private CA, the store, the QUIC control plane gateways and clients connect to, and the
//! HTTPS admin API with its CLI.
//!
//! Drive it with [`run::init`] once, then [`run::start`] with a cancel token; the binary
//! `wardgate-controller` is a thin shell over these.

pub mod access;
pub mod admin;
pub mod ca;
pub mod config;
pub mod export;
pub mod identity;
pub mod login;
pub mod notify;
pub mod policy;
pub mod posture;
pub mod quic;
pub mod refresh;
pub mod requests;
pub mod run;
pub mod secrets;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod totp;
