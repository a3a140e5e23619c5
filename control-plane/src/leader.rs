//! Leadership and the weights loop. One replica at a time holds the
//! `leader` key (created only when absent, under the replica's lease, so it
//! goes when the replica does); the leader turns the agents' load reports
//! into effective weights every interval and writes the ones that changed,
//! each write guarded by the revision of its leader key, so that a deposed
//! leader cannot overwrite a newer one's weights.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spillway_core::model::ProfileKind;
use spillway_core::shutdown::Shutdown;
use tokio::sync::watch;

use crate::keys::{self, WeightsRecord};
use crate::leases::{self, QuotaLeader};
use crate::state::State;
use crate::store::{Compare, LeaseId, Op, Store};
use crate::weights::{self, EngineSettings, RegionLoad};
use spillway_core::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct LeaderSettings {
    /// How often the leader recomputes weights.
    pub interval: Duration,
    /// A region whose agents sent no report for this long counts as silent.
    pub silence: Duration,
    pub engine: EngineSettings,
    /// How long a quota lease lasts, and how often the leader refreshes
    /// them.
    pub quota_lease: Duration,
    pub quota_refresh: Duration,
}

impl Default for LeaderSettings {
    fn default() -> Self {
        LeaderSettings {
            interval: Duration::from_millis(500),
            silence: Duration::from_secs(3),
            engine: EngineSettings::default(),
            quota_lease: Duration::from_secs(10),
            quota_refresh: Duration::from_secs(1),
        }
    }
}

/// Campaigns for leadership and, while leader, runs the weights loop, until
/// shutdown.
pub async fn run(
    replica: String,
    store: Store,
    state: watch::Receiver<Arc<State>>,
    lease: watch::Receiver<LeaseId>,
    settings: LeaderSettings,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quota_tick = tokio::time::interval(settings.quota_refresh);
    quota_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading: Option<i64> = None;
    let mut holds = Holds::default();
    let mut quotas = QuotaLeader::new(settings.quota_lease);
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tick.tick() => {}
            _ = quota_tick.tick() => {
                if let Some(fence) = leading {
                    let st = state.borrow().clone();
                    if st.loaded
                        && let Err(e) = leases::update(&replica, &store, &st, fence, &mut quotas, settings.silence, &metrics).await
                    {
                        tracing::warn!(error = %e, "could not write quota leases");
                    }
                }
                continue;
            }
        }
        let current_lease = *lease.borrow();
        let fence = match campaign(&replica, &store, current_lease).await {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "leadership check failed");
                None
            }
        };
        if fence != leading {
            match fence {
                Some(rev) => {
                    tracing::info!(replica = %replica, fence = rev, "became the leader");
                    // A new term learns the leases before granting more.
                    quotas = QuotaLeader::new(settings.quota_lease);
                }
                None if leading.is_some() => {
                    tracing::warn!(replica = %replica, "lost the leadership")
                }
                None => {}
            }
            leading = fence;
            metrics.set(
                "spillway_cp_leader",
                &[],
                f64::from(u8::from(leading.is_some())),
            );
        }
        if let Some(fence) = leading {
            let st = state.borrow().clone();
            if st.loaded
                && let Err(e) =
                    update_weights(&replica, &store, &st, fence, &settings, &mut holds).await
            {
                tracing::warn!(error = %e, "could not write weights");
            }
        }
    }
}

/// Holds or takes the leader key; returns its revision (the fence) while
/// this replica leads.
async fn campaign(
    replica: &str,
    store: &Store,
    lease: LeaseId,
) -> Result<Option<i64>, crate::store::StoreError> {
    match store.get(keys::LEADER).await? {
        Some(kv) if kv.value == replica.as_bytes() => Ok(Some(kv.mod_revision)),
        Some(_) => Ok(None),
        None => {
            let take = Op::Put {
                key: keys::LEADER.to_string(),
                value: replica.as_bytes().to_vec(),
                lease: Some(lease),
            };
            let absent = Compare {
                key: keys::LEADER.to_string(),
                mod_revision: 0,
            };
            let outcome = store.txn(vec![absent], vec![take]).await?;
            Ok(outcome.succeeded.then_some(outcome.revision))
        }
    }
}

