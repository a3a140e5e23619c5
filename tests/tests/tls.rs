//! TLS on every hop, with identities from certificates: the control plane
//! and agents over mutual TLS, the front doors over TLS, spillctl with an
//! admin certificate or the admin token. A certificate for one region
//! cannot say hello as another; the relay takes only agent certificates of
//! the deployment's CA; without TLS or `--insecure-dev` nothing starts.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rustls::pki_types::pem::PemObject;
use spillway_core::tls::{TlsFiles, admin_uri, agent_uri, control_plane_uri};
use spillway_proto::pb::relay_service_client::RelayServiceClient;
use spillway_proto::pb::{self, control_service_client::ControlServiceClient};
use spillway_tests::certs::DevCa;
use spillway_tests::cluster::{US, chat};
use spillway_tests::sim::SimConfig;
use spillway_tests::{AgentOptions, ControlPlane, TestAgent, TestSim, bin, model_server};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    _dir: tempfile::TempDir,
    cp: TlsFiles,
    east: TlsFiles,
    west: TlsFiles,
    eu: TlsFiles,
    admin: TlsFiles,
    /// Same names, another CA.
    rogue_east: TlsFiles,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new(&dir.path().join("ca"), "test CA").unwrap();
    let rogue = DevCa::new(&dir.path().join("rogue"), "rogue CA").unwrap();
    Pki {
        cp: ca.issue("cp", &control_plane_uri("cp")).unwrap(),
        east: ca.issue("east", &agent_uri("us-east", "e1")).unwrap(),
        west: ca.issue("west", &agent_uri("us-west", "w1")).unwrap(),
        eu: ca.issue("eu", &agent_uri("eu-west", "u1")).unwrap(),
        admin: ca.issue("admin", &admin_uri("ops")).unwrap(),
        rogue_east: rogue.issue("east", &agent_uri("us-east", "e1")).unwrap(),
        _dir: dir,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn spillctl(cp: &ControlPlane, auth: &[&str], args: &[&str]) -> (bool, String) {
    let (ok, out, err) = cp.spillctl(&[auth, args].concat()).await;
    (ok, out + &err)
}

async fn channel(addr: SocketAddr, ca: &Path, id: Option<&TlsFiles>) -> Result<Channel, String> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some(f) = id {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&f.cert).unwrap(),
            std::fs::read(&f.key).unwrap(),
        ));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// A TLS client of the HTTP door that trusts `ca`.
