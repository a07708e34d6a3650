//! The official Anthropic Python SDK (pinned in `scripts/test-requirements.txt`), pointed at the
//! edge as a new user would: a message whole, a message streamed (`messages.stream`, its text
//! events and its final message), a tool call and its result (whole and streamed), and a typed
//! error. `scripts/test` installs the SDK and sets `MERIDIAN_PYTHON`; without it this test fails
//! and says so.

use std::process::Command;

use meridian_e2e::{Mocks, TestEdge, ACME_KEY};
use serde_json::{json, Value};

/// Runs the SDK script against an edge serving `model`, and returns what it printed.
async fn sdk_against(edge: &TestEdge, model: &str) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/anthropic_client.py");
    let (python, base, model) = (meridian_e2e::python(), edge.url(), model.to_string());
    let out =
        tokio::task::spawn_blocking(move || Command::new(python).args([script, &base, ACME_KEY, &model]).output())
            .await
            .unwrap()
            .expect("python runs");
    assert!(out.status.success(), "SDK script failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("the script prints JSON")
}

/// What the SDK must have got from the mock's deterministic replies, on any target.
fn check(got: &Value) {
    assert_eq!(got["text"], "Echo: hello from the sdk", "{got}");
    assert_eq!(got["stop_reason"], "end_turn", "{got}");
    assert!(got["input_tokens"].as_u64().unwrap() > 0, "{got}");
    assert!(got["output_tokens"].as_u64().unwrap() > 0, "{got}");
    assert_eq!(got["stream_text"], "Echo: stream to the sdk", "{got}");
    assert!(got["stream_pieces"].as_u64().unwrap() >= 3, "streamed in pieces: {got}");
    assert_eq!(got["stream_final_text"], got["stream_text"], "{got}");
    assert_eq!(got["stream_final_stop_reason"], "end_turn", "{got}");
    assert!(got["stream_final_output_tokens"].as_u64().unwrap() > 0, "{got}");
    assert_eq!(got["tool_stop_reason"], "tool_use", "{got}");
    assert_eq!(got["tool_name"], "get_weather", "{got}");
    assert_eq!(got["tool_input"], json!({"echo": "Paris"}), "{got}");
    assert!(got["tool_id"].as_str().is_some_and(|id| !id.is_empty()), "{got}");
    assert_eq!(got["tool_answer"], "Tool said: sunny", "the tool result made the round trip: {got}");
    assert_eq!(got["streamed_tool_name"], "get_weather", "{got}");
    assert_eq!(got["streamed_tool_input"], json!({"echo": "Paris"}), "{got}");
    assert_eq!(got["streamed_tool_stop_reason"], "tool_use", "{got}");
    assert_eq!(got["unknown_model_error"], "NotFoundError", "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_anthropic_sdk_works_through_the_edge() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    check(&sdk_against(&edge, "claude-test").await);
    assert!(mocks.anthropic.request_count() > 0 && mocks.openai.request_count() == 0, "served by the Anthropic API");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_anthropic_sdk_works_on_an_openai_target() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    // `claude-via-gpt` is served by the OpenAI API: the edge translates every turn both ways.
    check(&sdk_against(&edge, "claude-via-gpt").await);
    assert!(mocks.openai.request_count() > 0 && mocks.anthropic.request_count() == 0, "served by the OpenAI API");
}
