//! The relay between agents. A source agent hands a call to an agent of the
//! destination region (`RelayClients`); the destination serves it from its
//! own model servers only and never relays again (`RelayServer`). The
//! answer streams back on the same call: a head (status, serving region),
//! body chunks as they come, and a trailer.
//!
//! The destination acknowledges a call as soon as it takes it (the gRPC
//! response headers, with `spillway-relay-ack`), before its model server
//! answers: the source holds an acknowledgment to the attempt deadline, so
//! a hung destination fails over in seconds even for a unary call, whose
//! head comes only when generation is done. While it waits for the head,
//! HTTP/2 pings on the channel tell a peer that stopped answering. A
//! destination of an older build acknowledges only with its head; until
//! one has acknowledged early, the source waits for it as it always did
//! (see ARCHITECTURE.md, "Hung peers").
//!
//! With TLS (the default), the relay is mutual TLS and a caller must present
//! an agent certificate of the deployment's CA naming the source region it
//! claims. Under `--insecure-dev`, a relay call must name its source agent
//! in the `spillway-source-agent` metadata, and only agents in the current
//! snapshot are accepted.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use spillway_proto::pb::{
    self, relay_event::Event, relay_service_client::RelayServiceClient,
    relay_service_server::RelayService,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

use super::meter::Meter;
use crate::control::snapshot::AgentConfig;
use crate::control::sync::ConfigWatch;
use crate::error::CallError;
use crate::net::connect::TlsConnect;
use crate::telemetry::trace::{self, RemoteSpans, TraceParent, kv};
use crate::upstream::{AnswerBody, UpstreamAnswer, UpstreamSettings, Upstreams};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use spillway_core::api::Api;
use spillway_core::credentials::Credentials;
use spillway_core::metrics::Metrics;
use spillway_core::tls::{Expect, Peer};

/// Metadata naming the calling agent as `<region>/<agent-id>`.
pub const SOURCE_AGENT: &str = "spillway-source-agent";

/// Response metadata of a destination that acknowledges a call as soon as
/// it takes it, before its head.
pub const ACK: &str = "spillway-relay-ack";

/// A pooled channel to one agent, and whether it acknowledges early.
struct Pooled {
    channel: Channel,
    acks_early: Arc<AtomicBool>,
}

/// Pooled channels to other regions' agents.
pub struct RelayClients {
    me: String,
    channels: Mutex<HashMap<String, Pooled>>,
    settings: UpstreamSettings,
    /// Mutual TLS to other agents, with this agent's certificate; each
    /// destination must present an agent certificate of its region. The
    /// certificate presented is the one loaded now (it may be reloaded).
    tls: Option<Arc<Credentials>>,
    /// Counts the attempts that failed before the answer's head, by cause.
    metrics: Arc<Metrics>,
}

/// The largest relay message: a request body up to the HTTP door's limit
/// plus the relay's own fields, or an answer chunk.
pub const MAX_RELAY_MESSAGE: usize = 64 * 1024 * 1024;

impl RelayClients {
    /// `settings` bound connecting (TCP and TLS), the wait for the
    /// destination's acknowledgment (the attempt deadline), and the wait
    /// for its head as for a local model server: a stream's head comes at
    /// once, a unary answer's only when it is done. Their keep-alive
    /// settings drive the channels' HTTP/2 pings.
    pub fn new(
        region: &str,
        agent_id: &str,
        settings: UpstreamSettings,
        tls: Option<Arc<Credentials>>,
        metrics: Arc<Metrics>,
    ) -> RelayClients {
        RelayClients {
            me: format!("{region}/{agent_id}"),
            channels: Mutex::new(HashMap::new()),
            settings,
            tls,
            metrics,
        }
    }

    /// Counts a relay attempt to `region` that failed before the answer's
    /// head, and gives its error back.
    fn failed(&self, region: &str, cause: RelayErrorCause, e: CallError) -> CallError {
        self.metrics.add(
            "spillway_agent_relay_errors_total",
            &[("inference_region", region), ("cause", cause.as_str())],
            1,
        );
        e
    }

