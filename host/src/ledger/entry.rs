//! One row of the ledger: what one request did and what it cost.

use serde::{Deserialize, Serialize};

/// One attempt at a target, as the dispatch driver saw it end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The target's name.
    pub target: String,
    /// How its capacity is bought (`managed`, `serverless`, `dedicated`, `remote_edge`).
    pub kind: String,
    /// Its region, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// `ok`, or the attempt's typed failure (`timeout`, `rate_limited`, …).
    pub outcome: String,
}

/// Where a record's token counts came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// The upstream's own usage report.
    Upstream,
    /// Estimated from the text (4 bytes a token): the upstream reported none.
    Estimate,
    /// No target was reached: nothing to count.
    None,
}

impl TokenSource {
    /// Its name in the ledger.
    pub fn name(self) -> &'static str {
        match self {
            TokenSource::Upstream => "upstream",
            TokenSource::Estimate => "estimate",
            TokenSource::None => "none",
        }
    }

    /// The source named `name` (what [`TokenSource::name`] wrote).
    pub fn from_name(name: &str) -> Self {
        match name {
            "upstream" => TokenSource::Upstream,
            "estimate" => TokenSource::Estimate,
            _ => TokenSource::None,
        }
    }
}

/// What one request did, written once when it ends: answered, failed, refused, answered from
/// the cache, relayed in or out, or abandoned by its client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// When the request arrived, in milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// The request's id (`x-request-id`).
    pub request_id: String,
    /// The tenant; `unknown` for a request refused before authentication.
    pub tenant: String,
    /// The API shape the client spoke: `openai`, `anthropic`, or `relay` for a request relayed in
    /// from a peer edge.
    pub api: String,
    /// The model the client asked for (empty when the body was never parsed).
    pub model: String,
    /// The model name sent to the target that answered.
    pub served_model: Option<String>,
    /// Every attempt, in order. An attempt at a `remote_edge` target is a relay out.
    pub attempts: Vec<AttemptRecord>,
    /// The target that answered (`cache` for a cache hit).
    pub target: Option<String>,
    /// Whether the prompt cache answered.
    pub cache_hit: bool,
    /// Whether the answer was streamed.
    pub stream: bool,
    /// Prompt tokens, cached ones included.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// Prompt tokens the provider read from its prompt cache.
    pub cache_read_tokens: u64,
    /// Prompt tokens the provider wrote to its prompt cache.
    pub cache_write_tokens: u64,
    /// Where the token counts came from.
    pub token_source: TokenSource,
    /// Time to first token as the client saw it, in milliseconds.
    pub ttft_ms: Option<f64>,
    /// The answering target's busy time, from dispatch to its last byte, in milliseconds (not the
    /// client's wall time: no body read, filters, cache wait or earlier failed attempts).
    pub busy_ms: Option<f64>,
    /// Values the tenant's filters redacted.
    pub redactions: u32,
    /// The labels the filters gave the request.
    pub labels: Vec<String>,
    /// What ordered the targets: `static`, `router:NAME`, or `router_failed:WHY`.
    pub router: Option<String>,
    /// `ok`, an error's code, `stream_error`, `budget_exhausted` or `client_closed`.
    pub status: String,
    /// The HTTP status the client got (200 for a stream that began).
    pub http_status: u16,
    /// What the request cost under the answering target's price model, in USD. A dedicated
    /// target's hours are in the standing costs instead (its marginal cost is 0 here).
    pub cost_usd: f64,
    /// What the same request would have cost on each other target configured for the model:
    /// `(target, usd)`.
    pub counterfactual: Vec<(String, f64)>,
}

/// What a dedicated target cost over a stretch of wall time, busy or idle: its hourly price over
/// the time the edge was up and configured with it. Written periodically beside the requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StandingCost {
    /// Start of the stretch, in milliseconds since the Unix epoch.
    pub from_ms: i64,
    /// Its end.
    pub to_ms: i64,
    /// The target.
    pub target: String,
    /// USD for the stretch.
    pub usd: f64,
}
