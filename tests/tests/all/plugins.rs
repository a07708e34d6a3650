//! Plugins on the request path, end to end over loopback with the real components (build them
//! first with `scripts/build-plugins`): the pii-redactor filter measured on its labelled corpus
//! from what reaches the upstream, secrets blocked before anything leaves, placeholders restored
//! whole, streamed and from the cache; a failing filter failing closed; the residency and cost
//! routers choosing targets, and a failing router replaced by the static order; plugin errors at
//! start; plugins in `/readyz`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meridian::config::{AnswerBatchConfig, Config, PluginKind};
use meridian_e2e::{
    add_plugin, metric, metric_or_zero, token_price, Behavior, ConfigExt, Mocks, TempDir, TestEdge, ACME_KEY,
    GLOBEX_KEY,
};
use serde::Deserialize;
use serde_json::{json, Value};

/// Every entity redacted, except secrets, which block.
fn redact_all() -> Value {
    json!({"actions": {"card": "redact", "email": "redact", "iban": "redact", "ipv4": "redact",
        "ipv6": "redact", "phone": "redact", "secret": "block", "ssn": "redact"}})
}

/// The standard config with its plugin cache in `cache`.
fn config_in(mocks: &Mocks, cache: &TempDir) -> Config {
    let mut cfg = mocks.config();
    cfg.plugin_runtime.cache_dir = cache.path().to_path_buf();
    cfg
}

/// The standard config with pii-redactor (`settings`) as tenant acme's filter; globex has none.
fn pii_config(mocks: &Mocks, cache: &TempDir, settings: Value) -> Config {
    let mut cfg = config_in(mocks, cache);
    add_plugin(&mut cfg, "pii", PluginKind::Filter, "pii-redactor", settings);
    cfg.tenant_mut("acme").filters = vec!["pii".into()];
    cfg
}

fn chat(model: &str, text: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]})
}

/// The plugin names in a `/readyz` list, whose entries are `name` or `name@version`.
fn plugin_names(list: &Value) -> Vec<&str> {
    let list = list.as_array().unwrap_or_else(|| panic!("a list of plugins: {list}"));
    list.iter().map(|p| p.as_str().unwrap().split('@').next().unwrap()).collect()
}

/// Every string in a JSON value (keys too), one a line: what an upstream could read, unescaped.
fn strings(v: &Value) -> String {
    fn walk(v: &Value, out: &mut String) {
        match v {
            Value::String(s) => {
                out.push_str(s);
                out.push('\n');
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            Value::Object(o) => o.iter().for_each(|(k, v)| {
                out.push_str(k);
                out.push('\n');
                walk(v, out);
            }),
            _ => {}
        }
    }
    let mut out = String::new();
    walk(v, &mut out);
    out
}

/// The placeholders in `text` (`[EMAIL_1]`…) as (start, end, lower-case entity), in order.
fn placeholders(text: &str) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(open) = text[from..].find('[').map(|i| from + i) {
        let Some(close) = text[open..].find(']').map(|i| open + i) else { break };
        let inner = &text[open + 1..close];
        let parsed = inner.rsplit_once('_').filter(|(entity, n)| {
            !entity.is_empty()
                && entity.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                && !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
        });
        match parsed {
            Some((entity, _)) => {
                out.push((open, close + 1, entity.to_ascii_lowercase()));
                from = close + 1;
            }
            None => from = open + 1,
        }
    }
    out
}

