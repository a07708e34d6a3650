//! A tenant's plugin chain on the request path: privacy filters (step 3 of the request path), then
//! the router (step 5).
//!
//! Failure policy, from the contract: a filter that fails blocks the request (fail closed), so no
//! unfiltered text leaves the node; a router that fails is replaced by the static target order,
//! which the dispatch core filters by the tenant's policy as it does any router's answer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tracing::warn;

use crate::chat::{ChatRequest, ChatResponse, StreamEvent};
use crate::config::{Config, PluginKind};
use crate::error::GatewayError;
use crate::plugin::{
    CachePolicy, FilterPlugin, Outcome, PluginError, PluginId, PluginRuntime, RequestSummary, RequestVerdict,
    ResponseSession, ResponseVerdict, RouterPlugin, SessionSlots,
};
use crate::redaction::{self, Placeholders, StreamRestorer};
use crate::routes::{ModelRoute, Routing};

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
    /// The instance slots its streamed answers' filters take (see [`SessionSlots`]).
    pub sessions: SessionSlots,
    /// How long a streamed answer's pieces may wait to reach the filters together.
    pub answer_batch: Option<AnswerBatch>,
}

/// A tenant's `[tenants.answer_batch]`, when it waits: see [`crate::config::AnswerBatchConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerBatch {
    /// Longest the first piece of a batch waits for more.
    pub max_wait: std::time::Duration,
    /// Text that ends the wait.
    pub max_bytes: usize,
}

impl AnswerBatch {
    /// The batching `config` asks for; `None` when it waits for nothing.
    pub fn new(config: crate::config::AnswerBatchConfig) -> Option<AnswerBatch> {
        (config.max_wait_ms > 0).then(|| AnswerBatch {
            max_wait: std::time::Duration::from_millis(config.max_wait_ms),
            max_bytes: config.max_bytes,
        })
    }
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("filters", &self.filters.iter().map(|p| p.id().to_string()).collect::<Vec<_>>())
            .field("router", &self.router.as_ref().map(|p| p.id().to_string()))
            .field("allowed_regions", &self.allowed_regions)
            .field("price_cap_usd", &self.price_cap_usd)
            .field("sessions", &self.sessions)
            .field("answer_batch", &self.answer_batch)
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
/// one instance per filter for its duration, in its tenant's [`SessionSlots`]; a whole answer's
/// one call takes a shared slot for that call only.
pub struct AnswerFilter {
    sessions: Vec<ResponseSession>,
    /// How a stream's pieces are gathered for the sessions; `None` for a whole answer.
    batch: Option<AnswerBatch>,
    placeholders: Placeholders,
    text: StreamRestorer,
    tools: BTreeMap<u32, StreamRestorer>,
}

impl AnswerFilter {
    /// The answer side of `chain`'s filters; `streaming`: the answer comes in pieces, so each
    /// session keeps its instance between them, in the tenant's slots.
    fn new(chain: &Chain, placeholders: Placeholders, streaming: bool) -> AnswerFilter {
        let session =
            |f: &Arc<FilterPlugin>| if streaming { f.tenant_session(&chain.sessions) } else { f.response_session() };
        AnswerFilter {
            sessions: chain.filters.iter().map(session).collect(),
            batch: if streaming { chain.answer_batch } else { None },
            placeholders,
            text: StreamRestorer::new(false),
            tools: BTreeMap::new(),
        }
    }

    /// How long a streamed answer's pieces may wait to reach the filters together, if at all.
    pub fn batch(&self) -> Option<AnswerBatch> {
        self.batch
    }

    /// How many distinct values the request side redacted.
    pub fn redactions(&self) -> usize {
        self.placeholders.len()
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
/// side of the filters, if the tenant has any, and what the router made of it.
pub async fn run(
    chain: &Chain,
    summary: &mut RequestSummary,
    req: &mut ChatRequest,
    model: Arc<ModelRoute>,
    models: &HashMap<String, Arc<ModelRoute>>,
) -> Result<(Option<AnswerFilter>, Routed), GatewayError> {
    let answer = if chain.filters.is_empty() {
        None
    } else {
        let placeholders = filter_request(chain, req, summary).await?;
        Some(AnswerFilter::new(chain, placeholders, summary.streaming))
    };
    let routed = route(chain, summary, req, model, models).await?;
    Ok((answer, routed))
}

/// What the router made of a request: the model (a router may rewrite it), its answer, and its
/// cache policy. The dispatch core checks the answer against the tenant's policy
/// ([`crate::routes::Plan::new`]).
pub struct Routed {
    /// The model whose targets the answer orders.
    pub model: Arc<ModelRoute>,
    /// The router's answer.
    pub routing: Routing,
    /// The router's cache policy, if it gave one.
    pub cache: Option<CachePolicy>,
}

/// Asks the chain's router where the request goes. A refusal ends the request; a failure is
/// reported as such, for the dispatch core to replace with the static order under the tenant's
/// policy.
async fn route(
    chain: &Chain,
    summary: &RequestSummary,
    req: &ChatRequest,
    model: Arc<ModelRoute>,
    models: &HashMap<String, Arc<ModelRoute>>,
) -> Result<Routed, GatewayError> {
    let Some(router) = &chain.router else { return Ok(Routed { model, routing: Routing::Static, cache: None }) };
    let now = std::time::Instant::now();
    let (targets, held) = model.router_inputs(|| crate::api::engine::conversation(req), now);
    let decision = match router.route(summary, &targets, &held).await {
        Ok(Outcome::Route(d)) => d,
        Ok(Outcome::Reject(r)) => return Err(GatewayError::Rejected { status: r.status, reason: r.reason }),
        Err(e) => {
            warn!(plugin = %router.id(), error = %e, "router failed: the static order under the tenant's policy");
            return Ok(Routed { model, routing: Routing::Failed(e.to_string()), cache: None });
        }
    };
    let model = match decision.model_rewrite.as_ref().and_then(|m| models.get(m)) {
        Some(rewritten) => Arc::clone(rewritten),
        None => model,
    };
    Ok(Routed { model, routing: Routing::Order(decision.targets), cache: Some(decision.cache) })
}
