//! The one reader of model-server answers: a chat completion (unary JSON)
//! or its chunks (server-sent events), as the meter, the load report and the
//! doors that translate answers (Converse) need them.

use bytes::BytesMut;
use serde::Deserialize;
use serde_json::Value;

/// A chat completion, or one chunk of a streamed one: what any part of the
/// agent reads of it, in one parse.
#[derive(Deserialize, Default, Debug)]
pub struct Completion {
    #[serde(default)]
    pub choices: Vec<Choice>,
    pub usage: Option<Usage>,
    /// Set on an error event: `{"error": {...}}`, or vLLM's
    /// `{"object": "error", "message": ...}`.
    error: Option<Value>,
    object: Option<String>,
    message: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct Choice {
    pub message: Option<Content>,
    pub delta: Option<Content>,
    pub finish_reason: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct Content {
    pub content: Option<String>,
}

#[derive(Deserialize, Debug, Clone, Copy, Default)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
}

impl Completion {
    pub fn parse(json: &[u8]) -> Result<Completion, serde_json::Error> {
        serde_json::from_slice(json)
    }

    /// The error this chunk reports, if it is an error event.
    pub fn error(&self) -> Option<String> {
        if let Some(e) = &self.error {
            return Some(
                e["message"]
                    .as_str()
                    .map_or_else(|| e.to_string(), String::from),
            );
        }
        (self.object.as_deref() == Some("error")).then(|| {
            self.message
                .clone()
                .unwrap_or_else(|| "unknown error".into())
        })
    }

    /// The choices' finish reasons (`stop`, `length`, ...).
    pub fn finish_reasons(&self) -> impl Iterator<Item = &str> {
        self.choices
            .iter()
            .filter_map(|c| c.finish_reason.as_deref())
    }
}

/// Output tokens of a unary answer, from its usage (0 when it gives none).
pub fn output_tokens(body: &[u8]) -> u64 {
    Completion::parse(body)
        .ok()
        .and_then(|c| c.usage)
        .and_then(|u| u.completion_tokens)
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
        assert_eq!(c.usage.unwrap().completion_tokens, Some(1));
        assert!(c.error().is_none());
        let e = Completion::parse(br#"{"object":"error","message":"boom"}"#).unwrap();
        assert_eq!(e.error().as_deref(), Some("boom"));
        assert_eq!(count_events(b"data: a\n\ndata: [DONE]\n\n"), 1);
        assert_eq!(output_tokens(br#"{"usage":{"completion_tokens":7}}"#), 7);
        assert_eq!(output_tokens(br#"{"choices":[]}"#), 0);
        assert_eq!(output_tokens(b"not json"), 0);
        assert_eq!(count_events(b": comment\n\n"), 0);
    }
}
