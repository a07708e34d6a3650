//! Plugins written in Python (componentize-py) and JavaScript (jco / componentize-js), held to
//! what Rust plugins are: the same runtime limits stop their hostile fixtures, and their example
//! filter and router work end to end through an edge. Build them first with
//! `scripts/build-plugins` (which runs `scripts/build-python-plugins` and
//! `scripts/build-js-plugins`).

use std::sync::Arc;

use meridian::config::{Config, PluginKind};
use meridian::plugin::{
    CallLimits, Health, Outcome, PluginError, PluginMetrics, PluginRuntime, PluginSettings, RequestSummary,
    RequestVerdict, ResponseVerdict, Segment, SegmentKind, Target, TargetKind,
};
use meridian_e2e::{add_plugin, metric, plugin_wasm, ConfigExt, Mocks, TempDir, TestEdge, ACME_KEY, GLOBEX_KEY};
use serde_json::{json, Value};

/// The languages besides Rust, with the prefix of their components' names.
const LANGUAGES: [(&str, &str); 2] = [("python", "py"), ("js", "js")];

/// The keyword filter's rules in every test: e-mail addresses redacted, a code name blocked.
/// Written in the syntax Python's `re` and JavaScript's `RegExp` share (no inline flags).
fn keyword_rules() -> Value {
    json!({"block": ["[Pp]roject\\s+[Nn]ightingale"], "redact": {"email": "[-\\w.+]+@[-\\w]+(?:\\.[-\\w]+)+"}})
}

fn chat(model: &str, text: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]})
}

fn component(prefix: &str, name: &str) -> Vec<u8> {
    let path = plugin_wasm(&format!("{prefix}-{name}"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (build it with scripts/build-plugins)", path.display()))
}

fn summary() -> RequestSummary {
    RequestSummary {
        request_id: "req-1".into(),
        tenant: "acme".into(),
        client_region: None,
        node_region: "eu-west".into(),
        model: "m".into(),
        prompt_tokens: 10,
        max_output_tokens: None,
        streaming: false,
        labels: vec![],
        redacted: false,
        allowed_regions: vec![],
        price_cap_usd: None,
        headers: vec![],
    }
}

fn targets() -> Vec<Target> {
    let target = |name: &str| Target {
        name: name.into(),
        kind: TargetKind::Managed,
        region: Some("us-east".into()),
        own_infrastructure: false,
        model: "m".into(),
        price: None,
        health: Health::Healthy,
        latency_ms: 0.0,
        ttft_ms: 0.0,
        in_flight: 0,
        capacity: None,
    };
    vec![target("a"), target("b")]
}

/// The runtime's own limits stop each language's hostile fixtures with the same typed errors as
/// Rust's, and a good plugin of the language answers right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_in_every_language_meet_the_same_limits() {
    let cache = TempDir::new("languages-hostile");
    let settings = PluginSettings { cache_dir: cache.path().to_path_buf(), ..PluginSettings::default() };
    let metrics = Arc::new(PluginMetrics::new(&prometheus::Registry::new()).unwrap());
    let runtime = PluginRuntime::new(settings, metrics).unwrap();
    for (lang, prefix) in LANGUAGES {
        let router = |name: &'static str, deadline_ms| {
            let (runtime, wasm) = (&runtime, component(prefix, name));
            async move {
                let limits = CallLimits { deadline_ms, max_memory_bytes: None };
                runtime
                    .load_router(name, lang, &wasm, "{}", limits)
                    .await
                    .unwrap_or_else(|e| panic!("{lang} {name}: {e}"))
            }
        };
        let spun = router("fixture-spin", 100).await.route(&summary(), &targets(), &[]).await;
        assert!(matches!(spun, Err(PluginError::Timeout(_))), "{lang} spin: {spun:?}");

        // The Python memory bomb is a filter, the JavaScript one a router: both worlds meet it.
        let bombed = if lang == "python" {
            let (wasm, limits) =
                (component(prefix, "fixture-memory-bomb"), CallLimits { deadline_ms: 5_000, max_memory_bytes: None });
            let bomb = runtime.load_filter("bomb", lang, &wasm, "{}", limits).await.unwrap_or_else(|e| panic!("{e}"));
            let segments = vec![Segment { kind: SegmentKind::User, text: "boom".into() }];
            bomb.inspect_request(&summary(), &segments).await.map(drop)
        } else {
            router("fixture-memory-bomb", 5_000).await.route(&summary(), &targets(), &[]).await.map(drop)
        };
        assert!(matches!(bombed, Err(PluginError::MemoryLimit(_))), "{lang} memory bomb: {bombed:?}");

        let thrown = router("fixture-exception", 2_000).await.route(&summary(), &targets(), &[]).await;
        assert!(matches!(thrown, Err(PluginError::Trap(_))), "{lang} exception: {thrown:?}");

        let routed = router("residency-router", 2_000).await.route(&summary(), &targets(), &[]).await;
        let routed = routed.unwrap_or_else(|e| panic!("{lang}: {e}"));
        assert!(matches!(routed, Outcome::Route(ref d) if d.targets == ["a", "b"]), "{lang}: {routed:?}");

        let (config, wasm) = (keyword_rules().to_string(), component(prefix, "keyword-filter"));
        let limits = CallLimits { deadline_ms: 2_000, max_memory_bytes: None };
        let filter = runtime.load_filter("keywords", lang, &wasm, &config, limits).await;
        let filter = filter.unwrap_or_else(|e| panic!("{lang}: {e}"));
        // `é` is two bytes: the redaction's offsets are UTF-8 bytes, as the contract says.
        let text = "café: mail ann@example.com";
        let segments = vec![Segment { kind: SegmentKind::User, text: text.into() }];
        match filter.inspect_request(&summary(), &segments).await.unwrap_or_else(|e| panic!("{lang}: {e}")) {
            RequestVerdict::Allow(inspection) => {
                let [r] = &inspection.redactions[..] else { panic!("{lang}: one redaction: {inspection:?}") };
                assert_eq!(&text[r.start as usize..r.end as usize], "ann@example.com", "{lang}");
                assert_eq!(inspection.labels, ["pii.email.redacted"], "{lang}");
            }
            other => panic!("{lang}: expected an allow, got {other:?}"),
        }
        let answer = filter.inspect_response("all about Project  Nightingale").await;
        assert!(matches!(answer, Ok(ResponseVerdict::Block(_))), "{lang}: {answer:?}");
    }
}

