//! A destination whose agent hangs costs no client-visible failure. The
//! agent is stopped with SIGSTOP, which is how a black-holed network looks
//! from outside: its kernel still accepts TCP connections, but nothing
//! answers, and nothing closes. Relayed calls fail over before their first
//! byte (the destination's acknowledgment is due within the attempt
//! deadline, and the relay channel's pings go unanswered), the region is
//! ejected by the source agent, and the control plane drains it once its
//! load reports stop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use spillway_proto::pb;
use spillway_tests::cluster::{Http, chat};
use spillway_tests::sim::SimConfig;
use spillway_tests::{AgentProcess, ControlPlane, TestSim, wait_until};
use tokio::time::Instant;

const PROFILE: &str = "us.llama-3.1-8b";
const MODEL: &str = "llama-3.1-8b";

/// The source agent's deadlines, as flags: the destination must take a
/// call within the attempt deadline, and a relay channel whose peer stays
/// silent for the keep-alive interval is pinged and given up when the ping
/// goes unanswered for the keep-alive timeout.
const ATTEMPT_MS: u64 = 2000;
const KEEPALIVE_INTERVAL_MS: u64 = 1000;
const KEEPALIVE_TIMEOUT_MS: u64 = 2000;

/// Every call ends within this: the longer of the two ways a hung peer is
/// noticed (3 s here), plus a margin of 3 s for the retry in the healthy
/// region and a busy machine. Without the deadlines, calls waited for the
/// 60 s upstream timeout.
fn call_bound() -> Duration {
    Duration::from_millis(ATTEMPT_MS.max(KEEPALIVE_INTERVAL_MS + KEEPALIVE_TIMEOUT_MS) + 3000)
}

/// The control plane's defaults: a region whose agents sent no load report
/// for 3 s is drained at the leader's next weights update (every 500 ms).
/// The bound leaves 4.5 s for a busy machine.
const DRAIN_BOUND: Duration = Duration::from_secs(8);

/// SIGSTOPs a process and SIGCONTs it when dropped, so that a failing test
/// never leaves it frozen (its `kill_on_drop` then ends it).
struct Stopped {
    pid: u32,
}

fn signal(pid: u32, sig: &str) -> bool {
    std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

impl Stopped {
    fn stop(pid: u32) -> Stopped {
        assert!(signal(pid, "-STOP"), "could not SIGSTOP {pid}");
        Stopped { pid }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.pid, "-CONT");
    }
}

/// One call as the client saw it.
#[derive(Debug)]
struct Call {
    started: Instant,
    took: Duration,
    status: u16,
    region: String,
}

/// The destination's weight in the source region's table as the control
/// plane explains it: (weight, reason, reporting).
async fn explained(cp: &ControlPlane, region: &str) -> Option<(f64, String, bool)> {
    let answer = cp
        .admin()
        .await
        .explain_route(pb::ExplainRouteRequest {
            profile: PROFILE.into(),
            source_region: "us-east".into(),
        })
        .await
        .ok()?
        .into_inner();
    answer
        .destinations
        .into_iter()
        .find(|d| d.region == region)
        .map(|d| (d.weight, d.reason, d.reporting))
}

