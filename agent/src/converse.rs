//! The gRPC front door, in the style of Bedrock's Converse: `Converse`
//! (unary) and `ConverseStream` (server streaming). Requests become
//! OpenAI chat-completions calls on the same pipeline as the HTTP door;
//! answers come back as Converse messages, with the serving region in the
//! response and in the `x-spillway-inference-region` metadata.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use spillway_proto::pb::{
    self, content_block::Block, converse_stream_event::Event,
    inference_service_server::InferenceService,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::{authorize, presented};
use crate::error::CallError;
use crate::http::INFERENCE_REGION;
use crate::openai::MAX_TOKENS_LIMIT;
use crate::pipeline::{Answer, Pipeline, PreparedCall};
use crate::quota::RateInfo;
use crate::record::CallContext;
use crate::upstream::AnswerBody;

pub struct ConverseDoor {
    pub pipeline: Arc<Pipeline>,
}

fn text_of(blocks: &[pb::ContentBlock]) -> String {
    blocks
        .iter()
        .filter_map(|b| b.block.as_ref().map(|Block::Text(t)| t.as_str()))
        .collect::<Vec<_>>()
        .join("")
}

/// Checks a Converse request and turns it into a chat-completions call.
fn prepare(
    pipeline: &Pipeline,
    req: &pb::ConverseRequest,
    stream: bool,
    key: Option<&str>,
    traceparent: Option<&str>,
    ctx: &mut CallContext,
) -> Result<PreparedCall, CallError> {
    let cfg = pipeline.config()?;
    ctx.join_trace(traceparent, &pipeline.recorder().tracer);
    let caller = pipeline.authenticate(&cfg, key)?;
    ctx.tenant = caller.tenant.clone();
    ctx.key_id = caller.key_id.clone();
    ctx.stream = stream;
    ctx.requested(&req.model_id);
    if req.model_id.is_empty() {
        return Err(CallError::bad(
            "model_id",
            "invalid model_id: required (an inference profile id)",
        ));
    }
    if req.messages.is_empty() {
        return Err(CallError::bad(
            "messages",
            "invalid messages: at least one message is required",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    let system = text_of(&req.system);
    if !system.is_empty() {
        messages.push(json!({"role": "system", "content": system}));
    }
    for (i, m) in req.messages.iter().enumerate() {
        let role = match pb::Role::try_from(m.role) {
            Ok(pb::Role::User) => "user",
            Ok(pb::Role::Assistant) => "assistant",
            _ => {
                return Err(CallError::bad(
                    &format!("messages[{i}].role"),
                    format!("invalid messages[{i}].role: USER or ASSISTANT"),
                ));
            }
        };
        messages.push(json!({"role": role, "content": text_of(&m.content)}));
    }
    let mut body = serde_json::Map::new();
    body.insert("messages".into(), Value::Array(messages));
    if let Some(cfg) = &req.inference_config {
        if let Some(n) = cfg.max_tokens {
            if n == 0 || u64::from(n) > MAX_TOKENS_LIMIT {
                return Err(CallError::bad(
                    "inference_config.max_tokens",
                    format!("invalid inference_config.max_tokens: from 1 to {MAX_TOKENS_LIMIT}"),
                ));
            }
            body.insert("max_tokens".into(), json!(n));
        }
        if let Some(t) = cfg.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(CallError::bad(
                    "inference_config.temperature",
                    "invalid inference_config.temperature: from 0 to 2",
                ));
            }
            body.insert("temperature".into(), json!(t));
        }
        if let Some(p) = cfg.top_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(CallError::bad(
                    "inference_config.top_p",
                    "invalid inference_config.top_p: from 0 to 1",
                ));
            }
            body.insert("top_p".into(), json!(p));
        }
        if !cfg.stop_sequences.is_empty() {
            body.insert("stop".into(), json!(cfg.stop_sequences));
        }
    }
    if stream {
        body.insert("stream".into(), Value::Bool(true));
        body.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let profile = pipeline.resolve(&cfg, &req.model_id)?;
    ctx.profile = Some(profile.id.clone());
    ctx.model = Some(profile.model.clone());
    ctx.max_tokens = req
        .inference_config
        .as_ref()
        .and_then(|c| c.max_tokens)
        .map(u64::from);
    authorize(&cfg, &caller, &profile.id)?;
    body.insert("model".into(), Value::String(profile.model.clone()));
    Ok(PreparedCall {
        profile: profile.id.clone(),
        model: profile.model.clone(),
        body: serde_json::to_vec(&body)
            .expect("a JSON map serializes")
            .into(),
        stream,
        max_tokens: ctx.max_tokens,
        ctx: ctx.clone(),
        config: cfg.clone(),
    })
}

