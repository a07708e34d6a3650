//! Every integration test of the engine in one binary (as wasmtime's `tests/all`): each module is
//! one topic, `common` finds the real models and builds engines for them.

mod common;

mod embed;
mod generation;
mod golden;
mod model_dirs;
mod packed_kernel;
mod quic;
