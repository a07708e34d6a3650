//! `meridian cost replay`: a month of traffic — generated (diurnal load with bursts) or recorded
//! in a ledger — through the edge's dispatch core under each way of buying capacity: managed API
//! only, serverless only, dedicated engines only (sized for the peak), and spillover (dedicated
//! engines up to a utilisation, then serverless, then the API). For each it reports the cost and
//! the time to first token (p50, p99) of the month.
//!
//! Every cohort of requests goes through the same step as the routing simulation
//! ([`crate::simulate`]): the dispatch core plans it over the policy's targets and walks the
//! attempts ([`crate::dispatch::plan`], [`crate::dispatch::Attempts`]) with the edge's live
//! statistics and ejection ([`crate::stats::TargetStats`]) on simulated time. A target that has no
//! room says so as an engine does (overloaded), and the core moves on to the next target.
//!
//! A month at a realistic volume is millions of requests, so time goes in steps (1 s by default)
//! and the requests arriving in a step travel as one cohort: capacity is the concurrency the
//! cohorts hold (each request holds a slot for its time to first token and generation, spread
//! over the steps it spans), and a cohort that fits only partly is split, the rest dispatched
//! again. Percentiles weigh each cohort's time to first token by its size.
//!
//! - **Dedicated engines**: `N` GPUs of `capacity` concurrent sequences, paid by the hour for the
//!   whole month.
//! - **Serverless**: the same GPUs, billed per second from start to scale-down (with a minimum per
//!   instance); a cohort that finds no warm room starts instances and, when serverless is the
//!   last target, waits the cold start; otherwise it goes on to the API while they start.
//!   Instances scale down after being unneeded for `idle_s`.
//! - **Managed API**: always answers, per token.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::accounting::PriceModel;
use crate::chat::Usage;
use crate::config::{HealthConfig, TargetKind};
use crate::dispatch::{Policy as TenantPolicy, RouterAnswer};
use crate::ledger::LedgerEntry;
use crate::simulate::{self, EdgeState, Played, Response, Rng, SimTarget, Stream};
use crate::stats::Ejection;

/// How the month's requests are generated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generated {
    /// Seed of every draw.
    pub seed: u64,
    /// Days.
    pub days: u32,
    /// Mean requests per second over the month.
    pub mean_rps: f64,
    /// Diurnal swing: the rate goes from `1 - diurnal` to `1 + diurnal` times the day's mean.
    pub diurnal: f64,
    /// Weekends' rate relative to weekdays'.
    pub weekend: f64,
    /// Bursts a day, on average (Poisson).
    pub bursts_per_day: f64,
    /// A burst multiplies the rate by a factor drawn from this range.
    pub burst_factor: (f64, f64),
    /// Median length of a burst, minutes (log-normal).
    pub burst_minutes: f64,
    /// Prompt tokens a request.
    pub prompt_tokens: f64,
    /// Generated tokens a request.
    pub output_tokens: f64,
}

impl Generated {
    /// A bursty month: 30 days at 3 requests/s on average, ±60% over the day, weekends at 60%,
    /// 6 bursts a day of 3–8× lasting 20 minutes or so; 600 prompt and 250 generated tokens a
    /// request.
    pub fn bursty(seed: u64) -> Generated {
        Generated {
            seed,
            days: 30,
            mean_rps: 3.0,
            diurnal: 0.6,
            weekend: 0.6,
            bursts_per_day: 6.0,
            burst_factor: (3.0, 8.0),
            burst_minutes: 20.0,
            prompt_tokens: 600.0,
            output_tokens: 250.0,
        }
    }
}

/// Requests a step over a month, and their size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Month {
    /// Seconds a step.
    pub step_s: f64,
    /// Requests arriving in each step.
    pub arrivals: Vec<u32>,
    /// Mean prompt tokens a request.
    pub prompt_tokens: f64,
    /// Mean generated tokens a request.
    pub output_tokens: f64,
    /// Seed of the draws the replay makes (latency jitter).
    pub seed: u64,
}

