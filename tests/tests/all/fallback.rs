//! Fallback across targets: model `fallback` tries oa, then oa2, then an. Before the first byte
//! reaches the client a failed target is skipped without the client noticing; after it, the
//! stream ends with a typed error and nothing is retried.

use std::net::TcpListener;

use bytes::Bytes;
use meridian::config::Config;
use meridian_e2e::{Behavior, ConfigExt, Mocks, Reply, TestEdge, ACME_KEY};
use serde_json::{json, Value};

const PROMPT: &str = "alpha beta gamma delta epsilon zeta";

fn chat(stream: bool) -> Value {
    json!({"model": "fallback", "stream": stream, "messages": [{"role": "user", "content": PROMPT}]})
}

/// A loopback URL nothing listens on.
fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    format!("http://127.0.0.1:{port}/v1")
}

async fn start(mocks: &Mocks, tweak: impl FnOnce(&mut Config)) -> TestEdge {
    let mut cfg = mocks.config();
    tweak(&mut cfg);
    TestEdge::start(cfg).await
}

async fn messages(edge: &TestEdge, body: &Value) -> Reply {
    edge.send("POST", "/v1/messages", None, &[("x-api-key", ACME_KEY)], Bytes::from(body.to_string())).await
}

/// The whole answer arrived, once, with no error: plain or streamed, OpenAI shape.
fn assert_clean_answer(r: &Reply, stream: bool, what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    let expected = format!("Echo: {PROMPT}");
    if stream {
        let events = r.events();
        assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"), "{what}: {}", r.text());
        let chunks = r.event_json();
        assert!(chunks.iter().all(|c| c.get("error").is_none()), "{what}: no error reaches the client: {chunks:?}");
        let roles = chunks.iter().filter(|c| c["choices"][0]["delta"]["role"] == "assistant").count();
        assert_eq!(roles, 1, "{what}: one answer begins, not two: {chunks:?}");
        let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, expected, "{what}");
    } else {
        let v = r.json();
        assert_eq!(v["object"], "chat.completion", "{what}: {v}");
        assert_eq!(v["choices"][0]["message"]["content"], expected.as_str(), "{what}");
    }
}

#[tokio::test]
async fn failures_before_the_first_byte_fall_back_to_the_next_target() {
    // (what, behaviour of oa, whether it applies to plain / streamed requests)
    let cases = [
        ("500", Behavior::Status(500), true, true),
        ("503", Behavior::Status(503), true, true),
        ("429", Behavior::Status(429), true, true),
        ("401 (the target's key)", Behavior::Status(401), true, true),
        ("no response head in time", Behavior::Hang, true, true),
        ("body cut before its end", Behavior::CutAfter(0), true, false),
        ("stream cut before any content", Behavior::CutAfter(0), false, true),
        ("stream stalled before any content", Behavior::StallAfter(0), false, true),
        ("in-stream error before any content", Behavior::StreamError(0), false, true),
    ];
    for (what, behavior, plain, streamed) in cases {
        for stream in [false, true] {
            if (stream && !streamed) || (!stream && !plain) {
                continue;
            }
            let what = format!("{what} (stream: {stream})");
            let mocks = Mocks::start().await;
            let edge = start(&mocks, |cfg| cfg.set_timeouts(300, 300)).await;
            mocks.openai.push(behavior.clone());
            let r = edge.post("/v1/chat/completions", ACME_KEY, &chat(stream)).await;
            assert_clean_answer(&r, stream, &what);
            assert_eq!(r.header("x-meridian-target"), Some("oa2"), "{what}");
            assert_eq!(mocks.request_counts(), [1, 1, 0], "{what}: each target asked at most once");
        }
    }
}

#[tokio::test]
async fn a_refused_connection_falls_back() {
    for stream in [false, true] {
        let mocks = Mocks::start().await;
        let edge = start(&mocks, |cfg| cfg.target_mut("oa").base_url = closed_port_url()).await;
        let r = edge.post("/v1/chat/completions", ACME_KEY, &chat(stream)).await;
        assert_clean_answer(&r, stream, &format!("connection refused (stream: {stream})"));
        assert_eq!(r.header("x-meridian-target"), Some("oa2"));
        assert_eq!(mocks.request_counts(), [0, 1, 0]);
    }
}

