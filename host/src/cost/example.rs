//! `meridian cost example`: the seed article's worked example as inputs to the cost model — a
//! 70B model at 10M, 100M and 1B tokens a month; a managed API at $15–50 per million tokens;
//! serverless GPUs at $4–8 per GPU-hour for 50, 200 and 800 GPU-hours; one dedicated H100 at
//! $2/hour for 720 hours.
//!
//! What the article leaves implicit, stated here: each row's GPU-hours imply a throughput (10M
//! tokens in 50 hours is 56 tokens/s); its single H100 at 1B tokens implies an engine that
//! sustains 1B tokens in 720 hours (386 tokens/s); its load is flat (peak = mean) and has no cold
//! starts. With a measured throughput ([`Example::at_throughput`]) the GPU-hours and engines
//! follow from it instead.

use std::fmt::{self, Write as _};

use serde::Serialize;

use crate::accounting::PriceModel;
use crate::cost::model::{self, Evaluation, Gpus, Offer, Source, Traffic, Way, HOURS_PER_MONTH};

/// The article's rows: tokens a month and the serverless GPU-hours it gives them.
pub const ROWS: [(f64, f64); 3] = [(10e6, 50.0), (100e6, 200.0), (1e9, 800.0)];

/// The article's offers: the API's two price ends, the serverless two, and the H100.
pub fn offers() -> Vec<Offer> {
    let token = |usd: f64| PriceModel::token(usd, usd);
    let second = |usd_per_hour: f64| PriceModel::gpu_second(usd_per_hour / 3600.0);
    vec![
        Offer { name: "api at $15/Mtok".into(), price: token(15.0) },
        Offer { name: "api at $50/Mtok".into(), price: token(50.0) },
        Offer { name: "serverless at $4/GPU-hour".into(), price: second(4.0) },
        Offer { name: "serverless at $8/GPU-hour".into(), price: second(8.0) },
        Offer { name: "dedicated H100 at $2/hour".into(), price: PriceModel::Hour { usd_per_hour: 2.0, capacity: 1 } },
    ]
}

/// The worked example, evaluated.
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    /// A row per volume.
    pub rows: Vec<Evaluation>,
    /// The throughput given on the command line, if any.
    pub tokens_per_second: Option<f64>,
}

/// The article's traffic at `tokens` a month: every token counts as GPU work (its throughput is
/// tokens over GPU-hours), flat, and half prompt, half generated (the article prices both alike).
fn traffic(tokens: f64) -> Traffic {
    Traffic {
        input_tokens: tokens / 2.0,
        output_tokens: tokens / 2.0,
        // Requests only matter for a per-request billing minimum, which the article has not.
        requests: 0.0,
        work_tokens: tokens,
        peak_to_mean: 1.0,
        idle_gaps_s: Vec::new(),
        per_month: 1.0,
    }
}

/// The throughput the article's single H100 needs at its largest row.
pub fn article_engine_tokens_per_s() -> f64 {
    ROWS[ROWS.len() - 1].0 / (HOURS_PER_MONTH * 3600.0)
}

impl Example {
    /// The article's own assumptions.
    pub fn article() -> Example {
        Example::build(None)
    }

    /// The same rows at a measured throughput: serverless GPU-hours and dedicated engines follow
    /// from `tokens_per_s` instead of the article's GPU-hours.
    pub fn at_throughput(tokens_per_s: f64) -> Example {
        Example::build(Some(tokens_per_s))
    }

    fn build(measured: Option<f64>) -> Example {
        let offers = offers();
        let rows = ROWS
            .iter()
            .map(|&(tokens, hours)| {
                let gpus = match measured {
                    Some(tps) => {
                        Gpus { serverless_tokens_per_s: tps, dedicated_tokens_per_s: tps, source: Source::Given }
                    }
                    None => Gpus {
                        serverless_tokens_per_s: tokens / (hours * 3600.0),
                        dedicated_tokens_per_s: article_engine_tokens_per_s(),
                        source: Source::Assumed(format!(
                            "the article's {hours:.0} GPU-hours for {} tokens; one H100 for up to 1B tokens",
                            volume(tokens)
                        )),
                    },
                };
                model::evaluate(&traffic(tokens), &offers, &gpus)
            })
            .collect();
        Example { rows, tokens_per_second: measured }
    }
}

