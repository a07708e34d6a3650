//! Phase 4 of the request path: the prompt cache. Whether a request looks its answer up is
//! decided in one place ([`cache_use`]): the node's cache and the tenant's `never` first, then
//! what the client asked ([`requested_cache`]), the tenant's `always`, the router's wish, and
//! last whether the request is deterministic. The key is taken from the request as the tenant's
//! filters left it, so text they redacted never reaches the cache. A hit answers the request
//! here; a miss makes the request the one that fills the entry.

use std::collections::VecDeque;

use hyper::header::{HeaderMap, CACHE_CONTROL};

use super::context::Exchange;
use super::respond::{Answer, Source};
use super::Edge;
use crate::cache::{self as prompt_cache, CachedAnswer, FillGuard, Lookup};
use crate::chat::ChatRequest;
use crate::config::CachePolicy;
use crate::plugin::CachePolicy as RouterCache;
use crate::routes::Plan;

/// How a request uses the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CacheUse {
    /// Look the answer up, and fill the entry on a miss.
    Lookup,
    /// Neither read nor fill.
    Bypass,
}

/// The cache decision of one exchange.
#[derive(Default)]
pub(super) struct CacheDecision {
    /// What the client asked of the cache (its headers, or the relay frame), set on admission.
    /// A bypass is passed on to a peer edge.
    pub requested: Option<CacheUse>,
    /// What the lookup found.
    pub outcome: Outcome,
}

/// What the cache phase found.
#[derive(Default)]
pub(super) enum Outcome {
    /// Not looked up.
    #[default]
    Bypass,
    /// Not there: the answer fills the entry through the guard, unless its content outgrows the
    /// entry limit (`cache.max_entry_bytes`, in bytes), the second field.
    Miss(FillGuard, usize),
    /// Answered from the cache.
    Hit,
}

impl Outcome {
    /// As `x-meridian-cache` and the lookup metric say it.
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Bypass => "bypass",
            Outcome::Miss(..) => "miss",
            Outcome::Hit => "hit",
        }
    }
}

/// Looks the exchange's request up, if [`cache_use`] says so. Returns the answer on a hit; on a
/// miss the exchange leads the fill of the entry.
pub(super) async fn lookup(edge: &Edge, cx: &mut Exchange, plan: &Plan) -> Option<Answer> {
    let usage =
        cache_use(edge.cache.is_some(), cx.tenant.cache, cx.cache.requested, plan.cache, deterministic(&cx.request));
    let found = match (&edge.cache, usage) {
        (Some(cache), CacheUse::Lookup) => Some(cache.lookup(prompt_cache::key(&cx.tenant.name, &cx.request)).await),
        _ => None,
    };
    let outcome = match found {
        Some(Lookup::Hit(answer, coalesced)) => {
            edge.metrics.cache_lookups.with_label_values(&[Outcome::Hit.status()]).inc();
            if coalesced {
                edge.metrics.cache_coalesced.inc();
            }
            cx.record.target = Some("cache".into());
            cx.cache.outcome = Outcome::Hit;
            return Some(serve_cached(&cx.request, &answer));
        }
        Some(Lookup::Miss(guard)) => Outcome::Miss(guard, edge.config.cache.entry_limit()),
        None => Outcome::Bypass,
    };
    edge.metrics.cache_lookups.with_label_values(&[outcome.status()]).inc();
    cx.cache.outcome = outcome;
    None
}

/// A cached answer in the form the request wants: replayed as a stream, or whole.
fn serve_cached(request: &ChatRequest, answer: &CachedAnswer) -> Answer {
    if request.is_stream() {
        Answer::Stream(Source::Replay(answer.to_events().into_iter()), VecDeque::new())
    } else {
        Answer::Whole(answer.to_response())
    }
}

/// What the client's headers ask of the cache: `cache-control: no-store` or `no-cache`, or
/// `x-meridian-cache: bypass`, keep it out; `x-meridian-cache: force` asks for it.
pub(super) fn requested_cache(headers: &HeaderMap) -> Option<CacheUse> {
    let no_store = headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|d| matches!(d.trim(), "no-store" | "no-cache")));
    match headers.get("x-meridian-cache").and_then(|v| v.to_str().ok()) {
        _ if no_store => Some(CacheUse::Bypass),
        Some("bypass") => Some(CacheUse::Bypass),
        Some("force") => Some(CacheUse::Lookup),
        _ => None,
    }
}

