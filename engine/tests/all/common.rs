//! Shared by the test modules: finds the real model files (never mocks) and builds engines.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meridian_engine::api::{
    Backend, ChatRequest, EmbedRequest, Embeddings, EngineError, Event, FinishReason, Message, Usage,
};
use meridian_engine::config::{EngineConfig, ModelConfig, SchedulerConfig};
use meridian_engine::scheduler::Engine;

/// `$MERIDIAN_HOME`, else the repository's `.meridian`. Fails (never skips) when the models are not
/// there.
pub fn home() -> PathBuf {
    let home = match std::env::var_os("MERIDIAN_HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(".meridian"),
    };
    let models = home.join("models");
    assert!(
        models.join("smollm2-135m-instruct").is_dir() && models.join("all-minilm-l6-v2").is_dir(),
        "the engine tests need the real models under {}: run scripts/setup-engine",
        models.display()
    );
    meridian_engine::runtime::set_meridian_home(home.clone());
    home
}

/// A model directory, e.g. `smollm2-135m-instruct/int4`.
pub fn model_dir(rel: &str) -> PathBuf {
    home().join("models").join(rel)
}

pub const INT4: &str = "smollm2-135m-instruct/int4";
pub const FP32: &str = "smollm2-135m-instruct/fp32";
pub const MINILM: &str = "all-minilm-l6-v2";

/// An engine serving `models` as (name, dir relative to models/).
pub fn engine(models: &[(&str, &str)], scheduler: SchedulerConfig) -> Arc<Engine> {
    let mut cfg = EngineConfig { scheduler, ..Default::default() };
    cfg.models = models
        .iter()
        .map(|(name, rel)| ModelConfig { name: name.to_string(), path: model_dir(rel), kind: None })
        .collect();
    Engine::start(&cfg).unwrap_or_else(|e| panic!("engine start: {e}"))
}

pub fn user(text: &str) -> Vec<Message> {
    vec![Message { role: "user".into(), content: text.into() }]
}

pub fn request(model: &str, text: &str, max_tokens: u32) -> ChatRequest {
    ChatRequest { model: model.into(), messages: user(text), max_tokens: Some(max_tokens), ..Default::default() }
}

/// What one generation produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    pub deltas: usize,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

/// Reads events to the end; fails on `Failed`, on a missing end, or after two minutes.
pub async fn collect(mut rx: tokio::sync::mpsc::Receiver<Event>) -> Answer {
    let mut text = String::new();
    let mut deltas = 0;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .expect("generation took over two minutes")
            .expect("channel closed before Finished");
        match event {
            Event::Delta(d) => {
                assert!(!d.is_empty(), "empty delta");
                text.push_str(&d);
                deltas += 1;
            }
            Event::Finished { finish_reason, usage } => {
                assert!(rx.recv().await.is_none(), "events after Finished");
                return Answer { text, deltas, finish_reason, usage };
            }
            Event::Failed(e) => panic!("generation failed: {e}"),
        }
    }
}

pub async fn chat(engine: &Engine, req: ChatRequest) -> Result<Answer, EngineError> {
    let rx = engine.chat(req)?;
    Ok(collect(rx).await)
}

/// Embeds through the backend and joins its parts, checking they come in input order.
pub async fn embed_all(engine: &Engine, req: EmbedRequest) -> Result<Embeddings, EngineError> {
    let mut parts = engine.embed(req)?;
    let mut all = Embeddings { index: 0, data: Vec::new(), prompt_tokens: 0 };
    while let Some(part) = parts.recv().await {
        let part = part?;
        assert_eq!(part.index as usize, all.data.len(), "parts come in input order");
        all.data.extend(part.data);
        all.prompt_tokens += part.prompt_tokens;
    }
    Ok(all)
}
