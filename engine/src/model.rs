//! Loading a chat model directory: the ONNX decoder, its tokenizer and chat template, and the facts
//! the scheduler needs (KV layout, context length, end-of-sequence ids).
//!
//! The facts come from `meridian-model.json` when present; otherwise from the files the usual
//! exporters write: optimum (`config.json`, `generation_config.json`, `tokenizer_config.json`) or
//! onnxruntime-genai (`genai_config.json`, `tokenizer_config.json`). The KV layout is always read
//! from the ONNX session's inputs (`past_key_values.N.key` shapes) and checked against the config.
//!
//! [`ChatModel::forward`] is the one decoding core: prefill, batched decode
//! ([`crate::kv::Batch`]) and the reference generation without a KV cache all go through it.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ort::memory::MemoryInfo;
use ort::session::{IoBinding, Session, SessionInputValue, SessionOutputs};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use serde_json::Value as Json;
use tokenizers::Tokenizer;

use crate::api::{ConversationHasher, EngineError, ErrorCode, Message};
use crate::config::{ModelKind, Provider, RuntimeConfig};
use crate::detok::TokenBytes;
use crate::kv::{Batch, KvLayout, Padding};
use crate::runtime::{runtime, RuntimeError};
use crate::sampling::argmax;
use crate::template::ChatTemplate;

/// Why the engine (or one model) could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// ONNX Runtime is missing or a provider/session failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The engine configuration is invalid.
    #[error("engine config: {0}")]
    Config(String),
    /// A model directory is incomplete or inconsistent.
    #[error("model {name} at {dir}: {message}")]
    Model {
        /// The model's name.
        name: String,
        /// Its directory.
        dir: PathBuf,
        /// What is missing or wrong (names the file).
        message: String,
    },
}

/// What the scheduler needs to know about a decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatSpec {
    /// Transformer layers (KV pairs).
    pub num_layers: usize,
    /// KV heads per layer.
    pub num_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Logits per position.
    pub vocab_size: usize,
    /// Most tokens (prompt + answer) one sequence may hold.
    pub context_length: usize,
    /// Beginning-of-sequence id, if the model has one.
    pub bos_token_id: Option<u32>,
    /// Ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// The Jinja chat template.
    pub chat_template: String,
    /// The BOS string the template may use.
    pub bos_token: Option<String>,
    /// The EOS string the template may use.
    pub eos_token: Option<String>,
    /// Whether a decode step may be given one buffer per KV tensor, with spare columns, as both
    /// its past input and its present output, and then writes the new entries in place
    /// (GroupQueryAttention's shared buffer; `past_present_share_buffer` in
    /// `meridian-model.json`). Otherwise every step returns the whole cache anew.
    pub shared_kv_buffer: bool,
    /// Where a batch's rows are padded (`padding` in `meridian-model.json`: "left", the default,
    /// or "right").
    pub padding: Padding,
}

/// Names of the decoder's inputs and outputs.
#[derive(Debug, Clone)]
struct DecoderIo {
    has_position_ids: bool,
    /// `past_key_values.{i}.key`, `…value`, layer by layer.
    past: Vec<String>,
    /// `present.{i}.key`, `…value`, in the same order.
    present: Vec<String>,
}

/// A loaded chat model. Not shared between threads: the scheduler's model thread owns it (a
/// session run needs `&mut`).
pub struct ChatModel {
    /// Name requests use.
    pub name: String,
    /// Directory it was loaded from.
    pub dir: PathBuf,
    /// Its facts.
    pub spec: ChatSpec,
    /// The execution provider its session runs on.
    pub provider: Provider,
    /// The graph file its session opened: `model.onnx`, or the packed graph on a CPU with the
    /// packed kernel.
    pub graph: PathBuf,
    /// Its tokenizer (shared with the admission path).
    pub tokenizer: Arc<Tokenizer>,
    /// Its chat template (shared with the admission path).
    pub template: Arc<ChatTemplate>,
    /// Bytes of every token, for streaming text.
    pub token_bytes: Arc<TokenBytes>,
    session: Session,
    io: DecoderIo,
}

