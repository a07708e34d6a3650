//! A ledger entry as the columns both stores hold: scalars as they are, the lists as JSON text.
//! One encoding for SQLite and PostgreSQL, so the two stores hold the same rows.

use super::entry::{AttemptRecord, LedgerEntry, StandingCost, TokenSource};
use super::LedgerError;

/// The `requests` table's columns, in the order of [`Row`]'s fields.
pub(super) const REQUEST_COLUMNS: &str = "ts_ms, request_id, tenant, api, model, served_model, attempts, target, \
     cache_hit, stream, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, token_source, ttft_ms, \
     busy_ms, redactions, labels, router, status, http_status, cost_usd, counterfactual";

/// The `standing_costs` table's columns.
pub(super) const STANDING_COLUMNS: &str = "from_ms, to_ms, target, usd";

/// The schema, for both stores.
pub(super) const SCHEMA: &str = include_str!("schema.sql");

/// One `requests` row.
pub(super) struct Row {
    pub ts_ms: i64,
    pub request_id: String,
    pub tenant: String,
    pub api: String,
    pub model: String,
    pub served_model: Option<String>,
    pub attempts: String,
    pub target: Option<String>,
    pub cache_hit: bool,
    pub stream: bool,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
    pub token_source: &'static str,
    pub ttft_ms: Option<f64>,
    pub busy_ms: Option<f64>,
    pub redactions: i64,
    pub labels: String,
    pub router: Option<String>,
    pub status: String,
    pub http_status: i64,
    pub cost_usd: f64,
    pub counterfactual: String,
}

/// Token counts are far below `i64::MAX`; saturate rather than wrap if one is not.
fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn json<T: serde::Serialize>(value: &T) -> String {
    // Vectors of strings, numbers and plain structs always serialize.
    serde_json::to_string(value).unwrap_or_else(|_| "[]".into())
}

impl Row {
    /// The row of `e`.
    pub fn of(e: &LedgerEntry) -> Row {
        Row {
            ts_ms: e.ts_ms,
            request_id: e.request_id.clone(),
            tenant: e.tenant.clone(),
            api: e.api.clone(),
            model: e.model.clone(),
            served_model: e.served_model.clone(),
            attempts: json(&e.attempts),
            target: e.target.clone(),
            cache_hit: e.cache_hit,
            stream: e.stream,
            input_tokens: count(e.input_tokens),
            output_tokens: count(e.output_tokens),
            cache_read_tokens: count(e.cache_read_tokens),
            cache_write_tokens: count(e.cache_write_tokens),
            token_source: e.token_source.name(),
            ttft_ms: e.ttft_ms,
            busy_ms: e.busy_ms,
            redactions: i64::from(e.redactions),
            labels: json(&e.labels),
            router: e.router.clone(),
            status: e.status.clone(),
            http_status: i64::from(e.http_status),
            cost_usd: e.cost_usd,
            counterfactual: json(&e.counterfactual),
        }
    }
}

/// Reads a `requests` row `$r` selected as [`REQUEST_COLUMNS`] with its method `$get(index)`, a
/// column getter returning a `Result` (each store's own), into a [`ReadRow`].
#[macro_export]
#[doc(hidden)]
macro_rules! read_row {
    ($r:ident . $get:ident) => {{
        ReadRow {
            row: Row {
                ts_ms: $r.$get(0)?,
                request_id: $r.$get(1)?,
                tenant: $r.$get(2)?,
                api: $r.$get(3)?,
                model: $r.$get(4)?,
                served_model: $r.$get(5)?,
                attempts: $r.$get(6)?,
                target: $r.$get(7)?,
                cache_hit: $r.$get(8)?,
                stream: $r.$get(9)?,
                input_tokens: $r.$get(10)?,
                output_tokens: $r.$get(11)?,
                cache_read_tokens: $r.$get(12)?,
                cache_write_tokens: $r.$get(13)?,
                token_source: "",
                ttft_ms: $r.$get(15)?,
                busy_ms: $r.$get(16)?,
                redactions: $r.$get(17)?,
                labels: $r.$get(18)?,
                router: $r.$get(19)?,
                status: $r.$get(20)?,
                http_status: $r.$get(21)?,
                cost_usd: $r.$get(22)?,
                counterfactual: $r.$get(23)?,
            },
            token_source: $r.$get(14)?,
        }
    }};
}

/// A row as read back: the same values, with the token source by name.
pub(super) struct ReadRow {
    pub row: Row,
    pub token_source: String,
}

impl ReadRow {
    /// The entry the row holds; a list column that is not the JSON this module wrote is an error
    /// naming the request.
    pub fn into_entry(self) -> Result<LedgerEntry, LedgerError> {
        let r = self.row;
        let bad = |column: &str, e: serde_json::Error| {
            LedgerError::Corrupt(format!("request {}: column {column}: {e}", r.request_id))
        };
        let attempts: Vec<AttemptRecord> = serde_json::from_str(&r.attempts).map_err(|e| bad("attempts", e))?;
        let labels: Vec<String> = serde_json::from_str(&r.labels).map_err(|e| bad("labels", e))?;
        let counterfactual: Vec<(String, f64)> =
            serde_json::from_str(&r.counterfactual).map_err(|e| bad("counterfactual", e))?;
        let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(LedgerEntry {
            ts_ms: r.ts_ms,
            request_id: r.request_id,
            tenant: r.tenant,
            api: r.api,
            model: r.model,
            served_model: r.served_model,
            attempts,
            target: r.target,
            cache_hit: r.cache_hit,
            stream: r.stream,
            input_tokens: unsigned(r.input_tokens),
            output_tokens: unsigned(r.output_tokens),
            cache_read_tokens: unsigned(r.cache_read_tokens),
            cache_write_tokens: unsigned(r.cache_write_tokens),
            token_source: TokenSource::from_name(&self.token_source),
            ttft_ms: r.ttft_ms,
            busy_ms: r.busy_ms,
            redactions: u32::try_from(r.redactions).unwrap_or(u32::MAX),
            labels,
            router: r.router,
            status: r.status,
            http_status: u16::try_from(r.http_status).unwrap_or(0),
            cost_usd: r.cost_usd,
            counterfactual,
        })
    }
}

/// Per tenant, what was spent from a point in time on (for budgets after a restart).
#[derive(Debug, Clone, PartialEq)]
pub struct Totals {
    /// The tenant.
    pub tenant: String,
    /// USD.
    pub usd: f64,
    /// Tokens, input and output.
    pub tokens: u64,
    /// Requests.
    pub requests: u64,
}

/// A standing cost as its columns.
pub(super) fn standing_of(s: &StandingCost) -> (i64, i64, &str, f64) {
    (s.from_ms, s.to_ms, &s.target, s.usd)
}
