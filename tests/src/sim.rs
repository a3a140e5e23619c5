//! A model-server simulator of every API an engine serves: OpenAI chat and
//! legacy completions, embeddings and Responses, and Anthropic Messages
//! (unary and server-sent events in each API's own shapes), with a
//! configurable time to first token, inter-token latency, output length,
//! injected failure rate and garbage answers; `/health` and `/metrics`. A
//! chat request that offers tools gets a call to the first one. Tests run
//! it in process and change its behaviour on the fly; the demo and the
//! benchmark run the `spillway-sim` binary.
//!
//! It behaves as one of two kinds of server, by [`SimConfig::engine`]:
//!
//! - [`Engine::Simple`] (the default): `max_concurrent` calls at a time and
//!   429 beyond them; `/metrics` writes a few `spillway_sim_*` lines.
//! - [`Engine::Vllm`], [`Engine::Sglang`], [`Engine::Llamacpp`]: an
//!   inference engine, which never refuses for load. vLLM and SGLang batch
//!   continuously under a KV-cache budget (`kv_tokens`): a call runs while
//!   its prompt and its whole output fit beside the running ones (and
//!   fewer than `max_concurrent` run); the others wait in a FIFO queue, and
//!   the time they wait adds to their time to first token. llama.cpp's
//!   server has `max_concurrent` fixed slots and defers the rest, FIFO. In
//!   every engine the pace of tokens slows as the batch grows
//!   (`batch_slowdown`), and `/metrics` writes the engine's own families
//!   (running, waiting, KV-cache usage, a time-to-first-token histogram)
//!   as its exporter writes them, amid unrelated families.
//!
//! Tests can make `/metrics` hang or answer garbage ([`MetricsMode`]),
//! through [`SimState::set_metrics`] or `POST /admin/metrics/{ok,hang,garbage}`.

use std::collections::VecDeque;
use std::fmt::{self, Write as _};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::serve::ListenerExt;
use serde_json::{Value, json};
use spillway_core::api::Api;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};

/// What kind of server the simulator is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// A fixed number of concurrent calls, 429 beyond them, and
    /// `spillway_sim_*` metrics.
    #[default]
    Simple,
    /// vLLM: continuous batching under a KV-cache budget, a FIFO queue past
    /// it, `vllm:*` metrics.
    Vllm,
    /// SGLang: as vLLM, with `sglang:*` metrics.
    Sglang,
    /// llama.cpp's server: `max_concurrent` slots (its `--parallel`), calls
    /// past them deferred, `llamacpp:*` metrics.
    Llamacpp,
}

impl Engine {
    pub const ALL: [Engine; 4] = [
        Engine::Simple,
        Engine::Vllm,
        Engine::Sglang,
        Engine::Llamacpp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Simple => "simple",
            Engine::Vllm => "vllm",
            Engine::Sglang => "sglang",
            Engine::Llamacpp => "llamacpp",
        }
    }

    /// Whether calls past the limits wait in a queue (any engine) rather
    /// than being refused (the simple server).
    fn queues(self) -> bool {
        self != Engine::Simple
    }

    /// Whether admission counts KV-cache tokens (vLLM and SGLang).
    fn has_kv_budget(self) -> bool {
        matches!(self, Engine::Vllm | Engine::Sglang)
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Engine {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Engine::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| format!("unknown engine `{s}`: one of simple, vllm, sglang, llamacpp"))
    }
}

/// How `/metrics` answers, for tests of scrapers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetricsMode {
    /// The engine's metrics.
    #[default]
    Normal,
    /// No answer at all: the call stays open until the mode changes or the
    /// simulator stops.
    Hang,
    /// 200 with a body that is not Prometheus text.
    Garbage,
}

impl MetricsMode {
    fn as_str(self) -> &'static str {
        match self {
            MetricsMode::Normal => "normal",
            MetricsMode::Hang => "hang",
            MetricsMode::Garbage => "garbage",
        }
    }
}

/// How the simulated model server behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// What kind of server: the simple one, or an engine that queues.
    pub engine: Engine,
    /// The prefill: from a call's start (in an engine, its admission) to
    /// its first token.
    pub ttft: Duration,
    /// Between tokens, for a call alone in its batch.
    pub inter_token: Duration,
    /// Tokens per answer (capped by the request's max_tokens).
    pub output_tokens: u32,
    /// Concurrent sequences. The simple server answers 429 beyond them;
    /// engines queue (vLLM's `--max-num-seqs`, llama.cpp's `--parallel`).
    pub max_concurrent: u32,
    /// vLLM and SGLang: the KV-cache budget in tokens, shared by the
    /// running calls' prompts and outputs.
    pub kv_tokens: u32,
    /// Engines: calls that may wait; past them, 503 (vLLM's
    /// `--max-num-queued-reqs`). `None`: no bound.
    pub max_queued: Option<u32>,
    /// Engines: how much slower each token comes per other call in the
    /// batch; the gap is `inter_token * (1 + batch_slowdown * (running - 1))`.
    pub batch_slowdown: f64,
    /// The `model_name` label of the engines' metrics.
    pub model_name: String,
    /// Share of calls answered 500, in [0, 1].
    pub failure_rate: f64,
    /// Answer 200 with a body that is not JSON.
    pub garbage: bool,
    /// Break a stream off (abort the connection) after this many tokens.
    pub break_after: Option<u32>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            engine: Engine::Simple,
            ttft: Duration::ZERO,
            inter_token: Duration::ZERO,
            output_tokens: 16,
            max_concurrent: 64,
            kv_tokens: 16_384,
            max_queued: None,
            batch_slowdown: 0.02,
            model_name: "sim".to_string(),
            failure_rate: 0.0,
            garbage: false,
            break_after: None,
        }
    }
}

/// Live state and counters, shared with tests.
#[derive(Debug, Default)]
pub struct SimState {
    pub config: Mutex<SimConfig>,
    /// Inference calls received (every API), whatever their outcome.
    pub received: AtomicU64,
    /// Calls the server holds: in the simple server those in its
    /// `max_concurrent` slots; in an engine those running or waiting.
    pub in_flight: AtomicU32,
    /// Calls answered with a completion.
    pub served: AtomicU64,
    /// Calls refused with 429 (the simple server only).
    pub throttled: AtomicU64,
    /// Calls refused with 503 because an engine's queue was full.
    pub queue_full: AtomicU64,
    /// Calls failed with 500.
    pub failed: AtomicU64,
    /// When set, every call is answered 503 (the server is "down" but up).
    pub down: AtomicBool,
    /// The path and body of the last call received.
    pub last: Mutex<Option<(String, Value)>>,
    /// An engine's running calls and queue.
    batch: Mutex<Batch>,
    ttft: Mutex<TtftHistogram>,
    /// Prompt tokens prefilled and output tokens produced, for llama.cpp's
    /// counters.
    prompt_tokens: AtomicU64,
    tokens_predicted: AtomicU64,
    metrics_mode: Mutex<MetricsMode>,
    /// Fired when the metrics mode changes or the simulator stops, to wake
    /// hung `/metrics` calls.
    metrics_changed: Notify,
    /// Set once the simulator stops: `/metrics` no longer hangs.
    stopping: AtomicBool,
    metrics_served: AtomicU64,
    metrics_hanging: AtomicU32,
}

