//! The OpenAI chat-completions request as the agent needs it: validated
//! (each error names its field), with only `model`, `stream` and
//! `max_tokens` read. The body is never re-serialized: fields are read as
//! slices of the original bytes, and the one change, `model`, is spliced in.

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

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
    body: Bytes,
    /// Where the value of `model` sits in `body`.
    model_span: (usize, usize),
}

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Option<&'a RawValue>,
    #[serde(borrow)]
    content: Option<&'a RawValue>,
}

/// The first character of a JSON value, which tells its type.
fn kind(raw: &RawValue) -> u8 {
    raw.get().as_bytes().first().copied().unwrap_or(b' ')
}

fn not_json(e: serde_json::Error) -> CallError {
    CallError::BadRequest {
        param: None,
        message: format!("the request body is not valid JSON: {e}"),
    }
}

impl ChatRequest {
    pub fn parse(bytes: Bytes) -> Result<ChatRequest, CallError> {
        // The top level must be an object; its values stay unparsed slices.
        let top: &RawValue = serde_json::from_slice(&bytes).map_err(not_json)?;
        if kind(top) != b'{' {
            return Err(CallError::BadRequest {
                param: None,
                message: "the request body must be a JSON object".into(),
            });
        }
        let fields: HashMap<Cow<'_, str>, &RawValue> =
            serde_json::from_str(top.get()).map_err(not_json)?;
        let field = |name: &str| fields.get(name).copied().filter(|v| v.get() != "null");

        let required = || CallError::bad("model", "`model` is required: name an inference profile");
        let model_raw = field("model").ok_or_else(required)?;
        if kind(model_raw) != b'"' {
            return Err(CallError::bad("model", "`model` must be a string"));
        }
        let model: String = serde_json::from_str(model_raw.get()).map_err(not_json)?;
        if model.is_empty() {
            return Err(required());
        }

        let messages = field("messages")
            .ok_or_else(|| CallError::bad("messages", "`messages` is required"))?;
        if kind(messages) != b'[' {
            return Err(CallError::bad("messages", "`messages` must be an array"));
        }
        let messages: Vec<&RawValue> = serde_json::from_str(messages.get()).map_err(not_json)?;
        if messages.is_empty() {
            return Err(CallError::bad("messages", "`messages` must not be empty"));
        }
        for (i, m) in messages.iter().enumerate() {
            if kind(m) != b'{' {
                return Err(CallError::bad(
                    &format!("messages[{i}]"),
                    format!("`messages[{i}]` must be an object"),
                ));
            }
            let m: Message = serde_json::from_str(m.get()).map_err(not_json)?;
            let role: Option<Cow<'_, str>> = m
                .role
                .filter(|r| kind(r) == b'"')
                .and_then(|r| serde_json::from_str(r.get()).ok());
            if !role.is_some_and(|r| ROLES.contains(&r.as_ref())) {
                return Err(CallError::bad(
                    &format!("messages[{i}].role"),
                    format!("`messages[{i}].role` must be one of {}", ROLES.join(", ")),
                ));
            }
            if m.content
                .is_some_and(|c| !matches!(kind(c), b'"' | b'[' | b'n'))
            {
                return Err(CallError::bad(
                    &format!("messages[{i}].content"),
                    format!("`messages[{i}].content` must be a string or an array of parts"),
                ));
            }
        }

        let stream = match field("stream").map(RawValue::get) {
            None | Some("false") => false,
            Some("true") => true,
            Some(_) => return Err(CallError::bad("stream", "`stream` must be true or false")),
        };
        let mut max_tokens = None;
        for name in ["max_tokens", "max_completion_tokens"] {
            if let Some(v) = field(name) {
                match v.get().parse::<u64>() {
                    Ok(n) if (1..=MAX_TOKENS_LIMIT).contains(&n) => max_tokens = Some(n),
                    _ => {
                        return Err(CallError::bad(
                            name,
                            format!("`{name}` must be a whole number from 1 to {MAX_TOKENS_LIMIT}"),
                        ));
                    }
                }
            }
        }
        for (name, max) in [("temperature", 2.0), ("top_p", 1.0)] {
            if let Some(v) = field(name) {
                match v.get().parse::<f64>() {
                    Ok(x) if (0.0..=max).contains(&x) => {}
                    _ => {
                        return Err(CallError::bad(
                            name,
                            format!("`{name}` must be a number from 0 to {max}"),
                        ));
                    }
                }
            }
        }
        if field("stream_options").is_some_and(|v| kind(v) != b'{') {
            return Err(CallError::bad(
                "stream_options",
                "`stream_options` must be an object",
            ));
        }

        // The raw slice of `model` lies inside `bytes`; its offset is where
        // the new value is spliced in.
        let start = model_raw.get().as_ptr() as usize - bytes.as_ptr() as usize;
        let model_span = (start, start + model_raw.get().len());
        drop(fields);
        Ok(ChatRequest {
            model,
            stream,
            max_tokens,
            body: bytes,
            model_span,
        })
    }

