//! `GET /metrics`: requests, tokens, cost, cache lookups, upstream attempts, requests in flight and
//! time to first token move as requests are served, refused and abandoned.

use std::time::{Duration, Instant};

use meridian::config::hash_key;
use meridian_e2e::raw::RawConn;
use meridian_e2e::{metric, metric_or_zero, Behavior, ConfigExt, Mocks, TestEdge, ACME_KEY};
use serde_json::{json, Value};

const OPENAI: &str = "/v1/chat/completions";
const REQUESTS: &str = "meridian_requests_total";
const TOKENS: &str = "meridian_tokens_total";
const COST: &str = "meridian_cost_usd_total";
const IN_FLIGHT: &str = "meridian_requests_in_flight";
const TTFT_COUNT: &str = "meridian_time_to_first_token_seconds_count";

fn chat(text: &str) -> Value {
    json!({"model": "gpt-test", "messages": [{"role": "user", "content": text}]})
}

fn acme_ok(api: &str) -> [String; 5] {
    [
        format!("api=\"{api}\""),
        "tenant=\"acme\"".into(),
        "model=\"gpt-test\"".into(),
        "target=\"oa\"".into(),
        "status=\"ok\"".into(),
    ]
}

fn labels(l: &[String]) -> Vec<&str> {
    l.iter().map(String::as_str).collect()
}

