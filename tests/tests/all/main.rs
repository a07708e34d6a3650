//! Every end-to-end test of the edge in one binary (as wasmtime's `tests/all`): each module is one
//! topic. One binary links wasmtime once, instead of once per topic.

mod budgets;
mod cache;
mod dispatch;
mod engine;
mod errors;
mod fallback;
mod guarantees;
mod ledger;
mod metrics;
mod openai_sdk;
mod plugin_runtime;
mod plugins;
mod provider_cache;
mod regions_netns;
mod relay;
mod reload;
mod shapes;
mod target_health;
mod translation;
mod transport;
