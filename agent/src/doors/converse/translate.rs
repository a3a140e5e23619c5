//! Converse to chat completions and back, as pure functions: a
//! `ConverseRequest` (text, images, tool uses and results, the system
//! prompt and the tool configuration) checked and turned into an OpenAI
//! chat-completions body, and the engine's answer (text and tool calls,
//! unary or streamed) turned into Converse blocks and events.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Display;

use serde_json::{Map, Value, json};
use spillway_proto::pb::{self, content_block::Block, converse_stream_event::Event};

use crate::doors::request::MAX_TOKENS_LIMIT;
use crate::error::CallError;
use crate::pipeline::Request as Call;
use crate::upstream::answer::{Choice, ToolCall};

/// The largest image accepted, as Bedrock's Converse does (3.75 MB); it
/// keeps a request with its image inside gRPC's 4 MiB message limit.
pub const MAX_IMAGE_BYTES: usize = 3_750_000;
/// Images per request at most, as Bedrock's Converse.
pub const MAX_IMAGES: usize = 20;
/// The longest tool name engines and OpenAI's API accept.
const MAX_TOOL_NAME: usize = 64;

/// An error about `field`, saying what a right value would be.
fn bad(field: &str, what: impl Display) -> CallError {
    CallError::bad(field, format!("invalid {field}: {what}"))
}

/// A JSON object given as text, if it is one.
fn json_object(text: &str) -> Option<Map<String, Value>> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// Checks a Converse request and turns it into a chat-completions call.
pub fn parse(req: &pb::ConverseRequest, stream: bool) -> Result<Call, CallError> {
    if req.model_id.is_empty() {
        return Err(bad("model_id", "required (an inference profile id)"));
    }
    if req.messages.is_empty() {
        return Err(bad("messages", "at least one message is required"));
    }
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    let system = system_text(&req.system)?;
    if !system.is_empty() {
        messages.push(json!({"role": "system", "content": system}));
    }
    let mut images = 0;
    for (i, m) in req.messages.iter().enumerate() {
        push_message(i, m, &mut images, &mut messages)?;
    }
    let mut body = Map::new();
    body.insert("messages".into(), Value::Array(messages));
    if let Some(cfg) = &req.tool_config {
        push_tools(cfg, &mut body)?;
    }
    if let Some(cfg) = &req.inference_config {
        if let Some(n) = cfg.max_tokens {
            if n == 0 || u64::from(n) > MAX_TOKENS_LIMIT {
                return Err(bad(
                    "inference_config.max_tokens",
                    format!("from 1 to {MAX_TOKENS_LIMIT}"),
                ));
            }
            body.insert("max_tokens".into(), json!(n));
        }
        if let Some(t) = cfg.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(bad("inference_config.temperature", "from 0 to 2"));
            }
            body.insert("temperature".into(), json!(t));
        }
        if let Some(p) = cfg.top_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(bad("inference_config.top_p", "from 0 to 1"));
            }
            body.insert("top_p".into(), json!(p));
        }
        if !cfg.stop_sequences.is_empty() {
            body.insert("stop".into(), json!(cfg.stop_sequences));
        }
    }
    if stream {
        body.insert("stream".into(), Value::Bool(true));
        body.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let max_tokens = req
        .inference_config
        .as_ref()
        .and_then(|c| c.max_tokens)
        .map(u64::from);
    // Images travel as base64: left out of the input-token estimate.
    let uncounted_bytes = req
        .messages
        .iter()
        .flat_map(|m| &m.content)
        .filter_map(|b| match &b.block {
            Some(Block::Image(img)) => Some(img.bytes.len().div_ceil(3) * 4),
            _ => None,
        })
        .sum();
    Ok(Call {
        model: req.model_id.clone(),
        stream,
        max_tokens,
        uncounted_bytes,
        body: Box::new(move |model| {
            body.insert("model".into(), Value::String(model.to_string()));
            serde_json::to_vec(&body)
                .expect("a JSON map serializes")
                .into()
        }),
    })
}

fn empty_block(field: &str) -> CallError {
    bad(
        field,
        "empty: set one of text, image, tool_use or tool_result",
    )
}

/// The system prompt: its text blocks, joined.
fn system_text(blocks: &[pb::ContentBlock]) -> Result<String, CallError> {
    let mut text = String::new();
    for (j, b) in blocks.iter().enumerate() {
        match &b.block {
            Some(Block::Text(t)) => text.push_str(t),
            Some(_) => return Err(bad(&format!("system[{j}]"), "only text blocks")),
            None => return Err(empty_block(&format!("system[{j}]"))),
        }
    }
    Ok(text)
}

