//! The HTTP front door: OpenAI's `POST /v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings` and `/v1/responses`, Anthropic's
//! `POST /v1/messages` (each unary and, but for embeddings, server-sent
//! events), and `GET /v1/models`. Each call runs the one pipeline; every
//! answer names the region that served it in `x-spillway-inference-region`.
//!
//! Request bodies are read under two limits: a size (`max_body_bytes`,
//! 413) and a deadline (`body_read_timeout`, 408). A body whose
//! `Content-Length` is over the size is refused before any of it is read,
//! and a client that sent `Expect: 100-continue` is refused without being
//! asked for it. An answer given before the body was read to its end
//! carries `Connection: close`, and the rest of the body is read and
//! dropped (boundedly) after it: closing a socket with unread bytes
//! resets the connection, and a client still sending would see the reset
//! instead of the answer.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::{Request as HttpRequest, State};
use axum::response::Response;
use axum::routing::{get, post};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::time::{Instant, timeout_at};

use spillway_core::api::Api;

use super::anthropic;
use super::request::ApiRequest;
use crate::error::{
    CallError, INFERENCE_REGION, REQUEST_ID, http_response, json_response, rate_headers,
};
use crate::pipeline::auth::{authorize, presented};
use crate::pipeline::{Answer, Inbound, Pipeline, Request};
use crate::upstream::AnswerBody;

pub struct HttpDoor {
    pub pipeline: Arc<Pipeline>,
    pub max_body_bytes: usize,
    /// How long a client has, once its request head arrived, to send the
    /// whole body (`--body-read-timeout-secs`); then it gets 408.
    pub body_read_timeout: Duration,
    /// `/metrics` is served here unless it has a listener of its own.
    pub serve_metrics: bool,
}

/// The default of `--body-read-timeout-secs`.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// After an answer given before the body was read to its end, the door
/// reads and drops up to this much more of it (or `max_body_bytes`, if
/// larger) for at most `body_read_timeout`, and stops when nothing came
/// for `LINGER_IDLE` (nginx's `lingering_timeout`); a client that sends
/// more, or for longer, is cut off (and may see a reset).
const LINGER_MIN_BYTES: u64 = 16 * 1024 * 1024;
const LINGER_IDLE: Duration = Duration::from_secs(5);

impl HttpDoor {
    fn linger_bytes(&self) -> u64 {
        (self.max_body_bytes as u64).max(LINGER_MIN_BYTES)
    }
}

pub fn router(door: Arc<HttpDoor>) -> Router {
    let mut router = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(responses))
        .route("/v1/messages", post(messages))
        .route("/v1/models", get(models))
        .route("/health", get(health));
    if door.serve_metrics {
        router = router.route("/metrics", get(metrics));
    }
    router
        .fallback(not_found)
        // A known path called with the wrong method: 405, in the same
        // error shape as every other refusal.
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(door)
}

async fn not_found(State(door): State<Arc<HttpDoor>>, req: HttpRequest) -> Response {
    let e = CallError::BadRequest {
        param: None,
        message: "unknown path: this agent serves POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses and /v1/messages, and GET /v1/models".into(),
    };
    refusal(&door, req, &e, StatusCode::NOT_FOUND)
}

async fn method_not_allowed(State(door): State<Arc<HttpDoor>>, req: HttpRequest) -> Response {
    let e = CallError::BadRequest {
        param: None,
        message: format!(
            "method {} is not allowed on {}: the /v1 calls are POST, /v1/models and /health are GET",
            req.method(),
            req.uri().path()
        ),
    };
    refusal(&door, req, &e, StatusCode::METHOD_NOT_ALLOWED)
}

/// A refusal before any door ran, in the shape of the API the path is
/// under (Anthropic's under `/v1/messages`). The body, if any, is left
/// unread.
fn refusal(door: &HttpDoor, req: HttpRequest, e: &CallError, status: StatusCode) -> Response {
    let (parts, body) = req.into_parts();
    let mut r = if parts.uri.path().starts_with("/v1/messages") {
        anthropic::error_response(e)
    } else {
        http_response(e)
    };
    *r.status_mut() = status;
    let unread = Unread::of(&parts, body, door.linger_bytes());
    unread.settle(&mut r, parts.version, door.body_read_timeout);
    r
}

