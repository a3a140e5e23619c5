//! Model servers found through DNS: `--model-server http://NAME:PORT,...,dns`
//! follows NAME's addresses (a Kubernetes headless Service's pods), asked
//! of a nameserver the test controls (`--dns-server`). Addresses that
//! appear join (and their engine metrics are scraped, each pod's own);
//! addresses that go take no new calls while the calls they hold finish;
//! a nameserver that fails keeps the last addresses; a name that no longer
//! exists leaves the region without servers until it comes back.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures_util::future::join_all;
use spillway_tests::cluster::{Http, US, chat};
use spillway_tests::dns::{Reply, TestDns};
use spillway_tests::sim::{Engine, SimConfig};
use spillway_tests::{AgentProcess, ControlPlane, TestSim, wait_until};

const NAME: &str = "vllm.models.test";
const POD_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const WAIT: Duration = Duration::from_secs(30);

fn engine() -> SimConfig {
    SimConfig {
        engine: Engine::Vllm,
        ..SimConfig::default()
    }
}

/// Two vLLM simulators on one port of two loopback addresses: two pods
/// of one Service.
async fn two_pods() -> (TestSim, TestSim, u16) {
    for _ in 0..50 {
        let a = TestSim::start_at(engine(), SocketAddr::new(IpAddr::V4(POD_A), 0))
            .await
            .expect("a listener on 127.0.0.2");
        let port = a.addr.port();
        if let Ok(b) = TestSim::start_at(engine(), SocketAddr::new(IpAddr::V4(POD_B), port)).await {
            return (a, b, port);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

async fn call(http: &Http, door: SocketAddr, stream: bool) -> (u16, String) {
    let answer = http
        .post(door, "/v1/chat/completions", chat(US, stream))
        .await;
    (answer.status.as_u16(), answer.text())
}

#[tokio::test]
async fn model_servers_behind_a_name_join_and_leave_as_its_records_change() {
    let dns = TestDns::start().await;
    let (a, b, port) = two_pods().await;
    dns.set(NAME, Reply::Addresses(vec![POD_A]));
    let cp = ControlPlane::start(None, "cp").await;
    cp.create_region("us-east", "us").await;
    cp.create_profile(US, &["us-east"]).await;
    let server = format!("http://{NAME}:{port},models=llama-3.1-8b,dns");
    let resolver = dns.addr.to_string();
    let agent = AgentProcess::start_with(
        "east-0",
        "us-east",
        &[cp.url()],
        &[server],
        &[
            "--allow-anonymous",
            "--dns-server",
            &resolver,
            "--dns-refresh-ms",
            "100",
        ],
    )
    .await;
    let (http, door) = (Http::default(), agent.http);
    wait_until("the profile routed", WAIT, || async {
        call(&http, door, false).await.0 == 200
    })
    .await;

    // One address: every call goes to pod A, whose metrics are scraped.
    for _ in 0..10 {
        assert_eq!(call(&http, door, false).await.0, 200);
    }
    assert_eq!(b.served(), 0);
    assert!(a.state.metrics_served() > 0, "pod A's engine metrics");
    assert_eq!(b.state.metrics_served(), 0);

    // Pod B appears: it gets calls, and its own metrics are read.
    dns.set(NAME, Reply::Addresses(vec![POD_A, POD_B]));
    wait_until("calls reach pod B", WAIT, || async {
        call(&http, door, false).await;
        b.served() > 0
    })
    .await;
    wait_until("pod B's engine metrics read", WAIT, || async {
        b.state.metrics_served() > 0
    })
    .await;

    // Pod A goes while it holds streams: they finish, and no new call
    // reaches it.
    for sim in [&a, &b] {
        sim.state
            .set(|c| c.inter_token = Duration::from_millis(100));
    }
    let streams = tokio::spawn(async move {
        let http = Http::default();
        join_all((0..8).map(|_| call(&http, door, true))).await
    });
    wait_until("a stream running on pod A", WAIT, || async {
        a.state.in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0
    })
    .await;
    dns.set(NAME, Reply::Addresses(vec![POD_B]));
    for sim in [&a, &b] {
        sim.state.set(|c| c.inter_token = Duration::ZERO);
    }
    wait_until(
        "twenty calls in a row that pod A does not see",
        WAIT,
        || async {
            let before = a.state.received.load(std::sync::atomic::Ordering::Relaxed);
            for _ in 0..20 {
                assert_eq!(call(&http, door, false).await.0, 200);
            }
            a.state.received.load(std::sync::atomic::Ordering::Relaxed) == before
        },
    )
    .await;
    for (status, body) in streams.await.unwrap() {
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("[DONE]"), "a stream cut short: {body}");
    }

    // The nameserver fails, loses the A query only, then says nothing: pod
    // B stays. (A lookup is an A and an AAAA query, each sent twice when
    // unanswered: eight more queries mean a whole lookup came back.)
    for reply in [Reply::ServFail, Reply::AFails, Reply::Silent] {
        dns.set(NAME, reply);
        let asked = dns.asked(NAME);
        wait_until("a whole lookup more", WAIT, || async {
            dns.asked(NAME) >= asked + 8
        })
        .await;
        let served = b.served();
        for _ in 0..5 {
            assert_eq!(call(&http, door, false).await.0, 200);
        }
        assert_eq!(b.served(), served + 5);
    }
    assert!(
        agent.log().contains("cannot resolve a model server's name"),
        "{}",
        agent.log()
    );

    // The name is gone (the Deployment scaled to zero): no server is left,
    // and calls fail with the reason. Then it comes back, with pod A.
    dns.set(NAME, Reply::NxDomain);
    wait_until("calls refused for want of a server", WAIT, || async {
        let (status, body) = call(&http, door, false).await;
        status == 503 && body.contains("us-east: unavailable")
    })
    .await;
    let served = a.served();
    dns.set(NAME, Reply::Addresses(vec![POD_A]));
    wait_until("calls served by pod A again", WAIT, || async {
        call(&http, door, false).await.0 == 200 && a.served() > served
    })
    .await;
}