    /// The body to send to a model server: the same bytes with the value of
    /// `model` replaced by the model the profile resolves to.
    pub fn body_for(&self, model: &str) -> Bytes {
        let quoted = serde_json::to_string(model).expect("a string serializes");
        let (start, end) = self.model_span;
        let mut out = BytesMut::with_capacity(self.body.len() - (end - start) + quoted.len());
        out.extend_from_slice(&self.body[..start]);
        out.extend_from_slice(quoted.as_bytes());
        out.extend_from_slice(&self.body[end..]);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(body: &str) -> Option<String> {
        match ChatRequest::parse(Bytes::copy_from_slice(body.as_bytes())) {
            Err(CallError::BadRequest { param, .. }) => param,
            other => panic!("{body} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn names_the_wrong_field() {
        let msgs = r#""messages":[{"role":"user","content":"hi"}]"#;
        let cases: &[(String, Option<&str>)] = &[
            ("{nope".into(), None),
            ("[1]".into(), None),
            (format!("{{{msgs}}}"), Some("model")),
            (format!(r#"{{"model":7,{msgs}}}"#), Some("model")),
            (format!(r#"{{"model":"",{msgs}}}"#), Some("model")),
            (r#"{"model":"p"}"#.into(), Some("messages")),
            (r#"{"model":"p","messages":"hi"}"#.into(), Some("messages")),
            (r#"{"model":"p","messages":[]}"#.into(), Some("messages")),
            (
                r#"{"model":"p","messages":[3]}"#.into(),
                Some("messages[0]"),
            ),
            (
                r#"{"model":"p","messages":[{"role":"robot","content":"x"}]}"#.into(),
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"p","messages":[{"content":"x"}]}"#.into(),
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"p","messages":[{"role":"user","content":5}]}"#.into(),
                Some("messages[0].content"),
            ),
            (
                format!(r#"{{"model":"p",{msgs},"stream":"yes"}}"#),
                Some("stream"),
            ),
            (
                format!(r#"{{"model":"p",{msgs},"max_tokens":0}}"#),
                Some("max_tokens"),
            ),
            (
                format!(r#"{{"model":"p",{msgs},"max_tokens":1.5}}"#),
                Some("max_tokens"),
            ),
            (
                format!(r#"{{"model":"p",{msgs},"max_tokens":-3}}"#),
                Some("max_tokens"),
            ),
            (
                format!(r#"{{"model":"p",{msgs},"max_completion_tokens":99999999}}"#),
                Some("max_completion_tokens"),
            ),
            (
                format!(r#"{{"model":"p",{msgs},"temperature":3}}"#),
                Some("temperature"),
            ),
            (
                format!(r#"{{"model":"p",{msgs},"top_p":"x"}}"#),
                Some("top_p"),
            ),
            (
                format!(r#"{{"model":"p",{msgs},"stream_options":true}}"#),
                Some("stream_options"),
            ),
        ];
        for (body, param) in cases {
            assert_eq!(param_of(body).as_deref(), *param, "{body}");
        }
    }

    #[test]
    fn splices_only_the_model_and_keeps_every_other_byte() {
        let raw = r#"{ "messages":[{"role":"user","content":"hi \"there\""}], "model" : "us.m","stream":true,"max_tokens":5,"seed":1}"#;
        let req = ChatRequest::parse(Bytes::from_static(raw.as_bytes())).unwrap();
        assert_eq!(
            (req.model.as_str(), req.stream, req.max_tokens),
            ("us.m", true, Some(5))
        );
        let body = req.body_for(r#"meta/llama "3""#);
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            raw.replace(r#""us.m""#, r#""meta/llama \"3\"""#)
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["model"], r#"meta/llama "3""#);
        assert_eq!(v["seed"], 1);
    }

    #[test]
    fn nulls_count_as_absent() {
        let req = ChatRequest::parse(Bytes::from_static(
            br#"{"model":"p","messages":[{"role":"assistant","content":null}],"stream":null,"max_tokens":null}"#,
        ))
        .unwrap();
        assert_eq!((req.stream, req.max_tokens), (false, None));
    }
}
