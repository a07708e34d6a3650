//! The edge's HTTP listener: HTTP/1.1 and HTTP/2 (h2c, or ALPN over TLS), header read timeouts,
//! TCP_NODELAY, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::config::{Config, ConfigError, TlsConfig};
use crate::edge::Edge;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad config.
    #[error(transparent)]
    Config(#[from] ConfigError),
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
}

/// A bound, not yet serving, edge node.
pub struct Server {
    edge: Arc<Edge>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
}

impl Server {
    /// Builds the node and binds its listener.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let tls = config.node.tls.as_ref().map(tls_acceptor).transpose()?;
        let addr = config.node.listen;
        let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
        let edge = Arc::new(Edge::new(config)?);
        Ok(Server { edge, listener, tls })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| self.edge.config().node.listen)
    }

    /// The node's state, for tests and embedding.
    pub fn edge(&self) -> &Arc<Edge> {
        &self.edge
    }

    /// Serves until `shutdown` resolves, then stops accepting and waits (bounded) for requests in
    /// flight to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let node = &self.edge.config().node;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_millis(node.header_read_timeout_ms))
            // One flattened write a response beat writev under load here (scripts/bench).
            .writev(false);
        builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(30)));
        let graceful = GracefulShutdown::new();
        info!(addr = %self.local_addr(), tls = self.tls.is_some(), "edge listening");
        tokio::pin!(shutdown);
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
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let edge = Arc::clone(&self.edge);
            let service = service_fn(move |req| {
                let edge = Arc::clone(&edge);
                async move { Ok::<_, std::convert::Infallible>(edge.handle(req).await) }
            });
            match &self.tls {
                None => {
                    let builder = builder.clone();
                    let watcher = graceful.watcher();
                    let first_byte_timeout = Duration::from_millis(node.header_read_timeout_ms);
                    tokio::spawn(async move {
                        // hyper-util reads the first bytes to tell HTTP/1 from h2c with no timer,
                        // and hyper's header timer starts after that: a peer that never sends a
                        // byte would hold the connection forever.
                        match tokio::time::timeout(first_byte_timeout, stream.peek(&mut [0u8; 1])).await {
                            Ok(Ok(n)) if n > 0 => {}
                            Ok(_) => return,
                            Err(_) => return debug!(%peer, "no request within the header read timeout"),
                        }
                        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                        if let Err(e) = watcher.watch(conn).await {
                            debug!(%peer, error = %e, "connection ended with an error");
                        }
                    });
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    let builder = builder.clone();
                    let handshake_timeout = Duration::from_millis(node.header_read_timeout_ms);
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => return debug!(%peer, "TLS handshake timed out"),
                        };
                        let conn = builder.serve_connection(TokioIo::new(tls), service).into_owned();
                        if let Err(e) = watcher.watch(conn).await {
                            debug!(%peer, error = %e, "connection ended with an error");
                        }
                    });
                }
            }
        }
        info!("shutting down: waiting for requests in flight");
        if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await.is_err() {
            warn!("requests still in flight after 30s; closing them");
        }
    }
}

fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, StartError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| StartError::Tls(format!("cannot read certificate {}: {e}", tls.cert.display())))?;
    if certs.is_empty() {
        return Err(StartError::Tls(format!("no certificate in {}", tls.cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| StartError::Tls(format!("cannot read private key {}: {e}", tls.key.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| StartError::Tls(format!("certificate and key do not match: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
