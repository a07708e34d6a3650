//! The engine's configuration: the `[runtime]`, `[scheduler]` and `[[models]]` sections of an engine
//! node's TOML. Every field has a documented default, and unknown keys are errors (a typo must not
//! silently fall back to a default).
//!
//! Relative model paths are kept as written; the caller resolves them against the config file's
//! directory ([`EngineConfig::resolve_paths`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which ONNX Runtime execution provider runs the models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// TensorRT, else CUDA, else CPU: the first that registers (default).
    #[default]
    Auto,
    /// TensorRT (with CUDA for the nodes TensorRT does not take); an error if it cannot register.
    Tensorrt,
    /// CUDA; an error if it cannot register.
    Cuda,
    /// The CPU provider.
    Cpu,
}

impl Provider {
    /// The lowercase name used in config and in [`crate::api::Health::provider`].
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Auto => "auto",
            Provider::Tensorrt => "tensorrt",
            Provider::Cuda => "cuda",
            Provider::Cpu => "cpu",
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[runtime]`: ONNX Runtime settings shared by all sessions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Execution provider (default `auto`: TensorRT ▸ CUDA ▸ CPU).
    pub provider: Provider,
    /// Threads inside one operator, per session (default 0: one per available CPU). On a 2-CPU
    /// machine with SmolLM2-135M int4 and the engine as its only load, 2 threads with spinning
    /// decoded 125 tok/s at batch 1 and 245 tok/s aggregate with 8 concurrent requests, 1 thread
    /// 96 and 151 (`engine-bench --weights int4` against `--threads 1 --spinning off`). Under
    /// competing load, 1 thread without spinning can be faster.
    pub intra_op_threads: usize,
    /// Threads across operators, per session (default 1; the graphs run sequentially).
    pub inter_op_threads: usize,
    /// Let intra-op threads spin while waiting for work (default true: on a machine that runs only
    /// the engine it gained 20% at batch 1 and 10% at batch 8, `engine-bench --spinning on|off`;
    /// turn it off when other processes compete for the CPUs, where spinning hurts).
    pub spinning: bool,
    /// Where TensorRT keeps its built engines (default: none, engines are rebuilt at every start).
    pub trt_cache_dir: Option<PathBuf>,
    /// Let TensorRT use fp16 kernels (default true).
    pub trt_fp16: bool,
    /// GPU index for CUDA and TensorRT (default 0).
    pub device_id: i32,
    /// On the CPU, open a decoder's packed graph (`model.packed.onnx`) when the CPU has AVX-512
    /// VNNI, so that its 4-bit products run on Meridian's kernel (default true; false keeps ONNX
    /// Runtime's `MatMulNBits`, for comparison).
    pub packed_kernel: bool,
}

impl Default for RuntimeConfig {
    fn default() -> RuntimeConfig {
        RuntimeConfig {
            provider: Provider::Auto,
            intra_op_threads: 0,
            inter_op_threads: 1,
            spinning: true,
            trt_cache_dir: None,
            trt_fp16: true,
            device_id: 0,
            packed_kernel: true,
        }
    }
}

/// `[scheduler]`: admission and batching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Most sequences decoded together in one step, per chat model (default 8).
    pub max_batch: usize,
    /// Requests admitted but not yet decoding, per chat model; beyond it requests are refused as
    /// overloaded (default 64).
    pub queue_capacity: usize,
    /// `max_tokens` of a request that does not set it (default 256).
    pub default_max_tokens: u32,
    /// Most texts an embedding model reads in one run (default 32): a request of 2 048 texts is
    /// read in runs of at most this many, so the memory of one run is bounded whatever the
    /// request holds.
    pub embed_max_batch: usize,
    /// Most tokens in one embedding run, padding included (texts × the longest one; default
    /// 8 192, 32 texts of MiniLM's 256). A text longer than this on its own runs alone.
    pub embed_max_batch_tokens: usize,
    /// Bytes of prompts' KV cache each chat model keeps for later prompts that begin the same way
    /// (default 128 MiB; 0 turns the prefix cache off). SmolLM2-135M's cache takes 46 KB a
    /// token, so the default holds about 2,900 tokens of prefixes.
    pub prefix_cache_bytes: usize,
}

impl Default for SchedulerConfig {
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            max_batch: 8,
            queue_capacity: 64,
            default_max_tokens: 256,
            embed_max_batch: 32,
            embed_max_batch_tokens: 8192,
            prefix_cache_bytes: 128 << 20,
        }
    }
}

/// What a model directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A decoder that generates text.
    Chat,
    /// An encoder that embeds texts.
    Embedding,
}

/// `[[models]]`: one model served under a name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name requests use.
    pub name: String,
    /// The model directory (`model.onnx`, `tokenizer.json`, `meridian-model.json` or the exporter's
    /// config files).
    pub path: PathBuf,
    /// Chat or embedding; inferred from the directory when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ModelKind>,
}

/// The engine's whole configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// `[runtime]`.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// `[scheduler]`.
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    /// `[[models]]`.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
}

impl EngineConfig {
    /// Makes relative model paths (and the TensorRT cache dir) relative to `base`, the directory of
    /// the config file.
    pub fn resolve_paths(&mut self, base: &Path) {
        for model in &mut self.models {
            if model.path.is_relative() {
                model.path = base.join(&model.path);
            }
        }
        if let Some(dir) = &mut self.runtime.trt_cache_dir {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
    }

    /// Checks values serde cannot: limits at least 1, model names unique and non-empty.
    pub fn validate(&self) -> Result<(), String> {
        let s = &self.scheduler;
        if s.max_batch == 0 {
            return Err("scheduler.max_batch must be at least 1".into());
        }
        if s.queue_capacity == 0 {
            return Err("scheduler.queue_capacity must be at least 1".into());
        }
        if s.default_max_tokens == 0 {
            return Err("scheduler.default_max_tokens must be at least 1".into());
        }
        if s.embed_max_batch == 0 {
            return Err("scheduler.embed_max_batch must be at least 1".into());
        }
        if s.embed_max_batch_tokens == 0 {
            return Err("scheduler.embed_max_batch_tokens must be at least 1".into());
        }
        if self.runtime.inter_op_threads == 0 {
            return Err("runtime.inter_op_threads must be at least 1".into());
        }
        let mut seen = std::collections::HashSet::new();
        for m in &self.models {
            if m.name.is_empty() {
                return Err(format!("a model at {} has an empty name", m.path.display()));
            }
            if !seen.insert(m.name.as_str()) {
                return Err(format!("model name {:?} appears twice", m.name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_sections() {
        let cfg: EngineConfig = toml::from_str(
            r#"
            [runtime]
            provider = "cpu"
            intra_op_threads = 2
            [scheduler]
            max_batch = 4
            [[models]]
            name = "smol"
            path = "models/smol"
            [[models]]
            name = "mini"
            path = "/abs/mini"
            kind = "embedding"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.runtime.provider, Provider::Cpu);
        assert_eq!(cfg.runtime.intra_op_threads, 2);
        assert!(cfg.runtime.spinning);
        assert_eq!(cfg.scheduler.max_batch, 4);
        assert_eq!(cfg.scheduler.queue_capacity, 64);
        assert_eq!(cfg.scheduler.default_max_tokens, 256);
        assert_eq!(cfg.models[1].kind, Some(ModelKind::Embedding));
        let mut cfg = cfg;
        cfg.resolve_paths(Path::new("/etc/meridian"));
        assert_eq!(cfg.models[0].path, Path::new("/etc/meridian/models/smol"));
        assert_eq!(cfg.models[1].path, Path::new("/abs/mini"));
        cfg.validate().unwrap();
        assert_eq!(EngineConfig::default().scheduler, SchedulerConfig::default());
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<EngineConfig>("[runtime]\nthreads = 2").is_err());
        assert!(toml::from_str::<EngineConfig>("[scheduler]\nmax_batchh = 2").is_err());
        assert!(toml::from_str::<EngineConfig>("[runtime]\nprovider = \"rocm\"").is_err());
    }

    #[test]
    fn validation() {
        let mut cfg = EngineConfig::default();
        cfg.scheduler.queue_capacity = 0;
        assert!(cfg.validate().is_err());
        let mut cfg = EngineConfig::default();
        cfg.scheduler.embed_max_batch = 0;
        assert!(cfg.validate().unwrap_err().contains("embed_max_batch"));
        let mut cfg = EngineConfig::default();
        cfg.scheduler.embed_max_batch_tokens = 0;
        assert!(cfg.validate().unwrap_err().contains("embed_max_batch_tokens"));
        let mut cfg = EngineConfig::default();
        let m = ModelConfig { name: "a".into(), path: "x".into(), kind: None };
        cfg.models = vec![m.clone(), m];
        assert!(cfg.validate().unwrap_err().contains("twice"));
    }
}
