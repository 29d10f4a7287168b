//! The admin plane: an HTTPS REST API (axum over rustls) and the CLI that drives it. The CLI
//! never opens the database: every administrative change goes through the API, where it is
//! authenticated and audited.

pub mod access_api;
pub mod api;
pub mod breakglass_api;
pub mod cli;
pub mod https;
pub mod requests_api;
pub mod types;
