//! The engine: loads the configured models and serves them through [`Backend`].
//!
//! Each chat model has one dedicated OS thread that owns its session (an ONNX Runtime run blocks;
//! it never runs on a Tokio worker). Requests are rendered, tokenised and checked on the caller's
//! thread, then admitted to a bounded queue (`try_send`; full → [`ErrorCode::Overloaded`]).
//!
//! Continuous batching, every step of the model thread:
//! 1. sequences that finished or whose receiver was dropped leave the batch;
//! 2. waiting requests are taken from the queue up to `max_batch` and prefilled: one that begins
//!    like a cached prompt continues from that cache alone; the others run together, padded,
//!    in runs of similar length ([`prefill_runs`]); each samples its first token;
//! 3. the batch is rebuilt if its composition changed ([`Batch::rebuild`]);
//! 4. one batched decode step across all active sequences; each gets its token, text deltas go out
//!    on its channel.
//!
//! Embeddings run on Tokio's blocking pool, in runs of bounded size (`embed_max_batch` texts,
//! `embed_max_batch_tokens` tokens), each run's vectors passed on as soon as they are ready.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::api::{
    Backend, ChatRequest, EmbedParts, EmbedRequest, EngineError, ErrorCode, Event, FinishReason, Health, Usage,
};
use crate::config::{EngineConfig, ModelKind, SchedulerConfig};
use crate::detok::{Detokenizer, StopMatcher};
use crate::embed::{BatchLimits, EmbeddingModel};
use crate::kv::{prefill_runs, Batch, Logits, Prefilled, Prompt, Reuse};
use crate::model::{infer_kind, model_err, ChatModel, Prompter, RenderedPrompt};
use crate::prefix::{PrefixCache, PrefixStats};
use crate::sampling::{Sampler, SamplingParams};
use crate::telemetry::{now_unix_nanos, Exporter, Span, SpanKind, TraceContext};

pub use crate::model::LoadError;

/// How far back [`Health::tokens_per_second`] looks.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// Counters shared by a model thread and the engine.
#[derive(Default)]
struct Shared {
    queue_depth: AtomicU32,
    active: AtomicU32,
    prefix: Arc<PrefixStats>,
    /// (when, tokens generated) per step, the last [`RATE_WINDOW`].
    rate: Mutex<VecDeque<(Instant, u32)>>,
}

impl Shared {
    fn record(&self, tokens: u32) {
        let now = Instant::now();
        let mut r = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        r.push_back((now, tokens));
        while r.front().is_some_and(|&(t, _)| now.duration_since(t) > RATE_WINDOW) {
            r.pop_front();
        }
    }

    fn tokens_per_second(&self) -> f64 {
        let now = Instant::now();
        let r = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        let n: u32 = r.iter().filter(|&&(t, _)| now.duration_since(t) <= RATE_WINDOW).map(|&(_, n)| n).sum();
        n as f64 / RATE_WINDOW.as_secs_f64()
    }
}

/// An admitted request, waiting for the model thread.
struct Job {
    prompt_ids: Vec<u32>,
    /// The conversation's beginnings in the prompt (hash, tokens), for the prefix cache to report.
    marks: Vec<(u64, u32)>,
    params: SamplingParams,
    max_tokens: u32,
    stop: Vec<String>,
    tx: mpsc::Sender<Event>,
    trace: Option<JobTrace>,
}

/// A traced request's span and where its spans go: the request (a server span under the
/// caller's), and its queue, prefill and decode under it.
struct JobTrace {
    exporter: Exporter,
    request: TraceContext,
    parent: Option<[u8; 8]>,
    model: String,
    /// When the request arrived (and was queued), in ns since the Unix epoch.
    start_ns: u64,
}

