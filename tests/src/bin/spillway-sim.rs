//! spillway-sim: a simulated OpenAI-compatible model server for the demo,
//! the tests and the benchmark.

use std::time::Duration;

use clap::Parser;
use spillway_tests::sim::{self, SimConfig, SimState};

/// A simulated model server: OpenAI-compatible chat completions (unary and
/// streaming), with configurable latency, length, concurrency and failures.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Milliseconds to the first token.
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Milliseconds between tokens.
    #[arg(long, default_value_t = 0)]
    inter_token_ms: u64,
    /// Tokens per answer (capped by max_tokens).
    #[arg(long, default_value_t = 16)]
    output_tokens: u32,
    /// Concurrent sequences; more get 429.
    #[arg(long, default_value_t = 64)]
    max_concurrent: u32,
    /// Share of calls answered 500, from 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.failure_rate) {
        anyhow::bail!(
            "--failure-rate {} is not between 0 and 1",
            args.failure_rate
        );
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    println!("spillway-sim listening on {}", listener.local_addr()?);
    let state = SimState::new(SimConfig {
        ttft: Duration::from_millis(args.ttft_ms),
        inter_token: Duration::from_millis(args.inter_token_ms),
        output_tokens: args.output_tokens,
        max_concurrent: args.max_concurrent,
        failure_rate: args.failure_rate,
        garbage: false,
        break_after: None,
    });
    sim::serve(listener, state, spillway_core::shutdown::signal()).await;
    Ok(())
}