async fn health(State(door): State<Arc<HttpDoor>>) -> Response {
    match door.pipeline.config() {
        Ok(cfg) => json_response(
            StatusCode::OK,
            &json!({"status": "serving", "config_version": cfg.version}),
        ),
        Err(e) => http_response(&e),
    }
}

/// The API key of `Authorization: Bearer <key>`, or of `x-api-key` (what
/// the Anthropic SDKs send), if any.
fn presented_key(headers: &http::HeaderMap) -> Option<&str> {
    match headers.get(header::AUTHORIZATION) {
        Some(v) => presented(Some(v.to_str().map_err(|_| ()))),
        None => headers.get("x-api-key").map(|v| v.to_str().unwrap_or("")),
    }
}

async fn models(State(door): State<Arc<HttpDoor>>, headers: http::HeaderMap) -> Response {
    let cfg = match door.pipeline.config() {
        Ok(c) => c,
        Err(e) => return http_response(&e),
    };
    let caller = match door.pipeline.authenticate(&cfg, presented_key(&headers)) {
        Ok(c) => c,
        Err(e) => return http_response(&e),
    };
    // A tenant sees the profiles it may call.
    let data: Vec<serde_json::Value> = cfg
        .profiles
        .values()
        .filter(|p| authorize(&cfg, &caller, &p.id).is_ok())
        .map(|p| json!({"id": p.id, "object": "model", "created": 0, "owned_by": "spillway", "kind": p.kind.as_str(), "model": p.model}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

async fn metrics(State(door): State<Arc<HttpDoor>>) -> Response {
    prometheus(&door.pipeline.recorder().metrics)
}

/// The registry in Prometheus' text format.
pub fn prometheus(metrics: &spillway_core::metrics::Metrics) -> Response {
    let mut r = Response::new(Body::from(metrics.render()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

async fn chat_completions(door: State<Arc<HttpDoor>>, req: HttpRequest) -> Response {
    call(door, req, Api::Chat).await
}

async fn completions(door: State<Arc<HttpDoor>>, req: HttpRequest) -> Response {
    call(door, req, Api::Completions).await
}

async fn embeddings(door: State<Arc<HttpDoor>>, req: HttpRequest) -> Response {
    call(door, req, Api::Embeddings).await
}

async fn responses(door: State<Arc<HttpDoor>>, req: HttpRequest) -> Response {
    call(door, req, Api::Responses).await
}

async fn messages(door: State<Arc<HttpDoor>>, req: HttpRequest) -> Response {
    call(door, req, Api::Messages).await
}

/// One call of `api`: the body read and parsed for its API, the pipeline,
/// and the answer or error in the API's own shape (Anthropic's for
/// Messages, OpenAI's for the rest).
async fn call(State(door): State<Arc<HttpDoor>>, req: HttpRequest, api: Api) -> Response {
    let anthropic = api == Api::Messages;
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let (body, unread) = read_body(&door, &parts, body).await;
    let key = presented_key(headers);
    let inbound = Inbound {
        door: "http",
        api,
        key,
        traceparent: headers.get("traceparent").and_then(|v| v.to_str().ok()),
    };
    let served = door
        .pipeline
        .serve(inbound, move || {
            let req = ApiRequest::parse(api, body?)?;
            Ok(Request {
                model: req.model.clone(),
                stream: req.stream,
                max_tokens: req.max_tokens,
                uncounted_bytes: 0,
                body: Box::new(move |model| req.body_for(model)),
            })
        })
        .await;
    let mut r = match (served.result, anthropic) {
        (Ok(answer), _) => answer_response(answer, api),
        (Err(e), false) => http_response(&e),
        (Err(e), true) => anthropic::error_response(&e),
    };
    if anthropic {
        anthropic::rate_headers(r.headers_mut(), &served.rate);
    } else {
        rate_headers(r.headers_mut(), &served.rate);
    }
    if let Ok(id) = HeaderValue::from_str(&served.request_id) {
        if anthropic {
            r.headers_mut().insert("request-id", id.clone());
        }
        r.headers_mut().insert(REQUEST_ID, id);
    }
    unread.settle(&mut r, parts.version, door.body_read_timeout);
    r
}

/// What is left of a request body when the door stops reading it.
enum Unread {
    /// Nothing: the connection can carry the next request.
    Nothing,
    /// The client may still be sending: after the answer, up to `bytes`
    /// more are read and dropped, then the connection closes.
    Rest { body: Body, bytes: u64 },
    /// The connection closes after the answer, with nothing more read:
    /// the client stalled, failed, was not asked for the body
    /// (`Expect: 100-continue`), or declared more than is worth reading.
    Close,
}

impl Unread {
    /// A body the door did not read: the rest of it, up to `bytes`, is
    /// worth reading if the client is sending it.
    fn of(parts: &http::request::Parts, body: Body, bytes: u64) -> Unread {
        if body.is_end_stream() {
            Unread::Nothing
        } else if expects_continue(parts) || body.size_hint().lower() > bytes {
            Unread::Close
        } else {
            Unread::Rest { body, bytes }
        }
    }

    /// Readies `r` for a connection whose request body was not read to its
    /// end: over HTTP/1 it says `Connection: close` and the rest of the
    /// body is drained in the background for at most `within`; over
    /// HTTP/2 the stream alone ends (dropping the body resets it) and the
    /// connection goes on.
    fn settle(self, r: &mut Response, version: http::Version, within: Duration) {
        if matches!(self, Unread::Nothing) || version >= http::Version::HTTP_2 {
            return;
        }
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        if let Unread::Rest { body, bytes } = self {
            tokio::spawn(drain(body, bytes, within));
        }
    }
}

/// Reads and drops up to `bytes` of `body` for at most `within`, so that
/// hyper closes the connection only once the client stopped sending: a
/// close with unread bytes makes the kernel reset the connection, and a
/// client still writing its body would see the reset, not the answer that
/// hyper already wrote (nginx's "lingering close").
async fn drain(mut body: Body, bytes: u64, within: Duration) {
    let deadline = Instant::now() + within;
    let mut left = bytes;
    loop {
        let wait = deadline.min(Instant::now() + LINGER_IDLE);
        let Ok(Some(Ok(frame))) = timeout_at(wait, body.frame()).await else {
            return;
        };
        let n = frame.data_ref().map_or(0, |d| d.len() as u64);
        match left.checked_sub(n) {
            Some(l) => left = l,
            None => return,
        }
    }
}

fn expects_continue(parts: &http::request::Parts) -> bool {
    parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// The request body, read under the door's size limit and deadline, and
/// what is left of it. A body whose declared length is over the limit is
/// refused before any of it is read (and, with `Expect: 100-continue`,
/// before the client is asked to send it).
async fn read_body(
    door: &HttpDoor,
    parts: &http::request::Parts,
    mut body: Body,
) -> (Result<Bytes, CallError>, Unread) {
    let limit = door.max_body_bytes;
    if body.size_hint().lower() > limit as u64 {
        let unread = Unread::of(parts, body, door.linger_bytes());
        return (Err(CallError::TooLarge(limit)), unread);
    }
    let deadline = Instant::now() + door.body_read_timeout;
    // One chunk (the common case) is kept as it came; more are joined.
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    let mut len = 0;
    loop {
        let frame = match timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                let e = CallError::BadRequest {
                    param: None,
                    message: format!("could not read the request body: {e}"),
                };
                return (Err(e), Unread::Close);
            }
            Err(_) => {
                let e = CallError::BodyTimeout(door.body_read_timeout);
                return (Err(e), Unread::Close);
            }
        };
        // Trailers carry nothing a call uses.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len += data.len();
        if len > limit {
            let unread = Unread::Rest {
                body,
                bytes: door.linger_bytes(),
            };
            return (Err(CallError::TooLarge(limit)), unread);
        }
        if first.is_none() && joined.is_empty() {
            first = Some(data);
        } else {
            if let Some(f) = first.take() {
                joined.extend_from_slice(&f);
            }
            joined.extend_from_slice(&data);
        }
    }
    let body = first.unwrap_or_else(|| joined.freeze());
    (Ok(body), Unread::Nothing)
}

/// The model server's answer as it came: JSON, or server-sent events
/// passed through.
fn answer_response(answer: Answer, api: Api) -> Response {
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
            let events = s.map(move |chunk| {
                Ok::<Bytes, std::convert::Infallible>(match chunk {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %e, "stream failed after it started");
                        // Blank lines first: the broken-off event may have
                        // stopped mid-line.
                        match api {
                            // Anthropic's SDKs read a named `error` event.
                            Api::Messages => {
                                format!("\n\nevent: error\ndata: {}\n\n", anthropic::error_json(&e))
                            }
                            _ => format!("\n\ndata: {}\n\n", e.openai_json()),
                        }
                        .into()
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
    response
}
