//! The one reader of model-server answers, unary JSON or server-sent
//! events, of every API: chat and legacy completions, embeddings, OpenAI
//! Responses and Anthropic Messages. It reads what the meter, the load
//! report and the doors that translate answers (Converse) need: usage,
//! finish reasons, errors, and the text and tool calls of chat completions.

use bytes::BytesMut;
use serde::Deserialize;
use serde_json::Value;

/// An answer, or one event of a streamed one, of any API: what any part of
/// the agent reads of it, in one parse.
#[derive(Deserialize, Default, Debug)]
pub struct Completion {
    /// Chat and legacy completions.
    #[serde(default)]
    pub choices: Vec<Choice>,
    usage: Option<Usage>,
    /// Set on an error event: `{"error": {...}}`, or vLLM's
    /// `{"object": "error", "message": ...}`.
    error: Option<Value>,
    object: Option<String>,
    /// The event type of Responses and Messages streams.
    #[serde(rename = "type")]
    kind: Option<String>,
    /// vLLM's error text, or Anthropic's `message_start` (with usage).
    message: Option<Value>,
    /// The Responses API's `response.completed` event (with usage).
    response: Option<Nested>,
    /// Anthropic's `message_delta` (with the stop reason).
    delta: Option<Nested>,
    /// An Anthropic message's stop reason.
    stop_reason: Option<String>,
}

/// What is read inside a nested object of an event.
#[derive(Deserialize, Default, Debug)]
struct Nested {
    usage: Option<Usage>,
    stop_reason: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct Choice {
    pub message: Option<Content>,
    pub delta: Option<Content>,
    #[serde(default, deserialize_with = "string_only")]
    pub finish_reason: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct Content {
    /// The text, when it is a string (an engine that sends parts, or
    /// anything else, is read as no text rather than refused).
    #[serde(default, deserialize_with = "string_only")]
    pub content: Option<String>,
    /// The tool calls of a message, or pieces of them in a stream's delta
    /// (where `index` says which call a piece belongs to).
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A chat completion's tool call, or a piece of one: every field may be
/// absent from a stream's delta.
#[derive(Deserialize, Debug, Default)]
pub struct ToolCall {
    pub index: Option<u32>,
    pub id: Option<String>,
    pub function: Option<FunctionCall>,
}

#[derive(Deserialize, Debug, Default)]
pub struct FunctionCall {
    pub name: Option<String>,
    /// The arguments as JSON text. Some engines send a JSON object rather
    /// than text; it is read as its text.
    #[serde(default, deserialize_with = "json_text")]
    pub arguments: Option<String>,
}

/// A string, or nothing for any other JSON value: what the agent does not
/// need to understand does not fail the read.
fn string_only<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => Some(s),
        _ => None,
    })
}

/// A string as it is, any other JSON value as its text (`null` as none).
fn json_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    })
}

/// Token usage, in OpenAI's chat names or the Responses and Anthropic
/// names (`input_tokens`, `output_tokens`); an engine may send both.
#[derive(Deserialize, Debug, Clone, Copy, Default)]
pub struct Usage {
    prompt_tokens: Option<u64>,
    input_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

impl Usage {
    pub fn input(&self) -> Option<u64> {
        self.prompt_tokens.or(self.input_tokens)
    }

    pub fn output(&self) -> Option<u64> {
        self.completion_tokens.or(self.output_tokens)
    }

    pub fn total(&self) -> Option<u64> {
        self.total_tokens
    }
}

impl Completion {
    pub fn parse(json: &[u8]) -> Result<Completion, serde_json::Error> {
        serde_json::from_slice(json)
    }

    /// The error this answer or event reports, if it is an error.
    pub fn error(&self) -> Option<String> {
        if let Some(e) = &self.error {
            return Some(
                e["message"]
                    .as_str()
                    .map_or_else(|| e.to_string(), String::from),
            );
        }
        let is_error = self.object.as_deref() == Some("error")
            || matches!(self.kind.as_deref(), Some("error" | "response.failed"));
        is_error.then(|| {
            self.message
                .as_ref()
                .and_then(Value::as_str)
                .unwrap_or("unknown error")
                .to_string()
        })
    }