/// The API key of the `authorization: Bearer <key>` metadata, if any.
fn presented_key<T>(req: &Request<T>) -> Option<&str> {
    presented(
        req.metadata()
            .get("authorization")
            .map(|v| v.to_str().map_err(|_| ())),
    )
}

/// The `x-ratelimit-*` figures as gRPC metadata, as over HTTP.
fn rate_metadata(md: &mut tonic::metadata::MetadataMap, info: &RateInfo) {
    let mut h = http::HeaderMap::new();
    crate::http::rate_headers(&mut h, info);
    for (name, value) in &h {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_bytes()),
        ) {
            md.insert(k, v);
        }
    }
}

/// A failed call as a status; a quota refusal carries the rate-limit
/// metadata and `retry-after`.
fn status_of(e: &CallError) -> Status {
    let mut status = e.to_status();
    if let CallError::Quota(q) = e {
        rate_metadata(status.metadata_mut(), &q.1);
        let secs = q.0.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        status.metadata_mut().insert("retry-after", secs.into());
        status
            .metadata_mut()
            .insert(crate::http::THROTTLE, "quota".parse().expect("ascii"));
    }
    status
}

/// Checks, admits and routes a call; a call that gets no answer is recorded
/// here.
async fn admit_and_call(
    pipeline: &Pipeline,
    req: &Request<pb::ConverseRequest>,
    stream: bool,
    ctx: &mut CallContext,
) -> Result<(Answer, RateInfo), Status> {
    let result = async {
        let traceparent = req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok());
        let call = prepare(
            pipeline,
            req.get_ref(),
            stream,
            presented_key(req),
            traceparent,
            ctx,
        )?;
        let admission = pipeline.admit(&call)?;
        let rate = admission.rate.clone();
        let answer = pipeline.call(call, admission).await?;
        Ok((answer, rate))
    }
    .await;
    result.map_err(|e: CallError| {
        pipeline.record_error(ctx, &e);
        status_of(&e)
    })
}

#[derive(Deserialize, Default)]
struct Completion {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
    /// Set on an error event: `{"error": {...}}`, or vLLM's
    /// `{"object": "error", "message": ...}`.
    error: Option<Value>,
    object: Option<String>,
    message: Option<String>,
}

impl Completion {
    /// The error this chunk reports, if it is an error event.
    fn error(&self) -> Option<String> {
        if let Some(e) = &self.error {
            return Some(
                e["message"]
                    .as_str()
                    .map_or_else(|| e.to_string(), String::from),
            );
        }
        (self.object.as_deref() == Some("error")).then(|| {
            self.message
                .clone()
                .unwrap_or_else(|| "unknown error".into())
        })
    }
}