    /// The pooled channel to the agent at `addr`, which must be an agent
    /// of `region`, and whether that agent acknowledges calls early.
    fn channel(
        &self,
        region: &str,
        addr: &str,
    ) -> Result<(Channel, Arc<AtomicBool>), (RelayErrorCause, CallError)> {
        let key = format!("{region}/{addr}");
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(&key) {
            return Ok((c.channel.clone(), c.acks_early.clone()));
        }
        // The connect timeout covers the TLS handshake (tonic bounds the
        // whole connector). Pings go out whenever the peer has been silent
        // for an interval, idle or not, so that a peer that stopped (a
        // frozen process, a black-holed network) closes the channel, and
        // fails the calls on it, within interval + timeout.
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| {
                let e = CallError::Unavailable(format!("relay to `{addr}`: {e}"));
                (RelayErrorCause::Connect, e)
            })?
            .connect_timeout(self.settings.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.settings.keepalive_interval)
            .keep_alive_timeout(self.settings.keepalive_timeout)
            .keep_alive_while_idle(true);
        let channel = match &self.tls {
            Some(creds) => {
                let expect = Expect::Agent {
                    region: region.to_string(),
                };
                TlsConnect::new(creds.rustls_client(expect)).channel(endpoint)
            }
            None => endpoint.connect_lazy(),
        };
        let acks_early = Arc::new(AtomicBool::new(false));
        channels.insert(
            key,
            Pooled {
                channel: channel.clone(),
                acks_early: acks_early.clone(),
            },
        );
        Ok((channel, acks_early))
    }

    /// Relays a call to an agent of `region`; returns once the destination
    /// has answered with its head (the first byte of the answer), so that
    /// failing over stays possible until then. The destination must
    /// acknowledge the call within the attempt deadline (one known to
    /// acknowledge early; others within the head's own wait). The
    /// destination's spans, which come in the trailer, go to `call.spans`.
    pub async fn call(
        &self,
        cfg: &AgentConfig,
        region: &str,
        call: RelayedCall<'_>,
    ) -> Result<UpstreamAnswer, CallError> {
        let RelayedCall {
            profile,
            model,
            api,
            body,
            stream,
            request_id,
            traceparent,
            spans,
            ttft_objective,
        } = call;
        // An agent of the region that serves the call's API (agents that
        // announce none serve chat and completions).
        let agents: Vec<&str> = cfg
            .relays
            .get(region)
            .into_iter()
            .flatten()
            .filter(|a| a.apis.contains(api))
            .map(|a| a.address.as_str())
            .collect();
        if agents.is_empty() {
            return Err(CallError::Unavailable(format!(
                "no agent of region `{region}` serving the {api} API is connected"
            )));
        }
        let addr = agents[fastrand::usize(..agents.len())];
        let (channel, acks_early) = self
            .channel(region, addr)
            .map_err(|(cause, e)| self.failed(region, cause, e))?;
        let mut client = RelayServiceClient::new(channel)
            .max_decoding_message_size(MAX_RELAY_MESSAGE)
            .max_encoding_message_size(MAX_RELAY_MESSAGE);
        // A stream's head comes at once; a unary answer's when it is done.
        let head_wait = if stream {
            self.settings.header_timeout
        } else {
            self.settings.body_timeout
        };
        // An agent known to acknowledge early must do so within the attempt
        // deadline; any other (an older build, or one not called yet) may
        // acknowledge with its head, and gets the head's wait, watched by
        // the channel's pings.
        let ack_wait = if acks_early.load(Ordering::Relaxed) {
            self.settings.header_timeout.min(head_wait)
        } else {
            head_wait
        };
        let mut req = Request::new(pb::RelayRequest {
            request_id: request_id.to_string(),
            source_region: cfg.region.clone(),
            profile: profile.to_string(),
            model: model.to_string(),
            body,
            stream,
            traceparent: traceparent.header(),
            api: api.as_str().to_string(),
            ttft_objective_ms: ttft_objective
                .map_or(0, |d| d.as_millis().min(u128::from(u32::MAX)) as u32),
        });
        req.metadata_mut().insert(
            SOURCE_AGENT,
            self.me.parse().expect("agent ids are valid metadata"),
        );
        let acked = match tokio::time::timeout(ack_wait, client.relay(req)).await {
            Err(_) => {
                return Err(self.failed(
                    region,
                    RelayErrorCause::Timeout,
                    CallError::Unavailable(format!(
                        "agent {addr} of {region} did not take the call within {ack_wait:?}"
                    )),
                ));
            }
            Ok(Err(status)) => {
                let cause = RelayErrorCause::of_status(&status);
                return Err(self.failed(region, cause, from_status(region, status)));
            }
            Ok(Ok(acked)) => acked,
        };
        if acked.metadata().contains_key(ACK) {
            acks_early.store(true, Ordering::Relaxed);
        }
        let mut events = acked.into_inner();
        // Taken: the head comes when the destination's model server
        // answers, which the destination bounds itself. Meanwhile the
        // channel's pings watch the destination.
        let head = match tokio::time::timeout(head_wait, events.message()).await {
            Err(_) => {
                return Err(self.failed(
                    region,
                    RelayErrorCause::Timeout,
                    CallError::Unavailable(format!(
                        "agent {addr} of {region} did not answer within {head_wait:?}"
                    )),
                ));
            }
            Ok(Err(status)) => {
                let cause = RelayErrorCause::of_status(&status);
                return Err(self.failed(region, cause, from_status(region, status)));
            }
            Ok(Ok(head)) => head,
        };
        let status = match head.and_then(|e| e.event) {
            // The answer must come from the region the call was sent to,
            // or the audit record and the tenant's policy would be wrong.
            Some(Event::Head(h)) if h.inference_region != region => {
                return Err(self.failed(
                    region,
                    RelayErrorCause::Refused,
                    CallError::Unavailable(format!(
                        "agent {addr} answered for region `{}`, not `{region}`",
                        h.inference_region
                    )),
                ));
            }
            Some(Event::Head(h)) => {
                http::StatusCode::from_u16(h.status as u16).unwrap_or(http::StatusCode::BAD_GATEWAY)
            }
            // The call ended (or sent a chunk) before any head.
            _ => {
                tracing::warn!(agent = %addr, %region, "a relay answered without a head");
                return Err(self.failed(
                    region,
                    RelayErrorCause::Reset,
                    CallError::Upstream(format!("the agent of {region} answered without a head")),
                ));
            }
        };
        let region = region.to_string();
        // A refusal by the model server (4xx) is one JSON body even for a
        // stream, so that the front door answers it as JSON.
        if stream && status.is_success() {
            let body = async_stream(events, region, spans.clone());
            return Ok(UpstreamAnswer {
                status,
                body: AnswerBody::Stream(body.boxed()),
            });
        }
        let mut buf = Vec::new();
        loop {
            match events.message().await {
                Ok(Some(pb::RelayEvent {
                    event: Some(Event::Chunk(c)),
                })) => buf.extend_from_slice(&c),
                Ok(Some(pb::RelayEvent {
                    event: Some(Event::Trailer(t)),
                })) => keep_spans(spans, &t),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(s) => return Err(broke_off(&region, &s)),
            }
        }
        Ok(UpstreamAnswer {
            status,
            body: AnswerBody::Full(buf.into()),
        })
    }
}

