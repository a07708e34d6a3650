//! A soak: many requests at a fixed concurrency through an edge process running the default
//! plugin chain (pii-redactor, then latency-router) with its ledger on, half answered whole and
//! half streamed. Every answer is checked against what the mock upstream must have said (the
//! echo of the request's text, with its personal data restored), and the edge's memory is
//! sampled as the requests go by. The e2e test runs 100k requests on the debug build; the
//! `soak` benchmark runs a million on the release build.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

use crate::process::EdgeProcess;
use crate::{plugin_wasm, Reply};

/// The soak tenant's key.
pub const KEY: &str = "sk-soak";

/// The config of the soak's edge, listening on `port`, in front of the OpenAI-shaped upstream at
/// `upstream` (its base URL without `/v1`), with its ledger and plugin cache under `dir`. The
/// plugins keep their default deadline unless `plugin_deadline_ms` says otherwise: a debug build's
/// host side of a plugin call (the component model's lifting and lowering) is many times slower
/// than a release build's, and on a saturated 2-core machine it would miss the 20 ms default.
pub fn config(port: u16, upstream: &str, dir: &Path, plugin_deadline_ms: Option<u64>) -> String {
    let deadline = plugin_deadline_ms.map(|ms| format!("deadline_ms = {ms}")).unwrap_or_default();
    format!(
        r#"
[node]
listen = "127.0.0.1:{port}"
max_in_flight = 4096
[log]
level = "warn"
[ledger]
dir = "{ledger}"
[plugin_runtime]
cache_dir = "{cache}"
[plugins.pii]
kind = "filter"
path = "{pii}"
{deadline}
[plugins.latency]
kind = "router"
path = "{latency}"
{deadline}
[[tenants]]
name = "soak"
keys = ["{hash}"]
filters = ["pii"]
router = "latency"
[targets.mock]
api = "openai"
base_url = "{upstream}/v1"
api_key = "${{MERIDIAN_E2E_UPSTREAM_KEY}}"
price = {{ per = "token", input_usd_per_mtok = 0.15, output_usd_per_mtok = 0.6 }}
[[models]]
name = "soak"
targets = [{{ target = "mock" }}]
"#,
        ledger = dir.join("ledger").display(),
        cache = dir.join("plugin-cache").display(),
        pii = plugin_wasm("pii-redactor").display(),
        latency = plugin_wasm("latency-router").display(),
        hash = meridian::config::hash_key(KEY),
    )
}

