//! Why a call failed, and the one place where that becomes an HTTP answer
//! (OpenAI-style error JSON, with the throttling headers) or a gRPC status
//! (with the same figures as metadata). The headers every door sets on an
//! answer are named here too.

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use serde_json::json;
use tonic::Status;

use spillway_core::api::Api;

use crate::quota::{RateInfo, Refused};

/// The region whose model server produced the answer.
pub const INFERENCE_REGION: &str = "x-spillway-inference-region";
/// The call's id, as in its audit record.
pub const REQUEST_ID: &str = "x-request-id";
/// On a 429: why, `quota` (the source region's quota, not spilled) or
/// `capacity` (every region tried was saturated).
pub const THROTTLE: &str = "x-spillway-throttle";
/// On a RESOURCE_EXHAUSTED gRPC status: the request was over this limit,
/// in bytes. It tells a refusal for size, which no other region would
/// take either, from a throttle.
pub const TOO_LARGE: &str = "x-spillway-too-large";

#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The request is malformed; `param` names the field.
    #[error("{message}")]
    BadRequest {
        param: Option<String>,
        message: String,
    },
    #[error(
        "the model `{0}` does not exist: name an inference profile (GET /v1/models lists them)"
    )]
    ProfileNotFound(String),
    #[error(
        "inference profile `{profile}` is not callable from region `{region}`: call an agent of a region the profile serves, or use a profile of this region's geography"
    )]
    NotCallableHere { profile: String, region: String },
    /// The request (an HTTP body, a gRPC message) is over the agent's
    /// limit, in bytes.
    #[error("the request is larger than this agent's limit of {0} bytes")]
    TooLarge(usize),
    /// The request body did not arrive within the door's deadline.
    #[error(
        "the request body did not arrive within this agent's limit of {} s",
        .0.as_secs_f64()
    )]
    BodyTimeout(std::time::Duration),
    /// The region (or a model server) is saturated; another region may do.
    #[error("{0}")]
    Throttled(String),
    /// Every model server of this region is at its configured capacity: no
    /// call was made, so trying another region costs nothing extra.
    #[error("{0}")]
    AtCapacity(String),
    /// A destination could not be reached or failed before answering;
    /// another region may do.
    #[error("{0}")]
    Unavailable(String),
    /// Every allowed region was tried (or the attempt limit was hit). The
    /// client is told the regions and a cause class for each; the details
    /// (model-server addresses, OS errors) go to the log and the audit
    /// record only.
    #[error("{}", describe(.profile, .attempts))]
    Exhausted {
        profile: String,
        attempts: Vec<FailedAttempt>,
    },
    /// A model server answered something that is not a valid answer, or
    /// broke off. Not retried: it may have done the work.
    #[error("{0}")]
    Upstream(String),
    /// A destination has no model server for the call's model over its API
    /// (its agent announces the APIs of all its servers together); the
    /// next region may serve it. Not a failure of that region.
    #[error("{0}")]
    NotServedThere(String),
    /// No region of the profile serves the API the client called.
    #[error(
        "inference profile `{profile}` is not served over the {api} API (POST {}) in any region it may use: call an API its model servers serve",
        .api.path()
    )]
    ApiNotServed { profile: String, api: Api },
    #[error("this agent has no configuration yet; it is waiting for the control plane")]
    NoConfig,
    /// A relay call from something that is not a known agent.
    #[error("{0}")]
    RelayRefused(String),
    /// No API key, or one that is not (or no longer) valid.
    #[error("{0}")]
    Unauthenticated(String),
    /// The tenant may not call this profile, or its region policy leaves no
    /// destination.
    #[error("{0}")]
    PermissionDenied(String),
    /// The client went away before the answer began.
    #[error("the client closed the call before the answer began")]
    Cancelled,
    /// A quota of the source region refused the call (not spilled), with
    /// what the rate-limit headers report.
    #[error("{}", .0.0)]
    Quota(Box<(Refused, RateInfo)>),
}

/// Why one region did not serve a call, as the client is told it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// It throttled, or every model server was at capacity.
    Saturated,
    /// It could not be reached, failed, or did not answer in time.
    Unavailable,
    /// The retry budget was spent before it was tried.
    NotTried,
    /// It serves the profile's model, but not over the call's API.
    NotServed,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Saturated => "saturated",
            Cause::Unavailable => "unavailable",
            Cause::NotTried => "not tried (retry budget spent)",
            Cause::NotServed => "does not serve this API",
        }
    }
}

