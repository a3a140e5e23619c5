//! The domain model: regions, inference profiles and route tables, with the
//! validation that the admin API applies to every write and that an agent
//! applies to every snapshot it receives.
//!
//! A [`Catalog`] is the whole configuration at one store revision. Every
//! change is applied to a copy and the copy is checked as a whole, so an
//! object can never be written that leaves another one dangling (a route
//! table naming a deleted region, an application profile copying a deleted
//! profile).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub use crate::tenant::{ApiKey, RegionPolicy, Tenant};

/// The id prefix of global profiles; no region may use it as its geography.
pub const GLOBAL: &str = "global";

/// Why a write or a snapshot was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// A field has a value that is wrong on its own or that names something
    /// that does not exist. `field` is a path such as `profile.destinations[1]`.
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{kind} `{name}` not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} `{name}` already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// The object changed since the revision the writer read.
    #[error(
        "{kind} `{name}` changed since revision {expected} (now at revision {actual}); read it again and retry"
    )]
    Conflict {
        kind: &'static str,
        name: String,
        expected: i64,
        actual: i64,
    },
    /// Another object still depends on this one.
    #[error("{0}")]
    InUse(String),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A named place with its own agents and model servers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub name: String,
    pub geography: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Store revision of the last write; not stored in the value itself.
    #[serde(skip)]
    pub revision: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileKind {
    Geographic,
    Global,
    Application,
}

impl ProfileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileKind::Geographic => "geographic",
            ProfileKind::Global => "global",
            ProfileKind::Application => "application",
        }
    }

    /// The kind an id has by its shape: `global.<model>`, `<geo>.<model>`, or
    /// a plain name for an application profile.
    pub fn from_id(id: &str) -> ProfileKind {
        match id.split_once('.') {
            Some((GLOBAL, _)) => ProfileKind::Global,
            Some(_) => ProfileKind::Geographic,
            None => ProfileKind::Application,
        }
    }
}

/// What a client names as its model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub id: String,
    pub kind: ProfileKind,
    /// The model the destinations serve. Derived from the id for geographic
    /// and global profiles; set for an application profile that copies a
    /// single-region model.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_region: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(skip)]
    pub revision: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteDestination {
    pub region: String,
    pub weight: f64,
    #[serde(default)]
    pub priority: u32,
}

/// For one profile and one source region: the destinations and their weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteTable {
    pub profile: String,
    pub source_region: String,
    pub destinations: Vec<RouteDestination>,
    #[serde(skip)]
    pub revision: i64,
}

/// What a quota limits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum QuotaScope {
    /// A profile's calls from one source region.
    ProfileInRegion {
        profile: String,
        source_region: String,
    },
    /// One tenant's calls of one profile.
    TenantOnProfile { tenant: String, profile: String },
    /// Everything one tenant calls.
    Tenant { tenant: String },
}

impl QuotaScope {
    /// The quota's id, also its store key suffix.
    pub fn id(&self) -> String {
        match self {
            QuotaScope::ProfileInRegion {
                profile,
                source_region,
            } => format!("profile/{profile}@{source_region}"),
            QuotaScope::TenantOnProfile { tenant, profile } => format!("tenant/{tenant}/{profile}"),
            QuotaScope::Tenant { tenant } => format!("tenant/{tenant}"),
        }
    }
}

/// Requests and tokens per minute (and tokens per day) for one scope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quota {
    pub scope: QuotaScope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<i64>,
    /// Output tokens count this many times (at least 1).
    pub output_burndown: f64,
    #[serde(skip)]
    pub revision: i64,
}

impl Quota {
    pub fn validate(&self) -> Result<(), ModelError> {
        let limits = [
            ("quota.requests_per_minute", self.requests_per_minute),
            ("quota.tokens_per_minute", self.tokens_per_minute),
            ("quota.tokens_per_day", self.tokens_per_day),
        ];
        for (field, limit) in limits {
            if let Some(n) = limit
                && n <= 0
            {
                return Err(invalid(
                    field,
                    format!("{n} is not a positive whole number"),
                ));
            }
        }
        if limits.iter().all(|(_, l)| l.is_none()) {
            return Err(invalid(
                "quota",
                "set at least one of requests_per_minute, tokens_per_minute, tokens_per_day",
            ));
        }
        if !self.output_burndown.is_finite() || self.output_burndown < 1.0 {
            return Err(invalid(
                "quota.output_burndown",
                format!(
                    "{} is under 1: output tokens count at least once",
                    self.output_burndown
                ),
            ));
        }
        Ok(())
    }
}

/// A profile as an agent sees it: kind and tags kept, model and destination
/// regions filled in from what it copies.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedProfile {
    pub profile: Profile,
    pub model: String,
    pub destinations: Vec<String>,
}

fn check_name(field: &str, value: &str, max: usize) -> Result<(), ModelError> {
    // Lower-case DNS-label style: used for regions and geographies, which
    // appear in store keys, certificate names and metric labels.
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(invalid(
            field,
            format!("`{value}` is longer than {max} characters"),
        ));
    }
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = value.as_bytes()[0].is_ascii_lowercase() && !value.ends_with('-');
    if !ok_chars || !ok_ends {
        return Err(invalid(
            field,
            format!(
                "`{value}` must be lower-case letters, digits and '-', start with a letter and not end with '-'"
            ),
        ));
    }
    Ok(())
}

