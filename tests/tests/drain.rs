//! SIGTERM drains an agent without loss: the calls it answered are all in
//! its audit log, synced before it exits, and calls in flight at the
//! signal finish and are audited too; no new connection is taken after it.

use std::time::Duration;

use spillway_tests::cluster::Http;
use spillway_tests::sim::SimConfig;
use spillway_tests::{AgentProcess, ControlPlane, TestSim, wait_until};

const PROFILE: &str = "us.llama-3.1-8b";
const MODEL: &str = "llama-3.1-8b";

fn chat(stream: bool) -> String {
    serde_json::json!({
        "model": PROFILE,
        "messages": [{"role": "user", "content": "hello"}],
        "stream": stream,
    })
    .to_string()
}

fn audit_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        out.extend(
            text.lines()
                .map(|l| serde_json::from_str(l).expect("an audit line is JSON")),
        );
    }
    out
}

async fn sigterm_and_wait(agent: &mut AgentProcess) -> std::process::ExitStatus {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &agent.pid().to_string()])
        .status()
        .expect("running kill");
    assert!(sent.success(), "could not SIGTERM the agent");
    tokio::time::timeout(Duration::from_secs(60), agent.child.wait())
        .await
        .expect("the agent exits after draining")
        .expect("its exit status")
}

struct Setup {
    cp: ControlPlane,
    sim: TestSim,
    audit: tempfile::TempDir,
}

async fn setup(sim: SimConfig) -> Setup {
    let cp = ControlPlane::start(None, "cp").await;
    cp.create_region("us-east", "us").await;
    cp.create_profile(PROFILE, &["us-east"]).await;
    Setup {
        cp,
        sim: TestSim::start(sim).await,
        audit: tempfile::tempdir().unwrap(),
    }
}

async fn agent(s: &Setup) -> AgentProcess {
    let server = format!(
        "http://{},models={MODEL},capacity=64,static,metrics=none",
        s.sim.addr
    );
    let audit = s.audit.path().to_str().unwrap().to_string();
    let agent = AgentProcess::start_with(
        "east-0",
        "us-east",
        &[s.cp.url()],
        &[server],
        &[
            "--allow-anonymous",
            "--audit-dir",
            &audit,
            "--drain-secs",
            "30",
        ],
    )
    .await;
    // Ready once it serves the profile.
    let http = Http::default();
    wait_until(
        "the agent to serve the profile",
        Duration::from_secs(20),
        || {
            let http = http.clone();
            async move {
                http.post(agent.http, "/v1/chat/completions", chat(false))
                    .await
                    .status
                    == 200
            }
        },
    )
    .await;
    // The probes' records are written (in order: the last is the 200).
    wait_until(
        "the probes' audit records",
        Duration::from_secs(10),
        || async {
            audit_lines(s.audit.path())
                .last()
                .is_some_and(|r| r["status"] == 200)
        },
    )
    .await;
    agent
}

#[tokio::test]
async fn n_calls_then_sigterm_leave_n_audit_records() {
    let s = setup(SimConfig::default()).await;
    let mut agent = agent(&s).await;
    let before = audit_lines(s.audit.path()).len();
    // A burst of 40 calls, and the signal the moment the last is answered.
    let http = Http::default();
    let mut calls = Vec::new();
    for _ in 0..40 {
        let (http, addr) = (http.clone(), agent.http);
        calls.push(tokio::spawn(async move {
            http.post(addr, "/v1/chat/completions", chat(false))
                .await
                .status
        }));
    }
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    let status = sigterm_and_wait(&mut agent).await;
    assert!(status.success(), "{status:?}; log: {}", agent.log());
    let records = audit_lines(s.audit.path());
    assert_eq!(
        records.len() - before,
        40,
        "every answered call is audited; log: {}",
        agent.log()
    );
    assert!(records[before..].iter().all(|r| r["status"] == 200));
}

#[tokio::test]
async fn calls_in_flight_at_sigterm_finish_and_are_audited() {
    // Streamed answers of about five seconds each.
    let s = setup(SimConfig {
        inter_token: Duration::from_millis(100),
        output_tokens: 50,
        ..SimConfig::default()
    })
    .await;
    let mut agent = agent(&s).await;
    let before = audit_lines(s.audit.path()).len();
    let http = Http::default();
    let mut calls = Vec::new();
    for _ in 0..12 {
        let (http, addr) = (http.clone(), agent.http);
        calls.push(tokio::spawn(async move {
            let mut answer = http
                .post_streaming(addr, "/v1/chat/completions", chat(true))
                .await;
            let status = answer.status.as_u16();
            let mut body = Vec::new();
            while let Some(Ok(piece)) = answer.next().await {
                body.extend_from_slice(&piece);
            }
            (status, String::from_utf8_lossy(&body).contains("[DONE]"))
        }));
    }
    wait_until(
        "twelve calls in flight at the model server",
        Duration::from_secs(20),
        || async {
            s.sim
                .state
                .in_flight
                .load(std::sync::atomic::Ordering::Relaxed)
                == 12
        },
    )
    .await;
    let addr = agent.http;
    let status = {
        let term = sigterm_and_wait(&mut agent);
        tokio::pin!(term);
        // While it drains, it takes no new connection.
        let refused = async {
            loop {
                if tokio::net::TcpStream::connect(addr).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            status = &mut term => panic!("it exited ({status:?}) before it was seen refusing connections"),
            _ = refused => term.await,
        }
    };
    assert!(status.success(), "{status:?}; log: {}", agent.log());
    for c in calls {
        let (code, done) = c.await.unwrap();
        assert_eq!(code, 200);
        assert!(done, "a call in flight at SIGTERM was cut");
    }
    let records = audit_lines(s.audit.path());
    assert_eq!(
        records.len() - before,
        12,
        "every call in flight is audited; log: {}",
        agent.log()
    );
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