/// What a source agent relays.
pub struct RelayedCall<'a> {
    pub profile: &'a str,
    pub model: &'a str,
    pub api: Api,
    pub body: Bytes,
    pub stream: bool,
    pub request_id: &'a str,
    /// The source's span for this attempt, which the destination's spans
    /// hang from.
    pub traceparent: TraceParent,
    pub spans: &'a RemoteSpans,
    /// The route table's time-to-first-token objective, which the
    /// destination applies to its own model servers.
    pub ttft_objective: Option<Duration>,
}

/// Keeps the spans a destination sent in its trailer.
fn keep_spans(into: &RemoteSpans, t: &pb::RelayTrailer) {
    if !t.spans.is_empty()
        && let Some(rs) = trace::decode(&t.spans)
    {
        into.lock().unwrap_or_else(|p| p.into_inner()).push(rs);
    }
}

/// The body chunks of a relayed stream, as they arrive.
fn async_stream(
    events: tonic::Streaming<pb::RelayEvent>,
    region: String,
    spans: RemoteSpans,
) -> impl Stream<Item = Result<Bytes, CallError>> + Send + 'static {
    futures_util::stream::unfold(Some(events), move |state| {
        let (region, spans) = (region.clone(), spans.clone());
        async move {
            let mut events = state?;
            loop {
                match events.message().await {
                    Ok(Some(pb::RelayEvent {
                        event: Some(Event::Chunk(c)),
                    })) => return Some((Ok(c), Some(events))),
                    Ok(Some(pb::RelayEvent {
                        event: Some(Event::Trailer(t)),
                    })) => keep_spans(&spans, &t),
                    Ok(Some(_)) => continue,
                    Ok(None) => return None,
                    Err(s) => return Some((Err(broke_off(&region, &s)), None)),
                }
            }
        }
    })
}

/// A relay that broke off after its head: the client is told which region,
/// the log what happened (which may name addresses and OS errors).
fn broke_off(region: &str, s: &Status) -> CallError {
    tracing::warn!(%region, error = %s.message(), "a relay broke off");
    CallError::Upstream(format!("the relay from {region} broke off"))
}

/// Why a relay attempt failed before the answer's head, as
/// `spillway_agent_relay_errors_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayErrorCause {
    /// No connection: refused, unreachable, a bad address.
    Connect,
    /// The TLS handshake failed, or the peer's certificate is not an
    /// agent's of the region.
    Tls,
    /// Connecting, the acknowledgment or the head, or a ping's answer took
    /// too long.
    Timeout,
    /// The destination answered with an error status (at capacity,
    /// unavailable, not served here, a call it will not take) or a head
    /// for another region.
    Refused,
    /// The connection or the call broke off with no status from the
    /// destination. A call that a hung destination had taken when the
    /// channel's pings gave up on it lands here too: it only learns that
    /// its connection closed (a broken pipe), while the calls still
    /// waiting to be taken see the pings' timeout.
    Reset,
}

