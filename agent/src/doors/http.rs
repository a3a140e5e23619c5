//! The HTTP front door: OpenAI's `POST /v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings` and `/v1/responses`, Anthropic's
//! `POST /v1/messages` (each unary and, but for embeddings, server-sent
//! events), and `GET /v1/models`. Each call runs the one pipeline; every
//! answer names the region that served it in `x-spillway-inference-region`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use serde_json::json;

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
    /// `/metrics` is served here unless it has a listener of its own.
    pub serve_metrics: bool,
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
        .fallback(|uri: http::Uri| async move {
            let e = CallError::BadRequest {
                param: None,
                message: "unknown path: this agent serves POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses and /v1/messages, and GET /v1/models".into(),
            };
            refusal(&uri, &e, StatusCode::NOT_FOUND)
        })
        // A known path called with the wrong method: 405, in the same
        // error shape as every other refusal.
        .method_not_allowed_fallback(|method: http::Method, uri: http::Uri| async move {
            let e = CallError::BadRequest {
                param: None,
                message: format!(
                    "method {method} is not allowed on {}: the /v1 calls are POST, /v1/models and /health are GET",
                    uri.path()
                ),
            };
            refusal(&uri, &e, StatusCode::METHOD_NOT_ALLOWED)
        })
        .with_state(door)
}

/// A refusal before any door ran, in the shape of the API the path is
/// under (Anthropic's under `/v1/messages`).
fn refusal(uri: &http::Uri, e: &CallError, status: StatusCode) -> Response {
    let mut r = if uri.path().starts_with("/v1/messages") {
        anthropic::error_response(e)
    } else {
        http_response(e)
    };
    *r.status_mut() = status;
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

async fn chat_completions(door: State<Arc<HttpDoor>>, h: http::HeaderMap, b: Body) -> Response {
    call(door, h, b, Api::Chat).await
}

async fn completions(door: State<Arc<HttpDoor>>, h: http::HeaderMap, b: Body) -> Response {
    call(door, h, b, Api::Completions).await
}

async fn embeddings(door: State<Arc<HttpDoor>>, h: http::HeaderMap, b: Body) -> Response {
    call(door, h, b, Api::Embeddings).await
}

async fn responses(door: State<Arc<HttpDoor>>, h: http::HeaderMap, b: Body) -> Response {
    call(door, h, b, Api::Responses).await
}

async fn messages(door: State<Arc<HttpDoor>>, h: http::HeaderMap, b: Body) -> Response {
    call(door, h, b, Api::Messages).await
}

/// One call of `api`: the body read and parsed for its API, the pipeline,
/// and the answer or error in the API's own shape (Anthropic's for
/// Messages, OpenAI's for the rest).
async fn call(
    State(door): State<Arc<HttpDoor>>,
    headers: http::HeaderMap,
    body: Body,
    api: Api,
) -> Response {
    let anthropic = api == Api::Messages;
    let body = read_body(body, door.max_body_bytes).await;
    let key = presented_key(&headers);
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
    r
}

/// The request body, read under the door's size limit.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, CallError> {
    Ok(Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                CallError::TooLarge(limit)
            } else {
                CallError::BadRequest {
                    param: None,
                    message: format!("could not read the request body: {e}"),
                }
            }
        })?
        .to_bytes())
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
