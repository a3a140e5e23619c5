//! `AdminService`: validated create/get/list/update/delete of regions,
//! profiles, route tables, quotas and tenants, tenants' API keys, and the
//! list of connected agents.
//!
//! The handlers share one shape per verb (`Admin::put`, `get`, `list` and
//! `delete`, generic over the `Kind` of object); each handler says only
//! which catalog call it makes and what it logs.

use spillway_core::model::{
    ApiKey, Catalog, ModelError, Profile, Quota, Region, RouteTable, Tenant,
};
use spillway_core::tenant::new_key;
use spillway_proto::pb::{self, admin_service_server::AdminService};
use tonic::{Request, Response, Status};

use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

use crate::catalog_store::Catalogs;
use crate::error::{missing, model_status, store_status};
use crate::keys::{self, Object};
use crate::state::State;
use crate::store::Store;

#[derive(Clone)]
pub struct Admin {
    store: Store,
    /// The catalog as this replica follows it: reads and writes start
    /// there (see `catalog_store`).
    catalogs: Catalogs,
    /// How long without a load report makes a region silent (as the
    /// leader counts it), for `ExplainRoute`.
    silence: std::time::Duration,
}

impl Admin {
    pub fn new(
        store: Store,
        state: watch::Receiver<Arc<State>>,
        silence: std::time::Duration,
    ) -> Self {
        Admin {
            catalogs: Catalogs::new(store.clone(), state),
            store,
            silence,
        }
    }

