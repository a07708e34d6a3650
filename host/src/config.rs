//! The edge node's TOML configuration: one file per node, validated at start.
//!
//! Every error names the key it is about (`targets.openai.base_url: …`), so that a bad file is fixed
//! from the message alone. See the README's config reference for every key.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::accounting::PriceModel;
use crate::plugin::{CallLimits, PluginSettings};

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a wrong type (the message names key and line).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value that parsed but makes no sense.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, e.g. `models[0].targets[1].target`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

/// A secret from the environment; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret's text, for building an upstream request.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The whole node configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener and limits.
    #[serde(default)]
    pub node: NodeConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The prompt cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Tenants and their API keys.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// Upstream targets by name.
    #[serde(default)]
    pub targets: BTreeMap<String, TargetConfig>,
    /// The models clients may name, each with its ordered targets.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// `[plugin_runtime]`: limits shared by every plugin of the node.
    #[serde(default)]
    pub plugin_runtime: PluginSettings,
    /// `[plugins.NAME]`: the plugins tenants may use.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginConfig>,
    /// `[quic]`: this node's identity in the cluster, for engine and peer-edge targets and the
    /// relay listener.
    pub quic: Option<QuicConfig>,
    /// `[relay]`: accept requests relayed by other regions' edges over QUIC.
    pub relay: Option<RelayConfig>,
    /// `[health]`: outlier ejection and active probes of targets.
    #[serde(default)]
    pub health: HealthConfig,
    /// `[budgets]`: where the tenants' budget counters live, and the streams' credit chunk.
    #[serde(default)]
    pub budgets: BudgetSettings,
    /// `[ledger]`: the durable record of every request.
    #[serde(default)]
    pub ledger: LedgerConfig,
    /// `[status]`: the history the status page (`/admin/status`) charts.
    #[serde(default)]
    pub status: StatusConfig,
    /// `[telemetry]`: where the request spans go (OTLP over HTTP); none by default.
    #[serde(default)]
    pub telemetry: meridian_engine::telemetry::TelemetryConfig,
}

/// `[status]`: how often the edge samples its targets, cache and costs for the status page, and
/// how many samples it keeps (the default: every 5 s for the last 10 minutes).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// Time between samples (default 5000; at least 100).
    pub sample_interval_ms: u64,
    /// Samples kept, the oldest dropped first (default 120; 2 to 10 000).
    pub samples: usize,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig { sample_interval_ms: 5000, samples: 120 }
    }
}

/// `[ledger]`: where every request's record goes (see `crate::ledger`). On by default, in an
/// SQLite file in the node's data directory; a region with several edges points them all at one
/// PostgreSQL database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Whether requests are recorded (default true).
    pub enabled: bool,
    /// The node's data directory: the SQLite file (`ledger.db`) and the spill file of records the
    /// store could not take yet (`ledger-spill.jsonl`) live here (default `.meridian`).
    pub dir: PathBuf,
    /// The store: `sqlite:PATH` or `postgres://…` (may use `${VAR}`); default `sqlite:DIR/ledger.db`.
    pub url: Option<String>,
    /// Records are written at least this often, so a killed node loses at most this much
    /// (default 200 ms).
    pub flush_interval_ms: u64,
    /// Records waiting to be written before new requests wait for the writer (default 65536).
    pub queue_capacity: usize,
    /// Records older than this many days are deleted (default 90; 0 keeps them forever).
    pub retention_days: u32,
    /// How often a dedicated target's hours are written as standing costs (default 60 s).
    pub standing_interval_secs: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            enabled: true,
            dir: PathBuf::from(".meridian"),
            url: None,
            flush_interval_ms: 200,
            queue_capacity: 65_536,
            retention_days: 90,
            standing_interval_secs: 60,
        }
    }
}

impl LedgerConfig {
    /// The store's URL, environment variables expanded.
    pub fn store_url(&self) -> Result<String, ConfigError> {
        match &self.url {
            Some(url) => expand_env(url, "ledger.url"),
            None => Ok(format!("sqlite:{}", self.dir.join("ledger.db").display())),
        }
    }
}

/// Whether `url` names a Redis server (TCP or a Unix socket).
fn is_redis_url(url: &str) -> bool {
    url.starts_with("redis://") || url.starts_with("redis+unix://") || url.starts_with("unix://")
}

/// `[health]`: when a failing target is taken out of rotation, for how long, and how often
/// engine targets are probed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Consecutive failures that eject a target (default 5).
    pub ejection_threshold: u32,
    /// The first ejection's length; each ejection in a row doubles it (default 1000).
    pub base_ejection_ms: u64,
    /// The longest ejection (default 30000).
    pub max_ejection_ms: u64,
    /// How often each engine target's health is asked for (default 2000).
    pub probe_interval_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { ejection_threshold: 5, base_ejection_ms: 1000, max_ejection_ms: 30_000, probe_interval_ms: 2000 }
    }
}

/// `[relay]`: this edge accepts requests that peer edges relay to it, over the cluster's
/// mutual-TLS QUIC protocol (the same one engines speak, `engine/PROTOCOL.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// UDP address of the QUIC listener (the topology's `quic` address of this edge).
    pub listen: SocketAddr,
    /// Most relays a request may have taken to reach this edge and still be dispatched, and the
    /// most it may take in all: a request that arrives at the limit is served only by this
    /// edge's own (non-edge) targets. Default 1: one relay, never onwards.
    #[serde(default = "default_max_hops")]
    pub max_hops: u8,
    /// `[[relay.peers]]`: the peer edges this edge takes relayed requests from, each for some
    /// tenants. Any other node of the cluster (an engine, an edge not listed) is refused: the
    /// cluster CA signs every node's certificate, so the TLS handshake alone does not say who may
    /// relay. At least one is required.
    #[serde(default)]
    pub peers: Vec<RelayPeer>,
}

/// `[[relay.peers]]`: a peer edge this edge takes relayed requests from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayPeer {
    /// The peer's node name: the common name of its cluster certificate, its name in the topology.
    pub name: String,
    /// The peer's region: what it relays must come from there (its path ends with this region).
    pub region: String,
    /// The tenants whose requests it may relay here, each a tenant of this edge.
    pub tenants: Vec<String>,
}

/// The hop limit of an edge without a `[relay]` section (for the requests it relays itself).
pub const DEFAULT_MAX_HOPS: u8 = 1;

