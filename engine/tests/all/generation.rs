//! Generation through the engine on the real int4 model: batching with padding gives exactly what
//! each request gives alone, stop strings, max_tokens, seeded sampling, cancellation, overload and
//! admission errors.

use std::time::{Duration, Instant};

use crate::common::*;
use meridian_engine::api::{Backend, ChatRequest, ErrorCode, Event, FinishReason, Message};
use meridian_engine::config::{RuntimeConfig, SchedulerConfig};
use meridian_engine::kv::{Batch, Prefilled, Prompt, Reuse, SPARE_COLUMNS};
use meridian_engine::model::ChatModel;
use meridian_engine::sampling::argmax;

const PROMPTS: [&str; 4] = [
    "Hi!",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea, the wind and the old lighthouse keeper who lives alone on the rocky island.",
    "What is 2 + 2?",
];

/// On fp32: its kernels give a row the same logits whatever the batch (measured: 0 difference, padded
/// or not). The int4 file's MatMulNBits (accuracy_level 4) takes a different kernel path for one row
/// than for several, so there batched logits differ from batch-1 ones by up to ~1.0 even for
/// identical unpadded rows, and greedy answers can part at near-ties: a property of the kernel,
/// not of the padding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_equal_each_alone() {
    let engine = engine(&[("smol", FP32)], SchedulerConfig::default());
    let mut alone = Vec::new();
    for p in PROMPTS {
        alone.push(chat(&engine, request("smol", p, 24)).await.unwrap());
    }
    // All four admitted back to back: they prefill together and decode together, padded to
    // the longest prompt.
    let rxs: Vec<_> = PROMPTS.iter().map(|p| engine.chat(request("smol", p, 24)).unwrap()).collect();
    let together = futures_util::future::join_all(rxs.into_iter().map(collect)).await;
    for ((p, a), t) in PROMPTS.iter().zip(&alone).zip(&together) {
        assert_eq!(a, t, "prompt {p:?}: batched answer differs from the answer alone");
        assert!(!a.text.is_empty());
    }
    // Joining a batch mid-way (different cache lengths, then trimming when the short one leaves).
    // The second is admitted once the first is decoding (its first token is out), not after a
    // guessed delay.
    let mut first = engine.chat(request("smol", PROMPTS[2], 24)).unwrap();
    let head = match first.recv().await {
        Some(Event::Delta(d)) => d,
        other => panic!("expected the first token, got {other:?}"),
    };
    let second = engine.chat(request("smol", PROMPTS[0], 24)).unwrap();
    let (rest, s) = tokio::join!(collect(first), collect(second));
    let f = Answer { text: head + &rest.text, deltas: rest.deltas + 1, ..rest };
    assert_eq!(f, alone[2]);
    assert_eq!(s, alone[0]);
}

/// A model that takes a shared KV buffer decodes the same whether each step writes its column
/// into the buffer in place or gets the whole cache back anew: rows of different lengths, and more
/// steps than the buffer's spare columns, so that it is copied into a larger one on the way. Both
/// of the converter's files: the int4 one is what the engine serves by default.
#[test]
fn decoding_in_place_equals_copying_the_cache() {
    for weights in [FP32, INT4] {
        decoding_in_place_equals_copying(weights);
    }
}

fn decoding_in_place_equals_copying(weights: &str) {
    let mut model = ChatModel::load(weights, &model_dir(weights), &RuntimeConfig::default()).unwrap();
    assert!(model.spec.shared_kv_buffer, "the converter's decoder takes a shared KV buffer");
    let prompts: Vec<Vec<u32>> = PROMPTS[..3].iter().map(|p| model.prompter().prompt_ids(&user(p)).unwrap()).collect();
    let mut decode = |in_place: bool| {
        let mut batch = Batch::new(model.layout(), model.padding(), in_place);
        let (mut prefilled, mut tokens) = (Vec::new(), Vec::new());
        for p in &prompts {
            let (kv, logits) = Batch::prefill(&mut model, p, None).unwrap();
            prefilled.push(kv);
            tokens.push(argmax(logits.row(0)));
        }
        batch.rebuild(&[], prefilled).unwrap();
        let mut steps = vec![tokens.clone()];
        for _ in 0..SPARE_COLUMNS + 8 {
            let logits = batch.step(&mut model, &tokens).unwrap();
            tokens = (0..prompts.len()).map(|row| argmax(logits.row(row))).collect();
            steps.push(tokens.clone());
        }
        steps
    };
    assert_eq!(decode(true), decode(false));
}