impl std::fmt::Debug for ChatModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatModel").field("name", &self.name).field("dir", &self.dir).field("spec", &self.spec).finish()
    }
}

/// Renders and tokenises prompts; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Prompter {
    template: Arc<ChatTemplate>,
    tokenizer: Arc<Tokenizer>,
}

impl Prompter {
    /// The prompt text for `messages` (the chat template, generation prompt opened).
    pub fn render(&self, messages: &[Message]) -> Result<String, EngineError> {
        self.template.render(messages).map_err(|m| EngineError::new(ErrorCode::BadRequest, m))
    }

    /// Token ids of a rendered prompt (special tokens written in the text are parsed; none are
    /// added, the template writes them).
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<u32>, EngineError> {
        Ok(self.encode(prompt)?.get_ids().to_vec())
    }

    fn encode(&self, prompt: &str) -> Result<tokenizers::Encoding, EngineError> {
        self.tokenizer
            .encode(prompt, false)
            .map_err(|e| EngineError::new(ErrorCode::Internal, format!("tokenizer: {e}")))
    }

    /// Rendered and tokenised.
    pub fn prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        self.tokenize(&self.render(messages)?)
    }

    /// Rendered and tokenised, with the conversation's beginnings ([`RenderedPrompt::marks`]).
    pub fn prompt(&self, messages: &[Message]) -> Result<RenderedPrompt, EngineError> {
        let text = self.render(messages)?;
        let enc = self.encode(&text)?;
        // Byte offsets into `text`, in order.
        let offsets = enc.get_offsets();
        let mut hasher = ConversationHasher::default();
        let mut marks = Vec::with_capacity(messages.len());
        let mut pos = 0;
        for m in messages {
            let hash = hasher.message(&m.role, &m.content);
            let Some(at) = text[pos..].find(m.content.as_str()) else { break };
            pos += at + m.content.len();
            let tokens = offsets.partition_point(|&(start, _)| start < pos);
            marks.push((hash, tokens as u32));
        }
        Ok(RenderedPrompt { ids: enc.get_ids().to_vec(), marks })
    }
}

/// A conversation rendered by the model's template and tokenised.
pub struct RenderedPrompt {
    /// The prompt's token ids.
    pub ids: Vec<u32>,
    /// For each message in order, its [`ConversationHasher`] hash and how many of the prompt's
    /// tokens come before the end of its text (what a prefix cache holding that many tokens holds
    /// of the conversation). Stops at a message whose text the template did not write out as given.
    pub marks: Vec<(u64, u32)>,
}

/// The outputs of one decoder run.
pub struct Forward {
    /// `logits` [B, S, V], or [B, 1, V] from a graph that gives the last position's only.
    pub logits: DynValue,
    /// `present.*`, in [`KvLayout`] order, each [B, H, P+S, D].
    pub present: Vec<DynValue>,
}

fn take_logits(out: &mut SessionOutputs<'_>) -> ort::Result<DynValue> {
    out.remove("logits").ok_or_else(|| ort::Error::new("no logits output"))
}

pub(crate) fn model_err(name: &str, dir: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Model { name: name.to_string(), dir: dir.to_path_buf(), message: message.into() }
}

pub(crate) fn read_json(path: &Path) -> Result<Option<Json>, String> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s).map(Some).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

pub(crate) fn load_tokenizer(name: &str, dir: &Path) -> Result<Tokenizer, LoadError> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(model_err(name, dir, "tokenizer.json is missing"));
    }
    Tokenizer::from_file(&path).map_err(|e| model_err(name, dir, format!("tokenizer.json: {e}")))
}