/// What each placeholder of `redacted` stands for in `original`, by lining up the text between
/// placeholders (which redaction leaves as it was): (entity, original value) per placeholder.
pub(crate) fn redacted_spans(original: &str, redacted: &str) -> Vec<(String, String)> {
    let found = placeholders(redacted);
    let mut literals = Vec::with_capacity(found.len() + 1);
    let mut at = 0;
    for (start, end, _) in &found {
        literals.push(&redacted[at..*start]);
        at = *end;
    }
    literals.push(&redacted[at..]);
    assert!(original.starts_with(literals[0]), "redaction changed the text before it: {redacted:?} from {original:?}");
    let mut pos = literals[0].len();
    let mut spans = Vec::with_capacity(found.len());
    for (k, (_, _, entity)) in found.iter().enumerate() {
        let next = literals[k + 1];
        let end = if k + 1 == found.len() {
            assert!(original.ends_with(next), "redaction changed the text after it: {redacted:?} from {original:?}");
            original.len() - next.len()
        } else if next.is_empty() {
            pos // Two placeholders side by side: cannot be told apart; counted as not matching.
        } else {
            original[pos..].find(next).map(|i| pos + i).unwrap_or_else(|| panic!("{redacted:?} from {original:?}"))
        };
        spans.push((entity.clone(), original[pos..end].to_string()));
        pos = end + next.len();
    }
    spans
}

#[derive(Deserialize)]
struct Sample {
    text: String,
    entities: Vec<Expected>,
}

#[derive(Deserialize)]
struct Expected {
    entity: String,
    value: String,
}

/// Per entity: expected values, those that reached the upstream, redacted spans, and those of
/// them that were an expected value of that entity.
#[derive(Default)]
struct Tally {
    expected: usize,
    leaked: usize,
    redacted: usize,
    matched: usize,
}

fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        1.0
    } else {
        num as f64 / den as f64
    }
}

#[tokio::test]
async fn corpus_pii_never_reaches_the_upstream_and_every_answer_gets_it_back() {
    let corpus: Vec<Sample> = serde_json::from_str(include_str!("../../../plugins/pii-redactor/corpus.json"))
        .expect("corpus.json is a list of samples");
    let mocks = Mocks::start().await;
    let cache = TempDir::new("corpus");
    let edge = TestEdge::start(pii_config(&mocks, &cache, redact_all())).await;

    let mut tally: BTreeMap<String, Tally> = BTreeMap::new();
    let mut leaks = Vec::new();
    let mut false_positives = Vec::new();
    let mut sent = 0;
    for sample in &corpus {
        let expected: Vec<(String, String)> =
            sample.entities.iter().map(|e| (e.entity.clone(), e.value.clone())).collect();
        if expected.iter().any(|(entity, _)| entity == "secret") {
            // A secret blocks the whole request before anything leaves the node.
            let before = mocks.openai.request_count();
            let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", &sample.text, false)).await;
            assert_eq!((r.status, r.error_code()), (400, "content_blocked".into()), "{:?}: {}", sample.text, r.text());
            assert_eq!(mocks.openai.request_count(), before, "nothing of {:?} was sent", sample.text);
            continue;
        }
        // Each snippet both ways: whole, then streamed (no temperature: never from the cache).
        for stream in [false, true] {
            let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", &sample.text, stream)).await;
            assert_eq!(
                r.answer_text(),
                format!("Echo: {}", sample.text),
                "the client gets its own text back (stream: {stream})"
            );
            let received = mocks.openai.received();
            assert_eq!(received.len(), sent + 1, "one upstream request per client request");
            sent += 1;
            let upstream = received.last().expect("a request reached the upstream");
            let seen = strings(&upstream.body);
            let content = upstream.body["messages"][0]["content"].as_str().expect("the user's text, as text");

            let mut unmatched = expected.clone();
            for (entity, value) in &expected {
                let t = tally.entry(entity.clone()).or_default();
                t.expected += 1;
                if seen.contains(value.as_str()) {
                    t.leaked += 1;
                    let how = if stream { "streamed" } else { "whole" };
                    leaks.push(format!("{entity} {value:?} reached the upstream ({how}) in {content:?}"));
                }
            }
            for (entity, value) in redacted_spans(&sample.text, content) {
                let t = tally.entry(entity.clone()).or_default();
                t.redacted += 1;
                match unmatched.iter().position(|e| e.0 == entity && e.1 == value) {
                    Some(k) => {
                        unmatched.swap_remove(k);
                        t.matched += 1;
                    }
                    None => false_positives.push(format!("{entity} {value:?} redacted in {:?}", sample.text)),
                }
            }
        }
    }
    assert!(sent >= 2 * 50, "the corpus was sent ({sent} requests)");

    println!("end to end, from what reached the upstream ({sent} requests):");
    println!(
        "{:<8} {:>8} {:>6} {:>7} {:>8} {:>7} {:>9}",
        "entity", "expected", "leaked", "recall", "redacted", "matched", "precision"
    );
    let mut all = Tally::default();
    for (entity, t) in &tally {
        println!(
            "{entity:<8} {:>8} {:>6} {:>7.3} {:>8} {:>7} {:>9.3}",
            t.expected,
            t.leaked,
            ratio(t.expected - t.leaked, t.expected),
            t.redacted,
            t.matched,
            ratio(t.matched, t.redacted)
        );
        all.expected += t.expected;
        all.leaked += t.leaked;
        all.redacted += t.redacted;
        all.matched += t.matched;
    }
    let recall = ratio(all.expected - all.leaked, all.expected);
    let precision = ratio(all.matched, all.redacted);
    println!(
        "{:<8} {:>8} {:>6} {recall:>7.3} {:>8} {:>7} {precision:>9.3}",
        "all", all.expected, all.leaked, all.redacted, all.matched
    );
    leaks.iter().chain(&false_positives).for_each(|m| println!("  {m}"));
    // The acceptance bar: no labelled value of the corpus reaches the upstream, not one.
    assert!(leaks.is_empty(), "{} corpus values reached the upstream (recall {recall:.3})", leaks.len());
    assert!(precision >= 0.95, "end-to-end precision {precision:.3} < 0.95");
}

