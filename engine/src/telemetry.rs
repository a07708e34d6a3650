//! Distributed traces: W3C trace context (`traceparent`) and spans exported over OTLP
//! (HTTP/protobuf), shared by the engine and the edge.
//!
//! A node traces only when `[telemetry] otlp_endpoint` is set: then each request it serves is a
//! span (continuing the caller's `traceparent`, or starting a trace), its phases are child spans,
//! and what it calls (an upstream, a peer edge, an engine) gets a `traceparent` naming the span
//! of that call. Spans go to a bounded queue that a background task sends in batches to
//! `ENDPOINT/v1/traces` (`ExportTraceServiceRequest`, protobuf); a full queue or a collector that
//! does not answer drops spans (counted), never slows a request. With no endpoint nothing is
//! recorded, and a `traceparent` a client sent is passed on as it came.
//!
//! The protobuf messages are declared here with the field numbers of the official
//! `opentelemetry/proto/{collector/trace/v1,trace/v1,common/v1,resource/v1}` definitions (only
//! the fields written); the test suite decodes what is sent with the official definitions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// `[telemetry]`: where spans go.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// An OTLP/HTTP collector, `http://HOST:PORT` (spans are POSTed to `/v1/traces`); absent:
    /// no spans.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of this node's spans (default `meridian-edge` or `meridian-engine`).
    pub service_name: Option<String>,
}

/// A span's place in a trace: W3C trace context (`traceparent: 00-TRACE-SPAN-FLAGS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace, never all zeros.
    pub trace_id: [u8; 16],
    /// The span, never all zeros.
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceContext {
    /// A new trace's root context, sampled.
    pub fn new_root() -> TraceContext {
        let trace = (u128::from(random_u64()) << 64 | u128::from(random_u64())).max(1);
        TraceContext { trace_id: trace.to_be_bytes(), span_id: new_span_id(), flags: 1 }
    }

    /// Parses a `traceparent` header value; `None` for anything not a valid version-00 value
    /// (a later version's first four fields are read, as the W3C spec asks).
    pub fn parse(value: &str) -> Option<TraceContext> {
        let value = value.trim();
        let mut parts = value.split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let more = parts.next().is_some();
        let hex = |s: &str, n: usize| {
            (s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
                .then(|| (0..n / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap_or(0)).collect())
        };
        let version: Vec<u8> = hex(version, 2)?;
        // Version ff is invalid; version 00 has exactly four fields.
        if version[0] == 0xff || (version[0] == 0 && more) {
            return None;
        }
        let trace_id: [u8; 16] = hex(trace, 32)?.try_into().ok()?;
        let span_id: [u8; 8] = hex(span, 16)?.try_into().ok()?;
        let flags = hex(flags, 2)?[0];
        (trace_id != [0; 16] && span_id != [0; 8]).then_some(TraceContext { trace_id, span_id, flags })
    }

    /// The `traceparent` value naming this span.
    pub fn header(&self) -> String {
        format!("00-{}-{}-{:02x}", hex(&self.trace_id), hex(&self.span_id), self.flags)
    }

    /// A child span's context: the same trace, a new span id.
    pub fn child(&self) -> TraceContext {
        TraceContext { span_id: new_span_id(), ..*self }
    }
}

/// A new random span id (never all zeros).
pub fn new_span_id() -> [u8; 8] {
    random_u64().max(1).to_be_bytes()
}

/// 64 random bits: the standard library's per-process random hash keys, fresh for each
/// `RandomState`, over a counter (ids must be unique, not secret).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What a span is to its trace (OTLP `SpanKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Work inside a node.
    Internal = 1,
    /// A request the node serves.
    Server = 2,
    /// A request the node sends.
    Client = 3,
}

/// One finished span.
#[derive(Debug, Clone)]
pub struct Span {
    /// Its trace and id.
    pub context: TraceContext,
    /// Its parent's id; `None` for a trace's root.
    pub parent: Option<[u8; 8]>,
    /// What it is: `POST /v1/chat/completions`, `route`, `queue`…
    pub name: String,
    /// Its kind.
    pub kind: SpanKind,
    /// When it started and ended, in ns since the Unix epoch.
    pub start_ns: u64,
    /// See `start_ns`.
    pub end_ns: u64,
    /// Attributes (`meridian.target` …).
    pub attributes: Vec<(&'static str, String)>,
    /// Why it failed, if it did (OTLP status `ERROR` with this message).
    pub error: Option<String>,
}

impl Span {
    /// A span of `context` under `parent`, from `start_ns` until now.
    pub fn ended_now(
        context: TraceContext,
        parent: Option<[u8; 8]>,
        name: impl Into<String>,
        kind: SpanKind,
        start_ns: u64,
    ) -> Span {
        let end_ns = now_unix_nanos().max(start_ns);
        Span { context, parent, name: name.into(), kind, start_ns, end_ns, attributes: Vec::new(), error: None }
    }

