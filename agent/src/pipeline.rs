//! The request path, top to bottom: resolve the profile for this region,
//! plan the destination regions (source first), call the local model
//! servers or relay to another region's agent, and fail over to the next
//! region on throttling or unavailability before the first byte, within an
//! attempt limit and a retry budget.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use spillway_proto::model::{Profile, RouteTable};
use tower::retry::budget::{Budget, TpsBudget};

use crate::auth::{self, Caller};
use crate::error::CallError;
use crate::meter::Meter;
use crate::openai::check_answer;
use crate::outlier::{OutlierSettings, Outliers};
use crate::quota::{CallScope, Quotas, RateInfo, Reservation, estimate_input_tokens};
use crate::record::{AttemptSpan, CallContext, Outcome, Recorder};
use crate::relay::RelayClients;
use crate::relay::RelayedCall;
use crate::route;
use crate::snapshot::AgentConfig;
use crate::sync::ConfigWatch;
use crate::trace::{self, RemoteSpans, TraceParent};
use crate::upstream::{AnswerBody, Upstreams};

/// A call ready to be routed: the config it was resolved against (one read
/// of the watch per call), the profile the client named, the model it
/// resolves to, and the chat-completions body with `model` set to it.
pub struct PreparedCall {
    pub config: Arc<AgentConfig>,
    pub profile: String,
    pub model: String,
    pub body: Bytes,
    pub stream: bool,
    /// The client's `max_tokens`, if it set one.
    pub max_tokens: Option<u64>,
    /// Who calls, and what is recorded of the call.
    pub ctx: CallContext,
}

/// A call admitted by the quotas that cover it (none, maybe), with what the
/// `x-ratelimit-*` headers report.
pub struct Admission {
    reservation: Option<Reservation>,
    pub rate: RateInfo,
}

/// Records a call whose routing was dropped (the client left) before it
/// ended.
struct Unanswered<'a> {
    recorder: &'a Recorder,
    ctx: Option<CallContext>,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(ctx) = self.ctx.take() {
            self.recorder
                .finish(&ctx, &Outcome::of_error(&CallError::Cancelled));
        }
    }
}

/// A successful answer and where it came from.
pub struct Answer {
    /// The region whose model server produced it.
    pub region: String,
    pub status: http::StatusCode,
    pub body: AnswerBody,
    /// Regions tried before this one, with why they did not serve.
    pub failed_attempts: Vec<(String, String)>,
    /// Every attempt as a span (the serving one last, still open).
    pub attempt_spans: Vec<AttemptSpan>,
    /// Where a destination's spans land, for a relayed call.
    pub remote_spans: RemoteSpans,
}

#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// Regions tried per call at most (the first try included).
    pub max_attempts: usize,
    /// Retries allowed on top of the calls, as a fraction of them, plus a
    /// floor per second: an outage cannot multiply the load.
    pub retry_ratio: f32,
    pub retry_floor_per_sec: u32,
    /// Output tokens reserved for a call that sets no `max_tokens`.
    pub default_max_tokens: u64,
    /// Serve calls that present no API key (as no tenant). A key that is
    /// presented is checked all the same.
    pub allow_anonymous: bool,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        PipelineSettings {
            max_attempts: 3,
            retry_ratio: 0.5,
            retry_floor_per_sec: 10,
            default_max_tokens: 1024,
            allow_anonymous: false,
        }
    }
}

pub struct Pipeline {
    region: String,
    config: ConfigWatch,
    upstreams: Arc<Upstreams>,
    relays: RelayClients,
    quotas: Arc<Quotas>,
    recorder: Arc<Recorder>,
    budget: TpsBudget,
    settings: PipelineSettings,
    /// Other regions ejected after failing calls in a row.
    ejected: Outliers<String>,
    /// Relayed calls per destination region since the last load report.
    relayed: std::sync::Mutex<HashMap<String, RelayCounters>>,
}

