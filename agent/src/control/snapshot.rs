//! The configuration an agent runs with: the resources the control plane
//! sent (`ResourceSet`), how an update changes them (`apply_delta`), and the
//! checks that turn them into an `AgentConfig` or say why not (the NACK
//! reason).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message;
use spillway_core::api::{Api, ApiSet};
use spillway_core::model::{ApiKey, Profile, Quota, Region, RouteTable, Tenant};
use spillway_proto::pb;

/// The resources an agent holds, by name (`profile/us.llama`, ...), each
/// as the control plane sent it: body and version.
pub type ResourceSet = BTreeMap<String, pb::Resource>;

/// Gathers the parts of an update (`ConfigUpdate.more`): returns the whole
/// update once its last part is in, and keeps the parts so far in
/// `partial` until then. A part of another update (another nonce) drops
/// the unfinished one: the control plane moved on, and sends it again.
pub fn gather(
    partial: &mut Option<pb::ConfigUpdate>,
    part: pb::ConfigUpdate,
) -> Option<pb::ConfigUpdate> {
    let update = match partial.take() {
        Some(mut so_far) if so_far.nonce == part.nonce => {
            so_far.resources.extend(part.resources);
            so_far.removed.extend(part.removed);
            so_far.more = part.more;
            so_far
        }
        Some(dropped) => {
            tracing::warn!(
                version = dropped.version,
                "an update ended before its last part; dropped"
            );
            part
        }
        None => part,
    };
    if update.more {
        *partial = Some(update);
        None
    } else {
        Some(update)
    }
}

/// The set that results from applying `update` to `held`: exactly the
/// update's resources when it replaces the set; else `held` without the
/// removed names (a name it does not hold is ignored) and with the update's
/// resources put in by name. `held` itself is left as it is, so that a
/// result the agent refuses costs it nothing.
pub fn apply_delta(held: &ResourceSet, update: &pb::ConfigUpdate) -> ResourceSet {
    let mut set = if update.replace {
        ResourceSet::new()
    } else {
        held.clone()
    };
    for name in &update.removed {
        set.remove(name);
    }
    for r in &update.resources {
        set.insert(r.name.clone(), r.clone());
    }
    set
}

/// A validated configuration, made from the control plane's resources.
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

/// The bodies of a resource set, decoded, each checked against its name.
#[derive(Default)]
struct Decoded {
    regions: Vec<pb::Region>,
    endpoints: Vec<pb::AgentEndpoint>,
    profiles: Vec<pb::InferenceProfile>,
    routes: BTreeMap<String, pb::RouteTable>,
    weights: BTreeMap<String, pb::RouteTable>,
    elsewhere: BTreeSet<String>,
    /// With the id their name gives them.
    quotas: Vec<(String, pb::Quota)>,
    tenants: Vec<pb::Tenant>,
    keys: Vec<pb::ApiKey>,
}

/// A resource's body as a `kind` message.
fn decode<M: Message + Default>(name: &str, body: &[u8], kind: &str) -> Result<M, String> {
    M::decode(body).map_err(|e| format!("resource `{name}` is not a valid {kind}: {e}"))
}

/// An error unless the body's `found` identity is the one its name gives.
fn named(name: &str, what: &str, found: &str, expected: &str) -> Result<(), String> {
    if found == expected {
        Ok(())
    } else {
        Err(format!(
            "resource `{name}` holds {what} `{found}`, not `{expected}`"
        ))
    }
}

