//! Host-side bindings of the plugin contract (`wit/meridian-plugin.wit`) and the per-call store
//! state that implements the `host` interface.
//!
//! Both worlds are generated here; the filter world reuses the router world's `types` and `host`
//! modules (`with:`), so the two share one `RequestSummary` type and one `host` implementation, and
//! one `Linker` serves both.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::metrics::PluginMetrics;
use super::stdio::CappedPipe;

/// Gives a world's `Pre` a way to take an instance's exports without type-checking them again:
/// bindgen's `load` checks every export's type on every instance, although the `Pre`'s indices
/// were checked against the component's type once, when the `Pre` was made, and every instance of
/// that `Pre` has that type (the repeated check showed in a profile of a loaded edge's router
/// calls).
macro_rules! pretyped {
    ($world:ident, $pre:ident, $($export:ident),+) => {
        impl<T: 'static> $pre<T> {
            /// The exports of `instance`, an instance of this `Pre`'s component.
            pub(crate) fn exports(
                &self,
                store: &mut wasmtime::Store<T>,
                instance: &wasmtime::component::Instance,
            ) -> wasmtime::Result<$world> {
                Ok($world { $($export: super::export(store, instance, &self.indices.$export)?,)+ })
            }
        }
    };
}

/// The function behind `index` in `instance`.
fn export<T>(
    store: &mut wasmtime::Store<T>,
    instance: &wasmtime::component::Instance,
    index: &wasmtime::component::ComponentExportIndex,
) -> wasmtime::Result<wasmtime::component::Func> {
    instance
        .get_func(store, index)
        .ok_or_else(|| wasmtime::format_err!("an instance lacks an export its component was typed with"))
}

/// The `router` world, its exports called on a fiber (for plugins that import WASI, whose
/// blocking calls, such as sleeps and polls, then await instead of blocking a Tokio worker); the
/// `host` imports stay plain functions.
pub(crate) mod router_world {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "router",
        exports: { default: async },
        // Callers compare decisions (tests, the routing core's property checks).
        additional_derives: [PartialEq],
    });
    pretyped!(Router, RouterPre, configure, route);
}

/// The `router` world's exports called directly, for plugins that import only `host` (see
/// `entry`); its types are the fiber bindings' own.
pub(crate) mod router_world_direct {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "router",
        with: {
            "meridian:plugin/types": super::router_world::meridian::plugin::types,
            "meridian:plugin/host": super::router_world::meridian::plugin::host,
            "meridian:plugin/routing": super::router_world::meridian::plugin::routing,
        },
    });
    pretyped!(Router, RouterPre, configure, route);
}

/// The `privacy-filter` world on a fiber, sharing the router world's interfaces.
pub(crate) mod filter_world {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "privacy-filter",
        exports: { default: async },
        additional_derives: [PartialEq],
        with: {
            "meridian:plugin/types": super::router_world::meridian::plugin::types,
            "meridian:plugin/host": super::router_world::meridian::plugin::host,
        },
    });
    pretyped!(PrivacyFilter, PrivacyFilterPre, configure, inspect_request, inspect_response);
}

/// The `privacy-filter` world's exports called directly.
pub(crate) mod filter_world_direct {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "privacy-filter",
        with: {
            "meridian:plugin/types": super::router_world::meridian::plugin::types,
            "meridian:plugin/host": super::router_world::meridian::plugin::host,
            "meridian:plugin/filtering": super::filter_world::meridian::plugin::filtering,
        },
    });
    pretyped!(PrivacyFilter, PrivacyFilterPre, configure, inspect_request, inspect_response);
}

pub use filter_world::meridian::plugin::filtering::{
    Inspection, Redaction, RequestVerdict, ResponseVerdict, Segment, SegmentKind,
};
pub use router_world::meridian::plugin::routing::{CachePolicy, Decision, Outcome, Refusal};
pub use router_world::meridian::plugin::types::{
    Health, HourPrice, PriceModel, RequestSummary, Target, TargetKind, TokenPrice,
};

use router_world::meridian::plugin::host::{Host, Level};

/// What a filter's `configure` declared of the text it needs, as given (`None`: not declared).
#[derive(Debug, Default)]
pub(crate) struct DeclaredTriggers {
    /// Through `answer-triggers`.
    pub answer: Option<Vec<String>>,
    /// Through `request-triggers`.
    pub request: Option<Vec<String>>,
}

