//! The fault matrix: one fault a row, each met by a handful of requests (whole and streamed, in
//! both client API shapes), every one of them judged. A request must end in its documented
//! outcome: the right answer (the mock upstreams echo, `Echo: <last user text>`; an engine
//! answers what it answered before the fault), or a typed error: an error status with the API's
//! error body carrying a code, or, once a stream has begun, the API's error event (OpenAI
//! `data: {"error":…}` without `[DONE]`, Anthropic `event: error` without `message_stop`).
//! Never lost (no outcome within [`LOST_AFTER`]) and never a success it was not (a 200 whose text
//! is wrong or short, a stream that ends without its end or with the wrong text).
//!
//! `cargo test --workspace --test all -- fault_matrix:: --nocapture` prints the table; then every
//! row must hold.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use meridian::config::{hash_key, Config, PluginKind, TargetConfig, TenantConfig};
use meridian_e2e::engine::{free_udp_addr, Cluster, EngineProcess, TestEngine};
use meridian_e2e::process::{EdgeProcess, Http};
use meridian_e2e::raw::RawConn;
use meridian_e2e::{
    add_plugin, metric_or_zero, model, model_toml, plugin_wasm, tenant_toml, Behavior, ConfigExt, Mocks, Reply,
    TempDir, TestEdge, ACME_KEY, GLOBEX_KEY,
};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Far longer than any fault's own bound in these rows: a request with no outcome by then is lost.
const LOST_AFTER: Duration = Duration::from_secs(20);
/// The engine rows' prompt, asked greedily so that the engine's answer is known in advance; an
/// answer that runs to [`ENGINE_TOKENS`], so that a stream can be caught mid-answer.
const QUESTION: &str = "Write a long story about a lighthouse keeper.";
/// The engine rows' answer length: short, so that a row takes seconds.
const ENGINE_TOKENS: u32 = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_ends_in_its_documented_outcome() {
    let started = Instant::now();
    let rows = vec![
        timed(before_first_byte("upstream 429 before the first byte", Behavior::Status(429), 429)).await,
        timed(before_first_byte("upstream 500 before the first byte", Behavior::Status(500), 502)).await,
        timed(before_first_byte("upstream silent past first_byte_timeout (300 ms)", Behavior::Hang, 504)).await,
        timed(cut_mid_stream()).await,
        timed(engine_killed()).await,
        timed(engine_overloaded()).await,
        timed(peer_edge_down()).await,
        timed(plugins_fail()).await,
        timed(reload_under_streams()).await,
        timed(sigterm_under_load()).await,
        timed(stream_bound(
            "upstream keep-alives forever, no first token (first_token_timeout 300 ms)",
            Behavior::KeepAliveAfter(0),
            |t| t.first_token_timeout_ms = 300,
            Want::Answer,
            Want::Error(504),
        ))
        .await,
        timed(stream_bound(
            "upstream keep-alives forever after content (chunk_timeout 300 ms)",
            Behavior::KeepAliveAfter(2),
            |t| t.chunk_timeout_ms = 300,
            Want::ErrorEvent,
            Want::ErrorEvent,
        ))
        .await,
        timed(stream_bound(
            "endless stream (max_stream_bytes 16 KiB)",
            Behavior::Endless { gap: Duration::from_millis(1) },
            |t| t.max_stream_bytes = 16 << 10,
            Want::ErrorEvent,
            Want::ErrorEvent,
        ))
        .await,
        timed(stream_bound(
            "a line that never ends (max_event_bytes 8 KiB)",
            Behavior::EndlessLine,
            |t| t.max_event_bytes = 8 << 10,
            Want::Answer,
            Want::Error(502),
        ))
        .await,
        timed(stream_bound("invalid UTF-8 in a stream", Behavior::BadUtf8, |_| {}, Want::Answer, Want::Error(502)))
            .await,
        timed(stream_bound(
            "stream ends without a finish reason",
            Behavior::NoFinish,
            |_| {},
            Want::ErrorEvent,
            Want::ErrorEvent,
        ))
        .await,
        timed(slow_reader()).await,
    ];
    print_table(&rows);
    let took: Vec<String> = rows.iter().map(|r| format!("{:.1}", r.took.as_secs_f64())).collect();
    println!("\n{} rows in {:.1} s (each, s: {})", rows.len(), started.elapsed().as_secs_f64(), took.join(" "));
    let broken: Vec<String> = rows.iter().filter(|r| !r.holds()).map(|r| r.fault.clone()).collect();
    assert!(broken.is_empty(), "rows that do not hold (details above): {broken:?}");
}

/// Runs a row, timing it.
async fn timed(row: impl std::future::Future<Output = Row>) -> Row {
    let started = Instant::now();
    let mut row = row.await;
    row.took = started.elapsed();
    row
}

// ---------------------------------------------------------------------------------------------
// Requests, and how they ended.

/// A client API shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    OpenAi,
    Anthropic,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Api::OpenAi => "/v1/chat/completions",
            Api::Anthropic => "/v1/messages",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::Anthropic => "anthropic",
        }
    }
}

/// One client request.
#[derive(Clone, Debug)]
struct Ask {
    api: Api,
    model: String,
    text: String,
    stream: bool,
    key: &'static str,
    max_tokens: u32,
}

impl Ask {
    fn new(api: Api, model: &str, text: &str, stream: bool) -> Ask {
        Ask { api, model: model.into(), text: text.into(), stream, key: ACME_KEY, max_tokens: 64 }
    }

    fn body(&self) -> Value {
        json!({"model": self.model, "stream": self.stream, "max_tokens": self.max_tokens, "temperature": 0,
               "messages": [{"role": "user", "content": self.text}]})
    }

    fn label(&self) -> String {
        format!("{} {} {}", self.api.name(), if self.stream { "stream" } else { "whole" }, self.model)
    }

    /// What a mock upstream answers it.
    fn echo(&self) -> String {
        format!("Echo: {}", self.text)
    }
}

/// The four kinds of request, for `model`: each API shape, whole and streamed, each with its own
/// text (`<what> 0` … `<what> 3`).
fn mix(model: &str, what: &str) -> Vec<Ask> {
    [(Api::OpenAi, false), (Api::OpenAi, true), (Api::Anthropic, false), (Api::Anthropic, true)]
        .into_iter()
        .enumerate()
        .map(|(i, (api, stream))| Ask::new(api, model, &format!("{what} alpha beta gamma delta {i}"), stream))
        .collect()
}

/// How a request ended on the wire.
#[derive(Debug)]
enum Wire {
    /// A whole reply (status, headers, the body to its end).
    Reply(Reply),
    /// The connection was refused before the request went out.
    Refused,
    /// No reply, or one whose body broke off without an end (what had arrived is in the text).
    Lost(String),
}

impl Wire {
    fn target(&self) -> Option<&str> {
        match self {
            Wire::Reply(r) => r.header("x-meridian-target"),
            _ => None,
        }
    }
}

