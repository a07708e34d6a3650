//! The canonical chat request, response and stream events.
//!
//! Every client shape is normalized to [`ChatRequest`], which is the OpenAI chat-completions body
//! (the de-facto lingua franca of OpenAI-compatible upstreams) with unknown fields kept in `extra`.
//! Upstream answers are decoded into [`ChatResponse`] or a sequence of [`StreamEvent`]s, which the
//! client-facing encoders turn back into the shape the client spoke. Cached answers are stored in
//! this form, so one entry serves both API shapes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A chat request in canonical (OpenAI chat-completions) form.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The model name the client asked for (a name from the edge's `[[models]]`).
    pub model: String,
    /// The conversation, system messages included.
    pub messages: Vec<Message>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// `"none" | "auto" | "required" | {"type":"function","function":{"name":..}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Legacy output-token limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Output-token limit (newer name; wins over `max_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// Stop sequences: a string or a list of strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Seed for deterministic sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Structured-output settings, passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// Whether the client wants server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Streaming options (`include_usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Number of choices; only 1 is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Fields Meridian does not interpret, passed to OpenAI-compatible upstreams as they came.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// Fields of an Anthropic-shaped client request with no OpenAI equivalent (`top_k`,
    /// `metadata`, …), passed only to Anthropic upstreams.
    #[serde(skip)]
    pub anthropic_extra: Map<String, Value>,
}

impl ChatRequest {
    /// Whether the client asked for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether a streamed answer should end with a usage chunk (OpenAI `stream_options`).
    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false)
    }

    /// The output-token limit, whichever field carried it.
    pub fn output_limit(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Stop sequences as a list.
    pub fn stop_sequences(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }

    /// A rough prompt size in tokens (4 bytes a token), for accounting when an upstream reports
    /// no usage and for routers' estimates.
    pub fn estimated_prompt_tokens(&self) -> u32 {
        let bytes: usize = self.messages.iter().map(Message::text_len).sum();
        estimate_tokens(bytes)
    }

    /// Takes every block's Anthropic-only fields out of the request, each with where it was, so
    /// that they can travel beside its OpenAI-form body (the relay) and never inside it.
    pub fn take_block_extras(&mut self) -> Vec<BlockExtra> {
        let mut out = Vec::new();
        let mut take = |at, fields: &mut Map<String, Value>| {
            if !fields.is_empty() {
                out.push(BlockExtra { at, fields: std::mem::take(fields) });
            }
        };
        for (message, m) in self.messages.iter_mut().enumerate() {
            take(BlockAt::Message { message }, &mut m.anthropic_extra);
            if let Some(Content::Parts(parts)) = &mut m.content {
                for (part, p) in parts.iter_mut().enumerate() {
                    take(BlockAt::Part { message, part }, &mut p.anthropic_extra);
                }
            }
            for (call, c) in m.tool_calls.iter_mut().flatten().enumerate() {
                take(BlockAt::ToolCall { message, call }, &mut c.anthropic_extra);
            }
        }
        for (tool, t) in self.tools.iter_mut().flatten().enumerate() {
            take(BlockAt::Tool { tool }, &mut t.anthropic_extra);
        }
        out
    }

    /// Puts back what [`ChatRequest::take_block_extras`] took. A place that names no block of this
    /// request is returned as the error.
    pub fn put_block_extras(&mut self, extras: Vec<BlockExtra>) -> Result<(), BlockAt> {
        for BlockExtra { at, fields } in extras {
            *self.block_extra_mut(at).ok_or(at)? = fields;
        }
        Ok(())
    }

    fn block_extra_mut(&mut self, at: BlockAt) -> Option<&mut Map<String, Value>> {
        match at {
            BlockAt::Message { message } => self.messages.get_mut(message).map(|m| &mut m.anthropic_extra),
            BlockAt::Part { message, part } => match &mut self.messages.get_mut(message)?.content {
                Some(Content::Parts(parts)) => parts.get_mut(part).map(|p| &mut p.anthropic_extra),
                _ => None,
            },
            BlockAt::ToolCall { message, call } => {
                self.messages.get_mut(message)?.tool_calls.as_mut()?.get_mut(call).map(|c| &mut c.anthropic_extra)
            }
            BlockAt::Tool { tool } => self.tools.as_mut()?.get_mut(tool).map(|t| &mut t.anthropic_extra),
        }
    }
}