/// What a soak saw.
#[derive(Debug)]
pub struct SoakReport {
    /// Requests sent.
    pub requests: u64,
    /// Requests whose answer was wrong, by what was wrong, with the first example of each.
    pub errors: BTreeMap<String, (u64, String)>,
    /// The edge's resident memory (KiB) after the given number of answers.
    pub rss_kib: Vec<(u64, u64)>,
    /// The edge's CPU time over the run.
    pub edge_cpu: Duration,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl SoakReport {
    /// Requests that went wrong, of any kind.
    pub fn error_count(&self) -> u64 {
        self.errors.values().map(|(n, _)| n).sum()
    }

    /// The edge's resident memory at the sample nearest after `answers`.
    pub fn rss_at(&self, answers: u64) -> Option<u64> {
        self.rss_kib.iter().find(|(n, _)| *n >= answers).map(|(_, kib)| *kib)
    }

    /// Growth of the edge's resident memory from the sample at `answers` to the last sample, in %.
    pub fn rss_growth_after(&self, answers: u64) -> f64 {
        match (self.rss_at(answers), self.rss_kib.last()) {
            (Some(from), Some((_, to))) if from > 0 => 100.0 * (*to as f64 - from as f64) / from as f64,
            _ => f64::NAN,
        }
    }

    /// A table for people: errors, memory along the run, CPU per request.
    pub fn print(&self, concurrency: usize) {
        println!(
            "soak: {} requests at c={concurrency}, half streamed, default plugin chain, ledger on: {:.1} s, {:.0} req/s",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.requests as f64 / self.elapsed.as_secs_f64()
        );
        println!("errors: {}", self.error_count());
        for (kind, (n, example)) in &self.errors {
            println!("  {n} × {kind}, e.g. {example}");
        }
        println!("| answers | edge RSS MiB |");
        println!("| --- | --- |");
        for (n, kib) in &self.rss_kib {
            println!("| {n} | {:.1} |", *kib as f64 / 1024.0);
        }
        println!("edge CPU per request: {:.1} µs", self.edge_cpu.as_secs_f64() * 1e6 / self.requests.max(1) as f64);
    }
}

/// The text of request `n`: every fourth carries personal data the filter must redact on the way
/// up and restore on the way down.
fn text(n: u64) -> String {
    if n.is_multiple_of(4) {
        format!("soak {n}: reply to jane.doe{n}@example.com about the invoice")
    } else {
        format!("soak {n}: summarise the quarterly numbers")
    }
}

/// Sends `requests` requests to `edge` from `concurrency` clients and checks each answer;
/// samples the edge's memory after each answer count in `marks`.
pub async fn run(edge: &EdgeProcess, requests: u64, concurrency: usize, marks: &[u64]) -> SoakReport {
    let next = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let errors: Arc<Mutex<BTreeMap<String, (u64, String)>>> = Arc::default();
    let rss: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let marks: Arc<[u64]> = marks.into();
    let (pid, cpu_before, started) = (edge.pid(), edge.cpu_time(), Instant::now());
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (next, answered, errors, rss, marks) =
            (next.clone(), answered.clone(), errors.clone(), rss.clone(), marks.clone());
        let (client, url) = (edge.client.clone(), format!("{}/v1/chat/completions", edge.url));
        clients.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= requests {
                    break;
                }
                if let Err((kind, example)) = one(&client, &url, n).await {
                    let mut errors = errors.lock().unwrap();
                    errors.entry(kind).or_insert((0, example)).0 += 1;
                }
                let done = answered.fetch_add(1, Ordering::Relaxed) + 1;
                if marks.contains(&done) || done == requests {
                    rss.lock().unwrap().push((done, crate::process::rss_kib(pid)));
                }
            }
        }));
    }
    for c in clients {
        c.await.expect("a soak client does not panic");
    }
    let mut rss_kib = std::mem::take(&mut *rss.lock().unwrap());
    rss_kib.sort_unstable();
    let errors = std::mem::take(&mut *errors.lock().unwrap());
    SoakReport {
        requests,
        errors,
        rss_kib,
        edge_cpu: edge.cpu_time().saturating_sub(cpu_before),
        elapsed: started.elapsed(),
    }
}

/// Request `n` of the soak, and what was wrong with its answer (a kind, an example).
async fn one(client: &crate::process::Http, url: &str, n: u64) -> Result<(), (String, String)> {
    let stream = n % 2 == 1;
    let text = text(n);
    let body = json!({ "model": "soak", "stream": stream, "messages": [{ "role": "user", "content": text }] });
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {KEY}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| ("request".to_string(), e.to_string()))?;
    let resp = client.0.request(req).await.map_err(|e| ("no answer".to_string(), e.to_string()))?;
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let body = resp.into_body().collect().await.map_err(|e| ("body cut".to_string(), e.to_string()))?.to_bytes();
    let reply = Reply { status, headers, body };
    if reply.status != 200 {
        return Err((format!("status {}", reply.status), reply.text()));
    }
    let answer = if stream { streamed_answer(&reply)? } else { whole_answer(&reply)? };
    let want = format!("Echo: {text}");
    if answer != want {
        return Err(("wrong answer".into(), format!("{answer:?}, not {want:?}")));
    }
    Ok(())
}

/// The content of a whole OpenAI-shaped answer.
fn whole_answer(reply: &Reply) -> Result<String, (String, String)> {
    let v: Value = serde_json::from_slice(&reply.body).map_err(|e| ("not JSON".to_string(), e.to_string()))?;
    if v["choices"][0]["finish_reason"].as_str().is_none() {
        return Err(("no finish_reason".into(), reply.text()));
    }
    Ok(v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string())
}

/// The content of a streamed OpenAI-shaped answer, which must carry a finish_reason and end with
/// `[DONE]`.
fn streamed_answer(reply: &Reply) -> Result<String, (String, String)> {
    let events = reply.events();
    if events.last().map(|e| e.data.as_str()) != Some("[DONE]") {
        return Err(("stream without [DONE]".into(), reply.text()));
    }
    let (mut answer, mut finished) = (String::new(), false);
    for e in events.iter().filter(|e| e.data != "[DONE]") {
        let chunk: Value =
            serde_json::from_str(&e.data).map_err(|err| ("event not JSON".to_string(), err.to_string()))?;
        answer.push_str(chunk["choices"][0]["delta"]["content"].as_str().unwrap_or_default());
        finished |= chunk["choices"][0]["finish_reason"].is_string();
    }
    if !finished {
        return Err(("stream without finish_reason".into(), reply.text()));
    }
    Ok(answer)
}
