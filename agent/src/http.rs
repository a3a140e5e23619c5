//! The OpenAI-compatible HTTP front door: `POST /v1/chat/completions`
//! (unary and server-sent events) and `GET /v1/models`. Every answer names
//! the region that served it in `x-spillway-inference-region`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use serde_json::json;

use crate::auth::{authorize, presented};
use crate::error::CallError;
use crate::openai::ChatRequest;
use crate::pipeline::{Pipeline, PreparedCall};
use crate::quota::RateInfo;
use crate::record::CallContext;
use crate::upstream::AnswerBody;

pub const INFERENCE_REGION: &str = "x-spillway-inference-region";
/// The call's id, as in its audit record.
pub const REQUEST_ID: &str = "x-request-id";

pub struct HttpDoor {
    pub pipeline: Arc<Pipeline>,
    pub max_body_bytes: usize,
    /// `/metrics` is served here unless it has a listener of its own.
    pub serve_metrics: bool,
}

pub fn router(door: Arc<HttpDoor>) -> Router {
    let mut router = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health));
    if door.serve_metrics {
        router = router.route("/metrics", get(metrics));
    }
    router
        .fallback(|| async {
            let e = CallError::BadRequest {
                param: None,
                message:
                    "unknown path: this agent serves POST /v1/chat/completions and GET /v1/models"
                        .into(),
            };
            let mut r = error_response(&e);
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        })
        .with_state(door)
}

/// On a 429: why, `quota` (the source region's quota, not spilled) or
/// `capacity` (every region tried was saturated).
pub const THROTTLE: &str = "x-spillway-throttle";

fn error_response(e: &CallError) -> Response {
    let mut r = (e.http_status(), axum_json(&e.openai_json())).into_response();
    let h = r.headers_mut();
    match e {
        CallError::Throttled(_) | CallError::AtCapacity(_) | CallError::Exhausted { .. } => {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            h.insert(THROTTLE, HeaderValue::from_static("capacity"));
        }
        CallError::Quota(q) => {
            let secs = q.0.retry_after.as_secs_f64().ceil().max(1.0) as u64;
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            h.insert(THROTTLE, HeaderValue::from_static("quota"));
            rate_headers(h, &q.1);
        }
        _ => {}
    }
    r
}

/// A duration the way OpenAI's reset headers write it: `250ms`, `1.5s`.
fn reset(d: std::time::Duration) -> HeaderValue {
    let text = if d < std::time::Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        let secs = format!("{:.3}", d.as_secs_f64());
        format!("{}s", secs.trim_end_matches('0').trim_end_matches('.'))
    };
    HeaderValue::from_str(&text).expect("digits and units are valid header values")
}

/// The `x-ratelimit-*` headers of OpenAI's API, for the tightest quota
/// covering the call: its limit, and what this agent can still admit now.
pub fn rate_headers(h: &mut http::HeaderMap, info: &RateInfo) {
    use http::HeaderName;
    const REQUESTS: [&str; 3] = [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ];
    const TOKENS: [&str; 3] = [
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ];
    for (names, state) in [(REQUESTS, &info.requests), (TOKENS, &info.tokens)] {
        if let Some(state) = state {
            h.insert(
                HeaderName::from_static(names[0]),
                HeaderValue::from(state.limit),
            );
            h.insert(
                HeaderName::from_static(names[1]),
                HeaderValue::from(state.remaining),
            );
            h.insert(HeaderName::from_static(names[2]), reset(state.reset));
        }
    }
}

fn axum_json(v: &serde_json::Value) -> Response {
    let mut r = Response::new(Body::from(
        serde_json::to_vec(v).expect("JSON values serialize"),
    ));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn health(State(door): State<Arc<HttpDoor>>) -> Response {
    match door.pipeline.config() {
        Ok(cfg) => axum_json(&json!({"status": "serving", "config_version": cfg.version})),
        Err(e) => error_response(&e),
    }
}

/// The API key of `Authorization: Bearer <key>`, if any.
fn presented_key(headers: &http::HeaderMap) -> Option<&str> {
    presented(
        headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().map_err(|_| ())),
    )
}

