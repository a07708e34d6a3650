//! Tenants' budgets through real edges on loopback, in front of the mock APIs: concurrent
//! requests never spend past a budget by more than one credit chunk, a stream whose credit line
//! the budget cannot extend ends with a typed error event in both API shapes, two edges sharing a
//! real Redis enforce one budget (and the Redis store reserves, extends, settles and seeds as the
//! in-process one does), a request over budget is refused before it starts (429 with
//! `retry-after` at the period's reset), and RPM and TPM hold.
//!
//! Every prompt here is `budget!!` (8 bytes: 2 tokens to the edge's estimate and to the mocks'
//! count), and every answer is told to the mock in pieces of known size, so that what each
//! request reserves and spends is known exactly.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian::budget::{Ask, Budgets, Hold, Refused};
use meridian::config::{Config, TenantBudgets};
use meridian::ledger::Totals;
use meridian_e2e::servers::Redis;
use meridian_e2e::{
    metric, metric_or_zero, tenant_toml, Behavior, ConfigExt, Mocks, Reply, TestEdge, ACME_KEY, GLOBEX_KEY,
};
use serde_json::{json, Value};
use tokio::task::JoinSet;

const OPENAI: &str = "/v1/chat/completions";
const ANTHROPIC: &str = "/v1/messages";
/// The prompt, and its tokens.
const PROMPT: &str = "budget!!";
const PROMPT_TOKENS: u64 = 2;
/// `budgets.credit_chunk_tokens` in these tests.
const CHUNK: u64 = 16;

/// The standard edge config with `acme`'s budgets (and `globex`'s, if given), credit chunks of
/// [`CHUNK`] tokens, counters in Redis at `redis` if given, and no ledger.
fn config(mocks: &Mocks, acme: TenantBudgets, globex: TenantBudgets, redis: Option<&Redis>) -> Config {
    let mut config = mocks.config();
    config.ledger.enabled = false;
    config.budgets.credit_chunk_tokens = CHUNK as u32;
    config.budgets.redis_url = redis.map(Redis::url);
    config.tenant_mut("acme").budgets = acme;
    config.tenant_mut("globex").budgets = globex;
    config
}

fn tokens_per_day(n: u64) -> TenantBudgets {
    TenantBudgets { tokens_per_day: Some(n), ..TenantBudgets::default() }
}

/// An OpenAI-shaped chat request for `model`.
fn chat(model: &str, stream: bool, max_tokens: Option<u64>) -> Value {
    let mut body = json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": PROMPT}]});
    if let Some(m) = max_tokens {
        body["max_tokens"] = json!(m);
    }
    body
}

/// An Anthropic-shaped request for `claude-test`.
fn message(stream: bool, max_tokens: u64) -> Value {
    json!({"model": "claude-test", "stream": stream, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": PROMPT}]})
}

async fn post_anthropic(edge: &TestEdge, key: &str, body: &Value) -> Reply {
    let headers = [("x-api-key", key), ("anthropic-version", "2023-06-01")];
    edge.send("POST", ANTHROPIC, None, &headers, body.to_string().into()).await
}

/// The mock says `n` copies of `piece`, each its own content event, `gap` apart.
fn say(n: usize, piece: &str, gap: Duration) -> Behavior {
    Behavior::Say { pieces: vec![piece.to_string(); n], gap }
}

/// Tokens the edge counted for `tenant`, prompt and output, at every target.
async fn spent(edge: &TestEdge, tenant: &str) -> u64 {
    metric_or_zero(&edge.metrics().await, "meridian_tokens_total", &[&format!("tenant=\"{tenant}\"")]) as u64
}

/// The `retry-after` of a `budget_exhausted` refusal in the OpenAI shape, checked as such.
fn budget_refusal(r: &Reply) -> u64 {
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.error_code(), "budget_exhausted", "{}", r.text());
    r.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("a retry-after: {:?}", r.headers))
}

