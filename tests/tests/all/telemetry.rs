//! Distributed tracing across the cluster: a client's request through an edge, relayed to a peer
//! edge, served by a real engine (SmolLM2), is one trace. Every node exports its spans over
//! OTLP/HTTP to a receiver that decodes them with the official OpenTelemetry protobuf definitions
//! (`tests/sdk/otlp_receiver.py`, the `opentelemetry-proto` package from PyPI): the client's
//! `traceparent` is the root's parent, each upstream attempt's span is the parent of what the next
//! node records, and the engine's queue, prefill and decode are spans of its request.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian::config::{Config, RelayPeer};
use meridian_e2e::engine::{Cluster, TestEngine};
use meridian_e2e::{model, Mocks, TempDir, TestEdge, ACME_KEY};
use meridian_engine::telemetry::TelemetryConfig;
use serde_json::{json, Value};

/// The receiver's process and the spans it printed so far.
struct Receiver {
    child: Child,
    endpoint: String,
    spans: Arc<Mutex<Vec<Value>>>,
    _dir: TempDir,
}

impl Receiver {
    async fn start() -> Receiver {
        let dir = TempDir::new("otlp");
        let port_file = dir.path().join("port");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/otlp_receiver.py");
        let mut child = Command::new(meridian_e2e::python())
            .arg(script)
            .arg(&port_file)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python runs");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let (out, sink) = (child.stdout.take().unwrap(), Arc::clone(&spans));
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(serde_json::from_str::<Value>(&line).expect("a span as JSON"));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&port_file).ok().filter(|p| !p.is_empty()) {
                break port;
            }
            assert!(Instant::now() < deadline, "the OTLP receiver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Receiver { child, endpoint: format!("http://127.0.0.1:{port}"), spans, _dir: dir }
    }

    fn telemetry(&self, service: &str) -> TelemetryConfig {
        TelemetryConfig { otlp_endpoint: Some(self.endpoint.clone()), service_name: Some(service.into()) }
    }

