//! `ControlService.Sync`: one stream per agent. The replica registers the
//! agent in the store under its lease, sends what the agent lacks of its
//! region's view (`views.rs`) given the resources its hello names, then
//! (debounced) only the resources that change or go, one update in flight
//! at a time; and records the agent's status (versions sent, ACKed and
//! NACKed) so that every replica can list it: a NACK at once, the rest
//! coalesced (`RecordWrites`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use spillway_core::backoff::Backoff;
use spillway_proto::pb::{self, control_service_server::ControlService};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::keys::{self, AgentRecord};
use crate::state::State;
use crate::store::{Compare, LeaseId, Op, Store};
use crate::views::{View, Views};
use spillway_core::metrics::Metrics;
use spillway_core::shutdown::Shutdown;
use spillway_core::tls::Peer;

/// How long a new stream waits for this replica to catch up with the
/// version the agent already runs.
const CATCH_UP: Duration = Duration::from_secs(5);

/// How often a disconnected agent's record removal is tried.
const DEREGISTER_ATTEMPTS: usize = 20;

/// How long an agent has to say hello after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// At most how often a stream writes its agent's record for a change that
/// can wait (the next version sent or ACKed). Every record write is a store
/// transaction and a watch event that every replica processes: without
/// this, one config change would cost one write per agent per ACK.
pub const RECORD_INTERVAL: Duration = Duration::from_secs(1);

/// How many streams of a replica may have a whole set (a first update to
/// an agent that holds little, or a `replace`) on its way at once. A whole
/// set at 10,000 profiles is about 1.5 MB encoded, plus as much again
/// while it is built: a thousand agents connecting at once would otherwise
/// hold gigabytes, all to be sent over the same cores anyway.
pub const WHOLE_SETS_AT_ONCE: usize = 8;

/// How long a whole set counts against `WHOLE_SETS_AT_ONCE` when its agent
/// does not answer it: by then it has long been encoded and sent.
const WHOLE_SET_HOLD: Duration = Duration::from_secs(5);

/// The largest message an agent may send (its hello names every resource
/// it holds, about 60 bytes each).
pub const MAX_HELLO_BYTES: usize = 64 * 1024 * 1024;

/// The config protocol this build speaks (`ConfigUpdate.protocol`).
pub const PROTOCOL: u32 = 2;

/// How long a message may wait for the agent to read the ones before it;
/// past it the stream ends (the agent reconnects, naming what it holds).
const SEND_DEADLINE: Duration = Duration::from_secs(15);

/// An update with fewer resources than this is not a whole set.
const WHOLE_SET_MIN: usize = 256;

/// What every stream of one replica shares.
pub struct Replica {
    pub id: String,
    pub store: Store,
    pub state: watch::Receiver<Arc<State>>,
    /// The replica's store lease; agent records live under it.
    pub lease: watch::Receiver<LeaseId>,
    /// Changes closer together than this go out as one update.
    pub debounce: Duration,
    pub shutdown: Shutdown,
    pub metrics: Arc<Metrics>,
    nonce: AtomicU64,
    /// Every region's resources, shared by the region's streams.
    pub views: Arc<Views>,
    /// Whole sets on their way (`WHOLE_SETS_AT_ONCE`).
    whole_sets: Arc<tokio::sync::Semaphore>,
}

impl Replica {
    pub fn new(
        id: String,
        store: Store,
        state: watch::Receiver<Arc<State>>,
        lease: watch::Receiver<LeaseId>,
        debounce: Duration,
        shutdown: Shutdown,
        metrics: Arc<Metrics>,
    ) -> Self {
        Replica {
            id,
            store,
            views: Views::spawn(state.clone()),
            state,
            lease,
            debounce,
            shutdown,
            metrics,
            nonce: AtomicU64::new(0),
            whole_sets: Arc::new(tokio::sync::Semaphore::new(WHOLE_SETS_AT_ONCE)),
        }
    }

    fn next_nonce(&self) -> String {
        format!("{}-{}", self.id, self.nonce.fetch_add(1, Ordering::Relaxed))
    }
}

#[derive(Clone)]
pub struct Sync {
    replica: Arc<Replica>,
    /// With TLS, an agent must present a certificate naming the region and
    /// id it says hello as.
    tls: bool,
}

impl Sync {
    pub fn new(replica: Arc<Replica>, tls: bool) -> Self {
        Sync { replica, tls }
    }
}

/// Refuses a hello whose region or id differs from the agent's certificate.
fn check_identity(peer: Option<Peer>, hello: &pb::Hello) -> Result<(), Status> {
    match peer {
        Some(Peer::Agent { region, agent_id })
            if region == hello.region && agent_id == hello.agent_id =>
        {
            Ok(())
        }
        Some(Peer::Agent { region, agent_id }) => Err(Status::permission_denied(format!(
            "the certificate names agent `{agent_id}` of region `{region}`; it cannot say hello as `{}` of `{}`",
            hello.agent_id, hello.region
        ))),
        Some(other) => Err(Status::permission_denied(format!(
            "a sync stream needs an agent certificate, not {other:?}"
        ))),
        None => Err(Status::unauthenticated(
            "a sync stream needs an agent certificate (spiffe://spillway/region/<region>/agent/<id>)",
        )),
    }
}