/// Each region's load for `model`, from the agents' latest reports.
pub fn loads_for(
    state: &State,
    model: &str,
    now_ms: u64,
    silence: Duration,
) -> BTreeMap<String, RegionLoad> {
    let mut loads: BTreeMap<String, RegionLoad> = BTreeMap::new();
    let mut calls: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for seen in state.health.values() {
        let h = &seen.value;
        // Fresh by this replica's own clock when it followed the record;
        // by the record's timestamp otherwise.
        let fresh = match seen.at {
            Some(at) => at.elapsed() <= silence,
            None => now_ms.saturating_sub(h.received_at_ms) <= silence.as_millis() as u64,
        };
        let entry = loads.entry(h.region.clone()).or_insert(RegionLoad {
            capacity: 0.0,
            in_flight: 0.0,
            error_rate: 0.0,
            fresh: false,
        });
        if !fresh {
            continue;
        }
        entry.fresh = true;
        for s in h
            .servers
            .iter()
            .filter(|s| s.models.iter().any(|m| m == model))
        {
            entry.capacity += f64::from(s.capacity);
            entry.in_flight += f64::from(s.in_flight);
            let c = calls.entry(h.region.clone()).or_default();
            c.0 = c.0.saturating_add(s.calls);
            c.1 = c.1.saturating_add(s.errors);
        }
    }
    for (region, (n, errors)) in calls {
        if n > 0
            && let Some(l) = loads.get_mut(&region)
        {
            l.error_rate = errors as f64 / n as f64;
        }
    }
    loads
}

/// Regions drained for errors are held out for a while (doubling at each
/// repeat, up to a cap): a drained region gets no calls, so its reports show
/// no errors, and without the hold it would flap straight back in. When the
/// hold ends it is let back gradually (the smoothing), and drained again,
/// for longer, if it still fails.
#[derive(Debug, Default)]
pub struct Holds {
    by_region_model: BTreeMap<(String, String), (tokio::time::Instant, u32)>,
}

const HOLD_BASE: Duration = Duration::from_secs(2);
const HOLD_MAX: Duration = Duration::from_secs(60);

impl Holds {
    /// Applies and updates the holds for `model`'s loads.
    pub fn apply(
        &mut self,
        model: &str,
        loads: &mut BTreeMap<String, RegionLoad>,
        drain_error_rate: f64,
    ) {
        let now = tokio::time::Instant::now();
        for (region, load) in loads.iter_mut() {
            let key = (region.clone(), model.to_string());
            let held = self
                .by_region_model
                .get(&key)
                .is_some_and(|(until, _)| *until > now);
            if held {
                load.error_rate = 1.0;
            } else if load.error_rate >= drain_error_rate {
                // A clean stretch as long as the longest hold forgives the
                // past: the next hold starts short again.
                let repeats = self
                    .by_region_model
                    .get(&key)
                    .filter(|(until, _)| now.saturating_duration_since(*until) < HOLD_MAX)
                    .map_or(0, |(_, n)| *n);
                let hold = HOLD_BASE
                    .saturating_mul(2u32.saturating_pow(repeats.min(10)))
                    .min(HOLD_MAX);
                self.by_region_model.insert(key, (now + hold, repeats + 1));
            }
        }
    }
}

/// Recomputes every route table's weights and writes those that moved.
async fn update_weights(
    replica: &str,
    store: &Store,
    st: &State,
    fence: i64,
    settings: &LeaderSettings,
    holds: &mut Holds,
) -> Result<(), crate::store::StoreError> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let catalog = &st.catalog;
    let mut writes = Vec::new();
    for p in catalog
        .profiles
        .values()
        .filter(|p| p.kind != ProfileKind::Application)
    {
        let Ok(resolved) = catalog.resolve(&p.id) else {
            continue;
        };
        let mut loads = loads_for(st, &resolved.model, now_ms, settings.silence);
        holds.apply(
            &resolved.model,
            &mut loads,
            settings.engine.drain_error_rate,
        );
        for source in catalog
            .regions
            .values()
            .filter(|r| catalog.callable_from(p, r))
        {
            let base = catalog.route_for(&resolved, &source.name);
            let basis = weights::basis(&base);
            let key = (p.id.clone(), source.name.clone());
            // Weights of an older table are not a starting point: an
            // operator's change applies at once, not step by step. A record
            // written by an older build has no basis: it is taken as it is,
            // and written again with one.
            let stored = st.weights.get(&key);
            let current = stored.is_some_and(|w| w.basis == basis);
            let previous = stored
                .filter(|w| w.fits(&basis))
                .map(|w| w.weights.clone())
                .unwrap_or_default();
            let goal = weights::target(&base, &loads, &previous, &settings.engine);
            let (next, changed) = weights::smooth(&previous, &goal, &settings.engine);
            if current && !changed && !previous.is_empty() {
                continue;
            }
            // Reasons alone can change without weights moving: keep them
            // current too, but never write the same thing twice.
            if current && previous == next {
                continue;
            }
            let record = WeightsRecord {
                profile: p.id.clone(),
                source_region: source.name.clone(),
                weights: next,
                leader: replica.to_string(),
                basis,
            };
            writes.push(Op::Put {
                key: keys::weights(&p.id, &source.name),
                value: keys::encode(&record),
                lease: None,
            });
        }
    }
    // Weights of tables that no longer exist go too.
    for (profile, source) in st.weights.keys() {
        let exists = catalog.profiles.get(profile).is_some_and(|p| {
            catalog
                .regions
                .get(source)
                .is_some_and(|r| catalog.callable_from(p, r))
        });
        if !exists {
            writes.push(Op::Delete {
                key: keys::weights(profile, source),
            });
        }
    }
    write_fenced(store, fence, &writes, "weights").await?;
    Ok(())
}

