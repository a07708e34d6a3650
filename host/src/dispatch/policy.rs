//! The tenant's guarantees, checked by the host on every target of every plan: after the router,
//! and on the static order that replaces a failed router. A router may narrow and order what these
//! allow; nothing it answers (or fails to answer) widens them.
//!
//! - **Residency.** A request that still carries personal data (a `pii.*` label without
//!   `.redacted`) never goes to a target outside the tenant's `allowed_regions`, unless the target
//!   runs on the operator's own infrastructure: the contract's rule, the one `residency_allows` in
//!   the plugin SDK applies. A target of unknown region is outside every list.
//! - **Price cap.** A target whose estimated cost exceeds `price_cap_usd` is never tried. The
//!   estimate is the plugin SDK's `estimated_cost`; a target without a price model has none and
//!   is allowed (the node cannot know better).
//! - **Relay.** A peer edge is never tried against the tenant's relay policy, nor in a region the
//!   request passed through, nor past the hop limit.

use crate::accounting::PriceModel;
use crate::config::RelayPolicy;
use crate::error::{Exclusion, RelayRefusal};
use crate::plugin::RequestSummary;

/// Output tokens assumed when the client set no limit (the plugin SDK's
/// `DEFAULT_MAX_OUTPUT_TOKENS`), so the host and the cost router estimate alike.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u32 = 256;

/// Generation speed assumed for an unmeasured target, in tokens per second (the plugin SDK's
/// `DEFAULT_OUTPUT_TOKENS_PER_SECOND`).
pub const DEFAULT_OUTPUT_TOKENS_PER_SECOND: f64 = 50.0;

/// How a target is reached: the three kinds of [`crate::upstream::Target`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// A managed API over HTTPS (OpenAI- or Anthropic-shaped).
    Managed,
    /// A Meridian engine over QUIC.
    Engine,
    /// Another region's edge over QUIC.
    PeerEdge,
}

/// What the core knows of one of the model's targets: facts, not connections.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The target's name.
    pub name: String,
    /// How it is reached.
    pub protocol: Protocol,
    /// Its region, when configured.
    pub region: Option<String>,
    /// Whether it runs on the operator's own infrastructure.
    pub own_infrastructure: bool,
    /// What a request costs there.
    pub price: Option<PriceModel>,
    /// Its smoothed latency in ms (0 until measured), for the cost of time-billed targets.
    pub latency_ms: f64,
    /// Requests in flight to it from this node.
    pub in_flight: u32,
}

/// What the tenant's policy and the request's state say, for checking candidates.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    /// Regions the tenant's personal data may be processed in; empty: any.
    pub allowed_regions: Vec<String>,
    /// The most one request may cost, in USD.
    pub price_cap_usd: Option<f64>,
    /// The tenant's relay policy.
    pub relay: RelayPolicy,
    /// Every label the filters gave the request, here and at the edges before.
    pub labels: Vec<String>,
    /// Regions the request passed through, this one last.
    pub path: Vec<String>,
    /// The most relays a request may take in all.
    pub max_hops: u8,
    /// The request's estimated prompt tokens.
    pub prompt_tokens: u32,
    /// The client's output limit, if any.
    pub max_output_tokens: Option<u32>,
}

/// Whether labels say that personal data is still in the text: a `pii.` label without the
/// `.redacted` suffix (the contract's rule, which the SDK's residency rule uses too).
pub fn carries_unredacted_pii(labels: &[String]) -> bool {
    labels.iter().any(|l| l.starts_with("pii.") && !l.ends_with(".redacted"))
}

/// Why a request would not be relayed under `policy`, given its labels; `None` if it may be.
pub fn policy_forbids(policy: RelayPolicy, labels: &[String]) -> Option<RelayRefusal> {
    match policy {
        RelayPolicy::Allowed => None,
        RelayPolicy::Never => Some(RelayRefusal::Policy("the tenant's requests never leave their region")),
        RelayPolicy::Redacted if carries_unredacted_pii(labels) => Some(RelayRefusal::Policy(
            "the request carries unredacted personal data, and the tenant's policy requires redaction before it leaves the region",
        )),
        RelayPolicy::Redacted => None,
    }
}

