//! The plugin runtime: one wasmtime engine per node, plugins loaded from it, and every call on a
//! fresh instance under a deadline, a memory cap and the instance semaphore — except the calls of
//! one answer's [`ResponseSession`], which share one instance, held in its tenant's
//! [`SessionSlots`].

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

use super::bindings::{
    self, CallState, GuestIdentity, Inspection, Outcome, RequestSummary, RequestVerdict, ResponseVerdict, Segment,
    Target,
};
use super::cache::{ArtifactCache, CacheStats};
use super::entry::{FilterEntry, FilterInstance, RouterEntry, RouterInstance};
use super::gate::{Admit, Gate, Triggers};
use super::metrics::PluginMetrics;
use super::spare::{Retired, Spare, KEEP_MAX_MEMORY_BYTES, RETIRED_RESERVE};
use super::stdio::CappedPipe;
use super::{componentize, snapshot};
use super::{validate, PluginError};

/// Stores (or host-side call states) one plugin keeps for reuse: about as many as run at once on
/// a node's cores, so that a burst does not leave many behind.
const SPARE_STATES: usize = 16;

/// Epoch ticks a snapshot's accessors may take (an hour at the default 1 ms tick): wizer's own
/// code, reading memories out, never the plugin's.
const SNAPSHOT_TICKS: u64 = 3_600_000;

/// Components above this size are not snapshotted. They are interpreters (CPython from
/// componentize-py, a JavaScript engine from componentize-js: 12–18 MB), which their toolchains
/// already pre-initialise at build time; a snapshot would compile them twice more at load (tens
/// of seconds each) to save a `configure` that is small beside an interpreted call.
const SNAPSHOT_MAX_WASM_BYTES: usize = 4 << 20;

/// How long a guest's panic message may be in a [`PluginError::Trap`].
const TRAP_MESSAGE_BYTES: usize = 512;

/// `[plugins]`: the plugin runtime's limits, shared by every plugin of the node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginSettings {
    /// Plugin instances of one-shot calls alive at once, across all plugins and tenants: the
    /// permits of the shared instance semaphore. A one-shot call (a request's filters, a router,
    /// a whole answer's filters) holds one for the call only. The pooling allocator has these
    /// slots, one for load-time dry runs, the tenants' session slots, and a reserve for the
    /// finished instances that kept stores hold (see `plugin::spare`).
    pub max_instances: u32,
    /// Instances one tenant's streamed answers may hold at once (one per filter per stream, from
    /// its first text until it ends): each tenant's [`SessionSlots`], set aside in the pool on
    /// top of `max_instances`, so that one tenant's slow streams never make another's requests
    /// wait for an instance. A tenant with a `max_concurrent_requests` gets no more than its
    /// streams can use (that many per filter).
    pub max_sessions_per_tenant: u32,
    /// How long a call waits for a free instance before [`PluginError::Overloaded`].
    pub acquire_timeout_ms: u64,
    /// Linear memory one instance may have: the pool's slot size and the default per-call cap.
    pub max_memory_bytes: usize,
    /// Core instances one component may hold (a Rust `wasm32-wasip2` component holds several).
    pub max_core_instances_per_component: u32,
    /// Linear memories one component may hold.
    pub max_memories_per_component: u32,
    /// Tables one component may hold.
    pub max_tables_per_component: u32,
    /// Bytes of each pooled memory (and table) kept mapped between instances and reset in place
    /// (with the `PAGEMAP_SCAN` ioctl where the kernel has it: only the dirty pages), instead of
    /// unmapped and faulted in again. Measured here: unmapping is an `madvise` whose TLB flush
    /// interrupts every core running the node, so two cores calling plugins took twice as long
    /// each; a Rust guest's memory starts above 1 MiB (its stack comes first).
    pub keep_resident_bytes: usize,
    /// Period of the epoch ticker that enforces deadlines; a deadline is rounded up to ticks.
    pub epoch_tick_ms: u64,
    /// Where compiled components are cached, by content hash.
    pub cache_dir: PathBuf,
    /// Failures of one plugin version within `quarantine_window_secs` that quarantine it.
    pub quarantine_after: u32,
    /// The window over which failures are counted.
    pub quarantine_window_secs: u64,
    /// Log lines one call may write (through `host.log`, and separately stdout and stderr); the
    /// rest are dropped and counted.
    pub max_log_lines_per_call: u32,
    /// Longest log line; longer ones are cut.
    pub max_log_line_bytes: usize,
    /// Bytes of stdout (and of stderr) kept per call.
    pub max_stdio_bytes: usize,
    /// How often the node looks for changed plugin files to reload; 0 turns watching off
    /// (SIGHUP and the admin endpoint still reload).
    pub reload_poll_ms: u64,
}

impl Default for PluginSettings {
    fn default() -> Self {
        PluginSettings {
            max_instances: 256,
            max_sessions_per_tenant: 64,
            acquire_timeout_ms: 100,
            max_memory_bytes: 64 << 20,
            max_core_instances_per_component: 16,
            max_memories_per_component: 2,
            max_tables_per_component: 8,
            keep_resident_bytes: 8 << 20,
            epoch_tick_ms: 1,
            cache_dir: super::cache::default_dir(),
            quarantine_after: 5,
            quarantine_window_secs: 60,
            max_log_lines_per_call: 16,
            max_log_line_bytes: 1024,
            max_stdio_bytes: 16 << 10,
            reload_poll_ms: 2000,
        }
    }
}

/// The limits of each call to one plugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallLimits {
    /// Time for one call: instantiation, `configure` and the hook together.
    pub deadline_ms: u64,
    /// Memory cap of the instance; absent means the runtime's `max_memory_bytes`.
    pub max_memory_bytes: Option<usize>,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits { deadline_ms: 20, max_memory_bytes: None }
    }
}

/// A plugin version: its name and version as loaded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PluginId {
    /// The plugin's name.
    pub name: String,
    /// Its version.
    pub version: String,
}

impl fmt::Display for PluginId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// Where a component's bytes come from.
#[derive(Debug, Clone, Copy)]
pub enum WasmSource<'a> {
    /// The component itself.
    Bytes(&'a [u8]),
    /// A `.wasm` file holding it.
    File(&'a Path),
}

impl<'a> From<&'a [u8]> for WasmSource<'a> {
    fn from(bytes: &'a [u8]) -> Self {
        WasmSource::Bytes(bytes)
    }
}

impl<'a> From<&'a Vec<u8>> for WasmSource<'a> {
    fn from(bytes: &'a Vec<u8>) -> Self {
        WasmSource::Bytes(bytes)
    }
}

