//! The plugin runtime against real components: the fixtures in `tests/plugin-fixtures/`, built
//! with `cargo build --release --target wasm32-wasip2 -p fixture-…` (see `fixture`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian::plugin::{
    CachePolicy, CallLimits, Decision, FilterPlugin, Health, Inspection, Outcome, PluginError, PluginId, PluginMetrics,
    PluginRuntime, PluginSettings, RequestSummary, RequestVerdict, ResponseVerdict, RouterPlugin, Segment, SegmentKind,
    Target, TargetKind,
};
use meridian_e2e::plugin_wasm;

const FIXTURES: &[&str] = &[
    "spin",
    "memory-bomb",
    "trap",
    "stack-overflow",
    "log-flood",
    "invalid-output",
    "invalid-redaction",
    "wrong-world",
    "config-reject",
    "good-router",
    "contract-0-1-0",
];

/// The component of a fixture built for `wasm32-wasip2`, or a panic that says how to build them.
fn fixture(name: &str) -> Vec<u8> {
    fixture_built_for("wasm32-wasip2", name)
}

/// A fixture built for `target` (`scripts/build-plugins` builds them for `wasm32-wasip2`, as
/// components, and for `wasm32-unknown-unknown`, as modules the runtime encodes at load).
fn fixture_built_for(target: &str, name: &str) -> Vec<u8> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target").join(target).join("release");
    let path = dir.join(format!("fixture_{}.wasm", name.replace('-', "_")));
    std::fs::read(&path).unwrap_or_else(|error| {
        let packages: Vec<String> = FIXTURES.iter().map(|f| format!("-p fixture-{f}")).collect();
        panic!(
            "cannot read {}: {error}\nbuild the plugin fixtures first (scripts/build-plugins builds them all):\n  cargo build --release --target {target} {}",
            path.display(),
            packages.join(" ")
        )
    })
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "meridian-plugin-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Rig {
    runtime: PluginRuntime,
    metrics: Arc<PluginMetrics>,
    _dir: TempDir,
}

fn rig(configure: impl FnOnce(&mut PluginSettings)) -> Rig {
    let dir = TempDir::new();
    let mut settings = PluginSettings { cache_dir: dir.0.clone(), max_instances: 64, ..PluginSettings::default() };
    configure(&mut settings);
    let metrics = Arc::new(PluginMetrics::new(&prometheus::Registry::new()).unwrap());
    let runtime = PluginRuntime::new(settings, Arc::clone(&metrics)).unwrap();
    Rig { runtime, metrics, _dir: dir }
}

fn limits(deadline_ms: u64) -> CallLimits {
    CallLimits { deadline_ms, max_memory_bytes: Some(16 << 20) }
}

impl Rig {
    async fn router(&self, fixture_name: &str, config: &str, deadline_ms: u64) -> RouterPlugin {
        self.runtime
            .load_router(fixture_name, "0.1.0", &fixture(fixture_name), config, limits(deadline_ms))
            .await
            .unwrap()
    }

    async fn filter(&self, fixture_name: &str, config: &str) -> FilterPlugin {
        self.runtime.load_filter(fixture_name, "0.1.0", &fixture(fixture_name), config, limits(200)).await.unwrap()
    }

    fn calls(&self, plugin: &str, outcome: &str) -> u64 {
        self.metrics.calls.with_label_values(&[plugin, "0.1.0", outcome]).get()
    }
}

fn summary() -> RequestSummary {
    RequestSummary {
        request_id: "req-1".into(),
        tenant: "acme".into(),
        client_region: Some("eu-west".into()),
        node_region: "eu-west".into(),
        model: "gpt-4o-mini".into(),
        prompt_tokens: 120,
        max_output_tokens: Some(256),
        streaming: false,
        labels: vec![],
        redacted: false,
        allowed_regions: vec![],
        price_cap_usd: None,
        headers: vec![("x-priority".into(), "high".into())],
    }
}

fn target(name: &str, latency_ms: f64) -> Target {
    Target {
        name: name.into(),
        kind: TargetKind::Managed,
        region: Some("eu-west".into()),
        own_infrastructure: false,
        model: "gpt-4o-mini".into(),
        price: None,
        health: Health::Healthy,
        latency_ms,
        ttft_ms: latency_ms / 2.0,
        in_flight: 0,
        capacity: None,
    }
}

fn targets() -> Vec<Target> {
    vec![target("openai", 300.0), target("engine-a", 80.0), target("openrouter", 450.0)]
}

fn given_order() -> Outcome {
    Outcome::Route(Decision {
        targets: targets().into_iter().map(|t| t.name).collect(),
        model_rewrite: None,
        cache: CachePolicy::Default,
    })
}

