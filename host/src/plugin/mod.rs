//! The plugin runtime: routers and privacy filters as WebAssembly components (the contract is
//! `wit/meridian-plugin.wit`), run by wasmtime with a fresh instance for every call (or, for a
//! filter's view of one answer, one instance for the whole answer).
//!
//! One [`PluginRuntime`] per node owns the engine (a pooling allocator sized by
//! [`PluginSettings`], an epoch ticker for deadlines), the on-disk cache of compiled artifacts, the
//! instance semaphore and the failure bookkeeping. It loads a component as a [`RouterPlugin`] or a
//! [`FilterPlugin`] after checking its world and letting it validate its configuration once.
//!
//! Every call then gets a new instance (in a store kept from an earlier call of the same plugin
//! that went well, or a new one: `spare`), with a memory cap, a deadline, WASI with
//! nothing in it (no files, environment, arguments or sockets; stdout and stderr go to capped
//! buffers that are forwarded to the log), and the `host` interface (log, metrics, clock). A
//! plugin never sees another request's state, and a plugin that traps, runs out of time or memory,
//! or answers outside the contract gets a typed [`PluginError`]; a plugin version that fails
//! repeatedly is quarantined.
//!
//! The one exception is a filter's view of an answer: `inspect-response` sees the answer's text in
//! order, so one answer's pieces (stream chunks) all go to one instance, through a
//! [`ResponseSession`] ([`FilterPlugin::response_session`]). Each of its calls has the limits and
//! bookkeeping of a one-shot call (the deadline re-armed per call); a failure poisons the session,
//! so the rest of that answer is refused. A session holds its instance slot until dropped: a
//! streamed answer holds one instance per filter for the stream's duration, in its tenant's
//! [`SessionSlots`] (never the slots other tenants' calls need). Instances are still never shared
//! between answers or requests.
//!
//! ```no_run
//! # use meridian::plugin::{RequestSummary, Target};
//! # async fn run(summary: RequestSummary, targets: Vec<Target>) -> Result<(), meridian::plugin::PluginError> {
//! use std::sync::Arc;
//! use meridian::plugin::{CallLimits, PluginMetrics, PluginRuntime, PluginSettings};
//!
//! let metrics = Arc::new(PluginMetrics::new(&prometheus::Registry::new()).expect("fresh registry"));
//! let runtime = PluginRuntime::new(PluginSettings::default(), metrics)?;
//! let path = std::path::Path::new("target/wasm32-unknown-unknown/release/latency_router.wasm");
//! let router = runtime.load_router("latency-router", "1.0.0", path, "{}", CallLimits::default()).await?;
//! let outcome = router.route(&summary, &targets, &[]).await?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::time::Duration;

mod bindings;
mod cache;
mod componentize;
mod entry;
mod gate;
mod metrics;
mod runtime;
mod snapshot;
mod spare;
mod stdio;
mod validate;

pub use bindings::{
    CachePolicy, Decision, Health, HourPrice, Inspection, Outcome, PriceModel, Redaction, Refusal, RequestSummary,
    RequestVerdict, ResponseVerdict, Segment, SegmentKind, Target, TargetKind, TokenPrice,
};
pub use cache::CacheStats;
pub use gate::{Triggers, LOOKBEHIND};
pub use metrics::PluginMetrics;
pub use runtime::{
    CallLimits, FilterPlugin, PluginId, PluginRuntime, PluginSettings, ResponseSession, RouterPlugin, RouterSession,
    SessionSlots, WasmSource,
};
pub use validate::valid_entity;

/// Why a plugin could not be loaded, or a call to it gave no usable answer.
///
/// The call-time variants (`Timeout` to `Quarantined`) are what the request path turns into its
/// failure policy: a router's failure falls back to the static target order, a filter's failure
/// blocks the request.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The call ran past its deadline and was interrupted.
    #[error("the plugin did not answer within its deadline of {0:?}")]
    Timeout(Duration),
    /// The instance tried to grow its memory past its cap.
    #[error("the plugin exceeded its memory cap of {0} bytes")]
    MemoryLimit(usize),
    /// The instance trapped (a guest panic, an `unreachable`, a bad memory access…).
    #[error("the plugin trapped: {0}")]
    Trap(String),
    /// The plugin answered, but not within the contract (an unknown target, a bad redaction…).
    #[error("the plugin answered outside its contract: {0}")]
    InvalidOutput(String),
    /// The plugin's `configure` refused its configuration; the text is the plugin's.
    #[error("the plugin refused its configuration: {0}")]
    ConfigRejected(String),
    /// The component does not implement the world it was loaded as (or imports more than the
    /// host offers); the text names what is missing.
    #[error("the component is not a valid `{world}` plugin: {message}")]
    WrongWorld {
        /// The world it was loaded as: `router` or `privacy-filter`.
        world: &'static str,
        /// What is missing or mismatched.
        message: String,
    },
    /// The bytes are not a valid WebAssembly component, or wasmtime could not compile them.
    #[error("cannot compile the component: {0}")]
    Compile(String),
    /// A file could not be read or a directory created.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The artifact cache's directory or seal key is not this user's alone (writable by others,
    /// owned by another user, or a symlink): nothing in it is trusted, so the node refuses it.
    #[error("{path}: refused as the plugin artifact cache: {reason}")]
    InsecureCache {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Settings or limits that cannot work (a memory cap above the pool's slot, a zero count…).
    #[error("invalid plugin settings: {0}")]
    Settings(String),
    /// The engine refused to start or to create an instance for a reason other than the guest's
    /// behaviour.
    #[error("plugin runtime error: {0}")]
    Runtime(String),
    /// Every instance slot stayed busy for the whole wait.
    #[error("no plugin instance became free within {0:?}")]
    Overloaded(Duration),
    /// This plugin version failed too often recently and is not run any more.
    #[error("plugin {0} is quarantined after repeated failures")]
    Quarantined(PluginId),
    /// An earlier call of this [`ResponseSession`] failed, so its instance is gone and the rest
    /// of the answer is not inspected (the first failure was reported and counted).
    #[error("an earlier call of the plugin on this answer failed; the rest of the answer is refused")]
    Poisoned,
}

impl PluginError {
    /// A short, stable name for metrics and logs (`timeout`, `memory_limit`, `trap`…).
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Timeout(_) => "timeout",
            PluginError::MemoryLimit(_) => "memory_limit",
            PluginError::Trap(_) => "trap",
            PluginError::InvalidOutput(_) => "invalid_output",
            PluginError::ConfigRejected(_) => "config_rejected",
            PluginError::WrongWorld { .. } => "wrong_world",
            PluginError::Compile(_) => "compile",
            PluginError::Io { .. } => "io",
            PluginError::InsecureCache { .. } => "insecure_cache",
            PluginError::Settings(_) => "settings",
            PluginError::Runtime(_) => "runtime",
            PluginError::Overloaded(_) => "overloaded",
            PluginError::Quarantined(_) => "quarantined",
            PluginError::Poisoned => "poisoned",
        }
    }

    /// Whether the plugin itself is to blame, so that the failure counts towards quarantine.
    /// Overload and quarantine are the node's state, not the plugin's behaviour; a poisoned
    /// session's later calls repeat a failure already counted.
    pub fn is_plugin_fault(&self) -> bool {
        matches!(
            self,
            PluginError::Timeout(_)
                | PluginError::MemoryLimit(_)
                | PluginError::Trap(_)
                | PluginError::InvalidOutput(_)
                | PluginError::ConfigRejected(_)
        )
    }
}
