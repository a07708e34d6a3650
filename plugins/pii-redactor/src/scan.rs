//! A hand-written, single-pass scanner for personal data and secrets.
//!
//! Every request runs in a fresh Wasm instance, so anything built at start-up (a compiled regex
//! costs ~200 µs) is paid per request; this scanner builds nothing and walks the text once. At each
//! byte it tries only the detectors whose first byte and left boundary fit, takes the longest
//! match starting there (ties go to the more specific entity), reports it and resumes after it:
//! leftmost-longest, so findings never overlap. Each detector looks ahead a bounded distance, or
//! starts only at the beginning of a run of its own characters, which keeps the whole scan linear.
//!
//! Some shapes are too weak to report alone: nine plain digits are as often an order id as a
//! social security number, `555-0132` as often an invoice number as a local phone number, and
//! `4155550132` as often an order id as a phone number written without separators.
//! Those are reported only after a context word, as production PII detectors do: a word such as
//! `SSN` or `call` that ends at most 24 bytes before the candidate (`after_context`). The
//! look-back covers a fixed number of bytes, compares in place with ASCII case folding, and runs
//! only for a candidate whose shape and validity rules already passed, so the scan stays linear
//! and allocates nothing.
//!
//! Every byte a detector accepts is ASCII, so findings start and end on UTF-8 character
//! boundaries whatever text surrounds them; non-ASCII characters count as separators, as they do
//! in CJK text written without spaces around numbers.

mod contact;
mod finance;
mod network;
mod secret;

/// A kind of value the scanner finds. Declared in alphabetical order of [`Entity::name`], so that
/// iterating in declaration order yields sorted labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entity {
    /// A payment card number (12–19 digits as its network issues them, Luhn-valid).
    Card,
    /// An e-mail address.
    Email,
    /// An international bank account number (mod-97 valid).
    Iban,
    /// An IPv4 address.
    Ipv4,
    /// An IPv6 address.
    Ipv6,
    /// A phone number, international (`+…`, `00…`) or in a common national format, with its
    /// extension; a 7-digit local number (`555-0132`) or a plain 9–12-digit run without a
    /// leading `0` (`4155550132`) only after a context word such as `call` or `phone`.
    Phone,
    /// An API key, access token, JWT or PEM private key.
    Secret,
    /// A US social security number: `AAA-GG-SSSS`, or written with spaces or no separators
    /// after a context word such as `SSN`.
    Ssn,
}

impl Entity {
    /// Every entity, in declaration (alphabetical) order.
    pub const ALL: [Entity; 8] = [
        Entity::Card,
        Entity::Email,
        Entity::Iban,
        Entity::Ipv4,
        Entity::Ipv6,
        Entity::Phone,
        Entity::Secret,
        Entity::Ssn,
    ];

    /// The entity's name in configs and redactions (`email`, `card`…).
    pub fn name(self) -> &'static str {
        match self {
            Entity::Card => "card",
            Entity::Email => "email",
            Entity::Iban => "iban",
            Entity::Ipv4 => "ipv4",
            Entity::Ipv6 => "ipv6",
            Entity::Phone => "phone",
            Entity::Secret => "secret",
            Entity::Ssn => "ssn",
        }
    }

    /// The label attached to a request that contains the entity and keeps it in the text
    /// (`pii.email`…); a redacted one gets this label with a `.redacted` suffix.
    pub fn label(self) -> &'static str {
        match self {
            Entity::Card => "pii.card",
            Entity::Email => "pii.email",
            Entity::Iban => "pii.iban",
            Entity::Ipv4 => "pii.ipv4",
            Entity::Ipv6 => "pii.ipv6",
            Entity::Phone => "pii.phone",
            Entity::Secret => "pii.secret",
            Entity::Ssn => "pii.ssn",
        }
    }

    /// The entity called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Entity> {
        Entity::ALL.into_iter().find(|e| e.name() == name)
    }

    /// The entity's position in [`Entity::ALL`], for per-entity tables.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One value found in a text: the bytes `start..end` hold an `entity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    /// Byte offset of the value's first byte (a character boundary).
    pub start: usize,
    /// Byte offset just past the value (a character boundary).
    pub end: usize,
    /// What the value is.
    pub entity: Entity,
}

/// Scans `text`, yielding its findings in order, without overlaps.
pub fn scan(text: &str) -> Scanner<'_> {
    let bytes = text.as_bytes();
    Scanner { bytes, pos: 0, next_at: find_at(bytes, 0) }
}

