//! Frames on an engine stream, without I/O: an encoder and an incremental decoder.
//!
//! Every frame is `u32 length (big-endian) | u8 type | payload`, where `length` counts the type byte
//! and the payload (so it is at least 1). `PROTOCOL.md` describes each type; this module is the
//! reference implementation. The decoder takes bytes in whatever pieces the transport delivers and
//! yields whole frames; it never allocates more than the frame size limit for one frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::api::{Embeddings, EngineError, Envelope, ErrorCode, FinishReason, Health, Usage, PROTOCOL_VERSION};

/// Default limit on a frame's `length` field: 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// Bytes in the length prefix.
pub const LENGTH_BYTES: usize = 4;

/// The type byte of each frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// JSON [`Envelope`]; the first frame of a request stream (client → server).
    Request = 0x01,
    /// Raw UTF-8 answer text (server → client).
    Delta = 0x02,
    /// JSON [`Usage`] (server → client), just before `Done`.
    Usage = 0x03,
    /// JSON `{"finish_reason": …}` (server → client); the last frame of a chat answer.
    Done = 0x04,
    /// JSON `{"code": …, "message": …}` (server → client); the last frame of a failed stream.
    Error = 0x05,
    /// JSON [`Embeddings`] (server → client).
    Embeddings = 0x06,
    /// Empty (client → server); asks for one `Health` frame on the control stream.
    HealthRequest = 0x07,
    /// JSON [`Health`] (server → client).
    Health = 0x08,
    /// One JSON stream event of a relayed answer (server → client), opaque to this crate: the
    /// edges' canonical event format.
    Event = 0x09,
}

impl FrameType {
    /// The type for a type byte, if it is one this version knows.
    pub fn from_byte(b: u8) -> Option<FrameType> {
        Some(match b {
            0x01 => FrameType::Request,
            0x02 => FrameType::Delta,
            0x03 => FrameType::Usage,
            0x04 => FrameType::Done,
            0x05 => FrameType::Error,
            0x06 => FrameType::Embeddings,
            0x07 => FrameType::HealthRequest,
            0x08 => FrameType::Health,
            0x09 => FrameType::Event,
            _ => return None,
        })
    }

    /// Its name as `PROTOCOL.md` writes it.
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Request => "REQUEST",
            FrameType::Delta => "DELTA",
            FrameType::Usage => "USAGE",
            FrameType::Done => "DONE",
            FrameType::Error => "ERROR",
            FrameType::Embeddings => "EMBEDDINGS",
            FrameType::HealthRequest => "HEALTH_REQUEST",
            FrameType::Health => "HEALTH",
            FrameType::Event => "EVENT",
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A request, version already checked to be [`PROTOCOL_VERSION`].
    Request(Envelope),
    /// Answer text.
    Delta(String),
    /// Token counts.
    Usage(Usage),
    /// End of a chat answer.
    Done {
        /// Why generation ended.
        finish_reason: FinishReason,
    },
    /// A typed error; ends the stream.
    Error(EngineError),
    /// Embedding vectors.
    Embeddings(Embeddings),
    /// Ask for health.
    HealthRequest,
    /// Health answer.
    Health(Health),
    /// A relayed answer's stream event, as JSON bytes.
    Event(Bytes),
}

