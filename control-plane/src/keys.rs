//! Store keys of each object, relative to the store prefix, and the JSON
//! values stored under them.

use serde::{Deserialize, Serialize};
use spillway_core::model::{ApiKey, Catalog, Profile, Quota, Region, RouteTable, Tenant, Touched};

use crate::store::KeyValue;

pub const REGIONS: &str = "regions/";
pub const PROFILES: &str = "profiles/";
pub const ROUTES: &str = "routes/";
pub const AGENTS: &str = "agents/";
pub const QUOTAS: &str = "quotas/";
pub const TENANTS: &str = "tenants/";
/// API keys: hashes only, never a key itself.
pub const KEYS: &str = "keys/";
pub const HEALTH: &str = "health/";
pub const WEIGHTS: &str = "weights/";
pub const LEASES: &str = "leases/";
pub const LEADER: &str = "leader";
/// Written with every catalog change; a catalog write is guarded by this
/// key's revision, so that writes checked against one version of the whole
/// catalog cannot interleave (see `catalog_store`).
pub const CATALOG_GUARD: &str = "catalog-guard";

pub fn region(name: &str) -> String {
    format!("{REGIONS}{name}")
}

pub fn profile(id: &str) -> String {
    format!("{PROFILES}{id}")
}

pub fn route(profile: &str, source: &str) -> String {
    format!("{ROUTES}{profile}/{source}")
}

pub fn quota(id: &str) -> String {
    format!("{QUOTAS}{id}")
}

pub fn tenant(name: &str) -> String {
    format!("{TENANTS}{name}")
}

pub fn api_key(id: &str) -> String {
    format!("{KEYS}{id}")
}

pub fn agent(region: &str, agent_id: &str) -> String {
    format!("{AGENTS}{region}/{agent_id}")
}

pub fn health(region: &str, agent_id: &str) -> String {
    format!("{HEALTH}{region}/{agent_id}")
}

pub fn leases(region: &str, agent_id: &str) -> String {
    format!("{LEASES}{region}/{agent_id}")
}

pub fn weights(profile: &str, source: &str) -> String {
    format!("{WEIGHTS}{profile}/{source}")
}

/// One agent's last load report, leased like its record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthRecord {
    pub agent_id: String,
    pub region: String,
    /// Milliseconds since the Unix epoch when the replica received it.
    pub received_at_ms: u64,
    pub interval_seconds: f64,
    pub servers: Vec<ServerHealth>,
    /// Calls the agent relayed, by destination region.
    #[serde(default)]
    pub relays: Vec<RelayHealth>,
    /// Demand on the quotas it enforces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quotas: Vec<QuotaDemand>,
}

/// What callers asked of one quota at one agent, per minute, and what the
/// agent holds under a live lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaDemand {
    pub quota_id: String,
    pub requests_per_minute: f64,
    pub tokens_per_minute: f64,
    #[serde(default)]
    pub held: [f64; 3],
}

/// The quota leases of one agent, written by the leader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub agent_id: String,
    pub region: String,
    /// The replica that granted them.
    pub leader: String,
    /// Milliseconds since the Unix epoch, on the leader's clock.
    pub granted_at_ms: u64,
    pub lease_ms: u64,
    pub grants: Vec<QuotaGrant>,
}

