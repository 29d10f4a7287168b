//! Errors of the store, one enum for storage failures and one for the join-token check.

/// Why a store operation failed.
///
/// Callers match on the variant (never on the message): `Conflict` and `NotFound` are answers
/// about the data, the rest are failures of the database itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The write would break a uniqueness rule or a state rule; nothing was changed.
    #[error("{what}; nothing was changed — re-read the record and retry with other values")]
    Conflict {
        /// What conflicts, naming the record and the clashing value or current state.
        what: String,
    },
    /// The record the operation needs does not exist.
    #[error("{what} was not found; check the id, or list the records to find the right one")]
    NotFound {
        /// Which record was looked for.
        what: String,
    },
    /// The caller asked for something the store never accepts (a programming error upstream).
    #[error("invalid store request: {what}")]
    Invalid {
        /// What was wrong with the request.
        what: String,
    },
    /// The database URL names no supported back end.
    #[error(
        "unsupported database URL scheme {scheme:?}; use sqlite://PATH?mode=rwc or \
         postgres://USER@HOST:PORT/DATABASE"
    )]
    UnsupportedUrl {
        /// The scheme found (the rest of the URL is left out, it may hold a password).
        scheme: String,
    },
    /// The database refused or failed the operation.
    #[error(
        "database operation failed; check that the database is reachable, the URL and \
         credentials are right and the disk is not full"
    )]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error(
        "could not apply the schema migrations; if the database was written by a newer \
         Wardgate, run that version or restore a backup"
    )]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored row holds a value this version cannot read.
    #[error(
        "stored {what} cannot be read; the database was changed outside Wardgate or by another \
         version — restore a backup or run the matching version"
    )]
    Corrupt {
        /// Which value, in which row, failed to parse.
        what: String,
    },
}

/// Why a gateway join token was refused.
///
/// Distinct from [`StoreError`] so the join handler can tell the gateway operator precisely what
/// to do, while a real storage failure stays a server error.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeTokenError {
    /// No token with that hash was ever issued.
    #[error("the join token is not known; copy it again or ask an administrator for a new one")]
    Unknown,
    /// The token existed but its lifetime is over.
    #[error(
        "the join token expired at {expired_at_ms} ms since the Unix epoch; ask an \
         administrator for a new one"
    )]
    Expired {
        /// When it expired, ms since the Unix epoch.
        expired_at_ms: i64,
    },
    /// The token was already used once; tokens are single-use.
    #[error(
        "the join token was already used at {used_at_ms} ms since the Unix epoch; tokens are \
         single-use — ask an administrator for a new one, and report it if you did not use it"
    )]
    AlreadyUsed {
        /// When it was used, ms since the Unix epoch.
        used_at_ms: i64,
    },
    /// The store failed while checking the token.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A status string that names no known status: the `FromStr` error of the status enums.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} status {value:?}; expected one of: {expected}")]
pub struct ParseStatusError {
    kind: &'static str,
    value: String,
    expected: &'static str,
}

impl ParseStatusError {
    /// `kind` names the enum ("device"), `expected` lists the valid spellings.
    pub(crate) fn new(kind: &'static str, value: &str, expected: &'static str) -> Self {
        ParseStatusError {
            kind,
            // Bounded: the value may come from the network.
            value: value.chars().take(64).collect(),
            expected,
        }
    }
}
