//! Incremental detokenisation and stop strings.
//!
//! [`TokenBytes`] maps every token id to the bytes it stands for (byte-level BPE tokens can end in
//! the middle of a UTF-8 character). [`Detokenizer`] appends a token's bytes and emits only whole
//! characters, holding an incomplete tail for the next token. [`StopMatcher`] holds back text that
//! could be the start of a stop string and cuts the answer where one appears.

use std::collections::HashMap;
use std::sync::Arc;

use tokenizers::{DecoderWrapper, Tokenizer};

/// The bytes of every token, by id. Special tokens (`<|im_end|>`, …) are empty, as with
/// `skip_special_tokens`.
#[derive(Debug, Clone, Default)]
pub struct TokenBytes {
    bytes: Vec<Vec<u8>>,
}

/// GPT-2's byte ↔ printable-character table, inverted: char → byte.
fn byte_level_decoder() -> HashMap<char, u8> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter().zip(cs).map(|(b, c)| (char::from_u32(c).expect("valid"), b as u8)).collect()
}

enum Style {
    ByteLevel,
    SentencePiece,
    Other,
}

impl TokenBytes {
    /// Builds the table from a tokenizer's vocabulary and decoder.
    pub fn new(tokenizer: &Tokenizer) -> TokenBytes {
        let style = match tokenizer.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => Style::ByteLevel,
            Some(DecoderWrapper::Sequence(_))
            | Some(DecoderWrapper::Metaspace(_))
            | Some(DecoderWrapper::ByteFallback(_)) => Style::SentencePiece,
            _ => Style::Other,
        };
        let vocab = tokenizer.get_vocab(true);
        let size = vocab.values().copied().max().map_or(0, |m| m as usize + 1);
        let mut bytes = vec![Vec::new(); size];
        let added = tokenizer.get_added_tokens_decoder();
        let bl = byte_level_decoder();
        for (token, id) in vocab {
            let b = match added.get(&id) {
                Some(t) if t.special => Vec::new(),
                Some(t) => t.content.as_bytes().to_vec(),
                None => match style {
                    Style::ByteLevel => token.chars().filter_map(|c| bl.get(&c).copied()).collect(),
                    Style::SentencePiece => sentencepiece_bytes(&token),
                    Style::Other => tokenizer.decode(&[id], true).unwrap_or_default().into_bytes(),
                },
            };
            bytes[id as usize] = b;
        }
        TokenBytes { bytes }
    }

    /// A table from explicit byte strings (tests).
    pub fn from_vec(bytes: Vec<Vec<u8>>) -> TokenBytes {
        TokenBytes { bytes }
    }

    /// The bytes of `id` (empty for an unknown id).
    pub fn get(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], |b| b.as_slice())
    }
}

fn sentencepiece_bytes(token: &str) -> Vec<u8> {
    if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return vec![b];
        }
    }
    token.replace('\u{2581}', " ").into_bytes()
}

/// Turns tokens into text deltas that never split a UTF-8 character.
#[derive(Debug)]
pub struct Detokenizer {
    table: Arc<TokenBytes>,
    pending: Vec<u8>,
}

impl Detokenizer {
    /// A detokenizer over `table`.
    pub fn new(table: Arc<TokenBytes>) -> Detokenizer {
        Detokenizer { table, pending: Vec::new() }
    }

    /// The text `id` completes (possibly empty while a character is incomplete).
    pub fn push(&mut self, id: u32) -> String {
        self.pending.extend_from_slice(self.table.get(id));
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[start..start + valid]).expect("valid prefix"));
                    start += valid;
                    match e.error_len() {
                        // Invalid bytes will never become valid: replace them and go on.
                        Some(n) => {
                            out.push('\u{FFFD}');
                            start += n;
                        }
                        // An incomplete character at the end: wait for the next token.
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// What is left at the end of generation (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

/// Finds stop strings in streamed text.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// The result of [`StopMatcher::push`].
#[derive(Debug, PartialEq, Eq)]
pub struct Matched {
    /// Text safe to send.
    pub emit: String,
    /// A stop string was found: `emit` ends right before it and generation ends.
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new() }
    }

    /// Adds `text`; returns what can be sent.
    pub fn push(&mut self, text: &str) -> Matched {
        if self.stops.is_empty() {
            return Matched { emit: text.to_string(), stopped: false };
        }
        self.held.push_str(text);
        if let Some(pos) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let mut emit = std::mem::take(&mut self.held);
            emit.truncate(pos);
            return Matched { emit, stopped: true };
        }
        // Hold the longest tail that is a proper prefix of some stop string.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.len() > tail.len() && s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let rest = self.held.split_off(keep_from);
        Matched { emit: std::mem::replace(&mut self.held, rest), stopped: false }
    }

    /// The text held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(tokens: &[&[u8]]) -> Arc<TokenBytes> {
        Arc::new(TokenBytes::from_vec(tokens.iter().map(|t| t.to_vec()).collect()))
    }

    #[test]
    fn emoji_split_over_tokens() {
        let e = "😀".as_bytes(); // F0 9F 98 80
        let t = table(&[b"Hi ", &e[..1], &e[1..3], &e[3..], b"!"]);
        let mut d = Detokenizer::new(t);
        assert_eq!(d.push(0), "Hi ");
        assert_eq!(d.push(1), "");
        assert_eq!(d.push(2), "");
        assert_eq!(d.push(3), "😀");
        assert_eq!(d.push(4), "!");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn invalid_and_truncated_bytes() {
        let t = table(&[b"a\xFFb", b"\xE2\x82"]);
        let mut d = Detokenizer::new(t);
        assert_eq!(d.push(0), "a\u{FFFD}b");
        assert_eq!(d.push(1), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }

    #[test]
    fn byte_level_table_roundtrip() {
        let m = byte_level_decoder();
        assert_eq!(m.len(), 256);
        assert_eq!(m[&'Ġ'], b' ');
        assert_eq!(m[&'Ċ'], b'\n');
        assert_eq!(m[&'a'], b'a');
        assert_eq!(sentencepiece_bytes("<0xE2>"), vec![0xE2]);
        assert_eq!(sentencepiece_bytes("\u{2581}the"), b" the".to_vec());
    }

    #[test]
    fn stop_string_split_over_tokens() {
        let mut s = StopMatcher::new(&["END".to_string()]);
        assert_eq!(s.push("Hello E"), Matched { emit: "Hello ".into(), stopped: false });
        assert_eq!(s.push("N"), Matched { emit: "".into(), stopped: false });
        assert_eq!(s.push("Dless"), Matched { emit: "".into(), stopped: true });
    }

    #[test]
    fn false_start_is_released() {
        let mut s = StopMatcher::new(&["END".to_string(), "\n\n".to_string()]);
        assert_eq!(s.push("EN"), Matched { emit: "".into(), stopped: false });
        assert_eq!(s.push("x\n"), Matched { emit: "ENx".into(), stopped: false });
        assert_eq!(s.push("y"), Matched { emit: "\ny".into(), stopped: false });
        assert_eq!(s.push("E"), Matched { emit: "".into(), stopped: false });
        assert_eq!(s.finish(), "E");
    }

    #[test]
    fn earliest_stop_wins_and_multibyte() {
        let mut s = StopMatcher::new(&["é!".to_string(), "b".to_string()]);
        assert_eq!(s.push("aé"), Matched { emit: "a".into(), stopped: false });
        assert_eq!(s.push("!b"), Matched { emit: "".into(), stopped: true });
        let mut none = StopMatcher::new(&[]);
        assert_eq!(none.push("abc").emit, "abc");
    }
}