/// One agent's share of one quota: amounts per minute (per day for the
/// daily limit), by limit: requests, tokens, tokens per day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaGrant {
    pub quota_id: String,
    pub amounts: [f64; 3],
    pub sharing_agents: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayHealth {
    pub region: String,
    pub calls: u64,
    pub errors: u64,
    pub throttles: u64,
    pub latency_ewma_us: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerHealth {
    pub url: String,
    pub models: Vec<String>,
    pub capacity: u32,
    pub in_flight: u32,
    pub calls: u64,
    pub errors: u64,
    pub throttles: u64,
    pub latency_ewma_us: u64,
    #[serde(default)]
    pub ttft_ewma_us: u64,
    #[serde(default)]
    pub total_ewma_us: u64,
    #[serde(default)]
    pub output_tokens: u64,
    /// What the engine said of itself, when the agent reads its metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineHealth>,
    /// The concurrency limit the agent learned from time to first token.
    #[serde(default)]
    pub learned_limit: f64,
    /// Calls the server takes without queuing, as the agent estimates them
    /// (0 from agents that predate the estimate: `capacity` stands for it).
    #[serde(default)]
    pub limit: f64,
    /// The agent's saturation score for the server (1 or more: saturated).
    #[serde(default)]
    pub saturation: f64,
}

/// A model server's engine figures, as one agent last read them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineHealth {
    /// The metrics dialect: vllm, sglang or llamacpp.
    pub kind: String,
    /// Requests being generated, and waiting in the engine's queue: every
    /// caller's, not only this agent's.
    pub running: f64,
    pub waiting: f64,
    /// KV-cache usage from 0 to 1, when the engine reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_usage: Option<f64>,
    pub ttft_p90_ms: f64,
    /// Whether the agent's last scrape was recent; stale figures count as
    /// saturated.
    pub fresh: bool,
    /// Milliseconds from the scrape to the report.
    pub age_ms: u64,
}

/// The effective weights of one route table, written by the leader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsRecord {
    pub profile: String,
    pub source_region: String,
    pub weights: Vec<crate::weights::Weight>,
    /// The replica that computed them.
    pub leader: String,
    /// The operator's table they were computed for
    /// (`weights::basis`): weights of another table are stale, so agents
    /// get the operator's table until the leader has recomputed.
    #[serde(default)]
    pub basis: String,
}

impl WeightsRecord {
    /// Whether these weights apply to the table of `basis`: they were
    /// computed for it, or by an older build that recorded no table.
    pub fn fits(&self, basis: &str) -> bool {
        self.basis.is_empty() || self.basis == basis
    }
}

/// An agent as its control-plane replica records it, under a lease of that
/// replica, so that every replica can list it and it disappears when the
/// replica does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub agent_id: String,
    pub region: String,
    pub relay_address: String,
    pub control_plane: String,
    pub connected_at_unix: i64,
    #[serde(default)]
    pub sent_version: u64,
    #[serde(default)]
    pub acked_version: u64,
    #[serde(default)]
    pub nacked_version: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nack_reason: String,
    /// The inference APIs the agent announced (empty: an older agent,
    /// chat and completions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apis: Vec<String>,
}

#[cfg(test)]
impl AgentRecord {
    /// Agent `id` of `region`, just connected to replica `cp`, for tests.
    pub(crate) fn test(region: &str, id: &str) -> Self {
        AgentRecord {
            agent_id: id.into(),
            region: region.into(),
            relay_address: "127.0.0.1:9".into(),
            control_plane: "cp".into(),
            connected_at_unix: 0,
            sent_version: 0,
            acked_version: 0,
            nacked_version: 0,
            nack_reason: String::new(),
            apis: Vec::new(),
        }
    }
}

/// What a stored key holds.
pub enum Object {
    Region(Region),
    Profile(Profile),
    Route(RouteTable),
    Quota(Quota),
    Tenant(Tenant),
    Key(ApiKey),
    Agent(AgentRecord),
    Health(HealthRecord),
    Weights(WeightsRecord),
    Leases(LeaseRecord),
    Other,
}

