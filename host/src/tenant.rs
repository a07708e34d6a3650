//! Tenants: API keys (stored as hashes) mapped to who is calling, their cache policy, rate and
//! concurrency.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hyper::header::{HeaderMap, AUTHORIZATION};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::chain::{AnswerBatch, Chain, Plugins};
use crate::config::{parse_key_hash, CachePolicy, Config, RelayPolicy, TenantConfig};
use crate::error::GatewayError;
use crate::plugin::SessionSlots;

/// One tenant.
#[derive(Debug)]
pub struct Tenant {
    /// Its name, a metrics label.
    pub name: Arc<str>,
    /// When its answers are cached.
    pub cache: CachePolicy,
    /// Its privacy filters and router.
    pub chain: Chain,
    /// Whether its requests may be relayed to other regions' edges.
    pub relay: RelayPolicy,
    /// Shared with the tenant's next incarnation after a plugin reload, so a reload does not
    /// reset its rate.
    limiter: Arc<Option<DefaultDirectRateLimiter>>,
    /// Its places for requests in flight (`max_concurrent_requests`), kept across reloads as
    /// the rate is, so that requests admitted before a reload still count after it.
    concurrency: Arc<Semaphore>,
    /// The size of `concurrency`.
    max_concurrent: u32,
}

impl Tenant {
    /// Admits one request under the tenant's rate, or says when to retry.
    pub fn admit(&self) -> Result<(), GatewayError> {
        let Some(limiter) = self.limiter.as_ref() else { return Ok(()) };
        limiter.check().map_err(|not_until| GatewayError::RateLimited {
            tenant: self.name.to_string(),
            retry_after: not_until.wait_time_from(DefaultClock::default().now()),
        })
    }

    /// One of the tenant's places for a request in flight, held until the request ends, or
    /// [`GatewayError::TenantConcurrency`] at once when it has none free: a tenant at its limit
    /// is refused rather than queued, so its backlog never sits in front of anyone's.
    pub fn concurrency_permit(&self) -> Result<OwnedSemaphorePermit, GatewayError> {
        Arc::clone(&self.concurrency)
            .try_acquire_owned()
            .map_err(|_| GatewayError::TenantConcurrency { tenant: self.name.to_string(), limit: self.max_concurrent })
    }
}

/// Every tenant, by the hash of each of its keys.
#[derive(Debug, Default)]
pub struct Tenants {
    by_key: HashMap<[u8; 32], Arc<Tenant>>,
    by_name: HashMap<Arc<str>, Arc<Tenant>>,
}

impl Tenants {
    /// From validated config, with the plugins it names loaded.
    pub fn new(config: &Config, plugins: &Plugins) -> Tenants {
        Tenants::build(config, plugins, None)
    }

    /// The same tenants with freshly loaded plugins, keeping each tenant's rate-limit state, its
    /// requests in flight and its plugin session slots.
    pub fn with_plugins(&self, config: &Config, plugins: &Plugins) -> Tenants {
        Tenants::build(config, plugins, Some(self))
    }

    fn build(config: &Config, plugins: &Plugins, previous: Option<&Tenants>) -> Tenants {
        let mut by_key = HashMap::new();
        let mut by_name = HashMap::new();
        for t in &config.tenants {
            let kept = previous.and_then(|p| p.by_name.get(t.name.as_str()));
            let limiter = kept.map_or_else(
                || {
                    Arc::new(t.requests_per_second.and_then(NonZeroU32::new).map(|rate| {
                        let burst = t.burst.and_then(NonZeroU32::new).unwrap_or(rate);
                        RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
                    }))
                },
                |old| Arc::clone(&old.limiter),
            );
            let max_concurrent = max_concurrent(config, t);
            let concurrency = kept
                .map_or_else(|| Arc::new(Semaphore::new(max_concurrent as usize)), |old| Arc::clone(&old.concurrency));
            // The answer side of its filters runs in slots of its own, so that its streams never
            // wait for another tenant's (see `plugin::SessionSlots`).
            let sessions =
                kept.map_or_else(|| SessionSlots::new(session_slots(config, t)), |old| old.chain.sessions.clone());
            // Validation checked that every named plugin exists with the right kind.
            let chain = Chain {
                filters: t.filters.iter().filter_map(|f| plugins.filters.get(f).cloned()).collect(),
                router: t.router.as_ref().and_then(|r| plugins.routers.get(r).cloned()),
                allowed_regions: t.allowed_regions.clone(),
                price_cap_usd: t.price_cap_usd,
                sessions,
                answer_batch: AnswerBatch::new(t.answer_batch),
            };
            let tenant = Arc::new(Tenant {
                name: t.name.as_str().into(),
                cache: t.cache,
                chain,
                relay: t.relay,
                limiter,
                concurrency,
                max_concurrent,
            });
            by_name.insert(Arc::clone(&tenant.name), Arc::clone(&tenant));
            for k in &t.keys {
                // Validation already parsed every hash.
                if let Ok(digest) = parse_key_hash(k) {
                    by_key.insert(digest, Arc::clone(&tenant));
                }
            }
        }
        Tenants { by_key, by_name }
    }

    /// The plugin instance slots the pool must set aside for every tenant's [`SessionSlots`].
    pub fn session_slots(config: &Config) -> u32 {
        config.tenants.iter().map(|t| session_slots(config, t)).fold(0, u32::saturating_add)
    }

    /// The tenant of that name: a peer edge relays requests by tenant name, having checked the
    /// client's key itself (the peer is authenticated by its cluster certificate).
    pub fn named(&self, name: &str) -> Option<Arc<Tenant>> {
        self.by_name.get(name).cloned()
    }

