//! The server: accept loop, per-request dispatch, and the public handle.

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::behavior::BehaviorQueue;
use crate::body::{self, MockBody};
use crate::{anthropic, openai, Behavior, Received};

/// Options for [`MockUpstream::start_with`].
///
/// `Default` gives `listen: None` (127.0.0.1:0), `record: true`, no API key.
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Address to listen on; `None` means `127.0.0.1:0` (an ephemeral port).
    pub listen: Option<SocketAddr>,
    /// Keep a [`Received`] entry for every request. Turn off for benchmarks;
    /// [`MockUpstream::request_count`] still counts.
    pub record: bool,
    /// If set, API requests must carry this key (OpenAI:
    /// `Authorization: Bearer K`; Anthropic: `x-api-key: K`), else they get a
    /// 401 `authentication_error` in that API's error shape.
    pub api_key: Option<String>,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions { listen: None, record: true, api_key: None }
    }
}

/// Which API a path belongs to.
#[derive(Clone, Copy)]
enum Api {
    OpenAi,
    Anthropic,
}

/// State shared by all connections.
struct State {
    record: bool,
    api_key: Option<String>,
    count: AtomicUsize,
    behaviors: BehaviorQueue,
    received: Mutex<Vec<Received>>,
}

/// A running mock managed API on loopback. Dropping it shuts the server down
/// and closes every connection it holds open.
pub struct MockUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
    /// Dropping this tells every connection task to stop.
    _shutdown: watch::Sender<()>,
}

impl MockUpstream {
    /// Starts a recording mock on `127.0.0.1:0` with no API key.
    pub async fn start() -> io::Result<MockUpstream> {
        Self::start_with(MockOptions::default()).await
    }

    /// Starts a mock with `opts`. Must be called within a tokio runtime.
    pub async fn start_with(opts: MockOptions) -> io::Result<MockUpstream> {
        let listen = opts.listen.unwrap_or_else(|| SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            record: opts.record,
            api_key: opts.api_key,
            count: AtomicUsize::new(0),
            behaviors: BehaviorQueue::default(),
            received: Mutex::new(Vec::new()),
        });
        let (tx, rx) = watch::channel(());
        let accept = tokio::spawn(accept_loop(listener, state.clone(), rx));
        Ok(MockUpstream { addr, state, accept, _shutdown: tx })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, e.g. `http://127.0.0.1:41234` (no trailing slash, no `/v1`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues a behaviour; each API request pops the front of the queue, and
    /// an empty queue means [`Behavior::Normal`].
    pub fn push(&self, b: Behavior) {
        self.state.behaviors.push(b);
    }

    /// Every request seen so far, in arrival order (empty if recording is off).
    pub fn received(&self) -> Vec<Received> {
        lock(&self.state.received).clone()
    }

    /// Number of requests seen so far (counted even when recording is off).
    pub fn request_count(&self) -> usize {
        self.state.count.load(Ordering::Relaxed)
    }

    /// Forgets recorded requests, resets the request count and drops any
    /// queued behaviours.
    pub fn clear(&self) {
        lock(&self.state.received).clear();
        self.state.count.store(0, Ordering::Relaxed);
        self.state.behaviors.clear();
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl std::fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockUpstream").field("addr", &self.addr).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, mut shutdown: watch::Receiver<()>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // e.g. EMFILE under load: back off briefly and go on.
                    tracing::debug!(error = %e, "meridian-mock: accept failed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(state.clone(), req));
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::trace!(error = %e, "meridian-mock: connection ended");
                    }
                }
                _ = shutdown.changed() => {}
            }
        });
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<MockBody>, Infallible> {
    let (parts, incoming) = req.into_parts();
    let bytes = match incoming.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => Bytes::new(),
    };
    state.count.fetch_add(1, Ordering::Relaxed);
    let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
    if state.record {
        let rec = Received {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    (k.as_str().to_owned(), v)
                })
                .collect(),
            body: parsed.clone().unwrap_or(Value::Null),
        };
        lock(&state.received).push(rec);
    }

    let api = match parts.uri.path() {
        "/v1/chat/completions" => Api::OpenAi,
        "/v1/messages" => Api::Anthropic,
        path => {
            let v = serde_json::json!({ "error": {
                "message": format!("Unknown path {path}"),
                "type": "not_found_error", "param": null, "code": null,
            } });
            return Ok(body::json(404, serde_json::to_vec(&v).unwrap_or_default()));
        }
    };
    let error = |status: u16, msg: &str| match api {
        Api::OpenAi => openai::error(status, msg),
        Api::Anthropic => anthropic::error(status, msg),
    };
    if parts.method != Method::POST {
        return Ok(error(405, &format!("Method {} not allowed", parts.method)));
    }

    let behavior = state.behaviors.pop();
    match behavior {
        Behavior::Hang => std::future::pending::<()>().await,
        Behavior::Delay(d) => tokio::time::sleep(d).await,
        Behavior::Status(status) => {
            let msg = format!("meridian-mock: injected status {status}");
            return Ok(error(status, &msg));
        }
        _ => {}
    }

    if let Some(key) = &state.api_key {
        let ok = match api {
            Api::OpenAi => openai::authorized(&parts.headers, key),
            Api::Anthropic => anthropic::authorized(&parts.headers, key),
        };
        if !ok {
            let msg = match api {
                Api::OpenAi => "Incorrect API key provided.",
                Api::Anthropic => "invalid x-api-key",
            };
            return Ok(error(401, msg));
        }
    }

    Ok(match api {
        Api::OpenAi => openai::respond(parsed.as_ref(), &parts.headers, &behavior),
        Api::Anthropic => anthropic::respond(parsed.as_ref(), &parts.headers, &behavior),
    })
}
