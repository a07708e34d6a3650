//! Translation between the two API shapes, both ways, with tool calls: an OpenAI client in front
//! of an Anthropic upstream and an Anthropic client in front of an OpenAI upstream.

use bytes::Bytes;
use meridian_e2e::{Mocks, Reply, TestEdge, ACME_KEY};
use serde_json::{json, Value};

fn weather_tool_openai() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    }})
}

fn weather_tool_anthropic() -> Value {
    json!({
        "name": "get_weather",
        "description": "Current weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    })
}

/// POSTs an Anthropic Messages request the way Anthropic SDKs do (`x-api-key`).
async fn messages(edge: &TestEdge, body: &Value) -> Reply {
    edge.send(
        "POST",
        "/v1/messages",
        None,
        &[("x-api-key", ACME_KEY), ("anthropic-version", "2023-06-01")],
        Bytes::from(body.to_string()),
    )
    .await
}

/// Event names of an SSE reply, in order (`""` for unnamed events).
fn event_names(r: &Reply) -> Vec<String> {
    r.events().iter().map(|e| e.event.clone().unwrap_or_default()).collect()
}

#[tokio::test]
async fn openai_client_tool_call_through_anthropic_upstream() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let body = json!({
        "model": "gpt-via-claude",
        "messages": [
            {"role": "system", "content": "You are a weather bot."},
            {"role": "user", "content": "weather in Oslo"}
        ],
        "tools": [weather_tool_openai()],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 1.5,
        "stop": "END"
    });
    let r = edge.post("/v1/chat/completions", ACME_KEY, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-meridian-target"), Some("an"));

    // What left the edge is a valid Anthropic Messages body.
    let received = mocks.anthropic.received();
    assert_eq!(received.len(), 1);
    let sent = &received[0];
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.body["model"], "claude-haiku-4-5");
    assert_eq!(sent.body["system"], "You are a weather bot.", "system moves to the top level");
    assert!(sent.body["max_tokens"].as_u64().is_some_and(|n| n > 0), "max_tokens is required: {}", sent.body);
    assert_eq!(sent.body["temperature"], 1.0, "temperature is clamped to Anthropic's range");
    assert_eq!(sent.body["stop_sequences"], json!(["END"]));
    assert!(sent.body.get("stop").is_none() && sent.body.get("tool_calls").is_none(), "{}", sent.body);
    let turns = sent.body["messages"].as_array().unwrap();
    assert_eq!(turns.len(), 1, "no system message among the turns: {}", sent.body);
    assert_eq!(turns[0]["role"], "user");
    assert_eq!(turns[0]["content"][0], json!({"type": "text", "text": "weather in Oslo"}));
    assert_eq!(sent.body["tools"], json!([weather_tool_anthropic()]));
    assert_eq!(sent.body["tool_choice"], json!({"type": "tool", "name": "get_weather"}));

    // The client gets the OpenAI shape back.
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].is_null(), "{v}");
    let calls = choice["message"]["tool_calls"].as_array().expect("tool_calls");
    assert_eq!(calls.len(), 1);
    assert!(calls[0]["id"].as_str().is_some_and(|id| id.starts_with("toolu_")), "the upstream's id: {v}");
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args = calls[0]["function"]["arguments"].as_str().expect("arguments are a JSON string");
    assert_eq!(serde_json::from_str::<Value>(args).unwrap(), json!({"echo": "weather in Oslo"}));
    let usage = &v["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(usage["completion_tokens"], 5);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap())
    );
}

#[tokio::test]
async fn openai_client_streamed_tool_call_through_anthropic_upstream() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let body = json!({
        "model": "gpt-via-claude",
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "developer", "content": "Use tools."}, {"role": "user", "content": "weather in Rome"}],
        "tools": [weather_tool_openai()],
        "tool_choice": "required"
    });
    let r = edge.post("/v1/chat/completions", ACME_KEY, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));

    let sent = &mocks.anthropic.received()[0];
    assert_eq!(sent.body["stream"], true);
    assert_eq!(sent.body["system"], "Use tools.", "developer messages are system instructions too");
    assert_eq!(sent.body["tool_choice"], json!({"type": "any"}));
    assert!(sent.body.get("stream_options").is_none(), "no OpenAI-only fields to Anthropic: {}", sent.body);

    let events = r.events();
    assert_eq!(events.last().unwrap().data, "[DONE]");
    assert!(events.iter().all(|e| e.event.is_none()), "OpenAI streams have no event names");
    let chunks = r.event_json();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"), "{chunks:?}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");

    let pieces: Vec<&Value> =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array()).flatten().collect();
    assert!(pieces.len() >= 3, "a header and argument pieces: {chunks:?}");
    let head = pieces[0];
    assert_eq!(head["index"], 0);
    assert!(head["id"].as_str().is_some_and(|id| !id.is_empty()), "{head}");
    assert_eq!(head["type"], "function");
    assert_eq!(head["function"]["name"], "get_weather");
    assert!(pieces[1..].iter().all(|p| p["index"] == 0 && p.get("id").is_none()), "{pieces:?}");
    let arguments: String = pieces.iter().filter_map(|p| p["function"]["arguments"].as_str()).collect();
    assert!(pieces[1..].iter().filter(|p| p["function"]["arguments"] != "").count() >= 2, "arrives in pieces");
    let args: Value = serde_json::from_str(&arguments).expect("the pieces concatenate to valid JSON");
    assert_eq!(args, json!({"echo": "weather in Rome"}));

    let finishes: Vec<&Value> =
        chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finishes, [&json!("tool_calls")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 5, "{chunks:?}");
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0, "input tokens from message_start: {usage}");
}