fn default_max_hops() -> u8 {
    DEFAULT_MAX_HOPS
}

/// `[quic]`: PEM files of the cluster's mutual TLS (`meridian certs` makes them). Relative paths
/// are taken from the config file's folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicConfig {
    /// The cluster CA: peers must present certificates it signed.
    pub ca: PathBuf,
    /// This node's certificate chain.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// What a plugin is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// A privacy filter (`privacy-filter` world).
    Filter,
    /// A router (`router` world).
    Router,
}

/// `[plugins.NAME]`: one plugin component and its settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Filter or router.
    pub kind: PluginKind,
    /// The component (`.wasm`); a relative path is taken from the config file's folder.
    pub path: PathBuf,
    /// Its version, for logs, metrics and quarantine.
    #[serde(default = "defaults::plugin_version")]
    pub version: String,
    /// Time for one call, instantiation included.
    #[serde(default = "defaults::plugin_deadline_ms")]
    pub deadline_ms: u64,
    /// Memory cap of one instance; defaults to `plugin_runtime.max_memory_bytes`.
    pub max_memory_bytes: Option<usize>,
    /// The plugin's own settings, given to its `configure` as JSON.
    #[serde(default)]
    pub config: toml::Table,
}

impl PluginConfig {
    /// The per-call limits.
    pub fn limits(&self) -> CallLimits {
        CallLimits { deadline_ms: self.deadline_ms, max_memory_bytes: self.max_memory_bytes }
    }

    /// Its settings as the JSON text `configure` receives.
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".into())
    }
}

/// `[node]`: where and how the edge listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// This node's region name.
    pub region: String,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// Requests served at once before answering 503.
    pub max_in_flight: usize,
    /// Time allowed for a request's headers.
    pub header_read_timeout_ms: u64,
    /// Time allowed for a request's body.
    pub body_read_timeout_ms: u64,
    /// How long a client may leave the response unread (no byte of it taken) before the edge
    /// ends it: the stream, its upstream, its plugin instances and its tenant's place go, and
    /// the request is recorded as `client_closed`.
    pub client_write_timeout_ms: u64,
    /// Requests one tenant may have in flight at once, unless its own `max_concurrent_requests`
    /// says otherwise: one tenant cannot take every place under `max_in_flight`.
    pub tenant_max_concurrent_requests: u32,
    /// Serve HTTPS with this certificate and key.
    pub tls: Option<TlsConfig>,
    /// SHA-256 hashes (`sha256:<hex>`) of the keys allowed on `/admin/…` endpoints; none
    /// disables them.
    pub admin_keys: Vec<String>,
    /// SHA-256 hashes (`sha256:<hex>`) of the keys `GET /metrics` and `GET /readyz` require (as
    /// `Authorization: Bearer <key>`; an `admin_keys` key is accepted too). None (the default):
    /// both are open, as they always were; a node reachable by untrusted clients should set one.
    pub observer_keys: Vec<String>,
    /// On SIGTERM or Ctrl-C, how long requests in flight (streams included) have to finish
    /// before those left end with a `shutting_down` error event. `/readyz` answers 503 from the
    /// signal on, and new requests are refused with 503 `shutting_down`.
    pub shutdown_grace_ms: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            region: "local".into(),
            max_body_bytes: 4 << 20,
            max_in_flight: 10_000,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            client_write_timeout_ms: 30_000,
            tenant_max_concurrent_requests: 1_000,
            tls: None,
            admin_keys: Vec::new(),
            observer_keys: Vec::new(),
            shutdown_grace_ms: 30_000,
        }
    }
}

/// `[node.tls]`: PEM files for HTTPS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// Also serve HTTP/3 on the listen port over UDP, and advertise it on the TCP listener with
    /// `Alt-Svc` (default false).
    #[serde(default)]
    pub http3: bool,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `meridian=debug`; `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".into() }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// `[cache]`: the edge prompt cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Turn the cache on or off for every tenant.
    pub enabled: bool,
    /// Upper bound of cached answers' size.
    pub max_bytes: u64,
    /// How long an answer stays.
    pub ttl_secs: u64,
    /// The largest answer kept (its content bytes): a stream past it is still sent, not cached.
    pub max_entry_bytes: u64,
    /// `redis://…` (may use `${VAR}`): a second level shared by every edge pointed at the same
    /// server, so that a prompt cached by one is a hit on the others; absent, each edge caches
    /// alone.
    pub redis_url: Option<String>,
    /// How long one Redis command may take before the edge serves from its own cache alone
    /// (default 200).
    pub redis_timeout_ms: u64,
    /// The prefix of the shared level's Redis keys (default `meridian:cache`).
    pub key_prefix: String,
    /// How long an edge that misses waits for another edge filling the same entry before it
    /// calls upstream itself (default 10000).
    pub coalesce_wait_ms: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            max_bytes: 256 << 20,
            ttl_secs: 600,
            max_entry_bytes: 4 << 20,
            redis_url: None,
            redis_timeout_ms: 200,
            key_prefix: "meridian:cache".into(),
            coalesce_wait_ms: 10_000,
        }
    }
}

impl CacheConfig {
    /// The shared level's URL, with `${VAR}`s expanded.
    pub fn redis_url(&self) -> Result<Option<String>, ConfigError> {
        self.redis_url.as_deref().map(|url| expand_env(url, "cache.redis_url")).transpose()
    }

    /// The largest answer kept: `max_entry_bytes`, or the whole cache if that is smaller.
    pub fn entry_limit(&self) -> usize {
        usize::try_from(self.max_entry_bytes.min(self.max_bytes)).unwrap_or(usize::MAX)
    }
}

