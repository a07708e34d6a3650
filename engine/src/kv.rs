//! The batch state: the KV cache of B sequences, padded to a common length.
//!
//! Row `i` holds `lens[i]` real positions among `past` columns, the other `past - lens[i]` columns
//! being padding, on the side the model's graph expects ([`Padding`]): on the left (Hugging Face
//! graphs: `attention_mask` masks them out, position ids count real tokens only) or on the right
//! (GroupQueryAttention graphs, whose attention reads each row's first `lens[i]` columns and counts
//! positions from there). Either way a sequence sees the same positions alone or in a batch.
//!
//! Hot path ([`Batch::step`]): with a model that takes a shared KV buffer
//! ([`ChatSpec::shared_kv_buffer`](crate::model::ChatSpec::shared_kv_buffer)), each KV tensor is
//! one buffer with spare columns, given to the step as both past and present: the step writes its
//! new column in place, and the buffer is copied only when its spare columns run out (every
//! [`SPARE_COLUMNS`] steps). Otherwise the `present.*` outputs of one step are the next step's
//! `past_key_values.*` inputs as they are, and the runtime copies the whole cache into them each
//! step. A change of composition ([`Batch::rebuild`]: a sequence joins after its own prefill, or
//! leaves) copies the cache, and then also drops the columns that are padding in every row.

use ort::memory::Allocator;
use ort::session::IoBinding;
use ort::value::{DynValue, Tensor};

use crate::model::ChatModel;

/// Shape of a decoder's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Layers (each has a key and a value tensor).
    pub layers: usize,
    /// KV heads.
    pub heads: usize,
    /// Head size.
    pub head_dim: usize,
}

/// Where a row's padding lies, as the model's graph expects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Before the row's positions, which end at the last column (the Hugging Face convention:
    /// `attention_mask` zeros first, position ids counting real tokens).
    Left,
    /// After them: the row's positions are its first columns and `attention_mask` counts them
    /// (GroupQueryAttention's `seqlens_k`; the converter's graphs and onnxruntime-genai's).
    Right,
}

impl Padding {
    /// Appends a row of the inputs, `pad` zeros on this side of `row`.
    fn extend(self, out: &mut Vec<i64>, row: impl IntoIterator<Item = i64>, pad: usize) {
        let zeros = std::iter::repeat_n(0, pad);
        match self {
            Padding::Left => out.extend(zeros.chain(row)),
            Padding::Right => out.extend(row.into_iter().chain(zeros)),
        }
    }

    /// Where a row of `n` positions ends among `width` columns.
    fn end(self, n: usize, width: usize) -> usize {
        match self {
            Padding::Left => width,
            Padding::Right => n,
        }
    }
}

/// One sequence's cache after its prefill, waiting to join the batch.
pub struct Prefilled {
    kv: Vec<DynValue>,
    len: usize,
}

impl Prefilled {
    /// Positions in its cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no positions (never, after a prefill of at least one token).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its KV tensors, [1, H, len, D] each, in layout order.
    pub fn kv(&self) -> &[DynValue] {
        &self.kv
    }
}

/// The cache of a prompt's beginning, to continue from (from the
/// [`PrefixCache`](crate::prefix::PrefixCache)).
pub struct Reuse {
    /// Per KV tensor in layout order, the first `len` positions as [H, len, D].
    pub kv: Vec<Vec<f32>>,
    /// Tokens covered.
    pub len: usize,
}

/// A prompt to prefill: its tokens, and the cache of its beginning when one was kept.
pub struct Prompt<'a> {
    /// The whole prompt.
    pub ids: &'a [u32],
    /// The cache of `ids[..reuse.len]`, which then is not computed again.
    pub reuse: Option<Reuse>,
}

