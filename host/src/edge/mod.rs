//! The edge node: its shared state ([`Edge`]), its endpoints ([`Edge::handle`]), and the request
//! path of a chat request as a sequence of phases, a file each:
//!
//! 1. `admit.rs`: who the request is for (a client's key, or a peer edge's relay checks), within
//!    the tenant's rate and the node's in-flight limit. From here the request is an exchange
//!    (`context.rs`), the one context that the phases hand on.
//! 2. `parse.rs`: the body, read within the node's limits, in the client's API shape, for a
//!    model served here.
//! 3. `route.rs`: the tenant's privacy filters redact the request, its router orders the model's
//!    targets, and the dispatch core keeps those the tenant's guarantees allow. Then
//!    `budget.rs`: the request's worst case is held against its tenant's budgets, or refused.
//! 4. `cache.rs`: a hit answers here. The key is the redacted request, so text the filters
//!    redacted never reaches the cache.
//! 5. `dispatch.rs`: the first target along the plan that answers.
//! 6. `respond.rs`: the answer in the client's shape, whole or streamed.
//! 7. `record.rs`: the request is accounted once, when it ends: answered, refused, or abandoned
//!    by the client.
//!
//! Beside the path: the operator's endpoints (`admin.rs`) and status page (`status/`),
//! `POST /v1/embeddings` (`embeddings.rs`), and graceful shutdown (`drain.rs`). Nothing outside this module but the servers above it
//! ([`crate::server`], [`crate::relay`]) uses it.

mod admin;
mod admit;
mod budget;
mod cache;
mod context;
mod dispatch;
mod drain;
mod embeddings;
mod parse;
mod record;
mod respond;
mod route;
mod status;
mod trace;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::accounting::PriceModel;
use crate::api::ApiShape;
use crate::cache::shared::SharedCache;
use crate::cache::PromptCache;
use crate::chain::{LoadError, Plugins};
use crate::config::{parse_key_hash, Config, ConfigError};
use crate::error::GatewayError;
use crate::ledger::{HourlyTarget, Ledger, LedgerError};
use crate::metrics::Metrics;
use crate::plugin::{PluginError, PluginMetrics, PluginRuntime};
use crate::routes::{ModelRoute, Route};
use crate::tenant::Tenants;
use crate::upstream::{self, HttpClient, Target};
use meridian_engine::api::RelayRequest;
use meridian_engine::telemetry::{now_unix_nanos, Exporter};

use admit::Arrival;
use context::Exchange;
use record::Record;
use respond::{json_response, request_id, text_response, with_header, Answer};

pub use respond::error_response;

/// The body of every response the edge sends.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The body of a client's request, whichever HTTP version carried it (hyper's for HTTP/1.1 and
/// HTTP/2, h3's for HTTP/3), its transport's errors as I/O errors.
pub type ClientBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// An edge node's shared state.
pub struct Edge {
    config: Config,
    loaded: ArcSwap<Loaded>,
    reloading: tokio::sync::Mutex<()>,
    models: HashMap<String, Arc<ModelRoute>>,
    model_list: Bytes,
    client: HttpClient,
    cache: Option<PromptCache>,
    /// Its metrics.
    pub metrics: Metrics,
    in_flight: Arc<Semaphore>,
    plugins: Option<PluginRuntime>,
    admin_keys: Vec<[u8; 32]>,
    /// Every target, by name, for `/admin/targets` and the per-target metrics.
    targets: Vec<Arc<Target>>,
    /// The durable record of every request, unless `[ledger] enabled = false`.
    pub ledger: Option<Ledger>,
    /// The tenants' budgets and their counters.
    pub budgets: crate::budget::Budgets,
    /// Graceful shutdown's state (see [`Edge::drain`]).
    drain: drain::Drain,
    /// The samples the status page charts.
    history: Arc<status::history::History>,
    /// Where request spans go, with `[telemetry] otlp_endpoint`.
    tracer: Option<Exporter>,
}

/// What a plugin reload replaces at once: the tenants with their plugin chains. Requests in
/// flight keep the `Arc`s of what they started with and finish on the old versions.
struct Loaded {
    tenants: Tenants,
    plugins: Vec<String>,
}

