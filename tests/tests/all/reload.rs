//! Hot reload of plugins: a new version is loaded and configured before it is swapped in, requests
//! under load are never lost, and a failed reload keeps the old version and says why.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian::config::{hash_key, Config, PluginKind};
use meridian_e2e::{add_plugin, plugin_wasm, token_price, ConfigExt, Mocks, TempDir, TestEdge, ACME_KEY};
use serde_json::json;

pub(crate) const ADMIN_KEY: &str = "sk-admin-test";

/// Tenant acme routes model `fallback` (oa, oa2, an) with the router in `router.wasm`; oa is
/// dear and oa2 cheap, so the cost router picks oa2 where the order-keeping router picks oa.
pub(crate) fn config(mocks: &Mocks, dir: &TempDir, poll_ms: u64) -> Config {
    let mut cfg = mocks.config();
    cfg.plugin_runtime.cache_dir = dir.path().join("cache");
    cfg.plugin_runtime.reload_poll_ms = poll_ms;
    cfg.node.admin_keys = vec![hash_key(ADMIN_KEY)];
    cfg.target_mut("oa").price = token_price(10.0, 30.0);
    cfg.target_mut("oa2").price = token_price(0.1, 0.2);
    add_plugin(&mut cfg, "r", PluginKind::Router, "fixture-good-router", json!({}));
    let path = dir.path().join("router.wasm");
    std::fs::copy(plugin_wasm("fixture-good-router"), &path).unwrap();
    cfg.plugins.get_mut("r").unwrap().path = path;
    cfg.tenant_mut("acme").router = Some("r".into());
    cfg
}

fn chat() -> serde_json::Value {
    json!({"model": "fallback", "messages": [{"role": "user", "content": "which target?"}]})
}

async fn target_of(edge: &TestEdge) -> (u16, String) {
    let r = edge.post("/v1/chat/completions", ACME_KEY, &chat()).await;
    (r.status, r.header("x-meridian-target").unwrap_or("").to_string())
}

pub(crate) async fn reload(edge: &TestEdge, key: Option<&str>) -> meridian_e2e::Reply {
    edge.send("POST", "/admin/plugins/reload", key, &[], bytes::Bytes::new()).await
}

/// Concurrent clients in `a_reload_under_load_loses_no_request`.
const CLIENTS: usize = 4;

/// Polls until the clients have had `n` answers in all, for at most 20 s.
async fn until_answered(answered: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "{} of {n} requests answered within 20 s", answered.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_loses_no_request() {
    let mocks = Mocks::start().await;
    let dir = TempDir::new("reload");
    let edge = Arc::new(TestEdge::start(config(&mocks, &dir, 0)).await);
    assert_eq!(target_of(&edge).await, (200, "oa".to_string()));

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (edge, stop, answered) = (Arc::clone(&edge), Arc::clone(&stop), Arc::clone(&answered));
            tokio::spawn(async move {
                let mut seen = Vec::new();
                // Bounded: at most 2,000 requests a client, and only while the test runs.
                while !stop.load(Ordering::Relaxed) && seen.len() < 2_000 {
                    seen.push(target_of(&edge).await);
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                seen
            })
        })
        .collect();
    // Load before the reload: some requests answered by the old version.
    until_answered(&answered, 20).await;

    std::fs::copy(plugin_wasm("cost-router"), dir.path().join("router.wasm")).unwrap();
    let r = reload(&edge, Some(ADMIN_KEY)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["reloaded"][0].as_str().unwrap().starts_with("r@1+"), "{}", r.text());

    // And after it: each client has at most one request in flight that began before the reload,
    // so past those, every answer counted comes from a request sent to the new version.
    until_answered(&answered, answered.load(Ordering::Relaxed) + CLIENTS + 20).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for c in clients {
        all.extend(c.await.unwrap());
    }
    let failed: Vec<_> = all.iter().filter(|(status, _)| *status != 200).collect();
    assert!(failed.is_empty(), "{} of {} requests failed during the reload: {failed:?}", failed.len(), all.len());
    assert!(all.iter().any(|(_, t)| t == "oa") && all.iter().any(|(_, t)| t == "oa2"), "both versions served");
    assert_eq!(target_of(&edge).await, (200, "oa2".to_string()), "the new version routes now");
}

#[tokio::test]
async fn a_failed_reload_keeps_the_old_version_and_says_why() {
    let mocks = Mocks::start().await;
    let dir = TempDir::new("reload-fail");
    let edge = TestEdge::start(config(&mocks, &dir, 0)).await;

    assert_eq!(reload(&edge, None).await.status, 401, "the admin endpoint needs a key");
    assert_eq!(reload(&edge, Some(ACME_KEY)).await.status, 401, "a tenant key is not an admin key");

    std::fs::write(dir.path().join("router.wasm"), b"not a component").unwrap();
    let r = reload(&edge, Some(ADMIN_KEY)).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("plugins.r"), "the error names the plugin: {}", r.text());
    assert_eq!(target_of(&edge).await, (200, "oa".to_string()), "the old version still routes");

    // A component of the wrong world is refused too.
    std::fs::copy(plugin_wasm("pii-redactor"), dir.path().join("router.wasm")).unwrap();
    let r = reload(&edge, Some(ADMIN_KEY)).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(target_of(&edge).await, (200, "oa".to_string()));
}

#[tokio::test]
async fn a_changed_plugin_file_is_reloaded_by_itself() {
    let mocks = Mocks::start().await;
    let dir = TempDir::new("reload-watch");
    let edge = TestEdge::start(config(&mocks, &dir, 50)).await;
    assert_eq!(target_of(&edge).await, (200, "oa".to_string()));
    // Written beside and renamed into place, as a deploy would, so no half-written file is read.
    let staged = dir.path().join("router.wasm.new");
    std::fs::copy(plugin_wasm("cost-router"), &staged).unwrap();
    std::fs::rename(&staged, dir.path().join("router.wasm")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, target) = target_of(&edge).await;
        assert_eq!(status, 200);
        if target == "oa2" {
            break;
        }
        assert!(Instant::now() < deadline, "the changed file was not reloaded within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = edge.send("GET", "/readyz", None, &[], bytes::Bytes::new()).await.json();
    assert!(ready["plugins"][0].as_str().unwrap().starts_with("r@1+"), "{ready}");
}

#[tokio::test]
async fn without_admin_keys_there_is_no_admin_endpoint() {
    let mocks = Mocks::start().await;
    let dir = TempDir::new("reload-none");
    let mut cfg = config(&mocks, &dir, 0);
    cfg.node.admin_keys.clear();
    let edge = TestEdge::start(cfg).await;
    assert_eq!(reload(&edge, Some(ADMIN_KEY)).await.status, 404);
}
