//! What one agent receives: the part of the state its region needs.

use spillway_proto::model::QuotaScope;
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
        if let Some(effective) = state
            .weights
            .get(&(table_owner, region.to_string()))
            .filter(|w| w.basis == basis)
        {
            apply_effective(&mut route, &effective.weights);
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

/// Puts the leader's effective weights into a route table: regions with
/// weight share the first level by it; healthy regions at zero (the source
/// has headroom, say) stay behind them as failover targets at their base
/// weight; drained regions get nothing.
fn apply_effective(route: &mut pb::RouteTable, effective: &[Weight]) {
    if !effective.iter().any(|w| w.weight > 0.0) {
        return;
    }
    let base = route.clone();
    for d in &mut route.destinations {
        match effective.iter().find(|w| w.region == d.region) {
            Some(w) if w.weight > 0.0 => {
                d.weight = w.weight;
                d.priority = 0;
            }
            Some(w) if w.reason == Reason::Drained => d.weight = 0.0,
            _ => d.priority = 1,
        }
    }
    // Weights computed for an older table (a destination since removed) may
    // leave nothing to call: the operator's table is better than that.
    if !route.destinations.iter().any(|d| d.weight > 0.0) {
        *route = base;
    }
}