/// Writes `ops` in transactions of at most 64, each guarded by the leader
/// key's revision, so that a deposed leader writes nothing; returns how many
/// were written.
pub async fn write_fenced(
    store: &Store,
    fence: i64,
    ops: &[Op],
    what: &str,
) -> Result<usize, crate::store::StoreError> {
    let mut written = 0;
    for chunk in ops.chunks(64) {
        let fenced = Compare {
            key: keys::LEADER.to_string(),
            mod_revision: fence,
        };
        if !store.txn(vec![fenced], chunk.to_vec()).await?.succeeded {
            tracing::warn!("a newer leader holds the fence; {what} not written");
            break;
        }
        written += chunk.len();
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_region_drained_for_errors_is_held_out_then_for_longer() {
        let mut holds = Holds::default();
        let failing = RegionLoad {
            capacity: 4.0,
            in_flight: 0.0,
            error_rate: 1.0,
            fresh: true,
        };
        let quiet = RegionLoad {
            error_rate: 0.0,
            ..failing.clone()
        };
        let mut loads = BTreeMap::from([("r".to_string(), failing.clone())]);
        holds.apply("m", &mut loads, 0.5);
        // No calls reach it while drained: its reports look clean, but the
        // hold keeps it out.
        tokio::time::advance(Duration::from_millis(1900)).await;
        let mut loads = BTreeMap::from([("r".to_string(), quiet.clone())]);
        holds.apply("m", &mut loads, 0.5);
        assert_eq!(loads["r"].error_rate, 1.0);
        tokio::time::advance(Duration::from_millis(200)).await;
        let mut loads = BTreeMap::from([("r".to_string(), quiet.clone())]);
        holds.apply("m", &mut loads, 0.5);
        assert_eq!(loads["r"].error_rate, 0.0, "let back after 2 s");
        // Failing again: held twice as long.
        let mut loads = BTreeMap::from([("r".to_string(), failing)]);
        holds.apply("m", &mut loads, 0.5);
        tokio::time::advance(Duration::from_millis(3900)).await;
        let mut loads = BTreeMap::from([("r".to_string(), quiet)]);
        holds.apply("m", &mut loads, 0.5);
        assert_eq!(loads["r"].error_rate, 1.0);
    }

    #[tokio::test]
    async fn a_deposed_leader_cannot_write_past_the_fence() {
        let store = Store::memory();
        let lease_a = store.grant_lease(Duration::from_secs(30)).await.unwrap();
        let fence_a = campaign("a", &store, lease_a)
            .await
            .unwrap()
            .expect("a leads");
        let lease_b = store.grant_lease(Duration::from_secs(30)).await.unwrap();
        assert_eq!(
            campaign("b", &store, lease_b).await.unwrap(),
            None,
            "one leader at a time"
        );
        assert_eq!(
            campaign("a", &store, lease_a).await.unwrap(),
            Some(fence_a),
            "a keeps leading"
        );

        // a's lease goes (it stalled, or died): b takes over.
        store.revoke_lease(lease_a).await.unwrap();
        let fence_b = campaign("b", &store, lease_b)
            .await
            .unwrap()
            .expect("b leads");
        assert_ne!(fence_a, fence_b);
        let write = |fence: i64| {
            let store = store.clone();
            async move {
                let guard = Compare {
                    key: keys::LEADER.to_string(),
                    mod_revision: fence,
                };
                let put = Op::Put {
                    key: keys::weights("p", "r"),
                    value: b"{}".to_vec(),
                    lease: None,
                };
                store.txn(vec![guard], vec![put]).await.unwrap().succeeded
            }
        };
        assert!(
            !write(fence_a).await,
            "the deposed leader's write is refused"
        );
        assert!(write(fence_b).await);
        assert_eq!(campaign("a", &store, lease_a).await.unwrap(), None);
    }
}