/// `[[tenants]]`: who may call, and how.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Its name (a metrics label).
    pub name: String,
    /// SHA-256 of each API key, as `sha256:<hex>` (`meridian key hash KEY` prints it).
    pub keys: Vec<String>,
    /// When answers are cached.
    #[serde(default)]
    pub cache: CachePolicy,
    /// Sustained request rate; unlimited when absent.
    pub requests_per_second: Option<u32>,
    /// Requests it may have in flight at once, each from its arrival until its answer (or
    /// stream) ends or its client goes away; more are refused with 429 `tenant_concurrency`.
    /// Absent: `node.tenant_max_concurrent_requests`.
    pub max_concurrent_requests: Option<u32>,
    /// Requests allowed in a burst above the rate (defaults to the rate).
    pub burst: Option<u32>,
    /// Privacy filters run on every request, in order (names from `[plugins]`).
    #[serde(default)]
    pub filters: Vec<String>,
    /// The router that orders targets (a name from `[plugins]`); the static order when absent.
    pub router: Option<String>,
    /// Regions the tenant's data may be processed in; empty means any. Routers enforce it.
    #[serde(default)]
    pub allowed_regions: Vec<String>,
    /// The highest cost in USD the tenant accepts for one request, for routers that price.
    pub price_cap_usd: Option<f64>,
    /// Whether its requests may be relayed to another region's edge (`api = "edge"` targets).
    #[serde(default)]
    pub relay: RelayPolicy,
    /// `[tenants.budgets]`: its spend and token limits (see `crate::budget`); none when empty.
    #[serde(default)]
    pub budgets: TenantBudgets,
    /// `[tenants.answer_batch]`: how a streamed answer's pieces are gathered for its filters.
    #[serde(default)]
    pub answer_batch: AnswerBatchConfig,
}

/// `[tenants.answer_batch]`: pieces of a streamed answer gathered into one call of each filter.
/// A burst (what has already arrived) is always one call; with `max_wait_ms` the edge also waits
/// for more, up to that long after the first piece or until `max_bytes` of text have come, so
/// that a model streaming a token at a time costs a filter call per batch rather than per token.
/// The wait is added to when the client sees those pieces: at most `max_wait_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnswerBatchConfig {
    /// Longest a piece waits for more; 0 (the default) waits for none. At most 1000.
    pub max_wait_ms: u64,
    /// Text (bytes) that ends the wait early; at least 1.
    pub max_bytes: usize,
}

impl Default for AnswerBatchConfig {
    fn default() -> Self {
        AnswerBatchConfig { max_wait_ms: 0, max_bytes: 1024 }
    }
}

/// `[tenants.budgets]`: a tenant's limits, each absent (no limit) or a maximum. Days and months
/// are UTC calendar periods, minutes clock minutes.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantBudgets {
    /// USD a day.
    pub usd_per_day: Option<f64>,
    /// USD a month.
    pub usd_per_month: Option<f64>,
    /// Tokens (prompt and output) a day.
    pub tokens_per_day: Option<u64>,
    /// Tokens a month.
    pub tokens_per_month: Option<u64>,
    /// Tokens a minute (TPM).
    pub tokens_per_minute: Option<u64>,
    /// Requests a minute (RPM).
    pub requests_per_minute: Option<u64>,
}

/// `[budgets]`: where budget counters live, shared by every tenant of the node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetSettings {
    /// `redis://…` (may use `${VAR}`): counters shared by every edge pointed at the same server;
    /// absent, they live in this process alone.
    pub redis_url: Option<String>,
    /// The prefix of every Redis key (default `meridian:budget`).
    pub key_prefix: String,
    /// Output tokens a stream with no output limit is granted at a time (default 256).
    pub credit_chunk_tokens: u32,
    /// How long one Redis command may take before the request is refused (default 1000).
    pub redis_timeout_ms: u64,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        BudgetSettings {
            redis_url: None,
            key_prefix: "meridian:budget".into(),
            credit_chunk_tokens: 256,
            redis_timeout_ms: 1000,
        }
    }
}

impl BudgetSettings {
    /// The Redis URL, environment variables expanded.
    pub fn redis_url(&self) -> Result<Option<String>, ConfigError> {
        self.redis_url.as_deref().map(|url| expand_env(url, "budgets.redis_url")).transpose()
    }
}

/// A tenant's rule for handing requests to other regions' edges. Whatever it says, routers still
/// apply `allowed_regions` to peer edges as to any target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayPolicy {
    /// Relayed like any target.
    #[default]
    Allowed,
    /// Relayed only after the tenant's filters ran and left no unredacted personal data (no
    /// `pii.*` label without `.redacted`); needs at least one filter.
    Redacted,
    /// Never relayed.
    Never,
}

/// A tenant's cache policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CachePolicy {
    /// Cache deterministic answers (temperature 0, or a seed).
    #[default]
    Auto,
    /// Cache every answer.
    Always,
    /// Never cache.
    Never,
}

/// The wire protocol a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetApi {
    /// OpenAI chat completions (OpenAI, OpenRouter, vLLM, serverless endpoints…).
    Openai,
    /// Anthropic Messages.
    Anthropic,
    /// A Meridian engine node over QUIC with mutual TLS (`base_url = "quic://host:port"`, the
    /// node's identity from `[quic]`).
    Engine,
    /// Another region's Meridian edge, which dispatches relayed requests with its own targets
    /// (`base_url = "quic://host:port"` of its `[relay]` listener; `kind = "remote_edge"`).
    Edge,
}

impl TargetApi {
    /// Whether it is reached over the cluster's QUIC protocol rather than HTTPS.
    pub fn is_quic(self) -> bool {
        matches!(self, TargetApi::Engine | TargetApi::Edge)
    }
}

/// How capacity behind a target is bought; routers weigh it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    /// Pay per token.
    #[default]
    Managed,
    /// Pay per GPU-second while busy.
    Serverless,
    /// Pay per hour, busy or not.
    Dedicated,
    /// Another region's edge (`api = "edge"`); what it costs is accounted there.
    RemoteEdge,
}

impl TargetKind {
    /// Its name in config, metrics and the ledger.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Managed => "managed",
            TargetKind::Serverless => "serverless",
            TargetKind::Dedicated => "dedicated",
            TargetKind::RemoteEdge => "remote_edge",
        }
    }
}

