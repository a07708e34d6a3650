//! Price models and what one request cost under them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::chat::Usage;

/// How a target bills, from the three ways of buying inference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "per", rename_all = "snake_case", deny_unknown_fields)]
pub enum PriceModel {
    /// Managed APIs: per million input and output tokens, prompt tokens the provider read from or
    /// wrote to its prompt cache at their own prices.
    Token {
        /// USD per million prompt tokens.
        input_usd_per_mtok: f64,
        /// USD per million generated tokens.
        output_usd_per_mtok: f64,
        /// USD per million prompt tokens read from the provider's prompt cache; the input price
        /// when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cached_input_usd_per_mtok: Option<f64>,
        /// USD per million prompt tokens written to the provider's prompt cache; the input price
        /// when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cache_write_usd_per_mtok: Option<f64>,
    },
    /// Serverless GPUs: per GPU-second while the request runs.
    GpuSecond {
        /// USD per GPU-second.
        usd_per_second: f64,
        /// The platform's billing minimum per request, in seconds (default 0).
        #[serde(default)]
        min_billed_seconds: f64,
        /// Seconds billed for starting the endpoint when a request finds it scaled to zero
        /// (default 0).
        #[serde(default)]
        cold_start_seconds: f64,
        /// Idle seconds after which the platform scales the endpoint to zero, so the next request
        /// pays a cold start; never when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scale_to_zero_after_seconds: Option<f64>,
    },
    /// Dedicated engines: per hour whether busy or not.
    Hour {
        /// USD per hour for the node.
        usd_per_hour: f64,
        /// Requests it serves at once; a request is charged its share of the node's time.
        #[serde(default = "one")]
        capacity: u32,
    },
}

fn one() -> u32 {
    1
}

impl PriceModel {
    /// A per-token price whose cache reads and writes cost what other prompt tokens do.
    pub fn token(input_usd_per_mtok: f64, output_usd_per_mtok: f64) -> PriceModel {
        PriceModel::Token {
            input_usd_per_mtok,
            output_usd_per_mtok,
            cached_input_usd_per_mtok: None,
            cache_write_usd_per_mtok: None,
        }
    }

    /// A per-GPU-second price with no billing minimum and no cold starts.
    pub fn gpu_second(usd_per_second: f64) -> PriceModel {
        PriceModel::GpuSecond {
            usd_per_second,
            min_billed_seconds: 0.0,
            cold_start_seconds: 0.0,
            scale_to_zero_after_seconds: None,
        }
    }

    /// Checks that prices are finite and not negative.
    pub fn validate(&self) -> Result<(), String> {
        let prices: &[f64] = match self {
            PriceModel::Token {
                input_usd_per_mtok,
                output_usd_per_mtok,
                cached_input_usd_per_mtok,
                cache_write_usd_per_mtok,
            } => &[
                *input_usd_per_mtok,
                *output_usd_per_mtok,
                cached_input_usd_per_mtok.unwrap_or(0.0),
                cache_write_usd_per_mtok.unwrap_or(0.0),
            ],
            PriceModel::GpuSecond {
                usd_per_second,
                min_billed_seconds,
                cold_start_seconds,
                scale_to_zero_after_seconds,
            } => {
                &[*usd_per_second, *min_billed_seconds, *cold_start_seconds, scale_to_zero_after_seconds.unwrap_or(0.0)]
            }
            PriceModel::Hour { usd_per_hour, capacity } => {
                if *capacity == 0 {
                    return Err("capacity must be at least 1".into());
                }
                &[*usd_per_hour]
            }
        };
        if prices.iter().all(|p| p.is_finite() && *p >= 0.0) {
            Ok(())
        } else {
            Err("prices must be finite and not negative".into())
        }
    }

    /// What a request adds to the bill, in USD: per token its usage; per GPU-second its busy time
    /// (at least the billing minimum), plus the cold start when `cold` (it found the endpoint
    /// scaled to zero); nothing on a dedicated engine, whose hours are paid busy or idle (the
    /// ledger records them as standing costs, and reports spread them over the requests served).
    pub fn billed(&self, usage: Usage, busy: Duration, cold: bool) -> f64 {
        match *self {
            PriceModel::Hour { .. } => 0.0,
            PriceModel::GpuSecond { usd_per_second, cold_start_seconds, .. } if cold => {
                self.cost(usage, busy) + cold_start_seconds * usd_per_second
            }
            _ => self.cost(usage, busy),
        }
    }

    /// The idle time after which a request starts the target cold, if it scales to zero.
    pub fn scale_to_zero_after(&self) -> Option<Duration> {
        match *self {
            PriceModel::GpuSecond { scale_to_zero_after_seconds: Some(s), .. } => Duration::try_from_secs_f64(s).ok(),
            _ => None,
        }
    }

