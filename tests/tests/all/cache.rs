//! The edge prompt cache: what is cached, per tenant, coalescing of identical requests in flight,
//! never caching failures, and serving streamed and whole answers from one entry; and its level
//! shared by a region's edges through a real `redis-server`: a prompt cached by one edge is a hit
//! on another, identical misses on two edges make one upstream call, and killing Redis mid-load
//! loses no request.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian::config::CachePolicy;
use meridian_e2e::servers::Redis;
use meridian_e2e::{metric, Behavior, ConfigExt, Mocks, Reply, TestEdge, ACME_KEY, GLOBEX_KEY};
use serde_json::{json, Value};

const OPENAI: &str = "/v1/chat/completions";

fn request(text: &str, extra: Value) -> Value {
    let mut body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": text}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn cache_status(r: &Reply) -> &str {
    r.header("x-meridian-cache").unwrap_or("<none>")
}

fn answer(r: &Reply) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// The text of an OpenAI stream, and whether it ended with `[DONE]`.
fn streamed_text(r: &Reply) -> (String, bool) {
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.event_json().iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    (text, r.events().last().is_some_and(|e| e.data == "[DONE]"))
}

#[tokio::test]
async fn deterministic_requests_are_cached_and_others_bypass() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;

    let body = request("cache me", json!({"temperature": 0}));
    let first = edge.post(OPENAI, ACME_KEY, &body).await;
    assert_eq!(cache_status(&first), "miss");
    assert_eq!(first.header("x-meridian-target"), Some("oa"));
    let second = edge.post(OPENAI, ACME_KEY, &body).await;
    assert_eq!(cache_status(&second), "hit");
    assert_eq!(answer(&second), answer(&first), "the stored answer, id included");
    assert_eq!(answer(&second)["choices"][0]["message"]["content"], "Echo: cache me");
    assert_eq!(mocks.openai.request_count(), 1, "a hit does not go upstream");

    let seeded = request("seeded", json!({"temperature": 0.9, "seed": 42}));
    assert_eq!(cache_status(&edge.post(OPENAI, ACME_KEY, &seeded).await), "miss");
    assert_eq!(cache_status(&edge.post(OPENAI, ACME_KEY, &seeded).await), "hit");
    assert_eq!(mocks.openai.request_count(), 2);
    let other_seed = request("seeded", json!({"temperature": 0.9, "seed": 43}));
    assert_eq!(cache_status(&edge.post(OPENAI, ACME_KEY, &other_seed).await), "miss", "the seed is part of the key");

    let hot = request("hot", json!({"temperature": 0.7}));
    let a = edge.post(OPENAI, ACME_KEY, &hot).await;
    let b = edge.post(OPENAI, ACME_KEY, &hot).await;
    assert_eq!((cache_status(&a), cache_status(&b)), ("bypass", "bypass"));
    assert_ne!(answer(&a)["id"], answer(&b)["id"], "each came from upstream");
    let unset = request("no temperature", json!({}));
    assert_eq!(cache_status(&edge.post(OPENAI, ACME_KEY, &unset).await), "bypass");
    assert_eq!(cache_status(&edge.post(OPENAI, ACME_KEY, &unset).await), "bypass");
    assert_eq!(mocks.openai.request_count(), 7);
}

#[tokio::test]
async fn client_headers_steer_the_cache() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;

    let cold = request("no store", json!({"temperature": 0}));
    for _ in 0..2 {
        let r = edge.post_with(OPENAI, ACME_KEY, &[("cache-control", "no-store")], &cold).await;
        assert_eq!(cache_status(&r), "bypass");
    }
    assert_eq!(mocks.openai.request_count(), 2);
    assert_eq!(cache_status(&edge.post(OPENAI, ACME_KEY, &cold).await), "miss", "no-store did not store it");

    let hot = request("forced", json!({"temperature": 0.7}));
    let force = [("x-meridian-cache", "force")];
    let a = edge.post_with(OPENAI, ACME_KEY, &force, &hot).await;
    let b = edge.post_with(OPENAI, ACME_KEY, &force, &hot).await;
    assert_eq!((cache_status(&a), cache_status(&b)), ("miss", "hit"));
    assert_eq!(answer(&a), answer(&b));
    assert_eq!(mocks.openai.request_count(), 4);

    let skip = [("x-meridian-cache", "bypass")];
    let r = edge.post_with(OPENAI, ACME_KEY, &skip, &cold).await;
    assert_eq!(cache_status(&r), "bypass", "the header skips even a stored answer");
    assert_eq!(mocks.openai.request_count(), 5);
    assert_eq!(cache_status(&edge.post(OPENAI, ACME_KEY, &cold).await), "hit", "and leaves it stored");
    assert_eq!(mocks.openai.request_count(), 5);
}

