//! spillway-sim: a simulated OpenAI-compatible model server for the demo,
//! the tests and the benchmark: the simple server (429 past its limit) or
//! an engine (vLLM, SGLang, llama.cpp) that batches, queues and writes its
//! own metrics.

use std::time::Duration;

use clap::Parser;
use spillway_tests::sim::{self, Engine, SimConfig, SimState};

/// A simulated model server: OpenAI chat, completions, embeddings and
/// Responses, and Anthropic Messages (unary and streaming), with
/// configurable latency, length, concurrency and failures. As an engine
/// (`--engine vllm|sglang|llamacpp`) it never refuses for load: calls past
/// its KV-cache budget or its slots wait in a FIFO queue.
///
/// Controls: `POST /admin/down` and `/admin/up` (an outage), and
/// `POST /admin/metrics/ok`, `/admin/metrics/hang`, `/admin/metrics/garbage`
/// (how `/metrics` answers).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// What kind of server: simple, vllm, sglang or llamacpp.
    #[arg(long, default_value_t = Engine::Simple)]
    engine: Engine,
    /// Milliseconds to the first token (the prefill, after any queueing).
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Milliseconds between tokens, for a call alone in its batch.
    #[arg(long, default_value_t = 0)]
    inter_token_ms: u64,
    /// Tokens per answer (capped by max_tokens).
    #[arg(long, default_value_t = 16)]
    output_tokens: u32,
    /// Concurrent sequences: more get 429 from the simple server and wait
    /// in an engine (vLLM's --max-num-seqs, llama.cpp's --parallel).
    #[arg(long, default_value_t = 64)]
    max_concurrent: u32,
    /// vLLM and SGLang: the KV-cache budget in tokens, shared by the
    /// running calls' prompts and outputs.
    #[arg(long, default_value_t = 16_384)]
    kv_tokens: u32,
    /// Engines: calls that may wait; past them, 503. No bound by default.
    #[arg(long)]
    max_queued: Option<u32>,
    /// Engines: how much slower tokens come per other running call.
    #[arg(long, default_value_t = 0.02)]
    batch_slowdown: f64,
    /// The `model_name` label of the engines' metrics.
    #[arg(long, default_value = "sim")]
    model_name: String,
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
    if !(args.batch_slowdown.is_finite() && args.batch_slowdown >= 0.0) {
        anyhow::bail!(
            "--batch-slowdown {} is not a number of 0 or more",
            args.batch_slowdown
        );
    }
    if args.kv_tokens == 0 {
        anyhow::bail!("--kv-tokens 0 holds no call: give 1 or more");
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    println!("spillway-sim listening on {}", listener.local_addr()?);
    let state = SimState::new(SimConfig {
        engine: args.engine,
        ttft: Duration::from_millis(args.ttft_ms),
        inter_token: Duration::from_millis(args.inter_token_ms),
        output_tokens: args.output_tokens,
        max_concurrent: args.max_concurrent,
        kv_tokens: args.kv_tokens,
        max_queued: args.max_queued,
        batch_slowdown: args.batch_slowdown,
        model_name: args.model_name,
        failure_rate: args.failure_rate,
        garbage: false,
        break_after: None,
    });
    sim::serve(listener, state, spillway_core::shutdown::signal()).await;
    Ok(())
}
