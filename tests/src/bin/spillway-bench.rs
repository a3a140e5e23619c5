//! spillway-bench: measures the agent and the control plane on loopback,
//! each figure beside its floor in the same run, and writes
//! `report.md` and `report.json`. `cargo xtask bench` builds it in release
//! mode and runs it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use prost::Message as _;
use serde::Serialize;
use serde_json::{Value, json};
use spillway_agent::control::snapshot::gather;
use spillway_proto::pb::{
    self, control_service_client::ControlServiceClient,
    inference_service_client::InferenceServiceClient,
};
use spillway_tests::bench::{
    Sample, Stats, closed_loop, closed_loop_sample, open_loop, percentile_ms, timed,
};
use spillway_tests::{
    AgentProcess, ControlPlane, Etcd, SimProcess, rss_bytes, spawn_and_read_line,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Measures Spillway on this machine and writes a report.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// A short run for CI: every scenario, fewer and shorter measurements.
    #[arg(long)]
    quick: bool,
    /// Where report.md and report.json go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// An nginx binary to measure as the reverse-proxy floor.
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// Run only the engine-saturation scenario and print its table.
    #[arg(long)]
    engine_saturation_only: bool,
    /// Run only the control-plane-at-scale scenario; writes scale.md and
    /// scale.json and prints its tables.
    #[arg(long)]
    scale_only: bool,
    /// Profiles in the scale scenario's catalog (default 2,000; quick 200).
    #[arg(long, value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    scale_profiles: Option<u64>,
    /// Sync clients of the scale scenario, one connection each (default 200;
    /// quick 50). Each takes a file descriptor here and one in the control
    /// plane, which takes 10,000 connections at most.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=8_000))]
    scale_clients: Option<u64>,
    /// The scale scenario's store: the embedded one, or a real etcd started
    /// on a free loopback port.
    #[arg(long, value_enum, default_value_t = StoreKind::Memory)]
    scale_store: StoreKind,
}

/// Which store the scale scenario's control plane keeps its catalog in.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum StoreKind {
    Memory,
    Etcd,
}

struct Plan {
    warmup: Duration,
    duration: Duration,
    /// Unary paths are measured in this many alternating rounds whose
    /// samples are merged, so that drift on a noisy machine hits every path
    /// alike.
    rounds: usize,
    writes: usize,
    streams: usize,
    /// Sync clients of the config-propagation step, first and second.
    sync_clients: [usize; 2],
    scale: ScalePlan,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .build(connector)
}

fn chat_body(model: &str, stream: bool) -> Bytes {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "stream": stream})
        .to_string()
        .into()
}

/// The bench tenant's API key: every call through an agent presents it, as
/// production calls do (the direct and nginx paths ignore it).
static API_KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn authorization() -> String {
    format!("Bearer {}", API_KEY.get().map_or("", String::as_str))
}

/// One unary chat completion, read to the end; true on 200.
async fn post(client: &HttpClient, uri: &http::Uri, body: &Bytes) -> bool {
    let req = Request::post(uri.clone())
        .header("content-type", "application/json")
        .header("authorization", authorization())
        .body(Full::new(body.clone()))
        .expect("a request");
    match client.request(req).await {
        Ok(resp) => {
            let ok = resp.status() == 200;
            ok && resp.into_body().collect().await.is_ok()
        }
        Err(_) => false,
    }
}

/// Time to the first token of a streamed answer.
async fn first_token(client: &HttpClient, uri: &http::Uri, body: &Bytes) -> Option<Duration> {
    let t = Instant::now();
    let req = Request::post(uri.clone())
        .header("content-type", "application/json")
        .header("authorization", authorization())
        .body(Full::new(body.clone()))
        .ok()?;
    let resp = client.request(req).await.ok()?;
    if resp.status() != 200 {
        return None;
    }
    let mut body = resp.into_body();
    let mut ttft = None;
    let mut seen = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if let Ok(data) = frame.into_data()
            && ttft.is_none()
        {
            seen.extend_from_slice(&data);
            if seen.windows(4).any(|w| w == b"tok0") {
                ttft = Some(t.elapsed());
            }
        }
    }
    ttft
}

