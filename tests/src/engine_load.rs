//! The engine-saturation scenario, for the end-to-end tests and the
//! benchmark: us-east's agents share engine-like simulators (continuous
//! batching under a KV-cache budget, a FIFO queue past it, vLLM's metrics),
//! us-west has room to spare, and streaming callers ramp up past what
//! us-east's engines hold. What is measured: where calls were served, each
//! call's time to first token at the client, and the engines' own queues,
//! sampled as they move.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spillway_agent::upstream::ModelServerSpec;
use spillway_agent::upstream::engine::MetricsMode;
use spillway_proto::pb;

use crate::cluster::Http;
use crate::sim::{Engine, SimConfig};
use crate::{AgentOptions, ControlPlane, TestAgent, TestSim, engine_server, model_server};

pub const PROFILE: &str = "us.llama-3.1-8b";
const MODEL: &str = "llama-3.1-8b";

/// How us-east's agents judge their model servers' load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Placement {
    /// The engines' own metrics (`metrics=auto`, no `capacity`).
    EngineSignals,
    /// No metrics (`metrics=none`, no `capacity`): the limit learned from
    /// time to first token.
    Adaptive,
    /// A fixed `capacity=N,static` per server in each agent, counted by
    /// each agent alone (what an operator had to guess before).
    StaticCapacity(u32),
    /// Every call stays in us-east (a route table with no other region),
    /// with a fixed capacity no load reaches: a plain load balancer.
    NoSpill,
}