/// POSTs `body` to `url` as tenant `key` (bypassing the edge's prompt cache, so that every request
/// meets the fault) and reads the reply to its end, within [`LOST_AFTER`]; fires `first_content`
/// once the first text of the answer has arrived.
async fn send_body(
    client: &Http,
    url: &str,
    key: &str,
    body: &Value,
    mut first_content: Option<oneshot::Sender<()>>,
) -> Wire {
    let req = hyper::Request::post(url)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .header("x-meridian-cache", "bypass")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid request");
    let exchange = async {
        let resp = match client.0.request(req).await {
            Ok(resp) => resp,
            Err(e) if e.is_connect() => return Wire::Refused,
            Err(e) => return Wire::Lost(format!("no response: {e:?}")),
        };
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        let mut body = resp.into_body();
        let mut read = BytesMut::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    read.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..]));
                    if first_content.is_some() && has_content(&read) {
                        let _ = first_content.take().map(|tx| tx.send(()));
                    }
                }
                Err(e) => {
                    return Wire::Lost(format!(
                        "{status} whose body broke off ({e}) after {:?}",
                        String::from_utf8_lossy(&read)
                    ))
                }
            }
        }
        Wire::Reply(Reply { status, headers, body: read.freeze() })
    };
    tokio::time::timeout(LOST_AFTER, exchange)
        .await
        .unwrap_or_else(|_| Wire::Lost(format!("no outcome within {LOST_AFTER:?}")))
}

/// Whether a streamed body so far holds some text of the answer (OpenAI `"content":"…"`,
/// Anthropic `"text":"…"`, not empty).
fn has_content(body: &[u8]) -> bool {
    let body = String::from_utf8_lossy(body);
    ["\"content\":\"", "\"text\":\""]
        .iter()
        .any(|key| body.match_indices(key).any(|(at, _)| !body[at + key.len()..].starts_with('"')))
}

async fn send(client: &Http, base: &str, ask: &Ask) -> Wire {
    send_body(client, &format!("{base}{}", ask.api.path()), ask.key, &ask.body(), None).await
}

/// Sends every one of `asks` at once, each on its own task.
fn spawn_all(client: &Http, base: &str, asks: &[Ask]) -> Vec<JoinHandle<Wire>> {
    asks.iter()
        .map(|ask| {
            let (client, base, ask) = (client.clone(), base.to_string(), ask.clone());
            tokio::spawn(async move { send(&client, &base, &ask).await })
        })
        .collect()
}

async fn join_all(tasks: Vec<JoinHandle<Wire>>) -> Vec<Wire> {
    let mut wires = Vec::with_capacity(tasks.len());
    for task in tasks {
        wires.push(task.await.expect("a client task does not panic"));
    }
    wires
}

async fn send_all(client: &Http, base: &str, asks: &[Ask]) -> Vec<Wire> {
    join_all(spawn_all(client, base, asks)).await
}

/// Sends `first` and `second` all at once; their replies, apart.
async fn send_both(client: &Http, base: &str, first: &[Ask], second: &[Ask]) -> (Vec<Wire>, Vec<Wire>) {
    let mut wires = send_all(client, base, &[first, second].concat()).await;
    let second = wires.split_off(first.len());
    (wires, second)
}

// ---------------------------------------------------------------------------------------------
// The judge.

/// How a request ended, judged.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// The right answer, ended properly.
    Answered,
    /// A typed error: an error status with the API's error body, or (`status` 200) the API's
    /// error event ending a stream that had begun; `code` is the OpenAI `code`, the Anthropic
    /// error `type`.
    TypedError { status: u16, code: String },
    /// The connection was refused before the request went out (a node that stopped listening):
    /// the client knows at once that nothing was taken.
    Refused,
    /// Anything else: lost, or a success it was not.
    Wrong(String),
}

impl Outcome {
    /// For the table.
    fn short(&self) -> String {
        match self {
            Outcome::Answered => "answered".into(),
            Outcome::TypedError { status: 200, code } => format!("error event {code}"),
            Outcome::TypedError { status, code } => format!("{status} {code}"),
            Outcome::Refused => "connection refused".into(),
            Outcome::Wrong(_) => "WRONG".into(),
        }
    }
}

/// Judges how a request of `api` ended, the right answer being `expected` (which may depend on
/// the reply: who answered it).
fn judge_wire(wire: &Wire, api: Api, expected: impl FnOnce(&Reply) -> String) -> Outcome {
    match wire {
        Wire::Reply(reply) => judge(reply, api, &expected(reply)),
        Wire::Refused => Outcome::Refused,
        Wire::Lost(why) => Outcome::Wrong(format!("lost: {why}")),
    }
}

/// Judges a whole reply to a request of `api` whose right answer is `expected_text`.
fn judge(reply: &Reply, api: Api, expected_text: &str) -> Outcome {
    if reply.status != 200 {
        return error_reply(reply, api);
    }
    let streamed = reply.header("content-type").is_some_and(|t| t.starts_with("text/event-stream"));
    let judged = match (streamed, api) {
        (false, Api::OpenAi) => whole_openai(reply, expected_text),
        (false, Api::Anthropic) => whole_anthropic(reply, expected_text),
        (true, Api::OpenAi) => stream_openai(reply, expected_text),
        (true, Api::Anthropic) => stream_anthropic(reply, expected_text),
    };
    judged.unwrap_or_else(|why| Outcome::Wrong(format!("{why}: {}", clip(&reply.text()))))
}

/// An error status: typed when its body is the API's error shape with a code.
fn error_reply(reply: &Reply, api: Api) -> Outcome {
    let v: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    match error_code(&v, api) {
        Some(code) => Outcome::TypedError { status: reply.status, code },
        None => Outcome::Wrong(format!("{} without {} error body: {}", reply.status, api.name(), clip(&reply.text()))),
    }
}

/// The code of an error body (or error event data) in `api`'s shape, if it is one.
fn error_code(v: &Value, api: Api) -> Option<String> {
    let (error, code) = match api {
        Api::OpenAi => (&v["error"], &v["error"]["code"]),
        Api::Anthropic if v["type"] == "error" => (&v["error"], &v["error"]["type"]),
        Api::Anthropic => return None,
    };
    let typed = error["type"].as_str().is_some_and(|t| !t.is_empty());
    let said = error["message"].as_str().is_some_and(|m| !m.is_empty());
    code.as_str().filter(|c| typed && said && !c.is_empty()).map(str::to_string)
}

fn whole_openai(reply: &Reply, expected: &str) -> Result<Outcome, String> {
    let v: Value = serde_json::from_slice(&reply.body).map_err(|e| format!("200 not JSON ({e})"))?;
    let choice = &v["choices"][0];
    if v["object"] != "chat.completion" || !choice["finish_reason"].is_string() {
        return Err("200 that is no finished chat.completion".into());
    }
    same_text(choice["message"]["content"].as_str().unwrap_or_default(), expected)
}

fn whole_anthropic(reply: &Reply, expected: &str) -> Result<Outcome, String> {
    let v: Value = serde_json::from_slice(&reply.body).map_err(|e| format!("200 not JSON ({e})"))?;
    if v["type"] != "message" || !v["stop_reason"].is_string() {
        return Err("200 that is no finished message".into());
    }
    let blocks = v["content"].as_array().cloned().unwrap_or_default();
    let text: String = blocks.iter().filter_map(|b| b["text"].as_str()).collect();
    same_text(&text, expected)
}

