//! The node's TOML config (`meridian.toml`), parsed and validated.
//!
//! Properties: text either makes a valid config or is a typed error (`Parse` for TOML syntax,
//! unknown keys and wrong types, `Invalid` for values that make no sense, never `Read`); the
//! accessors the node calls on a valid config (each target's environment, the ledger's and the
//! budgets' store URLs) answer or give a typed error, without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian::config::{Config, ConfigError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(text) {
        Ok(config) => {
            for name in config.targets.keys() {
                let _ = config.target_env(name);
            }
            let _ = config.ledger.store_url();
            let _ = config.budgets.redis_url();
        }
        Err(ConfigError::Parse { message, .. }) => assert!(!message.is_empty()),
        Err(ConfigError::Invalid { key, message }) => assert!(!key.is_empty() && !message.is_empty()),
        Err(e @ ConfigError::Read { .. }) => panic!("parsing text cannot fail to read: {e}"),
    }
});
