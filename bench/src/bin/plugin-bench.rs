//! `plugin-bench`: the per-call cost of each shipped plugin on the production runtime settings.
//!
//! A call is what the edge pays per request and plugin: a fresh instance from the pool, the
//! plugin's `configure`, its hook, and the output checks. Prints p50/p99 per plugin for prompts of
//! 200 B, 2 KB and 32 KB (routers see only the prompt's size; filters scan its text).
//!
//! Run it with `scripts/bench` (which builds the components and release binaries first), or
//! `target/release/plugin-bench [--calls N]` after `scripts/build-plugins`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian::plugin::{
    CallLimits, Health, PluginMetrics, PluginRuntime, PluginSettings, PriceModel, RequestSummary, Segment, SegmentKind,
    Target, TargetKind, TokenPrice,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let calls = args
        .iter()
        .position(|a| a == "--calls")
        .and_then(|i| args.get(i + 1))
        .map_or(2_000, |v| v.parse().expect("--calls takes a number"));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a Tokio runtime");
    if let Err(e) = runtime.block_on(run(calls)) {
        eprintln!("plugin-bench: {e}");
        std::process::exit(1);
    }
}

/// Prose of about `bytes` bytes with an e-mail address, a phone number and a card number in every
/// 200 bytes, so that the redactor finds as much as real PII-heavy traffic would give it.
fn prompt(bytes: usize) -> String {
    const CHUNK: &str = "Please write to jane.doe@example.com or call +44 20 7946 0958 about the refund of \
        order 4411 paid with 4111 1111 1111 1111 last Tuesday; the customer prefers e-mail. ";
    CHUNK.repeat(bytes.div_ceil(CHUNK.len()))[..bytes].to_string()
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

/// `calls` timed calls after 100 untimed ones, sorted.
async fn timed<F, Fut>(calls: usize, mut call: F) -> Result<Vec<Duration>, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), meridian::plugin::PluginError>>,
{
    let mut times = Vec::with_capacity(calls);
    for i in 0..calls + 100 {
        let start = Instant::now();
        call().await.map_err(|e| e.to_string())?;
        if i >= 100 {
            times.push(start.elapsed());
        }
    }
    times.sort();
    Ok(times)
}

async fn run(calls: usize) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("meridian-plugin-bench-{}", std::process::id()));
    let settings = PluginSettings { cache_dir: dir.clone(), ..PluginSettings::default() };
    let metrics = PluginMetrics::new(&prometheus::Registry::new()).map_err(|e| e.to_string())?;
    let runtime = PluginRuntime::new(settings, Arc::new(metrics)).map_err(|e| e.to_string())?;
    let wasm = |name: &str| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/wasm32-wasip2/release")
            .join(format!("{name}.wasm"));
        std::fs::read(&path).map_err(|e| format!("{}: {e} (run scripts/build-plugins)", path.display()))
    };
    let limits = CallLimits::default();
    let pii = runtime.load_filter("pii-redactor", "bench", &wasm("pii_redactor")?, "{}", limits.clone()).await;
    let pii = pii.map_err(|e| e.to_string())?;
    let mut routers = Vec::new();
    for name in ["latency_router", "cost_router", "residency"] {
        let r =
            runtime.load_router(name, "bench", &wasm(name)?, "{}", limits.clone()).await.map_err(|e| e.to_string())?;
        routers.push((name.replace('_', "-"), r));
    }
    println!(
        "plugin-bench: {calls} calls each after 100 to warm up; fresh instance + configure + hook; pooling: {}",
        runtime.is_pooling()
    );
    println!();
    println!("| plugin | prompt | p50 µs | p99 µs |");
    println!("| --- | --- | --- | --- |");
    let targets = targets();
    for bytes in [200usize, 2 << 10, 32 << 10] {
        let summary = summary(bytes);
        let segments = vec![Segment { kind: SegmentKind::User, text: prompt(bytes) }];
        let times = timed(calls, || async { pii.inspect_request(&summary, &segments).await.map(drop) }).await?;
        println!("| pii-redactor | {bytes} B | {:.1} | {:.1} |", percentile(&times, 50.0), percentile(&times, 99.0));
        for (name, router) in &routers {
            let times = timed(calls, || async { router.route(&summary, &targets).await.map(drop) }).await?;
            println!("| {name} | {bytes} B | {:.1} | {:.1} |", percentile(&times, 50.0), percentile(&times, 99.0));
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
