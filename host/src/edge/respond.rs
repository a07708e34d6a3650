//! Phase 6 of the request path: the response. An answer, from a target or the cache, goes back
//! in the client's API shape: whole, or streamed event by event as it arrives. The tenant's
//! filters see the answer's text before any of it is sent, and put back what they redacted; a
//! miss fills the cache with the answer as it came from upstream, placeholders and all. A stream
//! that fails after its first byte ends with a typed error event, never a clean end. A stream
//! runs on its tenant's budget: before its text is sent, the request's hold must cover it, and
//! when the budget cannot extend the hold the stream ends with `budget_exhausted` and the
//! upstream is let go. The request's record is finished when the answer ends.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderMap, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use tokio::sync::mpsc::{self, error::TryRecvError};
use tracing::{debug, warn};

use super::admit::Permits;
use super::budget;
use super::cache::Outcome;
use super::context::Exchange;
use super::record::Record;
use super::Body;
use crate::api::{ApiShape, StreamEncoder};
use crate::cache::{CachedAnswer, FillGuard};
use crate::chain::{AnswerBatch, AnswerFilter};
use crate::chat::{estimate_tokens, ChatResponse, StreamEvent, Usage};
use crate::error::{GatewayError, UpstreamError};
use crate::upstream::EventStream;

/// An answer to a request, as the phases before the response found it.
pub(super) enum Answer {
    /// A stream, with the events read before the response began (sent first).
    Stream(Source, VecDeque<StreamEvent>),
    /// A whole answer.
    Whole(ChatResponse),
}

/// Sends the answer in the client's shape, with `x-meridian-target` (unless the cache answered)
/// and `x-meridian-cache`. The exchange ends here; its record is finished when the answer is. A
/// stream still running when `cut` resolves (the end of a shutdown's grace period) ends with a
/// `shutting_down` error event.
pub(super) async fn respond(
    cx: Exchange,
    answer: Answer,
    cut: impl Future<Output = ()> + Send + 'static,
) -> Response<Body> {
    let Exchange { request, mut answer_filter, cache, mut record, permit, .. } = cx;
    let api = record.api;
    let status = cache.outcome.status();
    let (fill, target) = match cache.outcome {
        Outcome::Miss(guard, limit) => (Some(Fill::new(guard, limit)), record.target.clone()),
        Outcome::Bypass => (None, record.target.clone()),
        Outcome::Hit => (None, None),
    };
    let response = match answer {
        Answer::Stream(source, head) => {
            let encoder = api.stream_encoder(&request);
            // A tenant that batches its filters' pieces waits on its streams with a deadline:
            // they are read by a task of their own (see `Source::Pumped`).
            let source = match source {
                Source::Upstream(stream) if answer_filter.as_ref().and_then(AnswerFilter::batch).is_some() => {
                    Source::pumped(stream)
                }
                source => source,
            };
            sse_response(ClientStream::new(source, head, encoder, fill, record, permit, answer_filter, Box::pin(cut)))
        }
        Answer::Whole(mut answer) => {
            if let Some(f) = &mut answer_filter {
                if let Err(e) = f.inspect(answer.text.as_deref().unwrap_or("")).await {
                    return record.refuse(e);
                }
            }
            let usage = answer.usage;
            let out_bytes = answer.output_len();
            if let Some(fill) = fill.filter(|f| f.admits(out_bytes)) {
                // Cached as it came, placeholders and all: a later identical (redacted) request
                // restores it with its own originals.
                fill.guard.fill(CachedAnswer::Whole(answer.clone())).await;
            }
            if let Some(f) = &answer_filter {
                f.restore_response(&mut answer);
            }
            record.finish("ok", usage, out_bytes);
            drop(permit);
            json_response(StatusCode::OK, api.encode_response(&answer))
        }
    };
    let response = match target {
        Some(target) => with_header(response, "x-meridian-target", &target),
        None => response,
    };
    with_header(response, "x-meridian-cache", status)
}

/// The client's `x-request-id` if it is sane (1 to 128 visible ASCII characters), else a new one.
pub(super) fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string)
}

pub(super) fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