fn converse_request(model: &str) -> pb::ConverseRequest {
    pb::ConverseRequest {
        model_id: model.into(),
        messages: vec![pb::Message {
            role: pb::Role::User.into(),
            content: vec![pb::ContentBlock {
                block: Some(pb::content_block::Block::Text("hello".into())),
            }],
        }],
        inference_config: Some(pb::InferenceConfig {
            max_tokens: Some(16),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn uri(addr: SocketAddr, path: &str) -> http::Uri {
    format!("http://{addr}{path}").parse().expect("a URI")
}

async fn closed_http(
    plan: &Plan,
    client: &HttpClient,
    c: usize,
    target: http::Uri,
    body: Bytes,
) -> Sample {
    let client = client.clone();
    let duration = plan.duration / plan.rounds as u32;
    closed_loop_sample(c, plan.warmup / plan.rounds as u32, duration, move || {
        let (client, target, body) = (client.clone(), target.clone(), body.clone());
        async move { timed(post(&client, &target, &body)).await }
    })
    .await
}

async fn closed_grpc(
    plan: &Plan,
    client: &InferenceServiceClient<Channel>,
    c: usize,
    model: &str,
) -> Sample {
    let client = client.clone();
    let req = converse_request(model);
    let key: tonic::metadata::MetadataValue<_> = authorization().parse().expect("an ASCII key");
    let duration = plan.duration / plan.rounds as u32;
    closed_loop_sample(c, plan.warmup / plan.rounds as u32, duration, move || {
        let (mut client, mut req) = (client.clone(), tonic::Request::new(req.clone()));
        req.metadata_mut().insert("authorization", key.clone());
        async move { timed(async { client.converse(req).await.is_ok() }).await }
    })
    .await
}

#[derive(Serialize)]
struct Row {
    concurrency: usize,
    #[serde(flatten)]
    figures: BTreeMap<String, Stats>,
}

#[derive(Serialize)]
struct Propagation {
    agents: usize,
    writes: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Serialize)]
struct Target {
    name: String,
    measured: String,
    target: String,
    met: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let scale = ScalePlan::new(&args);
    let plan = if args.quick {
        Plan {
            warmup: Duration::from_millis(200),
            duration: Duration::from_millis(600),
            rounds: 1,
            writes: 3,
            streams: 200,
            // A smoke run (in `cargo xtask test`, on machines that may be
            // busy): the 1,000-client figure comes from the full run.
            sync_clients: [100, 250],
            scale,
        }
    } else {
        Plan {
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(6),
            rounds: 3,
            writes: 10,
            streams: 1000,
            sync_clients: [100, 1000],
            scale,
        }
    };
    std::fs::create_dir_all(&args.out)?;
    if args.engine_saturation_only {
        let engines = engine_saturation(&plan).await;
        let r = json!({"engine_saturation": engines});
        std::fs::write(
            args.out.join("engine-saturation.json"),
            serde_json::to_string_pretty(&r)?,
        )?;
        println!("{}", engine_table(&r));
        return Ok(());
    }
    if args.scale_only {
        let started = Instant::now();
        let scale = scale_scenario(&plan.scale).await?;
        let r = json!({
            "quick": args.quick,
            "machine": machine(),
            "duration_s": started.elapsed().as_secs_f64(),
            "targets": scale_targets(&scale),
            "scale": scale,
        });
        std::fs::write(
            args.out.join("scale.json"),
            serde_json::to_string_pretty(&r)?,
        )?;
        let md = scale_markdown(&r);
        std::fs::write(args.out.join("scale.md"), &md)?;
        println!("{md}");
        return Ok(());
    }
    let started = Instant::now();
    eprintln!("bench: starting the cluster");

    // The cluster: a control plane, us-east's agent in front of simulators
    // with no latency, and us-west's agent that relays everything to us-east.
    let cp = ControlPlane::start(None, "bench-cp").await;
    let mut admin = cp.admin().await;
    for (name, geo) in [("us-east", "us"), ("us-west", "us")] {
        cp.create_region(name, geo).await;
    }
    for (id, dest) in [
        ("global.bench-m", vec!["us-east", "us-west"]),
        ("us.stream-m", vec!["us-east"]),
        ("us.long-m", vec!["us-east"]),
        ("us.drain-m", vec!["us-east", "us-west"]),
        ("us.spill-m", vec!["us-east", "us-west"]),
    ] {
        let profile = pb::InferenceProfile {
            id: id.into(),
            destinations: dest.into_iter().map(String::from).collect(),
            ..Default::default()
        };
        admin
            .create_profile(pb::CreateProfileRequest {
                profile: Some(profile),
            })
            .await?;
    }
    let relay_route = pb::RouteTable {
        profile: "global.bench-m".into(),
        source_region: "us-west".into(),
        destinations: vec![pb::RouteDestination {
            region: "us-east".into(),
            weight: 1.0,
            priority: 0,
        }],
        ttft_objective_ms: 0,
        revision: 0,
    };
    admin
        .create_route_table(pb::CreateRouteTableRequest {
            route_table: Some(relay_route),
        })
        .await?;
    // us.drain-m: us-east's calls split evenly with us-west, whose model
    // server the failover scenario takes down and up.
    let split = pb::RouteTable {
        profile: "us.drain-m".into(),
        source_region: "us-east".into(),
        destinations: ["us-east", "us-west"]
            .iter()
            .map(|r| pb::RouteDestination {
                region: r.to_string(),
                weight: 1.0,
                priority: 0,
            })
            .collect(),
        ttft_objective_ms: 0,
        revision: 0,
    };
    admin
        .create_route_table(pb::CreateRouteTableRequest {
            route_table: Some(split),
        })
        .await?;
    // Calls present a tenant's key and meet a quota (one too large to
    // refuse anything), so that authentication and admission are measured.
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(pb::Tenant {
                name: "bench".into(),
                profiles: vec!["*".into()],
                ..Default::default()
            }),
        })
        .await?;
    let key = admin
        .create_key(pb::CreateKeyRequest {
            tenant: "bench".into(),
            description: "spillway-bench".into(),
        })
        .await?
        .into_inner()
        .secret;
    let _ = API_KEY.set(key);
    admin
        .create_quota(pb::CreateQuotaRequest {
            quota: Some(pb::Quota {
                scope: Some(pb::QuotaScope {
                    tenant: "bench".into(),
                    ..Default::default()
                }),
                requests_per_minute: Some(1_000_000_000),
                tokens_per_minute: Some(1_000_000_000_000),
                ..Default::default()
            }),
        })
        .await?;
    let fast = SimProcess::start(&["--max-concurrent", "1000000", "--output-tokens", "16"]).await;
    let streaming = SimProcess::start(&[
        "--max-concurrent",
        "1000000",
        "--output-tokens",
        "16",
        "--inter-token-ms",
        "1",
    ])
    .await;
    let long = SimProcess::start(&[
        "--max-concurrent",
        "1000000",
        "--output-tokens",
        "100",
        "--inter-token-ms",
        "50",
    ])
    .await;
    // us.spill-m: us-east serves it on a slow simulator that takes 8 calls
    // at once, us-west on the fast one (the spill scenario).
    let slow = SimProcess::start(&[
        "--max-concurrent",
        "8",
        "--output-tokens",
        "16",
        "--ttft-ms",
        "200",
    ])
    .await;
    let planes = [cp.url()];
    // One worker thread per agent: on a 2-core machine shared by the load
    // generator, the simulators and two agents, a second thread costs more
    // in cross-thread wake-ups than it brings (see BENCHMARKS.md).
    let threads = ["--worker-threads", "1"];
    // us-east's agent runs as in production: every call authenticated,
    // admitted by a quota and audited to disk, and 1% traced to a collector
    // of its region (a collector in this process, on the same 2 cores).
    let collector = spillway_tests::otlp::TestCollector::start().await;
    let audit = tempfile::tempdir()?;
    let audit_dir = audit.path().join("audit");
    let endpoint = collector.endpoint();
    let east_flags = [
        threads[0],
        threads[1],
        "--audit-dir",
        audit_dir.to_str().unwrap_or("audit"),
        "--otlp-endpoint",
        &endpoint,
        "--trace-sample-ratio",
        "0.01",
    ];
    let east = AgentProcess::start_with(
        "east-1",
        "us-east",
        &planes,
        &[
            format!(
                "http://{},models=bench-m|drain-m,apis=chat|embeddings,capacity=1000000,static,metrics=none",
                fast.addr
            ),
            format!("http://{},models=stream-m,capacity=1000000,static,metrics=none", streaming.addr),
            format!("http://{},models=long-m,capacity=1000000,static,metrics=none", long.addr),
            format!("http://{},models=spill-m,capacity=8,static,metrics=none", slow.addr),
        ],
        &east_flags,
    )
    .await;
    let flaky = SimProcess::start(&["--max-concurrent", "1000000", "--output-tokens", "16"]).await;
    let west = AgentProcess::start_with(
        "west-1",
        "us-west",
        &planes,
        &[
            format!(
                "http://{},models=drain-m,capacity=1000000,static,metrics=none",
                flaky.addr
            ),
            format!(
                "http://{},models=spill-m,capacity=1000000,static,metrics=none",
                fast.addr
            ),
        ],
        &threads,
    )
    .await;
    let client = http_client();
    let body = chat_body("bench-m", false);
    let profile_body = chat_body("global.bench-m", false);
    // Ready when both agents serve (us-west through us-east).
    let ready = Instant::now() + Duration::from_secs(30);
    while !(post(
        &client,
        &uri(east.http, "/v1/chat/completions"),
        &profile_body,
    )
    .await
        && post(
            &client,
            &uri(west.http, "/v1/chat/completions"),
            &profile_body,
        )
        .await)
    {
        if Instant::now() > ready {
            bail!("the agents did not start serving within 30s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent_idle_rss = rss_bytes(east.pid()).context("reading the agent's RSS")?;

    let nginx = match &args.nginx {
        Some(bin) => Some(Nginx::start(bin, fast.addr).await?),
        None => None,
    };

    let completions = "/v1/chat/completions";
    let mut local_rows = Vec::new();
    let mut relay_rows = Vec::new();
    let mut grpc_rows = Vec::new();
    let grpc_channel = Endpoint::from_shared(format!("http://{}", east.grpc))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let grpc_client = InferenceServiceClient::new(grpc_channel);
    for c in [1, 16, 64] {
        eprintln!("bench: unary calls at concurrency {c}");
        let mut samples: BTreeMap<&str, Sample> = BTreeMap::new();
        for _ in 0..plan.rounds {
            let mut round = vec![
                (
                    "direct",
                    closed_http(&plan, &client, c, uri(fast.addr, completions), body.clone()).await,
                ),
                (
                    "agent",
                    closed_http(
                        &plan,
                        &client,
                        c,
                        uri(east.http, completions),
                        profile_body.clone(),
                    )
                    .await,
                ),
                (
                    "relayed",
                    closed_http(
                        &plan,
                        &client,
                        c,
                        uri(west.http, completions),
                        profile_body.clone(),
                    )
                    .await,
                ),
                (
                    "agent_grpc",
                    closed_grpc(&plan, &grpc_client, c, "global.bench-m").await,
                ),
            ];
            if let Some(n) = &nginx {
                round.push((
                    "nginx",
                    closed_http(&plan, &client, c, uri(n.addr, completions), body.clone()).await,
                ));
            }
            for (name, s) in round {
                samples.entry(name).or_default().merge(s);
            }
        }
        let mut stats: BTreeMap<&str, Stats> =
            samples.into_iter().map(|(k, v)| (k, v.stats())).collect();
        let pick = |stats: &mut BTreeMap<&str, Stats>,
                    names: &[(&str, &str)]|
         -> BTreeMap<String, Stats> {
            names
                .iter()
                .filter_map(|(from, to)| stats.get(from).map(|s| (to.to_string(), s.clone())))
                .collect()
        };
        let local = pick(
            &mut stats,
            &[("direct", "direct"), ("agent", "agent"), ("nginx", "nginx")],
        );
        let relay = pick(&mut stats, &[("relayed", "relayed"), ("agent", "local")]);
        let grpc = pick(
            &mut stats,
            &[("agent_grpc", "agent_grpc"), ("direct", "direct_http")],
        );
        local_rows.push(Row {
            concurrency: c,
            figures: local,
        });
        relay_rows.push(Row {
            concurrency: c,
            figures: relay,
        });
        grpc_rows.push(Row {
            concurrency: c,
            figures: grpc,
        });
    }

    // Embeddings, unary: the same stack for another door, beside the
    // simulator called directly.
    let mut embedding_rows = Vec::new();
    let embeddings = "/v1/embeddings";
    for c in [1, 64] {
        eprintln!("bench: embeddings at concurrency {c}");
        let mut samples: BTreeMap<&str, Sample> = BTreeMap::new();
        for _ in 0..plan.rounds {
            for (name, target, model) in [
                ("direct", uri(fast.addr, embeddings), "bench-m"),
                ("agent", uri(east.http, embeddings), "global.bench-m"),
            ] {
                let body: Bytes = json!({"model": model, "input": ["hello", "world"]})
                    .to_string()
                    .into();
                let s = closed_http(&plan, &client, c, target, body).await;
                samples.entry(name).or_default().merge(s);
            }
        }
        embedding_rows.push(Row {
            concurrency: c,
            figures: samples
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.stats()))
                .collect(),
        });
    }

    // Open loop: calls start at a fixed rate whatever the answers take, so
    // that queueing shows in the latency (a closed loop slows down instead).
    let mut open_rows = Vec::new();
    for rate in [1000u32, 5000] {
        eprintln!("bench: open loop at {rate} calls/s");
        let mut figures = BTreeMap::new();
        for (name, target, body) in [
            ("direct", uri(fast.addr, completions), body.clone()),
            ("agent", uri(east.http, completions), profile_body.clone()),
        ] {
            let client = client.clone();
            let stats = open_loop(rate, plan.duration / 2, move || {
                let (client, target, body) = (client.clone(), target.clone(), body.clone());
                async move { timed(post(&client, &target, &body)).await }
            })
            .await;
            figures.insert(name.to_string(), stats);
        }
        open_rows.push(Row {
            concurrency: rate as usize,
            figures,
        });
    }

    let mut ttft_rows = Vec::new();
    for c in [1, 16] {
        eprintln!("bench: time to first token at concurrency {c}");
        let mut figures = BTreeMap::new();
        for (name, target, model) in [
            ("direct", uri(streaming.addr, completions), "stream-m"),
            ("agent", uri(east.http, completions), "us.stream-m"),
        ] {
            let (client, body) = (client.clone(), chat_body(model, true));
            let stats = closed_loop(c, plan.warmup, plan.duration, move || {
                let (client, target, body) = (client.clone(), target.clone(), body.clone());
                async move { first_token(&client, &target, &body).await }
            })
            .await;
            figures.insert(name.to_string(), stats);
        }
        ttft_rows.push(Row {
            concurrency: c,
            figures,
        });
    }

    eprintln!("bench: agent memory at {} concurrent streams", plan.streams);
    let agent_streams_rss = streams_rss(&client, &east, long.addr, plan.streams).await?;

    eprintln!("bench: a failing region's drain and recovery");
    let failover = failover(&cp, &client, &east, flaky.addr).await?;
    eprintln!("bench: the source saturated and relieved");
    let spill = spill(&cp, &client, &east).await?;

    eprintln!("bench: config propagation");
    let (propagation, cp_rss) = propagation(&plan).await?;

    let scale = scale_scenario(&plan.scale).await?;

    eprintln!("bench: a shared quota (three agents, 600 requests a minute)");
    let quota = quota(&plan).await;

    eprintln!("bench: engine saturation (vLLM-mode engines, callers 4 to 40)");
    let engines = engine_saturation(&plan).await;

    // The verdicts against the targets, and the report.
    let at = |rows: &[Row], c: usize, name: &str| -> Stats {
        rows.iter()
            .find(|r| r.concurrency == c)
            .expect("a row")
            .figures[name]
            .clone()
    };
    let mut targets = Vec::new();
    let overhead = at(&local_rows, 1, "agent").p50_us - at(&local_rows, 1, "direct").p50_us;
    targets.push(Target {
        name: "agent overhead, HTTP, concurrency 1, p50".into(),
        measured: format!("{overhead:.0} µs"),
        target: "≤ 60 µs".into(),
        met: overhead <= 60.0,
    });
    if nginx.is_some() {
        let ratio = at(&local_rows, 64, "agent").throughput_rps
            / at(&local_rows, 64, "nginx").throughput_rps;
        targets.push(Target {
            name: "agent throughput / nginx throughput, concurrency 64".into(),
            measured: format!("{ratio:.2}"),
            target: "≥ 0.5".into(),
            met: ratio >= 0.5,
        });
    }
    let relay_added = at(&relay_rows, 1, "relayed").p99_us - at(&relay_rows, 1, "local").p99_us;
    targets.push(Target {
        name: "relay added latency, concurrency 1, p99".into(),
        measured: format!("{:.2} ms", relay_added / 1000.0),
        target: "< 1 ms".into(),
        met: relay_added < 1000.0,
    });
    for p in &propagation {
        let limit = if p.agents >= 1000 { 1000.0 } else { 200.0 };
        targets.push(Target {
            name: format!("config propagation to {} agents, p99", p.agents),
            measured: format!("{:.0} ms", p.p99_ms),
            target: format!("< {limit:.0} ms"),
            met: p.p99_ms < limit,
        });
    }
    targets.push(Target {
        name: "a saturated source spills by weight (agents report every 1 s)".into(),
        measured: format!("{:.1} s", spill.spill_s),
        target: "within 2 report intervals (2 s)".into(),
        met: spill.spill_s <= 2.0,
    });
    targets.push(Target {
        name: "a failing region drained from the weights".into(),
        measured: format!("{:.1} s", failover.drain_s),
        target: "≤ 2 s".into(),
        met: failover.drain_s <= 2.0,
    });
    targets.push(Target {
        name: "failed non-streaming calls through the region's outage".into(),
        measured: format!("{} of {}", failover.failed, failover.calls),
        target: "0".into(),
        met: failover.failed == 0,
    });
    targets.push(Target {
        name: "shared quota overshoot, control plane up".into(),
        measured: format!("{:.1}%", quota.overshoot_up * 100.0),
        target: "< 2%".into(),
        met: quota.overshoot_up < 0.02,
    });
    targets.push(Target {
        name: "shared quota utilization under uneven load, control plane up".into(),
        measured: format!("{:.1}%", quota.utilization_up * 100.0),
        target: "> 95%".into(),
        met: quota.utilization_up > 0.95,
    });
    if let Some(down) = quota.overshoot_down {
        targets.push(Target {
            name: "shared quota overshoot, control plane killed".into(),
            measured: format!("{:.1}%", down * 100.0),
            target: "< 2%".into(),
            met: down < 0.02,
        });
    }
    targets.push(Target {
        name: "an idle agent's quota share reclaimed by the others".into(),
        measured: quota
            .reclaim_s
            .map_or("never".to_string(), |s| format!("{s:.2} s")),
        target: format!("within one lease ({} s)", quota.lease_s),
        met: quota.reclaim_s.is_some_and(|s| s <= quota.lease_s as f64),
    });
    if let Some(e) = engines.first() {
        targets.push(Target {
            name: "engine saturation: TTFT p99 with engine signals / unloaded TTFT".into(),
            measured: format!("{:.2}", e.ttft_p99_ms / e.unloaded_ttft_ms),
            target: "≤ 1.5".into(),
            met: e.ttft_p99_ms <= 1.5 * e.unloaded_ttft_ms,
        });
        targets.push(Target {
            name: "engine saturation: throughput / offered load, engine signals".into(),
            measured: format!("{:.1}%", e.served_share * 100.0),
            target: "≥ 95%".into(),
            met: e.served_share >= 0.95,
        });
        targets.push(Target {
            name: "engine saturation: first spill after the engines fill".into(),
            measured: e
                .first_spill_after_s
                .map_or("never".into(), |s| format!("{s:.2} s")),
            target: "≤ 1 s".into(),
            met: e.first_spill_after_s.is_some_and(|s| s <= 1.0),
        });
    }
    targets.extend(scale_targets(&scale));
    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    targets.push(Target {
        name: "agent RSS, idle".into(),
        measured: format!("{:.1} MB", mb(agent_idle_rss)),
        target: "< 30 MB".into(),
        met: mb(agent_idle_rss) < 30.0,
    });
    targets.push(Target {
        name: format!("agent RSS, {} concurrent streams", plan.streams),
        measured: format!("{:.1} MB", mb(agent_streams_rss)),
        target: "< 100 MB at 1,000".into(),
        met: mb(agent_streams_rss) < 100.0,
    });

    // What the audit log and the collector received while us-east's agent
    // was measured: the overhead figures include writing them.
    let audit_records: usize = std::fs::read_dir(&audit_dir)
        .map(|d| {
            d.flatten()
                .map(|e| std::fs::read_to_string(e.path()).map_or(0, |t| t.lines().count()))
                .sum()
        })
        .unwrap_or(0);
    let spans = collector.spans().len();
    eprintln!("bench: {audit_records} audit records written, {spans} spans exported by us-east");
    let machine = machine();
    let report = json!({
        "quick": args.quick,
        "machine": machine,
        "duration_s": started.elapsed().as_secs_f64(),
        "local_http": local_rows,
        "relay_http": relay_rows,
        "grpc": grpc_rows,
        "embeddings": embedding_rows,
        "ttft": ttft_rows,
        "open_loop": open_rows,
        "propagation": propagation,
        "scale": scale,
        "failover": failover,
        "spill": spill,
        "quota": quota,
        "engine_saturation": engines,
        "telemetry": {"audit_records": audit_records, "spans_exported": spans},
        "memory": {
            "agent_idle_mb": mb(agent_idle_rss),
            "agent_streams": plan.streams,
            "agent_at_streams_mb": mb(agent_streams_rss),
            "control_plane_agents": plan.sync_clients[1],
            "control_plane_mb": mb(cp_rss),
        },
        "targets": targets,
    });
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("report.md"), markdown(&report))?;
    println!("{}", markdown(&report));

    // The smoke check: every scenario ran and produced numbers.
    let mut missing = Vec::new();
    for (kind, rows) in [
        ("local", &local_rows),
        ("relay", &relay_rows),
        ("grpc", &grpc_rows),
        ("embeddings", &embedding_rows),
        ("ttft", &ttft_rows),
        ("open", &open_rows),
    ] {
        for r in rows.iter() {
            for (name, s) in &r.figures {
                if !s.is_valid() {
                    missing.push(format!("{kind}/{name}/c{}", r.concurrency));
                }
            }
        }
    }
    if propagation.iter().any(|p| !p.p99_ms.is_finite()) {
        missing.push("propagation".into());
    }
    if !scale.is_complete() {
        missing.push("scale".into());
    }
    if !missing.is_empty() {
        bail!("scenarios that produced no numbers: {}", missing.join(", "));
    }
    eprintln!(
        "bench: done in {:.0?}; report in {}",
        started.elapsed(),
        args.out.display()
    );
    Ok(())
}

/// Opens `n` streams through the agent at once and reads its RSS while they
/// are all open.
async fn streams_rss(
    client: &HttpClient,
    east: &AgentProcess,
    long_sim: SocketAddr,
    n: usize,
) -> Result<u64> {
    let body = chat_body("us.long-m", true);
    let target = uri(east.http, "/v1/chat/completions");
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (client, target, body) = (client.clone(), target.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            first_token(&client, &target, &body).await.is_some()
        }));
    }
    // Wait until the simulator has every stream in flight (bounded), then
    // read the agent's RSS at that peak.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut peak = 0;
    loop {
        let in_flight = sim_in_flight(client, long_sim).await.unwrap_or(0);
        peak = peak.max(rss_bytes(east.pid()).unwrap_or(0));
        if in_flight as usize >= n || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peak = peak.max(rss_bytes(east.pid()).unwrap_or(0));
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .is_ok_and(|r| r.unwrap_or(false)),
        );
    }
    if ok < n {
        bail!("only {ok} of {n} concurrent streams completed");
    }
    Ok(peak)
}

