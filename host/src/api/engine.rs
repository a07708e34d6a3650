//! Canonical chat requests and events to and from a Meridian engine node's protocol
//! (`engine/PROTOCOL.md`). Pure conversion; the QUIC transport is `meridian_engine::client`.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use meridian_engine::api::{self as wire, Event};

use crate::chat::{ChatRequest, Content, FinishReason, Message, Role, StreamEvent, Usage};

/// Why a request cannot go to an engine: engines serve plain-text chat only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("engine targets serve text chat only: {0}")]
pub struct Unsupported(&'static str);

/// The engine request for a canonical request, under the target's model name.
pub fn request(req: &ChatRequest, upstream_model: &str) -> Result<wire::ChatRequest, Unsupported> {
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(Unsupported("tools are not supported"));
    }
    let messages = req
        .messages
        .iter()
        .map(|m| message(m).map(|(role, content)| wire::Message { role: role.into(), content: content.into_owned() }))
        .collect::<Result<_, _>>()?;
    let stop = match &req.stop {
        None => Vec::new(),
        Some(crate::chat::Stop::One(s)) => vec![s.clone()],
        Some(crate::chat::Stop::Many(v)) => v.clone(),
    };
    Ok(wire::ChatRequest {
        model: upstream_model.to_string(),
        messages,
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature.map(|t| t as f32),
        top_p: req.top_p.map(|p| p as f32),
        top_k: req.anthropic_extra.get("top_k").and_then(|k| k.as_u64()).and_then(|k| u32::try_from(k).ok()),
        // A negative OpenAI seed is still a seed: keep its bits.
        seed: req.seed.map(|s| s as u64),
        stop,
        traceparent: None,
    })
}

/// A canonical message as the engine takes it: its role there and its text.
fn message(m: &Message) -> Result<(&'static str, Cow<'_, str>), Unsupported> {
    let role = match m.role {
        Role::System | Role::Developer => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => return Err(Unsupported("tool messages are not supported")),
    };
    if m.tool_calls.is_some() {
        return Err(Unsupported("tool calls are not supported"));
    }
    let content = match &m.content {
        None => Cow::Borrowed(""),
        Some(Content::Text(t)) => Cow::Borrowed(t.as_str()),
        Some(Content::Parts(parts)) if parts.iter().all(|p| p.kind == "text") => {
            Cow::Owned(parts.iter().filter_map(|p| p.text.as_deref()).collect())
        }
        Some(Content::Parts(_)) => return Err(Unsupported("only text content parts are supported")),
    };
    Ok((role, content))
}

/// The request's conversation beginnings as an engine names them in its prefix cache
/// ([`wire::ConversationHasher`]): the hash after each message, in order. Empty for a request no
/// engine serves (tools, images).
pub fn conversation(req: &ChatRequest) -> Vec<u64> {
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Vec::new();
    }
    let mut hasher = wire::ConversationHasher::default();
    let mut out = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        let Ok((role, content)) = message(m) else { return Vec::new() };
        out.push(hasher.message(role, &content));
    }
    out
}

/// The `Start` event an engine stream begins with (engines send no header of their own).
pub fn start(model: &str) -> StreamEvent {
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    StreamEvent::Start {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        model: model.to_string(),
        created,
        input_tokens: None,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
    }
}

/// Appends the canonical events for one engine event to `out`; a failure is returned as the
/// engine's error.
pub fn events(event: Event, out: &mut impl Extend<StreamEvent>) -> Result<(), wire::EngineError> {
    match event {
        Event::Delta(text) => out.extend([StreamEvent::Text(text)]),
        Event::Finished { finish_reason, usage } => out.extend([
            StreamEvent::Finish(match finish_reason {
                wire::FinishReason::Stop => FinishReason::Stop,
                wire::FinishReason::Length => FinishReason::Length,
            }),
            StreamEvent::Usage(Usage {
                input_tokens: usage.prompt_tokens,
                output_tokens: usage.completion_tokens,
                ..Default::default()
            }),
        ]),
        Event::Failed(e) => return Err(e),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Message, Part};

    fn chat(messages: Vec<Message>) -> ChatRequest {
        serde_json::from_value(serde_json::json!({ "model": "m", "messages": [] }))
            .map(|mut r: ChatRequest| {
                r.messages = messages;
                r
            })
            .unwrap()
    }

    #[test]
    fn text_conversations_map_role_by_role() {
        let mut req = chat(vec![
            Message::text(Role::Developer, "be brief"),
            Message::text(Role::User, "hi"),
            Message::text(Role::Assistant, "hello"),
        ]);
        req.max_tokens = Some(9);
        req.max_completion_tokens = Some(7);
        req.seed = Some(-1);
        req.stop = Some(crate::chat::Stop::One("\n".into()));
        let r = request(&req, "smol").unwrap();
        assert_eq!(r.model, "smol");
        let roles: Vec<_> = r.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant"]);
        assert_eq!((r.max_tokens, r.seed, r.stop), (Some(7), Some(u64::MAX), vec!["\n".to_string()]));
    }

    #[test]
    fn tools_and_images_are_refused() {
        let mut img = Message::text(Role::User, "");
        img.content = Some(Content::Parts(vec![Part::text("a"), Part { kind: "image_url".into(), ..Part::text("") }]));
        assert!(request(&chat(vec![img]), "m").is_err());
        assert!(request(&chat(vec![Message::text(Role::Tool, "42")]), "m").is_err());
    }

    #[test]
    fn finish_becomes_finish_and_usage() {
        let mut out = Vec::new();
        let usage = wire::Usage { prompt_tokens: 3, completion_tokens: 4 };
        events(Event::Finished { finish_reason: wire::FinishReason::Length, usage }, &mut out).unwrap();
        assert_eq!(
            out,
            [
                StreamEvent::Finish(FinishReason::Length),
                StreamEvent::Usage(Usage { input_tokens: 3, output_tokens: 4, ..Default::default() })
            ]
        );
        let failed = Event::Failed(wire::EngineError::new(wire::ErrorCode::Overloaded, "full"));
        assert_eq!(events(failed, &mut out).unwrap_err().code, wire::ErrorCode::Overloaded);
    }
}
