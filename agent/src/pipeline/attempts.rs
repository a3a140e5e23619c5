//! The attempts of one call: plan the destination regions (source first,
//! by weight; the tenant's region policy applied; ejected regions skipped),
//! then call the local model servers or relay to another region's agent,
//! failing over on throttling or unavailability before the first byte,
//! within an attempt limit and a retry budget.

use std::time::Duration;

use spillway_core::model::RouteTable;
use tower::retry::budget::Budget;

use super::{Answer, Pipeline, PreparedCall, Routed, route};
use crate::error::{CallError, Cause, FailedAttempt};
use crate::telemetry::record::AttemptSpan;
use crate::telemetry::trace::{self, RemoteSpans, TraceParent};
use crate::upstream::relay::RelayedCall;

/// Relayed calls to one region since the last load report.
#[derive(Debug, Default)]
pub(super) struct RelayCounters {
    calls: u64,
    errors: u64,
    throttles: u64,
    latency_us: u64,
}

impl Pipeline {
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
            Err(e) if e.is_failure() => c.errors += 1,
            _ => {}
        }
        c.latency_us = crate::upstream::ewma_step(c.latency_us, took);
    }

    /// The planned regions in order until one answers.
    pub(super) async fn attempts(&self, call: PreparedCall) -> Result<Routed, CallError> {
        let cfg = &call.config;
        let table: &RouteTable = cfg
            .routes
            .get(&call.profile)
            .ok_or_else(|| CallError::ProfileNotFound(call.profile.clone()))?;
        let mut plan = route::plan(table, fastrand::f64);
        let objective = table
            .ttft_objective_ms
            .map(|ms| std::time::Duration::from_millis(u64::from(ms)));
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
        // Only regions that serve the call's API: this one's model servers,
        // another's agents as they announced. When none is left, no retry
        // could help: the client asked for an API the profile lacks.
        plan.retain(|r| {
            if *r == self.region {
                self.upstreams.serves(&call.model, call.api)
            } else {
                cfg.region_serves(r, call.api)
            }
        });
        if plan.is_empty() {
            return Err(CallError::ApiNotServed {
                profile: call.profile.clone(),
                api: call.api,
            });
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
                failed.push(FailedAttempt {
                    region: region.to_string(),
                    cause: Cause::NotTried,
                    detail: "not tried: the retry budget is spent".to_string(),
                });
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
                    .call(
                        &call.model,
                        call.api,
                        call.body.clone(),
                        call.stream,
                        objective,
                    )
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
                            api: call.api,
                            body: call.body.clone(),
                            stream: call.stream,
                            request_id: &call.ctx.request_id,
                            traceparent,
                            spans: &remote,
                            ttft_objective: objective,
                        },
                    )
                    .await;
                self.record_relay(region, &result, started.elapsed());
                result
            };
            if region != self.region {
                match &result {
                    Ok(_) => self.ejected.success(&region.to_string()),
                    Err(e) if e.is_failure() => {
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
                    return Ok(Routed {
                        answer: Answer {
                            region: region.to_string(),
                            status: answer.status,
                            body: answer.body,
                        },
                        failed_attempts: failed,
                        attempt_spans: spans,
                        remote_spans: remote,
                    });
                }
                Err(e) if e.retriable() => {
                    spent_call |= !matches!(e, CallError::AtCapacity(_));
                    failed.push(FailedAttempt::of(region, &e));
                    spans.push(AttemptSpan {
                        end_ns: Some(trace::now_ns()),
                        error: Some(e.to_string()),
                        ..attempt
                    });
                }
                Err(e) => return Err(e),
            }
        }
        // Every region tried serves the model, none over this API: the
        // client asked for something the profile lacks.
        if !failed.is_empty() && failed.iter().all(|a| a.cause == Cause::NotServed) {
            return Err(CallError::ApiNotServed {
                profile: call.profile,
                api: call.api,
            });
        }
        // What each region said, addresses and all, stays here and in the
        // audit record; the client is told the regions and the causes. An
        // outage is worth a warning; saturation is the normal throttle.
        if failed.iter().any(|a| a.cause == Cause::Saturated) {
            tracing::debug!(profile = %call.profile, attempts = ?failed, "every region was saturated");
        } else {
            tracing::warn!(profile = %call.profile, attempts = ?failed, "no region could serve the call");
        }
        Err(CallError::Exhausted {
            profile: call.profile,
            attempts: failed,
        })
    }
}