impl JobTrace {
    /// Records phase `name` of the request, from `start_ns` to now.
    fn phase(&self, name: &'static str, start_ns: u64, attribute: (&'static str, String)) {
        let span =
            Span::ended_now(self.request.child(), Some(self.request.span_id), name, SpanKind::Internal, start_ns);
        self.exporter.export(span.with(attribute.0, attribute.1));
    }

    /// Records the request's own span, ended now; `error` when it failed.
    fn finish(&self, outcome: &str, error: Option<String>) {
        let mut span = Span::ended_now(
            self.request,
            self.parent,
            format!("engine chat {}", self.model),
            SpanKind::Server,
            self.start_ns,
        )
        .with("meridian.model", self.model.clone())
        .with("meridian.outcome", outcome);
        span.error = error;
        self.exporter.export(span);
    }
}

struct ChatHandle {
    queue: SyncSender<Job>,
    prompter: Prompter,
    context_length: usize,
    shared: Arc<Shared>,
}

/// The engine: chat models on their threads, embedding models, and the [`Backend`] on top.
pub struct Engine {
    chat: BTreeMap<String, ChatHandle>,
    embedding: BTreeMap<String, Arc<EmbeddingModel>>,
    provider: String,
    scheduler: SchedulerConfig,
    /// Where chat requests' spans go, once [`Engine::trace_to`] set it.
    tracer: OnceLock<Exporter>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("chat", &self.chat.keys().collect::<Vec<_>>())
            .field("embedding", &self.embedding.keys().collect::<Vec<_>>())
            .field("provider", &self.provider)
            .finish()
    }
}

impl Engine {
    /// Loads every configured model (paths already resolved) and starts one thread per chat model.
    pub fn start(config: &EngineConfig) -> Result<Arc<Engine>, LoadError> {
        config.validate().map_err(LoadError::Config)?;
        let mut chat = BTreeMap::new();
        let mut embedding = BTreeMap::new();
        let mut provider = None;
        for m in &config.models {
            if !m.path.is_dir() {
                return Err(model_err(
                    &m.name,
                    &m.path,
                    "the directory does not exist (run scripts/setup-engine to fetch the default models)",
                ));
            }
            let kind = match m.kind {
                Some(k) => k,
                None => infer_kind(&m.path).map_err(|e| model_err(&m.name, &m.path, e))?,
            };
            match kind {
                ModelKind::Chat => {
                    let model = ChatModel::load(&m.name, &m.path, &config.runtime)?;
                    provider.get_or_insert(model.provider);
                    let handle = spawn_model_thread(model, &config.scheduler)?;
                    chat.insert(m.name.clone(), handle);
                }
                ModelKind::Embedding => {
                    let model = EmbeddingModel::load(&m.name, &m.path, &config.runtime)?;
                    provider.get_or_insert(model.provider);
                    embedding.insert(m.name.clone(), Arc::new(model));
                }
            }
        }
        let provider = provider.map_or(config.runtime.provider.as_str(), |p| p.as_str()).to_string();
        tracing::info!(%provider, chat = ?chat.keys().collect::<Vec<_>>(), embedding = ?embedding.keys().collect::<Vec<_>>(), "engine started");
        Ok(Arc::new(Engine { chat, embedding, provider, scheduler: config.scheduler.clone(), tracer: OnceLock::new() }))
    }

    /// Sends chat requests' spans (the request, its queue, prefill and decode) to `exporter` from
    /// now on; a second exporter is ignored.
    pub fn trace_to(&self, exporter: Exporter) {
        let _ = self.tracer.set(exporter);
    }

    /// The execution provider the models run on.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// Rendered-prompt token ids for `request` on a chat model (what generation starts from).
    pub fn prompt_ids(&self, request: &ChatRequest) -> Result<Vec<u32>, EngineError> {
        let handle = self.chat_handle(&request.model)?;
        handle.prompter.prompt_ids(&request.messages)
    }

    fn chat_handle(&self, model: &str) -> Result<&ChatHandle, EngineError> {
        self.chat.get(model).ok_or_else(|| {
            let why = if self.embedding.contains_key(model) { " (it is an embedding model)" } else { "" };
            EngineError::new(ErrorCode::UnknownModel, format!("no chat model {model:?} here{why}"))
        })
    }
}

