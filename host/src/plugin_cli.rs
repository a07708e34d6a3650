//! `meridian plugin …`: the commands for plugin authors.
//!
//! - `new` writes a crate that builds a router or a privacy filter with the guest SDK;
//! - `check` loads a component the way the node does and dry-runs its configuration;
//! - `run` calls it once on a sample request, as the edge would, and shows what it decided.
//!
//! `check` and `run` use the node's own runtime ([`PluginRuntime`] with the default
//! [`PluginSettings`] and [`CallLimits`]): what passes here passes at load time on a node, and a
//! plugin too slow or too big for production fails here too. Only the artifact cache differs: a
//! temporary directory, so that trying a plugin leaves nothing behind.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Subcommand, ValueEnum};
use meridian::accounting;
use meridian::chain::{self, Chain};
use meridian::chat::ChatRequest;
use meridian::config::TargetKind;
use meridian::plugin::{
    self, CachePolicy, CallLimits, FilterPlugin, Outcome, PluginError, PluginMetrics, PluginRuntime, PluginSettings,
    RequestVerdict, RouterPlugin, SegmentKind,
};
use meridian::redaction::{self, SpanError};
use meridian::routes::{self, TargetFacts};
use meridian::stats::{EngineLoad, HealthState, TargetStats};
use serde::Deserialize;

/// The `plugin` subcommands.
#[derive(Subcommand)]
pub enum PluginCommand {
    /// Write a new plugin project: its source, build files, README.md and sample input files
    /// (Rust: a crate on the guest SDK; Python and JavaScript: a project with the contract and
    /// the SDK copied in).
    New {
        /// The plugin's name: a letter, then letters, digits, `-` or `_`.
        name: String,
        /// Which kind of plugin.
        #[arg(long, value_enum)]
        kind: Kind,
        /// The language it is written in.
        #[arg(long, value_enum, default_value = "rust")]
        lang: Lang,
        /// The crate's directory, which must not exist yet [default: ./NAME].
        #[arg(long, value_name = "PATH")]
        dir: Option<PathBuf>,
        /// For Rust: the guest SDK crate to depend on [default: this checkout's plugins/sdk].
        #[arg(long, value_name = "PATH")]
        sdk: Option<PathBuf>,
    },
    /// Load a component as the node would: print its world and exports, and dry-run its config.
    Check {
        /// The component (`.wasm`).
        file: PathBuf,
        /// The plugin's configuration: a `.toml` file (its table in the node config) or a
        /// `.json` file (an object) [default: {}].
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The call deadline in milliseconds, as `deadline_ms` in the node's `[plugins.NAME]`:
        /// Python and JavaScript plugins need more than a Rust plugin's default.
        #[arg(long, value_name = "MS", default_value_t = CallLimits::default().deadline_ms)]
        deadline_ms: u64,
    },
    /// Call a plugin once on a request, with the node's runtime limits, and print its answer.
    Run {
        /// The component (`.wasm`).
        file: PathBuf,
        /// A chat request in OpenAI shape (`model`, `messages`…), as a client would send it.
        #[arg(long, value_name = "FILE")]
        request: PathBuf,
        /// For routers: a JSON list of targets (`name`, `kind`, `region`, `price`, `health`,
        /// `latency_ms`…).
        #[arg(long, value_name = "FILE")]
        targets: Option<PathBuf>,
        /// The plugin's configuration, as for `check` [default: {}].
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The plugin's kind; found by trying router, then filter, when absent.
        #[arg(long, value_enum)]
        kind: Option<Kind>,
        /// The call deadline in milliseconds, as `deadline_ms` in the node's `[plugins.NAME]`:
        /// Python and JavaScript plugins need more than a Rust plugin's default.
        #[arg(long, value_name = "MS", default_value_t = CallLimits::default().deadline_ms)]
        deadline_ms: u64,
    },
}

/// A language plugins are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    /// Rust, with the guest SDK (`cargo build --target wasm32-unknown-unknown`: a core module with
    /// its world, which the node encodes as a component at load).
    Rust,
    /// Python, with componentize-py.
    Python,
    /// JavaScript, with jco and componentize-js.
    Js,
}

/// A plugin kind, as the CLI names it (the config's `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// The `router` world.
    Router,
    /// The `privacy-filter` world.
    Filter,
}

