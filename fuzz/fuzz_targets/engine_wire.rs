//! Frames of the QUIC protocol between edges and engines (`engine/PROTOCOL.md`).
//!
//! Properties: the decoder yields the same frames and the same error however the bytes arrive
//! (all at once, one byte at a time, in pieces); a decoded frame encodes to bytes that decode to
//! the same frame; every payload type's decoder takes any bytes without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian_engine::wire::{decode_payload, Decoder, Frame, FrameType, WireError};
use meridian_fuzz::chunks;

/// Everything the decoder makes of `pieces`, up to and including its first error; then what it
/// says at the end of the stream.
fn decode<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Result<Frame, WireError>>, Result<(), WireError>) {
    // A small limit, so that refusing an oversized frame is reached as well.
    let mut decoder = Decoder::new(4096);
    let mut out = Vec::new();
    for piece in pieces {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => out.push(Ok(frame)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    return (out, Ok(()));
                }
            }
        }
    }
    let end = decoder.finish();
    (out, end)
}

fuzz_target!(|data: &[u8]| {
    let whole = decode([data]);
    assert_eq!(decode(data.chunks(1)), whole, "one byte at a time");
    assert_eq!(decode(chunks(data)), whole, "in pieces");

    for frame in whole.0.iter().flatten() {
        let bytes = frame.encode();
        let mut decoder = Decoder::default();
        decoder.push(&bytes);
        let again = decoder.next_frame().expect("an encoded frame decodes").expect("an encoded frame is whole");
        assert_eq!(&again, frame, "decode → encode → decode");
        assert_eq!(decoder.buffered(), 0);
    }

    if let Some((&type_byte, payload)) = data.split_first() {
        if let Some(frame_type) = FrameType::from_byte(type_byte) {
            if let Ok(frame) = decode_payload(frame_type, payload) {
                assert_eq!(frame.frame_type(), frame_type);
            }
        }
    }
});