impl SimState {
    pub fn new(config: SimConfig) -> Arc<SimState> {
        Arc::new(SimState {
            config: Mutex::new(config),
            ..SimState::default()
        })
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    pub fn set(&self, change: impl FnOnce(&mut SimConfig)) {
        change(&mut lock(&self.config));
        // Larger limits take the calls that now fit out of the queue at
        // once, not when the next running call ends.
        let limits = self.limits();
        self.batch().admit_waiting(limits);
    }

    /// Calls running: in an engine, those admitted to the batch; in the
    /// simple server, those in its slots.
    pub fn running(&self) -> u32 {
        if lock(&self.config).engine.queues() {
            self.batch().running
        } else {
            self.in_flight.load(Ordering::Relaxed)
        }
    }

    /// Calls waiting in an engine's queue (0 in the simple server).
    pub fn waiting(&self) -> u32 {
        self.batch().waiting.len() as u32
    }

    /// The most calls that waited at once since the start or the last
    /// [`SimState::reset_peak_waiting`].
    pub fn peak_waiting(&self) -> u32 {
        self.batch().peak_waiting
    }

    /// Starts a new peak from the calls waiting now.
    pub fn reset_peak_waiting(&self) {
        let mut b = self.batch();
        b.peak_waiting = b.waiting.len() as u32;
    }

    /// The share of vLLM's or SGLang's KV-cache budget reserved by the
    /// running calls, from 0 to 1 (0 in the other servers).
    pub fn kv_usage(&self) -> f64 {
        let (engine, budget) = {
            let c = lock(&self.config);
            (c.engine, c.kv_tokens)
        };
        if !engine.has_kv_budget() {
            return 0.0;
        }
        let used = self.batch().kv_used;
        if budget == 0 {
            return if used > 0 { 1.0 } else { 0.0 };
        }
        // A call larger than the whole budget runs alone and fills it.
        (used as f64 / f64::from(budget)).min(1.0)
    }

    /// Makes `/metrics` answer normally, hang or answer garbage. Calls
    /// hung so far answer as the new mode says.
    pub fn set_metrics(&self, mode: MetricsMode) {
        *lock(&self.metrics_mode) = mode;
        self.metrics_changed.notify_waiters();
    }

    pub fn metrics_mode(&self) -> MetricsMode {
        *lock(&self.metrics_mode)
    }

    /// `/metrics` calls answered (normally or with garbage).
    pub fn metrics_served(&self) -> u64 {
        self.metrics_served.load(Ordering::Relaxed)
    }

    /// `/metrics` calls hanging now.
    pub fn metrics_hanging(&self) -> u32 {
        self.metrics_hanging.load(Ordering::Relaxed)
    }

    /// Marks the simulator as stopping: hung `/metrics` calls answer 503
    /// now and later ones do not hang, so that they do not hold a graceful
    /// shutdown open. [`serve`] calls it when its shutdown future resolves;
    /// whoever serves [`router`] by other means should call it too.
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.metrics_changed.notify_waiters();
    }

    fn snapshot(&self) -> SimConfig {
        lock(&self.config).clone()
    }

    fn batch(&self) -> MutexGuard<'_, Batch> {
        lock(&self.batch)
    }

    fn limits(&self) -> Limits {
        Limits::of(&lock(&self.config))
    }
}

/// Locks `m`, through a poisoning: a test that panicked holding a lock
/// should not take the simulator down with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts a call in `in_flight` until dropped.
struct Slot(Arc<SimState>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An engine's scheduler: the calls running in the batch, the KV-cache
/// tokens they reserve, and the FIFO queue of calls waiting for room.
#[derive(Debug, Default)]
struct Batch {
    running: u32,
    kv_used: u64,
    waiting: VecDeque<Waiter>,
    peak_waiting: u32,
    next_id: u64,
}

/// A queued call: how much room it needs, and how to wake it once it has
/// been admitted (its room is already reserved then).
#[derive(Debug)]
struct Waiter {
    id: u64,
    need: u32,
    wake: oneshot::Sender<()>,
}

/// What an engine admits calls under, read from the live config at each
/// decision (tests change it on the fly).
#[derive(Debug, Clone, Copy)]
struct Limits {
    engine: Engine,
    max_seqs: u32,
    kv_tokens: u32,
    max_queued: Option<u32>,
}

impl Limits {
    fn of(c: &SimConfig) -> Limits {
        Limits {
            engine: c.engine,
            max_seqs: c.max_concurrent,
            kv_tokens: c.kv_tokens,
            max_queued: c.max_queued,
        }
    }
}

impl Batch {
    /// Whether a call needing `need` KV-cache tokens fits beside the running
    /// ones. With nothing running anything fits, so that a call larger
    /// than the whole budget runs alone instead of waiting forever.
    fn fits(&self, need: u32, l: Limits) -> bool {
        if self.running == 0 {
            return true;
        }
        self.running < l.max_seqs
            && (!l.engine.has_kv_budget()
                || self.kv_used + u64::from(need) <= u64::from(l.kv_tokens))
    }

    fn start(&mut self, need: u32) {
        self.running += 1;
        self.kv_used += u64::from(need);
    }

    /// Admits calls from the head of the queue while they fit. Strictly
    /// FIFO: a call that does not fit holds back the smaller ones behind
    /// it, as vLLM's and SGLang's default schedulers do.
    fn admit_waiting(&mut self, l: Limits) {
        while let Some(w) = self.waiting.front() {
            if !self.fits(w.need, l) {
                break;
            }
            let w = self.waiting.pop_front().expect("a call at the head");
            self.start(w.need);
            // A waiter whose call is being dropped cannot be woken; its
            // ticket's drop finds it out of the queue and gives the room
            // back.
            let _ = w.wake.send(());
        }
    }
}

/// A call's place in an engine's batch, running or queued. Dropping it
/// (the call ended, failed, or its client left) gives the room back and
/// admits whoever waits next, so nothing leaks however a call ends.
struct Ticket {
    state: Arc<SimState>,
    id: u64,
    need: u32,
    /// `Some` while the call may still be waiting for admission.
    wake: Option<oneshot::Receiver<()>>,
}

impl Ticket {
    /// Runs the call at once if it fits and nobody waits before it, or
    /// queues it; `None` when the queue is full.
    fn take(state: &Arc<SimState>, need: u32, l: Limits) -> Option<Ticket> {
        let mut b = state.batch();
        b.next_id += 1;
        let id = b.next_id;
        let ticket = |wake| Ticket {
            state: state.clone(),
            id,
            need,
            wake,
        };
        if b.waiting.is_empty() && b.fits(need, l) {
            b.start(need);
            return Some(ticket(None));
        }
        if l.max_queued
            .is_some_and(|max| b.waiting.len() >= max as usize)
        {
            return None;
        }
        let (wake, woken) = oneshot::channel();
        b.waiting.push_back(Waiter { id, need, wake });
        b.peak_waiting = b.peak_waiting.max(b.waiting.len() as u32);
        Some(ticket(Some(woken)))
    }

    /// Waits until the call runs. Cancel-safe: a call dropped while it
    /// waits leaves the queue through the ticket's drop.
    async fn admitted(&mut self) {
        if let Some(woken) = &mut self.wake {
            // The sender goes only when it wakes us or when this ticket
            // leaves the queue, so an error cannot happen while we wait.
            let _ = woken.await;
            self.wake = None;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let limits = self.state.limits();
        let mut b = self.state.batch();
        match b.waiting.iter().position(|w| w.id == self.id) {
            Some(at) => {
                b.waiting.remove(at);
            }
            // Running, whether or not it learnt it was admitted.
            None => {
                b.running -= 1;
                b.kv_used -= u64::from(self.need);
            }
        }
        b.admit_waiting(limits);
    }
}

/// Time to first token in vLLM's buckets, seconds.
pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

#[derive(Debug, Default)]
struct TtftHistogram {
    /// Per bucket, not cumulative; what falls past the last bucket is only
    /// in `count`.
    buckets: [u64; TTFT_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl TtftHistogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = TTFT_BUCKETS.iter().position(|le| s <= *le) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += s;
    }
}

/// Why a call found no place: the simple server is full (429), or an
/// engine's queue is (503).
enum Refusal {
    AtCapacity,
    QueueFull(u32),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::AtCapacity => error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "simulated server is at capacity",
            ),
            Refusal::QueueFull(max) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                &format!("the simulated engine's queue is full ({max} calls wait)"),
            ),
        }
    }
}