#[tokio::test]
async fn the_good_router_answers_on_a_fresh_instance_every_call() {
    let rig = rig(|_| {});
    let router = rig.router("good-router", "{}", 200).await;
    let first = router.route(&summary(), &targets(), &[]).await.unwrap();
    let second = router.route(&summary(), &targets(), &[]).await.unwrap();
    assert_eq!(first, given_order());
    assert_eq!(second, first, "a second call sees no state of the first");

    // The guest records how many times its instance has routed: always 1 on a fresh instance.
    let seen = rig.metrics.guest_histograms.with_label_values(&["good-router", "instance_calls"]);
    assert_eq!(seen.get_sample_count(), 2);
    assert_eq!(seen.get_sample_sum(), 2.0, "an instance was reused");
    assert_eq!(rig.metrics.guest_counters.with_label_values(&["good-router", "routed"]).get(), 2);
    assert_eq!(rig.calls("good-router", "ok"), 2);
    assert!(rig.runtime.is_pooling(), "the default pool fits this machine");
}

/// Instances start from the snapshot taken after `configure`: what it kept reaches every call,
/// and what a call does still never reaches the next.
#[tokio::test]
async fn instances_start_configured_and_still_fresh() {
    let rig = rig(|_| {});
    let router = rig.router("good-router", "tuned", 200).await;
    assert!(router.pre_initialised(), "the good router can be snapshotted after configure");
    assert!(!router.called_directly(), "a wasm32-wasip2 component imports WASI: called on a fiber");
    for _ in 0..3 {
        match router.route(&summary(), &targets(), &[]).await.unwrap() {
            Outcome::Route(decision) => assert_eq!(decision.model_rewrite.as_deref(), Some("tuned")),
            other => panic!("expected a decision, got {other:?}"),
        }
    }
    let seen = rig.metrics.guest_histograms.with_label_values(&["good-router", "instance_calls"]);
    assert_eq!((seen.get_sample_count(), seen.get_sample_sum()), (3, 3.0), "an instance was reused");
}

/// A call's store is kept for the next calls' instances (several per store, then a new store):
/// across many stores' worth of calls, on a fiber and called directly, every call still finds
/// an instance that has never routed.
#[tokio::test]
async fn instances_in_kept_stores_are_fresh_too() {
    let rig = rig(|_| {});
    let module = fixture_built_for("wasm32-unknown-unknown", "good-router");
    let direct = rig.runtime.load_router("good-router", "0.1.0", &module, "{}", limits(200)).await.unwrap();
    let fiber = rig.router("good-router", "{}", 200).await;
    assert!(direct.called_directly() && !fiber.called_directly());
    let calls = 50;
    for router in [&direct, &fiber] {
        for _ in 0..calls {
            assert_eq!(router.route(&summary(), &targets(), &[]).await.unwrap(), given_order());
        }
    }
    let seen = rig.metrics.guest_histograms.with_label_values(&["good-router", "instance_calls"]);
    assert_eq!(seen.get_sample_count(), 2 * calls);
    assert_eq!(seen.get_sample_sum(), (2 * calls) as f64, "an instance was called twice");
}

