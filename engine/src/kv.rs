//! The batch state: the KV cache of B sequences, left-padded to a common length.
//!
//! Row `i` holds `lens[i]` real positions at the right end of `past` columns; the `past - lens[i]`
//! columns on its left are padding, masked out by `attention_mask` (0). Position ids count real
//! tokens only, so a sequence sees the same positions alone or in a batch.
//!
//! Hot path ([`Batch::step`]): the `present.*` outputs of one step are the next step's
//! `past_key_values.*` inputs as they are, with no copy. Only a change of composition
//! ([`Batch::rebuild`]: a sequence joins after its own prefill, or leaves) copies the cache, and then
//! also drops the columns that are padding in every row.

use ort::value::{DynValue, Tensor};

use crate::model::ChatModel;
use crate::prefix::Reuse;

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

/// Logits of a run, [B, S, V]; only each row's last position is read.
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

/// The KV cache of the sequences decoding together.
pub struct Batch {
    layout: KvLayout,
    /// Real positions per row.
    lens: Vec<usize>,
    /// Columns of the cache (the longest row).
    past: usize,
    /// `past_key_values` in layout order, [B, H, past, D] each; empty when there are no rows.
    kv: Vec<DynValue>,
}

impl Batch {
    /// An empty batch.
    pub fn new(layout: KvLayout) -> Batch {
        Batch { layout, lens: Vec::new(), past: 0, kv: Vec::new() }
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
        let n = ids.len();
        let from = reuse.as_ref().map_or(0, |r| r.len);
        assert!(from < n, "a reused prefix leaves at least the last token to compute");
        let new = ids[from..].iter().map(|&t| t as i64).collect();
        let fwd =
            model.forward(1, new, (from as i64..n as i64).collect(), vec![1; n], reuse.as_ref().map(|r| &r.kv[..]))?;
        Ok((Prefilled { kv: fwd.present, len: n }, logits(fwd.logits, 1)?))
    }

    /// Inputs of one decode step: `input_ids` [B,1], `position_ids` [B,1], `attention_mask`
    /// [B, past+1] (left padding zeros, then ones).
    pub fn step_inputs(&self, tokens: &[u32]) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
        let ids = tokens.iter().map(|&t| t as i64).collect();
        let pos = self.lens.iter().map(|&l| l as i64).collect();
        let width = self.past + 1;
        let mut mask = vec![1i64; self.lens.len() * width];
        for (row, &l) in self.lens.iter().enumerate() {
            mask[row * width..row * width + (self.past - l)].fill(0);
        }
        (ids, pos, mask)
    }

    /// One decode step: feeds `tokens[i]` to row `i`; the cache grows by one column.
    pub fn step(&mut self, model: &mut ChatModel, tokens: &[u32]) -> ort::Result<Logits> {
        assert_eq!(tokens.len(), self.lens.len(), "one token per row");
        let (ids, pos, mask) = self.step_inputs(tokens);
        let fwd = model.forward(self.lens.len(), ids, pos, mask, Some(&self.kv))?;
        self.kv = fwd.present;
        self.past += 1;
        for l in &mut self.lens {
            *l += 1;
        }
        logits(fwd.logits, self.lens.len())
    }

    /// Changes the composition: keeps rows `keep` (old indices, in the new order), then appends
    /// `add`. Columns that are padding in every remaining row are dropped.
    pub fn rebuild(&mut self, keep: &[usize], add: Vec<Prefilled>) -> ort::Result<()> {
        if add.is_empty() && keep.len() == self.lens.len() && keep.iter().enumerate().all(|(i, &k)| i == k) {
            return Ok(());
        }
        let lens: Vec<usize> = keep.iter().map(|&o| self.lens[o]).chain(add.iter().map(|p| p.len)).collect();
        let past = lens.iter().copied().max().unwrap_or(0);
        if lens.is_empty() {
            *self = Batch::new(self.layout);
            return Ok(());
        }
        let KvLayout { heads, head_dim: d, .. } = self.layout;
        let b = lens.len();
        let mut kv = Vec::with_capacity(self.layout.layers * 2);
        for j in 0..self.layout.layers * 2 {
            let mut data = vec![0f32; b * heads * past * d];
            // Sources: (tensor data, its column count, its row index, real length).
            let mut put = |row: usize, src: &[f32], src_cols: usize, src_row: usize, n: usize| {
                for h in 0..heads {
                    let s = ((src_row * heads + h) * src_cols + (src_cols - n)) * d;
                    let t = ((row * heads + h) * past + (past - n)) * d;
                    data[t..t + n * d].copy_from_slice(&src[s..s + n * d]);
                }
            };
            if !keep.is_empty() {
                let (_, old) = self.kv[j].try_extract_tensor::<f32>()?;
                for (row, &o) in keep.iter().enumerate() {
                    put(row, old, self.past, o, self.lens[o]);
                }
            }
            for (k, p) in add.iter().enumerate() {
                let (_, src) = p.kv[j].try_extract_tensor::<f32>()?;
                put(keep.len() + k, src, p.len, 0, p.len);
            }
            kv.push(Tensor::from_array(([b, heads, past, d], data))?.into_dyn());
        }
        self.kv = kv;
        self.lens = lens;
        self.past = past;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_inputs_left_pad() {
        let mut b = Batch::new(KvLayout { layers: 1, heads: 1, head_dim: 1 });
        b.lens = vec![3, 1];
        b.past = 3;
        let (ids, pos, mask) = b.step_inputs(&[7, 8]);
        assert_eq!(ids, vec![7, 8]);
        assert_eq!(pos, vec![3, 1]);
        assert_eq!(mask, vec![1, 1, 1, 1, 0, 0, 1, 1]);
    }
}
