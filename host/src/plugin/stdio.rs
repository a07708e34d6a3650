//! Capped in-memory stdout and stderr for plugin instances.
//!
//! wasmtime-wasi's `MemoryOutputPipe` reports "closed" (or traps) once full, and a Rust guest's
//! `println!` panics on a closed stdout: printing too much would kill the call. This pipe keeps
//! the first `capacity` bytes, silently drops the rest and counts them, so a chatty plugin still
//! answers and its output is forwarded to the log after the call.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use super::bindings::{truncate, GuestIdentity};

/// How much the guest may write per `check-write` permit; it writes in chunks of this size.
const PERMIT: usize = 64 << 10;

#[derive(Default)]
struct Buffer {
    kept: Vec<u8>,
    dropped: usize,
}

/// A stdout or stderr that keeps the first `capacity` bytes and drops the rest.
#[derive(Clone)]
pub(crate) struct CappedPipe {
    capacity: usize,
    buffer: Arc<Mutex<Buffer>>,
}

impl CappedPipe {
    /// An empty pipe that keeps up to `capacity` bytes.
    pub fn new(capacity: usize) -> CappedPipe {
        CappedPipe { capacity, buffer: Arc::default() }
    }

    /// Drops whatever is kept, for the pipe's next call.
    pub fn clear(&self) {
        *self.buffer.lock().unwrap_or_else(PoisonError::into_inner) = Buffer::default();
    }

    fn push(&self, bytes: &[u8]) {
        // A poisoned lock only means another writer panicked mid-push; the bytes are still bytes.
        let mut buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        let room = self.capacity.saturating_sub(buffer.kept.len());
        let kept = room.min(bytes.len());
        buffer.kept.extend_from_slice(&bytes[..kept]);
        buffer.dropped += bytes.len() - kept;
    }

    /// Writes what the guest printed to the node's log, one event per line, at most `max_lines`
    /// lines each cut to the identity's line cap; reports how much was left out.
    pub fn forward(&self, guest: &GuestIdentity, stream: &'static str) {
        let buffer = std::mem::take(&mut *self.buffer.lock().unwrap_or_else(PoisonError::into_inner));
        if buffer.kept.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&buffer.kept);
        let (plugin, version) = (&*guest.name, &*guest.version);
        let mut lines = text.lines();
        for line in lines.by_ref().take(guest.max_log_lines as usize) {
            let line = truncate(line, guest.max_log_line_bytes);
            tracing::info!(target: "meridian::plugin::guest", plugin, version, stream, "{line}");
        }
        let lines_left = lines.count();
        if lines_left > 0 || buffer.dropped > 0 {
            guest.metrics.log_dropped(&guest.name, lines_left as u64);
            tracing::warn!(
                target: "meridian::plugin::guest",
                plugin,
                version,
                stream,
                lines_left,
                bytes_dropped = buffer.dropped,
                "plugin output capped"
            );
        }
    }

    /// The last lines written (at most three, blank lines and Rust's backtrace hint skipped),
    /// joined and cut to `max` bytes: a panicking Rust guest's location and message.
    pub fn tail(&self, max: usize) -> Option<String> {
        let buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        let text = String::from_utf8_lossy(&buffer.kept);
        let mut lines: Vec<&str> = text
            .lines()
            .rev()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
            .take(3)
            .collect();
        lines.reverse();
        (!lines.is_empty()).then(|| truncate(&lines.join(" | "), max).into_owned())
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always writable: what does not fit is dropped, never refused.
        Ok(PERMIT)
    }
}

impl AsyncWrite for CappedPipe {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::CappedPipe;

    #[test]
    fn keeps_the_first_bytes_and_counts_the_rest() {
        let pipe = CappedPipe::new(8);
        pipe.push(b"hello ");
        pipe.push(b"world\n");
        let buffer = pipe.buffer.lock().unwrap();
        assert_eq!(buffer.kept, b"hello wo");
        assert_eq!(buffer.dropped, 4);
    }

    #[test]
    fn tail_keeps_a_panic_message() {
        let pipe = CappedPipe::new(1024);
        assert_eq!(pipe.tail(100), None);
        pipe.push(b"a\nb\n\nthread '<unnamed>' panicked at src/lib.rs:3:5:\nboom\n");
        pipe.push(b"note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n");
        assert_eq!(pipe.tail(100).as_deref(), Some("b | thread '<unnamed>' panicked at src/lib.rs:3:5: | boom"));
    }
}