#[tokio::test]
async fn tenants_do_not_share_answers() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let body = request("shared prompt", json!({"temperature": 0}));

    let acme = edge.post(OPENAI, ACME_KEY, &body).await;
    assert_eq!(cache_status(&acme), "miss");
    let globex = edge.post(OPENAI, GLOBEX_KEY, &body).await;
    assert_eq!(cache_status(&globex), "miss", "another tenant's answer is not served");
    assert_ne!(answer(&acme)["id"], answer(&globex)["id"]);
    assert_eq!(mocks.openai.request_count(), 2);
    assert_eq!(cache_status(&edge.post(OPENAI, GLOBEX_KEY, &body).await), "hit");
    assert_eq!(answer(&edge.post(OPENAI, ACME_KEY, &body).await)["id"], answer(&acme)["id"]);
    assert_eq!(mocks.openai.request_count(), 2);
}

#[tokio::test]
async fn a_tenant_with_cache_never_always_bypasses() {
    let mocks = Mocks::start().await;
    let mut cfg = mocks.config();
    cfg.tenant_mut("globex").cache = CachePolicy::Never;
    let edge = TestEdge::start(cfg).await;
    let body = request("never", json!({"temperature": 0}));

    for headers in [&[][..], &[("x-meridian-cache", "force")][..], &[][..]] {
        let r = edge.post_with(OPENAI, GLOBEX_KEY, headers, &body).await;
        assert_eq!(cache_status(&r), "bypass");
        assert_eq!(r.status, 200);
    }
    assert_eq!(mocks.openai.request_count(), 3);
    assert_eq!(cache_status(&edge.post(OPENAI, ACME_KEY, &body).await), "miss", "other tenants still cache");
}

async fn concurrent(edge: &Arc<TestEdge>, body: &Value, n: usize) -> Vec<Reply> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let edge = Arc::clone(edge);
            let body = body.clone();
            tokio::spawn(async move { edge.post(OPENAI, ACME_KEY, &body).await })
        })
        .collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.expect("request task"));
    }
    replies
}

fn count(replies: &[Reply], status: &str) -> usize {
    replies.iter().filter(|r| cache_status(r) == status).count()
}

#[tokio::test]
async fn identical_requests_in_flight_make_one_upstream_call() {
    let mocks = Mocks::start().await;
    let edge = Arc::new(TestEdge::start(mocks.config()).await);

    mocks.openai.push(Behavior::Delay(Duration::from_millis(300)));
    let body = request("together", json!({"temperature": 0}));
    let replies = concurrent(&edge, &body, 8).await;
    assert_eq!(mocks.openai.request_count(), 1, "coalesced into one upstream call");
    assert_eq!((count(&replies, "miss"), count(&replies, "hit")), (1, 7));
    let first = answer(&replies[0]);
    assert!(replies.iter().all(|r| answer(r) == first), "everyone gets the same answer");

    mocks.openai.push(Behavior::Delay(Duration::from_millis(300)));
    let body = request("streamed together", json!({"temperature": 0, "stream": true}));
    let replies = concurrent(&edge, &body, 8).await;
    assert_eq!(mocks.openai.request_count(), 2, "coalesced into one upstream call");
    assert_eq!((count(&replies, "miss"), count(&replies, "hit")), (1, 7));
    for r in &replies {
        assert_eq!(streamed_text(r), ("Echo: streamed together".to_string(), true));
    }
}

