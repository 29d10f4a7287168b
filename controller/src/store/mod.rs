//! The controller's durable state behind one seam, with two real back ends.
//!
//! [`Store`] is the only way the controller reads or writes durable state (DESIGN.md §5). It
//! speaks to SQLite (the embedded default: one file, no server) or to PostgreSQL (shared by
//! several controller replicas) through `sqlx::AnyPool`, so every query is written once, in the
//! SQL both understand, and one migration set (`controller/migrations`) builds both schemas.
//!
//! Portable column types keep that possible: ids and text are `TEXT`, instants are `BIGINT`
//! milliseconds since the Unix epoch (`i64`, supplied by the caller — the store never reads the
//! clock), flags are `BIGINT` 0/1, enums are `TEXT`, lists and JSON documents are `TEXT`.
//!
//! Races are settled by the database, not by the caller: single-use tokens and device state
//! changes are conditional `UPDATE`s, and audit appends are serialized with a lock the back end
//! holds for the length of the transaction (see [`Store::append_audit`]).
//!
//! Drive it like this:
//!
//! ```no_run
//! # async fn demo() -> Result<(), wardgate_controller::store::StoreError> {
//! use wardgate_controller::store::Store;
//! let store = Store::open("sqlite:///var/lib/wardgate/wardgate.db?mode=rwc").await?;
//! store.set_setting("controller.name", "ward-3").await?;
//! store.close().await;
//! # Ok(()) }
//! ```

mod admin_tokens;
mod audit;
mod breakglass;
mod devices;
mod documents;
mod error;
mod gateways;
mod grants;
mod groups;
mod identity;
mod join_tokens;
mod posture;
mod refresh;
mod requests;
mod users;

pub use admin_tokens::AdminToken;
pub use audit::{
    AUDIT_GENESIS_HASH, AuditBreak, AuditEvent, AuditProblem, AuditVerification, NewAuditEvent,
    audit_hash,
};
pub use breakglass::{BreakGlassEvent, NewBreakGlass, OutboxOutcome, OutboxRow, Webhook};
pub use devices::{Device, DeviceStatus};
pub use documents::DocKind;
pub use error::{ConsumeTokenError, ParseStatusError, StoreError};
pub use gateways::{Gateway, GatewayStatus};
pub use grants::{Grant, GrantStatus, NewGrant};
pub use groups::Group;
pub use identity::{LoginMethod, Session, Throttle};
pub use join_tokens::JoinToken;
pub use posture::{PostureAccept, StoredPosture};
pub use refresh::SessionRefresh;
pub use requests::{AccessRequestRow, NewAccessRequest, RequestDecision, RequestState, Vendor};
pub use users::User;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::{Any, AnyConnection, AnyPool, Transaction};
use sqlx::{Executor, Row};

/// The schema, embedded at build time so a controller binary always carries the migrations it
/// expects and applies them itself at start.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// How long a SQLite connection waits for another writer before giving up, in ms. Writers hold
/// the lock for about a millisecond, so this only runs out when something is badly stuck.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 10_000;

/// Connections per pool on PostgreSQL; several replicas share one server's connection limit.
const POSTGRES_MAX_CONNECTIONS: u32 = 10;

/// Which database engine a [`Store`] talks to, for the few places where they differ
/// (locking, connection setup) and for diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// An embedded SQLite file: the single-controller default.
    Sqlite,
    /// A PostgreSQL server, possibly shared by several controller replicas.
    Postgres,
}

impl Backend {
    /// Picks the back end from the URL scheme, so one configuration value selects everything.
    pub fn from_url(url: &str) -> Result<Backend, StoreError> {
        let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" => Ok(Backend::Sqlite),
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            _ => Err(StoreError::UnsupportedUrl {
                scheme: scheme.chars().take(32).collect(),
            }),
        }
    }

    /// Stable lowercase name, for logs and health output.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Handle to the controller's database. Cheap to clone: clones share one connection pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Serializes this process's SQLite write transactions before they ask SQLite for its
    /// write lock: SQLite makes a blocked writer poll with growing sleeps (1, 2, 5, 10 ms …),
    /// so concurrent grants contending inside the database ran at a few hundred per second;
    /// queued here they go back to back.
    sqlite_writer: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The SQLite group-commit queue for grants, started on first use.
    grant_batcher: std::sync::Arc<tokio::sync::OnceCell<grants::GrantBatch>>,
}

