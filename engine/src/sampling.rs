//! Choosing the next token from the last position's logits: greedy when the temperature is 0 or
//! absent, else temperature / top-k / top-p sampling with a seeded ChaCha8 generator (a given seed
//! reproduces the answer).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings of one request.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SamplingParams {
    /// 0 or absent: greedy.
    pub temperature: Option<f32>,
    /// Nucleus mass in (0, 1].
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: Option<u32>,
    /// Seed; absent: a fresh one per request.
    pub seed: Option<u64>,
}

impl SamplingParams {
    /// Checks ranges; the message is for a `BadRequest`.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t >= 0.0) {
                return Err(format!("temperature must be a finite number ≥ 0, not {t}"));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top_p must be in (0, 1], not {p}"));
            }
        }
        Ok(())
    }
}

/// Picks tokens for one sequence.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Option<ChaCha8Rng>,
    /// Scratch: (logit index, probability), reused between tokens.
    scratch: Vec<(u32, f32)>,
}

fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

impl Sampler {
    /// A sampler for `params`.
    pub fn new(params: SamplingParams) -> Sampler {
        let greedy = params.temperature.is_none_or(|t| t == 0.0);
        let rng = (!greedy).then(|| ChaCha8Rng::seed_from_u64(params.seed.unwrap_or_else(fresh_seed)));
        Sampler { params, rng, scratch: Vec::new() }
    }

    /// Whether this sampler always takes the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.rng.is_none()
    }

    /// The next token from one position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let Some(rng) = &mut self.rng else { return argmax(logits) };
        let temperature = self.params.temperature.unwrap_or(1.0);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let c = &mut self.scratch;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        let k = self.params.top_k.unwrap_or(0) as usize;
        let top_p = self.params.top_p.unwrap_or(1.0);
        if k > 0 && k < c.len() {
            c.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            c.truncate(k);
        }
        let mut sum = 0.0f32;
        for e in c.iter_mut() {
            e.1 = ((e.1 - max) / temperature).exp();
            sum += e.1;
        }
        if top_p < 1.0 {
            c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut mass = 0.0;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                mass += e.1 / sum;
                if mass >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            sum = c.iter().map(|e| e.1).sum();
        }
        let mut r = rng.random::<f32>() * sum;
        for e in c.iter() {
            r -= e.1;
            if r <= 0.0 {
                return e.0;
            }
        }
        c.last().map(|e| e.0).unwrap_or_else(|| argmax(logits))
    }
}

/// The index of the largest value; the first one on ties (as `numpy.argmax`).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x > best_v {
            best_v = x;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect()
    }

    #[test]
    fn greedy_is_argmax() {
        let l = logits();
        let mut s = Sampler::new(SamplingParams::default());
        assert!(s.is_greedy());
        let expect = argmax(&l);
        assert_eq!(l[expect as usize], 9.9);
        assert_eq!(s.sample(&l), expect);
        let mut s = Sampler::new(SamplingParams { temperature: Some(0.0), seed: Some(1), ..Default::default() });
        assert_eq!(s.sample(&l), expect);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }

    #[test]
    fn seeded_is_reproducible_and_varies() {
        let l = logits();
        let p = SamplingParams { temperature: Some(1.0), seed: Some(42), ..Default::default() };
        let run = |p| {
            let mut s = Sampler::new(p);
            (0..50).map(|_| s.sample(&l)).collect::<Vec<_>>()
        };
        assert_eq!(run(p), run(p));
        let a = run(p);
        assert!(a.iter().any(|&t| t != a[0]), "temperature 1 over 100 tokens should vary");
        assert_ne!(run(SamplingParams { seed: Some(43), ..p }), a);
    }

    #[test]
    fn top_k_and_top_p_restrict() {
        let l = logits();
        let mut order: Vec<u32> = (0..100).collect();
        order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
        let mut s = Sampler::new(SamplingParams {
            temperature: Some(5.0),
            top_k: Some(3),
            seed: Some(7),
            ..Default::default()
        });
        for _ in 0..200 {
            assert!(order[..3].contains(&s.sample(&l)));
        }
        // Sharp distribution: the top token holds almost all mass, so top_p 0.5 keeps only it.
        let mut sharp = vec![0.0f32; 50];
        sharp[17] = 20.0;
        let mut s = Sampler::new(SamplingParams {
            temperature: Some(1.0),
            top_p: Some(0.5),
            seed: Some(7),
            ..Default::default()
        });
        for _ in 0..100 {
            assert_eq!(s.sample(&sharp), 17);
        }
    }

    #[test]
    fn validation() {
        assert!(SamplingParams { top_p: Some(0.0), ..Default::default() }.validate().is_err());
        assert!(SamplingParams { temperature: Some(-1.0), ..Default::default() }.validate().is_err());
        assert!(SamplingParams { temperature: Some(0.7), top_p: Some(1.0), ..Default::default() }.validate().is_ok());
    }
}