fn door_client(ca: &Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A POST over HTTPS that trusts `ca`.
async fn https_post(addr: SocketAddr, ca: &Path, body: String) -> (u16, Option<String>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = door_client(ca)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("a TLS handshake with the HTTP door");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/v1/chat/completions")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let region = resp
        .headers()
        .get("x-spillway-inference-region")
        .map(|v| v.to_str().unwrap().to_string());
    let _ = resp.into_body().collect().await;
    (status, region)
}

/// The flags that give a binary these TLS files.
fn tls_flags(files: &TlsFiles) -> [&str; 6] {
    [
        "--tls-ca",
        s(&files.ca),
        "--tls-cert",
        s(&files.cert),
        "--tls-key",
        s(&files.key),
    ]
}

/// Regions us-east and us-west (and eu-west), the US profile, and a route
/// that sends us-east's calls to us-west, written with the operator's
/// certificate.
async fn seed(cp: &ControlPlane, pki: &Pki, with_eu: bool) {
    let admin = tls_flags(&pki.admin);
    let mut writes = vec![
        &["regions", "create", "us-east", "-g", "us"][..],
        &["regions", "create", "us-west", "-g", "us"][..],
        &[
            "profiles",
            "create",
            US,
            "--destinations",
            "us-east,us-west",
        ][..],
        &[
            "routes",
            "set",
            US,
            "--source",
            "us-east",
            "--dest",
            "us-west=1",
        ][..],
    ];
    if with_eu {
        writes.insert(2, &["regions", "create", "eu-west", "-g", "eu"][..]);
    }
    for args in writes {
        let (ok, out) = spillctl(cp, &admin, args).await;
        assert!(ok, "{out}");
    }
}

async fn tls_agent(
    id: &str,
    region: &str,
    cp: &ControlPlane,
    files: &TlsFiles,
    sim: &TestSim,
    dir: &Path,
) -> TestAgent {
    let planes = [cp.url()];
    let mut opts = AgentOptions::new(id, region, &planes, dir);
    opts.model_servers = vec![model_server(sim.addr, &["llama-3.1-8b"], 64)];
    opts.tls = Some(files.clone());
    TestAgent::start_with(opts).await
}

#[tokio::test]
async fn every_hop_is_tls_and_identities_come_from_certificates() {
    let pki = pki();
    let cp = tls_control_plane(&pki, &["--admin-token", "s3cret-s3cret-s3cret"]).await;
    assert!(cp.url().starts_with("https://"));

    // spillctl: an admin certificate, or the admin token; nothing else.
    seed(&cp, &pki, false).await;
    let ca_only = ["--tls-ca", s(&pki.admin.ca)];
    let (ok, out) = spillctl(&cp, &ca_only, &["regions", "list"]).await;
    assert!(!ok && out.contains("admin certificate"), "{out}");
    let (ok, out) = spillctl(
        &cp,
        &[&ca_only[..], &["--token", "wrong-token-of-16+"]].concat(),
        &["regions", "list"],
    )
    .await;
    assert!(!ok && out.contains("admin certificate"), "{out}");
    let (ok, out) = spillctl(
        &cp,
        &[&ca_only[..], &["--token", "s3cret-s3cret-s3cret"]].concat(),
        &["regions", "list"],
    )
    .await;
    assert!(ok && out.contains("us-west"), "{out}");
    // An agent's certificate is no admin certificate.
    let as_agent = tls_flags(&pki.east);
    let (ok, out) = spillctl(&cp, &as_agent, &["regions", "list"]).await;
    assert!(!ok && out.contains("admin certificate"), "{out}");

    // Agents sync over mutual TLS, and relay over it.
    let sim = TestSim::start(SimConfig::default()).await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let west = tls_agent("w1", "us-west", &cp, &pki.west, &sim, d1.path()).await;
    let east = tls_agent("e1", "us-east", &cp, &pki.east, &sim, d2.path()).await;
    east.wait_for("us-west's relay", |c| {
        c.relays.contains_key("us-west") && c.routes.contains_key(US)
    })
    .await;
    west.wait_for("its profile", |c| c.profiles.contains_key(US))
        .await;
    // The HTTP door speaks TLS; the call is relayed to us-west.
    let (status, region) = https_post(east.http, &pki.cp.ca, chat(US, false)).await;
    assert_eq!(status, 200);
    assert_eq!(region.as_deref(), Some("us-west"));
    // Plaintext gets nowhere: not the HTTP door, not the control plane's
    // or the agent's gRPC.
    assert!(plaintext_refused(east.http).await);
    for addr in [cp.addr, east.addr] {
        let plain = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        let status = tonic_health::pb::health_client::HealthClient::new(plain)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await;
        assert!(status.is_err(), "plaintext gRPC to {addr} got an answer");
    }
}

/// Whether a plaintext HTTP request to `addr` fails to get an answer.
async fn plaintext_refused(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
        return true;
    };
    let _ = tcp
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0);
    !String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200")
}

async fn tls_control_plane(pki: &Pki, extra: &[&str]) -> ControlPlane {
    let tls = tls_flags(&pki.cp);
    ControlPlane::start_with(None, "cp", &[&tls[..], extra].concat()).await
}

