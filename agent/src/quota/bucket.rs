//! A token bucket on a clock the caller passes in (so that tests run on a
//! paused clock): the unit every quota limit is enforced with.

use std::time::Duration;

use tokio::time::Instant;

/// A bucket that refills at `rate` units per second up to `capacity`.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    pub(super) capacity: f64,
    pub(super) level: f64,
    last: Instant,
}

/// How long a refused call waits when its share is zero (the next lease
/// refresh may bring one).
pub(crate) const NO_SHARE_RETRY: Duration = Duration::from_secs(1);

impl Bucket {
    /// A full bucket.
    pub fn new(rate: f64, capacity: f64, now: Instant) -> Bucket {
        Bucket {
            rate,
            capacity,
            level: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + elapsed * self.rate).min(self.capacity);
        self.last = now;
    }

    /// Takes `n` units when the bucket holds them, or holds its whole
    /// capacity (then it goes into debt); else says how long until it does.
    pub fn take(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.rate <= 0.0 || self.capacity <= 0.0 {
            return Err(NO_SHARE_RETRY);
        }
        let need = n.min(self.capacity);
        if self.level >= need {
            self.level -= n;
            return Ok(());
        }
        Err(Duration::from_secs_f64((need - self.level) / self.rate))
    }

    /// Gives back `n` units (a refund), never above the capacity.
    pub fn give(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.level = (self.level + n).min(self.capacity);
    }

    /// Takes `n` units whatever the level (usage beyond a reservation).
    pub fn charge(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.level -= n;
    }

    pub fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }

    /// Until the bucket is full again.
    pub fn time_to_full(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(((self.capacity - self.level) / self.rate).max(0.0))
    }

    /// A new rate and capacity (a new share); the level carries over, never
    /// above the new capacity.
    pub fn set(&mut self, rate: f64, capacity: f64, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.capacity = capacity;
        self.level = self.level.min(capacity);
    }
}
