//! Live target statistics and outlier ejection, end to end: a target that fails `N` times in a row
//! is ejected and skipped (its mock stops being asked), comes back through a half-open request
//! after its backoff, and is ejected for longer when that request fails too; when every target of
//! a model is out they are tried anyway; `/admin/targets` and the metrics show the states; and a
//! router plugin sees the measured latencies (the latency router picks the faster of two mocks).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian::config::{hash_key, Config, PluginKind};
use meridian_e2e::engine::{free_udp_addr, Cluster};
use meridian_e2e::{
    add_plugin, metric, metric_or_zero, model, Behavior, ConfigExt, Mocks, Reply, TempDir, TestEdge, ACME_KEY,
    GLOBEX_KEY,
};
use meridian_engine::node::{Node, NodeConfig};
use serde_json::{json, Value};
use tokio::sync::oneshot;

const ADMIN_KEY: &str = "sk-admin-test";
/// Long enough that the handful of requests the test makes while a target is ejected fit in it on
/// a busy machine; the test polls for the end of each ejection, so it costs only its length.
const BASE_EJECTION_MS: u64 = 1000;

/// The standard config with an admin key and a quick `[health]`: 3 failures eject for 1 s,
/// doubling up to 2 s.
fn config(mocks: &Mocks) -> Config {
    let mut cfg = mocks.config();
    cfg.node.admin_keys = vec![hash_key(ADMIN_KEY)];
    cfg.health.ejection_threshold = 3;
    cfg.health.base_ejection_ms = BASE_EJECTION_MS;
    cfg.health.max_ejection_ms = 2000;
    cfg
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello there"}]})
}

async fn ask(edge: &TestEdge, key: &str, model: &str) -> Reply {
    edge.post("/v1/chat/completions", key, &chat(model, false)).await
}

