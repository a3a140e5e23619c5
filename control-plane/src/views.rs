//! What agents of each region hold: named, versioned resources (see
//! `message Resource` in control.proto), kept per region by one task of the
//! replica and shared by every stream of the region.
//!
//! A view changes by what changed: on each new state the task compares it
//! with the previous one map by map (an ordered walk, no encoding), works
//! out which resources that can touch (a profile and the application
//! profiles copying it, one region's route table or weights, a tenant, a
//! key, a quota, an agent's endpoint), recomputes and encodes only those,
//! and appends the names whose content moved to the view's change log.
//! Each resource is encoded once per version and shared, by `Arc`, by every
//! stream that sends it. A stream that knows the sequence number of the
//! view its agent holds sends the resources named in the log since then;
//! one further behind than the log reaches sends the whole set, marked to
//! replace.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prost::Message;
use spillway_core::model::{Catalog, QuotaScope, Region};
use spillway_proto::pb;
use tokio::sync::watch;

use crate::state::State;
use crate::weights::{Reason, Weight};

/// How many changed names a view remembers. A stream whose agent holds an
/// older view than that gets the whole set again.
pub const LOG_CAPACITY: usize = 16_384;

/// A content hash of an encoded body: the same content has the same version
/// on every replica and every build (64-bit FNV-1a).
pub fn version_of(body: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn resource(name: String, message: &impl Message) -> Arc<pb::Resource> {
    let body = Bytes::from(message.encode_to_vec());
    Arc::new(pb::Resource {
        version: version_of(&body),
        name,
        body,
    })
}

/// The resources agents of one region hold, and what changed lately.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub region: String,
    /// The configuration version of the state this view was last changed
    /// at (see `State::config_version`).
    pub version: u64,
    /// Grows by one with each change of the view; never reused by the
    /// replica.
    pub seq: u64,
    pub resources: BTreeMap<String, Arc<pb::Resource>>,
    /// (seq, name) of each resource changed, added or removed, oldest first.
    log: VecDeque<(u64, String)>,
    /// The oldest seq the log can tell changes since.
    log_from: u64,
}

impl View {
    /// Names changed after `seq`, each once; `None` when the log no longer
    /// reaches back that far.
    pub fn changed_since(&self, seq: u64) -> Option<BTreeSet<&str>> {
        if seq < self.log_from {
            return None;
        }
        Some(
            self.log
                .iter()
                .rev()
                .take_while(|(s, _)| *s > seq)
                .map(|(_, n)| n.as_str())
                .collect(),
        )
    }

    /// Sets `name` to `new` (or removes it); returns whether it moved.
    fn set(&mut self, seq: u64, name: String, new: Option<Arc<pb::Resource>>) -> bool {
        let moved = match (&new, self.resources.get(&name)) {
            (Some(n), Some(o)) => n.version != o.version,
            (None, None) => false,
            _ => true,
        };
        if !moved {
            return false;
        }
        match new {
            Some(r) => self.resources.insert(name.clone(), r),
            None => self.resources.remove(&name),
        };
        self.log.push_back((seq, name));
        while self.log.len() > LOG_CAPACITY {
            if let Some((s, _)) = self.log.pop_front() {
                // Changes at `s` may be partly gone: only later ones are known.
                self.log_from = self.log_from.max(s);
            }
        }
        true
    }
}

/// Every region's view, kept by one task following the replica's state.
pub struct Views {
    state: watch::Receiver<Arc<State>>,
    inner: Mutex<Inner>,
}

struct Inner {
    /// The state every view reflects.
    state: Arc<State>,
    /// The last seq given out.
    seq: u64,
    views: HashMap<String, watch::Sender<Arc<View>>>,
}

