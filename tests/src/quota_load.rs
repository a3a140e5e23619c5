//! The shared-quota scenario, for the end-to-end test and the benchmark:
//! three agents of one region share one requests-per-minute limit under an
//! open-loop load spread unevenly among them, for some windows with the
//! control plane up and then some with it killed. Another region serves the
//! same profile, so that a throttled call that spilled would show there.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use spillway_proto::pb;

use crate::cluster::{Http, chat};
use crate::sim::SimConfig;
use crate::{AgentOptions, ControlPlane, TestAgent, TestSim, model_server};

pub const PROFILE: &str = "us.llama-3.1-8b";
const MODEL: &str = "llama-3.1-8b";

#[derive(Debug, Clone)]
pub struct QuotaScenario {
    pub limit_rpm: i64,
    /// Calls per minute sent to each of the three agents.
    pub load_per_minute: [f64; 3],
    /// Before the first window: leases settle.
    pub warmup: Duration,
    pub window: Duration,
    /// Windows with the control plane up, then after it is killed.
    pub windows_up: usize,
    pub windows_down: usize,
    /// Between the up and the down windows: the first agent goes quiet for
    /// this long, and the others should take over its share.
    pub reclaim: Duration,
    pub lease_secs: u64,
    /// An etcd endpoint, or the embedded store.
    pub etcd: Option<String>,
}

impl Default for QuotaScenario {
    fn default() -> Self {
        QuotaScenario {
            limit_rpm: 600,
            load_per_minute: [1300.0, 550.0, 150.0],
            warmup: Duration::from_secs(12),
            window: Duration::from_secs(60),
            windows_up: 1,
            windows_down: 1,
            reclaim: Duration::ZERO,
            lease_secs: 5,
            etcd: None,
        }
    }
}

/// One call: when it was sent (from the start of the load), to which
/// agent, and how it was answered.
#[derive(Debug, Clone)]
pub struct Sent {
    pub at: Duration,
    pub agent: usize,
    pub status: StatusCode,
    /// `x-spillway-throttle`, `x-ratelimit-limit-requests`, `retry-after`
    /// and the error code, when given.
    pub throttle: Option<String>,
    pub limit_header: Option<String>,
    pub retry_after: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug)]
pub struct QuotaRun {
    pub scenario: QuotaScenario,
    pub calls: Vec<Sent>,
    /// Calls that reached the other region's model server.
    pub other_region_received: u64,
    /// Calls the source region's model servers answered.
    pub source_served: u64,
}

impl QuotaRun {
    /// Admitted calls in window `i` (up windows first), scaled to a minute.
    pub fn admitted_per_minute(&self, i: usize) -> f64 {
        let s = &self.scenario;
        let mut start = s.warmup + s.window * i as u32;
        if i >= s.windows_up {
            start += s.reclaim;
        }
        let end = start + s.window;
        let n = self
            .calls
            .iter()
            .filter(|c| c.at >= start && c.at < end && c.status == StatusCode::OK)
            .count();
        n as f64 * 60.0 / s.window.as_secs_f64()
    }

    /// (overshoot, utilization) of window `i`, as fractions of the limit.
    pub fn figures(&self, i: usize) -> (f64, f64) {
        let limit = self.scenario.limit_rpm as f64;
        let admitted = self.admitted_per_minute(i);
        ((admitted - limit).max(0.0) / limit, admitted / limit)
    }

    fn up_until(&self) -> Duration {
        let s = &self.scenario;
        s.warmup + s.window * u32::try_from(s.windows_up).unwrap_or(1)
    }

    /// Seconds from the first agent going quiet until the others admit 90%
    /// of the limit (over a 2 s span ending then); `None` if they never do
    /// within the quiet stretch.
    pub fn reclaim_seconds(&self) -> Option<f64> {
        let quiet = self.up_until();
        let span = Duration::from_secs(2);
        let needed = 0.9 * self.scenario.limit_rpm as f64 * span.as_secs_f64() / 60.0;
        let mut t = Duration::ZERO;
        while t + span <= self.scenario.reclaim {
            let (from, to) = (quiet + t, quiet + t + span);
            let admitted = self
                .calls
                .iter()
                .filter(|c| c.at >= from && c.at < to && c.status == StatusCode::OK)
                .count();
            if admitted as f64 >= needed {
                return Some((t + span).as_secs_f64());
            }
            t += Duration::from_millis(250);
        }
        None
    }
}

fn header(h: &http::HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(String::from)
}

