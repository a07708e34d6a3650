//! A tenant's plugin chain on the request path: privacy filters (step 3 of the request path), then
//! the router (step 5).
//!
//! Failure policy, from the contract: a filter that fails blocks the request (fail closed), so no
//! unfiltered text leaves the node; a router that fails is replaced by the static target order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tracing::warn;

use crate::accounting;
use crate::chat::{ChatRequest, ChatResponse, StreamEvent};
use crate::config::{Config, PluginKind, TargetKind};
use crate::edge::{ModelRoute, Route};
use crate::error::GatewayError;
use crate::plugin::{
    self, CachePolicy, FilterPlugin, Health, HourPrice, Outcome, PluginError, PluginId, PluginRuntime, PriceModel,
    RequestSummary, RequestVerdict, ResponseSession, ResponseVerdict, RouterPlugin, TokenPrice,
};
use crate::redaction::{self, Placeholders, StreamRestorer};
use crate::stats::HealthState;

/// Why a plugin named in the config could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("plugins.{name}: {source}")]
pub struct LoadError {
    /// The plugin's name in the config.
    pub name: String,
    /// The cause.
    #[source]
    pub source: PluginError,
}

/// Every plugin the config names, loaded.
#[derive(Default)]
pub struct Plugins {
    /// Filters by name.
    pub filters: HashMap<String, Arc<FilterPlugin>>,
    /// Routers by name.
    pub routers: HashMap<String, Arc<RouterPlugin>>,
}

impl Plugins {
    /// Loads (compiles or takes from the artifact cache, checks the world, dry-runs `configure`)
    /// every plugin in `config.plugins`, reading each `.wasm` afresh.
    ///
    /// A loaded version is `VERSION+HASH` (the first 8 hex digits of the component's SHA-256), so
    /// that a rebuilt component under an unchanged version is a new version for metrics and
    /// quarantine.
    pub async fn load(config: &Config, runtime: &PluginRuntime) -> Result<Plugins, LoadError> {
        let mut plugins = Plugins::default();
        for (name, p) in &config.plugins {
            let fail = |source| LoadError { name: name.clone(), source };
            let wasm =
                std::fs::read(&p.path).map_err(|source| fail(PluginError::Io { path: p.path.clone(), source }))?;
            let version = format!("{}+{}", p.version, &hex::encode(Sha256::digest(&wasm))[..8]);
            match p.kind {
                PluginKind::Filter => {
                    let f = runtime.load_filter(name, &version, &wasm, &p.config_json(), p.limits()).await;
                    plugins.filters.insert(name.clone(), Arc::new(f.map_err(fail)?));
                }
                PluginKind::Router => {
                    let r = runtime.load_router(name, &version, &wasm, &p.config_json(), p.limits()).await;
                    plugins.routers.insert(name.clone(), Arc::new(r.map_err(fail)?));
                }
            }
        }
        Ok(plugins)
    }

    /// Every loaded plugin as `name@version`, sorted.
    pub fn ids(&self) -> Vec<String> {
        let filters = self.filters.values().map(|f| f.id().to_string());
        let mut ids: Vec<String> = filters.chain(self.routers.values().map(|r| r.id().to_string())).collect();
        ids.sort();
        ids
    }
}

/// A tenant's chain, resolved from its config.
#[derive(Default)]
pub struct Chain {
    /// Filters, run in order.
    pub filters: Vec<Arc<FilterPlugin>>,
    /// The router, if any.
    pub router: Option<Arc<RouterPlugin>>,
    /// Regions the tenant's data may be processed in; empty means any.
    pub allowed_regions: Vec<String>,
    /// The most one request may cost.
    pub price_cap_usd: Option<f64>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("filters", &self.filters.iter().map(|p| p.id().to_string()).collect::<Vec<_>>())
            .field("router", &self.router.as_ref().map(|p| p.id().to_string()))
            .field("allowed_regions", &self.allowed_regions)
            .field("price_cap_usd", &self.price_cap_usd)
            .finish()
    }
}

impl Chain {
    /// Whether the tenant has neither filters nor a router.
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty() && self.router.is_none()
    }
}

