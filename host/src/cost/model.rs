//! The cost model: what a month of traffic costs bought each of the three ways (per token from a
//! managed API, per second from serverless GPUs, per hour from dedicated engines), where the ways
//! break even, and which one to buy. `meridian cost example` (the article's numbers) and
//! `meridian cost report` (a ledger's traffic) both evaluate it; only their inputs differ.

use std::time::Duration;

use serde::Serialize;

use crate::accounting::PriceModel;
use crate::chat::Usage;

/// Hours in the model's month (30 days), the article's "720 hours".
pub const HOURS_PER_MONTH: f64 = 720.0;

/// One of the three ways of buying inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Way {
    /// Per token, from a managed API.
    Api,
    /// Per GPU-second while busy, from a serverless platform.
    Serverless,
    /// Per hour, busy or idle, for dedicated engines.
    Dedicated,
}

impl Way {
    /// The three, in the report's order.
    pub const ALL: [Way; 3] = [Way::Api, Way::Serverless, Way::Dedicated];

    /// The way a price model bills.
    pub fn of(price: &PriceModel) -> Way {
        match price {
            PriceModel::Token { .. } => Way::Api,
            PriceModel::GpuSecond { .. } => Way::Serverless,
            PriceModel::Hour { .. } => Way::Dedicated,
        }
    }

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Way::Api => "api",
            Way::Serverless => "serverless",
            Way::Dedicated => "dedicated",
        }
    }
}

/// One way to buy the traffic: a configured target, or a price point of the worked example.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Offer {
    /// The target's name (or the price point's).
    pub name: String,
    /// How it bills.
    pub price: PriceModel,
}

impl Offer {
    /// Which way it is.
    pub fn way(&self) -> Way {
        Way::of(&self.price)
    }
}

/// A month of traffic for one tenant and model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Traffic {
    /// Prompt tokens a month.
    pub input_tokens: f64,
    /// Generated tokens a month.
    pub output_tokens: f64,
    /// Requests a month.
    pub requests: f64,
    /// The tokens GPU time is counted in, a month: those the throughputs of [`Gpus`] are
    /// measured in (the article counts every token; the ledger measures generated tokens).
    pub work_tokens: f64,
    /// The busiest minute's work tokens per second over the month's mean: what dedicated engines
    /// must be sized for (1 for the article's flat load).
    pub peak_to_mean: f64,
    /// Idle gaps before each request of the record, seconds (the first request's is infinite):
    /// a serverless endpoint that scales to zero after less starts cold. Empty: no cold starts.
    #[serde(skip)]
    pub idle_gaps_s: Vec<f64>,
    /// How many of the record make a month.
    pub per_month: f64,
}

impl Traffic {
    /// All tokens, prompt and generated.
    pub fn tokens(&self) -> f64 {
        self.input_tokens + self.output_tokens
    }

    /// The same traffic at `tokens` tokens a month: the same mix, shape and request size; the
    /// cold starts stay (they follow idle gaps, not volume) but never exceed the requests.
    pub fn at_volume(&self, tokens: f64) -> Traffic {
        let k = if self.tokens() > 0.0 { tokens / self.tokens() } else { 0.0 };
        Traffic {
            input_tokens: self.input_tokens * k,
            output_tokens: self.output_tokens * k,
            requests: self.requests * k,
            work_tokens: self.work_tokens * k,
            peak_to_mean: self.peak_to_mean,
            idle_gaps_s: self.idle_gaps_s.clone(),
            per_month: self.per_month,
        }
    }

    /// Cold starts a month at an endpoint that scales to zero after `after` idle (never when
    /// `None`), at most one a request.
    pub fn cold_starts(&self, after: Option<Duration>) -> f64 {
        let Some(after) = after else { return 0.0 };
        let gaps = self.idle_gaps_s.iter().filter(|&&g| g > after.as_secs_f64()).count();
        (gaps as f64 * self.per_month).min(self.requests)
    }
}

/// Where a throughput figure comes from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "from", content = "detail")]
pub enum Source {
    /// Measured from the ledger: the generated tokens of the named engine targets over the time
    /// they were busy.
    Measured(String),
    /// Given on the command line.
    Given,
    /// An assumption, stated.
    Assumed(String),
}

/// What one GPU does, for the serverless and dedicated ways.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpus {
    /// Work tokens a serverless GPU produces per busy second.
    pub serverless_tokens_per_s: f64,
    /// Work tokens one dedicated engine sustains per second.
    pub dedicated_tokens_per_s: f64,
    /// Where those figures come from.
    pub source: Source,
}

/// What one offer costs for the month.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cell {
    /// The offer's name.
    pub offer: String,
    /// Its way.
    pub way: Way,
    /// USD a month.
    pub usd: f64,
    /// GPU-hours billed (serverless) or paid for (dedicated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_hours: Option<f64>,
    /// Dedicated engines needed for the peak.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engines: Option<u32>,
    /// Serverless cold starts a month.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold_starts: Option<f64>,
}

