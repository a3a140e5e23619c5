//! The gRPC front door, in the style of Bedrock's Converse: `Converse`
//! (unary) and `ConverseStream` (server streaming). Requests become
//! OpenAI chat-completions calls on the same pipeline as the HTTP door;
//! answers come back as Converse messages, with the serving region in the
//! response and in the `x-spillway-inference-region` metadata. Text,
//! images, tool use and system prompts translate to and from the engines'
//! chat completions in [`translate`]. A request message over the door's
//! limit is refused with RESOURCE_EXHAUSTED naming it ([`MessageLimit`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use spillway_proto::pb::{
    self,
    converse_stream_event::Event,
    inference_service_server::{InferenceService, InferenceServiceServer},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use spillway_core::api::Api;

use crate::error::{CallError, INFERENCE_REGION, grpc_status, rate_metadata};
use crate::pipeline::auth::presented;
use crate::pipeline::{Answer, Inbound, Pipeline};
use crate::quota::RateInfo;
use crate::upstream::AnswerBody;
use crate::upstream::answer::{Completion, SseParser, Usage, refusal_message};

mod limit;
mod translate;

pub use limit::MessageLimit;
use translate::{StreamBlocks, parse};

pub struct ConverseDoor {
    pub pipeline: Arc<Pipeline>,
}

/// The least a Converse request message may be: tonic's default, what the
/// door took before it had a limit of its own. A message carries an image
/// in raw bytes where the HTTP body carries it in base64, and a request
/// whose translated body is over `--max-body-bytes` is refused by the door
/// naming the field that made it so.
pub const MIN_CONVERSE_MESSAGE: usize = 4 * 1024 * 1024;

/// The door as the gRPC server serves it: request messages over
/// `max_message_bytes` (the HTTP door's body limit, but at least
/// [`MIN_CONVERSE_MESSAGE`]) are refused with RESOURCE_EXHAUSTED naming the
/// limit.
pub fn service(
    door: ConverseDoor,
    max_message_bytes: usize,
) -> MessageLimit<InferenceServiceServer<ConverseDoor>> {
    let max_message_bytes = max_message_bytes.max(MIN_CONVERSE_MESSAGE);
    MessageLimit::new(
        InferenceServiceServer::new(door).max_decoding_message_size(max_message_bytes),
        max_message_bytes,
    )
}

/// The API key of the `authorization: Bearer <key>` metadata, if any.
fn presented_key<T>(req: &Request<T>) -> Option<&str> {
    presented(
        req.metadata()
            .get("authorization")
            .map(|v| v.to_str().map_err(|_| ())),
    )
}

/// Runs a Converse call through the pipeline.
async fn serve(
    pipeline: &Pipeline,
    req: Request<pb::ConverseRequest>,
    stream: bool,
) -> (Result<Answer, Status>, RateInfo, String) {
    let traceparent = req
        .metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok());
    let inbound = Inbound {
        door: "grpc",
        api: Api::Chat,
        key: presented_key(&req),
        traceparent,
    };
    let served = pipeline
        .serve(inbound, || parse(req.get_ref(), stream))
        .await;
    (
        served.result.map_err(|e| grpc_status(&e)),
        served.rate,
        served.request_id,
    )
}

fn usage(u: &Usage) -> pb::TokenUsage {
    let (input, output) = (u.input().unwrap_or(0), u.output().unwrap_or(0));
    pb::TokenUsage {
        input_tokens: input as u32,
        output_tokens: output as u32,
        total_tokens: u.total().unwrap_or(input + output) as u32,
    }
}

/// An answer that is not a success: the model server refused the request.
fn refused(answer_status: http::StatusCode, body: &[u8]) -> Status {
    let message = refusal_message(body);
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
        let (answer, rate, request_id) = serve(&self.pipeline, req, false).await;
        let answer = answer?;
        let AnswerBody::Full(body) = answer.body else {
            return Err(Status::internal("a unary call got a streamed answer"));
        };
        if !answer.status.is_success() {
            return Err(refused(answer.status, &body));
        }
        let completion = Completion::parse(&body).map_err(|e| {
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
        let (content, stop_reason) = translate::output(completion.choices.first());
        let latency_ms = started.elapsed().as_millis() as u64;
        let resp = pb::ConverseResponse {
            output: Some(pb::Message {
                role: pb::Role::Assistant.into(),
                content,
            }),
            stop_reason: stop_reason.into(),
            usage: completion.usage().as_ref().map(usage),
            metrics: Some(pb::ConverseMetrics {
                latency_ms,
                time_to_first_token_ms: latency_ms,
            }),
            inference_region: answer.region.clone(),
            request_id,
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
        let (answer, rate, request_id) = serve(&self.pipeline, req, true).await;
        let answer = answer?;
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
                request_id,
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
            let mut blocks = StreamBlocks::default();
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
                    let Ok(c) = Completion::parse(data.as_bytes()) else {
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
                    if let Some(u) = &c.usage() {
                        final_usage = Some(usage(u));
                    }
                    for choice in &c.choices {
                        for event in blocks.choice(choice) {
                            if matches!(event, Event::ContentDelta(_) | Event::ContentBlockStart(_))
                            {
                                first_token
                                    .get_or_insert_with(|| started.elapsed().as_millis() as u64);
                            }
                            if !send(event).await {
                                return;
                            }
                        }
                    }
                }
            }
            // A stream that ended without a finish reason still closes its
            // blocks.
            for event in blocks.finish() {
                if !send(event).await {
                    return;
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
