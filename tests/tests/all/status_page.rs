//! The status page (`/admin/status`) as an operator sees it: headless Chromium (Debian's) signs in
//! with the admin key, draws the charts from live samples, and takes a screenshot that CI keeps
//! (`target/artifacts/status-page.png`); the tables are in the served HTML, so the page works
//! with JavaScript off. The edge serves a real chain (pii-redactor), a cached repeat and spend by two tenants,
//! so every section has live data.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian::config::{hash_key, PluginKind};
use meridian_e2e::{add_plugin, ConfigExt, Mocks, TempDir, TestEdge, ACME_KEY, GLOBEX_KEY};
use serde_json::{json, Value};

const ADMIN_KEY: &str = "sk-admin-status";

/// What Chromium prints for `url` with `args` (`--dump-dom`) or writes (`--screenshot`).
fn chromium(url: &str, profile: &TempDir, args: &[&str]) -> String {
    let out = Command::new(meridian_e2e::chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        // Time enough for the page's script to draw (virtual time: no real wait when idle).
        .args(["--virtual-time-budget=5000", "--window-size=1280,2000"])
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_live_targets_and_charts_and_the_tables_need_no_javascript() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("status-plugins");
    let mut cfg = mocks.config();
    cfg.node.admin_keys = vec![hash_key(ADMIN_KEY)];
    cfg.status.sample_interval_ms = 200;
    cfg.plugin_runtime.cache_dir = cache.path().to_path_buf();
    add_plugin(&mut cfg, "pii", PluginKind::Filter, "pii-redactor", json!({}));
    cfg.tenant_mut("acme").filters = vec!["pii".into()];
    let edge = TestEdge::start(cfg).await;

    // Traffic: two tenants on two targets, and a repeat that the cache answers (at temperature 0
    // every request is a cache lookup).
    for (key, model, text, stream) in [
        (ACME_KEY, "gpt-test", "hello status page", false),
        (ACME_KEY, "gpt-test", "hello status page", false),
        (GLOBEX_KEY, "claude-test", "a second tenant", false),
        (ACME_KEY, "claude-test", "write to jane@example.com", false),
        (GLOBEX_KEY, "gpt-test", "a stream has a time to first token", true),
    ] {
        let body = json!({"model": model, "temperature": 0, "stream": stream, "messages": [{"role": "user", "content": text}]});
        let r = edge.post("/v1/chat/completions", key, &body).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // The history holds samples with that traffic in them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = edge.send("GET", "/admin/status.json", Some(ADMIN_KEY), &[], Bytes::new()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let history: Value = r.json();
        let samples = history["samples"].as_array().unwrap();
        let last = samples.last().cloned().unwrap_or_default();
        if samples.len() >= 5 && last["targets"][1]["ttft_ms"].as_f64().is_some() {
            assert_eq!(history["targets"], json!(["an", "oa", "oa2"]));
            assert_eq!(last["cache_hits"], 1, "{last}");
            break;
        }
        assert!(Instant::now() < deadline, "no samples with the traffic: {history}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Keys: none or a tenant's is refused, with a sign-in challenge for browsers.
    for key in [None, Some(ACME_KEY)] {
        let r = edge.send("GET", "/admin/status", key, &[], Bytes::new()).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"Meridian admin\""));
    }

    // A browser signs in with the key as its Basic password (in the URL, as an operator may).
    let base = edge.url();
    let port = base.rsplit(':').next().unwrap().to_string();
    let url = format!("http://admin:{ADMIN_KEY}@127.0.0.1:{port}/admin/status");
    let (url2, profile_js) = (url.clone(), TempDir::new("status-chromium-js"));
    let dom = tokio::task::spawn_blocking(move || chromium(&url2, &profile_js, &["--dump-dom"])).await.unwrap();
    // Every chart drawn by uPlot (a canvas each), with the targets and tenants as its series.
    let charts = dom.matches("class=\"uplot").count();
    assert_eq!(charts, 5, "five charts drawn: {dom}");
    assert!(dom.matches("<canvas").count() >= 5);
    for label in ["oa", "an", "acme", "globex", "hit rate"] {
        assert!(dom.contains(&format!(">{label}<")), "legend names {label}: {dom}");
    }

    // JavaScript off: the tables with the live values are in the HTML the edge serves; nothing
    // builds them in the browser. (Headless Chromium dumps and shoots nothing with scripts
    // disabled, so the served page itself is what is checked.)
    let page = edge.send("GET", "/admin/status", Some(ADMIN_KEY), &[], Bytes::new()).await;
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    let plain = page.text();
    for needle in [
        "<td>oa</td>",
        "<td>an</td>",
        "<td class=\"health healthy\">healthy</td>",
        // Version 1 of the plugin (with its content hash): of acme's three requests, called for
        // the one holding an e-mail address (a request trigger), not needed for the two others.
        "<td>pii</td><td>1+",
        "</td><td>1</td><td>2</td><td>0</td><td class=\"plugin active\">active</td>",
        "<td>globex</td>",
        "<td>acme</td>",
        "The charts need JavaScript",
    ] {
        assert!(plain.contains(needle), "{needle} in the served page: {plain}");
    }
    // One hit and four misses so far.
    assert!(plain.contains("<td>20.0%</td>"), "the hit rate since start: {plain}");
    assert!(dom.contains("<td class=\"health healthy\">healthy</td>"), "the same tables with JavaScript on");

    // The screenshot, kept beside the other artifacts the tests leave.
    let artifacts = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/artifacts"));
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let (shot, profile) = (format!("--screenshot={}", png.display()), TempDir::new("status-chromium-shot"));
    tokio::task::spawn_blocking(move || chromium(&url, &profile, &[&shot])).await.unwrap();
    let bytes = std::fs::read(&png).expect("the screenshot is written");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    assert_eq!(width, 1280);
    // A page of tables and five charts, not a blank or an error page (one is ~5 KB).
    assert!(bytes.len() > 40_000, "a screenshot of {} bytes", bytes.len());
}
