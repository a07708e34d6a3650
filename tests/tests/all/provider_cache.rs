//! Provider prompt caching: the cached-token counts a managed API reports reach the client in
//! either API shape, whole and streamed, through translation both ways; the edge prices them at
//! the target's cache prices; and an Anthropic client's `cache_control` markers reach an
//! Anthropic upstream exactly as they were sent, and never an OpenAI one.

use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian::accounting::PriceModel;
use meridian::config::Config;
use meridian_e2e::{metric_or_zero, Behavior, ConfigExt, MockUpstream, Mocks, Reply, TestEdge, ACME_KEY};
use serde_json::{json, Value};

const COST: &str = "meridian_cost_usd_total";
/// Prompt tokens the mock says its cache served, and took, on a cached request.
const READ: u64 = 3000;
const WRITE: u64 = 200;

/// A target's prices in USD per million tokens, as configured for these tests.
#[derive(Clone, Copy)]
struct Prices {
    input: f64,
    output: f64,
    cached: f64,
    write: f64,
}

/// `an` priced like Anthropic (reads at a tenth of the input price, writes at 1.25×), `oa` like
/// OpenAI (reads at half); every price distinct, so that a count priced at the wrong rate shows.
const AN: Prices = Prices { input: 3.0, output: 15.0, cached: 0.3, write: 3.75 };
const OA: Prices = Prices { input: 1.0, output: 2.0, cached: 0.5, write: 1.25 };

impl Prices {
    fn model(self) -> PriceModel {
        PriceModel::Token {
            input_usd_per_mtok: self.input,
            output_usd_per_mtok: self.output,
            cached_input_usd_per_mtok: Some(self.cached),
            cache_write_usd_per_mtok: Some(self.write),
        }
    }

    /// What `c` costs, written out from the price list.
    fn cost(self, c: Counts) -> f64 {
        let uncached = c.input - c.read - c.write;
        (uncached as f64 * self.input
            + c.read as f64 * self.cached
            + c.write as f64 * self.write
            + c.output as f64 * self.output)
            / 1e6
    }
}

fn priced(mocks: &Mocks) -> Config {
    let mut c = mocks.config();
    c.target_mut("an").price = Some(AN.model());
    c.target_mut("oa").price = Some(OA.model());
    c
}

/// One answer's token counts in canonical terms: `input` counts every prompt token, cached ones
/// included.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counts {
    input: u64,
    read: u64,
    write: u64,
    output: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    OpenAi,
    Anthropic,
}

/// Sends the same prompt (a system prompt and a question) to `model` in `shape`.
async fn ask(edge: &TestEdge, shape: Shape, model: &str, stream: bool) -> Reply {
    let system = "You answer questions about caches, briefly and with care.";
    let question = "what does a prompt cache keep?";
    let r = match shape {
        Shape::OpenAi => {
            let mut body = json!({"model": model, "stream": stream, "messages": [
                {"role": "system", "content": system}, {"role": "user", "content": question}]});
            if stream {
                body["stream_options"] = json!({"include_usage": true});
            }
            edge.post("/v1/chat/completions", ACME_KEY, &body).await
        }
        Shape::Anthropic => {
            let body = json!({"model": model, "max_tokens": 100, "stream": stream, "system": system,
                "messages": [{"role": "user", "content": question}]});
            messages(edge, &body).await
        }
    };
    assert_eq!(r.status, 200, "{}", r.text());
    r
}

/// POSTs an Anthropic Messages request the way Anthropic SDKs do.
async fn messages(edge: &TestEdge, body: &Value) -> Reply {
    let headers = [("x-api-key", ACME_KEY), ("anthropic-version", "2023-06-01")];
    edge.send("POST", "/v1/messages", None, &headers, Bytes::from(body.to_string())).await
}

/// The usage object a reply ends with: the body's, the OpenAI usage chunk's, or the Anthropic
/// `message_delta`'s.
fn final_usage(shape: Shape, r: &Reply) -> Value {
    if r.header("content-type") != Some("text/event-stream") {
        return r.json()["usage"].clone();
    }
    let events = r.event_json();
    let usage = match shape {
        Shape::OpenAi => events.iter().rev().find(|c| c["usage"].is_object()).map(|c| &c["usage"]),
        Shape::Anthropic => events.iter().rev().find(|e| e["type"] == "message_delta").map(|e| &e["usage"]),
    };
    usage.unwrap_or_else(|| panic!("no usage in the stream: {}", r.text())).clone()
}

