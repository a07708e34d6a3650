//! `edge-bench`: the edge's overhead over a direct call, measured with wrk on loopback.
//!
//! Starts the mock managed API and an edge node in front of it as separate release processes,
//! then prints, for direct and through-the-edge calls: p50/p90/p99 latency and requests/s at
//! concurrency 1 and 64, non-streamed and streamed; time to first token of streams; the plugin
//! chain (pii-redactor + latency-router) on and off at concurrency 1 and 64, non-streamed and
//! streamed (prompts without personal data, which the filter's request triggers skip) and
//! non-streamed with a phone number in the prompt (which it redacts), and the request ledger on
//! and off at concurrency 64 (two fresh edges side by side: p50, requests/s and the edge's CPU
//! per request, medians of 3 pairs of back-to-back runs, alternating which edge goes first; what
//! one adds and keeps over the other is taken per pair); cache-hit
//! latency; the edge's RSS (idle and peak) and CPU time per request. Any failed request (wrk's
//! connect, read, write, status or timeout errors) fails the benchmark.
//!
//! Run it with `scripts/bench` (builds the release binaries, installs wrk if missing).
//! Options (`--help`; an unknown option or a bad value is refused): `--duration SECS` per wrk run
//! (default 5), `--ttft-requests N` (default 300), `--pairs N` of side-by-side runs (default 3).

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::builder::RangedU64ValueParser;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meridian::config::hash_key;
use meridian_e2e::process::{cpu_time, status_kib};

const KEY: &str = "sk-bench";

/// What to measure (`edge-bench --help`).
#[derive(Parser)]
#[command(
    name = "edge-bench",
    about = "The edge's overhead over a direct call to the mock managed API, measured with wrk on loopback"
)]
struct Options {
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    duration: u64,
    /// Streamed requests whose time to first token is measured, per path.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    ttft_requests: u64,
    /// Pairs of side-by-side runs of two edges (plugin chain and ledger on and off).
    #[arg(long, default_value_t = 3, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pairs: usize,
}

fn main() {
    let Options { duration, ttft_requests, pairs } = Options::parse();
    if let Err(e) = run(duration, ttft_requests, pairs) {
        eprintln!("edge-bench: {e}");
        std::process::exit(1);
    }
}

/// A child process killed on drop, so that a failed run leaves nothing behind.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

fn wait_listening(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("nothing listens on {addr} after 10 s"))
}

