//! The ledger's stores and writer on a real SQLite file (PostgreSQL is covered end to end, against
//! a real server, in `tests/tests/all/ledger.rs`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;
use crate::config::LedgerConfig;
use crate::metrics::Metrics;

fn entry(i: i64, tenant: &str) -> LedgerEntry {
    LedgerEntry {
        ts_ms: 1_000 + i,
        request_id: format!("r{i}"),
        tenant: tenant.into(),
        api: "openai".into(),
        model: "m".into(),
        served_model: Some("upstream-m".into()),
        attempts: vec![
            AttemptRecord { target: "a".into(), kind: "managed".into(), region: None, outcome: "timeout".into() },
            AttemptRecord {
                target: "b".into(),
                kind: "serverless".into(),
                region: Some("eu".into()),
                outcome: "ok".into(),
            },
        ],
        target: Some("b".into()),
        cache_hit: false,
        stream: i % 2 == 0,
        input_tokens: 10 + i as u64,
        output_tokens: 5,
        cache_read_tokens: 2,
        cache_write_tokens: 1,
        token_source: TokenSource::Upstream,
        ttft_ms: Some(12.5),
        busy_ms: None,
        redactions: 1,
        labels: vec!["pii.email.redacted".into()],
        router: Some("router:b,a".into()),
        status: "ok".into(),
        http_status: 200,
        cost_usd: 0.25,
        counterfactual: vec![("a".into(), 0.5)],
    }
}

/// An entry of a request that arrived now (older ones are past retention for a writer).
fn recent(i: i64) -> LedgerEntry {
    LedgerEntry { ts_ms: now_ms() + i, ..entry(i, "acme") }
}

struct Dir(PathBuf);

impl Dir {
    fn new(label: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("meridian-ledger-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn url(&self) -> String {
        format!("sqlite:{}", self.0.join("ledger.db").display())
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn sqlite_keeps_every_field_and_sums_per_tenant() {
    let dir = Dir::new("roundtrip");
    let store = Store::open(&dir.url()).await.unwrap();
    let entries: Vec<_> = (0..10).map(|i| entry(i, if i < 4 { "acme" } else { "globex" })).collect();
    let standing = vec![StandingCost { from_ms: 0, to_ms: 1_000, target: "box".into(), usd: 2.0 }];
    store.insert(entries.clone().into(), standing.clone().into()).await.unwrap();
    assert_eq!(store.load(0, i64::MAX).await.unwrap(), entries);
    assert_eq!(store.load(1_003, 1_005).await.unwrap(), entries[3..5]);
    assert_eq!(store.standing(0, 1_000).await.unwrap(), standing);
    assert_eq!(store.standing(1_000, 2_000).await.unwrap(), []);
    let totals = store.totals_since(1_002).await.unwrap();
    let acme = &totals[0];
    assert_eq!((acme.tenant.as_str(), acme.requests, acme.tokens), ("acme", 2, 12 + 13 + 10));
    assert!((acme.usd - 0.5).abs() < 1e-12);
    assert_eq!(totals[1].requests, 6);
    assert_eq!(store.purge(1_005).await.unwrap(), 5);
    assert_eq!(store.count().await.unwrap(), 5);
    assert!(matches!(Store::open("mysql://x").await, Err(LedgerError::Url(_))));
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_batch_the_store_refuses_is_spilled_then_stored_in_order() {
    let dir = Dir::new("spill");
    let config = LedgerConfig { dir: dir.0.clone(), flush_interval_ms: 20, ..LedgerConfig::default() };
    let metrics = Metrics::new();
    let ledger = Ledger::open(&config, &dir.url(), Vec::new(), metrics.ledger.clone()).await.unwrap();
    // The store breaks under the writer: its table is gone.
    let side = rusqlite::Connection::open(dir.0.join("ledger.db")).unwrap();
    side.execute_batch("DROP TABLE requests").unwrap();
    for i in 0..5 {
        ledger.record(recent(i));
    }
    let spill = dir.0.join("ledger-spill.jsonl");
    until("the refused batch is spilled", || spill.exists()).await;
    assert_eq!(metrics.ledger.records.with_label_values(&["spilled"]).get(), 5);
    // More records queue behind the spilled ones while the store is down.
    for i in 5..8 {
        ledger.record(recent(i));
    }
    // The store comes back; the spill goes in first, then the rest, and the file is gone.
    side.execute_batch(row::SCHEMA).unwrap();
    until("the spill file is written and removed", || !spill.exists()).await;
    ledger.close().await;
    let rows = ledger.store().load(0, i64::MAX).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(),
        (0..8).map(|i| format!("r{i}")).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn close_writes_everything_and_the_hours_of_dedicated_targets() {
    let dir = Dir::new("close");
    // A flush interval far away: only close writes.
    let config = LedgerConfig { dir: dir.0.clone(), flush_interval_ms: 60_000, ..LedgerConfig::default() };
    let metrics = Metrics::new();
    let hourly = vec![HourlyTarget { name: "box".into(), usd_per_hour: 3600.0 }];
    let ledger = Ledger::open(&config, &dir.url(), hourly, metrics.ledger.clone()).await.unwrap();
    for i in 0..100 {
        ledger.record(recent(i));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    ledger.close().await;
    assert_eq!(ledger.store().count().await.unwrap(), 100);
    // $3600 an hour is $1 a second: the stretch since opening, busy or idle.
    let standing = ledger.store().standing(0, i64::MAX).await.unwrap();
    assert_eq!(standing.len(), 1);
    let seconds = (standing[0].to_ms - standing[0].from_ms) as f64 / 1000.0;
    assert!(seconds >= 0.02 && (standing[0].usd - seconds).abs() < 1e-9, "{standing:?}");
    assert!((metrics.ledger.standing_cost.with_label_values(&["box"]).get() - standing[0].usd).abs() < 1e-12);
}

#[tokio::test]
async fn a_full_queue_holds_admissions_until_the_writer_empties_it() {
    let dir = Dir::new("backpressure");
    // No timed flush during the test: only a full queue wakes the writer.
    let config =
        LedgerConfig { dir: dir.0.clone(), flush_interval_ms: 60_000, queue_capacity: 4, ..LedgerConfig::default() };
    let metrics = Metrics::new();
    let ledger = Ledger::open(&config, &dir.url(), Vec::new(), metrics.ledger.clone()).await.unwrap();
    for i in 0..4 {
        ledger.record(recent(i));
    }
    assert_eq!(metrics.ledger.queue.get(), 4);
    // Full: admission waits until the writer has taken the queue.
    tokio::time::timeout(Duration::from_secs(10), ledger.ready()).await.expect("the writer makes room");
    assert_eq!(metrics.ledger.queue.get(), 0, "ready returned only once the queue had room");
    ledger.close().await;
    assert_eq!(ledger.store().count().await.unwrap(), 4);
}
