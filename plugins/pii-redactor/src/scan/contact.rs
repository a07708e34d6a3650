//! E-mail addresses and phone numbers.

use super::{after_context, after_escape, digit_at, num_start, run_end};

/// Longest local part RFC 5321 allows.
pub(super) const MAX_LOCAL: usize = 64;
/// Longest domain label.
const MAX_LABEL: usize = 63;
/// Longest domain.
const MAX_DOMAIN: usize = 253;

/// The characters accepted in a local part: the common subset of RFC 5322's atext. Quotes, `=`,
/// `/` and the like are left out because in prose and code they delimit an address rather than
/// belong to it (`to='bob@example.com'`).
pub(super) fn is_local(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'%' | b'+' | b'-')
}

/// An address `local@domain.tld` starting at `i`; returns its end.
pub(super) fn email(b: &[u8], i: usize) -> Option<usize> {
    // Only where a run of local-part characters begins, so that a rejected run
    // (`double..dot@…`) is not retried from inside and each run is read once; and not right
    // after an `@` (`a@b.com@c.org`).
    if i > 0 && (is_local(b[i - 1]) || b[i - 1] == b'@') && !after_escape(b, i) {
        return None;
    }
    let at = run_end(b, i, MAX_LOCAL, is_local);
    if at - i > MAX_LOCAL || b.get(at) != Some(&b'@') {
        return None;
    }
    let local = &b[i..at];
    if local.ends_with(b".") || local.windows(2).any(|w| w == b"..") {
        return None;
    }
    let end = domain(b, at + 1)?;
    // `a@b.com@c` or `a@b.com-x` is not an address followed by punctuation.
    if matches!(b.get(end), Some(b'@' | b'-')) || !super::word_end(b, end) {
        return None;
    }
    Some(end)
}

/// A domain of at least two labels starting at `d`, the last one a top-level domain; returns its
/// end. A final `.` not followed by a label (the end of a sentence) is left out.
fn domain(b: &[u8], d: usize) -> Option<usize> {
    let mut p = d;
    let mut labels = 0;
    loop {
        let s = p;
        p = run_end(b, s, MAX_LABEL, |c| c.is_ascii_alphanumeric() || c == b'-');
        let label = &b[s..p];
        if label.is_empty() || label.len() > MAX_LABEL || label[0] == b'-' || label[label.len() - 1] == b'-' {
            return None;
        }
        labels += 1;
        if p - d > MAX_DOMAIN {
            return None;
        }
        if b.get(p) == Some(&b'.') && b.get(p + 1).is_some_and(u8::is_ascii_alphanumeric) {
            p += 1;
            continue;
        }
        return (labels >= 2 && is_tld(label)).then_some(p);
    }
}

/// Whether `label` can be a top-level domain: letters only, or an IDN in punycode.
fn is_tld(label: &[u8]) -> bool {
    (label.len() >= 2 && label.iter().all(u8::is_ascii_alphabetic)) || label.starts_with(b"xn--")
}

/// Most digit groups a phone number is read in.
const MAX_GROUPS: usize = 8;

/// A phone number read as digit groups and the separators between them.
#[derive(Default)]
struct Groups {
    /// Where each group's digits start.
    starts: [usize; MAX_GROUPS],
    /// Where each group ends, past its `)` if it is parenthesised.
    ends: [usize; MAX_GROUPS],
    /// How many digits each group has.
    lens: [usize; MAX_GROUPS],
    /// The punctuation before each group: ` `, `.`, `-` or `/`, or 0 for none (the first group,
    /// or one right after a `)`).
    seps: [u8; MAX_GROUPS],
    /// Whether each group is written in parentheses.
    parens: [bool; MAX_GROUPS],
    /// How many groups were read.
    n: usize,
}

