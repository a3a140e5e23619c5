//! Traces, in OpenTelemetry's protocol (OTLP over gRPC), built by hand so
//! that a relayed call's spans can travel back inside the relay answer.
//!
//! The source agent of a call records its spans (the call, each attempt,
//! the model-server call with the GenAI attributes) and exports them to its
//! own region's collector (`--otlp-endpoint`). A destination agent serving
//! a relayed call records its spans too, but never exports them: it encodes
//! them into the relay's trailer, and the source exports them with its own.
//! So the source region's collector holds the whole trace and the
//! destination's holds nothing of it.
//!
//! W3C `traceparent` is accepted from clients (HTTP header, gRPC metadata)
//! and propagated over the relay.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, logs_service_client::LogsServiceClient,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, trace_service_client::TraceServiceClient,
};
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span};
use prost::Message;
use tokio::sync::mpsc;
use tonic::transport::{Channel, ClientTlsConfig};

/// A W3C trace context: the trace, and the span a child hangs from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The `sampled` flag: whether the caller records this trace.
    pub sampled: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    (out != [0u8; N]).then_some(out)
}

impl TraceParent {
    /// Parses `00-<trace-id>-<parent-id>-<flags>`; anything else (another
    /// version, all-zero ids) is ignored, as the W3C spec says.
    pub fn parse(value: &str) -> Option<TraceParent> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() || flags.len() != 2 {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(TraceParent {
            trace_id: unhex::<16>(trace)?,
            span_id: unhex::<8>(span)?,
            sampled: flags & 1 == 1,
        })
    }

    pub fn header(&self) -> String {
        let flags = if self.sampled { "01" } else { "00" };
        format!("00-{}-{}-{flags}", hex(&self.trace_id), hex(&self.span_id))
    }

