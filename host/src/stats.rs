//! Live statistics of one upstream target, and its outlier ejection: the deterministic core, with
//! no I/O and no clock of its own (every call takes `now`), so that the state machine can be
//! tested with explicit instants.
//!
//! A target is *closed* (taking traffic) until `ejection_threshold` consecutive failures eject it
//! for a backoff: `base_ejection_ms`, doubled at each ejection in a row, at most
//! `max_ejection_ms`. When the backoff has passed the target is *half-open*: one request (or an
//! active probe) is let through; a success closes it and resets the backoff, a failure ejects it
//! again for the next, longer backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::HealthConfig;
use crate::error::Retry;

/// Weight of a new latency sample in the smoothed latencies.
const LATENCY_ALPHA: f64 = 0.3;
/// Weight of a new outcome in the smoothed error rate.
const ERROR_ALPHA: f64 = 0.2;
/// A closed target whose smoothed error rate is above this is reported degraded.
const DEGRADED_ERROR_RATE: f64 = 0.25;

/// A target's health as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Answering normally.
    Healthy,
    /// Answering, with recent errors.
    Degraded,
    /// Its backoff has passed: the next request (or probe) decides.
    HalfOpen,
    /// Ejected after consecutive failures until its backoff passes.
    Ejected,
}

impl HealthState {
    /// The `meridian_target_health` gauge: 1 healthy, 0.5 degraded or half-open, 0 ejected.
    pub fn gauge(self) -> f64 {
        match self {
            HealthState::Healthy => 1.0,
            HealthState::Degraded | HealthState::HalfOpen => 0.5,
            HealthState::Ejected => 0.0,
        }
    }
}

/// Whether a request may be sent to a target now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: send.
    Open,
    /// Half-open: this request is the one let through.
    Trial,
    /// Ejected, or half-open with its trial under way: skip it.
    Skip,
}

/// What an engine reports about its load.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct EngineLoad {
    /// The execution provider its models run on (`tensorrt`, `cuda`, `cpu`).
    pub provider: String,
    /// Tokens it generated per second, lately.
    pub tokens_per_second: f64,
    /// Requests admitted but not yet decoding.
    pub queue_depth: u32,
    /// Sequences decoding now.
    pub active_sequences: u32,
    /// Most sequences decoded in one batch.
    pub max_batch: u32,
    /// Prompts it began from its prefix cache, since it started.
    pub prefix_cache_hits: u64,
    /// Prompt tokens whose prefill its prefix cache saved, since it started.
    pub prefix_cache_tokens_reused: u64,
    /// Bytes of KV its prefix cache holds.
    pub prefix_cache_bytes: u64,
    /// The conversation beginnings its prefix cache holds, by model (not in the JSON views: up
    /// to 256 hashes per model).
    #[serde(skip)]
    pub prefixes: Arc<HeldPrefixes>,
}

/// The conversation beginnings an engine's prefix cache holds, as its health answer lists them
/// (`meridian_engine::api::Health::prefixes`), indexed for lookups.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeldPrefixes {
    by_model: HashMap<String, HashMap<u64, u32>>,
}

impl HeldPrefixes {
    /// Indexes an engine's list: model → (conversation hash, tokens) pairs. An engine lists at
    /// most `MAX_HELD_PREFIXES` per model; more (and models past the 64th) are ignored, so a
    /// faulty engine cannot make the edge hold more.
    pub fn new(listed: impl IntoIterator<Item = (String, Vec<(u64, u32)>)>) -> HeldPrefixes {
        let by_model = listed
            .into_iter()
            .take(64)
            .map(|(model, held)| (model, held.into_iter().take(meridian_engine::api::MAX_HELD_PREFIXES).collect()))
            .collect();
        HeldPrefixes { by_model }
    }

    /// Whether nothing is held (or the engine does not report it).
    pub fn is_empty(&self) -> bool {
        self.by_model.values().all(HashMap::is_empty)
    }

    /// How many prompt tokens of a request for `model` the cache holds: those of the longest of
    /// the request's conversation beginnings (`conversation`, hash after each message in order,
    /// from `crate::api::engine::conversation`) that it holds; 0 for none.
    pub fn matched(&self, model: &str, conversation: &[u64]) -> u32 {
        let Some(held) = self.by_model.get(model) else { return 0 };
        conversation.iter().rev().find_map(|h| held.get(h).copied()).unwrap_or(0)
    }
}

