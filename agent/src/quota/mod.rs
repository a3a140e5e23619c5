//! Quota admission at the source agent.
//!
//! Each quota (a profile in a source region, say) has up to three limits:
//! requests per minute, tokens per minute, tokens per day. The agents that
//! enforce a quota share each limit: the control plane's leader grants every
//! agent a lease on a share, in proportion to its recent demand, and the sum
//! of the live leases never exceeds the limit. An agent whose lease runs out
//! without a renewal (the control plane is gone) falls back to a safe
//! share: the limit divided by the number of agents it was split among.
//!
//! A share becomes a token bucket that refills at the share's rate and holds
//! one second's worth of it (an hour's worth for the daily limit), so that
//! any minute admits at most the limit plus one second's worth: the limit is
//! quantized to the second, as OpenAI's are. A call is admitted when one
//! request and its token reservation (estimated input plus `max_tokens`, or
//! the default cap, times the burndown factor) fit in every quota that
//! covers it; a bucket holding at least its burst (or the whole call) may
//! go into debt for a large reservation, which it pays back as it refills.
//! When the answer ends the reservation is settled with the real usage:
//! what was not used comes back, what went beyond it is charged.
//!
//! Time comes from `tokio::time`, so the tests run on a paused clock.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use spillway_core::model::{Quota, QuotaScope};
use spillway_proto::pb;
use tokio::time::Instant;

mod bucket;

pub use bucket::Bucket;
#[cfg(test)]
use bucket::NO_SHARE_RETRY;

/// One of a quota's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
    TokensPerDay,
}

const LIMITS: [Limit; 3] = [Limit::Requests, Limit::Tokens, Limit::TokensPerDay];

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::Requests => "requests per minute",
            Limit::Tokens => "tokens per minute",
            Limit::TokensPerDay => "tokens per day",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn period_secs(self) -> f64 {
        match self {
            Limit::Requests | Limit::Tokens => 60.0,
            Limit::TokensPerDay => 86_400.0,
        }
    }

    /// How much of its rate a bucket holds: the burst it allows.
    fn burst_secs(self) -> f64 {
        match self {
            Limit::Requests | Limit::Tokens => 1.0,
            Limit::TokensPerDay => 3_600.0,
        }
    }

    fn of(self, q: &Quota) -> Option<i64> {
        match self {
            Limit::Requests => q.requests_per_minute,
            Limit::Tokens => q.tokens_per_minute,
            Limit::TokensPerDay => q.tokens_per_day,
        }
    }

    /// (rate per second, capacity) of a bucket for a share of `amount` per
    /// period.
    fn bucket(self, amount: f64) -> (f64, f64) {
        let rate = amount.max(0.0) / self.period_secs();
        (rate, rate * self.burst_secs())
    }
}

/// A refused admission: which quota and limit, and when to retry.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub quota: String,
    pub limit: Limit,
    pub limit_value: i64,
    pub retry_after: Duration,
    /// The call can never fit: its reservation alone exceeds the limit.
    pub too_large: Option<f64>,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.too_large {
            Some(reserve) => write!(
                f,
                "this call reserves {reserve:.0} tokens (input estimate plus max_tokens times the burndown factor), more than quota `{}` allows ({} {}): lower max_tokens",
                self.quota,
                self.limit_value,
                self.limit.label()
            ),
            None => write!(
                f,
                "quota `{}` exceeded: limit of {} {} reached; retry after {} ms",
                self.quota,
                self.limit_value,
                self.limit.label(),
                self.retry_after.as_millis()
            ),
        }
    }
}

/// A share of a quota's limits: amounts per period, by [`Limit`].
#[derive(Debug, Clone, Copy, PartialEq)]
struct Share([f64; 3]);

/// One quota as this agent enforces it.
#[derive(Debug)]
struct Enforced {
    quota: Quota,
    buckets: [Option<Bucket>; 3],
    /// The share the buckets run at now.
    share: Share,
    lease: Option<(Share, Instant)>,
    sharing_agents: u32,
    /// Asked since the last report (admitted or not).
    asked_requests: f64,
    asked_tokens: f64,
    /// The last reports' (seconds, requests, tokens), about a second's
    /// worth: rates are read over it, not over one short report.
    recent: std::collections::VecDeque<(f64, f64, f64)>,
    /// Demand per minute, smoothed.
    demand_requests: f64,
    demand_tokens: f64,
}

