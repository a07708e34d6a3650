//! The budgets over the in-process store (the Redis store runs the same charges through its
//! scripts: `tests/tests/all/budgets.rs` drives it against a real server).

use super::*;

const KEY: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const OTHER: &str = "sha256:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

/// Tenant `acme` with `limits` (TOML lines of `[tenants.budgets]`), and `free` with none.
fn budgets(limits: &str) -> Budgets {
    let config = Config::parse(&format!(
        "[[tenants]]\nname = \"acme\"\nkeys = [\"{KEY}\"]\n[tenants.budgets]\n{limits}\n\
         [[tenants]]\nname = \"free\"\nkeys = [\"{OTHER}\"]\n"
    ))
    .unwrap();
    // One instant for the whole test: no window ends under it.
    Budgets { clock: || Duration::from_secs(1_700_000_030), ..Budgets::new(&config).unwrap() }
}

fn tokens(n: u64) -> Ask {
    Ask { tokens: n, usd: 0.0 }
}

async fn exhausted(b: &Budgets, ask: Ask) -> Exhausted {
    match b.reserve("acme", ask).await {
        Err(Refused::Exhausted(e)) => e,
        Err(e) => panic!("refused for another reason: {e:?}"),
        Ok(_) => panic!("{ask:?} was admitted"),
    }
}

#[tokio::test]
async fn a_tenant_without_limits_holds_nothing() {
    let b = budgets("tokens_per_day = 1");
    assert!(b.reserve("free", tokens(1_000_000)).await.unwrap().is_none());
    assert!(b.reserve("nobody", tokens(1_000_000)).await.unwrap().is_none());
}

#[tokio::test]
async fn a_reservation_is_all_or_nothing_across_limits() {
    let b = budgets("tokens_per_day = 100\nusd_per_month = 1.0");
    let first = b.reserve("acme", Ask { tokens: 60, usd: 0.5 }).await.unwrap().unwrap();
    assert_eq!(first.reserved(), Ask { tokens: 60, usd: 0.5 });
    let e = exhausted(&b, Ask { tokens: 10, usd: 0.6 }).await;
    assert_eq!(e.which, "usd_per_month");
    assert!(e.retry_after > Duration::ZERO && e.retry_after <= Duration::from_secs(31 * 86_400), "{e:?}");
    // The refused request's tokens were not kept: 40 more still fit, and not one past them.
    let second = b.reserve("acme", Ask { tokens: 40, usd: 0.5 }).await.unwrap().unwrap();
    let e = exhausted(&b, tokens(1)).await;
    assert_eq!(e.which, "tokens_per_day");
    assert!(e.retry_after <= Duration::from_secs(86_400), "{e:?}");
    drop((first, second));
}

#[tokio::test]
async fn requests_per_minute_count_requests_and_retry_at_the_minute() {
    let b = budgets("requests_per_minute = 2");
    for _ in 0..2 {
        b.reserve("acme", tokens(0)).await.unwrap().unwrap().settle(0, 0.0);
    }
    let e = exhausted(&b, tokens(0)).await;
    assert_eq!(e.which, "requests_per_minute");
    assert!(e.retry_after <= Duration::from_secs(60), "{e:?}");
}

#[tokio::test]
async fn settling_replaces_the_reservation_with_the_spend() {
    let b = budgets("tokens_per_minute = 100\nusd_per_day = 1.0");
    b.reserve("acme", Ask { tokens: 90, usd: 0.9 }).await.unwrap().unwrap().settle(30, 0.25);
    // 30 tokens and $0.25 are spent: 70 tokens and $0.75 are left, exactly.
    let hold = b.reserve("acme", Ask { tokens: 70, usd: 0.75 }).await.unwrap().unwrap();
    assert_eq!(exhausted(&b, Ask { tokens: 0, usd: 0.000_001 }).await.which, "usd_per_day");
    // An overrun counts too: the hold reserved 70 tokens, the request spent 80.
    hold.settle(80, 0.75);
    assert_eq!(exhausted(&b, tokens(1)).await.which, "tokens_per_minute");
}

