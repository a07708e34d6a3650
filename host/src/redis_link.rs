//! A link to the Redis a region's edges share (the budgets' counters, the prompt cache's shared
//! level): one reconnecting connection, and whether Redis answers. While it does not, callers are
//! told at once rather than after a timeout per request, and Redis is tried again once per
//! [`RETRY`]; the change both ways is logged once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tracing::{info, warn};

/// How long a Redis that did not answer is left alone before it is tried again.
pub const RETRY: Duration = Duration::from_secs(1);

/// A connection to one Redis, and its health as the last command found it.
pub struct Link {
    connection: ConnectionManager,
    /// What the edge keeps there, for logs (`budgets`, `prompt cache`).
    what: &'static str,
    up: AtomicBool,
    /// While down: when the next command may try Redis again, in ms since `epoch`.
    retry_at_ms: AtomicU64,
    epoch: Instant,
}

impl Link {
    /// A link to `url` whose commands (and connection) time out after `timeout`. Nothing is sent
    /// until the first command, so an edge starts while its Redis is away.
    pub fn new(url: &str, timeout: Duration, what: &'static str) -> Result<Link, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // A request waits for one command, not for a reconnection schedule.
            .set_number_of_retries(1);
        let connection = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| e.to_string())?;
        Ok(Link { connection, what, up: AtomicBool::new(true), retry_at_ms: AtomicU64::new(0), epoch: Instant::now() })
    }

    /// The connection (commands are pipelined on it; cloning it is cheap).
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// Whether Redis answered the last command.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn retry_ms() -> u64 {
        u64::try_from(RETRY.as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether to send a command now: while Redis is up, or, while down, one command per
    /// [`RETRY`] (the one that finds it back).
    pub fn usable(&self) -> bool {
        if self.is_up() {
            return true;
        }
        let (now, at) = (self.now_ms(), self.retry_at_ms.load(Ordering::Relaxed));
        now >= at
            && self
                .retry_at_ms
                .compare_exchange(at, now + Self::retry_ms(), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Notes whether a command's `result` came from Redis, logging when that changes.
    pub fn answered<T>(&self, result: redis::RedisResult<T>) -> Result<T, String> {
        match result {
            Ok(value) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    info!(store = self.what, "Redis answers again");
                }
                Ok(value)
            }
            Err(e) => {
                self.retry_at_ms.store(self.now_ms() + Self::retry_ms(), Ordering::Relaxed);
                if self.up.swap(false, Ordering::Relaxed) {
                    warn!(store = self.what, error = %e, "Redis does not answer; tried again every second");
                }
                Err(e.to_string())
            }
        }
    }

    /// Pings Redis every [`RETRY`] for as long as the link is held, so that whether it answers
    /// is known even when no request needs it.
    pub fn spawn_probe(self: &std::sync::Arc<Self>) {
        crate::periodic::every(RETRY, self, |link| async move {
            let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut link.connection()).await;
            let _ = link.answered(pong);
        });
    }
}