/// Prompts of different lengths prefilled in one padded run, and a prompt continuing from a
/// cache of its beginning (of different lengths, down to only its last token left), give each
/// prompt the cache and the logits it gets alone from nothing, to float rounding (fp32; the padded
/// run's matrix products block differently: ~3e-5 measured), and the same first token. That they
/// decode on alike is `concurrent_requests_equal_each_alone`.
#[test]
fn prefilling_together_or_from_a_cached_beginning_equals_each_alone() {
    let mut model = ChatModel::load("fp32", &model_dir(FP32), &RuntimeConfig::default()).unwrap();
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| model.prompter().prompt_ids(&user(p)).unwrap()).collect();
    assert!(prompts.iter().map(Vec::len).collect::<std::collections::HashSet<_>>().len() > 2, "lengths differ");
    let alone: Vec<_> = prompts.iter().map(|p| Batch::prefill(&mut model, p, None).unwrap()).collect();
    let max_diff = |a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
    };
    let check = |what: &str, (prefilled, logits): (&Prefilled, &[f32]), row: usize| {
        let (alone, alone_logits) = &alone[row];
        assert_eq!(prefilled.len(), prompts[row].len(), "{what}: length");
        assert!(max_diff(logits, alone_logits.row(0)) < 1e-3, "{what}: logits");
        assert_eq!(argmax(logits), argmax(alone_logits.row(0)), "{what}: first token");
        for (a, t) in alone.kv().iter().zip(prefilled.kv()) {
            let (a_shape, a) = a.try_extract_tensor::<f32>().unwrap();
            let (t_shape, t) = t.try_extract_tensor::<f32>().unwrap();
            assert_eq!(a_shape, t_shape, "{what}: cache shape");
            assert!(max_diff(a, t) < 1e-3, "{what}: cache");
        }
    };
    let run = prompts.iter().map(|ids| Prompt { ids, reuse: None }).collect();
    let (together, logits) = Batch::prefill_together(&mut model, run).unwrap();
    for (row, prefilled) in together.iter().enumerate() {
        check(&format!("prompt {row} together"), (prefilled, logits.row(row)), row);
    }
    // The first `len` positions of prompt 2's cache alone, as the prefix cache gives them.
    let (heads, d) = (model.layout().heads, model.layout().head_dim);
    let (whole, _) = &alone[2];
    let beginning = |len: usize| {
        let kv = whole
            .kv()
            .iter()
            .map(|t| {
                let (_, data) = t.try_extract_tensor::<f32>().unwrap();
                let n = whole.len();
                (0..heads).flat_map(|h| data[h * n * d..(h * n + len) * d].iter().copied()).collect()
            })
            .collect();
        Reuse { kv, len }
    };
    for cached in [5, 17, prompts[2].len() - 1] {
        let (prefilled, logits) = Batch::prefill(&mut model, &prompts[2], Some(beginning(cached))).unwrap();
        check(&format!("prompt 2 from {cached} cached tokens"), (&prefilled, logits.row(0)), 2);
    }
    // What the runtime cannot run is an error, not a panic: a cached beginning beside another
    // prompt, a prompt cached whole, no prompt.
    let beside = vec![Prompt { ids: &prompts[2], reuse: Some(beginning(5)) }, Prompt { ids: &prompts[0], reuse: None }];
    assert!(Batch::prefill_together(&mut model, beside).is_err());
    assert!(Batch::prefill(&mut model, &prompts[2][..17], Some(beginning(17))).is_err());
    assert!(Batch::prefill_together(&mut model, Vec::new()).is_err());
}

