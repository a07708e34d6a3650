//! A privacy filter whose redactions break the contract. Its config (a JSON string) picks how:
//! `"out-of-range"` ends past the segment, `"bad-segment"` names a segment that does not exist,
//! `"empty-range"` has `start == end`, `"split-char"` cuts a multi-byte character, `"overlap"`
//! gives two overlapping ranges. `inspect-response` blocks with the mode as the reason.
//!
//! Three modes are about triggers instead: `"triggered"` declares the answer trigger `TRIGGER` and
//! blocks every piece of an answer with `saw:` and the text it was shown, so that a test sees what
//! the host passed; `"bad-triggers"` declares an empty trigger, which the host refuses;
//! `"request-triggered"` declares the request trigger `TRIGGER` and answers every request it is
//! shown with a redaction past the segment's end (so it fails, and can be quarantined).

use meridian::plugin::filtering::{Inspection, Redaction};

wit_bindgen::generate!({ path: "../../../wit", world: "privacy-filter" });

struct InvalidRedaction;

thread_local! {
    static MODE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

fn mode() -> String {
    MODE.with(|m| m.borrow().clone())
}

fn redaction(segment: u32, start: u32, end: u32) -> Redaction {
    Redaction { segment, start, end, entity: "email".into() }
}

impl Guest for InvalidRedaction {
    fn configure(config: String) -> Result<(), String> {
        let mode = config.trim_matches('"').to_string();
        match mode.as_str() {
            "triggered" => meridian::plugin::host::answer_triggers(&["TRIGGER".to_string()]),
            "bad-triggers" => meridian::plugin::host::answer_triggers(&[String::new()]),
            "request-triggered" => meridian::plugin::host::request_triggers(&["TRIGGER".to_string()]),
            _ => {}
        }
        MODE.with(|m| *m.borrow_mut() = mode);
        Ok(())
    }

    fn inspect_request(_request: RequestSummary, segments: Vec<Segment>) -> RequestVerdict {
        let len = segments.first().map_or(0, |s| s.text.len() as u32);
        let redactions = match mode().as_str() {
            "bad-segment" => vec![redaction(segments.len() as u32, 0, 1)],
            "empty-range" => vec![redaction(0, 1, 1)],
            // The host's test text starts with "é" (two bytes): 1 is inside it.
            "split-char" => vec![redaction(0, 1, len)],
            "overlap" => vec![redaction(0, 0, 4), redaction(0, 2, 6)],
            _ => vec![redaction(0, 0, len + 10)],
        };
        RequestVerdict::Allow(Inspection { labels: vec!["pii.email".into()], redactions })
    }

    fn inspect_response(text: String) -> ResponseVerdict {
        match mode().as_str() {
            "triggered" => ResponseVerdict::Block(format!("saw:{text}")),
            mode => ResponseVerdict::Block(mode.to_string()),
        }
    }
}

export!(InvalidRedaction);
