//! The request of every HTTP door as the agent needs it: validated for its
//! API (each error names its field), with only `model`, `stream` and the
//! output-token cap read. The body is never re-serialized: fields are read
//! as slices of the original bytes, and the changes (`model`, and for the
//! Responses API `store: false`) are spliced in.

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use spillway_core::api::Api;

use crate::error::CallError;

/// The highest `max_tokens` accepted.
pub const MAX_TOKENS_LIMIT: u64 = 1_000_000;

/// A validated request.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub api: Api,
    /// The inference profile the client named.
    pub model: String,
    pub stream: bool,
    /// The output-token cap the client set, if any (`max_tokens`,
    /// `max_completion_tokens`, `max_output_tokens`); 0 for embeddings,
    /// which produce none.
    pub max_tokens: Option<u64>,
    body: Bytes,
    /// Where the value of `model` sits in `body`.
    model_span: (usize, usize),
    /// For a Responses call that did not say `store: false` (the engine
    /// must keep nothing): where `false` goes.
    store: Option<StoreFix>,
}

/// How `store: false` gets into a Responses body.
#[derive(Debug, Clone, Copy)]
enum StoreFix {
    /// `"store":false,` right after the opening brace (no `store` at all).
    Insert(usize),
    /// `false` over the `null` between these offsets.
    Replace(usize, usize),
}

const CHAT_ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];
const MESSAGES_ROLES: &[&str] = &["user", "assistant"];

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

/// The top-level fields of a request, as unparsed slices.
struct Fields<'a>(HashMap<Cow<'a, str>, &'a RawValue>);

