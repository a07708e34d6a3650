//! Prometheus metrics of the edge, served at `GET /metrics`.

use prometheus::{
    exponential_buckets, CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{MetricFamily, MetricType};

use crate::stats::Snapshot;

/// The `model` label of a request whose model this edge does not serve (or that named none).
/// Label values a client chooses are never used as they are: each would be a new series held
/// for the life of the process, so a client could grow the node's memory without bound.
pub const UNKNOWN_MODEL: &str = "unknown";

/// Every metric the edge exports.
pub struct Metrics {
    registry: Registry,
    /// This struct's own metrics, declared in the exposition even before their first sample.
    declared: Vec<Arc<dyn Collector>>,
    /// `meridian_requests_total{api,tenant,model,target,status}`: finished requests.
    pub requests: IntCounterVec,
    /// `meridian_request_duration_seconds{tenant,model,target}`: time to the last byte.
    pub duration: HistogramVec,
    /// `meridian_time_to_first_token_seconds{tenant,model,target}`: streams' first content.
    pub ttft: HistogramVec,
    /// `meridian_tokens_total{tenant,model,target,direction}`: input and output tokens.
    pub tokens: IntCounterVec,
    /// `meridian_cost_usd_total{tenant,model,target}`: cost under each target's price model.
    pub cost: CounterVec,
    /// `meridian_upstream_attempts_total{target,outcome}`: each try of a target.
    pub attempts: IntCounterVec,
    /// `meridian_cache_lookups_total{result}`: hit, miss, bypass.
    pub cache_lookups: IntCounterVec,
    /// `meridian_cache_coalesced_total`: requests that waited for an identical one instead of
    /// calling upstream.
    pub cache_coalesced: prometheus::IntCounter,
    /// `meridian_cache_bytes`: weighted size of cached answers.
    pub cache_bytes: IntGauge,
    /// `meridian_cache_entries`: cached answers.
    pub cache_entries: IntGauge,
    /// `meridian_shared_state_up{store}`: 1 while the Redis a region's edges share answers
    /// (`store="cache"`: the prompt cache's shared level; `"budgets"`: the budgets' counters), 0
    /// while the edge serves on its own state.
    pub shared_state_up: IntGaugeVec,
    /// `meridian_requests_in_flight`: chat requests being served.
    pub in_flight: IntGauge,
    /// `meridian_target_latency_ms{target}`: smoothed latency to the first byte (0 until measured).
    pub target_latency: GaugeVec,
    /// `meridian_target_health{target}`: 1 healthy, 0.5 degraded or half-open, 0 ejected.
    pub target_health: GaugeVec,
    /// `meridian_target_in_flight{target}`: requests in flight to each target.
    pub target_in_flight: IntGaugeVec,
    /// `meridian_engine_info{target,provider}`: 1 for the execution provider each engine target
    /// reports running on.
    pub engine_info: IntGaugeVec,
    /// `meridian_engine_tokens_per_second{target}`: generation speed each engine reports.
    pub engine_tokens_per_second: GaugeVec,
    /// `meridian_engine_prefix_cache_hits_total{target}`: prompts each engine began from its
    /// prefix cache (as it reports them).
    pub engine_prefix_hits: IntCounterVec,
    /// `meridian_engine_prefix_cache_tokens_reused_total{target}`: prompt tokens whose prefill
    /// each engine's prefix cache saved.
    pub engine_prefix_tokens_reused: IntCounterVec,
    /// `meridian_engine_prefix_cache_bytes{target}`: KV bytes each engine's prefix cache holds.
    pub engine_prefix_bytes: IntGaugeVec,
    /// `meridian_target_ejections_total{target}`: outlier ejections.
    pub target_ejections: IntCounterVec,
    /// `meridian_relay_refusals_total{reason}`: relayed requests refused before dispatch because
    /// the sending node may not relay them (`unauthorized_peer`, `bad_path`,
    /// `tenant_not_accepted`).
    pub relay_refusals: IntCounterVec,
    /// The ledger writer's own metrics.
    pub ledger: LedgerMetrics,
}

/// What the ledger's writer did (see `crate::ledger`).
#[derive(Clone)]
pub struct LedgerMetrics {
    /// `meridian_ledger_records_total{result}`: records `written` to the store, or `spilled` to
    /// the spill file because the store refused them (written later).
    pub records: IntCounterVec,
    /// `meridian_ledger_queue`: records waiting for the writer.
    pub queue: IntGauge,
    /// `meridian_standing_cost_usd_total{target}`: dedicated targets' hours, busy or idle.
    pub standing_cost: CounterVec,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let latency = exponential_buckets(0.0005, 2.0, 18).expect("valid buckets");
        let requests = IntCounterVec::new(
            Opts::new("meridian_requests_total", "Chat requests finished, by outcome"),
            &["api", "tenant", "model", "target", "status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new("meridian_request_duration_seconds", "Time from request to last byte")
                .buckets(latency.clone()),
            &["tenant", "model", "target"],
        )
        .expect("valid metric");
        let ttft = HistogramVec::new(
            HistogramOpts::new("meridian_time_to_first_token_seconds", "Time from request to first streamed content")
                .buckets(latency),
            &["tenant", "model", "target"],
        )
        .expect("valid metric");
        let tokens = IntCounterVec::new(
            Opts::new("meridian_tokens_total", "Tokens processed (from upstream usage, else estimated)"),
            &["tenant", "model", "target", "direction"],
        )
        .expect("valid metric");
        let cost = CounterVec::new(
            Opts::new("meridian_cost_usd_total", "Cost in USD under each target's price model"),
            &["tenant", "model", "target"],
        )
        .expect("valid metric");
        let attempts = IntCounterVec::new(
            Opts::new("meridian_upstream_attempts_total", "Upstream attempts, by outcome"),
            &["target", "outcome"],
        )
        .expect("valid metric");
        let cache_lookups =
            IntCounterVec::new(Opts::new("meridian_cache_lookups_total", "Prompt cache lookups"), &["result"])
                .expect("valid metric");
        let cache_coalesced = prometheus::IntCounter::new(
            "meridian_cache_coalesced_total",
            "Requests served by waiting for an identical request in flight",
        )
        .expect("valid metric");
        let cache_bytes = IntGauge::new("meridian_cache_bytes", "Size of cached answers").expect("valid metric");
        let cache_entries = IntGauge::new("meridian_cache_entries", "Cached answers").expect("valid metric");
        let shared_state_up = IntGaugeVec::new(
            Opts::new(
                "meridian_shared_state_up",
                "Whether the Redis shared by the region's edges answers (1) or not (0)",
            ),
            &["store"],
        )
        .expect("valid metric");
        let in_flight =
            IntGauge::new("meridian_requests_in_flight", "Chat requests being served").expect("valid metric");
        let target_latency = GaugeVec::new(
            Opts::new("meridian_target_latency_ms", "Smoothed latency to each target's first byte, in ms"),
            &["target"],
        )
        .expect("valid metric");
        let target_health = GaugeVec::new(
            Opts::new("meridian_target_health", "Target health: 1 healthy, 0.5 degraded or half-open, 0 ejected"),
            &["target"],
        )
        .expect("valid metric");
        let target_in_flight =
            IntGaugeVec::new(Opts::new("meridian_target_in_flight", "Requests in flight to each target"), &["target"])
                .expect("valid metric");
        let engine_info = IntGaugeVec::new(
            Opts::new("meridian_engine_info", "The execution provider each engine target runs on (value 1)"),
            &["target", "provider"],
        )
        .expect("valid metric");
        let engine_tokens_per_second = GaugeVec::new(
            Opts::new("meridian_engine_tokens_per_second", "Tokens per second each engine target reports"),
            &["target"],
        )
        .expect("valid metric");
        let engine_prefix_hits = IntCounterVec::new(
            Opts::new(
                "meridian_engine_prefix_cache_hits_total",
                "Prompts each engine target began from its prefix cache",
            ),
            &["target"],
        )
        .expect("valid metric");
        let engine_prefix_tokens_reused = IntCounterVec::new(
            Opts::new(
                "meridian_engine_prefix_cache_tokens_reused_total",
                "Prompt tokens whose prefill each engine target's prefix cache saved",
            ),
            &["target"],
        )
        .expect("valid metric");
        let engine_prefix_bytes = IntGaugeVec::new(
            Opts::new("meridian_engine_prefix_cache_bytes", "KV bytes each engine target's prefix cache holds"),
            &["target"],
        )
        .expect("valid metric");
        let target_ejections = IntCounterVec::new(
            Opts::new("meridian_target_ejections_total", "Outlier ejections of each target"),
            &["target"],
        )
        .expect("valid metric");
        let relay_refusals = IntCounterVec::new(
            Opts::new(
                "meridian_relay_refusals_total",
                "Relayed requests refused because the sender may not relay them",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let ledger = LedgerMetrics {
            records: IntCounterVec::new(
                Opts::new("meridian_ledger_records_total", "Ledger records written to the store or spilled"),
                &["result"],
            )
            .expect("valid metric"),
            queue: IntGauge::new("meridian_ledger_queue", "Ledger records waiting for the writer")
                .expect("valid metric"),
            standing_cost: CounterVec::new(
                Opts::new("meridian_standing_cost_usd_total", "Dedicated targets' cost over wall time, busy or idle"),
                &["target"],
            )
            .expect("valid metric"),
        };
        let declared: Vec<Arc<dyn Collector>> = vec![
            Arc::new(requests.clone()),
            Arc::new(ledger.records.clone()),
            Arc::new(ledger.queue.clone()),
            Arc::new(ledger.standing_cost.clone()),
            Arc::new(target_latency.clone()),
            Arc::new(target_health.clone()),
            Arc::new(target_in_flight.clone()),
            Arc::new(engine_info.clone()),
            Arc::new(engine_tokens_per_second.clone()),
            Arc::new(engine_prefix_hits.clone()),
            Arc::new(engine_prefix_tokens_reused.clone()),
            Arc::new(engine_prefix_bytes.clone()),
            Arc::new(target_ejections.clone()),
            Arc::new(relay_refusals.clone()),
            Arc::new(duration.clone()),
            Arc::new(ttft.clone()),
            Arc::new(tokens.clone()),
            Arc::new(cost.clone()),
            Arc::new(attempts.clone()),
            Arc::new(cache_lookups.clone()),
            Arc::new(cache_coalesced.clone()),
            Arc::new(cache_bytes.clone()),
            Arc::new(cache_entries.clone()),
            Arc::new(shared_state_up.clone()),
            Arc::new(in_flight.clone()),
        ];
        for c in &declared {
            registry.register(Box::new(Shared(Arc::clone(c)))).expect("metric names are unique");
        }
        Metrics {
            registry,
            declared,
            ledger,
            requests,
            duration,
            ttft,
            tokens,
            cost,
            attempts,
            cache_lookups,
            cache_coalesced,
            cache_bytes,
            cache_entries,
            shared_state_up,
            in_flight,
            target_latency,
            target_health,
            target_in_flight,
            engine_info,
            engine_tokens_per_second,
            engine_prefix_hits,
            engine_prefix_tokens_reused,
            engine_prefix_bytes,
            target_ejections,
            relay_refusals,
        }
    }

    /// Sets the per-target gauges (and catches the ejection and engine counters up) from a
    /// target's stats.
    pub fn observe_target(&self, target: &str, s: &Snapshot) {
        self.target_latency.with_label_values(&[target]).set(s.latency_ms.unwrap_or(0.0));
        self.target_health.with_label_values(&[target]).set(s.health.gauge());
        self.target_in_flight.with_label_values(&[target]).set(i64::from(s.in_flight));
        if let Some(engine) = &s.engine {
            self.engine_info.with_label_values(&[target, &engine.provider]).set(1);
            self.engine_tokens_per_second.with_label_values(&[target]).set(engine.tokens_per_second);
            catch_up(&self.engine_prefix_hits, target, engine.prefix_cache_hits);
            catch_up(&self.engine_prefix_tokens_reused, target, engine.prefix_cache_tokens_reused);
            let bytes = i64::try_from(engine.prefix_cache_bytes).unwrap_or(i64::MAX);
            self.engine_prefix_bytes.with_label_values(&[target]).set(bytes);
        }
        catch_up(&self.target_ejections, target, s.ejections_total);
    }

    /// The registry, for metrics registered elsewhere (the plugin runtime's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric. The edge's own metrics that have no
    /// sample yet (a labelled counter nothing has incremented) are declared with their `# HELP`
    /// and `# TYPE` lines alone, so that a scraper (and a test) can tell a metric at zero from a
    /// name that does not exist.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a metric that fails to encode is a bug.
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("metrics encode");
        let mut text = String::from_utf8(buf).unwrap_or_default();
        for family in self.declared.iter().flat_map(|c| c.collect()).filter(|f| f.get_metric().is_empty()) {
            let kind = match family.get_field_type() {
                MetricType::COUNTER => "counter",
                MetricType::GAUGE => "gauge",
                MetricType::HISTOGRAM => "histogram",
                MetricType::SUMMARY => "summary",
                MetricType::UNTYPED => "untyped",
            };
            let help = family.help().replace('\\', "\\\\").replace('\n', "\\n");
            text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n", name = family.name()));
        }
        text
    }

    /// The `model` label of a request for `model`: the name itself when this edge serves it
    /// (`served`), else [`UNKNOWN_MODEL`], so that the label's values are bounded by the config.
    pub fn model_label(model: &str, served: bool) -> &str {
        if served {
            model
        } else {
            UNKNOWN_MODEL
        }
    }
}

/// A collector registered in the registry and also kept by [`Metrics`] to declare it.
struct Shared(Arc<dyn Collector>);

impl Collector for Shared {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Raises the counter of `target` to `total`, a count kept elsewhere (a target's statistics, an
/// engine's report); a total below it (an engine restarted) leaves it as it is.
fn catch_up(counter: &IntCounterVec, target: &str, total: u64) {
    let counter = counter.with_label_values(&[target]);
    counter.inc_by(total.saturating_sub(counter.get()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_without_samples_are_declared() {
        let metrics = Metrics::new();
        metrics.cache_lookups.with_label_values(&["hit"]).inc();
        let text = metrics.render();
        assert!(text.contains("# TYPE meridian_requests_total counter\n"), "{text}");
        assert!(text.contains("# TYPE meridian_request_duration_seconds histogram\n"), "{text}");
        assert!(text.contains("meridian_cache_lookups_total{result=\"hit\"} 1\n"), "{text}");
        assert_eq!(text.matches("# TYPE meridian_cache_lookups_total ").count(), 1, "declared once: {text}");
    }

    #[test]
    fn only_served_models_are_labels() {
        assert_eq!(Metrics::model_label("gpt-test", true), "gpt-test");
        assert_eq!(Metrics::model_label("made-up", false), UNKNOWN_MODEL);
    }
}