/// Adds the chat messages of Converse message `i`: a user message's tool
/// results become tool messages, ahead of its text and images (engines
/// want the tool messages right after the assistant's tool calls); an
/// assistant message's tool uses become its tool calls.
fn push_message(
    i: usize,
    m: &pb::Message,
    images: &mut usize,
    out: &mut Vec<Value>,
) -> Result<(), CallError> {
    let at = |j: usize| format!("messages[{i}].content[{j}]");
    match pb::Role::try_from(m.role) {
        Ok(pb::Role::User) => {
            let mut parts = Vec::new();
            let (mut has_image, mut has_results) = (false, false);
            for (j, b) in m.content.iter().enumerate() {
                match &b.block {
                    Some(Block::Text(t)) => parts.push(json!({"type": "text", "text": t})),
                    Some(Block::Image(img)) => {
                        parts.push(image_part(&at(j), img, images)?);
                        has_image = true;
                    }
                    Some(Block::ToolResult(r)) => {
                        out.push(tool_message(&at(j), r)?);
                        has_results = true;
                    }
                    Some(Block::ToolUse(_)) => {
                        return Err(bad(
                            &format!("{}.tool_use", at(j)),
                            "tool uses belong in assistant messages",
                        ));
                    }
                    None => return Err(empty_block(&at(j))),
                }
            }
            if has_image {
                out.push(json!({"role": "user", "content": parts}));
            } else if !parts.is_empty() || !has_results {
                // Text alone stays one string, which every engine reads.
                let text: String = parts.iter().filter_map(|p| p["text"].as_str()).collect();
                out.push(json!({"role": "user", "content": text}));
            }
        }
        Ok(pb::Role::Assistant) => {
            let mut text = String::new();
            let mut calls = Vec::new();
            for (j, b) in m.content.iter().enumerate() {
                match &b.block {
                    Some(Block::Text(t)) => text.push_str(t),
                    Some(Block::ToolUse(u)) => calls.push(tool_call(&at(j), u)?),
                    Some(Block::Image(_)) => {
                        return Err(bad(
                            &format!("{}.image", at(j)),
                            "images belong in user messages",
                        ));
                    }
                    Some(Block::ToolResult(_)) => {
                        return Err(bad(
                            &format!("{}.tool_result", at(j)),
                            "tool results belong in user messages",
                        ));
                    }
                    None => return Err(empty_block(&at(j))),
                }
            }
            if calls.is_empty() {
                out.push(json!({"role": "assistant", "content": text}));
            } else {
                let content = if text.is_empty() {
                    Value::Null
                } else {
                    Value::String(text)
                };
                out.push(json!({"role": "assistant", "content": content, "tool_calls": calls}));
            }
        }
        _ => return Err(bad(&format!("messages[{i}].role"), "USER or ASSISTANT")),
    }
    Ok(())
}