impl Prompt<'_> {
    /// (positions that come from the cache, positions to compute); an error when nothing is left
    /// to compute, since the last position's logits give the first answer token.
    fn size(&self) -> ort::Result<(usize, usize)> {
        let cached = self.reuse.as_ref().map_or(0, |r| r.len);
        if cached >= self.ids.len() {
            return Err(ort::Error::new(format!(
                "a prompt of {} tokens with {cached} of them cached leaves none to compute",
                self.ids.len()
            )));
        }
        Ok((cached, self.ids.len() - cached))
    }
}

/// Logits of a run, [B, S, V] (or [B, 1, V]); only each row's last position is read.
pub struct Logits {
    value: DynValue,
    seq: usize,
    vocab: usize,
}

impl Logits {
    /// The last position's logits of row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        let (_, data) = self.value.try_extract_tensor::<f32>().expect("logits are f32");
        let start = (i * self.seq + self.seq - 1) * self.vocab;
        &data[start..start + self.vocab]
    }
}

fn logits(value: DynValue, batch: usize) -> ort::Result<Logits> {
    let (shape, data) = value.try_extract_tensor::<f32>()?;
    if shape.len() != 3 || shape[0] as usize != batch || data.len() != shape.iter().product::<i64>() as usize {
        return Err(ort::Error::new(format!("logits have shape {:?}, expected [{batch}, S, V]", &shape[..])));
    }
    let (seq, vocab) = (shape[1] as usize, shape[2] as usize);
    Ok(Logits { value, seq, vocab })
}

/// Most positions, padding included, that one joint prefill ([`Batch::prefill_together`]) runs:
/// bounds its activations and its attention bias (rows × S × S floats, at most 16 MB).
pub const PREFILL_MAX_TOKENS: usize = 2048;

/// Columns a shared KV buffer holds beyond the cache's, so that it is copied into a larger one
/// once every this many steps. At 46 KB a column for SmolLM2 (30 layers, K and V, 3 heads of
/// 64), a batch of 8 holds at most ~24 MB unused.
pub const SPARE_COLUMNS: usize = 64;

/// The KV cache of the sequences decoding together.
pub struct Batch {
    layout: KvLayout,
    /// Where each row's padding lies.
    padding: Padding,
    /// Whether the model writes each step's entries into the buffers in place.
    in_place: bool,
    /// Real positions per row.
    lens: Vec<usize>,
    /// Columns of the cache (the longest row).
    past: usize,
    /// Columns the tensors hold: `past`, or more for buffers written in place.
    columns: usize,
    /// `past_key_values` in layout order, [B, H, columns, D] each; empty when there are no rows.
    kv: Vec<DynValue>,
    /// For buffers written in place: `kv` bound as the step's past and present, kept until `kv`
    /// changes.
    binding: Option<IoBinding>,
}

impl Batch {
    /// An empty batch, its rows padded on the `padding` side; `in_place` when the model takes
    /// shared KV buffers.
    pub fn new(layout: KvLayout, padding: Padding, in_place: bool) -> Batch {
        Batch { layout, padding, in_place, lens: Vec::new(), past: 0, columns: 0, kv: Vec::new(), binding: None }
    }

    /// Rows.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// Whether no sequence is decoding.
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Columns of the cache.
    pub fn past_len(&self) -> usize {
        self.past
    }

    /// Real positions of row `i`.
    pub fn seq_len(&self, i: usize) -> usize {
        self.lens[i]
    }

    /// Runs `ids` through the model (batch 1), continuing from `reuse` (the cache of its first
    /// `reuse.len` tokens, from the [`PrefixCache`](crate::prefix::PrefixCache)) or from an empty
    /// cache: returns the whole prompt's cache and the logits.
    pub fn prefill(model: &mut ChatModel, ids: &[u32], reuse: Option<Reuse>) -> ort::Result<(Prefilled, Logits)> {
        let (mut prefilled, logits) = Batch::prefill_together(model, vec![Prompt { ids, reuse }])?;
        Ok((prefilled.pop().expect("one prompt, one cache"), logits))
    }