    pub fn trace_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

pub fn new_span_id() -> [u8; 8] {
    fastrand::u64(1..).to_be_bytes()
}

pub fn new_trace_id() -> [u8; 16] {
    fastrand::u128(1..).to_be_bytes()
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub fn kv(key: &str, value: impl Into<Attr>) -> KeyValue {
    let value = match value.into() {
        Attr::Str(s) => any_value::Value::StringValue(s),
        Attr::Int(i) => any_value::Value::IntValue(i),
        Attr::Strs(v) => any_value::Value::ArrayValue(ArrayValue {
            values: v
                .into_iter()
                .map(|s| AnyValue {
                    value: Some(any_value::Value::StringValue(s)),
                })
                .collect(),
        }),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

pub enum Attr {
    Str(String),
    Int(i64),
    Strs(Vec<String>),
}

impl From<&str> for Attr {
    fn from(s: &str) -> Self {
        Attr::Str(s.to_string())
    }
}
impl From<String> for Attr {
    fn from(s: String) -> Self {
        Attr::Str(s)
    }
}
impl From<u64> for Attr {
    fn from(i: u64) -> Self {
        Attr::Int(i64::try_from(i).unwrap_or(i64::MAX))
    }
}
impl From<Vec<String>> for Attr {
    fn from(v: Vec<String>) -> Self {
        Attr::Strs(v)
    }
}

/// One span, ready for OTLP.
#[allow(clippy::too_many_arguments)]
pub fn span(
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    name: String,
    kind: span::SpanKind,
    start_ns: u64,
    end_ns: u64,
    attributes: Vec<KeyValue>,
    error: Option<String>,
) -> Span {
    Span {
        trace_id: trace_id.to_vec(),
        span_id: span_id.to_vec(),
        parent_span_id: parent.map(|p| p.to_vec()).unwrap_or_default(),
        name,
        kind: kind as i32,
        start_time_unix_nano: start_ns,
        end_time_unix_nano: end_ns.max(start_ns),
        attributes,
        status: Some(match error {
            Some(message) => Status { message, code: 2 },
            None => Status {
                message: String::new(),
                code: 1,
            },
        }),
        ..Span::default()
    }
}

fn resource(region: &str, agent_id: &str) -> Resource {
    Resource {
        attributes: vec![
            kv("service.name", "spillway-agent"),
            kv("spillway.region", region),
            kv("spillway.agent_id", agent_id),
        ],
        ..Resource::default()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "spillway".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..InstrumentationScope::default()
    }
}

/// An audit record as an OTLP log record: the JSON line as its body, in
/// the call's trace (`trace_id`, `span_id`).
pub fn audit_log(
    request_id: &str,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    json: &[u8],
    region: &str,
) -> LogRecord {
    let now = now_ns();
    LogRecord {
        time_unix_nano: now,
        observed_time_unix_nano: now,
        severity_number: 9, // INFO
        severity_text: "INFO".into(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(
                String::from_utf8_lossy(json).into_owned(),
            )),
        }),
        attributes: vec![
            kv("spillway.request_id", request_id),
            kv("spillway.source_region", region),
        ],
        trace_id: trace_id.to_vec(),
        span_id: span_id.to_vec(),
        event_name: "spillway.audit".into(),
        ..LogRecord::default()
    }
}

/// Spans of one agent, under its resource (service, region, agent).
pub fn resource_spans(region: &str, agent_id: &str, spans: Vec<Span>) -> ResourceSpans {
    ResourceSpans {
        resource: Some(resource(region, agent_id)),
        scope_spans: vec![ScopeSpans {
            scope: Some(scope()),
            spans,
            schema_url: String::new(),
        }],
        schema_url: String::new(),
    }
}

pub fn encode(rs: &ResourceSpans) -> Bytes {
    rs.encode_to_vec().into()
}

pub fn decode(bytes: &[u8]) -> Option<ResourceSpans> {
    ResourceSpans::decode(bytes).ok()
}

/// Where a relayed call's spans land when its trailer arrives.
pub type RemoteSpans = Arc<Mutex<Vec<ResourceSpans>>>;

/// Exports the source agent's traces to its region's collector, off the
/// request path: batched every 500 ms; when the collector is away or slow,
/// spans are dropped (and counted in the log), never queued without bound.
pub struct Tracer {
    tx: Option<mpsc::Sender<Export<ResourceSpans>>>,
    logs: Option<mpsc::Sender<Export<LogRecord>>>,
    pub region: String,
    pub agent_id: String,
    /// The share of calls without a caller's decision that are traced.
    sample_ratio: f64,
}

const EXPORT_QUEUE: usize = 4096;

/// What an exporter is handed: an item, or a request to export what came
/// before at once, answered when done.
enum Export<T> {
    Item(T),
    Flush(tokio::sync::oneshot::Sender<()>),
}
/// How long an exporter gathers before one export.
const EXPORT_BATCH: Duration = Duration::from_millis(200);

impl Tracer {
    /// Exports to the region's collector (its endpoint, as configured, and
    /// a channel to it), when there is one.
    pub fn start(
        collector: Option<(String, Channel)>,
        region: String,
        agent_id: String,
        sample_ratio: f64,
    ) -> Arc<Tracer> {
        let (tx, logs) = match collector {
            Some((ep, channel)) => {
                let (tx, rx) = mpsc::channel(EXPORT_QUEUE);
                tokio::spawn(export(ep.clone(), channel.clone(), rx));
                let (logs, logs_rx) = mpsc::channel(EXPORT_QUEUE);
                let resource = resource(&region, &agent_id);
                tokio::spawn(export_logs(ep, channel, resource, logs_rx));
                (Some(tx), Some(logs))
            }
            None => (None, None),
        };
        Arc::new(Tracer {
            tx,
            logs,
            region,
            agent_id,
            sample_ratio,
        })
    }

    /// Whether a call with no sampling decision of its caller is traced.
    pub fn sample(&self) -> bool {
        self.tx.is_some() && (self.sample_ratio >= 1.0 || fastrand::f64() < self.sample_ratio)
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Hands a log record (an audit record) to the logs exporter.
    pub fn export_log(&self, record: LogRecord) {
        if let Some(tx) = &self.logs
            && tx.try_send(Export::Item(record)).is_err()
        {
            tracing::debug!("the log exporter is behind; a record dropped");
        }
    }

    pub fn export(&self, batch: Vec<ResourceSpans>) {
        if let Some(tx) = &self.tx {
            for rs in batch {
                if tx.try_send(Export::Item(rs)).is_err() {
                    tracing::debug!("the trace exporter is behind; spans dropped");
                }
            }
        }
    }
}

impl Tracer {
    /// Exports what was handed over so far, at once; for shutdown. Returns
    /// whether both exporters finished within `within`.
    pub async fn flush(&self, within: Duration) -> bool {
        async fn one<T>(tx: &Option<mpsc::Sender<Export<T>>>) -> bool {
            let Some(tx) = tx else { return true };
            let (reply, done) = tokio::sync::oneshot::channel();
            tx.send(Export::Flush(reply)).await.is_ok() && done.await.is_ok()
        }
        tokio::time::timeout(within, async {
            let (spans, logs) = tokio::join!(one(&self.tx), one(&self.logs));
            spans && logs
        })
        .await
        .unwrap_or(false)
    }
}

/// A lazily connecting channel to the collector; over TLS with `tls`.
pub fn collector(endpoint: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let mut ep = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        ep = ep.tls_config(tls).map_err(|e| e.to_string())?;
    }
    Ok(ep.connect_lazy())
}

async fn export(endpoint: String, channel: Channel, mut rx: mpsc::Receiver<Export<ResourceSpans>>) {
    let mut client = TraceServiceClient::new(channel);
    let mut failures = 0u64;
    while let Some(first) = rx.recv().await {
        // Gather what arrives within a short window into one export.
        let (batch, flush) = gather(&mut rx, first).await;
        if !batch.is_empty() {
            let req = ExportTraceServiceRequest {
                resource_spans: batch,
            };
            let sent = tokio::time::timeout(Duration::from_secs(5), client.export(req)).await;
            if !matches!(sent, Ok(Ok(_))) {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(%endpoint, failures, "could not export traces; spans dropped");
                }
            }
        }
        if let Some(reply) = flush {
            let _ = reply.send(());
        }
    }
}

/// `first` and what else arrives within one batch window, up to 2,048,
/// and a flush request if one came (it ends the batch, without waiting).
async fn gather<T>(
    rx: &mut mpsc::Receiver<Export<T>>,
    first: Export<T>,
) -> (Vec<T>, Option<tokio::sync::oneshot::Sender<()>>) {
    let mut batch = Vec::new();
    match first {
        Export::Item(item) => {
            tokio::time::sleep(EXPORT_BATCH).await;
            batch.push(item);
        }
        Export::Flush(reply) => return (batch, Some(reply)),
    }
    while batch.len() < 2048 {
        match rx.try_recv() {
            Ok(Export::Item(item)) => batch.push(item),
            Ok(Export::Flush(reply)) => return (batch, Some(reply)),
            Err(_) => break,
        }
    }
    (batch, None)
}

/// Exports audit records as OTLP logs, batched like spans.
async fn export_logs(
    endpoint: String,
    channel: Channel,
    resource: Resource,
    mut rx: mpsc::Receiver<Export<LogRecord>>,
) {
    let mut client = LogsServiceClient::new(channel);
    let mut failures = 0u64;
    while let Some(first) = rx.recv().await {
        let (batch, flush) = gather(&mut rx, first).await;
        if !batch.is_empty() {
            let req = ExportLogsServiceRequest {
                resource_logs: vec![ResourceLogs {
                    resource: Some(resource.clone()),
                    scope_logs: vec![ScopeLogs {
                        scope: Some(scope()),
                        log_records: batch,
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                }],
            };
            let sent = tokio::time::timeout(Duration::from_secs(5), client.export(req)).await;
            if !matches!(sent, Ok(Ok(_))) {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(%endpoint, failures, "could not export audit logs; records dropped");
                }
            }
        }
        if let Some(reply) = flush {
            let _ = reply.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_ones_are_ignored() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = TraceParent::parse(v).unwrap();
        assert_eq!(tp.header(), v);
        assert!(tp.sampled);
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!TraceParent::parse(unsampled).unwrap().sampled);
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "garbage",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn spans_survive_the_trailer() {
        let s = span(
            new_trace_id(),
            new_span_id(),
            None,
            "relay".into(),
            span::SpanKind::Server,
            1,
            2,
            vec![kv("gen_ai.usage.output_tokens", 7u64)],
            None,
        );
        let rs = resource_spans("us-west", "w-1", vec![s.clone()]);
        let back = decode(&encode(&rs)).unwrap();
        assert_eq!(back.scope_spans[0].spans[0], s);
    }
}
