//! The engine reproduces a greedy generation recorded from a Python onnxruntime loop on the same
//! fp32 file, token for token: the prompt (template + tokenizer), the answer with the KV cache and
//! without it, and the text through the whole engine.

use crate::common::*;
use meridian_engine::api::{FinishReason, Message};
use meridian_engine::config::RuntimeConfig;
use meridian_engine::model::ChatModel;
use meridian_engine::scheduler::Engine;
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    model: String,
    messages: Vec<Message>,
    prompt: String,
    prompt_ids: Vec<u32>,
    max_tokens: u32,
    completion_ids: Vec<u32>,
    completion: String,
    finish_reason: FinishReason,
}

fn golden() -> Golden {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("tests/golden.json")).expect("golden.json parses")
}

#[test]
fn golden_tokens_with_and_without_kv_cache() {
    let g = golden();
    let mut model = ChatModel::load("golden", &model_dir(&g.model), &RuntimeConfig::default()).unwrap();
    let prompter = model.prompter();
    assert_eq!(prompter.render(&g.messages).unwrap(), g.prompt, "chat template");
    assert_eq!(prompter.prompt_ids(&g.messages).unwrap(), g.prompt_ids, "template + tokenizer");
    let n = g.max_tokens as usize;
    let with_cache = model.greedy_reference(&g.prompt_ids, n, true).unwrap();
    assert_eq!(with_cache, g.completion_ids, "greedy with the KV cache");
    let without = model.greedy_reference(&g.prompt_ids, n, false).unwrap();
    assert_eq!(without, g.completion_ids, "greedy recomputing the whole sequence");
}

#[tokio::test]
async fn golden_text_through_the_engine() {
    let g = golden();
    let engine: std::sync::Arc<Engine> = engine(&[("smol", &g.model)], Default::default());
    let req = meridian_engine::api::ChatRequest {
        model: "smol".into(),
        messages: g.messages.clone(),
        max_tokens: Some(g.max_tokens),
        ..Default::default()
    };
    assert_eq!(engine.prompt_ids(&req).unwrap(), g.prompt_ids);
    let a = chat(&engine, req).await.unwrap();
    assert_eq!(a.text, g.completion);
    assert_eq!(a.finish_reason, g.finish_reason);
    assert_eq!(a.usage.prompt_tokens as usize, g.prompt_ids.len());
    assert_eq!(a.usage.completion_tokens as usize, g.completion_ids.len());
}