#[tokio::test]
async fn openai_client_tool_round_trip_through_anthropic_upstream() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let body = json!({
        "model": "gpt-via-claude",
        "messages": [
            {"role": "system", "content": "You are a weather bot."},
            {"role": "user", "content": "weather in Oslo"},
            {"role": "assistant", "content": null, "tool_calls": [{
                "id": "toolu_abc", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}
            }]},
            {"role": "tool", "tool_call_id": "toolu_abc", "content": "rain, 7 degrees"}
        ],
        // A tool with neither description nor parameters, as OpenAI allows.
        "tools": [{"type": "function", "function": {"name": "get_weather"}}]
    });
    let r = edge.post("/v1/chat/completions", ACME_KEY, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let sent = &mocks.anthropic.received()[0];
    let turns = sent.body["messages"].as_array().unwrap();
    assert_eq!(turns.len(), 3, "user, assistant tool_use, user tool_result: {}", sent.body);
    assert_eq!(turns[1]["role"], "assistant");
    assert_eq!(
        turns[1]["content"],
        json!([{"type": "tool_use", "id": "toolu_abc", "name": "get_weather", "input": {"city": "Oslo"}}]),
        "arguments become an input object"
    );
    assert_eq!(
        sent.body["tools"],
        json!([{"name": "get_weather", "input_schema": {"type": "object"}}]),
        "Anthropic refuses a null description and needs an input_schema"
    );
    assert_eq!(turns[2]["role"], "user");
    assert_eq!(
        turns[2]["content"],
        json!([{"type": "tool_result", "tool_use_id": "toolu_abc", "content": "rain, 7 degrees"}])
    );

    let v = r.json();
    assert_eq!(v["choices"][0]["message"]["content"], "Tool said: rain, 7 degrees");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["choices"][0]["message"].get("tool_calls").is_none(), "{v}");
}

#[tokio::test]
async fn anthropic_client_tool_use_through_openai_upstream() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let body = json!({
        "model": "claude-via-gpt",
        "max_tokens": 200,
        "system": [{"type": "text", "text": "You are a weather bot."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "weather in Oslo"}]}],
        "tools": [weather_tool_anthropic()],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "stop_sequences": ["END"],
        "top_k": 4
    });
    let r = messages(&edge, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-meridian-target"), Some("oa"));

    let received = mocks.openai.received();
    assert_eq!(received.len(), 1);
    let sent = &received[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.body["model"], "gpt-4o-mini");
    assert_eq!(
        sent.body["messages"],
        json!([{"role": "system", "content": "You are a weather bot."}, {"role": "user", "content": "weather in Oslo"}])
    );
    assert_eq!(sent.body["tools"], json!([weather_tool_openai()]), "tools as functions with parameters");
    assert_eq!(sent.body["tool_choice"], json!({"type": "function", "function": {"name": "get_weather"}}));
    assert_eq!(sent.body["max_tokens"], 200);
    assert_eq!(sent.body["stop"], json!(["END"]));
    for field in ["system", "top_k", "stop_sequences"] {
        assert!(sent.body.get(field).is_none(), "Anthropic-only `{field}` must not reach OpenAI: {}", sent.body);
    }

    let v = r.json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["stop_reason"], "tool_use");
    let content = v["content"].as_array().unwrap();
    assert_eq!(content.len(), 1, "no empty text block: {v}");
    assert_eq!(content[0]["type"], "tool_use");
    assert!(content[0]["id"].as_str().is_some_and(|id| id.starts_with("call_")), "the upstream's id: {v}");
    assert_eq!(content[0]["name"], "get_weather");
    assert_eq!(content[0]["input"], json!({"echo": "weather in Oslo"}), "input is an object, not a string");
    assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["usage"]["output_tokens"], 5);
}

