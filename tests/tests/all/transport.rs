//! The listener over real sockets: HTTP/2 cleartext, TLS with ALPN, bad TLS configs, and streams
//! flushed event by event.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Version};
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meridian::config::{Config, TlsConfig};
use meridian::server::{Server, StartError};
use meridian::sse::SseParser;
use meridian_e2e::{Behavior, ConfigExt, Mocks, Reply, TestEdge, ACME_KEY};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const CHAT: &str = "/v1/chat/completions";

fn chat(content: &str, stream: bool) -> Value {
    json!({"model": "gpt-test", "stream": stream, "messages": [{"role": "user", "content": content}]})
}

fn chat_request(base: &str, body: &Value) -> Request<Full<Bytes>> {
    Request::post(format!("{base}{CHAT}"))
        .header("authorization", format!("Bearer {ACME_KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid request")
}

/// Sends `body` to the chat endpoint and returns the reply with the HTTP version it came over.
async fn post_chat<C>(client: &Client<C, Full<Bytes>>, base: &str, body: &Value) -> (Version, Reply)
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let fut = async {
        let resp = client.request(chat_request(base, body)).await.expect("edge answers");
        let version = resp.version();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body reads").to_bytes();
        (version, Reply { status, headers, body })
    };
    timeout(Duration::from_secs(4), fut).await.expect("the edge answers within 4 s")
}

fn streamed_text(r: &Reply) -> String {
    r.event_json().iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned)).collect()
}

