//! The engine's QUIC transport over real sockets on loopback, with real certificates made by
//! `certs` into a temporary directory, and the real engine (SmolLM2-135M int4 on ONNX Runtime)
//! behind it. The backend comes from one place, [`real_backend`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use meridian_engine::api::{
    Backend, ChatRequest, EmbedParts, EmbedRequest, EngineError, Envelope, ErrorCode, Event, Health, Message, Request,
    PROTOCOL_VERSION,
};
use meridian_engine::client::{ClientError, ClientOptions, EngineClient};
use meridian_engine::server::{EngineServer, ServerHandle, ServerLimits};
use meridian_engine::tls::{self, Identity};
use meridian_engine::wire::{Decoder, Frame, DEFAULT_MAX_FRAME};
use meridian_engine::{certs, config, scheduler};
use tokio::sync::mpsc;

const CHAT_MODEL: &str = "smollm2";

/// The backend every test serves: the real engine with one chat model. The only place to change
/// if the engine's construction changes.
fn real_backend() -> Arc<dyn Backend> {
    static ENGINE: OnceLock<Arc<scheduler::Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let home = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.meridian");
            // The repo's `.meridian` (tests run in engine/): where scripts/setup-engine put the
            // ONNX Runtime library and the models.
            meridian_engine::runtime::set_meridian_home(home.clone());
            let dir = home.join("models/smollm2-135m-instruct/int4");
            let cfg = config::EngineConfig {
                models: vec![config::ModelConfig { name: CHAT_MODEL.into(), path: dir, kind: None }],
                ..Default::default()
            };
            scheduler::Engine::start(&cfg).expect("the engine starts (run scripts/setup-engine for the model)")
        })
        .clone()
}

/// The real engine with the embedding model, read in runs of at most 32 texts.
fn embed_backend() -> Arc<dyn Backend> {
    static ENGINE: OnceLock<Arc<scheduler::Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let home = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.meridian");
            meridian_engine::runtime::set_meridian_home(home.clone());
            let cfg = config::EngineConfig {
                models: vec![config::ModelConfig {
                    name: EMBED_MODEL.into(),
                    path: home.join("models/all-minilm-l6-v2"),
                    kind: None,
                }],
                ..Default::default()
            };
            scheduler::Engine::start(&cfg).expect("the engine starts (run scripts/setup-engine for the model)")
        })
        .clone()
}

const EMBED_MODEL: &str = "minilm";

/// Wraps the real backend and records what the server does with the receivers it gets: whether it
/// dropped one while the generation was still running, and when. With `hold_after_first_delta` it
/// passes on the first delta of its first chat and then nothing, so the server can only learn of a
/// cancel from the peer, not from a next delta.
struct Probe {
    inner: Arc<dyn Backend>,
    hold_after_first_delta: bool,
    dropped_midway: Arc<Mutex<Vec<Instant>>>,
    chats: AtomicUsize,
}

impl Probe {
    fn new(inner: Arc<dyn Backend>, hold_after_first_delta: bool) -> Arc<Probe> {
        Arc::new(Probe {
            inner,
            hold_after_first_delta,
            dropped_midway: Default::default(),
            chats: AtomicUsize::new(0),
        })
    }
}

impl Backend for Probe {
    fn chat(&self, request: ChatRequest) -> Result<mpsc::Receiver<Event>, EngineError> {
        let mut inner = self.inner.chat(request)?;
        let first = self.chats.fetch_add(1, Ordering::SeqCst) == 0;
        let (tx, rx) = mpsc::channel(64);
        let dropped = self.dropped_midway.clone();
        let hold = self.hold_after_first_delta && first;
        tokio::spawn(async move {
            let mut sent_delta = false;
            loop {
                let reading = !(hold && sent_delta);
                tokio::select! {
                    _ = tx.closed() => {
                        // The server let go before the end: record it; dropping `inner` on return
                        // cancels the engine's generation.
                        dropped.lock().unwrap().push(Instant::now());
                        return;
                    }
                    ev = inner.recv(), if reading => match ev {
                        Some(ev) => {
                            let terminal = !matches!(ev, Event::Delta(_));
                            sent_delta |= matches!(ev, Event::Delta(_));
                            if tx.send(ev).await.is_err() {
                                if !terminal {
                                    dropped.lock().unwrap().push(Instant::now());
                                }
                                return;
                            }
                            if terminal {
                                return;
                            }
                        }
                        None => return,
                    },
                }
            }
        });
        Ok(rx)
    }

