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
    TestEdge::start(tls_config(mocks, dir, cert_pem, key_pem, false)).await
}

/// The standard config serving HTTPS with the certificate, and HTTP/3 too if `http3`.
fn tls_config(mocks: &Mocks, dir: &TempDir, cert_pem: &str, key_pem: &str, http3: bool) -> Config {
    let mut cfg = mocks.config();
    let (cert, key) = (dir.write("cert.pem", cert_pem), dir.write("key.pem", key_pem));
    cfg.node.tls = Some(TlsConfig { cert, key, http3 });
    cfg
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
    cfg.node.tls = Some(TlsConfig { cert: missing.clone(), key: key_path.clone(), http3: false });
    let e = start_error(cfg).await;
    assert!(matches!(e, StartError::Tls(_)), "{e:?}");
    assert!(e.to_string().contains(&missing.display().to_string()), "names the file: {e}");

    // A missing key file.
    let missing = dir.0.join("no-such-key.pem");
    let mut cfg = mocks.config();
    cfg.node.tls = Some(TlsConfig { cert: cert_path.clone(), key: missing.clone(), http3: false });
    let e = start_error(cfg).await;
    assert!(matches!(e, StartError::Tls(_)), "{e:?}");
    assert!(e.to_string().contains(&missing.display().to_string()), "names the file: {e}");

    // A key that does not belong to the certificate.
    let (_, other_key) = self_signed();
    let mut cfg = mocks.config();
    cfg.node.tls = Some(TlsConfig { cert: cert_path, key: dir.write("other-key.pem", &other_key), http3: false });
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

/// What aioquic's client (`tests/sdk/h3_client.py`) got for `requests`, sent in order on one
/// HTTP/3 connection to `port` trusting `cert`.
async fn over_http3(port: u16, cert: &std::path::Path, requests: Value) -> Vec<Reply> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/h3_client.py");
    let cafile = cert.display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(meridian_e2e::python())
            .args([script, "127.0.0.1", &port.to_string(), &cafile])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python runs");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), requests.to_string().as_bytes()).unwrap();
        child.wait_with_output().expect("the client ends")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "HTTP/3 client failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).expect("the client prints JSON");
    got["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Reply {
            status: r["status"].as_u64().unwrap() as u16,
            headers: r["headers"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.parse().unwrap(), v.as_str().unwrap().parse().unwrap()))
                .collect(),
            body: Bytes::from(r["body"].as_str().unwrap().to_string()),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_serves_both_shapes_whole_and_streamed_with_the_same_limits_and_errors() {
    let mocks = Mocks::start().await;
    let dir = TempDir::new();
    let (cert, key) = self_signed();
    let edge = TestEdge::start(tls_config(&mocks, &dir, &cert, &key, true)).await;
    let port = edge.addr.port();

    // The TCP listener advertises HTTP/3 on the same port.
    let tcp = tls_client(&cert, true, true);
    let (_, r) = post_chat(&tcp, &format!("https://127.0.0.1:{port}"), &chat("over tcp", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("alt-svc"), Some(format!("h3=\":{port}\"; ma=86400").as_str()));

    let key = format!("Bearer {ACME_KEY}");
    let anthropic = |stream: bool| {
        json!({"model": "claude-test", "max_tokens": 64, "stream": stream,
               "messages": [{"role": "user", "content": "over h3, anthropic"}]})
    };
    let post = |path: &str, auth: &str, body: String| {
        json!({"method": "POST", "path": path, "body": body,
               "headers": {"authorization": auth, "content-type": "application/json"}})
    };
    let too_big = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "x".repeat(70_000)}]});
    let requests = json!([
        post("/v1/chat/completions", &key, chat("over h3", false).to_string()),
        post("/v1/chat/completions", &key, chat("streamed over h3", true).to_string()),
        post("/v1/messages", &key, anthropic(false).to_string()),
        post("/v1/messages", &key, anthropic(true).to_string()),
        post("/v1/chat/completions", "Bearer sk-not-a-key", chat("bad key", false).to_string()),
        post("/v1/chat/completions", &key, too_big.to_string()),
        post("/v1/chat/completions", &key, "{not json".to_string()),
        {"method": "GET", "path": "/v1/models", "headers": {"authorization": key}},
    ]);
    let got = over_http3(port, &dir.0.join("cert.pem"), requests).await;
    assert_eq!(got.len(), 8);
    assert_eq!(got[0].status, 200, "{}", got[0].text());
    assert_eq!(got[0].json()["choices"][0]["message"]["content"], "Echo: over h3");
    assert_eq!(got[1].status, 200, "{}", got[1].text());
    assert_eq!(got[1].header("content-type"), Some("text/event-stream"));
    assert_eq!(streamed_text(&got[1]), "Echo: streamed over h3");
    assert_eq!(got[1].events().last().map(|e| e.data.as_str()), Some("[DONE]"));
    assert_eq!(got[2].status, 200, "{}", got[2].text());
    assert_eq!(got[2].json()["content"][0]["text"], "Echo: over h3, anthropic");
    assert_eq!(got[3].status, 200, "{}", got[3].text());
    let kinds: Vec<String> = got[3].events().iter().filter_map(|e| e.event.clone()).collect();
    assert_eq!(kinds.first().map(String::as_str), Some("message_start"));
    assert_eq!(kinds.last().map(String::as_str), Some("message_stop"));
    assert!(got.iter().all(|r| r.header("x-request-id").is_some()));

    // The errors are those of HTTP/1.1, status and body shape alike. (An HTTP/1.1 client still
    // writing a body the edge refused at its declared length gets a broken pipe, not the 413:
    // that one is checked by its code alone.)
    let http1 = tls_client(&cert, true, false);
    let base = format!("https://127.0.0.1:{port}");
    assert_eq!(got[5].json()["error"]["code"], "payload_too_large", "{}", got[5].text());
    let bodies =
        [(4, "Bearer sk-not-a-key", chat("bad key", false).to_string()), (6, key.as_str(), "{not json".to_string())];
    for (i, auth, body) in bodies {
        let request = Request::post(format!("{base}/v1/chat/completions"))
            .header("authorization", auth)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = http1.request(request).await.expect("an HTTP/1.1 answer");
        let status = response.status().as_u16();
        let tcp: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(got[i].status, status, "request {i}: {}", got[i].text());
        assert_eq!(got[i].json()["error"]["code"], tcp["error"]["code"], "request {i}: {}", got[i].text());
        assert_eq!(got[i].json()["error"]["type"], tcp["error"]["type"]);
    }
    assert_eq!((got[4].status, got[5].status, got[6].status), (401, 413, 400));
    assert_eq!(got[7].status, 200);
    assert!(got[7].json()["data"].as_array().unwrap().iter().any(|m| m["id"] == "gpt-test"));
}
