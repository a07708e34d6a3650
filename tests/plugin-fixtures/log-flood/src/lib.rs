//! A router that writes 100 000 long log lines and thousands of stdout/stderr lines, then returns
//! a valid decision: the host must cap what reaches its log and still answer.

use meridian::plugin::host::{log, Level};
use meridian::plugin::routing::{CachePolicy, Decision};

wit_bindgen::generate!({ path: "../../../wit", world: "router" });

struct LogFlood;

impl Guest for LogFlood {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn route(_request: RequestSummary, targets: Vec<Target>) -> Outcome {
        let line = "flood ".repeat(700); // 4 200 bytes, over the host's per-line cap
        for _ in 0..100_000 {
            log(Level::Info, &line);
        }
        for i in 0..10_000 {
            println!("stdout line {i}: {}", &line[..200]);
        }
        for i in 0..1_000 {
            eprintln!("stderr line {i}");
        }
        Outcome::Route(Decision {
            targets: targets.into_iter().map(|t| t.name).collect(),
            model_rewrite: None,
            cache: CachePolicy::Default,
        })
    }
}

export!(LogFlood);
