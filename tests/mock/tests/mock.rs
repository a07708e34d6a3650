//! End-to-end checks of the mock over real loopback HTTP.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meridian_mock::{Behavior, MockOptions, MockUpstream};
use serde_json::{json, Value};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Posts `body`; returns status, content-type and the body (or the body error).
async fn post(
    c: &HttpClient,
    url: String,
    headers: &[(&str, &str)],
    body: Value,
) -> (StatusCode, String, Result<String, String>) {
    let mut b = Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), c.request(req))
        .await
        .expect("response head in time")
        .expect("request ok");
    let status = resp.status();
    let ct = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("body in time")
        .map(|c| String::from_utf8(c.to_bytes().to_vec()).unwrap())
        .map_err(|e| e.to_string());
    (status, ct, body)
}

const ANT: &[(&str, &str)] = &[("anthropic-version", "2023-06-01")];

fn openai_req(text: &str) -> Value {
    json!({"model": "gpt-test", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": text}
    ]})
}

fn anthropic_req(text: &str) -> Value {
    json!({"model": "claude-test", "max_tokens": 100,
           "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]})
}

/// Parses SSE text into (event name, data) pairs.
fn sse_events(s: &str) -> Vec<(String, String)> {
    s.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = String::new();
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = d.to_owned();
                }
            }
            (name, data)
        })
        .collect()
}

#[tokio::test]
async fn openai_non_streamed() {
    let mock = MockUpstream::start().await.unwrap();
    let c = client();
    let url = format!("{}/v1/chat/completions", mock.url());
    let (status, ct, body) = post(&c, url, &[], openai_req("hello world")).await;
    assert_eq!(status, 200);
    assert_eq!(ct, "application/json");
    let v: Value = serde_json::from_str(&body.unwrap()).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-test");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-mock-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "Echo: hello world");
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    // "be brief" + "hello world" = 19 chars -> 4 tokens.
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["total_tokens"], 7);
    assert_eq!(v["system_fingerprint"], "fp_mock");

    let got = mock.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/v1/chat/completions");
    assert_eq!(got[0].header("Content-Type"), Some("application/json"));
    assert_eq!(got[0].body["model"], "gpt-test");
}

#[tokio::test]
async fn openai_tool_call_and_tool_result() {
    let mock = MockUpstream::start().await.unwrap();
    let c = client();
    let url = format!("{}/v1/chat/completions", mock.url());
    let mut req = openai_req("weather?");
    req["tools"] = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]);
    let (_, _, body) = post(&c, url.clone(), &[], req.clone()).await;
    let v: Value = serde_json::from_str(&body.unwrap()).unwrap();
    let msg = &v["choices"][0]["message"];
    assert_eq!(msg["content"], Value::Null);
    assert_eq!(msg["tool_calls"][0]["type"], "function");
    assert_eq!(msg["tool_calls"][0]["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(msg["tool_calls"][0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"echo": "weather?"}));
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(v["usage"]["completion_tokens"], 5);

    // Streamed tool call: arguments arrive in pieces that rejoin.
    req["stream"] = json!(true);
    let (_, ct, body) = post(&c, url.clone(), &[], req.clone()).await;
    assert_eq!(ct, "text/event-stream");
    let events = sse_events(&body.unwrap());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let mut args = String::new();
    let mut arg_events = 0;
    for (_, d) in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        if let Some(a) = v.pointer("/choices/0/delta/tool_calls/0/function/arguments") {
            if !a.as_str().unwrap().is_empty() {
                arg_events += 1;
            }
            args.push_str(a.as_str().unwrap());
        }
    }
    assert!(arg_events >= 2);
    assert_eq!(serde_json::from_str::<Value>(&args).unwrap(), json!({"echo": "weather?"}));

    // Tool result as the last message.
    req["stream"] = json!(false);
    req["messages"].as_array_mut().unwrap().push(json!({"role": "tool", "tool_call_id": "x", "content": "sunny"}));
    let (_, _, body) = post(&c, url, &[], req).await;
    let v: Value = serde_json::from_str(&body.unwrap()).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Tool said: sunny");
}

