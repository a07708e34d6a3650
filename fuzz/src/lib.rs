//! What the fuzz targets share: how an input is cut into the chunks a network would deliver, and
//! how two values that went through JSON are compared.
//!
//! Every target is deterministic in its input: the chunking of an input is derived from the input
//! itself, so a crash file replays exactly.

use serde_json::Value;

/// A small deterministic generator (SplitMix64), seeded from the input being fuzzed.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `data` (FNV-1a), so that the same input always cuts the same way.
    pub fn from_input(data: &[u8]) -> Rng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in data {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Rng(h)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `data` cut into pieces of 1 to 16 bytes, at places derived from `data`: what a socket might
/// deliver. Together with byte-by-byte feeding it puts chunk boundaries everywhere.
pub fn chunks(data: &[u8]) -> Vec<&[u8]> {
    let mut rng = Rng::from_input(data);
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = (1 + rng.below(16)).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        out.push(piece);
        rest = tail;
    }
    out
}

/// `text` cut into pieces at character boundaries, at places derived from `text`; `max` bytes
/// at most per piece (1 gives one character a piece).
pub fn str_chunks(text: &str, max: usize) -> Vec<&str> {
    let mut rng = Rng::from_input(text.as_bytes());
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut n = (1 + rng.below(max.max(1))).min(rest.len());
        while !rest.is_char_boundary(n) {
            n += 1;
        }
        let (piece, tail) = rest.split_at(n);
        out.push(piece);
        rest = tail;
    }
    out
}

/// Whether two JSON values are equal, numbers compared as `f64` within a relative 1e-12: without
/// serde_json's `float_roundtrip` feature a float can come back from text one ulp away, which is
/// not a bug of the code under test.
pub fn json_same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x == y {
                return true;
            }
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_same(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_same(v, w)))
        }
        _ => a == b,
    }
}

/// Asserts that two serializable values say the same as JSON (see [`json_same`]).
#[track_caller]
pub fn assert_same_json<T: serde::Serialize + std::fmt::Debug>(a: &T, b: &T, what: &str) {
    let (x, y) = (serde_json::to_value(a).expect("serializes"), serde_json::to_value(b).expect("serializes"));
    assert!(json_same(&x, &y), "{what}:\n  first:  {x}\n  second: {y}");
}

/// Asserts that two canonical requests are the same, the Anthropic-only fields (which their JSON
/// form leaves out) included.
#[track_caller]
pub fn assert_same_request(a: &meridian::chat::ChatRequest, b: &meridian::chat::ChatRequest, what: &str) {
    assert_same_json(a, b, what);
    assert_same_json(&a.anthropic_extra, &b.anthropic_extra, what);
    let (mut a, mut b) = (a.clone(), b.clone());
    assert_same_json(&a.take_block_extras(), &b.take_block_extras(), what);
}
