//! The edge's side of an engine connection: [`EngineClient`], one per engine target.
//!
//! It keeps one QUIC connection, opened lazily and reopened when it has closed; concurrent requests
//! share it, one stream each. Errors say whether the edge may fall back to the next target
//! ([`ClientError::retryable`]).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

use tracing::debug;

use crate::api::{
    ChatRequest, EmbedRequest, Embeddings, EngineError, Envelope, ErrorCode, Event, Health, RelayRequest, Request,
    Usage, PROTOCOL_VERSION,
};
use crate::server::CODE_CANCELLED;
use crate::tls::{self, Identity, TlsError};
use crate::wire::{Decoder, Frame, DEFAULT_MAX_FRAME, LENGTH_BYTES};

/// How to reach one engine.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `host:port`, resolved at every connect (so a changed DNS record is followed).
    pub addr: String,
    /// The name the engine's certificate must carry (a DNS name or an IP address SAN).
    pub server_name: String,
    /// Limit on resolving, the QUIC handshake and TLS together.
    pub connect_timeout: Duration,
    /// Limit on the time until the first answer frame of a request (time to first token for chat,
    /// the whole answer for embed and health). `None`: no limit for chat and embed; health then
    /// uses `connect_timeout`.
    pub request_timeout: Option<Duration>,
    /// Largest frame, both ways: accepted from the engine, and sent to it (a request that needs a
    /// larger one is [`ClientError::TooLarge`] without being sent). The engine's default is the same.
    pub max_frame: usize,
}

impl ClientOptions {
    /// Options with defaults: 5 s connect timeout, no request timeout, 1 MiB frames.
    pub fn new(addr: impl Into<String>, server_name: impl Into<String>) -> ClientOptions {
        ClientOptions {
            addr: addr.into(),
            server_name: server_name.into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: None,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// What went wrong with a request to an engine.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// No usable connection: resolving, the handshake (including the TLS refusal of either side's
    /// certificate), or the connection was lost before any answer arrived.
    #[error("engine connection: {0}")]
    Connect(String),
    /// The engine answered with a typed error.
    #[error("engine error: {0}")]
    Remote(EngineError),
    /// The engine broke the protocol (an unexpected frame, bad bytes).
    #[error("engine protocol error: {0}")]
    Protocol(String),
    /// The stream was reset, or the connection lost, after the request was sent.
    #[error("engine stream reset: {reason}")]
    Reset {
        /// Whether part of the answer had been received already.
        answer_started: bool,
        /// What happened.
        reason: String,
    },
    /// No answer within the request timeout.
    #[error("engine did not answer within the request timeout")]
    Timeout,
    /// The request does not fit one frame (`len` bytes against a limit of `max`), so it was
    /// not sent: it is the request's size, not the engine, that is at fault.
    #[error("the request needs a frame of {len} bytes; frames hold at most {max}")]
    TooLarge {
        /// The frame length the request needs.
        len: usize,
        /// The frame limit.
        max: usize,
    },
}

impl ClientError {
    /// Whether the edge may try the next target: nothing can have reached the client yet, or the
    /// engine said it is overloaded, failed internally or is shutting down, or the request is
    /// too large for this engine's frames (a target with larger ones may take it).
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Connect(_) | ClientError::Timeout | ClientError::TooLarge { .. } => true,
            ClientError::Reset { answer_started, .. } => !answer_started,
            ClientError::Remote(e) => matches!(
                e.code,
                ErrorCode::Overloaded | ErrorCode::Internal | ErrorCode::LoopDetected | ErrorCode::Draining
            ),
            ClientError::Protocol(_) => false,
        }
    }
}

impl From<TlsError> for ClientError {
    fn from(e: TlsError) -> Self {
        ClientError::Connect(e.to_string())
    }
}

struct Live {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

struct Control {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dec: Decoder,
}

/// A client of one engine node. Share it (it is `Sync`); requests run concurrently on its one
/// connection.
pub struct EngineClient {
    opts: ClientOptions,
    config: quinn::ClientConfig,
    live: std::sync::Mutex<Option<Live>>,
    connecting: tokio::sync::Mutex<()>,
    control: tokio::sync::Mutex<Option<Control>>,
}

impl EngineClient {
    /// A client for the engine in `opts`, authenticating with `identity`. Does not connect yet.
    pub fn new(opts: ClientOptions, identity: &Identity) -> Result<EngineClient, ClientError> {
        let config = tls::client_config(identity)?;
        Ok(EngineClient {
            opts,
            config,
            live: std::sync::Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            control: tokio::sync::Mutex::new(None),
        })
    }

