//! Model directories as the usual exporters write them load too, and a broken directory is
//! refused with an error that names the file at fault. The directories here hold the real int4
//! SmolLM2 files (linked) beside config files in optimum's and onnxruntime-genai's formats.

use std::path::{Path, PathBuf};

use crate::common::*;
use meridian_engine::config::RuntimeConfig;
use meridian_engine::model::ChatModel;
use serde_json::{json, Value};

/// A temp directory with the int4 model's ONNX files and tokenizer linked in, plus `files`.
struct Dir(PathBuf);

impl Dir {
    fn new(label: &str, link: &[&str], files: &[(&str, Value)]) -> Dir {
        let dir = std::env::temp_dir().join(format!("meridian-model-dirs-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = model_dir(INT4);
        for name in link {
            std::os::unix::fs::symlink(src.join(name), dir.join(name)).unwrap();
        }
        for (name, value) in files {
            std::fs::write(dir.join(name), value.to_string()).unwrap();
        }
        Dir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const ONNX: [&str; 3] = ["model.onnx", "model.onnx.data", "tokenizer.json"];

fn meridian_meta() -> Value {
    serde_json::from_str(&std::fs::read_to_string(model_dir(INT4).join("meridian-model.json")).unwrap()).unwrap()
}

fn tokenizer_config() -> Value {
    let m = meridian_meta();
    json!({"chat_template": m["chat_template"], "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
}

/// optimum's `config.json` for SmolLM2-135M.
fn hf_config(kv_heads: u64) -> Value {
    json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
           "num_attention_heads": 9, "num_key_value_heads": kv_heads, "num_hidden_layers": 30,
           "vocab_size": 49152, "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2})
}

/// Greedy ids for a fixed prompt from the `model.onnx` in `dir` (the other layouts have no packed
/// graph, and the packed kernel rounds differently).
fn answer(dir: &Path) -> Vec<u32> {
    let cfg = RuntimeConfig { packed_kernel: false, ..RuntimeConfig::default() };
    let mut model = ChatModel::load("m", dir, &cfg).unwrap_or_else(|e| panic!("{e}"));
    let ids = model.prompter().prompt_ids(&user("Name a colour.")).unwrap();
    model.greedy_reference(&ids, 12, true).unwrap()
}

fn load_error(dir: &Path) -> String {
    match ChatModel::load("m", dir, &RuntimeConfig::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn optimum_and_genai_directories_load_and_answer_like_ours() {
    let ours = answer(&model_dir(INT4));
    let optimum = Dir::new(
        "optimum",
        &ONNX,
        &[
            ("config.json", hf_config(3)),
            ("generation_config.json", json!({"bos_token_id": 1, "eos_token_id": [2, 0]})),
            ("tokenizer_config.json", tokenizer_config()),
        ],
    );
    assert_eq!(answer(optimum.path()), ours, "optimum layout");
    let genai = Dir::new(
        "genai",
        &ONNX,
        &[
            (
                "genai_config.json",
                json!({"model": {"type": "llama", "bos_token_id": 1, "eos_token_id": [2, 0], "context_length": 8192,
                                 "vocab_size": 49152, "decoder": {"head_size": 64, "hidden_size": 576,
                                 "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3}}}),
            ),
            ("tokenizer_config.json", tokenizer_config()),
        ],
    );
    assert_eq!(answer(genai.path()), ours, "onnxruntime-genai layout");
}

#[test]
fn broken_directories_name_what_is_wrong() {
    let meta = meridian_meta();
    let no_tokenizer = Dir::new("no-tokenizer", &ONNX[..2], &[("meridian-model.json", meta.clone())]);
    let e = load_error(no_tokenizer.path());
    assert!(e.contains("tokenizer.json"), "{e}");

    let no_model = Dir::new("no-model", &ONNX[2..], &[("meridian-model.json", meta.clone())]);
    let e = load_error(no_model.path());
    assert!(e.contains("model.onnx"), "{e}");

    let no_config = Dir::new("no-config", &ONNX, &[]);
    let e = load_error(no_config.path());
    assert!(e.contains("config.json") || e.contains("meridian-model.json"), "{e}");

    let mut sideways = meta.clone();
    sideways["padding"] = json!("middle");
    let bad_padding = Dir::new("bad-padding", &ONNX, &[("meridian-model.json", sideways)]);
    let e = load_error(bad_padding.path());
    assert!(e.contains("padding") && e.contains("middle"), "{e}");

    let wrong_heads =
        Dir::new("wrong-heads", &ONNX, &[("config.json", hf_config(4)), ("tokenizer_config.json", tokenizer_config())]);
    let e = load_error(wrong_heads.path());
    assert!(e.contains('4') && e.contains('3'), "the KV-head mismatch names both counts: {e}");
}
