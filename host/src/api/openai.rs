//! The OpenAI chat-completions wire format, both as the edge's client surface and as an upstream
//! protocol (OpenAI, OpenRouter, vLLM and other OpenAI-compatible endpoints).

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{field_error, parse_json, require_non_empty, require_range};
use crate::chat::{
    unix_now, ChatRequest, ChatResponse, FinishReason, Role, StreamEvent, StreamOptions, ToolCall, Usage,
};
use crate::error::{ErrorClass, GatewayError};
use crate::sse;

/// Parses and validates a client's request body.
pub fn parse_request(body: &[u8]) -> Result<ChatRequest, GatewayError> {
    let req: ChatRequest = parse_json(body)?;
    validate(&req)?;
    Ok(req)
}

/// The checks a parsed request must pass beyond its types.
pub fn validate(req: &ChatRequest) -> Result<(), GatewayError> {
    require_non_empty("model", &req.model)?;
    if req.messages.is_empty() {
        return Err(field_error("messages", "must contain at least one message"));
    }
    require_range("temperature", req.temperature, 0.0, 2.0)?;
    require_range("top_p", req.top_p, 0.0, 1.0)?;
    if let Some(n) = req.n {
        if n != 1 {
            return Err(field_error("n", "only n = 1 is supported"));
        }
    }
    for (i, m) in req.messages.iter().enumerate() {
        if m.role == Role::Tool && m.tool_call_id.is_none() {
            return Err(field_error(format!("messages[{i}].tool_call_id"), "is required on a tool message"));
        }
    }
    Ok(())
}

/// `POST /v1/embeddings`, as OpenAI takes it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EmbeddingsRequest {
    /// The embedding model (a name from the edge's `[[models]]`).
    pub model: String,
    /// One text or several.
    pub input: EmbeddingsInput,
    /// How the vectors are written (`float` when absent); any other value is refused with a
    /// typed 400 naming the field.
    #[serde(default)]
    pub encoding_format: Option<EmbeddingEncoding>,
    /// Accepted for compatibility; the tenant is known from its key.
    #[serde(default)]
    pub user: Option<String>,
}

/// How an embeddings answer writes its vectors: the `encoding_format` OpenAI takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingEncoding {
    /// A JSON array of numbers (the default).
    #[default]
    Float,
    /// A base64 string of the vector's float32 values, little-endian, as OpenAI serves it (and
    /// its Python SDK asks for by default): a quarter of the JSON's size.
    Base64,
}

impl EmbeddingEncoding {
    /// One vector in this encoding.
    fn encode(self, vector: &[f32]) -> EncodedVector<'_> {
        match self {
            EmbeddingEncoding::Float => EncodedVector::Float(vector),
            EmbeddingEncoding::Base64 => {
                use base64::Engine as _;
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                EncodedVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
        }
    }
}

/// A vector as an embeddings answer writes it.
#[derive(Serialize)]
#[serde(untagged)]
enum EncodedVector<'a> {
    /// Float32s, each written as the shortest decimal that reads back as it.
    Float(&'a [f32]),
    /// Base64 of the little-endian float32s.
    Base64(String),
}

/// The `input` of an embeddings request.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingsInput {
    /// A single text.
    One(String),
    /// Several texts, one vector each.
    Many(Vec<String>),
}

/// Most texts in one embeddings request.
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// Parses and validates an embeddings request; returns it with its texts.
pub fn parse_embeddings(body: &[u8]) -> Result<(EmbeddingsRequest, Vec<String>), GatewayError> {
    let req: EmbeddingsRequest = parse_json(body)?;
    require_non_empty("model", &req.model)?;
    let input = match &req.input {
        EmbeddingsInput::One(t) => vec![t.clone()],
        EmbeddingsInput::Many(v) => v.clone(),
    };
    if input.is_empty() || input.len() > MAX_EMBEDDING_INPUTS {
        return Err(field_error("input", format!("must hold 1 to {MAX_EMBEDDING_INPUTS} texts")));
    }
    if let Some(i) = input.iter().position(String::is_empty) {
        return Err(field_error(format!("input[{i}]"), "must not be empty"));
    }
    Ok((req, input))
}

