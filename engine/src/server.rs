//! The engine's QUIC server: carries [`Backend`] calls in the frames of [`crate::wire`].
//!
//! One bidirectional stream per request. The first frame decides the stream's kind: REQUEST makes
//! it a request stream (one answer, then the server finishes its side), HEALTH_REQUEST makes it
//! the control stream (a HEALTH for every HEALTH_REQUEST until the peer finishes it). A bad frame
//! gets an ERROR frame and ends that stream only; the connection and its other streams go on.
//!
//! Cancellation: when the peer stops reading the answer (STOP_SENDING) or resets its side
//! (RESET_STREAM), or the connection is lost, the backend's receiver is dropped at once, which
//! frees the engine slot; the server does not wait for the next delta to notice.
//!
//! Shutdown drains: running requests get the grace period, and every new stream is answered at
//! once with ERROR `draining`, which edges take as "try the next target" rather than a failure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::api::{Backend, EmbedRequest, Embeddings, EngineError, ErrorCode, Event, Request};
use crate::tls::{self, Identity, TlsError};
use crate::wire::{Decoder, Frame, WireError, DEFAULT_MAX_FRAME};

/// Application error code on stream resets and stops: the request was cancelled.
pub const CODE_CANCELLED: u32 = 0x1;
/// Application error code on stream stops: the stream was closed after a protocol error.
pub const CODE_PROTOCOL: u32 = 0x2;
/// Application error code of a connection close: the node is shutting down.
pub const CODE_SHUTDOWN: u32 = 0x10;

/// How long a stopping server waits for its connections' close frames to be delivered.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Limits the server enforces.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Request streams open at once per connection (QUIC stream credit: a client opening more
    /// waits, it is not refused). Bounds what one edge can pile onto this engine beyond the
    /// scheduler's own queue.
    pub max_streams_per_connection: u32,
    /// Largest frame accepted (the length field), in bytes.
    pub max_frame: usize,
    /// How long a new stream may take to deliver its first frame; a stream that opens and says
    /// nothing would otherwise hold a stream slot forever.
    pub first_frame_timeout: Duration,
    /// How long `shutdown` waits for requests in flight before closing connections.
    pub shutdown_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_streams_per_connection: 256,
            max_frame: DEFAULT_MAX_FRAME,
            first_frame_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// A bound engine server. [`run`](EngineServer::run) serves until the endpoint closes;
/// [`spawn`](EngineServer::spawn) serves in a task and can be shut down gracefully.
pub struct EngineServer {
    endpoint: quinn::Endpoint,
    backend: Arc<dyn Backend>,
    limits: ServerLimits,
    shutdown: watch::Receiver<bool>,
    shutdown_tx: watch::Sender<bool>,
}