#[tokio::test]
async fn a_certificate_for_one_region_cannot_say_hello_as_another() {
    let pki = pki();
    let cp = tls_control_plane(&pki, &[]).await;
    let hello = |region: &str, id: &str| pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(pb::Hello {
            agent_id: id.into(),
            region: region.into(),
            relay_address: "127.0.0.1:9".into(),
            current_version: 0,
            agent_build: "test".into(),
            apis: Vec::new(),
            resources: Vec::new(),
        })),
    };
    let sync = |channel: Channel, msg: pb::AgentMessage| async move {
        let mut client = ControlServiceClient::new(channel);
        match client.sync(tokio_stream::iter([msg])).await {
            Err(status) => Err(status),
            Ok(resp) => {
                let mut stream = resp.into_inner();
                match stream.message().await {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => Err(tonic::Status::unknown("ended")),
                    Err(status) => Err(status),
                }
            }
        }
    };
    // us-west's certificate saying hello as an agent of us-east: refused.
    let as_west = channel(cp.addr, &pki.west.ca, Some(&pki.west))
        .await
        .unwrap();
    let status = sync(as_west.clone(), hello("us-east", "w1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("us-west"), "{status:?}");
    // Nor under another agent's id.
    let status = sync(as_west.clone(), hello("us-west", "e1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    // No certificate at all: refused too.
    let anonymous = channel(cp.addr, &pki.cp.ca, None).await.unwrap();
    let status = sync(anonymous, hello("us-west", "w1")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    // Its own name: accepted (the first update arrives).
    sync(as_west, hello("us-west", "w1")).await.unwrap();
    // A certificate of another CA does not get past the handshake.
    let rogue = channel(cp.addr, &pki.rogue_east.ca, Some(&pki.rogue_east)).await;
    assert!(
        rogue.is_err(),
        "another CA's server certificate is not trusted"
    );
}

#[tokio::test]
async fn the_relay_takes_only_agent_certificates_of_the_deployments_ca() {
    let pki = pki();
    let cp = tls_control_plane(&pki, &[]).await;
    let sim = TestSim::start(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let west = tls_agent("w1", "us-west", &cp, &pki.west, &sim, dir.path()).await;
    // Known to us-west's snapshot as an agent of us-east.
    let d2 = tempfile::tempdir().unwrap();
    let east = tls_agent("e1", "us-east", &cp, &pki.east, &sim, d2.path()).await;
    west.wait_for("us-east's agent", |c| c.relays.contains_key("us-east"))
        .await;
    let _ = east;
    let relay = |source: &str| {
        pb::RelayRequest {
        request_id: "r".into(),
        source_region: source.into(),
        profile: "p".into(),
        model: "llama-3.1-8b".into(),
        body: serde_json::to_vec(&serde_json::json!({"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}]})).unwrap().into(),
        stream: false,
        traceparent: String::new(),
        api: String::new(),
        ttft_objective_ms: 0,
    }
    };
    let call = |ch: Channel, req: pb::RelayRequest| async move {
        let mut client = RelayServiceClient::new(ch);
        let mut req = tonic::Request::new(req);
        req.metadata_mut()
            .insert("spillway-source-agent", "us-east/e1".parse().unwrap());
        match client.relay(req).await {
            Ok(resp) => resp.into_inner().message().await.map(|_| ()),
            Err(s) => Err(s),
        }
    };
    // The right agent certificate: served.
    let good = channel(west.addr, &pki.east.ca, Some(&pki.east))
        .await
        .unwrap();
    call(good.clone(), relay("us-east")).await.unwrap();
    // An agent certificate, but claiming another source region: refused.
    let status = call(good, relay("eu-west")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    // No client certificate: refused.
    let none = channel(west.addr, &pki.east.ca, None).await.unwrap();
    let status = call(none, relay("us-east")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // A certificate of the right CA that names no agent: refused.
    let admin = channel(west.addr, &pki.admin.ca, Some(&pki.admin))
        .await
        .unwrap();
    let status = call(admin, relay("us-east")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    // A client certificate from another CA: the handshake fails.
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.east.ca).unwrap()));
    tls = tls.identity(Identity::from_pem(
        std::fs::read(&pki.rogue_east.cert).unwrap(),
        std::fs::read(&pki.rogue_east.key).unwrap(),
    ));
    let rogue = Channel::from_shared(format!("https://{}", west.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = rogue {
        let err = call(ch, relay("us-east")).await.unwrap_err();
        assert_ne!(err.code(), tonic::Code::Ok);
    }
    assert_eq!(
        sim.served(),
        1,
        "only the right certificate's call was served"
    );
}

#[tokio::test]
async fn without_tls_or_insecure_dev_nothing_starts() {
    for (binary, args) in [
        ("spillway-control-plane", vec!["--listen", "127.0.0.1:0"]),
        (
            "spillway-agent",
            vec![
                "--agent-id",
                "a",
                "--region",
                "r",
                "--control-plane",
                "https://127.0.0.1:9",
            ],
        ),
    ] {
        let out = tokio::process::Command::new(bin(binary))
            .args(&args)
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("no TLS identity") && err.contains("--insecure-dev"),
            "{binary}: {err}"
        );
    }
}

#[tokio::test]
async fn the_control_plane_talks_to_etcd_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new(dir.path(), "etcd CA").unwrap();
    let server = ca.issue("etcd", "spiffe://spillway/etcd").unwrap();
    let client = ca.issue("cp-etcd", &control_plane_uri("cp")).unwrap();
    let etcd = spillway_tests::Etcd::start_tls(&server, &client).await;
    assert!(etcd.endpoint.starts_with("https://"));
    let cp = ControlPlane::start_with(
        Some(&etcd.endpoint),
        "cp",
        &[
            "--etcd-ca",
            s(&client.ca),
            "--etcd-cert",
            s(&client.cert),
            "--etcd-key",
            s(&client.key),
        ],
    )
    .await;
    // A write goes through to etcd over TLS.
    cp.create_region("us-east", "us").await;
    // With another CA's client certificate (which also does not trust
    // etcd's), the control plane does not start, and says why.
    let rogue = DevCa::new(&dir.path().join("rogue"), "rogue").unwrap();
    let stranger = rogue.issue("cp", &control_plane_uri("cp")).unwrap();
    let out = tokio::process::Command::new(bin("spillway-control-plane"))
        .args([
            "--insecure-dev",
            "--listen",
            "127.0.0.1:0",
            "--etcd-endpoints",
        ])
        .arg(&etcd.endpoint)
        .args([
            "--etcd-ca",
            s(&stranger.ca),
            "--etcd-cert",
            s(&stranger.cert),
        ])
        .args(["--etcd-key", s(&stranger.key)])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("etcd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_tls_control_plane_refuses_a_plaintext_etcd_unless_told() {
    let pki = pki();
    let etcd = spillway_tests::Etcd::start().await;
    assert!(etcd.endpoint.starts_with("http://"));
    let tls = tls_flags(&pki.cp);
    let out = tokio::process::Command::new(bin("spillway-control-plane"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--etcd-endpoints",
            &etcd.endpoint,
        ])
        .args(tls)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("is plaintext while TLS is on") && err.contains("--allow-plaintext-etcd"),
        "{err}"
    );
    // Told so, it starts (with a warning) and writes through.
    let cp = ControlPlane::start_with(
        Some(&etcd.endpoint),
        "cp",
        &[&tls[..], &["--allow-plaintext-etcd"]].concat(),
    )
    .await;
    let admin = tls_flags(&pki.admin);
    let (ok, _, err) = cp
        .spillctl(&[&admin[..], &["regions", "create", "us-east", "-g", "us"]].concat())
        .await;
    assert!(ok, "{err}");
    assert!(
        etcd.etcdctl(&["get", "/spillway/v1/regions/us-east", "--print-value-only"])
            .await
            .contains("us-east")
    );
    let log = cp.log_text();
    assert!(log.contains("talking to etcd in plaintext"), "{log}");
}

#[tokio::test]
async fn a_relay_goes_only_to_an_agent_of_the_destination_region() {
    let pki = pki();
    let cp = tls_control_plane(&pki, &[]).await;
    seed(&cp, &pki, true).await;
    let (west_sim, eu_sim) = (
        TestSim::start(SimConfig::default()).await,
        TestSim::start(SimConfig::default()).await,
    );
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let eu = tls_agent("u1", "eu-west", &cp, &pki.eu, &eu_sim, dirs[0].path()).await;
    // us-west's agent announces eu-west's agent as its relay address (a
    // mistake, or an attack): calls sent to us-west must not land there.
    let planes = [cp.url()];
    let mut opts = AgentOptions::new("w1", "us-west", &planes, dirs[1].path());
    opts.model_servers = vec![model_server(west_sim.addr, &["llama-3.1-8b"], 64)];
    opts.tls = Some(pki.west.clone());
    opts.relay_address = Some(eu.addr.to_string());
    let _west = TestAgent::start_with(opts).await;
    let mut opts = AgentOptions::new("e1", "us-east", &planes, dirs[2].path());
    opts.model_servers = vec![model_server(west_sim.addr, &["llama-3.1-8b"], 64)];
    opts.tls = Some(pki.east.clone());
    opts.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let east = TestAgent::start_with(opts).await;
    east.wait_for("us-west's relay address", |c| {
        c.relays.contains_key("us-west") && c.routes.contains_key(US)
    })
    .await;
    let (status, region) = https_post(east.http, &pki.cp.ca, chat(US, false)).await;
    assert_ne!(status, 200, "served in {region:?}");
    assert_eq!(eu_sim.served(), 0, "nothing reached eu-west");
    // The relay failed in the handshake: eu-west's certificate is not an
    // agent's of us-west.
    let metrics = spillway_tests::cluster::Http::default()
        .get(east.metrics.expect("a metrics listener"), "/metrics")
        .await
        .text();
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "spillway_agent_relay_errors_total{inference_region=\"us-west\",cause=\"tls\"} "
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn with_tls_a_plaintext_control_plane_url_is_refused() {
    let pki = pki();
    let out = tokio::process::Command::new(bin("spillway-agent"))
        .args(["--agent-id", "e1", "--region", "us-east"])
        .args(["--control-plane", "http://127.0.0.1:9"])
        .args(["--tls-ca", s(&pki.east.ca), "--tls-cert", s(&pki.east.cert)])
        .args(["--tls-key", s(&pki.east.key)])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not https://"), "{err}");
    let out = tokio::process::Command::new(bin("spillctl"))
        .args([
            "--control-plane",
            "http://127.0.0.1:9",
            "--token",
            "a-token-of-sixteen",
        ])
        .args(["regions", "list"])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("only over TLS"),
        "{err}"
    );
}

/// A plaintext control plane with us-east and the US profile served there
/// alone: for tests of the hops from an agent to what is outside Spillway.
async fn plaintext_east_plane() -> ControlPlane {
    let cp = ControlPlane::start_with(None, "cp", &[]).await;
    cp.create_region("us-east", "us").await;
    cp.admin()
        .await
        .create_profile(pb::CreateProfileRequest {
            profile: Some(pb::InferenceProfile {
                id: US.into(),
                destinations: vec!["us-east".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    cp
}

/// One call through an agent of us-east whose only model server serves
/// HTTPS with `identity`, trusting `ca`; the answer, how many requests
/// reached the server, and what the audit record says of the attempt.
async fn call_an_https_model_server(
    identity: &TlsFiles,
    ca: &Path,
) -> (spillway_tests::cluster::HttpAnswer, u64, String) {
    let sim = TestSim::start_tls(SimConfig::default(), identity).await;
    let cp = plaintext_east_plane().await;
    let planes = [cp.url()];
    let dir = tempfile::tempdir().unwrap();
    let mut opts = AgentOptions::new("e", "us-east", &planes, dir.path());
    let mut server = model_server(sim.addr, &["llama-3.1-8b"], 8);
    server.url = format!("https://{}", sim.addr);
    opts.model_servers = vec![server];
    opts.model_server_ca = Some(ca.to_path_buf());
    let audit = dir.path().join("audit");
    opts.audit_dir = Some(audit.clone());
    let agent = TestAgent::start_with(opts).await;
    agent
        .wait_for("the profile", |c| c.routes.contains_key(US))
        .await;
    let answer = spillway_tests::cluster::Http::default()
        .post(agent.http, "/v1/chat/completions", chat(US, false))
        .await;
    let received = sim
        .state
        .received
        .load(std::sync::atomic::Ordering::Relaxed);
    let file = audit.join("audit.jsonl");
    spillway_tests::wait_until("the call's audit record", Duration::from_secs(10), || {
        let file = file.clone();
        async move { std::fs::read_to_string(file).is_ok_and(|t| t.ends_with('\n')) }
    })
    .await;
    let record: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let detail = record["attempts"][0]["outcome"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (answer, received, detail)
}

#[tokio::test]
async fn https_model_servers_are_reached_only_with_a_certificate_of_their_ca_for_their_name() {
    let dir = tempfile::tempdir().unwrap();
    let models_ca = DevCa::new(&dir.path().join("models"), "model servers' CA").unwrap();
    let rogue_ca = DevCa::new(&dir.path().join("rogue"), "someone else's CA").unwrap();
    // Certified by the CA the agent trusts, for the address it calls.
    let good = models_ca
        .issue("vllm", "spiffe://example/model-server/vllm")
        .unwrap();
    let (answer, received, _) = call_an_https_model_server(&good, &models_ca.ca_path()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.region(), Some("us-east"));
    assert_eq!(received, 1);
    // Certified by another CA: no request is sent, and the call fails; the
    // client is told the region was unavailable, the audit record (in the
    // source region) says why.
    let impostor = rogue_ca
        .issue("rogue", "spiffe://example/model-server/rogue")
        .unwrap();
    let (answer, received, why) = call_an_https_model_server(&impostor, &models_ca.ca_path()).await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert!(!answer.text().contains("127.0.0.1"), "{}", answer.text());
    assert!(why.contains("certificate"), "{why}");
    assert_eq!(received, 0);
    // Certified by the right CA, but for another host.
    let elsewhere = models_ca
        .issue_for_names("elsewhere", &["vllm.elsewhere.example"])
        .unwrap();
    let (answer, received, why) =
        call_an_https_model_server(&elsewhere, &models_ca.ca_path()).await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert!(why.contains("certificate"), "{why}");
    assert_eq!(received, 0);
}

#[tokio::test]
async fn an_https_model_server_or_collector_without_a_ca_to_trust_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.pem");
    std::fs::write(&text, "not a certificate\n").unwrap();
    let garbled = dir.path().join("garbled.pem");
    std::fs::write(
        &garbled,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (text, garbled) = (text.to_str().unwrap(), garbled.to_str().unwrap());
    let https_server = ["--model-server", "https://127.0.0.1:9,models=m"];
    let collector = [
        "--model-server",
        "http://127.0.0.1:9,models=m",
        "--otlp-endpoint",
        "https://127.0.0.1:4317",
    ];
    for (base, flag) in [
        (&https_server[..], "--model-server-ca"),
        (&collector[..], "--otlp-ca"),
    ] {
        spillway_tests::agent_refuses_to_start(base, &format!("give {flag}")).await;
        spillway_tests::agent_refuses_to_start(
            &[base, &[flag, text]].concat(),
            "holds no certificate",
        )
        .await;
        spillway_tests::agent_refuses_to_start(&[base, &[flag, garbled]].concat(), garbled).await;
    }
    // An upper-case scheme is https too.
    spillway_tests::agent_refuses_to_start(
        &["--model-server", "HTTPS://127.0.0.1:9,models=m"],
        "give --model-server-ca",
    )
    .await;
}

#[tokio::test]
async fn traces_go_to_an_https_collector_only_with_a_certificate_of_its_ca() {
    use spillway_tests::cluster::Http;
    use spillway_tests::otlp::TestCollector;
    let dir = tempfile::tempdir().unwrap();
    let collectors_ca = DevCa::new(&dir.path().join("otel"), "collectors' CA").unwrap();
    let rogue_ca = DevCa::new(&dir.path().join("rogue"), "someone else's CA").unwrap();
    let trusted = TestCollector::start_tls(
        &collectors_ca
            .issue("collector", "spiffe://example/otel/us-east")
            .unwrap(),
    )
    .await;
    let impostor = TestCollector::start_tls(
        &rogue_ca
            .issue("rogue", "spiffe://example/otel/rogue")
            .unwrap(),
    )
    .await;
    assert!(trusted.endpoint().starts_with("https://"));
    let sim = TestSim::start(SimConfig::default()).await;
    let cp = plaintext_east_plane().await;
    let planes = [cp.url()];
    // Both agents trust the collectors' CA; one exports to the trusted
    // collector, the other to an impostor.
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = AgentOptions::new("a", "us-east", &planes, d1.path());
    a.model_servers = vec![model_server(sim.addr, &["llama-3.1-8b"], 8)];
    a.otlp_endpoint = Some(trusted.endpoint());
    a.otlp_ca = Some(collectors_ca.ca_path());
    let a = TestAgent::start_with(a).await;
    let mut b = AgentOptions::new("b", "us-east", &planes, d2.path());
    b.model_servers = vec![model_server(sim.addr, &["llama-3.1-8b"], 8)];
    b.otlp_endpoint = Some(impostor.endpoint());
    b.otlp_ca = Some(collectors_ca.ca_path());
    let b = TestAgent::start_with(b).await;
    let http = Http::default();
    for agent in [&a, &b] {
        agent
            .wait_for("the profile", |c| c.routes.contains_key(US))
            .await;
        let answer = http
            .post(agent.http, "/v1/chat/completions", chat(US, false))
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    spillway_tests::wait_until(
        "spans and audit logs at the trusted collector, and b's attempt at the impostor",
        Duration::from_secs(10),
        || async {
            !trusted.spans().is_empty() && !trusted.logs().is_empty() && impostor.connections() > 0
        },
    )
    .await;
    assert!(trusted.spans().iter().all(|s| s.resource_agent == "a"));
    // b reached the impostor; its handshake failed, so nothing was
    // exported there (a little longer, for a handshake still under way).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(impostor.spans().is_empty());
    assert!(impostor.logs().is_empty());
}

/// Whether the peer closes `io` within 30 s (reading and dropping what
/// comes first).
async fn closes(mut io: impl tokio::io::AsyncRead + Unpin) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// The HTTP door's timeouts hold under TLS: a client that never finishes
/// its handshake, and one that handshakes then idles or dribbles a head,
/// are cut off.
#[tokio::test]
async fn the_tls_door_closes_silent_idle_and_dribbling_connections() {
    let pki = pki();
    let cp = tls_control_plane(&pki, &[]).await;
    seed(&cp, &pki, false).await;
    let sim = TestSim::start(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let planes = [cp.url()];
    let mut opts = AgentOptions::new("e1", "us-east", &planes, dir.path());
    opts.model_servers = vec![model_server(sim.addr, &["llama-3.1-8b"], 64)];
    opts.tls = Some(pki.east.clone());
    opts.conn_limits = spillway_agent::net::serve::ConnLimits {
        header_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let east = TestAgent::start_with(opts).await;
    let addr = east.http;

    // A TCP connection that never says hello.
    let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(closes(silent).await, "a silent TLS connection stayed open");

    let connector = door_client(&pki.cp.ca);
    let handshake = || async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        connector
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .expect("a TLS handshake with the HTTP door")
    };
    // Handshaken, then idle.
    let idle = handshake().await;
    assert!(closes(idle).await, "an idle TLS connection stayed open");
    // Handshaken, then half a head.
    let mut dribbling = handshake().await;
    {
        use tokio::io::AsyncWriteExt;
        dribbling
            .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n")
            .await
            .unwrap();
        dribbling.flush().await.unwrap();
    }
    assert!(
        closes(dribbling).await,
        "a TLS connection with half a head stayed open"
    );
    // The door still serves.
    let mut health = handshake().await;
    let answer = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        health
            .write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), health.read_to_end(&mut got)).await;
        String::from_utf8_lossy(&got).into_owned()
    };
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// The leaf certificate (DER) the TLS server at `addr` presents now.
async fn presented(addr: SocketAddr, ca: &Path) -> Result<Vec<u8>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = door_client(ca)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or("no certificate")?;
    Ok(certs[0].as_ref().to_vec())
}

fn der_of(cert: &Path) -> Vec<u8> {
    rustls::pki_types::CertificateDer::pem_file_iter(cert)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .as_ref()
        .to_vec()
}

/// The value of the series `series` (name and labels, as written) at
/// `addr`'s `/metrics`, if shown.
async fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let text = spillway_tests::cluster::Http::default()
        .get(addr, "/metrics")
        .await
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Whether a gRPC health check at `addr`, presenting `id` and trusting
/// `ca`, is answered (the handshake, client certificate included, passed).
async fn answered(addr: SocketAddr, ca: &Path, id: &TlsFiles) -> bool {
    let Ok(channel) = channel(addr, ca, Some(id)).await else {
        return false;
    };
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .is_ok()
}

/// Renewed certificates and a rotated CA are picked up by a running agent
/// and control plane: new connections get the new certificate, the
/// expiry gauge moves, files that cannot be used are refused (counted)
/// while the previous certificate keeps serving, and a CA bundle with a
/// new CA makes its certificates trusted, all without a restart.
#[tokio::test]
async fn renewed_certificates_and_a_rotated_ca_are_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new(&dir.path().join("ca"), "test CA").unwrap();
    let next_ca = DevCa::new(&dir.path().join("next"), "next CA").unwrap();
    let cp_files = ca.issue("cp", &control_plane_uri("cp")).unwrap();
    let admin = ca.issue("admin", &admin_uri("ops")).unwrap();
    let east_uri = agent_uri("us-east", "e1");
    let east_files = ca.issue("east", &east_uri).unwrap();
    let west_files = ca.issue("west", &agent_uri("us-west", "w1")).unwrap();
    let ca_pem = ca.ca_path();

    let tls = tls_flags(&cp_files);
    let cp = ControlPlane::start_with(
        None,
        "cp",
        &[&tls[..], &["--tls-reload-secs", "1"]].concat(),
    )
    .await;
    let admin_flags = tls_flags(&admin);
    for args in [
        &["regions", "create", "us-east", "-g", "us"][..],
        &["regions", "create", "us-west", "-g", "us"][..],
        &[
            "profiles",
            "create",
            US,
            "--destinations",
            "us-east,us-west",
        ][..],
        &[
            "routes",
            "set",
            US,
            "--source",
            "us-east",
            "--dest",
            "us-west=1",
        ][..],
    ] {
        let (ok, out) = spillctl(&cp, &admin_flags, args).await;
        assert!(ok, "{out}");
    }
    let sim = TestSim::start(SimConfig::default()).await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let west = tls_agent("w1", "us-west", &cp, &west_files, &sim, d1.path()).await;
    let planes = [cp.url()];
    let mut opts = AgentOptions::new("e1", "us-east", &planes, d2.path());
    opts.model_servers = vec![model_server(sim.addr, &["llama-3.1-8b"], 64)];
    opts.tls = Some(east_files.clone());
    opts.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let east = TestAgent::start_with(opts).await;
    let east_metrics = east.metrics.unwrap();
    east.wait_for("us-west's relay", |c| {
        c.relays.contains_key("us-west") && c.routes.contains_key(US)
    })
    .await;
    let (status, region) = https_post(east.http, &ca_pem, chat(US, false)).await;
    assert_eq!((status, region.as_deref()), (200, Some("us-west")));
    let first = der_of(&east_files.cert);
    assert_eq!(presented(east.http, &ca_pem).await.unwrap(), first);
    assert_eq!(presented(east.addr, &ca_pem).await.unwrap(), first);
    let expiry = "spillway_agent_tls_certificate_expiry_timestamp_seconds";
    let before = metric(east_metrics, expiry)
        .await
        .expect("the expiry gauge");
    assert_eq!(
        metric(
            east_metrics,
            "spillway_agent_tls_reloads_total{outcome=\"loaded\"}"
        )
        .await,
        Some(1.0)
    );

    // Renewal: a new key and certificate, valid until 2031-01-02, written
    // over the files (not atomically: the certificate first).
    ca.issue_until("east", &east_uri, Some((2031, 1, 2)))
        .unwrap();
    let renewed = der_of(&east_files.cert);
    assert_ne!(renewed, first);
    spillway_tests::wait_until(
        "the door presents the renewed certificate",
        Duration::from_secs(30),
        || async { presented(east.http, &ca_pem).await.ok().as_ref() == Some(&renewed) },
    )
    .await;
    assert_eq!(presented(east.addr, &ca_pem).await.unwrap(), renewed);
    // (The gauge moves just after the swap.)
    spillway_tests::wait_until(
        "the expiry gauge moved",
        Duration::from_secs(30),
        || async { metric(east_metrics, expiry).await == Some(1_925_078_400.0) },
    )
    .await;
    let after = metric(east_metrics, expiry).await.unwrap();
    assert_eq!(
        after, 1_925_078_400.0,
        "2031-01-02T00:00:00Z (before: {before})"
    );
    // Calls go on: relayed to us-west, and the renewed certificate opens
    // new connections to the agent's gRPC port as a client.
    let (status, _) = https_post(east.http, &ca_pem, chat(US, false)).await;
    assert_eq!(status, 200);
    assert!(answered(west.addr, &ca_pem, &east_files).await);

    // Files that cannot be used: a certificate that is not PEM, then one
    // that does not fit the key. Each is refused once, counted, and the
    // renewed certificate keeps serving.
    // (The renewal above, written file by file, may have been seen half
    // done and refused once already: count from here.)
    let refused = "spillway_agent_tls_reloads_total{outcome=\"refused\"}";
    let base = metric(east_metrics, refused).await.unwrap_or(0.0);
    std::fs::write(&east_files.cert, "not a certificate\n").unwrap();
    spillway_tests::wait_until(
        "the broken certificate refused",
        Duration::from_secs(30),
        || async { metric(east_metrics, refused).await == Some(base + 1.0) },
    )
    .await;
    assert_eq!(presented(east.http, &ca_pem).await.unwrap(), renewed);
    std::fs::copy(&west_files.cert, &east_files.cert).unwrap();
    spillway_tests::wait_until(
        "the certificate of another key refused",
        Duration::from_secs(30),
        || async { metric(east_metrics, refused).await == Some(base + 2.0) },
    )
    .await;
    assert_eq!(presented(east.addr, &ca_pem).await.unwrap(), renewed);
    let (status, _) = https_post(east.http, &ca_pem, chat(US, false)).await;
    assert_eq!(status, 200);
    assert_eq!(metric(east_metrics, expiry).await, Some(after));

    // CA rotation, step one: every party's bundle gains the next CA.
    // Before, a certificate of the next CA does not get past the agent's
    // handshake; after the reload, it does.
    let newcomer = next_ca.issue("w2", &agent_uri("us-west", "w2")).unwrap();
    assert!(!answered(east.addr, &ca_pem, &newcomer).await);
    let bundle = [
        std::fs::read_to_string(&ca_pem).unwrap(),
        std::fs::read_to_string(next_ca.ca_path()).unwrap(),
    ]
    .concat();
    std::fs::write(&ca_pem, &bundle).unwrap();
    // (The agent's own files are usable again: its renewed pair.)
    ca.issue_until("east", &east_uri, Some((2031, 1, 2)))
        .unwrap();
    spillway_tests::wait_until(
        "a certificate of the next CA trusted by the agent",
        Duration::from_secs(30),
        || async { answered(east.addr, &ca_pem, &newcomer).await },
    )
    .await;
    // The agent trusts the next CA as a client too: an agent of us-west
    // with a next-CA certificate joins, the first one leaves, and calls
    // relayed from us-east reach the newcomer over a new connection (its
    // certificate checked against the agent's reloaded roots).
    let w2_files = TlsFiles {
        ca: ca_pem.clone(),
        cert: newcomer.cert.clone(),
        key: newcomer.key.clone(),
    };
    let d3 = tempfile::tempdir().unwrap();
    let w2 = tls_agent("w2", "us-west", &cp, &w2_files, &sim, d3.path()).await;
    drop(west);
    let w2_address = w2.addr.to_string();
    east.wait_for("only the newcomer relays for us-west", |c| {
        c.relays
            .get("us-west")
            .is_some_and(|r| r.len() == 1 && r[0].address == w2_address)
    })
    .await;
    let (status, region) = https_post(east.http, &ca_pem, chat(US, false)).await;
    assert_eq!((status, region.as_deref()), (200, Some("us-west")));
    // Step two: the control plane's certificate is issued by the next CA;
    // it serves it from the next connection on, and operators (trusting
    // the bundle) still reach it.
    let next_cp = next_ca.issue("cp", &control_plane_uri("cp")).unwrap();
    std::fs::copy(&next_cp.cert, &cp_files.cert).unwrap();
    std::fs::copy(&next_cp.key, &cp_files.key).unwrap();
    let cp_now = der_of(&cp_files.cert);
    spillway_tests::wait_until(
        "the control plane presents its next-CA certificate",
        Duration::from_secs(30),
        || async { presented(cp.addr, &ca_pem).await.ok().as_ref() == Some(&cp_now) },
    )
    .await;
    let (ok, out) = spillctl(&cp, &admin_flags, &["regions", "list"]).await;
    assert!(ok && out.contains("us-west"), "{out}");
    // And the agents' streams to it carried on: a change reaches them.
    let version = east.current().unwrap().version;
    let (ok, out) = spillctl(
        &cp,
        &admin_flags,
        &["regions", "create", "eu-west", "-g", "eu"],
    )
    .await;
    assert!(ok, "{out}");
    east.wait_for("the next config", |c| c.version > version)
        .await;
}
