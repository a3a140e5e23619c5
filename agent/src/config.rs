//! The agent's settings: one typed struct, from flags and environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// Spillway agent: takes inference calls for one region and routes them to
/// that region's model servers or to another region's agent.
#[derive(Parser, Debug, Clone)]
#[command(name = "spillway-agent", version, about)]
pub struct AgentArgs {
    /// This agent's id, unique within its region.
    #[arg(long, env = "SPILLWAY_AGENT_ID")]
    pub agent_id: String,
    /// The region this agent serves, e.g. `us-east`.
    #[arg(long, env = "SPILLWAY_REGION")]
    pub region: String,
    /// Control-plane addresses, comma-separated; the agent moves to the next
    /// when one goes away.
    #[arg(
        long,
        env = "SPILLWAY_CONTROL_PLANE",
        value_delimiter = ',',
        required = true
    )]
    pub control_plane: Vec<String>,
    /// Address of the agent's gRPC server (relay, health).
    #[arg(long, env = "SPILLWAY_GRPC_LISTEN", default_value = "127.0.0.1:7080")]
    pub grpc_listen: SocketAddr,
    /// The host:port other regions' agents use to reach this one (default:
    /// the gRPC listen address).
    #[arg(long, env = "SPILLWAY_RELAY_ADDRESS")]
    pub relay_address: Option<String>,
    /// Where the last good configuration is kept, to boot without the
    /// control plane.
    #[arg(
        long,
        env = "SPILLWAY_STATE_DIR",
        default_value = "/var/lib/spillway-agent"
    )]
    pub state_dir: PathBuf,
    /// Models this region's model servers serve; repeatable or
    /// comma-separated. An update that routes a profile to this region for a
    /// model not listed here is refused (NACKed).
    #[arg(
        long = "serve-model",
        env = "SPILLWAY_SERVE_MODELS",
        value_delimiter = ','
    )]
    pub serve_models: Vec<String>,
    /// Talk plaintext gRPC. For development only: TLS is not configured in
    /// this build yet, so the flag is required.
    #[arg(long)]
    pub insecure_dev: bool,
}
