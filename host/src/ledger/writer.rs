//! The ledger's writer: a queue the request path appends to, and one task that empties it into
//! the store in batches, spills what the store refuses, records dedicated targets' hours and
//! deletes what is past retention.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::entry::{LedgerEntry, StandingCost};
use super::{now_ms, LedgerError, Store};
use crate::config::LedgerConfig;
use crate::metrics::LedgerMetrics;

/// Records written in one transaction at most; a fuller queue wakes the writer early.
const BATCH: usize = 4096;
/// How often retention is applied.
const PURGE_EVERY: Duration = Duration::from_secs(3600);
/// How long a closing ledger may take to write what it holds.
const CLOSE_WITHIN: Duration = Duration::from_secs(30);
/// The spill file's name in the data directory.
const SPILL_FILE: &str = "ledger-spill.jsonl";

/// The node's ledger: [`Ledger::record`] queues, a writer task stores.
pub struct Ledger {
    shared: Arc<Shared>,
    store: Arc<Store>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    queue: Mutex<Vec<LedgerEntry>>,
    /// Records queued and not yet taken by the writer.
    queued: AtomicUsize,
    capacity: usize,
    /// Wakes the writer: a full batch is waiting, or the node is closing.
    wake: Notify,
    /// Wakes admissions waiting for room in the queue.
    room: Notify,
    closing: AtomicBool,
    metrics: LedgerMetrics,
}

/// A dedicated target, paid by the hour.
#[derive(Debug, Clone)]
pub struct HourlyTarget {
    /// Its name.
    pub name: String,
    /// USD per hour.
    pub usd_per_hour: f64,
}

impl Ledger {
    /// Opens the store, writes what an earlier run spilled, and starts the writer. `hourly` are
    /// the dedicated targets whose hours it records.
    pub async fn open(
        config: &LedgerConfig,
        url: &str,
        hourly: Vec<HourlyTarget>,
        metrics: LedgerMetrics,
    ) -> Result<Ledger, LedgerError> {
        let store = Arc::new(Store::open(url).await?);
        let spill = Spill { path: config.dir.join(SPILL_FILE) };
        // What an earlier run could not store goes in before anything new.
        spill.drain(&store).await?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::with_capacity(BATCH)),
            queued: AtomicUsize::new(0),
            capacity: config.queue_capacity,
            wake: Notify::new(),
            room: Notify::new(),
            closing: AtomicBool::new(false),
            metrics,
        });
        let writer = Writer {
            shared: Arc::clone(&shared),
            store: Arc::clone(&store),
            spill,
            hourly,
            standing_since: now_ms(),
            flush: Duration::from_millis(config.flush_interval_ms),
            standing_every: Duration::from_secs(config.standing_interval_secs),
            retention_ms: i64::from(config.retention_days) * 86_400_000,
        };
        writer.apply_retention().await;
        info!(url = %redact_url(url), "ledger open");
        Ok(Ledger { shared, store, writer: Mutex::new(Some(tokio::spawn(writer.run()))) })
    }

    /// Queues a finished request's record. Never blocks on the store and never drops.
    pub fn record(&self, entry: LedgerEntry) {
        let s = &self.shared;
        let n = {
            let mut q = s.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            q.push(entry);
            q.len()
        };
        s.queued.fetch_add(1, Ordering::Relaxed);
        s.metrics.queue.inc();
        if n >= BATCH {
            s.wake.notify_one();
        }
    }

    /// Waits while the queue is over its capacity: the request path calls it before admitting a
    /// request, so a writer that falls behind slows admissions instead of losing records.
    pub async fn ready(&self) {
        let s = &self.shared;
        loop {
            if s.queued.load(Ordering::Relaxed) < s.capacity {
                return;
            }
            let room = s.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if s.queued.load(Ordering::Relaxed) < s.capacity {
                return;
            }
            s.wake.notify_one();
            room.await;
        }
    }

    /// The store, for reading.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Writes everything queued, the dedicated targets' hours up to now included, and stops the
    /// writer. Records queued after this are not written. A node whose store and disk both refuse
    /// its records still stops, after [`CLOSE_WITHIN`], saying how many it could not keep.
    pub async fn close(&self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        let writer = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let Some(mut writer) = writer else { return };
        match tokio::time::timeout(CLOSE_WITHIN, &mut writer).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "ledger writer ended abnormally"),
            Err(_) => {
                writer.abort();
                let lost = self.shared.queued.load(Ordering::SeqCst);
                error!(
                    records = lost,
                    "ledger: neither the store nor the spill file took these records before shutdown"
                );
            }
        }
    }
}