impl Kind {
    /// The WIT world's name.
    fn world(self) -> &'static str {
        match self {
            Kind::Router => "router",
            Kind::Filter => "privacy-filter",
        }
    }

    /// The world's exports, which loading checks are all there with the contract's types.
    fn exports(self) -> &'static str {
        match self {
            Kind::Router => "configure, route",
            Kind::Filter => "configure, inspect-request, inspect-response",
        }
    }
}

/// Why a `plugin` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `plugin new` got a name that is not a valid crate name.
    #[error("invalid plugin name `{0}`: use a letter, then up to 63 letters, digits, `-` or `_`")]
    BadName(String),
    /// `plugin new` would overwrite something.
    #[error("{0} already exists; choose another --dir or remove it first")]
    Exists(PathBuf),
    /// The guest SDK is not where `plugin new` looked.
    #[error("no plugin SDK crate at {0} (no Cargo.toml there); pass --sdk PATH to the meridian-plugin-sdk crate")]
    NoSdk(PathBuf),
    /// A path that cannot be written into Cargo.toml.
    #[error("the SDK path {0} is not valid UTF-8 or holds control characters; pass --sdk with a plainer path")]
    SdkPath(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An input file (config, request or targets) is not what it should be.
    #[error("{path}: {message}")]
    Input {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A router was run without targets.
    #[error("{0} is a router: pass --targets FILE with the targets it chooses from")]
    NeedTargets(PathBuf),
    /// The component implements neither world.
    #[error(
        "{file} is neither a router nor a privacy filter\n  as a router: {router}\n  as a privacy-filter: {filter}"
    )]
    NoWorld {
        /// The component.
        file: PathBuf,
        /// Why it is not a router (boxed, as is `filter`: two errors inline made every
        /// `Result` of this module carry their size).
        router: Box<PluginError>,
        /// Why it is not a privacy filter.
        filter: Box<PluginError>,
    },
    /// The component's `configure` refused its configuration.
    #[error("{file} is a {world}, but its configure rejected the config {config}: {message}")]
    ConfigRejected {
        /// The component.
        file: PathBuf,
        /// The world it implements.
        world: &'static str,
        /// The configuration, as JSON.
        config: String,
        /// The plugin's own words.
        message: String,
    },
    /// The component could not be read or compiled, whatever its world.
    #[error("{file}: {source}")]
    Load {
        /// The component.
        file: PathBuf,
        /// The cause.
        source: PluginError,
    },
    /// Loading or calling the plugin as a world failed (wrong world, trap, timeout…).
    #[error("{file} (as a {world}): {source}")]
    Plugin {
        /// The component.
        file: PathBuf,
        /// The world it was loaded as.
        world: &'static str,
        /// The cause.
        source: PluginError,
    },
    /// The filter's redactions are valid one by one but cannot be applied together.
    #[error("the filter's redactions cannot be applied: {0}")]
    Redaction(#[from] SpanError),
    /// The runtime could not be set up (metrics registry, async runtime).
    #[error("cannot set up the plugin runtime: {0}")]
    Setup(String),
}

