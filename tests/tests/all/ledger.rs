//! The request ledger: every request becomes exactly one row whatever became of it (answered
//! whole or streamed, answered from the cache, failed over, refused, abandoned by its client),
//! the rows' tokens and costs sum to the Prometheus counters, a killed edge loses at most the
//! flush interval, and dedicated targets' hours are recorded busy or idle. Each runs on SQLite
//! and on a real PostgreSQL server started by the test.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian::config::Config;
use meridian::ledger::{LedgerEntry, Store, TokenSource};
use meridian_e2e::process::EdgeProcess;
use meridian_e2e::raw::RawConn;
use meridian_e2e::servers::Postgres;
use meridian_e2e::{metric, mock_target_toml, model_toml, tenant_toml, Mocks, TempDir, TestEdge, ACME_KEY};
use meridian_mock::{Behavior, MockUpstream};
use serde_json::json;

const OPENAI: &str = "/v1/chat/completions";
const ANTHROPIC: &str = "/v1/messages";

/// Where a test's ledger lives.
enum Backend {
    Sqlite(TempDir),
    Postgres(Postgres),
}

impl Backend {
    fn sqlite() -> Backend {
        Backend::Sqlite(TempDir::new("ledger-sqlite"))
    }

    async fn postgres() -> Backend {
        Backend::Postgres(Postgres::start().await)
    }

    fn url(&self) -> String {
        match self {
            Backend::Sqlite(dir) => format!("sqlite:{}", dir.path().join("ledger.db").display()),
            Backend::Postgres(pg) => pg.url(),
        }
    }

    /// The `[ledger]` table of an edge's config writing here, with its spill file in `dir`.
    fn toml(&self, dir: &TempDir, flush_ms: u64) -> String {
        format!(
            "[ledger]\ndir = {:?}\nurl = {:?}\nflush_interval_ms = {flush_ms}\nstanding_interval_secs = 1\n",
            dir.path().display().to_string(),
            self.url()
        )
    }
}

/// An edge in front of the standard mocks plus `slow` (streams that clients abandon), with a
/// model that fails over from a closed port to `oa2`, and a dedicated target priced by the hour.
fn config(mocks: &Mocks, slow: &MockUpstream, ledger: &str) -> Config {
    Config::parse(&config_text(mocks, slow, ledger, 0)).expect("the ledger test config is valid")
}

/// The TOML of [`config`], listening on `port`.
fn config_text(mocks: &Mocks, slow: &MockUpstream, ledger: &str, port: u16) -> String {
    format!(
        r#"
[node]
listen = "127.0.0.1:{port}"
max_in_flight = 4096

{ledger}
{tenant}
{targets}
{slow}
[targets.down]
api = "openai"
base_url = "http://127.0.0.1:1/v1"
connect_timeout_ms = 200
price = {{ per = "token", input_usd_per_mtok = 5.0, output_usd_per_mtok = 5.0 }}

[targets.sls]
api = "openai"
kind = "serverless"
base_url = "{oa2}/v1"
api_key = "${{MERIDIAN_E2E_UPSTREAM_KEY}}"
price = {{ per = "gpu_second", usd_per_second = 0.001, min_billed_seconds = 1.0, cold_start_seconds = 5.0, scale_to_zero_after_seconds = 60.0 }}

[targets.box]
api = "openai"
kind = "dedicated"
base_url = "{oa2}/v1"
api_key = "${{MERIDIAN_E2E_UPSTREAM_KEY}}"
price = {{ per = "hour", usd_per_hour = 36.0 }}

{models}"#,
        tenant = tenant_toml("acme", ACME_KEY),
        targets = mocks.targets_toml(),
        slow = mock_target_toml("slow", "openai", &format!("{}/v1", slow.url()), (1.0, 2.0)),
        oa2 = mocks.openai2.url(),
        models = [
            model_toml("gpt-test", &[("oa", Some("gpt-4o-mini")), ("an", Some("claude-haiku-4-5"))]),
            model_toml("claude-test", &[("an", Some("claude-haiku-4-5"))]),
            model_toml("failover", &[("down", None), ("oa2", None)]),
            model_toml("slow", &[("slow", None)]),
            model_toml("own", &[("box", None), ("oa", Some("gpt-4o-mini"))]),
            model_toml("serverless", &[("sls", None)]),
        ]
        .join("\n"),
    )
}