/// A Poisson draw of mean `lambda` (normal beyond 30, where the two agree to well under a
/// percent of the tail that matters here).
fn poisson(rng: &mut Rng, lambda: f64) -> u32 {
    if lambda <= 0.0 {
        return 0;
    }
    if lambda > 30.0 {
        return (lambda + lambda.sqrt() * rng.normal()).round().max(0.0) as u32;
    }
    let (limit, mut p, mut k) = ((-lambda).exp(), 1.0, 0u32);
    loop {
        p *= rng.unit();
        if p <= limit {
            return k;
        }
        k += 1;
    }
}

impl Month {
    /// Generates a month in steps of `step_s` seconds.
    pub fn generated(g: &Generated, step_s: f64) -> Month {
        let span_s = f64::from(g.days) * 86_400.0;
        let steps = (span_s / step_s).ceil() as usize;
        // Bursts: start, end (s) and factor.
        let mut rng = Rng::new(g.seed, Stream::CostMonth, 0, 0);
        let mut bursts = Vec::new();
        let mut t = rng.exponential(86_400.0 / g.bursts_per_day.max(1e-9));
        while t < span_s {
            let length = rng.lognormal(g.burst_minutes * 60.0, 0.5);
            bursts.push((t, t + length, rng.range(g.burst_factor.0, g.burst_factor.1)));
            t += rng.exponential(86_400.0 / g.bursts_per_day.max(1e-9));
        }
        // Weekdays at 1, weekends at `weekend`, scaled so that the month's mean is `mean_rps`.
        let days_mean =
            (0..g.days).map(|d| if d % 7 >= 5 { g.weekend } else { 1.0 }).sum::<f64>() / f64::from(g.days.max(1));
        let mut burst = 0;
        let arrivals = (0..steps)
            .map(|s| {
                let t = (s as f64 + 0.5) * step_s;
                let day = (t / 86_400.0) as u32;
                let hour = (t % 86_400.0) / 3_600.0;
                // Busiest at 15:00, quietest at 03:00.
                let diurnal = 1.0 + g.diurnal * (std::f64::consts::TAU * (hour - 9.0) / 24.0).sin();
                let weekly = if day % 7 >= 5 { g.weekend } else { 1.0 } / days_mean;
                while burst < bursts.len() && bursts[burst].1 < t {
                    burst += 1;
                }
                let factor = bursts[burst..]
                    .iter()
                    .take_while(|b| b.0 <= t)
                    .filter(|b| t < b.1)
                    .map(|b| b.2)
                    .fold(1.0, f64::max);
                let mut rng = Rng::new(g.seed, Stream::CostMonth, 1, s as u64);
                poisson(&mut rng, g.mean_rps * diurnal * weekly * factor * step_s)
            })
            .collect();
        Month { step_s, arrivals, prompt_tokens: g.prompt_tokens, output_tokens: g.output_tokens, seed: g.seed }
    }

    /// A month of recorded traffic: the answered requests of a ledger's rows, by arrival, from the
    /// first row on (a shorter record replays as it is; its cost is for its own span).
    pub fn recorded(entries: &[LedgerEntry], step_s: f64, seed: u64) -> Option<Month> {
        let rows: Vec<&LedgerEntry> = entries.iter().filter(|e| !e.cache_hit && e.status == "ok").collect();
        let start = rows.iter().map(|e| e.ts_ms).min()?;
        let end = rows.iter().map(|e| e.ts_ms).max()?;
        let step_ms = step_s * 1000.0;
        let mut arrivals = vec![0u32; ((end - start) as f64 / step_ms) as usize + 1];
        for e in &rows {
            arrivals[((e.ts_ms - start) as f64 / step_ms) as usize] += 1;
        }
        let n = rows.len() as f64;
        Some(Month {
            step_s,
            arrivals,
            prompt_tokens: rows.iter().map(|e| e.input_tokens as f64).sum::<f64>() / n,
            output_tokens: rows.iter().map(|e| e.output_tokens as f64).sum::<f64>() / n,
            seed,
        })
    }

    /// Requests in the month.
    pub fn requests(&self) -> u64 {
        self.arrivals.iter().map(|&a| u64::from(a)).sum()
    }

    /// Its span in hours.
    pub fn hours(&self) -> f64 {
        self.arrivals.len() as f64 * self.step_s / 3600.0
    }
}