impl<'a> From<&'a Path> for WasmSource<'a> {
    fn from(path: &'a Path) -> Self {
        WasmSource::File(path)
    }
}

impl<'a> From<&'a PathBuf> for WasmSource<'a> {
    fn from(path: &'a PathBuf) -> Self {
        WasmSource::File(path)
    }
}

/// The node's plugin runtime. Plugins loaded from it keep its engine (and its epoch ticker) alive:
/// the ticker thread stops when the runtime and all its plugins are dropped.
pub struct PluginRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<CallState>,
    cache: ArtifactCache,
    settings: PluginSettings,
    metrics: Arc<PluginMetrics>,
    pooling: bool,
    /// One permit per pooled instance slot of one-shot calls: a full pool fails instantiation at
    /// once, so calls wait here (bounded) instead. The tenants' [`SessionSlots`] have slots of
    /// their own beside these.
    permits: Arc<Semaphore>,
    /// Load-time dry runs use the one extra pool slot, one at a time.
    load_slot: tokio::sync::Mutex<()>,
    /// Finished instances that kept stores hold, across all plugins (see [`super::spare`]).
    retired: Arc<AtomicU32>,
    plugins: Mutex<Vec<Weak<PluginCore>>>,
    _ticker: EpochTicker,
}

impl PluginRuntime {
    /// Starts the engine (the pooling allocator, or on-demand allocation with a warning when the
    /// pool cannot be reserved), the epoch ticker, and opens the artifact cache. No slots are
    /// set aside for tenants' [`SessionSlots`]: see [`PluginRuntime::with_session_slots`].
    pub fn new(settings: PluginSettings, metrics: Arc<PluginMetrics>) -> Result<PluginRuntime, PluginError> {
        PluginRuntime::with_session_slots(settings, metrics, 0)
    }

    /// As [`PluginRuntime::new`], with `session_slots` pool slots set aside beside the shared
    /// ones: as many as the tenants' [`SessionSlots`] hold together.
    pub fn with_session_slots(
        settings: PluginSettings,
        metrics: Arc<PluginMetrics>,
        session_slots: u32,
    ) -> Result<PluginRuntime, PluginError> {
        check_settings(&settings)?;
        let (engine, pooling) = match Engine::new(&engine_config(&settings, session_slots, true)?) {
            Ok(engine) => (engine, true),
            Err(error) => {
                tracing::warn!(
                    error = %format!("{error:#}"),
                    max_instances = settings.max_instances,
                    session_slots,
                    "cannot reserve the plugin instance pool; falling back to on-demand allocation (slower instantiation)"
                );
                let engine = Engine::new(&engine_config(&settings, session_slots, false)?)
                    .map_err(|e| PluginError::Runtime(format!("cannot start the wasm engine: {e:#}")))?;
                (engine, false)
            }
        };
        let mut linker = Linker::new(&engine);
        bindings::add_to_linker(&mut linker).map_err(|e| PluginError::Runtime(format!("{e:#}")))?;
        let cache = ArtifactCache::open(&settings.cache_dir, &engine)?;
        let ticker = EpochTicker::start(engine.clone(), Duration::from_millis(settings.epoch_tick_ms))
            .map_err(|source| PluginError::Io { path: PathBuf::from("<epoch ticker thread>"), source })?;
        Ok(PluginRuntime {
            inner: Arc::new(Inner {
                engine,
                linker,
                cache,
                permits: Arc::new(Semaphore::new(settings.max_instances as usize)),
                settings,
                metrics,
                pooling,
                load_slot: tokio::sync::Mutex::new(()),
                retired: Arc::default(),
                plugins: Mutex::default(),
                _ticker: ticker,
            }),
        })
    }

    /// Whether instances come from the pooling allocator (false after the fallback).
    pub fn is_pooling(&self) -> bool {
        self.inner.pooling
    }

    /// How the artifact cache has served loads so far.
    pub fn cache_stats(&self) -> CacheStats {
        self.inner.cache.stats()
    }

    /// Where the compiled artifact of this component is cached.
    pub fn artifact_path(&self, wasm: &[u8]) -> PathBuf {
        self.inner.cache.path_for(wasm)
    }

    /// The loaded plugin versions that are quarantined now (for `/readyz`).
    pub fn quarantined(&self) -> Vec<PluginId> {
        let mut plugins = self.inner.plugins.lock().unwrap_or_else(PoisonError::into_inner);
        plugins.retain(|p| p.strong_count() > 0);
        let mut ids: Vec<PluginId> =
            plugins.iter().filter_map(Weak::upgrade).filter(|p| p.is_quarantined()).map(|p| p.id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Loads a router: compiles the component (or takes it from the cache), checks that it is a
    /// `router`, and has it accept `config_json` once on a trial instance.
    pub async fn load_router<'a>(
        &self,
        name: &str,
        version: &str,
        wasm: impl Into<WasmSource<'a>>,
        config_json: &str,
        limits: CallLimits,
    ) -> Result<RouterPlugin, PluginError> {
        let (core, entry) = self.prepare(name, version, wasm.into(), config_json, limits, RouterEntry::new).await?;
        // A trial instance: the snapshot instantiates (and, without one, `configure` accepts).
        let _slot = self.inner.load_slot.lock().await;
        let mut call = core.start(None);
        let result = core
            .bounded(async {
                let router = entry.instantiate(&mut call.store).await?;
                core.configure(|config| router.configure(&mut call.store, config)).await
            })
            .await;
        core.finish(call, result, |_| Ok(()))?;
        Ok(RouterPlugin { core: self.register(core), entry })
    }

    /// Loads a privacy filter: as [`PluginRuntime::load_router`], for the `privacy-filter` world.
    pub async fn load_filter<'a>(
        &self,
        name: &str,
        version: &str,
        wasm: impl Into<WasmSource<'a>>,
        config_json: &str,
        limits: CallLimits,
    ) -> Result<FilterPlugin, PluginError> {
        let (core, entry) = self.prepare(name, version, wasm.into(), config_json, limits, FilterEntry::new).await?;
        let _slot = self.inner.load_slot.lock().await;
        let mut call = core.start(None);
        let result = core
            .bounded(async {
                let filter = entry.instantiate(&mut call.store).await?;
                core.configure(|config| filter.configure(&mut call.store, config)).await
            })
            .await;
        if result.is_ok() {
            core.declare_triggers(&mut call.store)?;
        }
        core.finish(call, result, |_| Ok(()))?;
        Ok(FilterPlugin { core: self.register(core), entry })
    }