/// How a streamed answer in the OpenAI shape ended.
#[derive(Debug, PartialEq)]
enum Ending {
    /// `[DONE]`, after this text.
    Clean(String),
    /// A typed error event with this code, after this text.
    Error(String, String),
}

/// The text of an OpenAI-shaped stream and how it ended; panics on anything else (no end at all,
/// an error event followed by more).
fn openai_stream(r: &Reply) -> Ending {
    assert_eq!((r.status, r.header("content-type")), (200, Some("text/event-stream")), "{}", r.text());
    let events = r.events();
    let (last, body) = events.split_last().unwrap_or_else(|| panic!("an empty stream: {}", r.text()));
    let text: String = body
        .iter()
        .map(|e| serde_json::from_str::<Value>(&e.data).expect("JSON chunks"))
        .inspect(|c| assert!(c.get("error").is_none(), "an error event is the last: {}", r.text()))
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    if last.data == "[DONE]" {
        return Ending::Clean(text);
    }
    let error: Value = serde_json::from_str(&last.data).expect("a JSON error event");
    let code = error["error"]["code"].as_str().unwrap_or_else(|| panic!("a typed error event: {}", r.text()));
    Ending::Error(code.to_string(), text)
}

/// Seconds since the Unix epoch.
fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("a clock after 1970").as_secs()
}

/// Runs `scenario` until one run falls within a single clock minute, and returns that run's
/// outcome: a limit per minute starts again with each minute, so a run across two says nothing.
/// Each run starts its own edge, and with it fresh counters.
async fn within_one_minute<T, F, Fut>(mut scenario: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    loop {
        let minute = unix_secs() / 60;
        let outcome = scenario().await;
        if unix_secs() / 60 == minute {
            return outcome;
        }
    }
}

