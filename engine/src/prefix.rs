//! The prefix cache: the KV cache of recent prompts, so that a prompt sharing their beginning (a
//! system prompt, a conversation's earlier turns) skips that part of its prefill.
//!
//! Prompts are cut into blocks of [`BLOCK`] tokens. An entry holds one prompt's cache up to its last
//! whole block before the final token (the final token is always computed: its logits give the
//! first answer token). Every block boundary of an entry is indexed by a hash of all the tokens up
//! to it (chained block by block, in the manner of vLLM's and SGLang's prefix caches), so a prompt
//! matches the longest boundary any entry shares with it; the tokens are compared too, so a hash
//! collision can only cost a miss, never a wrong answer. Entries are evicted least recently used
//! first, keeping the cache within its byte budget.
//!
//! Owned by a model's thread (no locking); its counters are shared with health through
//! [`PrefixStats`].

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ort::value::DynValue;

use crate::api::MAX_HELD_PREFIXES;
use crate::kv::{KvLayout, Reuse};

/// Tokens per block: the granularity of matching and of what is kept.
pub const BLOCK: usize = 16;

/// Counters of one model's prefix cache, read by health and metrics.
#[derive(Debug, Default)]
pub struct PrefixStats {
    /// Prompts that found a cached prefix.
    pub hits: AtomicU64,
    /// Prompt tokens whose prefill was skipped.
    pub tokens_reused: AtomicU64,
    /// Bytes of KV cache held now.
    pub bytes: AtomicU64,
    /// The conversation beginnings held (hash, tokens), most recently used first, at most
    /// [`MAX_HELD_PREFIXES`]: what health reports for edges to route by.
    pub held: Mutex<Vec<(u64, u32)>>,
}

impl PrefixStats {
    /// A copy of [`PrefixStats::held`].
    pub fn held(&self) -> Vec<(u64, u32)> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct Entry {
    tokens: Vec<u32>,
    /// Per KV tensor in layout order, [H, len, D] as f32.
    kv: Vec<Vec<f32>>,
    /// The boundary hashes that point at this entry (to unindex it on eviction).
    keys: Vec<u64>,
    /// The conversation beginnings the entry holds whole: (hash, tokens), tokens ≤ its length.
    marks: Vec<(u64, u32)>,
    last_used: u64,
}

/// The cache of one chat model.
pub struct PrefixCache {
    layout: KvLayout,
    max_bytes: usize,
    bytes: usize,
    entries: HashMap<u64, Entry>,
    /// Boundary hash → the entry holding that prefix.
    index: HashMap<u64, u64>,
    next_id: u64,
    clock: u64,
    hasher: std::collections::hash_map::RandomState,
    stats: std::sync::Arc<PrefixStats>,
}

impl PrefixCache {
    /// An empty cache of at most `max_bytes` of KV (0 turns it off) for a model of `layout`.
    pub fn new(layout: KvLayout, max_bytes: usize, stats: std::sync::Arc<PrefixStats>) -> PrefixCache {
        PrefixCache {
            layout,
            max_bytes,
            bytes: 0,
            entries: HashMap::new(),
            index: HashMap::new(),
            next_id: 0,
            clock: 0,
            hasher: Default::default(),
            stats,
        }
    }

    /// Bytes of KV one token takes (keys and values of every layer, f32).
    pub fn bytes_per_token(layout: KvLayout) -> usize {
        layout.layers * 2 * layout.heads * layout.head_dim * std::mem::size_of::<f32>()
    }

    /// How many leading tokens of `ids` may come from the cache: whole blocks, leaving the last
    /// token to be computed.
    fn cacheable(ids: &[u32]) -> usize {
        ids.len().saturating_sub(1) / BLOCK * BLOCK
    }

    /// Whether `later` would continue from `earlier`'s cache once that is kept: the cache is on and
    /// both begin with the same whole block.
    pub fn would_share(&self, earlier: &[u32], later: &[u32]) -> bool {
        self.max_bytes > 0
            && Self::cacheable(earlier) >= BLOCK
            && Self::cacheable(later) >= BLOCK
            && earlier[..BLOCK] == later[..BLOCK]
    }

    /// The hash of `ids[..BLOCK * (i + 1)]` for each whole block `i` of `ids[..upto]`.
    fn boundaries(&self, ids: &[u32], upto: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(upto / BLOCK);
        let mut chained = 0u64;
        for block in ids[..upto].chunks_exact(BLOCK) {
            let mut h = self.hasher.build_hasher();
            h.write_u64(chained);
            for &t in block {
                h.write_u32(t);
            }
            chained = h.finish();
            out.push(chained);
        }
        out
    }