    /// Compiles (or loads from the cache) and links a component, checks its world with `typed`
    /// (the world's [`entry`](super::entry) constructor, which looks up its exports; its second
    /// argument says whether the component imports WASI, whose calls can block), and
    /// pre-initialises it.
    async fn prepare<P>(
        &self,
        name: &str,
        version: &str,
        wasm: WasmSource<'_>,
        config_json: &str,
        limits: CallLimits,
        typed: impl Fn(InstancePre<CallState>, bool) -> Result<P, PluginError>,
    ) -> Result<(Arc<PluginCore>, P), PluginError> {
        let settings = &self.inner.settings;
        let memory_bytes = limits.max_memory_bytes.unwrap_or(settings.max_memory_bytes);
        if memory_bytes > settings.max_memory_bytes {
            return Err(PluginError::Settings(format!(
                "plugin {name}@{version}: a memory cap of {memory_bytes} bytes is above the runtime's max_memory_bytes ({})",
                settings.max_memory_bytes
            )));
        }
        if limits.deadline_ms == 0 {
            return Err(PluginError::Settings(format!("plugin {name}@{version}: deadline_ms must be at least 1")));
        }
        let bytes = match wasm {
            WasmSource::Bytes(bytes) => bytes.to_vec(),
            WasmSource::File(path) => {
                std::fs::read(path).map_err(|source| PluginError::Io { path: path.to_path_buf(), source })?
            }
        };
        let bytes = componentize::component(bytes)?;
        let component = self.compile(bytes.clone()).await?;
        // Linking and the world first: a component written for another host or world is refused
        // before anything of it runs.
        let pre = self.link(&component)?;
        let blocking = imports_wasi(&component, &self.inner.engine);
        typed(pre.clone(), blocking)?;
        let deadline = Duration::from_millis(limits.deadline_ms);
        let tick = Duration::from_millis(settings.epoch_tick_ms);
        let guest = Arc::new(GuestIdentity {
            name: name.into(),
            version: version.into(),
            metrics: Arc::clone(&self.inner.metrics),
            max_log_lines: settings.max_log_lines_per_call,
            max_log_line_bytes: settings.max_log_line_bytes,
        });
        let core = PluginCore {
            runtime: Arc::clone(&self.inner),
            id: PluginId { name: name.into(), version: version.into() },
            guest,
            config: config_json.into(),
            deadline,
            // The first tick comes anywhere within one period, so one more tick than the deadline
            // holds guarantees at least the deadline (and at most one tick more).
            deadline_ticks: deadline.as_nanos().div_ceil(tick.as_nanos()) as u64 + 1,
            // A guest blocked in a host call (a sleep, a poll) never sees the epoch: this bounds
            // it. Only WASI's calls can block; a plugin that imports only `host` (whose calls
            // return at once) is bounded by the epoch alone, without a timer per call.
            wall_limit: blocking.then(|| deadline + tick * 2 + Duration::from_millis(20)),
            memory_bytes,
            peak_memory_bytes: AtomicUsize::new(0),
            health: Mutex::default(),
            preconfigured: false,
            answer_triggers: OnceLock::new(),
            request_triggers: OnceLock::new(),
            ok_calls: self.inner.metrics.calls.with_label_values(&[name, version, "ok"]),
            skipped_calls: self.inner.metrics.calls.with_label_values(&[name, version, "skipped"]),
            call_seconds: self.inner.metrics.call_seconds.with_label_values(&[name]),
            spare: Mutex::default(),
        };
        let (core, pre) = self.pre_initialise(core, &bytes, pre).await?;
        Ok((core, typed(pre, blocking)?))
    }

    fn link(&self, component: &Component) -> Result<InstancePre<CallState>, PluginError> {
        self.inner.linker.instantiate_pre(component).map_err(|e| {
            // The linker has WASI and `host`; an import outside them is a component written for
            // another host, which is what a wrong world means to an operator.
            PluginError::WrongWorld { world: "router or privacy-filter", message: format!("{e:#}") }
        })
    }

    /// Takes the plugin's snapshot after `configure` ([`snapshot`]) and links it in place of
    /// the component, so that calls skip `configure`; a component that cannot be snapshotted
    /// keeps `pre` and runs `configure` per call. A failing `configure` fails the load, as the
    /// trial call would.
    async fn pre_initialise(
        &self,
        mut core: PluginCore,
        wasm: &[u8],
        pre: InstancePre<CallState>,
    ) -> Result<(Arc<PluginCore>, InstancePre<CallState>), PluginError> {
        let unsupported = |core: PluginCore, reason: String| {
            tracing::info!(plugin = %core.id, %reason, "no snapshot after configure: every instance runs configure");
            Ok((Arc::new(core), pre.clone()))
        };
        if wasm.len() > SNAPSHOT_MAX_WASM_BYTES {
            let reason =
                format!("a component of {} bytes (an interpreter, pre-initialised by its toolchain)", wasm.len());
            return unsupported(core, reason);
        }
        let instrumented = match snapshot::instrument(wasm) {
            Ok(instrumented) => instrumented,
            Err(reason) => return unsupported(core, reason),
        };
        let component = match self.compile(instrumented.wasm.clone()).await {
            Ok(component) => component,
            Err(error) => return unsupported(core, format!("cannot compile the instrumented component: {error}")),
        };
        let taken = {
            let _slot = self.inner.load_slot.lock().await;
            let mut call = core.start(None);
            let configured = core
                .bounded(async {
                    let configured = snapshot::configure(&component, &core.config, &self.inner.linker, &mut call.store);
                    configured.await.map_err(|failure| match failure {
                        snapshot::ConfigureFailure::Wasm(error) => Failure::Wasm(error),
                        snapshot::ConfigureFailure::Rejected(reason) => Failure::Rejected(reason),
                    })
                })
                .await;
            let taken = match configured {
                Ok(instance) => {
                    core.declare_triggers(&mut call.store)?;
                    // Copying the state out is the host's work, not the plugin's: past its deadline.
                    call.store.set_epoch_deadline(SNAPSHOT_TICKS);
                    Ok(snapshot::take(&instrumented, instance, &mut call.store).await)
                }
                Err(failure) => Err(failure),
            };
            core.finish(call, taken, |_| Ok(()))?
        };
        let bytes = match taken {
            snapshot::Snapshot::Taken(bytes) => bytes,
            snapshot::Snapshot::Unsupported(reason) => return unsupported(core, reason),
        };
        let pre = self.link(&self.compile(bytes).await?)?;
        core.preconfigured = true;
        tracing::debug!(plugin = %core.id, "instances start from the snapshot taken after configure");
        Ok((Arc::new(core), pre))
    }

