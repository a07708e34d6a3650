//! A ledger entry as the columns both stores hold: scalars as they are, the lists as JSON text.
//! One encoding for SQLite and PostgreSQL, so the two stores hold the same rows.

use super::entry::{LedgerEntry, StandingCost};
use super::LedgerError;

/// The `requests` table's columns, in the order of [`Row`]'s fields.
pub(super) const REQUEST_COLUMNS: &str = "ts_ms, request_id, tenant, api, model, served_model, attempts, target, \
     cache_hit, stream, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, token_source, ttft_ms, \
     busy_ms, redactions, labels, router, status, http_status, cost_usd, counterfactual";

/// The `standing_costs` table's columns.
pub(super) const STANDING_COLUMNS: &str = "from_ms, to_ms, target, usd";

/// The schema, for both stores.
pub(super) const SCHEMA: &str = include_str!("schema.sql");

/// One `requests` row to write, borrowing the entry's text: the writer binds it without copying.
pub(super) struct Row<'a> {
    pub ts_ms: i64,
    pub request_id: &'a str,
    pub tenant: &'a str,
    pub api: &'a str,
    pub model: &'a str,
    pub served_model: Option<&'a str>,
    pub attempts: String,
    pub target: Option<&'a str>,
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
    pub router: Option<&'a str>,
    pub status: &'a str,
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

impl<'a> Row<'a> {
    /// The row of `e`.
    pub fn of(e: &'a LedgerEntry) -> Row<'a> {
        Row {
            ts_ms: e.ts_ms,
            request_id: &e.request_id,
            tenant: &e.tenant,
            api: &e.api,
            model: &e.model,
            served_model: e.served_model.as_deref(),
            attempts: json(&e.attempts),
            target: e.target.as_deref(),
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
            router: e.router.as_deref(),
            status: &e.status,
            http_status: i64::from(e.http_status),
            cost_usd: e.cost_usd,
            counterfactual: json(&e.counterfactual),
        }
    }
}

/// Reads a `requests` row `$r` selected as [`REQUEST_COLUMNS`] with its method `$get(index)`, a
/// column getter returning a `Result` (each store's own), into a [`ReadRow`]: the entry with its
/// list columns still JSON text.
#[macro_export]
#[doc(hidden)]
macro_rules! read_row {
    ($r:ident . $get:ident) => {{
        let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
        ReadRow {
            entry: LedgerEntry {
                ts_ms: $r.$get(0)?,
                request_id: $r.$get(1)?,
                tenant: $r.$get(2)?,
                api: $r.$get(3)?,
                model: $r.$get(4)?,
                served_model: $r.$get(5)?,
                attempts: Vec::new(),
                target: $r.$get(7)?,
                cache_hit: $r.$get(8)?,
                stream: $r.$get(9)?,
                input_tokens: unsigned($r.$get(10)?),
                output_tokens: unsigned($r.$get(11)?),
                cache_read_tokens: unsigned($r.$get(12)?),
                cache_write_tokens: unsigned($r.$get(13)?),
                token_source: TokenSource::from_name(&$r.$get::<_, String>(14)?),
                ttft_ms: $r.$get(15)?,
                busy_ms: $r.$get(16)?,
                redactions: u32::try_from($r.$get::<_, i64>(17)?).unwrap_or(u32::MAX),
                labels: Vec::new(),
                router: $r.$get(19)?,
                status: $r.$get(20)?,
                http_status: u16::try_from($r.$get::<_, i64>(21)?).unwrap_or(0),
                cost_usd: $r.$get(22)?,
                counterfactual: Vec::new(),
            },
            attempts: $r.$get(6)?,
            labels: $r.$get(18)?,
            counterfactual: $r.$get(23)?,
        }
    }};
}

/// A row as read back: the entry, and its list columns as the JSON text they are stored as.
pub(super) struct ReadRow {
    pub entry: LedgerEntry,
    pub attempts: String,
    pub labels: String,
    pub counterfactual: String,
}

impl ReadRow {
    /// The entry the row holds; a list column that is not the JSON this module wrote is an error
    /// naming the request.
    pub fn into_entry(self) -> Result<LedgerEntry, LedgerError> {
        let mut e = self.entry;
        let bad = |column: &str, err: serde_json::Error| {
            LedgerError::Corrupt(format!("request {}: column {column}: {err}", e.request_id))
        };
        let attempts = serde_json::from_str(&self.attempts).map_err(|err| bad("attempts", err))?;
        let labels = serde_json::from_str(&self.labels).map_err(|err| bad("labels", err))?;
        let counterfactual = serde_json::from_str(&self.counterfactual).map_err(|err| bad("counterfactual", err))?;
        e.attempts = attempts;
        e.labels = labels;
        e.counterfactual = counterfactual;
        Ok(e)
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
