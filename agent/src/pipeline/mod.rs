//! The one request stack. Every door hands [`Pipeline::serve`] a call
//! description and gets back the answer (or the error) with what its
//! headers need; `serve` runs the stages top to bottom, in one place:
//!
//! 1. authenticate the API key (`auth`);
//! 2. parse the door's request (the door's own translation);
//! 3. resolve the profile for this region and authorize the tenant;
//! 4. admit the call against the quotas that cover it;
//! 5. attempts across the planned regions, source first, with failover
//!    (`attempts`, `route`);
//! 6. finish: meter the answer to its end, settle the reservation, record
//!    metrics, audit and spans (`finish`). A call that ends without an
//!    answer, or whose client leaves, is finished here too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use spillway_core::api::Api;
use spillway_core::model::Profile;
use tower::retry::budget::TpsBudget;

use crate::control::snapshot::AgentConfig;
use crate::control::sync::ConfigWatch;
use crate::error::{CallError, FailedAttempt};
use crate::quota::{CallScope, Quotas, RateInfo, Reservation, estimate_input_tokens};
use crate::telemetry::record::{AttemptSpan, CallContext, Recorder};
use crate::telemetry::trace::RemoteSpans;
use crate::upstream::outlier::{OutlierSettings, Outliers};
use crate::upstream::relay::RelayClients;
use crate::upstream::{AnswerBody, Upstreams};

mod attempts;
pub mod auth;
mod finish;
pub mod route;

use auth::Caller;

/// Where a call came in, before anything of it is parsed.
pub struct Inbound<'a> {
    /// `http` or `grpc`, for metrics and the audit record.
    pub door: &'static str,
    /// The API called, known from the path or method before anything is
    /// parsed.
    pub api: Api,
    /// The API key the caller presented, if any.
    pub key: Option<&'a str>,
    /// The caller's W3C `traceparent`, if any.
    pub traceparent: Option<&'a str>,
}

/// A call as a door describes it, once parsed: what the client named, and
/// the body for the model server once the profile is resolved.
pub struct Request {
    /// The inference profile the client named.
    pub model: String,
    pub stream: bool,
    /// The client's `max_tokens`, if it set one.
    pub max_tokens: Option<u64>,
    /// Bytes of the body that the input-token estimate leaves out (an
    /// image's base64 data is not four bytes a token); the real usage
    /// settles the reservation all the same.
    pub uncounted_bytes: usize,
    /// The request body of `api` for the model the profile resolves to.
    pub body: Box<dyn FnOnce(&str) -> Bytes + Send>,
}

/// What `serve` gives back to the door: the call's id and rate-limit
/// figures (for the headers of any answer), and the answer or the error.
pub struct Served {
    pub request_id: String,
    pub rate: RateInfo,
    pub result: Result<Answer, CallError>,
}

/// A successful answer and where it came from.
pub struct Answer {
    /// The region whose model server produced it.
    pub region: String,
    pub status: http::StatusCode,
    pub body: AnswerBody,
}

/// A call ready for its attempts: the config it was resolved against (one
/// read of the watch per call), the profile, the model it resolves to, and
/// the body with `model` set to it.
struct PreparedCall {
    config: Arc<AgentConfig>,
    profile: String,
    model: String,
    api: Api,
    body: Bytes,
    /// The input tokens estimated before the answer tells.
    input_estimate: u64,
    stream: bool,
    ctx: CallContext,
}

/// A call admitted by the quotas that cover it (none, maybe), with what the
/// `x-ratelimit-*` headers report.
struct Admission {
    reservation: Option<Reservation>,
    rate: RateInfo,
}

/// The attempts' answer, with what the record needs.
struct Routed {
    answer: Answer,
    /// Regions tried before the serving one, with why they did not serve.
    failed_attempts: Vec<FailedAttempt>,
    /// Every attempt as a span (the serving one last, still open).
    attempt_spans: Vec<AttemptSpan>,
    /// Where a destination's spans land, for a relayed call.
    remote_spans: RemoteSpans,
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
    relayed: std::sync::Mutex<HashMap<String, attempts::RelayCounters>>,
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

    /// Serves one call through every stage. `parse` is the door's
    /// translation of its request; it runs after the caller is
    /// authenticated. Whatever happens, the call is recorded once: here
    /// when it ends without an answer, when its answer ends otherwise.
    pub async fn serve(
        &self,
        inbound: Inbound<'_>,
        parse: impl FnOnce() -> Result<Request, CallError>,
    ) -> Served {
        let mut ctx = CallContext::new(inbound.door);
        ctx.api = inbound.api;
        let mut rate = RateInfo::default();
        let result = match self.prepare(&inbound, parse, &mut ctx) {
            Ok(call) => match self.admit(&call) {
                Ok(admission) => {
                    rate = admission.rate.clone();
                    self.finish(call, admission).await
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            finish::record_error(&self.recorder, &ctx, e);
        }
        Served {
            request_id: ctx.request_id,
            rate,
            result,
        }
    }

    /// Authenticate, parse, resolve and authorize.
    fn prepare(
        &self,
        inbound: &Inbound<'_>,
        parse: impl FnOnce() -> Result<Request, CallError>,
        ctx: &mut CallContext,
    ) -> Result<PreparedCall, CallError> {
        let cfg = self.config()?;
        ctx.join_trace(inbound.traceparent, &self.recorder.tracer);
        let caller = self.authenticate(&cfg, inbound.key)?;
        ctx.tenant = caller.tenant.clone();
        ctx.key_id = caller.key_id.clone();
        let req = parse()?;
        ctx.requested(&req.model);
        ctx.stream = req.stream;
        ctx.max_tokens = req.max_tokens;
        let profile = self.resolve(&cfg, &req.model)?;
        ctx.profile = Some(profile.id.clone());
        ctx.model = Some(profile.model.clone());
        auth::authorize(&cfg, &caller, &profile.id)?;
        let (profile, model) = (profile.id.clone(), profile.model.clone());
        let body = (req.body)(&model);
        Ok(PreparedCall {
            input_estimate: estimate_input_tokens(body.len().saturating_sub(req.uncounted_bytes)),
            body,
            profile,
            model,
            api: inbound.api,
            stream: req.stream,
            ctx: ctx.clone(),
            config: cfg,
        })
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
    fn resolve<'c>(&self, cfg: &'c AgentConfig, id: &str) -> Result<&'c Profile, CallError> {
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

    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.recorder
    }

    /// Admits a call against the quotas that cover it, before it is routed:
    /// a refusal is the source region's answer and is never spilled.
    fn admit(&self, call: &PreparedCall) -> Result<Admission, CallError> {
        if self.quotas.is_empty() {
            return Ok(Admission {
                reservation: None,
                rate: RateInfo::default(),
            });
        }
        let input = call.input_estimate;
        let max_tokens = call
            .ctx
            .max_tokens
            .unwrap_or(self.settings.default_max_tokens);
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
}
