//! The control-plane replica binary: parse flags, set up logging, run.

use std::time::Duration;

use clap::Parser;
use spillway_control_plane::leader::LeaderSettings;
use spillway_control_plane::server::{self, Settings};
use spillway_control_plane::store::DEFAULT_PREFIX;
use spillway_core::tls::TlsFiles;
use std::path::PathBuf;

/// Spillway control plane: stores inference profiles, route tables and
/// regions (in etcd, or in memory when no endpoint is given) and streams
/// each region's agents their configuration.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address for the gRPC API (admin, agent sync, health, reflection).
    #[arg(long, env = "SPILLWAY_LISTEN", default_value = "127.0.0.1:7070")]
    listen: String,
    /// etcd endpoints, comma-separated (e.g. http://127.0.0.1:2379). Without
    /// any, an embedded in-memory store is used: fine for trials, lost on exit.
    #[arg(long, env = "SPILLWAY_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Key prefix in etcd.
    #[arg(long, env = "SPILLWAY_ETCD_PREFIX", default_value = DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// Name of this replica (default: hostname-pid).
    #[arg(long, env = "SPILLWAY_REPLICA_ID")]
    replica_id: Option<String>,
    /// Seconds an agent stays listed after its replica dies.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=300))]
    lease_ttl_secs: u64,
    /// Milliseconds that changes are gathered before one update goes out.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    debounce_ms: u64,
    /// Milliseconds between weight updates by the leader.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    weights_interval_ms: u64,
    /// Milliseconds without a load report after which a region counts as
    /// silent (and is drained).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    report_silence_ms: u64,
    /// Seconds a quota lease lasts: an agent that loses the control plane
    /// keeps its share this long, then falls back to a safe share. A new
    /// leader only renews leases for this long after taking over.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=3600))]
    quota_lease_secs: u64,
    /// Milliseconds between quota lease refreshes by the leader.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    quota_refresh_ms: u64,
    /// The CA that signs agents' and operators' certificates (PEM).
    #[arg(long, env = "SPILLWAY_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This replica's certificate and key (PEM), e.g. from `cargo xtask certs`.
    #[arg(long, env = "SPILLWAY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "SPILLWAY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// How often the three TLS files are read again, in seconds: when they
    /// change (a renewed certificate, a CA bundle with a new CA), new
    /// connections use them; files that cannot be used are logged and the
    /// previous certificate stays.
    #[arg(long, env = "SPILLWAY_TLS_RELOAD_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    tls_reload_secs: u64,
    /// A bearer token that admits admin calls without an admin certificate.
    #[arg(long, env = "SPILLWAY_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// TLS to etcd: its CA, and this replica's client certificate and key.
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    #[arg(long)]
    etcd_cert: Option<PathBuf>,
    #[arg(long)]
    etcd_key: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "SPILLWAY_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Serve plaintext gRPC, with no certificate checks. For development
    /// only; without it, --tls-ca, --tls-cert and --tls-key are required.
    #[arg(long)]
    insecure_dev: bool,
    /// With TLS on, still talk to an `http://` etcd, in the clear (logged
    /// as a warning). Meant for an etcd on the loopback; the catalog
    /// (tenants, key hashes, route tables) crosses that link.
    #[arg(long)]
    allow_plaintext_etcd: bool,
    /// gRPC connections open at once (agents, operators); past it new ones
    /// are closed. Keep it under the open-files limit (LimitNOFILE).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    init_logging();
    if let Err(e) = run(args).await {
        eprintln!("spillway-control-plane: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let tls = TlsFiles::from_flags("tls-", args.tls_ca, args.tls_cert, args.tls_key)
        .map_err(anyhow::Error::msg)?;
    let etcd_tls = TlsFiles::from_flags("etcd-", args.etcd_ca, args.etcd_cert, args.etcd_key)
        .map_err(anyhow::Error::msg)?;
    if let Some(warning) =
        spillway_core::tls::require(tls.as_ref(), args.insecure_dev).map_err(anyhow::Error::msg)?
    {
        tracing::warn!("{warning}");
    }
    for ep in &args.etcd_endpoints {
        // With TLS on every other hop, a plaintext etcd would carry the
        // catalog in the clear: only when the operator says so.
        if tls.is_some() && !ep.starts_with("https://") {
            if !args.allow_plaintext_etcd {
                anyhow::bail!(
                    "--etcd-endpoints `{ep}` is plaintext while TLS is on: use https:// with --etcd-ca/--etcd-cert/--etcd-key, or --allow-plaintext-etcd for an etcd on the loopback"
                );
            }
            tracing::warn!(endpoint = %ep, "talking to etcd in plaintext (--allow-plaintext-etcd): the catalog crosses this link in the clear");
        }
        match (ep.starts_with("https://"), etcd_tls.is_some()) {
            (false, true) => anyhow::bail!(
                "--etcd-endpoints `{ep}` is not https:// while --etcd-ca/--etcd-cert/--etcd-key are given"
            ),
            (true, false) => anyhow::bail!(
                "--etcd-endpoints `{ep}` is https://: give --etcd-ca, --etcd-cert and --etcd-key"
            ),
            _ => {}
        }
    }
    if let Some(t) = &args.admin_token
        && t.len() < 16
    {
        anyhow::bail!("--admin-token must be at least 16 characters");
    }
    if !args.etcd_prefix.starts_with('/') || !args.etcd_prefix.ends_with('/') {
        anyhow::bail!(
            "--etcd-prefix `{}` must start and end with '/'",
            args.etcd_prefix
        );
    }
    let settings = Settings {
        etcd_endpoints: args.etcd_endpoints,
        prefix: args.etcd_prefix,
        replica_id: args.replica_id.unwrap_or_else(server::default_replica_id),
        lease_ttl: Duration::from_secs(args.lease_ttl_secs),
        debounce: Duration::from_millis(args.debounce_ms),
        leader: LeaderSettings {
            interval: Duration::from_millis(args.weights_interval_ms),
            silence: Duration::from_millis(args.report_silence_ms),
            quota_lease: Duration::from_secs(args.quota_lease_secs),
            quota_refresh: Duration::from_millis(args.quota_refresh_ms),
            ..LeaderSettings::default()
        },
        tls,
        admin_token: args.admin_token,
        etcd_tls,
        metrics_listen: args.metrics_listen,
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        tls_reload: Duration::from_secs(args.tls_reload_secs),
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let store = server::open_store(&settings).await?;
    // One line on stdout that scripts and the test harness wait for.
    println!(
        "spillway-control-plane listening on {}",
        listener.local_addr()?
    );
    server::run(settings, store, listener, async {
        spillway_core::shutdown::signal().await;
        tracing::info!("shutting down");
    })
    .await?;
    Ok(())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPILLWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a terminal only: not in journald or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
