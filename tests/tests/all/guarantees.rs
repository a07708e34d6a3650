//! The host owns the tenant's guarantees, whatever the router does: a request that still carries
//! personal data never reaches a target outside the tenant's allowed regions when the router
//! fails by its deadline, by a saturated instance pool or by quarantine (the static order that
//! replaces it is filtered by the same rule, and an empty one is a typed refusal); and a target
//! that cannot serve a kind of request (tools to an engine) is skipped for the next one.

use std::time::{Duration, Instant};

use meridian::config::{Config, PluginKind, RelayPeer};
use meridian_e2e::engine::{Cluster, TestEngine};
use meridian_e2e::raw::RawConn;
use meridian_e2e::{
    add_plugin, metric, metric_or_zero, model, ConfigExt, Mocks, TempDir, TestEdge, ACME_KEY, GLOBEX_KEY,
};
use meridian_engine::api::RelayRequest;
use serde_json::{json, Value};

const PERSONAL: &str = "forward this to ann.lee@example.com please";

fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// Model `fallback` tries oa (us-east) first, then oa2 (eu-west), then an (no region). Tenant
/// acme labels e-mails without redacting them (pii-redactor), may keep personal data in eu-west
/// only, and routes with `router` (a component built from `crate_name`); globex is the same but
/// may use ap-south only, where no target runs.
fn residency_with(mocks: &Mocks, cache: &TempDir, crate_name: &str, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut cfg = mocks.config();
    cfg.plugin_runtime.cache_dir = cache.path().to_path_buf();
    cfg.target_mut("oa").region = Some("us-east".into());
    cfg.target_mut("oa2").region = Some("eu-west".into());
    add_plugin(&mut cfg, "pii", PluginKind::Filter, "pii-redactor", json!({"actions": {"email": "label"}}));
    add_plugin(&mut cfg, "router", PluginKind::Router, crate_name, json!({}));
    for (name, region) in [("acme", "eu-west"), ("globex", "ap-south")] {
        let tenant = cfg.tenant_mut(name);
        tenant.filters = vec!["pii".into()];
        tenant.router = Some("router".into());
        tenant.allowed_regions = vec![region.into()];
    }
    tweak(&mut cfg);
    cfg
}

/// With the router failing on every call: acme's personal data goes to eu-west only, and what
/// has no personal data follows the static order; globex's personal data is refused (503
/// `router_failed`) and nothing leaves. oa (us-east) never sees personal data.
async fn residency_holds_while_the_router_fails(edge: &TestEdge, mocks: &Mocks) {
    let us_east = mocks.openai.request_count();
    for _ in 0..3 {
        let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("fallback", PERSONAL)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-meridian-target"), Some("oa2"), "eu-west, though us-east is first");
        assert_eq!(r.answer_text(), format!("Echo: {PERSONAL}"));
    }
    let before = mocks.request_counts();
    let r = edge.post("/v1/chat/completions", GLOBEX_KEY, &chat("fallback", PERSONAL)).await;
    assert_eq!((r.status, r.error_code()), (503, "router_failed".into()), "{}", r.text());
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("allowed regions") && !message.contains("ann.lee"), "{message}");
    assert_eq!(mocks.request_counts(), before, "nothing left the node");
    assert_eq!(mocks.openai.request_count(), us_east, "the us-east target never saw personal data");

    let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("fallback", "a name for a cat?")).await;
    assert_eq!(r.header("x-meridian-target"), Some("oa"), "no personal data: the static order");
}

#[tokio::test]
async fn a_router_past_its_deadline_never_widens_residency() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("guarantee-deadline");
    let cfg = residency_with(&mocks, &cache, "fixture-spin", |cfg| {
        cfg.plugins.get_mut("router").unwrap().deadline_ms = 20;
    });
    let edge = TestEdge::start(cfg).await;
    residency_holds_while_the_router_fails(&edge, &mocks).await;
    let m = edge.metrics().await;
    assert!(metric(&m, "meridian_plugin_calls_total", &["plugin=\"router\"", "outcome=\"timeout\""]) >= 4.0, "{m}");
}

#[tokio::test]
async fn a_quarantined_router_never_widens_residency() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("guarantee-quarantine");
    let cfg = residency_with(&mocks, &cache, "fixture-trap", |cfg| {
        cfg.plugin_runtime.quarantine_after = 2;
    });
    let edge = TestEdge::start(cfg).await;
    // Two traps quarantine the router; every later call is refused by the runtime at once.
    for _ in 0..2 {
        let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("fallback", "warm up")).await;
        assert_eq!(r.header("x-meridian-target"), Some("oa"), "{}", r.text());
    }
    let ready = edge.send("GET", "/readyz", None, &[], Default::default()).await.json();
    let quarantined = ready["quarantined_plugins"].as_array().unwrap();
    assert!(quarantined.iter().any(|p| p.as_str().unwrap().starts_with("router@")), "{ready}");
    residency_holds_while_the_router_fails(&edge, &mocks).await;
    let m = edge.metrics().await;
    assert!(metric(&m, "meridian_plugin_calls_total", &["plugin=\"router\"", "outcome=\"quarantined\""]) >= 4.0, "{m}");
}

