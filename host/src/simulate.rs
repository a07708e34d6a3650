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
//! - **What the edge sees** (the target list given to the router): per edge, smoothed TTFT and
//!   latency (an exponentially weighted average of completed attempts and of probes every 5 s;
//!   latency is normalized to a 256-token answer so that answer length does not bias it),
//!   health (3 consecutive failures eject a target for 10 s, a failure or an error rate over 20%
//!   degrades it), in-flight counts and engine capacity. Observations reach the edge when the
//!   attempt ends, not when it starts.
//!
//! Each request asks its router for an ordered target list and tries the targets in order as the
//! edge does (ejected targets skipped unless all are; a failed attempt costs its latency and moves
//! on); all failing is an error, a refusal
//! too. A request counts as a residency violation when any attempt went where
//! [`residency_allows`] says it may not. Cost is what each attempt is billed under its target's
//! model; dedicated engines cost their hours over the simulated span whatever the router does.
//!
//! A Wasm router runs by default on one reused instance per router ([`RouterSession`]), each
//! router on its own thread: instantiating per call (what the edge does, ~25 µs) for millions of
//! calls would dominate the run. [`InstanceMode::Fresh`] runs the edge's per-call path instead.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::plugin::{
    CallLimits, Health, HourPrice, Outcome, PluginError, PluginMetrics, PluginRuntime, PluginSettings, PriceModel,
    RequestSummary, RouterPlugin, RouterSession, Target, TargetKind, TokenPrice,
};

/// Output tokens the edge normalizes smoothed latency to (the SDK's default output estimate).
const REFERENCE_OUTPUT_TOKENS: f64 = 256.0;
/// Time a failed connection costs an attempt during an outage.
const CONNECT_TIMEOUT_MS: f64 = 1_500.0;
/// Consecutive failures that eject a target, and for how long.
const EJECT_AFTER: u32 = 3;
const EJECT_MS: f64 = 10_000.0;
/// How often each edge probes each target.
const PROBE_EVERY_MS: f64 = 5_000.0;
/// Weight of a new observation in the smoothed stats.
const EWMA_ALPHA: f64 = 0.2;
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
    /// blind to residency, latency and price.
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
        let wasm = |name: &str| RouterSpec::Wasm {
            name: name.into(),
            file: format!("{}.wasm", name.replace('-', "_")),
            config: "{}".into(),
        };
        vec![wasm("latency-router"), wasm("cost-router"), wasm("residency")]
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
    /// Where the router components are (`target/wasm32-wasip2/release` by default).
    pub plugin_dir: PathBuf,
    /// The plugin runtime's artifact cache.
    pub plugin_cache_dir: PathBuf,
    /// How Wasm routers get instances.
    pub instances: InstanceMode,
}

impl Scenario {
    /// The defaults: `requests` requests over `regions` regions, 150 requests/s, 24 tenants (30% of
    /// them residency-bound), 10% of requests with unredacted PII, a 16-slot $2/hour engine per
    /// region, round-robin and the shipped routers.
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
            plugin_dir: target.join("wasm32-wasip2/release"),
            plugin_cache_dir: std::env::temp_dir().join("meridian-simulate-plugin-cache"),
            instances: InstanceMode::Reuse,
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
    /// (60 s), or the router refused.
    pub errors: u64,
    /// Of the errors, the router's refusals.
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
    /// Requests sent (in any attempt) to a target the residency rule forbids for them.
    pub residency_violations: u64,
    /// Router calls that failed (trap, timeout, invalid answer) and fell back to the static order.
    pub router_failures: u64,
    /// Answered requests by the serving target's region (in [`Report::regions`] order).
    pub served_by_region: Vec<u64>,
    /// Answered requests by the serving target's kind: managed, serverless, dedicated.
    pub served_by_kind: [u64; 3],
}

impl RouterReport {
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
        routers: results.into_iter().collect::<Result<_, _>>()?,
    })
}

/// The residency rule of the plugin contract (the SDK's `residency_allows`): a request with
/// unredacted personal data (a `pii.` label not ending in `.redacted`) goes only to the tenant's
/// own infrastructure or a target in an allowed region (any region when none is listed).
pub fn residency_allows(summary: &RequestSummary, target: &Target) -> bool {
    let pii = crate::chain::carries_unredacted_pii(&summary.labels);
    if !pii || target.own_infrastructure {
        return true;
    }
    match &target.region {
        None => false,
        Some(region) => summary.allowed_regions.is_empty() || summary.allowed_regions.contains(region),
    }
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
enum Stream {
    World = 1,
    Arrival,
    Request,
    Attempt,
    Probe,
    Outage,
}

/// SplitMix64, started from the seed, a stream and two keys.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: Stream, a: u64, b: u64) -> Rng {
        Rng(mix(seed ^ mix((stream as u64) ^ mix(a ^ mix(b.wrapping_add(0x5851_F42D))))))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit();
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Log-normal with this median and log-space standard deviation.
    fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }

    fn exponential(&mut self, mean: f64) -> f64 {
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
    kind: TargetKind,
    price: PriceModel,
    ttft_ms: f64,
    tokens_per_s: f64,
    failure: f64,
    /// Outage windows, sorted: (start ms, end ms).
    outages: Vec<(f64, f64)>,
    /// The target as the router sees it, stats zeroed.
    base: Target,
}

