//! Reads the catalog from the store and writes changes to it.
//!
//! A write reads the whole catalog, applies the change with the domain
//! model's checks, and commits only the keys that changed, guarded by the
//! catalog guard key: if any other catalog write landed in between, the
//! guard fails and the write is retried from a fresh read. So every write
//! is checked against the catalog it actually lands on (no application
//! profile can appear for a base that is being deleted), while the
//! revision an operator names is checked per object by the model.

use std::collections::BTreeMap;

use spillway_core::model::{Catalog, ModelError};

use crate::keys;
use crate::store::{Compare, Op, Store, StoreError};

/// How often a write is retried when other writes keep landing first.
const WRITE_ATTEMPTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Corrupt(String),
    #[error("the catalog kept changing under this write; retry")]
    Contention,
}

/// The catalog, with the guard revision it was read at.
pub async fn load(store: &Store) -> Result<(Catalog, i64), WriteError> {
    // The guard is read first: any catalog write after this read changes it
    // and fails the guarded commit, so the lists below are never older than
    // what the commit is checked against.
    let guard = store
        .get(keys::CATALOG_GUARD)
        .await?
        .map_or(0, |kv| kv.mod_revision);
    let mut catalog = Catalog::default();
    for prefix in [
        keys::REGIONS,
        keys::PROFILES,
        keys::ROUTES,
        keys::QUOTAS,
        keys::TENANTS,
        keys::KEYS,
    ] {
        let (kvs, _) = store.list(prefix).await?;
        for kv in &kvs {
            let object = keys::decode(kv).map_err(WriteError::Corrupt)?;
            keys::insert(&mut catalog, object);
        }
    }
    Ok((catalog, guard))
}

/// Applies `change` to the current catalog and commits what it changed.
/// Returns what `change` returned, the catalog as written (with the
/// revisions of the written objects filled in) and the commit revision.
pub async fn write<T>(
    store: &Store,
    change: impl Fn(&mut Catalog) -> Result<T, ModelError>,
) -> Result<(T, Catalog, i64), WriteError> {
    for _ in 0..WRITE_ATTEMPTS {
        let (before, guard) = load(store).await?;
        let mut after = before.clone();
        let out = change(&mut after)?;
        let old: BTreeMap<String, Vec<u8>> = keys::encode_catalog(&before).into_iter().collect();
        let new: BTreeMap<String, Vec<u8>> = keys::encode_catalog(&after).into_iter().collect();
        let mut ops: Vec<Op> = old
            .keys()
            .filter(|k| !new.contains_key(*k))
            .map(|k| Op::Delete { key: k.clone() })
            .collect();
        let mut changed = Vec::new();
        for (k, v) in &new {
            if old.get(k) != Some(v) {
                changed.push(k.clone());
                ops.push(Op::Put {
                    key: k.clone(),
                    value: v.clone(),
                    lease: None,
                });
            }
        }
        ops.push(Op::Put {
            key: keys::CATALOG_GUARD.to_string(),
            value: Vec::new(),
            lease: None,
        });
        let guard = Compare {
            key: keys::CATALOG_GUARD.to_string(),
            mod_revision: guard,
        };
        let outcome = store.txn(vec![guard], ops).await?;
        if outcome.succeeded {
            stamp(&mut after, &changed, outcome.revision);
            return Ok((out, after, outcome.revision));
        }
        tracing::debug!("catalog changed during a write; retrying");
    }
    Err(WriteError::Contention)
}

/// Sets the revision of the objects just written.
fn stamp(catalog: &mut Catalog, changed: &[String], revision: i64) {
    for key in changed {
        if let Some(name) = key.strip_prefix(keys::REGIONS)
            && let Some(r) = catalog.regions.get_mut(name)
        {
            r.revision = revision;
        } else if let Some(id) = key.strip_prefix(keys::PROFILES)
            && let Some(p) = catalog.profiles.get_mut(id)
        {
            p.revision = revision;
        } else if let Some(id) = key.strip_prefix(keys::QUOTAS)
            && let Some(q) = catalog.quotas.get_mut(id)
        {
            q.revision = revision;
        } else if let Some(name) = key.strip_prefix(keys::TENANTS)
            && let Some(t) = catalog.tenants.get_mut(name)
        {
            t.revision = revision;
        } else if let Some(id) = key.strip_prefix(keys::KEYS)
            && let Some(k) = catalog.keys.get_mut(id)
        {
            k.revision = revision;
        } else if let Some(rest) = key.strip_prefix(keys::ROUTES)
            && let Some((profile, source)) = rest.rsplit_once('/')
            && let Some(t) = catalog
                .routes
                .get_mut(&(profile.to_string(), source.to_string()))
        {
            t.revision = revision;
        }
    }
}