/// A point-in-time view of a target's statistics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// Its health now.
    pub health: HealthState,
    /// Milliseconds until its ejection ends; `None` unless ejected.
    pub ejected_until_ms: Option<u64>,
    /// Smoothed latency to the first byte (whole answers: to the answer; streams: to the first
    /// event past the start), in ms; `None` until measured.
    pub latency_ms: Option<f64>,
    /// Smoothed time to first token of streams, in ms; `None` until measured.
    pub ttft_ms: Option<f64>,
    /// Smoothed share of failed attempts, 0 to 1.
    pub error_rate: f64,
    /// Requests in flight to it from this node.
    pub in_flight: u32,
    /// Failures since its last success.
    pub consecutive_failures: u32,
    /// Times it has been ejected since the node started.
    pub ejections_total: u64,
    /// The load its engine last reported.
    pub engine: Option<EngineLoad>,
    /// The QUIC round-trip time to its engine, in ms.
    pub rtt_ms: Option<f64>,
}

/// Ejection settings (from `[health]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// Consecutive failures that eject.
    pub threshold: u32,
    /// The first backoff.
    pub base: Duration,
    /// The longest backoff.
    pub max: Duration,
}

impl Default for Ejection {
    fn default() -> Self {
        Ejection::from(&HealthConfig::default())
    }
}

impl From<&HealthConfig> for Ejection {
    fn from(c: &HealthConfig) -> Self {
        Ejection {
            threshold: c.ejection_threshold,
            base: Duration::from_millis(c.base_ejection_ms),
            max: Duration::from_millis(c.max_ejection_ms),
        }
    }
}

impl Ejection {
    /// The backoff of the `n`th ejection in a row (1-based).
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1).min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[derive(Debug, Default)]
struct Inner {
    latency_ms: Option<f64>,
    ttft_ms: Option<f64>,
    error_rate: f64,
    consecutive_failures: u32,
    /// Whether a request (not only probes) failed in the current run of failures: a run of failed
    /// probes alone ends when a probe is answered, a run with a failed request only with a
    /// request's success.
    request_failed_in_run: bool,
    /// Ejections in a row (without a success between): the backoff's exponent.
    ejections_in_row: u32,
    ejections_total: u64,
    ejected_until: Option<Instant>,
    /// When the half-open trial was let through, while it is under way.
    trial_since: Option<Instant>,
    engine: Option<EngineLoad>,
    rtt_ms: Option<f64>,
}

fn ewma(old: Option<f64>, sample: f64, alpha: f64) -> f64 {
    old.map_or(sample, |o| o + alpha * (sample - o))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Inner {
    fn state(&self, now: Instant) -> HealthState {
        match self.ejected_until {
            Some(until) if now < until => HealthState::Ejected,
            Some(_) => HealthState::HalfOpen,
            None if self.consecutive_failures > 0 || self.error_rate > DEGRADED_ERROR_RATE => HealthState::Degraded,
            None => HealthState::Healthy,
        }
    }

    fn eject(&mut self, now: Instant, ejection: &Ejection) {
        self.ejections_in_row = self.ejections_in_row.saturating_add(1);
        self.ejections_total += 1;
        self.ejected_until = Some(now + ejection.backoff(self.ejections_in_row));
        self.trial_since = None;
    }

    fn success(&mut self) {
        self.consecutive_failures = 0;
        self.request_failed_in_run = false;
        self.ejections_in_row = 0;
        self.ejected_until = None;
        self.trial_since = None;
        self.error_rate = ewma(Some(self.error_rate), 0.0, ERROR_ALPHA);
    }

    fn failure(&mut self, now: Instant, ejection: &Ejection) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.error_rate = ewma(Some(self.error_rate), 1.0, ERROR_ALPHA);
        match self.state(now) {
            // Already out: a request sent anyway (every target was out) changes nothing.
            HealthState::Ejected => {}
            HealthState::HalfOpen => self.eject(now, ejection),
            _ if self.consecutive_failures >= ejection.threshold => self.eject(now, ejection),
            _ => {}
        }
    }
}

/// The live statistics of one target, shared by every request to it.
#[derive(Debug)]
pub struct TargetStats {
    ejection: Ejection,
    inner: Mutex<Inner>,
    in_flight: Arc<AtomicU32>,
}

impl Default for TargetStats {
    fn default() -> Self {
        TargetStats::new(Ejection::default())
    }
}