    /// The usage it reports: at the top, or in Anthropic's `message_start`,
    /// or in the Responses API's `response.completed`.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
            .or_else(|| self.response.as_ref().and_then(|r| r.usage))
            .or_else(|| {
                self.message
                    .as_ref()
                    .and_then(|m| Usage::deserialize(m.get("usage")?).ok())
            })
    }

    /// Why the answer ended: the choices' finish reasons (`stop`,
    /// `length`, ...), or Anthropic's stop reason (`end_turn`, ...).
    pub fn finish_reasons(&self) -> impl Iterator<Item = &str> {
        self.choices
            .iter()
            .filter_map(|c| c.finish_reason.as_deref())
            .chain(self.stop_reason.as_deref())
            .chain(self.delta.as_ref().and_then(|d| d.stop_reason.as_deref()))
    }
}

/// Output tokens of a unary answer, from its usage (0 when it gives none).
/// Reads the usage alone: the load report needs nothing else of it.
pub fn output_tokens(body: &[u8]) -> u64 {
    #[derive(Deserialize)]
    struct UsageOnly {
        usage: Option<Usage>,
    }
    serde_json::from_slice::<UsageOnly>(body)
        .ok()
        .and_then(|a| a.usage)
        .and_then(|u| u.output())
        .unwrap_or(0)
}

/// The message of a model server's refusal (a 4xx body), for the client.
pub fn refusal_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(String::from))
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(500).collect())
}

/// Server-sent events in a chunk that carry data (one token each, roughly),
/// not counting the final `[DONE]`.
pub fn count_events(chunk: &[u8]) -> u64 {
    let events = chunk.windows(5).filter(|w| w == b"data:").count();
    let done = chunk.windows(6).filter(|w| w == b"[DONE]").count();
    events.saturating_sub(done) as u64
}

/// Splits server-sent-event bytes into the `data:` payloads of whole events.
#[derive(Default)]
pub struct SseParser {
    buf: BytesMut,
    /// How far `buf` was already searched for an event end.
    scanned: usize,
}

impl SseParser {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        // Resume a little before where the last search stopped: a separator
        // may straddle two chunks.
        while let Some((len, sep)) = find_event_end(&self.buf, self.scanned.saturating_sub(3)) {
            let event = self.buf.split_to(len + sep);
            self.scanned = 0;
            let text = String::from_utf8_lossy(&event[..len]);
            let data: Vec<&str> = text
                .split(['\n', '\r'])
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
        self.scanned = self.buf.len();
        out
    }
}

