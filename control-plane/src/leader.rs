//! Leadership and the weights loop. One replica at a time holds the
//! `leader` key (created only when absent, under the replica's lease, so it
//! goes when the replica does); the leader turns the agents' load reports
//! into effective weights every interval and writes the ones that changed,
//! each write guarded by the revision of its leader key, so that a deposed
//! leader cannot overwrite a newer one's weights. It looks only at the
//! route tables of models that agents report servers of, and at tables
//! whose stored weights are on their way back to the operator's table: an
//! idle catalog costs next to nothing, however large. A leader that shuts
//! down resigns (deletes its key), and a follower campaigns as soon as it
//! sees the key go, so that leadership moves at once, not after the lease
//! TTL.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spillway_core::model::{Catalog, ProfileKind, RouteTable};
use spillway_core::shutdown::Shutdown;
use tokio::sync::watch;

use crate::keys::{self, EngineHealth, ServerHealth, WeightsRecord};
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
/// shutdown; then resigns if it leads.
pub async fn run(
    replica: String,
    store: Store,
    mut state: watch::Receiver<Arc<State>>,
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
    let mut weigher = Weigher::default();
    let mut quotas = QuotaLeader::new(settings.quota_lease);
    loop {
        tokio::select! {
            _ = shutdown.wait() => {
                if let Some(fence) = leading {
                    resign(&replica, &store, fence).await;
                    metrics.set("spillway_cp_leader", &[], 0.0);
                    metrics.clear(EFFECTIVE_WEIGHT);
                }
                return;
            }
            _ = tick.tick() => {}
            // A follower need not wait for its tick when the key is free.
            _ = vacated(&mut state), if leading.is_none() => {}
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
                    tracing::warn!(replica = %replica, "lost the leadership");
                    // The new leader reports the weights now; ours would
                    // go stale beside its.
                    metrics.clear(EFFECTIVE_WEIGHT);
                    // Nor is its index keeping a catalog alive for nothing.
                    weigher.tables = Tables::default();
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
            if st.loaded {
                let updated = update_weights(
                    &replica,
                    &store,
                    &st,
                    fence,
                    &settings,
                    &mut weigher,
                    &metrics,
                )
                .await;
                match updated {
                    Ok(t) if t.written + t.removed > 0 => tracing::debug!(
                        computed = t.computed,
                        written = t.written,
                        removed = t.removed,
                        "weights updated"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "could not write weights"),
                }
            }
        }
    }
}

/// Resolves when the replica's view of the store shows no leader key
/// (after a change: a vacancy already seen does not count again).
async fn vacated(state: &mut watch::Receiver<Arc<State>>) {
    loop {
        if state.changed().await.is_err() {
            // The follower stopped: only the ticks are left.
            std::future::pending::<()>().await;
        }
        let st = state.borrow_and_update();
        if st.loaded && st.leader.is_none() {
            return;
        }
    }
}

/// Gives the leadership up by deleting the leader key while it is still
/// this term's (guarded by the fence), so that a follower takes over at
/// once rather than when the replica's lease expires.
async fn resign(replica: &str, store: &Store, fence: i64) {
    let ours = Compare {
        key: keys::LEADER.to_string(),
        mod_revision: fence,
    };
    let delete = Op::Delete {
        key: keys::LEADER.to_string(),
    };
    match store.txn(vec![ours], vec![delete]).await {
        Ok(o) if o.succeeded => tracing::info!(replica = %replica, "resigned the leadership"),
        Ok(_) => tracing::info!(replica = %replica, "the leadership had already moved on"),
        Err(e) => tracing::warn!(
            replica = %replica,
            error = %e,
            "could not resign the leadership; it goes when the replica's lease does"
        ),
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

/// Each region's load for `model`, from the agents' latest reports: one
/// figure per model server, however many agents share it (see
/// [`regions_for`]).
pub fn loads_for(
    state: &State,
    model: &str,
    now_ms: u64,
    silence: Duration,
) -> BTreeMap<String, RegionLoad> {
    regions_for(state, model, now_ms, silence)
        .into_iter()
        .map(|(region, r)| (region, r.load))
        .collect()
}

/// A region's load for one model, and the model servers it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionView {
    pub load: RegionLoad,
    /// By URL.
    pub servers: Vec<ServerView>,
}

impl RegionView {
    /// A region with no fresh report: nothing known for it.
    fn silent() -> RegionView {
        RegionView {
            load: RegionLoad {
                capacity: 0.0,
                in_flight: 0.0,
                error_rate: 0.0,
                fresh: false,
            },
            servers: Vec::new(),
        }
    }
}

/// One model server of a region as the region's fresh reports show it,
/// counted once however many agents report it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerView {
    pub url: String,
    /// What it adds to the region's load (both 0 when its engine figures
    /// are stale).
    pub in_flight: f64,
    pub capacity: f64,
    pub engine: EngineView,
    /// The concurrency limit the agents learned from time to first token:
    /// from the report whose engine figures count, else summed over the
    /// agents (each learns its own share) up to the operator's bound.
    pub learned_limit: f64,
    /// Its freshest report says it is saturated, or its figures are stale.
    pub saturated: bool,
}

/// What the engine of a model server said of itself.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineView {
    /// Its agents read no engine metrics (or predate reading them).
    None,
    /// The freshest figures any agent read.
    Fresh(EngineHealth),
    /// Agents read its metrics, but none recently.
    Stale,
}