    /// Runs `prompts` through the model in one run: returns each prompt's whole cache, and the
    /// logits, row `k` for prompt `k`. One run of the matrix products instead of one per prompt:
    /// the runtime's fixed cost per operator is paid once, and every prompt has its first token
    /// when the run ends. The prompts are padded to the longest, on the side the model expects.
    /// [`prefill_runs`] decides which prompts share a run.
    ///
    /// A prompt that continues from a cached beginning runs alone: ONNX Runtime's
    /// GroupQueryAttention takes a past cache with several new tokens for one row only ("batch_size
    /// must be 1 when sequence_length > 1 and past context is given", ORT 1.31).
    pub fn prefill_together(model: &mut ChatModel, prompts: Vec<Prompt<'_>>) -> ort::Result<(Vec<Prefilled>, Logits)> {
        let rows = prompts.len();
        let sizes = prompts.iter().map(Prompt::size).collect::<ort::Result<Vec<_>>>()?;
        if rows > 1 && sizes.iter().any(|&(cached, _)| cached > 0) {
            return Err(ort::Error::new("a prompt continuing from a cached beginning must run alone"));
        }
        let Some(width) = sizes.iter().map(|&(_, new)| new).max() else {
            return Err(ort::Error::new("no prompt to prefill"));
        };
        let padding = model.padding();
        let (mut ids, mut pos, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for (p, &(cached, new)) in prompts.iter().zip(&sizes) {
            let pad = width - new;
            padding.extend(&mut ids, p.ids[cached..].iter().map(|&t| i64::from(t)), pad);
            padding.extend(&mut pos, cached as i64..p.ids.len() as i64, pad);
            padding.extend(&mut mask, std::iter::repeat_n(1, cached + new), pad);
        }
        let KvLayout { heads, head_dim: d, .. } = model.layout();
        // A run with a cached beginning is that prompt alone (checked above).
        let past = match prompts.into_iter().next().and_then(|p| p.reuse) {
            Some(reuse) => Some(
                reuse
                    .kv
                    .into_iter()
                    .map(|data| Ok(Tensor::from_array(([1, heads, reuse.len, d], data))?.into_dyn()))
                    .collect::<ort::Result<Vec<_>>>()?,
            ),
            None => None,
        };
        let fwd = model.forward(rows, ids, pos, mask, past.as_deref())?;
        let logits = logits(fwd.logits, rows)?;
        if rows == 1 {
            let len = sizes[0].0 + sizes[0].1;
            return Ok((vec![Prefilled { kv: fwd.present, len }], logits));
        }
        // Each row's own positions as a cache of its own.
        let mut caches: Vec<Vec<DynValue>> = sizes.iter().map(|_| Vec::with_capacity(fwd.present.len())).collect();
        for present in &fwd.present {
            let (_, data) = present.try_extract_tensor::<f32>()?;
            for (row, (&(_, n), cache)) in sizes.iter().zip(&mut caches).enumerate() {
                let mut own = vec![0f32; heads * n * d];
                let from = Columns { row, columns: width, end: padding.end(n, width) };
                copy_positions(data, from, &mut own, Columns { row: 0, columns: n, end: n }, n, heads, d);
                cache.push(Tensor::from_array(([1, heads, n, d], own))?.into_dyn());
            }
        }
        Ok((caches.into_iter().zip(sizes).map(|(kv, (_, len))| Prefilled { kv, len }).collect(), logits))
    }

    /// Inputs of one decode step: `input_ids` [B,1], `position_ids` [B,1], `attention_mask`
    /// [B, past+1] (per row a one for each of its positions and for the new token, and zeros for
    /// its padding, on the model's side).
    pub fn step_inputs(&self, tokens: &[u32]) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
        let ids = tokens.iter().map(|&t| t as i64).collect();
        let pos = self.lens.iter().map(|&l| l as i64).collect();
        let mut mask = Vec::with_capacity(self.lens.len() * (self.past + 1));
        for &l in &self.lens {
            self.padding.extend(&mut mask, std::iter::repeat_n(1, l + 1), self.past - l);
        }
        (ids, pos, mask)
    }

