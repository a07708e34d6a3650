//! Typed errors of the request path. They become HTTP statuses and error bodies only at the edge
//! (`api::ApiShape::error_response`).

use std::time::Duration;

use hyper::StatusCode;

/// Everything that can end a client request without an answer.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The body is not JSON.
    #[error("malformed JSON body: {0}")]
    MalformedJson(String),
    /// A field has the wrong type or value; `param` names it.
    #[error("invalid field `{param}`: {message}")]
    InvalidField {
        /// The field's path, e.g. `messages[1].content`.
        param: String,
        /// What is wrong with it.
        message: String,
    },
    /// No or unknown API key.
    #[error("invalid API key")]
    Unauthorized,
    /// The model is not served by this edge.
    #[error("the model `{0}` does not exist or you do not have access to it")]
    UnknownModel(String),
    /// No such endpoint.
    #[error("no route for {method} {path}")]
    NotFound {
        /// The request method.
        method: String,
        /// The request path.
        path: String,
    },
    /// The body is larger than `node.max_body_bytes`.
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The client sent its body too slowly.
    #[error("request body not received within {0:?}")]
    BodyTimeout(Duration),
    /// The tenant is over its request rate.
    #[error("rate limit exceeded for tenant `{tenant}`; retry after {retry_after:?}")]
    RateLimited {
        /// The tenant.
        tenant: String,
        /// When a request would be admitted again.
        retry_after: Duration,
    },
    /// The node is at `node.max_in_flight`.
    #[error("the edge is overloaded; retry shortly")]
    Overloaded,
    /// The node is shutting down: a new request during the drain, or one still running when the
    /// grace period (`node.shutdown_grace_ms`) ended.
    #[error("the edge is shutting down; retry on another edge")]
    ShuttingDown,
    /// The tenant already has as many requests in flight as it may (`max_concurrent_requests`).
    #[error("tenant `{tenant}` already has {limit} requests in flight; retry when one ends")]
    TenantConcurrency {
        /// The tenant.
        tenant: String,
        /// Its limit.
        limit: u32,
    },
    /// One of the tenant's budgets (`[tenants.budgets]`) cannot cover the request, or the rest
    /// of a stream.
    #[error("budget exhausted for tenant `{tenant}`: {limit} is spent; it resets in {retry_after:?}")]
    BudgetExhausted {
        /// The tenant.
        tenant: String,
        /// The limit, as its config key names it (`usd_per_day`, `requests_per_minute`, …).
        limit: &'static str,
        /// Until the limit's period resets.
        retry_after: Duration,
    },
    /// The shared budget counters (`budgets.redis_url`) did not answer, so the request is refused
    /// rather than run unaccounted.
    #[error("the budget counters are unavailable: {0}")]
    BudgetUnavailable(String),
    /// Every target failed; the last failure is kept.
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    /// A privacy filter refused the request (or a piece of its answer).
    #[error("blocked by a privacy filter: {reason}")]
    Blocked {
        /// The filter's reason.
        reason: String,
    },
    /// A privacy filter failed, so the request is refused rather than sent unfiltered.
    #[error("the privacy filter `{plugin}` failed, so the request was not sent: {message}")]
    FilterFailed {
        /// The plugin (name@version).
        plugin: String,
        /// What went wrong.
        message: String,
    },
    /// The tenant's router refused the request.
    #[error("{reason}")]
    Rejected {
        /// The status the router chose (400–599).
        status: u16,
        /// Its reason.
        reason: String,
    },
    /// The request may not be relayed where its targets are (a loop, the hop limit, the tenant's
    /// relay policy), or a relayed request was refused on arrival.
    #[error(transparent)]
    Relay(#[from] RelayRefusal),
    /// No target may take the request under the tenant's guarantees (see `dispatch::policy`).
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// What the request path does after a failed attempt, decided where the failure was seen (in the
/// manner of pingora's `Error`): never derived later from a status number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The target failed: try the next one, and count it against the target's health.
    Next,
    /// The target cannot serve this kind of request (tools or images to an engine, embeddings to
    /// a chat API): try the next one; the target is not at fault.
    Skip,
    /// The request itself was refused, and another target would refuse it too: it goes back to
    /// the client. The target is alive.
    Stop,
}