/// Polls `/metrics` until `name{labels}` equals `want`, failing after 3 s.
async fn wait_for(edge: &TestEdge, name: &str, labels: &[&str], want: f64) {
    let start = Instant::now();
    loop {
        let got = metric(&edge.metrics().await, name, labels);
        if got == want {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(3), "{name}{labels:?} stays at {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn requests_tokens_and_cost_follow_upstream_usage() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let ok = acme_ok("openai");
    let base = ["tenant=\"acme\"", "model=\"gpt-test\"", "target=\"oa\""];
    let before = edge.metrics().await;
    assert_eq!(metric_or_zero(&before, REQUESTS, &labels(&ok)), 0.0, "declared before its first sample");

    let (mut input, mut output) = (0.0, 0.0);
    for text in ["count these words please", "and these, a few more words than before"] {
        let r = edge.post(OPENAI, ACME_KEY, &chat(text)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let usage = &r.json()["usage"];
        input += usage["prompt_tokens"].as_f64().unwrap();
        output += usage["completion_tokens"].as_f64().unwrap();
    }
    assert!(input > 0.0 && output > 0.0);
    let text = edge.metrics().await;
    assert_eq!(metric(&text, REQUESTS, &labels(&ok)), 2.0);
    assert_eq!(metric(&text, TOKENS, &[&base[..], &["direction=\"input\""]].concat()), input);
    assert_eq!(metric(&text, TOKENS, &[&base[..], &["direction=\"output\""]].concat()), output);
    // oa's price: $1 per million input tokens, $2 per million output tokens.
    let cost = metric(&text, COST, &base);
    let want = (input * 1.0 + output * 2.0) / 1e6;
    assert!((cost - want).abs() < 1e-12, "cost {cost}, want {want}");
    assert_eq!(metric(&text, "meridian_upstream_attempts_total", &["target=\"oa\"", "outcome=\"ok\""]), 2.0);
    assert_eq!(metric(&text, "meridian_request_duration_seconds_count", &base), 2.0);

    // The Anthropic API, on an Anthropic target with its own price ($3 / $15).
    let body = json!({"model": "claude-test", "max_tokens": 50, "messages": [{"role": "user", "content": "hi there"}]});
    let r = edge.send("POST", "/v1/messages", None, &[("x-api-key", ACME_KEY)], body.to_string().into()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let usage = &r.json()["usage"];
    let (ain, aout) = (usage["input_tokens"].as_f64().unwrap(), usage["output_tokens"].as_f64().unwrap());
    let text = edge.metrics().await;
    let an = ["api=\"anthropic\"", "tenant=\"acme\"", "model=\"claude-test\"", "target=\"an\"", "status=\"ok\""];
    assert_eq!(metric(&text, REQUESTS, &an), 1.0);
    let an_base = ["model=\"claude-test\"", "target=\"an\""];
    assert_eq!(metric(&text, TOKENS, &[&an_base[..], &["direction=\"input\""]].concat()), ain);
    assert_eq!(metric(&text, TOKENS, &[&an_base[..], &["direction=\"output\""]].concat()), aout);
    let cost = metric(&text, COST, &an_base);
    let want = (ain * 3.0 + aout * 15.0) / 1e6;
    assert!((cost - want).abs() < 1e-12, "cost {cost}, want {want}");
    assert_eq!(metric(&text, REQUESTS, &labels(&ok)), 2.0, "other series are untouched");
}

#[tokio::test]
async fn cache_lookups_are_counted_and_hits_cost_nothing() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let lookups = "meridian_cache_lookups_total";

    let mut cold = chat("cached");
    cold["temperature"] = json!(0);
    for _ in 0..3 {
        assert_eq!(edge.post(OPENAI, ACME_KEY, &cold).await.status, 200);
    }
    edge.post(OPENAI, ACME_KEY, &chat("not cached")).await;
    let text = edge.metrics().await;
    assert_eq!(metric(&text, lookups, &["result=\"miss\""]), 1.0);
    assert_eq!(metric(&text, lookups, &["result=\"hit\""]), 2.0);
    assert_eq!(metric(&text, lookups, &["result=\"bypass\""]), 1.0);
    assert_eq!(metric(&text, "meridian_cache_entries", &[]), 1.0);
    assert!(metric(&text, "meridian_cache_bytes", &[]) > 0.0);

    let hits = ["tenant=\"acme\"", "target=\"cache\"", "status=\"ok\""];
    assert_eq!(metric(&text, REQUESTS, &hits), 2.0, "hits are requests served by the cache");
    assert_eq!(metric(&text, COST, &["target=\"cache\""]), 0.0);
    assert_eq!(metric(&text, REQUESTS, &labels(&acme_ok("openai"))), 2.0);
    assert_eq!(mocks.openai.request_count(), 2);
}

#[tokio::test]
async fn errors_are_counted_by_their_status() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;

    assert_eq!(edge.post(OPENAI, "sk-wrong", &chat("x")).await.status, 401);
    let unknown = json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]});
    assert_eq!(edge.post(OPENAI, ACME_KEY, &unknown).await.status, 404);
    mocks.openai.push(Behavior::Status(500));
    assert_eq!(edge.post(OPENAI, ACME_KEY, &chat("x")).await.status, 502);
    assert_eq!(edge.send("POST", OPENAI, Some(ACME_KEY), &[], "{".into()).await.status, 400);

    let text = edge.metrics().await;
    assert_eq!(metric(&text, REQUESTS, &["api=\"openai\"", "status=\"unauthorized\""]), 1.0);
    // A model the config does not name is counted under one label, whatever the client sent.
    let unknown = ["tenant=\"acme\"", "model=\"unknown\"", "status=\"model_not_found\""];
    assert_eq!(metric(&text, REQUESTS, &unknown), 1.0);
    assert!(!text.contains("\"nope\""), "{text}");
    let failed = ["tenant=\"acme\"", "model=\"gpt-test\"", "target=\"none\"", "status=\"upstream_error\""];
    assert_eq!(metric(&text, REQUESTS, &failed), 1.0);
    assert_eq!(metric(&text, REQUESTS, &["tenant=\"acme\"", "status=\"malformed_json\""]), 1.0);
    assert_eq!(metric_or_zero(&text, REQUESTS, &["status=\"ok\""]), 0.0);
    assert_eq!(metric(&text, "meridian_upstream_attempts_total", &["target=\"oa\"", "outcome=\"server_error\""]), 1.0);
    assert_eq!(metric_or_zero(&text, "meridian_upstream_attempts_total", &["outcome=\"ok\""]), 0.0);
    assert_eq!(metric(&text, IN_FLIGHT, &[]), 0.0);
    assert_eq!(metric_or_zero(&text, COST, &[]), 0.0, "failures cost nothing");

    assert_eq!(edge.post(OPENAI, ACME_KEY, &chat("x")).await.status, 200);
    let text = edge.metrics().await;
    assert_eq!(metric(&text, REQUESTS, &labels(&acme_ok("openai"))), 1.0);
    assert_eq!(metric(&text, "meridian_upstream_attempts_total", &["target=\"oa\"", "outcome=\"ok\""]), 1.0);
}