/// Counts one request in flight to a target until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl TargetStats {
    /// A target with no history.
    pub fn new(ejection: Ejection) -> TargetStats {
        TargetStats { ejection, inner: Mutex::default(), in_flight: Arc::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its health at `now`.
    pub fn state(&self, now: Instant) -> HealthState {
        self.lock().state(now)
    }

    /// Whether a request would be let through at `now` (without claiming the half-open trial).
    pub fn available(&self, now: Instant) -> bool {
        let inner = self.lock();
        match inner.state(now) {
            HealthState::Ejected => false,
            HealthState::HalfOpen => !self.trial_running(&inner, now),
            _ => true,
        }
    }

    /// A trial whose outcome never came (its request was dropped) stops holding the target after
    /// the longest backoff.
    fn trial_running(&self, inner: &Inner, now: Instant) -> bool {
        inner.trial_since.is_some_and(|since| now.saturating_duration_since(since) < self.ejection.max)
    }

    /// Whether to send a request at `now`; a half-open target lets one through, and this claims it.
    pub fn admit(&self, now: Instant) -> Admission {
        let mut inner = self.lock();
        match inner.state(now) {
            HealthState::Ejected => Admission::Skip,
            HealthState::HalfOpen if self.trial_running(&inner, now) => Admission::Skip,
            HealthState::HalfOpen => {
                inner.trial_since = Some(now);
                Admission::Trial
            }
            _ => Admission::Open,
        }
    }

    /// The outcome of one attempt, ended at `now`: the one mapping from an attempt's outcome to
    /// the target's health, for the edge and the simulation alike. An answer (`latency` to its
    /// first byte, when it is a measure of the target) and a refusal of the request itself (the
    /// target is alive) are successes; a request it cannot serve is neither; a failure counts
    /// toward ejection.
    pub fn attempt(&self, now: Instant, latency: Option<Duration>, outcome: Result<(), Retry>) {
        match outcome {
            Ok(()) => self.success(latency),
            Err(Retry::Stop) => self.success(None),
            Err(Retry::Skip) => {}
            Err(Retry::Next) => self.failure(now),
        }
    }

    /// A request it answered; `latency` to its first byte, when it is a measure of the target.
    pub fn success(&self, latency: Option<Duration>) {
        let mut inner = self.lock();
        if let Some(d) = latency {
            inner.latency_ms = Some(ewma(inner.latency_ms, ms(d), LATENCY_ALPHA));
        }
        inner.success();
    }

    /// A request it failed at `now`.
    pub fn failure(&self, now: Instant) {
        let ejection = self.ejection;
        let mut inner = self.lock();
        inner.request_failed_in_run = true;
        inner.failure(now, &ejection);
    }

    /// A stream's time to its first token.
    pub fn ttft(&self, d: Duration) {
        let mut inner = self.lock();
        inner.ttft_ms = Some(ewma(inner.ttft_ms, ms(d), LATENCY_ALPHA));
    }

    /// An active probe's outcome at `now`: the engine's load and RTT when it answered. A probe
    /// answered after the backoff closes the target; one that failed counts as a failure. While
    /// the target is ejected, probes only refresh its load. An answered probe also lowers the
    /// error rate, so that a recovered target routers ranked down by its past failures becomes
    /// healthy again without traffic, and it ends a run of failures that were all probes (an
    /// engine that was not up yet when first probed); it does not clear a run with a failed
    /// request, which only a request can (an engine can answer health and still fail generations).
    pub fn probe(&self, now: Instant, result: Option<(EngineLoad, Option<Duration>)>) {
        let ejection = self.ejection;
        let mut inner = self.lock();
        let state = inner.state(now);
        match result {
            Some((load, rtt)) => {
                inner.engine = Some(load);
                if let Some(rtt) = rtt {
                    inner.rtt_ms = Some(ewma(inner.rtt_ms, ms(rtt), LATENCY_ALPHA));
                }
                match state {
                    HealthState::HalfOpen => inner.success(),
                    HealthState::Ejected => {}
                    _ => {
                        inner.error_rate = ewma(Some(inner.error_rate), 0.0, ERROR_ALPHA);
                        if !inner.request_failed_in_run {
                            inner.consecutive_failures = 0;
                        }
                    }
                }
            }
            None if state != HealthState::Ejected => inner.failure(now, &ejection),
            None => {}
        }
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn start(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(&self.in_flight))
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Everything, at `now`.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let inner = self.lock();
        let health = inner.state(now);
        let ejected_until_ms = match (health, inner.ejected_until) {
            (HealthState::Ejected, Some(until)) => {
                Some(u64::try_from(until.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX))
            }
            _ => None,
        };
        Snapshot {
            health,
            ejected_until_ms,
            latency_ms: inner.latency_ms,
            ttft_ms: inner.ttft_ms,
            error_rate: inner.error_rate,
            in_flight: self.in_flight(),
            consecutive_failures: inner.consecutive_failures,
            ejections_total: inner.ejections_total,
            engine: inner.engine.clone(),
            rtt_ms: inner.rtt_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> TargetStats {
        TargetStats::new(Ejection { threshold: 3, base: Duration::from_millis(100), max: Duration::from_millis(350) })
    }

    fn ms_(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn fail_times(s: &TargetStats, now: Instant, n: u32) {
        for _ in 0..n {
            assert_ne!(s.admit(now), Admission::Skip);
            s.failure(now);
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let e = Ejection { threshold: 5, base: ms_(1000), max: ms_(30_000) };
        let got: Vec<u64> = (1..=7).map(|n| e.backoff(n).as_millis() as u64).collect();
        assert_eq!(got, [1000, 2000, 4000, 8000, 16_000, 30_000, 30_000]);
        assert_eq!(e.backoff(200), ms_(30_000), "no overflow");
        assert_eq!(Ejection::default(), e, "the documented defaults");
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_between_resets() {
        let t0 = Instant::now();
        let s = stats();
        fail_times(&s, t0, 2);
        assert_eq!(s.state(t0), HealthState::Degraded);
        s.success(Some(ms_(10)));
        assert_eq!(s.snapshot(t0).consecutive_failures, 0);
        fail_times(&s, t0, 2);
        assert_eq!(s.state(t0), HealthState::Degraded, "two in a row are not three");
        fail_times(&s, t0, 1);
        assert_eq!(s.state(t0), HealthState::Ejected);
        assert_eq!(s.admit(t0 + ms_(99)), Admission::Skip);
        let snap = s.snapshot(t0 + ms_(40));
        assert_eq!(snap.ejected_until_ms, Some(60));
        assert_eq!(snap.ejections_total, 1);
        assert_eq!(snap.consecutive_failures, 3);
    }

    #[test]
    fn half_open_lets_one_through_and_a_success_closes() {
        let t0 = Instant::now();
        let s = stats();
        fail_times(&s, t0, 3);
        let t1 = t0 + ms_(100);
        assert_eq!(s.state(t1), HealthState::HalfOpen);
        assert!(s.available(t1));
        assert_eq!(s.admit(t1), Admission::Trial);
        assert!(!s.available(t1), "one trial at a time");
        assert_eq!(s.admit(t1), Admission::Skip);
        s.success(Some(ms_(20)));
        assert_eq!(s.admit(t1), Admission::Open);
        assert_eq!(s.state(t1), HealthState::Degraded, "recent errors still show in the error rate");
        // The backoff starts from the base again after a success.
        fail_times(&s, t1, 3);
        assert_eq!(s.snapshot(t1).ejected_until_ms, Some(100));
    }

    #[test]
    fn a_failed_trial_ejects_again_for_longer_up_to_the_cap() {
        let t0 = Instant::now();
        let s = stats();
        fail_times(&s, t0, 3);
        let mut now = t0;
        for expected in [200, 350, 350] {
            now += ms_(1000);
            assert_eq!(s.admit(now), Admission::Trial);
            s.failure(now);
            assert_eq!(s.snapshot(now).ejected_until_ms, Some(expected));
        }
        assert_eq!(s.snapshot(now).ejections_total, 4);
    }

    #[test]
    fn failures_while_ejected_do_not_extend_it() {
        let t0 = Instant::now();
        let s = stats();
        fail_times(&s, t0, 3);
        s.failure(t0 + ms_(50));
        assert_eq!(s.snapshot(t0 + ms_(50)).ejected_until_ms, Some(50));
        assert_eq!(s.snapshot(t0).ejections_total, 1);
        // A success even while ejected (sent because everything was out) closes it.
        s.success(None);
        assert_eq!(s.admit(t0 + ms_(50)), Admission::Open);
    }

    #[test]
    fn a_lost_trial_stops_holding_the_target() {
        let t0 = Instant::now();
        let s = stats();
        fail_times(&s, t0, 3);
        assert_eq!(s.admit(t0 + ms_(100)), Admission::Trial);
        assert_eq!(s.admit(t0 + ms_(400)), Admission::Skip);
        assert_eq!(s.admit(t0 + ms_(450)), Admission::Trial, "after the longest backoff");
    }

    #[test]
    fn probes_close_a_half_open_target_and_count_failures() {
        let t0 = Instant::now();
        let s = stats();
        let load = EngineLoad {
            provider: "cpu".into(),
            tokens_per_second: 0.0,
            queue_depth: 2,
            active_sequences: 3,
            max_batch: 8,
            ..Default::default()
        };
        s.probe(t0, Some((load.clone(), Some(ms_(4)))));
        assert_eq!(s.state(t0), HealthState::Healthy);
        for _ in 0..3 {
            s.probe(t0, None);
        }
        assert_eq!(s.state(t0), HealthState::Ejected, "failed probes eject");
        s.probe(t0 + ms_(50), Some((load.clone(), None)));
        assert_eq!(s.state(t0 + ms_(50)), HealthState::Ejected, "an answer during the backoff only refreshes load");
        s.probe(t0 + ms_(100), Some((load.clone(), Some(ms_(8)))));
        let snap = s.snapshot(t0 + ms_(100));
        assert_eq!(snap.health, HealthState::Degraded);
        assert_eq!(snap.consecutive_failures, 0);
        assert_eq!(snap.engine.as_ref(), Some(&load));
        assert_eq!(snap.rtt_ms, Some(4.0 + 0.3 * 4.0));
        // Answered probes alone bring the recovered target back to healthy.
        let mut t = t0 + ms_(100);
        while s.state(t) == HealthState::Degraded {
            assert!(t < t0 + ms_(200), "probes never made it healthy");
            t += ms_(5);
            s.probe(t, Some((load.clone(), None)));
        }
        assert_eq!(s.state(t), HealthState::Healthy);
        // A failed probe at half-open ejects again, for longer.
        fail_times(&s, t0 + ms_(100), 3);
        s.probe(t0 + ms_(200), None);
        assert_eq!(s.snapshot(t0 + ms_(200)).ejected_until_ms, Some(200));
    }

    #[test]
    fn an_answered_probe_ends_a_run_of_failed_probes_but_not_of_failed_requests() {
        let t0 = Instant::now();
        let load = EngineLoad {
            provider: "cpu".into(),
            tokens_per_second: 0.0,
            queue_depth: 0,
            active_sequences: 0,
            max_batch: 2,
            ..Default::default()
        };
        // An engine not up yet when first probed, then answering.
        let s = stats();
        s.probe(t0, None);
        assert_eq!(s.snapshot(t0).consecutive_failures, 1);
        let mut t = t0;
        while s.state(t) != HealthState::Healthy {
            assert!(t < t0 + ms_(100), "answered probes never made it healthy: {:?}", s.snapshot(t));
            t += ms_(5);
            s.probe(t, Some((load.clone(), None)));
        }
        assert_eq!(s.snapshot(t).consecutive_failures, 0);
        // A failed request in the run: probes answered since do not clear it.
        let s = stats();
        s.probe(t0, None);
        s.failure(t0);
        for k in 1..50 {
            s.probe(t0 + ms_(k), Some((load.clone(), None)));
        }
        let snap = s.snapshot(t0 + ms_(50));
        assert_eq!((snap.health, snap.consecutive_failures), (HealthState::Degraded, 2));
        s.success(None);
        assert_eq!(s.state(t0 + ms_(50)), HealthState::Healthy);
    }

    #[test]
    fn latencies_and_error_rate_are_smoothed() {
        let s = stats();
        let t0 = Instant::now();
        assert_eq!(s.snapshot(t0).latency_ms, None);
        s.success(Some(ms_(100)));
        s.success(Some(ms_(200)));
        s.ttft(ms_(50));
        let snap = s.snapshot(t0);
        assert!((snap.latency_ms.unwrap() - 130.0).abs() < 1e-9, "{snap:?}");
        assert_eq!(snap.ttft_ms, Some(50.0));
        assert_eq!(snap.error_rate, 0.0);
        s.failure(t0);
        assert!((s.snapshot(t0).error_rate - 0.2).abs() < 1e-9);
        s.success(None);
        assert!((s.snapshot(t0).error_rate - 0.16).abs() < 1e-9);
        assert_eq!(s.snapshot(t0).latency_ms, snap.latency_ms, "an outcome without a latency leaves it");
    }

    #[test]
    fn in_flight_counts_guards() {
        let s = stats();
        let a = s.start();
        let b = s.start();
        assert_eq!(s.in_flight(), 2);
        drop(a);
        assert_eq!(s.in_flight(), 1);
        drop(b);
        assert_eq!(s.snapshot(Instant::now()).in_flight, 0);
    }

    #[test]
    fn health_gauge_values() {
        assert_eq!(HealthState::Healthy.gauge(), 1.0);
        assert_eq!(HealthState::HalfOpen.gauge(), 0.5);
        assert_eq!(HealthState::Degraded.gauge(), 0.5);
        assert_eq!(HealthState::Ejected.gauge(), 0.0);
    }
}
