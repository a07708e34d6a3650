//! The per-request context: one [`Exchange`] per admitted chat request, owned by the request path
//! and handed from phase to phase.
//!
//! It is the one home of what the edge knows about the request: its identity (in its
//! [`Record`], which accounts under it), its tenant, what came with it, the parsed request, the
//! answer side of the tenant's filters and the cache decision. The phases move values into it
//! rather than copying them into carriers of their own; the relay [`Dispatch`] that a peer edge
//! gets is built from it in one place ([`Exchange::dispatch_for_peer`]).

use std::sync::Arc;

use super::ClientBody;

use super::admit::Permits;
use super::cache::{CacheDecision, CacheUse};
use super::record::Record;
use crate::api::relay::Dispatch;
use crate::api::ApiShape;
use crate::chain::AnswerFilter;
use crate::chat::ChatRequest;
use crate::tenant::Tenant;

/// One admitted chat request on its way through the request path. It exists only once the
/// request is admitted ([`super::admit`]): its tenant is known and it holds an in-flight permit.
///
/// The plan is not kept here: it is what [`super::route`] answers, for [`super::cache`] and
/// [`super::dispatch`], and the dispatch driver lends out of it the route that answered. A field
/// would be empty until routing and read through an `Option` after.
pub(super) struct Exchange {
    /// Who the request is for: its cache policy, plugin chain and relay policy, as they were
    /// when it was admitted (a plugin reload does not change them for a request in flight).
    pub tenant: Arc<Tenant>,
    /// What came with the request.
    pub inbound: Inbound,
    /// The request in canonical form: empty until [`super::parse`], redacted by the tenant's
    /// filters in [`super::route`].
    pub request: ChatRequest,
    /// The answer side of the tenant's filters, if it has any (set by [`super::route`]).
    pub answer_filter: Option<AnswerFilter>,
    /// What the client asked of the cache, and what [`super::cache`] made of it.
    pub cache: CacheDecision,
    /// The accounting, and the request's identity: its API shape, id, tenant and model.
    pub record: Record,
    /// The request's places under `node.max_in_flight` and its tenant's concurrency, held until
    /// its answer ends.
    pub permit: Permits,
}

/// What came with a request besides its tenant. For a client's request only its body and
/// region; a relayed one brings the route it took and what the filters before this edge found.
#[derive(Default)]
pub(super) struct Inbound {
    /// The body, until [`super::parse`] reads it.
    pub body: Option<PendingBody>,
    /// The client's region, when known (`x-meridian-client-region`, or the relay frame's).
    pub client_region: Option<String>,
    /// Regions the request passed through, origin first; [`super::route`] adds this one.
    pub path: Vec<String>,
    /// Every label the filters gave it: at the edges before this one and, after
    /// [`super::route`], here.
    pub labels: Vec<String>,
    /// Whether filters redacted anything, before or here.
    pub redacted: bool,
}

/// A request body, read only once the request is admitted.
pub(super) enum PendingBody {
    /// A client's body, still on the wire, and the length its `content-length` declared.
    Http {
        /// The body.
        body: ClientBody,
        /// Its declared length.
        declared: Option<u64>,
    },
    /// A relayed request's canonical JSON, from the relay frame.
    Relayed(serde_json::Value),
}

impl Exchange {
    /// The API shape the client spoke, which its answer and errors use too.
    pub fn api(&self) -> ApiShape {
        self.record.api
    }

    /// What a peer edge gets with the request besides its text, should the plan relay it: the
    /// request's identity, where it has been, what the filters found, and whether the client
    /// kept it out of caches.
    pub fn dispatch_for_peer(&self) -> Dispatch {
        Dispatch {
            request_id: self.record.request_id.clone(),
            tenant: self.tenant.name.to_string(),
            client_region: self.inbound.client_region.clone(),
            labels: self.inbound.labels.clone(),
            redacted: self.inbound.redacted,
            path: self.inbound.path.clone(),
            no_cache: self.cache.requested == Some(CacheUse::Bypass),
            // Set per attempt (`dispatch::first_answer`).
            traceparent: None,
        }
    }
}