/// `[targets.NAME]`: one upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Its wire protocol.
    pub api: TargetApi,
    /// Base URL: OpenAI-style with `/v1` (`https://api.openai.com/v1`), Anthropic-style without
    /// (`https://api.anthropic.com`), as each vendor's SDK takes it. May use `${VAR}`.
    pub base_url: String,
    /// API key; `${VAR}` takes it from the environment. An empty key sends no auth header.
    pub api_key: Option<String>,
    /// How its capacity is bought.
    #[serde(default)]
    pub kind: TargetKind,
    /// Where it runs.
    pub region: Option<String>,
    /// Whether it runs on the operator's own infrastructure, where data residency rules do not
    /// apply.
    #[serde(default)]
    pub own_infrastructure: bool,
    /// Its price model; a model route may override it.
    pub price: Option<PriceModel>,
    /// TCP + TLS connect limit.
    #[serde(default = "defaults::connect_ms")]
    pub connect_timeout_ms: u64,
    /// Limit until the response head arrives.
    #[serde(default = "defaults::first_byte_ms")]
    pub first_byte_timeout_ms: u64,
    /// Limit between two body chunks; on a stream, between two events that carry something
    /// (keep-alives do not count).
    #[serde(default = "defaults::chunk_ms")]
    pub chunk_timeout_ms: u64,
    /// Limit from sending a streamed request to its first content (text or a tool call; neither
    /// the response head nor keep-alives count).
    #[serde(default = "defaults::first_token_ms")]
    pub first_token_timeout_ms: u64,
    /// Limit on a whole answer, from sending the request to its last byte.
    #[serde(default = "defaults::total_ms")]
    pub total_timeout_ms: u64,
    /// The most bytes one streamed answer may take.
    #[serde(default = "defaults::max_stream_bytes")]
    pub max_stream_bytes: u64,
    /// The most bytes one server-sent event of a stream may take (its lines, ended or not).
    #[serde(default = "defaults::max_event_bytes")]
    pub max_event_bytes: u64,
    /// Extra headers (OpenRouter's `HTTP-Referer`…); values may use `${VAR}`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `anthropic-version` header for Anthropic targets.
    #[serde(default = "defaults::anthropic_version")]
    pub anthropic_version: String,
    /// For engine targets: the name its certificate must carry; the URL's host when absent.
    pub server_name: Option<String>,
}

mod defaults {
    pub fn connect_ms() -> u64 {
        5_000
    }
    pub fn first_byte_ms() -> u64 {
        60_000
    }
    pub fn chunk_ms() -> u64 {
        30_000
    }
    /// Reasoning models may think for minutes before their first token.
    pub fn first_token_ms() -> u64 {
        300_000
    }
    pub fn total_ms() -> u64 {
        900_000
    }
    pub fn max_stream_bytes() -> u64 {
        64 << 20
    }
    pub fn max_event_bytes() -> u64 {
        1 << 20
    }
    pub fn anthropic_version() -> String {
        "2023-06-01".into()
    }
    pub fn max_tokens() -> u32 {
        4096
    }
    pub fn plugin_version() -> String {
        "1".into()
    }
    pub fn plugin_deadline_ms() -> u64 {
        20
    }
}

impl TargetConfig {
    /// Connect limit.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    /// First-byte limit.
    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_millis(self.first_byte_timeout_ms)
    }
    /// Between-chunk limit.
    pub fn chunk_timeout(&self) -> Duration {
        Duration::from_millis(self.chunk_timeout_ms)
    }
    /// Time-to-first-token limit.
    pub fn first_token_timeout(&self) -> Duration {
        Duration::from_millis(self.first_token_timeout_ms)
    }
    /// Whole-answer limit.
    pub fn total_timeout(&self) -> Duration {
        Duration::from_millis(self.total_timeout_ms)
    }
}

/// `[[models]]`: a model name clients use and where it is served, in fallback order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients send.
    pub name: String,
    /// Targets, primary first.
    pub targets: Vec<RouteConfig>,
    /// Output limit sent to upstreams that require one (Anthropic) when the client gave none.
    #[serde(default = "defaults::max_tokens")]
    pub default_max_tokens: u32,
}

/// One entry of a model's target list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A key of `[targets]`.
    pub target: String,
    /// The model's name at that target; defaults to the client-facing name.
    pub model: Option<String>,
    /// Price of this model on that target, overriding the target's.
    pub price: Option<PriceModel>,
}

/// A target's settings that may come from the environment, after `${VAR}` expansion.
#[derive(Debug, Clone)]
pub struct TargetEnv {
    /// The base URL.
    pub base_url: String,
    /// The API key, if one is set and not empty.
    pub api_key: Option<Secret>,
    /// Extra headers, expanded.
    pub headers: Vec<(String, Secret)>,
}

