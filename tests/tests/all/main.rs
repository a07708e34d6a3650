//! Every end-to-end test of the edge in one binary (as wasmtime's `tests/all`): each module is one
//! topic. One binary links wasmtime once, instead of once per topic.

mod anthropic_sdk;
mod budgets;
mod cache;
mod dispatch;
mod engine;
mod errors;
mod fair_sharing;
mod fallback;
mod fault_matrix;
mod guarantees;
mod ledger;
mod metrics;
mod openai_sdk;
mod pii_recall;
mod plugin_languages;
mod plugin_runtime;
mod plugins;
mod prefix_routing;
mod provider_cache;
mod regions_netns;
mod relay;
mod reload;
mod shapes;
mod shutdown;
mod soak;
mod status_page;
mod target_health;
mod telemetry;
mod translation;
mod transport;
mod upstream_bounds;
