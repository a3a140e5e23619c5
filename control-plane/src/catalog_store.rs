//! The catalog as this replica follows it, and writes to it.
//!
//! Reads and writes start from the replica's watched state (`state.rs`),
//! not from a read of the whole catalog: [`view`] reads one key, the
//! catalog guard, whose revision is that of the last catalog write, and
//! waits until the replica has applied the store's events up to it. The
//! state then holds every catalog write that completed before the call
//! (reads are linearizable, as etcd's are), for the price of one small
//! read.
//!
//! A write applies the change to that catalog with the domain model's
//! checks and commits only the objects that changed, guarded by the
//! catalog guard's revision: if another catalog write landed in between,
//! the guard fails and the write is redone from a fresh view. So every
//! write is checked against the catalog it actually lands on (no
//! application profile can appear for a base that is being deleted), while
//! the revision an operator names is checked per object by the model.

use std::sync::Arc;
use std::time::Duration;

use spillway_core::model::{Catalog, ModelError};
use tokio::sync::watch;

use crate::keys;
use crate::state::State;
use crate::store::{Compare, Op, Store, StoreError};

/// How often a write is retried when other writes keep landing first.
const WRITE_ATTEMPTS: usize = 16;

/// How long a read waits for the replica's view to catch up with the
/// store before it gives up (the watch is broken, say).
const VIEW_WAIT: Duration = Duration::from_secs(5);

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
    #[error(
        "this replica's view of the store is behind (revision {have}, the catalog is at {want}); retry, or ask another replica"
    )]
    Behind { have: i64, want: i64 },
}

/// The store and this replica's view of it.
#[derive(Clone)]
pub struct Catalogs {
    pub store: Store,
    pub state: watch::Receiver<Arc<State>>,
    /// The replica's catalog writes go one at a time: concurrent ones would
    /// only fail each other's guard and be redone. (Replicas still race,
    /// and the guard decides.)
    writing: Arc<tokio::sync::Mutex<()>>,
}

impl Catalogs {
    pub fn new(store: Store, state: watch::Receiver<Arc<State>>) -> Catalogs {
        Catalogs {
            store,
            state,
            writing: Arc::default(),
        }
    }

    /// The replica's state once it holds every catalog write committed
    /// before this call, with the catalog guard's revision.
    pub async fn view(&self) -> Result<(Arc<State>, i64), WriteError> {
        let guard = self
            .store
            .get(keys::CATALOG_GUARD)
            .await?
            .map_or(0, |kv| kv.mod_revision);
        let mut rx = self.state.clone();
        let deadline = tokio::time::Instant::now() + VIEW_WAIT;
        loop {
            let st = rx.borrow_and_update().clone();
            if st.loaded && st.revision >= guard {
                return Ok((st, guard));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(WriteError::Behind {
                    have: st.revision,
                    want: guard,
                });
            }
            // Not every applied revision wakes receivers (an agent's
            // bookkeeping alone does not), so look again now and then.
            let _ = tokio::time::timeout(Duration::from_millis(10), rx.changed()).await;
        }
    }

    /// The catalog, as [`Catalogs::view`] has it.
    pub async fn load(&self) -> Result<Arc<State>, WriteError> {
        Ok(self.view().await?.0)
    }

    /// Applies `change` to the current catalog and commits what it changed.
    /// Returns what `change` returned, the catalog as written (with the
    /// revisions of the written objects filled in) and the commit revision.
    pub async fn write<T>(
        &self,
        change: impl Fn(&mut Catalog) -> Result<T, ModelError>,
    ) -> Result<(T, Catalog, i64), WriteError> {
        let _turn = self.writing.lock().await;
        for _ in 0..WRITE_ATTEMPTS {
            let (st, guard) = self.view().await?;
            let mut after = Catalog::clone(&st.catalog);
            let out = change(&mut after)?;
            let (puts, deletes) = keys::diff_catalog(&st.catalog, &after);
            drop(st);
            let changed: Vec<String> = puts.iter().map(|(k, _)| k.clone()).collect();
            let mut ops: Vec<Op> = deletes.into_iter().map(|key| Op::Delete { key }).collect();
            ops.extend(puts.into_iter().map(|(key, value)| Op::Put {
                key,
                value,
                lease: None,
            }));
            ops.push(Op::Put {
                key: keys::CATALOG_GUARD.to_string(),
                value: Vec::new(),
                lease: None,
            });
            let guard = Compare {
                key: keys::CATALOG_GUARD.to_string(),
                mod_revision: guard,
            };
            let outcome = self.store.txn(vec![guard], ops).await?;
            if outcome.succeeded {
                stamp(&mut after, &changed, outcome.revision);
                return Ok((out, after, outcome.revision));
            }
            tracing::debug!("catalog changed during a write; retrying");
        }
        Err(WriteError::Contention)
    }
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