/// The capacity and prices the month is replayed against.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fleet {
    /// Dedicated engines for spillover; `None`: enough for the month's median load.
    pub engines: Option<u32>,
    /// Concurrent sequences a GPU serves (dedicated and serverless alike).
    pub engine_capacity: u32,
    /// Tokens/s one sequence generates.
    pub sequence_tokens_per_s: f64,
    /// A dedicated engine's price, USD an hour.
    pub engine_usd_per_hour: f64,
    /// Spillover fills the engines up to this share of their capacity.
    pub utilisation: f64,
    /// Time to first token at a warm GPU, ms (dedicated or serverless).
    pub gpu_ttft_ms: f64,
    /// A serverless GPU's price, USD an hour.
    pub serverless_usd_per_hour: f64,
    /// Seconds from a serverless instance's start to its first answer.
    pub cold_start_s: f64,
    /// An unneeded serverless instance is stopped after this many seconds.
    pub idle_s: f64,
    /// Shortest billed life of a serverless instance, seconds.
    pub min_billed_s: f64,
    /// Most serverless instances at once.
    pub max_instances: u32,
    /// The managed API's price per million prompt tokens.
    pub api_input_usd_per_mtok: f64,
    /// Its price per million generated tokens.
    pub api_output_usd_per_mtok: f64,
    /// Its time to first token, ms.
    pub api_ttft_ms: f64,
    /// The p99 time to first token a policy must meet, ms.
    pub p99_ttft_target_ms: f64,
}

impl Default for Fleet {
    /// 70B-class serving: H100s at $2/hour (dedicated) and $6/hour (serverless, with 30 s cold
    /// starts, 2-minute scale-down and a 60 s minimum), 16 sequences of 30 tokens/s each,
    /// spillover up to 85%; an API at $3/$15 per million tokens; a 2 s p99 target.
    fn default() -> Fleet {
        Fleet {
            engines: None,
            engine_capacity: 16,
            sequence_tokens_per_s: 30.0,
            engine_usd_per_hour: 2.0,
            utilisation: 0.85,
            gpu_ttft_ms: 350.0,
            serverless_usd_per_hour: 6.0,
            cold_start_s: 30.0,
            idle_s: 120.0,
            min_billed_s: 60.0,
            max_instances: 1_000,
            api_input_usd_per_mtok: 3.0,
            api_output_usd_per_mtok: 15.0,
            api_ttft_ms: 600.0,
            p99_ttft_target_ms: 2_000.0,
        }
    }
}

/// A way of buying the month's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Managed API only.
    Api,
    /// Serverless only.
    Serverless,
    /// Dedicated engines only, enough for the month's peak.
    Dedicated,
    /// Dedicated first up to a utilisation, then serverless, then the API.
    Spillover,
}

impl Policy {
    /// The four, in the table's order.
    pub const ALL: [Policy; 4] = [Policy::Api, Policy::Serverless, Policy::Dedicated, Policy::Spillover];

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Api => "API only",
            Policy::Serverless => "serverless only",
            Policy::Dedicated => "dedicated only (sized for peak)",
            Policy::Spillover => "spillover",
        }
    }

    fn pools(self) -> &'static [Pool] {
        match self {
            Policy::Api => &[Pool::Api],
            Policy::Serverless => &[Pool::Serverless],
            Policy::Dedicated => &[Pool::Dedicated],
            Policy::Spillover => &[Pool::Dedicated, Pool::Serverless, Pool::Api],
        }
    }
}

/// The kinds of target, as the replay's edge is configured with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    Dedicated,
    Serverless,
    Api,
}

/// What one policy did over the month.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyResult {
    /// The policy.
    pub policy: Policy,
    /// Dedicated engines it paid for.
    pub engines: u32,
    /// USD for dedicated engines.
    pub dedicated_usd: f64,
    /// USD for serverless GPUs.
    pub serverless_usd: f64,
    /// USD for the API.
    pub api_usd: f64,
    /// Requests answered by each pool: dedicated, serverless, API.
    pub served: [u64; 3],
    /// Requests no target answered.
    pub failed: u64,
    /// Serverless instance starts.
    pub cold_starts: u64,
    /// Median time to first token, ms (a failed request counts as never).
    pub ttft_p50_ms: f64,
    /// 99th percentile of the same.
    pub ttft_p99_ms: f64,
    /// Whether the p99 meets the fleet's target.
    pub meets_target: bool,
}