impl RelayErrorCause {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayErrorCause::Connect => "connect",
            RelayErrorCause::Tls => "tls",
            RelayErrorCause::Timeout => "timeout",
            RelayErrorCause::Refused => "refused",
            RelayErrorCause::Reset => "reset",
        }
    }

    /// The cause of a failed relay call. A status the destination sent
    /// has no source; one tonic made of a transport error keeps that error
    /// as its source, and what the error's chain holds decides: a TLS
    /// error, then a timeout, then a failure to connect; anything else
    /// broke an open connection or call (a reset, a GOAWAY, a closed
    /// connection).
    pub fn of_status(status: &Status) -> RelayErrorCause {
        let Some(source) = std::error::Error::source(status) else {
            return RelayErrorCause::Refused;
        };
        let chain: Vec<&(dyn std::error::Error + 'static)> = error_chain(source).collect();
        let timed_out = |e: &(dyn std::error::Error + 'static)| {
            e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
                || e.downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_timeout)
                || e.is::<tokio::time::error::Elapsed>()
                || e.is::<tonic::TimeoutExpired>()
        };
        if chain.iter().any(|e| e.is::<rustls::Error>()) {
            RelayErrorCause::Tls
        } else if chain.iter().any(|e| timed_out(*e)) {
            RelayErrorCause::Timeout
        } else if chain.iter().any(|e| e.is::<tonic::ConnectError>()) {
            RelayErrorCause::Connect
        } else {
            RelayErrorCause::Reset
        }
    }
}

/// An error and its sources, the error an `io::Error` wraps included
/// (its `source()` skips that one, and goes to the wrapped error's own).
fn error_chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    let mut next = Some(e);
    std::iter::from_fn(move || {
        let current = next?;
        next = match current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
        Some(current)
    })
}

/// How a destination's refusal maps back: saturation and unavailability
/// let the source fail over; anything else is final.
fn from_status(region: &str, s: Status) -> CallError {
    let msg = format!("{region}: {}", s.message());
    match s.code() {
        // Too large for a relay: another region would fare no better.
        Code::ResourceExhausted if s.metadata().contains_key(crate::error::TOO_LARGE) => {
            CallError::Upstream(msg)
        }
        Code::ResourceExhausted => CallError::Throttled(msg),
        // It serves the model, not over this API: the next region may.
        Code::Unimplemented => CallError::NotServedThere(msg),
        // The destination broke off, or the call cannot be relayed at all
        // (too large, malformed): another region would fare no better.
        Code::DataLoss | Code::OutOfRange | Code::InvalidArgument => CallError::Upstream(msg),
        _ => CallError::Unavailable(msg),
    }
}

#[derive(serde::Deserialize)]
struct ModelOnly {
    model: Option<String>,
    store: Option<bool>,
}

/// The destination side.
pub struct RelayServer {
    region: String,
    config: ConfigWatch,
    upstreams: Arc<Upstreams>,
    /// Counts served relays by source region; nothing about the call itself
    /// is kept here (it belongs to the source region).
    metrics: Arc<Metrics>,
    agent_id: String,
    /// With mutual TLS, callers are known by their certificates.
    tls: bool,
}

impl RelayServer {
    pub fn new(
        region: String,
        config: ConfigWatch,
        upstreams: Arc<Upstreams>,
        metrics: Arc<Metrics>,
        agent_id: String,
        tls: bool,
    ) -> RelayServer {
        RelayServer {
            region,
            config,
            upstreams,
            metrics,
            agent_id,
            tls,
        }
    }

    /// Accepts only agents of the current snapshot, from the region they
    /// claim.
    fn check_caller(&self, req: &Request<pb::RelayRequest>) -> Result<(), Status> {
        let refuse = |why: String| Err(CallError::RelayRefused(why).to_status());
        if self.tls {
            // The handshake checked the chain against the CA; the
            // certificate must name an agent of the claimed source region.
            let peer = req
                .peer_certs()
                .and_then(|certs| certs.first().and_then(|c| Peer::of_cert(c)));
            return match peer {
                Some(Peer::Agent { region, .. }) if region == req.get_ref().source_region => Ok(()),
                Some(Peer::Agent { region, agent_id }) => refuse(format!(
                    "the certificate of agent `{agent_id}` names region `{region}`, not `{}`",
                    req.get_ref().source_region
                )),
                Some(_) => refuse("relay calls are accepted only from agent certificates".into()),
                None => refuse("relay calls need an agent certificate".into()),
            };
        }
        let Some(caller) = req
            .metadata()
            .get(SOURCE_AGENT)
            .and_then(|v| v.to_str().ok())
        else {
            return refuse("relay calls are accepted only from Spillway agents".into());
        };
        let Some((region, agent)) = caller.split_once('/') else {
            return refuse(format!("`{caller}` is not <region>/<agent-id>"));
        };
        let cfg = self.config.borrow().clone();
        let known = cfg
            .as_ref()
            .and_then(|c| c.relays.get(region))
            .is_some_and(|agents| agents.iter().any(|a| a.agent_id == agent));
        if !known {
            return refuse(format!("`{caller}` is not a known agent"));
        }
        if region != req.get_ref().source_region {
            return refuse(format!(
                "agent `{caller}` claims source region `{}`",
                req.get_ref().source_region
            ));
        }
        Ok(())
    }
}