/// The iterator [`scan`] returns; it allocates nothing, so a caller that stops early (a block)
/// pays only for the text it read.
#[derive(Debug, Clone)]
pub struct Scanner<'a> {
    /// The text.
    bytes: &'a [u8],
    /// Where the scan resumes.
    pos: usize,
    /// Where the next `@` at or after `pos` is (the text's length if none): an address can start
    /// only within a local part's length of one, so most words skip the e-mail detector.
    next_at: usize,
}

impl Iterator for Scanner<'_> {
    type Item = Finding;

    fn next(&mut self) -> Option<Finding> {
        let b = self.bytes;
        while self.pos < b.len() {
            let start = self.pos;
            self.pos += 1;
            // Every detector needs a word boundary on the left, so the inside of a word (most of
            // any text) costs one test per byte. The letter of an escape (`\n`) starts nothing.
            if !word_start(b, start) || after_escape(b, start + 1) {
                continue;
            }
            if self.next_at < start {
                self.next_at = find_at(b, start);
            }
            let email = self.next_at - start <= contact::MAX_LOCAL;
            if let Some((end, entity)) = longest_at(b, start, email) {
                self.pos = end;
                return Some(Finding { start, end, entity });
            }
        }
        None
    }
}

/// The position of the first `@` at or after `from`, or the length of `b`.
fn find_at(b: &[u8], from: usize) -> usize {
    b[from..].iter().position(|&c| c == b'@').map_or(b.len(), |k| from + k)
}

/// The longest value starting at `i` (just after a word boundary), if any; `email` says whether
/// an `@` is near enough for an address. Detectors are offered in order of specificity, and a
/// later one replaces the best so far only when strictly longer. The phone detector, the last
/// and costliest (its weak shapes look back for a context word), is told the end to beat, so
/// that it does not check shapes that could not win (the first 12 digits of a card).
fn longest_at(b: &[u8], i: usize, email: bool) -> Option<(usize, Entity)> {
    let mut best: Option<(usize, Entity)> = None;
    let mut offer = |end: Option<usize>, entity: Entity| {
        if let Some(end) = end {
            if best.is_none_or(|(e, _)| end > e) {
                best = Some((end, entity));
            }
        }
        best.map_or(0, |(e, _)| e)
    };
    match b[i] {
        b'0'..=b'9' => {
            offer(finance::card(b, i), Entity::Card);
            offer(finance::ssn(b, i), Entity::Ssn);
            if email {
                offer(contact::email(b, i), Entity::Email);
            }
            offer(network::ipv6(b, i), Entity::Ipv6);
            let beat = offer(network::ipv4(b, i), Entity::Ipv4);
            offer(contact::phone(b, i, beat), Entity::Phone);
            offer(contact::local_phone(b, i), Entity::Phone);
        }
        b'A'..=b'Z' | b'a'..=b'z' => {
            offer(secret::token(b, i), Entity::Secret);
            offer(finance::iban(b, i), Entity::Iban);
            if email {
                offer(contact::email(b, i), Entity::Email);
            }
            if b[i].is_ascii_hexdigit() {
                offer(network::ipv6(b, i), Entity::Ipv6);
            }
        }
        b'_' if email => {
            offer(contact::email(b, i), Entity::Email);
        }
        b'-' => {
            offer(secret::pem(b, i), Entity::Secret);
        }
        b'+' | b'(' => {
            offer(contact::phone(b, i, 0), Entity::Phone);
        }
        b':' => {
            offer(network::ipv6(b, i), Entity::Ipv6);
        }
        _ => {}
    }
    best
}

/// Whether `c` continues a word: a value next to one is part of a longer token.
fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Whether `b[i]` is at the start of a word.
fn word_start(b: &[u8], i: usize) -> bool {
    i == 0 || !is_word(b[i - 1]) || after_escape(b, i)
}

/// Whether `b[i]` follows an escaped newline or tab (`\n`, `\r`, `\t`), which separates words
/// like the whitespace it stands for: tool arguments are JSON, and pasted code has such escapes.
fn after_escape(b: &[u8], i: usize) -> bool {
    i >= 2 && b[i - 2] == b'\\' && matches!(b[i - 1], b'n' | b'r' | b't')
}

/// Whether a word ends just before `b[e]`.
fn word_end(b: &[u8], e: usize) -> bool {
    b.get(e).is_none_or(|&c| !is_word(c))
}

/// Whether `b[i]` is a digit.
fn digit_at(b: &[u8], i: usize) -> bool {
    b.get(i).is_some_and(u8::is_ascii_digit)
}