async fn models(State(door): State<Arc<HttpDoor>>, headers: http::HeaderMap) -> Response {
    let cfg = match door.pipeline.config() {
        Ok(c) => c,
        Err(e) => return error_response(&e),
    };
    let caller = match door.pipeline.authenticate(&cfg, presented_key(&headers)) {
        Ok(c) => c,
        Err(e) => return error_response(&e),
    };
    // A tenant sees the profiles it may call.
    let data: Vec<serde_json::Value> = cfg
        .profiles
        .values()
        .filter(|p| authorize(&cfg, &caller, &p.id).is_ok())
        .map(|p| json!({"id": p.id, "object": "model", "created": 0, "owned_by": "spillway", "kind": p.kind.as_str(), "model": p.model}))
        .collect();
    axum_json(&json!({"object": "list", "data": data}))
}

async fn chat_completions(
    State(door): State<Arc<HttpDoor>>,
    headers: http::HeaderMap,
    body: Body,
) -> Response {
    let mut rate = RateInfo::default();
    let mut ctx = CallContext::new("http");
    let mut r = match serve(&door, &headers, body, &mut rate, &mut ctx).await {
        Ok(r) => r,
        Err(e) => {
            door.pipeline.record_error(&ctx, &e);
            error_response(&e)
        }
    };
    rate_headers(r.headers_mut(), &rate);
    if let Ok(id) = HeaderValue::from_str(&ctx.request_id) {
        r.headers_mut().insert(REQUEST_ID, id);
    }
    r
}

async fn metrics(State(door): State<Arc<HttpDoor>>) -> Response {
    prometheus(&door.pipeline.recorder().metrics)
}

/// The registry in Prometheus' text format.
pub fn prometheus(metrics: &spillway_proto::metrics::Metrics) -> Response {
    let mut r = Response::new(Body::from(metrics.render()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

async fn serve(
    door: &HttpDoor,
    headers: &http::HeaderMap,
    body: Body,
    rate: &mut RateInfo,
    ctx: &mut CallContext,
) -> Result<Response, CallError> {
    let bytes = Limited::new(body, door.max_body_bytes)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                CallError::TooLarge(door.max_body_bytes)
            } else {
                CallError::BadRequest {
                    param: None,
                    message: format!("could not read the request body: {e}"),
                }
            }
        })?
        .to_bytes();
    let pipeline = &door.pipeline;
    let cfg = pipeline.config()?;
    ctx.join_trace(
        headers.get("traceparent").and_then(|v| v.to_str().ok()),
        &pipeline.recorder().tracer,
    );
    let caller = pipeline.authenticate(&cfg, presented_key(headers))?;
    ctx.tenant = caller.tenant.clone();
    ctx.key_id = caller.key_id.clone();
    let req = ChatRequest::parse(bytes)?;
    ctx.requested(&req.model);
    ctx.stream = req.stream;
    ctx.max_tokens = req.max_tokens;
    let profile = pipeline.resolve(&cfg, &req.model)?;
    ctx.profile = Some(profile.id.clone());
    ctx.model = Some(profile.model.clone());
    authorize(&cfg, &caller, &profile.id)?;
    let call = PreparedCall {
        body: req.body_for(&profile.model),
        profile: profile.id.clone(),
        model: profile.model.clone(),
        stream: req.stream,
        max_tokens: req.max_tokens,
        ctx: ctx.clone(),
        config: cfg.clone(),
    };
    let admission = pipeline.admit(&call)?;
    *rate = admission.rate.clone();
    let answer = pipeline.call(call, admission).await?;
    let region =
        HeaderValue::from_str(&answer.region).expect("region names are valid header values");
    let mut response = match answer.body {
        AnswerBody::Full(b) => {
            let mut r = Response::new(Body::from(b));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        AnswerBody::Stream(s) => {
            // A failure after the first byte cannot be retried: the stream
            // ends with an error event the client can see.
            let events = s.map(|chunk| {
                Ok::<Bytes, std::convert::Infallible>(match chunk {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %e, "stream failed after it started");
                        // Blank lines first: the broken-off event may have
                        // stopped mid-line.
                        format!("\n\ndata: {}\n\n", e.openai_json()).into()
                    }
                })
            });
            let mut r = Response::new(Body::from_stream(events));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
    };
    *response.status_mut() = answer.status;
    response.headers_mut().insert(INFERENCE_REGION, region);
    Ok(response)
}