    /// Compiles a component (or takes it from the cache), off the Tokio workers: compiling takes
    /// up to seconds of CPU.
    async fn compile(&self, bytes: Vec<u8>) -> Result<Component, PluginError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.cache.load(&inner.engine, &bytes))
            .await
            .map_err(|e| PluginError::Runtime(format!("compilation task failed: {e}")))?
    }

    fn register(&self, core: Arc<PluginCore>) -> Arc<PluginCore> {
        let mut plugins = self.inner.plugins.lock().unwrap_or_else(PoisonError::into_inner);
        plugins.retain(|p| p.strong_count() > 0);
        plugins.push(Arc::downgrade(&core));
        core
    }
}

/// Whether `component` imports any WASI interface (whose calls, unlike `host`'s, can block).
fn imports_wasi(component: &Component, engine: &Engine) -> bool {
    component.component_type().imports(engine).any(|(name, _)| name.starts_with("wasi:"))
}

fn check_settings(settings: &PluginSettings) -> Result<(), PluginError> {
    let fail = |message: &str| Err(PluginError::Settings(message.into()));
    if settings.max_instances == 0 {
        return fail("max_instances must be at least 1");
    }
    if settings.max_sessions_per_tenant == 0 {
        return fail("max_sessions_per_tenant must be at least 1");
    }
    if settings.epoch_tick_ms == 0 {
        return fail("epoch_tick_ms must be at least 1");
    }
    if settings.max_memory_bytes < 64 << 10 {
        return fail("max_memory_bytes must be at least one wasm page (65536)");
    }
    if settings.quarantine_after == 0 {
        return fail("quarantine_after must be at least 1");
    }
    Ok(())
}

fn engine_config(settings: &PluginSettings, session_slots: u32, pooling: bool) -> Result<Config, PluginError> {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.memory_init_cow(true);
    // Plugins are called, never run concurrently inside one store: without the component-model
    // async machinery a store is cheaper to make.
    config.concurrency_support(false);
    if pooling {
        // The shared semaphore's permits, one more for load-time dry runs, every tenant's
        // session slots, and the finished instances that kept stores may hold.
        let slots = settings
            .max_instances
            .checked_add(1 + RETIRED_RESERVE)
            .and_then(|s| s.checked_add(session_slots))
            .ok_or_else(|| PluginError::Settings("the instance pool's size overflows a u32".into()))?;
        let total = |per_component: u32, what: &str| {
            slots
                .checked_mul(per_component)
                .ok_or_else(|| PluginError::Settings(format!("max_instances × {what} per component overflows a u32")))
        };
        let mut pool = PoolingAllocationConfig::new();
        // Sized per core instance, memory and table as well as per component instance: a Rust
        // wasm32-wasip2 component holds several core instances.
        pool.total_component_instances(slots)
            .total_core_instances(total(settings.max_core_instances_per_component, "core instances")?)
            .total_memories(total(settings.max_memories_per_component, "memories")?)
            .total_tables(total(settings.max_tables_per_component, "tables")?)
            .total_stacks(slots)
            .max_core_instances_per_component(settings.max_core_instances_per_component)
            .max_memories_per_component(settings.max_memories_per_component)
            .max_tables_per_component(settings.max_tables_per_component)
            .max_memory_size(settings.max_memory_bytes)
            // Measured here: keep-resident alone made drops slower (it memsets the whole kept
            // region); with PAGEMAP_SCAN only the dirty pages are reset (Linux ≥ 6.7, else off).
            .linear_memory_keep_resident(settings.keep_resident_bytes)
            .table_keep_resident(settings.keep_resident_bytes)
            .pagemap_scan(Enabled::Auto);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    Ok(config)
}

/// Advances the engine's epoch every period until dropped.
struct EpochTicker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine, period: Duration) -> std::io::Result<EpochTicker> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("plugin-epoch".into()).spawn(move || loop {
            match stopped.recv_timeout(period) {
                Err(RecvTimeoutError::Timeout) => engine.increment_epoch(),
                // The sender dropped: the runtime is gone.
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
        })?;
        Ok(EpochTicker { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // The thread wakes at once on the disconnect; joining keeps it from outliving us.
            let _ = thread.join();
        }
    }
}

/// What one loaded plugin version shares between its handle and the runtime's registry.
struct PluginCore {
    runtime: Arc<Inner>,
    id: PluginId,
    guest: Arc<GuestIdentity>,
    config: String,
    deadline: Duration,
    deadline_ticks: u64,
    wall_limit: Option<Duration>,
    memory_bytes: usize,
    /// The most linear memory any one instance of this plugin has held, load included.
    peak_memory_bytes: AtomicUsize,
    health: Mutex<Health>,
    /// Whether instances start from a snapshot taken after `configure`, so that calls skip it.
    preconfigured: bool,
    /// What a filter's load-time `configure` declared through `answer-triggers`.
    answer_triggers: OnceLock<Arc<Triggers>>,
    /// What a filter's load-time `configure` declared through `request-triggers`.
    request_triggers: OnceLock<Triggers>,
    /// The metrics every successful call updates, looked up once rather than by labels per call.
    ok_calls: prometheus::IntCounter,
    /// Requests a filter's declared triggers let through without a call.
    skipped_calls: prometheus::IntCounter,
    call_seconds: prometheus::Histogram,
    /// What finished calls left for the next ones: stores that may take more instances, or
    /// host-side states ([`CallState::reset`]).
    spare: Mutex<Vec<Spare>>,
}

/// Recent failures of a plugin version, and whether it is quarantined.
#[derive(Default)]
struct Health {
    failures: VecDeque<Instant>,
    quarantined: bool,
}

/// Why a call's wasm side ended without an answer.
enum Failure {
    Wasm(wasmtime::Error),
    Rejected(String),
    WallTimeout,
}

impl From<wasmtime::Error> for Failure {
    fn from(error: wasmtime::Error) -> Self {
        Failure::Wasm(error)
    }
}

/// One call in progress (or, in a response session, the instance between calls): its store and
/// output pipes, the finished instances the store already holds, and the permit it holds.
struct Call {
    store: Store<CallState>,
    retired: Retired,
    stdout: CappedPipe,
    stderr: CappedPipe,
    started: Instant,
    counted: bool,
    _permit: Option<OwnedSemaphorePermit>,
}

impl PluginCore {
    fn is_quarantined(&self) -> bool {
        self.health.lock().unwrap_or_else(PoisonError::into_inner).quarantined
    }