fn spawn_model_thread(model: ChatModel, cfg: &SchedulerConfig) -> Result<ChatHandle, LoadError> {
    let (queue, rx) = sync_channel(cfg.queue_capacity);
    let shared = Arc::new(Shared::default());
    let handle = ChatHandle {
        queue,
        prompter: model.prompter(),
        context_length: model.spec.context_length,
        shared: shared.clone(),
    };
    let (name, dir) = (model.name.clone(), model.dir.clone());
    let prefix = PrefixCache::new(model.layout(), cfg.prefix_cache_bytes, Arc::clone(&shared.prefix));
    let max_batch = cfg.max_batch;
    std::thread::Builder::new()
        .name(format!("model-{name}"))
        .spawn(move || ModelLoop::new(model, rx, shared, max_batch, prefix).run())
        .map_err(|e| model_err(&name, &dir, format!("cannot start its thread: {e}")))?;
    Ok(handle)
}

impl Backend for Engine {
    fn chat(&self, request: ChatRequest) -> Result<mpsc::Receiver<Event>, EngineError> {
        let handle = self.chat_handle(&request.model)?;
        let bad = |m: String| EngineError::new(ErrorCode::BadRequest, m);
        if request.messages.is_empty() {
            return Err(bad("messages is empty".into()));
        }
        let params = SamplingParams {
            temperature: request.temperature,
            top_p: request.top_p,
            top_k: request.top_k,
            seed: request.seed,
        };
        params.validate().map_err(bad)?;
        let max_tokens = request.max_tokens.unwrap_or(self.scheduler.default_max_tokens);
        if max_tokens == 0 {
            return Err(bad("max_tokens must be at least 1".into()));
        }
        let RenderedPrompt { ids: prompt_ids, marks } = handle.prompter.prompt(&request.messages)?;
        if prompt_ids.is_empty() {
            return Err(bad("the prompt renders to no tokens".into()));
        }
        if prompt_ids.len() >= handle.context_length {
            return Err(EngineError::new(
                ErrorCode::ContextLength,
                format!(
                    "the prompt has {} tokens; model {} holds {} (prompt and answer)",
                    prompt_ids.len(),
                    request.model,
                    handle.context_length
                ),
            ));
        }
        // Room for every event a generation can send (a delta per token, then the end), so the
        // model thread never waits on a slow reader; the channel allocates lazily.
        let (tx, rx) = mpsc::channel(max_tokens as usize + 2);
        let trace = self.tracer.get().map(|exporter| {
            let parent = request.traceparent.as_deref().and_then(TraceContext::parse);
            JobTrace {
                exporter: exporter.clone(),
                request: parent.map_or_else(TraceContext::new_root, |p| p.child()),
                parent: parent.map(|p| p.span_id),
                model: request.model.clone(),
                start_ns: now_unix_nanos(),
            }
        });
        let job = Job { prompt_ids, marks, params, max_tokens, stop: request.stop, tx, trace };
        handle.shared.queue_depth.fetch_add(1, Ordering::SeqCst);
        match handle.queue.try_send(job) {
            Ok(()) => Ok(rx),
            Err(e) => {
                handle.shared.queue_depth.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => EngineError::new(
                        ErrorCode::Overloaded,
                        format!("model {} has {} requests waiting", request.model, self.scheduler.queue_capacity),
                    ),
                    TrySendError::Disconnected(_) => {
                        EngineError::new(ErrorCode::Internal, format!("model {} has stopped", request.model))
                    }
                })
            }
        }
    }

    fn embed(&self, request: EmbedRequest) -> Result<EmbedParts, EngineError> {
        let model = self.embedding.get(&request.model).cloned().ok_or_else(|| {
            let why = if self.chat.contains_key(&request.model) { " (it is a chat model)" } else { "" };
            EngineError::new(ErrorCode::UnknownModel, format!("no embedding model {:?} here{why}", request.model))
        })?;
        let limits = BatchLimits {
            max_batch: self.scheduler.embed_max_batch,
            max_tokens: self.scheduler.embed_max_batch_tokens,
        };
        // One part in the channel: the next run waits until the last one's vectors were taken,
        // so a slow reader holds at most two runs' vectors here, and one that goes away stops
        // the runs.
        let (tx, rx) = mpsc::channel(1);
        tokio::task::spawn_blocking(move || {
            model.embed_parts(&request.input, limits, |part| tx.blocking_send(part).is_ok())
        });
        Ok(rx)
    }

    fn health(&self) -> Health {
        let sum = |f: fn(&Shared) -> u32| self.chat.values().map(|h| f(&h.shared)).sum::<u32>();
        let prefix = |f: fn(&PrefixStats) -> &AtomicU64| {
            self.chat.values().map(|h| f(&h.shared.prefix).load(Ordering::Relaxed)).sum::<u64>()
        };
        Health {
            provider: self.provider.clone(),
            chat_models: self.chat.keys().cloned().collect(),
            embedding_models: self.embedding.keys().cloned().collect(),
            queue_depth: sum(|s| s.queue_depth.load(Ordering::SeqCst)),
            queue_capacity: self.scheduler.queue_capacity as u32,
            active_sequences: sum(|s| s.active.load(Ordering::SeqCst)),
            max_batch: self.scheduler.max_batch as u32,
            tokens_per_second: self.chat.values().map(|h| h.shared.tokens_per_second()).sum(),
            prefix_cache_hits: prefix(|p| &p.hits),
            prefix_cache_tokens_reused: prefix(|p| &p.tokens_reused),
            prefix_cache_bytes: prefix(|p| &p.bytes),
            prefixes: self
                .chat
                .iter()
                .map(|(name, h)| (name.clone(), h.shared.prefix.held()))
                .filter(|(_, held)| !held.is_empty())
                .collect(),
        }
    }
}