/// A way's cost over its offers: cheapest and dearest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Range {
    /// The way.
    pub way: Way,
    /// USD a month at its cheapest offer.
    pub low: f64,
    /// USD a month at its dearest offer.
    pub high: f64,
    /// The cheapest offer's name.
    pub cheapest: String,
}

/// The volume at which one way becomes cheaper than another.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakEven {
    /// The way that is cheaper below the volume.
    pub below: Way,
    /// The way that is cheaper from it on.
    pub above: Way,
    /// Tokens a month where they cross, comparing each way's cheapest offers.
    pub at_low_prices: Option<f64>,
    /// The same, comparing each way's dearest offers.
    pub at_high_prices: Option<f64>,
}

/// Which way to buy, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recommendation {
    /// The way.
    pub way: Way,
    /// Its cheapest offer.
    pub offer: String,
    /// Why, in a sentence.
    pub reason: String,
}

/// The month evaluated: a cell per offer, each way's range, the break-even volumes and the
/// recommendation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    /// The traffic.
    pub traffic: Traffic,
    /// The GPUs' figures.
    pub gpus: Gpus,
    /// What was priced.
    pub offers: Vec<Offer>,
    /// Per offer.
    pub cells: Vec<Cell>,
    /// Per way that has an offer.
    pub ranges: Vec<Range>,
    /// Per pair of ways that cross between 10⁵ and 10¹³ tokens a month.
    pub break_even: Vec<BreakEven>,
    /// `None` when there is no offer.
    pub recommendation: Option<Recommendation>,
}

/// USD per token of prompt and of generation, from the price model itself (a million of each
/// priced at once: a month's counts do not fit in [`Usage`]).
fn token_rates(price: &PriceModel) -> (f64, f64) {
    let per = |usage: Usage| price.cost(usage, Duration::ZERO) / 1e6;
    (
        per(Usage { input_tokens: 1_000_000, ..Default::default() }),
        per(Usage { output_tokens: 1_000_000, ..Default::default() }),
    )
}

/// Engines needed for `tokens_per_s` at `per_engine` each: at least one; a load equal to an
/// engine's throughput (within rounding) needs one, not two.
fn engines_for(tokens_per_s: f64, per_engine: f64) -> u32 {
    if per_engine <= 0.0 || !per_engine.is_finite() {
        return 1;
    }
    ((tokens_per_s / per_engine) * (1.0 - 1e-9)).ceil().clamp(1.0, f64::from(u32::MAX)) as u32
}

/// What `offer` costs for `traffic` a month.
pub fn cell(offer: &Offer, traffic: &Traffic, gpus: &Gpus) -> Cell {
    let (mut gpu_hours, mut engines, mut cold_starts) = (None, None, None);
    let usd = match offer.price {
        PriceModel::Token { .. } => {
            let (input, output) = token_rates(&offer.price);
            traffic.input_tokens * input + traffic.output_tokens * output
        }
        PriceModel::GpuSecond { .. } => {
            let busy_s = traffic.work_tokens / gpus.serverless_tokens_per_s.max(f64::MIN_POSITIVE);
            let cold = traffic.cold_starts(offer.price.scale_to_zero_after());
            cold_starts = Some(cold);
            let none = Usage::default();
            // Billed request by request, as the platform bills (its minimum applies to each), at
            // the mean busy time; the cold ones pay the start too.
            let usd = if traffic.requests >= 1.0 {
                let each = Duration::try_from_secs_f64(busy_s / traffic.requests).unwrap_or(Duration::MAX);
                let warm = offer.price.billed(none, each, false);
                traffic.requests * warm + cold * (offer.price.billed(none, each, true) - warm)
            } else {
                offer.price.cost(none, Duration::try_from_secs_f64(busy_s).unwrap_or(Duration::MAX))
            };
            // An hour at once: no per-request minimum binds on it.
            let per_hour = offer.price.cost(none, Duration::from_secs(3600));
            gpu_hours = Some(if per_hour > 0.0 { usd / per_hour } else { busy_s / 3600.0 });
            usd
        }
        PriceModel::Hour { usd_per_hour, .. } => {
            let mean = traffic.work_tokens / (HOURS_PER_MONTH * 3600.0);
            let n = engines_for(mean * traffic.peak_to_mean.max(1.0), gpus.dedicated_tokens_per_s);
            engines = Some(n);
            gpu_hours = Some(f64::from(n) * HOURS_PER_MONTH);
            f64::from(n) * HOURS_PER_MONTH * usd_per_hour
        }
    };
    Cell { offer: offer.name.clone(), way: offer.way(), usd, gpu_hours, engines, cold_starts }
}