    /// One decode step: feeds `tokens[i]` to row `i`; the cache grows by one column.
    pub fn step(&mut self, model: &mut ChatModel, tokens: &[u32]) -> ort::Result<Logits> {
        assert_eq!(tokens.len(), self.lens.len(), "one token per row");
        let (ids, pos, mask) = self.step_inputs(tokens);
        let logits_value = if self.in_place {
            if self.past == self.columns {
                let rows: Vec<usize> = (0..self.lens.len()).collect();
                self.relayout(&rows, Vec::new())?;
            }
            model.step_in_place(ids, pos, mask, &mut self.kv, &mut self.binding)?
        } else {
            let fwd = model.forward(self.lens.len(), ids, pos, mask, Some(&self.kv))?;
            self.kv = fwd.present;
            self.columns += 1;
            fwd.logits
        };
        self.past += 1;
        for l in &mut self.lens {
            *l += 1;
        }
        logits(logits_value, self.lens.len())
    }

    /// Changes the composition: keeps rows `keep` (old indices, in the new order), then appends
    /// `add`. Columns that are padding in every remaining row are dropped.
    pub fn rebuild(&mut self, keep: &[usize], add: Vec<Prefilled>) -> ort::Result<()> {
        if add.is_empty() && keep.len() == self.lens.len() && keep.iter().enumerate().all(|(i, &k)| i == k) {
            return Ok(());
        }
        self.relayout(keep, add)
    }

    /// Copies rows `keep` and `add` into new tensors, each row's positions where its padding puts
    /// them among the new `past` columns; a shared buffer gets [`SPARE_COLUMNS`] more columns,
    /// zeroed like the padding.
    fn relayout(&mut self, keep: &[usize], add: Vec<Prefilled>) -> ort::Result<()> {
        let lens: Vec<usize> = keep.iter().map(|&o| self.lens[o]).chain(add.iter().map(|p| p.len)).collect();
        let past = lens.iter().copied().max().unwrap_or(0);
        if lens.is_empty() {
            *self = Batch::new(self.layout, self.padding, self.in_place);
            return Ok(());
        }
        let columns = if self.in_place { past + SPARE_COLUMNS } else { past };
        let KvLayout { heads, head_dim: d, .. } = self.layout;
        let b = lens.len();
        let shape = [b, heads, columns, d];
        let mut kv = Vec::with_capacity(self.layout.layers * 2);
        for j in 0..self.layout.layers * 2 {
            // Runtime-allocated, since only such a tensor can be bound as an output. Its data is
            // not initialised: every row is written whole below, its padding and spare columns
            // zeroed (the runtime reads them before the mask discards them, so they must hold
            // numbers).
            let mut tensor = Tensor::<f32>::new(&Allocator::default(), shape)?;
            let (_, data) = tensor.extract_tensor_mut();
            let to = |row: usize| Columns { row, columns, end: self.padding.end(lens[row], past) };
            if !keep.is_empty() {
                let (_, old) = self.kv[j].try_extract_tensor::<f32>()?;
                for (row, &o) in keep.iter().enumerate() {
                    let from =
                        Columns { row: o, columns: self.columns, end: self.padding.end(self.lens[o], self.past) };
                    place_row(old, from, data, to(row), self.lens[o], heads, d);
                }
            }
            for (k, p) in add.iter().enumerate() {
                let (_, src) = p.kv[j].try_extract_tensor::<f32>()?;
                let from = Columns { row: 0, columns: p.len, end: p.len };
                place_row(src, from, data, to(keep.len() + k), p.len, heads, d);
            }
            kv.push(tensor.into_dyn());
        }
        // The old buffers go with the binding that holds them; the next step binds the new ones.
        self.binding = None;
        self.kv = kv;
        self.lens = lens;
        self.past = past;
        self.columns = columns;
        Ok(())
    }
}

