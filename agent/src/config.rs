//! The agent's settings: one typed struct, from flags and environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::upstream::ModelServerSpec;

/// Spillway agent: takes inference calls for one region and routes them to
/// that region's model servers or to another region's agent.
#[derive(Parser, Debug, Clone)]
#[command(name = "spillway-agent", version, about)]
pub struct AgentArgs {
    /// This agent's id, unique within its region.
    #[arg(long, env = "SPILLWAY_AGENT_ID")]
    pub agent_id: String,
    /// The region this agent serves, e.g. `us-east`.
    #[arg(long, env = "SPILLWAY_REGION")]
    pub region: String,
    /// Control-plane addresses, comma-separated; the agent moves to the next
    /// when one goes away.
    #[arg(
        long,
        env = "SPILLWAY_CONTROL_PLANE",
        value_delimiter = ',',
        required = true
    )]
    pub control_plane: Vec<String>,
    /// Address of the agent's gRPC server (relay, health).
    #[arg(long, env = "SPILLWAY_GRPC_LISTEN", default_value = "127.0.0.1:7080")]
    pub grpc_listen: SocketAddr,
    /// The host:port other regions' agents use to reach this one (default:
    /// the gRPC listen address).
    #[arg(long, env = "SPILLWAY_RELAY_ADDRESS")]
    pub relay_address: Option<String>,
    /// Where the last good configuration is kept, to boot without the
    /// control plane.
    #[arg(
        long,
        env = "SPILLWAY_STATE_DIR",
        default_value = "/var/lib/spillway-agent"
    )]
    pub state_dir: PathBuf,
    /// Address of the OpenAI-compatible HTTP front door.
    #[arg(long, env = "SPILLWAY_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// A model server of this region, repeatable:
    /// `URL,models=a|b[,apis=chat|completions|embeddings|responses|messages]
    /// [,metrics=auto|vllm|sglang|llamacpp|none][,metrics_url=URL]
    /// [,capacity=N[,static]][,http2][,dns]`. Its load comes from the engine's own
    /// metrics (`metrics=auto` detects vLLM, SGLang and llama.cpp at
    /// `URL/metrics`), else from a concurrency limit learned from time to
    /// first token; `capacity` is an optional upper bound (`static`: a fixed
    /// limit, nothing learned). An update that routes a profile to this
    /// region for a model none of them serves is refused (NACKed).
    /// `dns` (http:// only): the host is a name whose A/AAAA records are
    /// followed, one server per address, e.g. a Kubernetes headless
    /// Service (see --dns-refresh-ms).
    #[arg(
        long = "model-server",
        env = "SPILLWAY_MODEL_SERVERS",
        value_delimiter = ' '
    )]
    pub model_servers: Vec<ModelServerSpec>,
    /// The CA (PEM) that `https://` model servers' certificates must chain
    /// to; required with one (the deployment's CA is not trusted for model
    /// servers). Plain `http://` servers need none.
    #[arg(long, env = "SPILLWAY_MODEL_SERVER_CA")]
    pub model_server_ca: Option<PathBuf>,
    /// How often the names of model servers given with `dns` are resolved
    /// again, in ms: new addresses join, gone ones stop taking calls (their
    /// calls finish). A lookup that gets no answer keeps the last addresses.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub dns_refresh_ms: u64,
    /// Ask this nameserver (`IP:PORT`) for the names of `dns` model
    /// servers, instead of the system's resolver (which applies
    /// /etc/hosts and resolv.conf's search domains; give full names here).
    #[arg(long, env = "SPILLWAY_DNS_SERVER")]
    pub dns_server: Option<std::net::SocketAddr>,
    /// How often each model server's engine metrics are scraped, in ms.
    /// Figures older than four intervals (at least a second) are stale, and
    /// the server counts as saturated.
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub metrics_interval_ms: u64,
    /// KV-cache usage (0 to 1] at which an engine counts as saturated.
    #[arg(long, default_value_t = 0.9, value_parser = parse_fraction)]
    pub saturation_kv: f64,
    /// Requests waiting in an engine's queue at which it counts as saturated.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub saturation_queue: u32,
    /// Regions a call tries at most, the first included.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=10))]
    pub max_attempts: u8,
    /// Largest request accepted: an HTTP body (larger ones get 413, before
    /// the body is read when `Content-Length` says so) or a Converse gRPC
    /// message (RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Seconds a client has, once the request head arrived, to send the
    /// whole request body; then it gets 408 and the connection is closed.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_read_timeout_secs: u64,
    /// Milliseconds, per attempt, until the first byte: a streaming call's
    /// head from a model server or another region, and another region's
    /// acknowledgment of a relayed call. Past it, the next region is
    /// tried. (A unary call's head from a model server comes only when
    /// generation is done; that is bounded by the answer's own timeout.)
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub attempt_timeout_ms: u64,
    /// Seconds for the same deadline (the older flag; use
    /// --attempt-timeout-ms).
    #[arg(long, hide = true, conflicts_with = "attempt_timeout_ms", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub upstream_timeout_secs: Option<u64>,
    /// Milliseconds to connect to a model server or another region's agent,
    /// TCP and TLS handshake together.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(50..=600_000))]
    pub connect_timeout_ms: u64,
    /// Milliseconds of silence from another region's agent (or an HTTP/2
    /// model server) after which the agent pings it; also the TCP
    /// keep-alive interval of HTTP/1 model-server connections.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub keepalive_interval_ms: u64,
    /// Milliseconds a ping may go unanswered before the connection, and
    /// the calls on it, are given up (those before their first byte fail
    /// over).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub keepalive_timeout_ms: u64,
    /// Seconds a client has, from its first byte, to send a request's
    /// whole head (with TLS, the handshake too); then the connection is
    /// closed.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub header_read_timeout_secs: u64,
    /// Seconds a connection with no call in flight stays open.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub idle_timeout_secs: u64,
    /// Connections open at once on each port (HTTP door, gRPC); past it new
    /// ones are refused (HTTP: 503) and the open ones keep being served.
    /// Capped at three quarters of the open-files limit.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
    /// On SIGTERM or SIGINT: seconds that calls in flight get to finish
    /// before the agent writes out its audit log and exits.
    #[arg(long, env = "SPILLWAY_DRAIN_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub drain_secs: u64,
    /// Output tokens a call reserves against a token quota when it sets no
    /// `max_tokens`.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub default_max_tokens: u64,
    /// Serve calls that present no API key, as no tenant (for trials and
    /// development). A key that is presented is checked all the same.
    #[arg(long)]
    pub allow_anonymous: bool,
    /// Folder for the audit log (one JSON line per call this agent took as
    /// the source agent; never a prompt or an answer). None when unset.
    #[arg(long, env = "SPILLWAY_AUDIT_DIR")]
    pub audit_dir: Option<PathBuf>,
    /// Size past which the audit log is rotated.
    #[arg(long, default_value_t = 100 * 1024 * 1024)]
    pub audit_max_bytes: u64,
    /// Also export every audit record as an OTLP log record to
    /// `--otlp-endpoint` (the region's collector).
    #[arg(long)]
    pub audit_otlp: bool,
    /// Rotated audit files kept.
    #[arg(long, default_value_t = 10)]
    pub audit_keep: usize,
    /// This region's OpenTelemetry collector (OTLP over gRPC, e.g.
    /// `http://127.0.0.1:4317`). The agent exports the traces of the calls
    /// it takes, with the spans of any region that served them.
    #[arg(long, env = "SPILLWAY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The CA (PEM) an `https://` collector's certificate must chain to;
    /// required with one. The agent presents no certificate to it.
    #[arg(long, env = "SPILLWAY_OTLP_CA")]
    pub otlp_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (plaintext, for a
    /// scraper inside the region) instead of on the HTTP door. Without it,
    /// the door serves `/metrics` itself.
    #[arg(long, env = "SPILLWAY_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The share of calls traced (0 to 1) when the caller's `traceparent`
    /// does not decide (its sampled flag is followed when it does).
    #[arg(long, default_value_t = 1.0, value_parser = parse_ratio)]
    pub trace_sample_ratio: f64,
    /// Threads serving calls (default: one per core).
    #[arg(long, env = "SPILLWAY_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// The CA of the deployment (PEM): it signs the control plane's, the
    /// other agents' and this agent's certificates.
    #[arg(long, env = "SPILLWAY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This agent's certificate and key (PEM), naming it as
    /// `spiffe://spillway/region/<region>/agent/<id>` (`cargo xtask certs`).
    /// Used by the front doors and the relay as a server, and to the
    /// control plane and other agents as a client.
    #[arg(long, env = "SPILLWAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "SPILLWAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// How often the three TLS files are read again, in seconds. When they
    /// change (cert-manager renewed the certificate, or the CA bundle
    /// gained a new CA), new connections use them; files that cannot be
    /// used are logged and the previous certificate stays.
    #[arg(long, env = "SPILLWAY_TLS_RELOAD_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub tls_reload_secs: u64,
    /// Talk plaintext everywhere, with no certificate checks. For
    /// development only; without it the --tls-* flags are required.
    #[arg(long)]
    pub insecure_dev: bool,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{s}` is not a number from 0 to 1")),
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1.0 => Ok(r),
        _ => Err(format!("`{s}` is not a number above 0 and at most 1")),
    }
}