/// The standard config with oa in us-east and oa2 in eu-west, and each language's residency
/// router for both tenants, who may use eu-west only. Acme's filter is the language's keyword
/// filter (e-mail addresses redacted); globex's is the Rust pii-redactor labelling e-mail
/// addresses, which leaves them in the text.
fn language_config(mocks: &Mocks, cache: &TempDir, prefix: &str) -> Config {
    let mut cfg = mocks.config();
    cfg.plugin_runtime.cache_dir = cache.path().to_path_buf();
    cfg.target_mut("oa").region = Some("us-east".into());
    cfg.target_mut("oa2").region = Some("eu-west".into());
    add_plugin(&mut cfg, "keywords", PluginKind::Filter, &format!("{prefix}-keyword-filter"), keyword_rules());
    add_plugin(&mut cfg, "label", PluginKind::Filter, "pii-redactor", json!({"actions": {"email": "label"}}));
    add_plugin(&mut cfg, "residency", PluginKind::Router, &format!("{prefix}-residency-router"), json!({}));
    for (tenant, filter) in [("acme", "keywords"), ("globex", "label")] {
        let tenant = cfg.tenant_mut(tenant);
        tenant.filters = vec![filter.into()];
        tenant.router = Some("residency".into());
        tenant.allowed_regions = vec!["eu-west".into()];
    }
    cfg
}

/// Each language's filter redacts and blocks, whole and streamed, with every answer restored;
/// its router lets redacted data take the static order and keeps unredacted personal data in the
/// allowed region.
#[tokio::test]
async fn python_and_javascript_plugins_work_end_to_end() {
    for (lang, prefix) in LANGUAGES {
        let mocks = Mocks::start().await;
        let cache = TempDir::new(&format!("languages-{lang}"));
        let edge = TestEdge::start(language_config(&mocks, &cache, prefix)).await;

        let text = "please mail ann.lee@example.com today";
        for stream in [false, true] {
            let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("fallback", text, stream)).await;
            assert_eq!(r.answer_text(), format!("Echo: {text}"), "{lang}: the answer gets the address back");
            assert_eq!(r.header("x-meridian-target"), Some("oa"), "{lang}: redacted, so the static order");
        }
        let sent = mocks.openai.received();
        assert_eq!(sent.len(), 2, "{lang}");
        for sent in sent {
            let content = sent.body["messages"][0]["content"].as_str().unwrap().to_string();
            assert!(!content.contains("ann.lee@") && content.contains("[EMAIL_1]"), "{lang}: {content}");
        }

        let r =
            edge.post("/v1/chat/completions", ACME_KEY, &chat("fallback", "news of Project Nightingale?", false)).await;
        assert_eq!((r.status, r.error_code()), (400, "content_blocked".into()), "{lang}: {}", r.text());
        assert_eq!(mocks.openai.request_count() + mocks.openai2.request_count(), 2, "{lang}: nothing left");

        for stream in [false, true] {
            let r = edge.post("/v1/chat/completions", GLOBEX_KEY, &chat("fallback", text, stream)).await;
            assert_eq!(r.header("x-meridian-target"), Some("oa2"), "{lang}: labelled data stays in eu-west");
            assert_eq!(r.answer_text(), format!("Echo: {text}"));
        }
        assert_eq!(mocks.openai2.received()[0].body["messages"][0]["content"], text, "{lang}: labelled, not redacted");
        let m = edge.metrics().await;
        let ok = metric(&m, "meridian_plugin_calls_total", &["plugin=\"residency\"", "outcome=\"ok\""]);
        assert_eq!(ok, 4.0, "{lang}: the router ran for every request that passed the filters: {m}");
    }
}
