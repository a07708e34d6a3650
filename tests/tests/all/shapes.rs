//! Both client API shapes, plain and streamed, against an upstream of the same shape.

use meridian_e2e::{Mocks, TestEdge, ACME_KEY, UPSTREAM_KEY};
use serde_json::json;

#[tokio::test]
async fn openai_chat_completion_passes_through_with_unknown_fields() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let body = json!({
        "model": "gpt-test",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
        "temperature": 0.7, "user": "u-42", "logit_bias": {"50256": -100}
    });
    let r = edge.post_with("/v1/chat/completions", ACME_KEY, &[("x-request-id", "req-abc-1")], &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "Echo: hello there");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(r.header("x-request-id"), Some("req-abc-1"));
    assert_eq!(r.header("x-meridian-cache"), Some("bypass"));

    let sent = &mocks.openai.received()[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.body["model"], "gpt-4o-mini", "the target's model name goes upstream");
    assert_eq!(sent.body["user"], "u-42", "unknown fields pass through");
    assert_eq!(sent.body["logit_bias"]["50256"], -100);
    assert_eq!(sent.header("authorization"), Some(format!("Bearer {UPSTREAM_KEY}").as_str()));
    assert_eq!(sent.header("x-request-id"), Some("req-abc-1"));
}

#[tokio::test]
async fn openai_stream_arrives_as_chunks_and_ends_with_done() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let body = json!({"model": "gpt-test", "stream": true, "messages": [{"role": "user", "content": "one two three"}]});
    let r = edge.post("/v1/chat/completions", ACME_KEY, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let events = r.events();
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks = r.event_json();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "Echo: one two three");
    assert!(chunks.len() >= 5, "streamed piece by piece, not buffered whole: {chunks:?}");
    assert!(chunks.iter().all(|c| c.get("usage").is_none_or(|u| u.is_null())), "no usage chunk unless asked");
    assert_eq!(
        mocks.openai.received()[0].body["stream_options"]["include_usage"],
        true,
        "usage is requested upstream for accounting"
    );

    let body = json!({"model": "gpt-test", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "count me"}]});
    let r = edge.post("/v1/chat/completions", ACME_KEY, &body).await;
    let chunks = r.event_json();
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 3, "{chunks:?}");
}

#[tokio::test]
async fn anthropic_messages_plain_and_streamed() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let body = json!({"model": "claude-test", "max_tokens": 100, "system": "be kind",
        "messages": [{"role": "user", "content": "hi claude"}], "top_k": 3});
    let r = edge
        .send(
            "POST",
            "/v1/messages",
            None,
            &[("x-api-key", ACME_KEY), ("anthropic-version", "2023-06-01")],
            body.to_string().into(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], "Echo: hi claude");
    assert_eq!(v["stop_reason"], "end_turn");
    let sent = &mocks.anthropic.received()[0];
    assert_eq!(sent.header("x-api-key"), Some(UPSTREAM_KEY));
    assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(sent.body["system"], "be kind");
    assert_eq!(sent.body["top_k"], 3, "Anthropic-only fields reach Anthropic upstreams");
    assert_eq!(sent.body["model"], "claude-haiku-4-5");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = edge.send("POST", "/v1/messages", None, &[("x-api-key", ACME_KEY)], streamed.to_string().into()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let names: Vec<_> = r.events().iter().map(|e| e.event.clone().unwrap_or_default()).collect();
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    assert!(names.contains(&"message_delta".to_string()));
    let text: String = r.event_json().iter().filter_map(|e| e["delta"]["text"].as_str()).collect();
    assert_eq!(text, "Echo: hi claude");
}
