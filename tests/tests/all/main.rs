//! Every end-to-end test of the edge in one binary (as wasmtime's `tests/all`): each module is one
//! topic. One binary links wasmtime once, instead of once per topic.

mod cache;
mod dispatch;
mod engine;
mod errors;
mod fallback;
mod guarantees;
mod metrics;
mod openai_sdk;
mod plugin_runtime;
mod plugins;
mod regions_netns;
mod relay;
mod reload;
mod shapes;
mod target_health;
mod translation;
mod transport;