/// Decodes one stored key; `Err` names the key and what is wrong with it.
pub fn decode(kv: &KeyValue) -> Result<Object, String> {
    let bad = |e: serde_json::Error| format!("key `{}` does not hold a valid object: {e}", kv.key);
    let key = kv.key.as_str();
    Ok(if key.starts_with(REGIONS) {
        let mut r: Region = serde_json::from_slice(&kv.value).map_err(bad)?;
        r.revision = kv.mod_revision;
        Object::Region(r)
    } else if key.starts_with(PROFILES) {
        let mut p: Profile = serde_json::from_slice(&kv.value).map_err(bad)?;
        p.revision = kv.mod_revision;
        Object::Profile(p)
    } else if key.starts_with(ROUTES) {
        let mut t: RouteTable = serde_json::from_slice(&kv.value).map_err(bad)?;
        t.revision = kv.mod_revision;
        Object::Route(t)
    } else if key.starts_with(QUOTAS) {
        let mut q: Quota = serde_json::from_slice(&kv.value).map_err(bad)?;
        q.revision = kv.mod_revision;
        Object::Quota(q)
    } else if key.starts_with(TENANTS) {
        let mut t: Tenant = serde_json::from_slice(&kv.value).map_err(bad)?;
        t.revision = kv.mod_revision;
        Object::Tenant(t)
    } else if key.starts_with(KEYS) {
        let mut k: ApiKey = serde_json::from_slice(&kv.value).map_err(bad)?;
        k.revision = kv.mod_revision;
        Object::Key(k)
    } else if key.starts_with(AGENTS) {
        Object::Agent(serde_json::from_slice(&kv.value).map_err(bad)?)
    } else if key.starts_with(HEALTH) {
        Object::Health(serde_json::from_slice(&kv.value).map_err(bad)?)
    } else if key.starts_with(WEIGHTS) {
        Object::Weights(serde_json::from_slice(&kv.value).map_err(bad)?)
    } else if key.starts_with(LEASES) {
        Object::Leases(serde_json::from_slice(&kv.value).map_err(bad)?)
    } else {
        Object::Other
    })
}

/// Adds one decoded object to a catalog.
pub fn insert(catalog: &mut Catalog, object: Object) {
    match object {
        Object::Region(r) => {
            catalog.regions.insert(r.name.clone(), r);
        }
        Object::Profile(p) => {
            catalog.profiles.insert(p.id.clone(), p);
        }
        Object::Route(t) => {
            catalog.routes.insert(t.key(), t);
        }
        Object::Quota(q) => {
            catalog.quotas.insert(q.scope.id(), q);
        }
        Object::Tenant(t) => {
            catalog.tenants.insert(t.name.clone(), t);
        }
        Object::Key(k) => {
            catalog.keys.insert(k.id.clone(), k);
        }
        Object::Agent(_)
        | Object::Health(_)
        | Object::Weights(_)
        | Object::Leases(_)
        | Object::Other => {}
    }
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("domain types serialize")
}

/// Every (key, value) of a catalog, in store form.
pub fn encode_catalog(catalog: &Catalog) -> Vec<(String, Vec<u8>)> {
    let regions = catalog.regions.values().map(|r| (region(&r.name), json(r)));
    let profiles = catalog.profiles.values().map(|p| (profile(&p.id), json(p)));
    let routes = catalog
        .routes
        .values()
        .map(|t| (route(&t.profile, &t.source_region), json(t)));
    let quotas = catalog.quotas.iter().map(|(id, q)| (quota(id), json(q)));
    let tenants = catalog.tenants.values().map(|t| (tenant(&t.name), json(t)));
    let keys = catalog.keys.values().map(|k| (api_key(&k.id), json(k)));
    regions
        .chain(profiles)
        .chain(routes)
        .chain(quotas)
        .chain(tenants)
        .chain(keys)
        .collect()
}

/// What turns catalog `before` into `after`: the objects to put (key and
/// encoding) and the keys to delete. Only objects that differ are encoded.
pub fn diff_catalog(before: &Catalog, after: &Catalog) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    fn kind<K: Ord, V: PartialEq + Serialize>(
        before: &std::collections::BTreeMap<K, V>,
        after: &std::collections::BTreeMap<K, V>,
        key: impl Fn(&K, &V) -> String,
        puts: &mut Vec<(String, Vec<u8>)>,
        deletes: &mut Vec<String>,
    ) {
        for (k, v) in after {
            if before.get(k) != Some(v) {
                puts.push((key(k, v), json(v)));
            }
        }
        for (k, v) in before {
            if !after.contains_key(k) {
                deletes.push(key(k, v));
            }
        }
    }
    let (mut puts, mut deletes) = (Vec::new(), Vec::new());
    let (p, d) = (&mut puts, &mut deletes);
    kind(
        &before.regions,
        &after.regions,
        |_, r| region(&r.name),
        p,
        d,
    );
    kind(
        &before.profiles,
        &after.profiles,
        |_, x| profile(&x.id),
        p,
        d,
    );
    kind(
        &before.routes,
        &after.routes,
        |_, t| route(&t.profile, &t.source_region),
        p,
        d,
    );
    kind(&before.quotas, &after.quotas, |id, _| quota(id), p, d);
    kind(
        &before.tenants,
        &after.tenants,
        |_, t| tenant(&t.name),
        p,
        d,
    );
    kind(&before.keys, &after.keys, |_, k| api_key(&k.id), p, d);
    (puts, deletes)
}

