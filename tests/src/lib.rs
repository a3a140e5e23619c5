//! The end-to-end harness: starts a real etcd on free loopback ports in a
//! temporary folder, control-plane replicas as real processes, agents as
//! real servers on `127.0.0.1:0`, and a TCP proxy that can cut a link.
//! Every wait is bounded and says what it waited for.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use spillway_agent::control::snapshot::AgentConfig;
use spillway_agent::control::sync::{ConfigWatch, SyncSettings};
use spillway_agent::pipeline::PipelineSettings;
use spillway_agent::server::{AgentSettings, local_capabilities};
use spillway_agent::telemetry::record::AuditSettings;
use spillway_agent::upstream::{ModelServerSpec, UpstreamSettings};
use spillway_core::shutdown::{self, ShutdownTrigger};
use spillway_core::tls::TlsFiles;
use spillway_proto::pb::admin_service_client::AdminServiceClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tonic::transport::Channel;

pub mod bench;
pub mod certs;
pub mod cluster;
pub mod dns;
pub mod engine_load;
pub mod otlp;
pub mod proxy;
pub mod quota_load;
pub mod sim;

/// Logs of the harness and the in-process agents, on when SPILLWAY_TEST_LOG
/// is set (e.g. `SPILLWAY_TEST_LOG=debug`).
pub fn init_logging() {
    if let Ok(filter) = std::env::var("SPILLWAY_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// The path of a workspace binary: next to the running executable (a
/// binary such as the benchmark) or one folder up (a test executable in
/// `deps/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable folder");
    let candidates = [
        dir.join(name),
        dir.parent().map(|p| p.join(name)).unwrap_or_default(),
    ];
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "{name} is missing next to {}: build the workspace binaries first (`cargo build --workspace --bins`; `cargo xtask test` does)",
            exe.display()
        )
    })
}

/// Starts `program` and reads its first stdout line, where Spillway's
/// binaries say where they listen; stderr goes to `log`.
pub async fn spawn_and_read_line(mut cmd: Command, log: &Path) -> (Child, String) {
    cmd.stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"))
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("{cmd:?} did not start; log: {}", read(log)))
        .expect("reading stdout")
        .unwrap_or_else(|| panic!("{cmd:?} exited; log: {}", read(log)));
    // Keep draining stdout so that the child never blocks on it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, line)
}

/// The value of `key=` in a "listening" line, or its last word.
fn listen_addr(line: &str, key: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .or_else(|| line.rsplit(' ').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no {key} address in `{line}`"))
}

/// The resident set size of a process, from /proc.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// An agent as a real process.
pub struct AgentProcess {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub child: Child,
    _dir: tempfile::TempDir,
}

impl AgentProcess {
    pub async fn start(
        id: &str,
        region: &str,
        control_planes: &[String],
        model_servers: &[String],
    ) -> AgentProcess {
        Self::start_with(id, region, control_planes, model_servers, &[]).await
    }

    /// With extra agent flags.
    pub async fn start_with(
        id: &str,
        region: &str,
        control_planes: &[String],
        model_servers: &[String],
        extra: &[&str],
    ) -> AgentProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new(bin("spillway-agent"));
        cmd.args(["--agent-id", id, "--region", region, "--insecure-dev"])
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .arg("--control-plane")
            .arg(control_planes.join(","))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(extra)
            .env("SPILLWAY_LOG", "warn");
        for m in model_servers {
            cmd.args(["--model-server", m]);
        }
        let (child, line) = spawn_and_read_line(cmd, &dir.path().join("agent.log")).await;
        AgentProcess {
            grpc: listen_addr(&line, "grpc"),
            http: listen_addr(&line, "http"),
            child,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("a running agent")
    }

    /// What it logged so far (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("agent.log")).unwrap_or_default()
    }
}

/// A `spillway-sim` process.
pub struct SimProcess {
    pub addr: SocketAddr,
    pub child: Child,
    _dir: tempfile::TempDir,
}

