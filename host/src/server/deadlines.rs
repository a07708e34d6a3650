//! Deadlines on clients that stop reading (`node.client_write_timeout_ms`). A client that
//! stops taking its response holds, for as long as it likes, everything the response holds: the
//! upstream stream, the plugin instances of its tenant's filters, its tenant's place and the
//! node's. Two watches end that, each at the same limit:
//!
//! * [`WriteDeadline`], on the connection: a write that the peer takes no byte of within the
//!   limit fails, which ends the connection (an HTTP/1 client, or an HTTP/2 client that stopped
//!   reading its socket altogether);
//! * [`BodyDeadline`], on each response: a chunk handed to the connection must be followed by the
//!   connection asking for the next within the limit, so a client must take each chunk (a batch
//!   of stream events, usually a few hundred bytes) within it. This also covers an HTTP/2 client
//!   that reads its socket but keeps one stream's flow-control window shut (the connection then
//!   never writes, so only the stream shows the stall).
//!
//! Either way the response is dropped: the upstream is let go, the plugin slots and the permits
//! are released, and the request is recorded as `client_closed` (`edge::record`). Time spent
//! waiting for the answer itself (a slow upstream) is never counted: nothing waits on the client
//! then.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::debug;

use crate::edge::Body as EdgeBody;

/// An IO whose writes fail with `TimedOut` once the peer has taken none of the bytes written to
/// it for `limit`: a client that stops reading fills the socket's buffers and then holds its
/// response, and with it the upstream stream, the plugin instances and the tenant's place, for as
/// long as it likes. Failing the write ends the connection; hyper drops the response, which lets
/// all of that go and records the request as `client_closed` (`edge::record`). Every byte the
/// peer takes restarts the clock (a slow reader is judged per chunk by [`BodyDeadline`]). Time
/// waiting for the response (a slow upstream) is not counted: nothing is being written then.
pub(super) struct WriteDeadline<I> {
    io: I,
    limit: Duration,
    /// Armed when a write finds the peer's buffers full; dropped when a write goes through.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteDeadline<I> {
    pub(super) fn new(io: I, limit: Duration) -> Self {
        WriteDeadline { io, limit, stalled: None }
    }

    /// Passes a write's or a flush's outcome on, keeping the stall clock: one that waits starts
    /// it, or fails once it has run out; a write that is ready (bytes taken, or failed) stops it.
    /// A ready flush leaves it be: a socket's flush is ready whether or not the peer reads.
    fn watch<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>, write: bool) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            if write {
                self.stalled = None;
            }
            return polled;
        }
        let limit = self.limit;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took none of the response within the write timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteDeadline<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled, true)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled, true)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled, false)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A response body whose chunks the connection must keep asking for: once a chunk is handed over,
/// the next must be asked for within `limit`, or a watchdog task drops the body (letting go of
/// everything it holds) and the connection is told the response failed, so that HTTP/2 resets the
/// stream and HTTP/1 closes the connection rather than end the response as if it were whole.
///
/// The watchdog is started by the first chunk of a body that has more to come (a stream); a whole
/// answer, handed over in one chunk, never starts one.
pub(super) struct BodyDeadline {
    state: Arc<Mutex<Watched>>,
    limit: Duration,
    watchdog: Option<AbortHandle>,
}

/// What the response and its watchdog share.
struct Watched {
    /// The response, until it ends or is cut.
    body: Option<EdgeBody>,
    /// When the last chunk was handed over, while the next has not been asked for.
    handed: Option<Instant>,
    /// Whether the watchdog cut it.
    cut: bool,
}

impl BodyDeadline {
    pub(super) fn new(body: EdgeBody, limit: Duration) -> Self {
        let state = Arc::new(Mutex::new(Watched { body: Some(body), handed: None, cut: false }));
        BodyDeadline { state, limit, watchdog: None }
    }

    fn watch(&mut self) {
        let state = Arc::downgrade(&self.state);
        let limit = self.limit;
        let task = tokio::spawn(async move {
            loop {
                // Asleep for the rest of the limit of a chunk handed over, or a whole limit while
                // the response waits on its answer; the body's end ends the task.
                let wake = {
                    let Some(state) = state.upgrade() else { return };
                    let w = state.lock().unwrap_or_else(PoisonError::into_inner);
                    if w.body.is_none() {
                        return;
                    }
                    w.handed.unwrap_or_else(Instant::now) + limit
                };
                tokio::time::sleep_until(wake).await;
                let Some(state) = state.upgrade() else { return };
                let cut = {
                    let mut w = state.lock().unwrap_or_else(PoisonError::into_inner);
                    match w.handed {
                        Some(handed) if handed.elapsed() >= limit => {
                            w.cut = true;
                            w.body.take()
                        }
                        _ => None,
                    }
                };
                if let Some(body) = cut {
                    debug!(?limit, "the client asked for no more of its response within the write timeout: cut");
                    // Outside the lock: dropping the response accounts the request.
                    drop(body);
                    return;
                }
            }
        });
        self.watchdog = Some(task.abort_handle());
    }
}

impl Body for BodyDeadline {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let (polled, more) = {
            let mut w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            w.handed = None;
            let Some(body) = w.body.as_mut() else {
                let cut = w.cut.then(|| io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading"));
                return Poll::Ready(cut.map(Err));
            };
            let polled = match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    let ended = w.body.take();
                    drop(w);
                    drop(ended);
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Pending => return Poll::Pending,
            };
            let more = w.body.as_ref().is_some_and(|b| !b.is_end_stream());
            if more {
                w.handed = Some(Instant::now());
            }
            (polled, more)
        };
        if more && self.watchdog.is_none() {
            self.watch();
        }
        Poll::Ready(Some(Ok(polled)))
    }

    fn is_end_stream(&self) -> bool {
        let w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        w.body.as_ref().is_none_or(|b| b.is_end_stream()) && !w.cut
    }

    fn size_hint(&self) -> SizeHint {
        let w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        w.body.as_ref().map_or_else(SizeHint::default, Body::size_hint)
    }
}

impl Drop for BodyDeadline {
    fn drop(&mut self) {
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_peer_that_reads_slowly_is_never_cut_and_one_that_stops_is() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = WriteDeadline::new(near, Duration::from_secs(2));
        // 64 bytes at a time with pauses: slow, but far within the limit.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                far.read_exact(&mut buf).await.unwrap();
            }
            far
        });
        io.write_all(&[7; 64 * 11]).await.expect("a slow reader takes it all");
        // Still connected, reading no more: the buffer is full and stays full.
        let _far = reader.await.unwrap();
        let write = tokio::time::timeout(Duration::from_secs(10), io.write_all(&[7; 128])).await;
        let err = write.expect("the write fails rather than waits").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
