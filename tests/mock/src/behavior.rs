//! Injected per-request behaviours and the queue that hands them out.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// How the mock answers one API request.
///
/// Behaviours are queued with [`MockUpstream::push`](crate::MockUpstream::push);
/// each request to an API path (`/v1/chat/completions`, `/v1/messages`) pops
/// the front of the queue, and an empty queue means [`Behavior::Normal`].
/// Requests to unknown paths do not pop behaviours.
///
/// "Content events" below are the text / tool-argument delta events of a
/// streamed reply; the stream preamble (OpenAI role chunk and tool-call header
/// chunk, Anthropic `message_start` / `content_block_start` / `ping`) is always
/// sent before counting starts.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// Answer normally.
    Normal,
    /// Reply with this HTTP status and an error body in the API's own shape
    /// (e.g. 429 `rate_limit_error`, 500 `api_error`/`server_error`,
    /// 503/529 `overloaded_error` for Anthropic). Applied before the API key
    /// and request validation.
    Status(u16),
    /// Wait this long before sending the response head, then answer normally.
    Delay(Duration),
    /// Read the request, then never answer (the connection stays open).
    Hang,
    /// Streamed: send the response head, the preamble and `N` content events,
    /// then abort the connection without the terminal events
    /// (`[DONE]` / `message_stop`). Non-streamed: send the head (with the full
    /// `content-length`) and half of the body, then abort.
    CutAfter(usize),
    /// Streamed: send the preamble and `N` content events, then send nothing
    /// more while keeping the connection open. Non-streamed: send the head and
    /// half of the body, then stall.
    StallAfter(usize),
    /// Streamed: after `N` content events send the API's in-stream error event
    /// (Anthropic `event: error`, OpenAI `data: {"error":{..}}`) and end the
    /// stream. Non-streamed: answered like `Status(500)`.
    StreamError(usize),
    /// Answer with this text instead of the usual reply (echo, tool call or
    /// tool result): the concatenation of `pieces`, as a text reply whatever
    /// the request asked for. Streamed, each piece is one content event, and
    /// every content event after the first is sent `gap` after the one before
    /// it, so that a client reads them as separate chunks (a text split
    /// mid-word, say). `max_tokens` counts pieces, as for the usual reply.
    Say {
        /// The reply's text, in the pieces it streams in.
        pieces: Vec<String>,
        /// The pause before each content event after the first.
        gap: Duration,
    },
    /// Answer normally, but say that the provider's prompt cache served `read` prompt tokens and
    /// took `write` more, besides the request's own (uncached) prompt tokens, in each API's usage
    /// (whole, and streamed where the usage is):
    /// * OpenAI: `prompt_tokens` = own + `read` + `write`, `prompt_tokens_details.cached_tokens` =
    ///   `read` (OpenAI reports no cache writes; they are ordinary prompt tokens there);
    /// * Anthropic: `input_tokens` = own, `cache_read_input_tokens` = `read`,
    ///   `cache_creation_input_tokens` = `write` (in `message_start` when streamed).
    PromptCache {
        /// Prompt tokens read from the cache.
        read: u64,
        /// Prompt tokens written to the cache.
        write: u64,
    },
    /// Streamed: send the preamble and `N` content events, then keep-alives without end (an SSE
    /// comment, and the API's own: OpenAI an empty `data: {}` chunk, Anthropic a `ping` event),
    /// one every 10 ms. Non-streamed: answered normally.
    KeepAliveAfter(usize),
    /// Streamed: send the preamble, then the reply's content events over and over without end,
    /// each `gap` after the one before. Non-streamed: answered normally.
    Endless {
        /// The pause before each content event.
        gap: Duration,
    },
    /// Streamed: send the preamble, then a `data:` line that grows by 1 KiB every millisecond
    /// and never ends. Non-streamed: answered normally.
    EndlessLine,
    /// Streamed: send the preamble, then a content event whose text is not valid UTF-8, then the
    /// reply. Non-streamed: answered normally.
    BadUtf8,
    /// Streamed: send the preamble, then wait this long before the first content event; the rest
    /// follows at once. Non-streamed: answered normally.
    SlowFirstToken(Duration),
    /// Streamed: the whole reply and its end marker (`[DONE]` / `message_stop`), but no finish
    /// reason (OpenAI: no `finish_reason` chunk; Anthropic: `message_delta` with a `null`
    /// `stop_reason`). Non-streamed: answered normally.
    NoFinish,
}

impl Behavior {
    /// The prompt tokens the provider's cache read and wrote, (`read`, `write`).
    pub(crate) fn prompt_cache(&self) -> (u64, u64) {
        match *self {
            Behavior::PromptCache { read, write } => (read, write),
            _ => (0, 0),
        }
    }
}

/// A FIFO of behaviours; the empty case is answered without taking the lock.
#[derive(Default)]
pub(crate) struct BehaviorQueue {
    len: AtomicUsize,
    queue: Mutex<VecDeque<Behavior>>,
}

impl BehaviorQueue {
    pub(crate) fn push(&self, b: Behavior) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.push_back(b);
        self.len.store(q.len(), Ordering::Release);
    }

    pub(crate) fn pop(&self) -> Behavior {
        if self.len.load(Ordering::Acquire) == 0 {
            return Behavior::Normal;
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let b = q.pop_front();
        self.len.store(q.len(), Ordering::Release);
        b.unwrap_or(Behavior::Normal)
    }

    pub(crate) fn clear(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.clear();
        self.len.store(0, Ordering::Release);
    }
}