/// A model name as model servers know it, e.g. `llama-3.1-8b` or
/// `meta-llama/Llama-3.1-8B-Instruct`.
fn check_model(field: &str, value: &str) -> Result<(), ModelError> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > 128 {
        return Err(invalid(
            field,
            format!("`{value}` is longer than 128 characters"),
        ));
    }
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b));
    if !ok || !value.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid(
            field,
            format!(
                "`{value}` must start with a letter or digit and use only letters, digits and -_.:/"
            ),
        ));
    }
    Ok(())
}

fn check_application_id(field: &str, value: &str) -> Result<(), ModelError> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > 64 {
        return Err(invalid(
            field,
            format!("`{value}` is longer than 64 characters"),
        ));
    }
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok || !value.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid(
            field,
            format!(
                "`{value}` must start with a letter or digit and use only letters, digits, '-' and '_' (no '.', which marks geographic and global profiles)"
            ),
        ));
    }
    Ok(())
}

impl Region {
    /// Checks the region on its own.
    pub fn validate(&self) -> Result<(), ModelError> {
        check_name("region.name", &self.name, 63)?;
        check_name("region.geography", &self.geography, 32)?;
        if self.geography == GLOBAL {
            return Err(invalid(
                "region.geography",
                "`global` is reserved for global profiles",
            ));
        }
        if self.description.len() > 1024 {
            return Err(invalid(
                "region.description",
                "is longer than 1024 characters",
            ));
        }
        Ok(())
    }
}

impl Profile {
    /// Checks the profile on its own (the shape of its fields); references
    /// to regions and base profiles are checked by [`Catalog::validate`].
    pub fn validate(&self) -> Result<(), ModelError> {
        let id = &self.id;
        if id.is_empty() {
            return Err(invalid("profile.id", "must not be empty"));
        }
        let shape = ProfileKind::from_id(id);
        if shape != self.kind {
            let expected = match self.kind {
                ProfileKind::Geographic => "`<geography>.<model>`, e.g. `us.llama-3.1-8b`",
                ProfileKind::Global => "`global.<model>`, e.g. `global.llama-3.1-8b`",
                ProfileKind::Application => "a name without '.', e.g. `team-search-prod`",
            };
            return Err(invalid(
                "profile.id",
                format!(
                    "`{id}` does not fit a {} profile, whose id is {expected}",
                    self.kind.as_str()
                ),
            ));
        }
        if self.tags.len() > 50 {
            return Err(invalid("profile.tags", "has more than 50 tags"));
        }
        for (k, v) in &self.tags {
            let ok = !k.is_empty()
                && k.len() <= 128
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b));
            if !ok {
                return Err(invalid(
                    format!("profile.tags[{k:?}]"),
                    "a tag key is 1 to 128 letters, digits or -_.:/",
                ));
            }
            if v.len() > 256 {
                return Err(invalid(
                    format!("profile.tags[{k:?}]"),
                    "a tag value is at most 256 bytes",
                ));
            }
        }
        if self.description.len() > 1024 {
            return Err(invalid(
                "profile.description",
                "is longer than 1024 characters",
            ));
        }
        match self.kind {
            ProfileKind::Geographic | ProfileKind::Global => {
                let (prefix, model) = id.split_once('.').expect("shape checked above");
                if self.kind == ProfileKind::Geographic {
                    check_name("profile.id", prefix, 32).map_err(|_| {
                        invalid(
                            "profile.id",
                            format!("`{prefix}` before the '.' must be a geography (lower-case letters, digits, '-')"),
                        )
                    })?;
                }
                check_model("profile.id", model)?;
                if !self.model.is_empty() && self.model != model {
                    return Err(invalid(
                        "profile.model",
                        format!(
                            "`{}` differs from `{model}` in the id; leave it empty or equal",
                            self.model
                        ),
                    ));
                }
                if self.destinations.is_empty() {
                    return Err(invalid(
                        "profile.destinations",
                        "must name at least one region",
                    ));
                }
                let mut seen = BTreeSet::new();
                for (i, d) in self.destinations.iter().enumerate() {
                    let field = format!("profile.destinations[{i}]");
                    check_name(&field, d, 63)?;
                    if !seen.insert(d) {
                        return Err(invalid(field, format!("region `{d}` is listed twice")));
                    }
                }
                if self.base_profile.is_some() || self.base_region.is_some() {
                    return Err(invalid(
                        "profile.base_profile",
                        "only application profiles copy another profile or region",
                    ));
                }
            }
            ProfileKind::Application => {
                check_application_id("profile.id", id)?;
                if !self.destinations.is_empty() {
                    return Err(invalid(
                        "profile.destinations",
                        "an application profile takes its destinations from what it copies; leave it empty",
                    ));
                }
                match (&self.base_profile, &self.base_region) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(
                            "profile.base_region",
                            "set either base_profile, or base_region with model, not both",
                        ));
                    }
                    (None, None) => {
                        return Err(invalid(
                            "profile.base_profile",
                            "an application profile copies a geographic or global profile (base_profile) or one region's model (base_region and model)",
                        ));
                    }
                    (Some(base), None) => {
                        if base.is_empty() {
                            return Err(invalid("profile.base_profile", "must not be empty"));
                        }
                        if !self.model.is_empty() {
                            return Err(invalid(
                                "profile.model",
                                "comes from the base profile; leave it empty",
                            ));
                        }
                    }
                    (None, Some(region)) => {
                        check_name("profile.base_region", region, 63)?;
                        check_model("profile.model", &self.model)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The model named by the id of a geographic or global profile.
    pub fn id_model(&self) -> Option<&str> {
        match self.kind {
            ProfileKind::Application => None,
            _ => self.id.split_once('.').map(|(_, m)| m),
        }
    }

    /// The geography of a geographic profile.
    pub fn geography(&self) -> Option<&str> {
        match self.kind {
            ProfileKind::Geographic => self.id.split_once('.').map(|(g, _)| g),
            _ => None,
        }
    }

    /// Fills in derived fields so that stored objects are complete.
    pub fn normalize(&mut self) {
        if let Some(m) = self.id_model()
            && self.model.is_empty()
        {
            self.model = m.to_string();
        }
    }
}

