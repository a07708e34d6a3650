//! The operator's endpoints, beside the request path: `POST /admin/plugins/reload`,
//! `GET /admin/targets` and the status page (`status/`) for holders of a `node.admin_keys` key (absent, as a 404, when the node
//! has none), and `GET /readyz` and `GET /metrics`, open unless `node.observer_keys` lists keys
//! (then they take one of those or an admin key, else 401).

use std::time::Instant;

use bytes::Bytes;
use hyper::header::HeaderMap;
use hyper::{Response, StatusCode};
use serde_json::json;

use super::respond::{error_response, json_response, metrics_response};
use super::{Body, Edge};
use crate::api::ApiShape;
use crate::config::parse_key_hash;
use crate::error::GatewayError;
use crate::plugin::PluginRuntime;
use crate::tenant;

/// Whether the request carries an admin key (`Authorization: Bearer`, `x-api-key`, or HTTP Basic
/// with the key as the password, which is how a browser signs in to the status page); a node
/// without admin keys has no such endpoint.
pub(super) fn authorize(edge: &Edge, headers: &HeaderMap, method: &str, path: &str) -> Result<(), GatewayError> {
    if edge.admin_keys.is_empty() {
        return Err(GatewayError::NotFound { method: method.into(), path: path.into() });
    }
    let digest = tenant::key_digest(headers).or_else(|| basic_password_digest(headers));
    if !edge.admin_keys.contains(&digest.unwrap_or_default()) {
        return Err(GatewayError::Unauthorized);
    }
    Ok(())
}

/// The SHA-256 of the password of an `Authorization: Basic` header (the user name is ignored).
fn basic_password_digest(headers: &HeaderMap) -> Option<[u8; 32]> {
    use base64::Engine as _;
    use sha2::{Digest as _, Sha256};
    let encoded = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let (_, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    (!password.is_empty()).then(|| Sha256::digest(password.as_bytes()).into())
}

/// `POST /admin/plugins/reload`: reloads every plugin (see [`Edge::reload_plugins`]).
pub(super) async fn reload(edge: &Edge, headers: &HeaderMap) -> Response<Body> {
    if let Err(e) = authorize(edge, headers, "POST", "/admin/plugins/reload") {
        return error_response(ApiShape::OpenAi, &e);
    }
    match edge.reload_plugins().await {
        Ok(ids) => json_response(StatusCode::OK, Bytes::from(json!({ "reloaded": ids }).to_string())),
        Err(e) => json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            Bytes::from(json!({ "error": { "message": e.to_string(), "type": "reload_failed" } }).to_string()),
        ),
    }
}

/// Whether the request may read `/readyz` and `/metrics`: always, when the node lists no
/// `node.observer_keys`; else with one of them or an admin key.
fn observer(edge: &Edge, headers: &HeaderMap) -> Result<(), GatewayError> {
    let keys = &edge.config.node.observer_keys;
    if keys.is_empty() {
        return Ok(());
    }
    let Some(digest) = tenant::key_digest(headers) else { return Err(GatewayError::Unauthorized) };
    // Validation parsed every observer key hash.
    let observer = keys.iter().filter_map(|k| parse_key_hash(k).ok()).any(|k| k == digest);
    if observer || edge.admin_keys.contains(&digest) {
        Ok(())
    } else {
        Err(GatewayError::Unauthorized)
    }
}

/// `GET /admin/targets`: every target with its live statistics and health.
pub(super) fn targets(edge: &Edge, headers: &HeaderMap) -> Response<Body> {
    if let Err(e) = authorize(edge, headers, "GET", "/admin/targets") {
        return error_response(ApiShape::OpenAi, &e);
    }
    let now = Instant::now();
    let list: Vec<_> = edge
        .targets
        .iter()
        .map(|t| {
            let s = t.stats.snapshot(now);
            json!({ "name": t.name, "kind": t.kind, "api": t.api(), "region": t.region, "health": s.health,
                "ejected_until_ms": s.ejected_until_ms, "latency_ms": s.latency_ms, "ttft_ms": s.ttft_ms,
                "error_rate": s.error_rate, "in_flight": s.in_flight,
                "consecutive_failures": s.consecutive_failures, "ejections_total": s.ejections_total,
                "engine": s.engine, "rtt_ms": s.rtt_ms })
        })
        .collect();
    json_response(StatusCode::OK, Bytes::from(json!({ "targets": list }).to_string()))
}

/// `GET /readyz`: the node's region, targets and loaded plugins, the plugins in quarantine, and
/// whether the Redis the region's edges share answers (`shared_state.cache` and
/// `shared_state.budgets`: `up`, `down`, or null when there is none);
/// 503 `shutting_down` from the start of a shutdown's drain, so that load balancers stop sending.
pub(super) fn readyz(edge: &Edge, headers: &HeaderMap) -> Response<Body> {
    if let Err(e) = observer(edge, headers) {
        return error_response(ApiShape::OpenAi, &e);
    }
    if edge.drain.started() {
        return error_response(ApiShape::OpenAi, &GatewayError::ShuttingDown);
    }
    let targets: Vec<_> = edge.config.targets.keys().collect();
    let quarantined: Vec<String> =
        edge.plugins.iter().flat_map(PluginRuntime::quarantined).map(|id| id.to_string()).collect();
    let plugins = edge.loaded.load().plugins.clone();
    // The region's shared state: an edge whose Redis is away still serves (on its own cache), and
    // says so here.
    let state = |up: bool| if up { "up" } else { "down" };
    let shared_cache = edge.cache.as_ref().and_then(|c| c.shared()).map(|s| state(s.is_up()));
    let shared_budgets = edge.budgets.shared_up().map(state);
    let body = json!({ "status": "ready", "region": edge.config.node.region, "targets": targets,
        "plugins": plugins, "quarantined_plugins": quarantined,
        "shared_state": { "cache": shared_cache, "budgets": shared_budgets } });
    json_response(StatusCode::OK, Bytes::from(body.to_string()))
}

/// `GET /metrics`: the Prometheus exposition, with the cache's size and every target's live
/// statistics sampled now.
pub(super) async fn metrics(edge: &Edge, headers: &HeaderMap) -> Response<Body> {
    if let Err(e) = observer(edge, headers) {
        return error_response(ApiShape::OpenAi, &e);
    }
    if let Some(cache) = &edge.cache {
        let (bytes, entries) = cache.size().await;
        edge.metrics.cache_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        edge.metrics.cache_entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
        if let Some(shared) = cache.shared() {
            edge.metrics.shared_state_up.with_label_values(&["cache"]).set(i64::from(shared.is_up()));
        }
    }
    if let Some(up) = edge.budgets.shared_up() {
        edge.metrics.shared_state_up.with_label_values(&["budgets"]).set(i64::from(up));
    }
    let now = Instant::now();
    for t in &edge.targets {
        edge.metrics.observe_target(&t.name, &t.stats.snapshot(now));
    }
    metrics_response(edge.metrics.render())
}