/// The embeddings answer in OpenAI's shape, its vectors written as `encoding` says.
///
/// Serialised straight from the vectors: 2 048 of them as a `Value` tree would cost a few times
/// the answer's own size in memory.
pub fn encode_embeddings(model: &str, vectors: &[Vec<f32>], prompt_tokens: u32, encoding: EmbeddingEncoding) -> Bytes {
    #[derive(Serialize)]
    struct Embedding<'a> {
        object: &'static str,
        index: usize,
        embedding: EncodedVector<'a>,
    }
    #[derive(Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<Embedding<'a>>,
        model: &'a str,
        usage: Value,
    }
    let data = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| Embedding { object: "embedding", index, embedding: encoding.encode(v) })
        .collect();
    let usage = json!({ "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens });
    let list = List { object: "list", data, model, usage };
    // Strings, integers and finite or non-finite floats (written as null) always serialise.
    Bytes::from(serde_json::to_vec(&list).unwrap_or_default())
}

/// The body sent to an OpenAI-compatible upstream: the client's request with the target's model
/// name, and usage requested on streams so that every answer can be accounted.
pub fn upstream_body(req: &ChatRequest, upstream_model: &str) -> Result<Bytes, serde_json::Error> {
    let mut out = req.clone();
    upstream_model.clone_into(&mut out.model);
    if out.is_stream() {
        out.stream_options.get_or_insert_with(StreamOptions::default).include_usage = Some(true);
    }
    serde_json::to_vec(&out).map(Bytes::from)
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    id: String,
    #[serde(default)]
    created: Option<u64>,
    #[serde(default)]
    model: Option<String>,
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Deserialize, Clone, Copy)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
    /// `null` from some OpenAI-compatible upstreams.
    #[serde(default)]
    prompt_tokens_details: Option<WirePromptDetails>,
}

#[derive(Deserialize, Clone, Copy)]
struct WirePromptDetails {
    #[serde(default)]
    cached_tokens: Option<u32>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Usage {
        Usage {
            input_tokens: u.prompt_tokens,
            output_tokens: u.completion_tokens,
            cache_read_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens).unwrap_or(0),
            // OpenAI bills no cache writes and reports none.
            cache_write_tokens: 0,
        }
    }
}

/// Decodes an upstream's whole answer.
pub fn decode_response(body: &[u8], fallback_model: &str) -> Result<ChatResponse, String> {
    let wire: WireResponse = serde_json::from_slice(body).map_err(|e| format!("unreadable response: {e}"))?;
    let choice = wire.choices.into_iter().next().ok_or("response has no choices")?;
    let text = choice.message.content.or(choice.message.refusal);
    let tool_calls = choice.message.tool_calls.unwrap_or_default();
    Ok(ChatResponse {
        id: wire.id,
        model: wire.model.unwrap_or_else(|| fallback_model.to_string()),
        created: wire.created.unwrap_or_else(unix_now),
        text,
        finish: choice.finish_reason.as_deref().map_or(FinishReason::Stop, FinishReason::from_openai),
        tool_calls,
        usage: wire.usage.map(Usage::from),
    })
}

/// Encodes an answer for an OpenAI client.
pub fn encode_response(resp: &ChatResponse) -> Bytes {
    let mut message = json!({ "role": "assistant", "content": resp.text });
    if !resp.tool_calls.is_empty() {
        message["tool_calls"] = json!(resp.tool_calls);
    }
    let mut body = json!({
        "id": resp.id,
        "object": "chat.completion",
        "created": resp.created,
        "model": resp.model,
        "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": resp.finish.openai() }],
    });
    if let Some(u) = resp.usage {
        body["usage"] = usage_json(u);
    }
    Bytes::from(body.to_string())
}

