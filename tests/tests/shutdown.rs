//! Graceful shutdown end to end, with a real etcd and real control-plane
//! processes: a replica stopped with SIGTERM resigns its leadership, so its
//! successor leads within a second rather than after the lease TTL, and
//! exits 0; an agent that stops says goodbye, and the other regions' agents
//! stop relaying to it at once, while its region's other agents stay.

use std::net::SocketAddr;
use std::time::Duration;

use spillway_proto::pb;
use spillway_tests::cluster::Http;
use spillway_tests::{ControlPlane, Etcd, TestAgent, wait_until};

const MODEL: &str = "llama-3.1-8b";

/// The bound: a successor leads within this long of the SIGTERM.
const HANDOVER: Duration = Duration::from_secs(1);

/// `spillway_cp_leader` as the replica reports it.
async fn leads(http: &Http, metrics: SocketAddr) -> bool {
    let answer = http.get(metrics, "/metrics").await;
    assert_eq!(answer.status, 200);
    String::from_utf8_lossy(&answer.body)
        .lines()
        .any(|l| l.trim() == "spillway_cp_leader 1")
}

#[tokio::test]
async fn a_terminated_leader_hands_over_within_a_second_and_exits_cleanly() {
    let etcd = Etcd::start().await;
    // Weights every 10 s: a follower that only campaigned at its tick could
    // take up to that long, so a handover within a second shows that it
    // campaigns when the key goes, and that the leader gave it up.
    let flags = [
        "--weights-interval-ms",
        "10000",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let mut a = ControlPlane::start_with(Some(&etcd.endpoint), "cp-a", &flags).await;
    let a_metrics = a.metrics_addr().await;
    let http = Http::default();
    wait_until("cp-a to lead", Duration::from_secs(10), || {
        leads(&http, a_metrics)
    })
    .await;
    let b = ControlPlane::start_with(Some(&etcd.endpoint), "cp-b", &flags).await;
    let b_metrics = b.metrics_addr().await;
    // cp-b campaigned at its first tick, at start, and lost.
    assert!(!leads(&http, b_metrics).await, "cp-b leads beside cp-a");
    // An agent on cp-a: its stream drains while the leadership moves.
    b.create_region("us-east", "us").await;
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start("e1", "us-east", &[a.url(), b.url()], dir.path(), &[MODEL]).await;
    agent.wait_for("a config", |c| c.version > 0).await;

    let signalled = tokio::time::Instant::now();
    a.terminate().await;
    let deadline = signalled + Duration::from_secs(10);
    while !leads(&http, b_metrics).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "cp-b did not lead within 10 s of cp-a's SIGTERM; cp-a's log:\n{}\ncp-b's log:\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let handover = signalled.elapsed();
    assert!(
        handover < HANDOVER,
        "cp-b led {handover:?} after cp-a's SIGTERM (bound {HANDOVER:?}); cp-a's log:\n{}",
        a.log()
    );
    let leader = etcd
        .etcdctl(&["get", "/spillway/v1/leader", "--print-value-only"])
        .await;
    assert_eq!(leader.trim(), "cp-b");

    let status = a.exited(Duration::from_secs(5)).await;
    let stopped = signalled.elapsed();
    assert!(
        status.success(),
        "cp-a exited with {status}; log:\n{}",
        a.log()
    );
    assert!(
        a.log().contains("resigned the leadership"),
        "cp-a's log:\n{}",
        a.log()
    );
    eprintln!("handover {handover:?}, cp-a exited 0 after {stopped:?}");
    // The agent moved to cp-b.
    wait_until(
        "e1 to be listed by cp-b",
        Duration::from_secs(10),
        || async {
            let mut admin = b.admin().await;
            admin
                .list_agents(pb::ListAgentsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .agents
                .iter()
                .any(|s| s.agent_id == "e1" && s.control_plane == "cp-b")
        },
    )
    .await;
}

/// The ids of `region`'s agents that `agent` may relay to.
fn relays(agent: &TestAgent, region: &str) -> Vec<String> {
    agent.current().map_or_else(Vec::new, |c| {
        c.relays
            .get(region)
            .map(|r| r.iter().map(|e| e.agent_id.clone()).collect())
            .unwrap_or_default()
    })
}

#[tokio::test]
async fn an_agent_that_stops_says_goodbye_and_other_regions_drop_it_at_once() {
    let etcd = Etcd::start().await;
    let cp = ControlPlane::start(Some(&etcd.endpoint), "cp").await;
    cp.create_region("us-east", "us").await;
    cp.create_region("us-west", "us").await;
    cp.admin()
        .await
        .create_profile(pb::CreateProfileRequest {
            profile: Some(pb::InferenceProfile {
                id: format!("us.{MODEL}"),
                destinations: vec!["us-east".into(), "us-west".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let planes = [cp.url()];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a1 = TestAgent::start("a1", "us-east", &planes, dirs[0].path(), &[MODEL]).await;
    let b1 = TestAgent::start("b1", "us-west", &planes, dirs[1].path(), &[MODEL]).await;
    let b2 = TestAgent::start("b2", "us-west", &planes, dirs[2].path(), &[MODEL]).await;
    a1.wait_for("relays to b1 and b2", |c| {
        c.relays.get("us-west").is_some_and(|r| r.len() == 2)
    })
    .await;

    // The harness's replica lease is 3 s and a region counts as silent
    // after 3 s without reports: dropping b1 within 1 s is the goodbye,
    // not a timeout.
    let bound = Duration::from_secs(1);
    let stopped = tokio::time::Instant::now();
    b1.stop();
    let mut rx = a1.config.clone();
    let dropped = tokio::time::timeout(
        bound,
        rx.wait_for(|c| {
            c.as_ref()
                .and_then(|c| c.relays.get("us-west"))
                .is_some_and(|r| r.iter().all(|e| e.agent_id != "b1"))
        }),
    )
    .await;
    assert!(
        matches!(dropped, Ok(Ok(_))),
        "a1 still relays to b1 {bound:?} after b1 stopped: {:?}; control plane's log:\n{}",
        relays(&a1, "us-west"),
        cp.log()
    );
    let took = stopped.elapsed();
    assert_eq!(relays(&a1, "us-west"), ["b2"], "b2 stays");
    let log = cp.log();
    assert!(
        log.lines()
            .any(|l| l.contains("us-west/b1") && l.contains("the agent said goodbye")),
        "the control plane did not log b1's goodbye:\n{log}"
    );
    // The goodbye was the sync's last act: its config watch closed, and
    // the agent keeps the config it serves its last calls with.
    let mut watch = b1.config.clone();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while watch.changed().await.is_ok() {}
    })
    .await;
    assert!(closed.is_ok(), "b1's config stream did not stop");
    assert!(
        b1.current()
            .is_some_and(|c| c.relays.contains_key("us-east"))
    );
    // b2 and a1 are still there, and still connected.
    let listed: Vec<String> = cp
        .admin()
        .await
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents
        .into_iter()
        .map(|a| a.agent_id)
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.contains(&"a1".to_string()) && listed.contains(&"b2".to_string()));
    assert_eq!(relays(&b2, "us-east"), ["a1"]);
    eprintln!("a1 dropped b1 {took:?} after b1 stopped");
}