impl Policy {
    /// The policy of a request whose summary (what routers see of it, labels included) is
    /// `summary`: its tenant's allowed regions and price cap, its labels and size, with the
    /// tenant's relay policy, the regions it passed through (this one last) and the hop limit.
    pub fn for_request(summary: &RequestSummary, relay: RelayPolicy, path: Vec<String>, max_hops: u8) -> Policy {
        Policy {
            allowed_regions: summary.allowed_regions.clone(),
            price_cap_usd: summary.price_cap_usd,
            relay,
            labels: summary.labels.clone(),
            path,
            max_hops,
            prompt_tokens: summary.prompt_tokens,
            max_output_tokens: summary.max_output_tokens,
        }
    }

    /// Why `c` may not take the request; `None` when it may.
    pub fn excludes(&self, c: &Candidate) -> Option<Exclusion> {
        if !self.allowed_regions.is_empty() && !c.own_infrastructure && carries_unredacted_pii(&self.labels) {
            let inside = c.region.as_ref().is_some_and(|r| self.allowed_regions.contains(r));
            if !inside {
                return Some(Exclusion::Residency {
                    target: c.name.clone(),
                    region: c.region.clone().unwrap_or_else(|| "an unknown region".into()),
                    allowed: self.allowed_regions.join(", "),
                });
            }
        }
        if let (Some(cap), Some(cost)) = (self.price_cap_usd, self.estimated_cost(c)) {
            // NaN never passes a cap.
            if cost.is_nan() || cost > cap {
                return Some(Exclusion::PriceCap { target: c.name.clone(), cost, cap });
            }
        }
        if c.protocol == Protocol::PeerEdge {
            return self.relay_refusal(c.region.as_deref()).map(Exclusion::Relay);
        }
        None
    }

    /// Why a peer edge in `region` may not take the request: the tenant's relay policy, a region
    /// the request passed through, or the hop limit.
    pub fn relay_refusal(&self, region: Option<&str>) -> Option<RelayRefusal> {
        if let Some(refusal) = policy_forbids(self.relay, &self.labels) {
            return Some(refusal);
        }
        let path = || self.path.join(" > ");
        if let Some(region) = region.filter(|r| self.path.iter().any(|p| p == r)) {
            return Some(RelayRefusal::Loop { region: region.to_string(), path: path() });
        }
        if self.path.len() > usize::from(self.max_hops) {
            return Some(RelayRefusal::HopLimit { max: self.max_hops, path: path() });
        }
        None
    }