impl Views {
    /// Starts following `state`; the task ends when `state`'s sender goes.
    pub fn spawn(state: watch::Receiver<Arc<State>>) -> Arc<Views> {
        let views = Arc::new(Views {
            inner: Mutex::new(Inner {
                state: state.borrow().clone(),
                seq: 0,
                views: HashMap::new(),
            }),
            state: state.clone(),
        });
        let weak = Arc::downgrade(&views);
        let mut rx = state;
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(views) = weak.upgrade() else { return };
                let latest = rx.borrow_and_update().clone();
                views.advance(latest);
            }
        });
        views
    }

    /// The view of `region`, as of the replica's latest state (which must
    /// be loaded: a view of an empty state would tell agents to drop
    /// everything).
    pub fn subscribe(&self, region: &str) -> watch::Receiver<Arc<View>> {
        let latest = self.state.borrow().clone();
        self.advance(latest);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = inner.views.get(region) {
            return tx.subscribe();
        }
        inner.seq += 1;
        let seq = inner.seq;
        let view = build(&inner.state, region, seq);
        let (tx, rx) = watch::channel(Arc::new(view));
        inner.views.insert(region.to_string(), tx);
        rx
    }

    /// Brings every view to `new` (a no-op when they reflect it already).
    fn advance(&self, new: Arc<State>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&inner.state, &new) || new.revision < inner.state.revision {
            return;
        }
        // Views no stream follows any more are dropped, not kept up.
        inner.views.retain(|_, tx| tx.receiver_count() > 0);
        if !inner.views.is_empty() {
            let changes = Changes::between(&inner.state, &new);
            if !changes.is_empty() {
                inner.seq += 1;
                let seq = inner.seq;
                for (region, tx) in &inner.views {
                    tx.send_if_modified(|v| {
                        let v = Arc::make_mut(v);
                        let moved = changes.apply(v, &new, region, seq);
                        if moved {
                            v.seq = seq;
                            v.version = new.config_version();
                        }
                        moved
                    });
                }
            }
        }
        inner.state = new;
    }
}

/// Builds the view of `region` from scratch.
pub fn build(state: &State, region: &str, seq: u64) -> View {
    let mut view = View {
        region: region.to_string(),
        version: state.config_version(),
        seq,
        log_from: seq,
        ..View::default()
    };
    let all = Changes::everything(state);
    all.apply(&mut view, state, region, seq);
    // A new view has no history: nothing before `seq` can be asked of it.
    view.log.clear();
    view
}

/// What moved between two states, by object.
#[derive(Debug, Default)]
struct Changes {
    /// Regions changed: every profile's callability may have moved.
    regions: BTreeSet<String>,
    /// Profiles whose resources must be recomputed in every region.
    profiles: BTreeSet<String>,
    /// (profile, source region) route tables or weights changed.
    tables: BTreeSet<(String, String)>,
    tenants: BTreeSet<String>,
    keys: BTreeSet<String>,
    quotas: BTreeSet<String>,
    /// Endpoint resource names (`<region>/<agent id>`) changed.
    endpoints: BTreeSet<String>,
}