/// One sequence being generated.
struct Seq {
    tx: mpsc::Sender<Event>,
    /// The request's trace, and when its decode began (ns since the Unix epoch).
    trace: Option<(JobTrace, u64)>,
    sampler: Sampler,
    detok: Detokenizer,
    stop: StopMatcher,
    prompt_tokens: usize,
    generated: usize,
    max_tokens: usize,
    /// The token to feed at the next step.
    next: u32,
    done: bool,
}

impl Seq {
    fn send(&self, event: Event) {
        // Never blocks: the channel has room for every event (see `chat`). A dropped receiver is
        // noticed at the next step.
        let _ = self.tx.try_send(event);
    }

    /// Flushes held text and sends the end.
    fn finish(&mut self, mut reason: FinishReason) {
        let mut out = String::new();
        let tail = self.detok.finish();
        let m = self.stop.push(&tail);
        out.push_str(&m.emit);
        if m.stopped {
            reason = FinishReason::Stop;
        } else {
            out.push_str(&self.stop.finish());
        }
        self.end(out, reason);
    }

    fn end(&mut self, text: String, reason: FinishReason) {
        if !text.is_empty() {
            self.send(Event::Delta(text));
        }
        let usage = Usage { prompt_tokens: self.prompt_tokens as u32, completion_tokens: self.generated as u32 };
        self.send(Event::Finished { finish_reason: reason, usage });
        self.done = true;
        if let Some((trace, decode_start)) = self.trace.take() {
            trace.phase("decode", decode_start, ("meridian.completion_tokens", self.generated.to_string()));
            trace.finish(&format!("{reason:?}").to_lowercase(), None);
        }
    }

