//! Finding and initialising the ONNX Runtime library (once per process), and building sessions on
//! the configured execution provider.
//!
//! The library is loaded at run time (`ort`'s `load-dynamic`), looked for in this order:
//! 1. `ORT_DYLIB_PATH`;
//! 2. `$MERIDIAN_HOME/ort/libonnxruntime.so` (`MERIDIAN_HOME` defaults to `.meridian` in the current
//!    directory), where `scripts/setup-engine` puts it;
//! 3. an installed Python `onnxruntime` package (`capi/libonnxruntime.so*`).
//!
//! Providers: `auto` tries TensorRT ▸ CUDA ▸ CPU and records the first that registers; a provider
//! named explicitly that cannot be registered is an error, not a fallback.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;

use crate::config::{Provider, RuntimeConfig};
use crate::packed_matmul;

/// Why ONNX Runtime or a session could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// No ONNX Runtime library was found.
    #[error(
        "no ONNX Runtime library found (looked at: {looked}). Run scripts/setup-engine, or \
         `pip install onnxruntime==1.31.1` and set ORT_DYLIB_PATH to its \
         onnxruntime/capi/libonnxruntime.so.1.31.1"
    )]
    NotFound {
        /// The places tried, for the message.
        looked: String,
    },
    /// The library was found but could not be loaded or initialised.
    #[error("ONNX Runtime at {path} could not be loaded: {message}")]
    Load {
        /// The library file.
        path: PathBuf,
        /// ONNX Runtime's or the loader's message.
        message: String,
    },
    /// The provider named in the config could not be registered.
    #[error("execution provider {provider} is not usable with this ONNX Runtime: {message}")]
    Provider {
        /// The provider asked for.
        provider: Provider,
        /// Why.
        message: String,
    },
    /// A session could not be created.
    #[error("ONNX Runtime session for {path}: {message}")]
    Session {
        /// The model file.
        path: PathBuf,
        /// ONNX Runtime's message.
        message: String,
    },
}

/// The initialised ONNX Runtime: one environment per process.
#[derive(Debug)]
pub struct Runtime {
    env: Environment,
    library: PathBuf,
}

static RUNTIME: OnceLock<Result<Runtime, RuntimeError>> = OnceLock::new();

/// The process's ONNX Runtime, found and initialised on first use.
pub fn runtime() -> Result<&'static Runtime, RuntimeError> {
    RUNTIME.get_or_init(init).as_ref().map_err(Clone::clone)
}

fn init() -> Result<Runtime, RuntimeError> {
    let library = find_library()?;
    let builder =
        ort::init_from(&library).map_err(|e| RuntimeError::Load { path: library.clone(), message: e.to_string() })?;
    let env = builder
        .with_name("meridian-engine")
        .build()
        .map_err(|e| RuntimeError::Load { path: library.clone(), message: e.to_string() })?;
    tracing::info!(library = %library.display(), "ONNX Runtime loaded");
    Ok(Runtime { env, library })
}

static HOME: OnceLock<PathBuf> = OnceLock::new();

/// Sets the directory [`meridian_home`] answers (e.g. from the node's config or a test's repo
/// root), once, before the runtime is first used; false if it was already set.
pub fn set_meridian_home(dir: PathBuf) -> bool {
    HOME.set(dir).is_ok()
}

/// The directory of Meridian's local state: what [`set_meridian_home`] set, else `$MERIDIAN_HOME`,
/// else `.meridian` in the current directory.
pub fn meridian_home() -> PathBuf {
    if let Some(home) = HOME.get() {
        return home.clone();
    }
    match std::env::var_os("MERIDIAN_HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home),
        _ => PathBuf::from(".meridian"),
    }
}

/// Where the ONNX Runtime library is, by the search order in the module docs.
pub fn find_library() -> Result<PathBuf, RuntimeError> {
    let mut looked = Vec::new();
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        // Named explicitly but absent: say so rather than silently using another one.
        return Err(RuntimeError::Load { path, message: "ORT_DYLIB_PATH names no file".into() });
    }
    looked.push("ORT_DYLIB_PATH (unset)".to_string());
    let home = meridian_home().join("ort").join("libonnxruntime.so");
    if home.is_file() {
        return Ok(home);
    }
    looked.push(home.display().to_string());
    match python_onnxruntime() {
        Some(path) => return Ok(path),
        None => looked.push("python3 onnxruntime package".into()),
    }
    Err(RuntimeError::NotFound { looked: looked.join(", ") })
}

fn python_onnxruntime() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import onnxruntime,os;print(os.path.dirname(onnxruntime.__file__))"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("capi");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so")))
        .collect();
    // The longest name is the versioned file (libonnxruntime.so.1.31.1), never a dangling link.
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.into_iter().next()
}

impl Runtime {
    /// The library file in use.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// A session builder with the thread settings, spinning, full graph optimisation and the
    /// execution provider registered; returns the provider that actually registered (never
    /// `Auto`).
    pub fn session_builder(&self, cfg: &RuntimeConfig) -> Result<(SessionBuilder, Provider), RuntimeError> {
        let err =
            |e: ort::Error<SessionBuilder>| RuntimeError::Session { path: PathBuf::new(), message: e.to_string() };
        let spin = if cfg.spinning { "1" } else { "0" };
        let intra = match cfg.intra_op_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let builder = Session::builder(&self.env)
            .map_err(|e| RuntimeError::Session { path: PathBuf::new(), message: e.to_string() })?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(err)?
            .with_intra_threads(intra)
            .map_err(err)?
            .with_inter_threads(cfg.inter_op_threads)
            .map_err(err)?
            .with_config_entry("session.intra_op.allow_spinning", spin)
            .map_err(err)?
            .with_config_entry("session.inter_op.allow_spinning", spin)
            .map_err(err)?;
        register_provider(builder, cfg)
    }

