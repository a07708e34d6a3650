//! An engine node: its TOML config, and the scheduler with its QUIC server started from it.
//!
//! ```toml
//! [node]
//! name = "engine-local"
//! listen = "127.0.0.1:7443"
//! [tls]          # the cluster identity (`meridian certs`)
//! ca = "certs/ca.pem"
//! cert = "certs/engine-local.pem"
//! key = "certs/engine-local.key"
//! [runtime]      # see config::RuntimeConfig
//! [scheduler]    # see config::SchedulerConfig
//! [telemetry]    # optional: otlp_endpoint = "http://127.0.0.1:4318" (see telemetry)
//! [[models]]
//! name = "smollm2-135m-instruct"
//! path = "models/smollm2-135m-instruct/int4"
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tracing::info;

use crate::config::{EngineConfig, ModelConfig, RuntimeConfig, SchedulerConfig};
use crate::scheduler::{Engine, LoadError};
use crate::server::{EngineServer, ServerError, ServerLimits};
use crate::telemetry::{Exporter, TelemetryConfig};
use crate::tls::{Identity, TlsError};

/// Why a node could not be configured or started.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The config file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The config file is not valid (the message names the key).
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The TLS identity could not be loaded.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// A model or the runtime could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The QUIC server could not start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// Loading the models stopped without a result (its thread panicked).
    #[error("model loading stopped: {0}")]
    Interrupted(String),
}

/// The engine node's whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// `[node]`.
    pub node: NodeSection,
    /// `[tls]`.
    pub tls: TlsFiles,
    /// `[log]`.
    #[serde(default)]
    pub log: LogConfig,
    /// `[runtime]`.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// `[scheduler]`.
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    /// `[telemetry]`: where chat requests' spans go (OTLP over HTTP); none by default.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// `[[models]]`.
    pub models: Vec<ModelConfig>,
}

/// `[node]`: name, address and protocol limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The node's name (logs; its certificate should carry it).
    pub name: String,
    /// UDP address for QUIC.
    pub listen: SocketAddr,
    /// Largest frame accepted, in bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// Request streams open at once per edge connection.
    #[serde(default = "default_max_streams")]
    pub max_streams_per_connection: u32,
    /// Time for a new stream's first frame.
    #[serde(default = "default_first_frame_ms")]
    pub first_frame_timeout_ms: u64,
    /// How long a stopping node lets requests in flight finish (new streams are refused at once
    /// meanwhile) before it closes its connections (default 10 000).
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Async worker threads of the node's process (`meridian engine`, and `meridian up`, whose
    /// edge shares them); default [`DEFAULT_IO_THREADS`].
    #[serde(default = "default_io_threads")]
    pub io_threads: usize,
}

/// The node's async workers by default: one. They only relay frames; the CPUs belong to the
/// model's intra-op threads, which take every core during a step. A second worker adds no
/// parallelism there, only wakeups handed between the two, and each one preempts a compute thread
/// mid-step (README, "Engine": the relay's context switches per token).
pub const DEFAULT_IO_THREADS: usize = 1;

fn default_io_threads() -> usize {
    DEFAULT_IO_THREADS
}

fn default_max_frame() -> usize {
    ServerLimits::default().max_frame
}

fn default_max_streams() -> u32 {
    ServerLimits::default().max_streams_per_connection
}

fn default_first_frame_ms() -> u64 {
    ServerLimits::default().first_frame_timeout.as_millis() as u64
}

fn default_shutdown_grace_ms() -> u64 {
    ServerLimits::default().shutdown_grace.as_millis() as u64
}

/// `[tls]`: PEM files of the cluster's mutual TLS; relative paths are from the file's folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA; edges must present certificates it signed.
    pub ca: PathBuf,
    /// This node's certificate chain.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter such as `info`; `RUST_LOG` wins.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: LogFormat::Text }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

