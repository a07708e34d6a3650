//! The operator's status page, behind an admin key: `GET /admin/status` is one server-rendered
//! HTML page (tables that need no JavaScript: targets with health, latency, TTFT and requests in
//! flight; plugins with versions, calls and quarantine; the prompt cache's hit rate; cost by
//! tenant) with charts of the last minutes drawn by the vendored uPlot (`vendor/`), which
//! `GET /admin/status.js` and `/admin/status.css` serve from the binary. `GET /admin/status.json`
//! is the history the charts draw ([`history`]), which the page's script fetches again every
//! sample interval. A browser signs in with HTTP Basic (any user name, an admin key as the
//! password); tools send the key as `Authorization: Bearer`.

pub mod history;

use std::fmt::Write as _;
use std::time::Instant;

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderValue, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use serde_json::json;

use super::admin::authorize;
use super::respond::{error_response, full, json_response};
use super::{Body, Edge};
use crate::api::ApiShape;
use crate::plugin::PluginRuntime;
use crate::stats::HealthState;
use history::counter_sums;

/// The chart library and its style, vendored (see `vendor/README.md`).
const UPLOT_JS: &str = include_str!("vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("vendor/uPlot.min.css");
/// The page's own script: draws the charts from the history and refreshes them.
const PAGE_JS: &str = include_str!("status.js");

/// The refusal of a request without an admin key, which asks a browser to sign in; `None` when
/// the key is one.
fn refusal(edge: &Edge, headers: &HeaderMap, path: &str) -> Option<Response<Body>> {
    let e = authorize(edge, headers, "GET", path).err()?;
    let mut resp = error_response(ApiShape::OpenAi, &e);
    if resp.status() == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"Meridian admin\""));
    }
    Some(resp)
}

fn typed(content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body.into()));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `GET /admin/status.js` and `/admin/status.css`: uPlot and the page's script, or its style.
pub(in crate::edge) fn asset(edge: &Edge, headers: &HeaderMap, path: &str) -> Response<Body> {
    if let Some(resp) = refusal(edge, headers, path) {
        return resp;
    }
    match path {
        "/admin/status.js" => typed("text/javascript; charset=utf-8", format!("{UPLOT_JS}\n{PAGE_JS}")),
        _ => typed("text/css; charset=utf-8", format!("{UPLOT_CSS}\n{PAGE_CSS}")),
    }
}

/// The history's `samples` as JSON: `interval_ms`, `targets` (names) and `samples` (oldest first).
fn history_json(edge: &Edge, samples: &[history::Sample]) -> String {
    let h = &edge.history;
    json!({ "interval_ms": h.interval().as_millis() as u64, "targets": h.targets(), "samples": samples }).to_string()
}

/// `GET /admin/status.json`: what the charts draw.
pub(in crate::edge) fn data(edge: &Edge, headers: &HeaderMap) -> Response<Body> {
    if let Some(resp) = refusal(edge, headers, "/admin/status.json") {
        return resp;
    }
    json_response(StatusCode::OK, Bytes::from(history_json(edge, &edge.history.samples())))
}

/// `GET /admin/status`: the page.
pub(in crate::edge) async fn page(edge: &Edge, headers: &HeaderMap) -> Response<Body> {
    if let Some(resp) = refusal(edge, headers, "/admin/status") {
        return resp;
    }
    let cache = match &edge.cache {
        Some(cache) => Some(cache.size().await),
        None => None,
    };
    typed("text/html; charset=utf-8", render(edge, cache))
}

/// Escapes text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.1}"))
}

fn health(h: HealthState) -> &'static str {
    match h {
        HealthState::Healthy => "healthy",
        HealthState::Degraded => "degraded",
        HealthState::HalfOpen => "half_open",
        HealthState::Ejected => "ejected",
    }
}

