//! Follows an answer to its end: its usage (the model server's `usage`, or
//! else the input estimate and a count of the answer: one token per
//! streamed event, four bytes per token of a unary answer), its first byte,
//! and whether it completed. When it ends (or the client leaves), the quota
//! reservation is settled with that usage, and the call's finish hook runs
//! (metrics, audit).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use futures_util::stream::BoxStream;
use tokio::time::Instant;

use super::AnswerBody;
use super::answer::{Completion, SseParser};
use crate::error::CallError;
use crate::quota::{Quotas, Reservation};

impl Meter {
    /// Takes the usage and finish reasons of an answer or event.
    fn read(&mut self, c: &Completion) {
        if let Some(u) = c.usage() {
            self.input = u.input().or(self.input);
            // Usage without output tokens (embeddings) means none.
            self.output = u.output().or(self.output).or(Some(0));
        }
        self.finish_reasons
            .extend(c.finish_reasons().map(String::from));
    }
}

/// What an answer came to.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// From the call's start to the answer's first byte.
    pub ttft: Option<Duration>,
    /// The answer ended normally (not broken off, nor left by the client).
    pub complete: bool,
    /// The choices' `finish_reason`s (`stop`, `length`, ...).
    pub finish_reasons: Vec<String>,
}

pub type OnFinish = Box<dyn FnOnce(&Finished) + Send>;

/// An answer being followed; finishes once, at the latest when dropped.
pub struct Meter {
    started: Instant,
    input_estimate: u64,
    reservation: Option<(Arc<Quotas>, Reservation)>,
    on_finish: Option<OnFinish>,
    input: Option<u64>,
    output: Option<u64>,
    events: u64,
    first_byte: Option<Duration>,
    complete: bool,
    done: bool,
    finish_reasons: Vec<String>,
}

impl Meter {
    pub fn new(started: Instant, input_estimate: u64) -> Meter {
        Meter {
            started,
            input_estimate,
            reservation: None,
            on_finish: None,
            input: None,
            output: None,
            events: 0,
            first_byte: None,
            complete: false,
            done: false,
            finish_reasons: Vec::new(),
        }
    }

    /// Settles `reservation` when the answer ends.
    pub fn with_reservation(mut self, quotas: Arc<Quotas>, reservation: Reservation) -> Meter {
        self.reservation = Some((quotas, reservation));
        self
    }

    /// Runs `f` when the answer ends.
    pub fn on_finish(mut self, f: OnFinish) -> Meter {
        self.on_finish = Some(f);
        self
    }

    /// Finishes with no usage: the call was not served.
    pub fn refund(mut self) {
        self.input = Some(0);
        self.output = Some(0);
        self.finish();
    }

    fn full(&mut self, body: &[u8], read: Option<&Completion>) {
        self.first_byte = Some(self.started.elapsed());
        match read {
            Some(c) => self.read(c),
            None => {
                if let Ok(c) = Completion::parse(body) {
                    self.read(&c);
                }
            }
        }
        if self.output.is_none() {
            self.events = body.len().div_ceil(4) as u64;
        }
        self.complete = true;
        self.finish();
    }

    fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        // A stream that did not end may not have reported its final usage
        // (Anthropic's `message_start` says 1 output token before any is
        // made): it is charged at least what was counted of it.
        let output = match self.output {
            Some(n) if self.complete => n,
            Some(n) => n.max(self.events),
            None => self.events,
        };
        let finished = Finished {
            input_tokens: self.input.unwrap_or(self.input_estimate),
            output_tokens: output,
            ttft: self.first_byte,
            complete: self.complete,
            finish_reasons: std::mem::take(&mut self.finish_reasons),
        };
        if let Some((quotas, r)) = self.reservation.take() {
            quotas.settle(r, finished.input_tokens, finished.output_tokens);
        }
        if let Some(f) = self.on_finish.take() {
            f(&finished);
        }
    }

    /// Wraps a body so that its end finishes the meter.
    pub fn body(self, body: AnswerBody) -> AnswerBody {
        self.body_read(body, None)
    }

    /// The same, for a unary answer already read (`read`), which is not
    /// parsed again.
    pub fn body_read(mut self, body: AnswerBody, read: Option<&Completion>) -> AnswerBody {
        match body {
            AnswerBody::Full(b) => {
                self.full(&b, read);
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
                let m = &mut this.meter;
                if m.first_byte.is_none() {
                    m.first_byte = Some(m.started.elapsed());
                }
                for data in this.sse.push(chunk) {
                    if data == "[DONE]" {
                        continue;
                    }
                    m.events += 1;
                    // Most events carry one token and neither: parsed only
                    // when they might.
                    if (data.contains("\"usage\"")
                        || data.contains("\"finish_reason\":\"")
                        || data.contains("\"stop_reason\":\""))
                        && let Ok(c) = Completion::parse(data.as_bytes())
                    {
                        m.read(&c);
                    }
                }
            }
            Poll::Ready(None) => {
                this.meter.complete = true;
                this.meter.finish();
            }
            Poll::Ready(Some(Err(_))) => this.meter.finish(),
            Poll::Pending => {}
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use spillway_core::model::{Quota, QuotaScope};

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
        let seen = Arc::new(std::sync::Mutex::new(None));
        let hook = seen.clone();
        let _ = Meter::new(Instant::now(), 100)
            .with_reservation(q.clone(), r)
            .on_finish(Box::new(move |f| *hook.lock().unwrap() = Some(f.clone())))
            .body(AnswerBody::Full(Bytes::from_static(body)));
        assert_eq!(left(&q), 900);
        let f = seen.lock().unwrap().clone().unwrap();
        assert_eq!(
            (f.input_tokens, f.output_tokens, f.complete),
            (80, 20, true)
        );
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
        let body = Meter::new(Instant::now(), 100)
            .with_reservation(q.clone(), r)
            .body(AnswerBody::Stream(
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
        let seen = Arc::new(std::sync::Mutex::new(None));
        let hook = seen.clone();
        let body = Meter::new(Instant::now(), 100)
            .with_reservation(q.clone(), r)
            .on_finish(Box::new(move |f| *hook.lock().unwrap() = Some(f.clone())))
            .body(AnswerBody::Stream(
                futures_util::stream::iter(chunks).boxed(),
            ));
        drop(body);
        assert!(!seen.lock().unwrap().clone().unwrap().complete);
        assert_eq!(left(&q), 848, "a client that left: the input estimate");

        // A Messages stream broken off after its start (which reports one
        // output token) is charged what was streamed, not that one token.
        let (r, _) = q.admit(&CALL, 100, 500).unwrap();
        let chunks: Vec<Result<Bytes, CallError>> = vec![
            Ok(Bytes::from_static(
                b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n",
            )),
            Ok(Bytes::from_static(
                b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"a\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"b\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"c\"}}\n\n",
            )),
            Err(CallError::Upstream("broke off".into())),
        ];
        let seen = Arc::new(std::sync::Mutex::new(None));
        let hook = seen.clone();
        let body = Meter::new(Instant::now(), 100)
            .with_reservation(q.clone(), r)
            .on_finish(Box::new(move |f| *hook.lock().unwrap() = Some(f.clone())))
            .body(AnswerBody::Stream(
                futures_util::stream::iter(chunks).boxed(),
            ));
        let AnswerBody::Stream(mut s) = body else {
            unreachable!()
        };
        while let Some(Ok(_)) = s.next().await {}
        let f = seen.lock().unwrap().clone().unwrap();
        assert_eq!(
            (f.input_tokens, f.output_tokens, f.complete),
            (10, 4, false)
        );
    }
}