    /// Takes the sampled token: streams its text, decides whether generation ends.
    fn accept(&mut self, logits: &[f32], eos: &[u32], context_length: usize) {
        let token = self.sampler.sample(logits);
        self.generated += 1;
        self.next = token;
        if eos.contains(&token) {
            // The end-of-sequence token counts as generated; its text is not part of the answer.
            return self.finish(FinishReason::Stop);
        }
        let text = self.detok.push(token);
        let m = self.stop.push(&text);
        if m.stopped {
            return self.end(m.emit, FinishReason::Stop);
        }
        if !m.emit.is_empty() {
            self.send(Event::Delta(m.emit));
        }
        if self.generated >= self.max_tokens || self.prompt_tokens + self.generated >= context_length {
            self.finish(FinishReason::Length);
        }
    }
}

/// Ends a job whose prefill failed.
fn fail(job: Job, error: String) {
    if let Some(t) = &job.trace {
        t.finish("failed", Some(error.clone()));
    }
    let _ = job.tx.try_send(Event::Failed(EngineError::new(ErrorCode::Internal, error)));
}

struct ModelLoop {
    model: ChatModel,
    rx: Receiver<Job>,
    shared: Arc<Shared>,
    max_batch: usize,
    batch: Batch,
    /// Parallel to the batch's rows.
    seqs: Vec<Seq>,
    /// Recent prompts' caches, for prompts that begin the same way.
    prefix: PrefixCache,
}

impl ModelLoop {
    fn new(
        model: ChatModel,
        rx: Receiver<Job>,
        shared: Arc<Shared>,
        max_batch: usize,
        prefix: PrefixCache,
    ) -> ModelLoop {
        let batch = model.batch();
        ModelLoop { model, rx, shared, max_batch, batch, seqs: Vec::new(), prefix }
    }

    fn run(mut self) {
        let name = self.model.name.clone();
        let _span = tracing::info_span!("model", %name).entered();
        loop {
            let mut jobs = Vec::new();
            if self.seqs.is_empty() {
                self.shared.active.store(0, Ordering::SeqCst);
                match self.rx.recv() {
                    Ok(job) => jobs.push(job),
                    // The engine is gone and nothing is running.
                    Err(_) => return,
                }
            }
            let live = self.seqs.iter().filter(|s| !s.done && !s.tx.is_closed()).count();
            while live + jobs.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            // Taken jobs count as active from here (their prefill may already stream a token).
            self.shared.active.store((live + jobs.len()) as u32, Ordering::SeqCst);
            self.shared.queue_depth.fetch_sub(jobs.len() as u32, Ordering::SeqCst);
            if let Err(e) = self.iteration(jobs) {
                tracing::error!(error = %e, "decode step failed; failing the batch");
                let err = EngineError::new(ErrorCode::Internal, format!("model {name}: {e}"));
                for s in self.seqs.drain(..) {
                    let _ = s.tx.try_send(Event::Failed(err.clone()));
                }
                self.batch = self.model.batch();
            }
        }
    }

    /// Prefills the jobs of `run` in one run of the model (a job with a cached beginning alone,
    /// from it), samples each one's first token, and adds those that go on to `added`.
    fn prefill(&mut self, run: Vec<(Job, Option<Reuse>)>, added: &mut Vec<(Seq, Prefilled)>) {
        let prefill_start = now_unix_nanos();
        let (run, reuses): (Vec<Job>, Vec<Option<Reuse>>) = run.into_iter().unzip();
        let prompts = run.iter().zip(reuses).map(|(job, reuse)| Prompt { ids: &job.prompt_ids, reuse }).collect();
        let prefilled = Batch::prefill_together(&mut self.model, prompts);
        let (prefilled, logits) = match prefilled {
            Ok(p) => p,
            Err(e) => {
                run.into_iter().for_each(|job| fail(job, format!("prefill: {e}")));
                return;
            }
        };
        for (row, (job, prefilled)) in run.into_iter().zip(prefilled).enumerate() {
            if let Err(e) = self.prefix.insert(&job.prompt_ids, prefilled.kv(), &job.marks) {
                // The answer goes on; only later prompts lose the reuse.
                tracing::warn!(error = %e, "the prompt's cache could not be kept for reuse");
            }
            let trace = job.trace.map(|t| {
                t.phase("prefill", prefill_start, ("meridian.prompt_tokens", job.prompt_ids.len().to_string()));
                (t, now_unix_nanos())
            });
            let mut seq = Seq {
                tx: job.tx,
                trace,
                sampler: Sampler::new(job.params),
                detok: Detokenizer::new(self.model.token_bytes.clone()),
                stop: StopMatcher::new(&job.stop),
                prompt_tokens: job.prompt_ids.len(),
                generated: 0,
                max_tokens: job.max_tokens as usize,
                next: 0,
                done: false,
            };
            seq.accept(logits.row(row), &self.model.spec.eos_token_ids, self.model.spec.context_length);
            self.shared.record(1);
            if !seq.done {
                added.push((seq, prefilled));
            }
        }
    }

