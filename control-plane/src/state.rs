//! The replica's view of the store: lists everything under the prefix,
//! then follows a watch from the list revision + 1, and publishes each new
//! state on a `tokio::sync::watch`. When the watch breaks it resumes from
//! the last revision it applied; when that revision was compacted away it
//! lists again. It never skips an event silently.

use std::collections::BTreeMap;
use std::sync::Arc;

use spillway_core::backoff::Backoff;
use spillway_core::model::Catalog;
use tokio::sync::watch;

use crate::keys::{self, AgentRecord, HealthRecord, LeaseRecord, Object, WeightsRecord};
use crate::store::{Store, StoreError, WatchEvent, WatchMessage};

/// A value with when this replica saw it, on its own monotonic clock, so
/// that freshness does not depend on the clocks of other machines. `None`
/// for values read once rather than followed (their own timestamps apply).
#[derive(Debug, Clone, PartialEq)]
pub struct Seen<T> {
    pub value: T,
    pub at: Option<tokio::time::Instant>,
}

impl<T> Seen<T> {
    pub fn now(value: T) -> Self {
        Seen {
            value,
            at: Some(tokio::time::Instant::now()),
        }
    }
}

/// Everything the sync streams need, at one store revision.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// False until the first list has been applied.
    pub loaded: bool,
    /// The store revision this state reflects.
    pub revision: i64,
    /// Shared, so that a state held by a reader (the views, a stream) is
    /// copied on write without copying the catalog unless it changes.
    pub catalog: Arc<Catalog>,
    /// The revision at which the catalog or the effective weights last
    /// changed.
    pub catalog_version: i64,
    /// The revision at which a catalog object (a region, profile, route
    /// table, quota, tenant or key) last changed, and the one at which
    /// one changed before that: weights, agents and the catalog guard do
    /// not move them. A relist that finds the catalog changed sets both to
    /// the list revision, since it cannot tell which changes it folded
    /// together. A writer reuses its working copy of the catalog only
    /// while they are what its own last write left (`catalog_store`).
    pub catalog_revision: i64,
    pub catalog_revision_before: i64,
    /// Effective weights by (profile, source region), from the leader.
    pub weights: Arc<BTreeMap<(String, String), WeightsRecord>>,
    /// Agents' latest load reports by store key (these never wake streams).
    pub health: BTreeMap<String, Seen<HealthRecord>>,
    /// Connected agents by store key.
    pub agents: BTreeMap<String, AgentRecord>,
    /// Quota leases by (region, agent id), from the leader.
    pub leases: BTreeMap<(String, String), LeaseRecord>,
    /// The revision at which an agent's relay endpoint last appeared,
    /// changed or went away (acks alone do not count).
    pub endpoints_version: i64,
    /// The replica holding the `leader` key, if any: a follower campaigns
    /// as soon as it goes, rather than at its next tick.
    pub leader: Option<String>,
}

impl State {
    /// The version of the configuration agents receive: it changes exactly
    /// when the catalog or the set of relay endpoints changes.
    pub fn config_version(&self) -> u64 {
        self.catalog_version.max(self.endpoints_version).max(0) as u64
    }

    /// What agents learn of each other: where to relay, and which APIs
    /// each serves.
    fn endpoints(&self) -> Vec<(&str, &str, &str, &[String])> {
        self.agents
            .values()
            .map(|a| {
                (
                    a.region.as_str(),
                    a.agent_id.as_str(),
                    a.relay_address.as_str(),
                    a.apis.as_slice(),
                )
            })
            .collect()
    }
}

/// Starts following the store; the task ends when every receiver is gone.
pub fn spawn(store: Store) -> watch::Receiver<Arc<State>> {
    let (tx, rx) = watch::channel(Arc::new(State::default()));
    tokio::spawn(async move {
        tokio::select! {
            _ = follow(store, &tx) => {}
            _ = tx.closed() => {}
        }
    });
    rx
}

