//! A deterministic simulation of routing across regions: the shipped Wasm routers (run by the real
//! plugin runtime) and a round-robin baseline each route the same stream of synthetic requests
//! over the same synthetic world, and the [`Report`] compares end-to-end latency, errors, cost and
//! residency violations.
//!
//! No I/O: time is simulated, and every random draw comes from the scenario's seed, keyed by what
//! it is for (request `i`'s prompt size, request `i`'s attempt at target `j`…), so every router
//! sees the same requests and the same luck on the same target, and a seed gives one report.
//!
//! The world:
//!
//! - **Regions** on a globe (the first three are `us-east`, `eu-west`, `ap-south`; more get
//!   real-world names, then generated places); the RTT between two regions follows their
//!   great-circle distance (about 0.015 ms per km, 2 ms within a region), times log-normal jitter.
//! - **Clients** in each region (a seeded mix); each request enters at its region's edge, which
//!   measures its own view of every target.
//! - **Targets**: in each region a managed API (per token), a serverless GPU endpoint (per
//!   GPU-second while busy, with a cold start after a minute idle) and a dedicated engine (per
//!   hour, with a concurrency capacity: past it requests queue). Each has a log-normal time to
//!   first token, a tokens/s rate, a failure probability, and outage windows (a Poisson process
//!   of log-normal length) during which an attempt fails after the connect timeout.
//! - **Tenants**: some may have their data processed only in their home region
//!   (`allowed_regions`), and part of their requests carry unredacted personal data
//!   (`pii.email`) or redacted data (`pii.email.redacted`).
//! - **What the edge sees**: each edge keeps the edge's own live statistics of every target
//!   ([`TargetStats`], under the scenario's `[health]`; by default the node's: 5 failures in a row
//!   eject a target for 1 s, doubling up to 30 s, then one half-open request decides). Each attempt's outcome reaches them
//!   when the attempt ends ([`TargetStats::attempt`]), with its latency as the edge measures it (to
//!   the whole answer, or to a stream's first token) and a stream's time to first token; the
//!   dedicated engines are also probed every 2 s ([`TargetStats::probe`]: capacity and RTT, or a
//!   failure). Simulated time maps to instants from one base taken at the start of the run, so the
//!   state machine runs on simulated time, deterministically. Routers get the targets as
//!   [`routes::router_view`] makes them for the edge.
//!
//! Each request goes through the dispatch core ([`crate::dispatch`]) as at the edge: its router's
//! order (or the static order when the router failed) is filtered by the tenant's guarantees
//! ([`dispatch::plan`]), and [`Attempts`] walks it at the simulated time of each attempt (ejected
//! targets skipped unless all are; each attempt's failure typed as the edge types it, which decides
//! whether the next target is tried). All failing is an error, a refusal (the router's or the
//! host's) too. The report counts residency violations with a check of its own, from how requests
//! and tenants were generated, independent of the labels and of the core that enforces the rule.
//! Cost is what each attempt is billed under its target's model; dedicated engines cost their hours
//! over the simulated span whatever the router does. [`replay`] runs a script of requests through
//! the same per-request step, for comparing with a real edge.
//!
//! A Wasm router runs by default on one reused instance per router ([`RouterSession`]), each
//! router on its own thread: instantiating per call (what the edge does, ~25 µs) for millions of
//! calls would dominate the run. [`InstanceMode::Fresh`] runs the edge's per-call path instead.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::accounting::PriceModel;
use crate::config::{HealthConfig, RelayPolicy, TargetKind, DEFAULT_MAX_HOPS};
use crate::dispatch::{self, Admit, Attempts, Candidate, Policy, Protocol, Refusal, RouterAnswer, Step};
use crate::error::{GatewayError, Retry, UpstreamError};
use crate::plugin::{
    CallLimits, Health, Outcome, PluginError, PluginMetrics, PluginRuntime, PluginSettings, RequestSummary,
    RouterPlugin, RouterSession, Target,
};
use crate::routes::{self, Routing, TargetFacts};
use crate::stats::{Admission, Ejection, EngineLoad, HeldPrefixes, InFlight, Snapshot, TargetStats};

/// The model's name at every simulated target.
const MODEL: &str = "m";
/// Time a failed connection costs an attempt during an outage.
const CONNECT_TIMEOUT_MS: f64 = 1_500.0;
/// A serverless endpoint idle this long starts cold.
const SERVERLESS_IDLE_MS: f64 = 60_000.0;
/// Median cold start of a serverless endpoint.
const COLD_START_MS: f64 = 4_000.0;
/// Requests an engine queues per slot of capacity before it answers "overloaded" (the engine's
/// default: a queue of 64 for a batch of 8… here 4 per slot).
const ENGINE_QUEUE_PER_SLOT: usize = 4;
/// A client gives up on an answer that has not come within this time.
const CLIENT_TIMEOUT_MS: f64 = 60_000.0;

/// A router to compare.
#[derive(Debug, Clone, PartialEq)]
pub enum RouterSpec {
    /// The Rust baseline: targets in turn, one step further for every request (down ones last),
    /// blind to residency, latency and price. The host's guarantees still hold: the dispatch core
    /// filters its order as any router's.
    RoundRobin,
    /// A Wasm router component `FILE` (in [`Scenario::plugin_dir`]) with its configuration JSON.
    Wasm {
        /// The name in the report.
        name: String,
        /// The component's file name.
        file: String,
        /// Its configuration (JSON).
        config: String,
    },
}

impl RouterSpec {
    /// The report's name for it.
    pub fn name(&self) -> &str {
        match self {
            RouterSpec::RoundRobin => "round-robin",
            RouterSpec::Wasm { name, .. } => name,
        }
    }

    /// The shipped routers: latency-router, cost-router, residency.
    pub fn shipped() -> Vec<RouterSpec> {
        ["latency-router", "cost-router", "residency"].map(RouterSpec::wasm).into()
    }

    /// The shipped router `name` (`latency-router`…), with an empty configuration.
    pub fn wasm(name: &str) -> RouterSpec {
        RouterSpec::Wasm { name: name.into(), file: format!("{}.wasm", name.replace('-', "_")), config: "{}".into() }
    }
}

/// How a Wasm router's calls get their instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceMode {
    /// One instance per router for the whole run ([`RouterPlugin::session`]).
    Reuse,
    /// A fresh instance per call, as on the request path ([`RouterPlugin::route`]).
    Fresh,
}

/// What to simulate. [`Scenario::new`] gives the defaults; every field may be changed.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Seed of every random draw.
    pub seed: u64,
    /// Requests to route.
    pub requests: usize,
    /// Region names; see [`Scenario::region_names`].
    pub regions: Vec<String>,
    /// Arrivals per second across all regions (Poisson).
    pub arrival_rate_per_s: f64,
    /// Tenants.
    pub tenants: usize,
    /// Share of tenants whose data may be processed only in their home region.
    pub residency_tenant_share: f64,
    /// Share of requests that carry unredacted personal data (`pii.email`); as many again carry
    /// redacted data (`pii.email.redacted`).
    pub pii_share: f64,
    /// Concurrency of each region's dedicated engine.
    pub engine_capacity: u32,
    /// Price of each dedicated engine.
    pub engine_usd_per_hour: f64,
    /// Multiplies every target's failure probability and outage rate (0 turns failures off).
    pub failure_scale: f64,
    /// The routers to compare, in report order.
    pub routers: Vec<RouterSpec>,
    /// Where the router plugins are (`target/wasm32-unknown-unknown/release`, where
    /// `scripts/build-plugins` puts the Rust ones, by default).
    pub plugin_dir: PathBuf,
    /// The plugin runtime's artifact cache.
    pub plugin_cache_dir: PathBuf,
    /// How Wasm routers get instances.
    pub instances: InstanceMode,
    /// The edges' `[health]`: ejection of failing targets, and how often engines are probed.
    pub health: HealthConfig,
    /// Dedicated engines in each region (named `<region>/engine`, or `<region>/engine-N` when
    /// there are several).
    pub engines_per_region: usize,
    /// Only the engines: no managed API and no serverless endpoint (a pool of one's own
    /// capacity, what prefix-aware routing serves).
    pub engines_only: bool,
    /// Requests as turns of multi-turn conversations, with engines' prefix caches; `None`: every
    /// request stands alone and engines keep no cache.
    pub conversations: Option<Conversations>,
}