/// Each region's load for `model` and the model servers behind it, from the
/// agents' reports that are fresh (received within `silence`).
///
/// Agents of a region share their model servers, so a server counts once,
/// grouped by URL over the region's reports:
///
/// - With fresh engine figures in any report, the engine knows every
///   caller's requests: the report with the most recent figures decides,
///   in flight = running + waiting, capacity = that agent's `limit`.
/// - Without engine figures, each agent knows only its own calls: in
///   flight is their sum, and capacity the sum of the agents' limits (each
///   learned its share), up to the operator's bound (`capacity=`) when one
///   is set. A report of an older agent has no limit: its `capacity` stands
///   for it, so that older agents count as they did, once per server.
/// - With engine figures that are all stale (the engine may be drowning,
///   or gone; agents send it nothing while they are), the server adds
///   nothing: capacity and in flight 0. It then offers no spare capacity
///   and does not dilute the utilization of the region's healthy servers
///   (counting it as full, in flight = capacity = its last limit, would
///   push a region whose other servers are fine toward spilling), and a
///   region whose servers are all stale has no capacity, so the weight
///   engine drains it, as it does a silent one. When every region is
///   stale at once, there is no healthy capacity anywhere and the engine
///   panics (spreads by base weight) rather than drain everything. Reports
///   without engine figures for such a server (an older agent's) do not
///   make it count: the agents that read its metrics avoid it.
///
/// Error rates are over every agent's calls, as each counts its own.
///
/// A region of the catalog with no agent connected is silent (not fresh,
/// no capacity) as soon as any region reports, so the weight engine drains
/// it; with no reports anywhere, nothing is known against any region.
pub fn regions_for(
    state: &State,
    model: &str,
    now_ms: u64,
    silence: Duration,
) -> BTreeMap<String, RegionView> {
    let mut regions: BTreeMap<String, RegionView> = BTreeMap::new();
    let mut calls: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    // Each server's reports with their age, by (region, URL).
    let mut reports: BTreeMap<(&str, &str), Vec<(Duration, &ServerHealth)>> = BTreeMap::new();
    for seen in state.health.values() {
        let h = &seen.value;
        // Age by this replica's own clock when it followed the record; by
        // the record's timestamp otherwise.
        let age = match seen.at {
            Some(at) => at.elapsed(),
            None => Duration::from_millis(now_ms.saturating_sub(h.received_at_ms)),
        };
        let view = regions
            .entry(h.region.clone())
            .or_insert_with(RegionView::silent);
        if age > silence {
            continue;
        }
        view.load.fresh = true;
        for s in h
            .servers
            .iter()
            .filter(|s| s.models.iter().any(|m| m == model))
        {
            reports
                .entry((h.region.as_str(), s.url.as_str()))
                .or_default()
                .push((age, s));
            let c = calls.entry(h.region.as_str()).or_default();
            c.0 = c.0.saturating_add(s.calls);
            c.1 = c.1.saturating_add(s.errors);
        }
    }
    for ((region, url), reports) in reports {
        let server = server_view(url, &reports);
        if let Some(view) = regions.get_mut(region) {
            view.load.capacity += server.capacity;
            view.load.in_flight += server.in_flight;
            view.servers.push(server);
        }
    }
    for (region, (n, errors)) in calls {
        if n > 0
            && let Some(view) = regions.get_mut(region)
        {
            view.load.error_rate = errors as f64 / n as f64;
        }
    }
    // A region none of whose agents is connected (they left, or the
    // replicas ended their streams after they hung) has nothing to serve a
    // relay with, and its reports went with its agents. Once reports come
    // in at all, it counts as silent, so that it stays drained rather than
    // come back as a region that never reported (whose agents predate
    // load reports) would.
    if !state.health.is_empty() {
        let connected: std::collections::BTreeSet<&str> =
            state.agents.values().map(|a| a.region.as_str()).collect();
        for region in state.catalog.regions.keys() {
            if !connected.contains(region.as_str()) {
                regions
                    .entry(region.clone())
                    .or_insert_with(RegionView::silent);
            }
        }
    }
    regions
}

/// Calls a server takes without queuing, by one agent's report: its
/// estimate, or the operator's figure from an agent that predates it.
fn limit_of(s: &ServerHealth) -> f64 {
    if s.limit > 0.0 {
        s.limit
    } else {
        f64::from(s.capacity)
    }
}

/// The youngest of some reports, by age.
fn newest<'a>(
    reports: impl Iterator<Item = (Duration, &'a ServerHealth)>,
) -> Option<&'a ServerHealth> {
    reports.min_by_key(|(age, _)| *age).map(|(_, s)| s)
}