#[tokio::test]
async fn http2_cleartext_with_prior_knowledge() {
    let mocks = Mocks::start().await;
    let edge = TestEdge::start(mocks.config()).await;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).http2_only(true).build_http();

    let (version, r) = post_chat(&client, &edge.url(), &chat("over h2c", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(version, Version::HTTP_2);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Echo: over h2c");

    let (version, r) = post_chat(&client, &edge.url(), &chat("streamed over h2c", true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(version, Version::HTTP_2);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.events().last().map(|e| e.data.as_str()), Some("[DONE]"));
    assert_eq!(streamed_text(&r), "Echo: streamed over h2c");
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("meridian-transport-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1: (cert PEM, key PEM).
fn self_signed() -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("certificate generates");
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

/// A TLS client that trusts only `cert_pem`, offering `h2` and/or `http/1.1` by ALPN.
fn tls_client(
    cert_pem: &str,
    http1: bool,
    http2: bool,
) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots.add(cert.expect("PEM certificate")).expect("trusted root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only();
    let connector = match (http1, http2) {
        (true, true) => builder.enable_all_versions().build(),
        (true, false) => builder.enable_http1().build(),
        (false, true) => builder.enable_http2().build(),
        (false, false) => unreachable!("some HTTP version"),
    };
    Client::builder(TokioExecutor::new()).build(connector)
}

async fn tls_edge(mocks: &Mocks, dir: &TempDir, cert_pem: &str, key_pem: &str) -> TestEdge {
    let mut cfg = mocks.config();
    cfg.node.tls = Some(TlsConfig { cert: dir.write("cert.pem", cert_pem), key: dir.write("key.pem", key_pem) });
    TestEdge::start(cfg).await
}

#[tokio::test]
async fn tls_serves_http1_and_http2_by_alpn() {
    let mocks = Mocks::start().await;
    let dir = TempDir::new();
    let (cert, key) = self_signed();
    let edge = tls_edge(&mocks, &dir, &cert, &key).await;
    let base = format!("https://127.0.0.1:{}", edge.addr.port());

    // (a) A client offering only http/1.1.
    let (version, r) = post_chat(&tls_client(&cert, true, false), &base, &chat("tls one", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(version, Version::HTTP_11);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Echo: tls one");

    // (b) A client offering both: the node picks h2 by ALPN.
    let h2 = tls_client(&cert, true, true);
    let (version, r) = post_chat(&h2, &base, &chat("tls two", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(version, Version::HTTP_2, "ALPN negotiates h2");
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Echo: tls two");

    let (version, r) = post_chat(&h2, &base, &chat("tls streamed", true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(version, Version::HTTP_2);
    assert_eq!(streamed_text(&r), "Echo: tls streamed");
}

#[tokio::test]
async fn plain_http_to_the_tls_port_is_refused_and_tls_still_works() {
    let mocks = Mocks::start().await;
    let dir = TempDir::new();
    let (cert, key) = self_signed();
    let edge = tls_edge(&mocks, &dir, &cert, &key).await;

    let body = chat("plain", false).to_string();
    let request = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {ACME_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut sock = TcpStream::connect(edge.addr).await.expect("connects");
    sock.write_all(request.as_bytes()).await.expect("writes");
    let mut got = Vec::new();
    let read = timeout(Duration::from_secs(3), sock.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the node closes a plain-HTTP connection on its TLS port");
    assert!(
        !got.starts_with(b"HTTP/1.1 2") && !got.starts_with(b"HTTP/1.0 2"),
        "plain HTTP on the TLS port must not succeed: {}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(mocks.openai.request_count(), 0, "nothing reached the upstream");

    let (version, r) = post_chat(
        &tls_client(&cert, false, true),
        &format!("https://127.0.0.1:{}", edge.addr.port()),
        &chat("after", false),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(version, Version::HTTP_2);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Echo: after");
}

async fn start_error(cfg: Config) -> StartError {
    match Server::bind(cfg).await {
        Ok(server) => panic!("the node started on {} with a bad TLS config", server.local_addr()),
        Err(e) => e,
    }
}

#[tokio::test]
async fn bad_tls_config_fails_at_start_naming_the_problem() {
    let mocks = Mocks::start().await;
    let dir = TempDir::new();
    let (cert, key) = self_signed();
    let cert_path = dir.write("cert.pem", &cert);
    let key_path = dir.write("key.pem", &key);

    // A missing certificate file.
    let missing = dir.0.join("no-such-cert.pem");
    let mut cfg = mocks.config();
    cfg.node.tls = Some(TlsConfig { cert: missing.clone(), key: key_path.clone() });
    let e = start_error(cfg).await;
    assert!(matches!(e, StartError::Tls(_)), "{e:?}");
    assert!(e.to_string().contains(&missing.display().to_string()), "names the file: {e}");

    // A missing key file.
    let missing = dir.0.join("no-such-key.pem");
    let mut cfg = mocks.config();
    cfg.node.tls = Some(TlsConfig { cert: cert_path.clone(), key: missing.clone() });
    let e = start_error(cfg).await;
    assert!(matches!(e, StartError::Tls(_)), "{e:?}");
    assert!(e.to_string().contains(&missing.display().to_string()), "names the file: {e}");

    // A key that does not belong to the certificate.
    let (_, other_key) = self_signed();
    let mut cfg = mocks.config();
    cfg.node.tls = Some(TlsConfig { cert: cert_path, key: dir.write("other-key.pem", &other_key) });
    let e = start_error(cfg).await;
    assert!(matches!(e, StartError::Tls(_)), "{e:?}");
    assert!(e.to_string().contains("match"), "says the key does not match: {e}");
}

#[tokio::test]
async fn stream_events_are_flushed_as_they_arrive() {
    let mocks = Mocks::start().await;
    let mut cfg = mocks.config();
    cfg.target_mut("oa").chunk_timeout_ms = 30_000;
    let edge = TestEdge::start(cfg).await;
    // Two content events ("Echo: " and "one "), then the upstream stream stays open, silent.
    mocks.openai.push(Behavior::StallAfter(2));

    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = timeout(Duration::from_secs(2), client.request(chat_request(&edge.url(), &chat("one two three", true))))
        .await
        .expect("headers arrive while the upstream stream is still open")
        .expect("edge answers");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();

    let mut parser = SseParser::default();
    let mut text = String::new();
    // Far below the 30 s chunk timeout: a node that buffered the stream would not answer in time.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while text != "Echo: one " {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| panic!("the first deltas arrive promptly; got so far {text:?}"))
            .expect("the stream is still open")
            .expect("the stream reads");
        let Ok(data) = frame.into_data() else { continue };
        for e in &parser.push(&data).expect("a valid event stream") {
            let v: Value = serde_json::from_str(&e.data).expect("JSON chunk");
            if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
                text.push_str(piece);
            }
        }
        assert!(text.len() <= "Echo: one ".len(), "more than the upstream sent: {text:?}");
    }
    // Dropping the reader mid-stream must be harmless; the node keeps serving.
    drop(body);
    let r = edge.post(CHAT, ACME_KEY, &chat("still here", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Completes a TLS handshake offering `alpn`, then sends nothing: the node must close the
/// connection within its header read timeout (1 s in the test config), whichever protocol ALPN
/// chose.
#[tokio::test]
async fn a_silent_connection_after_the_tls_handshake_is_closed() {
    let mocks = Mocks::start().await;
    let dir = TempDir::new();
    let (cert, key) = self_signed();
    let edge = tls_edge(&mocks, &dir, &cert, &key).await;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(cert.as_bytes()) {
        roots.add(c.expect("PEM certificate")).expect("trusted root");
    }
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let sock = TcpStream::connect(edge.addr).await.expect("connects");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
        let mut tls = connector.connect(name, sock).await.expect("handshake completes");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        let start = std::time::Instant::now();
        let mut buf = [0u8; 256];
        let mut closed = false;
        // An HTTP/2 server may send its SETTINGS first; read until the node closes.
        while start.elapsed() < Duration::from_secs(4) {
            match timeout(Duration::from_secs(4), tls.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(_)) => continue,
                Err(_) => break,
            }
        }
        assert!(closed, "a silent {} connection is closed", String::from_utf8_lossy(alpn));
        assert!(start.elapsed() < Duration::from_secs(3), "closed only after {:?}", start.elapsed());
    }
}