/// The node's only shared plugin instance is taken: globex's router (the `spin` fixture) spins in
/// it until its 5 s deadline, so acme's router cannot be instantiated within the 50 ms it may
/// wait. acme's requests arrive relayed from a peer edge in us-east whose filter labelled them:
/// the receiving edge runs no filter of its own, only the router. Every one of them, while the
/// pool is full, still goes to eu-west only. (A stream's filter session no longer fills the
/// shared pool: each tenant's sessions have their own slots, see `fair_sharing`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_finds_the_pool_full_never_widens_residency() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("guarantee-pool");
    let cluster = Cluster::new("guarantee-pool");
    let cfg = residency_with(&mocks, &cache, "residency", |cfg| {
        cfg.node.region = "eu-west".into();
        cfg.plugin_runtime.max_instances = 1;
        cfg.plugin_runtime.acquire_timeout_ms = 50;
        add_plugin(cfg, "spinner", PluginKind::Router, "fixture-spin", json!({}));
        cfg.plugins.get_mut("spinner").expect("just added").deadline_ms = 5_000;
        // acme's requests arrive relayed and labelled; globex's router spins.
        cfg.tenant_mut("acme").filters.clear();
        let globex = cfg.tenant_mut("globex");
        globex.filters.clear();
        globex.router = Some("spinner".into());
    });
    let mut cfg = cfg;
    let relay = cluster.accept_relays(&mut cfg, "edge-eu", 1);
    let tenants = vec!["acme".to_string()];
    cfg.relay.as_mut().unwrap().peers.push(RelayPeer { name: "edge-us".into(), region: "us-east".into(), tenants });
    let edge = TestEdge::start(cfg).await;

    // globex's request: its router takes the only instance and spins in it.
    let body = chat("fallback", "no personal data here").to_string();
    let spinning = RawConn::post(edge.addr, "/v1/chat/completions", GLOBEX_KEY, &[], &body).await;

    // acme's relayed requests until one of them has found the pool full (the spin started).
    let peer = cluster.client("edge-us", "edge-eu", relay);
    let started = Instant::now();
    for n in 0.. {
        let relayed = RelayRequest {
            request_id: format!("pool-{n}"),
            tenant: "acme".into(),
            client_region: None,
            path: vec!["us-east".into()],
            labels: vec!["pii.email".into()],
            redacted: false,
            no_cache: true,
            request: json!({"chat": chat("fallback", PERSONAL)}),
            traceparent: None,
        };
        let mut stream = peer.relay(relayed).await.unwrap_or_else(|e| panic!("an answer, not {e}"));
        let mut text = String::new();
        while let Some(event) = stream.next().await {
            let json = event.expect("the answer streams");
            if let meridian::chat::StreamEvent::Text(t) = meridian::api::relay::decode_event(&json).unwrap() {
                text.push_str(&t);
            }
        }
        assert_eq!(text, format!("Echo: {PERSONAL}"));
        assert_eq!(mocks.openai.request_count(), 0, "never us-east");
        let m = edge.metrics().await;
        if metric_or_zero(&m, "meridian_plugin_calls_total", &["plugin=\"router\"", "outcome=\"overloaded\""]) >= 1.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_millis(4500),
            "no request found the pool full while globex's router spun"
        );
    }
    drop(spinning);
}

/// Model `smol-or-api` tries a real engine (SmolLM2) first, then the OpenAI mock. Engines serve
/// text chat only: a request with tools moves on to the API; one without stays on the engine;
/// and a model with only the engine refuses tools with 400, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tools_request_skips_the_engine_for_an_api_that_serves_tools() {
    let mocks = Mocks::start().await;
    let cluster = Cluster::new("guarantee-tools");
    let engine = TestEngine::start(&cluster, "engine-a", 2).await;
    let mut cfg = mocks.config();
    cluster.add_engine_target(&mut cfg, "edge-test", "engine-a", "engine-a", engine.addr);
    let mut both = model("smol-or-api", &[("engine-a", Some("smol")), ("oa", Some("gpt-4o-mini"))]);
    both.default_max_tokens = 8;
    cfg.models.extend([both, model("smol-only", &[("engine-a", Some("smol"))])]);
    let edge = TestEdge::start(cfg).await;

    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let mut with_tools = chat("smol-or-api", "weather in Paris?");
    with_tools["tools"] = tools.clone();
    let r = edge.post("/v1/chat/completions", ACME_KEY, &with_tools).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-meridian-target"), Some("oa"), "the API, not the engine");
    assert_eq!(mocks.openai.received()[0].body["tools"], tools, "the tools reached the API");

    let mut plain = chat("smol-or-api", "Say hi.");
    plain["max_tokens"] = json!(4);
    let r = edge.post("/v1/chat/completions", ACME_KEY, &plain).await;
    assert_eq!((r.status, r.header("x-meridian-target")), (200, Some("engine-a")), "{}", r.text());
    assert_eq!(mocks.openai.request_count(), 1);

    with_tools["model"] = json!("smol-only");
    let r = edge.post("/v1/chat/completions", ACME_KEY, &with_tools).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("tools are not supported"), "{}", r.text());
    let m = edge.metrics().await;
    assert_eq!(
        metric(&m, "meridian_upstream_attempts_total", &["target=\"engine-a\"", "outcome=\"unsupported\""]),
        2.0
    );
    assert_eq!(metric(&m, "meridian_target_health", &["target=\"engine-a\""]), 1.0, "not the engine's fault");
}