fn same_text(text: &str, expected: &str) -> Result<Outcome, String> {
    if text == expected {
        Ok(Outcome::Answered)
    } else {
        Err(format!("answer {text:?}, not {expected:?}"))
    }
}

/// An OpenAI stream: chunks, then `[DONE]` after a finish_reason; or chunks whose text so far is
/// the start of the answer, then one error chunk, last, and no `[DONE]`.
fn stream_openai(reply: &Reply, expected: &str) -> Result<Outcome, String> {
    let events = reply.events();
    let (mut text, mut finished) = (String::new(), false);
    for (i, event) in events.iter().enumerate() {
        let last = i + 1 == events.len();
        if event.data == "[DONE]" {
            if !last {
                return Err("events after [DONE]".into());
            }
            if !finished {
                return Err("[DONE] without a finish_reason".into());
            }
            return same_text(&text, expected);
        }
        let chunk: Value = serde_json::from_str(&event.data).map_err(|e| format!("event not JSON ({e})"))?;
        if chunk.get("error").is_some() {
            let code = error_code(&chunk, Api::OpenAi).ok_or("an error event without a code")?;
            return error_event(last, &text, expected, code);
        }
        text.push_str(chunk["choices"][0]["delta"]["content"].as_str().unwrap_or_default());
        finished |= chunk["choices"][0]["finish_reason"].is_string();
    }
    Err(format!("a stream that ended with neither [DONE] nor an error event after {text:?} (cut short)"))
}

/// An Anthropic stream: `message_start` … `message_delta` (a stop_reason) `message_stop`; or the
/// start of the answer, then one `error` event, last, and no `message_stop`.
fn stream_anthropic(reply: &Reply, expected: &str) -> Result<Outcome, String> {
    let events = reply.events();
    let (mut text, mut finished) = (String::new(), false);
    for (i, event) in events.iter().enumerate() {
        let last = i + 1 == events.len();
        let data: Value = serde_json::from_str(&event.data).map_err(|e| format!("event not JSON ({e})"))?;
        match event.event.as_deref().unwrap_or_default() {
            "error" => {
                let code = error_code(&data, Api::Anthropic).ok_or("an error event without an error type")?;
                return error_event(last, &text, expected, code);
            }
            "content_block_delta" => text.push_str(data["delta"]["text"].as_str().unwrap_or_default()),
            "message_delta" => finished |= data["delta"]["stop_reason"].is_string(),
            "message_stop" => {
                if !last {
                    return Err("events after message_stop".into());
                }
                if !finished {
                    return Err("message_stop without a stop_reason".into());
                }
                return same_text(&text, expected);
            }
            _ => {}
        }
    }
    Err(format!("a stream that ended with neither message_stop nor an error event after {text:?} (cut short)"))
}

/// A stream's error event: typed when it is the last event and what came before it is the start
/// of the right answer (nothing wrong was said before the failure).
fn error_event(last: bool, text: &str, expected: &str, code: String) -> Result<Outcome, String> {
    if !last {
        return Err("events after the error event".into());
    }
    if !expected.starts_with(text) {
        return Err(format!("{text:?} before the error event is not the start of {expected:?}"));
    }
    Ok(Outcome::TypedError { status: 200, code })
}

fn clip(s: &str) -> String {
    const MAX: usize = 400;
    match s.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Rows.

/// A request's documented outcome.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// The right answer.
    Answer,
    /// This error status, typed.
    Error(u16),
    /// A typed error event ending a stream that had begun.
    ErrorEvent,
    /// The right answer or a typed error (status or event).
    AnswerOrError,
    /// The right answer, a typed error, or a refused connection (a node that has stopped).
    AnswerErrorOrRefused,
}

impl Want {
    fn allows(self, outcome: &Outcome) -> bool {
        match (self, outcome) {
            (_, Outcome::Wrong(_)) => false,
            (Want::Answer, Outcome::Answered) => true,
            (Want::Error(want), Outcome::TypedError { status, .. }) => *status == want,
            (Want::ErrorEvent, Outcome::TypedError { status, .. }) => *status == 200,
            (Want::AnswerOrError, Outcome::Answered | Outcome::TypedError { .. }) => true,
            (Want::AnswerErrorOrRefused, _) => true,
            _ => false,
        }
    }
}

/// One request of a row, judged.
struct Judged {
    label: String,
    want: Want,
    outcome: Outcome,
    /// The target that answered (`x-meridian-target`), if the edge said.
    by: Option<String>,
}

/// One row of the matrix.
struct Row {
    fault: String,
    sent: String,
    documented: String,
    judged: Vec<Judged>,
    /// Failed checks of the row as a whole (the fault did happen, the new config is in use …).
    problems: Vec<String>,
    /// What else the row saw, for the table.
    notes: Vec<String>,
    /// How long the row took, set up and torn down.
    took: Duration,
}

impl Row {
    fn new(fault: &str, sent: &str, documented: &str) -> Row {
        Row {
            fault: fault.into(),
            sent: sent.into(),
            documented: documented.into(),
            judged: vec![],
            problems: vec![],
            notes: vec![],
            took: Duration::ZERO,
        }
    }

    fn record(&mut self, label: String, want: Want, wire: &Wire, outcome: Outcome) {
        let by = wire.target().map(str::to_string);
        self.judged.push(Judged { label, want, outcome, by });
    }

    /// Judges each of `asks` against what the mocks echo, wanting `want`.
    fn record_echoes(&mut self, asks: &[Ask], wires: &[Wire], want: Want) {
        for (ask, wire) in asks.iter().zip(wires) {
            self.record(ask.label(), want, wire, judge_wire(wire, ask.api, |_| ask.echo()));
        }
    }

    /// Records `problem` unless `ok`.
    fn check(&mut self, ok: bool, problem: impl Into<String>) {
        if !ok {
            self.problems.push(problem.into());
        }
    }

    /// Every request ended as documented, and the row's own checks passed.
    fn holds(&self) -> bool {
        !self.judged.is_empty() && self.problems.is_empty() && self.judged.iter().all(|j| j.want.allows(&j.outcome))
    }

    /// What the clients got, counted by outcome.
    fn got(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for j in &self.judged {
            let by = match (&j.outcome, &j.by) {
                (Outcome::Answered, Some(target)) => format!(" by {target}"),
                _ => String::new(),
            };
            *counts.entry(format!("{}{by}", j.outcome.short())).or_default() += 1;
        }
        let counted = counts.iter().map(|(what, n)| format!("{n}× {what}"));
        counted.chain(self.notes.iter().map(|n| format!("({n})"))).collect::<Vec<_>>().join(", ")
    }
}