    /// The marginal cost in USD of sending the request to `c`; `None` without a price model. The
    /// plugin SDK's `estimated_cost`: per token, prompt and expected output tokens; per
    /// GPU-second, the expected seconds; per hour, nothing while the node has a free slot, else
    /// the request's share of a slot's hour.
    pub fn estimated_cost(&self, c: &Candidate) -> Option<f64> {
        let output = f64::from(self.max_output_tokens.unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS));
        let seconds =
            if c.latency_ms > 0.0 { c.latency_ms / 1000.0 } else { output / DEFAULT_OUTPUT_TOKENS_PER_SECOND };
        Some(match c.price? {
            PriceModel::Token { input_usd_per_mtok, output_usd_per_mtok, .. } => {
                (f64::from(self.prompt_tokens) * input_usd_per_mtok + output * output_usd_per_mtok) / 1e6
            }
            PriceModel::GpuSecond { usd_per_second, .. } => seconds * usd_per_second,
            PriceModel::Hour { capacity, .. } if c.in_flight < capacity => 0.0,
            PriceModel::Hour { usd_per_hour, capacity } => seconds * usd_per_hour / 3600.0 / f64::from(capacity.max(1)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(name: &str, region: Option<&str>) -> Candidate {
        Candidate {
            name: name.into(),
            protocol: Protocol::Managed,
            region: region.map(str::to_string),
            own_infrastructure: false,
            price: None,
            latency_ms: 0.0,
            in_flight: 0,
        }
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn residency_holds_only_for_unredacted_personal_data() {
        let mut p = Policy { allowed_regions: strings(&["eu-west"]), ..Policy::default() };
        let us = candidate("us", Some("us-east"));
        assert_eq!(p.excludes(&us), None, "no personal data");
        p.labels = strings(&["pii.email.redacted"]);
        assert_eq!(p.excludes(&us), None, "redacted");
        p.labels = strings(&["pii.email", "pii.phone.redacted"]);
        assert!(matches!(p.excludes(&us), Some(Exclusion::Residency { .. })));
        assert!(matches!(p.excludes(&candidate("x", None)), Some(Exclusion::Residency { .. })), "unknown region");
        assert_eq!(p.excludes(&candidate("eu", Some("eu-west"))), None);
        let own = Candidate { own_infrastructure: true, ..us };
        assert_eq!(p.excludes(&own), None, "the operator's own infrastructure");
    }

    #[test]
    fn the_cap_uses_the_sdk_estimate() {
        let p = Policy { price_cap_usd: Some(0.004), prompt_tokens: 1000, ..Policy::default() };
        let mut c = candidate("t", None);
        c.price = Some(PriceModel::token(3.0, 15.0));
        // 1000 × $3/M + 256 × $15/M = $0.00684
        assert!((p.estimated_cost(&c).unwrap() - 0.00684).abs() < 1e-12);
        assert!(matches!(p.excludes(&c), Some(Exclusion::PriceCap { .. })));
        c.price = Some(PriceModel::Hour { usd_per_hour: 100.0, capacity: 2 });
        assert_eq!(p.excludes(&c), None, "a dedicated node with a free slot costs nothing more");
        c.in_flight = 2;
        assert!(matches!(p.excludes(&c), Some(Exclusion::PriceCap { .. })));
        c.price = None;
        assert_eq!(p.excludes(&c), None, "no price, no estimate");
    }

    #[test]
    fn the_policy_decides_on_labels() {
        let pii = strings(&["pii.email", "pii.phone.redacted"]);
        let redacted = strings(&["pii.email.redacted"]);
        assert_eq!(policy_forbids(RelayPolicy::Allowed, &pii), None);
        assert_eq!(policy_forbids(RelayPolicy::Redacted, &redacted), None);
        assert_eq!(policy_forbids(RelayPolicy::Redacted, &pii).map(|r| r.status()), Some(451));
        assert_eq!(policy_forbids(RelayPolicy::Never, &[]).map(|r| r.status()), Some(451));
    }

    #[test]
    fn peer_edges_answer_to_the_relay_policy() {
        let mut p = Policy { path: strings(&["us-east"]), max_hops: 1, ..Policy::default() };
        let peer = Candidate { protocol: Protocol::PeerEdge, ..candidate("eu", Some("eu-west")) };
        assert_eq!(p.excludes(&peer), None);
        p.relay = RelayPolicy::Never;
        assert!(matches!(p.excludes(&peer), Some(Exclusion::Relay(RelayRefusal::Policy(_)))));
        assert_eq!(p.excludes(&candidate("eu", Some("eu-west"))), None, "only peer edges relay");
        p.relay = RelayPolicy::Allowed;
        p.path = strings(&["eu-west", "us-east"]);
        assert!(matches!(p.excludes(&peer), Some(Exclusion::Relay(RelayRefusal::Loop { .. }))));
        p.path = strings(&["ap-south", "us-east"]);
        assert!(matches!(p.excludes(&peer), Some(Exclusion::Relay(RelayRefusal::HopLimit { max: 1, .. }))));
    }
}
