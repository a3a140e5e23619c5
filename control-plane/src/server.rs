//! Starting a control-plane replica: connect the store, hold the replica's
//! lease, follow the store, and serve the admin, sync, health and
//! reflection services until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use spillway_proto::pb;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::Admin;
use crate::leader::{self, LeaderSettings};
use spillway_core::backoff::Backoff;
use spillway_core::shutdown::{self, Shutdown};

use crate::state;
use crate::store::{DEFAULT_PREFIX, EtcdOptions, LeaseId, Store, StoreError};
use crate::sync::{Replica, Sync};
use spillway_core::credentials::{ClientAuth, Credentials};
use spillway_core::metrics::{CONTROL_PLANE, Metrics};
use spillway_core::tenant::{key_hash, same_hash};
use spillway_core::tls::{Peer, TlsFiles};

/// Everything a replica needs to start; the binary fills it from flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// etcd endpoints; empty means the embedded in-memory store.
    pub etcd_endpoints: Vec<String>,
    pub prefix: String,
    /// Unique per replica; shown as the holder of each agent's stream.
    pub replica_id: String,
    /// TTL of the replica's store lease: how long its agents stay listed
    /// after it dies.
    pub lease_ttl: Duration,
    pub debounce: Duration,
    pub leader: LeaderSettings,
    /// The replica's TLS identity and the CA of agents and operators; `None`
    /// is plaintext (only with `--insecure-dev`).
    pub tls: Option<TlsFiles>,
    /// How often the TLS files are read again (a renewed certificate or CA
    /// bundle serves new connections without a restart).
    pub tls_reload: Duration,
    /// A bearer token that admits admin calls without an admin
    /// certificate (over TLS).
    pub admin_token: Option<String>,
    /// TLS to etcd, with a client certificate.
    pub etcd_tls: Option<TlsFiles>,
    /// Where `GET /metrics` (Prometheus text) is served; not at all when
    /// unset.
    pub metrics_listen: Option<SocketAddr>,
    /// gRPC connections open at once; past it new ones are closed.
    pub max_connections: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            etcd_endpoints: Vec::new(),
            prefix: DEFAULT_PREFIX.to_string(),
            replica_id: default_replica_id(),
            lease_ttl: Duration::from_secs(10),
            debounce: Duration::from_millis(20),
            leader: LeaderSettings::default(),
            tls: None,
            tls_reload: Duration::from_secs(10),
            admin_token: None,
            etcd_tls: None,
            metrics_listen: None,
            max_connections: 10_000,
        }
    }
}

pub fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}-{}", std::process::id())
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot reach etcd at {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        source: StoreError,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Listen(String),
}

/// Opens the store the settings name.
pub async fn open_store(settings: &Settings) -> Result<Store, RunError> {
    if settings.etcd_endpoints.is_empty() {
        return Ok(Store::memory());
    }
    let opts = EtcdOptions {
        endpoints: settings.etcd_endpoints.clone(),
        prefix: settings.prefix.clone(),
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        tls: match &settings.etcd_tls {
            Some(files) => Some(files.grpc_client().map_err(RunError::Tls)?),
            None => None,
        },
    };
    Store::etcd(opts).await.map_err(|source| RunError::Etcd {
        endpoints: settings.etcd_endpoints.join(","),
        source,
    })
}

/// How long connections may drain after shutdown before they are closed:
/// a client holding a stream open (a health watch) must not keep the
/// replica, and its lease, alive.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// How long the leader task may take to resign on the way out.
const RESIGN_WAIT: Duration = Duration::from_secs(2);