impl SimProcess {
    pub async fn start(args: &[&str]) -> SimProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new(bin("spillway-sim"));
        cmd.args(["--listen", "127.0.0.1:0"]).args(args);
        let (child, line) = spawn_and_read_line(cmd, &dir.path().join("sim.log")).await;
        SimProcess {
            addr: listen_addr(&line, "on"),
            child,
            _dir: dir,
        }
    }
}

/// A free loopback port (bound and released; good enough on a test box).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Polls `check` every 20 ms until it returns true; panics after `timeout`
/// naming what it waited for.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The etcd binary: on PATH, or where Debian's etcd-server puts it.
fn etcd_binary(name: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin", "/usr/local/bin"])
    {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "`{name}` is not installed; `cargo xtask test` installs it (Debian: apt-get install etcd-server etcd-client)"
    );
}

/// A real single-member etcd on free loopback ports, in a temporary folder.
pub struct Etcd {
    pub endpoint: String,
    /// Held so that etcd is killed when the harness drops it.
    _child: Child,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub async fn start() -> Etcd {
        Self::start_with(None).await
    }

    /// An etcd that serves clients over TLS with `server`'s identity and
    /// takes only clients with a certificate of its CA; the readiness probe
    /// connects as `client`.
    pub async fn start_tls(server: &TlsFiles, client: &TlsFiles) -> Etcd {
        Self::start_with(Some((server, client))).await
    }

    async fn start_with(tls: Option<(&TlsFiles, &TlsFiles)>) -> Etcd {
        // Free ports are picked, then bound by etcd: another process may
        // take one in between, and etcd then exits. Try again with others.
        for _ in 0..3 {
            if let Some(etcd) = Self::try_start(tls).await {
                return etcd;
            }
        }
        panic!("etcd exited at start three times; see its log in the test's temp dir");
    }