    /// The spans of trace `trace` once `done` holds for them (within 30 s).
    async fn trace(&self, trace: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans: Vec<Value> =
                self.spans.lock().unwrap().iter().filter(|s| s["trace_id"] == trace).cloned().collect();
            if done(&spans) {
                return spans;
            }
            assert!(Instant::now() < deadline, "the trace is not complete: {spans:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The one span of `service` named `name`.
fn span<'a>(spans: &'a [Value], service: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = spans.iter().filter(|s| s["service"] == service && s["name"] == name).collect();
    assert_eq!(found.len(), 1, "one `{name}` span of {service}: {spans:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_through_edge_peer_edge_and_engine_is_one_trace() {
    let receiver = Receiver::start().await;
    let mocks = Mocks::start().await;
    let cluster = Cluster::new("telemetry");
    let telemetry = receiver.telemetry("engine-a");
    let engine = TestEngine::start_with(&cluster, "engine-a", 2, |c| c.telemetry = telemetry).await;

    // eu: serves `smol` on the engine and takes relays from us.
    let mut eu: Config = mocks.config();
    eu.node.region = "eu-west".into();
    let relay = cluster.accept_relays(&mut eu, "edge-eu", 2);
    let tenants = eu.tenants.iter().map(|t| t.name.clone()).collect();
    eu.relay.as_mut().unwrap().peers.push(RelayPeer { name: "edge-us".into(), region: "us-east".into(), tenants });
    cluster.add_engine_target(&mut eu, "edge-eu", "engine-a", "engine-a", engine.addr);
    eu.models.push(model("smol", &[("engine-a", None)]));
    eu.telemetry = receiver.telemetry("edge-eu");
    let eu = TestEdge::start(eu).await;
    // us: relays `smol` to eu.
    let mut us: Config = mocks.config();
    us.node.region = "us-east".into();
    cluster.join(&mut us, "edge-us");
    cluster.add_edge_target(&mut us, "edge-eu", "edge-eu", "eu-west", relay);
    us.models.push(model("smol", &[("edge-eu", None)]));
    us.telemetry = receiver.telemetry("edge-us");
    let us = TestEdge::start(us).await;

    // The client's own span.
    let (trace, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let body = json!({"model": "smol", "max_tokens": 4, "messages": [{"role": "user", "content": "Say hi."}]});
    let traceparent = format!("00-{trace}-{client_span}-01");
    let r = us.post_with("/v1/chat/completions", ACME_KEY, &[("traceparent", &traceparent)], &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-meridian-target"), Some("edge-eu"));

    let complete = |spans: &[Value]| {
        ["edge-us", "edge-eu", "engine-a"].iter().all(|s| spans.iter().any(|x| x["service"] == *s && x["kind"] == 2))
    };
    let spans =
        receiver.trace(trace, |s| complete(s) && s.iter().filter(|x| x["service"] == "engine-a").count() == 4).await;

    // us: its request under the client's span, its phases and its attempt under the request.
    let us_root = span(&spans, "edge-us", "chat openai");
    assert_eq!(us_root["parent_span_id"], client_span);
    assert_eq!(us_root["kind"], 2, "a server span");
    assert_eq!(us_root["attributes"]["meridian.status"], "ok");
    assert_eq!(us_root["resource"]["meridian.region"], "us-east");
    for phase in ["parse", "filter and route", "budget", "cache"] {
        assert_eq!(span(&spans, "edge-us", phase)["parent_span_id"], us_root["span_id"], "{phase}");
    }
    let to_eu = span(&spans, "edge-us", "upstream edge-eu");
    assert_eq!((to_eu["parent_span_id"].clone(), to_eu["kind"].clone()), (us_root["span_id"].clone(), json!(3)));
    assert_eq!(to_eu["attributes"]["meridian.outcome"], "ok");
    // eu: its request under us's attempt; its attempt at the engine under its request.
    let eu_root = span(&spans, "edge-eu", "chat relay");
    assert_eq!(eu_root["parent_span_id"], to_eu["span_id"]);
    let to_engine = span(&spans, "edge-eu", "upstream engine-a");
    assert_eq!(to_engine["parent_span_id"], eu_root["span_id"]);
    // The engine: its request under eu's attempt, with queue, prefill and decode under it, in order.
    let engine_root = span(&spans, "engine-a", "engine chat smol");
    assert_eq!(engine_root["parent_span_id"], to_engine["span_id"]);
    let phases: Vec<&Value> = ["queue", "prefill", "decode"].iter().map(|p| span(&spans, "engine-a", p)).collect();
    for p in &phases {
        assert_eq!(p["parent_span_id"], engine_root["span_id"]);
    }
    assert!(phases.windows(2).all(|w| w[0]["end"].as_u64() <= w[1]["start"].as_u64().map(|s| s + 1_000_000)));
    // Time nests: each node's request within its caller's attempt.
    let within = |inner: &Value, outer: &Value| {
        inner["start"].as_u64() >= outer["start"].as_u64() && inner["end"].as_u64() <= outer["end"].as_u64()
    };
    assert!(within(eu_root, to_eu) && within(to_eu, us_root), "{spans:#?}");
    drop((us, eu, engine));
}

#[tokio::test]
async fn without_an_exporter_a_clients_traceparent_reaches_the_upstream_unchanged() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]});
    let r = edge.post_with("/v1/chat/completions", ACME_KEY, &[("traceparent", traceparent)], &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = mocks.openai.received();
    assert_eq!(seen.last().and_then(|r| r.header("traceparent")), Some(traceparent));
}

#[tokio::test]
async fn a_traced_request_hands_a_managed_upstream_its_attempts_span() {
    let mocks = Mocks::start().await;
    let mut config = mocks.config();
    // A collector that is not there: the spans are dropped, the request is not slowed or failed.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).unwrap().port();
    config.telemetry = TelemetryConfig { otlp_endpoint: Some(format!("http://127.0.0.1:{port}")), service_name: None };
    let edge = TestEdge::start(config).await;
    let (trace, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]});
    let traceparent = format!("00-{trace}-{client_span}-01");
    let r = edge.post_with("/v1/chat/completions", ACME_KEY, &[("traceparent", &traceparent)], &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = mocks.openai.received();
    let sent = seen.last().and_then(|r| r.header("traceparent")).expect("a traceparent upstream").to_string();
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!((parts.len(), parts[0], parts[1], parts[3]), (4, "00", trace, "01"), "{sent}");
    assert_ne!(parts[2], client_span, "the attempt's own span, under the edge's");
}