/// `10M`, `1B`, `1.5B`…
pub fn volume(tokens: f64) -> String {
    let (v, unit) = if tokens >= 1e9 {
        (tokens / 1e9, "B")
    } else if tokens >= 1e6 {
        (tokens / 1e6, "M")
    } else if tokens >= 1e3 {
        (tokens / 1e3, "k")
    } else {
        (tokens, "")
    };
    let digits = if (v - v.round()).abs() < 0.05 { 0 } else { 1 };
    format!("{v:.digits$}{unit}")
}

/// `$1,440`, `$15k`, `$1.5k`…
pub fn usd(v: f64) -> String {
    if v >= 10_000.0 {
        format!("${:.0}k", v / 1000.0)
    } else if v >= 2_000.0 {
        let k = v / 1000.0;
        if (k - k.round()).abs() < 0.05 {
            format!("${k:.0}k")
        } else {
            format!("${k:.1}k")
        }
    } else {
        let whole = v.round() as u64;
        if whole >= 1000 {
            format!("${},{:03}", whole / 1000, whole % 1000)
        } else {
            format!("${whole}")
        }
    }
}

fn range(e: &Evaluation, way: Way) -> String {
    e.ranges.iter().find(|r| r.way == way).map_or_else(
        || "—".into(),
        |r| if (r.high - r.low).abs() < 0.5 { usd(r.low) } else { format!("{}–{}", usd(r.low), usd(r.high)) },
    )
}

