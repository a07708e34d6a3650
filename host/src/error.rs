//! Typed errors of the request path. They become HTTP statuses and error bodies only at the edge
//! (`api::ApiShape::error_response`).

use std::time::Duration;

use hyper::StatusCode;

use crate::relay::RelayRefusal;

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
}

/// Why one upstream attempt failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// TCP or TLS connection failed.
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
        /// `response` (first byte) or `stream chunk`.
        phase: &'static str,
        /// The limit that passed.
        after: Duration,
    },
    /// The upstream answered with an error status.
    #[error("target `{target}` answered {status}: {message}")]
    Status {
        /// The target.
        target: String,
        /// Its status.
        status: u16,
        /// Its error message (secrets scrubbed).
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
}

impl UpstreamError {
    /// Whether the next target should be tried (when nothing has reached the client yet).
    ///
    /// A 4xx other than 401/403/404/408/429 means the request itself is at fault; another target
    /// would refuse it too, so it goes back to the client.
    pub fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => matches!(status, 401 | 403 | 404 | 408 | 429 | 500..),
            _ => true,
        }
    }

    /// The target it came from.
    pub fn target(&self) -> &str {
        match self {
            UpstreamError::Connect { target, .. }
            | UpstreamError::Timeout { target, .. }
            | UpstreamError::Status { target, .. }
            | UpstreamError::Protocol { target, .. } => target,
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Status { status: 429, .. } => "rate_limited",
            UpstreamError::Status { status: 500.., .. } => "server_error",
            UpstreamError::Status { .. } => "client_error",
            UpstreamError::Protocol { .. } => "protocol",
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
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Overloaded | GatewayError::FilterFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Blocked { .. } => StatusCode::BAD_REQUEST,
            GatewayError::Rejected { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::FORBIDDEN),
            GatewayError::Relay(r) => StatusCode::from_u16(r.status()).unwrap_or(StatusCode::FORBIDDEN),
            GatewayError::Upstream(e) => match e {
                UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                UpstreamError::Status { status: 429, .. } => StatusCode::TOO_MANY_REQUESTS,
                // A relay loop found further along: the client learns it was one.
                UpstreamError::Status { status: 508, .. } => StatusCode::LOOP_DETECTED,
                // The request itself was refused: the client should see that, not a 502.
                UpstreamError::Status { status, .. } if !e.is_retryable() => {
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
                }
                _ => StatusCode::BAD_GATEWAY,
            },
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
            GatewayError::Unauthorized => ErrorClass::Authentication,
            GatewayError::NotFound { .. } => ErrorClass::NotFound,
            GatewayError::RateLimited { .. } => ErrorClass::RateLimit,
            GatewayError::Overloaded => ErrorClass::Overloaded,
            GatewayError::BodyTimeout(_) => ErrorClass::Timeout,
            GatewayError::Upstream(e) => match e {
                UpstreamError::Timeout { .. } => ErrorClass::Timeout,
                UpstreamError::Status { status: 429, .. } => ErrorClass::RateLimit,
                UpstreamError::Status { .. } if !e.is_retryable() => ErrorClass::InvalidRequest,
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
            GatewayError::Overloaded => Some(1),
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
            GatewayError::Blocked { .. } => "content_blocked",
            GatewayError::FilterFailed { .. } => "filter_failed",
            GatewayError::Rejected { .. } => "rejected_by_router",
            GatewayError::Relay(RelayRefusal::Loop { .. } | RelayRefusal::HopLimit { .. }) => "relay_loop",
            GatewayError::Relay(_) => "relay_refused",
            GatewayError::Upstream(e) => match e {
                UpstreamError::Timeout { .. } => "upstream_timeout",
                _ => "upstream_error",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: u16) -> UpstreamError {
        UpstreamError::Status { target: "t".into(), status: s, message: "m".into() }
    }

    #[test]
    fn upstream_statuses_map_to_what_the_client_can_act_on() {
        assert_eq!(GatewayError::from(status(429)).status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(GatewayError::from(status(500)).status(), StatusCode::BAD_GATEWAY);
        assert_eq!(GatewayError::from(status(401)).status(), StatusCode::BAD_GATEWAY);
        assert_eq!(GatewayError::from(status(400)).status(), StatusCode::BAD_REQUEST);
        let timeout = UpstreamError::Timeout { target: "t".into(), phase: "response", after: Duration::from_secs(1) };
        assert_eq!(GatewayError::from(timeout).status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(status(503).is_retryable() && status(429).is_retryable() && !status(422).is_retryable());
    }
}
