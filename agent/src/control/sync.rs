//! The agent's side of the config stream. It holds the resources it last
//! applied, names them (with their versions) in its hello so that the
//! control plane sends only what changed, and applies each update to them
//! whole or not at all: ACKs the set it applies (and publishes its config
//! in a `tokio::sync::watch`), NACKs (with the reason) one it cannot,
//! keeping the previous set and config. It reconnects with exponential
//! backoff and jitter, moving through the listed control planes. On
//! shutdown it says goodbye, so that the control plane drops it at once
//! from what every other agent receives, and stops; nothing else (the
//! agent's servers may go on answering the calls they have).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use spillway_core::backoff::Backoff;
use spillway_core::shutdown::Shutdown;
use spillway_proto::pb::{self, control_service_client::ControlServiceClient};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Endpoint;

use crate::control::persist;
use crate::control::snapshot::{self, AgentConfig, LocalCapabilities, ResourceSet, gather};
use crate::net::connect::TlsConnect;
use crate::quota::Quotas;

/// Updates larger than this are refused by the transport (a receive
/// limit, so that a broken control plane cannot exhaust the agent).
const MAX_UPDATE_BYTES: usize = 32 * 1024 * 1024;

/// An update sent in parts larger than this in all is refused (the stream
/// ends): the same guard for the gathered whole.
const MAX_SET_BYTES: usize = 256 * 1024 * 1024;

/// The config protocol this agent speaks (`ConfigUpdate.protocol`).
const PROTOCOL: u32 = 2;

/// How long, after its goodbye, the agent waits for the control plane to
/// close the stream (which it does once no other agent is sent its relay
/// address).
const GOODBYE_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub agent_id: String,
    pub region: String,
    pub relay_address: String,
    /// Control-plane URLs, tried in turn.
    pub control_planes: Vec<String>,
    pub state_dir: PathBuf,
    pub local: LocalCapabilities,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Where load reports come from, and how often they are sent.
    pub load: Option<LoadSource>,
    pub report_interval: Duration,
    /// Where the leader's quota leases go.
    pub quotas: Arc<Quotas>,
    /// TLS to the control planes (`https://` URLs), with this agent's
    /// certificate, accepting only control-plane certificates.
    pub tls: Option<TlsConnect>,
}

/// Makes a load report covering the given interval (counters restart).
#[derive(Clone)]
pub struct LoadSource(pub Arc<dyn Fn(Duration) -> pb::LoadReport + Send + Sync>);

impl std::fmt::Debug for LoadSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadSource")
    }
}

/// The latest good config; `None` until one was received or loaded. Its
/// sender goes when the sync has stopped after shutdown (once the control
/// plane took the goodbye, or the wait for that ran out), so a receiver's
/// `changed()` failing says the agent is done with the control plane.
pub type ConfigWatch = watch::Receiver<Option<Arc<AgentConfig>>>;

/// Loads the persisted resource set (if any), then follows the control
/// planes until `shutdown`.
pub async fn start(settings: SyncSettings, shutdown: Shutdown) -> ConfigWatch {
    let (tx, rx) = watch::channel(None);
    let held = boot_set(&settings)
        .await
        .map_or_else(ResourceSet::new, |(set, cfg)| {
            tx.send_replace(Some(Arc::new(cfg)));
            set
        });
    tokio::spawn(follow(settings, tx, held, shutdown));
    rx
}

/// The persisted set and its config, when there is one for this region
/// that still applies (this agent's model servers may have changed since).
async fn boot_set(settings: &SyncSettings) -> Option<(ResourceSet, AgentConfig)> {
    let applied = persist::load(&settings.state_dir).await?;
    if applied.region != settings.region {
        tracing::warn!(
            persisted_region = %applied.region,
            region = %settings.region,
            "the persisted resource set is for another region; ignoring it"
        );
        return None;
    }
    let set: ResourceSet = applied
        .resources
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    match AgentConfig::from_resources(applied.version, &settings.region, &set, &settings.local) {
        Ok(cfg) => {
            tracing::info!(
                version = cfg.version,
                resources = set.len(),
                "booting with the persisted config"
            );
            Some((set, cfg))
        }
        Err(reason) => {
            tracing::warn!(%reason, "the persisted config does not apply; ignoring it");
            None
        }
    }
}