#[derive(Debug, Default)]
struct RelayCounters {
    calls: u64,
    errors: u64,
    throttles: u64,
    latency_us: u64,
}

impl Pipeline {
    pub fn new(
        region: String,
        config: ConfigWatch,
        upstreams: Arc<Upstreams>,
        relays: RelayClients,
        quotas: Arc<Quotas>,
        recorder: Arc<Recorder>,
        settings: PipelineSettings,
    ) -> Pipeline {
        let budget = TpsBudget::new(
            Duration::from_secs(10),
            settings.retry_floor_per_sec,
            settings.retry_ratio,
        );
        Pipeline {
            region,
            config,
            upstreams,
            relays,
            quotas,
            recorder,
            budget,
            settings,
            ejected: Outliers::new(OutlierSettings::default()),
            relayed: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Relayed calls per region since the last call of this (counters
    /// restart; latencies carry on).
    pub fn relay_report(&self) -> Vec<spillway_proto::pb::RelayLoad> {
        let mut relayed = self.relayed.lock().unwrap_or_else(|p| p.into_inner());
        relayed
            .iter_mut()
            .map(|(region, c)| spillway_proto::pb::RelayLoad {
                region: region.clone(),
                calls: std::mem::take(&mut c.calls),
                errors: std::mem::take(&mut c.errors),
                throttles: std::mem::take(&mut c.throttles),
                latency_ewma_us: c.latency_us,
            })
            .collect()
    }

    fn record_relay(
        &self,
        region: &str,
        result: &Result<crate::upstream::UpstreamAnswer, CallError>,
        took: Duration,
    ) {
        let mut relayed = self.relayed.lock().unwrap_or_else(|p| p.into_inner());
        let c = relayed.entry(region.to_string()).or_default();
        c.calls += 1;
        match result {
            Err(CallError::Throttled(_)) => c.throttles += 1,
            Err(e) if e.retriable() => c.errors += 1,
            _ => {}
        }
        c.latency_us = crate::upstream::ewma_step(c.latency_us, took);
    }

    /// The current config; calls never wait for one.
    pub fn config(&self) -> Result<Arc<AgentConfig>, CallError> {
        self.config.borrow().clone().ok_or(CallError::NoConfig)
    }

    /// The caller of a call that presented `key` (or none).
    pub fn authenticate(&self, cfg: &AgentConfig, key: Option<&str>) -> Result<Caller, CallError> {
        auth::authenticate(cfg, key, self.settings.allow_anonymous)
    }

    /// The profile a client named, if it is callable from this region.
    pub fn resolve<'c>(&self, cfg: &'c AgentConfig, id: &str) -> Result<&'c Profile, CallError> {
        match cfg.profiles.get(id) {
            Some(p) => Ok(p),
            None if cfg.profiles_elsewhere.contains(id) => Err(CallError::NotCallableHere {
                profile: id.to_string(),
                region: self.region.clone(),
            }),
            None => Err(CallError::ProfileNotFound(id.to_string())),
        }
    }

    fn scope<'a>(&'a self, call: &'a PreparedCall) -> CallScope<'a> {
        CallScope {
            profile: &call.profile,
            region: &self.region,
            tenant: call.ctx.tenant.as_deref(),
        }
    }

    /// Records a call that ended without an answer.
    pub fn record_error(&self, ctx: &CallContext, e: &CallError) {
        self.recorder.finish(ctx, &Outcome::of_error(e));
    }

    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.recorder
    }

    /// Admits a call against the quotas that cover it, before it is routed:
    /// a refusal is the source region's answer and is never spilled.
    pub fn admit(&self, call: &PreparedCall) -> Result<Admission, CallError> {
        if self.quotas.is_empty() {
            return Ok(Admission {
                reservation: None,
                rate: RateInfo::default(),
            });
        }
        let input = estimate_input_tokens(call.body.len());
        let max_tokens = call.max_tokens.unwrap_or(self.settings.default_max_tokens);
        match self.quotas.admit(&self.scope(call), input, max_tokens) {
            Ok((reservation, rate)) => Ok(Admission {
                reservation: (!reservation.is_empty()).then_some(reservation),
                rate,
            }),
            Err(refused) if refused.too_large.is_some() => {
                Err(CallError::bad("max_tokens", refused.to_string()))
            }
            Err(refused) => {
                let rate = self.quotas.rate_info(&self.scope(call));
                tracing::debug!(profile = %call.profile, quota = %refused.quota, "throttled by quota");
                Err(CallError::Quota(Box::new((refused, rate))))
            }
        }
    }

