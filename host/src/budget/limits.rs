//! A tenant's limits and what one reservation charges against them. This is the one piece of
//! period and limit logic: it names each counter (by tenant, limit and period) and says how much
//! a request adds to it and when it expires; the stores ([`super::store`]) only apply a batch of
//! charges atomically.

use super::period::{Period, Window};
use crate::config::TenantBudgets;

/// Nano-USD in one USD: spend is counted in whole nano-dollars, so that every store adds
/// integers exactly (a float counter drifts, and Redis' `INCRBYFLOAT` rounds differently).
const NANOS_PER_USD: f64 = 1e9;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meter {
    /// Spend, in nano-USD.
    Usd,
    /// Tokens, prompt and output.
    Tokens,
    /// Requests.
    Requests,
}

/// One limit of a tenant: at most `max` of `meter` per `period`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// What it counts.
    pub meter: Meter,
    /// Over what.
    pub period: Period,
    /// The most, in the meter's unit.
    pub max: i64,
    /// Its config key (`usd_per_day`), for refusals.
    pub name: &'static str,
}

/// Amounts in each meter's unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts {
    /// Nano-USD.
    pub usd: i64,
    /// Tokens.
    pub tokens: i64,
    /// Requests.
    pub requests: i64,
}

impl Amounts {
    /// `usd` dollars and `tokens` tokens, with `requests` requests. Dollars round up to the
    /// next nano-dollar, so that a reservation never falls short of its price.
    pub fn new(usd: f64, tokens: u64, requests: i64) -> Amounts {
        Amounts { usd: nano_usd(usd), tokens: i64::try_from(tokens).unwrap_or(i64::MAX), requests }
    }

    /// The amount in `meter`'s unit.
    pub fn of(&self, meter: Meter) -> i64 {
        match meter {
            Meter::Usd => self.usd,
            Meter::Tokens => self.tokens,
            Meter::Requests => self.requests,
        }
    }
}

/// Nano-dollars of `usd`, rounded up; a price that is not a finite positive number is 0.
fn nano_usd(usd: f64) -> i64 {
    if usd.is_finite() && usd > 0.0 {
        // `as` saturates at i64::MAX for absurd prices.
        (usd * NANOS_PER_USD).ceil() as i64
    } else {
        0
    }
}

/// A tenant's limits from its `[tenants.budgets]`; empty when it has none.
pub fn limits(b: &TenantBudgets) -> Vec<Limit> {
    let count = |v: Option<u64>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    [
        (Meter::Usd, Period::Day, b.usd_per_day.map(nano_usd), "usd_per_day"),
        (Meter::Usd, Period::Month, b.usd_per_month.map(nano_usd), "usd_per_month"),
        (Meter::Tokens, Period::Day, count(b.tokens_per_day), "tokens_per_day"),
        (Meter::Tokens, Period::Month, count(b.tokens_per_month), "tokens_per_month"),
        (Meter::Tokens, Period::Minute, count(b.tokens_per_minute), "tokens_per_minute"),
        (Meter::Requests, Period::Minute, count(b.requests_per_minute), "requests_per_minute"),
    ]
    .into_iter()
    .filter_map(|(meter, period, max, name)| max.map(|max| Limit { meter, period, max, name }))
    .collect()
}

/// How far behind another edge's clock may run and still find a counter it shares.
const CLOCK_SKEW_SECS: i64 = 60;

/// One counter: a limit of a tenant in one window.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Counter {
    /// Its key, in Redis and in the in-process store alike:
    /// `PREFIX:{TENANT}:LIMIT:WINDOW_START`. The braces are a Redis Cluster hash tag, so that
    /// every counter of a tenant is in one slot and one script may touch them all.
    pub key: String,
    /// Unix second after which it is dropped: its window's end, plus a minute for edges whose
    /// clocks run behind. A settlement that comes later changes nothing that is still read.
    pub expires_at: i64,
}

impl Counter {
    /// The counter of `limit` of `tenant` for `window`.
    pub fn new(prefix: &str, tenant: &str, limit: &Limit, window: Window) -> Counter {
        Counter {
            key: format!("{prefix}:{{{tenant}}}:{}:{}", limit.name, window.start),
            expires_at: window.end + CLOCK_SKEW_SECS,
        }
    }
}

/// One amount added to one counter, refused if it would take the counter past `max`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The counter.
    pub counter: Counter,
    /// What it may reach.
    pub max: i64,
    /// What is added.
    pub amount: i64,
}

/// Whether `amount` more fits under `max` on a counter at `current`. A zero amount always fits,
/// even on a spent counter: a request that costs nothing in a meter is not refused for it.
pub fn fits(current: i64, amount: i64, max: i64) -> bool {
    amount <= 0 || current.saturating_add(amount) <= max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_has_the_limits_it_configured() {
        let b = TenantBudgets { usd_per_day: Some(1.5), requests_per_minute: Some(10), ..TenantBudgets::default() };
        let l = limits(&b);
        assert_eq!(l.len(), 2);
        assert_eq!(
            (l[0].name, l[0].meter, l[0].period, l[0].max),
            ("usd_per_day", Meter::Usd, Period::Day, 1_500_000_000)
        );
        assert_eq!((l[1].name, l[1].meter, l[1].max), ("requests_per_minute", Meter::Requests, 10));
        assert!(limits(&TenantBudgets::default()).is_empty());
    }

    #[test]
    fn spend_rounds_up_to_a_nano_dollar() {
        assert_eq!(Amounts::new(0.000_000_000_1, 3, 1), Amounts { usd: 1, tokens: 3, requests: 1 });
        assert_eq!(Amounts::new(f64::NAN, 0, 0).usd, 0);
        assert_eq!(Amounts::new(-1.0, 0, 0).usd, 0);
        assert_eq!(Amounts::new(2.0, u64::MAX, 0), Amounts { usd: 2_000_000_000, tokens: i64::MAX, requests: 0 });
    }

    #[test]
    fn an_amount_fits_up_to_the_limit_and_zero_always_does() {
        assert!(fits(90, 10, 100));
        assert!(!fits(91, 10, 100));
        assert!(fits(150, 0, 100));
        assert!(!fits(i64::MAX, 1, 100));
    }

    #[test]
    fn counters_are_named_by_tenant_limit_and_window() {
        let limit = Limit { meter: Meter::Tokens, period: Period::Minute, max: 1, name: "tokens_per_minute" };
        let c = Counter::new("p", "acme", &limit, Window { start: 120, end: 180 });
        assert_eq!(c, Counter { key: "p:{acme}:tokens_per_minute:120".into(), expires_at: 240 });
    }
}
