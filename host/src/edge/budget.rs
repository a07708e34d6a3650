//! Between routing and the cache: the tenant's budgets ([`crate::budget`]). Once the plan is
//! known, the request's worst case is reserved against every limit of its tenant at once, or the
//! request is refused (429 `budget_exhausted`, `retry-after` at the limit's reset) before anything
//! is sent. The hold goes into the request's record, which settles it with what the request
//! spent when it ends; a stream extends it as its text grows ([`super::respond`]).
//!
//! The worst case is the prompt's tokens plus the output limit: the client's `max_tokens`, or for
//! a whole answer the model's `default_max_tokens`, priced at the most expensive target the plan
//! may reach. A stream with no output limit of its own holds one credit chunk
//! (`budgets.credit_chunk_tokens`) at a time instead: it can be stopped mid-way, a whole answer
//! cannot. Targets billed by time (`gpu_second`, `hour`) have no price before they run, so they
//! reserve no USD; their cost is counted when the request settles.

use std::time::Duration;

use super::context::Exchange;
use super::Edge;
use crate::budget::{Ask, Exhausted, Refused};
use crate::chat::Usage;
use crate::error::GatewayError;
use crate::routes::Plan;

/// Reserves the exchange's worst case under `plan` against its tenant's budgets, and puts the
/// hold in its record. A tenant without limits holds nothing.
pub(super) async fn reserve(edge: &Edge, cx: &mut Exchange, plan: &Plan) -> Result<(), GatewayError> {
    // A relayed request is held here too: the edge it came from holds its tokens but not its
    // cost (a peer edge has no price there), so without this hold a tenant's USD budget would
    // not see what it spends in other regions. Edges sharing one Redis count its tokens twice:
    // more, never less.
    let prompt = cx.record.prompt_tokens;
    let chunk = edge.budgets.credit_chunk_tokens();
    let output = match cx.request.output_limit() {
        Some(limit) => limit,
        None if cx.request.is_stream() => chunk,
        None => plan.model.default_max_tokens,
    };
    let worst = Ask {
        tokens: u64::from(prompt) + u64::from(output),
        usd: most_expensive(plan, Usage { input_tokens: prompt, output_tokens: output, ..Usage::default() }),
    };
    let credit =
        Ask { tokens: u64::from(chunk), usd: most_expensive(plan, Usage { output_tokens: chunk, ..Usage::default() }) };
    match edge.budgets.reserve(&cx.tenant.name, worst).await {
        Ok(hold) => {
            cx.record.hold = hold.map(|h| h.with_credit(credit));
            Ok(())
        }
        Err(refused) => Err(refused_error(&cx.tenant.name, refused)),
    }
}

/// The highest price of `usage` at any target of the plan; a target with no price, or one
/// billed by time, costs nothing here. The prompt is priced as the provider may bill it: as
/// ordinary input, or all of it written to the provider's prompt cache (dearer at Anthropic).
fn most_expensive(plan: &Plan, usage: Usage) -> f64 {
    let routes = &plan.model.routes;
    let written = Usage { cache_write_tokens: usage.input_tokens, ..usage };
    plan.order
        .iter()
        .filter_map(|&i| routes.get(i)?.price)
        .flat_map(|p| [p.cost(usage, Duration::ZERO), p.cost(written, Duration::ZERO)])
        .fold(0.0, f64::max)
}

/// The refusal the client gets.
pub(super) fn refused_error(tenant: &str, refused: Refused) -> GatewayError {
    match refused {
        Refused::Exhausted(Exhausted { which, retry_after }) => {
            GatewayError::BudgetExhausted { tenant: tenant.to_string(), limit: which, retry_after }
        }
        Refused::Unavailable(message) => GatewayError::BudgetUnavailable(message),
    }
}