/// The page, with the live values in tables and the history for the charts.
fn render(edge: &Edge, cache: Option<(u64, u64)>) -> String {
    let now = Instant::now();
    let families = edge.metrics.registry().gather();
    let config = &edge.config;
    let samples = edge.history.samples();
    let window_s = samples.first().zip(samples.last()).map_or(0, |(a, b)| (b.at_ms - a.at_ms) / 1000);
    let in_flight = config.node.max_in_flight - edge.in_flight.available_permits();
    let mut h = String::with_capacity(16 << 10);
    let region = esc(&config.node.region);
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Meridian edge · {region}</title><link rel=\"stylesheet\" href=\"/admin/status.css\"></head><body>\
         <header><h1>Meridian edge <span class=\"region\">{region}</span></h1>\
         <p>Requests in flight: <b id=\"in-flight\">{in_flight}</b> of {max}. Charts: the last {window_s} s, \
         sampled every {every} s.</p></header>\n",
        max = config.node.max_in_flight,
        every = edge.history.interval().as_secs_f64(),
    );

    h.push_str(
        "<section id=\"targets\"><h2>Targets</h2><table><thead><tr><th>target</th><th>region</th><th>kind</th>\
         <th>health</th><th>latency ms</th><th>TTFT ms</th><th>in flight</th><th>error rate</th><th>ejections</th>\
         <th>engine</th></tr></thead><tbody>\n",
    );
    for t in &edge.targets {
        let s = t.stats.snapshot(now);
        let engine = s.engine.as_ref().map_or_else(
            || "–".into(),
            |e| format!("{} · {:.0} tok/s · queue {}", esc(&e.provider), e.tokens_per_second, e.queue_depth),
        );
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"health {hs}\">{hs}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{:.3}</td><td>{}</td><td>{engine}</td></tr>",
            esc(&t.name),
            esc(t.region.as_deref().unwrap_or("–")),
            serde_json::to_value(t.kind).ok().and_then(|k| k.as_str().map(esc)).unwrap_or_default(),
            ms(s.latency_ms),
            ms(s.ttft_ms),
            s.in_flight,
            s.error_rate,
            s.ejections_total,
            hs = health(s.health),
        );
    }
    h.push_str("</tbody></table>\n");
    for (id, caption) in [
        ("latency", "Latency to the first byte (ms)"),
        ("ttft", "Time to the first token (ms)"),
        ("in_flight", "Requests in flight"),
    ] {
        let _ = writeln!(h, "<figure class=\"chart\" data-chart=\"{id}\"><figcaption>{caption}</figcaption></figure>");
    }
    h.push_str("</section>\n");

    let plugins = edge.loaded.load().plugins.clone();
    let quarantined: Vec<String> =
        edge.plugins.iter().flat_map(PluginRuntime::quarantined).map(|id| id.to_string()).collect();
    let calls = counter_sums(&families, "meridian_plugin_calls_total", &["plugin", "version", "outcome"]);
    h.push_str(
        "<section id=\"plugins\"><h2>Plugins</h2><table><thead><tr><th>plugin</th><th>version</th><th>calls ok</th>\
         <th>not needed</th><th>calls failed</th><th>state</th></tr></thead><tbody>\n",
    );
    if plugins.is_empty() {
        h.push_str("<tr><td colspan=\"6\">No plugins loaded.</td></tr>\n");
    }
    for id in &plugins {
        let (name, version) = id.rsplit_once('@').unwrap_or((id, ""));
        // `skipped`: requests a filter's declared triggers let through without a call.
        let (mut ok, mut skipped, mut failed) = (0.0, 0.0, 0.0);
        for (labels, n) in calls.iter().filter(|(l, _)| l[0] == name && l[1] == version) {
            match labels[2].as_str() {
                "ok" => ok += n,
                "skipped" => skipped += n,
                _ => failed += n,
            }
        }
        let state = if quarantined.contains(id) { "quarantined" } else { "active" };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{ok}</td><td>{skipped}</td><td>{failed}</td><td class=\"plugin {state}\">{state}</td></tr>",
            esc(name),
            esc(version)
        );
    }
    h.push_str("</tbody></table></section>\n");

    let lookups = counter_sums(&families, "meridian_cache_lookups_total", &["result"]);
    let lookup = |r: &str| lookups.get(&vec![r.to_string()]).copied().unwrap_or(0.0);
    let (hits, misses) = (lookup("hit"), lookup("miss"));
    let rate = |hits: f64, misses: f64| {
        if hits + misses > 0.0 {
            format!("{:.1}%", 100.0 * hits / (hits + misses))
        } else {
            "–".into()
        }
    };
    let window_rate = samples
        .first()
        .map_or_else(|| "–".into(), |first| rate(hits - first.cache_hits as f64, misses - first.cache_misses as f64));
    h.push_str("<section id=\"cache\"><h2>Prompt cache</h2>");
    match cache {
        Some((bytes, entries)) => {
            let _ = write!(
                h,
                "<table><thead><tr><th>hit rate (charted window)</th><th>hit rate (since start)</th><th>hits</th>\
                 <th>misses</th><th>entries</th><th>bytes</th></tr></thead><tbody><tr><td>{window_rate}</td>\
                 <td>{}</td><td>{hits}</td><td>{misses}</td><td>{entries}</td><td>{bytes}</td></tr></tbody></table>\
                 <figure class=\"chart\" data-chart=\"cache\"><figcaption>Cache hit rate per interval (%)</figcaption>\
                 </figure>",
                rate(hits, misses)
            );
        }
        None => h.push_str("<p>The prompt cache is off (<code>[cache] enabled = false</code>).</p>"),
    }
    h.push_str("</section>\n");

    let cost = counter_sums(&families, "meridian_cost_usd_total", &["tenant"]);
    h.push_str(
        "<section id=\"cost\"><h2>Cost by tenant</h2><table><thead><tr><th>tenant</th><th>USD since this edge \
         started</th><th>USD in the charted window</th></tr></thead><tbody>\n",
    );
    if cost.is_empty() {
        h.push_str("<tr><td colspan=\"3\">No spend yet.</td></tr>\n");
    }
    for (labels, usd) in &cost {
        let tenant = &labels[0];
        let before = samples.first().and_then(|s| s.cost_usd.get(tenant)).copied().unwrap_or(0.0);
        let _ = writeln!(h, "<tr><td>{}</td><td>{usd:.6}</td><td>{:.6}</td></tr>", esc(tenant), usd - before);
    }
    h.push_str(
        "</tbody></table><figure class=\"chart\" data-chart=\"cost\"><figcaption>Cost by tenant (USD, since \
         start)</figcaption></figure></section>\n",
    );

    h.push_str(
        "<noscript><p>The charts need JavaScript; the tables above hold the latest values. The history is at \
         <a href=\"/admin/status.json\">/admin/status.json</a>.</p></noscript>\n",
    );
    // JSON in a script element: `</` is escaped so the text cannot end the element.
    let _ = writeln!(
        h,
        "<script type=\"application/json\" id=\"status-data\">{}</script>\
         <script src=\"/admin/status.js\"></script></body></html>",
        history_json(edge, &samples).replace("</", "<\\/")
    );
    h
}

/// The page's own style, after uPlot's.
const PAGE_CSS: &str = "
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d2330; background: #fafbfc; }
h1 { font-size: 1.4rem; margin: 0 0 .3rem; } h1 .region { color: #5a6478; font-weight: normal; }
h2 { font-size: 1.1rem; margin: 1.6rem 0 .5rem; }
table { border-collapse: collapse; background: #fff; } th, td { padding: .3rem .6rem; border: 1px solid #dde1e8; }
th { background: #eef1f5; text-align: left; font-weight: 600; } td { font-variant-numeric: tabular-nums; }
td.health.healthy, td.plugin.active { color: #17803d; } td.health.degraded, td.health.half_open { color: #b26b00; }
td.health.ejected, td.plugin.quarantined { color: #c0262d; font-weight: 600; }
figure.chart { display: inline-block; margin: .8rem 1rem 0 0; background: #fff; border: 1px solid #dde1e8; padding: .4rem; }
figure.chart figcaption { font-weight: 600; margin-bottom: .2rem; }
";