struct Tenant {
    name: String,
    home: usize,
    allowed: Vec<String>,
}

struct World<'a> {
    scenario: &'a Scenario,
    /// RTT between regions, ms.
    rtt: Vec<Vec<f64>>,
    clients: Vec<f64>,
    targets: Vec<TargetSpec>,
    tenants: Vec<Tenant>,
    /// Per edge region: target indices in its static order (own region first, then by RTT).
    static_order: Vec<Vec<usize>>,
    span_ms: f64,
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
            let specs = [
                (
                    "managed",
                    TargetKind::Managed,
                    PriceModel::Token(TokenPrice { input_usd_per_mtok: input, output_usd_per_mtok: 4.0 * input }),
                    rng.range(250.0, 450.0),
                    rng.range(70.0, 110.0),
                    0.010,
                ),
                (
                    "serverless",
                    TargetKind::Serverless,
                    PriceModel::GpuSecond(rng.range(0.5, 1.5) / 3600.0),
                    rng.range(180.0, 300.0),
                    rng.range(50.0, 80.0),
                    0.020,
                ),
                (
                    "engine",
                    TargetKind::Dedicated,
                    PriceModel::Hour(HourPrice {
                        usd_per_hour: scenario.engine_usd_per_hour,
                        capacity: scenario.engine_capacity,
                    }),
                    rng.range(100.0, 160.0),
                    rng.range(100.0, 140.0),
                    0.005,
                ),
            ];
            for (suffix, kind, price, ttft_ms, tokens_per_s, failure) in specs {
                let j = targets.len() as u64;
                let capacity = match price {
                    PriceModel::Hour(h) => Some(h.capacity),
                    _ => None,
                };
                let base = Target {
                    name: format!("{region}/{suffix}"),
                    kind,
                    region: Some(region.clone()),
                    own_infrastructure: false,
                    model: "m".into(),
                    price: Some(price),
                    health: Health::Healthy,
                    latency_ms: 0.0,
                    ttft_ms: 0.0,
                    in_flight: 0,
                    capacity,
                };
                targets.push(TargetSpec {
                    region: r,
                    kind,
                    price,
                    ttft_ms,
                    tokens_per_s,
                    failure: failure * scenario.failure_scale,
                    outages: outages(seed, j, span_ms, 0.25 * scenario.failure_scale),
                    base,
                });
            }
        }
        let tenants = (0..scenario.tenants)
            .map(|i| {
                let mut rng = Rng::new(seed, Stream::World, 1, i as u64);
                let home = rng.pick(&clients);
                let bound = rng.unit() < scenario.residency_tenant_share;
                Tenant {
                    name: format!("tenant-{i}"),
                    home,
                    allowed: if bound { vec![scenario.regions[home].clone()] } else { Vec::new() },
                }
            })
            .collect();
        let static_order = (0..n)
            .map(|edge| {
                let mut order: Vec<usize> = (0..targets.len()).collect();
                // Stable: within a region, managed, serverless, engine, as built.
                order.sort_by(|&a, &b| rtt[edge][targets[a].region].total_cmp(&rtt[edge][targets[b].region]));
                order
            })
            .collect();
        World { scenario, rtt, clients, targets, tenants, static_order, span_ms }
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
    summary: RequestSummary,
    output_tokens: u32,
}

fn request(world: &World, i: u64) -> Request {
    let sc = world.scenario;
    let mut rng = Rng::new(sc.seed, Stream::Request, i, 0);
    let tenant = rng.unit_index(world.tenants.len());
    let t = &world.tenants[tenant];
    let region = if rng.unit() < 0.8 { t.home } else { rng.pick(&world.clients) };
    let prompt_tokens = rng.lognormal(600.0, 0.9).clamp(10.0, 32_000.0) as u32;
    let max_output_tokens = (rng.unit() < 0.7).then(|| rng.lognormal(300.0, 0.6).clamp(16.0, 4096.0) as u32);
    let wanted = rng.lognormal(180.0, 0.8).clamp(1.0, 4096.0) as u32;
    let output_tokens = max_output_tokens.map_or(wanted, |m| wanted.min(m));
    let streaming = rng.unit() < 0.6;
    let p = rng.unit();
    let (labels, redacted) = if p < sc.pii_share {
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
        model: "m".into(),
        prompt_tokens,
        max_output_tokens,
        streaming,
        labels,
        redacted,
        allowed_regions: t.allowed.clone(),
        price_cap_usd: None,
        headers: Vec::new(),
    };
    Request { region, summary, output_tokens }
}

