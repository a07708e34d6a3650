//! The last phase of the request path: accounting. A [`Record`] starts when a chat request
//! arrives and is finished exactly once: when the answer ends (whole, or the stream's last
//! event), when the request is refused or fails, or, if neither happened, when it is dropped
//! because the client went away (`client_closed`). The edge's in-flight gauge is raised for
//! exactly the records not yet finished.
//!
//! A finished record is counted in the metrics and becomes one ledger entry
//! ([`crate::ledger`]) with the same tokens and cost, so the ledger's sums are the counters'.

use std::sync::Arc;
use std::time::Instant;

use hyper::Response;
use tracing::{debug, warn};

use super::respond::error_response;
use super::trace::Trace;
use super::{Body, Edge};
use crate::accounting::PriceModel;
use crate::api::ApiShape;
use crate::chat::{estimate_tokens, Usage};
use crate::error::GatewayError;
use crate::ledger::{now_ms, AttemptRecord, LedgerEntry, TokenSource};
use crate::metrics::Metrics;
use crate::routes::{ModelRoute, Route, Routing};
use crate::upstream::Target;

/// The status of a request whose client went away before any answer (nginx's convention).
const CLIENT_CLOSED: u16 = 499;

/// What one request did, accounted once when it ends. Its labels are the request's identity:
/// API shape, request id, tenant and model.
pub(super) struct Record {
    /// Until the record is finished.
    edge: Option<Arc<Edge>>,
    /// The shape the client spoke.
    pub api: ApiShape,
    /// The request's id.
    pub request_id: String,
    /// The tenant's name; `unknown` until admission.
    pub tenant: Arc<str>,
    /// The model the client asked for; empty until parsed.
    pub model: String,
    /// The target that answered (`cache` for a hit).
    pub target: Option<String>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The prompt's estimated tokens, for a target that reports no usage.
    pub prompt_tokens: u32,
    /// The budget held for the request, settled with what it cost.
    pub hold: Option<crate::budget::Hold>,
    /// Every attempt at a target, in order.
    pub attempts: Vec<AttemptRecord>,
    /// The filters' labels and how many values they redacted, and what ordered the targets.
    facts: Option<RouteFacts>,
    /// The target that answers, from when it was sent the request.
    answered: Option<Answered>,
    arrived_ms: i64,
    started: Instant,
    first_token: Option<Instant>,
    /// The status the client got, once refused.
    http_status: Option<u16>,
    /// Its place in a distributed trace; the request's own span ends with the record.
    pub trace: Trace,
}

/// What the route phase learned.
struct RouteFacts {
    model: Arc<ModelRoute>,
    labels: Vec<String>,
    redactions: u32,
    router: String,
}

/// The target that answered and what its bill depends on.
struct Answered {
    target: Arc<Target>,
    served_model: String,
    price: Option<PriceModel>,
    /// When the answering attempt was sent: the target's busy time runs from here to the last
    /// byte.
    sent: Instant,
    /// Whether the attempt found a scale-to-zero target idle past its limit (a cold start).
    cold: bool,
}

impl Record {
    /// Starts the record of a request that just arrived.
    pub fn new(edge: Arc<Edge>, api: ApiShape, request_id: String) -> Self {
        edge.metrics.in_flight.inc();
        Record {
            edge: Some(edge),
            api,
            request_id,
            tenant: "unknown".into(),
            model: String::new(),
            target: None,
            stream: false,
            prompt_tokens: 0,
            hold: None,
            attempts: Vec::new(),
            facts: None,
            answered: None,
            arrived_ms: now_ms(),
            started: Instant::now(),
            first_token: None,
            http_status: None,
            trace: Trace::Off(None),
        }
    }

    /// What the route phase decided: the model served, the filters' labels and redactions, and
    /// what ordered its targets.
    pub fn routed(&mut self, model: &Arc<ModelRoute>, labels: &[String], redactions: usize, routing: &Routing) {
        let router = match routing {
            Routing::Static => "static".to_string(),
            Routing::Order(names) => format!("router:{}", names.join(",")),
            Routing::Failed(why) => format!("router_failed:{why}"),
        };
        self.facts = Some(RouteFacts {
            model: Arc::clone(model),
            labels: labels.to_vec(),
            redactions: u32::try_from(redactions).unwrap_or(u32::MAX),
            router,
        });
    }

    /// The target (and its price) that answers the request, sent its request at `sent`; `cold`
    /// when that found it scaled to zero.
    pub fn route(&mut self, route: &Route, sent: Instant, cold: bool) {
        self.target = Some(route.target.name.clone());
        self.answered = Some(Answered {
            target: Arc::clone(&route.target),
            served_model: route.upstream_model.clone(),
            price: route.price,
            sent,
            cold,
        });
    }

    /// The first token of the answer was sent (time to first token).
    pub fn first_token(&mut self) {
        self.first_token.get_or_insert_with(Instant::now);
    }

