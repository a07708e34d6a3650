//! A router whose `route` allocates (and touches) memory until the host's cap stops it.

wit_bindgen::generate!({ path: "../../../wit", world: "router" });

struct MemoryBomb;

impl Guest for MemoryBomb {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn route(_request: RequestSummary, _targets: Vec<Target>) -> Outcome {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // 1 MiB at a time, filled so that the pages are really used.
            hoard.push(std::hint::black_box(vec![0xA5u8; 1 << 20]));
        }
    }
}

export!(MemoryBomb);
