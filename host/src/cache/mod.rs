//! The edge prompt cache: answers keyed by tenant and everything that changes them, bounded by
//! bytes with a TTL, with concurrent identical misses coalesced into one upstream call; with
//! `[cache] redis_url`, a second level shared by a region's edges ([`shared`]).

pub mod shared;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::chat::{ChatRequest, ChatResponse, ResponseBuilder, StreamEvent};
use shared::{Claim, SharedCache};

/// A cache key: SHA-256 of the tenant and the canonical request.
pub type CacheKey = [u8; 32];

/// A cached answer, in the form it arrived; either form serves both streaming and non-streaming
/// clients.
#[derive(Debug, Clone)]
pub enum CachedAnswer {
    /// A whole answer.
    Whole(ChatResponse),
    /// A stream's events, replayed as a stream.
    Stream(Vec<StreamEvent>),
}

impl CachedAnswer {
    /// As a whole answer.
    pub fn to_response(&self) -> ChatResponse {
        match self {
            CachedAnswer::Whole(r) => r.clone(),
            CachedAnswer::Stream(events) => {
                let mut b = ResponseBuilder::default();
                events.iter().for_each(|e| b.push(e));
                b.finish()
            }
        }
    }

    /// As stream events.
    pub fn to_events(&self) -> Vec<StreamEvent> {
        match self {
            CachedAnswer::Whole(r) => r.to_events(),
            CachedAnswer::Stream(events) => events.clone(),
        }
    }

