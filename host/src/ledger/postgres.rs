//! The shared store of a region's edges: PostgreSQL, with the same schema as SQLite. A batch
//! is one `INSERT … SELECT FROM UNNEST(…)` statement per table in one transaction: one round
//! trip per column set, however many rows.

use std::sync::Arc;

use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};
use tracing::warn;

use super::entry::{LedgerEntry, StandingCost, TokenSource};
use super::row::{ReadRow, Row, Totals, REQUEST_COLUMNS, SCHEMA, STANDING_COLUMNS};
use super::LedgerError;
use crate::read_row;

/// A PostgreSQL ledger on one connection, reopened when it breaks.
pub(super) struct Postgres {
    url: String,
    client: Mutex<Option<Client>>,
}

fn db(e: tokio_postgres::Error) -> LedgerError {
    LedgerError::Store(e.to_string())
}

async fn connect(url: &str) -> Result<Client, LedgerError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.map_err(db)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %e, "ledger: PostgreSQL connection ended");
        }
    });
    Ok(client)
}

impl Postgres {
    /// Connects and creates the schema.
    pub async fn open(url: &str) -> Result<Postgres, LedgerError> {
        let client = connect(url).await?;
        client.batch_execute(SCHEMA).await.map_err(db)?;
        Ok(Postgres { url: url.to_string(), client: Mutex::new(Some(client)) })
    }

    /// The connection, reopened if the last one closed.
    async fn client(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Client>, LedgerError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(connect(&self.url).await?);
        }
        Ok(tokio::sync::MutexGuard::map(guard, |c| c.as_mut().expect("connected above")))
    }

    /// Writes a batch in one transaction.
    pub async fn insert(&self, entries: Arc<[LedgerEntry]>, standing: Arc<[StandingCost]>) -> Result<(), LedgerError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        if !entries.is_empty() {
            let rows: Vec<Row> = entries.iter().map(Row::of).collect();
            macro_rules! column {
                ($field:ident) => {
                    rows.iter().map(|r| r.$field.clone()).collect::<Vec<_>>()
                };
            }
            tx.execute(
                &format!(
                    "INSERT INTO requests ({REQUEST_COLUMNS}) SELECT * FROM UNNEST($1::bigint[], $2::text[], \
                     $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::boolean[], \
                     $10::boolean[], $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[], $15::text[], \
                     $16::float8[], $17::float8[], $18::bigint[], $19::text[], $20::text[], $21::text[], \
                     $22::bigint[], $23::float8[], $24::text[])"
                ),
                &[
                    &column!(ts_ms),
                    &column!(request_id),
                    &column!(tenant),
                    &column!(api),
                    &column!(model),
                    &column!(served_model),
                    &column!(attempts),
                    &column!(target),
                    &column!(cache_hit),
                    &column!(stream),
                    &column!(input_tokens),
                    &column!(output_tokens),
                    &column!(cache_read_tokens),
                    &column!(cache_write_tokens),
                    &column!(token_source),
                    &column!(ttft_ms),
                    &column!(busy_ms),
                    &column!(redactions),
                    &column!(labels),
                    &column!(router),
                    &column!(status),
                    &column!(http_status),
                    &column!(cost_usd),
                    &column!(counterfactual),
                ],
            )
            .await
            .map_err(db)?;
        }
        if !standing.is_empty() {
            let from: Vec<i64> = standing.iter().map(|s| s.from_ms).collect();
            let to: Vec<i64> = standing.iter().map(|s| s.to_ms).collect();
            let target: Vec<&str> = standing.iter().map(|s| s.target.as_str()).collect();
            let usd: Vec<f64> = standing.iter().map(|s| s.usd).collect();
            tx.execute(
                &format!(
                    "INSERT INTO standing_costs ({STANDING_COLUMNS}) SELECT * FROM UNNEST($1::bigint[], \
                     $2::bigint[], $3::text[], $4::float8[])"
                ),
                &[&from, &to, &target, &usd],
            )
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    /// The requests that arrived in `[from_ms, to_ms)`, oldest first.
    pub async fn load(&self, from_ms: i64, to_ms: i64) -> Result<Vec<LedgerEntry>, LedgerError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE ts_ms >= $1 AND ts_ms < $2 ORDER BY ts_ms"),
                &[&from_ms, &to_ms],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| -> Result<LedgerEntry, LedgerError> {
                let read: Result<ReadRow, tokio_postgres::Error> = (|| Ok(read_row!(r.try_get)))();
                read.map_err(db)?.into_entry()
            })
            .collect()
    }

    /// The standing costs whose stretch ends in `(from_ms, to_ms]`.
    pub async fn standing(&self, from_ms: i64, to_ms: i64) -> Result<Vec<StandingCost>, LedgerError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {STANDING_COLUMNS} FROM standing_costs WHERE to_ms > $1 AND to_ms <= $2 ORDER BY to_ms"
                ),
                &[&from_ms, &to_ms],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(StandingCost {
                    from_ms: r.try_get(0).map_err(db)?,
                    to_ms: r.try_get(1).map_err(db)?,
                    target: r.try_get(2).map_err(db)?,
                    usd: r.try_get(3).map_err(db)?,
                })
            })
            .collect()
    }

    /// Per tenant, the spend of requests that arrived at or after `since_ms`.
    pub async fn totals_since(&self, since_ms: i64) -> Result<Vec<Totals>, LedgerError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT tenant, SUM(cost_usd)::float8, SUM(input_tokens + output_tokens)::bigint, COUNT(*)::bigint \
                 FROM requests WHERE ts_ms >= $1 GROUP BY tenant ORDER BY tenant",
                &[&since_ms],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(Totals {
                    tenant: r.try_get(0).map_err(db)?,
                    usd: r.try_get::<_, Option<f64>>(1).map_err(db)?.unwrap_or(0.0),
                    tokens: u64::try_from(r.try_get::<_, Option<i64>>(2).map_err(db)?.unwrap_or(0)).unwrap_or(0),
                    requests: u64::try_from(r.try_get::<_, i64>(3).map_err(db)?).unwrap_or(0),
                })
            })
            .collect()
    }

    /// Deletes requests and standing costs older than `before_ms`; returns the requests deleted.
    pub async fn purge(&self, before_ms: i64) -> Result<u64, LedgerError> {
        let client = self.client().await?;
        let n = client.execute("DELETE FROM requests WHERE ts_ms < $1", &[&before_ms]).await.map_err(db)?;
        client.execute("DELETE FROM standing_costs WHERE to_ms < $1", &[&before_ms]).await.map_err(db)?;
        Ok(n)
    }

    /// How many requests it holds.
    pub async fn count(&self) -> Result<u64, LedgerError> {
        let client = self.client().await?;
        let row = client.query_one("SELECT COUNT(*)::bigint FROM requests", &[]).await.map_err(db)?;
        Ok(u64::try_from(row.try_get::<_, i64>(0).map_err(db)?).unwrap_or(0))
    }
}