impl Decoded {
    fn from_set(set: &ResourceSet) -> Result<Decoded, String> {
        let mut d = Decoded::default();
        for (name, resource) in set {
            let body = resource.body.as_ref();
            let Some((kind, id)) = name.split_once('/') else {
                tracing::debug!(resource = %name, "ignoring a resource of an unknown kind");
                continue;
            };
            match kind {
                "region" => {
                    let r: pb::Region = decode(name, body, "Region")?;
                    named(name, "region", &r.name, id)?;
                    d.regions.push(r);
                }
                "endpoint" => {
                    let (region, agent) = id.split_once('/').ok_or_else(|| {
                        format!("resource `{name}` is not named endpoint/<region>/<agent id>")
                    })?;
                    let e: pb::AgentEndpoint = decode(name, body, "AgentEndpoint")?;
                    named(name, "the endpoint of region", &e.region, region)?;
                    named(name, "the endpoint of agent", &e.agent_id, agent)?;
                    d.endpoints.push(e);
                }
                "profile" => {
                    let p: pb::InferenceProfile = decode(name, body, "InferenceProfile")?;
                    named(name, "profile", &p.id, id)?;
                    d.profiles.push(p);
                }
                "route" | "weights" => {
                    let t: pb::RouteTable = decode(name, body, "RouteTable")?;
                    named(name, "a table of profile", &t.profile, id)?;
                    let tables = if kind == "route" {
                        &mut d.routes
                    } else {
                        &mut d.weights
                    };
                    tables.insert(id.to_string(), t);
                }
                // The body is empty: the name says it all.
                "elsewhere" => {
                    d.elsewhere.insert(id.to_string());
                }
                "quota" => {
                    let q: pb::Quota = decode(name, body, "Quota")?;
                    d.quotas.push((id.to_string(), q));
                }
                "tenant" => {
                    let t: pb::Tenant = decode(name, body, "Tenant")?;
                    named(name, "tenant", &t.name, id)?;
                    d.tenants.push(t);
                }
                "key" => {
                    let k: pb::ApiKey = decode(name, body, "ApiKey")?;
                    named(name, "key", &k.id, id)?;
                    d.keys.push(k);
                }
                // A kind of a newer control plane: this agent does without.
                _ => {
                    tracing::debug!(resource = %name, "ignoring a resource of an unknown kind")
                }
            }
        }
        Ok(d)
    }
}

impl AgentConfig {
    /// Checks a resource set and turns it into the config of `version`, or
    /// says why it cannot be applied (the NACK reason).
    pub fn from_resources(
        version: u64,
        own_region: &str,
        set: &ResourceSet,
        local: &LocalCapabilities,
    ) -> Result<AgentConfig, String> {
        let decoded = Decoded::from_set(set)?;
        let mut regions = BTreeMap::new();
        for r in decoded.regions {
            let region: Region = r.into();
            region.validate().map_err(|e| e.to_string())?;
            regions.insert(region.name.clone(), region);
        }
        let mut relays: BTreeMap<String, Vec<RelayEndpoint>> = BTreeMap::new();
        for a in decoded.endpoints {
            relays.entry(a.region).or_default().push(RelayEndpoint {
                apis: ApiSet::from_names(a.apis.iter().map(String::as_str)),
                agent_id: a.agent_id,
                address: a.relay_address,
            });
        }
        let mut profiles = BTreeMap::new();
        for p in decoded.profiles {
            let profile: Profile = p.into();
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
        for id in decoded.weights.keys() {
            if !profiles.contains_key(id) {
                return Err(format!("a weights table names unknown profile `{id}`"));
            }
        }
        let mut routes = BTreeMap::new();
        for (id, t) in decoded.routes {
            // The leader's weights, where it sent some, stand in for the
            // table: only the table calls follow is checked, as before.
            let (table, kind) = match decoded.weights.get(&id) {
                Some(w) => (w.clone(), "weights table"),
                None => (t, "route table"),
            };
            let table = check_table(table.into(), kind, &profiles, own_region, local)?;
            routes.insert(id, table);
        }
        for (id, w) in &decoded.weights {
            // Weights for a profile whose route table is missing still give
            // its calls a table.
            if !routes.contains_key(id) {
                let table = check_table(
                    w.clone().into(),
                    "weights table",
                    &profiles,
                    own_region,
                    local,
                )?;
                routes.insert(id.clone(), table);
            }
        }
        for id in profiles.keys() {
            if !routes.contains_key(id) {
                return Err(format!("profile `{id}` has no route table"));
            }
        }
        let mut quotas = Vec::new();
        for (id, q) in decoded.quotas {
            let quota = Quota::try_from(q.clone())
                .and_then(|q| q.validate().map(|()| q))
                .map_err(|e| format!("quota `{}`: {e}", q.id))?;
            named(&format!("quota/{id}"), "quota", &quota.scope.id(), &id)?;
            quotas.push(quota);
        }
        let mut tenants = BTreeMap::new();
        for t in decoded.tenants {
            let tenant: Tenant = t.into();
            tenant
                .validate()
                .map_err(|e| format!("tenant `{}`: {e}", tenant.name))?;
            tenants.insert(tenant.name.clone(), tenant);
        }
        let mut keys = HashMap::new();
        let mut digests = HashMap::new();
        for k in decoded.keys {
            let key: ApiKey = k.into();
            key.validate()
                .map_err(|e| format!("key `{}`: {e}", key.id))?;
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
            version,
            region: own_region.to_string(),
            regions,
            relays,
            profiles,
            routes,
            profiles_elsewhere: decoded.elsewhere,
        })
    }
}

