//! Outgoing TLS for the agent's gRPC channels (to the control plane, to
//! other agents): a connector that does the TLS handshake itself with a
//! rustls configuration whose verifier checks, besides the CA and the host
//! name, who the server's certificate names (`spillway_core::tls::Expect`):
//! a relay to us-west is answered by an agent of us-west, or not at all.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Clone)]
pub struct TlsConnect {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for TlsConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConnect")
    }
}

impl TlsConnect {
    pub fn new(config: rustls::ClientConfig) -> TlsConnect {
        TlsConnect {
            config: Arc::new(config),
        }
    }

    /// A lazily connecting channel to `https://host:port` (or `host:port`)
    /// over this TLS.
    pub fn channel(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(self.clone())
    }

    /// The plaintext-scheme endpoint tonic needs for a connector that does
    /// TLS itself.
    pub fn endpoint(addr: &str) -> Result<Endpoint, String> {
        let hostport = addr
            .strip_prefix("https://")
            .or_else(|| addr.strip_prefix("http://"))
            .unwrap_or(addr);
        Endpoint::from_shared(format!("http://{hostport}"))
            .map_err(|e| format!("bad address `{addr}`: {e}"))
    }
}

type Connecting =
    Pin<Box<dyn Future<Output = Result<TokioIo<TlsStream<TcpStream>>, std::io::Error>> + Send>>;

impl tonic::codegen::Service<Uri> for TlsConnect {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let bad = |what: &str| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string())
            };
            let host = uri.host().ok_or_else(|| bad("no host"))?.to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .map_err(|_| bad("not a host name or address"))?;
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
