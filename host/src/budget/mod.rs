//! Tenants' budgets and token limits: USD and tokens per UTC day and month, tokens (TPM) and
//! requests (RPM) per minute (`[tenants.budgets]`), right under concurrency and streaming.
//!
//! A request is admitted by a [`Hold`]: [`Budgets::reserve`] adds its worst case to every
//! counter of the tenant at once, or to none, so that concurrent requests can never together
//! pass a limit that each alone fits under. What a request may still spend is already counted
//! before it starts. When it ends, [`Hold::settle`] replaces the reservation with what it
//! actually spent. A stream with no output limit holds one credit chunk at a time and extends
//! its hold chunk by chunk as its text grows ([`Hold::cover`]); when the budget cannot extend
//! it, the stream ends with a typed error.
//!
//! A hold dropped without being settled keeps its whole reservation counted: a request that
//! ended in a way nobody accounted for may have cost anything up to its worst case, and the
//! budget errs on the side of the tenant's limit. (The request path settles every request it
//! finishes, answered, refused or abandoned: see `edge::record`.)
//!
//! The counters live in this process ([`local`]) or, for a region whose edges share one
//! budget, in Redis ([`shared`]), behind one piece of period and limit logic ([`limits`],
//! [`period`]). While Redis does not answer, rate limits (per minute) fall back to this edge's
//! own counters and budgets (per day, per month) refuse (see `Hold::charge`). Spend is counted
//! in the period a request was admitted in; extensions and
//! overruns in the period they happen in. In-process counters are rebuilt on start from the
//! ledger ([`Budgets::seed`]); Redis keeps its own.

mod limits;
mod local;
mod period;
mod shared;
mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{Config, ConfigError};
use crate::ledger::{self, Totals};
use limits::{Amounts, Charge, Counter, Limit, Meter};
use local::Local;
use period::Period;
use shared::Shared;
use store::Store;

/// What a request asks of its tenant's budgets.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Ask {
    /// Tokens, prompt and output.
    pub tokens: u64,
    /// USD.
    pub usd: f64,
}

/// Why a request may not spend (more).
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    /// A limit is spent.
    Exhausted(Exhausted),
    /// The shared counters did not answer.
    Unavailable(String),
}

/// A limit that cannot cover a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    /// The limit, by its config key (`tokens_per_day`).
    pub which: &'static str,
    /// Until its period resets.
    pub retry_after: Duration,
}

/// A tenant's limits, with what names their counters.
struct Account {
    tenant: String,
    prefix: String,
    limits: Vec<Limit>,
}

impl Account {
    /// The charges of `amounts` against the limits `which` selects, in their windows at `now`,
    /// with the index of each charge's limit. A zero amount charges nothing.
    fn charges(&self, amounts: Amounts, now: i64, which: impl Fn(&Limit) -> bool) -> (Vec<usize>, Vec<Charge>) {
        self.limits
            .iter()
            .enumerate()
            .filter(|(_, l)| which(l) && amounts.of(l.meter) > 0)
            .map(|(i, l)| (i, Charge { counter: self.counter(l, now), max: l.max, amount: amounts.of(l.meter) }))
            .unzip()
    }

    fn counter(&self, limit: &Limit, now: i64) -> Counter {
        Counter::new(&self.prefix, &self.tenant, limit, limit.period.window(now))
    }
}

/// Every tenant's budgets, and where their counters live.
pub struct Budgets {
    accounts: HashMap<String, Arc<Account>>,
    store: Arc<Store>,
    credit_chunk_tokens: u32,
    clock: Clock,
}

/// Time since the Unix epoch: the system's clock, or a test's.
type Clock = fn() -> Duration;

impl Budgets {
    /// The budgets of `config`'s tenants (only those with limits), with counters in Redis when
    /// `budgets.redis_url` is set, else in this process. Needs a Tokio runtime; connects to Redis
    /// on first use.
    pub fn new(config: &Config) -> Result<Budgets, ConfigError> {
        let settings = &config.budgets;
        let store = match settings.redis_url()? {
            Some(url) => Store::Shared(
                Shared::new(&url, Duration::from_millis(settings.redis_timeout_ms))
                    .map_err(|message| ConfigError::Invalid { key: "budgets.redis_url".into(), message })?,
                Local::default(),
            ),
            None => Store::Local(Local::default()),
        };
        let accounts = config
            .tenants
            .iter()
            .filter_map(|t| {
                let limits = limits::limits(&t.budgets);
                let account = Account { tenant: t.name.clone(), prefix: settings.key_prefix.clone(), limits };
                (!account.limits.is_empty()).then(|| (t.name.clone(), Arc::new(account)))
            })
            .collect();
        Ok(Budgets {
            accounts,
            store: Arc::new(store),
            credit_chunk_tokens: settings.credit_chunk_tokens,
            clock: unix_now,
        })
    }

