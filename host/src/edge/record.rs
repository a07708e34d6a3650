//! The last phase of the request path: accounting. A [`Record`] starts when a chat request
//! arrives and is finished exactly once: when the answer ends (whole, or the stream's last
//! event), when the request is refused or fails, or, if neither happened, when it is dropped
//! because the client went away (`client_closed`). The edge's in-flight gauge is raised for
//! exactly the records not yet finished.

use std::sync::Arc;
use std::time::Instant;

use hyper::Response;
use tracing::{debug, warn};

use super::respond::error_response;
use super::{Body, Edge};
use crate::accounting::PriceModel;
use crate::api::ApiShape;
use crate::chat::{estimate_tokens, Usage};
use crate::error::GatewayError;
use crate::routes::Route;

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
    /// What a request costs at that target.
    price: Option<PriceModel>,
    /// The prompt's estimated tokens, for a target that reports no usage.
    pub prompt_tokens: u32,
    started: Instant,
    first_token: Option<Instant>,
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
            price: None,
            prompt_tokens: 0,
            started: Instant::now(),
            first_token: None,
        }
    }

    /// The target (and its price) that answers the request.
    pub fn route(&mut self, route: &Route) {
        self.target = Some(route.target.name.clone());
        self.price = route.price;
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
        let model = if self.model.is_empty() { "unknown" } else { self.model.as_str() };
        let target = self.target.as_deref().unwrap_or("none");
        let tenant = &*self.tenant;
        m.requests.with_label_values(&[self.api.name(), tenant, model, target, status]).inc();
        let elapsed = self.started.elapsed();
        // A request that reached no target cost nothing, and its latency says nothing of one.
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

    /// Accounts a request that ends with `err` instead of an answer.
    pub fn refused(&mut self, err: &GatewayError) {
        if matches!(err, GatewayError::Upstream(_)) {
            warn!(request_id = %self.request_id, tenant = %self.tenant, model = %self.model, error = %err,
                "request failed upstream");
        } else {
            debug!(request_id = %self.request_id, error = %err, "request refused");
        }
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