/// `/admin/targets`, by target name.
async fn targets(edge: &TestEdge) -> Value {
    let r = edge.send("GET", "/admin/targets", Some(ADMIN_KEY), &[], Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let list = r.json()["targets"].as_array().cloned().unwrap_or_default();
    list.into_iter().map(|t| (t["name"].as_str().unwrap_or_default().to_string(), t)).collect()
}

/// Polls `/admin/targets` (which sends no request to the target) until `name`'s ejection has run
/// out, for at most 10 s.
async fn until_half_open(edge: &TestEdge, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = targets(edge).await;
        match t[name]["health"].as_str() {
            Some("half_open") => return,
            Some("ejected") => assert!(Instant::now() < deadline, "{name} still ejected after 10 s: {t}"),
            _ => panic!("{name} left its ejection other than through half-open: {t}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metrics(edge: &TestEdge) -> String {
    edge.send("GET", "/metrics", None, &[], Bytes::new()).await.text()
}

#[tokio::test]
async fn a_failing_target_is_ejected_skipped_and_brought_back_by_a_half_open_request() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(config(&mocks)).await;
    for _ in 0..3 {
        mocks.openai.push(Behavior::Status(500));
    }
    for i in 0..3 {
        let r = ask(&edge, ACME_KEY, "fallback").await;
        assert_eq!((r.status, r.header("x-meridian-target")), (200, Some("oa2")), "request {i}: {}", r.text());
    }
    assert_eq!(mocks.request_counts(), [3, 3, 0]);
    let t = targets(&edge).await;
    assert_eq!(t["oa"]["health"], "ejected", "{t}");
    assert_eq!(t["oa"]["consecutive_failures"], 3, "{t}");
    assert_eq!(t["oa"]["ejections_total"], 1, "{t}");
    let until = t["oa"]["ejected_until_ms"].as_u64().unwrap_or_else(|| panic!("ejected until: {t}"));
    assert!(until > 0 && until <= BASE_EJECTION_MS, "{t}");
    assert!(t["oa"]["error_rate"].as_f64().unwrap() > 0.0, "{t}");
    assert_eq!(t["oa2"]["health"], "healthy", "{t}");
    assert_eq!(t["oa2"]["ejected_until_ms"], Value::Null, "{t}");
    assert_eq!(t["oa"]["kind"], "managed", "{t}");
    assert_eq!(t["oa"]["in_flight"], 0, "{t}");

    // Ejected: requests go straight to the next target, and the skip is not an attempt.
    for stream in [false, true, false] {
        let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("fallback", stream)).await;
        assert_eq!((r.status, r.header("x-meridian-target")), (200, Some("oa2")), "{}", r.text());
    }
    assert_eq!(mocks.request_counts(), [3, 6, 0], "the ejected target is not asked");
    let m = metrics(&edge).await;
    let attempts = metric(&m, "meridian_upstream_attempts_total", &["target=\"oa\""]);
    assert_eq!(attempts, 3.0, "skips are not attempts:\n{m}");
    assert_eq!(metric(&m, "meridian_target_health", &["target=\"oa\""]), 0.0, "{m}");
    assert_eq!(metric(&m, "meridian_target_health", &["target=\"oa2\""]), 1.0, "{m}");
    assert_eq!(metric(&m, "meridian_target_ejections_total", &["target=\"oa\""]), 1.0, "{m}");
    assert_eq!(metric(&m, "meridian_target_in_flight", &["target=\"oa2\""]), 0.0, "{m}");
    assert!(metric(&m, "meridian_target_latency_ms", &["target=\"oa2\""]) > 0.0, "{m}");

    // After the backoff: half-open. Its one request fails: ejected again, for twice as long.
    until_half_open(&edge, "oa").await;
    mocks.openai.push(Behavior::Status(503));
    let r = ask(&edge, ACME_KEY, "fallback").await;
    assert_eq!((r.status, r.header("x-meridian-target")), (200, Some("oa2")), "{}", r.text());
    assert_eq!(mocks.request_counts(), [4, 7, 0], "the half-open target got one request");
    let t = targets(&edge).await;
    assert_eq!(t["oa"]["health"], "ejected", "{t}");
    assert_eq!(t["oa"]["ejections_total"], 2, "{t}");
    let until = t["oa"]["ejected_until_ms"].as_u64().unwrap();
    assert!(until > BASE_EJECTION_MS && until <= 2 * BASE_EJECTION_MS, "a longer backoff: {t}");
    let r = ask(&edge, ACME_KEY, "fallback").await;
    assert_eq!(r.header("x-meridian-target"), Some("oa2"));
    assert_eq!(mocks.request_counts(), [4, 8, 0]);

    // After the longer backoff its half-open request succeeds: it is back.
    until_half_open(&edge, "oa").await;
    let r = ask(&edge, ACME_KEY, "fallback").await;
    assert_eq!((r.status, r.header("x-meridian-target")), (200, Some("oa")), "{}", r.text());
    let t = targets(&edge).await;
    assert!(matches!(t["oa"]["health"].as_str(), Some("healthy" | "degraded")), "closed again: {t}");
    assert_eq!(t["oa"]["consecutive_failures"], 0, "{t}");
    assert_eq!(t["oa"]["ejected_until_ms"], Value::Null, "{t}");
    for _ in 0..2 {
        assert_eq!(ask(&edge, ACME_KEY, "fallback").await.header("x-meridian-target"), Some("oa"));
    }
    assert_eq!(mocks.request_counts(), [7, 8, 0]);
}

#[tokio::test]
async fn when_every_target_is_ejected_they_are_tried_anyway() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(config(&mocks)).await;
    for _ in 0..3 {
        mocks.openai.push(Behavior::Status(500));
    }
    for _ in 0..3 {
        assert_eq!(ask(&edge, ACME_KEY, "gpt-test").await.status, 502);
    }
    assert_eq!(targets(&edge).await["oa"]["health"], "ejected");
    // `gpt-test` has only oa: better a probable failure than a certain one. It answers, and the
    // success closes it at once.
    let r = ask(&edge, ACME_KEY, "gpt-test").await;
    assert_eq!((r.status, r.header("x-meridian-target")), (200, Some("oa")), "{}", r.text());
    assert_eq!(mocks.openai.request_count(), 4);
    let t = targets(&edge).await;
    assert_ne!(t["oa"]["health"], "ejected", "{t}");
}

#[tokio::test]
async fn admin_targets_needs_an_admin_key() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(config(&mocks)).await;
    let get = |key| edge.send("GET", "/admin/targets", key, &[], Bytes::new());
    assert_eq!(get(None).await.status, 401);
    assert_eq!(get(Some(ACME_KEY)).await.status, 401, "a tenant key is not an admin key");
    let t = targets(&edge).await;
    assert_eq!(t.as_object().map(|o| o.len()), Some(3), "every target: {t}");
    assert_eq!(t["an"]["api"], "anthropic", "{t}");
    assert_eq!(t["oa"]["latency_ms"], Value::Null, "not measured yet: {t}");

    let mut cfg = mocks.config();
    cfg.node.admin_keys.clear();
    let edge = TestEdge::start(cfg).await;
    assert_eq!(edge.send("GET", "/admin/targets", Some(ADMIN_KEY), &[], Bytes::new()).await.status, 404);
}

