//! Server-sent events from upstreams, and the stream decoders of both upstream shapes that read
//! their data.
//!
//! Properties: the parser gives the same events and the same error however the bytes are chunked
//! (all at once, one byte at a time, or in pieces cut at places derived from the input; events
//! completed in the chunk that fails are not returned, so a coarser chunking may yield fewer
//! events before the error, never other ones); an event the writer can express (no line break in
//! it) is written and parsed back as itself; each event's data goes through the OpenAI and the
//! Anthropic stream decoder without a panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use meridian::api::{anthropic, openai};
use meridian::sse::{self, SseError, SseEvent, SseParser};
use meridian_fuzz::chunks;

/// A limit small enough for the fuzzer to reach.
const MAX_EVENT_BYTES: usize = 512;

/// The events parsed from `pieces`, up to the first error, and that error.
fn parse<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> (Vec<SseEvent>, Option<SseError>) {
    let mut parser = SseParser::new(MAX_EVENT_BYTES);
    let mut out = Vec::new();
    for piece in pieces {
        match parser.push(piece) {
            Ok(events) => out.extend(events),
            Err(e) => {
                assert_eq!(parser.push(b"data: more\n\n"), Err(e.clone()), "a failed parser stays failed");
                return (out, Some(e));
            }
        }
    }
    (out, None)
}

/// `coarse` says what `fine` (the same bytes, in smaller pieces) says.
#[track_caller]
fn agrees(coarse: &(Vec<SseEvent>, Option<SseError>), fine: &(Vec<SseEvent>, Option<SseError>), what: &str) {
    assert_eq!(coarse.1, fine.1, "{what}: error");
    if coarse.1.is_none() {
        assert_eq!(coarse.0, fine.0, "{what}: events");
    } else {
        assert!(fine.0.starts_with(&coarse.0), "{what}: events before the error");
    }
}

fuzz_target!(|data: &[u8]| {
    let bytewise = parse(data.chunks(1));
    agrees(&parse([data]), &bytewise, "whole against a byte at a time");
    agrees(&parse(chunks(data)), &bytewise, "pieces against a byte at a time");
    let whole = bytewise.0;

    let mut openai = openai::StreamDecoder::new("fallback");
    let mut anthropic = anthropic::StreamDecoder::new("fallback");
    let mut events = Vec::new();
    for event in &whole {
        let _ = openai.decode(&event.data, &mut events);
        let _ = anthropic.decode(&event.data, &mut events);

        let line_break = |s: &str| s.contains(['\n', '\r']);
        if !line_break(&event.data) && !event.event.as_deref().is_some_and(line_break) {
            let mut wire = BytesMut::new();
            sse::write_event(&mut wire, event.event.as_deref(), event.data.as_bytes());
            // The default limit: writing may add a space after each colon.
            assert_eq!(SseParser::default().push(&wire), Ok(vec![event.clone()]), "written and parsed back");
        }
    }
});