    /// Fails a call of a quarantined version (counted), before anything of it runs.
    fn refuse_if_quarantined(&self) -> Result<(), PluginError> {
        if self.is_quarantined() {
            self.count("quarantined");
            return Err(PluginError::Quarantined(self.id.clone()));
        }
        Ok(())
    }

    /// Admits a call: not quarantined, and an instance slot of `slots` (the shared semaphore, or
    /// a tenant's [`SessionSlots`]) free within the acquire timeout.
    async fn admit(&self, slots: &Arc<Semaphore>) -> Result<Call, PluginError> {
        self.refuse_if_quarantined()?;
        // A free slot is taken without a timer (most calls): the timeout is armed only to wait.
        if let Ok(permit) = Arc::clone(slots).try_acquire_owned() {
            return Ok(self.start(Some(permit)));
        }
        let wait = Duration::from_millis(self.runtime.settings.acquire_timeout_ms);
        match tokio::time::timeout(wait, Arc::clone(slots).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(self.start(Some(permit))),
            // The semaphore is never closed; a closed one could only mean "no capacity" too.
            Ok(Err(_)) | Err(_) => {
                self.count("overloaded");
                Err(PluginError::Overloaded(wait))
            }
        }
    }

    /// A store for a call's fresh instance (kept from an earlier call, or new): WASI with nothing
    /// in it, capped stdio, the memory cap and the deadline.
    fn start(&self, permit: Option<OwnedSemaphorePermit>) -> Call {
        let spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let state = match spare {
            Some(Spare::Store(mut store, retired)) => {
                store.data_mut().reset(self.memory_bytes);
                store.set_epoch_deadline(self.deadline_ticks);
                let (stdout, stderr) = (store.data().stdout.clone(), store.data().stderr.clone());
                let counted = permit.is_some();
                return Call { store, retired, stdout, stderr, started: Instant::now(), counted, _permit: permit };
            }
            Some(Spare::State(mut state)) => {
                state.reset(self.memory_bytes);
                *state
            }
            None => {
                let bytes = self.runtime.settings.max_stdio_bytes;
                CallState::new(
                    Arc::clone(&self.guest),
                    self.memory_bytes,
                    CappedPipe::new(bytes),
                    CappedPipe::new(bytes),
                )
            }
        };
        let (stdout, stderr) = (state.stdout.clone(), state.stderr.clone());
        let mut store = Store::new(&self.runtime.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(self.deadline_ticks);
        let retired = Retired::new(Arc::clone(&self.runtime.retired));
        Call { store, retired, stdout, stderr, started: Instant::now(), counted: permit.is_some(), _permit: permit }
    }

    /// Runs `configure` on a fresh instance (`call` calls it with the plugin's configuration),
    /// unless instances start from the snapshot taken after it.
    async fn configure<'a, F>(&'a self, call: impl FnOnce(&'a str) -> F) -> Result<(), Failure>
    where
        F: std::future::Future<Output = wasmtime::Result<Result<(), String>>>,
    {
        if self.preconfigured {
            return Ok(());
        }
        call(&self.config).await?.map_err(Failure::Rejected)
    }

    /// Runs the wasm side of a call under the wall-clock bound, when it has one.
    async fn bounded<R>(&self, work: impl std::future::Future<Output = Result<R, Failure>>) -> Result<R, Failure> {
        match self.wall_limit {
            Some(limit) => tokio::time::timeout(limit, work).await.unwrap_or(Err(Failure::WallTimeout)),
            None => work.await,
        }
    }

    /// Ends a call: forwards its output, turns the result into a checked answer or a typed error,
    /// and keeps the books (metrics, quarantine) for counted calls. Its instance is never called
    /// again: after a counted call that went well (checked answer, small memory), its store is
    /// kept for the next call's fresh instance; otherwise the store and its instances are dropped,
    /// and the host side of it is kept.
    fn finish<R>(
        &self,
        mut call: Call,
        result: Result<R, Failure>,
        check: impl FnOnce(&R) -> Result<(), String>,
    ) -> Result<R, PluginError> {
        let memory_hit = self.collect(&mut call.store);
        let small = call.store.data().limiter.peak_memory_bytes <= KEEP_MAX_MEMORY_BYTES;
        let Call { store, mut retired, stdout, stderr, started, counted, _permit } = call;
        drop(_permit);
        let result = self.settle(memory_hit, &stdout, &stderr, started, counted, result, check);
        // Load-time dry runs (uncounted) may run another component (the snapshot's): their
        // stores go.
        let spare = if counted && result.is_ok() && !memory_hit && small && retired.try_add() {
            Spare::Store(store, retired)
        } else {
            let state = store.into_data();
            drop(retired);
            Spare::State(Box::new(state))
        };
        let unkept = {
            let mut kept = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
            if kept.len() < SPARE_STATES {
                kept.push(spare);
                None
            } else {
                Some(spare)
            }
        };
        // A spare that found no room (a store and its instances) is dropped outside the lock.
        drop(unkept);
        result
    }

    /// Keeps what the load-time `configure` declared through `answer-triggers` and
    /// `request-triggers`, checked; later declarations (the per-instance `configure` of a plugin
    /// without a snapshot) are ignored.
    fn declare_triggers(&self, store: &mut Store<CallState>) -> Result<(), PluginError> {
        let declared = store.data_mut().take_declared_triggers();
        let check = |literals, what: &str| {
            let triggers = Triggers::new(literals).map_err(|e| PluginError::InvalidOutput(format!("{what}: {e}")))?;
            tracing::debug!(plugin = %self.id, triggers = ?triggers.literals(), "{what} declared");
            Ok::<_, PluginError>(triggers)
        };
        if let Some(literals) = declared.answer {
            let _ = self.answer_triggers.set(Arc::new(check(literals, "answer-triggers")?));
        }
        if let Some(literals) = declared.request {
            let _ = self.request_triggers.set(check(literals, "request-triggers")?);
        }
        Ok(())
    }

    /// Readies a kept instance for its next call: the deadline re-armed (an epoch deadline counts
    /// from when it is set), the per-call log caps and the call's clock started afresh.
    fn rearm(&self, call: &mut Call) {
        call.store.set_epoch_deadline(self.deadline_ticks);
        call.store.data_mut().begin_call();
        call.started = Instant::now();
    }

    /// Takes a call's usage from its store: the memory high-water mark, log lines dropped (now
    /// counted, and reset for a kept instance's next call); returns whether the cap was hit.
    fn collect(&self, store: &mut Store<CallState>) -> bool {
        let state = store.data_mut();
        self.peak_memory_bytes.fetch_max(state.limiter.peak_memory_bytes, Ordering::Relaxed);
        self.runtime.metrics.log_dropped(&self.id.name, state.take_log_dropped());
        state.limiter.memory_hit
    }

    /// Turns a call's result into a checked answer or a typed error, forwards the call's output
    /// and keeps the books (metrics, quarantine) for counted calls.
    #[allow(clippy::too_many_arguments)]
    fn settle<R>(
        &self,
        memory_hit: bool,
        stdout: &CappedPipe,
        stderr: &CappedPipe,
        started: Instant,
        counted: bool,
        result: Result<R, Failure>,
        check: impl FnOnce(&R) -> Result<(), String>,
    ) -> Result<R, PluginError> {
        let result = match result {
            Ok(answer) => check(&answer).map(|()| answer).map_err(PluginError::InvalidOutput),
            Err(Failure::Rejected(text)) => Err(PluginError::ConfigRejected(text)),
            Err(Failure::WallTimeout) => Err(PluginError::Timeout(self.deadline)),
            Err(Failure::Wasm(error)) => Err(self.classify(error, memory_hit, stderr)),
        };
        stdout.forward(&self.guest, "stdout");
        stderr.forward(&self.guest, "stderr");
        if counted {
            self.call_seconds.observe(started.elapsed().as_secs_f64());
            match &result {
                Ok(_) => self.ok_calls.inc(),
                Err(error) => {
                    self.count(error.kind());
                    if error.is_plugin_fault() {
                        self.record_failure(error);
                    }
                }
            }
        }
        result
    }

    fn classify(&self, error: wasmtime::Error, memory_hit: bool, stderr: &CappedPipe) -> PluginError {
        if memory_hit {
            return PluginError::MemoryLimit(self.memory_bytes);
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => PluginError::Timeout(self.deadline),
            trap => {
                let what = trap.map_or_else(|| format!("{error:#}"), Trap::to_string);
                let mut message = bindings::truncate(&what, TRAP_MESSAGE_BYTES).into_owned();
                // A Rust guest prints its panic message to stderr just before the trap.
                if let Some(tail) = stderr.tail(TRAP_MESSAGE_BYTES) {
                    message = format!("{message} (stderr: {tail})");
                }
                PluginError::Trap(message)
            }
        }
    }

    fn count(&self, outcome: &str) {
        self.runtime.metrics.calls.with_label_values(&[&self.id.name, &self.id.version, outcome]).inc();
    }

    /// Counts a failure; the `quarantine_after`-th within the window quarantines the version.
    fn record_failure(&self, error: &PluginError) {
        let settings = &self.runtime.settings;
        let window = Duration::from_secs(settings.quarantine_window_secs);
        let now = Instant::now();
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        health.failures.push_back(now);
        while health.failures.front().is_some_and(|t| now.duration_since(*t) > window) {
            health.failures.pop_front();
        }
        if !health.quarantined && health.failures.len() >= settings.quarantine_after as usize {
            health.quarantined = true;
            tracing::error!(
                plugin = %self.id,
                failures = health.failures.len(),
                window_secs = settings.quarantine_window_secs,
                last_error = %error,
                "plugin quarantined after repeated failures"
            );
        }
    }
}

/// A loaded router. Cheap to share behind an `Arc`; every call runs on a fresh instance.
pub struct RouterPlugin {
    core: Arc<PluginCore>,
    entry: RouterEntry,
}

impl RouterPlugin {
    /// The plugin's name and version.
    pub fn id(&self) -> &PluginId {
        &self.core.id
    }

    /// The most linear memory (all its memories together, in bytes) that one instance of this
    /// plugin has held so far, the load-time dry run included: a high-water mark across calls.
    pub fn peak_memory_bytes(&self) -> usize {
        self.core.peak_memory_bytes.load(Ordering::Relaxed)
    }

    /// Whether its instances start from the snapshot taken after `configure` (calls skip it),
    /// rather than running `configure` on each.
    pub fn pre_initialised(&self) -> bool {
        self.core.preconfigured
    }

    /// Whether its calls enter the instance directly, without a fiber or a wall-clock timer:
    /// it imports only `host`, whose functions return at once, so nothing in a call can block
    /// (see [`entry`](super::entry)). A plugin that imports WASI is called on a fiber.
    pub fn called_directly(&self) -> bool {
        self.entry.is_direct()
    }

    /// Asks the router where a request goes. `held` gives, per target in order, how many of the
    /// request's prompt tokens it holds in its prefix cache (what the guest's `prefix-match`
    /// answers; shorter or empty means 0). The outcome is checked: a decision names only given
    /// targets (each once, at least one), a refusal has an HTTP error status.
    pub async fn route(
        &self,
        summary: &RequestSummary,
        targets: &[Target],
        held: &[u32],
    ) -> Result<Outcome, PluginError> {
        let core = &self.core;
        let mut call = core.admit(&core.runtime.permits).await?;
        call.store.data_mut().set_prefix_held(targets, held);
        let result = core
            .bounded(async {
                let router = self.entry.instantiate(&mut call.store).await?;
                core.configure(|config| router.configure(&mut call.store, config)).await?;
                Ok(router.route(&mut call.store, summary, targets).await?)
            })
            .await;
        core.finish(call, result, |outcome| validate::outcome(outcome, targets))
    }

    /// Opens a [`RouterSession`]: one instance for many calls. **Not for the request path**, where
    /// every request gets a fresh instance; it is for simulations and benchmarks that call a
    /// router a million times on one thread (`meridian::simulate`), where instantiation would
    /// cost most of the time. Nothing is instantiated until the first [`RouterSession::route`].
    pub fn session(&self) -> RouterSession {
        RouterSession { core: Arc::clone(&self.core), entry: self.entry.clone(), live: None, poisoned: false }
    }
}

/// One router instance reused across calls, for simulations only (see [`RouterPlugin::session`]).
///
/// It is configured once, at its first call; every call then has the plugin's deadline (re-armed
/// per call), its memory cap (across the session), its per-call log caps, the output check, and the
/// metrics and quarantine bookkeeping of a one-shot call. A failure drops the instance and poisons
/// the session: later calls answer [`PluginError::Poisoned`]; open a new session to go on. The
/// session holds an instance slot until dropped. A router that keeps state between calls in its
/// globals would see it here, which a fresh instance never does; the shipped routers keep none
/// (the cost router's global holds only its configuration).
pub struct RouterSession {
    core: Arc<PluginCore>,
    entry: RouterEntry,
    live: Option<(Call, Option<RouterInstance>)>,
    poisoned: bool,
}

impl fmt::Debug for RouterSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterSession")
            .field("plugin", &self.core.id)
            .field("live", &self.live.is_some())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl RouterSession {
    /// The plugin's name and version.
    pub fn id(&self) -> &PluginId {
        &self.core.id
    }

    /// Asks the session's instance where a request goes (`held` as for [`RouterPlugin::route`]);
    /// the outcome is checked as [`RouterPlugin::route`] checks it.
    pub async fn route(
        &mut self,
        summary: &RequestSummary,
        targets: &[Target],
        held: &[u32],
    ) -> Result<Outcome, PluginError> {
        let core = &self.core;
        if self.poisoned {
            core.count("poisoned");
            return Err(PluginError::Poisoned);
        }
        let (mut call, mut router) = match self.live.take() {
            None => (core.admit(&core.runtime.permits).await?, None),
            Some((mut call, router)) => {
                core.refuse_if_quarantined()?;
                core.rearm(&mut call);
                (call, router)
            }
        };
        call.store.data_mut().set_prefix_held(targets, held);
        let result = core
            .bounded(async {
                let router = match &mut router {
                    Some(router) => router,
                    None => {
                        let fresh = self.entry.instantiate(&mut call.store).await?;
                        core.configure(|config| fresh.configure(&mut call.store, config)).await?;
                        router.insert(fresh)
                    }
                };
                Ok(router.route(&mut call.store, summary, targets).await?)
            })
            .await;
        let memory_hit = core.collect(&mut call.store);
        let outcome = core.settle(memory_hit, &call.stdout, &call.stderr, call.started, call.counted, result, |o| {
            validate::outcome(o, targets)
        });
        match &outcome {
            Ok(_) => self.live = Some((call, router)),
            // The instance (perhaps trapped, or interrupted mid-call) and its slot go now.
            Err(_) => self.poisoned = true,
        }
        outcome
    }
}

/// A loaded privacy filter. Cheap to share behind an `Arc`; every call runs on a fresh instance,
/// except the calls of one [`ResponseSession`], which share one.
pub struct FilterPlugin {
    core: Arc<PluginCore>,
    entry: FilterEntry,
}

impl FilterPlugin {
    /// The plugin's name and version.
    pub fn id(&self) -> &PluginId {
        &self.core.id
    }

    /// The most linear memory (all its memories together, in bytes) that one instance of this
    /// plugin has held so far, the load-time dry run included: a high-water mark across calls.
    pub fn peak_memory_bytes(&self) -> usize {
        self.core.peak_memory_bytes.load(Ordering::Relaxed)
    }

    /// Whether its instances start from the snapshot taken after `configure` (calls skip it),
    /// rather than running `configure` on each.
    pub fn pre_initialised(&self) -> bool {
        self.core.preconfigured
    }

    /// Whether its calls enter the instance directly, without a fiber or a wall-clock timer:
    /// it imports only `host`, whose functions return at once, so nothing in a call can block
    /// (see [`entry`](super::entry)). A plugin that imports WASI is called on a fiber.
    pub fn called_directly(&self) -> bool {
        self.entry.is_direct()
    }

    /// The answer triggers its `configure` declared at load, if any: its response sessions show
    /// it an answer only from the first of them on (see [`ResponseSession::inspect`]).
    pub fn answer_triggers(&self) -> Option<&Triggers> {
        self.core.answer_triggers.get().map(|t| &**t)
    }

    /// The request triggers its `configure` declared at load, if any: it is called only for
    /// requests that contain one (see [`FilterPlugin::inspect_request`]).
    pub fn request_triggers(&self) -> Option<&Triggers> {
        self.core.request_triggers.get()
    }

    /// Whether the filter is to be called for a request of `segments`: one of them holds one of
    /// its declared request triggers, or it declared none.
    pub fn needs_request(&self, segments: &[Segment]) -> bool {
        self.core.request_triggers.get().is_none_or(|t| segments.iter().any(|s| t.any_in(&s.text)))
    }

    /// Has the filter inspect a request's text. Redactions are checked: an existing segment, a
    /// non-empty range on character boundaries, no overlaps.
    ///
    /// A filter that declared request triggers is not called for a request none of whose
    /// segments contains one: the verdict is to allow it unchanged, counted as a `skipped`
    /// call. A quarantined version still fails every request, needed or not, as it would have
    /// if called (fail closed).
    pub async fn inspect_request(
        &self,
        summary: &RequestSummary,
        segments: &[Segment],
    ) -> Result<RequestVerdict, PluginError> {
        let core = &self.core;
        if !self.needs_request(segments) {
            core.refuse_if_quarantined()?;
            core.skipped_calls.inc();
            return Ok(RequestVerdict::Allow(Inspection { labels: Vec::new(), redactions: Vec::new() }));
        }
        let mut call = core.admit(&core.runtime.permits).await?;
        let result = core
            .bounded(async {
                let filter = self.entry.instantiate(&mut call.store).await?;
                core.configure(|config| filter.configure(&mut call.store, config)).await?;
                Ok(filter.inspect_request(&mut call.store, summary, segments).await?)
            })
            .await;
        core.finish(call, result, |verdict| validate::request_verdict(verdict, segments))
    }

    /// Has the filter see a whole answer's text at once, on a fresh instance: a one-call
    /// [`ResponseSession`].
    pub async fn inspect_response(&self, text: &str) -> Result<ResponseVerdict, PluginError> {
        self.response_session().inspect(text).await
    }

    /// Opens a session for one answer whose instance takes a slot of the shared semaphore, as a
    /// one-shot call does: for a whole answer (one piece, so one call) and for tools that show a
    /// filter text outside any tenant. A streamed answer takes its tenant's slots instead
    /// ([`FilterPlugin::tenant_session`]).
    ///
    /// Its pieces, in order, go to one instance of the filter (which the contract's
    /// `inspect-response` promises: the answer's text in order), so that the filter can keep
    /// state across them, such as a secret split across stream chunks. Nothing is instantiated
    /// until the first [`ResponseSession::inspect`].
    pub fn response_session(&self) -> ResponseSession {
        self.session_in(&self.core.runtime.permits)
    }

    /// Opens a session for one streamed answer of a tenant: as [`FilterPlugin::response_session`],
    /// but its instance takes one of the tenant's `slots`, from the first piece until the session
    /// is dropped.
    pub fn tenant_session(&self, slots: &SessionSlots) -> ResponseSession {
        self.session_in(&slots.permits)
    }

    fn session_in(&self, slots: &Arc<Semaphore>) -> ResponseSession {
        ResponseSession {
            core: Arc::clone(&self.core),
            entry: self.entry.clone(),
            slots: Arc::clone(slots),
            state: SessionState::Idle,
            gate: Gate::new(self.core.answer_triggers.get()),
        }
    }
}

/// One tenant's instance slots for the answer side of its filters on streamed answers: a
/// semaphore (of `max_sessions_per_tenant` permits, or fewer for a tenant whose concurrency
/// cannot use them), whose slots the pool holds on top of the shared ones
/// ([`PluginRuntime::with_session_slots`] sets them aside; the node makes one per tenant). Cheap
/// to clone: clones share the permits.
///
/// Why slots per tenant rather than an instance per chunk. A stream's filter instance lives as
/// long as the stream, and a stream lives as long as its upstream and its client allow: a
/// tenant's slow or stalled streams held pool slots that every tenant's calls needed, so enough
/// of them made every other tenant's filtered requests fail. The contract (`wit/`) promises a
/// filter every piece of one answer on one instance, and a filter may keep what it needs in its
/// globals (pii-redactor keeps a window of the text before, to find a secret split across
/// chunks); there is no way to take that state out of an instance between chunks and into
/// another one, short of changing the contract. Replaying the text seen so far to a fresh
/// instance at every chunk would keep the contract only for filters whose state is a window,
/// and would cost a fresh instance (6–8 µs measured here, pooled) plus the replay per chunk
/// instead of a reused call (0.7–3 µs). So a stream keeps its instance, at the cost of a reused
/// call per chunk as before, and the instance lives in its own tenant's slots: one tenant's
/// streams can exhaust only its own, while the shared slots (requests' filters, routers, whole
/// answers) and other tenants' session slots stay free for theirs. The price is address space,
/// not memory: each set-aside slot reserves its pooled memories' virtual range.
#[derive(Clone)]
pub struct SessionSlots {
    permits: Arc<Semaphore>,
}

impl SessionSlots {
    /// A tenant's `slots` session slots.
    pub fn new(slots: u32) -> SessionSlots {
        SessionSlots { permits: Arc::new(Semaphore::new(slots as usize)) }
    }
}

impl Default for SessionSlots {
    fn default() -> Self {
        SessionSlots::new(PluginSettings::default().max_sessions_per_tenant)
    }
}

impl fmt::Debug for SessionSlots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionSlots").field("free", &self.permits.available_permits()).finish()
    }
}

