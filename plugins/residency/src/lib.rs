//! A router that applies only the data-residency rule ([`meridian_plugin_sdk::residency_allows`]): requests
//! with unredacted personal data (a `pii.*` label without the `.redacted` suffix, see
//! [`meridian_plugin_sdk::carries_unredacted_pii`]) go only to the tenant's own infrastructure or to allowed
//! regions; everything else keeps the order given. Put it in front of nothing else when residency is the only policy; the
//! latency and cost routers apply the same rule themselves. Takes no configuration (`{}`).

use meridian_plugin_sdk::{carries_unredacted_pii, decide, export_router, reject, residency_allows};
use meridian_plugin_sdk::{Outcome, RequestSummary, Router, Target};

/// The residency router.
pub struct Residency;

impl Router for Residency {
    fn configure(config: &str) -> Result<(), String> {
        meridian_plugin_sdk::expect_empty_config(config)
    }

    fn route(req: RequestSummary, targets: Vec<Target>) -> Outcome {
        route(&req, &targets)
    }
}

/// Keeps the targets the residency rule allows, in the order given.
pub fn route(req: &RequestSummary, targets: &[Target]) -> Outcome {
    let allowed: Vec<&Target> = targets.iter().filter(|t| residency_allows(req, t)).collect();
    if allowed.is_empty() && carries_unredacted_pii(req) {
        return reject(451, UNAVAILABLE);
    }
    decide(allowed)
}

/// Why a request was refused: it names the rule, not the data.
const UNAVAILABLE: &str = "unavailable for legal reasons: the request carries unredacted personal \
    data and no target serving its model is in a region the tenant allows";

export_router!(Residency);

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_plugin_sdk::testing::{rejected, request, routed, target};
    use meridian_plugin_sdk::Health;

    fn eu(name: &str) -> Target {
        Target { region: Some("eu-west".into()), ..target(name) }
    }

    /// A request whose e-mail address was only labelled, so it is still in the text.
    fn pii_request() -> RequestSummary {
        RequestSummary { labels: vec!["pii.email".into()], allowed_regions: vec!["eu-west".into()], ..request() }
    }

    #[test]
    fn unlabelled_requests_keep_every_target_in_order() {
        let ts = [target("us"), eu("eu"), Target { health: Health::Degraded, ..target("slow") }];
        assert_eq!(routed(&route(&request(), &ts)), Some(vec!["us", "eu", "slow"]));
    }

    #[test]
    fn unredacted_pii_keeps_only_allowed_targets_in_order() {
        let own = Target { region: None, own_infrastructure: true, ..target("own") };
        let ts = [target("us"), eu("eu-b"), own, eu("eu-a")];
        assert_eq!(routed(&route(&pii_request(), &ts)), Some(vec!["eu-b", "own", "eu-a"]));
    }

    #[test]
    fn redacted_pii_goes_anywhere() {
        let labels = vec!["pii.email.redacted".into(), "pii.phone.redacted".into()];
        let req = RequestSummary { labels, redacted: true, ..pii_request() };
        assert_eq!(routed(&route(&req, &[target("us")])), Some(vec!["us"]));
    }

    #[test]
    fn a_labelled_value_stays_in_allowed_regions_when_another_one_is_redacted() {
        // The `redacted` flag is set (the phone number was), but the e-mail address is still there.
        let labels = vec!["pii.email".into(), "pii.phone.redacted".into()];
        let req = RequestSummary { labels, redacted: true, ..pii_request() };
        assert_eq!(routed(&route(&req, &[target("us"), eu("eu")])), Some(vec!["eu"]));
        assert_eq!(rejected(&route(&req, &[target("us")])), Some(451));
    }

    #[test]
    fn unredacted_pii_with_no_allowed_target_is_refused_451() {
        let out = route(&pii_request(), &[target("us"), Target { region: None, ..target("unknown") }]);
        assert_eq!(rejected(&out), Some(451));
        let Outcome::Reject(r) = out else { unreachable!() };
        assert!(r.reason.starts_with("unavailable for legal reasons"));
        assert!(!r.reason.contains("email"), "the reason must not reveal what was found");
    }

    #[test]
    fn no_targets_at_all_is_a_503_not_a_legal_refusal() {
        assert_eq!(rejected(&route(&request(), &[])), Some(503));
    }

    #[test]
    fn configuration_must_be_empty() {
        assert_eq!(Residency::configure("{}"), Ok(()));
        assert!(Residency::configure(r#"{"regions": ["eu"]}"#).is_err());
    }
}
