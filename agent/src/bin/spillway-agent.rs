//! The agent binary: parse flags, set up logging, run.

use clap::Parser;
use spillway_agent::config::AgentArgs;
use spillway_agent::server;

fn main() {
    let args = AgentArgs::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        runtime.worker_threads(usize::from(n));
    }
    let runtime = match runtime.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("spillway-agent: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async_main(args));
}

async fn async_main(args: AgentArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPILLWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a terminal only: not in journald or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(args).await {
        eprintln!("spillway-agent: {e}");
        std::process::exit(1);
    }
}

async fn run(mut args: AgentArgs) -> anyhow::Result<()> {
    // Every connection is an open file: take what the hard limit allows,
    // and keep the connection limit under it.
    match raise_nofile_limit() {
        Ok((soft, hard)) => {
            // Each listener has its own limit: together they keep a
            // quarter of the files for model servers, relays and the log.
            let listeners = if args.metrics_listen.is_some() { 3 } else { 2 };
            let room = (soft / 4 * 3 / listeners).max(64);
            if args.max_connections > room {
                tracing::warn!(
                    max_connections = args.max_connections,
                    open_files = soft,
                    capped = room,
                    "--max-connections is more than the open-files limit allows for each listener; capped (raise LimitNOFILE / ulimit -n)"
                );
                args.max_connections = room;
            }
            tracing::info!(
                open_files = soft,
                hard_limit = hard,
                max_connections = args.max_connections,
                "open-files limit"
            );
        }
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
    let tls = spillway_core::tls::TlsFiles::from_flags(
        "tls-",
        args.tls_ca.clone(),
        args.tls_cert.clone(),
        args.tls_key.clone(),
    )
    .map_err(anyhow::Error::msg)?;
    if let Some(warning) =
        spillway_core::tls::require(tls.as_ref(), args.insecure_dev).map_err(anyhow::Error::msg)?
    {
        tracing::warn!("{warning}");
    }
    if tls.is_some()
        && let Some(plain) = args
            .control_plane
            .iter()
            .find(|u| !u.starts_with("https://"))
    {
        anyhow::bail!(
            "--control-plane `{plain}` is not https:// while TLS is configured: the agent would talk to it in plaintext"
        );
    }
    if args.model_servers.is_empty() {
        tracing::warn!("no --model-server given: this agent can only relay calls to other regions");
    }
    let grpc = tokio::net::TcpListener::bind(args.grpc_listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot listen on {} (--grpc-listen): {e}", args.grpc_listen)
        })?;
    let http = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot listen on {} (--http-listen): {e}", args.http_listen)
        })?;
    // One line on stdout that scripts and the test harness wait for.
    println!(
        "spillway-agent listening grpc={} http={}",
        grpc.local_addr()?,
        http.local_addr()?
    );
    server::run(args, grpc, http, spillway_core::shutdown::signal()).await?;
    Ok(())
}

/// Raises the soft limit on open files to the hard limit (connections are
/// files), and returns both as they are after.
fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read only the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // An unlimited hard limit still stops at the kernel's nr_open.
        let target = lim.rlim_max.min(1 << 20);
        if lim.rlim_cur < target {
            let raised = libc::rlimit {
                rlim_cur: target,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim = raised;
        }
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}
