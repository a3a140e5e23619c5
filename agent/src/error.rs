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
    #[error("the request body is larger than this agent's limit of {0} bytes")]
    TooLarge(usize),
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
    /// Every allowed region was tried (or the attempt limit was hit).
    #[error("inference profile `{profile}` is throttled: {}", describe(.attempts))]
    Exhausted {
        profile: String,
        attempts: Vec<(String, String)>,
    },
    /// A model server answered something that is not a valid answer, or
    /// broke off. Not retried: it may have done the work.
    #[error("{0}")]
    Upstream(String),
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

fn describe(attempts: &[(String, String)]) -> String {
    if attempts.is_empty() {
        return "no region could take the call".to_string();
    }
    let tried: Vec<String> = attempts
        .iter()
        .map(|(r, why)| format!("{r}: {why}"))
        .collect();
    format!(
        "every region tried was saturated or unavailable ({})",
        tried.join("; ")
    )
}

impl CallError {
    /// Whether the next region may be tried.
    pub fn retriable(&self) -> bool {
        matches!(
            self,
            CallError::Throttled(_) | CallError::AtCapacity(_) | CallError::Unavailable(_)
        )
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            CallError::BadRequest { .. }
            | CallError::NotCallableHere { .. }
            | CallError::ApiNotServed { .. } => StatusCode::BAD_REQUEST,
            CallError::ProfileNotFound(_) => StatusCode::NOT_FOUND,
            CallError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
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
            CallError::ApiNotServed { .. } => ("invalid_request_error", Some("api_not_supported")),
            CallError::TooLarge(_) => ("invalid_request_error", Some("request_too_large")),
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
            CallError::TooLarge(_) => Status::invalid_argument(msg),
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
/// metadata, `retry-after` and `x-spillway-throttle`, as over HTTP.
pub fn grpc_status(e: &CallError) -> Status {
    let mut status = e.to_status();
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
    const REQUESTS: [&str; 3] = [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ];
    const TOKENS: [&str; 3] = [
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ];
    for (names, state) in [(REQUESTS, &info.requests), (TOKENS, &info.tokens)] {
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
