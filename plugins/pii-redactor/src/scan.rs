//! A hand-written, single-pass scanner for personal data and secrets.
//!
//! Every request runs in a fresh Wasm instance, so anything built at start-up (a compiled regex
//! costs ~200 µs) is paid per request; this scanner builds nothing and walks the text once. At each
//! byte it tries only the detectors whose first byte and left boundary fit, takes the longest
//! match starting there (ties go to the more specific entity), reports it and resumes after it:
//! leftmost-longest, so findings never overlap. Each detector looks ahead a bounded distance, or
//! starts only at the beginning of a run of its own characters, which keeps the whole scan linear.
//!
//! Most bytes start nothing, so the scan skips them eight at a time (`prefilter`): it keeps the
//! word starts, and of the words of prose only those whose first letters begin a key or an IBAN,
//! or that lie just before an `@` or a `:` (found by a word-at-a-time search, not per byte).
//! Each detector is then called only when the first bytes have the shape it needs (the length
//! of a digit run, the byte after it): conditions it checks itself first, so the results are
//! those of trying every detector at every word start, at a fraction of the cost.
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
mod prefilter;
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

/// What every secret the scanner finds starts with: the prefixed keys' and tokens' prefixes, a
/// JWT's `eyJ` and a PEM block's BEGIN line. A filter that looks for secrets only in answers
/// declares them as its answer triggers, so that the host calls it only for answers that hold
/// one (`tests/scan.rs` checks every secret found against them).
pub const SECRET_TRIGGERS: &[&str] = &[
    "sk-",
    "AKIA",
    "ASIA",
    "github_pat_",
    "ghp_",
    "gho_",
    "ghs_",
    "ghu_",
    "ghr_",
    "xoxa-",
    "xoxb-",
    "xoxp-",
    "xoxr-",
    "xoxs-",
    "eyJ",
    "-----BEGIN ",
];

/// What every finding contains, whatever its entity: a digit (cards, phone numbers, IBANs, SSNs,
/// IPv4 addresses), an `@` (e-mail addresses), a `:` (IPv6 addresses) or a secret's prefix
/// ([`SECRET_TRIGGERS`]). The filter declares them as its request triggers, so that the host
/// calls it only for requests that hold one: a text without any has no finding, which the
/// scanner tests check on every text they scan, generated ones included.
pub const REQUEST_TRIGGERS: &[&str] =
    &joined::<{ NON_SECRET_TRIGGERS.len() + SECRET_TRIGGERS.len() }>(NON_SECRET_TRIGGERS, SECRET_TRIGGERS);

/// What every finding other than a secret holds (see [`REQUEST_TRIGGERS`]).
const NON_SECRET_TRIGGERS: &[&str] = &["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "@", ":"];

/// `a` then `b`, as one array of `N` (their lengths' sum).
const fn joined<const N: usize>(a: &[&'static str], b: &[&'static str]) -> [&'static str; N] {
    let mut out = [""; N];
    let mut i = 0;
    while i < a.len() {
        out[i] = a[i];
        i += 1;
    }
    while i < N {
        out[i] = b[i - a.len()];
        i += 1;
    }
    out
}

/// Scans `text`, yielding its findings in order, without overlaps.
pub fn scan(text: &str) -> Scanner<'_> {
    let bytes = text.as_bytes();
    let next_at = find_byte(bytes, 0, b'@');
    let next_mark = find_mark(bytes, 0);
    Scanner { bytes, pos: 0, next_at, local_from: local_start(bytes, next_at), next_mark }
}

/// The iterator [`scan`] returns; it allocates nothing, so a caller that stops early (a block)
/// pays only for the text it read.
#[derive(Debug, Clone)]
pub struct Scanner<'a> {
    /// The text.
    bytes: &'a [u8],
    /// Where the scan resumes.
    pos: usize,
    /// Where the next `@` at or after `pos` is (the text's length if none).
    next_at: usize,
    /// Where the run of local-part characters that ends at `next_at` starts, at most
    /// [`contact::MAX_LOCAL`] bytes before it (the text's length if there is no `@`): an address
    /// can start only there or inside that run, so every other word skips the e-mail detector.
    local_from: usize,
    /// Where the next `:` or `\` at or after `pos - 2` is (the text's length if none). An
    /// IPv6 address needs a `:` within its first five bytes, so away from one most words and
    /// numbers skip that detector; and only two bytes after a `\` can a word start inside a
    /// word (`\nfoo`). One search serves both, as both bytes are rare in prose.
    next_mark: usize,
}