/// Sends `n` requests at once, each made by `request(edge)`, and returns the replies.
async fn all_at_once<F, Fut>(edge: &Arc<TestEdge>, n: usize, request: F) -> Vec<Reply>
where
    F: Fn(Arc<TestEdge>) -> Fut,
    Fut: std::future::Future<Output = Reply> + Send + 'static,
{
    let mut set = JoinSet::new();
    for _ in 0..n {
        set.spawn(request(Arc::clone(edge)));
    }
    set.join_all().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_streams_against_a_budget_for_fifty_spend_it_and_no_more() {
    let mocks = Mocks::start().await;
    // Each request holds its prompt and its `max_tokens` of 8, and spends exactly that: the mock
    // says 8 pieces of 4 bytes (8 tokens to the edge and to the mock).
    let per_request = PROMPT_TOKENS + 8;
    let budget = 50 * per_request;
    let edge = Arc::new(TestEdge::start(config(&mocks, tokens_per_day(budget), TenantBudgets::default(), None)).await);
    for _ in 0..200 {
        mocks.openai.push(say(8, "abcd", Duration::ZERO));
    }
    let replies =
        all_at_once(
            &edge,
            200,
            |edge| async move { edge.post(OPENAI, ACME_KEY, &chat("gpt-test", true, Some(8))).await },
        )
        .await;

    let (answered, refused): (Vec<_>, Vec<_>) = replies.iter().partition(|r| r.status == 200);
    assert_eq!((answered.len(), refused.len()), (50, 150), "the budget admits 50, whatever the interleaving");
    for r in &answered {
        assert_eq!(openai_stream(r), Ending::Clean("abcd".repeat(8)), "an admitted stream is answered whole");
    }
    for r in &refused {
        let retry_after = budget_refusal(r);
        assert!((1..=86_400).contains(&retry_after), "at the day's reset: {retry_after}");
    }
    assert_eq!(mocks.openai.request_count(), 50, "no refused request reached the upstream");
    let spent = spent(&edge, "acme").await;
    assert!(spent <= budget + CHUNK, "spent {spent} of a budget of {budget}");
    assert_eq!(spent, 50 * per_request, "what the answered requests spent, counted once each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_credit_lines_never_overshoot_by_more_than_one_chunk() {
    let mocks = Mocks::start().await;
    // No `max_tokens`: each stream starts on one credit chunk and asks for the next as its text
    // grows. Each answer is 40 tokens (40 pieces of 4 bytes): 200 of them would need 8,400.
    let answer = "abcd".repeat(40);
    let budget = 50 * (PROMPT_TOKENS + CHUNK);
    let edge = Arc::new(TestEdge::start(config(&mocks, tokens_per_day(budget), TenantBudgets::default(), None)).await);
    for _ in 0..200 {
        mocks.openai.push(say(40, "abcd", Duration::from_millis(2)));
    }
    let replies =
        all_at_once(&edge, 200, |edge| async move { edge.post(OPENAI, ACME_KEY, &chat("gpt-test", true, None)).await })
            .await;

    let mut cut = 0;
    let mut received = 0;
    for r in &replies {
        if r.status == 429 {
            budget_refusal(r);
            continue;
        }
        match openai_stream(r) {
            Ending::Clean(text) => {
                assert_eq!(text, answer, "a stream that ends cleanly has its whole answer");
                received += PROMPT_TOKENS + 40;
            }
            Ending::Error(code, text) => {
                assert_eq!(code, "budget_exhausted");
                assert!(answer.starts_with(&text), "what was sent is the answer's beginning: {text}");
                received += PROMPT_TOKENS + text.len().div_ceil(4) as u64;
                cut += 1;
            }
        }
    }
    let refused = replies.iter().filter(|r| r.status == 429).count();
    assert!(cut + refused > 0, "8,400 tokens cannot all fit in {budget}");
    let spent = spent(&edge, "acme").await;
    assert!(spent <= budget + CHUNK, "the edge counted {spent} against a budget of {budget}");
    assert!(received <= budget + CHUNK, "the clients received {received} against a budget of {budget}");
}

#[tokio::test]
async fn a_stream_whose_credit_line_runs_out_ends_with_budget_exhausted_in_the_openai_shape() {
    let mocks = Mocks::start().await;
    // 40 tokens of answer. acme's budget covers them (its hold grows by two chunks on the way);
    // globex's covers 32 of them and not one chunk more.
    let answer = "abcd".repeat(40);
    let acme = tokens_per_day(PROMPT_TOKENS + 3 * CHUNK);
    let globex = tokens_per_day(PROMPT_TOKENS + 2 * CHUNK);
    let edge = TestEdge::start(config(&mocks, acme, globex, None)).await;

    mocks.openai.push(say(40, "abcd", Duration::from_millis(5)));
    let r = edge.post(OPENAI, ACME_KEY, &chat("gpt-test", true, None)).await;
    assert_eq!(openai_stream(&r), Ending::Clean(answer.clone()), "extended chunk by chunk to its end");

    mocks.openai.push(say(40, "abcd", Duration::from_millis(5)));
    let r = edge.post(OPENAI, GLOBEX_KEY, &chat("gpt-test", true, None)).await;
    let Ending::Error(code, text) = openai_stream(&r) else { panic!("a clean end past the budget: {}", r.text()) };
    assert_eq!(code, "budget_exhausted", "{}", r.text());
    assert!(answer.starts_with(&text) && text.len() <= 4 * 2 * CHUNK as usize, "sent within the budget: {text}");
    let m = edge.metrics().await;
    assert_eq!(metric(&m, "meridian_requests_total", &["tenant=\"globex\"", "status=\"budget_exhausted\""]), 1.0);
    assert!(spent(&edge, "globex").await <= PROMPT_TOKENS + 2 * CHUNK);
}

#[tokio::test]
async fn a_stream_whose_credit_line_runs_out_ends_with_budget_exhausted_in_the_anthropic_shape() {
    let mocks = Mocks::start().await;
    // An Anthropic client always sends `max_tokens`: 8 here, and the hold reserves 8. The mock's
    // 8 pieces are 40 bytes each, so the text outgrows the hold (the edge counts 10 tokens a
    // piece until the usage comes): one chunk more is in the budget, and no more.
    let edge =
        TestEdge::start(config(&mocks, tokens_per_day(PROMPT_TOKENS + 8 + CHUNK), TenantBudgets::default(), None))
            .await;
    let piece = "abcdefghij".repeat(4);
    mocks.anthropic.push(say(8, &piece, Duration::from_millis(5)));
    let r = post_anthropic(&edge, ACME_KEY, &message(true, 8)).await;

    assert_eq!((r.status, r.header("content-type")), (200, Some("text/event-stream")), "{}", r.text());
    let events = r.events();
    let last = events.last().expect("events");
    assert_eq!(last.event.as_deref(), Some("error"), "{}", r.text());
    let error: Value = serde_json::from_str(&last.data).expect("JSON");
    assert_eq!(error["error"]["type"], "rate_limit_error", "{error}");
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("budget exhausted") && message.contains("tokens_per_day"), "{message}");
    assert!(!events.iter().any(|e| e.event.as_deref() == Some("message_stop")), "never a clean end");
    let text: String = events
        .iter()
        .filter(|e| e.event.as_deref() == Some("content_block_delta"))
        .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok()?["delta"]["text"].as_str().map(str::to_string))
        .collect();
    assert!(piece.repeat(8).starts_with(&text), "the answer's beginning: {text}");
    assert!(text.len() <= 4 * (8 + CHUNK) as usize, "sent within the budget: {} bytes", text.len());
}

