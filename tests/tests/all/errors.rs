//! Every error status the edge answers with, in each client API's own error shape, and never a
//! hang: bad requests, auth, unknown models and paths, body limits and timeouts, rate limits,
//! overload, and upstream failures.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meridian_e2e::{metric, Behavior, ConfigExt, Mocks, Reply, TestEdge, ACME_KEY, GLOBEX_KEY};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OPENAI: &str = "/v1/chat/completions";
const ANTHROPIC: &str = "/v1/messages";

fn openai_body() -> Value {
    json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hello"}]})
}

fn anthropic_body() -> Value {
    json!({"model": "claude-test", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]})
}

/// Asserts an OpenAI-shaped error body and returns its `error` object.
fn openai_error(r: &Reply, status: u16, kind: &str) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    let e = v["error"].clone();
    assert!(e.is_object(), "OpenAI error shape: {v}");
    assert_eq!(e["type"], kind, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "param and code are always present: {v}");
    e
}

/// Asserts an Anthropic-shaped error body and returns its `error` object.
fn anthropic_error(r: &Reply, status: u16, kind: &str) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["type"], "error", "Anthropic error shape: {v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    v["error"].clone()
}

async fn post_anthropic(edge: &TestEdge, key: Option<&str>, body: impl Into<bytes::Bytes>) -> Reply {
    let mut headers = vec![("anthropic-version", "2023-06-01")];
    if let Some(k) = key {
        headers.push(("x-api-key", k));
    }
    edge.send("POST", ANTHROPIC, None, &headers, body.into()).await
}

/// A reply read off a raw socket.
struct RawReply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawReply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Reads one HTTP/1.1 response with a `content-length` off `stream`, failing after `within`.
async fn read_response(stream: &mut TcpStream, within: Duration) -> RawReply {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                    return RawReply { status, body: buf[end + 4..end + 4 + len].to_vec(), head };
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    panic!("connection closed before a whole response: {}", String::from_utf8_lossy(&buf))
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.expect("the edge answers in time")
}

/// Writes `bytes`, ignoring a failure: the edge may refuse and close before reading all of it.
async fn write_lenient(stream: &mut TcpStream, bytes: &[u8]) {
    let _ = stream.write_all(bytes).await;
}

fn head(path: &str, key_header: &str, framing: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nhost: edge\r\n{key_header}\r\ncontent-type: application/json\r\n{framing}\r\n\r\n")
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("edge accepts")
}

#[tokio::test]
async fn bad_requests_are_400_with_the_field_named_in_each_shape() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;

    let r = edge.send("POST", OPENAI, Some(ACME_KEY), &[], "{\"model\": \"gpt-test\", \"messages\": [".into()).await;
    let e = openai_error(&r, 400, "invalid_request_error");
    assert_eq!(e["code"], "malformed_json");
    let r = post_anthropic(&edge, Some(ACME_KEY), "{not json").await;
    anthropic_error(&r, 400, "invalid_request_error");

    let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": 5}]});
    let e = openai_error(&edge.post(OPENAI, ACME_KEY, &body).await, 400, "invalid_request_error");
    assert_eq!(e["param"], "messages[0].content");
    assert_eq!(e["code"], "invalid_field");
    let body = json!({"model": "gpt-test", "temperature": 3, "messages": [{"role": "user", "content": "x"}]});
    let e = openai_error(&edge.post(OPENAI, ACME_KEY, &body).await, 400, "invalid_request_error");
    assert_eq!(e["param"], "temperature");
    assert!(e["message"].as_str().unwrap().contains("temperature"), "{e}");

    let body = json!({"model": "claude-test", "messages": [{"role": "user", "content": "x"}]});
    let e =
        anthropic_error(&post_anthropic(&edge, Some(ACME_KEY), body.to_string()).await, 400, "invalid_request_error");
    assert!(e["message"].as_str().unwrap().contains("max_tokens"), "the missing field is named: {e}");
    let body = json!({"model": "claude-test", "max_tokens": 10, "temperature": 1.5,
        "messages": [{"role": "user", "content": "x"}]});
    let e =
        anthropic_error(&post_anthropic(&edge, Some(ACME_KEY), body.to_string()).await, 400, "invalid_request_error");
    assert!(e["message"].as_str().unwrap().contains("temperature"), "{e}");

    assert_eq!(mocks.openai.request_count() + mocks.anthropic.request_count(), 0, "nothing invalid goes upstream");
}