impl Rng {
    fn unit_index(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n.saturating_sub(1))
    }
}

// ---------------------------------------------------------------------------------------------
// One router's run.

/// What an edge knows of a target.
#[derive(Clone)]
struct View {
    latency_ms: f64,
    ttft_ms: f64,
    failures: u32,
    down_until: f64,
    last_failed: bool,
    error_rate: f64,
}

impl View {
    fn health(&self, now: f64) -> Health {
        if now < self.down_until {
            Health::Down
        } else if self.last_failed || self.error_rate > 0.2 {
            Health::Degraded
        } else {
            Health::Healthy
        }
    }

    fn observe(&mut self, at: f64, obs: Obs) {
        match obs {
            Obs::Ok { ttft_ms, latency_ms } => {
                let ewma = |old: f64, new: f64| if old == 0.0 { new } else { old + EWMA_ALPHA * (new - old) };
                self.ttft_ms = ewma(self.ttft_ms, ttft_ms);
                self.latency_ms = ewma(self.latency_ms, latency_ms);
                self.failures = 0;
                self.last_failed = false;
                self.error_rate *= 0.95;
            }
            Obs::Failed => {
                self.failures += 1;
                self.last_failed = true;
                self.error_rate = self.error_rate * 0.95 + 0.05;
                if self.failures >= EJECT_AFTER {
                    self.down_until = self.down_until.max(at + EJECT_MS);
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Obs {
    Ok { ttft_ms: f64, latency_ms: f64 },
    Failed,
}

/// The calls to one router.
enum Caller {
    RoundRobin(usize),
    Session { rt: tokio::runtime::Runtime, plugin: RouterPlugin, session: Box<RouterSession> },
    Fresh { rt: tokio::runtime::Runtime, plugin: RouterPlugin },
}

impl Caller {
    /// The router's answer as target indices, `Err(())` for a refusal, `None` for a failure.
    fn route(
        &mut self,
        summary: &RequestSummary,
        targets: &[Target],
        names: &HashMap<String, usize>,
    ) -> Option<Result<Vec<usize>, ()>> {
        let outcome = match self {
            Caller::RoundRobin(next) => {
                let n = targets.len();
                let start = *next % n.max(1);
                *next += 1;
                let turn = (0..n).map(|k| (start + k) % n);
                let (up, down): (Vec<usize>, Vec<usize>) = turn.partition(|&j| targets[j].health != Health::Down);
                return Some(Ok(up.into_iter().chain(down).collect()));
            }
            Caller::Session { rt, plugin, session } => {
                let outcome = rt.block_on(session.route(summary, targets));
                if outcome.is_err() {
                    // The instance is gone; the next call gets a new one.
                    **session = plugin.session();
                }
                outcome
            }
            Caller::Fresh { rt, plugin } => rt.block_on(plugin.route(summary, targets)),
        };
        match outcome {
            Ok(Outcome::Route(d)) => Some(Ok(d.targets.iter().filter_map(|t| names.get(t).copied()).collect())),
            Ok(Outcome::Reject(_)) => Some(Err(())),
            Err(_) => None,
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

fn simulate_router(
    world: &World,
    spec: &RouterSpec,
    runtime: Option<Arc<PluginRuntime>>,
) -> Result<RouterReport, PluginError> {
    let mut caller = load(world, spec, runtime)?;
    let sc = world.scenario;
    let (nt, nr) = (world.targets.len(), sc.regions.len());
    let names: HashMap<String, usize> =
        world.targets.iter().enumerate().map(|(j, t)| (t.base.name.clone(), j)).collect();
    // Per edge: the target list in its static order, refreshed with live stats per request.
    let mut lists: Vec<Vec<Target>> =
        world.static_order.iter().map(|order| order.iter().map(|&j| world.targets[j].base.clone()).collect()).collect();
    let fresh_view =
        View { latency_ms: 0.0, ttft_ms: 0.0, failures: 0, down_until: 0.0, last_failed: false, error_rate: 0.0 };
    let mut views = vec![vec![fresh_view; nt]; nr];
    let mut ends: Vec<BinaryHeap<Reverse<u64>>> = vec![BinaryHeap::new(); nt];
    let mut slots: Vec<Vec<f64>> = world
        .targets
        .iter()
        .map(|t| match t.price {
            PriceModel::Hour(h) => vec![0.0; h.capacity.max(1) as usize],
            _ => Vec::new(),
        })
        .collect();
    let mut warm_until = vec![f64::NEG_INFINITY; nt];
    // Start times of requests queued at each engine.
    let mut queued: Vec<BinaryHeap<Reverse<u64>>> = vec![BinaryHeap::new(); nt];
    // Observations in flight to the edges: (time µs, seq) -> (edge, target, what).
    let mut pending: BTreeMap<(u64, u64), (usize, usize, Obs)> = BTreeMap::new();
    let mut seq = 0u64;
    let mut next_probe = 0.0;
    let mut probe_round = 0u64;

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
    };
    let mut latencies: Vec<f32> = Vec::with_capacity(sc.requests);
    let mut ttfts: Vec<f32> = Vec::with_capacity(sc.requests);
    let mut ttft = 0.0;
    let mut arrivals = Rng::new(sc.seed, Stream::Arrival, 0, 0);
    let mean_gap_ms = 1000.0 / sc.arrival_rate_per_s;
    let mut now = 0.0;

    for i in 0..sc.requests as u64 {
        now += arrivals.exponential(mean_gap_ms);
        // What the edges learn up to now: finished attempts, then probes due.
        let now_us = (now * 1000.0) as u64;
        while let Some(entry) = pending.first_entry() {
            if entry.key().0 > now_us {
                break;
            }
            let ((at_us, _), (edge, j, obs)) = entry.remove_entry();
            views[edge][j].observe(at_us as f64 / 1000.0, obs);
        }
        while next_probe <= now {
            for (edge, row) in views.iter_mut().enumerate() {
                for (j, view) in row.iter_mut().enumerate() {
                    let t = &world.targets[j];
                    let mut rng = Rng::new(sc.seed, Stream::Probe, probe_round, (edge * nt + j) as u64);
                    let obs = if world.in_outage(j, next_probe) || rng.unit() < t.failure {
                        Obs::Failed
                    } else {
                        let ttft = world.rtt[edge][t.region] * rng.lognormal(1.0, 0.25) + rng.lognormal(t.ttft_ms, 0.3);
                        Obs::Ok { ttft_ms: ttft, latency_ms: ttft + REFERENCE_OUTPUT_TOKENS / t.tokens_per_s * 1000.0 }
                    };
                    view.observe(next_probe, obs);
                }
            }
            next_probe += PROBE_EVERY_MS;
            probe_round += 1;
        }
        for heap in &mut ends {
            while heap.peek().is_some_and(|Reverse(end)| *end <= now_us) {
                heap.pop();
            }
        }

        let req = request(world, i);
        let edge = req.region;
        let list = &mut lists[edge];
        for (slot, &j) in list.iter_mut().zip(&world.static_order[edge]) {
            let v = &views[edge][j];
            slot.health = v.health(now);
            slot.latency_ms = v.latency_ms;
            slot.ttft_ms = v.ttft_ms;
            slot.in_flight = ends[j].len() as u32;
        }
        report.requests += 1;
        let order = match caller.route(&req.summary, list, &names) {
            Some(Ok(order)) => order,
            Some(Err(())) => {
                report.errors += 1;
                report.refused += 1;
                continue;
            }
            None => {
                report.router_failures += 1;
                world.static_order[edge].clone()
            }
        };
        // As the edge does: ejected targets are skipped, unless every one in the plan is.
        let up: Vec<usize> = order.iter().copied().filter(|&j| views[edge][j].health(now) != Health::Down).collect();
        let order = if up.is_empty() { order } else { up };

        // Client to its edge, and the edge's own work.
        let mut rng_client = Rng::new(sc.seed, Stream::Request, i, 1);
        let mut elapsed = rng_client.lognormal(10.0, 0.4) + 1.0;
        let mut violated = false;
        let mut served_by = None;
        for j in order {
            if elapsed > CLIENT_TIMEOUT_MS {
                break;
            }
            let t = &world.targets[j];
            report.attempts += 1;
            violated |= !residency_allows(&req.summary, &t.base);
            let start = now + elapsed;
            let mut rng = Rng::new(sc.seed, Stream::Attempt, i, j as u64);
            let net = world.rtt[edge][t.region] * rng.lognormal(1.0, 0.25);
            let ttft_server = rng.lognormal(t.ttft_ms, 0.3);
            let tps = rng.lognormal(t.tokens_per_s, 0.1);
            let fails = rng.unit() < t.failure;
            let mut finish = |at_ms: f64, obs: Obs| {
                pending.insert(((at_ms * 1000.0) as u64, seq), (edge, j, obs));
                seq += 1;
            };
            if world.in_outage(j, start) {
                elapsed += CONNECT_TIMEOUT_MS;
                finish(now + elapsed, Obs::Failed);
                continue;
            }
            // Queueing at a full engine; a cold start at an idle serverless endpoint.
            let arrive = start + net / 2.0;
            let (mut wait, mut slot) = (0.0, None);
            if !slots[j].is_empty() {
                let (k, &free) = slots[j].iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).expect("slots");
                wait = (free - arrive).max(0.0);
                slot = Some(k);
                let arrive_us = (arrive * 1000.0) as u64;
                let queue = &mut queued[j];
                while queue.peek().is_some_and(|Reverse(s)| *s <= arrive_us) {
                    queue.pop();
                }
                if wait > 0.0 {
                    if queue.len() >= slots[j].len() * ENGINE_QUEUE_PER_SLOT {
                        // Turned away at once: the edge moves on to the next target.
                        report.overloaded += 1;
                        elapsed += net;
                        continue;
                    }
                    queue.push(Reverse(((arrive + wait) * 1000.0) as u64));
                }
            }
            let cold = if t.kind == TargetKind::Serverless && arrive > warm_until[j] {
                rng.lognormal(COLD_START_MS, 0.3)
            } else {
                0.0
            };
            let first_token = net + wait + cold + ttft_server;
            let generate = if fails { 0.0 } else { req.output_tokens as f64 / tps * 1000.0 };
            let busy_ms = cold + ttft_server + generate;
            if let Some(k) = slot {
                slots[j][k] = arrive + wait + busy_ms;
            }
            if t.kind == TargetKind::Serverless {
                warm_until[j] = warm_until[j].max(arrive + wait + busy_ms + SERVERLESS_IDLE_MS);
            }
            let end = start + first_token + generate;
            ends[j].push(Reverse((end * 1000.0) as u64));
            report.variable_usd += match t.price {
                // A failed managed call is not billed; a serverless GPU bills its busy time.
                PriceModel::Token(p) if !fails => {
                    (req.summary.prompt_tokens as f64 * p.input_usd_per_mtok
                        + req.output_tokens as f64 * p.output_usd_per_mtok)
                        / 1e6
                }
                PriceModel::GpuSecond(rate) => busy_ms / 1000.0 * rate,
                _ => 0.0,
            };
            elapsed += first_token + generate;
            if fails {
                finish(end, Obs::Failed);
                continue;
            }
            let per_token = 1000.0 / tps;
            finish(
                end,
                Obs::Ok { ttft_ms: first_token, latency_ms: first_token + REFERENCE_OUTPUT_TOKENS * per_token },
            );
            served_by = Some(j);
            ttft = elapsed - generate;
            break;
        }
        report.residency_violations += u64::from(violated);
        if served_by.is_some() && elapsed > CLIENT_TIMEOUT_MS {
            served_by = None;
            report.timed_out += 1;
        }
        match served_by {
            Some(j) => {
                report.served += 1;
                report.served_by_region[world.targets[j].region] += 1;
                let kind = match world.targets[j].kind {
                    TargetKind::Managed | TargetKind::RemoteEdge => 0,
                    TargetKind::Serverless => 1,
                    TargetKind::Dedicated => 2,
                };
                report.served_by_kind[kind] += 1;
                latencies.push(elapsed as f32);
                if req.summary.streaming {
                    ttfts.push(ttft as f32);
                }
            }
            None => report.errors += 1,
        }
    }

    let engines_usd_per_hour: f64 = world
        .targets
        .iter()
        .map(|t| match t.price {
            PriceModel::Hour(h) => h.usd_per_hour,
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

    fn router(name: &str) -> &'static RouterReport {
        small().router(name).unwrap_or_else(|| panic!("no {name} in the report"))
    }

    #[test]
    fn residency_aware_routers_never_violate_and_round_robin_does() {
        for name in ["residency", "latency-router", "cost-router"] {
            assert_eq!(router(name).residency_violations, 0, "{name}");
        }
        assert!(router("round-robin").residency_violations > 0);
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
        // Under the default, saturated engines it is still the cheapest of the four.
        let small = small();
        let cheapest = small.routers.iter().map(RouterReport::usd_per_request).fold(f64::INFINITY, f64::min);
        assert_eq!(router("cost-router").usd_per_request(), cheapest);
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
