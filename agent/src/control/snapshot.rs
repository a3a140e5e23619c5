//! The configuration an agent runs with, checked before it is applied.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use spillway_core::api::{Api, ApiSet};
use spillway_core::model::{ApiKey, Profile, Quota, Region, RouteTable, Tenant};
use spillway_proto::pb;

/// A validated snapshot from the control plane.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub version: u64,
    pub region: String,
    pub regions: BTreeMap<String, Region>,
    /// Relay endpoints by region.
    pub relays: BTreeMap<String, Vec<RelayEndpoint>>,
    /// Profiles callable from this region, with model and destinations
    /// resolved, by id.
    pub profiles: BTreeMap<String, Profile>,
    /// Route tables for this region, by profile id.
    pub routes: BTreeMap<String, RouteTable>,
    /// Profiles that exist but are not callable from this region.
    pub profiles_elsewhere: BTreeSet<String>,
    /// The quotas this region's agents enforce.
    pub quotas: Vec<Quota>,
    pub tenants: BTreeMap<String, Tenant>,
    /// API keys (hashes) by id.
    pub keys: HashMap<String, ApiKey>,
    /// The same hashes as bytes, by key id, for the per-call comparison.
    pub digests: HashMap<String, [u8; 32]>,
}

impl AgentConfig {
    /// Agents of this region the control plane knew of (at least one: this
    /// one), among which a profile quota's safe share is split.
    pub fn region_agents(&self) -> u32 {
        self.relays
            .get(&self.region)
            .map_or(1, |a| a.len().max(1) as u32)
    }

    /// Every agent the control plane knew of, among which a tenant quota's
    /// safe share is split (tenant quotas span regions).
    pub fn all_agents(&self) -> u32 {
        (self.relays.values().map(Vec::len).sum::<usize>().max(1)) as u32
    }
}

/// An agent of another region (or of this one), as relays reach it.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayEndpoint {
    pub agent_id: String,
    /// host:port of its relay service.
    pub address: String,
    /// The inference APIs its model servers serve.
    pub apis: ApiSet,
}

impl AgentConfig {
    /// Whether an agent of `region` serves `api`. A region with no agent
    /// known is given the benefit of the doubt: the relay will say.
    pub fn region_serves(&self, region: &str, api: Api) -> bool {
        self.relays
            .get(region)
            .filter(|agents| !agents.is_empty())
            .is_none_or(|agents| agents.iter().any(|a| a.apis.contains(api)))
    }
}

/// What this agent can serve locally: the check that only the agent can
/// make, because only it knows its model servers.
#[derive(Debug, Clone, Default)]
pub struct LocalCapabilities {
    pub models: BTreeSet<String>,
    /// The APIs its model servers serve, announced in its hello.
    pub apis: ApiSet,
}

