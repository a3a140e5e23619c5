//! The config stream end to end, with a real etcd and real control-plane
//! processes: updates reach agents as new versions and are ACKed; an update
//! an agent cannot apply is NACKed, reported, and the agent keeps its last
//! good config; agents outlive control planes, move to another replica and
//! boot from their persisted snapshot; a replica whose watch revision was
//! compacted relists and its agents still converge.

use std::time::Duration;

use spillway_proto::pb::{self, admin_service_client::AdminServiceClient};
use spillway_tests::{ControlPlane, Etcd, TestAgent, proxy::Proxy, wait_until};
use tonic::transport::Channel;

const MODEL: &str = "llama-3.1-8b";

async fn seed(a: &mut AdminServiceClient<Channel>) {
    for (name, geo) in [("us-east", "us"), ("us-west", "us"), ("eu-west", "eu")] {
        let region = pb::Region {
            name: name.into(),
            geography: geo.into(),
            ..Default::default()
        };
        a.create_region(pb::CreateRegionRequest {
            region: Some(region),
        })
        .await
        .unwrap();
    }
    create_profile(a, "us.llama-3.1-8b", &["us-east", "us-west"]).await;
}

async fn create_profile(a: &mut AdminServiceClient<Channel>, id: &str, dest: &[&str]) {
    let profile = pb::InferenceProfile {
        id: id.into(),
        destinations: dest.iter().map(|d| d.to_string()).collect(),
        ..Default::default()
    };
    a.create_profile(pb::CreateProfileRequest {
        profile: Some(profile),
    })
    .await
    .unwrap();
}

async fn agents(a: &mut AdminServiceClient<Channel>) -> Vec<pb::AgentStatus> {
    a.list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents
}

/// Waits until the control plane lists `agent` as having ACKed `version`
/// (or a later one: another agent joining moves the config on) through
/// `replica`.
async fn wait_acked(a: &AdminServiceClient<Channel>, agent: &str, version: u64, replica: &str) {
    wait_until(
        &format!("{agent} to be listed as ACKing {version} via {replica}"),
        Duration::from_secs(15),
        || {
            let mut a = a.clone();
            async move {
                agents(&mut a).await.iter().any(|s| {
                    s.agent_id == agent && s.acked_version >= version && s.control_plane == replica
                })
            }
        },
    )
    .await;
}

