//! Secrets: API keys and tokens with a recognisable prefix, JWTs and PEM private keys.

use super::{after_escape, run_end, word_end};

/// Whether `c` may appear in a key after its prefix (and in base64url).
fn is_key_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

/// Longest token considered; real ones are far shorter, and the bound keeps a pathological run
/// from being read again by every detector.
const MAX_TOKEN: usize = 16 * 1024;

/// A prefixed key or a JWT starting at `i`; returns its end.
pub(super) fn token(b: &[u8], i: usize) -> Option<usize> {
    // Keys are read as whole runs of key characters, so they may only start where one begins
    // (`task-sk-…` is not a key; neither is the tail of a longer base64 string).
    if i > 0 && (is_key_char(b[i - 1]) || b[i - 1] == b'.') && !after_escape(b, i) {
        return None;
    }
    let rest = &b[i..];
    if rest.starts_with(b"sk-") {
        // OpenAI (`sk-…`, `sk-proj-…`) and Anthropic (`sk-ant-…`) keys.
        let end = run_end(b, i + 3, MAX_TOKEN, is_key_char);
        return (end - i - 3 >= 20 && mixed(&b[i + 3..end])).then_some(end);
    }
    if rest.starts_with(b"AKIA") || rest.starts_with(b"ASIA") {
        // AWS access key ids (long-term and temporary).
        let end = run_end(b, i + 4, 16, |c| c.is_ascii_uppercase() || c.is_ascii_digit());
        return (end - i == 20 && word_end(b, end)).then_some(end);
    }
    if rest.starts_with(b"github_pat_") {
        // GitHub fine-grained tokens.
        let end = run_end(b, i + 11, MAX_TOKEN, |c| c.is_ascii_alphanumeric() || c == b'_');
        return (end - i - 11 >= 22).then_some(end);
    }
    if rest.len() > 4
        && rest.starts_with(b"gh")
        && matches!(rest[2], b'p' | b'o' | b's' | b'u' | b'r')
        && rest[3] == b'_'
    {
        // GitHub personal, OAuth, server, user and refresh tokens (36 characters today).
        let end = run_end(b, i + 4, MAX_TOKEN, |c| c.is_ascii_alphanumeric());
        return (end - i - 4 >= 30 && word_end(b, end)).then_some(end);
    }
    if rest.len() > 5
        && rest.starts_with(b"xox")
        && matches!(rest[3], b'a' | b'b' | b'p' | b'r' | b's')
        && rest[4] == b'-'
    {
        // Slack bot, user, app, refresh and session tokens.
        let end = run_end(b, i + 5, MAX_TOKEN, |c| c.is_ascii_alphanumeric() || c == b'-');
        return (end - i - 5 >= 10 && mixed(&b[i + 5..end]) && word_end(b, end)).then_some(end);
    }
    if rest.starts_with(b"eyJ") {
        return jwt(b, i);
    }
    None
}

/// Whether a key body has both letters and digits, as generated keys do and prose
/// (`sk-this-is-not-a-key-at-all`) does not.
fn mixed(s: &[u8]) -> bool {
    s.iter().any(u8::is_ascii_digit) && s.iter().any(u8::is_ascii_alphabetic)
}

/// A JSON Web Token at `i`: three base64url parts separated by dots, the first (the header)
/// starting `eyJ` (`{"`); header and payload of at least 10 characters, a signature of at least
/// 16. Returns its end.
fn jwt(b: &[u8], i: usize) -> Option<usize> {
    let mut p = i;
    for (k, min) in [10, 10, 16].into_iter().enumerate() {
        if k > 0 {
            if b.get(p) != Some(&b'.') {
                return None;
            }
            p += 1;
        }
        let e = run_end(b, p, MAX_TOKEN, is_key_char);
        if e - p < min || e - p > MAX_TOKEN {
            return None;
        }
        p = e;
    }
    Some(p)
}

/// A PEM private key block starting at `i`: from `-----BEGIN … PRIVATE KEY-----` to the
/// matching END line, or to the end of the text when that line is missing (a truncated key is
/// still a key, and a streamed answer shows the BEGIN line long before the END one). Returns its
/// end.
pub(super) fn pem(b: &[u8], i: usize) -> Option<usize> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    if !b[i..].starts_with(BEGIN) || (i > 0 && b[i - 1] == b'-') {
        return None;
    }
    let label_start = i + BEGIN.len();
    let label_end = run_end(b, label_start, 64, |c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b' ');
    let label = &b[label_start..label_end];
    if !label.ends_with(b"PRIVATE KEY") || !b[label_end..].starts_with(b"-----") {
        return None;
    }
    let body = label_end + 5;
    let end = find_end_line(&b[body..], label).map_or(b.len(), |e| body + e);
    Some(end)
}

/// Where the line `-----END <label>-----` ends in `s`, if it is there.
fn find_end_line(s: &[u8], label: &[u8]) -> Option<usize> {
    const END: &[u8] = b"-----END ";
    let mut from = 0;
    while let Some(k) = s[from..].windows(END.len()).position(|w| w == END) {
        let at = from + k + END.len();
        if s[at..].starts_with(label) && s[at + label.len()..].starts_with(b"-----") {
            return Some(at + label.len() + 5);
        }
        from = at;
    }
    None
}