impl Frame {
    /// Its type byte.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Request(_) => FrameType::Request,
            Frame::Delta(_) => FrameType::Delta,
            Frame::Usage(_) => FrameType::Usage,
            Frame::Done { .. } => FrameType::Done,
            Frame::Error(_) => FrameType::Error,
            Frame::Embeddings(_) => FrameType::Embeddings,
            Frame::HealthRequest => FrameType::HealthRequest,
            Frame::Health(_) => FrameType::Health,
            Frame::Event(_) => FrameType::Event,
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0); // patched below
        out.put_u8(self.frame_type() as u8);
        match self {
            Frame::Request(env) => put_json(out, env),
            Frame::Delta(text) => out.put_slice(text.as_bytes()),
            Frame::Usage(u) => put_json(out, u),
            Frame::Done { finish_reason } => put_json(out, &DonePayload { finish_reason: *finish_reason }),
            Frame::Error(e) => {
                put_json(out, &ErrorPayload { code: e.code, message: e.message.clone(), status: e.status })
            }
            Frame::Embeddings(e) => put_json(out, e),
            Frame::HealthRequest => {}
            Frame::Health(h) => put_json(out, h),
            Frame::Event(json) => out.put_slice(json),
        }
        let len = out.len() - start - LENGTH_BYTES;
        let len = u32::try_from(len).expect("frame length fits u32");
        out[start..start + LENGTH_BYTES].copy_from_slice(&len.to_be_bytes());
    }

    /// The encoded frame.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode_into(&mut out);
        out.freeze()
    }
}

fn put_json<T: Serialize>(out: &mut BytesMut, value: &T) {
    // Serializing these plain structs into memory cannot fail (no maps with non-string keys, no
    // I/O); a failure here is a bug, not a runtime condition.
    serde_json::to_writer(out.writer(), value).expect("frame payload serializes");
}

/// Payload of a DONE frame.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct DonePayload {
    finish_reason: FinishReason,
}

/// Payload of an ERROR frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ErrorPayload {
    code: ErrorCode,
    message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
}

/// Why bytes could not be decoded into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The length field exceeds the limit (or is 0, which cannot hold a type byte).
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: u64,
        /// The limit in force.
        max: usize,
    },
    /// A length of 0: no room for the type byte.
    #[error("frame length 0 (a frame holds at least its type byte)")]
    Empty,
    /// A type byte this version does not know.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The payload does not parse as that frame type's content.
    #[error("malformed {frame} frame: {reason}")]
    Malformed {
        /// The frame type's name.
        frame: &'static str,
        /// What is wrong (the JSON or UTF-8 error).
        reason: String,
    },
    /// A REQUEST frame whose `v` is not [`PROTOCOL_VERSION`].
    #[error("unsupported protocol version {version} (this node speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// The version the peer sent.
        version: u64,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({have} of {need} bytes)")]
    Truncated {
        /// Bytes of the unfinished frame that arrived.
        have: usize,
        /// Bytes the frame needed (prefix included), or 4 while the length was incomplete.
        need: usize,
    },
}

impl WireError {
    /// The error code a peer answers this with in an ERROR frame.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            WireError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            WireError::Empty
            | WireError::UnknownType(_)
            | WireError::Malformed { .. }
            | WireError::Truncated { .. } => ErrorCode::MalformedFrame,
        }
    }

    /// This error as an [`EngineError`], for the ERROR frame that answers it.
    pub fn to_engine_error(&self) -> EngineError {
        EngineError::new(self.code(), self.to_string())
    }

    /// Whether the decoder can go on after this error (the bad frame was consumed whole). After
    /// `TooLarge` or `Empty` the frame boundary is lost and the stream must be abandoned.
    pub fn frame_consumed(&self) -> bool {
        matches!(self, WireError::UnknownType(_) | WireError::Malformed { .. } | WireError::UnsupportedVersion { .. })
    }
}

