//! A router that sends a request to the engine that already holds the beginning of its prompt in its
//! prefix cache (a shared system prompt, a conversation's earlier turns), so that the engine skips their
//! prefill, weighed against how busy each engine is: in the manner of the SGLang model gateway's
//! cache-aware policy and llm-d's prefix and load scorers.
//!
//! Among the targets the residency rule allows and that are not down (healthy before degraded), each
//! scores
//!
//! ```text
//! score = affinity_weight × held / prompt_tokens  −  in_flight / capacity
//! ```
//!
//! where `held` is what the host's `prefix-match` says the target holds of this request (counted only from
//! `min_match_tokens` on, and at most the whole prompt) and `capacity` the requests the target serves at
//! once (as its engine reports it; a target that reports none counts as never busy). With the default
//! weight of 1, an engine holding the whole prompt keeps the request until it has a full batch more in
//! flight than another. Highest score first; ties go to the target with fewer requests in flight, then
//! to a hash of the request id and the target's name (rendezvous hashing), so that new conversations
//! spread over equal engines instead of piling onto the first. No target left: 503.
//!
//! Configuration: `{"affinity_weight": 1.0, "min_match_tokens": 64}` (the defaults; the weight from 0,
//! which turns affinity off, to 100). Unknown keys are refused.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use meridian_plugin_sdk::{decide, export_router, prefix_match, reject, residency_allows};
use meridian_plugin_sdk::{Health, Outcome, RequestSummary, Router, Target};
use serde::Deserialize;

/// The prefix router.
pub struct PrefixRouter;

/// The plugin's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// What holding the whole prompt is worth, in full batches of load.
    #[serde(default = "default_affinity_weight")]
    pub affinity_weight: f64,
    /// Held prefixes shorter than this many tokens count as none (a chat template's default system
    /// prompt is shared by every request and worth no detour).
    #[serde(default = "default_min_match_tokens")]
    pub min_match_tokens: u32,
}

fn default_affinity_weight() -> f64 {
    1.0
}

fn default_min_match_tokens() -> u32 {
    64
}

impl Default for Config {
    fn default() -> Self {
        Config { affinity_weight: default_affinity_weight(), min_match_tokens: default_min_match_tokens() }
    }
}

impl Config {
    /// Parses and validates the JSON configuration; empty text means the defaults.
    pub fn parse(config: &str) -> Result<Config, String> {
        if config.trim().is_empty() {
            return Ok(Config::default());
        }
        let parsed: Config = serde_json::from_str(config).map_err(|e| format!("prefix-router configuration: {e}"))?;
        if !(0.0..=100.0).contains(&parsed.affinity_weight) {
            return Err(format!(
                "prefix-router configuration: affinity_weight must be between 0 and 100, got {}",
                parsed.affinity_weight
            ));
        }
        Ok(parsed)
    }
}

/// The configuration, set by `configure` on each instance (which serves one request at a time).
static AFFINITY_WEIGHT: AtomicU64 = AtomicU64::new(1.0f64.to_bits());
static MIN_MATCH_TOKENS: AtomicU32 = AtomicU32::new(64);

impl Router for PrefixRouter {
    fn configure(config: &str) -> Result<(), String> {
        let config = Config::parse(config)?;
        AFFINITY_WEIGHT.store(config.affinity_weight.to_bits(), Ordering::Relaxed);
        MIN_MATCH_TOKENS.store(config.min_match_tokens, Ordering::Relaxed);
        Ok(())
    }

    fn route(req: RequestSummary, targets: Vec<Target>) -> Outcome {
        let config = Config {
            affinity_weight: f64::from_bits(AFFINITY_WEIGHT.load(Ordering::Relaxed)),
            min_match_tokens: MIN_MATCH_TOKENS.load(Ordering::Relaxed),
        };
        let held: Vec<u32> = targets.iter().map(|t| prefix_match(&t.name)).collect();
        route(&config, &req, &targets, &held)
    }
}

/// Orders the allowed, serving targets by score; `held[i]` is what `targets[i]` holds of the prompt.
pub fn route(config: &Config, req: &RequestSummary, targets: &[Target], held: &[u32]) -> Outcome {
    let mut order: Vec<(&Target, f64, u64)> = targets
        .iter()
        .enumerate()
        .filter(|(_, t)| t.health != Health::Down && residency_allows(req, t))
        .map(|(i, t)| {
            let held = held.get(i).copied().unwrap_or(0);
            (t, score(config, req, t, held), rendezvous(&req.request_id, &t.name))
        })
        .collect();
    if order.is_empty() {
        return reject(503, "no target that may take this request is up");
    }
    let degraded = |t: &Target| t.health != Health::Healthy;
    order.sort_by(|(a, sa, ha), (b, sb, hb)| {
        degraded(a).cmp(&degraded(b)).then(sb.total_cmp(sa)).then(a.in_flight.cmp(&b.in_flight)).then(ha.cmp(hb))
    });
    decide(order.into_iter().map(|(t, _, _)| t))
}

