//! The region's model servers: OpenAI-compatible HTTP servers, reached over
//! pooled HTTP/1.1 or HTTP/2 connections, plaintext or TLS (`https://`
//! servers, whose certificates must chain to the CA the agent is given).
//! Streams pass through without being buffered.
//!
//! How loaded a server is comes from the engine itself where it says
//! (`engine.rs`: vLLM's, SGLang's or llama.cpp's `/metrics`, scraped every
//! 250 ms), else from a concurrency limit learned from time to first token
//! (`limit.rs`); `capacity=` is an optional upper bound. Each server gets a
//! saturation score ([`ModelServer::saturation`]); a call goes to the less
//! saturated of two random servers that are not saturated, and when every
//! server is, the region is saturated and the call spills.
//!
//! A server given with `dns` is a name whose addresses are followed
//! ([`Upstreams::spawn_discovery`]): one server per address, re-resolved
//! every `--dns-refresh-ms`; a new address joins (and is scraped on its
//! own), one that is gone takes no new calls while its calls finish.
//!
//! Every wait on a server is bounded ([`UpstreamSettings`]): connecting,
//! TCP and TLS handshake together; a stream's head; a unary answer. HTTP/2
//! connections are pinged, HTTP/1 ones kept alive by TCP.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use spillway_core::api::{Api, ApiSet};

use crate::error::CallError;
use crate::net::connect::Bounded;
use crate::net::dns::Resolver;

pub mod answer;
pub mod engine;
pub mod limit;
pub mod meter;
pub mod outlier;
pub mod relay;

use answer::count_events;
use engine::{EngineKind, Figures, MetricsMode, Page, TtftWindow};
use limit::{AdaptiveLimit, LimitSettings};
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
    /// An upper bound on the calls it runs at once (the engine's, with
    /// engine metrics; this agent's own, without). `None`: no bound but
    /// what the engine's figures or the learned limit say.
    pub capacity: Option<u32>,
    /// `capacity` is the limit, not learned (`static`; needs `capacity`).
    pub fixed: bool,
    /// Which engine metrics to read from `metrics_url`.
    pub metrics: MetricsMode,
    /// Where the engine's Prometheus metrics are (default: `<url>/metrics`).
    pub metrics_url: String,
    /// Speak HTTP/2 with prior knowledge instead of HTTP/1.1.
    pub http2: bool,
    /// The URL's host is a DNS name whose addresses are followed: one
    /// server per address (a Kubernetes headless Service's pods).
    pub dns: bool,
}

impl ModelServerSpec {
    /// A server at `url` serving `models` over the default APIs, with
    /// every option at its default.
    pub fn new(url: &str, models: impl IntoIterator<Item = impl Into<String>>) -> ModelServerSpec {
        let url = url.trim_end_matches('/').to_string();
        ModelServerSpec {
            metrics_url: format!("{url}/metrics"),
            url,
            models: models.into_iter().map(Into::into).collect(),
            apis: ApiSet::of(Api::DEFAULT),
            capacity: None,
            fixed: false,
            metrics: MetricsMode::Auto,
            http2: false,
            dns: false,
        }
    }

    /// Whether it is reached over TLS (`https://`, in any case).
    pub fn is_https(&self) -> bool {
        self.url
            .parse::<Uri>()
            .is_ok_and(|u| u.scheme_str() == Some("https"))
    }
}

