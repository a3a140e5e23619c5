//! The benchmark's load generator and report: closed loops at a fixed
//! concurrency and open loops at a fixed rate, both bounded in time and in
//! count, and the statistics they yield.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Mutex;

/// Hard cap on requests per measurement, whatever the duration.
const MAX_REQUESTS: usize = 5_000_000;

/// What one measurement produced.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub requests: usize,
    pub errors: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub throughput_rps: f64,
}

impl Stats {
    pub fn from_latencies(mut lat: Vec<u32>, errors: usize, elapsed: Duration) -> Stats {
        lat.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return f64::NAN;
            }
            let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
            f64::from(lat[i])
        };
        let mean = if lat.is_empty() {
            f64::NAN
        } else {
            lat.iter().map(|&l| f64::from(l)).sum::<f64>() / lat.len() as f64
        };
        Stats {
            requests: lat.len(),
            errors,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            mean_us: mean,
            throughput_rps: lat.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        }
    }

    /// Whether the measurement produced numbers at all.
    pub fn is_valid(&self) -> bool {
        self.requests > 0 && self.p50_us.is_finite() && self.p99_us.is_finite()
    }
}

/// Times a call: its latency when it succeeded, `None` when it failed.
pub async fn timed(call: impl Future<Output = bool>) -> Option<Duration> {
    let t = Instant::now();
    call.await.then(|| t.elapsed())
}

/// Runs `call` from `concurrency` workers, each back to back, for `warmup`
/// (not counted) then `duration`. `call` yields the latency it measured
/// (usually its own duration, or the time to the first token), or `None`
/// when it failed.
pub async fn closed_loop<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    call: F,
) -> Stats
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<Duration>> + Send,
{
    let sample = closed_loop_sample(concurrency, warmup, duration, call).await;
    Stats::from_latencies(sample.latencies_us, sample.errors, sample.elapsed)
}

/// What a measurement recorded, before statistics: samples of several
/// rounds can be merged, so that paths measured in alternating rounds see
/// the same machine drift.
#[derive(Debug, Default)]
pub struct Sample {
    pub latencies_us: Vec<u32>,
    pub errors: usize,
    pub elapsed: Duration,
}

impl Sample {
    pub fn merge(&mut self, other: Sample) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        self.elapsed += other.elapsed;
    }

    pub fn stats(self) -> Stats {
        Stats::from_latencies(self.latencies_us, self.errors, self.elapsed)
    }
}

/// [`closed_loop`], returning the raw sample.
pub async fn closed_loop_sample<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    call: F,
) -> Sample
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<Duration>> + Send,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let per_worker = MAX_REQUESTS / concurrency.max(1);
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let call = call.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0;
            for _ in 0..per_worker {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let result = call().await;
                if t >= measure_from {
                    match result {
                        Some(d) => lat.push(d.as_micros().min(u128::from(u32::MAX)) as u32),
                        None => errors += 1,
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await.expect("a load worker");
        lat.extend(l);
        errors += e;
    }
    Sample {
        latencies_us: lat,
        errors,
        elapsed: duration,
    }
}

/// Starts `call` at a fixed `rate` per second for `duration`, whatever the
/// answers take (open loop), and waits for the last answers.
pub async fn open_loop<F, Fut>(rate: u32, duration: Duration, call: F) -> Stats
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<Duration>> + Send + 'static,
{
    let call = Arc::new(call);
    let count = ((f64::from(rate) * duration.as_secs_f64()) as usize).min(MAX_REQUESTS);
    let results = Arc::new(Mutex::new((Vec::with_capacity(count), 0usize)));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        ticker.tick().await;
        let call = call.clone();
        let results = results.clone();
        tasks.push(tokio::spawn(async move {
            let result = call().await;
            let mut r = results.lock().await;
            match result {
                Some(d) => r.0.push(d.as_micros().min(u128::from(u32::MAX)) as u32),
                None => r.1 += 1,
            }
        }));
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    let (lat, errors) = std::mem::take(&mut *results.lock().await);
    Stats::from_latencies(lat, errors, duration)
}

/// The p-th percentile of durations, in milliseconds.
pub fn percentile_ms(values: &mut [Duration], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_unstable();
    let i = ((values.len() as f64 * p).ceil() as usize).clamp(1, values.len()) - 1;
    values[i].as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_rank() {
        let lat: Vec<u32> = (1..=100).collect();
        let s = Stats::from_latencies(lat, 2, Duration::from_secs(2));
        assert_eq!(
            (s.p50_us, s.p99_us, s.requests, s.errors),
            (50.0, 99.0, 100, 2)
        );
        assert_eq!(s.throughput_rps, 50.0);
        assert!(!Stats::from_latencies(vec![], 0, Duration::from_secs(1)).is_valid());
    }

    #[tokio::test]
    async fn loops_are_bounded_and_count_what_they_did() {
        let s = closed_loop(4, Duration::ZERO, Duration::from_millis(50), || {
            timed(async { true })
        })
        .await;
        assert!(s.is_valid() && s.errors == 0);
        let s = open_loop(200, Duration::from_millis(100), || timed(async { false })).await;
        assert_eq!((s.requests, s.errors), (0, 20));
    }
}
