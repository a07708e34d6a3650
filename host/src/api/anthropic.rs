//! The Anthropic Messages wire format, both as the edge's client surface and as an upstream
//! protocol, with the translation to and from the canonical (OpenAI-shaped) form.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{field_error, parse_json, require_non_empty, require_range};
use crate::chat::{
    unix_now, ChatRequest, ChatResponse, Content, FinishReason, FunctionCall, FunctionDef, ImageUrl, Message, Part,
    Role, Stop, StreamEvent, Tool, ToolCall, Usage,
};
use crate::error::{ErrorClass, GatewayError};
use crate::sse;

#[derive(Deserialize)]
struct WireRequest {
    model: String,
    max_tokens: u32,
    messages: Vec<WireMessage>,
    #[serde(default)]
    system: Option<WireContent>,
    #[serde(default)]
    tools: Option<Vec<WireTool>>,
    #[serde(default)]
    tool_choice: Option<WireToolChoice>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct WireMessage {
    role: WireRole,
    content: WireContent,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum WireRole {
    User,
    Assistant,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum WireContent {
    Text(String),
    Blocks(Vec<Block>),
}

/// A content block, kept open so that block types Meridian does not translate are reported, not
/// silently lost, and fields it does not translate (`cache_control`, …) reach Anthropic upstreams.
#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    source: Option<ImageSource>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    tool_use_id: Option<String>,
    #[serde(default)]
    content: Option<WireContent>,
    #[serde(default)]
    is_error: Option<bool>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct ImageSource {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

#[derive(Deserialize)]
struct WireTool {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    input_schema: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct WireToolChoice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
}

impl WireContent {
    fn text(&self) -> String {
        match self {
            WireContent::Text(t) => t.clone(),
            WireContent::Blocks(blocks) => blocks.iter().filter_map(|b| b.text.as_deref()).collect::<Vec<_>>().join(""),
        }
    }
}

/// Parses and validates a client's Messages request into canonical form.
pub fn parse_request(body: &[u8]) -> Result<ChatRequest, GatewayError> {
    let wire: WireRequest = parse_json(body)?;
    require_non_empty("model", &wire.model)?;
    if wire.messages.is_empty() {
        return Err(field_error("messages", "must contain at least one message"));
    }
    if wire.max_tokens == 0 {
        return Err(field_error("max_tokens", "must be at least 1"));
    }
    require_range("temperature", wire.temperature, 0.0, 1.0)?;
    require_range("top_p", wire.top_p, 0.0, 1.0)?;

    let mut messages = Vec::with_capacity(wire.messages.len() + 1);
    if let Some(system) = wire.system {
        messages.push(system_message(system)?);
    }
    for (i, m) in wire.messages.into_iter().enumerate() {
        to_canonical(i, m, &mut messages)?;
    }
    let tools = wire.tools.map(|tools| {
        tools
            .into_iter()
            .map(|t| Tool {
                kind: "function".into(),
                function: FunctionDef {
                    name: t.name,
                    description: t.description,
                    parameters: t.input_schema,
                    extra: Map::new(),
                },
                anthropic_extra: t.extra,
            })
            .collect()
    });
    let tool_choice = wire
        .tool_choice
        .map(|c| match c.kind.as_str() {
            "auto" => Ok(json!("auto")),
            "any" => Ok(json!("required")),
            "none" => Ok(json!("none")),
            "tool" => match c.name {
                Some(name) => Ok(json!({ "type": "function", "function": { "name": name } })),
                None => Err(field_error("tool_choice.name", "is required when type is `tool`")),
            },
            other => Err(field_error("tool_choice.type", format!("unknown tool choice `{other}`"))),
        })
        .transpose()?;
    Ok(ChatRequest {
        model: wire.model,
        messages,
        tools,
        tool_choice,
        temperature: wire.temperature,
        top_p: wire.top_p,
        max_tokens: Some(wire.max_tokens),
        stop: wire.stop_sequences.map(Stop::Many),
        stream: wire.stream,
        anthropic_extra: wire.extra,
        ..ChatRequest::default()
    })
}

/// The system prompt as one canonical system message: a string as it came, and blocks as text
/// parts, each with its own fields (`cache_control`), or joined into one string when none has
/// any (the form every OpenAI-compatible upstream takes).
fn system_message(system: WireContent) -> Result<Message, GatewayError> {
    let blocks = match system {
        WireContent::Text(t) => return Ok(Message::text(Role::System, t)),
        WireContent::Blocks(blocks) => blocks,
    };
    let parts = blocks
        .into_iter()
        .enumerate()
        .map(|(j, b)| match b.kind.as_str() {
            "text" => Ok(Part { anthropic_extra: b.extra, ..Part::text(b.text.unwrap_or_default()) }),
            other => Err(field_error(
                format!("system[{j}].type"),
                format!("block type `{other}` is not supported in the system prompt"),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if parts.iter().all(|p| p.anthropic_extra.is_empty()) {
        return Ok(Message::text(Role::System, parts.iter().filter_map(|p| p.text.as_deref()).collect::<String>()));
    }
    Ok(Message { content: Some(Content::Parts(parts)), ..Message::text(Role::System, "") })
}

/// Canonical content for translated blocks: a lone plain text block is plain text, as an OpenAI
/// client would have sent it; anything else, a block with its own fields included, stays parts.
fn parts_content(parts: Vec<Part>) -> Option<Content> {
    match parts.as_slice() {
        [] => None,
        [only] if only.kind == "text" && only.anthropic_extra.is_empty() => only.text.clone().map(Content::Text),
        _ => Some(Content::Parts(parts)),
    }
}

fn to_canonical(i: usize, m: WireMessage, out: &mut Vec<Message>) -> Result<(), GatewayError> {
    let blocks = match m.content {
        WireContent::Text(t) => {
            let role = if m.role == WireRole::User { Role::User } else { Role::Assistant };
            out.push(Message::text(role, t));
            return Ok(());
        }
        WireContent::Blocks(blocks) => blocks,
    };
    // A message with no blocks at all is kept, empty, for the upstream to judge: dropping it
    // would change the turn order the client sent (and an empty text message, sent to an
    // Anthropic upstream as `[]`, would vanish on the way back).
    let no_blocks = blocks.is_empty();
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.into_iter().enumerate() {
        let at = |field: &str| format!("messages[{i}].content[{j}].{field}");
        match b.kind.as_str() {
            "text" => parts.push(Part { anthropic_extra: b.extra, ..Part::text(b.text.unwrap_or_default()) }),
            "image" => {
                let src = b.source.ok_or_else(|| field_error(at("source"), "is required on an image block"))?;
                let url = match (src.kind.as_str(), src.data, src.url) {
                    ("base64", Some(data), _) => {
                        format!("data:{};base64,{data}", src.media_type.as_deref().unwrap_or("image/png"))
                    }
                    ("url", _, Some(url)) => url,
                    _ => return Err(field_error(at("source"), "needs `base64` data or a `url`")),
                };
                parts.push(Part {
                    kind: "image_url".into(),
                    text: None,
                    image_url: Some(ImageUrl { url, detail: None }),
                    extra: Map::new(),
                    anthropic_extra: b.extra,
                });
            }
            "tool_use" if m.role == WireRole::Assistant => calls.push(ToolCall {
                id: b.id.ok_or_else(|| field_error(at("id"), "is required on a tool_use block"))?,
                kind: "function".into(),
                function: FunctionCall {
                    name: b.name.ok_or_else(|| field_error(at("name"), "is required on a tool_use block"))?,
                    arguments: b.input.unwrap_or_else(|| json!({})).to_string(),
                },
                anthropic_extra: b.extra,
            }),
            "tool_result" if m.role == WireRole::User => {
                let id = b.tool_use_id.ok_or_else(|| field_error(at("tool_use_id"), "is required"))?;
                let mut text = b.content.as_ref().map(WireContent::text).unwrap_or_default();
                if b.is_error == Some(true) {
                    text.insert_str(0, "Error: ");
                }
                let mut msg = Message::text(Role::Tool, text);
                msg.tool_call_id = Some(id);
                msg.anthropic_extra = b.extra;
                out.push(msg);
            }
            other => {
                return Err(field_error(
                    at("type"),
                    format!("block type `{other}` is not supported in a {} message", role_name(m.role)),
                ))
            }
        }
    }
    let role = if m.role == WireRole::User { Role::User } else { Role::Assistant };
    if no_blocks {
        out.push(Message { content: Some(Content::Parts(Vec::new())), ..Message::text(role, "") });
    } else if !parts.is_empty() || !calls.is_empty() {
        out.push(Message {
            content: parts_content(parts),
            tool_calls: (!calls.is_empty()).then_some(calls),
            ..Message::text(role, "")
        });
    }
    Ok(())
}

fn role_name(r: WireRole) -> &'static str {
    match r {
        WireRole::User => "user",
        WireRole::Assistant => "assistant",
    }
}

/// The body sent to an Anthropic upstream for a canonical request.
///
/// OpenAI-only fields (`extra`) are not sent: Anthropic refuses unknown fields. An Anthropic
/// client's own fields (`anthropic_extra`, at the top and on each block) are, as they came.
/// Temperature is clamped to Anthropic's 0–1 range.
pub fn upstream_body(req: &ChatRequest, upstream_model: &str, default_max_tokens: u32) -> Bytes {
    let system = system_prompt(req);
    let mut messages: Vec<Value> = Vec::new();
    for m in req.messages.iter().filter(|m| !matches!(m.role, Role::System | Role::Developer)) {
        let (role, blocks) = match m.role {
            Role::Assistant => {
                let mut blocks = content_blocks(m.content.as_ref());
                for call in m.tool_calls.iter().flatten() {
                    let input: Value = serde_json::from_str(&call.function.arguments).unwrap_or_else(|_| json!({}));
                    blocks.push(with_extra(
                        json!({ "type": "tool_use", "id": call.id, "name": call.function.name, "input": input }),
                        &call.anthropic_extra,
                    ));
                }
                ("assistant", blocks)
            }
            Role::Tool => (
                "user",
                vec![with_extra(
                    json!({ "type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content_text() }),
                    &m.anthropic_extra,
                )],
            ),
            _ => ("user", content_blocks(m.content.as_ref())),
        };
        // Anthropic wants tool results in the user turn right after the calls: merge adjacent
        // turns of one role.
        match messages.last_mut() {
            Some(last) if last["role"] == role => {
                if let Some(arr) = last["content"].as_array_mut() {
                    arr.extend(blocks);
                }
            }
            _ => messages.push(json!({ "role": role, "content": blocks })),
        }
    }
    let mut body = Map::new();
    body.insert("model".into(), json!(upstream_model));
    body.insert("max_tokens".into(), json!(req.output_limit().unwrap_or(default_max_tokens)));
    body.insert("messages".into(), Value::Array(messages));
    if let Some(system) = system {
        body.insert("system".into(), system);
    }
    if let Some(t) = req.temperature {
        body.insert("temperature".into(), json!(t.min(1.0)));
    }
    if let Some(p) = req.top_p {
        body.insert("top_p".into(), json!(p));
    }
    let stops = req.stop_sequences();
    if !stops.is_empty() {
        body.insert("stop_sequences".into(), json!(stops));
    }
    if let Some(tools) = &req.tools {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                let mut tool = json!({
                    "name": t.function.name,
                    "input_schema": t.function.parameters.clone().unwrap_or_else(|| json!({ "type": "object" })),
                });
                // Anthropic refuses `"description": null`: omit it when there is none.
                if let Some(description) = &t.function.description {
                    tool["description"] = json!(description);
                }
                with_extra(tool, &t.anthropic_extra)
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = req.tool_choice.as_ref().and_then(tool_choice) {
        body.insert("tool_choice".into(), choice);
    }
    if req.is_stream() {
        body.insert("stream".into(), json!(true));
    }
    add_extra(&mut body, &req.anthropic_extra);
    Bytes::from(Value::Object(body).to_string())
}

/// Anthropic's one system prompt for the canonical system messages: their text joined, or, when
/// any of them is made of parts (blocks with their own fields, such as `cache_control`), the
/// blocks of all of them in order.
fn system_prompt(req: &ChatRequest) -> Option<Value> {
    let system: Vec<&Message> =
        req.messages.iter().filter(|m| matches!(m.role, Role::System | Role::Developer)).collect();
    if system.is_empty() {
        None
    } else if system.iter().any(|m| matches!(m.content, Some(Content::Parts(_)))) {
        Some(Value::Array(system.iter().flat_map(|m| content_blocks(m.content.as_ref())).collect()))
    } else {
        Some(json!(system.iter().map(|m| m.content_text()).collect::<Vec<_>>().join("\n\n")))
    }
}

/// Adds a client's own fields to what Meridian wrote, which wins on a clash.
fn add_extra(object: &mut Map<String, Value>, extra: &Map<String, Value>) {
    for (k, v) in extra {
        object.entry(k.clone()).or_insert_with(|| v.clone());
    }
}

/// `block` with the client's own fields of the block it came from.
fn with_extra(mut block: Value, extra: &Map<String, Value>) -> Value {
    if let Some(object) = block.as_object_mut() {
        add_extra(object, extra);
    }
    block
}

fn tool_choice(choice: &Value) -> Option<Value> {
    match choice.as_str() {
        Some("auto") => Some(json!({ "type": "auto" })),
        Some("required") => Some(json!({ "type": "any" })),
        Some("none") => Some(json!({ "type": "none" })),
        _ => choice.pointer("/function/name").map(|name| json!({ "type": "tool", "name": name })),
    }
}

fn content_blocks(content: Option<&Content>) -> Vec<Value> {
    match content {
        None => Vec::new(),
        Some(Content::Text(t)) if t.is_empty() => Vec::new(),
        Some(Content::Text(t)) => vec![json!({ "type": "text", "text": t })],
        Some(Content::Parts(parts)) => parts.iter().filter_map(part_block).collect(),
    }
}

fn part_block(part: &Part) -> Option<Value> {
    let block = match (part.kind.as_str(), &part.text, &part.image_url) {
        ("text", Some(text), _) => json!({ "type": "text", "text": text }),
        ("image_url", _, Some(img)) => match parse_data_url(&img.url) {
            Some((media_type, data)) => {
                json!({ "type": "image", "source": { "type": "base64", "media_type": media_type, "data": data } })
            }
            None => json!({ "type": "image", "source": { "type": "url", "url": img.url } }),
        },
        _ => return None,
    };
    Some(with_extra(block, &part.anthropic_extra))
}

fn parse_data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    Some((meta.strip_suffix(";base64")?, data))
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: Option<String>,
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize, Clone, Copy, Default, Debug)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
    #[serde(default)]
    cache_read_input_tokens: Option<u32>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u32>,
}

impl WireUsage {
    /// The canonical usage, each prompt count this one lacks taken from `start` (a stream's
    /// `message_start`). Anthropic's `input_tokens` leaves out the tokens read from and written
    /// to the prompt cache; the canonical input counts them.
    fn canonical(self, start: WireUsage) -> Usage {
        let uncached = self.input_tokens.or(start.input_tokens).unwrap_or(0);
        let read = self.cache_read_input_tokens.or(start.cache_read_input_tokens).unwrap_or(0);
        let write = self.cache_creation_input_tokens.or(start.cache_creation_input_tokens).unwrap_or(0);
        Usage {
            input_tokens: uncached.saturating_add(read).saturating_add(write),
            output_tokens: self.output_tokens.unwrap_or(0),
            cache_read_tokens: read,
            cache_write_tokens: write,
        }
    }
}

/// Anthropic's `usage` for a canonical one: its `input_tokens` leaves out the cached tokens, which
/// it counts on their own.
fn usage_json(u: Usage) -> Value {
    json!({
        "input_tokens": u.uncached_input_tokens(),
        "cache_creation_input_tokens": u.cache_write_tokens,
        "cache_read_input_tokens": u.cache_read_tokens,
        "output_tokens": u.output_tokens,
    })
}

/// Decodes an Anthropic upstream's whole answer.
pub fn decode_response(body: &[u8], fallback_model: &str) -> Result<ChatResponse, String> {
    let wire: WireResponse = serde_json::from_slice(body).map_err(|e| format!("unreadable response: {e}"))?;
    let mut text: Option<String> = None;
    let mut tool_calls = Vec::new();
    for b in wire.content {
        match b.kind.as_str() {
            "text" => text.get_or_insert_with(String::new).push_str(b.text.as_deref().unwrap_or("")),
            "tool_use" => tool_calls.push(ToolCall {
                id: b.id.unwrap_or_default(),
                kind: "function".into(),
                function: FunctionCall {
                    name: b.name.unwrap_or_default(),
                    arguments: b.input.unwrap_or_else(|| json!({})).to_string(),
                },
                anthropic_extra: Map::new(),
            }),
            _ => {}
        }
    }
    Ok(ChatResponse {
        id: wire.id,
        model: wire.model.unwrap_or_else(|| fallback_model.to_string()),
        created: unix_now(),
        text,
        tool_calls,
        finish: wire.stop_reason.as_deref().map_or(FinishReason::Stop, FinishReason::from_anthropic),
        usage: Some(wire.usage.unwrap_or_default().canonical(WireUsage::default())),
    })
}

/// Encodes an answer for an Anthropic client.
pub fn encode_response(resp: &ChatResponse) -> Bytes {
    let mut content: Vec<Value> = Vec::new();
    if let Some(text) = resp.text.as_ref().filter(|t| !t.is_empty()) {
        content.push(json!({ "type": "text", "text": text }));
    }
    for call in &resp.tool_calls {
        content.push(json!({ "type": "tool_use", "id": call.id, "name": call.function.name,
            "input": tool_input(&call.function.arguments) }));
    }
    Bytes::from(
        json!({
            "id": resp.id,
            "type": "message",
            "role": "assistant",
            "model": resp.model,
            "content": content,
            "stop_reason": resp.finish.anthropic(),
            "stop_sequence": null,
            "usage": usage_json(resp.usage.unwrap_or_default()),
        })
        .to_string(),
    )
}

/// Tool arguments as a JSON object; arguments that are not valid JSON are kept as a string field
/// rather than dropped.
fn tool_input(arguments: &str) -> Value {
    serde_json::from_str::<Value>(arguments)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({ "arguments": arguments }))
}

#[derive(Deserialize)]
struct WireStreamEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<WireStartMessage>,
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    content_block: Option<Block>,
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct WireStartMessage {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    partial_json: Option<String>,
    #[serde(default)]
    stop_reason: Option<String>,
}

/// Turns an Anthropic upstream's SSE events into canonical events.
#[derive(Debug)]
pub struct StreamDecoder {
    fallback_model: String,
    /// The usage `message_start` gave, for the counts a later `message_delta` leaves out.
    start: WireUsage,
    /// Anthropic block index → canonical tool-call index.
    tool_blocks: Vec<(u32, u32)>,
}

impl StreamDecoder {
    /// A decoder for one stream.
    pub fn new(fallback_model: &str) -> Self {
        StreamDecoder {
            fallback_model: fallback_model.to_string(),
            start: WireUsage::default(),
            tool_blocks: Vec::new(),
        }
    }

    /// Decodes one event's data. Returns `Ok(true)` at `message_stop`.
    pub fn decode(&mut self, data: &str, out: &mut Vec<StreamEvent>) -> Result<bool, String> {
        let ev: WireStreamEvent = serde_json::from_str(data).map_err(|e| format!("unreadable stream event: {e}"))?;
        match ev.kind.as_str() {
            "message_start" => {
                let m = ev.message.ok_or("message_start without a message")?;
                self.start = m.usage.unwrap_or_default();
                let prompt = self.start.canonical(WireUsage::default());
                out.push(StreamEvent::Start {
                    id: m.id,
                    model: m.model.unwrap_or_else(|| self.fallback_model.clone()),
                    created: unix_now(),
                    input_tokens: Some(prompt.input_tokens),
                    cache_read_tokens: prompt.cache_read_tokens,
                    cache_write_tokens: prompt.cache_write_tokens,
                });
            }
            "content_block_start" => {
                let block = ev.content_block.ok_or("content_block_start without a block")?;
                match block.kind.as_str() {
                    "tool_use" => {
                        let index = u32::try_from(self.tool_blocks.len()).unwrap_or(u32::MAX);
                        self.tool_blocks.push((ev.index.unwrap_or(0), index));
                        out.push(StreamEvent::ToolCallStart {
                            index,
                            id: block.id.unwrap_or_default(),
                            name: block.name.unwrap_or_default(),
                        });
                    }
                    "text" => {
                        if let Some(t) = block.text.filter(|t| !t.is_empty()) {
                            out.push(StreamEvent::Text(t));
                        }
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let delta = ev.delta.ok_or("content_block_delta without a delta")?;
                match delta.kind.as_deref() {
                    Some("text_delta") => out.push(StreamEvent::Text(delta.text.unwrap_or_default())),
                    Some("input_json_delta") => {
                        let block = ev.index.unwrap_or(0);
                        let index = self
                            .tool_blocks
                            .iter()
                            .find(|(b, _)| *b == block)
                            .map(|(_, i)| *i)
                            .ok_or("input_json_delta for a block that is not a tool_use")?;
                        out.push(StreamEvent::ToolCallArgs { index, json: delta.partial_json.unwrap_or_default() });
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(reason) = ev.delta.and_then(|d| d.stop_reason) {
                    out.push(StreamEvent::Finish(FinishReason::from_anthropic(&reason)));
                }
                if let Some(u) = ev.usage {
                    out.push(StreamEvent::Usage(u.canonical(self.start)));
                }
            }
            "message_stop" => return Ok(true),
            "error" => {
                let message = ev
                    .error
                    .as_ref()
                    .and_then(|e| e.get("message"))
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .to_string();
                return Err(format!("upstream stream error: {message}"));
            }
            _ => {}
        }
        Ok(false)
    }
}

/// Writes canonical events as Anthropic Messages SSE.
#[derive(Debug, Default)]
pub struct StreamEncoder {
    /// The open content block: its index and whether it is text.
    open: Option<(u32, bool)>,
    next_block: u32,
    /// Canonical tool-call index → block index.
    tool_blocks: Vec<(u32, u32)>,
    finish: Option<FinishReason>,
    /// The prompt side of the usage, as the start said it: the usage of a stream that ends
    /// without its own.
    start_usage: Usage,
    closed: bool,
}

impl StreamEncoder {
    fn emit(out: &mut BytesMut, name: &str, data: &Value) {
        sse::write_event(out, Some(name), data.to_string().as_bytes());
    }

    fn close_block(&mut self, out: &mut BytesMut) {
        if let Some((index, _)) = self.open.take() {
            Self::emit(out, "content_block_stop", &json!({ "type": "content_block_stop", "index": index }));
        }
    }

    fn open_block(&mut self, out: &mut BytesMut, block: Value, is_text: bool) -> u32 {
        self.close_block(out);
        let index = self.next_block;
        self.next_block += 1;
        self.open = Some((index, is_text));
        Self::emit(
            out,
            "content_block_start",
            &json!({ "type": "content_block_start", "index": index, "content_block": block }),
        );
        index
    }

    /// Encodes one event.
    pub fn event(&mut self, event: &StreamEvent, out: &mut BytesMut) {
        match event {
            StreamEvent::Start { id, model, input_tokens, cache_read_tokens, cache_write_tokens, .. } => {
                self.start_usage = Usage {
                    input_tokens: input_tokens.unwrap_or(0),
                    output_tokens: 0,
                    cache_read_tokens: *cache_read_tokens,
                    cache_write_tokens: *cache_write_tokens,
                };
                Self::emit(
                    out,
                    "message_start",
                    &json!({ "type": "message_start", "message": {
                        "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
                        "stop_reason": null, "stop_sequence": null, "usage": usage_json(self.start_usage) } }),
                );
            }
            StreamEvent::Text(text) => {
                let index = match self.open {
                    Some((index, true)) => index,
                    _ => self.open_block(out, json!({ "type": "text", "text": "" }), true),
                };
                Self::emit(
                    out,
                    "content_block_delta",
                    &json!({ "type": "content_block_delta", "index": index,
                        "delta": { "type": "text_delta", "text": text } }),
                );
            }
            StreamEvent::ToolCallStart { index, id, name } => {
                let block =
                    self.open_block(out, json!({ "type": "tool_use", "id": id, "name": name, "input": {} }), false);
                self.tool_blocks.push((*index, block));
            }
            StreamEvent::ToolCallArgs { index, json } => {
                if let Some((_, block)) = self.tool_blocks.iter().find(|(i, _)| i == index) {
                    Self::emit(
                        out,
                        "content_block_delta",
                        &json!({ "type": "content_block_delta", "index": block,
                            "delta": { "type": "input_json_delta", "partial_json": json } }),
                    );
                }
            }
            StreamEvent::Finish(reason) => {
                self.close_block(out);
                self.finish = Some(*reason);
            }
            StreamEvent::Usage(usage) => self.message_end(out, *usage),
        }
    }

    fn message_end(&mut self, out: &mut BytesMut, usage: Usage) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.close_block(out);
        let reason = self.finish.unwrap_or(FinishReason::Stop);
        Self::emit(
            out,
            "message_delta",
            &json!({ "type": "message_delta", "delta": { "stop_reason": reason.anthropic(), "stop_sequence": null },
                "usage": usage_json(usage) }),
        );
    }

    /// Ends a complete stream.
    pub fn finish(&mut self, out: &mut BytesMut) {
        self.message_end(out, self.start_usage);
        Self::emit(out, "message_stop", &json!({ "type": "message_stop" }));
    }

    /// Ends a broken stream with an `error` event and no `message_stop`.
    pub fn error(&mut self, err: &GatewayError, out: &mut BytesMut) {
        sse::write_event(out, Some("error"), error_body(err).as_ref());
    }
}

/// Anthropic's error body: `{"type":"error","error":{"type","message"}}`.
pub fn error_body(err: &GatewayError) -> Bytes {
    let kind = match err.class() {
        ErrorClass::InvalidRequest => "invalid_request_error",
        ErrorClass::Authentication => "authentication_error",
        ErrorClass::NotFound => "not_found_error",
        ErrorClass::RateLimit => "rate_limit_error",
        ErrorClass::Overloaded => "overloaded_error",
        ErrorClass::Timeout => "timeout_error",
        ErrorClass::Upstream => "api_error",
    };
    Bytes::from(json!({ "type": "error", "error": { "type": kind, "message": err.to_string() } }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_turns_translate_both_ways() {
        let body = br#"{"model":"m","max_tokens":50,"system":"be brief","messages":[
            {"role":"user","content":"weather?"},
            {"role":"assistant","content":[{"type":"text","text":"checking"},
                {"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city":"Oslo"}}]},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":"rain"},
                {"type":"text","text":"thanks"}]}],
            "tools":[{"name":"get_weather","input_schema":{"type":"object"}}],
            "tool_choice":{"type":"any"},"top_k":5}"#;
        let req = parse_request(body).unwrap();
        assert_eq!(req.messages[0].role, Role::System);
        assert_eq!(req.messages[2].tool_calls.as_ref().unwrap()[0].function.arguments, r#"{"city":"Oslo"}"#);
        assert_eq!(req.messages[3].role, Role::Tool);
        assert_eq!(req.messages[4].content_text(), "thanks");
        assert_eq!(req.tool_choice, Some(json!("required")));

        let back: Value = serde_json::from_slice(&upstream_body(&req, "claude", 1024)).unwrap();
        assert_eq!(back["system"], "be brief");
        assert_eq!(back["top_k"], 5);
        assert_eq!(back["tool_choice"], json!({ "type": "any" }));
        let turns = back["messages"].as_array().unwrap();
        assert_eq!(turns.len(), 3, "tool result and text merge into one user turn: {back}");
        assert_eq!(turns[1]["content"][1]["input"]["city"], "Oslo");
        assert_eq!(turns[2]["content"][0]["type"], "tool_result");
        assert_eq!(turns[2]["content"][1]["text"], "thanks");
    }

    /// Found by the fuzzer (fuzz/corpus/anthropic_request/empty_content): an empty turn went to
    /// the upstream as `[]` and vanished when that body was read back.
    #[test]
    fn an_empty_turn_is_kept_and_translation_is_a_fixed_point() {
        let body = br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":""},
            {"role":"assistant","content":[]},{"role":"user","content":"hi"}]}"#;
        let req = parse_request(body).unwrap();
        assert_eq!(req.messages.len(), 3, "no turn dropped: {:?}", req.messages);
        let first = upstream_body(&req, "claude", 1024);
        let again = parse_request(&first).unwrap();
        assert_eq!(again.messages.len(), 3);
        let second = upstream_body(&again, "claude", 1024);
        let (first, second): (Value, Value) =
            (serde_json::from_slice(&first).unwrap(), serde_json::from_slice(&second).unwrap());
        assert_eq!(first, second);
        assert_eq!(first["messages"][1], json!({ "role": "assistant", "content": [] }));
    }

    #[test]
    fn missing_max_tokens_is_named() {
        let err = parse_request(br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#).unwrap_err();
        assert_eq!(err.param(), Some("max_tokens"));
    }

    #[test]
    fn a_stream_round_trips_through_decoder_and_encoder() {
        let events = vec![
            StreamEvent::Start {
                id: "msg_1".into(),
                model: "c".into(),
                created: 0,
                input_tokens: Some(9),
                cache_read_tokens: 5,
                cache_write_tokens: 3,
            },
            StreamEvent::Text("Hi ".into()),
            StreamEvent::ToolCallStart { index: 0, id: "toolu_1".into(), name: "f".into() },
            StreamEvent::ToolCallArgs { index: 0, json: "{\"a\"".into() },
            StreamEvent::ToolCallArgs { index: 0, json: ":1}".into() },
            StreamEvent::Finish(FinishReason::ToolCalls),
            StreamEvent::Usage(Usage {
                input_tokens: 9,
                output_tokens: 4,
                cache_read_tokens: 5,
                cache_write_tokens: 3,
            }),
        ];
        let mut enc = StreamEncoder::default();
        let mut wire = BytesMut::new();
        events.iter().for_each(|e| enc.event(e, &mut wire));
        enc.finish(&mut wire);
        let parsed = sse::SseParser::default().push(&wire).unwrap();
        let mut dec = StreamDecoder::new("c");
        let mut decoded = Vec::new();
        let mut done = false;
        for ev in &parsed {
            done = dec.decode(&ev.data, &mut decoded).unwrap();
        }
        assert!(done, "ends with message_stop");
        let start: Value = serde_json::from_str(&parsed[0].data).unwrap();
        assert_eq!(
            start["message"]["usage"],
            json!({ "input_tokens": 1, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 5,
                "output_tokens": 0 }),
            "Anthropic's input_tokens leave the cache out"
        );
        let mut expected = events.clone();
        if let StreamEvent::Start { created, .. } = &mut expected[0] {
            if let StreamEvent::Start { created: c, .. } = decoded[0] {
                *created = c;
            }
        }
        assert_eq!(decoded, expected);
    }

    #[test]
    fn cache_counts_are_added_to_the_input_and_said_apart() {
        let body = br#"{"id":"msg_1","model":"c","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn",
            "usage":{"input_tokens":10,"cache_creation_input_tokens":200,"cache_read_input_tokens":3000,"output_tokens":7}}"#;
        let resp = decode_response(body, "c").unwrap();
        let usage = Usage { input_tokens: 3210, output_tokens: 7, cache_read_tokens: 3000, cache_write_tokens: 200 };
        assert_eq!(resp.usage, Some(usage));
        let back: Value = serde_json::from_slice(&encode_response(&resp)).unwrap();
        assert_eq!(
            back["usage"],
            json!({ "input_tokens": 10, "cache_creation_input_tokens": 200, "cache_read_input_tokens": 3000,
                "output_tokens": 7 })
        );

        // Streamed, the counts come in message_start; message_delta may say only the output.
        let mut dec = StreamDecoder::new("c");
        let mut events = Vec::new();
        for data in [
            r#"{"type":"message_start","message":{"id":"m","model":"c","usage":{"input_tokens":10,"cache_creation_input_tokens":200,"cache_read_input_tokens":3000,"output_tokens":1}}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":7}}"#,
        ] {
            dec.decode(data, &mut events).unwrap();
        }
        assert!(matches!(
            events[0],
            StreamEvent::Start { input_tokens: Some(3210), cache_read_tokens: 3000, cache_write_tokens: 200, .. }
        ));
        assert_eq!(events.last(), Some(&StreamEvent::Usage(usage)));
    }

    #[test]
    fn cache_control_reaches_anthropic_as_it_came_and_never_openai() {
        let marker = json!({ "type": "ephemeral", "ttl": "1h" });
        let body = json!({"model": "m", "max_tokens": 50,
            "system": [{"type": "text", "text": "long rules", "cache_control": marker},
                {"type": "text", "text": "more"}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "weather?", "cache_control": marker}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "w",
                    "input": {}, "cache_control": marker}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain",
                    "cache_control": marker},
                    {"type": "image", "source": {"type": "url", "url": "https://x/i.png"}, "cache_control": marker}]}],
            "tools": [{"name": "w", "input_schema": {"type": "object"}, "cache_control": marker}]});
        let req = parse_request(body.to_string().as_bytes()).unwrap();
        let up: Value = serde_json::from_slice(&upstream_body(&req, "claude", 1024)).unwrap();
        assert_eq!(up["system"], body["system"], "system blocks as they came");
        assert_eq!(up["tools"][0]["cache_control"], marker);
        let turns = up["messages"].as_array().unwrap();
        assert_eq!(turns[0]["content"], body["messages"][0]["content"]);
        assert_eq!(turns[1]["content"][0]["cache_control"], marker, "tool_use");
        assert_eq!(turns[2]["content"][0]["cache_control"], marker, "tool_result");
        assert_eq!(turns[2]["content"][1], body["messages"][2]["content"][1], "image");

        let openai = super::super::openai::upstream_body(&req, "gpt").unwrap();
        let openai = String::from_utf8(openai.to_vec()).unwrap();
        assert!(!openai.contains("cache_control"), "an OpenAI upstream never sees them: {openai}");
        assert!(openai.contains("long rules") && openai.contains("weather?"), "{openai}");
    }

    #[test]
    fn system_blocks_must_be_text() {
        let body = br#"{"model":"m","max_tokens":5,"system":[{"type":"image","source":{"type":"url","url":"u"}}],
            "messages":[{"role":"user","content":"x"}]}"#;
        assert_eq!(parse_request(body).unwrap_err().param(), Some("system[0].type"));
    }
}