impl PolicyResult {
    /// Everything it cost, USD.
    pub fn usd(&self) -> f64 {
        self.dedicated_usd + self.serverless_usd + self.api_usd
    }
}

/// The month under every policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    /// Requests in the month.
    pub requests: u64,
    /// Its span, hours.
    pub hours: f64,
    /// Its busiest step's arrival rate over its mean.
    pub peak_to_mean: f64,
    /// The p99 target, ms.
    pub p99_ttft_target_ms: f64,
    /// Per policy, in [`Policy::ALL`]'s order.
    pub results: Vec<PolicyResult>,
}

impl ReplayReport {
    /// The result of `policy`.
    pub fn result(&self, policy: Policy) -> Option<&PolicyResult> {
        self.results.iter().find(|r| r.policy == policy)
    }

    /// The cheapest single approach (API, serverless or dedicated only) that meets the target.
    pub fn cheapest_single(&self) -> Option<&PolicyResult> {
        self.results
            .iter()
            .filter(|r| r.policy != Policy::Spillover && r.meets_target)
            .min_by(|a, b| a.usd().total_cmp(&b.usd()))
    }

    /// How much cheaper spillover is than [`ReplayReport::cheapest_single`], as a share of the
    /// latter; `None` if spillover misses the target or no single approach meets it.
    pub fn spillover_saving(&self) -> Option<f64> {
        let spill = self.result(Policy::Spillover).filter(|r| r.meets_target)?;
        let single = self.cheapest_single()?;
        Some(1.0 - spill.usd() / single.usd())
    }
}

impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Replay: {} requests over {:.0} hours (peak {:.1}× the mean); p99 TTFT target {:.0} ms\n",
            self.requests, self.hours, self.peak_to_mean, self.p99_ttft_target_ms
        )?;
        writeln!(
            f,
            "| policy | engines | cost USD | dedicated | serverless | API | served ded/sls/API | failed | cold starts | TTFT p50 ms | TTFT p99 ms | meets p99 |"
        )?;
        writeln!(f, "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |")?;
        let ms = |v: f64| if v.is_finite() { format!("{v:.0}") } else { "failed".into() };
        for r in &self.results {
            let total = r.served.iter().sum::<u64>().max(1) as f64;
            writeln!(
                f,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0}% / {:.0}% / {:.0}% | {} | {} | {} | {} | {} |",
                r.policy.name(),
                r.engines,
                r.usd(),
                r.dedicated_usd,
                r.serverless_usd,
                r.api_usd,
                r.served[0] as f64 * 100.0 / total,
                r.served[1] as f64 * 100.0 / total,
                r.served[2] as f64 * 100.0 / total,
                r.failed,
                r.cold_starts,
                ms(r.ttft_p50_ms),
                ms(r.ttft_p99_ms),
                if r.meets_target { "yes" } else { "no" }
            )?;
        }
        match (self.cheapest_single(), self.spillover_saving()) {
            (Some(single), Some(saving)) => writeln!(
                f,
                "\nSpillover costs {:.0}% less than the cheapest single approach that meets the target ({}).",
                saving * 100.0,
                single.policy.name()
            ),
            (None, _) => writeln!(f, "\nNo single approach meets the target."),
            (Some(_), None) => writeln!(f, "\nSpillover misses the target."),
        }
    }
}

/// Concurrency held over the coming steps: each admitted request holds a slot for its service
/// time, spread over the steps it spans.
struct Occupancy {
    ring: VecDeque<f64>,
}

impl Occupancy {
    fn new() -> Occupancy {
        Occupancy { ring: VecDeque::from([0.0]) }
    }

    /// Concurrency in the current step.
    fn now(&self) -> f64 {
        self.ring.front().copied().unwrap_or(0.0)
    }

