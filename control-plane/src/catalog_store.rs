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
//!
//! A write costs what it touches, not the catalog: the change is applied
//! in place to the replica's working copy of the catalog, which is kept
//! from one write to the next while the watched state shows no catalog
//! change but this replica's own writes (and made afresh from the state
//! otherwise), and the model's journal names what the change touched, so
//! that only those objects are compared, encoded and written.

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
    /// and the guard decides.) The writer's working copy lives here.
    writing: Arc<tokio::sync::Mutex<Writer>>,
}

/// What the replica's writes keep from one to the next.
#[derive(Default)]
struct Writer {
    copy: Option<WorkingCopy>,
    /// How many times the copy was made afresh from the watched state.
    clones: u64,
}

/// A copy of the catalog that writes change in place, and the catalog
/// revisions of the watched states whose catalog it equals.
struct WorkingCopy {
    catalog: Catalog,
    /// (`State::catalog_revision`, `State::catalog_revision_before`).
    at: (i64, i64),
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
            // A state is not held while waiting: the follower would have to
            // copy its catalog to apply the events waited for.
            let have = {
                let st = rx.borrow_and_update();
                if st.loaded && st.revision >= guard {
                    return Ok((Arc::clone(&st), guard));
                }
                st.revision
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(WriteError::Behind { have, want: guard });
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
    /// Returns what `written` makes of `change`'s result and of the catalog
    /// as written (with the revisions of the written objects filled in),
    /// and the commit revision.
    ///
    /// `change` must change the catalog through the model's operations
    /// (`Catalog::create_profile` and the like): only what they journal is
    /// written.
    pub async fn write<T, R>(
        &self,
        change: impl Fn(&mut Catalog) -> Result<T, ModelError>,
        written: impl FnOnce(T, &Catalog) -> R,
    ) -> Result<(R, i64), WriteError> {
        let mut writer = self.writing.lock().await;
        for _ in 0..WRITE_ATTEMPTS {
            let (st, guard) = self.view().await?;
            // The copy equals this state's catalog if the state's last
            // catalog changes are those the copy was left at (see
            // ARCHITECTURE.md, "The control path, as built", step 1). It is
            // taken out while in use: if this call fails, is cancelled or
            // panics before it is put back, the next write makes it afresh.
            let at = (st.catalog_revision, st.catalog_revision_before);
            let mut copy = match writer.copy.take() {
                Some(copy) if copy.at == at => copy,
                _ => {
                    writer.clones += 1;
                    tracing::debug!(
                        catalog_revision = at.0,
                        "catalog working copy made afresh from the view"
                    );
                    WorkingCopy {
                        catalog: Catalog::clone(&st.catalog),
                        at,
                    }
                }
            };
            copy.catalog.start_journal();
            let out = change(&mut copy.catalog);
            let touched = copy.catalog.take_journal().unwrap_or_default();
            let out = match out {
                Ok(out) => out,
                Err(e) => {
                    // A refused operation undoes itself and journals
                    // nothing; a change refused after an accepted
                    // operation leaves that one in the copy, unwritten, so
                    // the copy goes.
                    if touched.is_empty() {
                        writer.copy = Some(copy);
                    }
                    return Err(e.into());
                }
            };
            let (puts, deletes) = keys::diff_touched(&st.catalog, &copy.catalog, &touched);
            // Not held across the commit: the follower would have to copy
            // the state's catalog to apply the commit's events.
            drop(st);
            let changed: Vec<String> = puts.iter().map(|(k, _)| k.clone()).collect();
            let moves_catalog = !puts.is_empty() || !deletes.is_empty();
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
                stamp(&mut copy.catalog, &changed, outcome.revision);
                if moves_catalog {
                    // The state that has applied this commit, and no other
                    // catalog change since the copy's, has it as its last
                    // catalog change and the copy's as the one before.
                    copy.at = (outcome.revision, copy.at.0);
                }
                let out = written(out, &copy.catalog);
                writer.copy = Some(copy);
                return Ok((out, outcome.revision));
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use spillway_core::model::{Profile, ProfileKind, Region};

    use super::*;
    use crate::state;

    fn region(name: &str, geography: &str) -> Region {
        Region {
            name: name.into(),
            geography: geography.into(),
            description: String::new(),
            revision: 0,
        }
    }

    fn profile(id: &str, destinations: &[&str]) -> Profile {
        Profile {
            id: id.into(),
            kind: ProfileKind::from_id(id),
            model: String::new(),
            destinations: destinations.iter().map(|d| d.to_string()).collect(),
            base_profile: None,
            base_region: None,
            tags: BTreeMap::new(),
            description: String::new(),
            revision: 0,
        }
    }

    fn replica(store: &Store) -> Catalogs {
        Catalogs::new(store.clone(), state::spawn(store.clone()))
    }

    /// Writes one object with `op`; returns it as written.
    async fn put<T: Clone>(
        c: &Catalogs,
        op: impl Fn(&mut Catalog) -> Result<(), ModelError>,
        read: impl FnOnce(&Catalog) -> T,
    ) -> Result<(T, i64), WriteError> {
        c.write(op, |(), catalog| read(catalog)).await
    }

    /// How many times the copy was made afresh, and whether it equals the
    /// catalog of the replica's view (which the next write waits for).
    async fn copy_of(c: &Catalogs) -> (u64, bool) {
        let st = c.load().await.unwrap();
        let writer = c.writing.lock().await;
        let same = writer
            .copy
            .as_ref()
            .is_some_and(|copy| copy.catalog == *st.catalog);
        (writer.clones, same)
    }

    /// A replica's writes go on from its working copy while only they
    /// change the catalog; after each, the copy is the catalog the watch
    /// delivers, revisions included.
    #[tokio::test]
    async fn writes_reuse_the_working_copy_while_nothing_else_changed() {
        let store = Store::memory();
        let a = replica(&store);
        let (r, rev) = put(
            &a,
            |c| c.create_region(region("us-east", "us")),
            |c| c.regions["us-east"].clone(),
        )
        .await
        .unwrap();
        assert_eq!(r.revision, rev, "the written object carries its revision");
        assert_eq!(copy_of(&a).await, (1, true));
        put(&a, |c| c.create_region(region("us-west", "us")), |_| ())
            .await
            .unwrap();
        let (p, rev) = put(
            &a,
            |c| c.create_profile(profile("us.m", &["us-east"])),
            |c| c.profiles["us.m"].clone(),
        )
        .await
        .unwrap();
        assert_eq!(p.revision, rev);
        assert_eq!(copy_of(&a).await, (1, true));
        // An update that changes nothing writes nothing but the guard: the
        // object keeps its revision.
        let (same, _) = put(
            &a,
            |c| c.update_profile(p.clone()),
            |c| c.profiles["us.m"].clone(),
        )
        .await
        .unwrap();
        assert_eq!(same.revision, p.revision);
        assert_eq!(copy_of(&a).await, (1, true));
        // A refused change leaves the copy as it was, and in use.
        let e = put(&a, |c| c.delete_region("us-east", 0), |_| ())
            .await
            .unwrap_err();
        assert!(matches!(e, WriteError::Model(ModelError::InUse(_))), "{e}");
        // A delete, and one that takes route tables with it.
        put(&a, |c| c.delete_region("us-west", 0), |_| ())
            .await
            .unwrap();
        let (gone, _) = a
            .write(|c| c.delete_profile("us.m", 0), |(), c| c.profiles.len())
            .await
            .unwrap();
        assert_eq!(gone, 0);
        assert_eq!(copy_of(&a).await, (1, true));
        let stored = store.get(&keys::profile("us.m")).await.unwrap();
        assert_eq!(stored, None);
    }

    /// Another replica's write, or a change made in the store directly,
    /// makes the copy afresh, so that the next write is checked against
    /// the catalog it lands on.
    #[tokio::test]
    async fn another_writer_makes_the_copy_afresh() {
        let store = Store::memory();
        let (a, b) = (replica(&store), replica(&store));
        put(&a, |c| c.create_region(region("us-east", "us")), |_| ())
            .await
            .unwrap();
        put(&b, |c| c.create_region(region("us-west", "us")), |_| ())
            .await
            .unwrap();
        // A's copy lacks us-west: reused, it would refuse this profile.
        put(
            &a,
            |c| c.create_profile(profile("us.m", &["us-west"])),
            |_| (),
        )
        .await
        .unwrap();
        assert_eq!(copy_of(&a).await, (2, true));
        // A region written into the store directly (no guard).
        store
            .txn(
                Vec::new(),
                vec![Op::Put {
                    key: keys::region("eu-west"),
                    value: keys::encode(&region("eu-west", "eu")),
                    lease: None,
                }],
            )
            .await
            .unwrap();
        // Reads and writes wait only for catalog writes (the guard); this
        // one is waited for here.
        a.state
            .clone()
            .wait_for(|st| st.catalog.regions.contains_key("eu-west"))
            .await
            .unwrap();
        put(
            &a,
            |c| c.create_profile(profile("eu.m", &["eu-west"])),
            |_| (),
        )
        .await
        .unwrap();
        assert_eq!(copy_of(&a).await, (3, true));
        // A direct change that lands between a write's view and its commit
        // (the guard does not see it): the commit is not the only catalog
        // change since the copy's, so the next write makes it afresh.
        let Store::Memory(memory) = &store else {
            unreachable!()
        };
        let sneak = |c: &mut Catalog| {
            memory.txn(
                &[],
                vec![Op::Put {
                    key: keys::region("eu-north"),
                    value: keys::encode(&region("eu-north", "eu")),
                    lease: None,
                }],
            );
            c.create_region(region("eu-south", "eu"))
        };
        a.write(sneak, |(), _| ()).await.unwrap();
        assert_eq!(copy_of(&a).await, (3, false), "the copy lacks eu-north");
        put(
            &a,
            |c| c.create_profile(profile("eu.n", &["eu-north"])),
            |_| (),
        )
        .await
        .unwrap();
        assert_eq!(copy_of(&a).await, (4, true));
    }

    /// A change refused after an accepted operation, and a commit that
    /// fails its guard, leave nothing of themselves in the copy.
    #[tokio::test]
    async fn a_failed_write_leaves_nothing_in_the_copy() {
        let store = Store::memory();
        let a = replica(&store);
        put(&a, |c| c.create_region(region("us-east", "us")), |_| ())
            .await
            .unwrap();
        let e = a
            .write(
                |c| {
                    c.create_region(region("us-west", "us"))?;
                    c.create_region(region("us-east", "us"))
                },
                |(), _| (),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, WriteError::Model(_)), "{e}");
        assert_eq!(store.get(&keys::region("us-west")).await.unwrap(), None);
        put(&a, |c| c.create_region(region("eu-west", "eu")), |_| ())
            .await
            .unwrap();
        let (clones, same) = copy_of(&a).await;
        assert!(same);
        assert_eq!(clones, 2);
        let st = a.load().await.unwrap();
        assert!(!st.catalog.regions.contains_key("us-west"));
        // Another replica's write that lands between this one's view and
        // its commit (it takes away the region the change needs) fails the
        // guard: the change is redone on a fresh copy, and refused there.
        put(&a, |c| c.create_region(region("ap-east", "ap")), |_| ())
            .await
            .unwrap();
        let Store::Memory(memory) = &store else {
            unreachable!()
        };
        let tries = std::sync::atomic::AtomicUsize::new(0);
        let raced = |c: &mut Catalog| {
            if tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
                memory.txn(
                    &[],
                    vec![
                        Op::Delete {
                            key: keys::region("ap-east"),
                        },
                        Op::Put {
                            key: keys::CATALOG_GUARD.to_string(),
                            value: Vec::new(),
                            lease: None,
                        },
                    ],
                );
            }
            c.create_profile(profile("ap.m", &["ap-east"]))
        };
        let e = a.write(raced, |(), _| ()).await.unwrap_err();
        assert!(matches!(e, WriteError::Model(_)), "{e}");
        assert_eq!(tries.into_inner(), 2, "redone once");
        assert_eq!(store.get(&keys::profile("ap.m")).await.unwrap(), None);
        assert_eq!(copy_of(&a).await, (3, true));
    }
}
