//! An OTLP collector for tests: a tonic server implementing the trace and
//! logs services of `opentelemetry.proto.collector` on loopback that keeps
//! every span and log record it receives, with the resource it came under.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
    logs_service_server::{LogsService, LogsServiceServer},
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::trace::v1::Span;
use spillway_core::shutdown::{self, ShutdownTrigger};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// A span as received, with the `spillway.region` of its resource.
#[derive(Debug, Clone)]
pub struct Received {
    pub resource_region: String,
    /// The exporting agent (`spillway.agent_id` of the resource).
    pub resource_agent: String,
    pub span: Span,
}

impl Received {
    pub fn trace_hex(&self) -> String {
        self.span
            .trace_id
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// A string or integer attribute, as a string.
    pub fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            any_value::Value::StringValue(s) => s.clone(),
            any_value::Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<Received>>>);

/// Log records as received, with the `spillway.region` of their resource.
#[derive(Clone, Default)]
struct LogSink(Arc<Mutex<Vec<(String, LogRecord)>>>);

#[tonic::async_trait]
impl LogsService for LogSink {
    async fn export(
        &self,
        req: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let mut got = self.0.lock().expect("the collector's logs");
        for rl in req.into_inner().resource_logs {
            let region = rl
                .resource
                .as_ref()
                .and_then(|r| attr(&r.attributes, "spillway.region"))
                .unwrap_or_default();
            for sl in rl.scope_logs {
                for record in sl.log_records {
                    got.push((region.clone(), record));
                }
            }
        }
        Ok(Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut got = self.0.lock().expect("the collector's spans");
        for rs in req.into_inner().resource_spans {
            let region = rs
                .resource
                .as_ref()
                .and_then(|r| attr(&r.attributes, "spillway.region"))
                .unwrap_or_default();
            let agent = rs
                .resource
                .as_ref()
                .and_then(|r| attr(&r.attributes, "spillway.agent_id"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push(Received {
                        resource_region: region.clone(),
                        resource_agent: agent.clone(),
                        span,
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A collector on a free loopback port; stops when dropped.
pub struct TestCollector {
    pub addr: SocketAddr,
    tls: bool,
    /// TCP connections accepted (before any TLS handshake).
    connections: Arc<AtomicU64>,
    spans: Sink,
    logs: LogSink,
    trigger: ShutdownTrigger,
}

impl TestCollector {
    pub async fn start() -> TestCollector {
        Self::start_with(None).await
    }

    /// A collector serving OTLP/gRPC over TLS with `identity`'s certificate.
    pub async fn start_tls(identity: &spillway_core::tls::TlsFiles) -> TestCollector {
        Self::start_with(Some(
            identity.grpc_server(true).expect("the collector's TLS"),
        ))
        .await
    }

    async fn start_with(tls: Option<tonic::transport::ServerTlsConfig>) -> TestCollector {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("collector listener");
        let addr = listener.local_addr().expect("collector address");
        let spans = Sink::default();
        let logs = LogSink::default();
        let (trigger, mut shutdown) = shutdown::channel();
        let service = TraceServiceServer::new(spans.clone());
        let logs_service = LogsServiceServer::new(logs.clone());
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        let incoming = TcpIncoming::from(listener).inspect(move |_| {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        let mut server = tonic::transport::Server::builder();
        let secure = tls.is_some();
        if let Some(tls) = tls {
            server = server.tls_config(tls).expect("the collector's TLS config");
        }
        tokio::spawn(async move {
            let _ = server
                .add_service(service)
                .add_service(logs_service)
                .serve_with_incoming_shutdown(incoming, async move { shutdown.wait().await })
                .await;
        });
        TestCollector {
            addr,
            tls: secure,
            connections,
            spans,
            logs,
            trigger,
        }
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Every log record received so far, with its resource's region.
    pub fn logs(&self) -> Vec<(String, LogRecord)> {
        self.logs.0.lock().expect("the collector's logs").clone()
    }

    /// TCP connections accepted so far, whether or not a handshake and an
    /// export followed.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Received> {
        self.spans.0.lock().expect("the collector's spans").clone()
    }
}

impl Drop for TestCollector {
    fn drop(&mut self) {
        self.trigger.trigger();
    }
}
