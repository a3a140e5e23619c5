//! Settles a quota reservation with the real usage of the answer: the
//! model server's `usage` (prompt and completion tokens) when it gives one,
//! else the input estimate and a count of the answer (one token per
//! streamed event, or four bytes per token of a unary answer). A stream
//! that ends early (the client left) settles with what was sent.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use futures_util::stream::BoxStream;
use serde::Deserialize;

use crate::converse::SseParser;
use crate::error::CallError;
use crate::quota::{Quotas, Reservation};
use crate::upstream::AnswerBody;

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

fn usage_of(json: &[u8]) -> Option<(Option<u64>, Option<u64>)> {
    serde_json::from_slice::<WithUsage>(json)
        .ok()
        .and_then(|w| w.usage)
        .map(|u| (u.prompt_tokens, u.completion_tokens))
}

/// A reservation waiting for its answer's usage; settles once, at the
/// latest when dropped.
pub struct Meter {
    quotas: Arc<Quotas>,
    reservation: Option<Reservation>,
    input: Option<u64>,
    output: Option<u64>,
    events: u64,
}

impl Meter {
    pub fn new(quotas: Arc<Quotas>, reservation: Reservation) -> Meter {
        Meter {
            quotas,
            reservation: Some(reservation),
            input: None,
            output: None,
            events: 0,
        }
    }

    /// Settles with no usage: the call was not served.
    pub fn refund(mut self) {
        if let Some(r) = self.reservation.take() {
            self.quotas.settle(r, 0, 0);
        }
    }

    /// Settles against a unary answer.
    pub fn full(mut self, body: &[u8]) {
        if let Some((input, output)) = usage_of(body) {
            self.input = input;
            self.output = output;
        }
        if self.output.is_none() {
            self.events = body.len().div_ceil(4) as u64;
        }
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(r) = self.reservation.take() {
            let input = self.input.unwrap_or(r.input_estimate);
            let output = self.output.unwrap_or(self.events);
            self.quotas.settle(r, input, output);
        }
    }

    /// Wraps a body so that its usage settles the reservation.
    pub fn body(self, body: AnswerBody) -> AnswerBody {
        match body {
            AnswerBody::Full(b) => {
                self.full(&b);
                AnswerBody::Full(b)
            }
            AnswerBody::Stream(inner) => AnswerBody::Stream(Box::pin(Metered {
                inner,
                meter: self,
                sse: SseParser::default(),
            })),
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.finish();
    }
}

struct Metered {
    inner: BoxStream<'static, Result<Bytes, CallError>>,
    meter: Meter,
    sse: SseParser,
}

impl Stream for Metered {
    type Item = Result<Bytes, CallError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let next = this.inner.as_mut().poll_next(cx);
        match &next {
            Poll::Ready(Some(Ok(chunk))) => {
                for data in this.sse.push(chunk) {
                    if data == "[DONE]" {
                        continue;
                    }
                    this.meter.events += 1;
                    if data.contains("\"usage\"")
                        && let Some((input, output)) = usage_of(data.as_bytes())
                    {
                        this.meter.input = input.or(this.meter.input);
                        this.meter.output = output.or(this.meter.output);
                    }
                }
            }
            Poll::Ready(_) => this.meter.finish(),
            Poll::Pending => {}
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use spillway_proto::model::{Quota, QuotaScope};

    use crate::quota::CallScope;

    const CALL: CallScope<'static> = CallScope {
        profile: "p",
        region: "r",
        tenant: None,
    };

    fn quotas() -> Arc<Quotas> {
        let q = Arc::new(Quotas::new());
        q.configure(
            &[Quota {
                scope: QuotaScope::ProfileInRegion {
                    profile: "p".into(),
                    source_region: "r".into(),
                },
                requests_per_minute: None,
                tokens_per_minute: Some(60_000),
                tokens_per_day: None,
                output_burndown: 1.0,
                revision: 0,
            }],
            1,
        );
        q
    }

    fn left(q: &Quotas) -> u64 {
        q.rate_info(&CALL).tokens.unwrap().remaining
    }

    #[tokio::test(start_paused = true)]
    async fn a_unary_answer_settles_with_its_usage() {
        let q = quotas();
        let (r, _) = q.admit(&CALL, 100, 500).unwrap();
        assert_eq!(left(&q), 400);
        let body = br#"{"choices":[],"usage":{"prompt_tokens":80,"completion_tokens":20}}"#;
        Meter::new(q.clone(), r).full(body);
        assert_eq!(left(&q), 900);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_settles_with_its_final_usage_or_its_events() {
        let q = quotas();
        let (r, _) = q.admit(&CALL, 100, 500).unwrap();
        let chunks: Vec<Result<Bytes, CallError>> = vec![
            Ok(Bytes::from_static(b"data: {\"choices\":[]}\n\ndata: {\"cho")),
            Ok(Bytes::from_static(
                b"ices\":[]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":50,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
            )),
        ];
        let body = Meter::new(q.clone(), r).body(AnswerBody::Stream(
            futures_util::stream::iter(chunks).boxed(),
        ));
        let AnswerBody::Stream(mut s) = body else {
            unreachable!()
        };
        while s.next().await.is_some() {}
        assert_eq!(left(&q), 948, "50 in + 2 out used");

        // No usage in the stream: the estimate for input, one per event out.
        let (r, _) = q.admit(&CALL, 100, 500).unwrap();
        let chunks: Vec<Result<Bytes, CallError>> = vec![Ok(Bytes::from_static(
            b"data: {\"choices\":[]}\n\ndata: {\"choices\":[]}\n\ndata: [DONE]\n\n",
        ))];
        let body = Meter::new(q.clone(), r).body(AnswerBody::Stream(
            futures_util::stream::iter(chunks).boxed(),
        ));
        drop(body);
        assert_eq!(left(&q), 848, "a client that left: the input estimate");
    }
}
