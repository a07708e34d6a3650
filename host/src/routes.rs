//! The routing table: each client-facing model with its targets in static order, and the plan of
//! one request (the targets it may go to, in order). What a router and the dispatch core see of a
//! target is computed here, once, from its config and live statistics.

use std::sync::Arc;
use std::time::Instant;

use crate::accounting;
use crate::config::{TargetApi, TargetKind};
use crate::dispatch::{self, Candidate, Policy, Protocol, Refusal, RouterAnswer};
use crate::plugin::{self, CachePolicy, Health, HourPrice, PriceModel, TokenPrice};
use crate::stats::{HealthState, Snapshot};
use crate::upstream::Target;

/// One target of a model, with the model's name and price there.
#[derive(Debug)]
pub struct Route {
    /// The target.
    pub target: Arc<Target>,
    /// The model's name at the target.
    pub upstream_model: String,
    /// What a request costs there.
    pub price: Option<accounting::PriceModel>,
}

/// A client-facing model and its targets in fallback order.
#[derive(Debug)]
pub struct ModelRoute {
    /// The name clients send.
    pub name: String,
    /// Output limit for upstreams that need one.
    pub default_max_tokens: u32,
    /// Targets, primary first.
    pub routes: Vec<Route>,
}

impl ModelRoute {
    /// What a router gets of this model's targets for a request at `now`: each target as
    /// [`router_view`] makes it, and how many of the request's prompt tokens it holds in its
    /// prefix cache ([`held_tokens`]), in target order. `conversation` (the request's
    /// conversation beginnings, `crate::api::engine::conversation`) is called only when a target
    /// reports what its cache holds.
    pub fn router_inputs(
        &self,
        conversation: impl FnOnce() -> Vec<u64>,
        now: Instant,
    ) -> (Vec<plugin::Target>, Vec<u32>) {
        let snapshots: Vec<Snapshot> = self.routes.iter().map(|r| r.target.stats.snapshot(now)).collect();
        let targets = self.routes.iter().zip(&snapshots).map(|(r, s)| router_view(&r.facts(), s)).collect();
        let mut conversation = Some(conversation);
        let mut hashes: Option<Vec<u64>> = None;
        let held = self
            .routes
            .iter()
            .zip(&snapshots)
            .map(|(r, s)| {
                if s.engine.as_ref().is_none_or(|e| e.prefixes.is_empty()) {
                    return 0;
                }
                let hashes = hashes.get_or_insert_with(|| conversation.take().map_or_else(Vec::new, |f| f()));
                held_tokens(s, &r.upstream_model, hashes)
            })
            .collect();
        (targets, held)
    }
}

/// How many prompt tokens of a request for `model` (its conversation beginnings:
/// `conversation`) a target's engine holds in its prefix cache, as it last reported; 0 when it
/// holds none of them or reports nothing. The edge and the simulation both ask here.
pub fn held_tokens(stats: &Snapshot, model: &str, conversation: &[u64]) -> u32 {
    stats.engine.as_ref().map_or(0, |e| e.prefixes.matched(model, conversation))
}

impl Route {
    /// What is configured of the target, with the model's name and price there.
    pub fn facts(&self) -> TargetFacts<'_> {
        let t = &self.target;
        TargetFacts {
            name: &t.name,
            kind: t.kind,
            region: t.region.as_deref(),
            own_infrastructure: t.own_infrastructure,
            model: &self.upstream_model,
            price: self.price,
        }
    }

    /// The target as the dispatch core sees it at `now`.
    pub fn candidate(&self, now: Instant) -> Candidate {
        let protocol = match self.target.api() {
            TargetApi::Openai | TargetApi::Anthropic => Protocol::Managed,
            TargetApi::Engine => Protocol::Engine,
            TargetApi::Edge => Protocol::PeerEdge,
        };
        candidate(&self.facts(), protocol, &self.target.stats.snapshot(now))
    }
}

/// What is configured of a target, for [`router_view`].
#[derive(Debug, Clone, Copy)]
pub struct TargetFacts<'a> {
    /// Its name.
    pub name: &'a str,
    /// How its capacity is bought.
    pub kind: TargetKind,
    /// Its region.
    pub region: Option<&'a str>,
    /// Whether it runs on the operator's own infrastructure.
    pub own_infrastructure: bool,
    /// The model's name there.
    pub model: &'a str,
    /// Its price model.
    pub price: Option<accounting::PriceModel>,
}

/// A target as the dispatch core sees it, with its live statistics: the edge and the simulation
/// both build candidates here.
pub fn candidate(t: &TargetFacts<'_>, protocol: Protocol, stats: &Snapshot) -> Candidate {
    Candidate {
        name: t.name.to_string(),
        protocol,
        region: t.region.map(str::to_string),
        own_infrastructure: t.own_infrastructure,
        price: t.price,
        latency_ms: stats.latency_ms.unwrap_or(0.0),
        in_flight: stats.in_flight,
    }
}