#[tokio::test]
async fn a_secret_is_refused_in_both_api_shapes_before_anything_leaves() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("secret");
    let edge = TestEdge::start(pii_config(&mocks, &cache, redact_all())).await;
    let secret = "sk-proj-4fQ9xT2mLk8RzW1vN7bY3cHd6JpE0sAuGiKo";
    let text = format!("my key is {secret}, and my email is ann.lee@example.com");

    for stream in [false, true] {
        let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", &text, stream)).await;
        assert_eq!(r.status, 400, "{}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["code"], "content_blocked");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("secret") && !message.contains(secret), "names the entity, not the value: {message}");
    }
    let body = json!({"model": "claude-test", "max_tokens": 50, "messages": [{"role": "user", "content": text}]});
    for stream in [false, true] {
        let mut body = body.clone();
        body["stream"] = json!(stream);
        let r = edge.send("POST", "/v1/messages", None, &[("x-api-key", ACME_KEY)], body.to_string().into()).await;
        assert_eq!(r.status, 400, "{}", r.text());
        let v = r.json();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("blocked by a privacy filter"), "{v}");
    }
    let counts = [&mocks.openai, &mocks.openai2, &mocks.anthropic].map(|m| m.request_count());
    assert_eq!(counts, [0, 0, 0], "nothing reached any upstream");

    // Tenants without the filter are not filtered.
    let r = edge.post("/v1/chat/completions", GLOBEX_KEY, &chat("gpt-test", &text, false)).await;
    assert_eq!(r.answer_text(), format!("Echo: {text}"));
}

