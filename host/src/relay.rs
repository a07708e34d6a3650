//! Edge-to-edge relay, the receiving side: the edge as the backend of the QUIC server on its
//! `[relay]` address. One region's edge hands a request to another region's edge, which
//! dispatches it with its own targets, over the cluster's mutual-TLS QUIC protocol
//! (`engine/PROTOCOL.md`, `REQUEST` with `op = "relay"`, answered with `EVENT` frames).
//!
//! What crosses the link is the request as the origin's filters left it: placeholders in place of
//! what they redacted (the originals stay at the origin, which restores them in the answer), with
//! the labels and redaction state, so the receiving edge's routers apply the same residency rule
//! (the codec is [`crate::api::relay`]). Before anything is relayed the tenant's relay policy is
//! checked, at both ends ([`crate::dispatch::policy`]).
//!
//! Who may relay: only the peer edges of `[[relay.peers]]`, each from its own region and for its
//! listed tenants ([`authorize`]), checked before the request reaches the edge.
//!
//! Loops: a relayed request carries the regions it passed through. An edge refuses one that lists
//! its own region or took more than its `relay.max_hops`, and never relays onward to a listed
//! region or past the limit, so a request cannot bounce between regions.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use http_body_util::BodyExt;
use meridian_engine::api::{self as wire, Backend, EngineError, ErrorCode, RelayRequest};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::api::relay::wire_error;
use crate::config::RelayPeer;
use crate::edge::Edge;
use crate::error::RelayRefusal;

/// Whether node `peer` (the common name of the certificate it connected with) may relay
/// `request` to this edge, whose `[[relay.peers]]` are `peers`: it must be listed there, the
/// request's path must end in its listed region (the region it relays from; an empty path is no
/// relay at all), and the tenant must be one it is accepted for. Loops, the hop limit and the
/// tenant's own policy are checked after this, when the edge takes the request.
pub fn authorize(peers: &[RelayPeer], peer: &str, request: &RelayRequest) -> Result<(), RelayRefusal> {
    let listed =
        peers.iter().find(|p| p.name == peer).ok_or_else(|| RelayRefusal::UnauthorizedPeer(peer.to_string()))?;
    if request.path.last() != Some(&listed.region) {
        let path = if request.path.is_empty() { "none".to_string() } else { request.path.join(" > ") };
        return Err(RelayRefusal::BadPath { peer: peer.to_string(), region: listed.region.clone(), path });
    }
    if !listed.tenants.contains(&request.tenant) {
        return Err(RelayRefusal::TenantNotAccepted { peer: peer.to_string(), tenant: request.tenant.clone() });
    }
    Ok(())
}

/// The edge as a [`Backend`] of the QUIC server on its `[relay]` address: it takes relayed
/// requests and answers health probes from peer edges; it serves no engine chat or embeddings.
pub struct RelayBackend {
    edge: Weak<Edge>,
}

impl RelayBackend {
    /// The backend of `edge` (held weakly: the listener does not keep a stopped edge alive).
    pub fn new(edge: &Arc<Edge>) -> RelayBackend {
        RelayBackend { edge: Arc::downgrade(edge) }
    }

    fn not_an_engine() -> EngineError {
        EngineError::new(ErrorCode::BadRequest, "this node is an edge: it takes relayed requests, not engine requests")
    }
}

/// [`authorize`] under `edge`'s `[relay]`. A refusal is counted and logged, and becomes the
/// `ERROR` the sender gets (`refused`, 403), before anything is dispatched.
fn admit_peer(edge: &Edge, peer: &str, request: &RelayRequest) -> Result<(), EngineError> {
    let peers = edge.config().relay.as_ref().map_or(&[][..], |r| r.peers.as_slice());
    authorize(peers, peer, request).map_err(|refusal| {
        edge.metrics.relay_refusals.with_label_values(&[refusal.reason()]).inc();
        // The tenant and path are the sender's words: Debug-quoted, so they cannot forge log lines.
        warn!(peer, tenant = ?request.tenant, path = ?request.path, request_id = ?request.request_id,
              reason = refusal.reason(), "relayed request refused: the sender may not relay it");
        wire_error(&refusal.into())
    })
}