async fn sim_in_flight(client: &HttpClient, sim: SocketAddr) -> Option<u64> {
    let req = Request::get(uri(sim, "/metrics"))
        .body(Full::new(Bytes::new()))
        .ok()?;
    let body = client
        .request(req)
        .await
        .ok()?
        .into_body()
        .collect()
        .await
        .ok()?
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .find_map(|l| l.strip_prefix("spillway_sim_in_flight "))
        .and_then(|v| v.trim().parse().ok())
}

/// Admin writes until ACKed by 100 and by 1,000 (quick: 250) lightweight sync clients
/// (real Sync streams, without the rest of an agent), and the control
/// plane's RSS with 1,000 of them connected.
async fn propagation(plan: &Plan) -> Result<(Vec<Propagation>, u64)> {
    let cp = ControlPlane::start(None, "bench-propagation").await;
    let mut admin = cp.admin().await;
    cp.create_region("r1", "g").await;
    let (tx, mut arrivals) = mpsc::unbounded_channel::<ClientReport>();
    let mut channels = Vec::new();
    let mut connected = 0usize;
    let mut results = Vec::new();
    let mut next_profile = 0usize;
    for target in plan.sync_clients {
        // Connect clients up to `target`, 100 streams per HTTP/2 connection.
        while connected < target {
            if connected.is_multiple_of(100) {
                channels.push(Endpoint::from_shared(cp.url())?.connect().await?);
            }
            let channel = channels.last().expect("a channel").clone();
            let client = SyncClient {
                id: connected,
                region: "r1".into(),
                probe: None,
            };
            let tx = tx.clone();
            tokio::spawn(async move { sync_client(channel, &client, Held::default(), &tx).await });
            connected += 1;
        }
        // Everyone has the current catalog before measuring.
        let mut have = vec![usize::MAX; target];
        let settle = Instant::now() + Duration::from_secs(30);
        while have.iter().any(|h| *h != next_profile) && Instant::now() < settle {
            if let Ok(Some(Ok(a))) =
                tokio::time::timeout(Duration::from_millis(100), arrivals.recv()).await
                && a.update
                && a.client < target
            {
                have[a.client] = a.profiles;
            }
        }
        let mut latencies = Vec::new();
        for _ in 0..plan.writes {
            next_profile += 1;
            let profile = pb::InferenceProfile {
                id: format!("global.m{next_profile}"),
                destinations: vec!["r1".into()],
                ..Default::default()
            };
            let t0 = Instant::now();
            admin
                .create_profile(pb::CreateProfileRequest {
                    profile: Some(profile),
                })
                .await?;
            let mut got = 0;
            let deadline = t0 + Duration::from_secs(30);
            while got < target && Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_millis(200), arrivals.recv()).await {
                    Ok(Some(Ok(a)))
                        if a.update
                            && a.client < target
                            && a.profiles == next_profile
                            && have[a.client] != a.profiles =>
                    {
                        have[a.client] = a.profiles;
                        latencies.push(a.at - t0);
                        got += 1;
                    }
                    _ => {}
                }
            }
            if got < target {
                bail!(
                    "only {got} of {target} sync clients received write {next_profile} within 30s"
                );
            }
        }
        results.push(Propagation {
            agents: target,
            writes: plan.writes,
            p50_ms: percentile_ms(&mut latencies, 0.50),
            p99_ms: percentile_ms(&mut latencies, 0.99),
            max_ms: percentile_ms(&mut latencies, 1.0),
        });
    }
    let rss = cp.pid().and_then(rss_bytes).unwrap_or(0);
    Ok((results, rss))
}

/// The largest update a sync client takes, as an agent does (its receive
/// limit), so that a large catalog is measured rather than refused.
const MAX_UPDATE_BYTES: usize = 32 * 1024 * 1024;

/// What a lightweight sync client got in one message from the control plane.
#[derive(Debug)]
struct Arrival {
    client: usize,
    /// A config update; otherwise quota leases.
    update: bool,
    /// The update carried the client's whole set: it replaced the set, or
    /// it was the first on a stream opened holding nothing.
    initial: bool,
    version: u64,
    /// The profiles in the client's set once it applied the update.
    profiles: usize,
    /// The description of the profile the client watches, when its set
    /// holds it once it applied the update.
    probe: Option<String>,
    /// The message's encoded protobuf size (`prost::Message::encoded_len`):
    /// not what crossed the wire, which adds gRPC, HTTP/2 and TCP framing
    /// (and TLS in production).
    bytes: usize,
    at: Instant,
}

/// What a sync client reports: each message, or (client, why) its stream
/// ended.
type ClientReport = Result<Arrival, (usize, String)>;

/// Who a lightweight sync client says it is, and what it watches.
struct SyncClient {
    id: usize,
    region: String,
    /// A profile whose description is reported with each update.
    probe: Option<Arc<str>>,
}

/// What a sync client holds: the name and version of each resource in its
/// set (what its Hello names), the version of the set, the number of
/// profiles, and the description of the profile it watches.
///
/// Not the bodies: a thousand clients in one process, each holding a
/// catalog of 10,000 profiles, would take gigabytes of the benchmark's
/// memory, on the machine whose control plane is being measured.
#[derive(Default)]
struct Held {
    version: u64,
    resources: BTreeMap<String, u64>,
    profiles: usize,
    probe: Option<String>,
}

impl Held {
    /// Applies an update as an agent does: with `replace` the set becomes
    /// exactly its resources; otherwise its removed names go and its
    /// resources are put in by name. `probe` is the name of the watched
    /// profile's resource, whose body is decoded.
    fn apply(&mut self, u: &mut pb::ConfigUpdate, probe: Option<&str>) {
        if u.replace {
            self.resources.clear();
            self.profiles = 0;
            self.probe = None;
        }
        for name in &u.removed {
            if self.resources.remove(name).is_some() && name.starts_with("profile/") {
                self.profiles -= 1;
            }
            if Some(name.as_str()) == probe {
                self.probe = None;
            }
        }
        for r in std::mem::take(&mut u.resources) {
            if Some(r.name.as_str()) == probe {
                self.probe = pb::InferenceProfile::decode(r.body)
                    .ok()
                    .map(|p| p.description);
            }
            let profile = r.name.starts_with("profile/");
            if self.resources.insert(r.name, r.version).is_none() && profile {
                self.profiles += 1;
            }
        }
        self.version = u.version;
    }

    /// The set as a Hello names it.
    fn names(&self) -> Vec<pb::ResourceVersion> {
        self.resources
            .iter()
            .map(|(name, &version)| pb::ResourceVersion {
                name: name.clone(),
                version,
            })
            .collect()
    }
}

/// How one Sync stream ended: why, the set the client held then (as it
/// held it before the stream when the stream brought nothing), and whether
/// it received an update at all.
struct StreamEnd {
    why: String,
    held: Held,
    updated: bool,
}

