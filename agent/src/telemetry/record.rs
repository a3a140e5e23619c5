//! What the source agent records about each call it takes, when the call
//! ends: its metrics, and one audit record (JSON Lines, rotated by size)
//! with who called what, where it was served, every attempt, the tokens and
//! the timings, never the prompt or the answer. A relayed call is recorded
//! by its source agent only; the destination keeps nothing about it.
//!
//! Audit records are written by a task of their own, off the request path:
//! a call hands its record over a bounded channel and never waits; when the
//! writer falls behind, records are dropped and counted (and logged). The
//! writer's failures are counted too, by what failed.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

use spillway_core::api::Api;

use crate::error::{CallError, FailedAttempt};
use crate::telemetry::trace::{self, TraceParent, Tracer, kv};
use spillway_core::metrics::Metrics;

/// What is known of a call as it goes through the door.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub request_id: String,
    pub started: Instant,
    pub at_unix_ms: u64,
    /// `http` or `grpc`.
    pub door: &'static str,
    /// The inference API called.
    pub api: Api,
    pub tenant: Option<String>,
    pub key_id: Option<String>,
    /// The profile the call resolved to (metrics label it by this only).
    pub profile: Option<String>,
    /// What the client named, for the audit record (cut to 128 bytes).
    pub requested: Option<String>,
    pub model: Option<String>,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    /// The trace the call belongs to (the client's, from `traceparent`, or
    /// a new one), the client's span, and this call's own span.
    pub trace_id: [u8; 16],
    pub client_span: Option<[u8; 8]>,
    pub span_id: [u8; 8],
    pub started_ns: u64,
    /// Whether this call's spans are recorded and exported.
    pub sampled: bool,
}

impl CallContext {
    pub fn new(door: &'static str) -> CallContext {
        CallContext {
            request_id: format!("req_{:016x}{:08x}", fastrand::u64(..), fastrand::u32(..)),
            started: Instant::now(),
            at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            door,
            api: Api::Chat,
            tenant: None,
            key_id: None,
            profile: None,
            requested: None,
            model: None,
            stream: false,
            max_tokens: None,
            trace_id: trace::new_trace_id(),
            client_span: None,
            span_id: trace::new_span_id(),
            started_ns: trace::now_ns(),
            sampled: false,
        }
    }

    /// Notes what the client named as its model.
    pub fn requested(&mut self, model: &str) {
        let mut end = model.len().min(128);
        while !model.is_char_boundary(end) {
            end -= 1;
        }
        self.requested = Some(model[..end].to_string());
    }

    /// Joins the client's trace, from its `traceparent`, and follows its
    /// sampling decision; without one, `tracer` decides.
    pub fn join_trace(&mut self, traceparent: Option<&str>, tracer: &Tracer) {
        match traceparent.and_then(TraceParent::parse) {
            Some(tp) => {
                self.trace_id = tp.trace_id;
                self.client_span = Some(tp.span_id);
                self.sampled = tp.sampled && tracer.enabled();
            }
            None => self.sampled = tracer.sample(),
        }
    }
}

/// One region a call was tried in, as a span.
#[derive(Debug, Clone)]
pub struct AttemptSpan {
    pub region: String,
    pub span_id: [u8; 8],
    pub start_ns: u64,
    /// `None` for the attempt that served: it ends with the answer.
    pub end_ns: Option<u64>,
    pub error: Option<String>,
    pub relayed: bool,
}

/// How a call ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub status: u16,
    /// `ok`, `throttled_quota`, `throttled_capacity`, `unavailable`, `unauthenticated`,
    /// `permission_denied`, `bad_request`, `not_found`, `error`, or
    /// `incomplete` (the stream broke off or the client left).
    pub outcome: &'static str,
    pub inference_region: Option<String>,
    /// Regions tried before the serving one, with why they did not serve.
    pub attempts: Vec<FailedAttempt>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub ttft: Option<Duration>,
    pub finish_reasons: Vec<String>,
    pub attempt_spans: Vec<AttemptSpan>,
    /// Spans a destination recorded for a relayed call.
    pub remote_spans: Vec<ResourceSpans>,
}