/// The checks of one route table (`kind`: a route or a weights table) that
/// calls from `own_region` follow.
fn check_table(
    table: RouteTable,
    kind: &str,
    profiles: &BTreeMap<String, Profile>,
    own_region: &str,
    local: &LocalCapabilities,
) -> Result<RouteTable, String> {
    table
        .validate()
        .map_err(|e| format!("{kind} of `{}`: {e}", table.profile))?;
    let profile = profiles
        .get(&table.profile)
        .ok_or_else(|| format!("a {kind} names unknown profile `{}`", table.profile))?;
    if table.source_region != own_region {
        return Err(format!(
            "the {kind} of `{}` is for source `{}`, not `{own_region}`",
            table.profile, table.source_region
        ));
    }
    for d in &table.destinations {
        if !profile.destinations.contains(&d.region) {
            return Err(format!(
                "the {kind} of `{}` sends calls to `{}`, not a destination of the profile",
                table.profile, d.region
            ));
        }
        // Calls routed to this region are served by this region's model
        // servers: refuse a table that sends them a model they do not serve.
        if d.region == own_region && d.weight > 0.0 && !local.models.contains(&profile.model) {
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
    Ok(table)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A resource as the control plane makes it: its version an FNV-1a
    /// hash of its body.
    pub(crate) fn resource(name: &str, body: Vec<u8>) -> pb::Resource {
        let version = body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        pb::Resource {
            name: name.to_string(),
            version,
            body: body.into(),
        }
    }

    fn region(name: &str) -> pb::Resource {
        let body = pb::Region {
            name: name.to_string(),
            geography: "us".to_string(),
            ..Default::default()
        };
        resource(&format!("region/{name}"), body.encode_to_vec())
    }

    fn route(kind: &str, profile: &str, weights: &[(&str, f64)]) -> pb::Resource {
        let body = pb::RouteTable {
            profile: profile.to_string(),
            source_region: "us-east".to_string(),
            destinations: weights
                .iter()
                .enumerate()
                .map(|(i, (region, weight))| pb::RouteDestination {
                    region: region.to_string(),
                    weight: *weight,
                    priority: i as u32,
                })
                .collect(),
            ..Default::default()
        };
        resource(&format!("{kind}/{profile}"), body.encode_to_vec())
    }

    const KEY: &str = "spw_k1_secret";

    /// Two regions of geography `us`, an agent of the other one, a
    /// profile callable from `us-east` with its route table, a profile
    /// callable elsewhere only, and a tenant with a key and a quota.
    pub(crate) fn valid_set() -> ResourceSet {
        let profile = pb::InferenceProfile {
            id: "us.llama".to_string(),
            kind: pb::ProfileKind::Geographic.into(),
            model: "llama".to_string(),
            destinations: vec!["us-east".to_string(), "us-west".to_string()],
            ..Default::default()
        };
        let endpoint = pb::AgentEndpoint {
            agent_id: "west-1".to_string(),
            region: "us-west".to_string(),
            relay_address: "10.0.0.2:7070".to_string(),
            apis: vec!["chat".to_string()],
        };
        let tenant = pb::Tenant {
            name: "acme".to_string(),
            profiles: vec!["us.*".to_string()],
            ..Default::default()
        };
        let key = pb::ApiKey {
            id: "k1".to_string(),
            tenant: "acme".to_string(),
            hash: spillway_core::tenant::key_hash(KEY),
            ..Default::default()
        };
        let quota = pb::Quota {
            scope: Some(pb::QuotaScope {
                tenant: "acme".to_string(),
                ..Default::default()
            }),
            requests_per_minute: Some(60),
            id: "tenant/acme".to_string(),
            ..Default::default()
        };
        [
            region("us-east"),
            region("us-west"),
            resource("endpoint/us-west/west-1", endpoint.encode_to_vec()),
            resource("profile/us.llama", profile.encode_to_vec()),
            route("route", "us.llama", &[("us-east", 1.0), ("us-west", 1.0)]),
            resource("elsewhere/eu.mistral", Vec::new()),
            resource("quota/tenant/acme", quota.encode_to_vec()),
            resource("tenant/acme", tenant.encode_to_vec()),
            resource("key/k1", key.encode_to_vec()),
        ]
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect()
    }

    pub(crate) fn local() -> LocalCapabilities {
        LocalCapabilities {
            models: ["llama".to_string()].into(),
            apis: ApiSet::from_names(["chat"]),
        }
    }

    fn config(set: &ResourceSet) -> Result<AgentConfig, String> {
        AgentConfig::from_resources(7, "us-east", set, &local())
    }

    fn weights_of(cfg: &AgentConfig, profile: &str) -> Vec<(String, f64)> {
        cfg.routes[profile]
            .destinations
            .iter()
            .map(|d| (d.region.clone(), d.weight))
            .collect()
    }

    #[test]
    fn parts_of_an_update_are_gathered_and_an_unfinished_one_is_dropped() {
        let part = |nonce: &str, name: &str, more: bool| pb::ConfigUpdate {
            version: 3,
            nonce: nonce.into(),
            resources: vec![pb::Resource {
                name: name.into(),
                ..Default::default()
            }],
            removed: vec![format!("gone/{name}")],
            more,
            ..Default::default()
        };
        let mut partial = None;
        assert!(gather(&mut partial, part("a", "x", true)).is_none());
        assert!(gather(&mut partial, part("a", "y", true)).is_none());
        let whole = gather(&mut partial, part("a", "z", false)).expect("the last part");
        let names: Vec<&str> = whole.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["x", "y", "z"]);
        assert_eq!(whole.removed, ["gone/x", "gone/y", "gone/z"]);
        assert!(!whole.more && partial.is_none());
        // A part of another update: the unfinished one goes.
        assert!(gather(&mut partial, part("b", "x", true)).is_none());
        let other = gather(&mut partial, part("c", "w", false)).expect("a whole update");
        assert_eq!(other.nonce, "c");
        assert_eq!(other.resources.len(), 1);
    }

    #[test]
    fn a_valid_set_gives_its_config() {
        let cfg = config(&valid_set()).unwrap();
        assert_eq!(cfg.version, 7);
        assert_eq!(cfg.region, "us-east");
        assert_eq!(
            cfg.regions.keys().collect::<Vec<_>>(),
            ["us-east", "us-west"]
        );
        assert_eq!(cfg.relays["us-west"].len(), 1);
        assert_eq!(cfg.relays["us-west"][0].agent_id, "west-1");
        assert_eq!(cfg.relays["us-west"][0].address, "10.0.0.2:7070");
        assert!(cfg.region_serves("us-west", Api::Chat));
        assert_eq!(cfg.profiles["us.llama"].model, "llama");
        assert_eq!(
            weights_of(&cfg, "us.llama"),
            [("us-east".to_string(), 1.0), ("us-west".to_string(), 1.0)]
        );
        assert_eq!(
            cfg.profiles_elsewhere,
            BTreeSet::from(["eu.mistral".to_string()])
        );
        assert_eq!(cfg.quotas.len(), 1);
        assert_eq!(cfg.quotas[0].scope.id(), "tenant/acme");
        assert!(cfg.tenants["acme"].may_call("us.llama"));
        assert_eq!(cfg.keys["k1"].tenant, "acme");
        assert_eq!(cfg.digests["k1"], spillway_core::tenant::key_digest(KEY));
    }

    #[test]
    fn weights_are_used_instead_of_the_route_table() {
        let mut set = valid_set();
        let w = route("weights", "us.llama", &[("us-east", 0.2), ("us-west", 0.8)]);
        set.insert(w.name.clone(), w);
        let cfg = config(&set).unwrap();
        assert_eq!(
            weights_of(&cfg, "us.llama"),
            [("us-east".to_string(), 0.2), ("us-west".to_string(), 0.8)]
        );
    }

    #[test]
    fn weights_are_checked_as_a_route_table() {
        // Weights that send calls here for a model no local server serves
        // are refused, as the same route table would be.
        let mut set = valid_set();
        let w = route("weights", "us.llama", &[("us-east", 1.0), ("us-west", 0.0)]);
        set.insert(w.name.clone(), w);
        let none = LocalCapabilities::default();
        let err = AgentConfig::from_resources(7, "us-east", &set, &none).unwrap_err();
        assert!(
            err.contains("which no model server of this agent serves"),
            "{err}"
        );

        // Weights of a profile the set does not hold are refused.
        let mut set = valid_set();
        let w = route("weights", "us.gone", &[("us-east", 1.0)]);
        set.insert(w.name.clone(), w);
        assert_eq!(
            config(&set).unwrap_err(),
            "a weights table names unknown profile `us.gone`"
        );
    }

    #[test]
    fn a_body_that_does_not_match_its_name_is_refused() {
        let mut set = valid_set();
        let mut r = set["profile/us.llama"].clone();
        r.name = "profile/us.other".to_string();
        set.insert(r.name.clone(), r);
        assert_eq!(
            config(&set).unwrap_err(),
            "resource `profile/us.other` holds profile `us.llama`, not `us.other`"
        );

        let mut set = valid_set();
        let mut r = set["route/us.llama"].clone();
        r.name = "route/us.other".to_string();
        set.insert(r.name.clone(), r);
        assert_eq!(
            config(&set).unwrap_err(),
            "resource `route/us.other` holds a table of profile `us.llama`, not `us.other`"
        );

        let mut set = valid_set();
        let mut r = set["endpoint/us-west/west-1"].clone();
        r.name = "endpoint/us-east/west-1".to_string();
        set.insert(r.name.clone(), r);
        let err = config(&set).unwrap_err();
        assert!(err.contains("endpoint/us-east/west-1"), "{err}");
    }

    #[test]
    fn a_body_that_does_not_decode_is_refused() {
        let mut set = valid_set();
        // A field 1 announced as length-delimited and 100 bytes long, with
        // two bytes following.
        let bad = resource("tenant/acme", vec![0x0a, 100, b'a', b'c']);
        set.insert(bad.name.clone(), bad);
        let err = config(&set).unwrap_err();
        assert!(
            err.starts_with("resource `tenant/acme` is not a valid Tenant: "),
            "{err}"
        );
    }

    #[test]
    fn a_route_table_of_an_unknown_profile_is_refused() {
        let mut set = valid_set();
        let r = route("route", "us.gone", &[("us-east", 1.0)]);
        set.insert(r.name.clone(), r);
        assert_eq!(
            config(&set).unwrap_err(),
            "a route table names unknown profile `us.gone`"
        );
    }

    #[test]
    fn a_resource_of_an_unknown_kind_is_ignored() {
        let mut set = valid_set();
        for name in ["gadget/x", "no-slash"] {
            let r = resource(name, vec![0xff, 0xff]);
            set.insert(r.name.clone(), r);
        }
        assert_eq!(config(&set).unwrap(), config(&valid_set()).unwrap());
    }

    fn update(resources: Vec<pb::Resource>, removed: &[&str], replace: bool) -> pb::ConfigUpdate {
        pb::ConfigUpdate {
            version: 8,
            nonce: "n".to_string(),
            resources,
            removed: removed.iter().map(|s| s.to_string()).collect(),
            replace,
            ..Default::default()
        }
    }

    fn versions(set: &ResourceSet) -> Vec<(&str, u64)> {
        set.values().map(|r| (r.name.as_str(), r.version)).collect()
    }

    #[test]
    fn a_delta_inserts_replaces_and_removes_by_name() {
        let held: ResourceSet = [resource("a/1", vec![1]), resource("a/2", vec![2])]
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let new2 = resource("a/2", vec![22]);
        let new3 = resource("a/3", vec![3]);
        let next = apply_delta(
            &held,
            &update(
                vec![new2.clone(), new3.clone()],
                &["a/1", "a/unknown"],
                false,
            ),
        );
        assert_eq!(
            versions(&next),
            [("a/2", new2.version), ("a/3", new3.version)]
        );
        assert_eq!(next["a/2"].body, new2.body);

        // An update with nothing in it changes nothing.
        assert_eq!(apply_delta(&held, &update(Vec::new(), &[], false)), held);
    }

    #[test]
    fn a_replacing_update_is_the_whole_set() {
        let held: ResourceSet = [resource("a/1", vec![1]), resource("a/2", vec![2])]
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let new3 = resource("a/3", vec![3]);
        let next = apply_delta(&held, &update(vec![new3.clone()], &[], true));
        assert_eq!(versions(&next), [("a/3", new3.version)]);
        assert!(apply_delta(&held, &update(Vec::new(), &[], true)).is_empty());
    }

    #[test]
    fn a_refused_delta_leaves_the_held_set_as_it_was() {
        let held = valid_set();
        let before = held.clone();
        // Removing the regions leaves a profile naming unknown regions.
        let delta = update(Vec::new(), &["region/us-west"], false);
        let candidate = apply_delta(&held, &delta);
        assert_eq!(
            config(&candidate).unwrap_err(),
            "profile `us.llama` names unknown region `us-west`"
        );
        assert_eq!(held, before);
        assert_eq!(config(&held).unwrap().version, 7);
    }
}
