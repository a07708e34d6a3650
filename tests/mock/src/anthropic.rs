//! Anthropic `POST /v1/messages`.

use bytes::Bytes;
use hyper::{HeaderMap, Response};
use serde::Serialize;
use serde_json::{json, Value};

use crate::body::{self, MockBody, Sse};
use crate::reply::{self, Extracted, Reply};
use crate::Behavior;

/// The Anthropic error `type` for an HTTP status.
fn error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        500.. => "api_error",
        _ => "invalid_request_error",
    }
}

fn error_json(kind: &str, message: &str) -> Value {
    json!({ "type": "error", "error": { "type": kind, "message": message } })
}

/// An error response in Anthropic's shape; the type follows the status.
pub(crate) fn error(status: u16, message: &str) -> Response<MockBody> {
    let v = error_json(error_type(status), message);
    body::json(status, serde_json::to_vec(&v).unwrap_or_default())
}

/// Whether `headers` carry `x-api-key: <key>`.
pub(crate) fn authorized(headers: &HeaderMap, key: &str) -> bool {
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).is_some_and(|k| k.trim() == key)
}

/// Text of an Anthropic `content` / `system`: a string or the text blocks.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// The last `tool_result` block of a content array, as text.
fn tool_result_text(content: &Value) -> Option<String> {
    content
        .as_array()?
        .iter()
        .rev()
        .find(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
        .map(|b| content_text(b.get("content").unwrap_or(&Value::Null)))
}

fn extract(req: &Value) -> Extracted {
    let empty = Vec::new();
    let messages = req.get("messages").and_then(Value::as_array).unwrap_or(&empty);
    let mut prompt_chars = content_text(req.get("system").unwrap_or(&Value::Null)).chars().count();
    let mut last_user_text = String::new();
    for m in messages {
        let content = m.get("content").unwrap_or(&Value::Null);
        let text = content_text(content);
        prompt_chars += text.chars().count();
        if let Some(blocks) = content.as_array() {
            for b in blocks {
                if b.get("type").and_then(Value::as_str) == Some("tool_result") {
                    let t = content_text(b.get("content").unwrap_or(&Value::Null));
                    prompt_chars += t.chars().count();
                }
            }
        }
        if m.get("role").and_then(Value::as_str) == Some("user") {
            last_user_text = text;
        }
    }
    let tool_result = messages
        .last()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| tool_result_text(m.get("content").unwrap_or(&Value::Null)));

    let tools = req.get("tools").and_then(Value::as_array);
    let choice = req.get("tool_choice");
    let tool = match tools {
        Some(tools) if !tools.is_empty() && tool_result.is_none() => {
            let choice_type = choice.and_then(|c| c.get("type")).and_then(Value::as_str);
            if choice_type == Some("none") {
                None
            } else {
                let named =
                    choice.filter(|_| choice_type == Some("tool")).and_then(|c| c.get("name")).and_then(Value::as_str);
                let first = tools[0].get("name").and_then(Value::as_str);
                Some(named.or(first).unwrap_or("tool").to_owned())
            }
        }
        _ => None,
    };
    Extracted { last_user_text, tool_result, tool, prompt_chars }
}

#[derive(Serialize, Clone, Copy)]
struct Usage {
    /// Prompt tokens neither read from nor written to the prompt cache.
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    output_tokens: u64,
}

#[derive(Serialize)]
struct MessageBody<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Value,
    stop_reason: Option<&'static str>,
    stop_sequence: (),
    usage: Usage,
}

fn stop_reason(reply: &Reply) -> &'static str {
    match reply {
        Reply::Tool { .. } => "tool_use",
        Reply::Text { truncated: true, .. } => "max_tokens",
        Reply::Text { .. } => "end_turn",
    }
}