/// Runs a `plugin` subcommand, printing its error on failure.
pub fn run(command: PluginCommand) -> ExitCode {
    let result = match command {
        PluginCommand::New { name, kind, lang, dir, sdk } => new(&name, kind, lang, dir, sdk),
        PluginCommand::Check { file, config, deadline_ms } => {
            block_on(check(&file, config.as_deref(), limits(deadline_ms)))
        }
        PluginCommand::Run { file, request, targets, config, kind, deadline_ms } => {
            block_on(run_once(&file, &request, targets.as_deref(), config.as_deref(), kind, limits(deadline_ms)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command's future on a one-thread Tokio runtime: one plugin, one call at a time.
fn block_on(work: impl std::future::Future<Output = Result<(), CliError>>) -> Result<(), CliError> {
    // The guest's log lines are what an author wants to see; the node's own chatter is not.
    let from_env = tracing_subscriber::EnvFilter::try_from_default_env().ok();
    let quiet = from_env.is_none();
    let filter = from_env.unwrap_or_else(|| tracing_subscriber::EnvFilter::new("warn,meridian::plugin::guest=trace"));
    // Only fails if a subscriber is already set, which then serves as well.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    if quiet {
        // The guest's trace directive raises the `log` crate's bridge to trace for every crate, and
        // Cranelift logs each function it compiles at that level, so every record went through
        // the filter only to be dropped. That was ~2.5% of compiling an interpreter's component in
        // a release build and well over half in the test builds (`plugin run` on a Python router:
        // 28 s there, 12 s without). Only the guest logs at trace, and it logs through `tracing`.
        log::set_max_level(log::LevelFilter::Warn);
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Setup(format!("async runtime: {e}")))?
        .block_on(work)
}

// ---- plugin new -------------------------------------------------------------------------------

// The template files, kept as real files under host/templates/plugin/ so they can be read and
// edited as what they are; `{{name}}`-style placeholders are filled in by `new`. The sample input
// files serve every language.
const TEMPLATE_CARGO_TOML: &str = include_str!("../templates/plugin/Cargo.toml.in");
const TEMPLATE_GITIGNORE: &str = include_str!("../templates/plugin/gitignore");
const TEMPLATE_CARGO_CONFIG: &str = include_str!("../templates/plugin/cargo-config.toml");
const TEMPLATE_ROUTER_LIB: &str = include_str!("../templates/plugin/router/lib.rs");
const TEMPLATE_ROUTER_README: &str = include_str!("../templates/plugin/router/README.md");
const TEMPLATE_ROUTER_REQUEST: &str = include_str!("../templates/plugin/router/request.json");
const TEMPLATE_ROUTER_TARGETS: &str = include_str!("../templates/plugin/router/targets.json");
const TEMPLATE_FILTER_LIB: &str = include_str!("../templates/plugin/filter/lib.rs");
const TEMPLATE_FILTER_README: &str = include_str!("../templates/plugin/filter/README.md");
const TEMPLATE_FILTER_REQUEST: &str = include_str!("../templates/plugin/filter/request.json");
const PYTHON_GITIGNORE: &str = include_str!("../templates/plugin/python/gitignore");
const PYTHON_ROUTER_APP: &str = include_str!("../templates/plugin/python/router/app.py");
const PYTHON_ROUTER_README: &str = include_str!("../templates/plugin/python/router/README.md");
const PYTHON_FILTER_APP: &str = include_str!("../templates/plugin/python/filter/app.py");
const PYTHON_FILTER_README: &str = include_str!("../templates/plugin/python/filter/README.md");
const JS_GITIGNORE: &str = include_str!("../templates/plugin/js/gitignore");
const JS_ROUTER_PLUGIN: &str = include_str!("../templates/plugin/js/router/plugin.js");
const JS_ROUTER_PACKAGE: &str = include_str!("../templates/plugin/js/router/package.json");
const JS_ROUTER_README: &str = include_str!("../templates/plugin/js/router/README.md");
const JS_FILTER_PLUGIN: &str = include_str!("../templates/plugin/js/filter/plugin.js");
const JS_FILTER_PACKAGE: &str = include_str!("../templates/plugin/js/filter/package.json");
const JS_FILTER_README: &str = include_str!("../templates/plugin/js/filter/README.md");

/// The contract and the Python and JavaScript SDKs, copied into a new project of their language
/// so that it builds on its own.
const WIT: &str = include_str!("../../wit/meridian-plugin.wit");
const PYTHON_SDK: [(&str, &str); 3] = [
    ("meridian_plugin/__init__.py", include_str!("../../plugins/python/sdk/meridian_plugin/__init__.py")),
    ("meridian_plugin/routing.py", include_str!("../../plugins/python/sdk/meridian_plugin/routing.py")),
    ("meridian_plugin/filtering.py", include_str!("../../plugins/python/sdk/meridian_plugin/filtering.py")),
];
const JS_SDK: &str = include_str!("../../plugins/js/sdk/meridian.js");

/// The guest SDK of the checkout this binary was built from.
const DEFAULT_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/sdk");

/// `plugin new`: writes the project for `kind` in `lang` into `dir` (default `./NAME`).
fn new(name: &str, kind: Kind, lang: Lang, dir: Option<PathBuf>, sdk: Option<PathBuf>) -> Result<(), CliError> {
    if !valid_crate_name(name) {
        return Err(CliError::BadName(name.into()));
    }
    let sdk_toml = match lang {
        Lang::Rust => {
            let sdk = sdk.unwrap_or_else(|| PathBuf::from(DEFAULT_SDK));
            // Absolute, so that the dependency holds wherever the crate is built from.
            let sdk = sdk.canonicalize().map_err(|_| CliError::NoSdk(sdk.clone()))?;
            if !sdk.join("Cargo.toml").is_file() {
                return Err(CliError::NoSdk(sdk));
            }
            sdk.to_str().and_then(toml_basic_string_body).ok_or_else(|| CliError::SdkPath(sdk.clone()))?
        }
        Lang::Python | Lang::Js => String::new(),
    };
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    let lib_name = name.replace('-', "_");
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{lib_name}}", &lib_name)
            .replace("{{kind}}", kind.world())
            .replace("{{sdk_path}}", &sdk_toml)
    };
    let (request, targets) = match kind {
        Kind::Router => (TEMPLATE_ROUTER_REQUEST, Some(TEMPLATE_ROUTER_TARGETS)),
        Kind::Filter => (TEMPLATE_FILTER_REQUEST, None),
    };
    let mut files: Vec<(&str, String)> = vec![("request.json", request.to_string())];
    files.extend(targets.map(|t| ("targets.json", t.to_string())));
    let (build, wasm) = match (lang, kind) {
        (Lang::Rust, _) => {
            let (lib, readme) = match kind {
                Kind::Router => (TEMPLATE_ROUTER_LIB, TEMPLATE_ROUTER_README),
                Kind::Filter => (TEMPLATE_FILTER_LIB, TEMPLATE_FILTER_README),
            };
            files.extend([
                ("Cargo.toml", fill(TEMPLATE_CARGO_TOML)),
                (".gitignore", TEMPLATE_GITIGNORE.to_string()),
                (".cargo/config.toml", TEMPLATE_CARGO_CONFIG.to_string()),
                ("src/lib.rs", fill(lib)),
                ("README.md", fill(readme)),
            ]);
            (
                "cargo build --release --target wasm32-unknown-unknown".to_string(),
                format!("target/wasm32-unknown-unknown/release/{lib_name}.wasm"),
            )
        }
        (Lang::Python, _) => {
            let (app, readme) = match kind {
                Kind::Router => (PYTHON_ROUTER_APP, PYTHON_ROUTER_README),
                Kind::Filter => (PYTHON_FILTER_APP, PYTHON_FILTER_README),
            };
            files.extend([
                (".gitignore", PYTHON_GITIGNORE.to_string()),
                ("app.py", fill(app)),
                ("README.md", fill(readme)),
                ("wit/meridian-plugin.wit", WIT.to_string()),
            ]);
            files.extend(PYTHON_SDK.iter().map(|(path, text)| (*path, text.to_string())));
            let build = format!(
                "python3 -m venv .venv && .venv/bin/pip install componentize-py==0.25.1\n  .venv/bin/componentize-py -d wit -w {} componentize app -o {lib_name}.wasm",
                kind.world()
            );
            (build, format!("{lib_name}.wasm"))
        }
        (Lang::Js, _) => {
            let (plugin, package, readme) = match kind {
                Kind::Router => (JS_ROUTER_PLUGIN, JS_ROUTER_PACKAGE, JS_ROUTER_README),
                Kind::Filter => (JS_FILTER_PLUGIN, JS_FILTER_PACKAGE, JS_FILTER_README),
            };
            files.extend([
                (".gitignore", JS_GITIGNORE.to_string()),
                ("plugin.js", fill(plugin)),
                ("package.json", fill(package)),
                ("README.md", fill(readme)),
                ("meridian.js", JS_SDK.to_string()),
                ("wit/meridian-plugin.wit", WIT.to_string()),
            ]);
            ("npm install\n  npm run build".to_string(), format!("dist/{lib_name}.wasm"))
        }
    };

    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| CliError::Io { path: parent.to_path_buf(), source })?;
    }
    // `create_dir` fails on anything already there, so an existing project is never overwritten.
    std::fs::create_dir(&dir).map_err(|source| match source.kind() {
        std::io::ErrorKind::AlreadyExists => CliError::Exists(dir.clone()),
        _ => CliError::Io { path: dir.clone(), source },
    })?;
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder).map_err(|source| CliError::Io { path: folder.to_path_buf(), source })?;
        }
        std::fs::write(&path, text).map_err(|source| CliError::Io { path, source })?;
    }

    let targets = if kind == Kind::Router { " --targets targets.json" } else { "" };
    println!(
        "created {} plugin `{name}` in {}\n\nnext:\n  cd {}\n  {build}\n  meridian plugin check {wasm}\n  meridian plugin run {wasm} --request request.json{targets}",
        kind.world(),
        dir.display(),
        dir.display(),
    );
    Ok(())
}

