//! The edge's HTTP listener: HTTP/1.1 and HTTP/2 (h2c, or ALPN over TLS), and with TLS HTTP/3 over
//! UDP on the same port (`h3.rs`, advertised with `Alt-Svc`); header read timeouts, write
//! timeouts for clients that stop reading, TCP_NODELAY, and graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::header::HeaderValue;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

mod deadlines;
mod h3;

use deadlines::{BodyDeadline, WriteDeadline};

use crate::config::{Config, TlsConfig};
use crate::edge::{BuildError, Edge};
use crate::relay::RelayBackend;
use meridian_engine::server::{EngineServer, ServerLimits};
use meridian_engine::tls::Identity;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad config, or a plugin that cannot be loaded.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be loaded.
    #[error("node.tls: {0}")]
    Tls(String),
    /// The relay listener could not start (its identity, or its UDP address).
    #[error("relay: {0}")]
    Relay(String),
}

/// A bound, not yet serving, edge node.
pub struct Server {
    edge: Arc<Edge>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    /// HTTP/3's UDP endpoint, on the listener's port (`[node.tls] http3`).
    h3: Option<quinn::Endpoint>,
    relay: Option<EngineServer>,
}

impl Server {
    /// Builds the node and binds its listener.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let tls = config.node.tls.as_ref().map(tls_acceptor).transpose()?;
        let addr = config.node.listen;
        let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
        // The UDP side takes the port the TCP side got (they are separate namespaces).
        let h3 = match &config.node.tls {
            Some(t) if t.http3 => Some(h3::bind(listener.local_addr().unwrap_or(addr), t)?),
            _ => None,
        };
        let edge = Arc::new(Edge::new(config).await?);
        let relay = relay_listener(&edge)?;
        Ok(Server { edge, listener, tls, h3, relay })
    }

    /// The bound address of the relay listener, if `[relay]` is configured.
    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.relay.as_ref().and_then(|r| r.local_addr().ok())
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| self.edge.config().node.listen)
    }

    /// The node's state, for tests and embedding.
    pub fn edge(&self) -> &Arc<Edge> {
        &self.edge
    }

    /// Serves until `shutdown` resolves, then drains ([`Edge::drain`]): `/readyz` answers 503 and
    /// new requests are refused while requests in flight get `node.shutdown_grace_ms` to finish
    /// (then they end with `shutting_down`); then it stops accepting and closes its connections.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let node = &self.edge.config().node;
        let head_timeout = Duration::from_millis(node.header_read_timeout_ms);
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(head_timeout)
            // One flattened write a response beat writev under load here (scripts/bench).
            .writev(false);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(30)));
        let write_timeout = Duration::from_millis(node.client_write_timeout_ms);
        // Clients that speak HTTP/3 learn here that they may (RFC 9114 §3.1.1).
        let alt_svc = self
            .h3
            .as_ref()
            .and_then(|_| HeaderValue::from_str(&format!("h3=\":{}\"; ma=86400", self.local_addr().port())).ok());
        let protocols = Arc::new(Protocols { http1, http2, write_timeout, alt_svc });
        if let Some(endpoint) = &self.h3 {
            let bounds = h3::Bounds { head: head_timeout, write: write_timeout };
            tokio::spawn(h3::serve(endpoint.clone(), Arc::clone(&self.edge), bounds));
            info!(addr = %self.local_addr(), "HTTP/3 listening (UDP)");
        }
        let graceful = GracefulShutdown::new();
        let reloader = self.edge.has_plugins().then(|| tokio::spawn(reload_triggers(Arc::clone(&self.edge))));
        let relay = match self.relay.take().map(EngineServer::spawn) {
            Some(Ok(handle)) => Some(handle),
            Some(Err(e)) => {
                warn!(error = %e, "the relay listener could not start: peer edges cannot relay to this node");
                None
            }
            None => None,
        };
        info!(addr = %self.local_addr(), tls = self.tls.is_some(), "edge listening");
        let grace = Duration::from_millis(node.shutdown_grace_ms);
        let edge = Arc::clone(&self.edge);
        // The listener keeps answering during the drain, so that load balancers read the 503 of
        // `/readyz` and clients the 503 of a refused request, rather than a refused connection.
        let drained = async move {
            shutdown.await;
            edge.drain(grace).await;
        };
        tokio::pin!(drained);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut drained => break,
            };
            let _ = stream.set_nodelay(true);
            let edge = Arc::clone(&self.edge);
            let protocols = Arc::clone(&protocols);
            let watcher = graceful.watcher();
            let tls = self.tls.clone();
            tokio::spawn(async move {
                // Every wait before hyper's own header timer runs is bounded by the same limit, so
                // a peer that connects and stalls (before TLS, after it, or inside the HTTP/2
                // preface) cannot hold a connection.
                let result = match tls {
                    None => match tokio::time::timeout(head_timeout, sniff(&stream)).await {
                        Ok(Some(protocol)) => protocols.serve(protocol, stream, edge, watcher).await,
                        Ok(None) => return,
                        Err(_) => return debug!(%peer, "no request within the header read timeout"),
                    },
                    Some(acceptor) => match tokio::time::timeout(head_timeout, acceptor.accept(stream)).await {
                        // hyper's HTTP/1 header timer covers a silent client; HTTP/2 has none
                        // for its preface, so the preface gets the same limit here.
                        Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                            let io = ReadDeadline::new(tls, H2_PREFACE.len(), head_timeout);
                            protocols.serve(Protocol::Http2, io, edge, watcher).await
                        }
                        Ok(Ok(tls)) => protocols.serve(Protocol::Http1, tls, edge, watcher).await,
                        Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => return debug!(%peer, "TLS handshake timed out"),
                    },
                };
                if let Err(e) = result {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
        if let Some(reloader) = reloader {
            reloader.abort();
        }
        info!("shutting down: closing connections");
        let http = async {
            // What was in flight has ended or been told to: this is only the time for the last
            // bytes (a `shutting_down` event) to reach the clients.
            if tokio::time::timeout(CLOSE_TIMEOUT, graceful.shutdown()).await.is_err() {
                warn!("connections still open {CLOSE_TIMEOUT:?} after the drain; closing them");
            }
        };
        let relayed = async {
            if let Some(relay) = relay {
                relay.shutdown().await;
            }
        };
        let h3 = async {
            if let Some(endpoint) = &self.h3 {
                endpoint.close(0u32.into(), b"shutting down");
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
            }
        };
        tokio::join!(http, relayed, h3);
        self.edge.close().await;
    }
}

