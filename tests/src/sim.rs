//! A model-server simulator: OpenAI-compatible chat completions (unary and
//! server-sent events) with a configurable time to first token, inter-token
//! latency, output length, concurrency limit (429 beyond it), injected
//! failure rate and garbage answers; `/health` and `/metrics`. Tests run it
//! in process and change its behaviour on the fly; the demo and the
//! benchmark run the `spillway-sim` binary.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// How the simulated model server behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub ttft: Duration,
    pub inter_token: Duration,
    /// Tokens per answer (capped by the request's max_tokens).
    pub output_tokens: u32,
    /// Concurrent sequences; more get 429.
    pub max_concurrent: u32,
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
            ttft: Duration::ZERO,
            inter_token: Duration::ZERO,
            output_tokens: 16,
            max_concurrent: 64,
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
    /// Chat-completions calls received, whatever their outcome.
    pub received: AtomicU64,
    pub in_flight: AtomicU32,
    /// Calls answered with a completion.
    pub served: AtomicU64,
    /// Calls refused with 429.
    pub throttled: AtomicU64,
    /// Calls failed with 500.
    pub failed: AtomicU64,
    /// When set, every call is answered 503 (the server is "down" but up).
    pub down: AtomicBool,
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
        change(&mut self.config.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn snapshot(&self) -> SimConfig {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Releases a concurrency slot when dropped.
struct Slot(Arc<SimState>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        // Test and benchmark controls: an outage on and off.
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
        .with_state(state)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<SimState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    // Small writes (stream chunks) go out at once, not after a delayed ACK.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
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

async fn metrics(State(s): State<Arc<SimState>>) -> String {
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

async fn completions(State(s): State<Arc<SimState>>, body: Bytes) -> Response {
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
    let claimed = s
        .in_flight
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < cfg.max_concurrent).then_some(n + 1)
        });
    if claimed.is_err() {
        s.throttled.fetch_add(1, Ordering::Relaxed);
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "simulated server is at capacity",
        );
    }
    let slot = Slot(s.clone());
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
    let model = req["model"].as_str().unwrap_or("unknown").to_string();
    let max_tokens = req["max_tokens"]
        .as_u64()
        .or_else(|| req["max_completion_tokens"].as_u64())
        .unwrap_or(u64::MAX);
    let n = u64::from(cfg.output_tokens).min(max_tokens).max(1) as u32;
    let prompt_tokens = (body.len() / 4).max(1) as u32;
    let finish = if u64::from(cfg.output_tokens) > max_tokens {
        "length"
    } else {
        "stop"
    };
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n});
    let id = format!("chatcmpl-sim-{}", fastrand::u64(..));
    let stream = req["stream"].as_bool().unwrap_or(false);
    if !stream {
        sleep(cfg.ttft + cfg.inter_token * n.saturating_sub(1)).await;
        let text: String = (0..n).map(token).collect();
        let answer = json!({
            "id": id, "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage,
        });
        s.served.fetch_add(1, Ordering::Relaxed);
        drop(slot);
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            answer.to_string(),
        )
            .into_response();
    }
    let include_usage = req["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let chunk = move |delta: Value, finish: Option<&str>| {
        let c = json!({
            "id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        Bytes::from(format!("data: {c}\n\n"))
    };
    let events = async_stream(move |tx| async move {
        let _slot = slot;
        sleep(cfg.ttft).await;
        for i in 0..n {
            if i > 0 {
                sleep(cfg.inter_token).await;
            }
            if cfg.break_after == Some(i) {
                // Let what was sent reach the wire, then break off.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(Err(std::io::Error::other("simulated break"))).await;
                return;
            }
            let delta = if i == 0 {
                json!({"role": "assistant", "content": token(i)})
            } else {
                json!({"content": token(i)})
            };
            if tx.send(Ok(chunk(delta, None))).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(chunk(json!({}), Some(finish)))).await;
        if include_usage {
            let u = json!({"id": "usage", "object": "chat.completion.chunk", "choices": [], "usage": usage});
            let _ = tx.send(Ok(Bytes::from(format!("data: {u}\n\n")))).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        s.served.fetch_add(1, Ordering::Relaxed);
    });
    let mut r = Response::new(Body::from_stream(events));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
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
/// the response mid-body.
fn async_stream<F, Fut>(
    produce: F,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(produce(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