/// Where a block's Anthropic-only fields belong in a [`ChatRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "on", rename_all = "snake_case")]
pub enum BlockAt {
    /// `messages[message]` itself (a tool message: the `tool_result` block it came from).
    Message {
        /// Its index.
        message: usize,
    },
    /// `messages[message].content[part]`.
    Part {
        /// The message's index.
        message: usize,
        /// The part's index.
        part: usize,
    },
    /// `messages[message].tool_calls[call]` (a `tool_use` block).
    ToolCall {
        /// The message's index.
        message: usize,
        /// The call's index.
        call: usize,
    },
    /// `tools[tool]`.
    Tool {
        /// The tool's index.
        tool: usize,
    },
}

/// One block's Anthropic-only fields (`cache_control`, …) and where they belong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockExtra {
    /// Where.
    pub at: BlockAt,
    /// The fields, as the client sent them.
    pub fields: Map<String, Value>,
}

/// Tokens in `bytes` bytes of text by the usual 4-bytes-a-token rule, at least 1.
pub fn estimate_tokens(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(4)).unwrap_or(u32::MAX).max(1)
}

/// `stop`: one string or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop sequence.
    One(String),
    /// Several stop sequences.
    Many(Vec<String>),
}

/// OpenAI `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// End the stream with a usage chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    /// Other options, passed through.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions from the application.
    System,
    /// OpenAI's newer name for system instructions.
    Developer,
    /// The end user.
    User,
    /// The model.
    Assistant,
    /// A tool's result.
    Tool,
}

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Its author.
    pub role: Role,
    /// Text or parts; absent on an assistant message that only calls tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    /// An optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tool calls made by an assistant message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The call a tool message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Other fields, passed through.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// Fields of the Anthropic `tool_result` block a tool message came from with no OpenAI
    /// equivalent (`cache_control`, …), passed only to Anthropic upstreams.
    #[serde(skip)]
    pub anthropic_extra: Map<String, Value>,
}

impl Message {
    /// A message with plain text content.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message {
            role,
            content: Some(Content::Text(text.into())),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            extra: Map::new(),
            anthropic_extra: Map::new(),
        }
    }

    /// The concatenated text of its content.
    pub fn content_text(&self) -> String {
        self.content.as_ref().map(Content::joined_text).unwrap_or_default()
    }

    fn text_len(&self) -> usize {
        let content = match &self.content {
            Some(Content::Text(t)) => t.len(),
            Some(Content::Parts(p)) => p.iter().filter_map(|p| p.text.as_ref()).map(String::len).sum(),
            None => 0,
        };
        let calls: usize =
            self.tool_calls.iter().flatten().map(|c| c.function.name.len() + c.function.arguments.len()).sum();
        content + calls
    }
}

/// Message content: a string or a list of typed parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Typed parts (`text`, `image_url`, …).
    Parts(Vec<Part>),
}

impl Content {
    /// All text parts joined with no separator.
    pub fn joined_text(&self) -> String {
        match self {
            Content::Text(t) => t.clone(),
            Content::Parts(parts) => parts.iter().filter_map(|p| p.text.as_deref()).collect(),
        }
    }
}

/// One content part. Kept open so that part types Meridian does not know pass through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    /// `text`, `image_url`, `input_audio`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The image of an `image_url` part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<ImageUrl>,
    /// Other fields, passed through.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// Fields of the Anthropic block it came from with no OpenAI equivalent (`cache_control`,
    /// `citations`, …), passed only to Anthropic upstreams.
    #[serde(skip)]
    pub anthropic_extra: Map<String, Value>,
}

impl Part {
    /// A `text` part.
    pub fn text(text: impl Into<String>) -> Self {
        Part {
            kind: "text".into(),
            text: Some(text.into()),
            image_url: None,
            extra: Map::new(),
            anthropic_extra: Map::new(),
        }
    }
}

