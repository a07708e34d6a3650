//! An edge run as its own `meridian edge` process, for what only a process has: signals, a kill,
//! and its own memory and CPU time.

use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A `meridian edge` process, killed when dropped (so a failed test leaves nothing behind).
pub struct EdgeProcess {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// A client for it.
    pub client: Http,
}

impl EdgeProcess {
    /// Writes `config(port)` (a free loopback port) to `dir/edge.toml`, starts `meridian edge` on
    /// it and polls `/readyz` until the edge is ready (at most 30 s).
    pub async fn start(dir: &Path, config: impl FnOnce(u16) -> String) -> EdgeProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let file = dir.join("edge.toml");
        std::fs::write(&file, config(port)).expect("the edge's config is written");
        let child = Command::new(crate::netns::meridian_bin())
            .args(["edge", "-c"])
            .arg(&file)
            .env("MERIDIAN_E2E_UPSTREAM_KEY", crate::UPSTREAM_KEY)
            .spawn()
            .expect("meridian edge starts");
        let edge = EdgeProcess { child, url: format!("http://127.0.0.1:{port}"), client: Http::default() };
        let start = Instant::now();
        while edge.client.send("GET", &format!("{}/readyz", edge.url), None, "", Bytes::new()).await != Some(200) {
            assert!(start.elapsed() < Duration::from_secs(30), "the edge comes up within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        edge
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("the edge dies");
    }

    /// SIGTERM: a graceful shutdown.
    pub fn terminate(&self) {
        let term = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("kill runs");
        assert!(term.success(), "SIGTERM is delivered");
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().expect("the edge exits")
    }

    /// Its resident memory now, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// Its user + system CPU time so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.pid())
    }
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The resident memory of process `pid` in KiB (`VmRSS` of `/proc/PID/status`), 0 when it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A `kB` field of `/proc/PID/status` (`VmRSS:`, `VmHWM:`, `RssAnon:`, `RssFile:`), 0 when the
/// process is gone.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// The user + system CPU time of process `pid` so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // In clock ticks of USER_HZ, which Linux fixes at 100 for user space.
    Duration::from_secs_f64((field(11) + field(12)) as f64 / 100.0)
}

/// A plain HTTP/1 client for an edge in another process.
#[derive(Clone)]
pub struct Http(pub Client<HttpConnector, Full<Bytes>>);

impl Default for Http {
    fn default() -> Self {
        Http(Client::builder(TokioExecutor::new()).build_http())
    }
}

impl Http {
    /// Sends a request (as `key`'s tenant, with `x-request-id: id` unless empty) and reads the
    /// whole answer; `None` when the edge did not answer.
    pub async fn send(&self, method: &str, url: &str, key: Option<&str>, id: &str, body: Bytes) -> Option<u16> {
        let mut req = hyper::Request::builder().method(method).uri(url).header("content-type", "application/json");
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        if !id.is_empty() {
            req = req.header("x-request-id", id);
        }
        let resp = self.0.request(req.body(Full::new(body)).ok()?).await.ok()?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.ok()?;
        Some(status)
    }

    /// GETs `url` and returns its body as text (panics if the edge does not answer).
    pub async fn get_text(&self, url: &str) -> String {
        let req = hyper::Request::get(url).body(Full::new(Bytes::new())).expect("a valid request");
        let resp = self.0.request(req).await.expect("the edge answers");
        let body = resp.into_body().collect().await.expect("the body reads").to_bytes();
        String::from_utf8(body.to_vec()).expect("UTF-8")
    }
}