impl Enforced {
    fn new(quota: Quota, sharing_agents: u32, now: Instant) -> Enforced {
        let mut e = Enforced {
            quota,
            buckets: [None, None, None],
            share: Share([0.0; 3]),
            lease: None,
            sharing_agents: sharing_agents.max(1),
            asked_requests: 0.0,
            asked_tokens: 0.0,
            recent: std::collections::VecDeque::new(),
            demand_requests: 0.0,
            demand_tokens: 0.0,
        };
        e.share = e.safe_share();
        for limit in LIMITS {
            if limit.of(&e.quota).is_some() {
                let (rate, cap) = limit.bucket(e.share.0[limit.index()]);
                e.buckets[limit.index()] = Some(Bucket::new(rate, cap, now));
            }
        }
        e
    }

    fn safe_share(&self) -> Share {
        let n = f64::from(self.sharing_agents.max(1));
        Share(LIMITS.map(|l| l.of(&self.quota).map_or(0.0, |v| v as f64 / n)))
    }

    /// Moves the buckets to the lease, or to the safe share once the lease
    /// has run out.
    fn follow_share(&mut self, now: Instant) {
        let share = match self.lease {
            Some((share, until)) if until > now => share,
            Some(_) => {
                tracing::warn!(quota = %self.quota.scope.id(), agents = self.sharing_agents,
                    "quota lease expired without renewal; enforcing a safe share");
                self.lease = None;
                self.safe_share()
            }
            None => self.safe_share(),
        };
        if share != self.share {
            self.share = share;
            for limit in LIMITS {
                if let Some(b) = &mut self.buckets[limit.index()] {
                    let (rate, cap) = limit.bucket(share.0[limit.index()]);
                    b.set(rate, cap, now);
                }
            }
        }
    }

    fn limit(&self, limit: Limit) -> i64 {
        limit.of(&self.quota).unwrap_or(0)
    }
}

/// The tokens held for one admitted call until its answer ends.
#[derive(Debug, Clone, PartialEq)]
#[must_use = "a reservation must be settled when the answer ends"]
pub struct Reservation {
    /// (quota id, burndown) of each quota the call took from.
    parts: Vec<(String, f64)>,
    pub input_estimate: u64,
    pub max_tokens: u64,
}

impl Reservation {
    fn tokens(&self, burndown: f64) -> f64 {
        self.input_estimate as f64 + self.max_tokens as f64 * burndown
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }
}

/// What the `x-ratelimit-*` headers say: the tightest quota covering a
/// call, its limits and what this agent can still admit under them now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateInfo {
    pub requests: Option<LimitState>,
    pub tokens: Option<LimitState>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LimitState {
    pub limit: i64,
    pub remaining: u64,
    pub reset: Duration,
}

/// Who is calling what: what selects the quotas that cover a call.
#[derive(Debug, Clone, Copy)]
pub struct CallScope<'a> {
    pub profile: &'a str,
    pub region: &'a str,
    pub tenant: Option<&'a str>,
}

fn covers(scope: &QuotaScope, call: &CallScope<'_>) -> bool {
    match scope {
        QuotaScope::ProfileInRegion {
            profile,
            source_region,
        } => profile == call.profile && source_region == call.region,
        QuotaScope::TenantOnProfile { tenant, profile } => {
            call.tenant == Some(tenant.as_str()) && profile == call.profile
        }
        QuotaScope::Tenant { tenant } => call.tenant == Some(tenant.as_str()),
    }
}

/// Every quota this agent enforces.
#[derive(Debug, Default)]
pub struct Quotas {
    by_id: Mutex<BTreeMap<String, Enforced>>,
}

/// Smoothing of demand: about this long to follow a rise, and this long to
/// follow a fall (so that an agent gone quiet gives its share back fast,
/// while a busy one's share does not flicker).
const DEMAND_RISE: f64 = 2.0;
const DEMAND_FALL: f64 = 0.5;
/// Seconds of reports a demand rate is read over.
const RATE_WINDOW: f64 = 1.0;