/// A server running in a task.
pub struct ServerHandle {
    local_addr: SocketAddr,
    shutdown_tx: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl EngineServer {
    /// Binds a UDP socket at `addr` and prepares to serve `backend` with mutual TLS.
    pub fn bind(
        addr: SocketAddr,
        identity: &Identity,
        backend: Arc<dyn Backend>,
        limits: ServerLimits,
    ) -> Result<EngineServer, ServerError> {
        let config = tls::server_config(identity, &limits)?;
        let endpoint = quinn::Endpoint::server(config, addr).map_err(|source| ServerError::Bind { addr, source })?;
        let (shutdown_tx, shutdown) = watch::channel(false);
        info!(addr = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
              node = identity.name().unwrap_or_default(), "engine server listening");
        Ok(EngineServer { endpoint, backend, limits, shutdown, shutdown_tx })
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Serves in a new task; the handle shuts it down.
    pub fn spawn(self) -> std::io::Result<ServerHandle> {
        let local_addr = self.local_addr()?;
        let shutdown_tx = self.shutdown_tx.clone();
        let task = tokio::spawn(self.run());
        Ok(ServerHandle { local_addr, shutdown_tx, task })
    }

    /// Accepts connections until shut down (through a [`ServerHandle`]) and then drains: new
    /// connections and streams are refused, requests in flight get up to
    /// [`ServerLimits::shutdown_grace`] to finish, then every connection is closed.
    pub async fn run(self) {
        let EngineServer { endpoint, backend, limits, mut shutdown, shutdown_tx: _keep } = self;
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let backend = backend.clone();
                    let limits = limits.clone();
                    let mut shutdown = shutdown.clone();
                    let remote = incoming.remote_address();
                    connections.spawn(
                        async move {
                            let handshake = tokio::select! {
                                h = incoming => h,
                                // A handshake still running at shutdown is abandoned, not waited for.
                                _ = shutdown.wait_for(|stopping| *stopping) => return,
                            };
                            match handshake {
                                Ok(conn) => serve_connection(conn, backend, limits, shutdown).await,
                                // A client without a certificate, with one from another CA, or
                                // without our ALPN ends here.
                                Err(e) => info!(error = %e, "handshake refused"),
                            }
                        }
                        .instrument(tracing::info_span!("conn", peer = %remote)),
                    );
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                _ = shutdown.changed() => break,
            }
        }
        info!("engine server draining");
        // Refuse new connections at once rather than leaving them to time out.
        endpoint.set_server_config(None);
        // Connections see the same shutdown signal, stop taking streams, wait for theirs, and
        // close; past the grace period everything is closed at once.
        let drained =
            tokio::time::timeout(limits.shutdown_grace, async { while connections.join_next().await.is_some() {} })
                .await;
        if drained.is_err() {
            warn!("shutdown grace period over; closing connections with requests in flight");
        }
        endpoint.close(CODE_SHUTDOWN.into(), b"shutdown");
        connections.shutdown().await;
        // Give the CONNECTION_CLOSE frames a moment to go out, but do not wait for every half-open
        // handshake to time out (one abandoned by its client lingers until the idle timeout).
        let _ = tokio::time::timeout(CLOSE_LINGER, endpoint.wait_idle()).await;
        info!("engine server stopped");
    }
}

impl ServerHandle {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets requests in flight finish (up to the grace period), closes.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        let _ = self.task.await;
    }
}

async fn serve_connection(
    conn: quinn::Connection,
    backend: Arc<dyn Backend>,
    limits: ServerLimits,
    shutdown: watch::Receiver<bool>,
) {
    // The certificate's name goes to the backend, which decides who may relay; an empty one
    // (a certificate without a common name) matches no node.
    let peer: Arc<str> = Arc::from(peer_name(&conn).unwrap_or_default());
    let client = if peer.is_empty() { "?" } else { &*peer };
    info!(client = %client, "connection established");
    let mut streams = JoinSet::new();
    // Once the node drains, streams that are running finish, and every new one is refused at once
    // (`draining`) so that its client goes to another engine instead of waiting out the grace
    // period; the connection closes when the last stream is done.
    let mut draining = false;
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let id = send.id();
                    streams.spawn(
                        serve_stream(send, recv, backend.clone(), limits.clone(), shutdown.clone(), peer.clone(), draining)
                            .instrument(tracing::debug_span!("stream", client = %client, id = %id)),
                    );
                }
                Err(e) => {
                    info!(client = %client, reason = %e, "connection closed");
                    break;
                }
            },
            joined = streams.join_next(), if draining || !streams.is_empty() => {
                if joined.is_none() {
                    // Draining, and every stream is done: say goodbye.
                    conn.close(CODE_SHUTDOWN.into(), b"shutdown");
                    break;
                }
            }
            _ = stop.wait_for(|stopping| *stopping), if !draining => {
                debug!(client = %client, streams = streams.len(), "draining the connection");
                draining = true;
            }
        }
    }
    // Dropping `streams` aborts stream tasks of a closed connection; their receivers drop, which
    // cancels their generations.
}

/// The client certificate's subject common name.
fn peer_name(conn: &quinn::Connection) -> Option<String> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok()?;
    crate::certs::subject_common_name(chain.first()?)
}

/// What ended reading a frame.
enum ReadEnd {
    /// The peer finished its side cleanly between frames.
    Finished,
    /// The bytes were bad; answer with an ERROR.
    Wire(WireError),
    /// The peer reset the stream or the connection is gone; nothing more can be said.
    Gone(String),
}

/// Reads the next frame; `Err(Finished)` at a clean end of stream.
async fn read_frame(recv: &mut quinn::RecvStream, dec: &mut Decoder) -> Result<Frame, ReadEnd> {
    loop {
        match dec.next_frame() {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(e) => return Err(ReadEnd::Wire(e)),
        }
        match recv.read_chunk(dec.wanted().max(4096), true).await {
            Ok(Some(chunk)) => dec.push(&chunk.bytes),
            Ok(None) => {
                return match dec.finish() {
                    Ok(()) => Err(ReadEnd::Finished),
                    Err(e) => Err(ReadEnd::Wire(e)),
                };
            }
            Err(e) => return Err(ReadEnd::Gone(e.to_string())),
        }
    }
}