/// Runs the scenario and returns every call's outcome.
pub async fn run(scenario: QuotaScenario) -> QuotaRun {
    let lease = scenario.lease_secs.to_string();
    let mut cp = ControlPlane::start_with(
        scenario.etcd.as_deref(),
        "cp",
        &["--quota-lease-secs", &lease, "--quota-refresh-ms", "500"],
    )
    .await;
    let mut admin = cp.admin().await;
    for (name, geo) in [("us-east", "us"), ("us-west", "us")] {
        cp.create_region(name, geo).await;
    }
    admin
        .create_profile(pb::CreateProfileRequest {
            profile: Some(pb::InferenceProfile {
                id: PROFILE.into(),
                destinations: vec!["us-east".into(), "us-west".into()],
                ..Default::default()
            }),
        })
        .await
        .expect("profile created");
    admin
        .create_quota(pb::CreateQuotaRequest {
            quota: Some(pb::Quota {
                scope: Some(pb::QuotaScope {
                    profile: PROFILE.into(),
                    source_region: "us-east".into(),
                    tenant: String::new(),
                }),
                requests_per_minute: Some(scenario.limit_rpm),
                ..Default::default()
            }),
        })
        .await
        .expect("quota created");

    let planes = [cp.url()];
    let sim = SimConfig {
        max_concurrent: 1024,
        output_tokens: 4,
        ..SimConfig::default()
    };
    let east_sim = TestSim::start(sim.clone()).await;
    let west_sim = TestSim::start(sim).await;
    let mut dirs = Vec::new();
    let mut agents = Vec::new();
    for (id, region, server) in [
        ("a", "us-east", &east_sim),
        ("b", "us-east", &east_sim),
        ("c", "us-east", &east_sim),
        ("w", "us-west", &west_sim),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut opts = AgentOptions::new(id, region, &planes, dir.path());
        opts.model_servers = vec![model_server(server.addr, &[MODEL], 1024)];
        agents.push(TestAgent::start_with(opts).await);
        dirs.push(dir);
    }
    for a in &agents[..3] {
        a.wait_for("the quota, and all three agents of us-east", |c| {
            !c.quotas.is_empty() && c.region_agents() == 3
        })
        .await;
    }
    agents[3]
        .wait_for("its profile", |c| c.profiles.contains_key(PROFILE))
        .await;

    let calls: Arc<Mutex<Vec<Sent>>> = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let quiet_from =
        scenario.warmup + scenario.window * u32::try_from(scenario.windows_up).unwrap_or(1);
    let up_until = quiet_from + scenario.reclaim;
    let end = up_until + scenario.window * u32::try_from(scenario.windows_down).unwrap_or(0);
    let http = Http::default();
    let mut senders = Vec::new();
    for (i, per_minute) in scenario.load_per_minute.iter().enumerate() {
        let period = Duration::from_secs_f64(60.0 / per_minute);
        let (addr, http, calls) = (agents[i].http, http.clone(), calls.clone());
        senders.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut inflight = Vec::new();
            loop {
                tick.tick().await;
                let at = start.elapsed();
                if at >= end {
                    break;
                }
                if i == 0 && at >= quiet_from && at < up_until {
                    continue;
                }
                let (http, calls) = (http.clone(), calls.clone());
                inflight.push(tokio::spawn(async move {
                    let answer = http
                        .post(addr, "/v1/chat/completions", chat(PROFILE, false))
                        .await;
                    let code = (answer.status != StatusCode::OK)
                        .then(|| answer.json()["error"]["code"].as_str().map(String::from))
                        .flatten();
                    let sent = Sent {
                        at,
                        agent: i,
                        status: answer.status,
                        throttle: header(&answer.headers, "x-spillway-throttle"),
                        limit_header: header(&answer.headers, "x-ratelimit-limit-requests"),
                        retry_after: header(&answer.headers, "retry-after"),
                        code,
                    };
                    calls.lock().expect("calls").push(sent);
                }));
            }
            for call in inflight {
                let _ = call.await;
            }
        }));
    }
    tokio::time::sleep(up_until.saturating_sub(start.elapsed())).await;
    if scenario.windows_down > 0 {
        cp.kill().await;
    }
    for s in senders {
        s.await.expect("a sender");
    }
    // Every call was answered: the model servers' counters are final.
    let calls = std::mem::take(&mut *calls.lock().expect("calls"));
    QuotaRun {
        scenario,
        calls,
        other_region_received: west_sim
            .state
            .received
            .load(std::sync::atomic::Ordering::Relaxed),
        source_served: east_sim.served(),
    }
}
