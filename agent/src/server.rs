//! Starting an agent: load the persisted config, follow the control plane,
//! and serve the gRPC port (Converse, relay, health, reflection) and the
//! OpenAI-compatible HTTP port until shutdown. Health reports SERVING once
//! a config is present.

use std::sync::Arc;
use std::time::Duration;

use spillway_core::api::ApiSet;
use spillway_core::shutdown::{self, Shutdown};
use spillway_proto::pb;
use tokio::net::TcpListener;

use crate::config::AgentArgs;
use crate::control::snapshot::LocalCapabilities;
use crate::control::sync::{self, ConfigWatch, LoadSource, SyncSettings};
use crate::doors::converse::{ConverseDoor, MessageLimit};
use crate::doors::http::{self, HttpDoor};
use crate::net::connect::TlsConnect;
use crate::net::dns::Resolver;
use crate::net::serve::{ConnLimits, HttpServer};
use crate::pipeline::{Pipeline, PipelineSettings};
use crate::quota::Quotas;
use crate::telemetry::record::{AuditSettings, Recorder};
use crate::telemetry::trace::Tracer;
use crate::upstream::relay::{MAX_RELAY_MESSAGE, RelayClients, RelayServer};
use crate::upstream::{
    DiscoverySettings, ModelServerSpec, SaturationSettings, UpstreamSettings, Upstreams,
};
use spillway_core::credentials::{ClientAuth, Credentials};
use spillway_core::tls::{Expect, TlsFiles};

/// Everything an agent needs to start.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub sync: SyncSettings,
    pub model_servers: Vec<ModelServerSpec>,
    pub upstream: UpstreamSettings,
    pub pipeline: PipelineSettings,
    pub max_body_bytes: usize,
    /// How long a client has to send a request body (the HTTP door).
    pub body_read_timeout: Duration,
    /// Where audit records go; none when unset.
    pub audit: Option<AuditSettings>,
    /// This region's OTLP/gRPC collector; no traces when unset.
    pub otlp_endpoint: Option<String>,
    /// The share of calls traced when the caller did not decide.
    pub trace_sample_ratio: f64,
    /// A listener of its own for `/metrics`; the HTTP door serves them
    /// when unset.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Audit records also go to the OTLP collector, as logs.
    pub audit_otlp: bool,
    /// The agent's TLS identity and the deployment's CA; `None` is
    /// plaintext everywhere (only with `--insecure-dev`).
    pub tls: Option<TlsFiles>,
    /// How often the TLS files are read again: a renewed certificate or CA
    /// bundle is used from the next connection on, without a restart.
    pub tls_reload: Duration,
    /// Whom `https://` model servers must be certified by.
    pub model_server_ca: Option<std::path::PathBuf>,
    /// Whom an `https://` collector must be certified by.
    pub otlp_ca: Option<std::path::PathBuf>,
    /// Timeouts and the connection limit of the HTTP door and the gRPC
    /// port.
    pub conn_limits: ConnLimits,
}