/// What the node knows about a request, before filters label it.
pub fn summary(
    request_id: &str,
    tenant: &str,
    chain: &Chain,
    node_region: &str,
    client_region: Option<String>,
    req: &ChatRequest,
) -> RequestSummary {
    RequestSummary {
        request_id: request_id.to_string(),
        tenant: tenant.to_string(),
        client_region,
        node_region: node_region.to_string(),
        model: req.model.clone(),
        prompt_tokens: req.estimated_prompt_tokens(),
        max_output_tokens: req.output_limit(),
        streaming: req.is_stream(),
        labels: Vec::new(),
        redacted: false,
        allowed_regions: chain.allowed_regions.clone(),
        price_cap_usd: chain.price_cap_usd,
        headers: Vec::new(),
    }
}

fn filter_failed(plugin: &PluginId, e: impl std::fmt::Display) -> GatewayError {
    warn!(%plugin, error = %e, "privacy filter failed: request blocked");
    GatewayError::FilterFailed { plugin: plugin.to_string(), message: e.to_string() }
}

/// Whether labels say that personal data is still in the text: a `pii.` label without the
/// `.redacted` suffix (the contract's rule, which the SDK's residency rule uses too).
pub fn carries_unredacted_pii(labels: &[String]) -> bool {
    labels.iter().any(|l| l.starts_with("pii.") && !l.ends_with(".redacted"))
}

/// Runs the chain's filters over the request's text. Every filter sees the original text; the
/// union of what they ask to redact is replaced with placeholders in place, and their labels
/// join the summary's (a relayed request arrives with the origin's). A block, or any filter
/// failure, ends the request here.
async fn filter_request(
    chain: &Chain,
    req: &mut ChatRequest,
    summary: &mut RequestSummary,
) -> Result<Placeholders, GatewayError> {
    let segments = redaction::segments(req);
    let mut labels: BTreeSet<String> = summary.labels.iter().cloned().collect();
    let mut spans = Vec::new();
    for f in &chain.filters {
        match f.inspect_request(summary, &segments).await {
            Ok(RequestVerdict::Allow(found)) => {
                labels.extend(found.labels);
                spans.extend(found.redactions);
            }
            Ok(RequestVerdict::Block(reason)) => return Err(GatewayError::Blocked { reason }),
            Err(e) => return Err(filter_failed(f.id(), e)),
        }
    }
    let placeholders = match redaction::redact(req, &redaction::merge(spans)) {
        Ok(p) => p,
        Err(e) => return Err(GatewayError::FilterFailed { plugin: "chain".into(), message: e.to_string() }),
    };
    summary.labels = labels.into_iter().collect();
    summary.redacted |= !placeholders.is_empty();
    Ok(placeholders)
}

/// The answer side of a tenant's filters for one request: shows the answer's text to the
/// filters, and puts the originals back in place of the placeholders, whole or streamed.
///
/// Each filter sees the answer through one [`ResponseSession`]: every piece of one answer goes
/// to the same instance, in order (a whole answer is one piece). The sessions instantiate at the
/// answer's first text and hold their instance slots until this is dropped, so a stream holds
/// one instance per filter for its duration.
pub struct AnswerFilter {
    sessions: Vec<ResponseSession>,
    placeholders: Placeholders,
    text: StreamRestorer,
    tools: BTreeMap<u32, StreamRestorer>,
}

impl AnswerFilter {
    fn new(chain: &Chain, placeholders: Placeholders) -> AnswerFilter {
        AnswerFilter {
            sessions: chain.filters.iter().map(|f| f.response_session()).collect(),
            placeholders,
            text: StreamRestorer::new(false),
            tools: BTreeMap::new(),
        }
    }

    /// Shows the next piece of the answer's text (placeholders not yet restored) to every
    /// filter's session. A block or a failure ends the answer: later pieces are refused too (a
    /// failed session stays failed).
    pub async fn inspect(&mut self, text: &str) -> Result<(), GatewayError> {
        if text.is_empty() {
            return Ok(());
        }
        for session in &mut self.sessions {
            match session.inspect(text).await {
                Ok(ResponseVerdict::Allow) => {}
                Ok(ResponseVerdict::Block(reason)) => return Err(GatewayError::Blocked { reason }),
                Err(e) => return Err(filter_failed(session.id(), e)),
            }
        }
        Ok(())
    }

