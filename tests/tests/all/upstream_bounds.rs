//! Every upstream is bounded: a bad upstream can neither hang a request nor grow the edge without
//! bound. Each bound of a target (time to first token, time between events that carry something,
//! the whole answer's time, the stream's bytes, one event's bytes, UTF-8) is breached by the mock
//! on purpose. Before the first byte reaches the client a breach is a failed attempt, and the
//! next target answers; after it, the stream ends with a typed error event. A stream without a
//! finish reason is an error and is never cached (nor does it end cleanly while the filters hold
//! back a possible placeholder); an answer larger than a cache entry is streamed whole and not
//! cached.
//!
//! Bounds are short (hundreds of milliseconds) and the tests assert on what the client got, never
//! on how long it took. `TestEdge::send` gives up after 20 s: on a node without these bounds the
//! requests below would never end.

use bytes::Bytes;
use meridian::config::{Config, PluginKind};
use meridian_e2e::{add_plugin, metric, Behavior, ConfigExt, Mocks, Reply, TempDir, TestEdge, ACME_KEY};
use serde_json::{json, Value};
use std::time::Duration;

const CHAT: &str = "/v1/chat/completions";
const PROMPT: &str = "alpha beta gamma delta epsilon zeta";

/// A request for `model`, streamed; deterministic (so cacheable) when `cacheable`.
fn chat(model: &str, cacheable: bool) -> Value {
    let mut body = json!({"model": model, "stream": true, "messages": [{"role": "user", "content": PROMPT}]});
    if cacheable {
        body["temperature"] = json!(0);
    }
    body
}

async fn start(mocks: &Mocks, tweak: impl FnOnce(&mut Config)) -> TestEdge {
    let mut config = mocks.config();
    tweak(&mut config);
    TestEdge::start(config).await
}

/// The OpenAI-shaped answer came whole from `target`, with no error.
fn assert_answered_by(r: &Reply, target: &str) {
    assert_eq!(r.answer_text(), format!("Echo: {PROMPT}"), "{}", r.text());
    assert_eq!(r.header("x-meridian-target"), Some(target), "{}", r.text());
}

/// The OpenAI stream began (status 200, some content) and ended with one typed error event of
/// `kind` and no `[DONE]`; returns the content that was sent.
fn assert_broken_stream(r: &Reply, kind: &str) -> String {
    assert_eq!(r.status, 200, "the stream had begun: {}", r.text());
    assert!(r.events().iter().all(|e| e.data != "[DONE]"), "a broken stream never ends cleanly: {}", r.text());
    let chunks = r.event_json();
    let last = chunks.last().expect("events");
    assert_eq!(last["error"]["type"], kind, "a typed error event ends the stream: {last}");
    assert_eq!(chunks.iter().filter(|c| c.get("error").is_some()).count(), 1, "{}", r.text());
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(!text.is_empty(), "content was sent before the breach: {}", r.text());
    text
}

/// How many attempts at `target` ended as `outcome`.
async fn attempts(edge: &TestEdge, target: &str, outcome: &str) -> f64 {
    let m = edge.metrics().await;
    let (target, outcome) = (format!("target=\"{target}\""), format!("outcome=\"{outcome}\""));
    metric(&m, "meridian_upstream_attempts_total", &[&target, &outcome])
}

#[tokio::test]
async fn a_first_token_later_than_its_limit_falls_back_to_the_next_target() {
    let mocks = Mocks::start().await;
    let edge = start(&mocks, |c| {
        // The chunk timeout alone would wait for the slow token: only the first-token limit can
        // give up on it.
        let oa = c.target_mut("oa");
        oa.chunk_timeout_ms = 10_000;
        oa.first_token_timeout_ms = 200;
    })
    .await;
    mocks.openai.push(Behavior::SlowFirstToken(Duration::from_secs(5)));
    let r = edge.post(CHAT, ACME_KEY, &chat("fallback", false)).await;
    assert_answered_by(&r, "oa2");
    assert_eq!(attempts(&edge, "oa", "timeout").await, 1.0);
}