    /// Whether the shared counters answer; `None` for counters in this process alone.
    pub fn shared_up(&self) -> Option<bool> {
        self.store.shared_up()
    }

    /// Output tokens a stream with no output limit holds at a time (`budgets.credit_chunk_tokens`).
    pub fn credit_chunk_tokens(&self) -> u32 {
        self.credit_chunk_tokens
    }

    /// Reserves `ask` (and one request) against every limit of `tenant`, all or none. `None`
    /// when the tenant has no limits: nothing to hold.
    pub async fn reserve(&self, tenant: &str, ask: Ask) -> Result<Option<Hold>, Refused> {
        let Some(account) = self.accounts.get(tenant) else { return Ok(None) };
        let mut hold = Hold {
            store: Arc::clone(&self.store),
            account: Arc::clone(account),
            held: Vec::new(),
            reserved: Ask::default(),
            credit: Ask::default(),
            clock: self.clock,
        };
        hold.charge(Amounts::new(ask.usd, ask.tokens, 1), ask, |_| true).await?;
        Ok(Some(hold))
    }

    /// Where [`Budgets::seed`]'s totals start, in Unix milliseconds: the current UTC day's first
    /// instant, and the current UTC month's.
    pub fn seed_from(&self) -> (i64, i64) {
        let now = (self.clock)().as_secs() as i64;
        (Period::Day.window(now).start * 1000, Period::Month.window(now).start * 1000)
    }

    /// Seeds the counters from what the ledger says each tenant spent this UTC day and month
    /// ([`Budgets::seed`]), so that a restart keeps the spent amount. Nothing to do when no tenant
    /// has budgets.
    pub async fn restore(&self, ledger: &ledger::Store) -> Result<(), String> {
        if self.accounts.is_empty() {
            return Ok(());
        }
        let (day, month) = self.seed_from();
        let day = ledger.totals_since(day).await.map_err(|e| e.to_string())?;
        let month = ledger.totals_since(month).await.map_err(|e| e.to_string())?;
        match self.seed(&day, &month).await {
            // Redis keeps its counters across restarts; seeding only fills those it lost, so an
            // edge that starts while Redis is away still serves (requests of tenants with budgets
            // get 503 `budget_unavailable` until Redis answers).
            Err(e) if matches!(*self.store, Store::Shared(..)) => {
                tracing::warn!(error = %e, "budgets: Redis did not take the ledger's totals; its own counters stand");
                Ok(())
            }
            result => result,
        }
    }

    /// Seeds the in-process counters with what each tenant spent since the start of the UTC day
    /// (`day`) and month (`month`), from the ledger, so that a restart keeps the spent amount.
    /// Call it before the edge serves. A counter that exists is left alone: with Redis, the
    /// counters survive the edge and only those Redis lost are seeded.
    pub async fn seed(&self, day: &[Totals], month: &[Totals]) -> Result<(), String> {
        let now = (self.clock)().as_secs() as i64;
        let mut values = Vec::new();
        for (period, spent) in [(Period::Day, day), (Period::Month, month)] {
            for s in spent {
                let Some(account) = self.accounts.get(&s.tenant) else { continue };
                let amounts = Amounts::new(s.usd, s.tokens, 0);
                for limit in account.limits.iter().filter(|l| l.period == period && l.meter != Meter::Requests) {
                    values.push((account.counter(limit, now), amounts.of(limit.meter)));
                }
            }
        }
        self.store.seed(&values, now).await
    }
}

/// A request's reservation against its tenant's limits, until it is settled.
pub struct Hold {
    store: Arc<Store>,
    account: Arc<Account>,
    /// What is held on each counter, oldest first.
    held: Vec<Held>,
    /// What is held in all.
    reserved: Ask,
    /// What one extension of a stream's credit line asks.
    credit: Ask,
    clock: Clock,
}

/// An amount held on one counter.
struct Held {
    limit: usize,
    counter: Counter,
    amount: i64,
    /// Held on this edge's own counters, Redis being away at the time.
    fallback: bool,
}

impl Hold {
    /// What the hold reserves in all.
    pub fn reserved(&self) -> Ask {
        self.reserved
    }