impl Quotas {
    pub fn new() -> Quotas {
        Quotas::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Enforced>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the quotas of a new config: new ones start at a safe share
    /// (the limit split among the agents that share it: `region_agents` for
    /// a profile quota, `all_agents` for a tenant quota, which spans
    /// regions), changed ones keep their buckets' levels and lease, removed
    /// ones go.
    pub fn configure(&self, quotas: &[Quota], region_agents: u32, all_agents: u32) {
        let now = Instant::now();
        let mut by_id = self.lock();
        by_id.retain(|id, _| quotas.iter().any(|q| &q.scope.id() == id));
        for q in quotas {
            let id = q.scope.id();
            match by_id.get_mut(&id) {
                Some(e) if e.quota == *q => {}
                Some(e) => {
                    let lease = e.lease;
                    let levels: Vec<Option<f64>> = e
                        .buckets
                        .iter_mut()
                        .map(|b| b.as_mut().map(|b| b.level(now)))
                        .collect();
                    let mut fresh = Enforced::new(q.clone(), e.sharing_agents, now);
                    fresh.lease = lease;
                    for (b, level) in fresh.buckets.iter_mut().zip(levels) {
                        if let (Some(b), Some(level)) = (b, level) {
                            b.level = level.min(b.capacity);
                        }
                    }
                    *e = fresh;
                }
                None => {
                    let sharing = match q.scope {
                        QuotaScope::ProfileInRegion { .. } => region_agents,
                        QuotaScope::TenantOnProfile { .. } | QuotaScope::Tenant { .. } => {
                            all_agents
                        }
                    };
                    by_id.insert(id, Enforced::new(q.clone(), sharing, now));
                }
            }
        }
    }

    /// Takes the leader's leases; quotas it left out lose theirs.
    pub fn apply_leases(&self, leases: &pb::QuotaLeases) {
        let now = Instant::now();
        let mut by_id = self.lock();
        for e in by_id.values_mut() {
            e.lease = None;
        }
        for l in &leases.leases {
            if let Some(e) = by_id.get_mut(&l.quota_id) {
                let share = Share([l.requests_per_minute, l.tokens_per_minute, l.tokens_per_day]);
                if share.0.iter().all(|x| x.is_finite()) {
                    e.lease = Some((share, now + Duration::from_millis(l.valid_for_ms)));
                    e.sharing_agents = l.sharing_agents.max(1);
                }
            }
        }
        for e in by_id.values_mut() {
            e.follow_share(now);
        }
    }

    /// Whether any quota covers calls of `profile` (so that calls of the
    /// others skip the lock).
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Admits a call, all or nothing, against every quota that covers it.
    pub fn admit(
        &self,
        call: &CallScope<'_>,
        input_estimate: u64,
        max_tokens: u64,
    ) -> Result<(Reservation, RateInfo), Refused> {
        let now = Instant::now();
        let mut by_id = self.lock();
        let mut reservation = Reservation {
            parts: Vec::new(),
            input_estimate,
            max_tokens,
        };
        let mut refused = None;
        for (id, e) in by_id
            .iter_mut()
            .filter(|(_, e)| covers(&e.quota.scope, call))
        {
            let reserve = reservation.tokens(e.quota.output_burndown);
            e.asked_requests += 1.0;
            e.asked_tokens += reserve;
            if refused.is_some() {
                continue;
            }
            e.follow_share(now);
            let mut taken: Vec<(Limit, f64)> = Vec::new();
            for limit in LIMITS {
                let Some(bucket) = &mut e.buckets[limit.index()] else {
                    continue;
                };
                let n = if limit == Limit::Requests {
                    1.0
                } else {
                    reserve
                };
                let limit_value = limit.of(&e.quota).unwrap_or(0);
                let outcome = if n > limit_value as f64 {
                    Err(Refused {
                        quota: id.clone(),
                        limit,
                        limit_value,
                        retry_after: Duration::ZERO,
                        too_large: Some(n),
                    })
                } else {
                    bucket.take(n, now).map_err(|retry_after| Refused {
                        quota: id.clone(),
                        limit,
                        limit_value,
                        retry_after,
                        too_large: None,
                    })
                };
                match outcome {
                    Ok(()) => taken.push((limit, n)),
                    Err(r) => {
                        for (l, n) in taken.drain(..) {
                            if let Some(b) = &mut e.buckets[l.index()] {
                                b.give(n, now);
                            }
                        }
                        refused = Some(r);
                        break;
                    }
                }
            }
            if refused.is_none() {
                reservation
                    .parts
                    .push((id.clone(), e.quota.output_burndown));
            }
        }
        if let Some(r) = refused {
            // Nothing is admitted: what the quotas before took goes back.
            let parts = std::mem::take(&mut reservation.parts);
            for (id, burndown) in parts {
                if let Some(e) = by_id.get_mut(&id) {
                    let reserve = reservation.tokens(burndown);
                    for limit in LIMITS {
                        let n = if limit == Limit::Requests {
                            1.0
                        } else {
                            reserve
                        };
                        if let Some(b) = &mut e.buckets[limit.index()] {
                            b.give(n, now);
                        }
                    }
                }
            }
            return Err(r);
        }
        let info = rate_info(&mut by_id, call, now);
        Ok((reservation, info))
    }

    /// The `x-ratelimit-*` figures for a call, without admitting it.
    pub fn rate_info(&self, call: &CallScope<'_>) -> RateInfo {
        let now = Instant::now();
        rate_info(&mut self.lock(), call, now)
    }

    /// Settles a reservation with the real usage: refunds what was not
    /// used, charges what went beyond it.
    pub fn settle(&self, r: Reservation, input_tokens: u64, output_tokens: u64) {
        if r.parts.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut by_id = self.lock();
        for (id, burndown) in &r.parts {
            let Some(e) = by_id.get_mut(id) else { continue };
            let reserved = r.tokens(*burndown);
            let used = input_tokens as f64 + output_tokens as f64 * burndown;
            for limit in [Limit::Tokens, Limit::TokensPerDay] {
                if let Some(b) = &mut e.buckets[limit.index()] {
                    if used <= reserved {
                        b.give(reserved - used, now);
                    } else {
                        b.charge(used - reserved, now);
                    }
                }
            }
        }
    }

    /// Demand per quota since the last report, smoothed, with the live
    /// lease's amounts; the counters restart.
    pub fn demand_report(&self, interval: Duration) -> Vec<pb::QuotaDemand> {
        let now = Instant::now();
        let secs = interval.as_secs_f64();
        let mut by_id = self.lock();
        by_id
            .iter_mut()
            .map(|(id, e)| {
                if secs > 0.0 {
                    e.recent.push_back((
                        secs,
                        std::mem::take(&mut e.asked_requests),
                        std::mem::take(&mut e.asked_tokens),
                    ));
                    while e.recent.len() > 1
                        && e.recent.iter().skip(1).map(|r| r.0).sum::<f64>() >= RATE_WINDOW
                    {
                        e.recent.pop_front();
                    }
                    let (span, n, t) = e
                        .recent
                        .iter()
                        .fold((0.0, 0.0, 0.0), |a, r| (a.0 + r.0, a.1 + r.1, a.2 + r.2));
                    smooth(&mut e.demand_requests, n * 60.0 / span, secs);
                    smooth(&mut e.demand_tokens, t * 60.0 / span, secs);
                }
                let held = match e.lease {
                    Some((share, until)) if until > now => share.0,
                    _ => [0.0; 3],
                };
                pb::QuotaDemand {
                    quota_id: id.clone(),
                    requests_per_minute: e.demand_requests,
                    tokens_per_minute: e.demand_tokens,
                    held_requests_per_minute: held[0],
                    held_tokens_per_minute: held[1],
                    held_tokens_per_day: held[2],
                }
            })
            .collect()
    }
}

/// Moves a demand estimate toward a new rate, faster down than up.
fn smooth(estimate: &mut f64, rate: f64, secs: f64) {
    let tau = if rate < *estimate {
        DEMAND_FALL
    } else {
        DEMAND_RISE
    };
    *estimate += (1.0 - (-secs / tau).exp()) * (rate - *estimate);
}

/// For each of requests and tokens, the covering quota with the least left
/// for this agent (by the fraction of its bucket).
fn rate_info(
    by_id: &mut BTreeMap<String, Enforced>,
    call: &CallScope<'_>,
    now: Instant,
) -> RateInfo {
    let mut info = RateInfo::default();
    let mut tightest = [f64::INFINITY; 2];
    for e in by_id.values_mut().filter(|e| covers(&e.quota.scope, call)) {
        for (slot, limit) in [(0usize, Limit::Requests), (1, Limit::Tokens)] {
            let limit_value = e.limit(limit);
            let Some(b) = &mut e.buckets[limit.index()] else {
                continue;
            };
            let level = b.level(now);
            let fraction = if b.capacity > 0.0 {
                level / b.capacity
            } else {
                0.0
            };
            if fraction < tightest[slot] {
                tightest[slot] = fraction;
                let state = LimitState {
                    limit: limit_value,
                    remaining: level.max(0.0).floor() as u64,
                    reset: b.time_to_full(now),
                };
                if slot == 0 {
                    info.requests = Some(state);
                } else {
                    info.tokens = Some(state);
                }
            }
        }
    }
    info
}

/// A rough count of a request's input tokens: four bytes each.
pub fn estimate_input_tokens(body_len: usize) -> u64 {
    body_len.div_ceil(4) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(rpm: Option<i64>, tpm: Option<i64>, burndown: f64) -> Quota {
        Quota {
            scope: QuotaScope::ProfileInRegion {
                profile: "p".into(),
                source_region: "r".into(),
            },
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            tokens_per_day: None,
            output_burndown: burndown,
            revision: 0,
        }
    }

    const CALL: CallScope<'static> = CallScope {
        profile: "p",
        region: "r",
        tenant: None,
    };