/// Multi-turn conversations with long system prompts, for prefix-aware routing. `agents` system
/// prompts (an assistant each, say) each have one conversation under way at a time, of `turns`
/// turns, after which the next one begins; each request is the next turn at an agent drawn
/// uniformly. Its prompt is the agent's system prompt, the conversation's earlier turns and its
/// own. Each dedicated engine keeps a prefix cache: per conversation the longest beginning it
/// prefilled (a later turn replacing an earlier one, as the engine's cache does), least recently
/// used first out within `cache_tokens`. An engine's time to first token adds
/// `prefill_ms_per_token` for each prompt token its cache does not hold (a conversation it has not
/// seen still finds its agent's system prompt in another's entry), and its probe answer lists what
/// it holds, as an engine's health does, for the edge to hand routers (`prefix-match`, through
/// [`routes::held_tokens`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conversations {
    /// System prompts, each with a conversation under way.
    pub agents: usize,
    /// Turns of each conversation.
    pub turns: u32,
    /// Tokens of each system prompt.
    pub system_tokens: u32,
    /// Tokens each turn adds (a question, and the answer before the next).
    pub turn_tokens: u32,
    /// Each engine's prefix cache, in tokens.
    pub cache_tokens: u64,
    /// Prefill time per prompt token not in the cache, ms.
    pub prefill_ms_per_token: f64,
}

/// Where a request sits among [`Conversations`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Turn {
    agent: u32,
    /// Unique across agents.
    conversation: u32,
    /// 0 for the first.
    turn: u32,
}

impl Conversations {
    /// Tokens of a conversation's first `turns` turns after its system prompt.
    fn tokens(&self, turns: u32) -> u32 {
        self.system_tokens + turns * self.turn_tokens
    }
}

impl Scenario {
    /// The defaults: `requests` requests over `regions` regions, 150 requests/s, 24 tenants (30% of
    /// them residency-bound), 10% of requests with unredacted PII, a 16-slot $2/hour engine per
    /// region, the node's `[health]` defaults, round-robin and the shipped routers.
    pub fn new(requests: usize, regions: usize, seed: u64) -> Scenario {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
        let mut routers = vec![RouterSpec::RoundRobin];
        routers.extend(RouterSpec::shipped());
        Scenario {
            seed,
            requests,
            regions: Scenario::region_names(regions),
            arrival_rate_per_s: 150.0,
            tenants: 24,
            residency_tenant_share: 0.3,
            pii_share: 0.1,
            engine_capacity: 16,
            engine_usd_per_hour: 2.0,
            failure_scale: 1.0,
            routers,
            plugin_dir: target.join("wasm32-unknown-unknown/release"),
            // The user's own cache (never a fixed path under the shared temp dir, where another
            // user could plant artifacts first); the engine's artifacts have names of their own.
            plugin_cache_dir: crate::plugin::PluginSettings::default().cache_dir,
            instances: InstanceMode::Reuse,
            health: HealthConfig::default(),
            engines_per_region: 1,
            engines_only: false,
            conversations: None,
        }
    }

    /// The conversation scenario: `requests` turns of conversations at 32 agents (3,000-token
    /// system prompts, six turns of 200 tokens each) at 25 requests/s in one region served by four
    /// 16-slot engines only, each caching 40,000 tokens (about ten conversations) and prefilling
    /// 10,000 tokens/s; round-robin, the latency router and the prefix router.
    pub fn conversations(requests: usize, seed: u64) -> Scenario {
        Scenario {
            arrival_rate_per_s: 25.0,
            engines_per_region: 4,
            engines_only: true,
            conversations: Some(Conversations {
                agents: 32,
                turns: 6,
                system_tokens: 3_000,
                turn_tokens: 200,
                cache_tokens: 40_000,
                prefill_ms_per_token: 0.1,
            }),
            routers: vec![
                RouterSpec::RoundRobin,
                RouterSpec::wasm("latency-router"),
                RouterSpec::wasm("prefix-router"),
            ],
            ..Scenario::new(requests, 1, seed)
        }
    }

    /// `n` region names: `us-east`, `eu-west`, `ap-south`, then more real-world regions, then
    /// `region-11` and on.
    pub fn region_names(n: usize) -> Vec<String> {
        (0..n).map(|i| PLACES.get(i).map_or_else(|| format!("region-{}", i + 1), |p| p.0.to_string())).collect()
    }
}

/// Known places: name, latitude, longitude, client weight.
const PLACES: [(&str, f64, f64, f64); 10] = [
    ("us-east", 39.0, -77.5, 0.40),
    ("eu-west", 53.3, -6.3, 0.35),
    ("ap-south", 19.1, 72.9, 0.25),
    ("us-west", 45.6, -121.2, 0.20),
    ("eu-central", 50.1, 8.7, 0.20),
    ("ap-northeast", 35.7, 139.7, 0.15),
    ("sa-east", -23.5, -46.6, 0.10),
    ("ap-southeast", 1.35, 103.8, 0.12),
    ("af-south", -33.9, 18.4, 0.05),
    ("me-central", 25.2, 55.3, 0.06),
];

/// One router's results.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterReport {
    /// The router's name.
    pub name: String,
    /// Requests routed.
    pub requests: u64,
    /// Requests answered.
    pub served: u64,
    /// Requests not answered: every attempt failed, the answer came after the client's timeout
    /// (60 s), or the request was refused.
    pub errors: u64,
    /// Of the errors, refusals: the router's, or the host's when no target of the plan keeps the
    /// tenant's guarantees.
    pub refused: u64,
    /// Of the errors, answers that came too late.
    pub timed_out: u64,
    /// Attempts an engine turned away because its queue was full.
    pub overloaded: u64,
    /// Attempts made, failed ones included.
    pub attempts: u64,
    /// Median end-to-end latency of answered requests, ms (failed attempts before the answer included).
    pub p50_ms: f64,
    /// 99th percentile of the same.
    pub p99_ms: f64,
    /// Median time to first token of answered streamed requests, ms: what a streaming client
    /// waits for, and what the latency router ranks by for streams.
    pub ttft_p50_ms: f64,
    /// 99th percentile of the same.
    pub ttft_p99_ms: f64,
    /// What the attempts were billed (per token, per GPU-second), USD.
    pub variable_usd: f64,
    /// The dedicated engines' hours over the simulated span, USD (the same for every router).
    pub fixed_usd: f64,
    /// Requests sent (in any attempt) to a target the residency rule forbids for them: unredacted
    /// personal data outside the tenant's allowed regions. Counted by the report's own check, from
    /// how the request and its tenant were generated, not by the dispatch core that enforces it.
    pub residency_violations: u64,
    /// Router calls that failed (trap, timeout, invalid answer) and fell back to the static order.
    pub router_failures: u64,
    /// Answered requests by the serving target's region (in [`Report::regions`] order).
    pub served_by_region: Vec<u64>,
    /// Answered requests by the serving target's kind: managed, serverless, dedicated.
    pub served_by_kind: [u64; 3],
    /// With conversations: prompt tokens of the attempts at engines.
    pub engine_prompt_tokens: u64,
    /// Of those, the tokens the engines' prefix caches held.
    pub prefix_tokens_reused: u64,
}

impl RouterReport {
    /// The share of engines' prompt tokens that came from their prefix caches.
    pub fn prefix_share(&self) -> f64 {
        self.prefix_tokens_reused as f64 / self.engine_prompt_tokens.max(1) as f64
    }

    /// Error rate over all requests.
    pub fn error_rate(&self) -> f64 {
        self.errors as f64 / self.requests.max(1) as f64
    }

    /// Variable and fixed cost together.
    pub fn total_usd(&self) -> f64 {
        self.variable_usd + self.fixed_usd
    }

    /// Total cost per request.
    pub fn usd_per_request(&self) -> f64 {
        self.total_usd() / self.requests.max(1) as f64
    }
}

/// The comparison: one [`RouterReport`] per router, in the scenario's order. `Display` prints the
/// tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Region names.
    pub regions: Vec<String>,
    /// Targets in the world.
    pub targets: usize,
    /// The simulated span, seconds.
    pub simulated_s: f64,
    /// How Wasm routers got instances.
    pub instances: InstanceMode,
    /// Whether requests were turns of conversations, with engines' prefix caches.
    pub conversations: bool,
    /// Per router.
    pub routers: Vec<RouterReport>,
}