    /// Restores a whole answer.
    pub fn restore_response(&self, resp: &mut ChatResponse) {
        if self.placeholders.is_empty() {
            return;
        }
        if let Some(text) = &mut resp.text {
            *text = self.placeholders.restore(text);
        }
        for call in &mut resp.tool_calls {
            call.function.arguments = self.placeholders.restore_json(&call.function.arguments);
        }
    }

    /// Restores one stream event into `out`; a tail that may still become a placeholder is held
    /// back until the next piece, and flushed before the stream's `Finish`.
    pub fn restore_event(&mut self, event: StreamEvent, out: &mut Vec<StreamEvent>) {
        let p = &self.placeholders;
        if p.is_empty() {
            out.push(event);
            return;
        }
        match event {
            StreamEvent::Text(t) => {
                let ready = self.text.push(p, &t);
                if !ready.is_empty() {
                    out.push(StreamEvent::Text(ready));
                }
            }
            StreamEvent::ToolCallArgs { index, json } => {
                let ready = self.tools.entry(index).or_insert_with(|| StreamRestorer::new(true)).push(p, &json);
                if !ready.is_empty() {
                    out.push(StreamEvent::ToolCallArgs { index, json: ready });
                }
            }
            StreamEvent::Finish(reason) => {
                let rest = self.text.finish(p);
                if !rest.is_empty() {
                    out.push(StreamEvent::Text(rest));
                }
                for (&index, restorer) in &mut self.tools {
                    let json = restorer.finish(p);
                    if !json.is_empty() {
                        out.push(StreamEvent::ToolCallArgs { index, json });
                    }
                }
                out.push(StreamEvent::Finish(reason));
            }
            other => out.push(other),
        }
    }
}

/// Runs a tenant's chain on a parsed request, given its [`summary`]: filters (redacting the
/// request in place, and adding their labels to the summary), then the router. Returns the answer
/// side of the filters, if the tenant has any, and the plan.
pub async fn run(
    chain: &Chain,
    summary: &mut RequestSummary,
    req: &mut ChatRequest,
    model: Arc<ModelRoute>,
    models: &HashMap<String, Arc<ModelRoute>>,
) -> Result<(Option<AnswerFilter>, Plan), GatewayError> {
    let answer = if chain.filters.is_empty() {
        None
    } else {
        Some(AnswerFilter::new(chain, filter_request(chain, req, summary).await?))
    };
    let plan = route(chain, summary, model, models).await?;
    Ok((answer, plan))
}

/// Where a request goes: the targets of a model to try, in order, and the router's cache policy.
pub struct Plan {
    /// The model whose targets these are (a router may rewrite the model).
    pub model: Arc<ModelRoute>,
    /// Indices into `model.routes`, in the order to try them.
    pub order: Vec<usize>,
    /// The router's cache policy, if it set one.
    pub cache: Option<CachePolicy>,
}

impl Plan {
    /// The static order from config.
    pub fn fixed(model: Arc<ModelRoute>) -> Plan {
        let order = (0..model.routes.len()).collect();
        Plan { model, order, cache: None }
    }

    /// The routes to try, in order.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.order.iter().map(|&i| &self.model.routes[i])
    }
}

/// Asks the chain's router where the request goes. A router failure falls back to the static
/// order; a refusal ends the request.
async fn route(
    chain: &Chain,
    summary: &RequestSummary,
    model: Arc<ModelRoute>,
    models: &HashMap<String, Arc<ModelRoute>>,
) -> Result<Plan, GatewayError> {
    let Some(router) = &chain.router else { return Ok(Plan::fixed(model)) };
    let targets: Vec<plugin::Target> = model.routes.iter().map(target).collect();
    let decision = match router.route(summary, &targets).await {
        Ok(Outcome::Route(d)) => d,
        Ok(Outcome::Reject(r)) => return Err(GatewayError::Rejected { status: r.status, reason: r.reason }),
        Err(e) => {
            warn!(plugin = %router.id(), error = %e, "router failed: using the static target order");
            return Ok(Plan::fixed(model));
        }
    };
    let model = match decision.model_rewrite.as_ref().and_then(|m| models.get(m)) {
        Some(rewritten) => Arc::clone(rewritten),
        None => model,
    };
    let by_name: BTreeMap<&str, usize> =
        model.routes.iter().enumerate().map(|(i, r)| (r.target.name.as_str(), i)).collect();
    let mut order: Vec<usize> = decision.targets.iter().filter_map(|t| by_name.get(t.as_str()).copied()).collect();
    if order.is_empty() {
        // A rewrite to a model served by none of the chosen targets: its own static order.
        order = (0..model.routes.len()).collect();
    }
    Ok(Plan { model, order, cache: Some(decision.cache) })
}

