//! The embedded in-memory store: the same revisions, transactions, leases
//! and watches as etcd, inside one process. Used when no etcd endpoint is
//! configured.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    Compare, KeyValue, LeaseId, Op, Result, StoreError, TxnOutcome, WatchEvent, WatchMessage,
};

/// How many past events are kept for watches that start in the past; older
/// start revisions get [`WatchMessage::Compacted`], as with etcd.
const HISTORY: usize = 10_000;
/// A watcher that falls this far behind is dropped; it relists.
const WATCH_BUFFER: usize = 1024;

#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    revision: i64,
    data: BTreeMap<String, Entry>,
    history: VecDeque<(i64, WatchEvent)>,
    /// History at or before this revision is gone.
    compacted: i64,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    watchers: Vec<Watcher>,
}

struct Entry {
    value: Vec<u8>,
    mod_revision: i64,
    lease: Option<LeaseId>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Result<WatchMessage>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.expire_leases();
        inner
    }

    pub fn get(&self, key: &str) -> Option<KeyValue> {
        let inner = self.lock();
        inner.data.get(key).map(|e| KeyValue {
            key: key.to_string(),
            value: e.value.clone(),
            mod_revision: e.mod_revision,
        })
    }

    pub fn list(&self, prefix: &str) -> (Vec<KeyValue>, i64) {
        let inner = self.lock();
        let kvs = inner
            .data
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| KeyValue {
                key: k.clone(),
                value: e.value.clone(),
                mod_revision: e.mod_revision,
            })
            .collect();
        (kvs, inner.revision)
    }

    pub fn txn(&self, compares: &[Compare], ops: Vec<Op>) -> TxnOutcome {
        let mut inner = self.lock();
        let holds = compares.iter().all(|c| {
            let current = inner.data.get(&c.key).map_or(0, |e| e.mod_revision);
            current == c.mod_revision
        });
        if !holds {
            return TxnOutcome {
                succeeded: false,
                revision: inner.revision,
            };
        }
        // A put naming a lease that is gone fails the way etcd's does: the
        // whole transaction is refused.
        let lease_ok = ops.iter().all(|op| match op {
            Op::Put { lease: Some(l), .. } => inner.leases.contains_key(l),
            _ => true,
        });
        if !lease_ok {
            return TxnOutcome {
                succeeded: false,
                revision: inner.revision,
            };
        }
        let mut events = Vec::new();
        let revision = inner.revision + 1;
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    inner.data.insert(
                        key.clone(),
                        Entry {
                            value: value.clone(),
                            mod_revision: revision,
                            lease,
                        },
                    );
                    events.push(WatchEvent::Put(KeyValue {
                        key,
                        value,
                        mod_revision: revision,
                    }));
                }
                Op::Delete { key } => {
                    if inner.data.remove(&key).is_some() {
                        events.push(WatchEvent::Delete {
                            key,
                            mod_revision: revision,
                        });
                    }
                }
            }
        }
        // etcd bumps the revision only for a transaction that changed
        // something.
        if !events.is_empty() {
            inner.revision = revision;
            inner.publish(revision, events);
        }
        TxnOutcome {
            succeeded: true,
            revision: inner.revision,
        }
    }

    pub fn grant_lease(&self, ttl: Duration) -> LeaseId {
        let mut inner = self.lock();
        inner.next_lease += 1;
        let id = inner.next_lease;
        inner.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
            },
        );
        id
    }

    pub fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut inner = self.lock();
        match inner.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + l.ttl;
                Ok(())
            }
            None => Err(StoreError::LeaseGone(lease)),
        }
    }

    pub fn revoke_lease(&self, lease: LeaseId) {
        let mut inner = self.lock();
        inner.drop_lease(lease);
    }

    pub fn watch(&self, prefix: &str, start_revision: i64) -> mpsc::Receiver<Result<WatchMessage>> {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let mut inner = self.lock();
        if start_revision <= inner.compacted {
            let _ = tx.try_send(Ok(WatchMessage::Compacted {
                compact_revision: inner.compacted + 1,
            }));
            return rx;
        }
        // Replay the retained history from the start revision, one message
        // per revision, then follow live changes.
        let mut batch: Option<(i64, Vec<WatchEvent>)> = None;
        let mut replay = Vec::new();
        for (rev, ev) in inner.history.iter().filter(|(r, _)| *r >= start_revision) {
            if !event_key(ev).starts_with(prefix) {
                continue;
            }
            match &mut batch {
                Some((r, evs)) if r == rev => evs.push(ev.clone()),
                _ => {
                    if let Some((r, evs)) = batch.take() {
                        replay.push(WatchMessage::Events {
                            revision: r,
                            events: evs,
                        });
                    }
                    batch = Some((*rev, vec![ev.clone()]));
                }
            }
        }
        if let Some((r, evs)) = batch {
            replay.push(WatchMessage::Events {
                revision: r,
                events: evs,
            });
        }
        for m in replay {
            if tx.try_send(Ok(m)).is_err() {
                // Too far behind to replay: the watcher relists.
                return rx;
            }
        }
        inner.watchers.push(Watcher {
            prefix: prefix.to_string(),
            tx,
        });
        rx
    }

    pub fn compact(&self, revision: i64) {
        let mut inner = self.lock();
        let revision = revision.min(inner.revision);
        inner.compacted = inner.compacted.max(revision);
        while inner.history.front().is_some_and(|(r, _)| *r <= revision) {
            inner.history.pop_front();
        }
        // Live watchers have received every event as it happened, so only a
        // watch that starts at or before `compacted` is affected.
        inner.watchers.retain(|w| !w.tx.is_closed());
    }
}

