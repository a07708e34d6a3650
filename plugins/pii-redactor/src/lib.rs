//! The `pii-redactor` privacy filter: finds personal data and secrets in a request's text with a
//! hand-written single-pass scanner ([`scan`]), and labels, redacts or blocks them as configured
//! ([`policy`]). Built for `wasm32-unknown-unknown`, it is a module of the `privacy-filter` world;
//! natively, the scanner and the policy are plain functions to test.
//!
//! Weak shapes count only with context, as in production PII detectors: a 7-digit local phone
//! number (`555-0132`) or a plain 9–12-digit run (`4155550132`, `609 141 777`) only after a word
//! such as `call`, `phone`, `tel`, `Telefon` or `cellulare`, and an SSN written
//! without dashes (`536228412`, `536 22 8412`) only after `SSN`, `social security` or `soc sec`,
//! each ending at most 24 bytes before the number; see [`scan`].
//!
//! Config (JSON, every key optional):
//! `{"actions": {"email": "redact", "secret": "block", "ipv4": "label"}, "block_secrets_in_response": true}`.
//! Secrets block by default, everything else is redacted.
//!
//! Labels say what stays in the text: a redacted entity is labelled `pii.<entity>.redacted`
//! (`pii.email.redacted`), a label-only one `pii.<entity>` (`pii.email`), so that routers know
//! whether personal data goes out as is (the residency rule refuses to let it leave the tenant's
//! regions).

pub mod policy;
pub mod scan;

use std::cell::RefCell;

use meridian_plugin_sdk::{export_filter, Filter, RequestSummary, RequestVerdict, ResponseVerdict, Segment};

use crate::policy::{Policy, ResponseWindow};

thread_local! {
    /// The policy `configure` validated; every instance is configured before its first hook.
    static POLICY: RefCell<Policy> = RefCell::new(Policy::default());
    /// The answer's recent text, for secrets split across chunks; an instance serves one request.
    static RESPONSE: RefCell<ResponseWindow> = RefCell::new(ResponseWindow::default());
}

/// The filter as exported to the host.
pub struct PiiRedactor;

impl Filter for PiiRedactor {
    fn configure(config: &str) -> Result<(), String> {
        let policy = Policy::from_json(config)?;
        // Answers are read for secrets only, each of which starts with a trigger: the host skips
        // the answers (and the instances) that hold none, and every answer without the rule.
        let triggers = if policy.blocks_secrets_in_response() { scan::SECRET_TRIGGERS } else { &[] };
        meridian_plugin_sdk::answer_triggers(triggers);
        // Every finding holds one of these: a request without any is allowed unchanged, without
        // a call (or an instance).
        meridian_plugin_sdk::request_triggers(scan::REQUEST_TRIGGERS);
        POLICY.with(|p| *p.borrow_mut() = policy);
        Ok(())
    }

    fn inspect_request(_req: RequestSummary, segments: Vec<Segment>) -> RequestVerdict {
        POLICY.with(|p| p.borrow().inspect_request(&segments))
    }

    fn inspect_response(text: String) -> ResponseVerdict {
        // The host restores placeholders itself; without the secrets rule there is nothing to do.
        if !POLICY.with(|p| p.borrow().blocks_secrets_in_response()) {
            return ResponseVerdict::Allow;
        }
        RESPONSE.with(|w| w.borrow_mut().push(&text))
    }
}

export_filter!(PiiRedactor);
