//! Starting an agent: load the persisted config, follow the control plane,
//! and serve gRPC (health, reflection) until shutdown. Health reports
//! SERVING once a config is present.

use std::time::Duration;

use spillway_proto::pb;
use spillway_proto::shutdown::{self, Shutdown};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::AgentArgs;
use crate::snapshot::LocalCapabilities;
use crate::sync::{self, ConfigWatch, SyncSettings};

impl SyncSettings {
    pub fn from_args(args: &AgentArgs, relay_address: String) -> SyncSettings {
        SyncSettings {
            agent_id: args.agent_id.clone(),
            region: args.region.clone(),
            relay_address,
            control_planes: args.control_plane.clone(),
            state_dir: args.state_dir.clone(),
            local: LocalCapabilities {
                models: args.serve_models.iter().cloned().collect(),
            },
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// A started agent: its config watch, and the server task.
pub struct RunningAgent {
    pub config: ConfigWatch,
    pub server: tokio::task::JoinHandle<Result<(), RunError>>,
}

/// Starts the agent's config stream and gRPC server on `listener`; both stop
/// when `shutdown` fires.
pub async fn start(
    settings: SyncSettings,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<RunningAgent, RunError> {
    let config = sync::start(settings, shutdown.clone()).await;
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // Health follows the config: an agent without one cannot route.
    let mut watch = config.clone();
    let mut stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            if watch.borrow_and_update().is_some() {
                health
                    .set_service_status("", tonic_health::ServingStatus::Serving)
                    .await;
            } else {
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
            }
            tokio::select! {
                _ = stop.wait() => return,
                changed = watch.changed() => if changed.is_err() { return },
            }
        }
    });
    let mut stop = shutdown;
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                stop.wait().await
            })
            .await?;
        Ok(())
    });
    Ok(RunningAgent { config, server })
}

/// Runs an agent from its flags until `signal` resolves.
pub async fn run(
    args: AgentArgs,
    listener: TcpListener,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let relay = args.relay_address.clone().unwrap_or_else(|| {
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    });
    let (trigger, shutdown) = shutdown::channel();
    let agent = start(SyncSettings::from_args(&args, relay), listener, shutdown).await?;
    signal.await;
    tracing::info!("shutting down");
    trigger.trigger();
    agent.server.await.unwrap_or(Ok(()))
}
