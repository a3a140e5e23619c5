//! The data plane end to end: a control-plane process, three regions with an
//! agent and two simulated model servers each, calls through the HTTP and
//! gRPC front doors. Source first, spillover, throttling, failover,
//! streaming through the relay, and the serving region on every answer.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::join_all;
use spillway_proto::pb::{self, inference_service_client::InferenceServiceClient};
use spillway_tests::cluster::{Cluster, ClusterSpec, GLOBAL, Http, US, chat};
use spillway_tests::sim::{SimConfig, token};

/// Slow enough that a burst of calls all arrive while the first ones are
/// still being served, even on a busy machine.
fn slow(max_concurrent: u32) -> SimConfig {
    SimConfig {
        ttft: Duration::from_secs(2),
        max_concurrent,
        ..SimConfig::default()
    }
}

#[tokio::test]
async fn with_spare_capacity_every_call_stays_in_the_source_region() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let http = Http::default();
    let east = &cluster.region("us-east").agent;
    for _ in 0..20 {
        let a = http
            .post(east.http, "/v1/chat/completions", chat(GLOBAL, false))
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.region(), Some("us-east"));
        assert_eq!(
            a.json()["choices"][0]["message"]["content"],
            (0..16).map(token).collect::<String>()
        );
    }
    assert_eq!(cluster.region("us-east").served(), 20);
    assert_eq!(
        cluster.region("us-west").served() + cluster.region("eu-west").served(),
        0
    );
}

#[tokio::test]
async fn a_saturated_source_spills_the_excess_and_nothing_fails() {
    let mut spec = ClusterSpec::default();
    // us-east takes 2 x 2 concurrent calls; the others plenty.
    spec.sim.insert("us-east", slow(2));
    spec.sim.insert("us-west", slow(64));
    spec.sim.insert("eu-west", slow(64));
    let cluster = Cluster::start(spec).await;
    let http = Http::default();
    let east = cluster.region("us-east").agent.http;
    let answers = join_all((0..12).map(|_| {
        let http = http.clone();
        async move {
            http.post(east, "/v1/chat/completions", chat(US, false))
                .await
        }
    }))
    .await;
    let mut by_region: BTreeMap<String, usize> = BTreeMap::new();
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.text());
        *by_region
            .entry(a.region().unwrap().to_string())
            .or_default() += 1;
    }
    // The source serves what it can; the excess goes to the other region of
    // the geography, never outside it.
    assert_eq!(by_region.get("us-east"), Some(&4), "{by_region:?}");
    assert_eq!(by_region.get("us-west"), Some(&8), "{by_region:?}");
    assert_eq!(cluster.region("eu-west").served(), 0);
    assert_eq!(cluster.region("us-east").served(), 4);
    assert_eq!(cluster.region("us-west").served(), 8);
}

#[tokio::test]
async fn when_every_region_is_saturated_calls_are_throttled_and_nothing_else() {
    let mut spec = ClusterSpec::default();
    for r in ["us-east", "us-west", "eu-west"] {
        spec.sim.insert(r, slow(1));
    }
    let cluster = Cluster::start(spec).await;
    let http = Http::default();
    let east = cluster.region("us-east").agent.http;
    let answers = join_all((0..12).map(|_| {
        let http = http.clone();
        async move {
            http.post(east, "/v1/chat/completions", chat(US, false))
                .await
        }
    }))
    .await;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let throttled: Vec<_> = answers.iter().filter(|a| a.status == 429).collect();
    assert_eq!(
        ok + throttled.len(),
        answers.len(),
        "only successes and throttles"
    );
    assert_eq!(ok, 4, "2 servers in each of the 2 US regions");
    let t = throttled[0];
    assert_eq!(
        t.headers.get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let e = t.json();
    assert_eq!(e["error"]["type"], "rate_limit_error");
    assert!(e["error"]["message"].as_str().unwrap().contains(US), "{e}");
    assert_eq!(cluster.region("eu-west").served(), 0);
}

#[tokio::test]
async fn a_region_that_stops_answering_costs_no_failed_calls() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let http = Http::default();
    let east = cluster.region("us-east").agent.http;
    let first = http
        .post(east, "/v1/chat/completions", chat(US, false))
        .await;
    assert_eq!(first.region(), Some("us-east"));
    for sim in &cluster.region("us-east").sims {
        sim.stop();
    }
    for _ in 0..20 {
        let a = http
            .post(east, "/v1/chat/completions", chat(US, false))
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.region(), Some("us-west"));
    }
    assert_eq!(cluster.region("us-west").served(), 20);
}

/// Collects the content deltas and the usage of an SSE answer.
fn sse_content(body: &str) -> (String, Option<serde_json::Value>, bool) {
    let mut text = String::new();
    let mut usage = None;
    let mut done = false;
    for event in body.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not an SSE data event: {event:?}"));
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: serde_json::Value = serde_json::from_str(data).unwrap();
        assert!(chunk.get("error").is_none(), "error event: {chunk}");
        if let Some(c) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if !chunk["usage"].is_null() {
            usage = Some(chunk["usage"].clone());
        }
    }
    (text, usage, done)
}

