//! The request path of an edge node: authenticate, normalize, cache, route, dispatch with
//! fallback, respond in the client's shape, account.
//!
//! A tenant's privacy filters run after [`ApiShape::parse_request`] and before the cache key is
//! taken, so the cache and the upstream see only redacted text; its router then orders the
//! targets (see [`crate::chain`]).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::accounting::PriceModel;
use crate::api::{ApiShape, StreamEncoder};
use crate::cache::{self, CachedAnswer, FillGuard, Lookup, PromptCache};
use crate::chain::{self, AnswerFilter, LoadError, Plugins, Routed};
use crate::chat::{estimate_tokens, ChatRequest, ChatResponse, StreamEvent, Usage};
use crate::config::{parse_key_hash, CachePolicy, Config, ConfigError};
use crate::dispatch::{self, Admit, Attempts, Policy, Step};
use crate::api::relay::Dispatch;
use crate::error::{GatewayError, RelayRefusal, UpstreamError};
use crate::metrics::Metrics;
use crate::plugin::{CachePolicy as RouterCache, PluginError, PluginMetrics, PluginRuntime};
use crate::routes::{ModelRoute, Plan, Route, Routing};
use crate::stats::Admission;
use crate::tenant::{self, Tenant, Tenants};
use crate::upstream::{self, EventStream, HttpClient, Target};
use meridian_engine::api::RelayRequest;

/// The body of every response the edge sends.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

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
}