impl Iterator for Scanner<'_> {
    type Item = Finding;

    fn next(&mut self) -> Option<Finding> {
        let b = self.bytes;
        while let Some(start) = self.next_start() {
            self.pos = start + 1;
            self.near_to(start);
            let near = Near { email: start >= self.local_from, colon: self.next_mark < start + 5 };
            if let Some((end, entity)) = longest_at(b, start, near) {
                self.pos = end;
                return Some(Finding { start, end, entity });
            }
        }
        self.pos = b.len();
        None
    }
}

impl Scanner<'_> {
    /// Moves `next_at` (with `local_from`) to the first `@` at or after `k`, and `next_mark`
    /// to the first `:` or `\` at or after `k - 2`, if they are behind.
    #[inline(always)]
    fn near_to(&mut self, k: usize) {
        if self.next_at < k {
            self.next_at = find_byte(self.bytes, k, b'@');
            self.local_from = local_start(self.bytes, self.next_at);
        }
        if self.next_mark.saturating_add(2) < k {
            self.next_mark = find_mark(self.bytes, k - 2);
        }
    }

    /// The first position at or after `pos` where a value may start ([`is_start`]) and whose
    /// first bytes some detector accepts. Eight bytes at a time, [`prefilter::starts`] keeps the
    /// positions at a word start, so the inside of words and the spaces between them cost a few
    /// operations per eight bytes; each position kept is then checked exactly, and one that
    /// starts with a letter is kept only if it begins a key or an IBAN ([`letter_head`]) or lies
    /// where an e-mail or IPv6 address may start (near an `@` or a `:`), which leaves out most
    /// words of prose.
    fn next_start(&mut self) -> Option<usize> {
        let b = self.bytes;
        let mut k = self.pos;
        while k + 8 <= b.len() {
            self.near_to(k);
            // An address may start in `local_from..next_at`, or past `next_at` in the run before
            // the `@` after it; a `:` within five bytes of any of these eight lets an IPv6
            // address start with any hex letter; a `\` two bytes before one may start a word.
            let any_letter = self.local_from < k + 8 || self.next_mark < k + 12;
            let mut cand = prefilter::starts(b, k, self.next_mark < k + 6, any_letter);
            while cand != 0 {
                let j = k + (cand.trailing_zeros() / 8) as usize;
                cand &= cand - 1;
                if is_start(b, j) && (any_letter || !b[j].is_ascii_alphabetic() || letter_head(b, j)) {
                    return Some(j);
                }
            }
            k += 8;
        }
        (k..b.len()).find(|&j| is_start(b, j))
    }
}

/// Whether a key or an IBAN may start at the letter `b[j]`: `sk-`, `AKIA`, `ASIA`,
/// `github_pat_`, `gh?_`, `xox?-`, `eyJ`, or two capitals (a country code).
fn letter_head(b: &[u8], j: usize) -> bool {
    let (c0, c1) = (b[j], b.get(j + 1).copied().unwrap_or(0));
    token_head(c0, c1) || (c0.is_ascii_uppercase() && c1.is_ascii_uppercase())
}

/// Whether a value may start at `b[j]`: a [`START`] byte at a word start ([`word_start`]) that
/// is not the letter of an escape (`\n`); every detector needs a word boundary on its left.
fn is_start(b: &[u8], j: usize) -> bool {
    CLASS[usize::from(b[j])] & START != 0 && word_start(b, j) && !after_escape(b, j + 1)
}

/// A byte that continues a word ([`is_word`]).
const WORD: u8 = 1;
/// A byte some detector's value can begin with: a letter, a digit, `_`, `-`, `+`, `(` or `:`.
const START: u8 = 2;

