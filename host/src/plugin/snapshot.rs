//! Pre-initialisation: a plugin's component as it stands after `configure`, so that every fresh
//! instance starts configured.
//!
//! The contract has the host call `configure` on each fresh instance before its hook, and a
//! fresh instance per request is what keeps requests and tenants apart. Running `configure` per
//! call cost the shipped plugins several microseconds (parsing their JSON configuration and
//! building their tables) on every request. Instead, at load, the runtime instruments the
//! component (wasmtime's wizer: exports that read every core instance's globals and memories),
//! instantiates it, calls `configure` once with the plugin's configuration, and writes the
//! resulting state back into the component as its initial state. Instances of that snapshot are
//! still fresh — each one starts from the same bytes, and nothing a call does survives it — but
//! they start where `configure` left off.
//!
//! Not every component can be snapshotted: wizer refuses modules that mutate tables, and state
//! that lives outside linear memory (resource handles the guest took from WASI during
//! `configure`) cannot be carried over. A component that cannot be is run as before, with
//! `configure` on each fresh instance; see [`Snapshot`].

use wasmtime::component::{Component, Instance, Lift, Linker, WasmList};
use wasmtime::Store;
use wasmtime_wizer::{ComponentContext, ComponentInstanceState, Wizer};

use super::bindings::CallState;

/// What pre-initialising a plugin gave.
pub(crate) enum Snapshot {
    /// The component, configured, as bytes to compile.
    Taken(Vec<u8>),
    /// It cannot be snapshotted (the reason, for the log); instances run `configure` per call.
    Unsupported(String),
}

/// Why a snapshot's `configure` did not succeed: the plugin's own failure, as a trial call's.
pub(crate) enum ConfigureFailure {
    /// The wasm side failed (a trap, the deadline, an instantiation error).
    Wasm(wasmtime::Error),
    /// `configure` returned an error.
    Rejected(String),
}

/// A component instrumented for a snapshot: the bytes to compile and instantiate, and what
/// [`take`] needs to read its state back.
pub(crate) struct Instrumented<'a> {
    wizer: Wizer,
    cx: ComponentContext<'a>,
    /// The instrumented component.
    pub wasm: Vec<u8>,
}

/// Instruments `wasm` for a snapshot, or says why it cannot be.
pub(crate) fn instrument(wasm: &[u8]) -> Result<Instrumented<'_>, String> {
    let mut wizer = Wizer::new();
    // The contract's `configure` stays exported: the typed bindings look it up.
    wizer.keep_init_func(true);
    let (cx, wasm) = wizer.instrument_component(wasm).map_err(|error| format!("cannot instrument: {error:#}"))?;
    Ok(Instrumented { wizer, cx, wasm })
}

/// Instantiates the compiled instrumented `component` in `store` and runs `configure(config)`
/// on it: the plugin's own code, to run under its deadline. A failing `configure` is the plugin's
/// failure ([`ConfigureFailure`]), as it would be on any instance.
pub(crate) async fn configure(
    component: &Component,
    config: &str,
    linker: &Linker<CallState>,
    store: &mut Store<CallState>,
) -> Result<Instance, ConfigureFailure> {
    let instance = linker.instantiate_async(&mut *store, component).await.map_err(ConfigureFailure::Wasm)?;
    let configure = instance
        .get_typed_func::<(&str,), (Result<(), String>,)>(&mut *store, "configure")
        .map_err(ConfigureFailure::Wasm)?;
    let (configured,) = configure.call_async(&mut *store, (config,)).await.map_err(ConfigureFailure::Wasm)?;
    configured.map_err(ConfigureFailure::Rejected)?;
    Ok(instance)
}

/// Snapshots the configured `instance` ([`configure`]): wizer's accessors copy out its globals
/// and memories, host work that the caller gives its own time (the plugin's deadline is for the
/// plugin's code). State that cannot be carried over is [`Snapshot::Unsupported`].
pub(crate) async fn take(
    instrumented: &Instrumented<'_>,
    instance: Instance,
    store: &mut Store<CallState>,
) -> Snapshot {
    if !store.data().holds_no_resources() {
        // A handle taken from WASI lives in this store's resource table, not in the snapshot:
        // an instance of it would hold a dangling handle.
        return Snapshot::Unsupported("`configure` kept WASI resources (stdio, clock or random streams)".into());
    }
    let mut state = State { store, instance, failed: None };
    let taken = instrumented.wizer.snapshot_component(&instrumented.cx, &mut state).await;
    match (taken, state.failed) {
        (_, Some(error)) => Snapshot::Unsupported(format!("cannot read the configured state: {error:#}")),
        (Err(error), None) => Snapshot::Unsupported(format!("cannot snapshot: {error:#}")),
        (Ok(bytes), None) => Snapshot::Taken(bytes),
    }
}

/// The instrumented instance, for wizer to read its state through.
struct State<'a> {
    store: &'a mut Store<CallState>,
    instance: Instance,
    /// The first accessor call that failed: wizer's interface has no room for errors, so the
    /// accessor answers a default and the snapshot is thrown away.
    failed: Option<wasmtime::Error>,
}

impl State<'_> {
    /// Calls wizer's accessor `func` of the exported instance `instance`, or answers `R`'s
    /// default once one has failed.
    async fn call<R: Lift + Send + Sync + 'static, O: Default>(
        &mut self,
        instance: &str,
        func: &str,
        take: impl FnOnce(&mut Store<CallState>, R) -> O,
    ) -> O {
        if self.failed.is_some() {
            return O::default();
        }
        match self.try_call(instance, func).await {
            Ok(value) => take(self.store, value),
            Err(error) => {
                self.failed = Some(error);
                O::default()
            }
        }
    }

    async fn try_call<R: Lift + Send + Sync + 'static>(&mut self, instance: &str, func: &str) -> wasmtime::Result<R> {
        let missing = |what: &str| wasmtime::format_err!("wizer's accessor {what} is missing");
        let (_, exported) =
            self.instance.get_export(&mut *self.store, None, instance).ok_or_else(|| missing(instance))?;
        let (_, index) =
            self.instance.get_export(&mut *self.store, Some(&exported), func).ok_or_else(|| missing(func))?;
        let accessor = self.instance.get_typed_func::<(), (R,)>(&mut *self.store, index)?;
        Ok(accessor.call_async(&mut *self.store, ()).await?.0)
    }
}

impl ComponentInstanceState for State<'_> {
    async fn call_func_ret_list_u8(&mut self, instance: &str, func: &str, contents: impl FnOnce(&[u8]) + Send) {
        self.call(instance, func, |store, list: WasmList<u8>| contents(list.as_le_slice(&*store))).await
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func, |_, value| value).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func, |_, value| value).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call(instance, func, |_, value: f32| value.to_bits()).await
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call(instance, func, |_, value: f64| value.to_bits()).await
    }
}
