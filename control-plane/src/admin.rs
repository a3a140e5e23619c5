//! `AdminService`: validated create/get/list/update/delete of regions,
//! profiles and route tables, and the list of connected agents.

use spillway_core::model::{Catalog, Profile, Quota, Region, RouteTable, Tenant};
use spillway_core::tenant::new_key;
use spillway_proto::pb::{self, admin_service_server::AdminService};
use tonic::{Request, Response, Status};

use crate::catalog_store;
use crate::error::{missing, model_status, store_status};
use crate::keys::{self, Object};
use crate::store::Store;

#[derive(Clone)]
pub struct Admin {
    store: Store,
    /// How long without a load report makes a region silent (as the
    /// leader counts it), for `ExplainRoute`.
    silence: std::time::Duration,
}

impl Admin {
    pub fn new(store: Store, silence: std::time::Duration) -> Self {
        Admin { store, silence }
    }

    async fn read(&self) -> Result<Catalog, Status> {
        Ok(catalog_store::load(&self.store).await?.0)
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_region(&self, req: Request<pb::CreateRegionRequest>) -> Reply<pb::Region> {
        let region: Region = req
            .into_inner()
            .region
            .ok_or_else(|| missing("region"))?
            .into();
        let name = region.name.clone();
        let (_, after, _) =
            catalog_store::write(&self.store, |c| c.create_region(region.clone())).await?;
        tracing::info!(region = %name, "region created");
        Ok(Response::new(after.regions[&name].clone().into()))
    }

    async fn get_region(&self, req: Request<pb::GetRegionRequest>) -> Reply<pb::Region> {
        let name = req.into_inner().name;
        let catalog = self.read().await?;
        Ok(Response::new(
            catalog.region(&name).map_err(model_status)?.clone().into(),
        ))
    }

    async fn list_regions(
        &self,
        _: Request<pb::ListRegionsRequest>,
    ) -> Reply<pb::ListRegionsResponse> {
        let (kvs, revision) = self.store.list(keys::REGIONS).await.map_err(store_status)?;
        let regions = decode_all(&kvs, |o| match o {
            Object::Region(r) => Some(r.into()),
            _ => None,
        })?;
        Ok(Response::new(pb::ListRegionsResponse { regions, revision }))
    }

    async fn update_region(&self, req: Request<pb::UpdateRegionRequest>) -> Reply<pb::Region> {
        let region: Region = req
            .into_inner()
            .region
            .ok_or_else(|| missing("region"))?
            .into();
        let name = region.name.clone();
        let (_, after, _) =
            catalog_store::write(&self.store, |c| c.update_region(region.clone())).await?;
        tracing::info!(region = %name, "region updated");
        Ok(Response::new(after.regions[&name].clone().into()))
    }

    async fn delete_region(
        &self,
        req: Request<pb::DeleteRegionRequest>,
    ) -> Reply<pb::DeleteResponse> {
        let req = req.into_inner();
        let (_, _, revision) =
            catalog_store::write(&self.store, |c| c.delete_region(&req.name, req.revision)).await?;
        tracing::info!(region = %req.name, "region deleted");
        Ok(Response::new(pb::DeleteResponse { revision }))
    }

    async fn create_profile(
        &self,
        req: Request<pb::CreateProfileRequest>,
    ) -> Reply<pb::InferenceProfile> {
        let profile: Profile = req
            .into_inner()
            .profile
            .ok_or_else(|| missing("profile"))?
            .into();
        let id = profile.id.clone();
        let (_, after, _) =
            catalog_store::write(&self.store, |c| c.create_profile(profile.clone())).await?;
        tracing::info!(profile = %id, "profile created");
        Ok(Response::new(after.profiles[&id].clone().into()))
    }

    async fn get_profile(
        &self,
        req: Request<pb::GetProfileRequest>,
    ) -> Reply<pb::InferenceProfile> {
        let id = req.into_inner().id;
        let catalog = self.read().await?;
        Ok(Response::new(
            catalog.profile(&id).map_err(model_status)?.clone().into(),
        ))
    }

    async fn list_profiles(
        &self,
        _: Request<pb::ListProfilesRequest>,
    ) -> Reply<pb::ListProfilesResponse> {
        let (kvs, revision) = self
            .store
            .list(keys::PROFILES)
            .await
            .map_err(store_status)?;
        let profiles = decode_all(&kvs, |o| match o {
            Object::Profile(p) => Some(p.into()),
            _ => None,
        })?;
        Ok(Response::new(pb::ListProfilesResponse {
            profiles,
            revision,
        }))
    }

    async fn update_profile(
        &self,
        req: Request<pb::UpdateProfileRequest>,
    ) -> Reply<pb::InferenceProfile> {
        let profile: Profile = req
            .into_inner()
            .profile
            .ok_or_else(|| missing("profile"))?
            .into();
        let id = profile.id.clone();
        let (_, after, _) =
            catalog_store::write(&self.store, |c| c.update_profile(profile.clone())).await?;
        tracing::info!(profile = %id, "profile updated");
        Ok(Response::new(after.profiles[&id].clone().into()))
    }

    async fn delete_profile(
        &self,
        req: Request<pb::DeleteProfileRequest>,
    ) -> Reply<pb::DeleteResponse> {
        let req = req.into_inner();
        let (_, _, revision) =
            catalog_store::write(&self.store, |c| c.delete_profile(&req.id, req.revision)).await?;
        tracing::info!(profile = %req.id, "profile deleted");
        Ok(Response::new(pb::DeleteResponse { revision }))
    }

    async fn create_route_table(
        &self,
        req: Request<pb::CreateRouteTableRequest>,
    ) -> Reply<pb::RouteTable> {
        let table: RouteTable = req
            .into_inner()
            .route_table
            .ok_or_else(|| missing("route_table"))?
            .into();
        let key = table.key();
        let (_, after, _) =
            catalog_store::write(&self.store, |c| c.create_route(table.clone())).await?;
        tracing::info!(profile = %key.0, source = %key.1, "route table created");
        Ok(Response::new(after.routes[&key].clone().into()))
    }

    async fn get_route_table(
        &self,
        req: Request<pb::GetRouteTableRequest>,
    ) -> Reply<pb::RouteTable> {
        let req = req.into_inner();
        let catalog = self.read().await?;
        let table = catalog
            .route(&req.profile, &req.source_region)
            .map_err(model_status)?;
        Ok(Response::new(table.clone().into()))
    }

    async fn list_route_tables(
        &self,
        req: Request<pb::ListRouteTablesRequest>,
    ) -> Reply<pb::ListRouteTablesResponse> {
        let profile = req.into_inner().profile;
        let prefix = if profile.is_empty() {
            keys::ROUTES.to_string()
        } else {
            format!("{}{profile}/", keys::ROUTES)
        };
        let (kvs, revision) = self.store.list(&prefix).await.map_err(store_status)?;
        let route_tables = decode_all(&kvs, |o| match o {
            // A profile id may itself contain '/', so filter exactly.
            Object::Route(t) if profile.is_empty() || t.profile == profile => Some(t.into()),
            _ => None,
        })?;
        Ok(Response::new(pb::ListRouteTablesResponse {
            route_tables,
            revision,
        }))
    }

    async fn update_route_table(
        &self,
        req: Request<pb::UpdateRouteTableRequest>,
    ) -> Reply<pb::RouteTable> {
        let table: RouteTable = req
            .into_inner()
            .route_table
            .ok_or_else(|| missing("route_table"))?
            .into();
        let key = table.key();
        let (_, after, _) =
            catalog_store::write(&self.store, |c| c.update_route(table.clone())).await?;
        tracing::info!(profile = %key.0, source = %key.1, "route table updated");
        Ok(Response::new(after.routes[&key].clone().into()))
    }

    async fn delete_route_table(
        &self,
        req: Request<pb::DeleteRouteTableRequest>,
    ) -> Reply<pb::DeleteResponse> {
        let req = req.into_inner();
        let (_, _, revision) = catalog_store::write(&self.store, |c| {
            c.delete_route(&req.profile, &req.source_region, req.revision)
        })
        .await?;
        tracing::info!(profile = %req.profile, source = %req.source_region, "route table deleted");
        Ok(Response::new(pb::DeleteResponse { revision }))
    }

    async fn create_quota(&self, req: Request<pb::CreateQuotaRequest>) -> Reply<pb::Quota> {
        let quota: Quota = req
            .into_inner()
            .quota
            .ok_or_else(|| missing("quota"))?
            .try_into()
            .map_err(model_status)?;
        let id = quota.scope.id();
        let (_, after, _) =
            catalog_store::write(&self.store, |c| c.create_quota(quota.clone())).await?;
        tracing::info!(quota = %id, "quota created");
        Ok(Response::new(after.quotas[&id].clone().into()))
    }

    async fn get_quota(&self, req: Request<pb::GetQuotaRequest>) -> Reply<pb::Quota> {
        let id = req.into_inner().id;
        let catalog = self.read().await?;
        Ok(Response::new(
            catalog.quota(&id).map_err(model_status)?.clone().into(),
        ))
    }

    async fn list_quotas(
        &self,
        _: Request<pb::ListQuotasRequest>,
    ) -> Reply<pb::ListQuotasResponse> {
        let (kvs, revision) = self.store.list(keys::QUOTAS).await.map_err(store_status)?;
        let quotas = decode_all(&kvs, |o| match o {
            Object::Quota(q) => Some(q.into()),
            _ => None,
        })?;
        Ok(Response::new(pb::ListQuotasResponse { quotas, revision }))
    }

    async fn update_quota(&self, req: Request<pb::UpdateQuotaRequest>) -> Reply<pb::Quota> {
        let quota: Quota = req
            .into_inner()
            .quota
            .ok_or_else(|| missing("quota"))?
            .try_into()
            .map_err(model_status)?;
        let id = quota.scope.id();
        let (_, after, _) =
            catalog_store::write(&self.store, |c| c.update_quota(quota.clone())).await?;
        tracing::info!(quota = %id, "quota updated");
        Ok(Response::new(after.quotas[&id].clone().into()))
    }

    async fn delete_quota(
        &self,
        req: Request<pb::DeleteQuotaRequest>,
    ) -> Reply<pb::DeleteResponse> {
        let req = req.into_inner();
        let (_, _, revision) =
            catalog_store::write(&self.store, |c| c.delete_quota(&req.id, req.revision)).await?;
        tracing::info!(quota = %req.id, "quota deleted");
        Ok(Response::new(pb::DeleteResponse { revision }))
    }

    async fn create_tenant(&self, req: Request<pb::CreateTenantRequest>) -> Reply<pb::Tenant> {
        let tenant: Tenant = req
            .into_inner()
            .tenant
            .ok_or_else(|| missing("tenant"))?
            .into();
        let name = tenant.name.clone();
        let (_, after, _) =
            catalog_store::write(&self.store, |c| c.create_tenant(tenant.clone())).await?;
        tracing::info!(tenant = %name, "tenant created");
        Ok(Response::new(after.tenants[&name].clone().into()))
    }

    async fn get_tenant(&self, req: Request<pb::GetTenantRequest>) -> Reply<pb::Tenant> {
        let name = req.into_inner().name;
        let catalog = self.read().await?;
        Ok(Response::new(
            catalog.tenant(&name).map_err(model_status)?.clone().into(),
        ))
    }

    async fn list_tenants(
        &self,
        _: Request<pb::ListTenantsRequest>,
    ) -> Reply<pb::ListTenantsResponse> {
        let (kvs, revision) = self.store.list(keys::TENANTS).await.map_err(store_status)?;
        let tenants = decode_all(&kvs, |o| match o {
            Object::Tenant(t) => Some(t.into()),
            _ => None,
        })?;
        Ok(Response::new(pb::ListTenantsResponse { tenants, revision }))
    }

    async fn update_tenant(&self, req: Request<pb::UpdateTenantRequest>) -> Reply<pb::Tenant> {
        let tenant: Tenant = req
            .into_inner()
            .tenant
            .ok_or_else(|| missing("tenant"))?
            .into();
        let name = tenant.name.clone();
        let (_, after, _) =
            catalog_store::write(&self.store, |c| c.update_tenant(tenant.clone())).await?;
        tracing::info!(tenant = %name, "tenant updated");
        Ok(Response::new(after.tenants[&name].clone().into()))
    }

    async fn delete_tenant(
        &self,
        req: Request<pb::DeleteTenantRequest>,
    ) -> Reply<pb::DeleteResponse> {
        let req = req.into_inner();
        let (_, _, revision) =
            catalog_store::write(&self.store, |c| c.delete_tenant(&req.name, req.revision)).await?;
        tracing::info!(tenant = %req.name, "tenant deleted with its keys");
        Ok(Response::new(pb::DeleteResponse { revision }))
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
                .tenant(&req.tenant)
                .map_err(model_status)?;
        }
        let id = record.id.clone();
        let (_, after, _) =
            catalog_store::write(&self.store, |c| c.create_key(record.clone())).await?;
        tracing::info!(key = %id, tenant = %req.tenant, "API key created");
        Ok(Response::new(pb::CreateKeyResponse {
            key: Some(after.keys[&id].clone().into()),
            secret,
        }))
    }

