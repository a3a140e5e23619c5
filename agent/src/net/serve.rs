//! The HTTP door's listener: accepts connections under a limit, runs each
//! (TLS handshake, then HTTP/1.1 or HTTP/2) in a task of its own, and
//! closes the ones that hold resources without using them:
//!
//! - **header read**: once a connection with no call in flight receives a
//!   byte (a TLS handshake, the start of a request), the handshake and the
//!   whole request head must arrive within `header_timeout`; a client that
//!   dribbles its headers is cut off there;
//! - **idle**: a connection with no call in flight and nothing received
//!   is closed (gracefully) after `idle_timeout`;
//! - **connections**: at `max_connections` open at once, idle connections
//!   are closed to make room for a new one; when every
//!   open connection has a call in flight, the new one is answered `503`
//!   (plaintext) or closed (TLS) at once, and the established ones keep
//!   being served.
//!
//! The request body is read under a deadline of its own by the door. On
//! shutdown the listener stops accepting, asks every connection to close
//! once its calls are answered (HTTP/1.1: after the current response;
//! HTTP/2: GOAWAY), and [`HttpServer::drained`] resolves when all are
//! closed.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use spillway_core::metrics::Metrics;
use spillway_core::shutdown::Shutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Limits on the door's connections.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// From a connection's first byte after it was idle to the end of the
    /// request head (with TLS, the handshake included).
    pub header_timeout: Duration,
    /// How long a connection with no call in flight stays open.
    pub idle_timeout: Duration,
    /// Connections open at once; past it new ones are refused.
    pub max_connections: usize,
    /// HTTP/2 streams at once on one connection.
    pub max_streams: u32,
}

impl Default for ConnLimits {
    fn default() -> ConnLimits {
        ConnLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_streams: 256,
        }
    }
}

/// The answer to a connection over the limit: a whole response, so that
/// a client learns why rather than seeing a reset.
fn refused() -> &'static [u8] {
    static REFUSED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    REFUSED.get_or_init(|| {
        let body = r#"{"error":{"message":"this agent has too many connections open; retry later","type":"server_error","param":null,"code":"overloaded"}}"#;
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\nretry-after: 1\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    })
}

/// How long a new connection waits for room at the limit while idle ones
/// are evicted.
const EVICTION_WAIT: Duration = Duration::from_millis(100);

/// How long a connection must have been idle to be evicted: a new one, or
/// one whose answer just went out, may be about to carry a call.
const EVICT_AFTER: Duration = Duration::from_secs(1);

/// A running door listener.
pub struct HttpServer {
    pub addr: SocketAddr,
    connections: Arc<Semaphore>,
    max: usize,
    accept: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// Starts serving `router` on `listener` (over TLS when `tls` is given)
    /// until `shutdown` fires.
    pub fn start(
        listener: TcpListener,
        tls: Option<rustls::ServerConfig>,
        router: Router,
        limits: ConnLimits,
        metrics: Arc<Metrics>,
        mut shutdown: Shutdown,
    ) -> io::Result<HttpServer> {
        let addr = listener.local_addr()?;
        let max = limits.max_connections.max(1);
        let connections = Arc::new(Semaphore::new(max));
        let tls = tls.map(|c| TlsAcceptor::from(Arc::new(c)));
        let (closing_tx, closing) = watch::channel(false);
        let (evict_tx, evict) = watch::channel(0u64);
        let permits = connections.clone();
        let limits = Arc::new(limits);
        let accept = tokio::spawn(async move {
            let mut refused_logged: Option<Instant> = None;
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = shutdown.wait() => break,
                };
                let (tcp, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors, most likely: wait for some
                        // to be freed rather than spin.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let permit = match permits.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        // Full: idle connections (no call in flight,
                        // nothing received since) make room, so that
                        // idling cannot hold the door shut.
                        evict_tx.send_modify(|n| *n += 1);
                        tokio::time::timeout(EVICTION_WAIT, permits.clone().acquire_owned())
                            .await
                            .ok()
                            .and_then(Result::ok)
                    }
                };
                let Some(permit) = permit else {
                    metrics.add(
                        "spillway_agent_connections_closed_total",
                        &[("reason", "limit")],
                        1,
                    );
                    if refused_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        refused_logged = Some(Instant::now());
                        tracing::warn!(
                            max_connections = max,
                            "connection limit reached: new connections are refused (--max-connections)"
                        );
                    }
                    if tls.is_none() {
                        // Answer, stop writing, and read (a little, for a
                        // moment) what the client sends meanwhile: closing
                        // with its request unread would reset the
                        // connection, and the 503 could be lost.
                        tokio::spawn(async move {
                            use tokio::io::AsyncReadExt;
                            let mut tcp = tcp;
                            let _ = tcp.try_write(refused());
                            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tcp).await;
                            let mut sink = [0u8; 4096];
                            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                                let mut read = 0;
                                while read < 64 * 1024 {
                                    match tcp.read(&mut sink).await {
                                        Ok(0) | Err(_) => break,
                                        Ok(n) => read += n,
                                    }
                                }
                            })
                            .await;
                        });
                    }
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let conn = Connection {
                    limits: limits.clone(),
                    router: router.clone(),
                    metrics: metrics.clone(),
                    closing: closing.clone(),
                    evict: {
                        // Only evictions from now on concern it.
                        let mut e = evict.clone();
                        e.mark_unchanged();
                        e
                    },
                    peer,
                };
                let tls = tls.clone();
                tokio::spawn(async move {
                    conn.run(tcp, tls, permit).await;
                });
            }
            // Stop accepting, and ask every connection to close once its
            // calls are answered.
            drop(listener);
            let _ = closing_tx.send(true);
            // Connections hold a receiver: keep the sender until they are
            // gone so that they do not see the channel close as a signal.
            let _ = permits.acquire_many(max as u32).await;
        });
        Ok(HttpServer {
            addr,
            connections,
            max,
            accept,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.connections.available_permits()
    }

    /// Resolves once the listener stopped and every connection closed.
    pub async fn drained(self) {
        let _ = self.accept.await;
    }
}

