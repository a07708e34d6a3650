//! Mutual TLS for engine connections: a node [`Identity`] from PEM files, and the quinn server and
//! client configurations built from it.
//!
//! Both sides trust only the cluster CA (never the system roots) and both present a certificate
//! signed by it. The server checks the client's chain (and its clientAuth EKU); the client checks
//! the server's chain and that the server's certificate names the host it dialed (SAN check).
//! TLS 1.3 only (QUIC requires it), the ring provider, ALPN [`ALPN`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::server::ServerLimits;

/// The ALPN protocol id of this protocol's version 1 transport.
pub const ALPN: &[u8] = b"meridian/1";

/// Keep-alive interval. An edge holds its engine connection open between requests; a PING every
/// 5 s keeps NAT and firewall state alive and lets a dead path show up well before the idle
/// timeout, so `rtt()` and health stay current even when no requests flow.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// Idle timeout: a connection with no packets (keep-alives included) for this long is dead. Three
/// missed keep-alive rounds and then some, so one lost packet never kills a healthy connection,
/// while a crashed peer is noticed within 20 s and the edge reconnects or fails over.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Flow-control window per stream. A chat answer is small (kilobytes); an embeddings answer for a
/// batch can be a few hundred KiB of JSON, which should not stall on window updates. 2 MiB also
/// covers one maximal (1 MiB default) frame with room.
pub const STREAM_RECEIVE_WINDOW: u32 = 2 * 1024 * 1024;

/// Why an identity could not be loaded or a configuration built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file's PEM could not be parsed.
    #[error("{path}: bad PEM: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file holds no certificate.
    #[error("{path}: no certificate in it")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A file holds no private key.
    #[error("{path}: no private key in it (PKCS#8, PKCS#1 or SEC1 PEM expected)")]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the material (a key that does not match the certificate, a CA it cannot use).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A node's TLS identity: the cluster CA it trusts and its own certificate chain and key.
#[derive(Debug)]
pub struct Identity {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity { ca: self.ca.clone(), chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl Identity {
    /// Loads the cluster CA certificate(s), the node's certificate chain (leaf first) and its
    /// private key from PEM files. Errors name the file.
    pub fn from_pem_files(ca: &Path, chain: &Path, key: &Path) -> Result<Identity, TlsError> {
        let read = |p: &Path| std::fs::read(p).map_err(|source| TlsError::Read { path: p.to_owned(), source });
        Identity::parse((&read(ca)?, ca), (&read(chain)?, chain), (&read(key)?, key))
    }

    /// Loads node `name`'s identity from a directory laid out by [`crate::certs`]: `ca.pem`,
    /// `NAME.pem`, `NAME.key`.
    pub fn from_dir(dir: &Path, name: &str) -> Result<Identity, TlsError> {
        let (ca, _) = crate::certs::ca_paths(dir);
        let (cert, key) = crate::certs::node_paths(dir, name);
        Identity::from_pem_files(&ca, &cert, &key)
    }

    /// The same from PEM text in memory (errors name the source as `<memory:ca>` and so on).
    pub fn from_pem(ca_pem: &str, chain_pem: &str, key_pem: &str) -> Result<Identity, TlsError> {
        Identity::parse(
            (ca_pem.as_bytes(), Path::new("<memory:ca>")),
            (chain_pem.as_bytes(), Path::new("<memory:chain>")),
            (key_pem.as_bytes(), Path::new("<memory:key>")),
        )
    }

    fn parse(ca: (&[u8], &Path), chain: (&[u8], &Path), key: (&[u8], &Path)) -> Result<Identity, TlsError> {
        let ca_certs = certs(ca.0, ca.1)?;
        let chain_certs = certs(chain.0, chain.1)?;
        let key_path = key.1;
        let mut reader = key.0;
        let key = rustls_pemfile::private_key(&mut reader)
            .map_err(|e| TlsError::Pem { path: key_path.to_owned(), reason: e.to_string() })?
            .ok_or_else(|| TlsError::NoKey { path: key_path.to_owned() })?;
        let identity = Identity { ca: ca_certs, chain: chain_certs, key };
        // Catch a key that does not belong to the certificate, or a CA rustls cannot use, now,
        // with the files named, rather than at the first handshake.
        identity.roots().map_err(|e| TlsError::Config(format!("{}: {e}", ca.1.display())))?;
        rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(identity.key.clone_key())
            .and_then(|signing_key| rustls::sign::CertifiedKey::new(identity.chain.clone(), signing_key).keys_match())
            .map_err(|e| TlsError::Config(format!("{} and {}: {e}", chain.1.display(), key_path.display())))?;
        Ok(identity)
    }

    /// The node certificate's subject common name, if readable (for logs).
    pub fn name(&self) -> Option<String> {
        self.chain.first().and_then(|c| crate::certs::subject_common_name(c))
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        Ok(Arc::new(roots))
    }
}

fn certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut reader = pem;
    let certs = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_owned(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // Explicit rather than the process default: the workspace may link rustls with another
    // provider too, and then the implicit default is ambiguous.
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// Transport settings shared by both ends.
fn transport(max_bidi_streams: u32) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits a QUIC varint")));
    t.max_concurrent_bidi_streams(max_bidi_streams.into());
    // The protocol uses no unidirectional streams; refusing them closes a door.
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
    t
}

/// The server side: requires a client certificate signed by the cluster CA, offers only
/// [`ALPN`], allows `limits.max_streams_per_connection` concurrent request streams per connection
/// (a client opening more waits for credit; it is not refused).
pub fn server_config(identity: &Identity, limits: &ServerLimits) -> Result<quinn::ServerConfig, TlsError> {
    let roots = identity.roots().map_err(config_err)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider()).build().map_err(config_err)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(config_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No 0-RTT: a replayed request would run a generation twice.
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(config_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport(limits.max_streams_per_connection)));
    Ok(config)
}

/// The client side: trusts only the cluster CA, presents the node certificate, offers only
/// [`ALPN`]. The server name given at connect is checked against the server certificate's SANs.
pub fn client_config(identity: &Identity) -> Result<quinn::ClientConfig, TlsError> {
    let roots = identity.roots().map_err(config_err)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(config_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(config_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    // The server never opens streams towards the client.
    config.transport_config(Arc::new(transport(0)));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs;

    #[test]
    fn identity_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("meridian-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        certs::write_ca(&dir, false).unwrap();
        certs::write_node(&dir, "n1", &["localhost".into()], &[], false).unwrap();
        certs::write_node(&dir, "n2", &["localhost".into()], &[], false).unwrap();
        let id = Identity::from_dir(&dir, "n1").unwrap();
        assert_eq!(id.name().as_deref(), Some("n1"));
        server_config(&id, &ServerLimits::default()).unwrap();
        client_config(&id).unwrap();

        let err = Identity::from_dir(&dir, "missing").unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        // A key file in place of a certificate.
        let err = Identity::from_pem_files(&dir.join("ca.pem"), &dir.join("n1.key"), &dir.join("n1.key")).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }) && err.to_string().contains("n1.key"), "{err}");
        let err = Identity::from_pem_files(&dir.join("ca.pem"), &dir.join("n1.pem"), &dir.join("n1.pem")).unwrap_err();
        assert!(matches!(err, TlsError::NoKey { .. }) && err.to_string().contains("n1.pem"), "{err}");
        // n1's certificate with n2's key.
        let err = Identity::from_pem_files(&dir.join("ca.pem"), &dir.join("n1.pem"), &dir.join("n2.key")).unwrap_err();
        assert!(matches!(err, TlsError::Config(_)) && err.to_string().contains("n2.key"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