/// Answers a messages request (auth and injected status already done).
pub(crate) fn respond(parsed: Option<&Value>, headers: &HeaderMap, behavior: &Behavior) -> Response<MockBody> {
    if !headers.contains_key("anthropic-version") {
        return error(400, "anthropic-version: header is required");
    }
    let Some(req) = parsed.filter(|v| v.is_object()) else {
        return error(400, "There was an issue with the request body: invalid JSON");
    };
    let Some(max_tokens) = req.get("max_tokens").and_then(Value::as_u64) else {
        return error(400, "max_tokens: Field required");
    };
    let model = req.get("model").and_then(Value::as_str).unwrap_or("");
    let stream = req.get("stream").and_then(Value::as_bool) == Some(true);
    let ex = extract(req);
    let (cache_read_input_tokens, cache_creation_input_tokens) = behavior.prompt_cache();
    let prompt = Usage {
        input_tokens: reply::prompt_tokens(ex.prompt_chars),
        cache_creation_input_tokens,
        cache_read_input_tokens,
        output_tokens: 1,
    };
    let reply = Reply::decide_for(ex, Some(max_tokens), behavior);
    let output_tokens = reply.completion_tokens();
    let n = reply::next_id();
    let id = format!("msg_mock_{n}");
    let tool_id = format!("toolu_mock_{n}");

    if !stream {
        if let Behavior::StreamError(_) = behavior {
            return error(500, "Internal server error");
        }
        let content = match &reply {
            Reply::Text { text, .. } => json!([{ "type": "text", "text": text }]),
            Reply::Tool { name, arguments } => {
                let input: Value = serde_json::from_str(arguments).unwrap_or_default();
                json!([{ "type": "tool_use", "id": tool_id, "name": name, "input": input }])
            }
        };
        let m = MessageBody {
            id: &id,
            kind: "message",
            role: "assistant",
            model,
            content,
            stop_reason: Some(stop_reason(&reply)),
            stop_sequence: (),
            usage: Usage { output_tokens, ..prompt },
        };
        return body::json_reply(serde_json::to_vec(&m).unwrap_or_default(), behavior);
    }

    let start = MessageBody {
        id: &id,
        kind: "message",
        role: "assistant",
        model,
        content: json!([]),
        stop_reason: None,
        stop_sequence: (),
        usage: prompt,
    };
    let block = match &reply {
        Reply::Text { .. } => json!({ "type": "text", "text": "" }),
        Reply::Tool { name, .. } => {
            json!({ "type": "tool_use", "id": tool_id, "name": name, "input": {} })
        }
    };
    let preamble = vec![
        body::named_event("message_start", &json!({ "type": "message_start", "message": start })),
        body::named_event(
            "content_block_start",
            &json!({ "type": "content_block_start", "index": 0, "content_block": block }),
        ),
        body::named_event("ping", &json!({ "type": "ping" })),
    ];
    let delta = |d: Value| -> Bytes {
        body::named_event("content_block_delta", &json!({ "type": "content_block_delta", "index": 0, "delta": d }))
    };
    let content: Vec<Bytes> = match &reply {
        Reply::Text { text, piece_ends, .. } => {
            reply::pieces(text, piece_ends).map(|p| delta(json!({ "type": "text_delta", "text": p }))).collect()
        }
        Reply::Tool { arguments, .. } => {
            let (a, b) = reply::split_half(arguments);
            [a, b].into_iter().map(|p| delta(json!({ "type": "input_json_delta", "partial_json": p }))).collect()
        }
    };
    let terminal = vec![
        body::named_event("content_block_stop", &json!({ "type": "content_block_stop", "index": 0 })),
        body::named_event(
            "message_delta",
            &json!({
                "type": "message_delta",
                "delta": {
                    "stop_reason": (!matches!(behavior, Behavior::NoFinish)).then(|| stop_reason(&reply)),
                    "stop_sequence": null,
                },
                "usage": { "output_tokens": output_tokens },
            }),
        ),
        body::named_event("message_stop", &json!({ "type": "message_stop" })),
    ];
    let keep_alive = body::named_event("ping", &json!({ "type": "ping" }));
    let bad_utf8 = delta(json!({ "type": "text_delta", "text": body::BAD_UTF8 }));
    let sse = Sse { preamble, content, terminal, keep_alive, bad_utf8 };
    body::sse_reply(sse, behavior, || body::named_event("error", &error_json("overloaded_error", "Overloaded")))
}
