//! A router whose `route` panics (a wasm `unreachable` trap for the host).

wit_bindgen::generate!({ path: "../../../wit", world: "router" });

struct Trap;

impl Guest for Trap {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn route(request: RequestSummary, _targets: Vec<Target>) -> Outcome {
        panic!("fixture-trap: deliberate panic for request {}", request.request_id)
    }
}

export!(Trap);
