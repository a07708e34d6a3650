//! The placeholder restorer, which sees model output (text and tool-call arguments, streamed or
//! whole) and puts the redacted originals back.
//!
//! The input is both the client's text (in which spans, derived from the input, are redacted) and
//! a model's answer. Properties: redaction takes any in-range spans; restoring the redacted text
//! gives the original back (when the original holds no `[` of its own to be mistaken for a
//! placeholder); the streaming restorer gives exactly what restoring the whole text gives,
//! however the answer is cut (one character a piece, or pieces cut at places derived from the
//! input), in plain-text and in JSON-string mode; restoring inside a JSON string keeps it a JSON
//! string.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian::chat::{ChatRequest, Message, Role};
use meridian::plugin::Redaction;
use meridian::redaction::{redact, Placeholders, StreamRestorer};
use meridian_fuzz::{str_chunks, Rng};

const ENTITIES: [&str; 4] = ["email", "name", "phone_number", "x"];

/// Up to 6 non-overlapping spans on character boundaries of `text`, chosen by `rng`.
fn spans(text: &str, rng: &mut Rng) -> Vec<Redaction> {
    let mut bounds: Vec<usize> =
        (0..rng.below(13)).map(|_| rng.below(text.len() + 1)).filter(|&i| text.is_char_boundary(i)).collect();
    bounds.sort_unstable();
    bounds.dedup();
    bounds
        .chunks_exact(2)
        .map(|pair| Redaction {
            segment: 0,
            start: pair[0] as u32,
            end: pair[1] as u32,
            entity: ENTITIES[rng.below(ENTITIES.len())].to_string(),
        })
        .collect()
}

fn restore_streamed(p: &Placeholders, pieces: &[&str], json: bool) -> String {
    let mut restorer = StreamRestorer::new(json);
    let mut out: String = pieces.iter().map(|piece| restorer.push(p, piece)).collect();
    out += &restorer.finish(p);
    out
}

fn restore_whole(p: &Placeholders, text: &str, json: bool) -> String {
    if json {
        p.restore_json(text)
    } else {
        p.restore(text)
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(original) = std::str::from_utf8(data) else { return };
    let mut rng = Rng::from_input(data);
    let mut req = ChatRequest {
        model: "m".into(),
        messages: vec![Message::text(Role::User, original)],
        ..ChatRequest::default()
    };
    let spans = spans(original, &mut rng);
    let placeholders = redact(&mut req, &spans).expect("in-range, non-overlapping spans are taken");
    let redacted = req.messages[0].content_text();
    if !original.contains('[') {
        assert_eq!(placeholders.restore(&redacted), original, "restoring the redacted text");
    }

    // The model's answer: the redacted text (full of placeholders) and the raw input (whatever
    // the fuzzer makes of placeholders, split or not).
    for answer in [redacted.as_str(), original] {
        for json in [false, true] {
            let whole = restore_whole(&placeholders, answer, json);
            assert_eq!(restore_streamed(&placeholders, &str_chunks(answer, 1), json), whole, "a character a piece");
            assert_eq!(restore_streamed(&placeholders, &str_chunks(answer, 12), json), whole, "in pieces");
            if json && serde_json::from_str::<String>(&format!("\"{answer}\"")).is_ok() {
                serde_json::from_str::<String>(&format!("\"{whole}\"")).expect("restored JSON string stays one");
            }
        }
    }
});
