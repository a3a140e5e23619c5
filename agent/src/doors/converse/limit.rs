//! A size limit on the request messages of a gRPC service, refused the way
//! gRPC servers refuse them: RESOURCE_EXHAUSTED, naming the limit.
//!
//! tonic enforces `max_decoding_message_size` itself, but answers
//! OUT_OF_RANGE ("decoded message length too large"), before the service
//! runs and with no hook to change it. This wrapper reads the 5-byte
//! prefix of the first message (its compressed flag and length) and
//! refuses an oversize one before any of it is buffered; anything else
//! goes on to the service untouched, its prefix replayed. Set the
//! service's own `max_decoding_message_size` to the same limit: it stays
//! the backstop for the later messages of a client stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::Service;

use crate::error::{CallError, grpc_status};

/// A gRPC message's prefix: a compressed flag, then the length (u32, big
/// endian).
const PREFIX: usize = 5;

/// `inner` with its request messages limited to `limit` bytes.
#[derive(Debug, Clone)]
pub struct MessageLimit<S> {
    inner: S,
    limit: usize,
}

impl<S> MessageLimit<S> {
    pub fn new(inner: S, limit: usize) -> MessageLimit<S> {
        MessageLimit { inner, limit }
    }
}

impl<S: NamedService> NamedService for MessageLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for MessageLimit<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready is the one called.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let limit = self.limit;
        Box::pin(async move {
            let (parts, mut body) = req.into_parts();
            let mut peeked = VecDeque::new();
            let mut prefix = [0u8; PREFIX];
            let mut have = 0;
            while have < PREFIX {
                let frame = match body.frame().await {
                    Some(Ok(frame)) => frame,
                    // The client ended the call, or sent no message: the
                    // service says what it says to that.
                    None => break,
                    Some(Err(status)) => return Ok(status.into_http()),
                };
                if let Some(data) = frame.data_ref() {
                    let n = data.len().min(PREFIX - have);
                    prefix[have..have + n].copy_from_slice(&data[..n]);
                    have += n;
                }
                let trailers = frame.is_trailers();
                peeked.push_back(frame);
                if trailers {
                    break;
                }
            }
            if have == PREFIX {
                let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
                if len as usize > limit {
                    return Ok(grpc_status(&CallError::TooLarge(limit)).into_http());
                }
            }
            let body = Body::new(Replayed { peeked, rest: body });
            inner.call(http::Request::from_parts(parts, body)).await
        })
    }
}

/// A request body with the frames read ahead put back in front.
struct Replayed {
    peeked: VecDeque<Frame<Bytes>>,
    rest: Body,
}

impl http_body::Body for Replayed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        match self.peeked.pop_front() {
            Some(frame) => Poll::Ready(Some(Ok(frame))),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.peeked.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let peeked: u64 = self
            .peeked
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + peeked);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + peeked);
        }
        hint
    }
}