/// A write transaction, holding this process's SQLite writer slot (if any) until it commits
/// or is dropped. Derefs to the connection, so queries run with `.execute(&mut *tx)`.
pub(crate) struct WriteTx {
    tx: Transaction<'static, Any>,
    _slot: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl WriteTx {
    /// Commits, then frees the writer slot.
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

impl std::ops::Deref for WriteTx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
}

impl Store {
    /// Connects to `url` and brings the schema up to date, so a store that opened is ready.
    ///
    /// `sqlite:///path/wardgate.db?mode=rwc` creates the file if missing (the parent directory
    /// must exist); SQLite connections get WAL journaling, foreign keys and a busy timeout.
    /// `postgres://user@host:port/db` needs an existing database. Opening the same database
    /// twice, or from several replicas at once, is safe: migrations are applied once.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let mut options = AnyPoolOptions::new();
        match backend {
            Backend::Sqlite => {
                if sqlite_in_memory(url) {
                    // Every connection to `:memory:` is its own empty database: keep exactly one
                    // alive for the life of the pool.
                    options = options
                        .max_connections(1)
                        .min_connections(1)
                        .idle_timeout(None)
                        .max_lifetime(None);
                }
                options = options.after_connect(|conn, _meta| {
                    Box::pin(async move {
                        conn.execute(
                            format!(
                                "PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}; \
                                 PRAGMA foreign_keys = ON; \
                                 PRAGMA journal_mode = WAL;"
                            )
                            .as_str(),
                        )
                        .await?;
                        Ok(())
                    })
                });
            }
            Backend::Postgres => {
                options = options.max_connections(POSTGRES_MAX_CONNECTIONS);
            }
        }
        let pool = options.connect(url).await?;
        MIGRATOR.run(&pool).await?;
        if backend == Backend::Sqlite && !sqlite_in_memory(url) {
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(&pool)
                .await?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(
                    journal_mode = %mode,
                    "SQLite did not switch to WAL journaling; readers will block writers"
                );
            }
        }
        tracing::debug!(backend = %backend, "store opened");
        Ok(Store {
            pool,
            backend,
            sqlite_writer: Default::default(),
            grant_batcher: Default::default(),
        })
    }

    /// Which engine this store talks to.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Waits for in-flight queries and closes every connection, so the SQLite file is
    /// checkpointed and unlocked before the process exits. Later calls on any clone fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Reads one small configuration value kept in the database (shared by all replicas).
    pub async fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let value = sqlx::query_scalar("SELECT value FROM settings WHERE name = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(value)
    }

    /// Creates or replaces one configuration value.
    pub async fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Starts a transaction that will write. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`): a deferred transaction that reads first and writes later can fail
    /// with "database is locked" when another writer got in between, and the busy timeout does
    /// not help there. On PostgreSQL row locks do that job.
    async fn begin_write(&self) -> Result<WriteTx, StoreError> {
        Ok(match self.backend {
            Backend::Sqlite => {
                let slot = self.sqlite_writer.clone().lock_owned().await;
                WriteTx {
                    tx: self.pool.begin_with("BEGIN IMMEDIATE").await?,
                    _slot: Some(slot),
                }
            }
            Backend::Postgres => WriteTx {
                tx: self.pool.begin().await?,
                _slot: None,
            },
        })
    }

    /// After a unique-constraint violation on `table`, finds which of the `(column, value)`
    /// pairs is already taken, so the conflict names it instead of a generic "duplicate".
    /// The column names come from this module, never from input.
    async fn conflict(
        &self,
        record: &str,
        table: &'static str,
        candidates: &[(&'static str, &str)],
    ) -> StoreError {
        for (column, value) in candidates {
            let sql = format!("SELECT 1 AS taken FROM {table} WHERE {column} = $1");
            match sqlx::query(&sql)
                .bind(*value)
                .fetch_optional(&self.pool)
                .await
            {
                Ok(Some(_)) => {
                    return StoreError::Conflict {
                        what: format!("a {record} with {column} {value:?} already exists"),
                    };
                }
                Ok(None) => {}
                Err(e) => return StoreError::Database(e),
            }
        }
        StoreError::Conflict {
            what: format!("a conflicting {record} was written at the same time"),
        }
    }
}

/// True for URLs that open a private in-memory SQLite database.
fn sqlite_in_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

/// True when the database refused a write because a UNIQUE or PRIMARY KEY value exists.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|db| db.is_unique_violation())
}

/// True when the database refused a write because a referenced row does not exist.
fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|db| db.is_foreign_key_violation())
}

/// Reads a BIGINT 0/1 flag column.
fn get_flag(row: &sqlx::any::AnyRow, column: &str, whose: &str) -> Result<bool, StoreError> {
    match row.try_get::<i64, _>(column)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(StoreError::Corrupt {
            what: format!("flag {column} = {other} of {whose} (expected 0 or 1)"),
        }),
    }
}

/// Reads a TEXT column holding a JSON list of strings (e.g. CIDR networks).
fn get_string_list(
    row: &sqlx::any::AnyRow,
    column: &str,
    whose: &str,
) -> Result<Vec<String>, StoreError> {
    let text: String = row.try_get(column)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
        what: format!("{column} of {whose} (not a JSON list of strings: {e})"),
    })
}

/// Serializes a list of strings for a JSON TEXT column.
fn string_list_json(list: &[String], whose: &str) -> Result<String, StoreError> {
    serde_json::to_string(list).map_err(|e| StoreError::Invalid {
        what: format!("networks of {whose} cannot be encoded as JSON: {e}"),
    })
}

/// Refuses text that is not one JSON value, so a JSON TEXT column only ever holds JSON and a
/// bad document is caught when written, not when some later reader trips over it.
fn check_json(text: &str, what: &str) -> Result<(), StoreError> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(|_| ())
        .map_err(|e| StoreError::Invalid {
            what: format!("{what} is not valid JSON: {e}"),
        })
}

/// Refuses an empty or over-long name: names are keys that people type and read.
fn check_name(name: &str, what: &str) -> Result<(), StoreError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(StoreError::Invalid {
            what: format!("{what} name must be 1 to {MAX_NAME_LEN} bytes long"),
        });
    }
    Ok(())
}

/// Longest name (group, document) the store accepts, in bytes.
const MAX_NAME_LEN: usize = 200;

/// Counts one more change to the access model (see [`Store::policy_version`]). Called first
/// in every such write transaction: on PostgreSQL the row lock it takes then serializes those
/// transactions, so they cannot deadlock on each other's rows or race an upsert.
async fn bump_policy_version(conn: &mut AnyConnection) -> Result<(), StoreError> {
    let result = sqlx::query("UPDATE policy_version SET version = version + 1 WHERE id = 1")
        .execute(&mut *conn)
        .await?;
    if result.rows_affected() != 1 {
        return Err(StoreError::Corrupt {
            what: "policy_version (its single row is missing)".into(),
        });
    }
    Ok(())
}

/// Sorts names by their bytes: PostgreSQL's `ORDER BY` follows the database's collation
/// (which may fold case), SQLite's compares bytes, and both back ends must list alike.
fn sort_by_bytes<T>(items: &mut [T], key: impl Fn(&T) -> &str) {
    items.sort_by(|a, b| key(a).as_bytes().cmp(key(b).as_bytes()));
}
