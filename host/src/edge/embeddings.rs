//! `POST /v1/embeddings`, beside the chat request path: admitted like a chat request (the
//! tenant's key and rate, the in-flight limit), then served by the model's engine targets in
//! fallback order. Tenant filters are not run: an engine runs on the operator's own
//! infrastructure, and a vector of placeholders would be worthless for similarity.
//!
//! Up to 2 048 texts a request (`openai::MAX_EMBEDDING_INPUTS`): an engine target's client packs
//! them into as few engine requests as its frames hold and takes each answer in parts, while the
//! engine reads them in bounded runs (`meridian_engine::client::EngineClient::embed`), so neither
//! side holds more than one frame of the exchange in flight. The vectors are written as floats or,
//! as the client asks (`encoding_format`), as base64 of little-endian float32s.

use std::time::Instant;

use super::ClientBody;
use hyper::{Request, Response, StatusCode};

use super::admit::permit;
use super::dispatch::first_answer;
use super::parse::{declared_length, read_body, served_model};
use super::respond::{json_response, with_header};
use super::trace::Trace;
use super::{Body, Edge};
use crate::api::openai;
use crate::dispatch::Policy;
use crate::error::GatewayError;
use crate::routes::{Plan, Routing};

/// Answers `POST /v1/embeddings`.
pub(super) async fn embeddings(edge: &Edge, req: Request<ClientBody>) -> Result<Response<Body>, GatewayError> {
    let tenant = edge.loaded.load().tenants.authenticate(req.headers())?;
    tenant.admit()?;
    let _permit = permit(edge)?;
    let declared = declared_length(req.headers());
    let body = read_body(edge, req.into_body(), declared).await?;
    let (request, input) = openai::parse_embeddings(&body)?;
    let model = served_model(edge, &request.model)?;
    // Filters do not run on embeddings, so they carry no labels; the price cap still holds.
    let policy = Policy {
        allowed_regions: tenant.chain.allowed_regions.clone(),
        price_cap_usd: tenant.chain.price_cap_usd,
        relay: tenant.relay,
        path: vec![edge.config.node.region.clone()],
        max_hops: edge.max_hops(),
        ..Policy::default()
    };
    let plan = Plan::new(model, &Routing::Static, None, &policy, Instant::now())?;
    // The ledger records chat requests; an embedding request's attempts are in the metrics only,
    // and it is not traced.
    let untraced = Trace::Off(None);
    let answered = first_answer(edge, &plan, &mut Vec::new(), &untraced, |route, _| {
        route.target.embed(input.clone(), &route.upstream_model)
    })
    .await?;
    let (answer, route) = (answered.value, answered.route);
    let encoding = request.encoding_format.unwrap_or_default();
    let body = openai::encode_embeddings(&request.model, &answer.data, answer.prompt_tokens, encoding);
    Ok(with_header(json_response(StatusCode::OK, body), "x-meridian-target", &route.target.name))
}
