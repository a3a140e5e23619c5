//! Listening under a limit: a gRPC server's incoming connections, at most
//! so many open at once. Past the limit a new connection is closed at once
//! (the caller counts it), so that connections nobody authenticated cannot
//! exhaust the process's descriptors; and a connection that has not sent
//! its first bytes (an HTTP/2 preface, a TLS hello) in time is closed, so
//! that silent ones cannot hold the places.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// A gRPC server's connections under a limit: past `max` open at once, a
/// new connection is closed at once (counted, and logged now and then).
pub fn limited_incoming(
    listener: TcpListener,
    max: usize,
    first_bytes_within: Duration,
    refused: impl Fn() + Send + Sync + 'static,
) -> impl futures_util::Stream<Item = io::Result<Permitted>> + Send + 'static {
    let refused = Arc::new(refused);
    let permits = Arc::new(Semaphore::new(max.max(1)));
    let state = (listener, permits, refused, None::<Instant>);
    futures_util::stream::unfold(
        state,
        move |(listener, permits, refused, mut logged)| async move {
            loop {
                let (tcp, _) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a gRPC connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    refused();
                    if logged.is_none_or(|t: Instant| t.elapsed() > Duration::from_secs(10)) {
                        logged = Some(Instant::now());
                        tracing::warn!(
                            max_connections = max,
                            "gRPC connection limit reached: new connections are refused (--max-connections)"
                        );
                    }
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let conn = Permitted {
                    inner: tcp,
                    _permit: permit,
                    opening: Some(Box::pin(tokio::time::sleep(first_bytes_within))),
                    received: 0,
                };
                return Some((Ok(conn), (listener, permits, refused, logged)));
            }
        },
    )
}

/// A connection that holds its place under the limit until dropped.
pub struct Permitted {
    inner: TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// Until the first bytes came: when the connection is given up.
    opening: Option<Pin<Box<tokio::time::Sleep>>>,
    received: usize,
}

/// What a client sends first is at least this long: the HTTP/2 preface is
/// 24 bytes, a TLS ClientHello more.
const OPENING_BYTES: usize = 24;

impl tonic::transport::server::Connected for Permitted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Permitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        match polled {
            Poll::Ready(Ok(())) => {
                self.received += buf.filled().len() - before;
                if self.received >= OPENING_BYTES {
                    self.opening = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.opening.as_mut().map(|t| t.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client sent nothing in time",
                ))),
                _ => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for Permitted {
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

/// A gRPC server's connections over TLS: each handshake runs on its own
/// task (a slow one holds up nobody else's) under `handshake_within`, and
/// the connections come out as their handshakes finish. `config` is asked
/// at every handshake, so a reloaded certificate is served from the next
/// connection on (see [`crate::credentials`]).
pub fn tls_incoming(
    incoming: impl futures_util::Stream<Item = io::Result<Permitted>> + Send + 'static,
    config: Arc<rustls::ServerConfig>,
    handshake_within: Duration,
) -> impl futures_util::Stream<Item = io::Result<tokio_rustls::server::TlsStream<Permitted>>>
+ Send
+ 'static {
    use futures_util::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        let mut incoming = std::pin::pin!(incoming);
        loop {
            let conn = tokio::select! {
                // The server stopped taking connections.
                _ = tx.closed() => return,
                conn = incoming.next() => match conn {
                    Some(Ok(conn)) => conn,
                    Some(Err(_)) => continue,
                    None => return,
                },
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_within, acceptor.accept(conn)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "a TLS handshake failed"),
                    Err(_) => tracing::debug!("a TLS handshake timed out"),
                }
            });
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}
