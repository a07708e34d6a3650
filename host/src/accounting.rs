//! Price models and what one request cost under them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::chat::Usage;

/// How a target bills, from the three ways of buying inference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "per", rename_all = "snake_case", deny_unknown_fields)]
pub enum PriceModel {
    /// Managed APIs: per million input and output tokens.
    Token {
        /// USD per million prompt tokens.
        input_usd_per_mtok: f64,
        /// USD per million generated tokens.
        output_usd_per_mtok: f64,
    },
    /// Serverless GPUs: per GPU-second while the request runs.
    GpuSecond {
        /// USD per GPU-second.
        usd_per_second: f64,
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
    /// Checks that prices are finite and not negative.
    pub fn validate(&self) -> Result<(), String> {
        let prices: &[f64] = match self {
            PriceModel::Token { input_usd_per_mtok, output_usd_per_mtok } => {
                &[*input_usd_per_mtok, *output_usd_per_mtok]
            }
            PriceModel::GpuSecond { usd_per_second } => &[*usd_per_second],
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

    /// The cost in USD of a request with these token counts that kept the target busy for `busy`.
    ///
    /// For a dedicated engine this is the request's share of time already paid for: the marginal
    /// cost is close to zero, but recording the share lets break-even points be computed from
    /// real traffic.
    pub fn cost(&self, usage: Usage, busy: Duration) -> f64 {
        match *self {
            PriceModel::Token { input_usd_per_mtok, output_usd_per_mtok } => {
                (f64::from(usage.input_tokens) * input_usd_per_mtok
                    + f64::from(usage.output_tokens) * output_usd_per_mtok)
                    / 1e6
            }
            PriceModel::GpuSecond { usd_per_second } => busy.as_secs_f64() * usd_per_second,
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
        let usage = Usage { input_tokens: 1_000_000, output_tokens: 500_000 };
        let token = PriceModel::Token { input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6 };
        assert!((token.cost(usage, Duration::ZERO) - 0.45).abs() < 1e-12);
        let gpu = PriceModel::GpuSecond { usd_per_second: 0.001 };
        assert!((gpu.cost(usage, Duration::from_secs(2)) - 0.002).abs() < 1e-12);
        let hour = PriceModel::Hour { usd_per_hour: 3.6, capacity: 4 };
        assert!((hour.cost(usage, Duration::from_secs(10)) - 0.0025).abs() < 1e-12);
        assert!(PriceModel::Hour { usd_per_hour: 1.0, capacity: 0 }.validate().is_err());
        assert!(PriceModel::GpuSecond { usd_per_second: f64::NAN }.validate().is_err());
    }
}