impl AgentSettings {
    pub fn from_args(args: &AgentArgs, relay_address: String) -> AgentSettings {
        let attempt = args.upstream_timeout_secs.map_or(
            Duration::from_millis(args.attempt_timeout_ms),
            Duration::from_secs,
        );
        AgentSettings {
            sync: SyncSettings {
                agent_id: args.agent_id.clone(),
                region: args.region.clone(),
                relay_address,
                control_planes: args.control_plane.clone(),
                state_dir: args.state_dir.clone(),
                local: local_capabilities(&args.model_servers),
                backoff_base: Duration::from_millis(100),
                backoff_max: Duration::from_secs(5),
                load: None,
                report_interval: Duration::from_secs(1),
                quotas: Arc::new(Quotas::new()),
                tls: None,
            },
            model_servers: args.model_servers.clone(),
            upstream: UpstreamSettings {
                connect_timeout: Duration::from_millis(args.connect_timeout_ms),
                header_timeout: attempt,
                keepalive_interval: Duration::from_millis(args.keepalive_interval_ms),
                keepalive_timeout: Duration::from_millis(args.keepalive_timeout_ms),
                saturation: SaturationSettings {
                    kv_max: args.saturation_kv,
                    queue_max: f64::from(args.saturation_queue),
                    scrape_interval: Duration::from_millis(args.metrics_interval_ms),
                    // Four intervals, and never under a second (llm-d's
                    // 200 ms is for a scrape every 50 ms in one cluster).
                    stale_after: Duration::from_millis(args.metrics_interval_ms * 4)
                        .max(Duration::from_secs(1)),
                },
                discovery: DiscoverySettings {
                    resolver: args.dns_server.map_or(Resolver::System, Resolver::Server),
                    every: Duration::from_millis(args.dns_refresh_ms),
                },
                ..UpstreamSettings::default()
            },
            pipeline: PipelineSettings {
                max_attempts: usize::from(args.max_attempts),
                default_max_tokens: args.default_max_tokens,
                allow_anonymous: args.allow_anonymous,
                ..PipelineSettings::default()
            },
            max_body_bytes: args.max_body_bytes,
            body_read_timeout: Duration::from_secs(args.body_read_timeout_secs),
            audit: args.audit_dir.clone().map(|dir| AuditSettings {
                dir,
                max_bytes: args.audit_max_bytes,
                keep: args.audit_keep,
            }),
            otlp_endpoint: args.otlp_endpoint.clone(),
            metrics_listen: args.metrics_listen,
            model_server_ca: args.model_server_ca.clone(),
            otlp_ca: args.otlp_ca.clone(),
            trace_sample_ratio: args.trace_sample_ratio,
            audit_otlp: args.audit_otlp,
            tls: TlsFiles::from_flags(
                "tls-",
                args.tls_ca.clone(),
                args.tls_cert.clone(),
                args.tls_key.clone(),
            )
            .ok()
            .flatten(),
            tls_reload: Duration::from_secs(args.tls_reload_secs),
            conn_limits: ConnLimits {
                header_timeout: Duration::from_secs(args.header_read_timeout_secs),
                idle_timeout: Duration::from_secs(args.idle_timeout_secs),
                max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
                ..ConnLimits::default()
            },
        }
    }
}

/// The TLS client for `https://` model servers: trusting `--model-server-ca`
/// and nothing else (not the deployment's CA: a Spillway certificate must
/// never pass for a model server). An https server without it is refused.
fn model_server_tls(
    settings: &AgentSettings,
) -> Result<Option<Arc<rustls::ClientConfig>>, RunError> {
    let https = settings.model_servers.iter().find(|s| s.is_https());
    match (&settings.model_server_ca, https) {
        (Some(ca), _) => spillway_core::tls::rustls_client_trusting(ca)
            .map(|c| Some(Arc::new(c)))
            .map_err(|e| RunError::Tls(format!("--model-server-ca: {e}"))),
        (None, Some(server)) => Err(RunError::Tls(format!(
            "model server `{}` is https://: give --model-server-ca, the CA its certificate must chain to",
            server.url
        ))),
        (None, None) => Ok(None),
    }
}

/// The channel to the region's collector, with its endpoint. An
/// `https://` collector's certificate must chain to `--otlp-ca` (and
/// nothing else); the agent presents no certificate of its own, since the
/// collector is not a Spillway party. An https collector without that flag,
/// or with a CA file that holds no certificate, or a bad https endpoint, is
/// refused; a bad plaintext endpoint is logged and nothing is exported.
fn collector_channel(
    settings: &AgentSettings,
) -> Result<Option<(String, tonic::transport::Channel)>, RunError> {
    let Some(endpoint) = settings.otlp_endpoint.clone() else {
        return Ok(None);
    };
    if !endpoint.to_ascii_lowercase().starts_with("https://") {
        return Ok(match crate::telemetry::trace::collector(&endpoint, None) {
            Ok(channel) => Some((endpoint, channel)),
            Err(e) => {
                tracing::error!(%endpoint, error = %e, "bad --otlp-endpoint; nothing is exported");
                None
            }
        });
    }
    let ca = settings.otlp_ca.as_ref().ok_or_else(|| {
        RunError::Tls(format!(
            "--otlp-endpoint `{endpoint}` is https://: give --otlp-ca, the CA its certificate must chain to"
        ))
    })?;
    // Checked here as rustls reads it: tonic would drop what it cannot
    // parse and fail every handshake later instead.
    spillway_core::tls::roots(ca).map_err(|e| RunError::Tls(format!("--otlp-ca: {e}")))?;
    let pem = std::fs::read(ca)
        .map_err(|e| RunError::Tls(format!("--otlp-ca `{}`: {e}", ca.display())))?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pem));
    let channel = crate::telemetry::trace::collector(&endpoint, Some(tls))
        .map_err(|e| RunError::Tls(format!("--otlp-endpoint `{endpoint}`: {e}")))?;
    Ok(Some((endpoint, channel)))
}

