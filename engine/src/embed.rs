//! Embedding models: tokenise (truncated to `max_length`), run the encoder, mean-pool
//! `last_hidden_state` over the attention mask, L2-normalise.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;
use serde_json::Value as Json;
use tokenizers::{Encoding, Tokenizer, TruncationParams};

use crate::api::{Embeddings, EngineError, ErrorCode};
use crate::config::{Provider, RuntimeConfig};
use crate::model::{load_tokenizer, model_err, read_json, LoadError};
use crate::runtime::runtime;

/// A loaded embedding model. `embed_parts` blocks (run it off the async workers).
pub struct EmbeddingModel {
    /// Name requests use.
    pub name: String,
    /// Directory it was loaded from.
    pub dir: PathBuf,
    /// The provider its session runs on.
    pub provider: Provider,
    /// Tokens per text after truncation.
    pub max_length: usize,
    /// Whether vectors are L2-normalised.
    pub normalize: bool,
    tokenizer: Tokenizer,
    has_token_type_ids: bool,
    session: Mutex<Session>,
}

impl std::fmt::Debug for EmbeddingModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingModel").field("name", &self.name).field("dir", &self.dir).finish()
    }
}

impl EmbeddingModel {
    /// Loads the encoder in `dir`.
    pub fn load(name: &str, dir: &Path, cfg: &RuntimeConfig) -> Result<EmbeddingModel, LoadError> {
        let err = |m: String| model_err(name, dir, m);
        let meta = read_json(&dir.join("meridian-model.json")).map_err(err)?;
        let get = |k: &str| meta.as_ref().and_then(|m| m.get(k));
        if let Some(p) = get("pooling").and_then(Json::as_str) {
            if p != "mean" {
                return Err(err(format!("meridian-model.json: pooling {p:?} is not supported (only \"mean\")")));
            }
        }
        let normalize = get("normalize").and_then(Json::as_bool).unwrap_or(true);
        let max_length = get("max_length").and_then(Json::as_u64).map(|x| x as usize).unwrap_or(512);
        let mut tokenizer = load_tokenizer(name, dir)?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| err(format!("tokenizer.json: {e}")))?;
        tokenizer.with_padding(None);
        let onnx = dir.join("model.onnx");
        if !onnx.is_file() {
            return Err(err("model.onnx is missing".into()));
        }
        let (session, provider) = runtime()?.session(cfg, &onnx)?;
        for input in ["input_ids", "attention_mask"] {
            if !session.inputs().iter().any(|i| i.name() == input) {
                return Err(err(format!("model.onnx has no {input} input")));
            }
        }
        if !session.outputs().iter().any(|o| o.name() == "last_hidden_state") {
            return Err(err("model.onnx has no last_hidden_state output".into()));
        }
        let has_token_type_ids = session.inputs().iter().any(|i| i.name() == "token_type_ids");
        Ok(EmbeddingModel {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            provider,
            max_length,
            normalize,
            tokenizer,
            has_token_type_ids,
            session: Mutex::new(session),
        })
    }

    /// Embeds `texts` in runs of at most `limits.max_batch` texts and `limits.max_tokens` tokens
    /// (texts × the longest, as the run pads them), in input order, handing each run's vectors to
    /// `part` as soon as they are ready (blocking). Texts are tokenised one run ahead at most, so
    /// memory is bounded by one run whatever `texts` holds. Stops after an error (handed to
    /// `part` as the last part) or when `part` returns false (the receiver went away).
    pub fn embed_parts(
        &self,
        texts: &[String],
        limits: BatchLimits,
        mut part: impl FnMut(Result<Embeddings, EngineError>) -> bool,
    ) {
        let tokens = |e: &Result<Encoding, tokenizers::Error>| e.as_ref().map_or(0, |e| e.get_ids().len().max(1));
        let mut encodings = texts.iter().map(|t| self.tokenizer.encode(t.as_str(), true)).peekable();
        let mut index = 0u32;
        loop {
            let mut batch = Vec::new();
            let mut longest = 0;
            while batch.len() < limits.max_batch {
                let (count, widest) = (batch.len(), longest);
                // The first text of a run always joins it, so a text longer than the token limit
                // runs alone rather than never.
                let fits =
                    |e: &Result<Encoding, _>| count == 0 || widest.max(tokens(e)) * (count + 1) <= limits.max_tokens;
                let Some(next) = encodings.next_if(fits) else { break };
                longest = longest.max(tokens(&next));
                match next {
                    Ok(e) => batch.push(e),
                    Err(e) => {
                        part(Err(EngineError::new(ErrorCode::Internal, format!("tokenizer: {e}"))));
                        return;
                    }
                }
            }
            if batch.is_empty() {
                return;
            }
            let count = batch.len() as u32;
            let result =
                self.embed_batch(&batch).map(|(data, prompt_tokens)| Embeddings { index, data, prompt_tokens });
            let failed = result.is_err();
            if !part(result) || failed {
                return;
            }
            index += count;
        }
    }

    /// One run of the encoder over `encodings`: their vectors and their token count.
    fn embed_batch(&self, encodings: &[Encoding]) -> Result<(Vec<Vec<f32>>, u32), EngineError> {
        let internal = |e: String| EngineError::new(ErrorCode::Internal, e);
        let b = encodings.len();
        let s = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0i64; b * s];
        let mut mask = vec![0i64; b * s];
        let mut types = vec![0i64; b * s];
        let mut prompt_tokens = 0u32;
        for (r, e) in encodings.iter().enumerate() {
            let n = e.get_ids().len();
            prompt_tokens += n as u32;
            for (k, (&id, &ty)) in e.get_ids().iter().zip(e.get_type_ids()).enumerate() {
                ids[r * s + k] = id as i64;
                types[r * s + k] = ty as i64;
                mask[r * s + k] = 1;
            }
        }
        let run = || -> ort::Result<Vec<Vec<f32>>> {
            let mut inputs: Vec<(&str, SessionInputValue<'_>)> = vec![
                ("input_ids", Tensor::from_array(([b, s], ids))?.into()),
                ("attention_mask", Tensor::from_array(([b, s], mask.clone()))?.into()),
            ];
            if self.has_token_type_ids {
                inputs.push(("token_type_ids", Tensor::from_array(([b, s], types))?.into()));
            }
            let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
            let out = session.run(inputs)?;
            let (shape, hidden) = out["last_hidden_state"].try_extract_tensor::<f32>()?;
            let dim = *shape.last().unwrap_or(&0) as usize;
            if shape.len() != 3 || shape[0] as usize != b || shape[1] as usize != s {
                return Err(ort::Error::new(format!("last_hidden_state has shape {:?}", &shape[..])));
            }
            Ok((0..b)
                .map(|r| {
                    let mut v = vec![0f32; dim];
                    let mut count = 0f32;
                    for k in 0..s {
                        if mask[r * s + k] == 1 {
                            count += 1.0;
                            let h = &hidden[(r * s + k) * dim..(r * s + k + 1) * dim];
                            v.iter_mut().zip(h).for_each(|(a, x)| *a += x);
                        }
                    }
                    v.iter_mut().for_each(|a| *a /= count.max(1.0));
                    if self.normalize {
                        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                        v.iter_mut().for_each(|a| *a /= norm);
                    }
                    v
                })
                .collect())
        };
        let data = run().map_err(|e| internal(format!("embedding model {}: {e}", self.name)))?;
        Ok((data, prompt_tokens))
    }
}

/// How many texts an embedding model reads in one run ([`crate::config::SchedulerConfig`]'s
/// `embed_max_batch` and `embed_max_batch_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most texts in one run.
    pub max_batch: usize,
    /// Most tokens in one run, padding included.
    pub max_tokens: usize,
}