#[tokio::test]
async fn keep_alives_before_any_content_hold_off_neither_the_first_token_nor_the_chunk_timeout() {
    // A response head, a role chunk, then `data: {}` and comments every 10 ms without end: far
    // more often than either timeout. Each timeout alone ends the attempt: the keep-alives are
    // neither a first token nor progress.
    let cases = [("first token", 200, 10_000), ("stream chunk", 300_000, 200)];
    for (what, first_token_ms, chunk_ms) in cases {
        let mocks = Mocks::start().await;
        let edge = start(&mocks, |c| {
            let oa = c.target_mut("oa");
            oa.first_token_timeout_ms = first_token_ms;
            oa.chunk_timeout_ms = chunk_ms;
        })
        .await;
        mocks.openai.push(Behavior::KeepAliveAfter(0));
        let r = edge.post(CHAT, ACME_KEY, &chat("fallback", false)).await;
        assert_answered_by(&r, "oa2");
        assert_eq!(attempts(&edge, "oa", "timeout").await, 1.0, "{what}");
    }

    // Anthropic's `ping` events are keep-alives too.
    let mocks = Mocks::start().await;
    let edge = start(&mocks, |c| {
        c.target_mut("an").first_token_timeout_ms = 200;
        c.models.push(meridian_e2e::model("claude-then-gpt", &[("an", Some("claude-haiku-4-5")), ("oa", None)]));
    })
    .await;
    mocks.anthropic.push(Behavior::KeepAliveAfter(0));
    let r = edge.post(CHAT, ACME_KEY, &chat("claude-then-gpt", false)).await;
    assert_answered_by(&r, "oa");
}

#[tokio::test]
async fn keep_alives_after_content_do_not_hold_off_the_chunk_timeout() {
    // Comments and `data: {}` from OpenAI; comments and `ping` events from Anthropic.
    for (model, mock) in [("gpt-test", "openai"), ("claude-test", "anthropic")] {
        let mocks = Mocks::start().await;
        let edge = start(&mocks, |c| c.set_timeouts(1000, 200)).await;
        let upstream = if mock == "openai" { &mocks.openai } else { &mocks.anthropic };
        upstream.push(Behavior::KeepAliveAfter(1));
        let r = edge.post(CHAT, ACME_KEY, &chat(model, false)).await;
        let text = assert_broken_stream(&r, "timeout_error");
        assert_eq!(text, "Echo: ", "{model}: the one piece sent before the keep-alives");
    }
}

#[tokio::test]
async fn a_stream_past_its_whole_time_ends_with_a_typed_error() {
    let mocks = Mocks::start().await;
    // Content every 20 ms keeps every other timer happy.
    let edge = start(&mocks, |c| c.target_mut("oa").total_timeout_ms = 300).await;
    mocks.openai.push(Behavior::Endless { gap: Duration::from_millis(20) });
    let r = edge.post(CHAT, ACME_KEY, &chat("gpt-test", false)).await;
    assert_broken_stream(&r, "timeout_error");
    assert_eq!(mocks.request_counts(), [1, 0, 0]);
}

#[tokio::test]
async fn a_stream_past_its_byte_limit_ends_with_a_typed_error() {
    let mocks = Mocks::start().await;
    let edge = start(&mocks, |c| {
        let oa = c.target_mut("oa");
        oa.max_stream_bytes = 16 << 10;
        oa.max_event_bytes = 4 << 10;
    })
    .await;
    mocks.openai.push(Behavior::Endless { gap: Duration::from_millis(1) });
    let r = edge.post(CHAT, ACME_KEY, &chat("gpt-test", false)).await;
    let text = assert_broken_stream(&r, "upstream_error");
    assert!(text.len() < 16 << 10, "no more content than the stream's limit: {} bytes", text.len());
    let m = edge.metrics().await;
    assert_eq!(metric(&m, "meridian_requests_total", &["tenant=\"acme\"", "status=\"stream_error\""]), 1.0);
}

#[tokio::test]
async fn a_line_that_never_ends_is_cut_at_the_event_limit_and_falls_back() {
    let mocks = Mocks::start().await;
    let edge = start(&mocks, |c| c.target_mut("oa").max_event_bytes = 8 << 10).await;
    mocks.openai.push(Behavior::EndlessLine);
    let r = edge.post(CHAT, ACME_KEY, &chat("fallback", false)).await;
    assert_answered_by(&r, "oa2");
    assert_eq!(attempts(&edge, "oa", "too_large").await, 1.0);
}

#[tokio::test]
async fn invalid_utf8_is_a_protocol_error_not_replacement_characters() {
    let mocks = Mocks::start().await;
    let edge = start(&mocks, |_| {}).await;
    mocks.openai.push(Behavior::BadUtf8);
    let r = edge.post(CHAT, ACME_KEY, &chat("fallback", false)).await;
    assert_answered_by(&r, "oa2");
    assert!(!r.text().contains('\u{fffd}'), "{}", r.text());
    assert_eq!(attempts(&edge, "oa", "protocol").await, 1.0);
}