impl Outcome {
    /// The outcome of a call that got no answer.
    pub fn of_error(e: &CallError) -> Outcome {
        let outcome = match e {
            CallError::Quota(_) => "throttled_quota",
            // Every region failed, none was saturated: an outage.
            CallError::Exhausted { .. }
                if e.http_status() == http::StatusCode::SERVICE_UNAVAILABLE =>
            {
                "unavailable"
            }
            CallError::Throttled(_) | CallError::AtCapacity(_) | CallError::Exhausted { .. } => {
                "throttled_capacity"
            }
            CallError::Unauthenticated(_) => "unauthenticated",
            CallError::PermissionDenied(_) | CallError::RelayRefused(_) => "permission_denied",
            CallError::BadRequest { .. }
            | CallError::TooLarge(_)
            | CallError::BodyTimeout(_)
            | CallError::NotCallableHere { .. }
            | CallError::ApiNotServed { .. }
            | CallError::NotServedThere(_) => "bad_request",
            CallError::ProfileNotFound(_) => "not_found",
            CallError::Unavailable(_) | CallError::Upstream(_) | CallError::NoConfig => "error",
            CallError::Cancelled => "cancelled",
        };
        let attempts = match e {
            CallError::Exhausted { attempts, .. } => attempts.clone(),
            _ => Vec::new(),
        };
        Outcome {
            status: e.http_status().as_u16(),
            outcome,
            attempts,
            ..Outcome::default()
        }
    }
}

#[derive(Serialize)]
struct Attempt<'a> {
    region: &'a str,
    outcome: &'a str,
}

/// One line of the audit log.
#[derive(Serialize)]
struct AuditRecord<'a> {
    time: String,
    request_id: &'a str,
    door: &'a str,
    api: &'a str,
    tenant: Option<&'a str>,
    key_id: Option<&'a str>,
    profile: Option<&'a str>,
    requested_model: Option<&'a str>,
    model: Option<&'a str>,
    source_region: &'a str,
    inference_region: Option<&'a str>,
    attempts: Vec<Attempt<'a>>,
    status: u16,
    outcome: &'a str,
    stream: bool,
    input_tokens: u64,
    output_tokens: u64,
    latency_ms: f64,
    ttft_ms: Option<f64>,
}

/// Where audit records go: a folder of JSON Lines files, the current one
/// `audit.jsonl`, rotated to `audit-<unix-ms>.jsonl` past `max_bytes`, the
/// oldest removed past `keep` files.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub keep: usize,
}

/// Records calls: metrics always, audit records and traces when
/// configured.
pub struct Recorder {
    pub region: String,
    pub metrics: Arc<Metrics>,
    pub tracer: Arc<Tracer>,
    audit: Option<mpsc::Sender<AuditItem>>,
    /// Audit records also go to the region's collector as OTLP logs.
    audit_otlp: bool,
    dropped: AtomicU64,
}

const AUDIT_QUEUE: usize = 16_384;

/// What the audit writer is handed: a record (one JSON line), or a request
/// to write out and sync to disk what came before, answered when done.
enum AuditItem {
    Record(Vec<u8>),
    /// Answered whether everything before it is on disk.
    Flush(tokio::sync::oneshot::Sender<bool>),
}
/// How long the audit writer gathers records before one write (what a
/// crash can lose).
const AUDIT_BATCH: Duration = Duration::from_millis(50);

