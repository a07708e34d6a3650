//! Meridian's edge node: an OpenAI- and Anthropic-compatible gateway in front of managed LLM APIs,
//! with a prompt cache, per-request accounting and Prometheus metrics.
//!
//! The request path (see `ARCHITECTURE.md`), a file per phase of [`edge`]: admit (tenant,
//! rate, in-flight limit), parse ([`api`] normalizes the body to [`chat::ChatRequest`]), filter
//! and route ([`chain`], then the [`dispatch`] core's plan under the tenant's guarantees), cache
//! ([`cache`] answers repeats), dispatch (the core's attempts over [`upstream`] targets), respond
//! in the client's shape, and record what it cost ([`accounting`], [`metrics`]).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = meridian::config::Config::load(std::path::Path::new("regions/local/edge.toml"))?;
//! let server = meridian::server::Server::bind(config).await?;
//! println!("listening on {}", server.local_addr());
//! server.run(async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod accounting;
pub mod api;
pub mod budget;
pub mod cache;
pub mod chain;
pub mod chat;
pub mod config;
pub mod cost;
pub mod dispatch;
pub mod edge;
pub mod error;
pub mod ledger;
pub mod metrics;
pub mod periodic;
pub mod plugin;
pub mod redaction;
pub mod redis_link;
pub mod relay;
pub mod routes;
pub mod server;
pub mod simulate;
pub mod sse;
pub mod stats;
pub mod tenant;
pub mod topology;
pub mod upstream;

#[cfg(test)]
mod layering;