/// Who is running, for the log and metrics a guest writes, and the caps on what it may write.
pub(crate) struct GuestIdentity {
    pub name: Arc<str>,
    pub version: Arc<str>,
    pub metrics: Arc<PluginMetrics>,
    pub max_log_lines: u32,
    pub max_log_line_bytes: usize,
}

/// The data of one call's `Store`: WASI with nothing in it, the memory limiter, and the `host`
/// interface's bookkeeping. Dropped with the store after the call, or after the last call of a
/// response session.
pub(crate) struct CallState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: CallLimiter,
    guest: Arc<GuestIdentity>,
    /// The pipes behind the guest's stdout and stderr (the WASI context holds clones).
    pub stdout: CappedPipe,
    pub stderr: CappedPipe,
    log_lines: u32,
    log_dropped: u64,
    /// What the guest passed to `answer-triggers` and `request-triggers` in this store.
    declared: DeclaredTriggers,
    /// For a router's call: the targets that hold some of the request's prompt in their prefix
    /// caches, and how many tokens (what `prefix-match` answers).
    prefix_held: Vec<(String, u32)>,
}

impl CallState {
    pub fn new(guest: Arc<GuestIdentity>, memory_bytes: usize, stdout: CappedPipe, stderr: CappedPipe) -> CallState {
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        CallState {
            wasi,
            table: ResourceTable::new(),
            limiter: CallLimiter::new(memory_bytes),
            guest,
            stdout,
            stderr,
            log_lines: 0,
            log_dropped: 0,
            declared: DeclaredTriggers::default(),
            prefix_held: Vec::new(),
        }
    }

    /// Readies the state of a finished call for another fresh instance: no resources, a new
    /// memory account, no log lines, empty pipes. The WASI context is kept (building one seeds
    /// two random generators); it holds nothing a guest can leave behind, only the pipes, the
    /// clocks and the generators' state, which no guest can read back.
    pub fn reset(&mut self, memory_bytes: usize) {
        self.table = ResourceTable::new();
        self.limiter = CallLimiter::new(memory_bytes);
        self.stdout.clear();
        self.stderr.clear();
        self.declared = DeclaredTriggers::default();
        self.prefix_held.clear();
        self.begin_call();
    }

    /// What `prefix-match` answers during the next `route`: `held[i]` tokens for `targets[i]`.
    pub fn set_prefix_held(&mut self, targets: &[Target], held: &[u32]) {
        self.prefix_held.clear();
        self.prefix_held.extend(targets.iter().zip(held).filter(|(_, &n)| n > 0).map(|(t, &n)| (t.name.clone(), n)));
    }

    /// What the guest declared through `answer-triggers` and `request-triggers` in this store
    /// (the last call of each wins).
    pub fn take_declared_triggers(&mut self) -> DeclaredTriggers {
        std::mem::take(&mut self.declared)
    }

    pub fn take_log_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.log_dropped)
    }

    /// Whether the guest holds no host resources (WASI streams, pollables): what a snapshot
    /// needs, since those live in the store, not in the instance's memory.
    pub fn holds_no_resources(&self) -> bool {
        self.table.is_empty()
    }

    pub fn begin_call(&mut self) {
        self.log_lines = 0;
        self.log_dropped = 0;
    }
}