impl Recorder {
    /// A recorder; with audit settings, also the writer task.
    pub fn start(
        region: String,
        audit: Option<AuditSettings>,
        audit_otlp: bool,
        tracer: Arc<Tracer>,
    ) -> Arc<Recorder> {
        let metrics = Arc::new(Metrics::new(spillway_core::metrics::AGENT));
        let audit = audit.map(|settings| {
            // At 0 from the start, so that the first loss shows as an
            // increase.
            metrics.add(AUDIT_DROPPED, &[], 0);
            for op in AuditOp::ALL {
                metrics.add(AUDIT_WRITE_ERRORS, &[("op", op.as_str())], 0);
            }
            let (tx, rx) = mpsc::channel(AUDIT_QUEUE);
            tokio::spawn(write_audit(settings, rx, metrics.clone()));
            tx
        });
        Arc::new(Recorder {
            region,
            metrics,
            audit_otlp: audit_otlp && tracer.enabled(),
            tracer,
            audit,
            dropped: AtomicU64::new(0),
        })
    }

    /// Records one call that ended with `outcome`.
    pub fn finish(&self, ctx: &CallContext, o: &Outcome) {
        let latency = ctx.started.elapsed();
        // Only a profile the call resolved to labels a metric: what a client
        // names is unbounded.
        let profile = ctx.profile.as_deref().unwrap_or("unknown");
        let served = o.inference_region.as_deref().unwrap_or("");
        let m = &self.metrics;
        m.add(
            "spillway_agent_calls_total",
            &[
                ("profile", profile),
                ("inference_region", served),
                ("outcome", o.outcome),
            ],
            1,
        );
        let by = [("profile", profile), ("inference_region", served)];
        if o.outcome == "ok" || o.outcome == "incomplete" {
            m.observe("spillway_agent_call_duration_seconds", &by, latency);
            if ctx.stream
                && let Some(t) = o.ttft
            {
                m.observe("spillway_agent_time_to_first_token_seconds", &by, t);
            }
            m.add(
                "spillway_agent_tokens_total",
                &[("profile", profile), ("direction", "input")],
                o.input_tokens,
            );
            m.add(
                "spillway_agent_tokens_total",
                &[("profile", profile), ("direction", "output")],
                o.output_tokens,
            );
            if !served.is_empty() && served != self.region {
                m.add(
                    "spillway_agent_spilled_total",
                    &[("profile", profile), ("inference_region", served)],
                    1,
                );
            }
        }
        let cause = match o.outcome {
            "throttled_quota" => Some("quota"),
            "throttled_capacity" => Some("capacity"),
            _ => None,
        };
        if let Some(cause) = cause {
            m.add(
                "spillway_agent_throttled_total",
                &[("profile", profile), ("cause", cause)],
                1,
            );
        }
        if ctx.sampled {
            self.tracer.export(self.spans(ctx, o));
        }
        if self.audit.is_none() && !self.audit_otlp {
            return;
        }
        let record = AuditRecord {
            time: rfc3339(ctx.at_unix_ms),
            request_id: &ctx.request_id,
            door: ctx.door,
            api: ctx.api.as_str(),
            tenant: ctx.tenant.as_deref(),
            key_id: ctx.key_id.as_deref(),
            profile: ctx.profile.as_deref(),
            requested_model: ctx.requested.as_deref(),
            model: ctx.model.as_deref(),
            source_region: &self.region,
            inference_region: o.inference_region.as_deref(),
            attempts: o
                .attempts
                .iter()
                .map(|a| Attempt {
                    region: &a.region,
                    outcome: &a.detail,
                })
                .chain(o.inference_region.as_deref().map(|r| Attempt {
                    region: r,
                    outcome: "served",
                }))
                .collect(),
            status: o.status,
            outcome: o.outcome,
            stream: ctx.stream,
            input_tokens: o.input_tokens,
            output_tokens: o.output_tokens,
            latency_ms: latency.as_secs_f64() * 1000.0,
            ttft_ms: o.ttft.map(|t| t.as_secs_f64() * 1000.0),
        };
        let mut line = serde_json::to_vec(&record).expect("audit records serialize");
        if self.audit_otlp {
            self.tracer.export_log(trace::audit_log(
                &ctx.request_id,
                ctx.trace_id,
                ctx.span_id,
                &line,
                self.region.as_str(),
            ));
        }
        let Some(tx) = &self.audit else { return };
        line.push(b'\n');
        if tx.try_send(AuditItem::Record(line)).is_err() {
            self.metrics.add(AUDIT_DROPPED, &[], 1);
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "the audit writer is behind; records dropped");
            }
        }
    }
}

