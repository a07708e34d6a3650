//! Test support for end-to-end tests: start an edge node in-process on a real loopback socket in
//! front of mock managed APIs, and talk to it over HTTP like a client would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meridian::accounting::PriceModel;
use meridian::config::{hash_key, Config, ModelConfig, PluginConfig, PluginKind, TargetConfig, TenantConfig};
use meridian::edge::Edge;
use meridian::server::{Server, StartError};
use meridian::sse::{SseEvent, SseParser};
pub use meridian_mock::{Behavior, MockOptions, MockUpstream};
use serde_json::Value;
use tokio::sync::oneshot;

pub mod engine;
pub mod netns;
pub mod process;
pub mod raw;
pub mod servers;
pub mod soak;

/// The key of tenant `acme`.
pub const ACME_KEY: &str = "sk-acme-test";
/// The key of tenant `globex`.
pub const GLOBEX_KEY: &str = "sk-globex-test";
/// The upstream key the edge sends to the mocks, read from `${MERIDIAN_E2E_UPSTREAM_KEY}`.
pub const UPSTREAM_KEY: &str = "sk-upstream-secret-123";

/// Mock upstreams: two OpenAI-compatible and one Anthropic.
pub struct Mocks {
    /// Target `oa`.
    pub openai: MockUpstream,
    /// Target `oa2`, a second OpenAI-compatible upstream for fallback.
    pub openai2: MockUpstream,
    /// Target `an`.
    pub anthropic: MockUpstream,
}

impl Mocks {
    /// Starts all three, each requiring [`UPSTREAM_KEY`].
    pub async fn start() -> Mocks {
        let opts = || MockOptions { api_key: Some(UPSTREAM_KEY.into()), ..MockOptions::default() };
        Mocks {
            openai: MockUpstream::start_with(opts()).await.expect("mock starts"),
            openai2: MockUpstream::start_with(opts()).await.expect("mock starts"),
            anthropic: MockUpstream::start_with(opts()).await.expect("mock starts"),
        }
    }

    /// The standard edge config in front of these mocks. Models:
    /// `gpt-test` → oa; `claude-test` → an; `gpt-via-claude` → an; `claude-via-gpt` → oa;
    /// `fallback` → oa, oa2, an.
    pub fn config(&self) -> Config {
        set_upstream_key();
        let text = format!(
            r#"
[node]
listen = "127.0.0.1:0"
max_body_bytes = 65536
header_read_timeout_ms = 1000
body_read_timeout_ms = 1000

[cache]
max_bytes = 1048576
ttl_secs = 60

{tenants}
{targets}
{models}"#,
            tenants = [tenant_toml("acme", ACME_KEY), tenant_toml("globex", GLOBEX_KEY)].join("\n"),
            targets = self.targets_toml(),
            models = [
                model_toml("gpt-test", &[("oa", Some("gpt-4o-mini"))]),
                model_toml("claude-test", &[("an", Some("claude-haiku-4-5"))]),
                model_toml("gpt-via-claude", &[("an", Some("claude-haiku-4-5"))]),
                model_toml("claude-via-gpt", &[("oa", Some("gpt-4o-mini"))]),
                model_toml("fallback", &[("oa", None), ("oa2", None), ("an", Some("claude-haiku-4-5"))]),
            ]
            .join("\n"),
        );
        Config::parse(&text).expect("the standard test config is valid")
    }

    /// The standard `[targets]` block: `oa` and `oa2` (OpenAI API, $1/$2 per million tokens) and
    /// `an` (Anthropic API, $3/$15), each one of these mocks (see [`mock_target_toml`]).
    pub fn targets_toml(&self) -> String {
        [
            mock_target_toml("oa", "openai", &format!("{}/v1", self.openai.url()), (1.0, 2.0)),
            mock_target_toml("oa2", "openai", &format!("{}/v1", self.openai2.url()), (1.0, 2.0)),
            mock_target_toml("an", "anthropic", &self.anthropic.url(), (3.0, 15.0)),
        ]
        .join("\n")
    }