/// A long system prompt shared by the prefix-cache test's requests (~120 tokens).
const SYSTEM: &str = "You are the assistant of the Harbour Lighthouse Museum. The museum opens at ten in the \
    morning and closes at five in the afternoon, every day except Mondays. Tickets cost eight euros for \
    adults and four for children; members enter free. The lighthouse tower has one hundred and twelve \
    steps and a gallery with a view over the bay. Guided tours start every hour and last forty minutes. \
    The café on the ground floor serves soup, bread and cakes. Dogs are welcome on a lead, but not in \
    the tower. Answer visitors briefly and politely, and never invent opening times or prices.";

fn ask(turns: &[(&str, &str)]) -> ChatRequest {
    let mut messages = vec![Message { role: "system".into(), content: SYSTEM.into() }];
    messages.extend(turns.iter().map(|(role, text)| Message { role: (*role).into(), content: (*text).into() }));
    ChatRequest { model: "smol".into(), messages, max_tokens: Some(16), ..Default::default() }
}

/// A prompt that begins like an earlier one continues from the earlier one's KV cache, and
/// answers exactly as an engine without the prefix cache does; health counts the reuse. On fp32
/// (where a row's logits do not depend on how many rows run together) and on int4, what the engine
/// serves by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_that_begins_like_an_earlier_one_reuses_its_cache_and_answers_the_same() {
    for weights in [FP32, INT4] {
        reuses_its_cache_and_answers_the_same(weights).await;
    }
}

async fn reuses_its_cache_and_answers_the_same(weights: &str) {
    let cached = engine(&[("smol", weights)], SchedulerConfig::default());
    let plain = engine(&[("smol", weights)], SchedulerConfig { prefix_cache_bytes: 0, ..Default::default() });

    let first = ask(&[("user", "When do you open on Sunday?")]);
    let a = chat(&cached, first.clone()).await.unwrap();
    assert_eq!(a, chat(&plain, first).await.unwrap());
    let h = cached.health();
    assert_eq!((h.prefix_cache_hits, h.prefix_cache_tokens_reused), (0, 0), "nothing to reuse yet");
    assert!(h.prefix_cache_bytes > 0, "the first prompt is kept");

    // Another visitor, same system prompt: its blocks are reused.
    let second = ask(&[("user", "How much is a ticket for a child?")]);
    let b = chat(&cached, second.clone()).await.unwrap();
    assert_eq!(b, chat(&plain, second).await.unwrap(), "the same answer as without the cache");
    let h = cached.health();
    assert_eq!(h.prefix_cache_hits, 1);
    assert!(h.prefix_cache_tokens_reused >= 96, "the system prompt's whole blocks: {h:?}");

    // The first conversation's next turn: all of its first prompt's whole blocks.
    let next = ask(&[("user", "When do you open on Sunday?"), ("assistant", &a.text), ("user", "And on Monday?")]);
    let reused_before = h.prefix_cache_tokens_reused;
    let c = chat(&cached, next.clone()).await.unwrap();
    assert_eq!(c, chat(&plain, next).await.unwrap());
    let h = cached.health();
    assert_eq!(h.prefix_cache_hits, 2);
    // The first prompt's whole blocks, but for the last one, where its end may tokenise
    // differently once the answer follows.
    let first_blocks = (u64::from(a.usage.prompt_tokens) - 1) / 16 * 16;
    let gained = h.prefix_cache_tokens_reused - reused_before;
    assert!(gained >= first_blocks - 16, "the first turn's blocks: {gained} of {first_blocks} ({h:?})");
    assert_eq!(plain.health().prefix_cache_hits, 0, "off when its budget is 0");
}