/// OpenAI's `usage`: `prompt_tokens` counts every prompt token, those read from the provider's
/// prompt cache (`cached_tokens`) and written to it included; the shape has no field for writes.
fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens.saturating_add(u.output_tokens),
        "prompt_tokens_details": { "cached_tokens": u.cache_read_tokens },
    })
}

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    created: Option<u64>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<WireChunkChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct WireChunkChoice {
    #[serde(default)]
    delta: WireDelta,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolDelta>>,
}

#[derive(Deserialize)]
struct WireToolDelta {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunctionDelta>,
}

#[derive(Deserialize)]
struct WireFunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// Turns an upstream's SSE `data:` payloads into canonical events.
#[derive(Debug)]
pub struct StreamDecoder {
    started: bool,
    fallback_model: String,
}

impl StreamDecoder {
    /// A decoder for one stream; `fallback_model` names the model if the upstream does not.
    pub fn new(fallback_model: &str) -> Self {
        StreamDecoder { started: false, fallback_model: fallback_model.to_string() }
    }

    /// Decodes one event's data. Returns `Ok(true)` at the end of the stream (`[DONE]`).
    pub fn decode(&mut self, data: &str, out: &mut Vec<StreamEvent>) -> Result<bool, String> {
        if data == "[DONE]" {
            return Ok(true);
        }
        let chunk: WireChunk = serde_json::from_str(data).map_err(|e| format!("unreadable stream chunk: {e}"))?;
        if let Some(err) = chunk.error {
            let message = err.get("message").and_then(Value::as_str).unwrap_or("unknown error");
            return Err(format!("upstream stream error: {message}"));
        }
        // A keep-alive (`{}`) says nothing, not even that the answer began: the first real chunk
        // names it.
        if chunk.id.is_none() && chunk.choices.is_empty() && chunk.usage.is_none() {
            return Ok(false);
        }
        if !self.started {
            self.started = true;
            out.push(StreamEvent::Start {
                id: chunk.id.unwrap_or_default(),
                model: chunk.model.unwrap_or_else(|| self.fallback_model.clone()),
                created: chunk.created.unwrap_or_else(unix_now),
                input_tokens: None,
                cache_read_tokens: 0,
                cache_write_tokens: 0,
            });
        }
        for choice in chunk.choices {
            let delta = choice.delta;
            if let Some(text) = delta.content.or(delta.refusal).filter(|t| !t.is_empty()) {
                out.push(StreamEvent::Text(text));
            }
            for call in delta.tool_calls.into_iter().flatten() {
                let function = call.function.unwrap_or(WireFunctionDelta { name: None, arguments: None });
                if let Some(id) = call.id {
                    out.push(StreamEvent::ToolCallStart {
                        index: call.index,
                        id,
                        name: function.name.unwrap_or_default(),
                    });
                }
                if let Some(json) = function.arguments.filter(|a| !a.is_empty()) {
                    out.push(StreamEvent::ToolCallArgs { index: call.index, json });
                }
            }
            if let Some(reason) = choice.finish_reason {
                out.push(StreamEvent::Finish(FinishReason::from_openai(&reason)));
            }
        }
        if let Some(u) = chunk.usage {
            out.push(StreamEvent::Usage(u.into()));
        }
        Ok(false)
    }
}

/// Writes canonical events as OpenAI `chat.completion.chunk` SSE.
#[derive(Debug)]
pub struct StreamEncoder {
    include_usage: bool,
    id: String,
    model: String,
    created: u64,
}

impl StreamEncoder {
    /// An encoder for one client stream.
    pub fn new(include_usage: bool) -> Self {
        StreamEncoder { include_usage, id: String::new(), model: String::new(), created: 0 }
    }

