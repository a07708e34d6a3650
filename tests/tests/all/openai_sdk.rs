//! The official OpenAI SDKs for Python and Node, pointed at the edge as a new user would, get a
//! completion, a stream, the model list and typed errors; the Python one also embeddings from an
//! engine with the SDK's defaults. `scripts/test` installs the SDKs (`MERIDIAN_PYTHON`,
//! `.meridian/node-sdk`); without them these tests fail and say so.

use std::process::Command;

use meridian_e2e::engine::{Cluster, TestEngine};
use meridian_e2e::{Mocks, TestEdge, ACME_KEY};
use serde_json::Value;

/// Runs `program` with `args` and the edge's `/v1` URL, `ACME_KEY` and model `gpt-test`, and checks
/// what the SDK script printed: a completion, a stream with its usage, the model list and the
/// SDK's typed error for an unknown model. Returns the script's answer for checks of its own.
async fn sdk_round_trip(program: String, args: Vec<String>, env: Vec<(&'static str, String)>) -> Value {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let base = format!("{}/v1", edge.url());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(program).args(args).args([&base, ACME_KEY, "gpt-test"]).envs(env).output()
    })
    .await
    .unwrap()
    .expect("the SDK's runtime starts");
    assert!(out.status.success(), "SDK script failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    assert_eq!(got["text"], "Echo: hello from the sdk");
    assert!(got["usage"].as_u64().unwrap() > 0);
    assert_eq!(got["stream_text"], "Echo: stream to the sdk");
    assert!(got["stream_chunks"].as_u64().unwrap() >= 3, "{got}");
    assert_eq!(got["stream_usage"], 5, "usage of the five streamed pieces");
    assert!(got["models"].as_array().unwrap().iter().any(|m| m == "gpt-test"));
    assert_eq!(got["unknown_model_error"], "NotFoundError");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_works_through_the_edge() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/openai_client.py");
    sdk_round_trip(meridian_e2e::python(), vec![script.into()], Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_node_sdk_works_through_the_edge() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/node/openai_client.cjs");
    let env = vec![("NODE_PATH", meridian_e2e::node_sdk())];
    let got = sdk_round_trip("node".into(), vec![script.into()], env).await;
    assert_eq!(got["bad_key_error"], "AuthenticationError", "{got}");
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
