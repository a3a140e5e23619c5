//! Outgoing connections: TLS for the agent's gRPC channels (to the control
//! plane, to other agents), with a connector that does the TLS handshake
//! itself with a rustls configuration whose verifier checks, besides the CA
//! and the host name, who the server's certificate names
//! (`spillway_core::tls::Expect`): a relay to us-west is answered by an
//! agent of us-west, or not at all. And a deadline on connecting, TCP and
//! TLS handshake together (`Bounded`): a stopped peer's kernel still
//! accepts TCP, and only the handshake, which never ends, tells.
//!
//! Tonic bounds a custom connector by the endpoint's connect timeout
//! itself (`connect_with_connector_lazy`), so gRPC channels over
//! `TlsConnect` need no `Bounded`; the model servers' HTTP client does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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

/// A connector that gives up when `inner` has not connected (TCP and TLS
/// handshake together) within `timeout`, with a `TimedOut` error.
#[derive(Debug, Clone)]
pub struct Bounded<C> {
    inner: C,
    timeout: Duration,
}

impl<C> Bounded<C> {
    pub fn new(inner: C, timeout: Duration) -> Bounded<C> {
        Bounded { inner, timeout }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> tonic::codegen::Service<Uri> for Bounded<C>
where
    C: tonic::codegen::Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection (TCP and TLS handshake) within {timeout:?}"),
                )
                .into()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A peer whose kernel accepts TCP but that never says a word, as a
    /// stopped process does.
    async fn mute_peer() -> (TcpListener, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    fn client_config() -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
    }

    #[tokio::test]
    async fn a_tls_handshake_that_never_ends_is_bounded_by_the_connect_timeout() {
        let (_listener, addr) = mute_peer().await;
        let timeout = Duration::from_millis(300);
        let channel = TlsConnect::new(client_config()).channel(
            TlsConnect::endpoint(&addr.to_string())
                .unwrap()
                .connect_timeout(timeout),
        );
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let started = tokio::time::Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            health.check(tonic_health::pb::HealthCheckRequest::default()),
        )
        .await
        .expect("the connect timeout ends the call, not this test's guard");
        assert!(answer.is_err());
        let took = started.elapsed();
        assert!(took >= timeout && took < Duration::from_secs(5), "{took:?}");

        // The model servers' connector: TCP connects, the handshake hangs.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(client_config())
            .https_only()
            .enable_http1()
            .wrap_connector({
                let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
                tcp.enforce_http(false);
                tcp
            });
        let mut bounded = Bounded::new(https, timeout);
        let uri: Uri = format!("https://localhost:{}/", addr.port())
            .parse()
            .unwrap();
        let started = tokio::time::Instant::now();
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            tonic::codegen::Service::call(&mut bounded, uri),
        )
        .await
        .expect("the connect timeout ends the handshake, not this test's guard");
        let err = connected.expect_err("no connection");
        assert!(err.to_string().contains("TLS handshake"), "{err}");
        let took = started.elapsed();
        assert!(took >= timeout && took < Duration::from_secs(5), "{took:?}");
    }
}
