//! One tenant cannot starve the rest, end to end over loopback: a tenant at its concurrency limit
//! is refused with a typed 429 while another is served, and a place frees when one of its
//! requests ends; one tenant's stalled filtered streams, more than the plugin pool has shared
//! slots, hold only that tenant's session slots, so another tenant's filtered requests go through;
//! a client that stops reading is cut after the write timeout, over HTTP/1 or HTTP/2, and its
//! tenant's place and plugin slot go with it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meridian::config::{Config, PluginKind};
use meridian_e2e::raw::RawConn;
use meridian_e2e::{add_plugin, metric_or_zero, Behavior, ConfigExt, Mocks, TempDir, TestEdge, ACME_KEY, GLOBEX_KEY};
use serde_json::{json, Value};
use tokio::net::TcpSocket;

const OPENAI: &str = "/v1/chat/completions";
const ANTHROPIC: &str = "/v1/messages";
const REQUESTS: &str = "meridian_requests_total";

fn chat(text: &str, stream: bool) -> Value {
    json!({"model": "gpt-test", "stream": stream, "messages": [{"role": "user", "content": text}]})
}

/// The standard config, with stalled upstream streams left alone long enough that only the edge
/// can end them within a test.
fn config(mocks: &Mocks) -> Config {
    let mut cfg = mocks.config();
    cfg.set_timeouts(30_000, 30_000);
    cfg
}

/// `config` with pii-redactor as the filter of both tenants, its plugin cache in `cache`.
fn filtered_config(mocks: &Mocks, cache: &TempDir) -> Config {
    let mut cfg = config(mocks);
    cfg.plugin_runtime.cache_dir = cache.path().to_path_buf();
    add_plugin(&mut cfg, "pii", PluginKind::Filter, "pii-redactor", json!({"actions": {"email": "redact"}}));
    // pii-redactor reads no answers without its secrets rule (it declares no answer triggers), so
    // a filter that reads every piece holds each stream's session slot: the control fixture.
    add_plugin(&mut cfg, "reader", PluginKind::Filter, "fixture-wrong-world", json!({}));
    cfg.tenant_mut("acme").filters = vec!["pii".into(), "reader".into()];
    cfg.tenant_mut("globex").filters = vec!["pii".into(), "reader".into()];
    cfg
}

/// A streamed request of tenant `key` whose upstream sends its first content and then stalls,
/// read up to that content (or to the error that ended it).
async fn stalled_stream(edge: &TestEdge, mocks: &Mocks, key: &str) -> (RawConn, String) {
    mocks.openai.push(Behavior::StallAfter(1));
    let mut s = RawConn::post(edge.addr, OPENAI, key, &[], &chat("hold on", true).to_string()).await;
    let got = s.read_until(&["Echo", "\"error\""]).await;
    (s, got)
}

/// Polls `check` until it holds, for at most 15 s.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < Duration::from_secs(15), "{what}: not within 15 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_tenant_at_its_concurrency_limit_gets_429_while_another_is_served() {
    let mocks = Mocks::start().await;
    let mut cfg = config(&mocks);
    cfg.tenant_mut("acme").max_concurrent_requests = Some(1);
    let edge = TestEdge::start(cfg).await;

    let (stream, got) = stalled_stream(&edge, &mocks, ACME_KEY).await;
    assert!(got.starts_with("HTTP/1.1 200") && got.contains("Echo"), "acme's one request streams: {got}");

    let r = edge.post(OPENAI, ACME_KEY, &chat("one more", false)).await;
    assert_eq!((r.status, r.error_code()), (429, "tenant_concurrency".to_string()), "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    let messages = json!({"model": "claude-test", "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]});
    let r = edge.post(ANTHROPIC, ACME_KEY, &messages).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "rate_limit_error", "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));

    let r = edge.post(OPENAI, GLOBEX_KEY, &chat("meanwhile", false)).await;
    assert_eq!((r.status, r.answer_text()), (200, "Echo: meanwhile".to_string()), "globex is served");
    let text = edge.metrics().await;
    assert_eq!(metric_or_zero(&text, REQUESTS, &["tenant=\"acme\"", "status=\"tenant_concurrency\""]), 2.0);

    // The place is held until the stream ends: here, until its client goes away.
    drop(stream);
    eventually("acme is served again once its stream's client is gone", || async {
        edge.post(OPENAI, ACME_KEY, &chat("again", false)).await.status == 200
    })
    .await;
}