/// Each way's range over `cells`.
fn ranges(cells: &[Cell]) -> Vec<Range> {
    Way::ALL
        .iter()
        .filter_map(|&way| {
            let mine: Vec<&Cell> = cells.iter().filter(|c| c.way == way).collect();
            let cheapest = mine.iter().min_by(|a, b| a.usd.total_cmp(&b.usd))?;
            let high = mine.iter().map(|c| c.usd).fold(f64::MIN, f64::max);
            Some(Range { way, low: cheapest.usd, high, cheapest: cheapest.offer.clone() })
        })
        .collect()
}

/// The way whose cost is lowest at the top of its range. A price range is a spread of quotes
/// (providers, platforms, regions) the buyer does not control once traffic fails over between
/// them, so the choice is made on the cost that can be counted on; the article's break-even
/// table follows the same rule (at 200 GPU-hours, $800–1,600 serverless loses to $1,440
/// dedicated).
fn recommend(ranges: &[Range]) -> Option<Recommendation> {
    let best = ranges.iter().min_by(|a, b| a.high.total_cmp(&b.high))?;
    let others: Vec<String> = ranges
        .iter()
        .filter(|r| r.way != best.way)
        .map(|r| {
            if r.high - r.low < 0.5 {
                format!("{} ${:.0}", r.way.name(), r.low)
            } else {
                format!("{} ${:.0}–{:.0}", r.way.name(), r.low, r.high)
            }
        })
        .collect();
    let close: Vec<&str> =
        ranges.iter().filter(|r| r.way != best.way && r.low < best.high).map(|r| r.way.name()).collect();
    let mut reason = format!(
        "{} costs at most ${:.0} a month{}",
        best.way.name(),
        best.high,
        if others.is_empty() { String::new() } else { format!(" (vs {})", others.join(", ")) }
    );
    if !close.is_empty() {
        reason.push_str(&format!("; {} can be cheaper at its best price", close.join(" and ")));
    }
    Some(Recommendation { way: best.way, offer: best.cheapest.clone(), reason })
}

/// The volume in `[lo, hi]` tokens a month where `a` stops being cheaper than `b`, by a log scan
/// and bisection on the same cost function; `None` if they do not cross.
fn crossing(cost: impl Fn(f64) -> (f64, f64), lo: f64, hi: f64) -> Option<f64> {
    let diff = |v: f64| {
        let (a, b) = cost(v);
        a - b
    };
    let steps = 240;
    let ratio = (hi / lo).powf(1.0 / f64::from(steps));
    let mut prev = lo;
    let mut below = diff(prev) < 0.0;
    for _ in 0..steps {
        let v = prev * ratio;
        if (diff(v) < 0.0) != below {
            let (mut a, mut b) = (prev, v);
            for _ in 0..60 {
                let m = (a * b).sqrt();
                if (diff(m) < 0.0) == below {
                    a = m;
                } else {
                    b = m;
                }
            }
            return Some(b);
        }
        prev = v;
        below = diff(v) < 0.0;
    }
    None
}

/// Break-even volumes between every pair of ways with offers.
fn break_even(offers: &[Offer], traffic: &Traffic, gpus: &Gpus) -> Vec<BreakEven> {
    let (lo, hi) = (1e5, 1e13);
    let pick = |way: Way, volume: f64, dearest: bool| {
        let t = traffic.at_volume(volume);
        let costs = offers.iter().filter(|o| o.way() == way).map(|o| cell(o, &t, gpus).usd);
        if dearest {
            costs.fold(f64::MIN, f64::max)
        } else {
            costs.fold(f64::MAX, f64::min)
        }
    };
    let mut found = Vec::new();
    for (i, &a) in Way::ALL.iter().enumerate() {
        for &b in &Way::ALL[i + 1..] {
            if !offers.iter().any(|o| o.way() == a) || !offers.iter().any(|o| o.way() == b) {
                continue;
            }
            let at = |dearest| crossing(|v| (pick(a, v, dearest), pick(b, v, dearest)), lo, hi);
            let (low, high) = (at(false), at(true));
            if low.is_none() && high.is_none() {
                continue;
            }
            // Which one is cheaper at small volumes decides the direction.
            let (below, above) = if pick(a, lo, false) <= pick(b, lo, false) { (a, b) } else { (b, a) };
            found.push(BreakEven { below, above, at_low_prices: low, at_high_prices: high });
        }
    }
    found
}

/// Evaluates `traffic` bought from each of `offers`.
pub fn evaluate(traffic: &Traffic, offers: &[Offer], gpus: &Gpus) -> Evaluation {
    let cells: Vec<Cell> = offers.iter().map(|o| cell(o, traffic, gpus)).collect();
    let ranges = ranges(&cells);
    Evaluation {
        traffic: traffic.clone(),
        gpus: gpus.clone(),
        recommendation: recommend(&ranges),
        break_even: break_even(offers, traffic, gpus),
        offers: offers.to_vec(),
        cells,
        ranges,
    }
}