    /// The longest cached prefix of `ids`, copied out to continue from; `None` when nothing
    /// matches (or the cache is off).
    pub fn lookup(&mut self, ids: &[u32]) -> Option<Reuse> {
        let upto = Self::cacheable(ids);
        if self.max_bytes == 0 || upto == 0 {
            return None;
        }
        let keys = self.boundaries(ids, upto);
        let found = keys.iter().enumerate().rev().find_map(|(i, key)| {
            let id = *self.index.get(key)?;
            let len = (i + 1) * BLOCK;
            // The hash names the prefix; the tokens prove it.
            (self.entries.get(&id)?.tokens[..len] == ids[..len]).then_some((id, len))
        });
        let (id, len) = found?;
        self.clock += 1;
        let entry = self.entries.get_mut(&id).expect("indexed entries exist");
        entry.last_used = self.clock;
        let KvLayout { heads, head_dim: d, .. } = self.layout;
        let cols = entry.tokens.len();
        let kv = entry
            .kv
            .iter()
            .map(|src| {
                let mut data = Vec::with_capacity(heads * len * d);
                for h in 0..heads {
                    data.extend_from_slice(&src[h * cols * d..(h * cols + len) * d]);
                }
                data
            })
            .collect();
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        self.stats.tokens_reused.fetch_add(len as u64, Ordering::Relaxed);
        Some(Reuse { kv, len })
    }

    /// Keeps the cache of prompt `ids` (`present`: its prefill's KV, [1, H, n, D] each with n =
    /// `ids.len()`), up to its last whole block before the final token, unless an entry already
    /// holds all of that prefix. `marks` are the prompt's conversation beginnings (hash, tokens
    /// up to the end of that message's text, from [`crate::model::Prompter::prompt`]); those
    /// within what is kept are reported as held.
    pub fn insert(&mut self, ids: &[u32], present: &[DynValue], marks: &[(u64, u32)]) -> ort::Result<()> {
        let len = Self::cacheable(ids);
        let size = len * Self::bytes_per_token(self.layout);
        if self.max_bytes == 0 || len == 0 || size > self.max_bytes {
            return Ok(());
        }
        let marks: Vec<(u64, u32)> = marks.iter().copied().filter(|&(_, t)| t as usize <= len).collect();
        let keys = self.boundaries(ids, len);
        let last = *keys.last().expect("at least one block");
        if let Some(entry) = self.index.get(&last).and_then(|id| self.entries.get_mut(id)) {
            if entry.tokens[..len] == ids[..len] {
                self.clock += 1;
                entry.last_used = self.clock;
                // The same tokens may come from other messages (a template that drops some).
                for mark in marks {
                    if !entry.marks.contains(&mark) {
                        entry.marks.push(mark);
                    }
                }
                entry.marks.sort_unstable_by_key(|&(_, tokens)| tokens);
                self.publish();
                return Ok(());
            }
        }
        let KvLayout { heads, head_dim: d, .. } = self.layout;
        let n = ids.len();
        let kv = present
            .iter()
            .map(|value| {
                let (_, src) = value.try_extract_tensor::<f32>()?;
                let mut data = Vec::with_capacity(heads * len * d);
                for h in 0..heads {
                    data.extend_from_slice(&src[h * n * d..(h * n + len) * d]);
                }
                Ok(data)
            })
            .collect::<ort::Result<Vec<_>>>()?;
        // An entry this prompt extends (an earlier turn of the conversation) is superseded: the
        // new one holds all of it, but perhaps its last block, where the earlier prompt's end may
        // tokenise differently once its answer follows. It goes, and its marks move over. Another
        // prompt that shares all of an entry but its last block replaces it too: at most that
        // block of reuse is lost, for one copy of the shared blocks instead of two.
        let mut marks = marks;
        for (i, key) in keys.iter().enumerate() {
            let shared = (i + 1) * BLOCK;
            let Some(&id) = self.index.get(key) else { continue };
            let entry = &self.entries[&id];
            let n = entry.tokens.len();
            if n <= shared + BLOCK && n <= len && entry.tokens[..shared] == ids[..shared] {
                // Its beginnings that the new entry holds too.
                let common = if entry.tokens[..] == ids[..n] { n } else { shared };
                for mark in self.remove(id).marks {
                    if mark.1 as usize <= common && !marks.contains(&mark) {
                        marks.push(mark);
                    }
                }
            }
        }
        marks.sort_unstable_by_key(|&(_, tokens)| tokens);
        while self.bytes + size > self.max_bytes {
            self.evict_oldest();
        }
        self.clock += 1;
        let id = self.next_id;
        self.next_id += 1;
        for &key in &keys {
            self.index.insert(key, id);
        }
        self.entries.insert(id, Entry { tokens: ids[..len].to_vec(), kv, keys, marks, last_used: self.clock });
        self.bytes += size;
        self.stats.bytes.store(self.bytes as u64, Ordering::Relaxed);
        self.publish();
        Ok(())
    }

