//! A router whose `route` never returns: the host's epoch deadline must stop it.

wit_bindgen::generate!({ path: "../../../wit", world: "router" });

struct Spin;

impl Guest for Spin {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn route(_request: RequestSummary, _targets: Vec<Target>) -> Outcome {
        let mut n: u64 = 0;
        loop {
            // `black_box` keeps the loop from being optimised into something the compiler can
            // reason about; it must really spin.
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

export!(Spin);