#[tokio::test]
async fn equal_values_share_a_placeholder_and_tool_call_arguments_are_redacted_too() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("placeholders");
    let edge = TestEdge::start(pii_config(&mocks, &cache, redact_all())).await;

    let text = "Mail ann.lee@example.com, cc bob@example.org, and ann.lee@example.com again";
    let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", text, false)).await;
    assert_eq!(r.answer_text(), format!("Echo: {text}"));
    let sent = &mocks.openai.received()[0];
    assert_eq!(sent.body["messages"][0]["content"], "Mail [EMAIL_1], cc [EMAIL_2], and [EMAIL_1] again");

    // The e-mail in the tool call's arguments and in the tool's result gets the user's placeholder.
    let arguments = json!({"to": "ann.lee@example.com", "subject": "invoice"}).to_string();
    let body = json!({"model": "gpt-test", "messages": [
        {"role": "user", "content": "send the invoice to ann.lee@example.com"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "send_mail", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sent to ann.lee@example.com"}
    ]});
    for stream in [false, true] {
        let mut body = body.clone();
        body["stream"] = json!(stream);
        let r = edge.post("/v1/chat/completions", ACME_KEY, &body).await;
        assert_eq!(r.answer_text(), "Tool said: sent to ann.lee@example.com", "stream: {stream}");
        let sent = mocks.openai.received().pop().unwrap();
        assert!(!sent.body.to_string().contains("ann.lee"), "no e-mail upstream: {}", sent.body);
        let messages = &sent.body["messages"];
        assert_eq!(messages[0]["content"], "send the invoice to [EMAIL_1]");
        let args: Value = serde_json::from_str(messages[1]["tool_calls"][0]["function"]["arguments"].as_str().unwrap())
            .expect("redacted arguments are still JSON");
        assert_eq!(args, json!({"to": "[EMAIL_1]", "subject": "invoice"}));
        assert_eq!(messages[2]["content"], "sent to [EMAIL_1]");
    }

    // Text parts, and the Anthropic shape's system prompt and blocks, are redacted as well.
    let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "from ann.lee@example.com"}, {"type": "text", "text": "to bob@example.org"}]}]});
    let r = edge.post("/v1/chat/completions", ACME_KEY, &body).await;
    assert_eq!(r.answer_text(), "Echo: from ann.lee@example.comto bob@example.org");
    let sent = mocks.openai.received().pop().unwrap();
    assert_eq!(sent.body["messages"][0]["content"][0]["text"], "from [EMAIL_1]");
    assert_eq!(sent.body["messages"][0]["content"][1]["text"], "to [EMAIL_2]");
    let body = json!({"model": "claude-test", "max_tokens": 100, "system": "the user is ann.lee@example.com",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "greet ann.lee@example.com"}]}]});
    for stream in [false, true] {
        let mut body = body.clone();
        body["stream"] = json!(stream);
        let r = edge.send("POST", "/v1/messages", None, &[("x-api-key", ACME_KEY)], body.to_string().into()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let text: String = if stream {
            r.event_json().iter().filter_map(|e| e["delta"]["text"].as_str()).collect()
        } else {
            r.json()["content"][0]["text"].as_str().unwrap().to_string()
        };
        assert_eq!(text, "Echo: greet ann.lee@example.com", "stream: {stream}");
        let sent = mocks.anthropic.received().pop().unwrap();
        assert!(!sent.body.to_string().contains("ann.lee"), "no e-mail upstream: {}", sent.body);
        assert_eq!(strings(&sent.body["system"]).trim(), "the user is [EMAIL_1]");
    }

    // An answer's tool call gets the originals back in its arguments, whole and streamed.
    let body = json!({"model": "gpt-test", "tools": [{"type": "function", "function": {"name": "send_mail",
        "parameters": {"type": "object"}}}], "messages": [{"role": "user", "content": "write to ann.lee@example.com"}]});
    for stream in [false, true] {
        let mut body = body.clone();
        body["stream"] = json!(stream);
        let r = edge.post("/v1/chat/completions", ACME_KEY, &body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let arguments: String = if stream {
            r.event_json()
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
                .collect()
        } else {
            r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"].as_str().unwrap().to_string()
        };
        let arguments: Value = serde_json::from_str(&arguments).expect("restored arguments are JSON");
        assert_eq!(arguments, json!({"echo": "write to ann.lee@example.com"}), "stream: {stream}");
    }
}

#[tokio::test]
async fn redacted_requests_share_a_cache_entry_and_each_client_gets_its_own_data_back() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("cache");
    let edge = TestEdge::start(pii_config(&mocks, &cache, redact_all())).await;
    let ask = |email: &str, stream: bool| {
        json!({"model": "gpt-test", "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": format!("Draft a reply to {email} about the refund")}]})
    };

    let r = edge.post("/v1/chat/completions", ACME_KEY, &ask("ann.lee@example.com", false)).await;
    assert_eq!(r.header("x-meridian-cache"), Some("miss"));
    assert_eq!(r.answer_text(), "Echo: Draft a reply to ann.lee@example.com about the refund");

    let r = edge.post("/v1/chat/completions", ACME_KEY, &ask("bob@example.org", false)).await;
    assert_eq!(r.header("x-meridian-cache"), Some("hit"), "the same redacted request");
    assert_eq!(r.answer_text(), "Echo: Draft a reply to bob@example.org about the refund");

    let r = edge.post("/v1/chat/completions", ACME_KEY, &ask("carol@example.net", true)).await;
    assert_eq!(r.header("x-meridian-cache"), Some("hit"), "streamed from the same entry");
    assert_eq!(r.answer_text(), "Echo: Draft a reply to carol@example.net about the refund");

    let received = mocks.openai.received();
    assert_eq!(received.len(), 1, "one upstream request for all three");
    assert_eq!(received[0].body["messages"][0]["content"], "Draft a reply to [EMAIL_1] about the refund");
}

