//! Where the counters live: in this process ([`Local`]) or in Redis ([`Shared`]). Both take the
//! charges that [`super::limits`] computed and apply a batch atomically; neither knows what a
//! limit or a period is.

use std::sync::Arc;

use tracing::warn;

use super::limits::{Charge, Counter};
use super::local::Local;
use super::shared::Shared;

/// The counters' home.
pub enum Store {
    /// One edge alone.
    Local(Local),
    /// A region's edges together.
    Shared(Shared),
}

impl Store {
    /// Adds every charge, or none: `Ok(Err(i))` when charge `i` is the first that does not fit;
    /// `Err` when the shared counters did not answer.
    pub async fn charge(&self, charges: &[Charge], now: i64) -> Result<Result<(), usize>, String> {
        match self {
            Store::Local(s) => Ok(s.charge(charges, now)),
            Store::Shared(s) => s.charge(charges).await,
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
            Store::Shared(_) => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    warn!(counters = deltas.len(), "budget settlement dropped: no runtime to send it on");
                    return;
                };
                let store = Arc::clone(self);
                runtime.spawn(async move {
                    if let Store::Shared(s) = &*store {
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
            Store::Shared(s) => s.seed(values).await,
        }
    }
}
