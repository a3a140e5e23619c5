//! The region's model servers: OpenAI-compatible HTTP servers, balanced by
//! load with power-of-two-choices over in-flight calls and latency (the
//! peak-EWMA idea of `tower::balance`), over pooled HTTP/1.1 or HTTP/2
//! connections, plaintext or TLS (`https://` servers, whose certificates
//! must chain to the CA the agent is given). Streams pass through without
//! being buffered.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

use spillway_core::api::{Api, ApiSet};

use crate::error::CallError;

pub mod answer;
pub mod meter;
pub mod outlier;
pub mod relay;

use answer::count_events;
use outlier::{OutlierSettings, Outliers};

/// One model server, as configured with `--model-server`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelServerSpec {
    /// Base URL, e.g. `http://10.0.0.5:8000` (the agent adds the API's
    /// path, `/v1/chat/completions` and so on).
    pub url: String,
    pub models: BTreeSet<String>,
    /// The APIs it serves (default: chat and completions).
    pub apis: ApiSet,
    /// Concurrent calls it takes; more are not sent (the region is at
    /// capacity and calls spill over).
    pub capacity: u32,
    /// Speak HTTP/2 with prior knowledge instead of HTTP/1.1.
    pub http2: bool,
}

impl ModelServerSpec {
    /// Whether it is reached over TLS (`https://`, in any case).
    pub fn is_https(&self) -> bool {
        self.url
            .parse::<Uri>()
            .is_ok_and(|u| u.scheme_str() == Some("https"))
    }
}

impl FromStr for ModelServerSpec {
    type Err = String;

    /// `URL,models=a|b[,apis=chat|embeddings][,capacity=N][,http2]`
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let url = parts
            .next()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_string();
        let uri: Uri = url
            .parse()
            .map_err(|_| format!("`{url}` is not a URL like http://host:port"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "`{url}` must be an http:// or https:// URL with a host"
            ));
        }
        let mut spec = ModelServerSpec {
            url,
            models: BTreeSet::new(),
            apis: ApiSet::of(Api::DEFAULT),
            capacity: 64,
            http2: false,
        };
        for part in parts {
            match part.split_once('=') {
                Some(("models", m)) => {
                    spec.models = m
                        .split('|')
                        .filter(|m| !m.is_empty())
                        .map(String::from)
                        .collect()
                }
                Some(("apis", a)) => {
                    let apis = a
                        .split('|')
                        .map(|name| name.parse::<Api>().map_err(|e| e.to_string()))
                        .collect::<Result<Vec<Api>, String>>()?;
                    spec.apis = ApiSet::of(apis);
                    if spec.apis.is_empty() {
                        return Err(format!(
                            "model server `{}` names no APIs (apis=chat|completions|embeddings|responses|messages)",
                            spec.url
                        ));
                    }
                }
                Some(("capacity", c)) => {
                    spec.capacity =
                        c.parse().ok().filter(|c| *c > 0).ok_or_else(|| {
                            format!("capacity `{c}` is not a positive whole number")
                        })?
                }
                None if part == "http2" => spec.http2 = true,
                _ => {
                    return Err(format!(
                        "unknown model-server option `{part}` (use models=a|b, apis=chat|embeddings, capacity=N, http2)"
                    ));
                }
            }
        }
        if spec.models.is_empty() {
            return Err(format!(
                "model server `{}` names no models (add models=a|b)",
                spec.url
            ));
        }
        Ok(spec)
    }
}

/// Live state of one model server.
#[derive(Debug)]
pub struct ModelServer {
    pub spec: ModelServerSpec,
    /// The URL of each API it serves, by [`Api::index`].
    uris: [Option<Uri>; Api::ALL.len()],
    in_flight: AtomicU32,
    /// Time to response headers, EWMA, in microseconds (0 = no sample yet).
    latency_us: AtomicU64,
    /// Counters since the last load report.
    calls: AtomicU64,
    errors: AtomicU64,
    throttles: AtomicU64,
    output_tokens: AtomicU64,
    /// Time to the answer's first byte and to its end, EWMAs in µs.
    ttft_us: AtomicU64,
    total_us: AtomicU64,
}