impl Backend for RelayBackend {
    fn chat(&self, _request: wire::ChatRequest) -> Result<mpsc::Receiver<wire::Event>, EngineError> {
        Err(RelayBackend::not_an_engine())
    }

    fn embed(&self, _request: wire::EmbedRequest) -> Result<wire::EmbedParts, EngineError> {
        Err(RelayBackend::not_an_engine())
    }

    fn health(&self) -> wire::Health {
        self.edge.upgrade().map(|e| e.relay_health()).unwrap_or_default()
    }

    fn relay(&self, peer: &str, request: RelayRequest) -> Result<mpsc::Receiver<Bytes>, EngineError> {
        let edge =
            self.edge.upgrade().ok_or_else(|| EngineError::new(ErrorCode::Internal, "the edge is shutting down"))?;
        admit_peer(&edge, peer, &request)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            // The answer (or its error) is already in relay frames; the body is copied to the
            // stream as it comes. The peer going away drops the receiver, which ends this task
            // and with it the upstream request.
            let response = tokio::select! {
                r = edge.relay(request) => r,
                () = tx.closed() => return,
            };
            let mut body = response.into_body();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else { continue };
                if tx.send(data).await.is_err() {
                    debug!("relay peer went away mid-answer");
                    return;
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn labels(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    fn relayed(tenant: &str, path: &[&str]) -> RelayRequest {
        RelayRequest {
            request_id: "r-1".into(),
            tenant: tenant.into(),
            client_region: None,
            path: labels(path),
            labels: Vec::new(),
            redacted: false,
            no_cache: false,
            request: Value::Null,
            traceparent: None,
        }
    }

    #[test]
    fn only_listed_peers_relay_from_their_region_for_their_tenants() {
        let peers = [
            RelayPeer { name: "edge-us".into(), region: "us-east".into(), tenants: labels(&["acme"]) },
            RelayPeer { name: "edge-ap".into(), region: "ap-south".into(), tenants: labels(&["acme", "globex"]) },
        ];
        let refused = |peer: &str, r: &RelayRequest| authorize(&peers, peer, r).unwrap_err();
        assert_eq!(authorize(&peers, "edge-us", &relayed("acme", &["us-east"])), Ok(()));
        assert_eq!(authorize(&peers, "edge-ap", &relayed("globex", &["us-east", "ap-south"])), Ok(()));

        let acme = relayed("acme", &["us-east"]);
        for stranger in ["engine-us", "edge-eu", "", "EDGE-US"] {
            assert_eq!(refused(stranger, &acme), RelayRefusal::UnauthorizedPeer(stranger.into()));
        }
        assert!(matches!(
            refused("edge-us", &relayed("acme", &[])),
            RelayRefusal::BadPath { region, path, .. } if region == "us-east" && path == "none"
        ));
        assert!(matches!(
            refused("edge-us", &relayed("acme", &["us-east", "ap-south"])),
            RelayRefusal::BadPath { path, .. } if path == "us-east > ap-south"
        ));
        // The right region elsewhere on the path is not where the request came from.
        assert!(matches!(refused("edge-ap", &relayed("acme", &["ap-south", "us-east"])), RelayRefusal::BadPath { .. }));
        assert_eq!(
            refused("edge-us", &relayed("globex", &["us-east"])),
            RelayRefusal::TenantNotAccepted { peer: "edge-us".into(), tenant: "globex".into() }
        );
        assert_eq!(authorize(&[], "edge-us", &acme), Err(RelayRefusal::UnauthorizedPeer("edge-us".into())));
    }

    #[test]
    fn peer_refusals_answer_403_refused_so_the_origin_goes_on() {
        let refusals = [
            RelayRefusal::UnauthorizedPeer("engine-x".into()),
            RelayRefusal::BadPath { peer: "edge-us".into(), region: "us-east".into(), path: "none".into() },
            RelayRefusal::TenantNotAccepted { peer: "edge-us".into(), tenant: "globex".into() },
        ];
        let reasons: Vec<_> = refusals.iter().map(RelayRefusal::reason).collect();
        assert_eq!(reasons, ["unauthorized_peer", "bad_path", "tenant_not_accepted"]);
        for r in refusals {
            let e = wire_error(&r.into());
            assert_eq!((e.code, e.status), (ErrorCode::Refused, Some(403)));
        }
    }
}