/// How a request uses the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CacheUse {
    Lookup,
    Bypass,
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
        let cache = config
            .cache
            .enabled
            .then(|| PromptCache::new(config.cache.max_bytes, Duration::from_secs(config.cache.ttl_secs)));
        let metrics = Metrics::new();
        // The runtime (its engine, pool and epoch ticker) only exists when plugins are configured.
        let (plugins, loaded) = if config.plugins.is_empty() {
            (None, Plugins::default())
        } else {
            let plugin_metrics = PluginMetrics::new(metrics.registry()).map_err(|e| {
                BuildError::PluginRuntime(PluginError::Runtime(format!("cannot register plugin metrics: {e}")))
            })?;
            let runtime = PluginRuntime::new(config.plugin_runtime.clone(), Arc::new(plugin_metrics))
                .map_err(BuildError::PluginRuntime)?;
            let loaded = Plugins::load(&config, &runtime).await?;
            (Some(runtime), loaded)
        };
        let loaded = Loaded { tenants: Tenants::new(&config, &loaded), plugins: loaded.ids() };
        let mut targets: Vec<Arc<Target>> = targets.into_values().collect();
        targets.sort_by(|a, b| a.name.cmp(&b.name));
        upstream::spawn_probes(&targets, Duration::from_millis(config.health.probe_interval_ms));
        Ok(Edge {
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
            config,
        })
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

    /// `POST /admin/plugins/reload`, for holders of a `node.admin_keys` key.
    async fn admin_reload(&self, headers: &HeaderMap) -> Response<Body> {
        if self.admin_keys.is_empty() {
            let err = GatewayError::NotFound { method: "POST".into(), path: "/admin/plugins/reload".into() };
            return error_response(ApiShape::OpenAi, &err);
        }
        if !self.admin_keys.contains(&tenant::key_digest(headers).unwrap_or_default()) {
            return error_response(ApiShape::OpenAi, &GatewayError::Unauthorized);
        }
        match self.reload_plugins().await {
            Ok(ids) => json_response(StatusCode::OK, Bytes::from(json!({ "reloaded": ids }).to_string())),
            Err(e) => json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                Bytes::from(json!({ "error": { "message": e.to_string(), "type": "reload_failed" } }).to_string()),
            ),
        }
    }

    /// `GET /admin/targets`, for holders of a `node.admin_keys` key: every target with its live
    /// statistics and health.
    fn admin_targets(&self, headers: &HeaderMap) -> Response<Body> {
        if self.admin_keys.is_empty() {
            let err = GatewayError::NotFound { method: "GET".into(), path: "/admin/targets".into() };
            return error_response(ApiShape::OpenAi, &err);
        }
        if !self.admin_keys.contains(&tenant::key_digest(headers).unwrap_or_default()) {
            return error_response(ApiShape::OpenAi, &GatewayError::Unauthorized);
        }
        let now = Instant::now();
        let list: Vec<_> = self
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

    /// Answers one HTTP request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let request_id = request_id(req.headers());
        let response = match (req.method(), req.uri().path()) {
            (&Method::POST, "/v1/chat/completions") => {
                self.chat(ApiShape::OpenAi, Inbound::Client(req), &request_id).await
            }
            (&Method::POST, "/v1/messages") => self.chat(ApiShape::Anthropic, Inbound::Client(req), &request_id).await,
            (&Method::POST, "/v1/embeddings") => match self.embeddings(req).await {
                Ok(resp) => resp,
                Err(e) => error_response(ApiShape::OpenAi, &e),
            },
            (&Method::POST, "/admin/plugins/reload") => self.admin_reload(req.headers()).await,
            (&Method::GET, "/admin/targets") => self.admin_targets(req.headers()),
            (&Method::GET, "/v1/models") => match self.loaded.load().tenants.authenticate(req.headers()) {
                Ok(_) => json_response(StatusCode::OK, self.model_list.clone()),
                Err(e) => error_response(ApiShape::OpenAi, &e),
            },
            (&Method::GET, "/healthz") => text_response(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => self.readyz(),
            (&Method::GET, "/metrics") => self.render_metrics().await,
            (method, path) => {
                let shape = if path.starts_with("/v1/messages") { ApiShape::Anthropic } else { ApiShape::OpenAi };
                let err = GatewayError::NotFound { method: method.to_string(), path: path.to_string() };
                error_response(shape, &err)
            }
        };
        with_header(response, "x-request-id", &request_id)
    }

    fn readyz(&self) -> Response<Body> {
        let targets: Vec<_> = self.config.targets.keys().collect();
        let quarantined: Vec<String> =
            self.plugins.iter().flat_map(PluginRuntime::quarantined).map(|id| id.to_string()).collect();
        let plugins = self.loaded.load().plugins.clone();
        let body = json!({ "status": "ready", "region": self.config.node.region, "targets": targets,
            "plugins": plugins, "quarantined_plugins": quarantined });
        json_response(StatusCode::OK, Bytes::from(body.to_string()))
    }

    async fn render_metrics(&self) -> Response<Body> {
        if let Some(cache) = &self.cache {
            let (bytes, entries) = cache.size().await;
            self.metrics.cache_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
            self.metrics.cache_entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
        }
        let now = Instant::now();
        for t in &self.targets {
            self.metrics.observe_target(&t.name, &t.stats.snapshot(now));
        }
        let mut resp = Response::new(full(self.metrics.render()));
        resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
        resp
    }

    /// Answers a request relayed by a peer edge ([`crate::relay`]): the body of the response is
    /// the relay frames of the answer, or of the error.
    pub async fn relay(self: Arc<Self>, request: RelayRequest) -> Response<Body> {
        let request_id = request.request_id.clone();
        self.chat(ApiShape::Relay, Inbound::Relayed(Box::new(request)), &request_id).await
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

    async fn chat(self: Arc<Self>, api: ApiShape, inbound: Inbound, request_id: &str) -> Response<Body> {
        let mut record = Record::new(Arc::clone(&self), api, request_id);
        match self.chat_inner(api, inbound, &mut record).await {
            Ok(resp) => resp,
            Err(e) => {
                if matches!(e, GatewayError::Upstream(_)) {
                    warn!(request_id, tenant = %record.tenant, model = %record.model, error = %e, "request failed upstream");
                } else {
                    debug!(request_id, error = %e, "request refused");
                }
                record.finish(e.code(), None, 0);
                error_response(api, &e)
            }
        }
    }

    /// A relayed request's checks on arrival: neither a loop back to this region nor past the hop
    /// limit; its tenant known here and its relay policy met.
    fn arrival(&self, r: &RelayRequest) -> Result<Arc<Tenant>, GatewayError> {
        let own = &self.config.node.region;
        let path = || r.path.join(" > ");
        if r.path.contains(own) {
            return Err(RelayRefusal::Loop { region: own.clone(), path: path() }.into());
        }
        let max_hops = self.config.relay.as_ref().map_or(0, |c| c.max_hops);
        if r.path.len() > usize::from(max_hops) {
            return Err(RelayRefusal::HopLimit { max: max_hops, path: path() }.into());
        }
        let tenant =
            self.loaded.load().tenants.named(&r.tenant).ok_or_else(|| RelayRefusal::UnknownTenant(r.tenant.clone()))?;
        match dispatch::policy::policy_forbids(tenant.relay, &r.labels) {
            Some(refusal) => Err(refusal.into()),
            None => Ok(tenant),
        }
    }

    async fn chat_inner(
        self: &Arc<Self>,
        api: ApiShape,
        inbound: Inbound,
        record: &mut Record,
    ) -> Result<Response<Body>, GatewayError> {
        let (tenant, requested, client_region, via, body) = match inbound {
            Inbound::Client(req) => {
                let tenant = self.loaded.load().tenants.authenticate(req.headers())?;
                let requested = requested_cache(req.headers());
                let client_region =
                    req.headers().get("x-meridian-client-region").and_then(|v| v.to_str().ok()).map(str::to_string);
                (tenant, requested, client_region, Via::default(), PendingBody::Http(req))
            }
            Inbound::Relayed(r) => {
                let tenant = self.arrival(&r)?;
                // Personal data that reached this region unredacted is answered, never kept here.
                let bypass = r.no_cache || dispatch::carries_unredacted_pii(&r.labels);
                let requested = bypass.then_some(CacheUse::Bypass);
                let RelayRequest { client_region, path, labels, redacted, request, .. } = *r;
                // Re-encoding the parsed JSON value cannot fail.
                let body = Bytes::from(serde_json::to_vec(&request).unwrap_or_default());
                (tenant, requested, client_region, Via { path, labels, redacted }, PendingBody::Ready(body))
            }
        };
        let header_cache = self.cache_use(&tenant, requested);
        record.tenant = Arc::clone(&tenant.name);
        tenant.admit()?;
        let permit = Arc::clone(&self.in_flight).try_acquire_owned().map_err(|_| GatewayError::Overloaded)?;
        let body = match body {
            PendingBody::Http(req) => self.read_body(req).await?,
            PendingBody::Ready(body) => body,
        };
        let mut request = api.parse_request(&body)?;
        record.model.clone_from(&request.model);
        record.prompt_tokens = request.estimated_prompt_tokens();
        let model = self
            .models
            .get(&request.model)
            .cloned()
            .ok_or_else(|| GatewayError::UnknownModel(request.model.clone()))?;

        let chain = &tenant.chain;
        let region = &self.config.node.region;
        let mut summary = chain::summary(&record.request_id, &tenant.name, chain, region, client_region, &request);
        summary.labels = via.labels;
        summary.redacted = via.redacted;
        let (mut answer_filter, routed) = if chain.is_empty() {
            (None, Routed { model, routing: Routing::Static, cache: None })
        } else {
            chain::run(chain, &mut summary, &mut request, model, &self.models).await?
        };
        let mut path = via.path;
        path.push(region.clone());
        // The host's guarantees hold whatever the router answered, or if it failed.
        let policy = Policy::for_request(&summary, tenant.relay, path.clone(), self.max_hops());
        let plan = Plan::new(routed.model, &routed.routing, routed.cache, &policy, Instant::now())?;
        let dispatch = Dispatch {
            request_id: record.request_id.clone(),
            tenant: tenant.name.to_string(),
            client_region: summary.client_region,
            labels: summary.labels,
            redacted: summary.redacted,
            path,
            no_cache: requested == Some(CacheUse::Bypass),
        };

        // Headers and the tenant's policy first, then the router's wish, then determinism.
        let cache_use = match (header_cache, plan.cache) {
            (Some(u), _) => u,
            (None, Some(RouterCache::Force)) => CacheUse::Lookup,
            (None, Some(RouterCache::Bypass)) => CacheUse::Bypass,
            _ if deterministic(&request) => CacheUse::Lookup,
            _ => CacheUse::Bypass,
        };
        // The key is taken from the redacted request: filtered text never reaches the cache.
        let lookup = match (&self.cache, cache_use) {
            (Some(cache), CacheUse::Lookup) => Some(cache.lookup(cache::key(&tenant.name, &request)).await),
            _ => None,
        };
        let (fill, cache_status) = match lookup {
            Some(Lookup::Hit(answer, coalesced)) => {
                self.metrics.cache_lookups.with_label_values(&["hit"]).inc();
                if coalesced {
                    self.metrics.cache_coalesced.inc();
                }
                record.target = Some("cache".into());
                return self.serve_cached(api, &request, &answer, record.take(), permit, answer_filter).await;
            }
            Some(Lookup::Miss(guard)) => (Some(guard), "miss"),
            None => (None, "bypass"),
        };
        self.metrics.cache_lookups.with_label_values(&[cache_status]).inc();

        let response = if request.is_stream() {
            let (stream, head, route) = self.open_stream(&request, &plan, &dispatch).await?;
            record.route(route);
            let encoder = api.stream_encoder(&request);
            let source = Source::Upstream(Box::new(stream));
            let stream = ClientStream::new(source, head, encoder, fill, record.take(), permit, answer_filter);
            with_header(sse_response(stream), "x-meridian-target", &route.target.name)
        } else {
            let (mut answer, route) = self.complete(&request, &plan, &dispatch).await?;
            record.route(route);
            if let Some(f) = &mut answer_filter {
                f.inspect(answer.text.as_deref().unwrap_or("")).await?;
            }
            let usage = answer.usage;
            let out_bytes = answer.output_len();
            if let Some(guard) = fill {
                // Cached as it came, placeholders and all: a later identical (redacted) request
                // restores it with its own originals.
                guard.fill(CachedAnswer::Whole(answer.clone())).await;
            }
            if let Some(f) = &mut answer_filter {
                f.restore_response(&mut answer);
            }
            let target = route.target.name.clone();
            record.take().finish("ok", usage, out_bytes);
            drop(permit);
            with_header(json_response(StatusCode::OK, api.encode_response(&answer)), "x-meridian-target", &target)
        };
        Ok(with_header(response, "x-meridian-cache", cache_status))
    }

    /// `POST /v1/embeddings`: served by the model's engine targets in fallback order. Tenant
    /// filters are not run: an engine runs on the operator's own infrastructure, and a vector of
    /// placeholders would be worthless for similarity.
    async fn embeddings(&self, req: Request<Incoming>) -> Result<Response<Body>, GatewayError> {
        let tenant = self.loaded.load().tenants.authenticate(req.headers())?;
        tenant.admit()?;
        let _permit = Arc::clone(&self.in_flight).try_acquire_owned().map_err(|_| GatewayError::Overloaded)?;
        let body = self.read_body(req).await?;
        let (request, input) = crate::api::openai::parse_embeddings(&body)?;
        let model = self
            .models
            .get(&request.model)
            .cloned()
            .ok_or_else(|| GatewayError::UnknownModel(request.model.clone()))?;
        // Filters do not run on embeddings, so they carry no labels; the price cap still holds.
        let policy = Policy {
            allowed_regions: tenant.chain.allowed_regions.clone(),
            price_cap_usd: tenant.chain.price_cap_usd,
            relay: tenant.relay,
            path: vec![self.config.node.region.clone()],
            max_hops: self.max_hops(),
            ..Policy::default()
        };
        let plan = Plan::new(model, &Routing::Static, None, &policy, Instant::now())?;
        let (answer, route) =
            self.first_answer(&plan, |route| route.target.embed(input.clone(), &route.upstream_model)).await?;
        let body = crate::api::openai::encode_embeddings(&request.model, &answer.data, answer.prompt_tokens);
        Ok(with_header(json_response(StatusCode::OK, body), "x-meridian-target", &route.target.name))
    }

    async fn serve_cached(
        self: &Arc<Self>,
        api: ApiShape,
        request: &ChatRequest,
        answer: &CachedAnswer,
        record: Record,
        permit: OwnedSemaphorePermit,
        mut answer_filter: Option<AnswerFilter>,
    ) -> Result<Response<Body>, GatewayError> {
        let response = if request.is_stream() {
            sse_response(ClientStream::new(
                Source::Replay(answer.to_events().into_iter()),
                VecDeque::new(),
                api.stream_encoder(request),
                None,
                record,
                permit,
                answer_filter,
            ))
        } else {
            let mut resp = answer.to_response();
            if let Some(f) = &mut answer_filter {
                f.inspect(resp.text.as_deref().unwrap_or("")).await?;
                f.restore_response(&mut resp);
            }
            record.finish("ok", resp.usage, resp.output_len());
            json_response(StatusCode::OK, api.encode_response(&resp))
        };
        Ok(with_header(response, "x-meridian-cache", "hit"))
    }

    /// The cache decision that the client's wish (see [`requested_cache`]) and the tenant's
    /// policy make before the body is read; `None` leaves it to whether the request is
    /// deterministic.
    fn cache_use(&self, tenant: &Tenant, requested: Option<CacheUse>) -> Option<CacheUse> {
        if self.cache.is_none() || tenant.cache == CachePolicy::Never {
            return Some(CacheUse::Bypass);
        }
        match requested {
            Some(u) => Some(u),
            None if tenant.cache == CachePolicy::Always => Some(CacheUse::Lookup),
            None => None,
        }
    }

    async fn read_body(&self, req: Request<Incoming>) -> Result<Bytes, GatewayError> {
        let limit = self.config.node.max_body_bytes;
        let declared =
            req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(GatewayError::PayloadTooLarge { limit });
        }
        let after = Duration::from_millis(self.config.node.body_read_timeout_ms);
        match tokio::time::timeout(after, Limited::new(req.into_body(), limit).collect()).await {
            Err(_) => Err(GatewayError::BodyTimeout(after)),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(GatewayError::PayloadTooLarge { limit }),
            Ok(Err(e)) => Err(GatewayError::MalformedJson(format!("could not read the request body: {e}"))),
        }
    }

    /// The most relays a request may take in all: this edge's `relay.max_hops`.
    fn max_hops(&self) -> u8 {
        self.config.relay.as_ref().map_or(crate::config::DEFAULT_MAX_HOPS, |c| c.max_hops)
    }

    /// Drives the dispatch core ([`Attempts`]) along the plan: sends each attempt it asks for,
    /// records the outcome in the target's health and the metrics, and hands the typed outcome
    /// back to the core, which decides what happens next. Returns the first answer and its route.
    async fn first_answer<'m, T, F, Fut>(&self, plan: &'m Plan, mut attempt: F) -> Result<(T, &'m Route), GatewayError>
    where
        F: FnMut(&'m Route) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let routes = &plan.model.routes;
        let mut health = LiveHealth(routes);
        let mut attempts = Attempts::new(plan.order.clone(), &health);
        let mut answer = None;
        loop {
            match attempts.next(&mut health) {
                Step::Try(i) => {
                    let route = &routes[i];
                    let started = Instant::now();
                    let outcome = match attempt(route).await {
                        Ok(value) => {
                            answer = Some(value);
                            Ok(())
                        }
                        Err(e) => {
                            warn!(target_name = %route.target.name, error = %e, "upstream attempt failed");
                            Err(e)
                        }
                    };
                    let retry = outcome.as_ref().map_err(UpstreamError::retry).copied();
                    route.target.stats.attempt(Instant::now(), Some(started.elapsed()), retry);
                    let label = outcome.as_ref().map_or_else(UpstreamError::kind, |()| "ok");
                    self.metrics.attempts.with_label_values(&[&route.target.name, label]).inc();
                    attempts.record(i, outcome);
                }
                Step::Answered(i) => {
                    // The core answers only after an attempt recorded as answered, which set it.
                    let lost = || UpstreamError::Protocol { target: routes[i].target.name.clone(), message: "answer lost".into() };
                    return answer.take().map(|value| (value, &routes[i])).ok_or_else(|| lost().into());
                }
                Step::Failed(e) => return Err(e.into()),
            }
        }
    }

    /// A whole answer from the first target that gives one.
    async fn complete<'m>(
        &self,
        req: &ChatRequest,
        plan: &'m Plan,
        dispatch: &Dispatch,
    ) -> Result<(ChatResponse, &'m Route), GatewayError> {
        let max_tokens = plan.model.default_max_tokens;
        self.first_answer(plan, |route| {
            route.target.complete(&self.client, req, &route.upstream_model, max_tokens, dispatch)
        })
        .await
    }

    /// A stream from the first target whose stream gets past its `Start` event (to content, or
    /// to its end). Until then nothing has reached the client, so a target that fails before
    /// any content is skipped for the next one. Returns the events read so far with the rest of
    /// the stream.
    async fn open_stream<'m>(
        &self,
        req: &ChatRequest,
        plan: &'m Plan,
        dispatch: &Dispatch,
    ) -> Result<(EventStream, VecDeque<StreamEvent>, &'m Route), GatewayError> {
        let max_tokens = plan.model.default_max_tokens;
        let ((stream, head), route) = self
            .first_answer(plan, |route| async move {
                let mut s = route.target.stream(&self.client, req, &route.upstream_model, max_tokens, dispatch).await?;
                let mut head = VecDeque::new();
                loop {
                    match s.next().await {
                        Some(Ok(ev)) => {
                            let begun = !matches!(ev, StreamEvent::Start { .. });
                            head.push_back(ev);
                            if begun {
                                return Ok((s, head));
                            }
                        }
                        Some(Err(e)) => return Err(e),
                        None if head.is_empty() => {
                            return Err(UpstreamError::Protocol {
                                target: route.target.name.clone(),
                                message: "empty stream".into(),
                            })
                        }
                        None => return Ok((s, head)),
                    }
                }
            })
            .await?;
        Ok((stream, head, route))
    }
}