/// An image reference: an `https:` URL or a `data:` URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageUrl {
    /// The URL.
    pub url: String,
    /// `low | high | auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: FunctionDef,
    /// Fields of the Anthropic tool it came from with no OpenAI equivalent (`cache_control`, …),
    /// passed only to Anthropic upstreams.
    #[serde(skip)]
    pub anthropic_extra: Map<String, Value>,
}

/// A callable function's declaration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDef {
    /// Its name.
    pub name: String,
    /// What it does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Other fields (`strict`), passed through.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id, echoed by the tool result.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    /// Name and arguments.
    pub function: FunctionCall,
    /// Fields of the Anthropic `tool_use` block it came from with no OpenAI equivalent
    /// (`cache_control`, …), passed only to Anthropic upstreams.
    #[serde(skip)]
    pub anthropic_extra: Map<String, Value>,
}

fn function_kind() -> String {
    "function".into()
}

/// The function a call invokes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments as a JSON text.
    pub arguments: String,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A natural end or a stop sequence.
    Stop,
    /// The output-token limit.
    Length,
    /// The model called tools.
    ToolCalls,
    /// The upstream's safety filter.
    ContentFilter,
}

impl FinishReason {
    /// OpenAI's name.
    pub fn openai(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
        }
    }

    /// From OpenAI's name; unknown names count as a natural stop.
    pub fn from_openai(s: &str) -> Self {
        match s {
            "length" => FinishReason::Length,
            "tool_calls" | "function_call" => FinishReason::ToolCalls,
            "content_filter" => FinishReason::ContentFilter,
            _ => FinishReason::Stop,
        }
    }

    /// Anthropic's `stop_reason`.
    pub fn anthropic(self) -> &'static str {
        match self {
            FinishReason::Stop => "end_turn",
            FinishReason::Length => "max_tokens",
            FinishReason::ToolCalls => "tool_use",
            FinishReason::ContentFilter => "refusal",
        }
    }

    /// From Anthropic's `stop_reason`.
    pub fn from_anthropic(s: &str) -> Self {
        match s {
            "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
            "tool_use" => FinishReason::ToolCalls,
            "refusal" => FinishReason::ContentFilter,
            _ => FinishReason::Stop,
        }
    }
}

/// Token counts of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens, those read from or written to the provider's prompt cache included
    /// (OpenAI's `prompt_tokens`; Anthropic's `input_tokens` plus its two cache counts).
    pub input_tokens: u32,
    /// Generated tokens.
    pub output_tokens: u32,
    /// Prompt tokens the provider read from its prompt cache (OpenAI
    /// `prompt_tokens_details.cached_tokens`, Anthropic `cache_read_input_tokens`).
    #[serde(default)]
    pub cache_read_tokens: u32,
    /// Prompt tokens the provider wrote to its prompt cache (Anthropic
    /// `cache_creation_input_tokens`).
    #[serde(default)]
    pub cache_write_tokens: u32,
}

impl Usage {
    /// Prompt tokens neither read from nor written to the provider's prompt cache (Anthropic's
    /// `input_tokens`); zero rather than negative when an upstream's counts disagree.
    pub fn uncached_input_tokens(self) -> u32 {
        self.input_tokens.saturating_sub(self.cache_read_tokens).saturating_sub(self.cache_write_tokens)
    }
}

/// A complete (non-streamed) answer in canonical form.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    /// The upstream's id for it.
    pub id: String,
    /// The model that answered, as the client named it.
    pub model: String,
    /// Unix seconds.
    pub created: u64,
    /// The text, if any.
    pub text: Option<String>,
    /// Tool calls, in order.
    pub tool_calls: Vec<ToolCall>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Token counts, when the upstream reported them.
    pub usage: Option<Usage>,
}

