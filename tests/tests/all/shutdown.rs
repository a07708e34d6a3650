//! Graceful shutdown of `meridian edge` run as a process: on SIGTERM `/readyz` answers 503 while
//! streams are still in flight, new chat requests are refused with 503 `shutting_down`, streams
//! that finish within `node.shutdown_grace_ms` end cleanly, those that do not end with a
//! `shutting_down` error event in the client's API shape, and the process exits 0.

use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian_e2e::process::EdgeProcess;
use meridian_e2e::raw::RawConn;
use meridian_e2e::{mock_target_toml, model_toml, tenant_toml, Behavior, Mocks, TempDir, ACME_KEY};
use serde_json::json;

/// The edge's config: the standard mocks with a chunk timeout far past the grace period (so that
/// only the shutdown can end a stalled stream), no ledger, and `grace_ms` to drain.
fn config(mocks: &Mocks, port: u16, grace_ms: u64) -> String {
    let targets = [
        mock_target_toml("oa", "openai", &format!("{}/v1", mocks.openai.url()), (1.0, 2.0)),
        mock_target_toml("an", "anthropic", &mocks.anthropic.url(), (3.0, 15.0)),
    ]
    .join("\n")
    .replace("chunk_timeout_ms = 1000", "chunk_timeout_ms = 60000");
    format!(
        "[node]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_ms = {grace_ms}\n\n[ledger]\nenabled = false\n\n{}\n{targets}\n{}\n{}",
        tenant_toml("acme", ACME_KEY),
        model_toml("gpt-test", &[("oa", Some("gpt-4o-mini"))]),
        model_toml("claude-test", &[("an", Some("claude-haiku-4-5"))]),
    )
}

/// A streamed request on its own connection (`connection: close`, so that the edge closes it
/// once the response ends), read until its first content (`first` in the body).
async fn open_stream(edge: &EdgeProcess, path: &str, body: serde_json::Value, first: &str) -> RawConn {
    let addr = edge.url.trim_start_matches("http://");
    let headers = [("x-api-key", ACME_KEY), ("anthropic-version", "2023-06-01"), ("connection", "close")];
    let mut stream = RawConn::post(addr, path, ACME_KEY, &headers, &body.to_string()).await;
    let got = stream.read_until(&[first]).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    stream
}

/// Polls `GET /readyz` until it answers `want`, failing after 10 s.
async fn readyz_until(edge: &EdgeProcess, want: u16) {
    let start = Instant::now();
    loop {
        let got = edge.client.send("GET", &format!("{}/readyz", edge.url), None, "", Bytes::new()).await;
        if got == Some(want) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "/readyz answers {got:?}, want {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn openai_stream(text: &str) -> serde_json::Value {
    json!({"model": "gpt-test", "stream": true, "messages": [{"role": "user", "content": text}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_grace_period_end_with_shutting_down_and_new_requests_are_refused() {
    let mocks = Mocks::start().await;
    let dir = TempDir::new("shutdown-cut");
    let mut edge = EdgeProcess::start(dir.path(), |port| config(&mocks, port, 5_000)).await;
    // Both streams stall after their first content, and stay in flight until the edge ends them.
    mocks.openai.push(Behavior::StallAfter(1));
    mocks.anthropic.push(Behavior::StallAfter(1));
    let openai = open_stream(&edge, "/v1/chat/completions", openai_stream("one two three"), "Echo").await;
    let anthropic_body = json!({"model": "claude-test", "max_tokens": 50, "stream": true,
        "messages": [{"role": "user", "content": "one two three"}]});
    let mut anthropic = open_stream(&edge, "/v1/messages", anthropic_body, "text_delta").await;

    edge.terminate();
    readyz_until(&edge, 503).await;
    assert!(!anthropic.ended().await, "the stalled stream is still in flight while /readyz says 503");
    let url = format!("{}/v1/chat/completions", edge.url);
    let refused = Bytes::from(json!({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}).to_string());
    assert_eq!(edge.client.send("POST", &url, Some(ACME_KEY), "", refused).await, Some(503), "refused while draining");

    let openai = openai.read_to_end().await;
    assert!(openai.contains("\"code\":\"shutting_down\""), "an OpenAI error chunk: {openai}");
    assert!(!openai.contains("[DONE]"), "never a clean end: {openai}");
    let anthropic = anthropic.read_to_end().await;
    assert!(anthropic.contains("event: error"), "an Anthropic error event: {anthropic}");
    assert!(anthropic.contains("shutting down"), "{anthropic}");
    assert!(!anthropic.contains("message_stop"), "never a clean end: {anthropic}");
    let status = edge.wait();
    assert!(status.success(), "a drained edge exits 0: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_within_the_grace_period_finishes() {
    let mocks = Mocks::start().await;
    let dir = TempDir::new("shutdown-finish");
    let mut edge = EdgeProcess::start(dir.path(), |port| config(&mocks, port, 60_000)).await;
    let pieces: Vec<String> = (0..50).map(|i| format!("p{i:02} ")).collect();
    mocks.openai.push(Behavior::Say { pieces: pieces.clone(), gap: Duration::from_millis(100) });
    let mut stream = open_stream(&edge, "/v1/chat/completions", openai_stream("say"), "p00").await;

    edge.terminate();
    readyz_until(&edge, 503).await;
    assert!(!stream.ended().await, "the stream is still in flight while /readyz says 503");

    let text = stream.read_to_end().await;
    let mut at = 0;
    for piece in &pieces {
        at += text[at..].find(piece.as_str()).unwrap_or_else(|| panic!("{piece} in order: {text}"));
    }
    assert!(text.contains("[DONE]"), "a clean end: {text}");
    assert!(!text.contains("shutting_down"), "{text}");
    let status = edge.wait();
    assert!(status.success(), "a drained edge exits 0: {status}");
}