/// One server from its reports (with their ages), as [`regions_for`]
/// counts it.
fn server_view(url: &str, reports: &[(Duration, &ServerHealth)]) -> ServerView {
    // Agents may disagree on the operator's bound (a config being rolled
    // out): the smallest one set holds.
    let bound = reports
        .iter()
        .map(|(_, s)| s.capacity)
        .filter(|c| *c > 0)
        .min()
        .map_or(f64::INFINITY, f64::from);
    // The figures' own age counts: a report just received may carry an
    // older scrape than one received a moment before.
    let engine = newest(reports.iter().filter_map(|(age, s)| {
        let e = s.engine.as_ref().filter(|e| e.fresh)?;
        Some((age.saturating_add(Duration::from_millis(e.age_ms)), *s))
    }));
    let stale = engine.is_none() && reports.iter().any(|(_, s)| s.engine.is_some());
    let summed =
        |f: fn(&ServerHealth) -> f64| reports.iter().map(|(_, s)| f(s)).sum::<f64>().min(bound);
    let learned = |s: &ServerHealth| s.learned_limit;
    match engine {
        Some(s) => {
            let e = s.engine.clone().unwrap_or_default();
            ServerView {
                url: url.to_string(),
                in_flight: e.running + e.waiting,
                capacity: limit_of(s).min(bound),
                learned_limit: s.learned_limit.min(bound),
                saturated: s.saturation >= 1.0,
                engine: EngineView::Fresh(e),
            }
        }
        None if stale => ServerView {
            url: url.to_string(),
            in_flight: 0.0,
            capacity: 0.0,
            engine: EngineView::Stale,
            learned_limit: summed(learned),
            saturated: true,
        },
        None => ServerView {
            url: url.to_string(),
            in_flight: reports.iter().map(|(_, s)| f64::from(s.in_flight)).sum(),
            capacity: summed(limit_of),
            engine: EngineView::None,
            learned_limit: summed(learned),
            saturated: newest(reports.iter().copied()).is_some_and(|s| s.saturation >= 1.0),
        },
    }
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

/// The gauge of the weights in force, which only the leader reports.
const EFFECTIVE_WEIGHT: &str = "spillway_cp_effective_weight";

/// One route table's weights in force: (profile, source region, weights).
type InForce = (String, String, Vec<weights::Weight>);

/// What the weights loop keeps from one update to the next.
#[derive(Debug, Default)]
struct Weigher {
    holds: Holds,
    tables: Tables,
}

/// The profiles with route tables of their own, by model, so that an
/// update finds the tables of the models with load without walking the
/// catalog. Rebuilt only when the catalog changes.
#[derive(Debug, Default)]
struct Tables {
    /// The catalog it was built from. Holding it, not just its address,
    /// is what makes `Arc::ptr_eq` a sound test of change: the state
    /// changes its catalog with `Arc::make_mut`, which copies a catalog
    /// that is shared, so a changed catalog is always another `Arc` (and
    /// the address of this one cannot be reused while it is held).
    built_from: Option<Arc<Catalog>>,
    /// Profile ids by the model they resolve to. Application profiles have
    /// no table of their own: they follow their base's, and its weights.
    by_model: BTreeMap<String, Vec<String>>,
    /// The model of each of those profiles.
    model_of: BTreeMap<String, String>,
}

impl Tables {
    fn refresh(&mut self, catalog: &Arc<Catalog>) {
        if self
            .built_from
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, catalog))
        {
            return;
        }
        self.by_model.clear();
        self.model_of.clear();
        for p in catalog
            .profiles
            .values()
            .filter(|p| p.kind != ProfileKind::Application)
        {
            let Ok(resolved) = catalog.resolve(&p.id) else {
                continue;
            };
            self.by_model
                .entry(resolved.model.clone())
                .or_default()
                .push(p.id.clone());
            self.model_of.insert(p.id.clone(), resolved.model);
        }
        self.built_from = Some(Arc::clone(catalog));
    }
}

/// The models that some agent's report lists a server of, fresh or not:
/// only they have load figures. For any other model no region shows
/// anything (no server, no capacity, no calls), and its tables stand as
/// the operator wrote them. A model whose reports all went stale stays in:
/// its regions are silent, and the engine drains them or panics as it
/// should. Relay figures name no model, and a hold only marks a region
/// that has figures for the model, so neither adds any.
fn models_with_load(st: &State) -> BTreeSet<&str> {
    st.health
        .values()
        .flat_map(|seen| &seen.value.servers)
        .flat_map(|s| s.models.iter().map(String::as_str))
        .collect()
}

/// What an update does with one table's weights.
#[derive(Debug)]
enum Step {
    /// The stored weights stay in force, not written again.
    Keep(Vec<weights::Weight>),
    /// These are written and put in force.
    Write(Vec<weights::Weight>),
    /// The record goes: the table stands as the operator wrote it.
    Remove,
}

/// One table whose model has load, from its stored weights (if any)
/// toward the engine's for `loads`.
fn with_load(
    base: &RouteTable,
    basis: &str,
    stored: Option<&WeightsRecord>,
    loads: &BTreeMap<String, RegionLoad>,
    s: &EngineSettings,
) -> Step {
    // Weights of an older table are not a starting point: an operator's
    // change applies at once, not step by step. A record written by an
    // older build has no basis: it is taken as it is, and written again
    // with one.
    let current = stored.is_some_and(|w| w.basis == basis);
    let previous = stored
        .filter(|w| w.fits(basis))
        .map(|w| w.weights.clone())
        .unwrap_or_default();
    let goal = weights::target(base, loads, &previous, s);
    let (next, changed) = weights::smooth(&previous, &goal, s);
    // Not written again, the stored weights stay in force.
    if current && !changed && !previous.is_empty() {
        return Step::Keep(previous);
    }
    // Reasons alone can change without weights moving: keep them current
    // too, but never write the same thing twice.
    if current && previous == next {
        return Step::Keep(previous);
    }
    Step::Write(next)
}

/// One table whose model has no load but whose weights are still stored
/// (its model's servers went, say): back toward the operator's table,
/// step by step as weights always move, and its record goes once they are
/// there, or within the hysteresis band of it (where a step would go all
/// the way, or none would be taken).
fn without_load(
    base: &RouteTable,
    basis: &str,
    stored: &WeightsRecord,
    s: &EngineSettings,
) -> Step {
    let previous = if stored.fits(basis) {
        stored.weights.clone()
    } else {
        Vec::new()
    };
    let goal = weights::target(base, &BTreeMap::new(), &[], s);
    let (next, changed) = weights::smooth(&previous, &goal, s);
    if !changed || weights::settled(&next, &goal, s) {
        Step::Remove
    } else {
        Step::Write(next)
    }
}

/// What one update did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    /// Route tables the engine ran over.
    computed: usize,
    /// Weights records written, and removed (put in the fenced writes: a
    /// deposed leader's are refused).
    written: usize,
    removed: usize,
}

