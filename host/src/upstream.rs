//! Upstream targets: managed APIs reached over HTTPS (pooled, HTTP/2 where offered).
//!
//! A [`Target`] is anything a request can be dispatched to. Today that is a managed API speaking
//! the OpenAI or Anthropic protocol; engine nodes and remote edges join as further protocols.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::api::{anthropic, openai};
use crate::chat::{ChatRequest, ChatResponse, StreamEvent};
use crate::config::{Config, ConfigError, Secret, TargetApi, TargetConfig, TargetKind};
use crate::error::UpstreamError;
use crate::sse::{SseEvent, SseParser};

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
    config: TargetConfig,
    endpoint: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    secret: Option<Secret>,
}

impl Target {
    /// Builds a target from its validated config, resolving secrets.
    pub fn new(name: &str, config: &Config) -> Result<Target, ConfigError> {
        let tc = &config.targets[name];
        let secrets = config.target_env(name)?;
        let bad = |key: String, msg: String| ConfigError::Invalid { key, message: msg };
        let base = secrets.base_url.trim_end_matches('/');
        let endpoint = match tc.api {
            TargetApi::Openai => format!("{base}/chat/completions"),
            TargetApi::Anthropic => format!("{base}/v1/messages"),
        };
        let endpoint: Uri = endpoint.parse().map_err(|e| bad(format!("targets.{name}.base_url"), format!("{e}")))?;
        let mut headers = Vec::new();
        let header_value = |key: String, v: &str| {
            HeaderValue::from_str(v).map_err(|_| bad(key, "contains characters not allowed in a header".into()))
        };
        if let Some(key) = &secrets.api_key {
            let mut value = match tc.api {
                TargetApi::Openai => {
                    header_value(format!("targets.{name}.api_key"), &format!("Bearer {}", key.expose()))?
                }
                TargetApi::Anthropic => header_value(format!("targets.{name}.api_key"), key.expose())?,
            };
            value.set_sensitive(true);
            let header = match tc.api {
                TargetApi::Openai => AUTHORIZATION,
                TargetApi::Anthropic => HeaderName::from_static("x-api-key"),
            };
            headers.push((header, value));
        }
        if tc.api == TargetApi::Anthropic {
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
        Ok(Target {
            name: name.to_string(),
            kind: tc.kind,
            region: tc.region.clone(),
            own_infrastructure: tc.own_infrastructure,
            config: tc.clone(),
            endpoint,
            headers,
            secret: secrets.api_key,
        })
    }

    /// Its wire protocol.
    pub fn api(&self) -> TargetApi {
        self.config.api
    }

    fn body(&self, req: &ChatRequest, upstream_model: &str, default_max_tokens: u32) -> Result<Bytes, UpstreamError> {
        match self.config.api {
            TargetApi::Openai => openai::upstream_body(req, upstream_model).map_err(|e| self.protocol(e.to_string())),
            TargetApi::Anthropic => Ok(anthropic::upstream_body(req, upstream_model, default_max_tokens)),
        }
    }

    fn protocol(&self, message: impl Into<String>) -> UpstreamError {
        UpstreamError::Protocol { target: self.name.clone(), message: message.into() }
    }

    /// Sends the request and waits for the response head within the first-byte timeout. A non-2xx
    /// status is read (bounded) and returned as an error with the upstream's message.
    async fn send(
        &self,
        client: &HttpClient,
        body: Bytes,
        request_id: &str,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut builder = Request::post(self.endpoint.clone()).header(CONTENT_TYPE, "application/json");
        for (k, v) in &self.headers {
            builder = builder.header(k, v);
        }
        if let Ok(id) = HeaderValue::from_str(request_id) {
            builder = builder.header("x-request-id", id);
        }
        let request = builder.body(Full::new(body)).map_err(|e| self.protocol(e.to_string()))?;
        let after = self.config.first_byte_timeout();
        let response = match tokio::time::timeout(after, client.request(request)).await {
            Err(_) => return Err(UpstreamError::Timeout { target: self.name.clone(), phase: "response", after }),
            Ok(Err(e)) => {
                let message = self.scrub(&error_chain(&e));
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
        Err(UpstreamError::Status { target: self.name.clone(), status: status.as_u16(), message: self.scrub(&message) })
    }

    /// Reads a whole body, each chunk within the between-chunk timeout, up to `limit` bytes.
    async fn read_body(&self, mut body: Incoming, limit: usize) -> Result<Bytes, UpstreamError> {
        let mut buf = Vec::new();
        while let Some(frame) = self.next_frame(&mut body).await? {
            buf.extend_from_slice(&frame);
            if buf.len() > limit {
                return Err(self.protocol(format!("response larger than {limit} bytes")));
            }
        }
        Ok(Bytes::from(buf))
    }

    async fn next_frame(&self, body: &mut Incoming) -> Result<Option<Bytes>, UpstreamError> {
        let after = self.config.chunk_timeout();
        loop {
            match tokio::time::timeout(after, body.frame()).await {
                Err(_) => {
                    return Err(UpstreamError::Timeout { target: self.name.clone(), phase: "stream chunk", after })
                }
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(self.protocol(format!("response body broke off: {}", error_chain(&e)))),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// Upstream error texts can quote the key they refused: never pass it on.
    fn scrub(&self, message: &str) -> String {
        match &self.secret {
            Some(s) if !s.expose().is_empty() => message.replace(s.expose(), "***"),
            _ => message.to_string(),
        }
    }

    /// A whole answer.
    pub async fn complete(
        &self,
        client: &HttpClient,
        req: &ChatRequest,
        upstream_model: &str,
        default_max_tokens: u32,
        request_id: &str,
    ) -> Result<ChatResponse, UpstreamError> {
        let body = self.body(req, upstream_model, default_max_tokens)?;
        let response = self.send(client, body, request_id).await?;
        let body = self.read_body(response.into_body(), 64 << 20).await?;
        match self.config.api {
            TargetApi::Openai => openai::decode_response(&body, upstream_model),
            TargetApi::Anthropic => anthropic::decode_response(&body, upstream_model),
        }
        .map_err(|m| self.protocol(m))
    }

    /// A streamed answer, once its response head has arrived.
    pub async fn stream(
        self: &Arc<Self>,
        client: &HttpClient,
        req: &ChatRequest,
        upstream_model: &str,
        default_max_tokens: u32,
        request_id: &str,
    ) -> Result<EventStream, UpstreamError> {
        let body = self.body(req, upstream_model, default_max_tokens)?;
        let response = self.send(client, body, request_id).await?;
        let is_sse = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_sse || response.status() != StatusCode::OK {
            return Err(self.protocol("expected a text/event-stream response"));
        }
        let decoder = match self.config.api {
            TargetApi::Openai => Decoder::OpenAi(openai::StreamDecoder::new(upstream_model)),
            TargetApi::Anthropic => Decoder::Anthropic(anthropic::StreamDecoder::new(upstream_model)),
        };
        Ok(EventStream {
            target: Arc::clone(self),
            body: response.into_body(),
            parser: SseParser::default(),
            decoder,
            parsed: Vec::new(),
            pending: VecDeque::new(),
            failed: None,
            done: false,
        })
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

/// Canonical events from an upstream's SSE body, each chunk within the between-chunk timeout.
/// A body that ends before the protocol's end marker is an error, never a clean end.
#[derive(Debug)]
pub struct EventStream {
    target: Arc<Target>,
    body: Incoming,
    parser: SseParser,
    decoder: Decoder,
    parsed: Vec<SseEvent>,
    pending: VecDeque<StreamEvent>,
    failed: Option<UpstreamError>,
    done: bool,
}

impl EventStream {
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
            match self.target.next_frame(&mut self.body).await {
                Ok(Some(chunk)) => self.decode(&chunk),
                Ok(None) => {
                    self.done = true;
                    self.failed = Some(self.target.protocol("stream ended before its end marker (truncated answer)"));
                }
                Err(e) => {
                    self.done = true;
                    self.failed = Some(e);
                }
            }
        }
    }

    /// What [`EventStream::next`] would return, if it is known without reading the network: an
    /// event already received, the failure that ended the stream, or its end.
    pub fn ready(&mut self) -> Option<Option<Result<StreamEvent, UpstreamError>>> {
        if let Some(ev) = self.pending.pop_front() {
            return Some(Some(Ok(ev)));
        }
        if let Some(err) = self.failed.take() {
            return Some(Some(Err(err)));
        }
        self.done.then_some(None)
    }

    /// Decodes a chunk; events before a decoding error are still delivered, then the error.
    fn decode(&mut self, chunk: &[u8]) {
        self.parser.feed(chunk, &mut self.parsed);
        let mut out = Vec::new();
        for ev in self.parsed.drain(..) {
            let result = match &mut self.decoder {
                Decoder::OpenAi(d) => d.decode(&ev.data, &mut out),
                Decoder::Anthropic(d) => d.decode(&ev.data, &mut out),
            };
            match result {
                Ok(false) => {}
                Ok(true) => {
                    self.done = true;
                    break;
                }
                Err(message) => {
                    self.done = true;
                    self.failed = Some(self.target.protocol(message));
                    break;
                }
            }
        }
        self.pending.extend(out);
    }
}