/// An image block as an `image_url` part with a `data:` URL.
fn image_part(at: &str, img: &pb::ImageBlock, images: &mut usize) -> Result<Value, CallError> {
    let format = match pb::ImageFormat::try_from(img.format) {
        Ok(pb::ImageFormat::Png) => "png",
        Ok(pb::ImageFormat::Jpeg) => "jpeg",
        Ok(pb::ImageFormat::Gif) => "gif",
        Ok(pb::ImageFormat::Webp) => "webp",
        _ => return Err(bad(&format!("{at}.image.format"), "PNG, JPEG, GIF or WEBP")),
    };
    let field = format!("{at}.image.bytes");
    if img.bytes.is_empty() {
        return Err(bad(&field, "required (the image itself, not base64)"));
    }
    if img.bytes.len() > MAX_IMAGE_BYTES {
        return Err(bad(
            &field,
            format!(
                "{} bytes; at most {MAX_IMAGE_BYTES} per image",
                img.bytes.len()
            ),
        ));
    }
    *images += 1;
    if *images > MAX_IMAGES {
        return Err(bad(
            &format!("{at}.image"),
            format!("at most {MAX_IMAGES} images per request"),
        ));
    }
    let url = format!("data:image/{format};base64,{}", base64(&img.bytes));
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// A tool use block as a chat-completions tool call.
fn tool_call(at: &str, u: &pb::ToolUseBlock) -> Result<Value, CallError> {
    if u.tool_use_id.is_empty() {
        return Err(bad(
            &format!("{at}.tool_use.tool_use_id"),
            "required (the id of the model's tool call)",
        ));
    }
    if u.name.is_empty() {
        return Err(bad(
            &format!("{at}.tool_use.name"),
            "required (the tool called)",
        ));
    }
    if json_object(&u.input).is_none() {
        return Err(bad(
            &format!("{at}.tool_use.input"),
            "a JSON object, as text",
        ));
    }
    Ok(json!({
        "id": u.tool_use_id,
        "type": "function",
        "function": {"name": u.name, "arguments": u.input},
    }))
}

/// A tool result block as a `tool` message; its pieces joined by lines.
fn tool_message(at: &str, r: &pb::ToolResultBlock) -> Result<Value, CallError> {
    if r.tool_use_id.is_empty() {
        return Err(bad(
            &format!("{at}.tool_result.tool_use_id"),
            "required (the tool_use_id of the tool use it answers)",
        ));
    }
    let mut pieces = Vec::with_capacity(r.content.len());
    for (k, c) in r.content.iter().enumerate() {
        let field = format!("{at}.tool_result.content[{k}]");
        match &c.content {
            Some(pb::tool_result_content::Content::Text(t)) => pieces.push(t.as_str()),
            Some(pb::tool_result_content::Content::Json(j)) => {
                if serde_json::from_str::<Value>(j).is_err() {
                    return Err(bad(&format!("{field}.json"), "JSON, as text"));
                }
                pieces.push(j.as_str());
            }
            None => return Err(bad(&field, "empty: set text or json")),
        }
    }
    Ok(json!({"role": "tool", "tool_call_id": r.tool_use_id, "content": pieces.join("\n")}))
}

fn valid_tool_name(name: &str) -> bool {
    (1..=MAX_TOOL_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The tool configuration as chat-completions `tools` and `tool_choice`.
fn push_tools(cfg: &pb::ToolConfiguration, body: &mut Map<String, Value>) -> Result<(), CallError> {
    if cfg.tools.is_empty() {
        return Err(bad("tool_config.tools", "at least one tool is required"));
    }
    let mut names = HashSet::new();
    let mut tools = Vec::with_capacity(cfg.tools.len());
    for (i, t) in cfg.tools.iter().enumerate() {
        let at = format!("tool_config.tools[{i}].tool_spec");
        let Some(pb::tool::Tool::ToolSpec(spec)) = &t.tool else {
            return Err(bad(&at, "required (the tool's name and input schema)"));
        };
        if !valid_tool_name(&spec.name) {
            return Err(bad(
                &format!("{at}.name"),
                format!("1 to {MAX_TOOL_NAME} letters, digits, `_` or `-`"),
            ));
        }
        if !names.insert(spec.name.as_str()) {
            return Err(bad(
                &format!("{at}.name"),
                format!("`{}` names another tool already", spec.name),
            ));
        }
        let Some(schema) = json_object(&spec.input_schema) else {
            return Err(bad(
                &format!("{at}.input_schema"),
                "a JSON Schema object, as text",
            ));
        };
        let mut function = Map::new();
        function.insert("name".into(), json!(spec.name));
        if !spec.description.is_empty() {
            function.insert("description".into(), json!(spec.description));
        }
        function.insert("parameters".into(), Value::Object(schema));
        tools.push(json!({"type": "function", "function": function}));
    }
    body.insert("tools".into(), Value::Array(tools));
    use pb::tool_choice::Choice;
    let choice = match cfg.tool_choice.as_ref().and_then(|c| c.choice.as_ref()) {
        None => return Ok(()),
        Some(Choice::Auto(_)) => json!("auto"),
        Some(Choice::Any(_)) => json!("required"),
        Some(Choice::Tool(t)) if names.contains(t.name.as_str()) => {
            json!({"type": "function", "function": {"name": t.name}})
        }
        Some(Choice::Tool(t)) => {
            return Err(bad(
                "tool_config.tool_choice.tool.name",
                format!("`{}` is not one of tool_config.tools", t.name),
            ));
        }
    };
    body.insert("tool_choice".into(), choice);
    Ok(())
}

/// Standard base64 with padding (RFC 4648), for `data:` URLs.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |k: usize| u32::from(chunk.get(k).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * k)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Why the answer ended. An engine that calls tools but says `stop` (some
/// do) still asks for tool use.
pub fn stop_reason(reason: Option<&str>, tool_use: bool) -> pb::StopReason {
    match reason {
        Some("tool_calls" | "function_call") => pb::StopReason::ToolUse,
        Some("length") => pb::StopReason::MaxTokens,
        Some("content_filter") => pb::StopReason::ContentFiltered,
        _ if tool_use => pb::StopReason::ToolUse,
        _ => pb::StopReason::EndTurn,
    }
}

/// The arguments of a tool call as a tool use's input: an engine's empty
/// arguments (a call without any) become `{}`, which the client can send
/// back as it is.
fn input_of(arguments: Option<&str>) -> String {
    match arguments {
        Some(a) if !a.trim().is_empty() => a.to_string(),
        _ => "{}".to_string(),
    }
}

fn tool_use(k: usize, call: &ToolCall) -> pb::ToolUseBlock {
    let function = call.function.as_ref();
    pb::ToolUseBlock {
        tool_use_id: call
            .id
            .clone()
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("tooluse_{k}")),
        name: function.and_then(|f| f.name.clone()).unwrap_or_default(),
        input: input_of(function.and_then(|f| f.arguments.as_deref())),
    }
}

/// The output of a unary answer's first choice: its text (a block, even
/// empty, unless the model only called tools), then a tool use block per
/// tool call; and why it ended.
pub fn output(choice: Option<&Choice>) -> (Vec<pb::ContentBlock>, pb::StopReason) {
    let message = choice.and_then(|c| c.message.as_ref());
    let text = message.and_then(|m| m.content.clone()).unwrap_or_default();
    let calls: &[ToolCall] = message
        .and_then(|m| m.tool_calls.as_deref())
        .unwrap_or_default();
    let mut blocks = Vec::with_capacity(calls.len() + 1);
    if !text.is_empty() || calls.is_empty() {
        blocks.push(pb::ContentBlock {
            block: Some(Block::Text(text)),
        });
    }
    blocks.extend(calls.iter().enumerate().map(|(k, c)| pb::ContentBlock {
        block: Some(Block::ToolUse(tool_use(k, c))),
    }));
    let reason = choice.and_then(|c| c.finish_reason.as_deref());
    (blocks, stop_reason(reason, !calls.is_empty()))
}

/// The content blocks of a stream being translated, numbered as the proto
/// says: the text is block 0, the engine's tool call i block i + 1. Blocks
/// follow one another: a tool call that starts closes the block before it.
#[derive(Default)]
pub struct StreamBlocks {
    /// The text block has had a delta and no stop yet.
    text_open: bool,
    /// Tool calls by the engine's index.
    tools: BTreeMap<u32, ToolBlock>,
}

#[derive(Default)]
struct ToolBlock {
    id: Option<String>,
    name: Option<String>,
    started: bool,
    stopped: bool,
    /// Arguments that came before the name, sent once the block starts.
    held: String,
}

fn delta(index: u32, text: String, tool_use_input: String) -> Event {
    Event::ContentDelta(pb::ContentDelta {
        text,
        content_block_index: index,
        tool_use_input,
    })
}

fn block_stop(index: u32) -> Event {
    Event::ContentBlockStop(pb::ContentBlockStop {
        content_block_index: index,
    })
}

impl StreamBlocks {
    /// The events of one choice of a chunk: text and tool-use deltas, the
    /// starts and stops of blocks, and the message stop at its finish.
    pub fn choice(&mut self, choice: &Choice) -> Vec<Event> {
        let mut out = Vec::new();
        if let Some(d) = &choice.delta {
            if let Some(text) = d.content.as_deref().filter(|t| !t.is_empty()) {
                self.text_open = true;
                out.push(delta(0, text.to_string(), String::new()));
            }
            for (pos, call) in d.tool_calls.iter().flatten().enumerate() {
                self.tool_piece(call.index.unwrap_or(pos as u32), call, &mut out);
            }
        }
        if let Some(reason) = choice.finish_reason.as_deref() {
            out.extend(self.finish());
            let stop = stop_reason(Some(reason), !self.tools.is_empty());
            out.push(Event::MessageStop(pb::MessageStop {
                stop_reason: stop.into(),
            }));
        }
        out
    }

    fn tool_piece(&mut self, index: u32, call: &ToolCall, out: &mut Vec<Event>) {
        let function = call.function.as_ref();
        let block = self.tools.entry(index).or_default();
        if block.id.is_none() {
            block.id = call.id.clone().filter(|id| !id.is_empty());
        }
        if block.name.is_none() {
            block.name = function
                .and_then(|f| f.name.clone())
                .filter(|n| !n.is_empty());
        }
        if let Some(args) = function.and_then(|f| f.arguments.as_deref()) {
            block.held.push_str(args);
        }
        let start = !block.started && block.name.is_some();
        if start {
            // The blocks before it are done.
            if self.text_open {
                self.text_open = false;
                out.push(block_stop(0));
            }
            for (i, other) in self.tools.iter_mut() {
                if *i != index && other.started && !other.stopped {
                    other.stopped = true;
                    out.push(block_stop(i + 1));
                }
            }
        }
        let block = self.tools.get_mut(&index).expect("inserted above");
        if start {
            out.push(block.start(index));
        }
        if block.started && !block.stopped && !block.held.is_empty() {
            out.push(delta(
                index + 1,
                String::new(),
                std::mem::take(&mut block.held),
            ));
        }
    }

    /// Stops the blocks still open (starting any tool call that never got a
    /// name, so that its input is not lost). For the finish of the answer,
    /// or the end of a stream that had none.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        if self.text_open {
            self.text_open = false;
            out.push(block_stop(0));
        }
        for (i, block) in self.tools.iter_mut() {
            if block.stopped {
                continue;
            }
            if !block.started {
                out.push(block.start(*i));
            }
            if !block.held.is_empty() {
                out.push(delta(i + 1, String::new(), std::mem::take(&mut block.held)));
            }
            block.stopped = true;
            out.push(block_stop(i + 1));
        }
        out
    }
}