    /// The options it was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// Round-trip time of the current connection, if one is open.
    pub fn rtt(&self) -> Option<Duration> {
        self.current().map(|c| c.rtt())
    }

    /// Whether a connection is open now.
    pub fn is_connected(&self) -> bool {
        self.current().is_some()
    }

    fn current(&self) -> Option<quinn::Connection> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.as_ref().filter(|l| l.conn.close_reason().is_none()).map(|l| l.conn.clone())
    }

    /// The open connection, or a new one.
    async fn connection(&self) -> Result<quinn::Connection, ClientError> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        // One connect at a time: concurrent requests wait for it and share the result.
        let _guard = self.connecting.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let conn = tokio::time::timeout(self.opts.connect_timeout, self.connect()).await.map_err(|_| {
            ClientError::Connect(format!("{}: no connection within {:?}", self.opts.addr, self.opts.connect_timeout))
        })??;
        Ok(conn)
    }

    async fn connect(&self) -> Result<quinn::Connection, ClientError> {
        let addr = tokio::net::lookup_host(&self.opts.addr)
            .await
            .map_err(|e| ClientError::Connect(format!("resolving {}: {e}", self.opts.addr)))?
            .next()
            .ok_or_else(|| ClientError::Connect(format!("{} resolves to no address", self.opts.addr)))?;
        // Reuse the UDP socket of the last connection when the address family matches.
        let old = self.live.lock().unwrap_or_else(|p| p.into_inner()).take();
        let endpoint = match old {
            Some(l) if l.endpoint.local_addr().map(|a| a.is_ipv4() == addr.is_ipv4()).unwrap_or(false) => l.endpoint,
            _ => {
                let bind: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
                let mut ep = quinn::Endpoint::client(bind)
                    .map_err(|e| ClientError::Connect(format!("binding a UDP socket: {e}")))?;
                ep.set_default_client_config(self.config.clone());
                ep
            }
        };
        let connecting = endpoint
            .connect(addr, &self.opts.server_name)
            .map_err(|e| ClientError::Connect(format!("{}: {e}", self.opts.addr)))?;
        let conn = connecting.await.map_err(|e| ClientError::Connect(format!("{} ({addr}): {e}", self.opts.addr)))?;
        debug!(engine = %self.opts.addr, %addr, "connected");
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(Live { endpoint, conn: conn.clone() });
        Ok(conn)
    }

    /// Opens a stream and sends `frame` as its only frame. A frame over the limit is refused here,
    /// before anything is sent: the engine would refuse it too, and the request, not the engine,
    /// is at fault.
    async fn open_with(&self, frame: Frame) -> Result<(quinn::SendStream, quinn::RecvStream), ClientError> {
        let bytes = frame.encode();
        let len = bytes.len() - LENGTH_BYTES;
        if len > self.opts.max_frame {
            return Err(ClientError::TooLarge { len, max: self.opts.max_frame });
        }
        let conn = self.connection().await?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| ClientError::Connect(e.to_string()))?;
        send.write_all(&bytes).await.map_err(|e| early_write_error(&e))?;
        let _ = send.finish();
        Ok((send, recv))
    }

    async fn within<T>(
        &self,
        limit: Option<Duration>,
        f: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        match limit {
            Some(d) => tokio::time::timeout(d, f).await.map_err(|_| ClientError::Timeout)?,
            None => f.await,
        }
    }

    /// Starts a chat generation. Returns once the engine answered with its first frame, so an
    /// immediate refusal (overloaded, unknown model) is an `Err` here, before anything could have
    /// been passed on. Dropping the stream cancels the generation.
    pub async fn chat(&self, request: ChatRequest) -> Result<ChatStream, ClientError> {
        let envelope = Envelope { v: PROTOCOL_VERSION, request: Request::Chat(request) };
        self.within(self.opts.request_timeout, async {
            let (send, recv) = self.open_with(Frame::Request(envelope)).await?;
            let mut stream = ChatStream {
                send,
                recv,
                dec: Decoder::new(self.opts.max_frame),
                usage: None,
                pending: None,
                done: false,
            };
            match stream.read_event(false).await? {
                Event::Failed(e) => {
                    stream.done = true;
                    Err(ClientError::Remote(e))
                }
                first => {
                    stream.done = matches!(first, Event::Finished { .. });
                    stream.pending = Some(first);
                    Ok(stream)
                }
            }
        })
        .await
    }

    /// Hands a request to a peer edge (`Request::Relay`) and waits for the first frame of its
    /// answer within the request timeout: a refusal before any event is returned as
    /// [`ClientError::Remote`], so the caller may try elsewhere.
    pub async fn relay(&self, request: RelayRequest) -> Result<RelayStream, ClientError> {
        let envelope = Envelope { v: PROTOCOL_VERSION, request: Request::Relay(request) };
        self.within(self.opts.request_timeout, async {
            let (send, recv) = self.open_with(Frame::Request(envelope)).await?;
            let mut stream =
                RelayStream { send, recv, dec: Decoder::new(self.opts.max_frame), pending: None, done: false };
            match stream.read_event(false).await {
                Some(Ok(first)) => {
                    stream.pending = Some(first);
                    Ok(stream)
                }
                Some(Err(e)) => {
                    stream.done = true;
                    Err(e)
                }
                None => Err(ClientError::Protocol("relay stream ended before its first event".into())),
            }
        })
        .await
    }

    /// Embeds texts: one vector per input, in input order, with the tokens read.
    ///
    /// Bounded on both sides: the inputs go in as few requests as fit the frame limit (usually
    /// one; an input that cannot fit one is [`ClientError::TooLarge`]), sent one after the other,
    /// and each is answered in parts (`split_answer`) as the engine's bounded runs produce them,
    /// so no frame, either way, outgrows the limit however many inputs there are. An engine that
    /// predates split answers sends each request's vectors in one frame, which is taken as well.
    pub async fn embed(&self, request: EmbedRequest) -> Result<Embeddings, ClientError> {
        let EmbedRequest { model, input, .. } = request;
        let total = input.len();
        let requests = self.embed_requests(&model, input)?;
        self.within(self.opts.request_timeout, async {
            let mut answer = Embeddings { index: 0, data: Vec::with_capacity(total), prompt_tokens: 0 };
            for request in requests {
                self.embed_one(request, &mut answer).await?;
            }
            Ok(answer)
        })
        .await
    }

    /// `input` packed in order into requests that each fit one frame.
    fn embed_requests(&self, model: &str, input: Vec<String>) -> Result<Vec<EmbedRequest>, ClientError> {
        let envelope = |input: Vec<String>| Envelope {
            v: PROTOCOL_VERSION,
            request: Request::Embed(EmbedRequest { split_answer: true, ..EmbedRequest::new(model, input) }),
        };
        // The frame of a request without inputs; each input adds its JSON string and a comma.
        let base = Frame::Request(envelope(Vec::new())).encode().len() - LENGTH_BYTES;
        let max = self.opts.max_frame;
        let mut requests: Vec<EmbedRequest> = Vec::new();
        let mut len = 0;
        for text in input {
            let added = serde_json::to_string(&text).map_or(usize::MAX, |s| s.len()).saturating_add(1);
            if base + added > max {
                return Err(ClientError::TooLarge { len: base.saturating_add(added), max });
            }
            match requests.last_mut() {
                Some(last) if len + added <= max => last.input.push(text),
                _ => {
                    len = base;
                    requests.push(EmbedRequest { split_answer: true, ..EmbedRequest::new(model, vec![text]) });
                }
            }
            len += added;
        }
        Ok(requests)
    }

    /// Sends one embedding request and appends its vectors to `answer`.
    async fn embed_one(&self, request: EmbedRequest, answer: &mut Embeddings) -> Result<(), ClientError> {
        let expected = request.input.len();
        let envelope = Envelope { v: PROTOCOL_VERSION, request: Request::Embed(request) };
        let (_send, mut recv) = self.open_with(Frame::Request(envelope)).await?;
        let mut dec = Decoder::new(self.opts.max_frame);
        let mut got = 0;
        while got < expected {
            match read_frame(&mut recv, &mut dec, false).await? {
                Some(Frame::Embeddings(part)) => {
                    if part.index as usize != got || got + part.data.len() > expected {
                        return Err(ClientError::Protocol(format!(
                            "EMBEDDINGS of {} vectors from index {} where index {got} of {expected} belongs",
                            part.data.len(),
                            part.index
                        )));
                    }
                    got += part.data.len();
                    answer.data.extend(part.data);
                    answer.prompt_tokens = answer.prompt_tokens.saturating_add(part.prompt_tokens);
                }
                Some(Frame::Error(e)) => return Err(ClientError::Remote(e)),
                Some(other) => return Err(unexpected(&other, "an embed answer")),
                None => return Err(ClientError::Protocol(format!("stream ended after {got} of {expected} vectors"))),
            }
        }
        match read_frame(&mut recv, &mut dec, false).await? {
            None => Ok(()),
            Some(other) => Err(unexpected(&other, "the end of an embed answer")),
        }
    }

    /// Health of the engine, asked on the kept control stream (reopened after an error).
    pub async fn health(&self) -> Result<Health, ClientError> {
        let limit = Some(self.opts.request_timeout.unwrap_or(self.opts.connect_timeout));
        let mut control = self.control.lock().await;
        if control.as_ref().is_some_and(|c| c.conn.close_reason().is_some()) {
            *control = None;
        }
        // A kept stream on a live connection may still have broken since the last call (the
        // engine closed it): one retry on a fresh stream.
        for attempt in 0..2 {
            let reused = control.is_some();
            let result = self.within(limit, self.health_once(&mut control)).await;
            match result {
                Ok(h) => return Ok(h),
                Err(e) => {
                    *control = None;
                    if !(reused && attempt == 0) || matches!(e, ClientError::Remote(_) | ClientError::Timeout) {
                        return Err(e);
                    }
                }
            }
        }
        unreachable!("the loop returns")
    }

    async fn health_once(&self, control: &mut Option<Control>) -> Result<Health, ClientError> {
        let conn = self.connection().await?;
        let stale = control.as_ref().is_some_and(|c| c.conn.stable_id() != conn.stable_id());
        if stale {
            *control = None;
        }
        let c = match control {
            Some(c) => {
                c.send.write_all(&Frame::HealthRequest.encode()).await.map_err(|e| early_write_error(&e))?;
                c
            }
            None => {
                let (mut send, recv) = conn.open_bi().await.map_err(|e| ClientError::Connect(e.to_string()))?;
                send.write_all(&Frame::HealthRequest.encode()).await.map_err(|e| early_write_error(&e))?;
                control.insert(Control { conn: conn.clone(), send, recv, dec: Decoder::new(self.opts.max_frame) })
            }
        };
        match read_frame(&mut c.recv, &mut c.dec, false).await? {
            Some(Frame::Health(h)) => Ok(h),
            Some(Frame::Error(e)) => Err(ClientError::Remote(e)),
            Some(other) => Err(unexpected(&other, "a HEALTH frame")),
            None => Err(ClientError::Protocol("control stream ended".into())),
        }
    }
}