#[tokio::test]
async fn the_latency_router_sees_measured_latencies_and_picks_the_faster_target() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("target-health");
    let mut cfg = config(&mocks);
    cfg.plugin_runtime.cache_dir = cache.path().to_path_buf();
    add_plugin(&mut cfg, "latency", PluginKind::Router, "latency-router", json!({}));
    cfg.tenant_mut("acme").router = Some("latency".into());
    // `only-oa2`: a way for globex (no router) to measure oa2 alone, as `gpt-test` does oa.
    cfg.models.push(model("only-oa2", &[("oa2", Some("gpt-4o-mini"))]));
    let edge = TestEdge::start(cfg).await;

    // Measure, whole and streamed: oa slow (250 ms to its response head), oa2 fast.
    for stream in [false, true] {
        mocks.openai.push(Behavior::Delay(Duration::from_millis(250)));
        for model in ["gpt-test", "only-oa2"] {
            let r = edge.post("/v1/chat/completions", GLOBEX_KEY, &chat(model, stream)).await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    let t = targets(&edge).await;
    for key in ["latency_ms", "ttft_ms"] {
        let (slow, fast) = (t["oa"][key].as_f64().unwrap(), t["oa2"][key].as_f64().unwrap());
        assert!(slow >= 250.0 && fast > 0.0 && fast < slow, "{key}: {t}");
    }
    assert_eq!(mocks.request_counts(), [2, 2, 0]);

    // `fallback` lists oa first; the router, seeing the latencies, sends it to oa2.
    for stream in [false, true] {
        let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("fallback", stream)).await;
        assert_eq!((r.status, r.header("x-meridian-target")), (200, Some("oa2")), "{}", r.text());
    }
    assert_eq!(mocks.request_counts(), [2, 4, 0], "the slow target is not asked");
}

/// An engine node in this process on `addr`, until the returned sender fires (then await the task:
/// its socket is closed when it ends).
async fn engine_on(
    cluster: &Cluster,
    dir: &TempDir,
    addr: SocketAddr,
    max_batch: u32,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let path = dir.path().join("engine.toml");
    std::fs::write(&path, cluster.engine_config("engine-a", addr, max_batch)).unwrap();
    // A restart on the address of a stopped engine can find it taken for a moment by another
    // test's client socket (the kernel hands out freed ports again): try again until it is free.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let node = loop {
        let config = NodeConfig::load(&path).unwrap_or_else(|e| panic!("engine config: {e}"));
        match Node::start(config).await {
            Ok(node) => break node,
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("in use") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("engine starts: {e}"),
        }
    };
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(async move {
        let _ = node
            .run(async {
                let _ = stopped.await;
            })
            .await;
    });
    (stop, task)
}

/// Polls `/admin/targets` until `engine-a` satisfies `ok`, for at most `secs`.
async fn until_engine(edge: &TestEdge, secs: u64, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let t = targets(edge).await;
        if ok(&t["engine-a"]) {
            return t;
        }
        assert!(Instant::now() < deadline, "{what} within {secs} s: {t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_targets_are_probed_for_load_and_rtt_ejected_when_down_and_back_when_up() {
    let mocks = Mocks::start().await;
    let cluster = Cluster::new("probes");
    let dir = TempDir::new("probed-engine");
    let addr = free_udp_addr();
    let (stop, task) = engine_on(&cluster, &dir, addr, 3).await;
    let mut cfg = config(&mocks);
    cluster.add_engine_target(&mut cfg, "edge-test", "engine-a", "engine-a", addr);
    let t = cfg.target_mut("engine-a");
    t.connect_timeout_ms = 300;
    t.first_byte_timeout_ms = 500;
    cfg.health.ejection_threshold = 2;
    cfg.health.base_ejection_ms = 300;
    cfg.health.probe_interval_ms = 100;
    let edge = TestEdge::start(cfg).await;

    // Probes alone (no request) bring in the engine's load and the QUIC RTT.
    let t = until_engine(&edge, 20, "a probe answered", |e| e["engine"]["max_batch"] == 3).await;
    let e = &t["engine-a"];
    assert_eq!(e["health"], "healthy", "{t}");
    assert_eq!(e["kind"], "dedicated", "{t}");
    assert!(e["rtt_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{t}");
    assert_eq!(e["engine"]["queue_depth"], 0, "{t}");
    assert_eq!(e["engine"]["provider"], "cpu", "the provider in use shows at /admin/targets: {t}");
    let m = metrics(&edge).await;
    assert_eq!(metric(&m, "meridian_engine_info", &["target=\"engine-a\"", "provider=\"cpu\""]), 1.0, "{m}");

    // The engine stops: failed probes eject it, with no request sent.
    let _ = stop.send(());
    task.await.unwrap();
    let t = until_engine(&edge, 20, "ejected by failed probes", |e| e["health"] == "ejected").await;
    assert!(t["engine-a"]["consecutive_failures"].as_u64().unwrap() >= 2, "{t}");
    let m = metrics(&edge).await;
    assert_eq!(metric(&m, "meridian_target_health", &["target=\"engine-a\""]), 0.0, "{m}");
    assert_eq!(metric_or_zero(&m, "meridian_upstream_attempts_total", &["target=\"engine-a\""]), 0.0, "{m}");

    // It comes back on the same address: a probe after the backoff closes it.
    let (_stop, _task) = engine_on(&cluster, &dir, addr, 3).await;
    let t =
        until_engine(&edge, 30, "back after a probe", |e| matches!(e["health"].as_str(), Some("healthy" | "degraded")))
            .await;
    assert_eq!(t["engine-a"]["consecutive_failures"], 0, "{t}");
}