/// The answer side of one request's filter: every [`ResponseSession::inspect`] runs on the same
/// instance, instantiated and configured at the first one.
///
/// Each call is held to the plugin's limits as a one-shot call is: the deadline (re-armed for
/// every call; the first one's also covers instantiation and `configure`), the memory cap (the
/// instance's, across the session), the per-call caps on log lines and stdout/stderr (forwarded
/// after each call), metrics per call and the quarantine bookkeeping. Any failure poisons the
/// session: the instance is dropped and every later call answers [`PluginError::Poisoned`] (fail
/// closed), as does a call after the version was quarantined.
///
/// The session holds an instance slot (a permit of its semaphore, a slot of the pool) from its
/// first call until it is dropped: a streamed answer holds one of its tenant's [`SessionSlots`]
/// per filter for its duration.
pub struct ResponseSession {
    core: Arc<PluginCore>,
    entry: FilterEntry,
    /// Where its instance's slot comes from.
    slots: Arc<Semaphore>,
    state: SessionState,
    /// Which of the answer's text the filter is shown, from its declared triggers.
    gate: Gate,
}

enum SessionState {
    /// No call yet.
    Idle,
    /// The instance, between calls.
    Live(Box<Live>),
    /// A call failed; the instance is gone.
    Poisoned,
}