impl Config {
    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.into(), message },
            other => other,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        let paths = config.plugins.values_mut().map(|p| &mut p.path);
        let quic = config.quic.iter_mut().flat_map(|q| [&mut q.ca, &mut q.cert, &mut q.key]);
        for path in paths.chain(quic) {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: PathBuf::new(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Expands a target's `${VAR}` references; a variable that is not set (and has no `:-`
    /// default) is an error naming the key.
    pub fn target_env(&self, name: &str) -> Result<TargetEnv, ConfigError> {
        let target = self.targets.get(name).ok_or_else(|| invalid(format!("targets.{name}"), "no such target"))?;
        let key = |field: &str| format!("targets.{name}.{field}");
        let base_url = expand_env(&target.base_url, &key("base_url"))?;
        let parsed: hyper::Uri =
            base_url.parse().map_err(|e| invalid(key("base_url"), format!("not a URL ({e}): `{base_url}`")))?;
        let (schemes, what) = match target.api.is_quic() {
            true => (&["quic"][..], "a quic://host:port URL"),
            false => (&["http", "https"][..], "an absolute http:// or https:// URL"),
        };
        if !parsed.scheme_str().is_some_and(|s| schemes.contains(&s)) || parsed.host().is_none() {
            return Err(invalid(key("base_url"), format!("must be {what}, not `{base_url}`")));
        }
        if target.api.is_quic() && parsed.port_u16().is_none() {
            return Err(invalid(key("base_url"), format!("needs a port: `{base_url}`")));
        }
        let api_key = match &target.api_key {
            Some(v) => Some(expand_env(v, &key("api_key"))?).filter(|k| !k.is_empty()).map(Secret),
            None => None,
        };
        let headers = target
            .headers
            .iter()
            .map(|(k, v)| Ok((k.clone(), Secret(expand_env(v, &key(&format!("headers.{k}")))?))))
            .collect::<Result<_, ConfigError>>()?;
        Ok(TargetEnv { base_url, api_key, headers })
    }

    /// `[[relay.peers]]`: at least one; each a usable node name listed once, in another region,
    /// for some of this edge's tenants.
    fn validate_relay_peers(&self, peers: &[RelayPeer]) -> Result<(), ConfigError> {
        if peers.is_empty() {
            return Err(invalid(
                "relay.peers",
                "needs at least one peer edge ([[relay.peers]] with name, region and tenants): with none every relayed request is refused",
            ));
        }
        let mut names = HashSet::new();
        for (i, p) in peers.iter().enumerate() {
            let key = format!("relay.peers[{i}]");
            meridian_engine::certs::check_node_name(&p.name)
                .map_err(|e| invalid(format!("{key}.name"), e.to_string()))?;
            if !names.insert(&p.name) {
                return Err(invalid(format!("{key}.name"), format!("duplicate peer `{}`", p.name)));
            }
            if p.region.is_empty() {
                return Err(invalid(format!("{key}.region"), "must not be empty"));
            }
            if p.region == self.node.region {
                return Err(invalid(
                    format!("{key}.region"),
                    format!("is this node's own region `{}`: relay is between regions", p.region),
                ));
            }
            if p.tenants.is_empty() {
                return Err(invalid(
                    format!("{key}.tenants"),
                    format!("needs at least one tenant: those whose requests `{}` may relay here", p.name),
                ));
            }
            let mut listed = HashSet::new();
            for (j, t) in p.tenants.iter().enumerate() {
                let key = format!("{key}.tenants[{j}]");
                if !self.tenants.iter().any(|c| c.name == *t) {
                    let known: Vec<_> = self.tenants.iter().map(|c| c.name.as_str()).collect();
                    return Err(invalid(key, format!("unknown tenant `{t}` (known: {})", known.join(", "))));
                }
                if !listed.insert(t) {
                    return Err(invalid(key, format!("tenant `{t}` is already listed")));
                }
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.node;
        if n.max_body_bytes == 0 {
            return Err(invalid("node.max_body_bytes", "must be greater than 0"));
        }
        if n.max_in_flight == 0 {
            return Err(invalid("node.max_in_flight", "must be greater than 0"));
        }
        for (key, v) in [
            ("header_read_timeout_ms", n.header_read_timeout_ms),
            ("body_read_timeout_ms", n.body_read_timeout_ms),
            ("client_write_timeout_ms", n.client_write_timeout_ms),
            ("tenant_max_concurrent_requests", u64::from(n.tenant_max_concurrent_requests)),
        ] {
            if v == 0 {
                return Err(invalid(format!("node.{key}"), "must be greater than 0"));
            }
        }
        for (i, k) in n.admin_keys.iter().enumerate() {
            parse_key_hash(k).map_err(|m| invalid(format!("node.admin_keys[{i}]"), m))?;
        }
        for (i, k) in n.observer_keys.iter().enumerate() {
            parse_key_hash(k).map_err(|m| invalid(format!("node.observer_keys[{i}]"), m))?;
        }
        if n.shutdown_grace_ms == 0 || n.shutdown_grace_ms > 3_600_000 {
            return Err(invalid("node.shutdown_grace_ms", "must be between 1 and 3600000"));
        }
        let l = &self.ledger;
        if l.enabled {
            if l.flush_interval_ms == 0 || l.flush_interval_ms > 60_000 {
                return Err(invalid("ledger.flush_interval_ms", "must be between 1 and 60000"));
            }
            if l.queue_capacity == 0 {
                return Err(invalid("ledger.queue_capacity", "must be greater than 0"));
            }
            if l.standing_interval_secs == 0 {
                return Err(invalid("ledger.standing_interval_secs", "must be greater than 0"));
            }
            let url = l.store_url()?;
            if !(url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(invalid("ledger.url", "must be `sqlite:PATH` or `postgres://…`"));
            }
        }
        let b = &self.budgets;
        if b.credit_chunk_tokens == 0 {
            return Err(invalid("budgets.credit_chunk_tokens", "must be greater than 0"));
        }
        if b.redis_timeout_ms == 0 {
            return Err(invalid("budgets.redis_timeout_ms", "must be greater than 0"));
        }
        if b.key_prefix.is_empty() {
            return Err(invalid("budgets.key_prefix", "must not be empty"));
        }
        if let Some(url) = b.redis_url()? {
            if !is_redis_url(&url) {
                return Err(invalid("budgets.redis_url", format!("must be a redis:// URL, not `{url}`")));
            }
        }
        let h = &self.health;
        if h.ejection_threshold == 0 {
            return Err(invalid("health.ejection_threshold", "must be greater than 0"));
        }
        if h.base_ejection_ms == 0 {
            return Err(invalid("health.base_ejection_ms", "must be greater than 0"));
        }
        if h.max_ejection_ms < h.base_ejection_ms {
            return Err(invalid("health.max_ejection_ms", "must not be less than health.base_ejection_ms"));
        }
        if h.probe_interval_ms == 0 {
            return Err(invalid("health.probe_interval_ms", "must be greater than 0"));
        }
        if self.status.sample_interval_ms < 100 {
            return Err(invalid("status.sample_interval_ms", "must be at least 100"));
        }
        if !(2..=10_000).contains(&self.status.samples) {
            return Err(invalid("status.samples", "must be from 2 to 10000"));
        }
        if self.cache.enabled && self.cache.max_bytes == 0 {
            return Err(invalid("cache.max_bytes", "must be greater than 0 when the cache is enabled"));
        }
        if self.cache.redis_timeout_ms == 0 || self.cache.coalesce_wait_ms == 0 {
            return Err(invalid("cache.redis_timeout_ms", "and cache.coalesce_wait_ms must be greater than 0"));
        }
        if let Some(url) = self.cache.redis_url()? {
            if !is_redis_url(&url) {
                return Err(invalid("cache.redis_url", format!("must be a redis:// URL, not `{url}`")));
            }
        }
        if self.cache.enabled && self.cache.max_entry_bytes == 0 {
            return Err(invalid("cache.max_entry_bytes", "must be greater than 0 when the cache is enabled"));
        }
        let mut tenant_names = HashSet::new();
        let mut key_hashes = HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            if t.name.is_empty() {
                return Err(invalid(format!("tenants[{i}].name"), "must not be empty"));
            }
            if !tenant_names.insert(&t.name) {
                return Err(invalid(format!("tenants[{i}].name"), format!("duplicate tenant `{}`", t.name)));
            }
            if t.keys.is_empty() {
                return Err(invalid(format!("tenants[{i}].keys"), "needs at least one key hash"));
            }
            for (j, k) in t.keys.iter().enumerate() {
                let key = format!("tenants[{i}].keys[{j}]");
                let digest = parse_key_hash(k).map_err(|m| invalid(&key, m))?;
                if !key_hashes.insert(digest) {
                    return Err(invalid(key, "this key hash is already listed"));
                }
            }
            if t.requests_per_second == Some(0) {
                return Err(invalid(format!("tenants[{i}].requests_per_second"), "must be greater than 0"));
            }
            if t.burst == Some(0) {
                return Err(invalid(format!("tenants[{i}].burst"), "must be greater than 0"));
            }
            if t.max_concurrent_requests == Some(0) {
                return Err(invalid(format!("tenants[{i}].max_concurrent_requests"), "must be greater than 0"));
            }
            let wants = t
                .filters
                .iter()
                .enumerate()
                .map(|(j, f)| (format!("tenants[{i}].filters[{j}]"), f, PluginKind::Filter));
            let router = t.router.iter().map(|r| (format!("tenants[{i}].router"), r, PluginKind::Router));
            for (key, name, kind) in wants.chain(router) {
                match self.plugins.get(name) {
                    None => {
                        let known: Vec<_> = self.plugins.keys().map(String::as_str).collect();
                        return Err(invalid(key, format!("unknown plugin `{name}` (known: {})", known.join(", "))));
                    }
                    Some(p) if p.kind != kind => {
                        return Err(invalid(key, format!("plugin `{name}` is a {:?}, not a {kind:?}", p.kind)));
                    }
                    Some(_) => {}
                }
            }
            if t.answer_batch.max_wait_ms > 1000 {
                return Err(invalid(format!("tenants[{i}].answer_batch.max_wait_ms"), "must be at most 1000"));
            }
            if t.answer_batch.max_bytes == 0 {
                return Err(invalid(format!("tenants[{i}].answer_batch.max_bytes"), "must be at least 1"));
            }
            if t.price_cap_usd.is_some_and(|c| !c.is_finite() || c < 0.0) {
                return Err(invalid(format!("tenants[{i}].price_cap_usd"), "must be a non-negative number"));
            }
            let b = &t.budgets;
            for (key, usd) in [("usd_per_day", b.usd_per_day), ("usd_per_month", b.usd_per_month)] {
                if usd.is_some_and(|v| !v.is_finite() || v < 0.0) {
                    return Err(invalid(format!("tenants[{i}].budgets.{key}"), "must be a non-negative number"));
                }
            }
            if t.relay == RelayPolicy::Redacted && t.filters.is_empty() {
                return Err(invalid(
                    format!("tenants[{i}].relay"),
                    "`redacted` needs at least one filter: without one nothing is redacted or labelled",
                ));
            }
        }
        for (name, t) in &self.targets {
            let key = format!("targets.{name}");
            for (field, v) in [
                ("connect_timeout_ms", t.connect_timeout_ms),
                ("first_byte_timeout_ms", t.first_byte_timeout_ms),
                ("chunk_timeout_ms", t.chunk_timeout_ms),
                ("first_token_timeout_ms", t.first_token_timeout_ms),
                ("total_timeout_ms", t.total_timeout_ms),
                ("max_stream_bytes", t.max_stream_bytes),
                ("max_event_bytes", t.max_event_bytes),
            ] {
                if v == 0 {
                    return Err(invalid(format!("{key}.{field}"), "must be greater than 0"));
                }
            }
            if t.max_event_bytes > t.max_stream_bytes {
                return Err(invalid(format!("{key}.max_event_bytes"), "must not exceed max_stream_bytes"));
            }
            if let Some(p) = &t.price {
                p.validate().map_err(|m| invalid(format!("{key}.price"), m))?;
            }
            for h in t.headers.keys() {
                if hyper::header::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return Err(invalid(format!("{key}.headers"), format!("`{h}` is not a valid header name")));
                }
            }
            if t.api.is_quic() {
                if self.quic.is_none() {
                    return Err(invalid(
                        format!("{key}.api"),
                        "engine and edge targets need the [quic] section (cluster CA, node certificate and key; `meridian certs` makes them)",
                    ));
                }
                if t.api_key.is_some() || !t.headers.is_empty() {
                    return Err(invalid(
                        format!("{key}.api_key"),
                        "engine and edge targets authenticate with the [quic] certificates, not keys or headers",
                    ));
                }
            }
            if (t.api == TargetApi::Edge) != (t.kind == TargetKind::RemoteEdge) {
                return Err(invalid(
                    format!("{key}.kind"),
                    "`api = \"edge\"` and `kind = \"remote_edge\"` go together",
                ));
            }
            if t.api == TargetApi::Edge {
                match &t.region {
                    None => {
                        return Err(invalid(
                            format!("{key}.region"),
                            "edge targets need their region (loops are detected by region)",
                        ))
                    }
                    Some(r) if *r == self.node.region => {
                        return Err(invalid(
                            format!("{key}.region"),
                            format!("is this node's own region `{r}`: relay is between regions"),
                        ))
                    }
                    Some(_) => {}
                }
            }
            self.target_env(name)?;
        }
        if let Some(r) = &self.relay {
            if self.quic.is_none() {
                return Err(invalid(
                    "relay",
                    "the relay listener needs the [quic] section (this node's cluster identity)",
                ));
            }
            if r.max_hops == 0 {
                return Err(invalid("relay.max_hops", "must be at least 1 (0 would refuse every relayed request)"));
            }
            self.validate_relay_peers(&r.peers)?;
        }
        for (name, p) in &self.plugins {
            if p.deadline_ms == 0 {
                return Err(invalid(format!("plugins.{name}.deadline_ms"), "must be greater than 0"));
            }
        }
        let mut model_names = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            if m.name.is_empty() {
                return Err(invalid(format!("models[{i}].name"), "must not be empty"));
            }
            if !model_names.insert(&m.name) {
                return Err(invalid(format!("models[{i}].name"), format!("duplicate model `{}`", m.name)));
            }
            if m.targets.is_empty() {
                return Err(invalid(format!("models[{i}].targets"), "needs at least one target"));
            }
            for (j, r) in m.targets.iter().enumerate() {
                if !self.targets.contains_key(&r.target) {
                    let known: Vec<_> = self.targets.keys().map(String::as_str).collect();
                    return Err(invalid(
                        format!("models[{i}].targets[{j}].target"),
                        format!("unknown target `{}` (known: {})", r.target, known.join(", ")),
                    ));
                }
                if let Some(p) = &r.price {
                    p.validate().map_err(|msg| invalid(format!("models[{i}].targets[{j}].price"), msg))?;
                }
            }
        }
        Ok(())
    }
}

