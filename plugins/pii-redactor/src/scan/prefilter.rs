//! The scan's prefilter: the word starts among eight bytes, computed eight bytes at a time in a
//! `u64` (word-at-a-time: portable, and as fast in a Wasm guest without SIMD).
//!
//! A mask here has one bit per byte, the byte's high bit (`0x80 << 8 * k` for the `k`-th byte).
//! The masks are supersets: the scanner checks each position kept exactly ([`super::is_start`])
//! before offering it to the detectors, so the prefilter only has to never drop a position where
//! a value could start.

/// `0x01` in every byte.
const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
/// `0x80` in every byte: the bits of a mask.
const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);

/// The bytes of `v` (each below `0x80`) between `lo` and `hi` inclusive. Each byte's sums stay
/// below `0x100`, so no carry crosses into the next byte.
#[inline(always)]
fn range(v: u64, lo: u8, hi: u8) -> u64 {
    let at_least = v + ONES * u64::from(0x80 - lo);
    let above = v + ONES * u64::from(0x7f - hi);
    at_least & !above & HIGHS
}

/// The bytes of `v` (each below `0x80`) equal to `c`: `v ^ c` is zero there, and adding `0x7f`
/// to it sets the high bit everywhere else (without a carry into the next byte).
#[inline(always)]
fn equal(v: u64, c: u8) -> u64 {
    !((v ^ (ONES * u64::from(c))) + ONES * 0x7f) & HIGHS
}

/// The positions among `b[k..k + 8]` where a value may start: a byte that can begin one (an
/// ASCII letter, digit or punctuation from `(` on) not right after an ASCII letter or digit
/// (nor, for `b[k]`, after `_`; a position after a `_` inside the block is kept, and the scanner
/// turns it away). A word starts inside a word only after an escape (`\nfoo`): if `escapes` (a
/// `\` is among `b[k - 2..k + 6]`), every position that can begin a value is kept.
///
/// Unless `any_letter`, letters that begin no detector's value are dropped as well: a lowercase
/// letter other than `e`, `f`, `g`, `s` or `x` (`eyJ`, `github_`/`gh?_`, `sk-`, `xox?-`), and a
/// capital not followed by another (`AKIA`, an IBAN's country code). `any_letter` is for bytes
/// where an e-mail or IPv6 address may start, which many more letters can begin.
/// `b` has at least `k + 8` bytes.
#[inline(always)]
pub(super) fn starts(b: &[u8], k: usize, escapes: bool, any_letter: bool) -> u64 {
    let x = u64::from_le_bytes(b[k..k + 8].try_into().expect("eight bytes"));
    let ascii = !x & HIGHS;
    let v = x & !HIGHS;
    // Letters of either case: `| 0x20` folds `A-Z` onto `a-z` (and no other byte onto them).
    let letter = range(v | (ONES * 0x20), b'a', b'z') & ascii;
    let word = letter | (range(v, b'0', b'9') & ascii);
    let mut begins = (v + ONES * u64::from(0x80 - b'(')) & ascii;
    if !any_letter {
        // A letter is lowercase when its bit 5 (moved to bit 7 here) is set.
        let lower = letter & (v << 2);
        let upper = letter & !lower;
        let key_head = range(v, b'e', b'g') | equal(v, b's') | equal(v, b'x');
        // The last byte's successor is outside these eight: it may be a capital.
        let upper_next = (upper >> 8) | (0x80 << 56);
        begins &= !(lower & !key_head) & !(upper & !upper_next);
    }
    if escapes {
        return begins;
    }
    let before = k > 0 && super::is_word(b[k - 1]);
    let after_word = (word << 8) | u64::from(before) << 7;
    begins & !after_word
}