/// Why the node's state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Bad config.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The plugin runtime could not start.
    #[error("plugin_runtime: {0}")]
    PluginRuntime(PluginError),
    /// A plugin could not be loaded.
    #[error(transparent)]
    Plugin(#[from] LoadError),
    /// The ledger's store could not be opened.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The budgets could not be restored from the ledger.
    #[error("budgets: cannot restore what tenants spent from the ledger: {0}")]
    Budgets(String),
}

impl Edge {
    /// Builds the node's state from validated config, loading its plugins.
    pub async fn new(config: Config) -> Result<Edge, BuildError> {
        let mut targets = HashMap::new();
        for name in config.targets.keys() {
            targets.insert(name.clone(), Arc::new(Target::new(name, &config)?));
        }
        let models: HashMap<_, _> = config
            .models
            .iter()
            .map(|m| {
                let routes = m
                    .targets
                    .iter()
                    .map(|r| Route {
                        target: Arc::clone(&targets[&r.target]),
                        upstream_model: r.model.clone().unwrap_or_else(|| m.name.clone()),
                        price: r.price.or(config.targets[&r.target].price),
                    })
                    .collect();
                let route = ModelRoute { name: m.name.clone(), default_max_tokens: m.default_max_tokens, routes };
                (m.name.clone(), Arc::new(route))
            })
            .collect();
        let data: Vec<_> = config
            .models
            .iter()
            .map(|m| json!({ "id": m.name, "object": "model", "created": 0, "owned_by": "meridian" }))
            .collect();
        let model_list = Bytes::from(json!({ "object": "list", "data": data }).to_string());
        let connect = config.targets.values().map(|t| t.connect_timeout()).max().unwrap_or(Duration::from_secs(5));
        let cache = match &config.cache {
            c if c.enabled => {
                let ttl = Duration::from_secs(c.ttl_secs);
                let shared = match c.redis_url()? {
                    Some(url) => Some(
                        SharedCache::new(
                            &url,
                            Duration::from_millis(c.redis_timeout_ms),
                            &c.key_prefix,
                            ttl,
                            Duration::from_millis(c.coalesce_wait_ms),
                        )
                        .map_err(|message| ConfigError::Invalid { key: "cache.redis_url".into(), message })?,
                    ),
                    None => None,
                };
                Some(PromptCache::with_shared(c.max_bytes, ttl, shared))
            }
            _ => None,
        };
        let metrics = Metrics::new();
        // The runtime (its engine, pool and epoch ticker) only exists when plugins are configured.
        let (plugins, loaded) = if config.plugins.is_empty() {
            (None, Plugins::default())
        } else {
            let plugin_metrics = PluginMetrics::new(metrics.registry()).map_err(|e| {
                BuildError::PluginRuntime(PluginError::Runtime(format!("cannot register plugin metrics: {e}")))
            })?;
            // Each tenant whose answers are filtered gets pool slots of its own for its streams.
            let sessions = Tenants::session_slots(&config);
            let settings = config.plugin_runtime.clone();
            let runtime = PluginRuntime::with_session_slots(settings, Arc::new(plugin_metrics), sessions)
                .map_err(BuildError::PluginRuntime)?;
            let loaded = Plugins::load(&config, &runtime).await?;
            (Some(runtime), loaded)
        };
        let loaded = Loaded { tenants: Tenants::new(&config, &loaded), plugins: loaded.ids() };
        let ledger = if config.ledger.enabled {
            // Dedicated targets are paid by the hour, busy or idle: the ledger records their hours.
            let hourly = config
                .targets
                .iter()
                .filter_map(|(name, t)| match t.price {
                    Some(PriceModel::Hour { usd_per_hour, .. }) => {
                        Some(HourlyTarget { name: name.clone(), usd_per_hour })
                    }
                    _ => None,
                })
                .collect();
            let url = config.ledger.store_url()?;
            Some(Ledger::open(&config.ledger, &url, hourly, metrics.ledger.clone()).await?)
        } else {
            None
        };
        let budgets = crate::budget::Budgets::new(&config)?;
        if let Some(ledger) = &ledger {
            // A restart keeps what tenants spent this day and month.
            budgets.restore(ledger.store()).await.map_err(BuildError::Budgets)?;
        }
        let mut targets: Vec<Arc<Target>> = targets.into_values().collect();
        targets.sort_by(|a, b| a.name.cmp(&b.name));
        upstream::spawn_probes(&targets, Duration::from_millis(config.health.probe_interval_ms));
        let history = status::history::History::spawn(&config.status, &targets, metrics.registry().clone());
        let tracer = match &config.telemetry.otlp_endpoint {
            Some(endpoint) => {
                let service = config.telemetry.service_name.as_deref().unwrap_or("meridian-edge");
                let resource = vec![("meridian.region", config.node.region.clone())];
                let exporter = Exporter::start(endpoint, service, resource)
                    .map_err(|message| ConfigError::Invalid { key: "telemetry.otlp_endpoint".into(), message })?;
                Some(exporter)
            }
            None => None,
        };
        Ok(Edge {
            history,
            tracer,
            targets,
            loaded: ArcSwap::from_pointee(loaded),
            reloading: tokio::sync::Mutex::new(()),
            models,
            model_list,
            client: upstream::http_client(connect),
            cache,
            metrics,
            in_flight: Arc::new(Semaphore::new(config.node.max_in_flight)),
            plugins,
            // Validation parsed every admin key hash.
            admin_keys: config.node.admin_keys.iter().filter_map(|k| parse_key_hash(k).ok()).collect(),
            ledger,
            budgets,
            drain: drain::Drain::new(),
            config,
        })
    }