/// The kind a directory holds, from `meridian-model.json`'s `kind`, else from the exporter's files
/// (a `genai_config.json` or a `config.json` with a causal-LM architecture → chat; otherwise
/// embedding).
pub fn infer_kind(dir: &Path) -> Result<ModelKind, String> {
    if let Some(m) = read_json(&dir.join("meridian-model.json"))? {
        return match m.get("kind").and_then(Json::as_str) {
            Some("chat") => Ok(ModelKind::Chat),
            Some("embedding") => Ok(ModelKind::Embedding),
            other => Err(format!("meridian-model.json: kind {other:?} is neither \"chat\" nor \"embedding\"")),
        };
    }
    if dir.join("genai_config.json").is_file() {
        return Ok(ModelKind::Chat);
    }
    if let Some(c) = read_json(&dir.join("config.json"))? {
        let causal = c
            .get("architectures")
            .and_then(Json::as_array)
            .is_some_and(|a| a.iter().any(|x| x.as_str().is_some_and(|s| s.ends_with("ForCausalLM"))));
        return Ok(if causal { ModelKind::Chat } else { ModelKind::Embedding });
    }
    Err("neither meridian-model.json nor config.json nor genai_config.json is present; set the model's kind".into())
}

fn u32_of(v: Option<&Json>) -> Option<u32> {
    v.and_then(Json::as_u64).map(|x| x as u32)
}

fn usize_of(v: Option<&Json>) -> Option<usize> {
    v.and_then(Json::as_u64).map(|x| x as usize)
}

/// An id or a list of ids.
fn ids_of(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        None => Vec::new(),
    }
}

/// A token string, plain or as `{"content": …}`.
fn token_str(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// The chat template: a string, or a list of `{name, template}` (the one named "default").
fn template_of(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Array(a) => a
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Json::as_str))
            .map(str::to_string),
        _ => None,
    }
}

/// Reads the chat facts of `dir`, without the ONNX session (the KV layout is checked later).
pub fn read_chat_spec(name: &str, dir: &Path) -> Result<ChatSpec, LoadError> {
    let err = |m: String| model_err(name, dir, m);
    let tok_cfg = read_json(&dir.join("tokenizer_config.json")).map_err(err)?;
    let tok = |k: &str| tok_cfg.as_ref().and_then(|t| t.get(k));
    if let Some(m) = read_json(&dir.join("meridian-model.json")).map_err(err)? {
        let need = |k: &str| usize_of(m.get(k)).ok_or_else(|| err(format!("meridian-model.json: {k} is missing")));
        let chat_template = template_of(m.get("chat_template"))
            .or_else(|| template_of(tok("chat_template")))
            .ok_or_else(|| err("meridian-model.json: chat_template is missing".into()))?;
        let eos_token_ids = ids_of(m.get("eos_token_ids").or(m.get("eos_token_id")));
        return Ok(ChatSpec {
            num_layers: need("num_layers")?,
            num_kv_heads: need("num_kv_heads")?,
            head_dim: need("head_dim")?,
            vocab_size: need("vocab_size")?,
            context_length: need("context_length")?,
            bos_token_id: u32_of(m.get("bos_token_id")),
            eos_token_ids,
            chat_template,
            bos_token: token_str(m.get("bos_token")).or_else(|| token_str(tok("bos_token"))),
            eos_token: token_str(m.get("eos_token")).or_else(|| token_str(tok("eos_token"))),
            shared_kv_buffer: m.get("past_present_share_buffer").and_then(Json::as_bool).unwrap_or(false),
            padding: match m.get("padding") {
                None => Padding::Left,
                Some(p) => match p.as_str() {
                    Some("left") => Padding::Left,
                    Some("right") => Padding::Right,
                    _ => {
                        return Err(err(format!("meridian-model.json: padding is {p}, expected \"left\" or \"right\"")))
                    }
                },
            },
        });
    }
    let chat_template = template_of(tok("chat_template"))
        .ok_or_else(|| err("tokenizer_config.json with a chat_template is missing".into()))?;
    let bos_token = token_str(tok("bos_token"));
    let eos_token = token_str(tok("eos_token"));
    if let Some(g) = read_json(&dir.join("genai_config.json")).map_err(err)? {
        let m = g.get("model").ok_or_else(|| err("genai_config.json: model is missing".into()))?;
        let d = m.get("decoder").ok_or_else(|| err("genai_config.json: model.decoder is missing".into()))?;
        let need =
            |v: Option<&Json>, k: &str| usize_of(v).ok_or_else(|| err(format!("genai_config.json: {k} is missing")));
        return Ok(ChatSpec {
            num_layers: need(d.get("num_hidden_layers"), "model.decoder.num_hidden_layers")?,
            num_kv_heads: need(d.get("num_key_value_heads"), "model.decoder.num_key_value_heads")?,
            head_dim: need(d.get("head_size"), "model.decoder.head_size")?,
            vocab_size: need(m.get("vocab_size"), "model.vocab_size")?,
            context_length: need(m.get("context_length"), "model.context_length")?,
            bos_token_id: u32_of(m.get("bos_token_id")),
            eos_token_ids: ids_of(m.get("eos_token_id")),
            chat_template,
            bos_token,
            eos_token,
            // genai's graphs take right-padded rows (seqlens_k from the mask). Whether one writes
            // into a shared buffer is not in its config, so its cache is copied each step.
            shared_kv_buffer: false,
            padding: Padding::Right,
        });
    }
    let c = read_json(&dir.join("config.json"))
        .map_err(err)?
        .ok_or_else(|| err("none of meridian-model.json, genai_config.json, config.json is present".into()))?;
    let need = |k: &str| usize_of(c.get(k)).ok_or_else(|| err(format!("config.json: {k} is missing")));
    let heads = need("num_attention_heads")?;
    let head_dim = match usize_of(c.get("head_dim")) {
        Some(d) => d,
        None => need("hidden_size")? / heads,
    };
    let generation = read_json(&dir.join("generation_config.json")).map_err(err)?;
    let mut eos_token_ids = generation.as_ref().map(|g| ids_of(g.get("eos_token_id"))).unwrap_or_default();
    if eos_token_ids.is_empty() {
        eos_token_ids = ids_of(c.get("eos_token_id"));
    }
    Ok(ChatSpec {
        num_layers: need("num_hidden_layers")?,
        num_kv_heads: usize_of(c.get("num_key_value_heads")).unwrap_or(heads),
        head_dim,
        vocab_size: need("vocab_size")?,
        context_length: need("max_position_embeddings")?,
        bos_token_id: u32_of(c.get("bos_token_id")),
        eos_token_ids,
        chat_template,
        bos_token,
        eos_token,
        shared_kv_buffer: false,
        padding: Padding::Left,
    })
}

