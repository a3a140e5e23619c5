//! The store: where the control plane keeps its objects, one key per object
//! under a prefix (default `/spillway/v1/`).
//!
//! Architecture invariant: only this module knows etcd. Everything above it
//! speaks in relative keys, conditional transactions, leases and watches,
//! which both implementations provide with the same meaning: etcd for
//! production, and an in-memory store for the demo and single-node trials.

pub mod contract;
mod etcd;
mod memory;

use std::time::Duration;

use tokio::sync::mpsc;

pub use etcd::{EtcdOptions, EtcdStore};
pub use memory::MemoryStore;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/spillway/v1/";

pub type LeaseId = i64;

/// One stored key, relative to the store's prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the last write to this key.
    pub mod_revision: i64,
}

/// A transaction guard: `key` was last written at `mod_revision`, or does
/// not exist when `mod_revision` is 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub mod_revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether every compare held and the operations were applied.
    pub succeeded: bool,
    /// The store revision after the transaction (unchanged when it failed).
    pub revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String, mod_revision: i64 },
}

/// What a watch delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// Changes, all of them at `revision` or before.
    Events {
        revision: i64,
        events: Vec<WatchEvent>,
    },
    /// The start revision was compacted away: list again and watch from the
    /// list revision + 1. The watch ends after this message.
    Compacted { compact_revision: i64 },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("lease {0} is gone (expired or revoked)")]
    LeaseGone(LeaseId),
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The store the control plane runs on.
#[derive(Clone)]
pub enum Store {
    // Boxed: the etcd client is large and stores are cloned per stream.
    Etcd(Box<EtcdStore>),
    Memory(MemoryStore),
}

impl Store {
    /// An embedded in-memory store. Must be called inside a tokio runtime:
    /// it starts the task that expires leases.
    pub fn memory() -> Store {
        let store = MemoryStore::new();
        memory::spawn_lease_sweeper(&store);
        Store::Memory(store)
    }

    pub async fn etcd(opts: EtcdOptions) -> Result<Store> {
        Ok(Store::Etcd(Box::new(EtcdStore::connect(opts).await?)))
    }

    pub fn describe(&self) -> String {
        match self {
            Store::Etcd(s) => format!("etcd {}", s.endpoints().join(",")),
            Store::Memory(_) => "embedded in-memory store".to_string(),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        match self {
            Store::Etcd(s) => s.get(key).await,
            Store::Memory(s) => Ok(s.get(key)),
        }
    }

    /// Every key under `prefix` (relative), sorted, with the store revision
    /// the list was taken at.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        match self {
            Store::Etcd(s) => s.list(prefix).await,
            Store::Memory(s) => Ok(s.list(prefix)),
        }
    }

    /// Applies `ops` atomically if every compare holds.
    pub async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome> {
        match self {
            Store::Etcd(s) => s.txn(compares, ops).await,
            Store::Memory(s) => Ok(s.txn(&compares, ops)),
        }
    }

    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        match self {
            Store::Etcd(s) => s.grant_lease(ttl).await,
            Store::Memory(s) => Ok(s.grant_lease(ttl)),
        }
    }

    /// Renews a lease once; [`StoreError::LeaseGone`] when it has expired.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        match self {
            Store::Etcd(s) => s.keep_alive(lease).await,
            Store::Memory(s) => s.keep_alive(lease),
        }
    }

    pub async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        match self {
            Store::Etcd(s) => s.revoke_lease(lease).await,
            Store::Memory(s) => {
                s.revoke_lease(lease);
                Ok(())
            }
        }
    }

    /// Watches every key under `prefix` from `start_revision` on.
    pub async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<mpsc::Receiver<Result<WatchMessage>>> {
        match self {
            Store::Etcd(s) => s.watch(prefix, start_revision).await,
            Store::Memory(s) => Ok(s.watch(prefix, start_revision)),
        }
    }

    /// Discards history before `revision` (what etcd's compaction does).
    pub async fn compact(&self, revision: i64) -> Result<()> {
        match self {
            Store::Etcd(s) => s.compact(revision).await,
            Store::Memory(s) => {
                s.compact(revision);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests;