/// Why one upstream attempt failed. Each variant carries its retry decision
/// ([`UpstreamError::retry`]) and the status the client sees if it is the last word
/// ([`GatewayError::status`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpstreamError {
    /// TCP, TLS or QUIC connection failed.
    #[error("target `{target}`: connection failed: {message}")]
    Connect {
        /// The target.
        target: String,
        /// The cause.
        message: String,
    },
    /// No answer in time.
    #[error("target `{target}`: no {phase} within {after:?}")]
    Timeout {
        /// The target.
        target: String,
        /// `response` (first byte), `first token`, `stream chunk` or `whole answer`.
        phase: &'static str,
        /// The limit that passed.
        after: Duration,
    },
    /// A managed API's rate limit (HTTP 429).
    #[error("target `{target}` answered 429: {message}")]
    RateLimited {
        /// The target.
        target: String,
        /// Its message (secrets scrubbed).
        message: String,
    },
    /// An engine or peer edge at capacity; `status` is what it stands for (429 or 503).
    #[error("target `{target}` is overloaded: {message}")]
    Overloaded {
        /// The target.
        target: String,
        /// 429 (its queue is full, or the tenant's rate at the peer) or 503 (its in-flight limit).
        status: u16,
        /// Its message.
        message: String,
    },
    /// The target failed the request (5xx, an engine's internal error, a broken frame).
    #[error("target `{target}` failed ({status}): {message}")]
    Failed {
        /// The target.
        target: String,
        /// Its HTTP status, or the one its error code stands for.
        status: u16,
        /// Its message (secrets scrubbed).
        message: String,
    },
    /// The target is misconfigured for this node (a managed API answering 401/403/404: a wrong
    /// key, URL or model name; an engine that does not know the model).
    #[error("target `{target}` answered {status}: {message}")]
    Misconfigured {
        /// The target.
        target: String,
        /// Its status.
        status: u16,
        /// Its message (secrets scrubbed).
        message: String,
    },
    /// A peer edge that will not take requests of this tenant from this edge.
    #[error("target `{target}` refused the relay: {message}")]
    PeerRefused {
        /// The target.
        target: String,
        /// Its reason.
        message: String,
    },
    /// A relay loop found further along.
    #[error("target `{target}`: {message}")]
    Loop {
        /// The target.
        target: String,
        /// The path it saw.
        message: String,
    },
    /// The target refused the request itself (a 4xx that another target would give too: a bad
    /// field, a context too long, a peer's policy). It goes back to the client with `status`.
    #[error("target `{target}` answered {status}: {message}")]
    Rejected {
        /// The target.
        target: String,
        /// The status the client gets.
        status: u16,
        /// Its message (secrets scrubbed).
        message: String,
    },
    /// The target cannot serve this kind of request; the next one may.
    #[error("target `{target}` cannot serve this request: {message}")]
    Unsupported {
        /// The target.
        target: String,
        /// What it cannot serve.
        message: String,
    },
    /// The upstream's answer could not be understood, or its stream broke off.
    #[error("target `{target}`: {message}")]
    Protocol {
        /// The target.
        target: String,
        /// What went wrong.
        message: String,
    },
    /// The upstream's answer outgrew one of the target's bounds (`max_stream_bytes`,
    /// `max_event_bytes`).
    #[error("target `{target}`: {what} exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The target.
        target: String,
        /// What outgrew its bound: `the stream`, `an event`.
        what: &'static str,
        /// The bound.
        limit: u64,
    },
    /// The request does not fit the target's protocol frame (an engine's or peer edge's QUIC
    /// frames hold at most `limit` bytes), so it was not sent. The request's size is at fault, not
    /// the target; a target with larger frames (a managed API) may take it.
    #[error("target `{target}` cannot take a request this large: {message}")]
    RequestTooLarge {
        /// The target.
        target: String,
        /// The size and the limit.
        message: String,
    },
    /// The target is shutting down and refused the request before starting it: the next target
    /// may take it, and the target has not failed.
    #[error("target `{target}` is shutting down: {message}")]
    Draining {
        /// The target.
        target: String,
        /// Its message.
        message: String,
    },
}

impl UpstreamError {
    /// What to do next (when nothing has reached the client yet).
    pub fn retry(&self) -> Retry {
        match self {
            UpstreamError::Rejected { .. } => Retry::Stop,
            UpstreamError::Unsupported { .. }
            | UpstreamError::RequestTooLarge { .. }
            | UpstreamError::Draining { .. } => Retry::Skip,
            _ => Retry::Next,
        }
    }