#[tokio::test]
async fn stalled_filtered_streams_of_one_tenant_do_not_hold_back_another_tenants_filters() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("fair-sharing-pool");
    let mut cfg = filtered_config(&mocks, &cache);
    // A pool of two shared slots, and two slots per tenant for its streams' filters.
    cfg.plugin_runtime.max_instances = 2;
    cfg.plugin_runtime.max_sessions_per_tenant = 2;
    let edge = TestEdge::start(cfg).await;

    // Twice as many stalled streams as the pool has shared slots, each past its first content
    // (so its filter instance is live) or refused by the filters; none ends.
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(stalled_stream(&edge, &mocks, ACME_KEY).await);
    }
    let live = streams.iter().filter(|(_, got)| got.contains("Echo")).count();
    assert_eq!(
        live,
        2,
        "acme's own session slots hold two streams: {:?}",
        streams.iter().map(|s| &s.1).collect::<Vec<_>>()
    );

    // Globex's filtered requests, whole and streamed, run as if acme were not there; so do acme's
    // own whole answers, whose filter calls take a shared slot only for the call.
    for (key, stream) in [(GLOBEX_KEY, false), (GLOBEX_KEY, true), (ACME_KEY, false), (GLOBEX_KEY, true)] {
        let r = edge.post(OPENAI, key, &chat("write to ann@example.com", stream)).await;
        assert_eq!(r.status, 200, "stream={stream}: {}", r.text());
        assert_eq!(r.answer_text(), "Echo: write to ann@example.com", "restored, whole: {}", r.text());
    }
    drop(streams);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_the_write_timeout_and_its_places_go() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("fair-sharing-write");
    let mut cfg = filtered_config(&mocks, &cache);
    cfg.node.client_write_timeout_ms = 300;
    cfg.tenant_mut("acme").max_concurrent_requests = Some(1);
    cfg.plugin_runtime.max_sessions_per_tenant = 1;
    let edge = TestEdge::start(cfg).await;

    // An answer far larger than the socket buffers between the edge and a client that reads
    // nothing past the response head.
    let piece = "lorem ipsum dolor sit amet ".repeat(600);
    mocks.openai.push(Behavior::Say { pieces: vec![piece; 1_000], gap: Duration::ZERO });
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut body = chat("a long story", true);
    body["max_tokens"] = json!(100_000);
    let socket = socket.connect(edge.addr).await.unwrap();
    let mut stalled = RawConn::post_over(socket, OPENAI, ACME_KEY, &[], &body.to_string()).await;
    let head = stalled.read_until(&["\r\n\r\n"]).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // The edge ends the stream and accounts it, though the client is still connected.
    let closed = ["tenant=\"acme\"", "status=\"client_closed\""];
    eventually("the stalled stream is cut and recorded", || async {
        metric_or_zero(&edge.metrics().await, REQUESTS, &closed) == 1.0
    })
    .await;
    // Its tenant's one place and its filter's one session slot are free: a new stream is served.
    let r = edge.post(OPENAI, ACME_KEY, &chat("next please", true)).await;
    assert_eq!((r.status, r.answer_text()), (200, "Echo: next please".to_string()), "{}", r.text());
    // The edge closed the connection: reading what is buffered ends, never waits for more.
    assert!(stalled.closed().await, "{} closed it", edge.addr);
}

#[tokio::test]
async fn an_http2_client_that_keeps_its_stream_window_shut_is_cut_too() {
    let mocks = Mocks::start().await;
    let mut cfg = config(&mocks);
    cfg.node.client_write_timeout_ms = 300;
    cfg.tenant_mut("acme").max_concurrent_requests = Some(1);
    let edge = TestEdge::start(cfg).await;

    // HTTP/2 over cleartext: the client reads its socket (pings, other streams) but, reading none
    // of this response's body, never opens the stream's flow-control window past its first 64 KiB.
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_initial_stream_window_size(65_535)
        .build_http::<Full<Bytes>>();
    let piece = "lorem ipsum dolor sit amet ".repeat(600);
    mocks.openai.push(Behavior::Say { pieces: vec![piece; 100], gap: Duration::ZERO });
    let mut body = chat("a long story", true);
    body["max_tokens"] = json!(100_000);
    let request = hyper::Request::post(format!("{}{OPENAI}", edge.url()))
        .header("authorization", format!("Bearer {ACME_KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = client.request(request).await.expect("the edge answers");
    assert_eq!((response.status().as_u16(), response.version()), (200, hyper::Version::HTTP_2));

    let closed = ["tenant=\"acme\"", "status=\"client_closed\""];
    eventually("the stalled stream is cut and recorded", || async {
        metric_or_zero(&edge.metrics().await, REQUESTS, &closed) == 1.0
    })
    .await;
    let r = edge.post(OPENAI, ACME_KEY, &chat("next please", false)).await;
    assert_eq!((r.status, r.answer_text()), (200, "Echo: next please".to_string()), "{}", r.text());
    // The response was reset, not ended as if whole.
    let read = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect()).await;
    assert!(read.expect("the body ends").is_err(), "the cut stream ends in an error");
}