impl Groups {
    /// Reads digit groups from `p` into this empty `Groups`: each optionally in parentheses,
    /// separated by at most a space, one of `.-/` and another space. Returns `None` for a digit
    /// run too long to be part of a phone number (an id, a long reference). Filled in place: the
    /// arrays are too big to move around on every digit in the text.
    fn read(&mut self, b: &[u8], mut p: usize) -> Option<()> {
        let g = self;
        let mut sep = 0;
        while g.n < MAX_GROUPS {
            let opens = b.get(p) == Some(&b'(');
            let s = p + usize::from(opens);
            let mut e = run_end(b, s, 15, |c| c.is_ascii_digit());
            if e - s > 15 {
                return None;
            }
            if e == s || (opens && b.get(e) != Some(&b')')) {
                break;
            }
            let digits = e - s;
            e += usize::from(opens);
            g.starts[g.n] = s;
            g.ends[g.n] = e;
            g.lens[g.n] = digits;
            g.seps[g.n] = sep;
            g.parens[g.n] = opens;
            g.n += 1;
            // The separator to the next group.
            let mut r = e;
            sep = 0;
            if b.get(r) == Some(&b' ') {
                r += 1;
                sep = b' ';
            }
            if let Some(&c @ (b'.' | b'-' | b'/')) = b.get(r) {
                // `. ` after a group ends a sentence (`call 884 414 724. 70 more`).
                if c == b'.' && b.get(r + 1) == Some(&b' ') {
                    break;
                }
                r += 1;
                sep = c;
                if b.get(r) == Some(&b' ') {
                    r += 1;
                }
            }
            // A group in parentheses may follow with no separator (`+44(0)20`), as may any group
            // after one (`(030)1234`); two bare groups with nothing between are one run.
            let next_opens = b.get(r) == Some(&b'(');
            if !digit_at(b, r + usize::from(next_opens)) || (sep == 0 && !opens && !next_opens) {
                break;
            }
            p = r;
        }
        Some(())
    }

    /// Total digits in the first `k` groups.
    fn digits(&self, k: usize) -> usize {
        self.lens[..k].iter().sum()
    }

    /// Whether group `j` is the trunk prefix written in parentheses after a country code, as in
    /// `+44 (0)20 7946 0958`: dialled only from inside the country, so not counted in E.164.
    fn trunk_in_parens(&self, b: &[u8], j: usize) -> bool {
        j > 0 && self.parens[j] && self.lens[j] == 1 && b[self.starts[j]] == b'0'
    }
}

/// Whether [`Groups::read`] goes on to another group after a group ending at `e` (before a
/// `)` that closes it, if any): the separators it accepts, then a digit or `(` and a digit. A
/// necessary condition only (it ignores the group count and a first group in parentheses), so
/// that callers can skip [`phone`] where it would find a single group.
pub(super) fn next_group(b: &[u8], e: usize) -> bool {
    let mut r = e + usize::from(b.get(e) == Some(&b' '));
    if let Some(&c @ (b'.' | b'-' | b'/')) = b.get(r) {
        if c == b'.' && b.get(r + 1) == Some(&b' ') {
            return false;
        }
        r += 1;
        r += usize::from(b.get(r) == Some(&b' '));
    }
    r += usize::from(b.get(r) == Some(&b'('));
    digit_at(b, r)
}

