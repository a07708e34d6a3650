//! The edge in front of real engine nodes: SmolLM2 (int4) and MiniLM on ONNX Runtime, reached over
//! QUIC with mutual TLS. Both client API shapes, whole and streamed; embeddings; a client that
//! goes away cancels its generation on the engine; a killed engine is fallen back from with no
//! request lost.

use std::time::{Duration, Instant};

use meridian::config::Config;
use meridian_e2e::engine::{Cluster, EngineProcess, TestEngine};
use meridian_e2e::{metric, model, ConfigExt, Mocks, Reply, TestEdge, ACME_KEY};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const QUESTION: &str = "What is the capital of France? Answer in one sentence.";
const NO_CACHE: (&str, &str) = ("x-meridian-cache", "bypass");

/// An edge whose model `smol` (and `minilm`) goes to the given engine targets, in order.
async fn edge(
    mocks: &Mocks,
    cluster: &Cluster,
    engines: &[(&str, std::net::SocketAddr)],
    tweak: impl FnOnce(&mut Config),
) -> TestEdge {
    let mut config = mocks.config();
    for (name, addr) in engines {
        cluster.add_engine_target(&mut config, "edge-test", name, name, *addr);
    }
    let routes: Vec<(&str, Option<&str>)> = engines.iter().map(|(name, _)| (*name, None)).collect();
    let mut smol = model("smol", &routes);
    smol.default_max_tokens = 64;
    config.models.extend([smol, model("minilm", &routes)]);
    tweak(&mut config);
    TestEdge::start(config).await
}

/// Mock managed APIs (unused by these models, but part of every test edge), one engine, and an
/// edge in front of it.
struct Stack {
    _mocks: Mocks,
    cluster: Cluster,
    engine: TestEngine,
    edge: TestEdge,
}

impl Stack {
    async fn start(label: &str, max_batch: u32) -> Stack {
        let mocks = Mocks::start().await;
        let cluster = Cluster::new(label);
        let engine = TestEngine::start(&cluster, "engine-a", max_batch).await;
        let edge = edge(&mocks, &cluster, &[("engine-a", engine.addr)], |_| {}).await;
        Stack { _mocks: mocks, cluster, engine, edge }
    }
}

fn openai_chat(stream: bool, max_tokens: u32) -> Value {
    json!({"model": "smol", "stream": stream, "temperature": 0, "max_tokens": max_tokens,
           "stream_options": {"include_usage": true},
           "messages": [{"role": "user", "content": QUESTION}]})
}