/// The finished instances a kept store holds have pool slots of their own: with one call slot,
/// calls one after another (each kept store filling up) and calls at once never find the pool
/// full.
#[tokio::test]
async fn finished_instances_in_kept_stores_never_take_a_calls_slot() {
    let rig = rig(|settings| {
        settings.max_instances = 1;
        settings.acquire_timeout_ms = 10_000;
    });
    assert!(rig.runtime.is_pooling());
    let router = Arc::new(rig.router("good-router", "{}", 2_000).await);
    for _ in 0..40 {
        assert_eq!(router.route(&summary(), &targets(), &[]).await.unwrap(), given_order());
    }
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let router = Arc::clone(&router);
            tokio::spawn(async move {
                for _ in 0..20 {
                    assert_eq!(router.route(&summary(), &targets(), &[]).await.unwrap(), given_order());
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    assert_eq!(rig.calls("good-router", "ok"), 120);
}

/// Prints the cost of a call to the good router (fresh instance, configure, route): a figure
/// to read, not a bound to assert. Run with `--nocapture`; meaningful in a release build.
#[tokio::test]
async fn good_router_call_cost() {
    let rig = rig(|_| {});
    let router = rig.router("good-router", "{}", 200).await;
    let (summary, targets) = (summary(), targets());
    for _ in 0..50 {
        router.route(&summary, &targets, &[]).await.unwrap();
    }
    let mut times = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let start = Instant::now();
        router.route(&summary, &targets, &[]).await.unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    println!(
        "good-router call (pooling: {}): p50 {:?}, p99 {:?}, max {:?}",
        rig.runtime.is_pooling(),
        times[times.len() / 2],
        times[times.len() * 99 / 100],
        times[times.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_fail_per_policy_while_good_calls_succeed() {
    let rig = Arc::new(rig(|s| s.acquire_timeout_ms = 10_000));
    let good = Arc::new(rig.router("good-router", "{}", 2_000).await);
    let spin = rig.router("spin", "{}", 50).await;
    let bomb = rig.router("memory-bomb", "{}", 2_000).await;
    let trap = rig.router("trap", "{}", 200).await;
    let flood = rig.router("log-flood", "{}", 5_000).await;

    let good_calls: Vec<_> = (0..50)
        .map(|_| {
            let good = Arc::clone(&good);
            tokio::spawn(async move { good.route(&summary(), &targets(), &[]).await })
        })
        .collect();

    // The guest spins forever: only its 50 ms deadline can end the call.
    let spun = spin.route(&summary(), &targets(), &[]).await;
    assert!(matches!(spun, Err(PluginError::Timeout(d)) if d == Duration::from_millis(50)), "{spun:?}");

    let bombed = bomb.route(&summary(), &targets(), &[]).await;
    assert!(matches!(bombed, Err(PluginError::MemoryLimit(n)) if n == 16 << 20), "{bombed:?}");

    let trapped = trap.route(&summary(), &targets(), &[]).await;
    match &trapped {
        Err(PluginError::Trap(message)) => {
            assert!(message.contains("fixture-trap: deliberate panic"), "the guest's panic message: {message}")
        }
        other => panic!("expected a trap, got {other:?}"),
    }

    let flooded = flood.route(&summary(), &targets(), &[]).await;
    assert_eq!(flooded.unwrap(), given_order(), "a chatty plugin still answers");
    let dropped = rig.metrics.log_lines_dropped.with_label_values(&["log-flood"]).get();
    // 100 000 log lines and 10 000 stdout lines, at most 16 of each written.
    assert!(dropped >= 100_000 - 16, "log lines dropped: {dropped}");

    for mode in ["unknown-target", "empty", "bad-status"] {
        let invalid = rig.router("invalid-output", &format!("\"{mode}\""), 200).await;
        let answer = invalid.route(&summary(), &targets(), &[]).await;
        assert!(matches!(answer, Err(PluginError::InvalidOutput(_))), "{mode}: {answer:?}");
    }

    for call in good_calls {
        assert_eq!(call.await.unwrap().unwrap(), given_order());
    }
    assert_eq!(rig.calls("spin", "timeout"), 1);
    assert_eq!(rig.calls("memory-bomb", "memory_limit"), 1);
    assert_eq!(rig.calls("trap", "trap"), 1);
    assert_eq!(rig.calls("invalid-output", "invalid_output"), 3);
    assert_eq!(rig.calls("good-router", "ok"), 50);
    // Each failure counted once, none quarantined yet.
    assert!(rig.runtime.quarantined().is_empty());
    // After all that, the good router still answers.
    assert_eq!(good.route(&summary(), &targets(), &[]).await.unwrap(), given_order());
}

/// A Rust plugin built without WASI is a core module carrying its world: the runtime encodes it
/// as a component at load, calls it directly (nothing it imports can block), and its instances
/// meet the same limits as a component's: the deadline stops a spin without a fiber or a timer.
#[tokio::test]
async fn modules_built_without_wasi_load_as_components_and_meet_the_same_limits() {
    let rig = rig(|_| {});
    let module = |name: &str| fixture_built_for("wasm32-unknown-unknown", name);
    assert_eq!(&module("good-router")[..8], b"\0asm\x01\0\0\0", "a core module, not a component");
    let load = |name: &'static str, deadline_ms: u64| {
        let (runtime, wasm) = (&rig.runtime, module(name));
        async move { runtime.load_router(name, "0.1.0", &wasm, "{}", limits(deadline_ms)).await.unwrap() }
    };
    let good = load("good-router", 2_000).await;
    assert!(good.pre_initialised(), "snapshotted after configure, as components are");
    assert!(good.called_directly(), "it imports only host: called without a fiber");
    for _ in 0..3 {
        assert_eq!(good.route(&summary(), &targets(), &[]).await.unwrap(), given_order());
    }
    let spun = load("spin", 50).await.route(&summary(), &targets(), &[]).await;
    assert!(matches!(spun, Err(PluginError::Timeout(d)) if d == Duration::from_millis(50)), "{spun:?}");
    let bombed = load("memory-bomb", 2_000).await.route(&summary(), &targets(), &[]).await;
    assert!(matches!(bombed, Err(PluginError::MemoryLimit(n)) if n == 16 << 20), "{bombed:?}");
    // No stderr for the panic's message: the trap, with the guest's backtrace, names where.
    let trapped = load("trap", 200).await.route(&summary(), &targets(), &[]).await;
    assert!(matches!(&trapped, Err(PluginError::Trap(m)) if m.contains("unreachable")), "{trapped:?}");
    // Modules link a 64 KiB stack below their data: recursing past it reaches below address 0,
    // an out-of-bounds access that ends the call, never a write over the module's data.
    let overflowed = load("stack-overflow", 200).await.route(&summary(), &targets(), &[]).await;
    assert!(matches!(&overflowed, Err(PluginError::Trap(m)) if m.contains("out of bounds")), "{overflowed:?}");
    assert_eq!(good.route(&summary(), &targets(), &[]).await.unwrap(), given_order());

    // A module that names no world is refused at load, with the cause.
    let bare = b"\0asm\x01\0\0\0".to_vec();
    match rig.runtime.load_router("bare", "0.1.0", &bare, "{}", limits(200)).await {
        Err(PluginError::Compile(m)) => assert!(m.contains("names no world"), "{m}"),
        Err(other) => panic!("a refusal naming the cause, not {other}"),
        Ok(_) => panic!("a module without a world is refused"),
    }
}

#[tokio::test]
async fn wrong_worlds_and_rejected_configs_fail_at_load() {
    let rig = rig(|_| {});
    let filter_as_router =
        rig.runtime.load_router("wrong-world", "0.1.0", &fixture("wrong-world"), "{}", limits(200)).await;
    match filter_as_router {
        Err(PluginError::WrongWorld { world: "router", message }) => {
            assert!(message.contains("route"), "names what is missing: {message}")
        }
        Err(other) => panic!("expected WrongWorld, got {other:?}"),
        Ok(_) => panic!("a privacy filter loaded as a router"),
    }
    let router_as_filter =
        rig.runtime.load_filter("good-router", "0.1.0", &fixture("good-router"), "{}", limits(200)).await;
    assert!(matches!(router_as_filter, Err(PluginError::WrongWorld { world: "privacy-filter", .. })));

    let rejected =
        rig.runtime.load_router("config-reject", "0.1.0", &fixture("config-reject"), "{\"x\":1}", limits(200)).await;
    match rejected {
        Err(PluginError::ConfigRejected(text)) => {
            assert_eq!(text, "bad config: expected {\"threshold_ms\": <number>}, got {\"x\":1}")
        }
        Err(other) => panic!("expected ConfigRejected, got {other:?}"),
        Ok(_) => panic!("a rejected config loaded"),
    }

    let not_wasm = rig.runtime.load_router("junk", "0.1.0", &b"not wasm"[..], "{}", limits(200)).await;
    assert!(matches!(not_wasm, Err(PluginError::Compile(_))));
    let missing =
        rig.runtime.load_router("missing", "0.1.0", Path::new("/nonexistent/x.wasm"), "{}", limits(200)).await;
    assert!(matches!(missing, Err(PluginError::Io { .. })));
    let too_big = CallLimits { deadline_ms: 10, max_memory_bytes: Some(1 << 40) };
    let too_big = rig.runtime.load_router("good-router", "0.1.0", &fixture("good-router"), "{}", too_big).await;
    assert!(matches!(too_big, Err(PluginError::Settings(_))));
}

#[tokio::test]
async fn filters_are_checked_like_routers() {
    let rig = rig(|_| {});
    let filter = rig.filter("wrong-world", "{}").await;
    let segments = vec![
        Segment { kind: SegmentKind::System, text: "be brief".into() },
        Segment { kind: SegmentKind::User, text: "mail ana@example.com now".into() },
    ];
    match filter.inspect_request(&summary(), &segments).await.unwrap() {
        RequestVerdict::Allow(inspection) => {
            assert_eq!(inspection.labels, ["pii.email"]);
            let r = &inspection.redactions[0];
            assert_eq!((r.segment, r.start, r.end), (1, 5, 20));
            assert_eq!(&segments[1].text[r.start as usize..r.end as usize], "ana@example.com");
        }
        other => panic!("expected allow, got {other:?}"),
    }
    assert_eq!(filter.inspect_response("all fine").await.unwrap(), ResponseVerdict::Allow);
    assert!(matches!(filter.inspect_response("a forbidden word").await.unwrap(), ResponseVerdict::Block(_)));

    let text = vec![Segment { kind: SegmentKind::User, text: "é and more text".into() }];
    for mode in ["out-of-range", "bad-segment", "empty-range", "split-char", "overlap"] {
        let bad = rig.filter("invalid-redaction", &format!("\"{mode}\"")).await;
        let verdict = bad.inspect_request(&summary(), &text).await;
        assert!(matches!(verdict, Err(PluginError::InvalidOutput(_))), "{mode}: {verdict:?}");
    }
}

#[tokio::test]
async fn a_failing_version_is_quarantined() {
    let rig = rig(|s| s.quarantine_after = 3);
    let trap = rig.router("trap", "{}", 200).await;
    let good = rig.router("good-router", "{}", 200).await;
    for _ in 0..3 {
        assert!(matches!(trap.route(&summary(), &targets(), &[]).await, Err(PluginError::Trap(_))));
    }
    let refused = trap.route(&summary(), &targets(), &[]).await;
    assert!(
        matches!(&refused, Err(PluginError::Quarantined(id)) if id == &PluginId { name: "trap".into(), version: "0.1.0".into() }),
        "{refused:?}"
    );
    // Refused without running the guest: it would have trapped (and been counted) again.
    assert_eq!(rig.calls("trap", "trap"), 3);
    assert_eq!(rig.calls("trap", "quarantined"), 1);
    assert_eq!(rig.runtime.quarantined(), [trap.id().clone()]);
    assert_eq!(good.route(&summary(), &targets(), &[]).await.unwrap(), given_order(), "others are unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_answers_overloaded() {
    let rig = Arc::new(rig(|s| {
        s.max_instances = 1;
        s.acquire_timeout_ms = 20;
    }));
    let spin = Arc::new(rig.router("spin", "{}", 2_000).await);
    let good = rig.router("good-router", "{}", 200).await;
    let spinning = {
        let spin = Arc::clone(&spin);
        tokio::spawn(async move { spin.route(&summary(), &targets(), &[]).await })
    };
    // Until the spinning call has taken the only slot, the good router still gets it.
    loop {
        match good.route(&summary(), &targets(), &[]).await {
            Err(PluginError::Overloaded(_)) => break,
            Ok(order) => assert_eq!(order, given_order()),
            Err(other) => panic!("expected overloaded, got {other:?}"),
        }
        assert!(!spinning.is_finished(), "the spinning call ended before the pool was seen full");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(matches!(spinning.await.unwrap(), Err(PluginError::Timeout(_))));
    assert_eq!(good.route(&summary(), &targets(), &[]).await.unwrap(), given_order(), "the slot is free again");
    assert_eq!(rig.calls("good-router", "overloaded"), 1);
}

#[tokio::test]
async fn compiled_artifacts_are_cached_and_only_sealed_ones_are_read() {
    let dir = TempDir::new();
    let settings = || PluginSettings { cache_dir: dir.0.clone(), max_instances: 4, ..PluginSettings::default() };
    let runtime = || {
        let metrics = Arc::new(PluginMetrics::new(&prometheus::Registry::new()).unwrap());
        PluginRuntime::new(settings(), metrics).unwrap()
    };
    let good = fixture("good-router");

    // Files the cache did not write are never read: junk under artifact-like names is ignored.
    std::fs::create_dir_all(&dir.0).unwrap();
    std::fs::write(dir.0.join("evil.cwasm"), b"\x7fELF not an artifact").unwrap();
    let first = runtime();
    let path = first.artifact_path(&good);
    std::fs::write(path.with_file_name("0000-0000.cwasm"), b"junk").unwrap();

    // Three artifacts: the component, the one instrumented for its snapshot, and the snapshot.
    first.load_router("good-router", "1", &good, "{}", limits(200)).await.unwrap();
    let compiled = first.cache_stats().compiles;
    assert_eq!((compiled, first.cache_stats().hits), (3, 0));
    assert!(path.exists(), "the artifact was written");

    let second = runtime();
    // Served from the cache: hits and no compile (the counters, not load times, which a busy
    // machine makes meaningless); the snapshot of one configuration is the same bytes each time.
    let router = second.load_router("good-router", "1", &good, "{}", limits(200)).await.unwrap();
    assert_eq!(second.cache_stats().hits, compiled);
    assert_eq!(second.cache_stats().compiles, 0);
    assert_eq!(router.route(&summary(), &targets(), &[]).await.unwrap(), given_order());

    // A damaged artifact fails its seal and is compiled over.
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let third = runtime();
    third.load_router("good-router", "1", &good, "{}", limits(200)).await.unwrap();
    let stats = third.cache_stats();
    assert_eq!(stats, meridian::plugin::CacheStats { hits: compiled - 1, compiles: 1, rejected: 1 });

    // So is a genuine artifact of another component put under this one's name.
    let spin = fixture("spin");
    third.load_router("spin", "1", &spin, "{}", limits(200)).await.unwrap();
    std::fs::copy(third.artifact_path(&spin), &path).unwrap();
    let fourth = runtime();
    let router = fourth.load_router("good-router", "1", &good, "{}", limits(200)).await.unwrap();
    assert_eq!(fourth.cache_stats().rejected, 1);
    assert_eq!(router.route(&summary(), &targets(), &[]).await.unwrap(), given_order());

    // And the recompiled artifact serves the next load.
    let fifth = runtime();
    fifth.load_router("good-router", "1", &good, "{}", limits(200)).await.unwrap();
    assert_eq!((fifth.cache_stats().hits, fifth.cache_stats().compiles), (compiled, 0));
}

#[tokio::test]
async fn a_pool_too_large_to_reserve_falls_back_to_on_demand() {
    // Two hundred million memories of several GiB of address space each cannot be reserved anywhere.
    let rig = rig(|s| s.max_instances = 100_000_000);
    assert!(!rig.runtime.is_pooling());
    let router = rig.router("good-router", "{}", 200).await;
    assert_eq!(router.route(&summary(), &targets(), &[]).await.unwrap(), given_order());
}

/// `prefix-match` answers a router what the host computed for each target, call by call: the
/// shipped prefix router (built against contract 0.1.2) follows it, and a router session (one
/// instance, many calls) sees each call's own figures.
#[tokio::test]
async fn the_prefix_router_reads_what_each_target_holds_through_prefix_match() {
    let rig = rig(|_| {});
    let router = rig
        .runtime
        .load_router("prefix-router", "0.1.0", &plugin_wasm("prefix-router"), "{}", limits(50))
        .await
        .unwrap();
    let engines: Vec<Target> = ["engine-a", "engine-b"]
        .into_iter()
        .map(|name| Target { kind: TargetKind::Dedicated, capacity: Some(8), ..target(name, 100.0) })
        .collect();
    let first = |outcome: Outcome| match outcome {
        Outcome::Route(decision) => decision.targets[0].clone(),
        other => panic!("expected a decision, got {other:?}"),
    };
    // 100 of the 120 prompt tokens at engine-b, then at engine-a.
    assert_eq!(first(router.route(&summary(), &engines, &[0, 100]).await.unwrap()), "engine-b");
    assert_eq!(first(router.route(&summary(), &engines, &[100, 0]).await.unwrap()), "engine-a");
    let mut session = router.session();
    assert_eq!(first(session.route(&summary(), &engines, &[0, 100]).await.unwrap()), "engine-b");
    assert_eq!(first(session.route(&summary(), &engines, &[100]).await.unwrap()), "engine-a", "missing means 0");
}

#[tokio::test]
async fn the_shipped_latency_router_and_pii_redactor_run() {
    let rig = rig(|_| {});
    let router = rig
        .runtime
        .load_router("latency-router", "0.1.0", &plugin_wasm("latency-router"), "{}", limits(50))
        .await
        .unwrap();
    match router.route(&summary(), &targets(), &[]).await.unwrap() {
        Outcome::Route(decision) => assert_eq!(decision.targets, ["engine-a", "openai", "openrouter"], "fastest first"),
        other => panic!("expected a decision, got {other:?}"),
    }

    assert!(router.pre_initialised());

    let filter =
        rig.runtime.load_filter("pii-redactor", "0.1.0", &plugin_wasm("pii-redactor"), "{}", limits(50)).await.unwrap();
    assert!(filter.pre_initialised());
    let segments = vec![Segment { kind: SegmentKind::User, text: "write to ana.lopez@example.com please".into() }];
    // The runtime has already checked any redactions against the contract.
    let verdict = filter.inspect_request(&summary(), &segments).await.unwrap();
    assert!(format!("{verdict:?}").contains("email"), "the email is noticed: {verdict:?}");
    assert_eq!(filter.inspect_response("a harmless answer").await.unwrap(), ResponseVerdict::Allow);
    // Without the secrets rule it reads no answer at all, and says so.
    assert_eq!(filter.answer_triggers().map(|t| t.literals().len()), Some(0));
}

/// pii-redactor, answering `block_secrets_in_response`.
async fn secrets_filter(rig: &Rig) -> FilterPlugin {
    let config = r#"{"block_secrets_in_response": true}"#;
    let filter = rig
        .runtime
        .load_filter("pii-redactor", "0.1.0", &plugin_wasm("pii-redactor"), config, limits(200))
        .await
        .unwrap();
    let triggers = filter.answer_triggers().expect("secret prefixes as answer triggers").literals();
    assert!(triggers.iter().any(|t| t == "sk-") && triggers.iter().any(|t| t == "-----BEGIN "), "{triggers:?}");
    filter
}

#[tokio::test]
async fn a_response_session_shows_one_answer_to_one_instance() {
    let rig = rig(|_| {});
    let filter = secrets_filter(&rig).await;

    // A key split across two chunks: neither half is a secret on its own.
    let mut answer = filter.response_session();
    assert_eq!(answer.inspect("my key is sk-proj-abc").await.unwrap(), ResponseVerdict::Allow);
    match answer.inspect("def1234567890ghijklmnop").await.unwrap() {
        ResponseVerdict::Block(reason) => assert!(reason.contains("secret"), "{reason}"),
        other => panic!("the split secret is found across the chunks: {other:?}"),
    }
    drop(answer);

    // Another answer starts clean: the first half of a key seen before is not remembered.
    let mut other = filter.response_session();
    assert_eq!(other.inspect("my key is sk-proj-abc").await.unwrap(), ResponseVerdict::Allow);
    let mut fresh = filter.response_session();
    assert_eq!(fresh.inspect("def1234567890ghijklmnop").await.unwrap(), ResponseVerdict::Allow);
    assert_eq!(other.inspect(" and that is all").await.unwrap(), ResponseVerdict::Allow);

    // One-shot calls are fresh instances: a half never meets its other half.
    assert_eq!(filter.inspect_response("my key is sk-proj-abc").await.unwrap(), ResponseVerdict::Allow);
    assert_eq!(filter.inspect_response("def1234567890ghijklmnop").await.unwrap(), ResponseVerdict::Allow);
    // Every call of a session is counted; the two answers that began without a secret's prefix
    // (the filter's declared answer triggers) were never shown to it.
    assert_eq!(rig.calls("pii-redactor", "ok"), 5);
}

/// The contract's minor versions only add: a router built against `meridian:plugin@0.1.0` (before
/// `answer-triggers`) links against this host's `host` interface and answers.
#[tokio::test]
async fn a_component_built_against_the_first_contract_still_runs() {
    let rig = rig(|_| {});
    let router = rig.router("contract-0-1-0", "{}", 200).await;
    match router.route(&summary(), &targets(), &[]).await.unwrap() {
        Outcome::Route(decision) => assert_eq!(decision.targets, ["openrouter", "engine-a", "openai"]),
        other => panic!("expected a decision, got {other:?}"),
    }
}

#[tokio::test]
async fn answer_triggers_decide_what_of_an_answer_a_filter_sees() {
    let rig = rig(|_| {});
    let filter = rig.filter("invalid-redaction", "\"triggered\"").await;
    assert_eq!(filter.answer_triggers().map(|t| t.literals().to_vec()), Some(vec!["TRIGGER".to_string()]));
    let calls = rig.calls("invalid-redaction", "ok");

    // Nothing is shown before the trigger, even split across pieces; then the text before it
    // (here all of it, from the answer's start) and the pieces that follow.
    let mut answer = filter.response_session();
    assert_eq!(answer.inspect("Hello there, ").await.unwrap(), ResponseVerdict::Allow);
    assert_eq!(answer.inspect("the word is TRIG").await.unwrap(), ResponseVerdict::Allow);
    assert_eq!(rig.calls("invalid-redaction", "ok"), calls, "no call, and no instance, before the trigger");
    let shown = answer.inspect("GER here").await.unwrap();
    assert_eq!(shown, ResponseVerdict::Block("saw:Hello there, the word is TRIGGER here".into()));

    // The context is bounded: a long answer before the trigger is not all replayed.
    let mut long = filter.response_session();
    for _ in 0..100 {
        assert_eq!(long.inspect("lorem ipsum ").await.unwrap(), ResponseVerdict::Allow);
    }
    let ResponseVerdict::Block(saw) = long.inspect("TRIGGER").await.unwrap() else { panic!("shown") };
    assert!(saw.len() <= "saw:".len() + meridian::plugin::LOOKBEHIND + "TRIGGER".len(), "{}", saw.len());
    assert!(saw.starts_with("saw:lorem ") || saw.starts_with("saw:ipsum "), "from a word's start: {saw}");
    assert!(saw.ends_with("ipsum TRIGGER"), "{saw}");
    // A whole answer without the trigger costs no call.
    assert_eq!(filter.inspect_response("nothing to see").await.unwrap(), ResponseVerdict::Allow);
    assert_eq!(rig.calls("invalid-redaction", "ok"), calls + 2);

    // A declaration the contract does not allow refuses the plugin at load.
    let refused = rig
        .runtime
        .load_filter("invalid-redaction", "0.1.0", &fixture("invalid-redaction"), "\"bad-triggers\"", limits(200))
        .await;
    assert!(
        matches!(&refused, Err(PluginError::InvalidOutput(m)) if m.contains("answer-triggers")),
        "{:?}",
        refused.err()
    );
}

#[tokio::test]
async fn request_triggers_decide_which_requests_a_filter_is_called_for() {
    let rig = rig(|s| s.quarantine_after = 3);
    // The shipped pii-redactor declares what every one of its findings holds.
    let pii = rig
        .runtime
        .load_filter("pii-redactor", "0.1.0", &plugin_wasm("pii-redactor"), "{}", limits(200))
        .await
        .unwrap();
    let declared = pii.request_triggers().expect("pii-redactor declares request triggers").literals();
    for t in ["0", "9", "@", ":", "sk-", "-----BEGIN "] {
        assert!(declared.iter().any(|d| d == t), "{t:?} in {declared:?}");
    }
    let plain = Segment { kind: SegmentKind::System, text: "You answer questions about the weather.".into() };
    let question = Segment { kind: SegmentKind::User, text: "Will it rain in Lisbon tomorrow?".into() };
    let allowed = pii.inspect_request(&summary(), &[plain.clone(), question.clone()]).await.unwrap();
    assert_eq!(allowed, RequestVerdict::Allow(Inspection { labels: vec![], redactions: vec![] }));
    assert_eq!((rig.calls("pii-redactor", "ok"), rig.calls("pii-redactor", "skipped")), (0, 1), "no call");

    // One trigger in any segment, and the filter sees the whole request.
    let phone = Segment { kind: SegmentKind::User, text: "or call me on +44 20 7946 0958".into() };
    match pii.inspect_request(&summary(), &[plain.clone(), question, phone]).await.unwrap() {
        RequestVerdict::Allow(found) => {
            assert_eq!(found.labels, ["pii.phone.redacted"]);
            assert_eq!((found.redactions.len(), found.redactions[0].segment), (1, 2), "{found:?}");
        }
        other => panic!("the phone number is redacted: {other:?}"),
    }
    assert_eq!((rig.calls("pii-redactor", "ok"), rig.calls("pii-redactor", "skipped")), (1, 1));

    // A quarantined filter fails every request, including those it would not have been shown.
    let broken = rig.filter("invalid-redaction", "\"request-triggered\"").await;
    let needed = Segment { kind: SegmentKind::User, text: "the TRIGGER word".into() };
    let skipped = broken.inspect_request(&summary(), std::slice::from_ref(&plain)).await;
    assert!(matches!(skipped, Ok(RequestVerdict::Allow(_))), "not shown, so not failed: {skipped:?}");
    for _ in 0..3 {
        let failed = broken.inspect_request(&summary(), std::slice::from_ref(&needed)).await;
        assert!(matches!(failed, Err(PluginError::InvalidOutput(_))), "{failed:?}");
    }
    let closed = broken.inspect_request(&summary(), &[plain]).await;
    assert!(matches!(closed, Err(PluginError::Quarantined(_))), "fails closed: {closed:?}");
}

#[tokio::test]
async fn a_session_re_arms_the_deadline_for_every_call() {
    let rig = rig(|_| {});
    const DEADLINE_MS: u64 = 200;
    let filter = rig
        .runtime
        .load_filter("wrong-world", "0.1.0", &fixture("wrong-world"), "{}", limits(DEADLINE_MS))
        .await
        .unwrap();
    let mut answer = filter.response_session();
    // The session lives far longer than one deadline; each call gets its own.
    for i in 0..3 {
        let verdict = answer.inspect("all fine").await;
        assert_eq!(verdict.unwrap_or_else(|e| panic!("call {i}: {e}")), ResponseVerdict::Allow);
        // Not a wait for an event (there is none to poll): the point is that wall-clock time
        // passes, more than a deadline's worth between calls, so a deadline armed once per
        // session would have expired. A busy machine only makes the sleep longer.
        tokio::time::sleep(Duration::from_millis(DEADLINE_MS + 50)).await;
    }
    assert!(matches!(answer.inspect("a forbidden word").await.unwrap(), ResponseVerdict::Block(_)));
    assert!(!answer.is_poisoned(), "a block is an answer, not a failure");
}

#[tokio::test]
async fn a_failed_call_poisons_its_session_only() {
    let rig = rig(|s| s.quarantine_after = 100);
    let filter = rig.filter("wrong-world", "{}").await;
    let mut answer = filter.response_session();
    assert_eq!(answer.inspect("all fine").await.unwrap(), ResponseVerdict::Allow);
    // Lowering 20 MiB of text into the instance grows its memory past the 16 MiB cap: a trap.
    let huge = "x".repeat(20 << 20);
    let failed = answer.inspect(&huge).await;
    assert!(matches!(failed, Err(PluginError::MemoryLimit(_))), "{failed:?}");
    assert!(answer.is_poisoned());
    // Fail closed: the rest of this answer is refused, however harmless.
    let later = answer.inspect("all fine").await;
    assert!(matches!(later, Err(PluginError::Poisoned)), "{later:?}");
    assert!(!later.unwrap_err().is_plugin_fault(), "the failure was counted once");
    assert_eq!(rig.calls("wrong-world", "memory_limit"), 1);
    assert_eq!(rig.calls("wrong-world", "poisoned"), 1);
    // Another answer gets a healthy instance.
    let mut next = filter.response_session();
    assert_eq!(next.inspect("all fine").await.unwrap(), ResponseVerdict::Allow);
}

#[tokio::test]
async fn a_session_holds_its_instance_slot_until_dropped() {
    let rig = rig(|s| {
        s.max_instances = 1;
        s.acquire_timeout_ms = 20;
    });
    let filter = rig.filter("wrong-world", "{}").await;
    let mut answer = filter.response_session();
    // No slot is taken before the answer's first text.
    assert_eq!(filter.inspect_response("all fine").await.unwrap(), ResponseVerdict::Allow);
    assert_eq!(answer.inspect("all fine").await.unwrap(), ResponseVerdict::Allow);
    let refused = filter.inspect_response("all fine").await;
    assert!(matches!(refused, Err(PluginError::Overloaded(_))), "the session holds the only slot: {refused:?}");
    assert_eq!(answer.inspect("still fine").await.unwrap(), ResponseVerdict::Allow);
    drop(answer);
    assert_eq!(filter.inspect_response("all fine").await.unwrap(), ResponseVerdict::Allow, "the slot is free again");
}

/// Prints the cost of inspecting one chunk of an answer: on a session's instance against a fresh
/// instance per chunk (instantiation and `configure` included). A figure to read, not a bound to
/// assert. Run with `--nocapture`; meaningful in a release build.
#[tokio::test]
async fn response_chunk_cost() {
    let rig = rig(|_| {});
    let filter = secrets_filter(&rig).await;
    let chunk = "a harmless piece of a streamed answer, forty-odd bytes ";
    let mut session = filter.response_session();
    for _ in 0..50 {
        session.inspect(chunk).await.unwrap();
        filter.inspect_response(chunk).await.unwrap();
    }
    let (mut reused, mut fresh) = (Vec::with_capacity(1000), Vec::with_capacity(1000));
    for _ in 0..1000 {
        let start = Instant::now();
        session.inspect(chunk).await.unwrap();
        reused.push(start.elapsed());
        let start = Instant::now();
        filter.inspect_response(chunk).await.unwrap();
        fresh.push(start.elapsed());
    }
    for (what, times) in [("session", &mut reused), ("fresh instance", &mut fresh)] {
        times.sort();
        println!(
            "pii-redactor response chunk, {what} (pooling: {}): p50 {:?}, p99 {:?}",
            rig.runtime.is_pooling(),
            times[times.len() / 2],
            times[times.len() * 99 / 100],
        );
    }
}
