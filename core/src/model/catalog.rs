//! The catalog: the whole configuration at one store revision, and every rule that spans objects.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// The whole configuration at one store revision.
///
/// The maps are public for reading, and for building a catalog from the
/// store. The model's operations change them only through [`Catalog::put`]
/// and [`Catalog::remove`], which note each object they touch in the
/// journal while one is kept ([`Catalog::start_journal`]): what a change
/// touched is then known without comparing catalogs. A change made to the
/// maps directly is not journaled.
#[derive(Debug, Clone, Default)]
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
    /// The objects touched since the journal was started, when one is kept.
    journal: Option<Vec<Touched>>,
}

/// The journal is bookkeeping of how a catalog was reached, not content:
/// two catalogs with the same objects are equal.
impl PartialEq for Catalog {
    fn eq(&self, other: &Catalog) -> bool {
        let Catalog {
            regions,
            profiles,
            routes,
            quotas,
            tenants,
            keys,
            journal: _,
        } = self;
        *regions == other.regions
            && *profiles == other.profiles
            && *routes == other.routes
            && *quotas == other.quotas
            && *tenants == other.tenants
            && *keys == other.keys
    }
}

/// One catalog object, by kind and key in its map: what the journal
/// records.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Touched {
    Region(String),
    Profile(String),
    /// (profile, source region).
    Route(String, String),
    /// By its scope's id.
    Quota(String),
    Tenant(String),
    Key(String),
}

/// A kind of catalog object: which map of the catalog keeps it, and how
/// the journal names one.
trait Record: Sized {
    type Key: Ord + Clone;
    fn map(catalog: &mut Catalog) -> &mut BTreeMap<Self::Key, Self>;
    fn touched(key: &Self::Key) -> Touched;
}

macro_rules! record {
    ($($kind:ty => $map:ident[$key:ty] as $touched:ident),* $(,)?) => {$(
        impl Record for $kind {
            type Key = $key;
            fn map(catalog: &mut Catalog) -> &mut BTreeMap<$key, $kind> {
                &mut catalog.$map
            }
            fn touched(key: &$key) -> Touched {
                Touched::$touched(key.clone())
            }
        }
    )*};
}

record! {
    Region => regions[String] as Region,
    Profile => profiles[String] as Profile,
    Quota => quotas[String] as Quota,
    Tenant => tenants[String] as Tenant,
    ApiKey => keys[String] as Key,
}

impl Record for RouteTable {
    type Key = (String, String);
    fn map(catalog: &mut Catalog) -> &mut BTreeMap<(String, String), RouteTable> {
        &mut catalog.routes
    }
    fn touched((profile, source): &(String, String)) -> Touched {
        Touched::Route(profile.clone(), source.clone())
    }
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
    /// Starts a journal of the objects the model's operations touch,
    /// dropping any earlier one.
    pub fn start_journal(&mut self) {
        self.journal = Some(Vec::new());
    }

    /// Ends the journal: each object put or removed since
    /// [`Catalog::start_journal`], once, except those of a refused
    /// operation (which undoes itself). `None` when no journal was kept.
    pub fn take_journal(&mut self) -> Option<BTreeSet<Touched>> {
        self.journal.take().map(|j| j.into_iter().collect())
    }

    /// Puts `value` at `key`, noting it in the journal. With
    /// [`Catalog::remove`], the only way the operations change a map.
    fn put<V: Record>(&mut self, key: V::Key, value: V) -> Option<V> {
        if let Some(j) = &mut self.journal {
            j.push(V::touched(&key));
        }
        V::map(self).insert(key, value)
    }

    /// Removes what is at `key`, noting it in the journal if it was there.
    fn remove<V: Record>(&mut self, key: &V::Key) -> Option<V> {
        let old = V::map(self).remove(key);
        if old.is_some()
            && let Some(j) = &mut self.journal
        {
            j.push(V::touched(key));
        }
        old
    }

    /// Puts `value` at `key`, then checks what the change can break
    /// (`check`: the object itself and what refers to it, not the whole
    /// catalog); a refused change is undone, journal included, so that the
    /// catalog is as it was. A write costs what it touches.
    fn commit<V: Record>(
        &mut self,
        key: V::Key,
        value: V,
        check: impl FnOnce(&Catalog) -> Result<(), ModelError>,
    ) -> Result<(), ModelError> {
        let mark = self.journal.as_ref().map(Vec::len);
        let old = self.put(key.clone(), value);
        if let Err(e) = check(self) {
            match old {
                Some(v) => V::map(self).insert(key, v),
                None => V::map(self).remove(&key),
            };
            if let (Some(j), Some(mark)) = (&mut self.journal, mark) {
                j.truncate(mark);
            }
            return Err(e);
        }
        Ok(())
    }

