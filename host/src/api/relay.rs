//! The relay codec: a canonical request as it travels to a peer edge (the `request` of a
//! `REQUEST` with `op = "relay"`, `engine/PROTOCOL.md`), and an answer as `EVENT` frames, or an
//! `ERROR` frame whose code tells the origin whether another target may take the request. Pure
//! conversion, like the other API shapes; the relay listener is [`crate::relay`].

use bytes::{Bytes, BytesMut};
use meridian_engine::api::{EngineError, ErrorCode, RelayRequest};
use meridian_engine::wire::Frame;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::api::field_error;
use crate::chat::{BlockExtra, ChatRequest, ChatResponse, StreamEvent};
use crate::error::GatewayError;

/// What a peer edge gets with a request besides its text: who it is for, what the filters found,
/// and where it has been (which peer edges may take it is the dispatch core's
/// [`crate::dispatch::Policy`]).
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// The request's id.
    pub request_id: String,
    /// The tenant.
    pub tenant: String,
    /// The client's region, when known.
    pub client_region: Option<String>,
    /// Every label the filters gave it, here and before.
    pub labels: Vec<String>,
    /// Whether anything was redacted, here or before.
    pub redacted: bool,
    /// Regions it passed through, this one last.
    pub path: Vec<String>,
    /// Whether the client asked that no cache answer the request or keep its answer.
    pub no_cache: bool,
    /// The W3C trace context the target gets (`traceparent`): the attempt's span when the
    /// request is traced, else the one the client sent, if any.
    pub traceparent: Option<String>,
}

impl Dispatch {
    /// The relay frame for `req` under the peer's model name.
    pub fn request(&self, req: &ChatRequest, upstream_model: &str) -> RelayRequest {
        let mut chat = req.clone();
        chat.model = upstream_model.to_string();
        let anthropic_extra = std::mem::take(&mut chat.anthropic_extra);
        let anthropic_blocks = chat.take_block_extras();
        RelayRequest {
            request_id: self.request_id.clone(),
            tenant: self.tenant.clone(),
            client_region: self.client_region.clone(),
            path: self.path.clone(),
            labels: self.labels.clone(),
            redacted: self.redacted,
            no_cache: self.no_cache,
            // A canonical request always serializes (string keys, finite numbers from parsed JSON).
            request: serde_json::to_value(Relayed { chat, anthropic_extra, anthropic_blocks }).unwrap_or(Value::Null),
            traceparent: self.traceparent.clone(),
        }
    }
}

/// A canonical request as it travels: the OpenAI-form body, plus what an Anthropic client sent
/// that has no OpenAI field, at the top and on its blocks (`cache_control`), kept out of that body
/// so no OpenAI upstream ever sees it.
#[derive(Serialize, Deserialize)]
struct Relayed {
    chat: ChatRequest,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    anthropic_extra: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    anthropic_blocks: Vec<BlockExtra>,
}

/// Parses a relayed request body (the `request` of a [`RelayRequest`], as bytes), validated as a
/// client's request would be.
pub fn parse_request(body: &[u8]) -> Result<ChatRequest, GatewayError> {
    let Relayed { mut chat, anthropic_extra, anthropic_blocks } = crate::api::parse_json(body)?;
    chat.anthropic_extra = anthropic_extra;
    chat.put_block_extras(anthropic_blocks)
        .map_err(|at| field_error("anthropic_blocks", format!("{at:?} names no block of the request")))?;
    crate::api::openai::validate(&chat)?;
    Ok(chat)
}

/// One stream event as the JSON of an `EVENT` frame.
fn event_frame(event: &StreamEvent, out: &mut BytesMut) {
    // Events are plain data with string keys: serializing them cannot fail.
    let json = serde_json::to_vec(event).unwrap_or_default();
    Frame::Event(Bytes::from(json)).encode_into(out);
}

/// The stream event in an `EVENT` frame's JSON.
pub fn decode_event(json: &[u8]) -> Result<StreamEvent, String> {
    serde_json::from_slice(json).map_err(|e| format!("relayed event: {e}"))
}

/// A whole answer as the frames of a relayed answer.
pub fn encode_response(resp: &ChatResponse) -> Bytes {
    let mut out = BytesMut::new();
    for event in resp.to_events() {
        event_frame(&event, &mut out);
    }
    out.freeze()
}

/// An error as an `ERROR` frame.
pub fn error_body(err: &GatewayError) -> Bytes {
    Frame::Error(wire_error(err)).encode()
}

/// The wire error for a request-path error: the HTTP status the edge would have answered with,
/// under the code that tells the origin whether another target may take the request.
pub fn wire_error(err: &GatewayError) -> EngineError {
    let status = err.status().as_u16();
    let code = match err {
        // A loop found further along comes back as 508 too.
        _ if status == 508 => ErrorCode::LoopDetected,
        GatewayError::UnknownModel(_) => ErrorCode::UnknownModel,
        GatewayError::Overloaded | GatewayError::ShuttingDown | GatewayError::RateLimited { .. } => {
            ErrorCode::Overloaded
        }
        _ if status >= 500 => ErrorCode::Internal,
        _ => ErrorCode::Refused,
    };
    EngineError::with_status(code, status, err.to_string())
}