/// The live health of a plan's targets, for the dispatch core: ejection and half-open trials as
/// their statistics say now.
struct LiveHealth<'a>(&'a [Route]);

impl Admit for LiveHealth<'_> {
    fn available(&self, i: usize) -> bool {
        self.0[i].target.stats.available(Instant::now())
    }

    fn admit(&mut self, i: usize) -> bool {
        let admitted = self.0[i].target.stats.admit(Instant::now()) != Admission::Skip;
        if !admitted {
            debug!(target_name = %self.0[i].target.name, "target ejected: skipped");
        }
        admitted
    }
}

/// How a request reached this edge: empty for one from a client, else from the relay frame.
#[derive(Debug, Clone, Default)]
struct Via {
    /// Regions it passed through before this one, origin first.
    path: Vec<String>,
    /// Labels given by the filters of the edges before this one.
    labels: Vec<String>,
    /// Whether those filters redacted anything.
    redacted: bool,
}

/// Where a chat request came from.
enum Inbound {
    /// A client, over HTTP.
    Client(Request<Incoming>),
    /// A peer edge, over QUIC.
    Relayed(Box<RelayRequest>),
}

/// A request body, read once the request is admitted.
enum PendingBody {
    Http(Request<Incoming>),
    Ready(Bytes),
}