#[tokio::test]
async fn failed_answers_are_not_cached() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let body = request("flaky", json!({"temperature": 0}));

    mocks.openai.push(Behavior::Status(500));
    assert_eq!(edge.post(OPENAI, ACME_KEY, &body).await.status, 502);
    let r = edge.post(OPENAI, ACME_KEY, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(cache_status(&r), "miss", "the error was not stored");
    assert_eq!(mocks.openai.request_count(), 2);
    assert_eq!(cache_status(&edge.post(OPENAI, ACME_KEY, &body).await), "hit");
    assert_eq!(mocks.openai.request_count(), 2);

    // A truncated stream is not a complete answer.
    let streamed = request("cut short", json!({"temperature": 0, "stream": true}));
    mocks.openai.push(Behavior::CutAfter(2));
    let r = edge.post(OPENAI, ACME_KEY, &streamed).await;
    assert_eq!(cache_status(&r), "miss");
    let (text, done) = streamed_text(&r);
    assert!(!done, "a cut stream does not end with [DONE]: {}", r.text());
    assert_eq!(text, "Echo: cut ");
    let r = edge.post(OPENAI, ACME_KEY, &streamed).await;
    assert_eq!(cache_status(&r), "miss", "the truncated stream was not stored");
    assert_eq!(streamed_text(&r), ("Echo: cut short".to_string(), true));
    assert_eq!(mocks.openai.request_count(), 4);

    // Nor is one that ends in an error event.
    let streamed = request("broken stream", json!({"temperature": 0, "stream": true}));
    mocks.openai.push(Behavior::StreamError(1));
    assert_eq!(cache_status(&edge.post(OPENAI, ACME_KEY, &streamed).await), "miss");
    assert_eq!(cache_status(&edge.post(OPENAI, ACME_KEY, &streamed).await), "miss");
    assert_eq!(cache_status(&edge.post(OPENAI, ACME_KEY, &streamed).await), "hit");
    assert_eq!(mocks.openai.request_count(), 6);
}

#[tokio::test]
async fn a_streamed_answer_replays_as_a_stream_and_serves_whole_requests() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;

    let streamed = request("one two three", json!({"temperature": 0, "stream": true}));
    let first = edge.post(OPENAI, ACME_KEY, &streamed).await;
    assert_eq!(cache_status(&first), "miss");
    let replay = edge.post(OPENAI, ACME_KEY, &streamed).await;
    assert_eq!(cache_status(&replay), "hit");
    assert_eq!(replay.header("content-type"), Some("text/event-stream"));
    assert_eq!(streamed_text(&first), ("Echo: one two three".to_string(), true));
    assert_eq!(streamed_text(&replay), streamed_text(&first));
    assert!(replay.event_json().len() >= 4, "replayed as events, not one blob: {}", replay.text());
    let finish: Vec<_> = replay
        .event_json()
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str().map(str::to_string))
        .collect();
    assert_eq!(finish, ["stop"]);

    let whole = request("one two three", json!({"temperature": 0}));
    let r = edge.post(OPENAI, ACME_KEY, &whole).await;
    assert_eq!(cache_status(&r), "hit", "a stored stream serves a whole request");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = answer(&r);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "Echo: one two three");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(mocks.openai.request_count(), 1);

    // And a stored whole answer serves a stream.
    let whole = request("four five", json!({"temperature": 0}));
    assert_eq!(cache_status(&edge.post(OPENAI, ACME_KEY, &whole).await), "miss");
    let streamed = request("four five", json!({"temperature": 0, "stream": true}));
    let r = edge.post(OPENAI, ACME_KEY, &streamed).await;
    assert_eq!(cache_status(&r), "hit");
    assert_eq!(streamed_text(&r), ("Echo: four five".to_string(), true));
    assert_eq!(mocks.openai.request_count(), 2);
}

#[tokio::test]
async fn an_answer_is_shared_across_api_shapes_for_the_same_canonical_request() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;

    let openai = json!({"model": "gpt-test", "max_tokens": 50, "temperature": 0,
        "messages": [{"role": "user", "content": "either shape"}]});
    let r = edge.post(OPENAI, ACME_KEY, &openai).await;
    assert_eq!(cache_status(&r), "miss");
    let anthropic = json!({"model": "gpt-test", "max_tokens": 50, "temperature": 0,
        "messages": [{"role": "user", "content": "either shape"}]});
    let r = edge.send("POST", "/v1/messages", None, &[("x-api-key", ACME_KEY)], anthropic.to_string().into()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(cache_status(&r), "hit");
    let v = r.json();
    assert_eq!(v["type"], "message", "served in the client's own shape");
    assert_eq!(v["content"][0]["text"], "Echo: either shape");
    assert_eq!(mocks.openai.request_count(), 1);
}