    /// Writes what the ledger holds and stops its writer: the last step of a clean shutdown,
    /// once requests in flight have ended.
    pub async fn close(&self) {
        if let Some(ledger) = &self.ledger {
            ledger.close().await;
        }
    }

    /// The node's config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether the node runs plugins (and so has something to reload).
    pub fn has_plugins(&self) -> bool {
        self.plugins.is_some()
    }

    /// Loads every plugin again from its file (compiling, checking and configuring each) and
    /// swaps the new set in at once. Requests in flight finish on the versions they started with.
    /// A reload that fails changes nothing and says why. Returns the loaded `name@version`s.
    pub async fn reload_plugins(&self) -> Result<Vec<String>, BuildError> {
        let Some(runtime) = &self.plugins else { return Ok(Vec::new()) };
        let _one_at_a_time = self.reloading.lock().await;
        match Plugins::load(&self.config, runtime).await {
            Ok(plugins) => {
                let tenants = self.loaded.load().tenants.with_plugins(&self.config, &plugins);
                let ids = plugins.ids();
                self.loaded.store(Arc::new(Loaded { tenants, plugins: ids.clone() }));
                info!(plugins = ?ids, "plugins reloaded");
                Ok(ids)
            }
            Err(e) => {
                warn!(error = %e, "plugin reload failed: the loaded versions stay");
                Err(e.into())
            }
        }
    }

    /// What this edge tells peer edges' health probes: its models, and requests in flight
    /// against its limit.
    pub fn relay_health(&self) -> meridian_engine::api::Health {
        let capacity = self.config.node.max_in_flight;
        let mut chat_models: Vec<String> = self.models.keys().cloned().collect();
        chat_models.sort();
        meridian_engine::api::Health {
            provider: "edge".into(),
            chat_models,
            queue_capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            active_sequences: u32::try_from(capacity - self.in_flight.available_permits()).unwrap_or(u32::MAX),
            ..Default::default()
        }
    }

    /// The most relays a request may take in all: this edge's `relay.max_hops`.
    fn max_hops(&self) -> u8 {
        self.config.relay.as_ref().map_or(crate::config::DEFAULT_MAX_HOPS, |c| c.max_hops)
    }

