//! `POST /v1/messages` bodies, as an Anthropic client sends them, and their translation to both
//! upstream shapes.
//!
//! Properties: a body either parses into the canonical request or is a typed error; the body
//! made for an Anthropic upstream is JSON that parses back into a request whose own upstream body
//! says the same (translation reaches a fixed point in one step); the body made for an
//! OpenAI-compatible upstream is a valid OpenAI request with the same canonical content.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian::api::{anthropic, openai};
use meridian_fuzz::{assert_same_json, assert_same_request};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = anthropic::parse_request(data) else { return };

    let upstream = anthropic::upstream_body(&req, &req.model, 1024);
    let sent: Value = serde_json::from_slice(&upstream).expect("the Anthropic upstream body is JSON");
    if let Ok(again) = anthropic::parse_request(&upstream) {
        let resent: Value = serde_json::from_slice(&anthropic::upstream_body(&again, &again.model, 1024))
            .expect("the Anthropic upstream body is JSON");
        assert_same_json(&sent, &resent, "Anthropic upstream body, parsed and translated again");
    }

    let openai_body = openai::upstream_body(&req, &req.model).expect("the OpenAI upstream body serializes");
    if let Ok(mut as_openai) = openai::parse_request(&openai_body) {
        // The OpenAI form leaves the Anthropic-only fields out, by design, and asks for usage on
        // a stream.
        let mut canonical = req.clone();
        canonical.anthropic_extra.clear();
        canonical.take_block_extras();
        as_openai.stream_options.clone_from(&canonical.stream_options);
        assert_same_request(&canonical, &as_openai, "Anthropic request through the OpenAI form");
    }
});
