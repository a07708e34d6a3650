//! Edge-to-edge relay: one region's edge hands a request to another region's edge, which
//! dispatches it with its own targets, over the cluster's mutual-TLS QUIC protocol
//! (`engine/PROTOCOL.md`, `REQUEST` with `op = "relay"`, answered with `EVENT` frames).
//!
//! What crosses the link is the request as the origin's filters left it: placeholders in place of
//! what they redacted (the originals stay at the origin, which restores them in the answer), with
//! the labels and redaction state, so the receiving edge's routers apply the same residency rule.
//! Before anything is relayed the tenant's [`RelayPolicy`] is checked, at both ends.
//!
//! Loops: a relayed request carries the regions it passed through. An edge refuses one that lists
//! its own region or took more than its `relay.max_hops`, and never relays onward to a listed
//! region or past the limit, so a request cannot bounce between regions.

use std::sync::{Arc, Weak};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use meridian_engine::api::{self as wire, Backend, BoxFuture, EngineError, ErrorCode, RelayRequest};
use meridian_engine::wire::Frame;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::dispatch::carries_unredacted_pii;
use crate::chat::{ChatRequest, ChatResponse, StreamEvent};
use crate::config::{RelayPeer, RelayPolicy};
use crate::edge::Edge;
use crate::error::GatewayError;

/// Why a request may not be relayed, or was refused as relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayRefusal {
    /// It came back to a region it had passed through.
    #[error("relay loop: the request already passed through `{region}` (path: {path})")]
    Loop {
        /// The region seen twice.
        region: String,
        /// Its path, origin first.
        path: String,
    },
    /// It took more relays than allowed.
    #[error("relay hop limit of {max} reached (path: {path})")]
    HopLimit {
        /// The limit.
        max: u8,
        /// Its path, origin first.
        path: String,
    },
    /// The receiving edge does not know the tenant.
    #[error("tenant `{0}` is not configured on this edge")]
    UnknownTenant(String),
    /// The tenant's relay policy forbids it.
    #[error("not relayed: {0}")]
    Policy(&'static str),
    /// The sending node (its certificate's name) is not one of this edge's `[[relay.peers]]`:
    /// an engine, or an edge this one does not take relays from.
    #[error("node `{0}` is not a peer edge this edge takes relayed requests from")]
    UnauthorizedPeer(String),
    /// The request's path does not end in the sending peer's region, where it must come from.
    #[error("edge `{peer}` relays from region `{region}`, but the request's path does not end there (path: {path})")]
    BadPath {
        /// The sending peer.
        peer: String,
        /// Its region, as this edge's config lists it.
        region: String,
        /// The request's path, origin first (`none` when empty).
        path: String,
    },
    /// The sending peer may not relay requests of this tenant here.
    #[error("edge `{peer}` may not relay requests of tenant `{tenant}` here")]
    TenantNotAccepted {
        /// The sending peer.
        peer: String,
        /// The request's tenant.
        tenant: String,
    },
}

impl RelayRefusal {
    /// The HTTP status it answers with: 508 for loops (another target may take the request),
    /// 403 for a tenant the peer does not serve or a sender that may not relay it (the origin
    /// goes on to its next target), 451 for a policy refusal.
    pub fn status(&self) -> u16 {
        match self {
            RelayRefusal::Loop { .. } | RelayRefusal::HopLimit { .. } => 508,
            RelayRefusal::UnknownTenant(_)
            | RelayRefusal::UnauthorizedPeer(_)
            | RelayRefusal::BadPath { .. }
            | RelayRefusal::TenantNotAccepted { .. } => 403,
            RelayRefusal::Policy(_) => 451,
        }
    }

    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            RelayRefusal::Loop { .. } => "loop",
            RelayRefusal::HopLimit { .. } => "hop_limit",
            RelayRefusal::UnknownTenant(_) => "unknown_tenant",
            RelayRefusal::Policy(_) => "policy",
            RelayRefusal::UnauthorizedPeer(_) => "unauthorized_peer",
            RelayRefusal::BadPath { .. } => "bad_path",
            RelayRefusal::TenantNotAccepted { .. } => "tenant_not_accepted",
        }
    }
}

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