impl Recorder {
    /// Writes out every audit record handed over so far, syncs the file to
    /// disk, then flushes the OTLP exporters; what shutdown waits for, up
    /// to `within`. Returns whether everything was written in time.
    pub async fn flush(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let mut done = true;
        if let Some(tx) = &self.audit {
            let (reply, written) = tokio::sync::oneshot::channel();
            let flushed = async {
                tx.send(AuditItem::Flush(reply)).await.is_ok() && written.await.unwrap_or(false)
            };
            done &= tokio::time::timeout_at(deadline, flushed)
                .await
                .unwrap_or(false);
        }
        done &= self
            .tracer
            .flush(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await;
        done
    }

    /// The call's spans: its own (the door's server span, then one client
    /// span per attempt: the model-server call with the GenAI attributes,
    /// or the relay), and those the destination sent back.
    fn spans(&self, ctx: &CallContext, o: &Outcome) -> Vec<ResourceSpans> {
        let end = trace::now_ns();
        let served = o.inference_region.as_deref().unwrap_or("");
        let model = ctx.model.clone().unwrap_or_default();
        let mut genai = vec![
            kv("gen_ai.operation.name", ctx.api.operation_name()),
            kv("gen_ai.request.model", model.as_str()),
            kv("spillway.source_region", self.region.as_str()),
            kv("spillway.inference_region", served),
        ];
        if let Some(n) = ctx.max_tokens {
            genai.push(kv("gen_ai.request.max_tokens", n));
        }
        let mut usage = vec![
            kv("gen_ai.usage.input_tokens", o.input_tokens),
            kv("gen_ai.usage.output_tokens", o.output_tokens),
            kv("gen_ai.response.finish_reasons", o.finish_reasons.clone()),
        ];
        if let Some(t) = o.ttft {
            usage.push(kv("spillway.time_to_first_token_ms", t.as_millis() as u64));
        }
        let mut attrs = genai.clone();
        attrs.extend(usage.iter().cloned());
        attrs.push(kv("spillway.request_id", ctx.request_id.as_str()));
        attrs.push(kv("spillway.outcome", o.outcome));
        attrs.push(kv("http.response.status_code", u64::from(o.status)));
        let failed = (o.outcome != "ok").then(|| o.outcome.to_string());
        let mut spans = vec![trace::span(
            ctx.trace_id,
            ctx.span_id,
            ctx.client_span,
            format!("chat {}", ctx.profile.as_deref().unwrap_or("")),
            SpanKind::Server,
            ctx.started_ns,
            end,
            attrs,
            failed,
        )];
        for a in &o.attempt_spans {
            let (name, mut attrs) = if a.relayed {
                (
                    format!("relay {}", a.region),
                    vec![kv("spillway.destination_region", a.region.as_str())],
                )
            } else {
                let mut attrs = genai.clone();
                attrs.push(kv("gen_ai.provider.name", "openai_compatible"));
                if a.end_ns.is_none() {
                    attrs.extend(usage.iter().cloned());
                }
                (format!("{} {model}", ctx.api.operation_name()), attrs)
            };
            attrs.push(kv("spillway.attempt_region", a.region.as_str()));
            spans.push(trace::span(
                ctx.trace_id,
                a.span_id,
                Some(ctx.span_id),
                name,
                SpanKind::Client,
                a.start_ns,
                a.end_ns.unwrap_or(end),
                attrs,
                a.error.clone(),
            ));
        }
        let mut out = vec![trace::resource_spans(
            &self.region,
            &self.tracer.agent_id,
            spans,
        )];
        // A destination's spans are taken only for this call's trace.
        out.extend(o.remote_spans.iter().cloned().map(|mut rs| {
            for ss in &mut rs.scope_spans {
                ss.spans.retain(|s| s.trace_id == ctx.trace_id);
            }
            rs
        }));
        out
    }
}

const AUDIT_DROPPED: &str = "spillway_agent_audit_dropped_total";
const AUDIT_WRITE_ERRORS: &str = "spillway_agent_audit_write_errors_total";

/// What the audit writer failed at, as `spillway_agent_audit_write_errors_total`
/// counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuditOp {
    CreateDir,
    Open,
    Write,
    Rotate,
}