    /// Accounts the request as ended with `status` (`ok`, an error's code, `stream_error`,
    /// `client_closed`). Only the first call counts; later ones do nothing.
    pub fn finish(&mut self, status: &str, usage: Option<Usage>, out_bytes: usize) {
        let Some(edge) = self.edge.take() else { return };
        let m = &edge.metrics;
        m.in_flight.dec();
        let model = Metrics::model_label(&self.model, edge.models.contains_key(&self.model));
        let target = self.target.as_deref().unwrap_or("none");
        let tenant = &*self.tenant;
        m.requests.with_label_values(&[self.api.name(), tenant, model, target, status]).inc();
        let now = Instant::now();
        let elapsed = now - self.started;
        let http_status = match (status, self.http_status) {
            (_, Some(refused)) => refused,
            ("client_closed", None) if self.first_token.is_none() => CLIENT_CLOSED,
            _ => 200,
        };
        // A request that reached no target cost nothing, and its latency says nothing of one.
        let (usage, source, cost, busy) = if self.target.is_none() {
            (Usage::default(), TokenSource::None, 0.0, None)
        } else {
            m.duration.with_label_values(&[tenant, model, target]).observe(elapsed.as_secs_f64());
            if let Some(t) = self.first_token {
                m.ttft.with_label_values(&[tenant, model, target]).observe((t - self.started).as_secs_f64());
            }
            let source = if usage.is_some() { TokenSource::Upstream } else { TokenSource::Estimate };
            let usage = usage.unwrap_or(Usage {
                input_tokens: self.prompt_tokens,
                output_tokens: if out_bytes == 0 { 0 } else { estimate_tokens(out_bytes) },
                ..Default::default()
            });
            m.tokens.with_label_values(&[tenant, model, target, "input"]).inc_by(u64::from(usage.input_tokens));
            m.tokens.with_label_values(&[tenant, model, target, "output"]).inc_by(u64::from(usage.output_tokens));
            // A cache hit has no `answered` target: it cost nothing.
            let (cost, busy) = match &self.answered {
                Some(a) => {
                    let busy = now - a.sent;
                    if a.price.is_some_and(|p| p.scale_to_zero_after().is_some()) {
                        a.target.touch(now);
                    }
                    (a.price.map_or(0.0, |p| p.billed(usage, busy, a.cold)), Some(busy))
                }
                None => (0.0, None),
            };
            m.cost.with_label_values(&[tenant, model, target]).inc_by(cost);
            debug!(
                request_id = %self.request_id, tenant, model, target, status,
                input_tokens = usage.input_tokens, output_tokens = usage.output_tokens, cost_usd = cost,
                latency_ms = elapsed.as_secs_f64() * 1e3, "request done"
            );
            (usage, source, cost, busy)
        };
        if matches!(self.trace, Trace::On(_)) {
            let attributes = vec![
                ("meridian.request_id", self.request_id.clone()),
                ("meridian.tenant", tenant.to_string()),
                ("meridian.model", model.to_string()),
                ("meridian.target", target.to_string()),
                ("meridian.status", status.to_string()),
                ("http.response.status_code", http_status.to_string()),
            ];
            let error = (status != "ok").then(|| status.to_string());
            self.trace.finish(format!("chat {}", self.api.name()), attributes, error);
        }
        let tokens = u64::from(usage.input_tokens) + u64::from(usage.output_tokens);
        if let Some(hold) = self.hold.take() {
            hold.settle(tokens, cost);
        }
        if let Some(ledger) = &edge.ledger {
            ledger.record(self.entry(status, http_status, usage, source, cost, busy));
        }
    }

    /// The ledger's entry for the finished request, moving out what the record no longer needs.
    fn entry(
        &mut self,
        status: &str,
        http_status: u16,
        usage: Usage,
        token_source: TokenSource,
        cost_usd: f64,
        busy: Option<std::time::Duration>,
    ) -> LedgerEntry {
        let facts = self.facts.take();
        let answered = self.answered.take();
        // What the same request would have cost on each other target of the model, for the
        // same tokens and busy time (a dedicated target at full use: its share of the hour).
        let counterfactual = match (&facts, busy) {
            (Some(f), Some(busy)) => f
                .model
                .routes
                .iter()
                .filter(|r| Some(&r.target.name) != self.target.as_ref())
                .filter_map(|r| r.price.map(|p| (r.target.name.clone(), p.cost(usage, busy))))
                .collect(),
            _ => Vec::new(),
        };
        let (labels, redactions, router) = match facts {
            Some(f) => (f.labels, f.redactions, Some(f.router)),
            None => (Vec::new(), 0, None),
        };
        LedgerEntry {
            ts_ms: self.arrived_ms,
            request_id: std::mem::take(&mut self.request_id),
            tenant: self.tenant.to_string(),
            api: self.api.name().to_string(),
            model: std::mem::take(&mut self.model),
            served_model: answered.map(|a| a.served_model),
            attempts: std::mem::take(&mut self.attempts),
            cache_hit: self.target.as_deref() == Some("cache"),
            target: self.target.take(),
            stream: self.stream,
            input_tokens: u64::from(usage.input_tokens),
            output_tokens: u64::from(usage.output_tokens),
            cache_read_tokens: u64::from(usage.cache_read_tokens),
            cache_write_tokens: u64::from(usage.cache_write_tokens),
            token_source,
            ttft_ms: self.first_token.map(|t| (t - self.started).as_secs_f64() * 1e3),
            busy_ms: busy.map(|b| b.as_secs_f64() * 1e3),
            redactions,
            labels,
            router,
            status: status.to_string(),
            http_status,
            cost_usd,
            counterfactual,
        }
    }

    /// Accounts a request that ends with `err` instead of an answer.
    pub fn refused(&mut self, err: &GatewayError) {
        if matches!(err, GatewayError::Upstream(_)) {
            warn!(request_id = %self.request_id, tenant = %self.tenant, model = %self.model, error = %err,
                "request failed upstream");
        } else {
            debug!(request_id = %self.request_id, error = %err, "request refused");
        }
        self.http_status = Some(err.status().as_u16());
        self.finish(err.code(), None, 0);
    }

    /// Accounts a request that ends with `err` instead of an answer, and answers it in the
    /// client's shape.
    pub fn refuse(mut self, err: GatewayError) -> Response<Body> {
        self.refused(&err);
        error_response(self.api, &err)
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        // Neither answered nor refused: the client went away first (mid-stream, or while the
        // request waited on its body or a target).
        self.finish("client_closed", None, 0);
    }
}
