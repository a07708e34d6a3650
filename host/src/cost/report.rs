//! `meridian cost report`: a ledger's traffic over a period, per tenant and model — its volume,
//! what it actually cost (request costs, and dedicated engines' standing hours spread over the
//! requests each served), and what a month of it would cost bought each of the three ways, from
//! the cost model ([`crate::cost::model`]) with the engines' throughput measured from the ledger.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use serde::Serialize;

use crate::config::Config;
use crate::cost::example::{usd, volume};
use crate::cost::model::{self, Evaluation, Gpus, Offer, Source, Traffic, Way, HOURS_PER_MONTH};
use crate::ledger::{LedgerEntry, StandingCost, TokenSource};

/// Milliseconds in the model's month.
const MONTH_MS: f64 = HOURS_PER_MONTH * 3_600_000.0;
/// The window the peak is measured over.
const PEAK_WINDOW_MS: i64 = 60_000;

/// The report's period: `[from_ms, to_ms)`, milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Period {
    /// Start, included.
    pub from_ms: i64,
    /// End, excluded.
    pub to_ms: i64,
}

impl Period {
    fn ms(self) -> f64 {
        (self.to_ms - self.from_ms).max(1) as f64
    }

    /// How many of the period make a month.
    fn per_month(self) -> f64 {
        MONTH_MS / self.ms()
    }
}

/// What the report assumes where the ledger cannot say.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assumptions {
    /// Tokens/s per GPU given on the command line: replaces the ledger's measurement.
    pub tokens_per_second: Option<f64>,
    /// Tokens/s per GPU when the ledger has no engine rows to measure.
    pub fallback_tokens_per_second: f64,
}

impl Default for Assumptions {
    /// 30 generated tokens/s when nothing is measured (one stream of a 70B model on one GPU).
    fn default() -> Assumptions {
        Assumptions { tokens_per_second: None, fallback_tokens_per_second: 30.0 }
    }
}

/// The priced targets of each model, and the assumptions.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Catalog {
    /// Per client-facing model: its targets with a price model (a route's price overriding the
    /// target's).
    pub models: BTreeMap<String, Vec<Offer>>,
    /// What the ledger cannot say.
    pub assumptions: Assumptions,
}

impl Catalog {
    /// The models and prices of an edge's config.
    pub fn from_config(config: &Config, assumptions: Assumptions) -> Catalog {
        let models = config
            .models
            .iter()
            .map(|m| {
                let offers = m
                    .targets
                    .iter()
                    .filter_map(|r| {
                        let price = r.price.or_else(|| config.targets.get(&r.target).and_then(|t| t.price))?;
                        Some(Offer { name: r.target.clone(), price })
                    })
                    .collect();
                (m.name.clone(), offers)
            })
            .collect();
        Catalog { models, assumptions }
    }
}

/// One tenant's traffic to one model over the period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Group {
    /// The tenant.
    pub tenant: String,
    /// The model asked for.
    pub model: String,
    /// Requests, whatever became of them.
    pub requests: u64,
    /// Of them, answered by a target (not the cache).
    pub answered: u64,
    /// Of them, answered from the prompt cache.
    pub cache_hits: u64,
    /// Prompt tokens of the answered requests.
    pub input_tokens: u64,
    /// Generated tokens of the answered requests.
    pub output_tokens: u64,
    /// Answered requests whose tokens were estimated (the upstream reported no usage).
    pub estimated: u64,
    /// What the requests cost under their answering targets' price models, USD.
    pub request_usd: f64,
    /// Their share of dedicated engines' standing hours, USD.
    pub standing_usd: f64,
    /// What the ledger's rows say the same requests would have cost on each other target, USD.
    pub counterfactual_usd: BTreeMap<String, f64>,
    /// A month of this traffic priced each way; `None` when the model has no priced target.
    pub month: Option<Evaluation>,
}

impl Group {
    /// What the traffic actually cost over the period, USD.
    pub fn actual_usd(&self) -> f64 {
        self.request_usd + self.standing_usd
    }
}

