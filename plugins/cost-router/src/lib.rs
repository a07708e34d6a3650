//! A router that sends each request to the cheapest target first, filling paid-for capacity before buying
//! more.
//!
//! Costs are [`meridian_plugin_sdk::estimated_cost`], except for targets billed per hour (dedicated
//! engines): one whose utilization (`in_flight / capacity`) is below `dedicated_utilization` costs 0 (it
//! is paid for whether busy or not), and one at or above it is ranked by the share of its hourly price the
//! request would occupy, so traffic spills over to per-token and per-second targets before the node is
//! saturated (a full engine queues, which costs latency). Targets without a price model rank last; among
//! equal costs, healthy before degraded, then the order given.
//!
//! Only targets that the residency rule allows and that are not down are considered. A priced target
//! whose estimate exceeds the tenant's `price_cap_usd` is dropped (unpriced ones are kept: the node has
//! no estimate to hold against the cap); if that leaves nothing, the request is refused with 402.
//!
//! Configuration: `{"dedicated_utilization": 0.8}` (the default; between 0 and 1). Unknown keys are
//! refused.

use std::sync::atomic::{AtomicU64, Ordering};

use meridian_plugin_sdk::{decide, estimated_cost, export_router, hourly_share, reject, residency_allows, serving};
use meridian_plugin_sdk::{Outcome, PriceModel, RequestSummary, Router, Target};
use serde::Deserialize;

/// The cost router.
pub struct CostRouter;

/// The plugin's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Utilization of a dedicated target below which it takes requests at marginal cost 0.
    #[serde(default = "default_dedicated_utilization")]
    pub dedicated_utilization: f64,
}

/// Fill dedicated engines to 80% before spilling over, leaving headroom for bursts.
fn default_dedicated_utilization() -> f64 {
    0.8
}

impl Default for Config {
    fn default() -> Self {
        Config { dedicated_utilization: default_dedicated_utilization() }
    }
}

impl Config {
    /// Parses and validates the JSON configuration; empty text means the defaults.
    pub fn parse(config: &str) -> Result<Config, String> {
        if config.trim().is_empty() {
            return Ok(Config::default());
        }
        let parsed: Config = serde_json::from_str(config).map_err(|e| format!("cost-router configuration: {e}"))?;
        if !(0.0..=1.0).contains(&parsed.dedicated_utilization) {
            return Err(format!(
                "cost-router configuration: dedicated_utilization must be between 0 and 1, got {}",
                parsed.dedicated_utilization
            ));
        }
        Ok(parsed)
    }
}

/// The configured `dedicated_utilization`, as f64 bits. The host configures each fresh instance before
/// routing, and an instance serves one request at a time, so a plain atomic is all the state needed.
static DEDICATED_UTILIZATION: AtomicU64 = AtomicU64::new(0.8f64.to_bits());

impl Router for CostRouter {
    fn configure(config: &str) -> Result<(), String> {
        let config = Config::parse(config)?;
        DEDICATED_UTILIZATION.store(config.dedicated_utilization.to_bits(), Ordering::Relaxed);
        Ok(())
    }

    fn route(req: RequestSummary, targets: Vec<Target>) -> Outcome {
        let config = Config { dedicated_utilization: f64::from_bits(DEDICATED_UTILIZATION.load(Ordering::Relaxed)) };
        route(&config, &req, &targets)
    }
}