    /// Opens `model` with [`Runtime::session_builder`]'s settings.
    pub fn session(&self, cfg: &RuntimeConfig, model: &Path) -> Result<(Session, Provider), RuntimeError> {
        let (builder, provider) = self.session_builder(cfg)?;
        Ok((commit(builder, model, provider)?, provider))
    }

    /// Opens the decoder in `dir`: its packed graph (`model.packed.onnx`, whose 4-bit products run
    /// on [`packed_matmul`]'s kernel) when the session runs on the CPU, the CPU has that kernel and
    /// `cfg.packed_kernel` allows it; `model.onnx` otherwise. Returns the file it opened.
    pub fn decoder_session(
        &self,
        cfg: &RuntimeConfig,
        dir: &Path,
    ) -> Result<(Session, Provider, PathBuf), RuntimeError> {
        let (builder, provider) = self.session_builder(cfg)?;
        let packed = dir.join(packed_matmul::PACKED_MODEL);
        if provider == Provider::Cpu && cfg.packed_kernel && packed_matmul::supported() && packed.is_file() {
            let err = |message: String| RuntimeError::Session { path: packed.clone(), message };
            let domain = packed_matmul::domain().map_err(|e| err(e.to_string()))?;
            let builder = builder.with_operators(domain).map_err(|e| err(e.to_string()))?;
            return Ok((commit(builder, &packed, provider)?, provider, packed));
        }
        let model = dir.join("model.onnx");
        Ok((commit(builder, &model, provider)?, provider, model))
    }
}

/// Builds the session for `model`.
fn commit(mut builder: SessionBuilder, model: &Path, provider: Provider) -> Result<Session, RuntimeError> {
    let session = builder
        .commit_from_file(model)
        .map_err(|e| RuntimeError::Session { path: model.to_path_buf(), message: e.to_string() })?;
    tracing::info!(model = %model.display(), %provider, "session ready");
    Ok(session)
}

fn tensorrt(cfg: &RuntimeConfig) -> ep::ExecutionProviderDispatch {
    let mut trt = ep::TensorRT::default().with_device_id(cfg.device_id).with_fp16(cfg.trt_fp16);
    if let Some(dir) = &cfg.trt_cache_dir {
        trt = trt
            .with_engine_cache(true)
            .with_engine_cache_path(dir.display())
            .with_timing_cache(true)
            .with_timing_cache_path(dir.display());
    }
    trt.build().error_on_failure()
}

fn cuda(cfg: &RuntimeConfig) -> ep::ExecutionProviderDispatch {
    ep::CUDA::default().with_device_id(cfg.device_id).build().error_on_failure()
}

/// Registers one provider; `Err` carries the builder back with the reason.
// The builder travels by value so that a provider that fails leaves it to the next; this runs a
// few times per model load, so the size of `Err` costs nothing worth boxing for.
#[allow(clippy::result_large_err)]
fn try_register(
    builder: SessionBuilder,
    available: Result<bool, String>,
    ep: ep::ExecutionProviderDispatch,
) -> Result<SessionBuilder, (SessionBuilder, String)> {
    match available {
        Ok(true) => {}
        Ok(false) => return Err((builder, "not compiled into this ONNX Runtime build".into())),
        Err(e) => return Err((builder, e)),
    }
    builder.with_execution_providers([ep]).map_err(|e| {
        let message = e.to_string();
        (e.recover(), message)
    })
}

fn register_provider(builder: SessionBuilder, cfg: &RuntimeConfig) -> Result<(SessionBuilder, Provider), RuntimeError> {
    let trt_available = || ep::TensorRT::is_available().map_err(|e| e.to_string());
    let cuda_available = || ep::CUDA::is_available().map_err(|e| e.to_string());
    let explicit = |provider, (_, message): (SessionBuilder, String)| RuntimeError::Provider { provider, message };
    match cfg.provider {
        Provider::Cpu => Ok((builder, Provider::Cpu)),
        Provider::Cuda => {
            let b = try_register(builder, cuda_available(), cuda(cfg)).map_err(|e| explicit(Provider::Cuda, e))?;
            Ok((b, Provider::Cuda))
        }
        Provider::Tensorrt => {
            let b =
                try_register(builder, trt_available(), tensorrt(cfg)).map_err(|e| explicit(Provider::Tensorrt, e))?;
            // CUDA takes the nodes TensorRT does not; without it they run on the CPU.
            let b = try_register(b, cuda_available(), cuda(cfg)).unwrap_or_else(|(b, _)| b);
            Ok((b, Provider::Tensorrt))
        }
        Provider::Auto => {
            let builder = match try_register(builder, trt_available(), tensorrt(cfg)) {
                Ok(b) => {
                    let b = try_register(b, cuda_available(), cuda(cfg)).unwrap_or_else(|(b, _)| b);
                    return Ok((b, Provider::Tensorrt));
                }
                Err((b, why)) => {
                    tracing::debug!(%why, "TensorRT not used");
                    b
                }
            };
            match try_register(builder, cuda_available(), cuda(cfg)) {
                Ok(b) => Ok((b, Provider::Cuda)),
                Err((b, why)) => {
                    tracing::debug!(%why, "CUDA not used");
                    Ok((b, Provider::Cpu))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_message_says_how_to_get_one() {
        let e = RuntimeError::NotFound { looked: "x".into() };
        let m = e.to_string();
        assert!(m.contains("scripts/setup-engine") && m.contains("ORT_DYLIB_PATH"), "{m}");
    }
}