/// A region tried for a call that it did not serve.
#[derive(Debug, Clone, PartialEq)]
pub struct FailedAttempt {
    pub region: String,
    pub cause: Cause,
    /// What happened, for the log and the audit record (may name internal
    /// addresses); never sent to the client.
    pub detail: String,
}

impl FailedAttempt {
    /// A region's failure, classed by the error it gave.
    pub fn of(region: &str, e: &CallError) -> FailedAttempt {
        let cause = match e {
            CallError::Throttled(_) | CallError::AtCapacity(_) => Cause::Saturated,
            CallError::NotServedThere(_) => Cause::NotServed,
            _ => Cause::Unavailable,
        };
        FailedAttempt {
            region: region.to_string(),
            cause,
            detail: e.to_string(),
        }
    }
}

/// Whether a call that every region failed was throttled (some region was
/// saturated: calling again later may do) rather than failed by an outage.
fn saturated(attempts: &[FailedAttempt]) -> bool {
    attempts.is_empty() || attempts.iter().any(|a| a.cause == Cause::Saturated)
}

fn describe(profile: &str, attempts: &[FailedAttempt]) -> String {
    if attempts.is_empty() {
        return format!(
            "inference profile `{profile}` is throttled: no region could take the call"
        );
    }
    let tried: Vec<String> = attempts
        .iter()
        .map(|a| format!("{}: {}", a.region, a.cause.as_str()))
        .collect();
    if saturated(attempts) {
        format!(
            "inference profile `{profile}` is throttled: every region tried was saturated or unavailable ({})",
            tried.join("; ")
        )
    } else {
        format!(
            "inference profile `{profile}` is unavailable: no region tried could serve the call ({})",
            tried.join("; ")
        )
    }
}

impl CallError {
    /// Whether the next region may be tried.
    pub fn retriable(&self) -> bool {
        matches!(
            self,
            CallError::Throttled(_)
                | CallError::AtCapacity(_)
                | CallError::Unavailable(_)
                | CallError::NotServedThere(_)
        )
    }