    fn chunk(&self, out: &mut BytesMut, delta: Value, finish: Option<&str>) {
        let chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
        });
        sse::write_event(out, None, chunk.to_string().as_bytes());
    }

    /// Encodes one event.
    pub fn event(&mut self, event: &StreamEvent, out: &mut BytesMut) {
        match event {
            StreamEvent::Start { id, model, created, .. } => {
                self.id.clone_from(id);
                self.model.clone_from(model);
                self.created = *created;
                self.chunk(out, json!({ "role": "assistant", "content": "" }), None);
            }
            StreamEvent::Text(text) => self.chunk(out, json!({ "content": text }), None),
            StreamEvent::ToolCallStart { index, id, name } => self.chunk(
                out,
                json!({ "tool_calls": [{ "index": index, "id": id, "type": "function",
                    "function": { "name": name, "arguments": "" } }] }),
                None,
            ),
            StreamEvent::ToolCallArgs { index, json } => {
                self.chunk(out, json!({ "tool_calls": [{ "index": index, "function": { "arguments": json } }] }), None)
            }
            StreamEvent::Finish(reason) => self.chunk(out, json!({}), Some(reason.openai())),
            StreamEvent::Usage(usage) if self.include_usage => {
                let chunk = json!({
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage_json(*usage),
                });
                sse::write_event(out, None, chunk.to_string().as_bytes());
            }
            StreamEvent::Usage(_) => {}
        }
    }

    /// Ends a complete stream.
    pub fn finish(&mut self, out: &mut BytesMut) {
        sse::write_event(out, None, b"[DONE]");
    }

    /// Ends a broken stream with an error chunk and no `[DONE]`, so that clients see the failure.
    pub fn error(&mut self, err: &GatewayError, out: &mut BytesMut) {
        sse::write_event(out, None, error_body(err).as_ref());
    }
}