#[tokio::test]
async fn streams_through_the_relay_deliver_every_token_in_order() {
    let mut spec = ClusterSpec::default();
    spec.sim.insert(
        "us-west",
        SimConfig {
            inter_token: Duration::from_millis(2),
            output_tokens: 50,
            ..SimConfig::default()
        },
    );
    let cluster = Cluster::start(spec).await;
    // us-east sends everything to us-west.
    cluster.set_route(US, "us-east", &[("us-west", 1.0)]).await;
    let http = Http::default();
    let a = http
        .post(
            cluster.region("us-east").agent.http,
            "/v1/chat/completions",
            chat(US, true),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.region(), Some("us-west"));
    assert_eq!(a.headers["content-type"], "text/event-stream");
    let (text, usage, done) = sse_content(&a.text());
    assert_eq!(text, (0..50).map(token).collect::<String>());
    assert_eq!(
        usage.expect("include_usage asks for usage")["completion_tokens"],
        50
    );
    assert!(done, "the stream ends with [DONE]");
    assert_eq!(cluster.region("us-east").served(), 0);
}

#[tokio::test]
async fn converse_over_grpc_names_the_serving_region() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    cluster
        .set_route(GLOBAL, "eu-west", &[("us-east", 1.0)])
        .await;
    let eu = cluster.region("eu-west").agent.addr;
    let mut client = InferenceServiceClient::connect(format!("http://{eu}"))
        .await
        .unwrap();
    let req = pb::ConverseRequest {
        model_id: GLOBAL.into(),
        messages: vec![pb::Message {
            role: pb::Role::User.into(),
            content: vec![pb::ContentBlock {
                block: Some(pb::content_block::Block::Text("hello".into())),
            }],
        }],
        system: vec![],
        inference_config: Some(pb::InferenceConfig {
            max_tokens: Some(5),
            ..Default::default()
        }),
        request_metadata: Default::default(),
        tool_config: None,
    };
    let resp = client.converse(req.clone()).await.unwrap();
    assert_eq!(
        resp.metadata().get("x-spillway-inference-region").unwrap(),
        "us-east"
    );
    let resp = resp.into_inner();
    assert_eq!(resp.inference_region, "us-east");
    let text = match &resp.output.unwrap().content[0].block {
        Some(pb::content_block::Block::Text(t)) => t.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(text, (0..5).map(token).collect::<String>());
    assert_eq!(resp.stop_reason, pb::StopReason::MaxTokens as i32);
    assert_eq!(resp.usage.unwrap().output_tokens, 5);

    let mut events = client.converse_stream(req).await.unwrap().into_inner();
    let mut text = String::new();
    let mut start_region = None;
    let mut stopped = false;
    let mut usage = None;
    while let Some(e) = events.message().await.unwrap() {
        match e.event.unwrap() {
            pb::converse_stream_event::Event::MessageStart(s) => {
                start_region = Some(s.inference_region)
            }
            pb::converse_stream_event::Event::ContentDelta(d) => text.push_str(&d.text),
            pb::converse_stream_event::Event::MessageStop(_) => stopped = true,
            pb::converse_stream_event::Event::Metadata(m) => usage = m.usage,
            _ => {}
        }
    }
    assert_eq!(start_region.as_deref(), Some("us-east"));
    assert_eq!(text, (0..5).map(token).collect::<String>());
    assert!(stopped);
    assert_eq!(usage.unwrap().output_tokens, 5);
    assert_eq!(cluster.region("eu-west").served(), 0);
}

#[tokio::test]
async fn models_lists_the_profiles_callable_from_the_region() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let http = Http::default();
    let a = http
        .get(cluster.region("us-east").agent.http, "/v1/models")
        .await;
    assert_eq!(a.status, 200);
    let ids: Vec<String> = a.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, [GLOBAL, US]);
}

