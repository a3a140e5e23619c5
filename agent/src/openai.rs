//! The OpenAI chat-completions request as the agent needs it: validated
//! (each error names its field), with only `model`, `stream` and
//! `max_tokens` read; everything else passes through to the model server.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::error::CallError;

/// The highest `max_tokens` accepted.
pub const MAX_TOKENS_LIMIT: u64 = 1_000_000;

/// A validated request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The inference profile the client named.
    pub model: String,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    body: Map<String, Value>,
}

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

impl ChatRequest {
    pub fn parse(bytes: &[u8]) -> Result<ChatRequest, CallError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| CallError::BadRequest {
            param: None,
            message: format!("the request body is not valid JSON: {e}"),
        })?;
        let Value::Object(body) = value else {
            return Err(CallError::BadRequest {
                param: None,
                message: "the request body must be a JSON object".into(),
            });
        };
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(Value::String(_)) | None => {
                return Err(CallError::bad(
                    "model",
                    "`model` is required: name an inference profile",
                ));
            }
            Some(_) => return Err(CallError::bad("model", "`model` must be a string")),
        };
        match body.get("messages") {
            None => return Err(CallError::bad("messages", "`messages` is required")),
            Some(Value::Array(msgs)) if msgs.is_empty() => {
                return Err(CallError::bad("messages", "`messages` must not be empty"));
            }
            Some(Value::Array(msgs)) => {
                for (i, m) in msgs.iter().enumerate() {
                    let Value::Object(m) = m else {
                        return Err(CallError::bad(
                            &format!("messages[{i}]"),
                            format!("`messages[{i}]` must be an object"),
                        ));
                    };
                    match m.get("role") {
                        Some(Value::String(r)) if ROLES.contains(&r.as_str()) => {}
                        _ => {
                            return Err(CallError::bad(
                                &format!("messages[{i}].role"),
                                format!("`messages[{i}].role` must be one of {}", ROLES.join(", ")),
                            ));
                        }
                    }
                    if !matches!(
                        m.get("content"),
                        None | Some(Value::String(_) | Value::Array(_) | Value::Null)
                    ) {
                        return Err(CallError::bad(
                            &format!("messages[{i}].content"),
                            format!(
                                "`messages[{i}].content` must be a string or an array of parts"
                            ),
                        ));
                    }
                }
            }
            Some(_) => return Err(CallError::bad("messages", "`messages` must be an array")),
        }
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(CallError::bad("stream", "`stream` must be true or false")),
        };
        let mut max_tokens = None;
        for field in ["max_tokens", "max_completion_tokens"] {
            match body.get(field) {
                None | Some(Value::Null) => {}
                Some(v) => match v.as_u64() {
                    Some(n) if (1..=MAX_TOKENS_LIMIT).contains(&n) => max_tokens = Some(n),
                    _ => {
                        return Err(CallError::bad(
                            field,
                            format!(
                                "`{field}` must be a whole number from 1 to {MAX_TOKENS_LIMIT}"
                            ),
                        ));
                    }
                },
            }
        }
        for (field, max) in [("temperature", 2.0), ("top_p", 1.0)] {
            match body.get(field) {
                None | Some(Value::Null) => {}
                Some(v) => match v.as_f64() {
                    Some(x) if (0.0..=max).contains(&x) => {}
                    _ => {
                        return Err(CallError::bad(
                            field,
                            format!("`{field}` must be a number from 0 to {max}"),
                        ));
                    }
                },
            }
        }
        if !matches!(
            body.get("stream_options"),
            None | Some(Value::Null | Value::Object(_))
        ) {
            return Err(CallError::bad(
                "stream_options",
                "`stream_options` must be an object",
            ));
        }
        Ok(ChatRequest {
            model,
            stream,
            max_tokens,
            body,
        })
    }

    /// The body to send to a model server: the same request with `model`
    /// set to the model the profile resolves to.
    pub fn body_for(&self, model: &str) -> Bytes {
        let mut body = self.body.clone();
        body.insert("model".into(), Value::String(model.to_string()));
        serde_json::to_vec(&body)
            .expect("a JSON map serializes")
            .into()
    }
}

/// Checks that a model server's unary answer is JSON.
pub fn check_answer(body: &[u8]) -> Result<(), CallError> {
    serde_json::from_slice::<serde::de::IgnoredAny>(body)
        .map(|_| ())
        .map_err(|e| {
            CallError::Upstream(format!("the model server's answer is not valid JSON: {e}"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(body: &str) -> Option<String> {
        match ChatRequest::parse(body.as_bytes()) {
            Err(CallError::BadRequest { param, .. }) => param,
            other => panic!("{body} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn names_the_wrong_field() {
        let msgs = r#""messages":[{"role":"user","content":"hi"}]"#;
        assert_eq!(param_of("{nope"), None);
        assert_eq!(param_of("[1]"), None);
        assert_eq!(param_of(&format!("{{{msgs}}}")).as_deref(), Some("model"));
        assert_eq!(
            param_of(&format!(r#"{{"model":7,{msgs}}}"#)).as_deref(),
            Some("model")
        );
        assert_eq!(param_of(r#"{"model":"p"}"#).as_deref(), Some("messages"));
        assert_eq!(
            param_of(r#"{"model":"p","messages":"hi"}"#).as_deref(),
            Some("messages")
        );
        assert_eq!(
            param_of(r#"{"model":"p","messages":[]}"#).as_deref(),
            Some("messages")
        );
        assert_eq!(
            param_of(r#"{"model":"p","messages":[{"role":"robot","content":"x"}]}"#).as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            param_of(r#"{"model":"p","messages":[{"role":"user","content":5}]}"#).as_deref(),
            Some("messages[0].content")
        );
        assert_eq!(
            param_of(&format!(r#"{{"model":"p",{msgs},"stream":"yes"}}"#)).as_deref(),
            Some("stream")
        );
        assert_eq!(
            param_of(&format!(r#"{{"model":"p",{msgs},"max_tokens":0}}"#)).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            param_of(&format!(r#"{{"model":"p",{msgs},"max_tokens":1.5}}"#)).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            param_of(&format!(
                r#"{{"model":"p",{msgs},"max_completion_tokens":99999999}}"#
            ))
            .as_deref(),
            Some("max_completion_tokens")
        );
        assert_eq!(
            param_of(&format!(r#"{{"model":"p",{msgs},"temperature":3}}"#)).as_deref(),
            Some("temperature")
        );
    }

    #[test]
    fn rewrites_only_the_model() {
        let req = ChatRequest::parse(br#"{"model":"us.m","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":5,"seed":1}"#).unwrap();
        assert_eq!(
            (req.model.as_str(), req.stream, req.max_tokens),
            ("us.m", true, Some(5))
        );
        let body: Value = serde_json::from_slice(&req.body_for("m")).unwrap();
        assert_eq!(body["model"], "m");
        assert_eq!(body["seed"], 1);
        assert_eq!(body["messages"][0]["content"], "hi");
    }
}
