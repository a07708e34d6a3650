//! The int4 model's packed graph on Meridian's CPU kernel (`packed_matmul`) against the same
//! weights on ONNX Runtime's `MatMulNBits`, an implementation nobody here wrote: the same logits to
//! within the two kernels' rounding, the right answer to the golden question, and rows whose logits
//! do not depend on which other rows run beside them.

use crate::common::*;
use meridian_engine::config::RuntimeConfig;
use meridian_engine::kv::{Batch, Prompt};
use meridian_engine::model::ChatModel;
use meridian_engine::packed_matmul;
use meridian_engine::sampling::argmax;

const PROMPTS: [&str; 4] = [
    "What is the capital of France? Answer in one sentence.",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea, the wind and the old lighthouse keeper who lives alone on the rocky island.",
    "Hi!",
];

fn load(packed: bool) -> ChatModel {
    let cfg = RuntimeConfig { packed_kernel: packed, ..RuntimeConfig::default() };
    ChatModel::load("int4", &model_dir(INT4), &cfg).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// On a CPU with AVX-512 VNNI the engine opens the packed graph, and only there.
#[test]
fn the_packed_graph_is_opened_where_the_cpu_runs_its_kernel() {
    let file = |m: &ChatModel| m.graph.file_name().unwrap().to_string_lossy().into_owned();
    let expected = if packed_matmul::supported() { packed_matmul::PACKED_MODEL } else { "model.onnx" };
    assert_eq!(file(&load(true)), expected);
    assert_eq!(file(&load(false)), "model.onnx", "packed_kernel = false keeps ONNX Runtime's kernel");
}

/// Prefill logits on the packed kernel against `MatMulNBits` and the fp32 model. The two kernels
/// round differently (the activations' int8 codes, the order of float sums), and 30 layers carry
/// that on: measured 0.18–0.36 RMS between them, against 1.1–2.9 from either to fp32. So: the
/// same first tokens, a distance between the kernels well under their distance to fp32, no
/// further from fp32 than `MatMulNBits`, and the right answer to the golden question. (Greedy
/// answers part at near-ties after a few tokens, as `MatMulNBits`' own batched answers do.)
#[test]
fn packed_kernel_matches_onnx_runtimes_matmulnbits() {
    if !packed_matmul::supported() {
        // The graph test above checks that such a CPU never opens the packed graph.
        return;
    }
    let (mut ours, mut theirs) = (load(true), load(false));
    let mut fp32 = ChatModel::load("fp32", &model_dir(FP32), &RuntimeConfig::default()).unwrap();
    let rms = |x: &[f32], y: &[f32]| {
        assert_eq!(x.len(), y.len());
        (x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / x.len() as f32).sqrt()
    };
    for p in PROMPTS {
        let ids = ours.prompter().prompt_ids(&user(p)).unwrap();
        let (_, a) = Batch::prefill(&mut ours, &ids, None).unwrap();
        let (_, b) = Batch::prefill(&mut theirs, &ids, None).unwrap();
        let (_, f) = Batch::prefill(&mut fp32, &ids, None).unwrap();
        let (a, b, f) = (a.row(0), b.row(0), f.row(0));
        let (between, ours_off, theirs_off) = (rms(a, b), rms(a, f), rms(b, f));
        eprintln!("{p:?}: RMS logit difference {between:.3} between the kernels; from fp32 {ours_off:.3} (packed), {theirs_off:.3} (MatMulNBits)");
        assert_eq!(argmax(a), argmax(b), "{p:?}: first token");
        assert!(between < theirs_off / 3.0, "{p:?}: the kernels differ by {between}");
        assert!(ours_off < theirs_off * 1.25, "{p:?}: {ours_off} from fp32 against MatMulNBits' {theirs_off}");
    }
    let ids = ours.prompter().prompt_ids(&user(PROMPTS[0])).unwrap();
    let answer = ours.greedy_reference(&ids, 24, true).unwrap();
    let text = ours.tokenizer.decode(&answer, true).unwrap();
    assert!(text.contains("Paris"), "{text:?}");
}

/// Each row's products are summed in the same order whatever rows run beside it, so a prompt
/// prefilled among others gets exactly the logits it gets alone (`MatMulNBits` does not: see
/// `concurrent_requests_equal_each_alone`).
#[test]
fn packed_kernel_rows_do_not_depend_on_their_neighbours() {
    if !packed_matmul::supported() {
        return;
    }
    let mut model = load(true);
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| model.prompter().prompt_ids(&user(p)).unwrap()).collect();
    let alone: Vec<Vec<f32>> =
        prompts.iter().map(|p| Batch::prefill(&mut model, p, None).unwrap().1.row(0).to_vec()).collect();
    let run = prompts.iter().map(|ids| Prompt { ids, reuse: None }).collect();
    let (_, together) = Batch::prefill_together(&mut model, run).unwrap();
    for (row, a) in alone.iter().enumerate() {
        assert_eq!(max_diff(together.row(row), a), 0.0, "{:?}", PROMPTS[row]);
    }
}
