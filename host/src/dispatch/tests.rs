//! Property tests of the dispatch core: for generated routes, stats, labels, router answers
//! (garbage names, repeats, empty, failure) and attempt outcomes, no attempt breaks the tenant's
//! guarantees, every target is tried at most once, and every request ends in an answer or a typed
//! error. The guarantees are checked against oracles written here from the contract's wording,
//! not by calling the policy code under test.

use proptest::prelude::*;

use super::*;
use crate::accounting::PriceModel;
use crate::config::RelayPolicy;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

fn region() -> impl Strategy<Value = Option<String>> {
    prop_oneof![4 => (0..3usize).prop_map(|i| Some(REGIONS[i].to_string())), 1 => Just(None)]
}

fn price() -> impl Strategy<Value = Option<PriceModel>> {
    prop_oneof![
        Just(None),
        (0.0..20.0f64, 0.0..80.0f64).prop_map(|(i, o)| Some(PriceModel::token(i, o))),
        (0.0..0.01f64).prop_map(|r| Some(PriceModel::gpu_second(r))),
        (0.0..50.0f64, 1..8u32).prop_map(|(h, c)| Some(PriceModel::Hour { usd_per_hour: h, capacity: c })),
    ]
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::Managed), Just(Protocol::Engine), Just(Protocol::PeerEdge)]
}

fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
    prop::collection::vec((protocol(), region(), any::<bool>(), price(), 0.0..5000.0f64, 0..10u32), 1..8).prop_map(
        |v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (protocol, region, own_infrastructure, price, latency_ms, in_flight))| Candidate {
                    name: format!("t{i}"),
                    protocol,
                    region,
                    own_infrastructure,
                    price,
                    latency_ms,
                    in_flight,
                })
                .collect()
        },
    )
}

fn policy() -> impl Strategy<Value = Policy> {
    let labels =
        prop::sample::subsequence(vec!["pii.email", "pii.email.redacted", "pii.phone.redacted", "topic.code"], 0..4);
    let allowed = prop::sample::subsequence(REGIONS.to_vec(), 0..3);
    let relay = prop_oneof![Just(RelayPolicy::Allowed), Just(RelayPolicy::Redacted), Just(RelayPolicy::Never)];
    let path = prop::sample::subsequence(REGIONS.to_vec(), 1..3);
    (labels, allowed, prop::option::of(0.0..0.02f64), relay, path, 1..3u8, 0..20_000u32, prop::option::of(1..4096u32))
        .prop_map(|(labels, allowed, cap, relay, path, max_hops, prompt, max_out)| Policy {
            allowed_regions: allowed.into_iter().map(str::to_string).collect(),
            price_cap_usd: cap,
            relay,
            labels: labels.into_iter().map(str::to_string).collect(),
            path: path.into_iter().map(str::to_string).collect(),
            max_hops,
            prompt_tokens: prompt,
            max_output_tokens: max_out,
        })
}

/// What the router answers: its names (known, unknown, repeated, or none), or a failure.
#[derive(Debug, Clone)]
enum Router {
    Static,
    Order(Vec<String>),
    Failed,
}

fn router() -> impl Strategy<Value = Router> {
    let name =
        prop_oneof![(0..10usize).prop_map(|i| format!("t{i}")), Just("garbage".to_string()), Just(String::new())];
    prop_oneof![
        1 => Just(Router::Static),
        1 => Just(Router::Failed),
        4 => prop::collection::vec(name, 0..10).prop_map(Router::Order),
    ]
}

/// An attempt's outcome, as the edge would see it from a target.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Answer,
    Fail,
    CannotServe,
    RefusedRequest,
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        2 => Just(Outcome::Answer),
        4 => Just(Outcome::Fail),
        1 => Just(Outcome::CannotServe),
        1 => Just(Outcome::RefusedRequest),
    ]
}

fn error(target: &str, o: Outcome) -> Option<UpstreamError> {
    let target = target.to_string();
    match o {
        Outcome::Answer => None,
        Outcome::Fail => Some(UpstreamError::Connect { target, message: "refused".into() }),
        Outcome::CannotServe => Some(UpstreamError::Unsupported { target, message: "tools".into() }),
        Outcome::RefusedRequest => Some(UpstreamError::Rejected { target, status: 400, message: "bad".into() }),
    }
}