struct Connection {
    limits: Arc<ConnLimits>,
    router: Router,
    metrics: Arc<Metrics>,
    closing: watch::Receiver<bool>,
    /// Bumped when the server is full and wants idle connections gone.
    evict: watch::Receiver<u64>,
    peer: SocketAddr,
}

impl Connection {
    /// Serves the connection; `permit` is its place under the limit,
    /// given back just before the socket closes, so that a client that saw
    /// the close finds the place free.
    async fn run(
        mut self,
        tcp: TcpStream,
        tls: Option<TlsAcceptor>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let activity = Arc::new(Activity::new());
        let io = Watched {
            inner: tcp,
            activity: activity.clone(),
            // Under TLS it sees ciphertext; the door offers no ALPN, so
            // TLS clients speak HTTP/1.1.
            opened: tls.is_some(),
        };
        match tls {
            Some(acceptor) => {
                let handshake = acceptor.accept(io);
                let tls = tokio::select! {
                    r = tokio::time::timeout(self.limits.header_timeout, handshake) => r,
                    _ = self.closing.wait_for(|c| *c) => return,
                };
                match tls {
                    Ok(Ok(stream)) => self.serve(stream, activity, permit).await,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => {
                        self.count_closed("header_timeout");
                        tracing::debug!(peer = %self.peer, "TLS handshake timed out");
                    }
                }
            }
            None => self.serve(io, activity, permit).await,
        }
    }

    fn count_closed(&self, reason: &str) {
        self.metrics.add(
            "spillway_agent_connections_closed_total",
            &[("reason", reason)],
            1,
        );
    }

