//! Upstream targets: managed APIs reached over HTTPS (pooled, HTTP/2 where offered), and Meridian
//! engine nodes and other regions' edges reached over QUIC with mutual TLS.
//!
//! A [`Target`] is anything a request can be dispatched to; every kind answers with the same
//! canonical [`StreamEvent`]s, so the request path does not care which it talks to.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use meridian_engine::client::{ChatStream, ClientError, ClientOptions, EngineClient, RelayStream};
use meridian_engine::tls::Identity;

use crate::api::relay::{self, Dispatch};
use crate::api::{anthropic, engine, openai};
use crate::chat::{ChatRequest, ChatResponse, ResponseBuilder, StreamEvent};
use crate::config::{Config, ConfigError, Secret, TargetApi, TargetConfig, TargetEnv, TargetKind};
use crate::error::UpstreamError;
use crate::sse::{SseError, SseParser};
use crate::stats::{Ejection, EngineLoad, HeldPrefixes, InFlight, TargetStats};

/// The shared HTTP(S) client of all managed targets.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the pooled client: TCP_NODELAY on every socket (Nagle against delayed ACKs costs ~40 ms
/// a request), webpki roots, HTTP/2 by ALPN.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() })
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .http1_writev(false)
        .pool_max_idle_per_host(1024)
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https)
}

/// One upstream that requests can be sent to.
#[derive(Debug)]
pub struct Target {
    /// Its name from config.
    pub name: String,
    /// How its capacity is bought.
    pub kind: TargetKind,
    /// Where it runs.
    pub region: Option<String>,
    /// Whether it runs on the operator's own infrastructure.
    pub own_infrastructure: bool,
    /// Its live statistics and ejection state.
    pub stats: TargetStats,
    /// When a request was last sent to it or last finished there: whether a target that scales
    /// to zero was idle long enough to start cold.
    last_active: std::sync::Mutex<Option<Instant>>,
    config: TargetConfig,
    /// How it is reached, with exactly what reaching it takes.
    transport: Transport,
}

/// How a target is reached. Each kind holds only what it uses, so a managed target has no QUIC
/// client and a QUIC target no URL path, headers or key.
#[derive(Debug)]
// One per target, built once and held in its `Arc` for the process's life: the size difference
// costs nothing, and boxing the QUIC client would only add an indirection on every request.
#[allow(clippy::large_enum_variant)]
enum Transport {
    /// A managed API over HTTPS (OpenAI- or Anthropic-shaped).
    Managed(Managed),
    /// A Meridian engine or another region's edge over QUIC.
    Quic(Quic),
}

/// The shape of a managed API's requests and answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ManagedApi {
    /// OpenAI chat completions.
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
}

/// A managed API's endpoint and credentials.
#[derive(Debug)]
struct Managed {
    /// The shape it speaks.
    api: ManagedApi,
    /// The full URL requests are posted to.
    endpoint: Uri,
    /// Headers sent with every request: the key, the API version, configured extras.
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The API key, kept to scrub it from upstream error texts.
    secret: Option<Secret>,
}

/// A QUIC peer: what it is decides what is sent on its connection.
#[derive(Debug)]
enum Quic {
    /// A Meridian engine, which takes engine chat and embedding requests.
    Engine(EngineClient),
    /// Another region's edge, which takes relayed requests and dispatches them itself.
    PeerEdge(EngineClient),
}

impl Quic {
    /// The client of the peer's connection, whatever it is.
    fn client(&self) -> &EngineClient {
        match self {
            Quic::Engine(client) | Quic::PeerEdge(client) => client,
        }
    }
}