#[tokio::test]
async fn updates_are_acked_and_a_refused_update_keeps_the_last_good_config() {
    spillway_tests::init_logging();
    let etcd = Etcd::start().await;
    let cp = ControlPlane::start(Some(&etcd.endpoint), "cp-a").await;
    let mut admin = cp.admin().await;
    seed(&mut admin).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start("a1", "us-east", &[cp.url()], dir.path(), &[MODEL]).await;

    let first = agent
        .wait_for("the seeded profile", |c| {
            c.profiles.contains_key("us.llama-3.1-8b")
        })
        .await;
    // Profiles of other geographies are not sent; the default route puts the
    // source region first.
    assert_eq!(first.profiles.len(), 1);
    let route = &first.routes["us.llama-3.1-8b"];
    let source = route
        .destinations
        .iter()
        .find(|d| d.region == "us-east")
        .unwrap();
    assert_eq!(source.priority, 0);
    wait_acked(&admin, "a1", first.version, "cp-a").await;

    // An admin write arrives as a new version, which the agent ACKs.
    create_profile(&mut admin, "global.llama-3.1-8b", &["us-east", "eu-west"]).await;
    let second = agent
        .wait_for("the global profile", |c| {
            c.profiles.contains_key("global.llama-3.1-8b")
        })
        .await;
    assert!(second.version > first.version);
    wait_acked(&admin, "a1", second.version, "cp-a").await;

    // A profile that routes to us-east for a model this agent does not serve
    // cannot be applied: NACK, reported by `spillctl agents list`, and the
    // agent keeps the previous config.
    create_profile(&mut admin, "us.qwen-7b", &["us-east"]).await;
    let second_version = second.version;
    wait_until("the NACK to be recorded", Duration::from_secs(15), || {
        let mut a = admin.clone();
        async move {
            agents(&mut a)
                .await
                .iter()
                .any(|s| s.nacked_version > second_version)
        }
    })
    .await;
    let status = agents(&mut admin)
        .await
        .into_iter()
        .find(|s| s.agent_id == "a1")
        .unwrap();
    assert!(
        status.nack_reason.contains("qwen-7b"),
        "{}",
        status.nack_reason
    );
    // Weight updates may have moved the version on before the refused one;
    // the agent runs exactly what it last ACKed.
    assert!(status.acked_version >= second.version);
    assert_eq!(
        agent.version(),
        status.acked_version,
        "the agent kept its last good config"
    );
    assert!(!agent.current().unwrap().profiles.contains_key("us.qwen-7b"));

    let out = tokio::process::Command::new(spillway_tests::bin("spillctl"))
        .args(["--control-plane", &cp.url(), "agents", "list"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.lines().next().unwrap().contains("NACK REASON"),
        "{table}"
    );
    assert!(table.contains("qwen-7b"), "{table}");

    // Fixing the catalog lets the agent move on.
    admin
        .delete_profile(pb::DeleteProfileRequest {
            id: "us.qwen-7b".into(),
            revision: 0,
        })
        .await
        .unwrap();
    let third = agent
        .wait_for("a version after the fix", |c| {
            c.version > status.nacked_version
        })
        .await;
    assert!(!third.profiles.contains_key("us.qwen-7b"));
    wait_acked(&admin, "a1", third.version, "cp-a").await;
    let status = agents(&mut admin)
        .await
        .into_iter()
        .find(|s| s.agent_id == "a1")
        .unwrap();
    assert_eq!(
        (status.nacked_version, status.nack_reason.as_str()),
        (0, ""),
        "an applied newer version clears the refusal"
    );
}

#[tokio::test]
async fn agents_outlive_control_planes_and_boot_from_their_snapshot() {
    spillway_tests::init_logging();
    let etcd = Etcd::start().await;
    let mut cp_a = ControlPlane::start(Some(&etcd.endpoint), "cp-a").await;
    let mut cp_b = ControlPlane::start(Some(&etcd.endpoint), "cp-b").await;
    let mut admin_b = cp_b.admin().await;
    seed(&mut admin_b).await;
    let planes = [cp_a.url(), cp_b.url()];
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a1 = TestAgent::start("a1", "us-east", &planes, d1.path(), &[MODEL]).await;
    let a2 = TestAgent::start("a2", "us-west", &planes, d2.path(), &[MODEL]).await;
    let v1 = a1
        .wait_for("the seeded profile", |c| {
            c.profiles.contains_key("us.llama-3.1-8b")
        })
        .await
        .version;
    a2.wait_for("the seeded profile", |c| {
        c.profiles.contains_key("us.llama-3.1-8b")
    })
    .await;
    wait_acked(&admin_b, "a1", a1.version(), "cp-a").await;
    wait_acked(&admin_b, "a2", a2.version(), "cp-a").await;
    // Each agent knows the other's relay address from the snapshot.
    let cfg = a1
        .wait_for("a2's relay endpoint", |c| c.relays.contains_key("us-west"))
        .await;
    assert_eq!(cfg.relays["us-west"][0].address, a2.addr.to_string());

    // The replica both agents use dies; they keep serving their config.
    cp_a.kill().await;
    assert_eq!(a1.current().expect("config kept").version, a1.version());
    assert!(a1.version() >= v1);

    // The other replica takes them over and they converge to the latest.
    create_profile(
        &mut admin_b,
        "global.llama-3.1-8b",
        &["us-east", "us-west", "eu-west"],
    )
    .await;
    let latest = a1
        .wait_for("the profile written after the failover", |c| {
            c.profiles.contains_key("global.llama-3.1-8b")
        })
        .await;
    let latest2 = a2
        .wait_for("the profile written after the failover", |c| {
            c.profiles.contains_key("global.llama-3.1-8b")
        })
        .await;
    wait_acked(&admin_b, "a1", latest.version, "cp-b").await;
    wait_acked(&admin_b, "a2", latest2.version, "cp-b").await;

    // With no control plane left, a restarted agent boots from disk.
    cp_b.kill().await;
    a1.stop();
    drop(a1);
    let reborn = TestAgent::start("a1", "us-east", &planes, d1.path(), &[MODEL]).await;
    let cfg = reborn
        .current()
        .expect("booted from the persisted snapshot");
    assert_eq!(cfg.version, latest.version);
    assert!(cfg.profiles.contains_key("global.llama-3.1-8b"));
}

#[tokio::test]
async fn a_replica_whose_watch_revision_was_compacted_relists() {
    spillway_tests::init_logging();
    let etcd = Etcd::start().await;
    let etcd_addr = etcd.endpoint.trim_start_matches("http://").parse().unwrap();
    let link = Proxy::start(etcd_addr).await;
    // Replica A reaches etcd through a link the test can cut; B directly.
    let cp_a = ControlPlane::start(Some(&link.url()), "cp-a").await;
    let cp_b = ControlPlane::start(Some(&etcd.endpoint), "cp-b").await;
    let mut admin_b = cp_b.admin().await;
    seed(&mut admin_b).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start("a1", "us-east", &[cp_a.url()], dir.path(), &[MODEL]).await;
    agent
        .wait_for("the seeded profile", |c| {
            c.profiles.contains_key("us.llama-3.1-8b")
        })
        .await;

    // Cut A off, change the catalog, and compact etcd past A's revision.
    link.cut();
    create_profile(&mut admin_b, "global.llama-3.1-8b", &["us-east", "eu-west"]).await;
    // A second write, so that the compaction revision lies past every
    // revision A could resume from.
    create_profile(&mut admin_b, "eu.mistral-7b", &["eu-west"]).await;
    let mut etcd_client = etcd.client().await;
    let revision = etcd_client
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    etcd_client.compact(revision, None).await.unwrap();
    link.restore();

    agent
        .wait_for("the profile written while its replica was cut off", |c| {
            c.profiles.contains_key("global.llama-3.1-8b")
        })
        .await;
    let log = cp_a.log();
    assert!(
        log.contains("relisting"),
        "replica A should have relisted:\n{log}"
    );
}