impl ToolBlock {
    fn start(&mut self, index: u32) -> Event {
        self.started = true;
        Event::ContentBlockStart(pb::ContentBlockStart {
            content_block_index: index + 1,
            tool_use: Some(pb::ToolUseStart {
                tool_use_id: self
                    .id
                    .clone()
                    .unwrap_or_else(|| format!("tooluse_{index}")),
                name: self.name.clone().unwrap_or_default(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::answer::Completion;
    use spillway_proto::pb::tool_result_content::Content as ResultContent;

    fn text(t: &str) -> pb::ContentBlock {
        pb::ContentBlock {
            block: Some(Block::Text(t.into())),
        }
    }

    fn block(b: Block) -> pb::ContentBlock {
        pb::ContentBlock { block: Some(b) }
    }

    fn message(role: pb::Role, content: Vec<pb::ContentBlock>) -> pb::Message {
        pb::Message {
            role: role.into(),
            content,
        }
    }

    fn image(format: pb::ImageFormat, bytes: &[u8]) -> pb::ContentBlock {
        block(Block::Image(pb::ImageBlock {
            format: format.into(),
            bytes: bytes.to_vec().into(),
        }))
    }

    fn tool_use_block(id: &str, name: &str, input: &str) -> pb::ContentBlock {
        block(Block::ToolUse(pb::ToolUseBlock {
            tool_use_id: id.into(),
            name: name.into(),
            input: input.into(),
        }))
    }

    fn tool_result(id: &str, content: Vec<ResultContent>) -> pb::ContentBlock {
        block(Block::ToolResult(pb::ToolResultBlock {
            tool_use_id: id.into(),
            content: content
                .into_iter()
                .map(|c| pb::ToolResultContent { content: Some(c) })
                .collect(),
            status: pb::ToolResultStatus::Success.into(),
        }))
    }

    fn spec(name: &str, schema: &str) -> pb::Tool {
        pb::Tool {
            tool: Some(pb::tool::Tool::ToolSpec(pb::ToolSpecification {
                name: name.into(),
                description: format!("the {name} tool"),
                input_schema: schema.into(),
            })),
        }
    }

    const SCHEMA: &str = r#"{"type":"object","properties":{"q":{"type":"string"}}}"#;

    fn tools(choice: Option<pb::tool_choice::Choice>) -> pb::ToolConfiguration {
        pb::ToolConfiguration {
            tools: vec![spec("search", SCHEMA), spec("get-weather_2", "{}")],
            tool_choice: choice.map(|c| pb::ToolChoice { choice: Some(c) }),
        }
    }

    fn request(messages: Vec<pb::Message>) -> pb::ConverseRequest {
        pb::ConverseRequest {
            model_id: "us.m".into(),
            messages,
            ..Default::default()
        }
    }

    fn body(req: &pb::ConverseRequest) -> Value {
        let call = parse(req, false).unwrap_or_else(|e| panic!("{e}"));
        serde_json::from_slice(&(call.body)("m")).unwrap()
    }

    /// The field a bad request names, and its message.
    fn refused(req: &pb::ConverseRequest) -> (String, String) {
        match parse(req, false) {
            Err(CallError::BadRequest { param, message }) => (param.unwrap_or_default(), message),
            Err(e) => panic!("not a bad request: {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn base64_follows_rfc_4648() {
        let cases: [(&[u8], &str); 9] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
            (&[0xff, 0xfe], "//4="),
            (
                &[0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'],
                "iVBORw0KGgo=",
            ),
        ];
        for (raw, encoded) in cases {
            assert_eq!(base64(raw), encoded, "{raw:?}");
        }
        let all: Vec<u8> = (0..=255).collect();
        let encoded = base64(&all);
        assert_eq!(encoded.len(), 344);
        assert!(encoded.ends_with("+fr7/P3+/w=="), "{encoded}");
    }

    #[test]
    fn text_and_system_stay_as_before() {
        let mut req = request(vec![
            message(pb::Role::User, vec![text("hel"), text("lo")]),
            message(pb::Role::Assistant, vec![text("hi")]),
        ]);
        req.system = vec![text("be "), text("brief")];
        req.inference_config = Some(pb::InferenceConfig {
            max_tokens: Some(5),
            ..Default::default()
        });
        assert_eq!(
            body(&req),
            json!({"model": "m", "max_tokens": 5, "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi"},
            ]})
        );
        let streamed = parse(&req, true).unwrap();
        let streamed: Value = serde_json::from_slice(&(streamed.body)("m")).unwrap();
        assert_eq!(streamed["stream"], true);
        assert_eq!(streamed["stream_options"]["include_usage"], true);
    }

    #[test]
    fn images_become_data_url_parts() {
        let req = request(vec![message(
            pb::Role::User,
            vec![
                text("what is this?"),
                image(pb::ImageFormat::Png, b"foo"),
                image(pb::ImageFormat::Jpeg, b"f"),
                image(pb::ImageFormat::Gif, b"fo"),
                image(pb::ImageFormat::Webp, b"foob"),
            ],
        )]);
        let url = |u: &str| json!({"type": "image_url", "image_url": {"url": u}});
        assert_eq!(
            body(&req)["messages"],
            json!([{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                url("data:image/png;base64,Zm9v"),
                url("data:image/jpeg;base64,Zg=="),
                url("data:image/gif;base64,Zm8="),
                url("data:image/webp;base64,Zm9vYg=="),
            ]}])
        );
    }

    #[test]
    fn tool_uses_and_results_become_tool_calls_and_tool_messages() {
        let mut req = request(vec![
            message(pb::Role::User, vec![text("find tok0")]),
            message(
                pb::Role::Assistant,
                vec![
                    text("looking"),
                    tool_use_block("call_1", "search", r#"{"q":"tok0"}"#),
                    tool_use_block("call_2", "get-weather_2", "{}"),
                ],
            ),
            message(
                pb::Role::User,
                vec![
                    tool_result("call_1", vec![ResultContent::Text("found".into())]),
                    tool_result(
                        "call_2",
                        vec![
                            ResultContent::Json(r#"{"sunny":true}"#.into()),
                            ResultContent::Text("and warm".into()),
                        ],
                    ),
                    text("thanks"),
                ],
            ),
            message(
                pb::Role::Assistant,
                vec![tool_use_block("call_3", "search", "{}")],
            ),
            message(pb::Role::User, vec![tool_result("call_3", vec![])]),
        ]);
        req.tool_config = Some(tools(None));
        let b = body(&req);
        assert_eq!(
            b["messages"],
            json!([
                {"role": "user", "content": "find tok0"},
                {"role": "assistant", "content": "looking", "tool_calls": [
                    {"id": "call_1", "type": "function",
                        "function": {"name": "search", "arguments": r#"{"q":"tok0"}"#}},
                    {"id": "call_2", "type": "function",
                        "function": {"name": "get-weather_2", "arguments": "{}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "found"},
                {"role": "tool", "tool_call_id": "call_2", "content": "{\"sunny\":true}\nand warm"},
                {"role": "user", "content": "thanks"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_3", "type": "function",
                        "function": {"name": "search", "arguments": "{}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_3", "content": ""},
            ])
        );
        assert_eq!(
            b["tools"],
            json!([
                {"type": "function", "function": {"name": "search",
                    "description": "the search tool",
                    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}},
                {"type": "function", "function": {"name": "get-weather_2",
                    "description": "the get-weather_2 tool", "parameters": {}}},
            ])
        );
        assert!(b.get("tool_choice").is_none(), "{b}");
    }

    #[test]
    fn tool_choices_become_chat_tool_choices() {
        use pb::tool_choice::Choice;
        for (choice, expected) in [
            (Choice::Auto(pb::AutoToolChoice {}), json!("auto")),
            (Choice::Any(pb::AnyToolChoice {}), json!("required")),
            (
                Choice::Tool(pb::SpecificToolChoice {
                    name: "search".into(),
                }),
                json!({"type": "function", "function": {"name": "search"}}),
            ),
        ] {
            let mut req = request(vec![message(pb::Role::User, vec![text("hi")])]);
            req.tool_config = Some(tools(Some(choice)));
            assert_eq!(body(&req)["tool_choice"], expected);
        }
    }

    #[test]
    fn every_bad_input_is_refused_naming_its_field() {
        use pb::tool_choice::Choice;
        let user = |blocks: Vec<pb::ContentBlock>| {
            request(vec![
                message(pb::Role::User, vec![text("hi")]),
                message(pb::Role::User, blocks),
            ])
        };
        let assistant = |blocks: Vec<pb::ContentBlock>| {
            request(vec![
                message(pb::Role::User, vec![text("hi")]),
                message(pb::Role::Assistant, blocks),
            ])
        };
        let with_tools = |cfg: pb::ToolConfiguration| {
            let mut r = request(vec![message(pb::Role::User, vec![text("hi")])]);
            r.tool_config = Some(cfg);
            r
        };
        let big = vec![0u8; MAX_IMAGE_BYTES + 1];
        let mut system = request(vec![message(pb::Role::User, vec![text("hi")])]);
        system.system = vec![image(pb::ImageFormat::Png, b"x")];
        let too_many = user(
            (0..=MAX_IMAGES)
                .map(|_| image(pb::ImageFormat::Png, b"x"))
                .collect(),
        );
        let cases: Vec<(pb::ConverseRequest, &str)> = vec![
            (
                user(vec![image(pb::ImageFormat::Png, b"")]),
                "messages[1].content[0].image.bytes",
            ),
            (
                user(vec![text("a"), image(pb::ImageFormat::Unspecified, b"x")]),
                "messages[1].content[1].image.format",
            ),
            (
                user(vec![image(pb::ImageFormat::Gif, &big)]),
                "messages[1].content[0].image.bytes",
            ),
            (too_many, "messages[1].content[20].image"),
            (
                assistant(vec![image(pb::ImageFormat::Png, b"x")]),
                "messages[1].content[0].image",
            ),
            (
                assistant(vec![tool_use_block("", "search", "{}")]),
                "messages[1].content[0].tool_use.tool_use_id",
            ),
            (
                assistant(vec![tool_use_block("c", "", "{}")]),
                "messages[1].content[0].tool_use.name",
            ),
            (
                assistant(vec![tool_use_block("c", "search", "[1]")]),
                "messages[1].content[0].tool_use.input",
            ),
            (
                assistant(vec![tool_use_block("c", "search", "")]),
                "messages[1].content[0].tool_use.input",
            ),
            (
                assistant(vec![tool_use_block("c", "search", "{")]),
                "messages[1].content[0].tool_use.input",
            ),
            (
                user(vec![tool_use_block("c", "search", "{}")]),
                "messages[1].content[0].tool_use",
            ),
            (
                user(vec![tool_result("", vec![ResultContent::Text("x".into())])]),
                "messages[1].content[0].tool_result.tool_use_id",
            ),
            (
                user(vec![tool_result(
                    "c",
                    vec![ResultContent::Json("{nope".into())],
                )]),
                "messages[1].content[0].tool_result.content[0].json",
            ),
            (
                assistant(vec![tool_result("c", vec![])]),
                "messages[1].content[0].tool_result",
            ),
            (
                user(vec![pb::ContentBlock { block: None }]),
                "messages[1].content[0]",
            ),
            (system, "system[0]"),
            (
                with_tools(pb::ToolConfiguration {
                    tools: vec![],
                    tool_choice: None,
                }),
                "tool_config.tools",
            ),
            (
                with_tools(pb::ToolConfiguration {
                    tools: vec![spec("", SCHEMA)],
                    tool_choice: None,
                }),
                "tool_config.tools[0].tool_spec.name",
            ),
            (
                with_tools(pb::ToolConfiguration {
                    tools: vec![spec("search", SCHEMA), spec("has space", SCHEMA)],
                    tool_choice: None,
                }),
                "tool_config.tools[1].tool_spec.name",
            ),
            (
                with_tools(pb::ToolConfiguration {
                    tools: vec![spec(&"a".repeat(65), SCHEMA)],
                    tool_choice: None,
                }),
                "tool_config.tools[0].tool_spec.name",
            ),
            (
                with_tools(pb::ToolConfiguration {
                    tools: vec![spec("search", SCHEMA), spec("search", SCHEMA)],
                    tool_choice: None,
                }),
                "tool_config.tools[1].tool_spec.name",
            ),
            (
                with_tools(pb::ToolConfiguration {
                    tools: vec![spec("search", "\"string\"")],
                    tool_choice: None,
                }),
                "tool_config.tools[0].tool_spec.input_schema",
            ),
            (
                with_tools(pb::ToolConfiguration {
                    tools: vec![spec("search", "")],
                    tool_choice: None,
                }),
                "tool_config.tools[0].tool_spec.input_schema",
            ),
            (
                with_tools(pb::ToolConfiguration {
                    tools: vec![pb::Tool { tool: None }],
                    tool_choice: None,
                }),
                "tool_config.tools[0].tool_spec",
            ),
            (
                with_tools(tools(Some(Choice::Tool(pb::SpecificToolChoice {
                    name: "lookup".into(),
                })))),
                "tool_config.tool_choice.tool.name",
            ),
        ];
        for (req, field) in cases {
            let (param, message) = refused(&req);
            assert_eq!(param, field, "{message}");
            assert!(
                message.starts_with(&format!("invalid {field}: ")),
                "{message}"
            );
        }
        // The longest name allowed is fine.
        let ok = with_tools(pb::ToolConfiguration {
            tools: vec![spec(&"a".repeat(64), SCHEMA)],
            tool_choice: None,
        });
        assert!(parse(&ok, false).is_ok());
    }

    fn choice(json: &str) -> Completion {
        Completion::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn unary_answers_become_text_and_tool_use_blocks() {
        let c = choice(
            r#"{"choices":[{"message":{"role":"assistant","content":null,"tool_calls":[
                {"id":"call_1","type":"function","function":{"name":"search","arguments":"{\"q\":\"tok0\"}"}},
                {"type":"function","function":{"name":"now","arguments":""}}
            ]},"finish_reason":"tool_calls"}]}"#,
        );
        let (blocks, stop) = output(c.choices.first());
        assert_eq!(stop, pb::StopReason::ToolUse);
        assert_eq!(
            blocks,
            vec![
                tool_use_block("call_1", "search", r#"{"q":"tok0"}"#),
                tool_use_block("tooluse_1", "now", "{}"),
            ]
        );
        // Text with a call, from an engine that says `stop`.
        let c = choice(
            r#"{"choices":[{"message":{"content":"let me look","tool_calls":[
                {"id":"c","function":{"name":"search","arguments":"{}"}}]},"finish_reason":"stop"}]}"#,
        );
        let (blocks, stop) = output(c.choices.first());
        assert_eq!(stop, pb::StopReason::ToolUse);
        assert_eq!(
            blocks,
            vec![text("let me look"), tool_use_block("c", "search", "{}")]
        );
        // Text alone, as before; an empty answer still has its text block.
        for (json, expected, reason) in [
            (
                r#"{"choices":[{"message":{"content":"hi"},"finish_reason":"stop"}]}"#,
                "hi",
                pb::StopReason::EndTurn,
            ),
            (
                r#"{"choices":[{"message":{"content":"h"},"finish_reason":"length"}]}"#,
                "h",
                pb::StopReason::MaxTokens,
            ),
            (r#"{"choices":[]}"#, "", pb::StopReason::EndTurn),
        ] {
            let c = choice(json);
            assert_eq!(output(c.choices.first()), (vec![text(expected)], reason));
        }
        assert_eq!(
            stop_reason(Some("content_filter"), false),
            pb::StopReason::ContentFiltered
        );
    }

    /// The events of a stream of chunks' first choices.
    fn events(chunks: &[&str]) -> Vec<Event> {
        let mut blocks = StreamBlocks::default();
        let mut out = Vec::new();
        for c in chunks {
            for ch in &choice(c).choices {
                out.extend(blocks.choice(ch));
            }
        }
        out.extend(blocks.finish());
        out
    }

    fn start(index: u32, id: &str, name: &str) -> Event {
        Event::ContentBlockStart(pb::ContentBlockStart {
            content_block_index: index,
            tool_use: Some(pb::ToolUseStart {
                tool_use_id: id.into(),
                name: name.into(),
            }),
        })
    }

    fn stop(reason: pb::StopReason) -> Event {
        Event::MessageStop(pb::MessageStop {
            stop_reason: reason.into(),
        })
    }

    #[test]
    fn streamed_tool_calls_become_block_starts_deltas_and_stops() {
        let got = events(&[
            r#"{"choices":[{"delta":{"role":"assistant","content":"let me look"}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"search","arguments":""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"q\":"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"tok0\"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"id":"call_2","function":{"name":"now","arguments":"{}"}}]}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#,
        ]);
        assert_eq!(
            got,
            vec![
                delta(0, "let me look".into(), String::new()),
                block_stop(0),
                start(1, "call_1", "search"),
                delta(1, String::new(), r#"{"q":"#.into()),
                delta(1, String::new(), r#""tok0"}"#.into()),
                block_stop(1),
                start(2, "call_2", "now"),
                delta(2, String::new(), "{}".into()),
                block_stop(2),
                stop(pb::StopReason::ToolUse),
            ]
        );
    }

    #[test]
    fn streamed_text_alone_is_block_zero_and_pieces_before_a_name_wait() {
        let got = events(&[
            r#"{"choices":[{"delta":{"content":"a"}}]}"#,
            r#"{"choices":[{"delta":{"content":""}}]}"#,
            r#"{"choices":[{"delta":{"content":"b"},"finish_reason":"length"}]}"#,
        ]);
        assert_eq!(
            got,
            vec![
                delta(0, "a".into(), String::new()),
                delta(0, "b".into(), String::new()),
                block_stop(0),
                stop(pb::StopReason::MaxTokens),
            ]
        );
        // Arguments ahead of the name are held until the block starts; a
        // call that never gets a name still starts and stops at the end.
        let got = events(&[
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"x","function":{"name":"f","arguments":":1}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{}"}}]}}]}"#,
        ]);
        assert_eq!(
            got,
            vec![
                start(1, "x", "f"),
                delta(1, String::new(), r#"{"a":1}"#.into()),
                block_stop(1),
                start(2, "tooluse_1", ""),
                delta(2, String::new(), "{}".into()),
                block_stop(2),
            ]
        );
    }
}