/// Cargo's package-name rule, minus the Unicode it allows: also a safe directory and file name.
fn valid_crate_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 64
        && bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `text` escaped for the inside of a TOML basic string; `None` if it holds control characters,
/// which no sensible path does.
fn toml_basic_string_body(text: &str) -> Option<String> {
    if text.chars().any(char::is_control) {
        return None;
    }
    Some(text.replace('\\', "\\\\").replace('"', "\\\""))
}

// ---- plugin check / run -----------------------------------------------------------------------

/// A temporary artifact cache, removed when dropped.
struct TempCache(PathBuf);

impl TempCache {
    /// A new directory of this user's alone (mode 0700) in the temp dir. It is always made afresh,
    /// never found: in a shared temp dir another user could have made a directory of the same name
    /// first, so a name that exists is passed over for another (names carry the process id and
    /// the clock's nanoseconds, so they cannot be planted ahead for long).
    fn new() -> Result<TempCache, CliError> {
        use std::os::unix::fs::DirBuilderExt;
        let mut last = None;
        for attempt in 0..16u32 {
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
            let dir =
                std::env::temp_dir().join(format!("meridian-plugin-cli-{}-{nanos}-{attempt}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(TempCache(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(CliError::Setup(format!("cannot make a cache in {}: {e}", dir.display()))),
            }
        }
        Err(CliError::Setup(format!(
            "no fresh cache directory in the temp dir: {}",
            last.map_or_else(String::new, |e| e.to_string())
        )))
    }
}

impl Drop for TempCache {
    fn drop(&mut self) {
        // Best effort: a leftover cache in the temp dir harms nothing.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A runtime with the node's settings, but a throwaway artifact cache.
fn production_runtime(cache: &TempCache) -> Result<PluginRuntime, CliError> {
    let metrics = PluginMetrics::new(&prometheus::Registry::new()).map_err(|e| CliError::Setup(e.to_string()))?;
    let settings = PluginSettings { cache_dir: cache.0.clone(), ..PluginSettings::default() };
    PluginRuntime::new(settings, Arc::new(metrics)).map_err(|e| CliError::Setup(e.to_string()))
}

/// A plugin loaded as the world it implements.
enum Loaded {
    Router(RouterPlugin),
    Filter(FilterPlugin),
}

impl Loaded {
    /// Which kind it turned out to be.
    fn kind(&self) -> Kind {
        match self {
            Loaded::Router(_) => Kind::Router,
            Loaded::Filter(_) => Kind::Filter,
        }
    }
}

/// Loads `file` as `kind`, or as whichever world it implements (router first), with `config`.
/// The node's default call limits, with `deadline_ms`.
fn limits(deadline_ms: u64) -> CallLimits {
    CallLimits { deadline_ms, ..CallLimits::default() }
}

async fn load(
    runtime: &PluginRuntime,
    file: &Path,
    config: &str,
    kind: Option<Kind>,
    limits: CallLimits,
) -> Result<Loaded, CliError> {
    let name = file.file_stem().map_or_else(|| "plugin".into(), |s| s.to_string_lossy().into_owned());
    let (name, version) = (name.as_str(), "dev");
    let fail = |world: Kind, source: PluginError| match source {
        PluginError::ConfigRejected(message) => CliError::ConfigRejected {
            file: file.to_path_buf(),
            world: world.world(),
            config: config.to_string(),
            message,
        },
        source @ (PluginError::Compile(_) | PluginError::Io { .. }) => {
            CliError::Load { file: file.to_path_buf(), source }
        }
        source => CliError::Plugin { file: file.to_path_buf(), world: world.world(), source },
    };
    if kind != Some(Kind::Filter) {
        match runtime.load_router(name, version, file, config, limits.clone()).await {
            Ok(router) => return Ok(Loaded::Router(router)),
            // Not a router: maybe a filter, unless the caller said which it is.
            Err(router @ PluginError::WrongWorld { .. }) if kind.is_none() => {
                return match runtime.load_filter(name, version, file, config, limits).await {
                    Ok(filter) => Ok(Loaded::Filter(filter)),
                    Err(filter @ PluginError::WrongWorld { .. }) => Err(CliError::NoWorld {
                        file: file.to_path_buf(),
                        router: Box::new(router),
                        filter: Box::new(filter),
                    }),
                    Err(e) => Err(fail(Kind::Filter, e)),
                };
            }
            Err(e) => return Err(fail(Kind::Router, e)),
        }
    }
    match runtime.load_filter(name, version, file, config, limits).await {
        Ok(filter) => Ok(Loaded::Filter(filter)),
        Err(e) => Err(fail(Kind::Filter, e)),
    }
}

/// The configuration JSON `configure` receives: the node passes its TOML table as JSON, so a
/// `.toml` file is converted the same way; a `.json` file must hold an object.
fn read_config(path: Option<&Path>) -> Result<String, CliError> {
    let Some(path) = path else { return Ok("{}".into()) };
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Io { path: path.into(), source })?;
    let input = |message: String| CliError::Input { path: path.into(), message };
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => {
            let table: toml::Table = toml::from_str(&text).map_err(|e| input(e.to_string()))?;
            serde_json::to_string(&table).map_err(|e| input(e.to_string()))
        }
        Some("json") => match serde_json::from_str(&text).map_err(|e| input(e.to_string()))? {
            serde_json::Value::Object(object) => Ok(serde_json::Value::Object(object).to_string()),
            _ => Err(input("the configuration must be a JSON object, as the node's TOML table is".into())),
        },
        _ => Err(input("a config file must end in .toml or .json".into())),
    }
}

/// `plugin check`.
async fn check(file: &Path, config: Option<&Path>, limits: CallLimits) -> Result<(), CliError> {
    let config = read_config(config)?;
    let cache = TempCache::new()?;
    let runtime = production_runtime(&cache)?;
    let loaded = load(&runtime, file, &config, None, limits).await?;
    let kind = loaded.kind();
    println!("file: {}", file.display());
    println!("world: {}", kind.world());
    println!("exports: {}", kind.exports());
    println!("config: ok (configure accepted {config})");
    if let Loaded::Filter(filter) = &loaded {
        println!("request triggers: {}", describe_triggers(filter.request_triggers()));
        println!("answer triggers: {}", describe_triggers(filter.answer_triggers()));
    }
    Ok(())
}

/// What a filter declared it needs to see: every text, none, or the texts holding a trigger.
fn describe_triggers(triggers: Option<&plugin::Triggers>) -> String {
    match triggers.map(plugin::Triggers::literals) {
        None => "none declared (sees every one)".into(),
        Some([]) => "an empty list (sees none)".into(),
        Some(literals) => format!("{literals:?} (sees only those holding one)"),
    }
}

/// `plugin run`.
async fn run_once(
    file: &Path,
    request: &Path,
    targets: Option<&Path>,
    config: Option<&Path>,
    kind: Option<Kind>,
    limits: CallLimits,
) -> Result<(), CliError> {
    let config = read_config(config)?;
    let body = std::fs::read(request).map_err(|source| CliError::Io { path: request.into(), source })?;
    let mut req = meridian::api::openai::parse_request(&body)
        .map_err(|e| CliError::Input { path: request.into(), message: e.to_string() })?;
    // As the edge builds it for a tenant with no region or price restrictions, on a node in the
    // default region, before any filter has labelled it.
    let summary = chain::summary("plugin-run", "local", &Chain::default(), "local", None, &req);
    let cache = TempCache::new()?;
    let runtime = production_runtime(&cache)?;
    let plugin = load(&runtime, file, &config, kind, limits).await?;
    let world = plugin.kind().world();
    let fail = |source| CliError::Plugin { file: file.to_path_buf(), world, source };
    println!("world: {world}");
    let (elapsed, peak, how) = match plugin {
        Loaded::Router(router) => {
            let path = targets.ok_or_else(|| CliError::NeedTargets(file.to_path_buf()))?;
            let (targets, held) = read_targets(path, &req)?;
            let started = Instant::now();
            let outcome = router.route(&summary, &targets, &held).await.map_err(fail)?;
            let elapsed = started.elapsed();
            print!("{}", describe_outcome(&outcome));
            (elapsed, router.peak_memory_bytes(), how_called(router.pre_initialised(), router.called_directly()))
        }
        Loaded::Filter(filter) => {
            let segments = redaction::segments(&req);
            let started = Instant::now();
            let verdict = filter.inspect_request(&summary, &segments).await.map_err(fail)?;
            let elapsed = started.elapsed();
            let how = if filter.needs_request(&segments) {
                how_called(filter.pre_initialised(), filter.called_directly())
            } else {
                println!("request triggers: none in the request, so the filter was not called");
                "no instance: the filter was not called".to_string()
            };
            print!("{}", describe_verdict(&verdict, &segments, &mut req)?);
            (elapsed, filter.peak_memory_bytes(), how)
        }
    };
    println!("time: {} ({how})", millis(elapsed));
    println!("peak memory: {} KiB of linear memory", peak.div_ceil(1024));
    println!("fuel: not metered (epoch deadlines)");
    Ok(())
}

/// What one call of a plugin did: which instance it got, and how the call entered it.
fn how_called(pre_initialised: bool, direct: bool) -> String {
    let instance = if pre_initialised {
        "a fresh instance of the snapshot taken after configure: instantiate, call"
    } else {
        "a fresh instance: instantiate, configure, call"
    };
    let entry = if direct { "called directly: it imports only host" } else { "called on a fiber: it imports WASI" };
    format!("{instance}; {entry}")
}

/// A duration in milliseconds, to the hundredth.
fn millis(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// A router's answer, one line per fact.
fn describe_outcome(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Route(d) => format!(
            "decision: route to {}\nmodel rewrite: {}\ncache: {}\n",
            d.targets.join(", "),
            d.model_rewrite.as_deref().unwrap_or("none"),
            match d.cache {
                CachePolicy::Default => "default",
                CachePolicy::Bypass => "bypass",
                CachePolicy::Force => "force",
            }
        ),
        Outcome::Reject(r) => format!("decision: reject with {}: {}\n", r.status, r.reason),
    }
}

/// A filter's answer: labels, redactions with the values they hide, and the request's text as it
/// would leave the node (redactions applied the way the edge applies them).
fn describe_verdict(
    verdict: &RequestVerdict,
    segments: &[plugin::Segment],
    req: &mut ChatRequest,
) -> Result<String, CliError> {
    let found = match verdict {
        RequestVerdict::Block(reason) => return Ok(format!("verdict: block: {reason}\n")),
        RequestVerdict::Allow(found) => found,
    };
    let mut out = String::from("verdict: allow\n");
    let labels = if found.labels.is_empty() { "none".to_string() } else { found.labels.join(", ") };
    let _ = writeln!(out, "labels: {labels}");
    let _ = writeln!(out, "redactions: {}", found.redactions.len());
    for r in &found.redactions {
        // The runtime checked every span against its segment, so these lookups hold.
        let segment = &segments[r.segment as usize];
        let value = &segment.text[r.start as usize..r.end as usize];
        let _ = writeln!(
            out,
            "  segment {} ({}) bytes {}..{}: {} {value:?}",
            r.segment,
            segment_kind(segment.kind),
            r.start,
            r.end,
            r.entity
        );
    }
    redaction::redact(req, &redaction::merge(found.redactions.clone()))?;
    let _ = writeln!(out, "text as it leaves the node:");
    for (i, s) in redaction::segments(req).iter().enumerate() {
        let _ = writeln!(out, "  [{i}] {}: {}", segment_kind(s.kind), preview(&s.text));
    }
    Ok(out)
}

/// A segment kind as the contract spells it.
fn segment_kind(kind: SegmentKind) -> &'static str {
    match kind {
        SegmentKind::System => "system",
        SegmentKind::User => "user",
        SegmentKind::Assistant => "assistant",
        SegmentKind::ToolResult => "tool-result",
        SegmentKind::ToolArguments => "tool-arguments",
    }
}