    /// `n` requests of `service_s` each, from the current step.
    fn add(&mut self, n: f64, service_s: f64, step_s: f64) {
        let (mut left, mut k) = (service_s, 0);
        while left > 0.0 {
            let part = left.min(step_s);
            if self.ring.len() <= k {
                self.ring.push_back(0.0);
            }
            self.ring[k] += n * part / step_s;
            left -= part;
            k += 1;
        }
    }

    /// On to the next step.
    fn tick(&mut self) {
        self.ring.pop_front();
        if self.ring.is_empty() {
            self.ring.push_back(0.0);
        }
    }
}

/// The serverless pool: warm instances, starting ones, and the recent need that keeps them up.
struct Serverless {
    warm: u32,
    /// (step it is ready at, instances).
    starting: VecDeque<(usize, u32)>,
    /// Instances needed in each recent step, for scale-down.
    need: VecDeque<u32>,
    occupancy: Occupancy,
    /// The most concurrency asked of the pool in the current step, started instances included.
    demand: f64,
    /// Instance-seconds billed.
    billed_s: f64,
    starts: u64,
}

impl Serverless {
    fn starting(&self) -> u32 {
        self.starting.iter().map(|s| s.1).sum()
    }

    /// Starts enough instances for `demand` concurrent requests (up to `max`); returns how many.
    fn start_for(&mut self, demand: f64, fleet: &Fleet, step: usize, step_s: f64) -> u32 {
        let want = (demand / f64::from(fleet.engine_capacity)).ceil().min(f64::from(fleet.max_instances)) as u32;
        let new = want.saturating_sub(self.warm + self.starting());
        if new > 0 {
            let ready = step + (fleet.cold_start_s / step_s).ceil().max(1.0) as usize;
            self.starting.push_back((ready, new));
            self.starts += u64::from(new);
        }
        new
    }
}

/// One policy's month, step by step.
struct Run<'a> {
    month: &'a Month,
    fleet: &'a Fleet,
    engines: u32,
    /// The share of the engines' capacity the policy fills: spillover's threshold, or all of it.
    utilisation: f64,
    engine: Occupancy,
    serverless: Serverless,
    api_price: PriceModel,
    api_usd: f64,
    served: [u64; 3],
    failed: u64,
    /// (time to first token ms, requests).
    ttfts: Vec<(f32, u32)>,
}