/// What the client's headers ask of the cache: `cache-control: no-store` or `no-cache`, or
/// `x-meridian-cache: bypass`, keep it out; `x-meridian-cache: force` asks for it.
fn requested_cache(headers: &HeaderMap) -> Option<CacheUse> {
    let no_store = headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|d| matches!(d.trim(), "no-store" | "no-cache")));
    match headers.get("x-meridian-cache").and_then(|v| v.to_str().ok()) {
        _ if no_store => Some(CacheUse::Bypass),
        Some("bypass") => Some(CacheUse::Bypass),
        Some("force") => Some(CacheUse::Lookup),
        _ => None,
    }
}

/// Cacheable under the `auto` policy: the same request gets the same answer.
fn deterministic(req: &ChatRequest) -> bool {
    req.temperature == Some(0.0) || req.seed.is_some()
}

/// The client's `x-request-id` if it is sane, else a new one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string)
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn text_response(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// An error in the client's API shape, with `retry-after` where it helps.
pub fn error_response(api: ApiShape, err: &GatewayError) -> Response<Body> {
    let mut resp = json_response(err.status(), api.error_body(err));
    if let Some(secs) = err.retry_after() {
        resp.headers_mut().insert("retry-after", HeaderValue::from(secs));
    }
    resp
}

fn with_header(mut resp: Response<Body>, name: &'static str, value: &str) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
    resp
}

fn sse_response(stream: ClientStream) -> Response<Body> {
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        s.next_chunk().await.map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), s))
    });
    let mut resp = Response::new(StreamBody::new(body).boxed_unsync());
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Where a client stream's events come from.
enum Source {
    Upstream(Box<EventStream>),
    Replay(std::vec::IntoIter<StreamEvent>),
}