    /// Requests received so far by oa, oa2 and an.
    pub fn request_counts(&self) -> [usize; 3] {
        [self.openai.request_count(), self.openai2.request_count(), self.anthropic.request_count()]
    }
}

/// The TOML of `[targets.NAME]` for a mock upstream speaking `api` (`openai` or `anthropic`) at
/// `base_url`: the upstream key from `${MERIDIAN_E2E_UPSTREAM_KEY}` (see [`UPSTREAM_KEY`]),
/// first-byte and chunk timeouts of 1 s, and `price` as (input, output) USD per million tokens.
pub fn mock_target_toml(name: &str, api: &str, base_url: &str, price: (f64, f64)) -> String {
    // The TOML names the variable: it is set before any config holding it is parsed.
    set_upstream_key();
    let (input, output) = price;
    format!(
        r#"[targets.{name}]
api = "{api}"
base_url = "{base_url}"
api_key = "${{MERIDIAN_E2E_UPSTREAM_KEY}}"
first_byte_timeout_ms = 1000
chunk_timeout_ms = 1000
price = {{ per = "token", input_usd_per_mtok = {input:?}, output_usd_per_mtok = {output:?} }}
"#
    )
}

/// The TOML of a `[[tenants]]` entry: tenant `name` with API key `key` (stored hashed).
pub fn tenant_toml(name: &str, key: &str) -> String {
    format!("[[tenants]]\nname = \"{name}\"\nkeys = [\"{}\"]\n", hash_key(key))
}

/// The TOML of a `[[models]]` entry: model `name` served by `routes` in fallback order, each a
/// target and the model's name there (`None`: the client's name for it).
pub fn model_toml(name: &str, routes: &[(&str, Option<&str>)]) -> String {
    format!("[[models]]\n{}", model_fields(name, routes))
}

/// Model `name` served by `routes` (as in [`model_toml`]), with the defaults a config file gets.
pub fn model(name: &str, routes: &[(&str, Option<&str>)]) -> ModelConfig {
    toml::from_str(&model_fields(name, routes)).expect("model config parses")
}

fn model_fields(name: &str, routes: &[(&str, Option<&str>)]) -> String {
    let routes: Vec<String> = routes
        .iter()
        .map(|(target, model)| match model {
            Some(model) => format!("{{ target = \"{target}\", model = \"{model}\" }}"),
            None => format!("{{ target = \"{target}\" }}"),
        })
        .collect();
    format!("name = \"{name}\"\ntargets = [{}]\n", routes.join(", "))
}

/// A per-token price: USD per million input and output tokens.
pub fn token_price(input_usd_per_mtok: f64, output_usd_per_mtok: f64) -> Option<PriceModel> {
    Some(PriceModel::token(input_usd_per_mtok, output_usd_per_mtok))
}

/// Edits of a [`Config`] by name. Each panics when the name is absent, so that a test never
/// edits nothing by mistake.
pub trait ConfigExt {
    /// Target `name`.
    fn target_mut(&mut self, name: &str) -> &mut TargetConfig;
    /// Tenant `name`.
    fn tenant_mut(&mut self, name: &str) -> &mut TenantConfig;
    /// Sets the first-byte and chunk timeouts of every target.
    fn set_timeouts(&mut self, first_byte_ms: u64, chunk_ms: u64);
}

impl ConfigExt for Config {
    fn target_mut(&mut self, name: &str) -> &mut TargetConfig {
        self.targets.get_mut(name).unwrap_or_else(|| panic!("no target {name}"))
    }

    fn tenant_mut(&mut self, name: &str) -> &mut TenantConfig {
        self.tenants.iter_mut().find(|t| t.name == name).unwrap_or_else(|| panic!("no tenant {name}"))
    }

    fn set_timeouts(&mut self, first_byte_ms: u64, chunk_ms: u64) {
        for t in self.targets.values_mut() {
            t.first_byte_timeout_ms = first_byte_ms;
            t.chunk_timeout_ms = chunk_ms;
        }
    }
}

