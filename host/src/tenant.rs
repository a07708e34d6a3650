//! Tenants: API keys (stored as hashes) mapped to who is calling, their cache policy and rate.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hyper::header::{HeaderMap, AUTHORIZATION};
use sha2::{Digest, Sha256};

use crate::chain::{Chain, Plugins};
use crate::config::{parse_key_hash, CachePolicy, Config, RelayPolicy};
use crate::error::GatewayError;

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

    /// The same tenants with freshly loaded plugins, keeping each tenant's rate-limit state.
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
            // Validation checked that every named plugin exists with the right kind.
            let chain = Chain {
                filters: t.filters.iter().filter_map(|f| plugins.filters.get(f).cloned()).collect(),
                router: t.router.as_ref().and_then(|r| plugins.routers.get(r).cloned()),
                allowed_regions: t.allowed_regions.clone(),
                price_cap_usd: t.price_cap_usd,
            };
            let tenant =
                Arc::new(Tenant { name: t.name.as_str().into(), cache: t.cache, chain, relay: t.relay, limiter });
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
}