/// Keys whose values differ between two ordered maps (added, changed or
/// removed), in one ordered walk of both.
fn diff_keys<K: Ord + Clone, V: PartialEq>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    out: &mut impl Extend<K>,
) {
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return,
            (Some((k, _)), None) => {
                out.extend([(*k).clone()]);
                a.next();
            }
            (None, Some((k, _))) => {
                out.extend([(*k).clone()]);
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.extend([(*ka).clone()]);
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.extend([(*kb).clone()]);
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if va != vb {
                        out.extend([(*ka).clone()]);
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

/// An agent's endpoint as other agents see it.
fn endpoints(state: &State) -> BTreeMap<String, pb::AgentEndpoint> {
    state
        .agents
        .values()
        .map(|a| {
            (
                format!("{}/{}", a.region, a.agent_id),
                pb::AgentEndpoint {
                    agent_id: a.agent_id.clone(),
                    region: a.region.clone(),
                    relay_address: a.relay_address.clone(),
                    apis: a.apis.clone(),
                },
            )
        })
        .collect()
}

impl Changes {
    fn everything(state: &State) -> Changes {
        let c = &state.catalog;
        Changes {
            regions: c.regions.keys().cloned().collect(),
            profiles: c.profiles.keys().cloned().collect(),
            tables: BTreeSet::new(),
            tenants: c.tenants.keys().cloned().collect(),
            keys: c.keys.keys().cloned().collect(),
            quotas: c.quotas.keys().cloned().collect(),
            endpoints: endpoints(state).into_keys().collect(),
        }
    }

    fn between(old: &State, new: &State) -> Changes {
        let mut ch = Changes::default();
        let (o, n) = (&old.catalog, &new.catalog);
        if !Arc::ptr_eq(o, n) {
            diff_keys(&o.regions, &n.regions, &mut ch.regions);
            diff_keys(&o.profiles, &n.profiles, &mut ch.profiles);
            diff_keys(&o.routes, &n.routes, &mut ch.tables);
            diff_keys(&o.tenants, &n.tenants, &mut ch.tenants);
            diff_keys(&o.keys, &n.keys, &mut ch.keys);
            diff_keys(&o.quotas, &n.quotas, &mut ch.quotas);
        }
        if !Arc::ptr_eq(&old.weights, &new.weights) {
            diff_keys(&old.weights, &new.weights, &mut ch.tables);
        }
        if old.agents != new.agents {
            diff_keys(&endpoints(old), &endpoints(new), &mut ch.endpoints);
        }
        if !ch.regions.is_empty() {
            // A region's geography decides what is callable from it: every
            // profile is looked at again.
            ch.profiles.extend(n.profiles.keys().cloned());
        }
        // Application profiles copy their base's model, destinations and
        // route table: they move with it.
        let mut bases: BTreeSet<&str> = ch.profiles.iter().map(String::as_str).collect();
        bases.extend(ch.tables.iter().map(|(p, _)| p.as_str()));
        if !bases.is_empty() {
            let copies: Vec<String> = n
                .profiles
                .values()
                .chain(o.profiles.values())
                .filter(|p| p.base_profile.as_deref().is_some_and(|b| bases.contains(b)))
                .map(|p| p.id.clone())
                .collect();
            ch.profiles.extend(copies.iter().cloned());
            // A table or weights change of a base touches its copies' tables
            // only in that region; recomputing them everywhere is cheap and
            // moves nothing elsewhere.
        }
        ch
    }

    fn is_empty(&self) -> bool {
        self.regions.is_empty()
            && self.profiles.is_empty()
            && self.tables.is_empty()
            && self.tenants.is_empty()
            && self.keys.is_empty()
            && self.quotas.is_empty()
            && self.endpoints.is_empty()
    }

    /// Recomputes what these changes can touch in `view` (of `region`);
    /// returns whether any resource moved.
    fn apply(&self, view: &mut View, state: &State, region: &str, seq: u64) -> bool {
        let c = &state.catalog;
        let mut moved = false;
        for name in &self.regions {
            let r = c.regions.get(name).map(|r| {
                let mut r: pb::Region = r.clone().into();
                r.revision = 0;
                resource(format!("region/{name}"), &r)
            });
            moved |= view.set(seq, format!("region/{name}"), r);
        }
        // Profiles: their own changes (which include the copies of every
        // base whose table changed, see `between`), plus those whose table
        // in this region changed.
        let mut profiles: BTreeSet<&str> = self.profiles.iter().map(String::as_str).collect();
        for (p, r) in &self.tables {
            if r == region {
                profiles.insert(p);
            }
        }
        let source = c.regions.get(region);
        for id in profiles {
            for (name, r) in profile_resources(state, source, region, id) {
                moved |= view.set(seq, name, r);
            }
        }
        for name in &self.tenants {
            let r = c.tenants.get(name).map(|t| {
                resource(
                    format!("tenant/{name}"),
                    &pb::Tenant {
                        revision: 0,
                        ..t.clone().into()
                    },
                )
            });
            moved |= view.set(seq, format!("tenant/{name}"), r);
        }
        for id in &self.keys {
            let r = c.keys.get(id).map(|k| {
                resource(
                    format!("key/{id}"),
                    &pb::ApiKey {
                        id: k.id.clone(),
                        tenant: k.tenant.clone(),
                        hash: k.hash.clone(),
                        // Agents need nothing else of a key.
                        ..Default::default()
                    },
                )
            });
            moved |= view.set(seq, format!("key/{id}"), r);
        }
        for id in &self.quotas {
            let r = c
                .quotas
                .get(id)
                .filter(|q| match &q.scope {
                    QuotaScope::ProfileInRegion { source_region, .. } => source_region == region,
                    QuotaScope::TenantOnProfile { .. } | QuotaScope::Tenant { .. } => true,
                })
                .map(|q| {
                    let mut q: pb::Quota = q.clone().into();
                    q.revision = 0;
                    resource(format!("quota/{id}"), &q)
                });
            moved |= view.set(seq, format!("quota/{id}"), r);
        }
        if !self.endpoints.is_empty() {
            let now = endpoints(state);
            for name in &self.endpoints {
                let r = now
                    .get(name)
                    .map(|e| resource(format!("endpoint/{name}"), e));
                moved |= view.set(seq, format!("endpoint/{name}"), r);
            }
        }
        moved
    }
}

/// The resources of profile `id` in the view of `region` (whose catalog
/// entry is `source`): its profile, route and weights resources when it is
/// callable from there, its `elsewhere/` marker when it is not, each name
/// with `None` where it has none.
fn profile_resources(
    state: &State,
    source: Option<&Region>,
    region: &str,
    id: &str,
) -> [(String, Option<Arc<pb::Resource>>); 4] {
    let mut out = [
        (format!("profile/{id}"), None),
        (format!("route/{id}"), None),
        (format!("weights/{id}"), None),
        (format!("elsewhere/{id}"), None),
    ];
    let catalog: &Catalog = &state.catalog;
    let Some(p) = catalog.profiles.get(id) else {
        return out;
    };
    let callable = source.is_some_and(|s| catalog.callable_from(p, s));
    if !callable {
        out[3].1 = Some(resource(out[3].0.clone(), &()));
        return out;
    }
    let Ok(resolved) = catalog.resolve(id) else {
        return out;
    };
    let table_owner = resolved
        .profile
        .base_profile
        .clone()
        .unwrap_or_else(|| id.to_string());
    let table = catalog.route_for(&resolved, region);
    let basis = crate::weights::basis(&table);
    let mut route: pb::RouteTable = table.into();
    route.revision = 0;
    if let Some(w) = state.weights.get(&(table_owner, region.to_string())) {
        let mut weighted = route.clone();
        apply_weights(&mut weighted, &w.weights, w.fits(&basis));
        if weighted != route {
            out[2].1 = Some(resource(out[2].0.clone(), &weighted));
        }
    }
    let mut profile: pb::InferenceProfile = resolved.profile.into();
    profile.model = resolved.model;
    profile.destinations = resolved.destinations;
    profile.revision = 0;
    out[0].1 = Some(resource(out[0].0.clone(), &profile));
    out[1].1 = Some(resource(out[1].0.clone(), &route));
    out
}

/// Puts the leader's weights into a route table. Weights computed for this
/// table (`fits`): regions with weight share the first level by it; healthy
/// regions at zero (the source has headroom, say) stay behind them as
/// failover targets at their base weight; drained regions get nothing.
/// Weights of the table before the operator changed it: the new table as
/// written, but what they drained for failing stays out until the leader
/// has recomputed. Either way, if that leaves nothing to call (a record of
/// an older build naming a destination since removed, say), the operator's
/// table as written is better.
fn apply_weights(route: &mut pb::RouteTable, weights: &[Weight], fits: bool) {
    if fits && !weights.iter().any(|w| w.weight > 0.0) {
        return;
    }
    let base = route.clone();
    for d in &mut route.destinations {
        match (fits, weights.iter().find(|w| w.region == d.region)) {
            (true, Some(w)) if w.weight > 0.0 => {
                d.weight = w.weight;
                d.priority = 0;
            }
            (_, Some(w)) if w.reason == Reason::Drained => d.weight = 0.0,
            (true, _) => d.priority = 1,
            (false, _) => {}
        }
    }
    if !route.destinations.iter().any(|d| d.weight > 0.0) {
        *route = base;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use spillway_core::model::{Catalog, Profile, ProfileKind, Region, RouteTable};

    use super::*;
    use crate::keys::{AgentRecord, WeightsRecord};

    const US: &str = "us.llama-3.1-8b";

    fn profile(id: &str, dest: &[&str], base: Option<&str>) -> Profile {
        Profile {
            id: id.into(),
            kind: ProfileKind::from_id(id),
            model: String::new(),
            destinations: dest.iter().map(|s| s.to_string()).collect(),
            base_profile: base.map(String::from),
            base_region: None,
            tags: BTreeMap::new(),
            description: String::new(),
            revision: 0,
        }
    }

    fn table(dest: &[(&str, f64, u32)]) -> RouteTable {
        RouteTable {
            profile: US.into(),
            source_region: "us-east".into(),
            ..crate::weights::tests::table(dest)
        }
    }

    /// us-east and us-west, the US profile with the operator's `dest` table
    /// for us-east, and an application profile copying it.
    fn state(dest: &[(&str, f64, u32)]) -> State {
        let mut c = Catalog::default();
        for name in ["us-east", "us-west"] {
            c.create_region(Region {
                name: name.into(),
                geography: "us".into(),
                description: String::new(),
                revision: 0,
            })
            .unwrap();
        }
        c.create_profile(profile(US, &["us-east", "us-west"], None))
            .unwrap();
        c.create_profile(profile("team-a", &[], Some(US))).unwrap();
        c.create_route(table(dest)).unwrap();
        State {
            loaded: true,
            catalog: Arc::new(c),
            ..State::default()
        }
    }

    fn with_weights(st: &mut State, basis: String, weights: &[(&str, f64, Reason)]) {
        Arc::make_mut(&mut st.weights).insert(
            (US.to_string(), "us-east".to_string()),
            WeightsRecord {
                profile: US.into(),
                source_region: "us-east".into(),
                weights: weights
                    .iter()
                    .map(|(r, w, reason)| Weight {
                        region: r.to_string(),
                        weight: *w,
                        reason: *reason,
                    })
                    .collect(),
                leader: "cp".into(),
                basis,
            },
        );
    }

    /// (region, weight, priority) of `profile`'s table in the view: its
    /// weights resource where it has one, else its route.
    fn route_of(v: &View, profile: &str) -> Vec<(String, f64, u32)> {
        let r = v
            .resources
            .get(&format!("weights/{profile}"))
            .or_else(|| v.resources.get(&format!("route/{profile}")))
            .unwrap();
        pb::RouteTable::decode(r.body.clone())
            .unwrap()
            .destinations
            .iter()
            .map(|d| (d.region.clone(), d.weight, d.priority))
            .collect()
    }

    fn owned(v: &[(&str, f64, u32)]) -> Vec<(String, f64, u32)> {
        v.iter().map(|(r, w, p)| (r.to_string(), *w, *p)).collect()
    }

    const EAST_FIRST: &[(&str, f64, u32)] = &[("us-east", 1.0, 0), ("us-west", 1.0, 1)];
    const WEST_FIRST: &[(&str, f64, u32)] = &[("us-west", 1.0, 0), ("us-east", 1.0, 1)];

    #[test]
    fn weights_apply_to_the_table_they_were_computed_for_and_its_copies() {
        let mut st = state(EAST_FIRST);
        let basis = crate::weights::basis(&table(EAST_FIRST));
        with_weights(
            &mut st,
            basis,
            &[
                ("us-east", 0.75, Reason::Headroom),
                ("us-west", 0.25, Reason::Spill),
            ],
        );
        let s = build(&st, "us-east", 1);
        let want = owned(&[("us-east", 0.75, 0), ("us-west", 0.25, 0)]);
        assert_eq!(route_of(&s, US), want);
        // An application profile follows the weights of what it copies.
        assert_eq!(route_of(&s, "team-a"), want);
    }

    #[test]
    fn weights_of_an_older_table_give_way_to_the_new_one_but_drained_stays_out() {
        // Weights computed for us-east first; the operator has since put
        // us-west first.
        let old = crate::weights::basis(&table(EAST_FIRST));
        let mut st = state(WEST_FIRST);
        with_weights(
            &mut st,
            old.clone(),
            &[
                ("us-east", 1.0, Reason::Headroom),
                ("us-west", 0.0, Reason::Spill),
            ],
        );
        assert_eq!(route_of(&build(&st, "us-east", 1), US), owned(WEST_FIRST));
        // A region the old weights drained for failing stays out.
        with_weights(
            &mut st,
            old.clone(),
            &[
                ("us-east", 1.0, Reason::Headroom),
                ("us-west", 0.0, Reason::Drained),
            ],
        );
        assert_eq!(
            route_of(&build(&st, "us-east", 1), US),
            owned(&[("us-west", 0.0, 0), ("us-east", 1.0, 1)])
        );
        // Unless that leaves nothing to call.
        with_weights(
            &mut st,
            old,
            &[
                ("us-east", 0.0, Reason::Drained),
                ("us-west", 0.0, Reason::Drained),
            ],
        );
        assert_eq!(route_of(&build(&st, "us-east", 1), US), owned(WEST_FIRST));
    }

    #[test]
    fn weights_recorded_by_an_older_build_still_apply() {
        let mut st = state(EAST_FIRST);
        // A record as an older build wrote it: no basis.
        let old: WeightsRecord = serde_json::from_str(
            r#"{"profile":"us.llama-3.1-8b","source_region":"us-east","leader":"cp",
                "weights":[{"region":"us-east","weight":0.5,"reason":"headroom"},
                           {"region":"us-west","weight":0.5,"reason":"spill"}]}"#,
        )
        .unwrap();
        assert_eq!(old.basis, "");
        with_weights(
            &mut st,
            old.basis,
            &[
                ("us-east", 0.5, Reason::Headroom),
                ("us-west", 0.5, Reason::Spill),
            ],
        );
        assert_eq!(
            route_of(&build(&st, "us-east", 1), US),
            owned(&[("us-east", 0.5, 0), ("us-west", 0.5, 0)])
        );
    }

    /// Brings `views` from `old` to `new` as the task does.
    fn advance(views: &mut [View], old: &State, new: &State, seq: u64) {
        let changes = Changes::between(old, new);
        for v in views {
            let region = v.region.clone();
            if changes.apply(v, new, &region, seq) {
                v.seq = seq;
            }
        }
    }

    fn names(v: &View) -> Vec<(String, u64)> {
        v.resources
            .values()
            .map(|r| (r.name.clone(), r.version))
            .collect()
    }

    #[test]
    fn a_change_moves_only_the_resources_it_touches_in_the_regions_it_touches() {
        let s0 = state(EAST_FIRST);
        let mut views = [build(&s0, "us-east", 1), build(&s0, "us-west", 1)];
        assert!(
            views[0].changed_since(0).is_none(),
            "a new view has no past"
        );
        assert_eq!(views[0].changed_since(1).unwrap().len(), 0);

        // A profile's description: its profile resource, in every region;
        // the application profile copying it keeps its own description.
        let mut s1 = s0.clone();
        let mut p = s1.catalog.profiles[US].clone();
        p.description = "new".into();
        // (Straight into the map: a catalog in memory has no revisions.)
        Arc::make_mut(&mut s1.catalog).profiles.insert(US.into(), p);
        advance(&mut views, &s0, &s1, 2);
        for v in &views {
            let changed: Vec<&str> = v.changed_since(1).unwrap().into_iter().collect();
            assert_eq!(changed, [format!("profile/{US}")], "{}", v.region);
        }

        // Weights of us-east's table: us-east's view only, the table and
        // its copy's.
        let mut s2 = s1.clone();
        with_weights(
            &mut s2,
            crate::weights::basis(&table(EAST_FIRST)),
            &[
                ("us-east", 0.5, Reason::Spill),
                ("us-west", 0.5, Reason::Spill),
            ],
        );
        advance(&mut views, &s1, &s2, 3);
        let changed: Vec<&str> = views[0].changed_since(2).unwrap().into_iter().collect();
        assert_eq!(changed, ["weights/team-a", &format!("weights/{US}")]);
        assert_eq!(views[1].seq, 2, "us-west's view did not move");

        // An agent joining: one endpoint resource in every view.
        let mut s3 = s2.clone();
        s3.agents.insert(
            "agents/us-east/a1".into(),
            AgentRecord::test("us-east", "a1"),
        );
        advance(&mut views, &s2, &s3, 4);
        for v in &views {
            let changed: Vec<&str> = v.changed_since(3).unwrap().into_iter().collect();
            assert_eq!(changed, ["endpoint/us-east/a1"]);
        }
        // Its ACK bookkeeping moves nothing.
        let mut s4 = s3.clone();
        s4.agents
            .get_mut("agents/us-east/a1")
            .unwrap()
            .acked_version = 9;
        advance(&mut views, &s3, &s4, 5);
        assert_eq!((views[0].seq, views[1].seq), (4, 4));
        for v in &views {
            assert_eq!(names(v), names(&build(&s4, &v.region, 9)));
        }
    }

    #[test]
    fn views_kept_by_changes_equal_views_built_afresh() {
        // A small xorshift, so that a failure is reproducible.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut st = state(EAST_FIRST);
        Arc::make_mut(&mut st.catalog)
            .create_region(Region {
                name: "eu-west".into(),
                geography: "eu".into(),
                description: String::new(),
                revision: 0,
            })
            .unwrap();
        let regions = ["us-east", "us-west", "eu-west"];
        let mut views: Vec<View> = regions.iter().map(|r| build(&st, r, 1)).collect();
        for step in 0..600u64 {
            let mut new = st.clone();
            let ids: Vec<String> = new.catalog.profiles.keys().cloned().collect();
            let any = |k: usize| ids[k % ids.len().max(1)].clone();
            let pick = next(ids.len().max(1));
            let c = Arc::make_mut(&mut new.catalog);
            let _ = match next(10) {
                0 => c.create_profile(profile(
                    &format!("us.m{}", next(20)),
                    &["us-east", "us-west"],
                    None,
                )),
                1 => c.create_profile(profile(
                    &format!("global.m{}", next(20)),
                    &["us-east", "eu-west"],
                    None,
                )),
                2 => {
                    let base = any(pick);
                    c.create_profile(profile(&format!("app-{}", next(20)), &[], Some(&base)))
                }
                3 => c.delete_profile(&any(pick), 0),
                4 => {
                    let mut p = c
                        .profiles
                        .get(&any(pick))
                        .cloned()
                        .unwrap_or_else(|| profile(US, &["us-east", "us-west"], None));
                    p.description = format!("d{}", next(5));
                    c.profiles.insert(p.id.clone(), p);
                    Ok(())
                }
                5 => {
                    let first = if next(2) == 0 { EAST_FIRST } else { WEST_FIRST };
                    let _ = c.delete_route(US, "us-east", 0);
                    c.create_route(table(first))
                }
                6 => {
                    let geo = if next(2) == 0 { "eu" } else { "us" };
                    let r = Region {
                        name: "eu-west".into(),
                        geography: geo.into(),
                        description: String::new(),
                        revision: 0,
                    };
                    c.regions.insert(r.name.clone(), r);
                    Ok(())
                }
                _ => Ok(()),
            };
            match next(4) {
                0 => {
                    let source = regions[next(3)];
                    let w = (next(5) as f64) / 4.0;
                    let basis = crate::weights::basis(&table(EAST_FIRST));
                    let mut wst = new.clone();
                    with_weights(
                        &mut wst,
                        basis,
                        &[
                            ("us-east", w, Reason::Spill),
                            ("us-west", 1.0 - w, Reason::Spill),
                        ],
                    );
                    let rec = wst.weights[&(US.to_string(), "us-east".to_string())].clone();
                    Arc::make_mut(&mut new.weights).insert((any(pick), source.to_string()), rec);
                }
                1 => {
                    let k = format!("agents/{}/a{}", regions[next(3)], next(3));
                    if new.agents.remove(&k).is_none() {
                        let (r, a) = k["agents/".len()..].split_once('/').unwrap();
                        new.agents.insert(k.clone(), AgentRecord::test(r, a));
                    }
                }
                2 => {
                    let keys: Vec<_> = new.weights.keys().cloned().collect();
                    if !keys.is_empty() {
                        let k = keys[next(keys.len())].clone();
                        Arc::make_mut(&mut new.weights).remove(&k);
                    }
                }
                _ => {}
            }
            new.revision += 1;
            advance(&mut views, &st, &new, step + 2);
            for v in &views {
                assert_eq!(
                    names(v),
                    names(&build(&new, &v.region, 0)),
                    "step {step}, region {}",
                    v.region
                );
            }
            st = new;
        }
        // The walk went somewhere: profiles of every kind, weights, agents.
        assert!(
            st.catalog.profiles.len() > 10,
            "{:?}",
            st.catalog.profiles.keys()
        );
        assert!(st.catalog.profiles.keys().any(|p| p.starts_with("app-")));
        assert!(!st.weights.is_empty() && !st.agents.is_empty());
    }
}
