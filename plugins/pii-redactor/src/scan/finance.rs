//! Payment cards, IBANs and US social security numbers: each shape checked by its own checksum
//! or validity rules, which is what keeps order numbers and ids out; an SSN without dashes also
//! needs a context word.

use super::{after_context, num_end, num_start, run_end, word_end, word_start};

/// A card number starting at `i`: 12–19 digits, optionally in groups of 3 or more separated by
/// single spaces or dashes (one kind throughout), Luhn-valid, with a prefix and a length a
/// network issues ([`issued`]). Returns its end.
pub(super) fn card(b: &[u8], i: usize) -> Option<usize> {
    if !matches!(b[i], b'1'..=b'6') || !num_start(b, i) {
        return None;
    }
    // Group ends and digit counts so far; at most 19 / 3 groups.
    let mut ends = [(0usize, 0usize); 7];
    let mut n = 0;
    let mut digits = 0;
    let mut sep = 0;
    let mut p = i;
    loop {
        let e = run_end(b, p, 19, |c| c.is_ascii_digit());
        if e - p > 19 {
            return None;
        }
        digits += e - p;
        if e - p < 3 || digits > 19 {
            break;
        }
        ends[n] = (e, digits);
        n += 1;
        match b.get(e) {
            Some(&c @ (b' ' | b'-')) if (sep == 0 || sep == c) && n < ends.len() && super::digit_at(b, e + 1) => {
                sep = c;
                p = e + 1;
            }
            _ => break,
        }
    }
    // The longest prefix of whole groups that is a valid number; a prefix may stop before a
    // space (`4111 1111 1111 1111 2024`) but not inside a dashed run (num_end).
    let iin = b[i..].iter().filter(|c| c.is_ascii_digit()).take(4).fold(0, |n, &c| n * 10 + u32::from(c - b'0'));
    ends[..n].iter().rev().find(|&&(e, d)| issued(iin, d) && num_end(b, e) && luhn(&b[i..e])).map(|&(e, _)| e)
}

/// Whether a network issues cards of `len` digits whose first four digits are `iin` (ISO/IEC
/// 7812 issuer ranges): this keeps a Luhn-valid id of 12 digits (one in ten is) out unless it
/// starts like a Maestro card, the one network that issues that length.
fn issued(iin: u32, len: usize) -> bool {
    let lens = match iin {
        // Visa.
        4000..=4999 => 13..=19,
        // JCB's older 15-digit ranges.
        1800 | 2131 => 15..=15,
        // Mir.
        2200..=2204 => 16..=19,
        // Mastercard.
        2221..=2720 | 5100..=5599 => 16..=16,
        // American Express.
        3400..=3499 | 3700..=3799 => 15..=15,
        // Diners Club.
        3000..=3059 | 3095 | 3600..=3699 | 3800..=3999 => 14..=19,
        // JCB (3528–3589; the rest of 35 is written as JCB in test data and unassigned).
        3500..=3599 => 16..=19,
        // Maestro (50, 56–69), which also holds Discover, UnionPay and RuPay's 16–19.
        5000..=5099 | 5600..=6999 => 12..=19,
        _ => return false,
    };
    lens.contains(&len)
}

/// The Luhn checksum over the digits of `s`, skipping separators.
fn luhn(s: &[u8]) -> bool {
    /// A digit doubled, its two digits summed.
    const DOUBLED: [u32; 10] = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9];
    let mut sum = 0u32;
    let mut double = false;
    for &c in s.iter().rev() {
        if c.is_ascii_digit() {
            let d = usize::from(c - b'0');
            sum += if double { DOUBLED[d] } else { d as u32 };
            double = !double;
        }
    }
    sum.is_multiple_of(10)
}

/// Words that, shortly before an SSN written without dashes, say it is one (matched as
/// [`after_context`] says: whole words, any case, an optional plural `s`). `TIN` is left out on
/// purpose: a taxpayer id is as often an EIN (`12-3456789`), which is not an SSN.
const SSN_CONTEXT: [&str; 3] = ["ssn", "social security", "soc sec"];

/// A US social security number starting at `i`, outside the ranges never issued: area 000, 666
/// and 900–999, group 00, serial 0000. Written `AAA-GG-SSSS` it stands alone; written
/// `AAA GG SSSS` or as nine plain digits (`536228412`), which is as often an order id or an
/// amount, it needs a context word before it (`SSN 536228412`). Returns its end.
pub(super) fn ssn(b: &[u8], i: usize) -> Option<usize> {
    let sep = match b.get(i + 3) {
        Some(&c @ (b'-' | b' ')) => Some(c),
        _ => None,
    };
    let len = if sep.is_some() { 11 } else { 9 };
    let s = b.get(i..i + len)?;
    let shape = s.iter().enumerate().all(|(k, &c)| match sep {
        Some(x) if k == 3 || k == 6 => c == x,
        _ => c.is_ascii_digit(),
    });
    if !shape || !num_start(b, i) || !num_end(b, i + len) {
        return None;
    }
    // Area, group and serial, wherever the separators put them.
    let skip = usize::from(sep.is_some());
    let (area, group, serial) = (&s[0..3], &s[3 + skip..5 + skip], &s[5 + 2 * skip..]);
    let valid = area != b"000" && area != b"666" && area[0] != b'9' && group != b"00" && serial != b"0000";
    (valid && (sep == Some(b'-') || after_context(b, i, &SSN_CONTEXT))).then_some(i + len)
}