/// Health by index: whether each target is available, and whether it admits when claimed (a
/// concurrent request may take a half-open trial between the two).
struct Health {
    available: Vec<bool>,
    admits: Vec<bool>,
}

impl Admit for Health {
    fn available(&self, i: usize) -> bool {
        self.available[i]
    }
    fn admit(&mut self, i: usize) -> bool {
        self.available[i] && self.admits[i]
    }
}

/// The contract's residency rule: unredacted personal data (a `pii.` label not ending in
/// `.redacted`) goes only to the operator's own infrastructure or into an allowed region.
fn residency_ok(p: &Policy, c: &Candidate) -> bool {
    let unredacted = p.labels.iter().any(|l| l.starts_with("pii.") && !l.ends_with(".redacted"));
    !unredacted
        || p.allowed_regions.is_empty()
        || c.own_infrastructure
        || c.region.as_ref().is_some_and(|r| p.allowed_regions.contains(r))
}

/// The price cap against the SDK's documented estimate.
fn cap_ok(p: &Policy, c: &Candidate) -> bool {
    let (Some(cap), Some(price)) = (p.price_cap_usd, c.price) else { return true };
    let out = f64::from(p.max_output_tokens.unwrap_or(256));
    let secs = if c.latency_ms > 0.0 { c.latency_ms / 1000.0 } else { out / 50.0 };
    let cost = match price {
        PriceModel::Token { input_usd_per_mtok: i, output_usd_per_mtok: o, .. } => {
            (f64::from(p.prompt_tokens) * i + out * o) / 1e6
        }
        PriceModel::GpuSecond { usd_per_second, .. } => secs * usd_per_second,
        PriceModel::Hour { capacity, .. } if c.in_flight < capacity => 0.0,
        PriceModel::Hour { usd_per_hour, capacity } => secs * usd_per_hour / 3600.0 / f64::from(capacity),
    };
    cost <= cap
}

/// A peer edge only under the relay policy, outside the path, within the hop limit.
fn relay_ok(p: &Policy, c: &Candidate) -> bool {
    if c.protocol != Protocol::PeerEdge {
        return true;
    }
    let unredacted = p.labels.iter().any(|l| l.starts_with("pii.") && !l.ends_with(".redacted"));
    let policy = match p.relay {
        RelayPolicy::Allowed => true,
        RelayPolicy::Redacted => !unredacted,
        RelayPolicy::Never => false,
    };
    let on_path = c.region.as_ref().is_some_and(|r| p.path.contains(r));
    policy && !on_path && p.path.len() <= usize::from(p.max_hops)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn no_attempt_breaks_a_guarantee_and_every_request_ends_typed(
        cands in candidates(),
        pol in policy(),
        router in router(),
        available in prop::collection::vec(any::<bool>(), 8),
        admits in prop::collection::vec(prop::bool::weighted(0.9), 8),
        outcomes in prop::collection::vec(outcome(), 8),
    ) {
        let names: Vec<String>;
        let answer = match &router {
            Router::Static => RouterAnswer::Static,
            Router::Failed => RouterAnswer::Failed("deadline"),
            Router::Order(n) => { names = n.clone(); RouterAnswer::Order(&names) }
        };
        let order = match plan(&cands, &pol, answer) {
            Ok(order) => order,
            Err(refusal) => {
                // Typed, and only when no candidate the router could widen to is allowed.
                prop_assert!(matches!(refusal.status(), 402 | 403 | 451 | 503 | 508));
                let any_allowed = cands.iter().any(|c| residency_ok(&pol, c) && cap_ok(&pol, c) && relay_ok(&pol, c));
                if matches!(router, Router::Static | Router::Failed) {
                    prop_assert!(!any_allowed, "a static order with an allowed target was refused");
                }
                return Ok(());
            }
        };
        prop_assert!(!order.is_empty());
        let chosen: Vec<&String> = match &router { Router::Order(n) => n.iter().collect(), _ => Vec::new() };
        let router_named_known = chosen.iter().any(|n| cands.iter().any(|c| &&c.name == n));
        let mut health = Health { available, admits };
        let mut attempts = Attempts::new(order.clone(), &health);
        let mut seen = Vec::new();
        let mut steps = 0;
        let end = loop {
            steps += 1;
            prop_assert!(steps <= 2 * cands.len() + 2, "dispatch did not end");
            match attempts.next(&mut health) {
                Step::Try(i) => {
                    let c = &cands[i];
                    prop_assert!(residency_ok(&pol, c), "{} outside the allowed regions", c.name);
                    prop_assert!(cap_ok(&pol, c), "{} over the price cap", c.name);
                    prop_assert!(relay_ok(&pol, c), "{} against the relay policy", c.name);
                    prop_assert!(!seen.contains(&i), "{} tried twice", c.name);
                    if router_named_known {
                        prop_assert!(chosen.contains(&&c.name), "the router's order was widened to {}", c.name);
                    }
                    seen.push(i);
                    match error(&c.name, outcomes[seen.len() - 1]) {
                        None => attempts.record(i, Ok(())),
                        Some(e) => attempts.record(i, Err(e)),
                    }
                }
                other => break other,
            }
        };
        prop_assert_eq!(attempts.tried(), &seen[..]);
        match end {
            Step::Answered(i) => {
                prop_assert_eq!(Some(&i), seen.last());
                prop_assert!(matches!(outcomes[seen.len() - 1], Outcome::Answer));
            }
            Step::Failed(e) => {
                prop_assert!(!seen.is_empty(), "failed without trying anything");
                prop_assert!(seen.iter().any(|&i| cands[i].name == e.target()), "the error names a target tried");
                prop_assert!(!seen.iter().enumerate().any(|(k, _)| matches!(outcomes[k], Outcome::Answer)));
            }
            Step::Try(_) => unreachable!(),
        }
    }
}

