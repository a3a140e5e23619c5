//! The store contract, checked on the memory store here and on a real etcd
//! by the end-to-end suite (`tests/tests/store_etcd.rs`).

use std::time::Duration;

use super::*;

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.into(),
        value: value.into(),
        lease: None,
    }
}

#[tokio::test]
async fn txn_applies_only_when_every_compare_holds() {
    let store = Store::memory();
    let created = store
        .txn(
            vec![Compare {
                key: "a".into(),
                mod_revision: 0,
            }],
            vec![put("a", "1")],
        )
        .await
        .unwrap();
    assert!(created.succeeded);
    // Creating again with "must not exist" fails and changes nothing.
    let again = store
        .txn(
            vec![Compare {
                key: "a".into(),
                mod_revision: 0,
            }],
            vec![put("a", "2")],
        )
        .await
        .unwrap();
    assert!(!again.succeeded);
    let kv = store.get("a").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (&b"1"[..], created.revision)
    );
    // A stale revision fails; the current one succeeds.
    let stale = store
        .txn(
            vec![Compare {
                key: "a".into(),
                mod_revision: created.revision - 1,
            }],
            vec![put("a", "3")],
        )
        .await
        .unwrap();
    assert!(!stale.succeeded);
    let ok = store
        .txn(
            vec![Compare {
                key: "a".into(),
                mod_revision: created.revision,
            }],
            vec![put("a", "3")],
        )
        .await
        .unwrap();
    assert!(ok.succeeded && ok.revision == created.revision + 1);
}

#[tokio::test]
async fn watch_replays_from_a_past_revision_and_reports_compaction() {
    let store = Store::memory();
    let r1 = store
        .txn(vec![], vec![put("p/a", "1")])
        .await
        .unwrap()
        .revision;
    store.txn(vec![], vec![put("q/x", "1")]).await.unwrap();
    let r3 = store
        .txn(vec![], vec![Op::Delete { key: "p/a".into() }])
        .await
        .unwrap()
        .revision;

    let mut rx = store.watch("p/", r1).await.unwrap();
    let first = rx.recv().await.unwrap().unwrap();
    assert!(
        matches!(&first, WatchMessage::Events { revision, events } if *revision == r1 && matches!(&events[0], WatchEvent::Put(kv) if kv.key == "p/a"))
    );
    let second = rx.recv().await.unwrap().unwrap();
    assert!(
        matches!(&second, WatchMessage::Events { revision, events } if *revision == r3 && matches!(&events[0], WatchEvent::Delete { key, .. } if key == "p/a"))
    );

    store.compact(r3).await.unwrap();
    let mut rx = store.watch("p/", r1).await.unwrap();
    assert!(matches!(
        rx.recv().await.unwrap().unwrap(),
        WatchMessage::Compacted { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_deletes_its_keys_and_watchers_see_it() {
    let store = Store::memory();
    let lease = store.grant_lease(Duration::from_secs(2)).await.unwrap();
    let (_, rev) = store.list("").await.unwrap();
    store
        .txn(
            vec![],
            vec![Op::Put {
                key: "agents/x".into(),
                value: b"v".to_vec(),
                lease: Some(lease),
            }],
        )
        .await
        .unwrap();
    let mut rx = store.watch("agents/", rev + 1).await.unwrap();
    assert!(matches!(
        rx.recv().await.unwrap().unwrap(),
        WatchMessage::Events { .. }
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    store.keep_alive(lease).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        store.get("agents/x").await.unwrap().is_some(),
        "a renewed lease keeps its keys"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let msg = rx.recv().await.unwrap().unwrap();
    assert!(
        matches!(msg, WatchMessage::Events { events, .. } if matches!(&events[0], WatchEvent::Delete { key, .. } if key == "agents/x"))
    );
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseGone(_))
    ));
    // A put on a gone lease is refused as a failed guard.
    let out = store
        .txn(
            vec![],
            vec![Op::Put {
                key: "agents/y".into(),
                value: vec![],
                lease: Some(lease),
            }],
        )
        .await
        .unwrap();
    assert!(!out.succeeded);
}
