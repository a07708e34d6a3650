//! What an engine node offers, independent of transport: the request and event types that travel
//! in wire frames, the typed errors, and the [`Backend`] trait the QUIC server drives.
//!
//! The scheduler implements [`Backend`]; the server only moves these values between frames and
//! calls. Keeping both sides on one set of types means the protocol doc and the code cannot drift.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The protocol version this build speaks (the `v` field of every request frame).
pub const PROTOCOL_VERSION: u16 = 1;

/// One request, the first frame on a request stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Protocol version; a peer answers an unknown one with [`ErrorCode::UnsupportedVersion`].
    pub v: u16,
    /// What is asked.
    #[serde(flatten)]
    pub request: Request,
}

/// The operations an engine serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Generate a chat answer, streamed as deltas.
    Chat(ChatRequest),
    /// Embed texts.
    Embed(EmbedRequest),
    /// A chat request relayed by another region's edge, for the receiving edge to dispatch with
    /// its own targets (edges only; engines refuse it).
    Relay(RelayRequest),
}

/// A request one edge hands to another region's edge. The answer is a stream of `EVENT` frames
/// (the canonical stream events of the edge's request path), ended by the server finishing its
/// side, or an `ERROR` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayRequest {
    /// The client's request id, kept across regions for tracing.
    pub request_id: String,
    /// The tenant it is served for (the mutual-TLS peer vouches for the client's key).
    pub tenant: String,
    /// The region the client is in, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_region: Option<String>,
    /// The regions the request has passed through, the origin first: its hop count is the
    /// length. The receiving edge refuses it when its own region is listed (a loop).
    pub path: Vec<String>,
    /// The labels the origin's filters gave it (`pii.email`, `pii.email.redacted`…), for the
    /// receiving edge's routers and relay policy.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Whether filters replaced anything in the text with placeholders (the originals never
    /// leave the origin, which restores them in the answer).
    #[serde(default)]
    pub redacted: bool,
    /// The client asked that no cache answer it or keep its answer (`cache-control: no-store`);
    /// the receiving edge honours it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_cache: bool,
    /// The canonical chat request as the origin's filters left it (the edge's JSON form).
    pub request: serde_json::Value,
    /// W3C trace context of the sending edge's attempt (`traceparent`), when it has one: the
    /// receiving edge's spans continue its trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// A chat generation request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatRequest {
    /// Model name as the engine lists it.
    pub model: String,
    /// The conversation, rendered with the model's chat template.
    pub messages: Vec<Message>,
    /// Most tokens to generate; the engine's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature; 0 or absent means greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass, in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Seed for sampling, so that a sampled answer can be reproduced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Generation ends before any of these strings; they are not part of the answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// W3C trace context of the caller's span (`traceparent`), when it has one: the engine's
    /// spans (the request, its queue, prefill and decode) continue its trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Its text.
    pub content: String,
}

/// An embedding request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedRequest {
    /// Embedding model name as the engine lists it.
    pub model: String,
    /// Texts to embed, each into one vector.
    pub input: Vec<String>,
    /// The client takes the answer in several `EMBEDDINGS` frames, each holding the vectors of
    /// consecutive inputs from [`Embeddings::index`] on. Without it the whole answer is one frame
    /// (protocol version 1 as first written), refused when it does not fit. A server that does
    /// not know the field ignores it and answers in one frame, which is still a whole answer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub split_answer: bool,
}

impl EmbedRequest {
    /// A request for one vector per text of `input`, answered in one frame.
    pub fn new(model: impl Into<String>, input: Vec<String>) -> EmbedRequest {
        EmbedRequest { model: model.into(), input, split_answer: false }
    }
}

/// The answer to an [`EmbedRequest`], or one part of it: the vectors of consecutive inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embeddings {
    /// The position among the request's inputs of the first vector in `data` (0 for a whole
    /// answer; absent on the wire when 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub index: u32,
    /// One unit-length vector per input, in input order.
    pub data: Vec<Vec<f32>>,
    /// Tokens read.
    pub prompt_tokens: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the rendered prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the model's context was reached.
    Length,
}

/// What a running generation produces, in order: deltas, then exactly one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New answer text; never splits a UTF-8 character, never contains part of a stop string.
    Delta(String),
    /// Generation ended normally.
    Finished {
        /// Why it ended.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// Generation failed after it was admitted.
    Failed(EngineError),
}