impl AuditOp {
    const ALL: [AuditOp; 4] = [
        AuditOp::CreateDir,
        AuditOp::Open,
        AuditOp::Write,
        AuditOp::Rotate,
    ];

    fn as_str(self) -> &'static str {
        match self {
            AuditOp::CreateDir => "create_dir",
            AuditOp::Open => "open",
            AuditOp::Write => "write",
            AuditOp::Rotate => "rotate",
        }
    }
}

/// The audit writer's state: where it writes, the open file and its size,
/// and what it counts.
struct AuditWriter {
    settings: AuditSettings,
    current: PathBuf,
    file: Option<tokio::fs::File>,
    size: u64,
    metrics: Arc<Metrics>,
    /// Whether the folder exists (as far as the writer knows).
    dir_ready: bool,
    /// Failures to create it in a row, for the log.
    dir_failures: u64,
}

impl AuditWriter {
    fn failed(&self, op: AuditOp) {
        self.metrics
            .add(AUDIT_WRITE_ERRORS, &[("op", op.as_str())], 1);
    }

    /// Creates the audit folder unless it was; whether it exists. Tried
    /// again before each batch while it fails (a volume mounted late, a
    /// permission fixed), each failure counted, so that the loss shows for
    /// as long as it lasts.
    async fn ensure_dir(&mut self) -> bool {
        if self.dir_ready {
            return true;
        }
        match tokio::fs::create_dir_all(&self.settings.dir).await {
            Ok(()) => {
                if self.dir_failures > 0 {
                    tracing::info!(dir = %self.settings.dir.display(), "the audit folder could be created at last");
                }
                self.dir_ready = true;
                self.dir_failures = 0;
                self.size = tokio::fs::metadata(&self.current)
                    .await
                    .map_or(0, |m| m.len());
            }
            Err(e) => {
                self.failed(AuditOp::CreateDir);
                self.dir_failures += 1;
                if self.dir_failures.is_power_of_two() {
                    tracing::error!(dir = %self.settings.dir.display(), error = %e, failures = self.dir_failures, "cannot create the audit folder; audit records are lost");
                }
            }
        }
        self.dir_ready
    }

    /// Appends one batch to the current audit file, rotating it first when
    /// the batch would take it past its size (the full file synced to disk
    /// first); whether the batch was written.
    async fn write_batch(&mut self, batch: &[u8]) -> bool {
        if !self.ensure_dir().await {
            return false;
        }
        if self.size > 0 && self.size + batch.len() as u64 > self.settings.max_bytes {
            if let Some(f) = self.file.take()
                && let Err(e) = f.sync_all().await
            {
                self.failed(AuditOp::Rotate);
                tracing::warn!(error = %e, "cannot sync the audit log before rotating it");
            }
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let rotated = self.settings.dir.join(format!("audit-{stamp}.jsonl"));
            if let Err(e) = tokio::fs::rename(&self.current, &rotated).await {
                self.failed(AuditOp::Rotate);
                tracing::warn!(error = %e, "cannot rotate the audit log");
            }
            self.size = 0;
            prune(&self.settings).await;
        }
        if self.file.is_none() {
            match tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.current)
                .await
            {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    self.failed(AuditOp::Open);
                    // The folder may have gone: created again next time.
                    if e.kind() == std::io::ErrorKind::NotFound {
                        self.dir_ready = false;
                    }
                    tracing::error!(file = %self.current.display(), error = %e, "cannot open the audit log");
                    return false;
                }
            }
        }
        let failed = match &mut self.file {
            Some(f) => match f.write_all(batch).await {
                Ok(()) => {
                    self.size += batch.len() as u64;
                    f.flush().await.err()
                }
                Err(e) => Some(e),
            },
            None => None,
        };
        match failed {
            Some(e) => {
                self.failed(AuditOp::Write);
                tracing::error!(error = %e, "cannot write the audit log");
                self.file = None;
                false
            }
            None => true,
        }
    }

    /// Syncs the open file to disk; whether that worked.
    async fn sync(&mut self) -> bool {
        let Some(f) = &mut self.file else {
            return true;
        };
        match f.sync_all().await {
            Ok(()) => true,
            Err(e) => {
                self.failed(AuditOp::Write);
                tracing::error!(error = %e, "cannot sync the audit log to disk");
                false
            }
        }
    }
}