/// Follows the control planes, from `held` (the set the published config
/// was made from, empty when none was), until `shutdown`.
async fn follow(
    settings: SyncSettings,
    tx: watch::Sender<Option<Arc<AgentConfig>>>,
    mut held: ResourceSet,
    mut shutdown: Shutdown,
) {
    let mut backoff = Backoff::new(settings.backoff_base, settings.backoff_max);
    let mut next = 0usize;
    loop {
        let endpoint = &settings.control_planes[next % settings.control_planes.len()];
        next += 1;
        let mut stop = shutdown.clone();
        let ended = tokio::select! {
            ended = stream_once(endpoint, &settings, &tx, &mut held, shutdown.clone()) => ended,
            // The stream says goodbye itself; this bounds it, whatever it
            // was waiting on when shutdown fired (a full send queue, a slow
            // disk), to the goodbye's own wait and as long again.
            _ = async { stop.wait().await; tokio::time::sleep(2 * GOODBYE_WAIT).await } => Ok(Ended::Left),
        };
        match ended {
            Ok(Ended::Left) => return,
            Ok(Ended::Delivered) => {
                tracing::warn!(control_plane = %endpoint, "config stream ended; reconnecting");
                backoff.reset();
            }
            Err(e) => tracing::warn!(control_plane = %endpoint, error = %e, "config stream failed"),
        }
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// How a stream ended without failing.
enum Ended {
    /// It delivered at least one update first: the caller resets its
    /// backoff.
    Delivered,
    /// Shutdown: the agent said goodbye (or had no stream to say it on).
    Left,
}

/// One stream to one control plane: hello, then apply updates until it
/// ends or `shutdown` fires.
async fn stream_once(
    endpoint: &str,
    settings: &SyncSettings,
    tx: &watch::Sender<Option<Arc<AgentConfig>>>,
    held: &mut ResourceSet,
    mut shutdown: Shutdown,
) -> Result<Ended, String> {
    let (out, mut inbound) = tokio::select! {
        _ = shutdown.wait() => return Ok(Ended::Left),
        opened = open(endpoint, settings, tx, held) => opened?,
    };
    tracing::info!(control_plane = %endpoint, "config stream open");
    let mut got_any = false;
    let mut reports = tokio::time::interval(settings.report_interval);
    reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report = tokio::time::Instant::now();
    // The parts of an update that came so far (`ConfigUpdate.more`).
    let mut partial = None;
    let mut gathered = 0;
    loop {
        let next = tokio::select! {
            _ = shutdown.wait() => {
                goodbye(endpoint, &out, &mut inbound).await;
                return Ok(Ended::Left);
            }
            m = inbound.message() => m,
            _ = reports.tick() => {
                if let Some(load) = &settings.load {
                    let now = tokio::time::Instant::now();
                    let report = (load.0)(now - last_report);
                    last_report = now;
                    // A report never waits: when the stream is backed up, this
                    // one is dropped (the next carries the counters on).
                    let msg = pb::AgentMessage { message: Some(pb::agent_message::Message::Load(report)) };
                    if let Err(mpsc::error::TrySendError::Closed(_)) = out.try_send(msg) {
                        return Err("the stream is gone".into());
                    }
                }
                continue;
            }
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) if got_any => return Ok(Ended::Delivered),
            Ok(None) => return Err("closed before the first update".into()),
            Err(s) if got_any => {
                tracing::warn!(error = %s.message(), "config stream broke");
                return Ok(Ended::Delivered);
            }
            Err(s) => return Err(s.message().to_string()),
        };
        let msg_bytes = prost::Message::encoded_len(&msg);
        let update = match msg.message {
            Some(pb::control_message::Message::Update(update)) => update,
            Some(pb::control_message::Message::Leases(leases)) => {
                settings.quotas.apply_leases(&leases);
                continue;
            }
            None => continue,
        };
        got_any = true;
        // The parts of one update come one after another, and add up to no
        // more than an agent takes: anything else is a broken stream, and a
        // new one (whose hello names what the agent holds) starts afresh.
        if partial
            .as_ref()
            .is_some_and(|p: &pb::ConfigUpdate| p.nonce != update.nonce)
        {
            return Err("an update ended before its last part".into());
        }
        gathered += msg_bytes;
        if gathered > MAX_SET_BYTES {
            return Err(format!(
                "an update in parts grew past {} MiB",
                MAX_SET_BYTES / (1024 * 1024)
            ));
        }
        let Some(update) = gather(&mut partial, update) else {
            continue;
        };
        gathered = 0;
        let reply = apply(&update, settings, tx, held).await;
        send(&out, reply).await?;
    }
}

/// Tells the control plane that this agent is leaving, and waits (up to
/// [`GOODBYE_WAIT`]) for it to close the stream: by then no other agent is
/// sent its relay address, so other regions stop relaying to it. A control plane
/// of an older build ignores the goodbye; it drops the agent when the
/// stream goes, at the end of the wait.
async fn goodbye(
    endpoint: &str,
    out: &mpsc::Sender<pb::AgentMessage>,
    inbound: &mut Streaming<pb::ControlMessage>,
) {
    let said = async {
        send(out, pb::agent_message::Message::Goodbye(pb::Goodbye {})).await?;
        // Updates that cross the goodbye are not applied: the agent keeps
        // the config it serves its last calls with.
        while let Ok(Some(_)) = inbound.message().await {}
        Ok::<(), String>(())
    };
    match tokio::time::timeout(GOODBYE_WAIT, said).await {
        Ok(Ok(())) => {
            tracing::info!(control_plane = %endpoint, "said goodbye to the control plane")
        }
        Ok(Err(e)) => {
            tracing::info!(control_plane = %endpoint, error = %e, "could not say goodbye")
        }
        Err(_) => tracing::warn!(
            control_plane = %endpoint,
            "the control plane did not close the stream within {GOODBYE_WAIT:?} of the goodbye; leaving anyway"
        ),
    }
}

/// Connects and says hello, naming the resources held: the stream's
/// outbound queue and its inbound half.
async fn open(
    endpoint: &str,
    settings: &SyncSettings,
    tx: &watch::Sender<Option<Arc<AgentConfig>>>,
    held: &ResourceSet,
) -> Result<
    (
        mpsc::Sender<pb::AgentMessage>,
        Streaming<pb::ControlMessage>,
    ),
    String,
> {
    let ep = match &settings.tls {
        Some(_) => TlsConnect::endpoint(endpoint)?,
        None => Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("bad control-plane address `{endpoint}`: {e}"))?,
    };
    let ep = ep
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let channel = match &settings.tls {
        Some(tls) => ep
            .connect_with_connector(tls.clone())
            .await
            .map_err(|e| format!("connect: {e}"))?,
        None => ep.connect().await.map_err(|e| format!("connect: {e}"))?,
    };
    let mut client = ControlServiceClient::new(channel).max_decoding_message_size(MAX_UPDATE_BYTES);
    let (out, out_rx) = mpsc::channel(8);
    let current_version = tx.borrow().as_ref().map_or(0, |c| c.version);
    let hello = pb::Hello {
        agent_id: settings.agent_id.clone(),
        region: settings.region.clone(),
        relay_address: settings.relay_address.clone(),
        current_version,
        agent_build: env!("CARGO_PKG_VERSION").to_string(),
        apis: settings.local.apis.names(),
        resources: held
            .values()
            .map(|r| pb::ResourceVersion {
                name: r.name.clone(),
                version: r.version,
            })
            .collect(),
    };
    send(&out, pb::agent_message::Message::Hello(hello)).await?;
    let inbound = client
        .sync(ReceiverStream::new(out_rx))
        .await
        .map_err(|s| format!("sync refused: {}", s.message()))?
        .into_inner();
    Ok((out, inbound))
}