#[tokio::test]
async fn a_stream_without_a_finish_reason_is_an_error_and_is_not_cached() {
    // OpenAI: `[DONE]` without a `finish_reason`.
    let mocks = Mocks::start().await;
    let edge = start(&mocks, |_| {}).await;
    mocks.openai.push(Behavior::NoFinish);
    let r = edge.post(CHAT, ACME_KEY, &chat("gpt-test", true)).await;
    assert_eq!(assert_broken_stream(&r, "upstream_error"), format!("Echo: {PROMPT}"));
    let m = edge.metrics().await;
    assert_eq!(metric(&m, "meridian_requests_total", &["tenant=\"acme\"", "status=\"stream_error\""]), 1.0);
    // Not cached: the same request goes upstream again, and this time it is whole.
    let r = edge.post(CHAT, ACME_KEY, &chat("gpt-test", true)).await;
    assert_answered_by(&r, "oa");
    assert_eq!(r.header("x-meridian-cache"), Some("miss"));
    assert_eq!(mocks.request_counts(), [2, 0, 0]);

    // Anthropic: `message_stop` after a `message_delta` with no `stop_reason`, to an Anthropic
    // client.
    let mocks = Mocks::start().await;
    let edge = start(&mocks, |_| {}).await;
    mocks.anthropic.push(Behavior::NoFinish);
    let body = json!({"model": "claude-test", "max_tokens": 50, "stream": true, "temperature": 0,
        "messages": [{"role": "user", "content": PROMPT}]});
    let send = || edge.send("POST", "/v1/messages", None, &[("x-api-key", ACME_KEY)], Bytes::from(body.to_string()));
    let r = send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    let events = r.events();
    let names: Vec<&str> = events.iter().map(|e| e.event.as_deref().unwrap_or("")).collect();
    assert_eq!(names.last(), Some(&"error"), "{names:?}");
    assert!(!names.contains(&"message_stop"), "{names:?}");
    let r = send().await;
    let names: Vec<String> = r.events().into_iter().filter_map(|e| e.event).collect();
    assert_eq!(names.last().map(String::as_str), Some("message_stop"), "{names:?}");
    assert_eq!(r.header("x-meridian-cache"), Some("miss"));
    assert_eq!(mocks.request_counts(), [0, 0, 2]);
}

#[tokio::test]
async fn a_placeholder_tail_held_back_is_flushed_or_the_stream_ends_in_error() {
    let mocks = Mocks::start().await;
    let plugins = TempDir::new("placeholder-tail");
    let mut config = mocks.config();
    config.plugin_runtime.cache_dir = plugins.path().to_path_buf();
    add_plugin(&mut config, "pii", PluginKind::Filter, "pii-redactor", json!({"actions": {"email": "redact"}}));
    config.tenant_mut("acme").filters = vec!["pii".into()];
    let edge = TestEdge::start(config).await;
    // Redacted, the prompt ends `[EMAIL_1] [EMAIL_`, and the mock echoes it a word a piece: the
    // last piece could still become a placeholder, so the edge holds it back until the next
    // piece or the finish reason.
    let body = json!({"model": "gpt-test", "stream": true,
        "messages": [{"role": "user", "content": "mail ann@example.com [EMAIL_"}]});
    let r = edge.post(CHAT, ACME_KEY, &body).await;
    assert_eq!(r.answer_text(), "Echo: mail ann@example.com [EMAIL_", "the finish reason flushes the tail");
    assert_eq!(mocks.openai.received()[0].body["messages"][0]["content"], "mail [EMAIL_1] [EMAIL_");

    mocks.openai.push(Behavior::NoFinish);
    let r = edge.post(CHAT, ACME_KEY, &body).await;
    let text = assert_broken_stream(&r, "upstream_error");
    assert_eq!(
        text, "Echo: mail ann@example.com ",
        "the tail was held back, and the stream did not end cleanly without it"
    );
}

#[tokio::test]
async fn a_stream_larger_than_a_cache_entry_is_streamed_whole_but_not_cached() {
    let mocks = Mocks::start().await;
    // "Echo: hi" (8 bytes) fits an entry; "Echo: " and the prompt do not.
    let edge = start(&mocks, |c| c.cache.max_entry_bytes = 16).await;
    for _ in 0..2 {
        let r = edge.post(CHAT, ACME_KEY, &chat("gpt-test", true)).await;
        assert_answered_by(&r, "oa");
        assert_eq!(r.header("x-meridian-cache"), Some("miss"));
    }
    assert_eq!(mocks.request_counts(), [2, 0, 0], "the large answer went upstream each time");

    let small = json!({"model": "gpt-test", "stream": true, "temperature": 0,
        "messages": [{"role": "user", "content": "hi"}]});
    let caches: Vec<Option<String>> = {
        let mut out = Vec::new();
        for _ in 0..2 {
            let r = edge.post(CHAT, ACME_KEY, &small).await;
            assert_eq!(r.answer_text(), "Echo: hi");
            out.push(r.header("x-meridian-cache").map(str::to_string));
        }
        out
    };
    assert_eq!(caches, [Some("miss".into()), Some("hit".into())], "a small answer is cached");
}
