//! `POST /v1/chat/completions` and `POST /v1/embeddings` bodies, as an OpenAI client sends them.
//!
//! Properties: a body either parses or is a typed error; a parsed request serializes, and that
//! JSON parses (and validates) back to the same request; the body sent to an OpenAI-compatible
//! upstream parses too, with the upstream's model name; an embeddings body yields 1 to
//! `MAX_EMBEDDING_INPUTS` non-empty texts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian::api::openai;
use meridian_fuzz::{assert_same_json, assert_same_request};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = openai::parse_request(data) {
        let json = serde_json::to_vec(&req).expect("a parsed request serializes");
        let again = openai::parse_request(&json).expect("a parsed request, serialized, parses again");
        assert_same_request(&req, &again, "parse → serialize → parse");

        let upstream = openai::upstream_body(&req, "upstream-model").expect("the upstream body serializes");
        let sent = openai::parse_request(&upstream).expect("the upstream body is a valid request");
        assert_eq!(sent.model, "upstream-model");
        assert_same_json(&sent.messages, &req.messages, "the upstream gets the client's messages");
        if req.is_stream() {
            assert!(sent.include_usage(), "a stream sent upstream asks for usage");
        }
        let _ = req.estimated_prompt_tokens();
    }
    if let Ok((_, texts)) = openai::parse_embeddings(data) {
        assert!((1..=openai::MAX_EMBEDDING_INPUTS).contains(&texts.len()));
        assert!(texts.iter().all(|t| !t.is_empty()));
    }
});
