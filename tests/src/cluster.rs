//! A three-region cluster for data-plane tests: a control-plane process,
//! one in-process agent per region, each with its own simulated model
//! servers, and the sample profiles. Plus a small HTTP client for raw calls.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use spillway_core::api::ApiSet;
use spillway_proto::pb;

use crate::otlp::TestCollector;
use crate::sim::SimConfig;
use crate::{AgentOptions, ControlPlane, TestAgent, TestSim, model_server};

pub const MODEL: &str = "llama-3.1-8b";
pub const US: &str = "us.llama-3.1-8b";
pub const EU: &str = "eu.llama-3.1-8b";
pub const GLOBAL: &str = "global.llama-3.1-8b";
pub const REGIONS: [(&str, &str); 3] = [("us-east", "us"), ("us-west", "us"), ("eu-west", "eu")];

/// One region: its agent and its model servers.
pub struct Region {
    pub agent: TestAgent,
    pub sims: Vec<TestSim>,
    /// The region's OTLP collector (with `ClusterSpec::otlp`).
    pub collector: Option<TestCollector>,
    _dir: tempfile::TempDir,
}

impl Region {
    /// Where its agent writes audit records (with `ClusterSpec::audit`).
    pub fn audit_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("audit")
    }

    /// Its agent's audit records so far.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.audit_dir()) else {
            return out;
        };
        for e in entries.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            out.extend(
                text.lines()
                    .map(|l| serde_json::from_str(l).expect("an audit line is JSON")),
            );
        }
        out
    }

    /// Calls its model servers served.
    pub fn served(&self) -> u64 {
        self.sims.iter().map(TestSim::served).sum()
    }
}

pub struct Cluster {
    pub cp: ControlPlane,
    pub regions: BTreeMap<&'static str, Region>,
}

/// How each region's model servers behave; the agent's capacity per server
/// is the simulator's `max_concurrent`.
pub struct ClusterSpec {
    pub sims_per_region: usize,
    pub sim: BTreeMap<&'static str, SimConfig>,
    pub max_body_bytes: usize,
    /// Control-plane flags. By default the leader updates weights once a
    /// minute, which in a test means never after the start: routing
    /// follows the operator's tables alone, and only tests about weights
    /// (which set their own interval) see load move them.
    pub cp_args: Vec<&'static str>,
    /// Whether agents serve calls without an API key.
    pub anonymous: bool,
    /// Whether agents write audit records (see `Region::audit`).
    pub audit: bool,
    /// Whether each region has an OTLP collector its agent exports to.
    pub otlp: bool,
    /// The APIs a region's model servers say they serve (default: all,
    /// which the simulator serves).
    pub apis: BTreeMap<&'static str, ApiSet>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            sims_per_region: 2,
            sim: REGIONS
                .iter()
                .map(|(r, _)| (*r, SimConfig::default()))
                .collect(),
            max_body_bytes: 64 * 1024,
            cp_args: vec!["--weights-interval-ms", "60000"],
            anonymous: true,
            audit: false,
            otlp: false,
            apis: BTreeMap::new(),
        }
    }
}

impl Cluster {
    pub async fn start(spec: ClusterSpec) -> Cluster {
        let cp = ControlPlane::start_with(None, "cp", &spec.cp_args).await;
        let mut admin = cp.admin().await;
        for (name, geo) in REGIONS {
            cp.create_region(name, geo).await;
        }
        for (id, dest) in [
            (US, &["us-east", "us-west"][..]),
            (EU, &["eu-west"][..]),
            (GLOBAL, &["us-east", "us-west", "eu-west"][..]),
        ] {
            let profile = pb::InferenceProfile {
                id: id.into(),
                destinations: dest.iter().map(|d| d.to_string()).collect(),
                ..Default::default()
            };
            admin
                .create_profile(pb::CreateProfileRequest {
                    profile: Some(profile),
                })
                .await
                .unwrap();
        }
        let planes = [cp.url()];
        let mut regions = BTreeMap::new();
        for (name, _) in REGIONS {
            let config = spec.sim.get(name).cloned().unwrap_or_default();
            let mut sims = Vec::new();
            for _ in 0..spec.sims_per_region {
                sims.push(TestSim::start(config.clone()).await);
            }
            let dir = tempfile::tempdir().unwrap();
            let mut opts = AgentOptions::new("agent-1", name, &planes, dir.path());
            opts.model_servers = sims
                .iter()
                .map(|s| {
                    let mut m = model_server(s.addr, &[MODEL], config.max_concurrent);
                    if let Some(apis) = spec.apis.get(name) {
                        m.apis = *apis;
                    }
                    m
                })
                .collect();
            opts.max_body_bytes = spec.max_body_bytes;
            opts.pipeline.allow_anonymous = spec.anonymous;
            if spec.audit {
                opts.audit_dir = Some(dir.path().join("audit"));
            }
            let collector = if spec.otlp {
                Some(TestCollector::start().await)
            } else {
                None
            };
            opts.otlp_endpoint = collector.as_ref().map(TestCollector::endpoint);
            opts.upstream_timeout = Duration::from_secs(5);
            let agent = TestAgent::start_with(opts).await;
            regions.insert(
                name,
                Region {
                    agent,
                    sims,
                    collector,
                    _dir: dir,
                },
            );
        }
        // Ready when every agent knows every profile of its geography and
        // every other region's relay endpoint.
        for region in regions.values() {
            region
                .agent
                .wait_for("its profiles and every region's relay", |c| {
                    c.profiles.contains_key(GLOBAL) && c.relays.len() == REGIONS.len()
                })
                .await;
        }
        Cluster { cp, regions }
    }

