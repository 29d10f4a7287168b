//! Local user accounts.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, get_flag, is_unique_violation};

/// A local user: someone who signs in to enrol devices and request access.
///
/// `Debug` leaves the password hash out, so a logged record cannot feed an offline cracker.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Stable id, e.g. `usr_…`; devices point at it.
    pub id: String,
    /// Unique sign-in name.
    pub username: String,
    /// Name shown to people.
    pub display_name: String,
    /// argon2id PHC string made by the caller; `None` for users who cannot sign in with a
    /// password (e.g. they come from an identity provider).
    pub password_hash: Option<String>,
    /// A disabled user cannot sign in and gets no grants.
    pub disabled: bool,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: i64,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id)
            .field("username", &self.username)
            .field("display_name", &self.display_name)
            .field(
                "password_hash",
                &self.password_hash.as_ref().map(|_| "<redacted>"),
            )
            .field("disabled", &self.disabled)
            .field("created_ms", &self.created_ms)
            .finish()
    }
}

const COLUMNS: &str = "id, username, display_name, password_hash, disabled, created_ms";

fn from_row(row: &AnyRow) -> Result<User, StoreError> {
    let id: String = row.try_get("id")?;
    let disabled = get_flag(row, "disabled", &format!("user {id}"))?;
    Ok(User {
        username: row.try_get("username")?,
        display_name: row.try_get("display_name")?,
        password_hash: row.try_get("password_hash")?,
        disabled,
        created_ms: row.try_get("created_ms")?,
        id,
    })
}

impl Store {
    /// Creates a user. `Conflict` if the username (or id) is taken.
    pub async fn insert_user(&self, u: &User) -> Result<(), StoreError> {
        let result = sqlx::query(
            "INSERT INTO users (id, username, display_name, password_hash, disabled, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(u.id.as_str())
        .bind(u.username.as_str())
        .bind(u.display_name.as_str())
        .bind(u.password_hash.as_deref())
        .bind(i64::from(u.disabled))
        .bind(u.created_ms)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(self
                .conflict("user", "users", &[("username", &u.username), ("id", &u.id)])
                .await),
            Err(e) => Err(e.into()),
        }
    }

    /// Looks a user up by sign-in name (exact, case-sensitive match).
    pub async fn user_by_username(&self, username: &str) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM users WHERE username = $1"))
            .bind(username)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Looks a user up by id, e.g. a device's owner.
    pub async fn user_by_id(&self, id: &str) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM users WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// All users, ordered by username, for the admin API.
    pub async fn list_users(&self) -> Result<Vec<User>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM users ORDER BY username"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// Disables or re-enables a user. `NotFound` if there is no such user.
    pub async fn set_user_disabled(&self, id: &str, disabled: bool) -> Result<(), StoreError> {
        let result = sqlx::query("UPDATE users SET disabled = $1 WHERE id = $2")
            .bind(i64::from(disabled))
            .bind(id)
            .execute(&self.pool)
            .await?;
        if result.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                what: format!("user {id}"),
            });
        }
        Ok(())
    }
}