/// At most 200 characters of `text` on one line.
fn preview(text: &str) -> String {
    const MAX: usize = 200;
    let line = text.replace('\n', "\\n");
    match line.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// One target in a `--targets` file: the node config's target fields, plus the live statistics
/// the node would measure.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSpec {
    name: String,
    #[serde(default)]
    kind: TargetKindSpec,
    region: Option<String>,
    #[serde(default)]
    own_infrastructure: bool,
    /// The model name at the target; the request's model when absent.
    model: Option<String>,
    /// As in the node config: `{"per": "token" | "gpu_second" | "hour", …}`.
    price: Option<accounting::PriceModel>,
    #[serde(default)]
    health: HealthSpec,
    #[serde(default)]
    latency_ms: f64,
    #[serde(default)]
    ttft_ms: f64,
    #[serde(default)]
    in_flight: u32,
    /// Requests it serves at once; an hourly price's capacity when absent, as the node reports.
    capacity: Option<u32>,
    /// Prompt tokens of the request its prefix cache holds (what `prefix-match` answers).
    #[serde(default)]
    prefix_match: u32,
}

/// A target's kind in a `--targets` file: the contract's `target-kind`.
#[derive(Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum TargetKindSpec {
    #[default]
    Managed,
    Serverless,
    Dedicated,
    RemoteEdge,
}