/// A real Sync stream without the rest of an agent: hello (naming the set
/// `held` and its version, as an agent that reconnects does), then every
/// update applied to the set, reported and ACKed, until the stream ends.
async fn sync_client(
    channel: Channel,
    c: &SyncClient,
    held: Held,
    report: &mpsc::UnboundedSender<ClientReport>,
) -> StreamEnd {
    let hello = pb::Hello {
        agent_id: format!("bench-{}", c.id),
        region: c.region.clone(),
        relay_address: format!("127.0.0.1:{}", 10_000 + c.id),
        current_version: held.version,
        agent_build: "bench".into(),
        apis: Vec::new(),
        resources: held.names(),
    };
    let mut end = StreamEnd {
        why: String::new(),
        held,
        updated: false,
    };
    let probe = c.probe.as_deref().map(|id| format!("profile/{id}"));
    let mut client = ControlServiceClient::new(channel).max_decoding_message_size(MAX_UPDATE_BYTES);
    let (out, rx) = mpsc::channel(4);
    let _ = out
        .send(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Hello(hello)),
        })
        .await;
    let mut inbound = match client.sync(ReceiverStream::new(rx)).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => {
            end.why = format!("opening the stream: {}", status.message());
            return end;
        }
    };
    // The parts of an update so far, and their bytes.
    let (mut partial, mut part_bytes) = (None, 0);
    loop {
        let msg = match inbound.message().await {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                end.why = "the control plane ended the stream".into();
                return end;
            }
            Err(status) => {
                end.why = format!("stream error: {}", status.message());
                return end;
            }
        };
        let at = Instant::now();
        let bytes = msg.encoded_len();
        match msg.message {
            Some(pb::control_message::Message::Update(part)) => {
                // A large update comes in parts: it counts, and is applied
                // and ACKed, once whole, with the bytes of all its parts.
                part_bytes += bytes;
                let Some(mut u) = gather(&mut partial, part) else {
                    continue;
                };
                let bytes = std::mem::take(&mut part_bytes);
                let held = &mut end.held;
                let initial = u.replace || (!end.updated && held.resources.is_empty());
                held.apply(&mut u, probe.as_deref());
                end.updated = true;
                let _ = report.send(Ok(Arrival {
                    client: c.id,
                    update: true,
                    initial,
                    version: u.version,
                    profiles: held.profiles,
                    probe: held.probe.clone(),
                    bytes,
                    at,
                }));
                let ack = pb::Ack {
                    version: u.version,
                    nonce: u.nonce,
                };
                let _ = out
                    .send(pb::AgentMessage {
                        message: Some(pb::agent_message::Message::Ack(ack)),
                    })
                    .await;
            }
            Some(pb::control_message::Message::Leases(_)) => {
                let _ = report.send(Ok(Arrival {
                    client: c.id,
                    update: false,
                    initial: false,
                    version: 0,
                    profiles: 0,
                    probe: None,
                    bytes,
                    at,
                }));
            }
            None => {}
        }
    }
}

/// A sync client that, like an agent, connects on a connection of its own
/// and reconnects when its stream ends (backoff from 100 ms to 5 s, as the
/// agent's), resuming from the set it holds, reporting each end; until its
/// task is aborted.
async fn reconnecting_client(
    endpoint: Endpoint,
    c: SyncClient,
    report: mpsc::UnboundedSender<ClientReport>,
) {
    let mut backoff = spillway_core::backoff::Backoff::default();
    let mut held = Held::default();
    loop {
        let why = match endpoint.connect().await {
            Ok(channel) => {
                let end = sync_client(channel, &c, std::mem::take(&mut held), &report).await;
                held = end.held;
                if end.updated {
                    backoff.reset();
                }
                end.why
            }
            Err(e) => format!("connect: {e}"),
        };
        if report.send(Err((c.id, why))).is_err() {
            return;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// nginx as a reverse proxy in front of the same simulator: the floor for a
/// proxy hop.
struct Nginx {
    addr: SocketAddr,
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    /// SIGTERM to the master, which stops its workers (a SIGKILL would leave
    /// them running).
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline
                && std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Nginx {
    async fn start(bin: &std::path::Path, upstream: SocketAddr) -> Result<Nginx> {
        let dir = tempfile::tempdir()?;
        let port = spillway_tests::free_port();
        let conf = format!(
            "worker_processes auto;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               upstream sim {{ server {upstream}; keepalive 256; }}\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://sim;\n\
                   proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n",
            d = dir.path().display()
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = tokio::process::Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting nginx")?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                bail!(
                    "nginx did not start: {}",
                    std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Nginx {
            addr,
            child,
            _dir: dir,
        })
    }
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": (mem_gib * 10.0).round() / 10.0,
        "os": std::fs::read_to_string("/etc/os-release").ok().and_then(|o| o.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))).unwrap_or_default(),
    })
}

/// A report's title, machine and targets.
fn report_head(r: &Value, title: &str) -> String {
    let mut md = String::new();
    let m = &r["machine"];
    md.push_str(&format!(
        "# {title}{}\n\nMachine: {} ({} cores, {} GiB), {}. Run took {:.0} s.\n\n",
        if r["quick"].as_bool() == Some(true) {
            " (quick)"
        } else {
            ""
        },
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["memory_gib"],
        m["os"].as_str().unwrap_or("?"),
        r["duration_s"].as_f64().unwrap_or(0.0),
    ));
    md.push_str("## Targets\n\n| figure | measured | target | met |\n| --- | --- | --- | --- |\n");
    for t in r["targets"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            t["name"].as_str().unwrap_or(""),
            t["measured"].as_str().unwrap_or(""),
            t["target"].as_str().unwrap_or(""),
            if t["met"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            }
        ));
    }
    md
}

fn markdown(r: &Value) -> String {
    let mut md = report_head(r, "Spillway benchmark");
    for (title, key) in [
        (
            "Unary calls, HTTP: direct to the simulator, through the agent, through nginx",
            "local_http",
        ),
        (
            "Cross-region relay, HTTP: through us-west's agent to us-east, beside the local call",
            "relay_http",
        ),
        (
            "gRPC Converse through the agent, beside HTTP direct to the simulator",
            "grpc",
        ),
        (
            "Embeddings (`POST /v1/embeddings`, two inputs): direct to the simulator, through the agent",
            "embeddings",
        ),
        ("Time to first token, streaming", "ttft"),
        (
            "Open loop at a fixed rate (the concurrency column is calls per second)",
            "open_loop",
        ),
    ] {
        md.push_str(&format!("\n## {title}\n\n| concurrency | path | p50 µs | p99 µs | req/s | errors |\n| --- | --- | --- | --- | --- | --- |\n"));
        for row in r[key].as_array().into_iter().flatten() {
            let c = &row["concurrency"];
            for (name, s) in row.as_object().into_iter().flatten() {
                if name == "concurrency" {
                    continue;
                }
                md.push_str(&format!(
                    "| {c} | {name} | {:.0} | {:.0} | {:.0} | {} |\n",
                    s["p50_us"].as_f64().unwrap_or(f64::NAN),
                    s["p99_us"].as_f64().unwrap_or(f64::NAN),
                    s["throughput_rps"].as_f64().unwrap_or(f64::NAN),
                    s["errors"]
                ));
            }
        }
    }
    md.push_str("\n## Config propagation (admin write until ACKed)\n\n| agents | writes | p50 ms | p99 ms | max ms |\n| --- | --- | --- | --- | --- |\n");
    for p in r["propagation"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} |\n",
            p["agents"],
            p["writes"],
            p["p50_ms"].as_f64().unwrap_or(f64::NAN),
            p["p99_ms"].as_f64().unwrap_or(f64::NAN),
            p["max_ms"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    md.push_str(&scale_section(r));
    let f = &r["failover"];
    md.push_str(&format!(
        "\n## A failing region (us-west's model server down, then up; us-east's calls split evenly)\n\n| drained after | share again after | full share after | calls | failed |\n| --- | --- | --- | --- | --- |\n| {:.2} s | {:.2} s | {:.2} s | {} | {} |\n",
        f["drain_s"].as_f64().unwrap_or(f64::NAN),
        f["recover_start_s"].as_f64().unwrap_or(f64::NAN),
        f["recover_full_s"].as_f64().unwrap_or(f64::NAN),
        f["calls"],
        f["failed"],
    ));
    let s = &r["spill"];
    md.push_str(&format!(
        "\n## The source saturated (24 callers on 8 slots), then relieved\n\n| spill after | full share back after | calls | failed |\n| --- | --- | --- | --- |\n| {:.2} s | {:.2} s | {} | {} |\n",
        s["spill_s"].as_f64().unwrap_or(f64::NAN),
        s["take_back_s"].as_f64().unwrap_or(f64::NAN),
        s["calls"],
        s["failed"],
    ));
    let q = &r["quota"];
    md.push_str(&format!(
        "\n## A shared quota: three agents of one region, {} requests a minute, load {} a minute\n\nAdmitted calls in a {:.0} s window, scaled to a minute; then the busiest agent goes quiet; then the control plane is killed (leases of {} s run out, then safe shares).\n\n| phase | admitted per minute | overshoot | utilization |\n| --- | --- | --- | --- |\n| control plane up | {:.0} | {:.1}% | {:.1}% |\n",
        q["limit_rpm"],
        q["load_per_minute"],
        q["window_s"].as_f64().unwrap_or(f64::NAN),
        q["lease_s"],
        q["admitted_up"].as_f64().unwrap_or(f64::NAN),
        q["overshoot_up"].as_f64().unwrap_or(f64::NAN) * 100.0,
        q["utilization_up"].as_f64().unwrap_or(f64::NAN) * 100.0,
    ));
    if let Some(down) = q["admitted_down"].as_f64() {
        md.push_str(&format!(
            "| control plane killed | {down:.0} | {:.1}% | {:.1}% |\n",
            q["overshoot_down"].as_f64().unwrap_or(f64::NAN) * 100.0,
            down / q["limit_rpm"].as_f64().unwrap_or(f64::NAN) * 100.0,
        ));
    }
    md.push_str(&format!(
        "\nThe busiest agent's share went to the others (90% of the limit admitted over 2 s) after {}.\n",
        q["reclaim_s"]
            .as_f64()
            .map_or("never".to_string(), |s| format!("{s:.2} s"))
    ));
    let t = &r["telemetry"];
    md.push_str(&format!(
        "\nus-east's agent audited every call it took ({} records) and traced 1% of them ({} spans exported) while it was measured.\n",
        t["audit_records"], t["spans_exported"]
    ));
    md.push_str(&engine_table(r));
    let mem = &r["memory"];
    md.push_str(&format!(
        "\n## Memory (RSS)\n\n| process | load | MB |\n| --- | --- | --- |\n| agent | idle | {:.1} |\n| agent | {} concurrent streams | {:.1} |\n| control plane | {} sync streams | {:.1} |\n",
        mem["agent_idle_mb"].as_f64().unwrap_or(f64::NAN),
        mem["agent_streams"],
        mem["agent_at_streams_mb"].as_f64().unwrap_or(f64::NAN),
        mem["control_plane_agents"],
        mem["control_plane_mb"].as_f64().unwrap_or(f64::NAN),
    ));
    md
}

/// Drain and recovery of a failing region, as the weight engine does them.
#[derive(Serialize)]
struct Failover {
    /// From the model server going down to its region's weight reaching 0.
    drain_s: f64,
    /// From it coming back to its region getting a share again, and to the
    /// full share.
    recover_start_s: f64,
    recover_full_s: f64,
    /// Calls made during the scenario, and how many failed.
    calls: u64,
    failed: u64,
}

/// A region's share of `profile` from us-east, as the control plane
/// explains it (`None` before the leader's first update).
async fn share_of(
    admin: &mut pb::admin_service_client::AdminServiceClient<Channel>,
    profile: &str,
    region: &str,
) -> Option<f64> {
    let req = pb::ExplainRouteRequest {
        profile: profile.into(),
        source_region: "us-east".into(),
    };
    let e = admin.explain_route(req).await.ok()?.into_inner();
    if e.leader.is_empty() {
        return None;
    }
    e.destinations
        .iter()
        .find(|d| d.region == region)
        .map(|d| d.weight)
}

/// Waits (bounded) until `region`'s share of `profile` satisfies `ok`.
async fn wait_share(
    admin: &mut pb::admin_service_client::AdminServiceClient<Channel>,
    profile: &str,
    region: &str,
    what: &str,
    ok: impl Fn(f64) -> bool,
) -> Result<Duration> {
    let t = Instant::now();
    let deadline = t + Duration::from_secs(60);
    loop {
        if share_of(admin, profile, region).await.is_some_and(&ok) {
            return Ok(t.elapsed());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The source region saturated, then relieved.
#[derive(Serialize)]
struct Spill {
    /// From the load starting to us-west getting a share of us-east's calls.
    spill_s: f64,
    /// From the load stopping to us-east having its full share back.
    take_back_s: f64,
    calls: u64,
    failed: u64,
}

async fn spill(cp: &ControlPlane, client: &HttpClient, east: &AgentProcess) -> Result<Spill> {
    let mut admin = cp.admin().await;
    let profile = "us.spill-m";
    wait_share(
        &mut admin,
        profile,
        "us-east",
        "us-east's full share",
        |s| s == 1.0,
    )
    .await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..24)
        .map(|_| {
            let (client, stop) = (client.clone(), stop.clone());
            let target = uri(east.http, "/v1/chat/completions");
            let body = chat_body(profile, false);
            tokio::spawn(async move {
                let (mut calls, mut failed) = (0u64, 0u64);
                for _ in 0..10_000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    calls += 1;
                    failed += u64::from(!post(&client, &target, &body).await);
                }
                (calls, failed)
            })
        })
        .collect();
    let spilled = wait_share(
        &mut admin,
        profile,
        "us-west",
        "us-west to get a share",
        |s| s > 0.0,
    )
    .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut calls, mut failed) = (0, 0);
    for c in callers {
        let (n, f) = c.await?;
        calls += n;
        failed += f;
    }
    let back = wait_share(
        &mut admin,
        profile,
        "us-east",
        "us-east's full share back",
        |s| s == 1.0,
    )
    .await?;
    Ok(Spill {
        spill_s: spilled.as_secs_f64(),
        take_back_s: back.as_secs_f64(),
        calls,
        failed,
    })
}

async fn failover(
    cp: &ControlPlane,
    client: &HttpClient,
    east: &AgentProcess,
    flaky: SocketAddr,
) -> Result<Failover> {
    let mut admin = cp.admin().await;
    let even = |s: f64| (s - 0.5).abs() < 1e-6;
    let (profile, west) = ("us.drain-m", "us-west");
    wait_share(&mut admin, profile, west, "the even split", even).await?;
    // Steady traffic through us-east for the whole scenario (bounded).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (client, stop) = (client.clone(), stop.clone());
        let target = uri(east.http, "/v1/chat/completions");
        let body = chat_body("us.drain-m", false);
        tokio::spawn(async move {
            let (mut calls, mut failed) = (0u64, 0u64);
            for _ in 0..200_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                calls += 1;
                failed += u64::from(!post(&client, &target, &body).await);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (calls, failed)
        })
    };
    let admin_call = |path: &'static str| {
        let client = client.clone();
        async move {
            let req = Request::post(uri(flaky, path))
                .body(Full::new(Bytes::new()))
                .expect("a request");
            client.request(req).await.map(|_| ())
        }
    };
    admin_call("/admin/down").await?;
    let drain = wait_share(&mut admin, profile, west, "us-west to be drained", |s| {
        s == 0.0
    })
    .await?;
    admin_call("/admin/up").await?;
    let start = Instant::now();
    wait_share(
        &mut admin,
        profile,
        west,
        "us-west to get a share again",
        |s| s > 0.0,
    )
    .await?;
    let recover_start = start.elapsed();
    wait_share(&mut admin, profile, west, "us-west's full share", even).await?;
    let recover_full = start.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (calls, failed) = load.await?;
    Ok(Failover {
        drain_s: drain.as_secs_f64(),
        recover_start_s: recover_start.as_secs_f64(),
        recover_full_s: recover_full.as_secs_f64(),
        calls,
        failed,
    })
}