#[derive(Deserialize)]
struct Choice {
    message: Option<Content>,
    delta: Option<Content>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Content {
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
    #[serde(default)]
    total_tokens: u32,
}

fn usage(u: &Usage) -> pb::TokenUsage {
    pb::TokenUsage {
        input_tokens: u.prompt_tokens,
        output_tokens: u.completion_tokens,
        total_tokens: u.total_tokens,
    }
}

fn stop_reason(r: Option<&str>) -> pb::StopReason {
    match r {
        Some("length") => pb::StopReason::MaxTokens,
        Some("content_filter") => pb::StopReason::ContentFiltered,
        _ => pb::StopReason::EndTurn,
    }
}

/// An answer that is not a success: the model server refused the request.
fn refused(answer_status: http::StatusCode, body: &[u8]) -> Status {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(String::from))
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(500).collect());
    let msg = format!("the model server refused the request ({answer_status}): {message}");
    if answer_status.is_client_error() {
        Status::invalid_argument(msg)
    } else {
        Status::unavailable(msg)
    }
}

fn with_region<T>(mut r: Response<T>, region: &str) -> Response<T> {
    if let Ok(v) = region.parse() {
        r.metadata_mut().insert(INFERENCE_REGION, v);
    }
    r
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ConverseStreamEvent, Status>> + Send>>;

#[tonic::async_trait]
impl InferenceService for ConverseDoor {
    type ConverseStreamStream = EventStream;

    async fn converse(
        &self,
        req: Request<pb::ConverseRequest>,
    ) -> Result<Response<pb::ConverseResponse>, Status> {
        let started = Instant::now();
        let mut ctx = CallContext::new("grpc");
        let (answer, rate) = admit_and_call(&self.pipeline, &req, false, &mut ctx).await?;
        let AnswerBody::Full(body) = answer.body else {
            return Err(Status::internal("a unary call got a streamed answer"));
        };
        if !answer.status.is_success() {
            return Err(refused(answer.status, &body));
        }
        let completion: Completion = serde_json::from_slice(&body).map_err(|e| {
            CallError::Upstream(format!(
                "the model server's answer is not a chat completion: {e}"
            ))
            .to_status()
        })?;
        if let Some(e) = completion.error() {
            return Err(Status::unavailable(format!(
                "the model server reported an error: {e}"
            )));
        }
        let choice = completion.choices.first();
        let text = choice
            .and_then(|c| c.message.as_ref())
            .and_then(|m| m.content.clone())
            .unwrap_or_default();
        let latency_ms = started.elapsed().as_millis() as u64;
        let resp = pb::ConverseResponse {
            output: Some(pb::Message {
                role: pb::Role::Assistant.into(),
                content: vec![pb::ContentBlock {
                    block: Some(Block::Text(text)),
                }],
            }),
            stop_reason: stop_reason(choice.and_then(|c| c.finish_reason.as_deref())).into(),
            usage: completion.usage.as_ref().map(usage),
            metrics: Some(pb::ConverseMetrics {
                latency_ms,
                time_to_first_token_ms: latency_ms,
            }),
            inference_region: answer.region.clone(),
            request_id: ctx.request_id.clone(),
        };
        let mut response = with_region(Response::new(resp), &answer.region);
        rate_metadata(response.metadata_mut(), &rate);
        Ok(response)
    }

    async fn converse_stream(
        &self,
        req: Request<pb::ConverseRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let started = Instant::now();
        let mut ctx = CallContext::new("grpc");
        let (answer, rate) = admit_and_call(&self.pipeline, &req, true, &mut ctx).await?;
        let region = answer.region.clone();
        let mut chunks = match answer.body {
            AnswerBody::Stream(s) if answer.status.is_success() => s,
            AnswerBody::Stream(s) => {
                let body: Vec<Bytes> = s.filter_map(|c| async move { c.ok() }).collect().await;
                return Err(refused(answer.status, &body.concat()));
            }
            AnswerBody::Full(b) => return Err(refused(answer.status, &b)),
        };
        let (tx, rx) = mpsc::channel(32);
        let start = pb::ConverseStreamEvent {
            event: Some(Event::MessageStart(pb::MessageStart {
                role: pb::Role::Assistant.into(),
                inference_region: region.clone(),
                request_id: ctx.request_id.clone(),
            })),
        };
        tokio::spawn(async move {
            let send = |e: Event| {
                let tx = tx.clone();
                async move {
                    tx.send(Ok(pb::ConverseStreamEvent { event: Some(e) }))
                        .await
                        .is_ok()
                }
            };
            if tx.send(Ok(start)).await.is_err() {
                return;
            }
            let mut sse = SseParser::default();
            let mut first_token: Option<u64> = None;
            let mut final_usage = None;
            loop {
                // A client that went away releases the model server at once,
                // not at the next event.
                let chunk = tokio::select! {
                    c = chunks.next() => match c {
                        Some(c) => c,
                        None => break,
                    },
                    _ = tx.closed() => return,
                };
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                        return;
                    }
                };
                for data in sse.push(&chunk) {
                    if data == "[DONE]" {
                        continue;
                    }
                    let Ok(c) = serde_json::from_str::<Completion>(&data) else {
                        let msg =
                            "the model server sent an event that is not a chat-completion chunk";
                        let _ = tx.send(Err(Status::unavailable(msg))).await;
                        return;
                    };
                    if let Some(e) = c.error() {
                        let msg = format!("the model server failed mid-stream: {e}");
                        let _ = tx.send(Err(Status::unavailable(msg))).await;
                        return;
                    }
                    if let Some(u) = &c.usage {
                        final_usage = Some(usage(u));
                    }
                    for choice in &c.choices {
                        if let Some(text) = choice.delta.as_ref().and_then(|d| d.content.clone())
                            && !text.is_empty()
                        {
                            first_token.get_or_insert_with(|| started.elapsed().as_millis() as u64);
                            if !send(Event::ContentDelta(pb::ContentDelta { text })).await {
                                return;
                            }
                        }
                        if let Some(reason) = choice.finish_reason.as_deref() {
                            let stop = pb::MessageStop {
                                stop_reason: stop_reason(Some(reason)).into(),
                            };
                            if !send(Event::MessageStop(stop)).await {
                                return;
                            }
                        }
                    }
                }
            }
            let latency_ms = started.elapsed().as_millis() as u64;
            let _ = send(Event::Metadata(pb::StreamMetadata {
                usage: final_usage,
                metrics: Some(pb::ConverseMetrics {
                    latency_ms,
                    time_to_first_token_ms: first_token.unwrap_or(latency_ms),
                }),
            }))
            .await;
        });
        let stream: EventStream = Box::pin(ReceiverStream::new(rx));
        let mut response = with_region(Response::new(stream), &region);
        rate_metadata(response.metadata_mut(), &rate);
        Ok(response)
    }
}