/// A target's health in a `--targets` file: the contract's `health`.
#[derive(Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum HealthSpec {
    #[default]
    Healthy,
    Degraded,
    Down,
}

/// Reads a `--targets` file into the targets a router is given, and what each holds of the
/// request in its prefix cache.
fn read_targets(path: &Path, req: &ChatRequest) -> Result<(Vec<plugin::Target>, Vec<u32>), CliError> {
    let text = std::fs::read(path).map_err(|source| CliError::Io { path: path.into(), source })?;
    let input = |message: String| CliError::Input { path: path.into(), message };
    let specs: Vec<TargetSpec> = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&text))
        .map_err(|e| input(format!("{} (at {})", e.inner(), e.path())))?;
    specs
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            if let Some(price) = &t.price {
                price.validate().map_err(|m| input(format!("[{i}].price: {m}")))?;
            }
            if ![t.latency_ms, t.ttft_ms].iter().all(|ms| ms.is_finite() && *ms >= 0.0) {
                return Err(input(format!("[{i}]: latency_ms and ttft_ms must be finite and not negative")));
            }
            let held = t.prefix_match;
            Ok((to_target(t, req), held))
        })
        .collect()
}

/// A target as the router sees it: the edge's own conversion ([`routes::router_view`]) of the
/// configured fields and of the statistics the file gives, over a target with no history.
fn to_target(t: TargetSpec, req: &ChatRequest) -> plugin::Target {
    let mut stats = TargetStats::default().snapshot(Instant::now());
    stats.health = match t.health {
        HealthSpec::Healthy => HealthState::Healthy,
        HealthSpec::Degraded => HealthState::Degraded,
        HealthSpec::Down => HealthState::Ejected,
    };
    // 0 stands for "not measured" either way.
    stats.latency_ms = Some(t.latency_ms);
    stats.ttft_ms = Some(t.ttft_ms);
    stats.in_flight = t.in_flight;
    // The file's capacity stands for what the target's engine reports (its batch size).
    stats.engine = t.capacity.map(|max_batch| EngineLoad {
        provider: String::new(),
        tokens_per_second: 0.0,
        queue_depth: 0,
        active_sequences: 0,
        max_batch,
        ..Default::default()
    });
    let model = t.model.unwrap_or_else(|| req.model.clone());
    let facts = TargetFacts {
        name: &t.name,
        kind: match t.kind {
            TargetKindSpec::Managed => TargetKind::Managed,
            TargetKindSpec::Serverless => TargetKind::Serverless,
            TargetKindSpec::Dedicated => TargetKind::Dedicated,
            TargetKindSpec::RemoteEdge => TargetKind::RemoteEdge,
        },
        region: t.region.as_deref(),
        own_infrastructure: t.own_infrastructure,
        model: &model,
        price: t.price,
    };
    routes::router_view(&facts, &stats)
}