#[derive(Serialize)]
struct QuotaFigures {
    limit_rpm: i64,
    load_per_minute: Vec<f64>,
    window_s: f64,
    lease_s: u64,
    admitted_up: f64,
    overshoot_up: f64,
    utilization_up: f64,
    admitted_down: Option<f64>,
    overshoot_down: Option<f64>,
    reclaim_s: Option<f64>,
}

/// The shared-quota scenario of the end-to-end test, measured: overshoot
/// and utilization with the control plane up (and, in the full run, after
/// it is killed), and how fast an idle agent's share is reclaimed.
async fn quota(plan: &Plan) -> QuotaFigures {
    use spillway_tests::quota_load::{self, QuotaScenario};
    let quick = plan.rounds == 1;
    let scenario = QuotaScenario {
        window: Duration::from_secs(if quick { 20 } else { 60 }),
        windows_down: usize::from(!quick),
        reclaim: Duration::from_secs(if quick { 8 } else { 15 }),
        ..QuotaScenario::default()
    };
    let run = quota_load::run(scenario.clone()).await;
    let (overshoot_up, utilization_up) = run.figures(0);
    let down = (!quick).then(|| (run.admitted_per_minute(1), run.figures(1).0));
    QuotaFigures {
        limit_rpm: scenario.limit_rpm,
        load_per_minute: scenario.load_per_minute.to_vec(),
        window_s: scenario.window.as_secs_f64(),
        lease_s: scenario.lease_secs,
        admitted_up: run.admitted_per_minute(0),
        overshoot_up,
        utilization_up,
        admitted_down: down.map(|d| d.0),
        overshoot_down: down.map(|d| d.1),
        reclaim_s: run.reclaim_seconds(),
    }
}

/// One placement's figures in the engine-saturation scenario.
#[derive(Serialize)]
struct EngineFigures {
    placement: String,
    calls: usize,
    failed: usize,
    spilled: usize,
    /// From the callers first outnumbering what the engines hold to the
    /// first call served elsewhere (negative: it spilled before).
    first_spill_after_s: Option<f64>,
    /// The engines' waiting queue, p99 over 10 ms samples, the worse server.
    queue_p99: u32,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    unloaded_ttft_ms: f64,
    /// Calls served over the calls the callers would have made had each
    /// taken the unloaded time.
    served_share: f64,
}

/// The engine-saturation scenario under three placements, one after the
/// other: the engines' own signals, a static capacity set too high (the
/// engines queue), and no spill at all.
async fn engine_saturation(plan: &Plan) -> Vec<EngineFigures> {
    use spillway_tests::engine_load::{self, EngineScenario, Placement};
    let quick = plan.rounds == 1;
    let mut out = Vec::new();
    for placement in [
        Placement::EngineSignals,
        Placement::StaticCapacity(64),
        Placement::NoSpill,
    ] {
        let mut scenario = EngineScenario::new(placement);
        // Calls of about a second, as a chat answer of 64 tokens is.
        scenario.max_tokens = 64;
        scenario.sim.output_tokens = 64;
        scenario.sim.inter_token = Duration::from_millis(14);
        scenario.sim.kv_tokens = 6 * engine_load::footprint(64);
        scenario.ramp = Duration::from_secs(if quick { 6 } else { 12 });
        scenario.hold = Duration::from_secs(if quick { 4 } else { 8 });
        let run = engine_load::run(scenario).await;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let served = run.ok().count();
        out.push(EngineFigures {
            placement: placement.name(),
            calls: run.calls.len(),
            failed: run.failed(),
            spilled: served - run.served_in("us-east"),
            first_spill_after_s: run
                .first_spill()
                .map(|at| at.as_secs_f64() - run.saturated_at.as_secs_f64()),
            queue_p99: (0..run.scenario.sims)
                .map(|i| run.queue_quantile(i, 0.99))
                .max()
                .unwrap_or(0),
            ttft_p50_ms: ms(run.ttft_quantile(None, 0.5)),
            ttft_p99_ms: ms(run.ttft_quantile(None, 0.99)),
            unloaded_ttft_ms: ms(run.unloaded_ttft),
            served_share: served as f64 / run.offered(),
        });
    }
    out
}

/// The engine-saturation section of the report.
fn engine_table(r: &Value) -> String {
    let mut md = String::new();
    md.push_str("\n## Engine saturation\n\nus-east: three agents share two vLLM-mode simulators that hold about 12 calls by KV-cache budget (and queue the rest); us-west has room. Closed-loop streaming callers ramp from 4 to 40, then hold.\n\n| placement | calls | failed | spilled | first spill after the engines fill | engine queue p99 (max of servers) | TTFT p50 / p99 ms (unloaded) | throughput / offered |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for e in r["engine_saturation"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.0} / {:.0} ({:.0}) | {:.1}% |\n",
            e["placement"].as_str().unwrap_or(""),
            e["calls"],
            e["failed"],
            e["spilled"],
            e["first_spill_after_s"]
                .as_f64()
                .map_or("never".to_string(), |s| format!("{s:.2} s")),
            e["queue_p99"],
            e["ttft_p50_ms"].as_f64().unwrap_or(f64::NAN),
            e["ttft_p99_ms"].as_f64().unwrap_or(f64::NAN),
            e["unloaded_ttft_ms"].as_f64().unwrap_or(f64::NAN),
            e["served_share"].as_f64().unwrap_or(f64::NAN) * 100.0,
        ));
    }
    md
}

/// The scale scenario's sizes.
struct ScalePlan {
    store: StoreKind,
    profiles: usize,
    clients: usize,
    /// Admin writers at once while the catalog loads.
    writers: usize,
    /// Serial UpdateProfile calls timed at each checkpoint of the loading.
    samples: usize,
    /// Profile updates timed until every client has them.
    changes: usize,
    /// How long the control plane is watched idle, everything connected.
    idle: Duration,
}

impl ScalePlan {
    fn new(args: &Args) -> ScalePlan {
        let (profiles, clients) = if args.quick { (200, 50) } else { (2_000, 200) };
        ScalePlan {
            store: args.scale_store,
            profiles: args.scale_profiles.map_or(profiles, |n| n as usize),
            clients: args.scale_clients.map_or(clients, |n| n as usize),
            writers: 8,
            samples: if args.quick { 20 } else { 100 },
            changes: if args.quick { 3 } else { 10 },
            idle: Duration::from_secs(if args.quick { 2 } else { 5 }),
        }
    }
}

/// How long one admin call may take before the scenario fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a write is sent at most: again when the control plane aborted
/// it (other writes kept landing first) or its connection was lost.
const WRITE_ATTEMPTS: usize = 10;
/// How long loading the whole catalog may take.
const LOAD_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// How long the sync clients have to connect and settle.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10 * 60);
/// How long one change has to reach every client.
const CHANGE_DEADLINE: Duration = Duration::from_secs(120);
/// The connect phase is over when every client has the latest version
/// and nothing arrived for this long.
const CONNECT_QUIET: Duration = Duration::from_secs(1);
/// What arrives until nothing did for this long counts for a change.
const CHANGE_QUIET: Duration = Duration::from_millis(200);