/// Splits server-sent-event bytes into the `data:` payloads of whole events.
#[derive(Default)]
pub struct SseParser {
    buf: BytesMut,
    /// How far `buf` was already searched for an event end.
    scanned: usize,
}

impl SseParser {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        // Resume a little before where the last search stopped: a separator
        // may straddle two chunks.
        while let Some((len, sep)) = find_event_end(&self.buf, self.scanned.saturating_sub(3)) {
            let event = self.buf.split_to(len + sep);
            self.scanned = 0;
            let text = String::from_utf8_lossy(&event[..len]);
            let data: Vec<&str> = text
                .split(['\n', '\r'])
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
        self.scanned = self.buf.len();
        out
    }
}

/// Where the first event ends at or after `from`: (its length, the
/// separator's length). Lines end in LF, CRLF or CR.
fn find_event_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    (from..buf.len()).find_map(|i| {
        let rest = &buf[i..];
        if rest.starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else if rest.starts_with(b"\n\n") || rest.starts_with(b"\r\r") {
            Some((i, 2))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_handles_split_events() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").is_empty());
        assert_eq!(p.push(b":1}\n\ndata: [DONE]\n\n"), ["{\"a\":1}", "[DONE]"]);
        assert_eq!(p.push(b": comment\n\n"), Vec::<String>::new());
        assert_eq!(p.push(b"data: a\r\rdata: b\r\n\r"), ["a"]);
        assert_eq!(p.push(b"\n"), ["b"]);
    }
}