#[tokio::test]
async fn missing_or_wrong_keys_are_401_in_each_shape() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;

    let r = edge.send("POST", OPENAI, None, &[], openai_body().to_string().into()).await;
    let e = openai_error(&r, 401, "authentication_error");
    assert_eq!(e["code"], "unauthorized");
    let r = edge.post(OPENAI, "sk-wrong", &openai_body()).await;
    openai_error(&r, 401, "authentication_error");

    let r = post_anthropic(&edge, None, anthropic_body().to_string()).await;
    anthropic_error(&r, 401, "authentication_error");
    let r = post_anthropic(&edge, Some("sk-wrong"), anthropic_body().to_string()).await;
    anthropic_error(&r, 401, "authentication_error");
    assert_eq!(mocks.openai.request_count() + mocks.anthropic.request_count(), 0);

    let r = edge.send("GET", "/v1/models", None, &[], bytes::Bytes::new()).await;
    openai_error(&r, 401, "authentication_error");
    let r = edge.send("GET", "/v1/models", Some("sk-wrong"), &[], bytes::Bytes::new()).await;
    openai_error(&r, 401, "authentication_error");
    let r = edge.send("GET", "/v1/models", Some(GLOBEX_KEY), &[], bytes::Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["gpt-test", "claude-test", "gpt-via-claude", "claude-via-gpt", "fallback"]);
}

#[tokio::test]
async fn unknown_models_and_paths_are_404() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;

    let body = json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]});
    let e = openai_error(&edge.post(OPENAI, ACME_KEY, &body).await, 404, "invalid_request_error");
    assert_eq!(e["param"], "model");
    assert_eq!(e["code"], "model_not_found");
    assert!(e["message"].as_str().unwrap().contains("no-such-model"), "{e}");
    let body = json!({"model": "no-such-model", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]});
    let e =
        anthropic_error(&post_anthropic(&edge, Some(ACME_KEY), body.to_string()).await, 404, "invalid_request_error");
    assert!(e["message"].as_str().unwrap().contains("no-such-model"), "{e}");

    let r = edge.send("POST", "/v1/completions", Some(ACME_KEY), &[], openai_body().to_string().into()).await;
    let e = openai_error(&r, 404, "invalid_request_error");
    assert_eq!(e["code"], "not_found");
    let r = edge.send("GET", OPENAI, Some(ACME_KEY), &[], bytes::Bytes::new()).await;
    openai_error(&r, 404, "invalid_request_error");
    let r = edge.send("POST", "/v1/messages/batches", Some(ACME_KEY), &[], bytes::Bytes::new()).await;
    anthropic_error(&r, 404, "not_found_error");
    assert_eq!(mocks.openai.request_count() + mocks.anthropic.request_count(), 0);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_with_or_without_content_length() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    assert_eq!(edge.edge.config().node.max_body_bytes, 65536);
    let big = json!({"model": "gpt-test", "max_tokens": 5,
        "messages": [{"role": "user", "content": "x".repeat(70_000)}]})
    .to_string();

    // Declared too large: refused from the head, before the body is read.
    for (path, key) in
        [(OPENAI, format!("authorization: Bearer {ACME_KEY}")), (ANTHROPIC, format!("x-api-key: {ACME_KEY}"))]
    {
        let mut s = connect(edge.addr).await;
        let head = head(path, &key, &format!("content-length: {}", big.len()));
        write_lenient(&mut s, head.as_bytes()).await;
        write_lenient(&mut s, big.as_bytes()).await;
        let r = read_response(&mut s, Duration::from_secs(5)).await;
        assert_eq!(r.status, 413, "{path}: {}", r.head);
        let v = r.json();
        if path == OPENAI {
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
            assert_eq!(v["error"]["code"], "payload_too_large", "{v}");
        } else {
            assert_eq!(v["type"], "error", "{v}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        }
        assert!(v["error"]["message"].as_str().unwrap().contains("65536"), "the limit is named: {v}");
    }

    // Chunked, no content-length: refused once the limit is passed.
    for (path, key) in
        [(OPENAI, format!("authorization: Bearer {ACME_KEY}")), (ANTHROPIC, format!("x-api-key: {ACME_KEY}"))]
    {
        let mut s = connect(edge.addr).await;
        write_lenient(&mut s, head(path, &key, "transfer-encoding: chunked").as_bytes()).await;
        for piece in big.as_bytes().chunks(8192) {
            let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
            chunk.extend_from_slice(piece);
            chunk.extend_from_slice(b"\r\n");
            write_lenient(&mut s, &chunk).await;
        }
        write_lenient(&mut s, b"0\r\n\r\n").await;
        let r = read_response(&mut s, Duration::from_secs(5)).await;
        assert_eq!(r.status, 413, "{path}: {}", r.head);
        let v = r.json();
        if path == OPENAI {
            assert_eq!(v["error"]["code"], "payload_too_large", "{v}");
        } else {
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        }
    }

    // A chunked body under the limit is served.
    let small = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "chunked"}]}).to_string();
    let mut s = connect(edge.addr).await;
    let head = head(OPENAI, &format!("authorization: Bearer {ACME_KEY}"), "transfer-encoding: chunked");
    let req = format!("{head}{:x}\r\n{small}\r\n0\r\n\r\n", small.len());
    s.write_all(req.as_bytes()).await.unwrap();
    let r = read_response(&mut s, Duration::from_secs(5)).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Echo: chunked");
    assert_eq!(mocks.openai.request_count(), 1, "only the request under the limit went upstream");
}