impl ModelServer {
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn load_score(&self) -> f64 {
        // Peak-EWMA flavour: expected wait grows with both the queue and the
        // observed latency. Unknown latency counts as 1 ms.
        let latency = match self.latency_us.load(Ordering::Relaxed) {
            0 => 1_000.0,
            l => l as f64,
        };
        f64::from(self.in_flight() + 1) * latency / f64::from(self.spec.capacity)
    }

    fn observe(&self, took: Duration) {
        ewma(&self.latency_us, took);
    }
}

/// Holds one in-flight slot of a model server until dropped (when a unary
/// answer was read, or a stream ended or was dropped).
pub struct InFlight(Arc<ModelServer>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a model server answered.
pub struct UpstreamAnswer {
    pub status: StatusCode,
    pub body: AnswerBody,
}

/// A whole body, or a stream of body bytes as they arrive.
pub enum AnswerBody {
    Full(Bytes),
    Stream(futures_util::stream::BoxStream<'static, Result<Bytes, CallError>>),
}

#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    /// Until a stream's response headers arrive: a streaming model server
    /// answers at once, so a silent one is unavailable and the next region
    /// is tried.
    pub header_timeout: Duration,
    /// Until a unary answer has been read whole. Many model servers send a
    /// unary answer's headers only when generation is done, so a unary call
    /// gets this long for its headers too: a long generation must not be
    /// mistaken for an outage and run again elsewhere.
    pub body_timeout: Duration,
    /// Whom `https://` model servers are trusted by: their certificate must
    /// chain to these roots. `None`: no https server can be reached.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings {
            connect_timeout: Duration::from_secs(2),
            header_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(600),
            tls: None,
        }
    }
}

/// A TLS client that trusts nobody: https model servers without a CA
/// configured fail their handshake (the agent refuses to start that way).
fn trusting_nobody() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
}

/// The region's model servers and the pooled clients that reach them.
pub struct Upstreams {
    servers: Vec<Arc<ModelServer>>,
    http1: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    http2: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    settings: UpstreamSettings,
    /// Servers ejected after failing or throttling calls in a row, by URL.
    ejected: Outliers<String>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("servers", &self.servers)
            .finish()
    }
}

impl Upstreams {
    pub fn new(specs: Vec<ModelServerSpec>, settings: UpstreamSettings) -> Upstreams {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_nodelay(true);
        // https:// URLs go through the TLS layer below.
        connector.enforce_http(false);
        let tls = settings
            .tls
            .as_deref()
            .cloned()
            .unwrap_or_else(trusting_nobody);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(
                HttpsConnectorBuilder::new()
                    .with_tls_config(tls.clone())
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(connector.clone()),
            );
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(
                HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_or_http()
                    .enable_http2()
                    .wrap_connector(connector),
            );
        let servers = specs
            .into_iter()
            .map(|spec| {
                let uris = Api::ALL.map(|api| {
                    spec.apis.contains(api).then(|| {
                        format!("{}{}", spec.url, api.path())
                            .parse()
                            .expect("checked when the spec was parsed")
                    })
                });
                Arc::new(ModelServer {
                    spec,
                    uris,
                    in_flight: AtomicU32::new(0),
                    latency_us: AtomicU64::new(0),
                    calls: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                    throttles: AtomicU64::new(0),
                    output_tokens: AtomicU64::new(0),
                    ttft_us: AtomicU64::new(0),
                    total_us: AtomicU64::new(0),
                })
            })
            .collect();
        Upstreams {
            servers,
            http1,
            http2,
            settings,
            ejected: Outliers::new(OutlierSettings::default()),
        }
    }

    pub fn servers(&self) -> &[Arc<ModelServer>] {
        &self.servers
    }

