//! The soak, CI-sized: 100,000 requests at concurrency 64 through a `meridian edge` process with
//! the default plugin chain and its ledger, half streamed (see `meridian_e2e::soak`). Every
//! answer must be right, the edge must have counted every request, and its memory must level off.
//! `scripts/bench soak` runs the same load a million times on the release build.

use meridian_e2e::process::EdgeProcess;
use meridian_e2e::{metric, soak, MockOptions, MockUpstream, TempDir, UPSTREAM_KEY};

const REQUESTS: u64 = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_requests_all_answered_right() {
    // The mock keeps no log of what it received: the soak is about the edge's memory, not the mock's.
    let opts = MockOptions { api_key: Some(UPSTREAM_KEY.into()), record: false, ..MockOptions::default() };
    let upstream = MockUpstream::start_with(opts).await.expect("mock starts");
    let dir = TempDir::new("soak");
    let edge = EdgeProcess::start(dir.path(), |port| soak::config(port, &upstream.url(), dir.path(), Some(2000))).await;
    let marks: Vec<u64> = (1..=10).map(|i| i * REQUESTS / 10).collect();
    let report = soak::run(&edge, REQUESTS, 64, &marks).await;
    report.print(64);

    assert_eq!(report.error_count(), 0, "every answer is right: {:?}", report.errors);
    let metrics = edge.client.get_text(&format!("{}/metrics", edge.url)).await;
    assert_eq!(
        metric(&metrics, "meridian_requests_total", &["tenant=\"soak\""]),
        REQUESTS as f64,
        "the edge counted every request"
    );
    // A coarse leak trap, not a benchmark: a leak of even 200 bytes a request would add ~10 MB over
    // the second half, well past this bound; allocator noise on a busy machine stays far below it.
    let growth = report.rss_growth_after(REQUESTS / 2);
    assert!(growth < 20.0, "the edge's memory levels off: +{growth:.1}% over the second half");
}