impl Source {
    async fn next(&mut self) -> Option<Result<StreamEvent, UpstreamError>> {
        match self {
            Source::Upstream(s) => s.next().await,
            Source::Replay(events) => events.next().map(Ok),
        }
    }

    /// What [`Source::next`] would return, if it is known without waiting.
    fn ready(&mut self) -> Option<Option<Result<StreamEvent, UpstreamError>>> {
        match self {
            Source::Upstream(s) => s.ready(),
            Source::Replay(events) => Some(events.next().map(Ok)),
        }
    }
}

/// A streamed answer on its way to the client: encodes each event as it arrives, records the
/// events for the cache, and accounts when it ends. A failure after the first byte ends the
/// stream with a typed error event, never a clean end.
struct ClientStream {
    source: Source,
    /// Events read before the response began, sent first.
    head: VecDeque<StreamEvent>,
    encoder: StreamEncoder,
    fill: Option<(FillGuard, Vec<StreamEvent>)>,
    answer_filter: Option<AnswerFilter>,
    record: Record,
    usage: Option<Usage>,
    out_bytes: usize,
    finished: bool,
    _permit: OwnedSemaphorePermit,
}

impl ClientStream {
    fn new(
        source: Source,
        head: VecDeque<StreamEvent>,
        encoder: StreamEncoder,
        fill: Option<FillGuard>,
        record: Record,
        permit: OwnedSemaphorePermit,
        answer_filter: Option<AnswerFilter>,
    ) -> Self {
        ClientStream {
            source,
            head,
            encoder,
            fill: fill.map(|g| (g, Vec::new())),
            answer_filter,
            record,
            usage: None,
            out_bytes: 0,
            finished: false,
            _permit: permit,
        }
    }