    /// Whether it counts against the region that gave it (ejection, the
    /// error rate in load reports): a failure, not a call it does not
    /// serve.
    pub fn is_failure(&self) -> bool {
        self.retriable() && !matches!(self, CallError::NotServedThere(_))
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            CallError::BadRequest { .. }
            | CallError::NotCallableHere { .. }
            | CallError::ApiNotServed { .. }
            | CallError::NotServedThere(_) => StatusCode::BAD_REQUEST,
            CallError::ProfileNotFound(_) => StatusCode::NOT_FOUND,
            CallError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            CallError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            CallError::Exhausted { attempts, .. } if !saturated(attempts) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            CallError::Throttled(_)
            | CallError::AtCapacity(_)
            | CallError::Exhausted { .. }
            | CallError::Quota(_) => StatusCode::TOO_MANY_REQUESTS,
            CallError::Unavailable(_) | CallError::NoConfig => StatusCode::SERVICE_UNAVAILABLE,
            CallError::Upstream(_) => StatusCode::BAD_GATEWAY,
            CallError::RelayRefused(_) | CallError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            CallError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            // nginx's "client closed request": nobody reads it.
            CallError::Cancelled => StatusCode::from_u16(499).expect("499 is a valid status code"),
        }
    }

    /// The error object of OpenAI's API: `{"error": {message, type, param, code}}`.
    pub fn openai_json(&self) -> serde_json::Value {
        let (kind, code) = match self {
            CallError::BadRequest { .. } => ("invalid_request_error", None),
            CallError::ProfileNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            CallError::NotCallableHere { .. } => (
                "invalid_request_error",
                Some("model_not_available_in_region"),
            ),
            CallError::ApiNotServed { .. } | CallError::NotServedThere(_) => {
                ("invalid_request_error", Some("api_not_supported"))
            }
            CallError::TooLarge(_) => ("invalid_request_error", Some("request_too_large")),
            CallError::BodyTimeout(_) => ("invalid_request_error", Some("request_timeout")),
            CallError::Exhausted { attempts, .. } if !saturated(attempts) => {
                ("server_error", Some("regions_unavailable"))
            }
            CallError::Throttled(_) | CallError::AtCapacity(_) | CallError::Exhausted { .. } => {
                ("rate_limit_error", Some("rate_limit_exceeded"))
            }
            CallError::Quota(_) => ("rate_limit_error", Some("quota_exceeded")),
            CallError::Unavailable(_) | CallError::NoConfig => {
                ("server_error", Some("service_unavailable"))
            }
            CallError::Upstream(_) => ("server_error", Some("bad_gateway")),
            CallError::RelayRefused(_) => ("permission_error", Some("forbidden")),
            CallError::PermissionDenied(_) => ("permission_error", Some("permission_denied")),
            CallError::Unauthenticated(_) => ("invalid_request_error", Some("invalid_api_key")),
            CallError::Cancelled => ("invalid_request_error", Some("cancelled")),
        };
        let param = match self {
            CallError::BadRequest { param, .. } => param.clone(),
            CallError::ProfileNotFound(_)
            | CallError::NotCallableHere { .. }
            | CallError::ApiNotServed { .. } => Some("model".to_string()),
            _ => None,
        };
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }

    pub fn to_status(&self) -> Status {
        let msg = self.to_string();
        match self {
            CallError::BadRequest { .. } => Status::invalid_argument(msg),
            CallError::ProfileNotFound(_) => Status::not_found(msg),
            CallError::NotCallableHere { .. } => Status::failed_precondition(msg),
            CallError::ApiNotServed { .. } => Status::invalid_argument(msg),
            CallError::NotServedThere(_) => Status::unimplemented(msg),
            // What gRPC servers answer to a message over their limit.
            CallError::TooLarge(_) => Status::resource_exhausted(msg),
            CallError::BodyTimeout(_) => Status::deadline_exceeded(msg),
            CallError::Exhausted { attempts, .. } if !saturated(attempts) => {
                Status::unavailable(msg)
            }
            CallError::Throttled(_)
            | CallError::AtCapacity(_)
            | CallError::Exhausted { .. }
            | CallError::Quota(_) => Status::resource_exhausted(msg),
            CallError::Unavailable(_) | CallError::NoConfig | CallError::Upstream(_) => {
                Status::unavailable(msg)
            }
            CallError::RelayRefused(_) | CallError::PermissionDenied(_) => {
                Status::permission_denied(msg)
            }
            CallError::Unauthenticated(_) => Status::unauthenticated(msg),
            CallError::Cancelled => Status::cancelled(msg),
        }
    }

    pub fn bad(param: &str, message: impl Into<String>) -> CallError {
        CallError::BadRequest {
            param: Some(param.to_string()),
            message: message.into(),
        }
    }
}

/// A JSON body with its content type.
pub fn json_response(status: StatusCode, v: &serde_json::Value) -> Response {
    let mut r = Response::new(Body::from(
        serde_json::to_vec(v).expect("JSON values serialize"),
    ));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A failed call as an HTTP answer: OpenAI-style error JSON, and on a
/// throttle `Retry-After`, `x-spillway-throttle` and, for a quota, the
/// `x-ratelimit-*` figures.
pub fn http_response(e: &CallError) -> Response {
    let mut r = json_response(e.http_status(), &e.openai_json());
    let h = r.headers_mut();
    match e {
        CallError::Exhausted { attempts, .. } if !saturated(attempts) => {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        CallError::Throttled(_) | CallError::AtCapacity(_) | CallError::Exhausted { .. } => {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            h.insert(THROTTLE, HeaderValue::from_static("capacity"));
        }
        CallError::Quota(q) => {
            h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(q)));
            h.insert(THROTTLE, HeaderValue::from_static("quota"));
            rate_headers(h, &q.1);
        }
        _ => {}
    }
    r
}

/// A failed call as a gRPC status; a quota refusal carries the rate-limit
/// metadata, `retry-after` and `x-spillway-throttle`, as over HTTP, and a
/// refusal for size `x-spillway-too-large`.
pub fn grpc_status(e: &CallError) -> Status {
    let mut status = e.to_status();
    if let CallError::TooLarge(limit) = e {
        status.metadata_mut().insert(TOO_LARGE, (*limit).into());
    }
    if let CallError::Quota(q) = e {
        rate_metadata(status.metadata_mut(), &q.1);
        let md = status.metadata_mut();
        md.insert("retry-after", retry_after_secs(q).into());
        md.insert(THROTTLE, "quota".parse().expect("ascii"));
    }
    status
}

fn retry_after_secs(q: &(Refused, RateInfo)) -> u64 {
    q.0.retry_after.as_secs_f64().ceil().max(1.0) as u64
}