async fn write_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), quinn::WriteError> {
    let mut buf = BytesMut::new();
    frame.encode_into(&mut buf);
    send.write_all(&buf).await
}

/// Sends an ERROR frame and ends the stream (both directions).
async fn fail_stream(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, err: EngineError) {
    debug!(code = ?err.code, message = %err.message, "stream error");
    if write_frame(send, &Frame::Error(err)).await.is_ok() {
        let _ = send.finish();
    }
    let _ = recv.stop(CODE_PROTOCOL.into());
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    backend: Arc<dyn Backend>,
    limits: ServerLimits,
    shutdown: watch::Receiver<bool>,
    peer: Arc<str>,
    draining: bool,
) {
    let mut dec = Decoder::new(limits.max_frame);
    let first = match tokio::time::timeout(limits.first_frame_timeout, read_frame(&mut recv, &mut dec)).await {
        Err(_) => {
            let err = EngineError::new(ErrorCode::MalformedFrame, "no frame within the first-frame timeout");
            return fail_stream(&mut send, &mut recv, err).await;
        }
        Ok(r) => r,
    };
    if draining && first.is_ok() {
        // The first frame is read before the refusal, so that the client's request is taken
        // whole and it reads the refusal rather than a stopped stream.
        let err = EngineError::new(ErrorCode::Draining, "the node is shutting down; it takes no new streams");
        return fail_stream(&mut send, &mut recv, err).await;
    }
    match first {
        Ok(Frame::Request(envelope)) => match envelope.request {
            Request::Chat(req) => {
                debug!(model = %req.model, "chat");
                match backend.chat(req) {
                    Ok(rx) => serve_answer(send, recv, rx, "chat", encode_chat).await,
                    Err(e) => fail_stream(&mut send, &mut recv, e).await,
                }
            }
            Request::Relay(req) => {
                debug!(tenant = %req.tenant, path = ?req.path, request_id = %req.request_id, "relay");
                match backend.relay(&peer, req) {
                    Ok(rx) => serve_answer(send, recv, rx, "relay", encode_relay).await,
                    Err(e) => fail_stream(&mut send, &mut recv, e).await,
                }
            }
            Request::Embed(req) => {
                debug!(model = %req.model, inputs = req.input.len(), split = req.split_answer, "embed");
                let mut answer = EmbedAnswer::new(&req, limits.max_frame);
                match backend.embed(req) {
                    Ok(rx) => serve_answer(send, recv, rx, "embed", |part, buf| answer.encode(part, buf)).await,
                    Err(e) => fail_stream(&mut send, &mut recv, e).await,
                }
            }
        },
        Ok(Frame::HealthRequest) => serve_control(send, recv, dec, backend, shutdown).await,
        Ok(other) => {
            let err = EngineError::new(
                ErrorCode::MalformedFrame,
                format!("a stream must start with REQUEST or HEALTH_REQUEST, not {}", other.frame_type().name()),
            );
            fail_stream(&mut send, &mut recv, err).await
        }
        Err(ReadEnd::Wire(e)) => fail_stream(&mut send, &mut recv, e.to_engine_error()).await,
        Err(ReadEnd::Finished) => {
            let err = EngineError::new(ErrorCode::MalformedFrame, "stream ended before its first frame");
            fail_stream(&mut send, &mut recv, err).await
        }
        Err(ReadEnd::Gone(why)) => debug!(reason = %why, "stream gone before its first frame"),
    }
}

/// Resolves when the peer cancels: it stops our send side, resets its own, sends data after the
/// request (a protocol error, treated as cancel), or the connection is lost. Never resolves after
/// a clean finish of the peer's side unless the send side is stopped.
async fn cancelled(
    stopped: impl std::future::Future<Output = Result<Option<quinn::VarInt>, quinn::StoppedError>>,
    recv: &mut quinn::RecvStream,
) -> String {
    let read_side = async {
        let mut buf = [0u8; 64];
        loop {
            match recv.read(&mut buf).await {
                // The client finished its side after the request: the normal case; keep only
                // watching the send side.
                Ok(None) => std::future::pending::<()>().await,
                Ok(Some(_)) => return "data after the request".to_string(),
                Err(e) => return format!("read side: {e}"),
            }
        }
    };
    tokio::select! {
        s = stopped => match s {
            Ok(Some(code)) => format!("stopped by peer (code {code})"),
            Ok(None) => "answer delivered".to_string(),
            Err(e) => format!("send side: {e}"),
        },
        why = read_side => why,
    }
}

