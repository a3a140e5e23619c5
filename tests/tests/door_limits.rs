//! The doors' limits on what a client sends, against a real agent process
//! started with the flags an operator sets: an HTTP body over
//! `--max-body-bytes` gets 413 (before it is sent when `Content-Length`
//! says so, and delivered, not reset, when it is sent anyway), a body that
//! does not arrive within `--body-read-timeout-secs` gets 408, a gRPC
//! message over the limit gets RESOURCE_EXHAUSTED naming it, and a wrong
//! method gets 405 in the API's error shape. After each, the agent still
//! serves a normal call.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use spillway_proto::pb::{
    self, inference_service_client::InferenceServiceClient,
    relay_service_client::RelayServiceClient,
};
use spillway_tests::cluster::{Http, MODEL, US, chat};
use spillway_tests::sim::SimConfig;
use spillway_tests::{AgentProcess, ControlPlane, TestSim, wait_until};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

/// The agent's body limit, and its body read timeout.
const LIMIT: usize = 64 * 1024;
const BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// Any one exchange in these tests is over well within this.
const BOUND: Duration = Duration::from_secs(10);

/// A control plane, one model server and a us-east agent process serving
/// `US` with the limits above.
struct Fixture {
    _cp: ControlPlane,
    _sim: TestSim,
    agent: AgentProcess,
    http: Http,
}

impl Fixture {
    async fn start() -> Fixture {
        let cp = ControlPlane::start(None, "cp").await;
        cp.create_region("us-east", "us").await;
        cp.create_profile(US, &["us-east"]).await;
        let sim = TestSim::start(SimConfig::default()).await;
        let server = format!(
            "http://{},models={MODEL},capacity=64,static,metrics=none",
            sim.addr
        );
        let (limit, timeout) = (LIMIT.to_string(), BODY_TIMEOUT.as_secs().to_string());
        let agent = AgentProcess::start_with(
            "east-0",
            "us-east",
            &[cp.url()],
            &[server],
            &[
                "--allow-anonymous",
                "--max-body-bytes",
                &limit,
                "--body-read-timeout-secs",
                &timeout,
            ],
        )
        .await;
        let f = Fixture {
            _cp: cp,
            _sim: sim,
            agent,
            http: Http::default(),
        };
        wait_until(
            "the agent serves calls",
            Duration::from_secs(20),
            || async {
                f.http
                    .post(f.agent.http, "/v1/chat/completions", chat(US, false))
                    .await
                    .status
                    == 200
            },
        )
        .await;
        f
    }

    /// A normal call still works: nothing the refusals did was lost.
    async fn still_serves(&self) {
        let ok = self
            .http
            .post(self.agent.http, "/v1/chat/completions", chat(US, false))
            .await;
        assert_eq!(ok.status, 200, "{}", ok.text());
    }
}

/// A request head for `POST /v1/chat/completions` with `extra` headers.
fn head(extra: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: agent\r\ncontent-type: application/json\r\n{extra}\r\n"
    )
}

/// A whole request body over the limit, as JSON.
fn big_body(bytes: usize) -> Vec<u8> {
    let filler = "x".repeat(bytes);
    serde_json::json!({"model": US, "messages": [{"role": "user", "content": filler}]})
        .to_string()
        .into_bytes()
}

/// An HTTP/1.1 answer read off a raw connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header lines, names lower-cased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The OpenAI-style error's code, after checking the shape.
    fn error_code(&self) -> String {
        let e = self.json();
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        assert!(e["error"]["message"].as_str().is_some(), "{e}");
        e["error"]["code"].as_str().unwrap_or_default().to_string()
    }
}

/// Reads one answer (head and `content-length` body) within `BOUND`.
async fn read_answer(r: &mut (impl AsyncRead + Unpin)) -> Answer {
    tokio::time::timeout(BOUND, async {
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = r.read(&mut chunk).await.expect("reading the answer");
            assert!(
                n > 0,
                "the connection closed before an answer: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let text = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut lines = text.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no content-length: {text}"));
        let mut body = buf[end..].to_vec();
        while body.len() < len {
            let mut chunk = [0u8; 4096];
            let n = r.read(&mut chunk).await.expect("reading the body");
            assert!(n > 0, "the connection closed inside the body");
            body.extend_from_slice(&chunk[..n]);
        }
        Answer {
            status,
            headers,
            body,
        }
    })
    .await
    .expect("an answer in time")
}

