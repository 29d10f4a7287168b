//! Who is logging in, according to an OpenID provider: verification of ID tokens from one or
//! more trusted IdPs (staff, vendors), selected by issuer.
//!
//! The client runs the authorization-code + PKCE flow against the IdP and hands the
//! controller the code and its PKCE verifier; the controller redeems it ([`tokens`]), keeps
//! the refresh token sealed ([`seal`]) to check the user at the provider now and then, and
//! believes nothing in the ID token until
//! [`verify::verify`] has checked the signature against the IdP's published keys, the
//! issuer, the audience, the times and the nonce. The result, a [`VerifiedIdentity`], carries
//! the groups (mapped per provider) and whether the login was multi-factor, which is what the
//! policy engine decides on.
//!
//! Shape: [`verify::verify`] is pure (token, keys, rules, `now`, nonce → identity or one typed
//! [`IdentityError`]); [`cache::Verifier`] is the IO shell that discovers each IdP, caches its
//! key set, refreshes it when a token names a new key (rate-limited), and refuses nonce reuse.
//! The device grant still ends with the client handing over an ID token (no refresh token:
//! such sessions are bounded by their lifetime only).

pub mod cache;
pub mod config;
pub mod error;
pub mod jwks;
pub mod seal;
pub mod tokens;
pub mod verify;

pub use cache::{CacheOptions, Verifier, http_client};
pub use config::{GroupMapping, IdentityFile, MfaRule, ProviderConfig, Providers, SigningAlg};
pub use error::IdentityError;
pub use jwks::Jwks;
pub use seal::{SealError, Sealer};
pub use tokens::{CodeLogin, Redeemed, TokenError, retry_delay};
pub use verify::{NonceStore, VerifiedIdentity, verify};

#[cfg(test)]
mod tests;