impl Managed {
    /// The endpoint and headers of a managed target from its config and resolved secrets.
    fn new(name: &str, api: ManagedApi, tc: &TargetConfig, secrets: TargetEnv) -> Result<Managed, ConfigError> {
        let bad = |key: String, msg: String| ConfigError::Invalid { key, message: msg };
        let base = secrets.base_url.trim_end_matches('/');
        let endpoint = match api {
            ManagedApi::OpenAi => format!("{base}/chat/completions"),
            ManagedApi::Anthropic => format!("{base}/v1/messages"),
        };
        let endpoint = parse_base_url(name, &endpoint)?;
        let mut headers = Vec::new();
        let header_value = |key: String, v: &str| {
            HeaderValue::from_str(v).map_err(|_| bad(key, "contains characters not allowed in a header".into()))
        };
        if let Some(key) = &secrets.api_key {
            let (header, mut value) = match api {
                ManagedApi::Anthropic => (
                    HeaderName::from_static("x-api-key"),
                    header_value(format!("targets.{name}.api_key"), key.expose())?,
                ),
                ManagedApi::OpenAi => (
                    AUTHORIZATION,
                    header_value(format!("targets.{name}.api_key"), &format!("Bearer {}", key.expose()))?,
                ),
            };
            value.set_sensitive(true);
            headers.push((header, value));
        }
        if api == ManagedApi::Anthropic {
            headers.push((
                HeaderName::from_static("anthropic-version"),
                header_value(format!("targets.{name}.anthropic_version"), &tc.anthropic_version)?,
            ));
        }
        for (k, v) in &secrets.headers {
            let key = format!("targets.{name}.headers.{k}");
            let hname =
                HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad(key.clone(), "invalid header name".into()))?;
            let mut value = header_value(key, v.expose())?;
            value.set_sensitive(true);
            headers.push((hname, value));
        }
        Ok(Managed { api, endpoint, headers, secret: secrets.api_key })
    }

    /// Upstream error texts can quote the key they refused: never pass it on.
    fn scrub(&self, message: &str) -> String {
        match &self.secret {
            Some(s) if !s.expose().is_empty() => message.replace(s.expose(), "***"),
            _ => message.to_string(),
        }
    }
}

impl Target {
    /// Builds a target from its validated config, resolving secrets.
    pub fn new(name: &str, config: &Config) -> Result<Target, ConfigError> {
        let tc = &config.targets[name];
        let secrets = config.target_env(name)?;
        // QUIC targets authenticate with the `[quic]` certificates: validation refuses keys and
        // headers for them, so only their URL is used.
        let quic = |secrets: &TargetEnv| {
            let endpoint = parse_base_url(name, secrets.base_url.trim_end_matches('/'))?;
            quic_client(name, tc, &endpoint, config)
        };
        let transport = match tc.api {
            TargetApi::Openai => Transport::Managed(Managed::new(name, ManagedApi::OpenAi, tc, secrets)?),
            TargetApi::Anthropic => Transport::Managed(Managed::new(name, ManagedApi::Anthropic, tc, secrets)?),
            TargetApi::Engine => Transport::Quic(Quic::Engine(quic(&secrets)?)),
            TargetApi::Edge => Transport::Quic(Quic::PeerEdge(quic(&secrets)?)),
        };
        Ok(Target {
            name: name.to_string(),
            kind: tc.kind,
            region: tc.region.clone(),
            own_infrastructure: tc.own_infrastructure,
            stats: TargetStats::new(Ejection::from(&config.health)),
            last_active: std::sync::Mutex::new(None),
            config: tc.clone(),
            transport,
        })
    }

    /// Notes activity at `now` (a request sent, or one finished) and returns the previous
    /// activity, if any: the idle time before a request, which decides a serverless cold start.
    pub fn touch(&self, now: Instant) -> Option<Instant> {
        let mut last = self.last_active.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let previous = *last;
        if previous.is_none_or(|p| p < now) {
            *last = Some(now);
        }
        previous
    }

    /// Its wire protocol.
    pub fn api(&self) -> TargetApi {
        self.config.api
    }

    /// The request body a managed API of this shape takes.
    fn body(
        &self,
        api: ManagedApi,
        req: &ChatRequest,
        upstream_model: &str,
        default_max_tokens: u32,
    ) -> Result<Bytes, UpstreamError> {
        match api {
            ManagedApi::Anthropic => Ok(anthropic::upstream_body(req, upstream_model, default_max_tokens)),
            ManagedApi::OpenAi => openai::upstream_body(req, upstream_model).map_err(|e| self.protocol(e.to_string())),
        }
    }