    /// The next body chunk: the next event and every event already received behind it, so that
    /// a burst from upstream (or a whole cached replay) goes out in one write. The filters see
    /// the chunk's text before any of it is sent.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        let mut batch = Vec::new();
        let mut next = match self.head.pop_front() {
            Some(ev) => Some(Ok(ev)),
            None => self.source.next().await,
        };
        let end = loop {
            match next {
                Some(Ok(ev)) => batch.push(ev),
                None => break Some(Ok(())),
                Some(Err(e)) => break Some(Err(GatewayError::Upstream(e))),
            }
            next = match self.head.pop_front() {
                Some(ev) => Some(Ok(ev)),
                None => match self.source.ready() {
                    Some(item) => item,
                    None => break None,
                },
            };
        };
        let mut out = BytesMut::new();
        if let Some(filter) = &mut self.answer_filter {
            let text: String = batch
                .iter()
                .filter_map(|e| match e {
                    StreamEvent::Text(t) => Some(t.as_str()),
                    _ => None,
                })
                .collect();
            // Every chunk of this answer goes to the same filter instances, in order.
            if let Err(e) = filter.inspect(&text).await {
                self.fail(e, &mut out);
                return Some(out.freeze());
            }
        }
        for ev in batch {
            self.event(ev, &mut out);
        }
        match end {
            None => {}
            Some(Ok(())) => {
                self.finished = true;
                self.encoder.finish(&mut out);
                if let Some((guard, events)) = self.fill.take() {
                    guard.fill(CachedAnswer::Stream(events)).await;
                }
                self.record.take().finish("ok", self.usage, self.out_bytes);
            }
            Some(Err(e)) => self.fail(e, &mut out),
        }
        Some(out.freeze())
    }

    /// Ends the stream with a typed error event; nothing of it is cached.
    fn fail(&mut self, err: GatewayError, out: &mut BytesMut) {
        self.finished = true;
        warn!(request_id = %self.record.request_id, error = %err, "stream ended early after its first byte");
        self.encoder.error(&err, out);
        self.fill = None;
        let status = if matches!(err, GatewayError::Upstream(_)) { "stream_error" } else { err.code() };
        self.record.take().finish(status, self.usage, self.out_bytes);
    }

    fn event(&mut self, ev: StreamEvent, out: &mut BytesMut) {
        let content = ev.content_len();
        if content > 0 && self.out_bytes == 0 {
            self.record.first_token();
        }
        self.out_bytes += content;
        if let StreamEvent::Usage(u) = ev {
            self.usage = Some(u);
        }
        if let Some((_, events)) = &mut self.fill {
            // Cached as it came from upstream, placeholders and all.
            events.push(ev.clone());
        }
        match &mut self.answer_filter {
            Some(filter) => {
                let mut restored = Vec::with_capacity(1);
                filter.restore_event(ev, &mut restored);
                restored.iter().for_each(|e| self.encoder.event(e, out));
            }
            None => self.encoder.event(&ev, out),
        }
    }
}