/// An incremental frame decoder: [`push`](Decoder::push) bytes as they arrive, take frames with
/// [`next_frame`](Decoder::next_frame), and call [`finish`](Decoder::finish) at the end of the
/// stream to learn whether it ended cleanly.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    max_frame: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder {
    /// A decoder refusing frames whose length field exceeds `max_frame`.
    pub fn new(max_frame: usize) -> Decoder {
        Decoder { buf: BytesMut::new(), max_frame: max_frame.max(1) }
    }

    /// The frame size limit.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// How many more bytes the decoder wants before it can yield or reject the next frame (at
    /// least 1). A reader can use it to size its next read.
    pub fn wanted(&self) -> usize {
        if self.buf.len() < LENGTH_BYTES {
            return LENGTH_BYTES - self.buf.len();
        }
        let len = self.peek_len() as usize;
        (LENGTH_BYTES + len).saturating_sub(self.buf.len()).max(1)
    }

    fn peek_len(&self) -> u32 {
        u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed. The length is checked as soon as
    /// its 4 bytes are in, so an oversized frame is refused before its payload arrives.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.buf.len() < LENGTH_BYTES {
            return Ok(None);
        }
        let len = self.peek_len();
        if len == 0 {
            return Err(WireError::Empty);
        }
        if len as u64 > self.max_frame as u64 {
            return Err(WireError::TooLarge { len: len as u64, max: self.max_frame });
        }
        let total = LENGTH_BYTES + len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        self.buf.advance(LENGTH_BYTES);
        let mut body = self.buf.split_to(len as usize);
        let type_byte = body[0];
        body.advance(1);
        let frame_type = FrameType::from_byte(type_byte).ok_or(WireError::UnknownType(type_byte))?;
        decode_payload(frame_type, &body).map(Some)
    }

    /// Call at the end of the stream: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), WireError> {
        match self.buf.len() {
            0 => Ok(()),
            have if have < LENGTH_BYTES => Err(WireError::Truncated { have, need: LENGTH_BYTES }),
            have => Err(WireError::Truncated { have, need: LENGTH_BYTES + self.peek_len() as usize }),
        }
    }
}

/// Decodes every frame of a complete byte string (a whole stream, or several frames as one
/// buffer), with the default frame size limit: the frames, or the first error (an end inside a
/// frame is [`WireError::Truncated`]). The entry point for fuzzing the decoder.
pub fn decode(bytes: &[u8]) -> Result<Vec<Frame>, WireError> {
    let mut dec = Decoder::default();
    dec.push(bytes);
    let mut frames = Vec::new();
    while let Some(frame) = dec.next_frame()? {
        frames.push(frame);
    }
    dec.finish()?;
    Ok(frames)
}

fn malformed(frame_type: FrameType, reason: impl ToString) -> WireError {
    WireError::Malformed { frame: frame_type.name(), reason: reason.to_string() }
}

fn json<T: for<'de> Deserialize<'de>>(frame_type: FrameType, payload: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(payload).map_err(|e| malformed(frame_type, e))
}