#[tokio::test]
async fn a_request_over_budget_is_refused_before_it_starts_with_retry_after_at_the_reset() {
    let mocks = Mocks::start().await;
    // $0.001 a day. 2 prompt tokens and 100 output tokens cost $0.000202 at oa ($1/$2 per
    // million) and $0.001506 at an ($3/$15): a model that may fall back to an is priced there.
    let budgets = TenantBudgets { usd_per_day: Some(0.001), ..TenantBudgets::default() };
    let edge = TestEdge::start(config(&mocks, budgets, TenantBudgets::default(), None)).await;

    let before = unix_secs();
    let r = edge.post(OPENAI, ACME_KEY, &chat("fallback", false, Some(100))).await;
    let after = unix_secs();
    let retry_after = budget_refusal(&r);
    assert!(r.text().contains("usd_per_day"), "{}", r.text());
    let to_midnight = |t: u64| 86_400 - t % 86_400;
    assert!(
        (to_midnight(after)..=to_midnight(before) + 1).contains(&retry_after),
        "retry-after {retry_after} is the time to the next UTC midnight"
    );
    let r = post_anthropic(&edge, ACME_KEY, &message(false, 100)).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "rate_limit_error", "{}", r.text());
    assert!(r.header("retry-after").is_some_and(|v| v.parse::<u64>().is_ok()), "{:?}", r.headers);
    assert_eq!(mocks.request_counts(), [0, 0, 0], "nothing was sent");

    // The same request to a model served by oa alone fits.
    let r = edge.post(OPENAI, ACME_KEY, &chat("gpt-test", false, Some(100))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mocks.request_counts(), [1, 0, 0]);
}