/// Each way's range at each of `volumes` (tokens a month), the same traffic otherwise: the
/// curves of the plot.
pub fn curves(traffic: &Traffic, offers: &[Offer], gpus: &Gpus, volumes: &[f64]) -> Vec<(f64, Vec<Range>)> {
    volumes
        .iter()
        .map(|&v| {
            let t = traffic.at_volume(v);
            let cells: Vec<Cell> = offers.iter().map(|o| cell(o, &t, gpus)).collect();
            (v, ranges(&cells))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus(tps: f64) -> Gpus {
        Gpus { serverless_tokens_per_s: tps, dedicated_tokens_per_s: tps, source: Source::Given }
    }

    fn traffic(tokens: f64) -> Traffic {
        Traffic {
            input_tokens: tokens * 0.75,
            output_tokens: tokens * 0.25,
            requests: tokens / 1000.0,
            work_tokens: tokens * 0.25,
            peak_to_mean: 3.0,
            idle_gaps_s: Vec::new(),
            per_month: 1.0,
        }
    }

    #[test]
    fn each_way_bills_what_it_is_sold_by() {
        let t = traffic(1e9);
        let api = Offer { name: "a".into(), price: PriceModel::token(1.0, 4.0) };
        assert!((cell(&api, &t, &gpus(100.0)).usd - (750.0 + 1000.0)).abs() < 1e-6);
        let sl = Offer { name: "s".into(), price: PriceModel::gpu_second(1.0 / 3600.0) };
        let c = cell(&sl, &t, &gpus(100.0));
        // 2.5e8 generated tokens at 100/s: 694.4 GPU-hours at $1.
        assert!((c.usd - 2.5e8 / 100.0 / 3600.0).abs() < 1e-6, "{c:?}");
        assert!((c.gpu_hours.expect("hours") - c.usd).abs() < 1e-9);
        let cold = PriceModel::GpuSecond {
            usd_per_second: 1.0 / 3600.0,
            min_billed_seconds: 0.0,
            cold_start_seconds: 36.0,
            scale_to_zero_after_seconds: Some(300.0),
        };
        // 101 gaps over 5 minutes in a record that is a tenth of a month: 1,010 cold starts.
        let gaps: Vec<f64> = [600.0; 101].into_iter().chain([10.0; 50]).collect();
        let sparse = Traffic { idle_gaps_s: gaps, per_month: 10.0, ..t.clone() };
        let c2 = cell(&Offer { name: "s".into(), price: cold }, &sparse, &gpus(100.0));
        assert_eq!(c2.cold_starts, Some(1010.0));
        assert!((c2.usd - c.usd - 10.1).abs() < 1e-6, "1,010 cold starts of 36 s are 10.1 GPU-hours");
        // A minimum above the mean busy time bills every request at it: 1M requests of 1 h.
        let min = PriceModel::GpuSecond {
            usd_per_second: 1.0 / 3600.0,
            min_billed_seconds: 3600.0,
            cold_start_seconds: 0.0,
            scale_to_zero_after_seconds: None,
        };
        assert!((cell(&Offer { name: "m".into(), price: min }, &t, &gpus(100.0)).usd - 1e6).abs() < 1e-3);
        let ded = Offer { name: "d".into(), price: PriceModel::Hour { usd_per_hour: 2.0, capacity: 8 } };
        // Mean 96.5 tokens/s, peak 3× = 289 tokens/s: three engines of 100 tokens/s.
        let d = cell(&ded, &t, &gpus(100.0));
        assert_eq!(d.engines, Some(3));
        assert!((d.usd - 3.0 * 720.0 * 2.0).abs() < 1e-9);
    }

    #[test]
    fn break_even_is_where_the_costs_cross() {
        let offers = [
            Offer { name: "a".into(), price: PriceModel::token(1.0, 1.0) },
            Offer { name: "d".into(), price: PriceModel::Hour { usd_per_hour: 2.0, capacity: 1 } },
        ];
        let t = Traffic { peak_to_mean: 1.0, ..traffic(1e6) };
        let e = evaluate(&t, &offers, &gpus(1e6));
        // $1,440 of engine against $1 per million tokens: 1.44 billion tokens.
        let b = &e.break_even[0];
        assert_eq!((b.below, b.above), (Way::Api, Way::Dedicated));
        let at = b.at_low_prices.expect("a crossing");
        assert!((at / 1.44e9 - 1.0).abs() < 1e-6, "{at}");
        assert_eq!(e.recommendation.expect("one").way, Way::Api);
    }
}
