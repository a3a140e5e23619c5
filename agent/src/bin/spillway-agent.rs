//! The agent binary: parse flags, set up logging, run.

use clap::Parser;
use spillway_agent::config::AgentArgs;
use spillway_agent::server;

#[tokio::main]
async fn main() {
    let args = AgentArgs::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPILLWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(args).await {
        eprintln!("spillway-agent: {e}");
        std::process::exit(1);
    }
}

async fn run(args: AgentArgs) -> anyhow::Result<()> {
    if !args.insecure_dev {
        anyhow::bail!(
            "TLS is not configured in this build; pass --insecure-dev to talk plaintext for development"
        );
    }
    tracing::warn!("--insecure-dev: plaintext gRPC; never do this outside development");
    let listener = tokio::net::TcpListener::bind(args.grpc_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.grpc_listen))?;
    println!("spillway-agent listening on {}", listener.local_addr()?);
    server::run(args, listener, spillway_proto::shutdown::signal()).await?;
    Ok(())
}