    /// What a profile's change can break: the profile's own references,
    /// the application profiles that copy it, the quotas on it or on
    /// those copies (callable from where?), and its route tables; in the
    /// order [`Catalog::validate`] reports them.
    fn validate_around_profile(&self, id: &str) -> Result<(), ModelError> {
        let copies: Vec<&Profile> = self
            .profiles
            .values()
            .filter(|p| p.base_profile.as_deref() == Some(id))
            .collect();
        for p in self
            .profiles
            .get(id)
            .into_iter()
            .chain(copies.iter().copied())
        {
            self.validate_profile_refs(p)
                .map_err(|e| in_object(e, "profile", &p.id))?;
        }
        let names = |profile: &str| profile == id || copies.iter().any(|c| c.id == profile);
        for q in self.quotas.values() {
            let on = match &q.scope {
                QuotaScope::ProfileInRegion { profile, .. }
                | QuotaScope::TenantOnProfile { profile, .. } => names(profile),
                QuotaScope::Tenant { .. } => false,
            };
            if on {
                self.validate_quota_refs(q)
                    .map_err(|e| in_object(e, "quota", &q.scope.id()))?;
            }
        }
        for r in self
            .routes
            .range((id.to_string(), String::new())..)
            .take_while(|((p, _), _)| p == id)
            .map(|(_, r)| r)
        {
            self.validate_route(r)?;
        }
        Ok(())
    }

    fn validate_route(&self, r: &RouteTable) -> Result<(), ModelError> {
        self.validate_route_refs(r).map_err(|e| {
            in_object(
                e,
                "route table",
                &format!("{}/{}", r.profile, r.source_region),
            )
        })
    }

    fn validate_tenant_refs(&self, t: &Tenant) -> Result<(), ModelError> {
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
        Ok(())
    }

    fn validate_key_refs(&self, k: &ApiKey) -> Result<(), ModelError> {
        if !self.tenants.contains_key(&k.tenant) {
            return Err(invalid(
                "key.tenant",
                format!("unknown tenant `{}`", k.tenant),
            ));
        }
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
        // A new region breaks nothing.
        self.commit(region.name.clone(), region, |_| Ok(()))
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
        // Only a region's geography matters to other objects: when it
        // moves (rare), everything is checked.
        let moved = current.geography != region.geography;
        self.commit(region.name.clone(), region, |c| {
            if moved { c.validate() } else { Ok(()) }
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
        self.remove::<Region>(&name.to_string());
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
        let id = profile.id.clone();
        self.commit(id.clone(), profile, |c| c.validate_around_profile(&id))
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
        let id = profile.id.clone();
        self.commit(id.clone(), profile, |c| c.validate_around_profile(&id))
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
        self.remove::<Profile>(&id.to_string());
        let tables: Vec<(String, String)> = self
            .routes
            .range((id.to_string(), String::new())..)
            .take_while(|((p, _), _)| p == id)
            .map(|(key, _)| key.clone())
            .collect();
        for key in &tables {
            self.remove::<RouteTable>(key);
        }
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
        let key = route.key();
        self.commit(key.clone(), route, |c| c.validate_route(&c.routes[&key]))
    }

    pub fn update_route(&mut self, route: RouteTable) -> Result<(), ModelError> {
        route.validate()?;
        let name = format!("{}/{}", route.profile, route.source_region);
        let current = self.route(&route.profile, &route.source_region)?;
        check_revision("route_table", &name, route.revision, current.revision, true)?;
        let key = route.key();
        self.commit(key.clone(), route, |c| c.validate_route(&c.routes[&key]))
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
        self.remove::<RouteTable>(&(profile.to_string(), source.to_string()));
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
        self.commit(id.clone(), quota, |c| {
            c.validate_quota_refs(&c.quotas[&id])
                .map_err(|e| in_object(e, "quota", &id))
        })
    }

    pub fn update_quota(&mut self, quota: Quota) -> Result<(), ModelError> {
        quota.validate()?;
        let id = quota.scope.id();
        let current = self.quota(&id)?;
        check_revision("quota", &id, quota.revision, current.revision, true)?;
        self.commit(id.clone(), quota, |c| {
            c.validate_quota_refs(&c.quotas[&id])
                .map_err(|e| in_object(e, "quota", &id))
        })
    }

    pub fn delete_quota(&mut self, id: &str, revision: i64) -> Result<(), ModelError> {
        let current = self.quota(id)?;
        check_revision("quota", id, revision, current.revision, false)?;
        self.remove::<Quota>(&id.to_string());
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
        let name = tenant.name.clone();
        self.commit(name.clone(), tenant, |c| {
            c.validate_tenant_refs(&c.tenants[&name])
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
        let name = tenant.name.clone();
        self.commit(name.clone(), tenant, |c| {
            c.validate_tenant_refs(&c.tenants[&name])
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
        self.remove::<Tenant>(&name.to_string());
        let keys: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, k)| k.tenant == name)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &keys {
            self.remove::<ApiKey>(id);
        }
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
        let id = key.id.clone();
        self.commit(id.clone(), key, |c| c.validate_key_refs(&c.keys[&id]))
    }

    /// Revokes a key: it is gone from the store and, with the next push,
    /// from every agent.
    pub fn delete_key(&mut self, id: &str) -> Result<ApiKey, ModelError> {
        self.remove::<ApiKey>(&id.to_string())
            .ok_or_else(|| ModelError::NotFound {
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
            self.validate_tenant_refs(t)?;
        }
        for k in self.keys.values() {
            self.validate_key_refs(k)?;
        }
        for q in self.quotas.values() {
            self.validate_quota_refs(q)
                .map_err(|e| in_object(e, "quota", &q.scope.id()))?;
        }
        for r in self.routes.values() {
            self.validate_route(r)?;
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
