//! Saturation from the engines' own signals: agents that share engine-like
//! model servers (continuous batching under a KV-cache budget, a queue past
//! it, vLLM's metrics) spill before the engines queue, with no capacity
//! given; without metrics, a limit learned from time to first token does;
//! a server whose metrics go silent counts as saturated; garbage metrics
//! fall back to the learned limit.

use std::net::SocketAddr;
use std::time::Duration;

use spillway_proto::pb;
use spillway_tests::cluster::{Http, chat};
use spillway_tests::engine_load::{self, EngineScenario, Placement};
use spillway_tests::sim::{Engine, MetricsMode as SimMetrics, SimConfig};
use spillway_tests::{
    AgentOptions, AgentProcess, ControlPlane, TestAgent, TestSim, agent_refuses_to_start,
    free_port, model_server, wait_until,
};

const PROFILE: &str = "us.llama-3.1-8b";
const MODEL: &str = "llama-3.1-8b";

fn summary(run: &engine_load::EngineRun) -> String {
    format!(
        "{}: {} calls, {} failed, {} in us-west, queue p99 {:?}, ttft p50/p99 {:?}/{:?} (unloaded {:?}), explained {:?}",
        run.scenario.placement.name(),
        run.calls.len(),
        run.failed(),
        run.served_in("us-west"),
        (0..run.scenario.sims)
            .map(|i| run.queue_quantile(i, 0.99))
            .collect::<Vec<_>>(),
        run.ttft_quantile(None, 0.5),
        run.ttft_quantile(None, 0.99),
        run.unloaded_ttft,
        run.explained,
    )
}

/// Three agents share two engines that hold about twelve calls by KV
/// budget; 40 callers spill to us-west, and the engines' queues stay at
/// two or under (p99 per engine). The same load with each agent counting
/// its own calls against a guessed `capacity=12` per server (twice what an
/// engine holds: a guess has nothing to follow the KV cache by) queues
/// far more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_signals_spill_before_the_engines_queue() {
    spillway_tests::init_logging();
    let run = engine_load::run(EngineScenario::new(Placement::EngineSignals)).await;
    let said = summary(&run);
    eprintln!("{said}");
    assert_eq!(run.failed(), 0, "{said}");
    assert!(run.served_in("us-west") > 0, "nothing spilled: {said}");
    assert!(run.served_in("us-east") > 0, "nothing stayed: {said}");
    for sim in 0..run.scenario.sims {
        assert!(run.queue_quantile(sim, 0.99) <= 2, "{said}");
    }
    // The control plane saw the engines' figures: routes explain shows the
    // KV cache and the queue of us-east's two servers, each counted once
    // though three agents report them.
    let east = run.explained.clone().expect("an explanation of us-east");
    assert_eq!(east.servers, 2, "{said}");
    assert!(east.kv_usage.is_some_and(|kv| kv > 0.0), "{said}");
    assert!(east.engine_running > 0.0, "{said}");

    // Per-agent counting against a guessed capacity. (A guess of exactly
    // six is too close to call: the control plane counts each server's
    // capacity once for the region, and its weights then shed most of the
    // excess, leaving queues of two or three between weight updates.)
    let per_agent = EngineScenario::new(Placement::StaticCapacity(12));
    let counted = engine_load::run(per_agent).await;
    let said_counted = summary(&counted);
    eprintln!("{said_counted}");
    let worst = (0..counted.scenario.sims)
        .map(|i| counted.queue_quantile(i, 0.99))
        .max()
        .unwrap_or(0);
    assert!(
        worst >= 4,
        "per-agent counting should queue: {said_counted}\n{said}"
    );
}

/// No metrics: the limit each agent learns from time to first token spills
/// the excess, and calls served in us-east get their first token within
/// four times the unloaded TTFT (p90; measured here about three times: a
/// queued call waits for a running one to end, and three agents each probe
/// for one more call per round).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_metrics_learned_limits_spill_and_hold_ttft() {
    spillway_tests::init_logging();
    let run = engine_load::run(EngineScenario::new(Placement::Adaptive)).await;
    let said = summary(&run);
    eprintln!("{said}");
    assert_eq!(run.failed(), 0, "{said}");
    assert!(run.served_in("us-west") > 0, "nothing spilled: {said}");
    let local = run.ttft_quantile(Some("us-east"), 0.9);
    eprintln!("local ttft p90 {local:?}");
    assert!(
        local <= run.unloaded_ttft * 4,
        "local ttft p90 {local:?}: {said}"
    );
}

/// us-east (an agent process, to read its log) in front of two engines,
/// us-west with room to spare.
struct Fixture {
    _cp: ControlPlane,
    _west: (TestAgent, TestSim, tempfile::TempDir),
    sims: [TestSim; 2],
    http: Http,
}