struct Live {
    call: Call,
    /// The instance's exports; `None` until instantiated in the first call.
    filter: Option<FilterInstance>,
}

impl fmt::Debug for ResponseSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            SessionState::Idle => "idle",
            SessionState::Live(_) => "live",
            SessionState::Poisoned => "poisoned",
        };
        f.debug_struct("ResponseSession").field("plugin", &self.core.id).field("state", &state).finish()
    }
}

impl ResponseSession {
    /// The plugin's name and version.
    pub fn id(&self) -> &PluginId {
        &self.core.id
    }

    /// Whether a call has failed, so that every later one fails too.
    pub fn is_poisoned(&self) -> bool {
        matches!(self.state, SessionState::Poisoned)
    }

    /// Has the filter see the next piece of the answer's text, on the session's instance. A
    /// filter that declared answer triggers is shown nothing before the first of them (a piece
    /// it does not need is allowed without a call, and without an instance), then that trigger's
    /// context and every later piece.
    pub async fn inspect(&mut self, text: &str) -> Result<ResponseVerdict, PluginError> {
        let core = &self.core;
        if let SessionState::Poisoned = self.state {
            core.count("poisoned");
            return Err(PluginError::Poisoned);
        }
        let text = match self.gate.admit(text) {
            Admit::Show(text) => text,
            Admit::Skip => return Ok(ResponseVerdict::Allow),
        };
        let text = &*text;
        // Poisoned unless this call succeeds.
        let mut live = match std::mem::replace(&mut self.state, SessionState::Poisoned) {
            // Counted above.
            SessionState::Poisoned => return Err(PluginError::Poisoned),
            SessionState::Idle => Box::new(Live { call: core.admit(&self.slots).await?, filter: None }),
            SessionState::Live(mut live) => {
                core.refuse_if_quarantined()?;
                core.rearm(&mut live.call);
                live
            }
        };
        let Live { call, filter } = &mut *live;
        let result = core
            .bounded(async {
                let filter = match filter {
                    Some(filter) => filter,
                    None => {
                        let fresh = self.entry.instantiate(&mut call.store).await?;
                        core.configure(|config| fresh.configure(&mut call.store, config)).await?;
                        filter.insert(fresh)
                    }
                };
                Ok(filter.inspect_response(&mut call.store, text).await?)
            })
            .await;
        let memory_hit = core.collect(&mut call.store);
        let verdict =
            core.settle(memory_hit, &call.stdout, &call.stderr, call.started, call.counted, result, |_| Ok(()));
        if verdict.is_ok() {
            self.state = SessionState::Live(live);
        }
        // Otherwise the instance (perhaps trapped, or interrupted mid-call) and its slot go now.
        verdict
    }
}
