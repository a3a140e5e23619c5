//! Passive health, as Envoy's outlier detection does it: a destination (a
//! region, or a model server) that fails or throttles several calls in a
//! row is ejected for a while, growing with each ejection, so that the agent
//! reacts within a call or two, long before the control plane's weights do.
//! A cap keeps part of every set in service: when too much would be
//! ejected, nothing more is.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct OutlierSettings {
    /// Failures in a row that eject a destination.
    pub consecutive_failures: u32,
    /// The first ejection's length; each further one is twice as long.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// At most this share of a set is ejected at once.
    pub max_ejected_share: f64,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(2),
            max_ejection: Duration::from_secs(60),
            max_ejected_share: 0.5,
        }
    }
}

#[derive(Debug, Default)]
struct Entry {
    consecutive: u32,
    /// How many times it was ejected (sets the next ejection's length).
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// Outlier state for destinations keyed by `K`.
#[derive(Debug)]
pub struct Outliers<K> {
    settings: OutlierSettings,
    entries: Mutex<HashMap<K, Entry>>,
}

impl<K: Eq + Hash + Clone> Outliers<K> {
    pub fn new(settings: OutlierSettings) -> Self {
        Outliers {
            settings,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_ejected(&self, key: &K, now: Instant) -> bool {
        self.lock()
            .get(key)
            .and_then(|e| e.ejected_until)
            .is_some_and(|until| until > now)
    }

    /// A call that the destination answered well.
    pub fn success(&self, key: &K) {
        let mut entries = self.lock();
        if let Some(e) = entries.get_mut(key) {
            e.consecutive = 0;
            // Back in service and answering: its next ejection starts short
            // again, one step at a time.
            if e.ejected_until.is_none() {
                e.ejections = e.ejections.saturating_sub(1);
            }
        }
    }

    /// A call that failed or was throttled by the destination. `set` is
    /// every destination the caller chooses among, for the ejection cap.
    /// Returns true when this failure ejected the destination.
    pub fn failure(&self, key: &K, set: &[K], now: Instant) -> bool {
        let mut entries = self.lock();
        // Ejections that have run out end here (the destination is retried).
        for e in entries.values_mut() {
            if e.ejected_until.is_some_and(|until| until <= now) {
                e.ejected_until = None;
            }
        }
        let ejected = set
            .iter()
            .filter(|k| entries.get(*k).is_some_and(|e| e.ejected_until.is_some()))
            .count();
        let e = entries.entry(key.clone()).or_default();
        if e.ejected_until.is_some() {
            return false;
        }
        e.consecutive += 1;
        if e.consecutive < self.settings.consecutive_failures {
            return false;
        }
        let cap = (set.len() as f64 * self.settings.max_ejected_share).floor() as usize;
        if ejected + 1 > cap.max(1).min(set.len().saturating_sub(1)) {
            // Ejecting it would leave too little in service.
            return false;
        }
        let factor = 2u32.saturating_pow(e.ejections.min(16));
        let length = self
            .settings
            .base_ejection
            .saturating_mul(factor)
            .min(self.settings.max_ejection);
        e.ejected_until = Some(now + length);
        e.ejections += 1;
        e.consecutive = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> OutlierSettings {
        OutlierSettings {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(4),
            max_ejected_share: 0.5,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_failures_for_growing_times() {
        let o = Outliers::new(settings());
        let set = ["a", "b"];
        let t0 = Instant::now();
        assert!(!o.failure(&"a", &set, t0));
        o.success(&"a");
        assert!(
            !o.failure(&"a", &set, t0),
            "a success in between resets the count"
        );
        assert!(o.failure(&"a", &set, t0), "two in a row eject");
        assert!(o.is_ejected(&"a", t0 + Duration::from_millis(999)));
        assert!(!o.is_ejected(&"a", t0 + Duration::from_secs(1)));
        // Failing again right away: ejected twice as long, then capped.
        let t1 = t0 + Duration::from_secs(1);
        o.failure(&"a", &set, t1);
        assert!(o.failure(&"a", &set, t1));
        assert!(o.is_ejected(&"a", t1 + Duration::from_millis(1999)));
        assert!(!o.is_ejected(&"a", t1 + Duration::from_secs(2)));
        let mut t = t1 + Duration::from_secs(2);
        for _ in 0..5 {
            o.failure(&"a", &set, t);
            o.failure(&"a", &set, t);
            t += Duration::from_secs(4);
        }
        assert!(!o.is_ejected(&"a", t), "never longer than the cap");
    }

    #[tokio::test(start_paused = true)]
    async fn never_ejects_more_than_the_cap() {
        let o = Outliers::new(settings());
        let set = ["a", "b", "c", "d"];
        let now = Instant::now();
        for k in &set {
            o.failure(k, &set, now);
            o.failure(k, &set, now);
        }
        let ejected = set.iter().filter(|k| o.is_ejected(k, now)).count();
        assert_eq!(ejected, 2, "half of four");
        // A set of one is never ejected.
        let lone = Outliers::new(settings());
        lone.failure(&"x", &["x"], now);
        assert!(!lone.failure(&"x", &["x"], now));
        assert!(!lone.is_ejected(&"x", now));
    }
}