impl Placement {
    pub fn name(&self) -> String {
        match self {
            Placement::EngineSignals => "engine signals".into(),
            Placement::Adaptive => "adaptive limit (metrics=none)".into(),
            Placement::StaticCapacity(n) => format!("static capacity={n}"),
            Placement::NoSpill => "no spill".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineScenario {
    pub placement: Placement,
    /// us-east's agents, which share all of its simulators.
    pub agents: usize,
    pub sims: usize,
    /// us-east's simulators (an engine mode).
    pub sim: SimConfig,
    /// Output tokens each call asks for (`max_tokens`).
    pub max_tokens: u32,
    /// Closed-loop callers: from this many, one more at even steps over
    /// `ramp`, to `callers_to`; then held for `hold`.
    pub callers_from: usize,
    pub callers_to: usize,
    pub ramp: Duration,
    pub hold: Duration,
}

impl EngineScenario {
    /// us-east's two engines hold about twelve calls by KV budget.
    pub fn new(placement: Placement) -> EngineScenario {
        let max_tokens = 24;
        EngineScenario {
            placement,
            agents: 3,
            sims: 2,
            sim: SimConfig {
                engine: Engine::Vllm,
                ttft: Duration::from_millis(60),
                inter_token: Duration::from_millis(8),
                output_tokens: max_tokens,
                // Six calls of this scenario's size per engine.
                kv_tokens: 6 * footprint(max_tokens),
                ..SimConfig::default()
            },
            max_tokens,
            callers_from: 4,
            callers_to: 40,
            ramp: Duration::from_secs(4),
            hold: Duration::from_secs(3),
        }
    }

    /// Calls us-east's engines hold together before they queue.
    pub fn engine_capacity(&self) -> usize {
        self.sims * (self.sim.kv_tokens / footprint(self.max_tokens)) as usize
    }
}

/// The body every call sends.
pub fn body(max_tokens: u32) -> String {
    serde_json::json!({
        "model": PROFILE,
        "messages": [{"role": "user", "content": "How far is the moon? Answer briefly, please."}],
        "stream": true,
        "max_tokens": max_tokens,
    })
    .to_string()
}

/// The KV-cache tokens a call of this scenario takes in the simulator:
/// its prompt (body bytes / 4) and its output.
pub fn footprint(max_tokens: u32) -> u32 {
    (body(max_tokens).len() as u32 / 4).max(1) + max_tokens
}

/// One call, as the client saw it.
#[derive(Debug, Clone)]
pub struct Call {
    /// When it was sent, from the start of the load.
    pub at: Duration,
    pub took: Duration,
    pub status: u16,
    /// Whether the stream ended cleanly with `[DONE]`.
    pub complete: bool,
    pub region: String,
    /// To the first body bytes.
    pub ttft: Option<Duration>,
}

/// One look at the engines.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Duration,
    pub waiting: Vec<u32>,
    pub running: Vec<u32>,
    pub kv: Vec<f64>,
}

pub struct EngineRun {
    pub scenario: EngineScenario,
    pub calls: Vec<Call>,
    pub samples: Vec<Sample>,
    /// The median TTFT of calls sent one at a time before the load.
    pub unloaded_ttft: Duration,
    /// The median time of such a call.
    pub unloaded_call: Duration,
    /// When the callers first outnumbered what us-east's engines hold.
    pub saturated_at: Duration,
    /// `spillctl routes explain`'s view of us-east, taken at the height of
    /// the load.
    pub explained: Option<pb::ExplainedDestination>,
    /// From the start of the load to the last caller's end.
    pub elapsed: Duration,
}

impl EngineRun {
    pub fn ok(&self) -> impl Iterator<Item = &Call> {
        self.calls.iter().filter(|c| c.status == 200 && c.complete)
    }

    pub fn failed(&self) -> usize {
        self.calls.len() - self.ok().count()
    }

    pub fn served_in(&self, region: &str) -> usize {
        self.ok().filter(|c| c.region == region).count()
    }

    /// The first call served by another region, by when it was sent.
    pub fn first_spill(&self) -> Option<Duration> {
        self.ok()
            .filter(|c| c.region != "us-east")
            .map(|c| c.at)
            .min()
    }

    /// The `q` quantile of one engine's waiting queue over the samples taken
    /// while the load ran.
    pub fn queue_quantile(&self, sim: usize, q: f64) -> u32 {
        let mut v: Vec<u32> = self.samples.iter().map(|s| s.waiting[sim]).collect();
        quantile(&mut v, q)
    }

    /// The `q` quantile of the time to first token of calls that were
    /// served, in `region` or anywhere (`None`).
    pub fn ttft_quantile(&self, region: Option<&str>, q: f64) -> Duration {
        let mut v: Vec<Duration> = self
            .ok()
            .filter(|c| region.is_none_or(|r| c.region == r))
            .filter_map(|c| c.ttft)
            .collect();
        quantile(&mut v, q)
    }

    /// Calls the callers would have sent had each taken the unloaded time:
    /// a caller sends until the load ends, so each sends as many as start
    /// within its window.
    pub fn offered(&self) -> f64 {
        let s = &self.scenario;
        let window = s.ramp + s.hold;
        (0..s.callers_to)
            .map(|i| {
                (window.saturating_sub(start_of(s, i)).as_secs_f64()
                    / self.unloaded_call.as_secs_f64())
                .ceil()
            })
            .sum()
    }
}

fn quantile<T: Ord + Copy + Default>(v: &mut [T], q: f64) -> T {
    if v.is_empty() {
        return T::default();
    }
    v.sort_unstable();
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// When caller `i` starts, from the start of the load.
fn start_of(s: &EngineScenario, i: usize) -> Duration {
    if i < s.callers_from {
        return Duration::ZERO;
    }
    let steps = (s.callers_to - s.callers_from).max(1) as u32;
    s.ramp * (i - s.callers_from + 1) as u32 / steps
}

/// Starts the cluster, runs the scenario, stops everything.
pub async fn run(s: EngineScenario) -> EngineRun {
    let cp = ControlPlane::start_with(None, "cp", &["--weights-interval-ms", "500"]).await;
    cp.create_region("us-east", "us").await;
    cp.create_region("us-west", "us").await;
    let mut admin = cp.admin().await;
    let destinations = if s.placement == Placement::NoSpill {
        vec!["us-east".to_string()]
    } else {
        vec!["us-east".to_string(), "us-west".to_string()]
    };
    admin
        .create_profile(pb::CreateProfileRequest {
            profile: Some(pb::InferenceProfile {
                id: PROFILE.into(),
                destinations,
                ..Default::default()
            }),
        })
        .await
        .expect("the profile");
    let planes = [cp.url()];
    let mut sims = Vec::new();
    for _ in 0..s.sims {
        sims.push(TestSim::start(s.sim.clone()).await);
    }
    let west_sim = TestSim::start(SimConfig {
        ttft: s.sim.ttft,
        inter_token: s.sim.inter_token,
        output_tokens: s.sim.output_tokens,
        max_concurrent: 10_000,
        ..SimConfig::default()
    })
    .await;
    let mut dirs = Vec::new();
    let mut east = Vec::new();
    for i in 0..s.agents {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let id = format!("east-{i}");
        let mut opts = AgentOptions::new(&id, "us-east", &planes, dir.path());
        opts.model_servers = sims.iter().map(|sim| spec(s.placement, sim.addr)).collect();
        opts.pipeline.allow_anonymous = true;
        opts.upstream_timeout = Duration::from_secs(30);
        east.push(TestAgent::start_with(opts).await);
        dirs.push(dir);
    }
    let west = {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let mut opts = AgentOptions::new("west-0", "us-west", &planes, dir.path());
        opts.model_servers = vec![model_server(west_sim.addr, &[MODEL], 10_000)];
        opts.pipeline.allow_anonymous = true;
        let agent = TestAgent::start_with(opts).await;
        dirs.push(dir);
        agent
    };
    for agent in &east {
        agent
            .wait_for("the profile and us-west's relay", |c| {
                c.profiles.contains_key(PROFILE)
                    && (s.placement == Placement::NoSpill || c.relays.contains_key("us-west"))
            })
            .await;
    }
    let doors: Vec<SocketAddr> = east.iter().map(|a| a.http).collect();
    let http = Http::default();

    // Unloaded: one call at a time.
    let mut ttfts = Vec::new();
    let mut times = Vec::new();
    for i in 0..7 {
        let c = call(&http, doors[i % doors.len()], s.max_tokens, Instant::now()).await;
        assert!(
            c.status == 200 && c.complete,
            "an unloaded call failed: {c:?}"
        );
        ttfts.push(c.ttft.expect("a first token"));
        times.push(c.took);
    }
    let unloaded_ttft = quantile(&mut ttfts, 0.5);
    let unloaded_call = quantile(&mut times, 0.5);

    // The load, and the engines sampled every 10 ms while it runs.
    let start = Instant::now();
    let end = start + s.ramp + s.hold;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let states: Vec<_> = sims.iter().map(|sim| sim.state.clone()).collect();
        let samples = samples.clone();
        tokio::spawn(async move {
            while Instant::now() < end {
                let sample = Sample {
                    at: start.elapsed(),
                    waiting: states.iter().map(|st| st.waiting()).collect(),
                    running: states.iter().map(|st| st.running()).collect(),
                    kv: states.iter().map(|st| st.kv_usage()).collect(),
                };
                samples.lock().unwrap().push(sample);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut callers = Vec::new();
    for i in 0..s.callers_to {
        let (http, calls) = (http.clone(), calls.clone());
        let door = doors[i % doors.len()];
        let begin = start + start_of(&s, i);
        let max_tokens = s.max_tokens;
        callers.push(tokio::spawn(async move {
            tokio::time::sleep_until(begin.into()).await;
            while Instant::now() < end {
                let c = call(&http, door, max_tokens, start).await;
                let refused = c.status != 200;
                calls.lock().unwrap().push(c);
                if refused {
                    // A refused call comes back at once: do not spin.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    // At the height of the load, what the control plane explains.
    tokio::time::sleep_until((end - s.hold / 2).into()).await;
    let explained = admin
        .explain_route(pb::ExplainRouteRequest {
            profile: PROFILE.into(),
            source_region: "us-east".into(),
        })
        .await
        .ok()
        .and_then(|r| {
            r.into_inner()
                .destinations
                .into_iter()
                .find(|d| d.region == "us-east")
        });
    for c in callers {
        c.await.expect("a caller");
    }
    let elapsed = start.elapsed();
    sampler.await.expect("the sampler");
    let calls = std::mem::take(&mut *calls.lock().unwrap());
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let capacity = s.engine_capacity();
    let saturated_at = if s.callers_from > capacity {
        Duration::ZERO
    } else {
        start_of(&s, capacity)
    };
    for a in &east {
        a.stop();
    }
    west.stop();
    for sim in sims.iter().chain([&west_sim]) {
        sim.stop();
    }
    EngineRun {
        scenario: s,
        calls,
        samples,
        unloaded_ttft,
        unloaded_call,
        saturated_at,
        explained,
        elapsed,
    }
}

fn spec(placement: Placement, addr: SocketAddr) -> ModelServerSpec {
    match placement {
        Placement::EngineSignals => engine_server(addr, &[MODEL], MetricsMode::Auto),
        Placement::Adaptive => engine_server(addr, &[MODEL], MetricsMode::None),
        Placement::StaticCapacity(n) => model_server(addr, &[MODEL], n),
        Placement::NoSpill => model_server(addr, &[MODEL], 100_000),
    }
}

/// One streaming call, read to its end.
async fn call(http: &Http, door: SocketAddr, max_tokens: u32, start: Instant) -> Call {
    let sent = Instant::now();
    let at = sent.duration_since(start);
    let mut answer = http
        .post_streaming(door, "/v1/chat/completions", body(max_tokens))
        .await;
    let status = answer.status.as_u16();
    let region = answer
        .headers
        .get(spillway_agent::error::INFERENCE_REGION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut ttft = None;
    let mut complete = false;
    let mut tail = Vec::new();
    while let Some(piece) = answer.next().await {
        let Ok(bytes) = piece else {
            break;
        };
        if ttft.is_none() && !bytes.is_empty() {
            ttft = Some(sent.elapsed());
        }
        tail.extend_from_slice(&bytes);
        if tail.len() > 64 {
            tail.drain(..tail.len() - 64);
        }
    }
    if status == 200 {
        complete = String::from_utf8_lossy(&tail).contains("[DONE]");
    }
    Call {
        at,
        took: sent.elapsed(),
        status,
        complete,
        region,
        ttft,
    }
}