/// One call's course through the server: its place (a slot, or a ticket
/// in an engine's batch), then its prefill and its tokens at the pace the
/// config and the batch set. Every API's answer, unary or streamed, runs
/// through it; dropping it gives the place back.
struct Call {
    state: Arc<SimState>,
    cfg: SimConfig,
    arrived: Instant,
    prompt_tokens: u32,
    ticket: Option<Ticket>,
    _slot: Slot,
}

impl Call {
    /// Takes a place for a call that arrived at `arrived`, with its
    /// prompt and the output it may write: reserved whole, so the engine
    /// never preempts.
    fn admit(
        s: &Arc<SimState>,
        cfg: &SimConfig,
        arrived: Instant,
        prompt_tokens: u32,
        output_tokens: u32,
    ) -> Result<Call, Refusal> {
        let call = |ticket, slot| Call {
            state: s.clone(),
            cfg: cfg.clone(),
            arrived,
            prompt_tokens,
            ticket,
            _slot: slot,
        };
        if !cfg.engine.queues() {
            let claimed = s
                .in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                    (n < cfg.max_concurrent).then_some(n + 1)
                });
            if claimed.is_err() {
                s.throttled.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::AtCapacity);
            }
            return Ok(call(None, Slot(s.clone())));
        }
        s.in_flight.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(s.clone());
        let need = prompt_tokens.saturating_add(output_tokens);
        match Ticket::take(s, need, Limits::of(cfg)) {
            Some(ticket) => Ok(call(Some(ticket), slot)),
            None => {
                s.queue_full.fetch_add(1, Ordering::Relaxed);
                Err(Refusal::QueueFull(cfg.max_queued.unwrap_or_default()))
            }
        }
    }

    /// Waits for room in the batch (engines), then for the prefill; the
    /// first token is ready when it returns.
    async fn prefill(&mut self) {
        if let Some(ticket) = &mut self.ticket {
            ticket.admitted().await;
        }
        sleep(self.cfg.ttft).await;
        let s = &self.state;
        s.prompt_tokens
            .fetch_add(u64::from(self.prompt_tokens), Ordering::Relaxed);
        lock(&s.ttft).observe(self.arrived.elapsed());
    }

    /// The gap before the next token: slower the more calls share the
    /// batch, measured now since the batch changes as calls come and go.
    fn gap(&self) -> Duration {
        let c = &self.cfg;
        if !c.engine.queues() || !c.batch_slowdown.is_finite() || c.batch_slowdown <= 0.0 {
            return c.inter_token;
        }
        let others = self.state.batch().running.saturating_sub(1);
        let factor = 1.0 + c.batch_slowdown * f64::from(others);
        Duration::try_from_secs_f64(c.inter_token.as_secs_f64() * factor).unwrap_or(Duration::MAX)
    }

    /// Produces token `i`, after the gap from the one before.
    async fn token(&self, i: u32) {
        if i > 0 {
            sleep(self.gap()).await;
        }
        self.state.tokens_predicted.fetch_add(1, Ordering::Relaxed);
    }

    /// Produces the `n` tokens of a unary answer.
    async fn tokens(&self, n: u32) {
        if self.cfg.engine.queues() {
            for i in 0..n {
                self.token(i).await;
            }
        } else {
            // The simple server's pace never changes: one sleep for all.
            sleep(self.cfg.inter_token * n.saturating_sub(1)).await;
            self.state
                .tokens_predicted
                .fetch_add(u64::from(n), Ordering::Relaxed);
        }
    }

    /// Counts the call served and gives its place back.
    fn served(self) {
        self.state.served.fetch_add(1, Ordering::Relaxed);
    }
}

pub fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(|s, b| answer(Api::Chat, s, b)))
        .route(
            "/v1/completions",
            post(|s, b| answer(Api::Completions, s, b)),
        )
        .route("/v1/embeddings", post(|s, b| answer(Api::Embeddings, s, b)))
        .route("/v1/responses", post(|s, b| answer(Api::Responses, s, b)))
        .route("/v1/messages", post(|s, b| answer(Api::Messages, s, b)))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        // Test and benchmark controls: an outage on and off, and how
        // `/metrics` answers.
        .route(
            "/admin/down",
            post(|State(s): State<Arc<SimState>>| async move {
                s.down.store(true, Ordering::Relaxed);
                "down"
            }),
        )
        .route(
            "/admin/up",
            post(|State(s): State<Arc<SimState>>| async move {
                s.down.store(false, Ordering::Relaxed);
                "up"
            }),
        )
        .route("/admin/metrics/ok", set_metrics(MetricsMode::Normal))
        .route("/admin/metrics/hang", set_metrics(MetricsMode::Hang))
        .route("/admin/metrics/garbage", set_metrics(MetricsMode::Garbage))
        .with_state(state)
}

fn set_metrics(mode: MetricsMode) -> MethodRouter<Arc<SimState>> {
    post(move |State(s): State<Arc<SimState>>| async move {
        s.set_metrics(mode);
        format!("metrics {}", mode.as_str())
    })
}