impl Report {
    /// The report of the router named `name`.
    pub fn router(&self, name: &str) -> Option<&RouterReport> {
        self.routers.iter().find(|r| r.name == name)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let requests = self.routers.first().map_or(0, |r| r.requests);
        writeln!(
            f,
            "Routing simulation: {requests} requests over {:.0} s simulated, {} regions, {} targets, seed {}; Wasm routers on {}",
            self.simulated_s,
            self.regions.len(),
            self.targets,
            self.seed,
            match self.instances {
                InstanceMode::Reuse => "one reused instance each",
                InstanceMode::Fresh => "a fresh instance per call",
            }
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "| router | requests | p50 ms | p99 ms | stream TTFT p50 ms | TTFT p99 ms | error rate | cost USD | USD/request | residency violations | router failures |"
        )?;
        writeln!(f, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")?;
        for r in &self.routers {
            writeln!(
                f,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3}% | {:.2} | {:.6} | {} | {} |",
                r.name,
                r.requests,
                r.p50_ms,
                r.p99_ms,
                r.ttft_p50_ms,
                r.ttft_p99_ms,
                r.error_rate() * 100.0,
                r.total_usd(),
                r.usd_per_request(),
                r.residency_violations,
                r.router_failures
            )?;
        }
        if let Some(r) = self.routers.first() {
            writeln!(f, "\nCost includes ${:.2} of dedicated engine hours, the same for every router.", r.fixed_usd)?;
        }
        if self.conversations {
            writeln!(f, "\nPrompt tokens the engines took from their prefix caches:\n")?;
            writeln!(f, "| router | engine prompt tokens | from prefix caches |")?;
            writeln!(f, "| --- | ---: | ---: |")?;
            for r in &self.routers {
                writeln!(f, "| {} | {} | {:.1}% |", r.name, r.engine_prompt_tokens, r.prefix_share() * 100.0)?;
            }
        }
        writeln!(f, "\nShare of answered requests by the serving target's region and kind:\n")?;
        write!(f, "| router |")?;
        for region in &self.regions {
            write!(f, " {region} |")?;
        }
        writeln!(f, " managed | serverless | dedicated |")?;
        write!(f, "| --- |")?;
        for _ in 0..self.regions.len() + 3 {
            write!(f, " ---: |")?;
        }
        writeln!(f)?;
        for r in &self.routers {
            let share = |n: u64| n as f64 * 100.0 / r.served.max(1) as f64;
            write!(f, "| {} |", r.name)?;
            for &n in &r.served_by_region {
                write!(f, " {:.1}% |", share(n))?;
            }
            for n in r.served_by_kind {
                write!(f, " {:.1}% |", share(n))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Runs the scenario: every router on its own thread over the same requests. Blocks until done;
/// it starts its own threads and Tokio runtimes, so it may be called from anywhere (from async
/// code, through `spawn_blocking`). Fails when a router component cannot be loaded.
pub fn run(scenario: &Scenario) -> Result<Report, PluginError> {
    let world = World::build(scenario);
    let needs_wasm = scenario.routers.iter().any(|r| matches!(r, RouterSpec::Wasm { .. }));
    let runtime = if needs_wasm {
        let settings = PluginSettings {
            cache_dir: scenario.plugin_cache_dir.clone(),
            max_instances: (scenario.routers.len() as u32).max(1) + 1,
            ..PluginSettings::default()
        };
        let metrics = PluginMetrics::new(&prometheus::Registry::new())
            .map_err(|e| PluginError::Runtime(format!("plugin metrics: {e}")))?;
        Some(Arc::new(PluginRuntime::new(settings, Arc::new(metrics))?))
    } else {
        None
    };
    let results: Vec<Result<RouterReport, PluginError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = scenario
            .routers
            .iter()
            .map(|spec| {
                let (world, runtime) = (&world, runtime.clone());
                scope.spawn(move || simulate_router(world, spec, runtime))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(PluginError::Runtime("a simulation thread panicked".into()))))
            .collect()
    });
    Ok(Report {
        seed: scenario.seed,
        regions: scenario.regions.clone(),
        targets: world.targets.len(),
        simulated_s: world.span_ms / 1000.0,
        instances: scenario.instances,
        conversations: scenario.conversations.is_some(),
        routers: results.into_iter().collect::<Result<_, _>>()?,
    })
}

// ---------------------------------------------------------------------------------------------
// Randomness: counter-based, so that a draw depends only on the seed and what it is for.

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a stream of draws is for.
#[derive(Clone, Copy)]
pub(crate) enum Stream {
    World = 1,
    Arrival,
    Request,
    Attempt,
    Probe,
    Outage,
    /// `meridian cost replay`'s generated month ([`crate::cost::replay`]).
    CostMonth,
}

/// SplitMix64, started from the seed, a stream and two keys.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64, stream: Stream, a: u64, b: u64) -> Rng {
        Rng(mix(seed ^ mix((stream as u64) ^ mix(a ^ mix(b.wrapping_add(0x5851_F42D))))))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub(crate) fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Standard normal (Box–Muller).
    pub(crate) fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit();
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Log-normal with this median and log-space standard deviation.
    pub(crate) fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }

    pub(crate) fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    /// An index drawn by cumulative weights.
    fn pick(&mut self, cdf: &[f64]) -> usize {
        let x = self.unit() * cdf.last().copied().unwrap_or(1.0);
        cdf.iter().position(|&c| x < c).unwrap_or(cdf.len() - 1)
    }
}

