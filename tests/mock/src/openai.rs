//! OpenAI `POST /v1/chat/completions`.

use bytes::Bytes;
use hyper::header::AUTHORIZATION;
use hyper::{HeaderMap, Response};
use serde::Serialize;
use serde_json::{json, Value};

use crate::body::{self, MockBody, Sse};
use crate::reply::{self, Extracted, Reply};
use crate::Behavior;

/// The OpenAI error `type` for an HTTP status.
fn error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        500.. => "server_error",
        _ => "invalid_request_error",
    }
}

fn error_json(kind: &str, message: &str) -> Value {
    json!({ "error": { "message": message, "type": kind, "param": null, "code": null } })
}

/// An error response in OpenAI's shape; the type follows the status.
pub(crate) fn error(status: u16, message: &str) -> Response<MockBody> {
    let v = error_json(error_type(status), message);
    body::json(status, serde_json::to_vec(&v).unwrap_or_default())
}

/// Whether `headers` carry `Authorization: Bearer <key>`.
pub(crate) fn authorized(headers: &HeaderMap, key: &str) -> bool {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| k.trim() == key)
}

/// Text of an OpenAI message `content`: a string or the `text` parts.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str).unwrap_or("text") == "text")
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

fn extract(req: &Value) -> Extracted {
    let empty = Vec::new();
    let messages = req.get("messages").and_then(Value::as_array).unwrap_or(&empty);
    let mut prompt_chars = 0;
    let mut last_user_text = String::new();
    for m in messages {
        let text = content_text(m.get("content").unwrap_or(&Value::Null));
        prompt_chars += text.chars().count();
        if m.get("role").and_then(Value::as_str) == Some("user") {
            last_user_text = text;
        }
    }
    let tool_result = messages
        .last()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("tool"))
        .map(|m| content_text(m.get("content").unwrap_or(&Value::Null)));

    let tools = req.get("tools").and_then(Value::as_array);
    let choice = req.get("tool_choice");
    let tool = match tools {
        Some(tools) if !tools.is_empty() && tool_result.is_none() => {
            if choice.and_then(Value::as_str) == Some("none") {
                None
            } else {
                let named = choice.and_then(|c| c.pointer("/function/name")).and_then(Value::as_str);
                let first = tools[0].pointer("/function/name").or_else(|| tools[0].get("name")).and_then(Value::as_str);
                Some(named.or(first).unwrap_or("tool").to_owned())
            }
        }
        _ => None,
    };
    Extracted { last_user_text, tool_result, tool, prompt_chars }
}

#[derive(Serialize, Clone, Copy)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptTokensDetails,
}

#[derive(Serialize, Clone, Copy)]
struct PromptTokensDetails {
    cached_tokens: u64,
}

#[derive(Serialize)]
struct Function<'a> {
    name: &'a str,
    arguments: &'a str,
}

#[derive(Serialize)]
struct ToolCall<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: Function<'a>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCall<'a>; 1]>,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: (),
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: Usage,
    system_fingerprint: &'static str,
}

#[derive(Serialize)]
struct ChunkChoice {
    index: u32,
    delta: Value,
    logprobs: (),
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: Vec<ChunkChoice>,
    /// Omitted unless `stream_options.include_usage`; then `null` except on
    /// the final usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

fn finish_reason(reply: &Reply) -> &'static str {
    match reply {
        Reply::Tool { .. } => "tool_calls",
        Reply::Text { truncated: true, .. } => "length",
        Reply::Text { .. } => "stop",
    }
}

/// Answers a chat completion request (auth and injected status already done).
pub(crate) fn respond(parsed: Option<&Value>, _headers: &HeaderMap, behavior: &Behavior) -> Response<MockBody> {
    let Some(req) = parsed.filter(|v| v.is_object()) else {
        return error(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly.)",
        );
    };
    let max_tokens = req
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| req.get("max_tokens").and_then(Value::as_u64));
    let model = req.get("model").and_then(Value::as_str).unwrap_or("");
    let stream = req.get("stream").and_then(Value::as_bool) == Some(true);
    let ex = extract(req);
    let (cache_read, cache_write) = behavior.prompt_cache();
    let prompt_tokens = reply::prompt_tokens(ex.prompt_chars) + cache_read + cache_write;
    let reply = Reply::decide_for(ex, max_tokens, behavior);
    let completion_tokens = reply.completion_tokens();
    let usage = Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        prompt_tokens_details: PromptTokensDetails { cached_tokens: cache_read },
    };
    let n = reply::next_id();
    let id = format!("chatcmpl-mock-{n}");
    let created = reply::unix_now();

    if !stream {
        if let Behavior::StreamError(_) = behavior {
            return error(500, "The server had an error while processing your request.");
        }
        let message = match &reply {
            Reply::Text { text, .. } => Message { role: "assistant", content: Some(text), tool_calls: None },
            Reply::Tool { name, arguments } => Message {
                role: "assistant",
                content: None,
                tool_calls: Some([ToolCall {
                    id: format!("call_mock_{n}"),
                    kind: "function",
                    function: Function { name, arguments },
                }]),
            },
        };
        let c = Completion {
            id: &id,
            object: "chat.completion",
            created,
            model,
            choices: [Choice { index: 0, message, logprobs: (), finish_reason: finish_reason(&reply) }],
            usage,
            system_fingerprint: "fp_mock",
        };
        return body::json_reply(serde_json::to_vec(&c).unwrap_or_default(), behavior);
    }

    let include_usage = req.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
    let chunk = |delta: Value, finish: Option<&'static str>| -> Bytes {
        body::data_event(&Chunk {
            id: &id,
            object: "chat.completion.chunk",
            created,
            model,
            system_fingerprint: "fp_mock",
            choices: vec![ChunkChoice { index: 0, delta, logprobs: (), finish_reason: finish }],
            usage: include_usage.then_some(None),
        })
    };

    let mut preamble = vec![chunk(json!({ "role": "assistant", "content": "" }), None)];
    let mut content = Vec::new();
    match &reply {
        Reply::Text { text, piece_ends, .. } => {
            for p in reply::pieces(text, piece_ends) {
                content.push(chunk(json!({ "content": p }), None));
            }
        }
        Reply::Tool { name, arguments } => {
            preamble.push(chunk(
                json!({ "tool_calls": [{
                    "index": 0,
                    "id": format!("call_mock_{n}"),
                    "type": "function",
                    "function": { "name": name, "arguments": "" },
                }] }),
                None,
            ));
            let (a, b) = reply::split_half(arguments);
            for p in [a, b] {
                content.push(chunk(json!({ "tool_calls": [{ "index": 0, "function": { "arguments": p } }] }), None));
            }
        }
    }
    let mut terminal = Vec::new();
    if !matches!(behavior, Behavior::NoFinish) {
        terminal.push(chunk(json!({}), Some(finish_reason(&reply))));
    }
    if include_usage {
        terminal.push(body::data_event(&Chunk {
            id: &id,
            object: "chat.completion.chunk",
            created,
            model,
            system_fingerprint: "fp_mock",
            choices: Vec::new(),
            usage: Some(Some(usage)),
        }));
    }
    terminal.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let keep_alive = Bytes::from_static(b"data: {}\n\n");
    let bad_utf8 = chunk(json!({ "content": body::BAD_UTF8 }), None);
    let sse = Sse { preamble, content, terminal, keep_alive, bad_utf8 };
    body::sse_reply(sse, behavior, || {
        body::data_event(&error_json("server_error", "The server had an error while processing your request."))
    })
}