/// How long connections have to close once the drain is over.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The QUIC listener for requests relayed by peer edges, if `[relay]` is configured; it speaks
/// the engine protocol with the edge as its backend, under the node's cluster identity.
fn relay_listener(edge: &Arc<Edge>) -> Result<Option<EngineServer>, StartError> {
    let config = edge.config();
    let (Some(relay), Some(quic)) = (&config.relay, &config.quic) else { return Ok(None) };
    let identity = Identity::from_pem_files(&quic.ca, &quic.cert, &quic.key)
        .map_err(|e| StartError::Relay(format!("the [quic] identity: {e}")))?;
    let backend = Arc::new(RelayBackend::new(edge));
    let server = EngineServer::bind(relay.listen, &identity, backend, ServerLimits::default())
        .map_err(|e| StartError::Relay(e.to_string()))?;
    info!(addr = %relay.listen, "relay listener bound");
    Ok(Some(server))
}

/// Reloads the node's plugins on SIGHUP and when a plugin file changes (checked every
/// `plugin_runtime.reload_poll_ms`). The admin endpoint is the third trigger, in the request path.
async fn reload_triggers(edge: Arc<Edge>) {
    let poll = Duration::from_millis(edge.config().plugin_runtime.reload_poll_ms);
    let mut ticker = tokio::time::interval(if poll.is_zero() { Duration::from_secs(3600) } else { poll });
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut seen = file_stamps(edge.config());
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        tokio::select! {
            Some(()) = hup => info!("SIGHUP: reloading plugins"),
            _ = ticker.tick() => {
                let now = file_stamps(edge.config());
                if poll.is_zero() || now == seen {
                    continue;
                }
                info!("a plugin file changed: reloading plugins");
            }
        }
        seen = file_stamps(edge.config());
        // A failed reload keeps the loaded versions and logs why; nothing more to do here.
        let _ = edge.reload_plugins().await;
    }
}

