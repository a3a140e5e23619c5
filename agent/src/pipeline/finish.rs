//! The last stage: an admitted call's attempts, then its answer followed to
//! its end by the meter, which settles the quota reservation with the usage
//! and records the call (metrics, audit record, spans). A call that ends
//! without an answer is recorded by [`record_error`]; one whose client
//! leaves while it is routed, by the guard.

use crate::error::CallError;
use crate::telemetry::record::{CallContext, Outcome, Recorder};
use crate::upstream::AnswerBody;
use crate::upstream::answer::Completion;
use crate::upstream::meter::Meter;

use super::{Admission, Answer, Pipeline, PreparedCall};

/// Records a call that ended without an answer.
pub(super) fn record_error(recorder: &Recorder, ctx: &CallContext, e: &CallError) {
    recorder.finish(ctx, &Outcome::of_error(e));
}

/// Records a call whose routing was dropped (the client left) before it
/// ended.
struct Unanswered<'a> {
    recorder: &'a Recorder,
    ctx: Option<CallContext>,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(ctx) = self.ctx.take() {
            record_error(self.recorder, &ctx, &CallError::Cancelled);
        }
    }
}

impl Pipeline {
    /// Routes one admitted call. Its answer is followed to its end, when
    /// the reservation is settled with its usage and the call is recorded;
    /// when nothing answered the reservation is refunded (and `serve`
    /// records the error, as it does those before routing).
    pub(super) async fn finish(
        &self,
        call: PreparedCall,
        admission: Admission,
    ) -> Result<Answer, CallError> {
        let ctx = call.ctx.clone();
        let mut meter = Meter::new(ctx.started, call.input_estimate);
        if let Some(r) = admission.reservation {
            meter = meter.with_reservation(self.quotas.clone(), r);
        }
        // A client that goes away before the answer drops this future: the
        // guard records the call then (the meter refunds on drop).
        let mut guard = Unanswered {
            recorder: &self.recorder,
            ctx: Some(ctx),
        };
        // A unary answer that is not JSON is the model server's fault: it
        // fails here, before it is metered as served. Only its syntax is
        // checked: a shape the reader does not know is still served, and
        // the meter reads what it can of it.
        let routed = self.attempts(call).await.and_then(|routed| {
            let read = match &routed.answer.body {
                AnswerBody::Full(b) if routed.answer.status.is_success() => {
                    serde_json::from_slice::<serde::de::IgnoredAny>(b).map_err(|e| {
                        CallError::Upstream(format!(
                            "the model server's answer is not valid JSON: {e}"
                        ))
                    })?;
                    Completion::parse(b).ok()
                }
                _ => None,
            };
            Ok((routed, read))
        });
        let ctx = guard
            .ctx
            .take()
            .expect("the guard holds the context until now");
        let (routed, read) = match routed {
            Ok(x) => x,
            Err(e) => {
                meter.refund();
                return Err(e);
            }
        };
        let mut answer = routed.answer;
        let recorder = self.recorder.clone();
        let (region, attempts) = (answer.region.clone(), routed.failed_attempts);
        let status = answer.status;
        let (attempt_spans, remote) = (routed.attempt_spans, routed.remote_spans);
        meter = meter.on_finish(Box::new(move |f| {
            let outcome = match (status.is_success(), f.complete) {
                (true, true) => "ok",
                (true, false) => "incomplete",
                (false, _) if status.is_client_error() => "bad_request",
                (false, _) => "error",
            };
            recorder.finish(
                &ctx,
                &Outcome {
                    status: status.as_u16(),
                    outcome,
                    inference_region: Some(region),
                    attempts,
                    input_tokens: f.input_tokens,
                    output_tokens: f.output_tokens,
                    ttft: f.ttft,
                    finish_reasons: f.finish_reasons.clone(),
                    attempt_spans,
                    remote_spans: std::mem::take(
                        &mut *remote.lock().unwrap_or_else(|p| p.into_inner()),
                    ),
                },
            );
        }));
        answer.body = meter.body_read(answer.body, read.as_ref());
        Ok(answer)
    }
}