    async fn list_keys(&self, req: Request<pb::ListKeysRequest>) -> Reply<pb::ListKeysResponse> {
        let tenant = req.into_inner().tenant;
        let (kvs, _) = self.store.list(keys::KEYS).await.map_err(store_status)?;
        let keys = decode_all(&kvs, |o| match o {
            Object::Key(k) if tenant.is_empty() || k.tenant == tenant => Some(k.into()),
            _ => None,
        })?;
        Ok(Response::new(pb::ListKeysResponse { keys }))
    }

    async fn revoke_key(&self, req: Request<pb::RevokeKeyRequest>) -> Reply<pb::DeleteResponse> {
        let id = req.into_inner().id;
        let (gone, _, revision) = catalog_store::write(&self.store, |c| c.delete_key(&id)).await?;
        tracing::info!(key = %id, tenant = %gone.tenant, "API key revoked");
        Ok(Response::new(pb::DeleteResponse { revision }))
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
        let catalog = self.read().await?;
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
        let loads = crate::leader::loads_for(&state, &resolved.model, now_ms, self.silence);
        let destinations = table
            .destinations
            .iter()
            .map(|d| {
                let w = effective
                    .as_ref()
                    .and_then(|e| e.weights.iter().find(|w| w.region == d.region));
                let load = loads.get(&d.region);
                let (ttft_ms, tokens_per_s) = region_speed(&state, &d.region, &resolved.model);
                pb::ExplainedDestination {
                    region: d.region.clone(),
                    base_weight: d.weight,
                    priority: d.priority,
                    weight: w.map_or(0.0, |w| w.weight),
                    reason: w.map_or_else(
                        || "not computed yet".to_string(),
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
                    ..Default::default()
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
