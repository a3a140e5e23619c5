//! Every bad input gets a clear answer (OpenAI error JSON over HTTP, a gRPC
//! status), and nothing else changes: no model server sees the call, and the
//! agent goes on serving good calls.

use spillway_proto::pb::{
    self, inference_service_client::InferenceServiceClient,
    relay_service_client::RelayServiceClient,
};
use spillway_tests::cluster::{Cluster, ClusterSpec, EU, Http, MODEL, US, chat};
use spillway_tests::sim::SimConfig;
use tonic::Code;

async fn served_everywhere(c: &Cluster) -> u64 {
    c.regions.values().map(|r| r.served()).sum()
}

#[tokio::test]
async fn http_bad_input_is_refused_with_the_field_named() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let http = Http::default();
    let east = cluster.region("us-east").agent.http;
    let msgs = r#""messages":[{"role":"user","content":"hi"}]"#;
    // (body, status, param, code, words in the message)
    type Case<'a> = (String, u16, Option<&'a str>, Option<&'a str>, &'a str);
    let cases: Vec<Case> = vec![
        (
            chat("no.such-profile", false),
            404,
            Some("model"),
            Some("model_not_found"),
            "no.such-profile",
        ),
        (
            chat(EU, false),
            400,
            Some("model"),
            Some("model_not_available_in_region"),
            "us-east",
        ),
        ("{not json".into(), 400, None, None, "not valid JSON"),
        (
            format!(r#"{{"model":"{US}"}}"#),
            400,
            Some("messages"),
            None,
            "`messages` is required",
        ),
        (
            format!(r#"{{"model":"{US}","messages":"hi"}}"#),
            400,
            Some("messages"),
            None,
            "must be an array",
        ),
        (
            format!(r#"{{"model":5,{msgs}}}"#),
            400,
            Some("model"),
            None,
            "must be a string",
        ),
        (
            format!(r#"{{"model":"{US}",{msgs},"stream":"yes"}}"#),
            400,
            Some("stream"),
            None,
            "true or false",
        ),
        (
            format!(r#"{{"model":"{US}",{msgs},"max_tokens":0}}"#),
            400,
            Some("max_tokens"),
            None,
            "from 1 to",
        ),
        (
            format!(r#"{{"model":"{US}",{msgs},"max_tokens":100000000}}"#),
            400,
            Some("max_tokens"),
            None,
            "from 1 to",
        ),
        (
            format!(r#"{{"model":"{US}","messages":[{{"role":"robot","content":"x"}}]}}"#),
            400,
            Some("messages[0].role"),
            None,
            "one of",
        ),
    ];
    for (body, status, param, code, words) in cases {
        let a = http.post(east, "/v1/chat/completions", body.clone()).await;
        assert_eq!(a.status.as_u16(), status, "{body}: {}", a.text());
        let e = a.json();
        assert_eq!(e["error"]["param"].as_str(), param, "{body}: {e}");
        assert_eq!(e["error"]["code"].as_str(), code, "{body}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(words),
            "{body}: {e}"
        );
    }
    // Over the body limit: 413.
    let huge = format!(
        r#"{{"model":"{US}","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(100 * 1024)
    );
    let a = http.post(east, "/v1/chat/completions", huge).await;
    assert_eq!(a.status, 413, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], "request_too_large");

    // The wrong method on a known path: 405 with an error body like the rest.
    let a = http.get(east, "/v1/chat/completions").await;
    assert_eq!(a.status, 405, "{}", a.text());
    let e = a.json();
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("GET"),
        "{e}"
    );

    // Nothing reached a model server, and good calls still work.
    assert_eq!(served_everywhere(&cluster).await, 0);
    let ok = http
        .post(east, "/v1/chat/completions", chat(US, false))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
}

fn converse(model: &str, max_tokens: Option<u32>) -> pb::ConverseRequest {
    pb::ConverseRequest {
        model_id: model.into(),
        messages: vec![pb::Message {
            role: pb::Role::User.into(),
            content: vec![pb::ContentBlock {
                block: Some(pb::content_block::Block::Text("hi".into())),
            }],
        }],
        inference_config: Some(pb::InferenceConfig {
            max_tokens,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn grpc_bad_input_is_refused_with_the_field_named() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let east = cluster.region("us-east").agent.addr;
    let mut client = InferenceServiceClient::connect(format!("http://{east}"))
        .await
        .unwrap();
    let mut no_messages = converse(US, None);
    no_messages.messages.clear();
    let mut no_role = converse(US, None);
    no_role.messages[0].role = pb::Role::Unspecified.into();
    let cases = [
        (
            converse("no.such-profile", None),
            Code::NotFound,
            "no.such-profile",
        ),
        (converse(EU, None), Code::FailedPrecondition, "us-east"),
        (converse("", None), Code::InvalidArgument, "model_id"),
        (no_messages, Code::InvalidArgument, "messages"),
        (no_role, Code::InvalidArgument, "messages[0].role"),
        (
            converse(US, Some(0)),
            Code::InvalidArgument,
            "inference_config.max_tokens",
        ),
    ];
    for (req, code, words) in cases {
        let s = client.converse(req.clone()).await.expect_err("refused");
        assert_eq!(s.code(), code, "{req:?}: {}", s.message());
        assert!(s.message().contains(words), "{}", s.message());
        let s = client.converse_stream(req).await.expect_err("refused");
        assert_eq!(s.code(), code);
    }
    assert_eq!(served_everywhere(&cluster).await, 0);
    assert!(client.converse(converse(US, Some(3))).await.is_ok());
}

#[tokio::test]
async fn relay_calls_from_something_that_is_not_an_agent_are_refused() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let west = cluster.region("us-west").agent.addr;
    let mut client = RelayServiceClient::connect(format!("http://{west}"))
        .await
        .unwrap();
    let req = || pb::RelayRequest {
        source_region: "us-east".into(),
        profile: US.into(),
        model: MODEL.into(),
        body: chat(MODEL, false).into(),
        ..Default::default()
    };
    let s = client.relay(req()).await.expect_err("no identity");
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    let mut forged = tonic::Request::new(req());
    forged
        .metadata_mut()
        .insert("spillway-source-agent", "us-east/intruder".parse().unwrap());
    let s = client.relay(forged).await.expect_err("unknown agent");
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("us-east/intruder"), "{}", s.message());
    // A real agent of another region claiming a different source region.
    let mut wrong_region = tonic::Request::new(pb::RelayRequest {
        source_region: "eu-west".into(),
        ..req()
    });
    wrong_region
        .metadata_mut()
        .insert("spillway-source-agent", "us-east/agent-1".parse().unwrap());
    assert_eq!(
        client
            .relay(wrong_region)
            .await
            .expect_err("mismatch")
            .code(),
        Code::PermissionDenied
    );
    // A known agent relaying a body that asks for another model than the
    // relay names: refused before any model server sees it.
    let mut other_model = tonic::Request::new(pb::RelayRequest {
        body: chat("some-other-model", false).into(),
        ..req()
    });
    other_model
        .metadata_mut()
        .insert("spillway-source-agent", "us-east/agent-1".parse().unwrap());
    let s = client.relay(other_model).await.expect_err("model mismatch");
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    // A Responses call that does not tell the engine `store: false`: the
    // destination does not take residency on trust.
    for body in [
        serde_json::json!({"model": MODEL, "input": "hi"}),
        serde_json::json!({"model": MODEL, "input": "hi", "store": true}),
    ] {
        let mut stored = tonic::Request::new(pb::RelayRequest {
            api: "responses".into(),
            body: body.to_string().into(),
            ..req()
        });
        stored
            .metadata_mut()
            .insert("spillway-source-agent", "us-east/agent-1".parse().unwrap());
        let s = client.relay(stored).await.expect_err("stored response");
        assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
        assert!(s.message().contains("store: false"), "{}", s.message());
    }
    assert_eq!(cluster.region("us-west").served(), 0);
}

#[tokio::test]
async fn a_model_server_answering_garbage_gets_502_and_the_agent_keeps_serving() {
    let mut spec = ClusterSpec::default();
    spec.sim.insert(
        "us-east",
        SimConfig {
            garbage: true,
            ..SimConfig::default()
        },
    );
    let cluster = Cluster::start(spec).await;
    let http = Http::default();
    let east = cluster.region("us-east").agent.http;
    let a = http
        .post(east, "/v1/chat/completions", chat(US, false))
        .await;
    assert_eq!(a.status, 502, "{}", a.text());
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    let mut grpc =
        InferenceServiceClient::connect(format!("http://{}", cluster.region("us-east").agent.addr))
            .await
            .unwrap();
    let s = grpc
        .converse(converse(US, None))
        .await
        .expect_err("garbage");
    assert_eq!(s.code(), Code::Unavailable);
    // The agent keeps serving: the same profile routed elsewhere works.
    cluster.set_route(US, "us-east", &[("us-west", 1.0)]).await;
    let ok = http
        .post(east, "/v1/chat/completions", chat(US, false))
        .await;
    assert_eq!((ok.status.as_u16(), ok.region()), (200, Some("us-west")));
}