#[test]
fn a_failed_router_falls_back_to_the_filtered_static_order() {
    let cand = |name: &str, region: &str| Candidate {
        name: name.into(),
        protocol: Protocol::Managed,
        region: Some(region.into()),
        own_infrastructure: false,
        price: None,
        latency_ms: 0.0,
        in_flight: 0,
    };
    let cands = [cand("us", "us-east"), cand("eu", "eu-west")];
    let pol = Policy { allowed_regions: vec!["eu-west".into()], labels: vec!["pii.email".into()], ..Policy::default() };
    assert_eq!(plan(&cands, &pol, RouterAnswer::Failed("deadline")), Ok(vec![1]));
    assert_eq!(plan(&cands, &pol, RouterAnswer::Order(&["nope".into()])), Ok(vec![1]), "garbage is a failure");
    let refused = plan(&cands, &pol, RouterAnswer::Order(&["us".into()])).unwrap_err();
    assert_eq!((refused.status(), refused.code()), (451, "residency"), "the router's narrowing is kept, not widened");
    let refused = plan(&cands[..1], &pol, RouterAnswer::Failed("quarantined")).unwrap_err();
    assert_eq!((refused.status(), refused.code()), (503, "router_failed"));
}

#[test]
fn cannot_serve_moves_on_and_is_the_last_word_only_when_nothing_else_failed() {
    struct Up;
    impl Admit for Up {
        fn available(&self, _: usize) -> bool {
            true
        }
        fn admit(&mut self, _: usize) -> bool {
            true
        }
    }
    let unsupported = UpstreamError::Unsupported { target: "engine".into(), message: "tools".into() };
    let mut a = Attempts::new(vec![0, 1], &Up);
    assert_eq!(a.next(&mut Up), Step::Try(0));
    a.record(0, Err(unsupported.clone()));
    assert_eq!(a.next(&mut Up), Step::Try(1));
    a.record(1, Ok(()));
    assert_eq!(a.next(&mut Up), Step::Answered(1));

    let mut a = Attempts::new(vec![0], &Up);
    assert_eq!(a.next(&mut Up), Step::Try(0));
    a.record(0, Err(unsupported.clone()));
    assert_eq!(a.next(&mut Up), Step::Failed(unsupported));
}
