//! A router that sends each request to the fastest serving target first.
//!
//! Among the targets the residency rule allows ([`meridian_plugin_sdk::residency_allows`]) and that are not
//! down: healthy before degraded; within each, measured targets by smoothed latency (time to first token
//! when the client streams, since that is what a streaming client waits for), then unmeasured ones in the
//! order given, so a new target gets traffic only as a fallback until the node has measured it. No target
//! left: 503. Takes no configuration (`{}`).

use meridian_plugin_sdk::{decide, export_router, reject, residency_allows, serving};
use meridian_plugin_sdk::{Health, Outcome, RequestSummary, Router, Target};

/// The latency router.
pub struct LatencyRouter;

impl Router for LatencyRouter {
    fn configure(config: &str) -> Result<(), String> {
        meridian_plugin_sdk::expect_empty_config(config)
    }

    fn route(req: RequestSummary, targets: Vec<Target>) -> Outcome {
        route(&req, &targets)
    }
}

/// Orders the allowed, serving targets fastest first.
pub fn route(req: &RequestSummary, targets: &[Target]) -> Outcome {
    let mut order: Vec<&Target> = serving(targets.iter().filter(|t| residency_allows(req, t))).collect();
    if order.is_empty() {
        return reject(503, "no target that may take this request is up");
    }
    // Stable sort: unmeasured targets (and ties) keep the order given.
    order.sort_by(|a, b| {
        let (la, lb) = (latency(req, a), latency(req, b));
        (a.health != Health::Healthy, la.is_none())
            .cmp(&(b.health != Health::Healthy, lb.is_none()))
            .then(la.unwrap_or(0.0).total_cmp(&lb.unwrap_or(0.0)))
    });
    decide(order)
}

/// The latency that matters for this request, in ms; `None` when not measured yet (reported as 0).
fn latency(req: &RequestSummary, t: &Target) -> Option<f64> {
    let ms = if req.streaming { t.ttft_ms } else { t.latency_ms };
    (ms > 0.0).then_some(ms)
}

export_router!(LatencyRouter);

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_plugin_sdk::testing::{rejected, request, routed, target};

    fn timed(name: &str, latency_ms: f64, ttft_ms: f64) -> Target {
        Target { latency_ms, ttft_ms, ..target(name) }
    }

    #[test]
    fn fastest_end_to_end_first_for_whole_answers() {
        let ts = [timed("slow", 900.0, 50.0), timed("fast", 300.0, 200.0), timed("mid", 500.0, 100.0)];
        assert_eq!(routed(&route(&request(), &ts)), Some(vec!["fast", "mid", "slow"]));
    }

    #[test]
    fn fastest_first_token_first_for_streams() {
        let ts = [timed("slow", 900.0, 50.0), timed("fast", 300.0, 200.0), timed("mid", 500.0, 100.0)];
        let req = RequestSummary { streaming: true, ..request() };
        assert_eq!(routed(&route(&req, &ts)), Some(vec!["slow", "mid", "fast"]));
    }

    #[test]
    fn unmeasured_after_measured_in_given_order() {
        let ts = [target("new-a"), timed("measured", 2000.0, 0.0), target("new-b")];
        assert_eq!(routed(&route(&request(), &ts)), Some(vec!["measured", "new-a", "new-b"]));
    }

    #[test]
    fn degraded_after_healthy_and_down_dropped() {
        let ts = [
            Target { health: Health::Degraded, ..timed("degraded-fast", 100.0, 0.0) },
            Target { health: Health::Down, ..timed("down-fastest", 10.0, 0.0) },
            target("healthy-unmeasured"),
            timed("healthy-slow", 800.0, 0.0),
        ];
        let out = route(&request(), &ts);
        assert_eq!(routed(&out), Some(vec!["healthy-slow", "healthy-unmeasured", "degraded-fast"]));
    }

    #[test]
    fn residency_rule_applies() {
        let req =
            RequestSummary { labels: vec!["pii.phone".into()], allowed_regions: vec!["eu-west".into()], ..request() };
        let eu = Target { region: Some("eu-west".into()), ..timed("eu", 900.0, 0.0) };
        let ts = [timed("us-fast", 100.0, 0.0), eu];
        assert_eq!(routed(&route(&req, &ts)), Some(vec!["eu"]));
        // Another value redacted next to the labelled one: the phone number is still in the text.
        let mixed = RequestSummary {
            labels: vec!["pii.email.redacted".into(), "pii.phone".into()],
            redacted: true,
            ..req.clone()
        };
        assert_eq!(routed(&route(&mixed, &ts)), Some(vec!["eu"]));
        // Everything personal redacted: the fastest target, wherever it is.
        let redacted = RequestSummary { labels: vec!["pii.phone.redacted".into()], redacted: true, ..req };
        assert_eq!(routed(&route(&redacted, &ts)), Some(vec!["us-fast", "eu"]));
    }

    #[test]
    fn nothing_serving_is_503() {
        let ts = [Target { health: Health::Down, ..target("down") }];
        assert_eq!(rejected(&route(&request(), &ts)), Some(503));
        assert_eq!(rejected(&route(&request(), &[])), Some(503));
    }

    #[test]
    fn configuration_must_be_empty() {
        assert_eq!(LatencyRouter::configure("{}"), Ok(()));
        let err = LatencyRouter::configure(r#"{"max_latency_ms": 500}"#).unwrap_err();
        assert!(err.contains("max_latency_ms"), "{err}");
    }
}