impl Fixture {
    async fn start() -> (Fixture, Vec<String>) {
        let cp = ControlPlane::start(None, "cp").await;
        cp.create_region("us-east", "us").await;
        cp.create_region("us-west", "us").await;
        cp.admin()
            .await
            .create_profile(pb::CreateProfileRequest {
                profile: Some(pb::InferenceProfile {
                    id: PROFILE.into(),
                    destinations: vec!["us-east".into(), "us-west".into()],
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
        let engine = SimConfig {
            engine: Engine::Vllm,
            kv_tokens: 1_000_000,
            ..SimConfig::default()
        };
        let sims = [
            TestSim::start(engine.clone()).await,
            TestSim::start(engine).await,
        ];
        let west_sim = TestSim::start(SimConfig::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let planes = vec![cp.url()];
        let mut opts = AgentOptions::new("west-0", "us-west", &planes, dir.path());
        opts.model_servers = vec![model_server(west_sim.addr, &[MODEL], 1000)];
        opts.pipeline.allow_anonymous = true;
        let west = TestAgent::start_with(opts).await;
        (
            Fixture {
                _cp: cp,
                _west: (west, west_sim, dir),
                sims,
                http: Http::default(),
            },
            planes,
        )
    }

    /// `n` unary calls through `door`; each one's serving region.
    async fn calls(&self, door: SocketAddr, n: usize) -> Vec<String> {
        let mut regions = Vec::new();
        for _ in 0..n {
            let a = self
                .http
                .post(door, "/v1/chat/completions", chat(PROFILE, false))
                .await;
            assert_eq!(a.status, 200, "{}", a.text());
            regions.push(a.region().unwrap_or_default().to_string());
        }
        regions
    }

    fn received(&self, i: usize) -> u64 {
        self.sims[i]
            .state
            .received
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

async fn east_agent(planes: &[String], servers: &[String]) -> AgentProcess {
    AgentProcess::start_with("east-0", "us-east", planes, servers, &["--allow-anonymous"]).await
}

/// Waits until the agent serves calls (it has the profile and us-west).
async fn until_serving(f: &Fixture, door: SocketAddr) {
    wait_until(
        "the agent serves calls",
        Duration::from_secs(20),
        || async {
            f.http
                .post(door, "/v1/chat/completions", chat(PROFILE, false))
                .await
                .status
                == 200
        },
    )
    .await;
}

/// A server whose metrics stop answering counts as saturated: calls go to
/// the other server, then (both silent) to us-west, and none fails. Garbage
/// metrics: one log line, the learned limit decides, the agent carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_metrics_saturate_and_garbage_falls_back() {
    spillway_tests::init_logging();
    let (f, planes) = Fixture::start().await;
    let servers: Vec<String> = f
        .sims
        .iter()
        .map(|s| format!("http://{},models={MODEL}", s.addr))
        .collect();
    let east = east_agent(&planes, &servers).await;
    until_serving(&f, east.http).await;
    let served = f.calls(east.http, 30).await;
    assert!(served.iter().all(|r| r == "us-east"), "{served:?}");
    assert!(f.received(0) > 0 && f.received(1) > 0, "both engines serve");

    // Server 0's metrics hang: once stale, it gets nothing.
    f.sims[0].state.set_metrics(SimMetrics::Hang);
    // (Thirty calls in a row that pass it by: not luck, with two servers.)
    wait_until("server 0 left out", Duration::from_secs(20), || async {
        let before = f.received(0);
        f.calls(east.http, 30).await;
        f.received(0) == before
    })
    .await;
    let before = f.received(0);
    let served = f.calls(east.http, 30).await;
    assert_eq!(
        f.received(0),
        before,
        "a stale server got calls; log: {}",
        east.log()
    );
    assert!(served.iter().all(|r| r == "us-east"), "{served:?}");

    // Both silent: us-east is saturated, calls spill, none fails.
    f.sims[1].state.set_metrics(SimMetrics::Hang);
    wait_until(
        "calls spill to us-west",
        Duration::from_secs(20),
        || async { f.calls(east.http, 5).await.iter().all(|r| r == "us-west") },
    )
    .await;
    let served = f.calls(east.http, 20).await;
    assert!(served.iter().all(|r| r == "us-west"), "{served:?}");
    assert!(east.log().contains("counts as saturated"), "{}", east.log());

    // Server 1 answers garbage, server 0 answers again: both serve (the
    // garbage one by its learned limit), one warning for the garbage.
    f.sims[1].state.set_metrics(SimMetrics::Garbage);
    f.sims[0].state.set_metrics(SimMetrics::Normal);
    wait_until(
        "both engines serve again",
        Duration::from_secs(20),
        || async {
            let (a, b) = (f.received(0), f.received(1));
            let served = f.calls(east.http, 20).await;
            served.iter().all(|r| r == "us-east") && f.received(0) > a && f.received(1) > b
        },
    )
    .await;
    // Several scrapes later, still one line.
    let scrapes = f.sims[1].state.metrics_served();
    wait_until(
        "more scrapes of the garbage",
        Duration::from_secs(10),
        || async { f.sims[1].state.metrics_served() >= scrapes + 4 },
    )
    .await;
    let log = east.log();
    assert_eq!(
        log.matches("the engine's metrics cannot be read").count(),
        1,
        "{log}"
    );
    f.calls(east.http, 10).await;
}

/// Bad input: an unknown `metrics=` refuses the start, naming the choices;
/// a metrics URL that does not answer at start is a warning, and the
/// server counts as saturated when its engine was declared (calls spill)
/// or gets the learned limit under `auto` (calls are served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_metrics_settings() {
    spillway_tests::init_logging();
    agent_refuses_to_start(
        &[
            "--model-server",
            "http://127.0.0.1:9,models=m,metrics=bogus",
        ],
        "unknown metrics `bogus`: one of auto, vllm, sglang, llamacpp, none",
    )
    .await;
    agent_refuses_to_start(
        &[
            "--saturation-kv",
            "1.5",
            "--model-server",
            "http://127.0.0.1:9,models=m",
        ],
        "not a number above 0 and at most 1",
    )
    .await;

    let (f, planes) = Fixture::start().await;
    let nowhere = format!("http://127.0.0.1:{}/metrics", free_port());
    // Declared vLLM: saturated until its figures come, so calls spill.
    // Auto: the learned limit serves them.
    for (metrics, serves) in [(",metrics=vllm", "us-west"), ("", "us-east")] {
        let server = format!(
            "http://{},models={MODEL}{metrics},metrics_url={nowhere}",
            f.sims[0].addr
        );
        let east = east_agent(&planes, &[server]).await;
        wait_until("a warning at start", Duration::from_secs(10), || async {
            east.log().contains("metrics do not answer")
        })
        .await;
        until_serving(&f, east.http).await;
        let served = f.calls(east.http, 10).await;
        assert!(served.iter().all(|r| r == serves), "{metrics}: {served:?}");
    }
}

/// A route table's time-to-first-token objective: while the engines' TTFT
/// p90 is past it, us-east's servers count as saturated and calls spill;
/// with an objective they meet, calls stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttft_objective_spills_calls_the_engines_are_too_slow_for() {
    spillway_tests::init_logging();
    let (f, planes) = Fixture::start().await;
    for sim in &f.sims {
        sim.state.set(|c| c.ttft = Duration::from_millis(150));
    }
    let servers: Vec<String> = f
        .sims
        .iter()
        .map(|s| format!("http://{},models={MODEL}", s.addr))
        .collect();
    let east = east_agent(&planes, &servers).await;
    until_serving(&f, east.http).await;
    let set = |objective_ms: u32, first: bool| {
        let cp = &f._cp;
        async move {
            let table = pb::RouteTable {
                profile: PROFILE.into(),
                source_region: "us-east".into(),
                destinations: [("us-east", 0), ("us-west", 1)]
                    .into_iter()
                    .map(|(r, p)| pb::RouteDestination {
                        region: r.into(),
                        weight: 1.0,
                        priority: p,
                    })
                    .collect(),
                ttft_objective_ms: objective_ms,
                revision: 0,
            };
            let mut admin = cp.admin().await;
            if first {
                admin
                    .create_route_table(pb::CreateRouteTableRequest {
                        route_table: Some(table),
                    })
                    .await
                    .expect("the route table");
            } else {
                let current = admin
                    .get_route_table(pb::GetRouteTableRequest {
                        profile: PROFILE.into(),
                        source_region: "us-east".into(),
                    })
                    .await
                    .expect("the route table")
                    .into_inner();
                let table = pb::RouteTable {
                    revision: current.revision,
                    ..table
                };
                admin
                    .update_route_table(pb::UpdateRouteTableRequest {
                        route_table: Some(table),
                    })
                    .await
                    .expect("the route table");
            }
        }
    };
    // 100 ms: the engines' 150 ms prefill is past it.
    set(100, true).await;
    wait_until(
        "calls spill past the objective",
        Duration::from_secs(20),
        || async { f.calls(east.http, 5).await.iter().all(|r| r == "us-west") },
    )
    .await;
    // 1 s: met; calls stay in us-east.
    set(1000, false).await;
    wait_until(
        "calls stay under the objective",
        Duration::from_secs(20),
        || async { f.calls(east.http, 5).await.iter().all(|r| r == "us-east") },
    )
    .await;
}
