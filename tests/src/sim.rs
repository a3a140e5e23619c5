//! A model-server simulator of every API an engine serves: OpenAI chat and
//! legacy completions, embeddings and Responses, and Anthropic Messages
//! (unary and server-sent events in each API's own shapes), with a
//! configurable time to first token, inter-token latency, output length,
//! concurrency limit (429 beyond it), injected failure rate and garbage
//! answers; `/health` and `/metrics`. A chat request that offers tools
//! gets a call to the first one. Tests run it in process and change its
//! behaviour on the fly; the demo and the benchmark run the `spillway-sim`
//! binary.

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
use spillway_core::api::Api;
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
    /// The path and body of the last call received.
    pub last: Mutex<Option<(String, Value)>>,
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

async fn answer(api: Api, State(s): State<Arc<SimState>>, body: Bytes) -> Response {
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
    *s.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((api.path().to_string(), req.clone()));
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
        .or_else(|| req["max_output_tokens"].as_u64())
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
    if api == Api::Embeddings {
        let inputs = req["input"].as_array().map_or(1, Vec::len);
        let data: Vec<Value> = (0..inputs)
            .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, 0.4]}))
            .collect();
        sleep(cfg.ttft).await;
        s.served.fetch_add(1, Ordering::Relaxed);
        drop(slot);
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
    if stream && api != Api::Chat {
        let include_usage = req["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false);
        let events = async_stream(move |tx| async move {
            let _slot = slot;
            sleep(cfg.ttft).await;
            for e in shape.opening() {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            for i in 0..n {
                if i > 0 {
                    sleep(cfg.inter_token).await;
                }
                if cfg.break_after == Some(i) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = tx.send(Err(std::io::Error::other("simulated break"))).await;
                    return;
                }
                if tx.send(Ok(shape.delta(i))).await.is_err() {
                    return;
                }
            }
            for e in shape.closing(include_usage) {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            s.served.fetch_add(1, Ordering::Relaxed);
        });
        let mut r = Response::new(Body::from_stream(events));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        return r;
    }
    if !stream && api != Api::Chat {
        sleep(cfg.ttft + cfg.inter_token * n.saturating_sub(1)).await;
        s.served.fetch_add(1, Ordering::Relaxed);
        drop(slot);
        return json_answer(shape.unary());
    }
    let (id, model) = (shape.id, shape.model);
    let tool = tool_to_call(&req);
    if !stream {
        sleep(cfg.ttft + cfg.inter_token * n.saturating_sub(1)).await;
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
        if let Some(name) = tool {
            // The call's id and name first, then its arguments in two
            // pieces, as engines stream them.
            let (a, b) = SIM_TOOL_ARGUMENTS.split_at(5);
            let call = |piece: Value| json!({"tool_calls": [piece]});
            let mut first = call(
                json!({"index": 0, "id": SIM_TOOL_CALL_ID, "type": "function",
                "function": {"name": name, "arguments": ""}}),
            );
            first["role"] = json!("assistant");
            for delta in [
                first,
                call(json!({"index": 0, "function": {"arguments": a}})),
                call(json!({"index": 0, "function": {"arguments": b}})),
            ] {
                if tx.send(Ok(chunk(delta, None))).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Ok(chunk(json!({}), Some("tool_calls")))).await;
        } else {
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
        }
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