/// Why a request would not be relayed under `policy`, given its labels; `None` if it may be.
pub fn policy_forbids(policy: RelayPolicy, labels: &[String]) -> Option<RelayRefusal> {
    match policy {
        RelayPolicy::Allowed => None,
        RelayPolicy::Never => Some(RelayRefusal::Policy("the tenant's requests never leave their region")),
        RelayPolicy::Redacted if carries_unredacted_pii(labels) => Some(RelayRefusal::Policy(
            "the request carries unredacted personal data, and the tenant's policy requires redaction before it leaves the region",
        )),
        RelayPolicy::Redacted => None,
    }
}

/// How a request reached this edge: empty for one from a client, else from the relay frame.
#[derive(Debug, Clone, Default)]
pub struct Via {
    /// Regions it passed through before this one, origin first.
    pub path: Vec<String>,
    /// Labels given by the filters of the edges before this one.
    pub labels: Vec<String>,
    /// Whether those filters redacted anything.
    pub redacted: bool,
}

/// What a peer edge gets with a request besides its text: who it is for, what the filters found,
/// and where it has been (which peer edges may take it is the dispatch core's
/// [`crate::dispatch::Policy`]).
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// The request's id.
    pub request_id: String,
    /// The tenant.
    pub tenant: String,
    /// The client's region, when known.
    pub client_region: Option<String>,
    /// Every label the filters gave it, here and before.
    pub labels: Vec<String>,
    /// Whether anything was redacted, here or before.
    pub redacted: bool,
    /// Regions it passed through, this one last.
    pub path: Vec<String>,
    /// Whether the client asked that no cache answer the request or keep its answer.
    pub no_cache: bool,
}

impl Dispatch {
    /// The relay frame for `req` under the peer's model name.
    pub fn request(&self, req: &ChatRequest, upstream_model: &str) -> RelayRequest {
        let mut chat = req.clone();
        chat.model = upstream_model.to_string();
        let anthropic_extra = std::mem::take(&mut chat.anthropic_extra);
        RelayRequest {
            request_id: self.request_id.clone(),
            tenant: self.tenant.clone(),
            client_region: self.client_region.clone(),
            path: self.path.clone(),
            labels: self.labels.clone(),
            redacted: self.redacted,
            no_cache: self.no_cache,
            // A canonical request always serializes (string keys, finite numbers from parsed JSON).
            request: serde_json::to_value(Relayed { chat, anthropic_extra }).unwrap_or(Value::Null),
        }
    }
}

/// A canonical request as it travels: the OpenAI-form body, plus what an Anthropic client sent
/// that has no OpenAI field (kept out of that body so no OpenAI upstream ever sees it).
#[derive(Serialize, Deserialize)]
struct Relayed {
    chat: ChatRequest,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    anthropic_extra: Map<String, Value>,
}

/// Parses a relayed request body (the `request` of a [`RelayRequest`], as bytes), validated as a
/// client's request would be.
pub fn parse_request(body: &[u8]) -> Result<ChatRequest, GatewayError> {
    let Relayed { mut chat, anthropic_extra } = crate::api::parse_json(body)?;
    chat.anthropic_extra = anthropic_extra;
    crate::api::openai::validate(&chat)?;
    Ok(chat)
}

/// One stream event as the JSON of an `EVENT` frame.
fn event_frame(event: &StreamEvent, out: &mut BytesMut) {
    // Events are plain data with string keys: serializing them cannot fail.
    let json = serde_json::to_vec(event).unwrap_or_default();
    Frame::Event(Bytes::from(json)).encode_into(out);
}

/// The stream event in an `EVENT` frame's JSON.
pub fn decode_event(json: &[u8]) -> Result<StreamEvent, String> {
    serde_json::from_slice(json).map_err(|e| format!("relayed event: {e}"))
}

/// A whole answer as the frames of a relayed answer.
pub fn encode_response(resp: &ChatResponse) -> Bytes {
    let mut out = BytesMut::new();
    for event in resp.to_events() {
        event_frame(&event, &mut out);
    }
    out.freeze()
}

/// An error as an `ERROR` frame.
pub fn error_body(err: &GatewayError) -> Bytes {
    Frame::Error(wire_error(err)).encode()
}

/// The wire error for a request-path error: the HTTP status the edge would have answered with,
/// under the code that tells the origin whether another target may take the request.
pub fn wire_error(err: &GatewayError) -> EngineError {
    let status = err.status().as_u16();
    let code = match err {
        // A loop found further along comes back as 508 too.
        _ if status == 508 => ErrorCode::LoopDetected,
        GatewayError::UnknownModel(_) => ErrorCode::UnknownModel,
        GatewayError::Overloaded | GatewayError::RateLimited { .. } => ErrorCode::Overloaded,
        _ if status >= 500 => ErrorCode::Internal,
        _ => ErrorCode::Refused,
    };
    EngineError::with_status(code, status, err.to_string())
}