/// Load and health of an engine node, answered on the control stream.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Health {
    /// The execution provider in use: `tensorrt`, `cuda` or `cpu`.
    pub provider: String,
    /// Chat models served.
    pub chat_models: Vec<String>,
    /// Embedding models served.
    pub embedding_models: Vec<String>,
    /// Requests admitted but not yet decoding.
    pub queue_depth: u32,
    /// Queue capacity; beyond it requests are refused as overloaded.
    pub queue_capacity: u32,
    /// Sequences decoding now.
    pub active_sequences: u32,
    /// Most sequences decoded in one batch.
    pub max_batch: u32,
    /// Generated tokens per second over the last few seconds.
    pub tokens_per_second: f64,
    /// Prompts whose beginning came from the prefix cache, since start (all chat models). Absent
    /// from engines before the prefix cache, and then 0.
    #[serde(default)]
    pub prefix_cache_hits: u64,
    /// Prompt tokens whose prefill the prefix cache saved, since start.
    #[serde(default)]
    pub prefix_cache_tokens_reused: u64,
    /// Bytes of KV the prefix caches hold now.
    #[serde(default)]
    pub prefix_cache_bytes: u64,
    /// What the prefix caches hold, by chat model, for edges to route by: conversation beginnings
    /// as `[hash, tokens]` ([`ConversationHasher`] hashes of a request's leading messages, and
    /// how many of its prompt tokens they render to), most recently used first, at most
    /// [`MAX_HELD_PREFIXES`] per model. Absent from engines before it, and when nothing is held.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prefixes: BTreeMap<String, Vec<(u64, u32)>>,
}

/// The most conversation beginnings an engine reports per model in [`Health::prefixes`] (about
/// 30 bytes each on the wire).
pub const MAX_HELD_PREFIXES: usize = 256;

/// Names the beginnings of a conversation, message by message, the same way on every node: the
/// engine for what its prefix cache holds, the edge for a request it routes. The hash after
/// message `i` covers the roles and texts of messages `0..=i` (as the engine receives them), so two
/// requests share it exactly when they begin with the same `i + 1` messages (up to a 64-bit
/// collision, which can only misguide a routing guess, never an answer).
///
/// A fixed function (no per-process seed), word at a time: a wyhash-style multiply-fold, spelled
/// out in `PROTOCOL.md` (`HEALTH`) for other implementations.
#[derive(Debug, Clone)]
pub struct ConversationHasher {
    state: u64,
}

impl Default for ConversationHasher {
    fn default() -> Self {
        ConversationHasher { state: 0x243f_6a88_85a3_08d3 }
    }
}

impl ConversationHasher {
    /// Adds the next message (its role as the engine protocol names it, and its text) and returns
    /// the hash of the conversation up to and including it.
    pub fn message(&mut self, role: &str, content: &str) -> u64 {
        self.field(role.as_bytes());
        self.field(content.as_bytes());
        self.state
    }

    /// Length-prefixed, so that no two splits of the same bytes into fields hash alike.
    fn field(&mut self, bytes: &[u8]) {
        self.fold(bytes.len() as u64);
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.fold(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let mut tail = [0u8; 8];
        let rest = words.remainder();
        if !rest.is_empty() {
            tail[..rest.len()].copy_from_slice(rest);
            self.fold(u64::from_le_bytes(tail));
        }
    }

    fn fold(&mut self, word: u64) {
        let m = u128::from(self.state ^ word) * u128::from(0x3e41_64dd_07f7_183au64);
        self.state = (m as u64) ^ ((m >> 64) as u64);
    }
}

/// Error classes on the wire; each maps to one HTTP status at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The queue is full (HTTP 429); another engine may take it.
    Overloaded,
    /// The request is invalid for this engine (HTTP 400).
    BadRequest,
    /// No such model here (HTTP 404).
    UnknownModel,
    /// The prompt does not fit the model's context (HTTP 400).
    ContextLength,
    /// The peer speaks a protocol version this node does not.
    UnsupportedVersion,
    /// A frame could not be parsed.
    MalformedFrame,
    /// A frame exceeded the size limit.
    FrameTooLarge,
    /// The engine failed (HTTP 500); another engine may take it.
    Internal,
    /// A peer edge refused a relayed request; the error's `status` is how it would have answered
    /// a client of its own.
    Refused,
    /// A relayed request came back to a region it had passed through, or exceeded the hop limit
    /// (HTTP 508); another target may take it.
    LoopDetected,
    /// The node is shutting down: it finishes the requests it has and takes no new one. Another
    /// target may take it at once; this node is not failing.
    Draining,
}