    /// Routes one admitted call. Its answer is followed to its end, when
    /// the reservation is settled with its usage and the call is recorded;
    /// when nothing answered the reservation is refunded (the door records
    /// the error, as it does those before routing).
    pub async fn call(
        &self,
        call: PreparedCall,
        admission: Admission,
    ) -> Result<Answer, CallError> {
        let ctx = call.ctx.clone();
        let mut meter = Meter::new(ctx.started, estimate_input_tokens(call.body.len()));
        if let Some(r) = admission.reservation {
            meter = meter.with_reservation(self.quotas.clone(), r);
        }
        // A client that goes away before the answer drops this future: the
        // guard records the call then (the meter refunds on drop).
        let mut guard = Unanswered {
            recorder: &self.recorder,
            ctx: Some(ctx),
        };
        let routed = self.route(call).await.and_then(|answer| {
            // A unary answer that is not JSON is the model server's fault:
            // it fails here, before it is metered as served.
            if let AnswerBody::Full(b) = &answer.body
                && answer.status.is_success()
            {
                check_answer(b)?;
            }
            Ok(answer)
        });
        let ctx = guard
            .ctx
            .take()
            .expect("the guard holds the context until now");
        match routed {
            Ok(mut answer) => {
                let recorder = self.recorder.clone();
                let (region, attempts) = (answer.region.clone(), answer.failed_attempts.clone());
                let status = answer.status;
                let (attempt_spans, remote) =
                    (answer.attempt_spans.clone(), answer.remote_spans.clone());
                meter = meter.on_finish(Box::new(move |f| {
                    let outcome = match (status.is_success(), f.complete) {
                        (true, true) => "ok",
                        (true, false) => "incomplete",
                        (false, _) if status.is_client_error() => "bad_request",
                        (false, _) => "error",
                    };
                    recorder.finish(
                        &ctx,
                        &Outcome {
                            status: status.as_u16(),
                            outcome,
                            inference_region: Some(region),
                            attempts,
                            input_tokens: f.input_tokens,
                            output_tokens: f.output_tokens,
                            ttft: f.ttft,
                            finish_reasons: f.finish_reasons.clone(),
                            attempt_spans,
                            remote_spans: std::mem::take(
                                &mut *remote.lock().unwrap_or_else(|p| p.into_inner()),
                            ),
                        },
                    );
                }));
                answer.body = meter.body(answer.body);
                Ok(answer)
            }
            Err(e) => {
                meter.refund();
                Err(e)
            }
        }
    }