    /// Rewrites [`PrefixStats::held`]: the entries' marks (each entry's longest first), most
    /// recently used entry first, each hash once (with the most tokens any entry holds of it), at
    /// most [`MAX_HELD_PREFIXES`].
    fn publish(&self) {
        let mut entries: Vec<&Entry> = self.entries.values().collect();
        entries.sort_unstable_by_key(|e| std::cmp::Reverse(e.last_used));
        let mut held: Vec<(u64, u32)> = Vec::new();
        let mut at: HashMap<u64, usize> = HashMap::new();
        for &(hash, tokens) in entries.iter().flat_map(|e| e.marks.iter().rev()) {
            match at.get(&hash) {
                Some(&i) => held[i].1 = held[i].1.max(tokens),
                None if held.len() < MAX_HELD_PREFIXES => {
                    at.insert(hash, held.len());
                    held.push((hash, tokens));
                }
                None => break,
            }
        }
        *self.stats.held.lock().unwrap_or_else(|p| p.into_inner()) = held;
    }

    /// Drops the least recently used entry.
    fn evict_oldest(&mut self) {
        let Some((&id, _)) = self.entries.iter().min_by_key(|(_, e)| e.last_used) else { return };
        self.remove(id);
        self.publish();
    }

    /// Drops entry `id` and the boundaries that still point at it.
    fn remove(&mut self, id: u64) -> Entry {
        let entry = self.entries.remove(&id).expect("a held entry");
        for key in &entry.keys {
            if self.index.get(key) == Some(&id) {
                self.index.remove(key);
            }
        }
        self.bytes -= entry.tokens.len() * Self::bytes_per_token(self.layout);
        self.stats.bytes.store(self.bytes as u64, Ordering::Relaxed);
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ort::value::Tensor;
    use std::sync::Arc;

    const LAYOUT: KvLayout = KvLayout { layers: 1, heads: 2, head_dim: 2 };

    /// A fake prefill's KV of `n` tokens: every value is its token position (+ 1000 × head), so a
    /// copy can be checked position by position.
    fn present(n: usize) -> Vec<DynValue> {
        crate::runtime::set_meridian_home(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.meridian"));
        crate::runtime::runtime().expect("ONNX Runtime, from scripts/setup-engine");
        (0..2)
            .map(|_| {
                let mut data = Vec::new();
                for h in 0..2 {
                    for p in 0..n {
                        data.extend([(1000 * h + p) as f32; 2]);
                    }
                }
                Tensor::from_array(([1, 2, n, 2], data)).unwrap().into_dyn()
            })
            .collect()
    }

    fn cache(max_bytes: usize) -> (PrefixCache, Arc<PrefixStats>) {
        let stats = Arc::new(PrefixStats::default());
        (PrefixCache::new(LAYOUT, max_bytes, Arc::clone(&stats)), stats)
    }

    fn values(reuse: &Reuse) -> Vec<f32> {
        reuse.kv[0].clone()
    }

    #[test]
    fn the_longest_shared_whole_block_prefix_is_reused_and_the_last_token_never() {
        let (mut c, stats) = cache(1 << 20);
        let first: Vec<u32> = (0..40).collect();
        assert!(c.lookup(&first).is_none());
        c.insert(&first, &present(40), &[]).unwrap();
        // 39 cacheable tokens: two whole blocks are kept.
        assert_eq!(stats.bytes.load(Ordering::Relaxed), 32 * PrefixCache::bytes_per_token(LAYOUT) as u64);

        // The same prompt again: two blocks, never the last token.
        let reuse = c.lookup(&first).expect("a hit");
        assert_eq!(reuse.len, 32);
        let v = values(&reuse);
        assert_eq!(v.len(), 2 * 32 * 2);
        assert_eq!((v[0], v[2 * 31], v[2 * 32], v[2 * 63]), (0.0, 31.0, 1000.0, 1031.0), "head by head, in order");

        // A prompt that shares the first block only, then differs.
        let mut other = first.clone();
        other[20] = 999;
        assert_eq!(c.lookup(&other).expect("a hit").len, 16);
        // A prompt of exactly 17 tokens may reuse one block; of 16, none (its last token is in it).
        assert_eq!(c.lookup(&first[..17]).expect("a hit").len, 16);
        assert!(c.lookup(&first[..16]).is_none());
        // Nothing shared.
        assert!(c.lookup(&(100..140).collect::<Vec<u32>>()).is_none());
        assert_eq!(stats.hits.load(Ordering::Relaxed), 3);
        assert_eq!(stats.tokens_reused.load(Ordering::Relaxed), 32 + 16 + 16);
    }

    #[test]
    fn least_recently_used_entries_go_first_and_the_budget_holds() {
        let per_block = BLOCK * PrefixCache::bytes_per_token(LAYOUT);
        let (mut c, stats) = cache(2 * per_block);
        let a: Vec<u32> = (0..17).collect();
        let b: Vec<u32> = (100..117).collect();
        let d: Vec<u32> = (200..217).collect();
        c.insert(&a, &present(17), &[]).unwrap();
        c.insert(&b, &present(17), &[]).unwrap();
        assert!(c.lookup(&a).is_some(), "a is now the most recent");
        c.insert(&d, &present(17), &[]).unwrap();
        assert_eq!(stats.bytes.load(Ordering::Relaxed), 2 * per_block as u64);
        assert!(c.lookup(&b).is_none(), "b was the least recently used");
        assert!(c.lookup(&a).is_some() && c.lookup(&d).is_some());
        // Larger than the whole budget: not kept, nothing evicted for it.
        c.insert(&(0..100).collect::<Vec<u32>>(), &present(100), &[]).unwrap();
        assert!(c.lookup(&a).is_some());
    }

    #[test]
    fn held_conversation_beginnings_are_those_kept_whole_and_leave_with_their_entry() {
        let per_block = BLOCK * PrefixCache::bytes_per_token(LAYOUT);
        let (mut c, stats) = cache(2 * per_block);
        // 40 tokens keep 32: the beginning at 39 tokens is not held whole.
        c.insert(&(0..40).collect::<Vec<u32>>(), &present(40), &[(1, 10), (2, 32), (3, 39)]).unwrap();
        assert_eq!(stats.held(), [(2, 32), (1, 10)], "longest first, only what is kept");
        // A second prompt evicts the first (the budget is two blocks): its marks go with it.
        c.insert(&(100..140).collect::<Vec<u32>>(), &present(40), &[(7, 20)]).unwrap();
        assert_eq!(stats.held(), [(7, 20)]);
        // The same tokens under another beginning: one entry, both marks.
        c.insert(&(100..140).collect::<Vec<u32>>(), &present(40), &[(8, 20)]).unwrap();
        assert_eq!(stats.held(), [(8, 20), (7, 20)]);
    }

    #[test]
    fn a_prompt_that_extends_an_entry_replaces_it() {
        let (mut c, stats) = cache(1 << 20);
        let turn1: Vec<u32> = (0..40).collect();
        c.insert(&turn1, &present(40), &[(1, 20)]).unwrap();
        // The next turn: the whole first prompt, then more.
        let turn2: Vec<u32> = (0..60).collect();
        assert_eq!(c.lookup(&turn2).expect("a hit").len, 32);
        c.insert(&turn2, &present(60), &[(2, 40)]).unwrap();
        assert_eq!(c.entries.len(), 1, "the first turn's entry is superseded");
        assert_eq!(stats.bytes.load(Ordering::Relaxed), 48 * PrefixCache::bytes_per_token(LAYOUT) as u64);
        assert_eq!(stats.held(), [(2, 40), (1, 20)], "its marks moved over, longest first");
        assert_eq!(c.lookup(&turn1).expect("still served").len, 32);
        // A prompt that only shares a beginning leaves the entry alone.
        let mut other = turn2.clone();
        other[20] = 999;
        c.insert(&other, &present(60), &[]).unwrap();
        assert_eq!(c.entries.len(), 2);
        // One whose last block differs from the entry's (the earlier prompt's end, tokenised
        // differently once its answer follows) still replaces it.
        let mut turn3: Vec<u32> = (0..80).collect();
        turn3[40] = 7;
        c.insert(&turn3, &present(80), &[(3, 60)]).unwrap();
        assert_eq!(c.entries.len(), 2, "turn 2's entry went; the other stays");
        assert_eq!(stats.held()[..2], [(3, 60), (1, 20)], "of its marks, those within the shared blocks");
    }

    #[test]
    fn a_zero_budget_turns_it_off() {
        let (mut c, stats) = cache(0);
        let ids: Vec<u32> = (0..40).collect();
        c.insert(&ids, &present(40), &[]).unwrap();
        assert!(c.lookup(&ids).is_none());
        assert_eq!(stats.bytes.load(Ordering::Relaxed), 0, "nothing kept");
    }
}