    /// Admit `jobs`, update the batch, run one decode step.
    fn iteration(&mut self, jobs: Vec<Job>) -> ort::Result<()> {
        let eos = self.model.spec.eos_token_ids.clone();
        let ctx = self.model.spec.context_length;
        // A prompt that begins like a cached one continues from its cache alone (see
        // `Batch::prefill_together`); the others are prefilled together in runs of similar length.
        // A prompt that begins like another one waiting here waits a round, so that it finds that
        // one's cache instead of computing the same beginning beside it.
        let mut pending: Vec<Job> = Vec::new();
        for job in jobs {
            if job.tx.is_closed() {
                continue;
            }
            if let Some(t) = &job.trace {
                t.phase("queue", t.start_ns, ("meridian.prompt_tokens", job.prompt_ids.len().to_string()));
            }
            pending.push(job);
        }
        let mut added: Vec<(Seq, Prefilled)> = Vec::new();
        while !pending.is_empty() {
            let (mut fresh, mut later): (Vec<Job>, Vec<Job>) = (Vec::new(), Vec::new());
            let mut runs: Vec<Vec<(Job, Option<Reuse>)>> = Vec::new();
            for job in pending {
                match self.prefix.lookup(&job.prompt_ids) {
                    Some(reuse) => runs.push(vec![(job, Some(reuse))]),
                    None if fresh.iter().any(|f| self.prefix.would_share(&f.prompt_ids, &job.prompt_ids)) => {
                        later.push(job)
                    }
                    None => fresh.push(job),
                }
            }
            let lens: Vec<usize> = fresh.iter().map(|j| j.prompt_ids.len()).collect();
            let mut fresh: Vec<Option<Job>> = fresh.into_iter().map(Some).collect();
            for run in prefill_runs(&lens) {
                runs.push(run.iter().map(|&i| (fresh[i].take().expect("each job in one run"), None)).collect());
            }
            for run in runs {
                self.prefill(run, &mut added);
            }
            pending = later;
        }
        // Leave: finished and cancelled sequences. Join: the new ones.
        let keep: Vec<usize> =
            (0..self.seqs.len()).filter(|&i| !self.seqs[i].done && !self.seqs[i].tx.is_closed()).collect();
        let (new_seqs, prefilled): (Vec<Seq>, Vec<Prefilled>) = added.into_iter().unzip();
        let mut old: Vec<Option<Seq>> = self.seqs.drain(..).map(Some).collect();
        self.seqs = keep.iter().map(|&i| old[i].take().expect("kept once")).chain(new_seqs).collect();
        // After `seqs` is updated, so that a failure here reaches the new sequences too.
        self.batch.rebuild(&keep, prefilled)?;
        self.shared.active.store(self.seqs.len() as u32, Ordering::SeqCst);
        if self.seqs.is_empty() {
            return Ok(());
        }
        let tokens: Vec<u32> = self.seqs.iter().map(|s| s.next).collect();
        let logits: Logits = self.batch.step(&mut self.model, &tokens)?;
        for (i, seq) in self.seqs.iter_mut().enumerate() {
            seq.accept(logits.row(i), &eos, ctx);
        }
        self.shared.record(tokens.len() as u32);
        Ok(())
    }
}