/// Orders the allowed, serving targets within the price cap, cheapest first.
pub fn route(config: &Config, req: &RequestSummary, targets: &[Target]) -> Outcome {
    let candidates: Vec<(&Target, Option<f64>)> = serving(targets.iter().filter(|t| residency_allows(req, t)))
        .map(|t| (t, marginal_cost(config, req, t)))
        .collect();
    if candidates.is_empty() {
        return reject(503, "no target that may take this request is up");
    }
    let cap = req.price_cap_usd.unwrap_or(f64::INFINITY);
    let (mut order, over_cap): (Vec<_>, Vec<_>) =
        candidates.into_iter().partition(|(_, cost)| cost.is_none_or(|c| c <= cap));
    if order.is_empty() {
        let cheapest = over_cap.iter().filter_map(|(_, c)| *c).fold(f64::INFINITY, f64::min);
        return reject(
            402,
            format!(
                "no target can serve this request within the price cap of ${cap:.6} (the cheapest would cost ${cheapest:.6})"
            ),
        );
    }
    // Stable sort: equal costs keep healthy before degraded (from `serving`), then the order given.
    order.sort_by(|(_, a), (_, b)| a.is_none().cmp(&b.is_none()).then(a.unwrap_or(0.0).total_cmp(&b.unwrap_or(0.0))));
    decide(order.into_iter().map(|(t, _)| t))
}

/// The cost the router ranks `t` by: [`estimated_cost`], except that a dedicated (per-hour) target is
/// free only below the configured utilization, not all the way up to its capacity.
pub fn marginal_cost(config: &Config, req: &RequestSummary, t: &Target) -> Option<f64> {
    match t.price {
        Some(PriceModel::Hour(p)) => {
            let utilization = f64::from(t.in_flight) / f64::from(p.capacity.max(1));
            Some(if utilization < config.dedicated_utilization { 0.0 } else { hourly_share(req, t, p) })
        }
        _ => estimated_cost(req, t),
    }
}

