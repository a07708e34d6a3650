//! The in-process store: the counters of one edge that shares them with no other, in a map under
//! one lock. Each operation takes the lock once, so a batch of charges is all or nothing, as the
//! Redis scripts are ([`super::shared`]).

use std::collections::HashMap;
use std::sync::Mutex;

use super::limits::{fits, Charge, Counter};

/// Counters by key.
#[derive(Default)]
pub struct Local {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    counters: HashMap<String, Slot>,
    /// When expired counters were last dropped.
    last_purge: i64,
}

struct Slot {
    value: i64,
    expires_at: i64,
}

/// Expired counters are dropped at most this often (seconds): a sweep is a pass over the map.
const PURGE_EVERY_SECS: i64 = 60;

impl Local {
    /// Adds every charge, or none: `Err(i)` when charge `i` is the first that does not fit.
    pub fn charge(&self, charges: &[Charge], now: i64) -> Result<(), usize> {
        let mut state = self.lock();
        state.purge(now);
        let current = |c: &Counter| state.counters.get(&c.key).filter(|s| s.expires_at > now).map_or(0, |s| s.value);
        if let Some(i) = charges.iter().position(|c| !fits(current(&c.counter), c.amount, c.max)) {
            return Err(i);
        }
        for c in charges {
            state.add(&c.counter, c.amount, now);
        }
        Ok(())
    }

    /// Adds each delta: a positive one to its counter, made if it is gone; a negative one only to a
    /// counter that still exists (a window that has ended is read no more).
    pub fn adjust(&self, deltas: &[(Counter, i64)], now: i64) {
        let mut state = self.lock();
        for (counter, delta) in deltas {
            if *delta > 0 {
                state.add(counter, *delta, now);
            } else if let Some(slot) = state.counters.get_mut(&counter.key).filter(|s| s.expires_at > now) {
                slot.value = slot.value.saturating_add(*delta);
            }
        }
    }

    /// Sets each counter that does not exist yet to its value.
    pub fn seed(&self, values: &[(Counter, i64)], now: i64) {
        let mut state = self.lock();
        for (counter, value) in values {
            if state.counters.get(&counter.key).is_none_or(|s| s.expires_at <= now) {
                state.counters.insert(counter.key.clone(), Slot { value: *value, expires_at: counter.expires_at });
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic under the lock leaves whole integers behind: the counters stay usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn add(&mut self, counter: &Counter, amount: i64, now: i64) {
        let slot =
            self.counters.entry(counter.key.clone()).or_insert(Slot { value: 0, expires_at: counter.expires_at });
        if slot.expires_at <= now {
            *slot = Slot { value: 0, expires_at: counter.expires_at };
        }
        slot.value = slot.value.saturating_add(amount);
    }

    fn purge(&mut self, now: i64) {
        if now - self.last_purge >= PURGE_EVERY_SECS {
            self.counters.retain(|_, s| s.expires_at > now);
            self.last_purge = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(key: &str, expires_at: i64) -> Counter {
        Counter { key: key.into(), expires_at }
    }

    fn charge(key: &str, max: i64, amount: i64) -> Charge {
        Charge { counter: counter(key, 100), max, amount }
    }

    #[test]
    fn a_batch_is_all_or_nothing() {
        let store = Local::default();
        assert_eq!(store.charge(&[charge("a", 10, 6), charge("b", 10, 6)], 0), Ok(()));
        assert_eq!(store.charge(&[charge("a", 20, 6), charge("b", 10, 6)], 0), Err(1), "b is full");
        // Nothing of the refused batch stuck: a still has 6, so 14 more fit under 20.
        assert_eq!(store.charge(&[charge("a", 20, 14)], 0), Ok(()));
        assert_eq!(store.charge(&[charge("a", 20, 1)], 0), Err(0));
        assert_eq!(store.charge(&[charge("a", 20, 0)], 0), Ok(()), "nothing always fits");
    }

    #[test]
    fn counters_expire_with_their_window() {
        let store = Local::default();
        assert_eq!(store.charge(&[charge("a", 10, 10)], 0), Ok(()));
        assert_eq!(store.charge(&[charge("a", 10, 1)], 99), Err(0));
        assert_eq!(store.charge(&[charge("a", 10, 10)], 100), Ok(()), "expired at 100: a new window");
    }

    #[test]
    fn releases_touch_only_live_counters_and_seeds_only_missing_ones() {
        let store = Local::default();
        store.adjust(&[(counter("gone", 100), -5)], 0);
        store.seed(&[(counter("gone", 100), 7)], 0);
        assert_eq!(store.charge(&[charge("gone", 10, 4)], 0), Err(0), "seeded 7, not -5 + 7");
        store.seed(&[(counter("gone", 100), 0)], 0);
        store.adjust(&[(counter("gone", 100), -4)], 0);
        assert_eq!(store.charge(&[charge("gone", 10, 7)], 0), Ok(()), "3 + 7");
        store.adjust(&[(counter("new", 100), 9)], 0);
        assert_eq!(store.charge(&[charge("new", 10, 2)], 0), Err(0), "a positive delta makes its counter");
    }
}
