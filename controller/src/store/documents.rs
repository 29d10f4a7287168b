//! Resources, policies and posture profiles, kept as named JSON documents.
//!
//! Their types belong to the policy engine, which validates them before they get here; the
//! store only checks that a document is JSON and keeps it by name, so the engine's types can
//! change without a schema migration and the store does not depend on the engine.
//!
//! Every write also bumps [`Store::policy_version`] in the same transaction, so a replica
//! that caches the access model notices another replica's changes by reading one number.

use serde::{Deserialize, Serialize};

use super::{Store, StoreError, bump_policy_version, check_json, check_name, sort_by_bytes};

/// Which kind of access-model document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocKind {
    /// What can be reached: addresses, protocols and ports, the gateways serving it, labels.
    Resource,
    /// Which groups may reach which resources, under which conditions.
    Policy,
    /// A named set of device posture requirements that policies refer to.
    PostureProfile,
}

impl DocKind {
    /// Every kind, for listing them all.
    pub const ALL: [DocKind; 3] = [DocKind::Resource, DocKind::Policy, DocKind::PostureProfile];

    /// The stable spelling: `resource`, `policy`, `posture_profile`.
    pub fn as_str(self) -> &'static str {
        match self {
            DocKind::Resource => "resource",
            DocKind::Policy => "policy",
            DocKind::PostureProfile => "posture_profile",
        }
    }

    /// The table holding this kind. A constant, never input, so it can be put into SQL.
    fn table(self) -> &'static str {
        match self {
            DocKind::Resource => "resources",
            DocKind::Policy => "policies",
            DocKind::PostureProfile => "posture_profiles",
        }
    }

    /// How messages name one document of this kind.
    fn label(self) -> &'static str {
        match self {
            DocKind::Resource => "resource",
            DocKind::Policy => "policy",
            DocKind::PostureProfile => "posture profile",
        }
    }
}

impl std::fmt::Display for DocKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Store {
    /// Creates or replaces the `kind` document called `name` with `spec_json`, and returns
    /// `true` if it was created, `false` if it replaced one. `Invalid` if `spec_json` is not
    /// JSON or the name is empty or over-long.
    pub async fn put_document(
        &self,
        kind: DocKind,
        name: &str,
        spec_json: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        check_name(name, kind.label())?;
        check_json(spec_json, &format!("the spec of {} {name:?}", kind.label()))?;
        let table = kind.table();
        let mut tx = self.begin_write().await?;
        // First, so concurrent writers queue here and the update-else-insert below cannot race
        // (see `bump_policy_version`; on SQLite `BEGIN IMMEDIATE` already serialized them).
        bump_policy_version(&mut tx).await?;
        let updated = sqlx::query(&format!(
            "UPDATE {table} SET spec = $1, updated_ms = $2 WHERE name = $3"
        ))
        .bind(spec_json)
        .bind(now_ms)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        let created = updated.rows_affected() == 0;
        if created {
            sqlx::query(&format!(
                "INSERT INTO {table} (name, spec, updated_ms) VALUES ($1, $2, $3)"
            ))
            .bind(name)
            .bind(spec_json)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(created)
    }

    /// The JSON spec of the `kind` document called `name`, if there is one.
    pub async fn get_document(
        &self,
        kind: DocKind,
        name: &str,
    ) -> Result<Option<String>, StoreError> {
        let spec = sqlx::query_scalar(&format!(
            "SELECT spec FROM {} WHERE name = $1",
            kind.table()
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(spec)
    }

    /// Every `kind` document as `(name, spec_json)`, ordered by name (bytewise, the same on
    /// both back ends).
    pub async fn list_documents(&self, kind: DocKind) -> Result<Vec<(String, String)>, StoreError> {
        let mut docs: Vec<(String, String)> =
            sqlx::query_as(&format!("SELECT name, spec FROM {}", kind.table()))
                .fetch_all(&self.pool)
                .await?;
        sort_by_bytes(&mut docs, |(name, _)| name);
        Ok(docs)
    }

    /// Deletes the `kind` document called `name`. `NotFound` if there is none.
    ///
    /// References to it from other documents are the policy layer's to check first.
    pub async fn delete_document(&self, kind: DocKind, name: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        bump_policy_version(&mut tx).await?;
        let result = sqlx::query(&format!("DELETE FROM {} WHERE name = $1", kind.table()))
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if result.rows_affected() == 0 {
            // Dropping `tx` rolls the version bump back.
            return Err(StoreError::NotFound {
                what: format!("{} {name:?}", kind.label()),
            });
        }
        tx.commit().await?;
        Ok(())
    }

    /// A counter that grows with every committed change to resources, policies, posture
    /// profiles, groups and memberships, by any replica.
    ///
    /// A controller caching the access model reads this number *before* reading the model;
    /// when it later differs, something changed and the cache is reloaded. Reading it first
    /// means a cache can only be tagged with an older number than its contents, which costs at
    /// most one needless reload, never a missed change.
    pub async fn policy_version(&self) -> Result<i64, StoreError> {
        let version: Option<i64> =
            sqlx::query_scalar("SELECT version FROM policy_version WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?;
        version.ok_or_else(|| StoreError::Corrupt {
            what: "policy_version (its single row is missing)".into(),
        })
    }
}