    /// Sets what one extension of the credit line asks ([`Hold::cover`]).
    pub fn with_credit(mut self, chunk: Ask) -> Hold {
        self.credit = chunk;
        self
    }

    /// Extends the hold by `chunk`, against the tenant's token and USD limits in their current
    /// periods, all or none.
    pub async fn extend(&mut self, chunk: Ask) -> Result<(), Refused> {
        self.charge(Amounts::new(chunk.usd, chunk.tokens, 0), chunk, |l| l.meter != Meter::Requests).await
    }

    /// Makes the hold cover `tokens` in all, extending it by as many credit chunks as that takes
    /// (in one extension). A hold that covers them already asks nothing.
    pub async fn cover(&mut self, tokens: u64) -> Result<(), Refused> {
        let Some(missing) = tokens.checked_sub(self.reserved.tokens).filter(|m| *m > 0) else { return Ok(()) };
        let step = self.credit.tokens.max(1);
        let chunks = missing.div_ceil(step);
        let chunk = Ask { tokens: chunks.saturating_mul(step), usd: self.credit.usd * chunks as f64 };
        self.extend(chunk).await
    }

    /// Replaces the reservation with what the request spent: `tokens` (prompt and output) and
    /// `usd`. Returns at once; with Redis, the write goes on in the background.
    pub fn settle(self, tokens: u64, usd: f64) {
        let now = (self.clock)().as_secs() as i64;
        let spent = Amounts::new(usd, tokens, 0);
        let (mut deltas, mut fallback) = (Vec::new(), Vec::new());
        for (index, limit) in self.account.limits.iter().enumerate() {
            if limit.meter == Meter::Requests {
                // A request counts once it is admitted, whatever it spent.
                continue;
            }
            let held: Vec<&Held> = self.held.iter().filter(|h| h.limit == index).collect();
            let mut delta = spent.of(limit.meter) - held.iter().map(|h| h.amount).sum::<i64>();
            if delta > 0 {
                // An overrun is spent now, in the current period.
                deltas.push((self.account.counter(limit, now), delta));
            }
            // What was held but not spent goes back, to the newest periods first (an older one
            // may be over already).
            for h in held.iter().rev() {
                if delta >= 0 {
                    break;
                }
                let release = h.amount.min(-delta);
                let to = if h.fallback { &mut fallback } else { &mut deltas };
                to.push((h.counter.clone(), -release));
                delta += release;
            }
        }
        self.store.adjust_fallback(&fallback, now);
        self.store.adjust(deltas, now);
    }

    /// Charges `amounts` against the limits `which` selects, all or none, and holds them. While
    /// the shared counters do not answer, a charge against rate limits alone (per minute: RPM,
    /// TPM) goes to this edge's own counters, so the region's edges keep serving, each holding the
    /// tenant to its rate on its own; a charge that touches a daily or monthly budget is refused
    /// (`Unavailable`): money is never spent unaccounted.
    async fn charge(&mut self, amounts: Amounts, ask: Ask, which: impl Fn(&Limit) -> bool) -> Result<(), Refused> {
        let now = (self.clock)();
        let secs = now.as_secs() as i64;
        let (limits, charges) = self.account.charges(amounts, secs, which);
        let rates_only = limits.iter().all(|&i| self.account.limits[i].period == Period::Minute);
        let (outcome, fallback) = match self.store.charge(&charges, secs).await {
            Ok(outcome) => (outcome, false),
            Err(e) => match self.store.charge_fallback(&charges, secs).filter(|_| rates_only) {
                Some(outcome) => {
                    tracing::debug!(tenant = %self.account.tenant, error = %e, "rate limits on this edge's own counters");
                    (outcome, true)
                }
                None => return Err(Refused::Unavailable(e)),
            },
        };
        match outcome {
            Ok(()) => {
                let held = limits.into_iter().zip(charges).map(|(limit, c)| Held {
                    limit,
                    counter: c.counter,
                    amount: c.amount,
                    fallback,
                });
                self.held.extend(held);
                self.reserved.tokens = self.reserved.tokens.saturating_add(ask.tokens);
                self.reserved.usd += ask.usd;
                Ok(())
            }
            Err(i) => {
                let limit = &self.account.limits[limits[i]];
                let end = limit.period.window(secs).end;
                let retry_after = Duration::from_secs(u64::try_from(end).unwrap_or(0)).saturating_sub(now);
                Err(Refused::Exhausted(Exhausted { which: limit.name, retry_after }))
            }
        }
    }
}

/// Time since the Unix epoch (zero for a clock set before it).
fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

#[cfg(test)]
mod tests;
