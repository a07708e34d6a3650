//! A router whose answer breaks the contract. Its config (a JSON string) picks how:
//! `"unknown-target"` names a target it was not given, `"empty"` routes to no target,
//! `"bad-status"` rejects with a status outside 400–599.

use meridian::plugin::routing::{CachePolicy, Decision, Refusal};

wit_bindgen::generate!({ path: "../../../wit", world: "router" });

struct InvalidOutput;

fn mode() -> String {
    MODE.with(|m| m.borrow().clone())
}

thread_local! {
    static MODE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl Guest for InvalidOutput {
    fn configure(config: String) -> Result<(), String> {
        MODE.with(|m| *m.borrow_mut() = config.trim_matches('"').to_string());
        Ok(())
    }

    fn route(_request: RequestSummary, targets: Vec<Target>) -> Outcome {
        let decision = |targets: Vec<String>| {
            Outcome::Route(Decision { targets, model_rewrite: None, cache: CachePolicy::Default })
        };
        match mode().as_str() {
            "empty" => decision(Vec::new()),
            "bad-status" => Outcome::Reject(Refusal { status: 200, reason: "not an error".into() }),
            _ => {
                let mut names: Vec<String> = targets.into_iter().map(|t| t.name).collect();
                names.push("nowhere".into());
                decision(names)
            }
        }
    }
}

export!(InvalidOutput);