type RelayStream = Pin<Box<dyn Stream<Item = Result<pb::RelayEvent, Status>> + Send>>;

fn event(e: Event) -> Result<pb::RelayEvent, Status> {
    Ok(pb::RelayEvent { event: Some(e) })
}

#[tonic::async_trait]
impl RelayService for RelayServer {
    type RelayStream = RelayStream;

    async fn relay(&self, req: Request<pb::RelayRequest>) -> Result<Response<RelayStream>, Status> {
        self.check_caller(&req)?;
        let req = req.into_inner();
        let api = Api::from_wire(&req.api).map_err(|e| Status::invalid_argument(e.to_string()))?;
        // The body must ask for the model the relay names: the destination
        // serves what the source resolved, nothing else.
        let read = serde_json::from_slice::<ModelOnly>(&req.body).ok();
        let body_model = read.as_ref().and_then(|m| m.model.as_deref());
        if body_model != Some(req.model.as_str()) {
            return Err(Status::invalid_argument(format!(
                "the relayed body asks for model {body_model:?}, not `{}`",
                req.model
            )));
        }
        // Nothing about a relayed call may be kept here: a Responses call
        // must tell the engine not to store it (the source sees to that;
        // the destination does not take it on trust).
        if api == Api::Responses && read.and_then(|m| m.store) != Some(false) {
            return Err(Status::invalid_argument(
                "a relayed Responses call must say `store: false`: nothing may be kept where it is served",
            ));
        }
        // An agent announces the APIs of all its model servers together: a
        // call whose model is served here only over other APIs is sent on
        // by the source, without counting against this region.
        if !self.upstreams.serves(&req.model, api) {
            count(&self.metrics, &req.source_region, "not_served");
            return Err(Status::unimplemented(format!(
                "region `{}` serves `{}` over no model server of the {api} API",
                self.region, req.model
            )));
        }
        // Served here or not at all: a relayed call is never relayed again.
        // Taken: the answer is served by a task that sends its events as
        // they come, and the response goes back at once, its headers (with
        // `ACK`) before the model server has answered, so that the source
        // can tell a destination that took the call from one that hung.
        let (tx, rx) = mpsc::channel(16);
        let serving = Serving {
            region: self.region.clone(),
            agent_id: self.agent_id.clone(),
            upstreams: self.upstreams.clone(),
            metrics: self.metrics.clone(),
        };
        tokio::spawn(serving.serve(req, api, tx));
        let mut response: Response<RelayStream> = Response::new(Box::pin(ReceiverStream::new(rx)));
        response
            .metadata_mut()
            .insert(ACK, tonic::metadata::MetadataValue::from_static("1"));
        Ok(response)
    }
}

fn count(metrics: &Metrics, source_region: &str, outcome: &str) {
    metrics.add(
        "spillway_agent_relay_served_total",
        &[("source_region", source_region), ("outcome", outcome)],
        1,
    );
}

/// What serving a relayed call takes, moved into its task.
struct Serving {
    region: String,
    agent_id: String,
    upstreams: Arc<Upstreams>,
    metrics: Arc<Metrics>,
}