/// A phone number starting at `i` (a digit, `+` or `(`), with its extension if one follows
/// (`x353`, ` ext. 12`), that ends past `beat` (another detector's longer finding wins anyway);
/// returns its end.
///
/// A number is read as digit groups (see [`Groups`]) and is a phone number when it has one of
/// these shapes:
/// - international: a leading `+`, or `00` then a country code in two or more groups, and 8–15
///   digits (E.164), in any grouping, a trunk `(0)` after the country code not counted
///   (`+49(0)1489 364390`, `+31(0)99-6393217`, `001-331-894-8757`);
/// - North American: 3-3-4 groups with separators, an optional leading `1`
///   (`(578)849-7740`, `1 (786) 834-4978`);
/// - trunk-prefixed national (most of Europe and the UK): a leading `0` and 10–13 digits, in
///   groups with one kind of separator (`020 7946 0958`, `(0161) 4960066`, `06 12 34 56 78`) or
///   unbroken (`0222433377`): a plain run of that length with a leading zero is rarely anything
///   else (an id padded with zeros is the price of this rule, and it is only redacted);
/// - any other 9–12 digits in at most four groups (`4155550132`, `609 141 777`), only after a
///   phone context word, as such a run is as often an order id or an amount.
///
/// A 7-digit local number also needs a context word ([`local_phone`]).
pub(super) fn phone(b: &[u8], i: usize, beat: usize) -> Option<usize> {
    let plus = b[i] == b'+';
    if plus {
        if !super::word_start(b, i) || (i > 0 && b[i - 1] == b'+') {
            return None;
        }
    } else {
        // Every grouped national shape opens with a group of at most five digits and a
        // separator, and an unbroken one 9–13 digits; this turns most plain numbers (years,
        // amounts) away before reading groups.
        let s = i + usize::from(b[i] == b'(');
        let e = run_end(b, s, 13, |c| c.is_ascii_digit());
        let grouped = e - s <= 5 && matches!(b.get(e), Some(b' ' | b'.' | b'-' | b'/' | b')'));
        if !num_start(b, i) || e == s || !(grouped || (9..=13).contains(&(e - s))) {
            return None;
        }
    }
    let mut g = Groups::default();
    g.read(b, i + usize::from(plus))?;
    // `00` then a country code is the international prefix written out (`0049 171 2345678`).
    let idd = !plus && b[i..].starts_with(b"00") && matches!(b.get(i + 2), Some(b'1'..=b'9'));
    // Try the whole run, then shorter prefixes cut at a space (a number followed by an unrelated
    // count, `call 020 7946 0958 2 times`); never cut inside `415-555-0132-7`.
    (1..=g.n).rev().filter(|&k| k == g.n || g.seps[k] == b' ').find_map(|k| {
        let end = extension(b, g.ends[k - 1]).unwrap_or(g.ends[k - 1]);
        if end <= beat || !phone_end(b, end) {
            return None;
        }
        let ok = if plus {
            international(b, &g, k, 0)
        } else {
            // `00` written grouped; unbroken, it is a trunk-shaped run.
            (idd && k >= 2 && international(b, &g, k, 2))
                || north_american(b, &g, k)
                || trunk(b, &g, k)
                || (contextual(&g, k) && after_context(b, i, &PHONE_CONTEXT))
        };
        ok.then_some(end)
    })
}

/// The end of an extension right after a number at `e`: `x`, `ext` or `ext.` (any case), an
/// optional space before and after, and 1–6 digits (`-7740x353`, `0132 ext. 12`).
pub(super) fn extension(b: &[u8], e: usize) -> Option<usize> {
    let mut p = e + usize::from(b.get(e) == Some(&b' '));
    let word = b.get(p..)?;
    p += if word.len() >= 3 && word[..3].eq_ignore_ascii_case(b"ext") {
        3 + usize::from(word.get(3) == Some(&b'.'))
    } else if word.first().is_some_and(|c| c.eq_ignore_ascii_case(&b'x')) {
        1
    } else {
        return None;
    };
    p += usize::from(b.get(p) == Some(&b' '));
    let end = run_end(b, p, 6, |c| c.is_ascii_digit());
    (1..=6).contains(&(end - p)).then_some(end)
}

/// Whether a phone number may end before `b[e]`: not inside a word, and not followed by a digit
/// after `.`, `-`, `:` or `/`, which makes it part of a date, a time or a longer number.
fn phone_end(b: &[u8], e: usize) -> bool {
    super::word_end(b, e) && !(matches!(b.get(e), Some(b'.' | b'-' | b':' | b'/')) && digit_at(b, e + 1))
}

/// `+` (or `00`, counted in `prefix`) and 8–15 digits (E.164), in any grouping; a trunk `(0)`
/// after the country code is not counted.
fn international(b: &[u8], g: &Groups, k: usize, prefix: usize) -> bool {
    let last_ok = k == 1 || g.lens[k - 1] >= 2;
    let trunk = (1..k).filter(|&j| g.trunk_in_parens(b, j)).count();
    !g.parens[0] && (8..=15).contains(&(g.digits(k) - prefix - trunk)) && last_ok
}

