//! The Redis store: counters shared by every edge of a region that points at the same server.
//! Each operation is one Lua script, which Redis runs atomically, so that a batch of charges is
//! all or nothing across edges as it is under the in-process store's lock ([`super::local`]).
//! Every key expires at its window's end (plus a minute), so Redis keeps only live counters.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::limits::{Charge, Counter};

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
/// pipelined on it).
pub struct Shared {
    connection: ConnectionManager,
    charge: Script,
    adjust: Script,
    seed: Script,
}

impl Shared {
    /// A store at `url`. Nothing is sent until the first operation, so an edge starts while its
    /// Redis is away (and refuses requests of tenants with budgets until it is back).
    pub fn new(url: &str, timeout: Duration) -> Result<Shared, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // A request waits for one command, not for a reconnection schedule.
            .set_number_of_retries(1);
        let connection = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| e.to_string())?;
        Ok(Shared { connection, charge: Script::new(CHARGE), adjust: Script::new(ADJUST), seed: Script::new(SEED) })
    }

    /// Adds every charge, or none: `Ok(Err(i))` when charge `i` is the first that does not fit.
    pub async fn charge(&self, charges: &[Charge]) -> Result<Result<(), usize>, String> {
        let mut call = self.charge.prepare_invoke();
        for c in charges {
            call.key(&c.counter.key).arg(c.max).arg(c.amount).arg(c.counter.expires_at);
        }
        let refused: usize = call.invoke_async(&mut self.connection.clone()).await.map_err(|e| e.to_string())?;
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
        call.invoke_async::<i64>(&mut self.connection.clone()).await.map(drop).map_err(|e| e.to_string())
    }

    /// Sets each counter that does not exist yet (see [`SEED`]).
    pub async fn seed(&self, values: &[(Counter, i64)]) -> Result<(), String> {
        let mut call = self.seed.prepare_invoke();
        for (counter, value) in values {
            call.key(&counter.key).arg(value).arg(counter.expires_at);
        }
        call.invoke_async::<i64>(&mut self.connection.clone()).await.map(drop).map_err(|e| e.to_string())
    }
}
