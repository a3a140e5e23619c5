//! Conversions between the domain model and the generated protobuf types.
//! This module is the only place where the two meet.

use crate::pb;
use spillway_core::model::{
    ApiKey, ModelError, Profile, ProfileKind, Quota, QuotaScope, Region, RegionPolicy,
    RouteDestination, RouteTable, Tenant,
};

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl From<pb::Region> for Region {
    fn from(r: pb::Region) -> Self {
        Region {
            name: r.name,
            geography: r.geography,
            description: r.description,
            revision: r.revision,
        }
    }
}

impl From<Region> for pb::Region {
    fn from(r: Region) -> Self {
        pb::Region {
            name: r.name,
            geography: r.geography,
            description: r.description,
            revision: r.revision,
        }
    }
}

impl From<pb::InferenceProfile> for Profile {
    /// An unspecified kind is taken from the id's shape, so that clients may
    /// leave it out.
    fn from(p: pb::InferenceProfile) -> Self {
        let kind = match pb::ProfileKind::try_from(p.kind).unwrap_or_default() {
            pb::ProfileKind::Geographic => ProfileKind::Geographic,
            pb::ProfileKind::Global => ProfileKind::Global,
            pb::ProfileKind::Application => ProfileKind::Application,
            pb::ProfileKind::Unspecified => ProfileKind::from_id(&p.id),
        };
        Profile {
            id: p.id,
            kind,
            model: p.model,
            destinations: p.destinations,
            base_profile: non_empty(p.base_profile),
            base_region: non_empty(p.base_region),
            tags: p.tags.into_iter().collect(),
            description: p.description,
            revision: p.revision,
        }
    }
}

impl From<ProfileKind> for pb::ProfileKind {
    fn from(k: ProfileKind) -> Self {
        match k {
            ProfileKind::Geographic => pb::ProfileKind::Geographic,
            ProfileKind::Global => pb::ProfileKind::Global,
            ProfileKind::Application => pb::ProfileKind::Application,
        }
    }
}

impl From<Profile> for pb::InferenceProfile {
    fn from(p: Profile) -> Self {
        pb::InferenceProfile {
            id: p.id,
            kind: pb::ProfileKind::from(p.kind).into(),
            model: p.model,
            destinations: p.destinations,
            base_profile: p.base_profile.unwrap_or_default(),
            base_region: p.base_region.unwrap_or_default(),
            tags: p.tags.into_iter().collect(),
            description: p.description,
            revision: p.revision,
        }
    }
}

impl From<pb::RouteTable> for RouteTable {
    fn from(t: pb::RouteTable) -> Self {
        RouteTable {
            profile: t.profile,
            source_region: t.source_region,
            destinations: t
                .destinations
                .into_iter()
                .map(|d| RouteDestination {
                    region: d.region,
                    weight: d.weight,
                    priority: d.priority,
                })
                .collect(),
            ttft_objective_ms: (t.ttft_objective_ms > 0).then_some(t.ttft_objective_ms),
            revision: t.revision,
        }
    }
}

impl From<RouteTable> for pb::RouteTable {
    fn from(t: RouteTable) -> Self {
        pb::RouteTable {
            profile: t.profile,
            source_region: t.source_region,
            destinations: t
                .destinations
                .into_iter()
                .map(|d| pb::RouteDestination {
                    region: d.region,
                    weight: d.weight,
                    priority: d.priority,
                })
                .collect(),
            ttft_objective_ms: t.ttft_objective_ms.unwrap_or(0),
            revision: t.revision,
        }
    }
}

impl TryFrom<pb::Quota> for Quota {
    type Error = ModelError;

    /// The scope's shape is checked here; what it names, by the catalog.
    fn try_from(q: pb::Quota) -> Result<Self, ModelError> {
        let s = q.scope.unwrap_or_default();
        let scope = match (
            s.profile.is_empty(),
            s.source_region.is_empty(),
            s.tenant.is_empty(),
        ) {
            (false, false, true) => QuotaScope::ProfileInRegion {
                profile: s.profile,
                source_region: s.source_region,
            },
            (false, true, false) => QuotaScope::TenantOnProfile {
                tenant: s.tenant,
                profile: s.profile,
            },
            (true, true, false) => QuotaScope::Tenant { tenant: s.tenant },
            _ => {
                return Err(ModelError::Invalid {
                    field: "quota.scope".into(),
                    reason:
                        "name a profile and a source region, a tenant and a profile, or a tenant"
                            .into(),
                });
            }
        };
        Ok(Quota {
            scope,
            requests_per_minute: q.requests_per_minute,
            tokens_per_minute: q.tokens_per_minute,
            tokens_per_day: q.tokens_per_day,
            output_burndown: q.output_burndown.unwrap_or(1.0),
            revision: q.revision,
        })
    }
}

impl From<Quota> for pb::Quota {
    fn from(q: Quota) -> Self {
        let id = q.scope.id();
        let scope = match q.scope {
            QuotaScope::ProfileInRegion {
                profile,
                source_region,
            } => pb::QuotaScope {
                profile,
                source_region,
                tenant: String::new(),
            },
            QuotaScope::TenantOnProfile { tenant, profile } => pb::QuotaScope {
                profile,
                source_region: String::new(),
                tenant,
            },
            QuotaScope::Tenant { tenant } => pb::QuotaScope {
                tenant,
                ..Default::default()
            },
        };
        pb::Quota {
            scope: Some(scope),
            requests_per_minute: q.requests_per_minute,
            tokens_per_minute: q.tokens_per_minute,
            tokens_per_day: q.tokens_per_day,
            output_burndown: Some(q.output_burndown),
            id,
            revision: q.revision,
        }
    }
}

impl From<pb::RegionPolicy> for RegionPolicy {
    fn from(p: pb::RegionPolicy) -> Self {
        RegionPolicy {
            allow_regions: p.allow_regions,
            deny_regions: p.deny_regions,
            allow_geographies: p.allow_geographies,
            deny_geographies: p.deny_geographies,
        }
    }
}

impl From<RegionPolicy> for pb::RegionPolicy {
    fn from(p: RegionPolicy) -> Self {
        pb::RegionPolicy {
            allow_regions: p.allow_regions,
            deny_regions: p.deny_regions,
            allow_geographies: p.allow_geographies,
            deny_geographies: p.deny_geographies,
        }
    }
}

impl From<pb::Tenant> for Tenant {
    fn from(t: pb::Tenant) -> Self {
        Tenant {
            name: t.name,
            description: t.description,
            profiles: t.profiles,
            policy: t.policy.map(Into::into).unwrap_or_default(),
            revision: t.revision,
        }
    }
}

impl From<Tenant> for pb::Tenant {
    fn from(t: Tenant) -> Self {
        pb::Tenant {
            name: t.name,
            description: t.description,
            profiles: t.profiles,
            policy: Some(t.policy.into()),
            revision: t.revision,
        }
    }
}

impl From<pb::ApiKey> for ApiKey {
    fn from(k: pb::ApiKey) -> Self {
        ApiKey {
            id: k.id,
            tenant: k.tenant,
            hash: k.hash,
            description: k.description,
            created_at_unix: k.created_at_unix,
            revision: k.revision,
        }
    }
}

impl From<ApiKey> for pb::ApiKey {
    fn from(k: ApiKey) -> Self {
        pb::ApiKey {
            id: k.id,
            tenant: k.tenant,
            hash: k.hash,
            description: k.description,
            created_at_unix: k.created_at_unix,
            revision: k.revision,
        }
    }
}