impl Serving {
    /// Calls the model servers and sends the head, the body's chunks and
    /// the trailer on `tx`, or the refusal as the stream's status.
    async fn serve(
        self,
        req: pb::RelayRequest,
        api: Api,
        tx: mpsc::Sender<Result<pb::RelayEvent, Status>>,
    ) {
        let started = tokio::time::Instant::now();
        let estimate = crate::quota::estimate_input_tokens(req.body.len());
        let (start_ns, server_span, model_span) =
            (trace::now_ns(), trace::new_span_id(), trace::new_span_id());
        let calling = self.upstreams.call(
            &req.model,
            api,
            req.body.clone(),
            req.stream,
            (req.ttft_objective_ms > 0)
                .then(|| Duration::from_millis(u64::from(req.ttft_objective_ms))),
        );
        // A source that went away (or gave up) releases the model server
        // at once.
        let answer = tokio::select! {
            answer = calling => answer,
            _ = tx.closed() => return,
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                count(&self.metrics, &req.source_region, "refused");
                let status = match e {
                    CallError::Throttled(m) | CallError::AtCapacity(m) => {
                        Status::resource_exhausted(m)
                    }
                    CallError::Upstream(m) => Status::data_loss(m),
                    other => Status::unavailable(other.to_string()),
                };
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        count(&self.metrics, &req.source_region, "served");
        // This agent's spans of the call ride back in the trailer; nothing
        // of them is exported here.
        let spans: Arc<Mutex<Bytes>> = Arc::default();
        let answer_body = match TraceParent::parse(&req.traceparent).filter(|t| t.sampled) {
            Some(parent) => {
                let op = api.operation_name();
                let (slot, region, agent) =
                    (spans.clone(), self.region.clone(), self.agent_id.clone());
                let (model, status, source) =
                    (req.model.clone(), answer.status, req.source_region.clone());
                Meter::new(started, estimate)
                    .on_finish(Box::new(move |f| {
                        let end = trace::now_ns();
                        let mut genai = vec![
                            kv("gen_ai.operation.name", op),
                            kv("gen_ai.provider.name", "openai_compatible"),
                            kv("gen_ai.request.model", model.as_str()),
                            kv("gen_ai.usage.input_tokens", f.input_tokens),
                            kv("gen_ai.usage.output_tokens", f.output_tokens),
                            kv("gen_ai.response.finish_reasons", f.finish_reasons.clone()),
                            kv("spillway.source_region", source.as_str()),
                            kv("spillway.inference_region", region.as_str()),
                        ];
                        if let Some(t) = f.ttft {
                            genai.push(kv("spillway.time_to_first_token_ms", t.as_millis() as u64));
                        }
                        let error = (!status.is_success() || !f.complete)
                            .then(|| format!("status {status}, complete: {}", f.complete));
                        let relay = trace::span(
                            parent.trace_id,
                            server_span,
                            Some(parent.span_id),
                            format!("relay {region}"),
                            SpanKind::Server,
                            start_ns,
                            end,
                            vec![
                                kv("spillway.source_region", source.as_str()),
                                kv("spillway.inference_region", region.as_str()),
                            ],
                            error.clone(),
                        );
                        let call = trace::span(
                            parent.trace_id,
                            model_span,
                            Some(server_span),
                            format!("{op} {model}"),
                            SpanKind::Client,
                            start_ns,
                            end,
                            genai,
                            error,
                        );
                        let rs = trace::resource_spans(&region, &agent, vec![relay, call]);
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = trace::encode(&rs);
                    }))
                    .body(answer.body)
            }
            None => answer.body,
        };
        let head = Event::Head(pb::RelayHead {
            status: u32::from(answer.status.as_u16()),
            inference_region: self.region.clone(),
        });
        if tx.send(event(head)).await.is_err() {
            return;
        }
        match answer_body {
            AnswerBody::Full(b) => {
                let _ = tx.send(event(Event::Chunk(b))).await;
            }
            AnswerBody::Stream(mut s) => {
                loop {
                    // A source that went away releases the model server
                    // at once.
                    let chunk = tokio::select! {
                        c = s.next() => match c {
                            Some(c) => c,
                            None => break,
                        },
                        _ = tx.closed() => return,
                    };
                    let msg = chunk.map(|c| pb::RelayEvent {
                        event: Some(Event::Chunk(c)),
                    });
                    let failed = msg.is_err();
                    if tx
                        .send(msg.map_err(|e| Status::data_loss(e.to_string())))
                        .await
                        .is_err()
                        || failed
                    {
                        return;
                    }
                }
            }
        }
        let spans = std::mem::take(&mut *spans.lock().unwrap_or_else(|p| p.into_inner()));
        let _ = tx
            .send(event(Event::Trailer(pb::RelayTrailer {
                usage: None,
                spans: spans.to_vec().into(),
            })))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicU32;

    use spillway_core::api::ApiSet;
    use tokio::net::TcpListener;

    use super::*;
    use crate::control::snapshot::RelayEndpoint;
    use crate::upstream::ModelServerSpec;
    use crate::upstream::engine::MetricsMode;

    /// A config of region `src` that knows one agent `dst/d` at `addr`.
    fn config(addr: &str) -> AgentConfig {
        let endpoint = |region: &str, id: &str| {
            (
                region.to_string(),
                vec![RelayEndpoint {
                    agent_id: id.into(),
                    address: addr.into(),
                    apis: ApiSet::of(Api::DEFAULT),
                }],
            )
        };
        AgentConfig {
            version: 1,
            region: "src".into(),
            regions: BTreeMap::new(),
            relays: [endpoint("dst", "d"), endpoint("src", "s")].into(),
            profiles: BTreeMap::new(),
            routes: BTreeMap::new(),
            profiles_elsewhere: Default::default(),
            quotas: Vec::new(),
            tenants: BTreeMap::new(),
            keys: Default::default(),
            digests: Default::default(),
        }
    }

    fn body() -> Bytes {
        Bytes::from(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
    }

    async fn relay(clients: &RelayClients, cfg: &AgentConfig) -> Result<UpstreamAnswer, CallError> {
        let spans = RemoteSpans::default();
        clients
            .call(
                cfg,
                "dst",
                RelayedCall {
                    profile: "us.m",
                    model: "m",
                    api: Api::Chat,
                    body: body(),
                    stream: false,
                    request_id: "r",
                    traceparent: TraceParent {
                        trace_id: [0; 16],
                        span_id: [0; 8],
                        sampled: false,
                    },
                    spans: &spans,
                    ttft_objective: None,
                },
            )
            .await
    }

    fn settings() -> UpstreamSettings {
        UpstreamSettings {
            connect_timeout: Duration::from_millis(500),
            header_timeout: Duration::from_millis(400),
            keepalive_interval: Duration::from_millis(200),
            keepalive_timeout: Duration::from_millis(300),
            ..UpstreamSettings::default()
        }
    }

    fn relay_clients() -> (RelayClients, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new(spillway_core::metrics::AGENT));
        let clients = RelayClients::new("src", "s", settings(), None, metrics.clone());
        (clients, metrics)
    }

    /// The relay errors to `dst` counted, by cause.
    fn relay_errors(metrics: &Metrics) -> Vec<String> {
        metrics
            .render()
            .lines()
            .filter_map(|l| {
                l.strip_prefix("spillway_agent_relay_errors_total{inference_region=\"dst\",")
            })
            .map(str::to_string)
            .collect()
    }

    /// A destination whose kernel takes the connection and the bytes but
    /// that never answers (a stopped process): a unary call to an agent
    /// not known to acknowledge early waits for its head as long as a
    /// generation may take, but the channel's unanswered pings end it.
    #[tokio::test]
    async fn a_silent_destination_is_given_up_when_pings_go_unanswered() {
        let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = config(&mute.local_addr().unwrap().to_string());
        let (clients, metrics) = relay_clients();
        let started = tokio::time::Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), relay(&clients, &cfg))
            .await
            .expect("the keep-alive ends the call, not this test's guard");
        assert!(
            matches!(result, Err(CallError::Unavailable(_))),
            "{:?}",
            result.err()
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(relay_errors(&metrics), ["cause=\"timeout\"} 1"]);
    }

    /// Answers its first relay at once (acknowledging early), and never
    /// takes another: an agent whose connection is alive but which hung.
    struct TakesOne(AtomicU32);

    #[tonic::async_trait]
    impl RelayService for TakesOne {
        type RelayStream = RelayStream;

        async fn relay(
            &self,
            _: Request<pb::RelayRequest>,
        ) -> Result<Response<RelayStream>, Status> {
            if self.0.fetch_add(1, Ordering::Relaxed) > 0 {
                std::future::pending::<()>().await;
            }
            let events = [
                event(Event::Head(pb::RelayHead {
                    status: 200,
                    inference_region: "dst".into(),
                })),
                event(Event::Chunk(Bytes::from_static(b"{}"))),
            ];
            let mut response: Response<RelayStream> =
                Response::new(Box::pin(futures_util::stream::iter(events)));
            response
                .metadata_mut()
                .insert(ACK, tonic::metadata::MetadataValue::from_static("1"));
            Ok(response)
        }
    }

    #[tokio::test]
    async fn an_agent_that_acknowledged_early_must_take_each_call_in_the_attempt_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(pb::relay_service_server::RelayServiceServer::new(TakesOne(
                AtomicU32::new(0),
            )))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = tokio::spawn(server);
        let cfg = config(&addr.to_string());
        let (clients, metrics) = relay_clients();
        let first = relay(&clients, &cfg)
            .await
            .expect("the first call is served");
        assert_eq!(first.status, http::StatusCode::OK);
        // The second is never taken; its connection answers pings, so only
        // the attempt deadline tells, long before the answer's timeout.
        let started = tokio::time::Instant::now();
        let second = tokio::time::timeout(Duration::from_secs(10), relay(&clients, &cfg))
            .await
            .expect("the attempt deadline ends the call, not this test's guard");
        let took = started.elapsed();
        match second {
            Err(CallError::Unavailable(m)) => assert!(m.contains("did not take the call"), "{m}"),
            other => panic!("{:?}", other.err()),
        }
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(relay_errors(&metrics), ["cause=\"timeout\"} 1"]);
        server.abort();
    }