    /// A managed API's error status, classified where it was read: 429 is its rate limit,
    /// 401/403/404 a target misconfigured for this node, 408 and 5xx its failure, any other 4xx a
    /// refusal of the request itself.
    pub fn from_http_status(target: &str, status: u16, message: String) -> UpstreamError {
        let target = target.to_string();
        match status {
            429 => UpstreamError::RateLimited { target, message },
            401 | 403 | 404 => UpstreamError::Misconfigured { target, status, message },
            400..=499 if status != 408 => UpstreamError::Rejected { target, status, message },
            _ => UpstreamError::Failed { target, status, message },
        }
    }

    /// The target it came from.
    pub fn target(&self) -> &str {
        match self {
            UpstreamError::Connect { target, .. }
            | UpstreamError::Timeout { target, .. }
            | UpstreamError::RateLimited { target, .. }
            | UpstreamError::Overloaded { target, .. }
            | UpstreamError::Failed { target, .. }
            | UpstreamError::Misconfigured { target, .. }
            | UpstreamError::PeerRefused { target, .. }
            | UpstreamError::Loop { target, .. }
            | UpstreamError::Rejected { target, .. }
            | UpstreamError::Unsupported { target, .. }
            | UpstreamError::Protocol { target, .. }
            | UpstreamError::TooLarge { target, .. }
            | UpstreamError::RequestTooLarge { target, .. }
            | UpstreamError::Draining { target, .. } => target,
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::RateLimited { .. } => "rate_limited",
            UpstreamError::Overloaded { .. } => "overloaded",
            UpstreamError::Failed { .. } => "server_error",
            UpstreamError::Misconfigured { .. } => "misconfigured",
            UpstreamError::PeerRefused { .. } => "peer_refused",
            UpstreamError::Loop { .. } => "loop",
            UpstreamError::Rejected { .. } => "client_error",
            UpstreamError::Unsupported { .. } => "unsupported",
            UpstreamError::Protocol { .. } => "protocol",
            UpstreamError::TooLarge { .. } => "too_large",
            UpstreamError::RequestTooLarge { .. } => "request_too_large",
            UpstreamError::Draining { .. } => "draining",
        }
    }

    /// The status the client gets when this is the request's last word.
    fn client_status(&self) -> StatusCode {
        let from = |s: u16| StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY);
        match self {
            UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            UpstreamError::Overloaded { status, .. } | UpstreamError::Rejected { status, .. } => from(*status),
            // A relay loop found further along: the client learns it was one.
            UpstreamError::Loop { .. } => StatusCode::LOOP_DETECTED,
            // No target of the model serves this kind of request.
            UpstreamError::Unsupported { .. } => StatusCode::BAD_REQUEST,
            UpstreamError::RequestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            // Every target that could take it is shutting down: a retry finds a replacement.
            UpstreamError::Draining { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// Why a candidate may not take the request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Exclusion {
    /// Unredacted personal data, and the target is outside the allowed regions.
    #[error("target `{target}` is in {region}, outside the tenant's allowed regions [{allowed}], and the request carries unredacted personal data")]
    Residency {
        /// The target.
        target: String,
        /// Its region (`an unknown region` when none is configured).
        region: String,
        /// The allowed regions.
        allowed: String,
    },
    /// The estimate is over the tenant's cap.
    #[error("target `{target}` would cost about ${cost:.6}, over the tenant's price cap of ${cap:.6}")]
    PriceCap {
        /// The target.
        target: String,
        /// Its estimate.
        cost: f64,
        /// The cap.
        cap: f64,
    },
    /// A peer edge that may not take the request.
    #[error(transparent)]
    Relay(RelayRefusal),
}

/// Why a request has no target to go to.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// Every target the plan could use breaks one of the tenant's guarantees; `first` is why the
    /// first of them was excluded.
    #[error("no target may take this request: {first}")]
    Policy {
        /// The first exclusion, in plan order.
        first: Exclusion,
    },
    /// The router failed, and no target of the static order keeps the tenant's guarantees.
    #[error("the router failed ({reason}), and no target of the static order may take this request: {first}")]
    RouterFailed {
        /// The router's failure.
        reason: String,
        /// Why the first static target was excluded.
        first: Exclusion,
    },
    /// The model has no targets to plan over.
    #[error("the model has no targets")]
    NoTargets,
}

impl Refusal {
    /// The HTTP status: 451 for residency, 402 for the price cap, the relay refusal's own (451
    /// policy, 508 loop), and 503 when the router failed.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::RouterFailed { .. } | Refusal::NoTargets => 503,
            Refusal::Policy { first: Exclusion::Residency { .. } } => 451,
            Refusal::Policy { first: Exclusion::PriceCap { .. } } => 402,
            Refusal::Policy { first: Exclusion::Relay(r) } => r.status(),
        }
    }

    /// A short label for metrics and the error body's `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::RouterFailed { .. } => "router_failed",
            Refusal::NoTargets => "no_targets",
            Refusal::Policy { first: Exclusion::Residency { .. } } => "residency",
            Refusal::Policy { first: Exclusion::PriceCap { .. } } => "price_cap",
            Refusal::Policy { first: Exclusion::Relay(RelayRefusal::Loop { .. } | RelayRefusal::HopLimit { .. }) } => {
                "relay_loop"
            }
            Refusal::Policy { first: Exclusion::Relay(_) } => "relay_refused",
        }
    }
}

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

