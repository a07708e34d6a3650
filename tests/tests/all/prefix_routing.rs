//! Prefix-aware routing: two real engines (SmolLM2 int4 on ONNX Runtime, over QUIC) behind one edge,
//! and eight multi-turn conversations, each with a long system prompt of its own. Each engine's
//! prefix cache holds about four of the conversations. The `prefix-router` plugin, which reads what
//! each engine reports holding (`prefix-match`), keeps every conversation on the engine that holds
//! its beginning; the `latency-router` ranks by smoothed time to first token alone. The same
//! traffic goes through each (fresh engines for each), and the test prints both and checks that the
//! prefix router's median time to first token is at most half the latency router's, with no errors
//! for either.
//!
//! Each engine runs one ONNX Runtime thread, without spinning: two engines are two nodes, each with
//! its own CPU, and this machine has two. With two spinning threads each (the default), the four
//! threads would share two CPUs whenever both engines work, and an engine left idle would hand its
//! CPU to the other: a router that sends everything to one engine would get both CPUs, and one that
//! uses both engines would pay for their contention.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use meridian::config::PluginKind;
use meridian_e2e::engine::{Cluster, TestEngine};
use meridian_e2e::{add_plugin, metric_or_zero, ConfigExt, Mocks, ACME_KEY};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::engine::edge;

const CONVERSATIONS: usize = 8;
const TURNS: usize = 5;
/// Each engine's prefix cache: about 4.3 conversations of up to ~840 tokens at 46 KB a token
/// (SmolLM2's 30 layers × 3 KV heads × 64 × f32, keys and values), so that an engine serving all
/// eight evicts each before its next turn, and one serving four keeps them.
const CACHE_BYTES: usize = 160 << 20;

/// Conversation `k`'s system prompt: 666 tokens of rules of its own.
fn system_prompt(k: usize) -> String {
    const THINGS: [&str; 8] = ["harbour", "ledger", "garden", "engine", "library", "market", "bridge", "orchard"];
    const DEEDS: [&str; 8] = ["checked", "painted", "counted", "weighed", "signed", "sealed", "cleaned", "measured"];
    let mut text = format!("You are the assistant of team {k}. Follow every rule below, in order.\n");
    for r in 0..32 {
        let thing = THINGS[(k + r) % THINGS.len()];
        let deed = DEEDS[(k * 3 + r) % DEEDS.len()];
        text.push_str(&format!("Rule {r}: the {thing} of team {k} must be {deed} before hour {}.\n", (r * 7 + k) % 24));
    }
    text
}

/// One streamed chat request: the time to its first content token, its text, and the engine that
/// served it.
struct Turn {
    ttft: Duration,
    text: String,
    target: String,
}

/// `first`, if given, is told when the first content token arrives.
async fn stream_turn(url: &str, messages: &[Value], mut first: Option<oneshot::Sender<()>>) -> Result<Turn, String> {
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = json!({"model": "smol", "stream": true, "temperature": 0, "max_tokens": 8, "messages": messages});
    let req = hyper::Request::post(format!("{url}/v1/chat/completions"))
        .header("authorization", format!("Bearer {ACME_KEY}"))
        .header("content-type", "application/json")
        // Every request differs anyway; the edge's answer cache must not be what is measured.
        .header("x-meridian-cache", "bypass")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let started = Instant::now();
    let resp = client.request(req).await.map_err(|e| format!("the edge answers: {e}"))?;
    let status = resp.status().as_u16();
    let target = resp.headers().get("x-meridian-target").map_or("", |v| v.to_str().unwrap_or("")).to_string();
    let mut body = resp.into_body();
    let (mut ttft, mut text, mut buffered) = (None, String::new(), String::new());
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the stream breaks: {e}"))?;
        let Some(data) = frame.data_ref() else { continue };
        buffered.push_str(&String::from_utf8_lossy(data));
        while let Some(end) = buffered.find('\n') {
            let line: String = buffered.drain(..=end).collect();
            let Some(event) = line.trim().strip_prefix("data: ").and_then(|d| serde_json::from_str::<Value>(d).ok())
            else {
                continue;
            };
            if event.get("error").is_some() {
                return Err(format!("a stream error: {event}"));
            }
            if let Some(delta) = event["choices"][0]["delta"]["content"].as_str().filter(|d| !d.is_empty()) {
                ttft.get_or_insert_with(|| started.elapsed());
                if let Some(first) = first.take() {
                    let _ = first.send(());
                }
                text.push_str(delta);
            }
        }
    }
    match (status, ttft) {
        (200, Some(ttft)) => Ok(Turn { ttft, text, target }),
        _ => Err(format!("status {status}, no content: {buffered}")),
    }
}

/// What one router made of the traffic.
struct Run {
    ttfts: Vec<Duration>,
    errors: usize,
    /// Requests served by engine-a and engine-b.
    served: [usize; 2],
    prefix_hits: f64,
    tokens_reused: f64,
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn p90(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() * 9 / 10).copied().unwrap_or_default()
}