    /// Answers one HTTP request.
    pub async fn handle(self: Arc<Self>, req: Request<ClientBody>) -> Response<Body> {
        let request_id = request_id(req.headers());
        let response = match (req.method(), req.uri().path()) {
            (&Method::POST, "/v1/chat/completions") => {
                self.chat(ApiShape::OpenAi, Arrival::Client(req), request_id.clone()).await
            }
            (&Method::POST, "/v1/messages") => {
                self.chat(ApiShape::Anthropic, Arrival::Client(req), request_id.clone()).await
            }
            (&Method::POST, "/v1/embeddings") => match embeddings::embeddings(&self, req).await {
                Ok(resp) => resp,
                Err(e) => error_response(ApiShape::OpenAi, &e),
            },
            (&Method::POST, "/admin/plugins/reload") => admin::reload(&self, req.headers()).await,
            (&Method::GET, "/admin/targets") => admin::targets(&self, req.headers()),
            (&Method::GET, "/admin/status") => status::page(&self, req.headers()).await,
            (&Method::GET, "/admin/status.json") => status::data(&self, req.headers()),
            (&Method::GET, path @ ("/admin/status.js" | "/admin/status.css")) => {
                status::asset(&self, req.headers(), path)
            }
            (&Method::GET, "/v1/models") => match self.loaded.load().tenants.authenticate(req.headers()) {
                Ok(_) => json_response(StatusCode::OK, self.model_list.clone()),
                Err(e) => error_response(ApiShape::OpenAi, &e),
            },
            (&Method::GET, "/healthz") => text_response(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => admin::readyz(&self, req.headers()),
            (&Method::GET, "/metrics") => admin::metrics(&self, req.headers()).await,
            (method, path) => {
                let shape = if path.starts_with("/v1/messages") { ApiShape::Anthropic } else { ApiShape::OpenAi };
                let err = GatewayError::NotFound { method: method.to_string(), path: path.to_string() };
                error_response(shape, &err)
            }
        };
        with_header(response, "x-request-id", &request_id)
    }

    /// Answers a request relayed by a peer edge ([`crate::relay`]): the body of the response is
    /// the relay frames of the answer, or of the error.
    pub async fn relay(self: Arc<Self>, mut request: RelayRequest) -> Response<Body> {
        // The id travels on in the exchange's record; the arrival checks do not read it.
        let request_id = std::mem::take(&mut request.request_id);
        self.chat(ApiShape::Relay, Arrival::Relayed(request), request_id).await
    }

    /// A chat request, from a client or a peer edge, along the request path (see the module
    /// docs): each phase is a module of its own, and the exchange carries what one learns to the
    /// next. A refusal at any phase is accounted once and answered in the client's shape.
    async fn chat(self: Arc<Self>, api: ApiShape, arrival: Arrival, request_id: String) -> Response<Body> {
        // A ledger writer that fell behind holds new requests back rather than lose records.
        if let Some(ledger) = &self.ledger {
            ledger.ready().await;
        }
        // record: from here on, every way out is accounted exactly once.
        let record = Record::new(Arc::clone(&self), api, request_id);
        if self.drain.started() {
            return record.refuse(GatewayError::ShuttingDown);
        }
        // admit: the tenant, its rate, the in-flight limit; then the request is an exchange.
        let mut cx = match admit::admit(&self, record, arrival) {
            Ok(cx) => cx,
            Err(e) => return error_response(api, &e),
        };
        // A request still waiting for its answer when the drain's grace period ends is refused.
        let answered = tokio::select! {
            answered = self.answer(&mut cx) => answered,
            () = self.drain.cut() => Err(GatewayError::ShuttingDown),
        };
        match answered {
            // respond: whole or streamed; the record is finished when the answer ends.
            Ok(answer) => respond::respond(cx, answer, self.drain.cut()).await,
            Err(e) => cx.record.refuse(e),
        }
    }

    /// The phases between admission and the response: what answers the exchange.
    async fn answer(&self, cx: &mut Exchange) -> Result<Answer, GatewayError> {
        // Each phase is a span of the request's trace, when it is recorded.
        let traced = matches!(cx.record.trace, trace::Trace::On(_));
        let start = || if traced { now_unix_nanos() } else { 0 };
        // parse: the body within limits, in the client's shape, for a model served here.
        let t = start();
        let model = parse::parse(self, cx).await?;
        cx.record.trace.phase("parse", t);
        // filter, route: redacted before the router sees it, and before the cache key is taken.
        let t = start();
        let plan = route::route(self, cx, model).await?;
        cx.record.trace.phase("filter and route", t);
        // budget: the worst case is held against the tenant's limits, or the request is refused.
        let t = start();
        budget::reserve(self, cx, &plan).await?;
        cx.record.trace.phase("budget", t);
        // cache: a hit answers here.
        let t = start();
        let hit = cache::lookup(self, cx, &plan).await;
        cx.record.trace.phase("cache", t);
        if let Some(hit) = hit {
            return Ok(hit);
        }
        // dispatch: the first target along the plan that answers (a span per attempt).
        dispatch::dispatch(self, cx, &plan).await
    }
}
