//! The edge in front of real engine nodes: SmolLM2 (int4) and MiniLM on ONNX Runtime, reached over
//! QUIC with mutual TLS. Both client API shapes, whole and streamed; embeddings; a client that
//! goes away cancels its generation on the engine; a killed engine is fallen back from with no
//! request lost; a request too large for the engine's frames is the client's 413, never the
//! engine's failure; 2 048 embeddings in one request, as floats or base64; a draining engine
//! refuses new requests at once and the edge goes to the next; the engine's prefix cache counters
//! reach the edge's metrics.

use std::time::{Duration, Instant};

use meridian::config::Config;
use meridian_e2e::engine::{Cluster, EngineProcess, TestEngine};
use meridian_e2e::raw::RawConn;
use meridian_e2e::{metric, metric_or_zero, model, ConfigExt, Mocks, Reply, TestEdge, ACME_KEY};
use serde_json::{json, Value};

const QUESTION: &str = "What is the capital of France? Answer in one sentence.";
const NO_CACHE: (&str, &str) = ("x-meridian-cache", "bypass");

/// An edge whose model `smol` (and `minilm`) goes to the given engine targets, in order.
pub(crate) async fn edge(
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
    // The production default, four times an engine's frame: what a client may send is more than
    // one engine request can carry.
    config.node.max_body_bytes = 4 << 20;
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

    // Four requests with one prompt: the engine began the last three from its prefix cache (the
    // same answers above show it changed nothing), and the edge's probes bring its counters in.
    let target = ["target=\"engine-a\""];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = edge.metrics().await;
        let hits = metric_or_zero(&m, "meridian_engine_prefix_cache_hits_total", &target);
        if hits >= 3.0 {
            assert!(metric(&m, "meridian_engine_prefix_cache_tokens_reused_total", &target) >= 3.0 * 16.0, "{m}");
            assert!(metric(&m, "meridian_engine_prefix_cache_bytes", &target) > 0.0, "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "the engine's prefix cache hits reach the edge: {hits}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let mut conn = RawConn::post(edge.addr, "/v1/chat/completions", ACME_KEY, &[], &body).await;
    conn.read_until(&["\"content\""]).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_large_for_the_engine_frames_is_413_in_both_shapes_and_no_fault_of_the_engine() {
    let stack = Stack::start("too-large", 2).await;
    let edge = &stack.edge;
    // 1.5 MiB of text: within the edge's 4 MiB body limit, past the engine's 1 MiB frames.
    let big = "word ".repeat(300_000);
    let mut openai = json!({"model": "smol", "max_tokens": 8, "messages": [{"role": "user", "content": big}]});
    let mut anthropic = openai.clone();
    // More requests than it takes to eject a target (5 failures in a row) if they counted.
    for stream in [false, true, false] {
        openai["stream"] = json!(stream);
        anthropic["stream"] = json!(stream);
        let r = edge.post_with("/v1/chat/completions", ACME_KEY, &[NO_CACHE], &openai).await;
        assert_eq!(r.status, 413, "{}", r.text());
        let error = &r.json()["error"];
        assert_eq!((&error["type"], &error["code"]), (&json!("invalid_request_error"), &json!("payload_too_large")));
        assert!(error["message"].as_str().unwrap().contains("engine-a"), "{error}");
        let r = edge.post_with("/v1/messages", ACME_KEY, &[NO_CACHE], &anthropic).await;
        assert_eq!(r.status, 413, "{}", r.text());
        assert_eq!(r.json()["type"], "error");
        assert_eq!(r.json()["error"]["type"], "invalid_request_error", "{}", r.text());
    }

    let metrics = edge.metrics().await;
    let target = ["target=\"engine-a\""];
    assert_eq!(metric(&metrics, "meridian_target_health", &target), 1.0, "the engine is healthy");
    assert_eq!(metric_or_zero(&metrics, "meridian_target_ejections_total", &target), 0.0);
    assert_eq!(
        metric_or_zero(&metrics, "meridian_upstream_attempts_total", &[target[0], "outcome=\"request_too_large\""]),
        6.0
    );
    let failures = ["connect", "timeout", "server_error", "protocol", "overloaded"];
    for outcome in failures {
        let label = format!("outcome=\"{outcome}\"");
        assert_eq!(
            metric_or_zero(&metrics, "meridian_upstream_attempts_total", &[target[0], &label]),
            0.0,
            "{outcome}"
        );
    }
    // And it serves the next request.
    let r = edge.post_with("/v1/chat/completions", ACME_KEY, &[NO_CACHE], &openai_chat(false, 4)).await;
    assert_eq!((r.status, r.header("x-meridian-target")), (200, Some("engine-a")), "{}", r.text());
}

fn sentences(n: usize) -> Vec<String> {
    // A few tokens each: embedding is compute bound, and 2 048 long sentences take minutes on CPU.
    let topics = ["cat", "sea", "market", "hill"];
    (0..n).map(|i| format!("{} {i}", topics[i % 4])).collect()
}

/// The vectors of an OpenAI embeddings answer, by their `index`; base64 ones decoded.
fn vectors(r: &Reply) -> Vec<Vec<f32>> {
    use base64::Engine as _;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let data = body["data"].as_array().expect("data");
    data.iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"], i);
            match &d["embedding"] {
                Value::String(b64) => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .expect("base64")
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                floats => floats.as_array().expect("floats").iter().map(|x| x.as_f64().unwrap() as f32).collect(),
            }
        })
        .collect()
}

/// POSTs an embeddings request, waiting as long as an unoptimised build takes to embed 2 048 texts
/// and write their vectors (the harness's own requests wait 20 s).
async fn post_embeddings(edge: &TestEdge, body: &Value) -> Reply {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = hyper::Request::post(format!("{}/v1/embeddings", edge.url()))
        .header("authorization", format!("Bearer {ACME_KEY}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let started = Instant::now();
    let resp =
        tokio::time::timeout(Duration::from_secs(300), client.request(req)).await.unwrap().expect("the edge answers");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    eprintln!("embeddings answered in {:?}", started.elapsed());
    Reply { status, headers, body }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_and_forty_eight_embeddings_in_one_request_equal_those_of_smaller_ones() {
    let stack = Stack::start("embed-many", 2).await;
    let edge = &stack.edge;
    let input = sentences(2048);
    let all = vectors(&post_embeddings(edge, &json!({"model": "minilm", "input": input})).await);
    assert_eq!(all.len(), 2048);
    assert!(all.iter().all(|v| v.len() == 384));
    for range in [0..16, 1000..1040, 2040..2048] {
        let start = range.start;
        let some =
            vectors(&edge.post("/v1/embeddings", ACME_KEY, &json!({"model": "minilm", "input": input[range]})).await);
        for (k, v) in some.iter().enumerate() {
            let diff = v.iter().zip(&all[start + k]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "text {}: differs by {diff} from the large request", start + k);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_embeddings_are_the_float_ones_and_other_encodings_are_refused() {
    let stack = Stack::start("embed-b64", 2).await;
    let edge = &stack.edge;
    let input = sentences(40);
    let float = vectors(&edge.post("/v1/embeddings", ACME_KEY, &json!({"model": "minilm", "input": input})).await);
    let explicit = json!({"model": "minilm", "input": input, "encoding_format": "float"});
    assert_eq!(vectors(&edge.post("/v1/embeddings", ACME_KEY, &explicit).await), float);
    let b64 = edge
        .post("/v1/embeddings", ACME_KEY, &json!({"model": "minilm", "input": input, "encoding_format": "base64"}))
        .await;
    assert!(b64.json()["data"][0]["embedding"].is_string(), "{}", b64.text());
    assert_eq!(b64.json()["usage"], edge.post("/v1/embeddings", ACME_KEY, &explicit).await.json()["usage"]);
    // The same float32 values, bit for bit (a float written as JSON reads back exactly).
    assert_eq!(vectors(&b64), float);

    let r = edge
        .post("/v1/embeddings", ACME_KEY, &json!({"model": "minilm", "input": "x", "encoding_format": "int8"}))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "encoding_format");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_engine_refuses_new_requests_at_once_and_the_edge_goes_to_the_next() {
    let mocks = Mocks::start().await;
    let cluster = Cluster::new("drain");
    // A grace period far longer than the test: only the running request keeps engine-a draining.
    let mut primary = TestEngine::start_with_grace(&cluster, "engine-a", 2, Duration::from_secs(600)).await;
    let fallback = TestEngine::start(&cluster, "engine-b", 2).await;
    let edge = edge(&mocks, &cluster, &[("engine-a", primary.addr), ("engine-b", fallback.addr)], |_| {}).await;

    // A long answer from engine-a, streamed over a raw connection, that keeps it draining.
    let body = json!({"model": "smol", "stream": true, "max_tokens": 4000, "temperature": 0.8, "seed": 1,
                      "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}]})
    .to_string();
    let mut conn = RawConn::post(edge.addr, "/v1/chat/completions", ACME_KEY, &[NO_CACHE], &body).await;
    let seen = conn.read_until(&["\"content\""]).await;
    assert!(seen.contains("x-meridian-target: engine-a"), "{seen}");

    primary.drain();
    // Until engine-a's connection sees the drain, it still serves; from then on it refuses, and
    // the request goes to engine-b.
    let answered = loop {
        let r = edge.post_with("/v1/chat/completions", ACME_KEY, &[NO_CACHE], &openai_chat(false, 4)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        if r.header("x-meridian-target") == Some("engine-b") {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        !primary.stopped(),
        "engine-b answered while engine-a still drained its running request: {}",
        answered.text()
    );

    let metrics = edge.metrics().await;
    let target = "target=\"engine-a\"";
    assert!(metric(&metrics, "meridian_upstream_attempts_total", &[target, "outcome=\"draining\""]) >= 1.0);
    assert_eq!(metric(&metrics, "meridian_target_health", &[target]), 1.0, "a draining engine has not failed");

    // The client goes away; engine-a's last request ends, and it stops.
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !primary.stopped() {
        assert!(Instant::now() < deadline, "engine-a did not stop once its last request was gone");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