    /// The cost in USD of a request with these token counts that kept the target busy for `busy`,
    /// cold starts aside: what it would cost on this target in the steady state.
    ///
    /// For a dedicated engine this is the request's share of the node's time at full use (what
    /// it would cost if the hours were all spent serving), which lets break-even points be
    /// computed from real traffic; what the engine really costs is its hours ([`PriceModel::billed`]).
    pub fn cost(&self, usage: Usage, busy: Duration) -> f64 {
        match *self {
            PriceModel::Token {
                input_usd_per_mtok,
                output_usd_per_mtok,
                cached_input_usd_per_mtok,
                cache_write_usd_per_mtok,
            } => {
                (f64::from(usage.uncached_input_tokens()) * input_usd_per_mtok
                    + f64::from(usage.cache_read_tokens) * cached_input_usd_per_mtok.unwrap_or(input_usd_per_mtok)
                    + f64::from(usage.cache_write_tokens) * cache_write_usd_per_mtok.unwrap_or(input_usd_per_mtok)
                    + f64::from(usage.output_tokens) * output_usd_per_mtok)
                    / 1e6
            }
            PriceModel::GpuSecond { usd_per_second, min_billed_seconds, .. } => {
                busy.as_secs_f64().max(min_billed_seconds) * usd_per_second
            }
            PriceModel::Hour { usd_per_hour, capacity } => {
                busy.as_secs_f64() * usd_per_hour / 3600.0 / f64::from(capacity)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_model_prices_what_it_bills() {
        let usage = Usage { input_tokens: 1_000_000, output_tokens: 500_000, ..Default::default() };
        let token = PriceModel::token(0.15, 0.6);
        assert!((token.cost(usage, Duration::ZERO) - 0.45).abs() < 1e-12);
        let gpu = PriceModel::gpu_second(0.001);
        assert!((gpu.cost(usage, Duration::from_secs(2)) - 0.002).abs() < 1e-12);
        assert!((gpu.billed(usage, Duration::from_secs(2), true) - 0.002).abs() < 1e-12);
        let hour = PriceModel::Hour { usd_per_hour: 3.6, capacity: 4 };
        assert!((hour.cost(usage, Duration::from_secs(10)) - 0.0025).abs() < 1e-12);
        assert_eq!(hour.billed(usage, Duration::from_secs(10), false), 0.0, "hours are standing costs");
        assert!(PriceModel::Hour { usd_per_hour: 1.0, capacity: 0 }.validate().is_err());
        assert!(PriceModel::gpu_second(f64::NAN).validate().is_err());
    }

    #[test]
    fn serverless_bills_its_minimum_and_cold_starts() {
        let serverless: PriceModel = toml::from_str(
            "per = 'gpu_second'\nusd_per_second = 0.002\nmin_billed_seconds = 1.0\ncold_start_seconds = 5.0\n\
             scale_to_zero_after_seconds = 60.0",
        )
        .unwrap();
        let usage = Usage::default();
        // 300 ms busy is billed as the 1 s minimum; 3 s as 3 s.
        assert!((serverless.billed(usage, Duration::from_millis(300), false) - 0.002).abs() < 1e-12);
        assert!((serverless.billed(usage, Duration::from_secs(3), false) - 0.006).abs() < 1e-12);
        // A cold start adds its 5 s.
        assert!((serverless.billed(usage, Duration::from_secs(3), true) - 0.016).abs() < 1e-12);
        assert_eq!(serverless.scale_to_zero_after(), Some(Duration::from_secs(60)));
        let negative = "per = 'gpu_second'\nusd_per_second = 0.002\ncold_start_seconds = -1.0";
        assert!(toml::from_str::<PriceModel>(negative).unwrap().validate().is_err());
    }

    #[test]
    fn cached_prompt_tokens_are_priced_at_their_own_rates() {
        // 10k prompt tokens: 6k read from the cache, 1k written to it, 3k neither.
        let usage =
            Usage { input_tokens: 10_000, output_tokens: 2_000, cache_read_tokens: 6_000, cache_write_tokens: 1_000 };
        let priced: PriceModel = toml::from_str(
            "per = 'token'\ninput_usd_per_mtok = 3.0\noutput_usd_per_mtok = 15.0\n\
             cached_input_usd_per_mtok = 0.3\ncache_write_usd_per_mtok = 3.75",
        )
        .unwrap();
        let want = (3_000.0 * 3.0 + 6_000.0 * 0.3 + 1_000.0 * 3.75 + 2_000.0 * 15.0) / 1e6;
        assert!((priced.cost(usage, Duration::ZERO) - want).abs() < 1e-15);
        assert!(priced.validate().is_ok());

        // Without cache prices every prompt token costs the input price.
        let plain = PriceModel::token(3.0, 15.0);
        let want = (10_000.0 * 3.0 + 2_000.0 * 15.0) / 1e6;
        assert!((plain.cost(usage, Duration::ZERO) - want).abs() < 1e-15);
        assert_eq!(serde_json::to_value(plain).unwrap().as_object().unwrap().len(), 3, "absent prices stay absent");

        // Cache counts beyond the prompt (a confused upstream) never make the rest negative.
        let odd = Usage { input_tokens: 10, output_tokens: 0, cache_read_tokens: 8, cache_write_tokens: 8 };
        let want = (8.0 * 0.3 + 8.0 * 3.75) / 1e6;
        assert!((priced.cost(odd, Duration::ZERO) - want).abs() < 1e-15);

        let with = |cached, write| PriceModel::Token {
            input_usd_per_mtok: 3.0,
            output_usd_per_mtok: 15.0,
            cached_input_usd_per_mtok: cached,
            cache_write_usd_per_mtok: write,
        };
        for bad in [f64::NAN, f64::INFINITY, -0.1] {
            assert!(with(Some(bad), None).validate().is_err(), "cached price {bad}");
            assert!(with(None, Some(bad)).validate().is_err(), "cache write price {bad}");
        }
    }
}