/// Encodes one chat event (`None`: the generation vanished) into `buf`; true for the last.
fn encode_chat(event: Option<Event>, buf: &mut BytesMut) -> bool {
    match event {
        Some(Event::Delta(text)) => {
            Frame::Delta(text).encode_into(buf);
            false
        }
        Some(Event::Finished { finish_reason, usage }) => {
            Frame::Usage(usage).encode_into(buf);
            Frame::Done { finish_reason }.encode_into(buf);
            true
        }
        Some(Event::Failed(e)) => {
            Frame::Error(e).encode_into(buf);
            true
        }
        None => {
            Frame::Error(EngineError::new(ErrorCode::Internal, "generation ended without a result")).encode_into(buf);
            true
        }
    }
}

/// Takes one piece of a relayed answer, already encoded by the backend; the end of the channel
/// is the end of the answer.
fn encode_relay(frames: Option<Bytes>, buf: &mut BytesMut) -> bool {
    match frames {
        Some(frames) => {
            buf.extend_from_slice(&frames);
            false
        }
        None => true,
    }
}

/// Writes an answer's items to the stream as the backend produces them, until `encode` says the
/// last was written; then finishes the stream. The peer cancelling (or the connection going) ends
/// it at once, dropping `rx`, which frees what the backend holds for it.
async fn serve_answer<T>(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut rx: tokio::sync::mpsc::Receiver<T>,
    what: &'static str,
    mut encode: impl FnMut(Option<T>, &mut BytesMut) -> bool,
) {
    let stopped = send.stopped();
    let cancel = cancelled(stopped, &mut recv);
    tokio::pin!(cancel);
    let mut buf = BytesMut::new();
    loop {
        let item = tokio::select! {
            biased;
            why = &mut cancel => {
                info!(reason = %why, "{what} cancelled by peer");
                return;
            }
            item = rx.recv() => item,
        };
        buf.clear();
        let last = encode(item, &mut buf);
        // A write blocked on flow control also ends when the peer stops the stream.
        let written = tokio::select! {
            biased;
            why = &mut cancel => Err(why),
            w = send.write_all(&buf) => w.map_err(|e| e.to_string()),
        };
        if let Err(why) = written {
            info!(reason = %why, "{what} cancelled by peer");
            return;
        }
        if last {
            let _ = send.finish();
            debug!("{what} answered");
            return;
        }
    }
}

/// Frames an embedding answer from the parts the backend produces.
///
/// Why the answer may span frames: a request of 2 048 texts fits a 1 MiB frame easily, its 2 048
/// vectors do not (384 floats each: ~8 MB of JSON). The backend reads the texts in bounded
/// runs, and a client that asked for it (`split_answer`, which an old server ignores) gets each
/// run's vectors as soon as they are ready, one `EMBEDDINGS` frame per run (or more, if one run's
/// vectors exceed a frame), each naming the index of its first vector; the stream's flow control
/// then bounds what waits here to one run. A client that did not ask (one that predates the
/// field) gets the one frame it expects, built up to the frame limit and refused past it: never
/// a partial answer it would take for a whole one.
struct EmbedAnswer {
    split: bool,
    max_frame: usize,
    /// Vectors the request asks for.
    expected: usize,
    /// Vectors taken from the backend so far.
    taken: usize,
    /// The one-frame answer so far, and its size as JSON.
    whole: Embeddings,
    whole_bytes: usize,
}

impl EmbedAnswer {
    fn new(req: &EmbedRequest, max_frame: usize) -> EmbedAnswer {
        EmbedAnswer {
            split: req.split_answer,
            max_frame,
            expected: req.input.len(),
            taken: 0,
            whole: Embeddings { index: 0, data: Vec::new(), prompt_tokens: 0 },
            whole_bytes: 0,
        }
    }