fn set_upstream_key() {
    static ONCE: Once = Once::new();
    // Set once, before any edge reads it; tests never change it afterwards.
    ONCE.call_once(|| std::env::set_var("MERIDIAN_E2E_UPSTREAM_KEY", UPSTREAM_KEY));
}

/// An edge node serving on a loopback port until dropped.
pub struct TestEdge {
    /// Its address.
    pub addr: SocketAddr,
    /// Its state (metrics).
    pub edge: Arc<Edge>,
    shutdown: Option<oneshot::Sender<()>>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// The ledger's data directory, when the config left it at the default.
    _data: Option<TempDir>,
}

impl TestEdge {
    /// Starts an edge with `config`.
    pub async fn start(config: Config) -> TestEdge {
        TestEdge::try_start(config).await.unwrap_or_else(|e| panic!("edge starts: {e}"))
    }

    /// Starts an edge with `config`, or says why it could not start.
    pub async fn try_start(mut config: Config) -> Result<TestEdge, StartError> {
        // Each edge gets its own ledger unless the test chose one: many edges run in one process.
        let default = meridian::config::LedgerConfig::default();
        let data = (config.ledger.url.is_none() && config.ledger.dir == default.dir).then(|| {
            let dir = TempDir::new("ledger");
            config.ledger.dir = dir.path().to_path_buf();
            dir
        });
        let server = Server::bind(config).await?;
        let addr = server.local_addr();
        let edge = Arc::clone(server.edge());
        let (tx, rx) = oneshot::channel();
        tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Ok(TestEdge {
            addr,
            edge,
            shutdown: Some(tx),
            client: Client::builder(TokioExecutor::new()).build_http(),
            _data: data,
        })
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends a request with a raw body and returns the whole reply.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(format!("{}{path}", self.url()));
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let fut = async {
            let resp =
                self.client.request(req.body(Full::new(body)).expect("valid request")).await.expect("edge answers");
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp.into_body().collect().await.expect("body reads").to_bytes();
            Reply { status, headers, body }
        };
        tokio::time::timeout(Duration::from_secs(20), fut).await.expect("the edge answers within 20 s")
    }

    /// POSTs JSON as tenant `key`.
    pub async fn post(&self, path: &str, key: &str, body: &Value) -> Reply {
        self.post_with(path, key, &[], body).await
    }

    /// POSTs JSON with extra headers.
    pub async fn post_with(&self, path: &str, key: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
        self.send("POST", path, Some(key), headers, Bytes::from(body.to_string())).await
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> String {
        String::from_utf8(self.send("GET", "/metrics", None, &[], Bytes::new()).await.body.to_vec()).expect("utf-8")
    }
}

impl Drop for TestEdge {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A whole HTTP reply.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The answer's text of a 200 OpenAI-shaped reply, whole or streamed (a stream must end with
    /// `[DONE]`).
    pub fn answer_text(&self) -> String {
        assert_eq!(self.status, 200, "{}", self.text());
        if self.header("content-type") == Some("text/event-stream") {
            assert_eq!(self.events().last().map(|e| e.data.as_str()), Some("[DONE]"), "a clean end: {}", self.text());
            self.event_json().iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect()
        } else {
            self.json()["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string()
        }
    }

    /// The error `code` of an OpenAI-shaped error reply.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_default().to_string()
    }

    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as server-sent events.
    pub fn events(&self) -> Vec<SseEvent> {
        SseParser::default().push(&self.body).expect("the body is a valid event stream")
    }

    /// The `data` of each event parsed as JSON, skipping `[DONE]`.
    pub fn event_json(&self) -> Vec<Value> {
        self.events()
            .iter()
            .filter(|e| e.data != "[DONE]")
            .map(|e| serde_json::from_str(&e.data).expect("JSON data"))
            .collect()
    }
}

/// The value of a sample in Prometheus text, matched by metric name and a label substring such as
/// `tenant="acme",` (summed over every matching sample). Panics, naming the series present, when
/// no sample matches: a misspelled name or label never reads as 0. For a series that may
/// legitimately not exist yet, see [`metric_or_zero`].
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    samples(text, name, labels).unwrap_or_else(|| panic!("{}", missing(text, name, labels)))
}