/// A target as the router sees it, with its live statistics: health (half-open is reported
/// degraded, ejected down), smoothed latencies (0 until measured), requests in flight, and the
/// capacity its engine reports, else its price model's. The edge, `meridian plugin run` and the
/// simulation all build routers' inputs here.
pub fn router_view(t: &TargetFacts<'_>, stats: &Snapshot) -> plugin::Target {
    let capacity = match (stats.engine.as_ref().map(|e| e.max_batch), t.price) {
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
        name: t.name.to_string(),
        kind: match t.kind {
            TargetKind::Managed => plugin::TargetKind::Managed,
            TargetKind::Serverless => plugin::TargetKind::Serverless,
            TargetKind::Dedicated => plugin::TargetKind::Dedicated,
            TargetKind::RemoteEdge => plugin::TargetKind::RemoteEdge,
        },
        region: t.region.map(str::to_string),
        own_infrastructure: t.own_infrastructure,
        model: t.model.to_string(),
        price: t.price.map(PriceModel::from),
        health,
        latency_ms: stats.latency_ms.unwrap_or(0.0),
        ttft_ms: stats.ttft_ms.unwrap_or(0.0),
        in_flight: stats.in_flight,
        capacity,
    }
}

impl From<accounting::PriceModel> for PriceModel {
    fn from(p: accounting::PriceModel) -> PriceModel {
        match p {
            accounting::PriceModel::Token { input_usd_per_mtok, output_usd_per_mtok, .. } => {
                PriceModel::Token(TokenPrice { input_usd_per_mtok, output_usd_per_mtok })
            }
            accounting::PriceModel::GpuSecond { usd_per_second, .. } => PriceModel::GpuSecond(usd_per_second),
            accounting::PriceModel::Hour { usd_per_hour, capacity } => {
                PriceModel::Hour(HourPrice { usd_per_hour, capacity })
            }
        }
    }
}

/// What the tenant's router said of a request (see [`RouterAnswer`]), owned.
#[derive(Debug, Clone, PartialEq)]
pub enum Routing {
    /// No router: the static order.
    Static,
    /// The router's order, by target name.
    Order(Vec<String>),
    /// The router failed, and why.
    Failed(String),
}

impl Routing {
    /// As the dispatch core takes it.
    pub fn answer(&self) -> RouterAnswer<'_> {
        match self {
            Routing::Static => RouterAnswer::Static,
            Routing::Order(names) => RouterAnswer::Order(names),
            Routing::Failed(reason) => RouterAnswer::Failed(reason),
        }
    }
}

/// Where a request goes: the targets of a model to try, in order, and the router's cache policy.
pub struct Plan {
    /// The model whose targets these are (a router may rewrite the model).
    pub model: Arc<ModelRoute>,
    /// Indices into `model.routes`, in the order to try them; never empty.
    pub order: Vec<usize>,
    /// The router's cache policy, if it set one.
    pub cache: Option<CachePolicy>,
}

impl Plan {
    /// The plan for `model` under the router's answer and the tenant's policy, checked by the
    /// dispatch core at `now` (see [`dispatch::plan`]).
    pub fn new(
        model: Arc<ModelRoute>,
        routing: &Routing,
        cache: Option<CachePolicy>,
        policy: &Policy,
        now: Instant,
    ) -> Result<Plan, Refusal> {
        let candidates: Vec<Candidate> = model.routes.iter().map(|r| r.candidate(now)).collect();
        let order = dispatch::plan(&candidates, policy, routing.answer())?;
        Ok(Plan { model, order, cache })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::Config;

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

    fn view(r: &Route) -> plugin::Target {
        router_view(&r.facts(), &r.target.stats.snapshot(Instant::now()))
    }

    #[test]
    fn routers_see_the_live_stats() {
        let r = route();
        let t = view(&r);
        assert_eq!((t.health, t.latency_ms, t.ttft_ms, t.in_flight), (Health::Healthy, 0.0, 0.0, 0));
        assert_eq!(t.capacity, Some(8), "the price model's capacity until an engine reports one");

        let stats = &r.target.stats;
        stats.success(Some(Duration::from_millis(120)));
        stats.ttft(Duration::from_millis(40));
        let _busy = stats.start();
        let t = view(&r);
        assert_eq!((t.latency_ms, t.ttft_ms, t.in_flight), (120.0, 40.0, 1));

        let load = crate::stats::EngineLoad {
            provider: "cpu".into(),
            tokens_per_second: 0.0,
            queue_depth: 0,
            active_sequences: 1,
            max_batch: 4,
            ..Default::default()
        };
        stats.probe(Instant::now(), Some((load, None)));
        assert_eq!(view(&r).capacity, Some(4), "the engine's own figure wins");

        stats.failure(Instant::now());
        assert_eq!(view(&r).health, Health::Degraded);
        stats.failure(Instant::now());
        assert_eq!(view(&r).health, Health::Down, "ejected");
    }

    #[test]
    fn routers_get_what_each_engine_holds_of_the_request_and_no_hashing_without_reports() {
        let r = route();
        let model = ModelRoute { name: "m".into(), default_max_tokens: 16, routes: vec![r] };
        let hashed = std::cell::Cell::new(0);
        let conversation = || {
            hashed.set(hashed.get() + 1);
            vec![10, 20, 30]
        };
        let (targets, held) = model.router_inputs(conversation, Instant::now());
        assert_eq!((targets.len(), held, hashed.get()), (1, vec![0], 0), "nothing reported: nothing hashed");

        let listed = [("m".to_string(), vec![(10, 300), (20, 420), (99, 999)])];
        let load = crate::stats::EngineLoad {
            max_batch: 4,
            prefixes: Arc::new(crate::stats::HeldPrefixes::new(listed)),
            ..Default::default()
        };
        model.routes[0].target.stats.probe(Instant::now(), Some((load, None)));
        let (_, held) = model.router_inputs(conversation, Instant::now());
        assert_eq!((held, hashed.get()), (vec![420], 1), "the longest beginning it holds");
    }
}