    pub fn region(&self, name: &str) -> &Region {
        &self.regions[name]
    }

    /// Sets a route table and waits until the source region's agent has it.
    pub async fn set_route(&self, profile: &str, source: &str, dest: &[(&str, f64)]) {
        let with_priority: Vec<(&str, f64, u32)> = dest.iter().map(|(r, w)| (*r, *w, 0)).collect();
        self.set_route_with_priority(profile, source, &with_priority)
            .await;
    }

    /// [`Cluster::set_route`] with a priority per destination.
    pub async fn set_route_with_priority(
        &self,
        profile: &str,
        source: &str,
        dest: &[(&str, f64, u32)],
    ) {
        let mut admin = self.cp.admin().await;
        let table = pb::RouteTable {
            profile: profile.into(),
            source_region: source.into(),
            destinations: dest
                .iter()
                .map(|(r, w, p)| pb::RouteDestination {
                    region: r.to_string(),
                    weight: *w,
                    priority: *p,
                })
                .collect(),
            ttft_objective_ms: 0,
            revision: 0,
        };
        admin
            .create_route_table(pb::CreateRouteTableRequest {
                route_table: Some(table),
            })
            .await
            .unwrap();
        let want: Vec<String> = dest.iter().map(|(r, _, _)| r.to_string()).collect();
        self.region(source)
            .agent
            .wait_for("the new route table", |c| {
                c.routes.get(profile).is_some_and(|t| {
                    t.destinations
                        .iter()
                        .map(|d| d.region.clone())
                        .collect::<Vec<_>>()
                        == want
                })
            })
            .await;
    }
}

/// A raw HTTP answer.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpAnswer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn region(&self) -> Option<&str> {
        self.headers
            .get("x-spillway-inference-region")
            .and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A pooled HTTP/1.1 client for tests.
#[derive(Clone)]
pub struct Http(Client<HttpConnector, Full<Bytes>>);

impl Default for Http {
    fn default() -> Self {
        Http(Client::builder(TokioExecutor::new()).build(HttpConnector::new()))
    }
}

impl Http {
    pub async fn post(&self, addr: SocketAddr, path: &str, body: impl Into<Bytes>) -> HttpAnswer {
        self.post_with(addr, path, &[], body).await
    }

    /// A POST with extra headers.
    pub async fn post_with(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> HttpAnswer {
        let mut req = Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req.body(Full::new(body.into())).unwrap()).await
    }

    /// A POST presenting an API key.
    pub async fn post_key(
        &self,
        addr: SocketAddr,
        key: &str,
        body: impl Into<Bytes>,
    ) -> HttpAnswer {
        let auth = format!("Bearer {key}");
        self.post_with(
            addr,
            "/v1/chat/completions",
            &[("authorization", &auth)],
            body,
        )
        .await
    }

    pub async fn get(&self, addr: SocketAddr, path: &str) -> HttpAnswer {
        self.get_with(addr, path, &[]).await
    }

    /// A GET with extra headers.
    pub async fn get_with(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> HttpAnswer {
        let mut req = Request::get(format!("http://{addr}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req.body(Full::new(Bytes::new())).unwrap()).await
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> HttpAnswer {
        let resp = tokio::time::timeout(Duration::from_secs(30), self.0.request(req))
            .await
            .expect("an answer within 30s")
            .expect("an HTTP answer");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect())
            .await
            .expect("a whole body within 30s")
            .expect("a readable body")
            .to_bytes();
        HttpAnswer {
            status,
            headers,
            body,
        }
    }
}

/// A chat-completions body for `model`.
pub fn chat(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "stream": stream,
        "stream_options": if stream { serde_json::json!({"include_usage": true}) } else { serde_json::Value::Null },
    })
    .to_string()
}

/// An answer whose body is read chunk by chunk as it arrives.
pub struct Streaming {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: hyper::body::Incoming,
}

impl Streaming {
    /// The next piece of the body, or `None` at its end; `Err` when the
    /// connection broke.
    pub async fn next(&mut self) -> Option<Result<Bytes, String>> {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.body.frame())
                .await
                .expect("a body frame within 30s")?;
            match frame {
                Ok(f) => {
                    if let Ok(data) = f.into_data() {
                        return Some(Ok(data));
                    }
                }
                Err(e) => return Some(Err(e.to_string())),
            }
        }
    }
}

impl Http {
    /// Posts and returns as soon as the response head arrives.
    pub async fn post_streaming(
        &self,
        addr: SocketAddr,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Streaming {
        let req = Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(body.into()))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(30), self.0.request(req))
            .await
            .expect("an answer within 30s")
            .expect("an HTTP answer");
        let (parts, body) = resp.into_parts();
        Streaming {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }
}