fn early_write_error(e: &quinn::WriteError) -> ClientError {
    match e {
        quinn::WriteError::ConnectionLost(c) => ClientError::Connect(format!("connection lost: {c}")),
        other => ClientError::Reset { answer_started: false, reason: other.to_string() },
    }
}

fn unexpected(frame: &Frame, wanted: &str) -> ClientError {
    ClientError::Protocol(format!("got a {} frame where {wanted} belongs", frame.frame_type().name()))
}

/// Reads the next frame; `Ok(None)` at a clean end of stream.
async fn read_frame(
    recv: &mut quinn::RecvStream,
    dec: &mut Decoder,
    answer_started: bool,
) -> Result<Option<Frame>, ClientError> {
    loop {
        if let Some(f) = dec.next_frame().map_err(|e| ClientError::Protocol(e.to_string()))? {
            return Ok(Some(f));
        }
        match recv.read_chunk(dec.wanted().max(4096), true).await {
            Ok(Some(chunk)) => dec.push(&chunk.bytes),
            Ok(None) => {
                dec.finish().map_err(|e| ClientError::Protocol(e.to_string()))?;
                return Ok(None);
            }
            Err(quinn::ReadError::ConnectionLost(c)) if !answer_started => {
                return Err(ClientError::Connect(format!("connection lost: {c}")));
            }
            Err(e) => return Err(ClientError::Reset { answer_started, reason: e.to_string() }),
        }
    }
}