/// `c` as `shape` says it: OpenAI's `prompt_tokens` counts the cached tokens and names the reads
/// (it has no field for writes); Anthropic's `input_tokens` leaves both out and names each.
fn usage_json(shape: Shape, c: Counts) -> Value {
    match shape {
        Shape::OpenAi => json!({
            "prompt_tokens": c.input,
            "completion_tokens": c.output,
            "total_tokens": c.input + c.output,
            "prompt_tokens_details": {"cached_tokens": c.read},
        }),
        Shape::Anthropic => json!({
            "input_tokens": c.input - c.read - c.write,
            "cache_creation_input_tokens": c.write,
            "cache_read_input_tokens": c.read,
            "output_tokens": c.output,
        }),
    }
}

/// Asks `model` in `shape`, first with nothing cached (which gives the prompt's own tokens), then
/// with `upstream` saying its cache read [`READ`] and wrote [`WRITE`] tokens, whole and streamed;
/// checks every usage the client gets. `writes_reported`: whether the upstream's API reports
/// cache writes (Anthropic's does; OpenAI's bills them as ordinary prompt tokens). Returns what
/// the three requests cost under `prices`.
async fn check_route(
    edge: &TestEdge,
    upstream: &MockUpstream,
    shape: Shape,
    model: &str,
    writes_reported: bool,
    prices: Prices,
) -> f64 {
    let cold = final_usage(shape, &ask(edge, shape, model, false).await);
    let (own, output) = match shape {
        Shape::OpenAi => (&cold["prompt_tokens"], &cold["completion_tokens"]),
        Shape::Anthropic => (&cold["input_tokens"], &cold["output_tokens"]),
    };
    let cold_counts = Counts { input: own.as_u64().unwrap(), read: 0, write: 0, output: output.as_u64().unwrap() };
    assert!(cold_counts.input > 0 && cold_counts.output > 0, "{cold}");
    assert_eq!(cold, usage_json(shape, cold_counts), "{model}: nothing cached");
    let mut cost = prices.cost(cold_counts);

    let cached = Counts {
        input: cold_counts.input + READ + WRITE,
        read: READ,
        write: if writes_reported { WRITE } else { 0 },
        output: cold_counts.output,
    };
    for stream in [false, true] {
        upstream.push(Behavior::PromptCache { read: READ, write: WRITE });
        let r = ask(edge, shape, model, stream).await;
        assert_eq!(final_usage(shape, &r), usage_json(shape, cached), "{model}, stream: {stream}");
        if stream && shape == Shape::Anthropic && writes_reported {
            // Anthropic says the prompt's counts up front, and so does the edge.
            let start = r.event_json().into_iter().find(|e| e["type"] == "message_start").expect("message_start");
            let up_front = Counts { output: 0, ..cached };
            assert_eq!(start["message"]["usage"], usage_json(shape, up_front), "{model}");
        }
        cost += prices.cost(cached);
    }
    cost
}