/// Applies one update to the held set, or says why not (and then keeps
/// the set and the published config as they are); returns the ACK or NACK
/// to send.
async fn apply(
    update: &pb::ConfigUpdate,
    settings: &SyncSettings,
    tx: &watch::Sender<Option<Arc<AgentConfig>>>,
    held: &mut ResourceSet,
) -> pb::agent_message::Message {
    if update.protocol != PROTOCOL {
        let reason = format!(
            "the update speaks config protocol {} (a control plane of an older build sends full snapshots); this agent speaks {PROTOCOL}: upgrade the control planes first",
            update.protocol
        );
        tracing::warn!(version = update.version, %reason, "config refused");
        return pb::agent_message::Message::Nack(pb::Nack {
            version: update.version,
            nonce: update.nonce.clone(),
            reason,
        });
    }
    let candidate = snapshot::apply_delta(held, update);
    match AgentConfig::from_resources(
        update.version,
        &settings.region,
        &candidate,
        &settings.local,
    ) {
        Ok(cfg) => {
            let applied = pb::AppliedSet {
                version: update.version,
                region: settings.region.clone(),
                resources: candidate.values().cloned().collect(),
            };
            if let Err(e) = persist::save(&settings.state_dir, &applied).await {
                // Serving goes on; only a later boot without a control plane
                // would miss this version.
                tracing::warn!(error = %e, "cannot persist the resource set");
            }
            let (changed, removed) = changes(held, &candidate);
            tracing::info!(
                version = update.version,
                profiles = cfg.profiles.len(),
                changed,
                removed,
                "config applied"
            );
            *held = candidate;
            tx.send_replace(Some(Arc::new(cfg)));
            pb::agent_message::Message::Ack(pb::Ack {
                version: update.version,
                nonce: update.nonce.clone(),
            })
        }
        Err(reason) => {
            let kept = tx.borrow().as_ref().map_or(0, |c| c.version);
            tracing::warn!(version = update.version, kept_version = kept, %reason, "config refused");
            pb::agent_message::Message::Nack(pb::Nack {
                version: update.version,
                nonce: update.nonce.clone(),
                reason,
            })
        }
    }
}