/// The URL without a password, for logs.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// The writer task's state.
struct Writer {
    shared: Arc<Shared>,
    store: Arc<Store>,
    spill: Spill,
    hourly: Vec<HourlyTarget>,
    standing_since: i64,
    flush: Duration,
    standing_every: Duration,
    retention_ms: i64,
}

impl Writer {
    async fn run(mut self) {
        // Each timer first fires one period from now: retention was applied at open, and nothing
        // is queued yet.
        let every = |period: Duration| tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut flush = every(self.flush);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut standing = every(self.standing_every);
        let mut purge = every(PURGE_EVERY);
        loop {
            let mut hours = false;
            let mut retention = false;
            tokio::select! {
                _ = flush.tick() => {}
                () = self.shared.wake.notified() => {}
                _ = standing.tick() => hours = true,
                _ = purge.tick() => retention = true,
            }
            let closing = self.shared.closing.load(Ordering::SeqCst);
            let batch = self.take();
            let standing_costs = if hours || closing { self.standing_costs() } else { Vec::new() };
            if !batch.is_empty() || !standing_costs.is_empty() {
                self.write(batch, standing_costs).await;
            }
            if retention {
                self.apply_retention().await;
            }
            if closing && self.shared.queued.load(Ordering::SeqCst) == 0 {
                return;
            }
        }
    }

    /// Deletes what is older than the retention period, if there is one.
    async fn apply_retention(&self) {
        if self.retention_ms == 0 {
            return;
        }
        match self.store.purge(now_ms() - self.retention_ms).await {
            Ok(n) if n > 0 => info!(deleted = n, "ledger: records past retention deleted"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "ledger: retention could not be applied"),
        }
    }

    /// Everything queued, up to a batch.
    fn take(&self) -> Vec<LedgerEntry> {
        let s = &self.shared;
        let batch = {
            let mut q = s.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if q.len() <= BATCH {
                std::mem::replace(&mut *q, Vec::with_capacity(BATCH))
            } else {
                let rest = q.split_off(BATCH);
                std::mem::replace(&mut *q, rest)
            }
        };
        s.queued.fetch_sub(batch.len(), Ordering::SeqCst);
        s.metrics.queue.sub(i64::try_from(batch.len()).unwrap_or(i64::MAX));
        s.room.notify_waiters();
        if s.queued.load(Ordering::SeqCst) >= BATCH {
            // More than a batch waits: come back at once.
            s.wake.notify_one();
        }
        batch
    }

    /// The dedicated targets' hours since the last call.
    fn standing_costs(&mut self) -> Vec<StandingCost> {
        let now = now_ms();
        let from = std::mem::replace(&mut self.standing_since, now);
        if now <= from {
            return Vec::new();
        }
        let hours = (now - from) as f64 / 3_600_000.0;
        self.hourly
            .iter()
            .map(|t| StandingCost { from_ms: from, to_ms: now, target: t.name.clone(), usd: t.usd_per_hour * hours })
            .collect()
    }