/// Where a row's positions lie in a KV tensor [B, H, columns, D]: they end at column `end`.
#[derive(Clone, Copy)]
struct Columns {
    row: usize,
    columns: usize,
    end: usize,
}

/// Copies the `n` positions of one row (every head) from `src` to `dst`, each ending where its
/// [`Columns`] say.
fn copy_positions(src: &[f32], from: Columns, dst: &mut [f32], to: Columns, n: usize, heads: usize, d: usize) {
    for h in 0..heads {
        let s = ((from.row * heads + h) * from.columns + (from.end - n)) * d;
        let t = ((to.row * heads + h) * to.columns + (to.end - n)) * d;
        dst[t..t + n * d].copy_from_slice(&src[s..s + n * d]);
    }
}

/// Writes one row of `dst` whole: the `n` positions of `from` ending at `to.end`, and zeros in
/// its other columns.
fn place_row(src: &[f32], from: Columns, dst: &mut [f32], to: Columns, n: usize, heads: usize, d: usize) {
    copy_positions(src, from, dst, to, n, heads, d);
    for h in 0..heads {
        let row = (to.row * heads + h) * to.columns * d;
        dst[row..row + (to.end - n) * d].fill(0.0);
        dst[row + to.end * d..row + to.columns * d].fill(0.0);
    }
}

/// Splits waiting prompts of `new` positions each (none cached) into runs prefilled together
/// ([`Batch::prefill_together`]). In order of length, a prompt joins the current run while the
/// run's padded size (rows × longest) stays within [`PREFILL_MAX_TOKENS`] and its padding within
/// a quarter of its real tokens: prompts of similar length share a run, and a long prompt is never
/// padded against short ones. Returns indices into `new`, each once.
pub fn prefill_runs(new: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..new.len()).collect();
    order.sort_by_key(|&i| new[i]);
    let mut runs: Vec<Vec<usize>> = Vec::new();
    let (mut real, mut longest) = (0, 0);
    for i in order {
        let n = new[i];
        let padded = match runs.last() {
            Some(run) => (run.len() + 1) * longest.max(n),
            None => usize::MAX,
        };
        if padded <= PREFILL_MAX_TOKENS && 4 * padded <= 5 * (real + n) {
            runs.last_mut().expect("a run is open").push(i);
            real += n;
            longest = longest.max(n);
        } else {
            runs.push(vec![i]);
            (real, longest) = (n, n);
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_inputs_pad_each_row_on_the_models_side() {
        for (padding, want) in [(Padding::Left, [1, 1, 1, 1, 0, 0, 1, 1]), (Padding::Right, [1, 1, 1, 1, 1, 1, 0, 0])] {
            let mut b = Batch::new(KvLayout { layers: 1, heads: 1, head_dim: 1 }, padding, false);
            b.lens = vec![3, 1];
            b.past = 3;
            let (ids, pos, mask) = b.step_inputs(&[7, 8]);
            assert_eq!(ids, vec![7, 8]);
            assert_eq!(pos, vec![3, 1]);
            assert_eq!(mask, want);
        }
    }

    #[test]
    fn prefill_runs_group_similar_lengths_within_the_budget() {
        // Eight prompts of 40–49 tokens: one run.
        assert_eq!(prefill_runs(&[49, 45, 40, 49, 47, 44, 49, 42]), vec![vec![2, 7, 5, 1, 4, 0, 3, 6]]);
        // A long prompt is not padded against short ones; the budget splits equal ones.
        assert_eq!(prefill_runs(&[10, 1000, 12]), vec![vec![0, 2], vec![1]]);
        assert_eq!(prefill_runs(&[600, 600, 600, 600]), vec![vec![0, 1, 2], vec![3]]);
        // A prompt longer than the budget still gets a run of its own.
        assert_eq!(prefill_runs(&[3000]), vec![vec![0]]);
        assert!(prefill_runs(&[]).is_empty());
    }
}