    fn lease(id: &str, rpm: f64, tpm: f64, valid_ms: u64, agents: u32) -> pb::QuotaLeases {
        pb::QuotaLeases {
            leases: vec![pb::QuotaLease {
                quota_id: id.into(),
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                tokens_per_day: 0.0,
                valid_for_ms: valid_ms,
                sharing_agents: agents,
            }],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_hold_at_the_window_edges() {
        let q = Quotas::new();
        q.configure(&[quota(Some(600), None, 1.0)], 1, 1);
        // A bucket holds one second's worth: 10 at once, then one every 100 ms.
        for _ in 0..10 {
            let _ = q.admit(&CALL, 1, 1).expect("within the burst");
        }
        let refused = q.admit(&CALL, 1, 1).unwrap_err();
        assert_eq!(refused.limit, Limit::Requests);
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        assert!(refused.to_string().contains("profile/p@r"), "{refused}");
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(q.admit(&CALL, 1, 1).is_err(), "just before the edge");
        tokio::time::advance(Duration::from_millis(1)).await;
        let _ = q.admit(&CALL, 1, 1).expect("at the edge");
        // Over a whole minute of asking every millisecond, exactly the rate
        // (600) is admitted: nothing carries over beyond the burst.
        let mut admitted = 0;
        for _ in 0..60_000 {
            tokio::time::advance(Duration::from_millis(1)).await;
            if q.admit(&CALL, 1, 1).is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 600);
        // An idle minute refills only the burst.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(q.rate_info(&CALL).requests.unwrap().remaining, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn reservations_are_refunded_and_overuse_is_charged() {
        let q = Quotas::new();
        // 60,000 tokens per minute: 1,000 a second, the bucket holds 1,000.
        q.configure(&[quota(None, Some(60_000), 2.0)], 1, 1);
        // 100 input + 200 max_tokens x burndown 2 = 500 reserved.
        let (r, info) = q.admit(&CALL, 100, 200).unwrap();
        assert_eq!(info.tokens.as_ref().unwrap().remaining, 500);
        let (r2, _) = q.admit(&CALL, 100, 200).unwrap();
        let refused = q.admit(&CALL, 1, 1).unwrap_err();
        assert_eq!(refused.limit, Limit::Tokens);
        // The first answer used 100 in + 50 out (x2) = 200: 300 come back.
        q.settle(r, 100, 50);
        assert_eq!(q.rate_info(&CALL).tokens.unwrap().remaining, 300);
        // The second used more than it reserved: the bucket goes into debt,
        // paid back by refill before anything else is admitted.
        q.settle(r2, 100, 400);
        assert!(q.admit(&CALL, 1, 0).is_err());
        tokio::time::advance(Duration::from_millis(100)).await; // +100
        assert_eq!(q.rate_info(&CALL).tokens.unwrap().remaining, 0);
        tokio::time::advance(Duration::from_millis(1)).await;
        let _ = q.admit(&CALL, 1, 0).expect("debt paid back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_reservation_goes_into_debt_and_too_large_is_refused() {
        let q = Quotas::new();
        q.configure(&[quota(None, Some(60_000), 1.0)], 1, 1);
        // 4,000 reserved from a bucket of 1,000: admitted when full, then
        // nothing for the 3 s it takes to pay back.
        let (r, _) = q.admit(&CALL, 0, 4_000).unwrap();
        tokio::time::advance(Duration::from_millis(2_900)).await;
        let refused = q.admit(&CALL, 0, 1).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_millis(101));
        // Streaming usage settles it: 3,000 of 4,000 used.
        q.settle(r, 0, 3_000);
        let _ = q.admit(&CALL, 0, 1).expect("the refund paid the rest");
        // More than the whole limit can never fit: said so, not "retry".
        let refused = q.admit(&CALL, 1, 60_000).unwrap_err();
        assert_eq!(refused.too_large, Some(60_001.0));
        assert!(refused.to_string().contains("lower max_tokens"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_refusal_gives_the_request_back() {
        let q = Quotas::new();
        q.configure(&[quota(Some(60), Some(600), 1.0)], 1, 1);
        // Requests: 1 a second, burst 1. Tokens: 10 a second, burst 10.
        // 20 tokens from a full bucket of 10: admitted, 10 in debt.
        let _ = q.admit(&CALL, 20, 0).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        // A request is there again, the tokens are not (the debt is paid,
        // nothing more): refused for tokens, and the request slot it had
        // taken goes back.
        let refused = q.admit(&CALL, 5, 0).unwrap_err();
        assert_eq!(refused.limit, Limit::Tokens);
        assert_eq!(refused.retry_after, Duration::from_millis(500));
        assert_eq!(q.rate_info(&CALL).requests.unwrap().remaining, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn leases_set_the_share_and_a_safe_share_follows_their_expiry() {
        let q = Quotas::new();
        let id = "profile/p@r";
        q.configure(&[quota(Some(600), None, 1.0)], 3, 3);
        // Before any lease: the safe share, 600 / 3 = 200 a minute.
        let mut n = 0;
        for _ in 0..6_000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            n += usize::from(q.admit(&CALL, 1, 1).is_ok());
        }
        assert!((200..=204).contains(&n), "safe share: {n} in a minute");
        // A lease of 450 a minute for 10 s.
        q.apply_leases(&lease(id, 450.0, 0.0, 10_000, 3));
        let demand = q.demand_report(Duration::from_secs(60));
        assert_eq!(demand[0].held_requests_per_minute, 450.0);
        let mut n = 0;
        for _ in 0..1_000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            n += usize::from(q.admit(&CALL, 1, 1).is_ok());
        }
        assert!((75..=76).contains(&n), "450/min for 10 s: {n}");
        // Expired: back to the safe share, and nothing held is reported.
        let mut n = 0;
        for _ in 0..3_000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            n += usize::from(q.admit(&CALL, 1, 1).is_ok());
        }
        assert!((100..=102).contains(&n), "200/min for 30 s: {n}");
        assert_eq!(
            q.demand_report(Duration::from_secs(1))[0].held_requests_per_minute,
            0.0
        );
        // A lease of nothing admits nothing.
        q.apply_leases(&lease(id, 0.0, 0.0, 10_000, 3));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            q.admit(&CALL, 1, 1).unwrap_err().retry_after,
            NO_SHARE_RETRY
        );
    }

    #[tokio::test(start_paused = true)]
    async fn demand_is_reported_per_minute_and_smoothed() {
        let q = Quotas::new();
        q.configure(&[quota(Some(60), Some(1_000_000), 1.0)], 1, 1);
        for _ in 0..30 {
            let _ = q.admit(&CALL, 10, 10);
        }
        // 30 asked in 1 s = 1,800 a minute (refused ones count too); the
        // first report moves 1 - e^(-1/2) of the way there.
        let d = q.demand_report(Duration::from_secs(1));
        let alpha = 1.0 - (-0.5f64).exp();
        let rpm = d[0].requests_per_minute;
        assert!((rpm - 1_800.0 * alpha).abs() < 1e-6);
        assert!((d[0].tokens_per_minute - 36_000.0 * alpha).abs() < 1e-6);
        // Nothing asked for a second: it falls by 1 - e^(-2) at once.
        let d = q.demand_report(Duration::from_secs(1));
        assert!((d[0].requests_per_minute - rpm * (-2.0f64).exp()).abs() < 1e-6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_by_one_quota_takes_nothing_from_another() {
        let q = Quotas::new();
        let tenant = Quota {
            scope: QuotaScope::Tenant {
                tenant: "acme".into(),
            },
            ..quota(Some(60), None, 1.0)
        };
        q.configure(&[quota(Some(6_000), None, 1.0), tenant], 1, 1);
        let call = CallScope {
            tenant: Some("acme"),
            ..CALL
        };
        let _ = q.admit(&call, 1, 1).unwrap();
        // The tenant's burst (1) is spent; the profile's (100) is not.
        assert!(q.admit(&call, 1, 1).is_err());
        assert_eq!(q.rate_info(&CALL).requests.unwrap().remaining, 99);
        // Calls of other tenants only meet the profile's quota.
        let _ = q.admit(&CALL, 1, 1).unwrap();
    }
}
