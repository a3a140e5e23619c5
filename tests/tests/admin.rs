//! Admin CRUD against a real control-plane process, on both stores: every
//! rejected input gets a message naming the field and changes nothing, and
//! a concurrent update is reported, not lost.

use spillway_proto::pb::{self, admin_service_client::AdminServiceClient};
use spillway_tests::{ControlPlane, Etcd};
use tonic::{Code, transport::Channel};

type Admin = AdminServiceClient<Channel>;

fn region(name: &str, geo: &str) -> pb::Region {
    pb::Region {
        name: name.into(),
        geography: geo.into(),
        ..Default::default()
    }
}

fn profile(id: &str, dest: &[&str]) -> pb::InferenceProfile {
    pb::InferenceProfile {
        id: id.into(),
        destinations: dest.iter().map(|d| d.to_string()).collect(),
        ..Default::default()
    }
}

fn route(p: &str, src: &str, d: &[(&str, f64)]) -> pb::RouteTable {
    pb::RouteTable {
        profile: p.into(),
        source_region: src.into(),
        destinations: d
            .iter()
            .map(|(r, w)| pb::RouteDestination {
                region: r.to_string(),
                weight: *w,
                priority: 0,
            })
            .collect(),
        ttft_objective_ms: 0,
        revision: 0,
    }
}

