//! HTTP/3 on the client listener (`[node.tls] http3 = true`): h3 over quinn, on the listen port
//! over UDP, with the TCP listener's certificate. Every request goes to the same [`Edge::handle`]
//! as HTTP/1.1 and HTTP/2, so the limits, auth, error shapes and streams are the same; what this
//! module adds is the transport's own bounds: a handshake and a request's headers within
//! `node.header_read_timeout_ms`, and a client that stops reading (QUIC flow control holds every
//! write) cut off after `node.client_write_timeout_ms`. 0-RTT is off: a replayed request could
//! spend a tenant's budget twice.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use h3::server::RequestStream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::Response;
use quinn::crypto::rustls::QuicServerConfig;
use tracing::debug;

use super::StartError;
use crate::config::TlsConfig;
use crate::edge::{ClientBody, Edge};

/// The largest request header block taken, in bytes (as hyper's HTTP/1 default buffer).
const MAX_HEADER_BYTES: u64 = 64 << 10;

/// The transport's time bounds, from `[node]`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds {
    /// The handshake, and each request's headers.
    pub head: Duration,
    /// Each write the client's flow control holds up.
    pub write: Duration,
}

/// Binds the UDP side of the listener at `addr` with `tls`'s certificate, offering `h3`.
pub(super) fn bind(addr: SocketAddr, tls: &TlsConfig) -> Result<quinn::Endpoint, StartError> {
    let mut config = super::tls_server_config(tls)?;
    config.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = QuicServerConfig::try_from(config).map_err(|e| StartError::Tls(format!("HTTP/3: {e}")))?;
    let server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    quinn::Endpoint::server(server, addr).map_err(|source| StartError::Bind { addr, source })
}

/// Accepts connections until the endpoint is closed.
pub(super) async fn serve(endpoint: quinn::Endpoint, edge: Arc<Edge>, bounds: Bounds) {
    while let Some(incoming) = endpoint.accept().await {
        let edge = Arc::clone(&edge);
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            match tokio::time::timeout(bounds.head, incoming).await {
                Ok(Ok(connection)) => connection_requests(connection, edge, bounds).await,
                Ok(Err(e)) => debug!(%peer, error = %e, "HTTP/3 handshake failed"),
                Err(_) => debug!(%peer, "HTTP/3 handshake timed out"),
            }
        });
    }
}

/// Serves one connection's requests, each in a task of its own.
async fn connection_requests(connection: quinn::Connection, edge: Arc<Edge>, bounds: Bounds) {
    let peer = connection.remote_address();
    let built = h3::server::builder()
        .max_field_section_size(MAX_HEADER_BYTES)
        .build::<_, Bytes>(h3_quinn::Connection::new(connection))
        .await;
    let mut h3 = match built {
        Ok(h3) => h3,
        Err(e) => return debug!(%peer, error = %e, "HTTP/3 connection refused"),
    };
    loop {
        match h3.accept().await {
            Ok(Some(resolver)) => {
                let edge = Arc::clone(&edge);
                tokio::spawn(async move {
                    let (request, stream) = match tokio::time::timeout(bounds.head, resolver.resolve_request()).await {
                        Ok(Ok(resolved)) => resolved,
                        Ok(Err(e)) => return debug!(%peer, error = %e, "HTTP/3 request refused"),
                        Err(_) => return debug!(%peer, "HTTP/3 request headers timed out"),
                    };
                    if let Err(e) = respond(request, stream, &edge, bounds.write).await {
                        debug!(%peer, error = %e, "HTTP/3 response not delivered");
                    }
                });
            }
            Ok(None) => return,
            Err(e) => return debug!(%peer, error = %e, "HTTP/3 connection ended"),
        }
    }
}

/// Hands the request to the edge and writes its answer, each write within `write_timeout`.
async fn respond<S>(
    request: hyper::Request<()>,
    stream: RequestStream<S, Bytes>,
    edge: &Arc<Edge>,
    write_timeout: Duration,
) -> io::Result<()>
where
    S: h3::quic::BidiStream<Bytes> + Send + 'static,
    S::RecvStream: Send + 'static,
{
    let (mut send, recv) = stream.split();
    let response = Arc::clone(edge).handle(request.map(|()| client_body(recv))).await;
    let (parts, mut body) = response.into_parts();
    let bounded = |what: &'static str| move |_| io::Error::new(io::ErrorKind::TimedOut, what);
    let written = tokio::time::timeout(write_timeout, send.send_response(Response::from_parts(parts, ())));
    written.await.map_err(bounded("response headers not taken")).and_then(|r| r.map_err(io::Error::other))?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(io::Error::other)?;
        let sent = match frame.into_data() {
            Ok(data) => tokio::time::timeout(write_timeout, send.send_data(data)).await,
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => tokio::time::timeout(write_timeout, send.send_trailers(trailers)).await,
                Err(_) => continue,
            },
        };
        sent.map_err(bounded("the client stopped reading")).and_then(|r| r.map_err(io::Error::other))?;
    }
    send.finish().await.map_err(io::Error::other)
}

/// A request stream's receiving half as the edge's request body; a stream error ends it with
/// that error.
fn client_body<R>(recv: RequestStream<R, Bytes>) -> ClientBody
where
    R: h3::quic::RecvStream + Send + 'static,
{
    let frames = futures_util::stream::unfold(Some(recv), |recv| async move {
        let mut recv = recv?;
        match recv.recv_data().await {
            Ok(Some(mut chunk)) => Some((Ok(Frame::data(chunk.copy_to_bytes(chunk.remaining()))), Some(recv))),
            Ok(None) => None,
            Err(e) => Some((Err(io::Error::other(e)), None)),
        }
    });
    StreamBody::new(frames).boxed_unsync()
}
