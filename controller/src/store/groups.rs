//! Groups of users: what policies grant access to.
//!
//! Every change here is a change to who may reach what, so each one also bumps
//! [`Store::policy_version`] in the same transaction.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{
    Store, StoreError, bump_policy_version, check_name, is_foreign_key_violation,
    is_unique_violation, sort_by_bytes,
};

/// A named group of users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Unique name, which policies refer to (e.g. `radiology`).
    pub name: String,
    /// What the group is for, for people.
    pub description: String,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: i64,
}

fn from_row(row: &AnyRow) -> Result<Group, StoreError> {
    Ok(Group {
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        created_ms: row.try_get("created_ms")?,
    })
}

impl Store {
    /// Creates an empty group and returns it. `Conflict` if the name is taken, `Invalid` for
    /// an empty or over-long name.
    pub async fn create_group(
        &self,
        name: &str,
        description: &str,
        now_ms: i64,
    ) -> Result<Group, StoreError> {
        check_name(name, "group")?;
        let mut tx = self.begin_write().await?;
        bump_policy_version(&mut tx).await?;
        let result =
            sqlx::query("INSERT INTO groups (name, description, created_ms) VALUES ($1, $2, $3)")
                .bind(name)
                .bind(description)
                .bind(now_ms)
                .execute(&mut *tx)
                .await;
        match result {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict {
                    what: format!("a group named {name:?} already exists"),
                });
            }
            Err(e) => return Err(e.into()),
        }
        tx.commit().await?;
        Ok(Group {
            name: name.to_owned(),
            description: description.to_owned(),
            created_ms: now_ms,
        })
    }

    /// Looks a group up by name.
    pub async fn group_by_name(&self, name: &str) -> Result<Option<Group>, StoreError> {
        let row = sqlx::query("SELECT name, description, created_ms FROM groups WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// All groups, ordered by name (bytewise, the same on both back ends).
    pub async fn list_groups(&self) -> Result<Vec<Group>, StoreError> {
        let rows = sqlx::query("SELECT name, description, created_ms FROM groups")
            .fetch_all(&self.pool)
            .await?;
        let mut groups = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        sort_by_bytes(&mut groups, |g| &g.name);
        Ok(groups)
    }

    /// Deletes a group and its memberships. `NotFound` if there is no such group.
    ///
    /// Policies naming the group are the policy layer's to check before calling this: the
    /// store does not read inside policy documents.
    pub async fn delete_group(&self, name: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        bump_policy_version(&mut tx).await?;
        sqlx::query("DELETE FROM group_members WHERE group_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let result = sqlx::query("DELETE FROM groups WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if result.rows_affected() == 0 {
            // Dropping `tx` rolls the version bump back.
            return Err(StoreError::NotFound {
                what: format!("group {name:?}"),
            });
        }
        tx.commit().await?;
        Ok(())
    }

    /// Makes a user a member of a group. Returns `true` if added, `false` if the user already
    /// was a member (nothing changes, the version is not bumped). `NotFound` naming the group
    /// or the user if either does not exist.
    pub async fn add_group_member(&self, group: &str, user_id: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        bump_policy_version(&mut tx).await?;
        let result = sqlx::query(
            "INSERT INTO group_members (group_name, user_id) VALUES ($1, $2) \
             ON CONFLICT (group_name, user_id) DO NOTHING",
        )
        .bind(group)
        .bind(user_id)
        .execute(&mut *tx)
        .await;
        let added = match result {
            Ok(r) => r.rows_affected() > 0,
            Err(e) if is_foreign_key_violation(&e) => {
                drop(tx);
                return Err(self.missing_group_or_user(group, user_id).await);
            }
            Err(e) => return Err(e.into()),
        };
        if added {
            tx.commit().await?;
        }
        Ok(added)
    }

    /// Removes a user from a group. Returns `true` if removed, `false` if the user was not a
    /// member. `NotFound` if the group does not exist.
    pub async fn remove_group_member(
        &self,
        group: &str,
        user_id: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        bump_policy_version(&mut tx).await?;
        let result =
            sqlx::query("DELETE FROM group_members WHERE group_name = $1 AND user_id = $2")
                .bind(group)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        if result.rows_affected() > 0 {
            tx.commit().await?;
            return Ok(true);
        }
        drop(tx);
        if self.group_by_name(group).await?.is_none() {
            return Err(StoreError::NotFound {
                what: format!("group {group:?}"),
            });
        }
        Ok(false)
    }

    /// Names of the groups `user_id` belongs to, sorted bytewise; empty for an unknown user.
    /// This is what the policy engine matches policies against.
    pub async fn groups_of_user(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        let mut names: Vec<String> =
            sqlx::query_scalar("SELECT group_name FROM group_members WHERE user_id = $1")
                .bind(user_id)
                .fetch_all(&self.pool)
                .await?;
        sort_by_bytes(&mut names, |n| n);
        Ok(names)
    }

    /// User ids of a group's members, sorted bytewise. `NotFound` if there is no such group
    /// (an empty group gives an empty list).
    pub async fn members_of_group(&self, group: &str) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> =
            sqlx::query_scalar("SELECT user_id FROM group_members WHERE group_name = $1")
                .bind(group)
                .fetch_all(&self.pool)
                .await?;
        if ids.is_empty() && self.group_by_name(group).await?.is_none() {
            return Err(StoreError::NotFound {
                what: format!("group {group:?}"),
            });
        }
        sort_by_bytes(&mut ids, |n| n);
        Ok(ids)
    }

    /// After a foreign-key refusal, names which of the two records is missing.
    async fn missing_group_or_user(&self, group: &str, user_id: &str) -> StoreError {
        match self.group_by_name(group).await {
            Ok(None) => StoreError::NotFound {
                what: format!("group {group:?}"),
            },
            Ok(Some(_)) => StoreError::NotFound {
                what: format!("user {user_id}"),
            },
            Err(e) => e,
        }
    }
}