/// What turns catalog `before` into `after` when only the `touched`
/// objects may differ (a journal, `Catalog::take_journal`): the same as
/// [`diff_catalog`], at the cost of what was touched rather than of the
/// catalog. A touched object that ends as it was is left out.
pub fn diff_touched<'a>(
    before: &Catalog,
    after: &Catalog,
    touched: impl IntoIterator<Item = &'a Touched>,
) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    fn one<K: Ord, V: PartialEq + Serialize>(
        before: &std::collections::BTreeMap<K, V>,
        after: &std::collections::BTreeMap<K, V>,
        k: &K,
        key: String,
        puts: &mut Vec<(String, Vec<u8>)>,
        deletes: &mut Vec<String>,
    ) {
        match (before.get(k), after.get(k)) {
            (was, Some(now)) if was != Some(now) => puts.push((key, json(now))),
            (Some(_), None) => deletes.push(key),
            _ => {}
        }
    }
    let (mut puts, mut deletes) = (Vec::new(), Vec::new());
    let (p, d) = (&mut puts, &mut deletes);
    for t in touched {
        match t {
            Touched::Region(n) => one(&before.regions, &after.regions, n, region(n), p, d),
            Touched::Profile(id) => one(&before.profiles, &after.profiles, id, profile(id), p, d),
            Touched::Route(pr, s) => {
                let k = (pr.clone(), s.clone());
                one(&before.routes, &after.routes, &k, route(pr, s), p, d)
            }
            Touched::Quota(id) => one(&before.quotas, &after.quotas, id, quota(id), p, d),
            Touched::Tenant(n) => one(&before.tenants, &after.tenants, n, tenant(n), p, d),
            Touched::Key(id) => one(&before.keys, &after.keys, id, api_key(id), p, d),
        }
    }
    (puts, deletes)
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    json(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_catalog_diff_names_only_what_changed() {
        let mut before = Catalog::default();
        for name in ["a", "b", "c"] {
            before.regions.insert(
                name.into(),
                Region {
                    name: name.into(),
                    geography: "g".into(),
                    description: String::new(),
                    revision: 4,
                },
            );
        }
        let mut after = before.clone();
        after.regions.get_mut("b").unwrap().description = "changed".into();
        after.regions.remove("c");
        after.regions.insert(
            "d".into(),
            Region {
                name: "d".into(),
                geography: "g".into(),
                description: String::new(),
                revision: 0,
            },
        );
        let (puts, deletes) = diff_catalog(&before, &after);
        let put_keys: Vec<&str> = puts.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(put_keys, [region("b"), region("d")]);
        assert_eq!(deletes, [region("c")]);
        // What is put is the object's encoding.
        assert_eq!(puts[0].1, json(&after.regions["b"]));
        assert_eq!(diff_catalog(&after, &after), (Vec::new(), Vec::new()));
        // Given what was touched, the same answer: a touched object that
        // ends as it was (a) is left out, an untouched one is not looked at.
        let touched = ["a", "b", "c", "d"].map(|r| Touched::Region(r.into()));
        assert_eq!(
            diff_touched(&before, &after, &touched),
            diff_catalog(&before, &after)
        );
        assert_eq!(
            diff_touched(&before, &after, &touched[..1]),
            (Vec::new(), Vec::new())
        );
    }
}