/// How many resources `after` adds or holds at another version than
/// `before`, and how many of `before` it no longer holds.
fn changes(before: &ResourceSet, after: &ResourceSet) -> (usize, usize) {
    let changed = after
        .iter()
        .filter(|(name, r)| before.get(*name).is_none_or(|b| b.version != r.version))
        .count();
    let removed = before.keys().filter(|n| !after.contains_key(*n)).count();
    (changed, removed)
}

async fn send(
    out: &mpsc::Sender<pb::AgentMessage>,
    m: pb::agent_message::Message,
) -> Result<(), String> {
    out.send(pb::AgentMessage { message: Some(m) })
        .await
        .map_err(|_| "the stream is gone".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::snapshot::tests::{local, resource, valid_set};

    fn settings(state_dir: &std::path::Path, region: &str) -> SyncSettings {
        SyncSettings {
            agent_id: "east-1".to_string(),
            region: region.to_string(),
            relay_address: "127.0.0.1:7070".to_string(),
            control_planes: vec!["http://127.0.0.1:1".to_string()],
            state_dir: state_dir.to_path_buf(),
            local: local(),
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            load: None,
            report_interval: Duration::from_secs(1),
            quotas: Arc::new(Quotas::new()),
            tls: None,
        }
    }

    fn update(version: u64, resources: Vec<pb::Resource>, removed: &[&str]) -> pb::ConfigUpdate {
        pb::ConfigUpdate {
            version,
            nonce: format!("n{version}"),
            resources,
            removed: removed.iter().map(|s| s.to_string()).collect(),
            protocol: PROTOCOL,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_applied_update_is_held_published_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(dir.path(), "us-east");
        let (tx, rx) = watch::channel(None);
        let mut held = ResourceSet::new();
        let first = update(3, valid_set().into_values().collect(), &[]);
        let reply = apply(&first, &settings, &tx, &mut held).await;
        assert!(
            matches!(&reply, pb::agent_message::Message::Ack(a) if a.version == 3 && a.nonce == "n3"),
            "{reply:?}"
        );
        assert_eq!(held, valid_set());
        assert_eq!(rx.borrow().as_ref().unwrap().version, 3);

        // A delta that removes a region a profile needs is refused: the
        // held set, the published config and the persisted set stay.
        let bad = update(4, Vec::new(), &["region/us-west"]);
        let reply = apply(&bad, &settings, &tx, &mut held).await;
        assert!(
            matches!(&reply, pb::agent_message::Message::Nack(n) if n.version == 4 && n.reason.contains("us-west")),
            "{reply:?}"
        );
        assert_eq!(held, valid_set());
        assert_eq!(rx.borrow().as_ref().unwrap().version, 3);
        let persisted = persist::load(dir.path()).await.unwrap();
        assert_eq!(
            (persisted.version, persisted.region.as_str()),
            (3, "us-east")
        );
        assert_eq!(persisted.resources.len(), valid_set().len());

        // A delta that applies changes only what it names.
        let extra = resource("elsewhere/eu.other", Vec::new());
        let good = update(5, vec![extra.clone()], &["elsewhere/eu.mistral"]);
        let reply = apply(&good, &settings, &tx, &mut held).await;
        assert!(matches!(reply, pb::agent_message::Message::Ack(_)));
        assert!(
            held.contains_key("elsewhere/eu.other") && !held.contains_key("elsewhere/eu.mistral")
        );
        let cfg = rx.borrow().clone().unwrap();
        assert_eq!(cfg.version, 5);
        assert!(cfg.profiles_elsewhere.contains("eu.other"));
        assert_eq!(persist::load(dir.path()).await.unwrap().version, 5);

        // An update of a control plane of an older build (a full snapshot,
        // which reads as no protocol and no change) is refused, not taken
        // for an empty change.
        let mut old = update(6, Vec::new(), &[]);
        old.protocol = 0;
        let reply = apply(&old, &settings, &tx, &mut held).await;
        assert!(
            matches!(&reply, pb::agent_message::Message::Nack(n) if n.reason.contains("upgrade the control planes first")),
            "{reply:?}"
        );
        assert_eq!(rx.borrow().as_ref().unwrap().version, 5);
        assert_eq!(persist::load(dir.path()).await.unwrap().version, 5);
    }

    #[tokio::test]
    async fn the_agent_boots_from_the_persisted_set_of_its_region() {
        let dir = tempfile::tempdir().unwrap();
        let applied = pb::AppliedSet {
            version: 9,
            region: "us-east".to_string(),
            resources: valid_set().into_values().collect(),
        };
        persist::save(dir.path(), &applied).await.unwrap();

        let (held, cfg) = boot_set(&settings(dir.path(), "us-east")).await.unwrap();
        assert_eq!(held, valid_set());
        assert_eq!((cfg.version, cfg.profiles.len()), (9, 1));

        // Another region's set, or one this agent's model servers no longer
        // fit, is not booted from.
        assert!(boot_set(&settings(dir.path(), "us-west")).await.is_none());
        let mut no_models = settings(dir.path(), "us-east");
        no_models.local = LocalCapabilities::default();
        assert!(boot_set(&no_models).await.is_none());
    }
}
