//! The dispatch core: which targets a request may go to, in what order, and what happens after
//! each attempt. No I/O and no clock (in the spirit of quinn-proto): the edge
//! ([`crate::edge`]) and the routing simulation ([`crate::simulate`]) both drive it, one with real
//! targets and the other with simulated ones, so that what the simulation reports is what the edge
//! does.
//!
//! 1. [`plan`] takes the model's targets as [`Candidate`]s, the tenant's [`Policy`] and the
//!    router's answer (or its failure), and returns the order to try. The host's invariants
//!    ([`policy`]) filter the router's order, and the static order that replaces a failed router:
//!    a router can narrow and order, never widen. When nothing is left the request is refused with
//!    a typed [`Refusal`].
//! 2. [`Attempts`] walks the plan: [`Attempts::next`] says which target to try ([`Step::Try`]),
//!    skipping ejected ones (through [`Admit`]) unless every target is out, and
//!    [`Attempts::record`] takes each attempt's typed outcome, whose [`Retry`] decision says
//!    whether the next target is tried. Every target is tried at most once.

pub mod policy;

pub use policy::{carries_unredacted_pii, Candidate, Policy, Protocol};

pub use crate::error::{Exclusion, Refusal};
use crate::error::{Retry, UpstreamError};

/// What the tenant's router said, as far as the plan is concerned (a router's refusal ends the
/// request before a plan is made).
#[derive(Debug, Clone, PartialEq)]
pub enum RouterAnswer<'a> {
    /// The tenant has no router: the static order.
    Static,
    /// The router's order, as target names. Names the model does not have and repeats are
    /// dropped; an order with no known name counts as a failure.
    Order(&'a [String]),
    /// The router failed (deadline, saturated pool, quarantine, trap, invalid answer).
    Failed(&'a str),
}

/// The order to try the candidates in (indices into `candidates`), each at most once.
///
/// The router's order when it gave one that names a known target, else the static order (the
/// order of `candidates`); either way with every target the policy excludes left out.
pub fn plan(candidates: &[Candidate], policy: &Policy, router: RouterAnswer<'_>) -> Result<Vec<usize>, Refusal> {
    let chosen: Option<Vec<usize>> = match router {
        RouterAnswer::Static | RouterAnswer::Failed(_) => None,
        RouterAnswer::Order(names) => {
            let mut order = Vec::with_capacity(names.len());
            for name in names {
                if let Some(i) = candidates.iter().position(|c| &c.name == name) {
                    if !order.contains(&i) {
                        order.push(i);
                    }
                }
            }
            (!order.is_empty()).then_some(order)
        }
    };
    let failed = match router {
        RouterAnswer::Failed(reason) => Some(reason.to_string()),
        RouterAnswer::Order(_) if chosen.is_none() => Some("its answer named none of the model's targets".to_string()),
        _ => None,
    };
    let order = chosen.unwrap_or_else(|| (0..candidates.len()).collect());
    let mut first = None;
    let mut allowed = Vec::with_capacity(order.len());
    for i in order {
        match policy.excludes(&candidates[i]) {
            None => allowed.push(i),
            Some(why) => {
                tracing::debug!(target_name = %candidates[i].name, reason = %why, "target excluded by the tenant's policy");
                first.get_or_insert(why);
            }
        }
    }
    match (allowed.is_empty(), first, failed) {
        (false, _, _) => Ok(allowed),
        (true, Some(first), Some(reason)) => Err(Refusal::RouterFailed { reason, first }),
        (true, Some(first), None) => Err(Refusal::Policy { first }),
        // No candidates at all: validated config gives every model one.
        (true, None, _) => Err(Refusal::NoTargets),
    }
}

/// Whether targets take requests now: the live health of each (outlier ejection, half-open
/// trials), by candidate index.
pub trait Admit {
    /// Whether target `i` would take a request now, without claiming anything.
    fn available(&self, i: usize) -> bool;
    /// Claims target `i` for an attempt now: `false` when it is ejected, or half-open with its one
    /// trial already under way.
    fn admit(&mut self, i: usize) -> bool;
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Send the request to target `i`, then [`Attempts::record`] the outcome.
    Try(usize),
    /// Target `i` answered.
    Answered(usize),
    /// No target answered: the failure the client gets (a refusal of the request itself, else
    /// the last target's failure, else why no target could serve it).
    Failed(UpstreamError),
}

/// The attempts of one request along its plan.
#[derive(Debug)]
pub struct Attempts {
    order: Vec<usize>,
    pos: usize,
    /// Ejected targets are tried too: every target was out, or the first pass found none in.
    anyway: bool,
    tried: Vec<usize>,
    pending: Option<usize>,
    answered: Option<usize>,
    stopped: Option<UpstreamError>,
    /// The last failure of a target.
    failed: Option<UpstreamError>,
    /// The last target that could not serve the request.
    skipped: Option<UpstreamError>,
}

impl Attempts {
    /// Attempts along `order` (from [`plan`]). When every target is out, each is tried anyway:
    /// a probable failure is better than a certain one.
    pub fn new(order: Vec<usize>, health: &impl Admit) -> Attempts {
        let anyway = order.iter().all(|&i| !health.available(i));
        Attempts {
            order,
            pos: 0,
            anyway,
            tried: Vec::new(),
            pending: None,
            answered: None,
            stopped: None,
            failed: None,
            skipped: None,
        }
    }

    /// Targets tried so far, in order.
    pub fn tried(&self) -> &[usize] {
        &self.tried
    }

    /// The next step.
    pub fn next(&mut self, health: &mut impl Admit) -> Step {
        if let Some(i) = self.answered {
            return Step::Answered(i);
        }
        if let Some(e) = &self.stopped {
            return Step::Failed(e.clone());
        }
        loop {
            while let Some(&i) = self.order.get(self.pos) {
                self.pos += 1;
                if self.tried.contains(&i) || (!self.anyway && !health.admit(i)) {
                    continue;
                }
                self.tried.push(i);
                self.pending = Some(i);
                return Step::Try(i);
            }
            // A pass that found every target out (ejected, or half-open with a trial taken by a
            // concurrent request as it was reached): try them anyway, once.
            if self.anyway || self.failed.is_some() {
                break;
            }
            self.anyway = true;
            self.pos = 0;
        }
        Step::Failed(self.failed.clone().or_else(|| self.skipped.clone()).unwrap_or_else(|| UpstreamError::Protocol {
            target: String::new(),
            message: "no attempt outcome was recorded".into(),
        }))
    }

    /// The outcome of the attempt at target `i` that [`Attempts::next`] asked for.
    pub fn record(&mut self, i: usize, outcome: Result<(), UpstreamError>) {
        if self.pending.take() != Some(i) {
            return;
        }
        match outcome {
            Ok(()) => self.answered = Some(i),
            Err(e) => match e.retry() {
                Retry::Next => self.failed = Some(e),
                Retry::Skip => self.skipped = Some(e),
                Retry::Stop => self.stopped = Some(e),
            },
        }
    }
}

#[cfg(test)]
mod tests;