/// A North American number: an optional `1`, then area code, exchange and line as 3-3-4 groups,
/// the area code optionally in parentheses. Any leading digits: numbers written in this shape
/// with an unassigned area code (`106-690-7439`) are still someone's number as written.
fn north_american(b: &[u8], g: &Groups, k: usize) -> bool {
    let first = usize::from(k == 4 && g.lens[0] == 1 && b[g.starts[0]] == b'1' && !g.parens[0]);
    k - first == 3 && g.lens[first..k] == [3, 3, 4] && !g.parens[first + 1] && !g.parens[first + 2]
}

/// A shape that is a phone number only after a context word: 9–12 digits not starting with `0`
/// (those are [`trunk`]'s), unbroken or in at most four groups of 2 or more digits with one kind
/// of separator (`4155550132`, `609 141 777`, `351 234 5678`).
fn contextual(g: &Groups, k: usize) -> bool {
    let seps = &g.seps[1..k];
    k <= 4
        && (9..=12).contains(&g.digits(k))
        && g.lens[..k].iter().all(|&l| l >= 2)
        && !g.parens[..k].contains(&true)
        && seps.iter().all(|&s| s == g.seps[1])
}

/// A trunk-prefixed national number (`0…`, as in most of Europe): 10–13 digits, unbroken, or in
/// 2 or more groups, the first of 2–5 digits, the rest of 2–8, with one kind of separator
/// throughout (a date followed by a time, `01.02.2024 12`, mixes them).
fn trunk(b: &[u8], g: &Groups, k: usize) -> bool {
    let s = g.starts[0];
    if b[s] != b'0' || !(10..=13).contains(&g.digits(k)) {
        return false;
    }
    if k == 1 {
        return !g.parens[0];
    }
    if !(2..=5).contains(&g.lens[0]) || g.lens[1..k].iter().any(|l| !(2..=8).contains(l)) {
        return false;
    }
    // Separators after a parenthesised group may differ (`(030) 1234-5678`); the others agree.
    let mut kinds = (1..k).filter(|&j| !g.parens[j - 1]).map(|j| g.seps[j]);
    let first = kinds.next();
    g.parens[1..k].iter().all(|p| !p) && kinds.all(|s| Some(s) == first)
}

/// Words that, shortly before a 7-digit local number or a plain 9–12-digit run, say it is a
/// phone number (matched as [`after_context`] says: whole words, ASCII letters in any case, an
/// optional plural `s`), in English and the languages of the EU's largest countries. A word
/// ends where an accented letter starts, so `tel` also stands for `teléfono` and `phone` for
/// `téléphone`.
const PHONE_CONTEXT: [&str; 31] = [
    "call",
    "phone",
    "tel",
    "tél",
    "telephone",
    "mobile",
    "cell",
    "fax",
    "text me",
    "reach me at",
    "ring",
    "telefon",
    "telefonisch",
    "telefonnummer",
    "rufnummer",
    "handy",
    "mobil",
    "portable",
    "telefoon",
    "telefoonnummer",
    "mobiel",
    "bel",
    "telefono",
    "cellulare",
    "chiamami",
    "tlf",
    "llámame",
    "móvil",
    "komórka",
    "zadzwoń",
    "whatsapp",
];

/// A 7-digit North American local number starting at `i`, exchange and line as `NXX-XXXX`,
/// `NXX XXXX` or `NXX.XXXX` (N is 2–9, and the exchange is not a service code N11), reported
/// only after a phone context word (`call me at 555-0132`, `Tel. 555 0132`): without one the
/// shape is as often an invoice or ticket number (`invoice 555-0132`). Returns its end.
pub(super) fn local_phone(b: &[u8], i: usize) -> Option<usize> {
    let s = b.get(i..i + 8)?;
    let shape = matches!(s[0], b'2'..=b'9')
        && s[1..3].iter().all(u8::is_ascii_digit)
        && matches!(s[3], b'-' | b' ' | b'.')
        && s[4..].iter().all(u8::is_ascii_digit);
    if !shape || &s[1..3] == b"11" || !num_start(b, i) || !phone_end(b, i + 8) {
        return None;
    }
    after_context(b, i, &PHONE_CONTEXT).then_some(i + 8)
}