/// A target's score for this request: prefix affinity minus load.
fn score(config: &Config, req: &RequestSummary, t: &Target, held: u32) -> f64 {
    let held = if held < config.min_match_tokens { 0 } else { held.min(req.prompt_tokens) };
    let affinity = f64::from(held) / f64::from(req.prompt_tokens.max(1));
    let load = match t.capacity {
        Some(capacity) if capacity > 0 => f64::from(t.in_flight) / f64::from(capacity),
        _ => 0.0,
    };
    config.affinity_weight * affinity - load
}

/// FNV-1a of the request id and the target name: a per-request order of equal targets.
fn rendezvous(request_id: &str, target: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in request_id.bytes().chain([0xff]).chain(target.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

export_router!(PrefixRouter);

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_plugin_sdk::testing::{rejected, request, routed, target};
    use meridian_plugin_sdk::TargetKind;

    fn engine(name: &str, in_flight: u32) -> Target {
        Target { kind: TargetKind::Dedicated, capacity: Some(8), in_flight, ..target(name) }
    }

    fn order(req: &RequestSummary, ts: &[Target], held: &[u32]) -> Vec<String> {
        routed(&route(&Config::default(), req, ts, held)).unwrap().into_iter().map(str::to_string).collect()
    }

    #[test]
    fn the_engine_holding_the_prompt_goes_first_until_it_is_a_batch_busier() {
        let req = request(); // 1,000 prompt tokens
        let ts = [engine("a", 0), engine("b", 3)];
        assert_eq!(order(&req, &ts, &[0, 900]), ["b", "a"], "0.9 held beats 3/8 busier");
        let ts = [engine("a", 0), engine("b", 8)];
        assert_eq!(order(&req, &ts, &[0, 900]), ["a", "b"], "a full batch more in flight outweighs it");
        assert_eq!(order(&req, &[engine("a", 2), engine("b", 2)], &[300, 900]), ["b", "a"], "more held wins");
    }

    #[test]
    fn short_matches_count_as_none_and_load_decides() {
        let req = RequestSummary { prompt_tokens: 100, ..request() };
        let ts = [engine("a", 1), engine("b", 0)];
        assert_eq!(order(&req, &ts, &[63, 0]), ["b", "a"]);
        assert_eq!(order(&req, &ts, &[64, 0]), ["a", "b"], "64/100 held outweighs 1/8 of load");
        let off = Config { affinity_weight: 0.0, ..Config::default() };
        assert_eq!(routed(&route(&off, &req, &ts, &[1000, 0])), Some(vec!["b", "a"]), "weight 0: load only");
    }

    #[test]
    fn equal_targets_spread_by_request_id() {
        let ts = [engine("a", 0), engine("b", 0)];
        let firsts: std::collections::BTreeSet<String> = (0..32)
            .map(|i| order(&RequestSummary { request_id: format!("req-{i}"), ..request() }, &ts, &[]).remove(0))
            .collect();
        assert_eq!(firsts.len(), 2, "both engines get new conversations: {firsts:?}");
        // The same request always the same way.
        assert_eq!(order(&request(), &ts, &[]), order(&request(), &ts, &[]));
    }

    #[test]
    fn degraded_after_healthy_down_dropped_and_residency_applies() {
        let ts = [
            Target { health: Health::Degraded, ..engine("holder", 0) },
            Target { health: Health::Down, ..engine("down", 0) },
            engine("other", 4),
        ];
        assert_eq!(order(&request(), &ts, &[1000, 1000, 0]), ["other", "holder"]);
        let req =
            RequestSummary { labels: vec!["pii.phone".into()], allowed_regions: vec!["eu-west".into()], ..request() };
        let eu = Target { region: Some("eu-west".into()), ..engine("eu", 6) };
        assert_eq!(order(&req, &[engine("us", 0), eu], &[1000, 0]), ["eu"]);
        assert_eq!(rejected(&route(&Config::default(), &req, &[engine("us", 0)], &[1000])), Some(503));
    }

    #[test]
    fn configuration() {
        assert_eq!(Config::parse("{}"), Ok(Config::default()));
        assert_eq!(Config::parse(""), Ok(Config::default()));
        let c = Config::parse(r#"{"affinity_weight": 2.5, "min_match_tokens": 0}"#).unwrap();
        assert_eq!((c.affinity_weight, c.min_match_tokens), (2.5, 0));
        assert!(Config::parse(r#"{"affinity_weight": -1}"#).unwrap_err().contains("between 0 and 100"));
        assert!(Config::parse(r#"{"weight": 1}"#).unwrap_err().contains("unknown field"));
    }
}
