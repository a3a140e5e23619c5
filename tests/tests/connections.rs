//! The HTTP door holds: a request head that dribbles in is cut off at the
//! header timeout, idle connections close at the idle timeout, and at the
//! connection limit idle connections make room while, when every
//! connection has a call in flight, new ones are refused with a 503 and
//! the calls in flight finish.

use std::net::SocketAddr;
use std::time::Duration;

use spillway_agent::net::serve::ConnLimits;
use spillway_tests::cluster::Http;
use spillway_tests::sim::SimConfig;
use spillway_tests::{AgentOptions, ControlPlane, TestAgent, TestSim, model_server, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROFILE: &str = "us.llama-3.1-8b";
const MODEL: &str = "llama-3.1-8b";

struct Door {
    _cp: ControlPlane,
    sim: TestSim,
    agent: TestAgent,
    _dir: tempfile::TempDir,
}

async fn door(limits: ConnLimits, sim: SimConfig) -> Door {
    let cp = ControlPlane::start(None, "cp").await;
    cp.create_region("us-east", "us").await;
    cp.create_profile(PROFILE, &["us-east"]).await;
    let sim = TestSim::start(sim).await;
    let dir = tempfile::tempdir().unwrap();
    let planes = [cp.url()];
    let mut opts = AgentOptions::new("east-1", "us-east", &planes, dir.path());
    opts.model_servers = vec![model_server(sim.addr, &[MODEL], 64)];
    opts.conn_limits = limits;
    opts.upstream_timeout = Duration::from_secs(30);
    let agent = TestAgent::start_with(opts).await;
    agent
        .wait_for("the profile", |c| c.profiles.contains_key(PROFILE))
        .await;
    Door {
        _cp: cp,
        sim,
        agent,
        _dir: dir,
    }
}

/// Reads until the peer closes (or `within` passes: then `None`), and what
/// was read.
async fn read_to_close(tcp: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn chat(stream: bool) -> String {
    serde_json::json!({
        "model": PROFILE,
        "messages": [{"role": "user", "content": "hello"}],
        "stream": stream,
    })
    .to_string()
}

/// A raw HTTP/1.1 call on a connection of its own.
async fn raw_call(addr: SocketAddr, stream: bool) -> TcpStream {
    let body = chat(stream);
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: spillway\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(body.as_bytes()).await.unwrap();
    tcp
}

/// A GET on a connection of its own that the agent closes after the
/// answer (so that no pooled connection holds a place); the answer.
async fn get_once(addr: SocketAddr, path: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nhost: spillway\r\nconnection: close\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let got = read_to_close(&mut tcp, Duration::from_secs(30))
        .await
        .expect("an answer, then the close");
    String::from_utf8_lossy(&got).into_owned()
}

async fn closed_for(agent: &TestAgent, reason: &str) -> f64 {
    let text = get_once(agent.http, "/metrics").await;
    let series = format!("spillway_agent_connections_closed_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn slow_heads_and_idle_connections_are_closed_at_their_timeouts() {
    let limits = ConnLimits {
        header_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(8),
        ..ConnLimits::default()
    };
    let d = door(limits, SimConfig::default()).await;
    let addr = d.agent.http;
    // Opened first, checked last: one connection with nothing sent, one
    // with a finished call (kept alive).
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut kept = raw_call(addr, false).await;

    // A head that dribbles in, a byte every 200 ms, never ending: cut off
    // at the header timeout (1 s), well before the idle one (8 s).
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut sent = 0;
    let cut = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a dribbling head was never cut off ({sent} bytes sent)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        if slow.write_all(b"x").await.is_err() {
            break true;
        }
        sent += 1;
        // The close shows on the read side first.
        let mut buf = [0u8; 64];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await
        {
            break true;
        }
    };
    assert!(cut);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(950),
        "cut off before the header timeout, after {took:?}"
    );
    assert!(
        took < Duration::from_secs(6),
        "cut off at {took:?}: by the idle timeout, not the header timeout"
    );

    // Connected, nothing sent: closed once idle.
    let read = read_to_close(&mut silent, Duration::from_secs(30)).await;
    assert_eq!(read, Some(Vec::new()), "an idle connection stayed open");

    // A finished call on a keep-alive connection: closed once idle, after
    // its whole answer.
    let read = read_to_close(&mut kept, Duration::from_secs(30))
        .await
        .expect("a keep-alive connection closed once idle");
    let text = String::from_utf8_lossy(&read);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("chat.completion"), "{text}");

    assert!(closed_for(&d.agent, "header_timeout").await >= 1.0);
    assert!(closed_for(&d.agent, "idle").await >= 2.0);
    // Nothing else lost: the door still serves calls.
    let a = Http::default()
        .post(addr, "/v1/chat/completions", chat(false))
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
}