#[cfg(test)]
mod tests {
    use meridian::plugin::{Health, PriceModel};

    use super::*;

    #[test]
    fn crate_names() {
        for good in ["a", "my-router", "f_2", "X"] {
            assert!(valid_crate_name(good), "{good}");
        }
        for bad in ["", "1a", "-a", "a b", "a/b", "ü", &"a".repeat(65)] {
            assert!(!valid_crate_name(bad), "{bad}");
        }
    }

    #[test]
    fn toml_escaping() {
        assert_eq!(toml_basic_string_body(r#"/a\b"c"#).as_deref(), Some(r#"/a\\b\"c"#));
        assert_eq!(toml_basic_string_body("/a\nb"), None);
    }

    #[test]
    fn targets_file_shape() {
        let json =
            br#"[{"name": "d", "kind": "dedicated", "price": {"per": "hour", "usd_per_hour": 2.0, "capacity": 4},
                         "health": "degraded", "latency_ms": 900}]"#;
        let specs: Vec<TargetSpec> = serde_json::from_slice(json).unwrap();
        let req = ChatRequest { model: "m".into(), ..ChatRequest::default() };
        let t = to_target(specs.into_iter().next().unwrap(), &req);
        assert_eq!(t.model, "m");
        assert_eq!(t.capacity, Some(4));
        assert_eq!(t.health, Health::Degraded);
        assert_eq!(t.price, Some(PriceModel::Hour(meridian::plugin::HourPrice { usd_per_hour: 2.0, capacity: 4 })));
    }
}
