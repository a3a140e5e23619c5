//! An adaptive concurrency limit for a model server whose engine says
//! nothing of its load: learned from the time to first token, the way TCP
//! Vegas and Netflix's Gradient limits learn from round-trip times.
//!
//! An LLM call's total time is mostly its output length, which says nothing
//! about load; its time to first token is prefill plus time queued in the
//! engine, and queueing is what the limit must avoid. So:
//!
//! - The **baseline** is the lowest TTFT seen over the last one to two
//!   windows (30 s each by default): the engine's prefill with no queue. It
//!   is re-learned as old windows pass, so a changed engine is followed.
//! - A TTFT above `tolerance` times the baseline, and at least
//!   `min_queue_delay` above it (so that scheduling jitter on a fast engine
//!   is not taken for a queue), means the call **queued**: the limit drops to
//!   `backoff` (0.75) times the smaller of itself and the calls that were in flight
//!   when the queued call was sent. A throttle (429) counts the same. Only
//!   calls sent after the last drop can cause another, so one burst of
//!   queued calls costs one drop, not one per call (once per round trip, as
//!   in TCP).
//! - Otherwise, when the limit was in use (in flight at send time at least
//!   half of it), it grows: by one per call until the first drop (**slow
//!   start**), then by one per limit's worth of calls (one per round).
//! - It stays within `[min, max]` (`max`: `capacity=` when set).

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct LimitSettings {
    pub min: f64,
    pub max: f64,
    pub initial: f64,
    pub tolerance: f64,
    pub min_queue_delay: Duration,
    pub backoff: f64,
    pub window: Duration,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            min: 1.0,
            max: 1024.0,
            initial: 4.0,
            tolerance: 2.0,
            min_queue_delay: Duration::from_millis(50),
            backoff: 0.75,
            window: Duration::from_secs(30),
        }
    }
}

impl LimitSettings {
    /// The settings for a server with `capacity=` (an upper bound, and the
    /// starting point: the operator's figure is trusted until TTFT says
    /// otherwise) or without.
    pub fn for_capacity(capacity: Option<u32>) -> LimitSettings {
        let mut s = LimitSettings::default();
        if let Some(c) = capacity {
            s.max = f64::from(c);
            s.initial = f64::from(c);
        }
        s
    }
}

#[derive(Debug)]
pub struct AdaptiveLimit {
    s: LimitSettings,
    limit: f64,
    slow_start: bool,
    /// The lowest TTFT of the current window and of the one before.
    min_now: Option<Duration>,
    min_prev: Option<Duration>,
    window_started: Instant,
    last_drop: Option<Instant>,
}

