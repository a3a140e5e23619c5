//! The incremental config stream end to end, with a real etcd, real
//! control-plane processes and real agents:
//!
//! - through a random sequence of admin writes, agents joining, leaving and
//!   restarting, weights and quota-lease records, a replica cut off while
//!   etcd compacts (it relists) and a replica killed (its agents move), the
//!   set of resources every agent has applied (its state dir) equals what
//!   a replica holds for the agent's region;
//! - an agent restarted from its state dir receives only what changed while
//!   it was away.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use prost::Message;
use spillway_agent::control::snapshot::gather;
use spillway_control_plane::keys::{self, LeaseRecord, QuotaGrant, WeightsRecord};
use spillway_control_plane::store::DEFAULT_PREFIX;
use spillway_control_plane::weights::{Reason, Weight};
use spillway_proto::pb::{
    self, admin_service_client::AdminServiceClient, control_service_client::ControlServiceClient,
};
use spillway_tests::{ControlPlane, Etcd, TestAgent, proxy::Proxy, wait_until};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Profile ids name their model (`us.m3` serves `m3`); every agent
/// serves all the models the tests use, so that no table is refused.
async fn start_agent(id: &str, region: &str, planes: &[String], dir: &Path) -> TestAgent {
    let models: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    let models: Vec<&str> = models.iter().map(String::as_str).collect();
    TestAgent::start(id, region, planes, dir, &models).await
}
const REGIONS: [(&str, &str); 3] = [("us-east", "us"), ("us-west", "us"), ("eu-west", "eu")];

