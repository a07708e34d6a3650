//! `plugin-bench`: the per-call cost of each shipped plugin on the production runtime settings.
//!
//! A call is what the edge pays per request and plugin: a fresh instance from the pool (started
//! from the snapshot taken after `configure` where the plugin allows one, else with `configure`
//! run on it), its hook, and the output checks. Prints p50, p99 and the mean per plugin (the mean
//! carries what a few calls pay for many: a kept store's drop frees the instances of the calls
//! before it), at concurrency 1 and 2 (tasks on a two-worker runtime, each calling in a loop), for:
//! - the request side: prompts of 200 B, 2 KB and 32 KB (routers see only the prompt's size;
//!   filters scan its text), and a 2 KB prompt holding none of pii-redactor's request triggers
//!   (no digit, `@`, `:` or secret prefix), for which the host does not call it;
//! - the answer side: a 2 KB answer whole (one call on a fresh instance), and streamed as 18
//!   pieces to one session (its instance and the 18 calls, per answer). pii-redactor's default
//!   configuration declares no answer triggers, so its rows show the host skipping the calls;
//!   `pii-redactor +secrets` (`block_secrets_in_response`) is shown an answer that names a secret
//!   prefix in its first words, so every piece is a call;
//! - the default chain per request: pii-redactor on a 1 KB prompt, latency-router, and
//!   pii-redactor on a whole 1 KB answer;
//! - the Python and JavaScript examples (`keyword-filter`, `residency-router`) next to the Rust
//!   ones, when `scripts/build-python-plugins` / `scripts/build-js-plugins` have built them.
//!
//! Run it with `scripts/bench` (which builds the components and release binaries first), or
//! `target/release/plugin-bench [--calls N] [--interpreted false] [--only TEXT]` after
//! `scripts/build-plugins` (`--help`; an unknown option or a bad value is refused).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::builder::RangedU64ValueParser;
use clap::{ArgAction, Parser};
use meridian::plugin::{
    CallLimits, FilterPlugin, Health, PluginMetrics, PluginRuntime, PluginSettings, PriceModel, RequestSummary,
    RouterPlugin, Segment, SegmentKind, Target, TargetKind, TokenPrice,
};

// The edge's allocator (host/src/main.rs): a call's host side (its store, the lowered and lifted
// values) allocates, and glibc's malloc cost ~1 µs more per pii-redactor call on 2 KB.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What to measure (`plugin-bench --help`).
#[derive(Parser)]
#[command(name = "plugin-bench", about = "The per-call cost of each shipped plugin on the production runtime settings")]
struct Options {
    /// Calls per row.
    #[arg(long, default_value_t = 2_000, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    calls: usize,
    /// The Python and JavaScript rows (`false` leaves them out: at milliseconds a call, they take
    /// minutes at the default number of calls).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    interpreted: bool,
    /// Only the rows whose plugin name contains this text (to profile one plugin).
    #[arg(long, default_value = "")]
    only: String,
}

fn main() {
    let Options { calls, interpreted, only } = Options::parse();
    // Two workers: the concurrency-2 rows run on both cores, as an edge's calls do.
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a Tokio runtime");
    if let Err(e) = runtime.block_on(run(calls, interpreted, only)) {
        eprintln!("plugin-bench: {e}");
        std::process::exit(1);
    }
}

/// Prose of about `bytes` bytes with an e-mail address, a phone number and a card number in every
/// 200 bytes, so that the redactor finds as much as real PII-heavy traffic would give it.
fn prompt(bytes: usize) -> String {
    repeated(
        "Please write to jane.doe@example.com or call +44 20 7946 0958 about the refund of \
         order 4411 paid with 4111 1111 1111 1111 last Tuesday; the customer prefers e-mail. ",
        bytes,
    )
}

/// Prose of `bytes` bytes with no digit, `@`, `:` or secret prefix: nothing pii-redactor's
/// request triggers name, as in most chat prompts that carry no personal data.
fn prose(bytes: usize) -> String {
    repeated(
        "Please summarise the customer's message about the delayed refund, keep a friendly \
         tone, and suggest what the support team should do next; the customer prefers e-mail. ",
        bytes,
    )
}

/// `chunk` repeated and cut to `bytes` (ASCII, so any cut is a character boundary).
fn repeated(chunk: &str, bytes: usize) -> String {
    chunk.repeat(bytes.div_ceil(chunk.len()))[..bytes].to_string()
}

