//! Cost truth from the ledger: which way to buy inference — per token from a managed API, per
//! second from serverless GPUs, or per hour from dedicated engines — and when to move from one to
//! the next.
//!
//! - [`model`]: the one cost model — a month of traffic priced each way, break-even volumes and
//!   a recommendation.
//! - [`example`]: the seed article's worked example as the model's inputs (`meridian cost
//!   example`).
//! - [`report`]: a ledger's traffic per tenant and model, its actual cost and the model's
//!   comparison (`meridian cost report`); [`plot`] draws it.
//! - [`replay`]: a month through the dispatch core under each way of buying capacity and
//!   spillover between them (`meridian cost replay`).

pub mod example;
pub mod model;
pub mod plot;
pub mod replay;
pub mod report;