#[tokio::test]
async fn openai_stream_usage_and_length() {
    let mock = MockUpstream::start().await.unwrap();
    let c = client();
    let url = format!("{}/v1/chat/completions", mock.url());
    let mut req = openai_req("one two three four");
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    req["max_tokens"] = json!(3);
    let (_, _, body) = post(&c, url, &[], req).await;
    let events = sse_events(&body.unwrap());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let text: String =
        chunks.iter().filter_map(|c| c.pointer("/choices/0/delta/content").and_then(Value::as_str)).collect();
    assert_eq!(text, "Echo: one two ");
    let fin = &chunks[chunks.len() - 2];
    assert_eq!(fin["choices"][0]["finish_reason"], "length");
    assert_eq!(fin["usage"], Value::Null);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn anthropic_streamed_ends_in_message_stop() {
    let mock = MockUpstream::start().await.unwrap();
    let c = client();
    let url = format!("{}/v1/messages", mock.url());
    let mut req = anthropic_req("hi there friend");
    req["stream"] = json!(true);
    let (status, ct, body) = post(&c, url, ANT, req).await;
    assert_eq!(status, 200);
    assert_eq!(ct, "text/event-stream");
    let events = sse_events(&body.unwrap());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let start: Value = serde_json::from_str(&events[0].1).unwrap();
    assert_eq!(start["message"]["model"], "claude-test");
    assert!(start["message"]["id"].as_str().unwrap().starts_with("msg_mock_"));
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| serde_json::from_str::<Value>(d).unwrap()["delta"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "Echo: hi there friend");
    let delta: Value = serde_json::from_str(&events[8].1).unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 4);
}

#[tokio::test]
async fn anthropic_non_streamed_tool_use_and_validation() {
    let mock = MockUpstream::start().await.unwrap();
    let c = client();
    let url = format!("{}/v1/messages", mock.url());
    let mut req = anthropic_req("find it");
    req["tools"] = json!([{"name": "search", "input_schema": {"type": "object"}}]);
    let (status, _, body) = post(&c, url.clone(), ANT, req.clone()).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body.unwrap()).unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["stop_reason"], "tool_use");
    assert_eq!(v["content"][0]["type"], "tool_use");
    assert_eq!(v["content"][0]["name"], "search");
    assert_eq!(v["content"][0]["input"], json!({"echo": "find it"}));

    req["tool_choice"] = json!({"type": "none"});
    let (_, _, body) = post(&c, url.clone(), ANT, req.clone()).await;
    let v: Value = serde_json::from_str(&body.unwrap()).unwrap();
    assert_eq!(v["content"][0]["text"], "Echo: find it");
    assert_eq!(v["stop_reason"], "end_turn");

    // Missing anthropic-version, missing max_tokens, malformed JSON.
    let (status, _, body) = post(&c, url.clone(), &[], req.clone()).await;
    assert_eq!(status, 400);
    let v: Value = serde_json::from_str(&body.unwrap()).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    req.as_object_mut().unwrap().remove("max_tokens");
    let (status, _, _) = post(&c, url.clone(), ANT, req).await;
    assert_eq!(status, 400);
    let (status, _, _) = post(&c, url, ANT, json!("not an object")).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn status_once_then_normal() {
    let mock = MockUpstream::start().await.unwrap();
    let c = client();
    mock.push(Behavior::Status(429));
    mock.push(Behavior::Status(529));
    let oa = format!("{}/v1/chat/completions", mock.url());
    let an = format!("{}/v1/messages", mock.url());
    let (status, _, body) = post(&c, oa.clone(), &[], openai_req("x")).await;
    assert_eq!(status, 429);
    let v: Value = serde_json::from_str(&body.unwrap()).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(v["error"]["code"], Value::Null);
    let (status, _, body) = post(&c, an.clone(), ANT, anthropic_req("x")).await;
    assert_eq!(status, 529);
    let v: Value = serde_json::from_str(&body.unwrap()).unwrap();
    assert_eq!(v["error"]["type"], "overloaded_error");
    let (status, _, _) = post(&c, oa, &[], openai_req("x")).await;
    assert_eq!(status, 200);
    let (status, _, _) = post(&c, an, ANT, anthropic_req("x")).await;
    assert_eq!(status, 200);
    assert_eq!(mock.request_count(), 4);
    mock.clear();
    assert_eq!(mock.request_count(), 0);
    assert!(mock.received().is_empty());
}

#[tokio::test]
async fn api_key_enforced() {
    let opts = MockOptions { api_key: Some("sekret".into()), record: false, ..Default::default() };
    let mock = MockUpstream::start_with(opts).await.unwrap();
    let c = client();
    let oa = format!("{}/v1/chat/completions", mock.url());
    let an = format!("{}/v1/messages", mock.url());
    let (status, _, body) = post(&c, oa.clone(), &[("authorization", "Bearer wrong")], openai_req("x")).await;
    assert_eq!(status, 401);
    let v: Value = serde_json::from_str(&body.unwrap()).unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    let (status, _, _) = post(&c, oa, &[("authorization", "Bearer sekret")], openai_req("x")).await;
    assert_eq!(status, 200);
    let (status, _, body) = post(&c, an.clone(), ANT, anthropic_req("x")).await;
    assert_eq!(status, 401);
    let v: Value = serde_json::from_str(&body.unwrap()).unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    let (status, _, _) =
        post(&c, an, &[("anthropic-version", "2023-06-01"), ("x-api-key", "sekret")], anthropic_req("x")).await;
    assert_eq!(status, 200);
    assert_eq!(mock.request_count(), 4);
    assert!(mock.received().is_empty());
}