    fn embed(&self, request: EmbedRequest) -> Result<EmbedParts, EngineError> {
        self.inner.embed(request)
    }

    fn health(&self) -> Health {
        self.inner.health()
    }
}

// --- certificates ---

struct Pki {
    dir: PathBuf,
    other: PathBuf,
}

impl Pki {
    /// A cluster CA with nodes `engine` (localhost, 127.0.0.1) and `edge`, and another CA with the
    /// same node names.
    fn new(tag: &str) -> Pki {
        static N: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "meridian-quic-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&root);
        let (dir, other) = (root.join("cluster"), root.join("other"));
        for d in [&dir, &other] {
            certs::write_ca(d, false).unwrap();
            certs::write_node(d, "engine", &["localhost".into()], &["127.0.0.1".parse().unwrap()], false).unwrap();
            certs::write_node(d, "edge", &["edge.local".into()], &[], false).unwrap();
        }
        Pki { dir, other }
    }

    fn node(&self, name: &str) -> Identity {
        Identity::from_dir(&self.dir, name).unwrap()
    }

    /// Trusts the cluster CA but presents `name`'s certificate from the other CA.
    fn foreign(&self, name: &str) -> Identity {
        let (cert, key) = certs::node_paths(&self.other, name);
        Identity::from_pem_files(&certs::ca_paths(&self.dir).0, &cert, &key).unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.dir.parent().unwrap());
    }
}

fn serve(identity: &Identity, backend: Arc<dyn Backend>, limits: ServerLimits) -> ServerHandle {
    EngineServer::bind("127.0.0.1:0".parse().unwrap(), identity, backend, limits).unwrap().spawn().unwrap()
}

fn client(server: &ServerHandle, identity: &Identity) -> EngineClient {
    let mut opts = ClientOptions::new(server.local_addr().to_string(), "localhost");
    opts.connect_timeout = Duration::from_secs(5);
    opts.request_timeout = Some(Duration::from_secs(60));
    EngineClient::new(opts, identity).unwrap()
}

fn chat_request(content: &str, max_tokens: u32) -> ChatRequest {
    ChatRequest {
        model: CHAT_MODEL.into(),
        messages: vec![Message { role: "user".into(), content: content.into() }],
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

/// A raw connection with the given client identity, for writing bytes the client never would.
async fn raw_connect(server: &ServerHandle, identity: &Identity) -> Result<quinn::Connection, String> {
    raw_connect_with(server, tls::client_config(identity).unwrap()).await
}

async fn raw_connect_with(server: &ServerHandle, config: quinn::ClientConfig) -> Result<quinn::Connection, String> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(config);
    let connecting = ep.connect(server.local_addr(), "localhost").map_err(|e| e.to_string())?;
    connecting.await.map_err(|e| e.to_string())
}

/// Opens a stream, writes `bytes`, finishes, and decodes everything the server sends back.
async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Vec<Frame> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // The server may stop our side early (after an oversized prefix); that is fine.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let data = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(4 * DEFAULT_MAX_FRAME))
        .await
        .expect("server answers")
        .expect("server finishes its side");
    let mut dec = Decoder::default();
    dec.push(&data);
    let mut frames = Vec::new();
    while let Some(f) = dec.next_frame().unwrap() {
        frames.push(f);
    }
    dec.finish().unwrap();
    frames
}

fn raw_frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    v.push(ty);
    v.extend_from_slice(payload);
    v
}

fn single_error(frames: &[Frame]) -> &EngineError {
    match frames {
        [Frame::Error(e)] => e,
        other => panic!("expected one ERROR frame, got {other:?}"),
    }
}

