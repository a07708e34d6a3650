//! The wire formats Meridian speaks, to clients and to upstreams alike: one module a format.

pub mod anthropic;
pub mod engine;
pub mod openai;
pub mod relay;

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;

use crate::chat::{ChatRequest, ChatResponse, StreamEvent};
use crate::error::GatewayError;

/// The API shape a client spoke, which its answer and errors must use too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiShape {
    /// `POST /v1/chat/completions`.
    OpenAi,
    /// `POST /v1/messages`.
    Anthropic,
    /// A request relayed by a peer edge over QUIC ([`crate::relay`]), answered in frames.
    Relay,
}

impl ApiShape {
    /// A label for metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            ApiShape::OpenAi => "openai",
            ApiShape::Anthropic => "anthropic",
            ApiShape::Relay => "relay",
        }
    }

    /// Parses and validates a request body into canonical form.
    pub fn parse_request(self, body: &[u8]) -> Result<ChatRequest, GatewayError> {
        match self {
            ApiShape::OpenAi => openai::parse_request(body),
            ApiShape::Anthropic => anthropic::parse_request(body),
            ApiShape::Relay => relay::parse_request(body),
        }
    }

    /// Encodes a whole answer.
    pub fn encode_response(self, resp: &ChatResponse) -> Bytes {
        match self {
            ApiShape::OpenAi => openai::encode_response(resp),
            ApiShape::Anthropic => anthropic::encode_response(resp),
            ApiShape::Relay => relay::encode_response(resp),
        }
    }

    /// An encoder for a streamed answer.
    pub fn stream_encoder(self, req: &ChatRequest) -> StreamEncoder {
        match self {
            ApiShape::OpenAi => StreamEncoder::OpenAi(openai::StreamEncoder::new(req.include_usage())),
            ApiShape::Anthropic => StreamEncoder::Anthropic(anthropic::StreamEncoder::default()),
            ApiShape::Relay => StreamEncoder::Relay(relay::StreamEncoder),
        }
    }

    /// The error body in this shape.
    pub fn error_body(self, err: &GatewayError) -> Bytes {
        match self {
            ApiShape::OpenAi => openai::error_body(err),
            ApiShape::Anthropic => anthropic::error_body(err),
            ApiShape::Relay => relay::error_body(err),
        }
    }
}

/// Writes canonical stream events in a client's shape.
#[derive(Debug)]
pub enum StreamEncoder {
    /// OpenAI chunks.
    OpenAi(openai::StreamEncoder),
    /// Anthropic events.
    Anthropic(anthropic::StreamEncoder),
    /// Relay frames.
    Relay(relay::StreamEncoder),
}

impl StreamEncoder {
    /// Encodes one event.
    pub fn event(&mut self, event: &StreamEvent, out: &mut BytesMut) {
        match self {
            StreamEncoder::OpenAi(e) => e.event(event, out),
            StreamEncoder::Anthropic(e) => e.event(event, out),
            StreamEncoder::Relay(e) => e.event(event, out),
        }
    }

    /// Ends a complete stream.
    pub fn finish(&mut self, out: &mut BytesMut) {
        match self {
            StreamEncoder::OpenAi(e) => e.finish(out),
            StreamEncoder::Anthropic(e) => e.finish(out),
            StreamEncoder::Relay(e) => e.finish(out),
        }
    }

    /// Ends a broken stream with a typed error event.
    pub fn error(&mut self, err: &GatewayError, out: &mut BytesMut) {
        match self {
            StreamEncoder::OpenAi(e) => e.error(err, out),
            StreamEncoder::Anthropic(e) => e.error(err, out),
            StreamEncoder::Relay(e) => e.error(err, out),
        }
    }
}

/// The message of an upstream's error body. OpenAI's `{"error":{"message"}}` and Anthropic's
/// `{"type":"error","error":{"message"}}` keep it at the same place.
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.pointer("/error/message").and_then(serde_json::Value::as_str).map(str::to_string)
}

/// Deserializes JSON, telling a syntax error from a field that has the wrong type (named by path).
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, GatewayError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            GatewayError::MalformedJson(inner.to_string())
        } else {
            let message = inner.to_string();
            // serde reports a missing field at its parent; name the field itself.
            let param = match message.strip_prefix("missing field `").and_then(|m| m.split('`').next()) {
                Some(field) if path == "." => field.to_string(),
                Some(field) => format!("{path}.{field}"),
                None => path,
            };
            GatewayError::InvalidField { param, message }
        }
    })
}

/// A refused field.
pub(crate) fn field_error(param: impl Into<String>, message: impl Into<String>) -> GatewayError {
    GatewayError::InvalidField { param: param.into(), message: message.into() }
}

/// Refuses an empty string field.
pub(crate) fn require_non_empty(param: &str, value: &str) -> Result<(), GatewayError> {
    if value.is_empty() {
        return Err(field_error(param, "must not be empty"));
    }
    Ok(())
}

/// Refuses a number outside `lo..=hi`.
pub(crate) fn require_range(param: &str, value: Option<f64>, lo: f64, hi: f64) -> Result<(), GatewayError> {
    match value {
        Some(v) if !(lo..=hi).contains(&v) => Err(field_error(param, format!("must be between {lo} and {hi}"))),
        _ => Ok(()),
    }
}
