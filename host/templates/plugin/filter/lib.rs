//! {{name}}: a Meridian privacy filter that redacts secret codes (`secret-code-` and digits, such as
//! `secret-code-1234`) from a request's text, and labels the request `secret.code.redacted` when it
//! finds one (the contract's convention for a finding that was redacted).
//!
//! The node replaces each redacted value with a placeholder (`[SECRET_CODE_1]`) before the request
//! leaves it, and puts the value back into the answer. Answers pass unchanged. Takes no
//! configuration (`{}`).

use meridian_plugin_sdk::{export_filter, Filter};
use meridian_plugin_sdk::{Inspection, Redaction, RequestSummary, RequestVerdict, ResponseVerdict, Segment};

/// What a secret code starts with; one or more ASCII digits follow.
const PREFIX: &str = "secret-code-";

/// The filter.
pub struct Plugin;

impl Filter for Plugin {
    fn configure(config: &str) -> Result<(), String> {
        meridian_plugin_sdk::expect_empty_config(config)
    }

    fn inspect_request(_req: RequestSummary, segments: Vec<Segment>) -> RequestVerdict {
        let mut redactions = Vec::new();
        for (segment, s) in (0u32..).zip(&segments) {
            for (start, end) in secret_codes(&s.text) {
                // The host takes 32-bit offsets; text that long is refused before it gets here.
                let (Ok(start), Ok(end)) = (u32::try_from(start), u32::try_from(end)) else { continue };
                redactions.push(Redaction { segment, start, end, entity: "secret_code".into() });
            }
        }
        let labels = if redactions.is_empty() { Vec::new() } else { vec!["secret.code.redacted".into()] };
        RequestVerdict::Allow(Inspection { labels, redactions })
    }

    fn inspect_response(_text: String) -> ResponseVerdict {
        ResponseVerdict::Allow
    }
}

/// The byte ranges of the secret codes in `text`: the prefix and every digit after it.
fn secret_codes(text: &str) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find(PREFIX) {
        let start = from + at;
        let digits_from = start + PREFIX.len();
        let digits = text[digits_from..].bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 {
            found.push((start, digits_from + digits));
        }
        // Digits are ASCII, so this is a character boundary.
        from = digits_from + digits;
    }
    found
}

export_filter!(Plugin);