/// Everything stored, without revisions, to show that a refused write
/// changed nothing.
async fn everything(a: &mut Admin) -> String {
    let regions = a
        .list_regions(pb::ListRegionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .regions;
    let profiles = a
        .list_profiles(pb::ListProfilesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .profiles;
    let routes = a
        .list_route_tables(pb::ListRouteTablesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .route_tables;
    format!("{regions:?}\n{profiles:?}\n{routes:?}")
}

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    needle: &str,
) {
    let status = r.expect_err("the write should have been refused");
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(needle),
        "`{}` does not mention `{needle}`",
        status.message()
    );
}

async fn crud_suite(a: &mut Admin) {
    // Regions.
    for r in [
        region("us-east", "us"),
        region("us-west", "us"),
        region("eu-west", "eu"),
    ] {
        a.create_region(pb::CreateRegionRequest { region: Some(r) })
            .await
            .unwrap();
    }
    let got = a
        .get_region(pb::GetRegionRequest {
            name: "us-east".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.geography.as_str(), got.revision > 0), ("us", true));

    // Profiles of every kind.
    let geo = a
        .create_profile(pb::CreateProfileRequest {
            profile: Some(profile("us.llama-3.1-8b", &["us-east", "us-west"])),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(geo.kind, pb::ProfileKind::Geographic as i32);
    assert_eq!(geo.model, "llama-3.1-8b");
    a.create_profile(pb::CreateProfileRequest {
        profile: Some(profile(
            "global.llama-3.1-8b",
            &["us-east", "us-west", "eu-west"],
        )),
    })
    .await
    .unwrap();
    let mut app = profile("team-search", &[]);
    app.base_profile = "us.llama-3.1-8b".into();
    app.tags.insert("cost-center".into(), "search".into());
    a.create_profile(pb::CreateProfileRequest { profile: Some(app) })
        .await
        .unwrap();
    let mut single = profile("eu-batch", &[]);
    single.base_region = "eu-west".into();
    single.model = "mistral-7b".into();
    a.create_profile(pb::CreateProfileRequest {
        profile: Some(single),
    })
    .await
    .unwrap();

    // Route tables.
    let t = a
        .create_route_table(pb::CreateRouteTableRequest {
            route_table: Some(route(
                "us.llama-3.1-8b",
                "us-east",
                &[("us-east", 3.0), ("us-west", 1.0)],
            )),
        })
        .await
        .unwrap()
        .into_inner();
    let mut t2 = t.clone();
    t2.destinations[1].weight = 2.0;
    let t2 = a
        .update_route_table(pb::UpdateRouteTableRequest {
            route_table: Some(t2),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(t2.revision > t.revision);
    let got = a
        .get_route_table(pb::GetRouteTableRequest {
            profile: "us.llama-3.1-8b".into(),
            source_region: "us-east".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.destinations[1].weight, 2.0);

    let before = everything(a).await;

    // Every rejected input names its field and changes nothing.
    assert_refused(
        a.create_region(pb::CreateRegionRequest {
            region: Some(region("", "us")),
        })
        .await,
        Code::InvalidArgument,
        "region.name",
    );
    assert_refused(
        a.create_region(pb::CreateRegionRequest {
            region: Some(region("US_East", "us")),
        })
        .await,
        Code::InvalidArgument,
        "region.name",
    );
    assert_refused(
        a.create_region(pb::CreateRegionRequest {
            region: Some(region("us-east", "us")),
        })
        .await,
        Code::AlreadyExists,
        "us-east",
    );
    assert_refused(
        a.create_region(pb::CreateRegionRequest { region: None })
            .await,
        Code::InvalidArgument,
        "region",
    );
    assert_refused(
        a.create_profile(pb::CreateProfileRequest {
            profile: Some(profile("", &["us-east"])),
        })
        .await,
        Code::InvalidArgument,
        "profile.id",
    );
    assert_refused(
        a.create_profile(pb::CreateProfileRequest {
            profile: Some(profile("us.", &["us-east"])),
        })
        .await,
        Code::InvalidArgument,
        "profile.id",
    );
    assert_refused(
        a.create_profile(pb::CreateProfileRequest {
            profile: Some(profile("us.qwen", &["us-east", "ap-south"])),
        })
        .await,
        Code::InvalidArgument,
        "profile.destinations[1]: unknown region `ap-south`",
    );
    assert_refused(
        a.create_profile(pb::CreateProfileRequest {
            profile: Some(profile("us.qwen", &["eu-west"])),
        })
        .await,
        Code::InvalidArgument,
        "outside `us`",
    );
    let mut orphan = profile("team-x", &[]);
    orphan.base_profile = "us.does-not-exist".into();
    assert_refused(
        a.create_profile(pb::CreateProfileRequest {
            profile: Some(orphan),
        })
        .await,
        Code::InvalidArgument,
        "profile.base_profile",
    );
    for (w, field) in [
        (-1.0, "weight"),
        (f64::NAN, "weight"),
        (f64::INFINITY, "weight"),
    ] {
        assert_refused(
            a.create_route_table(pb::CreateRouteTableRequest {
                route_table: Some(route("global.llama-3.1-8b", "eu-west", &[("eu-west", w)])),
            })
            .await,
            Code::InvalidArgument,
            field,
        );
    }
    assert_refused(
        a.create_route_table(pb::CreateRouteTableRequest {
            route_table: Some(route(
                "global.llama-3.1-8b",
                "eu-west",
                &[("eu-west", 0.0), ("us-east", 0.0)],
            )),
        })
        .await,
        Code::InvalidArgument,
        "every weight is zero",
    );
    assert_refused(
        a.create_route_table(pb::CreateRouteTableRequest {
            route_table: Some(route("global.llama-3.1-8b", "mars-1", &[("eu-west", 1.0)])),
        })
        .await,
        Code::InvalidArgument,
        "route_table.source_region",
    );
    assert_refused(
        a.delete_profile(pb::DeleteProfileRequest {
            id: "us.llama-3.1-8b".into(),
            revision: 0,
        })
        .await,
        Code::FailedPrecondition,
        "copied by application profile `team-search`",
    );
    assert_refused(
        a.delete_region(pb::DeleteRegionRequest {
            name: "eu-west".into(),
            revision: 0,
        })
        .await,
        Code::FailedPrecondition,
        "eu-west",
    );
    assert_refused(
        a.get_profile(pb::GetProfileRequest { id: "nope".into() })
            .await,
        Code::NotFound,
        "nope",
    );
    assert_eq!(
        everything(a).await,
        before,
        "refused writes changed something"
    );

    // Deleting in the right order works, and takes route tables along.
    a.delete_profile(pb::DeleteProfileRequest {
        id: "team-search".into(),
        revision: 0,
    })
    .await
    .unwrap();
    a.delete_profile(pb::DeleteProfileRequest {
        id: "us.llama-3.1-8b".into(),
        revision: 0,
    })
    .await
    .unwrap();
    let left = a
        .list_route_tables(pb::ListRouteTablesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .route_tables;
    assert!(left.is_empty(), "{left:?}");
}

/// Two admins read the same revision and both update: exactly one wins, the
/// other is told (ABORTED) and nothing is silently overwritten.
async fn conflict_suite(a: &mut Admin) {
    a.create_region(pb::CreateRegionRequest {
        region: Some(region("ap-south", "apac")),
    })
    .await
    .unwrap();
    let read = a
        .get_region(pb::GetRegionRequest {
            name: "ap-south".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut first = read.clone();
    first.description = "written by admin one".into();
    let mut second = read.clone();
    second.description = "written by admin two".into();
    let (mut a1, mut a2) = (a.clone(), a.clone());
    let (r1, r2) = tokio::join!(
        a1.update_region(pb::UpdateRegionRequest {
            region: Some(first)
        }),
        a2.update_region(pb::UpdateRegionRequest {
            region: Some(second)
        }),
    );
    let (winner, loser) = match (r1, r2) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w.into_inner(), l),
        other => panic!("exactly one concurrent update must win: {other:?}"),
    };
    assert_eq!(loser.code(), Code::Aborted, "{}", loser.message());
    assert!(
        loser.message().contains("changed since revision"),
        "{}",
        loser.message()
    );
    let stored = a
        .get_region(pb::GetRegionRequest {
            name: "ap-south".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.description, winner.description);
    // An update without a revision is refused too.
    let mut blind = stored.clone();
    blind.revision = 0;
    assert_refused(
        a.update_region(pb::UpdateRegionRequest {
            region: Some(blind),
        })
        .await,
        Code::InvalidArgument,
        "region.revision",
    );
}

#[tokio::test]
async fn admin_crud_on_the_memory_store() {
    let cp = ControlPlane::start(None, "memory-1").await;
    let mut a = cp.admin().await;
    crud_suite(&mut a).await;
    conflict_suite(&mut a).await;
}

#[tokio::test]
async fn admin_crud_on_etcd() {
    let etcd = Etcd::start().await;
    let cp = ControlPlane::start(Some(&etcd.endpoint), "etcd-1").await;
    let mut a = cp.admin().await;
    crud_suite(&mut a).await;
    conflict_suite(&mut a).await;
}

#[tokio::test]
async fn one_key_per_object_visible_with_etcdctl() {
    let etcd = Etcd::start().await;
    let cp = ControlPlane::start(Some(&etcd.endpoint), "etcd-1").await;
    let mut a = cp.admin().await;
    a.create_region(pb::CreateRegionRequest {
        region: Some(region("us-east", "us")),
    })
    .await
    .unwrap();
    a.create_region(pb::CreateRegionRequest {
        region: Some(region("us-west", "us")),
    })
    .await
    .unwrap();
    a.create_profile(pb::CreateProfileRequest {
        profile: Some(profile("us.llama-3.1-8b", &["us-east", "us-west"])),
    })
    .await
    .unwrap();
    a.create_route_table(pb::CreateRouteTableRequest {
        route_table: Some(route("us.llama-3.1-8b", "us-east", &[("us-east", 1.0)])),
    })
    .await
    .unwrap();
    // The leader key is taken on the leader's first tick, which a busy
    // machine may run after the writes above: wait for it (bounded).
    let mut keys = String::new();
    for _ in 0..100 {
        keys = etcd
            .etcdctl(&["get", "--prefix", "/spillway/", "--keys-only"])
            .await;
        if keys.lines().any(|l| l == "/spillway/v1/leader") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    // Besides the catalog: the weights leader's key, and the weights it
    // writes as it goes (their timing is its own).
    assert!(keys.contains(&"/spillway/v1/leader"), "{keys:?}");
    let catalog: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|k| !k.starts_with("/spillway/v1/weights/") && *k != "/spillway/v1/leader")
        .collect();
    assert_eq!(
        catalog,
        [
            "/spillway/v1/catalog-guard",
            "/spillway/v1/profiles/us.llama-3.1-8b",
            "/spillway/v1/regions/us-east",
            "/spillway/v1/regions/us-west",
            "/spillway/v1/routes/us.llama-3.1-8b/us-east",
        ]
    );
    let value = etcd
        .etcdctl(&[
            "get",
            "/spillway/v1/profiles/us.llama-3.1-8b",
            "--print-value-only",
        ])
        .await;
    let json: serde_json::Value =
        serde_json::from_str(value.trim()).expect("profiles are stored as JSON");
    assert_eq!(
        json["destinations"],
        serde_json::json!(["us-east", "us-west"])
    );
    assert_eq!(json["kind"], "geographic");
}

/// Many admins writing different objects at once: every write lands (the
/// catalog guard retries them in turn), none is lost.
#[tokio::test]
async fn concurrent_writes_of_different_objects_all_land() {
    let etcd = Etcd::start().await;
    let cp = ControlPlane::start(Some(&etcd.endpoint), "etcd-1").await;
    let a = cp.admin().await;
    let writes = (0..12).map(|i| {
        let mut a = a.clone();
        async move {
            a.create_region(pb::CreateRegionRequest {
                region: Some(region(&format!("r-{i}"), "g")),
            })
            .await
        }
    });
    for result in futures_util::future::join_all(writes).await {
        result.expect("every concurrent create lands");
    }
    let mut a = a.clone();
    let regions = a
        .list_regions(pb::ListRegionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .regions;
    assert_eq!(regions.len(), 12);
}

/// A route table's time-to-first-token objective, through the admin API
/// and spillctl: out of range is refused naming the field, `routes set`
/// without the flag keeps it, `--ttft-objective-ms 0` clears it, and get,
/// list and explain show it.
#[tokio::test]
async fn route_tables_carry_a_ttft_objective() {
    let cp = ControlPlane::start(None, "cp").await;
    cp.create_region("us-east", "us").await;
    cp.create_region("us-west", "us").await;
    let mut a = cp.admin().await;
    a.create_profile(pb::CreateProfileRequest {
        profile: Some(profile("us.llama-3.1-8b", &["us-east", "us-west"])),
    })
    .await
    .unwrap();
    let mut table = route("us.llama-3.1-8b", "us-east", &[("us-east", 1.0)]);
    table.ttft_objective_ms = 600_001;
    assert_refused(
        a.create_route_table(pb::CreateRouteTableRequest {
            route_table: Some(table.clone()),
        })
        .await,
        Code::InvalidArgument,
        "route_table.ttft_objective_ms",
    );
    table.ttft_objective_ms = 1500;
    let created = a
        .create_route_table(pb::CreateRouteTableRequest {
            route_table: Some(table),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.ttft_objective_ms, 1500);

    let objective = || async {
        let (ok, out, err) = cp
            .spillctl(&[
                "routes",
                "get",
                "us.llama-3.1-8b",
                "-s",
                "us-east",
                "-o",
                "json",
            ])
            .await;
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["ttft_objective_ms"].clone()
    };
    assert_eq!(objective().await, 1500);
    // Setting the destinations again keeps the objective.
    let (ok, _, err) = cp
        .spillctl(&[
            "routes",
            "set",
            "us.llama-3.1-8b",
            "-s",
            "us-east",
            "--dest",
            "us-east=1",
            "--dest",
            "us-west=1:1",
        ])
        .await;
    assert!(ok, "{err}");
    assert_eq!(objective().await, 1500);
    let (ok, out, err) = cp.spillctl(&["routes", "list"]).await;
    assert!(
        ok && out.contains("TTFT OBJECTIVE") && out.contains("1500 ms"),
        "{out}{err}"
    );
    let (ok, out, err) = cp
        .spillctl(&["routes", "explain", "us.llama-3.1-8b", "-s", "us-east"])
        .await;
    assert!(ok && out.contains("ttft objective 1500 ms"), "{out}{err}");
    // Out of range from the command line: one line naming the field.
    let (ok, _, err) = cp
        .spillctl(&[
            "routes",
            "set",
            "us.llama-3.1-8b",
            "-s",
            "us-east",
            "--dest",
            "us-east=1",
            "--ttft-objective-ms",
            "700000",
        ])
        .await;
    assert!(
        !ok && err.contains("route_table.ttft_objective_ms") && err.contains("invalid_argument"),
        "{err}"
    );
    assert_eq!(objective().await, 1500, "a refused write changed nothing");
    // 0 clears it.
    let (ok, _, err) = cp
        .spillctl(&[
            "routes",
            "set",
            "us.llama-3.1-8b",
            "-s",
            "us-east",
            "--dest",
            "us-east=1",
            "--ttft-objective-ms",
            "0",
        ])
        .await;
    assert!(ok, "{err}");
    assert_eq!(objective().await, serde_json::Value::Null);
}
