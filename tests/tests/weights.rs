//! Health-driven weights end to end: agents report load, the leader turns it
//! into effective weights, and the source region's agents receive them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use spillway_agent::control::snapshot::AgentConfig;
use spillway_tests::ControlPlane;
use spillway_tests::cluster::{Cluster, ClusterSpec, Http, US, chat};
use spillway_tests::sim::SimConfig;

/// The effective share of `region` in the agent's table for `profile`:
/// its weight among the first priority level, 0 if it is not in it.
fn share(c: &AgentConfig, profile: &str, region: &str) -> f64 {
    // A config without the profile (one sent before it reached the replica)
    // gives nobody a share.
    let Some(t) = c.routes.get(profile) else {
        return 0.0;
    };
    let first = t.destinations.iter().map(|d| d.priority).min().unwrap_or(0);
    let level: Vec<_> = t
        .destinations
        .iter()
        .filter(|d| d.priority == first)
        .collect();
    let total: f64 = level.iter().map(|d| d.weight).sum();
    level
        .iter()
        .find(|d| d.region == region)
        .map_or(0.0, |d| d.weight / total)
}

/// `n` callers posting to `addr` back to back until `stop` is set. The load
/// must outlast whatever the test waits for (a relayed call takes a few
/// milliseconds, so a budget in calls alone can run out first), so each one
/// stops by itself only after 60 s or 50,000 calls. Each returns how many of
/// its calls failed.
fn callers(
    n: usize,
    addr: std::net::SocketAddr,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<usize>> {
    let http = Http::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    (0..n)
        .map(|_| {
            let (http, stop) = (http.clone(), stop.clone());
            tokio::spawn(async move {
                let mut failed = 0;
                for _ in 0..50_000 {
                    if stop.load(Ordering::Relaxed) || tokio::time::Instant::now() > deadline {
                        break;
                    }
                    let a = http
                        .post(addr, "/v1/chat/completions", chat(US, false))
                        .await;
                    if a.status != 200 && failed < 3 {
                        eprintln!("FAILED CALL {} {:?} {}", a.status, a.headers, a.text());
                    }
                    failed += usize::from(a.status != 200);
                }
                failed
            })
        })
        .collect()
}

/// The replica's `spillway_cp_effective_weight` series, by their labels
/// (`profile,source_region,inference_region`, comma-separated values; the
/// `reason` label is left out).
async fn effective_weights(http: &Http, metrics: SocketAddr) -> BTreeMap<String, f64> {
    let answer = http.get(metrics, "/metrics").await;
    assert_eq!(answer.status, 200);
    answer
        .text()
        .lines()
        .filter_map(|l| {
            let (labels, value) = l
                .strip_prefix("spillway_cp_effective_weight{")?
                .split_once("} ")?;
            let values: Vec<&str> = labels
                .split(',')
                .filter(|kv| !kv.starts_with("reason="))
                .map(|kv| kv.split_once('=').map_or("", |(_, v)| v.trim_matches('"')))
                .collect();
            Some((values.join(","), value.parse().ok()?))
        })
        .collect()
}

/// The replica's effective weights once `check` holds for them (bounded:
/// 10 s, for the leader's next update and the scrape).
async fn effective_weights_when(
    http: &Http,
    metrics: SocketAddr,
    what: &str,
    check: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let weights = effective_weights(http, metrics).await;
        if check(&weights) {
            return weights;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replica's metrics never showed {what}: {weights:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn fast_weights() -> ClusterSpec {
    // Weights every 250 ms; agents report every 250 ms (the harness).
    ClusterSpec {
        cp_args: vec!["--weights-interval-ms", "250"],
        ..ClusterSpec::default()
    }
}

#[tokio::test]
async fn a_saturated_source_spills_by_weight_and_takes_it_back_when_load_falls() {
    let mut spec = fast_weights();
    spec.sim.insert(
        "us-east",
        SimConfig {
            ttft: Duration::from_millis(400),
            max_concurrent: 2,
            ..SimConfig::default()
        },
    );
    let cluster = Cluster::start(spec).await;
    let east = &cluster.region("us-east").agent;
    let idle = east
        .wait_for("source-first weights", |c| share(c, US, "us-east") == 1.0)
        .await;
    assert_eq!(share(&idle, US, "us-west"), 0.0);

    // More callers than us-east's 4 slots, back to back, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let callers = callers(8, east.http, &stop);
    let spilled = east
        .wait_for("us-west to get a share while us-east is saturated", |c| {
            share(c, US, "us-west") > 0.0
        })
        .await;
    assert!(share(&spilled, US, "us-east") < 1.0);
    // spillctl explains the weights with their reasons and load figures
    // (once us-east's first slow calls have ended and been reported, its
    // time to first token is known).
    let explain = || async {
        let out = tokio::process::Command::new(spillway_tests::bin("spillctl"))
            .args([
                "--control-plane",
                &cluster.cp.url(),
                "routes",
                "explain",
                US,
                "--source",
                "us-east",
                "-o",
                "json",
            ])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let mut explained = explain().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline
        && explained["destinations"][0]["ttft_ms"].as_f64() == Some(0.0)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        explained = explain().await;
    }
    let dest = |r: &str| {
        explained["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["region"] == r)
            .cloned()
            .unwrap()
    };
    assert_eq!(explained["leader"], "cp");
    assert_eq!(dest("us-east")["reason"], "headroom", "{explained}");
    assert_eq!(dest("us-west")["reason"], "spill", "{explained}");
    assert_eq!(dest("us-east")["capacity"], 4.0, "{explained}");
    assert_eq!(dest("us-east")["reporting"], true);
    assert!(
        dest("us-east")["ttft_ms"].as_f64().unwrap() > 0.0,
        "{explained}"
    );
    assert!(
        dest("us-west")["output_tokens_per_second"]
            .as_f64()
            .unwrap()
            >= 0.0,
        "{explained}"
    );
    let table = tokio::process::Command::new(spillway_tests::bin("spillctl"))
        .args([
            "--control-plane",
            &cluster.cp.url(),
            "routes",
            "explain",
            US,
            "--source",
            "us-east",
        ])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.contains("REASON") && table.contains("in flight"),
        "{table}"
    );
    stop.store(true, Ordering::Relaxed);
    let mut failed = 0;
    for c in callers {
        failed += c.await.unwrap();
    }
    assert_eq!(failed, 0, "no call failed while spilling");
    // With the load gone, us-east takes it all back.
    east.wait_for("us-east to take its share back", |c| {
        share(c, US, "us-east") == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_failing_region_is_drained_then_brought_back_step_by_step() {
    // Weights each second: the step on the way back lasts one update, and
    // the agent's config watch keeps only the newest config, so an update
    // must last longer than a busy machine's pause.
    let cluster = Cluster::start(ClusterSpec {
        cp_args: vec![
            "--weights-interval-ms",
            "1000",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        ..ClusterSpec::default()
    })
    .await;
    let metrics = cluster.cp.metrics_addr().await;
    // us-east's calls split evenly between us-east and us-west.
    cluster
        .set_route(US, "us-east", &[("us-east", 1.0), ("us-west", 1.0)])
        .await;
    let east = &cluster.region("us-east").agent;
    east.wait_for("an even split", |c| {
        (share(c, US, "us-west") - 0.5).abs() < 1e-9
    })
    .await;
    // The leader reports the weights it put in force, table by table.
    let (to_east, to_west) = (
        format!("{US},us-east,us-east"),
        format!("{US},us-east,us-west"),
    );
    let http = Http::default();
    let even = effective_weights_when(&http, metrics, "an even split", |w| {
        (w.get(&to_east), w.get(&to_west)) == (Some(&0.5), Some(&0.5))
    })
    .await;
    assert_eq!(
        even.get(&format!("{US},us-west,us-west")),
        Some(&1.0),
        "us-west's own table, by default its region first: {even:?}"
    );
    for sim in &cluster.region("us-west").sims {
        sim.state.down.store(true, Ordering::Relaxed);
    }
    // Traffic through us-west's own agent shows its failures in its reports.
    let west = cluster.region("us-west").agent.http;
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (http, stop) = (http.clone(), stop.clone());
        tokio::spawn(async move {
            for _ in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let _ = http
                    .post(west, "/v1/chat/completions", chat(US, false))
                    .await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    east.wait_for("us-west to be drained", |c| share(c, US, "us-west") == 0.0)
        .await;
    // Drained is weight 0 on the leader's metrics (what the alert
    // SpillwayRegionDrained reads), while the feeder keeps it failing.
    let drained = effective_weights_when(&http, metrics, "us-west drained", |w| {
        w.get(&to_west) == Some(&0.0)
    })
    .await;
    assert_eq!(drained.get(&to_east), Some(&1.0), "{drained:?}");
    // With the reason the alert tells a drained region by.
    let text = http.get(metrics, "/metrics").await.text();
    assert!(
        text.lines().any(|l| l.starts_with(&format!(
            "spillway_cp_effective_weight{{profile=\"{US}\",source_region=\"us-east\",inference_region=\"us-west\",reason=\"drained\"}} 0"
        ))),
        "{text}"
    );
    stop.store(true, Ordering::Relaxed);
    feeder.await.unwrap();
    for sim in &cluster.region("us-west").sims {
        sim.state.down.store(false, Ordering::Relaxed);
    }
    // It comes back, and not in one jump: a share between 0 and the full
    // half is seen on the way.
    let mut rx = east.config.clone();
    let mut seen_partial = false;
    let back = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let s = rx
                .borrow_and_update()
                .as_deref()
                .map_or(0.0, |c| share(c, US, "us-west"));
            if s > 0.0 && s < 0.5 - 1e-9 {
                seen_partial = true;
            }
            if (s - 0.5).abs() < 1e-9 {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await;
    assert!(back.is_ok(), "us-west never came back to its half");
    assert!(seen_partial, "us-west came back in one jump");
    effective_weights_when(&http, metrics, "us-west back to its half", |w| {
        w.get(&to_west) == Some(&0.5)
    })
    .await;
}

#[tokio::test]
async fn a_killed_leader_is_replaced_and_weights_keep_moving() {
    use spillway_proto::pb;
    use spillway_tests::{AgentOptions, Etcd, TestAgent, TestSim, model_server};

    let etcd = Etcd::start().await;
    let fast = [
        "--weights-interval-ms",
        "250",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let mut a = ControlPlane::start_with(Some(&etcd.endpoint), "cp-a", &fast).await;
    let mut b = ControlPlane::start_with(Some(&etcd.endpoint), "cp-b", &fast).await;
    let (a_metrics, b_metrics) = (a.metrics_addr().await, b.metrics_addr().await);
    let mut admin = b.admin().await;
    for (name, geo) in [("us-east", "us"), ("us-west", "us")] {
        b.create_region(name, geo).await;
    }
    let profile = pb::InferenceProfile {
        id: US.into(),
        destinations: vec!["us-east".into(), "us-west".into()],
        ..Default::default()
    };
    admin
        .create_profile(pb::CreateProfileRequest {
            profile: Some(profile),
        })
        .await
        .unwrap();
    let planes = [a.url(), b.url()];
    let slow = SimConfig {
        ttft: Duration::from_millis(400),
        max_concurrent: 2,
        ..SimConfig::default()
    };
    let east_sim = TestSim::start(slow).await;
    let west_sim = TestSim::start(SimConfig::default()).await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut east = AgentOptions::new("e", "us-east", &planes, d1.path());
    east.model_servers = vec![model_server(east_sim.addr, &["llama-3.1-8b"], 2)];
    let east = TestAgent::start_with(east).await;
    let mut west = AgentOptions::new("w", "us-west", &planes, d2.path());
    west.model_servers = vec![model_server(west_sim.addr, &["llama-3.1-8b"], 64)];
    let west = TestAgent::start_with(west).await;
    east.wait_for("source-first weights from the leader", |c| {
        c.routes
            .get(US)
            .is_some_and(|_| share(c, US, "us-east") == 1.0)
            && c.relays.contains_key("us-west")
    })
    .await;
    // us-west takes relayed calls only from agents it knows of.
    west.wait_for("us-east's agent", |c| {
        c.relays
            .get("us-east")
            .is_some_and(|agents| agents.iter().any(|a| a.agent_id == "e"))
    })
    .await;

    // Kill whichever replica leads.
    let leader = etcd
        .etcdctl(&["get", "/spillway/v1/leader", "--print-value-only"])
        .await;
    let (dead, survivor, leader_metrics, survivor_metrics) = if leader.trim() == "cp-a" {
        (&mut a, "cp-b", a_metrics, b_metrics)
    } else {
        (&mut b, "cp-a", b_metrics, a_metrics)
    };
    // Only the leader reports the weights in force.
    let (to_east, to_west) = (
        format!("{US},us-east,us-east"),
        format!("{US},us-east,us-west"),
    );
    let http = Http::default();
    effective_weights_when(&http, leader_metrics, "the leader's weights", |w| {
        w.get(&to_east) == Some(&1.0)
    })
    .await;
    let follower = effective_weights(&http, survivor_metrics).await;
    assert!(follower.is_empty(), "a follower reports {follower:?}");
    dead.kill().await;

    // Saturate us-east: only a live leader can move the weights.
    let stop = Arc::new(AtomicBool::new(false));
    let callers = callers(6, east.http, &stop);
    east.wait_for("the new leader to spill us-east's excess", |c| {
        share(c, US, "us-west") > 0.0
    })
    .await;
    effective_weights_when(&http, survivor_metrics, "the new leader's spill", |w| {
        w.get(&to_west).is_some_and(|v| *v > 0.0)
    })
    .await;
    // us-east's reports carry what it relayed to us-west.
    let mut relayed = false;
    for _ in 0..200 {
        let health = etcd
            .etcdctl(&["get", "/spillway/v1/health/us-east/e", "--print-value-only"])
            .await;
        let v: serde_json::Value = serde_json::from_str(health.trim()).unwrap_or_default();
        relayed = v["relays"].as_array().is_some_and(|r| {
            r.iter()
                .any(|x| x["region"] == "us-west" && x["calls"].as_u64() > Some(0))
        });
        if relayed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(relayed, "no load report showed calls relayed to us-west");
    stop.store(true, Ordering::Relaxed);
    let mut failed = 0;
    for c in callers {
        failed += c.await.unwrap();
    }
    assert_eq!(failed, 0, "no call failed while the leader changed");
    let leader = etcd
        .etcdctl(&["get", "/spillway/v1/leader", "--print-value-only"])
        .await;
    assert_eq!(leader.trim(), survivor);
}

/// `routes explain` for US from us-east, once the leader has computed
/// weights for its current table (bounded: 15 s).
async fn computed_weights(
    admin: &mut spillway_proto::pb::admin_service_client::AdminServiceClient<
        tonic::transport::Channel,
    >,
    what: &str,
) -> spillway_proto::pb::ExplainRouteResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let explained = admin
            .explain_route(spillway_proto::pb::ExplainRouteRequest {
                profile: US.into(),
                source_region: "us-east".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if !explained.leader.is_empty() {
            return explained;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never computed: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_operators_table_change_applies_at_once_over_older_weights() {
    let cluster = Cluster::start(fast_weights()).await;
    let east = &cluster.region("us-east").agent;
    // The leader has computed weights for the profile's own table (us-east
    // first, us-west behind it).
    let mut admin = cluster.cp.admin().await;
    computed_weights(&mut admin, "the leader's first weights").await;
    assert_eq!(share(&east.current().unwrap(), US, "us-east"), 1.0);
    // The operator puts us-west first. The weights of the older table are
    // stale: the agents get the new table as it stands at once, not the
    // old weights moved a step per update. Every config the agent takes
    // from now on is watched.
    let mut rx = east.config.clone();
    rx.borrow_and_update();
    let (done, mut until) = tokio::sync::oneshot::channel::<()>();
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            tokio::select! {
                _ = &mut until => return seen,
                changed = rx.changed() => {
                    if changed.is_err() {
                        return seen;
                    }
                    if let Some(c) = rx.borrow_and_update().clone() {
                        seen.push(c);
                    }
                }
            }
        }
    });
    cluster
        .set_route_with_priority(US, "us-east", &[("us-west", 1.0, 0), ("us-east", 1.0, 1)])
        .await;
    assert_eq!(share(&east.current().unwrap(), US, "us-west"), 1.0);
    // And the leader's next weights start from the new table.
    let explained = computed_weights(&mut admin, "weights for the new table").await;
    let west = explained
        .destinations
        .iter()
        .find(|d| d.region == "us-west")
        .unwrap();
    assert_eq!(west.weight, 1.0, "{explained:?}");
    // Let the leader's weights reach the agent, then look at every config
    // since the change: once the new table arrived, us-west kept it all.
    east.wait_for("the new weights", |c| share(c, US, "us-west") == 1.0)
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let _ = done.send(());
    let seen = seen.await.unwrap();
    let new_table = |c: &AgentConfig| {
        c.routes.get(US).is_some_and(|t| {
            t.destinations
                .first()
                .is_some_and(|d| d.region == "us-west")
        })
    };
    let since: Vec<_> = seen.iter().skip_while(|c| !new_table(c)).collect();
    assert!(!since.is_empty(), "the agent never took the new table");
    for c in since {
        assert_eq!(share(c, US, "us-west"), 1.0, "version {}", c.version);
    }
}
