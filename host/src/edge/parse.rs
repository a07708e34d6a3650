//! Phase 2 of the request path: parsing. The body of an admitted request is read within
//! `node.max_body_bytes` and `node.body_read_timeout_ms`, parsed and validated in the client's
//! API shape into the canonical [`crate::chat::ChatRequest`], and its model looked up among those
//! this edge serves. A body is read once, and only after admission.

use std::sync::Arc;
use std::time::Duration;

use super::ClientBody;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::header::{HeaderMap, CONTENT_LENGTH};

use super::context::{Exchange, PendingBody};
use super::Edge;
use crate::error::GatewayError;
use crate::routes::ModelRoute;

/// Reads and parses the exchange's body into `cx.request`, and returns the model it asks for.
pub(super) async fn parse(edge: &Edge, cx: &mut Exchange) -> Result<Arc<ModelRoute>, GatewayError> {
    let body = match cx.inbound.body.take() {
        Some(PendingBody::Http { body, declared }) => read_body(edge, body, declared).await?,
        // Re-encoding the parsed JSON value cannot fail; the relayed request is then validated
        // as a client's would be.
        Some(PendingBody::Relayed(request)) => Bytes::from(serde_json::to_vec(&request).unwrap_or_default()),
        // Read already: nothing left (the path parses once).
        None => Bytes::new(),
    };
    let request = cx.api().parse_request(&body)?;
    cx.record.model.clone_from(&request.model);
    cx.record.prompt_tokens = request.estimated_prompt_tokens();
    cx.record.stream = request.is_stream();
    let model = served_model(edge, &request.model)?;
    cx.request = request;
    Ok(model)
}

/// The model of that client-facing name, if this edge serves it.
pub(super) fn served_model(edge: &Edge, name: &str) -> Result<Arc<ModelRoute>, GatewayError> {
    edge.models.get(name).cloned().ok_or_else(|| GatewayError::UnknownModel(name.to_string()))
}

/// The body's length as its `content-length` declares it, if it does.
pub(super) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
}

/// Reads a client's body: refused at once when it declares more than `node.max_body_bytes`, cut
/// off when it sends more, and timed out when it is slower than `node.body_read_timeout_ms`.
pub(super) async fn read_body(edge: &Edge, body: ClientBody, declared: Option<u64>) -> Result<Bytes, GatewayError> {
    let limit = edge.config.node.max_body_bytes;
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    let after = Duration::from_millis(edge.config.node.body_read_timeout_ms);
    match tokio::time::timeout(after, Limited::new(body, limit).collect()).await {
        Err(_) => Err(GatewayError::BodyTimeout(after)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(GatewayError::PayloadTooLarge { limit }),
        Ok(Err(e)) => Err(GatewayError::MalformedJson(format!("could not read the request body: {e}"))),
    }
}