impl Run<'_> {
    /// Service time of a request at a GPU, seconds.
    fn service_s(&self) -> f64 {
        self.fleet.gpu_ttft_ms / 1000.0 + self.month.output_tokens / self.fleet.sequence_tokens_per_s
    }

    /// Plays a cohort of `n` at `pool` in `step`: how many it takes, and their time to first
    /// token (ms), or why it takes none.
    fn play(&mut self, pool: Pool, last: bool, n: u32, step: usize, rng: &mut Rng) -> Result<(u32, f64), Response> {
        let (step_s, fleet) = (self.month.step_s, self.fleet);
        let service = self.service_s();
        // What one request adds to the step's concurrency.
        let w = service.min(step_s) / step_s;
        let fit = |room: f64| ((room / w + 1e-9).floor().max(0.0) as u32).min(n);
        let jitter = rng.lognormal(1.0, 0.25);
        match pool {
            Pool::Api => {
                self.api_usd += f64::from(n)
                    * self.api_price.cost(
                        Usage {
                            input_tokens: self.month.prompt_tokens.round() as u32,
                            output_tokens: self.month.output_tokens.round() as u32,
                            ..Default::default()
                        },
                        Duration::ZERO,
                    );
                Ok((n, fleet.api_ttft_ms * jitter))
            }
            Pool::Dedicated => {
                let limit = f64::from(self.engines * fleet.engine_capacity) * self.utilisation;
                let k = fit(limit - self.engine.now());
                if k == 0 {
                    return Err(Response::Full);
                }
                self.engine.add(f64::from(k), service, step_s);
                Ok((k, fleet.gpu_ttft_ms * jitter))
            }
            Pool::Serverless => {
                let sl = &mut self.serverless;
                let cap = f64::from(fleet.engine_capacity);
                let wanted = sl.occupancy.now() + f64::from(n) * w;
                sl.demand = sl.demand.max(wanted);
                let k = fit(f64::from(sl.warm) * cap - sl.occupancy.now());
                if k > 0 {
                    sl.occupancy.add(f64::from(k), service, step_s);
                    return Ok((k, fleet.gpu_ttft_ms * jitter));
                }
                sl.start_for(wanted, fleet, step, step_s);
                if !last {
                    // The next target answers while the instances start.
                    return Err(Response::Full);
                }
                // Wait for the first starting instance with room: the cold start (what is left
                // of it).
                let k = fit(f64::from(sl.warm + sl.starting()) * cap - sl.occupancy.now());
                let ready = sl.starting.front().map_or(step, |s| s.0);
                if k == 0 {
                    return Err(Response::Full);
                }
                let wait_s = (ready.saturating_sub(step)) as f64 * step_s;
                sl.occupancy.add(f64::from(k), service + wait_s, step_s);
                Ok((k, wait_s * 1000.0 + fleet.gpu_ttft_ms * jitter))
            }
        }
    }

    /// Ends a step: the serverless pool's instances come up, scale down and are billed.
    fn end_step(&mut self, step: usize) {
        let (fleet, step_s) = (self.fleet, self.month.step_s);
        let sl = &mut self.serverless;
        sl.billed_s += f64::from(sl.warm + sl.starting()) * step_s;
        let need = (sl.demand.max(sl.occupancy.now()) / f64::from(fleet.engine_capacity)).ceil() as u32;
        sl.demand = 0.0;
        sl.need.push_back(need);
        if sl.need.len() as f64 * step_s > fleet.idle_s.max(step_s) {
            sl.need.pop_front();
        }
        // Instances stay up while they were needed within the idle time.
        let keep = sl.need.iter().copied().max().unwrap_or(0);
        sl.warm = sl.warm.min(keep);
        while sl.starting.front().is_some_and(|s| s.0 <= step + 1) {
            let (_, n) = sl.starting.pop_front().unwrap_or_default();
            sl.warm += n;
        }
        sl.occupancy.tick();
        self.engine.tick();
    }
}

/// The month's concurrency if every request were served by a GPU, per step.
fn demand(month: &Month, fleet: &Fleet) -> Vec<f64> {
    let service = fleet.gpu_ttft_ms / 1000.0 + month.output_tokens / fleet.sequence_tokens_per_s;
    let mut occupancy = Occupancy::new();
    month
        .arrivals
        .iter()
        .map(|&n| {
            occupancy.add(f64::from(n), service, month.step_s);
            let now = occupancy.now();
            occupancy.tick();
            now
        })
        .collect()
}

/// The replay's targets, as an edge would be configured with them.
fn targets(policy: Policy, fleet: &Fleet) -> Vec<SimTarget> {
    policy
        .pools()
        .iter()
        .map(|pool| {
            let (name, kind, price) = match pool {
                Pool::Dedicated => (
                    "engines",
                    TargetKind::Dedicated,
                    PriceModel::Hour { usd_per_hour: fleet.engine_usd_per_hour, capacity: fleet.engine_capacity },
                ),
                Pool::Serverless => (
                    "serverless",
                    TargetKind::Serverless,
                    PriceModel::gpu_second(fleet.serverless_usd_per_hour / 3600.0),
                ),
                Pool::Api => (
                    "api",
                    TargetKind::Managed,
                    PriceModel::token(fleet.api_input_usd_per_mtok, fleet.api_output_usd_per_mtok),
                ),
            };
            SimTarget { name: name.into(), region: None, kind, price: Some(price) }
        })
        .collect()
}

fn weighted_percentile(samples: &[(f32, u32)], p: f64) -> f64 {
    let total: u64 = samples.iter().map(|s| u64::from(s.1)).sum();
    if total == 0 {
        return 0.0;
    }
    let rank = ((total - 1) as f64 * p).round() as u64;
    let mut seen = 0;
    for &(v, w) in samples {
        seen += u64::from(w);
        if seen > rank {
            return f64::from(v);
        }
    }
    f64::from(samples[samples.len() - 1].0)
}