#[tokio::test]
async fn streams_record_time_to_first_token_and_leave_no_request_in_flight() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let base = ["tenant=\"acme\"", "model=\"gpt-test\"", "target=\"oa\""];

    let mut body = chat("stream these words");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    for n in 1..=2 {
        let r = edge.post(OPENAI, ACME_KEY, &body).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.events().last().unwrap().data, "[DONE]");
        let usage = r.event_json().last().unwrap()["usage"].clone();
        let text = edge.metrics().await;
        assert_eq!(metric(&text, TTFT_COUNT, &base), f64::from(n));
        assert_eq!(metric(&text, IN_FLIGHT, &[]), 0.0);
        assert_eq!(metric(&text, REQUESTS, &labels(&acme_ok("openai"))), f64::from(n));
        let output = metric(&text, TOKENS, &[&base[..], &["direction=\"output\""]].concat());
        assert_eq!(output, f64::from(n) * usage["completion_tokens"].as_f64().unwrap(), "the stream's usage counts");
    }
    let plain = edge.post(OPENAI, ACME_KEY, &chat("not streamed")).await;
    assert_eq!(plain.status, 200);
    assert_eq!(metric(&edge.metrics().await, TTFT_COUNT, &base), 2.0, "only streams have a first token");
}

#[tokio::test]
async fn a_client_gone_mid_stream_leaves_no_request_in_flight() {
    let mocks = Mocks::start().await;
    let mut cfg = mocks.config();
    // Long enough that only the client's going away can end the request within the test.
    cfg.target_mut("oa").chunk_timeout_ms = 30_000;
    cfg.node.max_in_flight = 1;
    let edge = TestEdge::start(cfg).await;

    mocks.openai.push(Behavior::StallAfter(2));
    let body = json!({"model": "gpt-test", "stream": true,
        "messages": [{"role": "user", "content": "one two three four five"}]})
    .to_string();
    let mut s = RawConn::post(edge.addr, OPENAI, ACME_KEY, &[], &body).await;
    let got = s.read_until(&["Echo"]).await;
    assert!(got.starts_with("HTTP/1.1 200"));
    let text = edge.metrics().await;
    assert_eq!(metric(&text, IN_FLIGHT, &[]), 1.0, "the stalled stream is in flight");
    assert_eq!(metric_or_zero(&text, REQUESTS, &[]), 0.0);

    drop(s);
    wait_for(&edge, IN_FLIGHT, &[], 0.0).await;
    let text = edge.metrics().await;
    let closed = ["tenant=\"acme\"", "model=\"gpt-test\"", "target=\"oa\"", "status=\"client_closed\""];
    assert_eq!(metric(&text, REQUESTS, &closed), 1.0);
    assert_eq!(metric(&text, REQUESTS, &[]), 1.0);
    assert_eq!(metric(&text, TTFT_COUNT, &["target=\"oa\""]), 1.0, "its first token arrived before it ended");

    // The slot it held is free: a node with one slot serves the next request.
    let r = edge.post(OPENAI, ACME_KEY, &chat("after")).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_client_gone_while_waiting_for_upstream_leaves_no_request_in_flight() {
    let mocks = Mocks::start().await;
    let mut cfg = mocks.config();
    cfg.target_mut("oa").first_byte_timeout_ms = 30_000;
    cfg.node.max_in_flight = 1;
    let edge = TestEdge::start(cfg).await;

    mocks.openai.push(Behavior::Hang);
    let body = chat("never answered").to_string();
    let s = RawConn::post(edge.addr, OPENAI, ACME_KEY, &[], &body).await;
    let start = Instant::now();
    while mocks.openai.request_count() == 0 {
        assert!(start.elapsed() < Duration::from_secs(3), "the request reaches the mock");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(metric(&edge.metrics().await, IN_FLIGHT, &[]), 1.0);

    drop(s);
    wait_for(&edge, IN_FLIGHT, &[], 0.0).await;
    let closed = ["tenant=\"acme\"", "model=\"gpt-test\"", "status=\"client_closed\""];
    assert_eq!(metric(&edge.metrics().await, REQUESTS, &closed), 1.0);
    assert_eq!(edge.post(OPENAI, ACME_KEY, &chat("after")).await.status, 200, "its slot is free");
}

#[tokio::test]
async fn model_names_a_client_makes_up_add_no_series() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    // The series labelled by model (other series, the ledger's say, come and go on their own).
    let series = |text: &str| text.lines().filter(|l| !l.starts_with('#') && l.contains("model=\"")).count();
    assert_eq!(edge.post(OPENAI, ACME_KEY, &chat("first")).await.status, 200);
    let before = series(&edge.metrics().await);

    for n in 0..1_000 {
        let body = json!({"model": format!("made-up-{n}"), "messages": [{"role": "user", "content": "x"}]});
        let r = edge.post(OPENAI, ACME_KEY, &body).await;
        assert_eq!((r.status, r.error_code()), (404, "model_not_found".to_string()), "{}", r.text());
    }
    let text = edge.metrics().await;
    let unknown = ["tenant=\"acme\"", "model=\"unknown\"", "status=\"model_not_found\""];
    assert_eq!(metric(&text, REQUESTS, &unknown), 1_000.0);
    assert!(!text.contains("made-up-"), "no client's name is a label: {text}");
    // One new series for all of them; the served model keeps its own.
    assert_eq!(series(&text), before + 1, "{text}");
    assert_eq!(metric(&text, REQUESTS, &labels(&acme_ok("openai"))), 1.0);
}

#[tokio::test]
async fn observer_keys_guard_metrics_and_readiness() {
    let mocks = Mocks::start().await;
    let mut cfg = mocks.config();
    cfg.node.observer_keys = vec![hash_key("sk-prometheus")];
    cfg.node.admin_keys = vec![hash_key("sk-admin")];
    let edge = TestEdge::start(cfg).await;
    for path in ["/metrics", "/readyz"] {
        for key in [None, Some("sk-wrong"), Some(ACME_KEY)] {
            let r = edge.send("GET", path, key, &[], "".into()).await;
            assert_eq!(
                (r.status, r.error_code()),
                (401, "unauthorized".to_string()),
                "{path} with {key:?}: {}",
                r.text()
            );
        }
        for key in ["sk-prometheus", "sk-admin"] {
            let r = edge.send("GET", path, Some(key), &[], "".into()).await;
            assert_eq!(r.status, 200, "{path} with {key}: {}", r.text());
        }
    }
    let r = edge.send("GET", "/metrics", Some("sk-prometheus"), &[], "".into()).await;
    assert!(r.text().contains("# TYPE meridian_requests_total counter"), "{}", r.text());
    assert_eq!(edge.send("GET", "/healthz", None, &[], "".into()).await.status, 200, "liveness stays open");
}

#[tokio::test]
async fn without_observer_keys_metrics_and_readiness_are_open() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    for path in ["/metrics", "/readyz"] {
        assert_eq!(edge.send("GET", path, None, &[], "".into()).await.status, 200, "{path}");
    }
}