fn cdf(weights: impl IntoIterator<Item = f64>) -> Vec<f64> {
    weights
        .into_iter()
        .scan(0.0, |sum, w| {
            *sum += w;
            Some(*sum)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The world: regions, targets, tenants, outages. The same for every router.

struct TargetSpec {
    region: usize,
    ttft_ms: f64,
    tokens_per_s: f64,
    failure: f64,
    /// Outage windows, sorted: (start ms, end ms).
    outages: Vec<(f64, f64)>,
    /// What the edges are configured with.
    config: SimTarget,
}

struct Tenant {
    name: String,
    home: usize,
    /// Whether its personal data may be processed only in its home region.
    bound: bool,
}

/// One region's edge: the model's targets in its static order (own region first, then by RTT).
struct EdgeModel {
    /// Each target's index in the world.
    order: Vec<usize>,
    /// Each target as the edge is configured with it.
    targets: Vec<SimTarget>,
}

struct World<'a> {
    scenario: &'a Scenario,
    /// RTT between regions, ms.
    rtt: Vec<Vec<f64>>,
    clients: Vec<f64>,
    targets: Vec<TargetSpec>,
    tenants: Vec<Tenant>,
    /// Per region, its edge.
    edges: Vec<EdgeModel>,
    span_ms: f64,
    /// With conversations, where each request sits.
    turns: Vec<Turn>,
    /// The instant simulated time 0 maps to, the same for every router.
    base: Instant,
}

impl<'a> World<'a> {
    fn build(scenario: &'a Scenario) -> World<'a> {
        let seed = scenario.seed;
        let n = scenario.regions.len().max(1);
        let mut rng = Rng::new(seed, Stream::World, 0, 0);
        let places: Vec<(f64, f64, f64)> = (0..n)
            .map(|i| match PLACES.get(i) {
                Some(&(_, lat, lon, w)) => (lat, lon, w),
                None => (rng.range(-50.0, 60.0), rng.range(-180.0, 180.0), rng.range(0.03, 0.15)),
            })
            .collect();
        let rtt = places
            .iter()
            .map(|a| places.iter().map(|b| 2.0 + 0.015 * great_circle_km(a.0, a.1, b.0, b.1)).collect())
            .collect::<Vec<Vec<f64>>>();
        let clients = cdf(places.iter().map(|p| p.2));
        let span_ms = scenario.requests as f64 / scenario.arrival_rate_per_s * 1000.0;
        let mut targets = Vec::new();
        for (r, region) in scenario.regions.iter().enumerate() {
            let input = rng.range(0.10, 0.30);
            let mut specs = vec![
                (
                    "managed".to_string(),
                    TargetKind::Managed,
                    PriceModel::token(input, 4.0 * input),
                    rng.range(250.0, 450.0),
                    rng.range(70.0, 110.0),
                    0.010,
                ),
                (
                    "serverless".to_string(),
                    TargetKind::Serverless,
                    PriceModel::gpu_second(rng.range(0.5, 1.5) / 3600.0),
                    rng.range(180.0, 300.0),
                    rng.range(50.0, 80.0),
                    0.020,
                ),
            ];
            if scenario.engines_only {
                specs.clear();
            }
            let engines = scenario.engines_per_region.max(1);
            for k in 0..engines {
                specs.push((
                    if engines == 1 { "engine".to_string() } else { format!("engine-{}", k + 1) },
                    TargetKind::Dedicated,
                    PriceModel::Hour { usd_per_hour: scenario.engine_usd_per_hour, capacity: scenario.engine_capacity },
                    rng.range(100.0, 160.0),
                    rng.range(100.0, 140.0),
                    0.005,
                ));
            }
            for (suffix, kind, price, ttft_ms, tokens_per_s, failure) in specs {
                let j = targets.len() as u64;
                let config = SimTarget {
                    name: format!("{region}/{suffix}"),
                    region: Some(region.clone()),
                    kind,
                    price: Some(price),
                };
                targets.push(TargetSpec {
                    region: r,
                    ttft_ms,
                    tokens_per_s,
                    failure: failure * scenario.failure_scale,
                    outages: outages(seed, j, span_ms, 0.25 * scenario.failure_scale),
                    config,
                });
            }
        }
        let tenants = (0..scenario.tenants)
            .map(|i| {
                let mut rng = Rng::new(seed, Stream::World, 1, i as u64);
                let home = rng.pick(&clients);
                let bound = rng.unit() < scenario.residency_tenant_share;
                Tenant { name: format!("tenant-{i}"), home, bound }
            })
            .collect();
        let edges = (0..n)
            .map(|edge| {
                let mut order: Vec<usize> = (0..targets.len()).collect();
                // Stable: within a region, managed, serverless, engine, as built.
                order.sort_by(|&a, &b| rtt[edge][targets[a].region].total_cmp(&rtt[edge][targets[b].region]));
                let targets = order.iter().map(|&j| targets[j].config.clone()).collect();
                EdgeModel { order, targets }
            })
            .collect();
        // Each request's agent, conversation and turn, from the requests before it.
        let turns = scenario.conversations.map_or_else(Vec::new, |c| {
            let (agents, per) = (c.agents.max(1), c.turns.max(1));
            let mut taken = vec![0u32; agents];
            (0..scenario.requests as u64)
                .map(|i| {
                    let agent = Rng::new(seed, Stream::Request, i, 2).unit_index(agents);
                    let n = taken[agent];
                    taken[agent] += 1;
                    let conversation = (n / per) * agents as u32 + agent as u32;
                    Turn { agent: agent as u32, conversation, turn: n % per }
                })
                .collect()
        });
        World { scenario, rtt, clients, targets, tenants, edges, span_ms, turns, base: Instant::now() }
    }

    fn in_outage(&self, j: usize, t: f64) -> bool {
        let w = &self.targets[j].outages;
        let i = w.partition_point(|&(start, _)| start <= t);
        i > 0 && t < w[i - 1].1
    }
}

fn great_circle_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let (dp, dl) = ((lat2 - lat1).to_radians(), (lon2 - lon1).to_radians());
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().min(1.0).asin()
}

/// Outage windows of target `j` over `span_ms`: `per_hour` on average, median 2 minutes long.
fn outages(seed: u64, j: u64, span_ms: f64, per_hour: f64) -> Vec<(f64, f64)> {
    let mut windows = Vec::new();
    if per_hour <= 0.0 {
        return windows;
    }
    let mut rng = Rng::new(seed, Stream::Outage, j, 0);
    let mut t = rng.exponential(3_600_000.0 / per_hour);
    while t < span_ms {
        let length = rng.lognormal(120_000.0, 0.8).clamp(20_000.0, 900_000.0);
        windows.push((t, t + length));
        t += length + rng.exponential(3_600_000.0 / per_hour);
    }
    windows
}

/// One request, the same for every router.
struct Request {
    region: usize,
    tenant: usize,
    /// Whether it carries unredacted personal data (as generated, whatever its labels say).
    personal: bool,
    summary: RequestSummary,
    output_tokens: u32,
    /// With conversations: where it sits.
    turn: Option<Turn>,
}

fn request(world: &World, i: u64) -> Request {
    let sc = world.scenario;
    let mut rng = Rng::new(sc.seed, Stream::Request, i, 0);
    let tenant = rng.unit_index(world.tenants.len());
    let t = &world.tenants[tenant];
    let region = if rng.unit() < 0.8 { t.home } else { rng.pick(&world.clients) };
    let mut prompt_tokens = rng.lognormal(600.0, 0.9).clamp(10.0, 32_000.0) as u32;
    let turn = world.turns.get(i as usize).copied();
    if let (Some(c), Some(t)) = (sc.conversations, turn) {
        prompt_tokens = c.tokens(t.turn + 1);
    }
    let max_output_tokens = (rng.unit() < 0.7).then(|| rng.lognormal(300.0, 0.6).clamp(16.0, 4096.0) as u32);
    let wanted = rng.lognormal(180.0, 0.8).clamp(1.0, 4096.0) as u32;
    let output_tokens = max_output_tokens.map_or(wanted, |m| wanted.min(m));
    let streaming = rng.unit() < 0.6;
    let p = rng.unit();
    let personal = p < sc.pii_share;
    let (labels, redacted) = if personal {
        (vec!["pii.email".to_string()], false)
    } else if p < 2.0 * sc.pii_share {
        (vec!["pii.email.redacted".to_string()], true)
    } else {
        (Vec::new(), false)
    };
    let summary = RequestSummary {
        request_id: format!("sim-{i}"),
        tenant: t.name.clone(),
        client_region: Some(sc.regions[region].clone()),
        node_region: sc.regions[region].clone(),
        model: MODEL.into(),
        prompt_tokens,
        max_output_tokens,
        streaming,
        labels,
        redacted,
        allowed_regions: if t.bound { vec![sc.regions[t.home].clone()] } else { Vec::new() },
        price_cap_usd: None,
        headers: Vec::new(),
    };
    Request { region, tenant, personal, summary, output_tokens, turn }
}

/// What the edge's policy says for a simulated request ([`crate::edge`]'s, for a tenant with the
/// default relay policy): its tenant's allowed regions and price cap, its labels and size, the
/// edge's region as its path.
fn policy(summary: &RequestSummary) -> Policy {
    Policy::for_request(summary, RelayPolicy::default(), vec![summary.node_region.clone()], DEFAULT_MAX_HOPS)
}

/// The report's residency check, independent of the labels and of the dispatch core that enforces
/// the rule: whether request `req` sent to target `j` takes unredacted personal data of a tenant
/// bound to its home region out of that region.
fn breaks_residency(world: &World, req: &Request, j: usize) -> bool {
    let tenant = &world.tenants[req.tenant];
    req.personal && tenant.bound && world.targets[j].region != tenant.home
}

impl Rng {
    fn unit_index(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n.saturating_sub(1))
    }
}

// ---------------------------------------------------------------------------------------------
// The edge's side, on the dispatch core: what each simulated edge knows of its targets, and one
// request's plan and attempts. The same for the simulation and for [`replay`].

/// A target as an edge is configured with it: what the simulation and [`replay`] give the
/// dispatch core and routers, through the edge's own conversions.
#[derive(Debug, Clone, PartialEq)]
pub struct SimTarget {
    /// Its name.
    pub name: String,
    /// Its region.
    pub region: Option<String>,
    /// How its capacity is bought.
    pub kind: TargetKind,
    /// What a request costs there.
    pub price: Option<PriceModel>,
}

impl SimTarget {
    /// How the edge reaches it: engines over QUIC, the rest over HTTPS (no simulated target is
    /// another edge unless its kind says so).
    fn protocol(&self) -> Protocol {
        match self.kind {
            TargetKind::Dedicated => Protocol::Engine,
            TargetKind::RemoteEdge => Protocol::PeerEdge,
            TargetKind::Managed | TargetKind::Serverless => Protocol::Managed,
        }
    }

    /// What [`routes::router_view`] takes of it. No simulated target runs on the operator's own
    /// infrastructure.
    fn facts(&self) -> TargetFacts<'_> {
        TargetFacts {
            name: &self.name,
            kind: self.kind,
            region: self.region.as_deref(),
            own_infrastructure: false,
            model: MODEL,
            price: self.price,
        }
    }
}

/// What a target does with one attempt: in the simulated world, and in a [`replay`] script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// It answers.
    Answer,
    /// It is unreachable (an outage): the connection fails.
    Down,
    /// It fails the request (502).
    Fail,
    /// Its queue is full: it turns the request away (429).
    Full,
    /// It cannot serve this kind of request; another target may.
    CannotServe,
}

impl Response {
    /// The attempt's outcome at target `target`, typed as the edge's upstream clients type it.
    pub fn outcome(self, target: &str) -> Result<(), UpstreamError> {
        let target = target.to_string();
        Err(match self {
            Response::Answer => return Ok(()),
            Response::Down => UpstreamError::Connect { target, message: "unreachable (simulated outage)".into() },
            Response::Fail => UpstreamError::Failed { target, status: 502, message: "simulated failure".into() },
            Response::Full => {
                UpstreamError::Overloaded { target, status: 429, message: "queue full (simulated)".into() }
            }
            Response::CannotServe => UpstreamError::Unsupported { target, message: "simulated".into() },
        })
    }
}

/// One attempt as it was played; times in µs from the attempt's start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Played {
    pub(crate) response: Response,
    /// Until the edge has its outcome: the whole answer, a stream's first token, the failure.
    pub(crate) latency_us: u64,
    /// A stream's time to its first token, when it answered.
    pub(crate) ttft_us: Option<u64>,
    /// Until the target is done with the request (an answer's last token): in flight until then.
    pub(crate) busy_us: u64,
}

impl Played {
    /// An attempt whose outcome comes, and whose target is done with it, after `ms`.
    pub(crate) fn after(response: Response, ms: f64) -> Played {
        Played { response, latency_us: us(ms), ttft_us: None, busy_us: us(ms) }
    }
}

/// Simulated milliseconds as whole microseconds.
pub(crate) fn us(ms: f64) -> u64 {
    (ms * 1000.0) as u64
}

/// Something an edge learns of a target, at a simulated time.
enum Observation {
    /// An attempt ended: its latency as the edge measures it, a stream's time to first token, and
    /// what its outcome means for the target's health.
    Attempt { latency: Duration, ttft: Option<Duration>, outcome: Result<(), Retry> },
    /// An active probe's answer (load and RTT), or its failure.
    Probe(Option<(EngineLoad, Option<Duration>)>),
}