fn check_i64_input(session: &Session, input: &str) -> Result<bool, String> {
    match session.inputs().iter().find(|i| i.name() == input) {
        None => Ok(false),
        Some(i) => match i.dtype() {
            ValueType::Tensor { ty: TensorElementType::Int64, .. } => Ok(true),
            other => Err(format!("model.onnx input {input} is {other:?}, expected an int64 tensor")),
        },
    }
}

/// Checks the decoder's interface against the spec; returns the names to use.
fn decoder_io(session: &Session, spec: &mut ChatSpec) -> Result<DecoderIo, String> {
    for name in ["input_ids", "attention_mask"] {
        if !check_i64_input(session, name)? {
            return Err(format!("model.onnx has no {name} input"));
        }
    }
    let has_position_ids = check_i64_input(session, "position_ids")?;
    let key0 = session
        .inputs()
        .iter()
        .find(|i| i.name() == "past_key_values.0.key")
        .ok_or("model.onnx has no past_key_values.0.key input (exported without a KV cache?)")?;
    let shape = key0.dtype().tensor_shape().ok_or("past_key_values.0.key is not a tensor")?;
    if !matches!(key0.dtype().tensor_type(), Some(TensorElementType::Float32)) {
        return Err(format!("past_key_values.0.key is {:?}, expected float32", key0.dtype().tensor_type()));
    }
    if shape.len() != 4 || shape[1] <= 0 || shape[3] <= 0 {
        return Err(format!(
            "past_key_values.0.key has shape {:?}, expected [batch, kv_heads, past, head_dim]",
            &shape[..]
        ));
    }
    let (heads, head_dim) = (shape[1] as usize, shape[3] as usize);
    let layers = session
        .inputs()
        .iter()
        .filter(|i| i.name().starts_with("past_key_values.") && i.name().ends_with(".key"))
        .count();
    if (layers, heads, head_dim) != (spec.num_layers, spec.num_kv_heads, spec.head_dim) {
        return Err(format!(
            "model.onnx has {layers} layers × {heads} KV heads × {head_dim}, the config says {} × {} × {}",
            spec.num_layers, spec.num_kv_heads, spec.head_dim
        ));
    }
    let mut past = Vec::new();
    let mut present = Vec::new();
    for l in 0..layers {
        for kv in ["key", "value"] {
            let p = format!("past_key_values.{l}.{kv}");
            let o = format!("present.{l}.{kv}");
            if !session.inputs().iter().any(|i| i.name() == p) {
                return Err(format!("model.onnx has no {p} input"));
            }
            if !session.outputs().iter().any(|i| i.name() == o) {
                return Err(format!("model.onnx has no {o} output"));
            }
            past.push(p);
            present.push(o);
        }
    }
    if !session.outputs().iter().any(|o| o.name() == "logits") {
        return Err("model.onnx has no logits output".into());
    }
    let expected = 2 + has_position_ids as usize + past.len();
    if session.inputs().len() != expected {
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        return Err(format!("model.onnx has unexpected inputs: {names:?}"));
    }
    Ok(DecoderIo { has_position_ids, past, present })
}