impl fmt::Display for Example {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.tokens_per_second {
            None => writeln!(f, "The article's worked example (70B model), at the throughputs it implies:\n")?,
            Some(tps) => writeln!(f, "The article's worked example (70B model), at {tps:.0} tokens/s per GPU:\n")?,
        }
        writeln!(
            f,
            "| tokens/month | API ($15–50/Mtok) | serverless ($4–8/GPU-hour) | dedicated ($2/hour) | GPU-hours | tokens/s per GPU | engines | recommendation |"
        )?;
        writeln!(f, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")?;
        for e in &self.rows {
            let hours = e.cells.iter().find(|c| c.way == Way::Serverless).and_then(|c| c.gpu_hours).unwrap_or(0.0);
            let engines = e.cells.iter().find_map(|c| c.engines).unwrap_or(0);
            writeln!(
                f,
                "| {} | {} | {} | {} | {hours:.0} | {:.0} | {engines} | {} |",
                volume(e.traffic.tokens()),
                range(e, Way::Api),
                range(e, Way::Serverless),
                range(e, Way::Dedicated),
                e.gpus.serverless_tokens_per_s,
                e.recommendation.as_ref().map_or("—", |r| r.way.name()),
            )?;
        }
        let mut notes = String::new();
        if self.tokens_per_second.is_none() {
            let _ = writeln!(
                notes,
                "\nWhat the article leaves implicit: each row's GPU-hours are a throughput ({}), the single H100 \
                 must sustain {:.0} tokens/s to carry 1B tokens in 720 hours, and the load is flat with no cold \
                 starts. `--tokens-per-second N` reruns the rows at a measured throughput.",
                self.rows
                    .iter()
                    .map(|e| format!(
                        "{} tokens in {:.0} hours is {:.0} tokens/s",
                        volume(e.traffic.tokens()),
                        e.traffic.work_tokens / e.gpus.serverless_tokens_per_s / 3600.0,
                        e.gpus.serverless_tokens_per_s
                    ))
                    .collect::<Vec<_>>()
                    .join("; "),
                article_engine_tokens_per_s()
            );
        }
        for e in &self.rows {
            if let Some(r) = &e.recommendation {
                let _ = writeln!(notes, "\n{}: {} ({}).", volume(e.traffic.tokens()), r.way.name(), r.reason);
            }
        }
        f.write_str(&notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The article's range for each row and way, USD a month.
    const ARTICLE: [[(f64, f64); 3]; 3] = [
        [(150.0, 500.0), (200.0, 400.0), (1440.0, 1440.0)],
        [(1_500.0, 5_000.0), (800.0, 1_600.0), (1440.0, 1440.0)],
        [(15_000.0, 50_000.0), (3_200.0, 6_400.0), (1440.0, 1440.0)],
    ];

    /// The ways the article's break-even table allows for a row: under 100M tokens the API; 20 to
    /// 80 GPU-hours serverless; over 100 GPU-hours dedicated.
    fn allowed(tokens: f64, gpu_hours: f64) -> Vec<Way> {
        let mut ways = Vec::new();
        if tokens < 100e6 {
            ways.push(Way::Api);
        }
        if (20.0..=80.0).contains(&gpu_hours) {
            ways.push(Way::Serverless);
        }
        if gpu_hours > 100.0 {
            ways.push(Way::Dedicated);
        }
        ways
    }

    #[test]
    fn the_cells_fall_in_the_article_ranges_and_the_recommendations_match_its_table() {
        let example = Example::article();
        println!("{example}");
        assert_eq!(example.rows.len(), 3);
        for ((row, want), &(tokens, hours)) in example.rows.iter().zip(ARTICLE).zip(&ROWS) {
            for (way, (lo, hi)) in Way::ALL.into_iter().zip(want) {
                let r = row.ranges.iter().find(|r| r.way == way).expect("every way has offers");
                assert!(lo - 0.5 <= r.low && r.high <= hi + 0.5, "{tokens}: {way:?} {r:?} not in {lo}–{hi}");
                // The range is the article's, not a point inside it.
                assert!((r.low - lo).abs() < 0.5 && (r.high - hi).abs() < 0.5, "{tokens}: {way:?} {r:?}");
            }
            let serverless = row.cells.iter().find(|c| c.way == Way::Serverless).expect("a serverless cell");
            assert!((serverless.gpu_hours.expect("hours") - hours).abs() < 1e-6);
            let recommended = row.recommendation.as_ref().expect("a recommendation").way;
            assert!(allowed(tokens, hours).contains(&recommended), "{tokens}: {recommended:?}");
        }
        // 10M tokens in 50 hours is 56 tokens/s.
        assert_eq!(example.rows[0].gpus.serverless_tokens_per_s.round(), 56.0);
        assert!(example.to_string().contains("is 56 tokens/s"));
    }

    #[test]
    fn a_measured_throughput_moves_the_answer() {
        // At 56 tokens/s, 1B tokens take 4,960 serverless GPU-hours and seven H100s.
        let slow = Example::at_throughput(56.0);
        let top = &slow.rows[2];
        let engines = top.cells.iter().find_map(|c| c.engines).expect("engines");
        assert_eq!(engines, 7);
        let hours = top.cells.iter().find(|c| c.way == Way::Serverless).and_then(|c| c.gpu_hours).expect("hours");
        assert!((hours - 1e9 / 56.0 / 3600.0).abs() < 1e-6);
        assert_eq!(top.recommendation.as_ref().map(|r| r.way), Some(Way::Dedicated));
        // At 10M tokens a month a fast engine makes serverless nearly free: still not dedicated.
        let fast = Example::at_throughput(2_000.0);
        let low = &fast.rows[0];
        assert_eq!(low.recommendation.as_ref().map(|r| r.way), Some(Way::Serverless));
        assert!(low.ranges.iter().find(|r| r.way == Way::Serverless).expect("serverless").high < 12.0);
    }
}