/// Where the first event ends at or after `from`: (its length, the
/// separator's length). Lines end in LF, CRLF or CR.
fn find_event_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    (from..buf.len()).find_map(|i| {
        let rest = &buf[i..];
        if rest.starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else if rest.starts_with(b"\n\n") || rest.starts_with(b"\r\r") {
            Some((i, 2))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_handles_split_events() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").is_empty());
        assert_eq!(p.push(b":1}\n\ndata: [DONE]\n\n"), ["{\"a\":1}", "[DONE]"]);
        assert_eq!(p.push(b": comment\n\n"), Vec::<String>::new());
        assert_eq!(p.push(b"data: a\r\rdata: b\r\n\r"), ["a"]);
        assert_eq!(p.push(b"\n"), ["b"]);
    }

    #[test]
    fn reads_usage_finish_reasons_and_errors() {
        let c = Completion::parse(
            br#"{"choices":[{"message":{"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
        )
        .unwrap();
        assert_eq!(c.finish_reasons().collect::<Vec<_>>(), ["stop"]);
        assert_eq!(c.usage().unwrap().output(), Some(1));
        assert!(c.error().is_none());
        let e = Completion::parse(br#"{"object":"error","message":"boom"}"#).unwrap();
        assert_eq!(e.error().as_deref(), Some("boom"));
        assert_eq!(count_events(b"data: a\n\ndata: [DONE]\n\n"), 1);
        assert_eq!(output_tokens(br#"{"usage":{"completion_tokens":7}}"#), 7);
        assert_eq!(output_tokens(br#"{"choices":[]}"#), 0);
        assert_eq!(output_tokens(b"not json"), 0);
        assert_eq!(count_events(b": comment\n\n"), 0);
    }

    #[test]
    fn reads_tool_calls_of_messages_and_deltas() {
        let c = Completion::parse(
            br#"{"choices":[{"message":{"content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},"finish_reason":"tool_calls"}]}"#,
        )
        .unwrap();
        let m = c.choices[0].message.as_ref().unwrap();
        assert_eq!(m.content, None);
        let calls = m.tool_calls.as_ref().unwrap();
        assert_eq!(calls[0].id.as_deref(), Some("call_1"));
        let f = calls[0].function.as_ref().unwrap();
        assert_eq!(
            (f.name.as_deref(), f.arguments.as_deref()),
            (Some("f"), Some(r#"{"a":1}"#))
        );
        // A delta's piece: only the index and some arguments; an engine that
        // sends the arguments as an object; `null` tool calls.
        let d = Completion::parse(
            br#"{"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{\"q"}},{"index":2,"function":{"arguments":{"b":2}}}]}}]}"#,
        )
        .unwrap();
        let calls = d.choices[0]
            .delta
            .as_ref()
            .unwrap()
            .tool_calls
            .as_ref()
            .unwrap();
        assert_eq!(calls[0].index, Some(1));
        assert_eq!(calls[0].id, None);
        let f = calls[0].function.as_ref().unwrap();
        assert_eq!(
            (f.name.as_deref(), f.arguments.as_deref()),
            (None, Some(r#"{"q"#))
        );
        let f = calls[1].function.as_ref().unwrap();
        assert_eq!(f.arguments.as_deref(), Some(r#"{"b":2}"#));
        let n = Completion::parse(br#"{"choices":[{"delta":{"content":"x","tool_calls":null}}]}"#)
            .unwrap();
        assert!(n.choices[0].delta.as_ref().unwrap().tool_calls.is_none());
    }

    #[test]
    fn reads_responses_and_messages_shapes() {
        let usage = |json: &str| {
            let u = Completion::parse(json.as_bytes()).unwrap().usage().unwrap();
            (u.input(), u.output())
        };
        // Responses: unary, and the stream's last event.
        assert_eq!(
            usage(r#"{"object":"response","usage":{"input_tokens":4,"output_tokens":2}}"#),
            (Some(4), Some(2))
        );
        assert_eq!(
            usage(
                r#"{"type":"response.completed","response":{"usage":{"input_tokens":4,"output_tokens":3}}}"#
            ),
            (Some(4), Some(3))
        );
        // Messages: unary, message_start and message_delta.
        let m = Completion::parse(
            br#"{"type":"message","stop_reason":"end_turn","usage":{"input_tokens":9,"output_tokens":5}}"#,
        )
        .unwrap();
        assert_eq!(m.finish_reasons().collect::<Vec<_>>(), ["end_turn"]);
        assert_eq!(
            usage(
                r#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":9,"output_tokens":1}}}"#
            ),
            (Some(9), Some(1))
        );
        let d = Completion::parse(
            br#"{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":5}}"#,
        )
        .unwrap();
        assert_eq!(d.finish_reasons().collect::<Vec<_>>(), ["max_tokens"]);
        assert_eq!(d.usage().unwrap().output(), Some(5));
        // Errors of both streams.
        let e = Completion::parse(
            br#"{"type":"error","error":{"type":"overloaded_error","message":"busy"}}"#,
        )
        .unwrap();
        assert_eq!(e.error().as_deref(), Some("busy"));
        // Embeddings: input only.
        assert_eq!(
            usage(r#"{"object":"list","data":[],"usage":{"prompt_tokens":6,"total_tokens":6}}"#),
            (Some(6), None)
        );
    }
}