impl AdaptiveLimit {
    pub fn new(s: LimitSettings, now: Instant) -> AdaptiveLimit {
        let limit = s.initial.clamp(s.min, s.max);
        AdaptiveLimit {
            slow_start: limit < s.max,
            s,
            limit,
            min_now: None,
            min_prev: None,
            window_started: now,
            last_drop: None,
        }
    }

    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// The TTFT taken as the engine's unloaded one, once a call was seen.
    pub fn baseline(&self) -> Option<Duration> {
        match (self.min_now, self.min_prev) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A call sent at `sent`, with `in_flight` calls (itself included) out
    /// to the server then, got its first token `ttft` after it was sent.
    pub fn on_first_token(&mut self, sent: Instant, in_flight: u32, ttft: Duration, now: Instant) {
        self.roll(now);
        let queued = self.baseline().is_some_and(|base| {
            ttft.as_secs_f64() > base.as_secs_f64() * self.s.tolerance
                && ttft.saturating_sub(base) > self.s.min_queue_delay
        });
        if queued {
            self.drop_to(sent, in_flight, now);
        } else if f64::from(in_flight) >= self.limit / 2.0 {
            let step = if self.slow_start {
                1.0
            } else {
                1.0 / self.limit
            };
            self.limit = (self.limit + step).min(self.s.max);
        }
        self.min_now = Some(self.min_now.map_or(ttft, |m| m.min(ttft)));
    }

    /// A call sent at `sent` with `in_flight` calls out was refused for
    /// load (the server throttled it).
    pub fn on_overload(&mut self, sent: Instant, in_flight: u32, now: Instant) {
        self.roll(now);
        self.drop_to(sent, in_flight, now);
    }

    fn drop_to(&mut self, sent: Instant, in_flight: u32, now: Instant) {
        if self.last_drop.is_some_and(|d| sent < d) {
            return;
        }
        let from = self.limit.min(f64::from(in_flight.max(1)));
        self.limit = (from * self.s.backoff).clamp(self.s.min, self.s.max);
        self.slow_start = false;
        self.last_drop = Some(now);
    }

    fn roll(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.window_started);
        if age >= self.s.window {
            self.min_prev = if age >= self.s.window * 2 {
                None
            } else {
                self.min_now
            };
            self.min_now = None;
            self.window_started = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFILL: Duration = Duration::from_millis(100);

    /// Sends `n` calls one after the other with `in_flight` out, each
    /// getting its first token after `ttft`; returns the limit.
    async fn calls(l: &mut AdaptiveLimit, n: usize, in_flight: u32, ttft: Duration) -> f64 {
        for _ in 0..n {
            let sent = Instant::now();
            tokio::time::advance(ttft).await;
            l.on_first_token(sent, in_flight, ttft, Instant::now());
        }
        l.limit()
    }

    #[tokio::test(start_paused = true)]
    async fn grows_while_used_and_unqueued() {
        let mut l = AdaptiveLimit::new(LimitSettings::default(), Instant::now());
        assert_eq!(l.limit(), 4.0);
        // Not in use (1 in flight of 4): no growth.
        assert_eq!(calls(&mut l, 10, 1, PREFILL).await, 4.0);
        // In use: one per call in slow start.
        assert_eq!(calls(&mut l, 4, 4, PREFILL).await, 8.0);
        assert_eq!(l.baseline(), Some(PREFILL));
    }

    #[tokio::test(start_paused = true)]
    async fn drops_once_per_round_when_calls_queue() {
        let mut l = AdaptiveLimit::new(LimitSettings::default(), Instant::now());
        calls(&mut l, 20, 20, PREFILL).await;
        assert_eq!(l.limit(), 24.0);
        // A burst of twelve calls sent together, all queued (TTFT 500 ms):
        // one drop, to 0.75 times the 12 that were in flight.
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(500)).await;
        for _ in 0..12 {
            l.on_first_token(sent, 12, Duration::from_millis(500), Instant::now());
        }
        assert!((l.limit() - 9.0).abs() < 1e-9, "{}", l.limit());
        // A call sent after the drop that queued drops it again.
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(400)).await;
        l.on_first_token(sent, 10, Duration::from_millis(400), Instant::now());
        assert!((l.limit() - 6.75).abs() < 1e-9, "{}", l.limit());
        // After slow start, growth is one per round: a limit's worth of
        // unqueued calls at the limit adds about one.
        let before = l.limit();
        let after = calls(&mut l, 7, 7, PREFILL).await;
        assert!(
            after > before + 0.9 && after < before + 1.1,
            "{before} -> {after}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_is_not_a_queue_and_bounds_hold() {
        let s = LimitSettings {
            max: 6.0,
            ..LimitSettings::default()
        };
        let mut l = AdaptiveLimit::new(s, Instant::now());
        // A fast engine (1 ms) with 20 ms of jitter: 21x the baseline, but
        // under the 50 ms floor, so no drop; and never above max.
        calls(&mut l, 2, 4, Duration::from_millis(1)).await;
        assert_eq!(calls(&mut l, 10, 6, Duration::from_millis(21)).await, 6.0);
        // Throttles drop it, never under min.
        for _ in 0..50 {
            let sent = Instant::now();
            tokio::time::advance(Duration::from_millis(5)).await;
            l.on_overload(sent, 1, Instant::now());
        }
        assert_eq!(l.limit(), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_is_the_start_and_the_ceiling() {
        let l = AdaptiveLimit::new(LimitSettings::for_capacity(Some(32)), Instant::now());
        assert_eq!(l.limit(), 32.0);
        let mut l = AdaptiveLimit::new(LimitSettings::for_capacity(Some(2)), Instant::now());
        assert_eq!(calls(&mut l, 5, 2, PREFILL).await, 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn baseline_follows_a_slower_engine() {
        let mut l = AdaptiveLimit::new(LimitSettings::default(), Instant::now());
        calls(&mut l, 3, 1, PREFILL).await;
        assert_eq!(l.baseline(), Some(PREFILL));
        // The engine now takes 300 ms to prefill (a bigger model, say):
        // within two windows the baseline is 300 ms, and such calls no longer
        // count as queued.
        tokio::time::advance(Duration::from_secs(31)).await;
        calls(&mut l, 3, 1, Duration::from_millis(300)).await;
        tokio::time::advance(Duration::from_secs(31)).await;
        calls(&mut l, 3, 1, Duration::from_millis(300)).await;
        assert_eq!(l.baseline(), Some(Duration::from_millis(300)));
        let before = l.limit();
        calls(&mut l, 3, 4, Duration::from_millis(320)).await;
        assert!(l.limit() > before);
    }
}