    /// With attribute `key` = `value`.
    pub fn with(mut self, key: &'static str, value: impl Into<String>) -> Span {
        self.attributes.push((key, value.into()));
        self
    }
}

/// Spans waiting for the exporter at most; more are dropped (and counted).
const QUEUE: usize = 8192;
/// Spans in one export at most.
const BATCH: usize = 512;
/// How long a span may wait for a fuller batch.
const FLUSH: Duration = Duration::from_millis(500);
/// One export's time limit.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends spans to an OTLP/HTTP collector from a background task. Cheap to clone.
#[derive(Clone)]
pub struct Exporter {
    tx: mpsc::Sender<Span>,
    dropped: Arc<AtomicU64>,
}

impl Exporter {
    /// An exporter to `endpoint` (`http://HOST:PORT`, optionally with a path instead of
    /// `/v1/traces`) for service `service`, with `resource` attributes; spawns its task (needs a
    /// Tokio runtime).
    pub fn start(endpoint: &str, service: &str, resource: Vec<(&'static str, String)>) -> Result<Exporter, String> {
        let target = Target::parse(endpoint)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut attributes = vec![("service.name", service.to_string())];
        attributes.extend(resource);
        tokio::spawn(run(rx, target, attributes, Arc::clone(&dropped)));
        Ok(Exporter { tx, dropped })
    }

    /// Queues `span` for export; never waits (a full queue drops it).
    pub fn export(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Spans dropped so far: the queue was full, or the collector refused or did not answer.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Where an exporter POSTs.
#[derive(Debug, Clone)]
struct Target {
    host: String,
    port: u16,
    path: String,
}

impl Target {
    fn parse(endpoint: &str) -> Result<Target, String> {
        let rest = endpoint
            .strip_prefix("http://")
            .ok_or_else(|| format!("`{endpoint}`: an OTLP/HTTP endpoint is http://HOST:PORT (a local collector)"))?;
        let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        let (host, port) = authority.rsplit_once(':').ok_or_else(|| format!("`{endpoint}`: needs a port"))?;
        let port = port.parse().map_err(|_| format!("`{endpoint}`: bad port"))?;
        let path = if path.is_empty() { "/v1/traces".to_string() } else { format!("/{path}") };
        Ok(Target { host: host.trim_matches(['[', ']']).to_string(), port, path })
    }
}

/// The exporter's task: batches spans and POSTs them until every sender is gone.
async fn run(
    mut rx: mpsc::Receiver<Span>,
    target: Target,
    resource: Vec<(&'static str, String)>,
    dropped: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let Some(first) = rx.recv().await else { return };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + FLUSH;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let body = otlp::encode(&resource, &batch);
        let n = batch.len() as u64;
        batch.clear();
        match tokio::time::timeout(EXPORT_TIMEOUT, post(&target, &body)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                dropped.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(error = %e, spans = n, "OTLP export failed: spans dropped");
            }
            Err(_) => {
                dropped.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(spans = n, "OTLP export timed out: spans dropped");
            }
        }
    }
}

/// One HTTP/1.1 POST of an export, on a connection of its own; a 2xx answer is success.
async fn post(target: &Target, body: &[u8]) -> Result<(), String> {
    let mut stream =
        tokio::net::TcpStream::connect((target.host.as_str(), target.port)).await.map_err(|e| e.to_string())?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        target.path,
        target.host,
        target.port,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
    stream.write_all(body).await.map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.map_err(|e| e.to_string())?;
    let status = String::from_utf8_lossy(answer.split(|&b| b == b'\n').next().unwrap_or_default()).into_owned();
    match status.split_whitespace().nth(1) {
        Some(code) if code.starts_with('2') => Ok(()),
        _ => Err(format!("the collector answered `{}`", status.trim())),
    }
}

/// The OTLP trace messages, by the official field numbers, encoded with prost.
mod otlp {
    use prost::Message;

    use super::Span;

    #[derive(Clone, PartialEq, Message)]
    struct ExportTraceServiceRequest {
        #[prost(message, repeated, tag = "1")]
        resource_spans: Vec<ResourceSpans>,
    }

    #[derive(Clone, PartialEq, Message)]
    struct ResourceSpans {
        #[prost(message, optional, tag = "1")]
        resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        scope_spans: Vec<ScopeSpans>,
    }

    #[derive(Clone, PartialEq, Message)]
    struct Resource {
        #[prost(message, repeated, tag = "1")]
        attributes: Vec<KeyValue>,
    }

    #[derive(Clone, PartialEq, Message)]
    struct ScopeSpans {
        #[prost(message, optional, tag = "1")]
        scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        spans: Vec<OtlpSpan>,
    }

    #[derive(Clone, PartialEq, Message)]
    struct InstrumentationScope {
        #[prost(string, tag = "1")]
        name: String,
        #[prost(string, tag = "2")]
        version: String,
    }

    #[derive(Clone, PartialEq, Message)]
    struct OtlpSpan {
        #[prost(bytes = "vec", tag = "1")]
        trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        span_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        parent_span_id: Vec<u8>,
        #[prost(string, tag = "5")]
        name: String,
        #[prost(int32, tag = "6")]
        kind: i32,
        #[prost(fixed64, tag = "7")]
        start_time_unix_nano: u64,
        #[prost(fixed64, tag = "8")]
        end_time_unix_nano: u64,
        #[prost(message, repeated, tag = "9")]
        attributes: Vec<KeyValue>,
        #[prost(message, optional, tag = "15")]
        status: Option<Status>,
        #[prost(fixed32, tag = "16")]
        flags: u32,
    }

    #[derive(Clone, PartialEq, Message)]
    struct Status {
        #[prost(string, tag = "2")]
        message: String,
        /// 2: `STATUS_CODE_ERROR`.
        #[prost(int32, tag = "3")]
        code: i32,
    }

    #[derive(Clone, PartialEq, Message)]
    struct KeyValue {
        #[prost(string, tag = "1")]
        key: String,
        #[prost(message, optional, tag = "2")]
        value: Option<AnyValue>,
    }

    #[derive(Clone, PartialEq, Message)]
    struct AnyValue {
        #[prost(string, tag = "1")]
        string_value: String,
    }

    fn attributes(pairs: &[(&'static str, String)]) -> Vec<KeyValue> {
        pairs
            .iter()
            .map(|(k, v)| KeyValue { key: (*k).to_string(), value: Some(AnyValue { string_value: v.clone() }) })
            .collect()
    }

    /// An `ExportTraceServiceRequest` of `spans` from one resource.
    pub(super) fn encode(resource: &[(&'static str, String)], spans: &[Span]) -> Vec<u8> {
        let spans = spans
            .iter()
            .map(|s| OtlpSpan {
                trace_id: s.context.trace_id.to_vec(),
                span_id: s.context.span_id.to_vec(),
                parent_span_id: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
                name: s.name.clone(),
                kind: s.kind as i32,
                start_time_unix_nano: s.start_ns,
                end_time_unix_nano: s.end_ns,
                attributes: attributes(&s.attributes),
                status: s.error.as_ref().map(|m| Status { message: m.clone(), code: 2 }),
                // The W3C flags in the low byte; bit 8: whether the parent is remote is known.
                flags: u32::from(s.context.flags),
            })
            .collect();
        let scope = InstrumentationScope { name: "meridian".into(), version: env!("CARGO_PKG_VERSION").into() };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource { attributes: attributes(resource) }),
                scope_spans: vec![ScopeSpans { scope: Some(scope), spans }],
            }],
        }
        .encode_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_values_are_refused() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(v).expect("the W3C example");
        assert_eq!(ctx.header(), v);
        assert_eq!(ctx.flags, 1);
        let child = ctx.child();
        assert_eq!((child.trace_id, child.flags), (ctx.trace_id, ctx.flags));
        assert_ne!(child.span_id, ctx.span_id);
        // A later version may add fields; its first four are read.
        assert!(TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        let root = TraceContext::new_root();
        assert_eq!(TraceContext::parse(&root.header()), Some(root));
    }

    #[test]
    fn endpoints_are_http_with_a_port() {
        let t = Target::parse("http://127.0.0.1:4318").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("127.0.0.1", 4318, "/v1/traces"));
        assert_eq!(Target::parse("http://collector:4318/custom/traces").unwrap().path, "/custom/traces");
        assert!(Target::parse("https://collector:4318").is_err());
        assert!(Target::parse("http://collector").is_err());
    }
}