/// Prints the matrix, then what went wrong in each row that does not hold.
fn print_table(rows: &[Row]) {
    println!("\n| fault | what the clients sent | documented outcome | what they got | ok |");
    println!("| --- | --- | --- | --- | --- |");
    for r in rows {
        let ok = if r.holds() { "ok" } else { "FAIL" };
        println!("| {} | {} | {} | {} | {ok} |", r.fault, r.sent, r.documented, r.got());
    }
    for r in rows.iter().filter(|r| !r.holds()) {
        println!("\nFAIL {}:", r.fault);
        for p in &r.problems {
            println!("  - {p}");
        }
        for j in r.judged.iter().filter(|j| !j.want.allows(&j.outcome)) {
            println!("  - {}: wanted {:?}, got {:?} (target {:?})", j.label, j.want, j.outcome, j.by);
        }
    }
}

/// The standard config, where every request meets its fault: a failing target is not ejected
/// (ejection is `target_health`'s topic), so each one pops its own injected behaviour.
fn config(mocks: &Mocks) -> Config {
    let mut cfg = mocks.config();
    cfg.health.ejection_threshold = 1_000;
    cfg
}

/// Rows 1–3: `behavior` before the response head. Model `fallback` (oa, oa2, an) falls back to
/// oa2; `gpt-test` (oa) and `claude-test` (an) have nothing to fall back to: `status`.
async fn before_first_byte(fault: &str, behavior: Behavior, status: u16) -> Row {
    let mut row = Row::new(
        fault,
        "4× model with a fallback, 4× without (whole+stream, openai+anthropic)",
        &format!("fallback answers; without one, typed {status}"),
    );
    let mocks = Mocks::start().await;
    let mut cfg = config(&mocks);
    cfg.set_timeouts(300, 300);
    let edge = TestEdge::start(cfg).await;
    let falls_back = mix("fallback", "falls back");
    let mut alone = mix("gpt-test", "alone");
    for ask in alone.iter_mut().filter(|a| a.api == Api::Anthropic) {
        ask.model = "claude-test".into();
    }
    for ask in falls_back.iter().chain(&alone) {
        let primary = if ask.model == "claude-test" { &mocks.anthropic } else { &mocks.openai };
        primary.push(behavior.clone());
    }
    let client = Http::default();
    let (first, second) = send_both(&client, &edge.url(), &falls_back, &alone).await;
    row.record_echoes(&falls_back, &first, Want::Answer);
    row.record_echoes(&alone, &second, Want::Error(status));
    let fell_back = first.iter().filter(|w| w.target() == Some("oa2")).count();
    row.check(
        fell_back == falls_back.len(),
        format!("{fell_back} of {} answered by the fallback oa2", falls_back.len()),
    );
    row.check(mocks.request_counts()[0] == 6, format!("oa met 6 requests, not {:?}", mocks.request_counts()));
    row
}

/// Row 4: the upstream breaks off after 2 content events (cut, or stalled past the 300 ms chunk
/// timeout). Streams had begun: a typed error event. A whole answer had not: fallback or 502.
async fn cut_mid_stream() -> Row {
    let mut row = Row::new(
        "upstream cut / stalled after 2 content events",
        "4× stream cut, 2× stream stalled, 2× whole cut (openai+anthropic)",
        "streams: typed error event, no clean end; whole: fallback, or typed 502",
    );
    let mocks = Mocks::start().await;
    let mut cfg = config(&mocks);
    cfg.set_timeouts(1000, 300);
    let edge = TestEdge::start(cfg).await;
    let client = Http::default();

    // Every request of a batch meets the same behaviour, so which pops which does not matter.
    let streams: Vec<Ask> = [
        (Api::OpenAi, "fallback"),
        (Api::Anthropic, "fallback"),
        (Api::OpenAi, "gpt-test"),
        (Api::Anthropic, "claude-test"),
    ]
    .into_iter()
    .map(|(api, model)| Ask::new(api, model, "cut alpha beta gamma delta epsilon", true))
    .collect();
    let whole: Vec<Ask> = ["fallback", "gpt-test"]
        .into_iter()
        .map(|model| Ask::new(Api::OpenAi, model, "half a body alpha beta gamma", false))
        .collect();
    for ask in streams.iter().chain(&whole) {
        let primary = if ask.model == "claude-test" { &mocks.anthropic } else { &mocks.openai };
        primary.push(Behavior::CutAfter(2));
    }
    let (cut, halves) = send_both(&client, &edge.url(), &streams, &whole).await;
    row.record_echoes(&streams, &cut, Want::ErrorEvent);
    row.record_echoes(&whole[..1], &halves[..1], Want::Answer);
    row.record_echoes(&whole[1..], &halves[1..], Want::Error(502));

    let stalled = vec![
        Ask::new(Api::OpenAi, "gpt-test", "stall alpha beta gamma delta", true),
        Ask::new(Api::Anthropic, "claude-test", "stall alpha beta gamma delta", true),
    ];
    mocks.openai.push(Behavior::StallAfter(2));
    mocks.anthropic.push(Behavior::StallAfter(2));
    let wires = send_all(&client, &edge.url(), &stalled).await;
    row.record_echoes(&stalled, &wires, Want::ErrorEvent);
    row
}

/// The engine rows' edge: model `smol` goes to `engine-a` at `addr`, then to the mock oa;
/// `smol-solo` to `engine-a` only.
async fn engine_edge(mocks: &Mocks, cluster: &Cluster, addr: std::net::SocketAddr) -> TestEdge {
    let mut cfg = config(mocks);
    cluster.add_engine_target(&mut cfg, "edge-test", "engine-a", "engine-a", addr);
    let engine = cfg.target_mut("engine-a");
    // A dead engine says nothing: the edge notices by its own bounds, generous for a debug build
    // on a busy machine.
    engine.connect_timeout_ms = 1_000;
    engine.first_byte_timeout_ms = 5_000;
    engine.chunk_timeout_ms = 5_000;
    cfg.models.push(model("smol", &[("engine-a", None), ("oa", Some("gpt-4o-mini"))]));
    cfg.models.push(model("smol-solo", &[("engine-a", Some("smol"))]));
    TestEdge::start(cfg).await
}

/// The engine rows' requests: [`QUESTION`] in each shape, whole and streamed, to `model`.
fn engine_asks(model: &str) -> Vec<Ask> {
    let mut asks = mix(model, "");
    for ask in &mut asks {
        ask.text = QUESTION.into();
        ask.max_tokens = ENGINE_TOKENS;
    }
    asks
}

