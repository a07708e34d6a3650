//! The official OpenAI Python SDK, pointed at the edge as a new user would, gets a completion, a
//! stream, the model list, a typed error, and embeddings from an engine with the SDK's defaults.
//! `scripts/test` installs the SDK and sets `MERIDIAN_PYTHON`; without it this test fails and says
//! so.

use std::process::Command;

use meridian_e2e::engine::{Cluster, TestEngine};
use meridian_e2e::{Mocks, TestEdge, ACME_KEY};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_works_through_the_edge() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/openai_client.py");
    let base = format!("{}/v1", edge.url());
    let python = meridian_e2e::python();
    let out =
        tokio::task::spawn_blocking(move || Command::new(python).args([script, &base, ACME_KEY, "gpt-test"]).output())
            .await
            .unwrap()
            .expect("python runs");
    assert!(out.status.success(), "SDK script failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    assert_eq!(got["text"], "Echo: hello from the sdk");
    assert!(got["usage"].as_u64().unwrap() > 0);
    assert_eq!(got["stream_text"], "Echo: stream to the sdk");
    assert!(got["stream_chunks"].as_u64().unwrap() >= 3, "{got}");
    assert_eq!(got["stream_usage"], 5, "usage of the five streamed pieces");
    assert!(got["models"].as_array().unwrap().iter().any(|m| m == "gpt-test"));
    assert_eq!(got["unknown_model_error"], "NotFoundError");
}

/// The vectors of the script's answer `key`, as the float32 values they stand for.
fn float32s(got: &Value, key: &str) -> Vec<Vec<f32>> {
    let rows = got[key].as_array().unwrap_or_else(|| panic!("{key} in {got}"));
    rows.iter().map(|v| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_gets_embeddings_with_its_defaults() {
    let mocks = Mocks::start().await;
    let cluster = Cluster::new("sdk-embed");
    let engine = TestEngine::start(&cluster, "engine-a", 2).await;
    let edge = crate::engine::edge(&mocks, &cluster, &[("engine-a", engine.addr)], |_| {}).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/openai_embeddings.py");
    let base = format!("{}/v1", edge.url());
    let python = meridian_e2e::python();
    let texts = ["A cat sits on the mat.", "The stock market fell sharply.", "Mountains in the fog."];
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python).args([script, &base, ACME_KEY, "minilm"]).args(texts).output()
    })
    .await
    .unwrap()
    .expect("python runs");
    assert!(out.status.success(), "SDK script failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    assert_eq!(got["model"], "minilm");
    assert!(got["default_tokens"].as_u64().unwrap() > 0, "{got}");
    let (default, float) = (float32s(&got, "default"), float32s(&got, "float"));
    assert_eq!(default.len(), texts.len());
    assert!(default.iter().all(|v| v.len() == 384), "MiniLM's vectors");
    assert_eq!(default, float, "the SDK's default (base64) decodes to the float answer's values");
}
