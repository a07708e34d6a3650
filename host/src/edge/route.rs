//! Phase 3 of the request path: filters and routing. The tenant's privacy filters see the parsed
//! request first and redact it in place (a filter that fails blocks the request), its router then
//! orders the model's targets (a router that fails is replaced by the static order), and the
//! dispatch core plans the order under the tenant's guarantees ([`Policy`]): whatever the router
//! answered, no target those guarantees exclude is in the plan. See [`crate::chain`].

use std::sync::Arc;
use std::time::Instant;

use super::context::Exchange;
use super::Edge;
use crate::chain::{self, AnswerFilter, Routed};
use crate::dispatch::Policy;
use crate::error::GatewayError;
use crate::routes::{ModelRoute, Plan, Routing};

/// Runs the tenant's chain on the exchange's request for `model`, and returns the plan: the
/// targets to try, in order. Sets the exchange's answer filter, adds this region to its path and
/// the filters' labels to its labels.
pub(super) async fn route(edge: &Edge, cx: &mut Exchange, model: Arc<ModelRoute>) -> Result<Plan, GatewayError> {
    let tenant = &cx.tenant;
    let chain = &tenant.chain;
    let region = &edge.config.node.region;
    let inbound = &mut cx.inbound;
    // What the filters and the router see of the request; the labels and the client's region
    // move into it, and back once the chain has run.
    let mut summary =
        chain::summary(&cx.record.request_id, &tenant.name, chain, region, inbound.client_region.take(), &cx.request);
    summary.labels = std::mem::take(&mut inbound.labels);
    summary.redacted = inbound.redacted;
    let (answer_filter, routed) = if chain.is_empty() {
        (None, Routed { model, routing: Routing::Static, cache: None })
    } else {
        chain::run(chain, &mut summary, &mut cx.request, model, &edge.models).await?
    };
    cx.answer_filter = answer_filter;
    inbound.path.push(region.clone());
    // The host's guarantees hold whatever the router answered, or if it failed.
    let policy = Policy::for_request(&summary, tenant.relay, inbound.path.clone(), edge.max_hops());
    let redactions = cx.answer_filter.as_ref().map_or(0, AnswerFilter::redactions);
    cx.record.routed(&routed.model, &summary.labels, redactions, &routed.routing);
    inbound.client_region = summary.client_region;
    inbound.labels = summary.labels;
    inbound.redacted = summary.redacted;
    Ok(Plan::new(routed.model, &routed.routing, routed.cache, &policy, Instant::now())?)
}