/// Runs the month under `policy` with `engines` dedicated engines.
fn run_policy(month: &Month, fleet: &Fleet, policy: Policy, engines: u32) -> PolicyResult {
    let targets = targets(policy, fleet);
    let pools = policy.pools();
    let mut edge = EdgeState::new(Instant::now(), targets.len(), Ejection::from(&HealthConfig::default()));
    let tenant =
        TenantPolicy { prompt_tokens: month.prompt_tokens as u32, max_output_tokens: None, ..TenantPolicy::default() };
    let engines = if pools.contains(&Pool::Dedicated) { engines } else { 0 };
    let mut run = Run {
        month,
        fleet,
        engines,
        utilisation: if policy == Policy::Spillover { fleet.utilisation } else { 1.0 },
        engine: Occupancy::new(),
        serverless: Serverless {
            warm: 0,
            starting: VecDeque::new(),
            need: VecDeque::new(),
            occupancy: Occupancy::new(),
            demand: 0.0,
            billed_s: 0.0,
            starts: 0,
        },
        api_price: targets
            .iter()
            .find_map(|t| t.price.filter(|p| matches!(p, PriceModel::Token { .. })))
            .unwrap_or(PriceModel::token(fleet.api_input_usd_per_mtok, fleet.api_output_usd_per_mtok)),
        api_usd: 0.0,
        served: [0; 3],
        failed: 0,
        ttfts: Vec::with_capacity(month.arrivals.len() * 2),
    };
    let step_us = (month.step_s * 1e6) as u64;
    for (step, &arrived) in month.arrivals.iter().enumerate() {
        let now_us = step as u64 * step_us;
        edge.advance(now_us);
        let mut left = arrived;
        let mut cohort = 0u64;
        while left > 0 {
            let candidates = simulate::candidates(&targets, &edge.snapshots(now_us));
            let mut answered = (0u32, 0.0f64);
            let mut rng = Rng::new(month.seed, Stream::CostMonth, 2 + step as u64, cohort);
            cohort += 1;
            let dispatched =
                simulate::dispatch_request(&mut edge, &candidates, &tenant, RouterAnswer::Static, now_us, |i, _| {
                    match run.play(pools[i], i + 1 == pools.len(), left, step, &mut rng) {
                        Ok((k, ttft_ms)) => {
                            answered = (k, ttft_ms);
                            let busy = simulate::us(run.service_s() * 1000.0);
                            let ttft = simulate::us(ttft_ms);
                            Played {
                                response: Response::Answer,
                                latency_us: ttft,
                                ttft_us: Some(ttft),
                                busy_us: busy.max(ttft),
                            }
                        }
                        Err(response) => Played::after(response, 1.0),
                    }
                });
            match dispatched.map(|d| d.result) {
                Ok(Ok(i)) => {
                    let (k, ttft) = answered;
                    run.served[pools[i] as usize] += u64::from(k);
                    run.ttfts.push((ttft as f32, k));
                    left -= k;
                }
                _ => {
                    run.failed += u64::from(left);
                    run.ttfts.push((f32::INFINITY, left));
                    left = 0;
                }
            }
        }
        run.end_step(step);
    }
    run.ttfts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let hours = month.hours();
    let serverless = &run.serverless;
    // Each instance's life is at least its cold start and idle time; the minimum adds the rest.
    let floor_s = (fleet.min_billed_s - fleet.cold_start_s - fleet.idle_s).max(0.0);
    let billed = serverless.billed_s + serverless.starts as f64 * floor_s;
    let serverless_price = PriceModel::gpu_second(fleet.serverless_usd_per_hour / 3600.0);
    let (p50, p99) = (weighted_percentile(&run.ttfts, 0.50), weighted_percentile(&run.ttfts, 0.99));
    PolicyResult {
        policy,
        engines,
        dedicated_usd: f64::from(engines) * fleet.engine_usd_per_hour * hours,
        serverless_usd: serverless_price.cost(Usage::default(), Duration::from_secs_f64(billed)),
        api_usd: run.api_usd,
        served: run.served,
        failed: run.failed,
        cold_starts: serverless.starts,
        ttft_p50_ms: p50,
        ttft_p99_ms: p99,
        meets_target: p99 <= fleet.p99_ttft_target_ms,
    }
}

