//! A router whose `route` recurses without end, each frame holding a buffer in linear memory:
//! its shadow stack (first in memory) runs out below address 0, which must end the call as a
//! trap rather than write over the module's data.

use std::hint::black_box;

wit_bindgen::generate!({ path: "../../../wit", world: "router" });

struct StackOverflow;

/// Never returns: every level keeps a 1 KiB buffer, whose address escapes, on the stack.
#[allow(unconditional_recursion)]
fn descend(depth: u64) -> u64 {
    let frame = [depth as u8; 1024];
    black_box(&frame);
    descend(depth + 1) + u64::from(frame[0])
}

impl Guest for StackOverflow {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn route(_request: RequestSummary, _targets: Vec<Target>) -> Outcome {
        let depth = descend(black_box(0));
        panic!("fixture-stack-overflow: returned from depth {depth}")
    }
}

export!(StackOverflow);