/// Recomputes the weights of the route tables whose model has load, and of
/// those without load that still have weights stored; writes the weights
/// that moved, removes the records of tables back to the operator's table
/// or gone, and reports the weights in force once all that is written.
///
/// No record and the weights of no load are the same to agents, so the
/// leader keeps no record of the latter. A table without a record is served
/// as the operator wrote it (`views::profile_resources` sends its route and
/// no weights), and with no load the engine's weights are that table: its
/// first level by base weight, the others behind it at zero. Stored, they
/// would be served exactly as no record for the default table, source
/// first (`views::apply_weights` gives it back unchanged, and no weights
/// are sent), with the table's own order and split for any table of one
/// or two levels, and for a table of more levels they would merge the
/// levels behind the first into one, which no record does not. So a table
/// with no load and no record is not looked at: no computing, no record,
/// no series.
async fn update_weights(
    replica: &str,
    store: &Store,
    st: &State,
    fence: i64,
    settings: &LeaderSettings,
    weigher: &mut Weigher,
    metrics: &Metrics,
) -> Result<Tally, crate::store::StoreError> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let catalog = &st.catalog;
    let engine = &settings.engine;
    let Weigher { holds, tables } = weigher;
    tables.refresh(catalog);
    let loaded = models_with_load(st);
    // (profile, source region, basis, what becomes of its weights)
    let mut steps: Vec<(String, String, String, Step)> = Vec::new();
    for model in &loaded {
        let Some(profiles) = tables.by_model.get(*model) else {
            continue;
        };
        let mut loads = loads_for(st, model, now_ms, settings.silence);
        holds.apply(model, &mut loads, engine.drain_error_rate);
        for id in profiles {
            let (Some(p), Ok(resolved)) = (catalog.profiles.get(id), catalog.resolve(id)) else {
                continue;
            };
            for source in catalog
                .regions
                .values()
                .filter(|r| catalog.callable_from(p, r))
            {
                let base = catalog.route_for(&resolved, &source.name);
                let basis = weights::basis(&base);
                let stored = st.weights.get(&(id.clone(), source.name.clone()));
                let step = with_load(&base, &basis, stored, &loads, engine);
                steps.push((id.clone(), source.name.clone(), basis, step));
            }
        }
    }
    let mut writes = Vec::new();
    let mut tally = Tally::default();
    for ((profile, source), record) in st.weights.iter() {
        let exists = catalog.profiles.get(profile).is_some_and(|p| {
            catalog
                .regions
                .get(source)
                .is_some_and(|r| catalog.callable_from(p, r))
        });
        if !exists {
            // Weights of tables that no longer exist go too.
            writes.push(Op::Delete {
                key: keys::weights(profile, source),
            });
            tally.removed += 1;
            continue;
        }
        // Tables with load were done above; application profiles have no
        // weights of their own to do.
        let Some(model) = tables.model_of.get(profile) else {
            continue;
        };
        if loaded.contains(model.as_str()) {
            continue;
        }
        let Ok(resolved) = catalog.resolve(profile) else {
            continue;
        };
        let base = catalog.route_for(&resolved, source);
        let basis = weights::basis(&base);
        let step = without_load(&base, &basis, record, engine);
        steps.push((profile.clone(), source.clone(), basis, step));
    }
    tally.computed = steps.len();
    let mut in_force: Vec<InForce> = Vec::new();
    for (profile, source, basis, step) in steps {
        match step {
            Step::Keep(weights) => in_force.push((profile, source, weights)),
            Step::Write(weights) => {
                let record = WeightsRecord {
                    profile: profile.clone(),
                    source_region: source.clone(),
                    weights: weights.clone(),
                    leader: replica.to_string(),
                    basis,
                };
                writes.push(Op::Put {
                    key: keys::weights(&profile, &source),
                    value: keys::encode(&record),
                    lease: None,
                });
                tally.written += 1;
                in_force.push((profile, source, weights));
            }
            Step::Remove => {
                writes.push(Op::Delete {
                    key: keys::weights(&profile, &source),
                });
                tally.removed += 1;
            }
        }
    }
    let written = write_fenced(store, fence, &writes, "weights").await?;
    if written == writes.len() {
        report_weights(metrics, &in_force);
    } else {
        // A newer leader holds the fence: it reports the weights now.
        metrics.clear(EFFECTIVE_WEIGHT);
    }
    Ok(tally)
}