    /// The planned regions in order until one answers.
    async fn route(&self, call: PreparedCall) -> Result<Answer, CallError> {
        let cfg = &call.config;
        let table: &RouteTable = cfg
            .routes
            .get(&call.profile)
            .ok_or_else(|| CallError::ProfileNotFound(call.profile.clone()))?;
        let mut plan = route::plan(table, fastrand::f64);
        // The tenant's region policy: a denied region never gets the call,
        // not even by failover; when nothing is left, the call fails closed.
        if let Some(tenant) = call.ctx.tenant.as_ref().and_then(|t| cfg.tenants.get(t))
            && !tenant.policy.is_open()
        {
            let mut denied = Vec::new();
            plan.retain(|r| {
                let geography = cfg.regions.get(*r).map_or("", |g| g.geography.as_str());
                match tenant.policy.check(r, geography) {
                    Ok(()) => true,
                    Err(why) => {
                        denied.push(format!("{r}: {why}"));
                        false
                    }
                }
            });
            if plan.is_empty() {
                return Err(CallError::PermissionDenied(format!(
                    "the region policy of tenant `{}` allows no destination of inference profile `{}` from {} ({})",
                    tenant.name,
                    call.profile,
                    self.region,
                    denied.join("; ")
                )));
            }
        }
        // Other regions that failed calls in a row are skipped for a while
        // (outlier ejection), unless that would leave nothing to try.
        // The cap on ejections counts every planned region, the source
        // (never ejected here) included.
        let planned: Vec<String> = plan.iter().map(|r| r.to_string()).collect();
        let now = tokio::time::Instant::now();
        let healthy: Vec<&str> = plan
            .iter()
            .copied()
            .filter(|r| *r == self.region || !self.ejected.is_ejected(&r.to_string(), now))
            .collect();
        if !healthy.is_empty() {
            plan = healthy;
        }
        self.budget.deposit();
        let mut failed = Vec::new();
        let mut spans: Vec<AttemptSpan> = Vec::new();
        let remote: RemoteSpans = RemoteSpans::default();
        let mut spent_call = false;
        for (i, region) in plan
            .into_iter()
            .enumerate()
            .take(self.settings.max_attempts)
        {
            // Only a retry after a call that was really made spends the
            // budget: moving on from a region at capacity made no call.
            if i > 0 && spent_call && !self.budget.withdraw() {
                failed.push((
                    region.to_string(),
                    "not tried: the retry budget is spent".to_string(),
                ));
                break;
            }
            let attempt = AttemptSpan {
                region: region.to_string(),
                span_id: trace::new_span_id(),
                start_ns: trace::now_ns(),
                end_ns: None,
                error: None,
                relayed: region != self.region,
            };
            let result = if region == self.region {
                self.upstreams
                    .call(&call.model, call.body.clone(), call.stream)
                    .await
            } else {
                let started = tokio::time::Instant::now();
                let traceparent = TraceParent {
                    trace_id: call.ctx.trace_id,
                    span_id: attempt.span_id,
                    sampled: call.ctx.sampled,
                };
                let result = self
                    .relays
                    .call(
                        cfg,
                        region,
                        RelayedCall {
                            profile: &call.profile,
                            model: &call.model,
                            body: call.body.clone(),
                            stream: call.stream,
                            request_id: &call.ctx.request_id,
                            traceparent,
                            spans: &remote,
                        },
                    )
                    .await;
                self.record_relay(region, &result, started.elapsed());
                result
            };
            if region != self.region {
                match &result {
                    Ok(_) => self.ejected.success(&region.to_string()),
                    Err(e) if e.retriable() => {
                        if self.ejected.failure(
                            &region.to_string(),
                            &planned,
                            tokio::time::Instant::now(),
                        ) {
                            tracing::warn!(%region, error = %e, "region ejected after failures in a row");
                            self.recorder.metrics.add(
                                "spillway_agent_ejections_total",
                                &[("region", region)],
                                1,
                            );
                        }
                    }
                    Err(_) => {}
                }
            }
            match result {
                Ok(answer) => {
                    if !failed.is_empty() {
                        tracing::debug!(profile = %call.profile, served_in = region, ?failed, "served after failover");
                    }
                    spans.push(attempt);
                    return Ok(Answer {
                        region: region.to_string(),
                        status: answer.status,
                        body: answer.body,
                        failed_attempts: failed,
                        attempt_spans: spans,
                        remote_spans: remote,
                    });
                }
                Err(e) if e.retriable() => {
                    spent_call |= !matches!(e, CallError::AtCapacity(_));
                    failed.push((region.to_string(), e.to_string()));
                    spans.push(AttemptSpan {
                        end_ns: Some(trace::now_ns()),
                        error: Some(e.to_string()),
                        ..attempt
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Err(CallError::Exhausted {
            profile: call.profile,
            attempts: failed,
        })
    }
}
