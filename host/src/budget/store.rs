//! Where the counters live: in this process ([`Local`]) or in Redis ([`Shared`]), with counters
//! in this process to fall back on while Redis does not answer (for rate limits only: see
//! `Hold::charge`). Both take the charges that [`super::limits`] computed and apply a batch
//! atomically; neither knows what a limit or a period is.

use std::sync::Arc;

use tracing::warn;

use super::limits::{Charge, Counter};
use super::local::Local;
use super::shared::Shared;

/// The counters' home.
pub enum Store {
    /// One edge alone.
    Local(Local),
    /// A region's edges together, and this edge's own counters for while Redis is away.
    Shared(Shared, Local),
}

impl Store {
    /// Adds every charge, or none: `Ok(Err(i))` when charge `i` is the first that does not fit;
    /// `Err` when the shared counters did not answer.
    pub async fn charge(&self, charges: &[Charge], now: i64) -> Result<Result<(), usize>, String> {
        match self {
            Store::Local(s) => Ok(s.charge(charges, now)),
            Store::Shared(s, _) => s.charge(charges).await,
        }
    }

    /// Whether the shared counters answer; `None` for an edge on its own.
    pub fn shared_up(&self) -> Option<bool> {
        match self {
            Store::Local(_) => None,
            Store::Shared(s, _) => Some(s.link().is_up()),
        }
    }

    /// Adds every charge, or none, to this edge's own counters: where a shared store's charges
    /// go while Redis does not answer. `None` for an edge on its own (it has nothing else).
    pub fn charge_fallback(&self, charges: &[Charge], now: i64) -> Option<Result<(), usize>> {
        match self {
            Store::Local(_) => None,
            Store::Shared(_, fallback) => Some(fallback.charge(charges, now)),
        }
    }

    /// Adds each delta of charges that [`Store::charge_fallback`] made.
    pub fn adjust_fallback(&self, deltas: &[(Counter, i64)], now: i64) {
        if let Store::Shared(_, fallback) = self {
            fallback.adjust(deltas, now);
        }
    }

    /// Adds each delta (a settlement), without waiting for Redis: a settlement that fails leaves
    /// the counters higher than the spend, never lower, and is logged.
    pub fn adjust(self: &Arc<Self>, deltas: Vec<(Counter, i64)>, now: i64) {
        if deltas.is_empty() {
            return;
        }
        match &**self {
            Store::Local(s) => s.adjust(&deltas, now),
            Store::Shared(..) => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    warn!(counters = deltas.len(), "budget settlement dropped: no runtime to send it on");
                    return;
                };
                let store = Arc::clone(self);
                runtime.spawn(async move {
                    if let Store::Shared(s, _) = &*store {
                        if let Err(e) = s.adjust(&deltas).await {
                            warn!(error = %e, "budget settlement not written to Redis: the reservation stays counted");
                        }
                    }
                });
            }
        }
    }

    /// Sets each counter that does not exist yet to its value.
    pub async fn seed(&self, values: &[(Counter, i64)], now: i64) -> Result<(), String> {
        match self {
            Store::Local(s) => {
                s.seed(values, now);
                Ok(())
            }
            Store::Shared(s, _) => s.seed(values).await,
        }
    }
}