/// A row per filter: the request side on `segments`, each call a fresh instance (or none, where
/// the filter's request triggers let the request through).
async fn request_rows(
    filters: &[(String, Arc<FilterPlugin>)],
    side: &str,
    size: &str,
    summary: &Arc<RequestSummary>,
    segments: &Arc<Vec<Segment>>,
    calls: usize,
    concurrency: usize,
) -> Result<(), String> {
    for (name, filter) in filters {
        let (filter, summary, segments) = (Arc::clone(filter), Arc::clone(summary), Arc::clone(segments));
        let call = move || {
            let (filter, summary, segments) = (Arc::clone(&filter), Arc::clone(&summary), Arc::clone(&segments));
            async move { filter.inspect_request(&summary, &segments).await.map(drop) }
        };
        row(Row { plugin: name, side, size: size.to_string() }, calls, concurrency, call).await?;
    }
    Ok(())
}

fn summary(prompt_bytes: usize) -> RequestSummary {
    RequestSummary {
        request_id: "bench".into(),
        tenant: "bench".into(),
        client_region: None,
        node_region: "local".into(),
        model: "bench".into(),
        prompt_tokens: u32::try_from(prompt_bytes / 4).unwrap_or(u32::MAX),
        max_output_tokens: Some(256),
        streaming: false,
        labels: Vec::new(),
        redacted: false,
        allowed_regions: Vec::new(),
        price_cap_usd: None,
        headers: Vec::new(),
    }
}

fn targets() -> Vec<Target> {
    let target = |name: &str, latency_ms: f64, input: f64| Target {
        name: name.into(),
        kind: TargetKind::Managed,
        region: Some("us-east".into()),
        own_infrastructure: false,
        model: "m".into(),
        price: Some(PriceModel::Token(TokenPrice { input_usd_per_mtok: input, output_usd_per_mtok: input * 4.0 })),
        health: Health::Healthy,
        latency_ms,
        ttft_ms: latency_ms / 3.0,
        in_flight: 0,
        capacity: None,
    };
    vec![target("openai", 420.0, 0.15), target("anthropic", 380.0, 1.0), target("openrouter", 510.0, 0.1)]
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

type CallResult = Result<(), meridian::plugin::PluginError>;

/// `calls` timed calls after 100 untimed ones, on each of `concurrency` tasks of a runtime with
/// as many worker threads: every call's time, sorted.
async fn timed<F, Fut>(calls: usize, concurrency: usize, call: F) -> Result<Vec<Duration>, String>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = CallResult> + Send,
{
    let call = Arc::new(call);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let call = Arc::clone(&call);
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(calls);
                for i in 0..calls + 100 {
                    let start = Instant::now();
                    call().await.map_err(|e| e.to_string())?;
                    if i >= 100 {
                        times.push(start.elapsed());
                    }
                }
                Ok::<_, String>(times)
            })
        })
        .collect();
    let mut times = Vec::with_capacity(calls * concurrency);
    for task in tasks {
        times.extend(task.await.map_err(|e| e.to_string())??);
    }
    times.sort();
    Ok(times)
}

/// A plugin built by scripts/build-plugins (Rust) or the Python and JavaScript build scripts, by
/// file stem; `None` when it is not built.
fn wasm(name: &str) -> Option<Vec<u8>> {
    std::fs::read(meridian_e2e::built_plugin(name)?).ok()
}

/// `--only`: the text a row's plugin name must contain to be run.
static ONLY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// One row of the table.
struct Row<'a> {
    plugin: &'a str,
    side: &'a str,
    size: String,
}

