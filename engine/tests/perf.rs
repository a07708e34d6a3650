//! Quick throughput figures (not assertions): `cargo test -p meridian-engine --release --test perf
//! -- --ignored --nocapture`. Batch-1 decode tok/s and the aggregate of 8 concurrent requests, on
//! the int4 and fp32 files, under a few thread settings (PERF_THREADS=1,2s: 1 thread, 2 spinning;
//! 0 = one per CPU). The benchmark proper lives elsewhere.

mod common;

use std::time::Instant;

use common::*;
use meridian_engine::api::{Backend, Event};
use meridian_engine::config::{EngineConfig, ModelConfig, RuntimeConfig};
use meridian_engine::scheduler::Engine;

const PROMPT: &str = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.";
const TOKENS: u32 = 128;

/// (prefill ms, decode tok/s, completion tokens) of one request.
async fn one(engine: &Engine) -> (f64, f64, u32) {
    let start = Instant::now();
    let mut rx = engine.chat(request("smol", PROMPT, TOKENS)).unwrap();
    let mut first = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Delta(_) => {
                first.get_or_insert_with(Instant::now);
            }
            Event::Finished { usage, .. } => {
                let first = first.unwrap();
                let n = usage.completion_tokens;
                let decode = (n - 1) as f64 / first.elapsed().as_secs_f64();
                return ((first - start).as_secs_f64() * 1e3, decode, n);
            }
            Event::Failed(e) => panic!("{e}"),
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    let settings: Vec<(usize, bool)> = match std::env::var("PERF_THREADS") {
        Ok(s) => s.split(',').map(|x| (x.trim_end_matches('s').parse().unwrap(), x.ends_with('s'))).collect(),
        Err(_) => vec![(0, true), (1, false)],
    };
    for rel in [INT4, FP32] {
        for &(threads, spinning) in &settings {
            let cfg = EngineConfig {
                runtime: RuntimeConfig { intra_op_threads: threads, spinning, ..Default::default() },
                models: vec![ModelConfig { name: "smol".into(), path: model_dir(rel), kind: None }],
                ..Default::default()
            };
            let engine = Engine::start(&cfg).unwrap();
            one(&engine).await; // warm-up
            let (prefill, decode, n) = one(&engine).await;
            let start = Instant::now();
            let rxs: Vec<_> = (0..8).map(|_| engine.chat(request("smol", PROMPT, TOKENS)).unwrap()).collect();
            let answers = futures_util::future::join_all(rxs.into_iter().map(collect)).await;
            let total: u32 = answers.iter().map(|a| a.usage.completion_tokens).sum();
            let aggregate = total as f64 / start.elapsed().as_secs_f64();
            println!(
                "{rel:32} threads {threads} spin {spinning:5}: prefill {prefill:6.1} ms, batch-1 decode {decode:6.1} tok/s ({n} tok), \
                 8 concurrent {aggregate:6.1} tok/s aggregate ({:.2}x)",
                aggregate / decode
            );
        }
    }
}