impl AgentConfig {
    /// Checks a snapshot and turns it into a config, or says why it cannot
    /// be applied (the NACK reason).
    pub fn from_update(
        update: &pb::ConfigUpdate,
        own_region: &str,
        local: &LocalCapabilities,
    ) -> Result<AgentConfig, String> {
        let snapshot = update
            .snapshot
            .as_ref()
            .ok_or("the update has no snapshot")?;
        if snapshot.region != own_region {
            return Err(format!(
                "the snapshot is for region `{}`, this agent serves `{own_region}`",
                snapshot.region
            ));
        }
        let mut regions = BTreeMap::new();
        for r in &snapshot.regions {
            let region: Region = r.clone().into();
            region.validate().map_err(|e| e.to_string())?;
            regions.insert(region.name.clone(), region);
        }
        let mut relays: BTreeMap<String, Vec<RelayEndpoint>> = BTreeMap::new();
        for a in &snapshot.agents {
            relays
                .entry(a.region.clone())
                .or_default()
                .push(RelayEndpoint {
                    agent_id: a.agent_id.clone(),
                    address: a.relay_address.clone(),
                    apis: ApiSet::from_names(a.apis.iter().map(String::as_str)),
                });
        }
        let mut profiles = BTreeMap::new();
        for p in &snapshot.profiles {
            let profile: Profile = p.clone().into();
            if profile.id.is_empty() {
                return Err("a profile has an empty id".into());
            }
            if profile.model.is_empty() || profile.destinations.is_empty() {
                return Err(format!(
                    "profile `{}` has no model or destinations",
                    profile.id
                ));
            }
            for d in &profile.destinations {
                if !regions.contains_key(d) {
                    return Err(format!(
                        "profile `{}` names unknown region `{d}`",
                        profile.id
                    ));
                }
            }
            profiles.insert(profile.id.clone(), profile);
        }
        let mut routes = BTreeMap::new();
        for t in &snapshot.routes {
            let table: RouteTable = t.clone().into();
            table
                .validate()
                .map_err(|e| format!("route table of `{}`: {e}", table.profile))?;
            let profile = profiles.get(&table.profile).ok_or_else(|| {
                format!("a route table names unknown profile `{}`", table.profile)
            })?;
            if table.source_region != own_region {
                return Err(format!(
                    "the route table of `{}` is for source `{}`, not `{own_region}`",
                    table.profile, table.source_region
                ));
            }
            for d in &table.destinations {
                if !profile.destinations.contains(&d.region) {
                    return Err(format!(
                        "the route table of `{}` sends calls to `{}`, not a destination of the profile",
                        table.profile, d.region
                    ));
                }
                // Calls routed to this region are served by this region's
                // model servers: refuse a table that sends them a model
                // they do not serve.
                if d.region == own_region
                    && d.weight > 0.0
                    && !local.models.contains(&profile.model)
                {
                    return Err(format!(
                        "profile `{}` routes calls to this region ({own_region}) for model `{}`, which no model server of this agent serves (serving: {})",
                        profile.id,
                        profile.model,
                        if local.models.is_empty() {
                            "none".to_string()
                        } else {
                            local.models.iter().cloned().collect::<Vec<_>>().join(", ")
                        }
                    ));
                }
            }
            routes.insert(table.profile.clone(), table);
        }
        for id in profiles.keys() {
            if !routes.contains_key(id) {
                return Err(format!("profile `{id}` has no route table"));
            }
        }
        let mut quotas = Vec::new();
        for q in &snapshot.quotas {
            let quota = Quota::try_from(q.clone())
                .and_then(|q| q.validate().map(|()| q))
                .map_err(|e| format!("quota `{}`: {e}", q.id))?;
            quotas.push(quota);
        }
        let mut tenants = BTreeMap::new();
        for t in &snapshot.tenants {
            let tenant: Tenant = t.clone().into();
            tenant
                .validate()
                .map_err(|e| format!("tenant `{}`: {e}", t.name))?;
            tenants.insert(tenant.name.clone(), tenant);
        }
        let mut keys = HashMap::new();
        let mut digests = HashMap::new();
        for k in &snapshot.keys {
            let key: ApiKey = k.clone().into();
            key.validate().map_err(|e| format!("key `{}`: {e}", k.id))?;
            if !tenants.contains_key(&key.tenant) {
                return Err(format!(
                    "key `{}` names unknown tenant `{}`",
                    key.id, key.tenant
                ));
            }
            let digest = spillway_core::tenant::hash_bytes(&key.hash)
                .ok_or_else(|| format!("key `{}` has a malformed hash", key.id))?;
            digests.insert(key.id.clone(), digest);
            keys.insert(key.id.clone(), key);
        }
        Ok(AgentConfig {
            quotas,
            tenants,
            keys,
            digests,
            version: update.version,
            region: own_region.to_string(),
            regions,
            relays,
            profiles,
            routes,
            profiles_elsewhere: snapshot.profiles_elsewhere.iter().cloned().collect(),
        })
    }
}
