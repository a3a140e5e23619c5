//! Quota admission, pure: token buckets for requests and tokens per minute,
//! a reservation taken before a call (estimated input plus `max_tokens`,
//! the output part weighted by the burndown factor) and reconciled with the
//! real usage when the answer ends, refunding what was not used. Time comes
//! from `tokio::time`, so tests run it on a paused clock.
//!
//! This is the building block of quotas; wiring it to quota objects, leases
//! from the control plane and the front doors is the rest of that work.

use std::time::Duration;

use tokio::time::Instant;

/// A bucket that refills `per_minute` units evenly over a minute, holding
/// at most `per_minute`.
#[derive(Debug, Clone)]
pub struct Bucket {
    per_minute: f64,
    level: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(per_minute: f64, now: Instant) -> Bucket {
        Bucket {
            per_minute,
            level: per_minute,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + elapsed * self.per_minute / 60.0).min(self.per_minute);
        self.last = now;
    }

    /// Takes `n` units if they are there; else says how long until they are.
    pub fn take(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.level >= n {
            self.level -= n;
            return Ok(());
        }
        if self.per_minute <= 0.0 || n > self.per_minute {
            return Err(Duration::from_secs(60));
        }
        let missing = n - self.level;
        Err(Duration::from_secs_f64(missing * 60.0 / self.per_minute))
    }

    /// Gives back `n` units (a refund), never above the bucket's size.
    pub fn give(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.level = (self.level + n).min(self.per_minute);
    }

    /// Takes `n` units whatever the level (usage beyond a reservation): the
    /// bucket may go below zero and pays it back as it refills.
    pub fn charge(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.level -= n;
    }

    pub fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }

    /// Changes the size (a new lease); the level keeps its share of it.
    pub fn resize(&mut self, per_minute: f64, now: Instant) {
        self.refill(now);
        if self.per_minute > 0.0 {
            self.level = self.level / self.per_minute * per_minute;
        } else {
            self.level = per_minute;
        }
        self.per_minute = per_minute;
    }
}

/// Which limit refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
}

/// A refused admission: the limit, and when to retry.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub limit: Limit,
    pub retry_after: Duration,
}

/// The tokens held for one admitted call until its answer ends.
#[derive(Debug, Clone, PartialEq)]
#[must_use = "a reservation must be reconciled when the answer ends"]
pub struct Reservation {
    pub tokens: f64,
}

/// Requests and tokens per minute for one scope (a profile in a source
/// region, say), with the burndown factor of output tokens.
#[derive(Debug, Clone)]
pub struct Quota {
    requests: Bucket,
    tokens: Bucket,
    burndown: f64,
}

impl Quota {
    pub fn new(rpm: f64, tpm: f64, burndown: f64, now: Instant) -> Quota {
        Quota {
            requests: Bucket::new(rpm, now),
            tokens: Bucket::new(tpm, now),
            burndown: burndown.max(1.0),
        }
    }

    /// Admits a call when one request and its token reservation (input plus
    /// `max_tokens` x burndown) fit; takes nothing when either does not.
    pub fn admit(
        &mut self,
        input_tokens: u64,
        max_tokens: u64,
        now: Instant,
    ) -> Result<Reservation, Refused> {
        let reserve = input_tokens as f64 + max_tokens as f64 * self.burndown;
        if let Err(retry_after) = self.requests.take(1.0, now) {
            return Err(Refused {
                limit: Limit::Requests,
                retry_after,
            });
        }
        if let Err(retry_after) = self.tokens.take(reserve, now) {
            // The request slot goes back: nothing was admitted.
            self.requests.give(1.0, now);
            return Err(Refused {
                limit: Limit::Tokens,
                retry_after,
            });
        }
        Ok(Reservation { tokens: reserve })
    }

    /// Settles a reservation with the real usage: refunds what was not used,
    /// charges what went beyond it.
    pub fn reconcile(
        &mut self,
        r: Reservation,
        input_tokens: u64,
        output_tokens: u64,
        now: Instant,
    ) {
        let used = input_tokens as f64 + output_tokens as f64 * self.burndown;
        if used <= r.tokens {
            self.tokens.give(r.tokens - used, now);
        } else {
            self.tokens.charge(used - r.tokens, now);
        }
    }

    /// Requests and tokens left now.
    pub fn remaining(&mut self, now: Instant) -> (f64, f64) {
        (self.requests.level(now), self.tokens.level(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_hold_at_the_window_edges() {
        let start = Instant::now();
        let mut q = Quota::new(60.0, 1_000_000.0, 1.0, start);
        for _ in 0..60 {
            let _ = q.admit(1, 1, start).expect("within the limit");
        }
        let refused = q.admit(1, 1, start).unwrap_err();
        assert_eq!(refused.limit, Limit::Requests);
        assert_eq!(
            refused.retry_after,
            Duration::from_secs(1),
            "one request refills per second"
        );
        // Just before a second has passed: still nothing; at the second: one.
        assert!(q.admit(1, 1, start + Duration::from_millis(999)).is_err());
        let _ = q
            .admit(1, 1, start + Duration::from_secs(1))
            .expect("refilled");
        assert!(q.admit(1, 1, start + Duration::from_secs(1)).is_err());
        // A whole idle minute refills the bucket, never beyond its size.
        let later = start + Duration::from_secs(600);
        assert_eq!(q.remaining(later).0, 60.0);
    }

    #[tokio::test(start_paused = true)]
    async fn reservations_are_refunded_and_overuse_is_charged() {
        let now = Instant::now();
        let mut q = Quota::new(1000.0, 1000.0, 2.0, now);
        // 100 input + 200 max_tokens x burndown 2 = 500 reserved.
        let r = q.admit(100, 200, now).unwrap();
        assert_eq!(r.tokens, 500.0);
        assert_eq!(q.remaining(now).1, 500.0);
        // A second one does not fit the 500 left plus... exactly fits.
        let r2 = q.admit(100, 200, now).unwrap();
        let refused = q.admit(1, 1, now).unwrap_err();
        assert_eq!(refused.limit, Limit::Tokens);
        assert_eq!(
            q.remaining(now).0,
            998.0,
            "a token refusal gives its request slot back"
        );
        // The first answer used 100 in + 50 out (x2) = 200: 300 come back.
        q.reconcile(r, 100, 50, now);
        assert_eq!(q.remaining(now).1, 300.0);
        // The second used more than it reserved: the bucket goes negative and
        // the excess is paid back by refill before anything else is admitted.
        q.reconcile(r2, 100, 400, now);
        assert_eq!(q.remaining(now).1, 300.0 - 400.0);
        assert!(q.admit(1, 0, now).is_err());
        let later = now + Duration::from_secs(6); // +100 tokens (1000 per minute)
        assert_eq!(q.remaining(later).1, 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_larger_than_the_whole_limit_waits_a_minute() {
        let now = Instant::now();
        let mut q = Quota::new(10.0, 100.0, 1.0, now);
        let refused = q.admit(50, 100, now).unwrap_err();
        assert_eq!(
            (refused.limit, refused.retry_after),
            (Limit::Tokens, Duration::from_secs(60))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_lease_resizes_the_bucket_keeping_its_share() {
        let now = Instant::now();
        let mut b = Bucket::new(100.0, now);
        b.take(50.0, now).unwrap();
        b.resize(200.0, now);
        assert_eq!(b.level(now), 100.0);
    }
}