    /// What the servers did since the last call of this, for the load
    /// report (the counters restart).
    pub fn load_report(&self, interval: Duration) -> spillway_proto::pb::LoadReport {
        let servers = self
            .servers
            .iter()
            .map(|s| spillway_proto::pb::ServerLoad {
                url: s.spec.url.clone(),
                models: s.spec.models.iter().cloned().collect(),
                capacity: s.spec.capacity,
                in_flight: s.in_flight(),
                calls: s.calls.swap(0, Ordering::Relaxed),
                errors: s.errors.swap(0, Ordering::Relaxed),
                throttles: s.throttles.swap(0, Ordering::Relaxed),
                latency_ewma_us: s.latency_us.load(Ordering::Relaxed),
                ttft_ewma_us: s.ttft_us.load(Ordering::Relaxed),
                total_ewma_us: s.total_us.load(Ordering::Relaxed),
                output_tokens: s.output_tokens.swap(0, Ordering::Relaxed),
                ..Default::default()
            })
            .collect();
        spillway_proto::pb::LoadReport {
            servers,
            interval_seconds: interval.as_secs_f64(),
            relays: Vec::new(),
            quotas: Vec::new(),
        }
    }

    /// Picks a server for `model` by power of two choices among those with a
    /// free slot, and takes the slot.
    fn pick(&self, model: &str, api: Api) -> Result<(Arc<ModelServer>, InFlight), CallError> {
        let mut serving: Vec<&Arc<ModelServer>> = self
            .servers
            .iter()
            .filter(|s| s.spec.models.contains(model) && s.spec.apis.contains(api))
            .collect();
        if serving.is_empty() {
            return Err(CallError::Unavailable(format!(
                "no model server in this region serves `{model}` over the {api} API"
            )));
        }
        // Leave ejected servers out, unless every one is ejected.
        let now = tokio::time::Instant::now();
        let healthy: Vec<&Arc<ModelServer>> = serving
            .iter()
            .copied()
            .filter(|s| !self.ejected.is_ejected(&s.spec.url, now))
            .collect();
        if !healthy.is_empty() {
            serving = healthy;
        }
        // Claim a slot on the better of two random servers; when it filled up
        // in between, try the other, then the rest in order of load.
        // Scores are read once: they move under concurrent calls, and a sort
        // must see one consistent order.
        let scores: Vec<f64> = serving.iter().map(|s| s.load_score()).collect();
        let score = |i: &usize| scores[*i];
        let mut order: Vec<usize> = (0..serving.len()).collect();
        order.sort_by(|p, q| score(p).total_cmp(&score(q)));
        if order.len() > 2 {
            let a = fastrand::usize(..serving.len());
            let mut b = fastrand::usize(..serving.len() - 1);
            if b >= a {
                b += 1;
            }
            let (win, lose) = if score(&a) <= score(&b) {
                (a, b)
            } else {
                (b, a)
            };
            order.retain(|i| *i != win && *i != lose);
            order.splice(0..0, [win, lose]);
        }
        for server in order.into_iter().map(|i| serving[i]) {
            let claimed = server
                .in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                    (n < server.spec.capacity).then_some(n + 1)
                });
            if claimed.is_ok() {
                return Ok((server.clone(), InFlight(server.clone())));
            }
        }
        Err(CallError::AtCapacity(format!(
            "every model server for `{model}` in this region is at capacity"
        )))
    }

    /// Whether a model server of this region serves `model` over `api`.
    pub fn serves(&self, model: &str, api: Api) -> bool {
        self.servers
            .iter()
            .any(|s| s.spec.models.contains(model) && s.spec.apis.contains(api))
    }

    /// The APIs this region's model servers serve, together.
    pub fn apis(&self) -> ApiSet {
        self.servers
            .iter()
            .fold(ApiSet::default(), |set, s| set.union(s.spec.apis))
    }

    /// Calls a model server of this region. `body` is the request of `api`
    /// with `model` already set.
    pub async fn call(
        &self,
        model: &str,
        api: Api,
        body: Bytes,
        stream: bool,
    ) -> Result<UpstreamAnswer, CallError> {
        let (server, slot) = self.pick(model, api)?;
        let result = self.send(&server, slot, api, body, stream).await;
        // Passive health: a server that throttles or fails calls in a row is
        // left out of the picks for a while.
        server.calls.fetch_add(1, Ordering::Relaxed);
        match &result {
            Err(CallError::Throttled(_)) => {
                server.throttles.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.is_failure() => {
                server.errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        match &result {
            Ok(_) => self.ejected.success(&server.spec.url),
            Err(e) if e.retriable() => {
                let set: Vec<String> = self
                    .servers
                    .iter()
                    .filter(|s| s.spec.models.contains(model) && s.spec.apis.contains(api))
                    .map(|s| s.spec.url.clone())
                    .collect();
                if self
                    .ejected
                    .failure(&server.spec.url, &set, tokio::time::Instant::now())
                {
                    tracing::warn!(server = %server.spec.url, error = %e, "model server ejected after failures in a row");
                }
            }
            Err(_) => {}
        }
        result
    }

    async fn send(
        &self,
        server: &Arc<ModelServer>,
        slot: InFlight,
        api: Api,
        body: Bytes,
        stream: bool,
    ) -> Result<UpstreamAnswer, CallError> {
        let uri = server.uris[api.index()]
            .clone()
            .expect("picked servers serve the API");
        let req = Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("a valid request");
        let client = if server.spec.http2 {
            &self.http2
        } else {
            &self.http1
        };
        let started = Instant::now();
        let wait = if stream {
            self.settings.header_timeout
        } else {
            self.settings.body_timeout
        };
        let resp = match tokio::time::timeout(wait, client.request(req)).await {
            Err(_) => {
                return Err(CallError::Unavailable(format!(
                    "model server {} did not answer within {:?}",
                    server.spec.url, wait
                )));
            }
            Ok(Err(e)) => {
                return Err(CallError::Unavailable(format!(
                    "model server {}: {}",
                    server.spec.url,
                    chain(&e)
                )));
            }
            Ok(Ok(resp)) => resp,
        };
        server.observe(started.elapsed());
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(CallError::Throttled(format!(
                "model server {} is throttling",
                server.spec.url
            )));
        }
        if status.is_server_error() {
            return Err(CallError::Unavailable(format!(
                "model server {} answered {status}",
                server.spec.url
            )));
        }
        let url = server.spec.url.clone();
        if stream && status.is_success() {
            // The slot travels with the stream and is released when it ends.
            let (first, end) = (server.clone(), server.clone());
            let mut seen_first = false;
            let body = resp
                .into_body()
                .into_data_stream()
                .map(move |chunk| {
                    let _slot = &slot;
                    if let Ok(c) = &chunk {
                        if !seen_first {
                            seen_first = true;
                            ewma(&first.ttft_us, started.elapsed());
                        }
                        first
                            .output_tokens
                            .fetch_add(count_events(c), Ordering::Relaxed);
                    }
                    // The client hears that it broke off; where and why go to
                    // the log (internal addresses are not the client's).
                    chunk.map_err(|e| {
                        tracing::warn!(server = %url, error = %e, "a model server broke off a stream");
                        CallError::Upstream("the model server broke off the stream".into())
                    })
                })
                .chain(
                    futures_util::stream::once(async move {
                        ewma(&end.total_us, started.elapsed());
                        None
                    })
                    .filter_map(|x: Option<Result<Bytes, CallError>>| async move { x }),
                );
            return Ok(UpstreamAnswer {
                status,
                body: AnswerBody::Stream(body.boxed()),
            });
        }
        let body = tokio::time::timeout(self.settings.body_timeout, resp.into_body().collect())
            .await
            .map_err(|_| {
                tracing::warn!(server = %url, "a model server did not finish its answer in time");
                CallError::Upstream("the model server did not finish its answer in time".into())
            })?
            .map_err(|e| {
                tracing::warn!(server = %url, error = %e, "a model server broke off its answer");
                CallError::Upstream("the model server broke off its answer".into())
            })?
            .to_bytes();
        drop(slot);
        ewma(&server.ttft_us, started.elapsed());
        ewma(&server.total_us, started.elapsed());
        if status.is_success() {
            server
                .output_tokens
                .fetch_add(answer::output_tokens(&body), Ordering::Relaxed);
        }
        Ok(UpstreamAnswer {
            status,
            body: AnswerBody::Full(body),
        })
    }
}

/// One step of the EWMAs the agent keeps in microseconds (weight 1/5 for
/// the new sample; 0 means no sample yet).
pub fn ewma_step(old_us: u64, took: Duration) -> u64 {
    let sample = took.as_micros().min(u128::from(u64::MAX)) as u64;
    let new = if old_us == 0 {
        sample
    } else {
        (old_us * 4 + sample) / 5
    };
    new.max(1)
}

/// Folds a sample into an EWMA kept in an atomic.
fn ewma(slot: &AtomicU64, took: Duration) {
    slot.store(
        ewma_step(slot.load(Ordering::Relaxed), took),
        Ordering::Relaxed,
    );
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str, capacity: u32) -> ModelServerSpec {
        ModelServerSpec {
            url: url.into(),
            models: ["m".to_string()].into(),
            apis: ApiSet::of(Api::DEFAULT),
            capacity,
            http2: false,
        }
    }

    #[test]
    fn parses_model_server_flags() {
        let s: ModelServerSpec = "http://127.0.0.1:8000/,models=a|b,capacity=8,http2"
            .parse()
            .unwrap();
        assert_eq!(s.url, "http://127.0.0.1:8000");
        assert_eq!(s.models.len(), 2);
        assert_eq!((s.capacity, s.http2), (8, true));
        assert_eq!(s.apis, ApiSet::of(Api::DEFAULT));
        let s: ModelServerSpec = "http://x,models=a,apis=embeddings|messages"
            .parse()
            .unwrap();
        assert_eq!(s.apis, ApiSet::of([Api::Embeddings, Api::Messages]));
        assert_eq!(
            "http://x,models=a,apis=chat|bogus"
                .parse::<ModelServerSpec>()
                .unwrap_err(),
            "unknown API `bogus`: one of chat, completions, embeddings, responses, messages"
        );
        let s: ModelServerSpec = "https://vllm.internal:8443,models=a".parse().unwrap();
        assert_eq!(s.url, "https://vllm.internal:8443");
        for bad in [
            "ftp://x,models=a",
            "http://x",
            "http://x,models=a,capacity=0",
            "http://x,models=a,weird",
            "http://x,models=a,apis=",
        ] {
            assert!(bad.parse::<ModelServerSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn picks_by_load_and_throttles_at_capacity() {
        let up = Upstreams::new(
            vec![spec("http://a", 2), spec("http://b", 2)],
            UpstreamSettings::default(),
        );
        let mut slots = Vec::new();
        for _ in 0..4 {
            slots.push(up.pick("m", Api::Chat).expect("a free slot").1);
        }
        // Both servers were filled evenly, then the region is at capacity.
        assert_eq!(up.servers()[0].in_flight(), 2);
        assert_eq!(up.servers()[1].in_flight(), 2);
        assert!(matches!(
            up.pick("m", Api::Chat),
            Err(CallError::AtCapacity(_))
        ));
        slots.pop();
        assert!(up.pick("m", Api::Chat).is_ok());
        assert!(matches!(
            up.pick("other", Api::Chat),
            Err(CallError::Unavailable(_))
        ));
        // Neither server says it serves embeddings.
        assert!(matches!(
            up.pick("m", Api::Embeddings),
            Err(CallError::Unavailable(_))
        ));
    }
}
