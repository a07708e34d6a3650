//! {{name}}: a Meridian router that sends each request to the cheapest healthy target first.
//!
//! Targets that are degraded or down are left out; among the healthy ones, the one with the lowest
//! estimated cost for this request comes first, and targets without a price come last in the order
//! given. No healthy target at all: 503. Takes no configuration (`{}`).

use meridian_plugin_sdk::{decide, estimated_cost, export_router, healthy};
use meridian_plugin_sdk::{Outcome, RequestSummary, Router, Target};

/// The router.
pub struct Plugin;

impl Router for Plugin {
    fn configure(config: &str) -> Result<(), String> {
        meridian_plugin_sdk::expect_empty_config(config)
    }

    fn route(req: RequestSummary, targets: Vec<Target>) -> Outcome {
        let mut order: Vec<&Target> = healthy(&targets).collect();
        // Stable sort: equal costs, and unpriced targets (infinitely expensive), keep the order given.
        order.sort_by(|a, b| cost(&req, a).total_cmp(&cost(&req, b)));
        decide(order)
    }
}

/// The estimated cost of sending `req` to `t` in USD; a target without a price sorts last.
fn cost(req: &RequestSummary, t: &Target) -> f64 {
    estimated_cost(req, t).unwrap_or(f64::INFINITY)
}

export_router!(Plugin);