/// Serves a replica on `listener` until `shutdown` resolves, then, at
/// once, stops accepting and resigns the leadership if it holds it (so
/// another replica leads within moments); ends the agent streams, revokes
/// the replica's lease (so its agents' records go at once) and returns.
pub async fn run(
    settings: Settings,
    store: Store,
    listener: TcpListener,
    shutdown_signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let (trigger, shutdown) = shutdown::channel();
    let lease = store.grant_lease(settings.lease_ttl).await?;
    let (lease_tx, lease_rx) = watch::channel(lease);
    let keeper = tokio::spawn(keep_lease(
        store.clone(),
        settings.lease_ttl,
        lease_tx,
        shutdown.clone(),
    ));
    let state = state::spawn(store.clone());
    let metrics = Arc::new(Metrics::new(CONTROL_PLANE));
    let leader = tokio::spawn(leader::run(
        settings.replica_id.clone(),
        store.clone(),
        state.clone(),
        lease_rx.clone(),
        settings.leader.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    if let Some(addr) = settings.metrics_listen {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            RunError::Listen(format!("cannot listen on {addr} (--metrics-listen): {e}"))
        })?;
        if let Ok(bound) = listener.local_addr() {
            tracing::info!(addr = %bound, "serving metrics");
        }
        let (metrics, state, mut stop) = (metrics.clone(), state.clone(), shutdown.clone());
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let (metrics, state) = (metrics.clone(), state.clone());
                async move { render_metrics(&metrics, &state.borrow()) }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.wait().await })
                .await;
        });
    }
    let replica = Arc::new(Replica::new(
        settings.replica_id.clone(),
        store.clone(),
        state.clone(),
        lease_rx.clone(),
        settings.debounce,
        shutdown.clone(),
        metrics.clone(),
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::admin_service_server::AdminServiceServer<Admin>>()
        .await;
    health_reporter
        .set_serving::<pb::control_service_server::ControlServiceServer<Sync>>()
        .await;
    let (reflection, reflection_v1alpha) =
        spillway_proto::reflection(&["spillway.v1.AdminService", "spillway.v1.ControlService"])?;

    tracing::info!(
        replica = %settings.replica_id,
        store = %store.describe(),
        addr = ?addr,
        "control plane serving"
    );
    let mut stop = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal.await;
        trigger.trigger();
    });
    let server = tonic::transport::Server::builder();
    // Client certificates are optional at the handshake: agents and
    // operators present one, a tool with the admin token may not; each
    // service checks what it needs.
    let tls = match settings.tls.clone() {
        Some(files) => {
            let creds = Credentials::load(files).map_err(RunError::Tls)?;
            let expiry = metrics.clone();
            creds.watch(
                settings.tls_reload,
                shutdown.clone(),
                move |creds, event| {
                    expiry.add(
                        "spillway_cp_tls_reloads_total",
                        &[("outcome", event.as_str())],
                        1,
                    );
                    if let Some(t) = creds.not_after() {
                        expiry.set(
                            "spillway_cp_tls_certificate_expiry_timestamp_seconds",
                            &[],
                            t as f64,
                        );
                    }
                },
            );
            Some(Arc::new(
                creds.rustls_server(ClientAuth::Optional, &[b"h2"]),
            ))
        }
        None => None,
    };
    let gate = AdminGate {
        tls: settings.tls.is_some(),
        token: settings.admin_token.clone(),
    };
    // Connections need no credentials to open: a bounded number.
    let refused = metrics.clone();
    let incoming = spillway_core::net::limited_incoming(
        listener,
        settings.max_connections,
        Duration::from_secs(10),
        move || refused.add("spillway_cp_connections_refused_total", &[], 1),
    );
    let router = server
        // Notice agents whose host died without closing the connection, so
        // that their streams end and their records go.
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .max_concurrent_streams(Some(256))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            pb::admin_service_server::AdminServiceServer::with_interceptor(
                Admin::new(store.clone(), state.clone(), settings.leader.silence),
                move |req| gate.check(req),
            ),
        )
        .add_service(
            pb::control_service_server::ControlServiceServer::new(Sync::new(
                replica,
                settings.tls.is_some(),
            ))
            // A hello names every resource the agent holds: about 4 MB at
            // 70,000 resources, past tonic's default limit.
            .max_decoding_message_size(crate::sync::MAX_HELLO_BYTES),
        );
    let stopped = async move { stop.wait().await };
    let serving = async move {
        match tls {
            Some(config) => {
                let incoming =
                    spillway_core::net::tls_incoming(incoming, config, Duration::from_secs(10));
                router.serve_with_incoming_shutdown(incoming, stopped).await
            }
            None => router.serve_with_incoming_shutdown(incoming, stopped).await,
        }
    };
    let mut grace = shutdown.clone();
    tokio::select! {
        served = serving => served?,
        _ = async { grace.wait().await; tokio::time::sleep(DRAIN_GRACE).await } => {
            tracing::warn!("connections still open {DRAIN_GRACE:?} after shutdown; closing them");
        }
    }
    keeper.abort();
    // The leader task resigns as soon as shutdown fires, while the streams
    // drain; it has had that long already.
    let resigning = leader.abort_handle();
    if tokio::time::timeout(RESIGN_WAIT, leader).await.is_err() {
        resigning.abort();
    }
    let lease = *lease_rx.borrow();
    if let Err(e) = store.revoke_lease(lease).await {
        tracing::warn!(error = %e, "could not revoke the replica's lease; it will expire");
    }
    tracing::info!("control plane stopped");
    Ok(())
}