/// Replays `month` under every policy, each on its own thread.
pub fn replay(month: &Month, fleet: &Fleet) -> ReplayReport {
    let load = demand(month, fleet);
    let cap = f64::from(fleet.engine_capacity.max(1));
    let peak = load.iter().copied().fold(0.0, f64::max);
    let peak_engines = ((peak / cap).ceil() as u32).max(1);
    let spill_engines = fleet.engines.unwrap_or_else(|| {
        let mut sorted = load.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
        ((median / (cap * fleet.utilisation.max(0.01))).round() as u32).max(1)
    });
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = Policy::ALL
            .iter()
            .map(|&policy| {
                let engines = if policy == Policy::Dedicated { peak_engines } else { spill_engines };
                scope.spawn(move || run_policy(month, fleet, policy, engines))
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let mean = month.requests() as f64 / month.arrivals.len().max(1) as f64;
    let busiest = month.arrivals.iter().copied().max().unwrap_or(0);
    ReplayReport {
        requests: month.requests(),
        hours: month.hours(),
        peak_to_mean: if mean > 0.0 { f64::from(busiest) / mean } else { 0.0 },
        p99_ttft_target_ms: fleet.p99_ttft_target_ms,
        results,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spillover_beats_the_cheapest_single_approach_that_meets_the_target_on_a_bursty_month() {
        // The generated month at the CLI's scale, in 30 s steps so that a debug build runs it in
        // seconds (the CLI's default is 1 s).
        let month = Month::generated(&Generated::bursty(7), 30.0);
        let report = replay(&month, &Fleet::default());
        println!("{report}");
        assert_eq!(report.results.len(), 4);
        for r in &report.results {
            assert_eq!(r.served.iter().sum::<u64>() + r.failed, report.requests, "{:?}", r.policy);
        }
        assert!(report.peak_to_mean > 3.0, "the month is bursty: {}", report.peak_to_mean);
        let single = report.cheapest_single().expect("a single approach meets the target");
        let saving = report.spillover_saving().expect("spillover meets the target");
        assert!(saving >= 0.20, "spillover saves {:.1}% against {}", saving * 100.0, single.policy.name());
        // It used all three pools.
        let spill = report.result(Policy::Spillover).expect("spillover");
        assert!(spill.served.iter().all(|&n| n > 0), "{:?}", spill.served);
    }

    #[test]
    fn serverless_alone_waits_for_cold_starts_and_the_api_alone_never_does() {
        let g = Generated { days: 2, ..Generated::bursty(3) };
        let month = Month::generated(&g, 10.0);
        let report = replay(&month, &Fleet::default());
        let (api, sl) =
            (report.result(Policy::Api).expect("api"), report.result(Policy::Serverless).expect("serverless"));
        assert!(api.ttft_p99_ms < 2.0 * Fleet::default().api_ttft_ms, "{}", api.ttft_p99_ms);
        assert!(sl.cold_starts > 0);
        assert!(sl.ttft_p99_ms.is_infinite() || sl.ttft_p99_ms > api.ttft_p50_ms);
        // The API's bill is the month's tokens at its prices.
        let tokens_usd = report.requests as f64 * (600.0 * 3.0 + 250.0 * 15.0) / 1e6;
        assert!((api.api_usd - tokens_usd).abs() < 1e-6 * tokens_usd, "{} vs {tokens_usd}", api.api_usd);
    }

    #[test]
    fn occupancy_spreads_a_request_over_the_steps_it_spans() {
        let mut o = Occupancy::new();
        o.add(10.0, 25.0, 10.0);
        assert_eq!(o.now(), 10.0);
        o.tick();
        assert_eq!(o.now(), 10.0);
        o.tick();
        assert_eq!(o.now(), 5.0);
        o.tick();
        assert_eq!(o.now(), 0.0);
    }

    #[test]
    fn weighted_percentiles_count_each_request() {
        let samples = [(1.0, 98), (5.0, 1), (f32::INFINITY, 1)];
        assert_eq!(weighted_percentile(&samples, 0.5), 1.0);
        assert_eq!(weighted_percentile(&samples, 0.99), 5.0);
        assert!(weighted_percentile(&samples, 1.0).is_infinite());
    }
}