/// Like [`metric`], but 0 when no sample matches, as long as the edge declares metric `name`
/// (its `# TYPE` line is there: the edge declares its metrics before their first sample). Panics
/// on a name the edge does not export.
pub fn metric_or_zero(text: &str, name: &str, labels: &[&str]) -> f64 {
    // A histogram's or summary's samples are its family's name with a suffix.
    let family = ["_count", "_sum", "_bucket"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
    let declared = text.lines().any(|l| {
        l.strip_prefix("# TYPE ").and_then(|t| t.split_once(' ')).is_some_and(|(n, _)| n == name || n == family)
    });
    assert!(declared, "{}", missing(text, name, labels));
    samples(text, name, labels).unwrap_or(0.0)
}

/// The sum of the samples of `name` whose labels contain every one of `labels`, if any does.
fn samples(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let values: Vec<f64> = series(text, name)
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The sample lines of metric `name`.
fn series<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    text.lines().filter(move |l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
}

/// Says that no sample of `name` matches `labels`, with the series of `name` present (or, when
/// there are none, every metric name declared).
fn missing(text: &str, name: &str, labels: &[&str]) -> String {
    let present: Vec<&str> = series(text, name).collect();
    if present.is_empty() {
        let declared: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
        format!("no metric {name}{labels:?}; the metrics declared: {declared:?}")
    } else {
        format!("no sample of {name} matches {labels:?}; its series:\n{}", present.join("\n"))
    }
}

/// The Python with the pinned packages of `scripts/test-requirements.txt` (the OpenAI and
/// Anthropic SDKs, Faker): `$MERIDIAN_PYTHON`, else the virtualenv `scripts/test` makes in
/// `.meridian/venv`. Panics, saying how to get one, when there is neither.
pub fn python() -> String {
    std::env::var("MERIDIAN_PYTHON").unwrap_or_else(|_| {
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../.meridian/venv/bin/python");
        assert!(
            Path::new(venv).exists(),
            "this test needs Python with the packages of scripts/test-requirements.txt: run scripts/test, or set MERIDIAN_PYTHON"
        );
        venv.to_string()
    })
}

/// The `node_modules` with the pinned packages of `tests/sdk/node/package.json` (the official
/// OpenAI Node SDK): `$MERIDIAN_NODE_SDK`, else the one `scripts/test` installs in
/// `.meridian/node-sdk`. Panics, saying how to get one, when there is neither.
pub fn node_sdk() -> String {
    std::env::var("MERIDIAN_NODE_SDK").unwrap_or_else(|_| {
        let modules = concat!(env!("CARGO_MANIFEST_DIR"), "/../.meridian/node-sdk/node_modules");
        assert!(
            Path::new(modules).join("openai").exists(),
            "this test needs the packages of tests/sdk/node/package.json: run scripts/test, or set MERIDIAN_NODE_SDK"
        );
        modules.to_string()
    })
}

/// Headless Chromium (Debian's `chromium`, which `scripts/test` installs as root):
/// `$MERIDIAN_CHROMIUM`, else `chromium` on the `PATH`. Panics, saying how to get it, when there
/// is neither.
pub fn chromium() -> String {
    std::env::var("MERIDIAN_CHROMIUM").unwrap_or_else(|_| {
        let found = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
            .map(|dir| dir.join("chromium"))
            .find(|p| p.is_file());
        let path = found.expect("this test needs headless Chromium: run scripts/test as root (apt-get install chromium), or set MERIDIAN_CHROMIUM");
        path.display().to_string()
    })
}

/// Where `scripts/build-plugins` writes plugins, under the target directory: the Rust plugins
/// (core modules the node encodes as components), then the test fixtures and the Python and
/// JavaScript plugins (components).
pub const PLUGIN_DIRS: [&str; 2] = ["wasm32-unknown-unknown/release", "wasm32-wasip2/release"];

/// The plugin `scripts/build-plugins` built for crate `name` (`pii-redactor` or `pii_redactor`),
/// in the first of [`PLUGIN_DIRS`] that holds it; `None` if it has not been built.
pub fn built_plugin(name: &str) -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let file = format!("{}.wasm", name.replace('-', "_"));
    PLUGIN_DIRS.iter().map(|dir| target.join(dir).join(&file)).find(|path| path.is_file())
}

/// [`built_plugin`], or a panic that says how to build it.
pub fn plugin_wasm(name: &str) -> PathBuf {
    built_plugin(name)
        .unwrap_or_else(|| panic!("plugin {name} is missing from {PLUGIN_DIRS:?}: run scripts/build-plugins"))
}

/// Adds plugin `name` to `config`: the component of crate `crate_name` (see [`plugin_wasm`]) with
/// its own settings `settings` (a JSON object) and a generous deadline of 2 s, so that a debug
/// build on a busy machine never times out by accident (tests that want a deadline set one).
pub fn add_plugin(config: &mut Config, name: &str, kind: PluginKind, crate_name: &str, settings: Value) {
    let table: toml::Table = serde_json::from_value(settings).expect("plugin settings are a JSON object");
    let plugin = PluginConfig {
        kind,
        path: plugin_wasm(crate_name),
        version: "1".into(),
        deadline_ms: 2_000,
        max_memory_bytes: None,
        config: table,
    };
    config.plugins.insert(name.to_string(), plugin);
}

/// A fresh directory under the system temp dir, removed (with its contents) when dropped: a
/// plugin artifact cache for one test.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `<tmp>/meridian-e2e-<pid>-<n>-<label>`.
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("meridian-e2e-{}-{n}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir is created");
        TempDir(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP meridian_requests_total Chat requests finished, by outcome
# TYPE meridian_requests_total counter
meridian_requests_total{status=\"ok\",tenant=\"acme\"} 2
meridian_requests_total{status=\"ok\",tenant=\"globex\"} 1
# HELP meridian_cost_usd_total Cost in USD under each target's price model
# TYPE meridian_cost_usd_total counter
# HELP meridian_time_to_first_token_seconds Time from request to first streamed content
# TYPE meridian_time_to_first_token_seconds histogram
";

    #[test]
    fn metric_sums_the_matching_samples() {
        assert_eq!(metric(TEXT, "meridian_requests_total", &[]), 3.0);
        assert_eq!(metric(TEXT, "meridian_requests_total", &["tenant=\"acme\""]), 2.0);
    }

    #[test]
    #[should_panic(expected = "no metric meridian_request_total")]
    fn metric_panics_on_a_name_that_does_not_exist() {
        metric(TEXT, "meridian_request_total", &[]);
    }

    #[test]
    #[should_panic(expected = "meridian_requests_total{status=\"ok\",tenant=\"globex\"} 1")]
    fn metric_panics_on_labels_no_sample_has_naming_the_series() {
        metric(TEXT, "meridian_requests_total", &["tenant=\"initech\""]);
    }

    #[test]
    fn metric_or_zero_is_zero_for_a_declared_metric_without_that_sample() {
        assert_eq!(metric_or_zero(TEXT, "meridian_cost_usd_total", &[]), 0.0);
        assert_eq!(metric_or_zero(TEXT, "meridian_requests_total", &["tenant=\"initech\""]), 0.0);
        assert_eq!(metric_or_zero(TEXT, "meridian_time_to_first_token_seconds_count", &[]), 0.0);
        assert_eq!(metric_or_zero(TEXT, "meridian_requests_total", &[]), 3.0);
    }

    #[test]
    #[should_panic(expected = "no metric meridian_cost_total")]
    fn metric_or_zero_panics_on_a_name_that_is_not_declared() {
        metric_or_zero(TEXT, "meridian_cost_total", &[]);
    }
}