    /// Stores a batch; what the store refuses goes to the spill file, and once the store takes
    /// writes again the spill file goes in first.
    async fn write(&self, entries: Vec<LedgerEntry>, standing: Vec<StandingCost>) {
        let m = &self.shared.metrics;
        let n = entries.len() as u64;
        let entries: Arc<[LedgerEntry]> = entries.into();
        let standing: Arc<[StandingCost]> = standing.into();
        if self.spill.exists() {
            if let Err(e) = self.spill.drain(&self.store).await {
                debug!(error = %e, "ledger: the store still refuses the spilled records");
            }
        }
        let stored = if self.spill.exists() {
            // Keep the order: new records go behind the spilled ones.
            Err(LedgerError::Store("spilled records are waiting".into()))
        } else {
            self.store.insert(Arc::clone(&entries), Arc::clone(&standing)).await
        };
        match stored {
            Ok(()) => {
                m.records.with_label_values(&["written"]).inc_by(n);
                self.count_standing(&standing);
            }
            Err(e) => match self.spill.append(&entries, &standing) {
                Ok(()) => {
                    warn!(error = %e, records = n, "ledger: the store refused a batch; spilled to disk");
                    m.records.with_label_values(&["spilled"]).inc_by(n);
                    self.count_standing(&standing);
                }
                // Neither the store nor the disk takes it: keep it queued and try again, which
                // holds admissions back once the queue is full.
                Err(spill) => {
                    warn!(error = %e, spill = %spill, records = n, "ledger: cannot store or spill; retrying");
                    self.requeue(&entries);
                    tokio::time::sleep(self.flush).await;
                }
            },
        }
    }

    fn count_standing(&self, standing: &[StandingCost]) {
        for s in standing {
            self.shared.metrics.standing_cost.with_label_values(&[&s.target]).inc_by(s.usd);
        }
    }

    /// Puts a batch back at the front of the queue.
    fn requeue(&self, entries: &[LedgerEntry]) {
        let s = &self.shared;
        let mut q = s.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let newer = std::mem::take(&mut *q);
        q.extend(entries.iter().cloned());
        q.extend(newer);
        s.queued.fetch_add(entries.len(), Ordering::SeqCst);
        s.metrics.queue.add(i64::try_from(entries.len()).unwrap_or(i64::MAX));
    }
}

/// Records the store refused, as JSON lines in the data directory, until it takes them.
struct Spill {
    path: PathBuf,
}

/// One line of the spill file: one refused batch.
#[derive(Serialize, Deserialize)]
struct Spilled {
    entries: Vec<LedgerEntry>,
    standing: Vec<StandingCost>,
}

impl Spill {
    fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Appends a batch and syncs it to disk.
    fn append(&self, entries: &[LedgerEntry], standing: &[StandingCost]) -> Result<(), LedgerError> {
        let err = |e: std::io::Error| LedgerError::Spill(format!("{}: {e}", self.path.display()));
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let line = serde_json::to_string(&Spilled { entries: entries.to_vec(), standing: standing.to_vec() })
            .map_err(|e| LedgerError::Spill(e.to_string()))?;
        let mut file = OpenOptions::new().create(true).append(true).open(&self.path).map_err(err)?;
        file.write_all(line.as_bytes()).map_err(err)?;
        file.write_all(b"\n").map_err(err)?;
        file.sync_data().map_err(err)
    }

    /// Writes every spilled batch to the store in one transaction, then removes the file. A
    /// torn last line (the node was killed mid-write) is skipped with a warning.
    async fn drain(&self, store: &Store) -> Result<(), LedgerError> {
        let Some((entries, standing)) = read_spill(&self.path)? else { return Ok(()) };
        let n = entries.len();
        store.insert(entries.into(), standing.into()).await?;
        std::fs::remove_file(&self.path).map_err(|e| LedgerError::Spill(format!("{}: {e}", self.path.display())))?;
        info!(records = n, "ledger: spilled records stored");
        Ok(())
    }
}

type SpillContents = (Vec<LedgerEntry>, Vec<StandingCost>);

fn read_spill(path: &Path) -> Result<Option<SpillContents>, LedgerError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LedgerError::Spill(format!("{}: {e}", path.display()))),
    };
    let (mut entries, mut standing) = (Vec::new(), Vec::new());
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| LedgerError::Spill(format!("{}: {e}", path.display())))?;
        match serde_json::from_str::<Spilled>(&line) {
            Ok(batch) => {
                entries.extend(batch.entries);
                standing.extend(batch.standing);
            }
            Err(e) => warn!(line = i + 1, error = %e, "ledger: unreadable spill line skipped"),
        }
    }
    Ok(Some((entries, standing)))
}