/// Writes a streamed answer's events as `EVENT` frames; a failure after the first becomes an
/// `ERROR` frame.
#[derive(Debug, Default)]
pub struct StreamEncoder;

impl StreamEncoder {
    /// Encodes one event.
    pub fn event(&mut self, event: &StreamEvent, out: &mut BytesMut) {
        event_frame(event, out);
    }

    /// Nothing: the end of the QUIC stream ends the answer.
    pub fn finish(&mut self, _out: &mut BytesMut) {}

    /// Ends a broken stream.
    pub fn error(&mut self, err: &GatewayError, out: &mut BytesMut) {
        Frame::Error(wire_error(err)).encode_into(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Content, FinishReason, Part, Usage};
    use crate::error::RelayRefusal;

    #[test]
    fn events_and_requests_survive_the_trip() {
        let events = [
            StreamEvent::Start {
                id: "c1".into(),
                model: "m".into(),
                created: 7,
                input_tokens: Some(3),
                cache_read_tokens: 2,
                cache_write_tokens: 1,
            },
            StreamEvent::Text("héllo".into()),
            StreamEvent::ToolCallStart { index: 0, id: "t".into(), name: "f".into() },
            StreamEvent::ToolCallArgs { index: 0, json: "{\"a\":1}".into() },
            StreamEvent::Finish(FinishReason::ToolCalls),
            StreamEvent::Usage(Usage {
                input_tokens: 3,
                output_tokens: 4,
                cache_read_tokens: 2,
                cache_write_tokens: 1,
            }),
        ];
        let mut out = BytesMut::new();
        let mut enc = StreamEncoder;
        events.iter().for_each(|e| enc.event(e, &mut out));
        let mut dec = meridian_engine::wire::Decoder::default();
        dec.push(&out);
        for e in &events {
            let Some(Frame::Event(json)) = dec.next_frame().unwrap() else { panic!("an EVENT frame") };
            assert_eq!(&decode_event(&json).unwrap(), e);
        }

        let mut req: ChatRequest = serde_json::from_value(
            serde_json::json!({"model": "front", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        req.anthropic_extra.insert("top_k".into(), 5.into());
        let marker = serde_json::json!({ "type": "ephemeral" });
        let mut part = Part::text("hi");
        part.anthropic_extra.insert("cache_control".into(), marker.clone());
        req.messages[0].content = Some(Content::Parts(vec![part]));
        let dispatch = Dispatch {
            request_id: "r".into(),
            tenant: "acme".into(),
            client_region: None,
            labels: Vec::new(),
            redacted: false,
            path: vec!["us-east".into()],
            no_cache: false,
            traceparent: None,
        };
        let relayed = dispatch.request(&req, "back");
        let body = serde_json::to_vec(&relayed.request).unwrap();
        let back = parse_request(&body).unwrap();
        assert_eq!(back.model, "back");
        assert_eq!(back.anthropic_extra.get("top_k"), Some(&5.into()));
        let Some(Content::Parts(parts)) = &back.messages[0].content else { panic!("parts: {back:?}") };
        assert_eq!(parts[0].anthropic_extra.get("cache_control"), Some(&marker));
        let openai_form = serde_json::to_string(&back).unwrap();
        assert!(!openai_form.contains("top_k") && !openai_form.contains("cache_control"), "{openai_form}");

        // A peer from before the cache counts: its usage and start still read, with no cache.
        let old = decode_event(br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#).unwrap();
        assert_eq!(old, StreamEvent::Usage(Usage { input_tokens: 3, output_tokens: 4, ..Default::default() }));
        let old = br#"{"start":{"id":"c","model":"m","created":1,"input_tokens":3}}"#;
        assert!(matches!(decode_event(old).unwrap(), StreamEvent::Start { cache_read_tokens: 0, .. }));
        let stray = br#"{"chat":{"model":"m","messages":[{"role":"user","content":"hi"}]},
            "anthropic_blocks":[{"at":{"on":"tool","tool":0},"fields":{"cache_control":{}}}]}"#;
        assert_eq!(parse_request(stray).unwrap_err().param(), Some("anthropic_blocks"));
        assert!(parse_request(br#"{"chat": {"model": "", "messages": []}}"#).is_err());
    }

    #[test]
    fn errors_keep_their_status_and_say_whether_to_go_on() {
        let e = wire_error(&RelayRefusal::Loop { region: "eu".into(), path: "us > eu".into() }.into());
        assert_eq!((e.code, e.status), (ErrorCode::LoopDetected, Some(508)));
        let e = wire_error(&GatewayError::Rejected { status: 451, reason: "no".into() });
        assert_eq!((e.code, e.status), (ErrorCode::Refused, Some(451)));
        let e = wire_error(&GatewayError::Overloaded);
        assert_eq!((e.code, e.status), (ErrorCode::Overloaded, Some(503)));
        let e = wire_error(&GatewayError::UnknownModel("m".into()));
        assert_eq!(e.code, ErrorCode::UnknownModel);
    }
}
