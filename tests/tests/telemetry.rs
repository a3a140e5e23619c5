//! What agents record: the audit log (one line per call, in the source
//! region only, never the prompt or the answer) and the Prometheus metrics
//! (which parse as Prometheus text, and count throttles by cause: a quota
//! of the source region apart from every region being saturated).

use std::time::Duration;

use futures_util::future::join_all;
use spillway_proto::pb;
use spillway_tests::cluster::{Cluster, ClusterSpec, Http, US, chat};
use spillway_tests::sim::SimConfig;

/// Checks that `text` is Prometheus text exposition: `# HELP` / `# TYPE`
/// comments, and samples `name{label="value",...} number`; returns the
/// samples.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            assert!(kind == "HELP" || kind == "TYPE", "comment `{line}`");
            assert!(name_ok(parts.next().unwrap_or("")), "comment `{line}`");
            if kind == "TYPE" {
                let t = parts.next().unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                    "type `{line}`"
                );
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value of `{line}`"));
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "metric name in `{line}`");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("labels of `{line}`"));
            for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("label `{pair}`"));
                assert!(name_ok(k), "label name `{k}` in `{line}`");
                assert!(!v.contains('\n'));
            }
        }
        samples.push((series.to_string(), value));
    }
    samples
}

fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .map_or(0.0, |(_, v)| *v)
}