    /// Approximate bytes held, for the cache's weigher.
    fn weight(&self) -> u32 {
        const OVERHEAD: usize = 128;
        let bytes = match self {
            CachedAnswer::Whole(r) => OVERHEAD + r.id.len() + r.model.len() + r.output_len(),
            CachedAnswer::Stream(events) => {
                events.iter().map(|e| OVERHEAD / 2 + e.content_len()).sum::<usize>() + OVERHEAD
            }
        };
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// The key of a request: tenant plus every field that changes the answer. `stream` and
/// `stream_options` are left out, since both forms are served from one entry.
pub fn key(tenant: &str, req: &ChatRequest) -> CacheKey {
    let mut canonical = req.clone();
    canonical.stream = None;
    canonical.stream_options = None;
    let mut h = Sha256::new();
    h.update((tenant.len() as u64).to_le_bytes());
    h.update(tenant.as_bytes());
    // serde_json's maps are sorted, so equal requests serialize equally whatever their key order.
    h.update(serde_json::to_vec(&canonical).unwrap_or_default());
    h.update(serde_json::to_vec(&canonical.anthropic_extra).unwrap_or_default());
    h.finalize().into()
}

/// What a lookup found.
pub enum Lookup {
    /// A stored answer, and whether it came from waiting on an identical request in flight.
    Hit(Arc<CachedAnswer>, bool),
    /// No answer: the caller calls upstream and fills the entry through the guard.
    Miss(FillGuard),
}

type InFlight = Mutex<HashMap<CacheKey, watch::Receiver<()>>>;

/// The prompt cache.
pub struct PromptCache {
    store: moka::future::Cache<CacheKey, Arc<CachedAnswer>>,
    in_flight: Arc<InFlight>,
    shared: Option<Arc<SharedCache>>,
}

impl PromptCache {
    /// A cache of at most `max_bytes` whose entries live `ttl`.
    pub fn new(max_bytes: u64, ttl: Duration) -> Self {
        Self::with_shared(max_bytes, ttl, None)
    }

    /// The same, in front of the region's `shared` level.
    pub fn with_shared(max_bytes: u64, ttl: Duration, shared: Option<SharedCache>) -> Self {
        let store = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &CacheKey, v: &Arc<CachedAnswer>| v.weight())
            .time_to_live(ttl)
            .build();
        PromptCache { store, in_flight: Arc::default(), shared: shared.map(Arc::new) }
    }

    /// The shared level, when there is one.
    pub fn shared(&self) -> Option<&SharedCache> {
        self.shared.as_deref()
    }

    /// Looks `key` up. If an identical request is already calling upstream, waits for it and
    /// returns its answer; if that request fails or is abandoned, this one takes over. With a
    /// shared level, a local miss looks there next, and waits for another edge filling the same
    /// entry ([`SharedCache::claim`]); a hit there is kept locally too.
    pub async fn lookup(&self, key: CacheKey) -> Lookup {
        let mut waited = false;
        loop {
            if let Some(answer) = self.store.get(&key).await {
                return Lookup::Hit(answer, waited);
            }
            // Follow the request in flight, or lead: the lock is released before any await.
            let follow = {
                let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                match in_flight.get(&key) {
                    Some(rx) => Ok(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(());
                        in_flight.insert(key, rx);
                        Err(FillGuard {
                            key,
                            store: self.store.clone(),
                            in_flight: Arc::clone(&self.in_flight),
                            claim: None,
                            _done: tx,
                        })
                    }
                }
            };
            let mut rx = match follow {
                Ok(rx) => rx,
                Err(guard) => return self.lookup_shared(guard).await,
            };
            // Wakes when the leader's guard drops, filled or not.
            let _ = rx.changed().await;
            waited = true;
        }
    }

    /// A local miss, led by `guard`: the shared level's entry, another edge's fill, or the
    /// miss (with this edge's claim on the shared entry, when it has one).
    async fn lookup_shared(&self, mut guard: FillGuard) -> Lookup {
        let Some(shared) = &self.shared else { return Lookup::Miss(guard) };
        let found = match shared.get(&guard.key).await {
            Some(answer) => Some((answer, false)),
            None => match shared.claim(&guard.key).await {
                Claim::Mine(token) => {
                    guard.claim = Some((Arc::clone(shared), token));
                    None
                }
                Claim::Filled(answer) => answer.map(|a| (a, true)),
                Claim::Unavailable => None,
            },
        };
        match found {
            Some((answer, waited)) => {
                let answer = Arc::new(answer);
                guard.store.insert(guard.key, Arc::clone(&answer)).await;
                Lookup::Hit(answer, waited)
            }
            None => Lookup::Miss(guard),
        }
    }

    /// Weighted size in bytes and entry count. Runs the store's pending maintenance first: moka
    /// counts inserts, evictions and expiries only then, which a quiet node would never trigger.
    pub async fn size(&self) -> (u64, u64) {
        self.store.run_pending_tasks().await;
        (self.store.weighted_size(), self.store.entry_count())
    }
}

/// The right, and duty, to fill one entry. Dropping it unfilled lets a waiting request try.
pub struct FillGuard {
    key: CacheKey,
    store: moka::future::Cache<CacheKey, Arc<CachedAnswer>>,
    in_flight: Arc<InFlight>,
    /// This edge's claim on the shared entry, released by the fill or the drop.
    claim: Option<(Arc<SharedCache>, String)>,
    _done: watch::Sender<()>,
}

impl FillGuard {
    /// Stores a complete answer, locally and in the shared level; waiting requests then read it.
    pub async fn fill(mut self, answer: CachedAnswer) {
        if let Some((shared, token)) = self.claim.take() {
            shared.fill(self.key, &answer, token);
        }
        self.store.insert(self.key, Arc::new(answer)).await;
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        // Unregister before the sender drops, so that woken waiters find the entry or lead.
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
        if let Some((shared, token)) = self.claim.take() {
            shared.release(self.key, token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{FinishReason, Message, Role};

    fn req(text: &str) -> ChatRequest {
        ChatRequest { model: "m".into(), messages: vec![Message::text(Role::User, text)], ..ChatRequest::default() }
    }

    fn answer(text: &str) -> CachedAnswer {
        CachedAnswer::Whole(ChatResponse {
            id: "r".into(),
            model: "m".into(),
            created: 0,
            text: Some(text.into()),
            tool_calls: vec![],
            finish: FinishReason::Stop,
            usage: None,
        })
    }

    #[test]
    fn keys_separate_tenants_and_ignore_the_stream_flag() {
        let mut streamed = req("hi");
        streamed.stream = Some(true);
        assert_eq!(key("a", &req("hi")), key("a", &streamed));
        assert_ne!(key("a", &req("hi")), key("b", &req("hi")));
        assert_ne!(key("a", &req("hi")), key("a", &req("hi!")));
        let mut hot = req("hi");
        hot.temperature = Some(0.5);
        assert_ne!(key("a", &req("hi")), key("a", &hot));
    }

    #[tokio::test]
    async fn a_waiter_gets_the_leaders_answer_or_takes_over() {
        let cache = Arc::new(PromptCache::new(1 << 20, Duration::from_secs(60)));
        let k = key("t", &req("x"));
        let Lookup::Miss(guard) = cache.lookup(k).await else { panic!("empty cache hits") };
        let c2 = Arc::clone(&cache);
        let waiter = tokio::spawn(async move {
            match c2.lookup(k).await {
                Lookup::Hit(a, waited) => (a.to_response().text, waited),
                Lookup::Miss(_) => (None, false),
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        guard.fill(answer("first")).await;
        assert_eq!(waiter.await.unwrap(), (Some("first".into()), true));

        let k2 = key("t", &req("y"));
        let Lookup::Miss(guard) = cache.lookup(k2).await else { panic!() };
        let c3 = Arc::clone(&cache);
        let waiter = tokio::spawn(async move { matches!(c3.lookup(k2).await, Lookup::Miss(_)) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(guard);
        assert!(waiter.await.unwrap(), "an abandoned fill hands the lead to a waiter");
    }

    #[tokio::test]
    async fn size_counts_an_answer_as_soon_as_it_is_stored() {
        let cache = PromptCache::new(1 << 20, Duration::from_secs(60));
        let Lookup::Miss(guard) = cache.lookup(key("t", &req("z"))).await else { panic!("empty cache hits") };
        guard.fill(answer("stored")).await;
        let (bytes, entries) = cache.size().await;
        assert_eq!(entries, 1);
        assert!(bytes > 0);
    }
}