impl ChatResponse {
    /// The same answer as a stream of events, for replaying a cached whole answer to a client
    /// that asked for a stream.
    pub fn to_events(&self) -> Vec<StreamEvent> {
        let mut events = vec![StreamEvent::Start {
            id: self.id.clone(),
            model: self.model.clone(),
            created: self.created,
            input_tokens: self.usage.map(|u| u.input_tokens),
            cache_read_tokens: self.usage.map_or(0, |u| u.cache_read_tokens),
            cache_write_tokens: self.usage.map_or(0, |u| u.cache_write_tokens),
        }];
        if let Some(text) = &self.text {
            events.push(StreamEvent::Text(text.clone()));
        }
        for (index, call) in self.tool_calls.iter().enumerate() {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            events.push(StreamEvent::ToolCallStart { index, id: call.id.clone(), name: call.function.name.clone() });
            events.push(StreamEvent::ToolCallArgs { index, json: call.function.arguments.clone() });
        }
        events.push(StreamEvent::Finish(self.finish));
        if let Some(usage) = self.usage {
            events.push(StreamEvent::Usage(usage));
        }
        events
    }

    /// Output bytes, for estimating tokens when no usage came.
    pub fn output_len(&self) -> usize {
        self.text.as_ref().map_or(0, String::len)
            + self.tool_calls.iter().map(|c| c.function.name.len() + c.function.arguments.len()).sum::<usize>()
    }
}

/// One event of a streamed answer, in canonical order: `Start`, then text and tool-call events,
/// then `Finish`, then `Usage` if the upstream reported it. Serialized (externally tagged, snake
/// case) they are the `EVENT` frames of a relayed answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamEvent {
    /// The answer began.
    Start {
        /// The upstream's id for it.
        id: String,
        /// The model, as the client named it.
        model: String,
        /// Unix seconds.
        created: u64,
        /// Prompt tokens, cached ones included, where the upstream says them up front (Anthropic).
        input_tokens: Option<u32>,
        /// Of those, the tokens read from the provider's prompt cache.
        #[serde(default)]
        cache_read_tokens: u32,
        /// Of those, the tokens written to the provider's prompt cache.
        #[serde(default)]
        cache_write_tokens: u32,
    },
    /// A piece of text.
    Text(String),
    /// A tool call began.
    ToolCallStart {
        /// Its position among this answer's calls.
        index: u32,
        /// Its id.
        id: String,
        /// The function called.
        name: String,
    },
    /// A piece of a tool call's JSON arguments.
    ToolCallArgs {
        /// The call it belongs to.
        index: u32,
        /// The piece.
        json: String,
    },
    /// Generation ended.
    Finish(FinishReason),
    /// Token counts.
    Usage(Usage),
}

impl StreamEvent {
    /// Bytes of generated content it carries.
    pub fn content_len(&self) -> usize {
        match self {
            StreamEvent::Text(t) => t.len(),
            StreamEvent::ToolCallStart { name, .. } => name.len(),
            StreamEvent::ToolCallArgs { json, .. } => json.len(),
            _ => 0,
        }
    }
}

/// Folds stream events into a whole [`ChatResponse`]: used to answer a non-streaming client from a
/// cached stream.
#[derive(Debug, Default)]
pub struct ResponseBuilder {
    id: String,
    model: String,
    created: u64,
    text: Option<String>,
    tool_calls: Vec<ToolCall>,
    finish: Option<FinishReason>,
    /// The prompt side of the usage, where the stream's start said it.
    start_usage: Option<Usage>,
    usage: Option<Usage>,
}

impl ResponseBuilder {
    /// Adds one event.
    pub fn push(&mut self, event: &StreamEvent) {
        match event {
            StreamEvent::Start { id, model, created, input_tokens, cache_read_tokens, cache_write_tokens } => {
                self.id.clone_from(id);
                self.model.clone_from(model);
                self.created = *created;
                self.start_usage = input_tokens.map(|input_tokens| Usage {
                    input_tokens,
                    output_tokens: 0,
                    cache_read_tokens: *cache_read_tokens,
                    cache_write_tokens: *cache_write_tokens,
                });
            }
            StreamEvent::Text(t) => self.text.get_or_insert_with(String::new).push_str(t),
            StreamEvent::ToolCallStart { id, name, .. } => self.tool_calls.push(ToolCall {
                id: id.clone(),
                kind: function_kind(),
                function: FunctionCall { name: name.clone(), arguments: String::new() },
                anthropic_extra: Map::new(),
            }),
            StreamEvent::ToolCallArgs { index, json } => {
                if let Some(call) = self.tool_calls.get_mut(*index as usize) {
                    call.function.arguments.push_str(json);
                }
            }
            StreamEvent::Finish(f) => self.finish = Some(*f),
            StreamEvent::Usage(u) => self.usage = Some(*u),
        }
    }