/// The report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The period.
    pub period: Period,
    /// Per tenant and model, in that order.
    pub groups: Vec<Group>,
    /// Per GPU, as measured (or assumed) for the serverless and dedicated ways.
    pub throughput: Gpus,
    /// Dedicated engines' standing costs that no request of the period was served by, USD.
    pub idle_standing_usd: f64,
}

/// Whether the target that answered `e` is dedicated, from the kind its attempt recorded.
fn answered_by_dedicated(e: &LedgerEntry) -> Option<&str> {
    let target = e.target.as_deref()?;
    e.attempts.iter().rev().find(|a| a.target == target && a.kind == "dedicated").map(|a| a.target.as_str())
}

fn answered(e: &LedgerEntry) -> bool {
    !e.cache_hit && e.target.is_some() && e.status == "ok"
}

/// Generated tokens per second of the dedicated engines: per engine, its generated tokens over
/// the union of its requests' busy intervals (concurrent requests share the time), summed over
/// engines. `None` when no row has one.
fn measured_tokens_per_s(entries: &[&LedgerEntry]) -> Option<(f64, Vec<String>)> {
    // Per engine: its generated tokens and its requests' busy intervals (ms).
    type Busy = (u64, Vec<(f64, f64)>);
    let mut per_target: BTreeMap<&str, Busy> = BTreeMap::new();
    for e in entries.iter().filter(|e| answered(e)) {
        let (Some(target), Some(busy)) = (answered_by_dedicated(e), e.busy_ms) else { continue };
        if busy <= 0.0 || !busy.is_finite() {
            continue;
        }
        let slot = per_target.entry(target).or_default();
        slot.0 += e.output_tokens;
        slot.1.push((e.ts_ms as f64, e.ts_ms as f64 + busy));
    }
    let (mut tokens, mut busy_ms) = (0u64, 0.0);
    for (generated, intervals) in per_target.values_mut() {
        intervals.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut end = f64::NEG_INFINITY;
        for &(s, e) in intervals.iter() {
            busy_ms += (e - s.max(end)).max(0.0);
            end = end.max(e);
        }
        tokens += *generated;
    }
    (busy_ms > 0.0 && tokens > 0)
        .then(|| (tokens as f64 / (busy_ms / 1000.0), per_target.keys().map(|s| s.to_string()).collect()))
}

/// The GPUs' figures: given, else measured, else assumed (and said so).
fn throughput(entries: &[&LedgerEntry], a: &Assumptions) -> Gpus {
    let (tps, source) = match (a.tokens_per_second, measured_tokens_per_s(entries)) {
        (Some(tps), _) => (tps, Source::Given),
        (None, Some((tps, targets))) => {
            (tps, Source::Measured(format!("generated tokens over busy time on {}", targets.join(", "))))
        }
        (None, None) => (
            a.fallback_tokens_per_second,
            Source::Assumed(format!(
                "no dedicated engine answered in the period: {:.0} generated tokens/s per GPU assumed",
                a.fallback_tokens_per_second
            )),
        ),
    };
    Gpus { serverless_tokens_per_s: tps, dedicated_tokens_per_s: tps, source }
}

/// A month of the group's answered rows: volume scaled from the period, peak from the busiest
/// minute, and the idle gaps that decide cold starts.
fn traffic(rows: &[&LedgerEntry], period: Period) -> Traffic {
    let k = period.per_month();
    let (input, output) = rows.iter().fold((0u64, 0u64), |(i, o), e| (i + e.input_tokens, o + e.output_tokens));
    let mut per_minute: BTreeMap<i64, u64> = BTreeMap::new();
    for e in rows {
        *per_minute.entry(e.ts_ms.div_euclid(PEAK_WINDOW_MS)).or_default() += e.output_tokens;
    }
    let peak = per_minute.values().copied().max().unwrap_or(0) as f64 / (PEAK_WINDOW_MS as f64 / 1000.0);
    let mean = output as f64 / (period.ms() / 1000.0);
    let mut times: Vec<i64> = rows.iter().map(|e| e.ts_ms).collect();
    times.sort_unstable();
    let idle_gaps_s =
        std::iter::once(f64::INFINITY).chain(times.windows(2).map(|w| (w[1] - w[0]) as f64 / 1000.0)).collect();
    Traffic {
        input_tokens: input as f64 * k,
        output_tokens: output as f64 * k,
        requests: rows.len() as f64 * k,
        work_tokens: output as f64 * k,
        peak_to_mean: if mean > 0.0 { (peak / mean).max(1.0) } else { 1.0 },
        idle_gaps_s,
        per_month: k,
    }
}