async fn row<F, Fut>(row: Row<'_>, calls: usize, concurrency: usize, call: F) -> Result<(), String>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = CallResult> + Send,
{
    if !row.plugin.contains(ONLY.get().map_or("", String::as_str)) {
        return Ok(());
    }
    let times = timed(calls, concurrency, call).await?;
    println!(
        "| {} | {} | {} | {concurrency} | {:.1} | {:.1} | {:.1} |",
        row.plugin,
        row.side,
        row.size,
        percentile(&times, 50.0),
        percentile(&times, 99.0),
        times.iter().sum::<Duration>().as_secs_f64() * 1e6 / times.len() as f64
    );
    Ok(())
}

async fn run(calls: usize, interpreted_rows: bool, only: String) -> Result<(), String> {
    ONLY.get_or_init(|| only);
    let dir = std::env::temp_dir().join(format!("meridian-plugin-bench-{}", std::process::id()));
    let settings = PluginSettings { cache_dir: dir.clone(), ..PluginSettings::default() };
    let metrics = PluginMetrics::new(&prometheus::Registry::new()).map_err(|e| e.to_string())?;
    let runtime = PluginRuntime::new(settings, Arc::new(metrics)).map_err(|e| e.to_string())?;
    let need = |name: &str| wasm(name).ok_or_else(|| format!("{name}.wasm is not built (run scripts/build-plugins)"));
    let limits = CallLimits::default();
    let load_filter = |name: &str, wasm: Vec<u8>, config: &str, limits: &CallLimits| {
        let (runtime, name, config, limits) = (&runtime, name.to_string(), config.to_string(), limits.clone());
        async move { runtime.load_filter(&name, "bench", &wasm, &config, limits).await.map(Arc::new) }
    };
    let load_router = |name: &str, wasm: Vec<u8>, config: &str, limits: &CallLimits| {
        let (runtime, name, config, limits) = (&runtime, name.to_string(), config.to_string(), limits.clone());
        async move { runtime.load_router(&name, "bench", &wasm, &config, limits).await.map(Arc::new) }
    };
    let pii = load_filter("pii-redactor", need("pii_redactor")?, "{}", &limits).await.map_err(|e| e.to_string())?;
    let mut filters = vec![("pii-redactor (rust)".to_string(), Arc::clone(&pii))];
    let secrets_config = r#"{"block_secrets_in_response": true}"#;
    let secrets = load_filter("pii-redactor", need("pii_redactor")?, secrets_config, &limits).await;
    let secrets = secrets.map_err(|e| e.to_string())?;
    let mut routers = Vec::new();
    for name in ["latency_router", "cost_router", "residency"] {
        let router = load_router(name, need(name)?, "{}", &limits).await.map_err(|e| e.to_string())?;
        routers.push((format!("{} (rust)", name.replace('_', "-")), router));
    }
    // The Python and JavaScript examples, when their build scripts have run.
    // Syntax that Python's `re` and JavaScript's `RegExp` share; an interpreter's first instance
    // (the load's trial) takes longer than a Rust plugin's whole budget, so they get 200 ms.
    let keyword_config = r#"{"block": ["[Pp]assword"], "redact": {"email": "[-\\w.+]+@[-\\w]+(?:\\.[-\\w]+)+"}}"#;
    let interpreted = CallLimits { deadline_ms: 200, ..CallLimits::default() };
    let languages = if interpreted_rows { &[("python", "py"), ("js", "js")][..] } else { &[] };
    for &(lang, prefix) in languages {
        match wasm(&format!("{prefix}_keyword_filter")) {
            Some(bytes) => match load_filter("keyword-filter", bytes, keyword_config, &interpreted).await {
                Ok(filter) => filters.push((format!("keyword-filter ({lang})"), filter)),
                Err(e) => println!("keyword-filter ({lang}): cannot load: {e}"),
            },
            None => println!("keyword-filter ({lang}): not built (scripts/build-{lang}-plugins)"),
        }
        match wasm(&format!("{prefix}_residency_router")) {
            Some(bytes) => match load_router("residency-router", bytes, "{}", &interpreted).await {
                Ok(router) => routers.push((format!("residency-router ({lang})"), router)),
                Err(e) => println!("residency-router ({lang}): cannot load: {e}"),
            },
            None => println!("residency-router ({lang}): not built (scripts/build-{lang}-plugins)"),
        }
    }
    // The plugins for which `filter` / `router` holds, by name.
    let named = |filter: fn(&FilterPlugin) -> bool, router: fn(&RouterPlugin) -> bool| {
        let filters = filters.iter().filter(|(_, f)| filter(f)).map(|(n, _)| n.as_str());
        filters.chain(routers.iter().filter(|(_, r)| router(r)).map(|(n, _)| n.as_str())).collect::<Vec<_>>().join(", ")
    };
    println!(
        "plugin-bench: {calls} calls per task after 100 to warm up; a fresh instance and the hook per call; pooling: {}; \
         started from the snapshot after configure: {}; called directly (no fiber): {}",
        runtime.is_pooling(),
        named(FilterPlugin::pre_initialised, RouterPlugin::pre_initialised),
        named(FilterPlugin::called_directly, RouterPlugin::called_directly),
    );
    println!();
    println!("| plugin | side | input | tasks | p50 µs | p99 µs | mean µs |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let targets = Arc::new(targets());
    for concurrency in [1, 2] {
        for bytes in [200usize, 2 << 10, 32 << 10] {
            let size = format!("{bytes} B");
            let summary = Arc::new(summary(bytes));
            let segments = Arc::new(vec![Segment { kind: SegmentKind::User, text: prompt(bytes) }]);
            request_rows(&filters, "request", &size, &summary, &segments, calls, concurrency).await?;
            for (name, router) in &routers {
                let (router, summary, targets) = (Arc::clone(router), Arc::clone(&summary), Arc::clone(&targets));
                let call = move || {
                    let (router, summary, targets) = (Arc::clone(&router), Arc::clone(&summary), Arc::clone(&targets));
                    async move { router.route(&summary, &targets, &[]).await.map(drop) }
                };
                row(Row { plugin: name, side: "route", size: size.clone() }, calls, concurrency, call).await?;
            }
        }
        // A 2 KB prompt with none of the filters' request triggers: pii-redactor, which declares
        // what every finding holds, is not called; a filter that declares none scans it.
        let summary_2k = Arc::new(summary(2 << 10));
        let clean = Arc::new(vec![Segment { kind: SegmentKind::User, text: prose(2 << 10) }]);
        request_rows(&filters, "request, no trigger", "2048 B", &summary_2k, &clean, calls, concurrency).await?;
        // The answer side: a 2 KB answer whole, and streamed as 18 pieces to one session; for
        // the secrets rule, an answer whose first words name a key prefix (a trigger).
        let plain = Arc::new(prompt(2 << 10));
        let triggered = Arc::new(format!("OpenAI keys start with sk- and {}", prompt((2 << 10) - 33)));
        let answer_filters = filters
            .iter()
            .map(|(name, filter)| (name.clone(), Arc::clone(filter), Arc::clone(&plain)))
            .chain([("pii-redactor +secrets (rust)".to_string(), Arc::clone(&secrets), triggered)]);
        for (name, filter, answer) in answer_filters {
            let (name, filter) = (&name, &filter);
            let (filter_whole, whole) = (Arc::clone(filter), Arc::clone(&answer));
            let call = move || {
                let (filter, text) = (Arc::clone(&filter_whole), Arc::clone(&whole));
                async move { filter.inspect_response(&text).await.map(drop) }
            };
            row(Row { plugin: name, side: "answer, whole", size: "2048 B".into() }, calls, concurrency, call).await?;
            let (filter, text) = (Arc::clone(filter), Arc::clone(&answer));
            let call = move || {
                let (filter, text) = (Arc::clone(&filter), Arc::clone(&text));
                async move {
                    let mut session = filter.response_session();
                    for piece in pieces(&text, 18) {
                        session.inspect(piece).await?;
                    }
                    Ok(())
                }
            };
            row(Row { plugin: name, side: "answer, 18 pieces", size: "2048 B".into() }, calls, concurrency, call)
                .await?;
        }
        // The default chain per request: pii-redactor on a 1 KB prompt, latency-router, and
        // pii-redactor on the whole 1 KB answer.
        let summary = Arc::new(summary(1 << 10));
        let segments = Arc::new(vec![Segment { kind: SegmentKind::User, text: prompt(1 << 10) }]);
        let answer = Arc::new(prompt(1 << 10));
        let router = Arc::clone(&routers[0].1);
        let (pii, targets) = (Arc::clone(&pii), Arc::clone(&targets));
        let call = move || {
            let (pii, router) = (Arc::clone(&pii), Arc::clone(&router));
            let (summary, segments, targets, answer) =
                (Arc::clone(&summary), Arc::clone(&segments), Arc::clone(&targets), Arc::clone(&answer));
            async move {
                pii.inspect_request(&summary, &segments).await?;
                router.route(&summary, &targets, &[]).await?;
                pii.inspect_response(&answer).await.map(drop)
            }
        };
        let chain =
            Row { plugin: "default chain (rust)", side: "request + route + answer", size: "1 KB + 1 KB".into() };
        row(chain, calls, concurrency, call).await?;
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// `text` cut into `n` pieces on character boundaries, as a stream's deltas come.
fn pieces(text: &str, n: usize) -> Vec<&str> {
    let step = text.len().div_ceil(n);
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + step).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        out.push(&text[start..end]);
        start = end;
    }
    out
}
