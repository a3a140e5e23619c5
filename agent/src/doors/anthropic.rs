//! What the Anthropic Messages door (`POST /v1/messages`) answers in
//! Anthropic's own shapes, so that the Anthropic SDKs (and Claude Code)
//! read them as they read Anthropic's: errors as
//! `{"type":"error","error":{"type":...,"message":...}}`, and the
//! `anthropic-ratelimit-*` headers with RFC 3339 reset times.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::response::Response;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use serde_json::json;

use crate::error::{CallError, THROTTLE, json_response, put_rate_headers};
use crate::quota::RateInfo;
use crate::telemetry::record::rfc3339;

/// Anthropic's error type for a status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 408 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    }
}

/// Anthropic's error object for a failed call.
pub fn error_json(e: &CallError) -> serde_json::Value {
    json!({
        "type": "error",
        "error": {"type": error_type(e.http_status()), "message": e.to_string()},
    })
}

/// A failed call as Anthropic answers one, with the same status, throttle
/// cause and `retry-after` as the OpenAI doors.
pub fn error_response(e: &CallError) -> Response {
    let mut r = json_response(e.http_status(), &error_json(e));
    // The throttling headers are the same as the OpenAI doors'; the rate
    // figures are put in Anthropic's names by `rate_headers`.
    let shared = crate::error::http_response(e);
    let h = r.headers_mut();
    for name in [header::RETRY_AFTER, HeaderName::from_static(THROTTLE)] {
        if let Some(v) = shared.headers().get(&name) {
            h.insert(name, v.clone());
        }
    }
    if let CallError::Quota(q) = e {
        rate_headers(h, &q.1);
    }
    r
}

/// `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}` for the
/// tightest quota covering the call; resets are RFC 3339 times.
pub fn rate_headers(h: &mut HeaderMap, info: &RateInfo) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    put_rate_headers(
        h,
        info,
        [
            [
                "anthropic-ratelimit-requests-limit",
                "anthropic-ratelimit-requests-remaining",
                "anthropic-ratelimit-requests-reset",
            ],
            [
                "anthropic-ratelimit-tokens-limit",
                "anthropic-ratelimit-tokens-remaining",
                "anthropic-ratelimit-tokens-reset",
            ],
        ],
        |reset| {
            let at = (now + reset).as_millis() as u64;
            HeaderValue::from_str(&rfc3339(at)).expect("a time is a valid header value")
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn errors_take_anthropics_shape() {
        let r = error_response(&CallError::bad("max_tokens", "`max_tokens` is required"));
        assert_eq!(r.status(), 400);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], "`max_tokens` is required");
        let r = error_response(&CallError::Unauthenticated("invalid API key".into()));
        assert_eq!(r.status(), 401);
        let throttled = error_response(&CallError::Exhausted {
            profile: "p".into(),
            attempts: vec![crate::error::FailedAttempt::of(
                "us-east",
                &CallError::AtCapacity("full".into()),
            )],
        });
        assert_eq!(throttled.status(), 429);
        assert_eq!(throttled.headers()["retry-after"], "1");
        assert_eq!(throttled.headers()[THROTTLE], "capacity");
    }
}