/// OpenAI's error body: `{"error":{"message","type","param","code"}}`.
pub fn error_body(err: &GatewayError) -> Bytes {
    let kind = match err.class() {
        ErrorClass::InvalidRequest | ErrorClass::NotFound => "invalid_request_error",
        ErrorClass::Authentication => "authentication_error",
        ErrorClass::RateLimit => "rate_limit_error",
        ErrorClass::Overloaded => "overloaded_error",
        ErrorClass::Timeout => "timeout_error",
        ErrorClass::Upstream => "upstream_error",
    };
    Bytes::from(
        json!({ "error": { "message": err.to_string(), "type": kind, "param": err.param(), "code": err.code() } })
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_written_as_floats_or_as_little_endian_base64() {
        let (req, _) = parse_embeddings(br#"{"model":"m","input":"x"}"#).unwrap();
        assert_eq!(req.encoding_format.unwrap_or_default(), EmbeddingEncoding::Float);
        let (req, _) = parse_embeddings(br#"{"model":"m","input":"x","encoding_format":"base64"}"#).unwrap();
        assert_eq!(req.encoding_format, Some(EmbeddingEncoding::Base64));
        let err = parse_embeddings(br#"{"model":"m","input":"x","encoding_format":"int8"}"#).unwrap_err();
        assert_eq!((err.status().as_u16(), err.param()), (400, Some("encoding_format")));

        let v = [1.0f32, -2.5, 0.1];
        let float: Value =
            serde_json::from_slice(&encode_embeddings("m", &[v.to_vec()], 3, EmbeddingEncoding::Float)).unwrap();
        // The shortest decimals that read back as the same float32s.
        assert_eq!(float["data"][0]["embedding"], json!([1.0, -2.5, 0.1]));
        assert_eq!((float["object"].as_str(), float["data"][0]["index"].as_u64()), (Some("list"), Some(0)));
        assert_eq!(float["usage"], json!({"prompt_tokens": 3, "total_tokens": 3}));
        let b64: Value =
            serde_json::from_slice(&encode_embeddings("m", &[v.to_vec()], 3, EmbeddingEncoding::Base64)).unwrap();
        // 1.0 = 00 00 80 3f, -2.5 = 00 00 20 c0, 0.1 = cd cc cc 3d (little-endian float32).
        assert_eq!(b64["data"][0]["embedding"], "AACAPwAAIMDNzMw9");
        assert_eq!(b64["usage"], float["usage"]);
    }

    #[test]
    fn request_validation_names_the_field() {
        let err = parse_request(br#"{"model":"m","messages":[{"role":"user","content":5}]}"#).unwrap_err();
        assert_eq!(err.param(), Some("messages[0].content"));
        let err = parse_request(br#"{"model":"m","messages":[],"stream":true}"#).unwrap_err();
        assert_eq!(err.param(), Some("messages"));
        let err =
            parse_request(br#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#).unwrap_err();
        assert_eq!(err.param(), Some("temperature"));
        assert!(matches!(parse_request(b"{\"model\":"), Err(GatewayError::MalformedJson(_))));
    }

    #[test]
    fn streamed_tool_calls_decode_and_encode() {
        let mut d = StreamDecoder::new("m");
        let mut events = Vec::new();
        for data in [
            r#"{"id":"c1","created":1,"model":"gpt","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":"}}]}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
        ] {
            assert!(!d.decode(data, &mut events).unwrap());
        }
        assert!(d.decode("[DONE]", &mut events).unwrap());
        assert_eq!(events[1], StreamEvent::ToolCallStart { index: 0, id: "call_1".into(), name: "f".into() });
        assert_eq!(events[3], StreamEvent::Finish(FinishReason::ToolCalls));
        let mut enc = StreamEncoder::new(false);
        let mut out = BytesMut::new();
        events.iter().for_each(|e| enc.event(e, &mut out));
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.contains(r#""function":{"arguments":"{\"a\":"}"#));
        assert!(!text.contains("usage"), "usage only when the client asked: {text}");
    }

    #[test]
    fn keep_alive_chunks_decode_to_nothing() {
        let mut d = StreamDecoder::new("m");
        let mut events = Vec::new();
        assert!(!d.decode("{}", &mut events).unwrap());
        assert_eq!(events, vec![], "not even a start");
        assert!(!d.decode(r#"{"id":"c1","model":"gpt","choices":[{"delta":{"content":"hi"}}]}"#, &mut events).unwrap());
        assert!(!d.decode("{}", &mut events).unwrap());
        assert!(
            matches!(&events[0], StreamEvent::Start { id, model, .. } if id == "c1" && model == "gpt"),
            "{events:?}"
        );
        assert_eq!(events[1..], [StreamEvent::Text("hi".into())]);
    }

    #[test]
    fn cached_tokens_are_read_and_written_whole_and_streamed() {
        let body = br#"{"id":"c1","choices":[{"message":{"content":"hi"},"finish_reason":"stop"}],
            "usage":{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,
                "prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0}}}"#;
        let resp = decode_response(body, "m").unwrap();
        let usage = Usage { input_tokens: 2006, output_tokens: 300, cache_read_tokens: 1920, cache_write_tokens: 0 };
        assert_eq!(resp.usage, Some(usage));
        let back: Value = serde_json::from_slice(&encode_response(&resp)).unwrap();
        assert_eq!(back["usage"]["prompt_tokens"], 2006);
        assert_eq!(back["usage"]["prompt_tokens_details"], json!({ "cached_tokens": 1920 }));

        let no_details = br#"{"choices":[{"message":{"content":"hi"}}],
            "usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":null}}"#;
        assert_eq!(decode_response(no_details, "m").unwrap().usage.unwrap().cache_read_tokens, 0);

        let mut d = StreamDecoder::new("m");
        let mut events = Vec::new();
        let chunk = r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":2006,"completion_tokens":300,
            "prompt_tokens_details":{"cached_tokens":1920}}}"#;
        d.decode(chunk, &mut events).unwrap();
        assert_eq!(events.last(), Some(&StreamEvent::Usage(usage)));
        let mut enc = StreamEncoder::new(true);
        let mut out = BytesMut::new();
        events.iter().for_each(|e| enc.event(e, &mut out));
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.contains(r#""prompt_tokens_details":{"cached_tokens":1920}"#), "{text}");
    }
}