/// Polls the cost counter of `target` until it is `want`, failing after 10 s.
async fn wait_for_cost(edge: &TestEdge, target: &str, want: f64) {
    let label = format!("target=\"{target}\"");
    let start = Instant::now();
    loop {
        let got = metric_or_zero(&edge.metrics().await, COST, &[&label]);
        if (got - want).abs() < 1e-12 {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{COST}{{{label}}} stays at {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn anthropic_cache_counts_reach_both_shapes_and_are_priced_at_cache_rates() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(priced(&mocks)).await;
    let mut cost = check_route(&edge, &mocks.anthropic, Shape::Anthropic, "claude-test", true, AN).await;
    cost += check_route(&edge, &mocks.anthropic, Shape::OpenAi, "gpt-via-claude", true, AN).await;
    wait_for_cost(&edge, "an", cost).await;
    assert_eq!(mocks.anthropic.request_count(), 6);
    ledger_agrees(&edge, WRITE, cost).await;
}

#[tokio::test]
async fn openai_cached_tokens_reach_both_shapes_and_are_priced_at_cache_rates() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(priced(&mocks)).await;
    let mut cost = check_route(&edge, &mocks.openai, Shape::OpenAi, "gpt-test", false, OA).await;
    cost += check_route(&edge, &mocks.openai, Shape::Anthropic, "claude-via-gpt", false, OA).await;
    wait_for_cost(&edge, "oa", cost).await;
    assert_eq!(mocks.openai.request_count(), 6);
    ledger_agrees(&edge, 0, cost).await;
}

/// The ledger's rows of the six requests [`check_route`] sent twice: four with the cache's
/// counts (`write` as the upstream's API reports writes), and costs that add up to `cost`.
async fn ledger_agrees(edge: &TestEdge, write: u64, cost: f64) {
    edge.edge.close().await;
    let ledger = edge.edge.ledger.as_ref().expect("the ledger is on by default");
    let rows = ledger.store().load(0, i64::MAX).await.expect("the ledger reads");
    assert_eq!(rows.len(), 6);
    let cached: Vec<_> = rows.iter().filter(|r| r.cache_read_tokens > 0).collect();
    assert_eq!(cached.len(), 4, "{rows:?}");
    assert!(cached.iter().all(|r| r.cache_read_tokens == READ && r.cache_write_tokens == write), "{cached:?}");
    let recorded: f64 = rows.iter().map(|r| r.cost_usd).sum();
    assert!((recorded - cost).abs() < 1e-12, "the ledger's {recorded} vs {cost}");
}

/// An Anthropic request to `model` with `cache_control` markers on system blocks, tools, text,
/// `tool_use` and `tool_result` blocks, as a client that caches its prefix sends them.
fn marked(model: &str) -> Value {
    let one_hour = json!({"type": "ephemeral", "ttl": "1h"});
    let five_minutes = json!({"type": "ephemeral"});
    json!({
        "model": model,
        "max_tokens": 100,
        "system": [
            {"type": "text", "text": "You are a weather bot with a very long manual.", "cache_control": one_hour},
            {"type": "text", "text": "Today's notes."}
        ],
        "tools": [{
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            "cache_control": one_hour
        }],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "weather in Oslo", "cache_control": five_minutes}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"},
                    "cache_control": five_minutes}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain", "cache_control": five_minutes},
                {"type": "text", "text": "thanks", "cache_control": five_minutes}]}
        ]
    })
}

/// Sends [`marked`] to `edge` and checks that `upstream` (an Anthropic mock) got its system
/// prompt, tools and messages exactly as sent; returns the reply.
async fn send_marked(edge: &TestEdge, upstream: &MockUpstream) -> Reply {
    let sent = marked("claude-test");
    let r = messages(edge, &sent).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let received = upstream.received().last().expect("the Anthropic mock was asked").body.clone();
    for field in ["system", "tools", "messages"] {
        assert_eq!(received[field], sent[field], "{field} reaches Anthropic as it was sent");
    }
    r
}

#[tokio::test]
async fn cache_control_reaches_an_anthropic_upstream_as_sent_and_never_an_openai_one() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    send_marked(&edge, &mocks.anthropic).await;

    // The same request to an OpenAI upstream carries its text, and no Anthropic-only field.
    let r = messages(&edge, &marked("claude-via-gpt")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let received = mocks.openai.received().last().expect("the OpenAI mock was asked").body.to_string();
    assert!(received.contains("very long manual") && received.contains("thanks"), "{received}");
    assert!(!received.contains("cache_control") && !received.contains("ephemeral"), "{received}");
}

/// Across a relay (an origin edge that sends every model to a peer edge, whose targets are the
/// mocks): the markers reach the peer's Anthropic upstream as sent, and the counts come back to
/// the origin's client in both shapes, priced by the edge that served them.
#[tokio::test]
async fn markers_and_counts_cross_a_relay() {
    let p = super::relay::pair(|_| {}, |eu| eu.target_mut("an").price = Some(AN.model())).await;
    let r = send_marked(&p.us, &p.mocks.anthropic).await;
    assert_eq!(r.header("x-meridian-target"), Some("edge-eu"));
    let usage = &r.json()["usage"];
    let counts = |field: &str| usage[field].as_u64().unwrap_or_else(|| panic!("{field} in {usage}"));
    let marked_counts = Counts { input: counts("input_tokens"), read: 0, write: 0, output: counts("output_tokens") };
    let mut cost = AN.cost(marked_counts);

    cost += check_route(&p.us, &p.mocks.anthropic, Shape::Anthropic, "claude-test", true, AN).await;
    cost += check_route(&p.us, &p.mocks.anthropic, Shape::OpenAi, "gpt-via-claude", true, AN).await;
    wait_for_cost(&p.eu, "an", cost).await;
    assert_eq!(p.mocks.anthropic.request_count(), 7, "every request went through the peer to the mock");
}