/// What one request did, accounted once when it ends — on success, on error, or when the client
/// goes away mid-stream (`client_closed`).
struct Record {
    edge: Option<Arc<Edge>>,
    api: ApiShape,
    request_id: String,
    tenant: Arc<str>,
    model: String,
    target: Option<String>,
    price: Option<PriceModel>,
    prompt_tokens: u32,
    started: Instant,
    first_token: Option<Instant>,
}

impl Record {
    fn new(edge: Arc<Edge>, api: ApiShape, request_id: &str) -> Self {
        edge.metrics.in_flight.inc();
        Record {
            edge: Some(edge),
            api,
            request_id: request_id.to_string(),
            tenant: "unknown".into(),
            model: String::new(),
            target: None,
            price: None,
            prompt_tokens: 0,
            started: Instant::now(),
            first_token: None,
        }
    }

    fn route(&mut self, route: &Route) {
        self.target = Some(route.target.name.clone());
        self.price = route.price;
    }

    fn first_token(&mut self) {
        self.first_token.get_or_insert_with(Instant::now);
    }

    /// Moves the record out, leaving an inert one behind (for paths that hand it on).
    fn take(&mut self) -> Record {
        Record {
            edge: self.edge.take(),
            api: self.api,
            request_id: std::mem::take(&mut self.request_id),
            tenant: Arc::clone(&self.tenant),
            model: std::mem::take(&mut self.model),
            target: self.target.take(),
            price: self.price.take(),
            prompt_tokens: self.prompt_tokens,
            started: self.started,
            first_token: self.first_token,
        }
    }

