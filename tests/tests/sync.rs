//! The config stream end to end, with a real etcd and real control-plane
//! processes: updates reach agents as new versions and are ACKed; an update
//! an agent cannot apply is NACKed, reported, and the agent keeps its last
//! good config; agents outlive control planes, move to another replica and
//! boot from their persisted snapshot; a replica whose watch revision was
//! compacted relists and its agents still converge. ACKs are recorded
//! coalesced, a NACK at once, and an agent's record goes with its stream.

use std::time::Duration;

use spillway_agent::control::snapshot::{ResourceSet, apply_delta, gather};
use spillway_control_plane::store::DEFAULT_PREFIX;
use spillway_control_plane::{keys, sync::RECORD_INTERVAL};
use spillway_proto::pb::{
    self, admin_service_client::AdminServiceClient, control_service_client::ControlServiceClient,
};
use spillway_tests::{ControlPlane, Etcd, TestAgent, proxy::Proxy, wait_until};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
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
    // And so does its state dir: the applied set is the one before the
    // refused update.
    let bytes = std::fs::read(dir.path().join("applied-set.pb")).unwrap();
    let set = <pb::AppliedSet as prost::Message>::decode(bytes.as_slice()).unwrap();
    assert_eq!(set.version, status.acked_version);
    assert!(
        set.resources
            .iter()
            .any(|r| r.name == "profile/us.llama-3.1-8b")
    );
    assert!(!set.resources.iter().any(|r| r.name.ends_with("us.qwen-7b")));

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

/// An agent played by the test over a raw sync stream: it answers exactly
/// what the test tells it to, and holds the set its updates make (the set
/// before the last update again when it NACKs it, as an agent keeps its
/// previous set).
struct RawAgent {
    id: String,
    region: String,
    out: mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::ControlMessage>,
    held: ResourceSet,
    /// The set before the last update, for a NACK of it.
    previous: ResourceSet,
    /// The parts of an update so far.
    partial: Option<pb::ConfigUpdate>,
}

impl RawAgent {
    async fn connect(cp: &ControlPlane, region: &str, id: &str) -> RawAgent {
        let mut client = ControlServiceClient::connect(cp.url()).await.unwrap();
        let (out, rx) = mpsc::channel(16);
        let hello = pb::Hello {
            agent_id: id.into(),
            region: region.into(),
            relay_address: "127.0.0.1:9".into(),
            current_version: 0,
            agent_build: "test".into(),
            apis: Vec::new(),
            resources: Vec::new(),
        };
        out.send(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Hello(hello)),
        })
        .await
        .unwrap();
        let inbound = client
            .sync(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        RawAgent {
            id: id.into(),
            region: region.into(),
            out,
            inbound,
            held: ResourceSet::new(),
            previous: ResourceSet::new(),
            partial: None,
        }
    }

    /// The next config update the replica sends, applied to the set held.
    async fn update(&mut self) -> pb::ConfigUpdate {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(15), self.inbound.message())
                .await
                .expect("a config update within 15 s")
                .expect("the sync stream is healthy")
                .expect("the sync stream is open");
            if let Some(pb::control_message::Message::Update(part)) = msg.message {
                let Some(u) = gather(&mut self.partial, part) else {
                    continue;
                };
                let next = apply_delta(&self.held, &u);
                self.previous = std::mem::replace(&mut self.held, next);
                return u;
            }
        }
    }

    async fn send(&self, m: pb::agent_message::Message) {
        self.out
            .send(pb::AgentMessage { message: Some(m) })
            .await
            .unwrap();
    }

    async fn ack(&self, u: &pb::ConfigUpdate) {
        self.send(pb::agent_message::Message::Ack(pb::Ack {
            version: u.version,
            nonce: u.nonce.clone(),
        }))
        .await;
    }

    /// NACKs `u`, the last update received, and goes back to the set held
    /// before it.
    async fn nack(&mut self, u: &pb::ConfigUpdate, reason: &str) {
        self.held = self.previous.clone();
        self.send(pb::agent_message::Message::Nack(pb::Nack {
            version: u.version,
            nonce: u.nonce.clone(),
            reason: reason.into(),
        }))
        .await;
    }

    /// ACKs updates from `acked` (ACKed already) on until the set held
    /// names this agent among the endpoints (the first may predate the
    /// replica's view of its own record); returns the last one ACKed. Past
    /// it, only the test's writes send updates.
    async fn settle(&mut self, acked: pb::ConfigUpdate) -> pb::ConfigUpdate {
        let mut u = acked;
        let own = format!("endpoint/{}/{}", self.region, self.id);
        while !self.held.contains_key(&own) {
            u = self.update().await;
            self.ack(&u).await;
        }
        u
    }

    /// Whether the set held has region `name`.
    fn has_region(&self, name: &str) -> bool {
        self.held.contains_key(&format!("region/{name}"))
    }

    /// Creates region `name` and ACKs updates until the set held has it;
    /// returns how many it ACKed and the last one.
    async fn ack_region(
        &mut self,
        admin: &mut AdminServiceClient<Channel>,
        name: &str,
    ) -> (usize, pb::ConfigUpdate) {
        create_region(admin, name).await;
        let mut acks = 0;
        loop {
            let u = self.update().await;
            self.ack(&u).await;
            acks += 1;
            if self.has_region(name) {
                return (acks, u);
            }
        }
    }
}

