//! The store contract, as executable checks that every implementation must
//! pass: the unit tests run them on the memory store, the end-to-end suite
//! on a real etcd (`tests/tests/store_etcd.rs`). Each panics with what broke.

use std::time::Duration;

use super::{Compare, Op, Store, StoreError, WatchEvent, WatchMessage};

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.into(),
        value: value.into(),
        lease: None,
    }
}

fn absent(key: &str) -> Compare {
    Compare {
        key: key.into(),
        mod_revision: 0,
    }
}

/// A transaction applies only when every compare holds; a failed one
/// changes nothing.
pub async fn txn_applies_only_when_every_compare_holds(store: &Store) {
    let created = store
        .txn(vec![absent("c/a")], vec![put("c/a", "1")])
        .await
        .unwrap();
    assert!(created.succeeded);
    let again = store
        .txn(vec![absent("c/a")], vec![put("c/a", "2")])
        .await
        .unwrap();
    assert!(!again.succeeded, "create-if-absent succeeded twice");
    let kv = store.get("c/a").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (&b"1"[..], created.revision)
    );
    let stale = Compare {
        key: "c/a".into(),
        mod_revision: created.revision - 1,
    };
    assert!(
        !store
            .txn(vec![stale], vec![put("c/a", "3")])
            .await
            .unwrap()
            .succeeded
    );
    let current = Compare {
        key: "c/a".into(),
        mod_revision: created.revision,
    };
    let ok = store
        .txn(vec![current], vec![put("c/a", "3"), put("c/b", "x")])
        .await
        .unwrap();
    assert!(ok.succeeded && ok.revision == created.revision + 1);
    let (kvs, rev) = store.list("c/").await.unwrap();
    assert_eq!(
        kvs.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
        ["c/a", "c/b"]
    );
    assert!(rev >= ok.revision);
}

/// A watch replays from a past revision, in order, only under its prefix;
/// one that starts before a compaction is told so.
pub async fn watch_replays_and_reports_compaction(store: &Store) {
    let r1 = store
        .txn(vec![], vec![put("w/a", "1")])
        .await
        .unwrap()
        .revision;
    store.txn(vec![], vec![put("other/x", "1")]).await.unwrap();
    let r3 = store
        .txn(vec![], vec![Op::Delete { key: "w/a".into() }])
        .await
        .unwrap()
        .revision;

    let mut rx = store.watch("w/", r1).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(Ok(WatchMessage::Events { events, .. }))) => seen.extend(events),
            other => panic!("expected watch events, got {other:?}"),
        }
    }
    assert!(
        matches!(&seen[0], WatchEvent::Put(kv) if kv.key == "w/a" && kv.mod_revision == r1),
        "{seen:?}"
    );
    assert!(
        matches!(&seen[1], WatchEvent::Delete { key, mod_revision } if key == "w/a" && *mod_revision == r3),
        "{seen:?}"
    );

    // Compact past r1 (a second write makes r3 lie strictly before the
    // compaction revision).
    let r4 = store
        .txn(vec![], vec![put("other/y", "1")])
        .await
        .unwrap()
        .revision;
    store.compact(r4).await.unwrap();
    let mut rx = store.watch("w/", r1).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
        Ok(Some(Ok(WatchMessage::Compacted { .. }))) => {}
        other => panic!("a watch before the compaction revision must report it, got {other:?}"),
    }
}

/// Keys under a lease live while it is renewed and go (with a delete event)
/// when it expires; a put on a gone lease fails as a failed guard.
pub async fn leases_expire_with_their_keys(store: &Store) {
    let lease = store.grant_lease(Duration::from_secs(2)).await.unwrap();
    let (_, rev) = store.list("l/").await.unwrap();
    let leased = Op::Put {
        key: "l/x".into(),
        value: b"v".to_vec(),
        lease: Some(lease),
    };
    assert!(store.txn(vec![], vec![leased]).await.unwrap().succeeded);
    let mut rx = store.watch("l/", rev + 1).await.unwrap();
    store.keep_alive(lease).await.unwrap();
    assert!(store.get("l/x").await.unwrap().is_some());
    // Stop renewing: within a few TTLs the key is deleted.
    let deleted = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(msg) = rx.recv().await {
            if let Ok(WatchMessage::Events { events, .. }) = msg
                && events
                    .iter()
                    .any(|e| matches!(e, WatchEvent::Delete { key, .. } if key == "l/x"))
            {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        deleted,
        Ok(true),
        "the leased key was not deleted when its lease expired"
    );
    let renewed = store.keep_alive(lease).await;
    assert!(
        matches!(renewed, Err(StoreError::LeaseGone(_))),
        "renewing an expired lease: {renewed:?}"
    );
    let late = Op::Put {
        key: "l/y".into(),
        value: vec![],
        lease: Some(lease),
    };
    assert!(!store.txn(vec![], vec![late]).await.unwrap().succeeded);
}

/// A prefix larger than one page lists whole and sorted, and only that
/// prefix.
pub async fn lists_large_prefixes_whole(store: &Store) {
    let ops: Vec<Op> = (0..1200)
        .map(|i| put(&format!("big/{i:05}"), "v"))
        .collect();
    for chunk in ops.chunks(100) {
        assert!(store.txn(vec![], chunk.to_vec()).await.unwrap().succeeded);
    }
    store
        .txn(vec![], vec![put("bigger", "not under big/")])
        .await
        .unwrap();
    let (kvs, _) = store.list("big/").await.unwrap();
    assert_eq!(kvs.len(), 1200);
    assert!(
        kvs.windows(2).all(|w| w[0].key < w[1].key),
        "listed out of order"
    );
    assert_eq!(kvs[1199].key, "big/01199");
}
