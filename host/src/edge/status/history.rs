//! What the status page charts: every `[status] sample_interval_ms`, a sample of each target's
//! health, latency, TTFT and requests in flight, of the prompt cache's lookups and of the cost
//! each tenant has run up, kept for the last `[status] samples` intervals. The counters are read
//! from the edge's Prometheus registry, so the page and `/metrics` never disagree.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use prometheus::proto::MetricFamily;
use prometheus::Registry;
use serde::Serialize;

use crate::config::StatusConfig;
use crate::ledger::now_ms;
use crate::stats::HealthState;
use crate::upstream::Target;

/// One target at one sample.
#[derive(Debug, Clone, Serialize)]
pub struct TargetPoint {
    /// Its health.
    pub health: HealthState,
    /// Smoothed latency to the first byte, in ms, once measured.
    pub latency_ms: Option<f64>,
    /// Smoothed time to the first token of streams, in ms, once measured.
    pub ttft_ms: Option<f64>,
    /// Requests in flight to it.
    pub in_flight: u32,
}

/// The edge at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// When, in ms since the Unix epoch.
    pub at_ms: i64,
    /// Every target, in the order of [`History::targets`].
    pub targets: Vec<TargetPoint>,
    /// Prompt cache hits since the edge started.
    pub cache_hits: u64,
    /// Prompt cache misses since the edge started.
    pub cache_misses: u64,
    /// USD each tenant has run up on this edge since it started.
    pub cost_usd: BTreeMap<String, f64>,
}

/// The samples of the last minutes, oldest first.
pub struct History {
    interval: Duration,
    capacity: usize,
    targets: Vec<String>,
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// Starts sampling `targets` and `registry` now and every interval, for as long as the
    /// returned history is held.
    pub fn spawn(config: &StatusConfig, targets: &[Arc<Target>], registry: Registry) -> Arc<History> {
        let history = Arc::new(History {
            interval: Duration::from_millis(config.sample_interval_ms),
            capacity: config.samples,
            targets: targets.iter().map(|t| t.name.clone()).collect(),
            samples: Mutex::new(VecDeque::with_capacity(config.samples)),
        });
        let targets: Vec<Weak<Target>> = targets.iter().map(Arc::downgrade).collect();
        crate::periodic::every(history.interval, &history, move |history| {
            let live: Vec<Arc<Target>> = targets.iter().filter_map(Weak::upgrade).collect();
            history.push(sample(&live, &registry.gather()));
            std::future::ready(())
        });
        history
    }

    /// The targets' names, in the order of each sample's points.
    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    /// Time between samples.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The samples kept, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect()
    }

    fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        if samples.len() == self.capacity {
            samples.pop_front();
        }
        samples.push_back(sample);
    }
}

/// The edge now: `targets`' statistics and the counters in `families`.
pub fn sample(targets: &[Arc<Target>], families: &[MetricFamily]) -> Sample {
    let now = Instant::now();
    let lookups = counter_sums(families, "meridian_cache_lookups_total", &["result"]);
    let lookup = |result: &str| lookups.get(&vec![result.to_string()]).copied().unwrap_or(0.0) as u64;
    let cost_usd = counter_sums(families, "meridian_cost_usd_total", &["tenant"])
        .into_iter()
        .map(|(mut tenant, usd)| (tenant.pop().unwrap_or_default(), usd))
        .collect();
    Sample {
        at_ms: now_ms(),
        targets: targets
            .iter()
            .map(|t| {
                let s = t.stats.snapshot(now);
                TargetPoint { health: s.health, latency_ms: s.latency_ms, ttft_ms: s.ttft_ms, in_flight: s.in_flight }
            })
            .collect(),
        cache_hits: lookup("hit"),
        cache_misses: lookup("miss"),
        cost_usd,
    }
}

/// The counter `name` in `families`, summed by the values of `labels` (in that order): the
/// other labels are added up.
pub fn counter_sums(families: &[MetricFamily], name: &str, labels: &[&str]) -> BTreeMap<Vec<String>, f64> {
    let mut sums = BTreeMap::new();
    for metric in families.iter().filter(|f| f.name() == name).flat_map(|f| f.get_metric()) {
        let key = labels
            .iter()
            .map(|l| metric.get_label().iter().find(|p| p.name() == *l).map_or("", |p| p.value()).to_string())
            .collect();
        *sums.entry(key).or_insert(0.0) += metric.get_counter().get_value();
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{CounterVec, Opts};

    #[test]
    fn counters_are_summed_by_the_labels_asked_for() {
        let registry = Registry::new();
        let cost = CounterVec::new(Opts::new("meridian_cost_usd_total", "cost"), &["tenant", "model"]).unwrap();
        registry.register(Box::new(cost.clone())).unwrap();
        cost.with_label_values(&["acme", "a"]).inc_by(1.5);
        cost.with_label_values(&["acme", "b"]).inc_by(0.25);
        cost.with_label_values(&["globex", "a"]).inc_by(2.0);
        let sums = counter_sums(&registry.gather(), "meridian_cost_usd_total", &["tenant"]);
        assert_eq!(sums.get(&vec!["acme".to_string()]), Some(&1.75));
        assert_eq!(sums.get(&vec!["globex".to_string()]), Some(&2.0));
        assert_eq!(sums.len(), 2);
        assert!(counter_sums(&registry.gather(), "no_such_total", &["tenant"]).is_empty());
    }

    /// The history's samples once `done` holds for them (within 10 s).
    async fn samples_once(history: &History, done: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let samples = history.samples();
            if done(&samples) {
                return samples;
            }
            assert!(Instant::now() < deadline, "{samples:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn the_history_keeps_the_last_samples_oldest_first() {
        let config = StatusConfig { sample_interval_ms: 5, samples: 3 };
        let history = History::spawn(&config, &[], Registry::new());
        let first = samples_once(&history, |s| s.len() == 3).await[0].at_ms;
        // More samples drop the oldest: the window moves on and holds three.
        let later = samples_once(&history, |s| s[0].at_ms > first).await;
        assert_eq!(later.len(), 3);
        assert!(later.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    }
}