/// Adds WASI p2 and the `host` interface to a linker. Both worlds import exactly these, so one
/// linker serves routers and filters.
///
/// WASI is the async variant: its sync variant runs blocking calls (`blocking-write-and-flush`,
/// `pollable.block`…) through `Handle::block_on`, which panics on a Tokio worker thread.
pub(crate) fn add_to_linker(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    use filter_world::meridian::plugin::filtering;
    use router_world::meridian::plugin::{host, routing, types};
    // The type-only interfaces are imported too (a world's `use` imports them), as empty
    // instances.
    host::add_to_linker::<CallState, HasSelf<CallState>>(linker, |state| state)?;
    types::add_to_linker::<CallState, HasSelf<CallState>>(linker, |state| state)?;
    routing::add_to_linker::<CallState, HasSelf<CallState>>(linker, |state| state)?;
    filtering::add_to_linker::<CallState, HasSelf<CallState>>(linker, |state| state)
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl router_world::meridian::plugin::types::Host for CallState {}
impl router_world::meridian::plugin::routing::Host for CallState {
    fn prefix_match(&mut self, target: String) -> u32 {
        self.prefix_held.iter().find(|(name, _)| *name == target).map_or(0, |&(_, n)| n)
    }
}
impl filter_world::meridian::plugin::filtering::Host for CallState {}

impl Host for CallState {
    fn log(&mut self, level: Level, message: String) {
        if self.log_lines >= self.guest.max_log_lines {
            // Counted, not written: a plugin must not be able to flood the node's log.
            self.log_dropped += 1;
            return;
        }
        self.log_lines += 1;
        let message = truncate(&message, self.guest.max_log_line_bytes);
        let (plugin, version) = (&*self.guest.name, &*self.guest.version);
        match level {
            Level::Trace => tracing::trace!(target: "meridian::plugin::guest", plugin, version, "{message}"),
            Level::Debug => tracing::debug!(target: "meridian::plugin::guest", plugin, version, "{message}"),
            Level::Info => tracing::info!(target: "meridian::plugin::guest", plugin, version, "{message}"),
            Level::Warn => tracing::warn!(target: "meridian::plugin::guest", plugin, version, "{message}"),
            Level::Error => tracing::error!(target: "meridian::plugin::guest", plugin, version, "{message}"),
        }
    }

    fn counter_add(&mut self, name: String, delta: u64) {
        self.guest.metrics.guest_counter_add(&self.guest.name, &name, delta);
    }

    fn histogram_record(&mut self, name: String, value: f64) {
        self.guest.metrics.guest_histogram_record(&self.guest.name, &name, value);
    }

    fn now_ms(&mut self) -> u64 {
        // A clock before 1970 is a broken node, not the plugin's problem: it reads 0.
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    // Both kept as given; the runtime checks them when the plugin loads (and ignores calls from
    // the per-instance `configure` of a plugin without a snapshot).
    fn answer_triggers(&mut self, triggers: Vec<String>) {
        self.declared.answer = Some(triggers);
    }

    fn request_triggers(&mut self, triggers: Vec<String>) {
        self.declared.request = Some(triggers);
    }
}

/// `message` cut to at most `max` bytes on a character boundary, marked when cut.
pub(crate) fn truncate(message: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if message.len() <= max {
        return message.into();
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &message[..end], message.len() - end).into()
}

/// `StoreLimits` that also remember whether the guest hit its memory cap, so that the failure is
/// reported as `MemoryLimit` rather than as whatever trap the guest turned it into, and how much
/// linear memory the call's instance held at most (for `meridian plugin run`).
pub(crate) struct CallLimiter {
    limits: StoreLimits,
    pub memory_hit: bool,
    /// Linear memory of the memories made under this limiter, in bytes: those of the call's own
    /// instance, since a kept store gets a new limiter per call.
    memory_bytes: usize,
    /// The most `memory_bytes` has been.
    pub peak_memory_bytes: usize,
}

impl CallLimiter {
    fn new(memory_bytes: usize) -> CallLimiter {
        // `trap_on_grow_failure`: without it a refused `memory.grow` returns -1 and a Rust guest
        // aborts, which looks like any other panic.
        let limits = StoreLimitsBuilder::new().memory_size(memory_bytes).trap_on_grow_failure(true).build();
        CallLimiter { limits, memory_hit: false, memory_bytes: 0, peak_memory_bytes: 0 }
    }
}

impl ResourceLimiter for CallLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum);
        if matches!(allowed, Ok(true)) {
            // Also called when a memory is created (from 0), so this sums every memory's size.
            self.memory_bytes = self.memory_bytes.saturating_add(desired.saturating_sub(current));
            self.peak_memory_bytes = self.peak_memory_bytes.max(self.memory_bytes);
        } else {
            self.memory_hit = true;
        }
        allowed
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory_hit = true;
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn truncate_keeps_char_boundaries() {
        assert_eq!(truncate("short", 10), "short");
        let cut = truncate("ééé", 3); // 6 bytes; byte 3 is inside the second é
        assert!(cut.starts_with("é…"), "{cut}");
        assert!(cut.ends_with("(4 bytes cut)"), "{cut}");
    }
}
