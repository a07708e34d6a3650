//! `soak`: a million requests at concurrency 64 through a release `meridian edge` process with
//! the default plugin chain (pii-redactor, then latency-router) and its ledger on, half streamed,
//! every answer checked (`meridian_e2e::soak`). Prints the errors, the edge's resident memory
//! along the run and its CPU time per request.
//!
//! Run it with `scripts/bench soak` (builds the release binaries and the plugins).
//! Options: `--requests N` (default 1,000,000), `--concurrency C` (default 64).

use meridian_e2e::process::EdgeProcess;
use meridian_e2e::{soak, MockOptions, MockUpstream, TempDir, UPSTREAM_KEY};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
    };
    let requests = opt("--requests", 1_000_000);
    let concurrency = opt("--concurrency", 64) as usize;

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
