//! `meridian cost …`: the break-even report from a ledger, the seed article's worked example, and
//! a month replayed under each way of buying capacity ([`meridian::cost`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use meridian::config::Config;
use meridian::cost::example::{volume, Example};
use meridian::cost::plot::{self, Chart};
use meridian::cost::replay::{self, Fleet, Generated, Month};
use meridian::cost::report::{self, Assumptions, Catalog, Period};
use meridian::ledger::{LedgerEntry, StandingCost, Store};

const DAY_MS: i64 = 86_400_000;

/// How a report or the example is printed, and where its plot goes.
#[derive(clap::Args)]
pub struct Output {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Write the plot as SVG here.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Write the plot as PNG here (needs Debian's fonts-dejavu-core).
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
}

/// `meridian cost …`.
#[derive(Subcommand)]
pub enum CostCommand {
    /// Per tenant and model over a period of the ledger: volume, what it actually cost, what a
    /// month of it would cost per token (each configured API), on serverless GPUs and on
    /// dedicated engines (sized for its peak at the engines' measured tokens/s), the break-even
    /// volumes and a recommendation; optionally the plot of cost against volume.
    Report {
        /// The ledger: `sqlite:PATH` or `postgres://…`.
        #[arg(long, value_name = "URL")]
        ledger: String,
        /// The edge's config, for its targets' prices (without it only volumes and actual costs).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Start of the period: `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SSZ` (UTC); default 30 days
        /// before `--to`.
        #[arg(long, value_name = "DATE", value_parser = parse_date)]
        from: Option<i64>,
        /// End of the period (excluded); default now.
        #[arg(long, value_name = "DATE", value_parser = parse_date)]
        to: Option<i64>,
        #[command(flatten)]
        output: Output,
        /// Tokens/s per GPU instead of the ledger's measurement.
        #[arg(long, value_name = "N")]
        tokens_per_second: Option<f64>,
    },
    /// The seed article's worked example (a 70B model at 10M, 100M and 1B tokens a month) through
    /// the same cost model, with the throughput each row assumes.
    Example {
        /// Rerun the rows at this measured throughput (tokens/s per GPU).
        #[arg(long, value_name = "N")]
        tokens_per_second: Option<f64>,
        #[command(flatten)]
        output: Output,
    },
    /// A month through the edge's dispatch core under each policy: API only, serverless only,
    /// dedicated only (sized for the peak), and spillover (dedicated up to a utilisation, then
    /// serverless, then the API); cost and p50/p99 time to first token for each.
    Replay {
        /// Replay a generated month (diurnal load with bursts)…
        #[arg(long, value_enum, default_value_t = MonthSource::Generated, conflicts_with = "ledger")]
        month: MonthSource,
        /// …or the answered requests of a ledger (`sqlite:PATH` or `postgres://…`) over `--from`
        /// and `--to`.
        #[arg(long, value_name = "URL")]
        ledger: Option<String>,
        /// Start of the recorded period (default 30 days before `--to`).
        #[arg(long, value_name = "DATE", value_parser = parse_date, requires = "ledger")]
        from: Option<i64>,
        /// End of the recorded period (default now).
        #[arg(long, value_name = "DATE", value_parser = parse_date, requires = "ledger")]
        to: Option<i64>,
        /// Seed of the generated month and of the replay's draws.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Mean requests per second of the generated month.
        #[arg(long, default_value_t = 3.0)]
        mean_rps: f64,
        /// Dedicated engines for spillover (default: enough for the month's median load).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        engines: Option<u32>,
        /// Concurrent sequences per GPU.
        #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
        engine_capacity: u32,
        /// Spillover fills the engines up to this share of their capacity.
        #[arg(long, default_value_t = 0.85)]
        utilisation: f64,
        /// The p99 time to first token a policy must meet, ms.
        #[arg(long, default_value_t = 2_000.0)]
        p99_ttft_ms: f64,
        /// Seconds per simulated step (requests in a step travel together).
        #[arg(long, default_value_t = 1.0)]
        step_s: f64,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

/// How a result is printed.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Tables for people.
    Text,
    /// One JSON document.
    Json,
}

/// Where `replay` takes its month from.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MonthSource {
    /// Generated: diurnal load with bursts.
    Generated,
}

/// Runs `meridian cost …`.
pub fn run(command: CostCommand) -> ExitCode {
    let result = match command {
        CostCommand::Report { ledger, config, from, to, output, tokens_per_second } => {
            run_report(&ledger, config.as_deref(), period(from, to), &output, tokens_per_second)
        }
        CostCommand::Example { tokens_per_second, output } => {
            let example = match tokens_per_second {
                Some(tps) if tps > 0.0 && tps.is_finite() => Example::at_throughput(tps),
                Some(_) => return fail("--tokens-per-second must be a positive number"),
                None => Example::article(),
            };
            let charts: Vec<Chart> = example
                .rows
                .iter()
                .map(|m| Chart {
                    title: format!("70B model at {} tokens a month", volume(m.traffic.tokens())),
                    month: m,
                })
                .collect();
            output.emit(&example, &charts)
        }
        CostCommand::Replay {
            month: _,
            ledger,
            from,
            to,
            seed,
            mean_rps,
            engines,
            engine_capacity,
            utilisation,
            p99_ttft_ms,
            step_s,
            format,
        } => {
            let valid = step_s > 0.0
                && step_s.is_finite()
                && (0.0..=1.0).contains(&utilisation)
                && mean_rps > 0.0
                && mean_rps.is_finite();
            if !valid {
                return fail("--step-s and --mean-rps must be positive and --utilisation within 0–1");
            }
            let month = match ledger {
                Some(url) => {
                    let p = period(from, to);
                    match load(&url, p).map(|(entries, _)| Month::recorded(&entries, step_s, seed)) {
                        Ok(Some(month)) => month,
                        Ok(None) => return fail("the ledger has no answered request in the period"),
                        Err(e) => return fail(&e),
                    }
                }
                None => Month::generated(&Generated { mean_rps, ..Generated::bursty(seed) }, step_s),
            };
            let fleet =
                Fleet { engines, engine_capacity, utilisation, p99_ttft_target_ms: p99_ttft_ms, ..Fleet::default() };
            let started = std::time::Instant::now();
            let report = replay::replay(&month, &fleet);
            let printed = print(format, &report, &report);
            if format == Format::Text {
                println!("wall time: {:.1} s", started.elapsed().as_secs_f64());
            }
            printed
        }
    };
    result.map_or_else(|e| fail(&e), |()| ExitCode::SUCCESS)
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

fn print(format: Format, text: &impl std::fmt::Display, json: &impl serde::Serialize) -> Result<(), String> {
    match format {
        Format::Text => println!("{text}"),
        Format::Json => println!("{}", serde_json::to_string_pretty(json).map_err(|e| e.to_string())?),
    }
    Ok(())
}

fn period(from: Option<i64>, to: Option<i64>) -> Period {
    let to_ms = to.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
    });
    Period { from_ms: from.unwrap_or(to_ms - 30 * DAY_MS), to_ms }
}