    /// The whole answer.
    pub fn finish(self) -> ChatResponse {
        let usage = self.usage.or(self.start_usage);
        ChatResponse {
            id: self.id,
            model: self.model,
            created: self.created,
            text: self.text,
            tool_calls: self.tool_calls,
            finish: self.finish.unwrap_or(FinishReason::Stop),
            usage,
        }
    }
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi","x_msg":1}],
            "logit_bias":{"50256":-100},"user":"u1","stream":true,"stream_options":{"include_usage":true}}"#;
        let req: ChatRequest = serde_json::from_str(body).unwrap();
        assert_eq!(req.extra["user"], "u1");
        assert!(req.include_usage());
        let back = serde_json::to_value(&req).unwrap();
        assert_eq!(back["logit_bias"]["50256"], -100);
        assert_eq!(back["messages"][0]["x_msg"], 1);
    }

    #[test]
    fn events_fold_back_into_the_same_response() {
        let resp = ChatResponse {
            id: "r1".into(),
            model: "m".into(),
            created: 7,
            text: Some("hello".into()),
            tool_calls: vec![ToolCall {
                id: "c1".into(),
                kind: "function".into(),
                function: FunctionCall { name: "f".into(), arguments: "{\"a\":1}".into() },
                anthropic_extra: Map::new(),
            }],
            finish: FinishReason::ToolCalls,
            usage: Some(Usage { input_tokens: 30, output_tokens: 4, cache_read_tokens: 20, cache_write_tokens: 5 }),
        };
        let mut b = ResponseBuilder::default();
        resp.to_events().iter().for_each(|e| b.push(e));
        assert_eq!(b.finish(), resp);

        // A stream cut before its usage still says the prompt side its start carried.
        let mut b = ResponseBuilder::default();
        resp.to_events().iter().filter(|e| !matches!(e, StreamEvent::Usage(_))).for_each(|e| b.push(e));
        let usage = Usage { output_tokens: 0, ..resp.usage.unwrap() };
        assert_eq!(b.finish().usage, Some(usage));
    }

    #[test]
    fn block_extras_come_out_and_go_back_where_they_were() {
        let body = r#"{"model":"m","messages":[
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
            {"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]},
            {"role":"tool","tool_call_id":"c","content":"r"}],
            "tools":[{"type":"function","function":{"name":"f"}}]}"#;
        let mut req: ChatRequest = serde_json::from_str(body).unwrap();
        let marker = |n: u32| -> Map<String, Value> {
            serde_json::from_value(serde_json::json!({ "cache_control": { "type": "ephemeral", "n": n } })).unwrap()
        };
        let Some(Content::Parts(parts)) = &mut req.messages[0].content else { panic!("parts") };
        parts[1].anthropic_extra = marker(1);
        req.messages[1].tool_calls.as_mut().unwrap()[0].anthropic_extra = marker(2);
        req.messages[2].anthropic_extra = marker(3);
        req.tools.as_mut().unwrap()[0].anthropic_extra = marker(4);
        let original = req.clone();

        let extras = req.take_block_extras();
        assert_eq!(extras.len(), 4);
        assert_ne!(req, original, "taken out");
        let mut back = req.clone();
        back.put_block_extras(extras).unwrap();
        assert_eq!(back, original);

        let stray = BlockExtra { at: BlockAt::Part { message: 2, part: 0 }, fields: marker(5) };
        assert_eq!(req.put_block_extras(vec![stray]), Err(BlockAt::Part { message: 2, part: 0 }));
    }
}