    async fn try_start(tls: Option<(&TlsFiles, &TlsFiles)>) -> Option<Etcd> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (client, peer) = (free_port(), free_port());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log file");
        let mut cmd = Command::new(etcd_binary("etcd"));
        if let Some((server, _)) = tls {
            cmd.arg("--cert-file")
                .arg(&server.cert)
                .arg("--key-file")
                .arg(&server.key)
                .arg("--trusted-ca-file")
                .arg(&server.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "test"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("starting etcd");
        let mut etcd = Etcd {
            endpoint,
            _child: child,
            _dir: dir,
        };
        let options = tls.map(|(_, client)| {
            etcd_client::ConnectOptions::new()
                .with_tls(client.grpc_client().expect("the client's TLS files"))
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = etcd._child.try_wait() {
                let log = read(&etcd._dir.path().join("etcd.log"));
                eprintln!("etcd exited at start ({status}), retrying:\n{log}");
                return None;
            }
            let ready = match etcd_client::Client::connect([etcd.endpoint.clone()], options.clone())
                .await
            {
                Ok(mut c) => c.get("health-probe", None).await.is_ok(),
                Err(_) => false,
            };
            if ready {
                return Some(etcd);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "etcd did not answer within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs `etcdctl` against this etcd and returns its stdout.
    pub async fn etcdctl(&self, args: &[&str]) -> String {
        let out = Command::new(etcd_binary("etcdctl"))
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint))
            .args(args)
            .output()
            .await
            .expect("running etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("etcdctl prints utf-8")
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint.clone()], None)
            .await
            .expect("etcd client")
    }
}

/// A control-plane replica as a real process.
pub struct ControlPlane {
    pub addr: SocketAddr,
    pub replica_id: String,
    /// Serving TLS (started with `--tls-cert`)?
    pub tls: bool,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ControlPlane {
    /// Starts a replica on a free port; `etcd` of `None` uses the embedded
    /// store.
    pub async fn start(etcd: Option<&str>, replica_id: &str) -> ControlPlane {
        Self::start_with(etcd, replica_id, &[]).await
    }

    pub async fn start_with(etcd: Option<&str>, replica_id: &str, extra: &[&str]) -> ControlPlane {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("control-plane.log");
        let mut cmd = Command::new(bin("spillway-control-plane"));
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let tls = extra.contains(&"--tls-cert");
        if !tls {
            cmd.arg("--insecure-dev");
        }
        cmd.args(["--replica-id", replica_id, "--lease-ttl-secs", "3"])
            .args(extra)
            .env("SPILLWAY_LOG", "info,spillway_control_plane=debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .kill_on_drop(true);
        if let Some(ep) = etcd {
            cmd.args(["--etcd-endpoints", ep]);
        }
        let mut child = cmd.spawn().expect("starting spillway-control-plane");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("control plane did not start; log: {}", read(&log)))
            .expect("reading control-plane stdout")
            .unwrap_or_else(|| panic!("control plane exited; log: {}", read(&log)));
        let addr = line
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line `{line}`"));
        ControlPlane {
            addr,
            replica_id: replica_id.to_string(),
            tls,
            child,
            log,
            _dir: dir,
        }
    }

    /// What the replica logged so far.
    pub fn log_text(&self) -> String {
        read(&self.log)
    }

    /// Where a replica started with `--metrics-listen 127.0.0.1:0` serves
    /// `/metrics` (it logs the port it bound).
    pub async fn metrics_addr(&self) -> SocketAddr {
        let mut addr = None;
        wait_until(
            "the replica to log its metrics address",
            Duration::from_secs(10),
            || {
                addr = self.log().lines().find_map(|l| {
                    let rest = l.split("serving metrics").nth(1)?;
                    rest.split("addr=")
                        .nth(1)?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                });
                std::future::ready(addr.is_some())
            },
        )
        .await;
        addr.expect("checked above")
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::connect(self.url())
            .await
            .expect("admin client")
    }

    /// Runs spillctl against this replica: (success, stdout, stderr).
    pub async fn spillctl(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(bin("spillctl"))
            .arg("--control-plane")
            .arg(self.url())
            .args(args)
            .env_remove("SPILLWAY_ADMIN_TOKEN")
            .output()
            .await
            .expect("running spillctl");
        (
            out.status.success(),
            String::from_utf8(out.stdout).expect("UTF-8 output"),
            String::from_utf8(out.stderr).expect("UTF-8 output"),
        )
    }

    /// Creates a region through the admin API.
    pub async fn create_region(&self, name: &str, geography: &str) {
        self.admin()
            .await
            .create_region(spillway_proto::pb::CreateRegionRequest {
                region: Some(spillway_proto::pb::Region {
                    name: name.into(),
                    geography: geography.into(),
                    ..Default::default()
                }),
            })
            .await
            .expect("region created");
    }

    /// Creates the inference profile `id` served by `destinations`.
    pub async fn create_profile(&self, id: &str, destinations: &[&str]) {
        self.admin()
            .await
            .create_profile(spillway_proto::pb::CreateProfileRequest {
                profile: Some(spillway_proto::pb::InferenceProfile {
                    id: id.into(),
                    destinations: destinations.iter().map(|d| d.to_string()).collect(),
                    ..Default::default()
                }),
            })
            .await
            .expect("profile created");
    }

    /// Creates a tenant through the admin API.
    pub async fn create_tenant(
        &self,
        name: &str,
        profiles: &[&str],
        policy: spillway_proto::pb::RegionPolicy,
    ) {
        self.admin()
            .await
            .create_tenant(spillway_proto::pb::CreateTenantRequest {
                tenant: Some(spillway_proto::pb::Tenant {
                    name: name.into(),
                    profiles: profiles.iter().map(|p| p.to_string()).collect(),
                    policy: Some(policy),
                    ..Default::default()
                }),
            })
            .await
            .expect("tenant created");
    }

    /// Creates an API key for `tenant`: (its id, the key).
    pub async fn create_key(&self, tenant: &str) -> (String, String) {
        let created = self
            .admin()
            .await
            .create_key(spillway_proto::pb::CreateKeyRequest {
                tenant: tenant.into(),
                description: String::new(),
            })
            .await
            .expect("key created")
            .into_inner();
        (created.key.expect("the key's record").id, created.secret)
    }

    /// SIGKILL: no graceful anything, as when a machine dies.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("killing the control plane");
    }

    /// SIGTERM: what an orchestrator sends to stop a replica gracefully.
    pub async fn terminate(&self) {
        let pid = self.pid().expect("a running control plane");
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .expect("running kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
    }

    /// Waits up to `timeout` for the replica to exit; its exit status.
    pub async fn exited(&mut self, timeout: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("waiting for the control plane"),
            Err(_) => panic!(
                "the control plane did not exit within {timeout:?}; log: {}",
                self.log()
            ),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// What the replica logged so far.
    pub fn log(&self) -> String {
        read(&self.log)
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// An agent running in this process (its real gRPC and HTTP servers and
/// config stream), so that tests can watch its config directly.
pub struct TestAgent {
    pub id: String,
    pub region: String,
    pub config: ConfigWatch,
    /// The gRPC port: Converse, relay, health.
    pub addr: SocketAddr,
    pub http: SocketAddr,
    /// `/metrics`, when it has a listener of its own.
    pub metrics: Option<SocketAddr>,
    pub state_dir: PathBuf,
    trigger: ShutdownTrigger,
}

/// How a test agent is started.
pub struct AgentOptions<'a> {
    pub id: &'a str,
    pub region: &'a str,
    pub control_planes: &'a [String],
    pub state_dir: &'a Path,
    pub model_servers: Vec<ModelServerSpec>,
    pub pipeline: PipelineSettings,
    pub max_body_bytes: usize,
    /// How long a client has to send a request body.
    pub body_read_timeout: Duration,
    pub upstream_timeout: Duration,
    pub report_interval: Duration,
    pub audit_dir: Option<PathBuf>,
    pub otlp_endpoint: Option<String>,
    /// TLS everywhere, with this identity; plaintext when `None`.
    pub tls: Option<TlsFiles>,
    /// The relay address it announces (default: its own gRPC address).
    pub relay_address: Option<String>,
    /// `/metrics` on a listener of its own (`127.0.0.1:0` for any port).
    pub metrics_listen: Option<SocketAddr>,
    /// The CA `https://` model servers are trusted by.
    pub model_server_ca: Option<PathBuf>,
    /// The CA an `https://` collector is trusted by.
    pub otlp_ca: Option<PathBuf>,
    /// The door's and the gRPC port's timeouts and connection limit.
    pub conn_limits: spillway_agent::net::serve::ConnLimits,
}

impl<'a> AgentOptions<'a> {
    pub fn new(
        id: &'a str,
        region: &'a str,
        control_planes: &'a [String],
        state_dir: &'a Path,
    ) -> Self {
        AgentOptions {
            id,
            region,
            control_planes,
            state_dir,
            model_servers: Vec::new(),
            // Tests that are not about keys call without one.
            pipeline: PipelineSettings {
                allow_anonymous: true,
                ..PipelineSettings::default()
            },
            max_body_bytes: 4 * 1024 * 1024,
            body_read_timeout: spillway_agent::doors::http::DEFAULT_BODY_READ_TIMEOUT,
            upstream_timeout: Duration::from_secs(5),
            report_interval: Duration::from_millis(250),
            audit_dir: None,
            otlp_endpoint: None,
            tls: None,
            relay_address: None,
            metrics_listen: None,
            model_server_ca: None,
            otlp_ca: None,
            conn_limits: Default::default(),
        }
    }
}

/// A model-server spec for `addr` serving `models` over every API (the
/// simulator serves them all), with a fixed limit of `capacity` calls and
/// no engine metrics: the simple simulator's behaviour, where a test needs
/// a known number of slots.
pub fn model_server(addr: SocketAddr, models: &[&str], capacity: u32) -> ModelServerSpec {
    ModelServerSpec {
        apis: spillway_core::api::ApiSet::of(spillway_core::api::Api::ALL),
        capacity: Some(capacity),
        fixed: true,
        metrics: spillway_agent::upstream::engine::MetricsMode::None,
        ..ModelServerSpec::new(&format!("http://{addr}"), models.iter().copied())
    }
}

/// A model-server spec for `addr` as an operator writes it for a real
/// engine: no capacity, engine metrics read as `metrics` says (`auto`
/// detects them).
pub fn engine_server(
    addr: SocketAddr,
    models: &[&str],
    metrics: spillway_agent::upstream::engine::MetricsMode,
) -> ModelServerSpec {
    ModelServerSpec {
        apis: spillway_core::api::ApiSet::of(spillway_core::api::Api::ALL),
        metrics,
        ..ModelServerSpec::new(&format!("http://{addr}"), models.iter().copied())
    }
}

impl TestAgent {
    /// An agent whose (unreachable) model servers serve `models`: enough for
    /// config-stream tests.
    pub async fn start(
        id: &str,
        region: &str,
        control_planes: &[String],
        state_dir: &Path,
        models: &[&str],
    ) -> TestAgent {
        let mut opts = AgentOptions::new(id, region, control_planes, state_dir);
        let nowhere: SocketAddr = "127.0.0.1:9".parse().expect("an address");
        opts.model_servers = vec![model_server(nowhere, models, 8)];
        Self::start_with(opts).await
    }

    pub async fn start_with(opts: AgentOptions<'_>) -> TestAgent {
        let grpc = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("agent gRPC listener");
        let http = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("agent HTTP listener");
        let addr = grpc.local_addr().expect("agent address");
        let http_addr = http.local_addr().expect("agent HTTP address");
        let settings = AgentSettings {
            sync: SyncSettings {
                agent_id: opts.id.to_string(),
                region: opts.region.to_string(),
                relay_address: opts
                    .relay_address
                    .clone()
                    .unwrap_or_else(|| addr.to_string()),
                control_planes: opts.control_planes.to_vec(),
                state_dir: opts.state_dir.to_path_buf(),
                local: local_capabilities(&opts.model_servers),
                backoff_base: Duration::from_millis(50),
                backoff_max: Duration::from_millis(500),
                load: None,
                report_interval: opts.report_interval,
                quotas: Default::default(),
                tls: None,
            },
            model_servers: opts.model_servers,
            upstream: UpstreamSettings {
                header_timeout: opts.upstream_timeout,
                ..UpstreamSettings::default()
            },
            pipeline: opts.pipeline,
            max_body_bytes: opts.max_body_bytes,
            body_read_timeout: opts.body_read_timeout,
            audit: opts.audit_dir.map(|dir| AuditSettings {
                dir,
                max_bytes: 64 * 1024 * 1024,
                keep: 2,
            }),
            audit_otlp: opts.otlp_endpoint.is_some(),
            otlp_endpoint: opts.otlp_endpoint,
            trace_sample_ratio: 1.0,
            metrics_listen: opts.metrics_listen,
            model_server_ca: opts.model_server_ca,
            otlp_ca: opts.otlp_ca,
            conn_limits: opts.conn_limits,
            tls: opts.tls,
            // Renewed certificates are picked up quickly in tests.
            tls_reload: Duration::from_millis(200),
        };
        let (trigger, shutdown) = shutdown::channel();
        let running = spillway_agent::server::start(settings, grpc, http, shutdown)
            .await
            .expect("starting the agent");
        TestAgent {
            id: opts.id.to_string(),
            region: opts.region.to_string(),
            config: running.config,
            addr,
            http: http_addr,
            metrics: running.metrics,
            state_dir: opts.state_dir.to_path_buf(),
            trigger,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn current(&self) -> Option<Arc<AgentConfig>> {
        self.config.borrow().clone()
    }

    pub fn version(&self) -> u64 {
        self.current().map_or(0, |c| c.version)
    }

    /// Waits until the agent's config satisfies `check`.
    pub async fn wait_for(
        &self,
        what: &str,
        check: impl Fn(&AgentConfig) -> bool,
    ) -> Arc<AgentConfig> {
        let mut rx: watch::Receiver<_> = self.config.clone();
        let found = tokio::time::timeout(
            Duration::from_secs(15),
            rx.wait_for(|c| c.as_deref().is_some_and(&check)),
        )
        .await;
        match found {
            Ok(Ok(c)) => c.clone().expect("checked above"),
            _ => panic!(
                "agent {}/{} never reached: {what}; it has version {}",
                self.region,
                self.id,
                self.version()
            ),
        }
    }

    pub fn stop(&self) {
        self.trigger.trigger();
    }
}

/// A simulated model server running in this process.
pub struct TestSim {
    pub addr: SocketAddr,
    pub state: Arc<sim::SimState>,
    trigger: ShutdownTrigger,
}

impl TestSim {
    pub async fn start(config: sim::SimConfig) -> TestSim {
        Self::start_with(config, None).await
    }

    /// A simulator listening on `addr` (another loopback address than
    /// 127.0.0.1, say, with a port another one has there).
    pub async fn start_at(config: sim::SimConfig, addr: SocketAddr) -> std::io::Result<TestSim> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self::serve(listener, config, None))
    }

    /// A simulator serving HTTPS with `identity`'s certificate.
    pub async fn start_tls(config: sim::SimConfig, identity: &TlsFiles) -> TestSim {
        Self::start_with(config, Some(identity)).await
    }

    async fn start_with(config: sim::SimConfig, tls: Option<&TlsFiles>) -> TestSim {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("sim listener");
        Self::serve(listener, config, tls)
    }

    fn serve(listener: TcpListener, config: sim::SimConfig, tls: Option<&TlsFiles>) -> TestSim {
        let addr = listener.local_addr().expect("sim address");
        let state = sim::SimState::new(config);
        let (trigger, mut shutdown) = shutdown::channel();
        let stopped = async move { shutdown.wait().await };
        match tls {
            None => {
                tokio::spawn(sim::serve(listener, state.clone(), stopped));
            }
            Some(identity) => {
                let tls = identity.rustls_server().expect("the sim's certificate");
                let listener = spillway_agent::net::tls_listener::TlsListener::new(listener, tls)
                    .expect("the sim's TLS listener");
                let router = sim::router(state.clone());
                let hung = state.clone();
                tokio::spawn(async move {
                    let _ = axum::serve(listener, router)
                        .with_graceful_shutdown(async move {
                            stopped.await;
                            // A hung scrape must not hold the shutdown up.
                            hung.begin_shutdown();
                        })
                        .await;
                });
            }
        }
        TestSim {
            addr,
            state,
            trigger,
        }
    }

    pub fn served(&self) -> u64 {
        self.state.served()
    }

    /// Stops answering: the listener closes, so calls are refused.
    pub fn stop(&self) {
        self.trigger.trigger();
    }
}

impl Drop for TestSim {
    fn drop(&mut self) {
        self.trigger.trigger();
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.trigger.trigger();
    }
}

/// Starts an agent (plaintext to its control plane) with `args` and checks
/// that it refuses to start, saying `message`.
pub async fn agent_refuses_to_start(args: &[&str], message: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("spillway-agent"))
        .args(["--insecure-dev", "--agent-id", "a", "--region", "r"])
        .args(["--control-plane", "http://127.0.0.1:9"])
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(args)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?}: {err}");
    assert!(err.contains(message), "{args:?}: {err}");
}
