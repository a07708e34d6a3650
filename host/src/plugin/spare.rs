//! What a finished one-shot call leaves for the next call of the same plugin: its whole store,
//! or only the host side of it.
//!
//! Every call gets a fresh instance; the store that holds it need not be fresh. A wasmtime store
//! frees its instances only when it is dropped, and making one (and registering the plugin's code
//! in it) is a fixed cost of every call. So after a call that went well, its store is kept, and
//! the next call instantiates its own fresh instance in it: nothing of the finished instance is
//! reachable from the new one (its memories, globals and tables are its own), and the host state
//! of the store is reset between calls ([`CallState::reset`]). Profiled in a loaded chained
//! edge, making and dropping the store (the store itself, the plugin's code registered in it, the
//! vectors grown per store) was about a fifth of a router call.
//!
//! The bounds: a store takes at most [`STORE_INSTANCES`] instances; a call that failed, trapped,
//! hit its memory cap, or grew its memory past [`KEEP_MAX_MEMORY_BYTES`] has its store dropped at
//! once; and finished instances held in kept stores are counted against a pool reserve
//! ([`RETIRED_RESERVE`], set aside in the pooling allocator beside the call slots), so a kept store
//! never takes a slot that a call needs. A store that would exceed the reserve is dropped.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use wasmtime::Store;

use super::bindings::CallState;

/// Instances one store holds before it is dropped: the cost of making a store is shared by this
/// many calls, and the store's drop frees them together, in the call that drops it. Measured with
/// plugin-bench: 8 gave a router the same mean (7.0–7.3 µs against 7.6–7.8 with a store per call)
/// and a p99 of 27–35 µs; 4 gives 15–20 µs.
pub(crate) const STORE_INSTANCES: u32 = 4;

/// Linear memory (all of a call's memories, bytes) above which a call's store is not kept, so
/// that kept stores hold small finished instances only. A shipped Rust router's instance holds
/// 128 KiB (a 64 KiB stack); a Rust component built for `wasm32-wasip2`, with rustc's 1 MiB
/// stack, 1.2 MiB. Only the pages a call wrote stay resident until the store goes.
pub(crate) const KEEP_MAX_MEMORY_BYTES: usize = 2 << 20;

/// Pool slots set aside for finished instances that kept stores hold, across all plugins.
pub(crate) const RETIRED_RESERVE: u32 = 64;

/// What a finished call leaves for the next one.
pub(crate) enum Spare {
    /// A store that may take more instances, with the finished ones it holds.
    Store(Store<CallState>, Retired),
    /// The host side of a dropped store.
    State(Box<CallState>),
}

/// Finished instances one store holds, counted in the runtime-wide total against
/// [`RETIRED_RESERVE`] until the store is dropped (with this, when it drops).
pub(crate) struct Retired {
    count: u32,
    total: Arc<AtomicU32>,
}

impl Retired {
    /// None held yet, counted in `total`.
    pub fn new(total: Arc<AtomicU32>) -> Retired {
        Retired { count: 0, total }
    }

    /// Counts one more finished instance if the store may take another call's instance and the
    /// reserve has room for it; false leaves the count as it was.
    pub fn try_add(&mut self) -> bool {
        if self.count + 1 >= STORE_INSTANCES {
            return false;
        }
        let reserved = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |total| (total < RETIRED_RESERVE).then_some(total + 1));
        if reserved.is_ok() {
            self.count += 1;
        }
        reserved.is_ok()
    }
}

impl Drop for Retired {
    /// The store these instances were in is gone (or going with this): their slots are free.
    fn drop(&mut self) {
        self.total.fetch_sub(self.count, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_takes_a_bounded_number_of_instances_within_the_reserve() {
        let total = Arc::new(AtomicU32::new(0));
        let mut retired = Retired::new(Arc::clone(&total));
        let kept = (0..STORE_INSTANCES * 2).filter(|_| retired.try_add()).count() as u32;
        // The call that finds the store full drops it: one instance fewer than the bound is held.
        assert_eq!(kept, STORE_INSTANCES - 1);
        assert_eq!(total.load(Ordering::Acquire), STORE_INSTANCES - 1);
        drop(retired);
        assert_eq!(total.load(Ordering::Acquire), 0, "a dropped store gives its slots back");

        total.store(RETIRED_RESERVE, Ordering::Release);
        let mut retired = Retired::new(Arc::clone(&total));
        assert!(!retired.try_add(), "a full reserve keeps no store");
        drop(retired);
        assert_eq!(total.load(Ordering::Acquire), RETIRED_RESERVE, "nothing was counted, nothing given back");
    }
}
