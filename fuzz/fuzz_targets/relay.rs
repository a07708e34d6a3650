//! What a peer edge sends over the relay: the `request` of a relay frame, and the stream events of
//! a relayed answer.
//!
//! Properties: a relayed request parses (and validates) or is a typed error; a parsed request,
//! relayed on under its own model name, parses on the next edge to the same request, the
//! Anthropic-only fields included; a relayed event, encoded again, decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian::api::relay::{self, Dispatch};
use meridian_fuzz::{assert_same_json, assert_same_request};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = relay::parse_request(data) {
        let dispatch = Dispatch {
            request_id: "r".into(),
            tenant: "t".into(),
            client_region: None,
            labels: Vec::new(),
            redacted: false,
            path: vec!["a".into()],
            no_cache: false,
            traceparent: None,
        };
        let frame = dispatch.request(&req, &req.model);
        let body = serde_json::to_vec(&frame.request).expect("a relay request serializes");
        let again = relay::parse_request(&body).expect("a relayed request parses on the next edge");
        assert_same_request(&req, &again, "relayed on");
    }
    if let Ok(event) = relay::decode_event(data) {
        let json = serde_json::to_vec(&event).expect("an event serializes");
        let again = relay::decode_event(&json).expect("an encoded event decodes");
        assert_same_json(&event, &again, "event → encode → decode");
    }
});