/// The part of a standing cost that falls in the period.
fn in_period(s: &StandingCost, period: Period) -> f64 {
    let span = (s.to_ms - s.from_ms) as f64;
    if span <= 0.0 {
        return 0.0;
    }
    let overlap = (s.to_ms.min(period.to_ms) - s.from_ms.max(period.from_ms)).max(0) as f64;
    s.usd * overlap / span
}

/// Builds the report of `entries` (the period's ledger rows) and `standing` (its dedicated
/// engines' standing costs), pricing each model's traffic at the targets `catalog` lists.
pub fn build(entries: &[LedgerEntry], standing: &[StandingCost], catalog: &Catalog, period: Period) -> Report {
    let entries: Vec<&LedgerEntry> =
        entries.iter().filter(|e| (period.from_ms..period.to_ms).contains(&e.ts_ms)).collect();
    let gpus = throughput(&entries, &catalog.assumptions);

    // Each dedicated engine's standing cost, and how many requests it answered.
    let mut standing_by_target: BTreeMap<&str, f64> = BTreeMap::new();
    for s in standing {
        *standing_by_target.entry(s.target.as_str()).or_default() += in_period(s, period);
    }
    let mut served_by: BTreeMap<&str, u64> = BTreeMap::new();
    for e in entries.iter().filter(|e| answered(e)) {
        if let Some(t) = answered_by_dedicated(e) {
            *served_by.entry(t).or_default() += 1;
        }
    }
    let idle_standing_usd =
        standing_by_target.iter().filter(|(t, _)| !served_by.contains_key(*t)).map(|(_, usd)| usd).sum();

    let mut groups: BTreeMap<(&str, &str), Vec<&LedgerEntry>> = BTreeMap::new();
    for e in &entries {
        groups.entry((e.tenant.as_str(), e.model.as_str())).or_default().push(e);
    }
    let groups = groups
        .into_iter()
        .map(|((tenant, model), rows)| {
            let served: Vec<&LedgerEntry> = rows.iter().copied().filter(|e| answered(e)).collect();
            let standing_usd = served
                .iter()
                .filter_map(|e| answered_by_dedicated(e))
                .map(|t| standing_by_target.get(t).copied().unwrap_or(0.0) / served_by[t] as f64)
                // `sum` of no floats is -0.0, which prints as "$-0.0000".
                .fold(0.0, |total, share| total + share);
            let mut counterfactual_usd: BTreeMap<String, f64> = BTreeMap::new();
            for e in &served {
                for (target, usd) in &e.counterfactual {
                    *counterfactual_usd.entry(target.clone()).or_default() += usd;
                }
            }
            let month = catalog
                .models
                .get(model)
                .filter(|offers| !offers.is_empty() && !served.is_empty())
                .map(|offers| model::evaluate(&traffic(&served, period), offers, &gpus));
            Group {
                tenant: tenant.to_string(),
                model: model.to_string(),
                requests: rows.len() as u64,
                answered: served.len() as u64,
                cache_hits: rows.iter().filter(|e| e.cache_hit).count() as u64,
                input_tokens: served.iter().map(|e| e.input_tokens).sum(),
                output_tokens: served.iter().map(|e| e.output_tokens).sum(),
                estimated: served.iter().filter(|e| e.token_source == TokenSource::Estimate).count() as u64,
                request_usd: rows.iter().map(|e| e.cost_usd).sum(),
                standing_usd,
                counterfactual_usd,
                month,
            }
        })
        .collect();
    Report { period, groups, throughput: gpus, idle_standing_usd }
}