    /// The replica's state once it holds every catalog write committed
    /// before the call.
    async fn read(&self) -> Result<Arc<State>, Status> {
        Ok(self.catalogs.load().await?)
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// A request's object that it may not leave out.
fn required<T>(field: Option<T>, name: &str) -> Result<T, Status> {
    field.ok_or_else(|| missing(name))
}

/// What the handlers below share for a kind of catalog object: its
/// protobuf form, where the catalog keeps it and under which key, and its
/// list response.
trait Kind: Clone + Into<Self::Proto> {
    type Proto;
    type Key: PageKey;
    type List;
    /// Its key in the catalog's map of its kind.
    fn catalog_key(&self) -> Self::Key;
    fn all(catalog: &Catalog) -> &BTreeMap<Self::Key, Self>;
    /// A list call's answer: one page, the revision it was read at, and
    /// the next page's token.
    fn list(items: Vec<Self::Proto>, revision: i64, next_page_token: String) -> Self::List;
}

/// Implements [`Kind`] for a domain type, as
/// `kind!(Type => pb::Type, catalog.map[Key] by |object| key, pb::ListResponse { items })`.
macro_rules! kind {
    (
        $kind:ty => $proto:ty,
        catalog.$map:ident[$key:ty] by |$o:ident| $of:expr,
        $list:path { $items:ident }
    ) => {
        impl Kind for $kind {
            type Proto = $proto;
            type Key = $key;
            type List = $list;
            fn catalog_key(&self) -> $key {
                let $o = self;
                $of
            }
            fn all(catalog: &Catalog) -> &BTreeMap<$key, Self> {
                &catalog.$map
            }
            fn list(items: Vec<$proto>, revision: i64, next_page_token: String) -> $list {
                $list {
                    $items: items,
                    revision,
                    next_page_token,
                }
            }
        }
    };
}

kind!(Region => pb::Region, catalog.regions[String] by |r| r.name.clone(),
    pb::ListRegionsResponse { regions });
kind!(Profile => pb::InferenceProfile, catalog.profiles[String] by |p| p.id.clone(),
    pb::ListProfilesResponse { profiles });
kind!(RouteTable => pb::RouteTable, catalog.routes[(String, String)] by |t| t.key(),
    pb::ListRouteTablesResponse { route_tables });
kind!(Quota => pb::Quota, catalog.quotas[String] by |q| q.scope.id(),
    pb::ListQuotasResponse { quotas });
kind!(Tenant => pb::Tenant, catalog.tenants[String] by |t| t.name.clone(),
    pb::ListTenantsResponse { tenants });
kind!(ApiKey => pb::ApiKey, catalog.keys[String] by |k| k.id.clone(),
    pb::ListKeysResponse { keys });

/// The shared shape of the handlers: each says only which catalog call it
/// makes and what it logs.
impl Admin {
    /// Writes `object` with `op` (a create or an update) and returns it as
    /// written, with its new revision.
    async fn write_object<T: Kind>(
        &self,
        object: T,
        op: impl Fn(&mut Catalog, T) -> Result<(), ModelError>,
    ) -> Result<T, Status> {
        let key = object.catalog_key();
        let (written, _) = self
            .catalogs
            .write(|c| op(c, object.clone()), |(), c| T::all(c)[&key].clone())
            .await?;
        Ok(written)
    }

    /// [`Admin::write_object`], then `log`, then the object as written.
    async fn put<T: Kind>(
        &self,
        object: T,
        op: impl Fn(&mut Catalog, T) -> Result<(), ModelError>,
        log: impl FnOnce(&T),
    ) -> Reply<T::Proto> {
        let written = self.write_object(object, op).await?;
        log(&written);
        Ok(Response::new(written.into()))
    }

    /// The object `find` finds in the replica's catalog.
    async fn get<T: Kind>(
        &self,
        find: impl FnOnce(&Catalog) -> Result<&T, ModelError>,
    ) -> Reply<T::Proto> {
        let st = self.read().await?;
        let found = find(&st.catalog).map_err(model_status)?;
        Ok(Response::new(found.clone().into()))
    }

    /// One page of the objects of a kind that pass `keep` (see [`page`]).
    async fn list<T: Kind>(
        &self,
        size: i32,
        token: &str,
        keep: impl Fn(&T) -> bool,
    ) -> Reply<T::List> {
        let st = self.read().await?;
        let (page, next_page_token) = page(T::all(&st.catalog), size, token, keep)?;
        let items = page.into_iter().map(|o| o.clone().into()).collect();
        Ok(Response::new(T::list(items, st.revision, next_page_token)))
    }

    /// Deletes with `op`, then `log`s what `op` returned, and answers the
    /// commit's revision.
    async fn delete<R>(
        &self,
        op: impl Fn(&mut Catalog) -> Result<R, ModelError>,
        log: impl FnOnce(R),
    ) -> Reply<pb::DeleteResponse> {
        let (gone, revision) = self.catalogs.write(op, |gone, _| gone).await?;
        log(gone);
        Ok(Response::new(pb::DeleteResponse { revision }))
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_region(&self, req: Request<pb::CreateRegionRequest>) -> Reply<pb::Region> {
        let region: Region = required(req.into_inner().region, "region")?.into();
        self.put(region, Catalog::create_region, |r| {
            tracing::info!(region = %r.name, "region created");
        })
        .await
    }

    async fn get_region(&self, req: Request<pb::GetRegionRequest>) -> Reply<pb::Region> {
        let name = req.into_inner().name;
        self.get(|c| c.region(&name)).await
    }

    async fn list_regions(
        &self,
        req: Request<pb::ListRegionsRequest>,
    ) -> Reply<pb::ListRegionsResponse> {
        let req = req.into_inner();
        self.list(req.page_size, &req.page_token, |_: &Region| true)
            .await
    }

    async fn update_region(&self, req: Request<pb::UpdateRegionRequest>) -> Reply<pb::Region> {
        let region: Region = required(req.into_inner().region, "region")?.into();
        self.put(region, Catalog::update_region, |r| {
            tracing::info!(region = %r.name, "region updated");
        })
        .await
    }

    async fn delete_region(
        &self,
        req: Request<pb::DeleteRegionRequest>,
    ) -> Reply<pb::DeleteResponse> {
        let req = req.into_inner();
        self.delete(
            |c| c.delete_region(&req.name, req.revision),
            |()| tracing::info!(region = %req.name, "region deleted"),
        )
        .await
    }

    async fn create_profile(
        &self,
        req: Request<pb::CreateProfileRequest>,
    ) -> Reply<pb::InferenceProfile> {
        let profile: Profile = required(req.into_inner().profile, "profile")?.into();
        self.put(profile, Catalog::create_profile, |p| {
            tracing::info!(profile = %p.id, "profile created");
        })
        .await
    }

    async fn get_profile(
        &self,
        req: Request<pb::GetProfileRequest>,
    ) -> Reply<pb::InferenceProfile> {
        let id = req.into_inner().id;
        self.get(|c| c.profile(&id)).await
    }

    async fn list_profiles(
        &self,
        req: Request<pb::ListProfilesRequest>,
    ) -> Reply<pb::ListProfilesResponse> {
        let req = req.into_inner();
        self.list(req.page_size, &req.page_token, |_: &Profile| true)
            .await
    }

    async fn update_profile(
        &self,
        req: Request<pb::UpdateProfileRequest>,
    ) -> Reply<pb::InferenceProfile> {
        let profile: Profile = required(req.into_inner().profile, "profile")?.into();
        self.put(profile, Catalog::update_profile, |p| {
            tracing::info!(profile = %p.id, "profile updated");
        })
        .await
    }

    async fn delete_profile(
        &self,
        req: Request<pb::DeleteProfileRequest>,
    ) -> Reply<pb::DeleteResponse> {
        let req = req.into_inner();
        self.delete(
            |c| c.delete_profile(&req.id, req.revision),
            |()| tracing::info!(profile = %req.id, "profile deleted"),
        )
        .await
    }

    async fn create_route_table(
        &self,
        req: Request<pb::CreateRouteTableRequest>,
    ) -> Reply<pb::RouteTable> {
        let table: RouteTable = required(req.into_inner().route_table, "route_table")?.into();
        self.put(table, Catalog::create_route, |t| {
            tracing::info!(
                profile = %t.profile,
                source = %t.source_region,
                "route table created"
            );
        })
        .await
    }

    async fn get_route_table(
        &self,
        req: Request<pb::GetRouteTableRequest>,
    ) -> Reply<pb::RouteTable> {
        let req = req.into_inner();
        self.get(|c| c.route(&req.profile, &req.source_region))
            .await
    }

    async fn list_route_tables(
        &self,
        req: Request<pb::ListRouteTablesRequest>,
    ) -> Reply<pb::ListRouteTablesResponse> {
        let req = req.into_inner();
        self.list(req.page_size, &req.page_token, |t: &RouteTable| {
            req.profile.is_empty() || t.profile == req.profile
        })
        .await
    }

    async fn update_route_table(
        &self,
        req: Request<pb::UpdateRouteTableRequest>,
    ) -> Reply<pb::RouteTable> {
        let table: RouteTable = required(req.into_inner().route_table, "route_table")?.into();
        self.put(table, Catalog::update_route, |t| {
            tracing::info!(
                profile = %t.profile,
                source = %t.source_region,
                "route table updated"
            );
        })
        .await
    }

    async fn delete_route_table(
        &self,
        req: Request<pb::DeleteRouteTableRequest>,
    ) -> Reply<pb::DeleteResponse> {
        let req = req.into_inner();
        self.delete(
            |c| c.delete_route(&req.profile, &req.source_region, req.revision),
            |()| {
                tracing::info!(
                    profile = %req.profile,
                    source = %req.source_region,
                    "route table deleted"
                );
            },
        )
        .await
    }

    async fn create_quota(&self, req: Request<pb::CreateQuotaRequest>) -> Reply<pb::Quota> {
        let quota: Quota = required(req.into_inner().quota, "quota")?
            .try_into()
            .map_err(model_status)?;
        self.put(quota, Catalog::create_quota, |q| {
            tracing::info!(quota = %q.scope.id(), "quota created");
        })
        .await
    }

    async fn get_quota(&self, req: Request<pb::GetQuotaRequest>) -> Reply<pb::Quota> {
        let id = req.into_inner().id;
        self.get(|c| c.quota(&id)).await
    }

    async fn list_quotas(
        &self,
        req: Request<pb::ListQuotasRequest>,
    ) -> Reply<pb::ListQuotasResponse> {
        let req = req.into_inner();
        self.list(req.page_size, &req.page_token, |_: &Quota| true)
            .await
    }

    async fn update_quota(&self, req: Request<pb::UpdateQuotaRequest>) -> Reply<pb::Quota> {
        let quota: Quota = required(req.into_inner().quota, "quota")?
            .try_into()
            .map_err(model_status)?;
        self.put(quota, Catalog::update_quota, |q| {
            tracing::info!(quota = %q.scope.id(), "quota updated");
        })
        .await
    }

    async fn delete_quota(
        &self,
        req: Request<pb::DeleteQuotaRequest>,
    ) -> Reply<pb::DeleteResponse> {
        let req = req.into_inner();
        self.delete(
            |c| c.delete_quota(&req.id, req.revision),
            |()| tracing::info!(quota = %req.id, "quota deleted"),
        )
        .await
    }

    async fn create_tenant(&self, req: Request<pb::CreateTenantRequest>) -> Reply<pb::Tenant> {
        let tenant: Tenant = required(req.into_inner().tenant, "tenant")?.into();
        self.put(tenant, Catalog::create_tenant, |t| {
            tracing::info!(tenant = %t.name, "tenant created");
        })
        .await
    }

    async fn get_tenant(&self, req: Request<pb::GetTenantRequest>) -> Reply<pb::Tenant> {
        let name = req.into_inner().name;
        self.get(|c| c.tenant(&name)).await
    }

    async fn list_tenants(
        &self,
        req: Request<pb::ListTenantsRequest>,
    ) -> Reply<pb::ListTenantsResponse> {
        let req = req.into_inner();
        self.list(req.page_size, &req.page_token, |_: &Tenant| true)
            .await
    }

    async fn update_tenant(&self, req: Request<pb::UpdateTenantRequest>) -> Reply<pb::Tenant> {
        let tenant: Tenant = required(req.into_inner().tenant, "tenant")?.into();
        self.put(tenant, Catalog::update_tenant, |t| {
            tracing::info!(tenant = %t.name, "tenant updated");
        })
        .await
    }

    async fn delete_tenant(
        &self,
        req: Request<pb::DeleteTenantRequest>,
    ) -> Reply<pb::DeleteResponse> {
        let req = req.into_inner();
        self.delete(
            |c| c.delete_tenant(&req.name, req.revision),
            |()| tracing::info!(tenant = %req.name, "tenant deleted with its keys"),
        )
        .await
    }

    async fn create_key(&self, req: Request<pb::CreateKeyRequest>) -> Reply<pb::CreateKeyResponse> {
        let req = req.into_inner();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let (record, secret) = new_key(&req.tenant, &req.description, now);
        if !req.tenant.is_empty() {
            // A clearer answer than the key's own check would give.
            self.read()
                .await?
                .catalog
                .tenant(&req.tenant)
                .map_err(model_status)?;
        }
        let key = self.write_object(record, Catalog::create_key).await?;
        tracing::info!(key = %key.id, tenant = %req.tenant, "API key created");
        Ok(Response::new(pb::CreateKeyResponse {
            key: Some(key.into()),
            secret,
        }))
    }

    async fn list_keys(&self, req: Request<pb::ListKeysRequest>) -> Reply<pb::ListKeysResponse> {
        let req = req.into_inner();
        self.list(req.page_size, &req.page_token, |k: &ApiKey| {
            req.tenant.is_empty() || k.tenant == req.tenant
        })
        .await
    }

    async fn revoke_key(&self, req: Request<pb::RevokeKeyRequest>) -> Reply<pb::DeleteResponse> {
        let id = req.into_inner().id;
        self.delete(
            |c| c.delete_key(&id),
            |gone| tracing::info!(key = %id, tenant = %gone.tenant, "API key revoked"),
        )
        .await
    }

    async fn explain_route(
        &self,
        req: Request<pb::ExplainRouteRequest>,
    ) -> Reply<pb::ExplainRouteResponse> {
        Ok(Response::new(self.explain(req.into_inner()).await?))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Reply<pb::ListAgentsResponse> {
        let region = req.into_inner().region;
        let prefix = if region.is_empty() {
            keys::AGENTS.to_string()
        } else {
            format!("{}{region}/", keys::AGENTS)
        };
        let (kvs, _) = self.store.list(&prefix).await.map_err(store_status)?;
        let agents = decode_all(&kvs, |o| match o {
            Object::Agent(a) => Some(pb::AgentStatus {
                agent_id: a.agent_id,
                region: a.region,
                relay_address: a.relay_address,
                control_plane: a.control_plane,
                connected_at_unix: a.connected_at_unix,
                sent_version: a.sent_version,
                acked_version: a.acked_version,
                nacked_version: a.nacked_version,
                nack_reason: a.nack_reason,
                apis: a.apis,
            }),
            _ => None,
        })?;
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }
}

impl Admin {
    async fn explain(
        &self,
        req: pb::ExplainRouteRequest,
    ) -> Result<pb::ExplainRouteResponse, Status> {
        let st = self.read().await?;
        let catalog = &st.catalog;
        let profile = catalog.profile(&req.profile).map_err(model_status)?;
        let source = catalog.region(&req.source_region).map_err(model_status)?;
        if !catalog.callable_from(profile, source) {
            return Err(Status::failed_precondition(format!(
                "profile `{}` is not callable from region `{}`",
                req.profile, req.source_region
            )));
        }
        let resolved = catalog.resolve(&req.profile).map_err(model_status)?;
        let table = catalog.route_for(&resolved, &req.source_region);
        let owner = profile
            .base_profile
            .clone()
            .unwrap_or_else(|| profile.id.clone());
        let effective = match self
            .store
            .get(&keys::weights(&owner, &req.source_region))
            .await
            .map_err(store_status)?
        {
            // Weights of an older table explain nothing about this one.
            Some(kv) => match keys::decode(&kv).map_err(Status::data_loss)? {
                Object::Weights(w) if w.fits(&crate::weights::basis(&table)) => Some(w),
                _ => None,
            },
            None => None,
        };
        let (health, _) = self.store.list(keys::HEALTH).await.map_err(store_status)?;
        let mut state = crate::state::State::default();
        for kv in &health {
            if let Ok(Object::Health(h)) = keys::decode(kv) {
                state
                    .health
                    .insert(kv.key.clone(), crate::state::Seen { value: h, at: None });
            }
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let regions = crate::leader::regions_for(&state, &resolved.model, now_ms, self.silence);
        let destinations = table
            .destinations
            .iter()
            .map(|d| {
                let w = effective
                    .as_ref()
                    .and_then(|e| e.weights.iter().find(|w| w.region == d.region));
                let view = regions.get(&d.region);
                let load = view.map(|v| &v.load);
                let (ttft_ms, tokens_per_s) = region_speed(&state, &d.region, &resolved.model);
                let engines = view.map(|v| engine_figures(&v.servers)).unwrap_or_default();
                pb::ExplainedDestination {
                    region: d.region.clone(),
                    base_weight: d.weight,
                    priority: d.priority,
                    weight: w.map_or(0.0, |w| w.weight),
                    reason: w.map_or_else(
                        // The leader computes weights only for tables with
                        // load: with none, the table is served as written.
                        || {
                            if regions.is_empty() {
                                "no load: the table as written".to_string()
                            } else {
                                "not computed yet".to_string()
                            }
                        },
                        |w| {
                            serde_json::to_value(w.reason)
                                .ok()
                                .and_then(|v| v.as_str().map(String::from))
                                .unwrap_or_default()
                        },
                    ),
                    capacity: load.map_or(0.0, |l| l.capacity),
                    in_flight: load.map_or(0.0, |l| l.in_flight),
                    error_rate: load.map_or(0.0, |l| l.error_rate),
                    reporting: load.is_some_and(|l| l.fresh),
                    ttft_ms,
                    output_tokens_per_second: tokens_per_s,
                    ..engines
                }
            })
            .collect();
        Ok(pb::ExplainRouteResponse {
            profile: req.profile,
            source_region: req.source_region,
            model: resolved.model,
            destinations,
            leader: effective.map(|e| e.leader).unwrap_or_default(),
        })
    }
}

/// The engines' figures of a region's model servers, each counted once as
/// the weight engine counts it (`leader::regions_for`): requests running
/// and waiting summed, the highest KV-cache usage and the slowest TTFT p90
/// over the servers with fresh engine figures; the learned limits summed;
/// and how many servers there are and are saturated (stale ones are). Only
/// those fields are set.
fn engine_figures(servers: &[crate::leader::ServerView]) -> pb::ExplainedDestination {
    let mut out = pb::ExplainedDestination {
        servers: u32::try_from(servers.len()).unwrap_or(u32::MAX),
        ..Default::default()
    };
    for s in servers {
        out.learned_limit += s.learned_limit;
        out.saturated_servers += u32::from(s.saturated);
        if let crate::leader::EngineView::Fresh(e) = &s.engine {
            out.engine_running += e.running;
            out.engine_waiting += e.waiting;
            out.engine_ttft_p90_ms = out.engine_ttft_p90_ms.max(e.ttft_p90_ms);
            if let Some(kv) = e.kv_usage {
                out.kv_usage = Some(out.kv_usage.map_or(kv, |k: f64| k.max(kv)));
            }
        }
    }
    out
}

/// A region's time to first token (the slowest server's EWMA) and output
/// tokens per second for `model`, over its agents' latest reports.
fn region_speed(state: &crate::state::State, region: &str, model: &str) -> (f64, f64) {
    let mut ttft_us = 0u64;
    let mut tokens_per_s = 0.0;
    for h in state
        .health
        .values()
        .map(|s| &s.value)
        .filter(|h| h.region == region)
    {
        for s in h
            .servers
            .iter()
            .filter(|s| s.models.iter().any(|m| m == model))
        {
            ttft_us = ttft_us.max(s.ttft_ewma_us);
            if h.interval_seconds > 0.0 {
                tokens_per_s += s.output_tokens as f64 / h.interval_seconds;
            }
        }
    }
    (ttft_us as f64 / 1000.0, tokens_per_s)
}

fn decode_all<T>(
    kvs: &[crate::store::KeyValue],
    pick: impl Fn(Object) -> Option<T>,
) -> Result<Vec<T>, Status> {
    let mut out = Vec::with_capacity(kvs.len());
    for kv in kvs {
        let object = keys::decode(kv).map_err(Status::data_loss)?;
        out.extend(pick(object));
    }
    Ok(out)
}

/// The most objects in one page of a list, and the default.
const PAGE_MAX: usize = 1000;

/// A map key as a page token's content: one string, in the same order as
/// the keys.
trait PageKey: Ord + Clone {
    fn to_token(&self) -> String;
    fn from_token(s: &str) -> Option<Self>;
}

impl PageKey for String {
    fn to_token(&self) -> String {
        self.clone()
    }
    fn from_token(s: &str) -> Option<Self> {
        Some(s.to_string())
    }
}

/// (profile, source region): joined by a NUL, which sorts before every
/// character a name may hold, so the order is the pairs' order.
impl PageKey for (String, String) {
    fn to_token(&self) -> String {
        format!("{}\0{}", self.0, self.1)
    }
    fn from_token(s: &str) -> Option<Self> {
        let (a, b) = s.split_once('\0')?;
        Some((a.to_string(), b.to_string()))
    }
}

/// One page of `map`'s values that pass `keep`, in key order, after the
/// key `token` names; and the token of the next page (empty on the last).
/// A token is the last key of its page, hex-encoded.
fn page<'a, K: PageKey, V>(
    map: &'a std::collections::BTreeMap<K, V>,
    size: i32,
    token: &str,
    keep: impl Fn(&V) -> bool,
) -> Result<(Vec<&'a V>, String), Status> {
    use std::ops::Bound;
    let size = match size {
        0 => PAGE_MAX,
        n if n < 0 => {
            return Err(Status::invalid_argument(format!(
                "invalid page_size: {n} is negative"
            )));
        }
        n => (n as usize).min(PAGE_MAX),
    };
    let start = if token.is_empty() {
        Bound::Unbounded
    } else {
        let key = hex_decode(token)
            .and_then(|s| K::from_token(&s))
            .ok_or_else(|| {
                Status::invalid_argument("invalid page_token: not a token this list gave")
            })?;
        Bound::Excluded(key)
    };
    let mut out = Vec::with_capacity(size.min(map.len()));
    let mut last = None;
    for (k, v) in map.range((start, Bound::Unbounded)) {
        if !keep(v) {
            continue;
        }
        if out.len() == size {
            return Ok((
                out,
                last.map_or_else(String::new, |k: &K| hex_encode(&k.to_token())),
            ));
        }
        out.push(v);
        last = Some(k);
    }
    Ok((out, String::new()))
}

fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{EngineHealth, HealthRecord, ServerHealth};
    use crate::store::Op;

    async fn admin_with_region() -> Admin {
        let store = Store::memory();
        let state = crate::state::spawn(store.clone());
        let admin = Admin::new(store, state, std::time::Duration::from_secs(3));
        admin
            .create_region(Request::new(pb::CreateRegionRequest {
                region: Some(pb::Region {
                    name: "us-east".into(),
                    geography: "us".into(),
                    ..Default::default()
                }),
            }))
            .await
            .unwrap();
        admin
            .create_profile(Request::new(pb::CreateProfileRequest {
                profile: Some(pb::InferenceProfile {
                    id: "us.m".into(),
                    destinations: vec!["us-east".into()],
                    ..Default::default()
                }),
            }))
            .await
            .unwrap();
        admin
    }

    async fn report(admin: &Admin, agent: &str, servers: Vec<ServerHealth>) {
        let record = HealthRecord {
            agent_id: agent.into(),
            region: "us-east".into(),
            received_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64,
            interval_seconds: 1.0,
            servers,
            relays: Vec::new(),
            quotas: Vec::new(),
        };
        let put = Op::Put {
            key: keys::health("us-east", agent),
            value: keys::encode(&record),
            lease: None,
        };
        admin.store.txn(vec![], vec![put]).await.unwrap();
    }

    fn vllm(running: f64, waiting: f64, kv: f64, saturation: f64) -> ServerHealth {
        ServerHealth {
            url: "http://gpu-1".into(),
            models: vec!["m".into()],
            engine: Some(EngineHealth {
                kind: "vllm".into(),
                running,
                waiting,
                kv_usage: Some(kv),
                ttft_p90_ms: 180.0,
                fresh: true,
                age_ms: 0,
            }),
            learned_limit: 9.0,
            limit: 14.0,
            saturation,
            ..Default::default()
        }
    }

    fn plain(learned: f64, saturation: f64) -> ServerHealth {
        ServerHealth {
            url: "http://cpu-1".into(),
            models: vec!["m".into()],
            in_flight: 1,
            learned_limit: learned,
            limit: learned,
            saturation,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn explain_shows_each_engine_once() {
        let admin = admin_with_region().await;
        // Two agents share both servers: the engine's figures count once,
        // the learned limits of the server without engine metrics add up.
        report(
            &admin,
            "a1",
            vec![vllm(12.0, 6.0, 0.91, 1.5), plain(3.0, 0.2)],
        )
        .await;
        report(
            &admin,
            "a2",
            vec![vllm(12.0, 6.0, 0.91, 1.5), plain(4.0, 0.3)],
        )
        .await;
        let e = admin
            .explain(pb::ExplainRouteRequest {
                profile: "us.m".into(),
                source_region: "us-east".into(),
            })
            .await
            .unwrap();
        let d = &e.destinations[0];
        assert_eq!(
            (d.engine_running, d.engine_waiting, d.kv_usage),
            (12.0, 6.0, Some(0.91))
        );
        assert_eq!(
            (d.learned_limit, d.engine_ttft_p90_ms),
            (9.0 + 3.0 + 4.0, 180.0)
        );
        assert_eq!((d.servers, d.saturated_servers), (2, 1));
        // The load behind the weights: the engine's 18 requests and both
        // agents' one call, against the engine's limit and the learned ones.
        assert_eq!((d.in_flight, d.capacity), (18.0 + 2.0, 14.0 + 7.0));
        assert!(d.reporting);
    }

    #[tokio::test]
    async fn explain_without_engines_has_no_engine_figures() {
        let admin = admin_with_region().await;
        report(&admin, "a1", vec![plain(3.0, 1.0)]).await;
        let e = admin
            .explain(pb::ExplainRouteRequest {
                profile: "us.m".into(),
                source_region: "us-east".into(),
            })
            .await
            .unwrap();
        let d = &e.destinations[0];
        assert_eq!(
            (
                d.engine_running,
                d.engine_waiting,
                d.kv_usage,
                d.engine_ttft_p90_ms
            ),
            (0.0, 0.0, None, 0.0)
        );
        assert_eq!(
            (d.learned_limit, d.servers, d.saturated_servers),
            (3.0, 1, 1)
        );
    }

    fn region(name: &str) -> pb::Region {
        pb::Region {
            name: name.into(),
            geography: "us".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn lists_come_in_pages_from_the_replicas_view() {
        let admin = admin_with_region().await;
        for name in ["us-a", "us-b", "us-c", "us-d"] {
            admin
                .create_region(Request::new(pb::CreateRegionRequest {
                    region: Some(region(name)),
                }))
                .await
                .unwrap();
        }
        // Five regions in pages of two: 2, 2, 1, in name order, each page
        // read at a revision no older than the last write.
        let mut names = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = admin
                .list_regions(Request::new(pb::ListRegionsRequest {
                    page_size: 2,
                    page_token: token.clone(),
                }))
                .await
                .unwrap()
                .into_inner();
            pages += 1;
            assert!(page.regions.len() <= 2);
            assert!(page.revision > 0);
            names.extend(page.regions.into_iter().map(|r| r.name));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(pages, 3);
        assert_eq!(names, ["us-a", "us-b", "us-c", "us-d", "us-east"]);
        // Without a size: everything, one page.
        let all = admin
            .list_regions(Request::new(pb::ListRegionsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(all.regions.len(), 5);
        assert!(all.next_page_token.is_empty());
        // A token this list never gave, and a negative size: refused.
        for (size, token) in [(0, "zz"), (0, "abc"), (-1, "")] {
            let e = admin
                .list_regions(Request::new(pb::ListRegionsRequest {
                    page_size: size,
                    page_token: token.into(),
                }))
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        }
    }

    #[tokio::test]
    async fn route_tables_page_by_profile_then_source() {
        let admin = admin_with_region().await;
        admin
            .create_region(Request::new(pb::CreateRegionRequest {
                region: Some(region("us-west")),
            }))
            .await
            .unwrap();
        for id in ["us.m2", "us.m/x"] {
            admin
                .create_profile(Request::new(pb::CreateProfileRequest {
                    profile: Some(pb::InferenceProfile {
                        id: id.into(),
                        destinations: vec!["us-east".into(), "us-west".into()],
                        ..Default::default()
                    }),
                }))
                .await
                .unwrap();
        }
        for profile in ["us.m", "us.m2", "us.m/x"] {
            for source in ["us-east", "us-west"] {
                admin
                    .create_route_table(Request::new(pb::CreateRouteTableRequest {
                        route_table: Some(pb::RouteTable {
                            profile: profile.into(),
                            source_region: source.into(),
                            destinations: vec![pb::RouteDestination {
                                region: "us-east".into(),
                                weight: 1.0,
                                ..Default::default()
                            }],
                            ..Default::default()
                        }),
                    }))
                    .await
                    .unwrap();
            }
        }
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = admin
                .list_route_tables(Request::new(pb::ListRouteTablesRequest {
                    page_size: 1,
                    page_token: token.clone(),
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_inner();
            seen.extend(
                page.route_tables
                    .into_iter()
                    .map(|t| format!("{} {}", t.profile, t.source_region)),
            );
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(
            seen,
            [
                "us.m us-east",
                "us.m us-west",
                "us.m/x us-east",
                "us.m/x us-west",
                "us.m2 us-east",
                "us.m2 us-west"
            ]
        );
        // Filtered to one profile (whose id another's begins with).
        let one = admin
            .list_route_tables(Request::new(pb::ListRouteTablesRequest {
                profile: "us.m".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(one.route_tables.len(), 2);
        assert!(one.route_tables.iter().all(|t| t.profile == "us.m"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_whose_view_lags_the_catalog_answers_unavailable() {
        let store = Store::memory();
        // A catalog write the (frozen) view below never applies.
        store
            .txn(
                Vec::new(),
                vec![Op::Put {
                    key: keys::CATALOG_GUARD.to_string(),
                    value: Vec::new(),
                    lease: None,
                }],
            )
            .await
            .unwrap();
        let (_tx, state) = watch::channel(Arc::new(State {
            loaded: true,
            ..State::default()
        }));
        let admin = Admin::new(store, state, std::time::Duration::from_secs(3));
        let e = admin
            .get_region(Request::new(pb::GetRegionRequest {
                name: "us-east".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(e.message().contains("view of the store is behind"), "{e:?}");
    }
}
