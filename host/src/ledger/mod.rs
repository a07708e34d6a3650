//! The request ledger: one durable record per request ([`LedgerEntry`]), whatever became of
//! it, written off the request path in batches.
//!
//! - The request path hands a finished record to [`Ledger::record`], which never blocks and
//!   never drops: it queues. New requests wait at admission ([`Ledger::ready`]) while the queue
//!   is over `[ledger] queue_capacity`: backpressure, not loss.
//! - A writer task writes the queue at least every `flush_interval_ms` (default 200 ms) in one
//!   transaction. A batch the store refuses (PostgreSQL down, a full disk) is appended to a spill
//!   file in the data directory and written to the store when it takes writes again, also after
//!   a restart. So a record is durable within the flush interval of its request's end; a node
//!   killed with SIGKILL loses at most that interval, and a clean shutdown ([`Ledger::close`])
//!   loses nothing.
//! - Dedicated (`per = "hour"`) targets are paid by the hour, busy or idle: the writer records
//!   their hours as [`StandingCost`]s every `standing_interval_secs`, and their requests carry no
//!   marginal cost. `meridian cost report` spreads the hours over the requests they served.
//! - Records older than `retention_days` are deleted.
//!
//! Stores ([`Store`]): SQLite in write-ahead-log mode (the default, in the node's data
//! directory) or PostgreSQL for a region whose edges share one ledger; one schema
//! (`schema.sql`) for both.

mod entry;
mod postgres;
mod row;
mod sqlite;
mod writer;

use std::path::Path;
use std::sync::Arc;

pub use entry::{AttemptRecord, LedgerEntry, StandingCost, TokenSource};
pub use row::Totals;
pub use writer::{HourlyTarget, Ledger};

/// Why the ledger could not open, write or read.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The store refused or failed.
    #[error("ledger store: {0}")]
    Store(String),
    /// A row that this code did not write.
    #[error("ledger row: {0}")]
    Corrupt(String),
    /// The spill file could not be written or read.
    #[error("ledger spill file: {0}")]
    Spill(String),
    /// An unknown store URL.
    #[error("ledger url `{0}`: expected `sqlite:PATH` or `postgres://…`")]
    Url(String),
}

/// Where ledger records are kept: an SQLite file or a PostgreSQL database.
pub struct Store(Backend);

enum Backend {
    Sqlite(sqlite::Sqlite),
    // Opened once per process; the box keeps the enum a pointer wide.
    Postgres(Box<postgres::Postgres>),
}

impl Store {
    /// Opens the store at `url` (`sqlite:PATH`, `postgres://…` or `postgresql://…`), creating
    /// its schema.
    pub async fn open(url: &str) -> Result<Store, LedgerError> {
        if let Some(path) = url.strip_prefix("sqlite:") {
            Ok(Store(Backend::Sqlite(sqlite::Sqlite::open(Path::new(path)).await?)))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Store(Backend::Postgres(Box::new(postgres::Postgres::open(url).await?))))
        } else {
            Err(LedgerError::Url(url.to_string()))
        }
    }

    /// Writes a batch of requests and standing costs, all or nothing.
    pub async fn insert(&self, entries: Arc<[LedgerEntry]>, standing: Arc<[StandingCost]>) -> Result<(), LedgerError> {
        match &self.0 {
            Backend::Sqlite(s) => s.insert(entries, standing).await,
            Backend::Postgres(s) => s.insert(entries, standing).await,
        }
    }

    /// The requests that arrived in `[from_ms, to_ms)` (milliseconds since the Unix epoch),
    /// oldest first.
    pub async fn load(&self, from_ms: i64, to_ms: i64) -> Result<Vec<LedgerEntry>, LedgerError> {
        match &self.0 {
            Backend::Sqlite(s) => s.load(from_ms, to_ms).await,
            Backend::Postgres(s) => s.load(from_ms, to_ms).await,
        }
    }

    /// The standing costs whose stretch ends in `(from_ms, to_ms]`.
    pub async fn standing(&self, from_ms: i64, to_ms: i64) -> Result<Vec<StandingCost>, LedgerError> {
        match &self.0 {
            Backend::Sqlite(s) => s.standing(from_ms, to_ms).await,
            Backend::Postgres(s) => s.standing(from_ms, to_ms).await,
        }
    }

    /// Per tenant, what the requests that arrived at or after `since_ms` spent.
    pub async fn totals_since(&self, since_ms: i64) -> Result<Vec<Totals>, LedgerError> {
        match &self.0 {
            Backend::Sqlite(s) => s.totals_since(since_ms).await,
            Backend::Postgres(s) => s.totals_since(since_ms).await,
        }
    }

    /// Deletes what is older than `before_ms`; returns how many requests went.
    pub async fn purge(&self, before_ms: i64) -> Result<u64, LedgerError> {
        match &self.0 {
            Backend::Sqlite(s) => s.purge(before_ms).await,
            Backend::Postgres(s) => s.purge(before_ms).await,
        }
    }

    /// How many requests it holds.
    pub async fn count(&self) -> Result<u64, LedgerError> {
        match &self.0 {
            Backend::Sqlite(s) => s.count().await,
            Backend::Postgres(s) => s.count().await,
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests;