/// What the agent can serve locally: the models and APIs of its model
/// servers.
pub fn local_capabilities(servers: &[ModelServerSpec]) -> LocalCapabilities {
    LocalCapabilities {
        models: servers
            .iter()
            .flat_map(|s| s.models.iter().cloned())
            .collect(),
        apis: servers
            .iter()
            .fold(ApiSet::default(), |set, s| set.union(s.apis)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("serving HTTP: {0}")]
    Http(#[from] std::io::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr} (--metrics-listen): {error}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
}

/// A started agent: its config watch, the pipeline, and the servers.
pub struct RunningAgent {
    pub config: ConfigWatch,
    pub pipeline: Arc<Pipeline>,
    pub grpc: tokio::task::JoinHandle<Result<(), RunError>>,
    pub http: HttpServer,
    /// Where `/metrics` is served when it has a listener of its own.
    pub metrics: Option<std::net::SocketAddr>,
    pub recorder: Arc<Recorder>,
}

impl RunningAgent {
    /// After shutdown fired: waits up to `drain` for the calls in flight
    /// on both ports to be answered (the listeners stopped accepting when
    /// it fired), then writes out the audit log (synced to disk) and the
    /// OTLP exporters.
    pub async fn finish(self, drain: Duration) -> Result<(), RunError> {
        let started = tokio::time::Instant::now();
        let open = self.http.open();
        // The sync said goodbye to the control plane (its watch closes
        // when it has; it bounds that itself).
        let mut config = self.config.clone();
        let left = async move { while config.changed().await.is_ok() {} };
        let drained = tokio::time::timeout(drain, async {
            let (grpc, (), ()) = tokio::join!(self.grpc, self.http.drained(), left);
            grpc
        })
        .await;
        let result = match drained {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Ok(()),
            Err(_) => {
                tracing::warn!(
                    ?drain,
                    "calls still in flight after the drain time; they are cut (--drain-secs)"
                );
                Ok(())
            }
        };
        let flushed = self.recorder.flush(Duration::from_secs(5)).await;
        tracing::info!(
            connections_at_shutdown = open,
            drained_in = ?started.elapsed(),
            audit_and_exports_flushed = flushed,
            "drained"
        );
        result
    }
}

/// Starts the config stream, the gRPC server on `grpc` and the HTTP front
/// door on `http`; everything stops when `shutdown` fires.
pub async fn start(
    mut settings: AgentSettings,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: Shutdown,
) -> Result<RunningAgent, RunError> {
    settings.upstream.tls = model_server_tls(&settings)?;
    let collector = collector_channel(&settings)?;
    // Bound first: a taken address fails the start before anything runs.
    let metrics_listener = match settings.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|error| RunError::MetricsListen { addr, error })?,
        ),
        None => None,
    };
    let region = settings.sync.region.clone();
    let agent_id = settings.sync.agent_id.clone();
    let upstreams = Arc::new(Upstreams::new(
        settings.model_servers,
        settings.upstream.clone(),
    ));
    // The addresses of servers given by name, then the engines' figures,
    // so that the first calls are placed by them and a metrics URL that
    // does not answer is logged at once.
    upstreams.discover_once().await;
    upstreams.scrape_once().await;
    upstreams.spawn_scrapers(&shutdown);
    upstreams.spawn_discovery(&shutdown);
    // The pipeline needs the config watch, and load reports need the
    // pipeline: the report reads it through a slot filled just below.
    let pipeline_slot: Arc<std::sync::OnceLock<Arc<Pipeline>>> =
        Arc::new(std::sync::OnceLock::new());
    let mut sync_settings = settings.sync;
    let tls = match settings.tls.clone() {
        Some(files) => Some(Credentials::load(files).map_err(RunError::Tls)?),
        None => None,
    };
    sync_settings.tls = tls
        .as_ref()
        .map(|creds| TlsConnect::new(creds.rustls_client(Expect::ControlPlane)));
    let quotas = sync_settings.quotas.clone();
    let tracer = Tracer::start(
        collector,
        region.clone(),
        agent_id.clone(),
        settings.trace_sample_ratio,
    );
    let recorder = Recorder::start(region.clone(), settings.audit, settings.audit_otlp, tracer);
    let limits = settings.conn_limits.clone();
    let (reporting, slot, demand) = (upstreams.clone(), pipeline_slot.clone(), quotas.clone());
    sync_settings.load = Some(LoadSource(Arc::new(move |interval| {
        let mut report = reporting.load_report(interval);
        if let Some(p) = slot.get() {
            report.relays = p.relay_report();
        }
        report.quotas = demand.demand_report(interval);
        report
    })));
    let config = sync::start(sync_settings, shutdown.clone()).await;
    // Quotas, and the version gauge, follow the config.
    let (mut watch, mut stop, enforced) = (config.clone(), shutdown.clone(), quotas.clone());
    let gauge = recorder.metrics.clone();
    let sharing = upstreams.clone();
    tokio::spawn(async move {
        loop {
            if let Some(cfg) = watch.borrow_and_update().clone() {
                enforced.configure(&cfg.quotas, cfg.region_agents(), cfg.all_agents());
                sharing.set_peers(cfg.region_agents());
                gauge.set("spillway_agent_config_version", &[], cfg.version as f64);
            }
            tokio::select! {
                _ = stop.wait() => return,
                changed = watch.changed() => if changed.is_err() { return },
            }
        }
    });
    let relays = RelayClients::new(
        &region,
        &agent_id,
        settings.upstream.clone(),
        tls.clone(),
        recorder.metrics.clone(),
    );
    let pipeline = Arc::new(Pipeline::new(
        region.clone(),
        config.clone(),
        upstreams.clone(),
        relays,
        quotas,
        recorder.clone(),
        settings.pipeline,
    ));
    let _ = pipeline_slot.set(pipeline.clone());

    let (health, health_service) = tonic_health::server::health_reporter();
    let (reflection, reflection_v1alpha) =
        spillway_proto::reflection(&["spillway.v1.InferenceService", "spillway.v1.RelayService"])?;
    // Health follows the config: an agent without one cannot route.
    let mut watch = config.clone();
    let mut stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let status = if watch.borrow_and_update().is_some() {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            tokio::select! {
                _ = stop.wait() => {
                    // Draining: load balancers and probes stop sending.
                    health
                        .set_service_status("", tonic_health::ServingStatus::NotServing)
                        .await;
                    return;
                }
                changed = watch.changed() => if changed.is_err() { return },
            }
        }
    });

    let relay = RelayServer::new(
        region,
        config.clone(),
        upstreams.clone(),
        recorder.metrics.clone(),
        agent_id.clone(),
        tls.is_some(),
    );
    let converse = crate::doors::converse::service(
        ConverseDoor {
            pipeline: pipeline.clone(),
        },
        settings.max_body_bytes,
    );
    let mut stop = shutdown.clone();
    let grpc_server = tonic::transport::Server::builder();
    // Client certificates are optional at the gRPC handshake: clients of
    // the Converse door authenticate with API keys, the relay checks for
    // an agent certificate itself. The door asks for none.
    let grpc_tls = tls
        .as_ref()
        .map(|creds| Arc::new(creds.rustls_server(ClientAuth::Optional, &[b"h2"])));
    let http_tls = tls
        .as_ref()
        .map(|creds| creds.rustls_server(ClientAuth::None, &[]));
    if let Some(creds) = &tls {
        let metrics = recorder.metrics.clone();
        creds.watch(
            settings.tls_reload,
            shutdown.clone(),
            move |creds, event| {
                metrics.add(
                    "spillway_agent_tls_reloads_total",
                    &[("outcome", event.as_str())],
                    1,
                );
                if let Some(t) = creds.not_after() {
                    metrics.set(
                        "spillway_agent_tls_certificate_expiry_timestamp_seconds",
                        &[],
                        t as f64,
                    );
                }
            },
        );
    }
    let counted = recorder.metrics.clone();
    let grpc_incoming = spillway_core::net::limited_incoming(
        grpc,
        limits.max_connections,
        limits.header_timeout,
        move || {
            counted.add(
                "spillway_agent_connections_closed_total",
                &[("reason", "limit")],
                1,
            )
        },
    );
    let handshake_within = limits.header_timeout;
    let grpc_task = tokio::spawn(async move {
        let router = grpc_server
            // Dead peers: a ping every 10 s, answered within 10 s.
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(Some(limits.max_streams))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(MessageLimit::new(
                pb::relay_service_server::RelayServiceServer::new(relay)
                    .max_decoding_message_size(MAX_RELAY_MESSAGE)
                    .max_encoding_message_size(MAX_RELAY_MESSAGE),
                MAX_RELAY_MESSAGE,
            ))
            .add_service(converse);
        let stopped = async move { stop.wait().await };
        match grpc_tls {
            Some(config) => {
                let incoming =
                    spillway_core::net::tls_incoming(grpc_incoming, config, handshake_within);
                router
                    .serve_with_incoming_shutdown(incoming, stopped)
                    .await?
            }
            None => {
                router
                    .serve_with_incoming_shutdown(grpc_incoming, stopped)
                    .await?
            }
        }
        Ok(())
    });

    let mut metrics_addr = None;
    if let Some(listener) = metrics_listener {
        metrics_addr = Some(listener.local_addr()?);
        let metrics = recorder.metrics.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move { http::prometheus(&metrics) }
            }),
        );
        // Under the same timeouts and limit as the door.
        HttpServer::start(
            listener,
            None,
            app,
            settings.conn_limits.clone(),
            recorder.metrics.clone(),
            shutdown.clone(),
        )?;
    }
    let door = Arc::new(HttpDoor {
        pipeline: pipeline.clone(),
        max_body_bytes: settings.max_body_bytes,
        body_read_timeout: settings.body_read_timeout,
        serve_metrics: settings.metrics_listen.is_none(),
    });
    let http = HttpServer::start(
        http,
        http_tls,
        http::router(door),
        settings.conn_limits,
        recorder.metrics.clone(),
        shutdown,
    )?;
    Ok(RunningAgent {
        config,
        pipeline,
        grpc: grpc_task,
        http,
        metrics: metrics_addr,
        recorder,
    })
}

/// Runs an agent from its flags until `signal` resolves, then drains:
/// health says NOT_SERVING, the control plane hears that this agent leaves
/// (other regions stop relaying here), the listeners stop accepting, calls
/// in flight get up to `--drain-secs` to finish, and the audit log and the
/// OTLP exporters are written out before exit.
pub async fn run(
    args: AgentArgs,
    grpc: TcpListener,
    http: TcpListener,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let relay = args
        .relay_address
        .clone()
        .unwrap_or_else(|| grpc.local_addr().map(|a| a.to_string()).unwrap_or_default());
    let drain = Duration::from_secs(args.drain_secs);
    let (trigger, shutdown) = shutdown::channel();
    let agent = start(AgentSettings::from_args(&args, relay), grpc, http, shutdown).await?;
    signal.await;
    tracing::info!(?drain, "shutting down: draining calls in flight");
    trigger.trigger();
    agent.finish(drain).await
}
