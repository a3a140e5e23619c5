//! An outage is answered as an outage, not as a throttle, and tells the
//! client the profile, the regions and the cause, never an internal address
//! or an OS error; those stay in the log and the source region's audit
//! record.

use std::sync::atomic::Ordering;
use std::time::Duration;

use spillway_proto::pb::{self, inference_service_client::InferenceServiceClient};
use spillway_tests::cluster::{Cluster, ClusterSpec, EU, Http, chat};

#[tokio::test]
async fn every_region_down_is_a_503_that_names_no_internal_address() {
    let cluster = Cluster::start(ClusterSpec {
        audit: true,
        ..ClusterSpec::default()
    })
    .await;
    // eu-west is the EU profile's only region; its model servers fail.
    let eu = cluster.region("eu-west");
    for sim in &eu.sims {
        sim.state.down.store(true, Ordering::Relaxed);
    }
    let http = Http::default();
    let a = http
        .post(eu.agent.http, "/v1/chat/completions", chat(EU, false))
        .await;
    assert_eq!(a.status, 503, "{}", a.text());
    let e = a.json();
    assert_eq!(e["error"]["type"], "server_error");
    assert_eq!(e["error"]["code"], "regions_unavailable");
    assert_eq!(
        e["error"]["message"],
        format!(
            "inference profile `{EU}` is unavailable: no region tried could serve the call (eu-west: unavailable)"
        )
    );
    assert!(
        !a.headers.contains_key("x-spillway-throttle"),
        "an outage is not a throttle"
    );
    for sim in &eu.sims {
        assert!(!a.text().contains(&sim.addr.to_string()), "{}", a.text());
    }

    // The same over gRPC: UNAVAILABLE, not RESOURCE_EXHAUSTED.
    let mut grpc = InferenceServiceClient::connect(format!("http://{}", eu.agent.addr))
        .await
        .unwrap();
    let status = grpc
        .converse(pb::ConverseRequest {
            model_id: EU.into(),
            messages: vec![pb::Message {
                role: pb::Role::User.into(),
                content: vec![pb::ContentBlock {
                    block: Some(pb::content_block::Block::Text("hi".into())),
                }],
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(!status.message().contains("127.0.0.1"), "{status:?}");

    // The audit record in the source region keeps what happened.
    spillway_tests::wait_until(
        "the two calls' audit records",
        Duration::from_secs(10),
        || async { eu.audit().len() >= 2 },
    )
    .await;
    let record = &eu.audit()[0];
    assert_eq!(record["status"], 503);
    assert_eq!(record["outcome"], "unavailable");
    let detail = record["attempts"][0]["outcome"].as_str().unwrap();
    assert!(detail.contains("503"), "{record}");
}