    async fn serve<I>(
        self,
        io: I,
        activity: Arc<Activity>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let router = self.router.clone();
        let counted = activity.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let guard = Arc::new(InFlight::enter(counted.clone()));
            let router = router.clone();
            // The call is in flight until both its bodies are done with: an
            // answer may stream long after its head was sent, and the door
            // may read a refused body to its end after answering.
            let req = req.map(|body| {
                Body::new(Guarded {
                    body,
                    _guard: guard.clone(),
                })
            });
            async move {
                let response = router
                    .oneshot(req)
                    .await
                    .unwrap_or_else(|e: Infallible| match e {});
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(Guarded {
                        body,
                        _guard: guard,
                    })
                }))
            }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.limits.max_streams)
            // Dead peers: a ping every 20 s, answered within 20 s.
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(20));
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        // Declared after the connection: dropped before it.
        let _permit = permit;
        // Asked to close (idle, or the server's shutdown): the calls in
        // flight finish, then hyper closes; `force_at` bounds the wait of
        // a connection closed for idling once its calls are done.
        let mut closing = false;
        let mut force_at: Option<Instant> = None;
        let mut evict_open = true;
        let (mut closing_rx, mut evict) = (self.closing.clone(), self.evict.clone());
        let limits = self.limits.clone();
        loop {
            let (deadline, reason) = match force_at {
                Some(at) => (Some(at), "forced"),
                None => activity.deadline(&limits),
            };
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = conn.as_mut() => return,
                // A call began or ended, or a head began: a new deadline.
                _ = activity.changed.notified() => continue,
                _ = sleep => {
                    if reason == "forced" {
                        if activity.in_flight.load(Ordering::Acquire) > 0 {
                            // HTTP/2 streams opened before the client saw
                            // the GOAWAY: they finish first.
                            force_at = None;
                            continue;
                        }
                        return;
                    }
                    // Recheck: a call may have begun as the timer fired.
                    let (due, now_reason) = activity.deadline(&limits);
                    if due.is_none_or(|at| at > Instant::now()) || now_reason != reason {
                        continue;
                    }
                    if reason == "header_timeout" {
                        // Half a request head: nothing to finish.
                        self.count_closed(reason);
                        tracing::debug!(peer = %self.peer, reason, "closing a connection");
                        return;
                    }
                    if !closing {
                        self.count_closed(reason);
                        tracing::debug!(peer = %self.peer, reason, "closing a connection");
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    force_at = Some(Instant::now() + Duration::from_secs(1));
                }
                _ = closing_rx.wait_for(|c| *c), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                changed = evict.changed(), if evict_open => {
                    if changed.is_err() {
                        evict_open = false;
                        continue;
                    }
                    // Only idle ones: a connection whose head is on its
                    // way has a call coming (a dribbling one is cut at the
                    // header timeout).
                    if activity.evictable() {
                        self.count_closed("evicted");
                        return;
                    }
                }
            }
        }
    }
}

/// What a connection is doing, as its watchdog reads it.
struct Activity {
    epoch: Instant,
    /// Calls whose answer is not done.
    in_flight: AtomicUsize,
    /// When the last call ended (or the connection opened), in ms from
    /// `epoch`.
    idle_since: AtomicU64,
    /// Whether bytes came since then, and when the first did.
    reading: AtomicBool,
    first_read: AtomicU64,
    /// HTTP/2 (its preface came first): frames such as ping answers
    /// arrive between calls, so bytes say nothing of a head on its way;
    /// only the idle timeout applies between calls.
    h2: AtomicBool,
    /// Fired when a call begins or ends, or a head begins.
    changed: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            reading: AtomicBool::new(false),
            first_read: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// Idle (no call in flight, nothing received since the last one) for
    /// long enough that its client is not about to use it.
    fn evictable(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && !self.reading.load(Ordering::Acquire)
            && self
                .now_ms()
                .saturating_sub(self.idle_since.load(Ordering::Acquire))
                >= EVICT_AFTER.as_millis() as u64
    }

    fn read_some(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && !self.reading.load(Ordering::Acquire)
            && !self.h2.load(Ordering::Acquire)
        {
            self.first_read.store(self.now_ms(), Ordering::Release);
            self.reading.store(true, Ordering::Release);
            self.changed.notify_one();
        }
    }

    /// When the connection must be closed if nothing changes, and why;
    /// none while a call is in flight (its body has a deadline of its
    /// own, and answers may stream for long).
    fn deadline(&self, limits: &ConnLimits) -> (Option<Instant>, &'static str) {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return (None, "");
        }
        if self.reading.load(Ordering::Acquire) {
            let first = self.first_read.load(Ordering::Acquire);
            (
                Some(self.at(first) + limits.header_timeout),
                "header_timeout",
            )
        } else {
            let since = self.idle_since.load(Ordering::Acquire);
            (Some(self.at(since) + limits.idle_timeout), "idle")
        }
    }
}

/// A call in flight on a connection; when dropped, the connection is idle
/// again if it was the last.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn enter(activity: Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.reading.store(false, Ordering::Release);
        activity.changed.notify_one();
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(a.now_ms(), Ordering::Release);
        a.reading.store(false, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
        a.changed.notify_one();
    }
}

/// A request's or an answer's body that keeps its call counted until it
/// is dropped.
struct Guarded<B> {
    body: B,
    _guard: Arc<InFlight>,
}

impl<B> http_body::Body for Guarded<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A socket that tells its connection's watchdog when bytes arrive.
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
    /// Whether the connection's first bytes were looked at.
    opened: bool,
}

/// How an HTTP/2 connection with prior knowledge begins.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if !self.opened {
                self.opened = true;
                if buf.filled()[before..].starts_with(H2_PREFACE) {
                    self.activity.h2.store(true, Ordering::Release);
                }
            }
            self.activity.read_some();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
