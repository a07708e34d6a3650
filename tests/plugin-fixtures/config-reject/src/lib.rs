//! A router that refuses every configuration: the host must refuse to load it, with this text.

wit_bindgen::generate!({ path: "../../../wit", world: "router" });

struct ConfigReject;

impl Guest for ConfigReject {
    fn configure(config: String) -> Result<(), String> {
        Err(format!("bad config: expected {{\"threshold_ms\": <number>}}, got {config}"))
    }

    fn route(_request: RequestSummary, _targets: Vec<Target>) -> Outcome {
        unreachable!("never configured, so never asked to route")
    }
}

export!(ConfigReject);
