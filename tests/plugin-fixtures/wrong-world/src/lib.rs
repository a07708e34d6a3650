//! A well-behaved privacy filter: labels requests that contain `@`, blocks answers that contain
//! `forbidden`. The host's tests load it as a router to check that the world is verified at load,
//! and as a filter as the filters' control.

use meridian::plugin::filtering::{Inspection, Redaction};

wit_bindgen::generate!({ path: "../../../wit", world: "privacy-filter" });

struct WrongWorld;

impl Guest for WrongWorld {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn inspect_request(_request: RequestSummary, segments: Vec<Segment>) -> RequestVerdict {
        let mut redactions = Vec::new();
        for (i, segment) in segments.iter().enumerate() {
            // Redacts each whitespace-separated word that contains `@`.
            let mut offset = 0;
            for word in segment.text.split(' ') {
                if word.contains('@') {
                    redactions.push(Redaction {
                        segment: i as u32,
                        start: offset as u32,
                        end: (offset + word.len()) as u32,
                        entity: "email".into(),
                    });
                }
                offset += word.len() + 1;
            }
        }
        let labels = if redactions.is_empty() { Vec::new() } else { vec!["pii.email".to_string()] };
        RequestVerdict::Allow(Inspection { labels, redactions })
    }

    fn inspect_response(text: String) -> ResponseVerdict {
        if text.contains("forbidden") {
            ResponseVerdict::Block("the answer contains a forbidden word".into())
        } else {
            ResponseVerdict::Allow
        }
    }
}

export!(WrongWorld);