    /// The tenant whose key the request carries: `Authorization: Bearer KEY` (OpenAI) or
    /// `x-api-key: KEY` (Anthropic), on either endpoint.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Tenant>, GatewayError> {
        let digest = key_digest(headers).ok_or(GatewayError::Unauthorized)?;
        self.by_key.get(&digest).cloned().ok_or(GatewayError::Unauthorized)
    }
}

/// A tenant's limit on requests in flight: its own, or the node's default.
fn max_concurrent(config: &Config, t: &TenantConfig) -> u32 {
    t.max_concurrent_requests.unwrap_or(config.node.tenant_max_concurrent_requests)
}

/// The instance slots a tenant's streamed answers may hold: one per filter per stream, no more
/// than its concurrency allows nor than `plugin_runtime.max_sessions_per_tenant`; none without
/// filters.
fn session_slots(config: &Config, t: &TenantConfig) -> u32 {
    let filters = u32::try_from(t.filters.len()).unwrap_or(u32::MAX);
    max_concurrent(config, t).saturating_mul(filters).min(config.plugin_runtime.max_sessions_per_tenant)
}

/// SHA-256 of the key a request carries (`Authorization: Bearer KEY` or `x-api-key: KEY`).
pub fn key_digest(headers: &HeaderMap) -> Option<[u8; 32]> {
    let key = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|k| !k.is_empty())?;
    Some(Sha256::digest(key.as_bytes()).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::hash_key;

    fn tenants(extra: &str) -> Tenants {
        let text = format!("[[tenants]]\nname = \"acme\"\nkeys = [\"{}\"]\n{extra}", hash_key("sk-acme"));
        Tenants::new(&Config::parse(&text).unwrap(), &Plugins::default())
    }

    #[test]
    fn either_header_authenticates() {
        let t = tenants("");
        let mut h = HeaderMap::new();
        assert!(matches!(t.authenticate(&h), Err(GatewayError::Unauthorized)));
        h.insert(AUTHORIZATION, "Bearer sk-acme".parse().unwrap());
        assert_eq!(&*t.authenticate(&h).unwrap().name, "acme");
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "sk-acme".parse().unwrap());
        assert!(t.authenticate(&h).is_ok());
        h.insert("x-api-key", "sk-other".parse().unwrap());
        assert!(t.authenticate(&h).is_err());
    }

    #[test]
    fn the_rate_limit_refuses_past_the_burst() {
        let t = tenants("requests_per_second = 1\nburst = 2\n");
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "Bearer sk-acme".parse().unwrap());
        let tenant = t.authenticate(&h).unwrap();
        assert!(tenant.admit().is_ok() && tenant.admit().is_ok());
        assert!(matches!(tenant.admit(), Err(GatewayError::RateLimited { .. })));
    }

    fn acme(t: &Tenants) -> Arc<Tenant> {
        t.named("acme").unwrap()
    }

    #[test]
    fn past_its_concurrency_a_tenant_is_refused_until_a_request_ends() {
        let t = tenants("max_concurrent_requests = 2\n");
        let (first, _second) = (acme(&t).concurrency_permit().unwrap(), acme(&t).concurrency_permit().unwrap());
        let refused = acme(&t).concurrency_permit().unwrap_err();
        assert!(matches!(&refused, GatewayError::TenantConcurrency { tenant, limit: 2 } if tenant == "acme"));
        assert_eq!(
            (refused.status().as_u16(), refused.code(), refused.retry_after()),
            (429, "tenant_concurrency", Some(1))
        );
        drop(first);
        assert!(acme(&t).concurrency_permit().is_ok(), "a place frees when a request ends");
    }

    #[test]
    fn the_nodes_default_applies_to_tenants_without_a_limit_and_reloads_keep_requests_in_flight() {
        let text = format!(
            "[node]\ntenant_max_concurrent_requests = 1\n[[tenants]]\nname = \"acme\"\nkeys = [\"{}\"]\n",
            hash_key("sk-acme")
        );
        let config = Config::parse(&text).unwrap();
        let t = Tenants::new(&config, &Plugins::default());
        let _held = acme(&t).concurrency_permit().unwrap();
        let reloaded = t.with_plugins(&config, &Plugins::default());
        assert!(matches!(acme(&reloaded).concurrency_permit(), Err(GatewayError::TenantConcurrency { limit: 1, .. })));
    }

    #[test]
    fn session_slots_are_what_each_tenants_streams_can_use_within_the_cap() {
        let tenant = |name: &str, extra: &str| {
            format!("[[tenants]]\nname = \"{name}\"\nkeys = [\"{}\"]\n{extra}\n", hash_key(name))
        };
        let text = [
            "[plugin_runtime]\nmax_sessions_per_tenant = 8\n[plugins.f]\nkind = \"filter\"\npath = \"f.wasm\"\n".into(),
            tenant("capped_by_its_concurrency", "filters = [\"f\"]\nmax_concurrent_requests = 3"),
            tenant("capped_by_the_runtime", "filters = [\"f\", \"f\"]"),
            tenant("unfiltered", ""),
        ]
        .concat();
        assert_eq!(Tenants::session_slots(&Config::parse(&text).unwrap()), 3 + 8);
    }

    #[test]
    fn a_limit_of_zero_is_a_config_error() {
        let text = format!(
            "[[tenants]]\nname = \"acme\"\nkeys = [\"{}\"]\nmax_concurrent_requests = 0\n",
            hash_key("sk-acme")
        );
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("tenants[0].max_concurrent_requests"), "{err}");
    }
}