impl RouteTable {
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.profile.is_empty() {
            return Err(invalid("route_table.profile", "must not be empty"));
        }
        check_name("route_table.source_region", &self.source_region, 63)?;
        if self.destinations.is_empty() {
            return Err(invalid(
                "route_table.destinations",
                "must name at least one region",
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, d) in self.destinations.iter().enumerate() {
            check_name(
                &format!("route_table.destinations[{i}].region"),
                &d.region,
                63,
            )?;
            if !seen.insert(&d.region) {
                return Err(invalid(
                    format!("route_table.destinations[{i}].region"),
                    format!("region `{}` is listed twice", d.region),
                ));
            }
            if !d.weight.is_finite() || d.weight < 0.0 {
                return Err(invalid(
                    format!("route_table.destinations[{i}].weight"),
                    format!("{} is not a finite, non-negative number", d.weight),
                ));
            }
        }
        if self.destinations.iter().all(|d| d.weight == 0.0) {
            return Err(invalid(
                "route_table.destinations",
                "every weight is zero; at least one destination needs a positive weight",
            ));
        }
        Ok(())
    }

    /// The store key suffix of a route table: `<profile>/<source-region>`.
    pub fn key(&self) -> (String, String) {
        (self.profile.clone(), self.source_region.clone())
    }

    /// The route table used where the operator set none: every destination
    /// with weight 1, the source region (when it is a destination) at
    /// priority 0 and the others at priority 1, so that calls stay in the
    /// source region first.
    pub fn default_for(profile: &str, source_region: &str, destinations: &[String]) -> RouteTable {
        let has_source = destinations.iter().any(|d| d == source_region);
        RouteTable {
            profile: profile.to_string(),
            source_region: source_region.to_string(),
            destinations: destinations
                .iter()
                .map(|d| RouteDestination {
                    region: d.clone(),
                    weight: 1.0,
                    priority: u32::from(has_source && d != source_region),
                })
                .collect(),
            revision: 0,
        }
    }
}

/// The whole configuration at one store revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    pub regions: BTreeMap<String, Region>,
    pub profiles: BTreeMap<String, Profile>,
    /// Keyed by (profile, source region).
    pub routes: BTreeMap<(String, String), RouteTable>,
    /// Keyed by their scope's id.
    pub quotas: BTreeMap<String, Quota>,
    pub tenants: BTreeMap<String, Tenant>,
    /// API keys (hashes only) by id.
    pub keys: BTreeMap<String, ApiKey>,
}

/// Checks an update's expected revision against the stored one. Updates must
/// name the revision they read, so that two admins cannot silently overwrite
/// each other; deletes may pass 0 to mean "whatever is there".
fn check_revision(
    kind: &'static str,
    name: &str,
    expected: i64,
    actual: i64,
    required: bool,
) -> Result<(), ModelError> {
    if expected == 0 {
        if required {
            return Err(invalid(
                format!("{kind}.revision"),
                "an update must name the revision it read; get the object first",
            ));
        }
        return Ok(());
    }
    if expected != actual {
        return Err(ModelError::Conflict {
            kind,
            name: name.to_string(),
            expected,
            actual,
        });
    }
    Ok(())
}

impl Catalog {
    /// Applies a change to a copy and keeps it only if the copy is valid, so
    /// that a refused write leaves the catalog as it was.
    fn commit(&mut self, change: impl FnOnce(&mut Catalog)) -> Result<(), ModelError> {
        let mut next = self.clone();
        change(&mut next);
        next.validate()?;
        *self = next;
        Ok(())
    }

    pub fn create_region(&mut self, region: Region) -> Result<(), ModelError> {
        region.validate()?;
        if self.regions.contains_key(&region.name) {
            return Err(ModelError::AlreadyExists {
                kind: "region",
                name: region.name,
            });
        }
        self.commit(|c| {
            c.regions.insert(region.name.clone(), region);
        })
    }

    pub fn update_region(&mut self, region: Region) -> Result<(), ModelError> {
        region.validate()?;
        let current = self.region(&region.name)?;
        check_revision(
            "region",
            &region.name,
            region.revision,
            current.revision,
            true,
        )?;
        self.commit(|c| {
            c.regions.insert(region.name.clone(), region);
        })
    }