fn run(duration: u64, ttft_requests: u64, pairs: usize) -> Result<(), String> {
    let bin_dir =
        std::env::current_exe().map_err(|e| e.to_string())?.parent().map(Path::to_path_buf).unwrap_or_default();
    let tmp = std::env::temp_dir().join(format!("meridian-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    Command::new("wrk").arg("--version").output().map_err(|_| "wrk not found: apt-get install wrk".to_string())?;

    let mock_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let _mock = Proc(
        Command::new(bin_dir.join("mock-upstream"))
            .args(["--listen", &mock_addr.to_string(), "--no-record"])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start mock-upstream (build it with scripts/bench): {e}"))?,
    );
    wait_listening(mock_addr)?;

    let edge_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let edge = start_edge(&bin_dir, &tmp, "edge", edge_addr, mock_addr, Edge::default())?;
    let edge_pid = edge.0.id();
    wait_listening(edge_addr)?;
    std::thread::sleep(Duration::from_millis(200));
    let idle_rss = status_kib(edge_pid, "VmRSS:");

    let direct = format!("http://{mock_addr}");
    let through = format!("http://{edge_addr}");
    let plain =
        r#"{"model":"bench","messages":[{"role":"user","content":"benchmark the edge overhead"}],"temperature":0.7}"#;
    let streamed = r#"{"model":"bench","stream":true,"messages":[{"role":"user","content":"benchmark the edge overhead"}],"temperature":0.7}"#;
    let cached = r#"{"model":"bench","messages":[{"role":"user","content":"benchmark a cache hit"}],"temperature":0}"#;
    // A prompt holding personal data: pii-redactor's request triggers (digits) are in it, so the
    // chained edge calls the filter, which redacts the number (and the edge restores it in the
    // answer). The prompts above hold none of them, and the filter is not called for them.
    let phone = r#"{"model":"bench","messages":[{"role":"user","content":"benchmark the edge overhead, or call me on +44 20 7946 0958"}],"temperature":0.7}"#;

    println!("edge-bench: mock upstream {direct}, edge {through}; wrk {duration}s a run; 2 threads for c=64");
    println!();
    println!("| scenario | path | conc. | p50 ms | p90 ms | p99 ms | req/s | errors | edge CPU µs/req |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut results = Vec::new();
    for (scenario, body) in [("non-streamed", plain), ("streamed", streamed)] {
        for conc in [1u32, 64] {
            for (path, base) in [("direct", &direct), ("edge", &through)] {
                let cpu_before = cpu_time(edge_pid);
                let r = wrk(&tmp, base, body, conc, duration)?;
                let cpu = if path == "edge" {
                    let used = cpu_time(edge_pid).saturating_sub(cpu_before);
                    format!("{:.1}", used.as_secs_f64() * 1e6 / r.requests.max(1) as f64)
                } else {
                    "—".into()
                };
                println!(
                    "| {scenario} | {path} | {conc} | {:.3} | {:.3} | {:.3} | {:.0} | {} | {cpu} |",
                    r.p50_ms, r.p90_ms, r.p99_ms, r.rps, r.errors
                );
                results.push((scenario, conc, path, r));
            }
        }
    }
    // Fresh edges side by side (interleaved, repeated, medians): the default plugin chain
    // (pii-redactor, then latency-router) on and off, and the request ledger on and off.
    let start = |name: &str, edge: Edge| -> Result<(Proc, String), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let proc = start_edge(&bin_dir, &tmp, name, addr, mock_addr, edge)?;
        wait_listening(addr)?;
        Ok((proc, format!("http://{addr}")))
    };
    let chained = start("edge-chain", Edge { chain: true, ..Edge::default() })?;
    let unchained = start("edge-no-chain", Edge::default())?;
    let mut chain_rows = Vec::new();
    for (scenario, body) in [("non-streamed", plain), ("streamed", streamed), ("phone number", phone)] {
        for conc in [1u32, 64] {
            let chain = side_by_side(&tmp, [&chained, &unchained], body, conc, duration, pairs)?;
            let (on, off) = (&chain.first, &chain.second);
            println!(
                "| {scenario}, chain on / off | edge | {conc} | {:.3} / {:.3} | — | — | {:.0} / {:.0} ({:.0}%) | 0 | {:.1} / {:.1} (chain {:+.1}) |",
                on.p50_ms,
                off.p50_ms,
                on.rps,
                off.rps,
                100.0 * chain.kept,
                on.cpu_us,
                off.cpu_us,
                chain.added_cpu_us
            );
            chain_rows.push((scenario, conc, chain));
        }
    }
    drop((chained, unchained));
    let ledgered = start("edge-ledger", Edge::default())?;
    let unledgered = start("edge-no-ledger", Edge { ledger: false, ..Edge::default() })?;
    let ledger = side_by_side(&tmp, [&ledgered, &unledgered], plain, 64, duration, pairs)?;
    drop((ledgered, unledgered));
    println!(
        "| non-streamed, ledger on / off | edge | 64 | — | — | — | — | — | {:.1} / {:.1} (ledger {:+.1}) |",
        ledger.first.cpu_us, ledger.second.cpu_us, ledger.added_cpu_us
    );
    let cpu_before = cpu_time(edge_pid);
    let hit = wrk(&tmp, &through, cached, 1, duration)?;
    let hit_cpu = cpu_time(edge_pid).saturating_sub(cpu_before).as_secs_f64() * 1e6 / hit.requests.max(1) as f64;
    println!(
        "| cache hit | edge | 1 | {:.3} | {:.3} | {:.3} | {:.0} | {} | {hit_cpu:.1} |",
        hit.p50_ms, hit.p90_ms, hit.p99_ms, hit.rps, hit.errors
    );
    println!();
    println!(
        "Plugin chain (pii-redactor + latency-router), {pairs} pairs of runs each (medians; CPU added and req/s \
         kept per pair):"
    );
    for (scenario, conc, chain) in &chain_rows {
        println!(
            "  {scenario:<12} c={conc:<3} adds p50 {:+.3} ms, {:+.1} µs of edge CPU a request; keeps {:.0}% of req/s",
            chain.first.p50_ms - chain.second.p50_ms,
            chain.added_cpu_us,
            100.0 * chain.kept
        );
    }
    println!("Added latency through the edge (edge − direct):");
    for (scenario, conc) in [("non-streamed", 1), ("non-streamed", 64), ("streamed", 1), ("streamed", 64)] {
        let get =
            |p: &str| results.iter().find(|(s, c, path, _)| *s == scenario && *c == conc && *path == p).map(|r| &r.3);
        if let (Some(d), Some(e)) = (get("direct"), get("edge")) {
            println!(
                "  {scenario:<12} c={conc:<3} p50 {:+.3} ms, p99 {:+.3} ms, throughput {:.0}% of direct",
                e.p50_ms - d.p50_ms,
                e.p99_ms - d.p99_ms,
                100.0 * e.rps / d.rps.max(1.0)
            );
        }
    }

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    println!();
    println!("Time to first token and total, streamed, concurrency 1 ({ttft_requests} requests each):");
    for (path, base) in [("direct", &direct), ("edge", &through)] {
        let (ttft, total) = rt.block_on(stream_timings(base, streamed, ttft_requests))?;
        println!(
            "  {path:<6} TTFT p50 {:.3} ms p99 {:.3} ms | total p50 {:.3} ms p99 {:.3} ms",
            pct(&ttft, 50.0),
            pct(&ttft, 99.0),
            pct(&total, 50.0),
            pct(&total, 99.0)
        );
    }
    println!();
    println!(
        "Edge memory: idle RSS {:.1} MB, now {:.1} MB, peak {:.1} MB",
        idle_rss as f64 / 1024.0,
        status_kib(edge_pid, "VmRSS:") as f64 / 1024.0,
        status_kib(edge_pid, "VmHWM:") as f64 / 1024.0
    );
    drop(edge);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// Medians of one edge's runs in [`side_by_side`].
#[derive(Clone, Copy)]
struct Medians {
    p50_ms: f64,
    rps: f64,
    cpu_us: f64,
}

/// Two edges compared in [`side_by_side`]: each one's medians, and the medians over the pairs of
/// runs (one of each, back to back) of what the first keeps of the second's requests/s and adds
/// to its CPU time per request. Per pair, so that a slow minute of the machine falls on both
/// sides of each ratio.
struct Compared {
    first: Medians,
    second: Medians,
    kept: f64,
    added_cpu_us: f64,
}

/// `pairs` pairs of wrk runs of `body` at `conc`, one against each of two edges, back to back
/// and alternating which goes first (a b, b a, a b…), so that the machine's noise and any drift
/// fall on both alike.
fn side_by_side(
    tmp: &Path,
    edges: [&(Proc, String); 2],
    body: &str,
    conc: u32,
    duration: u64,
    pairs: usize,
) -> Result<Compared, String> {
    let mut samples = [[Vec::new(), Vec::new(), Vec::new()], [Vec::new(), Vec::new(), Vec::new()]];
    let (mut kept, mut added) = (Vec::new(), Vec::new());
    for pair in 0..pairs {
        let order = if pair % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut run = [(0.0, 0.0); 2];
        for i in order {
            let (proc, url) = edges[i];
            let before = cpu_time(proc.0.id());
            let r = wrk(tmp, url, body, conc, duration)?;
            let cpu = cpu_time(proc.0.id()).saturating_sub(before).as_secs_f64() * 1e6 / r.requests.max(1) as f64;
            samples[i][0].push(r.p50_ms);
            samples[i][1].push(r.rps);
            samples[i][2].push(cpu);
            run[i] = (r.rps, cpu);
        }
        kept.push(run[0].0 / run[1].0.max(1.0));
        added.push(run[0].1 - run[1].1);
    }
    let [first, second] = samples.map(|[mut p50, mut rps, mut cpu]| Medians {
        p50_ms: median(&mut p50),
        rps: median(&mut rps),
        cpu_us: median(&mut cpu),
    });
    Ok(Compared { first, second, kept: median(&mut kept), added_cpu_us: median(&mut added) })
}
/// What an edge of the benchmark runs besides the plain path.
struct Edge {
    /// The tenant runs the shipped `pii-redactor` and `latency-router` components.
    chain: bool,
    /// The request ledger (SQLite in the run's temp dir), on by default as in a real node.
    ledger: bool,
}

impl Default for Edge {
    fn default() -> Self {
        Edge { chain: false, ledger: true }
    }
}

/// The median of `values` (sorted in place).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Starts an edge process in front of the mock, running what `edge` says.
fn start_edge(
    bin_dir: &Path,
    tmp: &Path,
    name: &str,
    edge_addr: SocketAddr,
    mock_addr: SocketAddr,
    edge: Edge,
) -> Result<Proc, String> {
    let chain = edge.chain;
    let wasm = |crate_name: &str| bin_dir.join(format!("../wasm32-unknown-unknown/release/{crate_name}.wasm"));
    let plugins = if chain {
        for c in ["pii_redactor", "latency_router"] {
            if !wasm(c).is_file() {
                return Err(format!("{} is missing: run scripts/build-plugins", wasm(c).display()));
            }
        }
        format!(
            r#"
[plugin_runtime]
cache_dir = "{cache}"
[plugins.pii]
kind = "filter"
path = "{pii}"
[plugins.latency]
kind = "router"
path = "{latency}"
"#,
            cache = tmp.join("plugin-cache").display(),
            pii = wasm("pii_redactor").display(),
            latency = wasm("latency_router").display(),
        )
    } else {
        String::new()
    };
    let tenant_chain = if chain { "filters = [\"pii\"]\nrouter = \"latency\"\n" } else { "" };
    let config = tmp.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"
[node]
listen = "{edge_addr}"
[log]
level = "warn"
[ledger]
enabled = {ledger}
dir = "{ledger_dir}"
[[tenants]]
name = "bench"
keys = ["{hash}"]
{tenant_chain}
[targets.mock]
api = "openai"
base_url = "http://{mock_addr}/v1"
price = {{ per = "token", input_usd_per_mtok = 0.15, output_usd_per_mtok = 0.6 }}
[[models]]
name = "bench"
targets = [{{ target = "mock" }}]
{plugins}
"#,
            hash = hash_key(KEY),
            ledger = edge.ledger,
            ledger_dir = tmp.join(name).display(),
        ),
    )
    .map_err(|e| e.to_string())?;
    let child = Command::new(bin_dir.join("meridian"))
        .args(["edge", "-c"])
        .arg(&config)
        .spawn()
        .map_err(|e| format!("cannot start meridian: {e}"))?;
    Ok(Proc(child))
}

struct WrkResult {
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    rps: f64,
    requests: u64,
    errors: u64,
}

/// One wrk run; a Lua `done` hook prints exact percentiles so nothing is parsed from wrk's
/// rounded human output.
fn wrk(tmp: &Path, base: &str, body: &str, conc: u32, duration: u64) -> Result<WrkResult, String> {
    let script: PathBuf = tmp.join("post.lua");
    let mut f = std::fs::File::create(&script).map_err(|e| e.to_string())?;
    write!(
        f,
        r#"wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {KEY}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("MERIDIAN %d %d %d %d %d %d\n", latency:percentile(50), latency:percentile(90),
    latency:percentile(99), summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout))
end
"#
    )
    .map_err(|e| e.to_string())?;
    let threads = if conc == 1 { "1" } else { "2" };
    let out = Command::new("wrk")
        .args(["-t", threads, "-c", &conc.to_string(), "-d", &format!("{duration}s"), "--timeout", "5s", "-s"])
        .arg(&script)
        .arg(format!("{base}/v1/chat/completions"))
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("MERIDIAN "))
        .ok_or_else(|| format!("wrk printed no result:\n{text}"))?;
    let n: Vec<u64> = line.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    let [p50, p90, p99, requests, duration_us, errors] = n[..] else { return Err(format!("bad wrk line: {line}")) };
    // A failed request is cheap for the edge: counting it would flatter every figure.
    if errors > 0 {
        return Err(format!("wrk saw {errors} failed requests (connect, read, write, non-2xx or timeout) at {base}"));
    }
    Ok(WrkResult {
        p50_ms: p50 as f64 / 1e3,
        p90_ms: p90 as f64 / 1e3,
        p99_ms: p99 as f64 / 1e3,
        rps: requests as f64 / (duration_us as f64 / 1e6),
        requests,
        errors,
    })
}

/// Sequential streamed requests timing the first content chunk and the end of the stream.
async fn stream_timings(base: &str, body: &str, n: u64) -> Result<(Vec<f64>, Vec<f64>), String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let (mut ttft, mut total) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let req = Request::post(format!("{base}/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {KEY}"))
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let start = Instant::now();
        let mut resp = client.request(req).await.map_err(|e| e.to_string())?.into_body();
        let mut first = None;
        while let Some(frame) = resp.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if first.is_none() && frame.data_ref().is_some_and(|d| d.windows(9).any(|w| w == b"\"content\"")) {
                first = Some(start.elapsed());
            }
        }
        total.push(start.elapsed().as_secs_f64() * 1e3);
        ttft.push(first.ok_or("a stream without content")?.as_secs_f64() * 1e3);
    }
    Ok((ttft, total))
}

fn pct(samples: &[f64], p: f64) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}
