//! A router built against `meridian:plugin@0.1.0`, the contract as first published (frozen in
//! `wit/` here): the host's minor versions only add, so a component built then still loads and
//! runs. It logs through the 0.1.0 `host` interface and reverses the target order, so that a test
//! sees its answer.

use meridian::plugin::host::{log, Level};
use meridian::plugin::routing::{CachePolicy, Decision};

wit_bindgen::generate!({ path: "wit", world: "router" });

struct Contract010;

impl Guest for Contract010 {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn route(_request: RequestSummary, targets: Vec<Target>) -> Outcome {
        log(Level::Info, "a 0.1.0 router");
        Outcome::Route(Decision {
            targets: targets.into_iter().rev().map(|t| t.name).collect(),
            model_rewrite: None,
            cache: CachePolicy::Default,
        })
    }
}

export!(Contract010);