fn server_flag(sim: &TestSim) -> String {
    format!(
        "http://{},models={MODEL},capacity=64,static,metrics=none",
        sim.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_destination_fails_over_within_the_deadline_and_is_drained() {
    spillway_tests::init_logging();
    let cp = ControlPlane::start(None, "cp").await;
    for region in ["us-east", "us-west", "us-central"] {
        cp.create_region(region, "us").await;
    }
    // us-east serves nothing itself: every call is relayed, split between
    // us-west and us-central.
    cp.admin()
        .await
        .create_profile(pb::CreateProfileRequest {
            profile: Some(pb::InferenceProfile {
                id: PROFILE.into(),
                destinations: vec!["us-west".into(), "us-central".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let sim = SimConfig {
        ttft: Duration::from_millis(150),
        ..SimConfig::default()
    };
    let west_sim = TestSim::start(sim.clone()).await;
    let central_sim = TestSim::start(sim).await;
    let planes = vec![cp.url()];
    let _west = AgentProcess::start("west-0", "us-west", &planes, &[server_flag(&west_sim)]).await;
    let central = AgentProcess::start(
        "central-0",
        "us-central",
        &planes,
        &[server_flag(&central_sim)],
    )
    .await;
    let (attempt, interval, timeout) = (
        ATTEMPT_MS.to_string(),
        KEEPALIVE_INTERVAL_MS.to_string(),
        KEEPALIVE_TIMEOUT_MS.to_string(),
    );
    let east = AgentProcess::start_with(
        "east-0",
        "us-east",
        &planes,
        &[],
        &[
            "--allow-anonymous",
            "--attempt-timeout-ms",
            &attempt,
            "--keepalive-interval-ms",
            &interval,
            "--keepalive-timeout-ms",
            &timeout,
        ],
    )
    .await;
    let door = east.http;
    let http = Http::default();

    // Both destinations serve us-east's calls, and the control plane has
    // load reports from both (a region that never reported is not drained
    // for its silence).
    let mut seen = std::collections::BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(30);
    for _ in 0..1000 {
        if seen.len() == 2 || Instant::now() > until {
            break;
        }
        let a = http
            .post(door, "/v1/chat/completions", chat(PROFILE, false))
            .await;
        if a.status == 200 {
            seen.insert(a.region().unwrap_or_default().to_string());
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "calls served in both us-west and us-central: {seen:?}"
    );
    wait_until(
        "both destinations reporting, with weight",
        Duration::from_secs(20),
        || async {
            let west = explained(&cp, "us-west").await;
            let central = explained(&cp, "us-central").await;
            [west, central].iter().all(|d| {
                d.as_ref()
                    .is_some_and(|(w, _, reporting)| *w > 0.0 && *reporting)
            })
        },
    )
    .await;

    // Callers, back to back, until told to stop; each stops by itself after
    // 90 s or 2,000 calls, and no call is waited on past 30 s.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(90);
    let callers: Vec<_> = (0..6)
        .map(|_| {
            let (http, stop, done) = (http.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let mut calls = Vec::new();
                for _ in 0..2000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    let started = Instant::now();
                    let answer = tokio::time::timeout(
                        Duration::from_secs(30),
                        http.post(door, "/v1/chat/completions", chat(PROFILE, false)),
                    )
                    .await;
                    let (status, region) = match &answer {
                        Ok(a) => (a.status.as_u16(), a.region().unwrap_or_default().into()),
                        Err(_) => (0, String::new()),
                    };
                    if status != 200
                        && let Ok(a) = &answer
                    {
                        eprintln!("a call failed: {} {}", a.status, a.text());
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    calls.push(Call {
                        started,
                        took: started.elapsed(),
                        status,
                        region,
                    });
                }
                calls
            })
        })
        .collect();

    // Freeze us-central's agent while calls are in flight to it.
    wait_until(
        "calls in flight in us-central",
        Duration::from_secs(10),
        || async { central_sim.state.in_flight.load(Ordering::Relaxed) > 0 },
    )
    .await;
    let frozen = Stopped::stop(central.pid());
    let stopped_at = Instant::now();

    // The control plane drains us-central once its reports stop.
    let mut last = None;
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            last = explained(&cp, "us-central").await;
            if last.as_ref().is_some_and(|(w, reason, reporting)| {
                *w == 0.0 && reason == "drained" && !reporting
            }) {
                return stopped_at.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("us-central was never drained; last explained: {last:?}"));
    // The control plane's own keep-alive ends the frozen agent's sync
    // stream a few seconds later, and its record and load report go: the
    // region stays drained (it has no agent to relay to), rather than come
    // back as a region that never reported would.
    wait_until(
        "the control plane to drop the frozen agent",
        Duration::from_secs(30),
        || async {
            let agents = cp
                .admin()
                .await
                .list_agents(pb::ListAgentsRequest::default())
                .await
                .map(|r| r.into_inner().agents)
                .unwrap_or_default();
            !agents.is_empty() && agents.iter().all(|a| a.region != "us-central")
        },
    )
    .await;
    // Four of the leader's weight updates (every 500 ms).
    let watched = Instant::now();
    let mut came_back = None;
    for _ in 0..100 {
        if watched.elapsed() > Duration::from_secs(2) {
            break;
        }
        let now = explained(&cp, "us-central").await;
        if !now.as_ref().is_some_and(|(w, _, _)| *w == 0.0) {
            came_back = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the calls keep going while it stays frozen, drained.
    let drained_at = Instant::now();
    let before = done.load(Ordering::Relaxed);
    wait_until(
        "30 more calls after the drain",
        Duration::from_secs(20),
        || async { done.load(Ordering::Relaxed) >= before + 30 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut calls = Vec::new();
    for c in callers {
        calls.extend(c.await.unwrap());
    }
    drop(frozen);

    let failed: Vec<&Call> = calls.iter().filter(|c| c.status != 200).collect();
    let slowest = calls.iter().map(|c| c.took).max().unwrap_or_default();
    let after_stop: Vec<&Call> = calls.iter().filter(|c| c.started >= stopped_at).collect();
    let summary = format!(
        "{} calls, {} failed, slowest {slowest:?}, {} started after the stop, drained after {drained:?}, \
         {} served by us-central after the drain",
        calls.len(),
        failed.len(),
        after_stop.len(),
        calls
            .iter()
            .filter(|c| c.started >= drained_at && c.region == "us-central")
            .count(),
    );
    eprintln!("{summary}");
    assert!(failed.is_empty(), "{summary}: {failed:?}");
    assert!(
        slowest <= call_bound(),
        "{summary}: a call took longer than {:?}",
        call_bound()
    );
    assert!(
        drained <= DRAIN_BOUND,
        "{summary}: drained later than {DRAIN_BOUND:?}"
    );
    assert_eq!(came_back, None, "us-central came back while frozen");
    // Calls went on in us-west through the stop (some of them were bound
    // for us-central and failed over), and none was answered from the
    // frozen region.
    assert!(after_stop.len() >= 12, "{summary}");
    assert!(
        after_stop.iter().all(|c| c.region == "us-west"),
        "{summary}"
    );
    // The source ejected the hung region after calls failed in a row.
    let log = east.log();
    assert!(
        log.contains("region ejected after failures in a row") && log.contains("us-central"),
        "{summary}; the source agent's log:\n{log}"
    );
    // And counted those failures: the calls the frozen agent had not taken
    // as timeouts (no acknowledgment within the attempt deadline, or the
    // channel's pings unanswered); any it had taken as resets, since they
    // only learn that their connection closed.
    let metrics = http.get(door, "/metrics").await.text();
    let relay_errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("spillway_agent_relay_errors_total{"))
        .collect();
    eprintln!("relay errors: {relay_errors:?}");
    let timeouts: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "spillway_agent_relay_errors_total{inference_region=\"us-central\",cause=\"timeout\"} ",
            )
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    assert!(timeouts >= 1.0, "{summary}; relay errors: {relay_errors:?}");
}