impl ChatModel {
    /// Loads the model in `dir` on the configured provider.
    pub fn load(name: &str, dir: &Path, cfg: &RuntimeConfig) -> Result<ChatModel, LoadError> {
        let mut spec = read_chat_spec(name, dir)?;
        let tokenizer = load_tokenizer(name, dir)?;
        let onnx = dir.join("model.onnx");
        if !onnx.is_file() {
            return Err(model_err(name, dir, "model.onnx is missing"));
        }
        let template = ChatTemplate::new(&spec.chat_template, spec.bos_token.as_deref(), spec.eos_token.as_deref())
            .map_err(|m| model_err(name, dir, m))?;
        if spec.eos_token_ids.is_empty() {
            match spec.eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
                Some(id) => spec.eos_token_ids.push(id),
                None => return Err(model_err(name, dir, "no eos_token_id in the model's config files")),
            }
        }
        let (session, provider, graph) = runtime()?.decoder_session(cfg, dir)?;
        let io = decoder_io(&session, &mut spec).map_err(|m| model_err(name, dir, m))?;
        let token_bytes = Arc::new(TokenBytes::new(&tokenizer));
        let (tokenizer, template) = (Arc::new(tokenizer), Arc::new(template));
        Ok(ChatModel {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            spec,
            provider,
            graph,
            tokenizer,
            template,
            token_bytes,
            session,
            io,
        })
    }

    /// The KV layout of this model.
    pub fn layout(&self) -> KvLayout {
        KvLayout { layers: self.spec.num_layers, heads: self.spec.num_kv_heads, head_dim: self.spec.head_dim }
    }

    /// An empty batch for this model's cache: written in place when the model takes a shared KV
    /// buffer and runs on the CPU. The buffers live in host memory, so on a GPU the binding would
    /// move the whole cache across each step (and the device's attention would not see one
    /// buffer); there the runtime keeps copying the cache on the device instead.
    pub fn batch(&self) -> Batch {
        Batch::new(self.layout(), self.padding(), self.spec.shared_kv_buffer && self.provider == Provider::Cpu)
    }

    /// Where this model's batches pad their rows.
    pub fn padding(&self) -> Padding {
        self.spec.padding
    }

    /// The admission path's view of this model: template and tokenizer.
    pub fn prompter(&self) -> Prompter {
        Prompter { template: self.template.clone(), tokenizer: self.tokenizer.clone() }
    }

    /// One decoder run: `ids`/`positions` are [B, S], `mask` is [B, P+S], `past` is the KV cache
    /// ([B, H, P, D] each, in layout order), or `None` for an empty cache (P = 0).
    pub fn forward(
        &mut self,
        batch: usize,
        ids: Vec<i64>,
        positions: Vec<i64>,
        mask: Vec<i64>,
        past: Option<&[DynValue]>,
    ) -> ort::Result<Forward> {
        let seq = ids.len() / batch;
        let total = mask.len() / batch;
        let KvLayout { heads, head_dim, .. } = self.layout();
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(3 + self.io.past.len());
        inputs.push(("input_ids".into(), Tensor::from_array(([batch, seq], ids))?.into()));
        inputs.push(("attention_mask".into(), Tensor::from_array(([batch, total], mask))?.into()));
        if self.io.has_position_ids {
            inputs.push(("position_ids".into(), Tensor::from_array(([batch, seq], positions))?.into()));
        }
        match past {
            Some(past) => {
                for (name, v) in self.io.past.iter().zip(past) {
                    inputs.push((name.as_str().into(), v.into()));
                }
            }
            None => {
                for name in &self.io.past {
                    let empty = Tensor::<f32>::from_array(([batch, heads, 0, head_dim], Vec::new()))?;
                    inputs.push((name.as_str().into(), empty.into()));
                }
            }
        }
        let mut out = self.session.run(inputs)?;
        let logits = take_logits(&mut out)?;
        let present = self
            .io
            .present
            .iter()
            .map(|n| out.remove(n).ok_or_else(|| ort::Error::new(format!("no {n} output"))))
            .collect::<ort::Result<Vec<_>>>()?;
        Ok(Forward { logits, present })
    }

    /// One decode step (`ids`/`positions` [B, 1], `mask` [B, T]) that writes the new K/V entries
    /// into `kv` in place: buffers [B, H, C, D] with C >= T, bound as both the past inputs and the
    /// present outputs. Only for a model with [`ChatSpec::shared_kv_buffer`]. `binding` keeps those
    /// bindings from step to step (binding the 2 × layers tensors anew cost ~0.09 ms a step); the
    /// caller empties it whenever `kv` changes, and a step then binds them again.
    pub fn step_in_place(
        &mut self,
        ids: Vec<i64>,
        positions: Vec<i64>,
        mask: Vec<i64>,
        kv: &mut [DynValue],
        binding: &mut Option<IoBinding>,
    ) -> ort::Result<DynValue> {
        let batch = ids.len();
        let total = mask.len() / batch;
        let binding = match binding {
            Some(b) => b,
            None => {
                let mut b = self.session.create_binding()?;
                for ((past, present), value) in self.io.past.iter().zip(&self.io.present).zip(kv.iter_mut()) {
                    b.bind_input(past.as_str(), &*value)?;
                    b.bind_output(present.as_str(), value)?;
                }
                b.bind_output_to_device("logits", &MemoryInfo::default())?;
                binding.insert(b)
            }
        };
        binding.bind_input("input_ids", &Tensor::from_array(([batch, 1], ids))?)?;
        binding.bind_input("attention_mask", &Tensor::from_array(([batch, total], mask))?)?;
        if self.io.has_position_ids {
            binding.bind_input("position_ids", &Tensor::from_array(([batch, 1], positions))?)?;
        }
        // A local, so that the outputs (which borrow the binding) are gone before it is used again.
        let logits = take_logits(&mut self.session.run_binding(binding)?);
        logits
    }

    /// Greedy generation of up to `n` tokens after `prompt_ids`, stopping after an end-of-sequence
    /// id (included). With `use_kv_cache` it decodes through [`Batch`] as the scheduler does;
    /// without, it recomputes the whole sequence every step (slow; the reference for tests).
    pub fn greedy_reference(&mut self, prompt_ids: &[u32], n: usize, use_kv_cache: bool) -> ort::Result<Vec<u32>> {
        let mut out = Vec::new();
        let eos = self.spec.eos_token_ids.clone();
        if use_kv_cache {
            let mut batch = self.batch();
            let (prefilled, logits) = Batch::prefill(self, prompt_ids, None)?;
            let mut token = argmax(logits.row(0));
            batch.rebuild(&[], vec![prefilled])?;
            loop {
                out.push(token);
                if out.len() >= n || eos.contains(&token) {
                    return Ok(out);
                }
                token = argmax(batch.step(self, &[token])?.row(0));
            }
        }
        let mut seq = prompt_ids.to_vec();
        loop {
            let (_, logits) = Batch::prefill(self, &seq, None)?;
            let token = argmax(logits.row(0));
            out.push(token);
            seq.push(token);
            if out.len() >= n || eos.contains(&token) {
                return Ok(out);
            }
        }
    }
}