/// A chat answer in progress. [`next`](ChatStream::next) yields deltas, then one `Finished` or
/// `Failed`, then `None`. Dropping it before the end cancels the generation on the engine.
pub struct ChatStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dec: Decoder,
    usage: Option<Usage>,
    pending: Option<Event>,
    done: bool,
}

impl ChatStream {
    /// The next event; `None` after the last one.
    pub async fn next(&mut self) -> Option<Result<Event, ClientError>> {
        if let Some(ev) = self.pending.take() {
            return Some(Ok(ev));
        }
        if self.done {
            return None;
        }
        let ev = self.read_event(true).await;
        self.done = !matches!(ev, Ok(Event::Delta(_)));
        Some(ev)
    }

    async fn read_event(&mut self, answer_started: bool) -> Result<Event, ClientError> {
        loop {
            match read_frame(&mut self.recv, &mut self.dec, answer_started).await? {
                Some(Frame::Delta(text)) => return Ok(Event::Delta(text)),
                Some(Frame::Usage(u)) => {
                    if self.usage.replace(u).is_some() {
                        return Err(ClientError::Protocol("two USAGE frames".into()));
                    }
                }
                Some(Frame::Done { finish_reason }) => {
                    let usage = self
                        .usage
                        .take()
                        .ok_or_else(|| ClientError::Protocol("DONE without USAGE before it".into()))?;
                    return Ok(Event::Finished { finish_reason, usage });
                }
                Some(Frame::Error(e)) => return Ok(Event::Failed(e)),
                Some(other) => return Err(unexpected(&other, "a chat answer")),
                None => return Err(ClientError::Protocol("stream ended before DONE or ERROR".into())),
            }
        }
    }
}

