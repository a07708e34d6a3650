//! The shipped pii-redactor measured on data it was not written against: `scripts/pii-corpus.py`
//! generates, with Faker and the seed and sizes it keeps, texts in nine locales that each hold
//! one value from Faker's own providers (phone numbers, every card type, IBANs, e-mail
//! addresses, US social security numbers, IPv4 and IPv6 addresses), and clean texts whose numbers
//! are not personal data (order ids, dates, prices, versions, timestamps, coordinates, counts,
//! barcodes). Every text goes through an edge with the filter in front of the mock upstreams, in
//! both API shapes, whole and streamed, many texts to a request, one a line; each is judged on
//! its own line of what the upstream received.
//!
//! A value leaks whole when the upstream's line holds it as written, and in part when it holds
//! any [`PART`] consecutive letters or digits of the value (its separators left out: `+49(0)1489
//! 364390` as `4901489364390`) that the rest of the text does not also hold: enough to dial or
//! charge nothing, as card receipts print the last four digits. Needs Python with Faker
//! (`MERIDIAN_PYTHON`, as `scripts/test` sets it) and the plugins built (`scripts/build-plugins`);
//! `-- --nocapture` prints recall and precision per entity.

use std::collections::BTreeMap;
use std::process::Command;

use meridian::config::PluginKind;
use meridian_e2e::{add_plugin, ConfigExt, Mocks, Reply, TempDir, TestEdge, ACME_KEY};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::plugins::redacted_spans;

/// How many consecutive letters or digits of a value reaching the upstream count as a leak in
/// part.
const PART: usize = 6;

/// Most bytes of text in one request: far under the edge's 64 KiB body limit in the test config.
const BATCH_BYTES: usize = 24 * 1024;

/// The generated corpus (`scripts/pii-corpus.py`).
#[derive(Deserialize)]
struct Corpus {
    /// Texts that hold one personal value each.
    pii: Vec<PiiText>,
    /// Texts that hold none.
    clean: Vec<CleanText>,
}

/// A text with one personal value.
#[derive(Deserialize)]
struct PiiText {
    /// The entity the filter should find (`phone`, `card`…).
    entity: String,
    /// The value as Faker wrote it.
    value: String,
    /// The text that holds it.
    text: String,
}

/// A text without personal data.
#[derive(Deserialize)]
struct CleanText {
    /// What its number is (`order`, `date`…).
    kind: String,
    /// The text.
    text: String,
}

/// One line sent: a text and, for a personal one, its entity and value.
struct Line<'a> {
    text: &'a str,
    value: Option<(&'a str, &'a str)>,
}

/// The two API shapes and two ways of answering, each a column of the report.
const MODES: [(Shape, bool); 4] =
    [(Shape::OpenAi, false), (Shape::OpenAi, true), (Shape::Anthropic, false), (Shape::Anthropic, true)];

#[derive(Clone, Copy, Debug)]
enum Shape {
    OpenAi,
    Anthropic,
}

/// Per entity and mode: values sent, leaked whole, leaked in part; redactions with that label,
/// and those that covered a personal value.
#[derive(Default, Clone, Copy)]
struct Tally {
    values: usize,
    whole: usize,
    part: usize,
    redactions: usize,
    correct: usize,
}

/// Runs the generator with its defaults into `dir`.
fn generate(dir: &TempDir) -> Corpus {
    let out = dir.path().join("corpus.json");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/pii-corpus.py");
    let run = Command::new(meridian_e2e::python()).arg(script).arg(&out).output().expect("python runs");
    assert!(run.status.success(), "pii-corpus.py failed:\n{}", String::from_utf8_lossy(&run.stderr));
    serde_json::from_slice(&std::fs::read(&out).expect("the corpus was written")).expect("the corpus is JSON")
}

/// The letters and digits of `s`, in order.
fn alnum(s: &str) -> String {
    s.chars().filter(|c| c.is_alphanumeric()).collect()
}