/// SHA-256 of an API key in the `sha256:<hex>` form that `keys` holds.
pub fn hash_key(key: &str) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(key.as_bytes())))
}

/// Parses `sha256:<64 hex digits>`.
pub fn parse_key_hash(s: &str) -> Result<[u8; 32], String> {
    let hex_part = s.strip_prefix("sha256:").ok_or("must start with `sha256:` (see `meridian key hash`)")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).map_err(|_| "expected 64 hex digits after `sha256:`".to_string())?;
    Ok(out)
}

/// Replaces every `${VAR}` or `${VAR:-default}` in `value` with the variable's value (or the
/// default when the variable is unset or empty).
fn expand_env(value: &str, key: &str) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| invalid(key, "unterminated `${` reference"))?;
        let (var, default) = match after[..end].split_once(":-") {
            Some((var, default)) => (var, Some(default)),
            None => (&after[..end], None),
        };
        if var.is_empty() {
            return Err(invalid(key, "empty `${}` reference"));
        }
        match (std::env::var(var).ok().filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(invalid(key, format!("environment variable {var} is not set (or empty or not UTF-8)")))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        [[tenants]]
        name = "acme"
        keys = ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
        [targets.oa]
        api = "openai"
        base_url = "http://127.0.0.1:9/v1"
        [[models]]
        name = "m"
        targets = [{ target = "oa" }]
    "#;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_valid_file_parses() {
        let c = Config::parse(BASE).unwrap();
        assert_eq!(c.models[0].default_max_tokens, 4096);
        assert_eq!(c.node.listen.port(), 8080);
    }

    #[test]
    fn observer_keys_and_the_shutdown_grace_have_defaults_and_are_checked() {
        let c = Config::parse(BASE).unwrap();
        assert!(c.node.observer_keys.is_empty(), "/metrics and /readyz are open by default");
        assert_eq!(c.node.shutdown_grace_ms, 30_000);
        let node = |field: &str| format!("[node]\n{field}\n{BASE}");
        assert!(err(&node("observer_keys = [\"secret\"]")).starts_with("node.observer_keys[0]"));
        assert_eq!(err(&node("shutdown_grace_ms = 0")), "node.shutdown_grace_ms: must be between 1 and 3600000");
        assert!(Config::parse(&node("shutdown_grace_ms = 5000")).is_ok());
    }

    #[test]
    fn a_tenants_answer_batch_is_off_by_default_and_bounded() {
        let c = Config::parse(BASE).unwrap();
        assert_eq!(c.tenants[0].answer_batch, AnswerBatchConfig { max_wait_ms: 0, max_bytes: 1024 });
        let batch =
            |fields: &str| BASE.replace("[targets.oa]", &format!("[tenants.answer_batch]\n{fields}\n[targets.oa]"));
        let c = Config::parse(&batch("max_wait_ms = 20")).unwrap();
        assert_eq!(c.tenants[0].answer_batch.max_wait_ms, 20);
        assert_eq!(err(&batch("max_wait_ms = 1001")), "tenants[0].answer_batch.max_wait_ms: must be at most 1000");
        assert_eq!(err(&batch("max_bytes = 0")), "tenants[0].answer_batch.max_bytes: must be at least 1");
        assert!(err(&batch("wait = 1")).contains("unknown field"));
    }

    #[test]
    fn upstream_bounds_have_defaults_and_are_checked() {
        let c = Config::parse(BASE).unwrap();
        let t = &c.targets["oa"];
        assert_eq!(
            (t.first_token_timeout_ms, t.total_timeout_ms, t.max_stream_bytes, t.max_event_bytes),
            (300_000, 900_000, 64 << 20, 1 << 20)
        );
        assert_eq!((c.cache.max_entry_bytes, c.cache.entry_limit()), (4 << 20, 4 << 20));
        let target = |field: &str| BASE.replace("api = \"openai\"", &format!("api = \"openai\"\n{field}"));
        for field in ["first_token_timeout_ms", "total_timeout_ms", "max_stream_bytes", "max_event_bytes"] {
            assert_eq!(err(&target(&format!("{field} = 0"))), format!("targets.oa.{field}: must be greater than 0"));
        }
        assert_eq!(
            err(&target("max_stream_bytes = 100\nmax_event_bytes = 101")),
            "targets.oa.max_event_bytes: must not exceed max_stream_bytes"
        );
        assert!(err(&format!("{BASE}\n[cache]\nmax_entry_bytes = 0\n")).starts_with("cache.max_entry_bytes"));
        assert_eq!(c.cache.redis_url, None, "each edge caches alone unless told");
        assert!(err(&format!("{BASE}\n[cache]\nredis_url = \"http://x\"\n")).starts_with("cache.redis_url"));
        assert!(err(&format!("{BASE}\n[cache]\ncoalesce_wait_ms = 0\n")).starts_with("cache.redis_timeout_ms"));
        let shared = Config::parse(&format!("{BASE}\n[cache]\nredis_url = \"redis://127.0.0.1:6379/\"\n")).unwrap();
        assert_eq!(shared.cache.redis_url().unwrap().as_deref(), Some("redis://127.0.0.1:6379/"));
        let small = Config::parse(&format!("{BASE}\n[cache]\nmax_bytes = 1000\n")).unwrap();
        assert_eq!(small.cache.entry_limit(), 1000, "an entry is never larger than the cache");
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err(&BASE.replace("target = \"oa\"", "target = \"nope\""))
            .starts_with("models[0].targets[0].target: unknown target `nope`"));
        assert!(err(&BASE.replace("http://127.0.0.1:9/v1", "ftp://x")).starts_with("targets.oa.base_url"));
        assert!(err(&BASE.replace("sha256:9f", "md5:9f")).starts_with("tenants[0].keys[0]"));
        let unknown = err(&format!("{BASE}\n[cache]\nsize = 3\n"));
        assert!(unknown.contains("unknown field `size`"), "{unknown}");
        let missing = err(&BASE.replace(
            "base_url = \"http://127.0.0.1:9/v1\"",
            "base_url = \"http://h/v1\"\napi_key = \"${MERIDIAN_TEST_UNSET_VAR}\"",
        ));
        assert_eq!(
            missing,
            "targets.oa.api_key: environment variable MERIDIAN_TEST_UNSET_VAR is not set (or empty or not UTF-8)"
        );
        let defaulted =
            Config::parse(&BASE.replace("http://127.0.0.1:9/v1", "${MERIDIAN_TEST_UNSET_VAR:-http://127.0.0.1:7/v1}"))
                .unwrap();
        assert_eq!(defaulted.target_env("oa").unwrap().base_url, "http://127.0.0.1:7/v1");
    }

    #[test]
    fn engine_targets_need_a_quic_url_and_the_cluster_identity() {
        let engine = |url: &str, quic: bool| {
            let section = if quic { "[quic]\nca = \"ca.pem\"\ncert = \"e.pem\"\nkey = \"e.key\"\n" } else { "" };
            format!(
                "{section}{}",
                BASE.replace("api = \"openai\"", "api = \"engine\"").replace("http://127.0.0.1:9/v1", url)
            )
        };
        assert!(Config::parse(&engine("quic://127.0.0.1:7443", true)).is_ok());
        assert!(err(&engine("quic://127.0.0.1:7443", false))
            .starts_with("targets.oa.api: engine and edge targets need the [quic] section"));
        assert!(err(&engine("http://127.0.0.1:7443", true))
            .starts_with("targets.oa.base_url: must be a quic://host:port URL"));
        assert!(err(&engine("quic://127.0.0.1", true)).starts_with("targets.oa.base_url: needs a port"));
    }

    #[test]
    fn the_health_section_has_defaults_and_is_checked() {
        let h = Config::parse(BASE).unwrap().health;
        assert_eq!(
            (h.ejection_threshold, h.base_ejection_ms, h.max_ejection_ms, h.probe_interval_ms),
            (5, 1000, 30_000, 2000)
        );
        let set = Config::parse(&format!("{BASE}\n[health]\nejection_threshold = 2\nbase_ejection_ms = 50\n")).unwrap();
        assert_eq!((set.health.ejection_threshold, set.health.base_ejection_ms), (2, 50));
        assert_eq!(set.health.max_ejection_ms, 30_000, "unset keys keep their defaults");
        let bad = |section: &str| err(&format!("{BASE}\n[health]\n{section}\n"));
        assert!(bad("ejection_threshold = 0").starts_with("health.ejection_threshold: must be greater than 0"));
        assert!(bad("base_ejection_ms = 0").starts_with("health.base_ejection_ms"));
        assert!(bad("base_ejection_ms = 5000\nmax_ejection_ms = 4000").starts_with("health.max_ejection_ms"));
        assert!(bad("probe_interval_ms = 0").starts_with("health.probe_interval_ms"));
        let unknown = bad("threshold = 3");
        assert!(unknown.contains("unknown field `threshold`"), "{unknown}");
    }

    #[test]
    fn the_status_section_has_defaults_and_is_checked() {
        let st = Config::parse(BASE).unwrap().status;
        assert_eq!((st.sample_interval_ms, st.samples), (5000, 120));
        let bad = |section: &str| err(&format!("{BASE}\n[status]\n{section}\n"));
        assert!(bad("sample_interval_ms = 99").starts_with("status.sample_interval_ms: must be at least 100"));
        assert!(bad("samples = 1").starts_with("status.samples"));
        assert!(bad("samples = 10001").starts_with("status.samples"));
        assert!(bad("every = 1").contains("unknown field `every`"));
    }

    /// `BASE` as an edge of `eu-west` taking relays, with `peers` (TOML) as its `[[relay.peers]]`.
    fn relaying(peers: &str) -> String {
        format!(
            "[node]\nregion = \"eu-west\"\n{BASE}\n[quic]\nca = \"ca.pem\"\ncert = \"e.pem\"\nkey = \"e.key\"\n\
             [relay]\nlisten = \"127.0.0.1:7462\"\n{peers}"
        )
    }

    fn peer(name: &str, region: &str, tenants: &str) -> String {
        format!("[[relay.peers]]\nname = \"{name}\"\nregion = \"{region}\"\ntenants = {tenants}\n")
    }

    #[test]
    fn relay_peers_name_edges_of_other_regions_and_known_tenants() {
        let ok = Config::parse(&relaying(&peer("edge-us", "us-east", r#"["acme"]"#))).unwrap();
        let peers = ok.relay.unwrap().peers;
        assert_eq!(
            peers,
            [RelayPeer { name: "edge-us".into(), region: "us-east".into(), tenants: vec!["acme".into()] }]
        );
        assert!(err(&relaying("")).starts_with("relay.peers: needs at least one peer edge"));
        let twice =
            format!("{}{}", peer("edge-us", "us-east", r#"["acme"]"#), peer("edge-us", "ap-south", r#"["acme"]"#));
        assert_eq!(err(&relaying(&twice)), "relay.peers[1].name: duplicate peer `edge-us`");
        assert!(err(&relaying(&peer("", "us-east", r#"["acme"]"#))).starts_with("relay.peers[0].name: "));
        assert!(err(&relaying(&peer("edge us", "us-east", r#"["acme"]"#))).starts_with("relay.peers[0].name: "));
        assert_eq!(err(&relaying(&peer("edge-us", "", r#"["acme"]"#))), "relay.peers[0].region: must not be empty");
        assert_eq!(
            err(&relaying(&peer("edge-eu2", "eu-west", r#"["acme"]"#))),
            "relay.peers[0].region: is this node's own region `eu-west`: relay is between regions"
        );
        assert_eq!(
            err(&relaying(&peer("edge-us", "us-east", "[]"))),
            "relay.peers[0].tenants: needs at least one tenant: those whose requests `edge-us` may relay here"
        );
        assert_eq!(
            err(&relaying(&peer("edge-us", "us-east", r#"["acme", "initech"]"#))),
            "relay.peers[0].tenants[1]: unknown tenant `initech` (known: acme)"
        );
        assert_eq!(
            err(&relaying(&peer("edge-us", "us-east", r#"["acme", "acme"]"#))),
            "relay.peers[0].tenants[1]: tenant `acme` is already listed"
        );
        let unknown = err(&relaying(&format!("{}secret = 1\n", peer("edge-us", "us-east", r#"["acme"]"#))));
        assert!(unknown.contains("unknown field `secret`"), "{unknown}");
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret("sk-live".into())), "Secret(***)");
    }

    #[test]
    fn key_hashes_round_trip() {
        assert_eq!(parse_key_hash(&hash_key("test")).unwrap()[0], 0x9f);
    }
}