/// The class bits ([`WORD`], [`START`]) of every byte.
static CLASS: [u8; 256] = classes();

/// Builds [`CLASS`].
const fn classes() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let x = c as u8;
        if x.is_ascii_alphanumeric() || x == b'_' {
            t[c] = WORD | START;
        } else if matches!(x, b'-' | b'+' | b'(' | b':') {
            t[c] = START;
        }
        c += 1;
    }
    t
}

/// The position of the first `needle` at or after `from`, or the length of `b`. Reads eight
/// bytes at a time (a portable word-at-a-time search: the Wasm build has no SIMD), so the rare
/// bytes it looks for cost little more than a pass over the text between them.
fn find_byte(b: &[u8], from: usize, needle: u8) -> usize {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let pattern = ONES * u64::from(needle);
    let mut i = from;
    while let Some(chunk) = b.get(i..i + 8) {
        let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes")) ^ pattern;
        // The lowest byte flagged here is the first zero byte of `x` (higher flags may be
        // borrows, never lower ones).
        let zeros = x.wrapping_sub(ONES) & !x & HIGHS;
        if zeros != 0 {
            return i + (zeros.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    b[i.min(b.len())..].iter().position(|&c| c == needle).map_or(b.len(), |k| i + k)
}

/// The position of the first `:` or `\` at or after `from`, or the length of `b`; eight bytes
/// at a time, like [`find_byte`].
fn find_mark(b: &[u8], from: usize) -> usize {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let zeros = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut i = from;
    while let Some(chunk) = b.get(i..i + 8) {
        let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        // The lowest byte flagged in either mask is a real match (see `find_byte`).
        let found = zeros(x ^ (ONES * u64::from(b':'))) | zeros(x ^ (ONES * u64::from(b'\\')));
        if found != 0 {
            return i + (found.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    b[i.min(b.len())..].iter().position(|&c| matches!(c, b':' | b'\\')).map_or(b.len(), |k| i + k)
}

/// Where an address whose `@` is at `at` can start at the earliest: the start of the run of
/// local-part characters before it, at most [`contact::MAX_LOCAL`] bytes back; the text's length
/// when `at` is (no `@`). An address at `i` needs every byte of `i..at` in its local part.
fn local_start(b: &[u8], at: usize) -> usize {
    if at >= b.len() {
        return b.len();
    }
    let lowest = at.saturating_sub(contact::MAX_LOCAL);
    let mut j = at;
    while j > lowest && contact::is_local(b[j - 1]) {
        j -= 1;
    }
    j
}

/// What lies near a position, as far as the rare bytes some detectors need go.
#[derive(Clone, Copy)]
struct Near {
    /// An address may start here (see [`Scanner::local_from`]).
    email: bool,
    /// A `:` may be among the five bytes from here, as an IPv6 address needs (false only when
    /// there is none).
    colon: bool,
}

/// Whether a prefixed key or a JWT may start with `c0`, `c1` (`sk-`, `AKIA`, `ASIA`,
/// `github_pat_`, `gh?_`, `xox?-`, `eyJ`): most words are turned away before [`secret::token`].
fn token_head(c0: u8, c1: u8) -> bool {
    matches!((c0, c1), (b's', b'k') | (b'A', b'K' | b'S') | (b'g', b'i' | b'h') | (b'x', b'o') | (b'e', b'y'))
}

/// The longest value found so far at one position, and its end.
#[derive(Default)]
struct Best(Option<(usize, Entity)>);

impl Best {
    /// Keeps `end` if it is strictly longer than the best so far.
    fn offer(&mut self, end: Option<usize>, entity: Entity) {
        if let Some(end) = end {
            if self.0.is_none_or(|(e, _)| end > e) {
                self.0 = Some((end, entity));
            }
        }
    }

    /// The end of the best so far, or 0.
    fn end(&self) -> usize {
        self.0.map_or(0, |(e, _)| e)
    }
}

/// The longest value starting at `i` (just after a word boundary), if any; `near` says whether
/// an address may start here and whether a `:` may be close enough for an IPv6 address.
/// Detectors are offered in order of specificity, and a later one replaces the best so far only
/// when strictly longer. The phone detector, the last and costliest (its weak shapes look back
/// for a context word), is told the end to beat, so that it does not check shapes that could not
/// win (the first 12 digits of a card).
///
/// Each detector is called only when the first bytes have the shape it needs (the length of the
/// digit run here and the byte after it, the first two letters): these gates are conditions
/// every detector checks itself first, so they change no result, only skip calls that would
/// fail.
fn longest_at(b: &[u8], i: usize, near: Near) -> Option<(usize, Entity)> {
    let mut best = Best::default();
    let c0 = b[i];
    let c1 = b.get(i + 1).copied().unwrap_or(0);
    match c0 {
        b'0'..=b'9' => {
            // The digit run at `i` (20 means longer than any value's first group) and what follows.
            let len = run_end(b, i, 19, |c| c.is_ascii_digit()) - i;
            let after = b.get(i + len).copied().unwrap_or(0);
            // A card has 12 digits or more: in its first group, or in groups after it.
            let more = matches!(after, b' ' | b'-') && digit_at(b, i + len + 1);
            if matches!(c0, b'1'..=b'6') && (3..=19).contains(&len) && (len >= 12 || more) {
                best.offer(finance::card(b, i), Entity::Card);
            }
            if (len == 3 && matches!(after, b'-' | b' ')) || len == 9 {
                best.offer(finance::ssn(b, i), Entity::Ssn);
            }
            if near.email {
                best.offer(contact::email(b, i), Entity::Email);
            }
            if near.colon {
                best.offer(network::ipv6(b, i), Entity::Ipv6);
            }
            if len <= 3 && after == b'.' {
                best.offer(network::ipv4(b, i), Entity::Ipv4);
            }
            // A phone number opens with 9–13 digits, or with a group of at most five and more
            // groups after it (a single short group is no phone shape); and a card number (the
            // longest value so far, usually) is beaten only by a phone number read on past it,
            // into another group or an extension (its groups are the card's up to its end).
            let phone_shape = (len <= 5 && contact::next_group(b, i + len)) || (9..=13).contains(&len);
            let past_card = match best.0 {
                Some((end, Entity::Card)) => contact::next_group(b, end) || contact::extension(b, end).is_some(),
                _ => true,
            };
            if phone_shape && past_card {
                best.offer(contact::phone(b, i, best.end()), Entity::Phone);
            }
            if len == 3 && c0 >= b'2' && matches!(after, b'-' | b' ' | b'.') {
                best.offer(contact::local_phone(b, i), Entity::Phone);
            }
        }
        b'A'..=b'Z' | b'a'..=b'z' => {
            if token_head(c0, c1) {
                best.offer(secret::token(b, i), Entity::Secret);
            }
            if c0.is_ascii_uppercase() && c1.is_ascii_uppercase() {
                best.offer(finance::iban(b, i), Entity::Iban);
            }
            if near.email {
                best.offer(contact::email(b, i), Entity::Email);
            }
            if c0.is_ascii_hexdigit() && near.colon {
                best.offer(network::ipv6(b, i), Entity::Ipv6);
            }
        }
        b'_' if near.email => {
            best.offer(contact::email(b, i), Entity::Email);
        }
        b'-' if c1 == b'-' => {
            best.offer(secret::pem(b, i), Entity::Secret);
        }
        // A phone number's first group: `+1`, `+(`, `(4`.
        b'+' if c1.is_ascii_digit() || c1 == b'(' => {
            best.offer(contact::phone(b, i, 0), Entity::Phone);
        }
        b'(' if c1.is_ascii_digit() => {
            best.offer(contact::phone(b, i, 0), Entity::Phone);
        }
        // Only a compressed address (`::1`) starts with a colon.
        b':' if c1 == b':' => {
            best.offer(network::ipv6(b, i), Entity::Ipv6);
        }
        _ => {}
    }
    best.0
}

/// Whether `c` continues a word: a value next to one is part of a longer token.
fn is_word(c: u8) -> bool {
    CLASS[usize::from(c)] & WORD != 0
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