async fn create_region(a: &mut AdminServiceClient<Channel>, name: &str) {
    let region = pb::Region {
        name: name.into(),
        geography: "us".into(),
        ..Default::default()
    };
    a.create_region(pb::CreateRegionRequest {
        region: Some(region),
    })
    .await
    .unwrap();
}

/// The agent's status as the control plane lists it.
async fn status(a: &AdminServiceClient<Channel>, agent: &str) -> Option<pb::AgentStatus> {
    let mut a = a.clone();
    agents(&mut a)
        .await
        .into_iter()
        .find(|s| s.agent_id == agent)
}

/// The etcd key of an agent's record.
fn record_key(region: &str, agent: &str) -> String {
    format!("{DEFAULT_PREFIX}{}", keys::agent(region, agent))
}

/// How many times the agent's record was written since it was created
/// (etcd's version of the key); 0 when there is none.
async fn record_writes(etcd: &mut etcd_client::Client, region: &str, agent: &str) -> i64 {
    let resp = etcd.get(record_key(region, agent), None).await.unwrap();
    resp.kvs().first().map_or(0, |kv| kv.version())
}

/// ACKs of a burst of updates are written at most once per
/// `RECORD_INTERVAL` (plus the write that shows the agent caught up after
/// one that caught it behind), and the record converges to the last ACK;
/// an ACK already recorded writes nothing; a NACK and the ACK that clears
/// it are written at once.
#[tokio::test]
async fn acks_are_recorded_coalesced_and_a_nack_at_once() {
    spillway_tests::init_logging();
    let etcd = Etcd::start().await;
    let mut store = etcd.client().await;
    let cp = ControlPlane::start(Some(&etcd.endpoint), "cp-a").await;
    let mut admin = cp.admin().await;
    // Regions only: no profile, so no weights or quota leases move the
    // config on behind the test's back.
    create_region(&mut admin, "us-east").await;
    let mut agent = RawAgent::connect(&cp, "us-east", "raw").await;

    // The first ACK is written at once.
    let first = agent.update().await;
    agent.ack(&first).await;
    wait_until(
        "the first ACK to be listed at once",
        // (That it is written at once, not coalesced, is the policy's unit
        // test, on a simulated clock: a wall clock would be flaky here.)
        Duration::from_secs(15),
        || async {
            status(&admin, "raw")
                .await
                .is_some_and(|s| s.acked_version >= first.version)
        },
    )
    .await;
    let mut last = agent.settle(first).await;

    // A burst of updates, each ACKed as it arrives.
    let before = record_writes(&mut store, "us-east", "raw").await;
    let start = Instant::now();
    let mut acks = 0;
    for i in 0..20 {
        let (n, u) = agent.ack_region(&mut admin, &format!("burst-{i}")).await;
        acks += n;
        last = u;
    }
    // The record converges to the last version sent and ACKed.
    wait_until(
        "the record to converge to the last ACK",
        RECORD_INTERVAL * 5,
        || async {
            status(&admin, "raw")
                .await
                .is_some_and(|s| (s.sent_version, s.acked_version) == (last.version, last.version))
        },
    )
    .await;
    let written = record_writes(&mut store, "us-east", "raw").await - before;
    let intervals = (start.elapsed().as_secs_f64() / RECORD_INTERVAL.as_secs_f64()).floor() as i64;
    let bound = 2 * (intervals + 1);
    assert!(
        written <= bound && (written as usize) < acks,
        "{acks} ACKs over {:?} made {written} record writes (at most {bound})",
        start.elapsed()
    );

    // An ACK of the version recorded writes nothing; the NACK of the next
    // update is written at once, with its reason and the version sent.
    let before = record_writes(&mut store, "us-east", "raw").await;
    agent.ack(&last).await;
    create_region(&mut admin, "refused").await;
    let refused = agent.update().await;
    assert!(agent.has_region("refused"));
    agent
        .nack(&refused, "the test refuses region `refused`")
        .await;
    wait_until(
        "the NACK to be listed at once",
        // (That it is written at once, not coalesced, is the policy's unit
        // test, on a simulated clock: a wall clock would be flaky here.)
        Duration::from_secs(15),
        || async {
            status(&admin, "raw").await.is_some_and(|s| {
                s.nacked_version == refused.version
                    && s.nack_reason == "the test refuses region `refused`"
                    && s.sent_version == refused.version
                    && s.acked_version == last.version
            })
        },
    )
    .await;
    assert_eq!(
        record_writes(&mut store, "us-east", "raw").await - before,
        1,
        "one write: the NACK's (the repeated ACK wrote nothing)"
    );
    let (ok, table, stderr) = cp.spillctl(&["agents", "list"]).await;
    assert!(ok, "{stderr}");
    assert!(
        table.contains("the test refuses region `refused`"),
        "{table}"
    );

    // The ACK that moves past the refusal clears it at once.
    let (_, fixed) = agent.ack_region(&mut admin, "accepted").await;
    wait_until(
        "the cleared NACK to be listed at once",
        // (That it is written at once, not coalesced, is the policy's unit
        // test, on a simulated clock: a wall clock would be flaky here.)
        Duration::from_secs(15),
        || async {
            status(&admin, "raw").await.is_some_and(|s| {
                (s.acked_version, s.nacked_version, s.nack_reason.as_str())
                    == (fixed.version, 0, "")
            })
        },
    )
    .await;
}