#[tokio::test]
async fn a_tenant_over_its_rate_gets_429_with_retry_after() {
    let mocks = Mocks::start().await;
    let mut cfg = mocks.config();
    let acme = cfg.tenant_mut("acme");
    acme.requests_per_second = Some(1);
    acme.burst = Some(1);
    let edge = TestEdge::start(cfg).await;

    assert_eq!(edge.post(OPENAI, ACME_KEY, &openai_body()).await.status, 200);
    let r = edge.post(OPENAI, ACME_KEY, &openai_body()).await;
    let e = openai_error(&r, 429, "rate_limit_error");
    assert_eq!(e["code"], "rate_limited");
    let retry: u64 = r.header("retry-after").expect("retry-after").parse().expect("whole seconds");
    assert!((1..=2).contains(&retry), "retry-after {retry}");
    let r = post_anthropic(&edge, Some(ACME_KEY), anthropic_body().to_string()).await;
    anthropic_error(&r, 429, "rate_limit_error");
    assert!(r.header("retry-after").is_some());

    assert_eq!(edge.post(OPENAI, GLOBEX_KEY, &openai_body()).await.status, 200, "other tenants are not limited");
    assert_eq!(mocks.openai.request_count(), 2);
    assert_eq!(mocks.anthropic.request_count(), 0);

    // The bucket refills at one token a second: retry (a refused request takes no token) until
    // one is admitted, bounded well past the advertised retry-after.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = edge.post(OPENAI, ACME_KEY, &openai_body()).await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 429, "{}", r.text());
        assert!(Instant::now() < deadline, "still refused 10 s after a retry-after of {retry} s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mocks.openai.request_count(), 3, "admitted again after retry-after, and only once");
}

#[tokio::test]
async fn a_full_node_answers_503_with_retry_after() {
    let mocks = Mocks::start().await;
    let mut cfg = mocks.config();
    cfg.node.max_in_flight = 1;
    cfg.target_mut("oa").first_byte_timeout_ms = 5000;
    let edge = std::sync::Arc::new(TestEdge::start(cfg).await);

    // Long enough to outlast the two refusals below on a busy machine; they must not wait for it.
    mocks.openai.push(Behavior::Delay(Duration::from_secs(3)));
    let held = {
        let edge = std::sync::Arc::clone(&edge);
        tokio::spawn(async move { edge.post(OPENAI, ACME_KEY, &openai_body()).await })
    };
    let start = Instant::now();
    while mocks.openai.request_count() == 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "the first request reaches the mock");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let r = edge.post(OPENAI, GLOBEX_KEY, &openai_body()).await;
    let e = openai_error(&r, 503, "overloaded_error");
    assert_eq!(e["code"], "overloaded");
    assert_eq!(r.header("retry-after"), Some("1"));
    let r = post_anthropic(&edge, Some(ACME_KEY), anthropic_body().to_string()).await;
    anthropic_error(&r, 503, "overloaded_error");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Refused at once, not queued behind the held slot: both answers came while it was still held.
    assert!(!held.is_finished(), "the 503s came only after the slot was freed");

    assert_eq!(held.await.unwrap().status, 200, "the request holding the slot completes");
    assert_eq!(edge.post(OPENAI, GLOBEX_KEY, &openai_body()).await.status, 200, "the slot is free again");
    assert_eq!(mocks.openai.request_count(), 2);
    assert_eq!(mocks.anthropic.request_count(), 0);
}