/// Prompts admitted together: one that begins like another waits for that one's prefill and
/// continues from its cache (rather than computing the same system prompt beside it), while a
/// prompt that begins differently is prefilled with the first; all answer as without the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_admitted_together_still_reuse_each_others_beginnings() {
    let cached = engine(&[("smol", FP32)], SchedulerConfig::default());
    let plain = engine(&[("smol", FP32)], SchedulerConfig { prefix_cache_bytes: 0, ..Default::default() });
    // A long answer keeps the model thread stepping, so the three below queue during a step and
    // are admitted together at the next.
    let poem = ChatRequest {
        messages: vec![
            Message { role: "system".into(), content: "You write poems.".into() },
            Message { role: "user".into(), content: "A long poem about the tide, please.".into() },
        ],
        ..request("smol", "", 200)
    };
    let mut busy = cached.chat(poem).unwrap();
    assert!(matches!(busy.recv().await, Some(Event::Delta(_))), "the long answer is decoding");
    let requests = [
        ask(&[("user", "When do you open on Sunday?")]),
        ask(&[("user", "How much is a ticket for a child?")]),
        request("smol", PROMPTS[1], 16),
    ];
    let rxs: Vec<_> = requests.iter().map(|r| cached.chat(r.clone()).unwrap()).collect();
    let together = futures_util::future::join_all(rxs.into_iter().map(collect)).await;
    drop(busy);
    for (r, t) in requests.iter().zip(&together) {
        assert_eq!(t, &chat(&plain, r.clone()).await.unwrap(), "{:?}", r.messages.last());
    }
    let h = cached.health();
    assert_eq!(h.prefix_cache_hits, 1, "the second visitor reuses the first's system prompt: {h:?}");
    assert!(h.prefix_cache_tokens_reused >= 96, "the system prompt's whole blocks: {h:?}");
}

/// A prompt's conversation beginnings (what the prefix cache reports holding) count, for each
/// message, the tokens of the prompt up to the end of its text: as many as the tokenizer gives for
/// the template's text up to there, written out here by hand.
#[test]
fn each_conversation_beginning_counts_the_prompt_tokens_before_its_message_ends() {
    let model = meridian_engine::model::ChatModel::load(
        "smol",
        &model_dir(INT4),
        &meridian_engine::config::RuntimeConfig::default(),
    )
    .unwrap();
    let prompter = model.prompter();
    let turns = [("system", SYSTEM), ("user", "Hi, is it open?"), ("assistant", "Yes."), ("user", "Until when?")];
    let messages: Vec<Message> =
        turns.iter().map(|(role, text)| Message { role: (*role).into(), content: (*text).into() }).collect();
    let meridian_engine::model::RenderedPrompt { ids, marks } = prompter.prompt(&messages).unwrap();
    assert_eq!(ids, prompter.prompt_ids(&messages).unwrap());
    assert_eq!(marks.len(), turns.len());
    let mut hasher = meridian_engine::api::ConversationHasher::default();
    let mut text = String::new();
    for ((role, content), (hash, tokens)) in turns.iter().zip(&marks) {
        // SmolLM2's template: each message as `<|im_start|>ROLE\nTEXT<|im_end|>\n`.
        text.push_str(&format!("<|im_start|>{role}\n{content}"));
        assert_eq!(*tokens as usize, prompter.tokenize(&text).unwrap().len(), "up to the end of {role}: {content:?}");
        assert_eq!(*hash, hasher.message(role, content));
        text.push_str("<|im_end|>\n");
    }
    assert!((marks[3].1 as usize) < ids.len(), "the answer's opening comes after the last message");
}

#[tokio::test]
async fn stop_strings_max_tokens_and_usage() {
    let engine = engine(&[("smol", INT4)], SchedulerConfig::default());
    let full = chat(&engine, request("smol", PROMPTS[1], 40)).await.unwrap();
    assert!(full.text.len() > 12, "{full:?}");
    // A stop string from the middle of the answer (spanning token boundaries in general).
    let cut = full.text.char_indices().nth(full.text.chars().count() / 2).unwrap().0;
    let stop: String = full.text[cut..].chars().take(4).collect();
    let before = &full.text[..full.text.find(&stop).unwrap()];
    let mut req = request("smol", PROMPTS[1], 40);
    req.stop = vec!["never appears ✓".into(), stop.clone()];
    let stopped = chat(&engine, req).await.unwrap();
    assert_eq!(stopped.text, before, "stop {stop:?}");
    assert_eq!(stopped.finish_reason, FinishReason::Stop);

    let short = chat(&engine, request("smol", PROMPTS[1], 5)).await.unwrap();
    assert_eq!(short.finish_reason, FinishReason::Length);
    assert_eq!(short.usage.completion_tokens, 5);
    assert!(full.text.starts_with(&short.text), "{short:?} vs {full:?}");
    assert_eq!(short.usage.prompt_tokens, full.usage.prompt_tokens);
}