#[tokio::test]
async fn a_failing_filter_fails_closed_while_other_tenants_are_served() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("failing-filter");
    let mut cfg = config_in(&mocks, &cache);
    // Its redactions end past the text: a contract violation, so the filter has failed.
    add_plugin(&mut cfg, "bad", PluginKind::Filter, "fixture-invalid-redaction", json!({}));
    cfg.tenant_mut("acme").filters = vec!["bad".into()];
    let edge = TestEdge::start(cfg).await;

    let ready = edge.send("GET", "/readyz", None, &[], Default::default()).await.json();
    assert_eq!(plugin_names(&ready["plugins"]), ["bad"]);
    assert_eq!(ready["quarantined_plugins"], json!([]));

    for i in 0..6 {
        let stream = i % 2 == 1;
        let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", "mail ann@example.com", stream)).await;
        assert_eq!((r.status, r.error_code()), (503, "filter_failed".into()), "{}", r.text());
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("`bad@"), "names the filter: {message}");
        assert!(!message.contains("ann@example.com"), "{message}");
        // Meanwhile, a tenant without filters is served as usual.
        let r = edge.post("/v1/chat/completions", GLOBEX_KEY, &chat("gpt-test", &format!("hello {i}"), stream)).await;
        assert_eq!(r.answer_text(), format!("Echo: hello {i}"));
    }
    let received = mocks.openai.received();
    assert_eq!(received.len(), 6, "only globex's requests went upstream");
    assert!(received.iter().all(|s| !s.body.to_string().contains("ann@")));

    // Repeated failures quarantine the filter; /readyz says so, and acme stays refused.
    let ready = edge.send("GET", "/readyz", None, &[], Default::default()).await.json();
    let quarantined = ready["quarantined_plugins"].as_array().unwrap();
    assert!(quarantined.len() == 1 && quarantined[0].as_str().unwrap().starts_with("bad@"), "{ready}");
    let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", "no pii at all", false)).await;
    assert_eq!((r.status, r.error_code()), (503, "filter_failed".into()));
    assert_eq!(mocks.openai.request_count(), 6);
}

/// Targets oa in us-east, oa2 in eu-west (an: unknown); pii-redactor labelling e-mails (other
/// entities redacted) and the residency router for both tenants: acme may use eu-west, globex
/// only ap-south.
fn residency_config(mocks: &Mocks, cache: &TempDir) -> Config {
    let mut cfg = config_in(mocks, cache);
    cfg.target_mut("oa").region = Some("us-east".into());
    cfg.target_mut("oa2").region = Some("eu-west".into());
    // Label only: the data stays in the request, so where it goes matters.
    add_plugin(&mut cfg, "pii", PluginKind::Filter, "pii-redactor", json!({"actions": {"email": "label"}}));
    add_plugin(&mut cfg, "residency", PluginKind::Router, "residency", json!({}));
    for (name, region) in [("acme", "eu-west"), ("globex", "ap-south")] {
        let tenant = cfg.tenant_mut(name);
        tenant.filters = vec!["pii".into()];
        tenant.router = Some("residency".into());
        tenant.allowed_regions = vec![region.into()];
    }
    cfg
}