/// What one simulated edge knows of its targets (by their place in its static order): the live
/// statistics the edge keeps, the observations on their way to it, and its requests in flight.
/// Simulated time is µs since `base`.
pub(crate) struct EdgeState {
    base: Instant,
    stats: Vec<TargetStats>,
    /// Observations to apply at their time: (µs, sequence) → (target, what).
    pending: BTreeMap<(u64, u64), (usize, Observation)>,
    /// Requests in flight until they end: (µs, sequence) → their count on the target.
    in_flight: BTreeMap<(u64, u64), InFlight>,
    seq: u64,
}

impl EdgeState {
    pub(crate) fn new(base: Instant, targets: usize, ejection: Ejection) -> EdgeState {
        EdgeState {
            base,
            stats: (0..targets).map(|_| TargetStats::new(ejection)).collect(),
            pending: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            seq: 0,
        }
    }

    /// The instant of simulated time `us`.
    fn at(&self, us: u64) -> Instant {
        self.base + Duration::from_micros(us)
    }

    /// A key at `us` after every other at `us`.
    fn key(&mut self, us: u64) -> (u64, u64) {
        self.seq += 1;
        (us, self.seq)
    }

    /// What target `i` will have shown the edge at `us`.
    fn observe(&mut self, us: u64, i: usize, what: Observation) {
        let key = self.key(us);
        self.pending.insert(key, (i, what));
    }

    /// A request in flight to target `i` until `us`.
    fn hold(&mut self, i: usize, us: u64) {
        let guard = self.stats[i].start();
        let key = self.key(us);
        self.in_flight.insert(key, guard);
    }

    /// The edge at `now_us`: what it has observed by then applied in time order, as the edge
    /// applies outcomes ([`TargetStats::attempt`]) and probes ([`TargetStats::probe`]), and the
    /// requests in flight that ended by then done.
    pub(crate) fn advance(&mut self, now_us: u64) {
        while let Some(entry) = self.pending.first_entry().filter(|e| e.key().0 <= now_us) {
            let ((us, _), (i, what)) = entry.remove_entry();
            let (stats, at) = (&self.stats[i], self.at(us));
            match what {
                Observation::Attempt { latency, ttft, outcome } => {
                    if let Some(ttft) = ttft {
                        stats.ttft(ttft);
                    }
                    stats.attempt(at, Some(latency), outcome);
                }
                Observation::Probe(result) => stats.probe(at, result),
            }
        }
        while let Some(entry) = self.in_flight.first_entry().filter(|e| e.key().0 <= now_us) {
            entry.remove();
        }
    }

    /// Every target's statistics at `now_us`.
    pub(crate) fn snapshots(&self, now_us: u64) -> Vec<Snapshot> {
        let now = self.at(now_us);
        self.stats.iter().map(|s| s.snapshot(now)).collect()
    }
}

/// The targets' health at the simulated time of the next attempt, for the dispatch core.
struct HealthAt<'a> {
    stats: &'a [TargetStats],
    at: Instant,
}

impl Admit for HealthAt<'_> {
    fn available(&self, i: usize) -> bool {
        self.stats[i].available(self.at)
    }

    fn admit(&mut self, i: usize) -> bool {
        self.stats[i].admit(self.at) != Admission::Skip
    }
}

/// How a request went through its attempts.
pub(crate) struct Dispatched {
    /// The targets tried, in order (indices into the candidates).
    pub(crate) tried: Vec<usize>,
    /// The target that answered, or the failure the client got.
    pub(crate) result: Result<usize, UpstreamError>,
}

/// One request at a simulated edge, from `start_us`: the step both the simulation and [`replay`]
/// take. The dispatch core plans it ([`dispatch::plan`]) and walks the plan ([`Attempts`]) at the
/// simulated time each attempt starts; `play` plays each attempt (target, start µs). An attempt's
/// outcome reaches the edge's statistics when it ends, and the target holds the request in flight
/// until it is done with it.
pub(crate) fn dispatch_request(
    edge: &mut EdgeState,
    candidates: &[Candidate],
    policy: &Policy,
    routing: RouterAnswer<'_>,
    start_us: u64,
    mut play: impl FnMut(usize, u64) -> Played,
) -> Result<Dispatched, Refusal> {
    let order = dispatch::plan(candidates, policy, routing)?;
    let mut at_us = start_us;
    let mut attempts = Attempts::new(order, &HealthAt { stats: &edge.stats, at: edge.at(at_us) });
    loop {
        let step = attempts.next(&mut HealthAt { stats: &edge.stats, at: edge.at(at_us) });
        match step {
            Step::Try(i) => {
                let played = play(i, at_us);
                let outcome = played.response.outcome(&candidates[i].name);
                let observed = Observation::Attempt {
                    latency: Duration::from_micros(played.latency_us),
                    ttft: played.ttft_us.map(Duration::from_micros),
                    outcome: outcome.as_ref().map_err(UpstreamError::retry).copied(),
                };
                edge.observe(at_us + played.latency_us, i, observed);
                edge.hold(i, at_us + played.busy_us);
                at_us += played.latency_us;
                attempts.record(i, outcome);
            }
            Step::Answered(i) => return Ok(Dispatched { tried: attempts.tried().to_vec(), result: Ok(i) }),
            Step::Failed(e) => return Ok(Dispatched { tried: attempts.tried().to_vec(), result: Err(e) }),
        }
    }
}

/// The targets' statistics as the dispatch core sees them.
pub(crate) fn candidates(targets: &[SimTarget], stats: &[Snapshot]) -> Vec<Candidate> {
    targets.iter().zip(stats).map(|(t, s)| routes::candidate(&t.facts(), t.protocol(), s)).collect()
}

// ---------------------------------------------------------------------------------------------
// A replay: a script of requests through the same step, to compare with a real edge.

/// Simulated time each replayed attempt takes.
const REPLAY_ATTEMPT_MS: f64 = 1.0;

/// A script of requests at one edge, for [`replay`].
#[derive(Debug, Clone)]
pub struct Replay {
    /// The model's targets, in static order (the requests have no router).
    pub targets: Vec<SimTarget>,
    /// The tenant's policy; each request's labels replace its `labels`.
    pub tenant: Policy,
    /// The edge's ejection settings (`[health]`).
    pub ejection: Ejection,
    /// The requests, in order.
    pub requests: Vec<ScriptedRequest>,
}

/// One request of a [`Replay`].
#[derive(Debug, Clone, Default)]
pub struct ScriptedRequest {
    /// The labels its tenant's filters gave it.
    pub labels: Vec<String>,
    /// What targets do with it, by name, when tried; a target not named answers.
    pub responses: Vec<(String, Response)>,
}

/// How a replayed request went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// The targets tried, in order.
    pub tried: Vec<String>,
    /// The target that answered, or the HTTP status of the error the client got.
    pub result: Result<String, u16>,
}