    pub fn delete_region(&mut self, name: &str, revision: i64) -> Result<(), ModelError> {
        let current = self.region(name)?;
        check_revision("region", name, revision, current.revision, false)?;
        for p in self.profiles.values() {
            if p.destinations.iter().any(|d| d == name) || p.base_region.as_deref() == Some(name) {
                return Err(ModelError::InUse(format!(
                    "region `{name}` is used by profile `{}`; change or delete the profile first",
                    p.id
                )));
            }
        }
        for r in self.routes.values() {
            if r.source_region == name || r.destinations.iter().any(|d| d.region == name) {
                return Err(ModelError::InUse(format!(
                    "region `{name}` is used by the route table of `{}` for source `{}`; change or delete it first",
                    r.profile, r.source_region
                )));
            }
        }
        if let Some(q) = self.quotas.values().find(|q| {
            matches!(&q.scope, QuotaScope::ProfileInRegion { source_region, .. } if source_region == name)
        }) {
            return Err(ModelError::InUse(format!(
                "region `{name}` has quota `{}`; delete that first",
                q.scope.id()
            )));
        }
        if let Some(t) = self.tenants.values().find(|t| {
            t.policy.allow_regions.iter().any(|r| r == name)
                || t.policy.deny_regions.iter().any(|r| r == name)
        }) {
            return Err(ModelError::InUse(format!(
                "region `{name}` is named by the region policy of tenant `{}`; change that first",
                t.name
            )));
        }
        self.regions.remove(name);
        Ok(())
    }

    pub fn create_profile(&mut self, mut profile: Profile) -> Result<(), ModelError> {
        profile.validate()?;
        profile.normalize();
        if self.profiles.contains_key(&profile.id) {
            return Err(ModelError::AlreadyExists {
                kind: "profile",
                name: profile.id,
            });
        }
        self.commit(|c| {
            c.profiles.insert(profile.id.clone(), profile);
        })
    }

    pub fn update_profile(&mut self, mut profile: Profile) -> Result<(), ModelError> {
        profile.validate()?;
        profile.normalize();
        let current = self.profile(&profile.id)?;
        check_revision(
            "profile",
            &profile.id,
            profile.revision,
            current.revision,
            true,
        )?;
        self.commit(|c| {
            c.profiles.insert(profile.id.clone(), profile);
        })
    }

    /// Deletes a profile and its route tables; refused while an application
    /// profile still copies it.
    pub fn delete_profile(&mut self, id: &str, revision: i64) -> Result<(), ModelError> {
        let current = self.profile(id)?;
        check_revision("profile", id, revision, current.revision, false)?;
        if let Some(app) = self
            .profiles
            .values()
            .find(|p| p.base_profile.as_deref() == Some(id))
        {
            return Err(ModelError::InUse(format!(
                "profile `{id}` is copied by application profile `{}`; delete that first",
                app.id
            )));
        }
        if let Some(q) = self.quotas.values().find(|q| match &q.scope {
            QuotaScope::ProfileInRegion { profile, .. }
            | QuotaScope::TenantOnProfile { profile, .. } => profile == id,
            QuotaScope::Tenant { .. } => false,
        }) {
            return Err(ModelError::InUse(format!(
                "profile `{id}` has quota `{}`; delete that first",
                q.scope.id()
            )));
        }
        self.profiles.remove(id);
        self.routes.retain(|(p, _), _| p != id);
        Ok(())
    }

    pub fn create_route(&mut self, route: RouteTable) -> Result<(), ModelError> {
        route.validate()?;
        if self.routes.contains_key(&route.key()) {
            return Err(ModelError::AlreadyExists {
                kind: "route table",
                name: format!("{}/{}", route.profile, route.source_region),
            });
        }
        self.commit(|c| {
            c.routes.insert(route.key(), route);
        })
    }

    pub fn update_route(&mut self, route: RouteTable) -> Result<(), ModelError> {
        route.validate()?;
        let name = format!("{}/{}", route.profile, route.source_region);
        let current = self.route(&route.profile, &route.source_region)?;
        check_revision("route_table", &name, route.revision, current.revision, true)?;
        self.commit(|c| {
            c.routes.insert(route.key(), route);
        })
    }

    pub fn delete_route(
        &mut self,
        profile: &str,
        source: &str,
        revision: i64,
    ) -> Result<(), ModelError> {
        let current = self.route(profile, source)?;
        check_revision(
            "route_table",
            &format!("{profile}/{source}"),
            revision,
            current.revision,
            false,
        )?;
        self.routes
            .remove(&(profile.to_string(), source.to_string()));
        Ok(())
    }

    pub fn create_quota(&mut self, quota: Quota) -> Result<(), ModelError> {
        quota.validate()?;
        let id = quota.scope.id();
        if self.quotas.contains_key(&id) {
            return Err(ModelError::AlreadyExists {
                kind: "quota",
                name: id,
            });
        }
        self.commit(|c| {
            c.quotas.insert(id, quota);
        })
    }

