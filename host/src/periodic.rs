//! Background work that runs every period for as long as its owner lives: target probes, the
//! status page's samples, the pings of a shared Redis.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

/// Runs `work` on `owner` now and then every `period` (a late tick waits a whole period rather
/// than bursting), in a task that holds `owner` only while `work` runs and ends once it is gone.
pub fn every<T, F, Fut>(period: Duration, owner: &Arc<T>, mut work: F)
where
    T: Send + Sync + 'static,
    F: FnMut(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let weak = Arc::downgrade(owner);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(owner) = weak.upgrade() else { return };
            work(owner).await;
        }
    });
}