#[tokio::test]
async fn at_the_connection_limit_idle_ones_make_room_and_busy_ones_are_kept() {
    let limits = ConnLimits {
        max_connections: 6,
        ..ConnLimits::default()
    };
    // Each streamed answer takes ten seconds or so: long enough to hold
    // the connections while the test looks.
    let sim = SimConfig {
        inter_token: Duration::from_millis(100),
        output_tokens: 100,
        ..SimConfig::default()
    };
    let d = door(limits, sim).await;
    let addr = d.agent.http;

    // Six idle connections fill the door; a new one still gets in, and
    // an idle one is closed to make room.
    let mut idle = Vec::new();
    for _ in 0..6 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // (The listener takes connections in order: the six are in before the
    // seventh.)
    // (Connections idle for under a second are left alone: a client may
    // be about to use one. Until they are older, a new one is refused.)
    wait_until(
        "a new connection to get in past six idle ones",
        Duration::from_secs(20),
        || async { get_once(addr, "/health").await.starts_with("HTTP/1.1 200") },
    )
    .await;
    assert!(closed_for(&d.agent, "evicted").await >= 1.0);
    drop(idle);

    // Six calls in flight hold every connection: the seventh is refused
    // with a 503 and a reason, and the six finish.
    let mut busy = Vec::new();
    for _ in 0..6 {
        busy.push(raw_call(addr, true).await);
    }
    wait_until(
        "six calls in flight at the model server",
        Duration::from_secs(20),
        || async {
            d.sim
                .state
                .in_flight
                .load(std::sync::atomic::Ordering::Relaxed)
                == 6
        },
    )
    .await;
    let mut seventh = TcpStream::connect(addr).await.unwrap();
    let refused = read_to_close(&mut seventh, Duration::from_secs(10))
        .await
        .expect("the connection over the limit closed");
    let text = String::from_utf8_lossy(&refused);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("\"code\":\"overloaded\""), "{text}");
    for mut call in busy {
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !String::from_utf8_lossy(&got).contains("[DONE]") {
            match tokio::time::timeout_at(deadline, call.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                other => panic!(
                    "a call in flight did not finish ({other:?}): {}",
                    String::from_utf8_lossy(&got)
                ),
            }
        }
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
        drop(call);
    }
    // With room again: the refusal was counted, and new connections are
    // served.
    assert!(closed_for(&d.agent, "limit").await >= 1.0);
    let h = Http::default().get(addr, "/health").await;
    assert_eq!(h.status, 200, "{}", h.text());
}

#[tokio::test]
async fn the_grpc_port_closes_silent_connections_and_refuses_past_its_limit() {
    let limits = ConnLimits {
        header_timeout: Duration::from_secs(3),
        max_connections: 3,
        ..ConnLimits::default()
    };
    let d = door(limits, SimConfig::default()).await;
    let addr = d.agent.addr;

    // Three silent connections take every place: a fourth is closed at
    // once, long before the silent ones time out.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    let refused = read_to_close(&mut fourth, Duration::from_secs(2)).await;
    assert_eq!(
        refused,
        Some(Vec::new()),
        "the fourth connection stayed open"
    );
    // The silent ones are closed at the timeout (after the server's own
    // HTTP/2 SETTINGS, which it sends first).
    for tcp in &mut silent {
        let read = read_to_close(tcp, Duration::from_secs(30)).await;
        assert!(read.is_some(), "a silent connection stayed open");
    }
    drop(silent);
    // With room again, gRPC is served.
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("a gRPC connection");
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("a health answer")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}