#[tokio::test]
async fn upstream_failures_are_502_and_upstream_timeouts_504() {
    let mocks = Mocks::start().await;
    let mut cfg = mocks.config();
    for t in cfg.targets.values_mut() {
        t.first_byte_timeout_ms = 300;
    }
    let edge = TestEdge::start(cfg).await;

    mocks.openai.push(Behavior::Status(500));
    let e = openai_error(&edge.post(OPENAI, ACME_KEY, &openai_body()).await, 502, "upstream_error");
    assert_eq!(e["code"], "upstream_error");
    mocks.anthropic.push(Behavior::Status(500));
    anthropic_error(&post_anthropic(&edge, Some(ACME_KEY), anthropic_body().to_string()).await, 502, "api_error");

    // The mock never answers: only the first-byte timeout can end these requests.
    mocks.openai.push(Behavior::Hang);
    let e = openai_error(&edge.post(OPENAI, ACME_KEY, &openai_body()).await, 504, "timeout_error");
    assert_eq!(e["code"], "upstream_timeout");
    mocks.anthropic.push(Behavior::Hang);
    let r = post_anthropic(&edge, Some(ACME_KEY), anthropic_body().to_string()).await;
    anthropic_error(&r, 504, "timeout_error");

    // Streamed requests fail the same way before their first byte.
    mocks.openai.push(Behavior::Hang);
    let mut body = openai_body();
    body["stream"] = json!(true);
    openai_error(&edge.post(OPENAI, ACME_KEY, &body).await, 504, "timeout_error");
    mocks.openai.push(Behavior::Status(503));
    openai_error(&edge.post(OPENAI, ACME_KEY, &body).await, 502, "upstream_error");

    assert_eq!(edge.post(OPENAI, ACME_KEY, &openai_body()).await.status, 200);
    assert_eq!(mocks.openai.request_count(), 5);
    assert_eq!(mocks.anthropic.request_count(), 2);
}

#[tokio::test]
async fn a_slow_body_is_408_within_the_body_timeout() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    assert_eq!(edge.edge.config().node.body_read_timeout_ms, 1000);

    for (path, key) in
        [(OPENAI, format!("authorization: Bearer {ACME_KEY}")), (ANTHROPIC, format!("x-api-key: {ACME_KEY}"))]
    {
        let mut s = connect(edge.addr).await;
        // Taken before the edge sees a byte, so its timer cannot have started earlier: the edge
        // waited out the body timeout rather than refusing the partial body at once. (No upper
        // bound: on a busy machine the answer may come late; `read_response` bounds the wait.)
        let start = Instant::now();
        s.write_all(head(path, &key, "content-length: 100").as_bytes()).await.unwrap();
        s.write_all(br#"{"model": "gpt-te"#).await.unwrap();
        let r = read_response(&mut s, Duration::from_secs(5)).await;
        let took = start.elapsed();
        assert_eq!(r.status, 408, "{path}: {}", r.head);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(took >= Duration::from_millis(1000), "answered before the body timeout, after {took:?}");
        let v = r.json();
        if path == OPENAI {
            assert_eq!(v["error"]["type"], "timeout_error", "{v}");
            assert_eq!(v["error"]["code"], "body_timeout", "{v}");
        } else {
            assert_eq!(v["type"], "error", "{v}");
            assert_eq!(v["error"]["type"], "timeout_error", "{v}");
        }
    }
    assert_eq!(mocks.openai.request_count() + mocks.anthropic.request_count(), 0);
}

