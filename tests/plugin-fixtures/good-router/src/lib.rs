//! The control: a router that keeps the given target order. It also reports, through the host's
//! `histogram-record`, how many times this instance has routed (always 1 when the host gives every
//! call a fresh instance) and counts its calls with `counter-add`. A configuration other than `{}`
//! comes back as the decision's model rewrite: what `configure` kept reaches the hook, whether it
//! ran on this instance or before the host's snapshot.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use meridian::plugin::host::{counter_add, histogram_record, log, Level};
use meridian::plugin::routing::{CachePolicy, Decision};

wit_bindgen::generate!({ path: "../../../wit", world: "router" });

static ROUTED: AtomicU32 = AtomicU32::new(0);
static CONFIG: Mutex<String> = Mutex::new(String::new());

struct GoodRouter;

impl Guest for GoodRouter {
    fn configure(config: String) -> Result<(), String> {
        *CONFIG.lock().map_err(|_| "poisoned")? = config;
        Ok(())
    }

    fn route(request: RequestSummary, targets: Vec<Target>) -> Outcome {
        let seen = ROUTED.fetch_add(1, Ordering::Relaxed) + 1;
        histogram_record("instance_calls", f64::from(seen));
        counter_add("routed", 1);
        log(Level::Debug, &format!("routing {} over {} targets", request.request_id, targets.len()));
        Outcome::Route(Decision {
            targets: targets.into_iter().map(|t| t.name).collect(),
            model_rewrite: CONFIG.lock().ok().map(|c| c.clone()).filter(|c| c != "{}"),
            cache: CachePolicy::Default,
        })
    }
}

export!(GoodRouter);
