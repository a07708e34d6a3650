//! Meridian engine node: runs decoder LLMs and embedding models with ONNX Runtime (TensorRT ▸ CUDA ▸
//! CPU) and serves them to edge nodes over QUIC with mutual TLS.
//!
//! The core is transport-free: [`api`] holds the request and event types and the [`api::Backend`]
//! trait. The scheduler implements it on top of ONNX Runtime sessions; the QUIC server and client
//! carry it in the frames that `PROTOCOL.md` describes.
#![warn(missing_docs)]

pub mod api;
pub mod certs;
pub mod client;
pub mod config;
pub mod detok;
pub mod embed;
pub mod kv;
pub mod model;
pub mod node;
pub mod packed_matmul;
pub mod prefix;
pub mod runtime;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod telemetry;
pub mod template;
pub mod tls;
pub mod wire;