#[tokio::test]
async fn model_servers_can_be_reached_over_http2() {
    use spillway_tests::{AgentOptions, ControlPlane, TestAgent, TestSim, model_server};
    let cp = ControlPlane::start(None, "cp").await;
    let mut admin = cp.admin().await;
    cp.create_region("us-east", "us").await;
    let profile = pb::InferenceProfile {
        id: US.into(),
        destinations: vec!["us-east".into()],
        ..Default::default()
    };
    admin
        .create_profile(pb::CreateProfileRequest {
            profile: Some(profile),
        })
        .await
        .unwrap();
    // The simulator speaks HTTP/1.1 and HTTP/2 (prior knowledge) on one port.
    let sim = TestSim::start(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let planes = [cp.url()];
    let mut opts = AgentOptions::new("a", "us-east", &planes, dir.path());
    let mut spec = model_server(sim.addr, &["llama-3.1-8b"], 8);
    spec.http2 = true;
    opts.model_servers = vec![spec];
    let agent = TestAgent::start_with(opts).await;
    agent
        .wait_for("its profile", |c| c.profiles.contains_key(US))
        .await;
    let http = Http::default();
    for stream in [false, true] {
        let a = http
            .post(agent.http, "/v1/chat/completions", chat(US, stream))
            .await;
        assert_eq!(
            (a.status.as_u16(), a.region()),
            (200, Some("us-east")),
            "{}",
            a.text()
        );
    }
    assert_eq!(sim.served(), 2);
}

#[tokio::test]
async fn a_failing_region_is_ejected_after_two_failures_in_a_row() {
    use std::sync::atomic::Ordering;
    let cluster = Cluster::start(ClusterSpec::default()).await;
    // us-east's calls go to us-west first, us-east second.
    cluster
        .set_route_with_priority(US, "us-east", &[("us-west", 1.0, 0), ("us-east", 1.0, 1)])
        .await;
    for sim in &cluster.region("us-west").sims {
        sim.state.down.store(true, Ordering::Relaxed);
    }
    let http = Http::default();
    let east = cluster.region("us-east").agent.http;
    for _ in 0..10 {
        let a = http
            .post(east, "/v1/chat/completions", chat(US, false))
            .await;
        assert_eq!(
            (a.status.as_u16(), a.region()),
            (200, Some("us-east")),
            "{}",
            a.text()
        );
    }
    // us-west's model servers saw the two calls that ejected it, and (only
    // if this machine took longer than the 2 s ejection) a retry after it.
    let tried: u64 = cluster
        .region("us-west")
        .sims
        .iter()
        .map(|s| s.state.received.load(Ordering::Relaxed))
        .sum();
    assert!(
        (2..=4).contains(&tried),
        "us-west was tried {tried} times for 10 calls"
    );
    // The ejection is counted, once per ejection (twice at most, as above).
    let metrics = http.get(east, "/metrics").await.text();
    let ejections: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("spillway_agent_ejections_total{region=\"us-west\"} "))
        .unwrap_or_else(|| panic!("no us-west ejection in\n{metrics}"))
        .parse()
        .unwrap();
    assert!((1.0..=2.0).contains(&ejections), "{ejections} ejections");
    assert!(
        !metrics.contains("spillway_agent_ejections_total{region=\"us-east\"}"),
        "the source region itself is never ejected"
    );
    // Each relay to us-west failed before its head: its agent answered
    // with an error (its model servers failed), which is a refusal.
    let refused: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "spillway_agent_relay_errors_total{inference_region=\"us-west\",cause=\"refused\"} ",
            )
        })
        .unwrap_or_else(|| panic!("no refused relay to us-west in\n{metrics}"))
        .parse()
        .unwrap();
    // The calls that ejected it, and (as above) a retry after the ejection.
    assert!(
        (2.0..=4.0).contains(&refused),
        "{refused} refused relays to us-west for 10 calls"
    );
    assert_eq!(
        metrics
            .matches("spillway_agent_relay_errors_total{")
            .count(),
        1,
        "no other relay error: {metrics}"
    );
}

#[tokio::test]
async fn a_failing_model_server_is_ejected_and_its_calls_fail_over() {
    use std::sync::atomic::Ordering;
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let east = cluster.region("us-east");
    east.sims[0].state.down.store(true, Ordering::Relaxed);
    // The agent prefers the server that answers fastest, and a failure
    // answers fast: the healthy neighbour is made slower still, so that
    // only ejection keeps the broken server out of the picks.
    east.sims[1].state.config.lock().unwrap().ttft = Duration::from_millis(50);
    let http = Http::default();
    let mut served_here = 0;
    for _ in 0..20 {
        let a = http
            .post(east.agent.http, "/v1/chat/completions", chat(US, false))
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
        served_here += usize::from(a.region() == Some("us-east"));
    }
    // The broken server got the calls that ejected it (and, if this machine
    // took longer than the 2 s ejection, a retry after it); the rest went to
    // its healthy neighbour, and nothing failed.
    let tried = east.sims[0].state.received.load(Ordering::Relaxed);
    assert!(
        (2..=4).contains(&tried),
        "the failing server was tried {tried} times"
    );
    assert_eq!(served_here as u64, east.sims[1].served());
    assert!(served_here >= 16, "{served_here} of 20 served in us-east");
}

/// Static stability: with the control plane gone, agents keep serving from
/// their last config, locally and through the relay.
#[tokio::test]
async fn traffic_goes_on_when_the_control_plane_is_gone() {
    let mut cluster = Cluster::start(ClusterSpec::default()).await;
    cluster
        .set_route(GLOBAL, "us-east", &[("eu-west", 1.0)])
        .await;
    cluster.cp.kill().await;
    let http = Http::default();
    let east = cluster.region("us-east").agent.http;
    for (profile, served_in) in [(US, "us-east"), (GLOBAL, "eu-west")] {
        for _ in 0..5 {
            let a = http
                .post(east, "/v1/chat/completions", chat(profile, false))
                .await;
            assert_eq!(
                (a.status.as_u16(), a.region()),
                (200, Some(served_in)),
                "{}",
                a.text()
            );
        }
    }
}