type Outbound =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl ControlService for Sync {
    type SyncStream = Outbound;

    async fn sync(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Outbound>, Status> {
        let peer = req
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|c| Peer::of_cert(c)));
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded("no hello within 10s of opening the stream")
            })??;
        let hello = match first.and_then(|m| m.message) {
            Some(pb::agent_message::Message::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on a sync stream must be a hello",
                ));
            }
        };
        check_hello(&hello)?;
        if self.tls {
            check_identity(peer, &hello)?;
        }
        let (tx, rx) = mpsc::channel(4);
        let replica = self.replica.clone();
        tokio::spawn(async move {
            let agent = format!("{}/{}", hello.region, hello.agent_id);
            match Session::open(replica, hello, tx.clone()).await {
                Ok(session) => session.run(inbound).await,
                Err(status) => {
                    tracing::warn!(%agent, error = %status.message(), "could not register agent");
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn check_hello(h: &pb::Hello) -> Result<(), Status> {
    let ok_id = !h.agent_id.is_empty()
        && h.agent_id.len() <= 128
        && h.agent_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !ok_id {
        return Err(Status::invalid_argument(format!(
            "invalid hello.agent_id `{}`: 1 to 128 letters, digits or -_.",
            h.agent_id
        )));
    }
    let region = spillway_core::model::Region {
        name: h.region.clone(),
        geography: "x".into(),
        description: String::new(),
        revision: 0,
    };
    region
        .validate()
        .map_err(|e| Status::invalid_argument(format!("invalid hello.region: {e}")))?;
    if !h.relay_address.is_empty() && h.relay_address.rsplit_once(':').is_none() {
        return Err(Status::invalid_argument(format!(
            "invalid hello.relay_address `{}`: expected host:port",
            h.relay_address
        )));
    }
    Ok(())
}

struct Session {
    replica: Arc<Replica>,
    key: String,
    record: AgentRecord,
    /// Revision of this session's last write of the agent's record; a write
    /// guarded by it fails once another stream took the agent over. 0 while
    /// the store holds no record of this session (its lease was lost).
    record_revision: i64,
    /// When `record` is next written.
    writes: RecordWrites,
    tx: mpsc::Sender<Result<pb::ControlMessage, Status>>,
    /// What the agent holds: the resources its hello named, until it ACKs
    /// an update; from then on the view `seq` it ACKed last.
    holds: Holds,
    /// The update sent and not yet ACKed or NACKed: its nonce and the view
    /// `seq` it brings the agent to. One at a time.
    in_flight: Option<(String, u64)>,
    /// The view `seq` of the last update the agent refused: the same
    /// changes are not offered again until the view moves past it.
    refused_at: Option<u64>,
    /// A whole set's place among those on their way, held until the agent
    /// answers it or until the instant given.
    whole_set: Option<(tokio::sync::OwnedSemaphorePermit, Instant)>,
    /// The highest version the agent has had (from its hello, then from
    /// what this stream sent).
    version_floor: u64,
    lease: watch::Receiver<LeaseId>,
    /// The quota leases last sent.
    last_lease: Option<keys::LeaseRecord>,
}

impl Session {
    async fn open(
        replica: Arc<Replica>,
        hello: pb::Hello,
        tx: mpsc::Sender<Result<pb::ControlMessage, Status>>,
    ) -> Result<Session, Status> {
        let key = keys::agent(&hello.region, &hello.agent_id);
        let version_floor = hello.current_version;
        let holds = Holds::Named(
            hello
                .resources
                .into_iter()
                .map(|r| (r.name, r.version))
                .collect(),
        );
        // Subscribe before reading the lease, so that a lease replaced while
        // the first write is in flight is seen by the stream.
        let mut lease_rx = replica.lease.clone();
        let record = AgentRecord {
            agent_id: hello.agent_id,
            region: hello.region,
            relay_address: hello.relay_address,
            control_plane: replica.id.clone(),
            connected_at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            sent_version: 0,
            acked_version: 0,
            nacked_version: 0,
            nack_reason: String::new(),
            apis: hello.apis,
        };
        // The first write takes the key over unconditionally: the agent may
        // come from a replica that died and whose lease has not expired yet.
        let lease = *lease_rx.borrow_and_update();
        let outcome = replica
            .store
            .txn(
                vec![],
                vec![Op::Put {
                    key: key.clone(),
                    value: keys::encode(&record),
                    lease: Some(lease),
                }],
            )
            .await
            .map_err(|e| Status::unavailable(format!("store unavailable: {e}")))?;
        if !outcome.succeeded {
            return Err(Status::unavailable(
                "the control plane's store lease is being renewed; retry",
            ));
        }
        tracing::info!(agent = %key, relay = %record.relay_address, "agent connected");
        Ok(Session {
            replica,
            key,
            writes: RecordWrites::new(RECORD_INTERVAL, record.clone()),
            record,
            record_revision: outcome.revision,
            tx,
            holds,
            in_flight: None,
            refused_at: None,
            whole_set: None,
            version_floor,
            lease: lease_rx,
            last_lease: None,
        })
    }

    async fn run(mut self, mut inbound: Streaming<pb::AgentMessage>) {
        let mut state = self.replica.state.clone();
        let mut lease = self.lease.clone();
        let mut shutdown = self.replica.shutdown.clone();
        // Wait for the replica's first view of the store.
        tokio::select! {
            _ = shutdown.wait() => return,
            loaded = state.wait_for(|s| s.loaded) => if loaded.is_err() { return },
        }
        // An agent coming from another replica may have a newer config than
        // this replica has seen yet (its watch lags): wait, briefly, until
        // it has caught up, so that the agent never steps back.
        let floor = i64::try_from(self.version_floor).unwrap_or(i64::MAX);
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        while state.borrow().revision < floor && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
        let mut view = self.replica.views.subscribe(&self.record.region);
        let end = loop {
            if let Err(reason) = self.push_if_changed(&mut state, &mut view).await {
                break reason;
            }
            let due = self.writes.due();
            let whole_set_until = self.whole_set.as_ref().map(|(_, until)| *until);
            tokio::select! {
                // A whole set its agent has not answered no longer counts.
                _ = tokio::time::sleep_until(whole_set_until.unwrap_or_else(Instant::now)), if whole_set_until.is_some() => {
                    self.whole_set = None;
                }
                _ = shutdown.wait() => break "control plane shutting down".to_string(),
                // A coalesced write of the record is due. It is written here,
                // by the stream's own task, never beside it: once the stream
                // ends and `deregister` removes the record, no late write can
                // bring it back.
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    // A replaced lease took the record with it: registering
                    // again, next, writes the status too.
                    if lease.has_changed().unwrap_or(false) {
                        continue;
                    }
                    let lease = *self.replica.lease.borrow();
                    if let Err(reason) = self.write_record(lease).await {
                        break reason;
                    }
                }
                changed = view.changed() => {
                    if changed.is_err() {
                        break "control plane shutting down".to_string();
                    }
                    // Debounce: let a burst of writes settle into one update.
                    tokio::time::sleep(self.replica.debounce).await;
                }
                // Quota leases and the lease of the record follow the state.
                changed = state.changed() => {
                    if changed.is_err() {
                        break "control plane shutting down".to_string();
                    }
                }
                changed = lease.changed() => {
                    if changed.is_err() {
                        break "control plane shutting down".to_string();
                    }
                    let current = *lease.borrow_and_update();
                    if let Err(reason) = self.reregister(current).await {
                        break reason;
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(pb::AgentMessage { message: Some(m) })) => {
                        if let Err(reason) = self.on_agent_message(m).await {
                            break reason;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break "agent closed the stream".to_string(),
                    Err(status) => break format!("stream error: {}", status.message()),
                },
            }
        };
        // A pending coalesced write is dropped: the record goes now.
        tracing::info!(agent = %self.key, reason = %end, "agent disconnected");
        self.whole_set = None;
        self.deregister().await;
    }

    /// Removes the record if it is still this session's, retrying while the
    /// store is unreachable: the replica's lease lives on, so nothing else
    /// would remove it.
    async fn deregister(&self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..DEREGISTER_ATTEMPTS {
            let guard = Compare {
                key: self.key.clone(),
                mod_revision: self.record_revision,
            };
            let delete = Op::Delete {
                key: self.key.clone(),
            };
            // The agent's load report and quota leases go with it.
            let health = Op::Delete {
                key: keys::health(&self.record.region, &self.record.agent_id),
            };
            let leases = Op::Delete {
                key: keys::leases(&self.record.region, &self.record.agent_id),
            };
            match self
                .replica
                .store
                .txn(vec![guard], vec![delete, health, leases])
                .await
            {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(agent = %self.key, error = %e, "could not remove the agent record; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        tracing::error!(agent = %self.key, "gave up removing the agent record; it stays until this replica stops");
    }

    async fn push_if_changed(
        &mut self,
        state: &mut watch::Receiver<Arc<State>>,
        view: &mut watch::Receiver<Arc<View>>,
    ) -> Result<(), String> {
        self.push_config(view).await?;
        let st = state.borrow_and_update().clone();
        self.push_leases(&st).await
    }

    /// Sends the agent its quota leases when the leader wrote new ones,
    /// each valid for what is left of it by this replica's clock.
    async fn push_leases(&mut self, st: &State) -> Result<(), String> {
        let key = (self.record.region.clone(), self.record.agent_id.clone());
        let Some(record) = st.leases.get(&key) else {
            return Ok(());
        };
        if self.last_lease.as_ref() == Some(record) {
            return Ok(());
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Never longer than a lease, whatever this replica's clock says of
        // the leader's.
        let valid_for_ms = (record.granted_at_ms + record.lease_ms)
            .saturating_sub(now_ms)
            .min(record.lease_ms);
        let leases = pb::QuotaLeases {
            leases: record
                .grants
                .iter()
                .map(|g| pb::QuotaLease {
                    quota_id: g.quota_id.clone(),
                    requests_per_minute: g.amounts[0],
                    tokens_per_minute: g.amounts[1],
                    tokens_per_day: g.amounts[2],
                    valid_for_ms,
                    sharing_agents: g.sharing_agents,
                })
                .collect(),
        };
        self.send(pb::control_message::Message::Leases(leases))
            .await?;
        self.last_lease = Some(record.clone());
        Ok(())
    }

    async fn send(&self, m: pb::control_message::Message) -> Result<(), String> {
        let msg = pb::ControlMessage { message: Some(m) };
        // An agent that stops reading must not hold up shutdown, nor hold a
        // whole set's place (or its stream) for ever.
        let mut shutdown = self.replica.shutdown.clone();
        tokio::select! {
            sent = self.tx.send(Ok(msg)) => sent.map_err(|_| "agent went away".to_string()),
            _ = shutdown.wait() => Err("control plane shutting down".to_string()),
            _ = tokio::time::sleep(SEND_DEADLINE) => Err(format!(
                "the agent read nothing for {SEND_DEADLINE:?}"
            )),
        }
    }

    /// Sends the agent what it lacks of `view`, unless an update is in
    /// flight, the agent has it all, or it refused exactly these changes.
    ///
    /// The view is read, never held, across a wait: a stream holding an
    /// older view would make the views task copy the whole view on its
    /// next change, and a thousand streams waiting would hold a thousand.
    async fn push_config(&mut self, views: &mut watch::Receiver<Arc<View>>) -> Result<(), String> {
        let whole = {
            let view = views.borrow();
            if self.in_flight.is_some() || self.refused_at.is_some_and(|r| view.seq <= r) {
                return Ok(());
            }
            // A large update (a first one to an agent that holds little,
            // a replace, many changes at once) waits for a place among
            // those on their way: counted first, built after.
            let count = match &self.holds {
                Holds::Seq(seq) if view.seq <= *seq => return Ok(()),
                Holds::Seq(seq) => view
                    .changed_since(*seq)
                    .map_or(view.resources.len(), |names| names.len()),
                Holds::Named(named) => view
                    .resources
                    .values()
                    .filter(|r| named.get(&r.name) != Some(&r.version))
                    .count(),
            };
            count >= WHOLE_SET_MIN
        };
        if whole && self.whole_set.is_none() {
            let mut shutdown = self.replica.shutdown.clone();
            let permit = tokio::select! {
                p = self.replica.whole_sets.clone().acquire_owned() => {
                    p.map_err(|_| "control plane shutting down".to_string())?
                }
                _ = shutdown.wait() => return Err("control plane shutting down".to_string()),
            };
            self.whole_set = Some((permit, Instant::now() + WHOLE_SET_HOLD));
        }
        let view = views.borrow_and_update().clone();
        let (resources, removed, replace) = match &self.holds {
            Holds::Seq(seq) if view.seq <= *seq => return Ok(()),
            Holds::Seq(seq) => match view.changed_since(*seq) {
                Some(names) => {
                    let (mut resources, mut removed) = (Vec::new(), Vec::new());
                    for name in names {
                        match view.resources.get(name) {
                            Some(r) => resources.push(pb::Resource::clone(r)),
                            None => removed.push(name.to_string()),
                        }
                    }
                    (resources, removed, false)
                }
                // Further behind than the view remembers: the whole set.
                None => (
                    view.resources
                        .values()
                        .map(|r| pb::Resource::clone(r))
                        .collect(),
                    Vec::new(),
                    true,
                ),
            },
            Holds::Named(named) => {
                let resources = view
                    .resources
                    .values()
                    .filter(|r| named.get(&r.name) != Some(&r.version))
                    .map(|r| pb::Resource::clone(r))
                    .collect();
                let removed = named
                    .keys()
                    .filter(|n| !view.resources.contains_key(*n))
                    .cloned()
                    .collect();
                (resources, removed, false)
            }
        };
        // Never hand an agent a lower version than it has: replicas that
        // listed at different revisions number the same content differently.
        let version = view.version.max(self.version_floor);
        self.version_floor = version;
        let nonce = self.replica.next_nonce();
        let metrics = &self.replica.metrics;
        for r in &resources {
            let kind = r.name.split('/').next().unwrap_or("");
            metrics.add("spillway_cp_resources_sent_total", &[("kind", kind)], 1);
        }
        if !removed.is_empty() {
            metrics.add(
                "spillway_cp_resources_sent_total",
                &[("kind", "removed")],
                removed.len() as u64,
            );
        }
        tracing::debug!(
            agent = %self.key,
            version,
            resources = resources.len(),
            removed = removed.len(),
            replace,
            "sending config update"
        );
        let parts = parts(
            pb::ConfigUpdate {
                version,
                nonce: nonce.clone(),
                control_plane: self.replica.id.clone(),
                resources: Vec::new(),
                removed: Vec::new(),
                replace,
                more: false,
                protocol: PROTOCOL,
            },
            resources,
            removed,
        );
        self.record.sent_version = version;
        if !whole {
            self.whole_set = None;
        }
        self.in_flight = Some((nonce, view.seq));
        drop(view);
        for part in parts {
            metrics.add(
                "spillway_cp_update_bytes_total",
                &[],
                part.encoded_len() as u64,
            );
            self.send(pb::control_message::Message::Update(part))
                .await?;
        }
        metrics.add("spillway_cp_updates_sent_total", &[], 1);
        self.record_changed().await
    }

    async fn on_agent_message(&mut self, m: pb::agent_message::Message) -> Result<(), String> {
        match m {
            pb::agent_message::Message::Ack(ack) => {
                tracing::debug!(agent = %self.key, version = ack.version, "agent acked");
                // Only the answer to the update in flight counts: a stale or
                // made-up nonce changes neither what the agent holds nor
                // its status.
                let Some((_, seq)) = self.in_flight.take_if(|(n, _)| *n == ack.nonce) else {
                    tracing::debug!(agent = %self.key, nonce = %ack.nonce, "an ACK of no update in flight; ignored");
                    return Ok(());
                };
                self.whole_set = None;
                self.holds = Holds::Seq(seq);
                self.refused_at = None;
                self.record.acked_version = ack.version;
                if ack.version >= self.record.nacked_version {
                    // A newer version applied: the refusal is history.
                    self.record.nacked_version = 0;
                    self.record.nack_reason.clear();
                }
            }
            pb::agent_message::Message::Nack(nack) => {
                let Some((_, seq)) = self.in_flight.take_if(|(n, _)| *n == nack.nonce) else {
                    tracing::debug!(agent = %self.key, nonce = %nack.nonce, "a NACK of no update in flight; ignored");
                    return Ok(());
                };
                tracing::warn!(agent = %self.key, version = nack.version, reason = %nack.reason, "agent refused a config update");
                self.replica.metrics.add("spillway_cp_nacks_total", &[], 1);
                // The agent keeps what it held: the next update is worked
                // out from that again, once the view has moved on.
                self.whole_set = None;
                self.refused_at = Some(seq);
                self.record.nacked_version = nack.version;
                self.record.nack_reason = nack.reason;
            }
            pb::agent_message::Message::Hello(_) => {
                return Err("a second hello on one stream".to_string());
            }
            // The agent is leaving: the stream ends here, and with it the
            // agent's record, so the next snapshots leave it out.
            pb::agent_message::Message::Goodbye(_) => {
                return Err("the agent said goodbye".to_string());
            }
            pb::agent_message::Message::Load(report) => {
                self.record_load(report).await;
                return Ok(());
            }
        }
        self.record_changed().await
    }

    /// Writes the record at once if its change must be seen at once;
    /// otherwise the pending coalesced write will carry it.
    async fn record_changed(&mut self) -> Result<(), String> {
        if self.writes.changed(&self.record, Instant::now()) {
            let lease = *self.replica.lease.borrow();
            self.write_record(lease).await
        } else {
            Ok(())
        }
    }

    /// Keeps the agent's latest load report in the store, under the
    /// replica's lease, where the leader's weight engine reads it. A store
    /// that is away only delays it: the next report will do.
    async fn record_load(&mut self, report: pb::LoadReport) {
        if !report.interval_seconds.is_finite() || report.interval_seconds < 0.0 {
            tracing::debug!(agent = %self.key, "ignored a load report with a bad interval");
            return;
        }
        let record = keys::HealthRecord {
            agent_id: self.record.agent_id.clone(),
            region: self.record.region.clone(),
            received_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            interval_seconds: report.interval_seconds,
            servers: report.servers.into_iter().map(server_health).collect(),
            relays: report
                .relays
                .into_iter()
                .map(|r| keys::RelayHealth {
                    region: r.region,
                    calls: r.calls,
                    errors: r.errors,
                    throttles: r.throttles,
                    latency_ewma_us: r.latency_ewma_us,
                })
                .collect(),
            quotas: report
                .quotas
                .into_iter()
                .filter(|q| {
                    [q.requests_per_minute, q.tokens_per_minute]
                        .iter()
                        .all(|x| x.is_finite() && *x >= 0.0)
                })
                .map(|q| keys::QuotaDemand {
                    quota_id: q.quota_id,
                    requests_per_minute: q.requests_per_minute,
                    tokens_per_minute: q.tokens_per_minute,
                    held: [
                        q.held_requests_per_minute,
                        q.held_tokens_per_minute,
                        q.held_tokens_per_day,
                    ],
                })
                .collect(),
        };
        let put = Op::Put {
            key: keys::health(&self.record.region, &self.record.agent_id),
            value: keys::encode(&record),
            lease: Some(*self.replica.lease.borrow()),
        };
        // Written beside the stream, not in its way: a slow store must not
        // hold up config updates and ACKs.
        let (store, agent) = (self.replica.store.clone(), self.key.clone());
        tokio::spawn(async move {
            if let Err(e) = store.txn(vec![], vec![put]).await {
                tracing::debug!(%agent, error = %e, "could not record a load report");
            }
        });
    }

    /// The replica's lease was replaced (the old one expired while the store
    /// was unreachable), taking the record with it: write it again, at once,
    /// and, should that fail, at every change until it is back.
    async fn reregister(&mut self, lease: LeaseId) -> Result<(), String> {
        self.record_revision = 0;
        self.writes.lost();
        self.write_record(lease).await
    }

    /// Writes the record as it is now, guarded by this session's last write
    /// of it (or by its absence after a lost lease).
    async fn write_record(&mut self, lease: LeaseId) -> Result<(), String> {
        let guard = Compare {
            key: self.key.clone(),
            mod_revision: self.record_revision,
        };
        let put = Op::Put {
            key: self.key.clone(),
            value: keys::encode(&self.record),
            lease: Some(lease),
        };
        match self.replica.store.txn(vec![guard], vec![put]).await {
            Ok(o) if o.succeeded => {
                self.record_revision = o.revision;
                self.writes.written(&self.record);
                Ok(())
            }
            Ok(_) => Err("another stream took this agent over".to_string()),
            Err(e) => {
                // The store being away must not cut the agent off: it keeps
                // its config stream, only the record lags until a retry.
                tracing::warn!(agent = %self.key, error = %e, "could not record the agent's status");
                self.writes.failed(Instant::now());
                Ok(())
            }
        }
    }
}

/// About how many encoded bytes of resources one message of an update
/// carries (see `ConfigUpdate.more`).
pub const PART_BYTES: usize = 32 * 1024;

/// Splits an update into parts of about `PART_BYTES` (one part when it is
/// small), each a copy of `head` with its share of the resources and
/// removals, `more` on all but the last.
fn parts(
    head: pb::ConfigUpdate,
    resources: Vec<pb::Resource>,
    removed: Vec<String>,
) -> Vec<pb::ConfigUpdate> {
    let mut parts = vec![head.clone()];
    let mut size = 0;
    let mut room = |parts: &mut Vec<pb::ConfigUpdate>, len: usize| {
        if size > 0 && size + len > PART_BYTES {
            parts.push(head.clone());
            size = 0;
        }
        size += len;
    };
    for r in resources {
        room(&mut parts, r.encoded_len() + 4);
        parts
            .last_mut()
            .expect("one part at least")
            .resources
            .push(r);
    }
    for name in removed {
        room(&mut parts, name.len() + 4);
        parts
            .last_mut()
            .expect("one part at least")
            .removed
            .push(name);
    }
    let last = parts.len() - 1;
    for p in &mut parts[..last] {
        p.more = true;
    }
    parts
}

/// What a stream knows its agent holds.
enum Holds {
    /// The resources (name, version) its hello named.
    Named(HashMap<String, u64>),
    /// Its region's view at this `seq`, exactly.
    Seq(u64),
}

/// When a stream writes its agent's record. A change that others must see
/// at once is written at once: the NACK state changing (a NACK, a new
/// reason, or an ACK that clears a NACK), the stream's first ACK, and an
/// ACK that catches up with the version sent while the store shows the
/// agent behind. Any other change (the next version sent or ACKed) is
/// coalesced: written `interval` after the first unwritten change, with
/// the status as it is then, so at most once per interval. A status the
/// store already holds is not written again.
struct RecordWrites {
    interval: Duration,
    /// The record as this stream last wrote it; `None` when the store holds
    /// none (the replica's lease, and the record with it, was lost).
    stored: Option<AgentRecord>,
    /// When the pending write is due; `None` when nothing is pending.
    due: Option<Instant>,
}

impl RecordWrites {
    fn new(interval: Duration, stored: AgentRecord) -> Self {
        RecordWrites {
            interval,
            stored: Some(stored),
            due: None,
        }
    }

    /// The record changed to `record` at `now`: whether to write it now.
    /// Otherwise a write is pending (see `due`) unless the store holds
    /// `record` already.
    fn changed(&mut self, record: &AgentRecord, now: Instant) -> bool {
        let Some(stored) = &self.stored else {
            return true;
        };
        if stored == record {
            self.due = None;
            return false;
        }
        let behind = |r: &AgentRecord| r.acked_version < r.sent_version;
        let urgent = (stored.nacked_version, &stored.nack_reason)
            != (record.nacked_version, &record.nack_reason)
            || (stored.acked_version == 0 && record.acked_version != 0)
            || (behind(stored) && !behind(record));
        if !urgent {
            self.due.get_or_insert(now + self.interval);
        }
        urgent
    }

    /// When the pending write is due, if one is.
    fn due(&self) -> Option<Instant> {
        self.due
    }

    /// The store holds `record` now.
    fn written(&mut self, record: &AgentRecord) {
        self.stored = Some(record.clone());
        self.due = None;
    }

    /// A write failed: try again in an interval.
    fn failed(&mut self, now: Instant) {
        self.due = Some(now + self.interval);
    }

    /// The store lost the record: every change writes it again.
    fn lost(&mut self) {
        self.stored = None;
    }
}

/// The largest figure a report may carry (calls, requests, milliseconds):
/// far beyond any real server, and small enough that sums over every
/// report of a region stay finite.
const MAX_FIGURE: f64 = 1e9;

/// A reported figure as it may be stored: a load report is untrusted input,
/// and a NaN, an infinity or a negative count must never reach the weight
/// engine, so those are dropped (0, "not known").
fn figure(x: f64) -> f64 {
    if x.is_finite() && x >= 0.0 {
        x.min(MAX_FIGURE)
    } else {
        0.0
    }
}

/// One model server of a load report in its stored form, with every
/// floating-point figure checked.
fn server_health(s: pb::ServerLoad) -> keys::ServerHealth {
    keys::ServerHealth {
        url: s.url,
        models: s.models,
        capacity: s.capacity,
        in_flight: s.in_flight,
        calls: s.calls,
        errors: s.errors,
        throttles: s.throttles,
        latency_ewma_us: s.latency_ewma_us,
        ttft_ewma_us: s.ttft_ewma_us,
        total_ewma_us: s.total_ewma_us,
        output_tokens: s.output_tokens,
        engine: s.engine.map(|e| keys::EngineHealth {
            kind: e.kind,
            running: figure(e.running),
            waiting: figure(e.waiting),
            kv_usage: e.kv_usage.filter(|k| k.is_finite() && *k >= 0.0),
            ttft_p90_ms: figure(e.ttft_p90_ms),
            fresh: e.fresh,
            age_ms: e.age_ms,
        }),
        learned_limit: figure(s.learned_limit),
        limit: figure(s.limit),
        // An infinite score is the agent's plainest "saturated" (it sends
        // 1e9 for it); only a NaN or a negative score says nothing.
        saturation: if s.saturation == f64::INFINITY {
            MAX_FIGURE
        } else {
            figure(s.saturation)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AgentRecord {
        AgentRecord::test("us-east", "a1")
    }

    /// A stream's record and its write policy, with the writes it makes
    /// counted: each change is offered to the policy, and a due write is
    /// made whenever the clock passes it.
    struct Stream {
        record: AgentRecord,
        writes: RecordWrites,
        made: usize,
    }

    impl Stream {
        fn new() -> Self {
            Stream {
                record: record(),
                writes: RecordWrites::new(RECORD_INTERVAL, record()),
                made: 0,
            }
        }

        fn write(&mut self) {
            self.writes.written(&self.record);
            self.made += 1;
        }

        /// Makes the due write if the clock is past it.
        fn tick(&mut self, now: Instant) {
            if self.writes.due().is_some_and(|due| due <= now) {
                self.write();
            }
        }

        /// Changes the record at `now`; returns whether it was written at once.
        fn change(&mut self, now: Instant, f: impl FnOnce(&mut AgentRecord)) -> bool {
            self.tick(now);
            f(&mut self.record);
            let urgent = self.writes.changed(&self.record, now);
            if urgent {
                self.write();
            }
            urgent
        }

        fn send(&mut self, now: Instant, version: u64) -> bool {
            self.change(now, |r| r.sent_version = version)
        }

        fn ack(&mut self, now: Instant, version: u64) -> bool {
            self.change(now, |r| {
                r.acked_version = version;
                if version >= r.nacked_version {
                    r.nacked_version = 0;
                    r.nack_reason.clear();
                }
            })
        }

        fn nack(&mut self, now: Instant, version: u64, reason: &str) -> bool {
            self.change(now, |r| {
                r.nacked_version = version;
                r.nack_reason = reason.into();
            })
        }
    }

    #[test]
    fn a_burst_of_acks_is_written_once_per_interval_ending_with_the_last() {
        let t0 = Instant::now();
        let mut s = Stream::new();
        assert!(!s.send(t0, 1), "a version sent can wait");
        assert!(s.ack(t0, 1), "the stream's first ACK is written at once");
        assert_eq!(s.writes.due(), None);

        // 200 updates, 10 ms apart, each ACKed 2 ms after it was sent:
        // 2 s of changes.
        let ms = Duration::from_millis;
        let start = t0 + ms(100);
        for i in 0..200u64 {
            let at = start + ms(10 * i);
            assert!(!s.send(at, 2 + i));
            assert!(!s.ack(at + ms(2), 2 + i));
        }
        let last = start + ms(10 * 199 + 2);
        // Then the pending write goes out with the status as it is last.
        let due = s.writes.due().expect("a write is pending");
        assert!(due <= last + RECORD_INTERVAL);
        s.tick(due);
        assert_eq!(s.writes.due(), None);
        assert_eq!(s.writes.stored.as_ref(), Some(&s.record));
        assert_eq!((s.record.sent_version, s.record.acked_version), (201, 201));
        // The first ACK, then one write per interval started.
        let span = (due - start).as_secs_f64() / RECORD_INTERVAL.as_secs_f64();
        assert!(s.made <= 1 + span.ceil() as usize, "{} writes", s.made);
        assert_eq!(
            s.made,
            1 + 2,
            "the first ACK, then writes at 1.1 s and 2.1 s"
        );
    }

    #[test]
    fn an_ack_or_nack_the_store_already_holds_writes_nothing() {
        let t0 = Instant::now();
        let mut s = Stream::new();
        s.send(t0, 5);
        s.ack(t0, 5);
        assert_eq!(s.made, 1);
        assert!(!s.ack(t0, 5));
        assert_eq!(s.writes.due(), None, "nothing pending");
        s.send(t0, 6);
        assert!(s.nack(t0, 6, "model `m` is not served here"));
        assert!(!s.nack(t0, 6, "model `m` is not served here"));
        assert_eq!(s.writes.due(), None);
        assert_eq!(s.made, 2);
    }

    #[test]
    fn a_nack_a_new_reason_and_the_ack_that_clears_it_are_written_at_once() {
        let t0 = Instant::now();
        let mut s = Stream::new();
        s.send(t0, 5);
        s.ack(t0, 5);
        s.send(t0, 6);
        assert!(s.nack(t0, 6, "model `m` is not served here"));
        assert_eq!(
            s.writes.stored.as_ref().unwrap().nack_reason,
            "model `m` is not served here"
        );
        assert_eq!(s.writes.due(), None, "the version sent went with it");
        s.send(t0, 7);
        assert!(s.nack(t0, 7, "model `q` is not served here"));
        // An ACK of an older version leaves the refusal standing: it waits.
        assert!(!s.ack(t0, 5));
        s.send(t0, 8);
        assert!(s.ack(t0, 8), "the refusal is history");
        assert_eq!(s.writes.stored.as_ref().unwrap().nacked_version, 0);
        assert_eq!(s.writes.due(), None);
    }

    #[test]
    fn an_ack_that_catches_up_after_the_store_showed_the_agent_behind_is_written_at_once() {
        let t0 = Instant::now();
        let mut s = Stream::new();
        s.send(t0, 5);
        s.ack(t0, 5);
        // The agent takes a while to ACK 6: the due write shows it behind.
        s.send(t0, 6);
        s.tick(t0 + RECORD_INTERVAL);
        let stored = s.writes.stored.clone().unwrap();
        assert_eq!((stored.sent_version, stored.acked_version), (6, 5));
        assert!(s.ack(t0 + RECORD_INTERVAL * 3 / 2, 6));
        // The next version ACKed in turn waits.
        s.send(t0 + RECORD_INTERVAL * 2, 7);
        assert!(!s.ack(t0 + RECORD_INTERVAL * 2, 7));
    }

    #[test]
    fn a_failed_write_is_retried_and_a_lost_record_is_written_at_every_change() {
        let t0 = Instant::now();
        let mut s = Stream::new();
        s.send(t0, 5);
        s.ack(t0, 5);
        s.send(t0, 6);
        s.ack(t0, 6);
        // The store is away when the write is due: it is tried again.
        s.writes.failed(t0 + RECORD_INTERVAL);
        assert_eq!(s.writes.due(), Some(t0 + RECORD_INTERVAL * 2));
        // The lease, and the record with it, are lost: every change writes.
        s.writes.lost();
        assert!(s.writes.changed(&s.record, t0));
        s.write();
        assert!(!s.ack(t0, 6), "written again, the record is up to date");
    }

    #[test]
    fn a_large_update_goes_in_parts_that_add_up_to_it() {
        let resource = |i: usize| pb::Resource {
            name: format!("profile/p{i}"),
            version: i as u64,
            body: vec![7u8; 300].into(),
        };
        let head = pb::ConfigUpdate {
            version: 9,
            nonce: "n".into(),
            replace: true,
            ..Default::default()
        };
        // Small: one part, nothing more to come.
        let one = parts(head.clone(), vec![resource(0)], vec!["key/k".into()]);
        assert_eq!(one.len(), 1);
        assert!(!one[0].more);
        // 1,000 resources of about 330 bytes: parts of about 32 KiB.
        let all: Vec<pb::Resource> = (0..1000).map(resource).collect();
        let removed: Vec<String> = (0..50).map(|i| format!("route/r{i}")).collect();
        let split = parts(head.clone(), all.clone(), removed.clone());
        assert!(split.len() >= 10, "{} parts", split.len());
        for (i, p) in split.iter().enumerate() {
            assert_eq!(p.more, i + 1 < split.len());
            assert_eq!((p.version, p.nonce.as_str(), p.replace), (9, "n", true));
            assert!(p.encoded_len() <= PART_BYTES + 1024, "{}", p.encoded_len());
        }
        let back: Vec<pb::Resource> = split.iter().flat_map(|p| p.resources.clone()).collect();
        let gone: Vec<String> = split.iter().flat_map(|p| p.removed.clone()).collect();
        assert_eq!((back, gone), (all, removed));
    }

    #[test]
    fn bad_numbers_in_a_report_are_dropped_before_they_are_stored() {
        let report = pb::ServerLoad {
            url: "http://s1".into(),
            models: vec!["m".into()],
            capacity: 8,
            in_flight: 3,
            engine: Some(pb::EngineLoad {
                kind: "vllm".into(),
                running: f64::NAN,
                waiting: -2.0,
                kv_usage: Some(f64::NAN),
                ttft_p90_ms: f64::INFINITY,
                fresh: true,
                age_ms: 40,
            }),
            learned_limit: f64::NEG_INFINITY,
            limit: f64::NAN,
            saturation: f64::NAN,
            ..Default::default()
        };
        let s = server_health(report);
        let e = s.engine.clone().expect("engine figures kept");
        assert_eq!(
            (e.running, e.waiting, e.kv_usage, e.ttft_p90_ms),
            (0.0, 0.0, None, 0.0)
        );
        assert_eq!((e.kind.as_str(), e.fresh, e.age_ms), ("vllm", true, 40));
        assert_eq!((s.learned_limit, s.limit, s.saturation), (0.0, 0.0, 0.0));
        assert_eq!((s.capacity, s.in_flight), (8, 3));
        // Stored and read back, nothing is NaN (JSON would make it null).
        let back: keys::ServerHealth = serde_json::from_slice(&keys::encode(&s)).unwrap();
        assert_eq!(back, s);

        // Good figures pass as they are; an infinite score is saturated,
        // and absurd counts are bounded.
        let s = server_health(pb::ServerLoad {
            engine: Some(pb::EngineLoad {
                running: 12.0,
                waiting: 1e300,
                kv_usage: Some(0.91),
                ttft_p90_ms: 180.0,
                ..Default::default()
            }),
            learned_limit: 7.5,
            limit: 14.0,
            saturation: f64::INFINITY,
            ..Default::default()
        });
        let e = s.engine.unwrap();
        assert_eq!(
            (e.running, e.waiting, e.kv_usage, e.ttft_p90_ms),
            (12.0, MAX_FIGURE, Some(0.91), 180.0)
        );
        assert_eq!(
            (s.learned_limit, s.limit, s.saturation),
            (7.5, 14.0, MAX_FIGURE)
        );
    }
}