#[tokio::test]
async fn a_dropped_hold_keeps_its_worst_case() {
    let b = budgets("tokens_per_day = 100");
    drop(b.reserve("acme", tokens(100)).await.unwrap());
    assert_eq!(exhausted(&b, tokens(1)).await.which, "tokens_per_day");
}

#[tokio::test]
async fn a_credit_line_extends_in_whole_chunks_until_the_budget_is_spent() {
    let b = budgets("tokens_per_day = 100");
    let mut hold = b.reserve("acme", tokens(30)).await.unwrap().unwrap().with_credit(Ask { tokens: 20, usd: 0.0 });
    hold.cover(30).await.unwrap();
    assert_eq!(hold.reserved().tokens, 30, "covered already: nothing asked");
    hold.cover(51).await.unwrap();
    assert_eq!(hold.reserved().tokens, 70, "two chunks cover 21 more");
    hold.cover(90).await.unwrap();
    let refused = hold.cover(91).await.unwrap_err();
    assert!(matches!(refused, Refused::Exhausted(Exhausted { which: "tokens_per_day", .. })), "{refused:?}");
    assert_eq!(hold.reserved().tokens, 90, "a refused extension holds nothing more");
    hold.settle(45, 0.0);
    b.reserve("acme", tokens(55)).await.unwrap().unwrap();
}

#[tokio::test]
async fn seeding_restores_the_day_and_month_spent() {
    let b = budgets("tokens_per_day = 100\nusd_per_month = 10.0\ntokens_per_minute = 50");
    let spent = |tokens, usd| {
        vec![
            Totals { tenant: "acme".into(), usd, tokens, requests: 0 },
            Totals { tenant: "free".into(), usd, tokens, requests: 0 },
        ]
    };
    // 2023-11-14T22:13:50Z: the day began at 00:00, the month on the 1st.
    assert_eq!(b.seed_from(), (1_699_920_000_000, 1_698_796_800_000));
    b.seed(&spent(95, 1.0), &spent(500, 9.5)).await.unwrap();
    assert_eq!(exhausted(&b, tokens(6)).await.which, "tokens_per_day");
    assert_eq!(exhausted(&b, Ask { tokens: 1, usd: 0.6 }).await.which, "usd_per_month");
    // Minutes are not seeded, and what is left is left.
    b.reserve("acme", Ask { tokens: 5, usd: 0.5 }).await.unwrap().unwrap();
}

#[test]
fn budget_config_is_checked_key_by_key() {
    let tenant = format!("[[tenants]]\nname = \"acme\"\nkeys = [\"{KEY}\"]\n[tenants.budgets]\n");
    for (text, key) in [
        (format!("{tenant}usd_per_day = -1.0"), "tenants[0].budgets.usd_per_day"),
        (format!("{tenant}usd_per_month = nan"), "tenants[0].budgets.usd_per_month"),
        ("[budgets]\ncredit_chunk_tokens = 0".into(), "budgets.credit_chunk_tokens"),
        ("[budgets]\nredis_timeout_ms = 0".into(), "budgets.redis_timeout_ms"),
        ("[budgets]\nkey_prefix = \"\"".into(), "budgets.key_prefix"),
        ("[budgets]\nredis_url = \"http://127.0.0.1:6379\"".into(), "budgets.redis_url"),
        ("[budgets]\nredis_url = \"${MERIDIAN_TEST_UNSET_REDIS}\"".into(), "budgets.redis_url"),
    ] {
        match Config::parse(&text) {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
    let unknown = Config::parse(&format!("{tenant}usd_per_week = 1.0")).unwrap_err();
    assert!(unknown.to_string().contains("usd_per_week"), "{unknown}");
    let ok = Config::parse(&format!("{tenant}tokens_per_minute = 10\n[budgets]\nredis_url = \"redis://127.0.0.1/\""));
    assert_eq!(ok.unwrap().budgets.redis_url.as_deref(), Some("redis://127.0.0.1/"));
}