fn check_url(url: &str, what: &str) -> Result<(), String> {
    let uri: Uri = url
        .parse()
        .map_err(|_| format!("{what} `{url}` is not a URL like http://host:port"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(format!(
            "{what} `{url}` must be an http:// or https:// URL with a host"
        ));
    }
    Ok(())
}

impl FromStr for ModelServerSpec {
    type Err = String;

    /// `URL,models=a|b[,apis=chat|embeddings][,capacity=N][,static]
    /// [,metrics=auto|vllm|sglang|llamacpp|none][,metrics_url=URL][,http2]`
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let url = parts.next().unwrap_or_default().trim_end_matches('/');
        check_url(url, "model server")?;
        let mut spec = ModelServerSpec::new(url, Vec::<String>::new());
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
                        Some(c.parse().ok().filter(|c| *c > 0).ok_or_else(|| {
                            format!("capacity `{c}` is not a positive whole number")
                        })?)
                }
                Some(("metrics", m)) => spec.metrics = m.parse()?,
                Some(("metrics_url", u)) => {
                    check_url(u, "metrics_url")?;
                    spec.metrics_url = u.to_string();
                }
                None if part == "static" => spec.fixed = true,
                None if part == "http2" => spec.http2 = true,
                None if part == "dns" => spec.dns = true,
                _ => {
                    return Err(format!(
                        "unknown model-server option `{part}` (use models=a|b, apis=chat|embeddings, capacity=N, static, metrics=auto|vllm|sglang|llamacpp|none, metrics_url=URL, http2, dns)"
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
        if spec.dns {
            let uri: Uri = spec.url.parse().expect("checked above");
            let host = uri.host().unwrap_or_default();
            if spec.is_https() {
                return Err(format!(
                    "model server `{}`: `dns` follows a name's addresses over http:// only (an https:// server's certificate names the host, not its addresses)",
                    spec.url
                ));
            }
            if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
                return Err(format!(
                    "model server `{}`: `dns` needs a host name to resolve, not an address",
                    spec.url
                ));
            }
        }
        if spec.fixed && spec.capacity.is_none() {
            return Err(format!(
                "model server `{}`: `static` fixes the limit at capacity=N, which is missing",
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
    /// The `dns` server (by index among the specs) whose address this is.
    discovered_from: Option<usize>,
    /// Its address is gone from the name: no new calls, no more scrapes.
    removed: AtomicBool,
    /// The URL of each API it serves, by [`Api::index`].
    uris: [Option<Uri>; Api::ALL.len()],
    in_flight: AtomicU32,
    /// Time to response headers, EWMA, in microseconds (0 = no sample yet).
    latency_us: AtomicU64,
    /// Calls sent and calls finished since the start: the calls this agent
    /// added to the engine since its figures were scraped are the
    /// difference of their moves since then.
    started: AtomicU64,
    finished: AtomicU64,
    /// Counters since the last load report.
    calls: AtomicU64,
    errors: AtomicU64,
    throttles: AtomicU64,
    output_tokens: AtomicU64,
    /// Time to the answer's first byte and to its end, EWMAs in µs.
    ttft_us: AtomicU64,
    total_us: AtomicU64,
    limit: Mutex<AdaptiveLimit>,
    engine: Mutex<EngineView>,
}

/// What the agent knows of a server's engine from its metrics.
#[derive(Debug, Default)]
struct EngineView {
    /// The dialect declared, or detected from the first page that had one.
    kind: Option<EngineKind>,
    /// The last good page's figures, when and against which counters.
    figures: Option<Figures>,
    scraped_at: Option<Instant>,
    started_then: u64,
    finished_then: u64,
    /// The engine's TTFT p90 over the last seconds, in seconds.
    ttft_p90: Option<f64>,
    ttft: TtftWindow,
    /// The calls the engine held without queuing when it last queued some:
    /// its limit at that mix (llama.cpp's slots, say).
    full_at: Option<f64>,
    /// The calls a full KV cache held, as last estimated (running / usage).
    kv_limit: Option<f64>,
    state: ScrapeState,
}

/// How the last scrape went, for logging only what changes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ScrapeState {
    #[default]
    NotYet,
    Good,
    /// Answered, with no engine metrics the agent reads (auto).
    NoEngine,
    /// Answered with something unreadable: the learned limit decides.
    Garbage,
    /// Did not answer (refused, timed out, an error status).
    Failing,
}

/// When the saturation score of a server says it is full.
#[derive(Debug, Clone)]
pub struct SaturationSettings {
    /// KV-cache usage (0 to 1) at which a server is saturated.
    pub kv_max: f64,
    /// Requests waiting in the engine's queue at which it is saturated.
    pub queue_max: f64,
    /// Engine figures older than this are stale: the server counts as
    /// saturated.
    pub stale_after: Duration,
    /// How often engine metrics are scraped.
    pub scrape_interval: Duration,
}

impl Default for SaturationSettings {
    fn default() -> Self {
        SaturationSettings {
            kv_max: 0.9,
            queue_max: 2.0,
            stale_after: Duration::from_secs(1),
            scrape_interval: Duration::from_millis(250),
        }
    }
}

/// A server's saturation as of now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Saturation {
    /// max(load / limit, waiting / queue_max, kv / kv_max); at least 1
    /// when `saturated`.
    pub score: f64,
    /// Whether a call may not be sent there now.
    pub saturated: bool,
    /// Calls it takes without queuing, as estimated (finite).
    pub limit: f64,
    /// Whether fresh engine figures decided.
    pub from_engine: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ModelServer {
    fn new(spec: ModelServerSpec, discovered_from: Option<usize>) -> Arc<ModelServer> {
        let uris = Api::ALL.map(|api| {
            spec.apis.contains(api).then(|| {
                format!("{}{}", spec.url, api.path())
                    .parse()
                    .expect("checked when the spec was parsed")
            })
        });
        let engine = EngineView {
            kind: match spec.metrics {
                MetricsMode::Engine(k) => Some(k),
                _ => None,
            },
            ..EngineView::default()
        };
        Arc::new(ModelServer {
            limit: Mutex::new(AdaptiveLimit::new(
                LimitSettings::for_capacity(spec.capacity),
                Instant::now(),
            )),
            engine: Mutex::new(engine),
            spec,
            discovered_from,
            removed: AtomicBool::new(false),
            uris,
            in_flight: AtomicU32::new(0),
            latency_us: AtomicU64::new(0),
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            throttles: AtomicU64::new(0),
            output_tokens: AtomicU64::new(0),
            ttft_us: AtomicU64::new(0),
            total_us: AtomicU64::new(0),
        })
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The limit learned from time to first token.
    pub fn learned_limit(&self) -> f64 {
        if self.spec.fixed {
            return f64::from(self.spec.capacity.unwrap_or(1));
        }
        lock(&self.limit).limit()
    }

    /// How saturated the server is now, for calls whose route table has
    /// time-to-first-token `objective` (see ARCHITECTURE.md, "Saturation"),
    /// when `peers` agents (this one included) share it. The room the
    /// engine had at the last scrape is shared among them: this agent may
    /// add its share, a fraction rounded up with probability equal to it by
    /// `draw` (uniform in [0, 1); 0 for the strictest answer).
    pub fn saturation(
        &self,
        s: &SaturationSettings,
        objective: Option<Duration>,
        peers: u32,
        draw: f64,
        now: Instant,
    ) -> Saturation {
        let peers = f64::from(peers.max(1));
        let capacity = self.spec.capacity.map_or(f64::INFINITY, f64::from);
        let learned = self.learned_limit();
        let own_ttft = match self.ttft_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(us as f64 / 1e6),
        };
        let v = lock(&self.engine);
        let fresh = v
            .scraped_at
            .is_some_and(|at| now.saturating_duration_since(at) <= s.stale_after);
        // Engine figures are expected once the dialect is known, unless the
        // page turned out unreadable (then the learned limit decides).
        let expects = self.spec.metrics != MetricsMode::None
            && v.kind.is_some()
            && v.state != ScrapeState::Garbage;
        let over_objective = |ttft: Option<f64>| {
            objective.is_some_and(|o| ttft.is_some_and(|t| t > o.as_secs_f64()))
        };
        match (&v.figures, expects, fresh) {
            (Some(f), true, true) => {
                let started = self.started.load(Ordering::Relaxed);
                let finished = self.finished.load(Ordering::Relaxed);
                // This agent's calls since the scrape: sent minus finished.
                let mine = (started.saturating_sub(v.started_then) as f64)
                    - (finished.saturating_sub(v.finished_then) as f64);
                // The engine's load now, if every agent sharing it sent as
                // many calls since the scrape as this one.
                let load = (f.running + f.waiting + mine * peers).max(0.0);
                let kv = f.kv_usage.unwrap_or(0.0);
                let kv_limit = (f.running >= 1.0 && kv >= 0.01).then(|| f.running * s.kv_max / kv);
                // Where the engine reports its KV cache, that says what fits
                // (the mix of lengths varies); an idle engine says nothing,
                // so what a full cache held last time, or until it was ever
                // seen busy, the learned limit (a short cold start). Where
                // there is no KV figure, the count it held when it last
                // queued (llama.cpp's slots), or nothing: it queues once.
                let engine_limit = if f.kv_usage.is_some() {
                    kv_limit
                        .or(v.kv_limit.map(|full| full * s.kv_max))
                        .or(Some(learned))
                } else {
                    v.full_at
                };
                let limit = [engine_limit, Some(capacity)]
                    .into_iter()
                    .flatten()
                    .fold(f64::INFINITY, f64::min);
                let score = [
                    if limit.is_finite() { load / limit } else { 0.0 },
                    f.waiting / s.queue_max,
                    kv / s.kv_max,
                ]
                .into_iter()
                .fold(0.0, f64::max);
                let share = (limit - f.running - f.waiting) / peers;
                let saturated = mine + 1.0 > share + draw
                    || f.waiting >= s.queue_max
                    || kv >= s.kv_max
                    || over_objective(v.ttft_p90.or(own_ttft));
                // A finite estimate for the load report, known or remembered.
                let estimate = if limit.is_finite() {
                    limit
                } else {
                    v.kv_limit
                        .map_or(learned, |full| full * s.kv_max)
                        .min(capacity)
                };
                Saturation {
                    score: if saturated { score.max(1.0) } else { score },
                    saturated,
                    limit: estimate,
                    from_engine: true,
                }
            }
            (_, true, false) => Saturation {
                // Stale: the engine may be drowning, or gone.
                score: f64::INFINITY,
                saturated: true,
                limit: v
                    .kv_limit
                    .map(|full| full * s.kv_max)
                    .or(v.full_at)
                    .unwrap_or(learned)
                    .min(capacity),
                from_engine: false,
            },
            _ => {
                let limit = learned.min(capacity);
                let load = f64::from(self.in_flight());
                let saturated = load + 1.0 > limit || over_objective(own_ttft);
                let score = load / limit;
                Saturation {
                    score: if saturated { score.max(1.0) } else { score },
                    saturated,
                    limit,
                    from_engine: false,
                }
            }
        }
    }

    /// Takes in the outcome of a scrape of the engine's metrics.
    fn scraped(&self, outcome: Scrape, now: Instant, epoch: Instant) {
        let mut v = lock(&self.engine);
        let declared = match self.spec.metrics {
            MetricsMode::Engine(k) => Some(k),
            _ => None,
        };
        let url = &self.spec.metrics_url;
        let no_engine = |was: ScrapeState, why: &str| {
            if was != ScrapeState::NoEngine {
                tracing::info!(server = %self.spec.url, metrics = %url, %why, "no engine metrics: the concurrency limit is learned from time to first token");
            }
            ScrapeState::NoEngine
        };
        let next = match outcome {
            Scrape::Page(bytes) => match engine::read(&bytes, v.kind.or(declared)) {
                Page::Engine(kind, f) => {
                    if v.kind.is_none() {
                        tracing::info!(server = %self.spec.url, engine = %kind, "reading the engine's own load from its metrics");
                    }
                    v.kind = Some(kind);
                    v.ttft_p90 = v.ttft.push(now.saturating_duration_since(epoch), f.ttft);
                    if f.waiting > 0.0 {
                        v.full_at = Some(f.running.max(1.0));
                    } else if v.full_at.is_some_and(|full| f.running > full) {
                        v.full_at = None;
                    }
                    let kv = f.kv_usage.unwrap_or(0.0);
                    if f.running >= 1.0 && kv >= 0.01 {
                        v.kv_limit = Some(f.running / kv);
                    }
                    v.figures = Some(f);
                    v.scraped_at = Some(now);
                    v.started_then = self.started.load(Ordering::Relaxed);
                    v.finished_then = self.finished.load(Ordering::Relaxed);
                    ScrapeState::Good
                }
                Page::NoEngine => no_engine(v.state, "no vLLM, SGLang or llama.cpp families"),
                Page::Garbage(why) => {
                    if v.state != ScrapeState::Garbage {
                        tracing::warn!(server = %self.spec.url, metrics = %url, problem = %why, "the engine's metrics cannot be read; the concurrency limit learned from time to first token decides until they can");
                    }
                    ScrapeState::Garbage
                }
            },
            Scrape::Missing(status) => {
                if v.kind.is_none() {
                    // Auto, and there are none (404, say): not an outage.
                    no_engine(v.state, status.as_str())
                } else {
                    if v.state != ScrapeState::Failing {
                        tracing::warn!(server = %self.spec.url, metrics = %url, %status, "the engine's metrics stopped answering: the server counts as saturated while they are stale");
                    }
                    ScrapeState::Failing
                }
            }
            Scrape::Failed(why) => {
                if v.state != ScrapeState::Failing {
                    if v.kind.is_some() {
                        tracing::warn!(server = %self.spec.url, metrics = %url, error = %why, "the engine's metrics do not answer: the server counts as saturated while they are stale");
                    } else {
                        tracing::warn!(server = %self.spec.url, metrics = %url, error = %why, "the model server's metrics do not answer; until they do, the concurrency limit learned from time to first token decides");
                    }
                }
                ScrapeState::Failing
            }
        };
        if next == ScrapeState::Good
            && matches!(v.state, ScrapeState::Failing | ScrapeState::Garbage)
        {
            tracing::info!(server = %self.spec.url, "the engine's metrics answer again");
        }
        v.state = next;
    }
}

/// What one scrape brought.
enum Scrape {
    Page(Bytes),
    /// An error status.
    Missing(StatusCode),
    Failed(String),
}

/// Holds one in-flight slot of a model server until dropped (when a unary
/// answer was read, or a stream ended or was dropped).
pub struct InFlight(Arc<ModelServer>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.finished.fetch_add(1, Ordering::Relaxed);
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

/// How long the agent waits on its peers (model servers, other regions'
/// agents) before it calls them unavailable and the call moves on; see
/// ARCHITECTURE.md, "Hung peers".
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// Connecting: TCP and the TLS handshake together (a stopped peer's
    /// kernel still accepts TCP; only the handshake tells).
    pub connect_timeout: Duration,
    /// The deadline, per attempt, for the first byte (`--attempt-timeout-ms`):
    /// a stream's head (a streaming model server answers its head at once,
    /// before generating, so a silent one is unavailable and the next
    /// region is tried) and a relay's acknowledgment by the destination
    /// agent (which it sends as soon as it takes the call).
    pub header_timeout: Duration,
    /// Until a unary answer has been read whole. Many model servers send a
    /// unary answer's headers only when generation is done, so a unary call
    /// to a model server gets this long for its headers too: a long
    /// generation must not be mistaken for an outage and run again
    /// elsewhere.
    pub body_timeout: Duration,
    /// HTTP/2 pings on relay channels and HTTP/2 model-server connections:
    /// one after this long without a frame from the peer (and the first
    /// TCP keep-alive probe on HTTP/1 model-server connections, then one
    /// per interval).
    pub keepalive_interval: Duration,
    /// A ping unanswered this long closes the connection, and fails the
    /// calls on it (before their first byte, they move on). TCP keep-alive
    /// gives up after as many probes as fit in it.
    pub keepalive_timeout: Duration,
    /// Whom `https://` model servers are trusted by: their certificate must
    /// chain to these roots. `None`: no https server can be reached.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub saturation: SaturationSettings,
    /// Following the names of servers given with `dns`.
    pub discovery: DiscoverySettings,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings {
            connect_timeout: Duration::from_secs(2),
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(600),
            keepalive_interval: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(2),
            tls: None,
            saturation: SaturationSettings::default(),
            discovery: DiscoverySettings::default(),
        }
    }
}

/// TCP keep-alive probes sent before a silent connection is given up: as
/// many as fit in the keep-alive timeout, at least one.
fn keepalive_probes(s: &UpstreamSettings) -> u32 {
    let interval = s.keepalive_interval.as_millis().max(1);
    s.keepalive_timeout
        .as_millis()
        .div_ceil(interval)
        .clamp(1, 127) as u32
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
    /// The servers now: those given by address, and the addresses of those
    /// given by a name to follow. Replaced whole when a name's addresses
    /// change; a call holds the server it picked.
    servers: RwLock<Arc<Vec<Arc<ModelServer>>>>,
    /// The `--model-server` specs as given: what the region serves.
    declared: Vec<ModelServerSpec>,
    /// How each followed name's last lookup went (by spec index), to log
    /// only changes.
    followed: Mutex<Vec<(usize, Result<usize, String>)>>,
    /// Set by `spawn_scrapers`: servers that join later are scraped too.
    scrapers: Mutex<Option<spillway_core::shutdown::Shutdown>>,
    http1: Client<Bounded<HttpsConnector<HttpConnector>>, Full<Bytes>>,
    http2: Client<Bounded<HttpsConnector<HttpConnector>>, Full<Bytes>>,
    settings: UpstreamSettings,
    /// Servers ejected after failing or throttling calls in a row, by URL.
    ejected: Outliers<String>,
    /// When the agent started: the origin of the TTFT windows' clocks.
    epoch: Instant,
    /// The agents of this region, which share its model servers.
    peers: AtomicU32,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("servers", &self.servers())
            .finish()
    }
}

impl Upstreams {
    pub fn new(specs: Vec<ModelServerSpec>, settings: UpstreamSettings) -> Upstreams {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_nodelay(true);
        // A host that vanished (a black-holed network) is noticed on an
        // HTTP/1 connection only by TCP keep-alive: a unary answer may be
        // minutes of silence. (A peer's kernel answers the probes for a
        // stopped process: that one only the body timeout bounds.)
        connector.set_keepalive(Some(settings.keepalive_interval));
        connector.set_keepalive_interval(Some(settings.keepalive_interval));
        connector.set_keepalive_retries(Some(keepalive_probes(&settings)));
        // https:// URLs go through the TLS layer below.
        connector.enforce_http(false);
        let tls = settings
            .tls
            .as_deref()
            .cloned()
            .unwrap_or_else(trusting_nobody);
        // The connect timeout covers the TLS handshake too, which the TCP
        // connector's own does not.
        let bounded = |c| Bounded::new(c, settings.connect_timeout);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(bounded(
                HttpsConnectorBuilder::new()
                    .with_tls_config(tls.clone())
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(connector.clone()),
            ));
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(90))
            // A peer that stops answering pings is dropped, with the calls
            // on it, rather than waited on.
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(Some(settings.keepalive_interval))
            .http2_keep_alive_timeout(settings.keepalive_timeout)
            .http2_keep_alive_while_idle(true)
            .build(bounded(
                HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_or_http()
                    .enable_http2()
                    .wrap_connector(connector),
            ));
        // Servers given by a name to follow have none until it is resolved.
        let servers = specs
            .iter()
            .filter(|spec| !spec.dns)
            .map(|spec| ModelServer::new(spec.clone(), None))
            .collect();
        Upstreams {
            servers: RwLock::new(Arc::new(servers)),
            declared: specs,
            followed: Mutex::new(Vec::new()),
            scrapers: Mutex::new(None),
            http1,
            http2,
            settings,
            ejected: Outliers::new(OutlierSettings::default()),
            epoch: Instant::now(),
            peers: AtomicU32::new(1),
        }
    }

    /// How many agents of this region share its model servers (from the
    /// control plane's snapshot; at least one).
    pub fn set_peers(&self, agents: u32) {
        self.peers.store(agents.max(1), Ordering::Relaxed);
    }

    /// The servers now.
    pub fn servers(&self) -> Arc<Vec<Arc<ModelServer>>> {
        self.servers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Resolves every followed name once (at start, so that the first calls
    /// find their servers).
    pub async fn discover_once(self: &Arc<Self>) {
        let all = self
            .declared
            .iter()
            .enumerate()
            .filter(|(_, spec)| spec.dns)
            .map(|(i, _)| self.discover(i));
        futures_util::future::join_all(all).await;
    }

    /// Follows each name given with `dns`: re-resolved every
    /// `discovery.every` until `shutdown`. Call once, after
    /// [`Upstreams::discover_once`].
    pub fn spawn_discovery(self: &Arc<Self>, shutdown: &spillway_core::shutdown::Shutdown) {
        for (i, _) in self.declared.iter().enumerate().filter(|(_, s)| s.dns) {
            let (me, mut stop) = (self.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(me.settings.discovery.every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = stop.wait() => return,
                        _ = tick.tick() => me.discover(i).await,
                    }
                }
            });
        }
    }

    /// Resolves the name of spec `i` and makes the servers its addresses:
    /// new ones join, gone ones leave (their calls finish). No answer keeps
    /// what was known.
    async fn discover(self: &Arc<Self>, i: usize) {
        let spec = &self.declared[i];
        let uri: Uri = spec.url.parse().expect("checked when the spec was parsed");
        let host = uri.host().unwrap_or_default().to_string();
        // Bounded: the system's resolver has no deadline of its own here.
        let found = tokio::time::timeout(
            DISCOVERY_TIMEOUT,
            self.settings.discovery.resolver.lookup(&host),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {DISCOVERY_TIMEOUT:?}")));
        let outcome = found.as_ref().map(Vec::len).map_err(Clone::clone);
        {
            let mut seen = lock(&self.followed);
            let last = seen.iter_mut().find(|(j, _)| *j == i);
            let changed = last.as_ref().is_none_or(|(_, o)| *o != outcome);
            if changed {
                match &outcome {
                    Ok(n) => {
                        tracing::info!(server = %spec.url, addresses = n, "model server name resolved")
                    }
                    Err(e) => {
                        tracing::warn!(server = %spec.url, error = %e, "cannot resolve a model server's name: its last known addresses stay")
                    }
                }
                match last {
                    Some(l) => l.1 = outcome,
                    None => seen.push((i, outcome)),
                }
            }
        }
        let Ok(addrs) = found else { return };
        let wanted: Vec<ModelServerSpec> =
            addrs.iter().map(|ip| member(spec, &host, *ip)).collect();
        let mut joined = Vec::new();
        {
            let mut current = self.servers.write().unwrap_or_else(|e| e.into_inner());
            let mut next: Vec<Arc<ModelServer>> = Vec::with_capacity(current.len());
            for s in current.iter() {
                if s.discovered_from == Some(i) && !wanted.iter().any(|w| w.url == s.spec.url) {
                    s.removed.store(true, Ordering::Release);
                    tracing::info!(name = %spec.url, server = %s.spec.url, in_flight = s.in_flight(), "model server left: it takes no new calls");
                } else {
                    next.push(s.clone());
                }
            }
            for w in wanted {
                // Another name (or a server given by address) may have the
                // same address: each name keeps its own members.
                if !next
                    .iter()
                    .any(|s| s.discovered_from == Some(i) && s.spec.url == w.url)
                {
                    tracing::info!(name = %spec.url, server = %w.url, "model server joined");
                    let server = ModelServer::new(w, Some(i));
                    joined.push(server.clone());
                    next.push(server);
                }
            }
            if !joined.is_empty() || next.len() != current.len() {
                *current = Arc::new(next);
            }
        }
        let scrapers = lock(&self.scrapers).clone();
        if let Some(stop) = scrapers {
            for server in joined {
                self.spawn_scraper(server, stop.clone());
            }
        }
    }

    /// What the servers did since the last call of this, for the load
    /// report (the counters restart).
    pub fn load_report(&self, interval: Duration) -> spillway_proto::pb::LoadReport {
        let now = Instant::now();
        let settings = &self.settings.saturation;
        let servers = self
            .servers()
            .iter()
            .map(|s| {
                let peers = self.peers.load(Ordering::Relaxed);
                let sat = s.saturation(settings, None, peers, 0.0, now);
                let engine = {
                    let v = lock(&s.engine);
                    // An unreadable page is not an engine's figures: the
                    // learned limit decides, and is what the report says.
                    let readable = v.state != ScrapeState::Garbage;
                    v.kind.filter(|_| readable).map(|kind| {
                        let f = v.figures.unwrap_or_default();
                        let age = v.scraped_at.map(|at| now.saturating_duration_since(at));
                        spillway_proto::pb::EngineLoad {
                            kind: kind.to_string(),
                            running: f.running,
                            waiting: f.waiting,
                            kv_usage: f.kv_usage,
                            ttft_p90_ms: v.ttft_p90.map_or(0.0, |t| t * 1000.0),
                            fresh: age.is_some_and(|a| a <= settings.stale_after),
                            age_ms: age.map_or(0, |a| a.as_millis() as u64),
                        }
                    })
                };
                spillway_proto::pb::ServerLoad {
                    url: s.spec.url.clone(),
                    models: s.spec.models.iter().cloned().collect(),
                    capacity: s.spec.capacity.unwrap_or(0),
                    in_flight: s.in_flight(),
                    calls: s.calls.swap(0, Ordering::Relaxed),
                    errors: s.errors.swap(0, Ordering::Relaxed),
                    throttles: s.throttles.swap(0, Ordering::Relaxed),
                    latency_ewma_us: s.latency_us.load(Ordering::Relaxed),
                    ttft_ewma_us: s.ttft_us.load(Ordering::Relaxed),
                    total_ewma_us: s.total_us.load(Ordering::Relaxed),
                    output_tokens: s.output_tokens.swap(0, Ordering::Relaxed),
                    engine,
                    learned_limit: s.learned_limit(),
                    limit: if sat.limit.is_finite() {
                        sat.limit
                    } else {
                        0.0
                    },
                    saturation: if sat.score.is_finite() {
                        sat.score
                    } else {
                        1e9
                    },
                }
            })
            .collect();
        spillway_proto::pb::LoadReport {
            servers,
            interval_seconds: interval.as_secs_f64(),
            relays: Vec::new(),
            quotas: Vec::new(),
        }
    }

    /// Scrapes each server's engine metrics every `scrape_interval`, until
    /// `shutdown` (and servers that join later, from when they join). Call
    /// once, after [`Upstreams::scrape_once`].
    pub fn spawn_scrapers(self: &Arc<Self>, shutdown: &spillway_core::shutdown::Shutdown) {
        *lock(&self.scrapers) = Some(shutdown.clone());
        for server in self.servers().iter() {
            self.spawn_scraper(server.clone(), shutdown.clone());
        }
    }

    /// Scrapes `server` every interval until shutdown or until it leaves;
    /// one that joined after the start is scraped at once.
    fn spawn_scraper(
        self: &Arc<Self>,
        server: Arc<ModelServer>,
        mut stop: spillway_core::shutdown::Shutdown,
    ) {
        if server.spec.metrics == MetricsMode::None {
            return;
        }
        let me = self.clone();
        let scraped = lock(&server.engine).scraped_at.is_some();
        tokio::spawn(async move {
            let every = me.settings.saturation.scrape_interval;
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            if scraped {
                tick.tick().await;
            }
            let scraping = async {
                loop {
                    tick.tick().await;
                    if server.removed.load(Ordering::Acquire) {
                        return;
                    }
                    me.scrape(&server).await;
                    // A server found to have no engine metrics is asked
                    // again now and then (it may come back as one that
                    // has them).
                    if lock(&server.engine).state == ScrapeState::NoEngine {
                        tokio::time::sleep(NO_ENGINE_RECHECK).await;
                    }
                }
            };
            tokio::select! {
                _ = stop.wait() => {}
                _ = scraping => {}
            }
        });
    }

    /// Scrapes every server's metrics once, together (at start, so that the
    /// first calls are placed with the engines' figures, and a metrics URL
    /// that does not answer is reported at once).
    pub async fn scrape_once(&self) {
        let servers = self.servers();
        let all = servers
            .iter()
            .filter(|s| s.spec.metrics != MetricsMode::None)
            .map(|s| self.scrape(s));
        futures_util::future::join_all(all).await;
    }

    async fn scrape(&self, server: &ModelServer) {
        let timeout = (self.settings.saturation.scrape_interval * 2).min(Duration::from_secs(2));
        let outcome = match tokio::time::timeout(timeout, self.fetch_metrics(server)).await {
            Ok(outcome) => outcome,
            Err(_) => Scrape::Failed(format!("no answer within {timeout:?}")),
        };
        server.scraped(outcome, Instant::now(), self.epoch);
    }

    async fn fetch_metrics(&self, server: &ModelServer) -> Scrape {
        let Ok(uri) = server.spec.metrics_url.parse::<Uri>() else {
            return Scrape::Failed("not a URL".into());
        };
        let req = Request::get(uri)
            .header(header::ACCEPT, "text/plain;version=0.0.4")
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        let client = if server.spec.http2 {
            &self.http2
        } else {
            &self.http1
        };
        let resp = match client.request(req).await {
            Ok(r) => r,
            Err(e) => return Scrape::Failed(chain(&e)),
        };
        if !resp.status().is_success() {
            return Scrape::Missing(resp.status());
        }
        match http_body_util::Limited::new(resp.into_body(), MAX_METRICS_PAGE)
            .collect()
            .await
        {
            Ok(body) => Scrape::Page(body.to_bytes()),
            Err(e) => Scrape::Failed(format!("reading the page: {e}")),
        }
    }

    /// Picks a server for `model` by power of two choices among those that
    /// are not saturated, the less saturated of the two, and takes a slot.
    fn pick(
        &self,
        model: &str,
        api: Api,
        objective: Option<Duration>,
    ) -> Result<(Arc<ModelServer>, InFlight), CallError> {
        let servers = self.servers();
        let mut serving: Vec<&Arc<ModelServer>> = servers
            .iter()
            .filter(|s| s.spec.models.contains(model) && s.spec.apis.contains(api))
            .collect();
        if serving.is_empty() {
            return Err(CallError::Unavailable(format!(
                "no model server in this region serves `{model}` over the {api} API"
            )));
        }
        // Leave ejected servers out, unless every one is ejected.
        let now = Instant::now();
        let healthy: Vec<&Arc<ModelServer>> = serving
            .iter()
            .copied()
            .filter(|s| !self.ejected.is_ejected(&s.spec.url, now))
            .collect();
        if !healthy.is_empty() {
            serving = healthy;
        }
        // Scores are read once: they move under concurrent calls, and a
        // choice must see one consistent view.
        let open: Vec<(&Arc<ModelServer>, f64)> = serving
            .iter()
            .map(|s| {
                let sat = s.saturation(
                    &self.settings.saturation,
                    objective,
                    self.peers.load(Ordering::Relaxed),
                    fastrand::f64(),
                    now,
                );
                (*s, sat)
            })
            .filter(|(_, sat)| !sat.saturated)
            .map(|(s, sat)| (s, sat.score))
            .collect();
        let chosen = match open.len() {
            0 => {
                return Err(CallError::AtCapacity(format!(
                    "every model server for `{model}` in this region is saturated"
                )));
            }
            1 => open[0].0,
            n => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                if open[a].1 <= open[b].1 {
                    open[a].0
                } else {
                    open[b].0
                }
            }
        };
        chosen.in_flight.fetch_add(1, Ordering::AcqRel);
        chosen.started.fetch_add(1, Ordering::AcqRel);
        Ok((chosen.clone(), InFlight(chosen.clone())))
    }

    /// Whether a model server of this region serves `model` over `api`:
    /// one given with `--model-server` (a followed name serves what it
    /// declares while it has no address too: a configuration is not
    /// refused because a Deployment scaled to zero for a while).
    pub fn serves(&self, model: &str, api: Api) -> bool {
        self.declared
            .iter()
            .any(|s| s.models.contains(model) && s.apis.contains(api))
    }

    /// The APIs this region's model servers serve, together.
    pub fn apis(&self) -> ApiSet {
        self.declared
            .iter()
            .fold(ApiSet::default(), |set, s| set.union(s.apis))
    }

    /// Calls a model server of this region. `body` is the request of `api`
    /// with `model` already set. Servers whose time to first token is past
    /// `objective` count as saturated.
    pub async fn call(
        &self,
        model: &str,
        api: Api,
        body: Bytes,
        stream: bool,
        objective: Option<Duration>,
    ) -> Result<UpstreamAnswer, CallError> {
        let (server, slot) = self.pick(model, api, objective)?;
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
                    .servers()
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
        let sent_with = server.in_flight();
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
        ewma(&server.latency_us, started.elapsed());
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            if !server.spec.fixed {
                lock(&server.limit).on_overload(started, sent_with, Instant::now());
            }
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
                            let ttft = started.elapsed();
                            ewma(&first.ttft_us, ttft);
                            if !first.spec.fixed {
                                lock(&first.limit).on_first_token(
                                    started,
                                    sent_with,
                                    ttft,
                                    Instant::now(),
                                );
                            }
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

/// The server at `ip` of the followed spec `spec` (whose URL's host is
/// `host`): the same URL with the address for the host, and its metrics
/// URL too when that names the same host.
fn member(spec: &ModelServerSpec, host: &str, ip: std::net::IpAddr) -> ModelServerSpec {
    let at = |url: &str| -> String {
        let Ok(uri) = url.parse::<Uri>() else {
            return url.to_string();
        };
        if uri.host() != Some(host) {
            return url.to_string();
        }
        let port = uri.port_u16().unwrap_or(80);
        let authority = match ip {
            std::net::IpAddr::V4(v4) => format!("{v4}:{port}"),
            std::net::IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        };
        let path = uri.path_and_query().map_or("", |p| p.as_str());
        let path = if path == "/" && !url.ends_with('/') {
            ""
        } else {
            path
        };
        format!("{}://{authority}{path}", uri.scheme_str().unwrap_or("http"))
    };
    ModelServerSpec {
        url: at(&spec.url),
        metrics_url: at(&spec.metrics_url),
        dns: false,
        ..spec.clone()
    }
}

/// How names given with `dns` are followed.
#[derive(Debug, Clone)]
pub struct DiscoverySettings {
    pub resolver: Resolver,
    /// How often each name is resolved again (`--dns-refresh-ms`).
    pub every: Duration,
}

impl Default for DiscoverySettings {
    fn default() -> Self {
        DiscoverySettings {
            resolver: Resolver::System,
            every: Duration::from_secs(5),
        }
    }
}

/// How long one lookup of a followed name may take.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest metrics page read (a vLLM server's is about 100 KB).
const MAX_METRICS_PAGE: usize = 8 * 1024 * 1024;

/// How often a server found to have no engine metrics is asked again.
const NO_ENGINE_RECHECK: Duration = Duration::from_secs(10);

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
            capacity: Some(capacity),
            fixed: true,
            metrics: MetricsMode::None,
            ..ModelServerSpec::new(url, ["m"])
        }
    }

    #[test]
    fn a_followed_name_is_http_with_a_host_name_and_each_address_a_server() {
        let s: ModelServerSpec =
            "http://vllm.ns.svc:8000,models=m,dns,metrics_url=http://vllm.ns.svc:9090/metrics"
                .parse()
                .unwrap();
        assert!(s.dns);
        let m = member(&s, "vllm.ns.svc", "10.1.2.3".parse().unwrap());
        assert_eq!(m.url, "http://10.1.2.3:8000");
        assert_eq!(m.metrics_url, "http://10.1.2.3:9090/metrics");
        assert!(!m.dns);
        let m = member(&s, "vllm.ns.svc", "fd00::7".parse().unwrap());
        assert_eq!(m.url, "http://[fd00::7]:8000");
        // No port: 80; a metrics URL elsewhere stays where it is.
        let s: ModelServerSpec = "http://vllm/base,models=m,dns,metrics_url=http://stats:1/m"
            .parse()
            .unwrap();
        let m = member(&s, "vllm", "10.0.0.9".parse().unwrap());
        assert_eq!(m.url, "http://10.0.0.9:80/base");
        assert_eq!(m.metrics_url, "http://stats:1/m");
        for (flag, why) in [
            ("https://vllm:8443,models=m,dns", "http:// only"),
            ("http://10.0.0.1:8000,models=m,dns", "not an address"),
            ("http://[::1]:8000,models=m,dns", "not an address"),
        ] {
            let e = flag.parse::<ModelServerSpec>().unwrap_err();
            assert!(e.contains(why), "{flag}: {e}");
        }
    }

    #[tokio::test]
    async fn a_followed_name_takes_its_servers_from_the_resolver() {
        // `localhost` through the system resolver: its loopback addresses.
        let spec: ModelServerSpec = "http://localhost:9,models=m,dns,metrics=none"
            .parse()
            .unwrap();
        let up = Arc::new(Upstreams::new(vec![spec], UpstreamSettings::default()));
        assert!(up.servers().is_empty());
        assert!(up.serves("m", Api::Chat), "declared, before any address");
        up.discover_once().await;
        let servers = up.servers();
        assert!(!servers.is_empty());
        assert!(
            servers
                .iter()
                .all(|s| s.spec.url.starts_with("http://127.0.0.1:9")
                    || s.spec.url.starts_with("http://[::1]:9")),
            "{:?}",
            servers.iter().map(|s| &s.spec.url).collect::<Vec<_>>()
        );
    }

    #[test]
    fn parses_model_server_flags() {
        let s: ModelServerSpec = "http://127.0.0.1:8000/,models=a|b,capacity=8,http2"
            .parse()
            .unwrap();
        assert_eq!(s.url, "http://127.0.0.1:8000");
        assert_eq!(s.models.len(), 2);
        assert_eq!((s.capacity, s.http2, s.fixed), (Some(8), true, false));
        assert_eq!(s.apis, ApiSet::of(Api::DEFAULT));
        assert_eq!(s.metrics, MetricsMode::Auto);
        assert_eq!(s.metrics_url, "http://127.0.0.1:8000/metrics");
        let s: ModelServerSpec = "http://x,models=a,apis=embeddings|messages"
            .parse()
            .unwrap();
        assert_eq!(s.apis, ApiSet::of([Api::Embeddings, Api::Messages]));
        assert_eq!(s.capacity, None);
        let s: ModelServerSpec =
            "http://x:8000,models=a,metrics=vllm,metrics_url=http://x:9090/m,capacity=4,static"
                .parse()
                .unwrap();
        assert_eq!(s.metrics, MetricsMode::Engine(EngineKind::Vllm));
        assert_eq!(s.metrics_url, "http://x:9090/m");
        assert_eq!((s.capacity, s.fixed), (Some(4), true));
        assert_eq!(
            "http://x,models=a,apis=chat|bogus"
                .parse::<ModelServerSpec>()
                .unwrap_err(),
            "unknown API `bogus`: one of chat, completions, embeddings, responses, messages"
        );
        assert_eq!(
            "http://x,models=a,metrics=bogus"
                .parse::<ModelServerSpec>()
                .unwrap_err(),
            "unknown metrics `bogus`: one of auto, vllm, sglang, llamacpp, none"
        );
        let s: ModelServerSpec = "https://vllm.internal:8443,models=a".parse().unwrap();
        assert_eq!(s.url, "https://vllm.internal:8443");
        for bad in [
            "ftp://x,models=a",
            "http://x",
            "http://x,models=a,capacity=0",
            "http://x,models=a,weird",
            "http://x,models=a,apis=",
            "http://x,models=a,static",
            "http://x,models=a,metrics_url=nope",
        ] {
            assert!(bad.parse::<ModelServerSpec>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn picks_by_load_and_spills_at_a_fixed_capacity() {
        let up = Upstreams::new(
            vec![spec("http://a", 2), spec("http://b", 2)],
            UpstreamSettings::default(),
        );
        let mut slots = Vec::new();
        for _ in 0..4 {
            slots.push(up.pick("m", Api::Chat, None).expect("a free slot").1);
        }
        // Both servers were filled evenly, then the region is saturated.
        assert_eq!(up.servers()[0].in_flight(), 2);
        assert_eq!(up.servers()[1].in_flight(), 2);
        assert!(matches!(
            up.pick("m", Api::Chat, None),
            Err(CallError::AtCapacity(_))
        ));
        slots.pop();
        assert!(up.pick("m", Api::Chat, None).is_ok());
        assert!(matches!(
            up.pick("other", Api::Chat, None),
            Err(CallError::Unavailable(_))
        ));
        // Neither server says it serves embeddings.
        assert!(matches!(
            up.pick("m", Api::Embeddings, None),
            Err(CallError::Unavailable(_))
        ));
    }

    fn vllm_page(running: f64, waiting: f64, kv: f64) -> Bytes {
        Bytes::from(format!(
            "vllm:num_requests_running{{model_name=\"m\"}} {running}\n\
             vllm:num_requests_waiting{{model_name=\"m\"}} {waiting}\n\
             vllm:kv_cache_usage_perc{{model_name=\"m\"}} {kv}\n"
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn engine_figures_decide_and_go_stale() {
        let up = Upstreams::new(
            vec![ModelServerSpec::new("http://a", ["m"])],
            UpstreamSettings::default(),
        );
        let s = &up.servers()[0];
        let cfg = SaturationSettings::default();
        let now = || Instant::now();
        // Before any page (auto): the learned limit (4 to start) decides.
        let sat = s.saturation(&cfg, None, 1, 0.0, now());
        assert!(
            !sat.saturated && !sat.from_engine && sat.limit == 4.0,
            "{sat:?}"
        );
        // Six running use 45% of the KV cache: twelve would fill 90%.
        s.scraped(Scrape::Page(vllm_page(6.0, 0.0, 0.45)), now(), up.epoch);
        let sat = s.saturation(&cfg, None, 1, 0.0, now());
        assert!(sat.from_engine && !sat.saturated, "{sat:?}");
        assert!((sat.limit - 12.0).abs() < 1e-9 && (sat.score - 0.5).abs() < 1e-9);
        // This agent sends five more before the next scrape: 11 + 1 fits,
        // 12 + 1 does not.
        let mut slots = Vec::new();
        for _ in 0..5 {
            slots.push(up.pick("m", Api::Chat, None).unwrap().1);
        }
        slots.push(up.pick("m", Api::Chat, None).unwrap().1);
        assert!(matches!(
            up.pick("m", Api::Chat, None),
            Err(CallError::AtCapacity(_))
        ));
        // A queue of two, or the KV cache at 90%, is saturation whatever
        // the count says.
        slots.clear();
        s.scraped(Scrape::Page(vllm_page(1.0, 2.0, 0.1)), now(), up.epoch);
        assert!(s.saturation(&cfg, None, 1, 0.0, now()).saturated);
        s.scraped(Scrape::Page(vllm_page(1.0, 0.0, 0.95)), now(), up.epoch);
        assert!(s.saturation(&cfg, None, 1, 0.0, now()).saturated);
        s.scraped(Scrape::Page(vllm_page(1.0, 0.0, 0.05)), now(), up.epoch);
        assert!(!s.saturation(&cfg, None, 1, 0.0, now()).saturated);
        // The metrics stop answering: stale after a second, saturated.
        tokio::time::advance(Duration::from_millis(500)).await;
        s.scraped(Scrape::Failed("refused".into()), now(), up.epoch);
        assert!(!s.saturation(&cfg, None, 1, 0.0, now()).saturated);
        tokio::time::advance(Duration::from_millis(600)).await;
        let sat = s.saturation(&cfg, None, 1, 0.0, now());
        assert!(sat.saturated && sat.score.is_infinite(), "{sat:?}");
        // Garbage: the learned limit decides again, not saturated.
        s.scraped(Scrape::Page(Bytes::from_static(b"<html>")), now(), up.epoch);
        let sat = s.saturation(&cfg, None, 1, 0.0, now());
        assert!(!sat.saturated && !sat.from_engine, "{sat:?}");
        // And a good page brings the engine back.
        s.scraped(Scrape::Page(vllm_page(2.0, 0.0, 0.1)), now(), up.epoch);
        assert!(s.saturation(&cfg, None, 1, 0.0, now()).from_engine);
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_bounds_the_engine_and_declared_engines_start_saturated() {
        let bounded = ModelServerSpec {
            capacity: Some(3),
            metrics: MetricsMode::Engine(EngineKind::Vllm),
            ..ModelServerSpec::new("http://a", ["m"])
        };
        let up = Upstreams::new(vec![bounded], UpstreamSettings::default());
        let s = &up.servers()[0];
        let cfg = SaturationSettings::default();
        // Declared vLLM, never scraped: no figures yet, saturated.
        assert!(s.saturation(&cfg, None, 1, 0.0, Instant::now()).saturated);
        s.scraped(
            Scrape::Page(vllm_page(3.0, 0.0, 0.1)),
            Instant::now(),
            up.epoch,
        );
        let sat = s.saturation(&cfg, None, 1, 0.0, Instant::now());
        assert!(sat.saturated && sat.limit == 3.0, "{sat:?}");
        // Without metrics, `capacity` is where the learned limit starts.
        let up = Upstreams::new(
            vec![ModelServerSpec {
                capacity: Some(3),
                metrics: MetricsMode::None,
                ..ModelServerSpec::new("http://a", ["m"])
            }],
            UpstreamSettings::default(),
        );
        assert_eq!(up.servers()[0].learned_limit(), 3.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ttft_objective_is_saturation() {
        let up = Upstreams::new(
            vec![ModelServerSpec::new("http://a", ["m"])],
            UpstreamSettings::default(),
        );
        let s = &up.servers()[0];
        let cfg = SaturationSettings::default();
        let page = |count_fast: u32, count_slow: u32| {
            Bytes::from(format!(
                "vllm:num_requests_running 1\n\
                 vllm:time_to_first_token_seconds_bucket{{le=\"0.1\"}} {count_fast}\n\
                 vllm:time_to_first_token_seconds_bucket{{le=\"1.0\"}} {}\n\
                 vllm:time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {}\n",
                count_fast + count_slow,
                count_fast + count_slow
            ))
        };
        s.scraped(Scrape::Page(page(10, 0)), Instant::now(), up.epoch);
        tokio::time::advance(Duration::from_millis(250)).await;
        // Ten more calls, all between 0.1 and 1 s: p90 over 0.1 s.
        s.scraped(Scrape::Page(page(10, 10)), Instant::now(), up.epoch);
        let objective = Some(Duration::from_millis(100));
        assert!(
            s.saturation(&cfg, objective, 1, 0.0, Instant::now())
                .saturated
        );
        assert!(
            !s.saturation(&cfg, Some(Duration::from_secs(2)), 1, 0.0, Instant::now())
                .saturated
        );
        assert!(!s.saturation(&cfg, None, 1, 0.0, Instant::now()).saturated);
    }
}
