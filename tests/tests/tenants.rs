//! Tenants, API keys and region policy: managed through spillctl (every bad
//! input refused by field, nothing else changed, only a key's hash stored),
//! checked by the agents with no call to the control plane (401 / 403 and
//! their gRPC statuses, revocation within one push), a denied region never
//! reached, and tenant quotas that throttle one tenant and not another.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::Value;
use spillway_proto::pb::{self, inference_service_client::InferenceServiceClient};
use spillway_tests::cluster::{Cluster, ClusterSpec, GLOBAL, Http, US, chat};
use spillway_tests::sim::SimConfig;
use spillway_tests::{ControlPlane, Etcd};

async fn spillctl(cp: &ControlPlane, args: &[&str]) -> (bool, String, String) {
    cp.spillctl(args).await
}

async fn ok(cp: &ControlPlane, args: &[&str]) -> String {
    let (ok, out, err) = spillctl(cp, args).await;
    assert!(ok, "spillctl {}: {err}", args.join(" "));
    out
}

async fn refused(cp: &ControlPlane, args: &[&str], needle: &str) {
    let (ok, out, err) = spillctl(cp, args).await;
    assert!(!ok, "spillctl {} should fail: {out}", args.join(" "));
    assert!(
        err.contains(needle),
        "spillctl {}: `{err}` should name `{needle}`",
        args.join(" ")
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[tokio::test]
async fn tenants_and_keys_from_the_command_line_with_only_hashes_stored() {
    let etcd = Etcd::start().await;
    let cp = ControlPlane::start(Some(&etcd.endpoint), "cp").await;
    for args in [
        &["regions", "create", "us-east", "-g", "us"][..],
        &["regions", "create", "us-west", "-g", "us"][..],
        &["regions", "create", "ap-east", "-g", "ap"][..],
        &[
            "profiles",
            "create",
            US,
            "--destinations",
            "us-east,us-west",
        ][..],
    ] {
        ok(&cp, args).await;
    }
    let t: Value = serde_json::from_str(
        &ok(
            &cp,
            &[
                "tenants",
                "create",
                "acme",
                "--profiles",
                "us.*",
                "--deny-regions",
                "us-west,ap-east",
                "-o",
                "json",
            ],
        )
        .await,
    )
    .unwrap();
    assert_eq!(t["profiles"], "us.*");
    assert_eq!(t["deny_regions"][0], "us-west");

    let created: Value =
        serde_json::from_str(&ok(&cp, &["keys", "create", "--tenant", "acme", "-o", "json"]).await)
            .unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(key.starts_with(&format!("spw_{id}_")), "{key}");
    // Listing shows ids, never keys; the store holds the hash only.
    let listed = ok(&cp, &["keys", "list", "--tenant", "acme", "-o", "json"]).await;
    assert!(listed.contains(&id) && !listed.contains(&key), "{listed}");
    let stored = etcd
        .etcdctl(&["get", "--prefix", "/spillway/v1/keys/"])
        .await;
    let secret = key.rsplit('_').next().unwrap();
    assert!(
        !stored.contains(secret),
        "the secret is not stored: {stored}"
    );
    assert!(
        stored.contains(&spillway_core::tenant::key_hash(&key)),
        "its hash is: {stored}"
    );

    // Bad input: refused by field, and nothing else changes.
    let before = (
        ok(&cp, &["tenants", "list", "-o", "json"]).await,
        ok(&cp, &["keys", "list", "-o", "json"]).await,
        ok(&cp, &["regions", "list", "-o", "json"]).await,
    );
    refused(
        &cp,
        &["tenants", "create", "Acme", "--profiles", "*"],
        "tenant.name",
    )
    .await;
    refused(&cp, &["tenants", "create", "beta"], "tenant.profiles").await;
    refused(
        &cp,
        &["tenants", "create", "beta", "--profiles", "us/x"],
        "tenant.profiles[0]",
    )
    .await;
    refused(
        &cp,
        &[
            "tenants",
            "create",
            "beta",
            "--profiles",
            "*",
            "--deny-regions",
            "mars-1",
        ],
        "tenant.policy.deny_regions[0]",
    )
    .await;
    refused(
        &cp,
        &["tenants", "create", "acme", "--profiles", "*"],
        "already exists",
    )
    .await;
    refused(&cp, &["keys", "create", "--tenant", "ghost"], "ghost").await;
    refused(
        &cp,
        &["quotas", "create", "--tenant", "ghost", "--rpm", "10"],
        "quota.scope.tenant",
    )
    .await;
    refused(
        &cp,
        &["quotas", "create", "--tenant", "acme", "--rpm", "0"],
        "quota.requests_per_minute",
    )
    .await;
    refused(&cp, &["regions", "delete", "ap-east"], "tenant `acme`").await;
    let after = (
        ok(&cp, &["tenants", "list", "-o", "json"]).await,
        ok(&cp, &["keys", "list", "-o", "json"]).await,
        ok(&cp, &["regions", "list", "-o", "json"]).await,
    );
    assert_eq!(before, after, "refused writes changed nothing");

    // A tenant named by a quota stays until the quota goes; then it goes
    // with its keys.
    ok(
        &cp,
        &[
            "quotas",
            "create",
            "--tenant",
            "acme",
            "--profile",
            US,
            "--rpm",
            "60",
        ],
    )
    .await;
    refused(&cp, &["tenants", "delete", "acme"], "quota").await;
    ok(&cp, &["quotas", "delete", &format!("tenant/acme/{US}")]).await;
    ok(&cp, &["keys", "create", "--tenant", "acme"]).await;
    ok(&cp, &["keys", "revoke", &id]).await;
    refused(&cp, &["keys", "revoke", &id], "not found").await;
    assert_eq!(
        serde_json::from_str::<Value>(&ok(&cp, &["keys", "list", "-o", "json"]).await)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    ok(&cp, &["tenants", "delete", "acme"]).await;
    assert_eq!(ok(&cp, &["keys", "list", "-o", "json"]).await.trim(), "[]");
}

async fn admin_key(cluster: &Cluster, tenant: &str) -> String {
    cluster.cp.create_key(tenant).await.1
}

async fn create_tenant(cluster: &Cluster, name: &str, profiles: &[&str], policy: pb::RegionPolicy) {
    cluster.cp.create_tenant(name, profiles, policy).await;
}

fn converse(model: &str, key: Option<&str>) -> tonic::Request<pb::ConverseRequest> {
    let mut req = tonic::Request::new(pb::ConverseRequest {
        model_id: model.into(),
        messages: vec![pb::Message {
            role: pb::Role::User.into(),
            content: vec![pb::ContentBlock {
                block: Some(pb::content_block::Block::Text("hi".into())),
            }],
        }],
        ..Default::default()
    });
    if let Some(k) = key {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    req
}

#[tokio::test]
async fn keys_authenticate_permissions_authorize_and_revocation_reaches_agents() {
    let cluster = Cluster::start(ClusterSpec {
        anonymous: false,
        ..ClusterSpec::default()
    })
    .await;
    create_tenant(&cluster, "acme", &["us.*"], Default::default()).await;
    create_tenant(&cluster, "small", &["*"], Default::default()).await;
    let mut admin = cluster.cp.admin().await;
    admin
        .create_quota(pb::CreateQuotaRequest {
            quota: Some(pb::Quota {
                scope: Some(pb::QuotaScope {
                    tenant: "small".into(),
                    ..Default::default()
                }),
                requests_per_minute: Some(6),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let acme = admin_key(&cluster, "acme").await;
    let small = admin_key(&cluster, "small").await;
    let east = &cluster.region("us-east").agent;
    let acme_id = spillway_core::tenant::key_id(&acme).unwrap().to_string();
    east.wait_for("both keys and the quota", |c| {
        c.keys.len() == 2 && !c.quotas.is_empty()
    })
    .await;
    let http = Http::default();

    // No key, a wrong secret for a real id, and garbage: 401, and the same
    // words for all, so that nothing tells which part was wrong.
    let missing = http
        .post(east.http, "/v1/chat/completions", chat(US, false))
        .await;
    assert_eq!(missing.status, 401, "{}", missing.text());
    assert_eq!(missing.json()["error"]["code"], "invalid_api_key");
    let forged = format!("spw_{acme_id}_{}", "0".repeat(64));
    for bad in [forged.as_str(), "sk-not-a-spillway-key"] {
        let a = http.post_key(east.http, bad, chat(US, false)).await;
        assert_eq!(a.status, 401, "{}", a.text());
        assert_eq!(a.json()["error"]["message"], "invalid API key");
    }
    let mut grpc = InferenceServiceClient::connect(format!("http://{}", east.addr))
        .await
        .unwrap();
    let status = grpc.converse(converse(US, None)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    // The right key: served. A profile outside the tenant's permissions:
    // 403 / PERMISSION_DENIED, naming the tenant and the profile.
    let a = http.post_key(east.http, &acme, chat(US, false)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let a = http.post_key(east.http, &acme, chat(GLOBAL, false)).await;
    assert_eq!(a.status, 403, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], "permission_denied");
    assert!(a.text().contains("acme") && a.text().contains(GLOBAL));
    let status = grpc
        .converse(converse(GLOBAL, Some(&acme)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(grpc.converse(converse(US, Some(&acme))).await.is_ok());
    // The model list shows what the tenant may call.
    let auth = format!("Bearer {acme}");
    let models = http
        .get_with(east.http, "/v1/models", &[("authorization", &auth)])
        .await;
    let ids: Vec<String> = models.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, [US]);

    // A tenant quota throttles its tenant, not the others; the answer names
    // the quota, and gRPC says RESOURCE_EXHAUSTED with a retry-after.
    let mut throttled = None;
    for _ in 0..5 {
        let a = http.post_key(east.http, &small, chat(US, false)).await;
        if a.status == 429 {
            throttled = Some(a);
            break;
        }
    }
    let t = throttled.expect("6 a minute: five calls in a row are not all admitted");
    assert_eq!(t.json()["error"]["code"], "quota_exceeded");
    assert!(t.text().contains("tenant/small"), "{}", t.text());
    assert!(t.headers.contains_key("retry-after"));
    assert_eq!(t.headers["x-ratelimit-limit-requests"], "6");
    let status = grpc.converse(converse(US, Some(&small))).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("tenant/small"));
    assert!(status.metadata().contains_key("retry-after"));
    for _ in 0..5 {
        let a = http.post_key(east.http, &acme, chat(US, false)).await;
        assert_eq!(a.status, 200, "another tenant is not throttled");
    }

    // Revoked: gone from the agent with the next push, then refused.
    admin
        .revoke_key(pb::RevokeKeyRequest {
            id: acme_id.clone(),
        })
        .await
        .unwrap();
    east.wait_for("the revocation", |c| !c.keys.contains_key(&acme_id))
        .await;
    let a = http.post_key(east.http, &acme, chat(US, false)).await;
    assert_eq!(a.status, 401, "{}", a.text());
    let a = http.post_key(east.http, &small, chat(US, false)).await;
    assert_ne!(a.status, 401, "other keys still work");
}

#[tokio::test]
async fn a_denied_region_never_receives_the_tenants_calls() {
    // us-east takes 2 x 2 calls at a time, slowly: a burst saturates it.
    let mut spec = ClusterSpec::default();
    let slow = SimConfig {
        ttft: Duration::from_millis(300),
        max_concurrent: 2,
        ..SimConfig::default()
    };
    spec.sim.insert("us-east", slow);
    let cluster = Cluster::start(spec).await;
    let no_west = pb::RegionPolicy {
        deny_regions: vec!["us-west".into()],
        ..Default::default()
    };
    create_tenant(&cluster, "east-only", &["*"], no_west).await;
    create_tenant(&cluster, "open", &["*"], Default::default()).await;
    let us_nowhere = pb::RegionPolicy {
        deny_geographies: vec!["us".into()],
        ..Default::default()
    };
    create_tenant(&cluster, "no-us", &["*"], us_nowhere).await;
    let east_only = admin_key(&cluster, "east-only").await;
    let open = admin_key(&cluster, "open").await;
    let no_us = admin_key(&cluster, "no-us").await;
    let east = &cluster.region("us-east").agent;
    east.wait_for("the keys", |c| c.keys.len() == 3).await;
    let http = Http::default();

    let burst = |key: String| {
        let http = http.clone();
        let addr = east.http;
        join_all((0..24).map(move |_| {
            let (http, key) = (http.clone(), key.clone());
            async move { http.post_key(addr, &key, chat(GLOBAL, false)).await }
        }))
    };
    let answers = burst(east_only.clone()).await;
    let served_in: Vec<Option<String>> = answers
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| a.region().map(String::from))
        .collect();
    assert!(
        served_in.iter().all(|r| r.as_deref() != Some("us-west")),
        "{served_in:?}"
    );
    assert!(
        served_in.iter().any(|r| r.as_deref() == Some("eu-west")),
        "the excess goes to an allowed region: {served_in:?}"
    );
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(a.status, 429, "{}", a.text());
    }
    assert_eq!(
        cluster.region("us-west").served(),
        0,
        "not one of the tenant's calls reached us-west"
    );

    // Another tenant under the same load does spill to us-west.
    let answers = burst(open).await;
    assert!(
        answers.iter().any(|a| a.region() == Some("us-west")),
        "without the policy the excess spills to us-west"
    );

    // Nothing allowed: fails closed, naming the policy.
    let a = http.post_key(east.http, &no_us, chat(US, false)).await;
    assert_eq!(a.status, 403, "{}", a.text());
    assert!(
        a.text().contains("region policy") && a.text().contains("deny_geographies"),
        "{}",
        a.text()
    );

    // An application profile copying the US profile meets the same policy:
    // its destinations are those of what it copies.
    let mut admin = cluster.cp.admin().await;
    admin
        .create_profile(pb::CreateProfileRequest {
            profile: Some(pb::InferenceProfile {
                id: "team-search".into(),
                base_profile: US.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    east.wait_for("the application profile", |c| {
        c.profiles.contains_key("team-search")
    })
    .await;
    let a = http
        .post_key(east.http, &no_us, chat("team-search", false))
        .await;
    assert_eq!(a.status, 403, "{}", a.text());
    assert!(a.text().contains("deny_geographies"), "{}", a.text());
    let served = cluster.region("us-east").served() + cluster.region("us-west").served();
    let a = http
        .post_key(east.http, &east_only, chat("team-search", false))
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.region(), Some("us-east"));
    assert_eq!(
        cluster.region("us-east").served() + cluster.region("us-west").served(),
        served + 1
    );
}
