//! A mock managed LLM API for end-to-end tests and benchmarks.
//!
//! This is **test support**, not a production feature. [`MockUpstream`] runs
//! a small hyper server on loopback that speaks the real wire formats of
//!
//! * OpenAI `POST /v1/chat/completions` (plain JSON and SSE streaming), and
//! * Anthropic `POST /v1/messages` (plain JSON and SSE streaming),
//!
//! including tool calls, usage accounting and each API's error shapes.
//! Replies are deterministic (`"Echo: <last user text>"`, a tool call to the
//! first tool, or `"Tool said: <tool result>"`), and failures can be injected
//! per request by queueing [`Behavior`]s — as can a given text streamed in
//! given pieces at a given pace ([`Behavior::Say`]).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use meridian_mock::{Behavior, MockUpstream};
//! let mock = MockUpstream::start().await?;
//! mock.push(Behavior::Status(429)); // the next API request gets a 429
//! let base = mock.url(); // e.g. "http://127.0.0.1:41234"
//! # let _ = base; Ok(()) }
//! ```

#![warn(missing_docs)]

mod anthropic;
mod behavior;
mod body;
mod openai;
mod received;
mod reply;
mod server;

pub use behavior::Behavior;
pub use received::Received;
pub use server::{MockOptions, MockUpstream};