/// The metrics, with the gauges that come from the replica's view of the
/// store set at the time of the scrape.
fn render_metrics(
    metrics: &Metrics,
    st: &crate::state::State,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    metrics.clear("spillway_cp_agents");
    metrics.clear("spillway_cp_agents_behind");
    let mut by_region: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
    for a in st.agents.values() {
        let e = by_region.entry(a.region.as_str()).or_default();
        e.0 += 1;
        e.1 += u64::from(a.acked_version < a.sent_version);
    }
    for (region, (n, behind)) in by_region {
        metrics.set("spillway_cp_agents", &[("region", region)], n as f64);
        metrics.set(
            "spillway_cp_agents_behind",
            &[("region", region)],
            behind as f64,
        );
    }
    metrics.set(
        "spillway_cp_config_version",
        &[],
        st.config_version() as f64,
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        metrics.render(),
    )
}

/// Who may use the admin API: with TLS, a client certificate naming an
/// operator (`spiffe://spillway/admin/<name>`), or the admin token as a
/// bearer token; without TLS (`--insecure-dev`), anyone who can connect.
#[derive(Clone)]
struct AdminGate {
    tls: bool,
    token: Option<String>,
}

impl AdminGate {
    fn check(&self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if !self.tls {
            return Ok(req);
        }
        if let Some(certs) = req.peer_certs()
            && let Some(Peer::Admin { .. }) = certs.first().and_then(|c| Peer::of_cert(c))
        {
            return Ok(req);
        }
        if let (Some(want), Some(got)) = (
            &self.token,
            req.metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer ")),
        ) && same_hash(key_hash(got).as_bytes(), key_hash(want).as_bytes())
        {
            return Ok(req);
        }
        Err(tonic::Status::unauthenticated(
            "the admin API needs an admin certificate (spiffe://spillway/admin/<name>) or the admin token",
        ))
    }
}

/// Renews the replica's lease at a third of its TTL; when it is lost (the
/// store was unreachable for longer than the TTL), grants a new one and
/// publishes it so that the streams register their agents again.
async fn keep_lease(
    store: Store,
    ttl: Duration,
    tx: watch::Sender<LeaseId>,
    mut shutdown: Shutdown,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), ttl / 3);
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        let lease = *tx.borrow();
        match store.keep_alive(lease).await {
            Ok(()) => backoff.reset(),
            Err(StoreError::LeaseGone(_)) => {
                tracing::warn!(lease, "the replica's store lease expired; taking a new one");
                loop {
                    match store.grant_lease(ttl).await {
                        Ok(new) => {
                            let _ = tx.send(new);
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not take a new store lease");
                            tokio::time::sleep(backoff.next_delay()).await;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not renew the replica's store lease"),
        }
    }
}
