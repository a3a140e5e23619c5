//! Health and reflection on every server: the control plane and the agent.

use std::time::Duration;

use spillway_tests::{ControlPlane, TestAgent, wait_until};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

/// The services a server lists over reflection v1alpha (grpcio-reflection
/// and older grpcurl speak only that one).
async fn services_v1alpha(url: String) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let channel = Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .expect("reflection channel");
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let answer = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("v1alpha reflection call")
        .into_inner()
        .message()
        .await
        .expect("v1alpha reflection answer")
        .expect("one answer");
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// Both reflection versions list exactly `expected`.
async fn lists_exactly(url: String, expected: &[&str]) {
    let mut want: Vec<String> = expected
        .iter()
        .map(|s| s.to_string())
        .chain(
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ]
            .map(String::from),
        )
        .collect();
    want.sort();
    for (version, mut names) in [
        ("v1", services(url.clone()).await),
        ("v1alpha", services_v1alpha(url).await),
    ] {
        names.sort();
        assert_eq!(names, want, "reflection {version} lists what is served");
    }
}

async fn services(url: String) -> Vec<String> {
    let channel = Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .expect("reflection channel");
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("reflection call")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("reflection answer")
        .expect("one answer");
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn health(url: String, service: &str) -> i32 {
    let channel = Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .expect("health channel");
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status
}

#[tokio::test]
async fn control_plane_serves_health_and_reflection() {
    let cp = ControlPlane::start(None, "cp").await;
    assert_eq!(health(cp.url(), "").await, ServingStatus::Serving as i32);
    assert_eq!(
        health(cp.url(), "spillway.v1.AdminService").await,
        ServingStatus::Serving as i32
    );
    lists_exactly(
        cp.url(),
        &["spillway.v1.AdminService", "spillway.v1.ControlService"],
    )
    .await;
}

#[tokio::test]
async fn agent_health_follows_its_config() {
    let dir = tempfile::tempdir().unwrap();
    // No control plane answers yet: the agent has no config and says so.
    let port = spillway_tests::free_port();
    let planes = [format!("http://127.0.0.1:{port}")];
    let agent = TestAgent::start("a1", "us-east", &planes, dir.path(), &["m"]).await;
    let url = format!("http://{}", agent.addr);
    assert_eq!(
        health(url.clone(), "").await,
        ServingStatus::NotServing as i32
    );
    // The agent lists what it serves, not the control plane's services.
    lists_exactly(
        url.clone(),
        &["spillway.v1.InferenceService", "spillway.v1.RelayService"],
    )
    .await;

    // The control plane comes up on the address the agent was told.
    let _cp =
        ControlPlane::start_with(None, "cp", &["--listen", &format!("127.0.0.1:{port}")]).await;
    agent.wait_for("a first config", |_| true).await;
    wait_until(
        "agent health to turn SERVING",
        Duration::from_secs(10),
        || {
            let url = url.clone();
            async move { health(url, "").await == ServingStatus::Serving as i32 }
        },
    )
    .await;
}
