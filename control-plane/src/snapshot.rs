//! What one agent receives: the part of the state its region needs.

use spillway_core::model::QuotaScope;
use spillway_proto::pb;

use crate::state::State;
use crate::weights::{Reason, Weight};

/// The snapshot for agents of `region`: every region, every agent's relay
/// endpoint, the profiles callable from `region` (application profiles
/// resolved to their model and destinations), and one route table per
/// profile for `region`.
pub fn snapshot_for(state: &State, region: &str) -> pb::Snapshot {
    let catalog = &state.catalog;
    let mut snapshot = pb::Snapshot {
        region: region.to_string(),
        regions: catalog.regions.values().cloned().map(Into::into).collect(),
        agents: state
            .agents
            .values()
            .map(|a| pb::AgentEndpoint {
                agent_id: a.agent_id.clone(),
                region: a.region.clone(),
                relay_address: a.relay_address.clone(),
                apis: a.apis.clone(),
            })
            .collect(),
        profiles: Vec::new(),
        routes: Vec::new(),
        profiles_elsewhere: Vec::new(),
        quotas: catalog
            .quotas
            .values()
            .filter(|q| match &q.scope {
                QuotaScope::ProfileInRegion { source_region, .. } => source_region == region,
                QuotaScope::TenantOnProfile { .. } | QuotaScope::Tenant { .. } => true,
            })
            .map(|q| {
                let mut q: pb::Quota = q.clone().into();
                q.revision = 0;
                q
            })
            .collect(),
        tenants: catalog
            .tenants
            .values()
            .map(|t| pb::Tenant {
                revision: 0,
                ..t.clone().into()
            })
            .collect(),
        keys: catalog
            .keys
            .values()
            .map(|k| pb::ApiKey {
                id: k.id.clone(),
                tenant: k.tenant.clone(),
                hash: k.hash.clone(),
                // Agents need nothing else of a key.
                ..Default::default()
            })
            .collect(),
    };
    // Revisions are store bookkeeping; leaving them out keeps snapshots equal
    // when only a revision moved.
    for r in &mut snapshot.regions {
        r.revision = 0;
    }
    let Some(source) = catalog.regions.get(region) else {
        snapshot.profiles_elsewhere = catalog.profiles.keys().cloned().collect();
        return snapshot;
    };
    for p in catalog.profiles.values() {
        if !catalog.callable_from(p, source) {
            snapshot.profiles_elsewhere.push(p.id.clone());
            continue;
        }
        let Ok(resolved) = catalog.resolve(&p.id) else {
            continue;
        };
        let table_owner = resolved
            .profile
            .base_profile
            .clone()
            .unwrap_or_else(|| p.id.clone());
        let table = catalog.route_for(&resolved, region);
        let basis = crate::weights::basis(&table);
        let mut route: pb::RouteTable = table.into();
        if let Some(w) = state.weights.get(&(table_owner, region.to_string())) {
            apply_weights(&mut route, &w.weights, w.fits(&basis));
        }
        route.revision = 0;
        let mut profile: pb::InferenceProfile = resolved.profile.into();
        profile.model = resolved.model;
        profile.destinations = resolved.destinations;
        profile.revision = 0;
        snapshot.profiles.push(profile);
        snapshot.routes.push(route);
    }
    snapshot
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
    use crate::keys::WeightsRecord;

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
            catalog: c,
            ..State::default()
        }
    }

    fn with_weights(st: &mut State, basis: String, weights: &[(&str, f64, Reason)]) {
        st.weights.insert(
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

    /// (region, weight, priority) of `profile`'s table in the snapshot.
    fn route_of(s: &pb::Snapshot, profile: &str) -> Vec<(String, f64, u32)> {
        s.routes
            .iter()
            .find(|r| r.profile == profile)
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
        let s = snapshot_for(&st, "us-east");
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
        assert_eq!(
            route_of(&snapshot_for(&st, "us-east"), US),
            owned(WEST_FIRST)
        );
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
            route_of(&snapshot_for(&st, "us-east"), US),
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
        assert_eq!(
            route_of(&snapshot_for(&st, "us-east"), US),
            owned(WEST_FIRST)
        );
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
            route_of(&snapshot_for(&st, "us-east"), US),
            owned(&[("us-east", 0.5, 0), ("us-west", 0.5, 0)])
        );
    }
}