/// The engine's greedy answer to [`QUESTION`] before any fault, or why there is none.
async fn engine_reference(client: &Http, edge: &TestEdge) -> Result<String, String> {
    match send(client, &edge.url(), &engine_asks("smol-solo")[0]).await {
        Wire::Reply(r) if r.status == 200 && r.header("x-meridian-target") == Some("engine-a") => {
            let text = r.json()["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
            if text.is_empty() {
                Err(format!("the engine's reference answer is empty: {}", r.text()))
            } else {
                Ok(text)
            }
        }
        other => Err(format!("no reference answer from the engine: {other:?}")),
    }
}

/// Judges engine rows' replies: the engine's reference answer when it answered, else the echo of
/// the fallback mock.
fn record_engine(row: &mut Row, asks: &[Ask], wires: &[Wire], want: Want, reference: &str) {
    for (ask, wire) in asks.iter().zip(wires) {
        let outcome = judge_wire(wire, ask.api, |r| {
            if r.header("x-meridian-target") == Some("engine-a") {
                reference.to_string()
            } else {
                ask.echo()
            }
        });
        row.record(ask.label(), want, wire, outcome);
    }
}

/// Polls the engine's health until `ok`, for at most 20 s; whether it came.
async fn until_engine(
    probe: &meridian_engine::client::EngineClient,
    ok: impl Fn(&meridian_engine::api::Health) -> bool,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if probe.health().await.is_ok_and(|h| ok(&h)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// Row 5: the engine process is killed (SIGKILL) while it answers; later requests find it dead.
async fn engine_killed() -> Row {
    let mut row = Row::new(
        "engine killed (SIGKILL) mid-answer",
        "4× in flight at the kill, 4× after it (whole+stream, openai+anthropic)",
        "in flight: answered, fallback, or typed error (event once streaming); after: fallback answers",
    );
    let mocks = Mocks::start().await;
    let cluster = Cluster::new("fault-kill");
    // One sequence at a time: every answer is computed alone, so greedy answers are all the same.
    let mut engine = EngineProcess::start(&cluster, "engine-a", 1).await;
    let edge = engine_edge(&mocks, &cluster, engine.addr).await;
    let client = Http::default();
    let reference = match engine_reference(&client, &edge).await {
        Ok(text) => text,
        Err(why) => {
            row.check(false, why);
            return row;
        }
    };
    let probe = cluster.client("probe", "engine-a", engine.addr);
    let asks = engine_asks("smol");
    // The OpenAI stream first, killed once its answer has begun; the others wait in the queue.
    let (began, beginning) = oneshot::channel();
    let streaming = {
        let (client, url, ask) = (client.clone(), format!("{}{}", edge.url(), asks[1].api.path()), asks[1].clone());
        tokio::spawn(async move { send_body(&client, &url, ask.key, &ask.body(), Some(began)).await })
    };
    let streamed = tokio::time::timeout(LOST_AFTER, beginning).await.is_ok_and(|r| r.is_ok());
    row.check(streamed, "the engine's stream never began");
    let others: Vec<Ask> = asks.iter().enumerate().filter(|(i, _)| *i != 1).map(|(_, a)| a.clone()).collect();
    let waiting = spawn_all(&client, &edge.url(), &others);
    let queued = until_engine(&probe, |h| h.queue_depth > 0).await;
    row.check(queued, "no request waited at the engine when it was killed");
    engine.kill();
    let after = send_all(&client, &edge.url(), &asks).await;
    let mut in_flight = join_all(waiting).await;
    in_flight.insert(1, streaming.await.expect("the streaming client does not panic"));
    record_engine(&mut row, &asks, &in_flight, Want::AnswerOrError, &reference);
    record_engine(&mut row, &asks, &after, Want::Answer, &reference);
    let fell_back = after.iter().filter(|w| w.target() == Some("oa")).count();
    row.check(
        fell_back == asks.len(),
        format!("{fell_back} of {} later requests answered by the fallback", asks.len()),
    );
    row
}

/// Row 6: the engine (one sequence at a time, a queue of one) is busy with one long answer and
/// has one more waiting: further requests are refused as overloaded.
async fn engine_overloaded() -> Row {
    let mut row = Row::new(
        "engine overloaded (1 generating, queue of 1 full)",
        "4× model with a fallback, 2× engine only (whole+stream, openai+anthropic)",
        "fallback answers; engine only: typed 429",
    );
    let mocks = Mocks::start().await;
    let cluster = Cluster::new("fault-overload");
    let engine = TestEngine::start_queued(&cluster, "engine-a", 1, 1).await;
    let edge = engine_edge(&mocks, &cluster, engine.addr).await;
    let client = Http::default();
    let reference = match engine_reference(&client, &edge).await {
        Ok(text) => text,
        Err(why) => {
            row.check(false, why);
            return row;
        }
    };
    let probe = cluster.client("probe", "engine-a", engine.addr);
    // Long stories, abandoned once the row is done (the engine cancels an abandoned answer).
    let story = json!({"model": "smol-solo", "stream": true, "max_tokens": 4000, "temperature": 0.8, "seed": 1,
                       "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}]});
    let url = format!("{}/v1/chat/completions", edge.url());
    let hog = || {
        let (client, url, story) = (client.clone(), url.clone(), story.clone());
        tokio::spawn(async move { send_body(&client, &url, ACME_KEY, &story, None).await })
    };
    let generating = hog();
    row.check(until_engine(&probe, |h| h.active_sequences == 1).await, "the first story never began");
    let waiting = hog();
    row.check(until_engine(&probe, |h| h.queue_depth == 1).await, "the second story never queued");

    let falls_back = engine_asks("smol");
    let solo: Vec<Ask> = engine_asks("smol-solo").into_iter().step_by(3).collect();
    let (first, second) = send_both(&client, &edge.url(), &falls_back, &solo).await;
    record_engine(&mut row, &falls_back, &first, Want::Answer, &reference);
    record_engine(&mut row, &solo, &second, Want::Error(429), &reference);
    generating.abort();
    waiting.abort();
    row
}

/// Row 7: the peer edge of another region does not answer (nothing listens on its address).
async fn peer_edge_down() -> Row {
    let mut row = Row::new(
        "peer edge down (relay to a dead address)",
        "4× model with a local fallback, 2× relay only (whole+stream, openai+anthropic)",
        "local fallback answers; relay only: typed 502",
    );
    let mocks = Mocks::start().await;
    let cluster = Cluster::new("fault-peer");
    let mut cfg = config(&mocks);
    cluster.join(&mut cfg, "edge-us");
    cluster.add_edge_target(&mut cfg, "edge-eu", "edge-eu", "eu-west", free_udp_addr());
    cfg.target_mut("edge-eu").connect_timeout_ms = 500;
    cfg.models.push(model("relayed", &[("edge-eu", None), ("oa2", Some("gpt-4o-mini"))]));
    cfg.models.push(model("relay-only", &[("edge-eu", None)]));
    let edge = TestEdge::start(cfg).await;
    let client = Http::default();
    let falls_back = mix("relayed", "relayed");
    let solo: Vec<Ask> = mix("relay-only", "relay only").into_iter().step_by(3).collect();
    let (first, second) = send_both(&client, &edge.url(), &falls_back, &solo).await;
    row.record_echoes(&falls_back, &first, Want::Answer);
    row.record_echoes(&solo, &second, Want::Error(502));
    let local = first.iter().filter(|w| w.target() == Some("oa2")).count();
    row.check(local == falls_back.len(), format!("{local} of {} answered by the local fallback", falls_back.len()));
    row
}

/// A tenant like acme, named `name`, with key `key`.
fn tenant_like_acme(cfg: &Config, name: &str, key: &str) -> TenantConfig {
    let mut tenant = cfg.tenants.iter().find(|t| t.name == "acme").expect("tenant acme").clone();
    tenant.name = name.into();
    tenant.keys = vec![hash_key(key)];
    tenant
}

/// Row 8: hostile plugins. Routers that spin past their deadline, grow past their memory cap, or
/// trap: the router has failed, so the static order serves. A filter that fails: fail closed.
async fn plugins_fail() -> Row {
    let mut row = Row::new(
        "plugin router spins / memory bomb / traps; filter fails",
        "4× per router tenant, 4× filtered tenant (whole+stream, openai+anthropic)",
        "routers: static order answers; filter: typed 503 filter_failed, nothing leaves",
    );
    let mocks = Mocks::start().await;
    let cache = TempDir::new("fault-plugins");
    let mut cfg = config(&mocks);
    cfg.plugin_runtime.cache_dir = cache.path().to_path_buf();
    let tenants = [
        ("acme", ACME_KEY, "spin", "fixture-spin"),
        ("globex", GLOBEX_KEY, "bomb", "fixture-memory-bomb"),
        ("initech", "sk-initech-test", "trap", "fixture-trap"),
    ];
    for (tenant, key, plugin, crate_name) in tenants {
        add_plugin(&mut cfg, plugin, PluginKind::Router, crate_name, json!({}));
        if cfg.tenants.iter().all(|t| t.name != tenant) {
            let t = tenant_like_acme(&cfg, tenant, key);
            cfg.tenants.push(t);
        }
        cfg.tenant_mut(tenant).router = Some(plugin.into());
    }
    cfg.plugins.get_mut("spin").expect("spin").deadline_ms = 50;
    // Its redactions end past the text: a broken contract, so the filter has failed.
    add_plugin(&mut cfg, "bad", PluginKind::Filter, "fixture-invalid-redaction", json!({}));
    let hooli = tenant_like_acme(&cfg, "hooli", "sk-hooli-test");
    cfg.tenants.push(hooli);
    let hooli = cfg.tenant_mut("hooli");
    hooli.router = None;
    hooli.filters = vec!["bad".into()];
    let edge = TestEdge::start(cfg).await;
    let client = Http::default();

    for (tenant, key, plugin, _) in tenants {
        let mut asks = mix("fallback", &format!("routed by {plugin}"));
        asks.iter_mut().for_each(|a| a.key = key);
        let wires = send_all(&client, &edge.url(), &asks).await;
        row.record_echoes(&asks, &wires, Want::Answer);
        let statically = wires.iter().filter(|w| w.target() == Some("oa")).count();
        row.check(statically == asks.len(), format!("{tenant}: {statically} of {} by the static order", asks.len()));
    }
    let mut filtered = mix("fallback", "filtered secret text");
    filtered.iter_mut().for_each(|a| a.key = "sk-hooli-test");
    let wires = send_all(&client, &edge.url(), &filtered).await;
    for (ask, wire) in filtered.iter().zip(&wires) {
        let outcome = judge_wire(wire, ask.api, |_| ask.echo());
        let outcome = match outcome {
            Outcome::TypedError { code, .. } if code != "filter_failed" && ask.api == Api::OpenAi => {
                Outcome::Wrong(format!("code {code}, not filter_failed"))
            }
            other => other,
        };
        row.record(ask.label(), Want::Error(503), wire, outcome);
    }
    let leaked = [&mocks.openai, &mocks.openai2, &mocks.anthropic]
        .iter()
        .flat_map(|m| m.received())
        .any(|r| r.body.to_string().contains("filtered secret"));
    row.check(!leaked, "the filtered tenant's text reached an upstream");
    let m = edge.metrics().await;
    for (plugin, outcome) in [("spin", "timeout"), ("bomb", "memory_limit"), ("trap", "trap")] {
        let labels = [format!("plugin=\"{plugin}\""), format!("outcome=\"{outcome}\"")];
        let n = metric_or_zero(&m, "meridian_plugin_calls_total", &[&labels[0], &labels[1]]);
        row.check(n > 0.0, format!("router {plugin} never failed by {outcome}"));
    }
    row
}

/// Row 9: the router is reloaded (order-keeping → cost router) while streams are under way.
async fn reload_under_streams() -> Row {
    let mut row = Row::new(
        "plugin reload under streaming load",
        "4× stream begun before the reload, 4× after it (openai+anthropic, whole+stream)",
        "every stream begun before completes (old router: oa); every request after uses the new router (oa2)",
    );
    let mocks = Mocks::start().await;
    let dir = TempDir::new("fault-reload");
    // Compile the new router into the plugin cache first (an edge that loads it, then stops), so
    // that the reload itself is quick and the streams below run across it.
    let mut warm = crate::reload::config(&mocks, &dir, 0);
    warm.plugins.get_mut("r").expect("router r").path = plugin_wasm("cost-router");
    drop(TestEdge::start(warm).await);
    let mut cfg = crate::reload::config(&mocks, &dir, 0);
    cfg.health.ejection_threshold = 1_000;
    let edge = TestEdge::start(cfg).await;
    let client = Http::default();

    let pieces: Vec<String> = (0..8).map(|i| format!("piece {i} ")).collect();
    let said = pieces.concat();
    let before: Vec<Ask> = mix("fallback", "before").into_iter().filter(|a| a.stream).cycle().take(4).collect();
    for _ in &before {
        mocks.openai.push(Behavior::Say { pieces: pieces.clone(), gap: Duration::from_millis(400) });
    }
    let streams = spawn_all(&client, &edge.url(), &before);
    let deadline = Instant::now() + Duration::from_secs(10);
    while mocks.openai.request_count() < before.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    row.check(mocks.openai.request_count() == before.len(), "the streams never all began");
    std::fs::copy(plugin_wasm("cost-router"), dir.path().join("router.wasm")).expect("the new router is copied");
    let reloaded = crate::reload::reload(&edge, Some(crate::reload::ADMIN_KEY)).await;
    row.check(reloaded.status == 200, format!("the reload failed: {}", reloaded.text()));
    let spanning = streams.iter().filter(|s| !s.is_finished()).count();
    row.notes.push(format!("{spanning} of {} streams still running when the reload returned", before.len()));
    let after = mix("fallback", "after");
    let after_wires = send_all(&client, &edge.url(), &after).await;
    let before_wires = join_all(streams).await;

    for (ask, wire) in before.iter().zip(&before_wires) {
        let mut outcome = judge_wire(wire, ask.api, |_| said.clone());
        if outcome == Outcome::Answered && wire.target() != Some("oa") {
            outcome = Outcome::Wrong(format!("begun before the reload, yet served by {:?}", wire.target()));
        }
        row.record(ask.label(), Want::Answer, wire, outcome);
    }
    for (ask, wire) in after.iter().zip(&after_wires) {
        let mut outcome = judge_wire(wire, ask.api, |_| ask.echo());
        if outcome == Outcome::Answered && wire.target() != Some("oa2") {
            outcome = Outcome::Wrong(format!("sent after the reload, yet served by {:?}", wire.target()));
        }
        row.record(ask.label(), Want::Answer, wire, outcome);
    }
    row
}

/// The config of the SIGTERM row's edge process.
fn process_config(mocks: &Mocks, dir: &TempDir, port: u16) -> String {
    format!(
        "[node]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_ms = 1500\n[log]\nlevel = \"warn\"\n\
         [ledger]\ndir = {ledger:?}\n{tenant}\n{targets}\n{gpt}\n{claude}",
        ledger = dir.path().join("ledger").display().to_string(),
        tenant = tenant_toml("acme", ACME_KEY),
        // Slow whole answers wait past the grace period for their upstream's first byte.
        targets = mocks.targets_toml().replace("first_byte_timeout_ms = 1000", "first_byte_timeout_ms = 10000"),
        gpt = model_toml("gpt-test", &[("oa", Some("gpt-4o-mini"))]),
        claude = model_toml("claude-test", &[("an", Some("claude-haiku-4-5"))]),
    )
}

/// Whether process `pid` has exited (gone, or a zombie waiting to be reaped).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_or(true, |stat| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
}

/// Row 10: SIGTERM to a `meridian edge` process with streams under way (short ones that end
/// within the grace period, long ones that do not, a whole answer waiting), then new requests.
async fn sigterm_under_load() -> Row {
    let mut row = Row::new(
        "SIGTERM to `meridian edge` under load (grace 1.5 s)",
        "2× short stream, 2× long stream, 2× whole (slow) in flight; 4× after the signal",
        "in flight: answered or typed error (event once streaming); after: answered, typed 503, or refused; exit 0",
    );
    let mocks = Mocks::start().await;
    let dir = TempDir::new("fault-sigterm");
    let mut edge = EdgeProcess::start(dir.path(), |port| process_config(&mocks, &dir, port)).await;
    let client = Http::default();
    let say = |n: usize, gap_ms: u64| Behavior::Say {
        pieces: (0..n).map(|i| format!("word{i} ")).collect(),
        gap: Duration::from_millis(gap_ms),
    };
    // (request, its upstream's behaviour)
    let in_flight: Vec<(Ask, Behavior)> = vec![
        (Ask::new(Api::OpenAi, "gpt-test", "short", true), say(4, 100)),
        (Ask::new(Api::Anthropic, "claude-test", "short", true), say(4, 100)),
        (Ask::new(Api::OpenAi, "gpt-test", "long", true), say(20, 250)),
        (Ask::new(Api::Anthropic, "claude-test", "long", true), say(20, 250)),
        (Ask::new(Api::OpenAi, "gpt-test", "slow whole", false), Behavior::Delay(Duration::from_secs(4))),
        (Ask::new(Api::Anthropic, "claude-test", "slow whole", false), Behavior::Delay(Duration::from_secs(4))),
    ];
    // One at a time, each once its upstream has it, so that each request pops its own behaviour.
    let mut tasks = Vec::new();
    for (ask, behavior) in &in_flight {
        let upstream = if ask.api == Api::OpenAi { &mocks.openai } else { &mocks.anthropic };
        let seen = upstream.request_count();
        upstream.push(behavior.clone());
        tasks.extend(spawn_all(&client, &edge.url, std::slice::from_ref(ask)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while upstream.request_count() == seen && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    edge.terminate();
    let after = mix("gpt-test", "after the signal");
    let after = after
        .into_iter()
        .map(|mut a| {
            if a.api == Api::Anthropic {
                a.model = "claude-test".into();
            }
            a
        })
        .collect::<Vec<_>>();
    let after_wires = send_all(&client, &edge.url, &after).await;
    let wires = join_all(tasks).await;
    for ((ask, behavior), wire) in in_flight.iter().zip(&wires) {
        let expected = match behavior {
            Behavior::Say { pieces, .. } => pieces.concat(),
            _ => ask.echo(),
        };
        row.record(ask.label(), Want::AnswerOrError, wire, judge_wire(wire, ask.api, |_| expected));
    }
    row.record_echoes(&after, &after_wires, Want::AnswerErrorOrRefused);

    let deadline = Instant::now() + Duration::from_secs(30);
    while !exited(edge.pid()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if exited(edge.pid()) {
        let status = edge.wait();
        row.check(status.success(), format!("the edge exited with {status}"));
    } else {
        row.check(false, "the edge was still running 30 s after SIGTERM");
    }
    row
}

/// Rows 11–16: an upstream that breaks a bound of its target (`bound` sets it on every target)
/// while it streams. The requests are streamed (these behaviours touch streams only): model
/// `fallback` (oa first) wants `with_fallback`; `gpt-test` (oa) and `claude-test` (an) `without`.
async fn stream_bound(
    fault: &str,
    behavior: Behavior,
    bound: impl Fn(&mut TargetConfig),
    with_fallback: Want,
    without: Want,
) -> Row {
    let mut row = Row::new(
        fault,
        "2× stream with a fallback, 2× without (openai+anthropic)",
        &format!("{}; without one, {}", want_text(with_fallback, true), want_text(without, false)),
    );
    let mocks = Mocks::start().await;
    let mut cfg = config(&mocks);
    cfg.targets.values_mut().for_each(&bound);
    let edge = TestEdge::start(cfg).await;
    let falls_back: Vec<Ask> = mix("fallback", "bounded").into_iter().filter(|a| a.stream).collect();
    let alone = vec![
        Ask::new(Api::OpenAi, "gpt-test", "bounded alone alpha beta gamma", true),
        Ask::new(Api::Anthropic, "claude-test", "bounded alone alpha beta gamma", true),
    ];
    for ask in falls_back.iter().chain(&alone) {
        let primary = if ask.model == "claude-test" { &mocks.anthropic } else { &mocks.openai };
        primary.push(behavior.clone());
    }
    let (first, second) = send_both(&Http::default(), &edge.url(), &falls_back, &alone).await;
    // An endless stream says its answer over and over: what went out must be that, and no more.
    let endless = matches!(behavior, Behavior::Endless { .. });
    let expected = |ask: &Ask| if endless { ask.echo().repeat(4096) } else { ask.echo() };
    for (asks, wires, want) in [(&falls_back, &first, with_fallback), (&alone, &second, without)] {
        for (ask, wire) in asks.iter().zip(wires) {
            row.record(ask.label(), want, wire, judge_wire(wire, ask.api, |_| expected(ask)));
        }
    }
    row
}

/// For the table: what a `want` of a row says, with or without a fallback.
fn want_text(want: Want, fallback: bool) -> String {
    match want {
        Want::Answer if fallback => "fallback answers".into(),
        Want::Answer => "answered".into(),
        Want::Error(status) => format!("typed {status}"),
        Want::ErrorEvent => "typed error event".into(),
        Want::AnswerOrError => "answered or typed error".into(),
        Want::AnswerErrorOrRefused => "answered, typed error or refused".into(),
    }
}

/// Row 17: a client that stops reading a long stream (its receive buffer full) while others are
/// served: the edge ends it after `client_write_timeout_ms` (it cannot be told: nothing it reads
/// arrives), records it as `client_closed`, closes its connection, and the tenant's place is free.
async fn slow_reader() -> Row {
    let mut row = Row::new(
        "client stops reading a long stream (client_write_timeout 300 ms)",
        "1× stream never read past its head; 4× others meanwhile (whole+stream, openai+anthropic)",
        "the stalled one is cut, recorded client_closed, its connection closed; the others answered",
    );
    let mocks = Mocks::start().await;
    let mut cfg = config(&mocks);
    cfg.node.client_write_timeout_ms = 300;
    // Only the client's write timeout may end the stalled stream.
    cfg.set_timeouts(30_000, 30_000);
    cfg.tenant_mut("globex").max_concurrent_requests = Some(1);
    let edge = TestEdge::start(cfg).await;

    // An answer far larger than the socket buffers between the edge and the client.
    let piece = "lorem ipsum dolor sit amet ".repeat(600);
    mocks.openai.push(Behavior::Say { pieces: vec![piece; 1_000], gap: Duration::ZERO });
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("a small receive buffer");
    let socket = socket.connect(edge.addr).await.expect("the edge accepts");
    let body = json!({"model": "gpt-test", "stream": true, "max_tokens": 100_000,
                      "messages": [{"role": "user", "content": "a long story"}]})
    .to_string();
    let mut stalled = RawConn::post_over(socket, "/v1/chat/completions", GLOBEX_KEY, &[], &body).await;
    // Wait until its upstream is streaming, so that the others below meet a stalled client.
    let deadline = Instant::now() + Duration::from_secs(10);
    while mocks.openai.request_count() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let others = mix("fallback", "meanwhile");
    let wires = send_all(&Http::default(), &edge.url(), &others).await;
    row.record_echoes(&others, &wires, Want::Answer);

    let closed = ["tenant=\"globex\"", "status=\"client_closed\""];
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut recorded = false;
    while !recorded && Instant::now() < deadline {
        recorded = metric_or_zero(&edge.metrics().await, "meridian_requests_total", &closed) == 1.0;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = edge.metrics().await;
    let series: Vec<&str> = m.lines().filter(|l| l.starts_with("meridian_requests_total{")).collect();
    row.check(recorded, format!("the stalled stream was not recorded as client_closed within 15 s: {series:?}"));
    // Its tenant's one place is free again.
    let mut next = Ask::new(Api::OpenAi, "gpt-test", "next please", true);
    next.key = GLOBEX_KEY;
    let wire = send(&Http::default(), &edge.url(), &next).await;
    let outcome = judge_wire(&wire, next.api, |_| next.echo());
    row.record(format!("{} (after the cut)", next.label()), Want::Answer, &wire, outcome);
    // The edge closed the connection: draining what is buffered ends, never waits for more.
    row.check(stalled.closed().await, "the stalled client's connection was still open 30 s after its cut");
    row
}

/// The judge itself, on replies written by hand: each way a reply can pass for what it is not.
#[test]
fn the_judge_tells_answers_typed_errors_and_false_successes_apart() {
    let reply = |status: u16, content_type: &str, body: &str| {
        let mut headers = hyper::HeaderMap::new();
        headers.insert("content-type", content_type.parse().expect("a header value"));
        Reply { status, headers, body: Bytes::from(body.to_string()) }
    };
    let sse = |body: &str| reply(200, "text/event-stream", body);
    let wrong = |o: Outcome| matches!(o, Outcome::Wrong(_));
    let chunk = |text: &str| format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n");
    let finish = "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
    let error = "data: {\"error\":{\"message\":\"m\",\"type\":\"upstream_error\",\"code\":\"upstream_error\"}}\n\n";

    // OpenAI streams.
    let whole_stream = format!("{}{}{finish}data: [DONE]\n\n", chunk("Echo: "), chunk("hi"));
    assert_eq!(judge(&sse(&whole_stream), Api::OpenAi, "Echo: hi"), Outcome::Answered);
    assert!(wrong(judge(&sse(&whole_stream), Api::OpenAi, "Echo: hi there")), "short");
    let no_finish = format!("{}data: [DONE]\n\n", chunk("Echo: hi"));
    assert!(wrong(judge(&sse(&no_finish), Api::OpenAi, "Echo: hi")), "[DONE] without a finish_reason");
    assert!(wrong(judge(&sse(&chunk("Echo: ")), Api::OpenAi, "Echo: hi")), "cut: neither [DONE] nor an error");
    let broken = format!("{}{error}", chunk("Echo: "));
    let typed = Outcome::TypedError { status: 200, code: "upstream_error".into() };
    assert_eq!(judge(&sse(&broken), Api::OpenAi, "Echo: hi"), typed);
    assert!(wrong(judge(&sse(&broken), Api::OpenAi, "Hello")), "wrong text before the error");
    assert!(wrong(judge(&sse(&format!("{broken}data: [DONE]\n\n")), Api::OpenAi, "Echo: hi")), "[DONE] after it");

    // Anthropic streams.
    let event = |name: &str, data: &str| format!("event: {name}\ndata: {data}\n\n");
    let delta = event("content_block_delta", "{\"delta\":{\"text\":\"Echo: hi\"}}");
    let stop = event("message_delta", "{\"delta\":{\"stop_reason\":\"end_turn\"}}");
    let end = event("message_stop", "{}");
    assert_eq!(judge(&sse(&format!("{delta}{stop}{end}")), Api::Anthropic, "Echo: hi"), Outcome::Answered);
    assert!(wrong(judge(&sse(&format!("{delta}{end}")), Api::Anthropic, "Echo: hi")), "no stop_reason");
    assert!(wrong(judge(&sse(&delta), Api::Anthropic, "Echo: hi")), "cut");
    let failed = event("error", "{\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"m\"}}");
    let typed = Outcome::TypedError { status: 200, code: "api_error".into() };
    assert_eq!(judge(&sse(&format!("{delta}{failed}")), Api::Anthropic, "Echo: hi there"), typed);

    // Whole replies and error statuses, in each shape.
    let json = |status, body: &str| reply(status, "application/json", body);
    let openai = "{\"object\":\"chat.completion\",\"choices\":[{\"message\":{\"content\":\"Echo: hi\"},\"finish_reason\":\"stop\"}]}";
    assert_eq!(judge(&json(200, openai), Api::OpenAi, "Echo: hi"), Outcome::Answered);
    assert!(wrong(judge(&json(200, openai), Api::OpenAi, "Echo: hello")));
    let anthropic =
        "{\"type\":\"message\",\"content\":[{\"type\":\"text\",\"text\":\"Echo: hi\"}],\"stop_reason\":\"end_turn\"}";
    assert_eq!(judge(&json(200, anthropic), Api::Anthropic, "Echo: hi"), Outcome::Answered);
    assert!(wrong(judge(&json(200, anthropic), Api::OpenAi, "Echo: hi")), "the other API's shape");
    let refused = "{\"error\":{\"message\":\"m\",\"type\":\"rate_limit_error\",\"code\":\"rate_limited\"}}";
    let typed = Outcome::TypedError { status: 429, code: "rate_limited".into() };
    assert_eq!(judge(&json(429, refused), Api::OpenAi, "Echo: hi"), typed);
    assert!(wrong(judge(&json(429, refused), Api::Anthropic, "Echo: hi")), "the other API's shape");
    assert!(wrong(judge(&reply(502, "text/html", "<h1>Bad Gateway</h1>"), Api::OpenAi, "Echo: hi")), "untyped");
}