fn source(s: &Source) -> String {
    match s {
        Source::Measured(how) => format!("measured: {how}"),
        Source::Given => "given on the command line".into(),
        Source::Assumed(why) => format!("assumed: {why}"),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = (self.period.to_ms - self.period.from_ms) as f64 / 86_400_000.0;
        writeln!(f, "Cost report over {days:.1} days; a month is 720 hours, volumes scaled to it.")?;
        writeln!(
            f,
            "GPU throughput: {:.0} generated tokens/s ({}).",
            self.throughput.dedicated_tokens_per_s,
            source(&self.throughput.source)
        )?;
        if self.idle_standing_usd > 0.0 {
            writeln!(f, "Dedicated engines that answered nothing in the period cost ${:.2}.", self.idle_standing_usd)?;
        }
        for g in &self.groups {
            writeln!(f)?;
            writeln!(
                f,
                "## {} / {}: {} requests ({} answered, {} from the cache), {} tokens in, {} out{}",
                g.tenant,
                g.model,
                g.requests,
                g.answered,
                g.cache_hits,
                volume(g.input_tokens as f64),
                volume(g.output_tokens as f64),
                if g.estimated > 0 { format!(" ({} estimated)", g.estimated) } else { String::new() }
            )?;
            writeln!(
                f,
                "actual: ${:.4} (${:.4} requests + ${:.4} dedicated hours)",
                g.actual_usd(),
                g.request_usd,
                g.standing_usd
            )?;
            let Some(m) = &g.month else {
                writeln!(f, "no priced target of this model in the config: nothing to compare")?;
                continue;
            };
            writeln!(
                f,
                "a month of it: {} tokens, {:.0} requests, the busiest minute {:.1}× the mean\n",
                volume(m.traffic.tokens()),
                m.traffic.requests,
                m.traffic.peak_to_mean,
            )?;
            writeln!(f, "| target | way | USD/month | GPU-hours | engines | cold starts |")?;
            writeln!(f, "| --- | --- | ---: | ---: | ---: | ---: |")?;
            for c in &m.cells {
                writeln!(
                    f,
                    "| {} | {} | {} | {} | {} | {} |",
                    c.offer,
                    c.way.name(),
                    usd(c.usd),
                    c.gpu_hours.map_or("".into(), |h| format!("{h:.1}")),
                    c.engines.map_or("".into(), |n| n.to_string()),
                    c.cold_starts.map_or("".into(), |n| format!("{n:.0}"))
                )?;
            }
            let mut lines = String::new();
            for b in &m.break_even {
                let at = |v: Option<f64>| v.map_or("—".to_string(), volume);
                let _ = writeln!(
                    lines,
                    "break-even {} → {}: {} tokens/month at the cheapest prices, {} at the dearest",
                    b.below.name(),
                    b.above.name(),
                    at(b.at_low_prices),
                    at(b.at_high_prices)
                );
            }
            if let Some(r) = &m.recommendation {
                let _ = writeln!(lines, "recommendation: {} ({}): {}", r.way.name(), r.offer, r.reason);
            }
            write!(f, "\n{lines}")?;
        }
        Ok(())
    }
}

impl Report {
    /// The groups that have a month to plot.
    pub fn priced(&self) -> impl Iterator<Item = (&Group, &Evaluation)> {
        self.groups.iter().filter_map(|g| g.month.as_ref().map(|m| (g, m)))
    }

