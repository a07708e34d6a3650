//! The Redis store: counters shared by every edge of a region that points at the same server.
//! Each operation is one Lua script, which Redis runs atomically, so that a batch of charges is
//! all or nothing across edges as it is under the in-process store's lock ([`super::local`]).
//! Every key expires at its window's end (plus a minute), so Redis keeps only live counters.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;

use super::limits::{Charge, Counter};
use crate::redis_link::Link;

/// Checks every charge against its maximum, then adds them all and sets their expiry; returns 0,
/// or the 1-based index of the first charge that does not fit (nothing added). The check is
/// `limits::fits`: a zero amount always fits.
const CHARGE: &str = r"
for i = 1, #KEYS do
  local amount = tonumber(ARGV[3 * i - 1])
  if amount > 0 then
    local current = tonumber(redis.call('GET', KEYS[i]) or '0')
    if current + amount > tonumber(ARGV[3 * i - 2]) then return i end
  end
end
for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[3 * i - 1])
  redis.call('EXPIREAT', KEYS[i], ARGV[3 * i])
end
return 0
";

/// Adds each delta: a positive one to its counter, made (with its expiry) if it is gone; a
/// negative one only to a counter that still exists.
const ADJUST: &str = r"
for i = 1, #KEYS do
  local delta = tonumber(ARGV[2 * i - 1])
  if delta > 0 then
    redis.call('INCRBY', KEYS[i], delta)
    redis.call('EXPIREAT', KEYS[i], ARGV[2 * i])
  elseif redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBY', KEYS[i], delta)
  end
end
return 0
";

/// Sets each counter that does not exist yet to its value, expiring with its window.
const SEED: &str = r"
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[2 * i - 1], 'EXAT', ARGV[2 * i], 'NX')
end
return 0
";

/// Counters in Redis, over one reconnecting connection that every request shares (commands are
/// pipelined on it). While Redis does not answer, operations fail at once (and Redis is tried
/// again once a second: [`Link`]).
pub struct Shared {
    link: Arc<Link>,
    charge: Script,
    adjust: Script,
    seed: Script,
}

/// What an operation says while Redis is left alone after failing.
const DOWN: &str = "Redis did not answer (tried again every second)";

impl Shared {
    /// A store at `url`. Nothing is sent until the first operation, so an edge starts while its
    /// Redis is away (and refuses requests of tenants with budgets until it is back).
    pub fn new(url: &str, timeout: Duration) -> Result<Shared, String> {
        Ok(Shared {
            link: Arc::new(Link::new(url, timeout, "budgets")?),
            charge: Script::new(CHARGE),
            adjust: Script::new(ADJUST),
            seed: Script::new(SEED),
        })
        .inspect(|shared| shared.link.spawn_probe())
    }

    /// The link, for its health.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Runs `call` on Redis unless it is left alone after failing.
    async fn invoke<T: redis::FromRedisValue>(&self, call: redis::ScriptInvocation<'_>) -> Result<T, String> {
        if !self.link.usable() {
            return Err(DOWN.into());
        }
        self.link.answered(call.invoke_async(&mut self.link.connection()).await)
    }

    /// Adds every charge, or none: `Ok(Err(i))` when charge `i` is the first that does not fit.
    pub async fn charge(&self, charges: &[Charge]) -> Result<Result<(), usize>, String> {
        let mut call = self.charge.prepare_invoke();
        for c in charges {
            call.key(&c.counter.key).arg(c.max).arg(c.amount).arg(c.counter.expires_at);
        }
        let refused: usize = self.invoke(call).await?;
        Ok(match refused {
            0 => Ok(()),
            i => Err(i - 1),
        })
    }

    /// Adds each delta (see [`ADJUST`]).
    pub async fn adjust(&self, deltas: &[(Counter, i64)]) -> Result<(), String> {
        let mut call = self.adjust.prepare_invoke();
        for (counter, delta) in deltas {
            call.key(&counter.key).arg(delta).arg(counter.expires_at);
        }
        self.invoke::<i64>(call).await.map(drop)
    }

    /// Sets each counter that does not exist yet (see [`SEED`]).
    pub async fn seed(&self, values: &[(Counter, i64)]) -> Result<(), String> {
        let mut call = self.seed.prepare_invoke();
        for (counter, value) in values {
            call.key(&counter.key).arg(value).arg(counter.expires_at);
        }
        self.invoke::<i64>(call).await.map(drop)
    }
}
