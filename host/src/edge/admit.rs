//! Phase 1 of the request path: admission. A client's request is authenticated by its key; a
//! request relayed by a peer edge is checked on arrival (no loop back to this region, within the
//! hop limit, a tenant known here, the tenant's relay policy met). Then the tenant's rate, the
//! tenant's concurrency and the node's in-flight limit. Nothing of the body is read before a
//! request is admitted; an admitted request becomes an [`Exchange`] holding its [`Permits`],
//! which go when its answer ends (the last byte of a stream) or its client goes away.

use std::sync::Arc;

use super::ClientBody;
use hyper::Request;
use tokio::sync::OwnedSemaphorePermit;

use super::cache::{requested_cache, CacheDecision, CacheUse};
use super::context::{Exchange, Inbound, PendingBody};
use super::parse::declared_length;
use super::record::Record;
use super::trace::Trace;
use super::Edge;
use crate::chat::ChatRequest;
use crate::dispatch::{carries_unredacted_pii, policy::policy_forbids};
use crate::error::{GatewayError, RelayRefusal};
use crate::tenant::Tenant;
use meridian_engine::api::RelayRequest;

/// How a chat request reached this edge.
pub(super) enum Arrival {
    /// From a client, over HTTP.
    Client(Request<ClientBody>),
    /// From a peer edge, over QUIC ([`crate::relay`]).
    Relayed(RelayRequest),
}

/// Admits a request: its tenant, the tenant's rate, a place among the tenant's requests in flight
/// and one under `node.max_in_flight`. Returns the request's exchange, or why it was refused,
/// already accounted in `record`.
pub(super) fn admit(edge: &Edge, mut record: Record, arrival: Arrival) -> Result<Exchange, GatewayError> {
    // Traced from arrival, refusals included: the trace the client or peer edge is in.
    let incoming = match &arrival {
        Arrival::Client(req) => req.headers().get("traceparent").and_then(|v| v.to_str().ok()),
        Arrival::Relayed(r) => r.traceparent.as_deref(),
    };
    record.trace = Trace::begin(edge.tracer.as_ref(), incoming);
    match admission(edge, &mut record, arrival) {
        Ok((tenant, requested, inbound, permit)) => Ok(Exchange {
            tenant,
            inbound,
            request: ChatRequest::default(),
            answer_filter: None,
            cache: CacheDecision { requested, ..CacheDecision::default() },
            record,
            permit,
        }),
        Err(e) => {
            record.refused(&e);
            Err(e)
        }
    }
}

/// The checks of [`admit`], in order: who the request is for, with what it asks of the cache
/// and what came with it; then the tenant's rate, the tenant's concurrency and the node's limit.
fn admission(
    edge: &Edge,
    record: &mut Record,
    arrival: Arrival,
) -> Result<(Arc<Tenant>, Option<CacheUse>, Inbound, Permits), GatewayError> {
    let (tenant, requested, inbound) = match arrival {
        Arrival::Client(req) => {
            let tenant = edge.loaded.load().tenants.authenticate(req.headers())?;
            let requested = requested_cache(req.headers());
            let client_region =
                req.headers().get("x-meridian-client-region").and_then(|v| v.to_str().ok()).map(str::to_string);
            let declared = declared_length(req.headers());
            let body = Some(PendingBody::Http { body: req.into_body(), declared });
            (tenant, requested, Inbound { body, client_region, ..Inbound::default() })
        }
        Arrival::Relayed(r) => {
            let max_hops = edge.config.relay.as_ref().map_or(0, |c| c.max_hops);
            let known = edge.loaded.load().tenants.named(&r.tenant);
            let tenant = arrival_checks(&edge.config.node.region, max_hops, known, &r)?;
            // Personal data that reached this region unredacted is answered, never kept here.
            let bypass = r.no_cache || carries_unredacted_pii(&r.labels);
            let RelayRequest { client_region, path, labels, redacted, request, .. } = r;
            let body = Some(PendingBody::Relayed(request));
            (tenant, bypass.then_some(CacheUse::Bypass), Inbound { body, client_region, path, labels, redacted })
        }
    };
    // Refusals from here on are the tenant's: accounted under its name.
    record.tenant = Arc::clone(&tenant.name);
    tenant.admit()?;
    // The tenant's own limit first: a tenant at it is told so, not that the node is full.
    let tenant_place = tenant.concurrency_permit()?;
    let permits = Permits { _node: permit(edge)?, _tenant: tenant_place };
    Ok((tenant, requested, inbound, permits))
}