/// Runs a script through the dispatch core, one request after the other, with exactly the
/// per-request step of the simulation: what a real edge with these targets, this tenant and
/// `[health]` would try for each request, and what the client would get. Each attempt takes 1 ms
/// of simulated time and each request starts when the one before ended, so a backoff longer than
/// the script keeps an ejected target out to its end, as on an edge that serves the script within
/// the backoff.
pub fn replay(replay: &Replay) -> Vec<Replayed> {
    let mut edge = EdgeState::new(Instant::now(), replay.targets.len(), replay.ejection);
    let mut now_us = 0;
    let name = |i: usize| replay.targets[i].name.clone();
    replay
        .requests
        .iter()
        .map(|request| {
            edge.advance(now_us);
            let candidates = candidates(&replay.targets, &edge.snapshots(now_us));
            let policy = Policy { labels: request.labels.clone(), ..replay.tenant.clone() };
            let mut end_us = now_us;
            let dispatched =
                dispatch_request(&mut edge, &candidates, &policy, RouterAnswer::Static, now_us, |i, at| {
                    let response = request.responses.iter().find(|(n, _)| *n == replay.targets[i].name);
                    let played = Played::after(response.map_or(Response::Answer, |r| r.1), REPLAY_ATTEMPT_MS);
                    end_us = at + played.busy_us;
                    played
                });
            now_us = end_us;
            match dispatched {
                Ok(d) => Replayed {
                    tried: d.tried.iter().map(|&i| name(i)).collect(),
                    result: d.result.map(name).map_err(|e| GatewayError::from(e).status().as_u16()),
                },
                Err(refusal) => Replayed { tried: Vec::new(), result: Err(refusal.status()) },
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// One router's run.

/// A router's refusal of a request.
struct RouterRefused;

/// The calls to one router.
enum Caller {
    RoundRobin(usize),
    Session { rt: tokio::runtime::Runtime, plugin: RouterPlugin, session: Box<RouterSession> },
    Fresh { rt: tokio::runtime::Runtime, plugin: RouterPlugin },
}

impl Caller {
    /// The router's answer, as the edge's chain takes it: its order, or its failure.
    fn route(&mut self, summary: &RequestSummary, targets: &[Target], held: &[u32]) -> Result<Routing, RouterRefused> {
        let outcome = match self {
            Caller::RoundRobin(next) => {
                let n = targets.len();
                let start = *next % n.max(1);
                *next += 1;
                let turn = (0..n).map(|k| &targets[(start + k) % n]);
                let (up, down): (Vec<&Target>, Vec<&Target>) = turn.partition(|t| t.health != Health::Down);
                return Ok(Routing::Order(up.into_iter().chain(down).map(|t| t.name.clone()).collect()));
            }
            Caller::Session { rt, plugin, session } => {
                let outcome = rt.block_on(session.route(summary, targets, held));
                if outcome.is_err() {
                    // The instance is gone; the next call gets a new one.
                    **session = plugin.session();
                }
                outcome
            }
            Caller::Fresh { rt, plugin } => rt.block_on(plugin.route(summary, targets, held)),
        };
        match outcome {
            Ok(Outcome::Route(d)) => Ok(Routing::Order(d.targets)),
            Ok(Outcome::Reject(_)) => Err(RouterRefused),
            Err(e) => Ok(Routing::Failed(e.to_string())),
        }
    }
}

fn load(world: &World, spec: &RouterSpec, runtime: Option<Arc<PluginRuntime>>) -> Result<Caller, PluginError> {
    let RouterSpec::Wasm { name, file, config } = spec else { return Ok(Caller::RoundRobin(0)) };
    let runtime = runtime.ok_or_else(|| PluginError::Runtime("no plugin runtime".into()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| PluginError::Io { path: PathBuf::from("<tokio runtime>"), source })?;
    let path = world.scenario.plugin_dir.join(file);
    // A generous deadline: four routers share two cores here, and a descheduled call must not
    // count as the router's failure.
    let limits = CallLimits { deadline_ms: 1_000, max_memory_bytes: None };
    let plugin = rt.block_on(runtime.load_router(name, "sim", &path, config, limits))?;
    Ok(match world.scenario.instances {
        InstanceMode::Reuse => {
            let session = Box::new(plugin.session());
            Caller::Session { rt, plugin, session }
        }
        InstanceMode::Fresh => Caller::Fresh { rt, plugin },
    })
}

/// The hashes naming the first `n` beginnings of a conversation (its agent's system prompt, then
/// each turn after it), as engines list them and the edge matches them; the one at index `j`
/// covers [`Conversations::tokens`]`(j)` tokens. The first is the agent's, shared by its
/// conversations.
fn beginnings(seed: u64, at: Turn, n: u32) -> Vec<u64> {
    let agent = mix(seed ^ mix(u64::from(at.agent)));
    let conversation = mix(agent ^ u64::from(at.conversation));
    (0..n).map(|j| if j == 0 { agent } else { mix(conversation ^ u64::from(j)) }).collect()
}

/// A simulated engine's prefix cache (see [`Conversations`]): per conversation, where it is, how
/// many of its beginnings the engine holds and when it last used them.
#[derive(Debug, Default)]
struct PrefixLru {
    held: BTreeMap<u32, (Turn, u32, u64)>,
    tokens: u64,
    clock: u64,
}

impl PrefixLru {
    /// How many beginnings of `at`'s conversation it holds, up to `upto` (its agent's system prompt
    /// alone when only another conversation of the agent is held); marks them used.
    fn lookup(&mut self, at: Turn, upto: u32) -> u32 {
        self.clock += 1;
        if let Some((_, n, used)) = self.held.get_mut(&at.conversation) {
            *used = self.clock;
            return (*n).min(upto);
        }
        let agent = self.held.values_mut().find(|(t, _, _)| t.agent == at.agent);
        agent.map_or(0, |(_, _, used)| {
            *used = self.clock;
            1
        })
    }

    /// Keeps the first `n` beginnings of `at`'s conversation (replacing what it held of it), then
    /// evicts the least recently used conversations until it fits.
    fn keep(&mut self, conv: &Conversations, at: Turn, n: u32) {
        self.clock += 1;
        let size = |n: u32| u64::from(conv.tokens(n.saturating_sub(1)));
        if let Some((_, old, _)) = self.held.insert(at.conversation, (at, n, self.clock)) {
            self.tokens -= size(old);
        }
        self.tokens += size(n);
        while self.tokens > conv.cache_tokens {
            let Some((&oldest, &(_, m, _))) = self.held.iter().min_by_key(|(_, (_, _, used))| *used) else { break };
            self.held.remove(&oldest);
            self.tokens -= size(m);
        }
    }

    /// What its engine's health lists: (hash, tokens) of every beginning held, most recently used
    /// conversation first, at most as many as an engine lists.
    fn listed(&self, seed: u64, conv: &Conversations) -> Vec<(u64, u32)> {
        let mut held: Vec<&(Turn, u32, u64)> = self.held.values().collect();
        held.sort_by_key(|(_, _, used)| Reverse(*used));
        held.into_iter()
            .flat_map(|&(at, n, _)| {
                beginnings(seed, at, n).into_iter().enumerate().rev().map(|(j, h)| (h, conv.tokens(j as u32)))
            })
            .take(meridian_engine::api::MAX_HELD_PREFIXES)
            .collect()
    }
}

/// The simulated targets' own state, whatever edge calls them: when each engine slot is free and
/// who waits in each engine's queue, until when each serverless endpoint is warm, and with
/// conversations, what each engine's prefix cache holds.
struct Capacity {
    slots: Vec<Vec<f64>>,
    /// Start times (µs) of requests queued at each engine.
    queued: Vec<BinaryHeap<Reverse<u64>>>,
    warm_until: Vec<f64>,
    prefixes: Vec<PrefixLru>,
}

impl Capacity {
    fn new(world: &World) -> Capacity {
        let slots = world
            .targets
            .iter()
            .map(|t| match t.config.price {
                Some(PriceModel::Hour { capacity, .. }) => vec![0.0; capacity.max(1) as usize],
                _ => Vec::new(),
            })
            .collect();
        let n = world.targets.len();
        Capacity {
            slots,
            queued: vec![BinaryHeap::new(); n],
            warm_until: vec![f64::NEG_INFINITY; n],
            prefixes: (0..n).map(|_| PrefixLru::default()).collect(),
        }
    }

    /// Plays request `i`'s attempt at target `j`, started at `start` ms: in an outage the
    /// connection fails after the connect timeout; an engine whose queue is full turns it away;
    /// else it queues for a slot, starts cold at an idle serverless endpoint, and fails or answers
    /// after its time to first token. What it costs is billed to `report`.
    fn play(
        &mut self,
        world: &World,
        req: &Request,
        i: u64,
        j: usize,
        start: f64,
        report: &mut RouterReport,
    ) -> Played {
        let t = &world.targets[j];
        report.attempts += 1;
        let mut rng = Rng::new(world.scenario.seed, Stream::Attempt, i, j as u64);
        let net = world.rtt[req.region][t.region] * rng.lognormal(1.0, 0.25);
        let ttft_server = rng.lognormal(t.ttft_ms, 0.3);
        let tps = rng.lognormal(t.tokens_per_s, 0.1);
        let fails = rng.unit() < t.failure;
        if world.in_outage(j, start) {
            return Played::after(Response::Down, CONNECT_TIMEOUT_MS);
        }
        let arrive = start + net / 2.0;
        let (mut wait, mut slot) = (0.0, None);
        if !self.slots[j].is_empty() {
            let (k, &free) = self.slots[j].iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).expect("slots");
            wait = (free - arrive).max(0.0);
            slot = Some(k);
            let queue = &mut self.queued[j];
            while queue.peek().is_some_and(|Reverse(s)| *s <= us(arrive)) {
                queue.pop();
            }
            if wait > 0.0 {
                if queue.len() >= self.slots[j].len() * ENGINE_QUEUE_PER_SLOT {
                    report.overloaded += 1;
                    return Played::after(Response::Full, net);
                }
                queue.push(Reverse(us(arrive + wait)));
            }
        }
        let serverless = t.config.kind == TargetKind::Serverless;
        let cold = if serverless && arrive > self.warm_until[j] { rng.lognormal(COLD_START_MS, 0.3) } else { 0.0 };
        // An engine prefills what its prefix cache does not hold of the conversation, and keeps
        // the whole prompt for the next turn.
        let mut ttft_server = ttft_server;
        if let (Some(conv), Some(at), TargetKind::Dedicated) = (world.scenario.conversations, req.turn, t.config.kind) {
            let prompt = req.summary.prompt_tokens;
            let held = self.prefixes[j].lookup(at, at.turn + 1);
            let reused = if held == 0 { 0 } else { conv.tokens(held - 1) };
            ttft_server += f64::from(prompt - reused) * conv.prefill_ms_per_token;
            report.engine_prompt_tokens += u64::from(prompt);
            report.prefix_tokens_reused += u64::from(reused);
            if !fails {
                self.prefixes[j].keep(&conv, at, at.turn + 2);
            }
        }
        let first_token = net + wait + cold + ttft_server;
        let generate = if fails { 0.0 } else { req.output_tokens as f64 / tps * 1000.0 };
        let busy_ms = cold + ttft_server + generate;
        if let Some(k) = slot {
            self.slots[j][k] = arrive + wait + busy_ms;
        }
        if serverless {
            self.warm_until[j] = self.warm_until[j].max(arrive + wait + busy_ms + SERVERLESS_IDLE_MS);
        }
        report.variable_usd += match t.config.price {
            // A failed managed call is not billed; a serverless GPU bills its busy time.
            Some(PriceModel::Token { input_usd_per_mtok, output_usd_per_mtok, .. }) if !fails => {
                (req.summary.prompt_tokens as f64 * input_usd_per_mtok + req.output_tokens as f64 * output_usd_per_mtok)
                    / 1e6
            }
            Some(PriceModel::GpuSecond { usd_per_second, .. }) => busy_ms / 1000.0 * usd_per_second,
            _ => 0.0,
        };
        if fails {
            return Played::after(Response::Fail, first_token);
        }
        // The edge has a whole answer at its end, a stream at its first token.
        let end = first_token + generate;
        let streaming = req.summary.streaming;
        Played {
            response: Response::Answer,
            latency_us: us(if streaming { first_token } else { end }),
            ttft_us: streaming.then(|| us(first_token)),
            busy_us: us(end),
        }
    }
}

/// The edges' probes of their engine targets, every `[health] probe_interval_ms` (managed and
/// serverless targets are not probed, as at the edge).
struct Probes {
    every_ms: f64,
    next_ms: f64,
    round: u64,
}

impl Probes {
    /// Sends every edge the probes due by `now` ms: an engine in an outage (or unlucky) fails
    /// one, else it reports its capacity and what its prefix cache holds (the load figures routers
    /// do not see are left at 0), with the RTT.
    fn due(&mut self, world: &World, edges: &mut [EdgeState], capacity: &Capacity, now: f64) {
        let sc = world.scenario;
        while self.next_ms <= now {
            for (e, edge) in edges.iter_mut().enumerate() {
                let model = &world.edges[e];
                for (k, (&j, target)) in model.order.iter().zip(&model.targets).enumerate() {
                    if target.protocol() != Protocol::Engine {
                        continue;
                    }
                    let t = &world.targets[j];
                    let mut rng = Rng::new(sc.seed, Stream::Probe, self.round, (e * world.targets.len() + j) as u64);
                    let answered = !world.in_outage(j, self.next_ms) && rng.unit() >= t.failure;
                    let result = answered.then(|| {
                        let rtt = world.rtt[e][t.region] * rng.lognormal(1.0, 0.25);
                        let prefixes = sc.conversations.map_or_else(HeldPrefixes::default, |conv| {
                            HeldPrefixes::new([(MODEL.to_string(), capacity.prefixes[j].listed(sc.seed, &conv))])
                        });
                        let load = EngineLoad {
                            provider: "simulated".into(),
                            tokens_per_second: t.tokens_per_s,
                            queue_depth: 0,
                            active_sequences: 0,
                            max_batch: sc.engine_capacity,
                            prefixes: Arc::new(prefixes),
                            ..Default::default()
                        };
                        (load, Some(Duration::from_micros(us(rtt))))
                    });
                    edge.observe(us(self.next_ms), k, Observation::Probe(result));
                }
            }
            self.next_ms += self.every_ms;
            self.round += 1;
        }
    }
}

fn simulate_router(
    world: &World,
    spec: &RouterSpec,
    runtime: Option<Arc<PluginRuntime>>,
) -> Result<RouterReport, PluginError> {
    let mut caller = load(world, spec, runtime)?;
    let sc = world.scenario;
    let nr = sc.regions.len();
    let ejection = Ejection::from(&sc.health);
    let mut edges: Vec<EdgeState> =
        world.edges.iter().map(|e| EdgeState::new(world.base, e.targets.len(), ejection)).collect();
    let mut capacity = Capacity::new(world);
    let mut probes = Probes { every_ms: sc.health.probe_interval_ms as f64, next_ms: 0.0, round: 0 };

    let mut report = RouterReport {
        name: spec.name().to_string(),
        requests: 0,
        served: 0,
        errors: 0,
        refused: 0,
        timed_out: 0,
        overloaded: 0,
        attempts: 0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        ttft_p50_ms: 0.0,
        ttft_p99_ms: 0.0,
        variable_usd: 0.0,
        fixed_usd: 0.0,
        residency_violations: 0,
        router_failures: 0,
        served_by_region: vec![0; nr],
        served_by_kind: [0; 3],
        engine_prompt_tokens: 0,
        prefix_tokens_reused: 0,
    };
    let mut latencies: Vec<f32> = Vec::with_capacity(sc.requests);
    let mut ttfts: Vec<f32> = Vec::with_capacity(sc.requests);
    let mut arrivals = Rng::new(sc.seed, Stream::Arrival, 0, 0);
    let mean_gap_ms = 1000.0 / sc.arrival_rate_per_s;
    let mut now = 0.0;

    for i in 0..sc.requests as u64 {
        now += arrivals.exponential(mean_gap_ms);
        probes.due(world, &mut edges, &capacity, now);
        let req = request(world, i);
        let (model, edge) = (&world.edges[req.region], &mut edges[req.region]);
        let now_us = us(now);
        edge.advance(now_us);
        let stats = edge.snapshots(now_us);
        report.requests += 1;
        let inputs: Vec<Target> =
            model.targets.iter().zip(&stats).map(|(t, s)| routes::router_view(&t.facts(), s)).collect();
        let conversation = req.turn.map_or_else(Vec::new, |at| beginnings(sc.seed, at, at.turn + 2));
        let held: Vec<u32> = stats.iter().map(|s| routes::held_tokens(s, MODEL, &conversation)).collect();
        let Ok(routing) = caller.route(&req.summary, &inputs, &held) else {
            report.errors += 1;
            report.refused += 1;
            continue;
        };
        report.router_failures += u64::from(matches!(routing, Routing::Failed(_)));
        // Client to its edge, and the edge's own work.
        let start = now + Rng::new(sc.seed, Stream::Request, i, 1).lognormal(10.0, 0.4) + 1.0;
        let mut last = None;
        let dispatched = dispatch_request(
            edge,
            &candidates(&model.targets, &stats),
            &policy(&req.summary),
            routing.answer(),
            us(start),
            |k, at| {
                let played = capacity.play(world, &req, i, model.order[k], at as f64 / 1000.0, &mut report);
                last = Some((at, played));
                played
            },
        );
        let Ok(dispatched) = dispatched else {
            report.errors += 1;
            report.refused += 1;
            continue;
        };
        let violated = dispatched.tried.iter().any(|&k| breaks_residency(world, &req, model.order[k]));
        report.residency_violations += u64::from(violated);
        let (Ok(k), Some((at, played))) = (dispatched.result, last) else {
            report.errors += 1;
            continue;
        };
        // End to end: from the client's request to the answer's last token.
        let elapsed = (at + played.busy_us - now_us) as f64 / 1000.0;
        if elapsed > CLIENT_TIMEOUT_MS {
            report.errors += 1;
            report.timed_out += 1;
            continue;
        }
        let j = model.order[k];
        report.served += 1;
        report.served_by_region[world.targets[j].region] += 1;
        let kind = match world.targets[j].config.kind {
            TargetKind::Managed | TargetKind::RemoteEdge => 0,
            TargetKind::Serverless => 1,
            TargetKind::Dedicated => 2,
        };
        report.served_by_kind[kind] += 1;
        latencies.push(elapsed as f32);
        if let Some(ttft) = played.ttft_us {
            ttfts.push((at + ttft - now_us) as f32 / 1000.0);
        }
    }

    let engines_usd_per_hour: f64 = world
        .targets
        .iter()
        .map(|t| match t.config.price {
            Some(PriceModel::Hour { usd_per_hour, .. }) => usd_per_hour,
            _ => 0.0,
        })
        .sum();
    report.fixed_usd = engines_usd_per_hour * world.span_ms / 3_600_000.0;
    report.p50_ms = percentile(&mut latencies, 0.50);
    report.p99_ms = percentile(&mut latencies, 0.99);
    report.ttft_p50_ms = percentile(&mut ttfts, 0.50);
    report.ttft_p99_ms = percentile(&mut ttfts, 0.99);
    Ok(report)
}

fn percentile(values: &mut [f32], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let k = ((values.len() - 1) as f64 * p).round() as usize;
    let (_, v, _) = values.select_nth_unstable_by(k, f32::total_cmp);
    f64::from(*v)
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;

    /// 10k requests over the default three regions, once for all the tests.
    fn small() -> &'static Report {
        static REPORT: OnceLock<Report> = OnceLock::new();
        REPORT.get_or_init(|| {
            let report = run(&Scenario::new(10_000, 3, 7)).expect("the routers load (run scripts/build-plugins)");
            println!("{report}");
            report
        })
    }

    #[test]
    fn in_conversations_the_prefix_router_serves_from_the_engines_caches() {
        let report = run(&Scenario::conversations(6_000, 3)).expect("the routers load (run scripts/build-plugins)");
        println!("{report}");
        let latency = report.router("latency-router").expect("in the report");
        let prefix = report.router("prefix-router").expect("in the report");
        assert!(
            prefix.prefix_share() > latency.prefix_share() + 0.2,
            "prefix {:.3} vs latency {:.3}",
            prefix.prefix_share(),
            latency.prefix_share()
        );
        assert!(prefix.ttft_p50_ms < latency.ttft_p50_ms, "{} vs {}", prefix.ttft_p50_ms, latency.ttft_p50_ms);
        assert!(prefix.errors <= latency.errors, "{} vs {}", prefix.errors, latency.errors);
    }

    fn router(name: &str) -> &'static RouterReport {
        small().router(name).unwrap_or_else(|| panic!("no {name} in the report"))
    }

    #[test]
    fn no_router_takes_personal_data_out_of_its_allowed_regions() {
        // Round-robin is blind to residency: the host's invariants hold for it as for the others.
        for r in &small().routers {
            assert_eq!(r.residency_violations, 0, "{}", r.name);
        }
        // And the rule had work to do: requests with personal data of residency-bound tenants.
        let scenario = Scenario::new(10_000, 3, 7);
        let world = World::build(&scenario);
        let bound = |req: &Request| req.personal && world.tenants[req.tenant].bound;
        assert!((0..10_000).filter(|&i| bound(&request(&world, i))).count() > 100);
    }

    #[test]
    fn the_report_checks_residency_from_the_generated_world() {
        let scenario = Scenario::new(1_000, 3, 7);
        let world = World::build(&scenario);
        let req = (0..1_000)
            .map(|i| request(&world, i))
            .find(|r| r.personal && world.tenants[r.tenant].bound)
            .expect("a request with personal data of a residency-bound tenant");
        let home = world.tenants[req.tenant].home;
        for (j, t) in world.targets.iter().enumerate() {
            assert_eq!(breaks_residency(&world, &req, j), t.region != home, "{}", t.config.name);
        }
    }

    #[test]
    fn latency_router_beats_round_robin_at_the_median() {
        let (latency, rr) = (router("latency-router"), router("round-robin"));
        assert!(latency.p50_ms < rr.p50_ms, "{} vs {}", latency.p50_ms, rr.p50_ms);
    }

    #[test]
    fn cost_router_is_cheaper_per_request_while_engines_have_spare_capacity() {
        // Engines with room for every region's load: paid-for capacity costs nothing more.
        let mut scenario = Scenario::new(5_000, 3, 11);
        scenario.engine_capacity = 256;
        scenario.routers.retain(|r| matches!(r.name(), "round-robin" | "cost-router"));
        let report = run(&scenario).expect("a run");
        let (cost, rr) = (report.router("cost-router").unwrap(), report.router("round-robin").unwrap());
        assert!(
            cost.usd_per_request() < rr.usd_per_request(),
            "{} vs {}",
            cost.usd_per_request(),
            rr.usd_per_request()
        );
        // It fills the engines first; round-robin gives them a third.
        assert!(cost.served_by_kind[2] as f64 > 0.9 * cost.served as f64, "{:?}", cost.served_by_kind);
        assert!(rr.served_by_kind[2] as f64 <= 0.4 * rr.served as f64, "{:?}", rr.served_by_kind);
        // Under the default, saturated engines it is still cheaper than the routers that ignore
        // price for speed or turn (not than the static nearest-first order, whose regional
        // per-token APIs are cheap too).
        let cost = router("cost-router").usd_per_request();
        for name in ["round-robin", "latency-router"] {
            assert!(cost < router(name).usd_per_request(), "{cost} vs {name}'s {}", router(name).usd_per_request());
        }
    }

    #[test]
    fn every_request_is_accounted_for_and_no_router_call_fails() {
        for r in &small().routers {
            assert_eq!(r.requests, 10_000);
            assert_eq!(r.served + r.errors, r.requests, "{}", r.name);
            assert_eq!(r.served_by_region.iter().sum::<u64>(), r.served);
            assert_eq!(r.served_by_kind.iter().sum::<u64>(), r.served);
            assert_eq!(r.router_failures, 0, "{}", r.name);
        }
    }

    #[test]
    fn same_seed_same_report_and_another_seed_differs() {
        let scenario = Scenario::new(2_000, 4, 42);
        let (a, b) = (run(&scenario).expect("a run"), run(&scenario).expect("a run"));
        assert_eq!(a, b);
        assert_eq!(a.to_string(), b.to_string());
        let other = run(&Scenario { seed: 43, ..scenario }).expect("a run");
        assert_ne!(a.routers, other.routers);
    }

    #[test]
    fn fresh_instances_give_the_same_decisions_as_a_reused_one() {
        let scenario = Scenario { instances: InstanceMode::Fresh, ..Scenario::new(1_000, 3, 5) };
        let fresh = run(&scenario).expect("a run");
        let reused = run(&Scenario { instances: InstanceMode::Reuse, ..scenario }).expect("a run");
        assert_eq!(fresh.routers, reused.routers);
    }

    fn managed(name: &str, region: &str) -> SimTarget {
        SimTarget { name: name.into(), region: Some(region.into()), kind: TargetKind::Managed, price: None }
    }

    fn scripted(pii: bool, responses: &[(&str, Response)]) -> ScriptedRequest {
        ScriptedRequest {
            labels: if pii { vec!["pii.email".into()] } else { Vec::new() },
            responses: responses.iter().map(|(n, r)| (n.to_string(), *r)).collect(),
        }
    }

    fn replayed(tried: &[&str], result: Result<&str, u16>) -> Replayed {
        Replayed { tried: tried.iter().map(|s| s.to_string()).collect(), result: result.map(str::to_string) }
    }

    #[test]
    fn a_replay_follows_the_dispatch_core() {
        use Response::{CannotServe, Fail, Full};
        let long = Duration::from_secs(60);
        let mut script = Replay {
            targets: vec![managed("a", "us-east"), managed("b", "eu-west"), managed("c", "ap-south")],
            tenant: Policy { allowed_regions: vec!["eu-west".into()], ..Policy::default() },
            ejection: Ejection { threshold: 2, base: long, max: long },
            requests: vec![
                scripted(false, &[("a", Fail)]),
                // Not a failure of the target: it does not count toward ejection.
                scripted(false, &[("a", CannotServe)]),
                scripted(false, &[("a", Fail)]),
                scripted(false, &[]),
                scripted(true, &[("b", Fail)]),
                scripted(true, &[("b", CannotServe)]),
                scripted(false, &[("b", Full), ("c", Fail)]),
                scripted(false, &[]),
                scripted(true, &[]),
            ],
        };
        let want = [
            replayed(&["a", "b"], Ok("b")),
            replayed(&["a", "b"], Ok("b")),
            replayed(&["a", "b"], Ok("b")),
            replayed(&["b"], Ok("b")),       // a ejected
            replayed(&["b"], Err(502)),      // personal data: eu-west only
            replayed(&["b"], Err(400)),      // nothing could serve it
            replayed(&["b", "c"], Err(502)), // the last failure; b is ejected now
            replayed(&["c"], Ok("c")),
            replayed(&["b"], Ok("b")), // every allowed target is out: tried anyway
        ];
        assert_eq!(replay(&script), want);

        script.tenant.allowed_regions = vec!["sa-east".into()];
        script.requests = vec![scripted(true, &[])];
        assert_eq!(replay(&script), [replayed(&[], Err(451))], "refused by residency");
    }

    #[test]
    fn region_names_and_rtts() {
        assert_eq!(Scenario::region_names(3), ["us-east", "eu-west", "ap-south"]);
        assert_eq!(Scenario::region_names(12)[11], "region-12");
        let scenario = Scenario::new(10, 3, 1);
        let world = World::build(&scenario);
        // us-east ↔ eu-west about 80 ms, us-east ↔ ap-south about 200 ms.
        assert!((70.0..95.0).contains(&world.rtt[0][1]), "{}", world.rtt[0][1]);
        assert!((180.0..220.0).contains(&world.rtt[0][2]), "{}", world.rtt[0][2]);
        assert_eq!(world.rtt[1][1], 2.0);
    }
}