/// The agent closes the connection (FIN, not a reset) within `BOUND`.
async fn closed_cleanly(r: &mut (impl AsyncRead + Unpin)) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(BOUND, r.read_to_end(&mut rest))
        .await
        .expect("the agent closes the connection in time");
    assert!(read.is_ok(), "a reset, not a close: {read:?}");
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connecting")
}

#[tokio::test]
async fn http_limits_are_answered_in_json_and_delivered() {
    let f = Fixture::start().await;
    let door = f.agent.http;

    // Too large by Content-Length: 413 with nothing of the body sent.
    let mut s = connect(door).await;
    s.write_all(head("content-length: 10000000\r\n").as_bytes())
        .await
        .unwrap();
    let a = read_answer(&mut s).await;
    assert_eq!(a.status, 413, "{a:?}");
    assert_eq!(a.error_code(), "request_too_large");
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&LIMIT.to_string()),
        "{a:?}"
    );
    assert_eq!(a.header("connection"), Some("close"), "{a:?}");
    closed_cleanly(&mut s).await;
    f.still_serves().await;

    // The same with `Expect: 100-continue`: the client is never asked for
    // the body; the 413 is the first and only answer.
    let mut s = connect(door).await;
    s.write_all(head("content-length: 10000000\r\nexpect: 100-continue\r\n").as_bytes())
        .await
        .unwrap();
    let a = read_answer(&mut s).await;
    assert_eq!(a.status, 413, "{a:?}");
    assert_eq!(a.error_code(), "request_too_large");
    closed_cleanly(&mut s).await;
    f.still_serves().await;

    // A body within the limit with `Expect: 100-continue` is asked for.
    let mut s = connect(door).await;
    let body = chat(US, false);
    let extra = format!("content-length: {}\r\nexpect: 100-continue\r\n", body.len());
    s.write_all(head(&extra).as_bytes()).await.unwrap();
    let mut first = [0u8; 25];
    tokio::time::timeout(BOUND, s.read_exact(&mut first))
        .await
        .expect("100 Continue in time")
        .unwrap();
    assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body.as_bytes()).await.unwrap();
    assert_eq!(read_answer(&mut s).await.status, 200);

    // Too large and sent anyway, declared or chunked, by a client that
    // writes the whole body before it reads: it gets the 413, not a reset,
    // every time (a reset is a race, so several tries). The body is more
    // than the kernel buffers hold, so the client is still writing when
    // the answer comes.
    let body = big_body(8 * 1024 * 1024);
    let mut chunked = Vec::new();
    for piece in body.chunks(8 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    for i in 0..5 {
        for (how, extra, payload) in [
            (
                "declared",
                format!("content-length: {}\r\n", body.len()),
                &body,
            ),
            (
                "chunked",
                "transfer-encoding: chunked\r\n".to_string(),
                &chunked,
            ),
        ] {
            let mut s = connect(door).await;
            let mut request = head(&extra).into_bytes();
            request.extend_from_slice(payload);
            let sent = tokio::time::timeout(BOUND, s.write_all(&request))
                .await
                .expect("the body is taken in time");
            assert!(sent.is_ok(), "try {i}, {how}: sending failed: {sent:?}");
            let a = read_answer(&mut s).await;
            assert_eq!(a.status, 413, "try {i}, {how}: {a:?}");
            assert_eq!(a.error_code(), "request_too_large");
            assert_eq!(a.header("connection"), Some("close"), "{a:?}");
            closed_cleanly(&mut s).await;
        }
    }
    f.still_serves().await;

    // A body that stops coming: 408 at the timeout, and the connection is
    // closed.
    let mut s = connect(door).await;
    s.write_all(head("content-length: 1000\r\n").as_bytes())
        .await
        .unwrap();
    s.write_all(br#"{"model": "#).await.unwrap();
    let started = Instant::now();
    let a = read_answer(&mut s).await;
    let waited = started.elapsed();
    assert_eq!(a.status, 408, "{a:?}");
    assert_eq!(a.error_code(), "request_timeout");
    assert_eq!(a.header("connection"), Some("close"), "{a:?}");
    assert!(
        waited >= BODY_TIMEOUT - Duration::from_millis(100) && waited < BODY_TIMEOUT * 4,
        "answered after {waited:?}"
    );
    closed_cleanly(&mut s).await;
    f.still_serves().await;
}

#[tokio::test]
async fn a_wrong_method_gets_405_in_the_apis_error_shape_on_every_route() {
    let f = Fixture::start().await;
    let door = f.agent.http;
    let post_only = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
    ];
    let get_only = ["/v1/models", "/health", "/metrics"];
    let cases = post_only
        .iter()
        .flat_map(|p| ["GET", "PUT", "DELETE", "PATCH"].map(|m| (m, *p)))
        .chain(
            get_only
                .iter()
                .flat_map(|p| ["POST", "PUT", "DELETE", "PATCH"].map(|m| (m, *p))),
        );
    for (method, path) in cases {
        // With a body, which the refusal does not read.
        let mut s = connect(door).await;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: agent\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
        );
        s.write_all(request.as_bytes()).await.unwrap();
        let a = read_answer(&mut s).await;
        assert_eq!(a.status, 405, "{method} {path}: {a:?}");
        assert_eq!(a.header("content-type"), Some("application/json"));
        let e = a.json();
        let message = if path == "/v1/messages" {
            // Anthropic's shape under its path.
            assert_eq!(e["type"], "error", "{method} {path}: {e}");
            e["error"]["message"].as_str()
        } else {
            assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
            e["error"]["message"].as_str()
        };
        let message = message.unwrap_or_else(|| panic!("{method} {path}: no message: {e}"));
        assert!(
            message.contains(method) && message.contains(path),
            "{method} {path}: {message}"
        );
    }
    // The right method is served.
    let models = f.http.get(door, "/v1/models").await;
    assert_eq!(models.status, 200, "{}", models.text());
    f.still_serves().await;
}