#[tokio::test]
async fn anthropic_client_streamed_tool_use_through_openai_upstream() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let body = json!({
        "model": "claude-via-gpt",
        "max_tokens": 200,
        "stream": true,
        "system": "You are a weather bot.",
        "messages": [{"role": "user", "content": "weather in Lima"}],
        "tools": [weather_tool_anthropic()],
        "tool_choice": {"type": "any"}
    });
    let r = messages(&edge, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));

    let sent = &mocks.openai.received()[0];
    assert_eq!(sent.body["stream"], true);
    assert_eq!(sent.body["messages"][0], json!({"role": "system", "content": "You are a weather bot."}));
    assert_eq!(sent.body["tools"][0]["type"], "function");
    assert_eq!(sent.body["tools"][0]["function"]["parameters"], weather_tool_anthropic()["input_schema"]);
    assert_eq!(sent.body["tool_choice"], "required");

    let events = r.events();
    let names = event_names(&r);
    for (e, name) in events.iter().zip(&names) {
        let data: Value = serde_json::from_str(&e.data).expect("JSON data");
        assert_eq!(&data["type"], name.as_str(), "each event's data names its type: {}", e.data);
    }
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    let data = r.event_json();
    assert_eq!(data[0]["message"]["role"], "assistant");

    let starts: Vec<&Value> = data.iter().filter(|d| d["type"] == "content_block_start").collect();
    assert_eq!(starts.len(), 1, "one tool_use block and no empty text block: {names:?}");
    let block = &starts[0]["content_block"];
    assert_eq!(block["type"], "tool_use");
    assert_eq!(block["name"], "get_weather");
    assert!(block["id"].as_str().is_some_and(|id| !id.is_empty()), "{block}");
    let index = &starts[0]["index"];

    let deltas: Vec<&Value> = data.iter().filter(|d| d["type"] == "content_block_delta").collect();
    assert!(deltas.len() >= 2, "arguments arrive in pieces: {names:?}");
    assert!(deltas.iter().all(|d| d["delta"]["type"] == "input_json_delta" && &d["index"] == index), "{deltas:?}");
    let json: String = deltas.iter().filter_map(|d| d["delta"]["partial_json"].as_str()).collect();
    let input: Value = serde_json::from_str(&json).expect("the pieces concatenate to valid JSON");
    assert_eq!(input, json!({"echo": "weather in Lima"}));

    let pos = |name: &str| names.iter().position(|n| n == name).unwrap_or_else(|| panic!("no {name}: {names:?}"));
    assert!(pos("content_block_start") < pos("content_block_delta"));
    assert!(names.iter().rposition(|n| n == "content_block_delta").unwrap() < pos("content_block_stop"));
    assert!(pos("content_block_stop") < pos("message_delta") && pos("message_delta") < pos("message_stop"));
    let stop = data.iter().find(|d| d["type"] == "content_block_stop").unwrap();
    assert_eq!(&stop["index"], index);
    let delta = data.iter().find(|d| d["type"] == "message_delta").unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta["usage"]["output_tokens"], 5);
    assert!(delta["usage"]["input_tokens"].as_u64().unwrap() > 0, "{delta}");
    assert_eq!(names.iter().filter(|n| *n == "message_delta").count(), 1);
}

#[tokio::test]
async fn anthropic_client_tool_result_round_trip_through_openai_upstream() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let body = json!({
        "model": "claude-via-gpt",
        "max_tokens": 200,
        "messages": [
            {"role": "user", "content": "weather in Oslo"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "call_xyz", "name": "get_weather", "input": {"city": "Oslo"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_xyz", "content": [{"type": "text", "text": "sunny"}]}
            ]}
        ],
        "tools": [weather_tool_anthropic()]
    });
    let r = messages(&edge, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let sent = &mocks.openai.received()[0];
    let msgs = sent.body["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 3, "{}", sent.body);
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(msgs[1]["content"], "Let me check.");
    let call = &msgs[1]["tool_calls"][0];
    assert_eq!(call["id"], "call_xyz");
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("a JSON string")).unwrap();
    assert_eq!(args, json!({"city": "Oslo"}));
    assert_eq!(msgs[2], json!({"role": "tool", "tool_call_id": "call_xyz", "content": "sunny"}));

    let v = r.json();
    assert_eq!(v["content"], json!([{"type": "text", "text": "Tool said: sunny"}]));
    assert_eq!(v["stop_reason"], "end_turn");

    // The same conversation streamed: the answer arrives as text deltas.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = messages(&edge, &streamed).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mocks.openai.received()[1].body["messages"][2]["tool_call_id"], "call_xyz");
    let text: String = r.event_json().iter().filter_map(|e| e["delta"]["text"].as_str()).collect();
    assert_eq!(text, "Tool said: sunny");
    assert_eq!(event_names(&r).last().map(String::as_str), Some("message_stop"));
}