/// Decodes one payload of a known type.
pub fn decode_payload(frame_type: FrameType, payload: &[u8]) -> Result<Frame, WireError> {
    Ok(match frame_type {
        FrameType::Request => {
            // The version is read first, on its own, so that a future version whose body this
            // build cannot parse is still answered as unsupported rather than malformed.
            #[derive(Deserialize)]
            struct Version {
                v: serde_json::Value,
            }
            let Version { v } = json(frame_type, payload)?;
            let version = v.as_u64().ok_or_else(|| malformed(frame_type, "`v` is not a non-negative integer"))?;
            if version != u64::from(PROTOCOL_VERSION) {
                return Err(WireError::UnsupportedVersion { version });
            }
            Frame::Request(json(frame_type, payload)?)
        }
        FrameType::Delta => {
            Frame::Delta(std::str::from_utf8(payload).map_err(|e| malformed(frame_type, e))?.to_owned())
        }
        FrameType::Usage => Frame::Usage(json(frame_type, payload)?),
        FrameType::Done => {
            let DonePayload { finish_reason } = json(frame_type, payload)?;
            Frame::Done { finish_reason }
        }
        FrameType::Error => {
            let ErrorPayload { code, message, status } = json(frame_type, payload)?;
            Frame::Error(EngineError { code, message, status })
        }
        FrameType::Embeddings => Frame::Embeddings(json(frame_type, payload)?),
        FrameType::HealthRequest => {
            if !payload.is_empty() {
                return Err(malformed(frame_type, "payload must be empty"));
            }
            Frame::HealthRequest
        }
        FrameType::Health => Frame::Health(json(frame_type, payload)?),
        FrameType::Event => {
            // Checked to be JSON here so that a broken peer is a framing error on this stream;
            // what the JSON means is the edges' business.
            serde_json::from_slice::<serde::de::IgnoredAny>(payload).map_err(|e| malformed(frame_type, e))?;
            Frame::Event(Bytes::copy_from_slice(payload))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ChatRequest, EmbedRequest, Message, Request};

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Request(Envelope {
                v: PROTOCOL_VERSION,
                request: Request::Chat(ChatRequest {
                    model: "smollm2".into(),
                    messages: vec![Message { role: "user".into(), content: "Hi ü 🌍".into() }],
                    max_tokens: Some(8),
                    temperature: Some(0.5),
                    stop: vec!["\n\n".into()],
                    ..Default::default()
                }),
            }),
            Frame::Request(Envelope {
                v: PROTOCOL_VERSION,
                request: Request::Embed(EmbedRequest::new("e5", vec!["a".into(), "".into()])),
            }),
            Frame::Request(Envelope {
                v: PROTOCOL_VERSION,
                request: Request::Embed(EmbedRequest {
                    split_answer: true,
                    ..EmbedRequest::new("e5", vec!["b".into()])
                }),
            }),
            Frame::Delta("Hello, 世界".into()),
            Frame::Delta(String::new()),
            Frame::Usage(Usage { prompt_tokens: 12, completion_tokens: 3 }),
            Frame::Done { finish_reason: FinishReason::Stop },
            Frame::Done { finish_reason: FinishReason::Length },
            Frame::Error(EngineError::new(ErrorCode::Overloaded, "queue full")),
            Frame::Embeddings(Embeddings { index: 0, data: vec![vec![0.5, -0.25], vec![1.0, 0.0]], prompt_tokens: 4 }),
            Frame::Embeddings(Embeddings { index: 64, data: vec![vec![0.125]], prompt_tokens: 2 }),
            Frame::HealthRequest,
            Frame::Health(Health {
                provider: "cpu".into(),
                chat_models: vec!["smollm2".into()],
                queue_capacity: 64,
                max_batch: 8,
                tokens_per_second: 12.5,
                ..Default::default()
            }),
            Frame::Request(Envelope {
                v: PROTOCOL_VERSION,
                request: Request::Relay(crate::api::RelayRequest {
                    request_id: "r-1".into(),
                    tenant: "acme".into(),
                    client_region: Some("us-east".into()),
                    path: vec!["us-east".into()],
                    labels: vec!["pii.email.redacted".into()],
                    redacted: true,
                    no_cache: true,
                    request: serde_json::json!({ "model": "m", "messages": [] }),
                    traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
                }),
            }),
            Frame::Event(Bytes::from_static(br#"{"text":"hi"}"#)),
            Frame::Error(EngineError::with_status(ErrorCode::Refused, 451, "not here")),
        ]
    }

    #[test]
    fn an_event_frame_must_hold_json() {
        let mut dec = Decoder::default();
        dec.push(&Frame::Event(Bytes::from_static(b"{not json")).encode());
        assert!(matches!(dec.next_frame(), Err(WireError::Malformed { frame: "EVENT", .. })));
    }

    #[test]
    fn decode_takes_a_whole_buffer() {
        let frames = samples();
        let mut all = BytesMut::new();
        frames.iter().for_each(|f| f.encode_into(&mut all));
        assert_eq!(decode(&all).unwrap(), frames);
        assert!(matches!(decode(&all[..all.len() - 1]), Err(WireError::Truncated { .. })));
        assert_eq!(decode(&[0, 0, 0, 0]), Err(WireError::Empty));
        assert_eq!(decode(&[]), Ok(Vec::new()));
    }

    #[test]
    fn embedding_fields_added_within_version_one_keep_its_bytes() {
        // A one-frame answer and a request without the split are byte for byte what version 1
        // first sent, so peers that predate the fields read them as before.
        let whole = Frame::Embeddings(Embeddings { index: 0, data: vec![vec![0.5]], prompt_tokens: 1 }).encode();
        assert_eq!(&whole[5..], br#"{"data":[[0.5]],"prompt_tokens":1}"#);
        let req = Frame::Request(Envelope { v: 1, request: Request::Embed(EmbedRequest::new("m", vec!["x".into()])) });
        assert_eq!(&req.encode()[5..], br#"{"v":1,"op":"embed","model":"m","input":["x"]}"#);
        let part = Frame::Embeddings(Embeddings { index: 3, data: vec![], prompt_tokens: 0 }).encode();
        assert_eq!(&part[5..], br#"{"index":3,"data":[],"prompt_tokens":0}"#);
    }

    #[test]
    fn an_error_without_a_status_is_version_one_compatible() {
        let bytes = Frame::Error(EngineError::new(ErrorCode::Internal, "x")).encode();
        assert_eq!(&bytes[5..], br#"{"code":"internal","message":"x"}"#);
    }

    #[test]
    fn round_trip_whole() {
        let mut dec = Decoder::default();
        for f in samples() {
            dec.push(&f.encode());
            assert_eq!(dec.next_frame().unwrap(), Some(f));
            assert_eq!(dec.next_frame().unwrap(), None);
        }
        dec.finish().unwrap();
    }

    #[test]
    fn byte_by_byte_feeding_yields_each_frame_exactly_when_complete() {
        let frames = samples();
        let mut all = BytesMut::new();
        let mut ends = Vec::new();
        for f in &frames {
            f.encode_into(&mut all);
            ends.push(all.len());
        }
        let mut dec = Decoder::default();
        let mut got = Vec::new();
        for (i, b) in all.iter().enumerate() {
            dec.push(&[*b]);
            while let Some(f) = dec.next_frame().unwrap() {
                assert!(ends.contains(&(i + 1)), "frame completed at byte {} which is not a frame end", i + 1);
                got.push(f);
            }
            if i + 1 < all.len() && !ends.contains(&(i + 1)) {
                assert!(dec.finish().is_err(), "mid-frame end must be Truncated");
            }
        }
        assert_eq!(got, frames);
        dec.finish().unwrap();
    }

    #[test]
    fn every_split_point_of_two_frames() {
        let a = Frame::Delta("ab".into());
        let b = Frame::Usage(Usage { prompt_tokens: 1, completion_tokens: 2 });
        let mut all = a.encode().to_vec();
        all.extend_from_slice(&b.encode());
        for cut in 0..=all.len() {
            let mut dec = Decoder::default();
            let mut got = Vec::new();
            for piece in [&all[..cut], &all[cut..]] {
                dec.push(piece);
                while let Some(f) = dec.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, vec![a.clone(), b.clone()], "cut at {cut}");
        }
    }

    #[test]
    fn byte_level_layout() {
        let bytes = Frame::Delta("Hi".into()).encode();
        assert_eq!(&bytes[..], &[0, 0, 0, 3, 0x02, b'H', b'i']);
        let bytes = Frame::HealthRequest.encode();
        assert_eq!(&bytes[..], &[0, 0, 0, 1, 0x07]);
        let done = Frame::Done { finish_reason: FinishReason::Stop }.encode();
        assert_eq!(&done[5..], br#"{"finish_reason":"stop"}"#);
        let err = Frame::Error(EngineError::new(ErrorCode::FrameTooLarge, "x")).encode();
        assert_eq!(&err[5..], br#"{"code":"frame_too_large","message":"x"}"#);
    }

    #[test]
    fn too_large_is_refused_from_the_prefix_alone() {
        let mut dec = Decoder::new(16);
        dec.push(&[0, 0, 0, 17]);
        let err = dec.next_frame().unwrap_err();
        assert_eq!(err, WireError::TooLarge { len: 17, max: 16 });
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
        assert!(!err.frame_consumed());
        // Exactly the limit is fine.
        let mut dec = Decoder::new(16);
        let f = Frame::Delta("x".repeat(15));
        dec.push(&f.encode());
        assert_eq!(dec.next_frame().unwrap(), Some(f));
        // Huge lengths do not overflow anything.
        let mut dec = Decoder::default();
        dec.push(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(dec.next_frame(), Err(WireError::TooLarge { len: 0xffff_ffff, .. })));
    }

    #[test]
    fn zero_length_and_unknown_type() {
        let mut dec = Decoder::default();
        dec.push(&[0, 0, 0, 0]);
        assert_eq!(dec.next_frame().unwrap_err(), WireError::Empty);

        let mut dec = Decoder::default();
        dec.push(&[0, 0, 0, 2, 0x7f, 0x00]);
        dec.push(&Frame::HealthRequest.encode());
        let err = dec.next_frame().unwrap_err();
        assert_eq!(err, WireError::UnknownType(0x7f));
        assert_eq!(err.code(), ErrorCode::MalformedFrame);
        assert!(err.frame_consumed());
        // The next frame still decodes.
        assert_eq!(dec.next_frame().unwrap(), Some(Frame::HealthRequest));
    }

    fn raw(ty: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
        v.push(ty);
        v.extend_from_slice(payload);
        v
    }

    fn decode_one(bytes: &[u8]) -> Result<Option<Frame>, WireError> {
        let mut dec = Decoder::default();
        dec.push(bytes);
        dec.next_frame()
    }

    #[test]
    fn malformed_payloads() {
        for (ty, payload) in [
            (0x01u8, &b"{not json"[..]),
            (0x01, br#"{"v":1,"op":"dance"}"#),
            (0x01, br#"{"v":1,"op":"chat"}"#),
            (0x01, br#"{"op":"chat","model":"m","messages":[]}"#),
            (0x01, br#"{"v":"1","op":"chat","model":"m","messages":[]}"#),
            (0x02, &[0xff, 0xfe][..]),
            (0x03, br#"{"prompt_tokens":-1,"completion_tokens":0}"#),
            (0x04, br#"{"finish_reason":"bored"}"#),
            (0x05, br#"{"code":"nope","message":""}"#),
            (0x06, b"[]"),
            (0x07, b"x"),
            (0x08, b""),
        ] {
            let err = decode_one(&raw(ty, payload)).unwrap_err();
            assert!(matches!(err, WireError::Malformed { .. }), "type {ty:#x}: {err:?}");
            assert_eq!(err.code(), ErrorCode::MalformedFrame);
        }
    }

    #[test]
    fn unknown_version_is_its_own_error_even_if_the_body_is_unknown() {
        let err = decode_one(&raw(0x01, br#"{"v":2,"op":"teleport"}"#)).unwrap_err();
        assert_eq!(err, WireError::UnsupportedVersion { version: 2 });
        assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
        let ok = decode_one(&raw(0x01, br#"{"v":1,"op":"embed","model":"e","input":["x"]}"#)).unwrap();
        assert!(matches!(ok, Some(Frame::Request(_))));
    }

    #[test]
    fn truncated_at_end() {
        let bytes = Frame::Delta("hello".into()).encode();
        let mut dec = Decoder::default();
        dec.push(&bytes[..2]);
        assert_eq!(dec.finish().unwrap_err(), WireError::Truncated { have: 2, need: 4 });
        dec.push(&bytes[2..7]);
        assert_eq!(dec.next_frame().unwrap(), None);
        assert_eq!(dec.wanted(), bytes.len() - 7);
        assert_eq!(dec.finish().unwrap_err(), WireError::Truncated { have: 7, need: bytes.len() });
        assert_eq!(dec.finish().unwrap_err().code(), ErrorCode::MalformedFrame);
    }
}