async fn drain(mut stream: meridian_engine::client::ChatStream) -> (String, Event) {
    let mut text = String::new();
    while let Some(ev) = stream.next().await {
        match ev.unwrap() {
            Event::Delta(d) => text.push_str(&d),
            end => return (text, end),
        }
    }
    panic!("the stream ended without a final event");
}

// --- tests ---

#[tokio::test]
async fn mtls_chat_health_and_errors_over_real_quic() {
    let pki = Pki::new("chat");
    let server = serve(&pki.node("engine"), real_backend(), ServerLimits::default());
    let client = client(&server, &pki.node("edge"));
    assert!(client.rtt().is_none(), "no connection before the first request");

    let stream = client.chat(chat_request("Say hello in three words.", 12)).await.unwrap();
    let (text, end) = drain(stream).await;
    match end {
        Event::Finished { usage, .. } => {
            assert!(usage.prompt_tokens > 0);
            assert!(usage.completion_tokens > 0 && usage.completion_tokens <= 12, "{usage:?}");
        }
        other => panic!("expected Finished, got {other:?}"),
    }
    assert!(!text.is_empty());
    assert!(client.rtt().is_some());

    let health = client.health().await.unwrap();
    assert_eq!(health.chat_models, vec![CHAT_MODEL.to_string()]);

    // Concurrent requests share the one connection.
    let (a, b) =
        tokio::join!(client.chat(chat_request("Count to three.", 6)), client.chat(chat_request("Name a colour.", 6)));
    let ((_, ea), (_, eb)) = tokio::join!(drain(a.unwrap()), drain(b.unwrap()));
    assert!(matches!(ea, Event::Finished { .. }) && matches!(eb, Event::Finished { .. }));

    // Typed refusals arrive as Remote errors, before any output.
    let err = client.chat(chat_request("hi", 0)).await.err().unwrap();
    assert!(matches!(&err, ClientError::Remote(e) if e.code == ErrorCode::BadRequest), "{err:?}");
    assert!(!err.retryable());
    let mut req = chat_request("hi", 4);
    req.model = "nope".into();
    let err = client.chat(req).await.err().unwrap();
    assert!(matches!(&err, ClientError::Remote(e) if e.code == ErrorCode::UnknownModel), "{err:?}");
    let err = client.embed(EmbedRequest::new("nope", vec!["x".into()])).await.unwrap_err();
    assert!(matches!(&err, ClientError::Remote(e) if e.code == ErrorCode::UnknownModel), "{err:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn client_with_a_certificate_from_another_ca_is_refused_and_good_clients_still_served() {
    let pki = Pki::new("foreign-client");
    let server = serve(&pki.node("engine"), real_backend(), ServerLimits::default());

    let bad = client(&server, &pki.foreign("edge"));
    let err = bad.health().await.unwrap_err();
    assert!(matches!(err, ClientError::Connect(_)), "{err:?}");
    assert!(err.retryable());

    let good = client(&server, &pki.node("edge"));
    good.health().await.unwrap();
    // And again after the refusal, on the same server.
    let err = bad.health().await.unwrap_err();
    assert!(matches!(err, ClientError::Connect(_)), "{err:?}");
    good.health().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let pki = Pki::new("no-cert");
    let server = serve(&pki.node("engine"), real_backend(), ServerLimits::default());

    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(certs::ca_paths(&pki.dir).0).unwrap();
    for c in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tls::ALPN.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap()));
    // The client may finish its half of the handshake before the server rejects it; either the
    // handshake or the first exchange fails, and nothing is answered.
    let refused = match raw_connect_with(&server, config).await {
        Err(_) => true,
        Ok(conn) => {
            let attempt = async {
                let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                send.write_all(&Frame::HealthRequest.encode()).await.map_err(|e| e.to_string())?;
                recv.read_chunk(1024, true).await.map_err(|e| e.to_string())
            };
            let r = tokio::time::timeout(Duration::from_secs(10), attempt).await.expect("refusal is prompt");
            r.is_err()
        }
    };
    assert!(refused);
    client(&server, &pki.node("edge")).health().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn server_with_a_certificate_from_another_ca_is_refused_by_the_client() {
    let pki = Pki::new("foreign-server");
    let server = serve(&pki.foreign("engine"), real_backend(), ServerLimits::default());
    let c = client(&server, &pki.node("edge"));
    let err = c.health().await.unwrap_err();
    assert!(matches!(err, ClientError::Connect(_)), "{err:?}");
    assert!(err.retryable());
    let err = c.chat(chat_request("hi", 2)).await.err().unwrap();
    assert!(matches!(err, ClientError::Connect(_)), "{err:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn server_name_not_in_the_certificate_is_refused() {
    let pki = Pki::new("san");
    let server = serve(&pki.node("engine"), real_backend(), ServerLimits::default());
    let mut opts = ClientOptions::new(server.local_addr().to_string(), "engine.elsewhere");
    opts.connect_timeout = Duration::from_secs(5);
    let c = EngineClient::new(opts, &pki.node("edge")).unwrap();
    let err = c.health().await.unwrap_err();
    assert!(matches!(err, ClientError::Connect(_)), "{err:?}");
    // The IP SAN works as a server name.
    let opts = ClientOptions::new(server.local_addr().to_string(), "127.0.0.1");
    EngineClient::new(opts, &pki.node("edge")).unwrap().health().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn bad_frames_get_typed_errors_and_the_connection_carries_on() {
    let pki = Pki::new("frames");
    let server = serve(&pki.node("engine"), real_backend(), ServerLimits::default());
    let conn = raw_connect(&server, &pki.node("edge")).await.unwrap();

    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("bad json", raw_frame(0x01, b"{nope"), ErrorCode::MalformedFrame),
        ("unknown op", raw_frame(0x01, br#"{"v":1,"op":"dance"}"#), ErrorCode::MalformedFrame),
        ("unknown type", raw_frame(0x42, b""), ErrorCode::MalformedFrame),
        ("delta first", Frame::Delta("hi".into()).encode().to_vec(), ErrorCode::MalformedFrame),
        ("truncated", raw_frame(0x01, b"{}")[..4].to_vec(), ErrorCode::MalformedFrame),
        ("empty stream", Vec::new(), ErrorCode::MalformedFrame),
        (
            "oversized",
            {
                let mut v = ((DEFAULT_MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
                v.push(0x01);
                v.extend_from_slice(&[b' '; 1000]);
                v
            },
            ErrorCode::FrameTooLarge,
        ),
        (
            "unknown version",
            raw_frame(0x01, br#"{"v":99,"op":"chat","model":"smollm2","messages":[]}"#),
            ErrorCode::UnsupportedVersion,
        ),
    ];
    for (what, bytes, code) in cases {
        let frames = exchange(&conn, &bytes).await;
        assert_eq!(single_error(&frames).code, code, "{what}: {frames:?}");
        // Another stream on the same connection still works.
        let frames = exchange(&conn, &Frame::HealthRequest.encode()).await;
        assert!(matches!(frames.as_slice(), [Frame::Health(_)]), "{what}: {frames:?}");
    }

    // A full chat still works on this connection.
    let mut req = BytesMut::new();
    Frame::Request(meridian_engine::api::Envelope {
        v: meridian_engine::api::PROTOCOL_VERSION,
        request: meridian_engine::api::Request::Chat(chat_request("Hi", 4)),
    })
    .encode_into(&mut req);
    let frames = exchange(&conn, &req).await;
    assert!(matches!(frames.last(), Some(Frame::Done { .. })), "{frames:?}");
    assert!(matches!(frames[frames.len() - 2], Frame::Usage(_)), "{frames:?}");
    assert!(frames[..frames.len() - 2].iter().all(|f| matches!(f, Frame::Delta(_))), "{frames:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn silent_stream_is_closed_after_the_first_frame_timeout() {
    let pki = Pki::new("silent");
    let limits = ServerLimits { first_frame_timeout: Duration::from_millis(300), ..Default::default() };
    let server = serve(&pki.node("engine"), real_backend(), limits);
    let conn = raw_connect(&server, &pki.node("edge")).await.unwrap();
    // Taken before the server can know the stream, so its timer cannot have started earlier: a
    // lower bound that load cannot break (no upper bound; the 10 s timeout only guards a hang).
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // Half a length prefix: the server knows the stream but never gets a frame.
    send.write_all(&[0, 0]).await.unwrap();
    let data = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 16)).await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300), "closed before the first-frame timeout");
    let mut dec = Decoder::default();
    dec.push(&data);
    let f = dec.next_frame().unwrap();
    assert!(matches!(f, Some(Frame::Error(ref e)) if e.code == ErrorCode::MalformedFrame), "{f:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn control_stream_answers_health_repeatedly() {
    let pki = Pki::new("control");
    let server = serve(&pki.node("engine"), real_backend(), ServerLimits::default());

    // Raw: one stream, several requests, one answer each, in order; a clean finish ends it.
    let conn = raw_connect(&server, &pki.node("edge")).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut dec = Decoder::default();
    for _ in 0..5 {
        send.write_all(&Frame::HealthRequest.encode()).await.unwrap();
        let frame = loop {
            if let Some(f) = dec.next_frame().unwrap() {
                break f;
            }
            let chunk = recv.read_chunk(4096, true).await.unwrap().expect("a HEALTH frame");
            dec.push(&chunk.bytes);
        };
        match frame {
            Frame::Health(h) => assert_eq!(h.chat_models, vec![CHAT_MODEL.to_string()]),
            other => panic!("{other:?}"),
        }
    }
    send.finish().unwrap();
    assert!(recv.read_chunk(4096, true).await.unwrap().is_none(), "server finishes the control stream");

    // A non-health frame on the control stream ends it with an error.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&Frame::HealthRequest.encode()).await.unwrap();
    send.write_all(&Frame::Delta("x".into()).encode()).await.unwrap();
    let _ = send.finish();
    let data = recv.read_to_end(1 << 20).await.unwrap();
    let mut dec = Decoder::default();
    dec.push(&data);
    assert!(matches!(dec.next_frame().unwrap(), Some(Frame::Health(_))));
    assert!(matches!(dec.next_frame().unwrap(), Some(Frame::Error(e)) if e.code == ErrorCode::MalformedFrame));

    // Client: many calls over its one kept control stream.
    let c = client(&server, &pki.node("edge"));
    for _ in 0..10 {
        c.health().await.unwrap();
    }
    server.shutdown().await;
}

#[tokio::test]
async fn reset_mid_generation_drops_the_backend_receiver_promptly() {
    let pki = Pki::new("cancel");
    let engine = real_backend();
    // Pass on the first delta only: the server cannot learn of the cancel from a next delta.
    let probe = Probe::new(engine.clone(), true);
    let server = serve(&pki.node("engine"), probe.clone(), ServerLimits::default());
    let c = client(&server, &pki.node("edge"));

    let mut stream = c.chat(chat_request("Write a very long story about a lighthouse keeper.", 2000)).await.unwrap();
    match stream.next().await {
        Some(Ok(Event::Delta(_))) => {}
        other => panic!("expected a first delta, got {other:?}"),
    }
    assert!(probe.dropped_midway.lock().unwrap().is_empty());
    let cancelled_at = Instant::now();
    drop(stream);

    let deadline = cancelled_at + Duration::from_secs(5);
    let dropped_at = loop {
        if let Some(t) = probe.dropped_midway.lock().unwrap().first().copied() {
            break t;
        }
        assert!(Instant::now() < deadline, "the server did not drop the receiver after the reset");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let after = dropped_at.saturating_duration_since(cancelled_at);
    eprintln!("receiver dropped {after:?} after the client dropped its stream");
    assert!(after < Duration::from_secs(2), "{after:?}");

    // The engine lets go of the sequence too (its slot is free again).
    let engine_idle = async {
        while engine.health().active_sequences > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), engine_idle).await.expect("the engine frees the slot");

    // The connection is fine for the next request.
    let (_, end) = drain(c.chat(chat_request("Hi", 3)).await.unwrap()).await;
    assert!(matches!(end, Event::Finished { .. }));
    server.shutdown().await;
}

#[tokio::test]
async fn client_reconnects_after_the_server_restarts() {
    let pki = Pki::new("reconnect");
    let server = serve(&pki.node("engine"), real_backend(), ServerLimits::default());
    let addr = server.local_addr();
    let c = client(&server, &pki.node("edge"));
    c.health().await.unwrap();
    server.shutdown().await;

    // While it is down: a retryable error, nothing else.
    let err = c.health().await.unwrap_err();
    assert!(err.retryable(), "{err:?}");

    let server = EngineServer::bind(addr, &pki.node("engine"), real_backend(), ServerLimits::default())
        .unwrap()
        .spawn()
        .unwrap();
    c.health().await.unwrap();
    let (_, end) = drain(c.chat(chat_request("Hi", 2)).await.unwrap()).await;
    assert!(matches!(end, Event::Finished { .. }));
    server.shutdown().await;
}

fn envelope(request: Request) -> Vec<u8> {
    Frame::Request(Envelope { v: PROTOCOL_VERSION, request }).encode().to_vec()
}

fn texts(n: usize) -> Vec<String> {
    // A few tokens each: embedding is compute bound, and 2 048 long sentences take minutes on CPU.
    let topics = ["cat", "sea", "market", "hill"];
    (0..n).map(|i| format!("{} {i}", topics[i % 4])).collect()
}

#[tokio::test]
async fn embeddings_of_many_inputs_cross_in_frames_within_the_limit_both_ways() {
    let pki = Pki::new("embed");
    // Small frames on both sides, so that both the request and the answer need several.
    let max_frame = 48 << 10;
    let limits = ServerLimits { max_frame, ..Default::default() };
    let server = serve(&pki.node("engine"), embed_backend(), limits);
    let mut opts = ClientOptions::new(server.local_addr().to_string(), "localhost");
    opts.max_frame = max_frame;
    let client = EngineClient::new(opts, &pki.node("edge")).unwrap();

    let input = texts(2048);
    let all = client.embed(EmbedRequest::new(EMBED_MODEL, input.clone())).await.unwrap();
    assert_eq!(all.data.len(), 2048);
    assert!(all.prompt_tokens as usize > 2048 * 3, "{}", all.prompt_tokens);
    // Equal to what smaller requests give.
    let some = client.embed(EmbedRequest::new(EMBED_MODEL, input[1000..1040].to_vec())).await.unwrap();
    for (k, v) in some.data.iter().enumerate() {
        let diff = v.iter().zip(&all.data[1000 + k]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "text {}: {diff}", 1000 + k);
    }

    // On the wire: a split answer is several EMBEDDINGS frames, none over the limit, in order.
    let conn = raw_connect(&server, &pki.node("edge")).await.unwrap();
    let split = EmbedRequest { split_answer: true, ..EmbedRequest::new(EMBED_MODEL, input[..300].to_vec()) };
    let bytes = envelope(Request::Embed(split));
    assert!(bytes.len() < max_frame);
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&bytes).await.unwrap();
    send.finish().unwrap();
    let mut dec = Decoder::new(max_frame);
    let (mut frames, mut next) = (0, 0);
    while let Some(chunk) = recv.read_chunk(1 << 16, true).await.unwrap() {
        dec.push(&chunk.bytes);
        while let Some(frame) = dec.next_frame().expect("every frame within the limit") {
            match frame {
                Frame::Embeddings(part) => {
                    assert_eq!(part.index as usize, next);
                    next += part.data.len();
                    frames += 1;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    dec.finish().unwrap();
    assert_eq!(next, 300);
    assert!(frames >= 300 * 384 * 8 / max_frame, "{frames} frames");

    // A client that predates split answers gets one frame, or a typed refusal, never a part.
    let frames = exchange(&conn, &envelope(Request::Embed(EmbedRequest::new(EMBED_MODEL, input[..3].to_vec())))).await;
    assert!(matches!(frames.as_slice(), [Frame::Embeddings(e)] if e.data.len() == 3 && e.index == 0), "{frames:?}");
    let frames =
        exchange(&conn, &envelope(Request::Embed(EmbedRequest::new(EMBED_MODEL, input[..300].to_vec())))).await;
    assert_eq!(single_error(&frames).code, ErrorCode::BadRequest, "{frames:?}");

    // An input that cannot fit a frame on its own is refused before anything is sent.
    let fresh = EngineClient::new(
        ClientOptions { max_frame, ..ClientOptions::new(server.local_addr().to_string(), "localhost") },
        &pki.node("edge"),
    )
    .unwrap();
    let err = fresh.embed(EmbedRequest::new(EMBED_MODEL, vec!["x".repeat(max_frame)])).await.unwrap_err();
    assert!(matches!(err, ClientError::TooLarge { max, .. } if max == max_frame), "{err:?}");
    assert!(!fresh.is_connected(), "nothing was sent");
    server.shutdown().await;
}

#[tokio::test]
async fn a_request_over_the_frame_limit_is_refused_before_it_is_sent() {
    let pki = Pki::new("too-large");
    let server = serve(&pki.node("engine"), real_backend(), ServerLimits::default());
    let client = client(&server, &pki.node("edge"));
    let err = client.chat(chat_request(&"word ".repeat(DEFAULT_MAX_FRAME / 5 + 1), 4)).await.err().unwrap();
    assert!(matches!(err, ClientError::TooLarge { len, max } if len > max && max == DEFAULT_MAX_FRAME), "{err:?}");
    assert!(!client.is_connected(), "nothing was sent to the engine");
    // A request within the limit goes through.
    let (_, end) = drain(client.chat(chat_request("Hi", 2)).await.unwrap()).await;
    assert!(matches!(end, Event::Finished { .. }));
    server.shutdown().await;
}

#[tokio::test]
async fn a_draining_server_refuses_new_streams_at_once_and_finishes_its_requests() {
    let pki = Pki::new("drain");
    let limits = ServerLimits { shutdown_grace: Duration::from_secs(300), ..Default::default() };
    let server = serve(&pki.node("engine"), real_backend(), limits);
    let client = client(&server, &pki.node("edge"));
    let mut running =
        client.chat(chat_request("Write a very long story about a lighthouse keeper.", 2000)).await.unwrap();
    assert!(matches!(running.next().await, Some(Ok(Event::Delta(_)))));

    let stopping = tokio::spawn(server.shutdown());
    // The drain has begun once the kept control stream is ended; wait for that by polling.
    let refused = loop {
        match client.chat(chat_request("Hi", 2)).await {
            Err(ClientError::Remote(e)) if e.code == ErrorCode::Draining => break e,
            Ok(stream) => drop(stream),
            Err(other) => panic!("a new stream must be answered, not {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!stopping.is_finished(), "refused while the running request holds the drain open: {refused:?}");
    assert!(ClientError::Remote(refused).retryable(), "another engine may take it");
    let err = client.embed(EmbedRequest::new("minilm", vec!["x".into()])).await.unwrap_err();
    assert!(matches!(&err, ClientError::Remote(e) if e.code == ErrorCode::Draining), "{err:?}");

    // The running request goes on, then the drain ends when it is gone.
    assert!(matches!(running.next().await, Some(Ok(Event::Delta(_)))));
    drop(running);
    stopping.await.unwrap();
}

#[test]
fn retryable_classification() {
    let remote = |code| ClientError::Remote(EngineError::new(code, "x"));
    assert!(remote(ErrorCode::Overloaded).retryable());
    assert!(remote(ErrorCode::Internal).retryable());
    assert!(!remote(ErrorCode::BadRequest).retryable());
    assert!(!remote(ErrorCode::UnknownModel).retryable());
    assert!(ClientError::Connect("x".into()).retryable());
    assert!(ClientError::Timeout.retryable());
    assert!(ClientError::Reset { answer_started: false, reason: "x".into() }.retryable());
    assert!(!ClientError::Reset { answer_started: true, reason: "x".into() }.retryable());
    assert!(!ClientError::Protocol("x".into()).retryable());
    assert!(remote(ErrorCode::Draining).retryable());
    assert!(ClientError::TooLarge { len: 2, max: 1 }.retryable());
}