/// The scale catalog's regions: three in each of two geographies.
const SCALE_REGIONS: [(&str, &str); 6] = [
    ("us-east", "us"),
    ("us-west", "us"),
    ("us-central", "us"),
    ("eu-west", "eu"),
    ("eu-central", "eu"),
    ("eu-north", "eu"),
];

/// Profile `i` of the scale catalog: one in four global (destinations in
/// both geographies), the others geographic, in us and eu by turns; two or
/// three destinations each. Profile 0, global, is the one the changes
/// update: every client has it.
fn scale_profile(i: usize) -> pb::InferenceProfile {
    let us = ["us-east", "us-west", "us-central"];
    let eu = ["eu-west", "eu-central", "eu-north"];
    let n = 2 + (i / 4) % 2;
    let (id, regions): (String, Vec<&str>) = if i.is_multiple_of(4) {
        let all = [us[i % 3], eu[(i / 4) % 3], us[(i + 1) % 3]];
        (format!("global.model-{i:05}"), all[..n].to_vec())
    } else {
        let (geo, rs) = if i % 2 == 1 { ("us", us) } else { ("eu", eu) };
        let regions = (0..n).map(|j| rs[(i + j) % 3]).collect();
        (format!("{geo}.model-{i:05}"), regions)
    };
    pb::InferenceProfile {
        id,
        destinations: regions.into_iter().map(String::from).collect(),
        ..Default::default()
    }
}

/// The scale scenario's control plane: a real process started as in
/// production (log level info, default lease and intervals), not the
/// harness's [`ControlPlane`], whose debug logging writes lines per stream
/// and update that would count in the CPU figures.
struct ScaleControlPlane {
    addr: SocketAddr,
    child: tokio::process::Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
    /// The etcd it keeps its catalog in, unless it uses the embedded store.
    _etcd: Option<Etcd>,
}

impl ScaleControlPlane {
    async fn start(store: StoreKind) -> Result<ScaleControlPlane> {
        let etcd = match store {
            StoreKind::Etcd => Some(Etcd::start().await),
            StoreKind::Memory => None,
        };
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("control-plane.log");
        let mut cmd = tokio::process::Command::new(spillway_tests::bin("spillway-control-plane"));
        cmd.args(["--listen", "127.0.0.1:0", "--insecure-dev"])
            .args(["--replica-id", "bench-scale"])
            .env("SPILLWAY_LOG", "info");
        if let Some(etcd) = &etcd {
            cmd.args(["--etcd-endpoints", &etcd.endpoint]);
        }
        let (child, line) = spawn_and_read_line(cmd, &log).await;
        let addr = line
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no address in the control plane's first line `{line}`"))?;
        Ok(ScaleControlPlane {
            addr,
            child,
            log,
            _dir: dir,
            _etcd: etcd,
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn pid(&self) -> Result<u32> {
        self.child.id().context("the control plane exited")
    }
}

/// The last lines of a log, for an error message.
fn log_tail(path: &std::path::Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// CPU time (user and system) a process used so far, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count from its ')'.
    // utime and stime are fields 14 and 15, the 12th and 13th after it.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (field(11), field(12)) {
        (Some(user), Some(system)) => Ok(user + system),
        _ => bail!("no utime and stime in /proc/{pid}/stat: `{stat}`"),
    }
}

/// The machine's 1-minute load average (NaN where /proc says nothing).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Clock ticks per second (`getconf CLK_TCK`), and whether it was assumed:
/// 100, Linux's usual value, when getconf cannot say.
fn clock_ticks() -> (f64, bool) {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|t| *t > 0.0)
        .map_or((100.0, true), |t| (t, false))
}

type Admin = pb::admin_service_client::AdminServiceClient<Channel>;

/// Creates profile `i` (or, given its revision, updates it) with
/// `description`: its new revision, the call's time from the first attempt
/// (retries included), and how many attempts were retried: aborted (another
/// write landed first) or lost with their connection (then the profile is
/// read back to see whether the write landed, as an operator would).
async fn write_profile(
    admin: &mut Admin,
    i: usize,
    description: &str,
    revision: Option<i64>,
) -> Result<(i64, Duration, usize)> {
    let mut profile = pb::InferenceProfile {
        description: description.into(),
        revision: revision.unwrap_or(0),
        ..scale_profile(i)
    };
    let t = Instant::now();
    let mut last = String::new();
    for retries in 0..WRITE_ATTEMPTS {
        let call = async {
            match revision {
                None => {
                    let req = pb::CreateProfileRequest {
                        profile: Some(profile.clone()),
                    };
                    admin.create_profile(req).await
                }
                Some(_) => {
                    let req = pb::UpdateProfileRequest {
                        profile: Some(profile.clone()),
                    };
                    admin.update_profile(req).await
                }
            }
        };
        let status = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(written)) => return Ok((written.into_inner().revision, t.elapsed(), retries)),
            Ok(Err(status)) => status,
            Err(_) => bail!("writing profile {} took over {CALL_TIMEOUT:?}", profile.id),
        };
        last = status.to_string();
        match status.code() {
            tonic::Code::Aborted => {}
            // The write may or may not have landed.
            tonic::Code::Unknown | tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let req = pb::GetProfileRequest {
                    id: profile.id.clone(),
                };
                match tokio::time::timeout(CALL_TIMEOUT, admin.get_profile(req)).await {
                    Ok(Ok(stored)) => {
                        let stored = stored.into_inner();
                        if stored.description == description {
                            return Ok((stored.revision, t.elapsed(), retries + 1));
                        }
                        profile.revision = stored.revision;
                    }
                    Ok(Err(status)) if status.code() == tonic::Code::NotFound => {}
                    Ok(Err(status)) => last = format!("{last}; reading it back: {status}"),
                    Err(_) => last = format!("{last}; reading it back took over {CALL_TIMEOUT:?}"),
                }
            }
            _ => bail!("writing profile {}: {status}", profile.id),
        }
    }
    bail!(
        "writing profile {} failed {WRITE_ATTEMPTS} times; the last time: {last}",
        profile.id
    )
}

/// Creates profiles `range` from `writers` concurrent writers, each taking
/// the next index when its last write is done, by `deadline`: the calls'
/// times and the retried attempts; each profile's revision goes into
/// `revisions`.
async fn load_profiles(
    admin: &Admin,
    range: std::ops::Range<usize>,
    writers: usize,
    revisions: &mut [i64],
    deadline: Instant,
) -> Result<(Vec<Duration>, usize)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = Arc::new(AtomicUsize::new(range.start));
    // Dropped on an error or at the deadline, the set aborts the writers.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..writers {
        let (mut admin, next, end) = (admin.clone(), next.clone(), range.end);
        set.spawn(async move {
            let mut done = Vec::new();
            let mut retries = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return Ok::<_, anyhow::Error>((done, retries));
                }
                let (revision, took, r) = write_profile(&mut admin, i, "", None).await?;
                done.push((i, revision, took));
                retries += r;
            }
        });
    }
    let mut latencies = Vec::with_capacity(range.len());
    let mut retries = 0;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        let joined = match tokio::time::timeout(wait, set.join_next()).await {
            Ok(Some(joined)) => joined,
            Ok(None) => break,
            Err(_) => bail!(
                "loading the catalog took over {LOAD_DEADLINE:?} ({} of profiles {}..{} loaded)",
                latencies.len(),
                range.start,
                range.end
            ),
        };
        let (done, r) = joined.context("a catalog writer")??;
        for (i, revision, took) in done {
            revisions[i] = revision;
            latencies.push(took);
        }
        retries += r;
    }
    Ok((latencies, retries))
}