#[tokio::test]
async fn residency_router_keeps_unredacted_personal_data_in_allowed_regions() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("residency");
    let edge = TestEdge::start(residency_config(&mocks, &cache)).await;
    let ready = edge.send("GET", "/readyz", None, &[], Default::default()).await.json();
    assert_eq!(plugin_names(&ready["plugins"]), ["pii", "residency"]);

    let personal = "forward this to ann.lee@example.com please";
    for stream in [false, true] {
        let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("fallback", personal, stream)).await;
        assert_eq!(r.header("x-meridian-target"), Some("oa2"), "the eu-west target, though oa is first");
        assert_eq!(r.answer_text(), format!("Echo: {personal}"));
    }
    let sent = mocks.openai2.received();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].body["messages"][0]["content"], personal, "labelled, not redacted");
    assert_eq!(mocks.openai.request_count(), 0, "nothing went to us-east");

    let r =
        edge.post("/v1/chat/completions", ACME_KEY, &chat("fallback", "what is a good name for a cat", false)).await;
    assert_eq!(r.header("x-meridian-target"), Some("oa"), "no personal data: the static order");
    assert_eq!(r.answer_text(), "Echo: what is a good name for a cat");

    // No target of globex's only region: refused, and nothing leaves.
    let before = [&mocks.openai, &mocks.openai2, &mocks.anthropic].map(|m| m.request_count());
    let r = edge.post("/v1/chat/completions", GLOBEX_KEY, &chat("fallback", personal, false)).await;
    assert_eq!((r.status, r.error_code()), (451, "rejected_by_router".into()), "{}", r.text());
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.starts_with("unavailable for legal reasons") && !message.contains("ann.lee"), "{message}");
    assert_eq!([&mocks.openai, &mocks.openai2, &mocks.anthropic].map(|m| m.request_count()), before);
    let r = edge.post("/v1/chat/completions", GLOBEX_KEY, &chat("fallback", "nothing personal", false)).await;
    assert_eq!(r.header("x-meridian-target"), Some("oa"));
}

/// Regression test for a residency bypass: `redacted` in the request summary means "something was
/// redacted", and the SDK's residency rule once read it as "no personal data is left", so an
/// e-mail that was only labelled travelled to any region as soon as a phone number next to it was
/// redacted. Labels now say what stays in the text (`pii.email` vs `pii.phone.redacted`).
#[tokio::test]
async fn a_labelled_value_stays_in_allowed_regions_when_another_one_is_redacted() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("residency-mixed");
    let edge = TestEdge::start(residency_config(&mocks, &cache)).await;
    let mixed = "forward this to ann.lee@example.com or call +1 (646) 555-0187";
    let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("fallback", mixed, false)).await;
    assert_eq!(r.answer_text(), format!("Echo: {mixed}"));
    assert_eq!(r.header("x-meridian-target"), Some("oa2"), "the e-mail is still in the text");
    assert_eq!(mocks.openai.request_count(), 0, "nothing went to us-east");
}