#[tokio::test]
async fn requests_and_tokens_per_minute_hold() {
    let mocks = Mocks::start().await;
    // RPM: 3 requests a minute; the fourth is refused until the minute ends.
    let rpm = &TenantBudgets { requests_per_minute: Some(3), ..TenantBudgets::default() };
    let m = &mocks;
    let statuses = within_one_minute(move || async move {
        let mocks = m;
        let edge = TestEdge::start(config(mocks, rpm.clone(), TenantBudgets::default(), None)).await;
        let mut replies = Vec::new();
        for _ in 0..4 {
            replies.push(edge.post(OPENAI, ACME_KEY, &chat("gpt-test", false, Some(8))).await);
        }
        replies
    })
    .await;
    assert_eq!(statuses.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200, 200, 429]);
    assert!(budget_refusal(&statuses[3]) <= 60, "at the minute's end");
    assert!(statuses[3].text().contains("requests_per_minute"), "{}", statuses[3].text());

    // TPM: 25 tokens a minute. Each request holds and spends 10 (its prompt and 8 pieces of 4
    // bytes): two fit, the third does not.
    let tpm = &TenantBudgets { tokens_per_minute: Some(25), ..TenantBudgets::default() };
    let statuses = within_one_minute(move || async move {
        let mocks = m;
        let edge = TestEdge::start(config(mocks, tpm.clone(), TenantBudgets::default(), None)).await;
        let mut replies = Vec::new();
        for _ in 0..3 {
            mocks.openai.push(say(8, "abcd", Duration::ZERO));
            replies.push(edge.post(OPENAI, ACME_KEY, &chat("gpt-test", true, Some(8))).await);
        }
        mocks.openai.clear();
        replies
    })
    .await;
    assert_eq!(statuses.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200, 429]);
    assert!(budget_refusal(&statuses[2]) <= 60, "at the minute's end");
    assert!(statuses[2].text().contains("tokens_per_minute"), "{}", statuses[2].text());
}