    /// Asks an engine or peer-edge target for its health once (within its connect and first-byte
    /// timeouts), and records the load and RTT it reports, or the failure. A managed target:
    /// nothing.
    pub async fn probe(&self) {
        let Transport::Quic(quic) = &self.transport else { return };
        let client = quic.client();
        let after = self.config.connect_timeout() + self.config.first_byte_timeout();
        let result = match tokio::time::timeout(after, client.health()).await {
            Ok(Ok(h)) => Some((
                EngineLoad {
                    provider: h.provider,
                    tokens_per_second: h.tokens_per_second,
                    queue_depth: h.queue_depth,
                    active_sequences: h.active_sequences,
                    max_batch: h.max_batch,
                    prefix_cache_hits: h.prefix_cache_hits,
                    prefix_cache_tokens_reused: h.prefix_cache_tokens_reused,
                    prefix_cache_bytes: h.prefix_cache_bytes,
                    prefixes: Arc::new(HeldPrefixes::new(h.prefixes)),
                },
                client.rtt(),
            )),
            // A draining engine is leaving, not failing: nothing to record.
            Ok(Err(ClientError::Remote(e))) if e.code == meridian_engine::api::ErrorCode::Draining => return,
            _ => None,
        };
        self.stats.probe(Instant::now(), result);
    }

    /// A QUIC client's failure as an upstream error, classified by the engine's or peer edge's
    /// error code (the status a peer edge gives is kept for the client).
    pub fn engine_error(&self, e: ClientError) -> UpstreamError {
        use meridian_engine::api::ErrorCode as C;
        let target = self.name.clone();
        match e {
            ClientError::Connect(message) => UpstreamError::Connect { target, message },
            ClientError::Timeout => {
                UpstreamError::Timeout { target, phase: "response", after: self.config.first_byte_timeout() }
            }
            ClientError::Remote(e) => {
                let message = e.message;
                match e.code {
                    C::Overloaded => UpstreamError::Overloaded { target, status: e.status.unwrap_or(429), message },
                    // This engine's context is too short; a target with a longer one may serve it.
                    C::ContextLength => UpstreamError::Unsupported { target, message },
                    C::UnknownModel => UpstreamError::Misconfigured { target, status: 404, message },
                    C::LoopDetected => UpstreamError::Loop { target, message },
                    // A peer edge that does not take this tenant's relays from this edge.
                    C::Refused if e.status == Some(403) => UpstreamError::PeerRefused { target, message },
                    C::BadRequest | C::Refused => {
                        UpstreamError::Rejected { target, status: e.status.unwrap_or(400), message }
                    }
                    // The request outgrew this engine's frames (configured smaller than the edge
                    // knows): the request's size, not the engine, is at fault.
                    C::FrameTooLarge => UpstreamError::RequestTooLarge { target, message },
                    // Shutting down: the next target takes it, and this one has not failed.
                    C::Draining => UpstreamError::Draining { target, message },
                    C::UnsupportedVersion | C::MalformedFrame | C::Internal => {
                        UpstreamError::Failed { target, status: e.status.unwrap_or(502), message }
                    }
                }
            }
            // Refused before it was sent.
            too_large @ ClientError::TooLarge { .. } => {
                UpstreamError::RequestTooLarge { target, message: too_large.to_string() }
            }
            other => self.protocol(other.to_string()),
        }
    }

    fn protocol(&self, message: impl Into<String>) -> UpstreamError {
        UpstreamError::Protocol { target: self.name.clone(), message: message.into() }
    }