    /// Whether any group was compared across `way`.
    pub fn has_way(&self, way: Way) -> bool {
        self.priced().any(|(_, m)| m.ranges.iter().any(|r| r.way == way))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::PriceModel;
    use crate::ledger::AttemptRecord;

    fn row(ts_ms: i64, tenant: &str, target: &str, kind: &str, output: u64, busy_ms: f64, cost: f64) -> LedgerEntry {
        LedgerEntry {
            ts_ms,
            request_id: format!("r{ts_ms}"),
            tenant: tenant.into(),
            api: "openai".into(),
            model: "llama".into(),
            served_model: Some("llama".into()),
            attempts: vec![AttemptRecord {
                target: target.into(),
                kind: kind.into(),
                region: None,
                outcome: "ok".into(),
            }],
            target: Some(target.into()),
            cache_hit: false,
            stream: true,
            input_tokens: 3 * output,
            output_tokens: output,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            token_source: TokenSource::Upstream,
            ttft_ms: Some(100.0),
            busy_ms: Some(busy_ms),
            redactions: 0,
            labels: Vec::new(),
            router: None,
            status: "ok".into(),
            http_status: 200,
            cost_usd: cost,
            counterfactual: vec![("api".into(), cost + 1.0)],
        }
    }

    fn catalog() -> Catalog {
        let offers = vec![
            Offer { name: "api".into(), price: PriceModel::token(1.0, 3.0) },
            Offer { name: "gpu".into(), price: PriceModel::gpu_second(0.001) },
            Offer { name: "engine".into(), price: PriceModel::Hour { usd_per_hour: 2.0, capacity: 4 } },
        ];
        Catalog { models: BTreeMap::from([("llama".to_string(), offers)]), assumptions: Assumptions::default() }
    }

    #[test]
    fn actual_cost_spreads_standing_hours_over_the_requests_each_engine_served() {
        let period = Period { from_ms: 0, to_ms: 3_600_000 };
        let entries = vec![
            // Two overlapping engine requests: 1,000 tokens over 10 s of busy time (not 15).
            row(0, "a", "engine", "dedicated", 500, 10_000.0, 0.0),
            row(5_000, "b", "engine", "dedicated", 500, 5_000.0, 0.0),
            row(20_000, "a", "api", "managed", 100, 1_000.0, 0.5),
            row(7_200_000, "a", "api", "managed", 100, 1_000.0, 9.0), // outside the period
        ];
        let standing = vec![
            StandingCost { from_ms: 0, to_ms: 3_600_000, target: "engine".into(), usd: 2.0 },
            StandingCost { from_ms: -3_600_000, to_ms: 3_600_000, target: "spare".into(), usd: 4.0 },
        ];
        let report = build(&entries, &standing, &catalog(), period);
        println!("{report}");
        assert!((report.throughput.dedicated_tokens_per_s - 100.0).abs() < 1e-9, "{:?}", report.throughput);
        assert!(matches!(report.throughput.source, Source::Measured(_)));
        assert!((report.idle_standing_usd - 2.0).abs() < 1e-9, "half the spare engine's stretch is in the period");
        let a = &report.groups[0];
        assert_eq!((a.tenant.as_str(), a.requests, a.answered, a.output_tokens), ("a", 2, 2, 600));
        assert!((a.standing_usd - 1.0).abs() < 1e-9 && (a.request_usd - 0.5).abs() < 1e-9);
        assert!((a.counterfactual_usd["api"] - 2.5).abs() < 1e-9);
        let m = a.month.as_ref().expect("priced");
        // 1,800 prompt and 600 generated tokens in the hour: 1.728M a month.
        assert!((m.traffic.tokens() - 2_400.0 * 720.0).abs() < 1e-6);
        // All 600 generated tokens fell in one minute: 10/s against a mean of 1/6 per second.
        assert!((m.traffic.peak_to_mean - 60.0).abs() < 1e-9);
        // Two requests 20 s apart: the first starts cold, an hour's record is 1/720 of a month.
        assert_eq!(m.traffic.idle_gaps_s, [f64::INFINITY, 20.0]);
        assert!((m.traffic.cold_starts(Some(std::time::Duration::from_secs(10))) - 720.0 * 2.0).abs() < 1e-9);
        assert!((m.traffic.cold_starts(Some(std::time::Duration::from_secs(30))) - 720.0).abs() < 1e-9);
        assert_eq!(m.traffic.cold_starts(None), 0.0);
        assert_eq!(m.cells.len(), 3);
        assert!(m.recommendation.is_some());
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["groups"][0]["month"]["cells"][2]["engines"], 1);
        let b = &report.groups[1];
        assert!((b.standing_usd - 1.0).abs() < 1e-9);
    }

    #[test]
    fn without_engine_rows_the_throughput_is_assumed_and_said_so() {
        let period = Period { from_ms: 0, to_ms: 60_000 };
        let report = build(&[row(0, "a", "api", "managed", 10, 100.0, 0.1)], &[], &Catalog::default(), period);
        assert!(matches!(report.throughput.source, Source::Assumed(_)));
        assert!(report.to_string().contains("assumed"));
        assert!(report.groups[0].month.is_none(), "no catalog: nothing to price");
    }
}