/// Whether a request uses the cache. In order of precedence: no cache on the node, or a tenant
/// whose policy is `never`, bypass it; then what the client asked (`requested`); a tenant whose
/// policy is `always` looks up; then the router's wish; last, under `auto`, a deterministic
/// request looks up and any other bypasses.
pub(super) fn cache_use(
    enabled: bool,
    tenant: CachePolicy,
    requested: Option<CacheUse>,
    router: Option<RouterCache>,
    deterministic: bool,
) -> CacheUse {
    if !enabled || tenant == CachePolicy::Never {
        return CacheUse::Bypass;
    }
    match (requested, router) {
        (Some(u), _) => u,
        (None, _) if tenant == CachePolicy::Always => CacheUse::Lookup,
        (None, Some(RouterCache::Force)) => CacheUse::Lookup,
        (None, Some(RouterCache::Bypass)) => CacheUse::Bypass,
        _ if deterministic => CacheUse::Lookup,
        _ => CacheUse::Bypass,
    }
}

/// Cacheable under the `auto` policy: the same request gets the same answer.
fn deterministic(req: &ChatRequest) -> bool {
    req.temperature == Some(0.0) || req.seed.is_some()
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn clients_ask_with_headers() {
        assert_eq!(requested_cache(&headers(&[])), None, "no wish: the policy decides");
        assert_eq!(requested_cache(&headers(&[("cache-control", "no-store")])), Some(CacheUse::Bypass));
        assert_eq!(requested_cache(&headers(&[("cache-control", "no-cache")])), Some(CacheUse::Bypass));
        assert_eq!(
            requested_cache(&headers(&[("cache-control", "max-age=0, no-cache")])),
            Some(CacheUse::Bypass),
            "a directive anywhere in the list"
        );
        assert_eq!(
            requested_cache(&headers(&[("cache-control", "max-age=0"), ("cache-control", "no-store")])),
            Some(CacheUse::Bypass),
            "in any of the header's lines"
        );
        assert_eq!(requested_cache(&headers(&[("cache-control", "max-age=60")])), None);
        assert_eq!(requested_cache(&headers(&[("x-meridian-cache", "bypass")])), Some(CacheUse::Bypass));
        assert_eq!(requested_cache(&headers(&[("x-meridian-cache", "force")])), Some(CacheUse::Lookup));
        assert_eq!(requested_cache(&headers(&[("x-meridian-cache", "sometimes")])), None, "unknown: no wish");
        assert_eq!(
            requested_cache(&headers(&[("x-meridian-cache", "force"), ("cache-control", "no-store")])),
            Some(CacheUse::Bypass),
            "no-store wins over force"
        );
    }

    #[test]
    fn the_tenant_and_the_node_come_first() {
        use CacheUse::{Bypass, Lookup};
        for requested in [None, Some(Lookup), Some(Bypass)] {
            for router in [None, Some(RouterCache::Force), Some(RouterCache::Bypass), Some(RouterCache::Default)] {
                for det in [false, true] {
                    assert_eq!(cache_use(true, CachePolicy::Never, requested, router, det), Bypass);
                    for tenant in [CachePolicy::Auto, CachePolicy::Always] {
                        assert_eq!(cache_use(false, tenant, requested, router, det), Bypass, "no cache here");
                    }
                }
            }
        }
    }

    #[test]
    fn then_the_client_then_always_then_the_router_then_determinism() {
        use CachePolicy::{Always, Auto};
        use CacheUse::{Bypass, Lookup};
        let force = Some(RouterCache::Force);
        let router_bypass = Some(RouterCache::Bypass);
        // The client's wish wins over the tenant's `always`, the router and determinism.
        assert_eq!(cache_use(true, Always, Some(Bypass), force, true), Bypass);
        assert_eq!(cache_use(true, Auto, Some(Lookup), router_bypass, false), Lookup);
        // `always` wins over the router.
        assert_eq!(cache_use(true, Always, None, router_bypass, false), Lookup);
        // The router's wish wins over determinism.
        assert_eq!(cache_use(true, Auto, None, force, false), Lookup);
        assert_eq!(cache_use(true, Auto, None, router_bypass, true), Bypass);
        // No wish anywhere (or the router's `default`): deterministic requests only.
        for router in [None, Some(RouterCache::Default)] {
            assert_eq!(cache_use(true, Auto, None, router, true), Lookup);
            assert_eq!(cache_use(true, Auto, None, router, false), Bypass);
        }
    }

    #[test]
    fn deterministic_means_temperature_zero_or_a_seed() {
        let mut req = ChatRequest::default();
        assert!(!deterministic(&req));
        req.temperature = Some(0.0);
        assert!(deterministic(&req));
        req.temperature = Some(0.7);
        assert!(!deterministic(&req));
        req.seed = Some(7);
        assert!(deterministic(&req));
    }
}