async fn create_regions(a: &mut AdminServiceClient<Channel>) {
    for (name, geo) in REGIONS {
        a.create_region(pb::CreateRegionRequest {
            region: Some(pb::Region {
                name: name.into(),
                geography: geo.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    }
}

async fn create_profile(a: &mut AdminServiceClient<Channel>, id: &str, dest: &[&str]) {
    a.create_profile(pb::CreateProfileRequest {
        profile: Some(pb::InferenceProfile {
            id: id.into(),
            destinations: dest.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
}

/// Sets a profile's description (reading it first, for its revision).
async fn describe(a: &mut AdminServiceClient<Channel>, id: &str, description: &str) {
    let mut p = a
        .get_profile(pb::GetProfileRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner();
    p.description = description.into();
    a.update_profile(pb::UpdateProfileRequest { profile: Some(p) })
        .await
        .unwrap();
}

/// Resources as (name → version).
type Versions = BTreeMap<String, u64>;

/// What an agent has applied, from its state dir; empty when it has
/// nothing there yet.
fn applied(state_dir: &Path) -> Versions {
    let Ok(bytes) = std::fs::read(state_dir.join("applied-set.pb")) else {
        return Versions::new();
    };
    let set = pb::AppliedSet::decode(bytes.as_slice()).expect("a readable applied set");
    set.resources
        .into_iter()
        .map(|r| (r.name, r.version))
        .collect()
}

/// Whether `name` is the endpoint of a probe (see `view`): probes come and
/// go while the test looks, so neither side's copy of them is compared.
fn is_probe(name: &str) -> bool {
    name.starts_with("endpoint/") && name.contains("/probe-")
}

/// What `cp` holds for agents of `region`: the first update of a stream
/// opened with an empty hello is the region's whole view.
async fn view(cp: &ControlPlane, region: &str, probe: u32) -> Versions {
    let mut client = ControlServiceClient::connect(cp.url()).await.unwrap();
    let (out, rx) = mpsc::channel(4);
    let hello = pb::Hello {
        agent_id: format!("probe-{probe}"),
        region: region.into(),
        relay_address: "127.0.0.1:9".into(),
        agent_build: "test".into(),
        ..Default::default()
    };
    out.send(pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(hello)),
    })
    .await
    .unwrap();
    let mut inbound = client
        .sync(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut partial = None;
    let update = loop {
        let msg = tokio::time::timeout(Duration::from_secs(15), inbound.message())
            .await
            .expect("a first update within 15 s")
            .expect("a healthy stream")
            .expect("an open stream");
        if let Some(pb::control_message::Message::Update(part)) = msg.message
            && let Some(u) = gather(&mut partial, part)
        {
            break u;
        }
    };
    assert!(
        update.removed.is_empty(),
        "nothing to remove from an empty set"
    );
    let _ = out
        .send(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Goodbye(pb::Goodbye {})),
        })
        .await;
    update
        .resources
        .into_iter()
        .map(|r| (r.name, r.version))
        .collect()
}

fn without_probes(v: &Versions) -> Versions {
    v.iter()
        .filter(|(n, _)| !is_probe(n))
        .map(|(n, v)| (n.clone(), *v))
        .collect()
}

/// One agent slot of the test: its identity, state dir and, while it runs,
/// the agent.
struct Slot {
    id: String,
    region: &'static str,
    dir: tempfile::TempDir,
    agent: Option<TestAgent>,
}

/// Waits until every running agent's applied set is `cp`'s view of its
/// region (probes aside), and that view holds every profile `expect` names
/// for it; then checks once more that nothing was NACKed.
async fn converged(cp: &ControlPlane, slots: &[Slot], probes: &mut u32, when: &str) {
    for s in slots.iter().filter(|s| s.agent.is_some()) {
        let mut last = (Versions::new(), Versions::new());
        let ok = tokio::time::timeout(Duration::from_secs(45), async {
            loop {
                *probes += 1;
                let want = without_probes(&view(cp, s.region, *probes).await);
                let got = without_probes(&applied(s.dir.path()));
                if want == got && !want.is_empty() {
                    return;
                }
                last = (want, got);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        if ok.is_err() {
            let (want, got) = last;
            let missing: Vec<_> = want
                .iter()
                .filter(|(n, v)| got.get(*n) != Some(v))
                .collect();
            let extra: Vec<_> = got.iter().filter(|(n, _)| !want.contains_key(*n)).collect();
            panic!(
                "{when}: agent {} ({}) did not converge on the replica's view within 45 s\nmissing or other version: {missing:?}\nextra: {extra:?}",
                s.id, s.region
            );
        }
    }
}

/// A small xorshift, so that a failing sequence can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// What the random walk can do next.
struct Walk {
    rng: Rng,
    /// Profiles created and not deleted, by id.
    profiles: Vec<String>,
    tenants: Vec<String>,
    next_id: usize,
    etcd: etcd_client::Client,
}

impl Walk {
    /// One random change through `admin` (and etcd, for the records only
    /// the leader writes), or an agent joining, leaving or restarting.
    async fn step(
        &mut self,
        admin: &mut AdminServiceClient<Channel>,
        slots: &mut [Slot],
        planes: &[String],
    ) -> String {
        self.next_id += 1;
        let n = self.next_id;
        match self.rng.below(10) {
            0 | 1 => {
                let (id, dest): (String, &[&str]) = match self.rng.below(3) {
                    0 => (format!("us.m{n}"), &["us-east", "us-west"]),
                    1 => (format!("eu.m{n}"), &["eu-west"]),
                    _ => (format!("global.m{n}"), &["us-east", "us-west", "eu-west"]),
                };
                create_profile(admin, &id, dest).await;
                self.profiles.push(id.clone());
                format!("create profile {id}")
            }
            2 if !self.profiles.is_empty() => {
                let id = self.profiles[self.rng.below(self.profiles.len())].clone();
                describe(admin, &id, &format!("step {n}")).await;
                format!("describe {id}")
            }
            3 if self.profiles.len() > 2 => {
                let id = self.profiles.remove(self.rng.below(self.profiles.len()));
                admin
                    .delete_profile(pb::DeleteProfileRequest {
                        id: id.clone(),
                        revision: 0,
                    })
                    .await
                    .unwrap();
                format!("delete profile {id}")
            }
            4 => {
                let name = format!("t{n}");
                admin
                    .create_tenant(pb::CreateTenantRequest {
                        tenant: Some(pb::Tenant {
                            name: name.clone(),
                            profiles: vec!["*".into()],
                            ..Default::default()
                        }),
                    })
                    .await
                    .unwrap();
                admin
                    .create_key(pb::CreateKeyRequest {
                        tenant: name.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                self.tenants.push(name.clone());
                format!("create tenant {name} and a key")
            }
            5 if !self.profiles.is_empty() => {
                // Weights as the leader writes them (it may rewrite them).
                let id = self.profiles[self.rng.below(self.profiles.len())].clone();
                let source = REGIONS[self.rng.below(3)].0;
                let share = self.rng.below(5) as f64 / 4.0;
                let record = WeightsRecord {
                    profile: id.clone(),
                    source_region: source.into(),
                    weights: vec![
                        Weight {
                            region: "us-east".into(),
                            weight: share,
                            reason: Reason::Spill,
                        },
                        Weight {
                            region: "us-west".into(),
                            weight: 1.0 - share,
                            reason: Reason::Spill,
                        },
                    ],
                    leader: "test".into(),
                    basis: String::new(),
                };
                self.put(&keys::weights(&id, source), keys::encode(&record))
                    .await;
                format!("weights of {id} from {source}")
            }
            6 => {
                // Quota leases: not part of the set, they must not disturb it.
                let s = &slots[self.rng.below(slots.len())];
                let record = LeaseRecord {
                    agent_id: s.id.clone(),
                    region: s.region.into(),
                    leader: "test".into(),
                    granted_at_ms: 0,
                    lease_ms: 1000,
                    grants: vec![QuotaGrant {
                        quota_id: "none".into(),
                        amounts: [1.0, 1.0, 1.0],
                        sharing_agents: 1,
                    }],
                };
                self.put(&keys::leases(s.region, &s.id), keys::encode(&record))
                    .await;
                format!("leases of {}", s.id)
            }
            _ => {
                let i = self.rng.below(slots.len());
                let s = &mut slots[i];
                match s.agent.take() {
                    Some(a) if self.rng.below(2) == 0 => {
                        a.stop();
                        drop(a);
                        format!("{} leaves", s.id)
                    }
                    Some(a) => {
                        a.stop();
                        drop(a);
                        s.agent = Some(start_agent(&s.id, s.region, planes, s.dir.path()).await);
                        format!("{} restarts from its state dir", s.id)
                    }
                    None => {
                        s.agent = Some(start_agent(&s.id, s.region, planes, s.dir.path()).await);
                        format!("{} joins", s.id)
                    }
                }
            }
        }
    }

    async fn put(&mut self, key: &str, value: Vec<u8>) {
        self.etcd
            .put(format!("{DEFAULT_PREFIX}{key}"), value, None)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn every_agent_applies_what_the_replica_holds_for_its_region() {
    spillway_tests::init_logging();
    let etcd = Etcd::start().await;
    let link = Proxy::start(etcd.endpoint.trim_start_matches("http://").parse().unwrap()).await;
    // Replica A reaches etcd through a link the test can cut; B directly.
    let cp_a = ControlPlane::start(Some(&link.url()), "cp-a").await;
    let mut cp_b = ControlPlane::start(Some(&etcd.endpoint), "cp-b").await;
    let mut admin_b = cp_b.admin().await;
    create_regions(&mut admin_b).await;
    create_profile(&mut admin_b, "us.m199", &["us-east", "us-west"]).await;
    let planes = [cp_b.url(), cp_a.url()];
    let mut slots: Vec<Slot> = [
        ("a1", "us-east"),
        ("a2", "us-west"),
        ("a3", "eu-west"),
        ("a4", "us-east"),
    ]
    .into_iter()
    .map(|(id, region)| Slot {
        id: id.into(),
        region,
        dir: tempfile::tempdir().unwrap(),
        agent: None,
    })
    .collect();
    for s in slots.iter_mut().take(3) {
        s.agent = Some(start_agent(&s.id, s.region, &planes, s.dir.path()).await);
    }
    let mut walk = Walk {
        rng: Rng(0x5eed_1234_abcd_0001),
        profiles: vec!["us.m199".into()],
        tenants: Vec::new(),
        next_id: 0,
        etcd: etcd.client().await,
    };
    let mut probes = 0;
    let mut done = Vec::new();

    // Phase 1: both replicas up.
    for _ in 0..15 {
        done.push(walk.step(&mut admin_b, &mut slots, &planes).await);
    }
    tracing::info!(steps = ?done, "phase 1");
    converged(&cp_a, &slots, &mut probes, "after phase 1").await;

    // Phase 2: A is cut off while the catalog moves and etcd compacts past
    // its revision; restored, it relists.
    link.cut();
    for _ in 0..8 {
        done.push(walk.step(&mut admin_b, &mut slots, &planes).await);
    }
    let revision = walk
        .etcd
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    walk.etcd.compact(revision, None).await.unwrap();
    link.restore();
    wait_until(
        "replica A to relist after the compaction",
        Duration::from_secs(30),
        || std::future::ready(cp_a.log().contains("relisting")),
    )
    .await;
    converged(&cp_a, &slots, &mut probes, "after the relist").await;
    converged(&cp_b, &slots, &mut probes, "after the relist, seen from B").await;

    // Phase 3: B dies; its agents move to A, which takes the writes.
    cp_b.kill().await;
    let mut admin_a = cp_a.admin().await;
    for _ in 0..12 {
        done.push(walk.step(&mut admin_a, &mut slots, &planes).await);
    }
    tracing::info!(steps = ?done, "all steps");
    converged(&cp_a, &slots, &mut probes, "after the failover").await;

    // The walk did what it was meant to: several kinds of change, agents
    // coming and going.
    let kinds = |p: &str| done.iter().filter(|d| d.contains(p)).count();
    assert!(
        kinds("create profile") > 0 && kinds("weights") > 0 && kinds("leases") > 0,
        "{done:?}"
    );
    assert!(
        kinds("joins") + kinds("restarts") + kinds("leaves") > 0,
        "{done:?}"
    );
}

/// `spillway_cp_resources_sent_total` by kind, from a replica's metrics.
async fn resources_sent(http: &spillway_tests::cluster::Http, cp: &ControlPlane) -> Versions {
    let answer = http.get(cp.metrics_addr().await, "/metrics").await;
    assert_eq!(answer.status, 200);
    String::from_utf8_lossy(&answer.body)
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("spillway_cp_resources_sent_total{kind=\"")?;
            let (kind, value) = rest.split_once("\"} ")?;
            Some((kind.to_string(), value.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

#[tokio::test]
async fn an_agent_restarted_from_its_state_dir_receives_only_what_changed() {
    spillway_tests::init_logging();
    let etcd = Etcd::start().await;
    let cp = ControlPlane::start_with(
        Some(&etcd.endpoint),
        "cp-a",
        &["--metrics-listen", "127.0.0.1:0"],
    )
    .await;
    let mut admin = cp.admin().await;
    create_regions(&mut admin).await;
    for i in 0..30 {
        create_profile(&mut admin, &format!("us.m{i}"), &["us-east", "us-west"]).await;
    }
    let planes = [cp.url()];
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent("a1", "us-east", &planes, dir.path()).await;
    agent
        .wait_for("the 30 profiles", |c| c.profiles.len() == 30)
        .await;
    let mut probes = 0;
    let slot = [Slot {
        id: "a1".into(),
        region: "us-east",
        dir,
        agent: Some(agent),
    }];
    converged(&cp, &slot, &mut probes, "before the restart").await;
    let [mut slot] = slot;
    let agent = slot.agent.take().unwrap();
    agent.stop();
    drop(agent);
    wait_until("a1 to be gone", Duration::from_secs(15), || {
        let mut a = admin.clone();
        async move {
            !a.list_agents(pb::ListAgentsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .agents
                .iter()
                .any(|s| s.agent_id == "a1")
        }
    })
    .await;

    // While it is away: one profile changes and one goes.
    describe(&mut admin, "us.m3", "changed while a1 was away").await;
    admin
        .delete_profile(pb::DeleteProfileRequest {
            id: "us.m7".into(),
            revision: 0,
        })
        .await
        .unwrap();
    let http = spillway_tests::cluster::Http::default();
    let before = resources_sent(&http, &cp).await;
    let agent = start_agent("a1", "us-east", &planes, slot.dir.path()).await;
    assert_eq!(
        agent
            .current()
            .expect("booted from its state dir")
            .profiles
            .len(),
        30,
        "the state dir held the set from before"
    );
    let cfg = agent
        .wait_for("the change made while it was away", |c| {
            c.profiles.len() == 29 && c.profiles["us.m3"].description == "changed while a1 was away"
        })
        .await;
    assert!(!cfg.profiles.contains_key("us.m7"));
    // Once it has ACKed that, everything it was sent is counted.
    let version = cfg.version;
    wait_until("a1 to ACK the change", Duration::from_secs(15), || {
        let mut a = admin.clone();
        async move {
            a.list_agents(pb::ListAgentsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .agents
                .iter()
                .any(|s| s.agent_id == "a1" && s.acked_version >= version)
        }
    })
    .await;
    let after = resources_sent(&http, &cp).await;
    let sent: Versions = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect();
    // The changed profile, the removals of the deleted profile and its
    // route table (and of the agent's own endpoint as it was, and of probe
    // endpoints it held), and at most its own endpoint back; not the 30
    // profiles, their route tables and the regions again.
    assert_eq!(sent.get("profile"), Some(&1), "{sent:?}");
    assert!(sent.get("removed").is_some_and(|n| *n >= 2), "{sent:?}");
    assert!(sent.get("endpoint").is_none_or(|n| *n <= 1), "{sent:?}");
    for kind in [
        "route",
        "region",
        "weights",
        "elsewhere",
        "quota",
        "tenant",
        "key",
    ] {
        assert_eq!(sent.get(kind), None, "{kind} sent again: {sent:?}");
    }
    slot.agent = Some(agent);
    converged(
        &cp,
        std::slice::from_ref(&slot),
        &mut probes,
        "after the restart",
    )
    .await;
}