impl From<accounting::PriceModel> for PriceModel {
    fn from(p: accounting::PriceModel) -> PriceModel {
        match p {
            accounting::PriceModel::Token { input_usd_per_mtok, output_usd_per_mtok } => {
                PriceModel::Token(TokenPrice { input_usd_per_mtok, output_usd_per_mtok })
            }
            accounting::PriceModel::GpuSecond { usd_per_second } => PriceModel::GpuSecond(usd_per_second),
            accounting::PriceModel::Hour { usd_per_hour, capacity } => {
                PriceModel::Hour(HourPrice { usd_per_hour, capacity })
            }
        }
    }
}

/// A route as the router sees it, with the target's live statistics: health (half-open is
/// reported degraded, ejected down), smoothed latencies (0 until measured), requests in flight,
/// and the capacity its engine reports, else its price model's.
fn target(route: &Route) -> plugin::Target {
    let t = &route.target;
    let stats = t.stats.snapshot(std::time::Instant::now());
    let price = route.price.map(PriceModel::from);
    let capacity = match (stats.engine.as_ref().map(|e| e.max_batch), route.price) {
        (Some(max_batch), _) if max_batch > 0 => Some(max_batch),
        (_, Some(accounting::PriceModel::Hour { capacity, .. })) => Some(capacity),
        _ => None,
    };
    let health = match stats.health {
        HealthState::Healthy => Health::Healthy,
        HealthState::Degraded | HealthState::HalfOpen => Health::Degraded,
        HealthState::Ejected => Health::Down,
    };
    plugin::Target {
        name: t.name.clone(),
        kind: match t.kind {
            TargetKind::Managed => plugin::TargetKind::Managed,
            TargetKind::Serverless => plugin::TargetKind::Serverless,
            TargetKind::Dedicated => plugin::TargetKind::Dedicated,
            TargetKind::RemoteEdge => plugin::TargetKind::RemoteEdge,
        },
        region: t.region.clone(),
        own_infrastructure: t.own_infrastructure,
        model: route.upstream_model.clone(),
        price,
        health,
        latency_ms: stats.latency_ms.unwrap_or(0.0),
        ttft_ms: stats.ttft_ms.unwrap_or(0.0),
        in_flight: stats.in_flight,
        capacity,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::upstream::Target;

    fn route() -> Route {
        let config = Config::parse(
            r#"
            [targets.gpu]
            api = "openai"
            base_url = "http://127.0.0.1:9/v1"
            kind = "dedicated"
            price = { per = "hour", usd_per_hour = 2.0, capacity = 8 }
            [health]
            ejection_threshold = 2
            [[models]]
            name = "m"
            targets = [{ target = "gpu" }]
        "#,
        )
        .unwrap();
        let target = Arc::new(Target::new("gpu", &config).unwrap());
        Route { target, upstream_model: "m".into(), price: config.targets["gpu"].price }
    }

    #[test]
    fn routers_see_the_live_stats() {
        let r = route();
        let t = target(&r);
        assert_eq!((t.health, t.latency_ms, t.ttft_ms, t.in_flight), (Health::Healthy, 0.0, 0.0, 0));
        assert_eq!(t.capacity, Some(8), "the price model's capacity until an engine reports one");

        let stats = &r.target.stats;
        stats.success(Some(Duration::from_millis(120)));
        stats.ttft(Duration::from_millis(40));
        let _busy = stats.start();
        let t = target(&r);
        assert_eq!((t.latency_ms, t.ttft_ms, t.in_flight), (120.0, 40.0, 1));

        let load = crate::stats::EngineLoad {
            provider: "cpu".into(),
            tokens_per_second: 0.0,
            queue_depth: 0,
            active_sequences: 1,
            max_batch: 4,
        };
        stats.probe(Instant::now(), Some((load, None)));
        assert_eq!(target(&r).capacity, Some(4), "the engine's own figure wins");

        stats.failure(Instant::now());
        assert_eq!(target(&r).health, Health::Degraded);
        stats.failure(Instant::now());
        assert_eq!(target(&r).health, Health::Down, "ejected");
    }
}