async fn write_audit(
    settings: AuditSettings,
    mut rx: mpsc::Receiver<AuditItem>,
    metrics: Arc<Metrics>,
) {
    let mut writer = AuditWriter {
        current: settings.dir.join("audit.jsonl"),
        settings,
        file: None,
        size: 0,
        metrics,
        dir_ready: false,
        dir_failures: 0,
    };
    writer.ensure_dir().await;
    // Whether every write since the last flush went to the file.
    let mut intact = true;
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::new();
        let mut flush = None;
        match first {
            AuditItem::Record(line) => {
                // What arrives within the next moment goes in the same
                // write: one wake-up and one write per batch, not per call.
                tokio::time::sleep(AUDIT_BATCH).await;
                batch = line;
            }
            AuditItem::Flush(reply) => flush = Some(reply),
        }
        while flush.is_none() && batch.len() <= 4 << 20 {
            match rx.try_recv() {
                Ok(AuditItem::Record(more)) => batch.extend_from_slice(&more),
                Ok(AuditItem::Flush(reply)) => flush = Some(reply),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            intact &= writer.write_batch(&batch).await;
        }
        if let Some(reply) = flush {
            intact &= writer.sync().await;
            let _ = reply.send(intact);
            intact = true;
        }
    }
}

/// Removes the oldest rotated files beyond `keep`.
async fn prune(settings: &AuditSettings) {
    let Ok(mut dir) = tokio::fs::read_dir(&settings.dir).await else {
        return;
    };
    let mut rotated = Vec::new();
    while let Ok(Some(e)) = dir.next_entry().await {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("audit-") && name.ends_with(".jsonl") {
            rotated.push(name);
        }
    }
    rotated.sort();
    let excess = rotated.len().saturating_sub(settings.keep);
    for name in &rotated[..excess] {
        let _ = tokio::fs::remove_file(settings.dir.join(name)).await;
    }
}

