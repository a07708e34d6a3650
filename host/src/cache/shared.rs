//! The prompt cache's second level: answers in a Redis that a region's edges share
//! (`[cache] redis_url`), so that a prompt cached by one edge is a hit on its neighbours, and
//! identical misses on several edges make one upstream call.
//!
//! An entry is the answer's stream events as JSON under `PREFIX:answer:HEX(key)`, expiring with
//! the cache's TTL. The key is the local cache's (tenant and redacted request), and the answer is
//! the one the local level keeps (before the filters restore anything), so Redis, like the local
//! cache, only ever holds redacted requests and answers, per tenant.
//!
//! Coalescing across edges: the edge that misses first claims `PREFIX:filling:HEX(key)` (`SET NX`
//! with an expiry of `coalesce_wait_ms`) and fills the entry; another edge that misses meanwhile
//! polls for the entry until the claim is released or expires, then calls upstream itself. A
//! waiter never waits longer than the claim lives, and a claim is released when its request
//! fails, so a failed or slow leader costs its followers a bounded wait, never an answer.
//!
//! Redis is an optimisation here: when it does not answer within `redis_timeout_ms`, the edge
//! serves from its local level alone, reports the level down (`/readyz`, `meridian_shared_state_up`)
//! and tries Redis again after a second, one request at a time, so that a dead Redis does not add
//! its timeout to every request ([`Link`]). A `PING` every second keeps the report true while
//! every lookup is a local hit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{AsyncCommands, Script};

use super::{CacheKey, CachedAnswer};
use crate::chat::StreamEvent;
use crate::redis_link::Link;
/// How often a follower looks for the entry another edge is filling.
const POLL: Duration = Duration::from_millis(20);

/// Deletes a claim only if it is still the caller's (it may have expired and been taken since).
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// What claiming a miss found.
pub enum Claim {
    /// This edge fills the entry; the token releases the claim.
    Mine(String),
    /// Another edge is filling it: its answer, once there, or `None` when the claim ended
    /// without one (this edge then calls upstream itself).
    Filled(Option<CachedAnswer>),
    /// Redis did not answer: fill locally.
    Unavailable,
}

/// The shared level.
pub struct SharedCache {
    link: Arc<Link>,
    prefix: String,
    ttl: Duration,
    claim_for: Duration,
    release: Script,
    next_token: AtomicU64,
}

impl SharedCache {
    /// A level at `url` whose entries live `ttl` and whose claims last `claim_for`. Nothing is
    /// sent until the first lookup, so an edge starts while its Redis is away.
    pub fn new(url: &str, timeout: Duration, prefix: &str, ttl: Duration, claim_for: Duration) -> Result<Self, String> {
        Ok(SharedCache {
            link: Arc::new(Link::new(url, timeout, "prompt cache")?),
            prefix: prefix.to_string(),
            ttl,
            claim_for,
            release: Script::new(RELEASE),
            next_token: AtomicU64::new(0),
        })
        .inspect(|shared| shared.link.spawn_probe())
    }

    /// Whether Redis answered the last time it was asked.
    pub fn is_up(&self) -> bool {
        self.link.is_up()
    }

    fn key(&self, kind: &str, key: &CacheKey) -> String {
        format!("{}:{kind}:{}", self.prefix, hex::encode(key))
    }

    /// The entry of `key`, if Redis has one (and answers).
    pub async fn get(&self, key: &CacheKey) -> Option<CachedAnswer> {
        if !self.link.usable() {
            return None;
        }
        let got: Option<Vec<u8>> =
            self.link.answered(self.link.connection().get(self.key("answer", key)).await).ok()?;
        decode(&got?)
    }

    /// Claims the fill of `key`'s entry, or waits for the edge that holds the claim.
    pub async fn claim(&self, key: &CacheKey) -> Claim {
        if !self.link.usable() {
            return Claim::Unavailable;
        }
        let token = format!("{}-{}", std::process::id(), self.next_token.fetch_add(1, Ordering::Relaxed));
        let claim = self.key("filling", key);
        let ms = u64::try_from(self.claim_for.as_millis()).unwrap_or(u64::MAX);
        let set = redis::cmd("SET").arg(&claim).arg(&token).arg("NX").arg("PX").arg(ms).to_owned();
        let taken: Option<String> = match self.link.answered(set.query_async(&mut self.link.connection()).await) {
            Ok(reply) => reply,
            Err(_) => return Claim::Unavailable,
        };
        if taken.is_some() {
            return Claim::Mine(token);
        }
        // Another edge fills it: wait for its entry while its claim lives (at most `claim_for`).
        let deadline = Instant::now() + self.claim_for;
        while Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
            let both = redis::pipe().get(self.key("answer", key)).exists(&claim).to_owned();
            let (answer, claimed): (Option<Vec<u8>>, bool) =
                match self.link.answered(both.query_async(&mut self.link.connection()).await) {
                    Ok(reply) => reply,
                    Err(_) => return Claim::Unavailable,
                };
            if let Some(answer) = answer.as_deref().and_then(decode) {
                return Claim::Filled(Some(answer));
            }
            if !claimed {
                break;
            }
        }
        Claim::Filled(None)
    }

    /// Stores `answer` under `key` and releases the claim `token`, in the background: the
    /// client's answer does not wait for Redis.
    pub fn fill(self: &Arc<Self>, key: CacheKey, answer: &CachedAnswer, token: String) {
        let Ok(bytes) = serde_json::to_vec(&answer.to_events()) else { return };
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let ms = u64::try_from(shared.ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let set: redis::RedisResult<()> =
                shared.link.connection().pset_ex(shared.key("answer", &key), bytes, ms).await;
            if shared.link.answered(set).is_ok() {
                shared.release_now(&key, &token).await;
            }
        });
    }

    /// Releases the claim `token` without an entry (the request failed or was abandoned), in the
    /// background, so that waiting edges go upstream at once.
    pub fn release(self: &Arc<Self>, key: CacheKey, token: String) {
        let shared = Arc::clone(self);
        tokio::spawn(async move { shared.release_now(&key, &token).await });
    }

    async fn release_now(&self, key: &CacheKey, token: &str) {
        let mut call = self.release.prepare_invoke();
        call.key(self.key("filling", key)).arg(token);
        let _ = self.link.answered(call.invoke_async::<i64>(&mut self.link.connection()).await);
    }
}

/// An entry's answer, or `None` for bytes that are not one (written by another version).
fn decode(bytes: &[u8]) -> Option<CachedAnswer> {
    serde_json::from_slice::<Vec<StreamEvent>>(bytes).ok().map(CachedAnswer::Stream)
}