async fn follow(store: Store, tx: &watch::Sender<Arc<State>>) {
    let mut backoff = Backoff::default();
    // The revision the state reflects, when the next watch may resume from
    // it; `None` means list first.
    let mut resume: Option<i64> = None;
    loop {
        let last = match resume.take() {
            Some(revision) => revision,
            None => match list(&store, tx).await {
                Ok(revision) => revision,
                Err(e) => {
                    tracing::warn!(error = %e, "listing the store failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            },
        };
        match watch_from(&store, tx, last + 1, &mut backoff).await {
            Ok(WatchEnd::Compacted(compact_revision)) => {
                tracing::warn!(
                    start_revision = last + 1,
                    compact_revision,
                    "watch start revision was compacted; relisting"
                );
            }
            Err(e) => {
                let revision = tx.borrow().revision;
                tracing::warn!(error = %e, resume_revision = revision + 1, "store watch broke; resuming");
                resume = Some(revision);
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

enum WatchEnd {
    Compacted(i64),
}

/// Lists everything and publishes it; returns the list revision.
async fn list(store: &Store, tx: &watch::Sender<Arc<State>>) -> Result<i64, StoreError> {
    let (kvs, revision) = store.list("").await?;
    let mut fresh = State {
        loaded: true,
        revision,
        ..State::default()
    };
    for kv in &kvs {
        if kv.key == keys::LEADER {
            fresh.leader = Some(String::from_utf8_lossy(&kv.value).into_owned());
            continue;
        }
        match keys::decode(kv) {
            Ok(Object::Agent(a)) => {
                fresh.agents.insert(kv.key.clone(), a);
            }
            Ok(Object::Health(h)) => {
                fresh.health.insert(kv.key.clone(), Seen::now(h));
            }
            Ok(Object::Weights(w)) => {
                Arc::make_mut(&mut fresh.weights)
                    .insert((w.profile.clone(), w.source_region.clone()), w);
            }
            Ok(Object::Leases(l)) => {
                fresh
                    .leases
                    .insert((l.region.clone(), l.agent_id.clone()), l);
            }
            Ok(object) => keys::insert(Arc::make_mut(&mut fresh.catalog), object),
            Err(e) => tracing::warn!("{e}; skipped"),
        }
    }
    let old = tx.borrow().clone();
    (fresh.catalog_revision, fresh.catalog_revision_before) =
        if old.loaded && old.catalog == fresh.catalog {
            (old.catalog_revision, old.catalog_revision_before)
        } else {
            (revision, revision)
        };
    // Versions move only when content moved, so that a relist of the same
    // data does not push anything to agents.
    fresh.catalog_version =
        if old.loaded && old.catalog == fresh.catalog && old.weights == fresh.weights {
            old.catalog_version
        } else {
            revision
        };
    fresh.endpoints_version = if old.loaded && old.endpoints() == fresh.endpoints() {
        old.endpoints_version
    } else {
        revision
    };
    tx.send_replace(Arc::new(fresh));
    Ok(revision)
}

async fn watch_from(
    store: &Store,
    tx: &watch::Sender<Arc<State>>,
    start: i64,
    backoff: &mut Backoff,
) -> Result<WatchEnd, StoreError> {
    let mut rx = store.watch("", start).await?;
    // The watch is established: the next break starts backing off afresh.
    backoff.reset();
    while let Some(msg) = rx.recv().await {
        match msg? {
            WatchMessage::Compacted { compact_revision } => {
                return Ok(WatchEnd::Compacted(compact_revision));
            }
            WatchMessage::Events { revision, events } => {
                // Receivers are woken only when what agents get changed: the
                // agent records' ACK bookkeeping alone must not wake every
                // stream of the replica.
                tx.send_if_modified(|s| apply(Arc::make_mut(s), revision, &events));
            }
        }
    }
    Err(StoreError::Unavailable("the watch ended".into()))
}

/// Notes that a catalog object changed at `revision` (events of one
/// transaction share it).
fn catalog_moved(state: &mut State, revision: i64) {
    if revision != state.catalog_revision {
        state.catalog_revision_before = state.catalog_revision;
        state.catalog_revision = revision;
    }
}

/// Applies events; returns whether the catalog, the relay endpoints, a
/// quota lease or the leader changed.
fn apply(state: &mut State, revision: i64, events: &[WatchEvent]) -> bool {
    let endpoints_before: Vec<(String, String, String, Vec<String>)> = state
        .endpoints()
        .into_iter()
        .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_vec()))
        .collect();
    let mut catalog_changed = false;
    let mut leases_changed = false;
    let leader_before = state.leader.clone();
    for ev in events {
        match ev {
            WatchEvent::Put(kv) if kv.key == keys::LEADER => {
                state.leader = Some(String::from_utf8_lossy(&kv.value).into_owned());
            }
            WatchEvent::Delete { key, .. } if key == keys::LEADER => state.leader = None,
            WatchEvent::Put(kv) => match keys::decode(kv) {
                Ok(Object::Agent(a)) => {
                    state.agents.insert(kv.key.clone(), a);
                }
                Ok(Object::Health(h)) => {
                    state.health.insert(kv.key.clone(), Seen::now(h));
                }
                Ok(Object::Weights(w)) => {
                    let key = (w.profile.clone(), w.source_region.clone());
                    if state.weights.get(&key) != Some(&w) {
                        Arc::make_mut(&mut state.weights).insert(key, w);
                        catalog_changed = true;
                    }
                }
                Ok(Object::Leases(l)) => {
                    state
                        .leases
                        .insert((l.region.clone(), l.agent_id.clone()), l);
                    leases_changed = true;
                }
                Ok(Object::Other) => {}
                Ok(object) => {
                    keys::insert(Arc::make_mut(&mut state.catalog), object);
                    catalog_changed = true;
                    catalog_moved(state, kv.mod_revision);
                }
                Err(e) => tracing::warn!("{e}; skipped"),
            },
            WatchEvent::Delete { key, mod_revision } => {
                // Whether a catalog object went.
                let mut removed = false;
                if key.starts_with(keys::AGENTS) {
                    state.agents.remove(key);
                } else if key.starts_with(keys::HEALTH) {
                    state.health.remove(key);
                } else if let Some(rest) = key.strip_prefix(keys::LEASES)
                    && let Some((r, a)) = rest.split_once('/')
                {
                    leases_changed |= state
                        .leases
                        .remove(&(r.to_string(), a.to_string()))
                        .is_some();
                } else if let Some(rest) = key.strip_prefix(keys::WEIGHTS)
                    && let Some((p, s)) = rest.rsplit_once('/')
                {
                    catalog_changed |= Arc::make_mut(&mut state.weights)
                        .remove(&(p.to_string(), s.to_string()))
                        .is_some();
                } else if let Some(name) = key.strip_prefix(keys::REGIONS) {
                    removed = Arc::make_mut(&mut state.catalog)
                        .regions
                        .remove(name)
                        .is_some();
                } else if let Some(id) = key.strip_prefix(keys::QUOTAS) {
                    removed = Arc::make_mut(&mut state.catalog)
                        .quotas
                        .remove(id)
                        .is_some();
                } else if let Some(name) = key.strip_prefix(keys::TENANTS) {
                    removed = Arc::make_mut(&mut state.catalog)
                        .tenants
                        .remove(name)
                        .is_some();
                } else if let Some(id) = key.strip_prefix(keys::KEYS) {
                    removed = Arc::make_mut(&mut state.catalog).keys.remove(id).is_some();
                } else if let Some(id) = key.strip_prefix(keys::PROFILES) {
                    removed = Arc::make_mut(&mut state.catalog)
                        .profiles
                        .remove(id)
                        .is_some();
                } else if let Some(rest) = key.strip_prefix(keys::ROUTES)
                    && let Some((p, s)) = rest.rsplit_once('/')
                {
                    removed = Arc::make_mut(&mut state.catalog)
                        .routes
                        .remove(&(p.to_string(), s.to_string()))
                        .is_some();
                }
                if removed {
                    catalog_changed = true;
                    catalog_moved(state, *mod_revision);
                }
            }
        }
    }
    state.revision = state.revision.max(revision);
    if catalog_changed {
        state.catalog_version = revision;
    }
    let endpoints_after = state.endpoints();
    let same = endpoints_after.len() == endpoints_before.len()
        && endpoints_after
            .iter()
            .zip(&endpoints_before)
            .all(|(a, b)| a.0 == b.0 && a.1 == b.1 && a.2 == b.2 && a.3 == b.3.as_slice());
    if !same {
        state.endpoints_version = revision;
    }
    catalog_changed || !same || leases_changed || state.leader != leader_before
}