/// A typed engine error; travels as an error frame with its code and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct EngineError {
    /// Its class.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
    /// The HTTP status the sender would answer with, where the code alone does not say it (an
    /// edge's refusals: 400, 451…).
    pub status: Option<u16>,
}

impl EngineError {
    /// An error of class `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> EngineError {
        EngineError { code, message: message.into(), status: None }
    }

    /// An error of class `code` that stands for HTTP `status`.
    pub fn with_status(code: ErrorCode, status: u16, message: impl Into<String>) -> EngineError {
        EngineError { code, message: message.into(), status: Some(status) }
    }
}

/// The parts of an embedding answer as a backend produces them ([`Backend::embed`]).
pub type EmbedParts = mpsc::Receiver<Result<Embeddings, EngineError>>;

/// What serves requests behind the transport: the scheduler on a real node.
pub trait Backend: Send + Sync + 'static {
    /// Admits a chat generation or refuses it at once (overloaded, unknown model, bad request).
    /// Events arrive on the receiver; dropping the receiver cancels the generation and frees its
    /// slot.
    fn chat(&self, request: ChatRequest) -> Result<mpsc::Receiver<Event>, EngineError>;

    /// Admits an embedding request or refuses it at once (unknown model, bad request). The
    /// vectors arrive on the receiver in parts of consecutive inputs (each an [`Embeddings`] whose
    /// `index` says where it starts), or an error ends them; the answer is whole when the sender
    /// is dropped after the last input's vector. Dropping the receiver cancels the rest.
    fn embed(&self, request: EmbedRequest) -> Result<EmbedParts, EngineError>;

    /// Current load and health.
    fn health(&self) -> Health;

    /// Takes a request relayed by a peer edge. `peer` is the subject common name of the client
    /// certificate the request came with (the sending node's name in the cluster; empty when the
    /// certificate has none): the mutual TLS only says the cluster CA signed it, so the backend
    /// decides whether that node may relay at all. Each item on the receiver is one or more
    /// encoded frames (`EVENT`s, then possibly an `ERROR`), written to the stream as they come;
    /// the answer is complete when the sender is dropped. Dropping the receiver cancels it. An
    /// `Err` is sent back as an `ERROR` frame. Engines do not relay: the default refuses.
    fn relay(&self, peer: &str, request: RelayRequest) -> Result<mpsc::Receiver<bytes::Bytes>, EngineError> {
        let _ = (peer, request);
        Err(EngineError::new(ErrorCode::BadRequest, "this node is an engine: it does not take relayed requests"))
    }
}

#[cfg(test)]
mod tests {
    use super::ConversationHasher;

    fn hashes(messages: &[(&str, &str)]) -> Vec<u64> {
        let mut h = ConversationHasher::default();
        messages.iter().map(|(role, content)| h.message(role, content)).collect()
    }

    #[test]
    fn conversation_hashes_name_beginnings_and_nothing_else() {
        let long = "x".repeat(1000);
        let a = hashes(&[("system", &long), ("user", "Hi"), ("assistant", "Hello")]);
        let b = hashes(&[("system", &long), ("user", "Hi"), ("assistant", "Hello!"), ("user", "more")]);
        assert_eq!(a[..2], b[..2], "the same beginning, the same hashes");
        assert_ne!(a[2], b[2]);
        // Role, boundaries and order all count.
        assert_ne!(hashes(&[("user", "Hi")]), hashes(&[("system", "Hi")]));
        assert_ne!(hashes(&[("user", "ab"), ("user", "c")])[1], hashes(&[("user", "a"), ("user", "bc")])[1]);
        assert_ne!(hashes(&[("user", "")]), hashes(&[("user", "\0")]));
        // Fixed across processes and builds: no random seed.
        assert_eq!(hashes(&[("user", "Hi")]), hashes(&[("user", "Hi")]));
        assert_eq!(
            hashes(&[("user", "Hi")])[0],
            0xb4b9_16b2_6413_1aa7,
            "the function PROTOCOL.md spells out (computed from its text in Python)"
        );
    }
}
