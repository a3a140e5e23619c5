//! The agent's side of the config stream. It keeps the latest good config
//! in a `tokio::sync::watch`; reconnects with exponential backoff and
//! jitter, moving through the listed control planes; ACKs what it applies
//! and NACKs (with the reason) what it cannot, keeping the previous config.
//! On shutdown it says goodbye, so that the control plane drops it from
//! every other agent's snapshot at once, and stops; nothing else (the
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
use crate::control::snapshot::{AgentConfig, LocalCapabilities};
use crate::net::connect::TlsConnect;
use crate::quota::Quotas;

/// Snapshots larger than this are refused by the transport (a receive
/// limit, so that a broken control plane cannot exhaust the agent).
const MAX_UPDATE_BYTES: usize = 32 * 1024 * 1024;

/// How long, after its goodbye, the agent waits for the control plane to
/// close the stream (which it does once the agent is off the snapshots).
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

/// Loads the persisted config (if any), then follows the control planes
/// until `shutdown`.
pub async fn start(settings: SyncSettings, shutdown: Shutdown) -> ConfigWatch {
    let (tx, rx) = watch::channel(None);
    if let Some(update) = persist::load(&settings.state_dir).await {
        match AgentConfig::from_update(&update, &settings.region, &settings.local) {
            Ok(cfg) => {
                tracing::info!(version = cfg.version, "booting with the persisted config");
                tx.send_replace(Some(Arc::new(cfg)));
            }
            Err(reason) => {
                tracing::warn!(%reason, "the persisted config does not apply; ignoring it")
            }
        }
    }
    tokio::spawn(follow(settings, tx, shutdown));
    rx
}

async fn follow(
    settings: SyncSettings,
    tx: watch::Sender<Option<Arc<AgentConfig>>>,
    mut shutdown: Shutdown,
) {
    let mut backoff = Backoff::new(settings.backoff_base, settings.backoff_max);
    let mut next = 0usize;
    loop {
        let endpoint = &settings.control_planes[next % settings.control_planes.len()];
        next += 1;
        let mut stop = shutdown.clone();
        let ended = tokio::select! {
            ended = stream_once(endpoint, &settings, &tx, shutdown.clone()) => ended,
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
    mut shutdown: Shutdown,
) -> Result<Ended, String> {
    let (out, mut inbound) = tokio::select! {
        _ = shutdown.wait() => return Ok(Ended::Left),
        opened = open(endpoint, settings, tx) => opened?,
    };
    tracing::info!(control_plane = %endpoint, "config stream open");
    let mut got_any = false;
    let mut reports = tokio::time::interval(settings.report_interval);
    reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report = tokio::time::Instant::now();
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
        let update = match msg.message {
            Some(pb::control_message::Message::Update(update)) => update,
            Some(pb::control_message::Message::Leases(leases)) => {
                settings.quotas.apply_leases(&leases);
                continue;
            }
            None => continue,
        };
        got_any = true;
        let reply = apply(&update, settings, tx).await;
        send(&out, reply).await?;
    }
}

/// Tells the control plane that this agent is leaving, and waits (up to
/// [`GOODBYE_WAIT`]) for it to close the stream: by then the agent is off
/// every snapshot, so other regions stop relaying to it. A control plane
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

/// Connects and says hello: the stream's outbound queue and its inbound
/// half.
async fn open(
    endpoint: &str,
    settings: &SyncSettings,
    tx: &watch::Sender<Option<Arc<AgentConfig>>>,
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
    };
    send(&out, pb::agent_message::Message::Hello(hello)).await?;
    let inbound = client
        .sync(ReceiverStream::new(out_rx))
        .await
        .map_err(|s| format!("sync refused: {}", s.message()))?
        .into_inner();
    Ok((out, inbound))
}

/// Applies one update, or says why not; returns the ACK or NACK to send.
async fn apply(
    update: &pb::ConfigUpdate,
    settings: &SyncSettings,
    tx: &watch::Sender<Option<Arc<AgentConfig>>>,
) -> pb::agent_message::Message {
    match AgentConfig::from_update(update, &settings.region, &settings.local) {
        Ok(cfg) => {
            if let Err(e) = persist::save(&settings.state_dir, update).await {
                // Serving goes on; only a later boot without a control plane
                // would miss this version.
                tracing::warn!(error = %e, "cannot persist the config");
            }
            tracing::info!(
                version = update.version,
                profiles = cfg.profiles.len(),
                "config applied"
            );
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

async fn send(
    out: &mpsc::Sender<pb::AgentMessage>,
    m: pb::agent_message::Message,
) -> Result<(), String> {
    out.send(pb::AgentMessage { message: Some(m) })
        .await
        .map_err(|_| "the stream is gone".to_string())
}