    /// Refuses every call as a saturated destination does.
    struct AtCapacity;

    #[tonic::async_trait]
    impl RelayService for AtCapacity {
        type RelayStream = RelayStream;

        async fn relay(
            &self,
            _: Request<pb::RelayRequest>,
        ) -> Result<Response<RelayStream>, Status> {
            Err(Status::resource_exhausted(
                "every model server is saturated",
            ))
        }
    }

    #[tokio::test]
    async fn failed_relays_are_counted_by_cause() {
        // Nothing listens: the connection is refused.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = config(&closed.local_addr().unwrap().to_string());
        drop(closed);
        let (clients, metrics) = relay_clients();
        let result = relay(&clients, &cfg).await;
        assert!(
            matches!(result, Err(CallError::Unavailable(_))),
            "{:?}",
            result.err()
        );
        assert_eq!(relay_errors(&metrics), ["cause=\"connect\"} 1"]);

        // A peer that takes the connection and closes it at once.
        let closing = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = config(&closing.local_addr().unwrap().to_string());
        let closer = tokio::spawn(async move {
            while let Ok((conn, _)) = closing.accept().await {
                drop(conn);
            }
        });
        let (clients, metrics) = relay_clients();
        let result = relay(&clients, &cfg).await;
        assert!(result.is_err());
        assert_eq!(relay_errors(&metrics), ["cause=\"reset\"} 1"]);
        closer.abort();

        // A destination that answers with a refusal.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = config(&listener.local_addr().unwrap().to_string());
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::relay_service_server::RelayServiceServer::new(
                    AtCapacity,
                ))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let (clients, metrics) = relay_clients();
        for _ in 0..2 {
            let result = relay(&clients, &cfg).await;
            assert!(
                matches!(result, Err(CallError::Throttled(_))),
                "{:?}",
                result.err()
            );
        }
        assert_eq!(relay_errors(&metrics), ["cause=\"refused\"} 2"]);
        server.abort();
    }

    #[test]
    fn transport_errors_map_to_their_causes() {
        use std::io::{Error, ErrorKind};
        let of = |e: Box<dyn std::error::Error + Send + Sync>| {
            RelayErrorCause::of_status(&Status::from_error(e))
        };
        let connecting = |e: Error| of(Box::new(tonic::ConnectError(Box::new(e))));
        // What the destination says is a refusal, whatever the code.
        for status in [
            Status::resource_exhausted("saturated"),
            Status::unavailable("no model server"),
            Status::permission_denied("not an agent of us-east"),
            Status::unimplemented("not over this API"),
        ] {
            assert_eq!(
                RelayErrorCause::of_status(&status),
                RelayErrorCause::Refused
            );
        }
        assert_eq!(
            connecting(Error::from(ErrorKind::ConnectionRefused)),
            RelayErrorCause::Connect
        );
        // The verifier's refusal, wrapped in an `io::Error` by tokio-rustls.
        let bad_cert = rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName);
        assert_eq!(
            connecting(Error::new(ErrorKind::InvalidData, bad_cert)),
            RelayErrorCause::Tls
        );
        // tonic's connect timeout (hyper-timeout) is an `io::Error`.
        assert_eq!(
            of(Box::new(Error::new(ErrorKind::TimedOut, "connecting"))),
            RelayErrorCause::Timeout
        );
        assert_eq!(
            connecting(Error::new(ErrorKind::TimedOut, "handshake")),
            RelayErrorCause::Timeout
        );
        assert_eq!(
            of(Box::new(Error::from(ErrorKind::ConnectionReset))),
            RelayErrorCause::Reset
        );
    }

    /// The destination acknowledges a call when it takes it, before its
    /// model server (here one that never answers) has said anything.
    #[tokio::test]
    async fn the_destination_acknowledges_before_its_model_server_answers() {
        let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let spec = ModelServerSpec {
            metrics: MetricsMode::None,
            capacity: Some(4),
            fixed: true,
            ..ModelServerSpec::new(&format!("http://{}", mute.local_addr().unwrap()), ["m"])
        };
        let upstreams = Arc::new(Upstreams::new(vec![spec], UpstreamSettings::default()));
        let cfg = Arc::new(config("127.0.0.1:9"));
        let (_keep, watch) = tokio::sync::watch::channel(Some(cfg));
        let server = RelayServer::new(
            "dst".into(),
            watch,
            upstreams.clone(),
            Arc::new(Metrics::new(spillway_core::metrics::AGENT)),
            "d".into(),
            false,
        );
        let mut req = Request::new(pb::RelayRequest {
            request_id: "r".into(),
            source_region: "src".into(),
            profile: "us.m".into(),
            model: "m".into(),
            body: body(),
            api: "chat".into(),
            ..Default::default()
        });
        req.metadata_mut()
            .insert(SOURCE_AGENT, "src/s".parse().unwrap());
        let response = tokio::time::timeout(Duration::from_secs(2), server.relay(req))
            .await
            .expect("acknowledged at once")
            .expect("taken");
        assert!(response.metadata().contains_key(ACK));
        // The call is under way: the model server's slot is taken until
        // the source goes away.
        in_flight(&upstreams, 1).await;
        drop(response);
        in_flight(&upstreams, 0).await;
    }

    /// Waits (up to 2 s) until the model server has `n` calls in flight.
    async fn in_flight(upstreams: &Upstreams, n: u32) {
        for _ in 0..200 {
            if upstreams.servers()[0].in_flight() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the model server never had {n} calls in flight");
    }
}
