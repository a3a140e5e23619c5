//! The store contract on a real etcd (the memory store runs the same checks
//! in its unit tests).

use std::time::Duration;

use spillway_control_plane::store::{EtcdOptions, Store, contract};
use spillway_tests::Etcd;

async fn store(etcd: &Etcd) -> Store {
    Store::etcd(EtcdOptions {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: "/contract/".into(),
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        tls: None,
    })
    .await
    .expect("connecting to etcd")
}

#[tokio::test]
async fn etcd_txn_applies_only_when_every_compare_holds() {
    let etcd = Etcd::start().await;
    contract::txn_applies_only_when_every_compare_holds(&store(&etcd).await).await;
}

#[tokio::test]
async fn etcd_watch_replays_and_reports_compaction() {
    let etcd = Etcd::start().await;
    contract::watch_replays_and_reports_compaction(&store(&etcd).await).await;
}

#[tokio::test]
async fn etcd_leases_expire_with_their_keys() {
    let etcd = Etcd::start().await;
    contract::leases_expire_with_their_keys(&store(&etcd).await).await;
}

#[tokio::test]
async fn etcd_lists_large_prefixes_whole() {
    let etcd = Etcd::start().await;
    contract::lists_large_prefixes_whole(&store(&etcd).await).await;
}