/// A JSON response.
pub(super) fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A plain-text response.
pub(super) fn text_response(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// A Prometheus text exposition.
pub(super) fn metrics_response(body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    resp
}

/// An error in the client's API shape, with `retry-after` where it helps.
pub fn error_response(api: ApiShape, err: &GatewayError) -> Response<Body> {
    let mut resp = json_response(err.status(), api.error_body(err));
    if let Some(secs) = err.retry_after() {
        resp.headers_mut().insert("retry-after", HeaderValue::from(secs));
    }
    resp
}

/// The response with a header added, unless `value` cannot be a header value.
pub(super) fn with_header(mut resp: Response<Body>, name: &'static str, value: &str) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
    resp
}

fn sse_response(stream: ClientStream) -> Response<Body> {
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        s.next_chunk().await.map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), s))
    });
    let mut resp = Response::new(StreamBody::new(body).boxed_unsync());
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Events a pumped stream reads ahead of its client: backpressure stays, a slow client stalls
/// the upstream after this many.
const PUMP_DEPTH: usize = 64;

/// Where a client stream's events come from.
pub(super) enum Source {
    /// A target's stream.
    Upstream(Box<EventStream>),
    /// A target's stream read by a task of its own into a channel ([`Source::pumped`]), so that
    /// a wait for its next event can be given up (a batch's wait ending) without losing a
    /// half-read frame: [`EventStream::next`] is not cancel-safe, a channel's receive is.
    Pumped(mpsc::Receiver<Result<StreamEvent, UpstreamError>>),
    /// A cached answer, replayed.
    Replay(std::vec::IntoIter<StreamEvent>),
}

impl Source {
    /// `stream`, read ahead by a task that ends with it (after its end or its first error) or
    /// when the receiver is dropped (the client went away, or the stream failed), dropping the
    /// upstream then.
    fn pumped(mut stream: Box<EventStream>) -> Source {
        let (tx, rx) = mpsc::channel(PUMP_DEPTH);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    () = tx.closed() => return,
                };
                let Some(item) = item else { return };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Source::Pumped(rx)
    }

    async fn next(&mut self) -> Option<Result<StreamEvent, UpstreamError>> {
        match self {
            Source::Upstream(s) => s.next().await,
            Source::Pumped(rx) => rx.recv().await,
            Source::Replay(events) => events.next().map(Ok),
        }
    }

    /// What [`Source::next`] would return, if it is known without waiting.
    fn ready(&mut self) -> Option<Option<Result<StreamEvent, UpstreamError>>> {
        match self {
            Source::Upstream(s) => s.ready(),
            Source::Pumped(rx) => match rx.try_recv() {
                Ok(item) => Some(Some(item)),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => Some(None),
            },
            Source::Replay(events) => Some(events.next().map(Ok)),
        }
    }
}

/// Adds what a source gave to `batch`; `Some` with how the stream ended when it did.
fn absorb(
    item: Option<Result<StreamEvent, UpstreamError>>,
    batch: &mut Vec<StreamEvent>,
) -> Option<Result<(), GatewayError>> {
    match item {
        Some(Ok(ev)) => {
            batch.push(ev);
            None
        }
        None => Some(Ok(())),
        Some(Err(e)) => Some(Err(GatewayError::Upstream(e))),
    }
}

/// The answer text in `events`: what the filters are shown.
fn text_len(events: &[StreamEvent]) -> usize {
    events.iter().map(|e| if let StreamEvent::Text(t) = e { t.len() } else { 0 }).sum()
}

/// The right to fill the cache's entry with an answer, while the answer is under the entry
/// limit; with a stream's events so far.
struct Fill {
    guard: FillGuard,
    limit: usize,
    events: Vec<StreamEvent>,
    bytes: usize,
}

impl Fill {
    fn new(guard: FillGuard, limit: usize) -> Fill {
        Fill { guard, limit, events: Vec::new(), bytes: 0 }
    }

    /// Whether an answer of `bytes` of content fits an entry.
    fn admits(&self, bytes: usize) -> bool {
        bytes <= self.limit
    }

    /// Keeps a stream's event for the entry; false when the answer has outgrown it, and nothing
    /// more should be kept.
    fn keep(&mut self, ev: &StreamEvent) -> bool {
        self.bytes = self.bytes.saturating_add(ev.content_len());
        if !self.admits(self.bytes) {
            return false;
        }
        self.events.push(ev.clone());
        true
    }
}