/// Two edges in front of `mocks` whose caches share `redis`.
async fn shared_pair(mocks: &Mocks, redis: &Redis) -> (Arc<TestEdge>, Arc<TestEdge>) {
    let config = || {
        let mut c = mocks.config();
        c.cache.redis_url = Some(redis.url());
        c
    };
    (Arc::new(TestEdge::start(config()).await), Arc::new(TestEdge::start(config()).await))
}

#[tokio::test]
async fn a_prompt_cached_by_one_edge_is_a_hit_on_another() {
    let (redis, mocks) = (Redis::start().await, Mocks::start().await);
    let (a, b) = shared_pair(&mocks, &redis).await;
    let body = request("shared between edges", json!({"temperature": 0}));
    let first = a.post(OPENAI, ACME_KEY, &body).await;
    assert_eq!(cache_status(&first), "miss");
    let other = b.post(OPENAI, ACME_KEY, &body).await;
    assert_eq!(cache_status(&other), "hit", "the entry the first edge filled");
    assert_eq!(answer(&other)["choices"][0]["message"]["content"], "Echo: shared between edges");
    assert_eq!(answer(&other)["id"], answer(&first)["id"], "the stored answer");
    let stream = request("shared between edges", json!({"temperature": 0, "stream": true}));
    let streamed = b.post(OPENAI, ACME_KEY, &stream).await;
    assert_eq!(cache_status(&streamed), "hit");
    assert_eq!(streamed_text(&streamed), ("Echo: shared between edges".to_string(), true));
    assert_eq!(mocks.openai.request_count(), 1, "one upstream call for both edges");
    // Entries stay per tenant across edges too.
    assert_eq!(cache_status(&b.post(OPENAI, GLOBEX_KEY, &body).await), "miss");
    assert_eq!(mocks.openai.request_count(), 2);
    let ready = b.send("GET", "/readyz", None, &[], Bytes::new()).await.json();
    assert_eq!(ready["shared_state"]["cache"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_misses_on_two_edges_make_one_upstream_call() {
    let (redis, mocks) = (Redis::start().await, Mocks::start().await);
    let (a, b) = shared_pair(&mocks, &redis).await;
    mocks.openai.push(Behavior::Delay(Duration::from_millis(400)));
    let body = request("asked on both edges at once", json!({"temperature": 0}));
    let (on_a, on_b) = tokio::join!(concurrent(&a, &body, 3), concurrent(&b, &body, 3));
    let replies: Vec<Reply> = on_a.into_iter().chain(on_b).collect();
    assert_eq!(mocks.openai.request_count(), 1, "one upstream call for six requests on two edges");
    assert_eq!((count(&replies, "miss"), count(&replies, "hit")), (1, 5));
    let first = answer(&replies[0]);
    assert!(replies.iter().all(|r| answer(r) == first), "everyone gets the same answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_shared_redis_mid_load_loses_no_request() {
    let (redis, mocks) = (Redis::start().await, Mocks::start().await);
    let (a, b) = shared_pair(&mocks, &redis).await;
    // Requests on both edges throughout, repeats among them; Redis dies a third of the way in.
    let mut redis = Some(redis);
    let mut statuses = Vec::new();
    for i in 0..60 {
        if i == 20 {
            drop(redis.take());
        }
        let edge = if i % 2 == 0 { &a } else { &b };
        // Seven prompts repeat from the start; from the kill on, new ones join them.
        let body = request(&format!("prompt {}", if i < 20 { i % 7 } else { i % 13 }), json!({"temperature": 0}));
        let r = edge.post(OPENAI, ACME_KEY, &body).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        statuses.push(cache_status(&r).to_string());
    }
    assert!(statuses[20..].iter().any(|s| s == "hit"), "each edge's own cache still answers: {statuses:?}");
    assert!(statuses[20..].iter().any(|s| s == "miss"), "new prompts go upstream: {statuses:?}");
    for edge in [&a, &b] {
        // The edges notice within their next ping (every second) even if every lookup was local.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ready = edge.send("GET", "/readyz", None, &[], Bytes::new()).await;
            assert_eq!(ready.status, 200, "an edge without its Redis is still ready");
            if ready.json()["shared_state"]["cache"] == "down" {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{}", ready.text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(metric(&edge.metrics().await, "meridian_shared_state_up", &["store=\"cache\""]), 0.0);
    }
}