fn converse(text: String) -> pb::ConverseRequest {
    pb::ConverseRequest {
        model_id: US.into(),
        messages: vec![pb::Message {
            role: pb::Role::User.into(),
            content: vec![pb::ContentBlock {
                block: Some(pb::content_block::Block::Text(text)),
            }],
        }],
        inference_config: Some(pb::InferenceConfig {
            max_tokens: Some(3),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn an_oversize_grpc_message_gets_resource_exhausted_naming_the_limit() {
    let f = Fixture::start().await;
    let url = format!("http://{}", f.agent.grpc);
    let mut client = InferenceServiceClient::connect(url.clone()).await.unwrap();
    // A Converse message may be --max-body-bytes, and at least 4 MiB (an
    // image is raw bytes there, base64 in the HTTP body the door builds,
    // which --max-body-bytes then bounds, naming the field).
    let grpc_limit = LIMIT.max(4 * 1024 * 1024);
    let big = || converse("x".repeat(grpc_limit + 1024));
    let s = client.converse(big()).await.expect_err("too large");
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    assert!(
        s.message().contains(&grpc_limit.to_string()),
        "{}",
        s.message()
    );
    // What tells it from a throttle.
    let marked = s.metadata().get("x-spillway-too-large");
    let limit = grpc_limit.to_string();
    assert_eq!(marked.and_then(|v| v.to_str().ok()), Some(limit.as_str()));
    let s = client.converse_stream(big()).await.expect_err("too large");
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    // A message under both limits is taken, on the same connection.
    let fits = converse("x".repeat(LIMIT / 2));
    let ok = client.converse(fits).await;
    assert!(ok.is_ok(), "{ok:?}");

    // The relay's limit is its own (64 MiB), refused the same way, before
    // it asks who is calling.
    let relay_limit = 64 * 1024 * 1024;
    let mut relay = RelayServiceClient::connect(url)
        .await
        .unwrap()
        .max_encoding_message_size(usize::MAX);
    let s = relay
        .relay(pb::RelayRequest {
            source_region: "us-west".into(),
            profile: US.into(),
            model: MODEL.into(),
            body: vec![b'x'; relay_limit + 1].into(),
            ..Default::default()
        })
        .await
        .expect_err("too large");
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    assert!(
        s.message().contains(&relay_limit.to_string()),
        "{}",
        s.message()
    );
    f.still_serves().await;
}