/// Modification time and length of each plugin file, to notice a changed one.
fn file_stamps(config: &Config) -> Vec<Option<(std::time::SystemTime, u64)>> {
    config
        .plugins
        .values()
        .map(|p| std::fs::metadata(&p.path).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

/// The HTTP version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// The HTTP/2 connection preface a cleartext (h2c, prior knowledge) client opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Tells HTTP/2 from HTTP/1 by the first bytes, without consuming them; `None` if the peer closed.
/// The caller bounds the wait.
async fn sniff(stream: &TcpStream) -> Option<Protocol> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Some(Protocol::Http1);
        }
        if n == H2_PREFACE.len() {
            return Some(Protocol::Http2);
        }
        // A preface split across segments: peek returns at once while data is pending, so wait
        // a moment for the rest instead of spinning.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// An IO that fails its reads with `TimedOut` unless the peer has sent `bytes` bytes before the
/// deadline; after that it is the plain IO.
struct ReadDeadline<I> {
    io: I,
    remaining: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> ReadDeadline<I> {
    fn new(io: I, bytes: usize, within: Duration) -> Self {
        ReadDeadline { io, remaining: bytes, deadline: Some(Box::pin(tokio::time::sleep(within))) }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ReadDeadline<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.remaining = self.remaining.saturating_sub(read);
        if self.remaining == 0 {
            self.deadline = None;
        }
        if let (Poll::Pending, Some(deadline)) = (&polled, self.deadline.as_mut()) {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the header read timeout",
                )));
            }
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ReadDeadline<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The connection builders, shared by every connection.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// `node.client_write_timeout_ms`: see [`deadlines`].
    write_timeout: Duration,
    /// `Alt-Svc` for every response, when HTTP/3 is served too.
    alt_svc: Option<HeaderValue>,
}

impl Protocols {
    async fn serve<I>(&self, protocol: Protocol, io: I, edge: Arc<Edge>, watcher: Watcher) -> hyper::Result<()>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limit = self.write_timeout;
        let alt_svc = self.alt_svc.clone();
        let service = service_fn(move |req| {
            let (edge, alt_svc) = (Arc::clone(&edge), alt_svc.clone());
            async move {
                let req = req.map(|body: hyper::body::Incoming| body.map_err(io::Error::other).boxed_unsync());
                let mut response = edge.handle(req).await;
                if let Some(alt_svc) = alt_svc {
                    response.headers_mut().insert(hyper::header::ALT_SVC, alt_svc);
                }
                Ok::<_, std::convert::Infallible>(response.map(|body| BodyDeadline::new(body, limit)))
            }
        });
        let io = TokioIo::new(WriteDeadline::new(io, limit));
        match protocol {
            Protocol::Http1 => watcher.watch(self.http1.serve_connection(io, service)).await,
            Protocol::Http2 => watcher.watch(self.http2.serve_connection(io, service)).await,
        }
    }
}

fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, StartError> {
    let mut config = tls_server_config(tls)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The TLS server side of `tls`'s certificate and key, with no ALPN yet.
fn tls_server_config(tls: &TlsConfig) -> Result<rustls::ServerConfig, StartError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| StartError::Tls(format!("cannot read certificate {}: {e}", tls.cert.display())))?;
    if certs.is_empty() {
        return Err(StartError::Tls(format!("no certificate in {}", tls.cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| StartError::Tls(format!("cannot read private key {}: {e}", tls.key.display())))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| StartError::Tls(format!("certificate and key do not match: {e}")))
}