    /// Sends the request and waits for the response head within the first-byte timeout. A non-2xx
    /// status is read (bounded) and returned as an error with the upstream's message.
    async fn send(
        &self,
        managed: &Managed,
        client: &HttpClient,
        body: Bytes,
        dispatch: &Dispatch,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut builder = Request::post(managed.endpoint.clone()).header(CONTENT_TYPE, "application/json");
        for (k, v) in &managed.headers {
            builder = builder.header(k, v);
        }
        if let Ok(id) = HeaderValue::from_str(&dispatch.request_id) {
            builder = builder.header("x-request-id", id);
        }
        if let Some(Ok(trace)) = dispatch.traceparent.as_deref().map(HeaderValue::from_str) {
            builder = builder.header("traceparent", trace);
        }
        let request = builder.body(Full::new(body)).map_err(|e| self.protocol(e.to_string()))?;
        let after = self.config.first_byte_timeout();
        let response = match tokio::time::timeout(after, client.request(request)).await {
            Err(_) => return Err(UpstreamError::Timeout { target: self.name.clone(), phase: "response", after }),
            Ok(Err(e)) => {
                let message = managed.scrub(&error_chain(&e));
                return Err(if e.is_connect() {
                    UpstreamError::Connect { target: self.name.clone(), message }
                } else {
                    self.protocol(message)
                });
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = self.read_body(response.into_body(), 64 << 10).await.unwrap_or_default();
        let message = crate::api::error_message(&body)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
        Err(UpstreamError::from_http_status(&self.name, status.as_u16(), managed.scrub(&message)))
    }

    /// Reads a whole body, each chunk within the between-chunk timeout, up to `limit` bytes.
    async fn read_body(&self, mut body: Incoming, limit: usize) -> Result<Bytes, UpstreamError> {
        let after = self.config.chunk_timeout();
        let mut buf = Vec::new();
        loop {
            let frame = tokio::time::timeout(after, self.next_frame(&mut body))
                .await
                .map_err(|_| UpstreamError::Timeout { target: self.name.clone(), phase: "stream chunk", after })?;
            let Some(frame) = frame? else { return Ok(Bytes::from(buf)) };
            buf.extend_from_slice(&frame);
            if buf.len() > limit {
                return Err(self.protocol(format!("response larger than {limit} bytes")));
            }
        }
    }

    /// The next data frame of a body, however long it takes: callers bound the wait.
    async fn next_frame(&self, body: &mut Incoming) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            match body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(self.protocol(format!("response body broke off: {}", error_chain(&e)))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// A whole answer.
    pub async fn complete(
        self: &Arc<Self>,
        client: &HttpClient,
        req: &ChatRequest,
        upstream_model: &str,
        default_max_tokens: u32,
        dispatch: &Dispatch,
    ) -> Result<ChatResponse, UpstreamError> {
        let managed = match &self.transport {
            Transport::Managed(managed) => managed,
            Transport::Quic(quic) => return self.complete_quic(quic, req, upstream_model, dispatch).await,
        };
        let _in_flight = self.stats.start();
        let body = self.body(managed.api, req, upstream_model, default_max_tokens)?;
        let after = self.config.total_timeout();
        let answer = async {
            let response = self.send(managed, client, body, dispatch).await?;
            self.read_body(response.into_body(), 64 << 20).await
        };
        let body = tokio::time::timeout(after, answer).await.map_err(|_| UpstreamError::Timeout {
            target: self.name.clone(),
            phase: "whole answer",
            after,
        })??;
        match managed.api {
            ManagedApi::Anthropic => anthropic::decode_response(&body, upstream_model),
            ManagedApi::OpenAi => openai::decode_response(&body, upstream_model),
        }
        .map_err(|m| self.protocol(m))
    }

    /// A QUIC target's whole answer. One code path for QUIC targets: a whole answer is the folded
    /// stream (which counts itself in flight).
    async fn complete_quic(
        self: &Arc<Self>,
        quic: &Quic,
        req: &ChatRequest,
        upstream_model: &str,
        dispatch: &Dispatch,
    ) -> Result<ChatResponse, UpstreamError> {
        let mut stream = self.stream_quic(quic, req, upstream_model, dispatch).await?;
        // Its failure is this call's, which the request path records.
        stream.records_failure = false;
        let mut builder = ResponseBuilder::default();
        while let Some(ev) = stream.next().await {
            builder.push(&ev?);
        }
        Ok(builder.finish())
    }

    /// A streamed answer, once its response head has arrived.
    pub async fn stream(
        self: &Arc<Self>,
        client: &HttpClient,
        req: &ChatRequest,
        upstream_model: &str,
        default_max_tokens: u32,
        dispatch: &Dispatch,
    ) -> Result<EventStream, UpstreamError> {
        let managed = match &self.transport {
            Transport::Managed(managed) => managed,
            Transport::Quic(quic) => return self.stream_quic(quic, req, upstream_model, dispatch).await,
        };
        let (started, in_flight) = (Instant::now(), self.stats.start());
        let body = self.body(managed.api, req, upstream_model, default_max_tokens)?;
        let response = self.send(managed, client, body, dispatch).await?;
        let is_sse = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_sse || response.status() != StatusCode::OK {
            return Err(self.protocol("expected a text/event-stream response"));
        }
        let decoder = match managed.api {
            ManagedApi::Anthropic => Decoder::Anthropic(anthropic::StreamDecoder::new(upstream_model)),
            ManagedApi::OpenAi => Decoder::OpenAi(openai::StreamDecoder::new(upstream_model)),
        };
        let max_event = usize::try_from(self.config.max_event_bytes).unwrap_or(usize::MAX);
        let source = Source::Sse { body: response.into_body(), parser: Box::new(SseParser::new(max_event)), decoder };
        Ok(EventStream::new(Arc::clone(self), source, VecDeque::new(), started, in_flight))
    }

    /// Embeddings of `input` under the target's model name. Only engine targets serve them; any
    /// other target is skipped for the next one.
    pub async fn embed(
        &self,
        input: Vec<String>,
        upstream_model: &str,
    ) -> Result<meridian_engine::api::Embeddings, UpstreamError> {
        let client = match &self.transport {
            Transport::Quic(Quic::Engine(client)) => client,
            Transport::Managed(_) | Transport::Quic(Quic::PeerEdge(_)) => {
                return Err(UpstreamError::Unsupported {
                    target: self.name.clone(),
                    message: "this target does not serve embeddings".into(),
                })
            }
        };
        let _in_flight = self.stats.start();
        let request = meridian_engine::api::EmbedRequest::new(upstream_model, input);
        let after = self.config.first_byte_timeout();
        match tokio::time::timeout(after, client.embed(request)).await {
            Err(_) => Err(UpstreamError::Timeout { target: self.name.clone(), phase: "response", after }),
            Ok(result) => result.map_err(|e| self.engine_error(e)),
        }
    }

    /// An engine's or peer edge's answer: one QUIC stream on the target's connection, opened
    /// within the first-byte timeout. Dropping the returned stream resets it, which cancels the
    /// request there.
    async fn stream_quic(
        self: &Arc<Self>,
        quic: &Quic,
        req: &ChatRequest,
        upstream_model: &str,
        dispatch: &Dispatch,
    ) -> Result<EventStream, UpstreamError> {
        let (started, in_flight) = (Instant::now(), self.stats.start());
        let after = self.config.first_byte_timeout();
        let timed_out = || UpstreamError::Timeout { target: self.name.clone(), phase: "response", after };
        let (source, head) = match quic {
            Quic::PeerEdge(client) => {
                let opened = tokio::time::timeout(after, client.relay(dispatch.request(req, upstream_model))).await;
                let stream = opened.map_err(|_| timed_out())?.map_err(|e| self.engine_error(e))?;
                (Source::Relay(Box::new(stream)), VecDeque::new())
            }
            Quic::Engine(client) => {
                let mut request = engine::request(req, upstream_model)
                    .map_err(|e| UpstreamError::Unsupported { target: self.name.clone(), message: e.to_string() })?;
                request.traceparent = dispatch.traceparent.clone();
                let opened = tokio::time::timeout(after, client.chat(request)).await;
                let stream = opened.map_err(|_| timed_out())?.map_err(|e| self.engine_error(e))?;
                (Source::Engine(Box::new(stream)), VecDeque::from([engine::start(&req.model)]))
            }
        };
        Ok(EventStream::new(Arc::clone(self), source, head, started, in_flight))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[derive(Debug)]
enum Decoder {
    OpenAi(openai::StreamDecoder),
    Anthropic(anthropic::StreamDecoder),
}

/// Where a stream's events come from.
#[derive(Debug)]
enum Source {
    /// A managed API's server-sent events (the parser boxed, to keep the variants close in size).
    Sse { body: Incoming, parser: Box<SseParser>, decoder: Decoder },
    /// An engine's frames.
    Engine(Box<ChatStream>),
    /// A peer edge's relayed events.
    Relay(Box<RelayStream>),
}

/// What one read of a [`Source`] brought.
enum Received {
    /// A piece of a managed API's body; `None` at its end.
    Bytes(Option<Bytes>),
    /// An engine's event; `None` when its stream ended.
    Engine(Option<meridian_engine::api::Event>),
    /// A peer edge's event as JSON; `None` when its stream ended.
    Relay(Option<Bytes>),
}

impl Source {
    /// The next thing the upstream sends, however long it takes: [`EventStream::next`] bounds
    /// the wait.
    async fn receive(&mut self, target: &Target) -> Result<Received, UpstreamError> {
        let quic = |e| target.engine_error(e);
        Ok(match self {
            Source::Sse { body, .. } => Received::Bytes(target.next_frame(body).await?),
            Source::Engine(stream) => Received::Engine(stream.next().await.transpose().map_err(quic)?),
            Source::Relay(stream) => Received::Relay(stream.next().await.transpose().map_err(quic)?),
        })
    }
}

/// Canonical events from an upstream's stream, within the target's bounds: its first content
/// within `first_token_timeout_ms` of the request, each later event that carries something
/// within `chunk_timeout_ms` of the one before (keep-alives carry nothing), the whole answer
/// within `total_timeout_ms` and `max_stream_bytes`, each server-sent event within
/// `max_event_bytes`. A stream that ends before the protocol's end marker, or without a finish
/// reason after its last content, is an error, never a clean end.
#[derive(Debug)]
pub struct EventStream {
    target: Arc<Target>,
    source: Source,
    pending: VecDeque<StreamEvent>,
    failed: Option<UpstreamError>,
    done: bool,
    /// When the request was sent, for the time to first token and the whole answer's limit.
    started: Instant,
    /// When the response head, or the last event that carries something after it, came.
    progress: Instant,
    /// Whether content has come (read from the upstream, not necessarily delivered yet).
    content: bool,
    /// Whether a finish reason came after the last content: only then may the stream end.
    finished: bool,
    /// Bytes received: a managed API's whole body, or a QUIC stream's content.
    received: u64,
    /// Whether content has been delivered: a failure after it is the stream's own (before it,
    /// the request path records the failed attempt).
    begun: bool,
    /// Whether a failure after content counts against the target here.
    records_failure: bool,
    _in_flight: InFlight,
}

impl EventStream {
    fn new(
        target: Arc<Target>,
        source: Source,
        pending: VecDeque<StreamEvent>,
        started: Instant,
        in_flight: InFlight,
    ) -> EventStream {
        EventStream {
            target,
            source,
            pending,
            failed: None,
            done: false,
            started,
            progress: Instant::now(),
            content: false,
            finished: false,
            received: 0,
            begun: false,
            records_failure: true,
            _in_flight: in_flight,
        }
    }

    /// The target it comes from.
    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// The next event; `None` after the upstream's end marker.
    pub async fn next(&mut self) -> Option<Result<StreamEvent, UpstreamError>> {
        loop {
            if let Some(item) = self.ready() {
                return item;
            }
            let (left, phase, after) = self.limit();
            let received = match tokio::time::timeout(left, self.source.receive(&self.target)).await {
                Err(_) => Err(UpstreamError::Timeout { target: self.target.name.clone(), phase, after }),
                Ok(result) => result,
            };
            match received {
                Err(e) => self.fail(e),
                Ok(Received::Bytes(Some(chunk))) => {
                    if self.count(chunk.len()) {
                        self.decode(&chunk);
                    }
                }
                Ok(Received::Bytes(None)) => {
                    self.fail(self.target.protocol("stream ended before its end marker (truncated answer)"))
                }
                Ok(Received::Engine(None)) => {
                    self.fail(self.target.protocol("engine stream ended before its done frame"))
                }
                Ok(Received::Engine(Some(event))) => {
                    let last = matches!(event, meridian_engine::api::Event::Finished { .. });
                    let mut out = VecDeque::new();
                    match engine::events(event, &mut out) {
                        Ok(()) => self.accept(out),
                        Err(e) => self.fail(self.target.engine_error(ClientError::Remote(e))),
                    }
                    if last {
                        self.end();
                    }
                }
                // The peer finished its side: a whole answer if it gave its finish reason.
                Ok(Received::Relay(None)) => self.end(),
                Ok(Received::Relay(Some(json))) => match relay::decode_event(&json) {
                    Ok(event) => self.accept([event]),
                    Err(message) => self.fail(self.target.protocol(message)),
                },
            }
        }
    }

    /// How long the next read may take, with the limit that decides it (its name and length):
    /// the time between events that carry something, the time to first token until content
    /// came, and the whole answer's time, whichever ends first.
    fn limit(&self) -> (Duration, &'static str, Duration) {
        let config = &self.target.config;
        let left = |from: Instant, after: Duration| (after.saturating_sub(from.elapsed()), after);
        let chunk = (left(self.progress, config.chunk_timeout()), "stream chunk");
        let whole = (left(self.started, config.total_timeout()), "whole answer");
        let first_token = (!self.content).then(|| (left(self.started, config.first_token_timeout()), "first token"));
        let limits = [Some(chunk), Some(whole), first_token].into_iter().flatten();
        let ((left, after), phase) = limits.min_by_key(|((left, _), _)| *left).unwrap_or_default();
        (left, phase, after)
    }

    /// Counts `n` bytes received against `max_stream_bytes`; false (and the stream failed) past it.
    fn count(&mut self, n: usize) -> bool {
        self.received = self.received.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        let limit = self.target.config.max_stream_bytes;
        if self.received > limit {
            self.fail(UpstreamError::TooLarge { target: self.target.name.clone(), what: "the stream", limit });
            return false;
        }
        true
    }

    /// Queues decoded events, noting progress: anything but an empty piece of text or arguments
    /// (what keep-alives decode to, if to anything), and content with a finish reason after it.
    fn accept(&mut self, events: impl IntoIterator<Item = StreamEvent>) {
        for ev in events {
            let content = ev.content_len();
            if content > 0 {
                self.content = true;
                self.finished = false;
                if !matches!(self.source, Source::Sse { .. }) && !self.count(content) {
                    return;
                }
            }
            self.finished |= matches!(ev, StreamEvent::Finish(_));
            let empty = content == 0 && matches!(ev, StreamEvent::Text(_) | StreamEvent::ToolCallArgs { .. });
            if !empty {
                self.progress = Instant::now();
            }
            self.pending.push_back(ev);
        }
    }

    /// The upstream's end marker: a whole answer only if a finish reason followed its last
    /// content. Without one the answer may be cut short (and a placeholder held back for the
    /// next piece would never be restored), so it is an error.
    fn end(&mut self) {
        if !self.finished {
            self.fail(self.target.protocol("the stream ended without a finish reason"));
        }
        self.done = true;
    }

    fn fail(&mut self, e: UpstreamError) {
        self.done = true;
        self.failed.get_or_insert(e);
    }

    /// What [`EventStream::next`] would return, if it is known without reading the network: an
    /// event already received, the failure that ended the stream, or its end.
    pub fn ready(&mut self) -> Option<Option<Result<StreamEvent, UpstreamError>>> {
        if let Some(ev) = self.pending.pop_front() {
            if !self.begun && ev.content_len() > 0 {
                self.begun = true;
                self.target.stats.ttft(self.started.elapsed());
            }
            return Some(Some(Ok(ev)));
        }
        if let Some(err) = self.failed.take() {
            if self.begun && self.records_failure {
                self.target.stats.attempt(Instant::now(), None, Err(err.retry()));
            }
            return Some(Some(Err(err)));
        }
        self.done.then_some(None)
    }

    /// Decodes a chunk of server-sent events; events before a decoding error are still
    /// delivered, then the error.
    fn decode(&mut self, chunk: &[u8]) {
        let Source::Sse { parser, decoder, .. } = &mut self.source else { return };
        let (parsed, broken) = match parser.push(chunk) {
            Ok(parsed) => (parsed, None),
            Err(SseError::EventTooLarge { limit }) => {
                let limit = u64::try_from(limit).unwrap_or(u64::MAX);
                (
                    Vec::new(),
                    Some(UpstreamError::TooLarge { target: self.target.name.clone(), what: "an event", limit }),
                )
            }
            Err(e @ SseError::InvalidUtf8) => (Vec::new(), Some(self.target.protocol(e.to_string()))),
        };
        let mut out = Vec::new();
        let mut ended = false;
        let mut failed = broken;
        for ev in parsed {
            let result = match decoder {
                Decoder::OpenAi(d) => d.decode(&ev.data, &mut out),
                Decoder::Anthropic(d) => d.decode(&ev.data, &mut out),
            };
            match result {
                Ok(false) => {}
                Ok(true) => {
                    ended = true;
                    break;
                }
                Err(message) => {
                    failed = Some(self.target.protocol(message));
                    break;
                }
            }
        }
        self.accept(out);
        if let Some(e) = failed {
            self.fail(e);
        } else if ended {
            self.end();
        }
    }
}

/// Probes every engine and peer-edge target's health every `interval`, each in a task of its own
/// that ends when the target is dropped. Managed targets are not probed (they have no free probe
/// endpoint): they recover through half-open requests.
pub fn spawn_probes<'a>(targets: impl IntoIterator<Item = &'a Arc<Target>>, interval: Duration) {
    for target in targets.into_iter().filter(|t| matches!(t.transport, Transport::Quic(_))) {
        crate::periodic::every(interval, target, |target| async move { target.probe().await });
    }
}

/// A target's URL from its `base_url`, or the config error naming it.
fn parse_base_url(name: &str, url: &str) -> Result<Uri, ConfigError> {
    url.parse().map_err(|e| ConfigError::Invalid { key: format!("targets.{name}.base_url"), message: format!("{e}") })
}

/// The QUIC client of an engine or peer-edge target, with this node's cluster identity from
/// `[quic]`.
fn quic_client(name: &str, tc: &TargetConfig, endpoint: &Uri, config: &Config) -> Result<EngineClient, ConfigError> {
    let key = |field: &str| format!("targets.{name}.{field}");
    // Validation guarantees `[quic]` for engine targets and a host and port in the URL.
    let quic = config.quic.as_ref().ok_or_else(|| ConfigError::Invalid {
        key: key("api"),
        message: "engine and edge targets need the [quic] section".into(),
    })?;
    let identity = Identity::from_pem_files(&quic.ca, &quic.cert, &quic.key)
        .map_err(|e| ConfigError::Invalid { key: "quic".into(), message: e.to_string() })?;
    let host = endpoint.host().unwrap_or_default().trim_matches(['[', ']']);
    let server_name = tc.server_name.clone().unwrap_or_else(|| host.to_string());
    let mut options = ClientOptions::new(format!("{host}:{}", endpoint.port_u16().unwrap_or_default()), server_name);
    options.connect_timeout = tc.connect_timeout();
    EngineClient::new(options, &identity)
        .map_err(|e| ConfigError::Invalid { key: key("base_url"), message: e.to_string() })
}