fn chat(model: &str, text: &str, stream: bool) -> serde_json::Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": text }], "stream": stream })
}

/// One request of the mix, by its index: what it sends, and the status it must get.
async fn one(edge: &TestEdge, i: usize) -> u16 {
    let text = format!("request {i}");
    let (path, key, body) = match i % 10 {
        0..=2 => (OPENAI, ACME_KEY, chat("gpt-test", &text, false)),
        3 | 4 => (OPENAI, ACME_KEY, chat("gpt-test", &text, true)),
        // The same deterministic prompt every time: answered from the cache after the first.
        5 => (
            OPENAI,
            ACME_KEY,
            json!({ "model": "gpt-test", "temperature": 0, "messages": [{ "role": "user", "content": "cached" }] }),
        ),
        6 if i % 20 == 6 => (OPENAI, ACME_KEY, chat("no-such-model", &text, false)),
        6 => (OPENAI, "wrong-key", chat("gpt-test", &text, false)),
        7 => (OPENAI, ACME_KEY, chat("failover", &text, false)),
        8 => (
            ANTHROPIC,
            ACME_KEY,
            json!({ "model": "claude-test", "max_tokens": 50, "stream": true, "messages": [{ "role": "user", "content": text }] }),
        ),
        _ => (
            ANTHROPIC,
            ACME_KEY,
            json!({ "model": "own", "max_tokens": 50, "messages": [{ "role": "user", "content": text }] }),
        ),
    };
    edge.post(path, key, &body).await.status
}

/// Sends a streamed request to `slow`, reads its first content, and goes away.
async fn abandon(edge: &TestEdge, slow: &MockUpstream) {
    slow.push(Behavior::Say {
        pieces: (0..20).map(|n| format!("piece{n} ")).collect(),
        gap: Duration::from_millis(50),
    });
    let body = chat("slow", "abandoned", true).to_string();
    RawConn::post(edge.addr, OPENAI, ACME_KEY, &[], &body).await.read_until(&["piece0"]).await;
}