#[tokio::test]
async fn falls_back_across_api_shapes_to_the_last_target() {
    for stream in [false, true] {
        let mocks = Mocks::start().await;
        let edge = start(&mocks, |_| {}).await;
        mocks.openai.push(Behavior::Status(500));
        mocks.openai2.push(Behavior::Status(502));
        let r = edge.post("/v1/chat/completions", ACME_KEY, &chat(stream)).await;
        assert_clean_answer(&r, stream, &format!("anthropic last (stream: {stream})"));
        assert_eq!(r.header("x-meridian-target"), Some("an"));
        assert_eq!(mocks.request_counts(), [1, 1, 1]);
        assert_eq!(mocks.anthropic.received()[0].body["model"], "claude-haiku-4-5");
    }

    // An Anthropic client whose primary is OpenAI-shaped.
    let mocks = Mocks::start().await;
    let edge = start(&mocks, |_| {}).await;
    mocks.openai.push(Behavior::Status(429));
    let body = json!({"model": "fallback", "max_tokens": 50, "messages": [{"role": "user", "content": PROMPT}]});
    let r = messages(&edge, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-meridian-target"), Some("oa2"));
    assert_eq!(r.json()["content"][0]["text"], format!("Echo: {PROMPT}"));
    assert_eq!(mocks.request_counts(), [1, 1, 0]);
}

#[tokio::test]
async fn a_refusal_of_the_request_itself_is_not_retried() {
    for stream in [false, true] {
        let mocks = Mocks::start().await;
        let edge = start(&mocks, |_| {}).await;
        mocks.openai.push(Behavior::Status(400));
        let r = edge.post("/v1/chat/completions", ACME_KEY, &chat(stream)).await;
        assert_eq!(r.status, 400, "stream {stream}: {}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("injected status 400"), "the upstream's reason: {v}");
        assert_eq!(mocks.request_counts(), [1, 0, 0], "stream {stream}: another target would refuse it too");
    }

    // In the Anthropic client's shape.
    let mocks = Mocks::start().await;
    let edge = start(&mocks, |_| {}).await;
    mocks.openai.push(Behavior::Status(400));
    let body = json!({"model": "fallback", "max_tokens": 50, "messages": [{"role": "user", "content": PROMPT}]});
    let r = messages(&edge, &body).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(mocks.request_counts(), [1, 0, 0]);
}

#[tokio::test]
async fn an_openai_stream_broken_after_the_first_byte_ends_with_an_error_event() {
    let cases = [
        ("cut", Behavior::CutAfter(2), "upstream_error"),
        ("in-stream error", Behavior::StreamError(2), "upstream_error"),
        ("stall", Behavior::StallAfter(2), "timeout_error"),
    ];
    for (what, behavior, kind) in cases {
        let mocks = Mocks::start().await;
        let edge = start(&mocks, |cfg| cfg.set_timeouts(1000, 300)).await;
        mocks.openai.push(behavior);
        let r = edge.post("/v1/chat/completions", ACME_KEY, &chat(true)).await;
        assert_eq!(r.status, 200, "{what}: the stream had begun: {}", r.text());
        assert_eq!(r.header("x-meridian-target"), Some("oa"), "{what}");
        let events = r.events();
        assert!(events.iter().all(|e| e.data != "[DONE]"), "{what}: a broken stream never ends cleanly: {}", r.text());
        let chunks = r.event_json();
        let last = chunks.last().unwrap();
        assert_eq!(last["error"]["type"], kind, "{what}: a typed error event ends the stream: {last}");
        assert!(last["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {last}");
        assert_eq!(chunks.iter().filter(|c| c.get("error").is_some()).count(), 1, "{what}");
        let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, "Echo: alpha ", "{what}: what was sent stays sent, and nothing twice");
        assert_eq!(mocks.request_counts(), [1, 0, 0], "{what}: no other target is tried once bytes were sent");
    }
}

#[tokio::test]
async fn an_anthropic_stream_broken_after_the_first_byte_ends_with_an_error_event() {
    let cases = [
        ("cut", Behavior::CutAfter(2), "api_error"),
        ("in-stream error", Behavior::StreamError(2), "api_error"),
        ("stall", Behavior::StallAfter(2), "timeout_error"),
    ];
    for (model, upstream) in [("claude-test", "an"), ("fallback", "oa")] {
        for (what, behavior, kind) in cases.clone() {
            let what = format!("{what} ({model})");
            let mocks = Mocks::start().await;
            let edge = start(&mocks, |cfg| cfg.set_timeouts(1000, 300)).await;
            let primary = if upstream == "an" { &mocks.anthropic } else { &mocks.openai };
            primary.push(behavior);
            let body = json!({"model": model, "max_tokens": 50, "stream": true,
                "messages": [{"role": "user", "content": PROMPT}]});
            let r = messages(&edge, &body).await;
            assert_eq!(r.status, 200, "{what}: {}", r.text());
            assert_eq!(r.header("x-meridian-target"), Some(upstream), "{what}");
            let events = r.events();
            let names: Vec<&str> = events.iter().map(|e| e.event.as_deref().unwrap_or("")).collect();
            assert_eq!(names.first(), Some(&"message_start"), "{what}");
            assert_eq!(names.last(), Some(&"error"), "{what}: {names:?}");
            assert!(!names.contains(&"message_stop"), "{what}: a broken stream never ends cleanly: {names:?}");
            assert!(!names.contains(&"message_delta"), "{what}: no stop_reason for a broken answer: {names:?}");
            let err: Value = serde_json::from_str(&events.last().unwrap().data).unwrap();
            assert_eq!(err["type"], "error", "{what}: {err}");
            assert_eq!(err["error"]["type"], kind, "{what}: {err}");
            let text: String = r.event_json().iter().filter_map(|e| e["delta"]["text"].as_str()).collect();
            assert_eq!(text, "Echo: alpha ", "{what}");
            assert_eq!(
                primary.request_count(),
                1,
                "{what}: the primary is asked once and nothing is tried after the first byte"
            );
            assert_eq!(mocks.request_counts().iter().sum::<usize>(), 1, "{what}");
        }
    }
}

#[tokio::test]
async fn when_every_target_fails_the_client_gets_the_last_failure() {
    // (what, behaviour for every target, expected status, OpenAI error type)
    let cases = [
        ("all 500", Behavior::Status(500), 502, "upstream_error"),
        ("all 429", Behavior::Status(429), 429, "rate_limit_error"),
        ("all time out", Behavior::Hang, 504, "timeout_error"),
    ];
    for (what, behavior, status, kind) in cases {
        for stream in [false, true] {
            let what = format!("{what} (stream: {stream})");
            let mocks = Mocks::start().await;
            let edge = start(&mocks, |cfg| cfg.set_timeouts(200, 200)).await;
            for m in [&mocks.openai, &mocks.openai2, &mocks.anthropic] {
                m.push(behavior.clone());
            }
            let r = edge.post("/v1/chat/completions", ACME_KEY, &chat(stream)).await;
            assert_eq!(r.status, status, "{what}: {}", r.text());
            assert_eq!(r.header("content-type"), Some("application/json"), "{what}: an error, not a stream");
            let v = r.json();
            assert_eq!(v["error"]["type"], kind, "{what}: {v}");
            assert!(v["error"]["message"].as_str().unwrap().contains("`an`"), "{what}: the last failure: {v}");
            assert_eq!(mocks.request_counts(), [1, 1, 1], "{what}: every target tried once");
        }
    }

    // The same in the Anthropic shape.
    let mocks = Mocks::start().await;
    let edge = start(&mocks, |_| {}).await;
    for m in [&mocks.openai, &mocks.openai2, &mocks.anthropic] {
        m.push(Behavior::Status(503));
    }
    let body = json!({"model": "fallback", "max_tokens": 50, "messages": [{"role": "user", "content": PROMPT}]});
    let r = messages(&edge, &body).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "api_error");
    assert_eq!(mocks.request_counts(), [1, 1, 1]);
}