/// The period's rows and standing costs, through the ledger's own loader.
fn load(url: &str, period: Period) -> Result<(Vec<LedgerEntry>, Vec<StandingCost>), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(async {
        let store = Store::open(url).await.map_err(|e| e.to_string())?;
        let entries = store.load(period.from_ms, period.to_ms).await.map_err(|e| e.to_string())?;
        let standing = store.standing(period.from_ms, period.to_ms).await.map_err(|e| e.to_string())?;
        Ok((entries, standing))
    })
}

fn run_report(
    ledger: &str,
    config: Option<&Path>,
    period: Period,
    output: &Output,
    tokens_per_second: Option<f64>,
) -> Result<(), String> {
    if period.to_ms <= period.from_ms {
        return Err("--from must be before --to".into());
    }
    let assumptions = Assumptions { tokens_per_second, ..Assumptions::default() };
    let catalog = match config {
        Some(path) => Catalog::from_config(&Config::load(path).map_err(|e| e.to_string())?, assumptions),
        None => Catalog { assumptions, ..Catalog::default() },
    };
    let (entries, standing) = load(ledger, period)?;
    let report = report::build(&entries, &standing, &catalog, period);
    let charts: Vec<Chart> =
        report.priced().map(|(g, m)| Chart { title: format!("{} / {}", g.tenant, g.model), month: m }).collect();
    output.emit(&report, &charts)
}

impl Output {
    /// Prints `what` in the chosen format and writes the plots asked for.
    fn emit<T: std::fmt::Display + serde::Serialize>(&self, what: &T, charts: &[Chart<'_>]) -> Result<(), String> {
        print(self.format, what, what)?;
        write_plots(charts, self.svg.as_deref(), self.png.as_deref())
    }
}

fn write_plots(charts: &[Chart<'_>], svg: Option<&Path>, png: Option<&Path>) -> Result<(), String> {
    if let Some(path) = svg {
        plot::write_svg(path, charts).map_err(|e| e.to_string())?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = png {
        plot::write_png(path, charts).map_err(|e| e.to_string())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SSZ` (UTC) as milliseconds since the Unix epoch.
fn parse_date(s: &str) -> Result<i64, String> {
    let bad = || format!("{s:?} is not YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ");
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z').ok_or_else(bad)?)),
        None => (s, None),
    };
    let field = |v: Option<&str>, lo: i64, hi: i64| {
        v.and_then(|v| v.parse::<i64>().ok()).filter(|n| (lo..=hi).contains(n)).ok_or_else(bad)
    };
    let mut d = date.splitn(3, '-');
    let (y, m, day) = (field(d.next(), 1970, 9999)?, field(d.next(), 1, 12)?, field(d.next(), 1, 31)?);
    let seconds = match time {
        Some(t) => {
            let mut t = t.splitn(3, ':');
            field(t.next(), 0, 23)? * 3600 + field(t.next(), 0, 59)? * 60 + field(t.next(), 0, 60)?
        }
        None => 0,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok((days * 86_400 + seconds) * 1000)
}

#[cfg(test)]
mod tests {
    use super::parse_date;

    #[test]
    fn dates_are_utc_milliseconds() {
        assert_eq!(parse_date("1970-01-01"), Ok(0));
        assert_eq!(parse_date("2024-03-01"), Ok(1_709_251_200_000));
        assert_eq!(parse_date("2024-03-01T01:02:03Z"), Ok(1_709_251_200_000 + 3_723_000));
        assert!(parse_date("2024-13-01").is_err());
        assert!(parse_date("2024-03-01T01:02:03").is_err());
        assert!(parse_date("yesterday").is_err());
    }
}