/// A streamed answer on its way to the client: encodes each event as it arrives, records the
/// events for the cache, and accounts when it ends. A failure after the first byte ends the
/// stream with a typed error event, never a clean end.
struct ClientStream {
    source: Source,
    /// Events read before the response began, sent first.
    head: VecDeque<StreamEvent>,
    encoder: StreamEncoder,
    /// Filling the cache, until the answer outgrows an entry: it is streamed on, uncached.
    fill: Option<Fill>,
    answer_filter: Option<AnswerFilter>,
    record: Record,
    usage: Option<Usage>,
    out_bytes: usize,
    finished: bool,
    /// Resolves when a shutdown's grace period has ended: the stream ends with `shutting_down`.
    cut: Pin<Box<dyn Future<Output = ()> + Send>>,
    _permit: Permits,
}

impl ClientStream {
    // Each is a part of the exchange the stream takes over; a struct of them would be this one.
    #[allow(clippy::too_many_arguments)]
    fn new(
        source: Source,
        head: VecDeque<StreamEvent>,
        encoder: StreamEncoder,
        fill: Option<Fill>,
        record: Record,
        permit: Permits,
        answer_filter: Option<AnswerFilter>,
        cut: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Self {
        ClientStream {
            source,
            head,
            encoder,
            fill,
            answer_filter,
            record,
            usage: None,
            out_bytes: 0,
            finished: false,
            cut,
            _permit: permit,
        }
    }

    /// The next body chunk: the next event and every event already received behind it, so that
    /// a burst from upstream (or a whole cached replay) goes out in one write. The filters see
    /// the chunk's text before any of it is sent.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        let mut batch = Vec::new();
        let first = match self.head.pop_front() {
            Some(ev) => Some(Ok(ev)),
            None => {
                let cut = &mut self.cut;
                let next = tokio::select! {
                    next = self.source.next() => Some(next),
                    () = cut => None,
                };
                match next {
                    Some(next) => next,
                    None => {
                        let mut out = BytesMut::new();
                        self.fail(GatewayError::ShuttingDown, &mut out);
                        return Some(out.freeze());
                    }
                }
            }
        };
        let since = Instant::now();
        let mut end = absorb(first, &mut batch);
        while end.is_none() {
            let next = match self.head.pop_front() {
                Some(ev) => Some(Ok(ev)),
                None => match self.source.ready() {
                    Some(item) => item,
                    None => break,
                },
            };
            end = absorb(next, &mut batch);
        }
        if let (None, Some(wait)) = (&end, self.answer_filter.as_ref().and_then(AnswerFilter::batch)) {
            end = self.gather(&mut batch, wait, since).await;
        }
        let mut out = BytesMut::new();
        if let Err(e) = self.cover(&batch).await {
            self.fail(e, &mut out);
            return Some(out.freeze());
        }
        if let Some(filter) = &mut self.answer_filter {
            let text: String = batch
                .iter()
                .filter_map(|e| match e {
                    StreamEvent::Text(t) => Some(t.as_str()),
                    _ => None,
                })
                .collect();
            // Every chunk of this answer goes to the same filter instances, in order.
            if let Err(e) = filter.inspect(&text).await {
                self.fail(e, &mut out);
                return Some(out.freeze());
            }
        }
        for ev in batch {
            self.event(ev, &mut out);
        }
        match end {
            None => {}
            Some(Ok(())) => {
                self.finished = true;
                self.encoder.finish(&mut out);
                if let Some(fill) = self.fill.take() {
                    fill.guard.fill(CachedAnswer::Stream(fill.events)).await;
                }
                self.record.finish("ok", self.usage, self.out_bytes);
            }
            Some(Err(e)) => self.fail(e, &mut out),
        }
        Some(out.freeze())
    }