impl Drop for ChatStream {
    fn drop(&mut self) {
        if !self.done {
            cancel(&mut self.send, &mut self.recv);
        }
    }
}

/// Abandons a request stream: STOP_SENDING is what the server watches for; RESET_STREAM for
/// completeness (our side is finished already, so it usually has no effect).
fn cancel(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream) {
    let _ = recv.stop(CODE_CANCELLED.into());
    let _ = send.reset(CODE_CANCELLED.into());
}

/// A relayed answer in progress. [`next`](RelayStream::next) yields each `EVENT` frame's JSON,
/// then `None` when the peer finished the stream, or one error. Dropping it before the end cancels
/// the request on the peer edge.
pub struct RelayStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dec: Decoder,
    pending: Option<Bytes>,
    done: bool,
}

impl RelayStream {
    /// The next event's JSON; `None` after the last one.
    pub async fn next(&mut self) -> Option<Result<Bytes, ClientError>> {
        if let Some(ev) = self.pending.take() {
            return Some(Ok(ev));
        }
        if self.done {
            return None;
        }
        self.read_event(true).await
    }

    async fn read_event(&mut self, answer_started: bool) -> Option<Result<Bytes, ClientError>> {
        let item = match read_frame(&mut self.recv, &mut self.dec, answer_started).await {
            Ok(Some(Frame::Event(json))) => return Some(Ok(json)),
            Ok(Some(Frame::Error(e))) => Some(Err(ClientError::Remote(e))),
            Ok(Some(other)) => Some(Err(unexpected(&other, "a relayed answer"))),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        };
        self.done = true;
        item
    }
}

impl Drop for RelayStream {
    fn drop(&mut self) {
        if !self.done {
            cancel(&mut self.send, &mut self.recv);
        }
    }
}

impl std::fmt::Debug for RelayStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayStream").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for EngineClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineClient").field("addr", &self.options().addr).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ChatStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatStream").finish_non_exhaustive()
    }
}
