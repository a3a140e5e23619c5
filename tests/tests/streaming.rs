//! Streams: tokens are forwarded as they come (nothing waits for the end),
//! a stream that has started is never retried, a failure after the first
//! byte ends the stream with an error event, and retries stay within the
//! retry budget.

use std::sync::atomic::Ordering;
use std::time::Duration;

use spillway_agent::pipeline::PipelineSettings;
use spillway_proto::pb::{self, inference_service_client::InferenceServiceClient};
use spillway_tests::cluster::{Cluster, ClusterSpec, Http, US, chat};
use spillway_tests::sim::{SimConfig, token};
use spillway_tests::{AgentOptions, TestAgent, TestSim, model_server};

#[tokio::test]
async fn the_first_token_is_forwarded_before_the_stream_ends() {
    let mut spec = ClusterSpec::default();
    spec.sim.insert(
        "us-west",
        SimConfig {
            inter_token: Duration::from_millis(100),
            output_tokens: 20,
            ..SimConfig::default()
        },
    );
    let cluster = Cluster::start(spec).await;
    cluster.set_route(US, "us-east", &[("us-west", 1.0)]).await;
    let http = Http::default();
    let mut s = http
        .post_streaming(
            cluster.region("us-east").agent.http,
            "/v1/chat/completions",
            chat(US, true),
        )
        .await;
    assert_eq!(s.status, 200);
    let mut seen = String::new();
    while !seen.contains(&token(0)) {
        let chunk = s.next().await.expect("more body").expect("no break");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    // The first token came through the relay while the model server is still
    // producing the rest: the stream is passed through, not buffered.
    let west = &cluster.region("us-west");
    assert_eq!(
        west.served(),
        0,
        "the simulator has not finished its stream yet"
    );
    assert_eq!(
        west.sims
            .iter()
            .map(|s| s.state.in_flight.load(Ordering::Relaxed))
            .sum::<u32>(),
        1
    );
    while let Some(chunk) = s.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("no break")));
    }
    assert!(
        seen.contains(&token(19)) && seen.ends_with("data: [DONE]\n\n"),
        "{seen}"
    );
}

async fn broken_stream_case(relayed: bool) {
    let mut spec = ClusterSpec::default();
    let breaking = SimConfig {
        output_tokens: 10,
        break_after: Some(3),
        ..SimConfig::default()
    };
    spec.sim.insert("us-east", breaking.clone());
    spec.sim.insert("us-west", breaking);
    let cluster = Cluster::start(spec).await;
    if relayed {
        cluster.set_route(US, "us-east", &[("us-west", 1.0)]).await;
    }
    let http = Http::default();
    let a = http
        .post(
            cluster.region("us-east").agent.http,
            "/v1/chat/completions",
            chat(US, true),
        )
        .await;
    // The stream had started: 200, the tokens so far, then an error event.
    assert_eq!(a.status, 200);
    let text = a.text();
    assert!(
        text.contains(&token(2)) && !text.contains(&token(3)),
        "{text}"
    );
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let event: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["error"]["type"], "server_error", "{event}");
    assert!(
        event["error"]["message"]
            .as_str()
            .unwrap()
            .contains("broke off"),
        "{event}"
    );
    // Never retried: exactly one model server saw the call.
    let received: u64 = cluster
        .regions
        .values()
        .flat_map(|r| r.sims.iter())
        .map(|s| s.state.received.load(Ordering::Relaxed))
        .sum();
    assert_eq!(received, 1);

    // Over gRPC the same break ends ConverseStream with UNAVAILABLE after the
    // deltas that came.
    let addr = cluster.region("us-east").agent.addr;
    let mut client = InferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let req = pb::ConverseRequest {
        model_id: US.into(),
        messages: vec![pb::Message {
            role: pb::Role::User.into(),
            content: vec![pb::ContentBlock {
                block: Some(pb::content_block::Block::Text("hi".into())),
            }],
        }],
        ..Default::default()
    };
    let mut events = client.converse_stream(req).await.unwrap().into_inner();
    let mut deltas = 0;
    let status = loop {
        match events.message().await {
            Ok(Some(pb::ConverseStreamEvent {
                event: Some(pb::converse_stream_event::Event::ContentDelta(_)),
            })) => deltas += 1,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without the error"),
            Err(s) => break s,
        }
    };
    assert_eq!(deltas, 3);
    assert_eq!(
        status.code(),
        tonic::Code::Unavailable,
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_local_stream_that_breaks_ends_with_an_error_event_and_is_not_retried() {
    broken_stream_case(false).await;
}

#[tokio::test]
async fn a_relayed_stream_that_breaks_ends_with_an_error_event_and_is_not_retried() {
    broken_stream_case(true).await;
}

#[tokio::test]
async fn retries_stay_within_the_retry_budget() {
    // One region's agent with a dead model server and a budget that allows
    // no retries: calls are not multiplied onto the other region.
    let cp = spillway_tests::ControlPlane::start(None, "cp").await;
    let mut admin = cp.admin().await;
    for (name, geo) in [("us-east", "us"), ("us-west", "us")] {
        let region = spillway_proto::pb::Region {
            name: name.into(),
            geography: geo.into(),
            ..Default::default()
        };
        admin
            .create_region(spillway_proto::pb::CreateRegionRequest {
                region: Some(region),
            })
            .await
            .unwrap();
    }
    let profile = spillway_proto::pb::InferenceProfile {
        id: US.into(),
        destinations: vec!["us-east".into(), "us-west".into()],
        ..Default::default()
    };
    admin
        .create_profile(spillway_proto::pb::CreateProfileRequest {
            profile: Some(profile),
        })
        .await
        .unwrap();
    let planes = [cp.url()];
    let west_sim = TestSim::start(SimConfig::default()).await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut west = AgentOptions::new("w", "us-west", &planes, d1.path());
    west.model_servers = vec![model_server(west_sim.addr, &["llama-3.1-8b"], 64)];
    let west = TestAgent::start_with(west).await;
    let dead = TestSim::start(SimConfig::default()).await;
    let mut east = AgentOptions::new("e", "us-east", &planes, d2.path());
    east.model_servers = vec![model_server(dead.addr, &["llama-3.1-8b"], 64)];
    east.pipeline = PipelineSettings {
        max_attempts: 3,
        retry_ratio: 0.0,
        retry_floor_per_sec: 0,
        allow_anonymous: true,
        ..PipelineSettings::default()
    };
    let east = TestAgent::start_with(east).await;
    east.wait_for("us-west's relay", |c| {
        c.relays.contains_key("us-west") && c.profiles.contains_key(US)
    })
    .await;
    west.wait_for("its profile", |c| c.profiles.contains_key(US))
        .await;
    dead.stop();
    let http = Http::default();
    for _ in 0..10 {
        let a = http
            .post(east.http, "/v1/chat/completions", chat(US, false))
            .await;
        // us-east is down and us-west was not tried: an outage, not a
        // throttle.
        assert_eq!(a.status, 503, "{}", a.text());
        assert!(
            a.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("retry budget"),
            "{}",
            a.text()
        );
    }
    assert_eq!(
        west_sim.state.received.load(Ordering::Relaxed),
        0,
        "no call was retried onto us-west"
    );
}