/// Makes the tables' weights in force the gauge's only series, so that
/// the series of a table, or a destination, that went go with it.
fn report_weights(metrics: &Metrics, in_force: &[InForce]) {
    metrics.replace(
        EFFECTIVE_WEIGHT,
        in_force.iter().flat_map(|(profile, source, weights)| {
            weights.iter().map(move |w| {
                (
                    [
                        ("profile", profile.as_str()),
                        ("source_region", source.as_str()),
                        ("inference_region", w.region.as_str()),
                        ("reason", w.reason.as_str()),
                    ],
                    w.weight,
                )
            })
        }),
    );
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
    use crate::keys::HealthRecord;
    use crate::state::Seen;

    const NOW_MS: u64 = 1_000_000;
    const SILENCE: Duration = Duration::from_secs(3);

    /// A state holding these agents' reports: (region, agent, received
    /// this many ms ago, servers).
    fn state(reports: Vec<(&str, &str, u64, Vec<ServerHealth>)>) -> State {
        let mut st = State::default();
        for (region, agent, ago, servers) in reports {
            let record = HealthRecord {
                agent_id: agent.into(),
                region: region.into(),
                received_at_ms: NOW_MS - ago,
                interval_seconds: 1.0,
                servers,
                relays: Vec::new(),
                quotas: Vec::new(),
            };
            st.health.insert(
                keys::health(region, agent),
                Seen {
                    value: record,
                    at: None,
                },
            );
        }
        st
    }

    /// A server of model `m` as one agent reports it, with that agent's
    /// calls in flight and its limit.
    fn server(url: &str, in_flight: u32, limit: f64) -> ServerHealth {
        ServerHealth {
            url: url.into(),
            models: vec!["m".into()],
            in_flight,
            limit,
            learned_limit: limit,
            ..Default::default()
        }
    }

    /// The same with fresh engine figures scraped `age_ms` before the
    /// report.
    fn engine(url: &str, running: f64, waiting: f64, limit: f64, age_ms: u64) -> ServerHealth {
        ServerHealth {
            engine: Some(EngineHealth {
                kind: "vllm".into(),
                running,
                waiting,
                kv_usage: Some(0.5),
                ttft_p90_ms: 100.0,
                fresh: true,
                age_ms,
            }),
            ..server(url, 1, limit)
        }
    }

    fn stale(url: &str, limit: f64) -> ServerHealth {
        let mut s = engine(url, 30.0, 20.0, limit, 9000);
        s.engine.as_mut().unwrap().fresh = false;
        s.saturation = 1e9;
        s
    }

    fn loads(st: &State) -> BTreeMap<String, RegionLoad> {
        loads_for(st, "m", NOW_MS, SILENCE)
    }

    #[test]
    fn agents_sharing_engine_servers_count_each_server_once() {
        // Three agents share s1 and s2; each reports the engines' figures
        // (every caller's requests) and its own limit estimate.
        let mut older = engine("http://s1", 0.0, 0.0, 0.0, 0);
        (older.calls, older.errors) = (10, 1);
        let st = state(vec![
            (
                "r",
                "a1",
                100,
                vec![
                    engine("http://s1", 6.0, 2.0, 10.0, 50),
                    engine("http://s2", 3.0, 0.0, 8.0, 50),
                ],
            ),
            // Received last, but its scrape of s1 is older than a1's.
            (
                "r",
                "a2",
                10,
                vec![
                    engine("http://s1", 5.0, 0.0, 9.0, 500),
                    engine("http://s2", 4.0, 1.0, 12.0, 0),
                ],
            ),
            (
                "r",
                "a3",
                1500,
                vec![older, engine("http://s2", 1.0, 0.0, 6.0, 0)],
            ),
        ]);
        let views = regions_for(&st, "m", NOW_MS, SILENCE);
        let r = &views["r"];
        assert_eq!(r.servers.len(), 2, "{r:?}");
        // s1 from a1 (the freshest scrape), s2 from a2.
        assert_eq!((r.servers[0].in_flight, r.servers[0].capacity), (8.0, 10.0));
        assert_eq!((r.servers[1].in_flight, r.servers[1].capacity), (5.0, 12.0));
        assert_eq!(
            r.load,
            RegionLoad {
                capacity: 22.0,
                in_flight: 13.0,
                error_rate: 0.1,
                fresh: true,
            }
        );
        assert_eq!(loads(&st)["r"], r.load);
    }

    #[test]
    fn without_engine_figures_the_agents_limits_add_up_to_the_bound() {
        // Each agent knows only its own calls and learned its own share.
        let capped = |in_flight, limit| ServerHealth {
            capacity: 10,
            ..server("http://s2", in_flight, limit)
        };
        let st = state(vec![
            (
                "r",
                "a1",
                0,
                vec![server("http://s1", 1, 3.0), capped(2, 4.0)],
            ),
            (
                "r",
                "a2",
                0,
                vec![server("http://s1", 2, 4.0), capped(3, 4.0)],
            ),
            (
                "r",
                "a3",
                0,
                vec![server("http://s1", 3, 5.0), capped(4, 4.0)],
            ),
        ]);
        let r = &regions_for(&st, "m", NOW_MS, SILENCE)["r"];
        assert_eq!((r.servers[0].in_flight, r.servers[0].capacity), (6.0, 12.0));
        assert_eq!(
            (r.servers[1].in_flight, r.servers[1].capacity),
            (9.0, 10.0),
            "the operator's capacity= bounds the sum"
        );
        assert_eq!(r.servers[1].learned_limit, 10.0);
        assert_eq!((r.load.capacity, r.load.in_flight), (22.0, 15.0));
    }

    #[test]
    fn stale_engines_offer_nothing_and_a_region_of_them_is_drained() {
        let st = state(vec![
            // In "ok", s1's engine went stale for both agents; s2 is fine,
            // and s3 is stale for one agent only.
            (
                "ok",
                "a1",
                0,
                vec![
                    stale("http://s1", 10.0),
                    engine("http://s2", 2.0, 0.0, 10.0, 0),
                    stale("http://s3", 10.0),
                ],
            ),
            (
                "ok",
                "a2",
                0,
                vec![
                    stale("http://s1", 10.0),
                    engine("http://s3", 1.0, 0.0, 10.0, 0),
                ],
            ),
            // An older agent, or one that reads no metrics, still reports
            // s1 without engine figures: it stays out all the same.
            ("ok", "a3", 0, vec![server("http://s1", 4, 10.0)]),
            ("gone", "b1", 0, vec![stale("http://t1", 10.0)]),
            ("gone", "b2", 0, vec![stale("http://t2", 10.0)]),
            (
                "fine",
                "c1",
                0,
                vec![engine("http://u1", 1.0, 0.0, 10.0, 0)],
            ),
        ]);
        let views = regions_for(&st, "m", NOW_MS, SILENCE);
        let ok = &views["ok"];
        assert_eq!(ok.servers[0].engine, EngineView::Stale);
        assert!(ok.servers[0].saturated);
        assert!(!ok.servers[2].saturated, "one fresh scrape is enough");
        // s1 adds nothing: s2 and s3 at 15% stay under the target.
        assert_eq!((ok.load.capacity, ok.load.in_flight), (20.0, 3.0));
        assert_eq!(views["gone"].load.capacity, 0.0);
        assert!(views["gone"].load.fresh, "its agents still report");

        let s = weights::EngineSettings::default();
        let table = weights::tests::table(&[("ok", 1.0, 0), ("gone", 1.0, 0), ("fine", 1.0, 1)]);
        let t = weights::target(&table, &loads(&st), &[], &s);
        let w = |r: &str| t.iter().find(|w| w.region == r).unwrap();
        assert_eq!(w("ok").weight, 1.0, "{t:?}");
        assert_eq!(w("gone").reason, weights::Reason::Drained, "{t:?}");

        // Every region stale: no healthy capacity anywhere, so the engine
        // spreads by base weight rather than drain them all.
        let all = state(vec![
            ("ok", "a1", 0, vec![stale("http://s1", 10.0)]),
            ("gone", "b1", 0, vec![stale("http://t1", 10.0)]),
            ("fine", "c1", 0, vec![stale("http://u1", 10.0)]),
        ]);
        let t = weights::target(&table, &loads(&all), &[], &s);
        assert!(
            t.iter().all(|w| w.reason == weights::Reason::Panic),
            "{t:?}"
        );
    }

    #[test]
    fn records_of_older_agents_count_their_capacity_once_per_server() {
        // Stored by a build before engine figures: no limit, no engine.
        let old = |agent: &str, url: &str, in_flight: u32| {
            let json = format!(
                r#"{{"agent_id":"{agent}","region":"r","received_at_ms":{NOW_MS},
                "interval_seconds":1.0,"servers":[{{"url":"{url}","models":["m"],
                "capacity":8,"in_flight":{in_flight},"calls":4,"errors":0,"throttles":0,
                "latency_ewma_us":900}}]}}"#
            );
            let kv = crate::store::KeyValue {
                key: keys::health("r", agent),
                value: json.into_bytes(),
                mod_revision: 1,
            };
            match keys::decode(&kv).expect("an old record decodes") {
                keys::Object::Health(h) => h,
                _ => panic!("not a health record"),
            }
        };
        let mut st = State::default();
        for (agent, url, in_flight) in [
            ("a1", "http://shared", 2),
            ("a2", "http://shared", 3),
            ("a3", "http://own", 1),
        ] {
            let h = old(agent, url, in_flight);
            assert_eq!(
                (h.servers[0].limit, h.servers[0].engine.as_ref()),
                (0.0, None)
            );
            st.health
                .insert(keys::health("r", agent), Seen { value: h, at: None });
        }
        let r = &regions_for(&st, "m", NOW_MS, SILENCE)["r"];
        assert_eq!(r.servers.len(), 2);
        assert_eq!(
            (r.load.capacity, r.load.in_flight),
            (16.0, 6.0),
            "the shared server's capacity counts once: {r:?}"
        );
    }

    #[test]
    fn silent_agents_do_not_count() {
        let st = state(vec![
            ("r", "a1", 0, vec![server("http://s1", 1, 4.0)]),
            ("r", "a2", 5000, vec![server("http://s1", 7, 4.0)]),
            ("q", "b1", 5000, vec![server("http://t1", 7, 4.0)]),
        ]);
        let l = loads(&st);
        assert_eq!((l["r"].capacity, l["r"].in_flight), (4.0, 1.0));
        assert!(!l["q"].fresh);
        assert_eq!(l["q"].capacity, 0.0);
    }

    #[test]
    fn a_region_whose_agents_are_all_gone_is_silent() {
        let mut st = state(vec![("r", "a1", 0, vec![server("http://s1", 1, 4.0)])]);
        for region in ["r", "gone", "old"] {
            Arc::make_mut(&mut st.catalog).regions.insert(
                region.into(),
                spillway_core::model::Region {
                    name: region.into(),
                    geography: "us".into(),
                    description: String::new(),
                    revision: 0,
                },
            );
        }
        // "r" reports; "old" has an agent that sends no reports (an older
        // build); "gone" has neither agents nor reports.
        for (region, agent) in [("r", "a1"), ("old", "b1")] {
            st.agents.insert(
                format!("agents/{region}/{agent}"),
                keys::AgentRecord::test(region, agent),
            );
        }
        let l = loads(&st);
        assert!(l["r"].fresh);
        assert!(!l["gone"].fresh && l["gone"].capacity == 0.0, "{l:?}");
        assert!(!l.contains_key("old"), "nothing is known against it: {l:?}");
        // With no reports anywhere, nothing is known against any region.
        st.health.clear();
        assert!(loads(&st).is_empty());
    }

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

    /// A store whose leader key replica "a" holds, its fence, and a loaded
    /// state with these regions (name, geography).
    async fn leading(regions: &[(&str, &str)]) -> (Store, i64, State) {
        let store = Store::memory();
        let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
        let fence = campaign("a", &store, lease)
            .await
            .unwrap()
            .expect("a leads");
        let mut st = State {
            loaded: true,
            ..State::default()
        };
        for (name, geography) in regions {
            Arc::make_mut(&mut st.catalog)
                .create_region(spillway_core::model::Region {
                    name: name.to_string(),
                    geography: geography.to_string(),
                    description: String::new(),
                    revision: 0,
                })
                .unwrap();
        }
        (store, fence, st)
    }

    /// Puts a profile in the catalog (its model from its id, or its
    /// base's), without the checks around it, which take long at
    /// thousands of profiles.
    fn add_profile(st: &mut State, id: &str, destinations: &[&str], base: Option<&str>) {
        let mut p = spillway_core::model::Profile {
            id: id.into(),
            kind: ProfileKind::from_id(id),
            model: String::new(),
            destinations: destinations.iter().map(|d| d.to_string()).collect(),
            base_profile: base.map(String::from),
            base_region: None,
            tags: BTreeMap::new(),
            description: String::new(),
            revision: 0,
        };
        p.normalize();
        Arc::make_mut(&mut st.catalog).profiles.insert(id.into(), p);
    }

    /// Agent `a` of `region`, connected and reporting just now one server
    /// of `model` with these calls in flight and this limit.
    fn report(st: &mut State, region: &str, model: &str, in_flight: u32, limit: f64) {
        let mut s = server(&format!("http://{region}"), in_flight, limit);
        s.models = vec![model.into()];
        st.health.insert(
            keys::health(region, "a"),
            Seen::now(HealthRecord {
                agent_id: "a".into(),
                region: region.into(),
                received_at_ms: 0,
                interval_seconds: 1.0,
                servers: vec![s],
                relays: Vec::new(),
                quotas: Vec::new(),
            }),
        );
        st.agents.insert(
            format!("agents/{region}/a"),
            keys::AgentRecord::test(region, "a"),
        );
    }

    /// Makes the state's weights the store's, as a replica following the
    /// store would have them.
    async fn follow_weights(store: &Store, st: &mut State) {
        let (stored, _) = store.list(keys::WEIGHTS).await.unwrap();
        let w = Arc::make_mut(&mut st.weights);
        w.clear();
        for kv in stored {
            if let Ok(keys::Object::Weights(r)) = keys::decode(&kv) {
                w.insert((r.profile.clone(), r.source_region.clone()), r);
            }
        }
    }

    /// The gauge's series, as rendered.
    fn series(metrics: &Metrics) -> Vec<String> {
        metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("spillway_cp_effective_weight{"))
            .map(str::to_string)
            .collect()
    }

    const US_REGIONS: &[(&str, &str)] = &[("us-east", "us"), ("us-west", "us")];

    #[tokio::test]
    async fn the_leader_reports_the_weights_in_force_while_it_leads() {
        let (store, fence, mut st) = leading(US_REGIONS).await;
        for id in ["us.llama-3.1-8b", "global.llama-3.1-8b"] {
            add_profile(&mut st, id, &["us-east", "us-west"], None);
        }
        let metrics = Metrics::new(spillway_core::metrics::CONTROL_PLANE);
        let settings = LeaderSettings::default();
        let mut weigher = Weigher::default();
        let weight = |p: &str, src: &str, dst: &str, reason: &str| {
            format!(
                "spillway_cp_effective_weight{{profile=\"{p}\",source_region=\"{src}\",inference_region=\"{dst}\",reason=\"{reason}\"}}"
            )
        };

        // No load reports: every table stands as the operator wrote it,
        // with no weights to write or report.
        let t = update_weights("a", &store, &st, fence, &settings, &mut weigher, &metrics)
            .await
            .unwrap();
        assert_eq!(t, Tally::default());
        assert_eq!(series(&metrics), Vec::<String>::new());
        assert!(store.list(keys::WEIGHTS).await.unwrap().0.is_empty());

        // Both regions serve the model, with room to spare: each table
        // keeps its calls in its source region.
        for region in ["us-east", "us-west"] {
            report(&mut st, region, "llama-3.1-8b", 1, 8.0);
        }
        let t = update_weights("a", &store, &st, fence, &settings, &mut weigher, &metrics)
            .await
            .unwrap();
        assert_eq!((t.computed, t.written, t.removed), (4, 4, 0));
        let text = metrics.render();
        assert_eq!(series(&metrics).len(), 8, "{text}");
        for p in ["us.llama-3.1-8b", "global.llama-3.1-8b"] {
            assert!(
                text.contains(&format!(
                    "{} 1\n",
                    weight(p, "us-east", "us-east", "headroom")
                )),
                "{text}"
            );
            assert!(text.contains(&format!("{} 0\n", weight(p, "us-east", "us-west", "spill"))));
        }

        // The stored weights stay in force, and are reported as such.
        follow_weights(&store, &mut st).await;
        assert_eq!(st.weights.len(), 4);
        let t = update_weights("a", &store, &st, fence, &settings, &mut weigher, &metrics)
            .await
            .unwrap();
        assert_eq!((t.computed, t.written, t.removed), (4, 0, 0));
        assert_eq!(series(&metrics).len(), 8);

        // A profile that goes takes its series with it.
        Arc::make_mut(&mut st.catalog)
            .delete_profile("global.llama-3.1-8b", 0)
            .unwrap();
        let t = update_weights("a", &store, &st, fence, &settings, &mut weigher, &metrics)
            .await
            .unwrap();
        assert_eq!((t.computed, t.written, t.removed), (2, 0, 2));
        let text = metrics.render();
        assert_eq!(series(&metrics).len(), 4, "{text}");
        assert!(!text.contains("global.llama-3.1-8b"), "{text}");

        // A deposed leader's writes are refused: it reports nothing more.
        Arc::make_mut(&mut st.weights).clear();
        update_weights(
            "a",
            &store,
            &st,
            fence - 1,
            &settings,
            &mut weigher,
            &metrics,
        )
        .await
        .unwrap();
        assert_eq!(series(&metrics), Vec::<String>::new());
    }

    #[tokio::test]
    async fn only_the_tables_of_models_with_load_are_computed_and_written() {
        let (store, fence, mut st) =
            leading(&[("us-east", "us"), ("us-west", "us"), ("eu-west", "eu")]).await;
        // 2,000 profiles of 1,000 models, and application profiles that
        // copy some of them.
        for i in 0..1000 {
            add_profile(
                &mut st,
                &format!("us.model-{i:04}"),
                &["us-east", "us-west"],
                None,
            );
            add_profile(
                &mut st,
                &format!("global.model-{i:04}"),
                &["us-east", "us-west", "eu-west"],
                None,
            );
        }
        for i in 0..20 {
            add_profile(&mut st, &format!("team-{i}"), &[], Some("us.model-0007"));
        }
        let metrics = Metrics::new(spillway_core::metrics::CONTROL_PLANE);
        let settings = LeaderSettings::default();
        let mut weigher = Weigher::default();
        let mut update = async |st: &State| {
            update_weights("a", &store, st, fence, &settings, &mut weigher, &metrics)
                .await
                .unwrap()
        };
        assert_eq!(update(&st).await, Tally::default(), "idle: nothing to do");

        // Load on one model: its two profiles' tables, us.model-0007 from
        // the two US regions and global.model-0007 from all three.
        for region in ["us-east", "us-west", "eu-west"] {
            report(&mut st, region, "model-0007", 2, 8.0);
        }
        let t = update(&st).await;
        assert_eq!((t.computed, t.written, t.removed), (5, 5, 0));
        let (stored, _) = store.list(keys::WEIGHTS).await.unwrap();
        let stored: Vec<&str> = stored.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(
            stored,
            [
                keys::weights("global.model-0007", "eu-west"),
                keys::weights("global.model-0007", "us-east"),
                keys::weights("global.model-0007", "us-west"),
                keys::weights("us.model-0007", "us-east"),
                keys::weights("us.model-0007", "us-west"),
            ]
        );
        assert_eq!(series(&metrics).len(), 2 * 2 + 3 * 3);
        // Then nothing moves, and nothing is written.
        follow_weights(&store, &mut st).await;
        let t = update(&st).await;
        assert_eq!((t.computed, t.written, t.removed), (5, 0, 0));
        assert_eq!(series(&metrics).len(), 13);

        // A catalog change is seen: a new profile of the model.
        add_profile(&mut st, "eu.model-0007", &["eu-west"], None);
        let t = update(&st).await;
        assert_eq!((t.computed, t.written, t.removed), (6, 1, 0));
    }

    #[tokio::test]
    async fn a_table_whose_load_goes_returns_to_the_operators_table_and_its_record_goes() {
        let (store, fence, mut st) = leading(US_REGIONS).await;
        add_profile(&mut st, "us.m", &["us-east", "us-west"], None);
        // us-east is far over its capacity: most of its calls spill.
        report(&mut st, "us-east", "m", 32, 8.0);
        report(&mut st, "us-west", "m", 0, 8.0);
        let metrics = Metrics::new(spillway_core::metrics::CONTROL_PLANE);
        let settings = LeaderSettings::default();
        let mut weigher = Weigher::default();
        update_weights("a", &store, &st, fence, &settings, &mut weigher, &metrics)
            .await
            .unwrap();
        follow_weights(&store, &mut st).await;
        let east = |st: &State| {
            st.weights
                .get(&("us.m".to_string(), "us-east".to_string()))
                .map(|w| {
                    w.weights
                        .iter()
                        .find(|w| w.region == "us-east")
                        .unwrap()
                        .weight
                })
        };
        let spilling = east(&st).unwrap();
        assert!(spilling < 0.5, "{:?}", st.weights);

        // The model's servers go (their agents left): back to the table
        // as written, a bounded step at a time, then no record at all.
        st.health.clear();
        st.agents.clear();
        let mut shares = vec![spilling];
        for tick in 0..10 {
            let t = update_weights("a", &store, &st, fence, &settings, &mut weigher, &metrics)
                .await
                .unwrap();
            follow_weights(&store, &mut st).await;
            // us-west's own table had nothing to move back: its record goes
            // at the first update.
            let west = usize::from(tick == 0);
            match east(&st) {
                Some(share) => {
                    assert_eq!((t.computed, t.written, t.removed), (1 + west, 1, west));
                    assert_eq!(st.weights.len(), 1);
                    assert_eq!(series(&metrics).len(), 2, "us-east's weights in force");
                    shares.push(share);
                }
                None => {
                    assert_eq!((t.computed, t.written, t.removed), (1 + west, 0, 1 + west));
                    break;
                }
            }
        }
        assert!(st.weights.is_empty(), "{:?}", st.weights);
        assert!(shares.len() > 2, "not step by step: {shares:?}");
        for step in shares.windows(2) {
            let moved = step[1] - step[0];
            assert!(moved > 0.0 && moved <= 0.25 + 1e-9, "{shares:?}");
        }
        assert_eq!(series(&metrics), Vec::<String>::new());
        // And with no load and no record, nothing more is done.
        let t = update_weights("a", &store, &st, fence, &settings, &mut weigher, &metrics)
            .await
            .unwrap();
        assert_eq!(t, Tally::default());
    }

    #[tokio::test]
    async fn records_of_tables_that_no_longer_exist_are_removed() {
        let (store, fence, mut st) = leading(&[("us-east", "us"), ("eu-west", "eu")]).await;
        add_profile(&mut st, "us.m", &["us-east"], None);
        let record = |profile: &str, source: &str| WeightsRecord {
            profile: profile.into(),
            source_region: source.into(),
            weights: vec![weights::Weight {
                region: "us-east".into(),
                weight: 1.0,
                reason: weights::Reason::Headroom,
            }],
            leader: "a".into(),
            basis: String::new(),
        };
        // A profile that went, a region that went, and a region the
        // profile is not callable from; none has load.
        for (profile, source) in [
            ("us.gone", "us-east"),
            ("us.m", "us-gone"),
            ("us.m", "eu-west"),
        ] {
            let kv = Op::Put {
                key: keys::weights(profile, source),
                value: keys::encode(&record(profile, source)),
                lease: None,
            };
            store.txn(Vec::new(), vec![kv]).await.unwrap();
        }
        follow_weights(&store, &mut st).await;
        assert_eq!(st.weights.len(), 3);
        let metrics = Metrics::new(spillway_core::metrics::CONTROL_PLANE);
        let t = update_weights(
            "a",
            &store,
            &st,
            fence,
            &LeaderSettings::default(),
            &mut Weigher::default(),
            &metrics,
        )
        .await
        .unwrap();
        assert_eq!((t.computed, t.written, t.removed), (0, 0, 3));
        assert!(store.list(keys::WEIGHTS).await.unwrap().0.is_empty());
    }

    #[tokio::test]
    async fn no_record_is_served_as_the_weights_of_no_load_are() {
        // The default tables (source first): the engine's weights with no
        // load, stored, would be served exactly as no record is.
        let (_, _, mut st) = leading(US_REGIONS).await;
        add_profile(&mut st, "us.m", &["us-east", "us-west"], None);
        add_profile(&mut st, "team-a", &[], Some("us.m"));
        let bare = st.clone();
        let s = EngineSettings::default();
        let resolved = st.catalog.resolve("us.m").unwrap();
        for source in ["us-east", "us-west"] {
            let base = st.catalog.route_for(&resolved, source);
            let record = WeightsRecord {
                profile: "us.m".into(),
                source_region: source.into(),
                weights: weights::target(&base, &BTreeMap::new(), &[], &s),
                leader: "a".into(),
                basis: weights::basis(&base),
            };
            Arc::make_mut(&mut st.weights).insert(("us.m".into(), source.into()), record);
        }
        for region in ["us-east", "us-west"] {
            let (with, without) = (
                crate::views::build(&st, region, 1),
                crate::views::build(&bare, region, 1),
            );
            assert_eq!(with.resources, without.resources, "{region}");
            assert!(!with.resources.contains_key("weights/us.m"));
        }
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