/// Writes a streamed answer's events as `EVENT` frames; a failure after the first becomes an
/// `ERROR` frame.
#[derive(Debug, Default)]
pub struct StreamEncoder;

impl StreamEncoder {
    /// Encodes one event.
    pub fn event(&mut self, event: &StreamEvent, out: &mut BytesMut) {
        event_frame(event, out);
    }

    /// Nothing: the end of the QUIC stream ends the answer.
    pub fn finish(&mut self, _out: &mut BytesMut) {}

    /// Ends a broken stream.
    pub fn error(&mut self, err: &GatewayError, out: &mut BytesMut) {
        Frame::Error(wire_error(err)).encode_into(out);
    }
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

    fn embed(&self, _request: wire::EmbedRequest) -> BoxFuture<'_, Result<wire::Embeddings, EngineError>> {
        Box::pin(async { Err(RelayBackend::not_an_engine()) })
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
    use super::*;
    use crate::chat::{FinishReason, Usage};

    fn labels(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_policy_decides_on_labels() {
        let pii = labels(&["pii.email", "pii.phone.redacted"]);
        let redacted = labels(&["pii.email.redacted"]);
        assert_eq!(policy_forbids(RelayPolicy::Allowed, &pii), None);
        assert_eq!(policy_forbids(RelayPolicy::Redacted, &redacted), None);
        assert_eq!(policy_forbids(RelayPolicy::Redacted, &pii).map(|r| r.status()), Some(451));
        assert_eq!(policy_forbids(RelayPolicy::Never, &[]).map(|r| r.status()), Some(451));
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

    #[test]
    fn events_and_requests_survive_the_trip() {
        let events = [
            StreamEvent::Start { id: "c1".into(), model: "m".into(), created: 7, input_tokens: Some(3) },
            StreamEvent::Text("héllo".into()),
            StreamEvent::ToolCallStart { index: 0, id: "t".into(), name: "f".into() },
            StreamEvent::ToolCallArgs { index: 0, json: "{\"a\":1}".into() },
            StreamEvent::Finish(FinishReason::ToolCalls),
            StreamEvent::Usage(Usage { input_tokens: 3, output_tokens: 4 }),
        ];
        let mut out = BytesMut::new();
        let mut enc = StreamEncoder;
        events.iter().for_each(|e| enc.event(e, &mut out));
        let mut dec = meridian_engine::wire::Decoder::default();
        dec.push(&out);
        for e in &events {
            let Some(Frame::Event(json)) = dec.next_frame().unwrap() else { panic!("an EVENT frame") };
            assert_eq!(&decode_event(&json).unwrap(), e);
        }

        let mut req: ChatRequest = serde_json::from_value(
            serde_json::json!({"model": "front", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        req.anthropic_extra.insert("top_k".into(), 5.into());
        let dispatch = Dispatch {
            request_id: "r".into(),
            tenant: "acme".into(),
            client_region: None,
            labels: Vec::new(),
            redacted: false,
            path: vec!["us-east".into()],
            no_cache: false,
        };
        let relayed = dispatch.request(&req, "back");
        let body = serde_json::to_vec(&relayed.request).unwrap();
        let back = parse_request(&body).unwrap();
        assert_eq!(back.model, "back");
        assert_eq!(back.anthropic_extra.get("top_k"), Some(&5.into()));
        assert!(!serde_json::to_string(&back).unwrap().contains("top_k"), "never in the OpenAI-form body");
        assert!(parse_request(br#"{"chat": {"model": "", "messages": []}}"#).is_err());
    }

    #[test]
    fn errors_keep_their_status_and_say_whether_to_go_on() {
        let e = wire_error(&RelayRefusal::Loop { region: "eu".into(), path: "us > eu".into() }.into());
        assert_eq!((e.code, e.status), (ErrorCode::LoopDetected, Some(508)));
        let e = wire_error(&GatewayError::Rejected { status: 451, reason: "no".into() });
        assert_eq!((e.code, e.status), (ErrorCode::Refused, Some(451)));
        let e = wire_error(&GatewayError::Overloaded);
        assert_eq!((e.code, e.status), (ErrorCode::Overloaded, Some(503)));
        let e = wire_error(&GatewayError::UnknownModel("m".into()));
        assert_eq!(e.code, ErrorCode::UnknownModel);
    }
}