#[tokio::test]
async fn metrics_parse_and_count_throttles_by_cause() {
    // Every region takes 2 x 1 slow call at a time: a burst finds them all
    // saturated (capacity); a quota of 6 a minute refuses the rest (quota).
    let slow = SimConfig {
        ttft: Duration::from_millis(400),
        max_concurrent: 1,
        ..SimConfig::default()
    };
    let mut spec = ClusterSpec::default();
    for r in ["us-east", "us-west", "eu-west"] {
        spec.sim.insert(r, slow.clone());
    }
    let cluster = Cluster::start(spec).await;
    let east = &cluster.region("us-east").agent;
    let http = Http::default();
    let burst = join_all((0..12).map(|_| {
        let http = http.clone();
        async move {
            http.post(east.http, "/v1/chat/completions", chat(US, false))
                .await
        }
    }))
    .await;
    let capacity = burst.iter().filter(|a| a.status == 429).count();
    assert!(capacity > 0, "12 calls on 4 slots: some are throttled");
    for a in burst.iter().filter(|a| a.status == 429) {
        assert_eq!(a.headers["x-spillway-throttle"], "capacity");
        assert_eq!(a.json()["error"]["code"], "rate_limit_exceeded");
    }

    let mut admin = cluster.cp.admin().await;
    admin
        .create_quota(pb::CreateQuotaRequest {
            quota: Some(pb::Quota {
                scope: Some(pb::QuotaScope {
                    profile: US.into(),
                    source_region: "us-east".into(),
                    tenant: String::new(),
                }),
                requests_per_minute: Some(6),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    cluster
        .cp
        .create_tenant("acme-corp", &["*"], Default::default())
        .await;
    let (key_id, secret) = cluster.cp.create_key("acme-corp").await;
    east.wait_for("the quota and the key", |c| {
        !c.quotas.is_empty() && c.keys.contains_key(&key_id)
    })
    .await;
    let mut quota = 0;
    for _ in 0..4 {
        let a = http.post_key(east.http, &secret, chat(US, false)).await;
        if a.status == 429 {
            assert_eq!(a.headers["x-spillway-throttle"], "quota");
            quota += 1;
        }
    }
    assert!(quota > 0);

    let text = http.get(east.http, "/metrics").await;
    assert_eq!(text.status, 200);
    assert!(
        text.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let samples = parse_prometheus(&text.text());
    let by_cause = |cause: &str| {
        sample(
            &samples,
            &format!("spillway_agent_throttled_total{{profile=\"{US}\",cause=\"{cause}\"}}"),
        )
    };
    assert_eq!(by_cause("capacity"), capacity as f64);
    assert_eq!(by_cause("quota"), quota as f64);
    let served_here = format!(
        "spillway_agent_calls_total{{profile=\"{US}\",inference_region=\"us-east\",outcome=\"ok\"}}"
    );
    assert!(sample(&samples, &served_here) >= 1.0);
    assert!(
        sample(
            &samples,
            &format!(
                "spillway_agent_call_duration_seconds_count{{profile=\"{US}\",inference_region=\"us-east\"}}"
            )
        ) >= 1.0
    );
    assert!(sample(&samples, "spillway_agent_config_version") > 0.0);
    // No tenant, key or content in any label; nor what a client names
    // as its model when no profile has that name.
    let a = http
        .post(
            east.http,
            "/v1/chat/completions",
            chat("no-such-profile-xyz", false),
        )
        .await;
    assert_eq!(a.status, 404);
    let text = http.get(east.http, "/metrics").await.text();
    for secret_or_content in [
        "acme-corp",
        key_id.as_str(),
        secret.as_str(),
        "hello",
        "no-such-profile-xyz",
    ] {
        assert!(
            !text.contains(secret_or_content),
            "{secret_or_content} in the metrics"
        );
    }
    assert!(text.contains("profile=\"unknown\""));
}

#[tokio::test]
async fn audit_records_are_kept_in_the_source_region_only() {
    let cluster = Cluster::start(ClusterSpec {
        audit: true,
        ..ClusterSpec::default()
    })
    .await;
    cluster
        .cp
        .create_tenant("acme", &["*"], Default::default())
        .await;
    let (key_id, secret) = cluster.cp.create_key("acme").await;
    // us-east sends every call of the profile to us-west.
    cluster.set_route(US, "us-east", &[("us-west", 1.0)]).await;
    let east = &cluster.region("us-east").agent;
    east.wait_for("the key", |c| c.keys.contains_key(&key_id))
        .await;
    let http = Http::default();
    let a = http.post_key(east.http, &secret, chat(US, false)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.region(), Some("us-west"));
    let request_id = a.headers["x-request-id"].to_str().unwrap().to_string();
    let streamed = http.post_key(east.http, &secret, chat(US, true)).await;
    assert_eq!(streamed.status, 200);
    let refused = http.post_key(east.http, "spw_x_y", chat(US, false)).await;
    assert_eq!(refused.status, 401);

    // Written off the request path: wait for the three lines.
    spillway_tests::wait_until("three audit records", Duration::from_secs(5), || {
        let n = cluster.region("us-east").audit().len();
        async move { n == 3 }
    })
    .await;
    let records = cluster.region("us-east").audit();
    let unary = records
        .iter()
        .find(|r| r["request_id"] == request_id.as_str())
        .expect("the unary call's record");
    assert_eq!(unary["tenant"], "acme");
    assert_eq!(unary["key_id"], key_id.as_str());
    assert_eq!(unary["profile"], US);
    assert_eq!(unary["model"], "llama-3.1-8b");
    assert_eq!(unary["source_region"], "us-east");
    assert_eq!(unary["inference_region"], "us-west");
    assert_eq!(unary["status"], 200);
    assert_eq!(unary["outcome"], "ok");
    assert_eq!(unary["attempts"][0]["region"], "us-west");
    assert!(unary["output_tokens"].as_u64().unwrap() > 0);
    assert!(unary["latency_ms"].as_f64().unwrap() > 0.0);
    let stream = records.iter().find(|r| r["stream"] == true).unwrap();
    assert_eq!(stream["inference_region"], "us-west");
    assert!(stream["ttft_ms"].as_f64().is_some());
    let denied = records
        .iter()
        .find(|r| r["outcome"] == "unauthenticated")
        .unwrap();
    assert_eq!(denied["status"], 401);
    // Never the prompt or the answer.
    let all = serde_json::to_string(&records).unwrap();
    assert!(!all.contains("hello") && !all.contains("tok0"), "{all}");
    // The destination served both calls and kept no record of them.
    assert_eq!(cluster.region("us-west").served(), 2);
    assert!(cluster.region("us-west").audit().is_empty());
}

#[tokio::test]
async fn a_spilled_call_is_one_trace_in_the_source_regions_collector_only() {
    let cluster = Cluster::start(ClusterSpec {
        audit: true,
        otlp: true,
        ..ClusterSpec::default()
    })
    .await;
    cluster.set_route(US, "us-east", &[("us-west", 1.0)]).await;
    let east = &cluster.region("us-east").agent;
    let http = Http::default();
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{client_trace}-00f067aa0ba902b7-01");
    let body = serde_json::json!({
        "model": US,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
    })
    .to_string();
    let a = http
        .post_with(
            east.http,
            "/v1/chat/completions",
            &[("traceparent", &traceparent)],
            body,
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.region(), Some("us-west"));

    let source = cluster.region("us-east").collector.as_ref().unwrap();
    spillway_tests::wait_until(
        "the trace in us-east's collector",
        Duration::from_secs(10),
        || {
            let n = source.spans().len();
            async move { n >= 4 }
        },
    )
    .await;
    let spans = source.spans();
    assert!(
        spans.iter().all(|s| s.trace_hex() == client_trace),
        "one trace, the client's: {spans:#?}"
    );
    let named = |name: &str, region: &str| {
        spans
            .iter()
            .find(|s| s.span.name == name && s.resource_region == region)
            .unwrap_or_else(|| panic!("span `{name}` of {region} in {spans:#?}"))
            .clone()
    };
    // The source's own spans: the call (child of the client's span) and
    // its relay attempt.
    let root = named(&format!("chat {US}"), "us-east");
    assert_eq!(root.span.parent_span_id, hex_bytes("00f067aa0ba902b7"));
    assert_eq!(
        root.attr("spillway.source_region").as_deref(),
        Some("us-east")
    );
    assert_eq!(
        root.attr("spillway.inference_region").as_deref(),
        Some("us-west")
    );
    assert_eq!(root.attr("gen_ai.request.max_tokens").as_deref(), Some("8"));
    let relay = named("relay us-west", "us-east");
    assert_eq!(relay.span.parent_span_id, root.span.span_id);
    // The destination's spans, carried back in the relay answer: the relay
    // it served and its model-server call, with the GenAI attributes.
    let served = named("relay us-west", "us-west");
    assert_eq!(served.span.parent_span_id, relay.span.span_id);
    let model = named("chat llama-3.1-8b", "us-west");
    assert_eq!(model.span.parent_span_id, served.span.span_id);
    for (key, want) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.provider.name", "openai_compatible"),
        ("gen_ai.request.model", "llama-3.1-8b"),
        ("spillway.source_region", "us-east"),
        ("spillway.inference_region", "us-west"),
    ] {
        assert_eq!(model.attr(key).as_deref(), Some(want), "{key}");
    }
    assert_eq!(
        model.attr("gen_ai.usage.output_tokens").as_deref(),
        Some("8")
    );
    assert!(model.attr("gen_ai.usage.input_tokens").is_some());
    let reasons = model.attr("gen_ai.response.finish_reasons").unwrap();
    assert!(
        reasons.contains("length") || reasons.contains("stop"),
        "{reasons}"
    );

    // The audit record went to the source's collector as a log record too,
    // in the call's trace.
    spillway_tests::wait_until("the audit log record", Duration::from_secs(10), || {
        let n = source.logs().len();
        async move { n == 1 }
    })
    .await;
    let (region, record) = source.logs().remove(0);
    assert_eq!(region, "us-east");
    assert_eq!(record.event_name, "spillway.audit");
    assert_eq!(record.trace_id, hex_bytes(client_trace));
    let body = match record.body.and_then(|b| b.value) {
        Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => s,
        other => panic!("the log body is not a string: {other:?}"),
    };
    let audit: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(audit["inference_region"], "us-west");
    assert_eq!(audit["source_region"], "us-east");

    // The destination's collector and audit folder hold nothing of it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dest = cluster.region("us-west");
    assert!(dest.collector.as_ref().unwrap().spans().is_empty());
    assert!(dest.collector.as_ref().unwrap().logs().is_empty());
    assert!(dest.audit().is_empty());
    assert_eq!(dest.served(), 1);
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test]
async fn the_control_plane_serves_prometheus_metrics() {
    let cp =
        spillway_tests::ControlPlane::start_with(None, "cp", &["--metrics-listen", "127.0.0.1:0"])
            .await;
    // Any free port: the control plane logs the one it bound.
    let mut listen = String::new();
    for _ in 0..100 {
        let log = cp.log();
        if let Some(line) = log.lines().find(|l| l.contains("serving metrics")) {
            listen = line
                .split("addr=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .expect("the metrics address in the log")
                .to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !listen.is_empty(),
        "no metrics address in the log:\n{}",
        cp.log()
    );
    cp.create_region("us-east", "us").await;
    let dir = tempfile::tempdir().unwrap();
    let agent =
        spillway_tests::TestAgent::start("a1", "us-east", &[cp.url()], dir.path(), &["m"]).await;
    agent.wait_for("a config", |c| c.version > 0).await;
    let http = Http::default();
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    // Bounded polling: the leadership is taken on the leader's first tick.
    let mut samples = Vec::new();
    for _ in 0..100 {
        let text = http.get(addr, "/metrics").await;
        assert_eq!(text.status, 200);
        samples = parse_prometheus(&text.text());
        if sample(&samples, "spillway_cp_agents{region=\"us-east\"}") == 1.0
            && sample(&samples, "spillway_cp_leader") == 1.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        sample(&samples, "spillway_cp_agents{region=\"us-east\"}"),
        1.0
    );
    assert_eq!(sample(&samples, "spillway_cp_leader"), 1.0);
    assert!(sample(&samples, "spillway_cp_updates_sent_total") >= 1.0);
    assert!(sample(&samples, "spillway_cp_config_version") > 0.0);
}

#[tokio::test]
async fn an_agent_serves_metrics_on_a_listener_of_its_own_when_asked() {
    let cp = spillway_tests::ControlPlane::start_with(None, "cp", &[]).await;
    cp.create_region("us-east", "us").await;
    let dir = tempfile::tempdir().unwrap();
    let planes = [cp.url()];
    let mut opts = spillway_tests::AgentOptions::new("a1", "us-east", &planes, dir.path());
    opts.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let agent = spillway_tests::TestAgent::start_with(opts).await;
    agent.wait_for("a config", |c| c.version > 0).await;
    let http = Http::default();
    let own = agent.metrics.expect("a metrics listener");
    assert_ne!(own, agent.http);
    let text = http.get(own, "/metrics").await;
    assert_eq!(text.status, 200);
    let samples = parse_prometheus(&text.text());
    assert!(sample(&samples, "spillway_agent_config_version") > 0.0);
    // The public door no longer shows them, and still serves the rest.
    let door = http.get(agent.http, "/metrics").await;
    assert_eq!(door.status, 404, "{}", door.text());
    assert!(!door.text().contains("spillway_agent"));
    assert_eq!(http.get(agent.http, "/health").await.status, 200);
}

#[tokio::test]
async fn a_taken_metrics_address_is_refused_at_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    spillway_tests::agent_refuses_to_start(
        &[
            "--model-server",
            "http://127.0.0.1:9,models=m",
            "--metrics-listen",
            &addr,
        ],
        &format!("cannot listen on {addr} (--metrics-listen)"),
    )
    .await;
}