/// Serves until `shutdown` resolves, then drains calls in progress; hung
/// `/metrics` calls answer at once so that they do not hold the drain.
pub async fn serve(
    listener: TcpListener,
    state: Arc<SimState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    // Small writes (stream chunks) go out at once, not after a delayed ACK.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let stopping = state.clone();
    let shutdown = async move {
        shutdown.await;
        stopping.begin_shutdown();
    };
    let _ = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await;
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn answer(api: Api, State(s): State<Arc<SimState>>, body: Bytes) -> Response {
    let arrived = Instant::now();
    let cfg = s.snapshot();
    s.received.fetch_add(1, Ordering::Relaxed);
    if s.down.load(Ordering::Relaxed) {
        s.failed.fetch_add(1, Ordering::Relaxed);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "simulated outage",
        );
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body is not JSON",
        );
    };
    *lock(&s.last) = Some((api.path().to_string(), req.clone()));
    let model = req["model"].as_str().unwrap_or("unknown").to_string();
    let max_tokens = req["max_tokens"]
        .as_u64()
        .or_else(|| req["max_completion_tokens"].as_u64())
        .or_else(|| req["max_output_tokens"].as_u64())
        .unwrap_or(u64::MAX);
    let n = u64::from(cfg.output_tokens).min(max_tokens).max(1) as u32;
    let prompt_tokens = (body.len() / 4).max(1) as u32;
    let finish = if u64::from(cfg.output_tokens) > max_tokens {
        "length"
    } else {
        "stop"
    };
    let output_tokens = if api == Api::Embeddings { 0 } else { n };
    let mut call = match Call::admit(&s, &cfg, arrived, prompt_tokens, output_tokens) {
        Ok(call) => call,
        Err(refused) => return refused.into_response(),
    };
    if cfg.failure_rate > 0.0 && fastrand::f64() < cfg.failure_rate {
        s.failed.fetch_add(1, Ordering::Relaxed);
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "simulated failure",
        );
    }
    if cfg.garbage {
        s.served.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::OK, "<html>this is not a chat completion</html>").into_response();
    }
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n});
    let id = format!("chatcmpl-sim-{}", fastrand::u64(..));
    let stream = req["stream"].as_bool().unwrap_or(false);
    if api == Api::Embeddings {
        let inputs = req["input"].as_array().map_or(1, Vec::len);
        let data: Vec<Value> = (0..inputs)
            .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, 0.4]}))
            .collect();
        call.prefill().await;
        call.served();
        let answer = json!({"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}});
        return json_answer(answer);
    }
    let shape = Shape {
        api,
        id,
        model,
        n,
        prompt_tokens,
        finish: finish.to_string(),
    };
    let include_usage = req["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    if stream && api != Api::Chat {
        // The head goes out at once, as engines send it; a call that waits
        // in the queue waits with its stream open and empty.
        let events = async_stream(move |tx| async move {
            call.prefill().await;
            if send_all(&tx, shape.opening()).await
                && stream_tokens(&call, &tx, n, |i| shape.delta(i)).await
                && send_all(&tx, shape.closing(include_usage)).await
            {
                call.served();
            }
        });
        return event_stream(events);
    }
    if !stream && api != Api::Chat {
        call.prefill().await;
        call.tokens(n).await;
        call.served();
        return json_answer(shape.unary());
    }
    let (id, model) = (shape.id, shape.model);
    let tool = tool_to_call(&req);
    if !stream {
        call.prefill().await;
        call.tokens(n).await;
        let (message, finish) = match &tool {
            Some(name) => (
                json!({"role": "assistant", "content": null, "tool_calls": [{
                    "id": SIM_TOOL_CALL_ID, "type": "function",
                    "function": {"name": name, "arguments": SIM_TOOL_ARGUMENTS},
                }]}),
                "tool_calls",
            ),
            None => {
                let text: String = (0..n).map(token).collect();
                (json!({"role": "assistant", "content": text}), finish)
            }
        };
        let answer = json!({
            "id": id, "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage,
        });
        call.served();
        return json_answer(answer);
    }
    let chunk = move |delta: Value, finish: Option<&str>| {
        let c = json!({
            "id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        Bytes::from(format!("data: {c}\n\n"))
    };
    let events = async_stream(move |tx| async move {
        call.prefill().await;
        if let Some(name) = tool {
            // The call's id and name first, then its arguments in two
            // pieces, as engines stream them.
            let (a, b) = SIM_TOOL_ARGUMENTS.split_at(5);
            let piece = |p: Value| json!({"tool_calls": [p]});
            let mut first = piece(
                json!({"index": 0, "id": SIM_TOOL_CALL_ID, "type": "function",
                "function": {"name": name, "arguments": ""}}),
            );
            first["role"] = json!("assistant");
            let deltas = [
                first,
                piece(json!({"index": 0, "function": {"arguments": a}})),
                piece(json!({"index": 0, "function": {"arguments": b}})),
            ];
            if !send_all(&tx, deltas.map(|d| chunk(d, None))).await {
                return;
            }
            let _ = tx.send(Ok(chunk(json!({}), Some("tool_calls")))).await;
        } else {
            let delta = |i: u32| {
                let d = if i == 0 {
                    json!({"role": "assistant", "content": token(i)})
                } else {
                    json!({"content": token(i)})
                };
                chunk(d, None)
            };
            if !stream_tokens(&call, &tx, n, delta).await {
                return;
            }
            let _ = tx.send(Ok(chunk(json!({}), Some(finish)))).await;
        }
        if include_usage {
            let u = json!({"id": "usage", "object": "chat.completion.chunk", "choices": [], "usage": usage});
            let _ = tx.send(Ok(Bytes::from(format!("data: {u}\n\n")))).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        call.served();
    });
    event_stream(events)
}

type Events = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Streams tokens `0..n`, each as `delta` writes it, at the call's pace,
/// and breaks the stream off at the configured token. False when the
/// stream ended early (a break, or the client left).
async fn stream_tokens(call: &Call, tx: &Events, n: u32, delta: impl Fn(u32) -> Bytes) -> bool {
    for i in 0..n {
        call.token(i).await;
        if call.cfg.break_after == Some(i) {
            // Let what was sent reach the wire, then break off.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(Err(std::io::Error::other("simulated break"))).await;
            return false;
        }
        if tx.send(Ok(delta(i))).await.is_err() {
            return false;
        }
    }
    true
}

/// Sends `events` in order; false when the client left.
async fn send_all(tx: &Events, events: impl IntoIterator<Item = Bytes>) -> bool {
    for e in events {
        if tx.send(Ok(e)).await.is_err() {
            return false;
        }
    }
    true
}

fn event_stream(
    events: impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
) -> Response {
    let mut r = Response::new(Body::from_stream(events));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
}

fn json_answer(answer: Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        answer.to_string(),
    )
        .into_response()
}

/// What an answer of the APIs other than chat looks like, unary and
/// streamed, in each API's own shapes.
struct Shape {
    api: Api,
    id: String,
    model: String,
    n: u32,
    prompt_tokens: u32,
    finish: String,
}

/// One server-sent event, named (Responses, Messages) or not.
fn sse(name: Option<&str>, data: &Value) -> Bytes {
    match name {
        Some(n) => Bytes::from(format!("event: {n}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}

impl Shape {
    fn text(&self) -> String {
        (0..self.n).map(token).collect()
    }

    fn anthropic_stop(&self) -> &'static str {
        if self.finish == "length" {
            "max_tokens"
        } else {
            "end_turn"
        }
    }

    fn response(&self, status: &str, text: &str, usage: bool) -> Value {
        let mut r = json!({
            "id": self.id, "object": "response", "created_at": 0, "status": status,
            "model": self.model,
            "output": [{"type": "message", "id": "msg_sim", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        });
        if usage {
            r["usage"] = json!({"input_tokens": self.prompt_tokens, "output_tokens": self.n,
                "total_tokens": self.prompt_tokens + self.n,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0}});
        }
        r
    }

    fn unary(&self) -> Value {
        let (p, n) = (self.prompt_tokens, self.n);
        match self.api {
            Api::Completions => json!({
                "id": self.id, "object": "text_completion", "created": 0, "model": self.model,
                "choices": [{"index": 0, "text": self.text(), "finish_reason": self.finish}],
                "usage": {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n},
            }),
            Api::Responses => self.response("completed", &self.text(), true),
            Api::Messages => json!({
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [{"type": "text", "text": self.text()}],
                "stop_reason": self.anthropic_stop(), "stop_sequence": null,
                "usage": {"input_tokens": p, "output_tokens": n},
            }),
            Api::Chat | Api::Embeddings => unreachable!("answered elsewhere"),
        }
    }

    fn opening(&self) -> Vec<Bytes> {
        match self.api {
            Api::Responses => vec![sse(
                Some("response.created"),
                &json!({"type": "response.created", "sequence_number": 0,
                    "response": self.response("in_progress", "", false)}),
            )],
            Api::Messages => vec![
                sse(
                    Some("message_start"),
                    &json!({"type": "message_start", "message": {"id": self.id, "type": "message",
                        "role": "assistant", "model": self.model, "content": [], "stop_reason": null,
                        "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 1}}}),
                ),
                sse(
                    Some("content_block_start"),
                    &json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}),
                ),
            ],
            _ => Vec::new(),
        }
    }

    fn delta(&self, i: u32) -> Bytes {
        match self.api {
            Api::Completions => sse(
                None,
                &json!({"id": self.id, "object": "text_completion", "created": 0, "model": self.model,
                    "choices": [{"index": 0, "text": token(i), "finish_reason": null}]}),
            ),
            Api::Responses => sse(
                Some("response.output_text.delta"),
                &json!({"type": "response.output_text.delta", "sequence_number": i + 1,
                    "item_id": "msg_sim", "output_index": 0, "content_index": 0, "delta": token(i)}),
            ),
            Api::Messages => sse(
                Some("content_block_delta"),
                &json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": token(i)}}),
            ),
            Api::Chat | Api::Embeddings => unreachable!("answered elsewhere"),
        }
    }

    fn closing(&self, include_usage: bool) -> Vec<Bytes> {
        let (p, n) = (self.prompt_tokens, self.n);
        match self.api {
            Api::Completions => {
                let mut out = vec![sse(
                    None,
                    &json!({"id": self.id, "object": "text_completion", "created": 0,
                        "model": self.model, "choices": [{"index": 0, "text": "", "finish_reason": self.finish}]}),
                )];
                if include_usage {
                    out.push(sse(
                        None,
                        &json!({"id": self.id, "object": "text_completion", "created": 0,
                            "model": self.model, "choices": [],
                            "usage": {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}}),
                    ));
                }
                out.push(Bytes::from_static(b"data: [DONE]\n\n"));
                out
            }
            Api::Responses => vec![sse(
                Some("response.completed"),
                &json!({"type": "response.completed", "sequence_number": self.n + 1,
                    "response": self.response("completed", &self.text(), true)}),
            )],
            Api::Messages => vec![
                sse(
                    Some("content_block_stop"),
                    &json!({"type": "content_block_stop", "index": 0}),
                ),
                sse(
                    Some("message_delta"),
                    &json!({"type": "message_delta",
                        "delta": {"stop_reason": self.anthropic_stop(), "stop_sequence": null},
                        "usage": {"output_tokens": n}}),
                ),
                sse(Some("message_stop"), &json!({"type": "message_stop"})),
            ],
            Api::Chat | Api::Embeddings => unreachable!("answered elsewhere"),
        }
    }
}

/// The id of the tool call a chat answer makes when it is offered tools.
pub const SIM_TOOL_CALL_ID: &str = "call_sim_1";
/// The arguments of that call.
pub const SIM_TOOL_ARGUMENTS: &str = r#"{"q":"tok0"}"#;

/// The tool a chat request should call: its first tool, when it offers
/// tools and the user spoke last. After a tool's answer (a `tool` message
/// last), the model answers in text.
fn tool_to_call(req: &Value) -> Option<String> {
    let first = req["tools"].as_array()?.first()?;
    let last = req["messages"].as_array()?.last()?;
    (last["role"] == "user").then(|| {
        first["function"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    })
}

/// Token `i` of every answer: "tok0 ", "tok1 ", ... so that tests can check
/// order and completeness.
pub fn token(i: u32) -> String {
    format!("tok{i} ")
}

async fn sleep(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// A stream fed by a task through a small channel; an `Err` item aborts
/// the response mid-body. The task ends as soon as the client leaves (the
/// stream is dropped), even while it waits in the queue or between tokens,
/// so that its call gives its place back at once.
fn async_stream<F, Fut>(
    produce: F,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>>
where
    F: FnOnce(Events) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(8);
    let left = tx.clone();
    let task = produce(tx);
    tokio::spawn(async move {
        tokio::select! {
            () = task => {}
            () = left.closed() => {}
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// `text/plain; version=0.0.4`: the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What `/metrics` answers in [`MetricsMode::Garbage`]: an HTML error page
/// and bytes that are not even UTF-8.
const GARBAGE_METRICS: &[u8] = b"<html>oops</html>\n\x00\x01\xff\xfe\x89PNG\r\n\x1a\n{{{ }\n";

async fn metrics(State(s): State<Arc<SimState>>) -> Response {
    let Some(mode) = metrics_mode_after_hang(&s).await else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the simulator is stopping",
        );
    };
    s.metrics_served.fetch_add(1, Ordering::Relaxed);
    if mode == MetricsMode::Garbage {
        return (
            [(header::CONTENT_TYPE, "text/html")],
            Bytes::from_static(GARBAGE_METRICS),
        )
            .into_response();
    }
    let cfg = s.snapshot();
    let page = match cfg.engine {
        Engine::Simple => simple_metrics(&s),
        Engine::Vllm => vllm_metrics(&s, &cfg),
        Engine::Sglang => sglang_metrics(&s, &cfg),
        Engine::Llamacpp => llamacpp_metrics(&s, &cfg),
    };
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], page).into_response()
}

/// Waits while `/metrics` hangs; then the mode to answer in, or `None`
/// when the simulator stops.
async fn metrics_mode_after_hang(s: &SimState) -> Option<MetricsMode> {
    let mut hanging = None;
    loop {
        // Registered before the mode is read, so that a change between the
        // read and the wait still wakes us.
        let changed = s.metrics_changed.notified();
        let mut changed = std::pin::pin!(changed);
        changed.as_mut().enable();
        if s.stopping.load(Ordering::Relaxed) {
            return None;
        }
        let mode = s.metrics_mode();
        if mode != MetricsMode::Hang {
            return Some(mode);
        }
        hanging.get_or_insert_with(|| Counted::new(&s.metrics_hanging));
        changed.await;
    }
}

/// Counts in a gauge while alive.
struct Counted<'a>(&'a AtomicU32);

impl<'a> Counted<'a> {
    fn new(gauge: &'a AtomicU32) -> Counted<'a> {
        gauge.fetch_add(1, Ordering::Relaxed);
        Counted(gauge)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn simple_metrics(s: &SimState) -> String {
    format!(
        "# TYPE spillway_sim_requests_total counter\n\
         spillway_sim_requests_total{{outcome=\"served\"}} {}\n\
         spillway_sim_requests_total{{outcome=\"throttled\"}} {}\n\
         spillway_sim_requests_total{{outcome=\"failed\"}} {}\n\
         # TYPE spillway_sim_in_flight gauge\n\
         spillway_sim_in_flight {}\n",
        s.served.load(Ordering::Relaxed),
        s.throttled.load(Ordering::Relaxed),
        s.failed.load(Ordering::Relaxed),
        s.in_flight.load(Ordering::Relaxed),
    )
}

/// What the engines' own figures are at one scrape.
struct Figures {
    running: u32,
    waiting: u32,
    kv_used: u64,
    kv_usage: f64,
}

impl Figures {
    fn of(s: &SimState) -> Figures {
        let kv_usage = s.kv_usage();
        let b = s.batch();
        Figures {
            running: b.running,
            waiting: b.waiting.len() as u32,
            kv_used: b.kv_used,
            kv_usage,
        }
    }
}

/// vLLM's page, as prometheus_client writes it: the Python process's
/// families first, then the engine's, labelled with the engine index and
/// the model.
fn vllm_metrics(s: &SimState, cfg: &SimConfig) -> String {
    let f = Figures::of(s);
    let mut p = Page::default();
    p.python_noise();
    let labels = [("engine", "0"), ("model_name", cfg.model_name.as_str())];
    p.family(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
    );
    p.sample(
        "vllm:num_requests_running",
        &labels,
        &py_float(f64::from(f.running)),
    );
    p.family(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
    );
    p.sample(
        "vllm:num_requests_waiting",
        &labels,
        &py_float(f64::from(f.waiting)),
    );
    p.family(
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
    );
    p.sample("vllm:kv_cache_usage_perc", &labels, &py_float(f.kv_usage));
    // This simulator reserves every call's output up front, so it never
    // preempts; the family is there because vLLM always writes it. Its
    // HELP and TYPE name the family without `_total`, as older
    // prometheus_client releases wrote them (SGLang's page below has the
    // newer form).
    p.family(
        "vllm:num_preemptions",
        "counter",
        "Cumulative number of preemption from the engine.",
    );
    p.sample("vllm:num_preemptions_total", &labels, "0.0");
    p.family(
        "vllm:num_preemptions_created",
        "gauge",
        "Cumulative number of preemption from the engine.",
    );
    p.sample("vllm:num_preemptions_created", &labels, "1.72e+09");
    p.histogram(
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &labels,
        &lock(&s.ttft),
    );
    let blocks = (cfg.kv_tokens / 16).to_string();
    p.family(
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig",
    );
    p.sample(
        "vllm:cache_config_info",
        &[
            ("block_size", "16"),
            ("cache_dtype", "auto"),
            ("enable_prefix_caching", "True"),
            ("gpu_memory_utilization", "0.9"),
            ("num_cpu_blocks", "None"),
            ("num_gpu_blocks", &blocks),
            ("sliding_window", "None"),
        ],
        "1.0",
    );
    p.0
}

/// SGLang's page: prometheus_client too, labelled with the model only.
fn sglang_metrics(s: &SimState, cfg: &SimConfig) -> String {
    let f = Figures::of(s);
    let mut p = Page::default();
    p.python_noise();
    let labels = [("model_name", cfg.model_name.as_str())];
    let gauges = [
        (
            "sglang:num_running_reqs",
            "The number of running requests.",
            f64::from(f.running),
        ),
        (
            "sglang:num_used_tokens",
            "The number of used tokens.",
            f.kv_used as f64,
        ),
        ("sglang:token_usage", "The token usage.", f.kv_usage),
        (
            "sglang:num_queue_reqs",
            "The number of requests in the waiting queue.",
            f64::from(f.waiting),
        ),
        ("sglang:cache_hit_rate", "The prefix cache hit rate.", 0.0),
    ];
    for (name, help, v) in gauges {
        p.family(name, "gauge", help);
        p.sample(name, &labels, &py_float(v));
    }
    let prompt = s.prompt_tokens.load(Ordering::Relaxed) as f64;
    p.family(
        "sglang:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
    );
    p.sample("sglang:prompt_tokens_total", &labels, &py_float(prompt));
    p.histogram(
        "sglang:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &labels,
        &lock(&s.ttft),
    );
    p.0
}

/// llama.cpp's server page: written by hand in C++, no labels, numbers as
/// a C++ stream writes a double.
fn llamacpp_metrics(s: &SimState, cfg: &SimConfig) -> String {
    let f = Figures::of(s);
    let prompt = s.prompt_tokens.load(Ordering::Relaxed) as f64;
    let predicted = s.tokens_predicted.load(Ordering::Relaxed) as f64;
    let per_second = if cfg.inter_token.is_zero() {
        0.0
    } else {
        1.0 / cfg.inter_token.as_secs_f64()
    };
    let families = [
        (
            "prompt_tokens_total",
            "counter",
            "Number of prompt tokens processed.",
            prompt,
        ),
        (
            "prompt_seconds_total",
            "counter",
            "Prompt process time",
            0.0,
        ),
        (
            "tokens_predicted_total",
            "counter",
            "Number of generation tokens processed.",
            predicted,
        ),
        (
            "n_decode_total",
            "counter",
            "Total number of llama_decode() calls",
            predicted,
        ),
        (
            "predicted_tokens_seconds",
            "gauge",
            "Average generation throughput in tokens/s.",
            per_second,
        ),
        (
            "requests_processing",
            "gauge",
            "Number of requests processing.",
            f64::from(f.running),
        ),
        (
            "requests_deferred",
            "gauge",
            "Number of requests deferred.",
            f64::from(f.waiting),
        ),
    ];
    let mut p = Page::default();
    for (name, kind, help, v) in families {
        let name = format!("llamacpp:{name}");
        p.family(&name, kind, help);
        p.sample(&name, &[], &cpp_float(v));
    }
    p.0
}

/// A page of Prometheus text being written.
#[derive(Default)]
struct Page(String);

impl Page {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v
                    .replace('\\', r"\\")
                    .replace('"', "\\\"")
                    .replace('\n', r"\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// A histogram as prometheus_client writes it: cumulative buckets with
    /// `le` among the labels in name order, then `_count` and `_sum`, then
    /// its creation time as a gauge of its own.
    fn histogram(&mut self, name: &str, help: &str, labels: &[(&str, &str)], h: &TtftHistogram) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut write_bucket = |le: &str, count: u64| {
            let mut with_le = labels.to_vec();
            with_le.push(("le", le));
            with_le.sort_by_key(|(k, _)| *k);
            self.sample(&bucket, &with_le, &py_float(count as f64));
        };
        let mut cumulative = 0;
        for (le, n) in TTFT_BUCKETS.iter().zip(h.buckets) {
            cumulative += n;
            write_bucket(&py_float(*le), cumulative);
        }
        write_bucket("+Inf", h.count);
        self.sample(&format!("{name}_count"), labels, &py_float(h.count as f64));
        self.sample(&format!("{name}_sum"), labels, &py_float(h.sum));
        let created = format!("{name}_created");
        self.family(&created, "gauge", help);
        self.sample(&created, labels, "1.72e+09");
    }

    /// The Python process's families, which every prometheus_client page
    /// starts with.
    fn python_noise(&mut self) {
        self.family(
            "python_gc_objects_collected_total",
            "counter",
            "Objects collected during gc",
        );
        for (generation, n) in [("0", "123.0"), ("1", "45.0"), ("2", "0.0")] {
            self.sample(
                "python_gc_objects_collected_total",
                &[("generation", generation)],
                n,
            );
        }
        self.family("python_info", "gauge", "Python platform information");
        self.sample(
            "python_info",
            &[
                ("implementation", "CPython"),
                ("major", "3"),
                ("minor", "12"),
                ("patchlevel", "3"),
                ("version", "3.12.3"),
            ],
            "1.0",
        );
        self.family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
        );
        self.sample("process_resident_memory_bytes", &[], "1.2e+08");
        self.family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
        );
        self.sample("process_open_fds", &[], "57.0");
    }
}

/// A float as prometheus_client writes it (its `floatToGoString`): Python's
/// `repr`, with an exponent for large numbers where Go would use one.
fn py_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    let s = python_repr(v);
    match s.find('.') {
        Some(dot) if v > 0.0 && dot > 6 => {
            let mantissa = format!("{}.{}", &s[..1], &s[1..dot]);
            format!("{}e+0{}", mantissa.trim_end_matches(['0', '.']), dot - 1)
        }
        _ => s,
    }
}

/// Python's `repr` of a finite float: the shortest digits that read back
/// the same, always with a `.0` or an exponent, the exponent from 1e16 and
/// below 1e-4.
fn python_repr(v: f64) -> String {
    if v == 0.0 {
        return if v.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let scientific = format!("{v:e}");
    let (mantissa, exp) = scientific.split_once('e').expect("an exponent in `{:e}`");
    let exp: i32 = exp.parse().expect("an integer exponent");
    if (-4..16).contains(&exp) {
        let plain = v.to_string();
        if plain.contains('.') {
            plain
        } else {
            plain + ".0"
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// A float as a C++ `std::ostream` writes it by default (`%g`): six
/// significant digits, no trailing zeros, an exponent from 1e6 and below
/// 1e-4.
fn cpp_float(v: f64) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "nan"
        } else if v > 0.0 {
            "inf"
        } else {
            "-inf"
        }
        .into();
    }
    if v == 0.0 {
        return "0".into();
    }
    let rounded = format!("{v:.5e}");
    let (mantissa, exp) = rounded.split_once('e').expect("an exponent in `{:e}`");
    let exp: i32 = exp.parse().expect("an integer exponent");
    let trim = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if (-4..6).contains(&exp) {
        trim(&format!("{v:.*}", (5 - exp) as usize))
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use spillway_agent::upstream::engine::{self, EngineKind};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::cluster::{Http, Streaming};
    use crate::wait_until;

    const LONG: Duration = Duration::from_secs(10);

    /// A simulator served on a loopback port, stopped through its shutdown
    /// future.
    struct Sim {
        addr: SocketAddr,
        state: Arc<SimState>,
        stop: Option<oneshot::Sender<()>>,
        served: JoinHandle<()>,
        http: Http,
    }

    impl Sim {
        async fn start(config: SimConfig) -> Sim {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let state = SimState::new(config);
            let (stop, stopped) = oneshot::channel::<()>();
            let served = tokio::spawn(serve(listener, state.clone(), async move {
                let _ = stopped.await;
            }));
            Sim {
                addr,
                state,
                stop: Some(stop),
                served,
                http: Http::default(),
            }
        }

        /// A streaming chat call, returned once its head has come.
        async fn stream(&self, body: &str) -> Streaming {
            let answer = self
                .http
                .post_streaming(self.addr, "/v1/chat/completions", body.to_string())
                .await;
            assert_eq!(answer.status, 200);
            answer
        }

        async fn metrics(&self) -> String {
            let page = self.http.get(self.addr, "/metrics").await;
            assert_eq!(page.status, 200, "{}", page.text());
            page.text()
        }

        /// Waits until `running` calls run and `waiting` wait.
        async fn until(&self, running: u32, waiting: u32) {
            let what = format!("{running} running and {waiting} waiting");
            wait_until(&what, LONG, || async {
                self.state.running() == running && self.state.waiting() == waiting
            })
            .await;
        }
    }

    /// A streaming chat body asking for `max_tokens`.
    fn body(max_tokens: u32) -> String {
        json!({
            "model": "m",
            "messages": [{"role": "user", "content": "How far is the moon?"}],
            "stream": true,
            "max_tokens": max_tokens,
        })
        .to_string()
    }

    /// The KV-cache tokens `body` takes when it writes `output` tokens.
    fn need(body: &str, output: u32) -> u32 {
        (body.len() as u32 / 4).max(1) + output
    }

    /// Reads a stream to its end in a task; its text.
    fn read_all(mut answer: Streaming) -> JoinHandle<String> {
        tokio::spawn(async move {
            let mut text = Vec::new();
            while let Some(piece) = answer.next().await {
                text.extend_from_slice(&piece.expect("an unbroken stream"));
            }
            String::from_utf8(text).expect("UTF-8 events")
        })
    }

    async fn complete(readers: Vec<JoinHandle<String>>, last_token: u32) {
        for r in readers {
            let text = r.await.unwrap();
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
            assert!(text.contains(&token(last_token)), "{text}");
        }
    }

    /// The value of the sample `name{labels}` on a page.
    fn value(page: &str, sample: &str) -> f64 {
        page.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no `{sample}` in:\n{page}"))
            .parse()
            .unwrap()
    }

    fn figures(page: &str, kind: EngineKind) -> engine::Figures {
        match engine::read(page.as_bytes(), None) {
            engine::Page::Engine(k, f) if k == kind => f,
            other => panic!("not {kind}'s metrics: {other:?}\n{page}"),
        }
    }

    /// Six calls where the KV cache holds three: three run, three wait,
    /// none is refused, all complete; the metrics agree with the state and
    /// count six first tokens, the queued three's after a second.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vllm_batches_under_the_kv_budget_and_queues_the_rest() {
        let body = body(10);
        let need = need(&body, 10);
        let sim = Sim::start(SimConfig {
            engine: Engine::Vllm,
            inter_token: Duration::from_millis(200),
            output_tokens: 10,
            kv_tokens: 3 * need + need / 2,
            model_name: "m".into(),
            ..SimConfig::default()
        })
        .await;
        let mut readers = Vec::new();
        for _ in 0..6 {
            readers.push(read_all(sim.stream(&body).await));
        }
        sim.until(3, 3).await;
        let kv = f64::from(3 * need) / f64::from(3 * need + need / 2);
        assert!((sim.state.kv_usage() - kv).abs() < 1e-9);
        assert_eq!(sim.state.in_flight.load(Ordering::Relaxed), 6);

        // The first wave runs for nearly two seconds: the page is taken
        // within it.
        let page = sim.metrics().await;
        let labels = r#"{engine="0",model_name="m"}"#;
        assert_eq!(
            value(&page, &format!("vllm:num_requests_running{labels}")),
            3.0
        );
        assert_eq!(
            value(&page, &format!("vllm:num_requests_waiting{labels}")),
            3.0
        );
        let kv_page = value(&page, &format!("vllm:kv_cache_usage_perc{labels}"));
        assert!((kv_page - kv).abs() < 1e-9, "{kv_page} != {kv}");
        assert_eq!(
            value(&page, &format!("vllm:num_preemptions_total{labels}")),
            0.0
        );
        let blocks = format!("num_gpu_blocks=\"{}\"", (3 * need + need / 2) / 16);
        assert!(page.contains(&blocks), "{page}");
        assert!(
            page.contains("process_resident_memory_bytes 1.2e+08\n"),
            "{page}"
        );
        // The agent's reader sees the same.
        let f = figures(&page, EngineKind::Vllm);
        assert_eq!((f.running, f.waiting), (3.0, 3.0));
        assert!(f.kv_usage.is_some_and(|k| (k - kv).abs() < 1e-9));
        assert_eq!((sim.state.running(), sim.state.waiting()), (3, 3));

        complete(readers, 9).await;
        sim.until(0, 0).await;
        assert_eq!(sim.state.kv_usage(), 0.0);
        assert_eq!(sim.state.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(sim.state.peak_waiting(), 3);
        sim.state.reset_peak_waiting();
        assert_eq!(sim.state.peak_waiting(), 0);
        assert_eq!(sim.state.throttled.load(Ordering::Relaxed), 0);
        assert_eq!(sim.state.served(), 6);

        let page = sim.metrics().await;
        let ttft = "vllm:time_to_first_token_seconds";
        assert_eq!(value(&page, &format!("{ttft}_count{labels}")), 6.0);
        let bucket =
            |le: &str| format!("{ttft}_bucket{{engine=\"0\",le=\"{le}\",model_name=\"m\"}}");
        assert_eq!(value(&page, &bucket("+Inf")), 6.0);
        // The queued three waited for nine gaps of the first wave.
        assert_eq!(value(&page, &bucket("1.0")), 3.0);
        assert!(value(&page, &format!("{ttft}_sum{labels}")) > 3.0);
        assert_eq!(figures(&page, EngineKind::Vllm).ttft.total(), 6.0);
    }

    /// Strict FIFO: a small call that would fit waits behind a larger one
    /// that does not, and the larger one runs first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_queue_is_first_in_first_out() {
        let (a, b, c) = (body(30), body(40), body(5));
        let budget = need(&a, 30) + need(&c, 5);
        assert!(need(&b, 40) <= budget && need(&b, 40) + need(&c, 5) > budget);
        let sim = Sim::start(SimConfig {
            engine: Engine::Vllm,
            inter_token: Duration::from_millis(50),
            output_tokens: 40,
            kv_tokens: budget,
            ..SimConfig::default()
        })
        .await;
        let a = read_all(sim.stream(&a).await);
        let mut b = sim.stream(&b).await;
        let c = read_all(sim.stream(&c).await);
        // C fits beside A but waits behind B.
        sim.until(1, 2).await;
        a.await.unwrap();
        // A gone: B runs (its first token comes), C still waits.
        let first = b.next().await.expect("B's first token").unwrap();
        assert!(String::from_utf8_lossy(&first).contains("tok0"));
        assert_eq!((sim.state.running(), sim.state.waiting()), (1, 1));
        let b = read_all(b);
        complete(vec![b, c], 4).await;
        sim.until(0, 0).await;
    }

    /// Past `max_queued` waiting calls, 503 in OpenAI's error shape.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_answers_503() {
        let sim = Sim::start(SimConfig {
            engine: Engine::Vllm,
            inter_token: Duration::from_millis(100),
            output_tokens: 20,
            max_concurrent: 1,
            max_queued: Some(1),
            ..SimConfig::default()
        })
        .await;
        let body = body(20);
        let running = read_all(sim.stream(&body).await);
        let waiting = read_all(sim.stream(&body).await);
        sim.until(1, 1).await;
        let refused = sim
            .http
            .post(
                sim.addr,
                "/v1/chat/completions",
                crate::cluster::chat("m", false),
            )
            .await;
        assert_eq!(refused.status, 503);
        assert_eq!(refused.json()["error"]["type"], "server_error");
        assert_eq!(sim.state.queue_full.load(Ordering::Relaxed), 1);
        complete(vec![running, waiting], 19).await;
        let later = sim
            .http
            .post(
                sim.addr,
                "/v1/chat/completions",
                crate::cluster::chat("m", false),
            )
            .await;
        assert_eq!(later.status, 200, "{}", later.text());
    }

    /// Clients that leave, mid-stream or while queued (streamed or unary),
    /// give their room back long before their calls would have ended.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_that_leave_release_their_room() {
        let sim = Sim::start(SimConfig {
            engine: Engine::Vllm,
            inter_token: Duration::from_millis(100),
            output_tokens: 200,
            max_concurrent: 1,
            ..SimConfig::default()
        })
        .await;
        // A call 20 s long, left after its first token.
        let mut left = sim.stream(&body(200)).await;
        left.next().await.expect("a first token").unwrap();
        sim.until(1, 0).await;
        assert!(sim.state.kv_usage() > 0.0);
        drop(left);
        sim.until(0, 0).await;
        assert_eq!(sim.state.kv_usage(), 0.0);

        // One runs; a stream and a unary call wait, then leave.
        let runs = sim.stream(&body(200)).await;
        let queued = sim.stream(&body(200)).await;
        let http = sim.http.clone();
        let addr = sim.addr;
        let unary = tokio::spawn(async move {
            http.post(
                addr,
                "/v1/chat/completions",
                crate::cluster::chat("m", false),
            )
            .await
        });
        sim.until(1, 2).await;
        drop(queued);
        unary.abort();
        sim.until(1, 0).await;
        drop(runs);
        sim.until(0, 0).await;
        assert_eq!(sim.state.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(sim.state.served(), 0);
    }

    /// llama.cpp: fixed slots, the rest deferred, never refused; its page
    /// has no labels and C++ numbers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn llamacpp_defers_past_its_slots() {
        let sim = Sim::start(SimConfig {
            engine: Engine::Llamacpp,
            inter_token: Duration::from_millis(200),
            output_tokens: 10,
            max_concurrent: 2,
            // No KV budget in llama.cpp: a tiny one changes nothing.
            kv_tokens: 1,
            ..SimConfig::default()
        })
        .await;
        let body = body(10);
        let mut readers = Vec::new();
        for _ in 0..4 {
            readers.push(read_all(sim.stream(&body).await));
        }
        sim.until(2, 2).await;
        let page = sim.metrics().await;
        assert_eq!(value(&page, "llamacpp:requests_processing"), 2.0);
        assert_eq!(value(&page, "llamacpp:requests_deferred"), 2.0);
        assert!(page.contains("llamacpp:requests_processing 2\n"), "{page}");
        let f = figures(&page, EngineKind::Llamacpp);
        assert_eq!((f.running, f.waiting), (2.0, 2.0));
        assert_eq!(sim.state.kv_usage(), 0.0);
        // More slots take the deferred calls at once.
        sim.state.set(|c| c.max_concurrent = 4);
        assert_eq!((sim.state.running(), sim.state.waiting()), (4, 0));
        complete(readers, 9).await;
        sim.until(0, 0).await;
        let page = sim.metrics().await;
        assert_eq!(value(&page, "llamacpp:tokens_predicted_total"), 40.0);
        let prompt = f64::from(need(&body, 0) * 4);
        assert_eq!(value(&page, "llamacpp:prompt_tokens_total"), prompt);
        assert_eq!(sim.state.throttled.load(Ordering::Relaxed), 0);
    }

    /// SGLang's dialect, read by the agent's reader.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sglang_writes_its_own_families() {
        let body = body(10);
        let sim = Sim::start(SimConfig {
            engine: Engine::Sglang,
            inter_token: Duration::from_millis(200),
            output_tokens: 10,
            kv_tokens: need(&body, 10),
            model_name: "m".into(),
            ..SimConfig::default()
        })
        .await;
        let readers = vec![
            read_all(sim.stream(&body).await),
            read_all(sim.stream(&body).await),
        ];
        sim.until(1, 1).await;
        let page = sim.metrics().await;
        assert_eq!(value(&page, r#"sglang:token_usage{model_name="m"}"#), 1.0);
        let f = figures(&page, EngineKind::Sglang);
        assert_eq!((f.running, f.waiting, f.kv_usage), (1.0, 1.0, Some(1.0)));
        complete(readers, 9).await;
        let page = sim.metrics().await;
        let count = r#"sglang:time_to_first_token_seconds_count{model_name="m"}"#;
        assert_eq!(value(&page, count), 2.0);
    }

    /// Garbage, then a hang that the mode's return ends, then a hang that
    /// the simulator's stop ends without waiting on it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_garbage_and_hang() {
        let mut sim = Sim::start(SimConfig {
            engine: Engine::Vllm,
            ..SimConfig::default()
        })
        .await;
        sim.state.set_metrics(MetricsMode::Garbage);
        let page = sim.http.get(sim.addr, "/metrics").await;
        assert_eq!(page.status, 200);
        assert!(matches!(
            engine::read(&page.body, None),
            engine::Page::Garbage(_)
        ));
        assert_eq!(sim.state.metrics_served(), 1);

        // Through the admin route, as the binary is driven.
        let set = sim.http.post(sim.addr, "/admin/metrics/hang", "").await;
        assert_eq!(set.status, 200);
        assert_eq!(sim.state.metrics_mode(), MetricsMode::Hang);
        let scrape = |sim: &Sim| {
            let (http, addr) = (sim.http.clone(), sim.addr);
            tokio::spawn(async move { http.get(addr, "/metrics").await })
        };
        let hung = scrape(&sim);
        wait_until("a hung scrape", LONG, || async {
            sim.state.metrics_hanging() == 1
        })
        .await;
        assert!(!hung.is_finished());
        let set = sim.http.post(sim.addr, "/admin/metrics/ok", "").await;
        assert_eq!(set.status, 200);
        let page = tokio::time::timeout(LONG, hung).await.unwrap().unwrap();
        assert_eq!(page.status, 200);
        assert!(page.text().contains("vllm:num_requests_running{"));
        assert_eq!(sim.state.metrics_served(), 2);

        sim.state.set_metrics(MetricsMode::Hang);
        let hung = scrape(&sim);
        wait_until("a hung scrape", LONG, || async {
            sim.state.metrics_hanging() == 1
        })
        .await;
        let _ = sim.stop.take().unwrap().send(());
        tokio::time::timeout(LONG, &mut sim.served)
            .await
            .expect("the simulator stops though a scrape hangs")
            .unwrap();
        let page = tokio::time::timeout(LONG, hung).await.unwrap().unwrap();
        assert_eq!(page.status, 503);
        assert_eq!(sim.state.metrics_hanging(), 0);
    }

    #[test]
    fn floats_as_their_exporters_write_them() {
        for (v, python) in [
            (3.0, "3.0"),
            (0.0, "0.0"),
            (0.25, "0.25"),
            (0.001, "0.001"),
            (2560.0, "2560.0"),
            (123456.0, "123456.0"),
            (1.2e8, "1.2e+08"),
            (1.72e9, "1.72e+09"),
            (1e-5, "1e-05"),
            (0.1 + 0.2, "0.30000000000000004"),
            (f64::INFINITY, "+Inf"),
        ] {
            assert_eq!(py_float(v), python, "{v}");
        }
        for (v, cpp) in [
            (2.0, "2"),
            (0.0, "0"),
            (0.5, "0.5"),
            (31.25, "31.25"),
            (123456.0, "123456"),
            (1234567.0, "1.23457e+06"),
            (0.00001, "1e-05"),
            (1.0 / 3.0, "0.333333"),
        ] {
            assert_eq!(cpp_float(v), cpp, "{v}");
        }
    }

    #[test]
    fn engines_by_name() {
        for e in Engine::ALL {
            assert_eq!(e.to_string().parse::<Engine>(), Ok(e));
        }
        assert_eq!(
            "tgi".parse::<Engine>(),
            Err("unknown engine `tgi`: one of simple, vllm, sglang, llamacpp".into())
        );
    }
}