export_router!(CostRouter);

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_plugin_sdk::testing::{priced, rejected, request, routed, target};
    use meridian_plugin_sdk::{Health, HourPrice, TokenPrice};

    fn managed(name: &str, input: f64, output: f64) -> Target {
        priced(name, PriceModel::Token(TokenPrice { input_usd_per_mtok: input, output_usd_per_mtok: output }))
    }

    /// A dedicated engine at $3.60/hour with 10 slots, 1 s per request.
    fn dedicated(name: &str, in_flight: u32) -> Target {
        let price = PriceModel::Hour(HourPrice { usd_per_hour: 3.6, capacity: 10 });
        Target { in_flight, latency_ms: 1000.0, ..priced(name, price) }
    }

    fn order(out: &Outcome) -> Vec<&str> {
        routed(out).expect("a route")
    }

    #[test]
    fn cheapest_first_and_unpriced_last() {
        let ts = [target("unpriced"), managed("dear", 3.0, 15.0), managed("cheap", 0.1, 0.4)];
        let out = route(&Config::default(), &request(), &ts);
        assert_eq!(order(&out), ["cheap", "dear", "unpriced"]);
    }

    #[test]
    fn dedicated_below_threshold_goes_first_and_spills_over_above_it() {
        // Hourly share: 1 s × $3.6/h / 3600 / 10 = $0.0001; "cheap" costs 1000×0.1/M + 256×0.4/M ≈ $0.0002.
        let ts = [managed("cheap", 0.1, 0.4), managed("dear", 3.0, 15.0), dedicated("engine", 7)];
        let out = route(&Config::default(), &request(), &ts);
        assert_eq!(order(&out), ["engine", "cheap", "dear"]);
        // At 8/10 the engine is at the threshold: ranked by its hourly share, still below "cheap".
        let ts = [managed("cheap", 0.1, 0.4), dedicated("engine", 8)];
        let busy = marginal_cost(&Config::default(), &request(), &ts[1]).unwrap();
        assert!((busy - 0.0001).abs() < 1e-12);
        let out = route(&Config::default(), &request(), &ts);
        assert_eq!(order(&out), ["engine", "cheap"]);
        // A free, unsaturated engine beats a busy one.
        let ts = [dedicated("busy", 9), dedicated("idle", 2)];
        let out = route(&Config::default(), &request(), &ts);
        assert_eq!(order(&out), ["idle", "busy"]);
    }

    #[test]
    fn busy_dedicated_spills_over_to_a_cheaper_per_token_target() {
        let config = Config { dedicated_utilization: 0.5 };
        // A pricier engine: $36/hour over 2 slots, 1 s = $0.005 per request when busy.
        let price = PriceModel::Hour(HourPrice { usd_per_hour: 36.0, capacity: 2 });
        let engine = Target { in_flight: 1, latency_ms: 1000.0, ..priced("engine", price) };
        let ts = [engine.clone(), managed("cheap", 0.1, 0.4)];
        assert_eq!(order(&route(&config, &request(), &ts)), ["cheap", "engine"]);
        let idle = [Target { in_flight: 0, ..engine }, managed("cheap", 0.1, 0.4)];
        assert_eq!(order(&route(&config, &request(), &idle)), ["engine", "cheap"]);
    }

    #[test]
    fn equal_costs_put_healthy_before_degraded() {
        let ts = [Target { health: Health::Degraded, ..dedicated("a", 0) }, dedicated("b", 0)];
        assert_eq!(order(&route(&Config::default(), &request(), &ts)), ["b", "a"]);
    }

    #[test]
    fn price_cap_drops_dearer_targets_and_refuses_402_when_none_fit() {
        let req = RequestSummary { price_cap_usd: Some(0.001), ..request() };
        let ts = [managed("dear", 3.0, 15.0), managed("cheap", 0.1, 0.4), target("unpriced")];
        assert_eq!(order(&route(&Config::default(), &req, &ts)), ["cheap", "unpriced"]);
        let out = route(&Config::default(), &req, &[managed("dear", 3.0, 15.0)]);
        assert_eq!(rejected(&out), Some(402));
        let Outcome::Reject(r) = out else { unreachable!() };
        assert!(r.reason.contains("price cap of $0.001000"), "{}", r.reason);
    }

    #[test]
    fn residency_rule_and_health_apply() {
        let req =
            RequestSummary { labels: vec!["pii.email".into()], allowed_regions: vec!["eu-west".into()], ..request() };
        let eu = Target { region: Some("eu-west".into()), ..managed("eu", 3.0, 15.0) };
        let down = Target { health: Health::Down, ..managed("down", 0.0, 0.0) };
        let ts = [managed("us-cheap", 0.1, 0.4), eu, down];
        assert_eq!(order(&route(&Config::default(), &req, &ts)), ["eu"]);
        assert_eq!(rejected(&route(&Config::default(), &req, &[managed("us", 0.1, 0.4)])), Some(503));
        // Another value redacted next to the labelled one: the e-mail address is still in the text.
        let mixed = RequestSummary {
            labels: vec!["pii.email".into(), "pii.phone.redacted".into()],
            redacted: true,
            ..req.clone()
        };
        assert_eq!(order(&route(&Config::default(), &mixed, &ts)), ["eu"]);
        // Everything personal redacted: the cheapest healthy target, wherever it is.
        let redacted = RequestSummary { labels: vec!["pii.email.redacted".into()], redacted: true, ..req };
        assert_eq!(order(&route(&Config::default(), &redacted, &ts)), ["us-cheap", "eu"]);
    }

    #[test]
    fn configuration_defaults_validates_and_refuses_unknown_keys() {
        assert_eq!(Config::parse(""), Ok(Config::default()));
        assert_eq!(Config::parse("{}"), Ok(Config { dedicated_utilization: 0.8 }));
        assert_eq!(Config::parse(r#"{"dedicated_utilization": 0.5}"#), Ok(Config { dedicated_utilization: 0.5 }));
        let err = Config::parse(r#"{"dedicated_utilisation": 0.5}"#).unwrap_err();
        assert!(err.contains("unknown field `dedicated_utilisation`"), "{err}");
        assert!(Config::parse(r#"{"dedicated_utilization": 1.5}"#).unwrap_err().contains("between 0 and 1"));
    }
}