#[tokio::test]
async fn seeded_sampling_is_reproducible() {
    let engine = engine(&[("smol", INT4)], SchedulerConfig::default());
    let req = |seed| ChatRequest {
        temperature: Some(1.0),
        top_p: Some(0.95),
        top_k: Some(50),
        seed: Some(seed),
        ..request("smol", "Tell me a short story about a cat.", 32)
    };
    let a = chat(&engine, req(11)).await.unwrap();
    let b = chat(&engine, req(11)).await.unwrap();
    assert_eq!(a, b);
    let others: Vec<_> = futures_util::future::join_all((12..15).map(|s| chat(&engine, req(s)))).await;
    assert!(others.iter().any(|o| o.as_ref().unwrap().text != a.text), "different seeds all gave {a:?}");
}

#[tokio::test]
async fn dropped_receiver_frees_the_slot() {
    let engine = engine(&[("smol", INT4)], SchedulerConfig::default());
    let mut rx = engine.chat(request("smol", PROMPTS[2], 500)).unwrap();
    assert!(matches!(rx.recv().await, Some(Event::Delta(_))));
    assert_eq!(engine.health().active_sequences, 1);
    drop(rx);
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.health().active_sequences != 0 {
        assert!(Instant::now() < deadline, "the cancelled sequence still holds its slot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The engine still serves.
    let a = chat(&engine, request("smol", PROMPTS[3], 4)).await.unwrap();
    assert_eq!(a.usage.completion_tokens, 4);
}

#[tokio::test]
async fn overload_and_admission_errors() {
    let engine = engine(
        &[("smol", INT4)],
        SchedulerConfig { max_batch: 1, queue_capacity: 1, default_max_tokens: 8, ..Default::default() },
    );
    let h = engine.health();
    assert_eq!((h.max_batch, h.queue_capacity, h.chat_models.clone()), (1, 1, vec!["smol".to_string()]));
    assert_eq!(h.provider, "cpu");
    let mut first = engine.chat(request("smol", PROMPTS[1], 48)).unwrap();
    // Decoding now, so it has left the queue.
    assert!(matches!(first.recv().await, Some(Event::Delta(_))));
    // A prompt whose answer runs past 4 tokens (a short greeting may end sooner).
    let second = engine.chat(request("smol", PROMPTS[2], 4)).unwrap();
    assert_eq!(engine.health().queue_depth, 1);
    let third = engine.chat(request("smol", PROMPTS[0], 4)).unwrap_err();
    assert_eq!(third.code, ErrorCode::Overloaded, "{third}");
    let s = collect(second).await;
    assert_eq!(s.usage.completion_tokens, 4);
    while first.recv().await.is_some() {}
    assert!(engine.health().tokens_per_second > 0.0);

    let unknown = engine.chat(request("nope", "x", 4)).unwrap_err();
    assert_eq!(unknown.code, ErrorCode::UnknownModel);
    let long = "word ".repeat(9000);
    let too_long = engine.chat(request("smol", &long, 4)).unwrap_err();
    assert_eq!(too_long.code, ErrorCode::ContextLength, "{too_long}");
    let bad = engine.chat(ChatRequest { top_p: Some(0.0), ..request("smol", "x", 4) }).unwrap_err();
    assert_eq!(bad.code, ErrorCode::BadRequest);
    // Without max_tokens the default applies.
    let d = chat(&engine, ChatRequest { max_tokens: None, ..request("smol", PROMPTS[1], 0) }).await.unwrap();
    assert!(d.usage.completion_tokens <= 8);
}