#[tokio::test]
async fn an_incomplete_request_head_is_closed_not_held() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    assert_eq!(edge.edge.config().node.header_read_timeout_ms, 1000);

    let mut s = connect(edge.addr).await;
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: edge\r\ncontent-le").await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                // A 408 head before the close is fine too.
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the edge closes a connection whose head never completes");
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_not_held() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;

    let mut s = connect(edge.addr).await;
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "the edge closes a silent connection: {read:?}");

    // A client that connects and then sends its request at once is served as before.
    let mut s = connect(edge.addr).await;
    let body = openai_body().to_string();
    let req = format!(
        "{}{body}",
        head(OPENAI, &format!("authorization: Bearer {ACME_KEY}"), &format!("content-length: {}", body.len()))
    );
    s.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut s, Duration::from_secs(5)).await.status, 200);
}

#[tokio::test]
async fn the_node_keeps_serving_after_every_kind_of_error() {
    let mocks = Mocks::start().await;
    let mut cfg = mocks.config();
    cfg.target_mut("oa").first_byte_timeout_ms = 300;
    let edge = TestEdge::start(cfg).await;

    assert_eq!(edge.send("POST", OPENAI, Some(ACME_KEY), &[], "{".into()).await.status, 400);
    assert_eq!(edge.post(OPENAI, "sk-nope", &openai_body()).await.status, 401);
    let unknown = json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]});
    assert_eq!(edge.post(OPENAI, ACME_KEY, &unknown).await.status, 404);
    mocks.openai.push(Behavior::Status(500));
    assert_eq!(edge.post(OPENAI, ACME_KEY, &openai_body()).await.status, 502);
    mocks.openai.push(Behavior::Hang);
    assert_eq!(edge.post(OPENAI, ACME_KEY, &openai_body()).await.status, 504);
    // A stream cut off mid-way, and a client that goes away before its body is sent.
    mocks.openai.push(Behavior::CutAfter(1));
    let mut streamed = openai_body();
    streamed["stream"] = json!(true);
    let r = edge.post(OPENAI, ACME_KEY, &streamed).await;
    assert_eq!(r.status, 200);
    assert!(r.events().iter().all(|e| e.data != "[DONE]"), "a cut stream does not end cleanly: {}", r.text());
    let mut s = connect(edge.addr).await;
    s.write_all(head(OPENAI, &format!("authorization: Bearer {ACME_KEY}"), "content-length: 500").as_bytes())
        .await
        .unwrap();
    drop(s);
    let mut s = connect(edge.addr).await;
    s.write_all(b"GET /v1/mod").await.unwrap();
    drop(s);

    let r = edge.post(OPENAI, ACME_KEY, &openai_body()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Echo: hello");
    let r = post_anthropic(&edge, Some(ACME_KEY), anthropic_body().to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let start = Instant::now();
    loop {
        let in_flight = metric(&edge.metrics().await, "meridian_requests_in_flight", &[]);
        if in_flight == 0.0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(3), "requests in flight stay at {in_flight}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_stalled_http2_preface_is_closed_not_held() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    for partial in [&b"P"[..], b"PRI * HTTP/2.0\r\n"] {
        let mut s = connect(edge.addr).await;
        s.write_all(partial).await.unwrap();
        let mut buf = [0u8; 1024];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "the edge closes a stalled preface {partial:?}: {read:?}");
    }
}