/// Whether a numeric value may start at `i`: at a word start, and not the tail of a longer
/// number or an id: not right after `1.`, `1-` or `A-` (a version, a UUID, a date, an invoice
/// number such as `INV-0431-810665`), nor after a space that
/// follows a short group with a digit (`DE89 3704 0044 0532…`, `4111 1111 …` whose checksum
/// failed as a whole).
fn num_start(b: &[u8], i: usize) -> bool {
    if !word_start(b, i) {
        return false;
    }
    if i < 2 {
        return true;
    }
    match b[i - 1] {
        b'.' => !b[i - 2].is_ascii_digit(),
        b'-' => !b[i - 2].is_ascii_alphanumeric(),
        b' ' => {
            let group = b[..i - 1].iter().rev().take(5).take_while(|c| c.is_ascii_alphanumeric());
            let (len, digits) = group.fold((0, false), |(n, d), c| (n + 1, d || c.is_ascii_digit()));
            !(len <= 4 && digits)
        }
        _ => true,
    }
}

/// Whether a numeric value may end just before `b[e]`: at a word end, and not followed by `.1`
/// or `-1`, which would make it the head of a longer number.
fn num_end(b: &[u8], e: usize) -> bool {
    word_end(b, e) && !(matches!(b.get(e), Some(b'.' | b'-')) && digit_at(b, e + 1))
}

/// Where the run of bytes satisfying `class` that starts at `i` ends, looking at most `max + 1`
/// bytes ahead (so a caller can tell a run longer than `max`).
fn run_end(b: &[u8], i: usize, max: usize, class: impl Fn(u8) -> bool) -> usize {
    let limit = b.len().min(i.saturating_add(max + 1));
    let mut p = i;
    while p < limit && class(b[p]) {
        p += 1;
    }
    p
}

/// The most bytes between the end of a context word and the weak candidate it vouches for:
/// room for a few short words (`SSN on file: `, `call me at `, `social security number is `).
const CONTEXT_GAP: usize = 24;

/// Whether one of `words` ends at most [`CONTEXT_GAP`] bytes before `b[i]`, so that a weak
/// candidate starting at `i` counts as a finding. Words are lowercase ASCII and match whole
/// (ASCII case-insensitive), on word boundaries, with an optional plural `s` (`SSNs`); a space
/// in a word also matches `-` or `_` (`social_security`). A boundary is any place not between
/// two letters, or a camel-case hump (`customerSsn`, `phoneNumber`), so keys in code count too.
///
/// Reads at most `CONTEXT_GAP` plus the longest word's length bytes back from `i`, and
/// allocates nothing: a constant cost, paid only by candidates that are valid otherwise. Only
/// the words whose first letter is at a word boundary there are compared, so the cost grows
/// with the window, not with the window times the list.
fn after_context(b: &[u8], i: usize, words: &[&str]) -> bool {
    let longest = words.iter().map(|w| w.len()).max().unwrap_or(0);
    (i.saturating_sub(CONTEXT_GAP + longest)..i).any(|s| {
        let first = b[s].to_ascii_lowercase();
        context_boundary(b, s)
            && words.iter().any(|w| {
                let w = w.as_bytes();
                let e = s + w.len();
                w[0] == first && e <= i && i - e <= CONTEXT_GAP && context_word_at(b, s, w, i)
            })
    })
}

/// Whether the context word `w` is written at `b[s]`, whole, ending at or before `limit`.
fn context_word_at(b: &[u8], s: usize, w: &[u8], limit: usize) -> bool {
    let e = s + w.len();
    let same = b[s..e].iter().zip(w).all(|(&c, &k)| {
        if k == b' ' {
            matches!(c, b' ' | b'-' | b'_')
        } else {
            c.to_ascii_lowercase() == k
        }
    });
    let ends = context_boundary(b, e) || (e < limit && matches!(b[e], b's' | b'S') && context_boundary(b, e + 1));
    same && context_boundary(b, s) && ends
}

/// Whether a context word may start or end before `b[k]`: not between two letters, unless at a
/// camel-case hump (a lowercase letter followed by an uppercase one).
fn context_boundary(b: &[u8], k: usize) -> bool {
    if k == 0 || k >= b.len() {
        return true;
    }
    let (x, y) = (b[k - 1], b[k]);
    !(x.is_ascii_alphabetic() && y.is_ascii_alphabetic()) || (x.is_ascii_lowercase() && y.is_ascii_uppercase())
}