#[tokio::test]
async fn two_edges_sharing_redis_enforce_one_budget() {
    let redis = Redis::start().await;
    let mocks = Mocks::start().await;
    // Room for four requests in all (each holds and spends 10 tokens). Each edge alone would
    // admit four; together they admit four.
    let config = || config(&mocks, tokens_per_day(4 * (PROMPT_TOKENS + 8)), TenantBudgets::default(), Some(&redis));
    let (a, b) = (TestEdge::start(config()).await, TestEdge::start(config()).await);
    let mut statuses = Vec::new();
    for edge in [&a, &b, &a, &b, &a, &b] {
        mocks.openai.push(say(8, "abcd", Duration::ZERO));
        let r = edge.post(OPENAI, ACME_KEY, &chat("gpt-test", true, Some(8))).await;
        if r.status == 429 {
            budget_refusal(&r);
        }
        statuses.push(r.status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429], "two requests on each edge spent the one budget");
    assert_eq!(spent(&a, "acme").await + spent(&b, "acme").await, 4 * (PROMPT_TOKENS + 8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_edges_sharing_redis_hold_a_tenant_at_its_rpm_under_load() {
    const RPM: usize = 40;
    let (redis, mocks) = (Redis::start().await, Mocks::start().await);
    let (redis, m) = (&redis, &mocks);
    let rpm = TenantBudgets { requests_per_minute: Some(RPM as u64), ..TenantBudgets::default() };
    let rpm = &rpm;
    // 100 requests at once, split across two edges: the region admits 40 in the minute, not 80.
    let statuses = within_one_minute(move || async move {
        // Fresh counters for each run: its own key prefix.
        let prefix = format!("rpm-{}", SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos());
        let config = || {
            let mut c = config(m, rpm.clone(), TenantBudgets::default(), Some(redis));
            c.budgets.key_prefix = prefix.clone();
            c
        };
        let edges = [Arc::new(TestEdge::start(config()).await), Arc::new(TestEdge::start(config()).await)];
        let mut set = JoinSet::new();
        for i in 0..100 {
            let edge = Arc::clone(&edges[i % 2]);
            set.spawn(async move { edge.post(OPENAI, ACME_KEY, &chat("gpt-test", false, Some(8))).await.status });
        }
        set.join_all().await
    })
    .await;
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(admitted, RPM, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 100 - RPM, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_redis_an_edge_holds_rates_on_its_own_counters_and_refuses_budgets() {
    let mocks = Mocks::start().await;
    let m = &mocks;
    // acme has a rate (3 requests a minute), globex a budget (tokens a day).
    let rpm = &TenantBudgets { requests_per_minute: Some(3), ..TenantBudgets::default() };
    let (statuses, edge) = within_one_minute(move || async move {
        let redis = Redis::start().await;
        let edge = TestEdge::start(config(m, rpm.clone(), tokens_per_day(10_000), Some(&redis))).await;
        let mut statuses = Vec::new();
        for key in [ACME_KEY, GLOBEX_KEY] {
            statuses.push(edge.post(OPENAI, key, &chat("gpt-test", false, Some(8))).await.status);
        }
        // Redis dies: acme's rate goes on, on this edge's own counters (fresh: three more fit);
        // globex's budget cannot be kept, and its requests are refused rather than run unaccounted.
        drop(redis);
        for _ in 0..4 {
            statuses.push(edge.post(OPENAI, ACME_KEY, &chat("gpt-test", false, Some(8))).await.status);
        }
        let refused = edge.post(OPENAI, GLOBEX_KEY, &chat("gpt-test", false, Some(8))).await;
        assert_eq!(refused.error_code(), "budget_unavailable", "{}", refused.text());
        statuses.push(refused.status);
        (statuses, edge)
    })
    .await;
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 503]);
    let ready = edge.send("GET", "/readyz", None, &[], Default::default()).await;
    assert_eq!(ready.status, 200, "still ready: {}", ready.text());
    assert_eq!(ready.json()["shared_state"]["budgets"], "down");
    assert_eq!(metric(&edge.metrics().await, "meridian_shared_state_up", &["store=\"budgets\""]), 0.0);
}

#[tokio::test]
async fn budgets_in_a_redis_that_does_not_answer_refuse_rather_than_run_unaccounted() {
    let mocks = Mocks::start().await;
    // A port nothing listens on: take one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let mut config = config(&mocks, tokens_per_day(1_000), TenantBudgets::default(), None);
    config.budgets.redis_url = Some(format!("redis://127.0.0.1:{port}/"));
    let edge = TestEdge::start(config).await;
    let r = edge.post(OPENAI, ACME_KEY, &chat("gpt-test", false, Some(8))).await;
    assert_eq!((r.status, r.error_code()), (503, "budget_unavailable".to_string()), "{}", r.text());
    assert_eq!(mocks.request_counts(), [0, 0, 0]);
    // A tenant with no budget does not need the counters.
    let r = edge.post(OPENAI, GLOBEX_KEY, &chat("gpt-test", false, Some(8))).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Budgets of tenant `acme` (`tokens_per_day = 100`) with counters in `redis` under `prefix`.
fn shared_budgets(redis: &Redis, prefix: &str) -> Budgets {
    let text = format!(
        "{}[tenants.budgets]\ntokens_per_day = 100\n[budgets]\nredis_url = {:?}\nkey_prefix = {prefix:?}\n",
        tenant_toml("acme", ACME_KEY),
        redis.url()
    );
    Budgets::new(&Config::parse(&text).expect("valid config")).expect("budgets")
}

/// Reserves `tokens` for `acme`: `Some(hold)`, or `None` when the budget is spent.
async fn try_reserve(budgets: &Budgets, tokens: u64) -> Option<Hold> {
    match budgets.reserve("acme", Ask { tokens, usd: 0.0 }).await {
        Ok(hold) => Some(hold.expect("acme has limits")),
        Err(Refused::Exhausted(e)) => {
            assert_eq!(e.which, "tokens_per_day");
            None
        }
        Err(e) => panic!("the counters answer: {e:?}"),
    }
}

/// Reserves `tokens` once a settlement written in the background has made room, polling.
async fn reserve_when_room(budgets: &Budgets, tokens: u64) -> Hold {
    for _ in 0..400 {
        if let Some(hold) = try_reserve(budgets, tokens).await {
            return hold;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no room for {tokens} tokens within 10 s");
}

#[tokio::test]
async fn redis_counters_reserve_extend_settle_and_seed_across_edges() {
    let redis = Redis::start().await;
    let (a, b) = (shared_budgets(&redis, "t1"), shared_budgets(&redis, "t1"));

    // What one edge holds, the other sees.
    let held = try_reserve(&a, 60).await.expect("60 of 100");
    assert!(try_reserve(&b, 50).await.is_none(), "60 + 50 > 100 across edges");
    // Settling releases what was not spent: 40 of the 60.
    held.settle(20, 0.0);
    let mut line = reserve_when_room(&b, 70).await.with_credit(Ask { tokens: 5, usd: 0.0 });
    assert!(try_reserve(&a, 11).await.is_none(), "20 + 70 + 11 > 100");
    // A credit line extends in Redis too, and stops at the budget.
    line.cover(80).await.expect("two chunks of 5 fit: 100 in all");
    assert!(matches!(line.cover(81).await, Err(Refused::Exhausted(_))), "past the budget");
    assert_eq!(line.reserved().tokens, 80);
    // An overrun counts: the stream spent 85 of its 80.
    line.settle(85, 0.0);
    // 20 + 85 = 105: nothing fits until the day is over, whatever the settlement's timing.
    assert!(try_reserve(&b, 1).await.is_none());

    // Seeding fills counters Redis lacks (a fresh prefix here), and leaves those it has.
    let c = shared_budgets(&redis, "t2");
    let spent = |tokens| vec![Totals { tenant: "acme".into(), usd: 0.0, tokens, requests: 0 }];
    c.seed(&spent(90), &[]).await.expect("seeded");
    c.seed(&spent(0), &[]).await.expect("seeded again");
    assert!(try_reserve(&c, 11).await.is_none(), "90 seeded, kept over a second seed");
    assert!(try_reserve(&c, 10).await.is_some());
}

#[tokio::test]
async fn a_restart_keeps_the_spent_amount() {
    let mocks = Mocks::start().await;
    let ledger = meridian_e2e::TempDir::new("budget-restart");
    let restarted = || {
        let mut config = config(&mocks, tokens_per_day(30), TenantBudgets::default(), None);
        config.ledger.enabled = true;
        config.ledger.dir = ledger.path().to_path_buf();
        config
    };
    let edge = TestEdge::start(restarted()).await;
    for _ in 0..2 {
        assert_eq!(one(&mocks, &edge).await.status, 200);
    }
    assert_eq!(spent(&edge, "acme").await, 20);
    edge.edge.close().await;
    drop(edge);

    // A new edge on the same ledger starts with the 20 spent: one more request fits, not two.
    let edge = TestEdge::start(restarted()).await;
    assert_eq!(one(&mocks, &edge).await.status, 200);
    let refused = one(&mocks, &edge).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.error_code(), "budget_exhausted");
}

/// A request that holds and spends exactly 10 tokens: its 2-token prompt and 8 pieces.
async fn one(mocks: &Mocks, edge: &TestEdge) -> Reply {
    mocks.openai.push(say(8, "abcd", Duration::ZERO));
    edge.post(OPENAI, ACME_KEY, &chat("gpt-test", false, Some(8))).await
}

#[tokio::test]
async fn a_relayed_request_is_held_against_the_budget_of_the_edge_that_serves_it() {
    // Only the serving region has a budget for acme: 20 tokens a day, two requests' worth.
    let budget = |eu: &mut Config| eu.tenant_mut("acme").budgets = tokens_per_day(20);
    let p = crate::relay::pair(|_| {}, budget).await;
    for _ in 0..2 {
        let r = one(&p.mocks, &p.us).await;
        assert_eq!((r.status, r.header("x-meridian-target")), (200, Some("edge-eu")), "{}", r.text());
    }
    let refused = one(&p.mocks, &p.us).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert!(refused.text().contains("tokens_per_day"), "the refusal names the limit: {}", refused.text());
    assert_eq!(p.mocks.openai.request_count(), 2, "nothing past the budget reached the upstream");
}
