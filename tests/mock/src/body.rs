//! Response bodies: plain JSON, SSE streams, and the failure modes
//! (abort mid-body, stall) that [`Behavior`] asks for.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use crate::Behavior;

/// The body type of every response the mock sends.
pub(crate) type MockBody = UnsyncBoxBody<Bytes, io::Error>;

/// How a body ends after its frames.
enum Tail {
    /// Ends cleanly.
    End,
    /// Errors out, which makes hyper abort the connection.
    Abort,
    /// Never ends.
    Stall,
    /// Sends these frames over and over, each `gap` after the one before, without end.
    Repeat(Vec<Bytes>, Duration),
}

fn frames_body(frames: Vec<Bytes>, tail: Tail) -> MockBody {
    paced_body(frames, 0..0, Duration::ZERO, tail)
}

/// A body of `frames`, each of those at an index in `paced` sent `gap` after the one before.
fn paced_body(frames: Vec<Bytes>, paced: std::ops::Range<usize>, gap: Duration, tail: Tail) -> MockBody {
    let head = stream::iter(frames.into_iter().enumerate()).then(move |(i, b)| {
        let wait = paced.contains(&i);
        async move {
            if wait {
                tokio::time::sleep(gap).await;
            }
            Ok(Frame::data(b))
        }
    });
    match tail {
        Tail::End => StreamBody::new(head).boxed_unsync(),
        Tail::Abort => StreamBody::new(head.chain(stream::once(async {
            // Give hyper a chance to flush what was written before the abort.
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            Err(io::Error::new(io::ErrorKind::ConnectionAborted, "meridian-mock: connection cut"))
        })))
        .boxed_unsync(),
        Tail::Stall => StreamBody::new(head.chain(stream::pending())).boxed_unsync(),
        Tail::Repeat(frames, gap) => {
            let forever = stream::iter(frames.into_iter().cycle()).then(move |b| async move {
                tokio::time::sleep(gap).await;
                Ok(Frame::data(b))
            });
            StreamBody::new(head.chain(forever)).boxed_unsync()
        }
    }
}

fn full(b: Bytes) -> MockBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A complete JSON response.
pub(crate) fn json(status: u16, body: Vec<u8>) -> Response<MockBody> {
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status_code(status);
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A successful non-streamed JSON reply, honouring `CutAfter` / `StallAfter`
/// (head plus half of the body, then abort / stall).
pub(crate) fn json_reply(body: Vec<u8>, behavior: &Behavior) -> Response<MockBody> {
    let tail = match behavior {
        Behavior::CutAfter(_) => Tail::Abort,
        Behavior::StallAfter(_) => Tail::Stall,
        _ => return json(200, body),
    };
    let len = body.len();
    let half = Bytes::from(body).slice(..len / 2);
    let mut resp = Response::new(frames_body(vec![half], tail));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// The events of one streamed reply, grouped so that behaviours can cut it.
pub(crate) struct Sse {
    /// Events sent before any content (not counted).
    pub preamble: Vec<Bytes>,
    /// Content (delta) events, counted by `CutAfter` & co.
    pub content: Vec<Bytes>,
    /// Events after the content (finish, usage, `[DONE]` / `message_stop`).
    pub terminal: Vec<Bytes>,
    /// The API's own keep-alive event, for `KeepAliveAfter`.
    pub keep_alive: Bytes,
    /// A content event whose text is [`BAD_UTF8`], for `BadUtf8`.
    pub bad_utf8: Bytes,
}

/// The text of the content event `BadUtf8` sends, which [`sse_reply`] replaces with bytes that
/// are not UTF-8 once the event is serialized.
pub(crate) const BAD_UTF8: &str = "meridian-mock-bad-utf8";

/// `event` with [`BAD_UTF8`] replaced by a byte sequence that is not UTF-8.
fn corrupt(event: &[u8]) -> Bytes {
    let mark = BAD_UTF8.as_bytes();
    let at = event.windows(mark.len()).position(|w| w == mark).expect("the event carries the mark");
    [&event[..at], b"\xff\xfe".as_slice(), &event[at + mark.len()..]].concat().into()
}

/// An SSE response for `sse`, shaped by `behavior`. `error_event` builds the
/// API's in-stream error event (only called for `StreamError`).
pub(crate) fn sse_reply(sse: Sse, behavior: &Behavior, error_event: impl FnOnce() -> Bytes) -> Response<MockBody> {
    let Sse { mut preamble, mut content, terminal, keep_alive, bad_utf8 } = sse;
    let (n, tail) = match behavior {
        Behavior::CutAfter(n) => (*n, Tail::Abort),
        Behavior::StallAfter(n) => (*n, Tail::Stall),
        Behavior::StreamError(n) => (*n, Tail::End),
        Behavior::KeepAliveAfter(n) => {
            let comment = Bytes::from_static(b": keep-alive\n\n");
            (*n, Tail::Repeat(vec![comment, keep_alive], Duration::from_millis(10)))
        }
        Behavior::Endless { gap } => (0, Tail::Repeat(content.clone(), *gap)),
        Behavior::EndlessLine => {
            let piece = Bytes::from(vec![b'x'; 1024]);
            (0, Tail::Repeat(vec![piece], Duration::from_millis(1)))
        }
        _ => (usize::MAX, Tail::End),
    };
    content.truncate(n);
    match behavior {
        Behavior::BadUtf8 => content.insert(0, corrupt(&bad_utf8)),
        Behavior::EndlessLine => content.push(Bytes::from_static(b"data: {\"")),
        _ => {}
    }
    // `Say` paces the content events after the first; `SlowFirstToken` the first.
    let (gap, paced) = match behavior {
        Behavior::Say { gap, .. } if !gap.is_zero() => (*gap, preamble.len() + 1..preamble.len() + content.len()),
        Behavior::SlowFirstToken(wait) => (*wait, preamble.len()..preamble.len() + 1),
        _ => (Duration::ZERO, 0..0),
    };
    preamble.append(&mut content);
    match behavior {
        Behavior::StreamError(_) => preamble.push(error_event()),
        Behavior::CutAfter(_)
        | Behavior::StallAfter(_)
        | Behavior::KeepAliveAfter(_)
        | Behavior::Endless { .. }
        | Behavior::EndlessLine => {}
        _ => preamble.extend(terminal),
    }
    let mut resp = Response::new(paced_body(preamble, paced, gap, tail));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Formats `data: <json>\n\n`.
pub(crate) fn data_event(json: &impl serde::Serialize) -> Bytes {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut out, json).expect("serializing to a Vec cannot fail");
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Formats `event: <name>\ndata: <json>\n\n`.
pub(crate) fn named_event(name: &str, json: &impl serde::Serialize) -> Bytes {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    serde_json::to_writer(&mut out, json).expect("serializing to a Vec cannot fail");
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}