    pub fn update_quota(&mut self, quota: Quota) -> Result<(), ModelError> {
        quota.validate()?;
        let id = quota.scope.id();
        let current = self.quota(&id)?;
        check_revision("quota", &id, quota.revision, current.revision, true)?;
        self.commit(|c| {
            c.quotas.insert(id, quota);
        })
    }

    pub fn delete_quota(&mut self, id: &str, revision: i64) -> Result<(), ModelError> {
        let current = self.quota(id)?;
        check_revision("quota", id, revision, current.revision, false)?;
        self.quotas.remove(id);
        Ok(())
    }

    pub fn create_tenant(&mut self, tenant: Tenant) -> Result<(), ModelError> {
        tenant.validate()?;
        if self.tenants.contains_key(&tenant.name) {
            return Err(ModelError::AlreadyExists {
                kind: "tenant",
                name: tenant.name,
            });
        }
        self.commit(|c| {
            c.tenants.insert(tenant.name.clone(), tenant);
        })
    }

    pub fn update_tenant(&mut self, tenant: Tenant) -> Result<(), ModelError> {
        tenant.validate()?;
        let current = self.tenant(&tenant.name)?;
        check_revision(
            "tenant",
            &tenant.name,
            tenant.revision,
            current.revision,
            true,
        )?;
        self.commit(|c| {
            c.tenants.insert(tenant.name.clone(), tenant);
        })
    }

    /// Deletes a tenant and its keys; refused while a quota names it.
    pub fn delete_tenant(&mut self, name: &str, revision: i64) -> Result<(), ModelError> {
        let current = self.tenant(name)?;
        check_revision("tenant", name, revision, current.revision, false)?;
        if let Some(q) = self.quotas.values().find(|q| match &q.scope {
            QuotaScope::TenantOnProfile { tenant, .. } | QuotaScope::Tenant { tenant } => {
                tenant == name
            }
            QuotaScope::ProfileInRegion { .. } => false,
        }) {
            return Err(ModelError::InUse(format!(
                "tenant `{name}` has quota `{}`; delete that first",
                q.scope.id()
            )));
        }
        self.tenants.remove(name);
        self.keys.retain(|_, k| k.tenant != name);
        Ok(())
    }

    pub fn tenant(&self, name: &str) -> Result<&Tenant, ModelError> {
        self.tenants.get(name).ok_or_else(|| ModelError::NotFound {
            kind: "tenant",
            name: name.to_string(),
        })
    }

    pub fn create_key(&mut self, key: ApiKey) -> Result<(), ModelError> {
        key.validate()?;
        if self.keys.contains_key(&key.id) {
            return Err(ModelError::AlreadyExists {
                kind: "key",
                name: key.id,
            });
        }
        self.commit(|c| {
            c.keys.insert(key.id.clone(), key);
        })
    }

    /// Revokes a key: it is gone from the store and, with the next push,
    /// from every agent.
    pub fn delete_key(&mut self, id: &str) -> Result<ApiKey, ModelError> {
        self.keys.remove(id).ok_or_else(|| ModelError::NotFound {
            kind: "key",
            name: id.to_string(),
        })
    }

    pub fn quota(&self, id: &str) -> Result<&Quota, ModelError> {
        self.quotas.get(id).ok_or_else(|| ModelError::NotFound {
            kind: "quota",
            name: id.to_string(),
        })
    }

    pub fn region(&self, name: &str) -> Result<&Region, ModelError> {
        self.regions.get(name).ok_or_else(|| ModelError::NotFound {
            kind: "region",
            name: name.to_string(),
        })
    }

    pub fn profile(&self, id: &str) -> Result<&Profile, ModelError> {
        self.profiles.get(id).ok_or_else(|| ModelError::NotFound {
            kind: "profile",
            name: id.to_string(),
        })
    }

    pub fn route(&self, profile: &str, source: &str) -> Result<&RouteTable, ModelError> {
        self.routes
            .get(&(profile.to_string(), source.to_string()))
            .ok_or_else(|| ModelError::NotFound {
                kind: "route table",
                name: format!("{profile}/{source}"),
            })
    }