/// Whether `c` may appear in an IBAN after the country code.
fn is_iban_char(c: u8) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit()
}

/// An IBAN starting at `i`: country code, two check digits, then the account number, written
/// unbroken or in groups of four separated by single spaces. The length must be the country's
/// (or 15–34 for a country not listed) and the mod-97 remainder 1. Returns its end.
pub(super) fn iban(b: &[u8], i: usize) -> Option<usize> {
    let head = b.get(i..i + 4)?;
    if !(head[0].is_ascii_uppercase() && head[1].is_ascii_uppercase() && head[2..].iter().all(u8::is_ascii_digit)) {
        return None;
    }
    let check = (head[2] - b'0') * 10 + (head[3] - b'0');
    if !word_start(b, i) || !(2..=98).contains(&check) {
        return None;
    }
    let length_ok = |n: usize| match country_length(&head[..2]) {
        Some(len) => n == len,
        None => (15..=34).contains(&n),
    };
    let valid = |end: usize, n: usize| length_ok(n) && word_end(b, end) && mod97(&b[i..end]);
    if b.get(i + 4).copied().is_some_and(is_iban_char) {
        // Unbroken: the whole run is the IBAN.
        let end = run_end(b, i, 34, is_iban_char);
        return valid(end, end - i).then_some(end);
    }
    // Grouped: groups of four, the last one of one to four; keep the longest valid prefix, since
    // a following word in capitals can look like one more group (`… 3000 EUR`).
    let mut best = None;
    let mut n = 0;
    let mut p = i;
    loop {
        let e = run_end(b, p, 4, is_iban_char);
        let len = e - p;
        if len == 0 || len > 4 || n + len > 34 {
            break;
        }
        n += len;
        if n >= 15 && valid(e, n) {
            best = Some(e);
        }
        if len < 4 || b.get(e) != Some(&b' ') || !b.get(e + 1).copied().is_some_and(is_iban_char) {
            break;
        }
        p = e + 1;
    }
    best
}

/// The ISO 13616 mod-97 check: move the first four characters to the end, read letters as 10–35,
/// and the number must leave 1. Spaces are skipped.
fn mod97(s: &[u8]) -> bool {
    let rest = s[4..].iter().chain(&s[..4]).filter(|&&c| c != b' ');
    let mut r = 0u32;
    for &c in rest {
        r = if c.is_ascii_digit() {
            (r * 10 + u32::from(c - b'0')) % 97
        } else {
            (r * 100 + u32::from(c - b'A' + 10)) % 97
        };
    }
    r == 1
}

/// The IBAN length of a country in the SWIFT registry, for the countries listed.
fn country_length(cc: &[u8]) -> Option<usize> {
    Some(match cc {
        b"NO" => 15,
        b"BE" => 16,
        b"DK" | b"FI" | b"FO" | b"GL" | b"NL" => 18,
        b"MK" | b"SI" => 19,
        b"AT" | b"BA" | b"EE" | b"KZ" | b"LT" | b"LU" | b"XK" => 20,
        b"CH" | b"HR" | b"LI" | b"LV" => 21,
        b"BG" | b"BH" | b"CR" | b"DE" | b"GB" | b"GE" | b"IE" | b"ME" | b"RS" | b"VA" => 22,
        b"AE" | b"GI" | b"IL" | b"IQ" | b"TL" => 23,
        b"AD" | b"CZ" | b"ES" | b"MD" | b"PK" | b"RO" | b"SA" | b"SE" | b"SK" | b"TN" | b"VG" => 24,
        b"PT" | b"ST" => 25,
        b"IS" | b"TR" => 26,
        b"FR" | b"GR" | b"IT" | b"MC" | b"MR" | b"SM" => 27,
        b"AL" | b"AZ" | b"BY" | b"CY" | b"DO" | b"GT" | b"HU" | b"LB" | b"PL" | b"SV" => 28,
        b"BR" | b"EG" | b"PS" | b"QA" | b"UA" => 29,
        b"JO" | b"KW" | b"MU" => 30,
        b"MT" | b"SC" => 31,
        b"LC" => 32,
        _ => return None,
    })
}