/// Waits (bounded) until the replica explains the route of profile `i`
/// (from its first destination, where it is callable): its view holds the
/// profile. (The leader computes weights only for tables with load, and the
/// scenario's clients report none, so there is no leader pass to wait for.)
async fn leader_caught_up(admin: &mut Admin, i: usize) -> Result<()> {
    let profile = scale_profile(i);
    let req = pb::ExplainRouteRequest {
        profile: profile.id.clone(),
        source_region: profile.destinations[0].clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let explained = tokio::time::timeout(CALL_TIMEOUT, admin.explain_route(req.clone())).await;
        if let Ok(Ok(_)) = explained {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the replica did not explain the route of {} within 60 s",
                profile.id
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one sync client received, as the scale scenario counts it.
#[derive(Clone, Default)]
struct ClientTally {
    updates: usize,
    /// Updates that carried the client's whole set.
    initial_sets: usize,
    bytes: u64,
    first_update_bytes: usize,
    version: u64,
}

/// What the sync clients received: per client, and in all since the last
/// [`Tally::reset_window`].
struct Tally {
    rx: mpsc::UnboundedReceiver<ClientReport>,
    clients: Vec<ClientTally>,
    /// The highest config version any client has.
    latest: u64,
    /// When the last message arrived.
    last_at: Instant,
    window_updates: usize,
    /// Updates since the last reset that carried a client's whole set.
    window_initial_sets: usize,
    window_bytes: u64,
    /// Streams that ended (and were opened again) since the last reset,
    /// and why, in all.
    window_ends: usize,
    ends: BTreeMap<String, usize>,
    /// The control plane's log, quoted when the scenario fails.
    cp_log: PathBuf,
}

impl Tally {
    /// The next message, counted; `None` when none came by `until`, or
    /// when what came was the end of a stream (counted too: the client
    /// reconnects).
    async fn next(&mut self, until: Instant) -> Result<Option<Arrival>> {
        let wait = until.saturating_duration_since(Instant::now());
        let report = match tokio::time::timeout(wait, self.rx.recv()).await {
            Err(_) => return Ok(None),
            Ok(None) => bail!("every sync client is gone"),
            Ok(Some(report)) => report,
        };
        let a = match report {
            Ok(a) => a,
            Err((_, why)) => {
                self.window_ends += 1;
                *self.ends.entry(why).or_default() += 1;
                return Ok(None);
            }
        };
        let c = &mut self.clients[a.client];
        c.bytes += a.bytes as u64;
        self.window_bytes += a.bytes as u64;
        if a.update {
            c.updates += 1;
            if c.updates == 1 {
                c.first_update_bytes = a.bytes;
            }
            if a.initial {
                c.initial_sets += 1;
                self.window_initial_sets += 1;
            }
            c.version = a.version;
            self.latest = self.latest.max(a.version);
            self.window_updates += 1;
        }
        self.last_at = a.at;
        Ok(Some(a))
    }

    fn reset_window(&mut self) {
        self.window_updates = 0;
        self.window_initial_sets = 0;
        self.window_bytes = 0;
        self.window_ends = 0;
    }

    /// For a failure's message: the streams that ended, and the control
    /// plane's last log lines.
    fn diagnosis(&self) -> String {
        format!(
            "streams ended and reopened: {:?}; the control plane's last log lines:\n{}",
            self.ends,
            log_tail(&self.cp_log)
        )
    }
}

/// Aborts the sync clients' tasks when the scenario ends, however it ends.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The control plane at catalog scale.
#[derive(Serialize)]
struct Scale {
    store: StoreKind,
    regions: usize,
    profiles: usize,
    clients: usize,
    /// Admin writers at once while loading.
    writers: usize,
    /// Loading the whole catalog through the admin API: the CreateProfile
    /// calls' wall time (the timed serial writes and the waits for the
    /// leader excluded), and the rate.
    load_s: f64,
    load_rate_per_s: f64,
    /// Write attempts sent again: aborted by the control plane (another
    /// write landed first) or lost with their connection.
    load_retries: usize,
    writes: Vec<WriteSample>,
    connect: ConnectFigures,
    changes: ChangeFigures,
    /// The control plane's CPU over an idle window, everything connected,
    /// as a share of one core; and the updates sent meanwhile.
    idle_window_s: f64,
    idle_cpu_share: f64,
    idle_updates: usize,
    streams_ended: StreamsEnded,
    /// The control plane's RSS after the changes.
    cp_rss_mb: f64,
    clock_ticks_per_s: f64,
    /// No `getconf CLK_TCK`: 100 ticks a second assumed.
    clock_ticks_assumed: bool,
    /// The machine's 1-minute load average when the scenario began and
    /// when it ended: on a shared machine, what else was running.
    load_average: [f64; 2],
}

impl Scale {
    fn is_complete(&self) -> bool {
        self.changes.p99_ms.is_finite()
            && self.connect.all_configured_s.is_finite()
            && !self.writes.is_empty()
            && self.writes.iter().all(|w| w.update_p99_ms.is_finite())
    }
}

/// Sync streams that ended in each phase (the clients reconnected, as
/// agents do), and why, as the clients saw it.
#[derive(Serialize)]
struct StreamsEnded {
    connect: usize,
    idle: usize,
    changes: usize,
    why: BTreeMap<String, usize>,
}

/// Admin writes with the catalog at one size.
#[derive(Serialize)]
struct WriteSample {
    profiles: usize,
    /// Serial UpdateProfile calls (one at a time) on profiles spread over
    /// the catalog.
    samples: usize,
    update_p50_ms: f64,
    update_p99_ms: f64,
    update_max_ms: f64,
    /// The CreateProfile calls that grew the catalog to this size from the
    /// previous one, `writers` at once, and their rate.
    created: usize,
    create_p50_ms: f64,
    create_p99_ms: f64,
    create_rate_per_s: f64,
}

/// Every sync client connecting at once.
#[derive(Serialize)]
struct ConnectFigures {
    /// From the first connect to every client having a config.
    all_configured_s: f64,
    /// To the last message before every client had the latest version and
    /// nothing arrived for a second.
    settled_s: f64,
    /// Initial sets per client until then (updates that carried the
    /// client's whole set: ideally one), and updates of any kind per
    /// client.
    initial_sets_min: usize,
    initial_sets_mean: f64,
    initial_sets_max: usize,
    updates_mean: f64,
    /// Encoded protobuf bytes received until then, in all and per client.
    bytes_total: u64,
    bytes_per_client: f64,
    /// A client's first update (its initial set), on average.
    first_config_bytes: f64,
}

/// One profile updated, time after time, until every client has it.
#[derive(Serialize)]
struct ChangeFigures {
    changes: usize,
    /// From the start of the UpdateProfile call to a client's receipt of
    /// the update that brings it (the ACK goes out right after), over every
    /// (client, change).
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Encoded bytes and updates a client received per change: everything
    /// from the write until nothing arrived for 200 ms.
    bytes_per_client: f64,
    updates_per_client: f64,
    /// Updates over all the changes, all clients, that carried a client's
    /// whole set (a stream reopened and not resumed, or a replace): ideally
    /// none.
    initial_sets: usize,
    /// The UpdateProfile calls themselves, every client connected, and
    /// how many attempts were retried.
    write_p50_ms: f64,
    write_p99_ms: f64,
    write_retries: usize,
    /// The control plane's CPU over the changes, per change; and the same
    /// less its idle rate over that window.
    cpu_s_per_change: f64,
    cpu_s_per_change_net: f64,
    window_s: f64,
}

/// Loads a catalog of profiles through the admin API (timing admin writes
/// at 10%, 50% and 100% of it), connects the sync clients all at once,
/// watches the control plane idle, then updates one profile time after
/// time until every client has it.
async fn scale_scenario(plan: &ScalePlan) -> Result<Scale> {
    eprintln!(
        "bench: the control plane at scale: {} profiles, {} sync clients, {:?} store",
        plan.profiles, plan.clients, plan.store
    );
    let (ticks_per_s, ticks_assumed) = clock_ticks();
    let load_before = load_average();
    let cp = ScaleControlPlane::start(plan.store).await?;
    let mut admin = Admin::connect(cp.url()).await?;
    for (name, geography) in SCALE_REGIONS {
        let region = pb::Region {
            name: name.into(),
            geography: geography.into(),
            ..Default::default()
        };
        admin
            .create_region(pb::CreateRegionRequest {
                region: Some(region),
            })
            .await?;
    }

    // The catalog, loaded in segments up to each checkpoint, where serial
    // writes are timed once the leader has caught up.
    let mut revisions = vec![0i64; plan.profiles];
    let mut checkpoints = vec![plan.profiles / 10, plan.profiles / 2, plan.profiles];
    checkpoints.retain(|&n| n > 0);
    checkpoints.dedup();
    let load_deadline = Instant::now() + LOAD_DEADLINE;
    let (mut load_time, mut load_retries, mut loaded) = (Duration::ZERO, 0, 0);
    let mut writes = Vec::new();
    for size in checkpoints {
        let t = Instant::now();
        let (mut creates, retries) = load_profiles(
            &admin,
            loaded..size,
            plan.writers,
            &mut revisions,
            load_deadline,
        )
        .await?;
        let took = t.elapsed();
        load_time += took;
        load_retries += retries;
        let created = size - loaded;
        loaded = size;
        let last = (0..size).max_by_key(|&i| revisions[i]).unwrap_or(0);
        leader_caught_up(&mut admin, last).await?;
        let mut updates = Vec::with_capacity(plan.samples);
        for k in 0..plan.samples {
            // Spread over the catalog so far (7919 is prime).
            let i = (k * 7919) % size;
            let (revision, took, _) =
                write_profile(&mut admin, i, &format!("sample-{k}"), Some(revisions[i])).await?;
            revisions[i] = revision;
            updates.push(took);
        }
        let sample = WriteSample {
            profiles: size,
            samples: plan.samples,
            update_p50_ms: percentile_ms(&mut updates, 0.50),
            update_p99_ms: percentile_ms(&mut updates, 0.99),
            update_max_ms: percentile_ms(&mut updates, 1.0),
            created,
            create_p50_ms: percentile_ms(&mut creates, 0.50),
            create_p99_ms: percentile_ms(&mut creates, 0.99),
            create_rate_per_s: created as f64 / took.as_secs_f64().max(1e-9),
        };
        eprintln!(
            "bench: scale: {size} profiles loaded ({:.1} s of loading so far, {:.0}/s in the last segment); serial UpdateProfile p50 {:.1} ms, p99 {:.1} ms",
            load_time.as_secs_f64(),
            sample.create_rate_per_s,
            sample.update_p50_ms,
            sample.update_p99_ms
        );
        writes.push(sample);
    }

    // Every client connects at once, each on a connection of its own as
    // agents do, in the regions by turns; all watch profile 0.
    let n = plan.clients;
    let probe: Arc<str> = scale_profile(0).id.into();
    let (tx, rx) = mpsc::unbounded_channel::<ClientReport>();
    let endpoint = Endpoint::from_shared(cp.url())?.tcp_nodelay(true);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for id in 0..n {
        let (endpoint, tx, probe) = (endpoint.clone(), tx.clone(), probe.clone());
        let region = SCALE_REGIONS[id % SCALE_REGIONS.len()].0.to_string();
        let client = SyncClient {
            id,
            region,
            probe: Some(probe),
        };
        tasks.push(tokio::spawn(reconnecting_client(endpoint, client, tx)));
    }
    let _clients = AbortOnDrop(tasks);
    drop(tx);
    let mut tally = Tally {
        rx,
        clients: vec![ClientTally::default(); n],
        latest: 0,
        last_at: started,
        window_updates: 0,
        window_initial_sets: 0,
        window_bytes: 0,
        window_ends: 0,
        ends: BTreeMap::new(),
        cp_log: cp.log.clone(),
    };
    let deadline = started + CONNECT_DEADLINE;
    let mut all_configured = None;
    loop {
        let configured = tally.clients.iter().filter(|c| c.updates > 0).count();
        if all_configured.is_none() && configured == n {
            all_configured = Some(tally.last_at - started);
        }
        let at_latest = tally
            .clients
            .iter()
            .filter(|c| c.version == tally.latest)
            .count();
        if all_configured.is_some() && at_latest == n && tally.last_at.elapsed() >= CONNECT_QUIET {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{CONNECT_DEADLINE:?} after {n} sync clients began to connect, {configured} had a config and {at_latest} the latest (version {}); {}",
                tally.latest,
                tally.diagnosis()
            );
        }
        tally
            .next(Instant::now() + Duration::from_millis(50))
            .await?;
    }
    let connect_ends = tally.window_ends;
    let initial: Vec<usize> = tally.clients.iter().map(|c| c.initial_sets).collect();
    let updates: usize = tally.clients.iter().map(|c| c.updates).sum();
    let bytes_total: u64 = tally.clients.iter().map(|c| c.bytes).sum();
    let connect = ConnectFigures {
        all_configured_s: all_configured.unwrap_or_default().as_secs_f64(),
        settled_s: (tally.last_at - started).as_secs_f64(),
        initial_sets_min: initial.iter().copied().min().unwrap_or(0),
        initial_sets_mean: initial.iter().sum::<usize>() as f64 / n as f64,
        initial_sets_max: initial.iter().copied().max().unwrap_or(0),
        updates_mean: updates as f64 / n as f64,
        bytes_total,
        bytes_per_client: bytes_total as f64 / n as f64,
        first_config_bytes: tally
            .clients
            .iter()
            .map(|c| c.first_update_bytes as f64)
            .sum::<f64>()
            / n as f64,
    };
    eprintln!(
        "bench: scale: {n} clients configured after {:.2} s, settled after {:.2} s, {:.1} initial sets and {:.1} updates each on average",
        connect.all_configured_s,
        connect.settled_s,
        connect.initial_sets_mean,
        connect.updates_mean
    );

    // Idle, everything connected.
    let pid = cp.pid()?;
    tally.reset_window();
    let (idle_from, t) = (cpu_ticks(pid)?, Instant::now());
    while t.elapsed() < plan.idle {
        tally.next(t + plan.idle).await?;
    }
    let idle_window = t.elapsed().as_secs_f64();
    let idle_cpu_share = (cpu_ticks(pid)? - idle_from) as f64 / ticks_per_s / idle_window;
    let (idle_updates, idle_ends) = (tally.window_updates, tally.window_ends);

    // One profile updated, time after time, until every client has it.
    let (cpu_from, changes_started) = (cpu_ticks(pid)?, Instant::now());
    let mut latencies = Vec::with_capacity(n * plan.changes);
    let mut write_times = Vec::with_capacity(plan.changes);
    let mut write_retries = 0;
    let (mut change_bytes, mut change_updates, mut change_ends) = (0u64, 0usize, 0usize);
    let mut change_initial_sets = 0;
    for k in 1..=plan.changes {
        let marker = format!("change-{k}");
        tally.reset_window();
        let t0 = Instant::now();
        let (revision, took, retried) = write_profile(&mut admin, 0, &marker, Some(revisions[0]))
            .await
            .with_context(|| tally.diagnosis())?;
        write_retries += retried;
        revisions[0] = revision;
        write_times.push(took);
        let mut reached = vec![false; n];
        let mut got = 0;
        let deadline = t0 + CHANGE_DEADLINE;
        while got < n {
            if Instant::now() > deadline {
                bail!(
                    "{got} of {n} sync clients had change {k} of {probe} {CHANGE_DEADLINE:?} after the write; {}",
                    tally.diagnosis()
                );
            }
            if let Some(a) = tally
                .next(Instant::now() + Duration::from_millis(50))
                .await?
                && a.probe.as_deref() == Some(marker.as_str())
                && !reached[a.client]
            {
                reached[a.client] = true;
                got += 1;
                latencies.push(a.at - t0);
            }
        }
        // What arrives until things are quiet counts for this change too.
        let bound = Instant::now() + Duration::from_secs(5);
        while tally.last_at.elapsed() < CHANGE_QUIET && Instant::now() < bound {
            tally
                .next((tally.last_at + CHANGE_QUIET).min(bound))
                .await?;
        }
        eprintln!(
            "bench: scale: change {k}: written in {:.0} ms, every client had it after {:.0} ms; {} updates ({} initial sets), {:.0} KB, {} streams ended, until quiet {:.1} s after the write",
            took.as_secs_f64() * 1000.0,
            latencies
                .iter()
                .rev()
                .take(n)
                .max()
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            tally.window_updates,
            tally.window_initial_sets,
            tally.window_bytes as f64 / 1024.0,
            tally.window_ends,
            t0.elapsed().as_secs_f64()
        );
        change_bytes += tally.window_bytes;
        change_updates += tally.window_updates;
        change_initial_sets += tally.window_initial_sets;
        change_ends += tally.window_ends;
    }
    let window_s = changes_started.elapsed().as_secs_f64();
    let cpu_s = (cpu_ticks(pid)? - cpu_from) as f64 / ticks_per_s;
    let cp_rss = rss_bytes(pid).context("reading the control plane's RSS")?;
    let per_change = |x: f64| x / (n * plan.changes) as f64;
    let changes = ChangeFigures {
        changes: plan.changes,
        p50_ms: percentile_ms(&mut latencies, 0.50),
        p99_ms: percentile_ms(&mut latencies, 0.99),
        max_ms: percentile_ms(&mut latencies, 1.0),
        bytes_per_client: per_change(change_bytes as f64),
        updates_per_client: per_change(change_updates as f64),
        initial_sets: change_initial_sets,
        write_p50_ms: percentile_ms(&mut write_times, 0.50),
        write_p99_ms: percentile_ms(&mut write_times, 0.99),
        write_retries,
        cpu_s_per_change: cpu_s / plan.changes as f64,
        cpu_s_per_change_net: (cpu_s - idle_cpu_share * window_s) / plan.changes as f64,
        window_s,
    };
    eprintln!(
        "bench: scale: a change reached every client in {:.0} ms p99; {:.0} bytes and {:.2} s of control-plane CPU per change",
        changes.p99_ms, changes.bytes_per_client, changes.cpu_s_per_change
    );
    Ok(Scale {
        store: plan.store,
        regions: SCALE_REGIONS.len(),
        profiles: plan.profiles,
        clients: n,
        writers: plan.writers,
        load_s: load_time.as_secs_f64(),
        load_rate_per_s: plan.profiles as f64 / load_time.as_secs_f64().max(1e-9),
        load_retries,
        writes,
        connect,
        changes,
        idle_window_s: idle_window,
        idle_cpu_share,
        idle_updates,
        streams_ended: StreamsEnded {
            connect: connect_ends,
            idle: idle_ends,
            changes: change_ends,
            why: std::mem::take(&mut tally.ends),
        },
        cp_rss_mb: cp_rss as f64 / (1024.0 * 1024.0),
        clock_ticks_per_s: ticks_per_s,
        clock_ticks_assumed: ticks_assumed,
        load_average: [load_before, load_average()],
    })
}

/// The issue's targets for the control plane at scale, each stated at the
/// size that was run.
fn scale_targets(s: &Scale) -> Vec<Target> {
    let at = format!("{} profiles, {} clients", s.profiles, s.clients);
    let kb = s.changes.bytes_per_client / 1024.0;
    let mut targets = vec![
        Target {
            name: format!("one profile update received by every sync client, p99 ({at})"),
            measured: format!("{:.0} ms", s.changes.p99_ms),
            target: "< 1 s".into(),
            met: s.changes.p99_ms < 1000.0,
        },
        Target {
            name: format!("received per client per change, encoded protobuf ({at})"),
            measured: format!("{kb:.1} KB"),
            target: "< 4 KB".into(),
            met: kb < 4.0,
        },
        Target {
            name: format!("control-plane RSS ({at})"),
            measured: format!("{:.0} MB", s.cp_rss_mb),
            target: "< 400 MB".into(),
            met: s.cp_rss_mb < 400.0,
        },
        Target {
            name: format!("leader idle CPU ({at})"),
            measured: format!("{:.1}% of a core", s.idle_cpu_share * 100.0),
            target: "< 5% of a core".into(),
            met: s.idle_cpu_share < 0.05,
        },
    ];
    if let Some(w) = s.writes.last() {
        targets.push(Target {
            name: format!(
                "admin write p99 (serial UpdateProfile, {} profiles)",
                w.profiles
            ),
            measured: format!("{:.1} ms", w.update_p99_ms),
            target: "< 20 ms".into(),
            met: w.update_p99_ms < 20.0,
        });
    }
    // The issue's target is 10,000 profiles in under a minute. At another
    // size only its rate can be checked, which says nothing of 10,000 when
    // a write's cost grows with the catalog.
    let (target, met) = if s.profiles == 10_000 {
        ("< 60 s".to_string(), s.load_s < 60.0)
    } else {
        (
            format!("≥ 167/s (10,000 in 60 s; run at {})", s.profiles),
            s.load_rate_per_s >= 10_000.0 / 60.0,
        )
    };
    targets.push(Target {
        name: format!(
            "loading {} profiles through the admin API ({} writers)",
            s.profiles, s.writers
        ),
        measured: format!("{:.1} s ({:.0}/s)", s.load_s, s.load_rate_per_s),
        target,
        met,
    });
    targets
}

/// `--scale-only`'s report: the machine, the targets, the section.
fn scale_markdown(r: &Value) -> String {
    let mut md = report_head(r, "Spillway benchmark: the control plane at scale");
    md.push_str(&scale_section(r));
    md
}

/// The control plane at scale, as a report section (empty when it did not
/// run).
fn scale_section(r: &Value) -> String {
    let s = &r["scale"];
    if s.is_null() {
        return String::new();
    }
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let kb = |v: &Value| f(v) / 1024.0;
    let mut md = format!(
        "\n## The control plane at scale: {} profiles in {} regions, {} sync clients, {} store\n\nThe machine's 1-minute load average was {:.1} when the scenario began and {:.1} when it ended.\n",
        s["profiles"],
        s["regions"],
        s["clients"],
        s["store"].as_str().unwrap_or("?"),
        f(&s["load_average"][0]),
        f(&s["load_average"][1]),
    );
    md.push_str(
        "\nSizes are the encoded protobuf size of the messages a client received (`prost::Message::encoded_len`), not wire bytes: gRPC, HTTP/2, TCP and, in production, TLS framing add to them. The sync clients (real Sync streams that ACK every update, without the rest of an agent) run in the benchmark process, on the same cores as the control plane. Agent RSS is not measured here: it needs real agent processes.\n",
    );
    md.push_str(&format!(
        "\n### Loading the catalog through the admin API\n\n| profiles | CreateProfile calls at once | wall time | profiles/s | attempts retried (aborted by another write, or connection lost) |\n| --- | --- | --- | --- | --- |\n| {} | {} | {:.1} s | {:.0} | {} |\n",
        s["profiles"],
        s["writers"],
        f(&s["load_s"]),
        f(&s["load_rate_per_s"]),
        s["load_retries"],
    ));
    md.push_str("\n### Admin writes by catalog size\n\nSerial: UpdateProfile calls one at a time on profiles spread over the catalog, once the leader's weights caught up. Loading: the CreateProfile calls that grew the catalog to that size from the row before, several at once.\n\n| profiles | serial UpdateProfile p50 / p99 / max ms (calls) | loading CreateProfile p50 / p99 ms (calls) | loading profiles/s |\n| --- | --- | --- | --- |\n");
    for w in s["writes"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {:.1} / {:.1} / {:.1} ({}) | {:.1} / {:.1} ({}) | {:.0} |\n",
            w["profiles"],
            f(&w["update_p50_ms"]),
            f(&w["update_p99_ms"]),
            f(&w["update_max_ms"]),
            w["samples"],
            f(&w["create_p50_ms"]),
            f(&w["create_p99_ms"]),
            w["created"],
            f(&w["create_rate_per_s"]),
        ));
    }
    let c = &s["connect"];
    md.push_str(&format!(
        "\n### {} sync clients connecting at once, one connection each\n\nFrom the first connect; settled: every client has the latest version and nothing arrived for 1 s. An initial set is an update that carried the client's whole set (it replaced the set, or it was the first on a stream opened holding nothing); ideally each client gets one, and after it only what changes.\n\n| every client has a config | settled | initial sets per client (min / mean / max) | updates per client (mean) | received in all | per client | first update (mean) |\n| --- | --- | --- | --- | --- | --- | --- |\n| {:.2} s | {:.2} s | {} / {:.1} / {} | {:.1} | {:.1} MB | {:.1} KB | {:.1} KB |\n",
        s["clients"],
        f(&c["all_configured_s"]),
        f(&c["settled_s"]),
        c["initial_sets_min"],
        f(&c["initial_sets_mean"]),
        c["initial_sets_max"],
        f(&c["updates_mean"]),
        f(&c["bytes_total"]) / (1024.0 * 1024.0),
        kb(&c["bytes_per_client"]),
        kb(&c["first_config_bytes"]),
    ));
    let ch = &s["changes"];
    md.push_str(&format!(
        "\n### One profile updated {} times, each until every client has it\n\nFrom the start of the UpdateProfile call to each client's receipt (it ACKs right after), over every (client, change). Received: everything a client got from the write until nothing arrived for 200 ms. Initial sets: updates over all the changes that carried a client's whole set (ideally none). CPU: the control plane's user and system time over the {:.1} s of the changes, per change; net: less its idle rate over that time.\n\n| p50 ms | p99 ms | max ms | received per client per change | updates per client per change | initial sets | UpdateProfile p50 / p99 ms (attempts retried) | control-plane CPU per change (net) |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n| {:.1} | {:.1} | {:.1} | {:.1} KB | {:.2} | {} | {:.1} / {:.1} ({}) | {:.3} s ({:.3} s) |\n",
        ch["changes"],
        f(&ch["window_s"]),
        f(&ch["p50_ms"]),
        f(&ch["p99_ms"]),
        f(&ch["max_ms"]),
        kb(&ch["bytes_per_client"]),
        f(&ch["updates_per_client"]),
        ch["initial_sets"],
        f(&ch["write_p50_ms"]),
        f(&ch["write_p99_ms"]),
        ch["write_retries"],
        f(&ch["cpu_s_per_change"]),
        f(&ch["cpu_s_per_change_net"]),
    ));
    md.push_str(&format!(
        "\n### The control plane's resources\n\n| RSS after the changes | idle CPU, everything connected ({:.0} s) | updates sent while idle |\n| --- | --- | --- |\n| {:.1} MB | {:.1}% of a core | {} |\n",
        f(&s["idle_window_s"]),
        f(&s["cp_rss_mb"]),
        f(&s["idle_cpu_share"]) * 100.0,
        s["idle_updates"],
    ));
    let ended = &s["streams_ended"];
    md.push_str(&format!(
        "\nSync streams that ended (each client then reconnected, as an agent does, with backoff from 100 ms to 5 s, naming the set it held): {} while connecting, {} while idle, {} during the changes.",
        ended["connect"], ended["idle"], ended["changes"],
    ));
    if let Some(why) = ended["why"].as_object().filter(|w| !w.is_empty()) {
        let why: Vec<String> = why.iter().map(|(k, v)| format!("{v} × {k}")).collect();
        md.push_str(&format!(" As the clients saw it: {}.", why.join("; ")));
    }
    md.push('\n');
    if s["clock_ticks_assumed"].as_bool() == Some(true) {
        md.push_str(
            "\nCPU times assume 100 clock ticks a second (`getconf CLK_TCK` could not be asked).\n",
        );
    }
    md
}
