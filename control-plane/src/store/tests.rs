//! The store contract (see `contract.rs`) on the memory store.

use super::{Store, contract};

#[tokio::test]
async fn txn_applies_only_when_every_compare_holds() {
    contract::txn_applies_only_when_every_compare_holds(&Store::memory()).await;
}

#[tokio::test]
async fn watch_replays_and_reports_compaction() {
    contract::watch_replays_and_reports_compaction(&Store::memory()).await;
}

#[tokio::test(start_paused = true)]
async fn leases_expire_with_their_keys() {
    contract::leases_expire_with_their_keys(&Store::memory()).await;
}

#[tokio::test]
async fn lists_large_prefixes_whole() {
    contract::lists_large_prefixes_whole(&Store::memory()).await;
}