#[tokio::test]
async fn cost_router_tries_the_cheapest_target_first_and_holds_the_price_cap() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("cost");
    let mut cfg = config_in(&mocks, &cache);
    // `fallback` lists oa, oa2, an: the cheapest (oa2) is not first, the dearest (oa) is.
    cfg.target_mut("oa").price = token_price(5.0, 20.0);
    cfg.target_mut("oa2").price = token_price(0.1, 0.4);
    cfg.target_mut("an").price = token_price(3.0, 15.0);
    add_plugin(&mut cfg, "cost", PluginKind::Router, "cost-router", json!({}));
    cfg.tenant_mut("acme").router = Some("cost".into());
    let globex = cfg.tenant_mut("globex");
    globex.router = Some("cost".into());
    globex.price_cap_usd = Some(1e-7);
    let edge = TestEdge::start(cfg).await;

    let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("fallback", "cheap please", false)).await;
    assert_eq!(r.header("x-meridian-target"), Some("oa2"));
    assert_eq!(r.answer_text(), "Echo: cheap please");
    // The router's order is also the fallback order: oa2, then an, then oa.
    mocks.openai2.push(Behavior::Status(503));
    let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("fallback", "next cheapest", true)).await;
    assert_eq!(r.header("x-meridian-target"), Some("an"));
    assert_eq!(r.answer_text(), "Echo: next cheapest");
    assert_eq!(mocks.openai.request_count(), 0, "the dearest target was never needed");

    let r = edge.post("/v1/chat/completions", GLOBEX_KEY, &chat("fallback", "too dear", false)).await;
    assert_eq!((r.status, r.error_code()), (402, "rejected_by_router".into()), "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("price cap"), "{}", r.text());
    assert_eq!(mocks.openai2.request_count(), 2, "refused before any upstream");
}

#[tokio::test]
async fn a_router_that_times_out_is_replaced_by_the_static_order() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("spin");
    let mut cfg = config_in(&mocks, &cache);
    add_plugin(&mut cfg, "spin", PluginKind::Router, "fixture-spin", json!({}));
    cfg.plugins.get_mut("spin").unwrap().deadline_ms = 20;
    cfg.tenant_mut("acme").router = Some("spin".into());
    let edge = TestEdge::start(cfg).await;

    let started = Instant::now();
    for stream in [false, true] {
        let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("fallback", "route me", stream)).await;
        assert_eq!(r.header("x-meridian-target"), Some("oa"), "the first target of the static order");
        assert_eq!(r.answer_text(), "Echo: route me");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "the deadline bounds the router: {:?}", started.elapsed());
    let m = edge.metrics().await;
    let timeouts = metric(&m, "meridian_plugin_calls_total", &["plugin=\"spin\"", "outcome=\"timeout\""]);
    assert_eq!(timeouts, 2.0, "{m}");
    assert_eq!(metric_or_zero(&m, "meridian_plugin_calls_total", &["plugin=\"spin\"", "outcome=\"ok\""]), 0.0);
}