/// Eight conversations of five turns through an edge whose tenant routes with `router`, in front of
/// two fresh engines. The first turns go one after another, each when the one before has its first
/// token; then each later turn goes in a round, all eight conversations at once, once the round
/// before is answered.
async fn run(router: &str, label: &str) -> Run {
    let mocks = Mocks::start().await;
    let cluster = Cluster::new(label);
    let node = |c: &mut meridian_engine::node::NodeConfig| {
        c.scheduler.prefix_cache_bytes = CACHE_BYTES;
        // A CPU each (see the top of this file).
        c.runtime.intra_op_threads = 1;
        c.runtime.spinning = false;
    };
    let a = TestEngine::start_with(&cluster, "engine-a", CONVERSATIONS as u32, node).await;
    let b = TestEngine::start_with(&cluster, "engine-b", CONVERSATIONS as u32, node).await;
    let edge = edge(&mocks, &cluster, &[("engine-a", a.addr), ("engine-b", b.addr)], |c| {
        add_plugin(c, "router", PluginKind::Router, router, json!({}));
        c.tenant_mut("acme").router = Some("router".into());
        // What the engines hold reaches the edge within a turn.
        c.health.probe_interval_ms = 100;
    })
    .await;

    let url = edge.url();
    let mut conversations: Vec<Vec<Value>> =
        (0..CONVERSATIONS).map(|k| vec![json!({"role": "system", "content": system_prompt(k)})]).collect();
    let mut turns = Vec::new();
    for t in 0..TURNS {
        for (k, messages) in conversations.iter_mut().enumerate() {
            messages.push(json!({"role": "user", "content": format!("Question {t}: what comes first for team {k}?")}));
        }
        let mut round = Vec::new();
        for messages in &conversations {
            let (url, messages) = (url.clone(), messages.clone());
            let (first, first_token) = oneshot::channel();
            round.push(tokio::spawn(async move { stream_turn(&url, &messages, Some(first)).await }));
            // The first turns go one after another, each once the one before has its first token
            // (and is still in flight, decoding), so that a router weighing load sees it.
            if t == 0 {
                let _ = first_token.await;
            }
        }
        for (task, messages) in round.into_iter().zip(&mut conversations) {
            let turn = task.await.expect("a turn runs to its end");
            let answer = turn.as_ref().map_or("(no answer)", |t| t.text.as_str());
            messages.push(json!({"role": "assistant", "content": answer}));
            turns.push(turn);
        }
    }
    let mut run = Run { ttfts: Vec::new(), errors: 0, served: [0, 0], prefix_hits: 0.0, tokens_reused: 0.0 };
    for turn in turns {
        match turn {
            Ok(turn) => {
                run.ttfts.push(turn.ttft);
                run.served[usize::from(turn.target == "engine-b")] += 1;
            }
            Err(e) => {
                eprintln!("{router}: {e}");
                run.errors += 1;
            }
        }
    }
    let metrics = edge.metrics().await;
    for target in ["target=\"engine-a\"", "target=\"engine-b\""] {
        run.prefix_hits += metric_or_zero(&metrics, "meridian_engine_prefix_cache_hits_total", &[target]);
        run.tokens_reused += metric_or_zero(&metrics, "meridian_engine_prefix_cache_tokens_reused_total", &[target]);
    }
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_router_at_least_halves_time_to_first_token_against_the_latency_router() {
    let latency = run("latency-router", "prefix-latency").await;
    let prefix = run("prefix-router", "prefix-prefix").await;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "{CONVERSATIONS} conversations × {TURNS} turns, 666-token system prompts, two engines with {} MiB prefix caches:\n\
         | router | requests | errors | TTFT p50 ms | TTFT p90 ms | engine-a / engine-b | prefix hits | tokens reused |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        CACHE_BYTES >> 20
    );
    for (name, r) in [("latency-router", &latency), ("prefix-router", &prefix)] {
        eprintln!(
            "| {name} | {} | {} | {:.0} | {:.0} | {} / {} | {} | {} |",
            r.ttfts.len() + r.errors,
            r.errors,
            ms(median(&r.ttfts)),
            ms(p90(&r.ttfts)),
            r.served[0],
            r.served[1],
            r.prefix_hits,
            r.tokens_reused
        );
    }
    assert_eq!((latency.errors, prefix.errors), (0, 0), "no errors for either router");
    assert!(prefix.served[0] > 0 && prefix.served[1] > 0, "the prefix router uses both engines: {:?}", prefix.served);
    assert!(
        2 * median(&prefix.ttfts) <= median(&latency.ttfts),
        "the prefix router's median time to first token ({:.0} ms) is at most half the latency router's ({:.0} ms)",
        ms(median(&prefix.ttfts)),
        ms(median(&latency.ttfts))
    );
}