/// The category of an error, shared by both API shapes' error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 400, 404 (model), 413.
    InvalidRequest,
    /// 401.
    Authentication,
    /// 404 (route).
    NotFound,
    /// 429.
    RateLimit,
    /// 503.
    Overloaded,
    /// 408, 504.
    Timeout,
    /// 502 and other upstream failures.
    Upstream,
}

impl GatewayError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::MalformedJson(_) | GatewayError::InvalidField { .. } => StatusCode::BAD_REQUEST,
            GatewayError::Unauthorized => StatusCode::UNAUTHORIZED,
            GatewayError::UnknownModel(_) | GatewayError::NotFound { .. } => StatusCode::NOT_FOUND,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            GatewayError::RateLimited { .. }
            | GatewayError::TenantConcurrency { .. }
            | GatewayError::BudgetExhausted { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Overloaded
            | GatewayError::ShuttingDown
            | GatewayError::FilterFailed { .. }
            | GatewayError::BudgetUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Blocked { .. } => StatusCode::BAD_REQUEST,
            GatewayError::Rejected { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::FORBIDDEN),
            GatewayError::Relay(r) => StatusCode::from_u16(r.status()).unwrap_or(StatusCode::FORBIDDEN),
            GatewayError::Refused(r) => StatusCode::from_u16(r.status()).unwrap_or(StatusCode::FORBIDDEN),
            GatewayError::Upstream(e) => e.client_status(),
        }
    }

    /// Its category.
    pub fn class(&self) -> ErrorClass {
        match self {
            GatewayError::MalformedJson(_)
            | GatewayError::InvalidField { .. }
            | GatewayError::UnknownModel(_)
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::Blocked { .. } => ErrorClass::InvalidRequest,
            GatewayError::FilterFailed { .. } => ErrorClass::Overloaded,
            GatewayError::Rejected { status, .. } => match status {
                429 => ErrorClass::RateLimit,
                500.. => ErrorClass::Upstream,
                _ => ErrorClass::InvalidRequest,
            },
            GatewayError::Relay(RelayRefusal::UnknownTenant(_)) => ErrorClass::Authentication,
            GatewayError::Relay(RelayRefusal::Policy(_)) => ErrorClass::InvalidRequest,
            GatewayError::Relay(_) => ErrorClass::Upstream,
            GatewayError::Refused(Refusal::RouterFailed { .. } | Refusal::NoTargets) => ErrorClass::Overloaded,
            GatewayError::Refused(Refusal::Policy { first: Exclusion::Relay(RelayRefusal::Policy(_)) }) => {
                ErrorClass::InvalidRequest
            }
            GatewayError::Refused(Refusal::Policy { first: Exclusion::Relay(_) }) => ErrorClass::Upstream,
            GatewayError::Refused(Refusal::Policy { .. }) => ErrorClass::InvalidRequest,
            GatewayError::Unauthorized => ErrorClass::Authentication,
            GatewayError::NotFound { .. } => ErrorClass::NotFound,
            GatewayError::RateLimited { .. }
            | GatewayError::TenantConcurrency { .. }
            | GatewayError::BudgetExhausted { .. } => ErrorClass::RateLimit,
            GatewayError::Overloaded | GatewayError::ShuttingDown | GatewayError::BudgetUnavailable(_) => {
                ErrorClass::Overloaded
            }
            GatewayError::BodyTimeout(_) => ErrorClass::Timeout,
            GatewayError::Upstream(e) => match e.client_status().as_u16() {
                504 => ErrorClass::Timeout,
                429 => ErrorClass::RateLimit,
                503 => ErrorClass::Overloaded,
                400..=499 => ErrorClass::InvalidRequest,
                _ => ErrorClass::Upstream,
            },
        }
    }

    /// The offending field, for OpenAI's `param`.
    pub fn param(&self) -> Option<&str> {
        match self {
            GatewayError::InvalidField { param, .. } => Some(param),
            GatewayError::UnknownModel(_) => Some("model"),
            _ => None,
        }
    }

    /// Seconds for a `retry-after` header.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::RateLimited { retry_after, .. } => Some(retry_after.as_secs().max(1)),
            // Whole seconds, rounded up: a client that waits that long finds the period reset.
            GatewayError::BudgetExhausted { retry_after, .. } => {
                Some(retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0))
            }
            // Nothing says when one of the tenant's requests ends; a second is a fair first wait.
            GatewayError::Overloaded | GatewayError::TenantConcurrency { .. } | GatewayError::BudgetUnavailable(_) => {
                Some(1)
            }
            _ => None,
        }
    }

    /// A short label for metrics' `status` values and logs.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::MalformedJson(_) => "malformed_json",
            GatewayError::InvalidField { .. } => "invalid_field",
            GatewayError::Unauthorized => "unauthorized",
            GatewayError::UnknownModel(_) => "model_not_found",
            GatewayError::NotFound { .. } => "not_found",
            GatewayError::PayloadTooLarge { .. } => "payload_too_large",
            GatewayError::BodyTimeout(_) => "body_timeout",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::Overloaded => "overloaded",
            GatewayError::ShuttingDown => "shutting_down",
            GatewayError::TenantConcurrency { .. } => "tenant_concurrency",
            GatewayError::BudgetExhausted { .. } => "budget_exhausted",
            GatewayError::BudgetUnavailable(_) => "budget_unavailable",
            GatewayError::Blocked { .. } => "content_blocked",
            GatewayError::FilterFailed { .. } => "filter_failed",
            GatewayError::Rejected { .. } => "rejected_by_router",
            GatewayError::Relay(RelayRefusal::Loop { .. } | RelayRefusal::HopLimit { .. }) => "relay_loop",
            GatewayError::Relay(_) => "relay_refused",
            GatewayError::Refused(r) => r.code(),
            GatewayError::Upstream(e) => match e {
                UpstreamError::Timeout { .. } => "upstream_timeout",
                UpstreamError::RequestTooLarge { .. } => "payload_too_large",
                _ => "upstream_error",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: u16) -> UpstreamError {
        UpstreamError::from_http_status("t", s, "m".into())
    }

    #[test]
    fn upstream_statuses_map_to_what_the_client_can_act_on() {
        assert_eq!(GatewayError::from(status(429)).status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(GatewayError::from(status(500)).status(), StatusCode::BAD_GATEWAY);
        assert_eq!(GatewayError::from(status(401)).status(), StatusCode::BAD_GATEWAY);
        assert_eq!(GatewayError::from(status(400)).status(), StatusCode::BAD_REQUEST);
        let timeout = UpstreamError::Timeout { target: "t".into(), phase: "response", after: Duration::from_secs(1) };
        assert_eq!(GatewayError::from(timeout).status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            (status(503).retry(), status(429).retry(), status(404).retry()),
            (Retry::Next, Retry::Next, Retry::Next)
        );
        assert_eq!(status(422).retry(), Retry::Stop);
        let unsupported = UpstreamError::Unsupported { target: "e".into(), message: "tools".into() };
        assert_eq!(
            (unsupported.retry(), GatewayError::from(unsupported).status()),
            (Retry::Skip, StatusCode::BAD_REQUEST)
        );
    }

    #[test]
    fn a_request_too_large_for_a_target_is_the_clients_413_and_no_fault_of_the_target() {
        let too_large = UpstreamError::RequestTooLarge { target: "engine".into(), message: "2 MiB of 1".into() };
        assert_eq!(too_large.retry(), Retry::Skip);
        let err = GatewayError::from(too_large);
        assert_eq!(
            (err.status(), err.class(), err.code()),
            (StatusCode::PAYLOAD_TOO_LARGE, ErrorClass::InvalidRequest, "payload_too_large")
        );
        let draining = UpstreamError::Draining { target: "engine".into(), message: "stopping".into() };
        assert_eq!(draining.retry(), Retry::Skip);
        assert_eq!(GatewayError::from(draining).status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