#[tokio::test]
async fn cut_stall_stream_error_and_hang() {
    let mock = MockUpstream::start().await.unwrap();
    let c = client();
    let an = format!("{}/v1/messages", mock.url());
    let oa = format!("{}/v1/chat/completions", mock.url());
    let mut req = anthropic_req("a b c d e");
    req["stream"] = json!(true);

    // CutAfter: the body errors, no message_stop.
    mock.push(Behavior::CutAfter(2));
    let (status, _, body) = post(&c, an.clone(), ANT, req.clone()).await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "cut body must error");

    // StreamError: ends with an error event after 2 deltas.
    mock.push(Behavior::StreamError(2));
    let (_, _, body) = post(&c, an.clone(), ANT, req.clone()).await;
    let events = sse_events(&body.unwrap());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta", "error"]
    );
    let err: Value = serde_json::from_str(&events[5].1).unwrap();
    assert_eq!(err["error"]["type"], "overloaded_error");

    // OpenAI StreamError: a data error object and no [DONE].
    let mut oreq = openai_req("a b c");
    oreq["stream"] = json!(true);
    mock.push(Behavior::StreamError(1));
    let (_, _, body) = post(&c, oa.clone(), &[], oreq.clone()).await;
    let events = sse_events(&body.unwrap());
    assert_eq!(events.len(), 3);
    let err: Value = serde_json::from_str(&events[2].1).unwrap();
    assert_eq!(err["error"]["type"], "server_error");

    // StallAfter: the head arrives, the body never completes.
    mock.push(Behavior::StallAfter(1));
    let r = Request::post(oa.clone()).body(Full::new(Bytes::from(oreq.to_string()))).unwrap();
    let resp = c.request(r).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut seen = String::new();
    while !seen.contains("\"Echo: \"") {
        let f = tokio::time::timeout(Duration::from_secs(5), body.frame()).await.unwrap().unwrap().unwrap();
        seen.push_str(std::str::from_utf8(f.data_ref().unwrap()).unwrap());
    }
    assert!(tokio::time::timeout(Duration::from_millis(200), body.frame()).await.is_err());

    // Non-streamed cut: body errors.
    mock.push(Behavior::CutAfter(0));
    let (status, _, body) = post(&c, oa.clone(), &[], openai_req("x")).await;
    assert_eq!(status, 200);
    assert!(body.is_err());

    // Hang: no head.
    mock.push(Behavior::Hang);
    let r = Request::post(oa.clone()).body(Full::new(Bytes::from(openai_req("x").to_string()))).unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(200), c.request(r)).await.is_err());

    // Delay then normal.
    mock.push(Behavior::Delay(Duration::from_millis(50)));
    let t = std::time::Instant::now();
    let (status, _, _) = post(&c, oa, &[], openai_req("x")).await;
    assert_eq!(status, 200);
    assert!(t.elapsed() >= Duration::from_millis(50));
}

#[tokio::test]
async fn unknown_path_is_404() {
    let mock = MockUpstream::start().await.unwrap();
    let c = client();
    mock.push(Behavior::Status(500));
    let (status, ct, _) = post(&c, format!("{}/v1/nope", mock.url()), &[], json!({})).await;
    assert_eq!(status, 404);
    assert_eq!(ct, "application/json");
    // The queued behaviour was not consumed by the unknown path.
    let (status, _, _) = post(&c, format!("{}/v1/chat/completions", mock.url()), &[], openai_req("x")).await;
    assert_eq!(status, 500);
}

/// Reads everything a raw HTTP/1.1 exchange returns until the peer closes.
async fn raw_exchange(addr: std::net::SocketAddr, path: &str, headers: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{headers}content-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap() {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn cut_delivers_events_before_abort() {
    let mock = MockUpstream::start().await.unwrap();
    let mut req = anthropic_req("a b c d e");
    req["stream"] = json!(true);
    mock.push(Behavior::CutAfter(2));
    let got = raw_exchange(mock.addr(), "/v1/messages", "anthropic-version: 2023-06-01\r\n", &req.to_string()).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(got.matches("event: content_block_delta").count(), 2, "{got}");
    assert!(!got.contains("message_stop"));
    assert!(!got.ends_with("0\r\n\r\n"), "no terminal chunk: {got}");

    mock.push(Behavior::CutAfter(0));
    let got = raw_exchange(mock.addr(), "/v1/chat/completions", "", &openai_req("hello").to_string()).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let (head, body) = got.split_once("\r\n\r\n").unwrap();
    let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
    assert!(!body.is_empty() && body.len() < len, "half body: {body}");
}