fn streamed_text(r: &Reply) -> String {
    r.event_json().iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_api_shapes_answer_from_the_engine_whole_and_streamed() {
    let stack = Stack::start("shapes", 4).await;
    let edge = &stack.edge;

    let whole = edge.post_with("/v1/chat/completions", ACME_KEY, &[NO_CACHE], &openai_chat(false, 32)).await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    assert_eq!(whole.header("x-meridian-target"), Some("engine-a"));
    let body = whole.json();
    let text = body["choices"][0]["message"]["content"].as_str().expect("text answer").to_string();
    assert!(text.contains("Paris"), "the model answers the question: {text:?}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 10, "{body}");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{body}");

    let streamed = edge.post_with("/v1/chat/completions", ACME_KEY, &[NO_CACHE], &openai_chat(true, 32)).await;
    assert_eq!(streamed.status, 200, "{}", streamed.text());
    assert_eq!(streamed.events().last().map(|e| e.data.as_str()), Some("[DONE]"));
    assert_eq!(streamed_text(&streamed), text, "greedy: the stream says what the whole answer said");
    let usage = streamed.event_json().into_iter().find(|c| c["usage"].is_object()).expect("usage chunk");
    assert_eq!(usage["usage"]["completion_tokens"], body["usage"]["completion_tokens"]);

    let anthropic = json!({"model": "smol", "max_tokens": 32, "temperature": 0,
                           "messages": [{"role": "user", "content": QUESTION}]});
    let a_whole = edge.post_with("/v1/messages", ACME_KEY, &[NO_CACHE], &anthropic).await;
    assert_eq!(a_whole.status, 200, "{}", a_whole.text());
    assert_eq!(a_whole.json()["content"][0]["text"], text.as_str());
    assert_eq!(a_whole.json()["stop_reason"], "end_turn");
    let mut a_stream_body = anthropic.clone();
    a_stream_body["stream"] = json!(true);
    let a_stream = edge.post_with("/v1/messages", ACME_KEY, &[NO_CACHE], &a_stream_body).await;
    assert_eq!(a_stream.status, 200, "{}", a_stream.text());
    let kinds: Vec<String> = a_stream.events().iter().filter_map(|e| e.event.clone()).collect();
    assert_eq!(kinds.first().map(String::as_str), Some("message_start"));
    assert_eq!(kinds.last().map(String::as_str), Some("message_stop"));
    let a_text: String =
        a_stream.event_json().iter().filter_map(|e| e["delta"]["text"].as_str().map(str::to_string)).collect();
    assert_eq!(a_text, text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_an_engine_cannot_serve_are_refused_with_a_clear_error() {
    let stack = Stack::start("refusals", 2).await;
    let edge = &stack.edge;

    let mut tools = openai_chat(false, 8);
    tools["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let r = edge.post("/v1/chat/completions", ACME_KEY, &tools).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("text chat only"), "{}", r.text());

    let long = "word ".repeat(9000);
    let r = edge
        .post(
            "/v1/chat/completions",
            ACME_KEY,
            &json!({"model": "smol", "messages": [{"role": "user", "content": long}]}),
        )
        .await;
    assert_eq!(r.status, 400, "a prompt beyond the context is the client's fault: {}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_come_from_the_engine() {
    let stack = Stack::start("embed", 2).await;
    let edge = &stack.edge;

    let input = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."];
    let r = edge.post("/v1/embeddings", ACME_KEY, &json!({"model": "minilm", "input": input})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["object"], "list");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let vectors: Vec<Vec<f64>> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"], i);
            d["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
        })
        .collect();
    assert_eq!(vectors.len(), 3);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for v in &vectors {
        assert_eq!(v.len(), 384);
        assert!((dot(v, v) - 1.0).abs() < 1e-3, "unit length");
    }
    assert!(dot(&vectors[0], &vectors[1]) > dot(&vectors[0], &vectors[2]) + 0.3, "similar texts are closer");

    let one = edge.post("/v1/embeddings", ACME_KEY, &json!({"model": "minilm", "input": input[0]})).await;
    assert_eq!(one.status, 200, "{}", one.text());
    let single: Vec<f64> =
        one.json()["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert!(dot(&single, &vectors[0]) > 0.9999, "a text embeds the same alone and in a batch");

    let r = edge.post("/v1/embeddings", ACME_KEY, &json!({"model": "nope", "input": "x"})).await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = edge.post("/v1/embeddings", ACME_KEY, &json!({"model": "minilm", "input": []})).await;
    assert_eq!(r.status, 400, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_engine_slot() {
    let stack = Stack::start("cancel", 2).await;
    let edge = &stack.edge;
    let (cluster, engine) = (&stack.cluster, &stack.engine);
    let probe = cluster.client("probe", "engine-a", engine.addr);

    // A long answer, streamed over a raw connection that is dropped after the first chunk.
    let body = json!({"model": "smol", "stream": true, "max_tokens": 4000, "temperature": 0.8, "seed": 1,
                      "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}]})
    .to_string();
    let mut conn = tokio::net::TcpStream::connect(edge.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ACME_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"content\"") {
        let n = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(probe.health().await.unwrap().active_sequences, 1, "the story is being generated");
    drop(conn);

    let start = Instant::now();
    loop {
        let health = probe.health().await.unwrap();
        if health.active_sequences == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the slot is still busy 5 s after the client left: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_engine_falls_back_with_no_request_lost() {
    let mocks = Mocks::start().await;
    let cluster = Cluster::new("kill");
    let mut primary = EngineProcess::start(&cluster, "engine-a", 4).await;
    let fallback = TestEngine::start(&cluster, "engine-b", 4).await;
    let edge = edge(&mocks, &cluster, &[("engine-a", primary.addr), ("engine-b", fallback.addr)], |c| {
        // A dead engine says nothing: the edge notices by its own timeouts.
        for name in ["engine-a", "engine-b"] {
            let t = c.target_mut(name);
            t.connect_timeout_ms = 1_000;
            t.chunk_timeout_ms = 2_000;
        }
    })
    .await;

    let clients = 4;
    let rounds = 4;
    let served = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let broken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let url = edge.url();
        let served = std::sync::Arc::clone(&served);
        let broken = std::sync::Arc::clone(&broken);
        tasks.push(tokio::spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
            for round in 0..rounds {
                let stream = (c + round) % 2 == 0;
                let body = json!({"model": "smol", "stream": stream, "max_tokens": 48, "temperature": 0.7, "seed": round,
                                  "messages": [{"role": "user", "content": format!("Tell me fact number {c}-{round} about the sea.")}]});
                let req = hyper::Request::post(format!("{url}/v1/chat/completions"))
                    .header("authorization", format!("Bearer {ACME_KEY}"))
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
                    .unwrap();
                let resp = client.request(req).await.expect("the edge answers");
                let status = resp.status().as_u16();
                let target = resp.headers().get("x-meridian-target").map(|v| v.to_str().unwrap().to_string());
                let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
                let text = String::from_utf8_lossy(&body).into_owned();
                assert_eq!(status, 200, "client {c} round {round}: {text}");
                if stream {
                    // A stream that was mid-answer when its engine died cannot move to another
                    // engine (the client has part of the answer): it ends with a typed error,
                    // never silently truncated. One that had not begun falls back unseen.
                    if let Some(at) = text.find("\"error\"") {
                        assert!(text[..at].contains("\"content\":\""), "an error before any content: {text}");
                        assert!(text[at..].contains("engine-a"), "{text}");
                        broken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    } else {
                        assert!(text.trim_end().ends_with("data: [DONE]"), "client {c} round {round}: {text}");
                    }
                }
                served.lock().unwrap().push(target.unwrap_or_default());
            }
        }));
    }
    // Kill the primary once it has answered someone.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !served.lock().unwrap().iter().any(|t| t == "engine-a") {
        assert!(Instant::now() < deadline, "the primary engine never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    primary.kill();
    for t in tasks {
        t.await.expect("every client got its answers");
    }
    let served = served.lock().unwrap().clone();
    assert_eq!(served.len(), clients * rounds, "every request was answered");
    assert!(served.iter().any(|t| t == "engine-b"), "the fallback engine took over: {served:?}");
    let metrics = edge.metrics().await;
    let name = "meridian_upstream_attempts_total";
    let a_ok = metric(&metrics, name, &["target=\"engine-a\"", "outcome=\"ok\""]);
    let a_all = metric(&metrics, name, &["target=\"engine-a\""]);
    assert!(a_ok > 0.0 && a_all > a_ok, "engine-a answered, then its failures were recorded: {a_ok} ok of {a_all}");
    let broken = broken.load(std::sync::atomic::Ordering::Relaxed);
    assert!(broken <= clients, "only streams in flight at the kill may break: {broken}");
    eprintln!(
        "{} requests: {} by engine-b after the kill, {broken} streams cut mid-answer with a typed error",
        served.len(),
        served.iter().filter(|t| *t == "engine-b").count()
    );
}
