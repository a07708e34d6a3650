//! IPv4 and IPv6 addresses.

use super::{digit_at, run_end, word_end, word_start};

/// An IPv4 address starting at `i`, not part of a longer dotted number (`1.2.3.4.5`, `v1.2.3.4`);
/// a port or a range may follow (`10.0.0.1:8080`, `10.0.0.1-10.0.0.9`). Returns its end.
pub(super) fn ipv4(b: &[u8], i: usize) -> Option<usize> {
    let after_dotted = i >= 2 && b[i - 1] == b'.' && b[i - 2].is_ascii_digit();
    if !word_start(b, i) || after_dotted {
        return None;
    }
    let end = dotted_quad(b, i)?;
    let more = b.get(end) == Some(&b'.') && digit_at(b, end + 1);
    (word_end(b, end) && !more).then_some(end)
}

/// Four dot-separated octets 0–255 of one to three digits at `i`; returns their end.
fn dotted_quad(b: &[u8], i: usize) -> Option<usize> {
    let mut p = i;
    for k in 0..4 {
        if k > 0 {
            if b.get(p) != Some(&b'.') {
                return None;
            }
            p += 1;
        }
        let e = run_end(b, p, 3, |c| c.is_ascii_digit());
        if e == p || e - p > 3 {
            return None;
        }
        let octet = b[p..e].iter().fold(0u32, |v, c| v * 10 + u32::from(c - b'0'));
        if octet > 255 {
            return None;
        }
        p = e;
    }
    Some(p)
}

/// An IPv6 address starting at `i`: eight groups of one to four hex digits, or fewer with one
/// `::`, optionally ending in an IPv4 address. At least two colons and at least one decimal digit
/// are required, which keeps out times (`10:30:00`), MAC addresses (six groups) and code paths
/// (`dead::beef`, `std::fs`). Returns its end.
pub(super) fn ipv6(b: &[u8], i: usize) -> Option<usize> {
    if !word_start(b, i) || (i > 0 && matches!(b[i - 1], b':' | b'.')) {
        return None;
    }
    // The first colon comes within five bytes; most words and numbers stop here.
    if !b[i..b.len().min(i + 5)].contains(&b':') {
        return None;
    }
    let mut p = i;
    let mut groups = 0;
    let mut colons = 0;
    let mut compressed = false;
    let mut has_digit = false;
    if b[p..].starts_with(b"::") {
        compressed = true;
        colons = 2;
        p += 2;
    }
    let mut end = p;
    loop {
        let s = p;
        let e = run_end(b, s, 4, |c| c.is_ascii_hexdigit());
        if e == s {
            break;
        }
        if e - s > 4 {
            return None;
        }
        if b.get(e) == Some(&b'.') && digit_at(b, e + 1) {
            // An IPv4 tail (`::ffff:192.0.2.1`) counts as two groups.
            end = dotted_quad(b, s)?;
            groups += 2;
            has_digit = true;
            break;
        }
        groups += 1;
        has_digit |= b[s..e].iter().any(u8::is_ascii_digit);
        end = e;
        p = e;
        if b[p..].starts_with(b"::") {
            if compressed {
                return None;
            }
            compressed = true;
            colons += 2;
            p += 2;
            end = p;
        } else if b.get(p) == Some(&b':') && b.get(p + 1).is_some_and(u8::is_ascii_hexdigit) {
            colons += 1;
            p += 1;
        } else {
            break;
        }
    }
    let count_ok = if compressed { groups <= 7 } else { groups == 8 };
    let more = b.get(end) == Some(&b'.') && digit_at(b, end + 1);
    (colons >= 2 && has_digit && count_ok && word_end(b, end) && !more).then_some(end)
}
