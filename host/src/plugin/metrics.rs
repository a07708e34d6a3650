//! Prometheus metrics of plugins: the runtime's own (calls, their outcomes and duration, dropped
//! log lines) and those plugins write through the `host` interface.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use prometheus::{exponential_buckets, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Longest metric name a plugin may use.
const MAX_NAME_BYTES: usize = 64;

/// Every plugin metric, registered in the node's registry.
pub struct PluginMetrics {
    /// `meridian_plugin_calls_total{plugin,version,outcome}`: calls by outcome (`ok`, `timeout`,
    /// `memory_limit`, `trap`, `invalid_output`, `config_rejected`, `overloaded`, `quarantined`,
    /// `poisoned`…); a response session counts each of its calls. `skipped` counts requests a
    /// filter's declared request triggers let through without a call.
    pub calls: IntCounterVec,
    /// `meridian_plugin_call_seconds{plugin}`: time of a call, instantiation included.
    pub call_seconds: HistogramVec,
    /// `meridian_plugin_log_lines_dropped_total{plugin}`: log and stdio lines over the per-call cap.
    pub log_lines_dropped: IntCounterVec,
    /// `meridian_plugin_guest_counter_total{plugin,name}`: the plugins' own counters (`counter-add`).
    pub guest_counters: IntCounterVec,
    /// `meridian_plugin_guest_histogram{plugin,name}`: the plugins' own histograms (`histogram-record`).
    pub guest_histograms: HistogramVec,
    /// `meridian_plugin_guest_metrics_refused_total{plugin}`: guest metric updates refused (a bad
    /// name, a non-finite value, or a name over the per-plugin cap).
    pub guest_refused: IntCounterVec,
    max_names_per_plugin: usize,
    names: Mutex<HashMap<String, HashSet<String>>>,
}

impl PluginMetrics {
    /// Registers the plugin metrics in `registry`; each plugin may use at most 32 distinct names
    /// of its own (see [`PluginMetrics::with_name_cap`]).
    pub fn new(registry: &Registry) -> Result<PluginMetrics, prometheus::Error> {
        PluginMetrics::with_name_cap(registry, 32)
    }

    /// Registers the plugin metrics in `registry`, allowing each plugin `max_names_per_plugin`
    /// distinct names of its own: label values come from plugins, and a plugin must not be able
    /// to grow the node's metrics without bound.
    pub fn with_name_cap(registry: &Registry, max_names_per_plugin: usize) -> Result<PluginMetrics, prometheus::Error> {
        let calls = IntCounterVec::new(
            Opts::new("meridian_plugin_calls_total", "Plugin calls, by outcome"),
            &["plugin", "version", "outcome"],
        )?;
        let call_seconds = HistogramVec::new(
            HistogramOpts::new("meridian_plugin_call_seconds", "Time of a plugin call, instantiation included")
                .buckets(exponential_buckets(0.000_005, 2.0, 20)?),
            &["plugin"],
        )?;
        let log_lines_dropped = IntCounterVec::new(
            Opts::new("meridian_plugin_log_lines_dropped_total", "Plugin log and stdio lines over the per-call cap"),
            &["plugin"],
        )?;
        let guest_counters = IntCounterVec::new(
            Opts::new("meridian_plugin_guest_counter_total", "Counters that plugins keep"),
            &["plugin", "name"],
        )?;
        let guest_histograms = HistogramVec::new(
            HistogramOpts::new("meridian_plugin_guest_histogram", "Histograms that plugins keep")
                .buckets(exponential_buckets(0.001, 4.0, 16)?),
            &["plugin", "name"],
        )?;
        let guest_refused = IntCounterVec::new(
            Opts::new("meridian_plugin_guest_metrics_refused_total", "Plugin metric updates refused"),
            &["plugin"],
        )?;
        registry.register(Box::new(calls.clone()))?;
        registry.register(Box::new(call_seconds.clone()))?;
        registry.register(Box::new(log_lines_dropped.clone()))?;
        registry.register(Box::new(guest_counters.clone()))?;
        registry.register(Box::new(guest_histograms.clone()))?;
        registry.register(Box::new(guest_refused.clone()))?;
        Ok(PluginMetrics {
            calls,
            call_seconds,
            log_lines_dropped,
            guest_counters,
            guest_histograms,
            guest_refused,
            max_names_per_plugin,
            names: Mutex::default(),
        })
    }

    pub(crate) fn guest_counter_add(&self, plugin: &str, name: &str, delta: u64) {
        if self.admit(plugin, name) {
            self.guest_counters.with_label_values(&[plugin, name]).inc_by(delta);
        }
    }

    pub(crate) fn guest_histogram_record(&self, plugin: &str, name: &str, value: f64) {
        if !value.is_finite() {
            self.guest_refused.with_label_values(&[plugin]).inc();
        } else if self.admit(plugin, name) {
            self.guest_histograms.with_label_values(&[plugin, name]).observe(value);
        }
    }

    pub(crate) fn log_dropped(&self, plugin: &str, lines: u64) {
        if lines > 0 {
            self.log_lines_dropped.with_label_values(&[plugin]).inc_by(lines);
        }
    }

    /// Whether `plugin` may use `name`: a short `[a-z0-9_.]` name, one of the first
    /// `max_names_per_plugin` it used. Counts refusals.
    fn admit(&self, plugin: &str, name: &str) -> bool {
        let well_formed = !name.is_empty()
            && name.len() <= MAX_NAME_BYTES
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
        let admitted = well_formed && {
            let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
            let known = names.entry(plugin.to_string()).or_default();
            known.contains(name) || (known.len() < self.max_names_per_plugin && known.insert(name.to_string()))
        };
        if !admitted {
            self.guest_refused.with_label_values(&[plugin]).inc();
        }
        admitted
    }
}

#[cfg(test)]
mod tests {
    use super::PluginMetrics;

    #[test]
    fn guest_names_are_checked_and_capped() {
        let metrics = PluginMetrics::with_name_cap(&prometheus::Registry::new(), 2).unwrap();
        metrics.guest_counter_add("p", "a", 1);
        metrics.guest_counter_add("p", "b", 1);
        metrics.guest_counter_add("p", "a", 1); // known: still admitted
        metrics.guest_counter_add("p", "c", 1); // third name: refused
        metrics.guest_counter_add("p", "Bad Name", 1);
        metrics.guest_histogram_record("p", "a", f64::NAN);
        metrics.guest_counter_add("q", "c", 1); // another plugin has its own cap
        assert_eq!(metrics.guest_counters.with_label_values(&["p", "a"]).get(), 2);
        assert_eq!(metrics.guest_counters.with_label_values(&["q", "c"]).get(), 1);
        assert_eq!(metrics.guest_refused.with_label_values(&["p"]).get(), 3);
    }
}
