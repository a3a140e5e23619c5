//! What one agent receives: the part of the state its region needs.

use spillway_proto::pb;

use crate::state::State;

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
            })
            .collect(),
        profiles: Vec::new(),
        routes: Vec::new(),
        profiles_elsewhere: Vec::new(),
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
        let mut route: pb::RouteTable = catalog.route_for(&resolved, region).into();
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