    fn finish(mut self, status: &str, usage: Option<Usage>, out_bytes: usize) {
        let Some(edge) = self.edge.take() else { return };
        let m = &edge.metrics;
        m.in_flight.dec();
        let model = if self.model.is_empty() { "unknown" } else { self.model.as_str() };
        let target = self.target.as_deref().unwrap_or("none");
        let tenant = &*self.tenant;
        m.requests.with_label_values(&[self.api.name(), tenant, model, target, status]).inc();
        let elapsed = self.started.elapsed();
        if self.target.is_none() {
            return;
        }
        m.duration.with_label_values(&[tenant, model, target]).observe(elapsed.as_secs_f64());
        if let Some(t) = self.first_token {
            m.ttft.with_label_values(&[tenant, model, target]).observe((t - self.started).as_secs_f64());
        }
        let usage = usage.unwrap_or(Usage {
            input_tokens: self.prompt_tokens,
            output_tokens: if out_bytes == 0 { 0 } else { estimate_tokens(out_bytes) },
        });
        m.tokens.with_label_values(&[tenant, model, target, "input"]).inc_by(u64::from(usage.input_tokens));
        m.tokens.with_label_values(&[tenant, model, target, "output"]).inc_by(u64::from(usage.output_tokens));
        let cost = if target == "cache" { 0.0 } else { self.price.map_or(0.0, |p| p.cost(usage, elapsed)) };
        m.cost.with_label_values(&[tenant, model, target]).inc_by(cost);
        debug!(
            request_id = %self.request_id, tenant, model, target, status,
            input_tokens = usage.input_tokens, output_tokens = usage.output_tokens, cost_usd = cost,
            latency_ms = elapsed.as_secs_f64() * 1e3, "request done"
        );
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if self.edge.is_some() {
            let rest = self.take();
            rest.finish("client_closed", None, 0);
        }
    }
}