/// A duration the way OpenAI's reset headers write it: `250ms`, `1.5s`.
fn reset(d: std::time::Duration) -> HeaderValue {
    let text = if d < std::time::Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        let secs = format!("{:.3}", d.as_secs_f64());
        format!("{}s", secs.trim_end_matches('0').trim_end_matches('.'))
    };
    HeaderValue::from_str(&text).expect("digits and units are valid header values")
}

/// The `x-ratelimit-*` headers of OpenAI's API, for the tightest quota
/// covering the call: its limit, and what this agent can still admit now.
pub fn rate_headers(h: &mut HeaderMap, info: &RateInfo) {
    put_rate_headers(
        h,
        info,
        [
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
        ],
        reset,
    );
}

/// Rate-limit headers under `names` (limit, remaining, reset; requests
/// then tokens), with resets written by `reset`: the one shape behind
/// OpenAI's and Anthropic's headers.
pub fn put_rate_headers(
    h: &mut HeaderMap,
    info: &RateInfo,
    names: [[&'static str; 3]; 2],
    reset: impl Fn(std::time::Duration) -> HeaderValue,
) {
    for (names, state) in names.iter().zip([&info.requests, &info.tokens]) {
        if let Some(state) = state {
            h.insert(
                HeaderName::from_static(names[0]),
                HeaderValue::from(state.limit),
            );
            h.insert(
                HeaderName::from_static(names[1]),
                HeaderValue::from(state.remaining),
            );
            h.insert(HeaderName::from_static(names[2]), reset(state.reset));
        }
    }
}

/// The `x-ratelimit-*` figures as gRPC metadata, as over HTTP.
pub fn rate_metadata(md: &mut tonic::metadata::MetadataMap, info: &RateInfo) {
    let mut h = HeaderMap::new();
    rate_headers(&mut h, info);
    for (name, value) in &h {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_bytes()),
        ) {
            md.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(region: &str, e: CallError) -> FailedAttempt {
        FailedAttempt::of(region, &e)
    }

    #[test]
    fn the_doors_limits_name_themselves() {
        let big = CallError::TooLarge(65_536);
        assert_eq!(big.http_status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(big.openai_json()["error"]["code"], "request_too_large");
        let status = grpc_status(&big);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("65536"), "{}", status.message());
        assert_eq!(status.metadata().get(TOO_LARGE).unwrap(), "65536");

        let slow = CallError::BodyTimeout(std::time::Duration::from_secs(30));
        assert_eq!(slow.http_status(), StatusCode::REQUEST_TIMEOUT);
        let json = slow.openai_json();
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert_eq!(json["error"]["code"], "request_timeout");
        assert_eq!(
            json["error"]["message"],
            "the request body did not arrive within this agent's limit of 30 s"
        );
    }

    #[test]
    fn an_outage_is_not_a_throttle_and_keeps_its_details_to_itself() {
        let down = CallError::Exhausted {
            profile: "us.m".into(),
            attempts: vec![
                attempt(
                    "us-east",
                    CallError::Unavailable(
                        "model server http://10.0.0.5:8000: Connection refused (os error 111)"
                            .into(),
                    ),
                ),
                attempt(
                    "us-west",
                    CallError::Unavailable("agent 10.1.0.7:7443 did not answer".into()),
                ),
            ],
        };
        assert_eq!(down.http_status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(down.to_status().code(), tonic::Code::Unavailable);
        let json = down.openai_json();
        assert_eq!(json["error"]["code"], "regions_unavailable");
        let message = json["error"]["message"].as_str().unwrap();
        assert_eq!(
            message,
            "inference profile `us.m` is unavailable: no region tried could serve the call (us-east: unavailable; us-west: unavailable)"
        );
        assert!(!message.contains("10.") && !message.contains("os error"));
        let r = http_response(&down);
        assert!(!r.headers().contains_key(THROTTLE));

        let busy = CallError::Exhausted {
            profile: "us.m".into(),
            attempts: vec![
                attempt(
                    "us-east",
                    CallError::AtCapacity("every model server is at capacity".into()),
                ),
                attempt(
                    "us-west",
                    CallError::Unavailable("model server http://10.0.0.6: 503".into()),
                ),
            ],
        };
        assert_eq!(busy.http_status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(busy.openai_json()["error"]["code"], "rate_limit_exceeded");
        assert!(!busy.to_string().contains("10.0.0.6"), "{busy}");
        assert_eq!(http_response(&busy).headers()[THROTTLE], "capacity");
    }
}
