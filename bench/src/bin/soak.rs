//! `soak`: a million requests at concurrency 64 through a release `meridian edge` process with
//! the default plugin chain (pii-redactor, then latency-router) and its ledger on, half streamed,
//! every answer checked (`meridian_e2e::soak`). Prints the errors, the edge's resident memory
//! along the run and its CPU time per request.
//!
//! Run it with `scripts/bench soak` (builds the release binaries and the plugins).
//! Options (`--help`; an unknown option or a bad value is refused): `--requests N` (default
//! 1,000,000), `--concurrency C` (default 64).

use clap::builder::RangedU64ValueParser;
use clap::Parser;
use meridian_e2e::process::EdgeProcess;
use meridian_e2e::{soak, MockOptions, MockUpstream, TempDir, UPSTREAM_KEY};

/// What to run (`soak --help`).
#[derive(Parser)]
#[command(
    name = "soak",
    about = "Requests through a release edge with the default plugin chain and its ledger on, half streamed, every answer checked"
)]
struct Options {
    /// Requests in all.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    concurrency: usize,
}

#[tokio::main]
async fn main() {
    let Options { requests, concurrency } = Options::parse();

    let opts = MockOptions { api_key: Some(UPSTREAM_KEY.into()), record: false, ..MockOptions::default() };
    let upstream = MockUpstream::start_with(opts).await.expect("the mock upstream starts");
    let dir = TempDir::new("soak-bench");
    let edge = EdgeProcess::start(dir.path(), |port| soak::config(port, &upstream.url(), dir.path(), None)).await;
    // Memory after every tenth of the run, and at the 100k mark the acceptance measures from.
    let mut marks: Vec<u64> = (1..=10).map(|i| i * requests / 10).collect();
    marks.push(100_000.min(requests));
    let report = soak::run(&edge, requests, concurrency, &marks).await;
    report.print(concurrency);
    let from = 100_000.min(requests);
    println!("edge RSS growth from {from} answers to the end: {:+.2}%", report.rss_growth_after(from));
    if report.error_count() > 0 {
        std::process::exit(1);
    }
}