/// `2026-11-27T16:43:00.123Z` for milliseconds since the Unix epoch.
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_797_780_123), "2026-11-27T16:43:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    fn served() -> Outcome {
        Outcome {
            status: 200,
            outcome: "ok",
            inference_region: Some("us-east".into()),
            ..Outcome::default()
        }
    }

    /// The audit writer's failures as counted, by op.
    fn write_errors(metrics: &Metrics) -> Vec<String> {
        metrics
            .render()
            .lines()
            .filter_map(|l| l.strip_prefix("spillway_agent_audit_write_errors_total{op="))
            .filter(|l| !l.ends_with(" 0"))
            .map(str::to_string)
            .collect()
    }

    /// Hands one record to a recorder writing to `dir`, flushes it, and
    /// returns whether the flush said it was written, and the failures.
    async fn write_one(dir: PathBuf) -> (bool, Vec<String>) {
        let settings = AuditSettings {
            dir,
            max_bytes: 1 << 20,
            keep: 2,
        };
        let tracer = Tracer::start(None, "us-east".into(), "a".into(), 1.0);
        let recorder = Recorder::start("us-east".into(), Some(settings), false, tracer);
        recorder.finish(&CallContext::new("http"), &served());
        let written = recorder.flush(Duration::from_secs(5)).await;
        (written, write_errors(&recorder.metrics))
    }

    #[tokio::test]
    async fn audit_write_failures_are_counted_by_what_failed() {
        let tmp = tempfile::tempdir().unwrap();
        // The folder would be under a regular file: it cannot be created,
        // at start nor when the record comes.
        let plain = tmp.path().join("plain");
        std::fs::write(&plain, b"").unwrap();
        let (written, failed) = write_one(plain.join("audit")).await;
        assert!(!written);
        assert_eq!(failed, ["\"create_dir\"} 2"]);

        // The current file's name is taken by a folder: it cannot be opened.
        let taken = tmp.path().join("taken");
        std::fs::create_dir_all(taken.join("audit.jsonl")).unwrap();
        let (written, failed) = write_one(taken).await;
        assert!(!written);
        assert_eq!(failed, ["\"open\"} 1"]);

        // A file that takes no bytes: writing it fails.
        #[cfg(target_os = "linux")]
        {
            let full = tmp.path().join("full");
            std::fs::create_dir(&full).unwrap();
            std::os::unix::fs::symlink("/dev/full", full.join("audit.jsonl")).unwrap();
            let (written, failed) = write_one(full).await;
            assert!(!written);
            assert_eq!(failed, ["\"write\"} 1"]);
        }

        // And a folder that can be written: nothing counted, each op at 0.
        let fine = tmp.path().join("fine");
        let (written, failed) = write_one(fine.clone()).await;
        assert!(written);
        assert_eq!(failed, Vec::<String>::new());
        assert_eq!(
            std::fs::read_to_string(fine.join("audit.jsonl"))
                .unwrap()
                .lines()
                .count(),
            1
        );
    }

    #[tokio::test]
    async fn records_dropped_for_a_full_queue_are_counted() {
        // A queue of two that nothing reads: the writer fell behind.
        let (tx, _rx) = mpsc::channel(2);
        let recorder = Recorder {
            region: "us-east".into(),
            metrics: Arc::new(Metrics::new(spillway_core::metrics::AGENT)),
            tracer: Tracer::start(None, "us-east".into(), "a".into(), 1.0),
            audit: Some(tx),
            audit_otlp: false,
            dropped: AtomicU64::new(0),
        };
        for _ in 0..5 {
            recorder.finish(&CallContext::new("http"), &served());
        }
        assert_eq!(recorder.dropped.load(Ordering::Relaxed), 3);
        assert!(
            recorder
                .metrics
                .render()
                .lines()
                .any(|l| l == "spillway_agent_audit_dropped_total 3")
        );
    }

    #[tokio::test]
    async fn audit_files_rotate_by_size_and_old_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let settings = AuditSettings {
            dir: dir.path().to_path_buf(),
            max_bytes: 600,
            keep: 2,
        };
        let tracer = Tracer::start(None, "us-east".into(), "a".into(), 1.0);
        let recorder = Recorder::start("us-east".into(), Some(settings), false, tracer);
        for i in 0..20 {
            let mut ctx = CallContext::new("http");
            ctx.tenant = Some("acme".into());
            ctx.profile = Some(format!("us.m{i}"));
            recorder.finish(
                &ctx,
                &Outcome {
                    status: 200,
                    outcome: "ok",
                    inference_region: Some("us-west".into()),
                    ..Outcome::default()
                },
            );
            // Five batches of four records, each past the size: written
            // when flushed, not when a busy machine gets round to it.
            if i % 4 == 3 {
                assert!(recorder.flush(Duration::from_secs(5)).await);
            }
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert!(names.contains(&"audit.jsonl".to_string()), "{names:?}");
        assert_eq!(names.len(), 3, "the current file and 2 rotated: {names:?}");
        let current = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        let last: serde_json::Value =
            serde_json::from_str(current.lines().last().unwrap()).unwrap();
        assert_eq!(last["profile"], "us.m19");
        assert_eq!(last["tenant"], "acme");
        assert_eq!(last["source_region"], "us-east");
        assert_eq!(last["attempts"][0]["region"], "us-west");
    }
}