    /// Checks every cross-object rule: regions exist, geographic profiles
    /// stay in their geography, application profiles copy something that
    /// exists, route tables fit their profile. Errors name the object and
    /// the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        for p in self.profiles.values() {
            self.validate_profile_refs(p)
                .map_err(|e| in_object(e, "profile", &p.id))?;
        }
        for t in self.tenants.values() {
            for (name, list) in [
                ("allow_regions", &t.policy.allow_regions),
                ("deny_regions", &t.policy.deny_regions),
            ] {
                for (i, r) in list.iter().enumerate() {
                    if !self.regions.contains_key(r) {
                        return Err(in_object(
                            invalid(
                                format!("tenant.policy.{name}[{i}]"),
                                format!("unknown region `{r}`"),
                            ),
                            "tenant",
                            &t.name,
                        ));
                    }
                }
            }
        }
        for k in self.keys.values() {
            if !self.tenants.contains_key(&k.tenant) {
                return Err(invalid(
                    "key.tenant",
                    format!("unknown tenant `{}`", k.tenant),
                ));
            }
        }
        for q in self.quotas.values() {
            self.validate_quota_refs(q)
                .map_err(|e| in_object(e, "quota", &q.scope.id()))?;
        }
        for r in self.routes.values() {
            self.validate_route_refs(r).map_err(|e| {
                in_object(
                    e,
                    "route table",
                    &format!("{}/{}", r.profile, r.source_region),
                )
            })?;
        }
        Ok(())
    }

    fn validate_profile_refs(&self, p: &Profile) -> Result<(), ModelError> {
        if let Some(geo) = p.geography()
            && !self.regions.values().any(|r| r.geography == geo)
        {
            return Err(invalid(
                "profile.id",
                format!("no region is in geography `{geo}`"),
            ));
        }
        for (i, d) in p.destinations.iter().enumerate() {
            let field = format!("profile.destinations[{i}]");
            let region = self
                .regions
                .get(d)
                .ok_or_else(|| invalid(&field, format!("unknown region `{d}`")))?;
            if let Some(geo) = p.geography()
                && region.geography != geo
            {
                return Err(invalid(
                    field,
                    format!(
                        "region `{d}` is in geography `{}`, outside `{geo}` of this geographic profile",
                        region.geography
                    ),
                ));
            }
        }
        if let Some(base) = &p.base_profile {
            let b = self.profiles.get(base).ok_or_else(|| {
                invalid(
                    "profile.base_profile",
                    format!("no profile `{base}` exists"),
                )
            })?;
            if b.kind == ProfileKind::Application {
                return Err(invalid(
                    "profile.base_profile",
                    format!(
                        "`{base}` is an application profile; copy a geographic or global profile"
                    ),
                ));
            }
        }
        if let Some(region) = &p.base_region
            && !self.regions.contains_key(region)
        {
            return Err(invalid(
                "profile.base_region",
                format!("unknown region `{region}`"),
            ));
        }
        Ok(())
    }

    fn validate_quota_refs(&self, q: &Quota) -> Result<(), ModelError> {
        match &q.scope {
            QuotaScope::ProfileInRegion {
                profile,
                source_region,
            } => {
                let p = self.profiles.get(profile).ok_or_else(|| {
                    invalid(
                        "quota.scope.profile",
                        format!("no profile `{profile}` exists"),
                    )
                })?;
                let r = self.regions.get(source_region).ok_or_else(|| {
                    invalid(
                        "quota.scope.source_region",
                        format!("unknown region `{source_region}`"),
                    )
                })?;
                if !self.callable_from(p, r) {
                    return Err(invalid(
                        "quota.scope.source_region",
                        format!("profile `{profile}` is not callable from `{source_region}`"),
                    ));
                }
                Ok(())
            }
            QuotaScope::TenantOnProfile { tenant, profile } => {
                self.check_quota_tenant(tenant)?;
                if !self.profiles.contains_key(profile) {
                    return Err(invalid(
                        "quota.scope.profile",
                        format!("no profile `{profile}` exists"),
                    ));
                }
                Ok(())
            }
            QuotaScope::Tenant { tenant } => self.check_quota_tenant(tenant),
        }
    }

    fn check_quota_tenant(&self, tenant: &str) -> Result<(), ModelError> {
        if self.tenants.contains_key(tenant) {
            Ok(())
        } else {
            Err(invalid(
                "quota.scope.tenant",
                format!("unknown tenant `{tenant}`"),
            ))
        }
    }

    fn validate_route_refs(&self, r: &RouteTable) -> Result<(), ModelError> {
        let p = self.profiles.get(&r.profile).ok_or_else(|| {
            invalid(
                "route_table.profile",
                format!("no profile `{}` exists", r.profile),
            )
        })?;
        if p.kind == ProfileKind::Application {
            return Err(invalid(
                "route_table.profile",
                format!(
                    "`{}` is an application profile; its calls follow the route tables of what it copies",
                    r.profile
                ),
            ));
        }
        let source = self.regions.get(&r.source_region).ok_or_else(|| {
            invalid(
                "route_table.source_region",
                format!("unknown region `{}`", r.source_region),
            )
        })?;
        if let Some(geo) = p.geography()
            && source.geography != geo
        {
            return Err(invalid(
                "route_table.source_region",
                format!(
                    "region `{}` is in geography `{}`; profile `{}` is callable only from `{geo}`",
                    r.source_region, source.geography, p.id
                ),
            ));
        }
        for (i, d) in r.destinations.iter().enumerate() {
            if !p.destinations.contains(&d.region) {
                return Err(invalid(
                    format!("route_table.destinations[{i}].region"),
                    format!(
                        "region `{}` is not a destination of profile `{}`",
                        d.region, p.id
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A profile with its model and destinations filled in from what it
    /// copies. Every profile of a valid catalog resolves.
    pub fn resolve(&self, id: &str) -> Result<ResolvedProfile, ModelError> {
        let p = self.profile(id)?;
        let (model, destinations) = match (&p.base_profile, &p.base_region) {
            (Some(base), _) => {
                let b = self.profile(base)?;
                (b.model.clone(), b.destinations.clone())
            }
            (None, Some(region)) => (p.model.clone(), vec![region.clone()]),
            (None, None) => (p.model.clone(), p.destinations.clone()),
        };
        Ok(ResolvedProfile {
            profile: p.clone(),
            model,
            destinations,
        })
    }

    /// Whether a client in `source` may call profile `p`: geographic
    /// profiles from their geography, global ones from anywhere, application
    /// profiles where what they copy is callable (a single-region copy from
    /// its own region).
    pub fn callable_from(&self, p: &Profile, source: &Region) -> bool {
        match p.kind {
            ProfileKind::Geographic => p.geography() == Some(source.geography.as_str()),
            ProfileKind::Global => true,
            ProfileKind::Application => match (&p.base_profile, &p.base_region) {
                (Some(base), _) => self
                    .profiles
                    .get(base)
                    .is_some_and(|b| self.callable_from(b, source)),
                (None, Some(region)) => region == &source.name,
                (None, None) => false,
            },
        }
    }

    /// The route table that calls of `profile` from `source` follow: the
    /// operator's, or the default one (source first). For an application
    /// profile it is the table of what it copies, under the profile's own id.
    pub fn route_for(&self, resolved: &ResolvedProfile, source: &str) -> RouteTable {
        let id = &resolved.profile.id;
        let table_owner = resolved.profile.base_profile.as_deref().unwrap_or(id);
        match self
            .routes
            .get(&(table_owner.to_string(), source.to_string()))
        {
            Some(t) => RouteTable {
                profile: id.clone(),
                ..t.clone()
            },
            None => RouteTable::default_for(id, source, &resolved.destinations),
        }
    }
}

fn in_object(e: ModelError, kind: &str, name: &str) -> ModelError {
    match e {
        ModelError::Invalid { field, reason } => ModelError::Invalid {
            field,
            reason: format!("{reason} (in {kind} `{name}`)"),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn region(name: &str, geo: &str) -> Region {
        Region {
            name: name.into(),
            geography: geo.into(),
            description: String::new(),
            revision: 0,
        }
    }

    pub(crate) fn profile(id: &str, dest: &[&str]) -> Profile {
        Profile {
            id: id.into(),
            kind: ProfileKind::from_id(id),
            model: String::new(),
            destinations: dest.iter().map(|s| s.to_string()).collect(),
            base_profile: None,
            base_region: None,
            tags: BTreeMap::new(),
            description: String::new(),
            revision: 0,
        }
    }

    fn app(id: &str, base: &str) -> Profile {
        Profile {
            base_profile: Some(base.into()),
            ..profile(id, &[])
        }
    }

    fn route(p: &str, src: &str, d: &[(&str, f64)]) -> RouteTable {
        RouteTable {
            profile: p.into(),
            source_region: src.into(),
            destinations: d
                .iter()
                .map(|(r, w)| RouteDestination {
                    region: r.to_string(),
                    weight: *w,
                    priority: 0,
                })
                .collect(),
            revision: 0,
        }
    }

    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        c.create_region(region("us-east", "us")).unwrap();
        c.create_region(region("us-west", "us")).unwrap();
        c.create_region(region("eu-west", "eu")).unwrap();
        c.create_profile(profile("us.llama-3.1-8b", &["us-east", "us-west"]))
            .unwrap();
        c.create_profile(profile(
            "global.llama-3.1-8b",
            &["us-east", "us-west", "eu-west"],
        ))
        .unwrap();
        c
    }

    fn field_of(e: ModelError) -> String {
        match e {
            ModelError::Invalid { field, .. } => field,
            other => panic!("expected an invalid-field error, got {other:?}"),
        }
    }

    #[test]
    fn rejects_malformed_region_names() {
        for bad in ["", "US-East", "us_east", "-us", "us-", "1us"] {
            let e = Catalog::default()
                .create_region(region(bad, "us"))
                .unwrap_err();
            assert_eq!(field_of(e), "region.name", "{bad:?}");
        }
        let e = Catalog::default()
            .create_region(region("x", "global"))
            .unwrap_err();
        assert_eq!(field_of(e), "region.geography");
    }

    #[test]
    fn derives_model_from_id() {
        let c = catalog();
        assert_eq!(c.profiles["us.llama-3.1-8b"].model, "llama-3.1-8b");
    }

    #[test]
    fn rejects_malformed_profile_ids() {
        let mut c = catalog();
        for (id, kind) in [
            ("", ProfileKind::Application),
            ("us.", ProfileKind::Geographic),
            ("US.llama", ProfileKind::Geographic),
            ("us.llama", ProfileKind::Global),
            ("my.app", ProfileKind::Application),
            ("global. x", ProfileKind::Global),
        ] {
            let p = Profile {
                kind,
                ..profile(id, &["us-east"])
            };
            let e = c.create_profile(p).unwrap_err();
            assert_eq!(field_of(e), "profile.id", "{id:?}");
        }
    }

    #[test]
    fn rejects_unknown_and_out_of_geography_destinations() {
        let mut c = catalog();
        let e = c
            .create_profile(profile("us.m", &["us-east", "ap-south"]))
            .unwrap_err();
        assert!(e.to_string().contains("profile.destinations[1]"), "{e}");
        assert!(e.to_string().contains("unknown region `ap-south`"), "{e}");
        let e = c.create_profile(profile("us.m", &["eu-west"])).unwrap_err();
        assert!(e.to_string().contains("outside `us`"), "{e}");
        let e = c.create_profile(profile("ap.m", &["us-east"])).unwrap_err();
        assert!(
            e.to_string().contains("no region is in geography `ap`"),
            "{e}"
        );
        let before = catalog();
        assert_eq!(c, before, "a rejected write changes nothing");
    }

    #[test]
    fn application_profiles_resolve_and_block_deletion_of_their_base() {
        let mut c = catalog();
        let e = c.create_profile(app("team-a", "us.nope")).unwrap_err();
        assert_eq!(field_of(e), "profile.base_profile");
        c.create_profile(app("team-a", "us.llama-3.1-8b")).unwrap();
        let e = c.create_profile(app("team-b", "team-a")).unwrap_err();
        assert_eq!(field_of(e), "profile.base_profile");
        let r = c.resolve("team-a").unwrap();
        assert_eq!(r.model, "llama-3.1-8b");
        assert_eq!(r.destinations, ["us-east", "us-west"]);
        let e = c.delete_profile("us.llama-3.1-8b", 0).unwrap_err();
        assert!(matches!(e, ModelError::InUse(_)), "{e:?}");
        assert!(c.profiles.contains_key("us.llama-3.1-8b"));
        c.delete_profile("team-a", 0).unwrap();
        c.delete_profile("us.llama-3.1-8b", 0).unwrap();
    }

    #[test]
    fn single_region_application_profile() {
        let mut c = catalog();
        let p = Profile {
            base_region: Some("eu-west".into()),
            model: "mistral-7b".into(),
            ..profile("eu-batch", &[])
        };
        c.create_profile(p).unwrap();
        let r = c.resolve("eu-batch").unwrap();
        assert_eq!(
            (r.model.as_str(), r.destinations.as_slice()),
            ("mistral-7b", &["eu-west".to_string()][..])
        );
        assert!(c.callable_from(&c.profiles["eu-batch"], &c.regions["eu-west"]));
        assert!(!c.callable_from(&c.profiles["eu-batch"], &c.regions["us-east"]));
        let e = c.delete_region("eu-west", 0).unwrap_err();
        assert!(matches!(e, ModelError::InUse(_)));
    }

    #[test]
    fn rejects_bad_weights() {
        let mut c = catalog();
        for (w, needle) in [
            (-1.0, "weight"),
            (f64::NAN, "weight"),
            (f64::INFINITY, "weight"),
        ] {
            let e = c
                .create_route(route("us.llama-3.1-8b", "us-east", &[("us-east", w)]))
                .unwrap_err();
            assert!(field_of(e).ends_with(needle));
        }
        let e = c
            .create_route(route(
                "us.llama-3.1-8b",
                "us-east",
                &[("us-east", 0.0), ("us-west", 0.0)],
            ))
            .unwrap_err();
        assert!(e.to_string().contains("every weight is zero"), "{e}");
        let e = c
            .create_route(route("us.llama-3.1-8b", "eu-west", &[("us-east", 1.0)]))
            .unwrap_err();
        assert_eq!(field_of(e), "route_table.source_region");
        let e = c
            .create_route(route("us.llama-3.1-8b", "us-east", &[("eu-west", 1.0)]))
            .unwrap_err();
        assert_eq!(field_of(e), "route_table.destinations[0].region");
        assert!(c.routes.is_empty());
    }

    #[test]
    fn updates_need_the_current_revision() {
        let mut c = catalog();
        c.regions.get_mut("us-east").unwrap().revision = 7;
        let mut r = region("us-east", "us");
        r.description = "new".into();
        let e = c.update_region(r.clone()).unwrap_err();
        assert_eq!(field_of(e), "region.revision");
        r.revision = 6;
        assert!(matches!(
            c.update_region(r.clone()),
            Err(ModelError::Conflict { actual: 7, .. })
        ));
        r.revision = 7;
        c.update_region(r).unwrap();
        assert_eq!(c.regions["us-east"].description, "new");
    }

    #[test]
    fn moving_a_region_out_of_a_geography_in_use_is_refused() {
        let mut c = catalog();
        let mut r = region("us-west", "eu");
        r.revision = 0;
        c.regions.get_mut("us-west").unwrap().revision = 3;
        r.revision = 3;
        let e = c.update_region(r).unwrap_err();
        assert!(e.to_string().contains("profile `us.llama-3.1-8b`"), "{e}");
    }

    #[test]
    fn default_route_puts_the_source_first() {
        let c = catalog();
        let r = c.resolve("global.llama-3.1-8b").unwrap();
        let t = c.route_for(&r, "us-west");
        let by_region: BTreeMap<_, _> = t
            .destinations
            .iter()
            .map(|d| (d.region.as_str(), d.priority))
            .collect();
        assert_eq!(by_region["us-west"], 0);
        assert_eq!(by_region["us-east"], 1);
        assert_eq!(by_region["eu-west"], 1);
    }

    #[test]
    fn deleting_a_profile_deletes_its_route_tables() {
        let mut c = catalog();
        c.create_route(route(
            "us.llama-3.1-8b",
            "us-east",
            &[("us-east", 3.0), ("us-west", 1.0)],
        ))
        .unwrap();
        c.delete_profile("us.llama-3.1-8b", 0).unwrap();
        assert!(c.routes.is_empty());
    }
}