fn event_key(ev: &WatchEvent) -> &str {
    match ev {
        WatchEvent::Put(kv) => &kv.key,
        WatchEvent::Delete { key, .. } => key,
    }
}

impl Inner {
    fn publish(&mut self, revision: i64, events: Vec<WatchEvent>) {
        for ev in &events {
            self.history.push_back((revision, ev.clone()));
        }
        while self.history.len() > HISTORY {
            if let Some((r, _)) = self.history.pop_front() {
                // Part of revision r may be gone: treat all of it as compacted.
                self.compacted = self.compacted.max(r);
            }
        }
        self.watchers.retain(|w| {
            let mine: Vec<WatchEvent> = events
                .iter()
                .filter(|e| event_key(e).starts_with(&w.prefix))
                .cloned()
                .collect();
            if mine.is_empty() {
                return !w.tx.is_closed();
            }
            // A watcher that cannot keep up is dropped; its owner sees the
            // watch end and relists, as with a slow etcd watcher.
            w.tx.try_send(Ok(WatchMessage::Events {
                revision,
                events: mine,
            }))
            .is_ok()
        });
    }

    fn expire_leases(&mut self) {
        let now = Instant::now();
        let expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.drop_lease(id);
        }
    }

    fn drop_lease(&mut self, lease: LeaseId) {
        if self.leases.remove(&lease).is_none() {
            return;
        }
        let keys: Vec<String> = self
            .data
            .iter()
            .filter(|(_, e)| e.lease == Some(lease))
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            return;
        }
        let revision = self.revision + 1;
        self.revision = revision;
        let events = keys
            .into_iter()
            .map(|key| {
                self.data.remove(&key);
                WatchEvent::Delete {
                    key,
                    mod_revision: revision,
                }
            })
            .collect();
        self.publish(revision, events);
    }
}

/// Expires leases on time even when nobody touches the store, so that
/// watchers see the deletes. Runs until the store is dropped.
pub(super) fn spawn_lease_sweeper(store: &MemoryStore) {
    let weak = Arc::downgrade(&store.inner);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let Some(inner) = weak.upgrade() else { return };
            inner
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .expire_leases();
        }
    });
}
