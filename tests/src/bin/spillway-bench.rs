//! spillway-bench: measures the agent and the control plane on loopback,
//! each figure beside its floor in the same run, and writes
//! `report.md` and `report.json`. `cargo xtask bench` builds it in release
//! mode and runs it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::{Value, json};
use spillway_proto::pb::{
    self, control_service_client::ControlServiceClient,
    inference_service_client::InferenceServiceClient,
};
use spillway_tests::bench::{
    Sample, Stats, closed_loop, closed_loop_sample, open_loop, percentile_ms, timed,
};
use spillway_tests::{AgentProcess, ControlPlane, SimProcess, rss_bytes};
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
        }
    } else {
        Plan {
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(6),
            rounds: 3,
            writes: 10,
            streams: 1000,
            sync_clients: [100, 1000],
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
    let (tx, mut arrivals) = mpsc::unbounded_channel::<(usize, usize, Instant)>();
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
            tokio::spawn(sync_client(channel, connected, tx.clone()));
            connected += 1;
        }
        // Everyone has the current catalog before measuring.
        let mut have = vec![usize::MAX; target];
        let settle = Instant::now() + Duration::from_secs(30);
        while have.iter().any(|h| *h != next_profile) && Instant::now() < settle {
            if let Ok(Some((id, count, _))) =
                tokio::time::timeout(Duration::from_millis(100), arrivals.recv()).await
                && id < target
            {
                have[id] = count;
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
                    Ok(Some((id, count, at)))
                        if id < target && count == next_profile && have[id] != count =>
                    {
                        have[id] = count;
                        latencies.push(at - t0);
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

/// A Sync stream that ACKs every update and reports (client, profiles, when).
async fn sync_client(
    channel: Channel,
    id: usize,
    report: mpsc::UnboundedSender<(usize, usize, Instant)>,
) {
    let mut client = ControlServiceClient::new(channel);
    let (out, rx) = mpsc::channel(4);
    let hello = pb::Hello {
        agent_id: format!("bench-{id}"),
        region: "r1".into(),
        relay_address: format!("127.0.0.1:{}", 10_000 + id),
        current_version: 0,
        agent_build: "bench".into(),
        apis: Vec::new(),
    };
    let _ = out
        .send(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Hello(hello)),
        })
        .await;
    let Ok(resp) = client.sync(ReceiverStream::new(rx)).await else {
        return;
    };
    let mut inbound = resp.into_inner();
    while let Ok(Some(msg)) = inbound.message().await {
        if let Some(pb::control_message::Message::Update(u)) = msg.message {
            let count = u.snapshot.as_ref().map_or(0, |s| s.profiles.len());
            let _ = report.send((id, count, Instant::now()));
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

fn markdown(r: &Value) -> String {
    let mut md = String::new();
    let m = &r["machine"];
    md.push_str(&format!(
        "# Spillway benchmark{}\n\nMachine: {} ({} cores, {} GiB), {}. Run took {:.0} s.\n\n",
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