#[tokio::test]
async fn plugins_that_cannot_load_stop_the_node_from_starting() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("bad-config");

    let cfg = pii_config(&mocks, &cache, json!({"actions": {"email": "shred"}}));
    let err = TestEdge::try_start(cfg).await.err().expect("a configure that rejects stops the start").to_string();
    assert!(err.starts_with("plugins.pii: "), "{err}");
    assert!(err.contains(r#"unknown action "shred" for "email""#), "the plugin's own message: {err}");

    let mut cfg = pii_config(&mocks, &cache, redact_all());
    let missing = cache.path().join("no-such-plugin.wasm");
    cfg.plugins.get_mut("pii").unwrap().path = missing.clone();
    let err = TestEdge::try_start(cfg).await.err().expect("a missing component stops the start").to_string();
    assert!(err.starts_with("plugins.pii: "), "{err}");
    assert!(err.contains(&missing.display().to_string()), "names the file: {err}");
}

/// `[tenants.answer_batch]`: a stream whose pieces trickle in (a model's tokens) reaches the
/// filter in a few batches rather than a call per piece, the client gets every piece in order,
/// and a secret split across pieces is still found.
#[tokio::test]
async fn a_tenants_answer_batch_gathers_a_streams_pieces_for_its_filters() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("answer-batch");
    let mut cfg = pii_config(&mocks, &cache, json!({"block_secrets_in_response": true}));
    cfg.tenant_mut("acme").answer_batch = AnswerBatchConfig { max_wait_ms: 1000, max_bytes: 1 << 20 };
    let edge = TestEdge::start(cfg).await;
    let ok_calls = |m: &str| metric_or_zero(m, "meridian_plugin_calls_total", &["plugin=\"pii\"", "outcome=\"ok\""]);

    // The answer names a key prefix first, so the filter reads all of it; twelve pieces 5 ms
    // apart arrive well within one batch's wait.
    let mut pieces = vec!["Keys start with sk- and then ".to_string()];
    pieces.extend((0..11).map(|i| format!("word{i} ")));
    let before = ok_calls(&edge.metrics().await);
    mocks.openai.push(Behavior::Say { pieces: pieces.clone(), gap: Duration::from_millis(5) });
    let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", "tell me a story", true)).await;
    assert_eq!(r.answer_text(), pieces.concat(), "every piece, in order: {}", r.text());
    let calls = ok_calls(&edge.metrics().await) - before;
    assert!((1.0..=3.0).contains(&calls), "12 pieces in {calls} filter calls");

    // A secret split across pieces is found in the batch that joins them.
    let split = ["my key is sk-proj-abc", "def1234567890ghijklmnop", " and that is all"];
    mocks.openai.push(Behavior::Say { pieces: split.map(String::from).to_vec(), gap: Duration::from_millis(5) });
    let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", "tell me a story", true)).await;
    let events = r.event_json();
    assert_eq!(events.last().expect("events")["error"]["code"], "content_blocked", "{}", r.text());
    let text: String = events.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(!text.contains("def1234567890"), "nothing of the secret went out: {}", r.text());
}

/// A secret split across stream events: every chunk of one answer goes to the same filter
/// instance, which keeps the answer's recent text, so the second half completes the secret and
/// the stream is cut off there with a typed error event.
#[tokio::test]
async fn a_secret_split_across_stream_events_cuts_the_answer_off() {
    let mocks = Mocks::start().await;
    let cache = TempDir::new("split-secret");
    let cfg = pii_config(&mocks, &cache, json!({"block_secrets_in_response": true}));
    let edge = TestEdge::start(cfg).await;
    // Neither piece is a secret on its own; the gap makes each its own chunk at the edge.
    let pieces = ["my key is sk-proj-abc", "def1234567890ghijklmnop", " and that is all"];
    let say = || Behavior::Say { pieces: pieces.map(String::from).to_vec(), gap: Duration::from_millis(100) };

    // Without a filter the answer arrives whole: the mock said what it was told to.
    mocks.openai.push(say());
    let r = edge.post("/v1/chat/completions", GLOBEX_KEY, &chat("gpt-test", "tell me a story", true)).await;
    assert_eq!(r.answer_text(), pieces.concat());

    mocks.openai.push(say());
    let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", "tell me a story", true)).await;
    assert_eq!(r.status, 200, "the stream had begun: {}", r.text());
    let events = r.event_json();
    let text: String = events.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, pieces[0], "the first chunk went out before the secret was complete: {}", r.text());
    let error = events.last().expect("events");
    assert_eq!(error["error"]["code"], "content_blocked", "a typed error event ends it: {}", r.text());
    assert!(error["error"]["message"].as_str().unwrap().contains("secret"), "{error}");
    assert!(r.events().iter().all(|e| e.data != "[DONE]"), "no clean end: {}", r.text());

    // A whole answer is one call; a later streamed answer starts clean on a new instance.
    mocks.openai.push(say());
    let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", "tell me a story", false)).await;
    assert_eq!((r.status, r.error_code()), (400, "content_blocked".into()), "{}", r.text());
    mocks.openai.push(Behavior::Say { pieces: vec![pieces[1].into(), pieces[2].into()], gap: Duration::ZERO });
    let r = edge.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", "tell me a story", true)).await;
    assert_eq!(r.answer_text(), pieces[1..].concat(), "the earlier answer's half-secret is not remembered");
}