/// An admitted request's places: under `node.max_in_flight` and among its tenant's requests in
/// flight (`max_concurrent_requests`). The exchange holds them, then the answer: a whole answer
/// until it is built, a stream until its last event is sent or it is dropped (the client went
/// away, or stopped reading for `node.client_write_timeout_ms`, see [`crate::server`]).
pub(super) struct Permits {
    _node: OwnedSemaphorePermit,
    _tenant: OwnedSemaphorePermit,
}

/// A place under `node.max_in_flight`, or `Overloaded` at once: a full node sheds load rather
/// than queueing it.
pub(super) fn permit(edge: &Edge) -> Result<OwnedSemaphorePermit, GatewayError> {
    Arc::clone(&edge.in_flight).try_acquire_owned().map_err(|_| GatewayError::Overloaded)
}

/// A relayed request's checks on arrival at the edge of `own_region`, given its tenant as looked
/// up here (`None`: unknown here): neither a loop back to this region nor past the hop limit
/// (`max_hops`); its tenant known here and the tenant's relay policy met by the request's labels.
/// Returns the tenant.
pub(super) fn arrival_checks(
    own_region: &str,
    max_hops: u8,
    tenant: Option<Arc<Tenant>>,
    r: &RelayRequest,
) -> Result<Arc<Tenant>, RelayRefusal> {
    let path = || r.path.join(" > ");
    if r.path.iter().any(|p| p == own_region) {
        return Err(RelayRefusal::Loop { region: own_region.to_string(), path: path() });
    }
    if r.path.len() > usize::from(max_hops) {
        return Err(RelayRefusal::HopLimit { max: max_hops, path: path() });
    }
    let tenant = tenant.ok_or_else(|| RelayRefusal::UnknownTenant(r.tenant.clone()))?;
    match policy_forbids(tenant.relay, &r.labels) {
        Some(refusal) => Err(refusal),
        None => Ok(tenant),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Plugins;
    use crate::config::Config;
    use crate::tenant::Tenants;

    const KEY: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const OTHER: &str = "sha256:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    /// A tenant whose requests may be relayed, and one whose may not.
    fn tenants() -> Tenants {
        let config = Config::parse(&format!(
            r#"
            [[tenants]]
            name = "open"
            keys = ["{KEY}"]
            [[tenants]]
            name = "closed"
            keys = ["{OTHER}"]
            relay = "never"
            [targets.oa]
            api = "openai"
            base_url = "http://127.0.0.1:9/v1"
            [[models]]
            name = "m"
            targets = [{{ target = "oa" }}]
        "#
        ))
        .unwrap();
        Tenants::new(&config, &Plugins::default())
    }

    fn relayed(tenant: &str, path: &[&str], labels: &[&str]) -> RelayRequest {
        RelayRequest {
            request_id: "r".into(),
            tenant: tenant.into(),
            client_region: None,
            path: path.iter().map(|p| p.to_string()).collect(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            redacted: false,
            no_cache: false,
            request: serde_json::Value::Null,
            traceparent: None,
        }
    }

    fn check(path: &[&str], tenant: &str, labels: &[&str]) -> Result<String, RelayRefusal> {
        let r = relayed(tenant, path, labels);
        arrival_checks("eu", 2, tenants().named(tenant), &r).map(|t| t.name.to_string())
    }

    #[test]
    fn a_relay_from_a_peer_is_admitted_for_its_tenant() {
        assert_eq!(check(&["us"], "open", &[]).unwrap(), "open");
        assert_eq!(check(&["us", "ap"], "open", &["pii.email"]).unwrap(), "open", "at the hop limit");
    }

    #[test]
    fn a_loop_back_to_this_region_is_refused_first() {
        let e = check(&["eu", "us"], "nobody", &[]).unwrap_err();
        assert!(matches!(&e, RelayRefusal::Loop { region, path } if region == "eu" && path == "eu > us"), "{e:?}");
    }

    #[test]
    fn a_path_past_the_hop_limit_is_refused() {
        let e = check(&["us", "ap", "sa"], "open", &[]).unwrap_err();
        assert!(matches!(&e, RelayRefusal::HopLimit { max: 2, path } if path == "us > ap > sa"), "{e:?}");
    }

    #[test]
    fn a_tenant_unknown_here_is_refused() {
        let e = check(&["us"], "nobody", &[]).unwrap_err();
        assert!(matches!(&e, RelayRefusal::UnknownTenant(t) if t == "nobody"), "{e:?}");
    }

    #[test]
    fn the_tenants_relay_policy_holds_on_arrival() {
        let e = check(&["us"], "closed", &[]).unwrap_err();
        assert!(matches!(e, RelayRefusal::Policy(_)), "{e:?}");
    }
}
