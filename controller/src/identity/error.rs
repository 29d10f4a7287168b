//! Every way an ID token or a provider can fail, each saying what is wrong and what to do.
//! The variants are distinct so tests, audit rows and the client can tell a forged token
//! from an expired one from a misconfigured IdP.

/// Unix seconds as an RFC 3339 time for messages (the raw number when out of range).
fn ts(secs: &i64) -> String {
    jiff::Timestamp::from_second(*secs)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| secs.to_string())
}

/// Why an identity could not be established.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The provider configuration is unusable.
    #[error("identity provider `{provider}` is misconfigured: {detail}")]
    Config {
        /// The provider's name.
        provider: String,
        /// What is wrong and how to fix it.
        detail: String,
    },
    /// The token is not a compact signed JWT, or its parts do not decode.
    #[error(
        "the ID token is malformed ({detail}): send the `id_token` from the IdP's token response unchanged"
    )]
    Malformed {
        /// What did not parse.
        detail: String,
    },
    /// The token is longer than any real ID token.
    #[error("the ID token is {len} bytes, over the {max}-byte limit: this is not an ID token")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The token is encrypted (JWE).
    #[error(
        "the ID token is encrypted (JWE), which Wardgate does not accept: turn off ID-token encryption for this client at the IdP"
    )]
    Encrypted,
    /// The `alg` is not one this provider may use.
    #[error(
        "the ID token is signed with `{alg}`, which `{provider}` may not use (allowed: {allowed}); set the client's ID-token signing algorithm at the IdP to one of those"
    )]
    UnsupportedAlgorithm {
        /// The provider's name.
        provider: String,
        /// The token's `alg`.
        alg: String,
        /// The allowed algorithms, comma separated.
        allowed: String,
    },
    /// The header carries a critical extension this verifier does not understand.
    #[error(
        "the ID token marks header parameters {crit} as critical, which Wardgate does not understand (RFC 7515 says reject)"
    )]
    CriticalHeader {
        /// The `crit` list.
        crit: String,
    },
    /// No configured provider has this issuer.
    #[error(
        "ID tokens from issuer `{issuer}` are not trusted (trusted: {known}); log in with a configured identity provider, or add this one to the controller's configuration"
    )]
    UnknownIssuer {
        /// The token's `iss`.
        issuer: String,
        /// The configured issuers, comma separated.
        known: String,
    },
    /// The token's `iss` is not the provider's.
    #[error(
        "the ID token was issued by `{got}`, not by `{expected}`: it belongs to another identity provider"
    )]
    WrongIssuer {
        /// The configured issuer.
        expected: String,
        /// The token's `iss`.
        got: String,
    },
    /// The signing key is not in the provider's key set.
    #[error(
        "the ID token is signed with key `{kid}`, which `{provider}` does not publish{}; if the IdP just rotated its keys, log in again in a minute, otherwise the token is forged",
        if *.refreshed { " (its key set was re-fetched to check)" } else { " (a re-fetch of its key set was rate-limited)" }
    )]
    UnknownKey {
        /// The provider's name.
        provider: String,
        /// The token's `kid`.
        kid: String,
        /// Whether the key set was fetched again before giving up.
        refreshed: bool,
    },
    /// The header names no key and the key set holds several candidates.
    #[error(
        "the ID token names no signing key (`kid`) and `{provider}` publishes several; configure the IdP to send `kid`"
    )]
    MissingKid {
        /// The provider's name.
        provider: String,
    },
    /// The key named cannot verify this token's algorithm.
    #[error(
        "key `{kid}` of `{provider}` cannot verify an `{alg}` signature ({detail}); the token is forged or the IdP's key set is broken"
    )]
    KeyMismatch {
        /// The provider's name.
        provider: String,
        /// The key id.
        kid: String,
        /// The token's algorithm.
        alg: String,
        /// Why the key does not fit.
        detail: String,
    },
    /// The signature does not verify.
    #[error(
        "the ID token's signature does not verify with `{provider}`'s key `{kid}`: the token was altered or forged"
    )]
    BadSignature {
        /// The provider's name.
        provider: String,
        /// The key id used.
        kid: String,
    },
    /// The token is for another client.
    #[error(
        "the ID token is for audience {got}, not for Wardgate's client {expected}: it was issued to another application"
    )]
    WrongAudience {
        /// The configured client ids.
        expected: String,
        /// The token's `aud`.
        got: String,
    },
    /// `azp` is missing (several audiences) or names another client.
    #[error(
        "the ID token's authorized party (azp) is {got}, not Wardgate's client {expected}: it was issued to another application"
    )]
    WrongAuthorizedParty {
        /// The configured client ids.
        expected: String,
        /// The token's `azp`, or "missing".
        got: String,
    },
    /// Past `exp` (plus skew).
    #[error(
        "the ID token expired at {} (now {}, {leeway_s} s of clock skew allowed): log in again",
        ts(.exp), ts(.now)
    )]
    Expired {
        /// `exp`.
        exp: i64,
        /// The verifier's time.
        now: i64,
        /// The skew allowed.
        leeway_s: u64,
    },
    /// Before `nbf` (minus skew).
    #[error(
        "the ID token is not valid before {} (now {}): check this controller's and the IdP's clocks (NTP)",
        ts(.nbf), ts(.now)
    )]
    NotYetValid {
        /// `nbf`.
        nbf: i64,
        /// The verifier's time.
        now: i64,
    },
    /// `iat` lies in the future (beyond skew).
    #[error(
        "the ID token claims to be issued at {}, after now ({}): check this controller's and the IdP's clocks (NTP)",
        ts(.iat), ts(.now)
    )]
    IssuedInFuture {
        /// `iat`.
        iat: i64,
        /// The verifier's time.
        now: i64,
    },
    /// A required claim is absent.
    #[error("the ID token has no `{claim}` claim, which OpenID Connect requires")]
    MissingClaim {
        /// The claim.
        claim: String,
    },
    /// A claim has the wrong type or an unusable value.
    #[error("the ID token's `{claim}` claim is unusable: {detail}")]
    InvalidClaim {
        /// The claim.
        claim: String,
        /// What is wrong.
        detail: String,
    },
    /// A nonce was expected and the token has none.
    #[error(
        "the ID token carries no nonce although this login sent one: the token does not belong to this login; log in again"
    )]
    NonceMissing,
    /// The nonce differs from this login's.
    #[error(
        "the ID token's nonce is not this login's: the token was issued for another login (a replay or a mix-up); log in again"
    )]
    NonceMismatch,
    /// The nonce was already used by an accepted token.
    #[error(
        "the ID token's nonce was already used by an earlier login: tokens are single-use; log in again"
    )]
    NonceReplayed,
    /// The discovery document could not be fetched or is unusable.
    #[error(
        "cannot use `{provider}`'s discovery document at {url}: {detail}; check the issuer URL and that the controller can reach the IdP"
    )]
    Discovery {
        /// The provider's name.
        provider: String,
        /// The URL fetched.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The key set could not be fetched or is unusable.
    #[error(
        "cannot use `{provider}`'s signing keys at {url}: {detail}; check that the controller can reach the IdP"
    )]
    Jwks {
        /// The provider's name.
        provider: String,
        /// The URL fetched.
        url: String,
        /// What failed.
        detail: String,
    },
}