    /// Encodes one part (`None`: the backend is done) into `buf`; true for the last.
    fn encode(&mut self, part: Option<Result<Embeddings, EngineError>>, buf: &mut BytesMut) -> bool {
        let result = match part {
            Some(Ok(part)) => self.take(part, buf).map(|()| false),
            Some(Err(e)) => Err(e),
            None => self.finish(buf).map(|()| true),
        };
        result.unwrap_or_else(|e| {
            buf.clear();
            Frame::Error(e).encode_into(buf);
            true
        })
    }

    fn take(&mut self, part: Embeddings, buf: &mut BytesMut) -> Result<(), EngineError> {
        if part.index as usize != self.taken || self.taken + part.data.len() > self.expected {
            return Err(EngineError::new(ErrorCode::Internal, "the embedding model answered out of order"));
        }
        self.taken += part.data.len();
        if self.split {
            return encode_within(part, self.max_frame, buf);
        }
        self.whole_bytes += json_len(&part.data);
        if self.whole_bytes > self.max_frame {
            return Err(EngineError::new(
                ErrorCode::BadRequest,
                format!(
                    "the {} vectors do not fit one {}-byte frame: send fewer inputs, or ask for a split answer",
                    self.expected, self.max_frame
                ),
            ));
        }
        self.whole.data.extend(part.data);
        self.whole.prompt_tokens += part.prompt_tokens;
        Ok(())
    }

    fn finish(&mut self, buf: &mut BytesMut) -> Result<(), EngineError> {
        if self.taken != self.expected {
            return Err(EngineError::new(
                ErrorCode::Internal,
                format!("the embedding model stopped after {} of {} vectors", self.taken, self.expected),
            ));
        }
        if self.split {
            return Ok(());
        }
        encode_within(
            std::mem::replace(&mut self.whole, Embeddings { index: 0, data: Vec::new(), prompt_tokens: 0 }),
            self.max_frame,
            buf,
        )
    }
}

/// Appends `part` to `buf` as `EMBEDDINGS` frames of at most `max_frame` bytes each: one when it
/// fits, else halves (the first carrying the token count), recursively.
fn encode_within(part: Embeddings, max_frame: usize, buf: &mut BytesMut) -> Result<(), EngineError> {
    // The frame's length field counts the type byte and the JSON payload.
    if json_len(&part) < max_frame {
        Frame::Embeddings(part).encode_into(buf);
        return Ok(());
    }
    let count = part.data.len();
    if count <= 1 {
        return Err(EngineError::new(ErrorCode::Internal, format!("one vector does not fit a {max_frame}-byte frame")));
    }
    let Embeddings { index, mut data, prompt_tokens } = part;
    let rest = data.split_off(count / 2);
    encode_within(Embeddings { index, data, prompt_tokens }, max_frame, buf)?;
    encode_within(Embeddings { index: index + (count / 2) as u32, data: rest, prompt_tokens: 0 }, max_frame, buf)
}

/// Bytes of `value` as JSON, without writing it anywhere.
fn json_len<T: serde::Serialize>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Plain vectors of floats serialize without error (non-finite floats become null).
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

async fn serve_control(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut dec: Decoder,
    backend: Arc<dyn Backend>,
    mut shutdown: watch::Receiver<bool>,
) {
    debug!("control stream");
    loop {
        if write_frame(&mut send, &Frame::Health(backend.health())).await.is_err() {
            return;
        }
        let next = tokio::select! {
            r = read_frame(&mut recv, &mut dec) => r,
            // A control stream lives as long as its connection; on shutdown it ends at once
            // rather than holding the drain until the grace period is over.
            _ = shutdown.wait_for(|stopping| *stopping) => {
                let _ = send.finish();
                return;
            }
        };
        match next {
            Ok(Frame::HealthRequest) => {}
            Ok(other) => {
                let err = EngineError::new(
                    ErrorCode::MalformedFrame,
                    format!("only HEALTH_REQUEST is allowed on the control stream, not {}", other.frame_type().name()),
                );
                return fail_stream(&mut send, &mut recv, err).await;
            }
            Err(ReadEnd::Finished) => {
                let _ = send.finish();
                return;
            }
            Err(ReadEnd::Wire(e)) => return fail_stream(&mut send, &mut recv, e.to_engine_error()).await,
            Err(ReadEnd::Gone(_)) => return,
        }
    }
}