    /// Waits for more of a pumped stream while `batch` has less text than the tenant's batch
    /// size, up to its wait after `since` (when the batch's first event came); returns how the
    /// stream ended, if it did meanwhile. Any other source is not waited on: its reads cannot be
    /// given up safely.
    async fn gather(
        &mut self,
        batch: &mut Vec<StreamEvent>,
        wait: AnswerBatch,
        since: Instant,
    ) -> Option<Result<(), GatewayError>> {
        if !matches!(self.source, Source::Pumped(_)) {
            return None;
        }
        let deadline = tokio::time::Instant::from_std(since + wait.max_wait);
        let mut text = text_len(batch);
        while text < wait.max_bytes {
            let next = tokio::time::timeout_at(deadline, self.source.next()).await.ok()?;
            let known = batch.len();
            if let Some(end) = absorb(next, batch) {
                return Some(end);
            }
            text += text_len(&batch[known..]);
        }
        None
    }

    /// Extends the request's budget hold to cover the answer with `batch` sent: the prompt and
    /// the output's tokens as its record would count them were it to end after it. Nothing of a
    /// batch the budget cannot cover is sent.
    async fn cover(&mut self, batch: &[StreamEvent]) -> Result<(), GatewayError> {
        let Some(hold) = &mut self.record.hold else { return Ok(()) };
        let out_bytes = self.out_bytes + batch.iter().map(StreamEvent::content_len).sum::<usize>();
        let output = if out_bytes == 0 { 0 } else { estimate_tokens(out_bytes) };
        let tokens = u64::from(self.record.prompt_tokens) + u64::from(output);
        hold.cover(tokens).await.map_err(|refused| budget::refused_error(&self.record.tenant, refused))
    }

    /// Ends the stream with a typed error event; nothing of it is cached, and the upstream
    /// stream, if any, is let go at once.
    fn fail(&mut self, err: GatewayError, out: &mut BytesMut) {
        self.finished = true;
        self.source = Source::Replay(Vec::new().into_iter());
        warn!(request_id = %self.record.request_id, error = %err, "stream ended early after its first byte");
        self.encoder.error(&err, out);
        self.fill = None;
        let status = if matches!(err, GatewayError::Upstream(_)) { "stream_error" } else { err.code() };
        self.record.finish(status, self.usage, self.out_bytes);
    }

    fn event(&mut self, ev: StreamEvent, out: &mut BytesMut) {
        let content = ev.content_len();
        if content > 0 && self.out_bytes == 0 {
            self.record.first_token();
        }
        self.out_bytes += content;
        if let StreamEvent::Usage(u) = ev {
            self.usage = Some(u);
        }
        // Cached as it came from upstream, placeholders and all. Dropping the fill past the
        // entry limit lets an identical request waiting on this one call upstream itself.
        if self.fill.as_mut().is_some_and(|fill| !fill.keep(&ev)) {
            debug!(request_id = %self.record.request_id, "the answer outgrew a cache entry: streamed uncached");
            self.fill = None;
        }
        match &mut self.answer_filter {
            Some(filter) => {
                let mut restored = Vec::with_capacity(1);
                filter.restore_event(ev, &mut restored);
                restored.iter().for_each(|e| self.encoder.event(e, out));
            }
            None => self.encoder.event(&ev, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_for(value: Option<&[u8]>) -> String {
        let mut headers = HeaderMap::new();
        if let Some(v) = value {
            headers.insert("x-request-id", HeaderValue::from_bytes(v).unwrap());
        }
        request_id(&headers)
    }

    fn is_new(id: &str) -> bool {
        uuid::Uuid::parse_str(id).is_ok_and(|u| u.get_version_num() == 4)
    }

    #[test]
    fn a_sane_request_id_is_kept() {
        assert_eq!(id_for(Some(b"req-42")), "req-42");
        assert_eq!(id_for(Some(b"a/b:c=d_e.f~!")), "a/b:c=d_e.f~!", "any visible ASCII");
        let longest = "x".repeat(128);
        assert_eq!(id_for(Some(longest.as_bytes())), longest);
    }

    #[test]
    fn anything_else_is_replaced() {
        assert!(is_new(&id_for(None)), "none sent");
        assert!(is_new(&id_for(Some(b""))), "empty");
        assert!(is_new(&id_for(Some("x".repeat(129).as_bytes()))), "too long");
        assert!(is_new(&id_for(Some(b"two words"))), "a space is not visible");
        assert!(is_new(&id_for(Some(b"tab\there"))), "nor a control character");
        assert!(is_new(&id_for(Some("caf\u{e9}".as_bytes()))), "nor non-ASCII");
        assert_ne!(id_for(None), id_for(None), "a new one each time");
    }
}