/// Polls until the edge has nothing in flight.
async fn idle(edge: &TestEdge) {
    let start = Instant::now();
    while metric(&edge.metrics().await, "meridian_requests_in_flight", &[]) != 0.0 {
        assert!(start.elapsed() < Duration::from_secs(60), "requests stay in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const REQUESTS: usize = 100_000;
const ABANDONED: usize = 200;

async fn one_row_per_request(backend: Backend) {
    let mocks = Mocks::start().await;
    let slow = MockUpstream::start_with(meridian_mock::MockOptions {
        api_key: Some(meridian_e2e::UPSTREAM_KEY.into()),
        ..Default::default()
    })
    .await
    .expect("mock starts");
    let dir = TempDir::new("ledger-spill");
    let edge = Arc::new(TestEdge::start(config(&mocks, &slow, &backend.toml(&dir, 200))).await);

    // 48 clients take the mix's requests in turn.
    let next = Arc::new(AtomicUsize::new(0));
    let statuses: Arc<Mutex<HashMap<u16, usize>>> = Arc::default();
    let clients: Vec<_> = (0..48)
        .map(|_| {
            let (edge, next, statuses) = (Arc::clone(&edge), Arc::clone(&next), Arc::clone(&statuses));
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= REQUESTS - ABANDONED {
                        return;
                    }
                    let status = one(&edge, i).await;
                    *statuses.lock().unwrap().entry(status).or_default() += 1;
                }
            })
        })
        .collect();
    for c in clients {
        c.await.expect("client runs");
    }
    for _ in 0..ABANDONED / 10 {
        let ten: Vec<_> = (0..10).map(|_| abandon(&edge, &slow)).collect();
        for a in ten {
            a.await;
        }
    }
    idle(&edge).await;
    let text = edge.metrics().await;
    edge.edge.close().await;

    let store = Store::open(&backend.url()).await.expect("the ledger opens");
    let rows = store.load(0, i64::MAX).await.expect("the ledger reads");
    println!("statuses {:?}; {} rows", statuses.lock().unwrap(), rows.len());
    assert_eq!(rows.len(), REQUESTS, "one row per request");
    let by_status = |s: &str| rows.iter().filter(|r| r.status == s).count();
    assert_eq!(by_status("client_closed"), ABANDONED, "abandoned streams are rows too");
    // Of the mix (all but the abandoned streams), a tenth each: refused, and failed over.
    let tenth = (REQUESTS - ABANDONED) / 10;
    assert_eq!(by_status("unauthorized") + by_status("model_not_found"), tenth);
    assert!(rows.iter().filter(|r| r.cache_hit).count() > REQUESTS / 20, "cache hits are rows");
    let failed_over = rows.iter().filter(|r| r.model == "failover" && r.target.as_deref() == Some("oa2")).count();
    assert_eq!(failed_over, tenth, "every failover request was answered by oa2");
    assert!(
        rows.iter()
            .any(|r| r.attempts.len() == 2 && r.attempts[0].target == "down" && r.attempts[0].outcome == "connect"),
        "a failed-over row lists its failed attempt"
    );

    // The rows' sums are the counters'.
    let sum = |f: fn(&LedgerEntry) -> f64| rows.iter().map(f).sum::<f64>();
    let cost = sum(|r| r.cost_usd);
    let counted = metric(&text, "meridian_cost_usd_total", &[]);
    assert!((cost - counted).abs() <= 1e-9 * counted.max(1.0), "ledger cost {cost} vs counter {counted}");
    assert_eq!(sum(|r| r.input_tokens as f64), metric(&text, "meridian_tokens_total", &["direction=\"input\""]));
    assert_eq!(sum(|r| r.output_tokens as f64), metric(&text, "meridian_tokens_total", &["direction=\"output\""]));
    assert_eq!(rows.len() as f64, metric(&text, "meridian_requests_total", &[]));

    // The dedicated target costs nothing per request: its hours are standing costs.
    assert!(rows.iter().filter(|r| r.target.as_deref() == Some("box")).all(|r| r.cost_usd == 0.0));
    let standing = store.standing(0, i64::MAX).await.expect("standing costs read");
    let hours: f64 = standing.iter().filter(|s| s.target == "box").map(|s| s.usd).sum();
    assert!(hours > 0.0, "the dedicated target's hours are recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_one_row_on_sqlite() {
    one_row_per_request(Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_one_row_on_postgres() {
    one_row_per_request(Backend::postgres().await).await;
}

#[tokio::test]
async fn a_row_says_what_the_request_did() {
    let mocks = Mocks::start().await;
    let slow = MockUpstream::start().await.expect("mock starts");
    let backend = Backend::sqlite();
    let dir = TempDir::new("ledger-spill");
    let edge = TestEdge::start(config(&mocks, &slow, &backend.toml(&dir, 50))).await;
    let r = edge.post_with(OPENAI, ACME_KEY, &[("x-request-id", "row-1")], &chat("failover", "hello", false)).await;
    assert_eq!(r.status, 200);
    let r = edge.post_with(OPENAI, ACME_KEY, &[("x-request-id", "row-2")], &chat("gpt-test", "hi", true)).await;
    assert_eq!(r.status, 200);
    let r = edge.post_with(OPENAI, ACME_KEY, &[("x-request-id", "row-3")], &chat("nope", "hi", false)).await;
    assert_eq!(r.status, 404);
    for id in ["cold", "warm"] {
        let r = edge.post_with(OPENAI, ACME_KEY, &[("x-request-id", id)], &chat("serverless", id, false)).await;
        assert_eq!(r.status, 200);
    }
    edge.edge.close().await;
    let rows = Store::open(&backend.url()).await.unwrap().load(0, i64::MAX).await.unwrap();
    let row = |id: &str| rows.iter().find(|r| r.request_id == id).unwrap_or_else(|| panic!("row {id}: {rows:?}"));

    let failover = row("row-1");
    assert_eq!(
        (failover.tenant.as_str(), failover.api.as_str(), failover.model.as_str()),
        ("acme", "openai", "failover")
    );
    let attempts: Vec<_> = failover.attempts.iter().map(|a| (a.target.as_str(), a.outcome.as_str())).collect();
    assert_eq!(attempts, [("down", "connect"), ("oa2", "ok")]);
    assert_eq!(failover.target.as_deref(), Some("oa2"));
    assert_eq!(failover.token_source, TokenSource::Upstream);
    assert_eq!((failover.status.as_str(), failover.http_status, failover.stream), ("ok", 200, false));
    assert_eq!(failover.router.as_deref(), Some("static"));
    // Billed at oa2's $1/$2 per million tokens; the counterfactual prices the same tokens at `down`.
    let want = (failover.input_tokens as f64 * 1.0 + failover.output_tokens as f64 * 2.0) / 1e6;
    assert!((failover.cost_usd - want).abs() < 1e-15, "{} vs {want}", failover.cost_usd);
    let down = (failover.input_tokens + failover.output_tokens) as f64 * 5.0 / 1e6;
    assert_eq!(failover.counterfactual.len(), 1);
    assert!((failover.counterfactual[0].1 - down).abs() < 1e-15 && failover.counterfactual[0].0 == "down");
    // Busy time is the answering attempt's, which began after the failed one.
    assert!(failover.busy_ms.is_some_and(|b| b > 0.0));

    let streamed = row("row-2");
    assert!(streamed.stream && streamed.ttft_ms.is_some_and(|t| t > 0.0));
    assert_eq!(streamed.served_model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(streamed.counterfactual.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(), ["an"]);

    // Serverless: billed its busy time at the platform's 1 s minimum; the first request found the
    // endpoint scaled to zero and pays its 5 s cold start too.
    assert!((row("cold").cost_usd - 0.006).abs() < 1e-12, "{:?}", row("cold"));
    assert!((row("warm").cost_usd - 0.001).abs() < 1e-12, "{:?}", row("warm"));

    let refused = row("row-3");
    assert_eq!((refused.status.as_str(), refused.http_status), ("model_not_found", 404));
    assert_eq!((refused.target.as_deref(), refused.token_source, refused.cost_usd), (None, TokenSource::None, 0.0));
}

/// Runs `meridian edge` as a process under load, kills it with SIGKILL, and checks that every
/// request answered more than the flush interval (plus one write) before the kill is in the
/// ledger.
async fn killed_edge_loses_at_most_the_interval(backend: Backend) {
    const FLUSH_MS: u64 = 200;
    let mocks = Mocks::start().await;
    let slow = MockUpstream::start().await.expect("mock starts");
    let dir = TempDir::new("ledger-kill");
    let mut edge = edge_process(&mocks, &slow, &backend, &dir, FLUSH_MS).await;
    let (url, client) = (edge.url.clone(), edge.client.clone());

    // Load until the kill; each answered request's id and when its answer was complete.
    let answered: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..16 {
        let (answered, stop, client, url) = (Arc::clone(&answered), Arc::clone(&stop), client.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("kill-{w}-{n}");
                n += 1;
                let body = Bytes::from(chat("gpt-test", &id, n % 2 == 0).to_string());
                if client.send("POST", &format!("{url}{OPENAI}"), Some(ACME_KEY), &id, body).await == Some(200) {
                    answered.lock().unwrap().push((id, Instant::now()));
                }
            }
        }));
    }
    let started = Instant::now();
    while answered.lock().unwrap().len() < 2000 {
        assert!(started.elapsed() < Duration::from_secs(60), "the edge answers under load");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // `Child::kill` is SIGKILL: no shutdown, no flush.
    edge.kill();
    let killed = Instant::now();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }

    let rows = Store::open(&backend.url()).await.unwrap().load(0, i64::MAX).await.unwrap();
    let stored: std::collections::HashSet<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    let answered = answered.lock().unwrap();
    let lost: Vec<Duration> =
        answered.iter().filter(|(id, _)| !stored.contains(id.as_str())).map(|(_, at)| killed - *at).collect();
    let oldest_lost = lost.iter().max().copied().unwrap_or_default();
    println!(
        "answered {} before the kill, {} rows stored, {} answered but not stored; the oldest of those ended {:?} before the kill",
        answered.len(),
        rows.len(),
        lost.len(),
        oldest_lost
    );
    // The documented bound: a record is durable within the flush interval of its request's end,
    // plus the time of the write that stores it (a batch, in this debug build on a busy machine).
    let bound = Duration::from_millis(FLUSH_MS) + Duration::from_millis(300);
    assert!(oldest_lost <= bound, "a request answered {oldest_lost:?} before the kill was lost (bound {bound:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_edge_loses_at_most_the_flush_interval_on_sqlite() {
    killed_edge_loses_at_most_the_interval(Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_edge_loses_at_most_the_flush_interval_on_postgres() {
    killed_edge_loses_at_most_the_interval(Backend::postgres().await).await;
}

/// Runs `meridian edge` as a process with its ledger in `backend`, and waits until it is ready.
async fn edge_process(
    mocks: &Mocks,
    slow: &MockUpstream,
    backend: &Backend,
    dir: &TempDir,
    flush_ms: u64,
) -> EdgeProcess {
    EdgeProcess::start(dir.path(), |port| config_text(mocks, slow, &backend.toml(dir, flush_ms), port)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_writes_every_row() {
    let mocks = Mocks::start().await;
    let slow = MockUpstream::start().await.expect("mock starts");
    let backend = Backend::sqlite();
    let dir = TempDir::new("ledger-term");
    // No timed flush during the test: the rows are written at shutdown or not at all.
    let mut edge = edge_process(&mocks, &slow, &backend, &dir, 60_000).await;
    let (url, client) = (edge.url.clone(), edge.client.clone());
    for n in 0..300 {
        let body = Bytes::from(chat("gpt-test", &format!("term {n}"), n % 2 == 0).to_string());
        assert_eq!(
            client.send("POST", &format!("{url}{OPENAI}"), Some(ACME_KEY), &format!("term-{n}"), body).await,
            Some(200)
        );
    }
    edge.terminate();
    let status = edge.wait();
    assert!(status.success(), "a clean shutdown exits 0: {status}");
    let store = Store::open(&backend.url()).await.unwrap();
    // The readiness probes are not chat requests: exactly the 300 rows.
    assert_eq!(store.count().await.unwrap(), 300);
}

/// Where `scripts/test` keeps what the tests produce for people to look at.
fn artifacts() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("artifacts");
    std::fs::create_dir_all(&dir).expect("the artifacts folder is created");
    dir
}

/// `meridian cost report`, the CLI, over the ledger an edge wrote: traffic on a dedicated engine
/// (paid by the hour, busy or idle) and on a per-token API; the report prices both, and writes
/// its text, JSON and plot (SVG, PNG) to `target/artifacts/` as `scripts/test`'s artifact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cost_report_reads_the_ledger_an_edge_wrote() {
    let mocks = Mocks::start().await;
    let slow = MockUpstream::start().await.expect("mock starts");
    let backend = Backend::sqlite();
    let dir = TempDir::new("ledger-report");
    let text = config_text(&mocks, &slow, &backend.toml(&dir, 50), 0);
    let edge = TestEdge::start(Config::parse(&text).unwrap()).await;
    for n in 0..200 {
        let (model, stream) = if n % 4 == 0 { ("gpt-test", false) } else { ("own", n % 2 == 0) };
        let r = edge.post(OPENAI, ACME_KEY, &chat(model, &format!("report {n}"), stream)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Closing writes the dedicated engine's hours up to now.
    edge.edge.close().await;

    let config = dir.path().join("edge.toml");
    std::fs::write(&config, &text).unwrap();
    let out = artifacts();
    let report = |format: &str, plots: bool| {
        let mut cmd = std::process::Command::new(meridian_e2e::netns::meridian_bin());
        cmd.args(["cost", "report", "--ledger", &backend.url(), "--config"])
            .arg(&config)
            .args(["--format", format])
            .env("MERIDIAN_E2E_UPSTREAM_KEY", meridian_e2e::UPSTREAM_KEY);
        if plots {
            cmd.arg("--svg").arg(out.join("cost-report.svg")).arg("--png").arg(out.join("cost-report.png"));
        }
        let output = cmd.output().expect("meridian cost report runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).expect("UTF-8")
    };
    let json: serde_json::Value = serde_json::from_str(&report("json", false)).expect("the report is JSON");
    let groups = json["groups"].as_array().expect("groups");
    let group = |model: &str| {
        groups
            .iter()
            .find(|g| g["tenant"] == "acme" && g["model"] == model)
            .unwrap_or_else(|| panic!("{model}: {json}"))
    };
    assert_eq!(group("own")["requests"], 150);
    assert_eq!(group("gpt-test")["requests"], 50);
    // The engine's requests cost nothing each; its hours are spread over them.
    assert_eq!(group("own")["request_usd"], 0.0);
    assert!(group("own")["standing_usd"].as_f64().unwrap() > 0.0, "{json}");
    assert!(group("gpt-test")["request_usd"].as_f64().unwrap() > 0.0);
    let text = report("text", true);
    std::fs::write(out.join("cost-report.txt"), &text).unwrap();
    for file in ["cost-report.svg", "cost-report.png"] {
        assert!(std::fs::metadata(out.join(file)).is_ok_and(|m| m.len() > 1000), "{file} is written");
    }
    println!("{text}");
}