impl<'a> Fields<'a> {
    /// A field that is present and not `null`.
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0.get(name).copied().filter(|v| v.get() != "null")
    }

    fn require(&self, name: &str) -> Result<&'a RawValue, CallError> {
        self.get(name)
            .ok_or_else(|| CallError::bad(name, format!("`{name}` is required")))
    }

    /// A whole number from 1 to the limit, if present.
    fn tokens(&self, name: &str) -> Result<Option<u64>, CallError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.get().parse::<u64>() {
                Ok(n) if (1..=MAX_TOKENS_LIMIT).contains(&n) => Ok(Some(n)),
                _ => Err(CallError::bad(
                    name,
                    format!("`{name}` must be a whole number from 1 to {MAX_TOKENS_LIMIT}"),
                )),
            },
        }
    }

    fn boolean(&self, name: &str) -> Result<bool, CallError> {
        match self.get(name).map(RawValue::get) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(_) => Err(CallError::bad(
                name,
                format!("`{name}` must be true or false"),
            )),
        }
    }

    /// A string or an array (a prompt, an input).
    fn text_or_list(&self, name: &str) -> Result<(), CallError> {
        let v = self.require(name)?;
        match kind(v) {
            b'"' => Ok(()),
            b'[' if v
                .get()
                .trim_start_matches('[')
                .trim_start()
                .starts_with(']') =>
            {
                Err(CallError::bad(name, format!("`{name}` must not be empty")))
            }
            b'[' => Ok(()),
            _ => Err(CallError::bad(
                name,
                format!("`{name}` must be a string or an array"),
            )),
        }
    }

    /// A non-empty array of messages with known roles and a string or
    /// array content.
    fn messages(&self, roles: &[&str]) -> Result<(), CallError> {
        let messages = self.require("messages")?;
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
            if !role.is_some_and(|r| roles.contains(&r.as_ref())) {
                return Err(CallError::bad(
                    &format!("messages[{i}].role"),
                    format!("`messages[{i}].role` must be one of {}", roles.join(", ")),
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
        Ok(())
    }

    fn ranges(&self, ranges: &[(&str, f64)]) -> Result<(), CallError> {
        for (name, max) in ranges {
            if let Some(v) = self.get(name) {
                match v.get().parse::<f64>() {
                    Ok(x) if (0.0..=*max).contains(&x) => {}
                    _ => {
                        return Err(CallError::bad(
                            name,
                            format!("`{name}` must be a number from 0 to {max}"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl ApiRequest {
    /// A chat-completions request.
    pub fn chat(bytes: Bytes) -> Result<ApiRequest, CallError> {
        ApiRequest::parse(Api::Chat, bytes)
    }

    pub fn parse(api: Api, bytes: Bytes) -> Result<ApiRequest, CallError> {
        // The top level must be an object; its values stay unparsed slices.
        let top: &RawValue = serde_json::from_slice(&bytes).map_err(not_json)?;
        if kind(top) != b'{' {
            return Err(CallError::BadRequest {
                param: None,
                message: "the request body must be a JSON object".into(),
            });
        }
        let fields = Fields(serde_json::from_str(top.get()).map_err(not_json)?);

        let required = || CallError::bad("model", "`model` is required: name an inference profile");
        let model_raw = fields.get("model").ok_or_else(required)?;
        if kind(model_raw) != b'"' {
            return Err(CallError::bad("model", "`model` must be a string"));
        }
        let model: String = serde_json::from_str(model_raw.get()).map_err(not_json)?;
        if model.is_empty() {
            return Err(required());
        }
        let stream = fields.boolean("stream")?;
        let mut store = None;
        let max_tokens = match api {
            Api::Chat => {
                fields.messages(CHAT_ROLES)?;
                fields.ranges(&[("temperature", 2.0), ("top_p", 1.0)])?;
                if fields
                    .get("stream_options")
                    .is_some_and(|v| kind(v) != b'{')
                {
                    return Err(CallError::bad(
                        "stream_options",
                        "`stream_options` must be an object",
                    ));
                }
                let a = fields.tokens("max_tokens")?;
                fields.tokens("max_completion_tokens")?.or(a)
            }
            Api::Completions => {
                fields.text_or_list("prompt")?;
                fields.ranges(&[("temperature", 2.0), ("top_p", 1.0)])?;
                fields.tokens("max_tokens")?
            }
            Api::Embeddings => {
                fields.text_or_list("input")?;
                if stream {
                    return Err(CallError::bad(
                        "stream",
                        "`stream` is not supported by embeddings",
                    ));
                }
                Some(0)
            }
            Api::Responses => {
                fields.text_or_list("input")?;
                fields.ranges(&[("temperature", 2.0), ("top_p", 1.0)])?;
                // Nothing about a call may be kept where it is served:
                // stored responses, and the calls that need them, are
                // refused rather than silently kept by an engine.
                if fields.boolean("store")? {
                    return Err(CallError::bad(
                        "store",
                        "`store` must be false: Spillway keeps no response where it is served (send the whole conversation in `input`)",
                    ));
                }
                for stateful in ["previous_response_id", "conversation"] {
                    if fields.get(stateful).is_some() {
                        return Err(CallError::bad(
                            stateful,
                            format!(
                                "`{stateful}` is not supported: Spillway keeps no response where it is served (send the whole conversation in `input`)"
                            ),
                        ));
                    }
                }
                if fields.boolean("background")? {
                    return Err(CallError::bad(
                        "background",
                        "`background` is not supported: it needs a stored response",
                    ));
                }
                store = match fields.0.get("store") {
                    None => Some(StoreFix::Insert(
                        top.get().as_ptr() as usize - bytes.as_ptr() as usize + 1,
                    )),
                    Some(null) if null.get() == "null" => {
                        let at = null.get().as_ptr() as usize - bytes.as_ptr() as usize;
                        Some(StoreFix::Replace(at, at + null.get().len()))
                    }
                    Some(_) => None,
                };
                fields.tokens("max_output_tokens")?
            }
            Api::Messages => {
                fields.messages(MESSAGES_ROLES)?;
                fields.ranges(&[("temperature", 1.0), ("top_p", 1.0)])?;
                if fields
                    .get("system")
                    .is_some_and(|v| !matches!(kind(v), b'"' | b'['))
                {
                    return Err(CallError::bad(
                        "system",
                        "`system` must be a string or an array of text blocks",
                    ));
                }
                Some(
                    fields
                        .tokens("max_tokens")?
                        .ok_or_else(|| CallError::bad("max_tokens", "`max_tokens` is required"))?,
                )
            }
        };

        // The raw slice of `model` lies inside `bytes`; its offset is where
        // the new value is spliced in.
        let start = model_raw.get().as_ptr() as usize - bytes.as_ptr() as usize;
        let model_span = (start, start + model_raw.get().len());
        drop(fields);
        Ok(ApiRequest {
            api,
            model,
            stream,
            max_tokens,
            body: bytes,
            model_span,
            store,
        })
    }

    /// The body to send to a model server: the same bytes with the value of
    /// `model` replaced by the model the profile resolves to (and, for a
    /// Responses call that did not say, `"store":false` added).
    pub fn body_for(&self, model: &str) -> Bytes {
        let quoted = serde_json::to_string(model).expect("a string serializes");
        let (start, end) = self.model_span;
        // Every change as (from, to, what goes there), in the body's order;
        // an array, not a Vec: this runs on every call.
        const NONE: (usize, usize, &[u8]) = (usize::MAX, usize::MAX, b"");
        let mut splices = [(start, end, quoted.as_bytes()), NONE];
        splices[1] = match self.store {
            Some(StoreFix::Insert(at)) => (at, at, b"\"store\":false,"),
            Some(StoreFix::Replace(from, to)) => (from, to, b"false"),
            None => NONE,
        };
        splices.sort_unstable_by_key(|s| s.0);
        let mut out = BytesMut::with_capacity(self.body.len() + quoted.len() + 16);
        let mut from = 0;
        for (at, to, with) in splices.into_iter().take_while(|s| s.0 != usize::MAX) {
            out.extend_from_slice(&self.body[from..at]);
            out.extend_from_slice(with);
            from = to;
        }
        out.extend_from_slice(&self.body[from..]);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(body: &str) -> Option<String> {
        match ApiRequest::chat(Bytes::copy_from_slice(body.as_bytes())) {
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
        let req = ApiRequest::chat(Bytes::from_static(raw.as_bytes())).unwrap();
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
        let req = ApiRequest::chat(Bytes::from_static(
            br#"{"model":"p","messages":[{"role":"assistant","content":null}],"stream":null,"max_tokens":null}"#,
        ))
        .unwrap();
        assert_eq!((req.stream, req.max_tokens), (false, None));
    }
}

#[cfg(test)]
mod other_apis {
    use super::*;

    fn parse(api: Api, body: &str) -> Result<ApiRequest, CallError> {
        ApiRequest::parse(api, Bytes::copy_from_slice(body.as_bytes()))
    }

    fn param_of(api: Api, body: &str) -> Option<String> {
        match parse(api, body) {
            Err(CallError::BadRequest { param, .. }) => param,
            other => panic!("{body} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn each_api_names_its_wrong_field() {
        let cases: &[(Api, &str, &str)] = &[
            (Api::Completions, r#"{"model":"p"}"#, "prompt"),
            (Api::Completions, r#"{"model":"p","prompt":7}"#, "prompt"),
            (
                Api::Completions,
                r#"{"model":"p","prompt":"x","max_tokens":0}"#,
                "max_tokens",
            ),
            (Api::Embeddings, r#"{"model":"p"}"#, "input"),
            (Api::Embeddings, r#"{"model":"p","input":[]}"#, "input"),
            (
                Api::Embeddings,
                r#"{"model":"p","input":"x","stream":true}"#,
                "stream",
            ),
            (Api::Responses, r#"{"model":"p"}"#, "input"),
            (
                Api::Responses,
                r#"{"model":"p","input":"x","store":true}"#,
                "store",
            ),
            (
                Api::Responses,
                r#"{"model":"p","input":"x","previous_response_id":"resp_1"}"#,
                "previous_response_id",
            ),
            (
                Api::Responses,
                r#"{"model":"p","input":"x","conversation":"conv_1"}"#,
                "conversation",
            ),
            (
                Api::Responses,
                r#"{"model":"p","input":"x","background":true}"#,
                "background",
            ),
            (
                Api::Responses,
                r#"{"model":"p","input":"x","max_output_tokens":-1}"#,
                "max_output_tokens",
            ),
            (Api::Messages, r#"{"model":"p","max_tokens":5}"#, "messages"),
            (
                Api::Messages,
                r#"{"model":"p","messages":[{"role":"user","content":"x"}]}"#,
                "max_tokens",
            ),
            (
                Api::Messages,
                r#"{"model":"p","max_tokens":5,"messages":[{"role":"system","content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                Api::Messages,
                r#"{"model":"p","max_tokens":5,"messages":[{"role":"user","content":"x"}],"system":3}"#,
                "system",
            ),
            (
                Api::Messages,
                r#"{"model":"p","max_tokens":5,"messages":[{"role":"user","content":"x"}],"temperature":1.5}"#,
                "temperature",
            ),
        ];
        for (api, body, param) in cases {
            assert_eq!(
                param_of(*api, body).as_deref(),
                Some(*param),
                "{api}: {body}"
            );
        }
    }

    #[test]
    fn reads_each_apis_token_cap() {
        let cap = |api, body| parse(api, body).unwrap().max_tokens;
        assert_eq!(
            cap(
                Api::Completions,
                r#"{"model":"p","prompt":["a"],"max_tokens":9}"#
            ),
            Some(9)
        );
        assert_eq!(
            cap(Api::Embeddings, r#"{"model":"p","input":["a","b"]}"#),
            Some(0)
        );
        assert_eq!(
            cap(
                Api::Responses,
                r#"{"model":"p","input":"x","max_output_tokens":7}"#
            ),
            Some(7)
        );
        assert_eq!(
            cap(
                Api::Messages,
                r#"{"model":"p","max_tokens":3,"messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}"#
            ),
            Some(3)
        );
    }

    #[test]
    fn a_responses_call_is_forwarded_with_store_false() {
        let req = parse(Api::Responses, r#" {"model":"us.m","input":"hi"}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&req.body_for("m")).unwrap();
        assert_eq!(
            (v["store"].as_bool(), v["model"].as_str()),
            (Some(false), Some("m"))
        );
        // A `store: null` becomes false, where it stands.
        let req = parse(
            Api::Responses,
            r#"{"store":null,"model":"us.m","input":"hi"}"#,
        )
        .unwrap();
        assert_eq!(
            req.body_for("m"),
            Bytes::from(r#"{"store":false,"model":"m","input":"hi"}"#)
        );
        let req = parse(
            Api::Responses,
            r#"{"model":"us.m","input":"hi","store":null}"#,
        )
        .unwrap();
        assert_eq!(
            req.body_for("m"),
            Bytes::from(r#"{"model":"m","input":"hi","store":false}"#)
        );
        // A client that said false is forwarded as it said.
        let raw = r#"{"input":"hi","store":false,"model":"us.m"}"#;
        let req = parse(Api::Responses, raw).unwrap();
        assert_eq!(req.body_for("us.m"), Bytes::from(raw));
    }
}
