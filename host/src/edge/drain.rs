//! Graceful shutdown. On SIGTERM (or Ctrl-C) the server starts the node's drain:
//!
//! 1. `GET /readyz` answers 503 at once, so that load balancers stop sending requests here;
//! 2. new chat requests (clients' and relayed) are refused with 503 `shutting_down`, a typed
//!    error a client retries elsewhere, while the listener keeps answering (so that `/readyz`
//!    and `/metrics` can still be read during the drain);
//! 3. requests in flight, streams included, have `node.shutdown_grace_ms` to finish;
//! 4. those still running then are cut: a stream ends with a `shutting_down` error event in the
//!    client's API shape, a request still waiting for its answer is refused with 503
//!    `shutting_down`. Then the server closes its connections and the process exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::Edge;

/// How often the drain checks whether requests are still in flight: a shutdown happens once, so
/// a timer is simpler than a notification at the end of every request.
const POLL: Duration = Duration::from_millis(20);

/// The drain's state: started or not, and the signal that cuts what is still running.
pub(super) struct Drain {
    started: AtomicBool,
    cut: watch::Sender<bool>,
}

impl Drain {
    /// Not draining.
    pub fn new() -> Drain {
        Drain { started: AtomicBool::new(false), cut: watch::Sender::new(false) }
    }

    /// Whether the node is draining (`/readyz` answers 503, new requests are refused).
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Resolves when the grace period has ended and what still runs must end now; never before.
    pub fn cut(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut cut = self.cut.subscribe();
        async move {
            // The sender lives as long as the node; were it gone, nothing would ever cut.
            if cut.wait_for(|cut| *cut).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Edge {
    /// Drains the node (see the module docs): from now on `/readyz` answers 503 and new chat
    /// requests are refused; returns once no request is in flight, or once `grace` has passed
    /// and what was still running has been told to end with `shutting_down`.
    pub async fn drain(&self, grace: Duration) {
        self.drain.started.store(true, Ordering::Release);
        info!(in_flight = self.metrics.in_flight.get(), grace_ms = grace.as_millis(), "draining");
        let finished = tokio::time::timeout(grace, async {
            while self.metrics.in_flight.get() > 0 {
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        if finished.is_err() {
            warn!(
                in_flight = self.metrics.in_flight.get(),
                "requests still in flight at the end of the grace period: ending them with `shutting_down`"
            );
            self.drain.cut.send_replace(true);
        }
    }
}