impl NodeConfig {
    /// Reads and validates a file; relative paths are made relative to its folder.
    pub fn load(path: &Path) -> Result<NodeConfig, NodeError> {
        let text = std::fs::read_to_string(path).map_err(|source| NodeError::Read { path: path.into(), source })?;
        let invalid = |message: String| NodeError::Config { path: path.into(), message };
        let mut config: NodeConfig = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new(""));
        for p in [&mut config.tls.ca, &mut config.tls.cert, &mut config.tls.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if config.node.io_threads == 0 {
            return Err(invalid("node.io_threads: at least 1".into()));
        }
        let mut engine = config.engine();
        engine.resolve_paths(base);
        engine.validate().map_err(invalid)?;
        if engine.models.is_empty() {
            return Err(invalid("models: an engine node needs at least one model".into()));
        }
        config.models = engine.models;
        config.runtime = engine.runtime;
        Ok(config)
    }

    /// The scheduler's part of the config.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig { runtime: self.runtime.clone(), scheduler: self.scheduler.clone(), models: self.models.clone() }
    }

    /// The QUIC server's limits.
    pub fn limits(&self) -> ServerLimits {
        ServerLimits {
            max_streams_per_connection: self.node.max_streams_per_connection,
            max_frame: self.node.max_frame_bytes,
            first_frame_timeout: Duration::from_millis(self.node.first_frame_timeout_ms),
            shutdown_grace: Duration::from_millis(self.node.shutdown_grace_ms),
        }
    }
}

/// A started engine node: models loaded, QUIC socket bound.
pub struct Node {
    engine: Arc<Engine>,
    server: EngineServer,
    addr: SocketAddr,
}

impl Node {
    /// Loads the identity and the models (off the async workers: loading takes seconds) and
    /// binds the QUIC server.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        let identity = Identity::from_pem_files(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
        let engine_config = config.engine();
        let engine = tokio::task::spawn_blocking(move || Engine::start(&engine_config))
            .await
            .map_err(|e| NodeError::Interrupted(e.to_string()))??;
        if let Some(endpoint) = &config.telemetry.otlp_endpoint {
            let service = config.telemetry.service_name.as_deref().unwrap_or("meridian-engine");
            let exporter = Exporter::start(endpoint, service, vec![("meridian.node", config.node.name.clone())])
                .map_err(|message| NodeError::Config { path: "[telemetry]".into(), message })?;
            engine.trace_to(exporter);
        }
        let server = EngineServer::bind(config.node.listen, &identity, Arc::clone(&engine) as _, config.limits())?;
        let addr = server.local_addr().map_err(|source| ServerError::Bind { addr: config.node.listen, source })?;
        info!(node = %config.node.name, %addr, provider = engine.provider(), "engine node ready");
        Ok(Node { engine, server, addr })
    }

    /// The bound QUIC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The scheduler.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Serves until `shutdown` completes, then drains requests in flight.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let handle = match self.server.spawn() {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "engine server could not start");
                return;
            }
        };
        shutdown.await;
        info!("engine node shutting down");
        handle.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `text` as a node config file (in a folder of its own, removed after).
    fn load(text: &str) -> Result<NodeConfig, NodeError> {
        let dir = std::env::temp_dir().join(format!("meridian-node-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("engine.toml");
        std::fs::write(&path, text).unwrap();
        let loaded = NodeConfig::load(&path);
        std::fs::remove_dir_all(&dir).unwrap();
        loaded
    }

    const NODE: &str = "[node]\nname = \"e\"\nlisten = \"127.0.0.1:0\"\n";
    const REST: &str =
        "[tls]\nca = \"ca.pem\"\ncert = \"e.pem\"\nkey = \"e.key\"\n[[models]]\nname = \"smol\"\npath = \"smol\"\n";

    #[test]
    fn io_threads_default_to_one_and_zero_is_refused() {
        let config = load(&format!("{NODE}{REST}")).unwrap();
        assert_eq!(config.node.io_threads, DEFAULT_IO_THREADS);
        assert_eq!(DEFAULT_IO_THREADS, 1);
        assert_eq!(load(&format!("{NODE}io_threads = 4\n{REST}")).unwrap().node.io_threads, 4);
        let err = load(&format!("{NODE}io_threads = 0\n{REST}")).unwrap_err().to_string();
        assert!(err.contains("node.io_threads: at least 1"), "{err}");
    }
}