/// A stream that ends with a record write pending drops it: the record
/// goes, and nothing writes it back.
#[tokio::test]
async fn a_pending_record_write_does_not_outlive_its_stream() {
    spillway_tests::init_logging();
    let etcd = Etcd::start().await;
    let mut store = etcd.client().await;
    let cp = ControlPlane::start(Some(&etcd.endpoint), "cp-a").await;
    let mut admin = cp.admin().await;
    create_region(&mut admin, "us-east").await;
    let mut agent = RawAgent::connect(&cp, "us-east", "raw").await;
    let first = agent.update().await;
    agent.ack(&first).await;
    let settled = agent.settle(first).await;
    wait_until("the agent's record", Duration::from_secs(15), || async {
        status(&admin, "raw").await.is_some_and(|s| {
            s.acked_version == settled.version && s.sent_version == s.acked_version
        })
    })
    .await;
    let key = record_key("us-east", "raw");
    let from = store.get(key.as_str(), None).await.unwrap().kvs()[0].mod_revision() + 1;
    let mut watch = store
        .watch(
            key,
            Some(etcd_client::WatchOptions::new().with_start_revision(from)),
        )
        .await
        .unwrap();

    // The next ACK waits for its coalesced write; the agent leaves first.
    agent.ack_region(&mut admin, "pending").await;
    drop(agent);
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !events.contains(&etcd_client::EventType::Delete) {
        let resp = tokio::time::timeout_at(deadline, watch.message())
            .await
            .expect("the record removed within 15 s")
            .unwrap()
            .expect("the watch is open");
        events.extend(resp.events().iter().map(|e| e.event_type()));
    }
    assert_eq!(
        events.last(),
        Some(&etcd_client::EventType::Delete),
        "the record is removed last: {events:?}"
    );
    // Nothing writes it back, not even once the dropped write was due.
    let late = tokio::time::timeout(RECORD_INTERVAL * 2, watch.message()).await;
    assert!(
        late.is_err(),
        "the record came back after the stream ended: {late:?}"
    );
    assert_eq!(record_writes(&mut store, "us-east", "raw").await, 0);
}