/// `s` with its placeholders (`[PHONE_1]`) cut out, so that their numbers are not read as digits
/// of a value.
fn without_placeholders(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let inner_end = rest[open..].find(']').map(|k| open + k);
        let is_placeholder = inner_end.is_some_and(|e| {
            let inner = &rest[open + 1..e];
            inner.rsplit_once('_').is_some_and(|(name, n)| {
                !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_uppercase())
                    && !n.is_empty()
                    && n.bytes().all(|b| b.is_ascii_digit())
            })
        });
        match inner_end.filter(|_| is_placeholder) {
            Some(e) => rest = &rest[e + 1..],
            None => {
                out.push('[');
                rest = &rest[open + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Whether `value`, written in `text`, reaches `sent` in part: [`PART`] consecutive letters or
/// digits of it that the rest of `text` does not hold.
fn leaks_in_part(text: &str, value: &str, sent: &str) -> bool {
    let v: Vec<char> = alnum(value).chars().collect();
    let rest = alnum(&text.replacen(value, " ", 1));
    let sent = alnum(&without_placeholders(sent));
    v.windows(PART.min(v.len())).map(String::from_iter).any(|w| sent.contains(&w) && !rest.contains(&w))
}

/// The body of one request in `shape` carrying `text`.
fn body(shape: Shape, text: &str, stream: bool) -> Value {
    match shape {
        Shape::OpenAi => {
            json!({"model": "gpt-test", "stream": stream, "messages": [{"role": "user", "content": text}]})
        }
        // The mock answers as many words as `max_tokens` allows: room for the whole echo.
        Shape::Anthropic => json!({"model": "claude-test", "stream": stream, "max_tokens": 100_000,
            "messages": [{"role": "user", "content": text}]}),
    }
}

/// The answer's text in the client's shape, whole or streamed.
fn answer(shape: Shape, r: &Reply) -> String {
    match shape {
        Shape::OpenAi => r.answer_text(),
        Shape::Anthropic => {
            assert_eq!(r.status, 200, "{}", r.text());
            if r.header("content-type") == Some("text/event-stream") {
                r.event_json().iter().filter_map(|e| e["delta"]["text"].as_str()).collect()
            } else {
                r.json()["content"][0]["text"].as_str().unwrap_or_default().to_string()
            }
        }
    }
}

/// The user's text as the upstream received it, a string or text blocks.
fn sent_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect(),
        other => panic!("the user's content is text: {other}"),
    }
}

/// Splits `lines` into requests of at most [`BATCH_BYTES`].
fn batches<'a>(lines: &'a [Line<'a>]) -> Vec<&'a [Line<'a>]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (k, line) in lines.iter().enumerate() {
        if bytes + line.text.len() + 1 > BATCH_BYTES && k > start {
            out.push(&lines[start..k]);
            (start, bytes) = (k, 0);
        }
        bytes += line.text.len() + 1;
    }
    out.push(&lines[start..]);
    out
}

fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        1.0
    } else {
        num as f64 / den as f64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faker_pii_never_reaches_the_upstream_and_clean_numbers_stay() {
    let dir = TempDir::new("pii-recall");
    let corpus = generate(&dir);
    assert!(corpus.pii.len() >= 2_000 && corpus.clean.len() >= 500, "the corpus's sizes are its defaults");
    for t in &corpus.pii {
        assert!(!t.text.contains('\n') && t.text.contains(&t.value), "one line holding its value: {:?}", t.text);
    }
    let mut lines: Vec<Line> =
        corpus.pii.iter().map(|t| Line { text: &t.text, value: Some((&t.entity, &t.value)) }).collect();
    lines.extend(corpus.clean.iter().map(|t| Line { text: &t.text, value: None }));
    let kinds: BTreeMap<&str, &str> = corpus.clean.iter().map(|t| (t.text.as_str(), t.kind.as_str())).collect();

    let mocks = Mocks::start().await;
    let cache = TempDir::new("pii-recall-cache");
    let mut cfg = mocks.config();
    cfg.plugin_runtime.cache_dir = cache.path().to_path_buf();
    // The plugin's defaults: every entity redacted (secrets block; the corpus has none).
    add_plugin(&mut cfg, "pii", PluginKind::Filter, "pii-redactor", json!({}));
    cfg.tenant_mut("acme").filters = vec!["pii".into()];
    let edge = TestEdge::start(cfg).await;

    let mut tallies = vec![BTreeMap::<String, Tally>::new(); MODES.len()];
    let mut clean_hits = [0usize; MODES.len()];
    let mut unrestored = 0;
    let mut problems = Vec::new();
    for (m, &(shape, stream)) in MODES.iter().enumerate() {
        let upstream = match shape {
            Shape::OpenAi => &mocks.openai,
            Shape::Anthropic => &mocks.anthropic,
        };
        for batch in batches(&lines) {
            let text = batch.iter().map(|l| l.text).collect::<Vec<_>>().join("\n");
            let r = match shape {
                Shape::OpenAi => edge.post("/v1/chat/completions", ACME_KEY, &body(shape, &text, stream)).await,
                Shape::Anthropic => {
                    let headers = [("x-api-key", ACME_KEY), ("anthropic-version", "2023-06-01")];
                    edge.send("POST", "/v1/messages", None, &headers, body(shape, &text, stream).to_string().into())
                        .await
                }
            };
            let got = answer(shape, &r);
            let received = upstream.received();
            let sent =
                sent_text(&received.last().expect("the request reached the upstream").body["messages"][0]["content"]);
            let sent_lines: Vec<&str> = sent.split('\n').collect();
            assert_eq!(sent_lines.len(), batch.len(), "redaction keeps the lines");
            // Every answer is restored exactly, line by line.
            let echoed = got.strip_prefix("Echo: ").unwrap_or_else(|| panic!("an echo ({shape:?}): {got:.200}"));
            for (line, back) in batch.iter().zip(echoed.split('\n')) {
                if line.text != back {
                    unrestored += 1;
                    problems.push(format!("{shape:?} stream={stream}: answer {back:?} for {:?}", line.text));
                }
            }
            for (line, sent) in batch.iter().zip(&sent_lines) {
                let spans = redacted_spans(line.text, sent);
                let Some((entity, value)) = line.value else {
                    if !spans.is_empty() {
                        clean_hits[m] += 1;
                        problems.push(format!("{} redacted {spans:?} in {:?}", kinds[line.text], line.text));
                    }
                    for (label, _) in &spans {
                        tallies[m].entry(label.clone()).or_default().redactions += 1;
                    }
                    continue;
                };
                let t = tallies[m].entry(entity.to_string()).or_default();
                t.values += 1;
                if sent.contains(value) {
                    t.whole += 1;
                    problems.push(format!("{entity} {value:?} reached the upstream whole: {sent:?}"));
                } else if leaks_in_part(line.text, value, sent) {
                    t.part += 1;
                    problems.push(format!("{entity} {value:?} reached the upstream in part: {sent:?}"));
                }
                for (label, span) in spans {
                    let t = tallies[m].entry(label).or_default();
                    t.redactions += 1;
                    if span.contains(value) || value.contains(span.as_str()) {
                        t.correct += 1;
                    } else {
                        problems.push(format!("redacted {span:?} beside {entity} {value:?} in {:?}", line.text));
                    }
                }
            }
        }
    }

    println!(
        "{} texts with one personal value each, {} clean; every one sent four ways",
        corpus.pii.len(),
        corpus.clean.len()
    );
    for (m, (shape, stream)) in MODES.iter().enumerate() {
        println!("\n{shape:?}, {}:", if *stream { "streamed" } else { "whole" });
        println!(
            "{:<8} {:>6} {:>6} {:>6} {:>7} {:>10} {:>7} {:>9}",
            "entity", "values", "whole", "part", "recall", "redactions", "correct", "precision"
        );
        let mut all = Tally::default();
        for (entity, t) in &tallies[m] {
            println!(
                "{entity:<8} {:>6} {:>6} {:>6} {:>7.3} {:>10} {:>7} {:>9.3}",
                t.values,
                t.whole,
                t.part,
                ratio(t.values - t.whole - t.part, t.values),
                t.redactions,
                t.correct,
                ratio(t.correct, t.redactions)
            );
            all.values += t.values;
            all.whole += t.whole;
            all.part += t.part;
            all.redactions += t.redactions;
            all.correct += t.correct;
        }
        println!(
            "{:<8} {:>6} {:>6} {:>6} {:>7.3} {:>10} {:>7} {:>9.3}",
            "all",
            all.values,
            all.whole,
            all.part,
            ratio(all.values - all.whole - all.part, all.values),
            all.redactions,
            all.correct,
            ratio(all.correct, all.redactions)
        );
        println!(
            "clean texts with a redaction: {} of {} ({:.2}%)",
            clean_hits[m],
            corpus.clean.len(),
            100.0 * ratio(clean_hits[m], corpus.clean.len())
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    problems.iter().filter(|p| seen.insert(p.as_str())).for_each(|p| println!("  {p}"));

    for (m, mode) in MODES.iter().enumerate() {
        let leaked: usize = tallies[m].values().map(|t| t.whole + t.part).sum();
        assert_eq!(leaked, 0, "{mode:?}: {leaked} values reached the upstream whole or in part");
        let rate = ratio(clean_hits[m], corpus.clean.len());
        assert!(rate < 0.01, "{mode:?}: {:.2}% of clean texts had a redaction", 100.0 * rate);
    }
    assert_eq!(unrestored, 0, "every answer is restored exactly");
}
